//! Gated DeltaNet language model with FLA's `GatedDeltaNetConfig` (`model_type: gated_deltanet`)
//! and module layout: [`crate::lm::ForCausalLM`] with [`GatedDeltaNet`] mixers.
//!
//! Hybrid models (FLA's `attn` field, softmax attention in some layers) are
//! [`crate::hybrid::HybridForCausalLM`] over the same mixer (`init_hybrid`).

use fla_burn::{AttentionBackend, DeltaRuleBackend, FlaError};
use serde::{Deserialize, Serialize};

use crate::gated_deltanet::{DeltaCache, GatedDeltaNet, GatedDeltaNetLayerConfig};
use crate::hybrid::HybridForCausalLM;
use crate::lm::{fused_recurrent_mode, lm_shape, refuse_hybrid, ConfigError, ForCausalLM, LmShape};

/// FLA's `GatedDeltaNetConfig` fields (same names and defaults; fields this port does not use,
/// such as the fused-kernel switches, are read and kept but change nothing).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct GatedDeltaNetConfig {
    pub attn_mode: String,
    pub hidden_size: usize,
    pub expand_v: f64,
    pub use_gate: bool,
    pub use_short_conv: bool,
    pub allow_neg_eigval: bool,
    pub conv_size: usize,
    pub head_dim: usize,
    pub num_heads: usize,
    pub num_v_heads: Option<usize>,
    pub max_position_embeddings: usize,
    pub hidden_ratio: Option<usize>,
    pub intermediate_size: Option<usize>,
    pub hidden_act: String,
    pub num_hidden_layers: usize,
    pub norm_eps: f64,
    pub attn: Option<serde_json::Value>,
    pub use_cache: bool,
    pub pad_token_id: Option<usize>,
    pub bos_token_id: usize,
    pub eos_token_id: usize,
    pub tie_word_embeddings: bool,
    pub initializer_range: f64,
    pub fuse_norm: bool,
    pub fuse_swiglu: bool,
    pub fuse_cross_entropy: bool,
    pub vocab_size: usize,
    pub model_type: String,
    pub output_gate_activation: String,
}

impl Default for GatedDeltaNetConfig {
    fn default() -> Self {
        Self {
            attn_mode: "chunk".into(),
            hidden_size: 2048,
            expand_v: 2.0,
            use_gate: true,
            use_short_conv: true,
            allow_neg_eigval: false,
            conv_size: 4,
            head_dim: 256,
            num_heads: 6,
            num_v_heads: None,
            max_position_embeddings: 2048,
            hidden_ratio: Some(4),
            intermediate_size: None,
            hidden_act: "swish".into(),
            num_hidden_layers: 21,
            norm_eps: 1e-6,
            attn: None,
            use_cache: true,
            pad_token_id: None,
            bos_token_id: 1,
            eos_token_id: 2,
            tie_word_embeddings: false,
            initializer_range: 0.02,
            fuse_norm: true,
            fuse_swiglu: true,
            fuse_cross_entropy: true,
            vocab_size: 32000,
            model_type: "gated_deltanet".into(),
            output_gate_activation: "swish".into(),
        }
    }
}

/// Gated DeltaNet's causal LM.
pub type GatedDeltaNetForCausalLM<B> = ForCausalLM<B, GatedDeltaNet<B>>;

/// Per-layer recurrent caches of a batch of sequences, for decoding.
pub type GatedDeltaNetModelCache<B> = Vec<DeltaCache<B>>;

impl GatedDeltaNetConfig {
    /// Reads FLA's `config.json`.
    pub fn load(path: impl AsRef<std::path::Path>) -> Result<Self, ConfigError> {
        crate::lm::load_config(path.as_ref(), "Gated DeltaNet")
    }

    /// Writes `config.json` with FLA's field names.
    pub fn save(&self, path: impl AsRef<std::path::Path>) -> Result<(), ConfigError> {
        crate::lm::save_config(self, path.as_ref())
    }

    /// Builds the model; errors for what this port does not support (an unknown `attn_mode` or
    /// activation; `attn`: see [`Self::init_hybrid`]) rather than building a different model.
    pub fn init<B: DeltaRuleBackend>(
        &self,
        device: &B::Device,
    ) -> Result<GatedDeltaNetForCausalLM<B>, FlaError> {
        refuse_hybrid(&self.attn)?;
        let (shape, layer) = self.parts()?;
        shape.init(device, |_| layer.init(device))
    }

    /// The model with softmax attention in the layers `attn` lists (none without it).
    pub fn init_hybrid<B: DeltaRuleBackend + AttentionBackend>(
        &self,
        device: &B::Device,
    ) -> Result<HybridForCausalLM<B, GatedDeltaNet<B>>, FlaError> {
        let (shape, layer) = self.parts()?;
        shape.init_hybrid(&self.attn, device, |_| layer.init(device))
    }

    /// The checked sizes around the mixers and the mixers' config.
    fn parts(&self) -> Result<(LmShape, GatedDeltaNetLayerConfig), FlaError> {
        let fused_recurrent = fused_recurrent_mode(&self.attn_mode, false)?;
        if !matches!(self.hidden_act.as_str(), "swish" | "silu") {
            return Err(FlaError::Unsupported(format!(
                "hidden_act {:?} (the MLP is SwiGLU)",
                self.hidden_act
            )));
        }
        if !matches!(self.output_gate_activation.as_str(), "swish" | "silu") {
            return Err(FlaError::Unsupported(format!(
                "output_gate_activation {:?} (the output gate is swish)",
                self.output_gate_activation
            )));
        }
        let layer = GatedDeltaNetLayerConfig::new()
            .with_hidden_size(self.hidden_size)
            .with_expand_v(self.expand_v)
            .with_head_dim(self.head_dim)
            .with_num_heads(self.num_heads)
            .with_num_v_heads(self.num_v_heads)
            .with_use_gate(self.use_gate)
            .with_use_short_conv(self.use_short_conv)
            .with_fused_recurrent(fused_recurrent)
            .with_allow_neg_eigval(self.allow_neg_eigval)
            .with_conv_size(self.conv_size)
            .with_norm_eps(self.norm_eps);
        let shape = lm_shape!(self);
        Ok((shape, layer))
    }
}

impl<B: DeltaRuleBackend> crate::checkpoint::Pretrained<B> for GatedDeltaNetForCausalLM<B> {
    type Config = GatedDeltaNetConfig;
    const FAMILY: &'static str = "Gated DeltaNet";

    fn build(config: &GatedDeltaNetConfig, device: &B::Device) -> Result<Self, FlaError> {
        config.init(device)
    }
}

impl<B: DeltaRuleBackend + AttentionBackend> crate::checkpoint::Pretrained<B>
    for HybridForCausalLM<B, GatedDeltaNet<B>>
{
    type Config = GatedDeltaNetConfig;
    const FAMILY: &'static str = "Gated DeltaNet";

    fn build(config: &GatedDeltaNetConfig, device: &B::Device) -> Result<Self, FlaError> {
        config.init_hybrid(device)
    }
}
