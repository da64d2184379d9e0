//! The map from msprobe entries to contract sites (`llama-parity/msprobe-map@1`).
//!
//! ```json
//! { "format": "llama-parity/msprobe-map@1", "name": "...",
//!   "module_prefixes": ["Module."], "anchor": "model",
//!   "sites": [
//!     { "site": "model.layers.{i}.input_layernorm", "module": "model.layers.{i}.input_layernorm", "take": "output.0" },
//!     { "site": "model.layers.{i}.self_attn.k_cache", "module": "model.layers.{i}.self_attn",
//!       "api": "Torch.matmul", "nth": 0, "take": "input.1", "layout": "BNDS", "heads": "kv" },
//!     { "site": "model.layers.{i}.self_attn.k_rope", "tail_of": "model.layers.{i}.self_attn.k_cache" } ] }
//! ```
//!
//! A rule takes one tensor of one msprobe entry: the forward of module `module` (its
//! entry `<prefix><module>.<Class>.forward.<n>`), or with `api` the `nth` call of that
//! API whose parent in `construct.json` is that module. `take` is `input.K`,
//! `kwargs.NAME` or `output.K`. `layout` says how a head-split tensor is laid out
//! (`BNSD` as the contract, `BSND`, or `BNDS` for transposed keys); `"heads": "kv"`
//! undoes a GQA repeat of the key/value heads. `tail_of` takes the last T token slots
//! of another site of the same step (the keys written by this step). `{i}` is the layer.
//!
//! Multi-rank dumps (`step<N>/rank0..rank<K>/`, tensor parallelism): `"ranks":
//! "concat(A)"` reassembles a tensor split over the ranks by concatenating the ranks'
//! tensors along axis `A` of the recorded tensor (column-parallel outputs, attention
//! heads split over ranks); `"ranks": "sum"` adds them (row-parallel partial sums
//! before their all-reduce). A rule without `ranks` reads rank 0 (a replicated tensor).
//!
//! A fused q/k/v projection (MindFormers' `attention.w_qkv`, an HF-style `qkv_proj`):
//! `"fused_qkv": "q"` (or `"k"`, `"v"`) takes that part of the recorded tensor's last
//! axis, sized by the golden's head counts and head_dim. `"fused_layout": "blocks"`
//! (default) is `[q heads | k heads | v heads]`; `"groups"` is one group per key/value
//! head, `[its nH/nKV q heads, k, v]` (Megatron's). With `ranks` concatenating along
//! the last axis, each rank's tensor is split with its share of the heads first.
//!
//! A fused gate/up projection (MindFormers' `feed_forward.w_gate_hidden` with
//! `ffn_concat`, Megatron's `linear_fc1` of a gated MLP): `"fused_gate_up": "gate"` (or
//! `"up"`) takes that half of the recorded tensor's last axis (`2·I` wide, `I` the
//! golden's `intermediate_size`). `"fused_layout": "blocks"` (default) is `[gate | up]`
//! (Megatron's, per rank); `"groups"` is one pair per unit of the MLP, `[g0, u0, g1, u1,
//! ...]` (MindFormers 2.0's `w_gate_hidden`, whose output it reshapes to `[.., I, 2]`).
//!
//! Over ranks, with `ranks` concatenating along the last axis or with no `ranks` and a
//! last axis 1/K of the fused width (K ranks), each rank's fused tensor is split with its
//! share first (its heads, its units) and the parts are then put back together: the
//! report's kind says `fused q/k/v (LAYOUT), ...` or `fused gate/up (LAYOUT), ...`.

use std::path::Path;

use serde::Deserialize;

use contract::error::{Error, Result};

/// The map format string.
pub const MAP_FORMAT: &str = "llama-parity/msprobe-map@1";

/// How a head-split tensor is laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum Layout {
    /// `[batch, heads, seq, head_dim]` (the contract's).
    #[serde(rename = "BNSD")]
    Bnsd,
    /// `[batch, seq, heads, head_dim]`.
    #[serde(rename = "BSND")]
    Bsnd,
    /// `[batch, heads, head_dim, seq]` (keys transposed for `q·kᵀ`).
    #[serde(rename = "BNDS")]
    Bnds,
}

/// Which heads a tensor carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Heads {
    /// Query heads (`num_attention_heads`).
    Q,
    /// Key/value heads (`num_key_value_heads`), possibly repeated to the query heads.
    Kv,
}

/// How a site split over tensor-parallel ranks is put back together.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum Ranks {
    /// `concat(A)`: the ranks' tensors concatenated along axis `A`, rank 0 first.
    Concat(usize),
    /// `sum`: the ranks' tensors added element by element.
    Sum,
}

impl TryFrom<String> for Ranks {
    type Error = String;

    fn try_from(s: String) -> std::result::Result<Ranks, String> {
        if s == "sum" {
            return Ok(Ranks::Sum);
        }
        s.strip_prefix("concat(")
            .and_then(|r| r.strip_suffix(')'))
            .and_then(|a| a.trim().parse().ok())
            .map(Ranks::Concat)
            .ok_or_else(|| format!("`ranks` is {s:?}, expected \"concat(AXIS)\" or \"sum\""))
    }
}

/// Which part of a fused q/k/v projection a rule takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QkvPart {
    Q,
    K,
    V,
}

/// Which half of a fused gate/up projection a rule takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GateUpPart {
    Gate,
    Up,
}

/// How a fused q/k/v projection orders its heads along its last axis (and a fused
/// gate/up projection its units: `blocks` `[gate | up]`, `groups` `[g0, u0, g1, u1, ..]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FusedLayout {
    /// `[q heads | k heads | v heads]`.
    #[default]
    Blocks,
    /// One group per key/value head: `[its nH/nKV q heads, its k head, its v head]`.
    Groups,
}

/// One rule of the map.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Contract site name; `{i}` for the layer.
    pub site: String,
    #[serde(default)]
    pub module: Option<String>,
    #[serde(default)]
    pub api: Option<String>,
    #[serde(default)]
    pub nth: usize,
    #[serde(default)]
    pub take: Option<String>,
    #[serde(default)]
    pub layout: Option<Layout>,
    #[serde(default)]
    pub heads: Option<Heads>,
    #[serde(default)]
    pub tail_of: Option<String>,
    #[serde(default)]
    pub ranks: Option<Ranks>,
    #[serde(default)]
    pub fused_qkv: Option<QkvPart>,
    #[serde(default)]
    pub fused_gate_up: Option<GateUpPart>,
    #[serde(default)]
    pub fused_layout: FusedLayout,
}

/// A site map.
#[derive(Debug, Clone, Deserialize)]
pub struct SiteMap {
    pub format: String,
    #[serde(default)]
    pub name: String,
    /// Prefixes of module-level entries (`Module.` for PyTorch, `Cell.` for MindSpore).
    pub module_prefixes: Vec<String>,
    /// The module whose forward calls count the model's forwards (one per step).
    pub anchor: String,
    pub sites: Vec<Rule>,
}

/// Where a rule takes its tensor from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Take {
    Input(usize),
    Kwarg(String),
    Output(usize),
}

impl Take {
    pub fn parse(s: &str) -> Option<Take> {
        let (kind, arg) = s.split_once('.')?;
        match kind {
            "input" => arg.parse().ok().map(Take::Input),
            "output" => arg.parse().ok().map(Take::Output),
            "kwargs" if !arg.is_empty() => Some(Take::Kwarg(arg.to_string())),
            _ => None,
        }
    }
}

impl SiteMap {
    /// The shipped map for HF transformers' Llama in PyTorch.
    pub fn hf() -> SiteMap {
        Self::parse(include_str!("maps/hf.json"), Path::new("<built-in map hf>"))
            .expect("the built-in HF map parses")
    }

    /// The shipped map for MindFormers' Llama (MindSpore Cell names).
    pub fn mindformers() -> SiteMap {
        Self::parse(include_str!("maps/mindformers.json"), Path::new("<built-in map mindformers>"))
            .expect("the built-in MindFormers map parses")
    }

    /// Reads a map file.
    pub fn load(path: &Path) -> Result<SiteMap> {
        let text = crate::read::read_json_text(path)?;
        Self::parse(&text, path)
    }

    /// Parses and checks map text; `path` names it in messages.
    pub fn parse(text: &str, path: &Path) -> Result<SiteMap> {
        let m: SiteMap = serde_json::from_str(text)
            .map_err(|e| Error::format(path, format!("not a msprobe site map: {e}")))?;
        if m.format != MAP_FORMAT {
            return Err(Error::format(
                path,
                format!("field `format` is {:?}, expected {MAP_FORMAT:?}", m.format),
            ));
        }
        for r in &m.sites {
            let bad = |what: &str| Error::format(path, format!("rule for `{}`: {what}", r.site));
            match (&r.module, &r.tail_of) {
                (Some(_), None) => {
                    if r.fused_qkv.is_some() && r.fused_gate_up.is_some() {
                        return Err(bad("takes one of `fused_qkv` and `fused_gate_up`, not both"));
                    }
                    let t = r.take.as_deref().ok_or_else(|| bad("needs `take`"))?;
                    Take::parse(t)
                        .ok_or_else(|| bad("`take` must be input.K, kwargs.NAME or output.K"))?;
                }
                (None, Some(_)) => {
                    if r.ranks.is_some() || r.fused_qkv.is_some() || r.fused_gate_up.is_some() {
                        return Err(bad(
                            "a `tail_of` rule takes none of `ranks`, `fused_qkv` and `fused_gate_up`",
                        ));
                    }
                }
                _ => return Err(bad("needs exactly one of `module` and `tail_of`")),
            }
        }
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_maps_parse() {
        assert!(SiteMap::hf().sites.len() >= 20);
        assert!(SiteMap::mindformers().sites.iter().any(|r| r.site == "model.layers.{i}.mlp"));
    }

    #[test]
    fn ranks_and_fused_parts_parse() {
        let t = r#"{"format": "llama-parity/msprobe-map@1", "module_prefixes": [], "anchor": "m",
                   "sites": [{"site": "q", "module": "qkv", "take": "output.0", "ranks": "concat(2)",
                              "fused_qkv": "q", "fused_layout": "groups"},
                             {"site": "o", "module": "o", "take": "output.0", "ranks": "sum"}]}"#;
        let m = SiteMap::parse(t, Path::new("m.json")).unwrap();
        assert_eq!(m.sites[0].ranks, Some(Ranks::Concat(2)));
        assert_eq!(m.sites[0].fused_qkv, Some(QkvPart::Q));
        assert_eq!(m.sites[0].fused_layout, FusedLayout::Groups);
        assert_eq!(m.sites[1].ranks, Some(Ranks::Sum));
        assert_eq!(m.sites[1].fused_layout, FusedLayout::Blocks);
        let both = t.replace(r#""fused_qkv": "q""#, r#""fused_qkv": "q", "fused_gate_up": "up""#);
        let e = SiteMap::parse(&both, Path::new("m.json")).unwrap_err().to_string();
        assert!(e.contains("m.json") && e.contains("rule for `q`: takes one of"), "{e}");
        let gu = t.replace(r#""fused_qkv": "q""#, r#""fused_gate_up": "up""#);
        let m = SiteMap::parse(&gu, Path::new("m.json")).unwrap();
        assert_eq!(m.sites[0].fused_gate_up, Some(GateUpPart::Up));
        let bad = t.replace("concat(2)", "concat(x)");
        let e = SiteMap::parse(&bad, Path::new("m.json")).unwrap_err().to_string();
        assert!(e.contains("m.json") && e.contains("concat(AXIS)"), "{e}");
    }

    #[test]
    fn a_rule_without_source_is_refused() {
        let t = r#"{"format": "llama-parity/msprobe-map@1", "module_prefixes": [], "anchor": "m",
                   "sites": [{"site": "lm_head"}]}"#;
        let e = SiteMap::parse(t, Path::new("m.json")).unwrap_err().to_string();
        assert!(e.contains("m.json") && e.contains("lm_head"), "{e}");
    }
}
