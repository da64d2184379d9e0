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
    python golden/generate.py --variants [--out fixtures/variants]
    python golden/generate.py --lora [--out fixtures/lora]
    python golden/generate.py --train [--out fixtures/train]
    python golden/generate.py --check-train
    python golden/generate.py --check

See golden/README.md for the scenario format and the regeneration procedure.
"""
from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
import safetensors
import safetensors.torch
import transformers
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM
from transformers.models.llama import modeling_llama as ml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import adapters  # noqa: E402  (LoRA adapters with PEFT, CONTRACT §5)

FORMAT = "llama-parity/dump@1"
REPO = Path(__file__).resolve().parent.parent
SCENARIO_DIR = REPO / "fixtures" / "scenarios"
GOLDEN_DIR = REPO / "golden"
CANDIDATE_DIR = REPO / "fixtures" / "candidates"
VARIANT_DIR = REPO / "fixtures" / "variants"
LORA_DIR = REPO / "fixtures" / "lora"
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
    "kv.stale": "decode steps append zeros to the cache instead of the new key/value (the slot is attended)",
    "norm.weight_unmapped": "RMSNorm weights left at ones (never loaded)",
    "weights.transposed": "square projection weights replaced by their transpose",
}

# The variant set (fixtures/variants/): goldens written with weights, then faulty candidates
# on the first one. A spec with "fault" plants a CONTRACT §3 fault narrowed to "scope"
# (layers, steps, component; CONTRACT §4) with "params"; a spec with "plant" makes a fault
# outside the contract, with the first divergent (step, site) and the computation the
# harness's localiser names for it.
VARIANT_GOLDENS = ["variants_f32", "variants_bf16"]
VARIANTS = [
    ("variants_f32", "attn_no_scale_layer2", {
        "fault": "attn.no_scale", "scope": {"layers": [2]},
        "description": "attention scores of layer 2 not scaled by 1/sqrt(head_dim); the other layers scale them"}),
    ("variants_f32", "gate_up_swapped_layer2", {
        "fault": "weights.gate_up_swapped", "scope": {"layers": [2]},
        "description": "mlp.gate_proj and mlp.up_proj weights swapped in layer 2 only"}),
    ("variants_f32", "kv_stale_layers1_3", {
        "fault": "kv.stale", "scope": {"layers": [1, 2, 3]},
        "description": "in layers 1-3 each decode step's key/value are never written: the slot stays zero "
                       "(as in a static cache) but is still attended"}),
    ("variants_f32", "padding_ignored_decode", {
        "fault": "mask.padding_ignored", "scope": {"steps": ["decode.*"]},
        "description": "padding keys visible in decode steps (causal-only mask there); prefill masks padding"}),
    ("variants_f32", "layernorm_final_norm", {
        "fault": "norm.layernorm", "scope": {"component": "model.norm"},
        "description": "the final norm (model.norm) subtracts the mean before normalising; the layer norms are RMSNorm"}),
    ("variants_f32", "post_attention_norm_unmapped", {
        "fault": "norm.weight_unmapped", "scope": {"component": "post_attention_layernorm"},
        "description": "every layer's post_attention_layernorm weight left at ones (never loaded)"}),
    ("variants_f32", "o_proj_transposed", {
        "fault": "weights.transposed", "scope": {"component": "o_proj"},
        "description": "every layer's o_proj weight (96x96) loaded without its transpose"}),
    ("variants_f32", "yarn_dropped", {
        "fault": "rope.wrong_theta", "params": {"theta": 500000.0, "scaling": "dropped"},
        "description": "rotary tables built as plain RoPE with the configured theta 500000: yarn scaling "
                       "and its attention factor dropped"}),
    ("variants_f32", "interleaved_sliced_table", {
        "fault": "rope.interleaved", "params": {"table": "sliced"},
        "description": "GPT-J rotation of pairs (2k, 2k+1) reading HF's duplicated cos/sin table sliced [..., 0::2], "
                       "so pair k turns with frequency 2k mod D/2"}),
    ("variants_f32", "decode_positions_off_by_3", {
        "fault": "rope.pos_off_by_one", "params": {"offset": 3},
        "description": "decode step j is fed position last prefill position + 4 + j (three too far)"}),
    ("variants_f32", "no_scale_decode", {
        "fault": "attn.no_scale", "scope": {"steps": ["decode.*"]},
        "description": "attention scores not scaled by 1/sqrt(head_dim) in decode steps, every layer; prefill scales them"}),
    ("variants_f32", "gqa_tiled_layer1", {
        "fault": "kv.gqa_tiled", "scope": {"layers": [1]},
        "description": "layer 1 repeats its key/value heads by tiling (h % nKV) instead of h // (nH/nKV)"}),
    ("variants_f32", "layernorm_input_norm_layer0", {
        "fault": "norm.layernorm", "scope": {"layers": [0], "component": "input_layernorm"},
        "description": "layer 0's input_layernorm subtracts the mean before normalising; every other norm is RMSNorm"}),
    ("variants_f32", "positions_ignore_padding", {
        "plant": "positions.ignore_padding",
        "first": "prefill inputs.position_ids",
        "computation": "the position bookkeeping (offsets, padding, decode steps)",
        "description": "prefill positions are 0..P-1 in every row, left padding counted; decode continues from P"}),
    ("variants_f32", "kv_proj_swapped", {
        "plant": "weights.kv_swapped",
        "first": "prefill model.layers.0.self_attn.k_proj",
        "computation": "the projection itself (its weights or how they were mapped)",
        "description": "k_proj and v_proj weights exchanged in every layer (the same shape under GQA)"}),
    ("variants_f32", "embed_scaled", {
        "plant": "embed.scaled",
        "first": "prefill model.embed_tokens",
        "computation": "the embedding lookup (its weights, or the token ids fed)",
        "description": "embedding output multiplied by sqrt(hidden_size) (Gemma's normaliser) on a Llama model"}),
    ("variants_f32", "mask_sees_next_token", {
        "plant": "mask.next_visible",
        "first": "prefill model.mask",
        "computation": "the mask construction (causality or padding)",
        "description": "the prefill causal mask shows one future token: query i also sees key i+1 among real tokens"}),
    ("variants_f32", "gelu_mlp", {
        "plant": "mlp.gelu",
        "first": "prefill model.layers.0.mlp",
        "computation": "the MLP itself (gate, up and down weights, or the activation)",
        "description": "the MLP uses exact GELU instead of SiLU"}),
    ("variants_f32", "partial_rotary", {
        "plant": "rope.partial",
        "first": "prefill model.layers.0.self_attn.q_rope",
        "computation": "the rotation itself (its layout, or which table it applies)",
        "description": "only the first half of head_dim is rotated (rotate_half over D/2 dims with the table's "
                       "first D/4 frequencies); the second half passes through"}),
    ("variants_f32", "final_norm_skipped", {
        "plant": "norm.final_skipped",
        "first": "prefill model.norm",
        "computation": "the final norm itself",
        "description": "the final norm is skipped: model.norm returns its input"}),
    ("variants_f32", "attn_residual_dropped_layer1", {
        "plant": "residual.attn_dropped", "scope": {"layers": [1]},
        "first": "prefill model.layers.1.post_attention_layernorm",
        "computation": "the residual add after attention, or the norm itself",
        "description": "layer 1 drops the residual add after attention (hidden = attention output)"}),
]
PLANTS = {
    "positions.ignore_padding", "weights.kv_swapped", "embed.scaled", "mask.next_visible",
    "mlp.gelu", "rope.partial", "norm.final_skipped", "residual.attn_dropped",
}

# The LoRA set (fixtures/lora/, CONTRACT §5): adapter goldens made with PEFT (adapter/ beside
# the weights), then HF-made faulty candidates on them: every §5 fault (slug lora_<fault>)
# and adapter faults outside the contract (slug other_<what>). A candidate's producer.expect
# says what a consumer should conclude, as in the variant set.
LORA_GOLDENS = ["lora_f32", "lora_bf16", "lora_rslora_pattern_f32", "lora_merged_bf16", "lora_merged_f32"]
LORA_CANDIDATES = [
    ("lora_f32", "lora_scale_alpha", {"fault": "lora.scale_alpha"}),
    ("lora_f32", "lora_scale_missing", {"fault": "lora.scale_missing"}),
    ("lora_f32", "lora_not_loaded", {"fault": "lora.not_loaded"}),
    ("lora_f32", "lora_target_missing", {"fault": "lora.target_missing", "scope": {"component": "v_proj"}}),
    ("lora_f32", "lora_gate_up_swapped", {"fault": "lora.gate_up_swapped"}),
    ("lora_rslora_pattern_f32", "lora_rslora_ignored", {"fault": "lora.rslora_ignored"}),
    ("lora_rslora_pattern_f32", "lora_pattern_ignored", {"fault": "lora.pattern_ignored"}),
    ("lora_merged_bf16", "lora_merged_low_precision", {"fault": "lora.merged_low_precision"}),
    ("lora_merged_f32", "lora_merged_low_precision",
     {"fault": "lora.merged_low_precision", "params": {"dtype": "bfloat16"}}),
    ("lora_bf16", "lora_scale_missing", {"fault": "lora.scale_missing"}),
    ("lora_bf16", "lora_not_loaded", {"fault": "lora.not_loaded"}),
    ("lora_bf16", "lora_gate_up_swapped", {"fault": "lora.gate_up_swapped"}),
    ("lora_f32", "other_kv_swapped", {"plant": "lora.kv_swapped"}),
    ("lora_f32", "other_dropout_on", {"plant": "lora.dropout_on", "params": {"seed": 3434}}),
    ("lora_f32", "other_layers_swapped", {"plant": "lora.layers_swapped"}),
    ("lora_f32", "other_applied_twice", {"plant": "lora.applied_twice"}),
]


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
            if k == "adapter" and isinstance(base.get("adapter"), dict) and isinstance(v, dict):
                v = {**base["adapter"], **v}  # the same adapter, some keys changed
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


def _swap(a, b):
    """Exchanges the values of two parameters of the same shape, in place."""
    tmp = a.detach().clone()
    a.copy_(b)
    b.copy_(tmp)


def _rotate_pairs(q, k, c, s):
    """GPT-J style rotation of pairs (2k, 2k+1) of q and k by the half tables c, s."""
    def rot(x):
        x0, x1 = x[..., 0::2], x[..., 1::2]
        y0 = x0 * c - x1 * s
        y1 = x1 * c + x0 * s
        return torch.stack((y0, y1), dim=-1).flatten(-2)

    return rot(q), rot(k)


def _apply_rope_interleaved(q, k, cos, sin, unsqueeze_dim=1):
    """GPT-J style rotation of pairs (2k, 2k+1) with HF's frequency k (cos[..., k], k < D/2)."""
    half = cos.shape[-1] // 2
    return _rotate_pairs(q, k, cos[..., :half].unsqueeze(unsqueeze_dim),
                         sin[..., :half].unsqueeze(unsqueeze_dim))


def _apply_rope_interleaved_sliced(q, k, cos, sin, unsqueeze_dim=1):
    """GPT-J style rotation of pairs (2k, 2k+1) reading HF's duplicated table sliced [..., 0::2]:
    pair k turns with cos[..., 2k], frequency 2k mod D/2."""
    return _rotate_pairs(q, k, cos[..., 0::2].unsqueeze(unsqueeze_dim),
                         sin[..., 0::2].unsqueeze(unsqueeze_dim))


def _apply_rope_partial(q, k, cos, sin, unsqueeze_dim=1, _orig=ml.apply_rotary_pos_emb):
    """Partial rotary (rotary_dim = D/2): HF's rotation on the first D/2 dims, with a table of the
    first D/4 frequencies of the full one; the second half of each head passes through."""
    rd = q.shape[-1] // 2
    c = torch.cat((cos[..., :rd // 2], cos[..., :rd // 2]), dim=-1)
    s = torch.cat((sin[..., :rd // 2], sin[..., :rd // 2]), dim=-1)
    q_rot, k_rot = _orig(q[..., :rd], k[..., :rd], c, s, unsqueeze_dim)
    return torch.cat((q_rot, q[..., rd:]), dim=-1), torch.cat((k_rot, k[..., rd:]), dim=-1)


def _rmsnorm_identity(self, hidden_states):
    return hidden_states


def _decoder_layer_no_attn_residual(self, hidden_states, attention_mask=None, position_ids=None,
                                    past_key_values=None, use_cache=False, position_embeddings=None, **kwargs):
    """LlamaDecoderLayer.forward without the residual add after attention."""
    hidden_states = self.input_layernorm(hidden_states)
    hidden_states, _ = self.self_attn(
        hidden_states=hidden_states,
        attention_mask=attention_mask,
        position_ids=position_ids,
        past_key_values=past_key_values,
        use_cache=use_cache,
        position_embeddings=position_embeddings,
        **kwargs,
    )
    residual = hidden_states
    hidden_states = self.post_attention_layernorm(hidden_states)
    hidden_states = self.mlp(hidden_states)
    return residual + hidden_states


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


def projection_widths(cfg: LlamaConfig) -> dict:
    """Output width of each Llama projection."""
    H, I = cfg.hidden_size, cfg.intermediate_size
    nH, nKV = cfg.num_attention_heads, cfg.num_key_value_heads
    D = int(getattr(cfg, "head_dim", None) or H // nH)
    return {"q_proj": nH * D, "k_proj": nKV * D, "v_proj": nKV * D, "o_proj": H,
            "gate_proj": I, "up_proj": I, "down_proj": H}


def projection_site(i: int, proj: str) -> str:
    part = "self_attn" if proj in adapters.ATTN else "mlp"
    return f"model.layers.{i}.{part}.{proj}"


def adapter_site_shapes(cfg: LlamaConfig, B: int, T: int, spec: dict | None) -> dict:
    """The optional sites of CONTRACT §5 an adapter golden dumps: the MLP projections, and
    with ``delta_sites`` the delta ``<projection site>.lora`` of every target module."""
    if spec is None:
        return {}
    widths = projection_widths(cfg)
    out = {}
    for i in range(cfg.num_hidden_layers):
        for proj in adapters.MLP:
            out[projection_site(i, proj)] = (B, T, widths[proj])
        if spec["delta_sites"] and not spec["merged"]:
            for proj in spec["target_modules"]:
                out[projection_site(i, proj) + ".lora"] = (B, T, widths[proj])
    return out


class Recorder:
    def __init__(self, model: LlamaForCausalLM, layers: set[int] | None = None, mlp_projections: bool = False):
        self.model = model
        self.keep = layers  # None: every layer
        self.cur: dict[str, torch.Tensor] | None = None
        # A training step (golden/train.py) sets this to a list: every put then also records
        # (site, the tensor the model goes on computing with, the map from that tensor's
        # gradient to the site's), so that the gradient of the loss w.r.t. the site is taken.
        self.graph: list | None = None
        self.layer: int | None = None
        self.handles = []
        names = ["model.embed_tokens", "model.rotary_emb", "model.norm", "lm_head"]
        for i in range(model.config.num_hidden_layers):
            p = f"model.layers.{i}"
            names += [p, f"{p}.input_layernorm", f"{p}.self_attn.q_proj", f"{p}.self_attn.k_proj",
                      f"{p}.self_attn.v_proj", f"{p}.self_attn.o_proj", f"{p}.post_attention_layernorm", f"{p}.mlp"]
            if mlp_projections:
                names += [f"{p}.mlp.{proj}" for proj in adapters.MLP]
            attn = model.get_submodule(f"{p}.self_attn")
            if attn.layer_idx != i:
                raise RuntimeError(f"{p}.self_attn.layer_idx is {attn.layer_idx}, expected {i}")
            self.handles.append(attn.register_forward_pre_hook(self._enter_layer(i)))
            self.handles.append(attn.register_forward_hook(self._leave_layer))
        for n in names:
            self.handles.append(model.get_submodule(n).register_forward_hook(self._hook(n)))

    def put(self, key: str, t: torch.Tensor, grad_of: torch.Tensor | None = None, grad_map=None) -> None:
        """Records site ``key``. ``grad_of``: the tensor the model computes on when ``t`` is a
        reshaped copy of it; ``grad_map`` turns its gradient into the site's."""
        if self.cur is None:
            return
        if self.keep is not None and key.startswith("model.layers."):
            if int(key.split(".")[2]) not in self.keep:
                return
        if key in self.cur:
            raise RuntimeError(f"site {key} captured twice in one step")
        self.cur[key] = t.detach().clone().contiguous()
        if self.graph is not None:
            self.graph.append((key, t if grad_of is None else grad_of, grad_map))

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
            self.put(f"{p}.context", out.reshape(B, T, -1), grad_of=out,
                     grad_map=lambda g, B=B, T=T: g.reshape(B, T, -1))
            return out, weights
        return eager_attention_forward

    def adapter_deltas(self, lora: dict, targets: list, dtype: torch.dtype) -> None:
        """Records ``<projection site>.lora`` (CONTRACT §5) for every target module: the term
        PEFT adds, or zeros where the module carries no adapter (nothing is added)."""
        widths = projection_widths(self.model.config)
        for i in range(self.model.config.num_hidden_layers):
            for proj in targets:
                site = projection_site(i, proj)
                layer = lora.get(site)
                if layer is not None:
                    b = layer.lora_B[adapters.ADAPTER_NAME]
                    self.handles.append(b.register_forward_hook(adapters.delta_hook(self.put, site, layer, dtype)))
                else:
                    def zeros(module, args, _site=site, _w=widths[proj]):
                        x = args[0]
                        self.put(f"{_site}.lora", torch.zeros(*x.shape[:-1], _w, dtype=dtype))
                    self.handles.append(self.model.get_submodule(site).register_forward_pre_hook(zeros))

    def close(self):
        for h in self.handles:
            h.remove()


def variant_scope(spec: dict | None) -> dict:
    """A variant's scope with every dimension spelled out (CONTRACT §4): "all" or a list, component or None."""
    sc = (spec or {}).get("scope", {})
    return {"layers": sc.get("layers", "all"), "steps": sc.get("steps", "all"), "component": sc.get("component")}


def variant_expect(spec: dict) -> dict:
    """What a consumer should conclude about a variant (manifest producer.expect)."""
    if spec.get("fault"):
        return {"fault": spec["fault"], "scope": variant_scope(spec), "params": dict(spec.get("params", {}))}
    return {"fault": None, "first": spec.get("first"), "computation": spec.get("computation")}


def fault_spec(fault: str, scope: dict, params: dict) -> str:
    """The ``--fault ID@DIM=VALUE...`` spelling of a scoped, parametrized fault (CONTRACT §4)."""
    parts = [fault]
    if scope["layers"] != "all":
        parts.append("layers=" + ",".join(str(i) for i in scope["layers"]))
    if scope["steps"] != "all":
        parts.append("steps=" + ",".join(scope["steps"]))
    if scope["component"] is not None:
        parts.append(f"component={scope['component']}")
    for k, v in params.items():
        parts.append(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}")
    return "@".join(parts)


def norm_modules(model, component: str | None, layer_ok) -> list:
    """The RMSNorm modules a norm fault acts on: by component (None: every norm), layers filtered."""
    out = []
    for i, layer in enumerate(model.model.layers):
        for c in ("input_layernorm", "post_attention_layernorm"):
            if component in (None, c) and layer_ok(i):
                out.append(getattr(layer, c))
    if component in (None, "model.norm"):
        out.append(model.model.norm)
    return out


def run_scenario(sc: dict, fault: str | None = None, variant: dict | None = None, runner=None):
    """Return (manifest, activations{key: tensor}, weights{name: tensor}).

    ``variant`` (an entry of VARIANTS) plants its fault narrowed to its scope with its
    params, or one of PLANTS; ``fault`` alone plants a fault everywhere in its default form.
    ``runner`` replaces the prefill and decode steps (a training step, golden/train.py): it
    is called with a dict of the prepared run (model, recorder, inputs, the float32 weights
    before the cast) inside the same planted-fault patches, with autograd on, and returns
    the activations; the manifest is then the prefill's, for the caller to complete.
    """
    spec = variant or {}
    if fault is None:
        fault = spec.get("fault")
    plant = spec.get("plant")
    if fault is not None and fault not in FAULTS and fault not in adapters.LORA_FAULTS:
        raise SystemExit(f"unknown or unsupported fault '{fault}'; supported: "
                         f"{', '.join(sorted(FAULTS) + sorted(adapters.LORA_FAULTS))}")
    if plant is not None and plant not in PLANTS and plant not in adapters.LORA_PLANTS:
        raise SystemExit(f"unknown plant '{plant}'; known: {', '.join(sorted(PLANTS | set(adapters.LORA_PLANTS)))}")
    lora_spec = adapters.adapter_spec(sc)
    lora_fault = fault if fault in adapters.LORA_FAULTS else plant if plant in adapters.LORA_PLANTS else None
    if lora_fault is not None and lora_spec is None:
        raise SystemExit(f"{lora_fault} needs a scenario with an adapter")
    scope = variant_scope(spec)
    params = spec.get("params", {})
    state = {"step": None}

    def layer_ok(i):
        return scope["layers"] == "all" or i in scope["layers"]

    def step_ok():
        return scope["steps"] == "all" or any(fnmatch.fnmatchcase(state["step"], p) for p in scope["steps"])

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(int(sc["seed"]))
    dtype = DTYPES[sc["dtype"]]

    cfg = build_config(sc)
    model = LlamaForCausalLM(cfg)
    init_weights(model, sc["weights_seed"], sc["weight_scale"])
    rot = model.model.rotary_emb
    inv_freq32 = (rot.inv_freq.detach().clone(), rot.original_inv_freq.detach().clone())
    weights32 = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    model = model.to(dtype).eval()
    # model.to(dtype) also casts the rotary inv_freq buffers; from_pretrained(dtype=...) keeps
    # them in float32 (they are computed in float32 at init). Follow the loading path.
    rot.inv_freq, rot.original_inv_freq = inv_freq32
    if model.config._attn_implementation != "eager":
        raise RuntimeError(f"attention implementation is {model.config._attn_implementation}")
    if cfg.tie_word_embeddings and model.lm_head.weight is not model.model.embed_tokens.weight:
        raise RuntimeError("tie_word_embeddings set but lm_head is not tied")

    # weights exactly as the model holds them (before any fault)
    def held_weights(m):
        w = {k: v.detach().clone().contiguous() for k, v in m.state_dict().items()}
        if cfg.tie_word_embeddings:
            w.pop("lm_head.weight")  # HF checkpoints omit the tied head
        return w

    weights = held_weights(model)

    adapter_files = None
    lora_info = None
    if lora_spec is not None:
        # PEFT's files are written, then loaded back: the run reads what the golden ships
        with tempfile.TemporaryDirectory(prefix="adapter-") as tmp:
            adapters.write_adapter(model, lora_spec, Path(tmp))
            adapter_files = {f: (Path(tmp) / f).read_bytes() for f in adapters.ADAPTER_FILES}
            model, lora_info = adapters.attach(model, lora_spec, Path(tmp), dtype, lora_fault,
                                               scope, params)
        if lora_spec["merged"]:
            # the weights the run used: W + s·B·A folded by PEFT (CONTRACT §5, merged: true)
            weights = held_weights(model)

    if fault == "weights.gate_up_swapped":
        with torch.no_grad():
            for i, layer in enumerate(model.model.layers):
                if not layer_ok(i):
                    continue
                _swap(layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight)
    if fault == "weights.transposed":
        with torch.no_grad():
            for i, layer in enumerate(model.model.layers):
                if not layer_ok(i):
                    continue
                for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
                    if scope["component"] not in (None, name):
                        continue
                    parent = layer.self_attn if name in ("q_proj", "k_proj", "v_proj", "o_proj") else layer.mlp
                    w = getattr(parent, name).weight
                    if w.shape[0] != w.shape[1]:
                        if scope["component"] is not None:
                            raise SystemExit(f"weights.transposed: {name} is {tuple(w.shape)}, not square")
                        continue
                    w.copy_(w.detach().t().clone())
    if fault == "norm.weight_unmapped":
        with torch.no_grad():
            for norm in norm_modules(model, scope["component"], layer_ok):
                norm.weight.fill_(1.0)
    if plant == "weights.kv_swapped":
        with torch.no_grad():
            for layer in model.model.layers:
                _swap(layer.self_attn.k_proj.weight, layer.self_attn.v_proj.weight)
    if plant == "embed.scaled":
        with torch.no_grad():
            model.model.embed_tokens.weight.mul_(cfg.hidden_size ** 0.5)
    if plant == "mlp.gelu":
        for layer in model.model.layers:
            layer.mlp.act_fn = torch.nn.GELU()
    if fault == "rope.wrong_theta":
        if params.get("scaling", "dropped") != "dropped":
            raise SystemExit("rope.wrong_theta: only scaling 'dropped' is planted")
        theta = float(params.get("theta", 10000.0))
        D = rot.inv_freq.shape[0] * 2
        inv = 1.0 / (theta ** (torch.arange(0, D, 2, dtype=torch.float) / D))
        rot.inv_freq = inv
        rot.original_inv_freq = inv.clone()
        rot.attention_scaling = 1.0

    ids, mask, dec = make_inputs(sc)
    B, P, N = sc["batch"], sc["prefill_len"], sc["decode_steps"]
    pos_prefill = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    last_pos = pos_prefill[:, -1:]  # left padding: the last slot is always a real token
    if plant == "positions.ignore_padding":
        pos_prefill = torch.arange(P, dtype=torch.int64).expand(B, P).clone()
        last_pos = pos_prefill[:, -1:]

    rec = Recorder(model, mlp_projections=lora_spec is not None)
    if lora_spec is not None and lora_spec["delta_sites"] and not lora_spec["merged"]:
        rec.adapter_deltas(lora_info["lora"], lora_info["targets"], dtype)
    rope_inner = ml.apply_rotary_pos_emb
    if fault == "rope.interleaved":
        table = params.get("table", "half")
        if table not in ("half", "sliced"):
            raise SystemExit(f"rope.interleaved: table {table!r} is not half or sliced")
        rope_inner = _apply_rope_interleaved if table == "half" else _apply_rope_interleaved_sliced
    elif fault == "rope.cos_sin_swapped":
        def rope_inner(q, k, cos, sin, *a, _orig=ml.apply_rotary_pos_emb, **kw):
            return _orig(q, k, sin, cos, *a, **kw)
    elif plant == "rope.partial":
        rope_inner = _apply_rope_partial
    if rope_inner is not ml.apply_rotary_pos_emb and (scope["layers"] != "all" or scope["steps"] != "all"):
        def rope_inner(q, k, cos, sin, *a, _fault=rope_inner, _orig=ml.apply_rotary_pos_emb, **kw):
            f = _fault if layer_ok(rec.layer) and step_ok() else _orig
            return f(q, k, cos, sin, *a, **kw)
    attn_inner = ml.eager_attention_forward
    if fault == "attn.no_scale":
        def attn_inner(module, q, k, v, m, *a, _orig=ml.eager_attention_forward, **kw):
            if layer_ok(module.layer_idx) and step_ok():
                kw["scaling"] = 1.0
            return _orig(module, q, k, v, m, *a, **kw)
    mask_inner = ml.create_causal_mask
    if fault == "mask.padding_ignored":
        def mask_inner(*a, _orig=ml.create_causal_mask, **kw):
            am = kw.get("attention_mask")
            if am is not None and step_ok():
                kw["attention_mask"] = torch.ones_like(am)
            return _orig(*a, **kw)
    elif plant == "mask.next_visible":
        def mask_inner(*a, _orig=ml.create_causal_mask, **kw):
            m = _orig(*a, **kw)
            if state["step"] != "prefill":
                return m
            am = kw["attention_mask"]
            m = m.clone()
            for b in range(am.shape[0]):
                for q in range(am.shape[1] - 1):
                    if am[b, q] and am[b, q + 1]:
                        m[b, :, q, q + 1] = 0
            return m

    norm_forward = ml.LlamaRMSNorm.forward
    norm_fault = {"norm.layernorm": _rmsnorm_layernorm, "norm.eps_outside": _rmsnorm_eps_outside}.get(fault)
    norm_targets = norm_modules(model, scope["component"], layer_ok)
    if plant == "norm.final_skipped":
        norm_fault, norm_targets = _rmsnorm_identity, [model.model.norm]
    if norm_fault is not None:
        if scope == variant_scope(None) and plant is None:
            norm_forward = norm_fault
        else:
            target_ids = {id(m) for m in norm_targets}

            def norm_forward(self, hidden_states, _fault=norm_fault, _orig=ml.LlamaRMSNorm.forward):
                f = _fault if id(self) in target_ids and step_ok() else _orig
                return f(self, hidden_states)
    repeat_kv = ml.repeat_kv
    if fault == "kv.gqa_tiled":
        def repeat_kv(hidden_states, n_rep, _orig=ml.repeat_kv):
            f = _repeat_kv_tiled if layer_ok(rec.layer) and step_ok() else _orig
            return f(hidden_states, n_rep)
    layer_forward = ml.LlamaDecoderLayer.forward
    if plant == "residual.attn_dropped":
        def layer_forward(self, *a, _orig=ml.LlamaDecoderLayer.forward, **kw):
            f = _decoder_layer_no_attn_residual if layer_ok(self.self_attn.layer_idx) else _orig
            return f(self, *a, **kw)

    acts: dict[str, torch.Tensor] = {}
    steps = ["prefill"] + [f"decode.{j}" for j in range(N)]
    cache = DynamicCache(config=cfg)
    if fault == "kv.stale":
        # a static cache whose decode slot is never written: it holds zeros and is attended
        def stale_update(key_states, value_states, layer_idx, *a, _orig=cache.update, **kw):
            if state["step"] != "prefill" and layer_ok(layer_idx) and step_ok():
                key_states, value_states = torch.zeros_like(key_states), torch.zeros_like(value_states)
            return _orig(key_states, value_states, layer_idx, *a, **kw)
        cache.update = stale_update
    try:
        with patched(ml, "apply_rotary_pos_emb", rec.rope(rope_inner)), \
             patched(ml, "eager_attention_forward", rec.attention(attn_inner)), \
             patched(ml, "create_causal_mask", mask_inner), \
             patched(ml, "repeat_kv", repeat_kv), \
             patched(ml.LlamaRMSNorm, "forward", norm_forward), \
             patched(ml.LlamaDecoderLayer, "forward", layer_forward), \
             (torch.no_grad() if runner is None else nullcontext()):
            am = mask.clone()
            if runner is not None:
                state["step"] = "train"
                acts = runner({"model": model, "recorder": rec, "config": cfg, "dtype": dtype, "ids": ids,
                               "mask": mask, "position_ids": pos_prefill, "weights32": weights32,
                               "lora": lora_info, "lora_spec": lora_spec,
                               "adapter_files": adapter_files})
                steps = []
            for si, step in enumerate(steps):
                state["step"] = step
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
                    elif fault == "rope.pos_off_by_one" and step_ok():
                        pos = last_pos + 1 + int(params.get("offset", 1)) + j
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
                check_step(cfg, cur, step, B, T, S, dtype, extra=adapter_site_shapes(cfg, B, T, lora_spec))
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
    if lora_spec is not None:
        producer["adapter"] = adapters.producer_info(lora_spec)
    if variant is not None:
        if fault is not None:
            producer["fault"] = fault_spec(fault, scope, params)
        producer["fault_description"] = spec["description"]
        producer["expect"] = variant_expect(spec)
    elif fault is not None:
        producer["fault"] = fault
        producer["fault_description"] = FAULTS.get(fault) or adapters.LORA_FAULTS[fault]
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
    if lora_spec is not None and fault is None and plant is None:
        manifest["adapter"] = {"path": "adapter", "merged": bool(lora_spec["merged"])}
    return manifest, acts, weights, adapter_files


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


def check_step(cfg, cur, step, B, T, S, dtype, layers=None, extra=None):
    want = {**site_shapes(cfg, B, T, S), **(extra or {})}
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


def write_dump(out: Path, manifest: dict, acts: dict, weights: dict | None, adapter: dict | None = None) -> None:
    """Writes a dump; ``adapter`` (file name -> bytes, PEFT's files) goes to ``out/adapter/``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").write_text(manifest_json(manifest))
    save_tensors(acts, out / "activations.safetensors")
    if weights is not None:
        save_tensors(weights, out / "weights.safetensors")
    elif (out / "weights.safetensors").exists():
        (out / "weights.safetensors").unlink()
    if (out / "adapter").exists():
        shutil.rmtree(out / "adapter")
    if adapter is not None:
        (out / "adapter").mkdir()
        for name, data in adapter.items():
            (out / "adapter" / name).write_bytes(data)


def candidate_dirname(scenario: str, fault: str) -> str:
    return f"{scenario}__{fault.replace('.', '_')}"


def gen_suite(golden_out: Path) -> list[Path]:
    written = []
    for name in SUITE:
        sc = load_scenario(SCENARIO_DIR / f"{name}.json")
        m, a, w, ad = run_scenario(sc)
        d = golden_out / name
        write_dump(d, m, a, w, ad)
        written.append(d)
        print(f"wrote {d} ({len(a)} tensors)")
    return written


def gen_candidates(cand_out: Path) -> list[Path]:
    written = []
    for name, fault in CANDIDATES:
        sc = load_scenario(SCENARIO_DIR / f"{name}.json")
        m, a, _, _ = run_scenario(sc, fault)
        d = cand_out / candidate_dirname(name, fault)
        write_dump(d, m, a, None)
        written.append(d)
        print(f"wrote {d} ({len(a)} tensors)")
    return written


def set_dirs(root: Path, rel: str, goldens: list, candidates: list) -> list[tuple[str, Path]]:
    """(repo-relative name, actual path) of every dump directory of a set written under
    ``root`` (committed under ``rel``): ``golden/<name>`` and ``candidates/<name>__<slug>``."""
    dirs = [(f"{rel}/golden/{n}", root / "golden" / n) for n in goldens]
    for name, slug, _ in candidates:
        dn = f"{name}__{slug}"
        dirs.append((f"{rel}/candidates/{dn}", root / "candidates" / dn))
    return dirs


def variant_dirs(variant_root: Path) -> list[tuple[str, Path]]:
    """Every dump directory of the variant set."""
    return set_dirs(variant_root, "fixtures/variants", VARIANT_GOLDENS, VARIANTS)


def gen_variants(variant_out: Path) -> list[Path]:
    """The variant set: its goldens (with weights) and its faulty candidates (without)."""
    written = []
    for name in VARIANT_GOLDENS:
        sc = load_scenario(SCENARIO_DIR / f"{name}.json")
        m, a, w, _ = run_scenario(sc)
        d = variant_out / "golden" / name
        write_dump(d, m, a, w)
        written.append(d)
        print(f"wrote {d} ({len(a)} tensors)")
    for name, slug, spec in VARIANTS:
        sc = load_scenario(SCENARIO_DIR / f"{name}.json")
        m, a, _, _ = run_scenario(sc, variant=spec)
        d = variant_out / "candidates" / f"{name}__{slug}"
        write_dump(d, m, a, None)
        written.append(d)
        print(f"wrote {d} ({len(a)} tensors)")
    return written


def dir_files(rel: str, d: Path) -> list[tuple[str, Path]]:
    """(repo-relative name, actual path) of every file under a dump directory (adapter/ included)."""
    return [(f"{rel}/{p.relative_to(d).as_posix()}", p) for p in sorted(d.rglob("*")) if p.is_file()]


def lora_dirs(lora_root: Path) -> list[tuple[str, Path]]:
    """Every dump directory of the LoRA set."""
    return set_dirs(lora_root, "fixtures/lora", LORA_GOLDENS, LORA_CANDIDATES)


def compute_order(acts: dict, steps: list) -> list:
    """(step, site) keys of ``acts`` in the order the model computes them (CONTRACT §1, §5):
    ``<projection>.lora`` right before its projection, the MLP projections before ``mlp``."""
    head = ["inputs.position_ids", "model.embed_tokens", "model.rotary_emb.cos", "model.rotary_emb.sin", "model.mask"]
    per_layer = ["input_layernorm"]
    for proj in ("q_proj", "k_proj", "v_proj"):
        per_layer += [f"self_attn.{proj}.lora", f"self_attn.{proj}"]
    per_layer += ["self_attn.q_rope", "self_attn.k_rope", "self_attn.k_cache", "self_attn.v_cache",
                  "self_attn.probs", "self_attn.context", "self_attn.o_proj.lora", "self_attn.o_proj",
                  "post_attention_layernorm"]
    for proj in adapters.MLP:
        per_layer += [f"mlp.{proj}.lora", f"mlp.{proj}"]
    per_layer += ["mlp", ""]
    n_layers = 1 + max(int(k.split("/", 1)[1].split(".")[2]) for k in acts if "/model.layers." in k)
    order = head + [f"model.layers.{i}.{s}".rstrip(".") for i in range(n_layers) for s in per_layer]
    order += ["model.norm", "lm_head"]
    return [(st, site) for st in steps for site in order if f"{st}/{site}" in acts]


def first_divergence(golden: dict, cand: dict, manifest: dict) -> str | None:
    """The first (step, site) in compute order where the candidate's rel-L2 to the golden
    exceeds 1e-6, padding query rows of the prefill left out; "<step> <site>", or None."""
    steps = manifest["steps"]
    mask = torch.tensor(manifest["scenario"]["attention_mask"], dtype=torch.bool)
    for st, site in compute_order(golden, steps):
        g, c = golden[f"{st}/{site}"].double(), cand[f"{st}/{site}"].double()
        if st == "prefill" and g.dim() == 3 and tuple(g.shape[:2]) == tuple(mask.shape) and site != "model.mask":
            g, c = g[mask], c[mask]
        if not torch.isfinite(c).all() or (c - g).norm() > 1e-6 * max(g.norm().item(), 1e-30):
            return f"{st} {site}"
    return None


def gen_lora(lora_out: Path) -> list[Path]:
    """The LoRA set: adapter goldens (weights, adapter/) and HF-made faulty candidates (neither).

    Each candidate's ``producer.expect`` holds its fault (or ``null`` and ``plant`` for one
    outside CONTRACT §5) with scope and params, and ``first``: the first divergent
    "<step> <site>" against its golden, measured here.
    """
    written = []
    golden_acts = {}
    for name in LORA_GOLDENS:
        sc = load_scenario(SCENARIO_DIR / f"{name}.json")
        m, a, w, ad = run_scenario(sc)
        d = lora_out / "golden" / name
        write_dump(d, m, a, w, ad)
        golden_acts[name] = a
        written.append(d)
        print(f"wrote {d} ({len(a)} tensors)")
    for name, slug, spec in LORA_CANDIDATES:
        sc = load_scenario(SCENARIO_DIR / f"{name}.json")
        what = spec.get("fault") or spec["plant"]
        full = {**spec, "description": {**adapters.LORA_FAULTS, **adapters.LORA_PLANTS}[what]}
        m, a, _, _ = run_scenario(sc, variant=full)
        if set(a) != set(golden_acts[name]):
            raise RuntimeError(f"{name}__{slug}: sites differ from the golden's: "
                               f"{sorted(set(a) ^ set(golden_acts[name]))[:4]}")
        first = first_divergence(golden_acts[name], a, m)
        if first is None:
            raise RuntimeError(f"{name}__{slug}: the candidate does not differ from its golden")
        expect = m["producer"]["expect"]
        if spec.get("plant"):
            expect = {"fault": None, "plant": spec["plant"]}
        expect["first"] = first
        m["producer"]["expect"] = expect
        d = lora_out / "candidates" / f"{name}__{slug}"
        write_dump(d, m, a, None)
        written.append(d)
        print(f"wrote {d} ({len(a)} tensors), first divergence {first}")
    return written


def committed_files(golden_root: Path, cand_root: Path, variant_root: Path,
                    lora_root: Path) -> list[tuple[str, Path]]:
    """(repo-relative name, actual path) of every file the checksum list covers."""
    files = []
    for name in SUITE:
        files += dir_files(f"golden/{name}", golden_root / name)
    for name, fault in CANDIDATES:
        dn = candidate_dirname(name, fault)
        files += dir_files(f"fixtures/candidates/{dn}", cand_root / dn)
    for rel, d in variant_dirs(variant_root) + lora_dirs(lora_root):
        files += dir_files(rel, d)
    return files


def all_written() -> bool:
    """Whether every directory the checksum list covers exists in the repository."""
    return (all((GOLDEN_DIR / n).exists() for n in SUITE)
            and all((CANDIDATE_DIR / candidate_dirname(n, f)).exists() for n, f in CANDIDATES)
            and all(d.exists() for _, d in variant_dirs(VARIANT_DIR) + lora_dirs(LORA_DIR)))


def sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def write_checksums(golden_root: Path, cand_root: Path, variant_root: Path, lora_root: Path) -> None:
    lines = [f"{sha256(p)}  {rel}" for rel, p in committed_files(golden_root, cand_root, variant_root, lora_root)]
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
        gen_variants(tmp / "variants")
        gen_lora(tmp / "lora")
        fresh = committed_files(tmp / "golden", tmp / "candidates", tmp / "variants", tmp / "lora")
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
    g.add_argument("--variants", action="store_true",
                   help="write the variant set: goldens and scoped / out-of-contract faulty candidates "
                        "(default OUT: fixtures/variants)")
    g.add_argument("--lora", action="store_true",
                   help="write the LoRA set: adapter goldens made with PEFT and their faulty candidates "
                        "(default OUT: fixtures/lora)")
    g.add_argument("--train", action="store_true",
                   help="write the training set (CONTRACT §6): one-step goldens made with torch autograd and "
                        "AdamW, and their faulty candidates (default OUT: fixtures/train; golden/train.py)")
    g.add_argument("--check", action="store_true", help="regenerate into a temp dir, compare byte for byte")
    g.add_argument("--check-train", action="store_true",
                   help="regenerate the training set into a temp dir, compare byte for byte with fixtures/train")
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
        for k, v in sorted({**FAULTS, **adapters.LORA_FAULTS}.items()):
            print(f"{k}\t{v}")
        return 0
    if args.check:
        return check()
    if args.train or args.check_train:
        if args.fault or args.no_weights or args.input_ids or args.prompt or args.layers:
            ap.error("--train and --check-train take no --fault, --no-weights, --input-ids, --prompt or --layers "
                     "(the set's candidates carry their faults)")
        if args.check_train and args.out:
            ap.error("--check-train compares with fixtures/train and takes no --out")
        import train  # noqa: E402  (one training step, CONTRACT §6)
        if args.check_train:
            return train.check_train(train.TRAIN_DIR)
        out = (args.out or train.TRAIN_DIR).resolve()
        train.gen_train(out)
        if out == train.TRAIN_DIR.resolve():
            train.write_checksums(out)
        return 0
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
    for chosen, gen, default in ((args.all, gen_suite, GOLDEN_DIR),
                                 (args.candidates, gen_candidates, CANDIDATE_DIR),
                                 (args.variants, gen_variants, VARIANT_DIR),
                                 (args.lora, gen_lora, LORA_DIR)):
        if chosen:
            out = (args.out or default).resolve()
            gen(out)
            if out == default.resolve() and all_written():
                write_checksums(GOLDEN_DIR, CANDIDATE_DIR, VARIANT_DIR, LORA_DIR)
            return 0
    if not args.out:
        ap.error("--scenario needs --out DIR")
    sc_path = args.scenario.resolve()
    out = args.out.resolve()
    if out == sc_path.parent or out in sc_path.parents:
        ap.error("refusing to write into the scenario folder")
    sc = load_scenario(sc_path)
    if "train" in sc:
        ap.error(f"{sc_path}: a training scenario (its 'train' block): made by --train, not --scenario")
    m, a, w, ad = run_scenario(sc, args.fault)
    write_dump(out, m, a, None if (args.no_weights or args.fault) else w, None if args.fault else ad)
    print(f"wrote {out} ({len(a)} tensors{', fault ' + args.fault if args.fault else ''})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
