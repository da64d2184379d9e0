//! Training benchmark: the float64 reference's one training step (CONTRACT §6) on a
//! real-shape random-weight model against PyTorch's own forward + backward of the same
//! LoRA step, measured in the same run with the same thread count.
//!
//! The model is the Llama-3-8B shape with 2 decoder layers (`benches/scenarios/
//! llama3_8b_2layer_f32.json`, the scale benchmark's: vocabulary 32000), adapter-only
//! training (PEFT LoRA r 16 on every projection), one row of 128 prefill tokens. The
//! checkpoint, the adapter and the training golden are made at run time by
//! `benches/torch_train.py make` under `target/train-bench/` (never committed);
//! PyTorch's step is timed by `benches/torch_train.py time` (forward and
//! `loss.backward()`, load excluded, best of `TRAIN_REPEAT`, default 2), the harness's
//! step in this process (`model::run` with the reference: weights mapped, forward,
//! backward, clipping, AdamW and the in-memory dump of every site, best of the same
//! count). Peak memory: PyTorch's `ru_maxrss`, this process's `VmHWM`. The simulated
//! Ascend step at bfloat16 is timed after (its peak memory includes the reference's).
//!
//! `cargo bench --bench train`; `TRAIN_SCENARIO` picks another scenario file,
//! `TRAIN_THREADS` the thread count of both sides (default: the cores available).
//! Needs the golden venv (`GOLDEN_PYTHON`, default
//! `~/.cache/llama-parity/golden-venv/bin/python`; `pip install -r golden/requirements.txt`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use llama_parity::contract::site::{Site, Step};
use llama_parity::dump::{Dump, Precision};
use llama_parity::model::{self, Implementation, RunOptions};

/// This process's peak resident set (`VmHWM`), bytes.
fn peak_rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|kb| kb.parse::<u64>().ok()))
        })
        .map_or(0, |kb| kb * 1024)
}

fn python(python: &str, args: &[&str], root: &Path) -> serde_json::Value {
    let out = Command::new(python)
        .current_dir(root)
        .arg(root.join("benches/torch_train.py"))
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("{python}: {e} (set GOLDEN_PYTHON to the golden venv's python)")
        });
    assert!(
        out.status.success(),
        "torch_train.py {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().rev().find(|l| l.starts_with('{')).expect("a JSON line");
    serde_json::from_str(line).expect("JSON")
}

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let python_bin = std::env::var("GOLDEN_PYTHON").unwrap_or_else(|_| {
        let home = std::env::var("HOME").unwrap_or_default();
        format!("{home}/.cache/llama-parity/golden-venv/bin/python")
    });
    let scenario = std::env::var("TRAIN_SCENARIO")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root.join("benches/scenarios/llama3_8b_2layer_f32.json"));
    let repeat: usize =
        std::env::var("TRAIN_REPEAT").ok().and_then(|v| v.parse().ok()).unwrap_or(2);
    let threads: usize = std::env::var("TRAIN_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let stem = scenario.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let scratch = root.join("target/train-bench").join(&stem);
    let golden_dir = scratch.join("golden");
    if !golden_dir.join("manifest.json").is_file() {
        let t = Instant::now();
        let made = python(
            &python_bin,
            &[
                "make",
                "--scenario",
                &scenario.to_string_lossy(),
                "--out",
                &scratch.to_string_lossy(),
            ],
            &root,
        );
        println!("made {} in {:.1} s: {made}", scratch.display(), t.elapsed().as_secs_f64());
    }

    let torch = python(
        &python_bin,
        &[
            "time",
            "--out",
            &scratch.to_string_lossy(),
            "--threads",
            &threads.to_string(),
            "--repeat",
            &repeat.to_string(),
        ],
        &root,
    );
    let torch_s = torch["seconds"].as_f64().expect("seconds");
    let torch_loss = torch["loss"].as_f64().expect("loss");
    let torch_rss = torch["peak_rss_bytes"].as_f64().expect("peak_rss_bytes");

    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("thread pool");
    let golden = Dump::open(&golden_dir).unwrap_or_else(|e| panic!("{e}"));
    let opts = RunOptions::new(Implementation::Reference);
    let (mut best, mut loss) = (f64::INFINITY, f64::NAN);
    for _ in 0..repeat.max(1) {
        let t = Instant::now();
        let out = pool.install(|| model::run(&golden, &opts)).unwrap_or_else(|e| panic!("{e}"));
        best = best.min(t.elapsed().as_secs_f64());
        let l = out.dump.get(Step::Train, &Site::Loss).expect("read").expect("loss");
        loss = l.to_f64_vec()[0];
    }
    let rss = peak_rss() as f64;
    let bf16 = RunOptions::new(Implementation::Ascend).with_precision(Precision::Bf16);
    let mut ascend = f64::INFINITY;
    for _ in 0..repeat.max(1) {
        let t = Instant::now();
        pool.install(|| model::run(&golden, &bf16)).unwrap_or_else(|e| panic!("{e}"));
        ascend = ascend.min(t.elapsed().as_secs_f64());
    }
    let rss_all = peak_rss() as f64;
    let gib = |b: f64| b / (1u64 << 30) as f64;
    let ratio = best / torch_s;
    println!("training step, {stem}, adapter-only, {threads} threads, best of {repeat}");
    println!("{:<44} {:>9} {:>9} {:>10}", "run", "time s", "x torch", "peak GiB");
    println!(
        "{:<44} {:>9.2} {:>9.2} {:>10.2}",
        "pytorch forward + backward (f32)",
        torch_s,
        1.0,
        gib(torch_rss)
    );
    println!(
        "{:<44} {:>9.2} {:>9.2} {:>10.2}",
        "reference step (f64, clip, AdamW, dump)",
        best,
        ratio,
        gib(rss)
    );
    println!(
        "{:<44} {:>9.2} {:>9.2} {:>10.2}",
        "ascend step (bf16 simulated, after the above)",
        ascend,
        ascend / torch_s,
        gib(rss_all)
    );
    println!(
        "loss: pytorch {torch_loss:.7}, reference {loss:.7} (rel {:.1e}); goal ≤ 3x: {}",
        ((loss - torch_loss) / torch_loss).abs(),
        if ratio <= 3.0 { "met" } else { "not met" }
    );
}
