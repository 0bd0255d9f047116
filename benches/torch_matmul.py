"""torch's matmul (cuBLAS) on benches/matmul.rs's shapes and products, timed the same way
(warm-up, then the median of runs each closed by a device sync), for the ratio against Burn's.

    python3 benches/torch_matmul.py --out $OUT [--ours $OUT/matmul.csv]

writes torch-matmul.csv and, given ours, matmul-table.md: each of our modes beside torch's time.
"""

import argparse
import csv
import statistics
import time

import torch

DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}


def operands(product, n, din, dout, dtype):
    r = lambda *shape: torch.randn(*shape, device="cuda", dtype=dtype)
    if product == "fwd":
        return r(n, din), r(din, dout)
    if product == "dx":
        return r(n, dout), r(din, dout).t()
    if product == "dw":
        return r(n, din).t(), r(n, dout)
    raise ValueError(product)


def median_ms(f, warmup, iters):
    for _ in range(warmup):
        f()
        torch.cuda.synchronize()
    runs = []
    for _ in range(iters):
        t0 = time.perf_counter()
        f()
        torch.cuda.synchronize()
        runs.append((time.perf_counter() - t0) * 1e3)
    # The upper middle of an even count, as benches/common's median takes it.
    return statistics.median_high(runs)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--shapes", default="1024x512,1024x1024,1024x2816,2816x1024,1024x32000")
    p.add_argument("--products", default="fwd,dx,dw")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--out", default=".")
    p.add_argument("--ours", help="benches/matmul.rs's matmul.csv, for the joined table")
    a = p.parse_args()
    dtype = DTYPES[a.dtype]
    rows = []
    for shape in a.shapes.split(","):
        din, dout = (int(x) for x in shape.split("x"))
        for product in a.products.split(","):
            x, w = operands(product, a.tokens, din, dout, dtype)
            ms = median_ms(lambda: x @ w, a.warmup, a.iters)
            tflops = 2 * a.tokens * din * dout / (ms * 1e-3) / 1e12
            rows.append((product, din, dout, ms, tflops))
            print(f"torch {product} {a.tokens}x{din}x{dout} {a.dtype}: {ms:.3f} ms, {tflops:.1f} TFLOP/s")
    with open(f"{a.out}/torch-matmul.csv", "w") as f:
        f.write("impl,product,N,IN,OUT,dtype,ms,tflops\n")
        for product, din, dout, ms, tflops in rows:
            f.write(f"torch,{product},{a.tokens},{din},{dout},{a.dtype},{ms:.4f},{tflops:.2f}\n")
    if a.ours:
        torch_ms = {(r[0], r[1], r[2]): r[3] for r in rows}
        lines = ["| product | IN | OUT | mode | ours ms | torch ms | torch/ours |", "|---|---|---|---|---|---|---|"]
        for o in csv.DictReader(open(a.ours)):
            key = (o["product"], int(o["IN"]), int(o["OUT"]))
            if key in torch_ms:
                t, ours = torch_ms[key], float(o["ms"])
                lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {o['mode']} | {ours:.3f} | {t:.3f} | {t / ours:.2f} |")
        table = "\n".join(lines) + "\n"
        print(table)
        with open(f"{a.out}/matmul-table.md", "w") as f:
            f.write(table)


if __name__ == "__main__":
    main()
