//! The real ports on a golden whose weights are a checkpoint reference (CONTRACT §1.2):
//! `parity run fixtures/checkpoints/tiny_llama3_golden --impl mindspore|mindformers`
//! reads the sharded bfloat16 checkpoint the manifest names, checks its listed sha256s,
//! converts it (the MindSpore port's converter shard by shard, MindFormers' own
//! `convert_pt_to_ms`) into the port cache keyed by the digests, and passes.
//!
//! Needs the MindSpore and MindFormers venvs (`bash .ci/setup`); without them these
//! tests fail, they never pass silently. Each test gives the ports a cache of its own
//! (`PARITY_PORT_CACHE`, `PARITY_HASH_CACHE`), so what they find there is what they wrote.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use crate::helpers::{copy_tree, root, run_with_report};

/// `parity run GOLDEN --impl IMPL ARGS... --report DIR` with the ports' caches in
/// `cache`: exit code, stdout and stderr together, and the report's JSON.
fn run(golden: &Path, cache: &Path, args: &[&str]) -> (Option<i32>, String, Value) {
    let rep = cache.join(format!("report-{}", args.join("-").replace(['/', '@', '='], "_")));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_parity"));
    cmd.arg("run")
        .arg(golden)
        .args(args)
        .env("PARITY_PORT_CACHE", cache.join("ports"))
        .env("PARITY_HASH_CACHE", cache.join("sha256"))
        .env_remove("LLAMA_PARITY_SKIP_SHA256");
    run_with_report(cmd, &rep)
}

fn golden() -> PathBuf {
    root().join("fixtures/checkpoints/tiny_llama3_golden")
}

/// The entries of the port cache `cache/ports/<port>`, finished ones only.
fn entries(cache: &Path, port: &str) -> Vec<PathBuf> {
    let dir = cache.join("ports").join(port);
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    v.retain(|p| p.join("done").is_file());
    v.sort();
    v
}

#[test]
fn mindspore_passes_on_a_sharded_checkpoint_reference_at_every_dtype_and_converts_once_per_dtype() {
    let cache = tempfile::tempdir().expect("tempdir");
    let mut failures = Vec::new();
    for dtype in ["float32", "float16", "bfloat16"] {
        let (code, out, r) =
            run(&golden(), cache.path(), &["--impl", "mindspore", "--dtype", dtype]);
        if code != Some(0) || r["verdict"] != "pass" {
            failures.push(format!("{dtype}: exit {code:?}\n{out}"));
        }
        assert!(out.contains("converted weights cached"), "{dtype}: {out}");
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // one entry per dtype, one converted file per shard that holds parameters
    let made = entries(cache.path(), "mindspore");
    assert_eq!(made.len(), 3, "{made:?}");
    for e in &made {
        let ckpts = std::fs::read_dir(e)
            .expect("entry")
            .filter(|f| {
                f.as_ref().is_ok_and(|f| f.path().extension().is_some_and(|x| x == "safetensors"))
            })
            .count();
        assert_eq!(ckpts, 4, "{}", e.display());
    }
    // a second run reads the cache instead of converting again
    let (code, out, _) = run(&golden(), cache.path(), &["--impl", "mindspore"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("converted weights from the cache"), "{out}");
    assert_eq!(entries(cache.path(), "mindspore").len(), 3);
}

#[test]
fn mindformers_passes_on_a_sharded_checkpoint_reference_through_its_own_converter() {
    let cache = tempfile::tempdir().expect("tempdir");
    let (code, out, r) = run(&golden(), cache.path(), &["--impl", "mindformers"]);
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(r["verdict"], "pass", "{out}");
    assert_eq!(entries(cache.path(), "mindformers").len(), 1, "{out}");
    // a fault planted in the converter's name map is diagnosed, and not cached
    let (code, out, r) = run(
        &golden(),
        cache.path(),
        &["--impl", "mindformers", "--fault", "weights.gate_up_swapped"],
    );
    assert_eq!(code, Some(1), "{out}");
    assert_eq!(r["diagnosis"][0]["fault"], "weights.gate_up_swapped", "{}", r["diagnosis"]);
    assert_eq!(entries(cache.path(), "mindformers").len(), 1, "{out}");
}

#[test]
fn a_conversion_fault_on_a_checkpoint_reference_is_diagnosed_in_its_layer_and_not_cached() {
    let cache = tempfile::tempdir().expect("tempdir");
    let (code, out, r) = run(
        &golden(),
        cache.path(),
        &["--impl", "mindspore", "--fault", "weights.gate_up_swapped@layers=1"],
    );
    assert_eq!(code, Some(1), "{out}");
    assert_eq!(r["diagnosis"][0]["fault"], "weights.gate_up_swapped", "{}", r["diagnosis"]);
    assert!(out.contains("prefill model.layers.1.mlp"), "{out}");
    assert!(entries(cache.path(), "mindspore").is_empty(), "{out}");
}

/// A shard changed after the golden was made: both ports exit 2 naming the shard and
/// its digest, before converting anything; and the manifest's other faults are named.
#[test]
fn a_checkpoint_that_is_not_the_one_hashed_is_refused_by_both_ports_naming_the_shard() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let src = root().join("fixtures/checkpoints");
    copy_tree(&src.join("tiny_llama3"), &tmp.path().join("tiny_llama3"));
    copy_tree(&src.join("tiny_llama3_golden"), &tmp.path().join("g"));
    let shard = tmp.path().join("tiny_llama3/model-00002-of-00004.safetensors");
    let mut bytes = std::fs::read(&shard).expect("shard");
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&shard, bytes).expect("write");
    for port in ["mindspore", "mindformers"] {
        let cache = tempfile::tempdir().expect("tempdir");
        let (code, out, _) = run(&tmp.path().join("g"), cache.path(), &["--impl", port]);
        assert_eq!(code, Some(2), "{port}: {out}");
        assert!(
            out.contains("run.py: ")
                && out.contains("model-00002-of-00004.safetensors: sha256 is")
                && out.contains("not the checkpoint the golden was made from"),
            "{port}: {out}"
        );
        assert!(entries(cache.path(), port).is_empty(), "{port}: {out}");
    }
    // A reference to a directory that is not there.
    let man_p = tmp.path().join("g/manifest.json");
    let text = std::fs::read_to_string(&man_p).expect("manifest");
    std::fs::write(&man_p, text.replace("\"../tiny_llama3\"", "\"../nowhere\"")).expect("write");
    let cache = tempfile::tempdir().expect("tempdir");
    let (code, out, _) = run(&tmp.path().join("g"), cache.path(), &["--impl", "mindspore"]);
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("nowhere: not an HF checkpoint directory"), "{out}");
}
