//! Matmul throughput through Burn on a training step's shapes (FLA's 340M GLA recipe by default:
//! 16,384 tokens, hidden 1024), where Burn's matmuls take about half of our step's kernel time.
//! Each `IN x OUT` weight gives three products, as a linear layer's step runs them:
//! - `fwd`: `X · W` (`[N, IN] · [IN, OUT]`);
//! - `dx`: `dY · Wᵀ` (`[N, OUT] · [OUT, IN]`, `W` transposed as a view, as Burn's autodiff does);
//! - `dw`: `Xᵀ · dY` (`[IN, N] · [N, OUT]`).
//!
//! And three ways of reaching the kernel, because they autotune over different candidates
//! (burn-cubecl's matmul autotune, which includes cubek's TMA kernels on CUDA, against
//! burn-cubecl-fusion's fused-matmul autotune, which has none):
//! - `plain`: `CubeBackend` without fusion;
//! - `fusion`: the fused backend, the product alone (nothing to fuse it with);
//! - `fused_add`: the fused backend, the product followed by an element-wise op (scaled by 0.5),
//!   which fusion folds into the matmul, as it does with a gradient's accumulation in training;
//! - `cublaslt` (CUDA only, not in the defaults): cuBLASLt on the plain backend's buffers
//!   (`fla::ops::blas::matmul`, enqueued on CubeCL's stream).
//!
//! Prints and writes (`--out`) ms and TFLOP/s per product, median after warm-up with a device
//! sync closing each run. `benches/torch_matmul.py` times torch's (cuBLAS) on the same shapes.
//! On the GPU machine: `bash benches/gpu/matmul_gpu.sh` (torch's beside it, and the autotune's
//! per-candidate results).

mod common;

use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, FloatDType, Tensor};
use clap::Parser;
use common::{time, Table};

#[derive(Parser, Debug)]
struct Args {
    /// cuda or wgpu
    #[arg(long, default_value = "wgpu")]
    backend: String,
    /// f32, f16 or bf16
    #[arg(long, default_value = "bf16")]
    dtype: String,
    /// Rows of the activations (tokens of a step).
    #[arg(long, default_value_t = 16384)]
    tokens: usize,
    /// Comma-separated weights `INxOUT`: the recipe's q/k (1024x512), v/g/o (1024x1024), the
    /// MLP's gate and up (1024x2816) and down (2816x1024), the LM head (1024x32000).
    #[arg(
        long,
        default_value = "1024x512,1024x1024,1024x2816,2816x1024,1024x32000"
    )]
    shapes: String,
    /// Comma-separated products: fwd, dx, dw.
    #[arg(long, default_value = "fwd,dx,dw")]
    products: String,
    /// Comma-separated ways: plain, fusion, fused_add; cublaslt (CUDA: cuBLASLt on the plain
    /// backend's buffers on its stream, `fla::ops::blas`).
    #[arg(long, default_value = "plain,fusion,fused_add")]
    modes: String,
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    #[arg(long, default_value_t = 10)]
    iters: usize,
    /// Folder for matmul.csv and matmul.md.
    #[arg(long)]
    out: Option<std::path::PathBuf>,
    /// Ignored: cargo bench passes it.
    #[arg(long)]
    bench: bool,
}

/// The operands of `product` for an `IN x OUT` weight over `n` rows, and the flops of the product.
fn operands<B: Backend>(
    product: &str,
    n: usize,
    (din, dout): (usize, usize),
    dtype: FloatDType,
    device: &B::Device,
) -> (Tensor<B, 2>, Tensor<B, 2>, f64) {
    let r = |shape: [usize; 2]| {
        Tensor::<B, 2>::random(shape, Distribution::Normal(0.0, 1.0), device).cast(dtype)
    };
    let (a, b) = match product {
        "fwd" => (r([n, din]), r([din, dout])),
        "dx" => (r([n, dout]), r([din, dout]).transpose()),
        "dw" => (r([n, din]).transpose(), r([n, dout])),
        other => panic!("unknown product {other}"),
    };
    (a, b, 2.0 * (n * din * dout) as f64)
}

/// A matrix product on backend `B`.
type Product<B> = fn(Tensor<B, 2>, Tensor<B, 2>) -> Tensor<B, 2>;

fn burn_matmul<B: Backend>(a: Tensor<B, 2>, b: Tensor<B, 2>) -> Tensor<B, 2> {
    a.matmul(b)
}

/// Median ms of one product (`mul`) on backend `B`, with an element-wise op after it when
/// `epilogue`.
fn time_product<B: Backend>(
    mul: Product<B>,
    product: &str,
    shape: (usize, usize),
    args: &Args,
    dtype: FloatDType,
    epilogue: bool,
) -> (f64, f64) {
    let device = B::Device::default();
    let (a, b, flops) = operands::<B>(product, args.tokens, shape, dtype, &device);
    let ms = time::<B, _>(&device, args.warmup, args.iters, || {
        let y = mul(a.clone(), b.clone());
        if epilogue {
            y.mul_scalar(0.5)
        } else {
            y
        }
    });
    (ms, flops / (ms * 1e-3) / 1e12)
}

/// `vendor`: the vendor library's product on the plain backend (CUDA: cuBLASLt), if any.
fn run<Fused: Backend, Plain: Backend>(
    args: &Args,
    dtype: FloatDType,
    vendor: Option<Product<Plain>>,
) {
    let list = |s: &str| {
        s.split(',')
            .map(str::trim)
            .map(String::from)
            .collect::<Vec<_>>()
    };
    let mut table = Table::new(
        "impl,mode,product,N,IN,OUT,dtype,ms,tflops",
        "| mode | product | N | IN | OUT | dtype | ms | TFLOP/s |\n|---|---|---|---|---|---|---|---|\n",
        args.out.as_deref().map(|dir| (dir, "matmul")),
    );
    for shape in list(&args.shapes) {
        let (din, dout) = shape
            .split_once('x')
            .map(|(i, o)| (i.parse().expect("IN"), o.parse().expect("OUT")))
            .expect("shape INxOUT");
        for product in list(&args.products) {
            for mode in list(&args.modes) {
                let (ms, tflops) = match mode.as_str() {
                    "plain" => time_product(
                        burn_matmul::<Plain>,
                        &product,
                        (din, dout),
                        args,
                        dtype,
                        false,
                    ),
                    "fusion" => time_product(
                        burn_matmul::<Fused>,
                        &product,
                        (din, dout),
                        args,
                        dtype,
                        false,
                    ),
                    "fused_add" => time_product(
                        burn_matmul::<Fused>,
                        &product,
                        (din, dout),
                        args,
                        dtype,
                        true,
                    ),
                    "cublaslt" => {
                        let mul = vendor.expect("cublaslt: CUDA only");
                        time_product(mul, &product, (din, dout), args, dtype, false)
                    }
                    other => panic!("unknown mode {other}"),
                };
                let (n, dt, be) = (args.tokens, &args.dtype, &args.backend);
                table.row(
                    &format!("| {mode} | {product} | {n} | {din} | {dout} | {dt} | {ms:.3} | {tflops:.1} |"),
                    &format!("fla-burn-{be},{mode},{product},{n},{din},{dout},{dt},{ms:.4},{tflops:.2}"),
                );
            }
        }
    }
}

fn main() {
    let args = Args::parse();
    let dtype = common::dtype(&args.dtype);
    match args.backend.as_str() {
        #[cfg(feature = "cuda")]
        "cuda" => {
            type Plain = burn_cubecl::CubeBackend<cubecl::cuda::CudaRuntime, f32, i32, u8>;
            fn cublaslt(a: Tensor<Plain, 2>, b: Tensor<Plain, 2>) -> Tensor<Plain, 2> {
                fla::ops::blas::matmul(a, b).expect("cuBLASLt product")
            }
            run::<burn::backend::Cuda, Plain>(&args, dtype, Some(cublaslt))
        }
        #[cfg(feature = "wgpu")]
        "wgpu" => run::<
            burn::backend::Wgpu,
            burn_cubecl::CubeBackend<cubecl::wgpu::WgpuRuntime, f32, i32, u32>,
        >(&args, dtype, None),
        other => panic!("backend {other} not compiled in"),
    }
}
