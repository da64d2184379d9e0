#!/usr/bin/env python3
"""Cross-check golden dumps against an independent float64 Llama written from scratch.

Recomputes every site from weights.safetensors and the manifest (positions, mask,
caches, decode loop) without transformers, and reports the worst rel-L2 per dump.
RoPE tables are recomputed for rope_type "default"; for scaled types the dump's own
cos/sin are used as inputs (their scaling is transformers' ROPE_INIT_FUNCTIONS).
Padding query rows are left out, as the contract says.

Usage: python golden/verify_reference.py [golden/NAME ...]   (exit 1 if rel-L2 > tol)
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parent.parent
TOL = {"float32": 1e-4, "bfloat16": 5e-2, "float16": 1e-2}


def rel(a, b, keep_rows=None, axis=1):
    a, b = a.double(), b.double()
    if keep_rows is not None:
        a = a.index_select(axis, keep_rows)
        b = b.index_select(axis, keep_rows)
    n = b.norm()
    return float((a - b).norm() / n) if n > 0 else float((a - b).norm())


def verify(d: Path) -> float:
    m = json.loads((d / "manifest.json").read_text())
    acts = load_file(str(d / "activations.safetensors"))
    w = {k: v.double() for k, v in load_file(str(d / "weights.safetensors")).items()}
    cfg = m["model"]
    if "lm_head.weight" not in w:
        assert cfg["tie_word_embeddings"]
        w["lm_head.weight"] = w["model.embed_tokens.weight"]
    L, nH, nKV, D = cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    eps = cfg["rms_norm_eps"]
    sc = m["scenario"]
    ids = torch.tensor(sc["input_ids"])
    am = torch.tensor(sc["attention_mask"])
    dec = torch.tensor(sc["decode_ids"])
    B, P = ids.shape
    rp = cfg["rope_parameters"]

    def rms(x, wt):
        return wt * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)

    def rot_half(x):
        return torch.cat((-x[..., D // 2:], x[..., : D // 2]), -1)

    worst = (0.0, "")
    kc = [None] * L
    vc = [None] * L
    full_mask = am.clone()
    last = (am.cumsum(-1) - 1)[:, -1:]
    for si, step in enumerate(m["steps"]):
        if step == "prefill":
            x_ids = ids
            pos = (am.cumsum(-1) - 1).masked_fill(am == 0, 1)
        else:
            j = si - 1
            x_ids = dec[:, j:j + 1]
            pos = last + 1 + j
            full_mask = torch.cat([full_mask, torch.ones(B, 1, dtype=am.dtype)], 1)
        T = x_ids.shape[1]
        got = {k.split("/", 1)[1]: v for k, v in acts.items() if k.startswith(step + "/")}
        ref = {"inputs.position_ids": pos}
        h = w["model.embed_tokens.weight"][x_ids]
        ref["model.embed_tokens"] = h
        if rp["rope_type"] == "default":
            inv = 1.0 / (rp["rope_theta"] ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
            f = pos[..., None].double() * inv
            emb = torch.cat((f, f), -1)
            cos, sin = emb.cos(), emb.sin()
            ref["model.rotary_emb.cos"], ref["model.rotary_emb.sin"] = cos, sin
        else:
            cos, sin = got["model.rotary_emb.cos"].double(), got["model.rotary_emb.sin"].double()
        S = full_mask.shape[1]
        # visibility: key s visible to query t iff key is real and s <= absolute slot of t
        q_slot = torch.arange(S - T, S)
        vis = (torch.arange(S)[None, :] <= q_slot[:, None])[None] & (full_mask[:, None, :] == 1)
        for i in range(L):
            p = f"model.layers.{i}"
            W = lambda n: w[f"{p}.{n}.weight"]
            x = rms(h, W("input_layernorm"))
            ref[f"{p}.input_layernorm"] = x
            q = x @ W("self_attn.q_proj").T
            k = x @ W("self_attn.k_proj").T
            v = x @ W("self_attn.v_proj").T
            ref[f"{p}.self_attn.q_proj"], ref[f"{p}.self_attn.k_proj"], ref[f"{p}.self_attn.v_proj"] = q, k, v
            q = q.view(B, T, nH, D).transpose(1, 2)
            k = k.view(B, T, nKV, D).transpose(1, 2)
            v = v.view(B, T, nKV, D).transpose(1, 2)
            c, s_ = cos[:, None], sin[:, None]
            q = q * c + rot_half(q) * s_
            k = k * c + rot_half(k) * s_
            ref[f"{p}.self_attn.q_rope"], ref[f"{p}.self_attn.k_rope"] = q, k
            kc[i] = k if kc[i] is None else torch.cat([kc[i], k], 2)
            vc[i] = v if vc[i] is None else torch.cat([vc[i], v], 2)
            ref[f"{p}.self_attn.k_cache"], ref[f"{p}.self_attn.v_cache"] = kc[i], vc[i]
            kk = kc[i].repeat_interleave(nH // nKV, 1)
            vv = vc[i].repeat_interleave(nH // nKV, 1)
            sc_ = (q @ kk.transpose(-1, -2)) / D ** 0.5
            sc_ = sc_.masked_fill(~vis[:, None], float("-inf"))
            pr = torch.softmax(sc_, -1).nan_to_num(0.0)
            ref[f"{p}.self_attn.probs"] = pr
            ctx = (pr @ vv).transpose(1, 2).reshape(B, T, nH * D)
            ref[f"{p}.self_attn.context"] = ctx
            o = ctx @ W("self_attn.o_proj").T
            ref[f"{p}.self_attn.o_proj"] = o
            h = h + o
            x = rms(h, W("post_attention_layernorm"))
            ref[f"{p}.post_attention_layernorm"] = x
            g = x @ W("mlp.gate_proj").T
            u = x @ W("mlp.up_proj").T
            mo = (torch.nn.functional.silu(g) * u) @ W("mlp.down_proj").T
            ref[f"{p}.mlp"] = mo
            h = h + mo
            ref[p] = h
        h = rms(h, w["model.norm.weight"])
        ref["model.norm"] = h
        ref["lm_head"] = h @ w["lm_head.weight"].T

        # the mask: compare as visibility
        gm = got["model.mask"]
        gvis = gm == 0 if gm.is_floating_point() else gm != 0
        valid_q = (am[:, -T:] == 1) if step == "prefill" else torch.ones(B, T, dtype=torch.bool)
        for b in range(B):
            for t in range(T):
                if valid_q[b, t] and not torch.equal(gvis[b, 0, t], vis[b, t]):
                    raise SystemExit(f"{d.name} {step}: mask row ({b},{t}) visibility differs")
        assert torch.equal(got["inputs.position_ids"], pos), f"{d.name} {step}: position_ids"
        for site, r in ref.items():
            if site == "inputs.position_ids":
                continue
            gt = got[site]
            for b in range(B):
                rows = torch.nonzero(valid_q[b]).flatten()
                if len(rows) == 0:
                    continue
                axis = 1 if site.endswith(("q_rope", "k_rope", "probs")) else 0
                if site.endswith(("k_cache", "v_cache")):
                    axis, rows = 1, torch.nonzero(full_mask[b] == 1).flatten()
                e = rel(gt[b], r[b], rows, axis)
                if e > worst[0]:
                    worst = (e, f"{step}/{site}")
    tol = TOL[m["dtype"]]
    status = "ok" if worst[0] <= tol else "FAIL"
    print(f"{status} {d.name}: worst rel-L2 vs float64 reference {worst[0]:.2e} at {worst[1]} (tol {tol})")
    return worst[0] <= tol


def main() -> int:
    dirs = [Path(a) for a in sys.argv[1:]] or sorted(p.parent for p in (REPO / "golden").glob("*/manifest.json"))
    ok = all([verify(d) for d in dirs])
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
