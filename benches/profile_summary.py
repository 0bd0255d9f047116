"""Summarises a CubeCL kernel profile log (`benches/gpu/train_gpu.sh profile` writes one).

CubeCL's profiler (`[profiling.logger] level = "basic"` in a cubecl.toml) times every kernel alone
and writes one line per kernel, `| <duration> | <kernel name>`, and a summary table at each device
sync; fla-train syncs once per step. This script takes the kernels between two summary tables
(one step; `--step N` picks the N-th, counting from 1, default the last; the first
includes the step-0 evaluation, and a step's first use of a kernel includes its compilation) and prints their time by
kind (our linear-attention kernels, matmuls, element-wise, reductions, casts, ...) and how many
of its kernels are under 20 µs (launch-bound work), so a step's time can be laid against the
unprofiled step and against FLA's.

    python3 benches/profile_summary.py cubecl-profile.log [--step N] [--csv OUT.csv]
"""

import argparse
import collections
import csv
import re

UNITS = {"ns": 1e-3, "µs": 1.0, "ms": 1e3, "s": 1e6}
LINE = re.compile(r"^\| ([\d.]+)(ns|µs|ms|s)\s+\| (.*)")


def kind(name: str) -> str:
    """A kernel's group, from the first parts of CubeCL's type-name of it."""
    parts = [p.strip() for p in name.split("|")]
    head = parts[0]
    if head.startswith("MatmulEntry"):
        return "matmul"
    if head in ("KernelBinop", "KernelScalarBinop", "KernelScalarCmp", "UnaryFloat",
                "MaskFillKernel", "FullKernel"):
        return "element-wise"
    if head == "ReduceKernel":
        return "reduction"
    # Burn's fusion (CubeBackend under Fusion, as bf16 training runs since the vendored fix):
    # chains of element-wise ops, and reductions with the element-wise ops around them, as one
    # kernel each.
    if head == "ElemwiseFuse":
        return "element-wise (fused)"
    if head == "ReduceKernelFused":
        return "reduction (fused)"
    if head == "CastElement":
        return "cast"
    if head in ("SelectAssignKernel", "SelectKernel", "GatherKernel", "ScatterKernel",
                "SliceKernel"):
        return "gather/scatter"
    if head.startswith("Prng"):
        return "random"
    return "ours: " + head


def steps(path: str):
    """The kernels of each step: lists of (microseconds, name)."""
    out, cur = [], []
    for line in open(path, encoding="utf-8"):
        if line.startswith("|⎺"):  # a summary table starts: the step before it has ended
            if cur:
                out.append(cur)
            cur = []
            continue
        m = LINE.match(line)
        if m:
            cur.append((float(m.group(1)) * UNITS[m.group(2)], re.sub(r"\s+", " ", m.group(3))))
    # Kernels after the last table (the final evaluation, with no sync after it) are no step.
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("log")
    p.add_argument("--step", type=int, default=0, help="1-based; default: the last")
    p.add_argument("--csv", help="write kind,kernels,ms here as well")
    args = p.parse_args()
    all_steps = steps(args.log)
    if not all_steps:
        raise SystemExit(f"{args.log}: no profiled kernels")
    k = all_steps[args.step - 1] if args.step else all_steps[-1]
    total = sum(us for us, _ in k)
    by = collections.defaultdict(lambda: [0, 0.0])
    for us, name in k:
        g = by[kind(name)]
        g[0] += 1
        g[1] += us
    print(f"{len(all_steps)} profiled syncs; this one: {len(k)} kernels, {total / 1e3:.1f} ms")
    rows = sorted(by.items(), key=lambda kv: -kv[1][1])
    for name, (n, us) in rows:
        print(f"  {name:<32} {n:6d} kernels {us / 1e3:9.2f} ms {100 * us / total:5.1f} %")
    small = [us for us, _ in k if us < 20]
    print(f"  kernels under 20 µs: {len(small)}, {sum(small) / 1e3:.2f} ms (launch-bound work)")
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["kind", "kernels", "ms"])
            for name, (n, us) in rows:
                w.writerow([name, n, f"{us / 1e3:.3f}"])


if __name__ == "__main__":
    main()
