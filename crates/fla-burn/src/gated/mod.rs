//! The gated linear-attention family (`linear_attn`, `retention`, `simple_gla`, `gla`), in its
//! fused recurrent and chunkwise-parallel forms, as a Burn backend extension.
//!
//! Recurrence per sequence and head (FLA's conventions, gates in log space):
//! `S_t = diag(exp(gk_t)) · S_{t-1} · diag(exp(gv_t)) + k_tᵀ v_t`, `o_t = scale · q_t S_t`.

pub(crate) mod api;
mod autodiff;
pub(crate) mod cube;
pub(crate) mod fallback;
mod fusion;

pub use api::{
    chunk_gla, chunk_linear_attn, chunk_retention, chunk_simple_gla, fused_recurrent_gla,
    fused_recurrent_linear_attn, fused_recurrent_retention, fused_recurrent_simple_gla, gla,
    linear_attn, retention, retention_decay, simple_gla, RecurrentOptions, RecurrentOutput,
};
pub use fla_cubecl_kernels::gated::GateKind;

use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, TensorMetadata};
use fla_cubecl_kernels::gated::GatedProblem;
use fla_cubecl_kernels::FloatDType;

use crate::checks::{expect_tensor, qkv_shapes, shared_float_dtype};
use crate::recorded::{Inputs, Outputs, StateOp};
use crate::FlaError;

/// The primitive inputs of one call.
///
/// Shapes (`N` sequences: `B`, or `len(cu_seqlens) - 1` with `B = 1`):
/// - `q, k: [B, T, H, K]`, `v: [B, T, H, V]`, all of one float dtype;
/// - `g`: `[B, T, H]` for [`GateKind::Scalar`], `[B, T, H, K]` for [`GateKind::Vector`], absent
///   for [`GateKind::None`]; `gv: [B, T, H, V]`; both in the dtype of `q`, log space;
/// - `h0: [N, H, K, V]` in `f32`.
#[derive(Debug)]
pub struct GatedTensors<B: Backend> {
    pub q: FloatTensor<B>,
    pub k: FloatTensor<B>,
    pub v: FloatTensor<B>,
    pub g: Option<FloatTensor<B>>,
    pub gv: Option<FloatTensor<B>>,
    pub h0: Option<FloatTensor<B>>,
}

impl<B: Backend> Clone for GatedTensors<B> {
    fn clone(&self) -> Self {
        Self {
            q: self.q.clone(),
            k: self.k.clone(),
            v: self.v.clone(),
            g: self.g.clone(),
            gv: self.gv.clone(),
            h0: self.h0.clone(),
        }
    }
}

impl<B: Backend> GatedTensors<B> {
    /// The inputs in the order the recorded wrappers keep them: `q, k, v, g, gv, h0`.
    pub(crate) fn into_inputs(self) -> Inputs<B> {
        [
            Some(self.q),
            Some(self.k),
            Some(self.v),
            self.g,
            self.gv,
            self.h0,
        ]
    }

    /// The inverse of [`GatedTensors::into_inputs`].
    pub(crate) fn from_inputs([q, k, v, g, gv, h0]: Inputs<B>) -> Self {
        let req = |t: Option<FloatTensor<B>>| t.expect("q, k and v are always present");
        Self {
            q: req(q),
            k: req(k),
            v: req(v),
            g,
            gv,
            h0,
        }
    }
}

impl<B: Backend> GatedGrads<B> {
    /// Gradients in input order (as [`GatedTensors::into_inputs`]).
    pub(crate) fn into_inputs(self) -> Inputs<B> {
        [
            Some(self.dq),
            Some(self.dk),
            Some(self.dv),
            self.dg,
            self.dgv,
            self.dh0,
        ]
    }

    pub(crate) fn from_inputs(g: Inputs<B>) -> Self {
        let GatedTensors { q, k, v, g, gv, h0 } = GatedTensors::<B>::from_inputs(g);
        Self {
            dq: q,
            dk: k,
            dv: v,
            dg: g,
            dgv: gv,
            dh0: h0,
        }
    }
}

/// How the `Autodiff` and `Fusion` wrappers run this family on an inner backend.
impl<B: GatedRecurrentBackend> StateOp<B> for GatedOptions {
    const FORWARD: &'static str = "fla_gated_recurrent_forward";
    const BACKWARD: &'static str = "fla_gated_recurrent_backward";
    const READS_OUTPUTS: bool = true;

    fn forward(&self, x: Inputs<B>) -> Result<Outputs<B>, FlaError> {
        let out = B::gated_recurrent_forward(GatedTensors::from_inputs(x), self)?;
        Ok(Outputs {
            o: out.o,
            ht: out.ht,
            aux: out.scores,
        })
    }

    fn backward(
        &self,
        x: Inputs<B>,
        out: Option<Outputs<B>>,
        d_o: FloatTensor<B>,
        d_ht: Option<FloatTensor<B>>,
    ) -> Result<Inputs<B>, FlaError> {
        let out = out.ok_or_else(|| {
            FlaError::Shape("the gated backward needs the forward's outputs".into())
        })?;
        let x = GatedTensors::from_inputs(x);
        let grads = B::gated_recurrent_backward(x, out.o, out.ht, out.aux, d_o, d_ht, self)?;
        Ok(grads.into_inputs())
    }
}

/// Which form computes a call. Both give the same result up to rounding and share one backward
/// contract; they differ in speed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum GatedMode {
    /// The form measured fastest for the call: the chunk form on sequences longer than one
    /// chunk, as FLA's layers choose (its tiled kernels measured 2.6-2.8x faster than the fused
    /// recurrent ones for simple GLA on an H100 and 1.8x for GLA on an H200,
    /// benches/results/README.md); the fused recurrent form for decoding and short sequences,
    /// and with a value gate (`gv`), which the chunk form does not take.
    #[default]
    Auto,
    /// One step at a time, the state on chip (best for decoding and short sequences).
    FusedRecurrent,
    /// Chunks of [`CHUNK_SIZE`] positions in parallel, states passed chunk to chunk (training).
    /// Has no value gate.
    Chunk,
}

/// Positions per chunk of the chunk form.
pub const CHUNK_SIZE: usize = fla_cubecl_kernels::gated::DEFAULT_CHUNK;

impl GatedMode {
    /// The form [`GatedMode::Auto`] stands for on this problem; explicit modes stay as they are.
    pub fn resolve(self, p: &GatedProblem) -> GatedMode {
        match self {
            GatedMode::Auto if !p.value_gate && p.longest() > CHUNK_SIZE => GatedMode::Chunk,
            GatedMode::Auto => GatedMode::FusedRecurrent,
            explicit => explicit,
        }
    }
}

/// Options of one call, as the ops see them (the user-facing [`RecurrentOptions`] resolves
/// defaults such as the scale).
#[derive(Debug, Clone, PartialEq)]
pub struct GatedOptions {
    pub gate: GateKind,
    pub scale: f32,
    pub reverse: bool,
    pub cu_seqlens: Option<Vec<usize>>,
    pub output_final_state: bool,
    pub mode: GatedMode,
}

/// Forward results: `o: [B, T, H, V]` in the dtype of `q`; `ht: [N, H, K, V]` in `f32`;
/// `scores`, where the forward summed GLA's in-chunk scores (the fused chunk form under vector
/// gates, [`GatedRecurrentBackend::gated_scores_shape`]), for the backward to read instead of
/// summing them again (`None` elsewhere, and under `Autodiff`, which keeps them in its graph).
#[derive(Debug)]
pub struct GatedForward<B: Backend> {
    pub o: FloatTensor<B>,
    pub ht: Option<FloatTensor<B>>,
    pub scores: Option<FloatTensor<B>>,
}

/// Gradients, each in the shape and dtype of its input.
#[derive(Debug)]
pub struct GatedGrads<B: Backend> {
    pub dq: FloatTensor<B>,
    pub dk: FloatTensor<B>,
    pub dv: FloatTensor<B>,
    pub dg: Option<FloatTensor<B>>,
    pub dgv: Option<FloatTensor<B>>,
    pub dh0: Option<FloatTensor<B>>,
}

/// Backend extension for the gated family (both forms; [`GatedOptions::mode`] chooses).
///
/// The default methods compute through plain tensor ops (any backend); `CubeBackend` and
/// `Fusion<CubeBackend>` override them with the fused kernels, and `Autodiff<B>` records the
/// forward with its hand-derived backward.
///
/// Every backend of a token mixer also has the fused ops of the modules around it
/// ([`crate::LayerBackend`]: norms, SwiGLU), so a model generic over this trait needs no second
/// bound.
pub trait GatedRecurrentBackend: crate::LayerBackend {
    /// Forward recurrence. Errors: [`FlaError::Shape`] for mismatched shapes or heads,
    /// [`FlaError::DType`] for mixed or non-float dtypes, [`FlaError::CuSeqlens`],
    /// [`FlaError::Empty`] for zero-length input, [`FlaError::UnsupportedDType`] where the device
    /// cannot compute the dtype.
    fn gated_recurrent_forward(
        x: GatedTensors<Self>,
        opts: &GatedOptions,
    ) -> Result<GatedForward<Self>, FlaError> {
        fallback::forward::<Self>(x, opts)
    }

    /// Gradients of a loss given `d_o = ∂L/∂o` and `d_ht = ∂L/∂hT` (absent: zero). `o` and `ht`
    /// are the forward's outputs (`o` enters the value-gate gradient, `ht` the gate gradients
    /// when `d_ht` is given), `scores` the forward's [`GatedForward::scores`] or `None` (then
    /// summed again where needed). Same errors as the forward. Not itself differentiable.
    #[allow(clippy::too_many_arguments)]
    fn gated_recurrent_backward(
        x: GatedTensors<Self>,
        o: FloatTensor<Self>,
        ht: Option<FloatTensor<Self>>,
        scores: Option<FloatTensor<Self>>,
        d_o: FloatTensor<Self>,
        d_ht: Option<FloatTensor<Self>>,
        opts: &GatedOptions,
    ) -> Result<GatedGrads<Self>, FlaError> {
        let _ = scores;
        fallback::backward::<Self>(x, o, ht, d_o, d_ht, opts)
    }

    /// The shape of the [`GatedForward::scores`] a forward of `problem` (described, with the
    /// kernels' dtype filled in) returns on this device, `None` where it returns none (fusion
    /// declares the output before the kernels run). The tensor-op fallback sums no scores.
    fn gated_scores_shape(
        _device: &Self::Device,
        _problem: &GatedProblem,
        _opts: &GatedOptions,
    ) -> Option<[usize; 3]> {
        None
    }

    /// Checks that the device computes `dtype`. Backends with no restriction accept every float.
    fn gated_check_dtype(_device: &Self::Device, _dtype: DType) -> Result<(), FlaError> {
        Ok(())
    }

    /// Checks what the device refuses of a described problem in any form and direction (the
    /// dtype, lavapipe's loop limit, the grid), so that a launch deferred by fusion or recorded
    /// for the backward cannot fail on it. Backends without such limits accept every problem.
    fn gated_check_device(_device: &Self::Device, _problem: &GatedProblem) -> Result<(), FlaError> {
        Ok(())
    }
}

/// The float dtype of a Burn dtype (callers have checked that it is a float).
pub(crate) fn float_dtype(d: DType) -> burn::tensor::FloatDType {
    match d {
        DType::F64 => burn::tensor::FloatDType::F64,
        DType::F16 => burn::tensor::FloatDType::F16,
        DType::BF16 => burn::tensor::FloatDType::BF16,
        DType::Flex32 => burn::tensor::FloatDType::Flex32,
        _ => burn::tensor::FloatDType::F32,
    }
}

tensor_op_impl!(GatedRecurrentBackend);

fn dtype_name(d: DType) -> String {
    format!("{d:?}")
}

/// Maps a Burn dtype to the kernels' dtypes; `f64` and `flex32` have no fused kernel.
pub(crate) fn kernel_dtype(d: DType) -> Result<FloatDType, FlaError> {
    match d {
        DType::F32 => Ok(FloatDType::F32),
        DType::F16 => Ok(FloatDType::F16),
        DType::BF16 => Ok(FloatDType::BF16),
        other => Err(FlaError::UnsupportedDType {
            dtype: dtype_name(other),
            device: "the fused kernels (f32, f16, bf16)".into(),
        }),
    }
}

/// Validates shapes, dtypes and options against each other and describes the call.
pub(crate) fn describe<B: Backend>(
    x: &GatedTensors<B>,
    opts: &GatedOptions,
) -> Result<GatedProblem, FlaError> {
    let shape = |t: &FloatTensor<B>| t.shape().to_vec();
    let (qs, vs) = qkv_shapes(&x.q, &x.k, &x.v)?;
    let [b, t, h, kd] = qs;
    if vs[..3] != qs[..3] {
        return Err(FlaError::Shape(format!(
            "v {vs:?} must share [B, T, H] with q {qs:?} (mismatched batch, length or heads)"
        )));
    }
    let vd = vs[3];
    shared_float_dtype(
        ("q", &x.q),
        &[
            ("k", Some(&x.k)),
            ("v", Some(&x.v)),
            ("g", x.g.as_ref()),
            ("gv", x.gv.as_ref()),
        ],
    )?;
    match (opts.gate, &x.g) {
        (GateKind::None, None) => {}
        (GateKind::None, Some(_)) => {
            return Err(FlaError::Shape("a gate was given to an ungated op".into()))
        }
        (kind, None) => return Err(FlaError::Shape(format!("{kind:?} gate missing"))),
        (GateKind::Scalar, Some(g)) => {
            if shape(g) != [b, t, h] {
                return Err(FlaError::Shape(format!(
                    "scalar gate g must be [B, T, H] = {:?}, got {:?}",
                    [b, t, h],
                    shape(g)
                )));
            }
        }
        (GateKind::Vector, Some(g)) => {
            if shape(g) != [b, t, h, kd] {
                return Err(FlaError::Shape(format!(
                    "key gate gk must be [B, T, H, K] = {:?}, got {:?}",
                    [b, t, h, kd],
                    shape(g)
                )));
            }
        }
    }
    if let Some(gv) = &x.gv {
        if opts.mode == GatedMode::Chunk {
            return Err(FlaError::Unsupported(
                "the chunk form has no value gate (gv); use GatedMode::FusedRecurrent or Auto"
                    .into(),
            ));
        }
        if shape(gv) != vs {
            return Err(FlaError::Shape(format!(
                "value gate gv must be [B, T, H, V] = {vs:?}, got {:?}",
                shape(gv)
            )));
        }
    }
    let problem = GatedProblem {
        batch: b,
        seq_len: t,
        heads: h,
        k_dim: kd,
        v_dim: vd,
        gate: opts.gate,
        value_gate: x.gv.is_some(),
        scale: opts.scale,
        reverse: opts.reverse,
        cu_seqlens: opts.cu_seqlens.clone(),
        has_initial_state: x.h0.is_some(),
        output_final_state: opts.output_final_state,
        dtype: FloatDType::F32,
    };
    problem.validate()?;
    if let Some(h0) = &x.h0 {
        let want = [problem.num_seqs(), h, kd, vd];
        expect_tensor("initial state [N, H, K, V]", h0, &want, DType::F32)?;
    }
    Ok(problem)
}

/// Validates a backward call: the forward's inputs (as [`describe`]), then `o`, `do`, `hT` and
/// `dhT` against them (`do` in the inputs' dtype, `dhT` in f32, `hT` present with `dhT`).
pub(crate) fn describe_backward<B: Backend>(
    x: &GatedTensors<B>,
    o: &FloatTensor<B>,
    ht: Option<&FloatTensor<B>>,
    d_o: &FloatTensor<B>,
    d_ht: Option<&FloatTensor<B>>,
    opts: &GatedOptions,
) -> Result<GatedProblem, FlaError> {
    let p = describe(x, opts)?;
    let o_shape = [p.batch, p.seq_len, p.heads, p.v_dim];
    let s_shape = [p.num_seqs(), p.heads, p.k_dim, p.v_dim];
    let dtype = x.q.dtype();
    expect_tensor("o", o, &o_shape, dtype)?;
    expect_tensor("gradient do", d_o, &o_shape, dtype)?;
    if let Some(d) = d_ht {
        expect_tensor("gradient dhT", d, &s_shape, DType::F32)?;
        match ht {
            Some(h) => expect_tensor("hT", h, &s_shape, DType::F32)?,
            None => {
                return Err(FlaError::Shape(
                    "a gradient on hT needs the forward's hT".into(),
                ))
            }
        }
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problem(seq_len: usize, cu_seqlens: Option<Vec<usize>>, value_gate: bool) -> GatedProblem {
        GatedProblem {
            batch: 1,
            seq_len,
            heads: 1,
            k_dim: 8,
            v_dim: 8,
            gate: GateKind::Vector,
            value_gate,
            scale: 1.0,
            reverse: false,
            cu_seqlens,
            has_initial_state: false,
            output_final_state: false,
            dtype: FloatDType::F32,
        }
    }

    #[test]
    fn auto_mode_takes_the_measured_fastest_form() {
        let auto = |p: &GatedProblem| GatedMode::Auto.resolve(p);
        let scalar = |t: usize, cu: Option<Vec<usize>>| GatedProblem {
            gate: GateKind::Scalar,
            ..problem(t, cu, false)
        };
        // Vector gates: chunks beyond one chunk; the recurrent form with a value gate.
        assert_eq!(auto(&problem(1, None, false)), GatedMode::FusedRecurrent);
        assert_eq!(auto(&problem(4096, None, false)), GatedMode::Chunk);
        assert_eq!(
            auto(&problem(400, Some(vec![0, 10, 400]), false)),
            GatedMode::Chunk
        );
        assert_eq!(
            auto(&problem(400, Some(vec![0, 10, 400]), true)),
            GatedMode::FusedRecurrent
        );
        // Scalar gates or none: chunks beyond one chunk (decided by the longest sequence).
        assert_eq!(auto(&scalar(1, None)), GatedMode::FusedRecurrent);
        assert_eq!(auto(&scalar(CHUNK_SIZE, None)), GatedMode::FusedRecurrent);
        assert_eq!(auto(&scalar(CHUNK_SIZE + 1, None)), GatedMode::Chunk);
        assert_eq!(auto(&scalar(4096, None)), GatedMode::Chunk);
        assert_eq!(
            auto(&scalar(100, Some(vec![0, 50, 100]))),
            GatedMode::FusedRecurrent
        );
        let none = GatedProblem {
            gate: GateKind::None,
            ..problem(4096, None, false)
        };
        assert_eq!(auto(&none), GatedMode::Chunk);
        // Explicit modes are kept.
        let p = problem(4096, None, false);
        assert_eq!(
            GatedMode::FusedRecurrent.resolve(&p),
            GatedMode::FusedRecurrent
        );
        assert_eq!(
            GatedMode::Chunk.resolve(&problem(1, None, false)),
            GatedMode::Chunk
        );
    }
}
