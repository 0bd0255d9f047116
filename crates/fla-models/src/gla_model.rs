//! GLA language model with FLA's `GLAConfig` and module layout (`model.embeddings`,
//! `model.layers.N.{attn_norm, attn, mlp_norm, mlp}`, `model.norm`, `lm_head`).
//!
//! Pre-norm blocks, `h += attn(norm(h)); h += mlp(norm(h))`, as FLA's `GLABlock`. Runs the
//! recurrent op; chunk mode, checkpoints in FLA's safetensors layout and generation are open work.

use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::{Embedding, EmbeddingConfig, Linear, LinearConfig, RmsNorm, RmsNormConfig};
use burn::tensor::{Int, Tensor};
use fla_burn::{FlaError, GatedRecurrentBackend};
use serde::{Deserialize, Serialize};

use crate::gla::{GatedLinearAttention, GatedLinearAttentionConfig, GlaCache};
use crate::modules::{GatedMlp, GatedMlpConfig};

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
        }
    }
}

impl GlaConfig {
    /// Reads FLA's `config.json`.
    pub fn load(path: impl AsRef<std::path::Path>) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::Io(path.display().to_string(), e.to_string()))?;
        serde_json::from_str(&text)
            .map_err(|e| ConfigError::Parse(path.display().to_string(), e.to_string()))
    }

    /// Writes `config.json` with FLA's field names.
    pub fn save(&self, path: impl AsRef<std::path::Path>) -> Result<(), ConfigError> {
        let path = path.as_ref();
        let text = serde_json::to_string_pretty(self).expect("a config serialises");
        std::fs::write(path, text)
            .map_err(|e| ConfigError::Io(path.display().to_string(), e.to_string()))
    }
}

/// Why a `config.json` could not be read or written.
#[derive(Debug, Clone, PartialEq)]
pub enum ConfigError {
    Io(String, String),
    Parse(String, String),
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConfigError::Io(p, e) => write!(f, "cannot access {p}: {e}"),
            ConfigError::Parse(p, e) => write!(f, "{p} is not a GLA config: {e}"),
        }
    }
}

impl std::error::Error for ConfigError {}

#[derive(Module, Debug)]
pub struct GlaBlock<B: GatedRecurrentBackend> {
    pub attn_norm: RmsNorm<B>,
    pub attn: GatedLinearAttention<B>,
    pub mlp_norm: RmsNorm<B>,
    pub mlp: GatedMlp<B>,
}

#[derive(Module, Debug)]
pub struct GlaModel<B: GatedRecurrentBackend> {
    pub embeddings: Embedding<B>,
    pub layers: Vec<GlaBlock<B>>,
    pub norm: RmsNorm<B>,
}

#[derive(Module, Debug)]
pub struct GlaForCausalLM<B: GatedRecurrentBackend> {
    pub model: GlaModel<B>,
    /// Absent with `tie_word_embeddings`: the embedding matrix projects back.
    pub lm_head: Option<Linear<B>>,
}

impl GlaConfig {
    /// Errors for options this port does not support yet (grouped heads, value gates, no key
    /// gate) rather than building a different model.
    pub fn init<B: GatedRecurrentBackend>(
        &self,
        device: &B::Device,
    ) -> Result<GlaForCausalLM<B>, FlaError> {
        if self.num_kv_heads.is_some_and(|n| n != self.num_heads) {
            return Err(FlaError::Unsupported("num_kv_heads != num_heads".into()));
        }
        if self.use_gv || !self.use_gk {
            return Err(FlaError::Unsupported(
                "GLA layers without gk or with gv".into(),
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
        let h = self.hidden_size;
        let norm = || {
            RmsNormConfig::new(h)
                .with_epsilon(self.norm_eps)
                .init(device)
        };
        let attn = GatedLinearAttentionConfig::new()
            .with_hidden_size(h)
            .with_expand_k(self.expand_k)
            .with_expand_v(self.expand_v)
            .with_num_heads(self.num_heads)
            .with_use_short_conv(self.use_short_conv)
            .with_conv_size(self.conv_size)
            .with_use_output_gate(self.use_output_gate)
            .with_norm_eps(self.norm_eps)
            .with_fused_recurrent(fused_recurrent);
        let mlp = GatedMlpConfig::new(h)
            .with_intermediate_size(self.intermediate_size)
            .with_hidden_ratio(self.hidden_ratio.unwrap_or(4));
        let layers = (0..self.num_hidden_layers)
            .map(|_| {
                Ok(GlaBlock {
                    attn_norm: norm(),
                    attn: attn.init(device)?,
                    mlp_norm: norm(),
                    mlp: mlp.init(device),
                })
            })
            .collect::<Result<Vec<_>, FlaError>>()?;
        Ok(GlaForCausalLM {
            model: GlaModel {
                embeddings: EmbeddingConfig::new(self.vocab_size, h).init(device),
                layers,
                norm: norm(),
            },
            lm_head: (!self.tie_word_embeddings).then(|| {
                LinearConfig::new(h, self.vocab_size)
                    .with_bias(false)
                    .init(device)
            }),
        })
    }
}

/// Per-layer recurrent caches of a batch of sequences, for decoding.
pub type GlaModelCache<B> = Vec<GlaCache<B>>;

impl<B: GatedRecurrentBackend> GlaForCausalLM<B> {
    /// `input_ids: [B, T]` → logits `[B, T, vocab]`; with `use_cache`, also the caches that continue
    /// these sequences (pass them back with the next tokens).
    pub fn forward(
        &self,
        input_ids: Tensor<B, 2, Int>,
        cache: Option<GlaModelCache<B>>,
        use_cache: bool,
    ) -> Result<(Tensor<B, 3>, Option<GlaModelCache<B>>), FlaError> {
        let mut h = self.model.embeddings.forward(input_ids);
        let mut caches = cache.map(|c| c.into_iter().map(Some).collect::<Vec<_>>());
        let mut next = Vec::new();
        for (i, layer) in self.model.layers.iter().enumerate() {
            let c = caches
                .as_mut()
                .and_then(|c| c.get_mut(i).and_then(Option::take));
            let (a, c) = layer
                .attn
                .forward(layer.attn_norm.forward(h.clone()), c, use_cache)?;
            h = h + a;
            h = h.clone() + layer.mlp.forward(layer.mlp_norm.forward(h));
            next.extend(c);
        }
        let h = self.model.norm.forward(h);
        let logits = match &self.lm_head {
            Some(head) => head.forward(h),
            None => {
                let w = self.model.embeddings.weight.val();
                h.matmul(w.transpose().unsqueeze::<3>())
            }
        };
        Ok((logits, use_cache.then_some(next)))
    }

    /// Mean next-token cross-entropy of `input_ids: [B, T]` (T >= 2).
    pub fn loss(&self, input_ids: Tensor<B, 2, Int>) -> Result<Tensor<B, 1>, FlaError> {
        let [b, t] = input_ids.dims();
        if t < 2 {
            return Err(FlaError::Empty(
                "a loss needs at least two tokens per row".into(),
            ));
        }
        let (logits, _) = self.forward(input_ids.clone().narrow(1, 0, t - 1), None, false)?;
        let vocab = logits.dims()[2];
        let targets = input_ids.narrow(1, 1, t - 1).reshape([b * (t - 1)]);
        let loss = CrossEntropyLossConfig::new()
            .init(&logits.device())
            .forward(logits.reshape([b * (t - 1), vocab]), targets);
        Ok(loss)
    }
}
