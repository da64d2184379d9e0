//! Stage 0, the contract: what every other stage speaks (CONTRACT.md).
//!
//! - [`site`]: steps and sites, and the order in which the model computes them;
//! - [`fault`]: the known porting faults and their stable IDs;
//! - [`error`]: the library's one error type, naming the file, tensor or field at fault;
//! - [`cache_dir`]: where the caches (noise floors, checkpoint digests) live.
//!
//! Uses nothing else in the crate.

pub mod error;
pub mod fault;
pub mod site;

use std::path::PathBuf;

/// The directory of the cache `name`: `$<env>` when set and not empty, else
/// `$XDG_CACHE_HOME/llama-parity/<name>` or `~/.cache/llama-parity/<name>`.
///
/// The one place a library stage reads the environment (the model takes its settings
/// as a `RunContext` the binary builds from its own): the digest cache of checkpoint files
/// (`weights`, `PARITY_HASH_CACHE`) and the noise-floor cache (`compare`,
/// `PARITY_FLOOR_CACHE`) are found here where they are used, deep inside hashing a file,
/// rather than threaded through every caller as a parameter.
pub fn cache_dir(env: &str, name: &str) -> Option<PathBuf> {
    let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    var(env)
        .or_else(|| var("XDG_CACHE_HOME").map(|d| d.join("llama-parity").join(name)))
        .or_else(|| var("HOME").map(|d| d.join(".cache").join("llama-parity").join(name)))
}
