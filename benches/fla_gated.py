"""Times FLA 0.6.0's Triton kernels (chunk_simple_gla, chunk_gla, fused_recurrent_simple_gla,
fused_recurrent_gla, and with --ops the delta rule's chunk_delta_rule, chunk_gated_delta_rule,
fused_recurrent_delta_rule, fused_recurrent_gated_delta_rule, and softmax attention's
parallel_attn, the norms rms_norm and rms_norm_gated: fla.modules' RMSNorm and
FusedRMSNormGated, and swiglu: fla.modules.activations' swiglu) and torch SDPA (sdpa: flash backend, sdpa_cudnn: cuDNN; causal) on the shapes of
benches/table.rs,
median of triton's do_bench, and joins them with our CSV into the ratio table (FLA-time /
our-time: above 1 we are faster, benches/join.py). On the GPU machine, fla-core carried as a wheel:
  python3 benches/fla_gated.py --seq 4096 --ours $OUT/ours.csv --out $OUT
First calls compile and autotune (20 s to 2 min per op): `--warm` runs each op once per shape in
parallel processes before the timed pass, so compiles do not overlap the timing.
"""
import argparse
import os
import subprocess
import sys

p = argparse.ArgumentParser()
p.add_argument("--batch", type=int, default=8)
p.add_argument("--heads", type=int, default=16)
p.add_argument("--dim", type=int, default=128)
p.add_argument("--seq", default="4096")
p.add_argument("--vocab", type=int, default=32000, help="vocabulary of the cross-entropy ops")
p.add_argument("--dtype", default="bf16")
p.add_argument(
    "--ops",
    default="chunk_simple_gla,chunk_gla,fused_recurrent_simple_gla,fused_recurrent_gla,sdpa",
)
p.add_argument("--ours", help="CSV written by benches/table.rs")
p.add_argument("--out", default=".")
p.add_argument("--warm", action="store_true", help="compile every op first, in parallel")
p.add_argument("--only-warm", action="store_true", help=argparse.SUPPRESS)
a = p.parse_args()

if a.warm:
    procs = [
        subprocess.Popen([sys.executable, __file__, "--only-warm", "--ops", op, "--seq", a.seq,
                          "--batch", str(a.batch), "--heads", str(a.heads), "--dim", str(a.dim), "--vocab", str(a.vocab),
                          "--dtype", a.dtype])
        for op in a.ops.split(",")
    ]
    for pr in procs:
        pr.wait()

import torch
import torch.nn.functional as F
from triton.testing import do_bench

import fla.ops.common.chunk_o as chunk_o
from fla.ops.gla import chunk_gla, fused_recurrent_gla
from fla.ops.simple_gla import chunk_simple_gla, fused_recurrent_simple_gla
from fla.ops.delta_rule import chunk_delta_rule, fused_recurrent_delta_rule
from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule

# FLA 0.6.0 refuses the gated chunk backward on Triton < 3.7.1 on Hopper (their issue #640);
# bypassed for timing only.
chunk_o.TRITON_ABOVE_3_7_1 = True

dtype = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}[a.dtype]
FNS = {
    "chunk_simple_gla": chunk_simple_gla,
    "chunk_gla": chunk_gla,
    "fused_recurrent_simple_gla": fused_recurrent_simple_gla,
    "fused_recurrent_gla": fused_recurrent_gla,
}
DELTA = {
    "chunk_delta_rule": chunk_delta_rule,
    "fused_recurrent_delta_rule": fused_recurrent_delta_rule,
    "chunk_gated_delta_rule": chunk_gated_delta_rule,
    "fused_recurrent_gated_delta_rule": fused_recurrent_gated_delta_rule,
}


def make(op, t):
    B, H, D = a.batch, a.heads, a.dim
    mk = lambda *s: torch.randn(*s, device="cuda", dtype=dtype)
    if op in ("sdpa", "sdpa_cudnn"):
        q, k, v, do = (mk(B, H, t, D) for _ in range(4))
        backend = torch.nn.attention.SDPBackend
        which = backend.FLASH_ATTENTION if op == "sdpa" else backend.CUDNN_ATTENTION

        def fn(q, k, v):
            with torch.nn.attention.sdpa_kernel(which):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)

        return fn, [q, k, v], do
    if op == "parallel_attn":
        from fla.ops.attn import parallel_attn

        q, k, v, do = (mk(B, t, H, D) for _ in range(4))

        def fn(q, k, v):
            o = parallel_attn(q, k, v)
            return o[0] if isinstance(o, tuple) else o

        return fn, [q, k, v], do
    if op in ("rms_norm", "rms_norm_gated"):
        # FLA's modules as its layers use them, over the head dim of [B, T, H, D] (the gated one
        # as GLA's output norm), bf16 weights.
        from fla.modules import FusedRMSNormGated, RMSNorm

        x, g, do = (mk(B, t, H, D) for _ in range(3))
        if op == "rms_norm":
            norm = RMSNorm(D, eps=1e-5).to("cuda", dtype)
            return (lambda x: norm(x)), [x], do
        norm = FusedRMSNormGated(D, eps=1e-5).to("cuda", dtype)
        return (lambda x, g: norm(x, g)), [x, g], do
    if op in ("cross_entropy", "torch_cross_entropy"):
        # The language-model loss over [B*T, vocab] logits (--vocab): FLA's FusedCrossEntropyLoss
        # (what its models use with fuse_cross_entropy) and torch's F.cross_entropy, mean reduction.
        x = mk(B * t, a.vocab)
        y = torch.randint(0, a.vocab, (B * t,), device="cuda")
        if op == "cross_entropy":
            from fla.modules import FusedCrossEntropyLoss

            loss = FusedCrossEntropyLoss()
            return (lambda x: loss(x, y)), [x], torch.ones((), device="cuda")
        return (lambda x: F.cross_entropy(x.float(), y)), [x], torch.ones((), device="cuda")
    if op == "swiglu":
        from fla.modules.activations import swiglu

        g, u, do = (mk(B, t, H, D) for _ in range(3))
        return (lambda g, u: swiglu(g, u)), [g, u], do
    q, k, v, do = (mk(B, t, H, D) for _ in range(4))
    if op in DELTA:
        # Keys L2-normalised per token (as DeltaNet layers feed the rule), beta = sigmoid(randn).
        k = F.normalize(k.float(), dim=-1).to(dtype)
        beta = torch.sigmoid(mk(B, t, H))
        f = DELTA[op]
        if "gated" in op:
            g = F.logsigmoid(mk(B, t, H))
            return (lambda q, k, v, g, beta: f(q, k, v, g, beta)[0]), [q, k, v, g, beta], do
        return (lambda q, k, v, beta: f(q, k, v, beta)[0]), [q, k, v, beta], do
    gate = F.logsigmoid(mk(B, t, H, D)) if op.endswith("_gla") and "simple" not in op \
        else F.logsigmoid(mk(B, t, H))
    f = FNS[op]
    return (lambda q, k, v, g: f(q, k, v, g)[0]), [q, k, v, gate], do


# FLA 0.6.0's fused_recurrent_gated_delta_rule has no backward, and calling it faults the CUDA
# context (illegal memory access), which would end every later measurement: time its forward only.
NO_BACKWARD = {"fused_recurrent_gated_delta_rule"}

rows = []
for t in [int(s) for s in a.seq.split(",")]:
    for op in a.ops.split(","):
        if op.startswith("burn_"):
            # Burn's own baselines (burn_rms_norm) run on our side only.
            continue
        fn, xs, do = make(op, t)
        leaves = [x.detach().requires_grad_() for x in xs]

        def fwd():
            return fn(*xs)

        def fwd_bwd():
            fn(*leaves).backward(do)

        if a.only_warm:
            fwd()
            if op in NO_BACKWARD:
                torch.cuda.synchronize()
                continue
            try:
                fwd_bwd()
            except Exception:
                pass
            torch.cuda.synchronize()
            continue
        f = do_bench(fwd, warmup=50, rep=300, return_mode="median")
        if op in NO_BACKWARD:
            fb = float("nan")
            print(f"{op}: FLA has no backward", flush=True)
        else:
            try:
                # The leaves' .grad cleared before each run, so the time has no accumulation
                # into them (ours starts from dO and writes fresh gradients: table.rs).
                fb = do_bench(fwd_bwd, warmup=50, rep=300, return_mode="median",
                              grad_to_none=leaves)
            except Exception as e:
                print(f"{op}: no backward ({type(e).__name__}: {str(e)[:80]})", flush=True)
                fb = float("nan")
        rows.append((op, t, f, fb))
        print(f"| {op} | {a.batch} | {t} | {a.heads} | {a.dim} | {a.dtype} | {f:.3f} | {fb:.3f} |",
              flush=True)
        del xs, leaves, do
        torch.cuda.empty_cache()
if a.only_warm:
    sys.exit(0)

os.makedirs(a.out, exist_ok=True)
with open(os.path.join(a.out, "fla.csv"), "w") as fh:
    fh.write("impl,op,B,T,H,D,dtype,fwd_ms,fwd_bwd_ms\n")
    for op, t, f, fb in rows:
        fbs = "" if fb != fb else f"{fb:.4f}"
        fh.write(f"fla-0.6.0,{op},{a.batch},{t},{a.heads},{a.dim},{a.dtype},{f:.4f},{fbs}\n")

if a.ours:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import join

    out = join.table(join.load(a.ours), join.load(os.path.join(a.out, "fla.csv")))
    print(out)
    with open(os.path.join(a.out, "table.md"), "w") as fh:
        fh.write(out)
