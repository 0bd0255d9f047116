"""Joins our timings (benches/table.rs, ours.csv) and FLA's (benches/fla_gated.py, fla.csv) into
the ratio table: theirs / ours, above 1 where we are faster. SDPA is set against Burn's own
`attention` and against our fused `parallel_attn`. Plain Python, no torch:  python3 benches/join.py OURS.csv FLA.csv > table.md
"""
import csv
import sys


def load(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


def table(ours_rows, fla_rows):
    ours = {(r["op"], int(r["T"])): r for r in ours_rows}
    num = lambda s: float(s) if s else None
    ratio = lambda x, y: f"{x / y:.2f}" if x and y else "—"
    show = lambda x: f"{x:.3f}" if x else "—"
    first = fla_rows[0]
    lines = [
        f"B={first['B']}, H={first['H']}, K=V={first['D']}, {first['dtype']}; median ms; "
        "ratio = theirs / ours (above 1: we are faster); ours in the form the op names. "
        "sdpa (torch, flash backend, causal) is set against Burn's own `attention` (causal); "
        "— where Burn's attention ran out of memory or was skipped.",
        "",
        "| op | T | ours fwd | FLA fwd | ratio fwd | ours fwd+bwd | FLA fwd+bwd | ratio fwd+bwd |",
        "|---|---|---|---|---|---|---|---|",
    ]
    # Softmax attention: every reference (SDPA flash, SDPA cuDNN, FLA's parallel_attn) races our
    # fused parallel_attn; SDPA flash also races Burn's own attention.
    expanded = []
    for r in fla_rows:
        if r["op"] in ("sdpa", "sdpa_cudnn", "parallel_attn"):
            expanded.append((r, "parallel_attn", f"{r['op']} vs ours parallel_attn"))
            if r["op"] == "sdpa":
                expanded.append((r, "attention", "sdpa vs Burn attention"))
        elif r["op"] == "rms_norm":
            # FLA's fused norm races ours and Burn's own RmsNorm (what the models ran before).
            expanded.append((r, "rms_norm", "rms_norm"))
            expanded.append((r, "burn_rms_norm", "rms_norm vs Burn RmsNorm"))
        elif r["op"] == "cross_entropy":
            expanded.append((r, "cross_entropy", "cross_entropy"))
            expanded.append((r, "burn_cross_entropy", "cross_entropy vs Burn CrossEntropyLoss"))
        elif r["op"] == "torch_cross_entropy":
            expanded.append((r, "cross_entropy", "torch F.cross_entropy vs ours"))
        elif r["op"] == "swiglu":
            expanded.append((r, "swiglu", "swiglu"))
            expanded.append((r, "burn_swiglu", "swiglu vs Burn silu(g) * u"))
        else:
            expanded.append((r, r["op"], r["op"]))
    for r, mine_op, name in expanded:
        op, t = r["op"], int(r["T"])
        mine = ours.get((mine_op, t))
        # Where we have no chunk form of an op yet (the delta rule), our recurrent form races it.
        stand_in = op.startswith("chunk_") and mine is None
        if stand_in:
            mine = ours.get(("fused_recurrent_" + op[len("chunk_"):], t))
        mine = mine or {}
        of, ofb = num(mine.get("fwd_ms")), num(mine.get("fwd_bwd_ms"))
        f, fb = num(r["fwd_ms"]), num(r["fwd_bwd_ms"])
        if stand_in:
            name += " (ours: fused recurrent)"
        lines.append(f"| {name} | {t} | {show(of)} | {show(f)} | {ratio(f, of)} | {show(ofb)} | "
                     f"{show(fb)} | {ratio(fb, ofb)} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(table(load(sys.argv[1]), load(sys.argv[2])))
