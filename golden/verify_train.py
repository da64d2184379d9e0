#!/usr/bin/env python3
"""Independent float64 check of the training goldens (fixtures/train/golden, CONTRACT §6).

Reads only a golden's own files (manifest.json, weights.safetensors, adapter/,
activations.safetensors) with numpy, no torch, and recomputes in float64:

- ``loss`` from the dumped logits (``lm_head``) and ``train.labels``: labels shifted, cross
  entropy averaged over the labels that are not -100, the mean of the micro-batch means;
- ``grad.lm_head`` from the same: ``(softmax - onehot) / count / N`` on the labelled rows;
  under a loss scale, the elements whose scaled value leaves float16 must be the
  non-finite ones;
- every other ``grad.<site>`` from the gradients of the sites it feeds, one op's backward
  at a time (``lm_head``, RMSNorm, the residual adds, the SiLU MLP, o_proj, attention
  probabilities and values, softmax and the 1/sqrt(D) scale, GQA's repeated heads, RoPE,
  the q/k/v projections; a LoRA'd projection with W + s·B·A);
- every parameter's gradient from the dumped sites, their dumped gradients and the
  weights (embedding scatter, projection outer products, RMSNorm weights, the SiLU MLP,
  LoRA's A and B), then the global norm (``grad_norm``) and the clipping factor
  ``min(1, max_grad_norm / (norm + 1e-6))`` against ``param_grad``;
- AdamW's first step from the weights and the dumped ``param_grad`` against ``update``
  (decoupled decay but on the ``no_decay`` globs, bias-corrected moments);
- a skipped step (non-finite gradients): ``grad_norm`` not finite, every ``update``
  equal to its weight, ``param_grad`` 0 or NaN (clipping by a non-finite norm).

Usage: python golden/verify_train.py [DUMP_DIR ...]   (default: every fixtures/train golden)
A candidate (no weights.safetensors) is checked with its golden's weights; a faulty one fails.
Exit status 0 when every check is within its bound, 1 otherwise, 2 on unreadable input.
"""
from __future__ import annotations

import fnmatch
import json
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

REPO = Path(__file__).resolve().parent.parent
IGNORE = -100
F16_MAX_FINITE = 65520.0  # float16 rounds anything at or above this to Inf

# Bounds (relative L2 unless said): float32 goldens recomputed from float32 sites, float16
# goldens from float16 sites (their backward ran in float16).
BOUNDS = {
    "float32": {"loss": 1e-6, "grad.lm_head": 1e-5, "grad_chain": 1e-4, "param_grad": 1e-4, "grad_norm": 1e-5,
                "update_ulp": 4.0},
    "float16": {"loss": 1e-6, "grad.lm_head": 2e-3, "grad_chain": 3e-2, "param_grad": 2e-2, "grad_norm": 2e-2,
                "update_ulp": 4.0},
}


class Bad(Exception):
    pass


def rel(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def silu(x):
    return x / (1.0 + np.exp(-x))


def dsilu(x):
    s = 1.0 / (1.0 + np.exp(-x))
    return s * (1.0 + x * (1.0 - s))


def rms_normed(h: np.ndarray, eps: float) -> np.ndarray:
    return h / np.sqrt((h * h).mean(-1, keepdims=True) + eps)


def outer_sum(g: np.ndarray, x: np.ndarray) -> np.ndarray:
    """sum over [B,T] of g[b,t] ⊗ x[b,t]: [out, in]."""
    return np.einsum("bto,bti->oi", g, x)


def loss_and_logit_grad(logits: np.ndarray, labels: np.ndarray, n_micro: int):
    """float64 loss (mean of micro-batch means) and d loss / d logits."""
    B, P, V = logits.shape
    rows = B // n_micro
    grad = np.zeros_like(logits)
    losses = []
    for k in range(n_micro):
        sl = slice(k * rows, (k + 1) * rows)
        lg = logits[sl, :-1]
        tgt = labels[sl, 1:]
        keep = tgt != IGNORE
        n = int(keep.sum())
        m = lg.max(-1, keepdims=True)
        lse = (np.log(np.exp(lg - m).sum(-1, keepdims=True)) + m)[..., 0]
        t = np.where(keep, tgt, 0)
        picked = np.take_along_axis(lg, t[..., None], -1)[..., 0]
        losses.append(float(((lse - picked) * keep).sum() / n))
        p = np.exp(lg - lse[..., None])
        onehot = np.zeros_like(p)
        np.put_along_axis(onehot, t[..., None], 1.0, -1)
        grad[sl, :-1] = (p - onehot) * keep[..., None] / n / n_micro
    return float(np.mean(losses)), grad


def param_grads_from_sites(a: dict, w: dict, m: dict, adapter: dict | None) -> dict:
    """Every trainable parameter's unclipped gradient, float64, from sites, site gradients and weights."""
    cfg = m["model"]
    L, eps = cfg["num_hidden_layers"], cfg["rms_norm_eps"]
    ids = np.asarray(m["scenario"]["input_ids"])
    s = lambda k: np.asarray(a[f"train/{k}"], np.float64)  # noqa: E731
    g = lambda k: np.asarray(a[f"train/grad.{k}"], np.float64)  # noqa: E731
    W = lambda k: np.asarray(w[k], np.float64)  # noqa: E731
    out = {}
    if adapter is None:
        V, H = cfg["vocab_size"], cfg["hidden_size"]
        emb = np.zeros((V, H))
        np.add.at(emb, ids.reshape(-1), g("model.embed_tokens").reshape(-1, H))
        pad = cfg.get("pad_token_id")
        if pad is not None:
            # HF's LlamaModel builds nn.Embedding(vocab, hidden, padding_idx=pad_token_id): its
            # backward leaves that row without gradient, the pad id's real occurrences included
            emb[pad] = 0.0
        out["model.embed_tokens.weight"] = emb
    for i in range(L):
        p = f"model.layers.{i}"
        h_in = s("model.embed_tokens") if i == 0 else s(f"model.layers.{i - 1}")
        x_attn = s(f"{p}.input_layernorm")
        ctx = s(f"{p}.self_attn.context")
        h_mid = h_in + s(f"{p}.self_attn.o_proj")
        x_mlp = s(f"{p}.post_attention_layernorm")
        wg, wu, wd = W(f"{p}.mlp.gate_proj.weight"), W(f"{p}.mlp.up_proj.weight"), W(f"{p}.mlp.down_proj.weight")
        if adapter is None:
            gate, up = x_mlp @ wg.T, x_mlp @ wu.T
        else:
            gate, up = s(f"{p}.mlp.gate_proj"), s(f"{p}.mlp.up_proj")
        act = silu(gate) * up
        g_mlp = g(f"{p}.mlp")
        if adapter is None:
            d_act = g_mlp @ wd
            inputs = {"self_attn.q_proj": x_attn, "self_attn.k_proj": x_attn, "self_attn.v_proj": x_attn,
                      "self_attn.o_proj": ctx}
            for k, x in inputs.items():
                out[f"{p}.{k}.weight"] = outer_sum(g(f"{p}.{k}"), x)
            out[f"{p}.mlp.gate_proj.weight"] = outer_sum(d_act * up * dsilu(gate), x_mlp)
            out[f"{p}.mlp.up_proj.weight"] = outer_sum(d_act * silu(gate), x_mlp)
            out[f"{p}.mlp.down_proj.weight"] = outer_sum(g_mlp, act)
            out[f"{p}.input_layernorm.weight"] = (g(f"{p}.input_layernorm") * rms_normed(h_in, eps)).sum((0, 1))
            out[f"{p}.post_attention_layernorm.weight"] = (g(f"{p}.post_attention_layernorm")
                                                           * rms_normed(h_mid, eps)).sum((0, 1))
        else:
            inputs = {"self_attn.q_proj": x_attn, "self_attn.k_proj": x_attn, "self_attn.v_proj": x_attn,
                      "self_attn.o_proj": ctx, "mlp.gate_proj": x_mlp, "mlp.up_proj": x_mlp, "mlp.down_proj": act}
            for k, x in inputs.items():
                proj = k.split(".")[1]
                name = f"base_model.model.{p}.{k}"
                A, Bm = adapter[f"{name}.lora_A.weight"], adapter[f"{name}.lora_B.weight"]
                sc = adapter["scaling"][proj]
                G = g(f"{p}.{k}")
                out[f"{name}.lora_A.weight"] = sc * outer_sum(G @ Bm, x)
                out[f"{name}.lora_B.weight"] = sc * outer_sum(G, x @ A.T)
    if adapter is None:
        h_last = s(f"model.layers.{L - 1}")
        out["model.norm.weight"] = (g("model.norm") * rms_normed(h_last, eps)).sum((0, 1))
        out["lm_head.weight"] = outer_sum(g("lm_head"), s("model.norm"))
    return out


def rms_backward(gy: np.ndarray, x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """d/dx of y = w * x / sqrt(mean(x^2) + eps), given dy."""
    r = 1.0 / np.sqrt((x * x).mean(-1, keepdims=True) + eps)
    u = gy * w
    return r * u - x * r ** 3 * (u * x).mean(-1, keepdims=True)


def rotate_half(x: np.ndarray) -> np.ndarray:
    h = x.shape[-1] // 2
    return np.concatenate((-x[..., h:], x[..., :h]), -1)


def site_gradient_chain(a: dict, w: dict, m: dict, adapter: dict | None) -> dict:
    """Each ``grad.<site>`` recomputed in float64 from the gradients of the sites it feeds
    (the backward of one op at a time, from ``grad.lm_head`` down), against the dumped one:
    {site: rel-L2}. A LoRA'd projection's input gradient uses W + s·B·A."""
    cfg = m["model"]
    L, eps = cfg["num_hidden_layers"], cfg["rms_norm_eps"]
    nH, nKV, D = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    rep_n = nH // nKV
    s = lambda k: np.asarray(a[f"train/{k}"], np.float64)  # noqa: E731
    g = lambda k: np.asarray(a[f"train/grad.{k}"], np.float64)  # noqa: E731

    def W(p, proj):
        wt = np.asarray(w[f"{p}.{proj}.weight"], np.float64)
        if adapter is not None:
            name = f"base_model.model.{p}.{proj}"
            if f"{name}.lora_A.weight" in adapter:
                sc = adapter["scaling"][proj.split(".")[-1]]
                wt = wt + sc * adapter[f"{name}.lora_B.weight"] @ adapter[f"{name}.lora_A.weight"]
        return wt

    out = {}

    def check(site, want):
        out[site] = rel(g(site), want)

    B, T = np.asarray(m["scenario"]["input_ids"]).shape
    cos, sin = s("model.rotary_emb.cos")[:, None], s("model.rotary_emb.sin")[:, None]  # [B,1,T,D]
    check("model.norm", g("lm_head") @ np.asarray(w["lm_head.weight"], np.float64))
    check(f"model.layers.{L - 1}", rms_backward(g("model.norm"), s(f"model.layers.{L - 1}"),
                                                np.asarray(w["model.norm.weight"], np.float64), eps))
    for i in reversed(range(L)):
        p = f"model.layers.{i}"
        h_in = s("model.embed_tokens") if i == 0 else s(f"model.layers.{i - 1}")
        h_mid = h_in + s(f"{p}.self_attn.o_proj")
        x_mlp = s(f"{p}.post_attention_layernorm")
        d_out = g(p)
        check(f"{p}.mlp", d_out)
        wg, wu, wd = W(p, "mlp.gate_proj"), W(p, "mlp.up_proj"), W(p, "mlp.down_proj")
        gate, up = x_mlp @ wg.T, x_mlp @ wu.T
        d_act = g(f"{p}.mlp") @ wd
        d_gate, d_up = d_act * up * dsilu(gate), d_act * silu(gate)
        if adapter is not None:
            check(f"{p}.mlp.down_proj", g(f"{p}.mlp"))
            check(f"{p}.mlp.gate_proj", d_gate)
            check(f"{p}.mlp.up_proj", d_up)
        check(f"{p}.post_attention_layernorm", d_gate @ wg + d_up @ wu)
        d_mid = d_out + rms_backward(g(f"{p}.post_attention_layernorm"), h_mid,
                                     np.asarray(w[f"{p}.post_attention_layernorm.weight"], np.float64), eps)
        check(f"{p}.self_attn.o_proj", d_mid)
        check(f"{p}.self_attn.context", g(f"{p}.self_attn.o_proj") @ W(p, "self_attn.o_proj"))
        heads = lambda t, n: t.reshape(B, T, n, D).transpose(0, 2, 1, 3)  # noqa: E731
        unheads = lambda t: t.transpose(0, 2, 1, 3).reshape(B, T, -1)  # noqa: E731
        d_ctx = heads(g(f"{p}.self_attn.context"), nH)
        v = np.repeat(heads(s(f"{p}.self_attn.v_proj"), nKV), rep_n, axis=1)
        probs = s(f"{p}.self_attn.probs")
        check(f"{p}.self_attn.probs", d_ctx @ v.transpose(0, 1, 3, 2))
        d_v = (probs.transpose(0, 1, 3, 2) @ d_ctx).reshape(B, nKV, rep_n, T, D).sum(2)
        check(f"{p}.self_attn.v_proj", unheads(d_v))
        gp = g(f"{p}.self_attn.probs")
        d_scores = probs * (gp - (gp * probs).sum(-1, keepdims=True)) * D ** -0.5
        q, k = s(f"{p}.self_attn.q_rope"), np.repeat(s(f"{p}.self_attn.k_rope"), rep_n, axis=1)
        check(f"{p}.self_attn.q_rope", d_scores @ k)
        check(f"{p}.self_attn.k_rope", (d_scores.transpose(0, 1, 3, 2) @ q).reshape(B, nKV, rep_n, T, D).sum(2))
        for proj, n in (("q", nH), ("k", nKV)):
            gr = g(f"{p}.self_attn.{proj}_rope")
            check(f"{p}.self_attn.{proj}_proj", unheads(gr * cos - rotate_half(gr * sin)))
        if adapter is not None:
            for proj in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
                check(f"{p}.{proj}.lora", g(f"{p}.{proj}"))
        check(f"{p}.input_layernorm", sum(g(f"{p}.self_attn.{x}_proj") @ W(p, f"self_attn.{x}_proj")
                                          for x in ("q", "k", "v")))
        d_in = d_mid + rms_backward(g(f"{p}.input_layernorm"), h_in,
                                    np.asarray(w[f"{p}.input_layernorm.weight"], np.float64), eps)
        check("model.embed_tokens" if i == 0 else f"model.layers.{i - 1}", d_in)
    return out


def load_adapter(d: Path, m: dict) -> dict | None:
    ad = m.get("adapter")
    if ad is None:
        return None
    root = d / ad["path"]
    cfg = json.loads((root / "adapter_config.json").read_text())
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern") or cfg.get("use_rslora"):
        raise Bad(f"{root}: rank/alpha patterns and rsLoRA are not handled by this check")
    t = {k: np.asarray(v, np.float64) for k, v in load_file(str(root / "adapter_model.safetensors")).items()}
    t["scaling"] = {proj: cfg["lora_alpha"] / cfg["r"] for proj in cfg["target_modules"]}
    return t


def verify(d: Path) -> tuple[bool, list[str]]:
    m = json.loads((d / "manifest.json").read_text())
    tr = m.get("train")
    if tr is None:
        raise Bad(f"{d / 'manifest.json'}: no train field")
    a = load_file(str(d / "activations.safetensors"))
    # a candidate carries no weights: those of its golden (fixtures/train/golden/<scenario>)
    wdir = d if (d / "weights.safetensors").exists() else REPO / "fixtures/train/golden" / m["scenario"]["name"]
    w32 = load_file(str(wdir / "weights.safetensors"))
    adapter = load_adapter(d if (d / "adapter").exists() else wdir, m)
    bounds = BOUNDS["float32" if m["dtype"] == "float32" else "float16"]
    lines, ok = [], True

    def report(what, err, bound):
        nonlocal ok
        good = err <= bound
        ok &= good
        lines.append(f"  {what:<44} {err:10.3g}  (bound {bound:g}){'' if good else '  FAIL'}")

    labels = np.asarray(tr["labels"])
    N = tr["micro_batches"]
    ls = tr["loss_scale"]
    scale = ls["value"] if ls["kind"] != "none" else 1.0
    logits = np.asarray(a["train/lm_head"], np.float64)
    loss64, dlogits = loss_and_logit_grad(logits, labels, N)
    report("loss (rel)", abs(float(a["train/loss"]) - loss64) / abs(loss64), bounds["loss"])
    glm = np.asarray(a["train/grad.lm_head"], np.float64)
    fin = np.isfinite(glm)
    if m["dtype"] == "float16" and scale != 1.0:
        over = np.abs(dlogits * scale) >= F16_MAX_FINITE
        if not np.array_equal(~fin, over):
            ok = False
            lines.append(f"  grad.lm_head non-finite elements {int((~fin).sum())} are not those whose scaled "
                         f"value leaves float16 ({int(over.sum())})  FAIL")
        elif over.any():
            lines.append(f"  grad.lm_head: the {int(over.sum())} elements whose scaled value leaves float16 are "
                         f"the non-finite ones (smallest such |scaled|: "
                         f"{np.abs(dlogits * scale)[over].min():.6g}, largest kept: "
                         f"{np.abs(dlogits * scale)[~over].max():.6g})")
    report("grad.lm_head (rel, finite part)", rel(glm[fin], dlogits[fin]), bounds["grad.lm_head"])

    if np.isfinite(glm).all():
        chain = site_gradient_chain(a, w32, m, adapter)
        want = {k[len("train/grad."):] for k in a if k.startswith("train/grad.")} - {"lm_head"}
        if set(chain) != want:
            raise Bad(f"{d}: site gradients recomputed {sorted(set(chain) ^ want)[:4]} differ from the dumped ones")
        worst = max(chain, key=chain.get)
        report(f"grad.<site> chain, worst of {len(chain)} (rel) {worst.split('layers.')[-1][:20]}",
               chain[worst], bounds["grad_chain"])
    else:
        lines.append("  grad.<site> chain not checked (non-finite site gradients)")
    names = [k[len("train/param_grad."):] for k in a if k.startswith("train/param_grad.")]
    gn = float(a["train/grad_norm"])
    if not np.isfinite(gn):
        lines.append(f"  grad_norm {gn}: a skipped step")
        for n in names:
            pg = np.asarray(a[f"train/param_grad.{n}"], np.float64)
            w = adapter[n] if adapter is not None else np.asarray(w32[n], np.float64)
            if not np.array_equal(np.asarray(a[f"train/update.{n}"], np.float64), w):
                ok = False
                lines.append(f"  update.{n} differs from the weight in a skipped step  FAIL")
            if not np.all(np.isnan(pg) | (pg == 0)):
                ok = False
                lines.append(f"  param_grad.{n} holds finite non-zero values after clipping by a non-finite norm  FAIL")
        nls = m["producer"].get("next_loss_scale")
        if ls["kind"] == "dynamic":
            good = nls == ls["value"] / 2
            ok &= good
            lines.append(f"  next_loss_scale {nls} (half of {ls['value']}){'' if good else '  FAIL'}")
        lines.append("  every update equals its weight; every param_grad is 0 or NaN")
        return ok, lines

    raw = param_grads_from_sites(a, w32, m, adapter)
    if set(raw) != set(names):
        raise Bad(f"{d}: parameters recomputed {sorted(set(raw) ^ set(names))[:4]} differ from the dumped ones")
    norm64 = float(np.sqrt(sum(float((raw[n] ** 2).sum()) for n in names)))
    report("grad_norm (rel)", abs(gn - norm64) / norm64, bounds["grad_norm"])
    mg = tr["max_grad_norm"]
    coef = 1.0 if mg is None else min(1.0, mg / (norm64 + 1e-6))
    coef_dumped = 1.0 if mg is None else min(1.0, mg / (gn + 1e-6))
    worst = max(names, key=lambda n: rel(a[f"train/param_grad.{n}"], coef * raw[n]))
    report(f"param_grad worst (rel) {worst.split('model.')[-1][:28]}",
           rel(a[f"train/param_grad.{worst}"], coef * raw[worst]), bounds["param_grad"])
    clipped_norm = float(np.sqrt(sum(float((np.asarray(a[f"train/param_grad.{n}"], np.float64) ** 2).sum())
                                     for n in names)))
    report("norm of param_grad vs grad_norm * factor (rel)", abs(clipped_norm - gn * coef_dumped) / (gn * coef_dumped),
           1e-5)
    if mg is not None:
        lines.append(f"  grad_norm {gn:.6g} vs max_grad_norm {mg}: clipping factor {coef_dumped:.6g}")

    o = tr["optimizer"]
    lr, (b1, b2), eps, wd = o["lr"], o["betas"], o["eps"], o["weight_decay"]
    worst_ulp, worst_abs, worst_step, worst_name = 0.0, 0.0, 0.0, ""
    for n in names:
        w = adapter[n] if adapter is not None else np.asarray(w32[n], np.float64)
        g = np.asarray(a[f"train/param_grad.{n}"], np.float64)
        decay = 0.0 if any(fnmatch.fnmatchcase(n, pat) for pat in o["no_decay"]) else wd
        mom, var = (1 - b1) * g, (1 - b2) * g * g
        want = w * (1 - lr * decay) - (lr / (1 - b1)) * mom / (np.sqrt(var) / np.sqrt(1 - b2) + eps)
        got = np.asarray(a[f"train/update.{n}"], np.float64)
        # float32 rounding: |update - float64 AdamW| in units of one float32 spacing at the
        # parameter's size plus one float32 relative rounding (2^-23) of the step itself
        ulp = (np.spacing(np.maximum(np.abs(want), np.abs(w)).astype(np.float32)).astype(np.float64)
               + np.abs(want - w) * 2.0 ** -23)
        e_ulp = float((np.abs(got - want) / ulp).max())
        worst_abs = max(worst_abs, float(np.abs(got - want).max()))
        if e_ulp > worst_ulp:
            worst_ulp, worst_step, worst_name = e_ulp, float(np.abs(want - w).max()), n
    report(f"update worst (f32 roundings) {worst_name.split('model.')[-1][:22]}", worst_ulp, bounds["update_ulp"])
    lines.append(f"  (largest |update - float64 AdamW| {worst_abs:.3g}; that parameter's largest step {worst_step:.3g})")
    return ok, lines


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    dirs = [Path(x) for x in args] or sorted((REPO / "fixtures" / "train" / "golden").iterdir())
    all_ok = True
    for d in dirs:
        try:
            ok, lines = verify(d)
        except (OSError, KeyError, ValueError, Bad) as e:
            print(f"error: {d}: {e}", file=sys.stderr)
            return 2
        all_ok &= ok
        print(f"{d.name}: {'ok' if ok else 'FAILED'}")
        print("\n".join(lines))
    print("verify_train: all goldens within bounds" if all_ok else "verify_train: FAILED")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
