#!/usr/bin/env python3
"""Checks the LoRA set (fixtures/lora/) without the generator's code path.

For every adapter golden, each projection site of every step is recomputed in float64
from the golden's own files: the projection's input taken from the dumped sites
(``input_layernorm`` for q/k/v, ``context`` for o, ``post_attention_layernorm`` for
gate/up, ``silu(gate_proj) * up_proj`` for down, each rounded to the run dtype as HF does), ``W`` from ``weights.safetensors``,
``lora_A`` / ``lora_B`` from ``adapter/adapter_model.safetensors``, and the scaling from
``adapter/adapter_config.json`` as CONTRACT §5 states it (``alpha / r`` or
``alpha / sqrt(r)``, ``rank_pattern`` / ``alpha_pattern`` matched as PEFT matches them).
Unmerged: ``x W^T + s (x A^T) B^T``, and ``<site>.lora`` against ``s (x A^T) B^T``;
merged: ``x (W + s B A)^T``. Then for every candidate, the rel-L2 at its recorded first
divergent site and that every earlier site is bitwise the golden's.

    python golden/verify_adapters.py [--root fixtures/lora]    (prints Markdown tables)

Exits 1 when a float32 golden's projection misses by rel-L2 > 1e-6 or a low-precision
golden's by more than one unit roundoff of its dtype (2^-8 bfloat16, 2^-11 float16).
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import safetensors.torch

REPO = Path(__file__).resolve().parent.parent
PROJ = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
        "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
BOUND = {"float32": 1e-6, "bfloat16": 2.0 ** -8, "float16": 2.0 ** -11}
PREFIX = "base_model.model."


def load(path: Path) -> dict:
    """Every tensor as float64 numpy (bf16 through torch)."""
    return {k: v.double().numpy() for k, v in safetensors.torch.load_file(str(path)).items()}


def pattern_value(patterns: dict, module: str, default):
    """PEFT's rule: the first pattern key k with re.match(r"(.*\\.)?(k)$", module)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def scaling(cfg: dict, module: str) -> float:
    r = pattern_value(cfg.get("rank_pattern") or {}, module, cfg["r"])
    alpha = pattern_value(cfg.get("alpha_pattern") or {}, module, cfg["lora_alpha"])
    return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r


def rel_l2(c, g) -> float:
    n = np.linalg.norm(g)
    return float(np.linalg.norm(c - g) / (n if n > 0 else 1.0))


def round_to(x: np.ndarray, dtype: str) -> np.ndarray:
    import torch
    t = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    return torch.from_numpy(x).to(t).double().numpy()


def projection_input(acts: dict, step: str, i: int, proj: str, dtype: str) -> np.ndarray:
    p = f"{step}/model.layers.{i}"
    if proj in ("q_proj", "k_proj", "v_proj"):
        return acts[f"{p}.input_layernorm"]
    if proj == "o_proj":
        return acts[f"{p}.self_attn.context"]
    if proj in ("gate_proj", "up_proj"):
        return acts[f"{p}.post_attention_layernorm"]
    g = acts[f"{p}.mlp.gate_proj"]
    # HF rounds silu(gate) and the product to the run dtype
    return round_to(round_to(g / (1.0 + np.exp(-g)), dtype) * acts[f"{p}.mlp.up_proj"], dtype)


def check_golden(d: Path) -> tuple[float, float | None, list]:
    """(worst projection rel-L2, worst .lora rel-L2 or None without .lora sites, rows) of one adapter golden."""
    m = json.loads((d / "manifest.json").read_text())
    ad = m.get("adapter")
    if not ad:
        raise SystemExit(f"{d}: manifest has no adapter")
    cfg = json.loads((d / ad["path"] / "adapter_config.json").read_text())
    lw = load(d / ad["path"] / "adapter_model.safetensors")
    w = load(d / "weights.safetensors")
    acts = load(d / "activations.safetensors")
    dtype = m["dtype"]
    mask = np.array(m["scenario"]["attention_mask"], dtype=bool)
    worst_p, worst_l, rows = 0.0, None, []
    for step in m["steps"]:
        for i in range(m["model"]["num_hidden_layers"]):
            for proj, part in PROJ.items():
                module = f"model.layers.{i}.{part}.{proj}"
                x = projection_input(acts, step, i, proj, dtype)
                W = w[f"{module}.weight"]
                key = f"{PREFIX}{module}"
                adapted = proj in cfg["target_modules"] and f"{key}.lora_A.weight" in lw
                delta = None
                if adapted:
                    A, B = lw[f"{key}.lora_A.weight"], lw[f"{key}.lora_B.weight"]
                    s = scaling(cfg, module)
                    if ad["merged"]:
                        W = round_to(W + s * (B @ A), dtype)
                    else:
                        delta = s * (x @ A.T) @ B.T
                y = x @ W.T + (delta if delta is not None else 0.0)
                g = acts[f"{step}/{module}"]
                sel = mask if step == "prefill" else slice(None)
                e = rel_l2(y[sel], g[sel])
                worst_p = max(worst_p, e)
                rows.append((step, module, e))
                if delta is not None and f"{step}/{module}.lora" in acts:
                    el = rel_l2(delta[sel], acts[f"{step}/{module}.lora"][sel])
                    worst_l = max(worst_l or 0.0, el)
                    rows.append((step, module + ".lora", el))
    return worst_p, worst_l, rows


def check_candidate(golden: Path, cand: Path) -> tuple[str, float, int]:
    """(first site, rel-L2 there, number of earlier sites found bitwise equal)."""
    m = json.loads((cand / "manifest.json").read_text())
    first = m["producer"]["expect"]["first"]
    ga = load(golden / "activations.safetensors")
    ca = load(cand / "activations.safetensors")
    step, site = first.split(" ", 1)
    mask = np.array(m["scenario"]["attention_mask"], dtype=bool)
    a, b = ga[f"{step}/{site}"], ca[f"{step}/{site}"]
    if step == "prefill" and a.ndim == 3:
        a, b = a[mask], b[mask]
    earlier = 0
    sys.path.insert(0, str(REPO / "golden"))
    from generate import compute_order  # the compute order of CONTRACT §1 and §5
    for st, s in compute_order(ga, m["steps"]):
        if (st, s) == (step, site):
            break
        if not np.array_equal(ga[f"{st}/{s}"], ca[f"{st}/{s}"]):
            raise SystemExit(f"{cand.name}: {st}/{s} differs before the recorded first site {first}")
        earlier += 1
    return first, rel_l2(b, a), earlier


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=REPO / "fixtures" / "lora")
    args = ap.parse_args()
    bad = 0
    print("| golden | dtype | merged | worst projection rel-L2 | worst `.lora` rel-L2 | bound |")
    print("|---|---|---|---|---|---|")
    for d in sorted((args.root / "golden").iterdir()):
        m = json.loads((d / "manifest.json").read_text())
        wp, wl, _ = check_golden(d)
        bound = BOUND[m["dtype"]]
        ok = wp <= bound and (wl is None or wl <= bound)
        bad += not ok
        print(f"| {d.name} | {m['dtype']} | {m['adapter']['merged']} | {wp:.2e} | "
              f"{'-' if wl is None else f'{wl:.2e}'} | {bound:.2e}{'' if ok else ' FAIL'} |")
    print()
    print("| candidate | expect | first divergent site | rel-L2 there | sites before it, bitwise equal |")
    print("|---|---|---|---|---|")
    for c in sorted((args.root / "candidates").iterdir()):
        golden = args.root / "golden" / c.name.split("__")[0]
        m = json.loads((c / "manifest.json").read_text())
        exp = m["producer"]["expect"]
        what = exp["fault"] or f"(outside §5: {exp['plant']})"
        if exp.get("scope", {}).get("component"):
            what += f" @component={exp['scope']['component']}"
        first, e, n = check_candidate(golden, c)
        print(f"| {c.name} | {what} | {first} | {e:.3g} | {n} |")
    if bad:
        print(f"{bad} golden(s) FAILED", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
