//! Fused softmax attention as a Burn op end to end: fused (`Wgpu`/`Cuda`, with and without
//! fusion) and tensor-op (NdArray) implementations under `Autodiff`, against the f64 reference
//! and each other, and the typed errors of bad input.

use crate::common::{self, check, half_tolerance, tensor, tolerance, values, Impl};
use burn::backend::Autodiff;
use burn::tensor::{FloatDType, Tensor};
use fla::kernels::attn::AttnProblem;
use fla::kernels::testing::AttnCase;
use fla::kernels::FloatDType as KernelDType;
use fla::ops::{parallel_attn, AttentionBackend, AttnOptions};
use fla::FlaError;
use rstest::rstest;

#[derive(Debug)]
struct Run {
    o: Vec<f64>,
    dq: Vec<f64>,
    dk: Vec<f64>,
    dv: Vec<f64>,
}

/// `[B, T_q, T_k, H, HK, K, V]`.
type Dims = [usize; 7];

fn case(dims: Dims, opts: &AttnOptions) -> AttnCase {
    let [batch, q_len, kv_len, heads, kv_heads, k_dim, v_dim] = dims;
    let p = AttnProblem {
        batch,
        q_len,
        kv_len,
        heads,
        kv_heads,
        k_dim,
        v_dim,
        scale: (k_dim as f32).powf(-0.5),
        causal: opts.causal,
        window: opts.window,
        softcap: opts.softcap.map(|c| c as f32),
        cu_seqlens: opts.cu_seqlens.clone(),
        dtype: KernelDType::F32,
    };
    let seed = dims
        .iter()
        .fold(opts.causal as u64 + 9, |a, &d| a * 41 + d as u64);
    AttnCase::new(p, 1.5, seed)
}

/// Forward and backward through `Autodiff<B>` with the loss `Σ o ∘ do`, in `dt`.
fn run<B: AttentionBackend>(
    c: &AttnCase,
    opts: &AttnOptions,
    dt: FloatDType,
) -> Result<Run, FlaError> {
    let device = B::Device::default();
    let p = &c.p;
    let t4 = |x: &[f64], s: [usize; 4]| tensor::<Autodiff<B>, 4>(x, s, dt, &device).require_grad();
    let q = t4(&c.q, [p.batch, p.q_len, p.heads, p.k_dim]);
    let k = t4(&c.k, [p.batch, p.kv_len, p.kv_heads, p.k_dim]);
    let v = t4(&c.v, [p.batch, p.kv_len, p.kv_heads, p.v_dim]);
    let o = parallel_attn(q.clone(), k.clone(), v.clone(), opts.clone())?;
    assert_eq!(o.dtype(), dt.into());
    let d_o = tensor::<Autodiff<B>, 4>(&c.d_o, [p.batch, p.q_len, p.heads, p.v_dim], dt, &device);
    let grads = (o.clone() * d_o).sum().backward();
    let grad = |x: &Tensor<Autodiff<B>, 4>| values(x.grad(&grads).expect("gradient reached input"));
    Ok(Run {
        o: values(o.inner()),
        dq: grad(&q),
        dk: grad(&k),
        dv: grad(&v),
    })
}

fn run_on(imp: Impl, c: &AttnCase, opts: &AttnOptions) -> Result<Run, FlaError> {
    match imp {
        Impl::Fusion => on_gpu!(fusion, run(c, opts, FloatDType::F32)),
        Impl::Cube => on_gpu!(cube, run(c, opts, FloatDType::F32)),
        Impl::TensorOps => run::<common::backends::NdArray>(c, opts, FloatDType::F32),
    }
}

/// Output and every gradient within `tol` of the f64 reference.
fn against(r: &Run, c: &AttnCase, tol: f64) {
    let (fwd, grads) = c.reference();
    check("o", &r.o, &fwd.o, tol);
    check("dq", &r.dq, &grads.dq, tol);
    check("dk", &r.dk, &grads.dk, tol);
    check("dv", &r.dv, &grads.dv, tol);
}

fn against_reference(imp: Impl, dims: Dims, opts: AttnOptions) {
    let c = case(dims, &opts);
    let r = run_on(imp, &c, &opts).expect("valid inputs");
    against(&r, &c, tolerance(imp));
}

#[rstest]
#[case::t1_causal([2, 1, 1, 2, 2, 16, 16], AttnOptions::causal())]
#[case::t63_causal([2, 63, 63, 2, 2, 64, 64], AttnOptions::causal())]
#[case::t65_full_d100([1, 65, 65, 2, 2, 100, 100], AttnOptions::default())]
#[case::grouped_window([1, 70, 70, 4, 1, 32, 48], AttnOptions::causal().with_window(20))]
#[case::softcap([1, 40, 40, 2, 2, 32, 32], AttnOptions::causal().with_softcap(3.0))]
#[case::decoding([2, 3, 50, 2, 2, 32, 32], AttnOptions::causal())]
#[case::t1500_d60([1, 1500, 1500, 2, 1, 60, 60], AttnOptions::causal())]
#[case::varlen_empty([1, 81, 81, 2, 1, 32, 32], AttnOptions::causal().with_cu_seqlens(vec![0, 15, 15, 80, 81]))]
fn autodiff_matches_reference(
    #[case] dims: Dims,
    #[case] opts: AttnOptions,
    #[values(Impl::Fusion, Impl::Cube, Impl::TensorOps)] imp: Impl,
) {
    against_reference(imp, dims, opts);
}

/// The fused op and the tensor-op fallback agree with each other, not only with the reference.
#[test]
fn fused_matches_tensor_ops() {
    let opts = AttnOptions::causal().with_window(33);
    let c = case([2, 90, 90, 4, 2, 48, 40], &opts);
    let a = run_on(Impl::Fusion, &c, &opts).unwrap();
    let b = run_on(Impl::TensorOps, &c, &opts).unwrap();
    let tol = tolerance(Impl::Fusion);
    for (name, x, y) in [
        ("o", &a.o, &b.o),
        ("dq", &a.dq, &b.dq),
        ("dk", &a.dk, &b.dk),
        ("dv", &a.dv, &b.dv),
    ] {
        check(name, x, y, tol);
    }
}

/// Half precision through the fused backend under `Autodiff`, output and every gradient: f16,
/// and bf16 where the device computes it (elsewhere the typed refusal).
#[rstest]
fn half_precision(#[values(FloatDType::F16, FloatDType::BF16)] dtype: FloatDType) {
    fn go<B: AttentionBackend>(dtype: FloatDType) {
        let device = B::Device::default();
        let opts = AttnOptions::causal();
        let c = case([2, 70, 70, 2, 2, 64, 64], &opts);
        let got = run::<B>(&c, &opts, dtype);
        if B::attn_check_dtype(&device, dtype.into()).is_err() {
            assert!(
                matches!(got, Err(FlaError::UnsupportedDType { .. })),
                "{dtype:?} is not computed here, and must be refused: {got:?}"
            );
            return;
        }
        let r = got.expect("valid inputs");
        // The reference sees f32 inputs; the kernel rounds them to half precision.
        against(&r, &c, half_tolerance(dtype));
    }
    on_gpu!(fusion, go(dtype));
}

/// Typed errors, before anything reaches the device.
#[rstest]
#[case::heads([1, 8, 8, 3, 2, 16, 16], AttnOptions::causal(), "multiple")]
#[case::key_dim([1, 8, 8, 2, 2, 16, 16], AttnOptions::default(), "must be [B, T_k, HK, K]")]
#[case::queries_after_keys([1, 9, 8, 2, 2, 16, 16], AttnOptions::causal(), "must not exceed")]
#[case::zero_window([1, 8, 8, 2, 2, 16, 16], AttnOptions::causal().with_window(0), "window")]
#[case::bad_cap([1, 8, 8, 2, 2, 16, 16], AttnOptions::causal().with_softcap(f64::NAN), "soft cap")]
#[case::cu_seqlens([1, 8, 8, 2, 2, 16, 16], AttnOptions::causal().with_cu_seqlens(vec![0, 5]), "cu_seqlens")]
fn bad_input(#[case] dims: Dims, #[case] opts: AttnOptions, #[case] needle: &str) {
    fn go<B: AttentionBackend>(dims: Dims, opts: AttnOptions) -> Result<(), FlaError> {
        let device = B::Device::default();
        let [b, tq, tk, h, hk, kd, vd] = dims;
        let z = |s: [usize; 4]| Tensor::<B, 4>::zeros(s, &device);
        // The key-dim case hands k a head dim that differs from q's.
        let kd_k = if opts.causal || opts.window.is_some() || opts.softcap.is_some() {
            kd
        } else {
            kd + 1
        };
        parallel_attn(
            z([b, tq, h, kd]),
            z([b, tk, hk, kd_k]),
            z([b, tk, hk, vd]),
            opts,
        )?;
        Ok(())
    }
    for imp in [Impl::Fusion, Impl::TensorOps] {
        let err = match imp {
            Impl::Fusion => on_gpu!(fusion, go(dims, opts.clone())),
            _ => go::<common::backends::NdArray>(dims, opts.clone()),
        }
        .expect_err("refused");
        assert!(err.to_string().contains(needle), "{imp:?}: {err}");
    }
}

/// A device limit is an error from the call, also through Burn's fusion stream (which defers the
/// launch) and autodiff (which defers the backward): one query against 2^20 + 32 keys needs
/// 65,538 blocks of 16 keys in the `dk`/`dv` kernel, past a wgpu grid's 65,535 a dimension on
/// lavapipe, so even the forward is refused there. GPUs take 64-key blocks (CUDA's grid is
/// larger still) and compute it, checked against the reference.
#[rstest]
fn keys_past_the_grid(#[values(Impl::Fusion, Impl::Cube)] imp: Impl) {
    let opts = AttnOptions::default();
    let c = case([1, 1, (1 << 20) + 32, 1, 1, 16, 16], &opts);
    let got = run_on(imp, &c, &opts);
    if common::is_cpu_vulkan() {
        match got {
            Err(FlaError::Kernel(m)) => assert!(m.contains("grid"), "{m}"),
            other => panic!("expected the grid's refusal, got {:?}", other.map(|_| ())),
        }
        return;
    }
    let r = got.expect("the device's grid holds the key blocks");
    against(&r, &c, tolerance(imp));
}
