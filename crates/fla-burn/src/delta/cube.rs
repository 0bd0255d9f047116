//! `CubeBackend` (CUDA, wgpu): the fused kernels of `fla-cubecl-kernels`.

use burn::tensor::{DType, TensorMetadata};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
use fla_cubecl_kernels::delta::{
    delta_backward, delta_chunk_backward, delta_chunk_forward, delta_chunk_on_tensor_cores,
    delta_forward, DeltaBackwardBuffers, DeltaForwardBuffers, DeltaProblem,
};

use super::{
    describe, describe_backward, resolve_delta_mode, DeltaForward, DeltaGrads, DeltaMode,
    DeltaOptions, DeltaRuleBackend, DeltaTensors,
};
use crate::gated::cube::empty;
use crate::gated::{kernel_dtype, CHUNK_SIZE};
use crate::FlaError;

/// The kernels index flat buffers: every input in row-major order.
fn contiguous<R: CubeRuntime>(x: [Option<CubeTensor<R>>; 6]) -> [Option<CubeTensor<R>>; 6] {
    x.map(|t| t.map(into_contiguous))
}

/// Fills in the kernels' dtype of a validated problem and checks the device computes it.
fn on_device<R: CubeRuntime>(
    mut p: DeltaProblem,
    q: &CubeTensor<R>,
) -> Result<DeltaProblem, FlaError> {
    p.dtype = kernel_dtype(q.dtype())?;
    p.dtype.check_supported(&q.client)?;
    Ok(p)
}

impl<R, F, I, BT> DeltaRuleBackend for CubeBackend<R, F, I, BT>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    fn delta_rule_forward(
        x: DeltaTensors<Self>,
        opts: &DeltaOptions,
    ) -> Result<DeltaForward<Self>, FlaError> {
        let p = on_device(describe(&x, opts)?, &x.q)?;
        let dtype = x.q.dtype();
        let x = DeltaTensors::<Self>::from_inputs(contiguous(x.into_inputs()));
        let o = empty(&x.q, vec![p.batch, p.seq_len, p.v_heads, p.v_dim], dtype);
        let state = vec![p.num_seqs(), p.v_heads, p.k_dim, p.v_dim];
        let ht = p.output_final_state.then(|| empty(&x.q, state, DType::F32));
        let buffers = DeltaForwardBuffers {
            q: &x.q.handle,
            k: &x.k.handle,
            v: &x.v.handle,
            beta: &x.beta.handle,
            g: x.g.as_ref().map(|t| &t.handle),
            h0: x.h0.as_ref().map(|t| &t.handle),
            o: &o.handle,
            ht: ht.as_ref().map(|t| &t.handle),
        };
        match resolve_delta_mode(opts.mode, &p, delta_chunk_on_tensor_cores(&x.q.client, &p)) {
            DeltaMode::Chunk => delta_chunk_forward(&x.q.client, &p, CHUNK_SIZE, buffers)?,
            _ => delta_forward(&x.q.client, &p, buffers)?,
        }
        Ok(DeltaForward { o, ht })
    }

    fn delta_rule_backward(
        x: DeltaTensors<Self>,
        d_o: CubeTensor<R>,
        d_ht: Option<CubeTensor<R>>,
        opts: &DeltaOptions,
    ) -> Result<DeltaGrads<Self>, FlaError> {
        let p = describe_backward(&x, &d_o, d_ht.as_ref(), opts)?;
        let p = on_device(p, &x.q)?;
        let x = DeltaTensors::<Self>::from_inputs(contiguous(x.into_inputs()));
        let d_o = into_contiguous(d_o);
        let d_ht = d_ht.map(into_contiguous);
        let like = |t: &CubeTensor<R>| empty(&x.q, t.shape().to_vec(), t.dtype());
        let grads = DeltaGrads::<Self> {
            dq: like(&x.q),
            dk: like(&x.k),
            dv: like(&x.v),
            dbeta: like(&x.beta),
            dg: x.g.as_ref().map(like),
            dh0: x.h0.as_ref().map(like),
        };
        let buffers = DeltaBackwardBuffers {
            q: &x.q.handle,
            k: &x.k.handle,
            v: &x.v.handle,
            beta: &x.beta.handle,
            g: x.g.as_ref().map(|t| &t.handle),
            h0: x.h0.as_ref().map(|t| &t.handle),
            d_o: &d_o.handle,
            d_ht: d_ht.as_ref().map(|t| &t.handle),
            dq: &grads.dq.handle,
            dk: &grads.dk.handle,
            dv: &grads.dv.handle,
            dbeta: &grads.dbeta.handle,
            dg: grads.dg.as_ref().map(|t| &t.handle),
            dh0: grads.dh0.as_ref().map(|t| &t.handle),
        };
        match resolve_delta_mode(opts.mode, &p, delta_chunk_on_tensor_cores(&x.q.client, &p)) {
            DeltaMode::Chunk => delta_chunk_backward(&x.q.client, &p, CHUNK_SIZE, buffers)?,
            _ => delta_backward(&x.q.client, &p, buffers)?,
        }
        Ok(grads)
    }

    fn delta_check_dtype(device: &Self::Device, dtype: DType) -> Result<(), FlaError> {
        let client = R::client(device);
        kernel_dtype(dtype)?.check_supported(&client)?;
        Ok(())
    }

    fn delta_check_device(device: &Self::Device, problem: &DeltaProblem) -> Result<(), FlaError> {
        fla_cubecl_kernels::delta::delta_check_device(&R::client(device), problem)?;
        Ok(())
    }
}
