//! Every file of the bad-input corpus (`fixtures/bad/`, written by
//! `cargo run --example make_bad_corpus`) gives exit 2 and a one-line message that names
//! the file and what is wrong, never a panic.

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

/// Runs `parity compare CASE fixtures/bad/valid` and returns (exit code, stderr).
fn compare_bad(case: &str) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_parity"))
        .current_dir(root())
        .args(["compare", &format!("fixtures/bad/{case}"), "fixtures/bad/valid"])
        .output()
        .expect("run parity");
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// (case, file the message must name, what it must say).
const CASES: &[(&str, &str, &str)] = &[
    (
        "truncated_safetensors",
        "truncated_safetensors/activations.safetensors",
        "run past the end of the data",
    ),
    (
        "header_past_end",
        "header_past_end/activations.safetensors",
        "header length 1099511627776 runs past the end of the file",
    ),
    ("header_not_json", "header_not_json/activations.safetensors", "header is not valid JSON"),
    ("unknown_dtype", "unknown_dtype/activations.safetensors", "unknown dtype \"Q4_K\""),
    (
        "size_mismatch",
        "size_mismatch/activations.safetensors",
        "needs 48 bytes but data_offsets [0, 40] hold 40",
    ),
    ("shape_overflow", "shape_overflow/activations.safetensors", "element count that overflows"),
    ("npy_bad_magic", "npy_bad_magic/activations/prefill/model.embed_tokens.npy", "bad magic"),
    ("manifest_without_steps", "manifest_without_steps/manifest.json", "missing field `steps`"),
    (
        "step_without_tensors",
        "step_without_tensors/activations.safetensors",
        "step decode.1 is listed in manifest.json `steps` but has no tensors",
    ),
    ("manifest_not_json", "manifest_not_json/manifest.json", "not valid JSON"),
    // Issue 12, defect 10 (lax validation) and 9 (raw names), 3 (not a regular file).
    (
        "duplicate_key",
        "duplicate_key/activations.safetensors",
        "tensor `prefill/model.embed_tokens` is listed twice in the header",
    ),
    (
        "overlapping_offsets",
        "overlapping_offsets/activations.safetensors",
        "overlap in the data (data_offsets [0, 48] and [32, 48])",
    ),
    (
        "shape_zero_overflow",
        "shape_zero_overflow/activations.safetensors",
        "element count that overflows",
    ),
    (
        "control_chars_in_key",
        "control_chars_in_key/activations.safetensors",
        "tensor `pre\\u{1b}[2Jfill\\nPASS all sites/model.embed_tokens`",
    ),
    ("duplicate_steps", "duplicate_steps/manifest.json", "field `steps`: decode.0 is listed twice"),
    (
        "decode_step_without_token",
        "decode_step_without_token/manifest.json",
        "decode.5 has no decode token",
    ),
    ("negative_eps", "negative_eps/manifest.json", "rms_norm_eps is -0.000001"),
    ("absurd_heads", "absurd_heads/manifest.json", "num_attention_heads is 2305843009213693952"),
    (
        "npy_short_data",
        "npy_short_data/activations/prefill/model.embed_tokens.npy",
        "needs 16000000000 bytes of data but the file holds 48",
    ),
    (
        "manifest_is_a_directory",
        "manifest_is_a_directory/manifest.json",
        "a directory where a regular file is expected",
    ),
];

#[test]
fn every_bad_input_exits_2_with_a_message_naming_file_and_fault() {
    let mut failures = Vec::new();
    for (case, file, what) in CASES {
        let (code, stderr) = compare_bad(case);
        let lines: Vec<&str> = stderr.lines().collect();
        let ok = code == Some(2)
            && lines.len() == 1
            && lines[0].starts_with("parity: error: ")
            && lines[0].contains(file)
            && lines[0].contains(what)
            && !stderr.contains("panicked");
        if !ok {
            failures.push(format!("{case}: exit {code:?}, stderr {stderr:?}"));
        }
    }
    assert!(failures.is_empty(), "bad inputs not reported as expected:\n{}", failures.join("\n"));
}

#[test]
fn the_corpus_holds_exactly_the_pinned_cases_plus_a_valid_dump() {
    let mut dirs: Vec<String> = std::fs::read_dir(root().join("fixtures/bad"))
        .expect("fixtures/bad")
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    dirs.sort();
    let mut want: Vec<String> =
        CASES.iter().map(|c| c.0.to_string()).chain(["valid".to_string()]).collect();
    want.sort();
    assert_eq!(dirs, want);
}

#[test]
fn the_valid_dump_of_the_corpus_passes_against_itself() {
    let out = Command::new(env!("CARGO_BIN_EXE_parity"))
        .current_dir(root())
        .args(["compare", "fixtures/bad/valid", "fixtures/bad/valid"])
        .output()
        .expect("run parity");
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stdout));
}

#[test]
fn bad_flags_exit_2_and_name_the_flag() {
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_parity"))
            .current_dir(root())
            .args(args)
            .output()
            .expect("run");
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (code, err) =
        run(&["run", "fixtures/bad/valid", "--impl", "reference", "--fault", "rope.nope"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("--fault") && err.contains("rope.nope"), "{err}");
    let (code, err) = run(&["run", "fixtures/bad/valid", "--impl", "warp-drive"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("--impl"), "{err}");
    let (code, err) = run(&[
        "compare",
        "fixtures/bad/valid",
        "fixtures/bad/valid",
        "--policy",
        "fixtures/bad/valid/manifest.json",
    ]);
    assert_eq!(code, Some(2));
    assert!(
        err.contains("fixtures/bad/valid/manifest.json") && err.contains("not a valid policy"),
        "{err}"
    );
    let (code, err) = run(&[
        "compare",
        "fixtures/bad/valid",
        "fixtures/bad/valid",
        "--report",
        "fixtures/bad/valid/out",
    ]);
    assert_eq!(code, Some(2));
    assert!(err.contains("--report") && err.contains("inside the input"), "{err}");
    assert!(!root().join("fixtures/bad/valid/out").exists());
    let (code, err) = run(&["run", "fixtures/bad/valid", "--impl", "reference"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("fixtures/bad/valid/weights.safetensors: missing"), "{err}");
}
