//! `CubeBackend` (CUDA, wgpu): the fused kernels of `fla-cubecl-kernels`.

use burn::tensor::ops::IntTensorOps;
use burn::tensor::{DType, IntDType, Shape, TensorMetadata};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
use fla_cubecl_kernels::gated::{
    chunk_backward, chunk_forward, chunk_scores_shape, recurrent_backward, recurrent_forward,
    BackwardBuffers, ForwardBuffers, GatedProblem,
};

use super::{
    describe, describe_backward, kernel_dtype, GatedForward, GatedGrads, GatedMode, GatedOptions,
    GatedRecurrentBackend, GatedTensors, CHUNK_SIZE,
};
use crate::FlaError;

/// The kernels index flat buffers: every input in row-major order.
fn contiguous<B: GatedRecurrentBackend<FloatTensorPrimitive = CubeTensor<R>>, R: CubeRuntime>(
    x: GatedTensors<B>,
) -> GatedTensors<B> {
    GatedTensors {
        q: into_contiguous(x.q),
        k: into_contiguous(x.k),
        v: into_contiguous(x.v),
        g: x.g.map(into_contiguous),
        gv: x.gv.map(into_contiguous),
        h0: x.h0.map(into_contiguous),
    }
}

pub(crate) fn empty<R: CubeRuntime>(
    like: &CubeTensor<R>,
    dims: Vec<usize>,
    dtype: DType,
) -> CubeTensor<R> {
    empty_device_contiguous_dtype::<R>(
        like.client.clone(),
        like.device.clone(),
        Shape::from(dims),
        dtype,
    )
}

/// The shape of the in-chunk scores the forward of `p` keeps (the chunk form under vector gates
/// on the tiled path), `None` where it keeps none.
fn scores_shape<R: CubeRuntime>(
    client: &cubecl::prelude::ComputeClient<R>,
    p: &GatedProblem,
    opts: &GatedOptions,
) -> Option<[usize; 3]> {
    match opts.mode.resolve(p) {
        GatedMode::Chunk => chunk_scores_shape(client, p, CHUNK_SIZE),
        _ => None,
    }
}

/// Fills in the kernels' dtype of a validated problem and checks the device computes it.
fn on_device<R: CubeRuntime>(
    mut p: GatedProblem,
    q: &CubeTensor<R>,
) -> Result<GatedProblem, FlaError> {
    p.dtype = kernel_dtype(q.dtype())?;
    p.dtype.check_supported(&q.client)?;
    Ok(p)
}

impl<R, F, I, BT> GatedRecurrentBackend for CubeBackend<R, F, I, BT>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    fn gated_recurrent_forward(
        x: GatedTensors<Self>,
        opts: &GatedOptions,
    ) -> Result<GatedForward<Self>, FlaError> {
        let p = on_device(describe(&x, opts)?, &x.q)?;
        let dtype = x.q.dtype();
        let GatedTensors { q, k, v, g, gv, h0 } = contiguous(x);
        let o = empty(&q, vec![p.batch, p.seq_len, p.heads, p.v_dim], dtype);
        let state = vec![p.num_seqs(), p.heads, p.k_dim, p.v_dim];
        let ht = p.output_final_state.then(|| empty(&q, state, DType::F32));
        let scores = scores_shape(&q.client, &p, opts).map(|d| empty(&q, d.to_vec(), dtype));
        let buffers = ForwardBuffers {
            q: &q.handle,
            k: &k.handle,
            v: &v.handle,
            g: g.as_ref().map(|t| &t.handle),
            gv: gv.as_ref().map(|t| &t.handle),
            h0: h0.as_ref().map(|t| &t.handle),
            o: &o.handle,
            ht: ht.as_ref().map(|t| &t.handle),
            scores: scores.as_ref().map(|t| &t.handle),
        };
        match opts.mode.resolve(&p) {
            GatedMode::Chunk => chunk_forward(&q.client, &p, CHUNK_SIZE, buffers)?,
            _ => recurrent_forward(&q.client, &p, buffers)?,
        }
        Ok(GatedForward { o, ht, scores })
    }

    fn gated_recurrent_backward(
        x: GatedTensors<Self>,
        o: CubeTensor<R>,
        ht: Option<CubeTensor<R>>,
        scores: Option<CubeTensor<R>>,
        d_o: CubeTensor<R>,
        d_ht: Option<CubeTensor<R>>,
        opts: &GatedOptions,
    ) -> Result<GatedGrads<Self>, FlaError> {
        let p = describe_backward(&x, &o, ht.as_ref(), &d_o, d_ht.as_ref(), opts)?;
        let p = on_device(p, &x.q)?;
        // Scores of another shape than this problem's are not this forward's: summed again.
        let want = scores_shape(&x.q.client, &p, opts);
        let scores = scores
            .filter(|s| want.is_some_and(|d| s.shape().to_vec() == d && s.dtype() == x.q.dtype()))
            .map(into_contiguous);
        let dtype = x.q.dtype();
        let GatedTensors { q, k, v, g, gv, h0 } = contiguous(x);
        let (o, d_o) = (into_contiguous(o), into_contiguous(d_o));
        let ht = ht.map(into_contiguous);
        let d_ht = d_ht.map(into_contiguous);
        let dq = empty(&q, q.shape().to_vec(), dtype);
        let dk = empty(&q, q.shape().to_vec(), dtype);
        let dv = empty(&q, v.shape().to_vec(), dtype);
        let dg = g.as_ref().map(|t| empty(&q, t.shape().to_vec(), dtype));
        let dgv = gv.as_ref().map(|t| empty(&q, t.shape().to_vec(), dtype));
        let dh0 = h0
            .as_ref()
            .map(|t| empty(&q, t.shape().to_vec(), DType::F32));
        let buffers = BackwardBuffers {
            q: &q.handle,
            k: &k.handle,
            v: &v.handle,
            g: g.as_ref().map(|t| &t.handle),
            gv: gv.as_ref().map(|t| &t.handle),
            h0: h0.as_ref().map(|t| &t.handle),
            o: Some(&o.handle),
            ht: ht.as_ref().map(|t| &t.handle),
            d_o: &d_o.handle,
            d_ht: d_ht.as_ref().map(|t| &t.handle),
            dq: &dq.handle,
            dk: &dk.handle,
            dv: &dv.handle,
            dg: dg.as_ref().map(|t| &t.handle),
            dgv: dgv.as_ref().map(|t| &t.handle),
            dh0: dh0.as_ref().map(|t| &t.handle),
            scores: scores.as_ref().map(|t| &t.handle),
        };
        match opts.mode.resolve(&p) {
            GatedMode::Chunk => chunk_backward(&q.client, &p, CHUNK_SIZE, buffers)?,
            _ => recurrent_backward(&q.client, &p, buffers)?,
        }
        Ok(GatedGrads {
            dq,
            dk,
            dv,
            dg,
            dgv,
            dh0,
        })
    }

    fn gated_check_dtype(device: &Self::Device, dtype: DType) -> Result<(), FlaError> {
        let client = R::client(device);
        kernel_dtype(dtype)?.check_supported(&client)?;
        Ok(())
    }

    fn gated_scores_shape(
        device: &Self::Device,
        problem: &GatedProblem,
        opts: &GatedOptions,
    ) -> Option<[usize; 3]> {
        scores_shape(&R::client(device), problem, opts)
    }

    fn gated_check_device(device: &Self::Device, problem: &GatedProblem) -> Result<(), FlaError> {
        fla_cubecl_kernels::gated::check_device(&R::client(device), problem)?;
        Ok(())
    }
}

/// Ids (cross-entropy targets, embedding rows) as the kernels read them: contiguous `i32`.
/// Another int type is clamped into `[-1, vocab]` first (unsigned: to at most `vocab`), so that
/// the cast cannot wrap an id past the vocabulary into a valid or negative one: it stays past it.
pub(crate) fn i32_ids<R, F, I, BT>(t: CubeTensor<R>, vocab: usize) -> CubeTensor<R>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    type B<R, F, I, BT> = CubeBackend<R, F, I, BT>;
    let t = match t.dtype() {
        DType::I32 => t,
        d => {
            let v = (vocab as i64).into();
            let t = if d.is_uint() {
                B::<R, F, I, BT>::int_clamp_max(t, v)
            } else {
                B::<R, F, I, BT>::int_clamp(t, (-1i64).into(), v)
            };
            B::<R, F, I, BT>::int_cast(t, IntDType::I32)
        }
    };
    into_contiguous(t)
}
