//! Burn backend ops for linear attention, fused softmax attention for hybrid models, and the
//! fused RMSNorm (plain and swish-gated) and SwiGLU activation around them, and a fused AdamW
//! step for training them ([`FusedAdamW`]).
//!
//! Each op family is a backend extension trait with three implementations:
//! - `CubeBackend` (CUDA, wgpu) and `Fusion<CubeBackend>` (what `burn::backend::Wgpu` and
//!   `burn::backend::Cuda` are): the fused CubeCL kernels of `fla-cubecl-kernels`;
//! - any other backend (NdArray here): the same math through plain tensor ops, via the trait's
//!   default methods;
//! - `Autodiff<B>`: a hand-derived backward registered as one node of Burn's graph.
//!
//! This crate knows nothing of models. Every op validates its inputs and returns [`FlaError`]
//! rather than panicking.

/// NdArray (CPU) implements an op family's trait through its default methods, the tensor-op
/// implementation (crate feature `ndarray`). Defined before the families' modules, which use it.
macro_rules! tensor_op_impl {
    ($family:ident) => {
        #[cfg(feature = "ndarray")]
        impl<E, I, Q> $family for burn_ndarray::NdArray<E, I, Q>
        where
            E: burn_ndarray::FloatNdArrayElement,
            I: burn_ndarray::IntNdArrayElement,
            Q: burn_ndarray::QuantElement,
            burn_ndarray::NdArrayTensor: From<burn_ndarray::SharedArray<E>>,
            burn_ndarray::NdArrayTensor: From<burn_ndarray::SharedArray<I>>,
        {
        }
    };
}

pub mod adamw;
pub mod attn;
#[cfg(feature = "cuda")]
pub mod blas;
mod checks;
pub mod cross_entropy;
pub mod delta;
pub mod device;
pub mod embedding;
pub mod error;
pub mod gated;
pub mod matmul;
pub mod norm;
mod recorded;
pub mod swiglu;

pub use adamw::{
    adamw_step, AdamWBackend, AdamWStep, FusedAdamW, FusedAdamWConfig, FusedAdamWOptimizer,
    GradClip,
};
pub use attn::{parallel_attn, AttentionBackend, AttnOptions};
pub use cross_entropy::{cross_entropy, cross_entropy_mean, CrossEntropyBackend};
pub use delta::{
    chunk_delta_rule, chunk_gated_delta_rule, delta_rule, fused_recurrent_delta_rule,
    fused_recurrent_gated_delta_rule, gated_delta_rule, DeltaMode, DeltaRuleBackend,
    DeltaRuleOptions,
};
pub use embedding::{embedding, EmbeddingBackend};
pub use error::FlaError;
pub use gated::{
    chunk_gla, chunk_linear_attn, chunk_retention, chunk_simple_gla, fused_recurrent_gla,
    fused_recurrent_linear_attn, fused_recurrent_retention, fused_recurrent_simple_gla, gla,
    linear_attn, retention, retention_decay, simple_gla, GateKind, GatedMode, GatedOptions,
    GatedRecurrentBackend, RecurrentOptions, RecurrentOutput,
};
pub use matmul::{linear, matmul, MatmulBackend};
pub use norm::{rms_norm, rms_norm_gated, NormBackend};
pub use swiglu::{swiglu, SwigluBackend};

/// The fused ops of the modules around every token mixer (its projections, norms and its MLP's
/// activation) and of the language model's embedding and loss.
/// The family traits require it, so a model generic over one family's trait has them too.
pub trait LayerBackend:
    MatmulBackend + NormBackend + SwigluBackend + CrossEntropyBackend + EmbeddingBackend
{
}
impl<B> LayerBackend for B where
    B: MatmulBackend + NormBackend + SwigluBackend + CrossEntropyBackend + EmbeddingBackend
{
}
