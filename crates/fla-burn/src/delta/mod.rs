//! The delta-rule family (`delta_rule`, `gated_delta_rule`) in its fused recurrent and
//! chunkwise-parallel forms, as a Burn backend extension.
//!
//! Recurrence per sequence and value head (FLA's conventions; `α_t = exp(g_t)`, 1 without a gate):
//! `S_t = α_t S_{t-1} + β_t k_tᵀ (v_t − α_t k_t S_{t-1})`, `o_t = scale · q_t S_t`.

mod api;
mod autodiff;
mod cube;
pub(crate) mod fallback;
mod fusion;

pub use api::{
    chunk_delta_rule, chunk_gated_delta_rule, delta_rule, fused_recurrent_delta_rule,
    fused_recurrent_gated_delta_rule, gated_delta_rule, DeltaRuleOptions,
};

/// Which form computes a delta-rule call: the gated family's choices ([`GatedMode`]).
pub type DeltaMode = GatedMode;

/// The form [`DeltaMode::Auto`] stands for on this problem; explicit modes stay as they are.
///
/// `Auto` is the form measured fastest: the chunk form beyond one chunk where all its tile
/// products run on tensor cores (`tensor_cores`, from the device), the fused recurrent form
/// otherwise. On an H200 (B=8, H=16, K=V=128, bf16) the chunk form of `gated_delta_rule` took
/// 4.3 ms forward and 20.3 ms forward+backward at T = 4096 against the recurrent form's 10.0 and
/// 85, and 16.4 / 76.5 against 39 / 334 at T = 16384 (`benches/results/README.md`); shorter
/// sequences were not measured, and the threshold of one chunk follows FLA's layers. Without
/// tensor cores (lavapipe) the chunk form's products are plain arithmetic and it has not been
/// measured faster; decoding (one token) gains nothing from it.
pub fn resolve_delta_mode(mode: DeltaMode, p: &DeltaProblem, tensor_cores: bool) -> DeltaMode {
    match mode {
        DeltaMode::Auto if tensor_cores && p.longest() > CHUNK_SIZE => DeltaMode::Chunk,
        DeltaMode::Auto => DeltaMode::FusedRecurrent,
        explicit => explicit,
    }
}

use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, TensorMetadata};
use fla_cubecl_kernels::delta::DeltaProblem;
use fla_cubecl_kernels::FloatDType;

use crate::checks::{expect_tensor, qkv_shapes, shared_float_dtype};
use crate::gated::{GatedMode, CHUNK_SIZE};
use crate::recorded::{Inputs, Outputs, StateOp};
use crate::FlaError;

/// The primitive inputs of one call.
///
/// Shapes (`N` sequences: `B`, or `len(cu_seqlens) - 1` with `B = 1`; `H` query/key heads, `HV`
/// value heads, a multiple of `H`):
/// - `q, k: [B, T, H, K]`, `v: [B, T, HV, V]`, `beta: [B, T, HV]`, all of one float dtype;
/// - `g: [B, T, HV]` (log decay, gated delta rule only), in the dtype of `q`;
/// - `h0: [N, HV, K, V]` in `f32`.
#[derive(Debug, Clone)]
pub struct DeltaTensors<B: Backend> {
    pub q: FloatTensor<B>,
    pub k: FloatTensor<B>,
    pub v: FloatTensor<B>,
    pub beta: FloatTensor<B>,
    pub g: Option<FloatTensor<B>>,
    pub h0: Option<FloatTensor<B>>,
}

impl<B: Backend> DeltaTensors<B> {
    /// The inputs in the order the recorded wrappers keep them: `q, k, v, beta, g, h0`.
    pub(crate) fn into_inputs(self) -> Inputs<B> {
        [
            Some(self.q),
            Some(self.k),
            Some(self.v),
            Some(self.beta),
            self.g,
            self.h0,
        ]
    }

    /// The inverse of [`DeltaTensors::into_inputs`].
    pub(crate) fn from_inputs([q, k, v, beta, g, h0]: Inputs<B>) -> Self {
        let req = |t: Option<FloatTensor<B>>| t.expect("q, k, v and beta are always present");
        Self {
            q: req(q),
            k: req(k),
            v: req(v),
            beta: req(beta),
            g,
            h0,
        }
    }
}

/// Options of one call, as the ops see them (the user-facing [`DeltaRuleOptions`] resolves
/// defaults such as the scale, and normalises q and k when asked).
#[derive(Debug, Clone, PartialEq)]
pub struct DeltaOptions {
    pub scale: f32,
    pub cu_seqlens: Option<Vec<usize>>,
    pub output_final_state: bool,
    /// Which form the fused kernels use; the tensor-op fallback computes one result for all.
    pub mode: DeltaMode,
}

/// Forward results: `o: [B, T, HV, V]` in the dtype of `q`; `ht: [N, HV, K, V]` in `f32`.
#[derive(Debug)]
pub struct DeltaForward<B: Backend> {
    pub o: FloatTensor<B>,
    pub ht: Option<FloatTensor<B>>,
}

/// Gradients, each in the shape and dtype of its input.
#[derive(Debug)]
pub struct DeltaGrads<B: Backend> {
    pub dq: FloatTensor<B>,
    pub dk: FloatTensor<B>,
    pub dv: FloatTensor<B>,
    pub dbeta: FloatTensor<B>,
    pub dg: Option<FloatTensor<B>>,
    pub dh0: Option<FloatTensor<B>>,
}

impl<B: Backend> DeltaGrads<B> {
    /// Gradients in input order (as [`DeltaTensors::into_inputs`]).
    pub(crate) fn into_inputs(self) -> Inputs<B> {
        DeltaTensors::<B> {
            q: self.dq,
            k: self.dk,
            v: self.dv,
            beta: self.dbeta,
            g: self.dg,
            h0: self.dh0,
        }
        .into_inputs()
    }

    pub(crate) fn from_inputs(g: Inputs<B>) -> Self {
        let x = DeltaTensors::<B>::from_inputs(g);
        Self {
            dq: x.q,
            dk: x.k,
            dv: x.v,
            dbeta: x.beta,
            dg: x.g,
            dh0: x.h0,
        }
    }
}

/// Backend extension for the delta-rule family.
///
/// The default methods compute through plain tensor ops (any backend); `CubeBackend` and
/// `Fusion<CubeBackend>` override them with the fused kernels, and `Autodiff<B>` records the
/// forward with its hand-derived backward.
///
/// Every backend of a token mixer also has the fused ops of the modules around it
/// ([`crate::LayerBackend`]: norms, SwiGLU), so a model generic over this trait needs no second
/// bound.
pub trait DeltaRuleBackend: crate::LayerBackend {
    /// Forward recurrence. Errors: [`FlaError::Shape`] for mismatched shapes or heads (including
    /// `HV` not a multiple of `H`), [`FlaError::DType`] for mixed or non-float dtypes,
    /// [`FlaError::CuSeqlens`], [`FlaError::Empty`] for zero-length input,
    /// [`FlaError::UnsupportedDType`] where the device cannot compute the dtype.
    fn delta_rule_forward(
        x: DeltaTensors<Self>,
        opts: &DeltaOptions,
    ) -> Result<DeltaForward<Self>, FlaError> {
        fallback::forward::<Self>(x, opts)
    }

    /// Gradients of a loss given `d_o = ∂L/∂o` and `d_ht = ∂L/∂hT` (absent: zero). Same errors
    /// as the forward. Not itself differentiable.
    fn delta_rule_backward(
        x: DeltaTensors<Self>,
        d_o: FloatTensor<Self>,
        d_ht: Option<FloatTensor<Self>>,
        opts: &DeltaOptions,
    ) -> Result<DeltaGrads<Self>, FlaError> {
        fallback::backward::<Self>(x, d_o, d_ht, opts)
    }

    /// Checks that the device computes `dtype`. Backends with no restriction accept every float.
    fn delta_check_dtype(_device: &Self::Device, _dtype: DType) -> Result<(), FlaError> {
        Ok(())
    }

    /// Checks what the device refuses of a described problem in any form and direction (the
    /// dtype, lavapipe's loop limit, the grid), so that a launch deferred by fusion or recorded
    /// for the backward cannot fail on it. Backends without such limits accept every problem.
    fn delta_check_device(_device: &Self::Device, _problem: &DeltaProblem) -> Result<(), FlaError> {
        Ok(())
    }
}

/// How the `Autodiff` and `Fusion` wrappers run this family on an inner backend.
impl<B: DeltaRuleBackend> StateOp<B> for DeltaOptions {
    const FORWARD: &'static str = "fla_delta_rule_forward";
    const BACKWARD: &'static str = "fla_delta_rule_backward";
    const READS_OUTPUTS: bool = false;

    fn forward(&self, x: Inputs<B>) -> Result<Outputs<B>, FlaError> {
        let out = B::delta_rule_forward(DeltaTensors::from_inputs(x), self)?;
        Ok(Outputs {
            o: out.o,
            ht: out.ht,
            aux: None,
        })
    }

    fn backward(
        &self,
        x: Inputs<B>,
        _out: Option<Outputs<B>>,
        d_o: FloatTensor<B>,
        d_ht: Option<FloatTensor<B>>,
    ) -> Result<Inputs<B>, FlaError> {
        let x = DeltaTensors::from_inputs(x);
        Ok(B::delta_rule_backward(x, d_o, d_ht, self)?.into_inputs())
    }
}

tensor_op_impl!(DeltaRuleBackend);

/// Validates shapes, dtypes and options against each other and describes the call.
pub(crate) fn describe<B: Backend>(
    x: &DeltaTensors<B>,
    opts: &DeltaOptions,
) -> Result<DeltaProblem, FlaError> {
    let shape = |t: &FloatTensor<B>| t.shape().to_vec();
    let (qs, vs) = qkv_shapes(&x.q, &x.k, &x.v)?;
    let [b, t, h, kd] = qs;
    if vs[..2] != qs[..2] {
        return Err(FlaError::Shape(format!(
            "v {vs:?} must share [B, T] with q {qs:?} (mismatched batch or length)"
        )));
    }
    let (hv, vd) = (vs[2], vs[3]);
    if h == 0 || hv % h != 0 {
        return Err(FlaError::Shape(format!(
            "value heads HV = {hv} (v {vs:?}) must be a multiple of the query/key heads H = {h}"
        )));
    }
    shared_float_dtype(
        ("q", &x.q),
        &[
            ("k", Some(&x.k)),
            ("v", Some(&x.v)),
            ("beta", Some(&x.beta)),
            ("g", x.g.as_ref()),
        ],
    )?;
    for (name, tensor) in [("beta", Some(&x.beta)), ("g", x.g.as_ref())] {
        if let Some(tensor) = tensor {
            if shape(tensor) != [b, t, hv] {
                return Err(FlaError::Shape(format!(
                    "{name} must be [B, T, HV] = {:?}, got {:?}",
                    [b, t, hv],
                    shape(tensor)
                )));
            }
        }
    }
    let problem = DeltaProblem {
        batch: b,
        seq_len: t,
        heads: h,
        v_heads: hv,
        k_dim: kd,
        v_dim: vd,
        gated: x.g.is_some(),
        scale: opts.scale,
        cu_seqlens: opts.cu_seqlens.clone(),
        has_initial_state: x.h0.is_some(),
        output_final_state: opts.output_final_state,
        dtype: FloatDType::F32,
    };
    problem.validate()?;
    if let Some(h0) = &x.h0 {
        let want = [problem.num_seqs(), hv, kd, vd];
        expect_tensor("initial state [N, HV, K, V]", h0, &want, DType::F32)?;
    }
    Ok(problem)
}

/// Validates a backward call: the forward's inputs (as [`describe`]), then `do` and `dhT`.
pub(crate) fn describe_backward<B: Backend>(
    x: &DeltaTensors<B>,
    d_o: &FloatTensor<B>,
    d_ht: Option<&FloatTensor<B>>,
    opts: &DeltaOptions,
) -> Result<DeltaProblem, FlaError> {
    let p = describe(x, opts)?;
    let o_shape = [p.batch, p.seq_len, p.v_heads, p.v_dim];
    expect_tensor("gradient do", d_o, &o_shape, x.q.dtype())?;
    if let Some(d) = d_ht {
        let s_shape = [p.num_seqs(), p.v_heads, p.k_dim, p.v_dim];
        expect_tensor("gradient dhT", d, &s_shape, DType::F32)?;
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problem(seq_len: usize, cu_seqlens: Option<Vec<usize>>) -> DeltaProblem {
        DeltaProblem {
            batch: 1,
            seq_len,
            heads: 1,
            v_heads: 1,
            k_dim: 16,
            v_dim: 16,
            gated: true,
            scale: 0.25,
            cu_seqlens,
            has_initial_state: false,
            output_final_state: false,
            dtype: FloatDType::F32,
        }
    }

    #[test]
    fn auto_takes_the_chunk_form_beyond_one_chunk_on_tensor_cores() {
        let auto = |p: &DeltaProblem, tc| resolve_delta_mode(DeltaMode::Auto, p, tc);
        for t in [1, CHUNK_SIZE] {
            assert_eq!(auto(&problem(t, None), true), DeltaMode::FusedRecurrent);
        }
        for t in [CHUNK_SIZE + 1, 65536] {
            assert_eq!(auto(&problem(t, None), true), DeltaMode::Chunk);
            assert_eq!(auto(&problem(t, None), false), DeltaMode::FusedRecurrent);
        }
        // The longest sequence decides, not the padded length of a varlen batch.
        let varlen = problem(3 * CHUNK_SIZE, Some(vec![0, 1, 2, 3 * CHUNK_SIZE]));
        assert_eq!(auto(&varlen, true), DeltaMode::Chunk);
        let short = problem(180, Some(vec![0, 60, 120, 180]));
        assert_eq!(auto(&short, true), DeltaMode::FusedRecurrent);
        for explicit in [DeltaMode::Chunk, DeltaMode::FusedRecurrent] {
            assert_eq!(
                resolve_delta_mode(explicit, &problem(1, None), false),
                explicit
            );
        }
    }
}
