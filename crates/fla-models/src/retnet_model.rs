//! RetNet language model with FLA's `RetNetConfig` (`model_type: retnet`) and module layout:
//! [`crate::lm::ForCausalLM`] with [`MultiScaleRetention`] mixers.

use fla_burn::{AttentionBackend, FlaError, GatedRecurrentBackend};

use crate::hybrid::HybridForCausalLM;
use serde::{Deserialize, Serialize};

use crate::lm::{
    check_swish, fused_recurrent_mode, lm_shape, refuse_hybrid, ConfigError, ForCausalLM, LmShape,
};
use crate::retnet::{MultiScaleRetention, MultiScaleRetentionConfig};

/// FLA's `RetNetConfig` fields (same names and defaults; fields this port does not use, such as
/// the fused-kernel switches, are read and kept but change nothing).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RetNetConfig {
    pub attn_mode: String,
    pub hidden_size: usize,
    pub expand_k: f64,
    pub expand_v: f64,
    pub hidden_ratio: Option<usize>,
    pub intermediate_size: Option<usize>,
    pub num_hidden_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: Option<usize>,
    pub feature_map: Option<String>,
    pub hidden_act: String,
    /// Kept for FLA's files: FLA's RetNet blocks never pass it to the layer (no convolutions).
    pub use_short_conv: bool,
    pub conv_size: usize,
    pub use_output_gate: bool,
    pub max_position_embeddings: usize,
    pub elementwise_affine: Option<bool>,
    /// The eps of every RMSNorm (the blocks', the final one) and of the retention output's norm.
    /// At FLA's 1e-6, a sequence whose first token has `q₀·k₀` near zero (its retention output
    /// is `scale·(q₀·k₀)·v₀`) gives the output norm an input of rms under `sqrt(eps)`, where the
    /// norm's gradient is large and fast-changing: measured on a 2-layer model at init, rounding
    /// the weights to f16 (f32 arithmetic) moved the gradients by 7-16 % on 5 of 12 inits, under
    /// 0.1 % at 1e-2. FLA's RetNet has the same norm and eps (not run against it here).
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

impl Default for RetNetConfig {
    fn default() -> Self {
        Self {
            attn_mode: "chunk".into(),
            hidden_size: 2048,
            expand_k: 1.0,
            expand_v: 2.0,
            hidden_ratio: Some(2),
            intermediate_size: None,
            num_hidden_layers: 24,
            num_heads: 8,
            num_kv_heads: None,
            feature_map: None,
            hidden_act: "swish".into(),
            use_short_conv: false,
            conv_size: 4,
            use_output_gate: true,
            max_position_embeddings: 2048,
            elementwise_affine: Some(true),
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
            model_type: "retnet".into(),
        }
    }
}

/// RetNet's causal LM.
pub type RetNetForCausalLM<B> = ForCausalLM<B, MultiScaleRetention<B>>;

impl RetNetConfig {
    /// Reads FLA's `config.json`.
    pub fn load(path: impl AsRef<std::path::Path>) -> Result<Self, ConfigError> {
        crate::lm::load_config(path.as_ref(), "RetNet")
    }

    /// Writes `config.json` with FLA's field names.
    pub fn save(&self, path: impl AsRef<std::path::Path>) -> Result<(), ConfigError> {
        crate::lm::save_config(self, path.as_ref())
    }

    /// Builds the model; errors for what this port does not support (`attn`: see
    /// [`Self::init_hybrid`]; feature maps, norms without weights, the `parallel` mode, other activations) rather than
    /// building a different model.
    pub fn init<B: GatedRecurrentBackend>(
        &self,
        device: &B::Device,
    ) -> Result<RetNetForCausalLM<B>, FlaError> {
        refuse_hybrid(&self.attn)?;
        let (shape, layer) = self.parts()?;
        shape.init(device, |_| layer.init(device))
    }

    /// The model with softmax attention in the layers `attn` lists (none without it).
    pub fn init_hybrid<B: GatedRecurrentBackend + AttentionBackend>(
        &self,
        device: &B::Device,
    ) -> Result<HybridForCausalLM<B, MultiScaleRetention<B>>, FlaError> {
        let (shape, layer) = self.parts()?;
        shape.init_hybrid(&self.attn, device, |_| layer.init(device))
    }

    /// The checked sizes around the mixers and the mixers' config.
    fn parts(&self) -> Result<(LmShape, MultiScaleRetentionConfig), FlaError> {
        // The gate function is `hidden_act` too in FLA's RetNet.
        check_swish("hidden_act", &self.hidden_act)?;
        if let Some(f) = &self.feature_map {
            return Err(FlaError::Unsupported(format!("RetNet feature_map {f:?}")));
        }
        if self.elementwise_affine == Some(false) {
            return Err(FlaError::Unsupported(
                "RetNet output norm without weights (elementwise_affine = false)".into(),
            ));
        }
        let layer = MultiScaleRetentionConfig::new()
            .with_hidden_size(self.hidden_size)
            .with_expand_k(self.expand_k)
            .with_expand_v(self.expand_v)
            .with_num_heads(self.num_heads)
            .with_num_kv_heads(self.num_kv_heads)
            .with_use_output_gate(self.use_output_gate)
            .with_fuse_norm(self.fuse_norm)
            .with_norm_eps(self.norm_eps)
            .with_fused_recurrent(fused_recurrent_mode(&self.attn_mode, true)?);
        let shape = lm_shape!(self);
        Ok((shape, layer))
    }
}

impl<B: GatedRecurrentBackend> crate::checkpoint::Pretrained<B> for RetNetForCausalLM<B> {
    type Config = RetNetConfig;
    const FAMILY: &'static str = "RetNet";

    fn build(config: &RetNetConfig, device: &B::Device) -> Result<Self, FlaError> {
        config.init(device)
    }
}

impl<B: GatedRecurrentBackend + AttentionBackend> crate::checkpoint::Pretrained<B>
    for HybridForCausalLM<B, MultiScaleRetention<B>>
{
    type Config = RetNetConfig;
    const FAMILY: &'static str = "RetNet";

    fn build(config: &RetNetConfig, device: &B::Device) -> Result<Self, FlaError> {
        config.init_hybrid(device)
    }
}
