//! Checking that a GPU runtime can start, before any tensor is made on it.
//!
//! CubeCL panics when no adapter or driver is found ("No possible adapter available", "Unable to
//! dynamically load the cuda shared library"), and Burn creates the client on the first tensor.
//! Call these first to get an error instead.

use cubecl::Runtime;

use crate::FlaError;

/// `Ok` when a compute client for `device` can be created on runtime `R`.
pub fn check_runtime<R: Runtime>(device: &R::Device) -> Result<(), FlaError> {
    let device = device.clone();
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
        R::client(&device);
    }))
    .map_err(|panic| {
        let reason = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "the runtime could not start".into());
        FlaError::NoDevice(format!("{}: {reason}", std::any::type_name::<R>()))
    })
}

/// [`check_runtime`] for wgpu (Vulkan, Metal, DX12 or WebGPU, whichever the device names).
#[cfg(feature = "wgpu")]
pub fn check_wgpu(device: &cubecl::wgpu::WgpuDevice) -> Result<(), FlaError> {
    check_runtime::<cubecl::wgpu::WgpuRuntime>(device)
}

/// [`check_runtime`] for CUDA.
#[cfg(feature = "cuda")]
pub fn check_cuda(device: &cubecl::cuda::CudaDevice) -> Result<(), FlaError> {
    check_runtime::<cubecl::cuda::CudaRuntime>(device)
}

/// The CUDA backend without Burn's fusion at float type `F` (`burn::backend::Cuda<F>` is the fused
/// one). Reduced-precision training takes it: Burn 0.21's fusion panics in its code generation on
/// graphs that mix dtypes (measured on lavapipe's f16: parameters in f16, the loss in f32).
#[cfg(feature = "cuda")]
pub type CudaUnfused<F> = burn_cubecl::CubeBackend<cubecl::cuda::CudaRuntime, F, i32, u8>;
