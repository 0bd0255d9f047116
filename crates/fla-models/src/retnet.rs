//! FLA's `MultiScaleRetention` token mixer (RetNet, arXiv 2307.08621), with FLA's parameter
//! names, on the `retention` op.
//!
//! Per token: `q, k, v` projections (keys and values of `num_kv_heads` heads, each serving
//! `num_heads / num_kv_heads` query heads), rotary embeddings on q and k (GPT-NeoX layout, base
//! 10000, at the token's position in its sequence), retention with RetNet's fixed per-head decay
//! `1 − 2^(−5−h)`, an RMSNorm per head gated by `swish(g_proj(x))` (FLA's `g_norm_swish_gate`; a
//! plain `g_norm` without the output gate or with `fuse_norm` off), `o_proj`. FLA's RetNet blocks
//! never build short convolutions (its config's `use_short_conv` does not reach the layer), and
//! neither does this one.

use burn::config::Config;
use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::tensor::Tensor;
use fla_burn::{retention, FlaError, GatedMode, GatedRecurrentBackend, RecurrentOptions};

use crate::attn::rotary;
use crate::modules::{GatedRmsNorm, GatedRmsNormConfig, LayerCache, Project};

/// RetNet's rotary base (FLA's `RotaryEmbedding` default).
const ROTARY_BASE: f64 = 10000.0;

/// FLA's layer arguments and defaults.
#[derive(Config, Debug)]
pub struct MultiScaleRetentionConfig {
    #[config(default = 1024)]
    pub hidden_size: usize,
    #[config(default = 1.0)]
    pub expand_k: f64,
    #[config(default = 2.0)]
    pub expand_v: f64,
    #[config(default = 8)]
    pub num_heads: usize,
    /// Key/value heads (`num_heads` when absent).
    #[config(default = "None")]
    pub num_kv_heads: Option<usize>,
    #[config(default = true)]
    pub use_output_gate: bool,
    /// FLA's `fuse_norm`: only names the output norm's weight (`g_norm_swish_gate` when fused
    /// and gated, `g_norm` otherwise); the arithmetic is the same.
    #[config(default = true)]
    pub fuse_norm: bool,
    #[config(default = 1e-5)]
    pub norm_eps: f64,
    /// FLA's `mode`: `false` is `chunk` ([`GatedMode::Auto`]), `true` is `fused_recurrent`.
    #[config(default = false)]
    pub fused_recurrent: bool,
}

#[derive(Module, Debug)]
pub struct MultiScaleRetention<B: GatedRecurrentBackend> {
    pub q_proj: Linear<B>,
    pub k_proj: Linear<B>,
    pub v_proj: Linear<B>,
    pub g_proj: Option<Linear<B>>,
    pub o_proj: Linear<B>,
    /// The output norm under FLA's fused name (gated), or
    pub g_norm_swish_gate: Option<GatedRmsNorm<B>>,
    /// under its plain name (gated all the same when `g_proj` exists).
    pub g_norm: Option<GatedRmsNorm<B>>,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub fused_recurrent: bool,
}

impl MultiScaleRetentionConfig {
    pub fn kv_heads(&self) -> usize {
        self.num_kv_heads.unwrap_or(self.num_heads)
    }

    pub fn key_dim(&self) -> usize {
        (self.hidden_size as f64 * self.expand_k).round() as usize
    }

    pub fn value_dim(&self) -> usize {
        (self.hidden_size as f64 * self.expand_v).round() as usize
    }

    /// Errors when the dims do not split into heads or the heads into key/value groups.
    pub fn init<B: GatedRecurrentBackend>(
        &self,
        device: &B::Device,
    ) -> Result<MultiScaleRetention<B>, FlaError> {
        let (h, kd, vd) = (self.hidden_size, self.key_dim(), self.value_dim());
        let (nh, nkv) = (self.num_heads, self.kv_heads());
        if nh == 0 || nkv == 0 || nh % nkv != 0 {
            return Err(FlaError::Shape(format!(
                "num_kv_heads {nkv} must divide num_heads {nh}"
            )));
        }
        if kd == 0 || vd == 0 || kd % nh != 0 || vd % nh != 0 || (kd / nh) % 2 != 0 {
            return Err(FlaError::Shape(format!(
                "key dim {kd} and value dim {vd} must divide into {nh} heads (key heads of even \
                 size, for the rotary embedding)"
            )));
        }
        let (dk, dv) = (kd / nh, vd / nh);
        let linear = |a, b| LinearConfig::new(a, b).with_bias(false).init(device);
        let norm = GatedRmsNormConfig::new(dv)
            .with_eps(self.norm_eps)
            .init(device);
        let fused_name = self.use_output_gate && self.fuse_norm;
        Ok(MultiScaleRetention {
            q_proj: linear(h, kd),
            k_proj: linear(h, nkv * dk),
            v_proj: linear(h, nkv * dv),
            g_proj: self.use_output_gate.then(|| linear(h, vd)),
            o_proj: linear(vd, h),
            g_norm_swish_gate: fused_name.then(|| norm.clone()),
            g_norm: (!fused_name).then_some(norm),
            num_heads: nh,
            num_kv_heads: nkv,
            fused_recurrent: self.fused_recurrent,
        })
    }
}

impl<B: GatedRecurrentBackend> crate::lm::TokenMixer<B> for MultiScaleRetention<B> {
    type Cache = LayerCache<B>;

    fn mix(
        &self,
        x: Tensor<B, 3>,
        cache: Option<LayerCache<B>>,
        use_cache: bool,
    ) -> Result<(Tensor<B, 3>, Option<LayerCache<B>>), FlaError> {
        self.forward(x, cache, use_cache)
    }
}

/// `[B, T, G, D]` → `[B, T, G·r, D]`, each of the `G` heads repeated `r` times in place (head
/// `j` serves heads `j·r .. j·r + r`, as FLA's `repeat('... h d -> ... (h g) d')`).
fn repeat_heads<B: burn::tensor::backend::Backend>(x: Tensor<B, 4>, r: usize) -> Tensor<B, 4> {
    if r == 1 {
        return x;
    }
    let [b, t, g, d] = x.dims();
    x.unsqueeze_dim::<5>(3)
        .repeat_dim(3, r)
        .reshape([b, t, g * r, d])
}

impl<B: GatedRecurrentBackend> MultiScaleRetention<B> {
    /// `x: [B, T, hidden]` → `[B, T, hidden]`. With `cache`, continues the sequences it holds
    /// (state and position); with `use_cache`, also returns the cache for the next call.
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        cache: Option<LayerCache<B>>,
        use_cache: bool,
    ) -> Result<(Tensor<B, 3>, Option<LayerCache<B>>), FlaError> {
        let [b, t, _] = x.dims();
        let (nh, nkv) = (self.num_heads, self.num_kv_heads);
        let (state, _, seen) = LayerCache::split(cache);
        let heads = |y: Tensor<B, 3>, n: usize| {
            let d = y.dims()[2] / n;
            y.reshape([b, t, n, d])
        };
        let q = rotary(
            heads(self.q_proj.project(x.clone())?, nh),
            seen,
            ROTARY_BASE,
        );
        let k = rotary(
            heads(self.k_proj.project(x.clone())?, nkv),
            seen,
            ROTARY_BASE,
        );
        let k = repeat_heads(k, nh / nkv);
        let v = repeat_heads(heads(self.v_proj.project(x.clone())?, nkv), nh / nkv);
        let mode = if self.fused_recurrent {
            GatedMode::FusedRecurrent
        } else {
            GatedMode::Auto
        };
        let mut opts = RecurrentOptions::default().with_mode(mode);
        if let Some(s) = state {
            opts = opts.with_initial_state(s);
        }
        if use_cache {
            opts = opts.with_final_state();
        }
        let out = retention(q, k, v, None, opts)?;
        let norm = self
            .g_norm_swish_gate
            .as_ref()
            .or(self.g_norm.as_ref())
            .ok_or_else(|| {
                FlaError::Unsupported("a retention layer without its output norm".into())
            })?;
        let o = match &self.g_proj {
            Some(g) => norm.forward(out.o, heads(g.project(x)?, nh)),
            None => norm.norm.forward(out.o),
        }?;
        let vd = o.dims()[2] * o.dims()[3];
        let y = self.o_proj.project(o.reshape([b, t, vd]))?;
        let cache = out.final_state.map(|state| LayerCache {
            state,
            conv: None,
            seen: seen + t,
        });
        Ok((y, cache))
    }
}
