//! GLA language model with FLA's `GLAConfig` and module layout (`model.embeddings`,
//! `model.layers.N.{attn_norm, attn, mlp_norm, mlp}`, `model.norm`, `lm_head`).
//!
//! The model is [`crate::lm::ForCausalLM`] with GLA mixers; [`Pretrained`] loads and saves
//! FLA's `config.json` + `model.safetensors` directories.

use fla_burn::{AttentionBackend, FlaError, GatedRecurrentBackend};
use serde::{Deserialize, Serialize};

use crate::checkpoint::Pretrained;
use crate::gla::{GatedLinearAttention, GatedLinearAttentionConfig, GlaCache};
use crate::hybrid::HybridForCausalLM;
pub use crate::lm::ConfigError;
use crate::lm::{lm_shape, refuse_hybrid, ForCausalLM, LmShape};

/// FLA's `GLAConfig` fields (same names and defaults, so `config.json` files read as they are;
/// absent fields take FLA's defaults, fields this port does not use yet are ignored).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct GlaConfig {
    pub hidden_size: usize,
    pub expand_k: f64,
    pub expand_v: f64,
    pub hidden_ratio: Option<usize>,
    pub intermediate_size: Option<usize>,
    pub num_hidden_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: Option<usize>,
    pub attn_mode: String,
    pub use_short_conv: bool,
    pub conv_size: usize,
    pub use_output_gate: bool,
    pub norm_eps: f64,
    pub use_gk: bool,
    pub use_gv: bool,
    pub tie_word_embeddings: bool,
    pub vocab_size: usize,
    pub bos_token_id: usize,
    pub eos_token_id: usize,
    pub clamp_min: Option<f64>,
    pub feature_map: Option<String>,
    pub hidden_act: String,
    pub elementwise_affine: Option<bool>,
    pub model_type: String,
    /// Softmax attention in some layers (FLA's hybrid models): see [`Self::init_hybrid`].
    pub attn: Option<serde_json::Value>,
}

impl Default for GlaConfig {
    fn default() -> Self {
        Self {
            hidden_size: 2048,
            expand_k: 0.5,
            expand_v: 1.0,
            hidden_ratio: Some(4),
            intermediate_size: None,
            num_hidden_layers: 24,
            num_heads: 4,
            num_kv_heads: None,
            attn_mode: "chunk".into(),
            use_short_conv: false,
            conv_size: 4,
            use_output_gate: true,
            norm_eps: 1e-6,
            use_gk: true,
            use_gv: false,
            tie_word_embeddings: false,
            vocab_size: 32000,
            bos_token_id: 1,
            eos_token_id: 2,
            clamp_min: None,
            feature_map: None,
            hidden_act: "swish".into(),
            elementwise_affine: Some(true),
            model_type: "gla".into(),
            attn: None,
        }
    }
}

impl GlaConfig {
    /// Reads FLA's `config.json`.
    pub fn load(path: impl AsRef<std::path::Path>) -> Result<Self, ConfigError> {
        crate::lm::load_config(path.as_ref(), "GLA")
    }

    /// Writes `config.json` with FLA's field names.
    pub fn save(&self, path: impl AsRef<std::path::Path>) -> Result<(), ConfigError> {
        crate::lm::save_config(self, path.as_ref())
    }
}

/// GLA's causal LM: the shared model around [`GatedLinearAttention`] mixers.
pub type GlaForCausalLM<B> = ForCausalLM<B, GatedLinearAttention<B>>;

/// Per-layer recurrent caches of a batch of sequences, for decoding.
pub type GlaModelCache<B> = Vec<GlaCache<B>>;

impl GlaConfig {
    /// Errors for options this port does not support yet (grouped heads, value gates, no key
    /// gate, `attn`: see [`Self::init_hybrid`]) rather than building a different model.
    pub fn init<B: GatedRecurrentBackend>(
        &self,
        device: &B::Device,
    ) -> Result<GlaForCausalLM<B>, FlaError> {
        refuse_hybrid(&self.attn)?;
        let (shape, attn) = self.parts()?;
        shape.init(device, |_| attn.init(device))
    }

    /// The model with softmax attention in the layers `attn` lists (none without it).
    pub fn init_hybrid<B: GatedRecurrentBackend + AttentionBackend>(
        &self,
        device: &B::Device,
    ) -> Result<HybridForCausalLM<B, GatedLinearAttention<B>>, FlaError> {
        let (shape, attn) = self.parts()?;
        shape.init_hybrid(&self.attn, device, |_| attn.init(device))
    }

    /// The checked sizes around the mixers and the mixers' config.
    fn parts(&self) -> Result<(LmShape, GatedLinearAttentionConfig), FlaError> {
        if self.num_kv_heads.is_some_and(|n| n != self.num_heads) {
            return Err(FlaError::Unsupported("num_kv_heads != num_heads".into()));
        }
        if self.use_gv || !self.use_gk {
            return Err(FlaError::Unsupported(
                "GLA layers without gk or with gv".into(),
            ));
        }
        if let Some(f) = &self.feature_map {
            return Err(FlaError::Unsupported(format!("GLA feature_map {f:?}")));
        }
        if !matches!(self.hidden_act.as_str(), "swish" | "silu") {
            return Err(FlaError::Unsupported(format!(
                "hidden_act {:?} (the MLP is SwiGLU and the output gate swish)",
                self.hidden_act
            )));
        }
        if self.elementwise_affine == Some(false) {
            return Err(FlaError::Unsupported(
                "GLA output norm without weights (elementwise_affine = false)".into(),
            ));
        }
        let fused_recurrent = match self.attn_mode.as_str() {
            "chunk" | "fused_chunk" => false,
            "fused_recurrent" => true,
            other => {
                return Err(FlaError::Unsupported(format!(
                    "attn_mode {other:?} (expected chunk, fused_chunk or fused_recurrent)"
                )))
            }
        };
        let attn = GatedLinearAttentionConfig::new()
            .with_hidden_size(self.hidden_size)
            .with_expand_k(self.expand_k)
            .with_expand_v(self.expand_v)
            .with_num_heads(self.num_heads)
            .with_use_short_conv(self.use_short_conv)
            .with_conv_size(self.conv_size)
            .with_use_output_gate(self.use_output_gate)
            .with_norm_eps(self.norm_eps)
            .with_clamp_min(self.clamp_min)
            .with_fused_recurrent(fused_recurrent);
        let shape = lm_shape!(self);
        Ok((shape, attn))
    }
}

impl<B: GatedRecurrentBackend> Pretrained<B> for GlaForCausalLM<B> {
    type Config = GlaConfig;
    const FAMILY: &'static str = "GLA";

    fn build(config: &GlaConfig, device: &B::Device) -> Result<Self, FlaError> {
        config.init(device)
    }
}

impl<B: GatedRecurrentBackend + AttentionBackend> Pretrained<B>
    for HybridForCausalLM<B, GatedLinearAttention<B>>
{
    type Config = GlaConfig;
    const FAMILY: &'static str = "GLA";

    fn build(config: &GlaConfig, device: &B::Device) -> Result<Self, FlaError> {
        config.init_hybrid(device)
    }
}
