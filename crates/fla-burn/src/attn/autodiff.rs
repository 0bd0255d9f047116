//! `Autodiff<B>`: the forward on the inner backend, recorded as one graph node whose backward is
//! the hand-derived one (`B::attn_backward`), the log-sum-exp saved in the node
//! (`crate::recorded::autodiff`).

use burn::backend::Autodiff;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::DType;
use burn_autodiff::checkpoint::strategy::CheckpointStrategy;
use fla_cubecl_kernels::attn::AttnProblem;

use super::{describe, AttentionBackend, AttnForward, AttnGrads, AttnOpOptions, AttnTensors};
use crate::recorded::{autodiff, Outputs};
use crate::FlaError;

impl<B: AttentionBackend, C: CheckpointStrategy> AttentionBackend for Autodiff<B, C> {
    /// Records the forward. The returned `lse` is a constant: the node keeps it for its
    /// backward, and no gradient flows through it.
    fn attn_forward(
        x: AttnTensors<Self>,
        opts: &AttnOpOptions,
    ) -> Result<AttnForward<Self>, FlaError> {
        describe(&x, opts)?;
        let Outputs { o, ht, .. } = autodiff::forward::<B, C, _>(opts, x.into_inputs())?;
        let lse = ht.ok_or_else(|| FlaError::Shape("the forward returned no lse".into()))?;
        Ok(AttnForward { o, lse })
    }

    /// Runs the inner backend's backward on the primitives: gradients of gradients are not
    /// recorded.
    fn attn_backward(
        x: AttnTensors<Self>,
        out: AttnForward<Self>,
        d_o: FloatTensor<Self>,
        opts: &AttnOpOptions,
    ) -> Result<AttnGrads<Self>, FlaError> {
        let inner = AttnTensors::<B> {
            q: x.q.primitive,
            k: x.k.primitive,
            v: x.v.primitive,
        };
        let out = AttnForward::<B> {
            o: out.o.primitive,
            lse: out.lse.primitive,
        };
        let g = B::attn_backward(inner, out, d_o.primitive, opts)?;
        let w = <Self as AutodiffBackend>::from_inner;
        Ok(AttnGrads {
            dq: w(g.dq),
            dk: w(g.dk),
            dv: w(g.dv),
        })
    }

    fn attn_check_dtype(device: &Self::Device, dtype: DType) -> Result<(), FlaError> {
        B::attn_check_dtype(device, dtype)
    }

    fn attn_check_device(device: &Self::Device, problem: &AttnProblem) -> Result<(), FlaError> {
        B::attn_check_device(device, problem)
    }
}
