"""One training step (CONTRACT §6, docs/training.md) with HF transformers, torch autograd,
``torch.nn.utils.clip_grad_norm_``, ``torch.amp.GradScaler`` and ``torch.optim.AdamW``.

A training scenario is an inference scenario (``fixtures/scenarios/train_*.json``, read by
``generate.load_scenario``) with a ``train`` block. ``generate.run_scenario`` builds the model,
its weights, its adapter and any planted §3 fault exactly as for an inference golden, then
hands the prepared run to :func:`train_step` instead of the prefill and decode loop:

- forward: the prefill (``position_ids = cumsum(mask) - 1``, padding slots 1, left padding)
  through ``LlamaForCausalLM(..., labels=...)`` in ``train()`` mode, without a cache; every
  §1 site (k_cache / v_cache left out) and §5's optional sites are recorded by the inference
  recorder, which also hands over the tensor each site is in the autograd graph;
- ``loss``: HF's ``ForCausalLMLoss`` (``outputs.loss``), checked against a cross entropy
  computed here; with micro-batches the mean of the micro-batch losses;
- ``grad.<site>``: taken with ``Tensor.register_hook`` on the site's tensor during the
  backward of ``loss / N`` (times the loss scale), divided by the scale, float32;
- ``grad_norm``: what ``clip_grad_norm_`` returns (after ``GradScaler.unscale_``);
- ``param_grad.<name>`` / ``update.<name>``: each trainable parameter's float32 gradient after
  unscaling and clipping, and the parameter after ``AdamW.step()`` (``GradScaler.step`` under a
  loss scale: skipped when a gradient is not finite).

Mixed precision (dtype float16 / bfloat16): the model is ``model.to(dtype)`` of the float32
initialisation (forward and backward in that dtype); float32 master copies of the parameters
hold the float32 initial weights, receive ``param.grad.float()`` and are what the optimizer
steps.

Faulty candidates (``TRAIN_CANDIDATES``) run the same code with one seam changed: the §6
faults (``train.*``), training faults outside the contract (``other.*``), or a §3 forward
fault planted by ``generate.run_scenario``'s own machinery.
"""
from __future__ import annotations

import fnmatch
import math
import tempfile
from pathlib import Path

import safetensors.torch
import torch
import torch.nn.functional as F

import generate as gen

TRAIN_DIR = gen.REPO / "fixtures" / "train"
TRAIN_CHECKSUMS_NAME = "CHECKSUMS"

# The training goldens, in the order they are written (fixtures/scenarios/<name>.json).
TRAIN_GOLDENS = ["train_full_f32", "train_adapter_f32", "train_micro_f32", "train_scaled_f16", "train_overflow_f16"]

# Scenario ``train`` keys (the manifest's §6 ``train`` field is made from them).
TRAIN_KEYS = {"prompt_tokens", "micro_batches", "trainable", "optimizer", "max_grad_norm", "loss_scale"}

TRAIN_FAULTS = {
    "train.labels_unshifted": "ForCausalLMLoss called with shift_labels=labels: logits at t paired with label t",
    "train.ignore_index_counted": "ForCausalLMLoss called with num_items_in_batch = B*(P-1): the cross entropy "
                                  "summed over the labelled positions, divided by every shifted position "
                                  "(-100 ones included)",
    "train.loss_scale_kept": "GradScaler.unscale_ never called: gradients (and grad.<site>) stay multiplied by the "
                             "loss scale through clipping and AdamW (the overflow check still made)",
    "train.overflow_applied": "AdamW.step() called directly instead of GradScaler.step(): the step whose "
                              "float16 gradients overflowed is applied",
    "train.weight_decay_everywhere": "AdamW built with one parameter group: weight_decay on every parameter, "
                                     "no_decay ignored",
    "train.clip_per_parameter": "clip_grad_norm_([p], max_grad_norm) for each parameter in turn instead of once "
                                "over all of them (grad_norm still the global norm)",
    "train.adam_no_bias_correction": "AdamW written without bias correction: p -= lr * m / (sqrt(v) + eps), "
                                     "decoupled weight decay kept",
    "train.micro_batches_summed": "each micro-batch's loss back-propagated without the 1/N: gradients summed "
                                  "(loss still reported as the mean)",
}
OTHER_FAULTS = {
    "other.loss_sum": "cross entropy reduced by sum instead of mean (ForCausalLMLoss with num_items_in_batch=1)",
    "other.adam_eps_inside_sqrt": "AdamW denominator sqrt(v_hat + eps) instead of sqrt(v_hat) + eps",
    "other.lr_warmup": "a LambdaLR warmup (factor (step + 1) / 8) applied: the first step runs at lr / 8",
    "other.grads_not_zeroed": "the backward run twice without zeroing the gradients (a warm-up pass whose "
                              "gradients were kept): parameter gradients doubled before clipping",
    "other.clip_before_unscale": "clip_grad_norm_ called on the scaled gradients, GradScaler.unscale_ after it: "
                                 "grad_norm is the scaled norm and clipping acts at the scaled size",
    "other.token_weighted_micro": "each micro-batch's summed cross entropy divided by the whole batch's count of "
                                  "labels, the micro-batch losses summed (HF Trainer's num_items_in_batch "
                                  "accumulation) instead of the mean of the micro-batch means",
}
# §3 forward faults a training step plants through generate.run_scenario.
FORWARD_FAULTS = ("mask.padding_ignored", "rope.interleaved")

# (golden, fault) of each candidate; written to candidates/<golden>__<fault with '.' -> '_'>.
TRAIN_CANDIDATES = [
    ("train_full_f32", "train.labels_unshifted"),
    ("train_full_f32", "train.ignore_index_counted"),
    ("train_full_f32", "train.weight_decay_everywhere"),
    ("train_full_f32", "train.clip_per_parameter"),
    ("train_full_f32", "train.adam_no_bias_correction"),
    ("train_micro_f32", "train.micro_batches_summed"),
    ("train_scaled_f16", "train.loss_scale_kept"),
    ("train_overflow_f16", "train.overflow_applied"),
    ("train_adapter_f32", "train.weight_decay_everywhere"),
    ("train_adapter_f32", "train.labels_unshifted"),
    ("train_full_f32", "other.loss_sum"),
    ("train_full_f32", "other.adam_eps_inside_sqrt"),
    ("train_full_f32", "other.lr_warmup"),
    ("train_full_f32", "other.grads_not_zeroed"),
    ("train_scaled_f16", "other.clip_before_unscale"),
    ("train_micro_f32", "other.token_weighted_micro"),
    ("train_full_f32", "mask.padding_ignored"),
    ("train_full_f32", "rope.interleaved"),
]

# Forward sites without a gradient (CONTRACT §6).
NO_GRAD_SITES = ("inputs.position_ids", "model.rotary_emb.cos", "model.rotary_emb.sin", "model.mask")
CACHE_PARTS = (".self_attn.k_cache", ".self_attn.v_cache")
IGNORE = -100


def candidate_dirname(golden: str, fault: str) -> str:
    slug = fault.replace(".", "_")
    if fault.startswith("other."):
        slug = "other_" + fault.split(".", 1)[1]
    return f"{golden}__{slug}"


def describe(fault: str) -> str:
    return {**TRAIN_FAULTS, **OTHER_FAULTS, **gen.FAULTS}[fault]


# --------------------------------------------------------------------------- scenario

def load_train_scenario(name: str) -> dict:
    path = gen.SCENARIO_DIR / f"{name}.json"
    sc = gen.load_scenario(path)
    tr = sc.get("train")
    if not isinstance(tr, dict):
        raise SystemExit(f"{path}: a training scenario needs a 'train' object")
    unknown = sorted(set(tr) - TRAIN_KEYS)
    missing = sorted(TRAIN_KEYS - set(tr))
    if unknown or missing:
        raise SystemExit(f"{path}: train keys unknown {unknown}, missing {missing}")
    if sc["decode_steps"] != 0:
        raise SystemExit(f"{path}: a training scenario has decode_steps 0")
    if sc["batch"] % tr["micro_batches"]:
        raise SystemExit(f"{path}: micro_batches {tr['micro_batches']} does not split batch {sc['batch']}")
    if tr["trainable"] not in ("all", "adapter"):
        raise SystemExit(f"{path}: train.trainable must be 'all' or 'adapter'")
    if (tr["trainable"] == "adapter") != (sc.get("adapter") is not None):
        raise SystemExit(f"{path}: trainable 'adapter' goes with an adapter block, 'all' without")
    ls = tr["loss_scale"]
    if ls.get("kind") not in ("none", "static", "dynamic"):
        raise SystemExit(f"{path}: train.loss_scale.kind must be none, static or dynamic")
    if ls["kind"] != "none":
        v = float(ls["value"])
        if v <= 0 or math.frexp(v)[0] != 0.5:
            # GradScaler unscales by multiplying with 1/value: exact (the division of
            # docs/training.md) only for a power of two
            raise SystemExit(f"{path}: train.loss_scale.value must be a power of two")
    if sc["dtype"] != "float32" and tr["trainable"] != "all":
        raise SystemExit(f"{path}: mixed precision is made for trainable 'all' only")
    return sc


def make_labels(ids: torch.Tensor, mask: torch.Tensor, prompt_tokens: int) -> torch.Tensor:
    """labels = input_ids, -100 on padding and on the first ``prompt_tokens`` real tokens of each row."""
    labels = ids.clone()
    for b in range(ids.shape[0]):
        first_real = int((mask[b] == 0).sum())
        labels[b, :first_real + prompt_tokens] = IGNORE
    return labels


def manifest_train(sc: dict, labels: torch.Tensor) -> dict:
    tr = sc["train"]
    o = tr["optimizer"]
    ls = tr["loss_scale"]
    return {
        "labels": labels.tolist(),
        "micro_batches": int(tr["micro_batches"]),
        "trainable": tr["trainable"],
        "optimizer": {"name": "adamw", "lr": float(o["lr"]), "betas": [float(b) for b in o["betas"]],
                      "eps": float(o["eps"]), "weight_decay": float(o["weight_decay"]),
                      "no_decay": list(o["no_decay"])},
        "max_grad_norm": None if tr["max_grad_norm"] is None else float(tr["max_grad_norm"]),
        "loss_scale": {"kind": ls["kind"], "value": float(ls.get("value", 1.0))},
    }


def in_no_decay(name: str, globs: list) -> bool:
    return any(fnmatch.fnmatchcase(name, g) for g in globs)


def peft_stored_name(name: str) -> str:
    """``model.layers.0.self_attn.q_proj.lora_A.default.weight`` (named_parameters of the LoRA'd
    Llama) -> ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`` (as stored)."""
    return "base_model.model." + name.replace(f".{gen.adapters.ADAPTER_NAME}.", ".")


# --------------------------------------------------------------------------- the step

def hf_loss(model, logits, labels, **kw) -> torch.Tensor:
    """HF's ForCausalLMLoss, as LlamaForCausalLM.forward calls it."""
    return model.loss_function(logits=logits, labels=labels, vocab_size=model.config.vocab_size, **kw)


def check_loss(loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> dict:
    """HF's loss against a cross entropy computed here: float32 (same arithmetic) and float64."""
    V = logits.shape[-1]
    tgt = labels[:, 1:].reshape(-1)
    mine32 = F.cross_entropy(logits.detach().float()[:, :-1].reshape(-1, V), tgt, ignore_index=IGNORE)
    lg = logits.detach().double()[:, :-1].reshape(-1, V)
    keep = tgt != IGNORE
    mine64 = (torch.logsumexp(lg[keep], -1) - lg[keep].gather(1, tgt[keep, None])[:, 0]).mean()
    d32 = abs(loss.item() - mine32.item())
    d64 = abs(loss.item() - mine64.item())
    if d32 > 1e-6 * abs(mine32.item()) or d64 > 1e-5 * abs(mine64.item()):
        raise RuntimeError(f"HF loss {loss.item()!r} differs from the cross entropy computed here "
                           f"({mine32.item()!r} float32, {mine64.item()!r} float64)")
    return {"abs_diff_float32": d32, "abs_diff_float64": d64}


def manual_adamw(groups: list, lr: float, betas, eps: float, bias_correction: bool, eps_inside: bool) -> None:
    """AdamW's first step from zero moments, written out (the fault variants of torch's)."""
    b1, b2 = betas
    with torch.no_grad():
        for grp in groups:
            for p in grp["params"]:
                g = p.grad
                p.mul_(1 - lr * grp["weight_decay"])
                m = (1 - b1) * g
                v = (1 - b2) * g * g
                if bias_correction:
                    bc1, bc2 = 1 - b1, 1 - b2
                else:
                    bc1, bc2 = 1.0, 1.0
                if eps_inside:
                    denom = (v / bc2 + eps).sqrt()
                else:
                    denom = v.sqrt() / math.sqrt(bc2) + eps
                p.addcdiv_(m, denom, value=-lr / bc1)


def train_step(ctx: dict, sc: dict, fault: str | None, info: dict) -> dict:
    """Runs one training step on the prepared run ``ctx`` (generate.run_scenario) and returns
    its activations {"train/<site>": tensor}. ``info`` receives what the manifest records."""
    tr = sc["train"]
    model, rec, cfg, dtype = ctx["model"], ctx["recorder"], ctx["config"], ctx["dtype"]
    ids, mask, pos = ctx["ids"], ctx["mask"], ctx["position_ids"]
    B, P = ids.shape
    N = int(tr["micro_batches"])
    rows = B // N
    labels = make_labels(ids, mask, int(tr["prompt_tokens"]))
    info["labels"] = labels
    o = tr["optimizer"]
    ls = tr["loss_scale"]
    adapter = tr["trainable"] == "adapter"

    model.train()
    # trainable parameters, named as §6 names them, in named_parameters() order
    named = []
    for name, p in model.named_parameters():
        is_lora = ".lora_A." in name or ".lora_B." in name
        train_it = is_lora if adapter else True
        p.requires_grad_(train_it)
        if train_it:
            named.append((peft_stored_name(name) if adapter else name, p))
    if adapter:
        stored = set(safetensors.torch.load(ctx["adapter_files"]["adapter_model.safetensors"]))
        if {n for n, _ in named} != stored:
            raise RuntimeError(f"adapter parameter names differ from adapter_model.safetensors: "
                               f"{sorted({n for n, _ in named} ^ stored)[:4]}")
        # the embedding output requires grad, so that d loss / d site reaches the first sites
        model.enable_input_require_grads()
    if dtype == torch.float32:
        masters = named
    else:
        w32 = ctx["weights32"]
        masters = [(n, torch.nn.Parameter(w32[n].clone())) for n, _ in named]
    model.zero_grad(set_to_none=True)

    scaler = None
    if ls["kind"] != "none":
        # GradScaler's defaults (growth 2, backoff 0.5, interval 2000): a one-step run never grows
        # the scale; a static scale is the same object whose next scale is not reported
        scaler = torch.amp.GradScaler("cpu", init_scale=float(ls["value"]))
    scale = float(ls["value"]) if scaler is not None else 1.0

    # ---- forward and backward, micro-batch by micro-batch
    values: list[dict] = []
    grads: list[dict] = []
    losses = []
    loss_checks = []
    total_labels = int((labels[:, 1:] != IGNORE).sum())
    for k in range(N):
        sl = slice(k * rows, (k + 1) * rows)
        rec.cur, rec.graph = {}, []
        rec.put("inputs.position_ids", pos[sl].to(torch.int64))
        out = model(input_ids=ids[sl], attention_mask=mask[sl], position_ids=pos[sl], labels=labels[sl],
                    use_cache=False)
        cur, graph = rec.cur, rec.graph
        rec.cur, rec.graph = None, None
        for key in [s for s in cur if s.endswith(CACHE_PARTS)]:
            del cur[key]
        loss_checks.append(check_loss(out.loss, out.logits, labels[sl]))
        if fault == "train.labels_unshifted":
            loss_k = hf_loss(model, out.logits, labels[sl], shift_labels=labels[sl])
        elif fault == "train.ignore_index_counted":
            loss_k = hf_loss(model, out.logits, labels[sl], num_items_in_batch=torch.tensor(rows * (P - 1)))
        elif fault == "other.loss_sum":
            loss_k = hf_loss(model, out.logits, labels[sl], num_items_in_batch=torch.tensor(1))
        elif fault == "other.token_weighted_micro":
            loss_k = hf_loss(model, out.logits, labels[sl], num_items_in_batch=torch.tensor(total_labels))
        else:
            loss_k = out.loss
        losses.append(loss_k.detach())

        g: dict = {}
        refire = fault == "other.grads_not_zeroed"

        def hook(key, gmap):
            def f(grad):
                if key in g:
                    if not refire:
                        raise RuntimeError(f"gradient of {key} taken twice")
                    return
                gg = grad if gmap is None else gmap(grad)
                g[key] = gg.detach().clone().contiguous()
            return f

        for key, t, gmap in graph:
            if key in NO_GRAD_SITES or key.endswith(CACHE_PARTS):
                continue
            if not t.requires_grad:
                raise RuntimeError(f"site {key} is not in the autograd graph")
            t.register_hook(hook(key, gmap))
        obj = loss_k
        if N > 1 and fault not in ("train.micro_batches_summed", "other.token_weighted_micro"):
            obj = loss_k / N
        if scaler is not None:
            obj = scaler.scale(obj)
        if fault == "other.grads_not_zeroed":
            obj.backward(retain_graph=True)
        obj.backward()
        want = {s for s in cur if s not in NO_GRAD_SITES}
        if set(g) != want:
            raise RuntimeError(f"gradients taken {sorted(set(g) ^ want)[:4]} differ from the sites")
        div = 1.0 if fault == "train.loss_scale_kept" else scale
        grads.append({s: (t.float() / div) if div != 1.0 else t.float() for s, t in g.items()})
        values.append(cur)

    if N == 1:
        loss = losses[0].float()
    elif fault == "other.token_weighted_micro":
        loss = torch.stack(losses).sum()
    else:
        loss = torch.stack(losses).mean()
    info["loss_check"] = loss_checks
    info["nonfinite_grad_sites"] = {s: int((~torch.isfinite(t)).sum()) for gd in grads for s, t in gd.items()
                                    if not torch.isfinite(t).all()}

    # ---- gradients to the float32 master weights, unscaling, clipping
    if masters is not named:
        for (n, m), (_, p) in zip(masters, named):
            if p.grad is None:
                raise RuntimeError(f"{n}: no gradient")
            m.grad = p.grad.detach().float()
    params = [m for _, m in masters]
    for n, m in masters:
        if m.grad is None:
            raise RuntimeError(f"{n}: no gradient")

    wd = float(o["weight_decay"])
    if fault == "train.weight_decay_everywhere":
        groups = [{"params": params, "weight_decay": wd}]
    else:
        decay = [m for n, m in masters if not in_no_decay(n, o["no_decay"])]
        nd = [m for n, m in masters if in_no_decay(n, o["no_decay"])]
        groups = [grp for grp in ({"params": decay, "weight_decay": wd}, {"params": nd, "weight_decay": 0.0})
                  if grp["params"]]
    info["no_decay"] = [n for n, _ in masters if in_no_decay(n, o["no_decay"])]
    opt = torch.optim.AdamW(groups, lr=float(o["lr"]), betas=tuple(o["betas"]), eps=float(o["eps"]),
                            weight_decay=wd, foreach=False)
    max_norm = tr["max_grad_norm"]

    def clip(ps):
        if max_norm is None:
            return torch.nn.utils.get_total_norm([p.grad for p in ps])
        return torch.nn.utils.clip_grad_norm_(ps, float(max_norm), foreach=False)

    if fault == "other.clip_before_unscale":
        grad_norm = clip(params)
        scaler.unscale_(opt)
    else:
        if scaler is not None and fault != "train.loss_scale_kept":
            scaler.unscale_(opt)
        if fault == "train.clip_per_parameter":
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
            for p in params:
                torch.nn.utils.clip_grad_norm_([p], float(max_norm), foreach=False)
        else:
            grad_norm = clip(params)
    grad_norm = grad_norm.detach().float()
    info["grad_norm"] = float(grad_norm)
    info["clipped"] = max_norm is not None and bool(torch.isfinite(grad_norm)) and float(grad_norm) > max_norm
    param_grad = {n: m.grad.detach().clone().contiguous() for n, m in masters}
    finite = all(bool(torch.isfinite(m.grad).all()) for m in params)

    # ---- the optimizer
    manual = {"train.adam_no_bias_correction": (False, False), "other.adam_eps_inside_sqrt": (True, True)}
    if fault == "other.lr_warmup":
        torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / 8)
    if fault in manual:
        bc, inside = manual[fault]
        manual_adamw(groups, float(o["lr"]), tuple(o["betas"]), float(o["eps"]), bc, inside)
        skipped = False
    elif scaler is not None and fault not in ("train.overflow_applied", "train.loss_scale_kept"):
        scaler.step(opt)
        skipped = not finite
    elif fault == "train.loss_scale_kept" and not finite:
        skipped = True
    else:
        opt.step()
        skipped = False
    if scaler is not None and fault != "train.loss_scale_kept":
        scaler.update()
        if ls["kind"] == "dynamic":
            info["next_loss_scale"] = float(scaler.get_scale())
    info["skipped"] = skipped
    info["finite"] = finite
    update = {n: m.detach().clone().contiguous().float() for n, m in masters}

    # ---- the activations of step "train"
    acts = {}
    for site in values[0]:
        acts[f"train/{site}"] = torch.cat([v[site] for v in values], dim=0) if N > 1 else values[0][site]
    acts["train/loss"] = loss.reshape(())
    for site in grads[0]:
        acts[f"train/grad.{site}"] = torch.cat([v[site] for v in grads], dim=0) if N > 1 else grads[0][site]
    acts["train/grad_norm"] = grad_norm.reshape(())
    for n, t in param_grad.items():
        acts[f"train/param_grad.{n}"] = t
    for n, t in update.items():
        acts[f"train/update.{n}"] = t
    info["params"] = [n for n, _ in masters]
    check_train_sites(cfg, acts, B, P, dtype, ctx["lora_spec"], info["params"])
    return acts


def check_train_sites(cfg, acts: dict, B: int, P: int, dtype, lora_spec, params: list) -> None:
    """Exactly the sites of CONTRACT §6 with their shapes and dtypes."""
    fwd = {k: v for k, v in gen.site_shapes(cfg, B, P, P).items() if not k.endswith(CACHE_PARTS)}
    fwd.update(gen.adapter_site_shapes(cfg, B, P, lora_spec))
    want = {f"train/{k}": (v, torch.int64 if k == "inputs.position_ids" else dtype) for k, v in fwd.items()}
    want["train/loss"] = ((), torch.float32)
    for k, v in fwd.items():
        if k not in NO_GRAD_SITES:
            want[f"train/grad.{k}"] = (v, torch.float32)
    want["train/grad_norm"] = ((), torch.float32)
    for n in params:
        want[f"train/param_grad.{n}"] = (None, torch.float32)
        want[f"train/update.{n}"] = (None, torch.float32)
    if set(want) != set(acts):
        raise RuntimeError(f"train sites missing {sorted(set(want) - set(acts))[:4]}, "
                           f"unexpected {sorted(set(acts) - set(want))[:4]}")
    for k, (shape, dt) in want.items():
        t = acts[k]
        if shape is not None and tuple(t.shape) != tuple(shape):
            raise RuntimeError(f"{k}: shape {tuple(t.shape)}, contract wants {tuple(shape)}")
        if t.dtype != dt:
            raise RuntimeError(f"{k}: dtype {t.dtype}, want {dt}")


# --------------------------------------------------------------------------- one dump

def run_train(name: str, fault: str | None = None):
    """(manifest, activations, weights before the step (float32), adapter files) of golden
    ``name`` or of its candidate carrying ``fault``."""
    sc = load_train_scenario(name)
    if fault is not None and fault not in TRAIN_FAULTS and fault not in OTHER_FAULTS \
            and fault not in FORWARD_FAULTS:
        raise SystemExit(f"unknown training fault {fault!r}")
    info: dict = {}
    holder: dict = {}

    def runner(ctx):
        holder["weights32"] = ctx["weights32"]
        return train_step(ctx, sc, fault if fault not in FORWARD_FAULTS else None, info)

    m, acts, _, adapter_files = gen.run_scenario(sc, fault if fault in FORWARD_FAULTS else None, runner=runner)
    B = sc["batch"]
    m["steps"] = ["train"]
    m["scenario"]["decode_ids"] = [[] for _ in range(B)]
    m["train"] = manifest_train(sc, info["labels"])
    if sc.get("adapter") is not None:
        m["adapter"] = {"path": "adapter", "merged": False}
    prod = m["producer"]
    prod["generator"] = "golden/generate.py --train"
    ls = sc["train"]["loss_scale"]
    prod["train"] = {
        "how": "LlamaForCausalLM(labels=...).loss (ForCausalLMLoss) in train() mode, use_cache=False; "
               "Tensor.register_hook on every site; loss/N per micro-batch"
               + (", torch.amp.GradScaler(\"cpu\") scale/unscale_/step/update" if ls["kind"] != "none" else "")
               + "; clip_grad_norm_(foreach=False); torch.optim.AdamW(foreach=False), two groups (decay, no_decay)"
               + ("; forward/backward in " + sc["dtype"] + ", float32 master weights" if sc["dtype"] != "float32"
                  else ""),
        "prompt_tokens": int(sc["train"]["prompt_tokens"]),
        "loss_check": info["loss_check"],
        "clipped": info["clipped"],
        "step_skipped": info["skipped"],
        "no_decay_parameters": info["no_decay"],
        "grad_dtype": "float32 (grad.<site> taken in the compute dtype, cast, then divided by the loss scale)",
    }
    if info["nonfinite_grad_sites"]:
        prod["train"]["nonfinite_grad_elements"] = info["nonfinite_grad_sites"]
    if "next_loss_scale" in info:
        prod["next_loss_scale"] = info["next_loss_scale"]
    if fault is not None:
        if fault in OTHER_FAULTS:
            prod.pop("fault", None)
            prod["plant"] = fault
        else:
            prod["fault"] = fault
        prod["fault_description"] = describe(fault)
    weights = {k: v for k, v in holder["weights32"].items()}
    if m["model"]["tie_word_embeddings"]:
        weights.pop("lm_head.weight", None)
    return m, acts, weights, adapter_files, info


# --------------------------------------------------------------------------- comparing

def train_order(keys) -> list:
    """Site names of step train in compute order (CONTRACT §6)."""
    sites = [k.split("/", 1)[1] for k in keys]
    fwd = [s for s in sites if not (s == "loss" or s.startswith(("grad.", "param_grad.", "update."))
                                    or s == "grad_norm")]
    fwd_order = [s for _, s in gen.compute_order({f"train/{s}": None for s in fwd}, ["train"])]
    if set(fwd_order) != set(fwd):
        raise RuntimeError(f"sites outside the compute order: {sorted(set(fwd) - set(fwd_order))[:4]}")
    params = [s.split(".", 1)[1] for s in sites if s.startswith("param_grad.")]
    return (fwd_order + ["loss"] + [f"grad.{s}" for s in reversed(fwd_order) if f"grad.{s}" in sites]
            + ["grad_norm"] + [f"param_grad.{n}" for n in params] + [f"update.{n}" for n in params])


def differs(g: torch.Tensor, c: torch.Tensor) -> bool:
    """Whether ``c`` differs from ``g``: another non-finite pattern, or rel-L2 > 1e-6 on the finite part."""
    if g.shape != c.shape:
        return True
    g, c = g.double(), c.double()
    fg, fc = torch.isfinite(g), torch.isfinite(c)
    if not torch.equal(fg, fc):
        return True
    if not torch.equal(g[~fg].isnan(), c[~fc].isnan()) or not torch.equal(g[~fg & ~g.isnan()], c[~fc & ~c.isnan()]):
        return True
    g, c = g[fg], c[fc]
    return bool((c - g).norm() > 1e-6 * max(g.norm().item(), 1e-30))


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The same dtype, shape and bytes (NaN payloads included)."""
    return (a.dtype == b.dtype and a.shape == b.shape
            and a.contiguous().reshape(-1).view(torch.uint8).equal(b.contiguous().reshape(-1).view(torch.uint8)))


def first_divergence(golden: dict, cand: dict, mask: torch.Tensor):
    """The first site of step train, in compute order, where ``cand`` differs from ``golden``
    (padding query rows of [B,P,...] sites left out): ("train <site>", its rel-L2 over the
    finite elements, how many sites before it are bitwise the golden's), or None."""
    if set(golden) != set(cand):
        raise RuntimeError(f"site sets differ: {sorted(set(golden) ^ set(cand))[:4]}")
    keep = mask.bool()
    for n, site in enumerate(train_order(golden)):
        g, c = golden[f"train/{site}"], cand[f"train/{site}"]
        if g.dim() >= 2 and tuple(g.shape[:2]) == tuple(keep.shape) and "model.mask" not in site:
            g, c = g[keep], c[keep]
        if differs(g, c):
            before = train_order(golden)[:n]
            equal = sum(bitwise_equal(golden[f"train/{s}"], cand[f"train/{s}"]) for s in before)
            if equal != n:
                raise RuntimeError(f"{n - equal} sites before {site} differ below the threshold")
            fin = torch.isfinite(g.double()) & torch.isfinite(c.double())
            gd, cd = g.double()[fin], c.double()[fin]
            r = float((cd - gd).norm() / max(gd.norm().item(), 1e-300))
            return f"train {site}", r, equal
    return None


# --------------------------------------------------------------------------- the set

def golden_checks(name: str, m: dict, acts: dict, weights: dict, info: dict) -> None:
    """What each golden is made to show."""
    gn = info["grad_norm"]
    mg = m["train"]["max_grad_norm"]
    if name == "train_full_f32" and not info["clipped"]:
        raise RuntimeError(f"{name}: grad_norm {gn} does not exceed max_grad_norm {mg}: no clipping")
    if name == "train_overflow_f16":
        if info["finite"] or math.isfinite(gn) or not info["skipped"]:
            raise RuntimeError(f"{name}: the float16 gradients did not overflow (grad_norm {gn})")
        for n in info["params"]:
            if not torch.equal(acts[f"train/update.{n}"], weights[n]):
                raise RuntimeError(f"{name}: update.{n} differs from the weight of a skipped step")
    else:
        if not info["finite"] or info["skipped"]:
            raise RuntimeError(f"{name}: gradients not finite (grad_norm {gn})")
        for n in info["params"]:
            w = weights.get(n)
            if w is not None and torch.equal(acts[f"train/update.{n}"], w):
                raise RuntimeError(f"{name}: update.{n} equals the weight")


def gen_train(out: Path) -> list[Path]:
    """The training set: goldens (weights, adapter/) and HF-made faulty candidates (adapter/
    where the golden has one, no weights)."""
    written = []
    golden = {}
    for name in TRAIN_GOLDENS:
        m, acts, w, ad, info = run_train(name)
        golden_checks(name, m, acts, w, info)
        d = out / "golden" / name
        gen.write_dump(d, m, acts, w, ad if m.get("adapter") else None)
        golden[name] = (m, acts)
        written.append(d)
        extra = f", next scale {info['next_loss_scale']:g}" if "next_loss_scale" in info else ""
        print(f"wrote {d} ({len(acts)} tensors; loss {acts['train/loss'].item():.6f}, grad_norm {info['grad_norm']:.6g}, "
              f"max_grad_norm {m['train']['max_grad_norm']}, clipped {info['clipped']}, "
              f"skipped {info['skipped']}{extra})")
    for name, fault in TRAIN_CANDIDATES:
        m, acts, _, ad, info = run_train(name, fault)
        gm, gacts = golden[name]
        mask = torch.tensor(gm["scenario"]["attention_mask"])
        found = first_divergence(gacts, acts, mask)
        if found is None:
            raise RuntimeError(f"{candidate_dirname(name, fault)}: the candidate does not differ from its golden")
        first, r, equal = found
        m["producer"]["expect"] = {"fault": None if fault in OTHER_FAULTS else fault,
                                   **({"plant": fault} if fault in OTHER_FAULTS else {}), "first": first,
                                   "first_rel_l2": float(f"{r:.4g}"), "sites_before_bitwise_equal": equal}
        d = out / "candidates" / candidate_dirname(name, fault)
        gen.write_dump(d, m, acts, None, ad if m.get("adapter") else None)
        written.append(d)
        print(f"wrote {d} ({len(acts)} tensors), first divergence {first} (rel-L2 {r:.3g}, "
              f"{equal} sites before it bitwise equal)")
    return written


def train_files(root: Path) -> list[tuple[str, Path]]:
    files = []
    for name in TRAIN_GOLDENS:
        files += gen.dir_files(f"golden/{name}", root / "golden" / name)
    for name, fault in TRAIN_CANDIDATES:
        dn = candidate_dirname(name, fault)
        files += gen.dir_files(f"candidates/{dn}", root / "candidates" / dn)
    return files


def write_checksums(root: Path) -> None:
    lines = [f"{gen.sha256(p)}  {rel}" for rel, p in train_files(root)]
    (root / TRAIN_CHECKSUMS_NAME).write_text("\n".join(lines) + "\n")
    print(f"wrote {root / TRAIN_CHECKSUMS_NAME} ({len(lines)} files)")


def check_train(root: Path) -> int:
    """Regenerates the training set into a temp dir and compares it byte for byte with ``root``."""
    sums = root / TRAIN_CHECKSUMS_NAME
    if not sums.exists():
        print(f"error: {sums} missing")
        return 2
    expected = {}
    for line in sums.read_text().splitlines():
        if line.strip():
            h, rel = line.split(None, 1)
            expected[rel.strip()] = h
    bad = 0
    with tempfile.TemporaryDirectory(prefix="train-check-") as tmp:
        tmp = Path(tmp)
        gen_train(tmp)
        fresh = train_files(tmp)
        for rel in sorted(set(expected) - {r for r, _ in fresh}):
            print(f"MISMATCH {rel}: listed in {sums} but not regenerated")
            bad += 1
        for rel, p in fresh:
            committed = root / rel
            if rel not in expected or gen.sha256(p) != expected[rel]:
                print(f"MISMATCH {rel}: regenerated sha256 differs from {sums}")
                bad += 1
            if not committed.exists() or committed.read_bytes() != p.read_bytes():
                why = "missing" if not committed.exists() else gen.describe_diff(committed, p)
                print(f"MISMATCH {rel}: committed file {why}")
                bad += 1
    if bad:
        print(f"train check FAILED: {bad} mismatch(es)")
        return 1
    print(f"train check OK: {len(expected)} files regenerate byte for byte")
    return 0
