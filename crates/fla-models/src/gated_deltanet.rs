//! FLA's `GatedDeltaNet` token mixer (Gated DeltaNet, arXiv 2412.06464), with FLA's parameter
//! names, on the `gated_delta_rule` op.
//!
//! Per token: `q, k, v = silu(conv(proj(x)))` (or `silu(proj(x))` without short convolutions),
//! `q, k` L2-normalised per head, `β = sigmoid(b_proj(x))` (×2 with `allow_neg_eigval`), log decay
//! `g = −exp(A_log) · softplus(a_proj(x) + dt_bias)`, then the gated delta rule over value heads
//! (`num_v_heads`, a multiple of `num_heads`), a gated RMSNorm (`o_norm`, gate `g_proj(x)`) or a
//! plain RMSNorm, and `o_proj`. FLA's `chunk` mode runs the op in `DeltaMode::Auto`, the form measured
//! fastest (the chunk form beyond one chunk on tensor cores, the fused recurrent form otherwise);
//! `fused_recurrent` runs the recurrent form.

use burn::config::Config;
use burn::module::{Module, Param};
use burn::nn::{Linear, LinearConfig};
use burn::tensor::activation::{sigmoid, silu};
use burn::tensor::{Distribution, FloatDType, Tensor};
use fla_burn::{gated_delta_rule, DeltaMode, DeltaRuleBackend, DeltaRuleOptions, FlaError};

use crate::modules::{
    check_conv_size, short_convs, GatedRmsNorm, GatedRmsNormConfig, LayerCache, Project,
    ShortConvolution, ShortConvolutionConfig,
};

/// FLA's layer arguments and defaults.
#[derive(Config, Debug)]
pub struct GatedDeltaNetLayerConfig {
    #[config(default = 2048)]
    pub hidden_size: usize,
    #[config(default = 2.0)]
    pub expand_v: f64,
    #[config(default = 256)]
    pub head_dim: usize,
    #[config(default = 6)]
    pub num_heads: usize,
    /// Value heads (`num_heads` when absent); grouped value heads when larger.
    #[config(default = "None")]
    pub num_v_heads: Option<usize>,
    #[config(default = true)]
    pub use_gate: bool,
    #[config(default = true)]
    pub use_short_conv: bool,
    #[config(default = false)]
    pub allow_neg_eigval: bool,
    #[config(default = 4)]
    pub conv_size: usize,
    #[config(default = false)]
    pub conv_bias: bool,
    #[config(default = 1e-5)]
    pub norm_eps: f64,
    /// FLA's `mode`: `false` is `chunk` ([`DeltaMode::Auto`]), `true` is `fused_recurrent`.
    #[config(default = false)]
    pub fused_recurrent: bool,
}

/// Gated DeltaNet's cache between calls: its state `[B, HV, K, V]` and the convolutions' last
/// inputs.
pub type DeltaCache<B> = LayerCache<B>;

#[derive(Module, Debug)]
pub struct GatedDeltaNet<B: DeltaRuleBackend> {
    pub q_proj: Linear<B>,
    pub k_proj: Linear<B>,
    pub v_proj: Linear<B>,
    pub a_proj: Linear<B>,
    pub b_proj: Linear<B>,
    /// `[HV]`: `log A`, the per-head decay rate (FLA's `A_log`; Rust field names are snake case,
    /// so loading FLA's checkpoints maps the name).
    pub a_log: Param<Tensor<B, 1>>,
    /// `[HV]`: the bias inside the softplus of the time step.
    pub dt_bias: Param<Tensor<B, 1>>,
    pub q_conv1d: Option<ShortConvolution<B>>,
    pub k_conv1d: Option<ShortConvolution<B>>,
    pub v_conv1d: Option<ShortConvolution<B>>,
    pub g_proj: Option<Linear<B>>,
    pub o_norm: GatedRmsNorm<B>,
    pub o_proj: Linear<B>,
    pub num_heads: usize,
    pub num_v_heads: usize,
    pub head_k_dim: usize,
    pub head_v_dim: usize,
    pub allow_neg_eigval: bool,
    pub fused_recurrent: bool,
}

impl GatedDeltaNetLayerConfig {
    pub fn v_heads(&self) -> usize {
        self.num_v_heads.unwrap_or(self.num_heads)
    }

    /// `head_dim · expand_v`, which must be a whole number (FLA checks the same).
    pub fn head_v_dim(&self) -> Result<usize, FlaError> {
        let x = self.head_dim as f64 * self.expand_v;
        if (x - x.round()).abs() > 1e-6 || x < 1.0 {
            return Err(FlaError::Shape(format!(
                "head_dim {} × expand_v {} = {x} is not a positive whole number",
                self.head_dim, self.expand_v
            )));
        }
        Ok(x.round() as usize)
    }

    pub fn init<B: DeltaRuleBackend>(
        &self,
        device: &B::Device,
    ) -> Result<GatedDeltaNet<B>, FlaError> {
        let (h, nh, nv) = (self.hidden_size, self.num_heads, self.v_heads());
        if nh == 0 || nv % nh != 0 {
            return Err(FlaError::Shape(format!(
                "num_v_heads {nv} must be a positive multiple of num_heads {nh}"
            )));
        }
        let (dk, dv) = (self.head_dim, self.head_v_dim()?);
        let (key_dim, value_dim) = (nh * dk, nv * dv);
        check_conv_size(self.use_short_conv, self.conv_size)?;
        let linear = |a, b| LinearConfig::new(a, b).with_bias(false).init(device);
        let conv = |d| {
            self.use_short_conv.then(|| {
                ShortConvolutionConfig::new(d)
                    .with_kernel_size(self.conv_size)
                    .with_bias(self.conv_bias)
                    .init(device)
            })
        };
        // FLA's initialisation: A ~ U(0, 16); dt log-uniform in [1e-3, 1e-1] (floored at 1e-4),
        // stored as the inverse softplus.
        let a = Tensor::<B, 1>::random([nv], Distribution::Uniform(1e-4, 16.0), device);
        let u = Tensor::<B, 1>::random([nv], Distribution::Uniform(0.0, 1.0), device);
        let (lo, hi) = (1e-3f64.ln(), 1e-1f64.ln());
        let dt = (u * (hi - lo) + lo).exp().clamp_min(1e-4);
        // softplus⁻¹(dt) = dt + log(1 − exp(−dt)).
        let inv_dt = dt.clone() + (dt.neg().exp().neg() + 1.0).log();
        Ok(GatedDeltaNet {
            q_proj: linear(h, key_dim),
            k_proj: linear(h, key_dim),
            v_proj: linear(h, value_dim),
            a_proj: linear(h, nv),
            b_proj: linear(h, nv),
            a_log: Param::from_tensor(a.log()),
            dt_bias: Param::from_tensor(inv_dt),
            q_conv1d: conv(key_dim),
            k_conv1d: conv(key_dim),
            v_conv1d: conv(value_dim),
            g_proj: self.use_gate.then(|| linear(h, value_dim)),
            o_norm: GatedRmsNormConfig::new(dv)
                .with_eps(self.norm_eps)
                .init(device),
            o_proj: linear(value_dim, h),
            num_heads: nh,
            num_v_heads: nv,
            head_k_dim: dk,
            head_v_dim: dv,
            allow_neg_eigval: self.allow_neg_eigval,
            fused_recurrent: self.fused_recurrent,
        })
    }
}

impl<B: DeltaRuleBackend> crate::lm::TokenMixer<B> for GatedDeltaNet<B> {
    type Cache = DeltaCache<B>;

    fn mix(
        &self,
        x: Tensor<B, 3>,
        cache: Option<DeltaCache<B>>,
        use_cache: bool,
    ) -> Result<(Tensor<B, 3>, Option<DeltaCache<B>>), FlaError> {
        self.forward(x, cache, use_cache)
    }
}

impl<B: DeltaRuleBackend> GatedDeltaNet<B> {
    /// `x: [B, T, hidden]` → `[B, T, hidden]`. With `cache`, continues the sequences it holds;
    /// with `use_cache`, also returns the cache for the next call (prompt, then decoding steps).
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        cache: Option<DeltaCache<B>>,
        use_cache: bool,
    ) -> Result<(Tensor<B, 3>, Option<DeltaCache<B>>), FlaError> {
        let [b, t, _] = x.dims();
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
        // The convolutions end in a SiLU; without them FLA applies it to the projections.
        let [q, k, v] = match conv {
            Some(_) => [q, k, v],
            None => [silu(q), silu(k), silu(v)],
        };
        let (nh, nv) = (self.num_heads, self.num_v_heads);
        let q = q.reshape([b, t, nh, self.head_k_dim]);
        let k = k.reshape([b, t, nh, self.head_k_dim]);
        let v = v.reshape([b, t, nv, self.head_v_dim]);
        let mut beta = sigmoid(self.b_proj.project(x.clone())?);
        if self.allow_neg_eigval {
            beta = beta * 2.0;
        }
        // The gate in f32 whatever the model computes in (FLA computes it in f32 too; here it is
        // then rounded to the kernels' dtype, which the op requires of `g`): in half precision
        // softplus's exp overflows (f16 beyond x ≈ 11). Written as relu(x) + log1p(e^{-|x|}),
        // finite with a finite gradient for every x (`log(1 + e^x)` is not beyond x ≈ 88 in f32).
        let f32 = |t: Tensor<B, 3>| t.cast(FloatDType::F32);
        let rate = f32(self.a_log.val().reshape([1, 1, nv])).exp();
        let u = f32(self.a_proj.project(x.clone())?) + f32(self.dt_bias.val().reshape([1, 1, nv]));
        let dt = u.clone().clamp_min(0.0) + u.abs().neg().exp().log1p();
        let g = (rate * dt).neg().cast(q.dtype());
        let mode = if self.fused_recurrent {
            DeltaMode::FusedRecurrent
        } else {
            DeltaMode::Auto
        };
        let mut opts = DeltaRuleOptions::default().with_qk_l2norm().with_mode(mode);
        if let Some(s) = state {
            opts = opts.with_initial_state(s);
        }
        if use_cache {
            opts = opts.with_final_state();
        }
        let out = gated_delta_rule(q, k, v, g, beta, opts)?;
        let o = match &self.g_proj {
            Some(gp) => {
                let gate = gp.project(x)?.reshape([b, t, nv, self.head_v_dim]);
                self.o_norm.forward(out.o, gate)
            }
            None => self.o_norm.norm.forward(out.o),
        }?;
        let y = self
            .o_proj
            .project(o.reshape([b, t, nv * self.head_v_dim]))?;
        let cache = out.final_state.map(|state| LayerCache {
            state,
            conv,
            seen: seen + t,
        });
        Ok((y, cache))
    }
}
