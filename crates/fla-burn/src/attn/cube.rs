//! `CubeBackend` (CUDA, wgpu): the fused kernels of `fla-cubecl-kernels`.

use burn::tensor::{DType, TensorMetadata};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
use fla_cubecl_kernels::attn::{
    attn_backward, attn_forward, AttnBackwardBuffers, AttnForwardBuffers, AttnProblem,
};

use super::{
    describe, describe_backward, AttentionBackend, AttnForward, AttnGrads, AttnOpOptions,
    AttnTensors,
};
use crate::gated::cube::empty;
use crate::gated::kernel_dtype;
use crate::FlaError;

/// Fills in the kernels' dtype of a validated problem and checks the device computes it.
fn on_device<R: CubeRuntime>(
    mut p: AttnProblem,
    q: &CubeTensor<R>,
) -> Result<AttnProblem, FlaError> {
    p.dtype = kernel_dtype(q.dtype())?;
    p.dtype.check_supported(&q.client)?;
    Ok(p)
}

/// The kernels index flat row-major buffers.
fn contiguous<R: CubeRuntime>(
    x: AttnTensors<CubeBackend<R, impl FloatElement, impl IntElement, impl BoolElement>>,
) -> [CubeTensor<R>; 3] {
    [x.q, x.k, x.v].map(into_contiguous)
}

impl<R, F, I, BT> AttentionBackend for CubeBackend<R, F, I, BT>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    fn attn_forward(
        x: AttnTensors<Self>,
        opts: &AttnOpOptions,
    ) -> Result<AttnForward<Self>, FlaError> {
        let p = on_device(describe(&x, opts)?, &x.q)?;
        let dtype = x.q.dtype();
        let [q, k, v] = contiguous(x);
        let o = empty(&q, vec![p.batch, p.q_len, p.heads, p.v_dim], dtype);
        let lse = empty(&q, vec![p.batch, p.q_len, p.heads], DType::F32);
        attn_forward(
            &q.client,
            &p,
            AttnForwardBuffers {
                q: &q.handle,
                k: &k.handle,
                v: &v.handle,
                o: &o.handle,
                lse: &lse.handle,
            },
        )?;
        Ok(AttnForward { o, lse })
    }

    fn attn_backward(
        x: AttnTensors<Self>,
        out: AttnForward<Self>,
        d_o: CubeTensor<R>,
        opts: &AttnOpOptions,
    ) -> Result<AttnGrads<Self>, FlaError> {
        let p = on_device(describe_backward(&x, &out, &d_o, opts)?, &x.q)?;
        let [q, k, v] = contiguous(x);
        let (o, lse, d_o) = (
            into_contiguous(out.o),
            into_contiguous(out.lse),
            into_contiguous(d_o),
        );
        let like = |t: &CubeTensor<R>| empty(&q, t.shape().to_vec(), t.dtype());
        let grads = AttnGrads::<Self> {
            dq: like(&q),
            dk: like(&k),
            dv: like(&v),
        };
        attn_backward(
            &q.client,
            &p,
            AttnBackwardBuffers {
                q: &q.handle,
                k: &k.handle,
                v: &v.handle,
                o: &o.handle,
                lse: &lse.handle,
                d_o: &d_o.handle,
                dq: &grads.dq.handle,
                dk: &grads.dk.handle,
                dv: &grads.dv.handle,
            },
        )?;
        Ok(grads)
    }

    fn attn_check_dtype(device: &Self::Device, dtype: DType) -> Result<(), FlaError> {
        let client = R::client(device);
        kernel_dtype(dtype)?.check_supported(&client)?;
        Ok(())
    }

    fn attn_check_device(device: &Self::Device, problem: &AttnProblem) -> Result<(), FlaError> {
        fla_cubecl_kernels::attn::attn_check_device(&R::client(device), problem)?;
        Ok(())
    }
}
