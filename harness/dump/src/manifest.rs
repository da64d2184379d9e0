//! `manifest.json` of a dump (CONTRACT §1): format, producer, model config, dtype,
//! scenario and steps.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use contract::error::{Error, Result};
use contract::site::{ShapeDims, Step};

use super::dtype::Precision;

/// The format string every dump carries.
pub const FORMAT: &str = "llama-parity/dump@1";

/// The top-level fields of `manifest.json` this harness implements (CONTRACT §1, §1.2,
/// §5, §6). Any other is refused by name: comparing as if it were absent would judge a
/// run the harness does not reproduce.
pub const FIELDS: [&str; 9] =
    ["format", "producer", "model", "dtype", "scenario", "steps", "weights", "adapter", "train"];

/// What a refused field is, for the message.
fn unimplemented_field(name: &str) -> String {
    format!(
        "field `{name}` is not implemented by this harness: it refuses to compare as if the \
         field were absent"
    )
}

/// HF config keys outside the contract's that leave an inference forward unchanged:
/// token ids, bookkeeping, output switches (values checked where one matters:
/// `model_type` must be `llama`, `pretraining_tp` 1, `attention_dropout` 0).
pub const NEUTRAL_KEYS: [&str; 17] = [
    "model_type",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "initializer_range",
    "use_cache",
    "architectures",
    "torch_dtype",
    "dtype",
    "transformers_version",
    "attention_dropout",
    "pretraining_tp",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "_name_or_path",
    "tokenizer_class",
];

/// HF config keys outside the contract's that RoPE reads (`model::rope`).
pub const ROPE_KEYS: [&str; 2] = ["partial_rotary_factor", "original_max_position_embeddings"];

/// The largest size (layers, heads, widths) a config may give: 2^24.
pub const MAX_SIZE: usize = 1 << 24;

/// The HF `config.json` keys the contract names. Unknown keys are kept in `extra`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ModelConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_key_value_heads: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_parameters: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<Value>,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(flatten)]
    pub extra: serde_json::Map<String, Value>,
}

fn default_act() -> String {
    "silu".to_string()
}

impl ModelConfig {
    /// Per-head dimension: `head_dim` if given, else `hidden_size / num_attention_heads`.
    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Key/value heads: `num_key_value_heads` if given, else `num_attention_heads`.
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// The first config key or value that changes the model and that the implementations
    /// do not build, in words; `None` when the model is one they run as HF does. Keys the
    /// contract names are modelled; of the others, only those that leave an inference
    /// forward unchanged ([`NEUTRAL_KEYS`]) or that RoPE reads ([`ROPE_KEYS`]) pass.
    pub fn unimplemented(&self) -> Option<String> {
        if self.hidden_act != "silu" {
            return Some(format!("hidden_act {:?}: only silu is built", self.hidden_act));
        }
        for (key, value) in &self.extra {
            let neutral = NEUTRAL_KEYS.contains(&key.as_str()) || ROPE_KEYS.contains(&key.as_str());
            if !neutral {
                return Some(format!(
                    "key `{key}` is not implemented by this harness (it may change the model); \
                     refusing to run as if it were absent"
                ));
            }
            match key.as_str() {
                "model_type" if value.as_str() != Some("llama") => {
                    return Some(format!("model_type is {value}: only llama is built"));
                }
                "pretraining_tp" if !(value.is_null() || value.as_u64() == Some(1)) => {
                    return Some(format!("pretraining_tp is {value}: only 1 is built"));
                }
                "attention_dropout" if !(value.is_null() || value.as_f64() == Some(0.0)) => {
                    return Some(format!(
                        "attention_dropout is {value}: only 0 is built (dropout is the \
                         identity at inference, but not in a training step)"
                    ));
                }
                _ => {}
            }
        }
        None
    }

    /// Checks the relations between fields that every implementation relies on.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let bad = |what: String| Err(Error::Config { path: path.to_path_buf(), what });
        if self.num_attention_heads == 0 || self.kv_heads() == 0 {
            return bad("num_attention_heads and num_key_value_heads must be positive".into());
        }
        if !self.num_attention_heads.is_multiple_of(self.kv_heads()) {
            return bad(format!(
                "num_attention_heads ({}) is not a multiple of num_key_value_heads ({})",
                self.num_attention_heads,
                self.kv_heads()
            ));
        }
        if self.head_dim() == 0 || !self.head_dim().is_multiple_of(2) {
            return bad(format!("head_dim ({}) must be positive and even", self.head_dim()));
        }
        if self.hidden_size == 0 || self.vocab_size == 0 || self.intermediate_size == 0 {
            return bad("hidden_size, vocab_size and intermediate_size must be positive".into());
        }
        // Sizes no Llama comes near; past them products of sizes could overflow.
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.kv_heads()),
            ("head_dim", self.head_dim()),
        ] {
            if v > MAX_SIZE {
                return bad(format!(
                    "{name} is {v}, more than the {MAX_SIZE} this harness accepts"
                ));
            }
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps >= 0.0) {
            return bad(format!(
                "rms_norm_eps is {}, expected a finite number >= 0",
                self.rms_norm_eps
            ));
        }
        Ok(())
    }
}

/// The inputs of a run.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Scenario {
    pub name: String,
    /// `[B][P]` prefill tokens.
    pub input_ids: Vec<Vec<i64>>,
    /// `[B][P]`: 1 for a token, 0 for left padding.
    pub attention_mask: Vec<Vec<i64>>,
    /// `[B][N]`: the teacher-forced token of each decode step.
    #[serde(default)]
    pub decode_ids: Vec<Vec<i64>>,
    #[serde(flatten)]
    pub extra: serde_json::Map<String, Value>,
}

impl Scenario {
    pub fn batch(&self) -> usize {
        self.input_ids.len()
    }

    pub fn prefill_len(&self) -> usize {
        self.input_ids.first().map_or(0, |r| r.len())
    }

    pub fn decode_steps(&self) -> usize {
        self.decode_ids.first().map_or(0, |r| r.len())
    }

    /// Whether query row `t` of batch row `b` in `step` is a real token (not padding).
    /// Decode tokens are always real.
    pub fn is_valid_query(&self, step: Step, b: usize, t: usize) -> bool {
        match step {
            Step::Prefill | Step::Train => {
                self.attention_mask.get(b).and_then(|r| r.get(t)).is_none_or(|&m| m != 0)
            }
            Step::Decode(_) => true,
        }
    }

    /// True when some prefill slot is padding.
    pub fn has_padding(&self) -> bool {
        self.attention_mask.iter().flatten().any(|&m| m == 0)
    }

    /// Prefill positions per the contract: `cumsum(mask) - 1`, padding slots set to 1.
    /// `[B][P]`.
    pub fn prefill_positions(&self) -> Vec<Vec<i64>> {
        self.attention_mask
            .iter()
            .map(|row| {
                let mut c = 0i64;
                row.iter()
                    .map(|&m| {
                        c += (m != 0) as i64;
                        if m != 0 {
                            c - 1
                        } else {
                            1
                        }
                    })
                    .collect()
            })
            .collect()
    }

    /// Position of decode step `j` for each row: last prefill position + 1 + j. `[B]`.
    pub fn decode_positions(&self, j: usize) -> Vec<i64> {
        self.attention_mask
            .iter()
            .map(|row| row.iter().filter(|&&m| m != 0).count() as i64 + j as i64)
            .collect()
    }

    fn validate(&self, path: &Path) -> Result<()> {
        let bad = |what: String| Err(Error::Manifest { path: path.to_path_buf(), what });
        let b = self.batch();
        if b == 0 || self.prefill_len() == 0 {
            return bad("scenario.input_ids is empty".into());
        }
        if self.input_ids.iter().any(|r| r.len() != self.prefill_len()) {
            return bad("scenario.input_ids rows differ in length".into());
        }
        if self.attention_mask.len() != b
            || self.attention_mask.iter().any(|r| r.len() != self.prefill_len())
        {
            return bad(format!(
                "scenario.attention_mask must be [{b}][{}] like input_ids",
                self.prefill_len()
            ));
        }
        if !self.decode_ids.is_empty()
            && (self.decode_ids.len() != b
                || self.decode_ids.iter().any(|r| r.len() != self.decode_steps()))
        {
            return bad(format!("scenario.decode_ids must be [{b}][N]"));
        }
        Ok(())
    }
}

/// The manifest's `adapter` field (CONTRACT §5): `{"path": DIR, "merged": BOOL}`, `DIR`
/// a directory inside the dump (relative, without `..`) holding PEFT's files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdapterSpec {
    /// Relative to the dump directory.
    pub path: PathBuf,
    /// `true`: the producer folded `W + s·B·A` into the weights before running.
    pub merged: bool,
}

impl AdapterSpec {
    /// The keys the field holds; any other is refused by name.
    pub const KEYS: [&str; 2] = ["path", "merged"];

    fn parse(v: &Value, path: &Path) -> Result<AdapterSpec> {
        let bad = |what: String| Error::Manifest { path: path.to_path_buf(), what };
        let o = v.as_object().ok_or_else(|| {
            bad("field `adapter` is not an object {\"path\": DIR, \"merged\": BOOL}".into())
        })?;
        if let Some(k) = o.keys().find(|k| !Self::KEYS.contains(&k.as_str())) {
            return Err(bad(format!(
                "field `adapter.{}` is not implemented by this harness (only `path` and \
                 `merged`): refusing to run as if it were absent",
                contract::error::escape_controls(k)
            )));
        }
        let dir = o
            .get("path")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("field `adapter.path` is missing or not a string".into()))?;
        let inside = !dir.is_empty()
            && Path::new(dir).components().all(|c| matches!(c, std::path::Component::Normal(_)));
        if !inside {
            return Err(bad(format!(
                "field `adapter.path` is {dir:?}: not a directory inside the dump (a relative \
                 path without `..`)"
            )));
        }
        let merged = o
            .get("merged")
            .and_then(Value::as_bool)
            .ok_or_else(|| bad("field `adapter.merged` is missing or not a boolean".into()))?;
        Ok(AdapterSpec { path: PathBuf::from(dir), merged })
    }
}

/// What is trained (CONTRACT §6 `trainable`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trainable {
    /// Every parameter of the model.
    All,
    /// Only the LoRA adapter's parameters (the manifest has an `adapter`).
    Adapter,
}

/// The loss scale of a training step (CONTRACT §6 `loss_scale`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LossScale {
    None,
    /// Gradients of `loss × value`, divided by `value` before clipping.
    Static(f64),
    /// As `Static` for this one step, from the scaler's current `value`; an overflow
    /// skips the step (and would lower the scale for the next).
    Dynamic(f64),
}

impl LossScale {
    /// The factor the loss is multiplied by (1 without a scale).
    pub fn value(self) -> f64 {
        match self {
            LossScale::None => 1.0,
            LossScale::Static(v) | LossScale::Dynamic(v) => v,
        }
    }
}

/// The optimizer of a training step (CONTRACT §6 `optimizer`): the first AdamW step
/// from zero moments.
#[derive(Debug, Clone, PartialEq)]
pub struct AdamW {
    pub lr: f64,
    pub betas: (f64, f64),
    pub eps: f64,
    pub weight_decay: f64,
    /// Glob patterns (`*` any run of characters) over HF/PEFT parameter names that get
    /// no weight decay.
    pub no_decay: Vec<String>,
}

impl AdamW {
    /// Whether parameter `name` is in the no-decay group.
    pub fn is_no_decay(&self, name: &str) -> bool {
        self.no_decay.iter().any(|p| glob_match(p, name))
    }
}

/// `*` matches any run of characters (possibly empty); every other character itself.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let (p, n) = (pattern.as_bytes(), name.as_bytes());
    let (mut pi, mut ni, mut star, mut mark) = (0, 0, None, 0);
    while ni < n.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some(pi);
            pi += 1;
            mark = ni;
        } else if pi < p.len() && p[pi] == n[ni] {
            pi += 1;
            ni += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ni = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

/// The manifest's `train` field (CONTRACT §6): one training step.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainSpec {
    /// `[B][P]`; -100 is ignored.
    pub labels: Vec<Vec<i64>>,
    /// The batch split in this many equal parts, gradients averaged.
    pub micro_batches: usize,
    pub trainable: Trainable,
    pub optimizer: AdamW,
    /// `None`: no clipping; else clipping by the global norm.
    pub max_grad_norm: Option<f64>,
    pub loss_scale: LossScale,
}

impl TrainSpec {
    /// The keys the field holds; any other is refused by name.
    pub const KEYS: [&str; 6] =
        ["labels", "micro_batches", "trainable", "optimizer", "max_grad_norm", "loss_scale"];
    /// The keys of `optimizer`.
    pub const OPTIMIZER_KEYS: [&str; 6] =
        ["name", "lr", "betas", "eps", "weight_decay", "no_decay"];
    /// The keys of `loss_scale`.
    pub const LOSS_SCALE_KEYS: [&str; 2] = ["kind", "value"];
    /// The label ignored by the loss.
    pub const IGNORE_INDEX: i64 = -100;

    fn parse(v: &Value, scenario: &Scenario, path: &Path) -> Result<TrainSpec> {
        let bad = |what: String| Error::Manifest { path: path.to_path_buf(), what };
        let unknown = |field: &str, o: &serde_json::Map<String, Value>, keys: &[&str]| {
            o.keys().find(|k| !keys.contains(&k.as_str())).map(|k| {
                bad(format!(
                    "field `{field}.{}` is not implemented by this harness: refusing to run as \
                     if it were absent",
                    contract::error::escape_controls(k)
                ))
            })
        };
        let o = v.as_object().ok_or_else(|| bad("field `train` is not an object".into()))?;
        if let Some(e) = unknown("train", o, &Self::KEYS) {
            return Err(e);
        }
        let get = |k: &str| o.get(k).ok_or_else(|| bad(format!("field `train.{k}` is missing")));
        let num = |v: &Value, what: &str| {
            v.as_f64()
                .filter(|x| x.is_finite())
                .ok_or_else(|| bad(format!("field `{what}` is not a finite number")))
        };
        let labels: Vec<Vec<i64>> = serde_json::from_value(get("labels")?.clone())
            .map_err(|e| bad(format!("field `train.labels`: {e}")))?;
        let (b, p) = (scenario.batch(), scenario.prefill_len());
        if labels.len() != b || labels.iter().any(|r| r.len() != p) {
            return Err(bad(format!("field `train.labels` must be [{b}][{p}], like input_ids")));
        }
        let micro_batches =
            get("micro_batches")?.as_u64().filter(|&n| n >= 1).ok_or_else(|| {
                bad("field `train.micro_batches` is not a positive integer".into())
            })? as usize;
        if b % micro_batches != 0 {
            return Err(bad(format!(
                "field `train.micro_batches` is {micro_batches}: it does not split the batch of \
                 {b} in equal parts"
            )));
        }
        let trainable = match get("trainable")?.as_str() {
            Some("all") => Trainable::All,
            Some("adapter") => Trainable::Adapter,
            _ => return Err(bad("field `train.trainable` is not \"all\" or \"adapter\"".into())),
        };
        let ov = get("optimizer")?;
        let oo =
            ov.as_object().ok_or_else(|| bad("field `train.optimizer` is not an object".into()))?;
        if let Some(e) = unknown("train.optimizer", oo, &Self::OPTIMIZER_KEYS) {
            return Err(e);
        }
        let oget = |k: &str| {
            oo.get(k).ok_or_else(|| bad(format!("field `train.optimizer.{k}` is missing")))
        };
        match oget("name")?.as_str() {
            Some("adamw") => {}
            other => {
                return Err(bad(format!(
                    "field `train.optimizer.name` is {}: only \"adamw\" is implemented",
                    other.map_or("not a string".to_string(), |s| format!("{s:?}"))
                )))
            }
        }
        let betas = oget("betas")?
            .as_array()
            .filter(|a| a.len() == 2)
            .ok_or_else(|| bad("field `train.optimizer.betas` is not [beta1, beta2]".into()))?;
        let no_decay: Vec<String> = serde_json::from_value(oget("no_decay")?.clone())
            .map_err(|e| bad(format!("field `train.optimizer.no_decay`: {e}")))?;
        let optimizer = AdamW {
            lr: num(oget("lr")?, "train.optimizer.lr")?,
            betas: (
                num(&betas[0], "train.optimizer.betas[0]")?,
                num(&betas[1], "train.optimizer.betas[1]")?,
            ),
            eps: num(oget("eps")?, "train.optimizer.eps")?,
            weight_decay: num(oget("weight_decay")?, "train.optimizer.weight_decay")?,
            no_decay,
        };
        let max_grad_norm = match get("max_grad_norm")? {
            Value::Null => None,
            v => Some(num(v, "train.max_grad_norm")?).filter(|&x| x > 0.0).map(Some).ok_or_else(
                || bad("field `train.max_grad_norm` is not a positive number or null".into()),
            )?,
        };
        let lv = get("loss_scale")?;
        let lo = lv
            .as_object()
            .ok_or_else(|| bad("field `train.loss_scale` is not an object".into()))?;
        if let Some(e) = unknown("train.loss_scale", lo, &Self::LOSS_SCALE_KEYS) {
            return Err(e);
        }
        let value = || -> Result<f64> {
            lo.get("value")
                .ok_or_else(|| bad("field `train.loss_scale.value` is missing".into()))
                .and_then(|v| num(v, "train.loss_scale.value"))
                .and_then(|x| {
                    if x > 0.0 {
                        Ok(x)
                    } else {
                        Err(bad("field `train.loss_scale.value` is not positive".into()))
                    }
                })
        };
        let loss_scale = match lo.get("kind").and_then(Value::as_str) {
            Some("none") => LossScale::None,
            Some("static") => LossScale::Static(value()?),
            Some("dynamic") => LossScale::Dynamic(value()?),
            _ => {
                return Err(bad(
                    "field `train.loss_scale.kind` is not \"none\", \"static\" or \"dynamic\""
                        .into(),
                ))
            }
        };
        Ok(TrainSpec { labels, micro_batches, trainable, optimizer, max_grad_norm, loss_scale })
    }
}

/// A parsed `manifest.json`. The original JSON is kept so that fields this version
/// does not model survive a rewrite.
#[derive(Debug, Clone)]
pub struct Manifest {
    pub producer: Value,
    pub model: ModelConfig,
    pub dtype: Precision,
    pub scenario: Scenario,
    pub steps: Vec<Step>,
    /// The LoRA adapter the run was made with (CONTRACT §5), if any.
    pub adapter: Option<AdapterSpec>,
    /// One training step (CONTRACT §6), if the dump is one: `steps` is then `["train"]`.
    pub train: Option<TrainSpec>,
    pub raw: Value,
}

impl Manifest {
    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<Manifest> {
        let text = super::read::read_json_text(path)?;
        Manifest::parse(&text, path)
    }

    /// Parses manifest text; `path` is only used in messages.
    pub fn parse(text: &str, path: &Path) -> Result<Manifest> {
        let bad = |what: String| Error::Manifest { path: path.to_path_buf(), what };
        let raw: Value =
            serde_json::from_str(text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
        let obj = raw.as_object().ok_or_else(|| bad("not a JSON object".into()))?;
        let field =
            |name: &str| obj.get(name).ok_or_else(|| bad(format!("missing field `{name}`")));
        let format = field("format")?
            .as_str()
            .ok_or_else(|| bad("field `format` is not a string".into()))?;
        if format != FORMAT {
            return Err(bad(format!("field `format` is {format:?}, expected {FORMAT:?}")));
        }
        if let Some(name) = obj.keys().find(|k| !FIELDS.contains(&k.as_str())) {
            return Err(bad(unimplemented_field(name)));
        }
        let producer = field("producer")?.clone();
        let model: ModelConfig = serde_json::from_value(field("model")?.clone())
            .map_err(|e| bad(format!("field `model`: {e}")))?;
        let dtype_s =
            field("dtype")?.as_str().ok_or_else(|| bad("field `dtype` is not a string".into()))?;
        let dtype = Precision::parse(dtype_s).ok_or_else(|| {
            bad(format!("field `dtype` is {dtype_s:?}, expected float32, bfloat16 or float16"))
        })?;
        let scenario: Scenario = serde_json::from_value(field("scenario")?.clone())
            .map_err(|e| bad(format!("field `scenario`: {e}")))?;
        let steps_v = field("steps")?
            .as_array()
            .ok_or_else(|| bad("field `steps` is not an array".into()))?;
        let mut steps = Vec::with_capacity(steps_v.len());
        for s in steps_v {
            let name =
                s.as_str().ok_or_else(|| bad(format!("field `steps`: {s} is not a string")))?;
            steps.push(Step::parse(name).ok_or_else(|| {
                bad(format!(
                    "field `steps`: {name:?} is not \"prefill\", \"decode.N\" or \"train\""
                ))
            })?);
        }
        if steps.is_empty() {
            return Err(bad("field `steps` is empty".into()));
        }
        let mut seen = std::collections::BTreeSet::new();
        for s in &steps {
            if !seen.insert(*s) {
                return Err(bad(format!("field `steps`: {s} is listed twice")));
            }
        }
        scenario.validate(path)?;
        for s in &steps {
            if let Step::Decode(j) = s {
                if *j >= scenario.decode_steps() {
                    return Err(bad(format!(
                        "field `steps`: {s} has no decode token (scenario.decode_ids holds {})",
                        scenario.decode_steps()
                    )));
                }
            }
        }
        model.validate(path)?;
        let adapter = obj.get("adapter").map(|v| AdapterSpec::parse(v, path)).transpose()?;
        let train = obj.get("train").map(|v| TrainSpec::parse(v, &scenario, path)).transpose()?;
        if train.is_some() && steps != [Step::Train] {
            return Err(bad("field `steps` must be [\"train\"] in a dump with `train`".into()));
        }
        if train.is_none() && steps.contains(&Step::Train) {
            return Err(bad(
                "field `steps` holds \"train\" but the manifest has no `train` field".into()
            ));
        }
        if let (Some(t), None) = (&train, &adapter) {
            if t.trainable == Trainable::Adapter {
                return Err(bad(
                    "field `train.trainable` is \"adapter\" but the manifest has no `adapter`"
                        .into(),
                ));
            }
        }
        Ok(Manifest { producer, model, dtype, scenario, steps, adapter, train, raw })
    }

    /// The manifest as JSON: the original document with the modelled fields written back.
    pub fn to_json(&self) -> Value {
        let mut v = self.raw.clone();
        if !v.is_object() {
            v = Value::Object(Default::default());
        }
        let o = v.as_object_mut().expect("object");
        o.insert("format".into(), FORMAT.into());
        o.insert("producer".into(), self.producer.clone());
        o.insert("model".into(), serde_json::to_value(&self.model).unwrap_or(Value::Null));
        o.insert("dtype".into(), self.dtype.name().into());
        o.insert("scenario".into(), serde_json::to_value(&self.scenario).unwrap_or(Value::Null));
        o.insert("steps".into(), self.steps.iter().map(|s| Value::from(s.to_string())).collect());
        v
    }

    /// The sizes the contract's site shapes are made of, for this model and scenario.
    pub fn shape_dims(&self) -> ShapeDims {
        let m = &self.model;
        ShapeDims {
            batch: self.scenario.batch(),
            prefill: self.scenario.prefill_len(),
            heads: m.num_attention_heads,
            kv_heads: m.kv_heads(),
            head_dim: m.head_dim(),
            hidden: m.hidden_size,
            vocab: m.vocab_size,
            intermediate: m.intermediate_size,
        }
    }

    /// The producer's framework name, if it gave one.
    pub fn framework(&self) -> &str {
        self.producer.get("framework").and_then(Value::as_str).unwrap_or("unknown")
    }
}
