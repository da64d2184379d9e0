//! Stage 1, the dump: what a producer writes and every later stage reads. Uses only
//! the contract.
//!
//! The model of a dump (CONTRACT §1): a directory with `manifest.json`, activations in
//! one safetensors file, one safetensors file a step (`activations/<step>.safetensors`,
//! §1.1) or a tree of `.npy` files, and optional HF weights (beside it, or a checkpoint
//! by reference, §1.2).
//!
//! A [`Dump`] is also what an implementation produces in memory, so that a run and a
//! file on disk go through the same comparison.

mod dtype;
pub mod guard;
mod manifest;
pub mod mapped;
pub mod msprobe;
mod npy;
pub mod pickle;
pub mod ranked;
pub mod read;
pub mod safetensors;
mod tensor;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};

pub use self::dtype::{DType, Precision};
pub use self::manifest::{
    AdamW, AdapterSpec, LossScale, Manifest, ModelConfig, Scenario, TrainSpec, Trainable, FORMAT,
};
pub use self::safetensors::SafetensorsFile;
pub use self::tensor::Tensor;

use contract::error::{escape_controls, Error, Result};
use contract::site::{self, Site, Step};

enum Store {
    Safetensors(SafetensorsFile),
    NpyTree(PathBuf),
    /// `activations/<step>.safetensors`, one file a step (CONTRACT §1.1).
    PerStep(BTreeMap<String, SafetensorsFile>),
    Memory(BTreeMap<String, Tensor>),
}

/// Weights by reference (CONTRACT §1.2): an HF checkpoint directory and the sha256 of
/// each of its files as the producer read them.
#[derive(Debug, Clone, PartialEq)]
pub struct WeightsRef {
    pub checkpoint: PathBuf,
    /// File name (relative to `checkpoint`) → lowercase hex sha256; may be empty.
    pub sha256: BTreeMap<String, String>,
}

/// A dump: its manifest and its activations, keyed `"<step>/<site>"`.
pub struct Dump {
    dir: Option<PathBuf>,
    /// How an in-memory dump is named in messages and reports.
    name: Option<String>,
    pub manifest: Manifest,
    store: Store,
    keys: BTreeMap<Step, Vec<Site>>,
}

impl Dump {
    /// Opens the dump directory `dir` and checks its structure: a readable manifest,
    /// one activations store, every key of the form `<step>/<site>` naming a listed
    /// step, and every listed step holding at least one tensor.
    pub fn open(dir: &Path) -> Result<Dump> {
        if !dir.is_dir() {
            return Err(Error::format(
                dir,
                "not a dump directory (it does not exist or is not a directory)",
            ));
        }
        let manifest = Manifest::load(&dir.join("manifest.json"))?;
        let st = dir.join("activations.safetensors");
        let tree = dir.join("activations");
        let (store, names): (Store, Vec<String>) = if st.is_file() {
            let f = SafetensorsFile::open(&st)?;
            let names = f.keys().map(str::to_string).collect();
            (Store::Safetensors(f), names)
        } else if tree.is_dir() && has_step_files(&tree)? {
            let (files, names) = per_step_files(&tree)?;
            (Store::PerStep(files), names)
        } else if tree.is_dir() {
            let names = npy_tree_keys(&tree)?;
            (Store::NpyTree(tree), names)
        } else {
            return Err(Error::format(
                dir,
                "no activations: expected activations.safetensors or an activations/ directory",
            ));
        };
        let src = match &store {
            Store::Safetensors(f) => f.path().to_path_buf(),
            _ => dir.join("activations"),
        };
        let keys = index_keys(&manifest, &names, &src)?;
        Ok(Dump { dir: Some(dir.to_path_buf()), name: None, manifest, store, keys })
    }

    /// A dump held in memory, as an implementation produces it.
    pub fn in_memory(manifest: Manifest, tensors: BTreeMap<String, Tensor>) -> Result<Dump> {
        Self::in_memory_from(manifest, tensors, Path::new("<in-memory dump>"))
    }

    /// [`Dump::in_memory`] for tensors gathered from `source` (another dump's files),
    /// which names it in messages.
    pub fn in_memory_from(
        manifest: Manifest,
        tensors: BTreeMap<String, Tensor>,
        source: &Path,
    ) -> Result<Dump> {
        let names: Vec<String> = tensors.keys().cloned().collect();
        let keys = index_keys(&manifest, &names, source)?;
        Ok(Dump { dir: None, name: None, manifest, store: Store::Memory(tensors), keys })
    }

    /// This dump with its site names translated by `rename` (a name `rename` maps to
    /// `None` keeps its own), held in memory; tensors are shared, not copied. Two names
    /// mapped to one site in the same step is an error.
    pub fn rename_sites(&self, rename: impl Fn(&str) -> Option<String>) -> Result<Dump> {
        let mut tensors = BTreeMap::new();
        for (&step, sites) in &self.keys {
            for s in sites {
                let from = s.to_string();
                let to = rename(&from).unwrap_or_else(|| from.clone());
                let key = format!("{step}/{to}");
                let t = self.get(step, s)?.ok_or_else(|| {
                    Error::format(self.label(), format!("tensor `{step}/{from}` vanished"))
                })?;
                if tensors.insert(key.clone(), t).is_some() {
                    return Err(Error::format(self.label(), format!("two sites map to `{key}`")));
                }
            }
        }
        let keys = index_keys(
            &self.manifest,
            &tensors.keys().cloned().collect::<Vec<_>>(),
            Path::new(&self.label()),
        )?;
        Ok(Dump {
            dir: self.dir.clone(),
            name: self.name.clone(),
            manifest: self.manifest.clone(),
            store: Store::Memory(tensors),
            keys,
        })
    }

    /// The forward of a training step (CONTRACT §6) seen as the prefill it is
    /// (docs/training.md: the same positions, tables and mask): a dump whose only step is
    /// `prefill`, holding this dump's forward sites of step `train`, its manifest without
    /// `train` and without decode tokens. Weights and adapter are this dump's (the
    /// directory is kept); tensors are shared, not copied. `None` for a dump that is not a
    /// training step.
    pub fn train_forward_as_prefill(&self) -> Result<Option<Dump>> {
        if self.manifest.train.is_none() {
            return Ok(None);
        }
        let mut manifest = self.manifest.clone();
        manifest.train = None;
        manifest.steps = vec![Step::Prefill];
        manifest.scenario.decode_ids.clear();
        if let Some(o) = manifest.raw.as_object_mut() {
            o.remove("train");
        }
        let mut tensors = BTreeMap::new();
        for s in self.sites(Step::Train).iter().filter(|s| !s.is_backward() && **s != Site::Loss) {
            let t = self.get(Step::Train, s)?.ok_or_else(|| {
                Error::format(self.label(), format!("tensor `train/{s}` vanished"))
            })?;
            tensors.insert(site::key(Step::Prefill, s), t);
        }
        let names: Vec<String> = tensors.keys().cloned().collect();
        let keys = index_keys(&manifest, &names, Path::new(&self.label()))?;
        Ok(Some(Dump {
            dir: self.dir.clone(),
            name: Some(self.label()),
            manifest,
            store: Store::Memory(tensors),
            keys,
        }))
    }

    /// The directory this dump was read from, if any.
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// Names this dump in messages and reports (instead of its directory).
    pub fn set_name(&mut self, name: impl Into<String>) {
        self.name = Some(name.into());
    }

    /// A short label for messages: the name given, the directory, or "<in-memory dump>".
    pub fn label(&self) -> String {
        if let Some(n) = &self.name {
            return n.clone();
        }
        self.dir
            .as_ref()
            .map_or_else(|| "<in-memory dump>".to_string(), |d| d.display().to_string())
    }

    /// The sites present in `step`, in compute order.
    pub fn sites(&self, step: Step) -> &[Site] {
        self.keys.get(&step).map_or(&[], Vec::as_slice)
    }

    /// True if the dump holds `site` at `step`.
    pub fn has(&self, step: Step, site: &Site) -> bool {
        self.sites(step).contains(site)
    }

    /// The tensor of `site` at `step`, or `None` when the dump lacks it.
    pub fn get(&self, step: Step, site: &Site) -> Result<Option<Tensor>> {
        let key = site::key(step, site);
        match &self.store {
            Store::Safetensors(f) => Ok(f.get(&key)),
            Store::Memory(m) => Ok(m.get(&key).cloned()),
            Store::PerStep(files) => Ok(files.get(&step.to_string()).and_then(|f| f.get(&key))),
            Store::NpyTree(root) => {
                if !self.has(step, site) {
                    return Ok(None);
                }
                npy::read(&root.join(step.to_string()).join(format!("{site}.npy"))).map(Some)
            }
        }
    }

    /// The HF weights stored beside the activations (`weights.safetensors`), if any.
    pub fn weights(&self) -> Result<Option<SafetensorsFile>> {
        let Some(dir) = &self.dir else { return Ok(None) };
        let p = dir.join("weights.safetensors");
        if p.is_file() {
            SafetensorsFile::open(&p).map(Some)
        } else {
            Ok(None)
        }
    }

    /// The checkpoint the manifest references instead of `weights.safetensors`
    /// (CONTRACT §1.2: `"weights": {"checkpoint": DIR, "sha256": {FILE: HEX}}`), its
    /// directory resolved against the dump's; `None` when the manifest has none.
    pub fn weights_ref(&self) -> Result<Option<WeightsRef>> {
        let Some(w) = self.manifest.raw.get("weights") else { return Ok(None) };
        let manifest = self.dir.as_ref().map(|d| d.join("manifest.json")).unwrap_or_default();
        let bad = |what: &str| Error::Manifest { path: manifest.clone(), what: what.into() };
        let dir = w
            .get("checkpoint")
            .and_then(serde_json::Value::as_str)
            .ok_or_else(|| bad("field `weights.checkpoint` is not a string"))?;
        let mut sha256 = BTreeMap::new();
        if let Some(h) = w.get("sha256") {
            let h = h.as_object().ok_or_else(|| bad("field `weights.sha256` is not an object"))?;
            for (file, hex) in h {
                let hex = hex.as_str().ok_or_else(|| {
                    bad(&format!("field `weights.sha256.{file}` is not a string"))
                })?;
                // A file of the checkpoint: a relative path that stays inside it (not
                // `/dev/zero`, not `../x`).
                let inside = !file.is_empty()
                    && Path::new(file)
                        .components()
                        .all(|c| matches!(c, std::path::Component::Normal(_)));
                if !inside {
                    return Err(bad(&format!(
                        "field `weights.sha256` names {file:?}, not a file inside the checkpoint directory (a relative path without `..`)"
                    )));
                }
                sha256.insert(file.clone(), hex.to_string());
            }
        }
        let p = PathBuf::from(dir);
        let checkpoint = match &self.dir {
            Some(d) if p.is_relative() => d.join(p),
            _ => p,
        };
        Ok(Some(WeightsRef { checkpoint, sha256 }))
    }

    /// The directory of the dump's LoRA adapter (CONTRACT §5) and whether it is merged;
    /// `None` when the manifest names none. An in-memory dump's adapter is resolved
    /// against nothing: it is refused, since its files cannot be found.
    pub fn adapter(&self) -> Result<Option<(PathBuf, bool)>> {
        let Some(spec) = &self.manifest.adapter else { return Ok(None) };
        let dir = self.dir.as_ref().ok_or_else(|| {
            Error::format(self.label(), "field `adapter`: an in-memory dump has no adapter files")
        })?;
        Ok(Some((dir.join(&spec.path), spec.merged)))
    }

    /// True when the dump carries weights, beside it or by reference.
    pub fn has_weights(&self) -> bool {
        self.dir.as_ref().is_some_and(|d| d.join("weights.safetensors").is_file())
            || self.manifest.raw.get("weights").is_some()
    }

    /// Writes this dump to `dir` (created if needed) as `manifest.json` and
    /// `activations.safetensors`, as one set ([`write_set`]: the directory locked, both
    /// files written aside and renamed into place), so that two runs writing the same
    /// directory at once never leave one run's manifest beside the other's activations.
    pub fn write(&self, dir: &Path) -> Result<()> {
        let mut tensors = BTreeMap::new();
        for (&step, sites) in &self.keys {
            for s in sites {
                if let Some(t) = self.get(step, s)? {
                    tensors.insert(site::key(step, s), t);
                }
            }
        }
        let activations =
            safetensors::serialize(&dir.join("activations.safetensors"), &tensors, None)?;
        let text = serde_json::to_string_pretty(&self.manifest.to_json())
            .map_err(|e| Error::format(dir, e.to_string()))?;
        let manifest = format!("{text}\n");
        write_set(
            dir,
            &[("activations.safetensors", &activations), ("manifest.json", manifest.as_bytes())],
        )
    }
}

/// Whether `tree` holds per-step files (`<step>.safetensors`) rather than `.npy` folders.
fn has_step_files(tree: &Path) -> Result<bool> {
    for e in std::fs::read_dir(tree).map_err(|e| Error::io(tree, e))? {
        let p = e.map_err(|e| Error::io(tree, e))?.path();
        if p.is_file() && p.extension().is_some_and(|x| x == "safetensors") {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Opens each `activations/<step>.safetensors`; every key in a step's file must belong
/// to that step.
fn per_step_files(tree: &Path) -> Result<(BTreeMap<String, SafetensorsFile>, Vec<String>)> {
    let mut files = BTreeMap::new();
    let mut names = Vec::new();
    for e in std::fs::read_dir(tree).map_err(|e| Error::io(tree, e))? {
        let p = e.map_err(|e| Error::io(tree, e))?.path();
        let Some(step) = p
            .file_name()
            .and_then(|s| s.to_str())
            .and_then(|s| s.strip_suffix(".safetensors"))
            .map(str::to_string)
        else {
            continue;
        };
        let f = SafetensorsFile::open(&p)?;
        for k in f.keys() {
            if k.split_once('/').map(|(s, _)| s) != Some(step.as_str()) {
                return Err(Error::format(
                    &p,
                    format!("tensor `{k}`: a per-step file holds only keys \"{step}/<site>\""),
                ));
            }
            names.push(k.to_string());
        }
        files.insert(step, f);
    }
    names.sort();
    Ok((files, names))
}

fn npy_tree_keys(tree: &Path) -> Result<Vec<String>> {
    let mut names = Vec::new();
    let rd = std::fs::read_dir(tree).map_err(|e| Error::io(tree, e))?;
    for step_dir in rd {
        let step_dir = step_dir.map_err(|e| Error::io(tree, e))?.path();
        if !step_dir.is_dir() {
            continue;
        }
        let step = step_dir.file_name().and_then(|s| s.to_str()).unwrap_or_default().to_string();
        for f in std::fs::read_dir(&step_dir).map_err(|e| Error::io(&step_dir, e))? {
            let f = f.map_err(|e| Error::io(&step_dir, e))?.path();
            if let Some(site) =
                f.file_name().and_then(|s| s.to_str()).and_then(|s| s.strip_suffix(".npy"))
            {
                names.push(format!("{step}/{site}"));
            }
        }
    }
    names.sort();
    Ok(names)
}

fn index_keys(
    manifest: &Manifest,
    names: &[String],
    src: &Path,
) -> Result<BTreeMap<Step, Vec<Site>>> {
    let listed: BTreeSet<Step> = manifest.steps.iter().copied().collect();
    let mut keys: BTreeMap<Step, Vec<Site>> = BTreeMap::new();
    for name in names {
        let shown = escape_controls(name);
        let (step_s, site_s) = name.split_once('/').ok_or_else(|| {
            Error::format(src, format!("tensor `{shown}`: key is not \"<step>/<site>\""))
        })?;
        let step = Step::parse(step_s).ok_or_else(|| {
            Error::format(
                src,
                format!("tensor `{shown}`: {step_s:?} is not \"prefill\" or \"decode.N\""),
            )
        })?;
        if !listed.contains(&step) {
            return Err(Error::format(
                src,
                format!("tensor `{shown}`: step {step} is not listed in manifest.json `steps`"),
            ));
        }
        keys.entry(step).or_default().push(Site::parse(site_s));
    }
    for step in &manifest.steps {
        if !keys.contains_key(step) {
            return Err(Error::format(
                src,
                format!("step {step} is listed in manifest.json `steps` but has no tensors"),
            ));
        }
    }
    for v in keys.values_mut() {
        v.sort_by(|a, b| a.compute_order(b));
    }
    Ok(keys)
}

/// Writes `bytes` to `path` atomically: a fresh temporary file in the same directory
/// (created exclusively, so a planted file or symlink is never written through), then
/// a rename onto `path`, so that a reader never sees a half-written file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|s| s.to_str()).unwrap_or("out");
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".tmp")
        .tempfile_in(dir)
        .map_err(|e| Error::io(dir, e))?;
    tmp.write_all(bytes).map_err(|e| Error::io(tmp.path(), e))?;
    tmp.as_file().sync_all().map_err(|e| Error::io(tmp.path(), e))?;
    tmp.persist(path).map_err(|e| Error::io(path, e.error))?;
    Ok(())
}

/// Prefix of the temporary directory [`write_set`] writes a set into.
const SET_TMP_PREFIX: &str = ".parity-set-";

/// Writes a set of files into `dir` (created if needed) so that the set is always
/// whole: writers take an exclusive lock on `dir`, write every file into a fresh
/// temporary directory inside it, and only then rename them into place. Two writers
/// never interleave their sets, and a writer killed while writing leaves the previous
/// set untouched (its temporary directory is removed by the next writer).
pub fn write_set(dir: &Path, files: &[(&str, &[u8])]) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let lock = std::fs::File::open(dir).map_err(|e| Error::io(dir, e))?;
    {
        use std::os::fd::AsRawFd;
        // SAFETY: flock on a file descriptor this function owns; released on close.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(Error::io(dir, std::io::Error::last_os_error()));
        }
    }
    // Holding the lock, no other writer is active: any temporary directory is stale.
    for e in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?.flatten() {
        let stale = e.file_name().to_str().is_some_and(|n| n.starts_with(SET_TMP_PREFIX));
        if stale && e.file_type().is_ok_and(|t| t.is_dir()) {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
    let tmp = tempfile::Builder::new()
        .prefix(SET_TMP_PREFIX)
        .tempdir_in(dir)
        .map_err(|e| Error::io(dir, e))?;
    for (name, bytes) in files {
        let p = tmp.path().join(name);
        let mut f = std::fs::File::create_new(&p).map_err(|e| Error::io(&p, e))?;
        f.write_all(bytes).map_err(|e| Error::io(&p, e))?;
        f.sync_all().map_err(|e| Error::io(&p, e))?;
    }
    for (name, _) in files {
        let to = dir.join(name);
        std::fs::rename(tmp.path().join(name), &to).map_err(|e| Error::io(&to, e))?;
    }
    let _ = lock.sync_all();
    drop(tmp);
    drop(lock);
    Ok(())
}
