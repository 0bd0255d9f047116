//! `Fusion<B>`: the forward and the backward each registered in the fusion stream as one custom
//! operation (float and int inputs, so not through `crate::recorded::fusion`, whose ops take
//! floats alone), validated before registration.

use burn::tensor::ops::FloatTensorOps;
use burn::tensor::{DType, Shape, TensorMetadata};
use burn_fusion::stream::{Operation, OperationStreams};
use burn_fusion::{Fusion, FusionBackend, FusionRuntime, FusionTensor};
use burn_ir::{CustomOpIr, HandleContainer, OperationIr, TensorIr};

use super::{describe, describe_backward, CrossEntropyBackend};
use crate::FlaError;

type FTensor<B> = FusionTensor<<B as FusionBackend>::FusionRuntime>;
type Handles<B> =
    HandleContainer<<<B as FusionBackend>::FusionRuntime as FusionRuntime>::FusionHandle>;

/// Inputs `[logits, targets]` (forward) or `[logits, targets, lse, dloss]` (backward).
#[derive(Debug, Clone)]
struct XentOp<B> {
    desc: CustomOpIr,
    backward: bool,
    _b: core::marker::PhantomData<B>,
}

impl<B: FusionBackend + CrossEntropyBackend> Operation<B::FusionRuntime> for XentOp<B> {
    fn execute(&self, handles: &mut Handles<B>) {
        let ir = &self.desc.inputs;
        let logits = handles.get_float_tensor::<B>(&ir[0]);
        let targets = handles.get_int_tensor::<B>(&ir[1]);
        let out = &self.desc.outputs;
        let valid = "inputs were validated before the op was registered";
        if self.backward {
            let lse = handles.get_float_tensor::<B>(&ir[2]);
            let dloss = handles.get_float_tensor::<B>(&ir[3]);
            let dx = B::cross_entropy_backward(logits, targets, lse, dloss).expect(valid);
            handles.register_float_tensor::<B>(&out[0].id, dx);
        } else {
            let (loss, lse) = B::cross_entropy_forward(logits, targets).expect(valid);
            handles.register_float_tensor::<B>(&out[0].id, loss);
            handles.register_float_tensor::<B>(&out[1].id, lse);
        }
    }
}

/// Registers one op over `inputs` with outputs of the given shapes and dtypes.
fn register<B: FusionBackend + CrossEntropyBackend>(
    name: &'static str,
    inputs: Vec<FTensor<B>>,
    outputs: &[(Vec<usize>, DType)],
) -> Vec<FTensor<B>> {
    let client = inputs[0].client.clone();
    let outputs: Vec<TensorIr> = outputs
        .iter()
        .map(|(dims, dtype)| {
            TensorIr::uninit(
                client.create_empty_handle(),
                Shape::from(dims.clone()),
                *dtype,
            )
        })
        .collect();
    let streams = OperationStreams::with_inputs(&inputs);
    let input_ir: Vec<TensorIr> = inputs.into_iter().map(|t| t.into_ir()).collect();
    let desc = CustomOpIr::new(name, &input_ir, &outputs);
    let node = XentOp::<B> {
        desc: desc.clone(),
        backward: input_ir.len() == 4,
        _b: Default::default(),
    };
    client.register(streams, OperationIr::Custom(desc), node)
}

impl<B: FusionBackend + CrossEntropyBackend> CrossEntropyBackend for Fusion<B> {
    fn cross_entropy_forward(
        logits: FTensor<B>,
        targets: FTensor<B>,
    ) -> Result<(FTensor<B>, FTensor<B>), FlaError> {
        let p = describe::<Self>(&logits, &targets)?;
        B::cross_entropy_check_dtype(&Self::float_device(&logits), logits.dtype())?;
        let rows = (vec![p.rows], DType::F32);
        let mut out = register::<B>(
            "fla_cross_entropy_forward",
            vec![logits, targets],
            &[rows.clone(), rows],
        );
        let lse = out.pop().expect("registered lse");
        Ok((out.pop().expect("registered loss"), lse))
    }

    fn cross_entropy_backward(
        logits: FTensor<B>,
        targets: FTensor<B>,
        lse: FTensor<B>,
        dloss: FTensor<B>,
    ) -> Result<FTensor<B>, FlaError> {
        describe_backward::<Self>(&logits, &targets, &lse, &dloss)?;
        B::cross_entropy_check_dtype(&Self::float_device(&logits), logits.dtype())?;
        let out = (logits.shape().to_vec(), logits.dtype());
        let mut dx = register::<B>(
            "fla_cross_entropy_backward",
            vec![logits, targets, lse, dloss],
            &[out],
        );
        Ok(dx.pop().expect("registered dlogits"))
    }

    fn cross_entropy_check_dtype(device: &Self::Device, dtype: DType) -> Result<(), FlaError> {
        B::cross_entropy_check_dtype(device, dtype)
    }
}
