//! Mixed precision with f32 master weights: the parameters and AdamW's state stay in f32, each
//! forward and backward runs on a half-precision copy of the whole model (Apex's "O2" style, not
//! PyTorch's per-op autocast: the residual stream is in half precision too; the norms' statistics,
//! the rotary tables, the linear-attention states and the loss's softmax are f32), and the
//! gradients reach the f32 parameters through the cast's backward. Pure half-precision parameters
//! lose every update smaller than half an ulp of the weight (bf16 keeps 8 significant bits: a
//! weight of 0.02 ignores steps under ~6e-5, which a cosine schedule's tail takes); the master
//! copy keeps them.
//!
//! f16's range is narrow, so its mixed mode scales the loss before the backward (gradients under
//! f16's smallest normal, ~6e-5, lose precision as subnormals and under ~6e-8 flush to zero) and
//! unscales the gradients before AdamW, skipping a step whose gradients overflowed and halving the
//! scale, as PyTorch's GradScaler does. bf16 has f32's range and needs no scale.

use std::sync::{Arc, Mutex};

use burn::module::{AutodiffModule, Module, ModuleMapper, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{FloatDType, Tensor};
use serde::{Deserialize, Serialize};

use crate::learner::scalar;

/// What `--precision` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    /// Everything in f32.
    F32,
    /// Parameters, activations and AdamW's state in bf16 (the loss's softmax in f32).
    Bf16True,
    /// f32 parameters and optimizer state; forward and backward in `compute`.
    Mixed(FloatDType),
}

impl Precision {
    /// The names `--precision` takes.
    pub const NAMES: &'static str = "f32, bf16 (= bf16-true), bf16-mixed, f16-mixed";

    pub fn parse(name: &str) -> Result<Self, String> {
        match name {
            "f32" => Ok(Self::F32),
            "bf16" | "bf16-true" => Ok(Self::Bf16True),
            "bf16-mixed" => Ok(Self::Mixed(FloatDType::BF16)),
            "f16-mixed" => Ok(Self::Mixed(FloatDType::F16)),
            "f16" | "f16-true" => Err(
                "--precision f16 (parameters in f16) is not supported: Adam's state underflows \
                 in f16 (its epsilon is zero there) and training turns NaN; use f16-mixed (f32 \
                 parameters, f16 compute, loss scaling)"
                    .into(),
            ),
            other => Err(format!("unknown --precision {other:?} ({})", Self::NAMES)),
        }
    }

    /// The dtype of the per-step copy of the weights, for the mixed modes.
    pub fn compute(self) -> Option<FloatDType> {
        match self {
            Self::Mixed(d) => Some(d),
            _ => None,
        }
    }

    /// Whether the loss is scaled (f16's range needs it).
    pub fn scales_loss(self) -> bool {
        self == Self::Mixed(FloatDType::F16)
    }
}

/// Casts every float parameter to one dtype. On an autodiff backend the cast is a node of the
/// graph: the copy's gradients flow back to the original (f32) parameters, cast to f32.
#[derive(Debug, Clone, Copy)]
pub struct CastParams(pub FloatDType);

impl<B: Backend> ModuleMapper<B> for CastParams {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let dtype = self.0;
        param.map(|t| t.cast(dtype))
    }
}

/// `module` with every parameter initialised. Burn 0.21 initialises parameters lazily, and a
/// clone of a parameter not yet initialised initialises on its own, with fresh random values and
/// a new leaf: the per-step copy of a model never read before would then compute with weights
/// the model does not hold, and the model's own would get no gradient (seen in the test below).
pub fn initialized<B: Backend, M: Module<B>>(module: M) -> M {
    struct Init;
    impl<B: Backend> ModuleMapper<B> for Init {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            param.map(|t| t)
        }
    }
    module.map(&mut Init)
}

/// The loss scale and its schedule (GradScaler's defaults): start at 2^16, halve and skip the
/// step when the gradients are not finite, double after `GROWTH_INTERVAL` finite steps in a row.
/// Part of a checkpoint, so a resumed run scales as an uninterrupted one.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ScaleState {
    pub scale: f64,
    /// Finite steps since the scale last changed.
    pub good_steps: usize,
}

impl ScaleState {
    pub const INITIAL: f64 = 65536.0;
    pub const GROWTH_INTERVAL: usize = 2000;
    /// Gradients still not finite at a scale this small (32 halvings below the default start) did
    /// not overflow for the scale's sake: the model diverged, or overflows f16 in its forward
    /// pass, and the run stops.
    pub const MIN: f64 = 1.0 / 65536.0;

    pub fn new(scale: f64) -> Self {
        Self {
            scale,
            good_steps: 0,
        }
    }

    /// After a step whose unscaled gradients were `finite` or not: the next scale. Returns
    /// whether the optimizer should take the step, or an error when the gradients are not finite
    /// even at a scale of [`Self::MIN`] or less (the run is to stop; see there).
    pub fn update(&mut self, finite: bool) -> Result<bool, String> {
        if !finite && self.scale <= Self::MIN {
            return Err(format!(
                "the gradients are not finite even at loss scale {:e}: the model diverged, or \
                 overflows f16 in its forward pass; try a lower --lr, or --precision bf16-mixed \
                 (CUDA) or f32",
                self.scale
            ));
        }
        if finite {
            self.good_steps += 1;
            if self.good_steps == Self::GROWTH_INTERVAL {
                self.scale *= 2.0;
                self.good_steps = 0;
            }
        } else {
            self.scale *= 0.5;
            self.good_steps = 0;
        }
        Ok(finite)
    }
}

/// The loss scale shared by the training step (which multiplies the loss by it) and the loop
/// (which unscales the gradients and updates it); `None` where the precision needs none.
#[derive(Debug, Clone, Default)]
pub struct LossScale(Arc<Mutex<Option<ScaleState>>>);

impl LossScale {
    pub fn new(state: Option<ScaleState>) -> Self {
        Self(Arc::new(Mutex::new(state)))
    }

    pub fn get(&self) -> Option<ScaleState> {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn set(&self, state: ScaleState) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(state);
    }
}

/// Divides every gradient of `module` in `grads` by `scale`; returns the sum of all unscaled
/// gradient entries, finite exactly when every gradient is (an overflow in any gives inf or NaN),
/// read back with one device sync.
pub fn unscale<B: AutodiffBackend, M: AutodiffModule<B>>(
    module: &M,
    grads: &mut GradientsParams,
    scale: f64,
) -> f64 {
    let mut visitor = Unscale::<B> {
        grads,
        inverse: 1.0 / scale,
        total: None,
    };
    module.visit(&mut visitor);
    visitor.total.map_or(0.0, scalar)
}

struct Unscale<'a, B: AutodiffBackend> {
    grads: &'a mut GradientsParams,
    inverse: f64,
    total: Option<Tensor<B::InnerBackend, 1>>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Unscale<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let Some(grad) = self.grads.remove::<B::InnerBackend, D>(param.id) else {
            return;
        };
        let grad = grad.mul_scalar(self.inverse);
        let sum = grad.clone().cast(FloatDType::F32).sum();
        self.total = Some(match self.total.take() {
            Some(total) => total + sum,
            None => sum,
        });
        self.grads.register::<B::InnerBackend, D>(param.id, grad);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `module` with every float parameter in `dtype`, each a new leaf of the graph (asking for its
    /// gradient as before).
    fn as_leaves_in<B: Backend, M: Module<B>>(module: M, dtype: FloatDType) -> M {
        struct Leaves(FloatDType);
        impl<B: Backend> ModuleMapper<B> for Leaves {
            fn map_float<const D: usize>(
                &mut self,
                param: Param<Tensor<B, D>>,
            ) -> Param<Tensor<B, D>> {
                let dtype = self.0;
                param.map(|t| {
                    let require_grad = t.is_require_grad();
                    t.cast(dtype).detach().set_require_grad(require_grad)
                })
            }
        }
        module.map(&mut Leaves(dtype))
    }

    /// The mixed-precision step on a small GLA (fused kernels, wgpu): the model computes in f16
    /// (its logits are f16) while every gradient reaches the f32 parameters in f32, equal to the
    /// gradients of a model holding the same f16 weights as its own parameters (what the copy
    /// computes), to f16's rounding: the cast's backward routes them and changes nothing else.
    #[cfg(feature = "wgpu")]
    #[test]
    fn master_weights_take_the_half_copy_gradients() {
        use burn::backend::{Autodiff, Wgpu};
        use burn::module::ParamId;
        use burn::tensor::{DType, Int, TensorData};
        use fla_models::gla_model::GlaConfig;

        type B = Autodiff<Wgpu>;
        let device = Default::default();
        <B as Backend>::seed(&device, 7);
        let config = GlaConfig {
            hidden_size: 64,
            num_heads: 2,
            num_hidden_layers: 2,
            vocab_size: 256,
            use_short_conv: true,
            ..Default::default()
        };
        let master = initialized(config.init::<B>(&device).expect("model"));
        // The f16 weights as leaves of their own.
        let half = as_leaves_in(master.clone(), FloatDType::F16);
        let (b, t) = (3, 33);
        let data: Vec<i64> = (0..b * t).map(|i| (i * 37 % 251) as i64).collect();
        let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(data, [b, t]), &device);

        let copy = master.clone().map(&mut CastParams(FloatDType::F16));
        let (logits, _) = copy.forward(ids.clone(), None, false).expect("forward");
        assert_eq!(logits.dtype(), DType::F16);
        let loss = copy.loss(ids.clone()).expect("loss");
        let from_master = GradientsParams::from_grads(loss.backward(), &master);
        let loss = half.loss(ids).expect("loss");
        let from_half = GradientsParams::from_grads(loss.backward(), &half);

        /// A gradient's dtype and values (as f32).
        type Values = (DType, Vec<f32>);
        /// Every parameter's gradient in both sets.
        struct Pairs<'a> {
            grads: [&'a GradientsParams; 2],
            out: Vec<(ParamId, [Values; 2])>,
        }
        impl<AB: AutodiffBackend> ModuleVisitor<AB> for Pairs<'_> {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<AB, D>>) {
                if !param.is_require_grad() {
                    return;
                }
                let get = |which: usize| {
                    let t = self.grads[which]
                        .get::<AB::InnerBackend, D>(param.id)
                        .unwrap_or_else(|| {
                            panic!(
                                "no gradient for {} {:?} in set {which}",
                                param.id,
                                param.shape()
                            )
                        });
                    let dtype = t.dtype();
                    (
                        dtype,
                        t.into_data().convert::<f32>().to_vec::<f32>().unwrap(),
                    )
                };
                self.out.push((param.id, [get(0), get(1)]));
            }
        }
        let mut pairs = Pairs {
            grads: [&from_master, &from_half],
            out: Vec::new(),
        };
        master.visit(&mut pairs);
        // Every parameter was visited (a missing gradient panics above).
        assert!(pairs.out.len() > 10, "{} parameters", pairs.out.len());
        let mut worst = 0f32;
        for (id, [(dm, gm), (dh, gh)]) in &pairs.out {
            assert_eq!((*dm, *dh), (DType::F32, DType::F16), "{id}");
            let norm = |v: &mut dyn Iterator<Item = f32>| v.map(|x| x * x).sum::<f32>().sqrt();
            let diff = norm(&mut gm.iter().zip(gh).map(|(a, b)| a - b));
            let size = norm(&mut gh.iter().copied());
            assert!(diff.is_finite() && size.is_finite(), "{id}");
            // The same f16 arithmetic either way (measured on lavapipe: identical); the bound
            // leaves room for fused kernels that round in another order, and no more.
            let rel = diff / (size + 1e-6 * (gh.len() as f32).sqrt());
            worst = worst.max(rel);
            assert!(rel <= 2e-3, "{id}: relative difference {rel}");
        }
        println!(
            "{} gradients, largest relative difference {worst:e}",
            pairs.out.len()
        );
    }

    #[test]
    fn names() {
        assert_eq!(Precision::parse("f32"), Ok(Precision::F32));
        assert_eq!(Precision::parse("bf16"), Ok(Precision::Bf16True));
        assert_eq!(Precision::parse("bf16-true"), Ok(Precision::Bf16True));
        assert!(Precision::parse("f16-true")
            .unwrap_err()
            .contains("f16-mixed"));
        assert_eq!(
            Precision::parse("bf16-mixed"),
            Ok(Precision::Mixed(FloatDType::BF16))
        );
        assert!(Precision::parse("f16-mixed").unwrap().scales_loss());
        assert!(!Precision::parse("bf16-mixed").unwrap().scales_loss());
        assert!(Precision::parse("f16").unwrap_err().contains("f16-mixed"));
        assert!(Precision::parse("f8").unwrap_err().contains("unknown"));
    }

    #[test]
    fn scale_halves_on_overflow_and_grows_after_an_interval() {
        let mut s = ScaleState::new(ScaleState::INITIAL);
        assert_eq!(s.update(false), Ok(false));
        assert_eq!(s.scale, ScaleState::INITIAL / 2.0);
        for _ in 0..ScaleState::GROWTH_INTERVAL - 1 {
            assert_eq!(s.update(true), Ok(true));
        }
        assert_eq!(s.scale, ScaleState::INITIAL / 2.0);
        assert_eq!(s.update(true), Ok(true));
        assert_eq!((s.scale, s.good_steps), (ScaleState::INITIAL, 0));
        // An overflow resets the count of good steps.
        s.update(true).unwrap();
        s.update(false).unwrap();
        assert_eq!((s.scale, s.good_steps), (ScaleState::INITIAL / 2.0, 0));
    }

    /// Overflows halve the scale down to `MIN`; one more there stops the run with an error that
    /// names the likely causes, and leaves the state as it was. Finite steps at `MIN` go on.
    #[test]
    fn overflow_at_the_smallest_scale_is_an_error() {
        let mut s = ScaleState::new(4.0 * ScaleState::MIN);
        assert_eq!(s.update(false), Ok(false));
        assert_eq!(s.update(false), Ok(false));
        assert_eq!(s.scale, ScaleState::MIN);
        assert_eq!(s.update(true), Ok(true));
        let err = s.update(false).unwrap_err();
        assert!(err.contains("diverged") && err.contains("--lr"), "{err}");
        assert_eq!((s.scale, s.good_steps), (ScaleState::MIN, 1));
    }
}
