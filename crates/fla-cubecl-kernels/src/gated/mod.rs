//! The gated linear-attention family in its fused recurrent and chunkwise-parallel forms.
//!
//! Per sequence and head, with row vectors `q_t, k_t ∈ R^K`, `v_t ∈ R^V` and state `S ∈ R^{K×V}`:
//! `S_t = diag(exp(gk_t)) · S_{t-1} · diag(exp(gv_t)) + k_tᵀ v_t`, `o_t = scale · q_t S_t`.
//! The four variants of flash-linear-attention share each form's kernels, specialised at compile
//! time by [`GateKind`] and the optional value gate (fused recurrent form only):
//! - `linear_attn`: [`GateKind::None`];
//! - `retention`: [`GateKind::Scalar`] with a fixed per-head log decay broadcast over time;
//! - `simple_gla` (Mamba2/SSD form): [`GateKind::Scalar`], `g: [B, T, H]`;
//! - `gla`: [`GateKind::Vector`], `gk: [B, T, H, K]`, optionally a value gate `gv: [B, T, H, V]`.

pub(crate) mod chunk;
pub mod frag;
pub(crate) mod launch;
pub mod naive;
pub(crate) mod recurrent_bwd;
pub(crate) mod recurrent_fwd;
pub(crate) mod tiled;
pub(crate) mod tiled_launch;

pub(crate) use launch::{
    array, check_grid, check_loop_limit, chunk_tables, cubes_2d, elementwise_grid, need, tiles_for,
    upload_cu_seqlens, CPU_VULKAN_MAX_ITERATIONS, ELEMWISE_THREADS,
};
pub use launch::{
    check_device, chunk_backward, chunk_forward, chunk_scores_shape, is_cpu_vulkan,
    recurrent_backward, recurrent_forward, BackwardBuffers, ForwardBuffers, CPU_VULKAN_MAX_SEQ,
    DEFAULT_CHUNK,
};
pub use tiled::TiledLayout;
pub use tiled_launch::{
    gla_dkv_registers, gla_dq_registers, gla_fwd_registers, has_cmma, simple_scores_layout,
    tiled_layout, DEFAULT_GLA_FRAG, VECTOR_CHUNK,
};

use crate::{FloatDType, KernelError};

/// Which gate acts on the key side of the state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GateKind {
    /// No gate: plain linear attention.
    None,
    /// One log gate per (token, head): `g: [B, T, H]`.
    Scalar,
    /// One log gate per (token, head, key dim): `gk: [B, T, H, K]`.
    Vector,
}

/// The shape and options of one call, shared by the kernels and the naive reference.
#[derive(Debug, Clone, PartialEq)]
pub struct GatedProblem {
    /// Batch size `B` (1 when `cu_seqlens` is given).
    pub batch: usize,
    /// Tokens per batch row `T` (the total token count when `cu_seqlens` is given).
    pub seq_len: usize,
    pub heads: usize,
    pub k_dim: usize,
    pub v_dim: usize,
    pub gate: GateKind,
    pub value_gate: bool,
    pub scale: f32,
    /// Run each sequence from its last token to its first.
    pub reverse: bool,
    /// Sequence boundaries `[0, t1, ..., T]` for a variable-length batch (FLA's `cu_seqlens`).
    pub cu_seqlens: Option<Vec<usize>>,
    pub has_initial_state: bool,
    pub output_final_state: bool,
    pub dtype: FloatDType,
}

impl GatedProblem {
    /// Number of independent sequences `N` (`B`, or `len(cu_seqlens) - 1`).
    pub fn num_seqs(&self) -> usize {
        crate::problem::num_seqs(self.batch, self.cu_seqlens.as_deref())
    }

    /// Total tokens over the batch, `B * T`.
    pub fn tokens(&self) -> usize {
        self.batch * self.seq_len
    }

    /// `(start, end)` token indices of sequence `n` in the flattened `[B*T]` token axis.
    pub fn bounds(&self, n: usize) -> (usize, usize) {
        crate::problem::bounds(self.seq_len, self.cu_seqlens.as_deref(), n)
    }

    /// Element counts of `q`/`k` (`[B·T, H, K]`) and of `v`/`o` (`[B·T, H, V]`).
    pub fn lens(&self) -> (usize, usize) {
        let t = self.tokens();
        (t * self.heads * self.k_dim, t * self.heads * self.v_dim)
    }

    /// Element count of a state `[N, H, K, V]`.
    pub fn state_len(&self) -> usize {
        self.num_seqs() * self.heads * self.k_dim * self.v_dim
    }

    /// Element count of the key-side gate tensor, 0 when there is none.
    pub fn gate_len(&self) -> usize {
        match self.gate {
            GateKind::None => 0,
            GateKind::Scalar => self.tokens() * self.heads,
            GateKind::Vector => self.tokens() * self.heads * self.k_dim,
        }
    }

    /// Tokens in the longest sequence.
    pub fn longest(&self) -> usize {
        crate::problem::longest(self.batch, self.seq_len, self.cu_seqlens.as_deref())
    }

    /// Checks what does not depend on the device: sizes and `cu_seqlens`.
    pub fn validate(&self) -> Result<(), KernelError> {
        crate::problem::validate(
            [self.batch, self.seq_len, self.heads, self.k_dim, self.v_dim],
            MAX_VALUE_DIM,
            self.scale,
            self.cu_seqlens.as_deref(),
        )?;
        // The state [N, H, K, V] outgrows q/k/v when sequences are short (decoding, T = 1).
        crate::problem::addressable(
            crate::problem::elements(&[self.num_seqs(), self.heads, self.k_dim, self.v_dim]),
            "the state",
        )
    }
}

pub use crate::problem::MAX_HEAD_DIM;

pub use crate::problem::MAX_VALUE_DIM;
