//! Building blocks shared by the layers, after FLA's `fla.modules`.

use burn::config::Config;
use burn::module::{Module, Param};
use burn::nn::{Linear, LinearConfig};
use burn::tensor::activation::silu;
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use fla_burn::{
    linear, rms_norm, rms_norm_gated, swiglu, FlaError, MatmulBackend, NormBackend, SwigluBackend,
};

/// RMSNorm over the last axis (FLA's `RMSNorm`) on the fused op: `x / sqrt(mean(x²) + ε) ∘ γ`,
/// computed in `f32` and returned in `x`'s dtype. The fields are those of Burn's `RmsNorm`
/// (`gamma`, `epsilon`), so records and the checkpoint names (`weight` ↔ `gamma`) are unchanged.
#[derive(Module, Debug)]
pub struct RmsNorm<B: Backend> {
    pub gamma: Param<Tensor<B, 1>>,
    pub epsilon: f64,
}

#[derive(Config, Debug)]
pub struct RmsNormConfig {
    pub hidden_size: usize,
    #[config(default = 1e-5)]
    pub eps: f64,
}

impl RmsNormConfig {
    /// The weight starts at one, as FLA's and Burn's do.
    pub fn init<B: Backend>(&self, device: &B::Device) -> RmsNorm<B> {
        RmsNorm {
            gamma: Param::from_tensor(Tensor::ones([self.hidden_size], device)),
            epsilon: self.eps,
        }
    }
}

impl<B: NormBackend> RmsNorm<B> {
    /// `x: [..., hidden]`. Errors where the last axis is not the weight's length or the device
    /// does not compute the dtype.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Result<Tensor<B, D>, FlaError> {
        rms_norm(x, self.gamma.val(), self.epsilon)
    }

    /// `rmsnorm(x) · γ · swish(gate)`, `gate` shaped like `x`.
    pub fn forward_gated<const D: usize>(
        &self,
        x: Tensor<B, D>,
        gate: Tensor<B, D>,
    ) -> Result<Tensor<B, D>, FlaError> {
        rms_norm_gated(x, gate, self.gamma.val(), self.epsilon)
    }
}

/// RMSNorm over the last axis, then a swish gate: `rmsnorm(x) · w · swish(g)` (FLA's
/// `FusedRMSNormGated` with `activation="swish"`), one fused op.
#[derive(Module, Debug)]
pub struct GatedRmsNorm<B: Backend> {
    pub norm: RmsNorm<B>,
}

#[derive(Config, Debug)]
pub struct GatedRmsNormConfig {
    pub hidden_size: usize,
    #[config(default = 1e-5)]
    pub eps: f64,
}

impl GatedRmsNormConfig {
    pub fn init<B: Backend>(&self, device: &B::Device) -> GatedRmsNorm<B> {
        GatedRmsNorm {
            norm: RmsNormConfig::new(self.hidden_size)
                .with_eps(self.eps)
                .init(device),
        }
    }
}

impl<B: NormBackend> GatedRmsNorm<B> {
    pub fn forward<const D: usize>(
        &self,
        x: Tensor<B, D>,
        gate: Tensor<B, D>,
    ) -> Result<Tensor<B, D>, FlaError> {
        self.norm.forward_gated(x, gate)
    }
}

/// SwiGLU feed-forward: `down(swish(gate(x)) · up(x))` (FLA's `GatedMLP`).
#[derive(Module, Debug)]
pub struct GatedMlp<B: Backend> {
    pub gate_proj: Linear<B>,
    pub up_proj: Linear<B>,
    pub down_proj: Linear<B>,
}

#[derive(Config, Debug)]
pub struct GatedMlpConfig {
    pub hidden_size: usize,
    /// Defaults to FLA's choice: `2/3 · hidden_ratio · hidden_size` rounded up to a multiple of 256.
    pub intermediate_size: Option<usize>,
    #[config(default = 4)]
    pub hidden_ratio: usize,
}

impl GatedMlpConfig {
    pub fn intermediate(&self) -> usize {
        self.intermediate_size.unwrap_or_else(|| {
            let size = self.hidden_size * self.hidden_ratio * 2 / 3;
            size.div_ceil(256) * 256
        })
    }

    pub fn init<B: Backend>(&self, device: &B::Device) -> GatedMlp<B> {
        let (h, i) = (self.hidden_size, self.intermediate());
        let linear = |a, b| LinearConfig::new(a, b).with_bias(false).init(device);
        GatedMlp {
            gate_proj: linear(h, i),
            up_proj: linear(h, i),
            down_proj: linear(i, h),
        }
    }
}

impl<B: SwigluBackend + MatmulBackend> GatedMlp<B> {
    /// `down(swish(gate(x)) ∘ up(x))`, the activation one fused op.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Result<Tensor<B, D>, FlaError> {
        let gate = self.gate_proj.project(x.clone())?;
        self.down_proj
            .project(swiglu(gate, self.up_proj.project(x)?)?)
    }
}

/// A Burn `Linear` applied through [`fla_burn::linear`]: cuBLASLt on CUDA, Burn's matmul
/// elsewhere, with the layer's parameters (and so its checkpoints) unchanged.
pub trait Project<B: MatmulBackend> {
    /// `x · weight + bias` for `x [..., d_in]`.
    fn project<const D: usize>(&self, x: Tensor<B, D>) -> Result<Tensor<B, D>, FlaError>;
}

impl<B: MatmulBackend> Project<B> for Linear<B> {
    fn project<const D: usize>(&self, x: Tensor<B, D>) -> Result<Tensor<B, D>, FlaError> {
        linear(x, self.weight.val(), self.bias.as_ref().map(|b| b.val()))
    }
}

/// Depthwise causal convolution over time, by default with a SiLU, FLA's `ShortConvolution`:
/// `y_t[d] = silu(Σ_j w[d, j] · x_{t-W+1+j}[d] + b[d])` (no SiLU with `activation: None` in
/// FLA, `silu: false` here: HGRN2's convolutions, DeltaNet's q and k ones when its
/// `qk_activation` is not SiLU).
#[derive(Module, Debug)]
pub struct ShortConvolution<B: Backend> {
    /// `[D, 1, W]`: the depthwise conv1d weight as FLA (and PyTorch) store it, so checkpoints
    /// load without reshaping.
    pub weight: Param<Tensor<B, 3>>,
    pub bias: Option<Param<Tensor<B, 1>>>,
    pub silu: bool,
}

/// Refuses a short convolution of fewer than two taps (`conv_size` in FLA's configs): its cache
/// of `conv_size - 1` inputs would be empty, which the decoding path cannot carry. (FLA builds
/// `conv_size` 1, a pointwise convolution; no FLA config we know of uses it.)
pub fn check_conv_size(use_short_conv: bool, conv_size: usize) -> Result<(), FlaError> {
    if use_short_conv && conv_size < 2 {
        return Err(FlaError::Shape(format!(
            "conv_size {conv_size}: a short convolution needs at least 2 taps"
        )));
    }
    Ok(())
}

#[derive(Config, Debug)]
pub struct ShortConvolutionConfig {
    pub hidden_size: usize,
    #[config(default = 4)]
    pub kernel_size: usize,
    #[config(default = false)]
    pub bias: bool,
    #[config(default = true)]
    pub silu: bool,
}

impl ShortConvolutionConfig {
    pub fn init<B: Backend>(&self, device: &B::Device) -> ShortConvolution<B> {
        // conv1d's default: uniform in ±1/sqrt(fan_in), fan_in = W for a depthwise kernel.
        let bound = 1.0 / (self.kernel_size as f64).sqrt();
        let dist = burn::tensor::Distribution::Uniform(-bound, bound);
        ShortConvolution {
            weight: Param::from_tensor(Tensor::random(
                [self.hidden_size, 1, self.kernel_size],
                dist,
                device,
            )),
            bias: self
                .bias
                .then(|| Param::from_tensor(Tensor::random([self.hidden_size], dist, device))),
            silu: self.silu,
        }
    }
}

impl<B: Backend> ShortConvolution<B> {
    pub fn kernel_size(&self) -> usize {
        self.weight.dims()[2]
    }

    /// `x: [B, T, D]`; `cache: [B, W-1, D]`, the inputs before `x` (zeros when absent). Returns
    /// the output and the cache to pass with the next chunk of the same sequences.
    /// Errors on an empty `x`, a width other than the convolution's, or a cache of another
    /// shape than `[B, W-1, D]` (a cache from another batch or layer).
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        cache: Option<Tensor<B, 3>>,
    ) -> Result<(Tensor<B, 3>, Tensor<B, 3>), FlaError> {
        let [b, t, d] = x.dims();
        let w = self.kernel_size();
        let channels = self.weight.dims()[0];
        if b == 0 || t == 0 {
            return Err(FlaError::Empty(format!(
                "short convolution of an empty input [{b}, {t}, {d}]"
            )));
        }
        if d != channels || w < 2 {
            return Err(FlaError::Shape(format!(
                "short convolution of {channels} channels and {w} taps given [{b}, {t}, {d}]"
            )));
        }
        if let Some(c) = &cache {
            if c.dims() != [b, w - 1, d] {
                return Err(FlaError::Shape(format!(
                    "short convolution cache {:?}, expected [{b}, {}, {d}]",
                    c.dims(),
                    w - 1
                )));
            }
        }
        // Zeros in the input's dtype, which need not be the backend's default (a model run on a
        // half-precision copy of its weights, as mixed-precision training does).
        let past = cache.unwrap_or_else(|| Tensor::zeros([b, w - 1, d], (&x.device(), x.dtype())));
        let padded = Tensor::cat(vec![past, x], 1);
        let weight = self.weight.val().reshape([d, w]);
        let tap = |j: usize| {
            padded.clone().narrow(1, j, t) * weight.clone().narrow(1, j, 1).reshape([1, 1, d])
        };
        let mut y = tap(0);
        for j in 1..w {
            y = y + tap(j);
        }
        if let Some(bias) = &self.bias {
            y = y + bias.val().reshape([1, 1, d]);
        }
        let total = t + w - 1;
        let next_cache = padded.narrow(1, total - (w - 1), w - 1);
        let y = if self.silu { silu(y) } else { y };
        Ok((y, next_cache))
    }
}

/// What a recurrent token mixer carries from one call to the next: its state `[B, H, K, V]`
/// (f32), with short convolutions the last `conv_size - 1` inputs of its three convolutions,
/// and how many tokens it has seen (where the next call's positions start, for RetNet's rotary
/// embeddings; FLA's cache counts the same).
#[derive(Debug, Clone)]
pub struct LayerCache<B: Backend> {
    pub state: Tensor<B, 4>,
    pub conv: Option<[Tensor<B, 3>; 3]>,
    pub seen: usize,
}

/// The parts of an optional [`LayerCache`]: state, convolutions' cache, tokens seen.
pub type CacheParts<B> = (Option<Tensor<B, 4>>, Option<[Tensor<B, 3>; 3]>, usize);

impl<B: Backend> LayerCache<B> {
    pub fn split(cache: Option<Self>) -> CacheParts<B> {
        match cache {
            Some(c) => (Some(c.state), c.conv, c.seen),
            None => (None, None, 0),
        }
    }
}

/// The three convolutions' outputs and, when all three exist, their next cache.
pub type ShortConvsOutput<B> = ([Tensor<B, 3>; 3], Option<[Tensor<B, 3>; 3]>);

/// Runs a layer's q, k and v short convolutions on `xs`, continuing from `cache` (their inputs
/// of an earlier call). Absent convolutions pass their input through. Returns the outputs and
/// the convolutions' next cache (`None` unless all three convolutions exist).
pub fn short_convs<B: Backend>(
    convs: [&Option<ShortConvolution<B>>; 3],
    xs: [Tensor<B, 3>; 3],
    cache: Option<[Tensor<B, 3>; 3]>,
) -> Result<ShortConvsOutput<B>, FlaError> {
    let [c0, c1, c2] = match cache {
        Some([a, b, c]) => [Some(a), Some(b), Some(c)],
        None => [None, None, None],
    };
    type Run<B> = Result<(Tensor<B, 3>, Option<Tensor<B, 3>>), FlaError>;
    let run = |layer: &Option<ShortConvolution<B>>, y: Tensor<B, 3>, c| -> Run<B> {
        match layer {
            Some(l) => {
                let (y, c) = l.forward(y, c)?;
                Ok((y, Some(c)))
            }
            None => Ok((y, None)),
        }
    };
    let [x0, x1, x2] = xs;
    let (y0, n0) = run(convs[0], x0, c0)?;
    let (y1, n1) = run(convs[1], x1, c1)?;
    let (y2, n2) = run(convs[2], x2, c2)?;
    let next = match (n0, n1, n2) {
        (Some(a), Some(b), Some(c)) => Some([a, b, c]),
        _ => None,
    };
    Ok(([y0, y1, y2], next))
}
