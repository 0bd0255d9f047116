//! CubeCL kernels for linear attention, written once and compiled for CUDA and wgpu (Vulkan).
//!
//! This crate knows nothing of Burn: kernels take CubeCL compute clients and buffer handles, and
//! every kernel has a naive `f64` reference beside it that the tests compare against.
//!
//! Families:
//! - [`gated`]: the gated linear-attention family (`linear_attn`, `retention`, `simple_gla`, `gla`),
//!   fused recurrent and chunkwise-parallel forms, forward and backward.
//! - [`delta`]: the delta-rule family (`delta_rule`, `gated_delta_rule`, grouped value heads),
//!   fused recurrent form, forward and backward.
//! - [`norm`]: RMSNorm, optionally with a swish gate, fused forward and backward (the norms around
//!   every token mixer).
//! - [`swiglu`]: SwiGLU's activation `swish(g) ∘ u`, fused forward and backward (the MLPs).
//! - [`adamw`]: one AdamW step on a parameter tensor with its gradient clipping, fused (the
//!   optimiser's many small element-wise passes in one).
//!
//! Layout follows flash-linear-attention: `q, k: [B, T, H, K]`, `v, o: [B, T, H, V]`, gates in log
//! space, states `[N, H, K, V]` in `f32`, variable-length batches through `cu_seqlens` with `B = 1`.

pub mod adamw;
pub mod attn;
#[cfg(feature = "cuda")]
pub mod blas;
pub mod cross_entropy;
pub mod delta;
pub mod dtype;
pub mod embedding;
pub mod error;
pub mod frag;
pub mod gated;
pub mod norm;
mod problem;
pub mod swiglu;
pub mod testing;
pub mod tile;

/// A fingerprint of this crate's sources (see build.rs): where compiled kernels are cached on
/// disk, the cache is kept apart per fingerprint, so an edited kernel is never served stale.
pub const SOURCE_HASH: &str = env!("FLA_KERNELS_SOURCE_HASH");

pub use dtype::FloatDType;
pub use error::KernelError;
