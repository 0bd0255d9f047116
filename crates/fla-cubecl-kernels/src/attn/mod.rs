//! Softmax attention, fused (flash attention): the scores of a query block against a key block
//! live only on chip, the softmax runs online over key blocks (one running maximum and sum per
//! query row), and the backward recomputes the probabilities from the saved log-sum-exp. Memory
//! is `O(T)`: no `T × T` tensor is ever written.
//!
//! Per sequence, query head `h` and its key/value head `h / (H / HK)` (grouped-query attention):
//! `x_ij = scale · q_i · k_j` (soft-capped to `c · tanh(x / c)` when a cap `c` is given),
//! `p_ij = exp(x_ij − lse_i)` over the keys `j` that query `i` sees, `o_i = Σ_j p_ij v_j`.
//!
//! Which keys a query sees: query `i` sits at position `i + (T_k − T_q)` of the key sequence
//! (queries are the last `T_q` positions, as when decoding against a key/value cache); with
//! `causal` it sees keys at or before its position, with a `window` of `W` only keys less than
//! `W` positions before it (`pos − j < W`, itself included). Variable-length batches
//! (`cu_seqlens`, `B = 1`, the same boundaries for queries and keys) never attend across
//! sequences.

mod frag;
mod kernels;
mod launch;
pub mod naive;

pub use kernels::AttnLayout;
pub use launch::{
    attn_backward, attn_bwd_registers, attn_check_device, attn_forward, attn_fwd_registers,
    attn_layout, AttnBackwardBuffers, AttnForwardBuffers, AttnKernel,
};

use crate::problem::{self, MAX_HEAD_DIM};
use crate::{FloatDType, KernelError};

/// The shape and options of one attention call, shared by the kernels and the naive reference.
#[derive(Debug, Clone, PartialEq)]
pub struct AttnProblem {
    /// Batch size `B` (1 when `cu_seqlens` is given).
    pub batch: usize,
    /// Query tokens per batch row `T_q` (the total token count with `cu_seqlens`).
    pub q_len: usize,
    /// Key/value tokens per batch row `T_k` (equal to `T_q` with `cu_seqlens`).
    pub kv_len: usize,
    /// Query heads `H`.
    pub heads: usize,
    /// Key/value heads `HK`, a divisor of `H`.
    pub kv_heads: usize,
    pub k_dim: usize,
    pub v_dim: usize,
    pub scale: f32,
    pub causal: bool,
    /// Sliding window `W`: a query sees keys less than `W` positions before it.
    pub window: Option<usize>,
    /// Soft cap `c` of the scores: `c · tanh(x / c)`.
    pub softcap: Option<f32>,
    pub cu_seqlens: Option<Vec<usize>>,
    pub dtype: FloatDType,
}

impl AttnProblem {
    /// Checks shapes and options against each other.
    pub fn validate(&self) -> Result<(), KernelError> {
        let bad = |m: String| Err(KernelError::InvalidProblem(m));
        problem::validate(
            [self.batch, self.q_len, self.heads, self.k_dim, self.v_dim],
            MAX_HEAD_DIM,
            self.scale,
            self.cu_seqlens.as_deref(),
        )?;
        if self.kv_len == 0 || self.kv_heads == 0 {
            return bad(format!(
                "zero-length keys (T_k = {}, HK = {})",
                self.kv_len, self.kv_heads
            ));
        }
        // k and v are [B·T_k, HK, K or V]: T_k is not the query length validated above.
        problem::addressable(
            problem::elements(&[
                self.batch,
                self.kv_len,
                self.kv_heads,
                self.k_dim.max(self.v_dim),
            ]),
            "k or v",
        )?;
        if !self.heads.is_multiple_of(self.kv_heads) {
            return bad(format!(
                "query heads H = {} must be a multiple of the key/value heads HK = {}",
                self.heads, self.kv_heads
            ));
        }
        if self.cu_seqlens.is_some() && self.kv_len != self.q_len {
            return bad(format!(
                "with cu_seqlens, queries and keys share one token axis (T_q = {}, T_k = {})",
                self.q_len, self.kv_len
            ));
        }
        if (self.causal || self.window.is_some()) && self.q_len > self.kv_len {
            return bad(format!(
                "causal or windowed attention places queries at the last T_q = {} of T_k = {} \
                 key positions; T_q must not exceed T_k",
                self.q_len, self.kv_len
            ));
        }
        if self.window == Some(0) {
            return bad("a window of zero keys sees nothing".into());
        }
        if let Some(c) = self.softcap {
            if !(c.is_finite() && c > 0.0) {
                return bad(format!("soft cap {c} must be finite and positive"));
            }
        }
        debug_assert!(self.k_dim <= MAX_HEAD_DIM);
        Ok(())
    }

    pub fn num_seqs(&self) -> usize {
        problem::num_seqs(self.batch, self.cu_seqlens.as_deref())
    }

    /// Query rows per head: `B · T_q`.
    pub fn q_tokens(&self) -> usize {
        self.batch * self.q_len
    }

    pub fn kv_tokens(&self) -> usize {
        self.batch * self.kv_len
    }

    /// Heads sharing one key/value head.
    pub fn group(&self) -> usize {
        self.heads / self.kv_heads
    }

    /// `(first query row, queries, first key row, keys)` of sequence `n` in the flattened token
    /// axes.
    pub fn seq(&self, n: usize) -> (usize, usize, usize, usize) {
        match &self.cu_seqlens {
            Some(cu) => (cu[n], cu[n + 1] - cu[n], cu[n], cu[n + 1] - cu[n]),
            None => (n * self.q_len, self.q_len, n * self.kv_len, self.kv_len),
        }
    }

    /// Longest query sequence (the kernels' grid covers it).
    pub fn longest(&self) -> usize {
        problem::longest(self.batch, self.q_len, self.cu_seqlens.as_deref())
    }

    /// Whether query `i` (index within its sequence of `lq` queries, against `lk` keys) sees key
    /// `j`.
    pub fn visible(&self, i: usize, j: usize, lq: usize, lk: usize) -> bool {
        let pos = i + lk - lq.min(lk);
        // Saturating: a window near `usize::MAX` (from a config file) sees every key.
        (!self.causal || j <= pos) && self.window.is_none_or(|w| j.saturating_add(w) > pos)
    }

    /// Element counts `(q, k, v, o, lse)`.
    pub fn lens(&self) -> (usize, usize, usize, usize, usize) {
        let (tq, tk) = (self.q_tokens(), self.kv_tokens());
        (
            tq * self.heads * self.k_dim,
            tk * self.kv_heads * self.k_dim,
            tk * self.kv_heads * self.v_dim,
            tq * self.heads * self.v_dim,
            tq * self.heads,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Keys longer than the queries are bounded on their own: 2^22 keys of 8 heads of 128 would
    /// be 2^32 elements, past the kernels' 32-bit indices, behind one query.
    #[test]
    fn long_keys_past_32_bit_indices_refused() {
        let p = AttnProblem {
            batch: 1,
            q_len: 1,
            kv_len: 1 << 22,
            heads: 8,
            kv_heads: 8,
            k_dim: 128,
            v_dim: 128,
            scale: 1.0,
            causal: false,
            window: None,
            softcap: None,
            cu_seqlens: None,
            dtype: FloatDType::F32,
        };
        match p.validate() {
            Err(KernelError::DeviceLimit(m)) => assert!(m.contains("k or v"), "{m}"),
            other => panic!("expected DeviceLimit, got {other:?}"),
        }
        let fits = AttnProblem {
            kv_len: (1 << 22) - 1,
            ..p
        };
        assert!(fits.validate().is_ok());
    }
}
