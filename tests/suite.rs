//! `parity suite`, the main job on the embedded golden suite: every implementation on
//! every golden passes, every HF-made faulty candidate fails with its planted fault
//! ranked first, and the suite report lists each run.

use std::path::Path;
use std::process::Command;

#[test]
fn the_suite_runs_as_expected_on_the_embedded_goldens() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let tmp = tempfile::tempdir().expect("tmp");
    let out = Command::new(env!("CARGO_BIN_EXE_parity"))
        .current_dir(root)
        .args(["suite", "--no-real-model", "--report"])
        .arg(tmp.path())
        .output()
        .expect("run parity suite");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(!stdout.contains("unexpected"), "{stdout}");
    let suite: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(tmp.path().join("suite.json")).expect("suite.json"),
    )
    .expect("json");
    let runs = suite.as_array().expect("array");
    let dumps = |dir: &str| {
        std::fs::read_dir(root.join(dir))
            .unwrap()
            .filter(|e| e.as_ref().unwrap().path().join("manifest.json").is_file())
            .count()
    };
    // The embedded goldens, the LoRA set (CONTRACT §5) and the training set (§6), each
    // with its candidates; the skipped float16 training step runs the port at float16
    // alone.
    let goldens = dumps("golden") + dumps("fixtures/lora/golden") + dumps("fixtures/train/golden");
    let candidates = dumps("fixtures/candidates")
        + dumps("fixtures/lora/candidates")
        + dumps("fixtures/train/candidates");
    assert_eq!(
        runs.len(),
        goldens * 3 + candidates - 1,
        "three runs per golden (two on the skipped float16 training step) and one per candidate"
    );
    let training: Vec<_> = runs.iter().filter(|r| r["golden"] == "train_overflow_f16").collect();
    assert!(
        training.iter().all(|r| r["run"] != "ascend bfloat16"),
        "the skipped float16 step is not run at bfloat16: {training:?}"
    );
    assert!(runs.iter().all(|r| r["ok"] == true));
    for r in runs.iter().filter(|r| r["run"].as_str().unwrap().starts_with("candidate ")) {
        let fault = r["run"].as_str().unwrap().trim_start_matches("candidate ");
        if fault.starts_with("other_") {
            // An adapter or training fault outside the contract's: it fails, and none is
            // named.
            assert_eq!(r["verdict"], "fail", "{r}");
            assert!(r["diagnosis"].is_null(), "{r}");
        } else if fault == "lora.merged_low_precision" && r["golden"] == "lora_merged_bf16" {
            // A bfloat16 fold: within the golden's own rounding by construction.
            assert_eq!(r["verdict"], "pass", "{r}");
        } else {
            assert_eq!(r["verdict"], "fail", "{r}");
            assert_eq!(r["diagnosis"], fault, "{r}");
        }
    }
    assert!(tmp.path().join("lora_f32/candidate_lora.not_loaded/report.html").is_file());
    assert!(tmp.path().join("gqa_pad_f32/candidate_rope.pos_reset/report.html").is_file());
    assert!(tmp
        .path()
        .join("train_full_f32/candidate_train.labels_unshifted/report.html")
        .is_file());
}

#[test]
fn the_suite_refuses_a_directory_without_goldens() {
    let tmp = tempfile::tempdir().expect("tmp");
    // The real model, when .ci/setup has made it, is planned besides the directory;
    // left out here, the directory alone must hold goldens.
    let out = Command::new(env!("CARGO_BIN_EXE_parity"))
        .arg("suite")
        .arg(tmp.path())
        .arg("--no-real-model")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("holds no golden dump"));
}
