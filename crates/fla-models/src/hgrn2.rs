//! FLA's `HGRN2Attention` token mixer (HGRN2, arXiv 2404.07904), with FLA's parameter names, on
//! the `gla` op: a forget gate `f` per key dimension, the input gate `1 − f` as the key.
//!
//! Per token: `q = silu(conv(q_proj(x)))`, `f = conv(f_proj(x))`, `i = conv(i_proj(x))` (the
//! convolutions without SiLU, optional), `g = log σ(f)`, raised by the layer's lower bound `lb`
//! (from the model's `lower_bounds`, every layer but the first): `g = log(lb + (1 − lb) e^g)`,
//! then `k = 1 − e^g`, GLA with `q, k, v = i` and log gate `g` (heads of `expand_ratio` key
//! dimensions), an RMSNorm over the whole hidden size, `o_proj`.

use burn::config::Config;
use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::tensor::activation::{log_sigmoid, silu};
use burn::tensor::Tensor;
use fla_burn::{gla, FlaError, GatedMode, GatedRecurrentBackend, RecurrentOptions};

use crate::modules::{
    check_conv_size, short_convs, GatedRmsNorm, GatedRmsNormConfig, LayerCache, Project,
    ShortConvolution, ShortConvolutionConfig,
};

/// FLA's `rms_norm_linear` default: HGRN2's output norm takes this epsilon, not the config's.
const OUTPUT_NORM_EPS: f64 = 1e-5;

/// FLA's layer arguments and defaults.
#[derive(Config, Debug)]
pub struct Hgrn2AttentionConfig {
    #[config(default = 1024)]
    pub hidden_size: usize,
    /// Key dimensions per head; the heads are `hidden_size / expand_ratio`.
    #[config(default = 128)]
    pub expand_ratio: usize,
    #[config(default = false)]
    pub use_short_conv: bool,
    #[config(default = 4)]
    pub conv_size: usize,
    #[config(default = false)]
    pub conv_bias: bool,
    /// The layer's place in the model: the first layer takes no lower bound.
    #[config(default = 0)]
    pub layer_idx: usize,
    /// FLA's `mode`: `false` is `chunk` ([`GatedMode::Auto`]), `true` is `fused_recurrent`.
    #[config(default = false)]
    pub fused_recurrent: bool,
}

#[derive(Module, Debug)]
pub struct Hgrn2Attention<B: GatedRecurrentBackend> {
    pub q_proj: Linear<B>,
    pub f_proj: Linear<B>,
    pub i_proj: Linear<B>,
    pub q_conv1d: Option<ShortConvolution<B>>,
    pub f_conv1d: Option<ShortConvolution<B>>,
    pub i_conv1d: Option<ShortConvolution<B>>,
    /// RMSNorm over the whole hidden size (its `norm`; no gate).
    pub g_norm: GatedRmsNorm<B>,
    pub o_proj: Linear<B>,
    pub num_heads: usize,
    pub layer_idx: usize,
    pub fused_recurrent: bool,
}

impl Hgrn2AttentionConfig {
    /// Errors unless `expand_ratio` divides the hidden size.
    pub fn init<B: GatedRecurrentBackend>(
        &self,
        device: &B::Device,
    ) -> Result<Hgrn2Attention<B>, FlaError> {
        let (h, e) = (self.hidden_size, self.expand_ratio);
        if e == 0 || h % e != 0 {
            return Err(FlaError::Shape(format!(
                "expand_ratio {e} must divide hidden_size {h}"
            )));
        }
        check_conv_size(self.use_short_conv, self.conv_size)?;
        let nh = h / e;
        let linear = |a, b| LinearConfig::new(a, b).with_bias(false).init(device);
        let conv = |d| {
            self.use_short_conv.then(|| {
                ShortConvolutionConfig::new(d)
                    .with_kernel_size(self.conv_size)
                    .with_bias(self.conv_bias)
                    .with_silu(false)
                    .init(device)
            })
        };
        Ok(Hgrn2Attention {
            q_proj: linear(h, nh * e),
            f_proj: linear(h, nh * e),
            i_proj: linear(h, h),
            q_conv1d: conv(nh * e),
            f_conv1d: conv(nh * e),
            i_conv1d: conv(h),
            g_norm: GatedRmsNormConfig::new(h)
                .with_eps(OUTPUT_NORM_EPS)
                .init(device),
            o_proj: linear(h, h),
            num_heads: nh,
            layer_idx: self.layer_idx,
            fused_recurrent: self.fused_recurrent,
        })
    }
}

impl<B: GatedRecurrentBackend> crate::lm::TokenMixer<B> for Hgrn2Attention<B> {
    type Cache = LayerCache<B>;

    fn mix(
        &self,
        x: Tensor<B, 3>,
        cache: Option<LayerCache<B>>,
        use_cache: bool,
    ) -> Result<(Tensor<B, 3>, Option<LayerCache<B>>), FlaError> {
        self.forward(x, cache, use_cache, None)
    }

    fn mix_bounded(
        &self,
        x: Tensor<B, 3>,
        cache: Option<LayerCache<B>>,
        use_cache: bool,
        lower_bound: Option<Tensor<B, 1>>,
    ) -> Result<(Tensor<B, 3>, Option<LayerCache<B>>), FlaError> {
        self.forward(x, cache, use_cache, lower_bound)
    }
}

impl<B: GatedRecurrentBackend> Hgrn2Attention<B> {
    /// `x: [B, T, hidden]` → `[B, T, hidden]`, with this layer's lower bound on its forget
    /// gates (`[hidden]`, values in `[0, 1)`; ignored by the first layer, as in FLA). With
    /// `cache`, continues the sequences it holds; with `use_cache`, also returns the next cache.
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        cache: Option<LayerCache<B>>,
        use_cache: bool,
        lower_bound: Option<Tensor<B, 1>>,
    ) -> Result<(Tensor<B, 3>, Option<LayerCache<B>>), FlaError> {
        let [b, t, hidden] = x.dims();
        let nh = self.num_heads;
        let (state, conv_cache, seen) = LayerCache::split(cache);
        let ([q, f, i], conv) = short_convs(
            [&self.q_conv1d, &self.f_conv1d, &self.i_conv1d],
            [
                self.q_proj.project(x.clone())?,
                self.f_proj.project(x.clone())?,
                self.i_proj.project(x)?,
            ],
            conv_cache,
        )?;
        let q = silu(q);
        let mut g = log_sigmoid(f);
        if let (Some(lb), true) = (lower_bound, self.layer_idx > 0) {
            if lb.dims()[0] != g.dims()[2] {
                return Err(FlaError::Shape(format!(
                    "HGRN2 lower bound has {} values for {} forget dimensions",
                    lb.dims()[0],
                    g.dims()[2]
                )));
            }
            // log(lb + (1 − lb)·e^g) as FLA's logaddexp(log lb, log(1 − lb) + g), stable for
            // either term dominating.
            let a = lb.clone().log().reshape([1, 1, hidden]);
            let c = lb.neg().log1p().reshape([1, 1, hidden]) + g;
            let top = a.clone().max_pair(c.clone());
            g = top + (a - c).abs().neg().exp().log1p();
        }
        let k = g.clone().exp().neg() + 1.0;
        let heads = |y: Tensor<B, 3>| {
            let d = y.dims()[2] / nh;
            y.reshape([b, t, nh, d])
        };
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
        let out = gla(heads(q), heads(k), heads(i), heads(g), None, opts)?;
        let o = self.g_norm.norm.forward(out.o.reshape([b, t, hidden]))?;
        let y = self.o_proj.project(o)?;
        let cache = out.final_state.map(|state| LayerCache {
            state,
            conv,
            seen: seen + t,
        });
        Ok((y, cache))
    }
}
