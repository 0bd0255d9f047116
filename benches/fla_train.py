"""Training throughput of FLA's GLA language model on the GPU machine, for the side-by-side with
`fla-train --backend cuda --precision bf16` (issue 7).

The model is FLA's GLAForCausalLM architecture (pre-norm blocks of GatedLinearAttention and a
SwiGLU GatedMLP, RMSNorm, untied head) assembled from fla-core 0.6.0's own modules and its
`chunk_gla` kernel, because the GPU machine has no `transformers` (the Hugging Face wrapper adds
no computation). Parameters, activations and AdamW state in bf16, the loss in f32, as our
`--precision bf16` run does; `--amp` instead keeps f32 parameters under bf16 autocast (FLA's
usual recipe). Batches are random token ids: throughput does not depend on the text.

    PYTHONPATH=/tmp/site python3 benches/fla_train.py --hidden 1024 --layers 24 --heads 4 \
        --seq 2048 --batch 8 --steps 20

prints tokens/s (median of the timed steps after warm-up) and peak memory.
"""

import argparse
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import fla.ops.common.chunk_o as chunk_o
from fla.modules import FusedRMSNormGated, GatedMLP, RMSNorm
from fla.ops.gla import chunk_gla

# FLA 0.6.0 refuses some chunked backward passes on Triton < 3.7.1 on Hopper (their issue #640;
# the GPU machine has Triton 3.6); bypassed for timing only, as in fla_gated.py.
chunk_o.TRITON_ABOVE_3_7_1 = True


class Gla(nn.Module):
    """FLA's GatedLinearAttention layer with GLAConfig's defaults (expand_k 0.5, expand_v 1,
    low-rank key gate of 16, gate_logit_normalizer 16, output gate, no short convolution)."""

    def __init__(self, hidden, heads):
        super().__init__()
        self.heads = heads
        self.key_dim, self.value_dim = hidden // 2, hidden
        self.q_proj = nn.Linear(hidden, self.key_dim, bias=False)
        self.k_proj = nn.Linear(hidden, self.key_dim, bias=False)
        self.v_proj = nn.Linear(hidden, self.value_dim, bias=False)
        self.g_proj = nn.Linear(hidden, self.value_dim, bias=False)
        self.gk_proj = nn.Sequential(nn.Linear(hidden, 16, bias=False), nn.Linear(16, self.key_dim, bias=True))
        self.o_proj = nn.Linear(self.value_dim, hidden, bias=False)
        self.g_norm = FusedRMSNormGated(self.value_dim // heads, eps=1e-6)

    def forward(self, x):
        b, t, _ = x.shape
        split = lambda y: y.view(b, t, self.heads, -1)
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        gk = split(F.logsigmoid(self.gk_proj(x)) / 16)
        o, _ = chunk_gla(q, k, v, g=gk)
        o = self.g_norm(o, split(self.g_proj(x)))
        return self.o_proj(o.reshape(b, t, -1))


class Block(nn.Module):
    def __init__(self, hidden, heads):
        super().__init__()
        self.attn_norm = RMSNorm(hidden, eps=1e-6)
        self.attn = Gla(hidden, heads)
        self.mlp_norm = RMSNorm(hidden, eps=1e-6)
        self.mlp = GatedMLP(hidden_size=hidden, hidden_ratio=4, hidden_act="swish")

    def forward(self, x):
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class Lm(nn.Module):
    def __init__(self, vocab, hidden, layers, heads):
        super().__init__()
        self.embeddings = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList(Block(hidden, heads) for _ in range(layers))
        self.norm = RMSNorm(hidden, eps=1e-6)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)

    def loss(self, ids):
        x = self.embeddings(ids[:, :-1])
        for layer in self.layers:
            x = layer(x)
        logits = self.lm_head(self.norm(x)).float()
        return F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--amp", action="store_true")
    a = ap.parse_args()
    torch.manual_seed(0)
    dtype = torch.float32 if a.amp else torch.bfloat16
    model = Lm(a.vocab, a.hidden, a.layers, a.heads).cuda().to(dtype)
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.01)
    times = []
    for step in range(a.warmup + a.steps):
        ids = torch.randint(0, a.vocab, (a.batch, a.seq + 1), device="cuda")
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=a.amp):
            loss = model.loss(ids)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        # Per step and flushed: the first steps (Triton's compiles and autotuning) can take
        # minutes, and a run cut short by a timeout should still say how far it got.
        print(f"step {step}: {dt * 1e3:.0f} ms", flush=True)
        if step >= a.warmup:
            times.append(dt)
    step_s = statistics.median(times)
    mode = "amp (f32 params, bf16 autocast)" if a.amp else "bf16 params"
    print(
        f"FLA GLA {params / 1e6:.0f}M params, {a.layers} layers, hidden {a.hidden}, {mode}: "
        f"B={a.batch} T={a.seq}, {step_s * 1e3:.0f} ms/step, {a.batch * a.seq / step_s:.0f} tokens/s, "
        f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB allocated, "
        f"{torch.cuda.max_memory_reserved() / 2**30:.1f} GiB reserved (CUDA context not counted), "
        f"last loss {loss.item():.3f}"
    )


if __name__ == "__main__":
    main()
