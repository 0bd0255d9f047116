//! HGRN2 language model with FLA's `HGRN2Config` (`model_type: hgrn2`) and module layout:
//! [`crate::lm::ForCausalLM`] with [`Hgrn2Attention`] mixers and the model's `lower_bounds`.

use burn::module::Param;
use burn::tensor::Tensor;
use fla_burn::{AttentionBackend, FlaError, GatedRecurrentBackend};
use serde::{Deserialize, Serialize};

use crate::hgrn2::{Hgrn2Attention, Hgrn2AttentionConfig};
use crate::hybrid::HybridForCausalLM;
use crate::lm::{
    check_swish, fused_recurrent_mode, lm_shape, refuse_hybrid, ConfigError, ForCausalLM, LmShape,
};

/// FLA's `HGRN2Config` fields (same names and defaults; fields this port does not use, such as
/// the fused-kernel switches, are read and kept but change nothing).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Hgrn2Config {
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub attn_mode: String,
    /// Heads; with `expand_ratio` given, FLA's layers take `hidden_size / expand_ratio` instead.
    pub num_heads: Option<usize>,
    pub expand_ratio: Option<usize>,
    pub use_short_conv: bool,
    pub conv_size: usize,
    pub use_lower_bound: bool,
    pub hidden_ratio: Option<usize>,
    pub intermediate_size: Option<usize>,
    pub hidden_act: String,
    pub max_position_embeddings: usize,
    pub elementwise_affine: Option<bool>,
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

impl Default for Hgrn2Config {
    fn default() -> Self {
        Self {
            hidden_size: 2048,
            num_hidden_layers: 24,
            attn_mode: "chunk".into(),
            num_heads: None,
            expand_ratio: Some(128),
            use_short_conv: false,
            conv_size: 4,
            use_lower_bound: true,
            hidden_ratio: Some(4),
            intermediate_size: None,
            hidden_act: "swish".into(),
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
            model_type: "hgrn2".into(),
        }
    }
}

/// HGRN2's causal LM.
pub type Hgrn2ForCausalLM<B> = ForCausalLM<B, Hgrn2Attention<B>>;

impl Hgrn2Config {
    /// Reads FLA's `config.json`.
    pub fn load(path: impl AsRef<std::path::Path>) -> Result<Self, ConfigError> {
        crate::lm::load_config(path.as_ref(), "HGRN2")
    }

    /// Writes `config.json` with FLA's field names.
    pub fn save(&self, path: impl AsRef<std::path::Path>) -> Result<(), ConfigError> {
        crate::lm::save_config(self, path.as_ref())
    }

    /// Key dimensions per head as FLA resolves them: `expand_ratio`, else `hidden / num_heads`.
    pub fn resolved_expand_ratio(&self) -> Result<usize, FlaError> {
        match (self.expand_ratio, self.num_heads) {
            (Some(e), _) => Ok(e),
            (None, Some(n)) if n > 0 => Ok(self.hidden_size / n),
            _ => Err(FlaError::Shape(
                "HGRN2 needs expand_ratio or num_heads".into(),
            )),
        }
    }

    /// Builds the model; errors for what this port does not support (norms without weights,
    /// other activations; `attn`: see [`Self::init_hybrid`]) rather than building a different
    /// model.
    pub fn init<B: GatedRecurrentBackend>(
        &self,
        device: &B::Device,
    ) -> Result<Hgrn2ForCausalLM<B>, FlaError> {
        refuse_hybrid(&self.attn)?;
        let (shape, layer) = self.parts()?;
        let mut model = shape.init(device, |i| layer.clone().with_layer_idx(i).init(device))?;
        model.model.lower_bounds = self.lower_bounds(device);
        Ok(model)
    }

    /// The model with softmax attention in the layers `attn` lists (none without it).
    pub fn init_hybrid<B: GatedRecurrentBackend + AttentionBackend>(
        &self,
        device: &B::Device,
    ) -> Result<HybridForCausalLM<B, Hgrn2Attention<B>>, FlaError> {
        let (shape, layer) = self.parts()?;
        let mut model = shape.init_hybrid(&self.attn, device, |i| {
            layer.clone().with_layer_idx(i).init(device)
        })?;
        model.model.lower_bounds = self.lower_bounds(device);
        Ok(model)
    }

    /// FLA starts them at zero: equal shares, the bounds rising evenly with depth.
    fn lower_bounds<B: burn::tensor::backend::Backend>(
        &self,
        device: &B::Device,
    ) -> Option<Param<Tensor<B, 2>>> {
        self.use_lower_bound.then(|| {
            Param::from_tensor(Tensor::zeros(
                [self.num_hidden_layers, self.hidden_size],
                device,
            ))
        })
    }

    /// The checked sizes around the mixers and the mixers' config.
    fn parts(&self) -> Result<(LmShape, Hgrn2AttentionConfig), FlaError> {
        check_swish("hidden_act", &self.hidden_act)?;
        if self.elementwise_affine == Some(false) {
            return Err(FlaError::Unsupported(
                "HGRN2 output norm without weights (elementwise_affine = false)".into(),
            ));
        }
        let layer = Hgrn2AttentionConfig::new()
            .with_hidden_size(self.hidden_size)
            .with_expand_ratio(self.resolved_expand_ratio()?)
            .with_use_short_conv(self.use_short_conv)
            .with_conv_size(self.conv_size)
            .with_fused_recurrent(fused_recurrent_mode(&self.attn_mode, false)?);
        let shape = lm_shape!(self);
        Ok((shape, layer))
    }
}

impl<B: GatedRecurrentBackend> crate::checkpoint::Pretrained<B> for Hgrn2ForCausalLM<B> {
    type Config = Hgrn2Config;
    const FAMILY: &'static str = "HGRN2";

    fn build(config: &Hgrn2Config, device: &B::Device) -> Result<Self, FlaError> {
        config.init(device)
    }
}

impl<B: GatedRecurrentBackend + AttentionBackend> crate::checkpoint::Pretrained<B>
    for HybridForCausalLM<B, Hgrn2Attention<B>>
{
    type Config = Hgrn2Config;
    const FAMILY: &'static str = "HGRN2";

    fn build(config: &Hgrn2Config, device: &B::Device) -> Result<Self, FlaError> {
        config.init_hybrid(device)
    }
}
