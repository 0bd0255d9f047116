//! Times `fused_recurrent_gla` forward and forward+backward (FLA's benchmark shapes), median of
//! repeated runs after warm-up, with a device sync around each. Speed is measured here, never
//! asserted in tests. Run on the GPU machine:
//!   BIN=recurrent bash .gpu/run.sh -- --backend cuda --dtype bf16
//! `benches/fla_recurrent.py` times FLA's Triton kernels on the same shapes for the ratio.

use std::time::Instant;

use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use burn::tensor::{activation::log_sigmoid, Distribution, FloatDType, Tensor};
use clap::Parser;
use fla::ops::{
    fused_recurrent_gla, fused_recurrent_simple_gla, GatedRecurrentBackend, RecurrentOptions,
};

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
    #[arg(long, default_value_t = 128)]
    dim: usize,
    /// Comma-separated sequence lengths.
    #[arg(long, default_value = "4096")]
    seq: String,
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    #[arg(long, default_value_t = 10)]
    iters: usize,
    /// Ignored: cargo bench passes it.
    #[arg(long)]
    bench: bool,
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.partial_cmp(b).unwrap());
    xs[xs.len() / 2]
}

/// Median milliseconds of `f`, each run closed by a device sync.
fn time<B: Backend>(device: &B::Device, warmup: usize, iters: usize, mut f: impl FnMut()) -> f64 {
    for _ in 0..warmup {
        f();
        B::sync(device).expect("device sync");
    }
    let runs = (0..iters)
        .map(|_| {
            let t0 = Instant::now();
            f();
            B::sync(device).expect("device sync");
            t0.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    median(runs)
}

struct Inputs<B: Backend> {
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    gk: Tensor<B, 4>,
    g: Tensor<B, 3>,
    d_o: Tensor<B, 4>,
}

fn inputs<B: Backend>(dims: [usize; 4], dtype: FloatDType, device: &B::Device) -> Inputs<B> {
    let n = Distribution::Normal(0.0, 1.0);
    let r4 = || Tensor::<B, 4>::random(dims, n, device).cast(dtype);
    let [b, t, h, _] = dims;
    Inputs {
        q: r4(),
        k: r4(),
        v: r4(),
        gk: log_sigmoid(Tensor::<B, 4>::random(dims, n, device)).cast(dtype),
        g: log_sigmoid(Tensor::<B, 3>::random([b, t, h], n, device)).cast(dtype),
        d_o: r4(),
    }
}

fn run<B: GatedRecurrentBackend>(args: &Args, dtype: FloatDType) {
    let device = B::Device::default();
    println!(
        "| op | B | T | H | K=V | dtype | fwd ms | fwd+bwd ms |\n|---|---|---|---|---|---|---|---|"
    );
    for t in args
        .seq
        .split(',')
        .map(|s| s.trim().parse::<usize>().expect("sequence length"))
    {
        let dims = [args.batch, t, args.heads, args.dim];
        let x = inputs::<B>(dims, dtype, &device);
        let xa = inputs::<Autodiff<B>>(dims, dtype, &device);
        for op in ["fused_recurrent_gla", "fused_recurrent_simple_gla"] {
            let gla = op == "fused_recurrent_gla";
            let fwd = time::<B>(&device, args.warmup, args.iters, || {
                let o = if gla {
                    fused_recurrent_gla(
                        x.q.clone(),
                        x.k.clone(),
                        x.v.clone(),
                        x.gk.clone(),
                        None,
                        RecurrentOptions::default(),
                    )
                } else {
                    fused_recurrent_simple_gla(
                        x.q.clone(),
                        x.k.clone(),
                        x.v.clone(),
                        x.g.clone(),
                        RecurrentOptions::default(),
                    )
                };
                drop(o.expect("valid inputs"));
            });
            let fwd_bwd = time::<B>(&device, args.warmup, args.iters, || {
                let (q, k, v) = (
                    xa.q.clone().require_grad(),
                    xa.k.clone().require_grad(),
                    xa.v.clone().require_grad(),
                );
                let out = if gla {
                    let gk = xa.gk.clone().require_grad();
                    fused_recurrent_gla(q, k, v, gk, None, RecurrentOptions::default())
                } else {
                    let g = xa.g.clone().require_grad();
                    fused_recurrent_simple_gla(q, k, v, g, RecurrentOptions::default())
                }
                .expect("valid inputs");
                let grads = (out.o * xa.d_o.clone()).sum().backward();
                drop(grads);
            });
            println!(
                "| {op} | {} | {t} | {} | {} | {} | {fwd:.3} | {fwd_bwd:.3} |",
                args.batch, args.heads, args.dim, args.dtype
            );
        }
    }
}

fn main() {
    let args = Args::parse();
    let dtype = match args.dtype.as_str() {
        "f32" => FloatDType::F32,
        "f16" => FloatDType::F16,
        "bf16" => FloatDType::BF16,
        other => panic!("unknown dtype {other}"),
    };
    match args.backend.as_str() {
        #[cfg(feature = "cuda")]
        "cuda" => run::<burn::backend::Cuda>(&args, dtype),
        #[cfg(feature = "wgpu")]
        "wgpu" => run::<burn::backend::Wgpu>(&args, dtype),
        other => panic!("backend {other} not compiled in"),
    }
}
