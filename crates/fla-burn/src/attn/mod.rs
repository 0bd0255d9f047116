//! Softmax attention, fused (flash attention), as a Burn backend extension: causal or not,
//! a sliding window, soft-capped scores, grouped-query heads, decoding queries against a longer
//! key/value sequence, variable-length batches. See `fla_cubecl_kernels::attn` for the math.

mod api;
mod autodiff;
mod cube;
mod fallback;
mod fusion;

pub use api::{parallel_attn, AttnOptions};

use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, TensorMetadata};
use fla_cubecl_kernels::attn::AttnProblem;
use fla_cubecl_kernels::FloatDType;

use crate::checks::{expect_tensor, shared_float_dtype};
use crate::recorded::{Inputs, Outputs, StateOp};
use crate::FlaError;

/// The primitive inputs of one call: `q: [B, T_q, H, K]`, `k: [B, T_k, HK, K]`,
/// `v: [B, T_k, HK, V]`, one float dtype, `H` a multiple of `HK`.
#[derive(Debug, Clone)]
pub struct AttnTensors<B: Backend> {
    pub q: FloatTensor<B>,
    pub k: FloatTensor<B>,
    pub v: FloatTensor<B>,
}

impl<B: Backend> AttnTensors<B> {
    pub(crate) fn into_inputs(self) -> Inputs<B> {
        [Some(self.q), Some(self.k), Some(self.v), None, None, None]
    }

    pub(crate) fn from_inputs([q, k, v, ..]: Inputs<B>) -> Self {
        let req = |t: Option<FloatTensor<B>>| t.expect("q, k and v are always present");
        Self {
            q: req(q),
            k: req(k),
            v: req(v),
        }
    }
}

/// Options of one call as the ops see them (the scale resolved).
#[derive(Debug, Clone, PartialEq)]
pub struct AttnOpOptions {
    pub scale: f32,
    pub causal: bool,
    pub window: Option<usize>,
    pub softcap: Option<f32>,
    pub cu_seqlens: Option<Vec<usize>>,
}

/// Forward results: `o: [B, T_q, H, V]` in the inputs' dtype and the log-sum-exp of each row's
/// scores `lse: [B, T_q, H]` in `f32` (what the backward reads).
#[derive(Debug)]
pub struct AttnForward<B: Backend> {
    pub o: FloatTensor<B>,
    pub lse: FloatTensor<B>,
}

/// Gradients, each in the shape and dtype of its input.
#[derive(Debug)]
pub struct AttnGrads<B: Backend> {
    pub dq: FloatTensor<B>,
    pub dk: FloatTensor<B>,
    pub dv: FloatTensor<B>,
}

/// Backend extension for fused softmax attention.
///
/// The default methods compute through plain tensor ops (any backend; they materialise the
/// `T_q × T_k` scores); `CubeBackend` and `Fusion<CubeBackend>` override them with the fused
/// kernels (no `T × T` tensor), and `Autodiff<B>` records the forward with its hand-derived
/// backward.
///
/// Every backend of a token mixer also has the fused ops of the modules around it
/// ([`crate::LayerBackend`]: norms, SwiGLU), so a model generic over this trait needs no second
/// bound.
pub trait AttentionBackend: crate::LayerBackend {
    /// Errors: [`FlaError::Shape`] for mismatched shapes or heads (`H` not a multiple of `HK`,
    /// more queries than keys with a causal mask or window), [`FlaError::DType`] for mixed or
    /// non-float dtypes, [`FlaError::CuSeqlens`], [`FlaError::Empty`] for zero-length input,
    /// [`FlaError::Unsupported`] for a zero window or a non-positive cap,
    /// [`FlaError::UnsupportedDType`] where the device cannot compute the dtype,
    /// [`FlaError::Kernel`] where the head dims do not fit the device's shared memory.
    fn attn_forward(
        x: AttnTensors<Self>,
        opts: &AttnOpOptions,
    ) -> Result<AttnForward<Self>, FlaError> {
        fallback::forward::<Self>(x, opts)
    }

    /// Gradients for `d_o = ∂L/∂o`, given the forward's `o` and `lse`. Same errors as the
    /// forward. Not itself differentiable.
    fn attn_backward(
        x: AttnTensors<Self>,
        out: AttnForward<Self>,
        d_o: FloatTensor<Self>,
        opts: &AttnOpOptions,
    ) -> Result<AttnGrads<Self>, FlaError> {
        fallback::backward::<Self>(x, out, d_o, opts)
    }

    /// Checks that the device computes `dtype`. Backends with no restriction accept every float.
    fn attn_check_dtype(_device: &Self::Device, _dtype: DType) -> Result<(), FlaError> {
        Ok(())
    }

    /// Checks what the device refuses of a described problem, forward or backward (the dtype, a
    /// tiling that fits shared memory, the grid), so that a launch deferred by fusion or recorded
    /// for the backward cannot fail on it. Backends without such limits accept every problem.
    fn attn_check_device(_device: &Self::Device, _problem: &AttnProblem) -> Result<(), FlaError> {
        Ok(())
    }
}

/// How the `Autodiff` and `Fusion` wrappers run attention on an inner backend: the
/// log-sum-exp travels as the family's state output, saved for the backward only.
impl<B: AttentionBackend> StateOp<B> for AttnOpOptions {
    const FORWARD: &'static str = "fla_attn_forward";
    const BACKWARD: &'static str = "fla_attn_backward";
    const READS_OUTPUTS: bool = true;
    const SAVED_HT: bool = true;

    fn forward(&self, x: Inputs<B>) -> Result<Outputs<B>, FlaError> {
        let out = B::attn_forward(AttnTensors::from_inputs(x), self)?;
        Ok(Outputs {
            o: out.o,
            ht: Some(out.lse),
            aux: None,
        })
    }

    fn backward(
        &self,
        x: Inputs<B>,
        out: Option<Outputs<B>>,
        d_o: FloatTensor<B>,
        _d_ht: Option<FloatTensor<B>>,
    ) -> Result<Inputs<B>, FlaError> {
        let Some(Outputs {
            o, ht: Some(lse), ..
        }) = out
        else {
            return Err(FlaError::Shape(
                "the attention backward needs the forward's o and lse".into(),
            ));
        };
        let g = B::attn_backward(
            AttnTensors::from_inputs(x),
            AttnForward { o, lse },
            d_o,
            self,
        )?;
        Ok(AttnTensors::<B> {
            q: g.dq,
            k: g.dk,
            v: g.dv,
        }
        .into_inputs())
    }
}

tensor_op_impl!(AttentionBackend);

/// Validates shapes, dtypes and options against each other and describes the call.
pub(crate) fn describe<B: Backend>(
    x: &AttnTensors<B>,
    opts: &AttnOpOptions,
) -> Result<AttnProblem, FlaError> {
    let dims = |t: &FloatTensor<B>| t.shape().to_vec();
    let (qs, ks, vs) = (dims(&x.q), dims(&x.k), dims(&x.v));
    let four = |s: &[usize]| <[usize; 4]>::try_from(s).ok();
    let (Some([b, tq, h, kd]), Some(k4), Some(v4)) = (four(&qs), four(&ks), four(&vs)) else {
        return Err(FlaError::Shape(format!(
            "q, k, v must be [B, T, H, D]; got q {qs:?}, k {ks:?}, v {vs:?}"
        )));
    };
    if k4[0] != b || k4[3] != kd || v4[..3] != k4[..3] {
        return Err(FlaError::Shape(format!(
            "k {ks:?} must be [B, T_k, HK, K] and v {vs:?} [B, T_k, HK, V] for q {qs:?}"
        )));
    }
    shared_float_dtype(("q", &x.q), &[("k", Some(&x.k)), ("v", Some(&x.v))])?;
    if opts.window == Some(0) {
        return Err(FlaError::Unsupported("a window of zero keys".into()));
    }
    if opts.softcap.is_some_and(|c| !(c.is_finite() && c > 0.0)) {
        return Err(FlaError::Unsupported(format!(
            "soft cap {:?} must be finite and positive",
            opts.softcap
        )));
    }
    let problem = AttnProblem {
        batch: b,
        q_len: tq,
        kv_len: k4[1],
        heads: h,
        kv_heads: k4[2],
        k_dim: kd,
        v_dim: v4[3],
        scale: opts.scale,
        causal: opts.causal,
        window: opts.window,
        softcap: opts.softcap,
        cu_seqlens: opts.cu_seqlens.clone(),
        dtype: FloatDType::F32,
    };
    problem.validate()?;
    Ok(problem)
}

/// Validates a backward call: the forward's inputs (as [`describe`]), its outputs, and `d_o`.
pub(crate) fn describe_backward<B: Backend>(
    x: &AttnTensors<B>,
    out: &AttnForward<B>,
    d_o: &FloatTensor<B>,
    opts: &AttnOpOptions,
) -> Result<AttnProblem, FlaError> {
    let p = describe(x, opts)?;
    let o_shape = [p.batch, p.q_len, p.heads, p.v_dim];
    expect_tensor("output o", &out.o, &o_shape, x.q.dtype())?;
    expect_tensor("gradient do", d_o, &o_shape, x.q.dtype())?;
    expect_tensor(
        "log-sum-exp lse",
        &out.lse,
        &[p.batch, p.q_len, p.heads],
        DType::F32,
    )?;
    Ok(p)
}
