//! Every fault of CONTRACT §3 planted in the ascend implementation at bfloat16 on every
//! committed golden: where the fault can show, the run fails and its first divergence is
//! the site `diagnosis::first_site` names (the one table of where each fault acts);
//! where it cannot, the run passes, and the reason is printed. `mask.fp16_overflow` is
//! also planted at float16, the only dtype where its fill overflows.
//!
//! Each run is judged twice: by the fixed per-dtype defaults and with the golden's noise
//! floor in the thresholds (`compare::floor`); both must agree on the verdict and the
//! first divergence, and each cell also gives the error there in floors.
//!
//! The matrix is printed (`cargo test --release --test main fault_matrix -- --nocapture`) and
//! reproduced in docs/ascend.md.

use std::path::PathBuf;

use llama_parity::compare::floor::NoiseFloor;
use llama_parity::compare::tolerance::Policy;
use llama_parity::compare::{compare, compare_with_floor, Verdict};
use llama_parity::contract::fault::Fault;
use llama_parity::diagnosis::{first_site, Visibility};
use llama_parity::dump::{Dump, Precision};
use llama_parity::model::{self, Implementation, RunOptions};

use crate::helpers::GOLDENS;

/// Faults whose effect at bfloat16 is below bfloat16's tolerance (rel-L2 0.05) on every
/// committed golden, measured by this test (the printed rel-L2 is at the site where the
/// fault acts; the run passes).
const BELOW_BF16_RESOLUTION: [(Fault, &str); 4] = [
    (Fault::RopeLowPrecisionAngles, "float16 angles err by < 1e-2 rad at positions < 20"),
    (Fault::NormEpsOutside, "eps (1e-5, 1e-6) is far below mean(x²)"),
    (Fault::NormNoUpcast, "a bf16 variance moves each row's scale by < 2^-8"),
    (Fault::AttnSoftmaxLowPrecision, "bf16 exps and sums move probs by < 1%"),
];

fn golden(name: &str) -> Dump {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("golden").join(name);
    assert!(dir.is_dir(), "golden dump {} is missing", dir.display());
    Dump::open(&dir).unwrap_or_else(|e| panic!("{e}"))
}

/// Runs `fault` at `precision` on `g` and returns (verdict, first divergence, rel-L2 there
/// or at `at` when it passed, that error in floors); the verdict and first divergence
/// with `floor` in the thresholds must be the same, else the difference is in `problems`.
fn plant(
    g: &Dump,
    fault: Fault,
    precision: Precision,
    at: Option<&(llama_parity::contract::site::Step, llama_parity::contract::site::Site)>,
    floor: &NoiseFloor,
    problems: &mut Vec<String>,
) -> (Verdict, Option<String>, f64, f64) {
    let opts = RunOptions {
        implementation: Implementation::Ascend,
        precision: Some(precision),
        faults: vec![fault.into()],
        teacher_force: false,
    };
    let out = model::run(g, &opts).unwrap_or_else(|e| panic!("{}: {e}", fault.id()));
    let cmp = compare(g, &out.dump, &Policy::default()).unwrap_or_else(|e| panic!("{e}"));
    let first = cmp.first_divergence().map(|s| format!("{} {}", s.step, s.site));
    let site = match cmp.first_divergence() {
        Some(s) => Some(s),
        None => at.and_then(|(st, si)| cmp.sites.iter().find(|s| s.step == *st && &s.site == si)),
    };
    let e = site.and_then(|s| s.metrics.as_ref()).map_or(f64::NAN, |m| m.error());
    let x = site.and_then(|s| floor.get(s.step, &s.site)).map_or(f64::NAN, |f| f.times(e));
    let floored = compare_with_floor(g, &out.dump, &Policy::default(), Some(floor))
        .unwrap_or_else(|e| panic!("{e}"));
    let first_f = floored.first_divergence().map(|s| format!("{} {}", s.step, s.site));
    if (floored.verdict(), &first_f) != (cmp.verdict(), &first) {
        problems.push(format!(
            "{} at {precision}: with the floor {:?} at {first_f:?}, without {:?} at {first:?}",
            fault.id(),
            floored.verdict(),
            cmp.verdict()
        ));
    }
    (cmp.verdict(), first, e, x)
}

#[test]
fn every_fault_fails_at_its_first_site_on_every_golden_that_can_show_it() {
    let mut problems = Vec::new();
    println!("| fault | {} |", GOLDENS.join(" | "));
    println!("|---|{}", "---|".repeat(GOLDENS.len()));
    let goldens: Vec<Dump> = GOLDENS.iter().map(|n| golden(n)).collect();
    let floors = |p: Precision| -> Vec<NoiseFloor> {
        goldens
            .iter()
            .map(|g| NoiseFloor::measure(g, p, "").expect("floor").expect("weights"))
            .collect()
    };
    let (bf16_floors, f16_floors) = (floors(Precision::Bf16), floors(Precision::F16));
    let mut cases: Vec<(Fault, Precision)> =
        Fault::ALL.iter().map(|&f| (f, Precision::Bf16)).collect();
    cases.push((Fault::MaskFp16Overflow, Precision::F16));
    for (fault, precision) in cases {
        let mut cells = Vec::new();
        for (k, (name, g)) in GOLDENS.iter().zip(&goldens).enumerate() {
            let floor = if precision == Precision::F16 { &f16_floors[k] } else { &bf16_floors[k] };
            let expected = first_site(fault, &g.manifest, precision);
            let below = BELOW_BF16_RESOLUTION
                .iter()
                .find(|(f, _)| *f == fault && precision == Precision::Bf16);
            let at = match &expected {
                Visibility::Shows(st, si) => Some((*st, si.clone())),
                Visibility::CannotShow(_) => None,
            };
            let (verdict, first, e, x) =
                plant(g, fault, precision, at.as_ref(), floor, &mut problems);
            let cell = match (&expected, below) {
                (Visibility::CannotShow(why), _) => {
                    if verdict != Verdict::Pass {
                        problems.push(format!(
                            "{} on {name}: expected no effect ({why}) but failed at {first:?}",
                            fault.id()
                        ));
                    }
                    format!("— ({why})")
                }
                (Visibility::Shows(..), Some((_, why))) => {
                    if verdict != Verdict::Pass {
                        problems.push(format!("{} on {name}: listed below bf16 resolution but failed at {first:?} ({e:.2e})", fault.id()));
                    }
                    format!("below resolution ({e:.1e}, {x:.1} x floor: {why})")
                }
                (Visibility::Shows(st, si), None) => {
                    let want = format!("{st} {si}");
                    if first.as_deref() != Some(want.as_str()) {
                        problems.push(format!("{} on {name}: expected first divergence {want}, got {first:?} ({e:.2e})", fault.id()));
                    }
                    format!("`{want}` ({e:.1e}, {x:.0} x floor)")
                }
            };
            cells.push(cell);
        }
        let label = if precision == Precision::Bf16 {
            fault.id().to_string()
        } else {
            format!("{} @{}", fault.id(), precision)
        };
        println!("| {label} | {} |", cells.join(" | "));
    }
    assert!(problems.is_empty(), "{} mismatches:\n{}", problems.len(), problems.join("\n"));
}
