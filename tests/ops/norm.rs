//! The fused RMSNorm (plain and swish-gated) as a Burn op end to end: fused (`Wgpu`/`Cuda`, with
//! and without fusion) and tensor-op (NdArray) implementations under `Autodiff`, against the f64
//! reference and each other, inside a larger graph (the gradient reaches inputs through other
//! ops), half precision, and the typed errors of bad input.

use crate::common::{self, check, half_tolerance, tensor, tolerance, values, Impl};
use burn::backend::Autodiff;
use burn::tensor::{FloatDType, Tensor};
use fla::kernels::norm::NormProblem;
use fla::kernels::testing::NormCase;
use fla::kernels::FloatDType as KernelDType;
use fla::ops::{rms_norm, rms_norm_gated, NormBackend};
use fla::FlaError;
use rstest::rstest;

#[derive(Debug)]
struct Run {
    y: Vec<f64>,
    dx: Vec<f64>,
    dw: Vec<f64>,
    dg: Vec<f64>,
}

fn case(shape: [usize; 3], gated: bool, eps: f32) -> NormCase {
    let [b, t, d] = shape;
    let p = NormProblem {
        rows: b * t,
        dim: d,
        eps,
        gated,
        dtype: KernelDType::F32,
    };
    NormCase::new(p, 1.0, (b * 1000 + t * 10 + d) as u64 * 2 + gated as u64)
}

/// Forward and backward through `Autodiff<B>` with the loss `Σ y ∘ dy`, `x: [B, T, D]`, in `dt`.
fn run<B: NormBackend>(c: &NormCase, shape: [usize; 3], dt: FloatDType) -> Result<Run, FlaError> {
    let device = B::Device::default();
    let x = tensor::<Autodiff<B>, 3>(&c.x, shape, dt, &device).require_grad();
    let w = tensor::<Autodiff<B>, 1>(&c.w, [c.p.dim], dt, &device).require_grad();
    let g =
        c.p.gated
            .then(|| tensor::<Autodiff<B>, 3>(&c.g, shape, dt, &device).require_grad());
    let y = match &g {
        Some(g) => rms_norm_gated(x.clone(), g.clone(), w.clone(), c.p.eps as f64)?,
        None => rms_norm(x.clone(), w.clone(), c.p.eps as f64)?,
    };
    assert_eq!(y.dtype(), dt.into());
    let dy = tensor::<Autodiff<B>, 3>(&c.dy, shape, dt, &device);
    let grads = (y.clone() * dy).sum().backward();
    let dg = g.map_or_else(Vec::new, |g| {
        values(g.grad(&grads).expect("gradient reached the gate"))
    });
    Ok(Run {
        y: values(y.inner()),
        dx: values(x.grad(&grads).expect("gradient reached x")),
        dw: values(w.grad(&grads).expect("gradient reached the weight")),
        dg,
    })
}

fn run_on(imp: Impl, c: &NormCase, shape: [usize; 3]) -> Result<Run, FlaError> {
    match imp {
        Impl::Fusion => on_gpu!(fusion, run(c, shape, FloatDType::F32)),
        Impl::Cube => on_gpu!(cube, run(c, shape, FloatDType::F32)),
        Impl::TensorOps => run::<common::backends::NdArray>(c, shape, FloatDType::F32),
    }
}

#[rstest]
#[case::one_token([1, 1, 64])]
#[case::head_dim_60([2, 63, 60])]
#[case::head_dim_100([3, 65, 100])]
#[case::hidden([1, 33, 1024])]
#[case::t1500([1, 1500, 60])]
fn matches_reference(
    #[case] shape: [usize; 3],
    #[values(false, true)] gated: bool,
    #[values(Impl::Fusion, Impl::Cube, Impl::TensorOps)] imp: Impl,
) {
    let c = case(shape, gated, 1e-6);
    let out = run_on(imp, &c, shape).expect("valid inputs");
    let (f, g) = c.reference();
    let tol = tolerance(imp);
    check("y", &out.y, &f.y, tol);
    check("dx", &out.dx, &g.dx, tol);
    check("dw", &out.dw, &g.dw, tol);
    check("dg", &out.dg, &g.dg, tol);
}

/// Burn's own `RmsNorm` (what the models ran before) gives the same output and gradients.
#[rstest]
fn matches_burn_rms_norm(#[values(Impl::Fusion, Impl::TensorOps)] imp: Impl) {
    fn go<B: NormBackend>(c: &NormCase, shape: [usize; 3]) -> Run {
        let device = B::Device::default();
        let dt = FloatDType::F32;
        let x = tensor::<Autodiff<B>, 3>(&c.x, shape, dt, &device).require_grad();
        let mut norm = burn::nn::RmsNormConfig::new(c.p.dim)
            .with_epsilon(c.p.eps as f64)
            .init::<Autodiff<B>>(&device);
        norm.gamma = burn::module::Param::from_tensor(tensor::<Autodiff<B>, 1>(
            &c.w,
            [c.p.dim],
            dt,
            &device,
        ));
        let y = norm.forward(x.clone());
        let dy = tensor::<Autodiff<B>, 3>(&c.dy, shape, dt, &device);
        let grads = (y.clone() * dy).sum().backward();
        Run {
            y: values(y.inner()),
            dx: values(x.grad(&grads).unwrap()),
            dw: values(norm.gamma.val().grad(&grads).unwrap()),
            dg: Vec::new(),
        }
    }
    let shape = [2, 17, 96];
    let c = case(shape, false, 1e-5);
    let burn = match imp {
        Impl::TensorOps => go::<common::backends::NdArray>(&c, shape),
        _ => on_gpu!(fusion, go(&c, shape)),
    };
    let ours = run_on(imp, &c, shape).unwrap();
    let tol = 10.0 * tolerance(imp);
    check("y", &ours.y, &burn.y, tol);
    check("dx", &ours.dx, &burn.dx, tol);
    check("dw", &ours.dw, &burn.dw, tol);
}

/// Half precision through the fused backend under `Autodiff`, output and every gradient: f16,
/// and bf16 where the device computes it (elsewhere the typed refusal).
#[rstest]
fn half_precision(#[values(FloatDType::F16, FloatDType::BF16)] dtype: FloatDType) {
    fn go<B: NormBackend>(dtype: FloatDType) {
        let device = B::Device::default();
        let shape = [2, 40, 100];
        let c = case(shape, true, 1e-5);
        let got = run::<B>(&c, shape, dtype);
        if B::norm_check_dtype(&device, dtype.into()).is_err() {
            assert!(
                matches!(got, Err(FlaError::UnsupportedDType { .. })),
                "{dtype:?} is not computed here, and must be refused: {got:?}"
            );
            return;
        }
        let r = got.expect("valid inputs");
        // The reference sees f32 inputs; the op rounds them to half precision.
        let (fwd, grads) = c.reference();
        let tol = half_tolerance(dtype);
        check("y", &r.y, &fwd.y, tol);
        check("dx", &r.dx, &grads.dx, tol);
        check("dw", &r.dw, &grads.dw, tol);
        check("dg", &r.dg, &grads.dg, tol);
    }
    on_gpu!(fusion, go(dtype));
}

/// Typed errors, before anything reaches the device.
#[rstest]
#[case::weight([2, 3, 8], [7], false, 1e-5, "weight w must be [8]")]
#[case::gate([2, 3, 8], [8], true, 1e-5, "gate g must be [2, 3, 8]")]
#[case::empty([2, 0, 8], [8], false, 1e-5, "zero-length")]
#[case::eps([2, 3, 8], [8], false, -1.0, "eps")]
fn bad_input(
    #[case] shape: [usize; 3],
    #[case] w_shape: [usize; 1],
    #[case] bad_gate: bool,
    #[case] eps: f64,
    #[case] needle: &str,
) {
    fn go<B: NormBackend>(
        shape: [usize; 3],
        w_shape: [usize; 1],
        bad_gate: bool,
        eps: f64,
    ) -> Result<(), FlaError> {
        let device = B::Device::default();
        let x = Tensor::<B, 3>::ones(shape, &device);
        let w = Tensor::<B, 1>::ones(w_shape, &device);
        if bad_gate {
            let g = Tensor::<B, 3>::ones([shape[0], shape[1], shape[2] + 1], &device);
            rms_norm_gated(x, g, w, eps)?;
        } else {
            rms_norm(x, w, eps)?;
        }
        Ok(())
    }
    for imp in [Impl::Fusion, Impl::TensorOps] {
        let err = match imp {
            Impl::Fusion => on_gpu!(fusion, go(shape, w_shape, bad_gate, eps)),
            _ => go::<common::backends::NdArray>(shape, w_shape, bad_gate, eps),
        }
        .expect_err("refused");
        assert!(err.to_string().contains(needle), "{imp:?}: {err}");
    }
}

/// Mixed dtypes are refused by name.
#[test]
fn mixed_dtypes() {
    type B = common::backends::NdArray;
    let device = Default::default();
    let x = Tensor::<B, 2>::ones([2, 8], &device);
    let w = Tensor::<B, 1>::ones([8], &device).cast(FloatDType::F64);
    let err = rms_norm(x, w, 1e-5).expect_err("refused");
    assert!(matches!(err, FlaError::DType(_)), "{err}");
}
