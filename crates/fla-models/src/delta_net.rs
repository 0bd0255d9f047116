//! FLA's `DeltaNet` token mixer (DeltaNet, arXiv 2406.06484), with FLA's parameter names, on the
//! `delta_rule` op.
//!
//! Per token: `q, k = act(conv(proj(x)))` (the convolution's SiLU when `qk_activation` is SiLU,
//! else ReLU, ELU+1 or nothing after it), `v = silu(conv(v_proj(x)))` whatever `qk_activation` is
//! (as FLA does), `q, k` normalised per head (L2 inside the op, FLA's in-kernel form, or by their
//! L1 norm), `β = sigmoid(b_proj(x))` (or 1 without `use_beta`; ×2 with `allow_neg_eigval`), the
//! delta rule, an RMSNorm per head (gated by `swish(g_proj(x))` with `use_gate`), `o_proj`.

use burn::config::Config;
use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::tensor::activation::{relu, sigmoid, silu};
use burn::tensor::Tensor;
use fla_burn::{delta_rule, DeltaMode, DeltaRuleBackend, DeltaRuleOptions, FlaError};
use serde::{Deserialize, Serialize};

use crate::modules::{
    check_conv_size, short_convs, GatedRmsNorm, GatedRmsNormConfig, LayerCache, Project,
    ShortConvolution, ShortConvolutionConfig,
};

/// What is applied to q and k after their projection (FLA's `qk_activation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QkActivation {
    Silu,
    Relu,
    /// `elu(x) + 1` (FLA's `elu_p1`): positive features.
    Elu,
    Identity,
}

/// How q and k are normalised per head (FLA's `qk_norm`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QkNorm {
    /// `x / sqrt(‖x‖² + 1e-6)`, inside the op.
    L2,
    /// `x / max(‖x‖₁, 1e-6)`.
    Sum,
}

impl QkActivation {
    /// FLA's name (`silu`, `relu`, `elu`, `identity`), or an error naming the value.
    pub fn parse(name: &str) -> Result<Self, FlaError> {
        serde_json::from_value(serde_json::Value::String(name.into())).map_err(|_| {
            FlaError::Unsupported(format!(
                "qk_activation {name:?} (expected silu, relu, elu or identity)"
            ))
        })
    }
}

impl QkNorm {
    /// FLA's name (`l2`, `sum`), or an error naming the value.
    pub fn parse(name: &str) -> Result<Self, FlaError> {
        serde_json::from_value(serde_json::Value::String(name.into()))
            .map_err(|_| FlaError::Unsupported(format!("qk_norm {name:?} (expected l2 or sum)")))
    }
}

/// FLA's layer arguments and defaults.
#[derive(Config, Debug)]
pub struct DeltaNetLayerConfig {
    #[config(default = 1024)]
    pub hidden_size: usize,
    #[config(default = 1.0)]
    pub expand_k: f64,
    #[config(default = 1.0)]
    pub expand_v: f64,
    #[config(default = 4)]
    pub num_heads: usize,
    #[config(default = true)]
    pub use_beta: bool,
    #[config(default = false)]
    pub use_gate: bool,
    #[config(default = true)]
    pub use_short_conv: bool,
    #[config(default = 4)]
    pub conv_size: usize,
    #[config(default = false)]
    pub conv_bias: bool,
    #[config(default = false)]
    pub allow_neg_eigval: bool,
    #[config(default = "QkActivation::Silu")]
    pub qk_activation: QkActivation,
    #[config(default = "QkNorm::L2")]
    pub qk_norm: QkNorm,
    #[config(default = 1e-5)]
    pub norm_eps: f64,
    /// FLA's `mode`: `false` is `chunk` ([`DeltaMode::Auto`]), `true` is `fused_recurrent`.
    #[config(default = false)]
    pub fused_recurrent: bool,
}

#[derive(Module, Debug)]
pub struct DeltaNet<B: DeltaRuleBackend> {
    pub q_proj: Linear<B>,
    pub k_proj: Linear<B>,
    pub v_proj: Linear<B>,
    pub b_proj: Option<Linear<B>>,
    pub q_conv1d: Option<ShortConvolution<B>>,
    pub k_conv1d: Option<ShortConvolution<B>>,
    pub v_conv1d: Option<ShortConvolution<B>>,
    pub g_proj: Option<Linear<B>>,
    pub o_norm: GatedRmsNorm<B>,
    pub o_proj: Linear<B>,
    pub num_heads: usize,
    pub allow_neg_eigval: bool,
    pub qk_activation: QkActivation,
    pub qk_norm: QkNorm,
    pub fused_recurrent: bool,
}

impl DeltaNetLayerConfig {
    pub fn key_dim(&self) -> usize {
        (self.hidden_size as f64 * self.expand_k).round() as usize
    }

    pub fn value_dim(&self) -> usize {
        (self.hidden_size as f64 * self.expand_v).round() as usize
    }

    /// Errors when the dims do not split into heads (FLA asserts the same).
    pub fn init<B: DeltaRuleBackend>(&self, device: &B::Device) -> Result<DeltaNet<B>, FlaError> {
        let (h, kd, vd, nh) = (
            self.hidden_size,
            self.key_dim(),
            self.value_dim(),
            self.num_heads,
        );
        if nh == 0 || kd % nh != 0 || vd % nh != 0 || kd == 0 || vd == 0 {
            return Err(FlaError::Shape(format!(
                "key dim {kd} and value dim {vd} must divide into {nh} heads"
            )));
        }
        check_conv_size(self.use_short_conv, self.conv_size)?;
        let linear = |a, b| LinearConfig::new(a, b).with_bias(false).init(device);
        let conv = |d, silu| {
            self.use_short_conv.then(|| {
                ShortConvolutionConfig::new(d)
                    .with_kernel_size(self.conv_size)
                    .with_bias(self.conv_bias)
                    .with_silu(silu)
                    .init(device)
            })
        };
        let qk_silu = self.qk_activation == QkActivation::Silu;
        Ok(DeltaNet {
            q_proj: linear(h, kd),
            k_proj: linear(h, kd),
            v_proj: linear(h, vd),
            b_proj: self.use_beta.then(|| linear(h, nh)),
            q_conv1d: conv(kd, qk_silu),
            k_conv1d: conv(kd, qk_silu),
            v_conv1d: conv(vd, true),
            g_proj: self.use_gate.then(|| linear(h, vd)),
            o_norm: GatedRmsNormConfig::new(vd / nh)
                .with_eps(self.norm_eps)
                .init(device),
            o_proj: linear(vd, h),
            num_heads: nh,
            allow_neg_eigval: self.allow_neg_eigval,
            qk_activation: self.qk_activation,
            qk_norm: self.qk_norm,
            fused_recurrent: self.fused_recurrent,
        })
    }
}

impl<B: DeltaRuleBackend> crate::lm::TokenMixer<B> for DeltaNet<B> {
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

impl<B: DeltaRuleBackend> DeltaNet<B> {
    /// `x: [B, T, hidden]` → `[B, T, hidden]`. With `cache`, continues the sequences it holds;
    /// with `use_cache`, also returns the cache for the next call (prompt, then decoding steps).
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        cache: Option<LayerCache<B>>,
        use_cache: bool,
    ) -> Result<(Tensor<B, 3>, Option<LayerCache<B>>), FlaError> {
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
        // With convolutions their SiLU has been applied (to v always, to q and k when it is the
        // activation); without, FLA applies the same to the projections.
        let convolved = self.q_conv1d.is_some();
        let silu_qk = self.qk_activation == QkActivation::Silu && !convolved;
        let (q, k) = if silu_qk { (silu(q), silu(k)) } else { (q, k) };
        let v = if convolved { v } else { silu(v) };
        let heads = |y: Tensor<B, 3>| {
            let d = y.dims()[2] / nh;
            y.reshape([b, t, nh, d])
        };
        let act = |y: Tensor<B, 4>| match self.qk_activation {
            QkActivation::Relu => relu(y),
            // elu(x) + 1 = x + 1 for x >= 0, exp(x) below (exp of the clamped input: where the
            // mask discards it, it must not overflow, or its gradient is 0 · inf = NaN).
            QkActivation::Elu => y
                .clone()
                .clamp_max(0.0)
                .exp()
                .mask_where(y.clone().greater_equal_elem(0.0), y + 1.0),
            QkActivation::Silu | QkActivation::Identity => y,
        };
        let (mut q, mut k) = (act(heads(q)), act(heads(k)));
        if self.qk_norm == QkNorm::Sum {
            let l1 = |y: Tensor<B, 4>| y.clone() / y.abs().sum_dim(3).clamp_min(1e-6);
            (q, k) = (l1(q), l1(k));
        }
        let mut beta = match &self.b_proj {
            Some(bp) => sigmoid(bp.project(x.clone())?),
            None => Tensor::ones([b, t, nh], (&x.device(), x.dtype())),
        };
        if self.allow_neg_eigval {
            beta = beta * 2.0;
        }
        let mode = if self.fused_recurrent {
            DeltaMode::FusedRecurrent
        } else {
            DeltaMode::Auto
        };
        let mut opts = DeltaRuleOptions::default().with_mode(mode);
        if self.qk_norm == QkNorm::L2 {
            opts = opts.with_qk_l2norm();
        }
        if let Some(s) = state {
            opts = opts.with_initial_state(s);
        }
        if use_cache {
            opts = opts.with_final_state();
        }
        let out = delta_rule(q, k, heads(v), beta, opts)?;
        let o = match &self.g_proj {
            Some(gp) => self.o_norm.forward(out.o, heads(gp.project(x)?)),
            None => self.o_norm.norm.forward(out.o),
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
