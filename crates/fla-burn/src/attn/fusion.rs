//! `Fusion<B>`: the op registered in the fusion stream as a custom operation
//! (`crate::recorded::fusion`), validated before registration.

use burn::tensor::ops::FloatTensorOps;
use burn::tensor::DType;
use burn::tensor::TensorMetadata;
use burn_fusion::{Fusion, FusionBackend, FusionTensor};

use super::{
    describe, describe_backward, AttentionBackend, AttnForward, AttnGrads, AttnOpOptions,
    AttnTensors,
};
use crate::gated::kernel_dtype;
use crate::recorded::{fusion, Outputs};
use crate::FlaError;
use fla_cubecl_kernels::attn::AttnProblem;

impl<B: FusionBackend + AttentionBackend> AttentionBackend for Fusion<B> {
    fn attn_forward(
        x: AttnTensors<Self>,
        opts: &AttnOpOptions,
    ) -> Result<AttnForward<Self>, FlaError> {
        let mut p = describe(&x, opts)?;
        let device = Self::float_device(&x.q);
        B::attn_check_dtype(&device, x.q.dtype())?;
        p.dtype = kernel_dtype(x.q.dtype())?;
        B::attn_check_device(&device, &p)?;
        let o = vec![p.batch, p.q_len, p.heads, p.v_dim];
        let lse = vec![p.batch, p.q_len, p.heads];
        let Outputs { o, ht, .. } = fusion::forward::<B, _>(opts, x.into_inputs(), o, Some(lse));
        Ok(AttnForward {
            o,
            lse: ht.expect("registered lse"),
        })
    }

    fn attn_backward(
        x: AttnTensors<Self>,
        out: AttnForward<Self>,
        d_o: FusionTensor<B::FusionRuntime>,
        opts: &AttnOpOptions,
    ) -> Result<AttnGrads<Self>, FlaError> {
        let mut p = describe_backward(&x, &out, &d_o, opts)?;
        let device = Self::float_device(&x.q);
        B::attn_check_dtype(&device, x.q.dtype())?;
        p.dtype = kernel_dtype(x.q.dtype())?;
        B::attn_check_device(&device, &p)?;
        let out = Outputs {
            o: out.o,
            ht: Some(out.lse),
            aux: None,
        };
        let g = fusion::backward::<B, _>(opts, x.into_inputs(), Some(out), d_o, None);
        let x = AttnTensors::<Self>::from_inputs(g);
        Ok(AttnGrads {
            dq: x.q,
            dk: x.k,
            dv: x.v,
        })
    }

    fn attn_check_dtype(device: &Self::Device, dtype: DType) -> Result<(), FlaError> {
        B::attn_check_dtype(device, dtype)
    }

    fn attn_check_device(device: &Self::Device, problem: &AttnProblem) -> Result<(), FlaError> {
        B::attn_check_device(device, problem)
    }
}
