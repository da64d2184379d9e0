//! `check-weights` on LoRA adapters (CONTRACT §5): a port's adapter checkpoint checked
//! against PEFT's `adapter_model.safetensors`, tensor by tensor, and each module's
//! scaling against the one the port declares.
//!
//! The PEFT side is the reference: [`open_peft`] reads `adapter_config.json` and
//! `adapter_model.safetensors` and validates them on their own (every tensor a `lora_A`
//! `[r, in]` or `lora_B` `[out, r]` of a targeted projection, with the rank the config
//! gives that module), so no model config is needed. The port side is a MindSpore
//! checkpoint named as mindpet's `LoRADense` names its parameters under MindFormers'
//! Llama (`model.layers.{i}.attention.wq.mindpet_delta_lora_A` `[r, in]`, `..._lora_B`
//! `[out, r]`; [`mindpet_keymap`]), or as a key map says.
//!
//! A conversion is a copy (and a cast), so the values must match exactly after casting
//! PEFT's value to the port tensor's dtype. What a difference looks like is named: a
//! tensor stored transposed (`lora_A` as `[in, r]`), a tensor holding another module's
//! values (`lora.gate_up_swapped` when gate and up trade places), a `lora_B` left at
//! zero (`lora.not_loaded`), a module with neither tensor (`lora.target_missing`).
//!
//! The scaling `s` of `W x + s·B(A x)` is not in either tensor file. PEFT's comes from
//! the config (`alpha / r`, `alpha / sqrt(r)` under rsLoRA, the patterns); the port
//! declares its own ([`PortScaling`]): the converter's `<ckpt>.json` beside the
//! checkpoint (`llama-parity/mindpet-adapter@1`), or mindpet's `lora_alpha` (its scaling
//! is `lora_alpha / lora_rank`). A difference is named as the §5 fault it matches.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::{json, Value};

use contract::error::{Error, Result};
use contract::fault::Component;
use dump::{DType, SafetensorsFile, Tensor};

use crate::adapter::{
    module_name, Adapter, AdapterConfig, ModuleAdapter, CONFIG_FILE, KEY_PREFIX, PROJECTIONS,
    WEIGHTS_FILE,
};
use crate::check::{
    diff, dtype_finding, finding, write_report, write_table, Finding, FindingKind, TensorRow,
    WeightCheck,
};
use crate::ckpt::Checkpoint;
use crate::keymap::KeyMap;

/// PEFT tensor names → mindpet names, as shipped with the MindSpore port.
const MINDPET: &str = include_str!("../../../fixtures/ports/mindspore/adapter_keymap.json");

/// The format of the converter's declaration beside an adapter checkpoint.
pub const DECLARATION_FORMAT: &str = "llama-parity/mindpet-adapter@1";

/// The adapter key map: PEFT's tensor names to mindpet's, built into the binary.
pub fn mindpet_keymap() -> KeyMap {
    KeyMap::parse(MINDPET, Path::new("<built-in fixtures/ports/mindspore/adapter_keymap.json>"))
        .expect("the built-in adapter key map is valid (checked by a unit test)")
}

/// Where a PEFT adapter's two files are, given what a user names: an adapter directory
/// (`adapter_config.json` in it), a dump whose manifest has `adapter`, or
/// `adapter_model.safetensors` with its config beside it. `None`: not an adapter.
pub fn adapter_files(path: &Path) -> Result<Option<(PathBuf, PathBuf)>> {
    let dir = if path.is_dir() {
        if path.join(CONFIG_FILE).is_file() {
            path.to_path_buf()
        } else if path.join("manifest.json").is_file() {
            match dump::Manifest::load(&path.join("manifest.json"))?.adapter {
                Some(spec) => path.join(spec.path),
                None => return Ok(None),
            }
        } else {
            return Ok(None);
        }
    } else if path.file_name().is_some_and(|n| n == WEIGHTS_FILE) {
        path.parent().unwrap_or(Path::new(".")).to_path_buf()
    } else {
        return Ok(None);
    };
    Ok(Some((dir.join(CONFIG_FILE), dir.join(WEIGHTS_FILE))))
}

/// A tensor and its name in the file.
type Named = (String, Tensor);

/// Reads a PEFT adapter from its config and weights files and checks it on its own:
/// every tensor is `base_model.model.<projection module>.lora_{A,B}.weight` of a module
/// the config targets, floating point, `lora_A` `[r, in]` and `lora_B` `[out, r]` with
/// the module's rank (after `rank_pattern`), both present.
pub fn open_peft(config: &Path, weights: &Path) -> Result<Adapter> {
    let config = AdapterConfig::load(config)?;
    if !weights.is_file() {
        return Err(Error::format(
            weights,
            "missing: a PEFT adapter is adapter_config.json and adapter_model.safetensors \
             (PEFT save_pretrained)",
        ));
    }
    let file = SafetensorsFile::open(weights)?;
    let mut pairs: BTreeMap<(usize, Component), [Option<Named>; 2]> = BTreeMap::new();
    for key in file.keys() {
        let bad = |what: &str| {
            Error::format(
                weights,
                format!("tensor `{}` {what}", contract::error::escape_controls(key)),
            )
        };
        let (module, role) = key
            .strip_prefix(KEY_PREFIX)
            .and_then(|rest| {
                rest.strip_suffix(".lora_A.weight")
                    .map(|m| (m, 0))
                    .or_else(|| rest.strip_suffix(".lora_B.weight").map(|m| (m, 1)))
            })
            .ok_or_else(|| {
                bad("is not a LoRA lora_A/lora_B weight (base_model.model.<module>.lora_A.weight)")
            })?;
        let (layer, c) = projection_of(module)
            .ok_or_else(|| bad("does not adapt one of the seven projections of a decoder layer"))?;
        if !config.targets(module) {
            return Err(bad("adapts a module `target_modules` does not name"));
        }
        let t = file.get(key).ok_or_else(|| Error::MissingTensor {
            file: weights.to_path_buf(),
            key: key.to_string(),
        })?;
        if !matches!(t.dtype(), DType::F64 | DType::F32 | DType::F16 | DType::BF16) {
            return Err(bad(&format!("has dtype {}, not a float dtype", t.dtype())));
        }
        pairs.entry((layer, c)).or_default()[role] = Some((key.to_string(), t));
    }
    let mut modules = Vec::new();
    for ((layer, c), [a, b]) in pairs {
        let module = module_name(layer, c);
        let name = |role: &str| format!("{KEY_PREFIX}{module}.lora_{role}.weight");
        let (Some((a_key, a)), Some((b_key, b))) = (a, b) else {
            return Err(Error::format(
                weights,
                format!("module `{module}` has lora_A or lora_B but not both ({})", name("A/B")),
            ));
        };
        let rank = config.rank_of(&module);
        for (key, t, ok) in [
            (&a_key, &a, a.shape().len() == 2 && a.shape()[0] == rank),
            (&b_key, &b, b.shape().len() == 2 && b.shape()[1] == rank),
        ] {
            if !ok {
                return Err(Error::format(
                    weights,
                    format!(
                        "tensor `{key}` has shape {:?}: the config gives `{module}` rank {rank} \
                         (lora_A [r, in], lora_B [out, r])",
                        t.shape()
                    ),
                ));
            }
        }
        let alpha = config.alpha_of(&module);
        modules.push(ModuleAdapter {
            layer,
            projection: c,
            rank,
            alpha,
            scaling: config.scaling_of(&module),
            a,
            b,
            a_key,
            b_key,
        });
    }
    if modules.is_empty() {
        return Err(Error::format(weights, "holds no LoRA tensor: the adapter changes nothing"));
    }
    let dir = weights.parent().unwrap_or(Path::new(".")).to_path_buf();
    Ok(Adapter { dir, config, modules })
}

/// `(layer, projection)` of a module name `model.layers.{i}.self_attn.q_proj`, ...
fn projection_of(module: &str) -> Option<(usize, Component)> {
    let rest = module.strip_prefix("model.layers.")?;
    let digits = &rest[..rest.find('.')?];
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) || digits.len() > 9 {
        return None;
    }
    let layer: usize = digits.parse().ok()?;
    PROJECTIONS.iter().find(|&&c| module_name(layer, c) == module).map(|&c| (layer, c))
}

/// How the port declares each module's scaling.
#[derive(Debug, Clone)]
pub enum PortScaling {
    /// The converter's declaration (`<ckpt>.json`, [`DECLARATION_FORMAT`]).
    Declared(Declaration),
    /// mindpet's `lora_alpha` for every module (its `pet_config`): the scaling is
    /// `lora_alpha / r`, r each module's rank.
    MindpetAlpha(f64),
    /// Nothing declares it: the PEFT scalings are shown, not checked.
    Undeclared,
}

/// A declaration file: per port module (`model.layers.0.attention.wq`), its scaling.
#[derive(Debug, Clone)]
pub struct Declaration {
    pub path: PathBuf,
    pub modules: BTreeMap<String, DeclaredModule>,
}

/// One module of a declaration: the scaling as `scaling`, or as mindpet derives it,
/// `lora_alpha / r`; `hf` names the PEFT module it was converted from.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeclaredModule {
    pub hf: Option<String>,
    pub r: Option<usize>,
    pub lora_alpha: Option<f64>,
    pub scaling: Option<f64>,
}

impl DeclaredModule {
    /// The scaling the port applies: `scaling`, else `lora_alpha / r` (checked present
    /// by [`Declaration::parse`]).
    pub fn scaling(&self) -> f64 {
        match (self.scaling, self.lora_alpha, self.r) {
            (Some(s), _, _) => s,
            (None, Some(a), Some(r)) => a / r as f64,
            _ => f64::NAN,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeclarationFile {
    format: String,
    modules: BTreeMap<String, DeclaredModule>,
}

impl Declaration {
    /// Reads a declaration file.
    pub fn load(path: &Path) -> Result<Declaration> {
        let text = dump::read::read_json_text(path)?;
        Declaration::parse(&text, path)
    }

    /// Parses a declaration; `path` names it in messages.
    pub fn parse(text: &str, path: &Path) -> Result<Declaration> {
        let bad = |what: String| Error::format(path, what);
        let f: DeclarationFile = serde_json::from_str(text)
            .map_err(|e| bad(format!("not a {DECLARATION_FORMAT} declaration: {e}")))?;
        if f.format != DECLARATION_FORMAT {
            return Err(bad(format!(
                "field `format` is {:?}, expected {DECLARATION_FORMAT:?}",
                f.format
            )));
        }
        for (name, m) in &f.modules {
            let name = contract::error::escape_controls(name);
            if m.r == Some(0) {
                return Err(bad(format!("field `modules.{name}.r` is 0")));
            }
            let finite = |v: Option<f64>| v.is_none_or(f64::is_finite);
            if !finite(m.scaling) || !finite(m.lora_alpha) {
                return Err(bad(format!("module `{name}`: scaling and lora_alpha must be finite")));
            }
            if m.scaling.is_none() && (m.lora_alpha.is_none() || m.r.is_none()) {
                return Err(bad(format!(
                    "module `{name}` declares no scaling (`scaling`, or `lora_alpha` and `r`)"
                )));
            }
        }
        Ok(Declaration { path: path.to_path_buf(), modules: f.modules })
    }
}

impl PortScaling {
    /// Where the port's scalings come from, for the report.
    pub fn source(&self) -> String {
        match self {
            PortScaling::Declared(d) => d.path.display().to_string(),
            PortScaling::MindpetAlpha(a) => format!("mindpet lora_alpha {a} (lora_alpha / r)"),
            PortScaling::Undeclared => "not declared".into(),
        }
    }
}

/// One adapted module's scaling on both sides.
#[derive(Debug, Clone)]
pub struct ScalingRow {
    /// PEFT's module name (`model.layers.0.self_attn.q_proj`).
    pub module: String,
    /// The port module its `lora_A` maps to (`model.layers.0.attention.wq`).
    pub port: String,
    pub rank: usize,
    pub alpha: f64,
    /// PEFT's scaling.
    pub peft: f64,
    /// The port's, where declared.
    pub declared: Option<f64>,
    /// `ok`, `unchecked`, or `scaling`.
    pub status: &'static str,
}

/// The outcome of an adapter check: the tensor check, and the scaling of every module.
#[derive(Debug, Clone)]
pub struct AdapterCheck {
    pub weights: WeightCheck,
    pub use_rslora: bool,
    pub scaling_source: String,
    pub scalings: Vec<ScalingRow>,
    /// Port tensors that are base-model weights (a whole network's checkpoint), skipped.
    pub base_tensors: usize,
}

/// Two scalings equal up to the rounding of a value written out and read back.
fn same_scaling(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(b.abs())
}

/// The §5 fault a port scaling `got` matches, for a module whose PEFT scaling differs;
/// where two match (alpha = r makes alpha / r one), the one that explains the config.
fn scaling_fault(cfg: &AdapterConfig, m: &ModuleAdapter, got: f64) -> Option<&'static str> {
    use crate::adapter::scaling;
    if same_scaling(got, m.alpha) {
        Some("lora.scale_alpha")
    } else if cfg.use_rslora && same_scaling(got, scaling(m.rank, m.alpha, false)) {
        Some("lora.rslora_ignored")
    } else if cfg.has_patterns()
        && same_scaling(got, scaling(cfg.r, cfg.lora_alpha, cfg.use_rslora))
    {
        Some("lora.pattern_ignored")
    } else if same_scaling(got, 1.0) {
        Some("lora.scale_missing")
    } else {
        None
    }
}

/// The port module of a port tensor name: the name without its last dotted part.
fn port_module(key: &str) -> &str {
    key.rsplit_once('.').map_or(key, |(m, _)| m)
}

/// Checks the port's adapter checkpoint `port` against the PEFT adapter `peft` through
/// `map` (PEFT tensor names to port names); `dtype`, when given, is the dtype every
/// port tensor must have; `scaling` is what the port declares.
pub fn check_adapter(
    peft: &Adapter,
    port: &Checkpoint,
    map: &KeyMap,
    scaling: &PortScaling,
    dtype: Option<DType>,
) -> Result<AdapterCheck> {
    // MindSpore 2.10 saves LoRADense's parameters as `mindpet_delta_lora_a` / `_b`: a name
    // is matched exactly, else ignoring ASCII case.
    let folded: HashMap<String, &str> = port.keys().map(|k| (k.to_ascii_lowercase(), k)).collect();
    let resolve = |name: &str| -> Option<String> {
        match port.get(name) {
            Some(_) => Some(name.to_string()),
            None => folded.get(&name.to_ascii_lowercase()).map(|k| k.to_string()),
        }
    };
    let mut tensors = Vec::new();
    let mut findings = Vec::new();
    let mut produced = BTreeSet::new();
    let mut missing: Vec<(usize, &ModuleAdapter, String, String)> = Vec::new();
    let mut port_modules = BTreeMap::new();
    for m in &peft.modules {
        for (role, key, h) in [(0, &m.a_key, &m.a), (1, &m.b_key, &m.b)] {
            let Some((mapped, rule)) = map.to_port(key) else {
                findings.push(finding(
                    FindingKind::Unmapped,
                    Some(key),
                    None,
                    "no rule of the key map matches it".into(),
                    None,
                ));
                continue;
            };
            if role == 0 {
                port_modules.insert(m.module(), port_module(&mapped).to_string());
            }
            let Some(port_key) = resolve(&mapped) else {
                missing.push((role, m, key.clone(), mapped));
                continue;
            };
            produced.insert(port_key.clone());
            let port_key = port_key.as_str();
            let p = port.get(port_key).ok_or_else(|| Error::MissingTensor {
                file: port.path().to_path_buf(),
                key: port_key.into(),
            })?;
            let mut row = TensorRow::pair(key, port_key, h, p);
            let mut here: Vec<Finding> =
                dtype_finding(dtype, p, key, port_key).into_iter().collect();
            let t = rule.transpose;
            let expected: Vec<usize> =
                if t { h.shape().iter().rev().copied().collect() } else { h.shape().to_vec() };
            if p.shape() == expected.as_slice() {
                let (n, max) = diff(p, h, t);
                row.n_diff = Some(n);
                row.max_abs_diff = Some(max);
                if n > 0 {
                    let counts =
                        format!("{n} of {} elements differ, max |diff| {max:.3e}", p.numel());
                    here.push(explain(peft, m, role, key, port_key, p, t, counts));
                }
            } else {
                here.push(explain_shape(peft, m, role, key, port_key, p, h, t, &expected));
            }
            if let Some(f) = here.first() {
                row.status = f.kind.name();
            }
            findings.extend(here);
            tensors.push(row);
        }
    }
    let all_missing = missing.len() == 2 * peft.modules.len();
    for (role, m, key, mapped) in &missing {
        let both = missing.iter().any(|(r, o, ..)| r != role && std::ptr::eq(*o, *m));
        let (fault, why) = if all_missing {
            (Some("lora.not_loaded"), "; no tensor of the adapter is in the checkpoint")
        } else if both {
            (Some("lora.target_missing"), "; the module has neither lora_A nor lora_B")
        } else {
            (None, "")
        };
        findings.push(finding(
            FindingKind::MissingInPort,
            Some(key),
            Some(mapped),
            format!("the rule maps it to `{mapped}`, which the checkpoint lacks{why}"),
            fault,
        ));
    }
    let base = KeyMap::mindspore();
    let mut base_tensors = 0;
    for (key, _) in port.iter() {
        if produced.contains(key) {
            continue;
        }
        if base.to_hf(key).is_some() {
            base_tensors += 1;
            continue;
        }
        let why = if map.is_port_name(key) {
            "a rule names it, but the PEFT adapter has no such tensor (a module PEFT does not adapt)"
        } else {
            "no rule of the key map produces this name"
        };
        findings.push(finding(FindingKind::Unexpected, None, Some(key), why.into(), None));
    }
    let scalings = check_scalings(peft, &port_modules, scaling, &mut findings);
    Ok(AdapterCheck {
        weights: WeightCheck {
            hf: peft.dir.join(WEIGHTS_FILE),
            port: port.path().to_path_buf(),
            keymap: map.source.clone(),
            dtype,
            tensors,
            findings,
        },
        use_rslora: peft.config.use_rslora,
        scaling_source: scaling.source(),
        scalings,
        base_tensors,
    })
}

/// The PEFT module of the same layer whose tensor of the same role (`0` A, `1` B) the
/// port tensor `p` holds exactly, and the fault that is (`lora.gate_up_swapped`).
fn holder<'a>(
    peft: &'a Adapter,
    m: &ModuleAdapter,
    role: usize,
    p: &Tensor,
    transpose: bool,
) -> Option<(&'a ModuleAdapter, Option<&'static str>)> {
    peft.modules
        .iter()
        .filter(|o| o.layer == m.layer && o.projection != m.projection)
        .find(|o| {
            let h = if role == 0 { &o.a } else { &o.b };
            let want: Vec<usize> = if transpose {
                h.shape().iter().rev().copied().collect()
            } else {
                h.shape().to_vec()
            };
            p.shape() == want.as_slice() && diff(p, h, transpose).0 == 0
        })
        .map(|o| {
            let pair = [m.projection, o.projection];
            let gate_up = pair.contains(&Component::GateProj) && pair.contains(&Component::UpProj);
            (o, gate_up.then_some("lora.gate_up_swapped"))
        })
}

/// Names a value difference: another module's tensor, a `lora_B` at zero, or plain
/// differences.
#[allow(clippy::too_many_arguments)]
fn explain(
    peft: &Adapter,
    m: &ModuleAdapter,
    role: usize,
    key: &str,
    port_key: &str,
    p: &Tensor,
    transpose: bool,
    counts: String,
) -> Finding {
    let h = if role == 0 { &m.a } else { &m.b };
    let what = |other: &str, module: &str| {
        format!("holds the values of PEFT `{other}` ({module} swapped in); {counts}")
    };
    if let Some(f) = swapped(peft, m, role, key, port_key, p, transpose, what) {
        return f;
    }
    if role == 1 && p.iter_f64().all(|v| v == 0.0) && h.iter_f64().any(|v| v != 0.0) {
        return finding(
            FindingKind::Values,
            Some(key),
            Some(port_key),
            format!("lora_B all zeros (its initial value: the adapter never loaded); {counts}"),
            Some("lora.not_loaded"),
        );
    }
    finding(FindingKind::Values, Some(key), Some(port_key), counts, None)
}

/// A `Swapped` finding when `p` holds another module's PEFT tensor of the same role,
/// its message `what(other tensor, other module)`.
#[allow(clippy::too_many_arguments)]
fn swapped(
    peft: &Adapter,
    m: &ModuleAdapter,
    role: usize,
    key: &str,
    port_key: &str,
    p: &Tensor,
    transpose: bool,
    what: impl Fn(&str, &str) -> String,
) -> Option<Finding> {
    let (o, fault) = holder(peft, m, role, p, transpose)?;
    let other = if role == 0 { &o.a_key } else { &o.b_key };
    Some(finding(FindingKind::Swapped, Some(key), Some(port_key), what(other, &o.module()), fault))
}

/// Names a shape difference: the tensor stored transposed, another module's tensor, or
/// plain shapes.
#[allow(clippy::too_many_arguments)]
fn explain_shape(
    peft: &Adapter,
    m: &ModuleAdapter,
    role: usize,
    key: &str,
    port_key: &str,
    p: &Tensor,
    h: &Tensor,
    transpose: bool,
    expected: &[usize],
) -> Finding {
    let shapes = format!("port shape {:?}, expected {expected:?}", p.shape());
    let layout = if role == 0 { "[r, in]" } else { "[out, r]" };
    let flipped = p.shape().iter().rev().eq(expected.iter());
    if flipped && diff(p, h, !transpose).0 == 0 {
        return finding(
            FindingKind::Transposed,
            Some(key),
            Some(port_key),
            format!("{shapes}: stored transposed, equals PEFT's {layout} matrix transposed"),
            None,
        );
    }
    let what = |other: &str, module: &str| {
        format!("{shapes}: holds the values of PEFT `{other}` ({module} swapped in)")
    };
    if let Some(f) = swapped(peft, m, role, key, port_key, p, transpose, what) {
        return f;
    }
    let hint = if flipped { " (stored transposed, values differ too)" } else { "" };
    finding(FindingKind::Shape, Some(key), Some(port_key), format!("{shapes}{hint}"), None)
}

/// Each module's scaling on both sides; a finding where the port's differs or is not
/// declared for a module that has its tensors.
fn check_scalings(
    peft: &Adapter,
    port_modules: &BTreeMap<String, String>,
    scaling: &PortScaling,
    findings: &mut Vec<Finding>,
) -> Vec<ScalingRow> {
    let mut rows = Vec::new();
    let mut declared_seen = BTreeSet::new();
    for m in &peft.modules {
        let module = m.module();
        let Some(pm) = port_modules.get(&module) else { continue };
        let mut row = ScalingRow {
            module: module.clone(),
            port: pm.clone(),
            rank: m.rank,
            alpha: m.alpha,
            peft: m.scaling,
            declared: None,
            status: "unchecked",
        };
        let here = |detail: String, fault| {
            finding(FindingKind::Scaling, Some(&module), Some(pm), detail, fault)
        };
        match scaling {
            PortScaling::Undeclared => {}
            PortScaling::MindpetAlpha(alpha) => row.declared = Some(alpha / m.rank as f64),
            PortScaling::Declared(d) => match d.modules.get(pm) {
                Some(dm) => {
                    declared_seen.insert(pm.clone());
                    row.declared = Some(dm.scaling());
                    if let Some(r) = dm.r.filter(|&r| r != m.rank) {
                        findings.push(here(
                            format!(
                                "{} declares r = {r}; PEFT's rank is {}",
                                d.path.display(),
                                m.rank
                            ),
                            None,
                        ));
                    }
                }
                None => {
                    let has_tensors = findings.iter().all(|f| {
                        f.kind != FindingKind::MissingInPort
                            || f.hf.as_deref() != Some(m.a_key.as_str())
                    });
                    if has_tensors {
                        row.status = "scaling";
                        findings.push(here(
                            format!("{} declares no scaling for `{pm}`", d.path.display()),
                            None,
                        ));
                    }
                }
            },
        }
        if let Some(got) = row.declared {
            if same_scaling(got, m.scaling) {
                row.status = "ok";
            } else {
                row.status = "scaling";
                findings.push(here(
                    format!(
                        "port scaling {got} ({}), PEFT's {} (r {}, alpha {}{}): {:.4}x",
                        scaling.source(),
                        m.scaling,
                        m.rank,
                        m.alpha,
                        if peft.config.use_rslora { ", rsLoRA alpha/sqrt(r)" } else { ", alpha/r" },
                        got / m.scaling
                    ),
                    scaling_fault(&peft.config, m, got),
                ));
            }
        }
        rows.push(row);
    }
    if let PortScaling::Declared(d) = scaling {
        for pm in d.modules.keys().filter(|pm| !declared_seen.contains(*pm)) {
            findings.push(finding(
                FindingKind::Unexpected,
                None,
                Some(pm),
                format!(
                    "{} declares a scaling for a module the PEFT adapter does not adapt",
                    d.path.display()
                ),
                None,
            ));
        }
    }
    rows
}

impl AdapterCheck {
    pub fn passed(&self) -> bool {
        self.weights.passed()
    }

    /// The scaling table, then the tensor table, the findings and the verdict.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let rule = if self.use_rslora { "alpha/sqrt(r), rsLoRA" } else { "alpha/r" };
        let _ = writeln!(s, "scaling: PEFT {rule}; port: {}", self.scaling_source);
        let rows: Vec<[String; 6]> = self
            .scalings
            .iter()
            .map(|r| {
                [
                    r.status.to_string(),
                    r.port.clone(),
                    r.rank.to_string(),
                    format!("{}", r.alpha),
                    format!("{:.6}", r.peft),
                    r.declared.map_or("-".into(), |d| format!("{d:.6}")),
                ]
            })
            .collect();
        let head = ["status", "port module", "r", "alpha", "PEFT s", "port s"];
        write_table(&mut s, head, &rows, 2);
        if self.base_tensors > 0 {
            let _ =
                writeln!(s, "({} base-model tensors in the checkpoint skipped)", self.base_tensors);
        }
        let _ = writeln!(s);
        s.push_str(&self.weights.render());
        s
    }

    /// `weights.json`: the tensor check's JSON with an `adapter` object.
    pub fn to_json(&self) -> Value {
        let mut v = self.weights.to_json();
        v["adapter"] = json!({
            "use_rslora": self.use_rslora,
            "scaling_source": self.scaling_source,
            "base_tensors_skipped": self.base_tensors,
            "modules": self.scalings.iter().map(|r| json!({
                "module": r.module, "port": r.port, "r": r.rank, "alpha": r.alpha,
                "scaling": r.peft, "port_scaling": r.declared, "status": r.status,
            })).collect::<Vec<_>>(),
        });
        v
    }

    /// Writes `dir/weights.json` atomically (creating `dir`).
    pub fn write(&self, dir: &Path) -> Result<()> {
        write_report(dir, &self.to_json())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_built_in_map_names_as_mindpet() {
        let m = mindpet_keymap();
        let (p, r) =
            m.to_port("base_model.model.model.layers.3.mlp.up_proj.lora_B.weight").unwrap();
        assert_eq!(p, "model.layers.3.feed_forward.w3.mindpet_delta_lora_B");
        assert!(!r.transpose);
        assert_eq!(
            m.to_port("base_model.model.model.layers.0.self_attn.o_proj.lora_A.weight").unwrap().0,
            "model.layers.0.attention.wo.mindpet_delta_lora_A"
        );
        assert_eq!(m.rules.len(), 14);
    }

    #[test]
    fn projection_modules_parse_and_others_do_not() {
        assert_eq!(projection_of("model.layers.12.mlp.gate_proj"), Some((12, Component::GateProj)));
        assert_eq!(projection_of("model.layers.0.self_attn.q_proj"), Some((0, Component::QProj)));
        assert_eq!(projection_of("model.layers.0.mlp.q_proj"), None);
        assert_eq!(projection_of("model.layers.x.mlp.up_proj"), None);
        assert_eq!(projection_of("lm_head"), None);
        assert_eq!(
            port_module("model.layers.0.attention.wq.mindpet_delta_lora_A"),
            "model.layers.0.attention.wq"
        );
    }

    #[test]
    fn a_declaration_needs_a_scaling_per_module() {
        let p = Path::new("a.ckpt.json");
        let d = Declaration::parse(
            r#"{"format": "llama-parity/mindpet-adapter@1", "modules": {
                "m.wq": {"hf": "x", "r": 4, "lora_alpha": 8.0, "scaling": 2.0},
                "m.wv": {"r": 4, "lora_alpha": 6.0}}}"#,
            p,
        )
        .unwrap();
        assert_eq!(d.modules["m.wq"].scaling(), 2.0);
        assert_eq!(d.modules["m.wv"].scaling(), 1.5);
        for (text, want) in [
            (r#"{"format": "x", "modules": {}}"#, "field `format`"),
            (
                r#"{"format": "llama-parity/mindpet-adapter@1", "modules": {"m": {"r": 4}}}"#,
                "declares no scaling",
            ),
            (
                r#"{"format": "llama-parity/mindpet-adapter@1", "modules": {"m": {"scale": 1}}}"#,
                "unknown field",
            ),
            (
                r#"{"format": "llama-parity/mindpet-adapter@1", "modules": {"m": {"scaling": 1, "r": 0}}}"#,
                "`modules.m.r` is 0",
            ),
        ] {
            let e = Declaration::parse(text, p).unwrap_err().to_string();
            assert!(e.starts_with("a.ckpt.json: ") && e.contains(want), "{e}");
        }
    }

    #[test]
    fn scaling_faults_are_named_from_the_value() {
        let cfg = AdapterConfig::parse(
            r#"{"r": 8, "lora_alpha": 16, "use_rslora": true, "target_modules": ["q_proj"],
                "rank_pattern": {"q_proj": 4}}"#,
            Path::new("c.json"),
        )
        .unwrap();
        let t = Tensor::from_f64(&[1], &[0.0], DType::F32);
        let m = ModuleAdapter {
            layer: 0,
            projection: Component::QProj,
            rank: 4,
            alpha: 16.0,
            scaling: 8.0,
            a: t.clone(),
            b: t,
            a_key: "a".into(),
            b_key: "b".into(),
        };
        assert_eq!(scaling_fault(&cfg, &m, 16.0), Some("lora.scale_alpha"));
        assert_eq!(scaling_fault(&cfg, &m, 1.0), Some("lora.scale_missing"));
        assert_eq!(scaling_fault(&cfg, &m, 4.0), Some("lora.rslora_ignored"));
        assert_eq!(scaling_fault(&cfg, &m, 16.0 / 8f64.sqrt()), Some("lora.pattern_ignored"));
        assert_eq!(scaling_fault(&cfg, &m, 3.0), None);
        assert!(same_scaling(2.82842712474619, 16.0 / 32f64.sqrt()));
    }
}
