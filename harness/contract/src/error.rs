//! The library's one error type.
//!
//! An `Error` means the run could not be carried out: a file that cannot be read, a
//! tensor that is malformed, a flag that makes no sense. A numerical divergence is
//! never an `Error`; it is data (`Verdict::Fail` in the report).

use std::path::PathBuf;

/// Result alias used across the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can stop a run. Every variant names the file, tensor or flag at fault.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An operating-system error while touching `path`.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file whose content is malformed (bad JSON, bad header, bad magic).
    #[error("{path}: {what}")]
    Format { path: PathBuf, what: String },
    /// `manifest.json` is missing a field or has a field of the wrong kind.
    #[error("{path}: {what}")]
    Manifest { path: PathBuf, what: String },
    /// A tensor that the run needs is absent.
    #[error("{file}: no tensor `{key}`")]
    MissingTensor { file: PathBuf, key: String },
    /// A tensor that has the wrong shape for what it is used as.
    #[error("{file}: tensor `{key}` has shape {got:?}, expected {expected:?}")]
    Shape { file: PathBuf, key: String, expected: Vec<usize>, got: Vec<usize> },
    /// A tensor whose dtype cannot be used where it is used.
    #[error("{file}: tensor `{key}` has dtype {got}, expected {expected}")]
    DType { file: PathBuf, key: String, expected: String, got: String },
    /// A flag or option value that cannot be used.
    #[error("{flag}: {what}")]
    Usage { flag: String, what: String },
    /// Scenario data (tokens, masks, golden activations fed back) that the model cannot
    /// run: `field` names the scenario field or activation.
    #[error("scenario.{field}: {what}")]
    Scenario { field: String, what: String },
    /// Something the chosen implementation, or the kind of candidate given, cannot do;
    /// the caller maps `feature` to the option that asked for it.
    #[error("{what}")]
    Unsupported { feature: Feature, what: String },
    /// A model configuration the implementation cannot run.
    #[error("{path}: model config: {what}")]
    Config { path: PathBuf, what: String },
    /// A golden the harness does not reproduce: its float64 reference, given the golden's
    /// own inputs to each layer, differs from it by more than the golden dtype's rounding
    /// explains, so a noise floor measured on it would absorb real differences.
    #[error("{golden}: not reproduced by the harness at {what}; a noise floor measured on it would absorb that difference, so none is believed (see `parity check-golden`; --no-floor compares with the fixed per-dtype defaults)")]
    NotReproduced { golden: String, what: String },
    /// A chart of the HTML report could not be drawn.
    #[error("chart `{chart}`: {what}")]
    Chart { chart: String, what: String },
    /// An external program (the MindSpore port, a browser) failed.
    #[error("{program}: {what}")]
    External { program: String, what: String },
}

/// What an [`Error::Unsupported`] was asked of an implementation or a candidate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Feature {
    /// Starting each layer from the golden's input.
    TeacherForcing,
    /// The implementation itself (not built, or not runnable on this golden).
    Implementation,
    /// A planted fault narrowed to a scope the implementation cannot plant it in.
    FaultScope,
    /// Renaming a candidate's sites through a key map (a contract-layout dump's).
    KeyMap,
    /// Reading a candidate through an msprobe site map (an msprobe dump's).
    SiteMap,
    /// Judging value sites on statistics first (a candidate with tensors).
    SummaryOnly,
    /// A noise floor raising each site's threshold (a candidate with tensors).
    NoiseFloor,
}

/// `text` with every control character (line breaks, ESC, ...) written as an escape
/// (`\n`, `\u{1b}`), so that a name taken from a file can never start a second line
/// or drive the terminal when it is printed.
pub fn escape_controls(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

impl Error {
    pub fn scenario(field: impl Into<String>, what: impl Into<String>) -> Self {
        Error::Scenario { field: field.into(), what: what.into() }
    }

    pub fn unsupported(feature: Feature, what: impl Into<String>) -> Self {
        Error::Unsupported { feature, what: what.into() }
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }

    pub fn format(path: impl Into<PathBuf>, what: impl Into<String>) -> Self {
        Error::Format { path: path.into(), what: what.into() }
    }
}
