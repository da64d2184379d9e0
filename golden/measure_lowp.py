#!/usr/bin/env python3
"""Measure how far the bf16 / f16 golden runs are from the f32 run of the same scenario.

For every site and step: rel-L2 = ||c - g|| / ||g|| and cosine(c, g), computed in float64
over valid entries only:
  * query rows of padding tokens are dropped (token axis: 1 for [B,T,...] sites, 2 for
    [B,nH,T,...] sites q_rope / k_rope / probs);
  * k_cache / v_cache: key slots holding padding tokens are dropped (they are derived from
    padding rows, which mean nothing);
  * inputs.position_ids (integer) and model.mask (compared as a visibility pattern, not
    numerically) are skipped.

Usage: python golden/measure_lowp.py [--ref golden/gqa_pad_f32] [--markdown]
          [CANDIDATE_DIR ...]   (default: golden/gqa_pad_bf16 golden/gqa_pad_f16)
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parent.parent
HEAD_AXIS_SITES = ("q_rope", "k_rope", "probs")
CACHE_SITES = ("k_cache", "v_cache")


def valid_values(site: str, t: np.ndarray, mask_rows: np.ndarray, step: str) -> np.ndarray:
    """Flatten the entries of t that a comparison counts."""
    B = t.shape[0]
    leaf = site.rsplit(".", 1)[-1]
    parts = []
    for b in range(B):
        x = t[b]
        if leaf in CACHE_SITES:
            # x [nKV, S, D]; key slots 0..P-1 follow the prefill mask, later slots are real
            S = x.shape[1]
            keep = np.ones(S, dtype=bool)
            keep[: len(mask_rows[b])] = mask_rows[b] == 1
            x = x[:, keep]
        elif step == "prefill":
            keep = mask_rows[b] == 1
            if leaf in HEAD_AXIS_SITES:
                x = x[:, keep]
            else:
                x = x[keep]
        parts.append(x.reshape(-1))
    return np.concatenate(parts)


def compare(ref_dir: Path, cand_dir: Path) -> list[dict]:
    man = json.loads((ref_dir / "manifest.json").read_text())
    g = load_file(str(ref_dir / "activations.safetensors"))
    c = load_file(str(cand_dir / "activations.safetensors"))
    am = np.array(man["scenario"]["attention_mask"])
    rows = []
    for key in g:
        step, site = key.split("/", 1)
        if site in ("inputs.position_ids", "model.mask"):
            continue
        gv = valid_values(site, g[key].double().numpy(), am, step)
        cv = valid_values(site, c[key].double().numpy(), am, step)
        ng = np.linalg.norm(gv)
        rel = float(np.linalg.norm(cv - gv) / ng) if ng > 0 else float(np.linalg.norm(cv))
        cos = float(gv @ cv / (ng * np.linalg.norm(cv))) if ng > 0 else float("nan")
        rows.append({"step": step, "site": site, "rel_l2": rel, "cosine": cos})
    return rows


def summarize(rows: list[dict], num_layers: int) -> dict:
    def pick(pred):
        sel = [r for r in rows if pred(r["site"])]
        if not sel:
            return None
        worst = max(sel, key=lambda r: r["rel_l2"])
        return {"max_rel_l2": worst["rel_l2"], "min_cosine": min(r["cosine"] for r in sel),
                "worst_at": f'{worst["step"]}/{worst["site"]}'}

    last = num_layers - 1
    return {
        "all sites": pick(lambda s: True),
        "model.layers.0": pick(lambda s: s == "model.layers.0"),
        f"model.layers.{last}": pick(lambda s: s == f"model.layers.{last}"),
        "model.norm": pick(lambda s: s == "model.norm"),
        "lm_head": pick(lambda s: s == "lm_head"),
        "*.q_rope": pick(lambda s: s.endswith(".q_rope")),
        "*.probs": pick(lambda s: s.endswith(".probs")),
        "*.k_cache": pick(lambda s: s.endswith(".k_cache")),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ref", type=Path, default=REPO / "golden" / "gqa_pad_f32")
    ap.add_argument("--markdown", action="store_true", help="print a markdown table")
    ap.add_argument("--per-site", action="store_true", help="also print every site/step")
    ap.add_argument("cands", nargs="*", type=Path)
    args = ap.parse_args()
    cands = args.cands or [REPO / "golden" / "gqa_pad_bf16", REPO / "golden" / "gqa_pad_f16"]
    man = json.loads((args.ref / "manifest.json").read_text())
    L = man["model"]["num_hidden_layers"]
    results = {}
    for cd in cands:
        rows = compare(args.ref, cd)
        results[cd.name] = summarize(rows, L)
        if args.per_site:
            for r in rows:
                print(f'{cd.name}\t{r["step"]}\t{r["site"]}\t{r["rel_l2"]:.3e}\t{r["cosine"]:.7f}')
    if args.markdown:
        names = list(results)
        print("| sites (max over steps) | " + " | ".join(f"{n} rel-L2 (max) | {n} cosine (min)" for n in names) + " |")
        print("|---|" + "---|---|" * len(names))
        for k in results[names[0]]:
            cells = []
            for n in names:
                v = results[n][k]
                cells += [f'{v["max_rel_l2"]:.2e}', f'{v["min_cosine"]:.6f}']
            print(f"| `{k}` | " + " | ".join(cells) + " |")
        for n in names:
            print(f'\n{n}: worst site `{results[n]["all sites"]["worst_at"]}`')
    else:
        print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
