//! SwiGLU's fused activation as a Burn op end to end: fused (`Wgpu`/`Cuda`, with and without
//! fusion) and tensor-op (NdArray) implementations under `Autodiff`, against the f64 reference
//! and Burn's own `silu(g) * u`, half precision, and the typed errors of bad input.

use crate::common::{self, check, half_tolerance, tensor, tolerance, values, Impl};
use burn::backend::Autodiff;
use burn::tensor::activation::silu;
use burn::tensor::{FloatDType, Tensor};
use fla::kernels::swiglu::naive;
use fla::kernels::testing::Rng;
use fla::ops::{swiglu, SwigluBackend};
use fla::FlaError;
use rstest::rstest;

struct Case {
    shape: [usize; 3],
    g: Vec<f64>,
    u: Vec<f64>,
    dy: Vec<f64>,
}

fn case(shape: [usize; 3], seed: u64) -> Case {
    let n = shape.iter().product();
    let mut rng = Rng::new(seed);
    let mut normals = |scale: f64| -> Vec<f64> {
        (0..n)
            .map(|_| (scale * rng.normal()) as f32 as f64)
            .collect()
    };
    Case {
        shape,
        g: normals(3.0),
        u: normals(1.0),
        dy: normals(1.0),
    }
}

/// `y`, `dg`, `du` through `Autodiff<B>` with the loss `Σ y ∘ dy`, in `dt`; `burn` computes
/// Burn's own `silu(g) * u` instead of the op.
fn run<B: SwigluBackend>(c: &Case, burn: bool, dt: FloatDType) -> Result<[Vec<f64>; 3], FlaError> {
    let device = B::Device::default();
    let t = |x: &[f64]| tensor::<Autodiff<B>, 3>(x, c.shape, dt, &device);
    let (g, u) = (t(&c.g).require_grad(), t(&c.u).require_grad());
    let y = if burn {
        silu(g.clone()) * u.clone()
    } else {
        swiglu(g.clone(), u.clone())?
    };
    assert_eq!(y.dtype(), dt.into());
    let grads = (y.clone() * t(&c.dy)).sum().backward();
    Ok([
        values(y.inner()),
        values(g.grad(&grads).expect("gradient reached g")),
        values(u.grad(&grads).expect("gradient reached u")),
    ])
}

fn run_on(imp: Impl, c: &Case, burn: bool) -> Result<[Vec<f64>; 3], FlaError> {
    match imp {
        Impl::Fusion => on_gpu!(fusion, run(c, burn, FloatDType::F32)),
        Impl::Cube => on_gpu!(cube, run(c, burn, FloatDType::F32)),
        Impl::TensorOps => run::<common::backends::NdArray>(c, burn, FloatDType::F32),
    }
}

#[rstest]
fn matches_reference(
    #[values([1, 1, 7], [2, 33, 100], [1, 1500, 60])] shape: [usize; 3],
    #[values(Impl::Fusion, Impl::Cube, Impl::TensorOps)] imp: Impl,
) {
    let c = case(shape, shape.iter().product::<usize>() as u64);
    let [y, dg, du] = run_on(imp, &c, false).expect("valid inputs");
    let (want_dg, want_du) = naive::backward(&c.g, &c.u, &c.dy);
    let tol = tolerance(imp);
    check("y", &y, &naive::forward(&c.g, &c.u), tol);
    check("dg", &dg, &want_dg, tol);
    check("du", &du, &want_du, tol);
}

/// The same as Burn's own `silu(g) * u` (what the MLPs ran before), output and gradients.
#[rstest]
fn matches_burn_silu(#[values(Impl::Fusion, Impl::TensorOps)] imp: Impl) {
    let c = case([3, 17, 64], 11);
    let ours = run_on(imp, &c, false).unwrap();
    let burn = run_on(imp, &c, true).unwrap();
    for (name, a, b) in [("y", 0, 0), ("dg", 1, 1), ("du", 2, 2)] {
        check(name, &ours[a], &burn[b], 10.0 * tolerance(imp));
    }
}

/// Half precision through the fused backend under `Autodiff`, output and gradients: f16, and
/// bf16 where the device computes it (elsewhere the typed refusal).
#[rstest]
fn half_precision(#[values(FloatDType::F16, FloatDType::BF16)] dtype: FloatDType) {
    fn go<B: SwigluBackend>(dtype: FloatDType) {
        let device = B::Device::default();
        let c = case([2, 40, 96], 5);
        let got = run::<B>(&c, false, dtype);
        if B::swiglu_check_dtype(&device, dtype.into()).is_err() {
            assert!(
                matches!(got, Err(FlaError::UnsupportedDType { .. })),
                "{dtype:?} is not computed here, and must be refused: {got:?}"
            );
            return;
        }
        let [y, dg, du] = got.expect("valid inputs");
        // The reference sees f32 inputs; the op rounds them to half precision.
        let (want_dg, want_du) = naive::backward(&c.g, &c.u, &c.dy);
        let tol = half_tolerance(dtype);
        check("y", &y, &naive::forward(&c.g, &c.u), tol);
        check("dg", &dg, &want_dg, tol);
        check("du", &du, &want_du, tol);
    }
    on_gpu!(fusion, go(dtype));
}

/// Typed errors, before anything reaches the device.
#[rstest]
#[case::shapes([2, 3, 8], [2, 3, 9], "u must be [2, 3, 8]")]
#[case::empty([2, 0, 8], [2, 0, 8], "zero-length")]
fn bad_input(#[case] g: [usize; 3], #[case] u: [usize; 3], #[case] needle: &str) {
    fn go<B: SwigluBackend>(g: [usize; 3], u: [usize; 3]) -> Result<(), FlaError> {
        let device = B::Device::default();
        swiglu(
            Tensor::<B, 3>::ones(g, &device),
            Tensor::<B, 3>::ones(u, &device),
        )?;
        Ok(())
    }
    for imp in [Impl::Fusion, Impl::TensorOps] {
        let err = match imp {
            Impl::Fusion => on_gpu!(fusion, go(g, u)),
            _ => go::<common::backends::NdArray>(g, u),
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
    let g = Tensor::<B, 2>::ones([2, 8], &device);
    let u = Tensor::<B, 2>::ones([2, 8], &device).cast(FloatDType::F64);
    let err = swiglu(g, u).expect_err("refused");
    assert!(matches!(err, FlaError::DType(_)), "{err}");
}
