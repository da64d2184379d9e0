//! Rotary position embedding (RoPE).
//!
//! Frequencies: `inv_freq[k] = 1 / theta^(2k/D)` for `k < D/2`, rescaled per rope type,
//! following HF `modeling_rope_utils.py` (`_compute_default_rope_parameters`,
//! `_compute_linear_scaling_rope_parameters`, `_compute_dynamic_ntk_parameters`,
//! `_compute_yarn_parameters`, `_compute_longrope_parameters`,
//! `_compute_llama3_parameters`, and the `dynamic_rope_update` decorator for the two
//! types whose frequencies depend on the sequence length).
//!
//! Tables (`LlamaRotaryEmbedding.forward`): `freqs = pos · inv_freq` `[B, T, D/2]`,
//! `emb = cat(freqs, freqs)`, `cos = cos(emb) · attention_factor`,
//! `sin = sin(emb) · attention_factor`, each `[B, T, D]`.
//!
//! Rotation (`apply_rotary_pos_emb`): `x · cos + rotate_half(x) · sin` with
//! `rotate_half(x) = cat(-x[D/2:], x[:D/2])`, i.e. pairs `(k, k + D/2)` turn by
//! `freqs[k]`. The interleaved layout (pairs `(2k, 2k+1)`) is the `rope.interleaved`
//! fault; [`apply`] takes the layout.
//!
//! The config is read in both spellings: `rope_parameters {rope_type, rope_theta, ...}`
//! (transformers ≥ 4.57 / 5) or `rope_theta` + `rope_scaling {rope_type | type, ...}`.

use std::path::Path;

use ndarray::{s, Array2, Array3, Array4, ArrayView3};
use serde_json::Value;

use contract::error::{Error, Result};
use dump::{ModelConfig, Precision};

use super::numerics::{Numerics, RoundAt};
use super::plan::{AnglePrecision, RopeFrequencies, RopeLayout};

/// The rope type and its scaling keys.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeType {
    Default,
    /// `inv_freq / factor`.
    Linear {
        factor: f64,
    },
    /// NTK-aware: theta grows with the sequence length past `max_position_embeddings`.
    Dynamic {
        factor: f64,
    },
    Yarn {
        factor: f64,
        attention_factor: Option<f64>,
        mscale: Option<f64>,
        mscale_all_dim: Option<f64>,
        beta_fast: f64,
        beta_slow: f64,
        original_max_position_embeddings: f64,
        truncate: bool,
    },
    LongRope {
        short_factor: Vec<f64>,
        long_factor: Vec<f64>,
        factor: f64,
        attention_factor: Option<f64>,
        original_max_position_embeddings: usize,
    },
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

/// Everything RoPE needs from the model config.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeConfig {
    pub theta: f64,
    /// Rotary dimension `D` (the head dimension; Llama rotates the whole head).
    pub dim: usize,
    pub max_position_embeddings: usize,
    pub kind: RopeType,
}

fn num(v: &Value, key: &str) -> Option<f64> {
    v.get(key).and_then(Value::as_f64)
}

impl RopeConfig {
    /// Plain RoPE with base `theta` over `dim` dimensions.
    pub fn plain(theta: f64, dim: usize, max_position_embeddings: usize) -> RopeConfig {
        RopeConfig { theta, dim, max_position_embeddings, kind: RopeType::Default }
    }

    /// Reads `cfg`'s rope settings; `path` names the manifest in errors.
    pub fn from_model(cfg: &ModelConfig, path: &Path) -> Result<RopeConfig> {
        let bad = |what: String| Error::Config { path: path.to_path_buf(), what };
        let empty = Value::Object(Default::default());
        let params = match (&cfg.rope_parameters, &cfg.rope_scaling) {
            (Some(p), _) if p.is_object() => p.clone(),
            (_, Some(s)) if s.is_object() => s.clone(),
            _ => empty,
        };
        let rope_type = params
            .get("rope_type")
            .or_else(|| params.get("type"))
            .and_then(Value::as_str)
            .unwrap_or("default")
            .to_string();
        let theta = num(&params, "rope_theta").or(cfg.rope_theta).unwrap_or(10000.0);
        let prf = num(&params, "partial_rotary_factor")
            .or_else(|| cfg.extra.get("partial_rotary_factor").and_then(Value::as_f64))
            .unwrap_or(1.0);
        if prf != 1.0 {
            return Err(bad(format!(
                "partial_rotary_factor {prf}: Llama rotates the whole head (1.0)"
            )));
        }
        let dim = cfg.head_dim();
        let max_pos = cfg.max_position_embeddings;
        let need = |key: &str| {
            num(&params, key)
                .ok_or_else(|| bad(format!("rope type {rope_type:?} needs a numeric `{key}`")))
        };
        let original = num(&params, "original_max_position_embeddings")
            .or_else(|| cfg.extra.get("original_max_position_embeddings").and_then(Value::as_f64));
        let factors = |key: &str| -> Result<Vec<f64>> {
            let v: Option<Vec<f64>> = params
                .get(key)
                .and_then(Value::as_array)
                .and_then(|a| a.iter().map(Value::as_f64).collect());
            match v {
                Some(v) if v.len() == dim / 2 => Ok(v),
                Some(v) => Err(bad(format!(
                    "longrope `{key}` has {} entries, expected head_dim/2 = {}",
                    v.len(),
                    dim / 2
                ))),
                None => Err(bad(format!("rope type \"longrope\" needs a numeric array `{key}`"))),
            }
        };
        let kind = match rope_type.as_str() {
            "default" => RopeType::Default,
            "linear" => RopeType::Linear { factor: need("factor")? },
            "dynamic" => RopeType::Dynamic { factor: need("factor")? },
            "yarn" => {
                let original = original.unwrap_or(max_pos as f64);
                RopeType::Yarn {
                    factor: num(&params, "factor").unwrap_or(max_pos as f64 / original),
                    attention_factor: num(&params, "attention_factor"),
                    mscale: num(&params, "mscale"),
                    mscale_all_dim: num(&params, "mscale_all_dim"),
                    beta_fast: num(&params, "beta_fast").filter(|&b| b != 0.0).unwrap_or(32.0),
                    beta_slow: num(&params, "beta_slow").filter(|&b| b != 0.0).unwrap_or(1.0),
                    original_max_position_embeddings: original,
                    truncate: params.get("truncate").and_then(Value::as_bool).unwrap_or(true),
                }
            }
            "longrope" => {
                let original = original.unwrap_or(max_pos as f64);
                RopeType::LongRope {
                    short_factor: factors("short_factor")?,
                    long_factor: factors("long_factor")?,
                    factor: num(&params, "factor").unwrap_or(max_pos as f64 / original),
                    attention_factor: num(&params, "attention_factor"),
                    original_max_position_embeddings: original as usize,
                }
            }
            "llama3" => RopeType::Llama3 {
                factor: need("factor")?,
                low_freq_factor: need("low_freq_factor")?,
                high_freq_factor: need("high_freq_factor")?,
                original_max_position_embeddings: need("original_max_position_embeddings")?,
            },
            other => return Err(bad(format!("unknown rope type {other:?}"))),
        };
        Ok(RopeConfig { theta, dim, max_position_embeddings: max_pos, kind })
    }

    /// `1 / theta^(2k/D)`, `[D/2]`.
    fn base_inv_freq(&self, theta: f64) -> Vec<f64> {
        let d = self.dim as f64;
        (0..self.dim / 2).map(|k| 1.0 / theta.powf((2 * k) as f64 / d)).collect()
    }

    /// HF's `rope_init_fn(config, device, seq_len)`: `(inv_freq [D/2], attention_factor)`.
    pub fn inv_freq(&self, seq_len: Option<usize>) -> (Vec<f64>, f64) {
        let dim = self.dim as f64;
        match &self.kind {
            RopeType::Default => (self.base_inv_freq(self.theta), 1.0),
            RopeType::Linear { factor } => {
                (self.base_inv_freq(self.theta).into_iter().map(|f| f / factor).collect(), 1.0)
            }
            RopeType::Dynamic { factor } => {
                let max = self.max_position_embeddings as f64;
                let seq = seq_len.map(|s| s as f64).filter(|&s| s > max).unwrap_or(max);
                let base =
                    self.theta * ((factor * seq / max) - (factor - 1.0)).powf(dim / (dim - 2.0));
                (self.base_inv_freq(base), 1.0)
            }
            RopeType::Yarn {
                factor,
                attention_factor,
                mscale,
                mscale_all_dim,
                beta_fast,
                beta_slow,
                original_max_position_embeddings,
                truncate,
            } => {
                let get_mscale = |scale: f64, m: f64| {
                    if scale <= 1.0 {
                        1.0
                    } else {
                        0.1 * m * scale.ln() + 1.0
                    }
                };
                let af = match (attention_factor, mscale, mscale_all_dim) {
                    (Some(a), _, _) => *a,
                    (None, Some(m), Some(ma)) if *m != 0.0 && *ma != 0.0 => {
                        get_mscale(*factor, *m) / get_mscale(*factor, *ma)
                    }
                    _ => get_mscale(*factor, 1.0),
                };
                let correction_dim = |rot: f64| {
                    (dim * (original_max_position_embeddings / (rot * 2.0 * std::f64::consts::PI))
                        .ln())
                        / (2.0 * self.theta.ln())
                };
                let (mut low, mut high) = (correction_dim(*beta_fast), correction_dim(*beta_slow));
                if *truncate {
                    low = low.floor();
                    high = high.ceil();
                }
                let (low, mut high) = (low.max(0.0), high.min(dim - 1.0));
                if low == high {
                    high += 0.001;
                }
                let inv = (0..self.dim / 2)
                    .map(|k| {
                        let pos_freq = self.theta.powf((2 * k) as f64 / dim);
                        let extrapolation = 1.0 / pos_freq;
                        let interpolation = 1.0 / (factor * pos_freq);
                        let ramp = ((k as f64 - low) / (high - low)).clamp(0.0, 1.0);
                        let extra_factor = 1.0 - ramp;
                        interpolation * (1.0 - extra_factor) + extrapolation * extra_factor
                    })
                    .collect();
                (inv, af)
            }
            RopeType::LongRope {
                short_factor,
                long_factor,
                factor,
                attention_factor,
                original_max_position_embeddings,
            } => {
                let af = attention_factor.unwrap_or_else(|| {
                    if *factor <= 1.0 {
                        1.0
                    } else {
                        (1.0 + factor.ln() / (*original_max_position_embeddings as f64).ln()).sqrt()
                    }
                });
                let ext = match seq_len {
                    Some(s) if s > *original_max_position_embeddings => long_factor,
                    _ => short_factor,
                };
                let inv = (0..self.dim / 2)
                    .map(|k| 1.0 / (ext[k] * self.theta.powf((2 * k) as f64 / dim)))
                    .collect();
                (inv, af)
            }
            RopeType::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let old = *original_max_position_embeddings;
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                let inv = self
                    .base_inv_freq(self.theta)
                    .into_iter()
                    .map(|f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        let scaled = if wavelen > low_wavelen { f / factor } else { f };
                        if wavelen < high_wavelen || wavelen > low_wavelen {
                            scaled
                        } else {
                            let smooth = (old / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * scaled / factor + smooth * scaled
                        }
                    })
                    .collect();
                (inv, 1.0)
            }
        }
    }
}

/// The rotary embedding of a run: its frequencies and the sequence-length state HF's
/// `dynamic_rope_update` keeps between forward calls (dynamic and longrope types).
#[derive(Debug, Clone)]
pub struct Rope {
    pub config: RopeConfig,
    inv_freq: Vec<f64>,
    attention_factor: f64,
    original_inv_freq: Vec<f64>,
    /// HF `max_seq_len_cached` (dynamic).
    max_seq_len_cached: usize,
    angles: AnglePrecision,
    /// With [`Rope::precompute`]: the cos and sin half-rows of every position.
    table: Option<Vec<(Vec<f64>, Vec<f64>)>>,
}

impl Rope {
    /// `frequencies` and `angles` are fault seams (`rope.wrong_theta`,
    /// `rope.low_precision_angles`).
    pub fn new(config: RopeConfig, frequencies: RopeFrequencies, angles: AnglePrecision) -> Rope {
        let config = match frequencies {
            RopeFrequencies::Configured => config,
            RopeFrequencies::Wrong { theta, keep_scaling: false } => {
                RopeConfig { theta, kind: RopeType::Default, ..config }
            }
            RopeFrequencies::Wrong { theta, keep_scaling: true } => RopeConfig { theta, ..config },
        };
        let (inv_freq, attention_factor) = config.inv_freq(None);
        let max = config.max_position_embeddings;
        Rope {
            original_inv_freq: inv_freq.clone(),
            inv_freq,
            attention_factor,
            max_seq_len_cached: max,
            config,
            angles,
            table: None,
        }
    }

    /// The current `inv_freq` `[D/2]` and attention factor.
    pub fn frequencies(&self) -> (&[f64], f64) {
        (&self.inv_freq, self.attention_factor)
    }

    /// HF `dynamic_rope_update`: refreshes the frequencies for a forward call whose
    /// largest position is `max_pos`.
    fn update(&mut self, max_pos: i64) {
        let seq_len = (max_pos.max(0) + 1) as usize;
        match &self.config.kind {
            RopeType::Dynamic { .. } => {
                let original = self.config.max_position_embeddings;
                if seq_len > self.max_seq_len_cached {
                    (self.inv_freq, self.attention_factor) = self.config.inv_freq(Some(seq_len));
                    self.max_seq_len_cached = seq_len;
                }
                if seq_len < original && self.max_seq_len_cached > original {
                    self.inv_freq = self.original_inv_freq.clone();
                    self.max_seq_len_cached = original;
                }
            }
            RopeType::LongRope { original_max_position_embeddings, .. } => {
                let original = *original_max_position_embeddings;
                if seq_len > original {
                    self.inv_freq = self.config.inv_freq(Some(original + 1)).0;
                } else {
                    self.inv_freq = self.original_inv_freq.clone();
                }
            }
            _ => {}
        }
    }

    /// The first half of the cos and sin rows `[D/2]` at position `p` (the second half
    /// repeats it): `inv_freq` stored at `RoundAt::RopeFrequency`, the angle at
    /// `RoundAt::RopeAngle`, the tables at `RoundAt::RopeTable`.
    fn row(&self, p: i64, n: &dyn Numerics) -> (Vec<f64>, Vec<f64>) {
        let half = self.config.dim / 2;
        let (mut c, mut s_) = (Vec::with_capacity(half), Vec::with_capacity(half));
        for k in 0..half {
            let f = n.round(RoundAt::RopeFrequency, self.inv_freq[k]);
            let mut angle = n.round(RoundAt::RopeAngle, p as f64 * f);
            if self.angles == AnglePrecision::F16 {
                angle =
                    Precision::F16.round(Precision::F16.round(p as f64) * Precision::F16.round(f));
            }
            c.push(n.round(RoundAt::RopeTable, angle.cos() * self.attention_factor));
            s_.push(n.round(RoundAt::RopeTable, angle.sin() * self.attention_factor));
        }
        (c, s_)
    }

    /// Builds the tables once for positions `0..max_position_embeddings` `[max_pos, D/2]`,
    /// as MindFormers' `FreqsMgr` does at construction; later [`Rope::tables`] calls
    /// gather their rows instead of computing them (the dynamic types' frequencies then
    /// stay at their un-grown values; a position past the table is computed directly).
    ///
    /// Only the first `positions` rows are built (at most `max_position_embeddings`):
    /// the rows a scenario reads. A row past them is computed on use, the same value,
    /// so a config with a huge `max_position_embeddings` costs nothing.
    pub fn precompute(&mut self, n: &dyn Numerics, positions: usize) {
        let rows = self.config.max_position_embeddings.min(positions) as i64;
        let rows = (0..rows).map(|p| self.row(p, n)).collect();
        self.table = Some(rows);
    }

    /// cos and sin tables `[batch, seq, D]` for `positions` `[batch, seq]`.
    pub fn tables(
        &mut self,
        positions: &Array2<i64>,
        n: &dyn Numerics,
    ) -> (Array3<f64>, Array3<f64>) {
        if self.table.is_none() {
            if let Some(&m) = positions.iter().max() {
                self.update(m);
            }
        }
        let (b, t) = positions.dim();
        let (d, half) = (self.config.dim, self.config.dim / 2);
        let mut cos = Array3::zeros((b, t, d));
        let mut sin = Array3::zeros((b, t, d));
        for ((bi, ti), &p) in positions.indexed_iter() {
            let computed;
            let (c, s_) = match self
                .table
                .as_ref()
                .and_then(|tb| usize::try_from(p).ok().and_then(|i| tb.get(i)))
            {
                Some((c, s_)) => (c, s_),
                None => {
                    computed = self.row(p, n);
                    (&computed.0, &computed.1)
                }
            };
            for k in 0..half {
                cos[[bi, ti, k]] = c[k];
                cos[[bi, ti, k + half]] = c[k];
                sin[[bi, ti, k]] = s_[k];
                sin[[bi, ti, k + half]] = s_[k];
            }
        }
        (cos, sin)
    }
}

/// Rotates `x` `[batch, heads, seq, D]` by `cos`, `sin` `[batch, seq, D]`.
pub fn apply(
    x: &Array4<f64>,
    cos: ArrayView3<f64>,
    sin: ArrayView3<f64>,
    layout: RopeLayout,
    n: &dyn Numerics,
) -> Array4<f64> {
    let (b, h, t, d) = x.dim();
    let half = d / 2;
    let mut out = Array4::zeros((b, h, t, d));
    for bi in 0..b {
        for hi in 0..h {
            for ti in 0..t {
                let xs = x.slice(s![bi, hi, ti, ..]);
                let c = cos.slice(s![bi, ti, ..]);
                let sn = sin.slice(s![bi, ti, ..]);
                let mut o = out.slice_mut(s![bi, hi, ti, ..]);
                match layout {
                    RopeLayout::HalfSplit => {
                        for j in 0..d {
                            let rot = if j < half { -xs[j + half] } else { xs[j - half] };
                            o[j] = n.round(RoundAt::RopeOutput, xs[j] * c[j] + rot * sn[j]);
                        }
                    }
                    RopeLayout::Interleaved | RopeLayout::InterleavedSliced => {
                        let stride = if layout == RopeLayout::Interleaved { 1 } else { 2 };
                        for k in 0..half {
                            let (x0, x1) = (xs[2 * k], xs[2 * k + 1]);
                            let (ck, sk) = (c[stride * k], sn[stride * k]);
                            o[2 * k] = n.round(RoundAt::RopeOutput, x0 * ck - x1 * sk);
                            o[2 * k + 1] = n.round(RoundAt::RopeOutput, x1 * ck + x0 * sk);
                        }
                    }
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(json: serde_json::Value) -> ModelConfig {
        serde_json::from_value(json).expect("config")
    }

    fn base() -> serde_json::Value {
        serde_json::json!({"vocab_size": 8, "hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1,
            "num_attention_heads": 1, "max_position_embeddings": 64, "rms_norm_eps": 1e-6})
    }

    #[test]
    fn default_inv_freq_by_hand() {
        let r = RopeConfig::plain(10000.0, 4, 64);
        let (f, a) = r.inv_freq(None);
        assert_eq!(a, 1.0);
        assert_eq!(f, vec![1.0, 0.01]);
    }

    #[test]
    fn both_config_spellings_agree() {
        let mut a = base();
        a["rope_theta"] = 500000.0.into();
        a["rope_scaling"] = serde_json::json!({"type": "linear", "factor": 2.0});
        let mut b = base();
        b["rope_parameters"] =
            serde_json::json!({"rope_type": "linear", "rope_theta": 500000.0, "factor": 2.0});
        let ra = RopeConfig::from_model(&cfg(a), Path::new("m")).expect("a");
        let rb = RopeConfig::from_model(&cfg(b), Path::new("m")).expect("b");
        assert_eq!(ra, rb);
        assert_eq!(ra.kind, RopeType::Linear { factor: 2.0 });
        assert_eq!(ra.theta, 500000.0);
    }

    #[test]
    fn llama3_keeps_high_frequencies_and_divides_low_ones() {
        let r = RopeConfig {
            theta: 500000.0,
            dim: 64,
            max_position_embeddings: 131072,
            kind: RopeType::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192.0,
            },
        };
        let (f, _) = r.inv_freq(None);
        let (b, _) = RopeConfig::plain(500000.0, 64, 131072).inv_freq(None);
        assert_eq!(f[0], b[0]);
        assert!((f[31] - b[31] / 8.0).abs() < 1e-18);
    }

    #[test]
    fn missing_scaling_key_is_a_config_error_naming_it() {
        let mut a = base();
        a["rope_scaling"] = serde_json::json!({"rope_type": "llama3", "factor": 8.0});
        let e = RopeConfig::from_model(&cfg(a), Path::new("m.json")).expect_err("missing keys");
        assert!(e.to_string().contains("low_freq_factor"), "{e}");
    }
}
