//! The model's parameters, by HF parameter name (`LlamaForCausalLM.state_dict()`), from
//! an HF checkpoint (a dump's `weights.safetensors` or a checkpoint directory, read by
//! the weights stage's [`HfCheckpoint`]), or drawn at random for tests.
//!
//! Matrices (projections, the embedding, `lm_head`) stay in the checkpoint's stored
//! dtype as views into the mapped files ([`Matrix::Stored`]): a block of rows is widened
//! to `f64` when a layer runs and dropped after, an embedding row when its token is
//! looked up. Only norm weights and biases (vectors) are widened at load.
//!
//! Names: `model.embed_tokens.weight` `[V, H]`; per layer `model.layers.{i}.`
//! `input_layernorm.weight` `[H]`, `self_attn.{q,k,v,o}_proj.weight` (`[nH·D, H]`,
//! `[nKV·D, H]`, `[nKV·D, H]`, `[H, nH·D]`) with `.bias` when `attention_bias`,
//! `post_attention_layernorm.weight` `[H]`, `mlp.{gate,up,down}_proj.weight` (`[I, H]`,
//! `[I, H]`, `[H, I]`) with `.bias` when `mlp_bias`; `model.norm.weight` `[H]`;
//! `lm_head.weight` `[V, H]`, which is `model.embed_tokens.weight` when
//! `tie_word_embeddings` (HF `_tie_weights`: the embedding is used even if a file
//! carries an `lm_head.weight`).
//!
//! The key mapping is a fault seam ([`WeightMapping`]): gate/up swapped, a square
//! projection left untransposed, norm weights never loaded.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ndarray::{Array1, Array2, ArrayD};

use ::weights::checkpoint::HfCheckpoint;
use contract::error::{Error, Result};
use contract::fault::Component;
use dump::{DType, ModelConfig, Tensor};

use super::linear::{Linear, Matrix};
use super::numerics::{round_in_place, Numerics, RoundAt};
use super::plan::{Plan, WeightMapping};
use super::rng::SplitMix64;

/// One decoder layer's parameters.
#[derive(Debug, Clone)]
pub struct LayerWeights {
    /// `[H]`
    pub input_layernorm: Array1<f64>,
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    /// `[H]`
    pub post_attention_layernorm: Array1<f64>,
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
    /// Whether the layer runs with an adapter (merged or not): it then also records the
    /// optional sites of CONTRACT §5.
    pub adapted: bool,
}

/// Every parameter of a `LlamaForCausalLM`.
#[derive(Debug, Clone)]
pub struct Weights {
    /// `[V, H]`
    pub embed_tokens: Matrix,
    pub layers: Vec<LayerWeights>,
    /// `[H]`
    pub norm: Array1<f64>,
    /// `[V, H]`
    pub lm_head: Linear,
}

/// A source of named tensors: a safetensors file, or a generator for tests.
trait Source {
    fn path(&self, key: &str) -> PathBuf;
    /// The tensor `key` in its stored dtype, or `None` if absent.
    fn fetch(&mut self, key: &str) -> Option<Tensor>;
}

impl Source for &HfCheckpoint {
    fn path(&self, key: &str) -> PathBuf {
        self.file_of(key).to_path_buf()
    }
    fn fetch(&mut self, key: &str) -> Option<Tensor> {
        self.get(key)
    }
}

struct Loader<'a, S: Source> {
    src: S,
    cfg: &'a ModelConfig,
    plan: &'a Plan,
}

impl<S: Source> Loader<'_, S> {
    fn tensor(&mut self, key: &str, expected: &[usize]) -> Result<Tensor> {
        let file = self.src.path(key);
        let t = self
            .src
            .fetch(key)
            .ok_or_else(|| Error::MissingTensor { file: file.clone(), key: key.into() })?;
        if t.shape() != expected {
            return Err(Error::Shape {
                file,
                key: key.into(),
                expected: expected.to_vec(),
                got: t.shape().to_vec(),
            });
        }
        if !t.dtype().is_float() {
            return Err(Error::DType {
                file,
                key: key.into(),
                expected: "a float dtype".into(),
                got: t.dtype().to_string(),
            });
        }
        Ok(t)
    }

    fn matrix(&mut self, key: &str, rows: usize, cols: usize) -> Result<Matrix> {
        Ok(Matrix::Stored(self.tensor(key, &[rows, cols])?))
    }

    fn vector(&mut self, key: &str, n: usize) -> Result<Array1<f64>> {
        Ok(Array1::from(self.tensor(key, &[n])?.to_f64_vec()))
    }

    /// Whether the plan maps `m` for `component` of `layer` (`None`: outside the layers).
    fn maps(&self, m: WeightMapping, layer: Option<usize>, component: Option<Component>) -> bool {
        self.plan.at(layer, None, component).maps(m)
    }

    fn norm(&mut self, key: &str, n: usize, at: (Option<usize>, Component)) -> Result<Array1<f64>> {
        let w = self.vector(key, n)?;
        let unmapped = self.maps(WeightMapping::NormWeightsUnmapped, at.0, Some(at.1));
        Ok(if unmapped { Array1::ones(n) } else { w })
    }

    fn linear(
        &mut self,
        prefix: &str,
        (out, inp): (usize, usize),
        bias: bool,
        at: (usize, Component),
    ) -> Result<Linear> {
        let mut weight = self.matrix(&format!("{prefix}.weight"), out, inp)?;
        if out == inp && self.maps(WeightMapping::SquareTransposed, Some(at.0), Some(at.1)) {
            weight = Matrix::Owned(weight.to_array().t().to_owned());
        }
        let bias = if bias { Some(self.vector(&format!("{prefix}.bias"), out)?) } else { None };
        Ok(Linear { weight, bias, lora: None })
    }

    fn load(&mut self) -> Result<Weights> {
        let c = self.cfg;
        let (h, v, inter) = (c.hidden_size, c.vocab_size, c.intermediate_size);
        let (nh, nkv, d) = (c.num_attention_heads, c.kv_heads(), c.head_dim());
        let embed_tokens = self.matrix("model.embed_tokens.weight", v, h)?;
        let mut layers = Vec::new();
        for i in 0..c.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let ab = c.attention_bias;
            let mb = c.mlp_bias;
            let (gate_name, up_name) = if self.maps(WeightMapping::GateUpSwapped, Some(i), None) {
                ("up_proj", "gate_proj")
            } else {
                ("gate_proj", "up_proj")
            };
            use Component as C;
            layers.push(LayerWeights {
                input_layernorm: self.norm(
                    &format!("{p}.input_layernorm.weight"),
                    h,
                    (Some(i), C::InputLayernorm),
                )?,
                q_proj: self.linear(
                    &format!("{p}.self_attn.q_proj"),
                    (nh * d, h),
                    ab,
                    (i, C::QProj),
                )?,
                k_proj: self.linear(
                    &format!("{p}.self_attn.k_proj"),
                    (nkv * d, h),
                    ab,
                    (i, C::KProj),
                )?,
                v_proj: self.linear(
                    &format!("{p}.self_attn.v_proj"),
                    (nkv * d, h),
                    ab,
                    (i, C::VProj),
                )?,
                o_proj: self.linear(
                    &format!("{p}.self_attn.o_proj"),
                    (h, nh * d),
                    ab,
                    (i, C::OProj),
                )?,
                post_attention_layernorm: self.norm(
                    &format!("{p}.post_attention_layernorm.weight"),
                    h,
                    (Some(i), C::PostAttentionLayernorm),
                )?,
                gate_proj: self.linear(
                    &format!("{p}.mlp.{gate_name}"),
                    (inter, h),
                    mb,
                    (i, C::GateProj),
                )?,
                up_proj: self.linear(
                    &format!("{p}.mlp.{up_name}"),
                    (inter, h),
                    mb,
                    (i, C::UpProj),
                )?,
                down_proj: self.linear(
                    &format!("{p}.mlp.down_proj"),
                    (h, inter),
                    mb,
                    (i, C::DownProj),
                )?,
                adapted: false,
            });
        }
        let norm = self.norm("model.norm.weight", h, (None, Component::ModelNorm))?;
        let lm_head = Linear {
            weight: if c.tie_word_embeddings {
                embed_tokens.clone()
            } else {
                self.matrix("lm_head.weight", v, h)?
            },
            bias: None,
            lora: None,
        };
        Ok(Weights { embed_tokens, layers, norm, lm_head })
    }
}

impl Weights {
    /// Stores every parameter at `RoundAt::Weight` (a port casts the checkpoint to its
    /// compute dtype when it loads it). A stored matrix is rounded as its rows are read.
    pub fn round(&mut self, n: &dyn Numerics) {
        let mat = |m: &mut Matrix| {
            if let Matrix::Owned(a) = m {
                round_in_place(n, RoundAt::Weight, a);
            }
        };
        let lin = |l: &mut Linear| {
            mat(&mut l.weight);
            if let Some(b) = &mut l.bias {
                round_in_place(n, RoundAt::Weight, b);
            }
        };
        mat(&mut self.embed_tokens);
        for l in &mut self.layers {
            round_in_place(n, RoundAt::Weight, &mut l.input_layernorm);
            round_in_place(n, RoundAt::Weight, &mut l.post_attention_layernorm);
            for p in [
                &mut l.q_proj,
                &mut l.k_proj,
                &mut l.v_proj,
                &mut l.o_proj,
                &mut l.gate_proj,
                &mut l.up_proj,
                &mut l.down_proj,
            ] {
                lin(p);
            }
        }
        round_in_place(n, RoundAt::Weight, &mut self.norm);
        lin(&mut self.lm_head);
    }

    /// Maps every parameter of `cfg` from `checkpoint`, through `plan`'s key mapping:
    /// matrices stay views in the stored dtype, vectors are widened.
    ///
    /// Errors: `MissingTensor`, `Shape` or `DType` naming the file and the HF parameter.
    pub fn load(checkpoint: &HfCheckpoint, cfg: &ModelConfig, plan: &Plan) -> Result<Weights> {
        Loader { src: checkpoint, cfg, plan }.load()
    }

    /// Random weights of `cfg` from `seed`: linear weights uniform in `±1/sqrt(in)`,
    /// biases in `±0.1`, embeddings in `±1`, norm weights in `1 ± 0.2`.
    pub fn random(cfg: &ModelConfig, seed: u64) -> Weights {
        let mut src = Generated { rng: SplitMix64::new(seed), cfg };
        Loader { src: &mut src, cfg, plan: &Plan::default() }
            .load()
            .expect("generated tensors have the expected shapes")
    }

    /// Every parameter by its HF name, widened to `f64`, each at the shape the module
    /// header lists (e.g. `model.layers.{i}.self_attn.q_proj.weight` `[nH·D, H]`); with
    /// `tied`, no `lm_head.weight` (it is the embedding), as torch's
    /// `named_parameters()` lists a tied parameter once.
    pub fn named_parameters(&self, tied: bool) -> BTreeMap<String, ArrayD<f64>> {
        let mut m = BTreeMap::new();
        let mat = |x: &Matrix| x.to_array().into_dyn();
        m.insert("model.embed_tokens.weight".to_string(), mat(&self.embed_tokens));
        for (i, l) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            m.insert(format!("{p}.input_layernorm.weight"), l.input_layernorm.clone().into_dyn());
            m.insert(
                format!("{p}.post_attention_layernorm.weight"),
                l.post_attention_layernorm.clone().into_dyn(),
            );
            for (name, lin) in [
                ("self_attn.q_proj", &l.q_proj),
                ("self_attn.k_proj", &l.k_proj),
                ("self_attn.v_proj", &l.v_proj),
                ("self_attn.o_proj", &l.o_proj),
                ("mlp.gate_proj", &l.gate_proj),
                ("mlp.up_proj", &l.up_proj),
                ("mlp.down_proj", &l.down_proj),
            ] {
                m.insert(format!("{p}.{name}.weight"), mat(&lin.weight));
                if let Some(b) = &lin.bias {
                    m.insert(format!("{p}.{name}.bias"), b.clone().into_dyn());
                }
            }
        }
        m.insert("model.norm.weight".to_string(), self.norm.clone().into_dyn());
        if !tied {
            m.insert("lm_head.weight".to_string(), mat(&self.lm_head.weight));
        }
        m
    }

    /// Where weights of a dump live: `<dir>/weights.safetensors`.
    pub fn path_in(dir: &Path) -> PathBuf {
        dir.join("weights.safetensors")
    }
}

/// Generates each tensor with the shape the loader asks for.
struct Generated<'a> {
    rng: SplitMix64,
    cfg: &'a ModelConfig,
}

impl Source for &mut Generated<'_> {
    fn path(&self, _key: &str) -> PathBuf {
        PathBuf::from("<random weights>")
    }
    fn fetch(&mut self, key: &str) -> Option<Tensor> {
        let c = self.cfg;
        let (h, v, inter) = (c.hidden_size, c.vocab_size, c.intermediate_size);
        let (nh, nkv, d) = (c.num_attention_heads, c.kv_heads(), c.head_dim());
        let name = key
            .rsplit_once("model.layers.")
            .map_or(key, |(_, r)| r.split_once('.').map_or(r, |(_, s)| s));
        let shape: Vec<usize> = match name {
            "model.embed_tokens.weight" | "lm_head.weight" => vec![v, h],
            "model.norm.weight" | "input_layernorm.weight" | "post_attention_layernorm.weight" => {
                vec![h]
            }
            "self_attn.q_proj.weight" => vec![nh * d, h],
            "self_attn.k_proj.weight" | "self_attn.v_proj.weight" => vec![nkv * d, h],
            "self_attn.o_proj.weight" => vec![h, nh * d],
            "self_attn.q_proj.bias" => vec![nh * d],
            "self_attn.k_proj.bias" | "self_attn.v_proj.bias" => vec![nkv * d],
            "self_attn.o_proj.bias" | "mlp.down_proj.bias" => vec![h],
            "mlp.gate_proj.weight" | "mlp.up_proj.weight" => vec![inter, h],
            "mlp.down_proj.weight" => vec![h, inter],
            "mlp.gate_proj.bias" | "mlp.up_proj.bias" => vec![inter],
            _ => return None,
        };
        let n: usize = shape.iter().product();
        let (centre, scale) = if name.ends_with("norm.weight") {
            (1.0, 0.2)
        } else if name.ends_with(".bias") {
            (0.0, 0.1)
        } else if shape.len() == 2 && !key.contains("embed_tokens") {
            (0.0, 1.0 / (shape[1] as f64).sqrt())
        } else {
            (0.0, 1.0)
        };
        let values: Vec<f64> = (0..n).map(|_| centre + scale * self.rng.uniform_pm1()).collect();
        if shape.len() == 2 {
            // Held widened: a random model is small and tests read it back whole.
            let a = Array2::from_shape_vec((shape[0], shape[1]), values).ok()?;
            return Some(Tensor::from_array(&a, DType::F64));
        }
        Some(Tensor::from_f64(&shape, &values, DType::F64))
    }
}
