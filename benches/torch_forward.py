#!/usr/bin/env python3
"""Baseline of the scale benchmark: PyTorch's own eager forward of a scenario.

Loads an HF checkpoint with from_pretrained (eager attention), feeds the prefill and
then each teacher-forced decode token with a KV cache, as golden/generate.py does but
without hooks or files, and prints one JSON line: forward seconds (load excluded) and
total seconds.

Usage: python benches/torch_forward.py --model DIR --input-ids ids.json [--dtype float32] [--threads 2]
"""
import argparse
import json
import sys
import time

import torch
from transformers import DynamicCache, LlamaForCausalLM

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--input-ids", required=True)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    t0 = time.perf_counter()
    torch.set_num_threads(a.threads)
    d = json.loads(open(a.input_ids).read())
    model = LlamaForCausalLM.from_pretrained(a.model, dtype=DTYPES[a.dtype], attn_implementation="eager").eval()
    ids = torch.tensor(d["input_ids"], dtype=torch.int64)
    mask = torch.tensor(d.get("attention_mask", [[1] * ids.shape[1]] * ids.shape[0]), dtype=torch.int64)
    dec = d["decode_ids"]
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    last = pos[:, -1:]
    cache = DynamicCache(config=model.config)
    t1 = time.perf_counter()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True)
        am = mask
        for j in range(len(dec[0])):
            x = torch.tensor([[r[j]] for r in dec], dtype=torch.int64)
            am = torch.cat([am, torch.ones(ids.shape[0], 1, dtype=am.dtype)], dim=1)
            model(input_ids=x, attention_mask=am, position_ids=last + 1 + j, past_key_values=cache, use_cache=True)
    t2 = time.perf_counter()
    print(json.dumps({"forward_s": t2 - t1, "total_s": t2 - t0}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
