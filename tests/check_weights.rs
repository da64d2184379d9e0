//! `parity check-weights` on the MindSpore port's checkpoint fixtures
//! (`fixtures/ports/mindspore/ckpt/`, written by `make_bad_ckpts.py`): the good
//! checkpoint passes, each defective one exits 1 naming its key (from `fixtures.json`)
//! and the kind of finding, and a truncated checkpoint exits 2 naming the file.

use std::path::{Path, PathBuf};
use std::process::Command;

fn ckpt_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/ports/mindspore/ckpt")
}

/// Runs `parity check-weights hf_small.safetensors CKPT ARGS...` from a temp dir (so
/// the built-in key map is what is used) and returns (exit code, stdout, stderr).
fn check(ckpt: &Path, args: &[&str]) -> (Option<i32>, String, String) {
    let cwd = tempfile::tempdir().expect("tempdir");
    let out = Command::new(env!("CARGO_BIN_EXE_parity"))
        .current_dir(cwd.path())
        .arg("check-weights")
        .arg(ckpt_dir().join("hf_small.safetensors"))
        .arg(ckpt)
        .args(args)
        .output()
        .expect("run parity");
    let s = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.code(), s(&out.stdout), s(&out.stderr))
}

fn fixtures() -> serde_json::Value {
    let text = std::fs::read_to_string(ckpt_dir().join("fixtures.json")).expect("fixtures.json");
    serde_json::from_str(&text).expect("fixtures.json is JSON")
}

#[test]
fn good_ckpt_passes_against_the_hf_weights() {
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("r");
    let (code, stdout, stderr) = check(
        &ckpt_dir().join("good.ckpt"),
        &["--dtype", "float32", "--report", report.to_str().unwrap()],
    );
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("PASS: 21 mapped tensors, 0 findings"), "{stdout}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(report.join("weights.json")).unwrap())
            .unwrap();
    assert_eq!(json["verdict"], "pass");
    assert_eq!(json["tensors"].as_array().unwrap().len(), 21);
}

#[test]
fn a_dtype_other_than_the_ports_is_a_finding() {
    let (code, stdout, _) = check(&ckpt_dir().join("good.ckpt"), &["--dtype", "bfloat16"]);
    assert_eq!(code, Some(1), "{stdout}");
    assert!(stdout.contains("FINDING dtype: `model.norm_out.weight`"), "{stdout}");
    assert!(stdout.contains("port dtype F32, expected BF16"), "{stdout}");
}

#[test]
fn each_defective_ckpt_exits_1_naming_its_key_and_finding() {
    let kinds = [
        ("key_dropped.ckpt", "missing"),
        ("key_misnamed.ckpt", "unexpected"),
        ("norm_ones.ckpt", "norm-at-ones"),
        ("transposed.ckpt", "transposed"),
        ("layernorm_beta.ckpt", "unexpected"),
    ];
    let fx = fixtures();
    let files = fx["files"].as_object().expect("files");
    assert_eq!(files.len(), kinds.len() + 1, "a fixture without a case here");
    let mut failures = Vec::new();
    for (file, kind) in kinds {
        let key = files[file]["key"].as_str().expect("key");
        let dir = tempfile::tempdir().unwrap();
        let report = dir.path().join("r");
        let (code, stdout, stderr) =
            check(&ckpt_dir().join(file), &["--report", report.to_str().unwrap()]);
        let line = format!("FINDING {kind}: `{key}`");
        let json: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(report.join("weights.json")).unwrap_or_default(),
        )
        .unwrap_or_default();
        let in_json = json["findings"]
            .as_array()
            .is_some_and(|a| a.iter().any(|f| f["kind"] == kind && f["port"] == key));
        if code != Some(1) || !stdout.contains(&line) || !in_json || !stderr.is_empty() {
            failures.push(format!("{file}: exit {code:?}, want a line {line:?} and it in weights.json:\n{stdout}{stderr}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn a_truncated_ckpt_exits_2_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(ckpt_dir().join("good.ckpt")).unwrap();
    let cut = dir.path().join("cut.ckpt");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let (code, stdout, stderr) = check(&cut, &[]);
    assert_eq!(code, Some(2), "{stdout}{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(
        lines[0].starts_with("parity: error: ") && lines[0].contains(cut.to_str().unwrap()),
        "{stderr}"
    );
    assert!(
        lines[0].contains("malformed MindSpore checkpoint at byte")
            && lines[0].contains("runs past the end"),
        "{stderr}"
    );
}

#[test]
fn a_bad_key_map_exits_2_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let map = dir.path().join("map.json");
    std::fs::write(&map, r#"{"format": "something/else", "rules": []}"#).unwrap();
    let (code, _, stderr) = check(&ckpt_dir().join("good.ckpt"), &["--map", map.to_str().unwrap()]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("map.json: format is \"something/else\""), "{stderr}");
}
