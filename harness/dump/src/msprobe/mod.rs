//! Reading msprobe dumps (PyPI `mindstudio-probe`, MindStudio's accuracy tool) as
//! contract dumps.
//!
//! A dump root holds `step<N>/<rank R | proc<pid>>/{dump.json, construct.json,
//! dump_tensor_data/}`; a multi-rank dump one `rank0..rank<K>` folder a rank in every
//! step, whose split sites the map reassembles (`ranks`, [`map`]). `dump.json` lists every recorded module or API call with its
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
mod layout;
pub mod map;
pub mod pt;
pub mod ranks;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::{DType, Dump, Manifest, Precision, Tensor};
use contract::error::{Error, Result};
use contract::site::{Site, Step};

pub use self::map::{FusedLayout, GateUpPart, Heads, Layout, QkvPart, Ranks, SiteMap, Take};
pub use self::ranks::Reassembly;

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
    /// The statistics bound the real tensor's from one side only ([`Reassembly`]'s
    /// `one_sided`: Max and Norm from above, Min from below; no Mean).
    pub one_sided: bool,
}

/// Each site's statistics, keyed by `(step, site)`.
pub type StatSites = BTreeMap<(Step, String), StatSite>;

/// One `step*/<rank>` folder.
struct RankDir {
    /// Its rank number (0 for a single `rank` or `proc<pid>` folder).
    index: usize,
    dir: PathBuf,
    data: serde_json::Map<String, Value>,
    /// `(module path, call n)` to its entry name.
    modules: HashMap<(String, usize), String>,
    /// `(parent entry, API name)` to `(call counter, entry)` in call order.
    apis: HashMap<(String, String), Vec<(usize, String)>>,
}

/// One `step*` folder: its ranks, rank 0 first (one for a single-rank dump).
struct StepDir {
    ranks: Vec<RankDir>,
}

/// An msprobe dump root, read and indexed.
pub struct MsprobeDump {
    root: PathBuf,
    mode: Mode,
    framework: String,
    level: String,
    steps: Vec<StepDir>,
}

/// One tensor record of one rank: the rank's folder, the entry and its record.
struct Record<'a> {
    rank: &'a RankDir,
    entry: String,
    rec: &'a Value,
}

/// True when `dir` looks like an msprobe dump root: a `step<N>/<rank*|proc*>/dump.json`
/// inside (whether its layout is whole is for [`MsprobeDump::open`] to say).
pub fn is_msprobe_dump(dir: &Path) -> bool {
    let sub = |d: &Path| -> Vec<PathBuf> {
        std::fs::read_dir(d).map_or(Vec::new(), |rd| rd.flatten().map(|e| e.path()).collect())
    };
    let named = |p: &Path, prefixes: &[&str]| {
        p.file_name()
            .and_then(|s| s.to_str())
            .is_some_and(|s| prefixes.iter().any(|x| s.starts_with(x)))
    };
    sub(dir).iter().filter(|s| named(s, &["step"]) && s.is_dir()).any(|s| {
        sub(s).iter().any(|r| {
            named(r, &["rank", "proc"]) && std::fs::symlink_metadata(r.join("dump.json")).is_ok()
        })
    })
}

/// The `step<N>` folders under `root` with their rank folders, rank 0 first: one
/// `rank<R>` a rank, numbered 0..K, or a single `rank` or `proc<pid>` folder.
fn step_dirs(root: &Path) -> Result<Vec<(usize, Vec<PathBuf>)>> {
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
            return Err(Error::format(&p, "a step of the dump that is not a directory"));
        }
        let mut ranks: Vec<(Option<usize>, PathBuf)> = Vec::new();
        let mut procs = Vec::new();
        for r in std::fs::read_dir(&p).map_err(|e| Error::io(&p, e))? {
            let r = r.map_err(|e| Error::io(&p, e))?.path();
            let name = r.file_name().and_then(|s| s.to_str()).unwrap_or_default();
            if !(name.starts_with("rank") || name.starts_with("proc")) || !r.is_dir() {
                continue;
            }
            // A dump.json of any kind (a FIFO, a dangling link, a directory) counts: it
            // is read or refused, never skipped, so that no step drops out silently.
            if std::fs::symlink_metadata(r.join("dump.json")).is_err() {
                continue;
            }
            if let Some(id) = name.strip_prefix("rank") {
                ranks.push((id.parse().ok(), r.clone()));
            } else if name.starts_with("proc") {
                procs.push(r);
            }
        }
        ranks.sort();
        let dirs = match (ranks.len(), procs.len()) {
            (0, 0) => {
                return Err(Error::format(
                    &p,
                    "a step folder without a rank<R>/dump.json or proc<pid>/dump.json",
                ))
            }
            (0, 1) => procs,
            (0, k) => {
                return Err(Error::format(
                    &p,
                    format!("{k} proc<pid> folders: ranks cannot be ordered (dump with start(rank_id=...) or under torch.distributed for rank<R> folders)"),
                ))
            }
            (1, 0) => vec![ranks.remove(0).1],
            (k, 0) => {
                let ids: Vec<Option<usize>> = ranks.iter().map(|(id, _)| *id).collect();
                if ids != (0..k).map(Some).collect::<Vec<_>>() {
                    return Err(Error::format(
                        &p,
                        format!("{k} rank folders, not numbered rank0..rank{}", k - 1),
                    ));
                }
                ranks.into_iter().map(|(_, d)| d).collect()
            }
            _ => return Err(Error::format(&p, "both rank<R> and proc<pid> folders")),
        };
        out.push((n, dirs));
    }
    out.sort();
    if let Some((_, first)) = out.first() {
        let k = first.len();
        if let Some((n, _)) = out.iter().find(|(_, d)| d.len() != k) {
            return Err(Error::format(
                root.join(format!("step{n}")),
                format!("a different number of ranks than step{} ({k})", out[0].0),
            ));
        }
    }
    Ok(out)
}

/// A `dump.json` or `construct.json`: a regular file under the JSON size cap, a
/// leading UTF-8 byte order mark skipped.
fn read_json(path: &Path) -> Result<Value> {
    let text = crate::read::read_json_text(path)?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    serde_json::from_str(&json::quote_nonfinite(text))
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

/// What one rank folder's `dump.json` says: (mode, framework, level, its indexed entries).
fn read_rank(dir: PathBuf, map: &SiteMap) -> Result<(Mode, String, String, RankDir)> {
    let djson = dir.join("dump.json");
    let v = read_json(&djson)?;
    let task = match v.get("task") {
        None => "tensor",
        Some(Value::String(s)) => s.as_str(),
        Some(other) => {
            return Err(Error::format(
                &djson,
                format!("field `task` is {}, not a string", kind(other)),
            ))
        }
    };
    let mode = match task {
        "tensor" => Mode::Tensor,
        "statistics" => Mode::Statistics,
        other => {
            return Err(Error::format(
                &djson,
                format!("task {other:?}: only tensor and statistics dumps are read"),
            ))
        }
    };
    let framework = v.get("framework").and_then(Value::as_str).unwrap_or("").to_string();
    let level = v.get("level").and_then(Value::as_str).unwrap_or("").to_string();
    let data = v
        .get("data")
        .and_then(Value::as_object)
        .cloned()
        .ok_or_else(|| Error::format(&djson, "no `data` object"))?;
    let cpath = dir.join("construct.json");
    // Absent is allowed; present, it is read (a FIFO or a directory is refused).
    let construct =
        if std::fs::symlink_metadata(&cpath).is_ok() { read_json(&cpath)? } else { Value::Null };
    let mut modules = HashMap::new();
    let mut apis: HashMap<(String, String), Vec<(usize, String)>> = HashMap::new();
    for name in data.keys() {
        if let Some(key) = parse_module_entry(name, &map.module_prefixes) {
            modules.insert(key, name.clone());
        } else if let Some((api, n)) = parse_api_entry(name) {
            let parent = construct.get(name).and_then(Value::as_str).unwrap_or("").to_string();
            apis.entry((parent, api)).or_default().push((n, name.clone()));
        }
    }
    for v in apis.values_mut() {
        v.sort();
    }
    Ok((mode, framework, level, RankDir { index: 0, dir, data, modules, apis }))
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
        for (_, rank_dirs) in dirs {
            let mut ranks = Vec::new();
            for (index, dir) in rank_dirs.into_iter().enumerate() {
                let djson = dir.join("dump.json");
                let (m, f, l, mut rank) = read_rank(dir, map)?;
                rank.index = index;
                if mode.is_some_and(|x| x != m) {
                    return Err(Error::format(
                        &djson,
                        "steps or ranks of one dump mix tensor and statistics tasks",
                    ));
                }
                mode = Some(m);
                (framework, level) = (f, l);
                ranks.push(rank);
            }
            steps.push(StepDir { ranks });
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
    /// the map's anchor module on rank 0.
    /// `layers`, the model's decoder layers, once the dump is seen to hold that many:
    /// every layer leaves at least one record in each rank's `dump.json`, so a manifest
    /// claiming more layers than the fullest `dump.json` has records (2^24, say) is
    /// refused before the harness looks each one up.
    fn layers_held(&self, layers: usize) -> Result<usize> {
        let records =
            self.steps.iter().flat_map(|s| s.ranks.iter().map(|r| r.data.len())).max().unwrap_or(0);
        if layers > records {
            return Err(Error::format(
                &self.root,
                format!(
                    "the run's manifest says num_hidden_layers {layers}, but no dump.json here holds more than {records} records (at least one per layer)"
                ),
            ));
        }
        Ok(layers)
    }

    fn forwards(&self, map: &SiteMap) -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        for (si, s) in self.steps.iter().enumerate() {
            let mut ns: Vec<usize> = s.ranks[0]
                .modules
                .keys()
                .filter(|(p, _)| *p == map.anchor)
                .map(|(_, n)| *n)
                .collect();
            ns.sort();
            out.extend(ns.into_iter().map(|n| (si, n)));
        }
        out
    }

    /// The tensor record a rule names at one forward on one rank, or `None` when that
    /// rank lacks it. An entry that is there but malformed (not an object, `output:
    /// null`, a record that is not an object) is an error naming it.
    fn record<'a>(
        rank: &'a RankDir,
        rule: &map::Rule,
        layer: usize,
        n: usize,
    ) -> Result<Option<Record<'a>>> {
        let Some(module) = rule.module.as_ref() else { return Ok(None) };
        let module = module.replace("{i}", &layer.to_string());
        let Some(entry) = rank.modules.get(&(module, n)) else { return Ok(None) };
        let mut entry = entry.clone();
        if let Some(api) = &rule.api {
            match rank.apis.get(&(entry, api.clone())).and_then(|v| v.get(rule.nth)) {
                Some((_, e)) => entry = e.clone(),
                None => return Ok(None),
            }
        }
        let Some(e) = rank.data.get(&entry) else { return Ok(None) };
        let Some(take) = rule.take.as_deref().and_then(Take::parse) else { return Ok(None) };
        let bad = |what: String| {
            Error::format(rank.dir.join("dump.json"), format!("entry `{entry}`: {what}"))
        };
        if !e.is_object() {
            return Err(bad(format!("{} where a record object is expected", kind(e))));
        }
        let field = |key: &str| -> Result<Option<&'a Value>> {
            match e.get(key) {
                None => Ok(None),
                Some(Value::Null) => Err(bad(format!("`{key}` is null"))),
                Some(v) => Ok(Some(v)),
            }
        };
        let rec = match take {
            Take::Input(k) => match field("input_args")? {
                None => None,
                Some(Value::Array(a)) => a.get(k),
                Some(v) => return Err(bad(format!("`input_args` is {}, not a list", kind(v)))),
            },
            Take::Kwarg(name) => match field("input_kwargs")? {
                None => None,
                Some(Value::Object(o)) => o.get(&name),
                Some(v) => {
                    return Err(bad(format!("`input_kwargs` is {}, not an object", kind(v))))
                }
            },
            Take::Output(k) => match field("output")? {
                None => None,
                Some(Value::Array(a)) => a.get(k),
                Some(v) if k == 0 => Some(v),
                Some(_) => None,
            },
        };
        let Some(rec) = rec else { return Ok(None) };
        match rec {
            Value::Object(_) => {}
            // A `None` argument msprobe recorded as null: not a tensor.
            Value::Null => return Ok(None),
            v => return Err(bad(format!("a tensor record that is {}, not an object", kind(v)))),
        }
        if rec.get("shape").is_none() {
            return Ok(None);
        }
        Ok(Some(Record { rank, entry, rec }))
    }

    /// The records a rule reads at one forward. With the rule's `ranks`, one a rank:
    /// `None` when rank 0 lacks it (the site is missing), and a rank that lacks what
    /// rank 0 has is an error naming its `dump.json`. Without, every rank's that has
    /// it (one rank alone for a pipeline stage; [`ranks`] infers the rest); `None` when
    /// no rank has it.
    fn records<'a>(
        &'a self,
        rule: &map::Rule,
        site: &str,
        layer: usize,
        (si, n): (usize, usize),
    ) -> Result<Option<Vec<Record<'a>>>> {
        let ranks = &self.steps[si].ranks;
        if rule.ranks.is_none() && ranks.len() > 1 {
            let mut out = Vec::new();
            for rank in ranks {
                if let Some(r) = Self::record(rank, rule, layer, n)? {
                    out.push(r);
                }
            }
            return Ok((!out.is_empty()).then_some(out));
        }
        let Some(first) = Self::record(&ranks[0], rule, layer, n)? else { return Ok(None) };
        let mut out = vec![first];
        if rule.ranks.is_some() {
            for rank in &ranks[1..] {
                let r = Self::record(rank, rule, layer, n)?.ok_or_else(|| {
                    Error::format(
                        rank.dir.join("dump.json"),
                        format!("no record for site `{site}` (entry `{}` on rank 0)", out[0].entry),
                    )
                })?;
                out.push(r);
            }
        }
        Ok(Some(out))
    }

    /// A recorded tensor, read from its data file and checked against `dump.json`;
    /// with the file it came from.
    fn load_tensor(&self, r: &Record) -> Result<(PathBuf, Tensor)> {
        let (entry, rec) = (&r.entry, r.rec);
        let djson = r.rank.dir.join("dump.json");
        let name = rec.get("data_name").and_then(Value::as_str).ok_or_else(|| {
            Error::format(&djson, format!("entry `{entry}`: a tensor record without data_name"))
        })?;
        let file = r.rank.dir.join("dump_tensor_data").join(name);
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
        Ok((file, t))
    }

    /// A site's tensor at one forward: each rank's tensor read (the part of a fused
    /// q/k/v projection taken), the ranks put back together as the rule declares or, by
    /// default, as [`ranks::tensors`] infers against `want` (the site's contract shape
    /// at this step), and the layout normalised; with how the ranks were put back
    /// together (`None` for a single-rank dump). `None` when the dump does not hold it
    /// as a tensor.
    fn site_tensor(
        &self,
        rule: &map::Rule,
        site: &str,
        layer: usize,
        fw: (usize, usize),
        cfg: &crate::ModelConfig,
        want: &[usize],
    ) -> Result<Option<(Tensor, Option<Reassembly>)>> {
        let total = self.steps[fw.0].ranks.len();
        let Some(recs) = self.records(rule, site, layer, fw)? else { return Ok(None) };
        let r0 = recs[0].rec;
        if r0.get("data_name").is_none()
            && r0.get("type").and_then(Value::as_str).is_some_and(|t| !t.contains("Tensor"))
        {
            return Ok(None);
        }
        let n_ranks = recs.len();
        let mut parts = Vec::with_capacity(n_ranks);
        let mut fused = None;
        for r in &recs {
            let (file, t) = self.load_tensor(r)?;
            let t = match fused_part(rule) {
                None => t,
                Some(what) => {
                    // Split along the last axis over the ranks: each holds its share of
                    // the heads (of the MLP's units).
                    let width = match what {
                        Fused::Qkv(_) => {
                            (cfg.num_attention_heads + 2 * cfg.kv_heads()) * cfg.head_dim()
                        }
                        Fused::GateUp(_) => 2 * cfg.intermediate_size,
                    };
                    let share = match rule.ranks {
                        Some(Ranks::Concat(a)) if a + 1 == t.shape().len() => n_ranks,
                        None if n_ranks > 1 && t.shape().last() == Some(&(width / n_ranks)) => {
                            n_ranks
                        }
                        _ => 1,
                    };
                    fused = Some(what.describe(rule.fused_layout));
                    match what {
                        Fused::Qkv(part) => {
                            let heads = (cfg.num_attention_heads, cfg.kv_heads());
                            if !heads.0.is_multiple_of(share) || !heads.1.is_multiple_of(share) {
                                return Err(Error::format(
                                    &file,
                                    format!("fused q/k/v over {share} ranks: {} query and {} key/value heads do not divide among them", heads.0, heads.1),
                                ));
                            }
                            let counts = (heads.0 / share, heads.1 / share, cfg.head_dim());
                            layout::split_qkv(&file, &t, part, rule.fused_layout, counts)?
                        }
                        Fused::GateUp(part) => {
                            let units = cfg.intermediate_size;
                            if !units.is_multiple_of(share) {
                                return Err(Error::format(
                                    &file,
                                    format!("fused gate/up over {share} ranks: intermediate_size {units} does not divide among them"),
                                ));
                            }
                            layout::split_gate_up(
                                &file,
                                &t,
                                part,
                                rule.fused_layout,
                                units / share,
                            )?
                        }
                    }
                }
            };
            parts.push((r.rank.index, file, t));
        }
        let heads = (cfg.num_attention_heads, cfg.kv_heads());
        let declared = |kind: String| (total > 1).then(|| Reassembly::declared(kind));
        let (t, how) = match rule.ranks {
            None if total > 1 => {
                let site = Site::parse(site);
                let fits = |s: &[usize]| fits_contract(s, want, rule, heads, site == Site::Mask);
                let (t, how) = ranks::tensors(parts, total, &site, &fits, Some(cfg.vocab_size))?;
                (t, Some(how))
            }
            None => (parts.swap_remove(0).2, None),
            Some(Ranks::Concat(axis)) => {
                let files: Vec<_> = parts.into_iter().map(|(_, f, t)| (f, t)).collect();
                (layout::concat(&files, axis)?, declared(format!("concat({axis})")))
            }
            Some(Ranks::Sum) => {
                let files: Vec<_> = parts.into_iter().map(|(_, f, t)| (f, t)).collect();
                (layout::sum(&files)?, declared("sum".into()))
            }
        };
        // A fused projection split per rank says so before how its parts were put back.
        let how = match (how, fused) {
            (Some(h), Some(f)) => {
                let kind = match h.kind.strip_prefix("map: ") {
                    Some(k) => format!("map: {f}, {k}"),
                    None => format!("{f}, {}", h.kind),
                };
                Some(Reassembly { kind, ..h })
            }
            (h, _) => h,
        };
        Ok(Some((layout::normalise(t, rule, heads.0, heads.1), how)))
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
            "ranks": self.steps.first().map_or(1, |s| s.ranks.len()),
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
        let layers_held = self.layers_held(cfg.num_hidden_layers)?;
        let dims = like.shape_dims();
        let mut tensors = BTreeMap::new();
        let mut how = BTreeMap::new();
        let mut dtype = None;
        for (k, &fw) in forwards.iter().enumerate().take(like.steps.len()) {
            let step = like.steps[k];
            let t_len = if step == Step::Prefill { like.scenario.prefill_len() } else { 1 };
            let s_len =
                like.scenario.prefill_len() + if let Step::Decode(j) = step { j + 1 } else { 0 };
            let mut here: BTreeMap<String, Tensor> = BTreeMap::new();
            for rule in &map.sites {
                let layers: Vec<usize> =
                    if rule.site.contains("{i}") { (0..layers_held).collect() } else { vec![0] };
                for i in layers {
                    let site = rule.site.replace("{i}", &i.to_string());
                    let t = if let Some(src) = &rule.tail_of {
                        let src = src.replace("{i}", &i.to_string());
                        match here.get(&src) {
                            Some(c) if c.shape().len() == 4 && c.shape()[2] >= t_len => {
                                let s = c.shape()[2];
                                layout::select(c, 2, &(s - t_len..s).collect::<Vec<_>>())
                            }
                            _ => continue,
                        }
                    } else {
                        let want = Site::parse(&site).shape(step, &dims);
                        match self.site_tensor(rule, &site, i, fw, cfg, &want)? {
                            Some((t, h)) => {
                                if let Some(h) = h {
                                    how.insert(format!("{step}/{site}"), h);
                                }
                                t
                            }
                            None => continue,
                        }
                    };
                    let t = if Site::parse(&site) == Site::Mask
                        && t.shape().len() == 4
                        && t.shape()[3] > s_len
                    {
                        layout::select(&t, 3, &(0..s_len).collect::<Vec<_>>())
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
        let source = PathBuf::from(format!(
            "{} (msprobe dump read with the site map {:?})",
            self.root.display(),
            map.name
        ));
        let mut manifest = self.manifest(like, n, dtype);
        record_reassembly(&mut manifest, &how);
        let mut dump = Dump::in_memory_from(manifest, tensors, &source)?;
        dump.set_name(format!("msprobe dump {}", self.root.display()));
        Ok(dump)
    }

    /// Each mapped site's statistics at each recorded step, keyed like a dump
    /// (`(step, site)`), for a statistics-only comparison. Sites a map derives by
    /// slicing (`tail_of`, a mask wider than the cache), taking part of a fused q/k/v
    /// projection or adding partial sums over ranks have no statistics; a site
    /// concatenated over ranks has the statistics of the whole (max of the maxima,
    /// min of the minima, the mean weighted by elements, the root of the summed
    /// squared norms). Without a map's `ranks`, a multi-rank dump's ranks are merged
    /// as [`ranks::statistics`] infers.
    pub fn statistics(&self, map: &SiteMap, like: &Manifest) -> Result<StatSites> {
        Ok(self.statistics_with_manifest(map, like)?.0)
    }

    /// [`MsprobeDump::statistics`] with the manifest a statistics comparison reports
    /// (which records how each site's ranks were merged).
    pub fn statistics_with_manifest(
        &self,
        map: &SiteMap,
        like: &Manifest,
    ) -> Result<(StatSites, Manifest)> {
        let forwards = self.forwards(map);
        let cfg = &like.model;
        let layers_held = self.layers_held(cfg.num_hidden_layers)?;
        let dims = like.shape_dims();
        let heads = (cfg.num_attention_heads, cfg.kv_heads());
        let mut how = BTreeMap::new();
        let mut out = BTreeMap::new();
        for (k, &fw) in forwards.iter().enumerate().take(like.steps.len()) {
            let step = like.steps[k];
            let s_len =
                like.scenario.prefill_len() + if let Step::Decode(j) = step { j + 1 } else { 0 };
            for rule in &map.sites {
                if rule.tail_of.is_some()
                    || fused_part(rule).is_some()
                    || rule.ranks == Some(Ranks::Sum)
                {
                    continue;
                }
                let layers: Vec<usize> =
                    if rule.site.contains("{i}") { (0..layers_held).collect() } else { vec![0] };
                for i in layers {
                    let name = rule.site.replace("{i}", &i.to_string());
                    let site = Site::parse(&name);
                    let Some(recs) = self.records(rule, &name, i, fw)? else { continue };
                    let mut per_rank = Vec::with_capacity(recs.len());
                    for r in &recs {
                        per_rank.push(rank_stats(r)?);
                    }
                    let (mut stats, mut shape) = per_rank[0].clone();
                    let total = self.steps[fw.0].ranks.len();
                    let mut one_sided = false;
                    match rule.ranks {
                        Some(Ranks::Concat(axis)) => {
                            (stats, shape) = concat_stats(&recs, &per_rank, axis)?;
                            how.insert(
                                format!("{step}/{site}"),
                                Reassembly::declared(format!("concat({axis})")),
                            );
                        }
                        Some(Ranks::Sum) => {}
                        None if total > 1 => {
                            let want = site.shape(step, &dims);
                            let fits = |s: &[usize]| {
                                fits_contract(s, &want, rule, heads, site == Site::Mask)
                            };
                            let parts: Vec<ranks::StatPart> = recs
                                .iter()
                                .zip(per_rank)
                                .map(|(r, (st, sh))| (r.rank.index, st, sh))
                                .collect();
                            let h;
                            let vocab = Some(cfg.vocab_size);
                            (stats, shape, h) =
                                ranks::statistics(&parts, total, &site, &fits, vocab);
                            one_sided = h.one_sided;
                            how.insert(format!("{step}/{site}"), h);
                        }
                        None => {}
                    }
                    let mut repeat = 1;
                    if rule.heads == Some(Heads::Kv)
                        && shape.len() == 4
                        && contract_shape(&shape, rule, (0, 0))[1] == cfg.num_attention_heads
                        && cfg.kv_heads() < cfg.num_attention_heads
                    {
                        repeat = cfg.num_attention_heads / cfg.kv_heads();
                    }
                    shape = contract_shape(&shape, rule, heads);
                    if site == Site::Mask && shape.len() == 4 && shape[3] != s_len {
                        continue;
                    }
                    stats.norm = stats.norm.map(|n| n / (repeat as f64).sqrt());
                    let dtype =
                        recs[0].rec.get("dtype").and_then(Value::as_str).and_then(parse_dtype);
                    out.insert(
                        (step, site.to_string()),
                        StatSite { stats, shape, repeat, dtype, one_sided },
                    );
                }
            }
        }
        let mut manifest = self.statistics_manifest(map, like);
        record_reassembly(&mut manifest, &how);
        Ok((out, manifest))
    }

    /// The contract manifest a statistics comparison reports for this dump.
    pub fn statistics_manifest(&self, map: &SiteMap, like: &Manifest) -> Manifest {
        let n = self.forwards(map).len().min(like.steps.len());
        self.manifest(like, n, None)
    }
}

/// The part of a fused projection a rule takes.
#[derive(Clone, Copy)]
enum Fused {
    Qkv(QkvPart),
    GateUp(GateUpPart),
}

impl Fused {
    /// `fused q/k/v (groups)`, `fused gate/up (blocks)`: how a report names it.
    fn describe(self, layout: FusedLayout) -> String {
        let what = match self {
            Fused::Qkv(_) => "q/k/v",
            Fused::GateUp(_) => "gate/up",
        };
        let layout = match layout {
            FusedLayout::Blocks => "blocks",
            FusedLayout::Groups => "groups",
        };
        format!("fused {what} ({layout})")
    }
}

fn fused_part(rule: &map::Rule) -> Option<Fused> {
    rule.fused_qkv.map(Fused::Qkv).or(rule.fused_gate_up.map(Fused::GateUp))
}

/// Writes how each site's ranks were put back together into `manifest.producer`:
/// `reassembly` (step/site to kind), and where there were any, `rank_divergence`
/// (step/site to the ranks that differ) and `reassembly_inexact` (step/site to what a
/// statistics merge could not give). Nothing for a single-rank dump.
pub(crate) fn record_reassembly(manifest: &mut Manifest, how: &BTreeMap<String, Reassembly>) {
    if how.is_empty() {
        return;
    }
    let pick = |f: fn(&Reassembly) -> Option<&String>| -> serde_json::Map<String, Value> {
        how.iter().filter_map(|(k, r)| f(r).map(|v| (k.clone(), Value::from(v.as_str())))).collect()
    };
    if !manifest.producer.is_object() {
        manifest.producer = serde_json::json!({ "producer": manifest.producer });
    }
    let p = &mut manifest.producer;
    p["reassembly"] = Value::Object(pick(|r| Some(&r.kind)));
    let divergence = pick(|r| r.divergence.as_ref());
    if !divergence.is_empty() {
        p["rank_divergence"] = Value::Object(divergence);
    }
    let inexact = pick(|r| r.inexact.as_ref());
    if !inexact.is_empty() {
        p["reassembly_inexact"] = Value::Object(inexact);
    }
}

/// A recorded shape in the contract's layout: `rule.layout` undone, and a GQA repeat of
/// the key/value heads (`heads: kv`, `q` heads where the contract has `kv`) too.
fn contract_shape(shape: &[usize], rule: &map::Rule, (q, kv): (usize, usize)) -> Vec<usize> {
    let mut s = shape.to_vec();
    if s.len() == 4 {
        s = match rule.layout {
            Some(Layout::Bsnd) => vec![s[0], s[2], s[1], s[3]],
            Some(Layout::Bnds) => vec![s[0], s[1], s[3], s[2]],
            _ => s,
        };
        if rule.heads == Some(Heads::Kv) && s[1] == q && kv < q {
            s[1] = kv;
        }
    }
    s
}

/// Whether a recorded tensor of `shape` is the whole site whose contract shape is
/// `want` (a mask may be wider than the keys cached: it is cut to them).
fn fits_contract(
    shape: &[usize],
    want: &[usize],
    rule: &map::Rule,
    heads: (usize, usize),
    mask: bool,
) -> bool {
    let s = contract_shape(shape, rule, heads);
    if mask && s.len() == 4 && want.len() == 4 {
        s[..3] == want[..3] && s[3] >= want[3]
    } else {
        s == want
    }
}

/// One rank's statistics of a record and its recorded shape.
fn rank_stats(r: &Record) -> Result<(Stats, Vec<usize>)> {
    let djson = r.rank.dir.join("dump.json");
    let entry = &r.entry;
    // msprobe records null only for integer (and bool) tensors; on any other a null
    // would read as "no difference".
    let dtype = r.rec.get("dtype").and_then(Value::as_str);
    let integral = dtype.is_some_and(|s| {
        let s = s.rsplit('.').next().unwrap_or(s).to_ascii_lowercase();
        s.starts_with("int") || s.starts_with("uint") || matches!(s.as_str(), "bool" | "long")
    });
    let stat = |key: &str| {
        match r.rec.get(key) {
        None => Err(Error::format(&djson, format!("entry `{entry}`: no statistic `{key}`"))),
        Some(Value::Null) if integral => Ok(None),
        Some(Value::Null) => Err(Error::format(
            &djson,
            format!(
                "entry `{entry}`: statistic `{key}` is null on a {} tensor (msprobe writes null only for integer tensors)",
                dtype.unwrap_or("non-integer")
            ),
        )),
        Some(v) => json::number(v).map(Some).ok_or_else(|| {
            Error::format(
                &djson,
                format!("entry `{entry}`: statistic `{key}` is {v}, not a number"),
            )
        }),
    }
    };
    let stats =
        Stats { max: stat("Max")?, min: stat("Min")?, mean: stat("Mean")?, norm: stat("Norm")? };
    Ok((stats, shape_of(r.rec).unwrap_or_default()))
}

/// The statistics of the ranks' tensors concatenated along `axis`.
fn concat_stats(
    recs: &[Record],
    per_rank: &[(Stats, Vec<usize>)],
    axis: usize,
) -> Result<(Stats, Vec<usize>)> {
    let (_, shape0) = &per_rank[0];
    if axis >= shape0.len() {
        return Err(Error::format(
            recs[0].rank.dir.join("dump.json"),
            format!(
                "ranks concatenate along axis {axis}, but entry `{}` has shape {shape0:?}",
                recs[0].entry
            ),
        ));
    }
    let off = |s: &[usize]| {
        s.iter().enumerate().filter(|&(a, _)| a != axis).map(|(_, &d)| d).collect::<Vec<_>>()
    };
    for (r, (_, s)) in recs.iter().zip(per_rank).skip(1) {
        if s.len() != shape0.len() || off(s) != off(shape0) {
            return Err(Error::format(
                r.rank.dir.join("dump.json"),
                format!(
                    "ranks disagree: entry `{}` has shape {s:?} here, rank 0 has {shape0:?} (concatenated along axis {axis})",
                    r.entry
                ),
            ));
        }
    }
    let stats: Vec<Stats> = per_rank.iter().map(|(s, _)| *s).collect();
    let shapes: Vec<&[usize]> = per_rank.iter().map(|(_, s)| s.as_slice()).collect();
    Ok(ranks::concat_stats(&stats, &shapes, axis))
}

/// What kind of JSON value `v` is, for a message.
fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
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

    /// Statistics of ranks concatenated are those of the whole: [1, 2] and [3, -4, 0]
    /// make [1, 2, 3, -4, 0] (max 3, min -4, mean 0.4, norm sqrt(30)).
    #[test]
    fn concatenated_ranks_have_the_statistics_of_the_whole() {
        let rank = |r: usize| RankDir {
            index: r,
            dir: PathBuf::from(format!("rank{r}")),
            data: serde_json::Map::new(),
            modules: HashMap::new(),
            apis: HashMap::new(),
        };
        let (r0, r1) = (rank(0), rank(1));
        let recs = [
            Record { rank: &r0, entry: "e".into(), rec: &Value::Null },
            Record { rank: &r1, entry: "e".into(), rec: &Value::Null },
        ];
        let st = |max: f64, min: f64, mean: f64, norm: f64| Stats {
            max: Some(max),
            min: Some(min),
            mean: Some(mean),
            norm: Some(norm),
        };
        let per_rank = [
            (st(2., 1., 1.5, 5f64.sqrt()), vec![1, 2]),
            (st(3., -4., -1. / 3., 25f64.sqrt()), vec![1, 3]),
        ];
        let (s, shape) = concat_stats(&recs, &per_rank, 1).unwrap();
        assert_eq!(shape, vec![1, 5]);
        assert_eq!((s.max, s.min), (Some(3.), Some(-4.)));
        assert!((s.mean.unwrap() - 0.4).abs() < 1e-15);
        assert!((s.norm.unwrap() - 30f64.sqrt()).abs() < 1e-15);
        // Off the axis they must agree; rank 1's dump.json is named.
        let bad = [per_rank[0].clone(), (per_rank[1].0, vec![2, 3])];
        let e = concat_stats(&recs, &bad, 1).unwrap_err().to_string();
        assert!(e.starts_with("rank1/dump.json: ranks disagree"), "{e}");
    }
}
