//! Layers for linear-attention language models on the ops of `fla-burn` (never the kernels
//! directly). This crate knows nothing of training.
//!
//! Built so far (issue 6 is open): the building blocks [`modules`] (gated RMSNorm, SwiGLU MLP,
//! short causal convolution with its decoding cache), the [`gla::GatedLinearAttention`] and
//! [`gated_deltanet::GatedDeltaNet`] token mixers, one causal LM around any mixer ([`lm`]), the
//! [`gla_model::GlaForCausalLM`] and [`gated_deltanet_model::GatedDeltaNetForCausalLM`] models
//! with FLA's `config.json`, FLA's `model.safetensors` checkpoints ([`checkpoint`]: load and
//! save, FLA's names) and generation with sampling ([`generate`]); softmax [`attn::Attention`]
//! (rotary, grouped heads, sliding window, key/value cache) on the fused attention op and the
//! Transformer++ baseline [`transformer_model::TransformerForCausalLM`]. Other families (RetNet,
//! DeltaNet, HGRN2), hybrid layer stacks and a tokenizer-driven `generate` CLI are not built yet.

pub mod attn;
pub mod checkpoint;
pub mod delta_net;
pub mod delta_net_model;
pub mod gated_deltanet;
pub mod gated_deltanet_model;
pub mod generate;
pub mod gla;
pub mod gla_model;
pub mod hgrn2;
pub mod hgrn2_model;
pub mod hybrid;
pub mod lm;
pub mod modules;
pub mod retnet;
pub mod retnet_model;
pub mod transformer_model;
