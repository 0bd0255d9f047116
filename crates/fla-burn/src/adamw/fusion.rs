//! `Fusion<B>`: the step registered in the fusion stream as one custom operation, validated
//! before registration, that runs the inner backend's fused step when the stream executes.

use burn::tensor::ops::FloatTensorOps;
use burn::tensor::{DType, Shape, TensorMetadata};
use burn_fusion::stream::{Operation, OperationStreams};
use burn_fusion::{Fusion, FusionBackend, FusionRuntime, FusionTensor};
use burn_ir::{CustomOpIr, HandleContainer, OperationIr, TensorIr};

use super::{describe, AdamWBackend, AdamWStep, Moments};
use crate::FlaError;

type FTensor<B> = FusionTensor<<B as FusionBackend>::FusionRuntime>;
type Handles<B> =
    HandleContainer<<<B as FusionBackend>::FusionRuntime as FusionRuntime>::FusionHandle>;

#[derive(Debug, Clone)]
struct StepOp<B> {
    desc: CustomOpIr,
    step: AdamWStep,
    _b: core::marker::PhantomData<B>,
}

impl<B: FusionBackend + AdamWBackend> Operation<B::FusionRuntime> for StepOp<B> {
    fn execute(&self, handles: &mut Handles<B>) {
        // Inputs `[param, grad]` or `[param, grad, m, v]`; a tensor used for the last time
        // leaves the container here, so the inner step may reuse its buffer.
        let mut x = self
            .desc
            .inputs
            .iter()
            .map(|ir| handles.get_float_tensor::<B>(ir));
        let (param, grad) = (x.next().expect("param"), x.next().expect("grad"));
        let moments = x.next().map(|m| (m, x.next().expect("v")));
        let out = B::adamw_step(param, grad, moments, &self.step)
            .expect("inputs were validated before the op was registered");
        for (ir, t) in self.desc.outputs.iter().zip(out) {
            handles.register_float_tensor::<B>(&ir.id, t);
        }
    }
}

impl<B: FusionBackend + AdamWBackend> AdamWBackend for Fusion<B> {
    fn adamw_step(
        param: FTensor<B>,
        grad: FTensor<B>,
        moments: Option<Moments<Self>>,
        s: &AdamWStep,
    ) -> Result<[FTensor<B>; 3], FlaError> {
        describe::<Self>(&param, &grad, moments.as_ref(), s)?;
        B::adamw_check_dtype(&Self::float_device(&param), param.dtype())?;
        let client = param.client.clone();
        let (shape, dtype) = (Shape::from(param.shape().to_vec()), param.dtype());
        let outputs: Vec<TensorIr> = (0..3)
            .map(|_| TensorIr::uninit(client.create_empty_handle(), shape.clone(), dtype))
            .collect();
        let mut inputs = vec![param, grad];
        if let Some((m, v)) = moments {
            inputs.extend([m, v]);
        }
        let streams = OperationStreams::with_inputs(&inputs);
        let input_ir: Vec<TensorIr> = inputs.into_iter().map(|t| t.into_ir()).collect();
        let desc = CustomOpIr::new("fla_adamw_step", &input_ir, &outputs);
        let node = StepOp::<B> {
            desc: desc.clone(),
            step: s.clone(),
            _b: Default::default(),
        };
        let out = client.register(streams, OperationIr::Custom(desc), node);
        let [p, m, v]: [FTensor<B>; 3] = out.try_into().expect("three registered outputs");
        Ok([p, m, v])
    }

    fn adamw_check_dtype(device: &Self::Device, dtype: DType) -> Result<(), FlaError> {
        B::adamw_check_dtype(device, dtype)
    }
}
