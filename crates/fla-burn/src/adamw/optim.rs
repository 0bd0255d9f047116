//! [`FusedAdamW`]: Burn's `AdamW`, its per-tensor gradient clipping included, with each
//! parameter's step one fused op ([`AdamWBackend::adamw_step`]).
//!
//! It plugs into Burn's `OptimizerAdaptor` as a `SimpleOptimizer`, and its state is Burn's own
//! `AdamWState`, so optimiser records saved by either load into the other.

use burn::config::Config;
use burn::module::AutodiffModule;
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::{AdamWState, AdaptiveMomentumState, LearningRate, SimpleOptimizer};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Device, Tensor, TensorPrimitive};

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
        };
        check_step(&optim.hyper(0.0, 1), false)?;
        Ok(optim)
    }

    /// The optimiser for module `M` on backend `B`, as Burn's `AdamWConfig::init` makes it.
    pub fn init<B, M>(&self) -> Result<OptimizerAdaptor<FusedAdamW, M, B>, FlaError>
    where
        B: AutodiffBackend,
        B::InnerBackend: AdamWBackend,
        M: AutodiffModule<B>,
    {
        Ok(OptimizerAdaptor::from(self.build()?))
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
        let len = tensor.shape().num_elements();
        let fused = len > 0
            && len <= MAX_ADAMW_LEN
            && B::adamw_check_dtype(&tensor.device(), dtype).is_ok();
        let prim = |t: Tensor<B, D>| t.into_primitive().tensor();
        let (param, grad) = (prim(tensor), prim(grad));
        let moments = moments.map(|(m, v)| (prim(m), prim(v)));
        let [p, m, v] = if fused {
            B::adamw_step(param, grad, moments, &s)
                .unwrap_or_else(|e| panic!("fused AdamW step {time}: {e}"))
        } else {
            // Burn's optimizer trait has no error path, so the fallback panics with the reason
            // on what the fused op refuses (its `describe`, less the refusal of empty tensors):
            // a NaN learning rate would otherwise turn the parameters to NaN, moments from
            // another model's record broadcast or fail inside Burn.
            check_operands::<B>(&param, &grad, moments.as_ref())
                .and_then(|_| check_step(&s, moments.is_some()))
                .unwrap_or_else(|e| panic!("AdamW step {time}: {e}"));
            tensor_step::<B>(param, grad, moments, &s)
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
