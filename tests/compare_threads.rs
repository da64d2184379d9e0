//! The comparison spreads sites over threads; its numbers must not depend on how many:
//! every metric, per-token and per-head value and histogram bit-identical between a
//! pool of 1 thread and one of 4.

use llama_parity::compare::tolerance::Policy;
use llama_parity::compare::{compare, Comparison};
use llama_parity::dump::{Dump, Precision};
use llama_parity::model::{self, Implementation, RunOptions};

use crate::helpers::root;

fn in_pool(threads: usize, f: impl FnOnce() -> Comparison + Send) -> Comparison {
    rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("pool").install(f)
}

/// Every measured number of every site, as bits.
fn fingerprint(c: &Comparison) -> Vec<String> {
    let bits = |v: &Option<Vec<f64>>| {
        v.as_ref().map(|v| v.iter().map(|x| x.to_bits()).collect::<Vec<u64>>())
    };
    c.sites
        .iter()
        .map(|s| {
            let m = match s.metrics.as_ref().and_then(|m| m.values()) {
                Some(m) => format!(
                    "{:?}",
                    [
                        m.cosine,
                        m.max_abs,
                        m.max_rel,
                        m.mean_abs,
                        m.rel_l2,
                        m.rmse,
                        m.nmse,
                        m.pearson,
                        m.snr_db,
                        m.max_ulp,
                        m.one_thousandth_ratio,
                        m.five_thousandths_ratio,
                    ]
                    .map(f64::to_bits)
                ),
                None => format!("{:?}", s.metrics),
            };
            format!(
                "{} {} {:?} {m} {:?} {:?} {:?}",
                s.step,
                s.site,
                s.status,
                bits(&s.per_token),
                bits(&s.per_head),
                s.abs_histogram
            )
        })
        .collect()
}

#[test]
fn metrics_are_bit_identical_between_1_and_4_threads() {
    let golden = Dump::open(&root().join("golden/gqa_pad_f32")).expect("golden");
    let policy = Policy::default();
    // A passing bfloat16 run (value sites, padding, heads) and a failing HF-made
    // candidate (histograms of failing sites).
    let run = RunOptions::new(Implementation::Ascend).with_precision(Precision::Bf16);
    let bf16 = model::run(&golden, &run).expect("run").dump;
    let faulty =
        Dump::open(&root().join("fixtures/candidates/gqa_pad_f32__rope_pos_reset")).expect("cand");
    for (name, cand) in [("ascend bf16", &bf16), ("rope_pos_reset", &faulty)] {
        let one = in_pool(1, || compare(&golden, cand, &policy).expect("compare"));
        let four = in_pool(4, || compare(&golden, cand, &policy).expect("compare"));
        assert!(one.sites.iter().any(|s| s.per_head.is_some()), "{name}: heads measured");
        assert_eq!(fingerprint(&one), fingerprint(&four), "{name}: 1 vs 4 threads");
    }
    let faulty_one = in_pool(1, || compare(&golden, &faulty, &policy).expect("compare"));
    assert!(faulty_one.sites.iter().any(|s| s.abs_histogram.is_some()), "a failing site");
}
