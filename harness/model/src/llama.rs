//! The Llama decoder composed from its building blocks, one forward call per step,
//! recording every contract site (CONTRACT §1).
//!
//! Follows HF `LlamaForCausalLM.forward` → `LlamaModel.forward`:
//! `h = embed(ids)`; `cos, sin = rotary_emb(h, position_ids)`; mask; per layer
//! `r = h; h = input_layernorm(h); h = r + o_proj(attn(h))`,
//! `r = h; h = post_attention_layernorm(h); h = r + mlp(h)`; `norm(h)`; `lm_head`.
//!
//! A [`Session`] holds what persists between steps: the KV caches, the rotary state,
//! each row's key validity and `pos_offset` (real tokens seen so far, so decode
//! positions continue from the context length and never restart).

use std::path::Path;

use ndarray::{s, Array2, Array3, Axis};

use contract::error::{Error, Result};
use contract::fault::Component;
use contract::site::{Site, Step};
use dump::ModelConfig;

use crate::context::{EventSink, RunEvent};
use crate::decoder_layer::{DecoderLayer, StepShared};
use crate::embedding::Embedding;
use crate::kv_cache::KvCache;
use crate::linear::VECTOR_ROWS;
use crate::mask;
use crate::numerics::Numerics;
use crate::plan::{DecodePositions, MaskFill, PaddingSource, Plan, RopeTables, OVERFLOWING_FILL};
use crate::rms_norm::RmsNorm;
use crate::rope::{Rope, RopeConfig};
use crate::weights::Weights;

// A step's sites and the watch they are shown to live in `step_output`, which the
// decoder layer writes into too; named here as well, where a session returns them.
pub use crate::step_output::{StepOutput, Watch};

/// A model: config, weights, rotary config.
#[derive(Debug, Clone)]
pub struct Llama {
    pub config: ModelConfig,
    pub weights: Weights,
    pub rope: RopeConfig,
}

impl Llama {
    /// Validates `config` (`path` names the manifest in errors) and builds the model.
    pub fn new(config: ModelConfig, weights: Weights, path: &Path) -> Result<Llama> {
        config.validate(path)?;
        if let Some(what) = config.unimplemented() {
            return Err(Error::Config { path: path.to_path_buf(), what });
        }
        let rope = RopeConfig::from_model(&config, path)?;
        Ok(Llama { config, weights, rope })
    }
}

/// Where teacher forcing gets each layer's input: the golden's `model.embed_tokens`
/// for layer 0 and `model.layers.{i-1}` for layer `i`, `[batch, T, hidden]`.
pub trait LayerInputs {
    /// The input to `layer` in the current step, or `None` to use the run's own.
    fn layer_input(&self, layer: usize) -> Result<Option<Array3<f64>>>;
}

/// What a [`Session`] carries from one step to the next: enough to resume a run at the
/// start of a step.
#[derive(Debug, Clone)]
pub struct SessionState {
    caches: Vec<KvCache>,
    key_valid: Vec<Vec<bool>>,
    pos_offset: Vec<i64>,
    decode_steps: usize,
}

/// Where a resumed run gets the input to its first computed layer at each step.
pub type ResumeInput<'m> = dyn Fn(Step, usize) -> Result<Array3<f64>> + 'm;

/// A run of steps over one batch.
pub struct Session<'m> {
    model: &'m Llama,
    numerics: &'m dyn Numerics,
    plan: &'m Plan,
    caches: Vec<KvCache>,
    rope: Rope,
    /// `[batch][S]`: whether each filled cache slot holds a real token.
    key_valid: Vec<Vec<bool>>,
    /// Per row: real tokens seen so far (HF `cache_position`-based `pos_offset`).
    pos_offset: Vec<i64>,
    decode_steps: usize,
    watch: Option<std::sync::Arc<Watch>>,
    /// Told as each layer starts ([`RunEvent::Layer`]).
    events: Option<EventSink>,
    /// Layers before this one are not computed; the input to this one comes from
    /// `resume_input` (block replay).
    first_layer: usize,
    resume_input: Option<Box<ResumeInput<'m>>>,
}

impl<'m> Session<'m> {
    /// A session for `batch` rows with room for `max_len` tokens per row.
    pub fn new(
        model: &'m Llama,
        batch: usize,
        max_len: usize,
        numerics: &'m dyn Numerics,
        plan: &'m Plan,
    ) -> Session<'m> {
        let c = &model.config;
        let caches = (0..c.num_hidden_layers)
            .map(|_| KvCache::new(batch, c.kv_heads(), max_len, c.head_dim()))
            .collect();
        let rope = Rope::new(model.rope.clone(), plan.rope_frequencies, plan.angle_precision);
        Session {
            model,
            numerics,
            plan,
            caches,
            rope,
            key_valid: vec![Vec::new(); batch],
            pos_offset: vec![0; batch],
            decode_steps: 0,
            watch: None,
            events: None,
            first_layer: 0,
            resume_input: None,
        }
    }

    /// What this session carries into its next step.
    pub fn state(&self) -> SessionState {
        SessionState {
            caches: self.caches.clone(),
            key_valid: self.key_valid.clone(),
            pos_offset: self.pos_offset.clone(),
            decode_steps: self.decode_steps,
        }
    }

    /// Continues from `state`, as if the steps that led to it had been run here.
    pub fn restore(&mut self, state: SessionState) {
        self.caches = state.caches;
        self.key_valid = state.key_valid;
        self.pos_offset = state.pos_offset;
        self.decode_steps = state.decode_steps;
    }

    /// Takes the caches of layers `..layers` from `state` (the layers a replayed run does
    /// not compute keep the recorded run's caches, which the mask's length follows).
    pub fn restore_caches(&mut self, state: &SessionState, layers: usize) {
        for (mine, theirs) in self.caches.iter_mut().zip(&state.caches).take(layers) {
            mine.clone_from(theirs);
        }
    }

    /// From now on, computes only layers `first..`: the input to layer `first` at each
    /// step is `input(step, first)`, and the sites of earlier layers are not produced.
    pub fn start_at_layer(&mut self, first: usize, input: Box<ResumeInput<'m>>) {
        self.first_layer = first;
        self.resume_input = Some(input);
    }

    /// Shows every site to `watch` as it is produced; once it says stop, each step
    /// returns what it has computed so far.
    pub fn set_watch(&mut self, watch: std::sync::Arc<Watch>) {
        self.watch = Some(watch);
    }

    /// Tells `sink` as each layer of each step starts ([`RunEvent::Layer`]).
    pub fn set_events(&mut self, sink: EventSink) {
        self.events = Some(sink);
    }

    /// Builds the rotary tables once for every position up to `max_position_embeddings`
    /// (a port's precomputed tables, MindFormers `FreqsMgr`), gathered by position after;
    /// only the first `positions` rows are built, the ones a scenario can read.
    pub fn precompute_rope_tables(&mut self, positions: usize) {
        self.rope.precompute(self.numerics, positions);
    }

    /// Whether each token of `ids` `[batch][T]` counts as real at `step`, by the plan's
    /// padding source: the attention mask `[batch][T]`, or `id != pad_token_id`.
    fn real_tokens(
        &self,
        step: Step,
        ids: &[Vec<i64>],
        attention_mask: &[Vec<i64>],
    ) -> Vec<Vec<bool>> {
        match self.plan.at(None, Some(step), None).padding_source {
            PaddingSource::AttentionMask => {
                attention_mask.iter().map(|r| r.iter().map(|&m| m != 0).collect()).collect()
            }
            PaddingSource::TokenIds => {
                let pad = self
                    .model
                    .config
                    .extra
                    .get("pad_token_id")
                    .and_then(serde_json::Value::as_i64)
                    .unwrap_or(0);
                ids.iter().map(|r| r.iter().map(|&i| i != pad).collect()).collect()
            }
        }
    }

    /// The caches, one per layer.
    pub fn caches(&self) -> &[KvCache] {
        &self.caches
    }

    /// Feeds `ids` `[batch][T]` with `attention_mask` `[batch][T]` (1 token, 0 padding):
    /// positions are `pos_offset + cumsum(mask) - 1`, padding slots at 1 (HF `generate`).
    pub fn prefill(
        &mut self,
        ids: &[Vec<i64>],
        attention_mask: &[Vec<i64>],
        teacher: Option<&dyn LayerInputs>,
    ) -> Result<StepOutput> {
        let past = self.caches.first().map_or(0, KvCache::len);
        self.check_batch(ids, past)?;
        let t = ids.first().map_or(0, Vec::len);
        if attention_mask.len() != ids.len() || attention_mask.iter().any(|r| r.len() != t) {
            return Err(Error::scenario("attention_mask", "must have the shape of input_ids"));
        }
        let mut positions = Array2::zeros((ids.len(), t));
        for (b, row) in attention_mask.iter().enumerate() {
            let mut c = self.pos_offset[b];
            for (ti, &m) in row.iter().enumerate() {
                positions[[b, ti]] = if m != 0 {
                    c += 1;
                    c - 1
                } else {
                    1
                };
            }
            self.pos_offset[b] = c;
        }
        let valid = self.real_tokens(Step::Prefill, ids, attention_mask);
        let start = self.begin(Step::Prefill, ids, &valid, positions, past)?;
        let mut outs = self.forward_steps(vec![start], &[teacher])?;
        Ok(outs.pop().expect("one step in, one out"))
    }

    /// Feeds one token per row, `ids` `[batch]`; its position continues the row's count.
    pub fn decode(&mut self, ids: &[i64], teacher: Option<&dyn LayerInputs>) -> Result<StepOutput> {
        let start = self.decode_start(ids, self.caches.first().map_or(0, KvCache::len))?;
        let mut outs = self.forward_steps(vec![start], &[teacher])?;
        Ok(outs.pop().expect("one step in, one out"))
    }

    /// Feeds several decode steps, `steps[j]` `[batch]` the tokens of the `j`-th (each
    /// row's position continuing its count, as [`Session::decode`] step after step), and
    /// returns each step's sites: the same values, bit for bit, as that many calls of
    /// [`Session::decode`], computed a layer at a time for all the steps together so that
    /// each weight is read once per layer instead of once per step. `teachers[j]` is
    /// step `j`'s teacher-forced inputs, if any. Takes no watch: a watched session
    /// (which stops within a step) decodes step by step.
    pub fn decode_steps(
        &mut self,
        steps: &[Vec<i64>],
        teachers: &[Option<&dyn LayerInputs>],
    ) -> Result<Vec<StepOutput>> {
        if self.watch.is_some() {
            let mut outs = Vec::with_capacity(steps.len());
            for (ids, teacher) in steps.iter().zip(teachers) {
                let out = self.decode(ids, *teacher)?;
                let stopped = out.stopped();
                outs.push(out);
                if stopped {
                    break;
                }
            }
            return Ok(outs);
        }
        let past = self.caches.first().map_or(0, KvCache::len);
        let mut starts = Vec::with_capacity(steps.len());
        for (j, ids) in steps.iter().enumerate() {
            // Each decode step holds one token a row: step `j`'s keys go after `j` more.
            starts.push(self.decode_start(ids, past + j)?);
        }
        self.forward_steps(starts, teachers)
    }

    /// How many decode steps [`Session::decode_steps`] takes together with the bits of
    /// step-by-step decoding: as many as keep a product's rows within
    /// [`crate::linear::VECTOR_ROWS`] when one step's do (a product of a few rows reads
    /// each weight row and dots it, a larger one runs the blocked product, and the two
    /// sum in different orders), and all of them when one step's rows are past it
    /// already (each blocked product's element is its own row's chain).
    pub fn decode_group(&self) -> usize {
        let batch = self.pos_offset.len().max(1);
        if batch <= VECTOR_ROWS {
            VECTOR_ROWS / batch
        } else {
            usize::MAX
        }
    }

    /// The positions, validity and step of the next decode step, whose keys go after
    /// `past` filled slots, advancing the rows' counts.
    fn decode_start(&mut self, ids: &[i64], past: usize) -> Result<StepStart> {
        let rows: Vec<Vec<i64>> = ids.iter().map(|&i| vec![i]).collect();
        self.check_batch(&rows, past)?;
        let j = self.decode_steps as i64;
        let step = Step::Decode(self.decode_steps);
        let rule = self.plan.at(None, Some(step), None).decode_positions;
        let positions = Array2::from_shape_fn((ids.len(), 1), |(b, _)| match rule {
            DecodePositions::Continue => self.pos_offset[b],
            DecodePositions::Reset => j,
            DecodePositions::Fixed => 0,
            DecodePositions::Off(by) => self.pos_offset[b] + by,
        });
        for o in &mut self.pos_offset {
            *o += 1;
        }
        self.decode_steps += 1;
        let valid = self.real_tokens(step, &rows, &vec![vec![1]; ids.len()]);
        self.begin(step, &rows, &valid, positions, past)
    }

    /// Checks `ids` `[batch][T]` against the session's rows, and that `T` more slots fit
    /// in the cache after `past` filled ones.
    fn check_batch(&self, ids: &[Vec<i64>], past: usize) -> Result<()> {
        let t = ids.first().map_or(0, Vec::len);
        if ids.len() != self.pos_offset.len() || t == 0 || ids.iter().any(|r| r.len() != t) {
            return Err(Error::scenario(
                "input_ids",
                format!("expected {} rows of equal, non-zero length", self.pos_offset.len()),
            ));
        }
        let room = self.caches.first().map_or(usize::MAX, KvCache::capacity);
        if past + t > room {
            return Err(Error::scenario(
                "input_ids",
                format!("the step overflows the cache of {room} slots"),
            ));
        }
        Ok(())
    }

    /// What a forward call computes before the layers: the embedding, the rotary tables
    /// and the mask of `ids` `[batch][T]` (`valid` `[batch][T]`, `positions`
    /// `[batch, T]`), whose keys go after `past` filled slots.
    fn begin(
        &mut self,
        step: Step,
        ids: &[Vec<i64>],
        valid: &[Vec<bool>],
        positions: Array2<i64>,
        past: usize,
    ) -> Result<StepStart> {
        let (model, n) = (self.model, self.numerics);
        // The seams before the layers, at this step; each layer narrows its own.
        let plan = &self.plan.at(None, Some(step), None);
        let t = ids[0].len();
        let mut out = StepOutput::new(step, self.watch.clone());
        out.put(Site::PositionIds, positions.mapv(|p| p as f64));

        let h = Embedding { weight: &model.weights.embed_tokens }.forward(ids, n)?;
        out.put(Site::EmbedTokens, h.clone());

        let (mut cos, mut sin) = self.rope.tables(&positions, n);
        if plan.rope_tables == RopeTables::Swapped {
            std::mem::swap(&mut cos, &mut sin);
        }
        out.put(Site::RotaryCos, cos.clone());
        out.put(Site::RotarySin, sin.clone());

        for (row, v) in self.key_valid.iter_mut().zip(valid) {
            row.extend_from_slice(v);
        }
        let fill = match plan.mask_fill {
            MaskFill::Convention => n.mask_fill(),
            MaskFill::Overflowing => n.mask_precision().round(OVERFLOWING_FILL),
        };
        let mask = mask::additive(&self.key_valid, past, t, plan.mask_rule, fill);
        out.put(Site::Mask, mask.clone());
        Ok(StepStart { step, out, h, cos, sin, mask })
    }

    /// The forward calls of consecutive steps begun by [`Session::begin`], through the
    /// layers a layer at a time for all of them ([`DecoderLayer::forward_steps`]), then
    /// the final norm and `lm_head` (one product for all the steps): each step's sites,
    /// as one forward call of each step after the other computes them.
    fn forward_steps(
        &mut self,
        starts: Vec<StepStart>,
        teachers: &[Option<&dyn LayerInputs>],
    ) -> Result<Vec<StepOutput>> {
        let (model, n) = (self.model, self.numerics);
        let c = &model.config;
        let w = &model.weights;
        let mut outs = Vec::with_capacity(starts.len());
        let mut hs = Vec::with_capacity(starts.len());
        let mut tables = Vec::with_capacity(starts.len());
        for s in starts {
            outs.push(s.out);
            hs.push(s.h);
            tables.push((s.step, s.cos, s.sin, s.mask));
        }
        let stopped = |outs: &[StepOutput]| outs.iter().any(StepOutput::stopped);
        if stopped(&outs) {
            return Ok(outs);
        }
        let shared: Vec<StepShared> = tables
            .iter()
            .map(|(step, cos, sin, mask)| StepShared {
                step: *step,
                cos: cos.view(),
                sin: sin.view(),
                mask,
            })
            .collect();
        let first = self.first_layer.min(w.layers.len());
        // A layer input from elsewhere (a resumed run, the golden under teacher forcing)
        // replaces the hidden state only with the shape the model computes.
        let replace = |h: &mut Array3<f64>, x: Array3<f64>, i: usize, what: &str| {
            if x.dim() != h.dim() {
                return Err(Error::scenario(
                    format!("model.layers.{i}"),
                    format!("{what} has shape {:?}, expected {:?}", x.shape(), h.shape()),
                ));
            }
            *h = x;
            Ok(())
        };
        if let (true, Some(input)) = (first > 0, &self.resume_input) {
            for (h, sh) in hs.iter_mut().zip(&shared) {
                replace(h, input(sh.step, first)?, first, "the resumed input")?;
            }
        }
        for (i, lw) in w.layers.iter().enumerate().skip(first) {
            for (h, (sh, teacher)) in hs.iter_mut().zip(shared.iter().zip(teachers)) {
                if let Some(sink) = &self.events {
                    sink(&RunEvent::Layer { step: sh.step, layer: i, layers: w.layers.len() });
                }
                if let Some(x) = teacher.map(|t| t.layer_input(i)).transpose()?.flatten() {
                    replace(h, x, i, &format!("the golden's input to layer {i}"))?;
                }
            }
            let layer = DecoderLayer { index: i, weights: lw, config: c, plan: self.plan };
            layer.forward_steps(&mut hs, &shared, &mut self.caches[i], n, &mut outs);
            if stopped(&outs) {
                return Ok(outs);
            }
        }
        let mut xs = Vec::with_capacity(hs.len());
        for (h, (sh, out)) in hs.iter().zip(shared.iter().zip(outs.iter_mut())) {
            let final_norm = self.plan.at(None, Some(sh.step), Some(Component::ModelNorm));
            let x = RmsNorm::planned(&w.norm, c.rms_norm_eps, &final_norm).forward(h, n);
            out.put(Site::Norm, x.clone());
            xs.push(x);
        }
        let logits = match xs.as_slice() {
            [x] => vec![w.lm_head.forward(x, n)],
            _ => {
                let views: Vec<_> = xs.iter().map(Array3::view).collect();
                let x = ndarray::concatenate(Axis(1), &views).expect("the steps share a batch");
                let y = w.lm_head.forward(&x, n);
                let mut at = 0;
                xs.iter()
                    .map(|x| {
                        let t = x.dim().1;
                        at += t;
                        y.slice(s![.., at - t..at, ..]).to_owned()
                    })
                    .collect()
            }
        };
        for (out, y) in outs.iter_mut().zip(logits) {
            out.put(Site::LmHead, y);
        }
        Ok(outs)
    }
}

/// A step's forward call up to the layers ([`Session::begin`]).
struct StepStart {
    step: Step,
    out: StepOutput,
    h: Array3<f64>,
    cos: Array3<f64>,
    sin: Array3<f64>,
    mask: ndarray::Array4<f64>,
}
