#!/usr/bin/env python3
"""Baseline of the training benchmark: PyTorch's own forward + backward of one LoRA
training step, and the training golden the harness's step runs on.

``make``: writes, under ``--out``, a random-weight HF checkpoint of a scenario's model
(``checkpoint/``, golden/generate.py's init, ``save_pretrained``), a PEFT LoRA adapter
on every projection (r 16, alpha 32, ``lora_B`` drawn non-zero so every factor has a
gradient) and a training dump ``golden/`` (CONTRACT §6: ``trainable: adapter``, the
weights by reference, ``train/loss`` from an untimed forward). Nothing here is committed.

``time``: loads the checkpoint and the adapter (``PeftModel.from_pretrained``,
``is_trainable=True``, eager attention, train mode), then times
``model(input_ids, attention_mask, labels).loss.backward()`` ``--repeat`` times
(gradients zeroed between) and prints one JSON line: best seconds, the loss, peak RSS.

Usage:
    python benches/torch_train.py make --scenario S.json --out DIR
    python benches/torch_train.py time --out DIR [--threads 2] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import save_file
from transformers import LlamaForCausalLM

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "golden"))
import generate  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make(args) -> int:
    sc = generate.load_scenario(args.scenario)
    torch.manual_seed(int(sc["seed"]))
    cfg = generate.build_config(sc)
    model = LlamaForCausalLM(cfg)
    generate.init_weights(model, sc["weights_seed"], sc["weight_scale"])
    ckpt = args.out / "checkpoint"
    model.save_pretrained(str(ckpt), safe_serialization=True)
    lora = LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, lora_dropout=0.0, bias="none")
    peft_model = get_peft_model(model, lora)
    g = torch.Generator().manual_seed(int(sc["seed"]) + 1)
    with torch.no_grad():
        for name, p in sorted(peft_model.named_parameters()):
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    golden = args.out / "golden"
    peft_model.save_pretrained(str(golden / "adapter"))
    ids, mask, _ = generate.make_inputs(sc)
    labels = ids.masked_fill(mask == 0, -100)
    peft_model.eval()
    with torch.no_grad():
        loss = peft_model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss
    manifest = {
        "format": "llama-parity/dump@1",
        "producer": {"framework": "transformers", "torch": torch.__version__,
                     "generator": "benches/torch_train.py make", "device": "cpu"},
        "model": {**sc["model"], "pad_token_id": sc["pad_token_id"]},
        "dtype": "float32",
        "scenario": {"name": sc["name"], "input_ids": ids.tolist(), "attention_mask": mask.tolist(),
                     "decode_ids": [[] for _ in range(sc["batch"])]},
        "steps": ["train"],
        "weights": {"checkpoint": "../checkpoint", "sha256": {}},
        "adapter": {"path": "adapter", "merged": False},
        "train": {
            "labels": labels.tolist(), "micro_batches": 1, "trainable": "adapter",
            "optimizer": {"name": "adamw", "lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8,
                          "weight_decay": 0.1, "no_decay": ["*norm*", "*.bias", "*lora_*"]},
            "max_grad_norm": 1.0, "loss_scale": {"kind": "none", "value": 1.0},
        },
    }
    (golden / "manifest.json").write_text(json.dumps(manifest))
    save_file({"train/loss": loss.detach().reshape(())}, str(golden / "activations.safetensors"))
    print(json.dumps({"made": str(args.out), "loss": float(loss)}))
    return 0


def time_step(args) -> int:
    torch.set_num_threads(args.threads)
    golden = args.out / "golden"
    m = json.loads((golden / "manifest.json").read_text())
    ids = torch.tensor(m["scenario"]["input_ids"])
    mask = torch.tensor(m["scenario"]["attention_mask"])
    labels = torch.tensor(m["train"]["labels"])
    base = LlamaForCausalLM.from_pretrained(str(args.out / "checkpoint"), dtype=torch.float32,
                                            attn_implementation="eager")
    model = PeftModel.from_pretrained(base, str(golden / "adapter"), is_trainable=True)
    model.train()
    best, loss = float("inf"), None
    for _ in range(args.repeat):
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        out = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False)
        out.loss.backward()
        best = min(best, time.perf_counter() - t0)
        loss = float(out.loss)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"seconds": best, "loss": loss, "peak_rss_bytes": peak, "threads": args.threads}))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    mk = sub.add_parser("make")
    mk.add_argument("--scenario", type=Path, required=True)
    mk.add_argument("--out", type=Path, required=True)
    tm = sub.add_parser("time")
    tm.add_argument("--out", type=Path, required=True)
    tm.add_argument("--threads", type=int, default=2)
    tm.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    return make(args) if args.cmd == "make" else time_step(args)


if __name__ == "__main__":
    sys.exit(main())
