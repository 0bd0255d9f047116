//! The user-facing functions on Burn's `Tensor` API.

use burn::tensor::{Tensor, TensorPrimitive};

use super::{NormBackend, NormOpOptions, NormTensors};
use crate::FlaError;

fn run<B: NormBackend, const D: usize>(
    x: Tensor<B, D>,
    gate: Option<Tensor<B, D>>,
    weight: Tensor<B, 1>,
    eps: f64,
) -> Result<Tensor<B, D>, FlaError> {
    let x = NormTensors {
        x: x.into_primitive().tensor(),
        w: weight.into_primitive().tensor(),
        g: gate.map(|g| g.into_primitive().tensor()),
    };
    let out = B::rms_norm_forward(x, &NormOpOptions { eps: eps as f32 })?;
    Ok(Tensor::from_primitive(TensorPrimitive::Float(out.y)))
}

/// RMSNorm over the last axis, `y = x / sqrt(mean(x²) + eps) ∘ weight`, computed in `f32` and
/// returned in `x`'s dtype (FLA's `RMSNorm`; Burn's `RmsNorm` computes the same with eight
/// tensor ops). Fused on `CubeBackend` (CUDA, wgpu): one kernel forward, one (and a small sum
/// for the weight's gradient) backward. Differentiable in `x` and `weight` under `Autodiff`.
///
/// Shapes: `x: [..., D]`, `weight: [D]`, one float dtype. Errors: see
/// [`NormBackend::rms_norm_forward`].
pub fn rms_norm<B: NormBackend, const D: usize>(
    x: Tensor<B, D>,
    weight: Tensor<B, 1>,
    eps: f64,
) -> Result<Tensor<B, D>, FlaError> {
    run(x, None, weight, eps)
}

/// [`rms_norm`] followed by a swish gate: `rms_norm(x) ∘ weight ∘ gate · σ(gate)` (FLA's
/// `FusedRMSNormGated` with `activation="swish"`, the output norms of GLA, DeltaNet, Gated
/// DeltaNet and HGRN2). `gate` is shaped like `x`; differentiable in all three.
pub fn rms_norm_gated<B: NormBackend, const D: usize>(
    x: Tensor<B, D>,
    gate: Tensor<B, D>,
    weight: Tensor<B, 1>,
    eps: f64,
) -> Result<Tensor<B, D>, FlaError> {
    run(x, Some(gate), weight, eps)
}
