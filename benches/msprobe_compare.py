#!/usr/bin/env python3
"""The msprobe side of the msprobe benchmark (benches/msprobe_compare.rs).

make: records a pair of real msprobe dumps (PyTorch, level mix, tensor mode, as msprobe
writes them: every API and module, parameters included) of one scenario: the golden
(the correct HF run) and the candidate (the same model with a planted fault), each with
the run's contract manifest.json beside its step folders. One process a dump (msprobe's
debugger is a process-wide singleton); fixed seeds, so the pair is the same every time.

time: msprobe's own compare of that pair, in this process, after msprobe is imported:
`pt_compare` (what `msprobe compare -tp NPU/dump.json -gp BENCH/dump.json` runs) on
each step's pair of dump.json files. Prints one JSON line: import seconds and compare
seconds per step.

Usage (in the msprobe venv):
    python benches/msprobe_compare.py make --scenario benches/scenarios/msprobe_bench_f32.json \
        --fault rope.pos_reset --forwards 2 --out DIR      # DIR/golden, DIR/candidate
    python benches/msprobe_compare.py time --golden DIR/golden --candidate DIR/candidate --out OUT
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "golden"))
sys.path.insert(0, str(REPO / "fixtures" / "msprobe"))


def dump_json(root: Path, step: str) -> Path:
    """The dump.json of `root/step/<rank|proc>/`."""
    found = sorted((root / step).glob("*/dump.json"))
    if len(found) != 1:
        raise SystemExit(f"{root / step}: expected one rank or proc folder with dump.json, found {len(found)}")
    return found[0]


def make_one(scenario: Path, fault: str | None, forwards: int, out: Path) -> None:
    import generate as gen
    from make_dumps import record

    sc = gen.load_scenario(scenario)
    out.parent.mkdir(parents=True, exist_ok=True)
    manifest, _ = record(sc, fault, "tensor", forwards, out)
    (out / "manifest.json").write_text(gen.manifest_json(manifest))


def time_compare(golden: Path, candidate: Path, out: Path) -> dict:
    t0 = time.perf_counter()
    from msprobe.pytorch.compare.pt_compare import pt_compare
    t1 = time.perf_counter()
    steps = sorted(p.name for p in golden.iterdir() if p.name.startswith("step") and (candidate / p.name).is_dir())
    per_step = {}
    for step in steps:
        s0 = time.perf_counter()
        pt_compare({"npu_path": str(dump_json(candidate, step)), "bench_path": str(dump_json(golden, step)),
                    "is_print_compare_log": False}, str(out / step))
        per_step[step] = time.perf_counter() - s0
    return {"import_s": t1 - t0, "compare_s": sum(per_step.values()), "steps": per_step}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    mk = sub.add_parser("make")
    mk.add_argument("--scenario", type=Path, required=True)
    mk.add_argument("--fault", required=True)
    mk.add_argument("--forwards", type=int, default=2)
    mk.add_argument("--out", type=Path, required=True)
    mk.add_argument("--one", nargs=2, metavar=("SIDE", "FAULT"), help=argparse.SUPPRESS)
    tm = sub.add_parser("time")
    tm.add_argument("--golden", type=Path, required=True)
    tm.add_argument("--candidate", type=Path, required=True)
    tm.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    if a.cmd == "time":
        print(json.dumps(time_compare(a.golden, a.candidate, a.out)))
        return 0
    if a.one:
        side, fault = a.one
        make_one(a.scenario, None if fault == "-" else fault, a.forwards, a.out / side)
        return 0
    for side, fault in (("golden", "-"), ("candidate", a.fault)):
        subprocess.run([sys.executable, __file__, "make", "--scenario", str(a.scenario), "--fault", a.fault,
                        "--forwards", str(a.forwards), "--out", str(a.out), "--one", side, fault],
                       check=True, env={**os.environ, "PYTHONHASHSEED": "0"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
