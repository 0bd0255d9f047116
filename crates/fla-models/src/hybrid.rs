//! Hybrid layer stacks, FLA's `attn` config field: softmax [`Attention`] in the listed layers, the
//! family's own token mixer everywhere else, under the same module names
//! (`model.layers.N.attn.q_proj`, ... in either kind of layer).
//!
//! A family's hybrid model is [`HybridForCausalLM`] over its mixer: `XConfig::init_hybrid`, and
//! `Pretrained` loads FLA's hybrid checkpoints into it (any `X` config, with or without `attn`).

use burn::module::Module;
use burn::tensor::Tensor;
use fla_burn::{AttentionBackend, FlaError};
use serde::{Deserialize, Serialize};

use crate::attn::{Attention, AttentionConfig, KvCache};
use crate::lm::{ForCausalLM, LmShape, TokenMixer};

/// One entry of FLA's `attn` field (`AttentionSpec`): the layers it takes and their attention.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttnSpec {
    pub layers: Vec<usize>,
    pub num_heads: usize,
    #[serde(default)]
    pub num_kv_heads: Option<usize>,
    #[serde(default)]
    pub qkv_bias: bool,
    #[serde(default)]
    pub window_size: Option<usize>,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
}

fn default_rope_theta() -> f64 {
    10000.0
}

/// Reads FLA's `attn` field (one spec or a list of them) and checks it as FLA does: layers in
/// range and each claimed once, positive head counts and window.
pub fn parse_attn(
    attn: &Option<serde_json::Value>,
    num_hidden_layers: usize,
) -> Result<Vec<AttnSpec>, FlaError> {
    let specs: Vec<AttnSpec> = match attn {
        None | Some(serde_json::Value::Null) => return Ok(Vec::new()),
        Some(v @ serde_json::Value::Array(_)) => serde_json::from_value(v.clone()),
        Some(v) => serde_json::from_value(v.clone()).map(|s| vec![s]),
    }
    .map_err(|e| FlaError::Unsupported(format!("attn field: {e}")))?;
    let mut claimed = vec![false; num_hidden_layers];
    for s in &specs {
        if s.num_heads == 0 || s.num_kv_heads == Some(0) || s.window_size == Some(0) {
            return Err(FlaError::Shape(format!(
                "attn spec {s:?}: heads and window must be positive"
            )));
        }
        for &l in &s.layers {
            match claimed.get_mut(l) {
                None => {
                    return Err(FlaError::Shape(format!(
                        "attn layer {l} is out of range for {num_hidden_layers} layers"
                    )))
                }
                Some(true) => {
                    return Err(FlaError::Shape(format!("attn layer {l} is listed twice")))
                }
                Some(c) => *c = true,
            }
        }
    }
    Ok(specs)
}

/// A layer's token mixer in a hybrid stack. Built once per layer and kept in the model's `Vec`,
/// so the variants' size difference costs nothing worth a `Box` (which Burn's module derive
/// would not see through).
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum Hybrid<B: AttentionBackend, M> {
    /// The family's own mixer.
    Linear(M),
    Attention(Attention<B>),
}

/// What a hybrid layer carries between calls: its mixer's cache or a key/value cache.
#[derive(Debug, Clone)]
pub enum HybridCache<B: AttentionBackend, C> {
    Linear(C),
    Attention(KvCache<B>),
}

/// A family's causal LM with softmax attention in the layers its config's `attn` lists.
pub type HybridForCausalLM<B, M> = ForCausalLM<B, Hybrid<B, M>>;

fn wrong_cache() -> FlaError {
    FlaError::Shape("a hybrid layer was given the other kind of layer's cache".into())
}

impl<B: AttentionBackend, M: TokenMixer<B> + burn::module::ModuleDisplay> TokenMixer<B>
    for Hybrid<B, M>
{
    type Cache = HybridCache<B, M::Cache>;

    fn mix(
        &self,
        x: Tensor<B, 3>,
        cache: Option<Self::Cache>,
        use_cache: bool,
    ) -> Result<(Tensor<B, 3>, Option<Self::Cache>), FlaError> {
        self.mix_bounded(x, cache, use_cache, None)
    }

    fn mix_bounded(
        &self,
        x: Tensor<B, 3>,
        cache: Option<Self::Cache>,
        use_cache: bool,
        lower_bound: Option<Tensor<B, 1>>,
    ) -> Result<(Tensor<B, 3>, Option<Self::Cache>), FlaError> {
        match self {
            Hybrid::Linear(m) => {
                let c = match cache {
                    None => None,
                    Some(HybridCache::Linear(c)) => Some(c),
                    Some(HybridCache::Attention(_)) => return Err(wrong_cache()),
                };
                let (y, c) = m.mix_bounded(x, c, use_cache, lower_bound)?;
                Ok((y, c.map(HybridCache::Linear)))
            }
            Hybrid::Attention(a) => {
                let c = match cache {
                    None => None,
                    Some(HybridCache::Attention(c)) => Some(c),
                    Some(HybridCache::Linear(_)) => return Err(wrong_cache()),
                };
                let (y, c) = a.forward(x, c, use_cache)?;
                Ok((y, c.map(HybridCache::Attention)))
            }
        }
    }
}

impl LmShape {
    /// Builds a hybrid model: FLA's `attn` specs take their layers (attention over the whole
    /// hidden size, as FLA's `Attention`), `mixer(i)` every other layer.
    pub fn init_hybrid<B: AttentionBackend, M>(
        &self,
        attn: &Option<serde_json::Value>,
        device: &B::Device,
        mut mixer: impl FnMut(usize) -> Result<M, FlaError>,
    ) -> Result<HybridForCausalLM<B, M>, FlaError> {
        let specs = parse_attn(attn, self.num_hidden_layers)?;
        self.init(device, |i| {
            match specs.iter().find(|s| s.layers.contains(&i)) {
                Some(s) => AttentionConfig::new()
                    .with_hidden_size(self.hidden_size)
                    .with_num_heads(s.num_heads)
                    .with_num_kv_heads(s.num_kv_heads)
                    .with_qkv_bias(s.qkv_bias)
                    .with_window_size(s.window_size)
                    .with_rope_theta(s.rope_theta)
                    .init(device)
                    .map(Hybrid::Attention),
                None => mixer(i).map(Hybrid::Linear),
            }
        })
    }
}
