//! Helpers shared by the top-level tests: backend selection, tensors from f64 vectors and back.
#![allow(dead_code)]

use burn::tensor::backend::Backend;
use burn::tensor::{FloatDType, Tensor, TensorData};

/// `wgpu` unless the tests were built with CUDA and `FLA_TEST_RUNTIME=cuda` (or CUDA alone).
pub fn runtime_name() -> &'static str {
    let wanted = std::env::var("FLA_TEST_RUNTIME").unwrap_or_default();
    if cfg!(feature = "cuda") && (wanted == "cuda" || !cfg!(feature = "wgpu")) {
        "cuda"
    } else {
        "wgpu"
    }
}

/// Whether the tests run on a CPU Vulkan driver (lavapipe), whose per-invocation loop limit the
/// kernels refuse long sequences for.
pub fn is_cpu_vulkan() -> bool {
    #[cfg(feature = "wgpu")]
    if runtime_name() == "wgpu" {
        let client = <cubecl::wgpu::WgpuRuntime as cubecl::Runtime>::client(&Default::default());
        return fla::kernels::gated::is_cpu_vulkan(&client);
    }
    false
}

pub fn tensor<B: Backend, const D: usize>(
    xs: &[f64],
    shape: [usize; D],
    dtype: FloatDType,
    device: &B::Device,
) -> Tensor<B, D> {
    let data = TensorData::new(xs.iter().map(|&x| x as f32).collect::<Vec<f32>>(), shape);
    Tensor::<B, D>::from_data(data, device).cast(dtype)
}

pub fn values<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f64> {
    t.cast(FloatDType::F32)
        .into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .expect("f32 data")
        .into_iter()
        .map(f64::from)
        .collect()
}

/// Which implementation of an op a test runs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Impl {
    /// `burn::backend::Wgpu` / `Cuda`: fusion on, as users write it.
    Fusion,
    /// `CubeBackend` without fusion.
    Cube,
    /// NdArray: the tensor-op implementation.
    TensorOps,
}

/// Fused backends as Burn users write them (`Wgpu`/`Cuda` are `Fusion<CubeBackend<..>>`), the
/// plain `CubeBackend` beneath them, and NdArray for the tensor-op implementation.
pub mod backends {
    pub type NdArray = burn::backend::NdArray<f32>;
    #[cfg(feature = "wgpu")]
    pub type WgpuFused = burn::backend::Wgpu;
    #[cfg(feature = "wgpu")]
    pub type WgpuCube = burn_cubecl::CubeBackend<cubecl::wgpu::WgpuRuntime, f32, i32, u32>;
    #[cfg(feature = "cuda")]
    pub type CudaFused = burn::backend::Cuda;
    #[cfg(feature = "cuda")]
    pub type CudaCube = burn_cubecl::CubeBackend<cubecl::cuda::CudaRuntime, f32, i32, u8>;
}

/// Runs `$f::<Backend>(args...)` with the fused backend of the selected runtime (`fusion`: the
/// `Wgpu`/`Cuda` aliases; `cube`: the plain `CubeBackend`).
#[macro_export]
macro_rules! on_gpu {
    (fusion, $f:ident($($arg:expr),*)) => {{
        match common::runtime_name() {
            #[cfg(feature = "cuda")]
            "cuda" => $f::<common::backends::CudaFused>($($arg),*),
            #[cfg(feature = "wgpu")]
            _ => $f::<common::backends::WgpuFused>($($arg),*),
            #[cfg(not(feature = "wgpu"))]
            other => panic!("runtime {other} not compiled in"),
        }
    }};
    (cube, $f:ident($($arg:expr),*)) => {{
        match common::runtime_name() {
            #[cfg(feature = "cuda")]
            "cuda" => $f::<common::backends::CudaCube>($($arg),*),
            #[cfg(feature = "wgpu")]
            _ => $f::<common::backends::WgpuCube>($($arg),*),
            #[cfg(not(feature = "wgpu"))]
            other => panic!("runtime {other} not compiled in"),
        }
    }};
}

/// The relative-RMSE bound of an f32 case against the f64 reference: 1e-5 on lavapipe and the
/// CPU, 1e-4 for the fused kernels on CUDA (its fast exponentials and fused multiply-adds).
pub fn tolerance(imp: Impl) -> f64 {
    if imp != Impl::TensorOps && runtime_name() == "cuda" {
        1e-4
    } else {
        1e-5
    }
}

/// Asserts `out` within relative RMSE `tol` of `reference`.
pub fn check(name: &str, out: &[f64], reference: &[f64], tol: f64) {
    let err = fla::kernels::testing::rel_rmse(out, reference);
    assert!(err <= tol, "{name}: relative RMSE {err:e} exceeds {tol:e}");
}

/// The relative-RMSE bound of a half-precision case (inputs rounded to the dtype, outputs and
/// gradients stored in it, f32 accumulation) against the f64 reference on the unrounded inputs:
/// a few units of the dtype's epsilon (f16 2^-11 ≈ 4.9e-4, bf16 2^-8 ≈ 3.9e-3). Measured on
/// lavapipe in f16: 2e-4 to 7e-4 (attention's dq the largest).
pub fn half_tolerance(dtype: FloatDType) -> f64 {
    match dtype {
        FloatDType::BF16 => 2e-2,
        _ => 2e-3,
    }
}
