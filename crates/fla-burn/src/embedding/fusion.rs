//! `Fusion<B>`: the backward registered in the fusion stream as one custom operation (float and
//! int inputs, as the cross-entropy's), validated before registration; the lookup is Burn's
//! `select`, which the stream records as it is.

use burn::tensor::ops::FloatTensorOps;
use burn::tensor::{DType, Shape, TensorMetadata};
use burn_fusion::stream::{Operation, OperationStreams};
use burn_fusion::{Fusion, FusionBackend, FusionRuntime, FusionTensor};
use burn_ir::{CustomOpIr, HandleContainer, OperationIr, TensorIr};

use fla_cubecl_kernels::embedding::EmbeddingProblem;

use super::{describe_backward, EmbeddingBackend};
use crate::FlaError;

type FTensor<B> = FusionTensor<<B as FusionBackend>::FusionRuntime>;
type Handles<B> =
    HandleContainer<<<B as FusionBackend>::FusionRuntime as FusionRuntime>::FusionHandle>;

/// Inputs `[dy, ids]`, output `dw`.
#[derive(Debug, Clone)]
struct BackwardOp<B> {
    desc: CustomOpIr,
    vocab: usize,
    _b: core::marker::PhantomData<B>,
}

impl<B: FusionBackend + EmbeddingBackend> Operation<B::FusionRuntime> for BackwardOp<B> {
    fn execute(&self, handles: &mut Handles<B>) {
        let ir = &self.desc.inputs;
        let dy = handles.get_float_tensor::<B>(&ir[0]);
        let ids = handles.get_int_tensor::<B>(&ir[1]);
        let dw = B::embedding_weight_grad(dy, ids, self.vocab)
            .expect("inputs were validated before the op was registered");
        handles.register_float_tensor::<B>(&self.desc.outputs[0].id, dw);
    }
}

impl<B: FusionBackend + EmbeddingBackend> EmbeddingBackend for Fusion<B> {
    fn embedding_weight_grad(
        dy: FTensor<B>,
        ids: FTensor<B>,
        vocab: usize,
    ) -> Result<FTensor<B>, FlaError> {
        let p = describe_backward::<Self>(&dy, &ids, vocab)?;
        B::embedding_check(&Self::float_device(&dy), dy.dtype(), &p)?;
        let client = dy.client.clone();
        let out = TensorIr::uninit(
            client.create_empty_handle(),
            Shape::from(vec![vocab, p.dim]),
            dy.dtype(),
        );
        let inputs = vec![dy, ids];
        let streams = OperationStreams::with_inputs(&inputs);
        let input_ir: Vec<TensorIr> = inputs.into_iter().map(|t| t.into_ir()).collect();
        let desc = CustomOpIr::new("fla_embedding_backward", &input_ir, &[out]);
        let node = BackwardOp::<B> {
            desc: desc.clone(),
            vocab,
            _b: Default::default(),
        };
        let mut dw = client.register(streams, OperationIr::Custom(desc), node);
        Ok(dw.pop().expect("registered dw"))
    }

    fn embedding_check(
        device: &Self::Device,
        dtype: DType,
        p: &EmbeddingProblem,
    ) -> Result<(), FlaError> {
        B::embedding_check(device, dtype, p)
    }
}
