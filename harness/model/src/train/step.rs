//! `parity run` on a training golden (CONTRACT §6): one step of the float64 reference or
//! of the simulated Ascend port (O2: forward and backward in the compute dtype, master
//! weights, unscaled gradients, clipping and AdamW in float32), as a dump of step
//! `train`.
//!
//! The dump's manifest is the golden's with the run's dtype, `steps: ["train"]` and a
//! producer naming the implementation (and, with a dynamic loss scale, the scale for the
//! next step, `next_loss_scale`). Its tensors are every site of
//! [`Site::train`] and, with an adapter, §5's optional sites; `grad.<site>` are divided
//! by the loss scale (docs/training.md: a scaled and an unscaled run dump the same).
//!
//! No teacher-forced dump is made: teacher forcing feeds each layer the golden's input
//! to it, which localises a forward error; a training step's backward runs through
//! every layer at once, and a layer fed the golden's input would pair the golden's
//! forward with the run's own backward, a step no producer takes. The forward sites of
//! the free run already localise a forward fault, as in inference.

use std::collections::BTreeMap;
use std::path::PathBuf;

use ndarray::ArrayD;
use serde_json::json;

use ::weights::adapter::Adapter;
use contract::error::{Error, Result};
use contract::fault::{Fault, ScopedFault};
use contract::site::{self, parameter_order, Site, Step};
use dump::{DType, Dump, Manifest, Precision, Tensor};
use dump::{LossScale, TrainSpec, Trainable};

use crate::ascend::{AscendNumerics, AscendOptions};
use crate::context::RunContext;
use crate::numerics::{Exact, Numerics};
use crate::plan::Plan;
use crate::run::{Implementation, RunOptions, RunOutput};
use crate::runner::load_model;
use crate::weights::Weights;

use super::backward::{backward, Trainables};
use super::loss::{cross_entropy, LossRule};
use super::optim::{self, OptimRule, Param};
use super::tape::forward;
use super::Storage;

/// The §3 forward faults a training step plants (through the forward's [`Plan`]):
/// those acting on a prefill's positions, tables, mask, norms and attention, and the
/// adapter scalings. The others (decode positions and the KV cache, which a training
/// step has not; the weight key mappings, whose gradients would be those of other
/// tensors) are refused.
const FORWARD_FAULTS: [Fault; 19] = [
    Fault::RopeInterleaved,
    Fault::RopeCosSinSwapped,
    Fault::RopeWrongTheta,
    Fault::RopeLowPrecisionAngles,
    Fault::MaskNone,
    Fault::MaskInverted,
    Fault::MaskPaddingIgnored,
    Fault::MaskPadTokenMasked,
    Fault::MaskFp16Overflow,
    Fault::NormLayernorm,
    Fault::NormBias,
    Fault::NormEpsOutside,
    Fault::NormNoUpcast,
    Fault::KvGqaTiled,
    Fault::AttnNoScale,
    Fault::AttnSoftmaxLowPrecision,
    Fault::LoraScaleAlpha,
    Fault::LoraScaleMissing,
    Fault::LoraRsloraIgnored,
];

/// Whether the training step plants `f`.
fn planted_in_training(f: Fault) -> bool {
    f.is_train() || FORWARD_FAULTS.contains(&f) || f == Fault::LoraPatternIgnored
}

/// The `train.*` faults as the loss and the optimizer read them.
fn rules(faults: &[ScopedFault]) -> (LossRule, OptimRule) {
    let has = |f: Fault| faults.iter().any(|s| s.fault == f);
    (
        LossRule {
            unshifted: has(Fault::TrainLabelsUnshifted),
            count_ignored: has(Fault::TrainIgnoreIndexCounted),
            summed: has(Fault::TrainMicroBatchesSummed),
        },
        OptimRule {
            loss_scale_kept: has(Fault::TrainLossScaleKept),
            overflow_applied: has(Fault::TrainOverflowApplied),
            weight_decay_everywhere: has(Fault::TrainWeightDecayEverywhere),
            clip_per_parameter: has(Fault::TrainClipPerParameter),
            no_bias_correction: has(Fault::TrainAdamNoBiasCorrection),
        },
    )
}

fn manifest_path(golden: &Dump) -> PathBuf {
    golden
        .dir()
        .map(|d| d.join("manifest.json"))
        .unwrap_or_else(|| PathBuf::from("<in-memory dump>"))
}

/// The master value of every trainable parameter before the step, by name, from the
/// weights as loaded (before any rounding to the compute dtype) or the adapter's files.
fn masters(
    w: &Weights,
    adapter: Option<&Adapter>,
    trainable: Trainable,
    tied: bool,
) -> BTreeMap<String, ArrayD<f64>> {
    match trainable {
        Trainable::All => w.named_parameters(tied),
        Trainable::Adapter => {
            let mut m = BTreeMap::new();
            for module in adapter.map(|a| a.modules.as_slice()).unwrap_or_default() {
                m.insert(module.a_key.clone(), module.a.to_array());
                m.insert(module.b_key.clone(), module.b.to_array());
            }
            m
        }
    }
}

/// Runs one training step of `golden` (whose manifest has `train`) with `opts`.
pub fn run(golden: &Dump, opts: &RunOptions) -> Result<RunOutput> {
    let path = manifest_path(golden);
    let spec: &TrainSpec = golden.manifest.train.as_ref().ok_or_else(|| Error::Manifest {
        path: path.clone(),
        what: "no `train` field: not a training step (CONTRACT §6)".into(),
    })?;
    if let Some(f) = opts.faults.iter().find(|f| !planted_in_training(f.fault)) {
        return Err(Error::Usage {
            flag: "--fault".into(),
            what: format!(
                "{f}: not planted in a training step (it acts on decode steps, the KV cache \
                 or the weights' key mapping, which a training step's gradients do not \
                 follow); the training step plants the train.* faults and the prefill's \
                 forward faults"
            ),
        });
    }
    let implementation = opts.implementation;
    let ctx: &RunContext = &opts.context;
    let plan = Plan::scoped(&opts.faults);
    let golden_dtype = golden.manifest.dtype;
    let (declared, numerics, master): (Precision, Box<dyn Numerics>, Option<Precision>) =
        match implementation {
            Implementation::Reference => {
                (opts.precision.unwrap_or(golden_dtype), Box::new(Exact::new(golden_dtype)), None)
            }
            Implementation::Ascend => {
                let p = opts.precision.unwrap_or(golden_dtype);
                let framework = golden
                    .manifest
                    .producer
                    .get("framework")
                    .and_then(serde_json::Value::as_str)
                    .unwrap_or("transformers");
                let o = AscendOptions::for_framework(p, framework);
                (p, Box::new(AscendNumerics::new(o, &plan)), Some(Precision::F32))
            }
            other => {
                return Err(Error::Usage {
                    flag: "--impl".into(),
                    what: format!(
                        "field `train` (one training step, CONTRACT §6) is not implemented by \
                         the {} implementation",
                        other.name()
                    ),
                })
            }
        };
    let n: &dyn Numerics = numerics.as_ref();
    // The reference keeps the range of a float16/bfloat16 golden (not its rounding): a
    // loss scale that overflows the golden's gradients overflows its own alike.
    let range = (implementation == Implementation::Reference && golden_dtype != Precision::F32)
        .then_some(golden_dtype);
    let st = Storage { numerics: n, master, range };

    let adapter = match (spec.trainable, golden.adapter()?) {
        (Trainable::Adapter, None) => {
            return Err(Error::Manifest {
                path,
                what:
                    "train.trainable is \"adapter\" but the manifest has no `adapter` (CONTRACT §5)"
                        .into(),
            })
        }
        (_, Some((_, true))) => {
            return Err(Error::Manifest {
                path,
                what: "adapter.merged is true: a training step trains an unmerged adapter".into(),
            })
        }
        (_, Some((dir, false))) => Some(Adapter::open(dir.as_path(), &golden.manifest.model)?),
        (_, None) => None,
    };
    if let Some(a) = &adapter {
        if a.config.lora_dropout != 0.0 && spec.trainable == Trainable::Adapter {
            return Err(Error::Manifest {
                path: a.dir.join("adapter_config.json"),
                what: format!(
                    "lora_dropout is {}: a training step's dropout draws random masks; only 0 \
                     is reproducible",
                    a.config.lora_dropout
                ),
            });
        }
    }

    let mut warnings = Vec::new();
    if opts.teacher_force {
        let text = "no teacher-forced run of a training step: its backward runs through every \
                    layer at once (the free run's forward sites localise a forward fault)";
        ctx.emit(&crate::context::RunEvent::Warning { text });
        warnings.push(text.to_string());
    }
    let mut model = load_model(golden, &plan, ctx, &mut warnings)?;
    let cfg = model.config.clone();
    let master_values =
        masters(&model.weights, adapter.as_ref(), spec.trainable, cfg.tie_word_embeddings);
    if master.is_some() {
        model.weights.round(n);
    }
    let sc = &golden.manifest.scenario;
    if spec.micro_batches == 0 || !sc.batch().is_multiple_of(spec.micro_batches) {
        return Err(Error::Manifest {
            path,
            what: format!(
                "train.micro_batches is {}: it does not split the batch of {}",
                spec.micro_batches,
                sc.batch()
            ),
        });
    }

    let what = format!("{} training step", implementation.name());
    ctx.emit(&crate::context::RunEvent::Started { what: &what });
    let tape = forward(&model, sc, n, &plan)?;
    let (loss_rule, optim_rule) = rules(&opts.faults);
    let scale = spec.loss_scale.value();
    let loss = cross_entropy(&tape.logits, &spec.labels, spec.micro_batches, loss_rule, scale, st)?;

    let adapter_keys = match (&adapter, spec.trainable) {
        (Some(a), Trainable::Adapter) => a
            .modules
            .iter()
            .map(|m| ((m.layer, m.projection), (m.a_key.clone(), m.b_key.clone())))
            .collect(),
        _ => BTreeMap::new(),
    };
    let trainables = Trainables { trainable: spec.trainable, adapter_keys };
    let grads = backward(&model, &tape, &sc.input_ids, &loss.dlogits, &trainables, &plan, st);

    let mut names: Vec<String> = master_values.keys().cloned().collect();
    names.sort_by(|a, b| parameter_order(a).cmp(&parameter_order(b)).then(a.cmp(b)));
    let mut params = Vec::with_capacity(names.len());
    for name in &names {
        let grad = grads.params.get(name).cloned().ok_or_else(|| Error::Scenario {
            field: "train.trainable".into(),
            what: format!("parameter {name} is trainable but the forward never used it"),
        })?;
        params.push(Param { name: name.clone(), weight: master_values[name].clone(), grad });
    }
    let stepped =
        optim::step(&params, &spec.optimizer, spec.max_grad_norm, spec.loss_scale, optim_rule, st);
    ctx.emit(&crate::context::RunEvent::Finished);

    // The dump: forward sites, loss, gradients unscaled, norm, parameter gradients, updates.
    let adapted = model.weights.layers.iter().any(|l| l.adapted);
    let mut tensors: BTreeMap<String, Tensor> = BTreeMap::new();
    let mut put = |site: &Site, t: Tensor| {
        tensors.insert(site::key(Step::Train, site), t);
    };
    for (s, a) in tape.sites(adapted) {
        if s == Site::PositionIds {
            let v: Vec<i64> = a.iter().map(|&x| x as i64).collect();
            put(&s, Tensor::from_i64(a.shape(), &v));
        } else {
            put(&s, Tensor::from_array(&a, DType::F64));
        }
    }
    let scalar = |x: f64| Tensor::from_f64(&[], &[x], DType::F64);
    put(&Site::Loss, scalar(loss.value));
    let unscale = if optim_rule.loss_scale_kept { 1.0 } else { scale };
    for (s, mut a) in grads.sites {
        if unscale != 1.0 {
            a.mapv_inplace(|x| x / unscale);
        }
        put(&s, Tensor::from_array(&a, DType::F64));
    }
    put(&Site::GradNorm, scalar(stepped.grad_norm));
    for ((name, g), u) in names.iter().zip(&stepped.grads).zip(&stepped.updates) {
        put(&Site::ParamGrad(name.clone()), Tensor::from_array(g, DType::F64));
        put(&Site::Update(name.clone()), Tensor::from_array(u, DType::F64));
    }
    let mut manifest: Manifest = golden.manifest.clone();
    let mut producer = json!({
        "framework": "llama-parity",
        "implementation": implementation.name(),
        "version": env!("CARGO_PKG_VERSION"),
        "numerics": n.name(),
        "faults": opts.faults.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "overflow": stepped.overflow,
        "step_skipped": stepped.skipped,
    });
    if let (Some(next), LossScale::Dynamic(_)) = (stepped.next_loss_scale, spec.loss_scale) {
        producer["next_loss_scale"] = json!(next);
    }
    manifest.producer = producer;
    manifest.dtype = declared;
    manifest.steps = vec![Step::Train];
    let dump = Dump::in_memory(manifest, tensors)?;
    Ok(RunOutput { dump, teacher_forced: None, warnings })
}
