//! A run never writes into its inputs: every output directory, and every file a
//! command writes there, is checked against every input path before anything is read
//! or written.
//!
//! Paths are compared in resolved form ([`resolve`]): absolute, `.` and `..` taken
//! out, and every existing prefix resolved through its symlinks, so that
//! `nonexistent/../GOLDEN`, `GOLDEN/x/../` or a symlink to `GOLDEN` are seen for what
//! they are. A name that does not exist yet is taken as the name it will be created as.

use std::path::{Component, Path, PathBuf};

use contract::error::{Error, Result};

/// One place a command writes: a directory (created if needed) and the names of the
/// files it writes directly inside it.
#[derive(Debug, Clone, Copy)]
pub struct Output<'a> {
    /// How the output is named in a message (a flag, say `--report`).
    pub label: &'a str,
    pub dir: &'a Path,
    pub files: &'a [&'a str],
}

/// The files of a report set (`--report DIR` of `compare` and `run`).
pub const REPORT_FILES: &[&str] = &["report.json", "report.html", "junit.xml", "summary.md"];
/// The files of a dump written by `run --dump DIR`.
pub const DUMP_FILES: &[&str] = &["manifest.json", "activations.safetensors"];
/// The file of `check-weights --report DIR`.
pub const WEIGHTS_REPORT_FILES: &[&str] = &["weights.json"];

/// Refuses any output that would write into or over an input: an output directory
/// that is, or lies inside, an input directory (or is an input file), and an output
/// file that is an input or lies inside one. The error names the output and the input.
pub fn check_outputs(inputs: &[&Path], outputs: &[Output<'_>]) -> Result<()> {
    let resolved: Vec<(&Path, Vec<PathBuf>)> =
        inputs.iter().map(|&p| (p, vec![resolve(p), resolve_entry(p)])).collect();
    for out in outputs {
        let dir = resolve(out.dir);
        for (input, forms) in &resolved {
            if forms.iter().any(|f| dir.starts_with(f)) {
                return Err(Error::Usage {
                    flag: out.label.to_string(),
                    what: format!(
                        "{} lies inside the input {}; choose a directory outside it",
                        out.dir.display(),
                        input.display()
                    ),
                });
            }
            for name in out.files {
                let file = dir.join(name);
                if forms.iter().any(|f| file.starts_with(f)) {
                    return Err(Error::Usage {
                        flag: out.label.to_string(),
                        what: format!(
                            "writing {} would overwrite the input {}; choose a directory outside it",
                            out.dir.join(name).display(),
                            input.display()
                        ),
                    });
                }
            }
        }
    }
    Ok(())
}

/// The absolute form of `p` with `.` and `..` taken out and every existing prefix
/// resolved through symlinks (the deepest existing ancestor canonicalised); the names
/// past it, which do not exist yet, are kept as given.
pub fn resolve(p: &Path) -> PathBuf {
    let abs = std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    let mut out = PathBuf::new();
    // Symlinks followed so far, to stop on a loop as the OS does.
    let mut hops = 0;
    let mut pending: Vec<std::ffi::OsString> = Vec::new();
    for c in abs.components().rev() {
        pending.push(c.as_os_str().to_os_string());
    }
    while let Some(c) = pending.pop() {
        match Path::new(&c).components().next() {
            None | Some(Component::CurDir) => {}
            Some(Component::ParentDir) => {
                out.pop();
            }
            Some(Component::RootDir | Component::Prefix(_)) => out.push(&c),
            Some(Component::Normal(name)) => {
                out.push(name);
                if hops < 40 {
                    if let Ok(target) = std::fs::read_link(&out) {
                        hops += 1;
                        out.pop();
                        let target = if target.is_absolute() { target } else { out.join(target) };
                        out = PathBuf::new();
                        for t in target.components().rev() {
                            pending.push(t.as_os_str().to_os_string());
                        }
                    }
                }
            }
        }
    }
    out
}

/// The directory entry `p` names: its parent resolved, its last name kept as is (a
/// rename onto `p` replaces that entry, even when it is a symlink).
fn resolve_entry(p: &Path) -> PathBuf {
    let abs = std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    match (abs.parent(), abs.file_name()) {
        (Some(parent), Some(name))
            if !matches!(
                abs.components().next_back(),
                Some(Component::ParentDir | Component::CurDir)
            ) =>
        {
            resolve(parent).join(name)
        }
        _ => resolve(p),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parent_components_are_taken_out_before_comparing() {
        let d = tempfile::tempdir().unwrap();
        let golden = d.path().join("g");
        std::fs::create_dir(&golden).unwrap();
        assert_eq!(resolve(&d.path().join("nonexistent/../g")), resolve(&golden));
        assert_eq!(resolve(&golden.join("x/../")), resolve(&golden));
        let out = Output { label: "--dump", dir: &d.path().join("none/../g"), files: DUMP_FILES };
        let e = check_outputs(&[&golden], &[out]).unwrap_err().to_string();
        assert!(e.starts_with("--dump: ") && e.contains("inside the input"), "{e}");
    }

    #[test]
    fn a_symlink_to_an_input_is_seen_through() {
        let d = tempfile::tempdir().unwrap();
        let golden = d.path().join("g");
        std::fs::create_dir(&golden).unwrap();
        std::os::unix::fs::symlink(&golden, d.path().join("link")).unwrap();
        let out = Output { label: "--report", dir: &d.path().join("link/sub"), files: &[] };
        assert!(check_outputs(&[&golden], &[out]).is_err());
    }

    #[test]
    fn an_input_file_named_like_an_output_file_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let policy = d.path().join("summary.md");
        std::fs::write(&policy, "{}").unwrap();
        let out = Output { label: "--report", dir: d.path(), files: REPORT_FILES };
        let e = check_outputs(&[&policy], &[out]).unwrap_err().to_string();
        assert!(e.contains("would overwrite the input"), "{e}");
        let other = d.path().join("policy.json");
        assert!(check_outputs(&[&other], &[out]).is_ok());
    }
}
