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
    // wgpu's own message is often an internal one ("RecvError" from its adapter thread when no
    // Vulkan driver is installed, as on a fresh machine without a GPU): say what to do as well.
    check_runtime::<cubecl::wgpu::WgpuRuntime>(device).map_err(|e| {
        with_remedy(
            e,
            "no usable GPU adapter: install a Vulkan driver; without a GPU, Mesa's lavapipe, \
             e.g. `apt-get install mesa-vulkan-drivers libvulkan1`",
        )
    })
}

/// [`check_runtime`] for CUDA.
#[cfg(feature = "cuda")]
pub fn check_cuda(device: &cubecl::cuda::CudaDevice) -> Result<(), FlaError> {
    check_runtime::<cubecl::cuda::CudaRuntime>(device).map_err(|e| {
        with_remedy(
            e,
            "needs an NVIDIA GPU with its driver, and CUDA's libraries on the library path, \
             e.g. LD_LIBRARY_PATH=/usr/local/cuda/lib64",
        )
    })
}

/// A `NoDevice` error with what to do about it appended; other errors unchanged.
#[cfg(any(feature = "wgpu", feature = "cuda"))]
fn with_remedy(e: FlaError, remedy: &str) -> FlaError {
    match e {
        FlaError::NoDevice(why) => FlaError::NoDevice(format!("{why} ({remedy})")),
        other => other,
    }
}

/// Configures CubeCL for a program that runs models (training, generation): `autotune` is the
/// autotune effort (`minimal`, `balanced`, `extensive`, `full`) unless `CUBECL_AUTOTUNE_LEVEL`
/// is set, and compiled kernels are cached on disk (where a `cubecl.toml` says, if it does):
/// CUDA's PTX and Vulkan's SPIR-V then compile once per machine rather than once per process.
/// Measured: on an H200, 20 steps of the tiny GLA preset in bf16 took 20 s, the same run again
/// 2 s; on lavapipe a 15-step Transformer run 79 s, then 20-25 s.
///
/// The cache goes in the `target` folder beside the nearest `Cargo.toml` at or above the working
/// directory, else in the user's cache folder (`~/.cache/cubecl`), under
/// `fla-kernels-<hash of our kernels' sources>`; where that cannot be written, nothing is cached.
/// CUDA's entries do not record the GPU they were compiled for: a cache folder serves one kind of
/// GPU (a shared home over mixed GPUs wants a `cubecl.toml` per machine naming its own
/// `[compilation] cache`). A `cubecl.toml` in the working directory or above is honoured for
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
    // Checked, not caught: `set` panics once the configuration has been read.
    if CubeClRuntimeConfig::storage().lock().is_some() {
        return Err(FlaError::Unsupported(
            "CubeCL's configuration was already read (configure_cubecl must come before the \
             first device use)"
                .into(),
        ));
    }
    let mut config = CubeClRuntimeConfig::from_current_dir();
    config.autotune.level = level;
    if config.compilation.cache.is_none() {
        // CubeCL keys compiled kernels by type and launch settings, not by their body: one folder
        // per version of our kernels' sources keeps an edited kernel from being served stale.
        let root = CacheConfig::Target
            .root()
            .join(format!("fla-kernels-{}", fla_cubecl_kernels::SOURCE_HASH));
        // CubeCL panics on a cache folder it cannot write (a read-only home or target folder):
        // then kernels are compiled per process, as without the cache.
        if writable(&root) {
            config.compilation.cache = Some(CacheConfig::File(root));
        }
    }
    // The environment overrides the file and the caller, as it does in CubeCL itself.
    CubeClRuntimeConfig::set(config.override_from_env());
    Ok(())
}

/// Whether `dir` exists or can be made, and a file can be created in it.
fn writable(dir: &std::path::Path) -> bool {
    let probe = dir.join(format!(".probe-{}", std::process::id()));
    let ok = std::fs::create_dir_all(dir).is_ok() && std::fs::write(&probe, b"").is_ok();
    let _ = std::fs::remove_file(probe);
    ok
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configure_cubecl_refuses_unknown_levels_and_a_late_call() {
        use cubecl::config::{CubeClRuntimeConfig, RuntimeConfig};
        let err = configure_cubecl("fastest").unwrap_err().to_string();
        assert!(err.contains("fastest") && err.contains("minimal"), "{err}");
        // Once CubeCL has read its configuration (any device use does), a call changes nothing.
        let _ = CubeClRuntimeConfig::get();
        let err = configure_cubecl("minimal").unwrap_err().to_string();
        assert!(err.contains("already read"), "{err}");
    }

    #[test]
    fn a_cache_folder_must_be_writable() {
        let dir = std::env::temp_dir().join(format!("fla-cache-probe-{}", std::process::id()));
        assert!(writable(&dir.join("a/b")));
        std::fs::write(dir.join("file"), b"").unwrap();
        // A folder cannot be made under a file.
        assert!(!writable(&dir.join("file/c")));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
