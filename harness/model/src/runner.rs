//! How an implementation runs a golden's scenario on a loaded model: the weights
//! (`weights.safetensors` or a referenced checkpoint), the steps in order, the
//! teacher-forced variant, and the in-memory dump every implementation returns.
//!
//! The free run feeds the prefill and then each teacher-forced decode token
//! (`scenario.decode_ids`), carrying its own caches. The teacher-forced run
//! (`--teacher-force`) replaces each layer's input by the golden's (`model.embed_tokens`
//! for layer 0, `model.layers.{i-1}` for layer `i`) at every step; its KV cache is the
//! teacher-forced run's own, which holds keys and values computed from the golden's
//! layer inputs at every earlier step, so each layer's error stays local (the golden's
//! own `k_cache` is not injected: a candidate dump may lack it, and the own cache
//! already isolates one layer's error).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use ndarray::{Array3, Ix3};
use serde_json::json;

use ::weights::checkpoint::HfCheckpoint;
use contract::error::{Error, Result};
use contract::site::{self, LayerPart, Site, Step};
use dump::{DType, Dump, Manifest, Precision, Tensor};

use crate::context::{RunContext, RunEvent, Sha256Check};
use crate::llama::{LayerInputs, Llama, Session, SessionState};
use crate::numerics::Numerics;
use crate::plan::Plan;
use crate::run::RunOutput;
use crate::step_output::{StepOutput, Watch};
use crate::weights::Weights;

/// The HF weights of `golden`: its `weights.safetensors`, or the checkpoint its manifest
/// references (CONTRACT §1.2), whose listed sha256 are checked first unless `ctx` says
/// skip. A warning, shown to `ctx`'s sink and pushed to `warnings`, says when the
/// manifest lists none or when the check was skipped.
fn golden_checkpoint(
    golden: &Dump,
    ctx: &RunContext,
    warnings: &mut Vec<String>,
) -> Result<HfCheckpoint> {
    if let Some(f) = golden.weights()? {
        return Ok(HfCheckpoint::from_file(f));
    }
    let Some(r) = golden.weights_ref()? else {
        return Err(Error::Format {
            path: golden.dir().map(Weights::path_in).unwrap_or_default(),
            what: "missing: running a golden's scenario needs its HF weights beside the \
                   activations or a checkpoint referenced by its manifest"
                .into(),
        });
    };
    let ckpt = match &ctx.checkpoints {
        Some(cache) => cache.open(&r.checkpoint, HfCheckpoint::open)?,
        None => HfCheckpoint::open(&r.checkpoint)?,
    };
    let mut warn = |text: String| {
        ctx.emit(&RunEvent::Warning { text: &text });
        warnings.push(text);
    };
    if r.sha256.is_empty() {
        warn(format!(
            "{}: the manifest lists no sha256; checkpoint not verified",
            r.checkpoint.display()
        ));
    } else if ctx.sha256 == Sha256Check::Skip {
        // The binary's context skips when LLAMA_PARITY_SKIP_SHA256=1, and says so.
        warn(format!(
            "{}: sha256 check skipped (LLAMA_PARITY_SKIP_SHA256=1)",
            r.checkpoint.display()
        ));
    } else {
        ckpt.verify_sha256(&r.sha256)?;
    }
    Ok(ckpt)
}

/// Loads `golden`'s weights (through the plan's key mapping) and checks its scenario's
/// token ids against the vocabulary. A referenced checkpoint is checked as `ctx` says;
/// what the caller should know about it is pushed to `warnings` (and shown to `ctx`).
pub fn load_model(
    golden: &Dump,
    plan: &Plan,
    ctx: &RunContext,
    warnings: &mut Vec<String>,
) -> Result<Llama> {
    let manifest_path = golden
        .dir()
        .map(|d| d.join("manifest.json"))
        .unwrap_or_else(|| PathBuf::from("<in-memory dump>"));
    let weights_file = golden_checkpoint(golden, ctx, warnings)?;
    let cfg = golden.manifest.model.clone();
    // The layer count is checked against the weights before anything is sized by it.
    let held = weights_file
        .keys()
        .filter_map(|k| k.strip_prefix("model.layers.")?.split('.').next()?.parse::<usize>().ok())
        .max()
        .map_or(0, |i| i + 1);
    if cfg.num_hidden_layers != held {
        return Err(Error::Config {
            path: manifest_path,
            what: format!(
                "num_hidden_layers is {} but {} holds layers for {held}",
                cfg.num_hidden_layers,
                weights_file.path().display()
            ),
        });
    }
    let mut weights = Weights::load(&weights_file, &cfg, plan)?;
    match golden.adapter()? {
        Some((dir, merged)) => {
            let adapter = ::weights::adapter::Adapter::open(&dir, &cfg)?;
            crate::lora::attach(&mut weights, &adapter, merged, plan, golden.manifest.dtype)?;
        }
        None => {
            if let Some(f) = plan.faults.iter().find(|f| f.fault.is_lora()) {
                return Err(Error::Usage {
                    flag: "--fault".into(),
                    what: format!(
                        "{f}: {} has no LoRA adapter (no `adapter` in its manifest, CONTRACT §5)",
                        manifest_path.display()
                    ),
                });
            }
        }
    }
    let model = Llama::new(cfg, weights, &manifest_path)?;
    let sc = &golden.manifest.scenario;
    let vocab = model.config.vocab_size as i64;
    if let Some(bad) =
        sc.input_ids.iter().chain(&sc.decode_ids).flatten().find(|&&i| i < 0 || i >= vocab)
    {
        return Err(Error::Manifest {
            path: manifest_path,
            what: format!("scenario token id {bad} is outside the vocabulary (size {vocab})"),
        });
    }
    Ok(model)
}

/// Where a session's rotary tables come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeTableSource {
    /// Computed for each step's positions (HF `LlamaRotaryEmbedding.forward`).
    PerStep,
    /// Built once for `max_position_embeddings` and gathered (MindFormers `FreqsMgr`).
    Precomputed,
}

/// How an implementation runs a scenario on a loaded model.
pub struct Runner<'a> {
    /// The producer's `implementation` in the dump's manifest.
    pub implementation: &'static str,
    pub numerics: &'a dyn Numerics,
    pub plan: &'a Plan,
    /// The dtype the dump declares.
    pub declared: Precision,
    pub rope_tables: RopeTableSource,
    /// Shown every site of the free run as it is produced; the run ends after the step
    /// in which it says stop (that step's sites up to there are in the dump).
    pub watch: Option<std::sync::Arc<Watch>>,
    /// Told as each run starts and ends and as each layer starts.
    pub context: &'a RunContext,
}

/// The golden's layer inputs at one step.
struct GoldenInputs<'g> {
    golden: &'g Dump,
    step: Step,
}

impl LayerInputs for GoldenInputs<'_> {
    fn layer_input(&self, layer: usize) -> Result<Option<Array3<f64>>> {
        let site =
            if layer == 0 { Site::EmbedTokens } else { Site::Layer(layer - 1, LayerPart::Output) };
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

/// A correct free run kept to replay others from: its dump, and its session state at the
/// start of each of the golden's steps.
pub struct Recorded {
    pub dump: Dump,
    states: Vec<SessionState>,
}

/// Where a replayed run departs from a [`Recorded`] one: at the start of the golden's
/// step `step` (an index into its steps) and at decoder layer `layer`. Everything before
/// is the recorded run's, taken as it is (block replay): the run's faults must not act
/// there, which holds from their earliest effect on.
pub struct Replay<'b> {
    pub base: &'b Recorded,
    pub step: usize,
    pub layer: usize,
}

impl Runner<'_> {
    /// The free run, recorded so that other runs can be replayed from it.
    pub fn run_recorded(&self, model: &Llama, golden: &Dump) -> Result<Recorded> {
        let mut states = Vec::new();
        let dump = self.run_steps(model, golden, None, None, Some(&mut states))?;
        Ok(Recorded { dump, states })
    }

    /// The free run replayed from `replay`: only the steps from its step on and the layers
    /// from its layer on are computed; the rest of the dump is the recorded run's.
    pub fn run_replayed(&self, model: &Llama, golden: &Dump, replay: &Replay) -> Result<Dump> {
        self.run_steps(model, golden, None, Some(replay), None)
    }

    /// The free run, and with `teacher_force` the teacher-forced run too.
    pub fn run(&self, model: &Llama, golden: &Dump, teacher_force: bool) -> Result<RunOutput> {
        let dump = self.run_scenario(model, golden, None)?;
        let teacher_forced = if teacher_force {
            Some(self.run_scenario(model, golden, Some(golden))?)
        } else {
            None
        };
        Ok(RunOutput { dump, teacher_forced, warnings: Vec::new() })
    }

    /// The free run (`teacher` `None`) or the teacher-forced run of `golden`'s scenario.
    pub fn run_scenario(
        &self,
        model: &Llama,
        golden: &Dump,
        teacher: Option<&Dump>,
    ) -> Result<Dump> {
        self.run_steps(model, golden, teacher, None, None)
    }

    fn run_steps(
        &self,
        model: &Llama,
        golden: &Dump,
        teacher: Option<&Dump>,
        replay: Option<&Replay>,
        mut record: Option<&mut Vec<SessionState>>,
    ) -> Result<Dump> {
        let (n, plan, declared) = (self.numerics, self.plan, self.declared);
        let sc = &golden.manifest.scenario;
        let steps = golden.manifest.steps.clone();
        let max_len = sc.prefill_len() + sc.decode_steps();
        let mut session = Session::new(model, sc.batch(), max_len, n, plan);
        if self.rope_tables == RopeTableSource::Precomputed {
            // Positions reach max_len (a fault may add one); a row past the table is
            // computed on use, the same value.
            session.precompute_rope_tables(max_len + 2);
        }
        if let (Some(w), None) = (&self.watch, teacher) {
            session.set_watch(w.clone());
        }
        if let Some(sink) = &self.context.events {
            session.set_events(sink.clone());
        }
        let mut tensors = BTreeMap::new();
        let start = replay.map_or(0, |r| r.step);
        if let Some(r) = replay {
            let state = r.base.states.get(start).ok_or_else(|| {
                Error::scenario("steps", format!("no recorded state at step index {start}"))
            })?;
            session.restore(state.clone());
            let base = &r.base.dump;
            if r.layer > 0 {
                session.start_at_layer(
                    r.layer,
                    Box::new(move |step, layer| {
                        GoldenInputs { golden: base, step }.layer_input(layer)?.ok_or_else(|| {
                            Error::scenario(
                                format!("model.layers.{}", layer - 1),
                                format!("{step}: the recorded run has no input for layer {layer}"),
                            )
                        })
                    }),
                );
            }
            // The recorded run's sites that the replay does not compute.
            for (i, &step) in steps.iter().enumerate() {
                for site in base.sites(step) {
                    let skipped = i < start || matches!(site, Site::Layer(l, _) if *l < r.layer);
                    if skipped {
                        if let Some(t) = base.get(step, site)? {
                            tensors.insert(site::key(step, site), t);
                        }
                    }
                }
            }
        }
        let what = if teacher.is_some() {
            format!("{} run, teacher-forced", self.implementation)
        } else {
            format!("{} run", self.implementation)
        };
        self.context.emit(&RunEvent::Started { what: &what });
        let mut done: Vec<Step> = steps[..start.min(steps.len())].to_vec();
        // Consecutive decode steps run together, a layer at a time for all of them
        // ([`Session::decode_steps`]), where nothing needs the session between them: no
        // watch, no recorded states, no replay.
        let together = if self.watch.is_none() && replay.is_none() && record.is_none() {
            session.decode_group()
        } else {
            1
        };
        let decode_ids = |step: Step| -> Result<Vec<i64>> {
            let Step::Decode(j) = step else { unreachable!("a decode step") };
            sc.decode_ids.iter().map(|r| r.get(j).copied()).collect::<Option<_>>().ok_or_else(
                || Error::scenario("decode_ids", format!("step {step} has no decode token")),
            )
        };
        let mut j = start;
        while j < steps.len() {
            let step = steps[j];
            if let Some(states) = record.as_deref_mut() {
                states.push(session.state());
            }
            if let Some(r) = replay.filter(|r| r.layer > 0) {
                if let Some(state) = r.base.states.get(j) {
                    session.restore_caches(state, r.layer);
                }
            }
            let outs = match step {
                Step::Prefill => {
                    let inputs = teacher.map(|g| GoldenInputs { golden: g, step });
                    let inputs = inputs.as_ref().map(|g| g as &dyn LayerInputs);
                    vec![session.prefill(&sc.input_ids, &sc.attention_mask, inputs)?]
                }
                Step::Decode(_) => {
                    let group: Vec<Step> = steps[j..]
                        .iter()
                        .take(together)
                        .take_while(|s| matches!(s, Step::Decode(_)))
                        .copied()
                        .collect();
                    let ids = group.iter().map(|&s| decode_ids(s)).collect::<Result<Vec<_>>>()?;
                    let inputs: Vec<Option<GoldenInputs>> = group
                        .iter()
                        .map(|&step| teacher.map(|g| GoldenInputs { golden: g, step }))
                        .collect();
                    let inputs: Vec<Option<&dyn LayerInputs>> =
                        inputs.iter().map(|g| g.as_ref().map(|g| g as &dyn LayerInputs)).collect();
                    session.decode_steps(&ids, &inputs)?
                }
                Step::Train => {
                    return Err(Error::Usage {
                        flag: "--impl".into(),
                        what: format!(
                            "field `train` (one training step, CONTRACT §6) is not implemented \
                             by the {} implementation",
                            self.implementation
                        ),
                    })
                }
            };
            let mut stopped = false;
            for (out, &step) in outs.into_iter().zip(&steps[j..]) {
                done.push(step);
                stopped = out.stopped();
                store(step, out, &mut tensors);
                j += 1;
            }
            if stopped {
                break;
            }
        }
        if done.len() < steps.len() {
            // Stopped by the watch: the recorded sites of the steps not run go too.
            let run: BTreeSet<String> = done.iter().map(ToString::to_string).collect();
            tensors.retain(|k, _| k.split_once('/').is_some_and(|(s, _)| run.contains(s)));
        }
        self.context.emit(&RunEvent::Finished);
        let mut manifest: Manifest = golden.manifest.clone();
        manifest.producer = json!({
            "framework": "llama-parity",
            "implementation": self.implementation,
            "version": env!("CARGO_PKG_VERSION"),
            "numerics": n.name(),
            "faults": plan.faults.iter().map(ToString::to_string).collect::<Vec<_>>(),
        });
        manifest.dtype = declared;
        manifest.steps = done;
        Dump::in_memory(manifest, tensors)
    }
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
