//! The user-facing functions, one per variant, on Burn's `Tensor` API.

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorPrimitive};

use super::{GateKind, GatedMode, GatedOptions, GatedRecurrentBackend, GatedTensors};
use crate::FlaError;

/// Options shared by the variants (FLA's keyword arguments).
#[derive(Debug, Clone)]
pub struct RecurrentOptions<B: Backend> {
    /// Multiplies `q S`; defaults to `K^-0.5`.
    pub scale: Option<f64>,
    /// `h0: [N, H, K, V]`, f32.
    pub initial_state: Option<Tensor<B, 4>>,
    /// Also return the final state `hT: [N, H, K, V]` (f32).
    pub output_final_state: bool,
    /// Run each sequence from its last token to its first.
    pub reverse: bool,
    /// Boundaries `[0, t1, ..., T]` of a variable-length batch packed as `B = 1` (FLA's
    /// `cu_seqlens`), given on the host so that no device read is needed to validate them.
    pub cu_seqlens: Option<Vec<usize>>,
    /// Which form computes the call: [`GatedMode::Auto`] by default. The `fused_recurrent_*` and
    /// `chunk_*` functions set it.
    pub mode: GatedMode,
}

impl<B: Backend> Default for RecurrentOptions<B> {
    fn default() -> Self {
        Self {
            scale: None,
            initial_state: None,
            output_final_state: false,
            reverse: false,
            cu_seqlens: None,
            mode: GatedMode::Auto,
        }
    }
}

impl<B: Backend> RecurrentOptions<B> {
    pub fn with_scale(mut self, scale: f64) -> Self {
        self.scale = Some(scale);
        self
    }
    pub fn with_initial_state(mut self, h0: Tensor<B, 4>) -> Self {
        self.initial_state = Some(h0);
        self
    }
    pub fn with_final_state(mut self) -> Self {
        self.output_final_state = true;
        self
    }
    pub fn reversed(mut self) -> Self {
        self.reverse = true;
        self
    }
    pub fn with_cu_seqlens(mut self, cu_seqlens: Vec<usize>) -> Self {
        self.cu_seqlens = Some(cu_seqlens);
        self
    }
    pub fn with_mode(mut self, mode: GatedMode) -> Self {
        self.mode = mode;
        self
    }
}

/// `o: [B, T, H, V]` in the dtype of `q`, and `hT: [N, H, K, V]` in f32 when it was asked for.
#[derive(Debug, Clone)]
pub struct RecurrentOutput<B: Backend> {
    pub o: Tensor<B, 4>,
    pub final_state: Option<Tensor<B, 4>>,
}

pub(crate) fn prim<B: Backend, const D: usize>(
    t: Tensor<B, D>,
) -> burn::tensor::ops::FloatTensor<B> {
    t.into_primitive().tensor()
}

pub(crate) fn wrap<B: Backend>(t: burn::tensor::ops::FloatTensor<B>) -> Tensor<B, 4> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

fn run<B: GatedRecurrentBackend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    g: Option<burn::tensor::ops::FloatTensor<B>>,
    gv: Option<Tensor<B, 4>>,
    gate: GateKind,
    opts: RecurrentOptions<B>,
) -> Result<RecurrentOutput<B>, FlaError> {
    let k_dim = q.dims()[3];
    let options = GatedOptions {
        gate,
        scale: opts.scale.unwrap_or((k_dim.max(1) as f64).powf(-0.5)) as f32,
        reverse: opts.reverse,
        cu_seqlens: opts.cu_seqlens,
        output_final_state: opts.output_final_state,
        mode: opts.mode,
    };
    let x = GatedTensors {
        q: prim(q),
        k: prim(k),
        v: prim(v),
        g,
        gv: gv.map(prim),
        h0: opts.initial_state.map(prim),
    };
    let out = B::gated_recurrent_forward(x, &options)?;
    Ok(RecurrentOutput {
        o: wrap(out.o),
        final_state: out.ht.map(wrap),
    })
}

/// Linear attention without a gate (FLA's `linear_attn` ops, no normalisation):
/// `S_t = S_{t-1} + k_tᵀ v_t`, `o_t = scale · q_t S_t`, in the form `opts.mode` chooses.
///
/// Shapes: `q, k: [B, T, H, K]`, `v: [B, T, H, V]`, one float dtype. Errors: see
/// [`GatedRecurrentBackend::gated_recurrent_forward`].
pub fn linear_attn<B: GatedRecurrentBackend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    opts: RecurrentOptions<B>,
) -> Result<RecurrentOutput<B>, FlaError> {
    run(q, k, v, None, None, GateKind::None, opts)
}

/// Simple GLA (and the Mamba2/SSD form): a data-dependent scalar log gate per token and head,
/// `g: [B, T, H]` in the dtype of `q`: `S_t = exp(g_t) S_{t-1} + k_tᵀ v_t`.
pub fn simple_gla<B: GatedRecurrentBackend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    g: Tensor<B, 3>,
    opts: RecurrentOptions<B>,
) -> Result<RecurrentOutput<B>, FlaError> {
    run(q, k, v, Some(prim(g)), None, GateKind::Scalar, opts)
}

/// GLA: a per-key-dimension log gate `gk: [B, T, H, K]` and an optional per-value log gate
/// `gv: [B, T, H, V]` (fused recurrent form only), both in the dtype of `q`:
/// `S_t = diag(exp(gk_t)) S_{t-1} diag(exp(gv_t)) + k_tᵀ v_t`.
pub fn gla<B: GatedRecurrentBackend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    gk: Tensor<B, 4>,
    gv: Option<Tensor<B, 4>>,
    opts: RecurrentOptions<B>,
) -> Result<RecurrentOutput<B>, FlaError> {
    run(q, k, v, Some(prim(gk)), gv, GateKind::Vector, opts)
}

/// RetNet's fixed per-head log decays, `log(1 - 2^(-5-h))` for head `h`.
pub fn retention_decay(heads: usize) -> Vec<f64> {
    (0..heads)
        .map(|h| (1.0 - 2f64.powi(-5 - h as i32)).ln())
        .collect()
}

/// Retention (RetNet): a fixed log decay per head, [`retention_decay`] unless `decay` (one
/// value per head, log space) is given. The decay is a constant: it receives no gradient.
pub fn retention<B: GatedRecurrentBackend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    decay: Option<&[f64]>,
    opts: RecurrentOptions<B>,
) -> Result<RecurrentOutput<B>, FlaError> {
    let [b, t, h, _] = q.dims();
    let decay = match decay {
        Some(d) if d.len() != h => {
            return Err(FlaError::Shape(format!(
                "retention decay has {} values for {h} heads",
                d.len()
            )))
        }
        Some(d) => d.to_vec(),
        None => retention_decay(h),
    };
    let decay: Vec<f32> = decay.into_iter().map(|x| x as f32).collect();
    let g = Tensor::<B, 1>::from_floats(decay.as_slice(), &q.device())
        .cast(super::float_dtype(q.dtype()))
        .reshape([1, 1, h])
        .expand([b, t, h]);
    run(q, k, v, Some(prim(g)), None, GateKind::Scalar, opts)
}

/// Defines FLA's mode-named entry points (`fused_recurrent_*`, `chunk_*`) over the generic ones.
macro_rules! with_mode {
    ($(#[$doc:meta])* $name:ident = $generic:ident($($arg:ident: $ty:ty),*), $mode:expr) => {
        $(#[$doc])*
        pub fn $name<B: GatedRecurrentBackend>(
            $($arg: $ty,)*
            opts: RecurrentOptions<B>,
        ) -> Result<RecurrentOutput<B>, FlaError> {
            $generic($($arg,)* opts.with_mode($mode))
        }
    };
}

with_mode!(
    /// [`linear_attn`] in the fused recurrent form.
    fused_recurrent_linear_attn = linear_attn(q: Tensor<B, 4>, k: Tensor<B, 4>, v: Tensor<B, 4>),
    GatedMode::FusedRecurrent
);
with_mode!(
    /// [`simple_gla`] in the fused recurrent form.
    fused_recurrent_simple_gla = simple_gla(
        q: Tensor<B, 4>, k: Tensor<B, 4>, v: Tensor<B, 4>, g: Tensor<B, 3>
    ),
    GatedMode::FusedRecurrent
);
with_mode!(
    /// [`gla`] in the fused recurrent form.
    fused_recurrent_gla = gla(
        q: Tensor<B, 4>, k: Tensor<B, 4>, v: Tensor<B, 4>, gk: Tensor<B, 4>,
        gv: Option<Tensor<B, 4>>
    ),
    GatedMode::FusedRecurrent
);
with_mode!(
    /// [`retention`] in the fused recurrent form.
    fused_recurrent_retention = retention(
        q: Tensor<B, 4>, k: Tensor<B, 4>, v: Tensor<B, 4>, decay: Option<&[f64]>
    ),
    GatedMode::FusedRecurrent
);
with_mode!(
    /// [`linear_attn`] in the chunkwise-parallel form.
    chunk_linear_attn = linear_attn(q: Tensor<B, 4>, k: Tensor<B, 4>, v: Tensor<B, 4>),
    GatedMode::Chunk
);
with_mode!(
    /// [`simple_gla`] in the chunkwise-parallel form.
    chunk_simple_gla = simple_gla(
        q: Tensor<B, 4>, k: Tensor<B, 4>, v: Tensor<B, 4>, g: Tensor<B, 3>
    ),
    GatedMode::Chunk
);
with_mode!(
    /// [`gla`] in the chunkwise-parallel form (no value gate: `gv` must be `None`).
    chunk_gla = gla(
        q: Tensor<B, 4>, k: Tensor<B, 4>, v: Tensor<B, 4>, gk: Tensor<B, 4>,
        gv: Option<Tensor<B, 4>>
    ),
    GatedMode::Chunk
);
with_mode!(
    /// [`retention`] in the chunkwise-parallel form.
    chunk_retention = retention(
        q: Tensor<B, 4>, k: Tensor<B, 4>, v: Tensor<B, 4>, decay: Option<&[f64]>
    ),
    GatedMode::Chunk
);
