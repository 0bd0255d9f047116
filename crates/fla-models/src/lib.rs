//! Layers for linear-attention language models on the ops of `fla-burn` (never the kernels
//! directly). This crate knows nothing of training.
//!
//! Built so far (issue 6 is open): the building blocks [`modules`] (gated RMSNorm, SwiGLU MLP,
//! short causal convolution with its decoding cache), the [`gla::GatedLinearAttention`] token
//! mixer and the [`gla_model::GlaForCausalLM`] model with FLA's `config.json`, both on the
//! recurrent op (whole sequences, or decoding from per-layer caches). Other families, chunk mode,
//! checkpoints in FLA's safetensors layout, sampling and the `generate` CLI are not built yet.

pub mod gated_deltanet;
pub mod gated_deltanet_model;
pub mod gla;
pub mod gla_model;
pub mod lm;
pub mod modules;
