//! The user-facing functions on Burn's `Tensor` API, with FLA's names and keyword options.

use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

use super::{DeltaMode, DeltaOptions, DeltaRuleBackend, DeltaTensors};
use crate::gated::api::{prim, wrap};
use crate::gated::RecurrentOutput;
use crate::FlaError;

/// Options of the delta-rule ops (FLA's keyword arguments).
#[derive(Debug, Clone)]
pub struct DeltaRuleOptions<B: Backend> {
    /// Multiplies `q S`; defaults to `K^-0.5`.
    pub scale: Option<f64>,
    /// `h0: [N, HV, K, V]`, f32.
    pub initial_state: Option<Tensor<B, 4>>,
    /// Also return the final state `hT: [N, HV, K, V]` (f32).
    pub output_final_state: bool,
    /// Boundaries `[0, t1, ..., T]` of a variable-length batch packed as `B = 1`.
    pub cu_seqlens: Option<Vec<usize>>,
    /// L2-normalise `q` and `k` over the head dimension first (FLA's
    /// `use_qk_l2norm_in_kernel`). Done here with differentiable tensor ops before the fused
    /// kernel, not inside it.
    pub use_qk_l2norm: bool,
    /// Which form computes the call: [`DeltaMode::Auto`] by default. The `fused_recurrent_*` and
    /// `chunk_*` functions set it.
    pub mode: DeltaMode,
}

impl<B: Backend> Default for DeltaRuleOptions<B> {
    fn default() -> Self {
        Self {
            scale: None,
            initial_state: None,
            output_final_state: false,
            cu_seqlens: None,
            use_qk_l2norm: false,
            mode: DeltaMode::Auto,
        }
    }
}

impl<B: Backend> DeltaRuleOptions<B> {
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
    pub fn with_cu_seqlens(mut self, cu_seqlens: Vec<usize>) -> Self {
        self.cu_seqlens = Some(cu_seqlens);
        self
    }
    pub fn with_qk_l2norm(mut self) -> Self {
        self.use_qk_l2norm = true;
        self
    }
    pub fn with_mode(mut self, mode: DeltaMode) -> Self {
        self.mode = mode;
        self
    }
}

/// `x / sqrt(‖x‖₂² + 1e-6)` over the last dimension, in f32 and back: FLA's in-kernel `l2norm`
/// (the epsilon inside the root, so a zero row stays zero and its gradient finite).
fn l2norm<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 4> {
    let dtype = x.dtype();
    let x32 = x.cast(burn::tensor::FloatDType::F32);
    let norm = (x32.clone().square().sum_dim(3) + 1e-6).sqrt();
    (x32 / norm).cast(crate::gated::float_dtype(dtype))
}

fn run<B: DeltaRuleBackend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    beta: Tensor<B, 3>,
    g: Option<Tensor<B, 3>>,
    opts: DeltaRuleOptions<B>,
) -> Result<RecurrentOutput<B>, FlaError> {
    let k_dim = q.dims()[3];
    let (q, k) = if opts.use_qk_l2norm {
        (l2norm(q), l2norm(k))
    } else {
        (q, k)
    };
    let options = DeltaOptions {
        scale: opts.scale.unwrap_or((k_dim.max(1) as f64).powf(-0.5)) as f32,
        cu_seqlens: opts.cu_seqlens,
        output_final_state: opts.output_final_state,
        mode: opts.mode,
    };
    let x = DeltaTensors {
        q: prim(q),
        k: prim(k),
        v: prim(v),
        beta: prim(beta),
        g: g.map(prim),
        h0: opts.initial_state.map(prim),
    };
    let out = B::delta_rule_forward(x, &options)?;
    Ok(RecurrentOutput {
        o: wrap(out.o),
        final_state: out.ht.map(wrap),
    })
}

/// DeltaNet's delta rule: `S_t = S_{t-1} + β_t k_tᵀ (v_t − k_t S_{t-1})`, `o_t = scale · q_t S_t`.
///
/// Shapes: `q, k: [B, T, H, K]`, `v: [B, T, HV, V]`, `beta: [B, T, HV]` (in `(0, 1)`, or
/// `(0, 2)` to allow negative eigenvalues: the caller's choice), one float dtype; `HV` a multiple
/// of `H`. Keys should be L2-normalised (`use_qk_l2norm`, or by the layer) for the state to stay
/// bounded. Errors: see [`DeltaRuleBackend::delta_rule_forward`].
pub fn delta_rule<B: DeltaRuleBackend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    beta: Tensor<B, 3>,
    opts: DeltaRuleOptions<B>,
) -> Result<RecurrentOutput<B>, FlaError> {
    run(q, k, v, beta, None, opts)
}

/// Gated DeltaNet's rule, with a log decay `g: [B, T, HV]` (`α_t = exp(g_t)`):
/// `S_t = α_t S_{t-1} + β_t k_tᵀ (v_t − α_t k_t S_{t-1})`. Argument order as FLA's
/// (`q, k, v, g, beta`).
pub fn gated_delta_rule<B: DeltaRuleBackend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    g: Tensor<B, 3>,
    beta: Tensor<B, 3>,
    opts: DeltaRuleOptions<B>,
) -> Result<RecurrentOutput<B>, FlaError> {
    run(q, k, v, beta, Some(g), opts)
}

/// Defines FLA's mode-named entry points (`fused_recurrent_*`, `chunk_*`) over the generic ones.
macro_rules! with_mode {
    ($(#[$doc:meta])* $name:ident = $generic:ident($($arg:ident: $ty:ty),*), $mode:expr) => {
        $(#[$doc])*
        pub fn $name<B: DeltaRuleBackend>(
            $($arg: $ty,)*
            opts: DeltaRuleOptions<B>,
        ) -> Result<RecurrentOutput<B>, FlaError> {
            $generic($($arg,)* opts.with_mode($mode))
        }
    };
}

with_mode!(
    /// [`delta_rule`] in the fused recurrent form (decoding, short sequences).
    fused_recurrent_delta_rule = delta_rule(
        q: Tensor<B, 4>, k: Tensor<B, 4>, v: Tensor<B, 4>, beta: Tensor<B, 3>
    ),
    DeltaMode::FusedRecurrent
);
with_mode!(
    /// [`gated_delta_rule`] in the fused recurrent form.
    fused_recurrent_gated_delta_rule = gated_delta_rule(
        q: Tensor<B, 4>, k: Tensor<B, 4>, v: Tensor<B, 4>, g: Tensor<B, 3>, beta: Tensor<B, 3>
    ),
    DeltaMode::FusedRecurrent
);
with_mode!(
    /// [`delta_rule`] in the chunkwise-parallel (WY) form (training).
    chunk_delta_rule = delta_rule(
        q: Tensor<B, 4>, k: Tensor<B, 4>, v: Tensor<B, 4>, beta: Tensor<B, 3>
    ),
    DeltaMode::Chunk
);
with_mode!(
    /// [`gated_delta_rule`] in the chunkwise-parallel (WY) form.
    chunk_gated_delta_rule = gated_delta_rule(
        q: Tensor<B, 4>, k: Tensor<B, 4>, v: Tensor<B, 4>, g: Tensor<B, 3>, beta: Tensor<B, 3>
    ),
    DeltaMode::Chunk
);
