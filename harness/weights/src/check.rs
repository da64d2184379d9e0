//! Checks a port's checkpoint against the HF weights it was converted from, through a
//! key map: every HF tensor mapped, nothing extra in the port, shapes (after the rule's
//! transpose), dtypes, and values equal to the HF values cast to the port's dtype.
//!
//! The conversion is a copy and a cast, so values must match exactly after the cast.
//! Two common conversion faults are named when the values show them: a norm weight left
//! at ones (`norm.weight_unmapped`) and a square matrix stored transposed
//! (`weights.transposed`).

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use contract::error::{Error, Result};
use dump::{write_atomic, DType, Tensor};

use super::checkpoint::HfCheckpoint;
use crate::ckpt::Checkpoint;
use crate::keymap::KeyMap;

/// What is wrong with one tensor (or one name).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FindingKind {
    /// An HF tensor no rule maps.
    Unmapped,
    /// An HF tensor whose mapped port name the checkpoint lacks.
    MissingInPort,
    /// A port tensor that no HF tensor maps to.
    Unexpected,
    /// Port shape differs from the HF shape (transposed if the rule says so).
    Shape,
    /// Port dtype differs from the one asked for.
    DType,
    /// Values differ from the HF values cast to the port's dtype.
    Values,
    /// A norm weight at all ones where the HF weight is not.
    NormAtOnes,
    /// A square matrix that equals the HF one transposed.
    Transposed,
    /// Holds the values of another tensor of the same layer (a swapped mapping).
    Swapped,
    /// A LoRA module's scaling differs between the two sides' declarations.
    Scaling,
}

impl FindingKind {
    /// The stable name used in the table and the JSON report.
    pub fn name(self) -> &'static str {
        match self {
            FindingKind::Unmapped => "unmapped",
            FindingKind::MissingInPort => "missing",
            FindingKind::Unexpected => "unexpected",
            FindingKind::Shape => "shape",
            FindingKind::DType => "dtype",
            FindingKind::Values => "values",
            FindingKind::NormAtOnes => "norm-at-ones",
            FindingKind::Transposed => "transposed",
            FindingKind::Swapped => "swapped",
            FindingKind::Scaling => "scaling",
        }
    }
}

/// One finding: its kind, the names involved, one line of evidence, and the known
/// porting fault (CONTRACT §3) it is, where there is one.
#[derive(Debug, Clone)]
pub struct Finding {
    pub kind: FindingKind,
    pub hf: Option<String>,
    pub port: Option<String>,
    pub detail: String,
    pub fault: Option<&'static str>,
}

/// One mapped pair of tensors.
#[derive(Debug, Clone)]
pub struct TensorRow {
    pub hf: String,
    pub port: String,
    pub hf_shape: Vec<usize>,
    pub port_shape: Vec<usize>,
    pub hf_dtype: DType,
    pub port_dtype: DType,
    /// Elements that differ after the cast, and the largest difference (`None` when the
    /// shapes did not allow a comparison).
    pub n_diff: Option<usize>,
    pub max_abs_diff: Option<f64>,
    /// `ok`, or the kind of the first finding about this pair.
    pub status: &'static str,
}

impl TensorRow {
    /// The pair `hf` ↔ `port` before any comparison: shapes and dtypes of both, status
    /// `ok`.
    pub(crate) fn pair(hf: &str, port: &str, h: &Tensor, p: &Tensor) -> TensorRow {
        TensorRow {
            hf: hf.to_string(),
            port: port.to_string(),
            hf_shape: h.shape().to_vec(),
            port_shape: p.shape().to_vec(),
            hf_dtype: h.dtype(),
            port_dtype: p.dtype(),
            n_diff: None,
            max_abs_diff: None,
            status: "ok",
        }
    }
}

/// Writes a table of six columns, `head` then `rows`, each column as wide as its widest
/// cell, columns from `first_right` on aligned right.
pub(crate) fn write_table(
    s: &mut String,
    head: [&str; 6],
    rows: &[[String; 6]],
    first_right: usize,
) {
    let mut w = head.map(str::len);
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.len());
        }
    }
    let cells = std::iter::once(head.map(String::from)).chain(rows.iter().cloned());
    for r in cells {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(i, c)| {
                if i < first_right {
                    format!("{c:<w$}", w = w[i])
                } else {
                    format!("{c:>w$}", w = w[i])
                }
            })
            .collect();
        let _ = writeln!(s, "{}", line.join("  "));
    }
}

/// A finding of `kind` about the HF tensor `hf` and the port's `port`.
pub(crate) fn finding(
    kind: FindingKind,
    hf: Option<&str>,
    port: Option<&str>,
    detail: String,
    fault: Option<&'static str>,
) -> Finding {
    Finding { kind, hf: hf.map(str::to_string), port: port.map(str::to_string), detail, fault }
}

/// A finding when the port stores `p` in another dtype than the one asked for.
pub(crate) fn dtype_finding(
    want: Option<DType>,
    p: &Tensor,
    hf_key: &str,
    port_key: &str,
) -> Option<Finding> {
    want.filter(|&d| d != p.dtype()).map(|d| {
        finding(
            FindingKind::DType,
            Some(hf_key),
            Some(port_key),
            format!("port dtype {}, expected {d}", p.dtype()),
            None,
        )
    })
}

/// The outcome of a weight check.
#[derive(Debug, Clone)]
pub struct WeightCheck {
    pub hf: PathBuf,
    pub port: PathBuf,
    pub keymap: PathBuf,
    pub dtype: Option<DType>,
    pub tensors: Vec<TensorRow>,
    pub findings: Vec<Finding>,
}

/// Checks `port` against `hf` through `map`; `dtype`, when given, is the dtype every
/// port tensor must have.
pub fn check_weights(
    hf: &HfCheckpoint,
    port: &Checkpoint,
    map: &KeyMap,
    dtype: Option<DType>,
) -> Result<WeightCheck> {
    let mut tensors = Vec::new();
    let mut findings = Vec::new();
    let mut produced = BTreeSet::new();
    for hf_key in hf.keys() {
        let h = hf.require(hf_key)?;
        let Some((port_key, rule)) = map.to_port(hf_key) else {
            findings.push(finding(
                FindingKind::Unmapped,
                Some(hf_key),
                None,
                "no rule of the key map matches it".into(),
                None,
            ));
            continue;
        };
        produced.insert(port_key.clone());
        let Some(p) = port.get(&port_key) else {
            findings.push(finding(
                FindingKind::MissingInPort,
                Some(hf_key),
                Some(&port_key),
                format!("the rule maps it to `{port_key}`, which the checkpoint lacks"),
                None,
            ));
            continue;
        };
        let mut row = TensorRow::pair(hf_key, &port_key, &h, p);
        let mut here: Vec<Finding> =
            dtype_finding(dtype, p, hf_key, &port_key).into_iter().collect();
        let transpose = rule.transpose && h.shape().len() == 2;
        let expected: Vec<usize> =
            if transpose { h.shape().iter().rev().copied().collect() } else { h.shape().to_vec() };
        if p.shape() != expected.as_slice() {
            let flipped = h.shape().len() == 2 && p.shape().iter().rev().eq(expected.iter());
            let hint = if flipped { " (stored transposed)" } else { "" };
            here.push(finding(
                FindingKind::Shape,
                Some(hf_key),
                Some(&port_key),
                format!("port shape {:?}, expected {:?}{hint}", p.shape(), expected),
                flipped.then_some("weights.transposed"),
            ));
        } else {
            let (n, max) = diff(p, &h, transpose);
            row.n_diff = Some(n);
            row.max_abs_diff = Some(max);
            if n > 0 {
                here.push(explain_values(hf, hf_key, &h, &port_key, p, transpose, n, max)?);
            }
        }
        if let Some(f) = here.first() {
            row.status = f.kind.name();
        }
        findings.extend(here);
        tensors.push(row);
    }
    for (key, _) in port.iter() {
        if !produced.contains(key) {
            let why = if map.is_port_name(key) {
                "a rule names it, but no HF tensor maps to it".to_string()
            } else {
                "no rule of the key map produces this name".to_string()
            };
            let beta = key.contains("norm") && (key.ends_with(".beta") || key.ends_with(".bias"));
            let detail = if beta {
                format!("{why}; a norm bias (LayerNorm beta) where RMSNorm has none")
            } else {
                why
            };
            findings.push(finding(
                FindingKind::Unexpected,
                None,
                Some(key),
                detail,
                beta.then_some("norm.bias"),
            ));
        }
    }
    Ok(WeightCheck {
        hf: hf.path().to_path_buf(),
        port: port.path().to_path_buf(),
        keymap: map.source.clone(),
        dtype,
        tensors,
        findings,
    })
}

/// Names what a value difference looks like: a norm left at ones, a transposed square
/// matrix, another HF tensor's values, or plain differences.
#[allow(clippy::too_many_arguments)]
fn explain_values(
    hf: &HfCheckpoint,
    hf_key: &str,
    h: &Tensor,
    port_key: &str,
    p: &Tensor,
    transpose: bool,
    n: usize,
    max: f64,
) -> Result<Finding> {
    let mk = |kind, detail, fault| Finding {
        kind,
        hf: Some(hf_key.to_string()),
        port: Some(port_key.to_string()),
        detail,
        fault,
    };
    let counts = format!("{n} of {} elements differ, max |diff| {max:.3e}", p.numel());
    if h.shape().len() == 1
        && hf_key.contains("norm")
        && p.iter_f64().all(|v| v == 1.0)
        && h.iter_f64().any(|v| v != 1.0)
    {
        return Ok(mk(
            FindingKind::NormAtOnes,
            format!("norm weight left at ones (never loaded); {counts}"),
            Some("norm.weight_unmapped"),
        ));
    }
    if h.shape().len() == 2 && h.shape()[0] == h.shape()[1] && diff(p, h, !transpose).0 == 0 {
        return Ok(mk(
            FindingKind::Transposed,
            format!("equals the HF matrix transposed; {counts}"),
            Some("weights.transposed"),
        ));
    }
    // Another HF tensor of the same layer and shape: a swapped mapping (e.g. gate/up).
    let layer = layer_prefix(hf_key);
    for other in hf.keys().filter(|k| *k != hf_key && layer_prefix(k) == layer) {
        let o = hf.require(other)?;
        if o.shape() == h.shape() && diff(p, &o, transpose).0 == 0 {
            let fault = (hf_key.contains("gate_proj") || hf_key.contains("up_proj"))
                .then_some("weights.gate_up_swapped");
            return Ok(mk(
                FindingKind::Values,
                format!("holds the values of HF `{other}` (swapped mapping); {counts}"),
                fault,
            ));
        }
    }
    Ok(mk(FindingKind::Values, counts, None))
}

/// `model.layers.3.` for a layer's tensor, `""` for the others.
fn layer_prefix(key: &str) -> &str {
    key.strip_prefix("model.layers.")
        .and_then(|rest| rest.find('.'))
        .map_or("", |dot| &key[..13 + dot + 1])
}

/// (elements that differ, largest |difference|) between `port` and `hf` cast to the
/// port's dtype; with `transpose`, `port[j, i]` is compared with `hf[i, j]`.
/// Shapes agree (up to the transpose); NaN equals NaN.
pub(crate) fn diff(port: &Tensor, hf: &Tensor, transpose: bool) -> (usize, f64) {
    let dt = port.dtype();
    let (rows, cols) = match hf.shape() {
        [r, c] => (*r, *c),
        _ => (1, hf.numel()),
    };
    let mut n = 0;
    let mut max = 0f64;
    for (k, pv) in port.iter_f64().enumerate() {
        let hk = if transpose { (k % rows) * cols + k / rows } else { k };
        let hv = cast(hf.get_f64(hk), dt);
        if pv == hv || (pv.is_nan() && hv.is_nan()) {
            continue;
        }
        n += 1;
        let d = (pv - hv).abs();
        max = if d.is_nan() { f64::NAN } else { max.max(d) };
    }
    (n, max)
}

/// `v` rounded to `dtype` (round to nearest even) and widened back.
fn cast(v: f64, dtype: DType) -> f64 {
    match dtype {
        DType::F32 => v as f32 as f64,
        DType::F16 => half::f16::from_f64(v).to_f64(),
        DType::BF16 => half::bf16::from_f64(v).to_f64(),
        _ => v,
    }
}

impl WeightCheck {
    /// True when there is nothing to report.
    pub fn passed(&self) -> bool {
        self.findings.is_empty()
    }

    /// The table and the findings, for a terminal.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let shape = |v: &[usize]| format!("{v:?}");
        let rows: Vec<[String; 6]> = self
            .tensors
            .iter()
            .map(|r| {
                [
                    r.status.to_string(),
                    r.port.clone(),
                    shape(&r.port_shape),
                    if r.hf_dtype == r.port_dtype {
                        r.port_dtype.to_string()
                    } else {
                        format!("{}<-{}", r.port_dtype, r.hf_dtype)
                    },
                    r.max_abs_diff.map_or("-".into(), |m| format!("{m:.3e}")),
                    r.n_diff.map_or("-".into(), |n| n.to_string()),
                ]
            })
            .collect();
        let head = ["status", "port tensor", "shape", "dtype", "max|diff|", "differ"];
        write_table(&mut s, head, &rows, 4);
        let _ = writeln!(s);
        for f in &self.findings {
            let names = match (&f.port, &f.hf) {
                (Some(p), Some(h)) => format!("`{p}` (HF `{h}`)"),
                (Some(p), None) => format!("`{p}`"),
                (None, Some(h)) => format!("HF `{h}`"),
                (None, None) => String::new(),
            };
            let fault = f.fault.map_or(String::new(), |id| format!(" [{id}]"));
            let _ = writeln!(s, "FINDING {}: {names}: {}{fault}", f.kind.name(), f.detail);
        }
        let verdict = if self.passed() { "PASS" } else { "FAIL" };
        let _ = writeln!(
            s,
            "{verdict}: {} mapped tensors, {} findings ({} vs {}, key map {})",
            self.tensors.len(),
            self.findings.len(),
            self.port.display(),
            self.hf.display(),
            self.keymap.display()
        );
        s
    }

    /// The JSON form written as `weights.json`.
    pub fn to_json(&self) -> Value {
        let num = |v: Option<f64>| {
            v.map_or(Value::Null, |x| if x.is_finite() { json!(x) } else { json!(x.to_string()) })
        };
        json!({
            "format": "llama-parity/weights@1",
            "verdict": if self.passed() { "pass" } else { "fail" },
            "hf": self.hf.display().to_string(),
            "port": self.port.display().to_string(),
            "keymap": self.keymap.display().to_string(),
            "dtype": self.dtype.map(|d| d.to_string()),
            "findings": self.findings.iter().map(|f| json!({
                "kind": f.kind.name(), "hf": f.hf, "port": f.port, "detail": f.detail, "fault": f.fault,
            })).collect::<Vec<_>>(),
            "tensors": self.tensors.iter().map(|r| json!({
                "hf": r.hf, "port": r.port, "status": r.status,
                "hf_shape": r.hf_shape, "port_shape": r.port_shape,
                "hf_dtype": r.hf_dtype.to_string(), "port_dtype": r.port_dtype.to_string(),
                "n_diff": r.n_diff, "max_abs_diff": num(r.max_abs_diff),
            })).collect::<Vec<_>>(),
        })
    }

    /// Writes `dir/weights.json` atomically (creating `dir`).
    pub fn write(&self, dir: &Path) -> Result<()> {
        write_report(dir, &self.to_json())
    }
}

/// Writes `json` as `dir/weights.json` atomically (creating `dir`).
pub(crate) fn write_report(dir: &Path, json: &Value) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let path = dir.join("weights.json");
    let text =
        serde_json::to_string_pretty(json).map_err(|e| Error::format(&path, e.to_string()))?;
    write_atomic(&path, format!("{text}\n").as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/ports/mindspore/ckpt").join(name)
    }

    fn check(ckpt: &str) -> WeightCheck {
        let hf = HfCheckpoint::open(&fixture("hf_small.safetensors")).unwrap();
        let port = Checkpoint::open(&fixture(ckpt)).unwrap();
        check_weights(&hf, &port, &KeyMap::mindspore(), Some(DType::F32)).unwrap()
    }

    #[test]
    fn good_ckpt_equals_hf_small_tensor_by_tensor() {
        let hf = HfCheckpoint::open(&fixture("hf_small.safetensors")).unwrap();
        let port = Checkpoint::open(&fixture("good.ckpt")).unwrap();
        let map = KeyMap::mindspore();
        let mut n = 0;
        for key in hf.keys() {
            let (pk, _) = map.to_port(key).unwrap();
            let (h, p) = (hf.require(key).unwrap(), port.get(&pk).unwrap());
            assert_eq!(h.shape(), p.shape(), "{key}");
            assert_eq!(p.dtype(), DType::F32, "{pk}");
            assert_eq!(h.to_f64_vec(), p.to_f64_vec(), "{key} vs {pk}");
            n += 1;
        }
        assert_eq!(n, port.len(), "every port tensor is an HF tensor");
        let c = check("good.ckpt");
        assert!(c.passed(), "{}", c.render());
    }

    #[test]
    fn each_defective_ckpt_gives_its_finding() {
        let cases = [
            (
                "key_dropped.ckpt",
                FindingKind::MissingInPort,
                "model.layers.1.feed_forward.w2.weight",
            ),
            ("key_misnamed.ckpt", FindingKind::Unexpected, "model.layers.0.attention.w_q.weight"),
            ("norm_ones.ckpt", FindingKind::NormAtOnes, "model.layers.0.ffn_norm.weight"),
            ("transposed.ckpt", FindingKind::Transposed, "model.layers.0.attention.wo.weight"),
            ("layernorm_beta.ckpt", FindingKind::Unexpected, "model.layers.0.attention_norm.beta"),
        ];
        for (file, kind, key) in cases {
            let c = check(file);
            assert!(
                c.findings.iter().any(|f| f.kind == kind && f.port.as_deref() == Some(key)),
                "{file}: no {} finding on {key}:\n{}",
                kind.name(),
                c.render()
            );
        }
    }

    #[test]
    fn a_cast_to_the_port_dtype_is_exact_and_a_dtype_request_is_checked() {
        let h = Tensor::from_f64(&[3], &[0.1, 1.0 / 3.0, 2.0], DType::F32);
        let p = Tensor::from_f64(&[3], &h.to_f64_vec(), DType::BF16);
        assert_eq!(diff(&p, &h, false), (0, 0.0));
        let p2 = Tensor::from_f64(&[3], &[0.1, 0.25, 2.0], DType::BF16);
        let (n, max) = diff(&p2, &h, false);
        assert_eq!(n, 1);
        assert!((max - (cast(1.0 / 3.0, DType::BF16) - 0.25)).abs() < 1e-12);
    }

    #[test]
    fn transposed_comparison_indexes_the_transpose() {
        let h = Tensor::from_f64(&[2, 3], &[1., 2., 3., 4., 5., 6.], DType::F32);
        let p = Tensor::from_f64(&[3, 2], &[1., 4., 2., 5., 3., 6.], DType::F32);
        assert_eq!(diff(&p, &h, true), (0, 0.0));
    }

    #[test]
    fn layer_prefixes() {
        assert_eq!(layer_prefix("model.layers.12.mlp.up_proj.weight"), "model.layers.12.");
        assert_eq!(layer_prefix("model.norm.weight"), "");
    }
}
