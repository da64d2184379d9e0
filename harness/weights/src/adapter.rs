//! A PEFT LoRA adapter as PEFT's `save_pretrained` writes it (CONTRACT §5):
//! `adapter_config.json` (PEFT's `LoraConfig`) and `adapter_model.safetensors`
//! (`base_model.model.<module>.lora_A.weight` `[r, in]`, `...lora_B.weight` `[out, r]`).
//!
//! A module's output is `W x + s · B(A(x))` with `s = lora_alpha / r`, or
//! `lora_alpha / sqrt(r)` under `use_rslora` (PEFT `LoraLayer.update_layer`). `r` and
//! `lora_alpha` are overridden per module by `rank_pattern` / `alpha_pattern`, matched as
//! PEFT 0.21's `get_pattern_key` matches them: the first key (in the file's order) for
//! which `re.match(rf"(.*\.)?({key})$", module)` succeeds. `target_modules` is matched as
//! PEFT's `check_target_module_exists`: a list matches a module named exactly so or
//! ending in `.<entry>`; a string is a regex that must match the whole module name
//! (`re.fullmatch`); `"all-linear"` is every projection (never `lm_head`).
//!
//! Module names are those of `LlamaForCausalLM.named_modules()`:
//! `model.layers.{i}.self_attn.q_proj`, `model.layers.{i}.mlp.gate_proj`, ...
//!
//! Fail closed: a config field that changes the model and is not built here (DoRA,
//! `lora_bias`, `bias` other than `none`, `modules_to_save`, layer selection, ...), a
//! field this module does not know, a target outside the seven projections, a tensor
//! missing, extra or of the wrong shape: each is an error naming the field or tensor and
//! the file. A pattern PEFT would read as a Python regex that Rust's `regex` cannot
//! compile (look-around, back-references) is refused by name, never matched otherwise.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::{Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::Value;

use contract::error::{Error, Result};
use contract::fault::Component;
use dump::{DType, ModelConfig, SafetensorsFile, Tensor};

/// PEFT's config file in an adapter directory.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// PEFT's weights file in an adapter directory.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// The prefix PEFT gives every tensor name (`PeftModel` → `LoraModel` → the HF model).
pub const KEY_PREFIX: &str = "base_model.model.";

/// The seven projections an adapter may target, in compute order.
pub const PROJECTIONS: [Component; 7] = [
    Component::QProj,
    Component::KProj,
    Component::VProj,
    Component::OProj,
    Component::GateProj,
    Component::UpProj,
    Component::DownProj,
];

/// `LoraConfig` fields that are read and built here.
const IMPLEMENTED: [&str; 8] = [
    "r",
    "lora_alpha",
    "use_rslora",
    "target_modules",
    "rank_pattern",
    "alpha_pattern",
    "lora_dropout",
    "bias",
];

/// `LoraConfig` fields that leave an inference forward unchanged whatever their value:
/// bookkeeping, and initialisation schemes (the saved tensors are what runs; a scheme
/// that rewrites the base weights, as PiSSA does, shows in the golden's own weights).
const NEUTRAL: [&str; 17] = [
    "peft_type",
    "peft_version",
    "task_type",
    "auto_mapping",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "init_lora_weights",
    "loftq_config",
    "eva_config",
    "corda_config",
    "lora_ga_config",
    "megatron_core",
    "qalora_group_size",
    "ensure_weight_tying",
    "runtime_config",
    "target_modules_to_tie",
];

/// `LoraConfig` fields that change the model unless they hold their default (null,
/// false, an empty list or object): refused by name when set, since nothing here
/// builds them.
const UNIMPLEMENTED_UNLESS_DEFAULT: [&str; 18] = [
    "use_dora",
    "lora_bias",
    "fan_in_fan_out",
    "modules_to_save",
    "layers_to_transform",
    "layers_pattern",
    "exclude_modules",
    "target_parameters",
    "layer_replication",
    "trainable_token_indices",
    "megatron_config",
    "use_qalora",
    "alora_invocation_tokens",
    "arrow_config",
    "kasa_config",
    "monteclora_config",
    "velora_config",
    "use_bdlora",
];

/// The module name of projection `c` of layer `layer` in `LlamaForCausalLM`:
/// `model.layers.{layer}.self_attn.q_proj`, `model.layers.{layer}.mlp.up_proj`, ...
pub fn module_name(layer: usize, c: Component) -> String {
    let parent = match c {
        Component::GateProj | Component::UpProj | Component::DownProj => "mlp",
        _ => "self_attn",
    };
    format!("model.layers.{layer}.{parent}.{}", c.name())
}

/// `(out, in)` of projection `c`: `q_proj` `[nH·D, H]`, `k_proj`/`v_proj` `[nKV·D, H]`,
/// `o_proj` `[H, nH·D]`, `gate_proj`/`up_proj` `[I, H]`, `down_proj` `[H, I]`.
pub fn projection_shape(cfg: &ModelConfig, c: Component) -> (usize, usize) {
    let (h, d, i) = (cfg.hidden_size, cfg.head_dim(), cfg.intermediate_size);
    match c {
        Component::QProj => (cfg.num_attention_heads * d, h),
        Component::KProj | Component::VProj => (cfg.kv_heads() * d, h),
        Component::OProj => (h, cfg.num_attention_heads * d),
        Component::GateProj | Component::UpProj => (i, h),
        Component::DownProj => (h, i),
        _ => (0, 0),
    }
}

/// Every module name of a `LlamaForCausalLM` with `layers` decoder layers that
/// `target_modules` could name (the projections, and the modules PEFT would adapt
/// or refuse that this harness does not build).
fn model_modules(layers: usize) -> Vec<String> {
    let mut v: Vec<String> = ["model", "model.embed_tokens", "model.layers", "model.norm"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    v.push("model.rotary_emb".into());
    v.push("lm_head".into());
    for i in 0..layers {
        let p = format!("model.layers.{i}");
        for s in ["", ".self_attn", ".mlp", ".mlp.act_fn", ".input_layernorm"] {
            v.push(format!("{p}{s}"));
        }
        v.push(format!("{p}.post_attention_layernorm"));
        v.extend(PROJECTIONS.iter().map(|&c| module_name(i, c)));
    }
    v
}

/// `target_modules` as PEFT reads it.
#[derive(Debug, Clone, PartialEq)]
pub enum TargetModules {
    /// Module names or name suffixes (`q_proj`, `self_attn.q_proj`).
    List(Vec<String>),
    /// A Python regex matched against the whole module name (`re.fullmatch`).
    Regex(String),
    /// `"all-linear"`: every linear layer but the output layer.
    AllLinear,
}

/// A pattern map (`rank_pattern`, `alpha_pattern`) in the file's key order, which
/// decides which key wins when several match a module (PEFT takes the first).
#[derive(Debug, Clone, Default, PartialEq)]
struct Ordered(Vec<(String, Value)>);

impl<'de> Deserialize<'de> for Ordered {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Ordered, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Ordered;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object")
            }
            fn visit_unit<E>(self) -> std::result::Result<Ordered, E> {
                Ok(Ordered::default())
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut m: A,
            ) -> std::result::Result<Ordered, A::Error> {
                let mut v: Vec<(String, Value)> = Vec::new();
                while let Some((k, val)) = m.next_entry::<String, Value>()? {
                    // Python's json keeps a repeated key's first position, last value.
                    match v.iter_mut().find(|(key, _)| *key == k) {
                        Some(e) => e.1 = val,
                        None => v.push((k, val)),
                    }
                }
                Ok(Ordered(v))
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Deserialize)]
struct Patterns {
    #[serde(default)]
    rank_pattern: Option<Ordered>,
    #[serde(default)]
    alpha_pattern: Option<Ordered>,
}

/// One pattern key with its compiled regex and the value it gives.
#[derive(Debug, Clone)]
pub struct PatternEntry<T> {
    /// The key as written (a Python regex).
    pub key: String,
    pub value: T,
    regex: regex::Regex,
}

/// Compiles a Python regex PEFT would use, wrapped as `wrap` says; the regex crate's
/// syntax is Python's for everything PEFT configs use in practice (classes, `.`, `|`,
/// `\d`, groups); what it lacks (look-around, back-references) is refused.
fn compile(file: &Path, field: &str, pattern: &str, anchored: &str) -> Result<regex::Regex> {
    regex::RegexBuilder::new(anchored).size_limit(1 << 20).build().map_err(|e| {
        Error::format(
            file,
            format!(
                "field `{field}`: pattern {pattern:?} cannot be matched as PEFT matches it \
                     (a Python regex this harness cannot compile: {})",
                e.to_string().lines().last().unwrap_or("invalid")
            ),
        )
    })
}

/// PEFT's `LoraConfig`, the fields that shape an inference forward.
#[derive(Debug, Clone)]
pub struct AdapterConfig {
    /// `adapter_config.json`, for messages.
    pub path: PathBuf,
    /// Default rank.
    pub r: usize,
    /// Default alpha.
    pub lora_alpha: f64,
    /// Scaling `alpha / sqrt(r)` instead of `alpha / r`.
    pub use_rslora: bool,
    pub target_modules: TargetModules,
    /// Per-module rank, first matching key wins.
    pub rank_pattern: Vec<PatternEntry<usize>>,
    /// Per-module alpha, first matching key wins.
    pub alpha_pattern: Vec<PatternEntry<f64>>,
    /// The identity at inference; kept for the record.
    pub lora_dropout: f64,
    target_regex: Option<regex::Regex>,
}

/// The LoRA scaling PEFT computes: `alpha / r`, or `alpha / sqrt(r)` under rsLoRA.
pub fn scaling(r: usize, alpha: f64, use_rslora: bool) -> f64 {
    if use_rslora {
        alpha / (r as f64).sqrt()
    } else {
        alpha / r as f64
    }
}

/// True when `v` is a field's default: null, false, 0-less empty list / object / string.
fn is_default(v: &Value) -> bool {
    match v {
        Value::Null | Value::Bool(false) => true,
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        Value::String(s) => s.is_empty(),
        _ => false,
    }
}

impl AdapterConfig {
    /// Reads `adapter_config.json` at `path`.
    pub fn load(path: &Path) -> Result<AdapterConfig> {
        let text = dump::read::read_json_text(path)?;
        AdapterConfig::parse(&text, path)
    }

    /// Parses the text of an `adapter_config.json`; `path` names it in messages.
    pub fn parse(text: &str, path: &Path) -> Result<AdapterConfig> {
        let bad = |what: String| Error::format(path, what);
        let raw: Value =
            serde_json::from_str(text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
        let obj = raw.as_object().ok_or_else(|| bad("not a JSON object".into()))?;
        for (key, value) in obj {
            let k = key.as_str();
            if IMPLEMENTED.contains(&k) || NEUTRAL.contains(&k) {
                continue;
            }
            if UNIMPLEMENTED_UNLESS_DEFAULT.contains(&k) {
                if is_default(value) {
                    continue;
                }
                return Err(bad(format!(
                    "field `{k}` is {value}: not implemented by this harness (it changes the \
                     adapted model); refusing to run as if it were absent"
                )));
            }
            return Err(bad(format!(
                "field `{}` is not a LoraConfig field this harness knows (it may change the \
                 adapted model); refusing to run as if it were absent",
                contract::error::escape_controls(k)
            )));
        }
        if let Some(t) = obj.get("peft_type") {
            if t.as_str() != Some("LORA") {
                return Err(bad(format!("field `peft_type` is {t}: only LORA is built")));
            }
        }
        let r = obj
            .get("r")
            .and_then(Value::as_u64)
            .filter(|&r| r > 0 && r <= 1 << 20)
            .ok_or_else(|| bad("field `r` is missing or not a positive integer".into()))?
            as usize;
        let lora_alpha =
            obj.get("lora_alpha").and_then(Value::as_f64).filter(|a| a.is_finite()).ok_or_else(
                || bad("field `lora_alpha` is missing or not a finite number".into()),
            )?;
        let use_rslora = match obj.get("use_rslora") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(v) => return Err(bad(format!("field `use_rslora` is {v}, not a boolean"))),
        };
        let lora_dropout = match obj.get("lora_dropout") {
            None | Some(Value::Null) => 0.0,
            Some(v) => v
                .as_f64()
                .filter(|p| (0.0..1.0).contains(p))
                .ok_or_else(|| bad(format!("field `lora_dropout` is {v}, not in [0, 1)")))?,
        };
        match obj.get("bias") {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) if s == "none" => {}
            Some(v) => {
                return Err(bad(format!(
                    "field `bias` is {v}: only \"none\" is implemented (a trained bias changes \
                     the adapted model)"
                )))
            }
        }
        let (target_modules, target_regex) = match obj.get("target_modules") {
            Some(Value::String(s)) if s == "all-linear" => (TargetModules::AllLinear, None),
            Some(Value::String(s)) => {
                let re = compile(path, "target_modules", s, &format!("^(?:{s})$"))?;
                (TargetModules::Regex(s.clone()), Some(re))
            }
            Some(Value::Array(a)) => {
                let mut names = Vec::with_capacity(a.len());
                for v in a {
                    names.push(
                        v.as_str()
                            .ok_or_else(|| {
                                bad(format!("field `target_modules`: {v} is not a module name"))
                            })?
                            .to_string(),
                    );
                }
                if names.is_empty() {
                    return Err(
                        bad("field `target_modules` is empty: no module is adapted".into()),
                    );
                }
                (TargetModules::List(names), None)
            }
            Some(v) => {
                return Err(bad(format!(
                    "field `target_modules` is {v}: expected a list of names or a regex string"
                )))
            }
            None => return Err(bad("field `target_modules` is missing".into())),
        };
        let patterns: Patterns = serde_json::from_str(text)
            .map_err(|e| bad(format!("field `rank_pattern` / `alpha_pattern`: {e}")))?;
        let mut rank_pattern = Vec::new();
        for (key, v) in patterns.rank_pattern.unwrap_or_default().0 {
            let value = v.as_u64().filter(|&r| r > 0 && r <= 1 << 20).ok_or_else(|| {
                bad(format!("field `rank_pattern.{key}` is {v}, not a positive integer"))
            })? as usize;
            let regex = compile(path, "rank_pattern", &key, &format!(r"^(?:.*\.)?(?:{key})$"))?;
            rank_pattern.push(PatternEntry { key, value, regex });
        }
        let mut alpha_pattern = Vec::new();
        for (key, v) in patterns.alpha_pattern.unwrap_or_default().0 {
            let value = v.as_f64().filter(|a| a.is_finite()).ok_or_else(|| {
                bad(format!("field `alpha_pattern.{key}` is {v}, not a finite number"))
            })?;
            let regex = compile(path, "alpha_pattern", &key, &format!(r"^(?:.*\.)?(?:{key})$"))?;
            alpha_pattern.push(PatternEntry { key, value, regex });
        }
        Ok(AdapterConfig {
            path: path.to_path_buf(),
            r,
            lora_alpha,
            use_rslora,
            target_modules,
            rank_pattern,
            alpha_pattern,
            lora_dropout,
            target_regex,
        })
    }

    /// Whether `module` (a `named_modules()` name) is a LoRA target, as PEFT decides.
    pub fn targets(&self, module: &str) -> bool {
        match &self.target_modules {
            TargetModules::AllLinear => {
                PROJECTIONS.iter().any(|c| module.ends_with(&format!(".{}", c.name())))
                    && module.starts_with("model.layers.")
            }
            TargetModules::Regex(_) => {
                self.target_regex.as_ref().is_some_and(|re| re.is_match(module))
            }
            TargetModules::List(names) => {
                names.iter().any(|t| module == t || module.ends_with(&format!(".{t}")))
            }
        }
    }

    /// The rank of `module`: its first matching `rank_pattern` key's, else `r`.
    pub fn rank_of(&self, module: &str) -> usize {
        self.rank_pattern.iter().find(|p| p.regex.is_match(module)).map_or(self.r, |p| p.value)
    }

    /// The alpha of `module`: its first matching `alpha_pattern` key's, else `lora_alpha`.
    pub fn alpha_of(&self, module: &str) -> f64 {
        self.alpha_pattern
            .iter()
            .find(|p| p.regex.is_match(module))
            .map_or(self.lora_alpha, |p| p.value)
    }

    /// The scaling `s` of `module` (see [`scaling`]).
    pub fn scaling_of(&self, module: &str) -> f64 {
        scaling(self.rank_of(module), self.alpha_of(module), self.use_rslora)
    }

    /// Whether a pattern changes the rank or alpha of any module.
    pub fn has_patterns(&self) -> bool {
        !self.rank_pattern.is_empty() || !self.alpha_pattern.is_empty()
    }
}

/// The adapter of one projection of one layer.
#[derive(Debug, Clone)]
pub struct ModuleAdapter {
    pub layer: usize,
    /// Which projection (one of [`PROJECTIONS`]).
    pub projection: Component,
    /// This module's rank (after `rank_pattern`).
    pub rank: usize,
    /// This module's alpha (after `alpha_pattern`).
    pub alpha: f64,
    /// `s` applied to `B(A(x))`.
    pub scaling: f64,
    /// `[rank, in]`, stored dtype.
    pub a: Tensor,
    /// `[out, rank]`, stored dtype.
    pub b: Tensor,
    /// The tensor names in `adapter_model.safetensors`.
    pub a_key: String,
    pub b_key: String,
}

impl ModuleAdapter {
    /// The module name (`model.layers.0.self_attn.q_proj`).
    pub fn module(&self) -> String {
        module_name(self.layer, self.projection)
    }
}

/// A LoRA adapter, validated against the model it adapts.
#[derive(Debug, Clone)]
pub struct Adapter {
    /// The adapter directory.
    pub dir: PathBuf,
    pub config: AdapterConfig,
    /// Every adapted projection, by layer then compute order.
    pub modules: Vec<ModuleAdapter>,
}

/// What a report shows of an adapter: the defaults and the scaling of each module.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdapterFacts {
    pub r: usize,
    pub lora_alpha: f64,
    pub use_rslora: bool,
    /// `true`: the weights hold `W + s·B·A` already.
    pub merged: bool,
    /// The modules adapted, e.g. `q_proj, v_proj`.
    pub targets: Vec<String>,
    /// Per module where its rank, alpha or scaling differs from the defaults', and one
    /// entry per projection otherwise: `{module, r, alpha, scaling}`.
    pub modules: Vec<ModuleFacts>,
}

/// The rank, alpha and scaling of one adapted module: a projection (`q_proj`) when every
/// layer's agrees, else one layer's (`layers.1.up_proj`).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ModuleFacts {
    pub module: String,
    pub r: usize,
    pub alpha: f64,
    pub scaling: f64,
}

impl AdapterFacts {
    /// One line: `r 4, alpha 8, unmerged; q_proj s=2, ...`.
    pub fn line(&self) -> String {
        let modules: Vec<String> = self
            .modules
            .iter()
            .map(|m| format!("{} r={} alpha={} s={}", m.module, m.r, m.alpha, short(m.scaling)))
            .collect();
        format!(
            "LoRA r {}, alpha {}{}, {}; {}",
            self.r,
            self.lora_alpha,
            if self.use_rslora { ", rsLoRA" } else { "" },
            if self.merged { "merged into the weights" } else { "unmerged" },
            modules.join(", ")
        )
    }
}

/// A scaling as a short number (`2`, `5.657`).
fn short(x: f64) -> String {
    let s = format!("{x:.4}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

impl Adapter {
    /// Opens the adapter directory `dir` (`adapter_config.json` and
    /// `adapter_model.safetensors`) for the model `cfg`, and checks it: every target is a
    /// projection, every targeted module has `lora_A` `[r, in]` and `lora_B` `[out, r]`
    /// with its own rank, no tensor is left over, and every tensor is floating point.
    pub fn open(dir: &Path, cfg: &ModelConfig) -> Result<Adapter> {
        let config = AdapterConfig::load(&dir.join(CONFIG_FILE))?;
        let weights_path = dir.join(WEIGHTS_FILE);
        if !weights_path.is_file() {
            return Err(Error::format(
                &weights_path,
                "missing: an adapter directory holds adapter_config.json and \
                 adapter_model.safetensors (PEFT save_pretrained)",
            ));
        }
        let file = SafetensorsFile::open(&weights_path)?;
        Adapter::from_parts(dir, config, &file, cfg)
    }

    /// [`Adapter::open`] with the config and the weights file already read.
    pub fn from_parts(
        dir: &Path,
        config: AdapterConfig,
        file: &SafetensorsFile,
        cfg: &ModelConfig,
    ) -> Result<Adapter> {
        let layers = cfg.num_hidden_layers;
        let projection_modules: BTreeMap<String, (usize, Component)> = (0..layers)
            .flat_map(|i| PROJECTIONS.iter().map(move |&c| (module_name(i, c), (i, c))))
            .collect();
        for m in model_modules(layers) {
            if config.targets(&m) && !projection_modules.contains_key(&m) {
                return Err(Error::format(
                    &config.path,
                    format!(
                        "field `target_modules` adapts `{m}`: only the seven projections \
                         (q_proj ... down_proj) are built"
                    ),
                ));
            }
        }
        let fpath = file.path().to_path_buf();
        let mut used = std::collections::BTreeSet::new();
        let mut modules = Vec::new();
        for (name, &(layer, c)) in &projection_modules {
            if !config.targets(name) {
                continue;
            }
            let rank = config.rank_of(name);
            let alpha = config.alpha_of(name);
            let (out, inp) = projection_shape(cfg, c);
            let a_key = format!("{KEY_PREFIX}{name}.lora_A.weight");
            let b_key = format!("{KEY_PREFIX}{name}.lora_B.weight");
            let get = |key: &str, want: [usize; 2]| -> Result<Tensor> {
                let t = file
                    .get(key)
                    .ok_or_else(|| Error::MissingTensor { file: fpath.clone(), key: key.into() })?;
                if !matches!(t.dtype(), DType::F64 | DType::F32 | DType::F16 | DType::BF16) {
                    return Err(Error::DType {
                        file: fpath.clone(),
                        key: key.into(),
                        expected: "a float dtype".into(),
                        got: t.dtype().to_string(),
                    });
                }
                if t.shape() != want {
                    return Err(Error::Shape {
                        file: fpath.clone(),
                        key: key.into(),
                        expected: want.to_vec(),
                        got: t.shape().to_vec(),
                    });
                }
                Ok(t)
            };
            let a = get(&a_key, [rank, inp])?;
            let b = get(&b_key, [out, rank])?;
            used.insert(a_key.clone());
            used.insert(b_key.clone());
            modules.push(ModuleAdapter {
                layer,
                projection: c,
                rank,
                alpha,
                scaling: scaling(rank, alpha, config.use_rslora),
                a,
                b,
                a_key,
                b_key,
            });
        }
        if let Some(extra) = file.keys().find(|k| !used.contains(*k)) {
            return Err(Error::format(
                &fpath,
                format!(
                    "tensor `{}` is not the lora_A/lora_B of a module `target_modules` adapts \
                     (an adapter part this harness does not build, or a module not targeted)",
                    contract::error::escape_controls(extra)
                ),
            ));
        }
        if modules.is_empty() {
            return Err(Error::format(
                &config.path,
                "field `target_modules` matches no projection of this model: the adapter \
                 changes nothing",
            ));
        }
        modules.sort_by_key(|m| (m.layer, m.projection));
        Ok(Adapter { dir: dir.to_path_buf(), config, modules })
    }

    /// The adapter of projection `c` in layer `layer`, if it is adapted.
    pub fn get(&self, layer: usize, c: Component) -> Option<&ModuleAdapter> {
        self.modules.iter().find(|m| m.layer == layer && m.projection == c)
    }

    /// The projections adapted in at least one layer, in compute order.
    pub fn targets(&self) -> Vec<Component> {
        PROJECTIONS
            .iter()
            .copied()
            .filter(|&c| self.modules.iter().any(|m| m.projection == c))
            .collect()
    }

    /// The report's view: defaults, and per projection its rank/alpha/scaling, one
    /// entry per module where layers differ.
    pub fn facts(&self, merged: bool) -> AdapterFacts {
        let mut modules = Vec::new();
        for c in self.targets() {
            let of: Vec<&ModuleAdapter> =
                self.modules.iter().filter(|m| m.projection == c).collect();
            let same = of.iter().all(|m| m.rank == of[0].rank && m.alpha == of[0].alpha);
            if same {
                modules.push(ModuleFacts {
                    module: c.name().to_string(),
                    r: of[0].rank,
                    alpha: of[0].alpha,
                    scaling: of[0].scaling,
                });
            } else {
                modules.extend(of.iter().map(|m| ModuleFacts {
                    module: format!("layers.{}.{}", m.layer, c.name()),
                    r: m.rank,
                    alpha: m.alpha,
                    scaling: m.scaling,
                }));
            }
        }
        AdapterFacts {
            r: self.config.r,
            lora_alpha: self.config.lora_alpha,
            use_rslora: self.config.use_rslora,
            merged,
            targets: self.targets().iter().map(|c| c.name().to_string()).collect(),
            modules,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(text: &str) -> Result<AdapterConfig> {
        AdapterConfig::parse(text, Path::new("adapter_config.json"))
    }

    #[test]
    fn scaling_is_alpha_over_r_or_over_sqrt_r() {
        assert_eq!(scaling(16, 32.0, false), 2.0);
        assert_eq!(scaling(16, 32.0, true), 8.0);
        assert_eq!(scaling(4, 8.0, true), 4.0);
    }

    #[test]
    fn patterns_match_as_peft_get_pattern_key() {
        let c = cfg(r#"{"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"],
            "rank_pattern": {"layers\\.1\\.self_attn\\.q_proj": 2, "q_proj": 4},
            "alpha_pattern": {"v_proj": 4}}"#)
        .unwrap();
        // First key in file order wins.
        assert_eq!(c.rank_of("model.layers.1.self_attn.q_proj"), 2);
        assert_eq!(c.rank_of("model.layers.0.self_attn.q_proj"), 4);
        assert_eq!(c.rank_of("model.layers.0.self_attn.v_proj"), 8);
        assert_eq!(c.alpha_of("model.layers.0.self_attn.v_proj"), 4.0);
        // A key matches a whole dotted suffix, not a substring: `proj` is not `q_proj`.
        let d = cfg(r#"{"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"], "rank_pattern": {"proj": 2}}"#).unwrap();
        assert_eq!(d.rank_of("model.layers.0.self_attn.q_proj"), 8);
        assert_eq!(c.scaling_of("model.layers.0.self_attn.q_proj"), 4.0);
    }

    #[test]
    fn targets_match_as_peft_list_suffix_or_regex_fullmatch() {
        let l = cfg(r#"{"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "mlp.up_proj"]}"#)
            .unwrap();
        assert!(l.targets("model.layers.3.self_attn.q_proj"));
        assert!(l.targets("model.layers.3.mlp.up_proj"));
        assert!(!l.targets("model.layers.3.mlp.gate_proj"));
        assert!(!l.targets("model.layers.3.self_attn.xq_proj"));
        let r =
            cfg(r#"{"r": 8, "lora_alpha": 16, "target_modules": ".*layers\\.0\\..*(q|v)_proj"}"#)
                .unwrap();
        assert!(r.targets("model.layers.0.self_attn.v_proj"));
        assert!(!r.targets("model.layers.1.self_attn.v_proj"));
        assert!(!r.targets("model.layers.0.self_attn.k_proj"));
    }

    #[test]
    fn fields_that_change_the_model_are_refused_by_name() {
        let base = r#""r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]"#;
        for (field, value) in [
            ("use_dora", "true"),
            ("lora_bias", "true"),
            ("bias", "\"all\""),
            ("modules_to_save", "[\"lm_head\"]"),
            ("layers_to_transform", "[0]"),
            ("fan_in_fan_out", "true"),
            ("target_parameters", "[\"x\"]"),
            ("some_new_field", "1"),
        ] {
            let e = cfg(&format!("{{{base}, \"{field}\": {value}}}")).unwrap_err().to_string();
            assert!(e.contains(&format!("`{field}`")) && e.contains("adapter_config.json"), "{e}");
        }
        // Defaults pass.
        cfg(&format!("{{{base}, \"use_dora\": false, \"modules_to_save\": null, \"bias\": \"none\", \"layers_to_transform\": null}}")).unwrap();
        // A Python-only regex is refused, not matched some other way.
        let e = cfg(&format!("{{{base}, \"rank_pattern\": {{\"(?<=x)q_proj\": 2}}}}")).unwrap_err();
        assert!(e.to_string().contains("rank_pattern"), "{e}");
    }
}
