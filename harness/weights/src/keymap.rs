//! A weight key map (`llama-parity/keymap@1`): how a port names and lays out each HF
//! parameter. A rule maps an HF name pattern to a port name pattern, `{i}` standing for
//! the layer index, and says whether the port stores the matrix transposed:
//!
//! ```json
//! {"format": "llama-parity/keymap@1",
//!  "rules": [{"hf": "model.layers.{i}.self_attn.q_proj.weight",
//!             "port": "model.layers.{i}.attention.wq.weight", "transpose": false}]}
//! ```
//!
//! The MindSpore port's map (`fixtures/ports/mindspore/keymap.json`) is built in.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use contract::error::{Error, Result};

/// The format string a key map file carries.
pub const FORMAT: &str = "llama-parity/keymap@1";

/// The MindSpore port's key map, as shipped with the port.
const MINDSPORE: &str = include_str!("../../../fixtures/ports/mindspore/keymap.json");

/// One rule: an HF name pattern, the port's name pattern, and the layout change.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Rule {
    pub hf: String,
    pub port: String,
    #[serde(default)]
    pub transpose: bool,
}

/// An ordered list of rules; the first rule that matches a name wins.
#[derive(Debug, Clone)]
pub struct KeyMap {
    /// Where the map came from (a file, or the built-in map's label).
    pub source: PathBuf,
    pub rules: Vec<Rule>,
}

#[derive(Deserialize)]
struct File {
    format: String,
    rules: Vec<Rule>,
}

impl KeyMap {
    /// The MindSpore port's map, built into the binary.
    pub fn mindspore() -> KeyMap {
        Self::parse(MINDSPORE, Path::new("<built-in fixtures/ports/mindspore/keymap.json>"))
            .expect("the built-in key map is valid (checked by a unit test)")
    }

    /// Reads a key map file.
    pub fn load(path: &Path) -> Result<KeyMap> {
        let text = dump::read::read_json_text(path)?;
        Self::parse(&text, path)
    }

    /// Parses key map JSON; `source` labels errors.
    pub fn parse(text: &str, source: &Path) -> Result<KeyMap> {
        let f: File = serde_json::from_str(text)
            .map_err(|e| Error::format(source, format!("not a key map: {e}")))?;
        if f.format != FORMAT {
            return Err(Error::format(
                source,
                format!("format is {:?}, expected {FORMAT:?}", f.format),
            ));
        }
        for (n, r) in f.rules.iter().enumerate() {
            let (h, p) = (r.hf.matches("{i}").count(), r.port.matches("{i}").count());
            if h > 1 || h != p {
                return Err(Error::format(
                    source,
                    format!(
                        "rule {n} ({:?} -> {:?}): each side needs the same single {{i}} or none",
                        r.hf, r.port
                    ),
                ));
            }
        }
        Ok(KeyMap { source: source.to_path_buf(), rules: f.rules })
    }

    /// The port name of HF parameter `hf` and the rule that maps it, or `None`.
    pub fn to_port(&self, hf: &str) -> Option<(String, &Rule)> {
        self.rules.iter().find_map(|r| apply(&r.hf, &r.port, hf).map(|p| (p, r)))
    }

    /// The HF (contract) name that a rule maps to the port name `port`, or `None`.
    pub fn to_hf(&self, port: &str) -> Option<String> {
        self.rules.iter().find_map(|r| apply(&r.port, &r.hf, port))
    }

    /// True if some rule, applied to some HF name, produces the port name `port`.
    pub fn is_port_name(&self, port: &str) -> bool {
        self.rules.iter().any(|r| apply(&r.port, &r.port, port).is_some())
    }
}

/// Matches `name` against `from` (with at most one `{i}` standing for a decimal layer
/// index) and writes the match into `to`.
fn apply(from: &str, to: &str, name: &str) -> Option<String> {
    match from.split_once("{i}") {
        None => (from == name).then(|| to.to_string()),
        Some((pre, post)) => {
            let i = name.strip_prefix(pre)?.strip_suffix(post)?;
            (!i.is_empty() && i.bytes().all(|b| b.is_ascii_digit())).then(|| to.replace("{i}", i))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_built_in_map_parses_and_maps_layers() {
        let m = KeyMap::mindspore();
        let (p, r) = m.to_port("model.layers.12.self_attn.q_proj.weight").unwrap();
        assert_eq!(p, "model.layers.12.attention.wq.weight");
        assert!(!r.transpose);
        assert_eq!(m.to_port("model.norm.weight").unwrap().0, "model.norm_out.weight");
        assert!(m.to_port("model.layers.x.self_attn.q_proj.weight").is_none());
        assert!(m.to_port("model.layers..self_attn.q_proj.weight").is_none());
        assert!(m.to_port("model.rotary_emb.inv_freq").is_none());
        assert!(m.is_port_name("model.layers.3.ffn_norm.weight"));
        assert!(!m.is_port_name("model.layers.0.attention_norm.beta"));
        assert_eq!(
            m.to_hf("model.layers.4.feed_forward.w3.weight").as_deref(),
            Some("model.layers.4.mlp.up_proj.weight")
        );
        assert_eq!(m.to_hf("model.layers.4.feed_forward.w9.weight"), None);
    }

    #[test]
    fn bad_maps_are_rejected_with_the_file_named() {
        let p = Path::new("m.json");
        let e = KeyMap::parse(r#"{"format":"x","rules":[]}"#, p).unwrap_err().to_string();
        assert!(e.starts_with("m.json: format is \"x\""), "{e}");
        let e = KeyMap::parse(
            r#"{"format":"llama-parity/keymap@1","rules":[{"hf":"a.{i}","port":"b"}]}"#,
            p,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("rule 0"), "{e}");
        assert!(KeyMap::parse("[", p).unwrap_err().to_string().contains("not a key map"));
    }
}
