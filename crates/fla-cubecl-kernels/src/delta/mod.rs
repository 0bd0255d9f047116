//! The delta-rule family: DeltaNet (`delta_rule`) and Gated DeltaNet (`gated_delta_rule`), in the
//! fused recurrent form and the chunkwise-parallel (WY) form.
//!
//! Per sequence and value head, with `α_t = exp(g_t)` (1 for the plain delta rule), `β_t` a
//! scalar per token and head, rows `q_t, k_t ∈ R^K`, `v_t ∈ R^V` and state `S ∈ R^{K×V}`:
//! `u_t = β_t (v_t − α_t k_t S_{t-1})`, `S_t = α_t S_{t-1} + k_tᵀ u_t`, `o_t = scale · q_t S_t`.
//!
//! Grouped value heads (FLA's Gated DeltaNet): `q, k` have `H` heads, `v, β, g` and the state have
//! `HV` heads, `HV` a multiple of `H`; value head `hv` reads query/key head `hv / (HV / H)`.
//! Layouts: `q, k: [B·T, H, K]`, `v, o: [B·T, HV, V]`, `β, g: [B·T, HV]`, states
//! `[N, HV, K, V]` in `f32`.

mod chunk;
mod chunk_launch;
mod frag;
mod launch;
pub mod naive;
mod recurrent;
mod tiled;
mod tiled_bwd;

pub use chunk_launch::{delta_chunk_backward, delta_chunk_forward};
pub use frag::{delta_dqk_in_registers, DEFAULT_DELTA_FRAG};
pub use launch::{
    delta_backward, delta_check_device, delta_forward, DeltaBackwardBuffers, DeltaForwardBuffers,
};
pub use recurrent::CHECKPOINT_EVERY;
pub use tiled::{delta_chunk_on_tensor_cores, delta_takes_tiles};

use crate::problem::{addressable, elements};
use crate::{FloatDType, KernelError};

/// The shape and options of one delta-rule call, shared by the kernels and the naive reference.
#[derive(Debug, Clone, PartialEq)]
pub struct DeltaProblem {
    /// Batch size `B` (1 when `cu_seqlens` is given).
    pub batch: usize,
    /// Tokens per batch row `T` (the total token count when `cu_seqlens` is given).
    pub seq_len: usize,
    /// Query/key heads `H`.
    pub heads: usize,
    /// Value heads `HV` (the state's heads), a multiple of `H`.
    pub v_heads: usize,
    pub k_dim: usize,
    pub v_dim: usize,
    /// Gated delta rule: a log decay `g: [B·T, HV]`.
    pub gated: bool,
    pub scale: f32,
    /// Sequence boundaries `[0, t1, ..., T]` for a variable-length batch (FLA's `cu_seqlens`).
    pub cu_seqlens: Option<Vec<usize>>,
    pub has_initial_state: bool,
    pub output_final_state: bool,
    pub dtype: FloatDType,
}

impl DeltaProblem {
    /// Number of independent sequences `N` (`B`, or `len(cu_seqlens) - 1`).
    pub fn num_seqs(&self) -> usize {
        crate::problem::num_seqs(self.batch, self.cu_seqlens.as_deref())
    }

    /// Total tokens over the batch, `B * T`.
    pub fn tokens(&self) -> usize {
        self.batch * self.seq_len
    }

    /// `(start, end)` token indices of sequence `n` in the flattened token axis.
    pub fn bounds(&self, n: usize) -> (usize, usize) {
        crate::problem::bounds(self.seq_len, self.cu_seqlens.as_deref(), n)
    }

    /// Value heads per query/key head.
    pub fn group(&self) -> usize {
        self.v_heads / self.heads.max(1)
    }

    /// Element count of a state `[N, HV, K, V]`.
    pub fn state_len(&self) -> usize {
        self.num_seqs() * self.v_heads * self.k_dim * self.v_dim
    }

    /// Element counts of `q`/`k`, of `v`/`o`, and of `β`/`g`.
    pub fn lens(&self) -> (usize, usize, usize) {
        let t = self.tokens();
        (
            t * self.heads * self.k_dim,
            t * self.v_heads * self.v_dim,
            t * self.v_heads,
        )
    }

    /// Tokens in the longest sequence.
    pub fn longest(&self) -> usize {
        crate::problem::longest(self.batch, self.seq_len, self.cu_seqlens.as_deref())
    }

    /// Checks what does not depend on the device: sizes, head grouping and `cu_seqlens`.
    pub fn validate(&self) -> Result<(), KernelError> {
        crate::problem::validate(
            [self.batch, self.seq_len, self.heads, self.k_dim, self.v_dim],
            crate::problem::MAX_VALUE_DIM,
            self.scale,
            self.cu_seqlens.as_deref(),
        )?;
        if self.v_heads == 0 || !self.v_heads.is_multiple_of(self.heads) {
            return Err(KernelError::InvalidProblem(format!(
                "value heads HV = {} must be a positive multiple of the query/key heads H = {}",
                self.v_heads, self.heads
            )));
        }
        // v, the output and the per-token decays' products run over the value heads HV, which
        // may outnumber the query/key heads validated above.
        addressable(
            elements(&[
                self.batch,
                self.seq_len,
                self.v_heads,
                self.k_dim.max(self.v_dim),
            ]),
            "v or the output",
        )?;
        // The state [N, HV, K, V] outgrows them when sequences are short (decoding, T = 1).
        addressable(
            elements(&[self.num_seqs(), self.v_heads, self.k_dim, self.v_dim]),
            "the state",
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value heads are bounded on their own: with H = 1 the queries and keys are small, but
    /// 32 value heads of V = 128 over 2^20 tokens are 2^32 elements, past 32-bit indices.
    #[test]
    fn value_heads_past_32_bit_indices_refused() {
        let p = DeltaProblem {
            batch: 1,
            seq_len: 1 << 20,
            heads: 1,
            v_heads: 32,
            k_dim: 128,
            v_dim: 128,
            gated: true,
            scale: 1.0,
            cu_seqlens: None,
            has_initial_state: false,
            output_final_state: false,
            dtype: FloatDType::F32,
        };
        match p.validate() {
            Err(KernelError::DeviceLimit(m)) => assert!(m.contains("v or the output"), "{m}"),
            other => panic!("expected DeviceLimit, got {other:?}"),
        }
        let fits = DeltaProblem { v_heads: 16, ..p };
        assert!(fits.validate().is_ok());
        // Decoding (T = 1) with wide values: v is 2^28 elements, the state [N, HV, K, V] 2^36.
        let decode = DeltaProblem {
            batch: 1 << 12,
            seq_len: 1,
            v_heads: 16,
            k_dim: 256,
            v_dim: 4096,
            ..fits
        };
        match decode.validate() {
            Err(KernelError::DeviceLimit(m)) => assert!(m.contains("the state"), "{m}"),
            other => panic!("expected DeviceLimit, got {other:?}"),
        }
    }
}
