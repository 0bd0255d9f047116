//! FLA's softmax `Attention` token mixer (`fla.layers.attn.Attention`), for hybrid models and the
//! Transformer++ baseline, on the fused `parallel_attn` op: rotary position embeddings, grouped
//! key/value heads, optional query/key norms, an optional sliding window, and a key/value cache
//! for decoding.

use crate::modules::{Project, RmsNorm, RmsNormConfig};
use burn::config::Config;
use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorData};
use fla_burn::{parallel_attn, AttentionBackend, AttnOptions, FlaError};

/// FLA's layer arguments and defaults.
#[derive(Config, Debug)]
pub struct AttentionConfig {
    #[config(default = 2048)]
    pub hidden_size: usize,
    #[config(default = 32)]
    pub num_heads: usize,
    /// Key/value heads (grouped-query attention); `num_heads` when absent.
    #[config(default = "None")]
    pub num_kv_heads: Option<usize>,
    #[config(default = false)]
    pub qkv_bias: bool,
    /// RMSNorm of each head's query and key (weights of the head dim, eps 1e-5) before the
    /// rotary embedding, as FLA's `qk_norm` (Qwen3's layout).
    #[config(default = false)]
    pub qk_norm: bool,
    /// Sliding window: each token sees the last `window_size` tokens, itself included.
    #[config(default = "None")]
    pub window_size: Option<usize>,
    #[config(default = 10000.0)]
    pub rope_theta: f64,
}

/// What continues a batch of sequences: their keys and values so far (after rotary), and how
/// many tokens they have seen (the next token's position).
#[derive(Debug, Clone)]
pub struct KvCache<B: Backend> {
    pub k: Tensor<B, 4>,
    pub v: Tensor<B, 4>,
    pub seen: usize,
}

#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    pub q_proj: Linear<B>,
    pub k_proj: Linear<B>,
    pub v_proj: Linear<B>,
    pub o_proj: Linear<B>,
    pub q_norm: Option<RmsNorm<B>>,
    pub k_norm: Option<RmsNorm<B>>,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub window_size: Option<usize>,
    pub rope_theta: f64,
}

impl AttentionConfig {
    pub fn kv_heads(&self) -> usize {
        self.num_kv_heads.unwrap_or(self.num_heads)
    }

    /// Errors when the heads do not divide the hidden size or each other (FLA asserts the same).
    pub fn init<B: Backend>(&self, device: &B::Device) -> Result<Attention<B>, FlaError> {
        let (h, nh, nkv) = (self.hidden_size, self.num_heads, self.kv_heads());
        if nh == 0 || nkv == 0 || h % nh != 0 || nh % nkv != 0 {
            return Err(FlaError::Shape(format!(
                "hidden size {h} must split into {nh} heads, a multiple of {nkv} key/value heads"
            )));
        }
        if self.window_size == Some(0) {
            return Err(FlaError::Unsupported("window_size 0".into()));
        }
        let d = h / nh;
        if d % 2 != 0 {
            return Err(FlaError::Shape(format!(
                "rotary embeddings need an even head dim, got {d}"
            )));
        }
        let linear = |a, b| {
            LinearConfig::new(a, b)
                .with_bias(self.qkv_bias)
                .init(device)
        };
        Ok(Attention {
            q_proj: linear(h, nh * d),
            k_proj: linear(h, nkv * d),
            v_proj: linear(h, nkv * d),
            o_proj: LinearConfig::new(nh * d, h).with_bias(false).init(device),
            q_norm: self.qk_norm.then(|| RmsNormConfig::new(d).init(device)),
            k_norm: self.qk_norm.then(|| RmsNormConfig::new(d).init(device)),
            num_heads: nh,
            num_kv_heads: nkv,
            window_size: self.window_size,
            rope_theta: self.rope_theta,
        })
    }
}

/// Rotary embedding of `x: [B, T, H, D]` at positions `offset ..`, in FLA's (GPT-NeoX) layout:
/// the two halves of each head rotate together, `x·cos + rotate_half(x)·sin`, with
/// `θ_i = base^(−2i/D)`. Computed in f32.
pub fn rotary<B: Backend>(x: Tensor<B, 4>, offset: usize, base: f64) -> Tensor<B, 4> {
    let [_, t, _, d] = x.dims();
    let half = d / 2;
    let mut cos = Vec::with_capacity(t * d);
    let mut sin = Vec::with_capacity(t * d);
    for p in offset..offset + t {
        for j in 0..d {
            let i = j % half;
            let angle = p as f64 * base.powf(-2.0 * i as f64 / d as f64);
            cos.push(angle.cos() as f32);
            sin.push(angle.sin() as f32);
        }
    }
    let device = x.device();
    // The tables in f32, like the product they enter: created in the backend's default float
    // dtype they were half precision in a half-precision model, where Burn's fusion refuses the
    // mixed product (`DTypeMismatch`) and the cos/sin would lose their precision besides.
    let table = |v: Vec<f32>| {
        Tensor::<B, 2>::from_data(TensorData::new(v, [t, d]), (&device, DType::F32))
            .reshape([1, t, 1, d])
    };
    let dtype = x.dtype();
    let x = x.cast(burn::tensor::FloatDType::F32);
    let x1 = x.clone().narrow(3, 0, half);
    let x2 = x.clone().narrow(3, half, half);
    let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
    (x * table(cos) + rotated * table(sin)).cast(burn::tensor::FloatDType::from(dtype))
}

impl<B: AttentionBackend> crate::lm::TokenMixer<B> for Attention<B> {
    type Cache = KvCache<B>;

    fn mix(
        &self,
        x: Tensor<B, 3>,
        cache: Option<KvCache<B>>,
        use_cache: bool,
    ) -> Result<(Tensor<B, 3>, Option<KvCache<B>>), FlaError> {
        self.forward(x, cache, use_cache)
    }
}

impl<B: AttentionBackend> Attention<B> {
    /// `x: [B, T, hidden]` → `[B, T, hidden]`, causal. With `cache`, the tokens continue the
    /// sequences it holds (their keys join the cache's); with `use_cache`, also returns the cache
    /// for the next call. With a window, the cache keeps only the keys a later token can see.
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        cache: Option<KvCache<B>>,
        use_cache: bool,
    ) -> Result<(Tensor<B, 3>, Option<KvCache<B>>), FlaError> {
        let [b, t, _] = x.dims();
        let (nh, nkv) = (self.num_heads, self.num_kv_heads);
        let heads = |y: Tensor<B, 3>, n: usize| {
            let d = y.dims()[2] / n;
            y.reshape([b, t, n, d])
        };
        let norm = |y: Tensor<B, 4>, n: &Option<RmsNorm<B>>| match n {
            Some(n) => n.forward(y),
            None => Ok(y),
        };
        let seen = cache.as_ref().map_or(0, |c| c.seen);
        let q = norm(heads(self.q_proj.project(x.clone())?, nh), &self.q_norm)?;
        let k = norm(heads(self.k_proj.project(x.clone())?, nkv), &self.k_norm)?;
        let q = rotary(q, seen, self.rope_theta);
        let k = rotary(k, seen, self.rope_theta);
        let v = heads(self.v_proj.project(x)?, nkv);
        let (k, v) = match cache {
            Some(c) => (Tensor::cat(vec![c.k, k], 1), Tensor::cat(vec![c.v, v], 1)),
            None => (k, v),
        };
        let mut opts = AttnOptions::causal();
        if let Some(w) = self.window_size {
            opts = opts.with_window(w);
        }
        let o = parallel_attn(q, k.clone(), v.clone(), opts)?;
        let d = o.dims()[3];
        let y = self.o_proj.project(o.reshape([b, t, nh * d]))?;
        let cache = use_cache.then(|| {
            let total = k.dims()[1];
            // A window never looks further back than its width.
            let keep = self.window_size.map_or(total, |w| w.min(total));
            KvCache {
                k: k.narrow(1, total - keep, keep),
                v: v.narrow(1, total - keep, keep),
                seen: seen + t,
            }
        });
        Ok((y, cache))
    }
}
