//! An HF checkpoint directory (CONTRACT §1.2): `config.json` with `model.safetensors`,
//! or shards listed by `model.safetensors.index.json` (`{"weight_map": {name: file}}`),
//! as `save_pretrained` writes them. Also a lone `.safetensors` file (a dump's
//! `weights.safetensors`), read the same way.
//!
//! Every file is memory-mapped and its tensors are handed out as views in their stored
//! dtype (bf16, f16, f32...): nothing is converted here. A consumer converts what it
//! needs when it needs it (the model converts a block of a matrix's rows at a time), so
//! host memory holds the checkpoint's pages and not a float64 copy of them.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde_json::Value;
use sha2::{Digest, Sha256};

use contract::error::{Error, Result};
use dump::{ModelConfig, SafetensorsFile, Tensor};

/// The index file of a sharded checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// The single file of an unsharded checkpoint.
pub const SINGLE_FILE: &str = "model.safetensors";
/// The model config of a checkpoint.
pub const CONFIG_FILE: &str = "config.json";

/// HF parameters by name, across one or more memory-mapped safetensors files.
#[derive(Clone)]
pub struct HfCheckpoint {
    /// The directory, or the lone file.
    path: PathBuf,
    files: Vec<SafetensorsFile>,
    /// Parameter name → index into `files`.
    index: BTreeMap<String, usize>,
}

impl std::fmt::Debug for HfCheckpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HfCheckpoint({}, {} files)", self.path.display(), self.files.len())
    }
}

impl HfCheckpoint {
    /// Opens `path`: a checkpoint directory, or a single `.safetensors` file.
    ///
    /// Errors name the file at fault: a missing `model.safetensors` and index, an index
    /// that is not `{"weight_map": {...}}`, a shard that cannot be mapped, a parameter
    /// the index places in a shard that lacks it, or one name in two files.
    pub fn open(path: &Path) -> Result<HfCheckpoint> {
        // Anything that exists and is not a directory is read as one safetensors file,
        // which refuses what is not a regular file (a FIFO, a device) by name.
        if path.exists() && !path.is_dir() {
            return Ok(HfCheckpoint::from_file(SafetensorsFile::open(path)?));
        }
        if !path.is_dir() {
            return Err(Error::format(
                path,
                "not an HF checkpoint (neither a directory nor a .safetensors file)",
            ));
        }
        let index_path = path.join(INDEX_FILE);
        if index_path.is_file() {
            return HfCheckpoint::open_sharded(path, &index_path);
        }
        let single = path.join(SINGLE_FILE);
        if single.is_file() {
            let mut c = HfCheckpoint::from_file(SafetensorsFile::open(&single)?);
            c.path = path.to_path_buf();
            return Ok(c);
        }
        Err(Error::format(
            path,
            format!("not an HF checkpoint: neither {SINGLE_FILE} nor {INDEX_FILE} is there"),
        ))
    }

    fn open_sharded(dir: &Path, index_path: &Path) -> Result<HfCheckpoint> {
        let text = dump::read::read_json_text(index_path)?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| Error::format(index_path, format!("not valid JSON: {e}")))?;
        let map = v.get("weight_map").and_then(Value::as_object).ok_or_else(|| {
            Error::format(index_path, "no object `weight_map` (parameter name → shard file)")
        })?;
        let mut names: BTreeMap<String, usize> = BTreeMap::new();
        let mut file_ids: BTreeMap<String, usize> = BTreeMap::new();
        let mut files = Vec::new();
        for (key, file) in map {
            let file = file.as_str().ok_or_else(|| {
                Error::format(index_path, format!("weight_map[{key:?}] is not a file name"))
            })?;
            if file.contains('/') || file.contains('\\') || file == ".." {
                return Err(Error::format(
                    index_path,
                    format!("weight_map[{key:?}] = {file:?} is not a file in the checkpoint"),
                ));
            }
            let id = match file_ids.get(file) {
                Some(&id) => id,
                None => {
                    files.push(SafetensorsFile::open(&dir.join(file))?);
                    file_ids.insert(file.to_string(), files.len() - 1);
                    files.len() - 1
                }
            };
            if !files[id].contains(key) {
                return Err(Error::MissingTensor { file: dir.join(file), key: key.clone() });
            }
            names.insert(key.clone(), id);
        }
        Ok(HfCheckpoint { path: dir.to_path_buf(), files, index: names })
    }

    /// One safetensors file read as a checkpoint.
    pub fn from_file(file: SafetensorsFile) -> HfCheckpoint {
        let index = file.keys().map(|k| (k.to_string(), 0)).collect();
        HfCheckpoint { path: file.path().to_path_buf(), files: vec![file], index }
    }

    /// The directory (or the lone file) this checkpoint was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Parameter names, sorted.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }

    pub fn contains(&self, key: &str) -> bool {
        self.index.contains_key(key)
    }

    /// The file holding `key` (for messages), or the checkpoint's path if none does.
    pub fn file_of(&self, key: &str) -> &Path {
        self.index.get(key).map_or(&self.path, |&i| self.files[i].path())
    }

    /// The parameter `key` as a view into its mapped file, in its stored dtype.
    pub fn get(&self, key: &str) -> Option<Tensor> {
        self.index.get(key).and_then(|&i| self.files[i].get(key))
    }

    /// Like [`get`](Self::get), a missing parameter an error naming the checkpoint.
    pub fn require(&self, key: &str) -> Result<Tensor> {
        self.get(key)
            .ok_or_else(|| Error::MissingTensor { file: self.path.clone(), key: key.to_string() })
    }

    /// The safetensors files, in the order first listed.
    pub fn files(&self) -> impl Iterator<Item = &Path> {
        self.files.iter().map(SafetensorsFile::path)
    }

    /// The directory's `config.json` as a model config.
    pub fn config(&self) -> Result<ModelConfig> {
        let p = self.path.join(CONFIG_FILE);
        let text = dump::read::read_json_text(&p)?;
        let cfg: ModelConfig = serde_json::from_str(&text)
            .map_err(|e| Error::Config { path: p.clone(), what: e.to_string() })?;
        cfg.validate(&p)?;
        Ok(cfg)
    }

    /// Checks each listed file (`name` relative to the checkpoint directory) against its
    /// lowercase hex sha256. A mismatch or an unreadable file is an error naming it.
    pub fn verify_sha256(&self, expected: &BTreeMap<String, String>) -> Result<()> {
        use rayon::prelude::*;
        let dir = if self.path.is_dir() { self.path.clone() } else { PathBuf::new() };
        // The shards are hashed in parallel; the first mismatch in the manifest's order
        // is the one reported.
        let files: Vec<(&String, &String)> = expected.iter().collect();
        // Only files of the checkpoint are hashed: relative paths without `..` (a
        // manifest naming `/dev/zero` or `/etc/hostname` is refused, not read).
        for (name, _) in &files {
            let inside = !name.is_empty()
                && Path::new(name.as_str())
                    .components()
                    .all(|c| matches!(c, std::path::Component::Normal(_)));
            if !inside {
                return Err(Error::format(
                    dir.join(name.as_str()),
                    "a sha256 is listed for a path outside the checkpoint directory",
                ));
            }
        }
        let got: Vec<Result<String>> =
            files.par_iter().map(|(name, _)| sha256_once(&dir.join(name))).collect();
        for ((name, want), got) in files.into_iter().zip(got) {
            let got = got?;
            if !got.eq_ignore_ascii_case(want) {
                return Err(Error::format(
                    dir.join(name),
                    format!("sha256 is {got}, the manifest lists {want}: not the checkpoint the golden was made from"),
                ));
            }
        }
        Ok(())
    }
}

/// [`sha256_file`], computed once for a file whose size and modification time are
/// unchanged: once per process (the noise floor and every diagnosis hypothesis reopen
/// the golden's checkpoint), and across processes through [`HashCache`], so that a gate
/// run again on the same multi-GB checkpoint (or golden) does not hash it again.
pub fn sha256_once(path: &Path) -> Result<String> {
    type Key = (PathBuf, u64, Option<std::time::SystemTime>);
    static HASHED: std::sync::Mutex<BTreeMap<Key, String>> = std::sync::Mutex::new(BTreeMap::new());
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    let key = (path.to_path_buf(), meta.len(), meta.modified().ok());
    if let Some(h) = HASHED.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
        return Ok(h.clone());
    }
    let cache = HashCache::default_dir().map(|dir| HashCache { dir });
    let h = match cache.as_ref().and_then(|c| c.load(path, &meta)) {
        Some(h) => h,
        None => {
            let h = sha256_file(path)?;
            // Best effort: a cache that cannot be written only costs the next run a hash.
            if let Some(c) = &cache {
                c.store(path, &meta, &h);
            }
            h
        }
    };
    HASHED.lock().unwrap_or_else(|e| e.into_inner()).insert(key, h.clone());
    Ok(h)
}

/// Digests of checkpoint files remembered across processes, as git's index and make do:
/// an entry is keyed by the file's canonical path, size, modification and status-change
/// times (nanoseconds) and inode, so any write to the file, or its replacement, is a new
/// key and the file is hashed again. The status-change time cannot be set back by
/// `touch` or `cp -p`. One small file per entry under `$PARITY_HASH_CACHE`, else
/// `$XDG_CACHE_HOME/llama-parity/sha256` or `~/.cache/llama-parity/sha256`; never
/// beside the checkpoint. `PARITY_HASH_CACHE=off` hashes every time.
struct HashCache {
    dir: PathBuf,
}

impl HashCache {
    fn default_dir() -> Option<PathBuf> {
        let dir = contract::cache_dir("PARITY_HASH_CACHE", "sha256")?;
        (cfg!(unix) && dir.as_os_str() != "off").then_some(dir)
    }

    /// The entry's file name: a sha256 over what identifies this version of the file.
    fn entry(&self, path: &Path, meta: &std::fs::Metadata) -> Option<PathBuf> {
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            let canonical = std::fs::canonicalize(path).ok()?;
            let mut h = Sha256::new();
            h.update(canonical.as_os_str().as_encoded_bytes());
            for v in [meta.size() as i64, meta.mtime(), meta.mtime_nsec(), meta.ctime()] {
                h.update(v.to_le_bytes());
            }
            for v in [meta.ctime_nsec() as u64, meta.ino(), meta.dev()] {
                h.update(v.to_le_bytes());
            }
            let key: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
            Some(self.dir.join(key))
        }
        #[cfg(not(unix))]
        {
            let _ = (path, meta);
            None
        }
    }

    fn load(&self, path: &Path, meta: &std::fs::Metadata) -> Option<String> {
        // A regular file of one digest; anything else is no cache entry.
        let bytes = dump::read::read_capped(&self.entry(path, meta)?, 4096).ok()?;
        let text = String::from_utf8(bytes).ok()?;
        let h = text.trim();
        (h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit())).then(|| h.to_string())
    }

    fn store(&self, path: &Path, meta: &std::fs::Metadata, digest: &str) {
        let Some(entry) = self.entry(path, meta) else { return };
        let _ = std::fs::create_dir_all(&self.dir).and_then(|()| {
            let mut tmp = tempfile::NamedTempFile::new_in(&self.dir)?;
            std::io::Write::write_all(&mut tmp, digest.as_bytes())?;
            tmp.persist(&entry).map(|_| ()).map_err(|e| e.error)
        });
    }
}

/// The lowercase hex sha256 of the file at `path`, read in 8 MiB chunks.
pub fn sha256_file(path: &Path) -> Result<String> {
    // Regular files only: a FIFO would block, `/dev/zero` never ends.
    let mut f = dump::read::open_regular(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 8 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    #[test]
    fn a_remembered_digest_is_forgotten_when_the_file_is_written() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = HashCache { dir: dir.path().join("cache") };
        let f = dir.path().join("model.safetensors");
        std::fs::write(&f, b"abc").expect("write");
        let meta = std::fs::metadata(&f).expect("meta");
        assert_eq!(cache.load(&f, &meta), None);
        let digest = sha256_file(&f).expect("hash");
        cache.store(&f, &meta, &digest);
        assert_eq!(cache.load(&f, &std::fs::metadata(&f).expect("meta")), Some(digest));
        // Same size, contents rewritten: a new status-change time, a new key.
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&f, b"abd").expect("rewrite");
        assert_eq!(cache.load(&f, &std::fs::metadata(&f).expect("meta")), None);
    }

    /// Regression (defect 22 of the hardening issue): a cache entry that is a FIFO
    /// blocked the run, and one of any size was read whole. Either is no entry.
    #[cfg(unix)]
    #[test]
    fn a_cache_entry_that_is_not_a_small_regular_file_is_ignored() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = HashCache { dir: dir.path().join("cache") };
        std::fs::create_dir(&cache.dir).expect("mkdir");
        let f = dir.path().join("model.safetensors");
        std::fs::write(&f, b"abc").expect("write");
        let meta = std::fs::metadata(&f).expect("meta");
        let entry = cache.entry(&f, &meta).expect("entry");
        let made = std::process::Command::new("mkfifo").arg(&entry).status().expect("mkfifo");
        assert!(made.success());
        assert_eq!(cache.load(&f, &meta), None);
        std::fs::remove_file(&entry).expect("rm");
        let big = std::fs::File::create(&entry).expect("create");
        big.set_len(dump::read::JSON_CAP + 1).expect("set_len");
        assert_eq!(cache.load(&f, &meta), None);
    }

    #[test]
    fn sha256_of_a_known_string() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("abc");
        std::fs::write(&p, b"abc").expect("write");
        assert_eq!(
            sha256_file(&p).expect("hash"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn a_directory_without_weights_is_named_in_the_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let e = HfCheckpoint::open(dir.path()).expect_err("no weights");
        assert!(e.to_string().contains(INDEX_FILE), "{e}");
    }
}
