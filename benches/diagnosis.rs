//! Benchmark: how long the diagnosis of a divergence takes on the tiny goldens, against
//! a baseline measured in the same run (one comparison of the same candidate, and one
//! simulated run). The goal is under 2 s per diagnosis of a tiny golden.
//!
//! Run: `cargo bench --bench diagnosis`

use std::path::Path;
use std::time::{Duration, Instant};

use llama_parity::compare::compare;
use llama_parity::compare::tolerance::Policy;
use llama_parity::contract::fault::ScopedFault;
use llama_parity::dump::{Dump, Precision};
use llama_parity::model::{self, Implementation, RunOptions};
use llama_parity::pipeline::{self, Options};

/// Median wall time of `n` calls of `f`.
fn median(n: usize, mut f: impl FnMut()) -> Duration {
    let mut v: Vec<Duration> = (0..n)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .collect();
    v.sort();
    v[n / 2]
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let policy = Policy::default();
    println!(
        "{:<14} {:<44} {:>12} {:>12} {:>12} {:>10} {:>10}",
        "golden", "candidate", "compare", "one run", "diagnosis", "x compare", "x run"
    );
    let mut worst = Duration::ZERO;
    for (golden, spec, precision) in [
        ("mha_f32", "rope.pos_reset", Precision::F32),
        ("gqa_pad_f32", "mask.padding_ignored", Precision::Bf16),
        ("mqa_tied_f32", "kv.wrong_slot", Precision::Bf16),
        ("llama3_f32", "rope.wrong_theta", Precision::F32),
        ("gqa_pad_f32", "kv.stale@layers=1", Precision::Bf16),
        ("gqa_pad_f32", "weights.transposed@component=o_proj", Precision::Bf16),
        ("llama3_f32", "rope.wrong_theta@theta=500000", Precision::F32),
    ] {
        let fault = ScopedFault::parse(spec).expect("fault");
        let g = Dump::open(&root.join("golden").join(golden)).expect("golden");
        let opts = |faults: Vec<ScopedFault>| {
            RunOptions::new(Implementation::Ascend).with_precision(precision).with_faults(faults)
        };
        let cand = model::run(&g, &opts(vec![fault])).expect("run").dump;
        let t_cmp = median(5, || {
            compare(&g, &cand, &policy).expect("compare");
        });
        let t_run = median(5, || {
            model::run(&g, &opts(vec![])).expect("run");
        });
        let mut top = String::new();
        let t_diag = median(3, || {
            let r = pipeline::check(&g, &cand, None, &Options::new(&policy)).expect("check");
            top = r.diagnosis.first().map(|f| f.label()).unwrap_or_else(|| "-".into());
        });
        worst = worst.max(t_diag);
        println!(
            "{:<14} {:<44} {:>10.1}ms {:>10.1}ms {:>10.1}ms {:>9.1}x {:>9.1}x   top: {top}",
            golden,
            format!("{spec} {precision}"),
            t_cmp.as_secs_f64() * 1e3,
            t_run.as_secs_f64() * 1e3,
            t_diag.as_secs_f64() * 1e3,
            t_diag.as_secs_f64() / t_cmp.as_secs_f64(),
            t_diag.as_secs_f64() / t_run.as_secs_f64(),
        );
    }
    println!("\nslowest diagnosis: {:.3} s (goal: under 2 s)", worst.as_secs_f64());
}
