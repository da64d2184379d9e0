#!/usr/bin/env python3
"""Write a random-weight HF Llama checkpoint with ``save_pretrained``, in several shards.

The model is the ``model`` of a scenario JSON (fixtures/scenarios/, benches/scenarios/),
its weights drawn as golden/generate.py draws them (same seed, same init), stored in
``--dtype``. Used for the committed tiny sharded checkpoint of the CI tests and, at run
time, for the real-shape checkpoints of the scale benchmark (never committed).

Usage:
    python golden/make_checkpoint.py --scenario S.json --out DIR [--dtype bfloat16] [--shards 3]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
import generate  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenario", type=Path, required=True, help="scenario JSON whose 'model' is written")
    ap.add_argument("--out", type=Path, required=True, help="checkpoint directory to write")
    ap.add_argument("--dtype", choices=sorted(generate.DTYPES), default="float32")
    ap.add_argument("--shards", type=int, default=3, help="about this many safetensors shards (>= 1)")
    args = ap.parse_args(argv)
    if args.shards < 1:
        ap.error("--shards must be >= 1")
    sc = generate.load_scenario(args.scenario)
    dtype = generate.DTYPES[args.dtype]
    torch.manual_seed(int(sc["seed"]))
    cfg = generate.build_config(sc)
    # Built directly in the stored dtype: a 1B-parameter model never exists in float32.
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)
    generate.init_weights(model, sc["weights_seed"], sc["weight_scale"])
    model.config.dtype = args.dtype
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    shard = max(1, -(-total // args.shards))
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(args.out), max_shard_size=shard, safe_serialization=True)
    files = sorted(p.name for p in args.out.glob("*.safetensors"))
    print(f"wrote {args.out}: {len(files)} shard(s), {total} bytes of parameters in {args.dtype}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
