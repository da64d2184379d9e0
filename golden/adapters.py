"""LoRA adapters for the golden generator (CONTRACT §5), with HF PEFT's own code.

A scenario's ``adapter`` block describes a PEFT ``LoraConfig`` and how its weights are
drawn. The adapter is created with ``get_peft_model``, its ``lora_A`` and ``lora_B``
drawn from one seeded generator (B non-zero, so the adapter changes every projection),
written with PEFT's ``save_pretrained`` and loaded back onto the base model with
``PeftModel.from_pretrained``: the run reads the adapter from the very files the golden
ships. ``merged: true`` folds it with ``merge_and_unload`` before running.

Faults (``LORA_FAULTS``, CONTRACT §5 IDs) and adapter faults outside the contract
(``LORA_PLANTS``) are planted in the loaded PEFT model: its ``scaling`` dict, the
``LoraConfig`` it is loaded with, its parameters, or PEFT's merge.
"""
from __future__ import annotations

import copy
import json
import math
import tempfile
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer

ADAPTER_NAME = "default"
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
PROJECTIONS = ATTN + MLP
# What PEFT writes that a golden keeps (save_pretrained also writes a model card README.md).
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")

# Scenario ``adapter`` keys and their defaults.
ADAPTER_DEFAULTS = {
    "r": 4,
    "lora_alpha": 8,
    "target_modules": list(PROJECTIONS),
    "lora_dropout": 0.1,
    "use_rslora": False,
    "rank_pattern": {},
    "alpha_pattern": {},
    "seed": 3400,
    "init_std": {"lora_A": 0.1, "lora_B": 0.1},
    "merged": False,
    "delta_sites": False,
}

LORA_FAULTS = {
    "lora.scale_alpha": "delta scaled by lora_alpha (r ignored): PEFT's scaling set to lora_alpha on every module",
    "lora.scale_missing": "delta added unscaled: PEFT's scaling set to 1 on every module",
    "lora.rslora_ignored": "adapter loaded with use_rslora=False: PEFT scales alpha / r where the config asks "
                           "alpha / sqrt(r)",
    "lora.pattern_ignored": "scaling from the default r and lora_alpha on every module (rank_pattern / "
                            "alpha_pattern not used for the scale; the tensors keep their ranks)",
    "lora.not_loaded": "adapter never loaded: get_peft_model with PEFT's init (lora_B zero), the saved "
                       "weights never read",
    "lora.target_missing": "one target module left without its adapter: the adapter loaded with that module "
                           "removed from target_modules",
    "lora.gate_up_swapped": "gate_proj's lora_A/lora_B loaded into up_proj and up_proj's into gate_proj",
    "lora.merged_low_precision": "adapter loaded in the low-precision dtype (autocast_adapter_dtype=False) and "
                                 "merged with merge_and_unload into low-precision base weights",
}
LORA_PLANTS = {
    "lora.kv_swapped": "k_proj's and v_proj's adapters exchanged in every layer (the same shapes under GQA)",
    "lora.dropout_on": "lora_dropout left in training mode at inference (torch.manual_seed fixed)",
    "lora.layers_swapped": "layer 0's adapters loaded into layer 1 and layer 1's into layer 0",
    "lora.applied_twice": "the delta merged into the base weights (PEFT's get_delta_weight) while the adapter "
                          "stays active, so it is added twice",
}


def adapter_spec(sc: dict) -> dict | None:
    """The scenario's adapter block with every default filled in, or None."""
    a = sc.get("adapter")
    if a is None:
        return None
    unknown = sorted(set(a) - set(ADAPTER_DEFAULTS))
    if unknown:
        raise SystemExit(f"scenario {sc['name']}: unknown adapter keys {unknown}")
    spec = {**copy.deepcopy(ADAPTER_DEFAULTS), **copy.deepcopy(a)}
    bad = sorted(set(spec["target_modules"]) - set(PROJECTIONS))
    if bad:
        raise SystemExit(f"scenario {sc['name']}: adapter target_modules {bad} are not Llama projections")
    return spec


def lora_config(spec: dict, **override) -> LoraConfig:
    kw = {k: spec[k] for k in ("r", "lora_alpha", "target_modules", "lora_dropout", "use_rslora",
                               "rank_pattern", "alpha_pattern")}
    kw.update(override)
    return LoraConfig(bias="none", task_type="CAUSAL_LM", **kw)


def lora_layers(model) -> dict[str, LoraLayer]:
    """HF module name (``model.layers.0.self_attn.q_proj``) -> its PEFT LoRA layer."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, LoraLayer):
            out[name.split("base_model.model.", 1)[-1]] = m
    return out


def write_adapter(base: torch.nn.Module, spec: dict, out: Path) -> None:
    """Creates the adapter on a copy of ``base`` and writes PEFT's files to ``out``.

    ``lora_A`` ~ N(0, init_std.lora_A²) and ``lora_B`` ~ N(0, init_std.lora_B²), drawn in
    float32 from one generator seeded with ``seed``, parameters in sorted name order.
    """
    peft_model = get_peft_model(copy.deepcopy(base).float(), lora_config(spec))
    g = torch.Generator().manual_seed(int(spec["seed"]))
    params = dict(peft_model.named_parameters())
    with torch.no_grad():
        for name in sorted(params):
            if ".lora_A." in name or ".lora_B." in name:
                std = spec["init_std"]["lora_A" if ".lora_A." in name else "lora_B"]
                p = params[name]
                p.copy_(std * torch.randn(p.shape, generator=g, dtype=torch.float32))
    with tempfile.TemporaryDirectory(prefix="adapter-") as tmp:
        peft_model.save_pretrained(tmp)
        # PEFT stores target_modules as a set; its list order follows the string hash of the
        # process. Sorted here, written as PEFT writes the file, so the bytes regenerate.
        cfg_path = Path(tmp) / "adapter_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["target_modules"] = sorted(cfg["target_modules"])
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))
        out.mkdir(parents=True, exist_ok=True)
        for f in ADAPTER_FILES:
            (out / f).write_bytes((Path(tmp) / f).read_bytes())


def _swap_adapters(a: LoraLayer, b: LoraLayer) -> None:
    for part in ("lora_A", "lora_B"):
        wa = getattr(a, part)[ADAPTER_NAME].weight
        wb = getattr(b, part)[ADAPTER_NAME].weight
        if wa.shape != wb.shape:
            raise SystemExit(f"cannot swap adapters of different shapes {tuple(wa.shape)} / {tuple(wb.shape)}")
        tmp = wa.detach().clone()
        wa.copy_(wb)
        wb.copy_(tmp)


def attach(model, spec: dict, adapter_dir: Path, dtype: torch.dtype, fault: str | None = None,
           scope: dict | None = None, params: dict | None = None):
    """Loads the adapter written to ``adapter_dir`` onto ``model`` as PEFT does at inference.

    Returns ``(llama, info)``: the LlamaForCausalLM to run (LoRA layers injected, or merged
    and unloaded), and ``info`` with ``lora`` (HF module name -> LoRA layer, empty when
    merged) and ``targets`` (the projection names the golden adapts).
    """
    scope = scope or {}
    params = params or {}
    cfg = None
    autocast = True
    if fault == "lora.rslora_ignored":
        cfg = lora_config(spec, use_rslora=False)
    elif fault == "lora.target_missing":
        comp = scope.get("component")
        if comp not in spec["target_modules"]:
            raise SystemExit(f"lora.target_missing: component {comp!r} is not a target module")
        cfg = lora_config(spec, target_modules=[t for t in spec["target_modules"] if t != comp])
    elif fault == "lora.merged_low_precision":
        autocast = False
        low = params.get("dtype")
        if low is not None:
            # the base projections held in the low dtype for the merge (a checkpoint loaded
            # in bfloat16, merged, then run at the golden's dtype)
            low = {"bfloat16": torch.bfloat16, "float16": torch.float16}[low]
            for name, m in model.named_modules():
                if name.rsplit(".", 1)[-1] in spec["target_modules"]:
                    m.to(low)
    if fault == "lora.not_loaded":
        peft_model = get_peft_model(model, lora_config(spec))  # PEFT's init: lora_B = 0
    else:
        kw = {"config": cfg} if cfg is not None else {}
        peft_model = PeftModel.from_pretrained(model, str(adapter_dir), autocast_adapter_dtype=autocast, **kw)
    peft_model.eval()
    layers = lora_layers(peft_model)
    if not layers:
        raise RuntimeError("PEFT injected no LoRA layer")
    n_layers = peft_model.base_model.model.config.num_hidden_layers

    with torch.no_grad():
        if fault in ("lora.scale_alpha", "lora.scale_missing", "lora.pattern_ignored"):
            for m in layers.values():
                if fault == "lora.scale_alpha":
                    m.scaling[ADAPTER_NAME] = float(m.lora_alpha[ADAPTER_NAME])
                elif fault == "lora.scale_missing":
                    m.scaling[ADAPTER_NAME] = 1.0
                else:
                    r, alpha = spec["r"], spec["lora_alpha"]
                    m.scaling[ADAPTER_NAME] = alpha / math.sqrt(r) if spec["use_rslora"] else alpha / r
        elif fault == "lora.gate_up_swapped":
            for i in range(n_layers):
                p = f"model.layers.{i}.mlp"
                _swap_adapters(layers[f"{p}.gate_proj"], layers[f"{p}.up_proj"])
        elif fault == "lora.kv_swapped":
            for i in range(n_layers):
                p = f"model.layers.{i}.self_attn"
                _swap_adapters(layers[f"{p}.k_proj"], layers[f"{p}.v_proj"])
        elif fault == "lora.layers_swapped":
            for name, m in layers.items():
                if name.startswith("model.layers.0."):
                    _swap_adapters(m, layers[name.replace("model.layers.0.", "model.layers.1.", 1)])
        elif fault == "lora.applied_twice":
            for m in layers.values():
                m.get_base_layer().weight.data += m.get_delta_weight(ADAPTER_NAME)
        elif fault == "lora.dropout_on":
            torch.manual_seed(int(params.get("seed", 0)))
            for m in layers.values():
                m.lora_dropout[ADAPTER_NAME].train()

    targets = list(spec["target_modules"])
    if spec["merged"] or fault == "lora.merged_low_precision":
        llama = peft_model.merge_and_unload()
        if fault == "lora.merged_low_precision":
            for name, m in llama.named_modules():
                if name.rsplit(".", 1)[-1] in spec["target_modules"]:
                    m.to(dtype)
        return llama, {"lora": {}, "targets": targets}
    return peft_model.base_model.model, {"lora": layers, "targets": targets}


def delta_hook(recorder_put, site: str, layer: LoraLayer, out_dtype: torch.dtype):
    """A forward hook on ``lora_B``: records ``scaling * lora_B(lora_A(dropout(x)))``, the term
    PEFT adds to the projection, cast to the run dtype."""
    def f(module, args, out):
        s = layer.scaling[ADAPTER_NAME]
        # d loss / d delta is d loss / d (lora_B's output) / s: PEFT adds lora_B(...) * s
        recorder_put(f"{site}.lora", (out * s).to(out_dtype), grad_of=out, grad_map=lambda g: g / s)
    return f


def producer_info(spec: dict) -> dict:
    """What the manifest's producer records about the adapter."""
    import peft
    return {
        "peft": peft.__version__,
        "init": {"scheme": "lora_A, lora_B ~ N(0, std^2), float32, parameters in sorted name order, "
                           "one torch.Generator seeded with seed",
                 "seed": int(spec["seed"]), "std": dict(spec["init_std"])},
        "loading": "PeftModel.from_pretrained(base model in the run dtype, adapter/) with autocast_adapter_dtype=True "
                   "(adapter weights float32), eval()" + (", then merge_and_unload()" if spec["merged"] else ""),
    }


def config_json(adapter_dir: Path) -> dict:
    return json.loads((adapter_dir / "adapter_config.json").read_text())
