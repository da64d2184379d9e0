//! `parity check-weights` on checkpoints made by MindFormers' own weight converter
//! (`mindformers.models.llama.convert_weight.convert_pt_to_ms`, what its
//! `convert_weight.py --model llama` runs), driven by `fixtures/ports/mindformers/convert.py`
//! on the committed 4-shard HF checkpoint `fixtures/checkpoints/tiny_llama3` (bfloat16,
//! made by `save_pretrained`).
//!
//! Needs the MindFormers venv with torch (`bash .ci/setup`); without it the test fails,
//! it never passes silently. Importing MindFormers and torch takes about 20 s, so every
//! checkpoint is converted in one Python process.

use std::ffi::OsStr;
use std::path::Path;

use serde_json::{json, Value};

use crate::helpers::ports::{parity_reported, run_mindformers_jobs, Reported};
use crate::helpers::{input_hashes, root};

/// Tensors in tiny_llama3: 4 layers of 9, the embedding, the final norm and lm_head.
const TENSORS: usize = 4 * 9 + 3;

/// `parity check-weights HF CKPT ARGS... --report CKPT.report`.
fn check_weights(hf: &Path, ckpt: &Path, args: &[&str]) -> Reported {
    let mut argv = vec![OsStr::new("check-weights"), hf.as_os_str(), ckpt.as_os_str()];
    argv.extend(args.iter().map(OsStr::new));
    parity_reported(&root(), argv, &ckpt.with_extension("report"), "weights.json")
}

/// MindFormers' converter, at each dtype its script offers and at its default (the
/// float32 transformers loads in), gives checkpoints that pass `check-weights` with
/// every tensor in that dtype; the same converter with layer 1's gate/up names swapped
/// in its name map gives one that fails, naming both swapped keys and the fault.
#[test]
fn converted_checkpoints_pass_and_a_gate_up_swap_fails_naming_the_keys() {
    let hf = root().join("fixtures/checkpoints/tiny_llama3");
    let before = input_hashes(std::slice::from_ref(&hf));
    let tmp = tempfile::tempdir().expect("tempdir");
    let ckpt = |name: &str| tmp.path().join(format!("{name}.ckpt"));
    // (file, the converter's --dtype, the dtype every tensor must come out in)
    let good = [
        ("default", None, "float32", "F32"),
        ("bf16", Some("bf16"), "bfloat16", "BF16"),
        ("fp16", Some("fp16"), "float16", "F16"),
    ];
    let mut jobs: Vec<Value> = good
        .iter()
        .map(|(name, dtype, _, _)| json!({"hf": hf, "out": ckpt(name), "dtype": dtype}))
        .collect();
    jobs.push(json!({"hf": hf, "out": ckpt("swapped"), "dtype": "bf16",
                     "faults": ["weights.gate_up_swapped@layers=1"]}));
    run_mindformers_jobs("convert.py", tmp.path(), &jobs);
    assert_eq!(before, input_hashes(std::slice::from_ref(&hf)), "the converter changed its input");

    let mut failures = Vec::new();
    for (name, _, dtype, stored) in good {
        let Reported { code, output: text, report: json } =
            check_weights(&hf, &ckpt(name), &["--dtype", dtype]);
        let tensors = json["tensors"].as_array().map_or(&[][..], Vec::as_slice);
        let dtypes: Vec<&str> = tensors.iter().filter_map(|t| t["port_dtype"].as_str()).collect();
        let mut kinds = dtypes.clone();
        kinds.dedup();
        eprintln!("converted ({name}): exit {code:?}, {} tensors in {kinds:?}", dtypes.len());
        let pass = format!("PASS: {TENSORS} mapped tensors, 0 findings");
        if code != Some(0) || !text.contains(&pass) || json["verdict"] != "pass" {
            failures.push(format!("{name}: exit {code:?}, want {pass:?}:\n{text}"));
        } else if dtypes.len() != TENSORS || dtypes.iter().any(|d| *d != stored) {
            failures.push(format!("{name}: port dtypes {dtypes:?}, want {TENSORS} x {stored}"));
        }
    }

    let Reported { code, output: text, report: json } =
        check_weights(&hf, &ckpt("swapped"), &["--dtype", "bfloat16"]);
    eprintln!(
        "swapped: exit {code:?}\n{}",
        text.lines().filter(|l| !l.starts_with("ok ")).collect::<Vec<_>>().join("\n")
    );
    let findings = json["findings"].as_array().map_or(&[][..], Vec::as_slice);
    let named: Vec<(&str, &str)> = findings
        .iter()
        .map(|f| (f["port"].as_str().unwrap_or("-"), f["fault"].as_str().unwrap_or("-")))
        .collect();
    let want = [
        ("model.layers.1.feed_forward.w1.weight", "gate_proj", "up_proj"),
        ("model.layers.1.feed_forward.w3.weight", "up_proj", "gate_proj"),
    ];
    if code != Some(1) || json["verdict"] != "fail" {
        failures.push(format!("swapped: exit {code:?}, want 1:\n{text}"));
    }
    if named != want.map(|(port, _, _)| (port, "weights.gate_up_swapped")) {
        failures.push(format!("swapped: findings {named:?}, want layer 1's w1 and w3 only"));
    }
    for (port, hf_name, holds) in want {
        let line = format!(
            "FINDING values: `{port}` (HF `model.layers.1.mlp.{hf_name}.weight`): holds the \
             values of HF `model.layers.1.mlp.{holds}.weight` (swapped mapping)"
        );
        if !text.contains(&line) || !text.contains("[weights.gate_up_swapped]") {
            failures.push(format!("swapped: no line {line:?}:\n{text}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
