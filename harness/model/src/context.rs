//! What a run takes from its caller besides what to run: where the subprocess ports are
//! found ([`Ports`]), whether a referenced checkpoint is hashed ([`Sha256Check`]), who
//! is told of the run's progress and warnings ([`EventSink`]), and whether the runs share
//! a referenced checkpoint's mapping ([`CheckpointCache`]). One [`RunContext`] holds
//! them; the floor and the diagnosis pass theirs to the runs they make.
//!
//! The library prints nothing and reads no environment variable. The `parity` binary
//! hands its environment to [`RunContext::from_vars`] (the variables it honours are
//! listed there and at [`Ports::from_vars`]) and shows the events on stderr; a library
//! user builds a context from values ([`RunContext::new`] and the `with_` methods).

use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use contract::site::Step;

use crate::ports::Ports;
use contract::error::Result;
use weights::checkpoint::HfCheckpoint;

/// What a run says while it runs, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunEvent<'a> {
    /// A run of the in-process model starts; `what` names it (`reference run`,
    /// `ascend run, teacher-forced`).
    Started { what: &'a str },
    /// `step` reached decoder layer `layer` (from 0) of `layers`.
    Layer { step: Step, layer: usize, layers: usize },
    /// The run last started is done.
    Finished,
    /// A line a subprocess port wrote (stderr, then stdout); `port` is the
    /// implementation's name (`mindspore`, `mindformers`).
    PortLine { port: &'a str, line: &'a str },
    /// Something the caller should know about the run's inputs, e.g. a referenced
    /// checkpoint that was not verified (also kept in `RunOutput::warnings`).
    Warning { text: &'a str },
}

/// Receives the events of every run made with the context, as they happen; runs made on
/// several threads call it from each.
pub type EventSink = Arc<dyn Fn(&RunEvent<'_>) + Send + Sync>;

/// Whether the checkpoint a golden references (CONTRACT §1.2) is hashed before use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Sha256Check {
    /// Check each listed file's sha256 (a mismatch is an error).
    #[default]
    Verify,
    /// Trust the files as they are, with a warning.
    Skip,
}

/// The checkpoint referenced last by a run's golden (CONTRACT §1.2), kept open so that
/// the next run on it (the noise floor's runs, made alongside the run or after it)
/// reads the pages this one mapped instead of mapping the files again. One
/// checkpoint at a time: a run on another replaces it. A checkpoint whose files changed
/// since (length, modification time or inode of any file in its directory) is opened
/// again. Clones share the one slot.
#[derive(Clone, Default)]
pub struct CheckpointCache(Arc<Mutex<Option<Kept>>>);

/// The checkpoint kept: its directory, its files' stamps when opened, the checkpoint.
type Kept = (PathBuf, Vec<FileStamp>, HfCheckpoint);

/// What identifies a file's content without reading it: path, length, modification
/// time, inode.
type FileStamp = (PathBuf, u64, Option<std::time::SystemTime>, u64);

impl CheckpointCache {
    /// The checkpoint at `dir`: the one kept when it is that directory, unchanged, else
    /// opened with `open` (and kept).
    pub fn open(
        &self,
        dir: &Path,
        open: impl FnOnce(&Path) -> Result<HfCheckpoint>,
    ) -> Result<HfCheckpoint> {
        let stamp = stamp(dir);
        let mut slot = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((kept, s, ckpt)) = slot.as_ref() {
            if kept == dir && stamp.as_ref() == Some(s) {
                return Ok(ckpt.clone());
            }
        }
        let ckpt = open(dir)?;
        *slot = stamp.map(|s| (dir.to_path_buf(), s, ckpt.clone()));
        Ok(ckpt)
    }

    /// Lets the kept checkpoint go (its mapping goes with the last run that holds it).
    pub fn clear(&self) {
        *self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = None;
    }
}

/// The stamps of the files in `dir` (or of `dir` itself when it is a file), in name
/// order; `None` when one cannot be read.
fn stamp(dir: &Path) -> Option<Vec<FileStamp>> {
    let one = |p: PathBuf| {
        let m = std::fs::metadata(&p).ok()?;
        #[cfg(unix)]
        let ino = std::os::unix::fs::MetadataExt::ino(&m);
        #[cfg(not(unix))]
        let ino = 0;
        Some((p, m.len(), m.modified().ok(), ino))
    };
    if dir.is_file() {
        return Some(vec![one(dir.to_path_buf())?]);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()
        .ok()?;
    files.sort();
    files.into_iter().filter(|p| p.is_file()).map(one).collect()
}

/// What runs take from their caller besides what to run (see the module header). The
/// default verifies checkpoints, finds the ports at their defaults, tells no one and
/// maps each run's checkpoint anew.
#[derive(Clone, Default)]
pub struct RunContext {
    pub ports: Ports,
    pub sha256: Sha256Check,
    /// Told of each run's progress and warnings; `None` tells no one (the warnings of
    /// `model::run` are still in its output).
    pub events: Option<EventSink>,
    /// Shared by the runs made with this context (and its clones); `None` opens each
    /// run's checkpoint anew.
    pub checkpoints: Option<CheckpointCache>,
}

impl RunContext {
    /// Checkpoints verified, the ports at their defaults, no one told, none shared.
    pub const fn new() -> RunContext {
        RunContext {
            ports: Ports::new(),
            sha256: Sha256Check::Verify,
            events: None,
            checkpoints: None,
        }
    }

    /// The context the environment variables `var` gives say: the ports of
    /// [`Ports::from_vars`], and the sha256 check skipped when `LLAMA_PARITY_SKIP_SHA256`
    /// is `1`. No one is told of events; the runs share a referenced checkpoint
    /// ([`CheckpointCache`]). The `parity` binary passes its environment
    /// (`|k| std::env::var_os(k)`), and so do the tests that run a port.
    pub fn from_vars(var: impl Fn(&str) -> Option<OsString>) -> RunContext {
        let skip = var("LLAMA_PARITY_SKIP_SHA256").is_some_and(|v| v == "1");
        RunContext {
            ports: Ports::from_vars(var),
            sha256: if skip { Sha256Check::Skip } else { Sha256Check::Verify },
            events: None,
            checkpoints: Some(CheckpointCache::default()),
        }
    }

    /// Runs made with this context (and its clones) share the checkpoint they reference.
    pub fn with_shared_checkpoints(mut self) -> RunContext {
        self.checkpoints = Some(CheckpointCache::default());
        self
    }

    pub fn with_ports(mut self, ports: Ports) -> RunContext {
        self.ports = ports;
        self
    }

    pub fn with_sha256(mut self, sha256: Sha256Check) -> RunContext {
        self.sha256 = sha256;
        self
    }

    /// Tells `sink` of every run's events.
    pub fn with_events(mut self, sink: EventSink) -> RunContext {
        self.events = Some(sink);
        self
    }

    /// Tells the sink, if any, of `event`.
    pub fn emit(&self, event: &RunEvent<'_>) {
        if let Some(sink) = &self.events {
            sink(event);
        }
    }
}

impl fmt::Debug for RunContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RunContext")
            .field("ports", &self.ports)
            .field("sha256", &self.sha256)
            .field("events", &self.events.as_ref().map(|_| "<sink>"))
            .field("checkpoints", &self.checkpoints.as_ref().map(|_| "<shared>"))
            .finish()
    }
}

/// The context of a caller that gives none: [`RunContext::new`].
pub static DEFAULT: RunContext = RunContext::new();
