//! cuBLASLt products of CUDA tensors (`fla::ops::blas::matmul`, CUDA builds only) against an f64
//! reference: row-major operands and transposed views, as a linear layer's forward and backward
//! pass them, at odd sizes, in f32 and bf16. The test fails, not skips, where it cannot run:
//! `FLA_TEST_RUNTIME=cuda` must select CUDA.
#![cfg(feature = "cuda")]

use burn::tensor::{FloatDType, Tensor, TensorData};
use rstest::rstest;

use crate::common::backends::CudaCube;
use crate::common::{check, runtime_name, values};

fn matrix(rows: usize, cols: usize, seed: u64) -> Vec<f64> {
    let mut rng = fla::kernels::testing::Rng::new(seed);
    rng.normals(rows * cols, fla::kernels::FloatDType::F32)
}

fn tensor(x: &[f64], rows: usize, cols: usize, dtype: FloatDType) -> Tensor<CudaCube, 2> {
    let data = TensorData::new(
        x.iter().map(|&v| v as f32).collect::<Vec<_>>(),
        [rows, cols],
    );
    Tensor::<CudaCube, 2>::from_data(data, &Default::default()).cast(dtype)
}

/// `[m, k] · [k, n]` in f64, row-major.
fn reference(a: &[f64], b: &[f64], m: usize, k: usize, n: usize) -> Vec<f64> {
    let mut c = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            c[i * n + j] = (0..k).map(|l| a[i * k + l] * b[l * n + j]).sum();
        }
    }
    c
}

fn transpose(x: &[f64], rows: usize, cols: usize) -> Vec<f64> {
    (0..rows * cols)
        .map(|e| x[(e % rows) * cols + e / rows])
        .collect()
}

#[rstest]
fn matches_reference(
    #[values((1, 1, 1), (63, 65, 100), (128, 64, 1500))] mnk: (usize, usize, usize),
    #[values(false, true)] a_view: bool,
    #[values(false, true)] b_view: bool,
    #[values(FloatDType::F32, FloatDType::BF16)] dtype: FloatDType,
) {
    assert_eq!(
        runtime_name(),
        "cuda",
        "set FLA_TEST_RUNTIME=cuda: this test runs on CUDA only"
    );
    let (m, n, k) = mnk;
    let (a, b) = (matrix(m, k, 1), matrix(k, n, 2));
    // A transposed view: the matrix stored transposed, then `.transpose()`d back.
    let a_t = if a_view {
        tensor(&transpose(&a, m, k), k, m, dtype).transpose()
    } else {
        tensor(&a, m, k, dtype)
    };
    let b_t = if b_view {
        tensor(&transpose(&b, k, n), n, k, dtype).transpose()
    } else {
        tensor(&b, k, n, dtype)
    };
    let out = values(fla::ops::blas::matmul(a_t, b_t).expect("valid product"));
    // The reference sees the inputs as rounded to the dtype.
    let round = |x: &[f64]| {
        x.iter()
            .map(|&v| fla::kernels::testing::round_to(fla_dtype(dtype), v))
            .collect::<Vec<_>>()
    };
    let want = reference(&round(&a), &round(&b), m, k, n);
    // f32 runs on tensor cores at reduced precision (TF32), bf16 accumulates in f32 and rounds
    // the output.
    let tol = if dtype == FloatDType::F32 { 2e-3 } else { 1e-2 };
    check("c", &out, &want, tol);
}

fn fla_dtype(d: FloatDType) -> fla::kernels::FloatDType {
    match d {
        FloatDType::BF16 => fla::kernels::FloatDType::BF16,
        FloatDType::F16 => fla::kernels::FloatDType::F16,
        _ => fla::kernels::FloatDType::F32,
    }
}

#[test]
fn mismatched_inner_sizes_are_refused() {
    let a = tensor(&matrix(4, 3, 1), 4, 3, FloatDType::F32);
    let b = tensor(&matrix(5, 2, 2), 5, 2, FloatDType::F32);
    let err = fla::ops::blas::matmul(a, b).expect_err("inner sizes differ");
    assert!(err.to_string().contains("inner sizes differ"), "{err}");
}

/// Products enqueued on CubeCL's stream without host waits must stay in its order with CubeCL's
/// own kernels and its reuse of freed memory: a chain of products and element-wise ops, most
/// intermediates dropped as soon as they are read, against the same chain in f64. Every fourth
/// step's output is kept and checked on its own, so a product that ran early (reading an input
/// not yet written) shows at that step rather than damped by the steps after it.
#[test]
fn chain_stays_in_stream_order() {
    assert_eq!(
        runtime_name(),
        "cuda",
        "set FLA_TEST_RUNTIME=cuda: this test runs on CUDA only"
    );
    let n = 256;
    let w = matrix(n, n, 7)
        .into_iter()
        .map(|v| v / (n as f64).sqrt())
        .collect::<Vec<_>>();
    let mut x = matrix(n, n, 8);
    let wt = tensor(&w, n, n, FloatDType::F32);
    let mut xt = tensor(&x, n, n, FloatDType::F32);
    let mut kept = Vec::new();
    for step in 0..24 {
        // CubeCL kernels between the products: a scale and an add, on fresh buffers.
        xt = fla::ops::blas::matmul(xt, wt.clone()).expect("valid product") * 0.5 + 0.25;
        x = reference(&x, &w, n, n, n)
            .into_iter()
            .map(|v| v * 0.5 + 0.25)
            .collect();
        if step % 8 == 7 {
            // The transposed view of the weight as well, on the same stream.
            xt = fla::ops::blas::matmul(xt, wt.clone().transpose()).expect("valid product");
            x = reference(&x, &transpose(&w, n, n), n, n, n);
        }
        if step % 4 == 3 {
            kept.push((step, xt.clone(), x.clone()));
        }
    }
    for (step, t, want) in kept {
        check(&format!("step {step}"), &values(t), &want, 1e-2);
    }
}
