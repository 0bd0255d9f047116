//! [`FusedAdamW`]: Burn's `AdamW`, its per-tensor gradient clipping included, with each
//! parameter's step one fused op ([`AdamWBackend::adamw_step`]); and [`FusedAdamWOptimizer`],
//! Burn's `Optimizer` around it, which adds clipping by the global norm of all gradients
//! (PyTorch's `clip_grad_norm_`, what FLA's and Hugging Face's training do).
//!
//! `FusedAdamW` plugs into Burn's `OptimizerAdaptor` as a `SimpleOptimizer`, and its state is
//! Burn's own `AdamWState`, so optimiser records saved by either load into the other.

use std::any::Any;
use std::sync::{Arc, Mutex};

use burn::config::Config;
use burn::module::{AutodiffModule, ModuleVisitor, Param};
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::{
    AdamWState, AdaptiveMomentumState, GradientsParams, LearningRate, MultiGradientsParams,
    Optimizer, SimpleOptimizer,
};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::ops::{FloatTensor, FloatTensorOps};
use burn::tensor::{Device, Tensor, TensorMetadata, TensorPrimitive};

use super::{check_operands, check_step, tensor_step, AdamWBackend, AdamWStep, GradClip};
use crate::gated::float_dtype;
use crate::FlaError;
use burn::grad_clipping::GradientClippingConfig;
use fla_cubecl_kernels::adamw::MAX_ADAMW_LEN;

/// [`FusedAdamW`]'s configuration: the fields and defaults of Burn's `AdamWConfig` (AMSGrad
/// aside, which the fused step does not implement).
#[derive(Config, Debug)]
pub struct FusedAdamWConfig {
    #[config(default = 0.9)]
    pub beta_1: f32,
    #[config(default = 0.999)]
    pub beta_2: f32,
    #[config(default = 1e-5)]
    pub epsilon: f32,
    /// Decoupled weight decay: each step scales the parameter by `1 − lr · weight_decay`.
    #[config(default = 1e-4)]
    pub weight_decay: f32,
    /// Decay only where the parameter and the first moment agree in sign.
    #[config(default = false)]
    pub cautious_weight_decay: bool,
    /// Clipping of each parameter's gradient before its step (per tensor, as Burn's).
    pub grad_clipping: Option<GradientClippingConfig>,
    /// Clipping by the L2 norm of all of the model's gradients together: each is scaled by
    /// `min(1, max / (‖g‖ + 1e-6))`, `‖g‖` over every gradient of the step (PyTorch's
    /// `clip_grad_norm_`). Computed on the device, no read-back. Not with `grad_clipping`.
    pub max_global_norm: Option<f32>,
}

impl FusedAdamWConfig {
    /// The optimiser, checked: [`FlaError::Unsupported`] for a β outside `[0, 1)`, a non-finite
    /// ε or weight decay, or a clipping threshold that is not positive and finite.
    pub fn build(&self) -> Result<FusedAdamW, FlaError> {
        let optim = FusedAdamW {
            beta_1: self.beta_1,
            beta_2: self.beta_2,
            epsilon: self.epsilon,
            weight_decay: self.weight_decay,
            cautious_weight_decay: self.cautious_weight_decay,
            clip: self.grad_clipping.as_ref().map(|c| match c {
                GradientClippingConfig::Value(c) => GradClip::Value(*c),
                GradientClippingConfig::Norm(c) => GradClip::Norm(*c),
            }),
            scale: ScaleSlot::default(),
        };
        check_step(&optim.hyper(0.0, 1), false)?;
        Ok(optim)
    }

    /// The optimiser for module `M` on backend `B`, as Burn's `AdamWConfig::init` makes it.
    /// [`FlaError::Unsupported`] as [`Self::build`], and for both clippings at once or a
    /// global threshold that is not positive and finite.
    pub fn init<B, M>(&self) -> Result<FusedAdamWOptimizer<M, B>, FlaError>
    where
        B: AutodiffBackend,
        B::InnerBackend: AdamWBackend,
        M: AutodiffModule<B>,
    {
        let optim = self.build()?;
        if let Some(c) = self.max_global_norm {
            if self.grad_clipping.is_some() {
                return Err(FlaError::Unsupported(
                    "clipping per tensor and by the global norm at once".into(),
                ));
            }
            if !(c > 0.0 && c.is_finite()) {
                return Err(FlaError::Unsupported(format!(
                    "clipping by the global norm needs a positive finite threshold, got {c}"
                )));
            }
        }
        Ok(FusedAdamWOptimizer {
            adaptor: OptimizerAdaptor::from(optim.clone()),
            optim,
            max_global_norm: self.max_global_norm,
        })
    }
}

/// The global-norm coefficient of the step in progress (a `Tensor<B::InnerBackend, 1>`),
/// shared by [`FusedAdamWOptimizer`] and the [`FusedAdamW`] inside its adaptor: set before the
/// parameters' steps, taken away after. Each optimiser has its own (see its `Clone`).
#[derive(Clone, Default)]
pub struct ScaleSlot(Arc<Mutex<Option<Box<dyn Any + Send>>>>);

impl std::fmt::Debug for ScaleSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ScaleSlot")
    }
}

impl ScaleSlot {
    fn set(&self, x: Option<Box<dyn Any + Send>>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = x;
    }
    fn get<B: Backend>(&self) -> Option<Tensor<B, 1>> {
        let held = self.0.lock().unwrap_or_else(|e| e.into_inner());
        held.as_ref()?.downcast_ref::<Tensor<B, 1>>().cloned()
    }
}

/// Burn's `Optimizer` for [`FusedAdamW`]: its `OptimizerAdaptor` (records as Burn's `AdamW`
/// saves them), with clipping by the global norm of the gradients where configured.
pub struct FusedAdamWOptimizer<M, B>
where
    B: AutodiffBackend,
    B::InnerBackend: AdamWBackend,
    M: AutodiffModule<B>,
{
    adaptor: OptimizerAdaptor<FusedAdamW, M, B>,
    optim: FusedAdamW,
    max_global_norm: Option<f32>,
}

impl<M, B> Clone for FusedAdamWOptimizer<M, B>
where
    B: AutodiffBackend,
    B::InnerBackend: AdamWBackend,
    M: AutodiffModule<B>,
{
    /// A copy with its own coefficient slot (the adaptor's optimiser is rebuilt around it), so
    /// that two copies stepping at once cannot read each other's coefficient.
    fn clone(&self) -> Self {
        let optim = FusedAdamW {
            scale: ScaleSlot::default(),
            ..self.optim.clone()
        };
        Self {
            adaptor: OptimizerAdaptor::from(optim.clone()).load_record(self.adaptor.to_record()),
            optim,
            max_global_norm: self.max_global_norm,
        }
    }
}

/// Every float parameter's gradient (non-empty ones), for the global norm.
struct Collect<'a, B: AutodiffBackend> {
    grads: &'a GradientsParams,
    out: Vec<FloatTensor<B::InnerBackend>>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Collect<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(g) = self.grads.get::<B::InnerBackend, D>(param.id) {
            if g.shape().num_elements() > 0 {
                self.out.push(g.into_primitive().tensor());
            }
        }
    }
}

/// Moves every parameter's gradient out of `multi` (summed over devices, as Burn's adaptor
/// sums them) into one [`GradientsParams`].
struct Merge<'a> {
    multi: &'a mut MultiGradientsParams,
    out: GradientsParams,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Merge<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some((g, _)) = self.multi.remove::<B::InnerBackend, D>(param.id) {
            self.out.register::<B::InnerBackend, D>(param.id, g);
        }
    }
}

impl<M, B> Optimizer<M, B> for FusedAdamWOptimizer<M, B>
where
    B: AutodiffBackend,
    B::InnerBackend: AdamWBackend,
    M: AutodiffModule<B>,
{
    type Record = <OptimizerAdaptor<FusedAdamW, M, B> as Optimizer<M, B>>::Record;

    fn step(&mut self, lr: LearningRate, module: M, grads: GradientsParams) -> M {
        let Some(max) = self.max_global_norm else {
            return self.adaptor.step(lr, module, grads);
        };
        let mut collect = Collect::<B> {
            grads: &grads,
            out: Vec::new(),
        };
        module.visit(&mut collect);
        if collect.out.is_empty() {
            return self.adaptor.step(lr, module, grads);
        }
        // Mixed-precision setups may hand gradients in several float types: the norm is
        // taken in f32 over all of them.
        let mut grads_f = collect.out;
        // Gradients merged from several devices (`step_multi`) may sit on different ones: the
        // norm's kernels run on the first's.
        let device = B::InnerBackend::float_device(&grads_f[0]);
        grads_f = grads_f
            .into_iter()
            .map(|g| match B::InnerBackend::float_device(&g) == device {
                true => g,
                false => B::InnerBackend::float_to_device(g, &device),
            })
            .collect();
        let dtype = grads_f[0].dtype();
        if grads_f.iter().any(|g| g.dtype() != dtype) {
            grads_f = grads_f
                .into_iter()
                .map(|g| B::InnerBackend::float_cast(g, burn::tensor::FloatDType::F32))
                .collect();
        }
        // `max` was checked when the optimiser was made, and every gradient is non-empty and
        // of one dtype: the op has nothing left to refuse.
        let coef = B::InnerBackend::global_clip_coefficient(grads_f, max)
            .unwrap_or_else(|e| panic!("clipping by the global norm: {e}"));
        let coef = Tensor::<B::InnerBackend, 1>::from_primitive(TensorPrimitive::Float(coef));
        self.optim.scale.set(Some(Box::new(coef)));
        let module = self.adaptor.step(lr, module, grads);
        self.optim.scale.set(None);
        module
    }

    fn step_multi(&mut self, lr: LearningRate, module: M, grads: MultiGradientsParams) -> M {
        if self.max_global_norm.is_none() {
            return self.adaptor.step_multi(lr, module, grads);
        }
        // The global norm is over the gradients summed across devices: merge them first.
        let mut grads = grads;
        let mut merge = Merge {
            multi: &mut grads,
            out: GradientsParams::new(),
        };
        module.visit(&mut merge);
        let merged = merge.out;
        self.step(lr, module, merged)
    }

    fn to_record(&self) -> Self::Record {
        self.adaptor.to_record()
    }

    fn load_record(mut self, record: Self::Record) -> Self {
        self.adaptor = self.adaptor.load_record(record);
        self
    }
}

/// AdamW whose step is one fused op per parameter tensor (see [`FusedAdamWConfig`]).
///
/// Burn's `SimpleOptimizer::step` cannot return an error. Where the fused op refuses a tensor
/// that Burn's `AdamW` would take (a zero-length parameter, one of more than 2³¹ entries, a
/// dtype the device's kernels lack),
/// that tensor's step runs through tensor ops with the same math; a learning rate that is not
/// finite (from a custom schedule) panics with a message saying so.
#[derive(Clone, Debug)]
pub struct FusedAdamW {
    beta_1: f32,
    beta_2: f32,
    epsilon: f32,
    weight_decay: f32,
    cautious_weight_decay: bool,
    clip: Option<GradClip>,
    /// The global-norm coefficient, when [`FusedAdamWOptimizer`] clips by it.
    scale: ScaleSlot,
}

impl FusedAdamW {
    fn hyper(&self, lr: LearningRate, time: usize) -> AdamWStep {
        AdamWStep {
            lr,
            beta_1: self.beta_1,
            beta_2: self.beta_2,
            epsilon: self.epsilon,
            weight_decay: self.weight_decay,
            cautious_weight_decay: self.cautious_weight_decay,
            clip: self.clip,
            time,
        }
    }
}

impl<B: AdamWBackend> SimpleOptimizer<B> for FusedAdamW {
    type State<const D: usize> = AdamWState<B, D>;

    fn step<const D: usize>(
        &self,
        lr: LearningRate,
        tensor: Tensor<B, D>,
        grad: Tensor<B, D>,
        state: Option<Self::State<D>>,
    ) -> (Tensor<B, D>, Option<Self::State<D>>) {
        let dtype = tensor.dtype();
        // Mixed-precision setups may hand a gradient in another float type than the parameter,
        // and Burn's records load moments in the backend's default float type: all of them
        // follow the parameter.
        let like = |t: Tensor<B, D>| {
            if t.dtype() != dtype {
                t.cast(float_dtype(dtype))
            } else {
                t
            }
        };
        let grad = like(grad);
        let (time, moments) = match state {
            Some(s) => (
                s.momentum.time + 1,
                Some((like(s.momentum.moment_1), like(s.momentum.moment_2))),
            ),
            None => (1, None),
        };
        let s = self.hyper(lr, time);
        // On this parameter's device (a no-op on one device).
        let scale = self.scale.get::<B>().map(|c| c.to_device(&tensor.device()));
        let len = tensor.shape().num_elements();
        let fused = len > 0
            && len <= MAX_ADAMW_LEN
            && B::adamw_check_dtype(&tensor.device(), dtype).is_ok();
        let prim = |t: Tensor<B, D>| t.into_primitive().tensor();
        let (param, grad) = (prim(tensor), prim(grad));
        let moments = moments.map(|(m, v)| (prim(m), prim(v)));
        let scale = scale.map(|c| c.into_primitive().tensor());
        let [p, m, v] = if fused {
            match scale {
                Some(c) => B::adamw_step_scaled(param, grad, moments, &s, c),
                None => B::adamw_step(param, grad, moments, &s),
            }
            .unwrap_or_else(|e| panic!("fused AdamW step {time}: {e}"))
        } else {
            // Burn's optimizer trait has no error path, so the fallback panics with the reason
            // on what the fused op refuses (its `describe`, less the refusal of empty tensors):
            // a NaN learning rate would otherwise turn the parameters to NaN, moments from
            // another model's record broadcast or fail inside Burn.
            check_operands::<B>(&param, &grad, moments.as_ref())
                .and_then(|_| check_step(&s, moments.is_some()))
                .unwrap_or_else(|e| panic!("AdamW step {time}: {e}"));
            tensor_step::<B>(param, grad, moments, &s, scale)
        };
        let wrap = |t| Tensor::<B, D>::from_primitive(TensorPrimitive::Float(t));
        let state = AdamWState::new(AdaptiveMomentumState::new(time, wrap(m), wrap(v)));
        (wrap(p), Some(state))
    }

    fn to_device<const D: usize>(mut state: Self::State<D>, device: &Device<B>) -> Self::State<D> {
        state.momentum = state.momentum.to_device(device);
        state
    }
}
