"""Times FLA 0.6.0's fused_recurrent_gla and fused_recurrent_simple_gla (Triton) on the shapes of
benches/recurrent.rs, median of do_bench, for the FLA/ours ratio. Run on the GPU machine with
fla-core carried as a wheel:  python3 benches/fla_recurrent.py --seq 4096
"""
import argparse

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from fla.ops.gla import fused_recurrent_gla
from fla.ops.simple_gla import fused_recurrent_simple_gla

p = argparse.ArgumentParser()
p.add_argument("--batch", type=int, default=8)
p.add_argument("--heads", type=int, default=16)
p.add_argument("--dim", type=int, default=128)
p.add_argument("--seq", default="4096")
p.add_argument("--dtype", default="bf16")
a = p.parse_args()
dtype = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}[a.dtype]

print("| op (FLA 0.6.0) | B | T | H | K=V | dtype | fwd ms | fwd+bwd ms |")
print("|---|---|---|---|---|---|---|---|")
for t in [int(s) for s in a.seq.split(",")]:
    B, H, D = a.batch, a.heads, a.dim
    mk = lambda *s: torch.randn(*s, device="cuda", dtype=dtype)
    q, k, v, do = mk(B, t, H, D), mk(B, t, H, D), mk(B, t, H, D), mk(B, t, H, D)
    gk = F.logsigmoid(mk(B, t, H, D))
    g = F.logsigmoid(mk(B, t, H))
    for name in ["fused_recurrent_gla", "fused_recurrent_simple_gla"]:
        gate = gk if name == "fused_recurrent_gla" else g
        fn = fused_recurrent_gla if name == "fused_recurrent_gla" else fused_recurrent_simple_gla

        def fwd():
            return fn(q, k, v, gate)[0]

        leaves = [x.detach().requires_grad_() for x in (q, k, v, gate)]

        def fwd_bwd():
            o = fn(*leaves)[0]
            o.backward(do)

        f = do_bench(fwd, warmup=100, rep=500, return_mode="median")
        fb = do_bench(fwd_bwd, warmup=100, rep=500, return_mode="median")
        print(f"| {name} | {B} | {t} | {H} | {D} | {a.dtype} | {f:.3f} | {fb:.3f} |", flush=True)
