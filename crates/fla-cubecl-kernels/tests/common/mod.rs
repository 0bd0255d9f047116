//! Helpers shared by the kernel-level test files: the runtime under test, tolerances, checks.

#![allow(dead_code)]

use fla_cubecl_kernels::testing::rel_rmse;
use fla_cubecl_kernels::FloatDType;

/// Relative-RMSE bound per dtype, against the f64 recurrence on the same (rounded) inputs.
pub fn tolerance(dtype: FloatDType) -> f64 {
    match dtype {
        // CUDA's fast exp and fused multiply-adds differ from the f64 path more than lavapipe's.
        FloatDType::F32 if runtime_name() == "cuda" => 1e-4,
        FloatDType::F32 => 1e-5,
        FloatDType::F16 | FloatDType::BF16 => 1e-2,
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
                let client = cubecl::wgpu::WgpuRuntime::client(&Default::default());
                $f::<cubecl::wgpu::WgpuRuntime>(&client, $($arg),*)
            }
            #[cfg(not(feature = "wgpu"))]
            other => panic!("runtime {other} not compiled in"),
        }
    }};
}
