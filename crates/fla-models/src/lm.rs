//! The causal language model shared by every family: FLA's module layout (`model.embeddings`,
//! `model.layers.N.{attn_norm, attn, mlp_norm, mlp}`, `model.norm`, `lm_head`) around any token
//! mixer.
//!
//! Pre-norm blocks, `h += attn(norm(h)); h += mlp(norm(h))`, as FLA's blocks. A family's model
//! (`GlaForCausalLM`, `GatedDeltaNetForCausalLM`) is this type with its mixer.

use burn::module::{Module, Param};
use burn::nn::{Embedding, EmbeddingConfig, Linear, LinearConfig};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};
use fla_burn::{cross_entropy_mean, embedding, linear, FlaError, LayerBackend};

use crate::modules::{GatedMlp, GatedMlpConfig, Project, RmsNorm, RmsNormConfig};

/// A token-mixing layer: a whole sequence, or a continuation from the cache of an earlier call.
pub trait TokenMixer<B: LayerBackend>: Module<B> {
    /// What carries a batch of sequences from one call to the next (recurrent state, conv inputs).
    type Cache: Clone + std::fmt::Debug;

    /// `x: [B, T, hidden]` → `[B, T, hidden]`; with `use_cache`, also the cache that continues it.
    fn mix(
        &self,
        x: Tensor<B, 3>,
        cache: Option<Self::Cache>,
        use_cache: bool,
    ) -> Result<(Tensor<B, 3>, Option<Self::Cache>), FlaError>;

    /// [`Self::mix`] with this layer's row of the model's `lower_bounds` (HGRN2's floor on its
    /// forget gates); mixers without one ignore it.
    fn mix_bounded(
        &self,
        x: Tensor<B, 3>,
        cache: Option<Self::Cache>,
        use_cache: bool,
        lower_bound: Option<Tensor<B, 1>>,
    ) -> Result<(Tensor<B, 3>, Option<Self::Cache>), FlaError> {
        let _ = lower_bound;
        self.mix(x, cache, use_cache)
    }
}

#[derive(Module, Debug)]
pub struct Block<B: Backend, M> {
    pub attn_norm: RmsNorm<B>,
    pub attn: M,
    pub mlp_norm: RmsNorm<B>,
    pub mlp: GatedMlp<B>,
}

#[derive(Module, Debug)]
pub struct Model<B: Backend, M> {
    pub embeddings: Embedding<B>,
    pub layers: Vec<Block<B, M>>,
    pub norm: RmsNorm<B>,
    /// HGRN2's `[layers, hidden]` lower bounds of the forget gates (FLA's `model.lower_bounds`);
    /// absent in the other families.
    pub lower_bounds: Option<Param<Tensor<B, 2>>>,
}

#[derive(Module, Debug)]
pub struct ForCausalLM<B: Backend, M> {
    pub model: Model<B, M>,
    /// Absent with `tie_word_embeddings`: the embedding matrix projects back.
    pub lm_head: Option<Linear<B>>,
}

/// The [`LmShape`] of a family's config: every FLA config names these fields alike.
macro_rules! lm_shape {
    ($config:expr) => {
        $crate::lm::LmShape {
            hidden_size: $config.hidden_size,
            vocab_size: $config.vocab_size,
            num_hidden_layers: $config.num_hidden_layers,
            hidden_ratio: $config.hidden_ratio,
            intermediate_size: $config.intermediate_size,
            norm_eps: $config.norm_eps,
            tie_word_embeddings: $config.tie_word_embeddings,
        }
    };
}
pub(crate) use lm_shape;

/// The sizes of the parts around the mixers (FLA's config fields of the same names).
#[derive(Debug, Clone)]
pub struct LmShape {
    pub hidden_size: usize,
    pub vocab_size: usize,
    pub num_hidden_layers: usize,
    pub hidden_ratio: Option<usize>,
    pub intermediate_size: Option<usize>,
    pub norm_eps: f64,
    pub tie_word_embeddings: bool,
}

impl LmShape {
    /// Builds the model with `mixer(i)` as layer `i`'s token mixer.
    pub fn init<B: Backend, M>(
        &self,
        device: &B::Device,
        mut mixer: impl FnMut(usize) -> Result<M, FlaError>,
    ) -> Result<ForCausalLM<B, M>, FlaError> {
        let h = self.hidden_size;
        let norm = || RmsNormConfig::new(h).with_eps(self.norm_eps).init(device);
        let mlp = GatedMlpConfig::new(h)
            .with_intermediate_size(self.intermediate_size)
            .with_hidden_ratio(self.hidden_ratio.unwrap_or(4));
        let layers = (0..self.num_hidden_layers)
            .map(|i| {
                Ok(Block {
                    attn_norm: norm(),
                    attn: mixer(i)?,
                    mlp_norm: norm(),
                    mlp: mlp.init(device),
                })
            })
            .collect::<Result<Vec<_>, FlaError>>()?;
        Ok(ForCausalLM {
            model: Model {
                embeddings: EmbeddingConfig::new(self.vocab_size, h).init(device),
                layers,
                norm: norm(),
                lower_bounds: None,
            },
            lm_head: (!self.tie_word_embeddings).then(|| {
                LinearConfig::new(h, self.vocab_size)
                    .with_bias(false)
                    .init(device)
            }),
        })
    }
}

/// Applies a per-token map to `[B, T, D]` as one `[B·T, D]` matrix. One plain matmul rather
/// than a broadcast batched one; and on Burn 0.21's fused wgpu backend the batched form gave
/// wrong rows for `B > 1, T = 1` (decoding a batch) when fused with the residual add, which
/// the 2-d form avoids (`tests/models/parity.rs`, token by token on wgpu, checks it).
fn tokens_2d<B: Backend>(
    x: Tensor<B, 3>,
    f: impl FnOnce(Tensor<B, 2>) -> Result<Tensor<B, 2>, FlaError>,
) -> Result<Tensor<B, 3>, FlaError> {
    let [b, t, d] = x.dims();
    let y = f(x.reshape([b * t, d]))?;
    let e = y.dims()[1];
    Ok(y.reshape([b, t, e]))
}

/// HGRN2's per-layer bounds from `lower_bounds: [L, D]`: a softmax over the layers, cumulated,
/// less the first layer's share (so the first layer's bound is 0 and they grow with depth).
fn layer_bounds<B: Backend>(lower_bounds: Tensor<B, 2>) -> Tensor<B, 2> {
    let lb = burn::tensor::activation::softmax(lower_bounds, 0).cumsum(0);
    let first = lb.clone().narrow(0, 0, 1);
    lb - first
}

/// Logits `[B, T, vocab]` and, when asked, the per-layer caches that continue the sequences.
pub type LmOutput<B, C> = Result<(Tensor<B, 3>, Option<Vec<C>>), FlaError>;

impl<B: LayerBackend, M: TokenMixer<B>> ForCausalLM<B, M> {
    /// Errors unless every id is in `0..vocab_size`: on a GPU an id past the embedding table
    /// reads another row silently, on the CPU it panics. One readback of the ids' least and
    /// greatest (a device sync).
    pub fn check_ids(&self, input_ids: &Tensor<B, 2, Int>) -> Result<(), FlaError> {
        if input_ids.shape().num_elements() == 0 {
            return Ok(());
        }
        let vocab = self.model.embeddings.weight.dims()[0] as i64;
        let ends = Tensor::cat(
            vec![
                input_ids.clone().min().reshape([1]),
                input_ids.clone().max().reshape([1]),
            ],
            0,
        )
        .into_data()
        .convert::<i64>()
        .to_vec::<i64>()
        .map_err(|e| FlaError::DType(format!("token ids: {e:?}")))?;
        match ends[..] {
            [lo, hi] if lo >= 0 && hi < vocab => Ok(()),
            [lo, hi] => Err(FlaError::Shape(format!(
                "token ids span {lo}..={hi}, outside the vocabulary 0..{vocab}"
            ))),
            _ => unreachable!("two values read back"),
        }
    }

    /// `input_ids: [B, T]` → logits `[B, T, vocab]`; with `use_cache`, also the per-layer caches
    /// that continue these sequences (pass them back with the next tokens). Ids outside the
    /// vocabulary are an error ([`Self::check_ids`]).
    pub fn forward(
        &self,
        input_ids: Tensor<B, 2, Int>,
        cache: Option<Vec<M::Cache>>,
        use_cache: bool,
    ) -> LmOutput<B, M::Cache> {
        self.check_ids(&input_ids)?;
        self.forward_checked_ids(input_ids, cache, use_cache)
    }

    /// [`Self::forward`] without the ids' readback, for ids the caller has already checked
    /// (built on the host from a tokeniser's output, or drawn from the model's own logits).
    pub fn forward_checked_ids(
        &self,
        input_ids: Tensor<B, 2, Int>,
        cache: Option<Vec<M::Cache>>,
        use_cache: bool,
    ) -> LmOutput<B, M::Cache> {
        if let Some(c) = &cache {
            if c.len() != self.model.layers.len() {
                return Err(FlaError::Shape(format!(
                    "{} layer caches for a model of {} layers",
                    c.len(),
                    self.model.layers.len()
                )));
            }
        }
        // The lookup through fla-burn for its backward (Burn's is one unit per table column).
        let mut h = embedding(self.model.embeddings.weight.val(), input_ids)?;
        let mut caches = cache.map(|c| c.into_iter().map(Some).collect::<Vec<_>>());
        let mut next = Vec::new();
        let bounds = self
            .model
            .lower_bounds
            .as_ref()
            .map(|lb| layer_bounds(lb.val()));
        for (i, layer) in self.model.layers.iter().enumerate() {
            let c = caches
                .as_mut()
                .and_then(|c| c.get_mut(i).and_then(Option::take));
            let bound = bounds.as_ref().map(|lb| {
                let d = lb.dims()[1];
                lb.clone().narrow(0, i, 1).reshape([d])
            });
            let (a, c) =
                layer
                    .attn
                    .mix_bounded(layer.attn_norm.forward(h.clone())?, c, use_cache, bound)?;
            h = h + a;
            h = h.clone() + tokens_2d(h, |x| layer.mlp.forward(layer.mlp_norm.forward(x)?))?;
            next.extend(c);
        }
        let h = self.model.norm.forward(h)?;
        let logits = match &self.lm_head {
            Some(head) => tokens_2d(h, |x| head.project(x))?,
            None => {
                let w = self.model.embeddings.weight.val();
                tokens_2d(h, |x| linear(x, w.transpose(), None))?
            }
        };
        Ok((logits, use_cache.then_some(next)))
    }

    /// Mean next-token cross-entropy of `input_ids: [B, T]` (T >= 2). Ids outside the
    /// vocabulary are an error ([`Self::check_ids`]).
    pub fn loss(&self, input_ids: Tensor<B, 2, Int>) -> Result<Tensor<B, 1>, FlaError> {
        self.check_ids(&input_ids)?;
        self.loss_checked_ids(input_ids)
    }

    /// [`Self::loss`] without the ids' readback (a device sync a step), for batches whose ids
    /// the caller checked on the host.
    pub fn loss_checked_ids(&self, input_ids: Tensor<B, 2, Int>) -> Result<Tensor<B, 1>, FlaError> {
        let [b, t] = input_ids.dims();
        if t < 2 {
            return Err(FlaError::Empty(
                "a loss needs at least two tokens per row".into(),
            ));
        }
        let (logits, _) =
            self.forward_checked_ids(input_ids.clone().narrow(1, 0, t - 1), None, false)?;
        let vocab = logits.dims()[2];
        let targets = input_ids.narrow(1, 1, t - 1).reshape([b * (t - 1)]);
        // Fused (FLA's fuse_cross_entropy): the softmax over the vocabulary in f32 whatever the
        // logits' dtype, read once, and no f32 copy of the logits kept for the backward.
        let loss = cross_entropy_mean(logits.reshape([b * (t - 1), vocab]), targets)?;
        Ok(loss)
    }
}

/// Why a `config.json` could not be read or written.
#[derive(Debug, Clone, PartialEq)]
pub enum ConfigError {
    Io(String, String),
    /// The file, the family expected and why it does not parse.
    Parse(String, &'static str, String),
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConfigError::Io(p, e) => write!(f, "cannot access {p}: {e}"),
            ConfigError::Parse(p, family, e) => write!(f, "{p} is not a {family} config: {e}"),
        }
    }
}

impl std::error::Error for ConfigError {}

/// Reads one of FLA's `config.json` files into `T` (absent fields take `T`'s defaults).
pub fn load_config<T: serde::de::DeserializeOwned>(
    path: &std::path::Path,
    family: &'static str,
) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::Io(path.display().to_string(), e.to_string()))?;
    serde_json::from_str(&text)
        .map_err(|e| ConfigError::Parse(path.display().to_string(), family, e.to_string()))
}

/// Writes a config with FLA's field names.
pub fn save_config<T: serde::Serialize>(
    config: &T,
    path: &std::path::Path,
) -> Result<(), ConfigError> {
    let text = serde_json::to_string_pretty(config).expect("a config serialises");
    std::fs::write(path, text)
        .map_err(|e| ConfigError::Io(path.display().to_string(), e.to_string()))
}

/// FLA's `attn_mode`: `chunk` (and `fused_chunk` where the family had it) runs the form measured
/// fastest for each call (`false`), `fused_recurrent` always steps token by token (`true`).
pub fn fused_recurrent_mode(attn_mode: &str, fused_chunk: bool) -> Result<bool, FlaError> {
    match attn_mode {
        "chunk" => Ok(false),
        "fused_chunk" if fused_chunk => Ok(false),
        "fused_recurrent" => Ok(true),
        other => Err(FlaError::Unsupported(format!(
            "attn_mode {other:?} (expected chunk{} or fused_recurrent)",
            if fused_chunk { ", fused_chunk" } else { "" }
        ))),
    }
}

/// The MLP is SwiGLU and the output gates swish: other activations are refused, naming `field`.
pub fn check_swish(field: &str, value: &str) -> Result<(), FlaError> {
    if matches!(value, "swish" | "silu") {
        Ok(())
    } else {
        Err(FlaError::Unsupported(format!(
            "{field} {value:?} (only swish/silu is built)"
        )))
    }
}

/// A config with FLA's `attn` field (softmax attention in some layers) builds a hybrid model
/// (`init_hybrid`, [`crate::hybrid::HybridForCausalLM`]), not the plain one.
pub fn refuse_hybrid(attn: &Option<serde_json::Value>) -> Result<(), FlaError> {
    match attn {
        Some(a) if !a.is_null() => Err(FlaError::Unsupported(
            "hybrid attention layers (`attn`): build the hybrid model (init_hybrid, \
             HybridForCausalLM)"
                .into(),
        )),
        _ => Ok(()),
    }
}
