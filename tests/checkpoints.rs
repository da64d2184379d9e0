//! Real HF checkpoints (CONTRACT §1.1, §1.2): a tiny bfloat16 checkpoint that HF's
//! `save_pretrained` wrote in four shards with an index (`fixtures/checkpoints/`, made by
//! `golden/make_checkpoint.py`), and goldens that `golden/generate.py --model` made on it
//! with per-step activation files, one of them a `--layers 0,-1` subset. The reference
//! reproduces them, a planted fault is diagnosed from the checkpoint, a checkpoint that
//! is not the one hashed is refused, and results do not depend on the thread count.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use llama_parity::contract::site::{LayerPart, Site, Step};
use llama_parity::dump::Dump;
use llama_parity::model::{
    self, EventSink, Implementation, RunContext, RunEvent, RunOptions, Sha256Check,
};
use llama_parity::weights::checkpoint::HfCheckpoint;
use serde_json::Value;

use crate::helpers::{copy_tree, parity, report_json};

/// `parity run GOLDEN ARGS... --report DIR` into a fresh directory: exit code, the
/// output, and the report's JSON.
fn run_with_report(golden: &Path, args: &[&str]) -> (Option<i32>, String, Value) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let rep = tmp.path().join("r");
    let mut all = vec!["run", golden.to_str().unwrap()];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--report", rep.to_str().unwrap()]);
    let (code, out, err) = parity(&all);
    (code, format!("{out}\n{err}"), report_json(&rep))
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/checkpoints").join(name)
}

#[test]
fn the_fixture_is_a_sharded_hf_checkpoint_and_every_parameter_is_found() {
    let dir = fixture("tiny_llama3");
    let index: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("model.safetensors.index.json")).expect("index"),
    )
    .expect("index JSON");
    let map = index["weight_map"].as_object().expect("weight_map");
    let shards: std::collections::BTreeSet<&str> = map.values().filter_map(Value::as_str).collect();
    assert!(shards.len() >= 3, "{shards:?}");
    let ckpt = HfCheckpoint::open(&dir).expect("open");
    assert_eq!(ckpt.keys().count(), map.len());
    for (k, file) in map {
        let t = ckpt.require(k).expect("listed parameter");
        assert_eq!(t.dtype().to_string(), "BF16", "{k}");
        assert!(ckpt.file_of(k).ends_with(file.as_str().unwrap()), "{k}");
    }
    let cfg = ckpt.config().expect("config.json");
    assert_eq!(cfg.num_hidden_layers, 4);
}

#[test]
fn the_reference_reproduces_a_golden_made_from_the_checkpoint() {
    let (code, out, r) = run_with_report(&fixture("tiny_llama3_golden"), &["--impl", "reference"]);
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(r["verdict"], "pass");
    // 4 steps: 7 shared sites + 14 a layer for 4 layers
    assert_eq!(r["sites"].as_array().map(Vec::len), Some(4 * (7 + 4 * 14)), "{out}");
}

#[test]
fn a_fault_planted_in_a_run_on_the_checkpoint_is_diagnosed() {
    let (code, out, r) = run_with_report(
        &fixture("tiny_llama3_golden"),
        &["--impl", "ascend", "--dtype", "bfloat16", "--fault", "rope.pos_reset"],
    );
    assert_eq!(code, Some(1), "{out}");
    assert_eq!(r["diagnosis"][0]["fault"], "rope.pos_reset", "{}", r["diagnosis"]);
}

#[test]
fn per_step_files_hold_one_step_each_and_a_layer_subset_leaves_the_rest_out() {
    let golden = fixture("tiny_llama3_layers_golden");
    let acts = golden.join("activations");
    assert!(!golden.join("activations.safetensors").exists());
    let d = Dump::open(&golden).expect("open");
    assert_eq!(d.manifest.steps.len(), 4);
    for &step in &d.manifest.steps {
        assert!(acts.join(format!("{step}.safetensors")).is_file(), "{step}");
        for layer in 0..4 {
            let present = d.has(step, &Site::Layer(layer, LayerPart::Output));
            assert_eq!(present, layer == 0 || layer == 3, "{step} layer {layer}");
        }
        assert!(d.has(step, &Site::LmHead), "{step}");
    }
    let sites = d.sites(Step::Prefill).len();
    assert_eq!(sites, 7 + 2 * 14);
    // The reference runs every layer; only the dumped ones are compared, all passing.
    let (code, out, r) = run_with_report(&golden, &["--impl", "reference"]);
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(r["sites"].as_array().map(Vec::len), Some(4 * sites));
}

/// A copy of the golden made on the checkpoint (its activations, and its manifest as
/// `edit` leaves it, referencing the fixture checkpoint by absolute path).
fn golden_copy(tmp: &Path, edit: impl FnOnce(&mut Value)) -> PathBuf {
    let src = fixture("tiny_llama3_golden");
    let dst = tmp.join("g");
    std::fs::create_dir_all(dst.join("activations")).expect("mkdir");
    for e in std::fs::read_dir(src.join("activations")).expect("read") {
        let p = e.expect("entry").path();
        std::fs::copy(&p, dst.join("activations").join(p.file_name().unwrap())).expect("copy");
    }
    let mut m: Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("manifest.json")).expect("read"))
            .expect("json");
    m["weights"]["checkpoint"] = Value::from(fixture("tiny_llama3").to_str().unwrap());
    edit(&mut m);
    std::fs::write(dst.join("manifest.json"), m.to_string()).expect("write");
    dst
}

/// A manifest listing a wrong sha256 for one shard.
fn wrong_shard_hash(m: &mut Value) {
    m["weights"]["sha256"]["model-00002-of-00004.safetensors"] = Value::from("00".repeat(32));
}

/// A context whose sink keeps every event, as its `Debug` text.
fn recording() -> (RunContext, Arc<Mutex<Vec<String>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let keep = seen.clone();
    let sink: EventSink =
        Arc::new(move |e: &RunEvent<'_>| keep.lock().unwrap().push(format!("{e:?}")));
    (RunContext::new().with_events(sink), seen)
}

#[test]
fn a_checkpoint_whose_sha256_differs_from_the_manifest_is_refused_naming_the_file() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dst = golden_copy(tmp.path(), wrong_shard_hash);
    let (code, out, err) = parity(&["run", dst.to_str().unwrap(), "--impl", "reference"]);
    assert_eq!(code, Some(2), "{out}\n{err}");
    assert!(err.contains("model-00002-of-00004.safetensors") && err.contains("sha256"), "{err}");
}

#[test]
fn a_skipped_sha256_check_runs_a_checkpoint_that_differs_and_warns_the_sink_and_the_output() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let golden = Dump::open(&golden_copy(tmp.path(), wrong_shard_hash)).expect("open");
    let verified = RunOptions::new(Implementation::Reference);
    let err = model::run(&golden, &verified).err().expect("refused").to_string();
    assert!(err.contains("model-00002-of-00004.safetensors"), "{err}");
    let (ctx, seen) = recording();
    let skipped = verified.with_context(ctx.with_sha256(Sha256Check::Skip));
    let out = model::run(&golden, &skipped).expect("run");
    assert_eq!(out.warnings.len(), 1, "{:?}", out.warnings);
    assert!(
        out.warnings[0].ends_with("tiny_llama3: sha256 check skipped (LLAMA_PARITY_SKIP_SHA256=1)")
    );
    let seen = seen.lock().unwrap();
    assert_eq!(seen[0], format!("Warning {{ text: {:?} }}", out.warnings[0]));
}

#[test]
fn a_manifest_that_lists_no_sha256_runs_with_a_warning_and_the_cli_prints_it() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dst = golden_copy(tmp.path(), |m| m["weights"]["sha256"] = serde_json::json!({}));
    let golden = Dump::open(&dst).expect("open");
    let out = model::run(&golden, &RunOptions::new(Implementation::Reference)).expect("run");
    let note = "tiny_llama3: the manifest lists no sha256; checkpoint not verified";
    assert!(out.warnings.len() == 1 && out.warnings[0].ends_with(note), "{:?}", out.warnings);
    let (code, _, err) = parity(&["run", dst.to_str().unwrap(), "--impl", "reference"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(err.lines().any(|l| l.starts_with("parity: /") && l.ends_with(note)), "{err}");
}

#[test]
fn a_run_is_bit_identical_on_one_and_two_threads() {
    let golden = Dump::open(&fixture("tiny_llama3_golden")).expect("open");
    let opts = RunOptions::new(Implementation::Reference);
    let run_on = |threads: usize| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .expect("pool")
            .install(|| model::run(&golden, &opts).expect("run").dump)
    };
    let (one, two) = (run_on(1), run_on(2));
    let mut compared = 0;
    for &step in &golden.manifest.steps {
        for site in one.sites(step) {
            let a = one.get(step, site).expect("get").expect("site");
            let b = two.get(step, site).expect("get").expect("site");
            assert_eq!(a.bytes(), b.bytes(), "{step}/{site}");
            compared += 1;
        }
    }
    assert_eq!(compared, 4 * (7 + 4 * 14));
}

/// Runs made with one context share the checkpoint their golden references: the second
/// run reads the mapping the first made (the same pages, not a second mapping of the
/// files) and computes the same bits; a checkpoint whose files changed is opened again.
#[test]
fn runs_sharing_a_context_share_the_checkpoint_mapping_until_its_files_change() {
    use llama_parity::model::context::CheckpointCache;
    let tmp = tempfile::tempdir().expect("tmp");
    let ckpt = tmp.path().join("ckpt");
    copy_tree(&fixture("tiny_llama3"), &ckpt);
    let cache = CheckpointCache::default();
    let open = |cache: &CheckpointCache| cache.open(&ckpt, HfCheckpoint::open).expect("open");
    let key = "model.layers.0.mlp.down_proj.weight";
    let at = |c: &HfCheckpoint| c.get(key).expect("tensor").bytes().as_ptr() as usize;
    let (a, b) = (open(&cache), open(&cache));
    assert_eq!(at(&a), at(&b), "the second open maps the files again");
    assert_ne!(at(&a), at(&HfCheckpoint::open(&ckpt).expect("open")), "a fresh open shares");
    // The same bytes written anew: another inode and modification time.
    let shard = a.file_of(key).to_path_buf();
    let bytes = std::fs::read(&shard).expect("read");
    std::fs::remove_file(&shard).expect("rm");
    std::fs::write(&shard, bytes).expect("write");
    assert_ne!(at(&open(&cache)), at(&a), "a changed checkpoint is opened again");

    let golden = Dump::open(&fixture("tiny_llama3_golden")).expect("open");
    let run = |ctx: &RunContext| {
        let opts = RunOptions::new(Implementation::Reference).with_context(ctx.clone());
        model::run(&golden, &opts).expect("run").dump
    };
    let shared = RunContext::new().with_shared_checkpoints();
    let (one, two, alone) = (run(&shared), run(&shared), run(&RunContext::new()));
    let mut compared = 0;
    for &step in &golden.manifest.steps {
        for site in one.sites(step) {
            let get = |d: &Dump| d.get(step, site).expect("get").expect("site").bytes().to_vec();
            assert_eq!(get(&one), get(&alone), "{step}/{site}");
            assert_eq!(get(&two), get(&alone), "{step}/{site}");
            compared += 1;
        }
    }
    assert!(compared > 100, "{compared}");
}
