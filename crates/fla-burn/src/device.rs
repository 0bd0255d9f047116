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

/// Configures CubeCL for a program that runs models (training, generation): `autotune` is the
/// autotune effort (`minimal`, `balanced`, `extensive`, `full`) unless `CUBECL_AUTOTUNE_LEVEL`
/// is set, and compiled kernels are cached on disk (where a `cubecl.toml` says, if it does): CUDA's PTX and Vulkan's SPIR-V then compile once per machine rather than once
/// per process. Measured on an H200 for the tiny GLA preset in bf16: the first run compiles ~170
/// kernels in 20 s, the next one starts in 2 s. The cache goes in the `target` folder of the Cargo
/// project around the working directory, else in the user's cache folder (`~/.cache/cubecl`),
/// under `fla-kernels-<hash of our kernels' sources>`. A `cubecl.toml` in the working directory or above is honoured for
/// everything else.
///
/// CubeCL reads its configuration once, at the first device use: call this before any tensor is
/// made; afterwards it returns an error and changes nothing.
pub fn configure_cubecl(autotune: &str) -> Result<(), FlaError> {
    use cubecl::config::autotune::AutotuneLevel;
    use cubecl::config::cache::CacheConfig;
    use cubecl::config::{CubeClRuntimeConfig, RuntimeConfig};

    let level = match autotune {
        "minimal" => AutotuneLevel::Minimal,
        "balanced" => AutotuneLevel::Balanced,
        "extensive" => AutotuneLevel::Extensive,
        "full" => AutotuneLevel::Full,
        other => {
            return Err(FlaError::Unsupported(format!(
                "autotune level {other:?} (minimal, balanced, extensive, full)"
            )))
        }
    };
    let mut config = CubeClRuntimeConfig::from_current_dir();
    config.autotune.level = level;
    if config.compilation.cache.is_none() {
        // CubeCL keys compiled kernels by type and launch settings, not by their body: one folder
        // per version of our kernels' sources keeps an edited kernel from being served stale.
        let root = CacheConfig::Target
            .root()
            .join(format!("fla-kernels-{}", fla_cubecl_kernels::SOURCE_HASH));
        config.compilation.cache = Some(CacheConfig::File(root));
    }
    // The environment overrides the file and the caller, as it does in CubeCL itself.
    let config = config.override_from_env();
    std::panic::catch_unwind(move || CubeClRuntimeConfig::set(config)).map_err(|_| {
        FlaError::Unsupported(
            "CubeCL's configuration was already read (configure_cubecl must come before the \
             first device use)"
                .into(),
        )
    })
}
