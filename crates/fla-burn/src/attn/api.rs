//! The user-facing function on Burn's `Tensor` API, with FLA's name (`parallel_attn`) and
//! keyword options.

use burn::tensor::Tensor;

use super::{AttentionBackend, AttnOpOptions, AttnTensors};
use crate::gated::api::{prim, wrap};
use crate::FlaError;

/// Options of [`parallel_attn`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AttnOptions {
    /// Multiplies `q · k`; defaults to `K^-0.5`.
    pub scale: Option<f64>,
    /// Each query sees only keys at or before its position (queries are the last `T_q` of the
    /// `T_k` key positions).
    pub causal: bool,
    /// Sliding window `W`: a query sees keys less than `W` positions before it (itself
    /// included), as Mistral's and Samba's sliding-window attention.
    pub window: Option<usize>,
    /// Soft cap `c`: scores become `c · tanh(x / c)` (Gemma 2).
    pub softcap: Option<f64>,
    /// Boundaries `[0, t1, ..., T]` of a variable-length batch packed as `B = 1`; no query sees
    /// a key of another sequence.
    pub cu_seqlens: Option<Vec<usize>>,
}

impl AttnOptions {
    /// Causal attention, the language-model default.
    pub fn causal() -> Self {
        Self {
            causal: true,
            ..Self::default()
        }
    }
    pub fn with_scale(mut self, scale: f64) -> Self {
        self.scale = Some(scale);
        self
    }
    pub fn with_window(mut self, window: usize) -> Self {
        self.window = Some(window);
        self
    }
    pub fn with_softcap(mut self, cap: f64) -> Self {
        self.softcap = Some(cap);
        self
    }
    pub fn with_cu_seqlens(mut self, cu_seqlens: Vec<usize>) -> Self {
        self.cu_seqlens = Some(cu_seqlens);
        self
    }
}

/// Softmax attention `o_i = Σ_j softmax_j(scale · q_i · k_j) v_j`, fused: on `CubeBackend`
/// (CUDA, wgpu) the scores never leave the chip, so memory grows with `T`, not `T²`.
///
/// Shapes: `q: [B, T_q, H, K]`, `k: [B, T_k, HK, K]`, `v: [B, T_k, HK, V]` → `o: [B, T_q, H, V]`,
/// one float dtype; query head `h` reads key/value head `h / (H / HK)` (grouped-query
/// attention). `T_q < T_k` places the queries at the last positions (decoding against a cache).
/// Differentiable in `q`, `k`, `v` under `Autodiff`. Errors: see
/// [`AttentionBackend::attn_forward`].
pub fn parallel_attn<B: AttentionBackend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    opts: AttnOptions,
) -> Result<Tensor<B, 4>, FlaError> {
    let k_dim = q.dims()[3];
    let options = AttnOpOptions {
        scale: opts.scale.unwrap_or((k_dim.max(1) as f64).powf(-0.5)) as f32,
        causal: opts.causal,
        window: opts.window,
        softcap: opts.softcap.map(|c| c as f32),
        cu_seqlens: opts.cu_seqlens,
    };
    let x = AttnTensors {
        q: prim(q),
        k: prim(k),
        v: prim(v),
    };
    Ok(wrap(B::attn_forward(x, &options)?.o))
}
