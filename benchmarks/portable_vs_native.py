"""Times the `cpu` kernels of two builds of srntt-core on the same machine in one run: the default,
portable build (runtime CPU dispatch) against a build with SRNTT_NATIVE=1 (-march=native).

    python benchmarks/portable_vs_native.py PORTABLE_ROOT NATIVE_ROOT [--repeats 3] [--rounds 3]

Each ROOT is a source tree whose srntt_core/ holds a built extension (e.g. `python setup.py
build_ext --inplace` in a copy of the repository, with and without SRNTT_NATIVE=1). The builds run
in alternating subprocesses (portable, native, portable, ...), `--repeats` times each, `--rounds`
timed calls per process after one warm-up, so that load changes on a shared machine hit both
alike. Cases: patch_match at the CUFED5 relu3_1 size (83x125 vs 83x125, 256 channels, 3x3,
stride 1) and feature_swap (`mean`) of a random index at relu3_1 / relu2_1 / relu1_1.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

SHAPE = (83, 125)
LEVELS = {"relu3_1": (1, 256), "relu2_1": (2, 128), "relu1_1": (4, 64)}

CHILD = """
import json, sys, time
import torch
import srntt_core
import srntt_core.swap as sw

shape, levels, rounds = json.loads(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3])
g = torch.Generator().manual_seed(0)
h, w = shape
q = torch.randn(1, 256, h, w, generator=g).clamp_min(-0.3)
k = torch.randn(1, 256, h, w, generator=g).clamp_min(-0.3)
cases = {"patch_match cufed5": lambda: sw.patch_match(q, k, backend="cpu")}
index = torch.randint(0, (h - 2) * (w - 2), (1, h - 2, w - 2), generator=g)
for name, (scale, ch) in levels.items():
    values = torch.randn(1, ch, h * scale, w * scale, generator=g)
    cases[f"feature_swap {name}"] = (lambda v=values, s=scale: sw.feature_swap(v, index, scale=s,
                                                                              backend="cpu"))
times = {}
for name, fn in cases.items():
    fn()
    times[name] = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times[name].append(time.perf_counter() - t)
print(json.dumps({"capability": torch.ops.srntt._cpu_capability(), "times": times}))
"""


def run(root: str, rounds: int) -> dict:
    env = {**os.environ, "PYTHONPATH": os.path.abspath(root)}
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(SHAPE), json.dumps(LEVELS), str(rounds)],
                         env=env, capture_output=True, text=True, check=True, cwd=os.path.abspath(root))
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("portable", help="source tree with the default (portable) build")
    p.add_argument("native", help="source tree with the SRNTT_NATIVE=1 build")
    p.add_argument("--repeats", type=int, default=3, help="processes per build (alternating)")
    p.add_argument("--rounds", type=int, default=3, help="timed calls per case per process")
    args = p.parse_args()

    import torch

    load_start, started = os.getloadavg(), time.time()
    results = {"portable": {}, "native": {}}
    capability = {}
    for _ in range(args.repeats):
        for build in ("portable", "native"):
            r = run(getattr(args, build), args.rounds)
            capability[build] = r["capability"]
            for name, ts in r["times"].items():
                results[build].setdefault(name, []).extend(ts)
    load_end = os.getloadavg()

    def stats(ts):
        ts = sorted(ts)
        return ts[0], ts[len(ts) // 2]

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; variants: portable build runs "
          f"'{capability['portable']}', native build runs '{capability['native']}'")
    print(f"1-min load average {load_start[0]:.2f} at the start, {load_end[0]:.2f} at the end; "
          f"{time.time() - started:.0f} s; {args.repeats} x {args.rounds} timed calls per case and build")
    print()
    print("| case | portable best / median | native best / median | portable / native (best) | (median) |")
    print("|---|---:|---:|---:|---:|")
    for name in results["portable"]:
        pb, pm = stats(results["portable"][name])
        nb, nm = stats(results["native"][name])
        print(f"| {name} | {pb * 1e3:.1f} / {pm * 1e3:.1f} ms | {nb * 1e3:.1f} / {nm * 1e3:.1f} ms | "
              f"{pb / nb:.3f} | {pm / nm:.3f} |")


if __name__ == "__main__":
    main()
