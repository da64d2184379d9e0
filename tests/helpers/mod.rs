//! Helpers shared by the integration tests: tiny configs, random models, sessions.

#![allow(dead_code)]

pub mod chromium;
pub mod ports;
pub mod synthetic;

use std::collections::BTreeMap;
use std::path::Path;

use llama_parity::dump::{DType, ModelConfig, Precision, Tensor};
use llama_parity::model::llama::{Llama, Session, StepOutput};
use llama_parity::model::numerics::Exact;
use llama_parity::model::plan::Plan;
use llama_parity::model::weights::Weights;
use ndarray::ArrayD;
use serde_json::{json, Value};

/// The shape of a tiny model.
#[derive(Debug, Clone)]
pub struct Spec {
    pub layers: usize,
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: Option<usize>,
    pub vocab: usize,
    pub intermediate: usize,
    pub tied: bool,
    pub bias: bool,
    pub rope: Value,
}

impl Default for Spec {
    fn default() -> Spec {
        Spec {
            layers: 2,
            hidden: 16,
            heads: 4,
            kv_heads: 2,
            head_dim: None,
            vocab: 32,
            intermediate: 24,
            tied: false,
            bias: false,
            rope: json!({"rope_type": "default", "rope_theta": 10000.0}),
        }
    }
}

impl Spec {
    pub fn config(&self) -> ModelConfig {
        let mut v = json!({
            "vocab_size": self.vocab, "hidden_size": self.hidden, "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers, "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads, "max_position_embeddings": 64, "rms_norm_eps": 1e-6,
            "rope_parameters": self.rope, "tie_word_embeddings": self.tied, "hidden_act": "silu",
            "attention_bias": self.bias, "mlp_bias": self.bias,
        });
        if let Some(d) = self.head_dim {
            v["head_dim"] = d.into();
        }
        serde_json::from_value(v).expect("a valid config")
    }

    pub fn model(&self, seed: u64) -> Llama {
        let cfg = self.config();
        let w = Weights::random(&cfg, seed);
        Llama::new(cfg, w, Path::new("<test>")).expect("a valid model")
    }
}

pub fn exact() -> Exact {
    Exact::new(Precision::F32)
}

/// Left-padded mask rows: `pads[b]` zeros then ones, length `len`.
pub fn left_padded(pads: &[usize], len: usize) -> Vec<Vec<i64>> {
    pads.iter().map(|&p| (0..len).map(|t| (t >= p) as i64).collect()).collect()
}

/// Deterministic token ids `[batch][len]` in `0..vocab`.
pub fn tokens(batch: usize, len: usize, vocab: usize, seed: u64) -> Vec<Vec<i64>> {
    let mut r = llama_parity::model::rng::SplitMix64::new(seed);
    (0..batch).map(|_| (0..len).map(|_| r.below(vocab as u64) as i64).collect()).collect()
}

/// One prefill of `ids` under `mask`, then one decode step per column of `decode`.
pub fn run_steps(
    model: &Llama,
    ids: &[Vec<i64>],
    mask: &[Vec<i64>],
    decode: &[Vec<i64>],
) -> Vec<StepOutput> {
    let n = exact();
    let plan = Plan::default();
    let steps = decode.first().map_or(0, Vec::len);
    let mut s = Session::new(model, ids.len(), ids[0].len() + steps, &n, &plan);
    let mut out = vec![s.prefill(ids, mask, None).expect("prefill")];
    for j in 0..steps {
        let col: Vec<i64> = decode.iter().map(|r| r[j]).collect();
        out.push(s.decode(&col, None).expect("decode"));
    }
    out
}

/// Largest absolute difference; panics on a shape mismatch.
pub fn max_abs_diff(a: &ArrayD<f64>, b: &ArrayD<f64>) -> f64 {
    assert_eq!(a.shape(), b.shape());
    a.iter().zip(b.iter()).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
}

/// The HF-named tensors of `w` (for writing a `weights.safetensors`).
pub fn weight_tensors(w: &Weights, tied: bool, dtype: DType) -> BTreeMap<String, Tensor> {
    w.named_parameters(tied).into_iter().map(|(k, a)| (k, Tensor::from_array(&a, dtype))).collect()
}

/// Proptest settings for every property file: 256 cases (or `PROPTEST_CASES`) from a
/// fixed seed, so a failure reproduces on every machine.
pub fn proptest_config() -> proptest::test_runner::Config {
    proptest::test_runner::Config {
        rng_seed: proptest::test_runner::RngSeed::Fixed(0x11a3_a9a1),
        ..proptest::test_runner::Config::default()
    }
}

/// Runs the `parity` binary with `args` from the repository root: exit code, stdout,
/// stderr.
pub fn parity(args: &[&str]) -> (Option<i32>, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_parity"))
        .current_dir(root())
        .args(args)
        .output()
        .expect("run parity");
    let text = |b: Vec<u8>| String::from_utf8_lossy(&b).into_owned();
    (out.status.code(), text(out.stdout), text(out.stderr))
}

/// `parity compare GOLDEN CANDIDATE --report REPORT ARGS...`: (exit code, report.json,
/// stderr); panics, showing stderr, when no report was written.
pub fn compare_report(
    golden: &str,
    candidate: &Path,
    report: &Path,
    args: &[&str],
) -> (Option<i32>, Value, String) {
    let mut all = vec!["compare", golden, candidate.to_str().unwrap()];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--report", report.to_str().unwrap()]);
    let (code, _, err) = parity(&all);
    let text = std::fs::read_to_string(report.join("report.json"))
        .unwrap_or_else(|e| panic!("{}: no report ({e}); stderr: {err}", candidate.display()));
    (code, serde_json::from_str(&text).unwrap(), err)
}

/// The `report.json` of the report set written into `dir`.
pub fn report_json(dir: &Path) -> serde_json::Value {
    let p = dir.join("report.json");
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The repository root.
pub fn root() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

/// Copies the directory tree `src` to `dst` (created).
pub fn copy_tree(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let p = e.unwrap().path();
        let to = dst.join(p.file_name().unwrap());
        if p.is_dir() {
            copy_tree(&p, &to);
        } else {
            std::fs::copy(&p, &to).unwrap();
        }
    }
}

/// The committed golden suite, by directory name; `golden_suite` checks that the
/// directories under `golden/` are exactly these.
pub const GOLDENS: [&str; 9] = [
    "mha_f32",
    "gqa_pad_f32",
    "gqa_pad_bf16",
    "gqa_pad_f16",
    "llama3_f32",
    "yarn_f32",
    "linear_f32",
    "longrope_f32",
    "mqa_tied_f32",
];

/// The dump directories (holding `manifest.json`) under `sub` of the repository, sorted.
pub fn dump_dirs(sub: &str) -> Vec<std::path::PathBuf> {
    let dir = root().join(sub);
    let mut v: Vec<std::path::PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("manifest.json").is_file())
        .collect();
    v.sort();
    assert!(!v.is_empty(), "no dumps under {}", dir.display());
    v
}

/// SHA-256 of every file under `dirs` (recursively, symlinks not followed), by path:
/// taken before and after runs to show that no input file's bytes changed, and that
/// no file appeared or vanished.
pub fn input_hashes(dirs: &[std::path::PathBuf]) -> BTreeMap<std::path::PathBuf, [u8; 32]> {
    use sha2::{Digest, Sha256};
    let mut out = BTreeMap::new();
    let mut stack: Vec<std::path::PathBuf> = dirs.to_vec();
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let p = e.path();
            let Ok(t) = e.file_type() else { continue };
            if t.is_dir() {
                stack.push(p);
            } else if t.is_file() {
                let bytes = std::fs::read(&p).expect("read an input file");
                out.insert(p, Sha256::digest(&bytes).into());
            } else {
                out.insert(p, [0; 32]);
            }
        }
    }
    out
}

/// Runs `parity ARGS` in `dir`, killing it after 60 s (a hang fails the test rather
/// than the suite). Returns (exit code, stdout, stderr).
pub fn parity_in(dir: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_parity"))
        .current_dir(dir)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run parity");
    let start = std::time::Instant::now();
    while child.try_wait().expect("wait").is_none() {
        if start.elapsed() > std::time::Duration::from_secs(60) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("parity {args:?} hung for 60 s");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("output");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Rewrites the `.pt` zip at `pt` with its `data.pkl` replaced by `edit(old pickle)`.
pub fn rewrite_pickle(pt: &Path, edit: impl FnOnce(&[u8]) -> Vec<u8>) {
    use std::io::{Read, Write};
    let mut zin = zip::ZipArchive::new(std::fs::File::open(pt).expect("open")).expect("zip");
    let mut files = Vec::new();
    for i in 0..zin.len() {
        let mut f = zin.by_index(i).expect("entry");
        let mut bytes = Vec::new();
        f.read_to_end(&mut bytes).expect("read");
        files.push((f.name().expect("name").to_string(), bytes));
    }
    let pkl = files.iter_mut().find(|(n, _)| n.ends_with("data.pkl")).expect("data.pkl");
    pkl.1 = edit(&pkl.1);
    let mut zout = zip::ZipWriter::new(std::fs::File::create(pt).expect("create"));
    let opts =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for (name, bytes) in &files {
        zout.start_file(name.as_str(), opts).expect("start");
        zout.write_all(bytes).expect("write");
    }
    zout.finish().expect("finish");
}

/// Runs `cmd` (a `parity` command line) with `--report rep` appended: its exit code,
/// stdout and stderr together, and the report's JSON (`Null` when none was written).
pub fn run_with_report(mut cmd: std::process::Command, rep: &Path) -> (Option<i32>, String, Value) {
    let out = cmd.arg("--report").arg(rep).output().expect("run parity");
    let text =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let report = if rep.join("report.json").is_file() { report_json(rep) } else { Value::Null };
    (out.status.code(), text, report)
}
