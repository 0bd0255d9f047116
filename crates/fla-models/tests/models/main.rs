//! Layer, model and parity tests, one test binary (each test binary links and monomorphises
//! Burn's backends again; one is built where five were). Select a file's tests by its module:
//! `cargo test -p fla-models --test models parity::`.

/// The model of `$config` on backend `$A` (device `$da`) and on `$B` (`$db`), with the same weights
/// (one initialisation's, through a full-precision record).
macro_rules! same_weights {
    ($config:expr, $A:ty, $da:expr, $B:ty, $db:expr) => {{
        use burn::module::Module;
        use burn::record::{BinBytesRecorder, FullPrecisionSettings, Recorder};
        let recorder = BinBytesRecorder::<FullPrecisionSettings>::default();
        // Both load the record: Burn initialises parameters lazily, so a clone of a fresh model
        // draws its own values.
        let bytes = recorder
            .record($config.init::<$A>($da).unwrap().into_record(), ())
            .unwrap();
        let a = $config
            .init::<$A>($da)
            .unwrap()
            .load_record(recorder.load(bytes.clone(), $da).unwrap());
        let b = $config
            .init::<$B>($db)
            .unwrap()
            .load_record(recorder.load(bytes, $db).unwrap());
        (a, b)
    }};
}

/// A model config's tiny model in half precision on the fused backend (`Wgpu<f16>`, Burn's
/// fusion) against the same weights in f32 on NdArray: the logits agree to half precision's
/// rounding through the layers (bound 2e-2 absolute on logits of order 1). A mixed-dtype product
/// anywhere in the model (as the rotary tables were) fails it with `DTypeMismatch`, and a
/// computation that loses half precision's range or accuracy fails the bound.
macro_rules! half_precision_matches_f32 {
    ($config:expr) => {{
        use burn::tensor::{Int, Tensor, TensorData, Tolerance};
        type F = burn::backend::NdArray<f32>;
        type H = burn::backend::Wgpu<burn::tensor::f16>;
        let (cpu, gpu) = (Default::default(), $crate::half_device());
        let (full, half) = same_weights!($config, F, &cpu, H, &gpu);
        let ids: Vec<i64> = vec![1, 5, 2, 9, 3, 3, 7, 4, 0, 15, 8, 6, 2, 1];
        let (want, _) = full
            .forward(
                Tensor::<F, 2, Int>::from_data(TensorData::new(ids.clone(), [2, 7]), &cpu),
                None,
                false,
            )
            .unwrap();
        let (got, _) = half
            .forward(
                Tensor::<H, 2, Int>::from_data(TensorData::new(ids, [2, 7]), &gpu),
                None,
                false,
            )
            .unwrap();
        assert_eq!(
            got.dtype(),
            burn::tensor::DType::F16,
            "the check ran in f16"
        );
        let got = got.into_data().convert::<f32>();
        let diff = got
            .iter::<f32>()
            .zip(want.to_data().iter::<f32>())
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        eprintln!("half-precision logits: max |diff| {diff:.2e}");
        got.assert_approx_eq::<f32>(&want.into_data(), Tolerance::absolute(2e-2));
    }};
}

/// The wgpu device the half-precision checks run on: not the default one. Burn keeps a device's
/// default float dtype per device (keyed by the device, not the backend), set by whichever
/// backend first touches it, so `Wgpu<f16>` and `Wgpu<f32>` tests on the default device in one
/// process raced: the loser's tensors came out in the winner's dtype (seen in a CI-like run:
/// f32 tests failing with `DTypeMismatch` and f16-sized errors; the f16 checks could as well
/// have run in f32). The CPU adapter (lavapipe here) is a device of its own.
pub fn half_device() -> burn::backend::wgpu::WgpuDevice {
    burn::backend::wgpu::WgpuDevice::Cpu
}

/// Every float parameter's gradient in `grads`, as f32, in the module's visiting order (the same
/// order for the same model on any backend).
pub fn grads_in_order<B, M>(model: &M, grads: &B::Gradients) -> Vec<Vec<f32>>
where
    B: burn::tensor::backend::AutodiffBackend,
    M: burn::module::Module<B>,
{
    struct Collect<'a, B: burn::tensor::backend::AutodiffBackend> {
        grads: &'a B::Gradients,
        out: Vec<Vec<f32>>,
    }
    impl<B: burn::tensor::backend::AutodiffBackend> burn::module::ModuleVisitor<B> for Collect<'_, B> {
        fn visit_float<const D: usize>(
            &mut self,
            param: &burn::module::Param<burn::tensor::Tensor<B, D>>,
        ) {
            if let Some(g) = param.val().grad(self.grads) {
                // A parameter's gradient comes in its own dtype (through a cast, cast back).
                assert_eq!(g.dtype(), param.val().dtype(), "gradient dtype");
                self.out
                    .push(g.into_data().convert::<f32>().to_vec::<f32>().unwrap());
            }
        }
    }
    let mut collect = Collect::<B> {
        grads,
        out: Vec::new(),
    };
    model.visit(&mut collect);
    collect.out
}

/// A one-element tensor's value as f32, read in the tensor's own dtype (`into_scalar` would
/// round the f32 loss of a half-precision model to the backend's f16).
pub fn value<B: burn::tensor::backend::Backend>(t: burn::tensor::Tensor<B, 1>) -> f32 {
    t.into_data().convert::<f32>().to_vec::<f32>().unwrap()[0]
}

/// How many panics Burn's fusion crates have raised in this process so far, on any thread. Its
/// autotuner runs candidate kernels under `catch_unwind` and takes another on a panic, so a
/// fusion bug can pass unseen on one run and kill the next (where the tuned choice is cached).
pub fn fusion_panics() -> usize {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static COUNT: AtomicUsize = AtomicUsize::new(0);
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if info.location().is_some_and(|l| l.file().contains("fusion")) {
                COUNT.fetch_add(1, Ordering::SeqCst);
            }
            previous(info);
        }));
    });
    COUNT.load(Ordering::SeqCst)
}

/// Casts every float parameter in the graph (on an autodiff backend the copy's gradients reach
/// the original parameters), as fla-train's mixed precision runs a step.
pub struct CastInGraph(pub burn::tensor::FloatDType);

impl<B: burn::tensor::backend::Backend> burn::module::ModuleMapper<B> for CastInGraph {
    fn map_float<const D: usize>(
        &mut self,
        param: burn::module::Param<burn::tensor::Tensor<B, D>>,
    ) -> burn::module::Param<burn::tensor::Tensor<B, D>> {
        let dtype = self.0;
        param.map(|t| t.cast(dtype))
    }
}

/// Rounds every float parameter to f16 and back (a model's weights as its f16 twin holds them).
pub struct RoundToHalf;

impl<B: burn::tensor::backend::Backend> burn::module::ModuleMapper<B> for RoundToHalf {
    fn map_float<const D: usize>(
        &mut self,
        param: burn::module::Param<burn::tensor::Tensor<B, D>>,
    ) -> burn::module::Param<burn::tensor::Tensor<B, D>> {
        let (id, tensor, mapper) = param.consume();
        let (device, require_grad) = (tensor.device(), tensor.is_require_grad());
        let data = tensor
            .into_data()
            .convert::<burn::tensor::f16>()
            .convert::<f32>();
        // A parameter rebuilt from data is a new leaf: it asks for its gradient as before.
        let tensor = burn::tensor::Tensor::from_data(data, &device).set_require_grad(require_grad);
        burn::module::Param::from_mapped_value(id, tensor, mapper)
    }
}

/// The training step of the model from `$config` in half precision on Burn's fused wgpu backend
/// against f32 on NdArray with the same weights (rounded to f16, as the f16 model holds them), at
/// a point where the gradients are well conditioned (checked first: rounding the weights alone,
/// in f32, uses under a fifth of the tolerance below): the loss and every parameter's gradient
/// must agree (each gradient tensor within 5 % in L2 norm, with an absolute floor, see below),
/// then three AdamW steps (weight decay, per-tensor gradient clipping, as `fla-train` runs them)
/// must lower the half-precision loss. The loss's softmax runs in f32, so the step mixes dtypes in one graph,
/// which made Burn 0.21.0's fusion panic in its fused reductions (patched in `vendor/`, see
/// `vendor/README.md`); the shapes are the training preset's (hidden 64, short convolutions, byte
/// vocabulary, 16 x 64 tokens), on which it panicked (`fusion_panics` sees it even where the
/// autotuner recovers). Adam's epsilon is 1e-4 because f16 flushes the default 1e-8 to zero;
/// losses after Adam steps are not compared with f32's (printed beside them): f16's range
/// flushes Adam's second moment of gradients under about 1e-3 to zero, and those parameters then
/// step by up to `lr * g / epsilon`, far more than in f32 (measured: GLA's loss 5.64 -> 0.05 in
/// three steps against 4.57 in f32). bf16, which CUDA training uses, has f32's range.
macro_rules! half_precision_trains {
    ($config:expr) => {{
        use burn::backend::Autodiff;
        use burn::grad_clipping::GradientClippingConfig;
        use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
        use burn::tensor::{Int, Tensor, TensorData};
        type F = Autodiff<burn::backend::NdArray<f32>>;
        type H = Autodiff<burn::backend::Wgpu<burn::tensor::f16>>;
        let panics = $crate::fusion_panics();
        let (cpu, gpu) = (Default::default(), $crate::half_device());
        let (exact, mut half) = same_weights!($config, F, &cpu, H, &gpu);
        // The f16 model holds its weights rounded to f16; the reference holds the same rounded
        // weights, so that what is compared is the arithmetic.
        let full = burn::module::Module::map(exact.clone(), &mut $crate::RoundToHalf);
        let (b, t) = (16, 65);
        let ids: Vec<i64> = (0..b * t).map(|i| (i * 37 % 251) as i64).collect();
        let batch_f = || Tensor::<F, 2, Int>::from_data(TensorData::new(ids.clone(), [b, t]), &cpu);
        let batch_h = || Tensor::<H, 2, Int>::from_data(TensorData::new(ids.clone(), [b, t]), &gpu);
        let norm = |v: &mut dyn Iterator<Item = f32>| v.map(|x| x * x).sum::<f32>().sqrt();
        // How much of its tolerance a gradient tensor `g` uses against `w`: the error's L2 norm
        // over 5 % of `w`'s plus a floor of 5e-5 an entry (f16 rounds the activations behind a
        // gradient to about 1e-3 of their size, so a tensor whose gradients are small differences
        // of larger terms, a per-head decay's or a bias's, carries absolute errors of that size
        // whatever its own scale).
        let used = |g: &[f32], w: &[f32]| {
            let floor = 5e-5 * (w.len() as f32).sqrt();
            let diff = norm(&mut g.iter().zip(w).map(|(a, b)| a - b));
            diff / (5e-2 * norm(&mut w.iter().copied()) + floor)
        };
        // Each tensor's share, the two lists matched parameter for parameter.
        let shares = |a: &[Vec<f32>], b: &[Vec<f32>]| -> Vec<f32> {
            assert_eq!(a.len(), b.len(), "gradients for different parameters");
            a.iter().zip(b).map(|(a, b)| used(a, b)).collect()
        };
        // The largest share; NaN if any is (`f32::max` would drop it).
        let largest = |v: &[f32]| {
            v.iter()
                .fold(0.0f32, |m, &x| if x.is_nan() || x > m { x } else { m })
        };

        // The loss and gradients of both models; the gradients also take the first AdamW step.
        let loss = full.loss(batch_f()).unwrap();
        let want_loss = $crate::value(loss.clone());
        let mut grads_f = loss.backward();
        let want = $crate::grads_in_order(&full, &grads_f);
        // The premise: the gradients are well conditioned here, i.e. rounding the weights to f16
        // alone (f32 arithmetic) uses little of the tolerance. Where it uses more (RetNet at its
        // default norm eps on some inits: see its case), f16's error is the model's sensitivity,
        // not the arithmetic's.
        let exact_grads =
            $crate::grads_in_order(&exact, &exact.loss(batch_f()).unwrap().backward());
        let conditioning = largest(&shares(&want, &exact_grads));
        assert!(
            conditioning < 0.2, // false for NaN
            "rounding the weights to f16 alone takes {conditioning:.2} of the gradients' \
             tolerance: an ill-conditioned point, where this check cannot tell arithmetic errors"
        );
        let loss = half.loss(batch_h()).unwrap();
        let first = $crate::value(loss.clone());
        let mut grads_h = loss.backward();
        let got = $crate::grads_in_order(&half, &grads_h);
        assert!(
            (first - want_loss).abs() < 1e-2,
            "half-precision loss {first}, f32 {want_loss}"
        );
        let got_shares = shares(&got, &want);
        for (i, (g, share)) in got.iter().zip(&got_shares).enumerate() {
            assert!(
                g.iter().all(|x| x.is_finite()) && *share <= 1.0,
                "parameter {i}: gradient off by {share:.2} of its tolerance"
            );
        }
        let worst = largest(&got_shares);
        // The same f16 arithmetic on an f16 copy of f32 weights (cast in the graph) on a backend
        // whose float type is f32, as `fla-train --precision f16-mixed` trains: the gradients
        // reach the f32 weights in f32 (`grads_in_order` checks the dtype), within the same
        // tolerance. A tensor the model creates in the backend's default dtype fails here with
        // DTypeMismatch.
        {
            use burn::module::Module;
            use burn::record::{BinBytesRecorder, FullPrecisionSettings, Recorder};
            type M = Autodiff<burn::backend::Wgpu>;
            let device = Default::default();
            let recorder = BinBytesRecorder::<FullPrecisionSettings>::default();
            let bytes = recorder.record(full.clone().into_record(), ()).unwrap();
            let master = $config
                .init::<M>(&device)
                .unwrap()
                .load_record(recorder.load(bytes, &device).unwrap());
            let copy = master
                .clone()
                .map(&mut $crate::CastInGraph(burn::tensor::FloatDType::F16));
            let ids = Tensor::<M, 2, Int>::from_data(TensorData::new(ids.clone(), [b, t]), &device);
            let (logits, _) = copy
                .forward(ids.clone().narrow(1, 0, 2), None, false)
                .unwrap();
            assert_eq!(
                logits.dtype(),
                burn::tensor::DType::F16,
                "the copy computes in f16"
            );
            let grads = copy.loss(ids).unwrap().backward();
            let mixed = $crate::grads_in_order(&master, &grads);
            let mixed_shares = shares(&mixed, &want);
            let mixed_worst = largest(&mixed_shares);
            assert!(
                mixed.iter().flatten().all(|x| x.is_finite()) && mixed_worst <= 1.0,
                "f16 copy of f32 weights: a gradient uses {mixed_worst:.2} of its tolerance"
            );
            eprintln!("f16 copy of f32 weights: gradients use {mixed_worst:.2} of their tolerance");
        }

        // fla-train's defaults (peak rate 3e-3, weight decay 0.01, clipping at norm 1), both
        // models stepped alike; the f32 losses are printed for comparison only.
        let adamw = AdamWConfig::new()
            .with_weight_decay(0.01)
            .with_epsilon(1e-4)
            .with_grad_clipping(Some(GradientClippingConfig::Norm(1.0)));
        let (mut optim_h, mut optim_f) = (adamw.init(), adamw.init());
        let mut full = full;
        let (mut curve_h, mut curve_f) = (vec![first], vec![want_loss]);
        for step in 1..=3 {
            let grads = GradientsParams::from_grads(grads_h, &half);
            half = optim_h.step(3e-3, half, grads);
            let grads = GradientsParams::from_grads(grads_f, &full);
            full = optim_f.step(3e-3, full, grads);
            let (loss_h, loss_f) = (half.loss(batch_h()).unwrap(), full.loss(batch_f()).unwrap());
            curve_h.push($crate::value(loss_h.clone()));
            curve_f.push($crate::value(loss_f.clone()));
            if step == 3 {
                break;
            }
            (grads_h, grads_f) = (loss_h.backward(), loss_f.backward());
        }
        eprintln!(
            "half precision: loss {first:.4} (f32 {want_loss:.4}), gradients use {worst:.2} of \
             their tolerance (rounding the weights alone {conditioning:.2}); 3 AdamW steps: \
             {curve_h:.3?} (f32 {curve_f:.3?})"
        );
        let after = curve_h[3];
        assert!(
            after.is_finite() && after < first,
            "loss {first} -> {after} in 3 AdamW steps"
        );
        assert_eq!(
            $crate::fusion_panics(),
            panics,
            "Burn's fusion panicked (see above)"
        );
    }};
}

mod gated_deltanet;
mod layers;
mod model;
mod parity;
mod transformer;
