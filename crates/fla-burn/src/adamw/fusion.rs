//! `Fusion<B>`: the step registered in the fusion stream as one custom operation, validated
//! before registration, that runs the inner backend's fused step when the stream executes.

use burn::tensor::ops::FloatTensorOps;
use burn::tensor::{DType, Shape, TensorMetadata};
use burn_fusion::stream::{Operation, OperationStreams};
use burn_fusion::{Fusion, FusionBackend, FusionRuntime, FusionTensor};
use burn_ir::{CustomOpIr, HandleContainer, OperationIr, TensorIr};

use super::{check_global, check_scale, describe, AdamWBackend, AdamWStep, Moments};
use crate::FlaError;

type FTensor<B> = FusionTensor<<B as FusionBackend>::FusionRuntime>;
type Handles<B> =
    HandleContainer<<<B as FusionBackend>::FusionRuntime as FusionRuntime>::FusionHandle>;

#[derive(Debug, Clone)]
struct StepOp<B> {
    desc: CustomOpIr,
    step: AdamWStep,
    /// Whether the third input is a gradient scale ([`AdamWBackend::adamw_step_scaled`]).
    scaled: bool,
    _b: core::marker::PhantomData<B>,
}

impl<B: FusionBackend + AdamWBackend> Operation<B::FusionRuntime> for StepOp<B> {
    fn execute(&self, handles: &mut Handles<B>) {
        // Inputs `[param, grad]`, then the scale where there is one, then `m, v` where there
        // are moments; a tensor used for the last time leaves the container here, so the
        // inner step may reuse its buffer.
        let mut x = self
            .desc
            .inputs
            .iter()
            .map(|ir| handles.get_float_tensor::<B>(ir));
        let (param, grad) = (x.next().expect("param"), x.next().expect("grad"));
        let scale = self.scaled.then(|| x.next().expect("scale"));
        let moments = x.next().map(|m| (m, x.next().expect("v")));
        let out = match scale {
            Some(c) => B::adamw_step_scaled(param, grad, moments, &self.step, c),
            None => B::adamw_step(param, grad, moments, &self.step),
        }
        .expect("inputs were validated before the op was registered");
        for (ir, t) in self.desc.outputs.iter().zip(out) {
            handles.register_float_tensor::<B>(&ir.id, t);
        }
    }
}

/// [`AdamWBackend::global_clip_coefficient`] of the inner backend, on every gradient of a
/// step at once (inputs: the gradients; output: the coefficient).
#[derive(Debug, Clone)]
struct GlobalOp<B> {
    desc: CustomOpIr,
    max_norm: f32,
    _b: core::marker::PhantomData<B>,
}

impl<B: FusionBackend + AdamWBackend> Operation<B::FusionRuntime> for GlobalOp<B> {
    fn execute(&self, handles: &mut Handles<B>) {
        let grads = self
            .desc
            .inputs
            .iter()
            .map(|ir| handles.get_float_tensor::<B>(ir))
            .collect();
        let coef = B::global_clip_coefficient(grads, self.max_norm)
            .expect("inputs were validated before the op was registered");
        handles.register_float_tensor::<B>(&self.desc.outputs[0].id, coef);
    }
}

impl<B: FusionBackend + AdamWBackend> AdamWBackend for Fusion<B> {
    fn global_clip_coefficient(
        grads: Vec<FTensor<B>>,
        max_norm: f32,
    ) -> Result<FTensor<B>, FlaError> {
        let dtype = check_global::<Self>(&grads, max_norm)?;
        B::adamw_check_dtype(&Self::float_device(&grads[0]), dtype)?;
        let client = grads[0].client.clone();
        let output = TensorIr::uninit(
            client.create_empty_handle(),
            Shape::from(vec![1]),
            DType::F32,
        );
        let streams = OperationStreams::with_inputs(&grads);
        let input_ir: Vec<TensorIr> = grads.into_iter().map(|t| t.into_ir()).collect();
        let desc = CustomOpIr::new("fla_global_clip_coefficient", &input_ir, &[output]);
        let node = GlobalOp::<B> {
            desc: desc.clone(),
            max_norm,
            _b: Default::default(),
        };
        let mut out = client.register(streams, OperationIr::Custom(desc), node);
        Ok(out.remove(0))
    }

    fn adamw_step(
        param: FTensor<B>,
        grad: FTensor<B>,
        moments: Option<Moments<Self>>,
        s: &AdamWStep,
    ) -> Result<[FTensor<B>; 3], FlaError> {
        register::<B>(param, grad, moments, s, None)
    }

    fn adamw_step_scaled(
        param: FTensor<B>,
        grad: FTensor<B>,
        moments: Option<Moments<Self>>,
        s: &AdamWStep,
        scale: FTensor<B>,
    ) -> Result<[FTensor<B>; 3], FlaError> {
        check_scale::<Self>(&scale, s)?;
        register::<B>(param, grad, moments, s, Some(scale))
    }

    fn adamw_check_dtype(device: &Self::Device, dtype: DType) -> Result<(), FlaError> {
        B::adamw_check_dtype(device, dtype)
    }
}

/// Validates a step and registers it in the fusion stream.
fn register<B: FusionBackend + AdamWBackend>(
    param: FTensor<B>,
    grad: FTensor<B>,
    moments: Option<Moments<Fusion<B>>>,
    s: &AdamWStep,
    scale: Option<FTensor<B>>,
) -> Result<[FTensor<B>; 3], FlaError> {
    describe::<Fusion<B>>(&param, &grad, moments.as_ref(), s)?;
    B::adamw_check_dtype(&Fusion::<B>::float_device(&param), param.dtype())?;
    let client = param.client.clone();
    let (shape, dtype) = (Shape::from(param.shape().to_vec()), param.dtype());
    let outputs: Vec<TensorIr> = (0..3)
        .map(|_| TensorIr::uninit(client.create_empty_handle(), shape.clone(), dtype))
        .collect();
    let scaled = scale.is_some();
    let mut inputs = vec![param, grad];
    inputs.extend(scale);
    if let Some((m, v)) = moments {
        inputs.extend([m, v]);
    }
    let streams = OperationStreams::with_inputs(&inputs);
    let input_ir: Vec<TensorIr> = inputs.into_iter().map(|t| t.into_ir()).collect();
    let desc = CustomOpIr::new("fla_adamw_step", &input_ir, &outputs);
    let node = StepOp::<B> {
        desc: desc.clone(),
        step: s.clone(),
        scaled,
        _b: Default::default(),
    };
    let out = client.register(streams, OperationIr::Custom(desc), node);
    let [p, m, v]: [FTensor<B>; 3] = out.try_into().expect("three registered outputs");
    Ok([p, m, v])
}
