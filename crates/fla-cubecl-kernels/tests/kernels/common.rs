//! Helpers shared by the kernel-level test files: the runtime under test, tolerances, checks.

#![allow(dead_code)]

use fla_cubecl_kernels::testing::rel_rmse;
use fla_cubecl_kernels::{FloatDType, KernelError};

/// Relative-RMSE bound per dtype, against the f64 recurrence on the same (rounded) inputs.
pub fn tolerance(dtype: FloatDType) -> f64 {
    match dtype {
        // CUDA's fast exp and fused multiply-adds differ from the f64 path more than lavapipe's.
        FloatDType::F32 if runtime_name() == "cuda" => 1e-4,
        FloatDType::F32 => 1e-5,
        FloatDType::F16 | FloatDType::BF16 => 1e-2,
    }
}

/// The error a refused call must return.
#[derive(Debug, Clone, Copy)]
pub enum Refusal {
    InvalidProblem,
    DeviceLimit,
}

/// Asserts that a call was refused with the `expected` kind of error, and that its message
/// mentions `what`.
pub fn assert_refused<T>(result: Result<T, KernelError>, expected: Refusal, what: &str) {
    let msg = match (expected, result) {
        (Refusal::InvalidProblem, Err(KernelError::InvalidProblem(msg)))
        | (Refusal::DeviceLimit, Err(KernelError::DeviceLimit(msg))) => msg,
        (_, Err(other)) => panic!("expected {expected:?}({what}), got {other}"),
        (_, Ok(_)) => panic!("a call that must be refused was accepted: {what}"),
    };
    assert!(
        msg.contains(what),
        "error {msg:?} does not mention {what:?}"
    );
}

/// Whether the device under test computes `dtype` (lavapipe: no bf16).
pub fn computes<R: cubecl::Runtime>(
    client: &cubecl::prelude::ComputeClient<R>,
    dtype: FloatDType,
) -> bool {
    dtype.check_supported(client).is_ok()
}

/// Asserts that a call in a `dtype` the device does not compute was refused, naming the dtype;
/// CUDA computes all three, so there a refusal is itself the failure.
pub fn assert_dtype_refused<T>(result: Result<T, KernelError>, dtype: FloatDType) {
    assert!(runtime_name() != "cuda", "CUDA computes {dtype:?}");
    match result {
        Err(KernelError::UnsupportedDType { dtype: name, .. }) => assert_eq!(name, dtype.name()),
        Err(other) => panic!("expected an unsupported-dtype error, got {other}"),
        Ok(_) => panic!("a {dtype:?} call the device cannot compute was accepted"),
    }
}

pub fn check(name: &str, out: &[f64], reference: &[f64], tol: f64) {
    let err = rel_rmse(out, reference);
    if err.is_nan() {
        let bad: Vec<usize> = (0..out.len())
            .filter(|&i| out[i].is_nan())
            .take(5)
            .collect();
        let bad_ref = reference.iter().filter(|x| x.is_nan()).count();
        eprintln!(
            "{name}: NaN in output at {bad:?} (of {}), {bad_ref} NaN in reference",
            out.len()
        );
    }
    assert!(
        err <= tol,
        "{name}: relative RMSE {err:e} exceeds {tol:e} (len {})",
        out.len()
    );
}

/// The dtype of cases that do not name one: `f32`, or what `FLA_TEST_DTYPE` asks for (`bf16`,
/// `f16`), so a GPU run can send every case through the tensor-core path, which `f32` skips.
pub fn base_dtype() -> FloatDType {
    match std::env::var("FLA_TEST_DTYPE").as_deref() {
        Ok("bf16") => FloatDType::BF16,
        Ok("f16") => FloatDType::F16,
        _ => FloatDType::F32,
    }
}

pub fn runtime_name() -> &'static str {
    let wanted = std::env::var("FLA_TEST_RUNTIME").unwrap_or_default();
    if cfg!(feature = "cuda") && (wanted == "cuda" || !cfg!(feature = "wgpu")) {
        "cuda"
    } else {
        "wgpu"
    }
}

/// Runs `$f::<Runtime>(&client, args...)` on the runtime the tests were asked for.
macro_rules! on_runtime {
    ($f:ident($($arg:expr),*)) => {{
        match runtime_name() {
            #[cfg(feature = "cuda")]
            "cuda" => {
                let client = cubecl::cuda::CudaRuntime::client(&Default::default());
                $f::<cubecl::cuda::CudaRuntime>(&client, $($arg),*)
            }
            #[cfg(feature = "wgpu")]
            _ => {
                let lease = $crate::common::WgpuLease::take();
                let client = cubecl::wgpu::WgpuRuntime::client(lease.device());
                $f::<cubecl::wgpu::WgpuRuntime>(&client, $($arg),*)
            }
            #[cfg(not(feature = "wgpu"))]
            other => panic!("runtime {other} not compiled in"),
        }
    }};
}

/// The wgpu device a kernel test runs on, held for the test's duration.
///
/// CubeCL compiles a client's kernels on that client's own server thread, and on lavapipe
/// compiling is most of a kernel test's time (LLVM lowering the unrolled kernels' barriers into
/// coroutines: two thirds of a profile of one attention test). With one client, two test
/// threads compile one at a time on two cores. On lavapipe a test therefore takes whichever of
/// two clients of the same CPU adapter (`DefaultDevice`, `Cpu`) fewer running tests hold; the
/// results do not depend on which. On a GPU: always the default device.
#[cfg(feature = "wgpu")]
pub struct WgpuLease(Option<usize>);

#[cfg(feature = "wgpu")]
static HOLDERS: [std::sync::atomic::AtomicUsize; 2] = [
    std::sync::atomic::AtomicUsize::new(0),
    std::sync::atomic::AtomicUsize::new(0),
];

#[cfg(feature = "wgpu")]
static DEVICES: [cubecl::wgpu::WgpuDevice; 2] = [
    cubecl::wgpu::WgpuDevice::DefaultDevice,
    cubecl::wgpu::WgpuDevice::Cpu,
];

#[cfg(feature = "wgpu")]
impl WgpuLease {
    pub fn take() -> Self {
        use cubecl::Runtime;
        use std::sync::atomic::Ordering;
        let default = cubecl::wgpu::WgpuRuntime::client(&DEVICES[0]);
        if !fla_cubecl_kernels::gated::is_cpu_vulkan(&default) {
            return WgpuLease(None);
        }
        let i = usize::from(HOLDERS[1].load(Ordering::SeqCst) < HOLDERS[0].load(Ordering::SeqCst));
        HOLDERS[i].fetch_add(1, Ordering::SeqCst);
        WgpuLease(Some(i))
    }

    pub fn device(&self) -> &'static cubecl::wgpu::WgpuDevice {
        &DEVICES[self.0.unwrap_or(0)]
    }
}

#[cfg(feature = "wgpu")]
impl Drop for WgpuLease {
    fn drop(&mut self) {
        if let Some(i) = self.0 {
            HOLDERS[i].fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        }
    }
}
