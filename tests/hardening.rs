//! Hostile paths and inputs (issue 12): a run never writes into or over an input,
//! never hangs on a FIFO or an endless device, never panics on an absurd config, and
//! never lets a golden it could not compare pass. Each test names the defect it pins.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::helpers::input_hashes;
use crate::helpers::parity_in;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

/// A bad-input error: exit 2, one line starting `parity: error: ` holding `what`.
fn assert_bad_input(res: &(Option<i32>, String, String), what: &str) {
    let (code, _, err) = res;
    assert_eq!(*code, Some(2), "stderr: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("parity: error: ")).collect();
    assert_eq!(lines.len(), 1, "one error line expected: {err:?}");
    assert!(err.lines().all(|l| l.starts_with("parity: ")), "a stray line: {err:?}");
    assert!(err.contains(what), "{what:?} not in {err:?}");
    assert!(!err.contains("panicked"), "{err}");
}

/// A scratch directory holding a copy of `fixtures/bad/valid` as `g/`.
fn scratch_with_golden() -> tempfile::TempDir {
    let d = tempfile::tempdir().expect("tempdir");
    copy_dir(&root().join("fixtures/bad/valid"), &d.path().join("g"));
    d
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read_dir").flatten() {
        let p = e.path();
        if p.is_dir() {
            copy_dir(&p, &to.join(e.file_name()));
        } else {
            std::fs::copy(&p, to.join(e.file_name())).expect("copy");
        }
    }
}

/// Defect 1: `--dump nonexistent/../G` and `--report G/x/../` wrote into the golden.
#[test]
fn parent_components_in_output_paths_never_reach_an_input() {
    let d = scratch_with_golden();
    let before = input_hashes(&[d.path().join("g")]);
    let r = parity_in(
        d.path(),
        &["run", "g", "--impl", "ascend", "--fault", "rope.interleaved", "--dump", "none/../g"],
    );
    assert_bad_input(&r, "--dump: none/../g lies inside the input g");
    let r = parity_in(d.path(), &["compare", "g", "g", "--report", "g/x/../"]);
    assert_bad_input(&r, "inside the input g");
    std::os::unix::fs::symlink(d.path().join("g"), d.path().join("link")).expect("symlink");
    let r = parity_in(d.path(), &["compare", "g", "g", "--report", "link"]);
    assert_bad_input(&r, "inside the input g");
    assert_eq!(input_hashes(&[d.path().join("g")]), before);
}

/// Defect 7: a `--policy` named summary.md or a `--map` named report.json inside the
/// report directory, and an HF file named weights.json beside `check-weights --report`,
/// were overwritten.
#[test]
fn every_input_file_is_guarded_against_every_output() {
    let d = scratch_with_golden();
    let out = d.path().join("out");
    std::fs::create_dir(&out).expect("mkdir");
    std::fs::write(out.join("summary.md"), "{}").expect("write");
    std::fs::write(out.join("report.json"), r#"{"format": "llama-parity/keymap@1", "rules": []}"#)
        .expect("write");
    let r = parity_in(
        d.path(),
        &["compare", "g", "g", "--policy", "out/summary.md", "--report", "out"],
    );
    assert_bad_input(&r, "would overwrite the input out/summary.md");
    let r =
        parity_in(d.path(), &["compare", "g", "g", "--map", "out/report.json", "--report", "out"]);
    assert_bad_input(&r, "would overwrite the input out/report.json");
    std::fs::copy(d.path().join("g/activations.safetensors"), out.join("weights.json"))
        .expect("copy");
    let r =
        parity_in(d.path(), &["check-weights", "out/weights.json", "x.ckpt", "--report", "out"]);
    assert_bad_input(&r, "would overwrite the input out/weights.json");
    assert_eq!(std::fs::read_to_string(out.join("summary.md")).expect("read"), "{}");
}

/// Defect 3: a FIFO as manifest.json, as an .npy of the tree, as `--policy`, and as
/// either `check-weights` argument blocked forever.
#[test]
fn fifos_are_refused_not_waited_on() {
    let d = scratch_with_golden();
    let fifo = |p: &Path| {
        let ok = Command::new("mkfifo").arg(p).status().expect("mkfifo").success();
        assert!(ok, "mkfifo {}", p.display());
    };
    fifo(&d.path().join("pipe"));
    let r = parity_in(d.path(), &["compare", "g", "g", "--policy", "pipe"]);
    assert_bad_input(&r, "pipe: a FIFO where a regular file is expected");
    let r = parity_in(d.path(), &["check-weights", "pipe", "g/activations.safetensors"]);
    assert_bad_input(&r, "pipe: a FIFO");
    let r = parity_in(d.path(), &["check-weights", "g/activations.safetensors", "pipe"]);
    assert_bad_input(&r, "pipe: a FIFO");
    copy_dir(&d.path().join("g"), &d.path().join("m"));
    std::fs::remove_file(d.path().join("m/manifest.json")).expect("rm");
    fifo(&d.path().join("m/manifest.json"));
    let r = parity_in(d.path(), &["compare", "m", "g"]);
    assert_bad_input(&r, "m/manifest.json: a FIFO");
    // An .npy tree with a FIFO for a tensor.
    let t = d.path().join("t");
    copy_dir(&root().join("fixtures/bad/npy_bad_magic"), &t);
    std::fs::remove_file(t.join("activations/prefill/model.embed_tokens.npy")).expect("rm");
    fifo(&t.join("activations/prefill/model.embed_tokens.npy"));
    let r = parity_in(d.path(), &["compare", "t", "g"]);
    assert_bad_input(&r, "model.embed_tokens.npy: a FIFO");
}

/// Defect 4: manifest.json or an .npy linked to /dev/zero was read until memory ran
/// out.
#[test]
fn endless_devices_are_refused_before_reading() {
    let d = scratch_with_golden();
    std::fs::remove_file(d.path().join("g/manifest.json")).expect("rm");
    std::os::unix::fs::symlink("/dev/zero", d.path().join("g/manifest.json")).expect("symlink");
    let r = parity_in(d.path(), &["compare", "g", "g"]);
    assert_bad_input(&r, "g/manifest.json: a device where a regular file is expected");
    let t = d.path().join("t");
    copy_dir(&root().join("fixtures/bad/npy_bad_magic"), &t);
    let npy = t.join("activations/prefill/model.embed_tokens.npy");
    std::fs::remove_file(&npy).expect("rm");
    std::os::unix::fs::symlink("/dev/zero", &npy).expect("symlink");
    let r = parity_in(d.path(), &["compare", "t", "t"]);
    assert_bad_input(&r, "model.embed_tokens.npy: a device");
}

/// The golden `gqa_pad_f32` copied to `dir/name` with its manifest's model config
/// edited by `edit`.
fn golden_with_config(dir: &Path, name: &str, edit: impl Fn(&mut serde_json::Value)) -> PathBuf {
    let to = dir.join(name);
    copy_dir(&root().join("golden/gqa_pad_f32"), &to);
    let text = std::fs::read_to_string(to.join("manifest.json")).expect("manifest");
    let mut v: serde_json::Value = serde_json::from_str(&text).expect("json");
    edit(&mut v["model"]);
    std::fs::write(to.join("manifest.json"), v.to_string()).expect("write");
    to
}

/// Defect 5: `num_hidden_layers = 2^62` panicked ("capacity overflow"), 1e9 aborted
/// the allocation, and `max_position_embeddings = 1e12` aborted building RoPE tables.
#[test]
fn absurd_configs_are_refused_or_cost_nothing() {
    let d = tempfile::tempdir().expect("tempdir");
    golden_with_config(d.path(), "layers", |m| m["num_hidden_layers"] = (1u64 << 62).into());
    let r = parity_in(d.path(), &["run", "layers", "--impl", "reference"]);
    assert_bad_input(&r, "num_hidden_layers is 4611686018427387904");
    golden_with_config(d.path(), "layers9", |m| m["num_hidden_layers"] = 1_000_000.into());
    let r = parity_in(d.path(), &["run", "layers9", "--impl", "ascend"]);
    assert_bad_input(&r, "num_hidden_layers is 1000000 but");
    golden_with_config(d.path(), "pos", |m| {
        m["max_position_embeddings"] = 1_000_000_000_000u64.into()
    });
    // The ascend port builds its tables up front: only the rows the scenario reads.
    let (code, _, err) =
        parity_in(d.path(), &["run", "pos", "--impl", "ascend", "--dtype", "bfloat16"]);
    assert_eq!(code, Some(0), "{err}");
}

/// Writes `fixtures/bad/valid` to `dir/name` with its prefill tensor replaced.
fn dump_with_prefill(dir: &Path, name: &str, shape: &[usize], values: &[f32]) -> PathBuf {
    use llama_parity::dump::{DType, Dump, Tensor};
    let v = Dump::open(&root().join("fixtures/bad/valid")).expect("valid dump");
    let a =
        ndarray::ArrayD::from_shape_vec(shape.to_vec(), values.iter().map(|&x| x as f64).collect())
            .expect("shape");
    let mut tensors = std::collections::BTreeMap::new();
    tensors.insert("prefill/model.embed_tokens".to_string(), Tensor::from_array(&a, DType::F32));
    let step = llama_parity::contract::site::Step::Decode(0);
    let site = &v.sites(step)[0];
    tensors.insert(format!("decode.0/{site}"), v.get(step, site).expect("read").expect("tensor"));
    let to = dir.join(name);
    let dump = Dump::in_memory(v.manifest.clone(), tensors).expect("dump");
    dump.write(&to).expect("write");
    to
}

/// The status of `prefill/model.embed_tokens` in `dir/report.json`, and its note.
fn prefill_status(dir: &Path) -> (String, String) {
    let text = std::fs::read_to_string(dir.join("report.json")).expect("report");
    let v: serde_json::Value = serde_json::from_str(&text).expect("json");
    let s = v["sites"]
        .as_array()
        .expect("sites")
        .iter()
        .find(|s| s["step"] == "prefill")
        .expect("prefill site")
        .clone();
    (s["status"].as_str().unwrap_or("").into(), s["note"].as_str().unwrap_or("").into())
}

/// Defect 6: an all-NaN golden site passed any finite candidate (count 0, cosine 1);
/// a golden Inf was dropped without notice.
#[test]
fn non_finite_goldens_never_pass() {
    let d = tempfile::tempdir().expect("tempdir");
    let nan = dump_with_prefill(d.path(), "nan", &[1, 3, 4], &[f32::NAN; 12]);
    let mut with_inf: Vec<f32> = (0..12).map(|i| i as f32 * 0.25).collect();
    with_inf[5] = f32::INFINITY;
    let inf = dump_with_prefill(d.path(), "inf", &[1, 3, 4], &with_inf);
    let valid = root().join("fixtures/bad/valid");
    let s = |p: &Path| p.to_str().expect("utf-8").to_string();
    let r = parity_in(d.path(), &["compare", &s(&nan), &s(&valid), "--report", "r1"]);
    assert_eq!(r.0, Some(1), "{}", r.2);
    let (status, note) = prefill_status(&d.path().join("r1"));
    assert_eq!(status, "fail");
    assert!(note.contains("12 golden NaN/Inf the candidate does not reproduce"), "{note}");
    let r = parity_in(d.path(), &["compare", &s(&inf), &s(&valid), "--report", "r2"]);
    assert_eq!(r.0, Some(1), "{}", r.2);
    assert!(prefill_status(&d.path().join("r2")).1.contains("1 golden NaN/Inf"));
    // NaN on both sides: nothing compared, so skipped with a note, not pass.
    let r = parity_in(d.path(), &["compare", &s(&nan), &s(&nan), "--report", "r3"]);
    assert_eq!(r.0, Some(0), "the decode site still passes: {}", r.2);
    let (status, note) = prefill_status(&d.path().join("r3"));
    assert_eq!(status, "skipped");
    assert!(note.starts_with("nothing compared"), "{note}");
}

/// Defect 9: a tensor key holding a line break and ESC printed a forged second line
/// and drove the terminal.
#[test]
fn names_from_files_print_on_one_escaped_line() {
    let r =
        parity_in(&root(), &["compare", "fixtures/bad/control_chars_in_key", "fixtures/bad/valid"]);
    assert_bad_input(&r, "\\u{1b}[2Jfill\\nPASS all sites");
    assert!(!r.2.contains('\u{1b}'));
}

/// Defect 10: a policy that is just `[]`, and negative or out-of-range tolerances,
/// were accepted.
#[test]
fn policies_are_validated_field_by_field() {
    let d = scratch_with_golden();
    for (text, what) in [
        ("[]", "not a valid policy: expected a JSON object"),
        (r#"{"defaults": {"float32": {"max_rel_l2": -1}}}"#, "defaults.float32: max_rel_l2"),
        (r#"{"rules": [{"site": "*", "min_cosine": 2}]}"#, "rules[0]: min_cosine must lie"),
        (r#"{"rules": [{"site": "*", "max_abs": -0.5}]}"#, "rules[0]: max_abs"),
    ] {
        std::fs::write(d.path().join("p.json"), text).expect("write");
        let r = parity_in(d.path(), &["compare", "g", "g", "--policy", "p.json"]);
        assert_bad_input(&r, &format!("p.json: {what}"));
    }
}

/// Defect 10: a `.ckpt` that is a directory said "No such device".
#[test]
fn a_checkpoint_that_is_a_directory_is_named_as_one() {
    let d = scratch_with_golden();
    std::fs::create_dir(d.path().join("m.ckpt")).expect("mkdir");
    let r = parity_in(d.path(), &["check-weights", "g/activations.safetensors", "m.ckpt"]);
    assert_bad_input(&r, "m.ckpt: a directory where a regular file is expected");
}

/// Defect 8: the duplicate-name check was a linear scan per entry (250k entries took
/// over a minute). 200k entries now decode in well under the 60 s this test allows a
/// run (the time itself is measured by hand, not asserted).
#[test]
fn a_checkpoint_of_many_entries_decodes() {
    use llama_parity::weights::ckpt::Checkpoint;
    // One entry: Value { tag = "p{i}", tensor { dims [1], tensor_type "UInt8", content [0] } }.
    let mut bytes = Vec::new();
    for i in 0..200_000u32 {
        let tag = format!("p{i}");
        let tensor: Vec<u8> =
            [&[0x08, 0x01, 0x12, 0x05][..], b"UInt8", &[0x1a, 0x01, 0x00]].concat();
        let mut value = vec![0x0a, tag.len() as u8];
        value.extend(tag.as_bytes());
        value.extend([0x12, tensor.len() as u8]);
        value.extend(&tensor);
        bytes.extend([0x0a, value.len() as u8]);
        bytes.extend(value);
    }
    let ck = Checkpoint::from_bytes(Path::new("many.ckpt"), &bytes).expect("decodes");
    assert_eq!(ck.len(), 200_000);
    assert!(ck.get("p199999").is_some());
}

/// Defect 11: two writers of one `--report` directory left a mixed set (report.json
/// of one run, summary.md of the other). Each writer writes a set whose files all
/// carry its own mark; after every round the set on disk must carry one mark.
#[test]
fn concurrent_report_writers_never_leave_a_mixed_set() {
    use llama_parity::dump::write_set;
    let d = tempfile::tempdir().expect("tempdir");
    let dir = d.path().join("report");
    let names = ["report.json", "report.html", "junit.xml", "summary.md"];
    for round in 0..60 {
        let writers: Vec<_> = (0..2)
            .map(|w| {
                let dir = dir.clone();
                std::thread::spawn(move || {
                    // Large enough that writes take a while and can interleave.
                    let text = format!("{w}").repeat(200_000 + round * 10);
                    let set: Vec<(&str, &[u8])> =
                        names.iter().map(|n| (*n, text.as_bytes())).collect();
                    write_set(&dir, &set).expect("write");
                })
            })
            .collect();
        for w in writers {
            w.join().expect("writer");
        }
        let marks: std::collections::BTreeSet<u8> =
            names.iter().map(|n| std::fs::read(dir.join(n)).expect("read")[0]).collect();
        assert_eq!(marks.len(), 1, "round {round}: a mixed set {marks:?}");
    }
    // No temporary directory is left behind.
    let left: Vec<_> = std::fs::read_dir(&dir)
        .expect("read_dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !names.contains(&n.as_str()))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// Defect 11: a writer killed mid-write left its temporary files behind; the next
/// writer removes them.
#[test]
fn a_killed_writers_leftovers_are_removed_by_the_next() {
    use llama_parity::dump::write_set;
    let d = tempfile::tempdir().expect("tempdir");
    let stale = d.path().join(".parity-set-dead");
    std::fs::create_dir(&stale).expect("mkdir");
    std::fs::write(stale.join("report.json"), "half").expect("write");
    write_set(d.path(), &[("report.json", b"whole")]).expect("write");
    assert!(!stale.exists());
    assert_eq!(std::fs::read(d.path().join("report.json")).expect("read"), b"whole");
}

/// Defect 2: the atomic write created `.NAME.tmp<pid>` following symlinks, so a
/// symlink planted under that name redirected the write onto another file.
#[test]
fn a_planted_symlink_never_redirects_a_write() {
    use llama_parity::dump::write_atomic;
    let d = tempfile::tempdir().expect("tempdir");
    let victim = d.path().join("victim");
    std::fs::write(&victim, "precious").expect("write");
    let out = d.path().join("out");
    std::fs::create_dir(&out).expect("mkdir");
    let planted = out.join(format!(".report.json.tmp{}", std::process::id()));
    std::os::unix::fs::symlink(&victim, &planted).expect("symlink");
    write_atomic(&out.join("report.json"), b"report").expect("write");
    assert_eq!(std::fs::read_to_string(&victim).expect("read"), "precious");
    assert_eq!(std::fs::read_to_string(out.join("report.json")).expect("read"), "report");
}

/// No test of this module (nor any CLI run against the repository's own inputs)
/// changes a byte under `golden/` or `fixtures/`: hostile output paths aimed at them
/// are refused, and the inputs hash the same after.
#[test]
fn hostile_runs_against_the_repository_leave_its_inputs_byte_identical() {
    let dirs = [root().join("golden"), root().join("fixtures")];
    let before = input_hashes(&dirs);
    let cases: &[&[&str]] = &[
        &[
            "compare",
            "golden/gqa_pad_f32",
            "golden/gqa_pad_f32",
            "--report",
            "golden/gqa_pad_f32/x/..",
        ],
        &[
            "run",
            "golden/gqa_pad_f32",
            "--impl",
            "ascend",
            "--fault",
            "rope.interleaved",
            "--dump",
            "nonexistent/../golden/gqa_pad_f32",
        ],
        &["compare", "fixtures/bad/valid", "fixtures/bad/valid", "--report", "fixtures/bad/valid"],
        &[
            "check-weights",
            "golden/gqa_pad_f32/weights.safetensors",
            "x.ckpt",
            "--report",
            "golden/gqa_pad_f32",
        ],
    ];
    for args in cases {
        let r = parity_in(&root(), args);
        assert_eq!(r.0, Some(2), "{args:?}: {}", r.2);
    }
    assert_eq!(input_hashes(&dirs), before, "an input file changed");
}

/// Defect 10: an integer norm weight was taken as numbers.
#[test]
fn an_integer_weight_is_refused_naming_file_and_tensor() {
    use llama_parity::dump::{safetensors, DType, SafetensorsFile};
    let d = tempfile::tempdir().expect("tempdir");
    let g = golden_with_config(d.path(), "g", |_| {});
    let path = g.join("weights.safetensors");
    let f = SafetensorsFile::open(&path).expect("weights");
    let mut tensors = std::collections::BTreeMap::new();
    for k in f.keys() {
        tensors.insert(k.to_string(), f.require(k).expect("tensor"));
    }
    let key = "model.layers.0.input_layernorm.weight";
    let t = &tensors[key];
    let ints =
        ndarray::ArrayD::from_shape_vec(t.shape().to_vec(), vec![1.0; t.numel()]).expect("shape");
    tensors.insert(key.into(), llama_parity::dump::Tensor::from_array(&ints, DType::I32));
    drop(f);
    safetensors::write(&path, &tensors, None).expect("write");
    let r = parity_in(d.path(), &["run", "g", "--impl", "reference"]);
    assert_bad_input(
        &r,
        "g/weights.safetensors: tensor `model.layers.0.input_layernorm.weight` has dtype I32",
    );
}
