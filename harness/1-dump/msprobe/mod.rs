//! Reading msprobe dumps (PyPI `mindstudio-probe`, MindStudio's accuracy tool) as
//! contract dumps.
//!
//! A dump root holds `step<N>/<rank R | proc<pid>>/{dump.json, construct.json,
//! dump_tensor_data/}`. `dump.json` lists every recorded module or API call with its
//! inputs, keyword inputs and outputs, each tensor with `dtype`, `shape`, `Max`, `Min`,
//! `Mean`, `Norm` and, in tensor mode, `data_name` (a `.pt` file for PyTorch, `.npy` for
//! MindSpore, under `dump_tensor_data/`). `construct.json` names each call's parent
//! module. One model forward per step (`step()` after each) or all forwards in `step0`
//! told apart by their call counters: either way forward k is contract step k
//! (`prefill`, then `decode.{k-1}`).
//!
//! A [`SiteMap`] says which entry holds which contract site; [`MsprobeDump::to_dump`]
//! gathers them into an in-memory [`Dump`] (layouts normalised to the contract's), so
//! that comparison, diagnosis and reports work unchanged. Statistics-mode dumps have no
//! tensors; [`MsprobeDump::statistics`] gives each site's Max/Min/Mean/Norm instead.

mod json;
pub mod map;
mod pt;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::contract::error::{Error, Result};
use crate::contract::site::{Site, Step};
use crate::dump::{DType, Dump, Manifest, Precision, Tensor};

pub use self::map::{Heads, Layout, SiteMap, Take};

/// What msprobe saved: the tensors, or only their statistics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Tensor,
    Statistics,
}

/// The four statistics msprobe records for every tensor (`None` where it recorded
/// `null`, as it does for the Mean and Norm of integer tensors).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stats {
    pub max: Option<f64>,
    pub min: Option<f64>,
    pub mean: Option<f64>,
    /// L2 norm of the whole tensor.
    pub norm: Option<f64>,
}

/// A site known only by its statistics.
#[derive(Debug, Clone, PartialEq)]
pub struct StatSite {
    pub stats: Stats,
    /// Shape after layout normalisation (the contract's).
    pub shape: Vec<usize>,
    /// Elements of the recorded tensor per element of the contract's site (a GQA
    /// repeat of `n` heads records every key `n` times: its Norm is `sqrt(n)` times
    /// larger); already divided out of `stats.norm`.
    pub repeat: usize,
    pub dtype: Option<DType>,
}

/// One `step*/<rank>` folder.
struct StepDir {
    dir: PathBuf,
    data: serde_json::Map<String, Value>,
    /// `(module path, call n)` to its entry name.
    modules: HashMap<(String, usize), String>,
    /// `(parent entry, API name)` to `(call counter, entry)` in call order.
    apis: HashMap<(String, String), Vec<(usize, String)>>,
}

/// An msprobe dump root, read and indexed.
pub struct MsprobeDump {
    root: PathBuf,
    mode: Mode,
    framework: String,
    level: String,
    steps: Vec<StepDir>,
}

/// True when `dir` looks like an msprobe dump root: a `step*/<rank>/dump.json` inside.
pub fn is_msprobe_dump(dir: &Path) -> bool {
    step_dirs(dir).is_ok_and(|v| !v.is_empty())
}

fn step_dirs(root: &Path) -> Result<Vec<(usize, PathBuf)>> {
    let mut out = Vec::new();
    let rd = std::fs::read_dir(root).map_err(|e| Error::io(root, e))?;
    for e in rd {
        let p = e.map_err(|e| Error::io(root, e))?.path();
        let Some(n) = p
            .file_name()
            .and_then(|s| s.to_str())
            .and_then(|s| s.strip_prefix("step"))
            .and_then(|s| s.parse::<usize>().ok())
        else {
            continue;
        };
        if !p.is_dir() {
            continue;
        }
        let mut ranks = Vec::new();
        for r in std::fs::read_dir(&p).map_err(|e| Error::io(&p, e))? {
            let r = r.map_err(|e| Error::io(&p, e))?.path();
            let name = r.file_name().and_then(|s| s.to_str()).unwrap_or_default();
            if (name.starts_with("rank") || name.starts_with("proc"))
                && r.join("dump.json").is_file()
            {
                ranks.push(r);
            }
        }
        ranks.sort();
        match ranks.len() {
            0 => {}
            1 => out.push((n, ranks.remove(0))),
            k => {
                return Err(Error::format(
                    &p,
                    format!(
                        "{k} ranks; multi-rank msprobe dumps are not read yet (one rank per step)"
                    ),
                ))
            }
        }
    }
    out.sort();
    Ok(out)
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&json::quote_nonfinite(&text))
        .map_err(|e| Error::format(path, format!("not valid JSON: {e}")))
}

/// `Module.model.layers.0.self_attn.LlamaAttention.forward.3` (prefix `Module.`) to
/// `("model.layers.0.self_attn", 3)`.
fn parse_module_entry(name: &str, prefixes: &[String]) -> Option<(String, usize)> {
    let rest = prefixes.iter().find_map(|p| name.strip_prefix(p.as_str()))?;
    let (head, n) = rest.rsplit_once(".forward.")?;
    let n = n.parse().ok()?;
    let (path, _class) = head.rsplit_once('.')?;
    Some((path.to_string(), n))
}

/// `Torch.matmul.3.forward` to `("Torch.matmul", 3)`.
fn parse_api_entry(name: &str) -> Option<(String, usize)> {
    let head = name.strip_suffix(".forward")?;
    let (api, n) = head.rsplit_once('.')?;
    Some((api.to_string(), n.parse().ok()?))
}

impl MsprobeDump {
    /// Reads and indexes the dump under `root`, with `map`'s module prefixes.
    pub fn open(root: &Path, map: &SiteMap) -> Result<MsprobeDump> {
        let dirs = step_dirs(root)?;
        if dirs.is_empty() {
            return Err(Error::format(root, "not an msprobe dump: no step*/rank*/dump.json"));
        }
        let mut steps = Vec::new();
        let mut mode = None;
        let mut framework = String::new();
        let mut level = String::new();
        for (_, dir) in dirs {
            let djson = dir.join("dump.json");
            let v = read_json(&djson)?;
            let task = v.get("task").and_then(Value::as_str).unwrap_or("tensor");
            let m = match task {
                "tensor" => Mode::Tensor,
                "statistics" => Mode::Statistics,
                other => {
                    return Err(Error::format(
                        &djson,
                        format!("task {other:?}: only tensor and statistics dumps are read"),
                    ))
                }
            };
            if mode.is_some_and(|x| x != m) {
                return Err(Error::format(
                    &djson,
                    "steps of one dump mix tensor and statistics tasks",
                ));
            }
            mode = Some(m);
            framework = v.get("framework").and_then(Value::as_str).unwrap_or("").to_string();
            level = v.get("level").and_then(Value::as_str).unwrap_or("").to_string();
            let data = v
                .get("data")
                .and_then(Value::as_object)
                .cloned()
                .ok_or_else(|| Error::format(&djson, "no `data` object"))?;
            let cpath = dir.join("construct.json");
            let construct = if cpath.is_file() { read_json(&cpath)? } else { Value::Null };
            let mut modules = HashMap::new();
            let mut apis: HashMap<(String, String), Vec<(usize, String)>> = HashMap::new();
            for name in data.keys() {
                if let Some(key) = parse_module_entry(name, &map.module_prefixes) {
                    modules.insert(key, name.clone());
                } else if let Some((api, n)) = parse_api_entry(name) {
                    let parent =
                        construct.get(name).and_then(Value::as_str).unwrap_or("").to_string();
                    apis.entry((parent, api)).or_default().push((n, name.clone()));
                }
            }
            for v in apis.values_mut() {
                v.sort();
            }
            steps.push(StepDir { dir, data, modules, apis });
        }
        Ok(MsprobeDump {
            root: root.to_path_buf(),
            mode: mode.unwrap_or(Mode::Tensor),
            framework,
            level,
            steps,
        })
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The model forwards recorded, in order: `(step folder index, call counter)` of
    /// the map's anchor module.
    fn forwards(&self, map: &SiteMap) -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        for (si, s) in self.steps.iter().enumerate() {
            let mut ns: Vec<usize> =
                s.modules.keys().filter(|(p, _)| *p == map.anchor).map(|(_, n)| *n).collect();
            ns.sort();
            out.extend(ns.into_iter().map(|n| (si, n)));
        }
        out
    }

    /// The tensor record a rule names at one forward, or `None` when the dump lacks it.
    fn record<'a>(
        &'a self,
        map: &SiteMap,
        rule: &map::Rule,
        layer: usize,
        (si, n): (usize, usize),
    ) -> Option<(&'a StepDir, String, &'a Value)> {
        let s = &self.steps[si];
        let module = rule.module.as_ref()?.replace("{i}", &layer.to_string());
        let mut entry = s.modules.get(&(module, n))?.clone();
        if let Some(api) = &rule.api {
            entry = s.apis.get(&(entry, api.clone()))?.get(rule.nth)?.1.clone();
        }
        let e = s.data.get(&entry)?;
        let take = Take::parse(rule.take.as_deref()?)?;
        let rec = match take {
            Take::Input(k) => e.get("input_args")?.get(k)?,
            Take::Kwarg(name) => e.get("input_kwargs")?.get(&name)?,
            Take::Output(k) => match e.get("output")? {
                Value::Array(a) => a.get(k)?,
                v if k == 0 => v,
                _ => return None,
            },
        };
        let _ = map;
        rec.get("shape")?;
        Some((s, entry, rec))
    }

    /// A recorded tensor, read from its data file and checked against `dump.json`.
    fn load_tensor(&self, s: &StepDir, entry: &str, rec: &Value) -> Result<Tensor> {
        let djson = s.dir.join("dump.json");
        let name = rec.get("data_name").and_then(Value::as_str).ok_or_else(|| {
            Error::format(&djson, format!("entry `{entry}`: a tensor record without data_name"))
        })?;
        let file = s.dir.join("dump_tensor_data").join(name);
        if !file.is_file() {
            return Err(Error::format(
                &file,
                format!("missing data file (named by entry `{entry}` of {})", djson.display()),
            ));
        }
        let t = if name.ends_with(".npy") { super::npy::read(&file)? } else { pt::read(&file)? };
        let want = shape_of(rec);
        if want.as_deref() != Some(t.shape()) {
            return Err(Error::format(
                &file,
                format!(
                    "shape {:?} disagrees with dump.json's {:?} for entry `{entry}`",
                    t.shape(),
                    want.unwrap_or_default()
                ),
            ));
        }
        Ok(t)
    }

    /// The contract manifest of this dump: `like`'s model and scenario, the steps that
    /// were recorded, this dump's dtype and msprobe as producer.
    fn manifest(&self, like: &Manifest, forwards: usize, dtype: Option<Precision>) -> Manifest {
        let mut m = like.clone();
        m.steps.truncate(forwards.max(1));
        if let Some(d) = dtype {
            m.dtype = d;
        }
        m.producer = serde_json::json!({
            "framework": "msprobe",
            "dumped_framework": self.framework,
            "level": self.level,
            "task": match self.mode { Mode::Tensor => "tensor", Mode::Statistics => "statistics" },
            "dump": self.root.display().to_string(),
        });
        m
    }

    /// The dump's tensors at the contract's sites, as an in-memory dump whose model and
    /// scenario are `like`'s (the golden's, or the manifest of the run). Sites the dump
    /// does not hold are left out (`missing` in a comparison).
    pub fn to_dump(&self, map: &SiteMap, like: &Manifest) -> Result<Dump> {
        if self.mode == Mode::Statistics {
            return Err(Error::format(
                &self.root,
                "a statistics-mode msprobe dump holds no tensors (compare it for a statistics-only verdict)",
            ));
        }
        let forwards = self.forwards(map);
        let cfg = &like.model;
        let mut tensors = BTreeMap::new();
        let mut dtype = None;
        for (k, &fw) in forwards.iter().enumerate().take(like.steps.len()) {
            let step = like.steps[k];
            let t_len = if step == Step::Prefill { like.scenario.prefill_len() } else { 1 };
            let s_len =
                like.scenario.prefill_len() + if let Step::Decode(j) = step { j + 1 } else { 0 };
            let mut here: BTreeMap<String, Tensor> = BTreeMap::new();
            for rule in &map.sites {
                let layers: Vec<usize> = if rule.site.contains("{i}") {
                    (0..cfg.num_hidden_layers).collect()
                } else {
                    vec![0]
                };
                for i in layers {
                    let site = rule.site.replace("{i}", &i.to_string());
                    let t = if let Some(src) = &rule.tail_of {
                        let src = src.replace("{i}", &i.to_string());
                        match here.get(&src) {
                            Some(c) if c.shape().len() == 4 && c.shape()[2] >= t_len => {
                                let s = c.shape()[2];
                                select(c, 2, &(s - t_len..s).collect::<Vec<_>>())
                            }
                            _ => continue,
                        }
                    } else {
                        let Some((s, entry, rec)) = self.record(map, rule, i, fw) else { continue };
                        if rec.get("data_name").is_none()
                            && rec
                                .get("type")
                                .and_then(Value::as_str)
                                .is_some_and(|t| !t.contains("Tensor"))
                        {
                            continue;
                        }
                        let t = self.load_tensor(s, &entry, rec)?;
                        normalise(t, rule, cfg.num_attention_heads, cfg.kv_heads())
                    };
                    let t = if Site::parse(&site) == Site::Mask
                        && t.shape().len() == 4
                        && t.shape()[3] > s_len
                    {
                        select(&t, 3, &(0..s_len).collect::<Vec<_>>())
                    } else {
                        t
                    };
                    if Site::parse(&site) == Site::LmHead {
                        dtype = Precision::parse(dtype_name(t.dtype()));
                    }
                    here.insert(site, t);
                }
            }
            for (site, t) in here {
                tensors.insert(format!("{step}/{site}"), t);
            }
        }
        let n = forwards.len().min(like.steps.len());
        let mut dump = Dump::in_memory(self.manifest(like, n, dtype), tensors)?;
        dump.set_name(format!("msprobe dump {}", self.root.display()));
        Ok(dump)
    }

    /// Each mapped site's statistics at each recorded step, keyed like a dump
    /// (`(step, site)`), for a statistics-only comparison. Sites a map derives by
    /// slicing (`tail_of`, a mask wider than the cache) have no statistics.
    pub fn statistics(
        &self,
        map: &SiteMap,
        like: &Manifest,
    ) -> Result<BTreeMap<(Step, String), StatSite>> {
        let forwards = self.forwards(map);
        let cfg = &like.model;
        let mut out = BTreeMap::new();
        for (k, &fw) in forwards.iter().enumerate().take(like.steps.len()) {
            let step = like.steps[k];
            let s_len =
                like.scenario.prefill_len() + if let Step::Decode(j) = step { j + 1 } else { 0 };
            for rule in &map.sites {
                if rule.tail_of.is_some() {
                    continue;
                }
                let layers: Vec<usize> = if rule.site.contains("{i}") {
                    (0..cfg.num_hidden_layers).collect()
                } else {
                    vec![0]
                };
                for i in layers {
                    let site = Site::parse(&rule.site.replace("{i}", &i.to_string()));
                    let Some((s, entry, rec)) = self.record(map, rule, i, fw) else { continue };
                    let djson = s.dir.join("dump.json");
                    let stat = |key: &str| match rec.get(key) {
                        None => Err(Error::format(
                            &djson,
                            format!("entry `{entry}`: no statistic `{key}`"),
                        )),
                        Some(Value::Null) => Ok(None),
                        Some(v) => json::number(v).map(Some).ok_or_else(|| {
                            Error::format(
                                &djson,
                                format!("entry `{entry}`: statistic `{key}` is {v}, not a number"),
                            )
                        }),
                    };
                    let mut shape = shape_of(rec).unwrap_or_default();
                    let mut repeat = 1;
                    if let Some(l) = rule.layout {
                        if shape.len() == 4 {
                            shape = match l {
                                Layout::Bnsd => shape,
                                Layout::Bsnd => vec![shape[0], shape[2], shape[1], shape[3]],
                                Layout::Bnds => vec![shape[0], shape[1], shape[3], shape[2]],
                            };
                        }
                    }
                    if rule.heads == Some(Heads::Kv)
                        && shape.len() == 4
                        && shape[1] == cfg.num_attention_heads
                        && cfg.kv_heads() < cfg.num_attention_heads
                    {
                        repeat = cfg.num_attention_heads / cfg.kv_heads();
                        shape[1] = cfg.kv_heads();
                    }
                    if site == Site::Mask && shape.len() == 4 && shape[3] != s_len {
                        continue;
                    }
                    let stats = Stats {
                        max: stat("Max")?,
                        min: stat("Min")?,
                        mean: stat("Mean")?,
                        norm: stat("Norm")?.map(|n| n / (repeat as f64).sqrt()),
                    };
                    let dtype = rec.get("dtype").and_then(Value::as_str).and_then(parse_dtype);
                    out.insert((step, site.to_string()), StatSite { stats, shape, repeat, dtype });
                }
            }
        }
        Ok(out)
    }

    /// The contract manifest a statistics comparison reports for this dump.
    pub fn statistics_manifest(&self, map: &SiteMap, like: &Manifest) -> Manifest {
        let n = self.forwards(map).len().min(like.steps.len());
        self.manifest(like, n, None)
    }
}

fn shape_of(rec: &Value) -> Option<Vec<usize>> {
    rec.get("shape")?.as_array()?.iter().map(|d| d.as_u64().map(|d| d as usize)).collect()
}

/// `torch.float32`, `Float32`, `float32`... to a contract dtype.
fn parse_dtype(s: &str) -> Option<DType> {
    let s = s.rsplit('.').next().unwrap_or(s).to_ascii_lowercase();
    Some(match s.as_str() {
        "float64" | "double" => DType::F64,
        "float32" | "float" => DType::F32,
        "float16" | "half" => DType::F16,
        "bfloat16" => DType::BF16,
        "int64" | "long" => DType::I64,
        "int32" | "int" => DType::I32,
        "uint8" => DType::U8,
        "bool" => DType::Bool,
        _ => return None,
    })
}

fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        _ => "float32",
    }
}

/// A head-split tensor in the contract's `[batch, heads, seq, head_dim]`, GQA repeats
/// undone for key/value sites.
fn normalise(t: Tensor, rule: &map::Rule, q_heads: usize, kv_heads: usize) -> Tensor {
    if t.shape().len() != 4 {
        return t;
    }
    let t = match rule.layout {
        Some(Layout::Bsnd) => permute(&t, &[0, 2, 1, 3]),
        Some(Layout::Bnds) => permute(&t, &[0, 1, 3, 2]),
        _ => t,
    };
    if rule.heads != Some(Heads::Kv) || t.shape()[1] != q_heads || kv_heads >= q_heads {
        return t;
    }
    let rep = q_heads / kv_heads;
    let same = |a: usize, b: usize| head_bytes(&t, a) == head_bytes(&t, b);
    // HF's repeat_kv repeats each key/value head `rep` times in a row (h // rep); a port
    // that tiles them (h % kv_heads) stores the same cache and pairs heads differently,
    // which shows at the scores. Either way the stored heads are recovered.
    let interleaved = (0..q_heads).all(|h| same(h, (h / rep) * rep));
    let tiled = (0..q_heads).all(|h| same(h, h % kv_heads));
    let heads: Vec<usize> = if !interleaved && tiled {
        (0..kv_heads).collect()
    } else {
        (0..kv_heads).map(|g| g * rep).collect()
    };
    select(&t, 1, &heads)
}

fn head_bytes(t: &Tensor, h: usize) -> Vec<u8> {
    select(t, 1, &[h]).bytes().to_vec()
}

/// `t` with its axes reordered: output axis `k` is input axis `perm[k]`.
fn permute(t: &Tensor, perm: &[usize]) -> Tensor {
    let shape = t.shape();
    let mut in_stride = vec![1usize; shape.len()];
    for a in (0..shape.len().saturating_sub(1)).rev() {
        in_stride[a] = in_stride[a + 1] * shape[a + 1];
    }
    let out_shape: Vec<usize> = perm.iter().map(|&p| shape[p]).collect();
    let strides: Vec<usize> = perm.iter().map(|&p| in_stride[p]).collect();
    gather(t, out_shape, &strides, 0)
}

/// `t` restricted to `indices` along `axis`.
fn select(t: &Tensor, axis: usize, indices: &[usize]) -> Tensor {
    let shape = t.shape();
    let size = t.dtype().size();
    let mut stride = vec![1usize; shape.len()];
    for a in (0..shape.len().saturating_sub(1)).rev() {
        stride[a] = stride[a + 1] * shape[a + 1];
    }
    let mut out_shape = shape.to_vec();
    out_shape[axis] = indices.len();
    let numel: usize = out_shape.iter().product();
    let src = t.bytes();
    let mut bytes = Vec::with_capacity(numel * size);
    let mut idx = vec![0usize; shape.len()];
    for _ in 0..numel {
        let e: usize = idx
            .iter()
            .enumerate()
            .map(|(a, &i)| if a == axis { indices[i] } else { i } * stride[a])
            .sum();
        bytes.extend_from_slice(&src[e * size..(e + 1) * size]);
        advance(&mut idx, &out_shape);
    }
    Tensor::owned(t.dtype(), out_shape, bytes)
}

fn gather(t: &Tensor, out_shape: Vec<usize>, strides: &[usize], start: usize) -> Tensor {
    let size = t.dtype().size();
    let numel: usize = out_shape.iter().product();
    let src = t.bytes();
    let mut bytes = Vec::with_capacity(numel * size);
    let mut idx = vec![0usize; out_shape.len()];
    for _ in 0..numel {
        let e = start + idx.iter().zip(strides).map(|(i, s)| i * s).sum::<usize>();
        bytes.extend_from_slice(&src[e * size..(e + 1) * size]);
        advance(&mut idx, &out_shape);
    }
    Tensor::owned(t.dtype(), out_shape, bytes)
}

fn advance(idx: &mut [usize], shape: &[usize]) {
    for a in (0..shape.len()).rev() {
        idx[a] += 1;
        if idx[a] < shape[a] {
            return;
        }
        idx[a] = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_names_parse() {
        let p = vec!["Module.".to_string()];
        assert_eq!(
            parse_module_entry("Module.model.layers.0.self_attn.LlamaAttention.forward.3", &p),
            Some(("model.layers.0.self_attn".into(), 3))
        );
        assert_eq!(parse_module_entry("Torch.matmul.0.forward", &p), None);
        assert_eq!(parse_api_entry("Torch.matmul.12.forward"), Some(("Torch.matmul".into(), 12)));
        assert_eq!(parse_api_entry("Tensor.__add__.4.forward"), Some(("Tensor.__add__".into(), 4)));
    }

    #[test]
    fn permute_then_back_is_identity() {
        let v: Vec<f64> = (0..24).map(f64::from).collect();
        let t = Tensor::from_f64(&[1, 2, 3, 4], &v, DType::F32);
        let p = permute(&t, &[0, 1, 3, 2]);
        assert_eq!(p.shape(), &[1, 2, 4, 3]);
        // element [0,1,2,0] of p is element [0,1,0,2] of t: 12 + 0*4 + 2
        assert_eq!(p.get_f64(12 + 2 * 3), 14.0);
        let back = permute(&p, &[0, 1, 3, 2]);
        assert_eq!(back.bytes(), t.bytes());
    }

    #[test]
    fn repeated_kv_heads_are_undone_either_way() {
        let rule = map::Rule {
            site: "k".into(),
            module: None,
            api: None,
            nth: 0,
            take: None,
            layout: None,
            heads: Some(Heads::Kv),
            tail_of: None,
        };
        // kv heads a=[1,1], b=[2,2]; 4 query heads.
        let inter = Tensor::from_f64(&[1, 4, 1, 2], &[1., 1., 1., 1., 2., 2., 2., 2.], DType::F32);
        let tiled = Tensor::from_f64(&[1, 4, 1, 2], &[1., 1., 2., 2., 1., 1., 2., 2.], DType::F32);
        let want = Tensor::from_f64(&[1, 2, 1, 2], &[1., 1., 2., 2.], DType::F32);
        assert_eq!(normalise(inter, &rule, 4, 2).bytes(), want.bytes());
        assert_eq!(normalise(tiled, &rule, 4, 2).bytes(), want.bytes());
    }
}
