//! `parity check-weights` on LoRA adapters (CONTRACT §5): the committed PEFT adapters
//! (`fixtures/lora/golden/*/adapter`) against mindpet adapter checkpoints made here by
//! the repository's converter (`fixtures/ports/mindspore/lora.py`, in the MindSpore
//! venv), with its conversion faults planted, and against checkpoints rewritten from
//! the correct one (a tensor dropped, lora_A transposed, names in lower case or another
//! naming with `--map`).
//!
//! Needs the MindSpore venv (`bash .ci/setup`, or `PARITY_MINDSPORE_PYTHON` /
//! `PARITY_MINDSPORE_VENV`): without it these tests fail, they never pass silently.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use llama_parity::dump::{DType, Tensor};
use llama_parity::weights::ckpt::Checkpoint;

use crate::helpers::{parity_in, root};

/// The MindSpore port's interpreter, found as `parity run --impl mindspore` finds it.
fn mindspore_python() -> PathBuf {
    let ports = llama_parity::model::Ports::from_vars(|k| std::env::var_os(k));
    let py = llama_parity::model::ports::MINDSPORE.python(&ports);
    assert!(
        py.is_file(),
        "no MindSpore interpreter at {}: run bash .ci/setup (it creates \
         ~/.cache/llama-parity/mindspore-venv), or point PARITY_MINDSPORE_PYTHON or \
         PARITY_MINDSPORE_VENV at one",
        py.display()
    );
    py
}

/// The converted checkpoints: (file stem, golden, conversion faults). Each is
/// `<stem>.ckpt` with the converter's declaration `<stem>.ckpt.json` beside it.
const CONVERSIONS: &[(&str, &str, &[&str])] = &[
    ("good", "lora_f32", &[]),
    ("gate_up_swapped", "lora_f32", &["lora.gate_up_swapped@layers=1"]),
    ("target_missing", "lora_f32", &["lora.target_missing@component=v_proj@layers=0"]),
    ("scale_alpha", "lora_f32", &["lora.scale_alpha@component=o_proj"]),
    ("rslora_good", "lora_rslora_pattern_f32", &[]),
    ("rslora_ignored", "lora_rslora_pattern_f32", &["lora.rslora_ignored"]),
];

/// The directory holding every converted checkpoint, made afresh once per test run with
/// one call of the converter.
fn converted() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("check_weights_adapters");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("mkdir");
        let jobs: Vec<serde_json::Value> = CONVERSIONS
            .iter()
            .map(|(stem, golden, faults)| {
                serde_json::json!({
                    "adapter": root().join("fixtures/lora/golden").join(golden).join("adapter"),
                    "out": dir.join(format!("{stem}.ckpt")),
                    "faults": faults,
                })
            })
            .collect();
        let script = r#"
import json, sys
port = sys.argv[1]
sys.path[:0] = [port, port + "/../common"]
import lora
for job in json.loads(sys.argv[2]):
    faults, rest = lora.parse_lora_faults(job["faults"], 2)
    assert not rest, rest
    tensors, modules, _ = lora.peft_to_mindpet(job["adapter"], 2, faults)
    lora.save_adapter_ckpt(tensors, modules, job["out"])
"#;
        let out = Command::new(mindspore_python())
            .current_dir(&dir)
            .arg("-c")
            .arg(script)
            .arg(root().join("fixtures/ports/mindspore"))
            .arg(serde_json::to_string(&jobs).expect("json"))
            .output()
            .expect("run the converter");
        assert!(out.status.success(), "converter: {}", String::from_utf8_lossy(&out.stderr));
        dir
    })
}

fn adapter(golden: &str) -> PathBuf {
    root().join("fixtures/lora/golden").join(golden).join("adapter")
}

/// `parity check-weights ADAPTER PORT ARGS...` from a fresh temp dir.
fn check(adapter: &Path, port: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    let cwd = tempfile::tempdir().expect("tempdir");
    let mut all = vec!["check-weights", adapter.to_str().unwrap(), port.to_str().unwrap()];
    all.extend_from_slice(args);
    parity_in(cwd.path(), &all)
}

/// The FINDING lines of an output.
fn findings(stdout: &str) -> Vec<&str> {
    stdout.lines().filter(|l| l.starts_with("FINDING")).collect()
}

/// Encodes `(name, tensor)` as a MindSpore checkpoint (`Checkpoint { repeated Value }`,
/// `Value { tag, TensorProto { dims, tensor_type, tensor_content } }`).
fn encode_ckpt(entries: &[(String, Tensor)]) -> Vec<u8> {
    fn varint(out: &mut Vec<u8>, mut v: u64) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }
    fn field(out: &mut Vec<u8>, number: u64, bytes: &[u8]) {
        varint(out, number << 3 | 2);
        varint(out, bytes.len() as u64);
        out.extend_from_slice(bytes);
    }
    let mut out = Vec::new();
    for (name, t) in entries {
        let mut tensor = Vec::new();
        for &d in t.shape() {
            varint(&mut tensor, 1 << 3);
            varint(&mut tensor, d as u64);
        }
        assert_eq!(t.dtype(), DType::F32, "{name}");
        field(&mut tensor, 2, b"Float32");
        field(&mut tensor, 3, t.bytes());
        let mut value = Vec::new();
        field(&mut value, 1, name.as_bytes());
        field(&mut value, 2, &tensor);
        field(&mut out, 1, &value);
    }
    out
}

/// `t` `[r, c]` transposed to `[c, r]`.
fn transposed(t: &Tensor) -> Tensor {
    let (r, c) = (t.shape()[0], t.shape()[1]);
    let v = t.to_f64_vec();
    let tv: Vec<f64> = (0..r * c).map(|k| v[(k % r) * c + k / r]).collect();
    Tensor::from_f64(&[c, r], &tv, DType::F32)
}

/// The correct conversion rewritten by `edit` (name, tensor) -> kept entry, written to
/// `dir/name` with the converter's declaration beside it.
fn rewritten(
    dir: &Path,
    name: &str,
    edit: impl Fn(&str, &Tensor) -> Option<(String, Tensor)>,
) -> PathBuf {
    let good = Checkpoint::open(&converted().join("good.ckpt")).expect("good.ckpt");
    let entries: Vec<(String, Tensor)> = good.iter().filter_map(|(k, t)| edit(k, t)).collect();
    let path = dir.join(name);
    std::fs::write(&path, encode_ckpt(&entries)).expect("write ckpt");
    std::fs::copy(converted().join("good.ckpt.json"), dir.join(format!("{name}.json")))
        .expect("copy declaration");
    path
}

#[test]
fn a_correct_conversion_passes_from_the_adapter_dir_the_dump_and_the_weights_file() {
    let good = converted().join("good.ckpt");
    let golden = root().join("fixtures/lora/golden/lora_f32");
    let file = adapter("lora_f32").join("adapter_model.safetensors");
    for source in [adapter("lora_f32"), golden, file] {
        let (code, stdout, stderr) = check(&source, &good, &[]);
        assert_eq!(code, Some(0), "{}: {stdout}{stderr}", source.display());
        assert!(stdout.contains("PASS: 28 mapped tensors, 0 findings"), "{stdout}");
        assert!(stdout.contains("scaling: PEFT alpha/r; port: "), "{stdout}");
    }
    // rsLoRA with rank and alpha patterns: 5 modules a layer, each scaling declared.
    let (code, stdout, stderr) =
        check(&adapter("lora_rslora_pattern_f32"), &converted().join("rslora_good.ckpt"), &[]);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("PASS: 20 mapped tensors, 0 findings"), "{stdout}");
    assert!(stdout.contains("alpha/sqrt(r), rsLoRA"), "{stdout}");
}

#[test]
fn the_report_holds_every_tensor_and_every_modules_scaling() {
    let out = tempfile::tempdir().unwrap();
    let report = out.path().join("r");
    let (code, stdout, _) = check(
        &adapter("lora_rslora_pattern_f32"),
        &converted().join("rslora_good.ckpt"),
        &["--report", report.to_str().unwrap(), "--dtype", "float32"],
    );
    assert_eq!(code, Some(0), "{stdout}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(report.join("weights.json")).unwrap())
            .unwrap();
    assert_eq!(json["verdict"], "pass");
    assert_eq!(json["tensors"].as_array().unwrap().len(), 20);
    let modules = json["adapter"]["modules"].as_array().unwrap();
    assert_eq!(modules.len(), 10);
    // rank_pattern gives layer 1's up_proj r = 2: alpha 16 / sqrt(2).
    let up1 = modules.iter().find(|m| m["module"] == "model.layers.1.mlp.up_proj").unwrap();
    assert_eq!(up1["port"], "model.layers.1.feed_forward.w3");
    assert_eq!(up1["r"], 2);
    let s = up1["scaling"].as_f64().unwrap();
    assert!((s - 16.0 / 2f64.sqrt()).abs() < 1e-12, "{s}");
    assert!((up1["port_scaling"].as_f64().unwrap() - s).abs() < 1e-12);
}

#[test]
fn a_gate_up_swap_fails_naming_both_modules_keys_in_its_layer_only() {
    let (code, stdout, _) =
        check(&adapter("lora_f32"), &converted().join("gate_up_swapped.ckpt"), &[]);
    assert_eq!(code, Some(1), "{stdout}");
    let f = findings(&stdout);
    assert_eq!(f.len(), 4, "{stdout}");
    for (port, holds) in [("w1", "up_proj"), ("w3", "gate_proj")] {
        for ab in ["A", "B"] {
            let want = format!(
                "FINDING swapped: `model.layers.1.feed_forward.{port}.mindpet_delta_lora_{ab}`"
            );
            let line = f.iter().find(|l| l.starts_with(&want)).unwrap_or_else(|| {
                panic!("no finding {want}:\n{stdout}");
            });
            assert!(line.contains(&format!("layers.1.mlp.{holds}.lora_{ab}.weight")), "{line}");
            assert!(line.ends_with("[lora.gate_up_swapped]"), "{line}");
        }
    }
}

#[test]
fn a_missing_tensor_fails_naming_it_and_a_missing_module_is_a_missing_target() {
    let dir = tempfile::tempdir().unwrap();
    let dropped = "model.layers.1.feed_forward.w2.mindpet_delta_lora_B";
    let port =
        rewritten(dir.path(), "dropped.ckpt", |k, t| (k != dropped).then(|| (k.into(), t.clone())));
    let (code, stdout, _) = check(&adapter("lora_f32"), &port, &[]);
    assert_eq!(code, Some(1), "{stdout}");
    let f = findings(&stdout);
    assert_eq!(f.len(), 1, "{stdout}");
    assert!(f[0].starts_with(&format!("FINDING missing: `{dropped}` (HF `base_model.model.model.layers.1.mlp.down_proj.lora_B.weight`)")), "{}", f[0]);
    assert!(!f[0].contains("[lora."), "one tensor of two is not a fault of §5: {}", f[0]);

    let (code, stdout, _) =
        check(&adapter("lora_f32"), &converted().join("target_missing.ckpt"), &[]);
    assert_eq!(code, Some(1), "{stdout}");
    let f = findings(&stdout);
    assert_eq!(f.len(), 2, "{stdout}");
    for ab in ["A", "B"] {
        let want =
            format!("FINDING missing: `model.layers.0.attention.wv.mindpet_delta_lora_{ab}`");
        assert!(
            f.iter().any(|l| l.starts_with(&want) && l.ends_with("[lora.target_missing]")),
            "{want}:\n{stdout}"
        );
    }
}

#[test]
fn a_transposed_lora_a_fails_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let key = "model.layers.0.attention.wq.mindpet_delta_lora_A";
    let port = rewritten(dir.path(), "transposed.ckpt", |k, t| {
        Some((k.into(), if k == key { transposed(t) } else { t.clone() }))
    });
    let (code, stdout, _) = check(&adapter("lora_f32"), &port, &[]);
    assert_eq!(code, Some(1), "{stdout}");
    let f = findings(&stdout);
    assert_eq!(f.len(), 1, "{stdout}");
    assert!(f[0].starts_with(&format!("FINDING transposed: `{key}`")), "{}", f[0]);
    assert!(f[0].contains("port shape [64, 4], expected [4, 64]"), "{}", f[0]);
}

#[test]
fn a_differing_scaling_fails_naming_the_module_and_the_fault() {
    let (code, stdout, _) = check(&adapter("lora_f32"), &converted().join("scale_alpha.ckpt"), &[]);
    assert_eq!(code, Some(1), "{stdout}");
    let f = findings(&stdout);
    assert_eq!(f.len(), 2, "o_proj of both layers:\n{stdout}");
    for i in 0..2 {
        let want = format!(
            "FINDING scaling: `model.layers.{i}.attention.wo` (HF `model.layers.{i}.self_attn.o_proj`): port scaling 8"
        );
        assert!(
            f.iter().any(|l| l.starts_with(&want) && l.ends_with("[lora.scale_alpha]")),
            "{want}:\n{stdout}"
        );
    }
    // rsLoRA read as alpha/r: every module, each named.
    let (code, stdout, _) =
        check(&adapter("lora_rslora_pattern_f32"), &converted().join("rslora_ignored.ckpt"), &[]);
    assert_eq!(code, Some(1), "{stdout}");
    let f = findings(&stdout);
    assert_eq!(f.len(), 10, "{stdout}");
    assert!(
        f.iter()
            .all(|l| l.starts_with("FINDING scaling: ") && l.ends_with("[lora.rslora_ignored]")),
        "{stdout}"
    );
}

#[test]
fn mindpets_lora_alpha_declares_the_scaling_when_the_converter_wrote_none() {
    let dir = tempfile::tempdir().unwrap();
    let port = dir.path().join("bare.ckpt");
    std::fs::copy(converted().join("good.ckpt"), &port).unwrap();
    let (code, stdout, _) = check(&adapter("lora_f32"), &port, &[]);
    assert_eq!(code, Some(0), "{stdout}");
    assert!(stdout.contains("port: not declared"), "{stdout}");
    let (code, stdout, _) = check(&adapter("lora_f32"), &port, &["--lora-alpha", "8"]);
    assert_eq!(code, Some(0), "{stdout}");
    let (code, stdout, _) = check(&adapter("lora_f32"), &port, &["--lora-alpha", "16"]);
    assert_eq!(code, Some(1), "{stdout}");
    assert_eq!(findings(&stdout).len(), 14, "{stdout}");
    assert!(stdout.contains("FINDING scaling: `model.layers.0.attention.wq` (HF `model.layers.0.self_attn.q_proj`): port scaling 4"), "{stdout}");
}

/// MindSpore 2.10 saves LoRADense's parameters as `mindpet_delta_lora_a` / `_b`.
#[test]
fn lower_case_mindpet_names_match() {
    let dir = tempfile::tempdir().unwrap();
    let port = rewritten(dir.path(), "lower.ckpt", |k, t| {
        let lower = format!("{}{}", &k[..k.len() - 1], k[k.len() - 1..].to_ascii_lowercase());
        Some((lower, t.clone()))
    });
    let (code, stdout, _) = check(&adapter("lora_f32"), &port, &[]);
    assert_eq!(code, Some(0), "{stdout}");
    assert!(stdout.contains("model.layers.0.attention.wq.mindpet_delta_lora_a"), "{stdout}");
}

/// A whole network's checkpoint: the base weights beside the adapter are skipped, an
/// adapter tensor no PEFT tensor maps to is extra.
#[test]
fn base_weights_are_skipped_and_an_extra_adapter_tensor_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let extra = "model.layers.0.attention.wk.mindpet_delta_lora_C";
    let port = rewritten(dir.path(), "network.ckpt", |k, t| Some((k.into(), t.clone())));
    let mut entries: Vec<(String, Tensor)> =
        Checkpoint::open(&port).unwrap().iter().map(|(k, t)| (k.into(), t.clone())).collect();
    let w = Tensor::from_f64(&[2, 2], &[1.0, 2.0, 3.0, 4.0], DType::F32);
    entries.push(("model.layers.0.attention.wq.weight".into(), w.clone()));
    entries.push((extra.into(), w));
    std::fs::write(&port, encode_ckpt(&entries)).unwrap();
    let (code, stdout, _) = check(&adapter("lora_f32"), &port, &[]);
    assert_eq!(code, Some(1), "{stdout}");
    assert_eq!(
        findings(&stdout),
        [format!("FINDING unexpected: `{extra}`: no rule of the key map produces this name")]
    );
    assert!(stdout.contains("(1 base-model tensors in the checkpoint skipped)"), "{stdout}");
}

/// `--map`: another naming, lora_A stored [in, r] by rule.
#[test]
fn a_key_map_gives_other_names_and_layouts() {
    let dir = tempfile::tempdir().unwrap();
    let rename =
        |k: &str| k.replace(".mindpet_delta_lora_", ".lora_").replace("model.layers.", "layers.");
    let port = rewritten(dir.path(), "renamed.ckpt", |k, t| {
        let a = k.ends_with("_A");
        Some((rename(k), if a { transposed(t) } else { t.clone() }))
    });
    // The declaration names the port's modules.
    let decl = std::fs::read_to_string(dir.path().join("renamed.ckpt.json")).unwrap();
    std::fs::write(
        dir.path().join("renamed.ckpt.json"),
        decl.replace("\"model.layers.", "\"layers."),
    )
    .unwrap();
    let built_in =
        std::fs::read_to_string(root().join("fixtures/ports/mindspore/adapter_keymap.json"))
            .unwrap();
    let mut map: serde_json::Value = serde_json::from_str(&built_in).unwrap();
    for r in map["rules"].as_array_mut().unwrap() {
        let port = rename(r["port"].as_str().unwrap());
        r["transpose"] = serde_json::Value::Bool(port.ends_with("_A"));
        r["port"] = port.into();
    }
    let map_path = dir.path().join("map.json");
    std::fs::write(&map_path, map.to_string()).unwrap();
    let (code, stdout, stderr) =
        check(&adapter("lora_f32"), &port, &["--map", map_path.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("layers.1.feed_forward.w3.lora_A"), "{stdout}");
    // Without the map, nothing is where mindpet puts it.
    let (code, stdout, _) = check(&adapter("lora_f32"), &port, &[]);
    assert_eq!(code, Some(1), "{stdout}");
    assert!(stdout.contains("[lora.not_loaded]"), "{stdout}");
}

#[test]
fn bad_inputs_exit_2_naming_the_file_or_flag() {
    let dir = tempfile::tempdir().unwrap();
    let good = converted().join("good.ckpt");
    // A declaration with a field the format does not have.
    let decl = dir.path().join("decl.json");
    std::fs::write(
        &decl,
        r#"{"format": "llama-parity/mindpet-adapter@1", "modules": {"m": {"scale": 2}}}"#,
    )
    .unwrap();
    let (code, _, stderr) =
        check(&adapter("lora_f32"), &good, &["--port-config", decl.to_str().unwrap()]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("decl.json") && stderr.contains("unknown field `scale`"), "{stderr}");
    // An adapter flag on base weights.
    let weights = root().join("fixtures/lora/golden/lora_f32/weights.safetensors");
    let (code, _, stderr) = check(&weights, &good, &["--lora-alpha", "8"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("--lora-alpha"), "{stderr}");
    // An adapter directory without its weights file.
    let half = dir.path().join("half");
    std::fs::create_dir(&half).unwrap();
    std::fs::copy(
        adapter("lora_f32").join("adapter_config.json"),
        half.join("adapter_config.json"),
    )
    .unwrap();
    let (code, _, stderr) = check(&half, &good, &[]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("adapter_model.safetensors"), "{stderr}");
    // A port checkpoint that is not one.
    let (code, _, stderr) = check(&adapter("lora_f32"), &decl, &[]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("decl.json"), "{stderr}");
}

#[test]
fn the_help_teaches_adapters() {
    let (code, stdout, _) = crate::helpers::parity(&["check-weights", "--help"]);
    assert_eq!(code, Some(0));
    for want in [
        "mindpet_delta_lora_A",
        "lora.gate_up_swapped",
        "--lora-alpha",
        "--port-config",
        "adapter_config.json",
    ] {
        assert!(stdout.contains(want), "{want}:\n{stdout}");
    }
}
