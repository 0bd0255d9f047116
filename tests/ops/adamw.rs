//! The fused AdamW step as a Burn op and as an optimiser: every implementation (fused with and
//! without fusion, tensor ops) against the f64 reference; `FusedAdamW` against Burn's own
//! `AdamW` over several steps of a small model, their records interchanged; in-place updates
//! that leave shared tensors alone; half precision; typed errors.

use crate::common::{self, check, tensor, tolerance, values, Impl};
use burn::backend::Autodiff;
use burn::grad_clipping::GradientClippingConfig;
use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::optim::{AdamWConfig, GradientsParams, Optimizer, SimpleOptimizer};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Distribution, FloatDType, Tensor};
use fla::kernels::adamw::{min_positive, naive};
use fla::kernels::testing::{adamw_step as hyper, Rng};
use fla::ops::{adamw_step, AdamWBackend, AdamWStep, FusedAdamWConfig, GradClip};
use fla::FlaError;
use rstest::rstest;

struct Case {
    shape: [usize; 2],
    param: Vec<f64>,
    grad: Vec<f64>,
    m: Vec<f64>,
    v: Vec<f64>,
}

fn case(shape: [usize; 2], seed: u64) -> Case {
    let n = shape.iter().product();
    let mut rng = Rng::new(seed);
    let mut normals = |scale: f64| -> Vec<f64> {
        (0..n)
            .map(|_| (scale * rng.normal()) as f32 as f64)
            .collect()
    };
    let (param, grad, m) = (normals(1.0), normals(1.0), normals(0.1));
    let v = normals(0.1).iter().map(|x| (x * x) as f32 as f64).collect();
    Case {
        shape,
        param,
        grad,
        m,
        v,
    }
}

fn run<B: AdamWBackend>(
    c: &Case,
    s: &AdamWStep,
    has_state: bool,
) -> Result<[Vec<f64>; 3], FlaError> {
    let device = B::Device::default();
    let t = |x: &[f64]| tensor::<B, 2>(x, c.shape, FloatDType::F32, &device);
    let moments = has_state.then(|| (t(&c.m), t(&c.v)));
    let [p, m, v] = adamw_step(t(&c.param), t(&c.grad), moments, s)?;
    Ok([values(p), values(m), values(v)])
}

fn run_on(imp: Impl, c: &Case, s: &AdamWStep, has_state: bool) -> Result<[Vec<f64>; 3], FlaError> {
    match imp {
        Impl::Fusion => on_gpu!(fusion, run(c, s, has_state)),
        Impl::Cube => on_gpu!(cube, run(c, s, has_state)),
        Impl::TensorOps => run::<common::backends::NdArray>(c, s, has_state),
    }
}

#[rstest]
fn matches_reference(
    #[values([1, 1], [63, 65], [3, 1500])] shape: [usize; 2],
    #[values(None, Some(GradClip::Norm(1.0)), Some(GradClip::Value(0.5)))] clip: Option<GradClip>,
    #[values(false, true)] has_state: bool,
    #[values(Impl::Fusion, Impl::Cube, Impl::TensorOps)] imp: Impl,
) {
    let c = case(shape, shape.iter().product::<usize>() as u64);
    let s = AdamWStep {
        cautious_weight_decay: has_state,
        ..hyper(if has_state { 6 } else { 1 }, clip)
    };
    let [p, m, v] = run_on(imp, &c, &s, has_state).expect("valid inputs");
    let state = has_state.then_some((&c.m[..], &c.v[..]));
    let tiny = min_positive(fla::kernels::FloatDType::F32) as f64;
    let [want_p, want_m, want_v] = naive::step(&c.param, &c.grad, state, &s, tiny);
    let tol = tolerance(imp);
    check("m", &m, &want_m, tol);
    check("v", &v, &want_v, tol);
    check("param", &p, &want_p, tol);
    let step = |out: &[f64]| -> Vec<f64> { out.iter().zip(&c.param).map(|(a, b)| a - b).collect() };
    check("update", &step(&p), &step(&want_p), 10.0 * tol);
}

/// Two layers, so that the optimiser steps parameters of two shapes and ranks.
#[derive(Module, Debug)]
struct Net<B: Backend> {
    a: Linear<B>,
    b: Linear<B>,
}

impl<B: Backend> Net<B> {
    fn new(device: &B::Device) -> Self {
        let net = Self {
            a: LinearConfig::new(60, 100).init(device),
            b: LinearConfig::new(100, 7).init(device),
        };
        // Burn initialises parameters lazily, on first use, and clones made before that draw
        // their own: read them once so that every clone holds the same values.
        flat(&net);
        net
    }

    fn loss(&self, x: Tensor<B, 2>) -> Tensor<B, 1> {
        self.b
            .forward(self.a.forward(x).tanh())
            .powi_scalar(2)
            .mean()
    }
}

fn flat<B: Backend>(net: &Net<B>) -> Vec<f64> {
    let mut out = values(net.a.weight.val());
    out.extend(values(net.a.bias.as_ref().expect("bias").val()));
    out.extend(values(net.b.bias.as_ref().expect("bias").val()));
    out.extend(values(net.b.weight.val()));
    out
}

fn train<B, O>(
    mut optim: O,
    mut net: Net<B>,
    batches: &[Tensor<B, 2>],
) -> (Vec<Vec<f64>>, O, Net<B>)
where
    B: AutodiffBackend,
    O: Optimizer<Net<B>, B>,
{
    let mut snapshots = Vec::new();
    for x in batches {
        let grads = GradientsParams::from_grads(net.loss(x.clone()).backward(), &net);
        net = optim.step(1e-2, net, grads);
        snapshots.push(flat(&net));
    }
    (snapshots, optim, net)
}

/// Several steps of a small model under `FusedAdamW` and under Burn's `AdamW`, same config:
/// the parameters agree after every step, with clipping by norm binding.
fn against_burn<B: AutodiffBackend>(clip: GradientClippingConfig)
where
    B::InnerBackend: AdamWBackend,
{
    let device = B::Device::default();
    // FusedAdamW takes tensor ops where the fused op cannot run; here it must run.
    assert!(
        B::InnerBackend::adamw_check_dtype(&device, burn::tensor::DType::F32).is_ok(),
        "the fused step does not run on this backend"
    );
    B::seed(&device, 7);
    let net = Net::<B>::new(&device);
    let batches: Vec<Tensor<B, 2>> = (0..4)
        .map(|_| Tensor::random([16, 60], Distribution::Normal(0.0, 1.0), &device))
        .collect();
    let ours = FusedAdamWConfig::new()
        .with_weight_decay(0.1)
        .with_grad_clipping(Some(clip.clone()))
        .init::<B, Net<B>>()
        .expect("valid config");
    let burn = AdamWConfig::new()
        .with_weight_decay(0.1)
        .with_grad_clipping(Some(clip))
        .init::<B, Net<B>>();
    let (a, _, _) = train(ours, net.clone(), &batches);
    let (b, _, _) = train(burn, net, &batches);
    for (step, (a, b)) in a.iter().zip(&b).enumerate() {
        // Both compute in f32 with the same formula; they differ in the order of the norm's
        // sum and the rounding of intermediates.
        check(&format!("parameters after step {}", step + 1), a, b, 1e-5);
    }
}

#[rstest]
#[case::norm(GradientClippingConfig::Norm(0.05))]
#[case::value(GradientClippingConfig::Value(0.01))]
fn optimizer_matches_burn_adamw(
    #[case] clip: GradientClippingConfig,
    #[values(Impl::Fusion, Impl::TensorOps)] imp: Impl,
) {
    match imp {
        Impl::TensorOps => against_burn::<Autodiff<common::backends::NdArray>>(clip),
        _ => match common::runtime_name() {
            #[cfg(feature = "cuda")]
            "cuda" => against_burn::<Autodiff<common::backends::CudaFused>>(clip),
            #[cfg(feature = "wgpu")]
            _ => against_burn::<Autodiff<common::backends::WgpuFused>>(clip),
            #[cfg(not(feature = "wgpu"))]
            other => panic!("runtime {other} not compiled in"),
        },
    }
}

/// `grads` scaled on the host as PyTorch's `clip_grad_norm_(max)` scales them: by
/// `min(1, max / (‖g‖ + 1e-6))`, `‖g‖` the L2 norm of all of them together (in f64); and
/// that coefficient.
fn scaled_by_global_norm<B: AutodiffBackend>(
    mut grads: GradientsParams,
    net: &Net<B>,
    max: f64,
) -> (GradientsParams, f64) {
    type I<B> = <B as AutodiffBackend>::InnerBackend;
    let weights = [net.a.weight.id, net.b.weight.id];
    let biases = [&net.a.bias, &net.b.bias].map(|b| b.as_ref().expect("bias").id);
    let squares = |x: Vec<f64>| x.iter().map(|x| x * x).sum::<f64>();
    let mut total = 0.0;
    for id in weights {
        total += squares(values(
            grads.get::<I<B>, 2>(id).expect("a weight's gradient"),
        ));
    }
    for id in biases {
        total += squares(values(grads.get::<I<B>, 1>(id).expect("a bias's gradient")));
    }
    let coef = (max / (total.sqrt() + 1e-6)).min(1.0);
    for id in weights {
        let g = grads.remove::<I<B>, 2>(id).expect("gradient");
        grads.register(id, g.mul_scalar(coef));
    }
    for id in biases {
        let g = grads.remove::<I<B>, 1>(id).expect("gradient");
        grads.register(id, g.mul_scalar(coef));
    }
    (grads, coef)
}

/// Clipping by the global norm: steps of a small model under `FusedAdamW` with
/// `max_global_norm` against Burn's `AdamW` (no clipping of its own) stepping on the same
/// gradients scaled on the host by PyTorch's coefficient; with the threshold binding (the
/// coefficient checked to be well below 1) and not.
fn global_against_burn<B: AutodiffBackend>(max: f32, binds: bool, tol: f64)
where
    B::InnerBackend: AdamWBackend,
{
    let device = B::Device::default();
    B::seed(&device, 5);
    let net = Net::<B>::new(&device);
    let batches: Vec<Tensor<B, 2>> = (0..3)
        .map(|_| Tensor::random([16, 60], Distribution::Normal(0.0, 1.0), &device))
        .collect();
    // ε = 1 (above √v here): the update is then nearly proportional to the clipped gradient,
    // where Adam's usual ε leaves it almost blind to a gradient's scale.
    let mut ours = FusedAdamWConfig::new()
        .with_weight_decay(0.1)
        .with_epsilon(1.0)
        .with_max_global_norm(Some(max))
        .init::<B, Net<B>>()
        .expect("valid config");
    let mut burn = AdamWConfig::new()
        .with_weight_decay(0.1)
        .with_epsilon(1.0)
        .init::<B, Net<B>>();
    let (mut a, mut b) = (net.clone(), net);
    for (step, x) in batches.iter().enumerate() {
        let grads = GradientsParams::from_grads(a.loss(x.clone()).backward(), &a);
        a = ours.step(1e-2, a, grads);
        let grads = GradientsParams::from_grads(b.loss(x.clone()).backward(), &b);
        let (grads, coef) = scaled_by_global_norm(grads, &b, max as f64);
        assert_eq!(coef < 0.5, binds, "step {}: coefficient {coef}", step + 1);
        b = burn.step(1e-2, b, grads);
        check(
            &format!("parameters after step {}", step + 1),
            &flat(&a),
            &flat(&b),
            tol,
        );
    }
}

#[rstest]
#[case::binds(0.01, true)]
#[case::does_not_bind(1e6, false)]
fn global_norm_clipping_matches_torch(
    #[case] max: f32,
    #[case] binds: bool,
    #[values(Impl::Fusion, Impl::Cube, Impl::TensorOps)] imp: Impl,
) {
    // On a GPU the two models' matmuls may take different kernels while autotune settles
    // (CUDA's f32 products run on tensor cores at reduced precision): measured on an H100, the
    // unfused backend's models drift apart by 1.3e-5-1.9e-5 in three steps without clipping.
    let tol = 1e-4;
    match imp {
        Impl::TensorOps => {
            global_against_burn::<Autodiff<common::backends::NdArray>>(max, binds, 1e-5)
        }
        Impl::Cube => match common::runtime_name() {
            #[cfg(feature = "cuda")]
            "cuda" => global_against_burn::<Autodiff<common::backends::CudaCube>>(max, binds, tol),
            #[cfg(feature = "wgpu")]
            _ => global_against_burn::<Autodiff<common::backends::WgpuCube>>(max, binds, tol),
            #[cfg(not(feature = "wgpu"))]
            other => panic!("runtime {other} not compiled in"),
        },
        _ => match common::runtime_name() {
            #[cfg(feature = "cuda")]
            "cuda" => global_against_burn::<Autodiff<common::backends::CudaFused>>(max, binds, tol),
            #[cfg(feature = "wgpu")]
            _ => global_against_burn::<Autodiff<common::backends::WgpuFused>>(max, binds, tol),
            #[cfg(not(feature = "wgpu"))]
            other => panic!("runtime {other} not compiled in"),
        },
    }
}

/// The global norm's coefficient as an op, on every implementation, against f64: gradients of
/// two ranks and odd sizes, binding and not.
#[rstest]
fn global_coefficient_matches_reference(
    #[values(0.5, 1e6)] max: f32,
    #[values(Impl::Fusion, Impl::Cube, Impl::TensorOps)] imp: Impl,
) {
    fn go<B: AdamWBackend>(max: f32, a: &Case, b: &Case) -> Result<f64, FlaError> {
        let device = B::Device::default();
        let t = |c: &Case| tensor::<B, 2>(&c.grad, c.shape, FloatDType::F32, &device);
        let grads = vec![
            t(a).into_primitive().tensor(),
            t(b).into_primitive().tensor(),
        ];
        let coef = B::global_clip_coefficient(grads, max)?;
        Ok(values(Tensor::<B, 1>::from_primitive(
            burn::tensor::TensorPrimitive::Float(coef),
        ))[0])
    }
    let (a, b) = (case([63, 65], 31), case([1, 1500], 37));
    let got = match imp {
        Impl::Fusion => on_gpu!(fusion, go(max, &a, &b)),
        Impl::Cube => on_gpu!(cube, go(max, &a, &b)),
        Impl::TensorOps => go::<common::backends::NdArray>(max, &a, &b),
    }
    .expect("valid gradients");
    let norm = a
        .grad
        .iter()
        .chain(&b.grad)
        .map(|x| x * x)
        .sum::<f64>()
        .sqrt();
    let want = (max as f64 / (norm + 1e-6)).min(1.0);
    assert!(
        (got - want).abs() <= 1e-5 * want,
        "{imp:?}: {got}, want {want}"
    );
}

/// Clipping per tensor and by the global norm at once, and a global threshold that is not
/// positive and finite, are refused when the optimiser is made.
#[rstest]
#[case::both(Some(GradientClippingConfig::Norm(1.0)), 1.0, "at once")]
#[case::zero(None, 0.0, "positive finite")]
#[case::nan(None, f32::NAN, "positive finite")]
fn bad_global_clipping_is_refused(
    #[case] per_tensor: Option<GradientClippingConfig>,
    #[case] max: f32,
    #[case] what: &str,
) {
    type B = Autodiff<common::backends::NdArray>;
    let made = FusedAdamWConfig::new()
        .with_grad_clipping(per_tensor)
        .with_max_global_norm(Some(max))
        .init::<B, Net<B>>();
    match made {
        Err(FlaError::Unsupported(m)) => assert!(m.contains(what), "{m}"),
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("accepted"),
    }
}

/// Burn's `AdamW` record, saved after two steps and loaded into `FusedAdamW` (and ours into
/// Burn's), resumes the same: the third step from either matches Burn's uninterrupted one.
#[test]
fn records_interchange() {
    use burn::record::{BinBytesRecorder, FullPrecisionSettings, Recorder};
    type B = Autodiff<common::backends::NdArray>;
    let device = Default::default();
    B::seed(&device, 3);
    let net = Net::<B>::new(&device);
    let batches: Vec<Tensor<B, 2>> = (0..3)
        .map(|_| Tensor::random([8, 60], Distribution::Normal(0.0, 1.0), &device))
        .collect();
    let ours = || {
        FusedAdamWConfig::new()
            .init::<B, Net<B>>()
            .expect("valid config")
    };
    let burn = || AdamWConfig::new().init::<B, Net<B>>();
    let recorder = BinBytesRecorder::<FullPrecisionSettings>::default();
    let (_, burn_optim, burn_net) = train(burn(), net.clone(), &batches[..2]);
    let (_, ours_optim, ours_net) = train(ours(), net, &batches[..2]);
    let saved_burn = recorder.record(burn_optim.to_record(), ()).expect("saved");
    let saved_ours = recorder.record(ours_optim.to_record(), ()).expect("saved");
    let ours_from_burn = ours().load_record(recorder.load(saved_burn, &device).expect("loaded"));
    let burn_from_ours = burn().load_record(recorder.load(saved_ours, &device).expect("loaded"));
    let (want, _, _) = train(burn_optim, burn_net.clone(), &batches[2..]);
    let (a, _, _) = train(ours_from_burn, burn_net, &batches[2..]);
    let (b, _, _) = train(burn_from_ours, ours_net, &batches[2..]);
    check(
        "FusedAdamW resumed from AdamW's record",
        &a[0],
        &want[0],
        1e-5,
    );
    check(
        "AdamW resumed from FusedAdamW's record",
        &b[0],
        &want[0],
        1e-5,
    );
}

/// A parameter or moment that another tensor shares keeps its values there: the fused step
/// writes that result to a fresh buffer (both moments' when one is shared), and the results are
/// those of the step on unshared inputs, bit for bit.
#[rstest]
fn shared_parameter_is_not_overwritten(
    #[values(Impl::Fusion, Impl::Cube)] imp: Impl,
    #[values([true, false, false], [false, true, false], [true, true, true])] shared: [bool; 3],
) {
    fn go<B: AdamWBackend>(shared: [bool; 3]) {
        let device = B::Device::default();
        let c = case([4, 33], 9);
        let t = |x: &[f64]| tensor::<B, 2>(x, c.shape, FloatDType::F32, &device);
        let step = |param, m, v| {
            adamw_step(param, t(&c.grad), Some((m, v)), &hyper(2, None)).expect("valid")
        };
        let want = step(t(&c.param), t(&c.m), t(&c.v)).map(values);
        let (param, m, v) = (t(&c.param), t(&c.m), t(&c.v));
        let kept = [param.clone(), m.clone(), v.clone()];
        // Drop the clones of what is not to be shared, so that its buffer is the step's alone.
        let kept: Vec<_> = kept
            .into_iter()
            .zip(shared)
            .map(|(t, s)| s.then_some(t))
            .collect();
        let got = step(param, m, v).map(values);
        assert_ne!(got[0], c.param, "the step changed nothing");
        for (i, name) in ["param", "m", "v"].into_iter().enumerate() {
            assert_eq!(got[i], want[i], "{name} differs from the unshared step's");
        }
        for ((name, t), want) in ["param", "m", "v"]
            .into_iter()
            .zip(kept)
            .zip([&c.param, &c.m, &c.v])
        {
            if let Some(t) = t {
                assert_eq!(&values(t), want, "the step overwrote a shared {name}");
            }
        }
    }
    match imp {
        Impl::Fusion => on_gpu!(fusion, go(shared)),
        _ => on_gpu!(cube, go(shared)),
    }
}

/// f16 and bf16 through the fused backend, against the f32 reference; bf16 where the device
/// computes it, the typed refusal elsewhere.
#[rstest]
fn half_precision(#[values(FloatDType::F16, FloatDType::BF16)] dtype: FloatDType) {
    fn go<B: AdamWBackend>(dtype: FloatDType) {
        let device = B::Device::default();
        let c = case([40, 96], 5);
        let s = hyper(4, Some(GradClip::Norm(3.0)));
        let t = |x: &[f64]| tensor::<B, 2>(x, c.shape, dtype, &device);
        let out = adamw_step(t(&c.param), t(&c.grad), Some((t(&c.m), t(&c.v))), &s);
        if B::adamw_check_dtype(&device, dtype.into()).is_err() {
            assert!(
                matches!(out, Err(FlaError::UnsupportedDType { .. })),
                "{dtype:?} is not computed here, and must be refused"
            );
            return;
        }
        let [p, m, v] = out.expect("valid inputs");
        assert_eq!(p.dtype(), dtype.into());
        // The reference on the inputs as rounded to the dtype.
        let r = |x: &[f64]| values(t(x));
        let tiny = min_positive(match dtype {
            FloatDType::F16 => fla::kernels::FloatDType::F16,
            _ => fla::kernels::FloatDType::BF16,
        }) as f64;
        let [want_p, want_m, want_v] = naive::step(
            &r(&c.param),
            &r(&c.grad),
            Some((&r(&c.m), &r(&c.v))),
            &s,
            tiny,
        );
        check("param", &values(p), &want_p, 1e-2);
        check("m", &values(m), &want_m, 1e-2);
        check("v", &values(v), &want_v, 1e-2);
    }
    on_gpu!(fusion, go(dtype));
}

/// `FusedAdamW` takes the steps the fused op refuses through tensor ops, as Burn's `AdamW`
/// would: here a zero-length parameter.
#[test]
fn empty_parameter_falls_back() {
    fn go<B: AdamWBackend>() {
        let device = B::Device::default();
        let optim = FusedAdamWConfig::new().build().expect("valid config");
        let empty = Tensor::<B, 2>::zeros([0, 4], &device);
        let (p, state) = optim.step(1e-3, empty.clone(), empty, None);
        assert_eq!(p.dims(), [0, 4]);
        assert_eq!(state.expect("state").momentum.time, 1);
    }
    on_gpu!(fusion, go());
}

/// The fallback refuses what the fused op refuses: a NaN learning rate on a tensor the fused
/// op does not take stops the step with its reason (Burn's optimizer trait has no error path)
/// instead of turning the parameter to NaN.
#[test]
#[should_panic(expected = "AdamW step 1")]
fn fallback_refuses_a_nan_learning_rate() {
    fn go<B: AdamWBackend>() {
        let device = B::Device::default();
        let optim = FusedAdamWConfig::new().build().expect("valid config");
        let empty = Tensor::<B, 2>::zeros([0, 4], &device);
        let _ = optim.step(f64::NAN, empty.clone(), empty, None);
    }
    on_gpu!(fusion, go());
}

/// Typed errors, before anything reaches the device.
#[rstest]
#[case::shapes([2, 8], [2, 9], hyper(1, None), "grad must be [2, 8]")]
#[case::empty([0, 8], [0, 8], hyper(1, None), "zero-length")]
#[case::step_zero([2, 8], [2, 8], hyper(0, None), "starts at 1")]
#[case::beta([2, 8], [2, 8], AdamWStep { beta_1: 1.5, ..hyper(1, None) }, "beta_1")]
#[case::clip([2, 8], [2, 8], hyper(1, Some(GradClip::Norm(-1.0))), "threshold")]
fn bad_input(
    #[case] p: [usize; 2],
    #[case] g: [usize; 2],
    #[case] s: AdamWStep,
    #[case] needle: &str,
) {
    fn go<B: AdamWBackend>(p: [usize; 2], g: [usize; 2], s: &AdamWStep) -> Result<(), FlaError> {
        let device = B::Device::default();
        adamw_step(
            Tensor::<B, 2>::ones(p, &device),
            Tensor::<B, 2>::ones(g, &device),
            None,
            s,
        )?;
        Ok(())
    }
    for imp in [Impl::Fusion, Impl::Cube, Impl::TensorOps] {
        let err = match imp {
            Impl::Fusion => on_gpu!(fusion, go(p, g, &s)),
            Impl::Cube => on_gpu!(cube, go(p, g, &s)),
            Impl::TensorOps => go::<common::backends::NdArray>(p, g, &s),
        }
        .expect_err("refused");
        assert!(err.to_string().contains(needle), "{imp:?}: {err}");
    }
}

/// A config out of range is refused when the optimiser is built, not at its first step.
#[rstest]
#[case::beta(FusedAdamWConfig::new().with_beta_2(1.0), "beta_2")]
#[case::clip(FusedAdamWConfig::new().with_grad_clipping(Some(GradientClippingConfig::Norm(0.0))), "threshold")]
#[case::epsilon(FusedAdamWConfig::new().with_epsilon(f32::INFINITY), "finite")]
fn bad_config(#[case] config: FusedAdamWConfig, #[case] needle: &str) {
    let err = config.build().expect_err("refused");
    assert!(matches!(err, FlaError::Unsupported(_)), "{err}");
    assert!(err.to_string().contains(needle), "{err}");
}

/// Mixed dtypes are refused by name.
#[test]
fn mixed_dtypes() {
    type B = common::backends::NdArray;
    let device = Default::default();
    let p = Tensor::<B, 2>::ones([2, 8], &device);
    let g = Tensor::<B, 2>::ones([2, 8], &device).cast(FloatDType::F64);
    let err = adamw_step(p, g, None, &hyper(1, None)).expect_err("refused");
    assert!(matches!(err, FlaError::DType(_)), "{err}");
}
