//! Layers for linear-attention language models on the ops of `fla-burn` (never the kernels
//! directly). This crate knows nothing of training.
//!
//! Built so far (issue 6 is open): the building blocks [`modules`] (gated RMSNorm, SwiGLU MLP,
//! short causal convolution with its decoding cache) and the [`gla::GatedLinearAttention`] token
//! mixer in recurrent mode. Models, checkpoints and generation are not built yet.

pub mod gla;
pub mod modules;
