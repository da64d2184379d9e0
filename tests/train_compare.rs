//! Comparing one training step (CONTRACT §6): every site judged in compute order, the
//! refusal of a compare of different steps, the skipped overflow step, and the diagnosis
//! of the eight `train.*` faults and of a forward fault inside a training step.
//!
//! The synthetic step is built from real numbers: the forward of the committed
//! `gqa_pad_f32` golden (HF's own prefill, its weights beside it), its loss recomputed
//! from HF's logits, pseudo-random activation and parameter gradients (fixed seeds), and
//! the tail of the step (global norm, clipping, AdamW's first step) computed here in
//! float32 the way PyTorch's `clip_grad_norm_` and `AdamW` do it. Each fault is planted
//! into a copy by recomputing that tail the faulty way. The HF-made training goldens and
//! candidates under `fixtures/train`, where present, are judged as a confusion matrix.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use llama_parity::compare::tolerance::Policy;
use llama_parity::contract::fault::Fault;
use llama_parity::contract::site::{LayerPart, Site, Step};
use llama_parity::dump::{DType, Dump, Tensor};
use llama_parity::model::{self, Implementation, RunOptions};
use llama_parity::pipeline::{self, Floor, Options};
use llama_parity::report::Report;
use parity_testkit::unit;

use crate::helpers::{parity, report_json, root};

const LR: f64 = 1e-3;
const BETAS: (f64, f64) = (0.9, 0.999);
const EPS: f64 = 1e-8;
const WD: f64 = 0.1;

/// The step's configuration.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Setup {
    /// 1: no loss scale.
    loss_scale: f64,
    micro_batches: usize,
    /// A gradient overflowed: the golden skips the step.
    overflow: bool,
}

const PLAIN: Setup = Setup { loss_scale: 1.0, micro_batches: 1, overflow: false };

/// What a candidate does differently from the golden.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Plant {
    None,
    /// Every float value moved by a relative 1e-7 (float32 rounding of another order).
    Rounding,
    Train(Fault),
    /// Outside §6: the learning rate doubled.
    OtherLrDoubled,
    /// Outside §6: one parameter's gradient with its sign flipped.
    OtherGradSign,
    /// A forward fault (§3): the forward is the reference's with it planted.
    Forward(Fault),
}

/// One trainable parameter: shape, weight before the step, gradient before clipping.
struct Param {
    name: String,
    shape: Vec<usize>,
    weight: Vec<f64>,
    grad: Vec<f64>,
}

/// The numbers a step is written from.
struct Base {
    golden_dir: PathBuf,
    manifest: serde_json::Value,
    labels: Vec<Vec<i64>>,
    forward: Vec<(Site, Tensor)>,
    params: Vec<Param>,
    max_grad_norm: f64,
}

fn base() -> Base {
    let golden_dir = root().join("golden/gqa_pad_f32");
    let golden = Dump::open(&golden_dir).expect("gqa_pad_f32");
    let sc = &golden.manifest.scenario;
    let labels: Vec<Vec<i64>> = sc
        .input_ids
        .iter()
        .zip(&sc.attention_mask)
        .map(|(ids, m)| ids.iter().zip(m).map(|(&t, &m)| if m == 0 { -100 } else { t }).collect())
        .collect();
    let forward = golden
        .sites(Step::Prefill)
        .iter()
        .filter(|s| !matches!(s, Site::Layer(_, LayerPart::KCache | LayerPart::VCache)))
        .map(|s| (s.clone(), golden.get(Step::Prefill, s).unwrap().unwrap()))
        .collect();
    let weights = golden.weights().unwrap().expect("weights.safetensors");
    let mut names: Vec<String> = weights.keys().map(str::to_string).collect();
    names.sort_by(|a, b| {
        llama_parity::contract::site::parameter_order(a)
            .cmp(&llama_parity::contract::site::parameter_order(b))
            .then(a.cmp(b))
    });
    let params: Vec<Param> = names
        .iter()
        .enumerate()
        .map(|(k, name)| {
            let w = weights.get(name).unwrap();
            // Gradients of different sizes per parameter, so that clipping each by its
            // own norm differs from clipping by the global one.
            let scale = 1e-2 * (1.0 + k as f64);
            let grad = (0..w.numel())
                .map(|i| scale * unit(0x7a11 << 32 ^ (k as u64) << 24 ^ i as u64))
                .collect();
            Param { name: name.clone(), shape: w.shape().to_vec(), weight: w.to_f64_vec(), grad }
        })
        .collect();
    let norm = params.iter().flat_map(|p| &p.grad).map(|x| x * x).sum::<f64>().sqrt();
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(golden_dir.join("manifest.json")).unwrap())
            .unwrap();
    Base {
        golden_dir,
        manifest,
        labels,
        forward,
        params,
        max_grad_norm: (norm * 0.5 * 1e3).round() / 1e3,
    }
}

/// HF's loss (labels shifted inside, -100 ignored, the mean of the micro-batch means),
/// or the faulty ones: unshifted, or the -100 positions counted.
fn loss(
    logits: &Tensor,
    labels: &[Vec<i64>],
    micro: usize,
    shifted: bool,
    count_ignored: bool,
) -> f64 {
    let &[b, p, v] = logits.shape() else { panic!("logits") };
    let z = logits.to_f64_vec();
    let rows = b / micro;
    let mut total = 0.0;
    for k in 0..micro {
        let (mut sum, mut n) = (0.0, 0.0);
        for bi in k * rows..(k + 1) * rows {
            for t in 0..p {
                let label = if shifted {
                    if t + 1 == p {
                        continue;
                    }
                    labels[bi][t + 1]
                } else {
                    labels[bi][t]
                };
                if label == -100 {
                    if count_ignored {
                        n += 1.0;
                    }
                    continue;
                }
                let row = &z[(bi * p + t) * v..(bi * p + t + 1) * v];
                let lse = row.iter().map(|x| x.exp()).sum::<f64>().ln();
                sum += lse - row[label as usize];
                n += 1.0;
            }
        }
        total += sum / n;
    }
    total / micro as f64
}

/// AdamW's first step in float32, as `torch.optim.AdamW` computes it.
fn adamw(w: f32, g: f32, decay: bool, lr: f32, bias_correction: bool) -> f32 {
    let (b1, b2) = (BETAS.0 as f32, BETAS.1 as f32);
    let p = if decay { w * (1.0 - lr * WD as f32) } else { w };
    let m = (1.0 - b1) * g;
    let v = (1.0 - b2) * g * g;
    if bias_correction {
        let step = lr / (1.0 - b1);
        let denom = v.sqrt() / (1.0 - b2).sqrt() + EPS as f32;
        p - step * m / denom
    } else {
        p - lr * m / (v.sqrt() + EPS as f32)
    }
}

fn no_decay(name: &str) -> bool {
    name.contains("norm")
}

fn f32t(shape: &[usize], v: &[f64]) -> Tensor {
    Tensor::from_f64(shape, v, DType::F32)
}

/// Writes the step `setup` with `plant` into `dir`, with `extra` applied to the
/// manifest's `train` last.
fn write_step(
    base: &Base,
    setup: Setup,
    plant: Plant,
    dir: &Path,
    train_edit: &dyn Fn(&mut serde_json::Value),
) {
    std::fs::create_dir_all(dir).unwrap();
    let mut manifest = base.manifest.clone();
    manifest["steps"] = serde_json::json!(["train"]);
    manifest["scenario"]["decode_ids"] = serde_json::json!([]);
    manifest["scenario"]["name"] = serde_json::json!("gqa_pad_f32 train");
    let scale_kind = if setup.loss_scale == 1.0 {
        "none"
    } else if setup.overflow {
        "dynamic"
    } else {
        "static"
    };
    let mut train = serde_json::json!({
        "labels": base.labels,
        "micro_batches": setup.micro_batches,
        "trainable": "all",
        "optimizer": { "name": "adamw", "lr": LR, "betas": [BETAS.0, BETAS.1], "eps": EPS,
                       "weight_decay": WD, "no_decay": ["*norm*", "*.bias"] },
        "max_grad_norm": base.max_grad_norm,
        "loss_scale": { "kind": scale_kind, "value": setup.loss_scale },
    });
    train_edit(&mut train);
    manifest["train"] = train;
    if matches!(plant, Plant::Forward(_)) {
        manifest["producer"]["framework"] = serde_json::json!("llama-parity reference");
    }
    std::fs::write(dir.join("manifest.json"), serde_json::to_string_pretty(&manifest).unwrap())
        .unwrap();
    std::fs::copy(base.golden_dir.join("weights.safetensors"), dir.join("weights.safetensors"))
        .unwrap();

    let nudge = |v: &mut Vec<f64>, seed: u64| {
        if plant == Plant::Rounding {
            for (i, x) in v.iter_mut().enumerate() {
                *x *= 1.0 + 1e-7 * unit(seed << 32 ^ i as u64);
            }
        }
    };
    let mut tensors: BTreeMap<String, Tensor> = BTreeMap::new();
    let key = |s: &Site| format!("train/{s}");
    // The forward.
    let forward: Vec<(Site, Tensor)> = match plant {
        Plant::Forward(f) => {
            let golden = Dump::open(&base.golden_dir).unwrap();
            let run = model::run(
                &golden,
                &RunOptions::new(Implementation::Reference).with_faults(vec![f.into()]),
            )
            .expect("a run with the fault");
            base.forward
                .iter()
                .map(|(s, _)| (s.clone(), run.dump.get(Step::Prefill, s).unwrap().unwrap()))
                .collect()
        }
        _ => base.forward.iter().map(|(s, t)| (s.clone(), t.clone())).collect(),
    };
    let mut logits = None;
    for (k, (s, t)) in forward.iter().enumerate() {
        let t = if t.dtype().is_float() && !s.is_mask() {
            let mut v = t.to_f64_vec();
            nudge(&mut v, k as u64);
            f32t(t.shape(), &v)
        } else {
            t.clone()
        };
        if *s == Site::LmHead {
            logits = Some(t.clone());
        }
        tensors.insert(key(s), t);
    }
    let logits = logits.expect("lm_head");
    // The loss.
    let (shifted, counted) = match plant {
        Plant::Train(Fault::TrainLabelsUnshifted) => (false, false),
        Plant::Train(Fault::TrainIgnoreIndexCounted) => (true, true),
        _ => (true, false),
    };
    let l = loss(&logits, &base.labels, setup.micro_batches, shifted, counted);
    tensors.insert(key(&Site::Loss), f32t(&[], &[l]));
    // A wrong loss or forward moves every gradient.
    let upstream = match plant {
        Plant::Train(Fault::TrainLabelsUnshifted | Fault::TrainIgnoreIndexCounted)
        | Plant::Forward(_) => 1.3,
        _ => 1.0,
    };
    let factor = match plant {
        Plant::Train(Fault::TrainLossScaleKept) => setup.loss_scale,
        Plant::Train(Fault::TrainMicroBatchesSummed) => setup.micro_batches as f64,
        _ => 1.0,
    };
    // Activation gradients: pseudo-random, of each forward site's shape.
    for (k, (s, t)) in forward.iter().enumerate() {
        if !s.has_grad() {
            continue;
        }
        let mut v: Vec<f64> = (0..t.numel())
            .map(|i| 1e-3 * factor * upstream * unit(0x6ead << 32 ^ (k as u64) << 24 ^ i as u64))
            .collect();
        nudge(&mut v, 1000 + k as u64);
        tensors.insert(key(&Site::Grad(Box::new(s.clone()))), f32t(t.shape(), &v));
    }
    // The tail: global norm, clipping, AdamW.
    let mut grads: Vec<Vec<f64>> = base
        .params
        .iter()
        .enumerate()
        .map(|(k, p)| {
            let mut g: Vec<f64> = p.grad.iter().map(|x| x * factor * upstream).collect();
            if plant == Plant::OtherGradSign && k == 3 {
                g.iter_mut().for_each(|x| *x = -*x);
            }
            nudge(&mut g, 2000 + k as u64);
            g
        })
        .collect();
    if setup.overflow {
        grads[1][5] = f64::INFINITY;
    }
    let norm32 = |v: &[f64]| v.iter().map(|&x| (x as f32) * (x as f32)).sum::<f32>().sqrt();
    let total = grads.iter().map(|g| norm32(g).powi(2)).sum::<f32>().sqrt();
    tensors.insert(key(&Site::GradNorm), f32t(&[], &[f64::from(total)]));
    let skipped = !total.is_finite();
    let max = base.max_grad_norm as f32;
    let clip = |n: f32| (max / (n + 1e-6)).min(1.0);
    let lr = if plant == Plant::OtherLrDoubled { 2.0 * LR as f32 } else { LR as f32 };
    for (p, g) in base.params.iter().zip(&grads) {
        let coef = if skipped {
            1.0
        } else if plant == Plant::Train(Fault::TrainClipPerParameter) {
            clip(norm32(g))
        } else {
            clip(total)
        };
        let pg: Vec<f32> = g.iter().map(|&x| x as f32 * coef).collect();
        let pg64: Vec<f64> = pg.iter().map(|&x| f64::from(x)).collect();
        tensors.insert(key(&Site::ParamGrad(p.name.clone())), f32t(&p.shape, &pg64));
        let decay = plant == Plant::Train(Fault::TrainWeightDecayEverywhere) || !no_decay(&p.name);
        let bias = plant != Plant::Train(Fault::TrainAdamNoBiasCorrection);
        let applied = plant == Plant::Train(Fault::TrainOverflowApplied);
        let upd: Vec<f64> = p
            .weight
            .iter()
            .zip(&pg)
            .map(|(&w, &g)| {
                if skipped && !applied {
                    w
                } else {
                    // An applied overflow step: the finite gradients move their weights.
                    let g = if g.is_finite() { g } else { 0.0 };
                    f64::from(adamw(w as f32, g, decay, lr, bias))
                }
            })
            .collect();
        tensors.insert(key(&Site::Update(p.name.clone())), f32t(&p.shape, &upd));
    }
    llama_parity::dump::safetensors::write(&dir.join("activations.safetensors"), &tensors, None)
        .unwrap();
}

/// Judges `candidate` against `golden` by the default policy, no floor, diagnosed.
fn check(golden: &Path, candidate: &Path) -> Report {
    let policy = Policy::default();
    let opts = Options { floor: Floor::Off, ..Options::new(&policy) };
    let g = Dump::open(golden).expect("golden");
    let c = Dump::open(candidate).expect("candidate");
    pipeline::check(&g, &c, None, &opts).expect("check")
}

fn first_site(r: &Report) -> String {
    r.first_divergence.as_ref().map_or_else(|| "none".into(), |f| f.site.to_string())
}

fn top(r: &Report) -> String {
    r.diagnosis.first().map_or_else(|| "—".into(), |f| f.fault.clone())
}

/// The steps each training fault shows on, by the facts of the fault.
fn setup_for(f: Fault) -> Setup {
    match f {
        Fault::TrainLossScaleKept => Setup { loss_scale: 1024.0, ..PLAIN },
        Fault::TrainMicroBatchesSummed => Setup { micro_batches: 2, ..PLAIN },
        Fault::TrainOverflowApplied => Setup { loss_scale: 65536.0, overflow: true, ..PLAIN },
        _ => PLAIN,
    }
}

#[test]
fn a_correct_step_passes_at_every_site_in_compute_order_and_reports_loss_and_norm() {
    let base = base();
    let tmp = tempfile::tempdir().unwrap();
    let (g, c) = (tmp.path().join("golden"), tmp.path().join("rounded"));
    write_step(&base, PLAIN, Plant::None, &g, &|_| {});
    write_step(&base, PLAIN, Plant::Rounding, &c, &|_| {});
    for cand in [&g, &c] {
        let r = check(&g, cand);
        let bad: Vec<String> = r
            .sites
            .iter()
            .filter(|e| e.status != llama_parity::compare::Status::Pass)
            .map(|e| format!("{} {:?} {:?}", e.site, e.status, e.note))
            .collect();
        assert!(bad.is_empty(), "{bad:?}");
        assert_eq!(r.verdict, llama_parity::compare::Verdict::Pass);
        let names: Vec<String> = r.sites.iter().map(|e| e.site.to_string()).collect();
        let at = |n: &str| names.iter().position(|x| x == n).unwrap_or_else(|| panic!("{n}"));
        assert!(at("lm_head") < at("loss") && at("loss") < at("grad.lm_head"));
        assert!(at("grad.model.embed_tokens") < at("grad_norm"));
        assert!(at("param_grad.lm_head.weight") < at("update.model.embed_tokens.weight"));
        let t = r.train.as_ref().expect("train facts");
        assert!(t.loss.golden.unwrap() > 1.0 && t.loss.rel_err.unwrap() < 1e-6, "{:?}", t.loss);
        assert_eq!(t.skipped.golden, Some(false));
        assert_eq!(t.param_grads.len(), base.params.len());
        assert!(t.param_grads.iter().all(|p| (p.norm_ratio.unwrap() - 1.0).abs() < 1e-5));
    }
    // Updates are judged as their change from the weight, at the backward thresholds.
    let r = check(&g, &c);
    let up = r.sites.iter().find(|e| e.site.to_string() == "update.model.norm.weight").unwrap();
    assert!(up.note.as_deref().unwrap_or("").contains("change"), "{:?}", up.note);
    let tol = |n: &str| {
        r.sites.iter().find(|e| e.site.to_string() == n).unwrap().tolerance.unwrap().max_rel_l2
    };
    assert_eq!(tol("model.layers.1.mlp"), 1e-4);
    assert_eq!(tol("grad.lm_head"), 2e-4);
    assert_eq!(tol("grad.model.embed_tokens"), 4e-4);
    assert_eq!(tol("update.lm_head.weight"), 4e-4);
    // Padding query rows (row 0's first three tokens) are left out of grad sites too.
    let g_dump = Dump::open(&g).unwrap();
    let site = Site::parse("grad.model.layers.0.mlp");
    let t = g_dump.get(Step::Train, &site).unwrap().unwrap();
    let mut v = t.to_f64_vec();
    v[0] += 1e3; // batch 0, token 0: padding
    let mut tensors = BTreeMap::new();
    for s in g_dump.sites(Step::Train) {
        let tt = g_dump.get(Step::Train, s).unwrap().unwrap();
        let tt = if *s == site { f32t(t.shape(), &v) } else { tt };
        tensors.insert(format!("train/{s}"), tt);
    }
    let padded = tmp.path().join("padding");
    std::fs::create_dir_all(&padded).unwrap();
    std::fs::copy(g.join("manifest.json"), padded.join("manifest.json")).unwrap();
    llama_parity::dump::safetensors::write(&padded.join("activations.safetensors"), &tensors, None)
        .unwrap();
    assert_eq!(check(&g, &padded).verdict, llama_parity::compare::Verdict::Pass);
}

#[test]
fn a_compare_of_different_steps_exits_2_naming_both() {
    let base = base();
    let tmp = tempfile::tempdir().unwrap();
    let g = tmp.path().join("golden");
    write_step(&base, PLAIN, Plant::None, &g, &|_| {});
    let inference = root().join("golden/gqa_pad_f32");
    let other_lr = tmp.path().join("lr");
    write_step(&base, PLAIN, Plant::None, &other_lr, &|t| {
        t["optimizer"]["lr"] = serde_json::json!(2e-3)
    });
    let other_labels = tmp.path().join("labels");
    write_step(&base, PLAIN, Plant::None, &other_labels, &|t| {
        t["labels"][0][4] = serde_json::json!(-100)
    });
    let micro = tmp.path().join("micro");
    write_step(&base, PLAIN, Plant::None, &micro, &|t| t["micro_batches"] = serde_json::json!(2));
    let (gs, is) = (g.to_str().unwrap(), inference.to_str().unwrap());
    for (a, b, what) in [
        (gs, is, "inference run"),
        (is, gs, "inference run"),
        (gs, other_lr.to_str().unwrap(), "train.optimizer"),
        (gs, other_labels.to_str().unwrap(), "train.labels"),
        (gs, micro.to_str().unwrap(), "train.micro_batches"),
    ] {
        let (code, _, err) = parity(&["compare", a, b, "--no-floor"]);
        assert_eq!(code, Some(2), "{a} vs {b}: {err}");
        assert!(err.contains(what), "{err}");
        assert!(err.contains(a) || err.contains(b), "names the dumps: {err}");
    }
}

#[test]
fn a_skipped_step_passes_when_reproduced_and_fails_at_the_first_update_when_applied() {
    let base = base();
    let tmp = tempfile::tempdir().unwrap();
    let setup = setup_for(Fault::TrainOverflowApplied);
    let (g, applied) = (tmp.path().join("golden"), tmp.path().join("applied"));
    write_step(&base, setup, Plant::None, &g, &|_| {});
    write_step(&base, setup, Plant::Train(Fault::TrainOverflowApplied), &applied, &|_| {});
    let r = check(&g, &g);
    assert_eq!(r.verdict, llama_parity::compare::Verdict::Pass);
    let gn = r.sites.iter().find(|e| e.site == Site::GradNorm).unwrap();
    assert_eq!(
        gn.status,
        llama_parity::compare::Status::Skipped,
        "non-finite on both sides: {:?}",
        gn.note
    );
    let t = r.train.as_ref().unwrap();
    assert_eq!((t.skipped.golden, t.skipped.candidate), (Some(true), Some(true)));
    let r = check(&g, &applied);
    assert_eq!(first_site(&r), "update.model.embed_tokens.weight");
    assert_eq!(top(&r), "train.overflow_applied", "{:?}", r.diagnosis);
    assert_eq!(r.train.as_ref().unwrap().skipped.candidate, Some(false));
}

/// Every training fault planted into the synthetic step, the two faults outside §6 and a
/// forward fault: the first site and the name each gets.
#[test]
fn each_planted_training_fault_is_named_top_1_and_others_are_not_misnamed() {
    let base = base();
    let tmp = tempfile::tempdir().unwrap();
    let mut rows = Vec::new();
    let mut goldens: BTreeMap<String, PathBuf> = BTreeMap::new();
    let mut golden_for = |setup: Setup| -> PathBuf {
        let name = format!("{}_{}_{}", setup.loss_scale, setup.micro_batches, setup.overflow);
        goldens
            .entry(name.clone())
            .or_insert_with(|| {
                let d = tmp.path().join(format!("golden_{name}"));
                write_step(&base, setup, Plant::None, &d, &|_| {});
                d
            })
            .clone()
    };
    let mut cases: Vec<(Plant, Setup)> =
        Fault::TRAIN.iter().map(|&f| (Plant::Train(f), setup_for(f))).collect();
    cases.push((Plant::OtherLrDoubled, PLAIN));
    cases.push((Plant::OtherGradSign, PLAIN));
    cases.push((Plant::Forward(Fault::MaskPaddingIgnored), PLAIN));
    let mut failures = Vec::new();
    for (plant, setup) in cases {
        let g = golden_for(setup);
        let c = tmp.path().join(format!("{plant:?}").replace([' ', '(', ')', ':'], "_"));
        write_step(&base, setup, plant, &c, &|_| {});
        let r = check(&g, &c);
        let named: Vec<&str> = r.diagnosis.iter().map(|f| f.fault.as_str()).collect();
        rows.push(format!(
            "{:<40} first {:<45} named {:?}",
            format!("{plant:?}"),
            first_site(&r),
            named
        ));
        let ok = r.verdict == llama_parity::compare::Verdict::Fail
            && match plant {
                Plant::Train(f) | Plant::Forward(f) => top(&r) == f.id(),
                _ => !named.iter().any(|n| n.starts_with("train.")) && r.localisation.is_some(),
            };
        if !ok {
            failures.push(format!("{plant:?}: {:?} {:?}", r.diagnosis, r.diagnosis_notes));
        }
    }
    println!("{}", rows.join("\n"));
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn the_report_files_carry_the_steps_loss_norm_and_gradient_table() {
    let base = base();
    let tmp = tempfile::tempdir().unwrap();
    let (g, c, out) = (tmp.path().join("g"), tmp.path().join("c"), tmp.path().join("report"));
    write_step(&base, PLAIN, Plant::None, &g, &|_| {});
    write_step(&base, PLAIN, Plant::Train(Fault::TrainClipPerParameter), &c, &|_| {});
    let (code, _, err) = parity(&[
        "compare",
        g.to_str().unwrap(),
        c.to_str().unwrap(),
        "--no-floor",
        "--report",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(1), "{err}");
    let j = report_json(&out);
    let t = &j["train"];
    assert!(
        t["loss"]["golden"].as_f64().is_some() && t["loss"]["candidate"].as_f64().is_some(),
        "{t}"
    );
    assert!(t["grad_norm"]["rel_err"].as_f64().is_some(), "{t}");
    assert_eq!(t["skipped"], serde_json::json!({"golden": false, "candidate": false}));
    let rows = t["param_grads"].as_array().unwrap();
    assert_eq!(rows.len(), base.params.len());
    // Clipped each by its own norm: every ratio is 1 / the global coefficient (> 1).
    assert!(rows.iter().all(|r| r["norm_ratio"].as_f64().unwrap() > 1.5), "{rows:?}");
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert!(
        html.contains("id=\"train\"") && html.contains("chart-backward"),
        "training section and chart"
    );
    let md = std::fs::read_to_string(out.join("summary.md")).unwrap();
    assert!(
        md.contains("Training step: loss golden") && md.contains("train.clip_per_parameter"),
        "{md}"
    );
    let junit = std::fs::read_to_string(out.join("junit.xml")).unwrap();
    assert!(junit.contains("param_grad.model.norm.weight"), "junit lists the backward sites");
}

/// The HF-made training goldens and candidates (`fixtures/train`): a confusion matrix of
/// the expected name against the top-1 name. Each golden is judged over its measured
/// noise floor where the harness reproduces it, and with the fixed defaults (said in the
/// matrix) where it does not; each candidate must fail at the first site its producer
/// recorded.
#[test]
fn the_hf_made_training_candidates_form_a_diagonal_confusion_matrix() {
    let dir = root().join("fixtures/train");
    let golden_dir = dir.join("golden");
    let cache = tempfile::tempdir().unwrap();
    let policy = Policy::default();
    let judge = |g: &Path, c: &Path, floor: bool| -> llama_parity::Result<Report> {
        let opts = Options {
            floor: if floor { Floor::Cache(cache.path()) } else { Floor::Off },
            ..Options::new(&policy)
        };
        let (g, c) = (Dump::open(g)?, Dump::open(c)?);
        pipeline::check(&g, &c, None, &opts)
    };
    let mut failures = Vec::new();
    let mut rows = Vec::new();
    let mut goldens: Vec<PathBuf> = std::fs::read_dir(&golden_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    goldens.sort();
    assert_eq!(goldens.len(), 5, "the five training goldens under {}", golden_dir.display());
    // Which goldens the harness reproduces: their floor is believed.
    let mut floored = BTreeMap::new();
    for g in &goldens {
        let name = g.file_name().unwrap().to_string_lossy().into_owned();
        let (r, thresholds) = match judge(g, g, true) {
            Ok(r) => (r, "noise floor".to_string()),
            Err(llama_parity::Error::NotReproduced { what, .. }) => {
                (judge(g, g, false).expect("check"), format!("defaults (not reproduced: {what})"))
            }
            Err(e) => panic!("{name}: {e}"),
        };
        rows.push(format!("{name:<60} itself: {:?}, thresholds {thresholds}", r.verdict));
        floored.insert(name.clone(), thresholds == "noise floor");
        if r.verdict != llama_parity::compare::Verdict::Pass {
            failures
                .push(format!("{name} against itself: {:?}", r.first_divergence.map(|f| f.site)));
        }
    }
    // The harness reproduces every golden, the skipped overflow step too (the float64
    // reference keeps a float16 golden's range, docs/training.md).
    for (name, believed) in &floored {
        assert!(*believed, "{name}: {rows:#?}");
    }
    let mut cands: Vec<PathBuf> = std::fs::read_dir(dir.join("candidates"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    cands.sort();
    assert_eq!(cands.len(), 18, "the training candidates");
    for c in &cands {
        let name = c.file_name().unwrap().to_string_lossy().into_owned();
        let (golden, slug) = name.split_once("__").expect("<golden>__<fault>");
        let r = judge(&golden_dir.join(golden), c, floored[golden]).expect("check");
        let manifest: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(c.join("manifest.json")).unwrap())
                .unwrap();
        let expect_first =
            manifest["producer"]["expect"]["first"].as_str().unwrap_or("").to_string();
        let first = r
            .first_divergence
            .as_ref()
            .map_or_else(String::new, |f| format!("{} {}", f.step, f.site));
        let named: Vec<&str> = r.diagnosis.iter().map(|f| f.fault.as_str()).collect();
        let expected = Fault::parse_underscored(slug);
        rows.push(format!(
            "{name:<60} expected {:<32} first {:<50} top-1 {}",
            expected.map_or("(none of §6)", |f| f.id()),
            first,
            top(&r)
        ));
        let ok = r.verdict == llama_parity::compare::Verdict::Fail
            && first == expect_first
            && match expected {
                Some(f) => top(&r) == f.id(),
                None => !named.iter().any(|n| n.starts_with("train.")) && r.localisation.is_some(),
            };
        if !ok {
            failures.push(format!(
                "{name}: first {first} (expected {expect_first}), named {named:?}; {:?}",
                r.diagnosis_notes
            ));
        }
    }
    println!("{}", rows.join("\n"));
    assert!(failures.is_empty(), "{failures:#?}");
}
