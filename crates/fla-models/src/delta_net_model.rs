//! DeltaNet language model with FLA's `DeltaNetConfig` (`model_type: delta_net`) and module
//! layout: [`crate::lm::ForCausalLM`] with [`DeltaNet`] mixers.

use fla_burn::{AttentionBackend, DeltaRuleBackend, FlaError};

use crate::hybrid::HybridForCausalLM;
use serde::{Deserialize, Serialize};

use crate::delta_net::{DeltaNet, DeltaNetLayerConfig, QkActivation, QkNorm};
use crate::lm::{
    check_swish, fused_recurrent_mode, lm_shape, refuse_hybrid, ConfigError, ForCausalLM, LmShape,
};

/// FLA's `DeltaNetConfig` fields (same names and defaults; fields this port does not use, such
/// as the fused-kernel switches, are read and kept but change nothing).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DeltaNetConfig {
    pub attn_mode: String,
    pub hidden_size: usize,
    pub expand_k: f64,
    pub expand_v: f64,
    pub use_gate: bool,
    pub use_short_conv: bool,
    pub allow_neg_eigval: bool,
    pub conv_size: usize,
    pub use_beta: bool,
    /// Kept for FLA's files; FLA's layer applies its output norm whatever this says, and so do we.
    pub use_output_norm: bool,
    pub num_heads: usize,
    pub qk_norm: String,
    pub qk_activation: String,
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
}

impl Default for DeltaNetConfig {
    fn default() -> Self {
        Self {
            attn_mode: "chunk".into(),
            hidden_size: 2048,
            expand_k: 1.0,
            expand_v: 1.0,
            use_gate: false,
            use_short_conv: true,
            allow_neg_eigval: false,
            conv_size: 4,
            use_beta: true,
            use_output_norm: true,
            num_heads: 16,
            qk_norm: "l2".into(),
            qk_activation: "silu".into(),
            max_position_embeddings: 2048,
            hidden_ratio: Some(4),
            intermediate_size: None,
            hidden_act: "swish".into(),
            num_hidden_layers: 24,
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
            model_type: "delta_net".into(),
        }
    }
}

/// DeltaNet's causal LM.
pub type DeltaNetForCausalLM<B> = ForCausalLM<B, DeltaNet<B>>;

impl DeltaNetConfig {
    /// Reads FLA's `config.json`.
    pub fn load(path: impl AsRef<std::path::Path>) -> Result<Self, ConfigError> {
        crate::lm::load_config(path.as_ref(), "DeltaNet")
    }

    /// Writes `config.json` with FLA's field names.
    pub fn save(&self, path: impl AsRef<std::path::Path>) -> Result<(), ConfigError> {
        crate::lm::save_config(self, path.as_ref())
    }

    /// Builds the model; errors for what this port does not support (an unknown `attn_mode`,
    /// activation or norm; `attn`: see [`Self::init_hybrid`]) rather than building a different
    /// model.
    pub fn init<B: DeltaRuleBackend>(
        &self,
        device: &B::Device,
    ) -> Result<DeltaNetForCausalLM<B>, FlaError> {
        refuse_hybrid(&self.attn)?;
        let (shape, layer) = self.parts()?;
        shape.init(device, |_| layer.init(device))
    }

    /// The model with softmax attention in the layers `attn` lists (none without it).
    pub fn init_hybrid<B: DeltaRuleBackend + AttentionBackend>(
        &self,
        device: &B::Device,
    ) -> Result<HybridForCausalLM<B, DeltaNet<B>>, FlaError> {
        let (shape, layer) = self.parts()?;
        shape.init_hybrid(&self.attn, device, |_| layer.init(device))
    }

    /// The checked sizes around the mixers and the mixers' config.
    fn parts(&self) -> Result<(LmShape, DeltaNetLayerConfig), FlaError> {
        check_swish("hidden_act", &self.hidden_act)?;
        let layer = DeltaNetLayerConfig::new()
            .with_hidden_size(self.hidden_size)
            .with_expand_k(self.expand_k)
            .with_expand_v(self.expand_v)
            .with_num_heads(self.num_heads)
            .with_use_beta(self.use_beta)
            .with_use_gate(self.use_gate)
            .with_use_short_conv(self.use_short_conv)
            .with_conv_size(self.conv_size)
            .with_allow_neg_eigval(self.allow_neg_eigval)
            .with_qk_activation(QkActivation::parse(&self.qk_activation)?)
            .with_qk_norm(QkNorm::parse(&self.qk_norm)?)
            .with_norm_eps(self.norm_eps)
            .with_fused_recurrent(fused_recurrent_mode(&self.attn_mode, false)?);
        let shape = lm_shape!(self);
        Ok((shape, layer))
    }
}

impl<B: DeltaRuleBackend> crate::checkpoint::Pretrained<B> for DeltaNetForCausalLM<B> {
    type Config = DeltaNetConfig;
    const FAMILY: &'static str = "DeltaNet";

    fn build(config: &DeltaNetConfig, device: &B::Device) -> Result<Self, FlaError> {
        config.init(device)
    }
}

impl<B: DeltaRuleBackend + AttentionBackend> crate::checkpoint::Pretrained<B>
    for HybridForCausalLM<B, DeltaNet<B>>
{
    type Config = DeltaNetConfig;
    const FAMILY: &'static str = "DeltaNet";

    fn build(config: &DeltaNetConfig, device: &B::Device) -> Result<Self, FlaError> {
        config.init_hybrid(device)
    }
}
