//! `parity run --impl reference`: the golden's scenario through the float64 model,
//! as an in-memory dump.
//!
//! The free run feeds the prefill and then each teacher-forced decode token
//! (`scenario.decode_ids`), carrying its own caches. The teacher-forced run
//! (`--teacher-force`) replaces each layer's input by the golden's (`model.embed_tokens`
//! for layer 0, `model.layers.{i-1}` for layer `i`) at every step; its KV cache is the
//! teacher-forced run's own, which holds keys and values computed from the golden's
//! layer inputs at every earlier step, so each layer's error stays local (the golden's
//! own `k_cache` is not injected: a candidate dump may lack it, and the own cache
//! already isolates one layer's error).

use std::collections::BTreeMap;
use std::path::PathBuf;

use ndarray::{Array3, Ix3};
use serde_json::json;

use crate::dump::{DType, Dump, Manifest, Precision, Tensor};
use crate::error::{Error, Result};
use crate::site::{self, LayerPart, Site, Step};

use super::llama::{LayerInputs, Llama, Session, StepOutput};
use super::numerics::{Exact, Numerics};
use super::plan::Plan;
use super::weights::Weights;
use super::RunOutput;

/// Runs `golden`'s scenario; `precision` is the dtype the dump declares (its tolerance
/// class), the golden's when `None`.
pub fn run(golden: &Dump, precision: Option<Precision>, plan: &Plan, teacher_force: bool) -> Result<RunOutput> {
    let manifest_path = golden.dir().map(|d| d.join("manifest.json")).unwrap_or_else(|| PathBuf::from("<in-memory dump>"));
    let weights_file = golden.weights()?.ok_or_else(|| Error::MissingTensor {
        file: golden.dir().map(Weights::path_in).unwrap_or_default(),
        key: "weights.safetensors (the reference needs the golden's weights)".into(),
    })?;
    let cfg = golden.manifest.model.clone();
    let weights = Weights::load(&weights_file, &cfg, plan)?;
    let model = Llama::new(cfg, weights, &manifest_path)?;
    let sc = &golden.manifest.scenario;
    let vocab = model.config.vocab_size as i64;
    if let Some(bad) = sc.input_ids.iter().chain(&sc.decode_ids).flatten().find(|&&i| i < 0 || i >= vocab) {
        return Err(Error::Manifest { path: manifest_path, what: format!("scenario token id {bad} is outside the vocabulary (size {vocab})") });
    }
    // Hidden mask entries hold the golden dtype's finfo.min, as HF's eager mask does.
    let numerics = Exact::new(golden.manifest.dtype);
    let declared = precision.unwrap_or(golden.manifest.dtype);
    let dump = run_scenario(&model, golden, &numerics, plan, declared, None)?;
    let teacher_forced = if teacher_force { Some(run_scenario(&model, golden, &numerics, plan, declared, Some(golden))?) } else { None };
    Ok(RunOutput { dump, teacher_forced })
}

/// The golden's layer inputs at one step.
struct GoldenInputs<'g> {
    golden: &'g Dump,
    step: Step,
}

impl LayerInputs for GoldenInputs<'_> {
    fn layer_input(&self, layer: usize) -> Result<Option<Array3<f64>>> {
        let site = if layer == 0 { Site::EmbedTokens } else { Site::Layer(layer - 1, LayerPart::Output) };
        let Some(t) = self.golden.get(self.step, &site)? else { return Ok(None) };
        let a = t.to_array().into_dimensionality::<Ix3>().map_err(|_| Error::Shape {
            file: self.golden.dir().map(|d| d.join("activations")).unwrap_or_default(),
            key: site::key(self.step, &site),
            expected: vec![0, 0, 0],
            got: t.shape().to_vec(),
        })?;
        Ok(Some(a))
    }
}

fn run_scenario(model: &Llama, golden: &Dump, n: &dyn Numerics, plan: &Plan, declared: Precision, teacher: Option<&Dump>) -> Result<Dump> {
    let sc = &golden.manifest.scenario;
    let steps = golden.manifest.steps.clone();
    let max_len = sc.prefill_len() + sc.decode_steps();
    let mut session = Session::new(model, sc.batch(), max_len, n, plan);
    let mut tensors = BTreeMap::new();
    for &step in &steps {
        let inputs = teacher.map(|g| GoldenInputs { golden: g, step });
        let inputs = inputs.as_ref().map(|g| g as &dyn LayerInputs);
        let out = match step {
            Step::Prefill => session.prefill(&sc.input_ids, &sc.attention_mask, inputs)?,
            Step::Decode(j) => {
                let ids: Vec<i64> = sc
                    .decode_ids
                    .iter()
                    .map(|r| r.get(j).copied())
                    .collect::<Option<_>>()
                    .ok_or_else(|| Error::usage("scenario.decode_ids", format!("step {step} has no decode token")))?;
                session.decode(&ids, inputs)?
            }
        };
        store(step, out, &mut tensors);
    }
    let mut manifest: Manifest = golden.manifest.clone();
    manifest.producer = json!({
        "framework": "llama-parity",
        "implementation": "reference",
        "version": env!("CARGO_PKG_VERSION"),
        "numerics": n.name(),
        "faults": plan.faults.iter().map(|f| f.id()).collect::<Vec<_>>(),
    });
    manifest.dtype = declared;
    manifest.steps = steps;
    Dump::in_memory(manifest, tensors)
}

/// Positions as I64; everything else as F64 so metrics see the full precision.
fn store(step: Step, out: StepOutput, tensors: &mut BTreeMap<String, Tensor>) {
    for (site, a) in out.sites {
        let t = if site == Site::PositionIds {
            let v: Vec<i64> = a.iter().map(|&x| x as i64).collect();
            Tensor::from_i64(a.shape(), &v)
        } else {
            Tensor::from_array(&a, DType::F64)
        };
        tensors.insert(site::key(step, &site), t);
    }
}
