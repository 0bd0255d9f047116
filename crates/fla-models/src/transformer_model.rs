//! The Transformer++ baseline with FLA's `TransformerConfig` (`model_type: transformer`) and
//! module layout: [`crate::lm::ForCausalLM`] with softmax [`Attention`] mixers (rotary, grouped
//! key/value heads, optional sliding window) on the fused `parallel_attn` op.

use fla_burn::{AttentionBackend, FlaError};
use serde::{Deserialize, Serialize};

use crate::attn::{Attention, AttentionConfig, KvCache};
use crate::checkpoint::Pretrained;
use crate::lm::{lm_shape, ConfigError, ForCausalLM};

/// FLA's `TransformerConfig` fields (same names and defaults; the fused-kernel switches are read
/// and kept but change nothing).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TransformerConfig {
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: Option<usize>,
    pub qkv_bias: bool,
    pub qk_norm: bool,
    pub window_size: Option<usize>,
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
    pub hidden_ratio: Option<usize>,
    pub intermediate_size: Option<usize>,
    pub hidden_act: String,
    pub initializer_range: f64,
    pub elementwise_affine: Option<bool>,
    pub norm_eps: f64,
    pub use_cache: bool,
    pub pad_token_id: Option<usize>,
    pub bos_token_id: usize,
    pub eos_token_id: usize,
    pub tie_word_embeddings: bool,
    pub fuse_norm: bool,
    pub fuse_swiglu: bool,
    pub fuse_cross_entropy: bool,
    pub fuse_linear_cross_entropy: bool,
    pub use_l2warp: bool,
    pub vocab_size: usize,
    /// FLA's attention residuals (a learned mix of earlier layers' outputs in place of the
    /// plain residual stream): not built here, so a config that sets it is refused.
    pub attnres_block_size: Option<usize>,
    pub model_type: String,
}

impl Default for TransformerConfig {
    fn default() -> Self {
        Self {
            hidden_size: 2048,
            num_hidden_layers: 24,
            num_heads: 32,
            num_kv_heads: None,
            qkv_bias: false,
            qk_norm: false,
            window_size: None,
            rope_theta: 10000.0,
            max_position_embeddings: 2048,
            hidden_ratio: Some(4),
            intermediate_size: None,
            hidden_act: "swish".into(),
            initializer_range: 0.02,
            elementwise_affine: Some(true),
            norm_eps: 1e-6,
            use_cache: true,
            pad_token_id: None,
            bos_token_id: 1,
            eos_token_id: 2,
            tie_word_embeddings: false,
            fuse_norm: true,
            fuse_swiglu: true,
            fuse_cross_entropy: true,
            fuse_linear_cross_entropy: false,
            use_l2warp: false,
            vocab_size: 32000,
            attnres_block_size: None,
            model_type: "transformer".into(),
        }
    }
}

impl TransformerConfig {
    pub fn load(path: impl AsRef<std::path::Path>) -> Result<Self, ConfigError> {
        crate::lm::load_config(path.as_ref(), "Transformer")
    }

    pub fn save(&self, path: impl AsRef<std::path::Path>) -> Result<(), ConfigError> {
        crate::lm::save_config(self, path.as_ref())
    }
}

/// The Transformer's causal LM: the shared model around softmax [`Attention`] mixers.
pub type TransformerForCausalLM<B> = ForCausalLM<B, Attention<B>>;

/// Per-layer key/value caches of a batch of sequences, for decoding.
pub type TransformerCache<B> = Vec<KvCache<B>>;

impl TransformerConfig {
    /// Errors for options this port does not build (attention residuals) rather than building
    /// a different model.
    pub fn init<B: AttentionBackend>(
        &self,
        device: &B::Device,
    ) -> Result<TransformerForCausalLM<B>, FlaError> {
        if self.attnres_block_size.is_some() {
            return Err(FlaError::Unsupported(
                "attnres_block_size (attention residuals)".into(),
            ));
        }
        if !matches!(self.hidden_act.as_str(), "swish" | "silu") {
            return Err(FlaError::Unsupported(format!(
                "hidden_act {:?} (the MLP is SwiGLU)",
                self.hidden_act
            )));
        }
        if self.elementwise_affine == Some(false) {
            return Err(FlaError::Unsupported(
                "norms without weights (elementwise_affine = false)".into(),
            ));
        }
        let attn = AttentionConfig::new()
            .with_hidden_size(self.hidden_size)
            .with_num_heads(self.num_heads)
            .with_num_kv_heads(self.num_kv_heads)
            .with_qkv_bias(self.qkv_bias)
            .with_qk_norm(self.qk_norm)
            .with_window_size(self.window_size)
            .with_rope_theta(self.rope_theta);
        let shape = lm_shape!(self);
        shape.init(device, |_| attn.init(device))
    }
}

impl<B: AttentionBackend> Pretrained<B> for TransformerForCausalLM<B> {
    type Config = TransformerConfig;
    const FAMILY: &'static str = "Transformer";

    fn build(config: &TransformerConfig, device: &B::Device) -> Result<Self, FlaError> {
        config.init(device)
    }
}
