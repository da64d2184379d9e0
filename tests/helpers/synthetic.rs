//! Synthetic comparisons for the report tests: a tiny two-layer Llama scenario (batch 2
//! with left padding, prefill 6, three decode steps) whose golden values are
//! pseudo-random, and candidates that match it to rounding or carry a planted
//! decode-position fault (`rope.pos_reset`-like: the decode cos/sin rows are wrong, and
//! everything downstream inherits the error).

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::Path;

use llama_parity::compare::compare;
use llama_parity::compare::tolerance::Policy;
use llama_parity::contract::site::{LayerPart, Site, Step};
use llama_parity::diagnosis::Finding;
use llama_parity::dump::{DType, Dump, Manifest, Tensor};
use llama_parity::report::Report;
use parity_testkit::unit;

const B: usize = 2;
const P: usize = 6;
const N: usize = 3;
const H: usize = 16;
const NH: usize = 4;
const NKV: usize = 2;
const D: usize = 4;
const V: usize = 32;
const LAYERS: usize = 2;

/// The manifest of the synthetic scenario, produced by `framework`.
pub fn manifest_json(framework: &str) -> String {
    format!(
        r#"{{
  "format": "llama-parity/dump@1",
  "producer": {{ "framework": "{framework}", "version": "0", "device": "cpu" }},
  "model": {{ "vocab_size": {V}, "hidden_size": {H}, "intermediate_size": 32, "num_hidden_layers": {LAYERS},
             "num_attention_heads": {NH}, "num_key_value_heads": {NKV}, "head_dim": {D},
             "max_position_embeddings": 64, "rms_norm_eps": 1e-6, "rope_theta": 10000.0 }},
  "dtype": "float32",
  "scenario": {{ "name": "synthetic-padded",
                "input_ids": [[5, 6, 7, 8, 9, 10], [0, 0, 3, 4, 5, 6]],
                "attention_mask": [[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]],
                "decode_ids": [[11, 12, 13], [7, 8, 9]] }},
  "steps": ["prefill", "decode.0", "decode.1", "decode.2"]
}}"#
    )
}

/// What a candidate gets wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plant {
    /// Rounding-level noise only.
    None,
    /// Wrong decode positions: cos/sin and every later site of the decode steps diverge.
    DecodePositions,
    /// The same fault seen with teacher forcing: only the RoPE sites err on their own.
    DecodePositionsLocal,
}

fn golden_values(step_no: u64, site_no: u64, n: usize) -> Vec<f64> {
    (0..n).map(|i| unit(step_no << 40 ^ site_no << 24 ^ i as u64)).collect()
}

/// Builds one dump of the scenario.
pub fn dump(plant: Plant, framework: &str, missing: &[(&str, &str)]) -> Dump {
    let manifest = Manifest::parse(&manifest_json(framework), Path::new("synthetic/manifest.json"))
        .expect("manifest");
    let scenario = manifest.scenario.clone();
    let dims = manifest.shape_dims();
    let mut tensors = BTreeMap::new();
    for (step_no, &step) in manifest.steps.iter().enumerate() {
        let sites = Site::all(LAYERS);
        let q0 = sites.iter().position(|s| *s == Site::Layer(0, LayerPart::QRope)).unwrap_or(0);
        for (site_no, site) in sites.iter().enumerate() {
            if missing.iter().any(|(st, si)| *st == step.to_string() && *si == site.to_string()) {
                continue;
            }
            let shp = site.shape(step, &dims);
            let n: usize = shp.iter().product();
            let key = format!("{step}/{site}");
            match site {
                Site::PositionIds => {
                    let pos: Vec<i64> = match step {
                        Step::Prefill | Step::Train => scenario.prefill_positions().concat(),
                        Step::Decode(j) => scenario.decode_positions(j),
                    };
                    tensors.insert(key, Tensor::from_i64(&shp, &pos));
                }
                Site::Mask => {
                    let t_n = shp[2];
                    let s_n = shp[3];
                    let mut v = Vec::with_capacity(n);
                    for b in 0..B {
                        for t in 0..t_n {
                            for s in 0..s_n {
                                let q = if step == Step::Prefill { t } else { s_n - 1 };
                                let pad = s < P && scenario.attention_mask[b][s] == 0;
                                v.push(if s <= q && !pad { 0.0 } else { -1e9 });
                            }
                        }
                    }
                    tensors.insert(key, Tensor::from_f64(&shp, &v, DType::F32));
                }
                _ => {
                    let g = golden_values(step_no as u64, site_no as u64, n);
                    let decode = step != Step::Prefill;
                    let rope_site = matches!(site, Site::RotaryCos | Site::RotarySin)
                        || matches!(site, Site::Layer(_, LayerPart::QRope | LayerPart::KRope));
                    let scale = match plant {
                        Plant::None => 0.0,
                        Plant::DecodePositions
                            if decode && matches!(site, Site::RotaryCos | Site::RotarySin) =>
                        {
                            0.4
                        }
                        Plant::DecodePositions if decode && site_no >= q0 => {
                            0.02 * (1.0 + 0.08 * (site_no - q0) as f64)
                        }
                        Plant::DecodePositionsLocal if decode && rope_site => 0.03,
                        _ => 0.0,
                    };
                    // Heads differ in how much they suffer (rotation angle grows with
                    // the frequency index), so the heatmap has structure.
                    let head_of = |i: usize| -> usize {
                        match site {
                            Site::Layer(
                                _,
                                LayerPart::QRope | LayerPart::KRope | LayerPart::Probs,
                            ) => (i / (shp[2] * shp[3])) % shp[1],
                            Site::Layer(_, LayerPart::Context) => (i % (NH * D)) / D,
                            _ => 0,
                        }
                    };
                    let c: Vec<f64> = g
                        .iter()
                        .enumerate()
                        .map(|(i, &x)| {
                            let noise = unit(
                                0xC0FFEE
                                    ^ (step_no as u64) << 40
                                    ^ (site_no as u64) << 24
                                    ^ i as u64,
                            );
                            let cached_prefill_slot = matches!(
                                site,
                                Site::Layer(_, LayerPart::KCache | LayerPart::VCache)
                            ) && (i / D) % shp[2] < P;
                            let s = if cached_prefill_slot {
                                0.0
                            } else {
                                scale * (1.0 + 0.7 * head_of(i) as f64)
                            };
                            x + x * 2e-7 * noise + s * noise
                        })
                        .collect();
                    let values = if plant == Plant::None && framework == "golden" { g } else { c };
                    tensors.insert(key, Tensor::from_f64(&shp, &values, DType::F32));
                }
            }
        }
    }
    Dump::in_memory(manifest, tensors).expect("in-memory dump")
}

/// The golden dump.
pub fn golden() -> Dump {
    dump(Plant::None, "golden", &[])
}

/// A report where the candidate matches the golden to rounding.
pub fn pass_report() -> Report {
    let g = golden();
    let c = dump(Plant::None, "synthetic-port", &[]);
    let cmp = compare(&g, &c, &Policy::default()).expect("compare");
    label(Report::new(&cmp, Vec::new()))
}

/// Names the in-memory dumps as a CI job would (relative paths).
fn label(mut r: Report) -> Report {
    r.golden = "goldens/synthetic-padded".into();
    r.candidate = "dumps/synthetic-port".into();
    r
}

/// A report of a candidate with wrong decode positions, one site missing, teacher
/// forcing attached and a diagnosis naming the fault.
pub fn fail_report() -> Report {
    let g = golden();
    let missing = [("decode.2", "model.layers.1.self_attn.v_cache")];
    let c = dump(Plant::DecodePositions, "synthetic-port", &missing);
    let local = dump(Plant::DecodePositionsLocal, "synthetic-port", &missing);
    let policy = Policy::default();
    let cmp = compare(&g, &c, &policy).expect("compare");
    let diagnosis = vec![
        Finding {
            fault: "rope.pos_reset".into(),
            score: 0.94,
            scope: None,
            params: Default::default(),
            explains:
                "decode cos/sin rows match positions 0, 1, 2 instead of 6, 7, 8; prefill is exact"
                    .into(),
        },
        Finding {
            fault: "rope.pos_fixed".into(),
            score: 0.31,
            scope: None,
            params: Default::default(),
            explains:
                "decode rows differ from the golden <but> not all equal to row 0 & vary by step"
                    .into(),
        },
    ];
    let mut r = Report::new(&cmp, diagnosis);
    r.attach_local(&compare(&g, &local, &policy).expect("compare local"));
    label(r)
}
