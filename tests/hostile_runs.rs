//! Hostile flags and inputs of a run (defects 7, 8, 9a, 9c, 16, 17, 21 and 23 of
//! "Hardening of the new inputs"): fault scopes that select nothing or ask for gigabytes,
//! a policy that loosens everything unseen, a manifest dtype its tensors contradict, a
//! baseline whose infinite errors switch the growth check off, an msprobe manifest
//! claiming 2^24 layers, two runs writing one `--dump` at once, and an input truncated
//! while it is mapped. Each now ends with exit 2 and one line naming the flag or file
//! (or, for the policy, records it where the verdict is read).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::helpers::{copy_tree, parity_in, report_json, root};

fn parity(args: &[&str]) -> (Option<i32>, String, String) {
    parity_in(&root(), args)
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Exit 2 and one error line holding every one of `what`, no panic.
fn assert_refused(res: &(Option<i32>, String, String), what: &[&str]) {
    let (code, _, err) = res;
    assert_eq!(*code, Some(2), "stderr: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("parity: error: ")).collect();
    assert_eq!(lines.len(), 1, "one error line expected: {err:?}");
    assert!(!err.contains("panicked"), "{err}");
    for w in what {
        assert!(lines[0].contains(w), "{w:?} not in {err:?}");
    }
}

/// Defect 7: scopes that select nothing planted nothing and the run passed. The model
/// of golden/gqa_pad_f32 has 2 decoder layers and steps prefill, decode.0-4.
#[test]
fn a_fault_scope_that_selects_nothing_is_refused_naming_what_the_model_has() {
    for (fault, what) in [
        ("kv.stale@layers=99", &["layer 99", "2 decoder layers (0-1)"][..]),
        ("kv.stale@layers=2-5", &["layer 2", "2 decoder layers"]),
        ("kv.stale@layers=18446744073709551615", &["layer 18446744073709551615"]),
        ("attn.no_scale@steps=decode.99", &["decode.99", "prefill, decode.0"]),
    ] {
        let t = Instant::now();
        let r = parity(&["run", "golden/gqa_pad_f32", "--impl", "reference", "--fault", fault]);
        assert_refused(&r, &["--fault", what[0]]);
        for w in what {
            assert!(r.2.contains(w), "{fault}: {w:?} not in {:?}", r.2);
        }
        assert!(t.elapsed() < Duration::from_secs(20), "{fault}: refused only after the run");
    }
}

/// Defect 16: 120 kB of `0-65536,` ranges asked for 7.9 GB before anything was checked;
/// the indices are counted before they are expanded.
#[test]
fn a_layer_scope_of_a_hundred_thousand_ranges_is_refused_before_expanding() {
    // 120 kB: a single argument may not pass 128 KiB.
    let spec = format!("kv.stale@layers={}", "0-65536,".repeat(15_000).trim_end_matches(','));
    assert!(spec.len() > 120_000);
    let t = Instant::now();
    let r = parity(&["run", "golden/gqa_pad_f32", "--impl", "reference", "--fault", &spec]);
    assert_refused(&r, &["--fault", "more than 65536 layer indices"]);
    assert!(r.2.len() < 400, "the message quotes the whole value: {} bytes", r.2.len());
    assert!(t.elapsed() < Duration::from_secs(5), "took {:?}", t.elapsed());
}

/// Defect 8: a policy whose thresholds are 1e308 passed every site while summary.md
/// said "within tolerance" with no word of the policy. The report now records the file
/// and its rules (JSON, summary.md, HTML), and a rule matching no site is warned about.
#[test]
fn the_policy_is_recorded_in_the_report_and_a_rule_matching_nothing_is_warned_about() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let policy = tmp.path().join("policy.json");
    std::fs::write(
        &policy,
        r#"{"rules": [{"site": "*", "max_rel_l2": 1e308, "min_cosine": -1},
                      {"site": "model.layers.*.self_atn.probs", "max_rel_l2": 1}]}"#,
    )
    .expect("write");
    let out = tmp.path().join("r");
    let cand = "fixtures/candidates/gqa_pad_f32__rope_interleaved";
    let r = parity(&[
        "compare",
        "golden/gqa_pad_f32",
        cand,
        "--no-floor",
        "--no-diagnosis",
        "--policy",
        s(&policy),
        "--report",
        s(&out),
    ]);
    assert_eq!(r.0, Some(0), "the absurd policy passes the faulty candidate: {r:?}");
    let warn: Vec<&str> = r.2.lines().filter(|l| l.starts_with("parity: warning: ")).collect();
    assert_eq!(warn.len(), 1, "{:?}", r.2);
    assert!(warn[0].contains("rules[1]") && warn[0].contains("self_atn"), "{warn:?}");
    let j = report_json(&out);
    assert_eq!(j["policy"]["file"], s(&policy));
    assert_eq!(j["policy"]["rules"][0]["max_rel_l2"], 1e308);
    assert!(j["policy"]["warnings"][0].as_str().unwrap().contains("rules[1]"), "{j}");
    let md = std::fs::read_to_string(out.join("summary.md")).expect("summary.md");
    assert!(md.contains("Policy `") && md.contains("1.000e308"), "{md}");
    let html = std::fs::read_to_string(out.join("report.html")).expect("report.html");
    assert!(html.contains("<dt>policy</dt>") && html.contains("1.000e308"), "policy not in html");
}

/// Defect 9a: a float32 candidate whose manifest says bfloat16 was judged at bfloat16's
/// thresholds. Every float tensor finer than the stated dtype is refused, naming both.
#[test]
fn a_manifest_dtype_its_tensors_contradict_is_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let cand = tmp.path().join("c");
    copy_tree(&root().join("fixtures/candidates/gqa_pad_f32__rope_interleaved"), &cand);
    let m = cand.join("manifest.json");
    let text = std::fs::read_to_string(&m).expect("read");
    assert!(text.contains("\"dtype\": \"float32\""), "{text}");
    std::fs::write(&m, text.replacen("\"dtype\": \"float32\"", "\"dtype\": \"bfloat16\"", 1))
        .expect("write");
    let r = parity(&["compare", "golden/gqa_pad_f32", s(&cand), "--no-floor"]);
    assert_refused(&r, &[s(&m), "bfloat16", "F32"]);

    // A bfloat16 port that upcasts its dumps to float32 holds bfloat16 values: judged as
    // stated (exit 1: this candidate's fault fails it), not refused.
    use llama_parity::dump::{DType, SafetensorsFile, Tensor};
    let up = tmp.path().join("up");
    copy_tree(&root().join("fixtures/candidates/gqa_pad_bf16__rope_interleaved"), &up);
    let acts = up.join("activations.safetensors");
    let file = SafetensorsFile::open(&acts).expect("open");
    let mut tensors = std::collections::BTreeMap::new();
    for k in file.keys().map(str::to_string).collect::<Vec<_>>() {
        let t = file.require(&k).expect("tensor");
        let t = if t.dtype() == DType::BF16 {
            let v: Vec<f64> = (0..t.numel()).map(|i| t.get_f64(i)).collect();
            Tensor::from_f64(t.shape(), &v, DType::F32)
        } else {
            t
        };
        tensors.insert(k, t);
    }
    drop(file);
    llama_parity::dump::safetensors::write(&acts, &tensors, None).expect("write");
    let r = parity(&["compare", "golden/gqa_pad_bf16", s(&up), "--no-floor", "--no-diagnosis"]);
    assert_eq!(r.0, Some(1), "{r:?}");
}

/// Defect 9c: a baseline whose passing site has an error of "inf" (or NaN, or below
/// zero) made every growth against it 0, switching the gate off; it is refused naming
/// the site and field.
#[test]
fn a_baseline_with_non_finite_or_negative_errors_is_refused_naming_the_field() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let accepted = tmp.path().join("accepted");
    let r = parity(&[
        "compare",
        "golden/gqa_pad_f32",
        "golden/gqa_pad_f32",
        "--no-floor",
        "--report",
        s(&accepted),
    ]);
    assert_eq!(r.0, Some(0), "{r:?}");
    let j = report_json(&accepted);
    let i = j["sites"]
        .as_array()
        .unwrap()
        .iter()
        .position(|e| e["status"] == "pass" && e["metrics"]["kind"] == "values")
        .expect("a passing value site");
    for bad in [serde_json::json!("inf"), serde_json::json!("nan"), serde_json::json!(-1.0)] {
        let mut v = j.clone();
        v["sites"][i]["metrics"]["rel_l2"] = bad.clone();
        let b = tmp.path().join("baseline.json");
        std::fs::write(&b, v.to_string()).expect("write");
        let r = parity(&[
            "compare",
            "golden/gqa_pad_f32",
            "golden/gqa_pad_f32",
            "--no-floor",
            "--baseline",
            s(&b),
        ]);
        assert_refused(&r, &[s(&b), &format!("sites[{i}]"), "metrics.rel_l2"]);
    }
}

/// Defect 21: an msprobe candidate whose manifest claims 2^24 layers was looked up layer
/// by layer for more than 60 s; the claim is held against the records the dump holds.
#[test]
fn an_msprobe_manifest_claiming_more_layers_than_the_dump_holds_is_refused_fast() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dump = tmp.path().join("dump");
    copy_tree(&root().join("fixtures/msprobe/gqa_pad_f32"), &dump);
    let m = dump.join("manifest.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&m).expect("read")).expect("json");
    v["model"]["num_hidden_layers"] = serde_json::Value::from(1u64 << 24);
    std::fs::write(&m, v.to_string()).expect("write");
    let t = Instant::now();
    let r = parity(&["import", "msprobe", s(&dump), "--out", s(&tmp.path().join("o"))]);
    assert_refused(&r, &[s(&dump), "num_hidden_layers 16777216"]);
    assert!(t.elapsed() < Duration::from_secs(10), "took {:?}", t.elapsed());
}

/// The manifest's text and the activations' bytes of the dump in `dir`.
fn dump_pair(dir: &Path) -> (String, Vec<u8>) {
    let m = std::fs::read_to_string(dir.join("manifest.json")).expect("manifest");
    let a = std::fs::read(dir.join("activations.safetensors")).expect("activations");
    (m, a)
}

fn run_into(dir: &Path, implementation: &str) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_parity"))
        .current_dir(root())
        .args(["run", "golden/gqa_pad_f32", "--impl", implementation, "--no-floor"])
        .args(["--no-diagnosis", "-q", "--dump", s(dir)])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn")
}

/// Defect 23: two `run --dump SAME_DIR` at once left one run's manifest beside the
/// other's activations (4-7 of 20 rounds). The dump is written as one locked set, so
/// whatever the order, the directory holds one run's manifest with that run's tensors.
#[test]
fn two_runs_dumping_into_one_directory_leave_one_whole_dump() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut alone = Vec::new();
    for imp in ["reference", "ascend"] {
        let d = tmp.path().join(imp);
        assert!(run_into(&d, imp).wait().expect("wait").code().is_some());
        alone.push(dump_pair(&d));
    }
    assert_ne!(alone[0].0, alone[1].0, "the two runs are told apart by their manifests");
    assert_ne!(alone[0].1, alone[1].1, "and by their activations");
    let same = tmp.path().join("same");
    for round in 0..6 {
        let mut a = run_into(&same, "reference");
        let mut b = run_into(&same, "ascend");
        let (ca, cb) = (a.wait().expect("wait"), b.wait().expect("wait"));
        assert!(ca.code().is_some() && cb.code().is_some(), "round {round}: {ca:?} {cb:?}");
        let got = dump_pair(&same);
        assert!(
            alone.contains(&got),
            "round {round}: manifest {:?} beside other activations",
            got.0
        );
    }
}

/// Defect 17: a candidate's activations truncated while mapped killed the process with
/// SIGBUS and no message (6 of these 80 tries with the binary before the fix; the
/// compare takes 30-50 ms). Truncated at 0-39 ms, every try now ends with an exit
/// status, and a truncation caught mid-read names the file.
#[test]
fn an_input_truncated_while_mapped_ends_with_exit_2_naming_it_not_sigbus() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let cand: PathBuf = tmp.path().join("c");
    let src = root().join("fixtures/candidates/gqa_pad_f32__rope_interleaved");
    let acts = cand.join("activations.safetensors");
    let mut caught = 0;
    for k in 0..80u64 {
        copy_tree(&src, &cand);
        let child = Command::new(env!("CARGO_BIN_EXE_parity"))
            .current_dir(root())
            .args(["compare", "golden/gqa_pad_f32", s(&cand), "--no-floor", "--no-diagnosis"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        std::thread::sleep(Duration::from_millis(k % 40));
        let f = std::fs::OpenOptions::new().write(true).open(&acts).expect("open");
        f.set_len(64 * 1024).expect("truncate");
        let out = child.wait_with_output().expect("wait");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.code().is_some(), "try {k}: killed by {:?}: {err}", out.status);
        if err.contains("SIGBUS") {
            caught += 1;
            assert_eq!(out.status.code(), Some(2), "{err}");
            assert!(err.contains(s(&acts)), "{err}");
        }
    }
    eprintln!("truncated while mapped: {caught} of 80 tries caught mid-read");
}
