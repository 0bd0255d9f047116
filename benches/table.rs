//! The benchmark table of the gated and delta-rule families (FLA's README layout): per op and form, forward and
//! forward+backward milliseconds, median of repeated runs after warm-up, a device sync closing each
//! run. Burn's own softmax `attention` (causal) runs beside it as the baseline. Speed is measured
//! here, never asserted in tests. On the GPU machine (see benches/README.md):
//!   BIN=table bash .gpu/run.sh -- --backend cuda --dtype bf16 --seq 512,1024,2048,4096,8192,16384 --out $OUT
//! writes `ours.csv` and `ours.md` to `--out`; `benches/fla_gated.py` times FLA's Triton kernels
//! and torch SDPA on the same shapes and joins both into the ratio table.

mod common;

use burn::backend::Autodiff;
use burn::tensor::activation::{log_sigmoid, sigmoid, silu};
use burn::tensor::backend::Backend;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::Int;
use burn::tensor::{Distribution, FloatDType, Tensor};
use clap::Parser;
use common::{time, Table};
use fla::ops::{
    cross_entropy_mean, delta_rule, gated_delta_rule, gla, parallel_attn, rms_norm, rms_norm_gated,
    simple_gla, swiglu, AttentionBackend, AttnOptions, DeltaRuleBackend, DeltaRuleOptions,
    GatedMode, GatedRecurrentBackend, RecurrentOptions,
};

/// What every timed op needs of its backend.
trait Ops: GatedRecurrentBackend + DeltaRuleBackend + AttentionBackend {}
impl<B: GatedRecurrentBackend + DeltaRuleBackend + AttentionBackend> Ops for B {}

#[derive(Parser, Debug)]
struct Args {
    /// cuda or wgpu
    #[arg(long, default_value = "wgpu")]
    backend: String,
    /// f32, f16 or bf16
    #[arg(long, default_value = "bf16")]
    dtype: String,
    #[arg(long, default_value_t = 8)]
    batch: usize,
    #[arg(long, default_value_t = 16)]
    heads: usize,
    /// Head dimension K = V.
    #[arg(long, default_value_t = 128)]
    dim: usize,
    /// Comma-separated sequence lengths.
    #[arg(long, default_value = "4096")]
    seq: String,
    /// Comma-separated ops: chunk_simple_gla, chunk_gla, fused_recurrent_simple_gla,
    /// fused_recurrent_gla, chunk_delta_rule, chunk_gated_delta_rule, fused_recurrent_delta_rule,
    /// fused_recurrent_gated_delta_rule,
    /// attention (Burn's causal softmax attention), parallel_attn (ours, fused, causal),
    /// rms_norm and rms_norm_gated (ours, fused, over the head dim of q, gated by v) and
    /// burn_rms_norm (Burn's `RmsNorm` module on the same q); swiglu (ours, fused, gate q, up v)
    /// and burn_swiglu (Burn's `silu(q) * v`); cross_entropy (ours, fused, mean over
    /// `[B·T, vocab]` logits) and burn_cross_entropy (Burn's `CrossEntropyLoss` on the logits cast
    /// to f32, as the language models computed it before).
    #[arg(
        long,
        default_value = "chunk_simple_gla,chunk_gla,fused_recurrent_simple_gla,fused_recurrent_gla,attention"
    )]
    ops: String,
    /// Burn's attention materialises the T×T scores: skip its forward above this length and its
    /// backward above half of it (it runs out of memory beyond).
    #[arg(long, default_value_t = 8192)]
    attention_max: usize,
    /// Vocabulary of the cross-entropy ops (its logits are `[B·T, vocab]`).
    #[arg(long, default_value_t = 32000)]
    vocab: usize,
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    #[arg(long, default_value_t = 10)]
    iters: usize,
    /// Folder for ours.csv and ours.md.
    #[arg(long)]
    out: Option<std::path::PathBuf>,
    /// Ignored: cargo bench passes it.
    #[arg(long)]
    bench: bool,
}

struct Inputs<B: Backend> {
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    gk: Tensor<B, 4>,
    g: Tensor<B, 3>,
    /// `sigmoid(randn)`, the delta rule's write strength.
    beta: Tensor<B, 3>,
    /// `k` L2-normalised per token, as DeltaNet layers feed the delta rule.
    k_unit: Tensor<B, 4>,
    d_o: Tensor<B, 4>,
    /// The norms' weight `[D]`, and Burn's `RmsNorm` holding the same weight.
    w: Tensor<B, 1>,
    burn_norm: burn::nn::RmsNorm<B>,
}

/// The norms' `ε`, FLA's default.
const NORM_EPS: f64 = 1e-5;

fn inputs<B: Backend>(dims: [usize; 4], dtype: FloatDType, device: &B::Device) -> Inputs<B> {
    let n = Distribution::Normal(0.0, 1.0);
    let r4 = || Tensor::<B, 4>::random(dims, n, device).cast(dtype);
    let [b, t, h, _] = dims;
    let k = r4();
    let k32 = k.clone().cast(FloatDType::F32);
    let k_unit = (k32.clone() / k32.square().sum_dim(3).sqrt()).cast(dtype);
    let w = Tensor::<B, 1>::random([dims[3]], Distribution::Uniform(0.5, 1.5), device).cast(dtype);
    let mut burn_norm = burn::nn::RmsNormConfig::new(dims[3])
        .with_epsilon(NORM_EPS)
        .init(device);
    burn_norm.gamma = burn::module::Param::from_tensor(w.clone());
    Inputs {
        w,
        burn_norm,
        q: r4(),
        k,
        k_unit,
        beta: sigmoid(Tensor::<B, 3>::random([b, t, h], n, device)).cast(dtype),
        v: r4(),
        gk: log_sigmoid(Tensor::<B, 4>::random(dims, n, device)).cast(dtype),
        g: log_sigmoid(Tensor::<B, 3>::random([b, t, h], n, device)).cast(dtype),
        d_o: r4(),
    }
}

/// One call of `op` on `x`; `grad` marks the inputs as requiring gradients first.
fn call<B: Ops>(op: &str, x: &Inputs<B>, grad: bool) -> Tensor<B, 4> {
    let g = |t: &Tensor<B, 4>| {
        if grad {
            t.clone().require_grad()
        } else {
            t.clone()
        }
    };
    let g3 = |t: &Tensor<B, 3>| {
        if grad {
            t.clone().require_grad()
        } else {
            t.clone()
        }
    };
    let (q, k, v) = (g(&x.q), g(&x.k), g(&x.v));
    let (form, name) = op.split_once("_").map_or(("", op), |(a, b)| match a {
        "chunk" => ("chunk", b),
        "fused" => ("fused", b.trim_start_matches("recurrent_")),
        _ => ("", op),
    });
    let mode = match form {
        "chunk" => GatedMode::Chunk,
        "fused" => GatedMode::FusedRecurrent,
        _ => GatedMode::Auto,
    };
    let opts = RecurrentOptions::default().with_mode(mode);
    match name {
        "gla" => gla(q, k, v, g(&x.gk), None, opts).expect("valid inputs").o,
        "simple_gla" => simple_gla(q, k, v, g3(&x.g), opts).expect("valid inputs").o,
        "delta_rule" => {
            let opts = DeltaRuleOptions::default().with_mode(mode);
            delta_rule(q, g(&x.k_unit), v, g3(&x.beta), opts)
                .expect("valid inputs")
                .o
        }
        "gated_delta_rule" => {
            let opts = DeltaRuleOptions::default().with_mode(mode);
            gated_delta_rule(q, g(&x.k_unit), v, g3(&x.g), g3(&x.beta), opts)
                .expect("valid inputs")
                .o
        }
        "parallel_attn" => parallel_attn(q, k, v, AttnOptions::causal()).expect("valid inputs"),
        "rms_norm" => rms_norm(q, x.w.clone(), NORM_EPS).expect("valid inputs"),
        "rms_norm_gated" => rms_norm_gated(q, v, x.w.clone(), NORM_EPS).expect("valid inputs"),
        "burn_rms_norm" => x.burn_norm.forward(q),
        "swiglu" => swiglu(q, v).expect("valid inputs"),
        "burn_swiglu" => silu(q) * v,
        "attention" => {
            // Burn's attention takes [B, H, T, D].
            let t = |x: Tensor<B, 4>| x.swap_dims(1, 2);
            let options = AttentionModuleOptions {
                is_causal: true,
                ..Default::default()
            };
            t(attention(t(q), t(k), t(v), None, None, options))
        }
        other => panic!("unknown op {other}"),
    }
}

/// Forward and forward+backward ms of a cross-entropy op over `[B·T, vocab]` logits (normal,
/// in `dtype`) and uniform targets; the CSV's `D` column holds the vocabulary.
fn time_cross_entropy<B: Ops>(
    op: &str,
    args: &Args,
    t: usize,
    dtype: FloatDType,
    device: &B::Device,
) -> (f64, f64) {
    let (n, v) = (args.batch * t, args.vocab);
    let logits = Tensor::<B, 2>::random([n, v], Distribution::Normal(0.0, 1.0), device).cast(dtype);
    let targets = Tensor::<B, 1, Int>::random([n], Distribution::Uniform(0.0, v as f64), device);
    let loss = |x: Tensor<Autodiff<B>, 2>| {
        let t = Tensor::from_inner(targets.clone());
        if op == "cross_entropy" {
            cross_entropy_mean(x, t).expect("valid inputs")
        } else {
            burn::nn::loss::CrossEntropyLossConfig::new()
                .init(device)
                .forward(x.cast(FloatDType::F32), t)
        }
    };
    let x = Tensor::<Autodiff<B>, 2>::from_inner(logits.clone());
    let f = time::<B, _>(device, args.warmup, args.iters, || loss(x.clone()));
    let fb = time::<B, _>(device, args.warmup, args.iters, || {
        loss(x.clone().require_grad()).backward()
    });
    (f, fb)
}

fn run<B: Ops>(args: &Args, dtype: FloatDType) {
    let device = B::Device::default();
    let ops: Vec<&str> = args.ops.split(',').map(str::trim).collect();
    let mut table = Table::new(
        "impl,op,B,T,H,D,dtype,fwd_ms,fwd_bwd_ms",
        "| op | B | T | H | K=V | dtype | fwd ms | fwd+bwd ms |\n|---|---|---|---|---|---|---|---|\n",
        args.out.as_deref().map(|dir| (dir, "ours")),
    );
    for t in args
        .seq
        .split(',')
        .map(|s| s.trim().parse::<usize>().expect("sequence length"))
    {
        let dims = [args.batch, t, args.heads, args.dim];
        let x = inputs::<B>(dims, dtype, &device);
        let xa = inputs::<Autodiff<B>>(dims, dtype, &device);
        for &op in &ops {
            if op.starts_with("torch_") {
                // torch's own baselines run on FLA's side only.
                continue;
            }
            // The cross-entropy's rows are `[B·T, vocab]`: no heads, the vocabulary as `D`.
            let (fwd, fwd_bwd, heads, d) = if op.ends_with("cross_entropy") {
                let (f, fb) = time_cross_entropy::<B>(op, args, t, dtype, &device);
                (Some(f), Some(fb), None, args.vocab)
            } else {
                let is_attention = op == "attention";
                let fwd = (!is_attention || t <= args.attention_max).then(|| {
                    time::<B, _>(&device, args.warmup, args.iters, || call(op, &x, false))
                });
                let fwd_bwd = (!is_attention || 2 * t <= args.attention_max).then(|| {
                    time::<B, _>(&device, args.warmup, args.iters, || {
                        let o = call(op, &xa, true);
                        common::backward_with(o, xa.d_o.clone().inner())
                    })
                });
                (fwd, fwd_bwd, Some(args.heads), args.dim)
            };
            let fmt = |x: Option<f64>| x.map_or("".into(), |ms| format!("{ms:.3}"));
            let (f, fb) = (fmt(fwd), fmt(fwd_bwd));
            let (b, dt, be) = (args.batch, &args.dtype, &args.backend);
            let h_md = heads.map_or("-".into(), |h| h.to_string());
            let h_csv = heads.unwrap_or(1);
            table.row(
                &format!("| {op} | {b} | {t} | {h_md} | {d} | {dt} | {f} | {fb} |"),
                &format!("fla-burn-{be},{op},{b},{t},{h_csv},{d},{dt},{f},{fb}"),
            );
        }
    }
}

fn main() {
    let args = Args::parse();
    let dtype = common::dtype(&args.dtype);
    match args.backend.as_str() {
        #[cfg(feature = "cuda")]
        "cuda" => run::<burn::backend::Cuda>(&args, dtype),
        #[cfg(feature = "wgpu")]
        "wgpu" => run::<burn::backend::Wgpu>(&args, dtype),
        other => panic!("backend {other} not compiled in"),
    }
}
