//! LoRA adapters (CONTRACT §5) in the real ports, judged by the MindSpore port's own
//! `selftest.py` (numpy rel-L2 per site, padding rows and padding cache slots left out)
//! against the PEFT-made goldens and HF-made faulty candidates of `fixtures/lora/`:
//! the MindSpore port's `LoraLinear` and mindpet-named adapter conversion, its `lora.*`
//! faults against the same faults planted by PEFT, and MindFormers' Llama running the
//! adapter through mindpet's `LoRADense`.
//!
//! Needs the MindSpore and MindFormers venvs (`bash .ci/setup`); without them these tests
//! fail, they never pass silently. A port run with an adapter takes about 9 s (PyNative);
//! MindFormers adds its 17 s import.

use std::path::Path;
use std::process::Command;

use serde_json::json;

use crate::helpers::ports::{port_python, run_mindformers_jobs};
use crate::helpers::root;
use llama_parity::model::ports::MINDSPORE;

const LORA: &str = "fixtures/lora";

/// Runs `fixtures/ports/mindspore/selftest.py ARGS...` from the repo root: (exit code,
/// stdout and stderr).
fn selftest(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(port_python(&MINDSPORE))
        .current_dir(root())
        .arg("fixtures/ports/mindspore/selftest.py")
        .args(args)
        .env("OMP_NUM_THREADS", "1")
        .output()
        .expect("run selftest.py");
    let text =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code(), text)
}

/// The summary line of a selftest run.
fn worst(text: &str) -> &str {
    text.lines().rev().find(|l| l.starts_with("worst rel-L2")).unwrap_or("no summary line")
}

fn golden(name: &str) -> String {
    format!("{LORA}/golden/{name}")
}

/// Judges `dump` against the golden `name` at float32 (1e-5): every site within it and
/// every golden site dumped, `.lora` and the MLP projections included.
fn assert_reproduces(name: &str, dump: &Path) {
    let g = golden(name);
    let (code, text) =
        selftest(&["--golden", g.as_str(), "--dump", dump.to_str().unwrap(), "--tol", "1e-5"]);
    eprintln!("{name}: {}", worst(&text));
    assert_eq!(code, Some(0), "{text}");
    let line = worst(&text);
    assert!(
        line.contains("0 site(s) over tol") && line.contains("0 golden key(s) not dumped"),
        "{text}"
    );
}

/// The port with the unmerged adapter on all seven projections reproduces the PEFT
/// golden at float32, `<projection>.lora` and `mlp.*_proj` sites included; the same dump
/// is held far from the HF-made candidate whose adapter was never loaded.
#[test]
fn the_mindspore_port_runs_the_peft_adapter_within_float32_tolerance_at_every_site() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dump = tmp.path().join("port");
    let g = golden("lora_f32");
    let (code, text) =
        selftest(&["--golden", &g, "--keep", dump.to_str().unwrap(), "--tol", "1e-5"]);
    eprintln!("lora_f32: {}", worst(&text));
    assert_eq!(code, Some(0), "{text}");
    assert!(worst(&text).contains("0 golden key(s) not dumped"), "{text}");
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dump.join("manifest.json")).unwrap())
            .unwrap();
    assert_eq!(manifest["producer"]["adapter"]["modules"].as_object().map(|m| m.len()), Some(14));
    let c = format!("{LORA}/candidates/lora_f32__lora_not_loaded");
    let (code, text) = selftest(&[
        "--golden",
        &g,
        "--dump",
        dump.to_str().unwrap(),
        "--against",
        &c,
        "--tol",
        "1e-5",
    ]);
    assert_eq!(code, Some(1), "the adapter must change the model: {text}");
}

/// Each `lora.*` fault planted in the port (its converter or its Cells) gives what PEFT
/// gives with the same fault planted (the HF-made candidate), at float32, and differs
/// from the correct golden.
#[test]
fn lora_faults_planted_in_the_mindspore_port_reproduce_the_peft_made_candidates() {
    let tmp = tempfile::tempdir().expect("tmp");
    for (name, fault, cand) in [
        ("lora_f32", "lora.target_missing@component=v_proj", "lora_f32__lora_target_missing"),
        (
            "lora_rslora_pattern_f32",
            "lora.pattern_ignored",
            "lora_rslora_pattern_f32__lora_pattern_ignored",
        ),
    ] {
        let dump = tmp.path().join(cand);
        let g = golden(name);
        let c = format!("{LORA}/candidates/{cand}");
        let args =
            ["--golden", &g, "--fault", fault, "--against", &c, "--keep", dump.to_str().unwrap()];
        let (code, text) = selftest(&[&args[..], &["--tol", "1e-5"]].concat());
        eprintln!("{fault} vs {cand}: {}", worst(&text));
        assert_eq!(code, Some(0), "{fault}: {text}");
        let (code, text) =
            selftest(&["--golden", &g, "--dump", dump.to_str().unwrap(), "--tol", "1e-5"]);
        assert_eq!(code, Some(1), "{fault} must differ from the golden: {text}");
    }
}

/// What the port cannot do with an adapter exits 2 with one line naming it: a LoRA
/// fault on a golden without an adapter, a fault scope it has no switch for, and a
/// golden whose adapter files are missing.
#[test]
fn the_mindspore_port_refuses_what_it_cannot_run_with_an_adapter_naming_it() {
    let tmp = tempfile::tempdir().expect("tmp");
    let bare = tmp.path().join("bare");
    std::fs::create_dir(&bare).unwrap();
    for f in ["manifest.json", "weights.safetensors", "activations.safetensors"] {
        std::fs::copy(root().join(golden("lora_f32")).join(f), bare.join(f)).unwrap();
    }
    let g = golden("lora_f32");
    let bare_s = bare.to_str().unwrap();
    for (args, words) in [
        (vec!["--golden", "golden/gqa_pad_f32", "--fault", "lora.scale_alpha"], "lora.scale_alpha"),
        (
            vec!["--golden", g.as_str(), "--fault", "lora.scale_missing@steps=prefill"],
            "steps=prefill",
        ),
        (vec!["--golden", g.as_str(), "--fault", "lora.target_missing"], "@component="),
        (vec!["--golden", bare_s], "adapter_config.json"),
    ] {
        let (code, text) = selftest(&args);
        assert_eq!(code, Some(2), "{args:?}: {text}");
        assert!(text.contains(words), "{args:?} should name {words}: {text}");
    }
}

/// MindFormers' Llama with the adapter in mindpet 1.0.4's `LoRADense` cells reproduces
/// the PEFT goldens at float32: all seven projections (lora_f32), and rsLoRA with rank
/// and alpha patterns given to mindpet as `lora_alpha = scaling · r`; merged, folded in
/// float32.
#[test]
fn mindformers_runs_the_peft_adapter_through_mindpet_within_float32_tolerance() {
    let tmp = tempfile::tempdir().expect("tmp");
    let names = ["lora_f32", "lora_rslora_pattern_f32", "lora_merged_f32"];
    let jobs: Vec<_> = names
        .iter()
        .map(|n| json!({"golden": root().join(golden(n)), "out": tmp.path().join(n), "dtype": "float32"}))
        .collect();
    run_mindformers_jobs("run.py", tmp.path(), &jobs);
    for n in names {
        assert!(!tmp.path().join(format!("{n}.error")).exists(), "{n} refused");
        assert_reproduces(n, &tmp.path().join(n));
    }
}
