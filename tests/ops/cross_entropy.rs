//! The fused cross-entropy as a Burn op end to end: fused (`Wgpu`/`Cuda`, with and without fusion)
//! and tensor-op (NdArray) implementations under `Autodiff`, against the f64 reference and
//! Burn's own `CrossEntropyLoss`, ignored and out-of-range targets, half precision, and the typed
//! errors of bad input.

use crate::common::{self, check, tensor, tolerance, values, Impl};
use burn::backend::Autodiff;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::tensor::backend::Backend;
use burn::tensor::{FloatDType, Int, IntDType, Tensor, TensorData};
use fla::kernels::cross_entropy::naive;
use fla::kernels::testing::Rng;
use fla::ops::{cross_entropy, cross_entropy_mean, CrossEntropyBackend};
use fla::FlaError;
use rstest::rstest;

struct Case {
    rows: usize,
    vocab: usize,
    logits: Vec<f64>,
    targets: Vec<i64>,
    dloss: Vec<f64>,
}

/// Logits `3 ×` standard normal (f32 values), uniform targets, `dloss` uniform in [0, 1).
fn case(rows: usize, vocab: usize, seed: u64) -> Case {
    let mut rng = Rng::new(seed);
    Case {
        rows,
        vocab,
        logits: (0..rows * vocab)
            .map(|_| (3.0 * rng.normal()) as f32 as f64)
            .collect(),
        targets: (0..rows)
            .map(|_| (rng.next_u64() % vocab as u64) as i64)
            .collect(),
        dloss: (0..rows).map(|_| rng.uniform() as f32 as f64).collect(),
    }
}

fn targets<B: Backend>(t: &[i64], device: &B::Device) -> Tensor<B, 1, Int> {
    Tensor::from_data(TensorData::new(t.to_vec(), [t.len()]), device)
}

/// Per-row loss and `dlogits` through `Autodiff<B>` with the loss `Σ loss ∘ dloss`; the targets
/// in `int` (the backend's own int type when `None`).
fn run<B: CrossEntropyBackend>(
    c: &Case,
    dtype: FloatDType,
    int: Option<IntDType>,
) -> Result<[Vec<f64>; 2], FlaError> {
    let device = B::Device::default();
    let x = tensor::<Autodiff<B>, 2>(&c.logits, [c.rows, c.vocab], dtype, &device).require_grad();
    let mut t = targets::<Autodiff<B>>(&c.targets, &device);
    if let Some(int) = int {
        t = t.cast(int);
    }
    let loss = cross_entropy(x.clone(), t)?;
    let d = tensor::<Autodiff<B>, 1>(&c.dloss, [c.rows], FloatDType::F32, &device);
    let grads = (loss.clone() * d).sum().backward();
    Ok([
        values(loss.inner()),
        values(x.grad(&grads).expect("gradient reached the logits")),
    ])
}

fn run_on(imp: Impl, c: &Case, int: Option<IntDType>) -> Result<[Vec<f64>; 2], FlaError> {
    let dt = FloatDType::F32;
    match imp {
        Impl::Fusion => on_gpu!(fusion, run(c, dt, int)),
        Impl::Cube => on_gpu!(cube, run(c, dt, int)),
        Impl::TensorOps => run::<common::backends::NdArray>(c, dt, int),
    }
}

fn check_case(c: &Case, [loss, dx]: &[Vec<f64>; 2], tol: f64) {
    let (want_loss, _) = naive::forward(&c.logits, &c.targets, c.vocab);
    check("loss", loss, &want_loss, tol);
    let want_dx = naive::backward(&c.logits, &c.targets, c.vocab, &c.dloss);
    check("dlogits", dx, &want_dx, tol);
}

#[rstest]
fn matches_reference(
    #[values((1, 1), (7, 300), (65, 1000), (3, 32000))] shape: (usize, usize),
    #[values(Impl::Fusion, Impl::Cube, Impl::TensorOps)] imp: Impl,
) {
    let (rows, vocab) = shape;
    let mut c = case(rows, vocab, (rows * vocab) as u64);
    // One ignored row where there are several.
    if rows > 1 {
        c.targets[1] = -100;
    }
    let out = run_on(imp, &c, None).expect("valid inputs");
    check_case(&c, &out, tolerance(imp));
}

/// Targets of another int type than the backend's (the fused kernels read `i32`).
#[rstest]
fn other_int_types(
    #[values(IntDType::I64, IntDType::I32, IntDType::U32)] int: IntDType,
    #[values(Impl::Fusion, Impl::Cube, Impl::TensorOps)] imp: Impl,
) {
    let mut c = case(9, 500, 3);
    if int != IntDType::U32 {
        c.targets[2] = -100;
    }
    let out = run_on(imp, &c, Some(int)).expect("valid inputs");
    check_case(&c, &out, tolerance(imp));
}

/// The mean over the rows not ignored equals Burn's `CrossEntropyLoss` on the same rows, loss and
/// gradient (Burn's in `f32` logits; what the language models ran before).
#[rstest]
fn matches_burn_cross_entropy(#[values(Impl::Fusion, Impl::TensorOps)] imp: Impl) {
    fn go<B: CrossEntropyBackend>(c: &Case, ours: bool) -> [Vec<f64>; 2] {
        let device = B::Device::default();
        let shape = [c.rows, c.vocab];
        let x = tensor::<Autodiff<B>, 2>(&c.logits, shape, FloatDType::F32, &device).require_grad();
        let t = targets::<Autodiff<B>>(&c.targets, &device);
        let loss = if ours {
            cross_entropy_mean(x.clone(), t).expect("valid inputs")
        } else {
            CrossEntropyLossConfig::new()
                .init(&device)
                .forward(x.clone(), t)
        };
        let grads = loss.clone().backward();
        [values(loss.inner()), values(x.grad(&grads).unwrap())]
    }
    let c = case(40, 700, 17);
    let (ours, burn) = match imp {
        Impl::Fusion => (
            on_gpu!(fusion, go(&c, true)),
            on_gpu!(fusion, go(&c, false)),
        ),
        _ => {
            type B = common::backends::NdArray;
            (go::<B>(&c, true), go::<B>(&c, false))
        }
    };
    check("loss", &ours[0], &burn[0], 10.0 * tolerance(imp));
    check("dlogits", &ours[1], &burn[1], 10.0 * tolerance(imp));
}

/// The mean skips ignored rows, in count and in sum; every row ignored gives 0.
#[rstest]
fn mean_skips_ignored_rows(#[values(Impl::Fusion, Impl::TensorOps)] imp: Impl) {
    fn go<B: CrossEntropyBackend>(c: &Case) -> f64 {
        let device = B::Device::default();
        let x = tensor::<B, 2>(&c.logits, [c.rows, c.vocab], FloatDType::F32, &device);
        values(cross_entropy_mean(x, targets::<B>(&c.targets, &device)).unwrap())[0]
    }
    let mut c = case(6, 50, 23);
    c.targets[0] = -1;
    c.targets[3] = -100;
    let (loss, _) = naive::forward(&c.logits, &c.targets, c.vocab);
    let want = loss.iter().sum::<f64>() / 4.0;
    let got = match imp {
        Impl::Fusion => on_gpu!(fusion, go(&c)),
        _ => go::<common::backends::NdArray>(&c),
    };
    check("mean", &[got], &[want], tolerance(imp));
    c.targets = vec![-100; 6];
    let got = match imp {
        Impl::Fusion => on_gpu!(fusion, go(&c)),
        _ => go::<common::backends::NdArray>(&c),
    };
    assert_eq!(got, 0.0);
}

/// A target at or past the vocabulary makes its own row NaN (loss and gradient), not another's.
#[rstest]
fn out_of_range_target_is_nan(#[values(Impl::Fusion, Impl::TensorOps)] imp: Impl) {
    let mut c = case(4, 64, 29);
    c.targets[2] = 64;
    let [loss, dx] = run_on(imp, &c, None).expect("valid shapes");
    assert!(loss[2].is_nan() && dx[128..192].iter().all(|g| g.is_nan()));
    let finite = |xs: &[f64]| xs.iter().all(|x| x.is_finite());
    assert!(finite(&loss[..2]) && finite(&loss[3..]) && finite(&dx[..128]) && finite(&dx[192..]));
}

/// Half-precision logits through the fused backend: the loss and its sums in `f32`, the gradient
/// in the logits' dtype (bf16 where the device computes it; elsewhere the typed refusal).
#[rstest]
fn half_precision(#[values(FloatDType::F16, FloatDType::BF16)] dtype: FloatDType) {
    fn go<B: CrossEntropyBackend>(dtype: FloatDType) {
        let device = B::Device::default();
        let mut c = case(20, 3000, 5);
        let x = || tensor::<B, 2>(&c.logits, [c.rows, c.vocab], dtype, &device);
        if B::cross_entropy_check_dtype(&device, dtype.into()).is_err() {
            // Nothing read back: the device cannot cast to the dtype either.
            let r = cross_entropy(x(), targets::<B>(&c.targets, &device));
            assert!(
                matches!(r, Err(FlaError::UnsupportedDType { .. })),
                "{dtype:?} is not computed here, and must be refused: {r:?}"
            );
            return;
        }
        // The reference sees the logits as rounded to the dtype.
        c.logits = values(x());
        let out = run::<B>(&c, dtype, None).expect("valid inputs");
        let (want, _) = naive::forward(&c.logits, &c.targets, c.vocab);
        check("loss", &out[0], &want, 1e-5);
        let want_dx = naive::backward(&c.logits, &c.targets, c.vocab, &c.dloss);
        check("dlogits", &out[1], &want_dx, 1e-2);
    }
    on_gpu!(fusion, go(dtype));
}

/// Typed errors, before anything reaches the device.
#[rstest]
#[case::targets_length([4, 10], 3, "targets must be [4]")]
#[case::no_rows([0, 10], 0, "0 rows")]
#[case::no_vocabulary([4, 0], 4, "of 0 logits")]
fn bad_input(#[case] logits: [usize; 2], #[case] rows: usize, #[case] needle: &str) {
    fn go<B: CrossEntropyBackend>(logits: [usize; 2], rows: usize) -> Result<(), FlaError> {
        let device = B::Device::default();
        cross_entropy(
            Tensor::<B, 2>::ones(logits, &device),
            targets::<B>(&vec![0; rows], &device),
        )?;
        Ok(())
    }
    for imp in [Impl::Fusion, Impl::TensorOps] {
        let err = match imp {
            Impl::Fusion => on_gpu!(fusion, go(logits, rows)),
            _ => go::<common::backends::NdArray>(logits, rows),
        }
        .expect_err("refused");
        assert!(err.to_string().contains(needle), "{imp:?}: {err}");
    }
}

/// On a backend whose default float is half precision, the mean stays in `f32` (it divides the
/// `f32` losses by a count; a count in the default float mixed dtypes and failed), and so does its
/// gradient's path back to the half-precision logits.
#[test]
fn mean_on_a_half_precision_default() {
    fn go<B: CrossEntropyBackend>() {
        let device = Default::default();
        let c = case(300, 70, 31);
        let x = tensor::<Autodiff<B>, 2>(&c.logits, [c.rows, c.vocab], FloatDType::F16, &device)
            .require_grad();
        let loss = cross_entropy_mean(x.clone(), targets::<Autodiff<B>>(&c.targets, &device))
            .expect("valid inputs");
        assert_eq!(loss.dtype(), burn::tensor::DType::F32);
        let grads = loss.clone().backward();
        let logits = values(x.clone().inner());
        let (want, _) = naive::forward(&logits, &c.targets, c.vocab);
        let mean = want.iter().sum::<f64>() / c.rows as f64;
        check("mean", &values(loss.inner()), &[mean], 1e-5);
        let dx = values(x.grad(&grads).expect("gradient reached the logits"));
        let want_dx = naive::backward(
            &logits,
            &c.targets,
            c.vocab,
            &vec![1.0 / c.rows as f64; c.rows],
        );
        check("dlogits", &dx, &want_dx, 1e-2);
    }
    // The selected runtime's backend with f16 as its default float (on the GPU machine the
    // tests run CUDA, and no Vulkan driver may be there).
    match common::runtime_name() {
        #[cfg(feature = "cuda")]
        "cuda" => {
            go::<burn_cubecl::CubeBackend<cubecl::cuda::CudaRuntime, burn::tensor::f16, i32, u8>>()
        }
        #[cfg(feature = "wgpu")]
        _ => {
            go::<burn_cubecl::CubeBackend<cubecl::wgpu::WgpuRuntime, burn::tensor::f16, i32, u32>>()
        }
        #[cfg(not(feature = "wgpu"))]
        other => panic!("runtime {other} not compiled in"),
    }
}
