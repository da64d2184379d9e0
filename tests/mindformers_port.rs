//! `parity run GOLDEN --impl mindformers`: MindFormers' own Llama
//! (`fixtures/ports/mindformers/run.py`, mindformers 2.0.0) against the HF goldens.
//!
//! Needs the MindFormers venv (`bash .ci/setup`, or `PARITY_MINDFORMERS_PYTHON` /
//! `PARITY_MINDFORMERS_VENV`) and the goldens; with either missing these tests fail,
//! they never pass silently. Importing MindFormers takes about 17 s, so the runner's
//! `--jobs` mode runs a batch of scenarios in one process and each dump is judged by
//! `parity compare`; one test goes through `parity run --impl mindformers` end to end.

use std::ffi::OsStr;
use std::process::Command;

use serde_json::{json, Value};

use crate::helpers::ports::{golden_names, parity_reported, run_mindformers_jobs, worst_site};
use crate::helpers::root;

/// What one job of a batch came to.
enum Outcome {
    /// The runner refused the scenario with this reason (its exit-2 message).
    Refused(String),
    /// `parity compare` of the dump: exit code and report.json.
    Compared(Option<i32>, Value, String),
}

/// Runs `(golden, dtype, faults)` jobs in one MindFormers process, then compares each
/// dump with its golden.
fn batch(jobs: &[(&str, &str, &[&str])]) -> Vec<Outcome> {
    let tmp = tempfile::tempdir().expect("tempdir");
    let specs: Vec<Value> = jobs
        .iter()
        .enumerate()
        .map(|(i, (g, d, f))| {
            json!({"golden": root().join("golden").join(g), "dtype": d, "faults": f,
                   "out": tmp.path().join(format!("job{i}"))})
        })
        .collect();
    run_mindformers_jobs("run.py", tmp.path(), &specs);
    jobs.iter()
        .enumerate()
        .map(|(i, (g, _, _))| {
            let dump = tmp.path().join(format!("job{i}"));
            if let Ok(reason) = std::fs::read_to_string(dump.with_extension("error")) {
                return Outcome::Refused(reason.trim().to_string());
            }
            let report = tmp.path().join(format!("report{i}"));
            let golden = format!("golden/{g}");
            let args = [
                OsStr::new("compare"),
                OsStr::new(&golden),
                dump.as_os_str(),
                OsStr::new("--quiet"),
            ];
            let o = parity_reported(&root(), args, &report, "report.json");
            Outcome::Compared(o.code, o.report, o.output)
        })
        .collect()
}

/// The configs MindFormers' Llama cannot express, and the words its refusal must hold.
fn refusal(golden: &str) -> Option<&'static str> {
    match golden {
        "longrope_f32" => Some("longrope"),
        "mqa_tied_f32" => Some("head_dim"),
        _ => None,
    }
}

fn judge(name: &str, outcome: &Outcome, failures: &mut Vec<String>) {
    let golden = name.split(' ').next().unwrap_or(name);
    match (outcome, refusal(golden)) {
        (Outcome::Refused(reason), Some(word)) => {
            eprintln!("{name}: refused: {reason}");
            if !reason.contains(word) {
                failures.push(format!("{name}: refused without naming {word}: {reason}"));
            }
        }
        (Outcome::Refused(reason), None) => failures.push(format!("{name}: refused: {reason}")),
        (Outcome::Compared(code, report, output), expect) => {
            eprintln!(
                "{name}: exit {code:?}, {} sites, worst {}",
                report["sites"].as_array().map_or(0, |s| s.len()),
                worst_site(report)
            );
            if expect.is_some() {
                failures.push(format!("{name}: ran, but MindFormers cannot express it"));
            } else if *code != Some(0) || report["verdict"] != "pass" {
                failures.push(format!("{name}: exit {code:?}\n{output}"));
            } else if report["summary"]["missing"].as_u64().unwrap_or(0) != 0 {
                failures.push(format!("{name}: sites missing: {}", report["summary"]));
            }
        }
    }
}

/// Every committed golden passes at float32 with every site observed, or is refused
/// naming what MindFormers lacks (longrope; a head_dim that is not hidden / heads).
#[test]
fn every_golden_passes_at_float32_or_is_refused_with_the_reason() {
    let names = golden_names();
    let jobs: Vec<(&str, &str, &[&str])> =
        names.iter().map(|g| (g.as_str(), "float32", &[][..])).collect();
    let outcomes = batch(&jobs);
    let mut failures = Vec::new();
    for (g, o) in names.iter().zip(&outcomes) {
        judge(&format!("{g} at float32"), o, &mut failures);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// float16 runs on MindSpore's CPU kernels (two goldens here, for CI time: the float16
/// golden and the llama3-scaled one); bfloat16 has no CPU matmul and exits 2 saying so.
/// And `parity run --impl mindformers` end to end on the unpadded golden.
#[test]
fn float16_passes_bfloat16_is_refused_on_the_cpu_and_parity_run_drives_it() {
    let jobs: [(&str, &str, &[&str]); 2] =
        [("gqa_pad_f16", "float16", &[]), ("llama3_f32", "float16", &[])];
    let outcomes = batch(&jobs);
    let mut failures = Vec::new();
    for ((g, d, _), o) in jobs.iter().zip(&outcomes) {
        judge(&format!("{g} at {d}"), o, &mut failures);
    }
    let bf16 = Command::new(env!("CARGO_BIN_EXE_parity"))
        .current_dir(root())
        .args(["run", "golden/gqa_pad_bf16", "--impl", "mindformers"])
        .output()
        .expect("run parity");
    let stderr = String::from_utf8_lossy(&bf16.stderr);
    if bf16.status.code() != Some(2) || !stderr.contains("bfloat16") {
        failures.push(format!("bfloat16: exit {:?}: {stderr}", bf16.status.code()));
    }
    let run = Command::new(env!("CARGO_BIN_EXE_parity"))
        .current_dir(root())
        .args(["run", "golden/mha_f32", "--impl", "mindformers", "--device", "CPU", "--quiet"])
        .output()
        .expect("run parity");
    let text = String::from_utf8_lossy(&run.stdout);
    eprintln!(
        "parity run golden/mha_f32 --impl mindformers: {}",
        text.lines().next().unwrap_or("")
    );
    if run.status.code() != Some(0) || !text.starts_with("PASS") {
        failures.push(format!(
            "parity run mha_f32: exit {:?}: {text}{}",
            run.status.code(),
            String::from_utf8_lossy(&run.stderr)
        ));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Each fault planted in MindFormers' own code (patched at run time) fails the gate at
/// the site where it acts, and the diagnosis names it.
#[test]
fn each_planted_fault_fails_where_it_acts_and_is_diagnosed() {
    let cases = [
        ("rope.pos_reset", "decode.0", "inputs.position_ids"),
        ("rope.interleaved", "prefill", "model.layers.0.self_attn.q_rope"),
        ("mask.pad_token_masked", "prefill", "model.mask"),
        ("weights.gate_up_swapped", "prefill", "model.layers.0.mlp"),
        ("norm.layernorm", "prefill", "model.layers.0.input_layernorm"),
    ];
    let faults: Vec<[&str; 1]> = cases.iter().map(|c| [c.0]).collect();
    let jobs: Vec<(&str, &str, &[&str])> =
        faults.iter().map(|f| ("gqa_pad_f32", "float32", &f[..])).collect();
    let outcomes = batch(&jobs);
    let mut failures = Vec::new();
    for ((fault, step, site), o) in cases.iter().zip(&outcomes) {
        let Outcome::Compared(code, report, _) = o else {
            failures.push(format!("{fault}: refused"));
            continue;
        };
        let first = &report["first_divergence"];
        let got = (first["step"].as_str().unwrap_or("-"), first["site"].as_str().unwrap_or("-"));
        let diag = report["diagnosis"][0]["fault"].as_str().unwrap_or("(none)");
        eprintln!("{fault}: exit {code:?}, first divergence {}/{}, diagnosis {diag}", got.0, got.1);
        if *code != Some(1) || got != (*step, *site) || diag != *fault {
            failures
                .push(format!("{fault}: exit {code:?} at {}/{}, diagnosis {diag}", got.0, got.1));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn without_mindformers_the_run_exits_2_saying_how_to_install_it() {
    crate::helpers::ports::without_interpreter_exits_2_saying_how_to_install(
        "PARITY_MINDFORMERS_PYTHON",
        "mindformers",
    );
}

#[test]
fn device_is_refused_for_other_implementations() {
    let out = Command::new(env!("CARGO_BIN_EXE_parity"))
        .current_dir(root())
        .args(["run", "golden/mha_f32", "--impl", "reference", "--device", "Ascend"])
        .output()
        .expect("run parity");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--device"), "{stderr}");
}
