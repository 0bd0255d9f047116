//! FLA's `GatedLinearAttention` token mixer (GLA, arXiv 2312.06635), with FLA's parameter names.
//!
//! Runs on the `gla` op: FLA's `chunk` mode maps to [`GatedMode::Auto`] (the form measured fastest
//! for the call; FLA's layers also step for 64 tokens and below), `fused_recurrent` to the fused
//! recurrent form. Grouped key/value heads
//! and feature maps are not supported yet and are refused.

use burn::config::Config;
use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::tensor::activation::log_sigmoid;
use burn::tensor::Tensor;
use fla_burn::{gla, FlaError, GatedMode, GatedRecurrentBackend, RecurrentOptions};

use crate::modules::{
    check_conv_size, short_convs, GatedRmsNorm, GatedRmsNormConfig, LayerCache, Project,
    ShortConvolution, ShortConvolutionConfig,
};

/// FLA's layer arguments and defaults.
#[derive(Config, Debug)]
pub struct GatedLinearAttentionConfig {
    #[config(default = 1024)]
    pub hidden_size: usize,
    #[config(default = 0.5)]
    pub expand_k: f64,
    #[config(default = 1.0)]
    pub expand_v: f64,
    #[config(default = 4)]
    pub num_heads: usize,
    #[config(default = false)]
    pub use_short_conv: bool,
    #[config(default = 4)]
    pub conv_size: usize,
    #[config(default = false)]
    pub conv_bias: bool,
    #[config(default = true)]
    pub use_output_gate: bool,
    #[config(default = 1e-5)]
    pub norm_eps: f64,
    #[config(default = 16.0)]
    pub gate_logit_normalizer: f64,
    #[config(default = 16)]
    pub gate_low_rank_dim: usize,
    /// A floor on the log gates (FLA's `clamp_min`), none by default.
    #[config(default = "None")]
    pub clamp_min: Option<f64>,
    /// FLA's `mode`: `false` is `chunk` ([`GatedMode::Auto`]), `true` is `fused_recurrent`
    /// (always step by step).
    #[config(default = false)]
    pub fused_recurrent: bool,
}

/// GLA's cache between calls: its state `[B, H, K, V]` and the convolutions' last inputs.
pub type GlaCache<B> = LayerCache<B>;

#[derive(Module, Debug)]
pub struct GatedLinearAttention<B: GatedRecurrentBackend> {
    pub q_proj: Linear<B>,
    pub k_proj: Linear<B>,
    pub v_proj: Linear<B>,
    pub g_proj: Option<Linear<B>>,
    /// FLA's `gk_proj`, a low-rank `Sequential(Linear(hidden, r), Linear(r, key_dim, bias))`.
    pub gk_proj_0: Linear<B>,
    pub gk_proj_1: Linear<B>,
    pub o_proj: Linear<B>,
    pub g_norm_swish_gate: GatedRmsNorm<B>,
    pub q_conv1d: Option<ShortConvolution<B>>,
    pub k_conv1d: Option<ShortConvolution<B>>,
    pub v_conv1d: Option<ShortConvolution<B>>,
    pub num_heads: usize,
    pub gate_logit_normalizer: f64,
    pub clamp_min: Option<f64>,
    pub fused_recurrent: bool,
}

impl GatedLinearAttentionConfig {
    pub fn key_dim(&self) -> usize {
        (self.hidden_size as f64 * self.expand_k).round() as usize
    }

    pub fn value_dim(&self) -> usize {
        (self.hidden_size as f64 * self.expand_v).round() as usize
    }

    /// Errors when the dims do not split into heads (FLA asserts the same).
    pub fn init<B: GatedRecurrentBackend>(
        &self,
        device: &B::Device,
    ) -> Result<GatedLinearAttention<B>, FlaError> {
        let (h, kd, vd) = (self.hidden_size, self.key_dim(), self.value_dim());
        if self.num_heads == 0 || kd % self.num_heads != 0 || vd % self.num_heads != 0 {
            return Err(FlaError::Shape(format!(
                "key dim {kd} and value dim {vd} must divide into {} heads",
                self.num_heads
            )));
        }
        check_conv_size(self.use_short_conv, self.conv_size)?;
        let linear = |a, b, bias| LinearConfig::new(a, b).with_bias(bias).init(device);
        let conv = |d| {
            self.use_short_conv.then(|| {
                ShortConvolutionConfig::new(d)
                    .with_kernel_size(self.conv_size)
                    .with_bias(self.conv_bias)
                    .init(device)
            })
        };
        Ok(GatedLinearAttention {
            q_proj: linear(h, kd, false),
            k_proj: linear(h, kd, false),
            v_proj: linear(h, vd, false),
            g_proj: self.use_output_gate.then(|| linear(h, vd, false)),
            gk_proj_0: linear(h, self.gate_low_rank_dim, false),
            gk_proj_1: linear(self.gate_low_rank_dim, kd, true),
            o_proj: linear(vd, h, false),
            g_norm_swish_gate: GatedRmsNormConfig::new(vd / self.num_heads)
                .with_eps(self.norm_eps)
                .init(device),
            q_conv1d: conv(kd),
            k_conv1d: conv(kd),
            v_conv1d: conv(vd),
            num_heads: self.num_heads,
            gate_logit_normalizer: self.gate_logit_normalizer,
            clamp_min: self.clamp_min,
            fused_recurrent: self.fused_recurrent,
        })
    }
}

impl<B: GatedRecurrentBackend> crate::lm::TokenMixer<B> for GatedLinearAttention<B> {
    type Cache = GlaCache<B>;

    fn mix(
        &self,
        x: Tensor<B, 3>,
        cache: Option<GlaCache<B>>,
        use_cache: bool,
    ) -> Result<(Tensor<B, 3>, Option<GlaCache<B>>), FlaError> {
        self.forward(x, cache, use_cache)
    }
}

impl<B: GatedRecurrentBackend> GatedLinearAttention<B> {
    /// `x: [B, T, hidden]` → `[B, T, hidden]`. With `cache`, continues the sequences it holds;
    /// with `use_cache`, also returns the cache for the next call (prompt, then decoding steps).
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        cache: Option<GlaCache<B>>,
        use_cache: bool,
    ) -> Result<(Tensor<B, 3>, Option<GlaCache<B>>), FlaError> {
        let [b, t, _] = x.dims();
        let nh = self.num_heads;
        let (state, conv_cache, seen) = LayerCache::split(cache);
        let ([q, k, v], conv) = short_convs(
            [&self.q_conv1d, &self.k_conv1d, &self.v_conv1d],
            [
                self.q_proj.project(x.clone())?,
                self.k_proj.project(x.clone())?,
                self.v_proj.project(x.clone())?,
            ],
            conv_cache,
        )?;
        let gk = self.gk_proj_1.project(self.gk_proj_0.project(x.clone())?)?;
        let heads = |y: Tensor<B, 3>| {
            let d = y.dims()[2] / nh;
            y.reshape([b, t, nh, d])
        };
        let mut gk = log_sigmoid(heads(gk)) / self.gate_logit_normalizer;
        if let Some(floor) = self.clamp_min {
            gk = gk.clamp_min(floor);
        }
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
        let out = gla(heads(q), heads(k), heads(v), gk, None, opts)?;
        let o = match &self.g_proj {
            Some(g) => self.g_norm_swish_gate.forward(out.o, heads(g.project(x)?)),
            None => self.g_norm_swish_gate.norm.forward(out.o),
        }?;
        let vd = o.dims()[2] * o.dims()[3];
        let y = self.o_proj.project(o.reshape([b, t, vd]))?;
        let cache = out.final_state.map(|state| LayerCache {
            state,
            conv,
            seen: seen + t,
        });
        Ok((y, cache))
    }
}
