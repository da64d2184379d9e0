#!/usr/bin/env python3
"""Golden-dump generator for llama-parity (format ``llama-parity/dump@1``).

Runs HuggingFace transformers' own Llama code (eager attention, CPU, deterministic)
on a tiny randomly initialised model described by a scenario JSON file and dumps every
site of CONTRACT §1 for the prefill step and every teacher-forced decode step.

Usage:
    python golden/generate.py --all --out golden
    python golden/generate.py --scenario fixtures/scenarios/X.json --out DIR [--fault ID]
    python golden/generate.py --model HF_CHECKPOINT_DIR --out DIR --input-ids ids.json
        [--dtype bfloat16] [--layers 0,1,-1] [--prompt TEXT instead of --input-ids]
    python golden/generate.py --candidates [--out fixtures/candidates]
    python golden/generate.py --check

See golden/README.md for the scenario format and the regeneration procedure.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import safetensors
import safetensors.torch
import transformers
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM
from transformers.models.llama import modeling_llama as ml

FORMAT = "llama-parity/dump@1"
REPO = Path(__file__).resolve().parent.parent
SCENARIO_DIR = REPO / "fixtures" / "scenarios"
GOLDEN_DIR = REPO / "golden"
CANDIDATE_DIR = REPO / "fixtures" / "candidates"
CHECKSUMS = GOLDEN_DIR / "CHECKSUMS"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Weight initialisation (recorded in every manifest as producer.init).
INIT = {
    "scheme": "normal, parameters visited in sorted name order, one torch.Generator seeded with weights_seed",
    "norm_weight": "1 + 0.1 * N(0,1)",
    "embed_tokens": "N(0, 0.08^2)",
    "linear_weight": "N(0, 0.08^2)",
    "bias": "N(0, 0.02^2)",
    "init_dtype": "float32, then model.to(dtype)",
    "embed_padding_row": "not zeroed (token 0 also occurs as a real token)",
}
NORM_STD, PROJ_STD, BIAS_STD = 0.1, 0.08, 0.02
# Scenario "weight_scale": "fan_in": each projection's std follows its fan-in,
# PROJ_STD * sqrt(FAN_IN_REF / fan_in) (the same 0.08 at width 64, so activations keep
# the committed goldens' statistics at any width instead of growing with sqrt(width)).
# The default, "fixed", is what every committed golden was made with.
FAN_IN_REF = 64
INIT_FAN_IN = {"linear_weight": f"N(0, (0.08 * sqrt({FAN_IN_REF} / fan_in))^2), fan_in = in_features"}

# The suite committed to the repository.
SUITE = ["mha_f32", "gqa_pad_f32", "gqa_pad_bf16", "gqa_pad_f16", "llama3_f32", "yarn_f32", "linear_f32", "longrope_f32", "mqa_tied_f32"]
CANDIDATES = [
    ("gqa_pad_f32", "rope.pos_reset"),
    ("gqa_pad_f32", "rope.interleaved"),
    ("gqa_pad_f32", "mask.padding_ignored"),
    ("gqa_pad_f32", "norm.layernorm"),
    ("gqa_pad_f32", "weights.gate_up_swapped"),
    ("gqa_pad_f32", "rope.pos_fixed"),
    ("gqa_pad_f32", "rope.pos_off_by_one"),
    ("gqa_pad_f32", "rope.cos_sin_swapped"),
    ("gqa_pad_f32", "mask.pad_token_masked"),
    ("gqa_pad_f32", "norm.eps_outside"),
    ("gqa_pad_f32", "attn.no_scale"),
    ("gqa_pad_f32", "kv.gqa_tiled"),
    ("llama3_f32", "rope.wrong_theta"),
    ("gqa_pad_bf16", "rope.pos_reset"),
    ("gqa_pad_bf16", "norm.layernorm"),
    ("gqa_pad_bf16", "mask.padding_ignored"),
    ("gqa_pad_bf16", "weights.gate_up_swapped"),
    ("gqa_pad_bf16", "rope.interleaved"),
]

FAULTS = {
    "rope.pos_reset": "decode step j is fed position j (0, 1, 2, ...) instead of last prefill position + 1 + j",
    "rope.pos_fixed": "every decode step is fed position 0",
    "rope.pos_off_by_one": "decode step j is fed last prefill position + 2 + j",
    "rope.interleaved": "apply_rotary_pos_emb rotates pairs (2k, 2k+1) with frequency k (GPT-J layout)",
    "rope.cos_sin_swapped": "apply_rotary_pos_emb gets (sin, cos) instead of (cos, sin)",
    "rope.wrong_theta": "rotary inv_freq rebuilt as default RoPE with theta 10000, scaling ignored",
    "mask.padding_ignored": "the 4D mask is built from an all-ones 2D mask: causal only, padding keys visible",
    "mask.pad_token_masked": "the 2D mask is rebuilt as input_ids != pad_token_id (real pad-id tokens masked)",
    "norm.layernorm": "LlamaRMSNorm subtracts the mean before normalising (LayerNorm without bias)",
    "norm.eps_outside": "LlamaRMSNorm computes x / (sqrt(mean(x^2)) + eps)",
    "weights.gate_up_swapped": "mlp.gate_proj and mlp.up_proj weights swapped after init",
    "attn.no_scale": "attention scores not scaled by 1/sqrt(head_dim)",
    "kv.gqa_tiled": "GQA key/value heads repeated by tiling (h % nKV) instead of h // (nH/nKV)",
}


# --------------------------------------------------------------------------- scenarios

def load_scenario(path: Path) -> dict:
    """Load a scenario JSON, resolving ``weights_from`` (inherit every field not given)."""
    path = Path(path)
    sc = json.loads(path.read_text())
    src_name = sc.get("weights_from")
    if src_name:
        base = load_scenario(path.parent / f"{src_name}.json")
        merged = dict(base)
        merged.pop("weights_from", None)
        for k, v in sc.items():
            if k == "model" and v != base["model"]:
                raise SystemExit(f"{path}: 'model' differs from weights_from scenario {src_name}")
            merged[k] = v
        merged.setdefault("weights_seed", base.get("weights_seed", base["seed"]))
        if merged["weights_seed"] != base.get("weights_seed", base["seed"]):
            raise SystemExit(f"{path}: weights_seed differs from weights_from scenario {src_name}")
        sc = merged
    for key in ("name", "model", "dtype", "seed", "batch", "prefill_len", "left_padding", "decode_steps"):
        if key not in sc:
            raise SystemExit(f"{path}: missing field '{key}'")
    if sc["dtype"] not in DTYPES:
        raise SystemExit(f"{path}: dtype must be one of {sorted(DTYPES)}")
    if len(sc["left_padding"]) != sc["batch"]:
        raise SystemExit(f"{path}: left_padding needs one entry per batch row")
    if any(p < 0 or p >= sc["prefill_len"] for p in sc["left_padding"]):
        raise SystemExit(f"{path}: each left_padding must be in [0, prefill_len)")
    sc.setdefault("weights_seed", sc["seed"])
    sc.setdefault("pad_token_id", 0)
    sc.setdefault("pad_token_in_text", True)
    if sc.setdefault("weight_scale", "fixed") not in ("fixed", "fan_in"):
        raise SystemExit(f"{path}: weight_scale must be 'fixed' or 'fan_in'")
    return sc


def make_inputs(sc: dict):
    """Deterministic prompt / mask / decode tokens from the scenario seed."""
    g = torch.Generator().manual_seed(int(sc["seed"]))
    B, P, N = sc["batch"], sc["prefill_len"], sc["decode_steps"]
    V = sc["model"]["vocab_size"]
    pad = sc["pad_token_id"]
    ids = torch.randint(1, V, (B, P), generator=g, dtype=torch.int64)
    # keep real tokens distinct from the pad id, except where we plant it on purpose
    ids = torch.where(ids == pad, torch.full_like(ids, (pad + 1) % V), ids)
    mask = torch.ones(B, P, dtype=torch.int64)
    for b, lp in enumerate(sc["left_padding"]):
        ids[b, :lp] = pad
        mask[b, :lp] = 0
        if sc["pad_token_in_text"] and P - lp >= 3:
            ids[b, lp + 2] = pad  # a real token whose id equals the pad id
    dec = torch.randint(1, V, (B, N), generator=g, dtype=torch.int64)
    dec = torch.where(dec == pad, torch.full_like(dec, (pad + 1) % V), dec)
    return ids, mask, dec


def build_config(sc: dict) -> LlamaConfig:
    m = dict(sc["model"])
    return LlamaConfig(**m, pad_token_id=sc["pad_token_id"], attn_implementation="eager")


def init_weights(model: torch.nn.Module, weights_seed: int, weight_scale: str = "fixed") -> None:
    g = torch.Generator().manual_seed(int(weights_seed))
    params = dict(model.named_parameters())  # tied parameters appear once
    with torch.no_grad():
        for name in sorted(params):
            p = params[name]
            if "norm" in name and name.endswith(".weight"):
                p.copy_(1.0 + NORM_STD * torch.randn(p.shape, generator=g, dtype=torch.float32))
            elif name.endswith(".bias"):
                p.copy_(BIAS_STD * torch.randn(p.shape, generator=g, dtype=torch.float32))
            elif weight_scale == "fan_in" and p.dim() == 2 and "embed_tokens" not in name:
                std = PROJ_STD * (FAN_IN_REF / p.shape[1]) ** 0.5
                p.copy_(std * torch.randn(p.shape, generator=g, dtype=torch.float32))
            else:
                p.copy_(PROJ_STD * torch.randn(p.shape, generator=g, dtype=torch.float32))


def manifest_model(cfg: LlamaConfig) -> dict:
    d = cfg.to_dict()
    keys = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "rope_parameters",
            "tie_word_embeddings", "hidden_act", "attention_bias", "mlp_bias", "pad_token_id", "model_type"]
    out = {k: d[k] for k in keys}
    out["head_dim"] = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    return out


# --------------------------------------------------------------------------- faults

def _rmsnorm_layernorm(self, hidden_states):
    input_dtype = hidden_states.dtype
    hidden_states = hidden_states.to(torch.float32)
    hidden_states = hidden_states - hidden_states.mean(-1, keepdim=True)
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
    return self.weight * hidden_states.to(input_dtype)


def _rmsnorm_eps_outside(self, hidden_states):
    input_dtype = hidden_states.dtype
    hidden_states = hidden_states.to(torch.float32)
    rms = hidden_states.pow(2).mean(-1, keepdim=True).sqrt()
    hidden_states = hidden_states / (rms + self.variance_epsilon)
    return self.weight * hidden_states.to(input_dtype)


def _apply_rope_interleaved(q, k, cos, sin, unsqueeze_dim=1):
    """GPT-J style rotation of pairs (2k, 2k+1) with HF's frequency k (cos[..., k], k < D/2)."""
    half = cos.shape[-1] // 2
    c = cos[..., :half].unsqueeze(unsqueeze_dim)
    s = sin[..., :half].unsqueeze(unsqueeze_dim)

    def rot(x):
        x0, x1 = x[..., 0::2], x[..., 1::2]
        y0 = x0 * c - x1 * s
        y1 = x1 * c + x0 * s
        return torch.stack((y0, y1), dim=-1).flatten(-2)

    return rot(q), rot(k)


def _repeat_kv_tiled(hidden_states, n_rep):
    if n_rep == 1:
        return hidden_states
    return hidden_states.repeat(1, n_rep, 1, 1)


@contextmanager
def patched(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


# --------------------------------------------------------------------------- capture

def site_shapes(cfg: LlamaConfig, B: int, T: int, S: int) -> dict:
    H, V = cfg.hidden_size, cfg.vocab_size
    nH, nKV = cfg.num_attention_heads, cfg.num_key_value_heads
    D = int(getattr(cfg, "head_dim", None) or H // nH)
    shapes = {
        "inputs.position_ids": (B, T),
        "model.embed_tokens": (B, T, H),
        "model.rotary_emb.cos": (B, T, D),
        "model.rotary_emb.sin": (B, T, D),
        "model.mask": (B, 1, T, S),
    }
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}"
        shapes.update({
            f"{p}.input_layernorm": (B, T, H),
            f"{p}.self_attn.q_proj": (B, T, nH * D),
            f"{p}.self_attn.k_proj": (B, T, nKV * D),
            f"{p}.self_attn.v_proj": (B, T, nKV * D),
            f"{p}.self_attn.q_rope": (B, nH, T, D),
            f"{p}.self_attn.k_rope": (B, nKV, T, D),
            f"{p}.self_attn.k_cache": (B, nKV, S, D),
            f"{p}.self_attn.v_cache": (B, nKV, S, D),
            f"{p}.self_attn.probs": (B, nH, T, S),
            f"{p}.self_attn.context": (B, T, nH * D),
            f"{p}.self_attn.o_proj": (B, T, H),
            f"{p}.post_attention_layernorm": (B, T, H),
            f"{p}.mlp": (B, T, H),
            f"{p}": (B, T, H),
        })
    shapes["model.norm"] = (B, T, H)
    shapes["lm_head"] = (B, T, V)
    return shapes


class Recorder:
    def __init__(self, model: LlamaForCausalLM, layers: set[int] | None = None):
        self.model = model
        self.keep = layers  # None: every layer
        self.cur: dict[str, torch.Tensor] | None = None
        self.layer: int | None = None
        self.handles = []
        names = ["model.embed_tokens", "model.rotary_emb", "model.norm", "lm_head"]
        for i in range(model.config.num_hidden_layers):
            p = f"model.layers.{i}"
            names += [p, f"{p}.input_layernorm", f"{p}.self_attn.q_proj", f"{p}.self_attn.k_proj",
                      f"{p}.self_attn.v_proj", f"{p}.self_attn.o_proj", f"{p}.post_attention_layernorm", f"{p}.mlp"]
            attn = model.get_submodule(f"{p}.self_attn")
            if attn.layer_idx != i:
                raise RuntimeError(f"{p}.self_attn.layer_idx is {attn.layer_idx}, expected {i}")
            self.handles.append(attn.register_forward_pre_hook(self._enter_layer(i)))
            self.handles.append(attn.register_forward_hook(self._leave_layer))
        for n in names:
            self.handles.append(model.get_submodule(n).register_forward_hook(self._hook(n)))

    def put(self, key: str, t: torch.Tensor) -> None:
        if self.cur is None:
            return
        if self.keep is not None and key.startswith("model.layers."):
            if int(key.split(".")[2]) not in self.keep:
                return
        if key in self.cur:
            raise RuntimeError(f"site {key} captured twice in one step")
        self.cur[key] = t.detach().clone().contiguous()

    def _enter_layer(self, i):
        def f(module, args):
            self.layer = i
        return f

    def _leave_layer(self, module, args, out):
        self.layer = None

    def _hook(self, name):
        def f(module, args, out):
            if name == "model.rotary_emb":
                cos, sin = out
                self.put("model.rotary_emb.cos", cos)
                self.put("model.rotary_emb.sin", sin)
                return
            if isinstance(out, (tuple, list)):
                out = out[0]
            self.put(name, out)
        return f

    def rope(self, inner):
        def apply_rotary_pos_emb(q, k, cos, sin, *a, **kw):
            q2, k2 = inner(q, k, cos, sin, *a, **kw)
            if self.layer is None:
                raise RuntimeError("apply_rotary_pos_emb called outside a self_attn module")
            self.put(f"model.layers.{self.layer}.self_attn.q_rope", q2)
            self.put(f"model.layers.{self.layer}.self_attn.k_rope", k2)
            return q2, k2
        return apply_rotary_pos_emb

    def attention(self, inner):
        def eager_attention_forward(module, query, key, value, attention_mask, *a, **kw):
            out, weights = inner(module, query, key, value, attention_mask, *a, **kw)
            i = module.layer_idx
            if i != self.layer:
                raise RuntimeError(f"attention of layer {i} called while in layer {self.layer}")
            p = f"model.layers.{i}.self_attn"
            if i == 0:
                S = key.shape[-2]
                self.put("model.mask", attention_mask[:, :, :, :S])
            self.put(f"{p}.k_cache", key)
            self.put(f"{p}.v_cache", value)
            self.put(f"{p}.probs", weights)
            B, T = out.shape[0], out.shape[1]
            self.put(f"{p}.context", out.reshape(B, T, -1))
            return out, weights
        return eager_attention_forward

    def close(self):
        for h in self.handles:
            h.remove()


def run_scenario(sc: dict, fault: str | None = None):
    """Return (manifest, activations{key: tensor}, weights{name: tensor})."""
    if fault is not None and fault not in FAULTS:
        raise SystemExit(f"unknown or unsupported fault '{fault}'; supported: {', '.join(sorted(FAULTS))}")
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(int(sc["seed"]))
    dtype = DTYPES[sc["dtype"]]

    cfg = build_config(sc)
    model = LlamaForCausalLM(cfg)
    init_weights(model, sc["weights_seed"], sc["weight_scale"])
    rot = model.model.rotary_emb
    inv_freq32 = (rot.inv_freq.detach().clone(), rot.original_inv_freq.detach().clone())
    model = model.to(dtype).eval()
    # model.to(dtype) also casts the rotary inv_freq buffers; from_pretrained(dtype=...) keeps
    # them in float32 (they are computed in float32 at init). Follow the loading path.
    rot.inv_freq, rot.original_inv_freq = inv_freq32
    if model.config._attn_implementation != "eager":
        raise RuntimeError(f"attention implementation is {model.config._attn_implementation}")
    if cfg.tie_word_embeddings and model.lm_head.weight is not model.model.embed_tokens.weight:
        raise RuntimeError("tie_word_embeddings set but lm_head is not tied")

    # weights exactly as the model holds them (before any fault)
    weights = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        weights.pop("lm_head.weight")  # HF checkpoints omit the tied head

    if fault == "weights.gate_up_swapped":
        with torch.no_grad():
            for layer in model.model.layers:
                g, u = layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight
                tmp = g.detach().clone()
                g.copy_(u)
                u.copy_(tmp)
    if fault == "rope.wrong_theta":
        D = rot.inv_freq.shape[0] * 2
        inv = 1.0 / (10000.0 ** (torch.arange(0, D, 2, dtype=torch.float) / D))
        rot.inv_freq = inv
        rot.original_inv_freq = inv.clone()
        rot.attention_scaling = 1.0

    ids, mask, dec = make_inputs(sc)
    B, P, N = sc["batch"], sc["prefill_len"], sc["decode_steps"]
    pos_prefill = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    last_pos = pos_prefill[:, -1:]  # left padding: the last slot is always a real token

    rec = Recorder(model)
    rope_inner = ml.apply_rotary_pos_emb
    if fault == "rope.interleaved":
        rope_inner = _apply_rope_interleaved
    elif fault == "rope.cos_sin_swapped":
        def rope_inner(q, k, cos, sin, *a, _orig=ml.apply_rotary_pos_emb, **kw):
            return _orig(q, k, sin, cos, *a, **kw)
    attn_inner = ml.eager_attention_forward
    if fault == "attn.no_scale":
        def attn_inner(module, q, k, v, m, *a, _orig=ml.eager_attention_forward, **kw):
            kw["scaling"] = 1.0
            return _orig(module, q, k, v, m, *a, **kw)
    mask_inner = ml.create_causal_mask
    if fault == "mask.padding_ignored":
        def mask_inner(*a, _orig=ml.create_causal_mask, **kw):
            am = kw.get("attention_mask")
            if am is not None:
                kw["attention_mask"] = torch.ones_like(am)
            return _orig(*a, **kw)

    norm_forward = ml.LlamaRMSNorm.forward
    if fault == "norm.layernorm":
        norm_forward = _rmsnorm_layernorm
    elif fault == "norm.eps_outside":
        norm_forward = _rmsnorm_eps_outside
    repeat_kv = _repeat_kv_tiled if fault == "kv.gqa_tiled" else ml.repeat_kv

    acts: dict[str, torch.Tensor] = {}
    steps = ["prefill"] + [f"decode.{j}" for j in range(N)]
    cache = DynamicCache(config=cfg)
    try:
        with patched(ml, "apply_rotary_pos_emb", rec.rope(rope_inner)), \
             patched(ml, "eager_attention_forward", rec.attention(attn_inner)), \
             patched(ml, "create_causal_mask", mask_inner), \
             patched(ml, "repeat_kv", repeat_kv), \
             patched(ml.LlamaRMSNorm, "forward", norm_forward), \
             torch.no_grad():
            am = mask.clone()
            for si, step in enumerate(steps):
                if step == "prefill":
                    x, pos = ids, pos_prefill
                else:
                    j = si - 1
                    x = dec[:, j:j + 1]
                    am = torch.cat([am, torch.ones(B, 1, dtype=am.dtype)], dim=1)
                    if fault == "rope.pos_reset":
                        pos = torch.full((B, 1), j, dtype=torch.int64)
                    elif fault == "rope.pos_fixed":
                        pos = torch.zeros((B, 1), dtype=torch.int64)
                    elif fault == "rope.pos_off_by_one":
                        pos = last_pos + 2 + j
                    else:
                        pos = last_pos + 1 + j
                model_am = am
                if fault == "mask.pad_token_masked":
                    full_ids = torch.cat([ids, dec[:, :si]], dim=1) if si else ids
                    model_am = (full_ids != sc["pad_token_id"]).to(am.dtype)
                rec.cur = {}
                rec.put("inputs.position_ids", pos.to(torch.int64))
                model(input_ids=x, attention_mask=model_am, position_ids=pos,
                      past_key_values=cache, use_cache=True)
                cur, rec.cur = rec.cur, None
                T = x.shape[1]
                S = cache.get_seq_length()
                check_step(cfg, cur, step, B, T, S, dtype)
                for site, t in cur.items():
                    acts[f"{step}/{site}"] = t
    finally:
        rec.close()

    producer = {
        **runtime_producer(),
        "num_threads": 1,
        "weights_cast": "model.to(dtype) after float32 init; rotary inv_freq kept float32 as from_pretrained(dtype=...) does",
        "init": INIT if sc["weight_scale"] == "fixed" else {**INIT, **INIT_FAN_IN},
        "seed": int(sc["seed"]),
        "weights_seed": int(sc["weights_seed"]),
        "generator": "golden/generate.py",
    }
    if fault is not None:
        producer["fault"] = fault
        producer["fault_description"] = FAULTS[fault]
    manifest = {
        "format": FORMAT,
        "producer": producer,
        "model": manifest_model(cfg),
        "dtype": sc["dtype"],
        "scenario": {
            "name": sc["name"],
            "input_ids": ids.tolist(),
            "attention_mask": mask.tolist(),
            "decode_ids": dec.tolist(),
            "pad_token_id": sc["pad_token_id"],
            "left_padding": list(sc["left_padding"]),
        },
        "steps": steps,
    }
    if sc.get("weights_from"):
        manifest["scenario"]["weights_from"] = sc["weights_from"]
    return manifest, acts, weights


def runtime_producer():
    """The producer fields every golden shares: the libraries and how torch ran."""
    return {
        "framework": "transformers",
        "version": transformers.__version__,
        "torch": torch.__version__,
        "safetensors": safetensors.__version__,
        "numpy": np.__version__,
        "device": "cpu",
        "attn_implementation": "eager",
        "deterministic": True,
    }


def check_step(cfg, cur, step, B, T, S, dtype, layers=None):
    want = site_shapes(cfg, B, T, S)
    if layers is not None:
        want = {k: v for k, v in want.items()
                if not k.startswith("model.layers.") or int(k.split(".")[2]) in layers}
    missing = sorted(set(want) - set(cur))
    extra = sorted(set(cur) - set(want))
    if missing or extra:
        raise RuntimeError(f"{step}: missing sites {missing}, unexpected sites {extra}")
    for site, shape in want.items():
        t = cur[site]
        if tuple(t.shape) != shape:
            raise RuntimeError(f"{step}/{site}: shape {tuple(t.shape)}, contract wants {shape}")
        if site == "inputs.position_ids":
            if t.dtype != torch.int64:
                raise RuntimeError(f"{step}/{site}: dtype {t.dtype}, want int64")
        elif t.dtype != dtype:
            raise RuntimeError(f"{step}/{site}: dtype {t.dtype}, run dtype is {dtype}")


# --------------------------------------------------------------------------- writing

def save_tensors(tensors: dict, path: Path) -> None:
    ordered = {k: tensors[k].contiguous() for k in sorted(tensors)}
    safetensors.torch.save_file(ordered, str(path), metadata={"format": "pt"})  # one key: safetensors orders metadata keys by hash


def manifest_json(manifest: dict) -> str:
    """Indented JSON with innermost lists of numbers / strings kept on one line."""
    text = json.dumps(manifest, indent=2)
    flat = re.compile(r'\[\s*((?:-?[\d.eE+-]+|"[^"\n]*")(?:,\s*(?:-?[\d.eE+-]+|"[^"\n]*"))*)\s*\]')
    return flat.sub(lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]", text) + "\n"


def write_dump(out: Path, manifest: dict, acts: dict, weights: dict | None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").write_text(manifest_json(manifest))
    save_tensors(acts, out / "activations.safetensors")
    if weights is not None:
        save_tensors(weights, out / "weights.safetensors")
    elif (out / "weights.safetensors").exists():
        (out / "weights.safetensors").unlink()


def candidate_dirname(scenario: str, fault: str) -> str:
    return f"{scenario}__{fault.replace('.', '_')}"


def gen_suite(golden_out: Path) -> list[Path]:
    written = []
    for name in SUITE:
        sc = load_scenario(SCENARIO_DIR / f"{name}.json")
        m, a, w = run_scenario(sc)
        d = golden_out / name
        write_dump(d, m, a, w)
        written.append(d)
        print(f"wrote {d} ({len(a)} tensors)")
    return written


def gen_candidates(cand_out: Path) -> list[Path]:
    written = []
    for name, fault in CANDIDATES:
        sc = load_scenario(SCENARIO_DIR / f"{name}.json")
        m, a, _ = run_scenario(sc, fault)
        d = cand_out / candidate_dirname(name, fault)
        write_dump(d, m, a, None)
        written.append(d)
        print(f"wrote {d} ({len(a)} tensors)")
    return written


def committed_files(golden_root: Path, cand_root: Path) -> list[tuple[str, Path]]:
    """(repo-relative name, actual path) of every file the checksum list covers."""
    files = []
    for name in SUITE:
        for p in sorted((golden_root / name).iterdir()):
            files.append((f"golden/{name}/{p.name}", p))
    for name, fault in CANDIDATES:
        dn = candidate_dirname(name, fault)
        for p in sorted((cand_root / dn).iterdir()):
            files.append((f"fixtures/candidates/{dn}/{p.name}", p))
    return files


def sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def write_checksums(golden_root: Path, cand_root: Path) -> None:
    lines = [f"{sha256(p)}  {rel}" for rel, p in committed_files(golden_root, cand_root)]
    CHECKSUMS.write_text("\n".join(lines) + "\n")
    print(f"wrote {CHECKSUMS} ({len(lines)} files)")


def describe_diff(a: Path, b: Path) -> str:
    if a.suffix != ".safetensors":
        return "bytes differ"
    ta = safetensors.torch.load_file(str(a))
    tb = safetensors.torch.load_file(str(b))
    if set(ta) != set(tb):
        return f"key sets differ: {sorted(set(ta) ^ set(tb))[:5]}"
    worst = []
    for k in sorted(ta):
        x, y = ta[k], tb[k]
        if x.dtype != y.dtype or x.shape != y.shape:
            worst.append((float("inf"), k))
        elif not torch.equal(x, y):
            worst.append(((x.double() - y.double()).abs().max().item(), k))
    worst.sort(reverse=True)
    return f"{len(worst)} tensors differ; largest abs diffs: " + ", ".join(f"{k}={d:.3g}" for d, k in worst[:5])


def check() -> int:
    expected = {}
    if not CHECKSUMS.exists():
        print(f"error: {CHECKSUMS} missing", file=sys.stderr)
        return 2
    for line in CHECKSUMS.read_text().splitlines():
        if line.strip():
            h, rel = line.split(None, 1)
            expected[rel.strip()] = h
    bad = 0
    with tempfile.TemporaryDirectory(prefix="golden-check-") as tmp:
        tmp = Path(tmp)
        gen_suite(tmp / "golden")
        gen_candidates(tmp / "candidates")
        fresh = committed_files(tmp / "golden", tmp / "candidates")
        fresh_names = {rel for rel, _ in fresh}
        for rel in sorted(set(expected) - fresh_names):
            print(f"MISMATCH {rel}: listed in CHECKSUMS but not regenerated")
            bad += 1
        for rel, p in fresh:
            committed = REPO / rel
            h = sha256(p)
            if rel not in expected:
                print(f"MISMATCH {rel}: regenerated but not listed in CHECKSUMS")
                bad += 1
            elif h != expected[rel]:
                print(f"MISMATCH {rel}: regenerated sha256 {h} != CHECKSUMS {expected[rel]}")
                bad += 1
            if not committed.exists():
                print(f"MISMATCH {rel}: committed file missing")
                bad += 1
            elif committed.read_bytes() != p.read_bytes():
                print(f"MISMATCH {rel}: committed bytes differ from regenerated: {describe_diff(committed, p)}")
                bad += 1
    if bad:
        print(f"check FAILED: {bad} mismatch(es)")
        return 1
    print(f"check OK: {len(expected)} files regenerate byte for byte")
    return 0


# --------------------------------------------------------------------------- real checkpoints

def parse_layers(spec: str, n_layers: int) -> set[int]:
    """``0,1,-1`` -> {0, 1, n_layers-1}; negative indices count from the end."""
    out = set()
    for part in spec.split(","):
        part = part.strip()
        try:
            i = int(part)
        except ValueError:
            raise SystemExit(f"--layers: {part!r} is not a layer index")
        j = i + n_layers if i < 0 else i
        if not 0 <= j < n_layers:
            raise SystemExit(f"--layers: {i} is outside the model's {n_layers} layers")
        out.add(j)
    return out


def checkpoint_hashes(ckpt: Path) -> dict:
    """sha256 of each safetensors file (and the index) of an HF checkpoint directory."""
    names = sorted(p.name for p in ckpt.iterdir()
                   if p.name.endswith(".safetensors") or p.name == "model.safetensors.index.json")
    if not names:
        raise SystemExit(f"{ckpt}: no .safetensors files")
    out = {}
    for n in names:
        h = hashlib.sha256()
        with open(ckpt / n, "rb") as f:
            for chunk in iter(lambda: f.read(8 << 20), b""):
                h.update(chunk)
        out[n] = h.hexdigest()
    return out


def model_inputs(args, model) -> tuple[torch.Tensor, torch.Tensor, list | None, str]:
    """(input_ids [B,P], attention_mask [B,P], decode_ids [B][N] or None, name)."""
    if args.input_ids:
        try:
            d = json.loads(Path(args.input_ids).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise SystemExit(f"{args.input_ids}: {e}")
        if not isinstance(d, dict) or "input_ids" not in d:
            raise SystemExit(f"{args.input_ids}: expected an object with 'input_ids' [[...]]")
        ids = torch.tensor(d["input_ids"], dtype=torch.int64)
        if ids.ndim != 2 or ids.shape[1] == 0:
            raise SystemExit(f"{args.input_ids}: 'input_ids' must be [batch][prefill] with prefill > 0")
        mask = torch.tensor(d.get("attention_mask", [[1] * ids.shape[1]] * ids.shape[0]), dtype=torch.int64)
        if mask.shape != ids.shape:
            raise SystemExit(f"{args.input_ids}: 'attention_mask' must have the shape of 'input_ids'")
        if (mask[:, -1] == 0).any():
            raise SystemExit(f"{args.input_ids}: only left padding is supported (last column all 1)")
        dec = d.get("decode_ids")
        name = d.get("name", Path(args.input_ids).stem)
    else:
        try:
            from transformers import AutoTokenizer
            tok = AutoTokenizer.from_pretrained(str(args.model))
        except Exception as e:  # noqa: BLE001 - any failure means no usable tokenizer
            raise SystemExit(f"{args.model}: --prompt needs the checkpoint's tokenizer: {e}")
        ids = torch.tensor([tok(args.prompt)["input_ids"]], dtype=torch.int64)
        mask = torch.ones_like(ids)
        dec, name = None, "prompt"
    V = model.config.vocab_size
    if ((ids < 0) | (ids >= V)).any():
        raise SystemExit(f"input ids outside the vocabulary (size {V})")
    if dec is not None:
        dt = torch.tensor(dec, dtype=torch.int64)
        if dt.ndim != 2 or dt.shape[0] != ids.shape[0] or ((dt < 0) | (dt >= V)).any():
            raise SystemExit(f"{args.input_ids}: 'decode_ids' must be [batch][N] ids in the vocabulary")
    return ids, mask, dec, name


def run_model(args) -> int:
    """Golden from a real checkpoint: per-step files, weights by reference (CONTRACT §1.1, §1.2)."""
    ckpt = Path(args.model).resolve()
    out = Path(args.out).resolve()
    if out == ckpt or ckpt in out.parents:
        raise SystemExit("refusing to write into the checkpoint directory")
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    dtype = DTYPES[args.dtype]
    model = LlamaForCausalLM.from_pretrained(str(ckpt), dtype=dtype, attn_implementation="eager").eval()
    cfg = model.config
    ids, mask, dec, name = model_inputs(args, model)
    B, P = ids.shape
    N = len(dec[0]) if dec is not None else args.decode_steps
    layers = parse_layers(args.layers, cfg.num_hidden_layers) if args.layers else None
    hashes = {} if args.no_sha256 else checkpoint_hashes(ckpt)

    pos_prefill = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    last_pos = pos_prefill[:, -1:]
    steps = ["prefill"] + [f"decode.{j}" for j in range(N)]
    acts_dir = out / "activations"
    if acts_dir.exists():
        shutil.rmtree(acts_dir)
    acts_dir.mkdir(parents=True)
    for stale in ("activations.safetensors", "weights.safetensors"):
        if (out / stale).exists():
            (out / stale).unlink()
    rec = Recorder(model, layers)
    cache = DynamicCache(config=cfg)
    decode_ids = [[] for _ in range(B)]
    try:
        with patched(ml, "apply_rotary_pos_emb", rec.rope(ml.apply_rotary_pos_emb)), \
             patched(ml, "eager_attention_forward", rec.attention(ml.eager_attention_forward)), \
             torch.no_grad():
            am, x = mask.clone(), ids
            for si, step in enumerate(steps):
                if step == "prefill":
                    pos = pos_prefill
                else:
                    j = si - 1
                    if dec is not None:
                        x = torch.tensor([[row[j]] for row in dec], dtype=torch.int64)
                    else:  # greedy: the previous step's argmax
                        x = logits[:, -1:].argmax(-1)
                    for b in range(B):
                        decode_ids[b].append(int(x[b, 0]))
                    am = torch.cat([am, torch.ones(B, 1, dtype=am.dtype)], dim=1)
                    pos = last_pos + 1 + j
                rec.cur = {}
                rec.put("inputs.position_ids", pos.to(torch.int64))
                logits = model(input_ids=x, attention_mask=am, position_ids=pos,
                               past_key_values=cache, use_cache=True).logits
                cur, rec.cur = rec.cur, None
                check_step(cfg, cur, step, B, x.shape[1], cache.get_seq_length(), dtype, layers)
                save_tensors({f"{step}/{k}": v for k, v in cur.items()}, acts_dir / f"{step}.safetensors")
                del cur
                if not args.quiet:
                    print(f"  {step} written", file=sys.stderr)
    finally:
        rec.close()

    producer = {
        **runtime_producer(),
        "num_threads": args.threads,
        "weights_cast": f"from_pretrained(dtype={args.dtype})",
        "generator": "golden/generate.py --model",
    }
    if layers is not None:
        producer["layers"] = sorted(layers)
    manifest = {
        "format": FORMAT,
        "producer": producer,
        "model": manifest_model(cfg),
        "dtype": args.dtype,
        "scenario": {
            "name": name,
            "input_ids": ids.tolist(),
            "attention_mask": mask.tolist(),
            "decode_ids": decode_ids,
            "pad_token_id": cfg.pad_token_id if cfg.pad_token_id is not None else 0,
        },
        "steps": steps,
        # relative to the dump (CONTRACT §1.2), so a dump and its checkpoint move together
        "weights": {"checkpoint": os.path.relpath(ckpt, out), "sha256": hashes},
    }
    (out / "manifest.json").write_text(manifest_json(manifest))
    print(f"wrote {out} ({len(steps)} steps, weights by reference to {ckpt})")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--all", action="store_true", help="write every suite scenario to OUT/<name>/ (default OUT: golden)")
    g.add_argument("--scenario", type=Path, help="one scenario JSON file")
    g.add_argument("--candidates", action="store_true",
                   help="write the committed faulty candidates (default OUT: fixtures/candidates)")
    g.add_argument("--check", action="store_true", help="regenerate into a temp dir, compare byte for byte")
    g.add_argument("--list-faults", action="store_true", help="print the supported fault IDs")
    g.add_argument("--model", type=Path,
                   help="an HF LlamaForCausalLM checkpoint directory: golden with per-step files, weights by reference")
    ap.add_argument("--out", type=Path, help="output directory")
    ap.add_argument("--fault", help="plant a fault (CONTRACT §3 ID) in the HF run (with --scenario)")
    ap.add_argument("--no-weights", action="store_true", help="with --scenario: do not write weights.safetensors")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="with --model: compute dtype")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--input-ids", type=Path,
                     help="with --model: JSON {input_ids [[..]], attention_mask (optional, left padding), "
                          "decode_ids (optional; else greedy)}")
    src.add_argument("--prompt", help="with --model: text, tokenized by the checkpoint's tokenizer")
    ap.add_argument("--decode-steps", type=int, default=4, help="with --model: greedy decode steps when no decode_ids")
    ap.add_argument("--layers", help="with --model: dump only these layers, e.g. 0,1,-1")
    ap.add_argument("--threads", type=int, default=1, help="with --model: torch threads")
    ap.add_argument("--no-sha256", action="store_true", help="with --model: do not hash the checkpoint files")
    ap.add_argument("-q", "--quiet", action="store_true", help="with --model: no per-step lines")
    args = ap.parse_args(argv)

    if args.list_faults:
        for k in sorted(FAULTS):
            print(f"{k}\t{FAULTS[k]}")
        return 0
    if args.check:
        return check()
    if args.model:
        if not args.out:
            ap.error("--model needs --out DIR")
        if not (args.input_ids or args.prompt):
            ap.error("--model needs --input-ids FILE or --prompt TEXT")
        if args.decode_steps < 0:
            ap.error("--decode-steps must be >= 0")
        return run_model(args)
    if args.input_ids or args.prompt or args.layers:
        ap.error("--input-ids, --prompt and --layers go with --model")
    if args.fault and not args.scenario:
        ap.error("--fault goes with --scenario")
    if args.all:
        out = (args.out or GOLDEN_DIR).resolve()
        gen_suite(out)
        if out == GOLDEN_DIR.resolve() and CANDIDATE_DIR.exists():
            if all((CANDIDATE_DIR / candidate_dirname(n, f)).exists() for n, f in CANDIDATES):
                write_checksums(GOLDEN_DIR, CANDIDATE_DIR)
        return 0
    if args.candidates:
        out = (args.out or CANDIDATE_DIR).resolve()
        gen_candidates(out)
        if out == CANDIDATE_DIR.resolve() and all((GOLDEN_DIR / n).exists() for n in SUITE):
            write_checksums(GOLDEN_DIR, CANDIDATE_DIR)
        return 0
    if not args.out:
        ap.error("--scenario needs --out DIR")
    sc_path = args.scenario.resolve()
    out = args.out.resolve()
    if out == sc_path.parent or out in sc_path.parents:
        ap.error("refusing to write into the scenario folder")
    sc = load_scenario(sc_path)
    m, a, w = run_scenario(sc, args.fault)
    write_dump(out, m, a, None if (args.no_weights or args.fault) else w)
    print(f"wrote {out} ({len(a)} tensors{', fault ' + args.fault if args.fault else ''})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
