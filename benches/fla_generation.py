"""Generation speed of FLA's GLA (issue 6), for the side-by-side with `fla-generate`.

Builds FLA's GLAForCausalLM with GLAConfig's defaults (the 1.3B shape: hidden 2048, 24 layers,
4 heads, vocab 32000) and random weights (seeded), in bf16 on the GPU; saves it with
`save_pretrained` so that `fla-generate --model DIR` loads the very same weights; then times
FLA + transformers `generate` (greedy, prompt of --prompt-len random ids, exactly --new new tokens)
as FLA's benchmarks/benchmark_generation.py does, with one warm-up call first.

    PYTHONPATH=/tmp/site python3 benches/fla_generation.py --out /tmp/gla-1.3b --repeat 3

prints `prompt_ids=...` (for `fla-generate --prompt-ids`), FLA's greedy ids, and the times:
prompt (one forward pass with the cache), total generate, and ms per decoded token
((total - prompt) / (new - 1)).
"""

import argparse
import statistics
import time

import torch


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--prompt-len", type=int, default=10)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--layers", type=int, default=None, help="override the config's layers (smoke runs)")
    p.add_argument("--family", choices=["gla", "gated_deltanet"], default="gla",
                   help="GLAConfig's defaults (1.3B) or GatedDeltaNetConfig's (1.3B as well)")
    args = p.parse_args()
    if args.repeat < 1:
        p.error("--repeat must be at least 1")

    from fla import models

    config_cls, model_cls = {
        "gla": (models.GLAConfig, models.GLAForCausalLM),
        "gated_deltanet": (models.GatedDeltaNetConfig, models.GatedDeltaNetForCausalLM),
    }[args.family]
    torch.manual_seed(0)
    config = config_cls() if args.layers is None else config_cls(num_hidden_layers=args.layers)
    model = model_cls(config).to(device="cuda", dtype=torch.bfloat16).eval()
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(args.out, safe_serialization=True)
    print(f"FLA {args.family}: hidden {config.hidden_size}, {config.num_hidden_layers} layers, "
          f"{config.num_heads} heads, vocab {config.vocab_size}: {params / 1e9:.2f}B parameters, "
          f"saved to {args.out}")

    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(3, config.vocab_size, (1, args.prompt_len), generator=g).cuda()
    print("prompt_ids=" + ",".join(str(i) for i in prompt[0].tolist()))

    def timed(fn):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        return out, (time.perf_counter() - t0) * 1e3

    def gen():
        return model.generate(prompt, max_new_tokens=args.new, min_new_tokens=args.new,
                              do_sample=False, use_cache=True)

    with torch.no_grad():
        ids, _ = timed(gen)  # warm-up: Triton compiles and autotunes here
        timed(lambda: model(prompt, use_cache=True))
        totals, prompts = [], []
        for _ in range(args.repeat):
            _, ms = timed(lambda: model(prompt, use_cache=True))
            prompts.append(ms)
            ids, ms = timed(gen)
            totals.append(ms)
    new = ids[0, args.prompt_len:].tolist()
    print("fla_greedy_ids=" + ",".join(str(i) for i in new))
    total, prompt_ms = statistics.median(totals), statistics.median(prompts)
    print(f"FLA generate: prompt {args.prompt_len} tokens in {prompt_ms:.1f} ms; {len(new)} new "
          f"tokens; total {total:.1f} ms ({(total - prompt_ms) / max(len(new) - 1, 1):.2f} "
          f"ms/token after the first; median of {args.repeat}); peak memory "
          f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
