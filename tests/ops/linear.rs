//! The matrix-product op (`fla::ops::matmul`, `fla::ops::linear`) end to end: cuBLASLt on CUDA
//! (`Cuda` and its `CubeBackend`), Burn's matmul on wgpu and NdArray, under `Autodiff`, against
//! an f64 reference for the output and every gradient (input, weight, bias), with the weight as
//! stored and as a transposed view (how Burn keeps a loaded checkpoint's `[out, in]` weight),
//! at odd sizes; half precision; the typed errors of bad input.

use crate::common::{self, check, half_tolerance, runtime_name, tensor, values, Impl};
use burn::backend::Autodiff;
use burn::tensor::{FloatDType, Tensor};
use fla::kernels::testing::Rng;
use fla::ops::{linear, matmul, MatmulBackend};
use fla::FlaError;
use rstest::rstest;

struct Case {
    /// `[b, t, d_in]` and `d_out`.
    x_shape: [usize; 3],
    d_out: usize,
    x: Vec<f64>,
    /// `[d_in, d_out]`, row-major.
    w: Vec<f64>,
    bias: Option<Vec<f64>>,
    dy: Vec<f64>,
}

fn case(x_shape: [usize; 3], d_out: usize, bias: bool, seed: u64) -> Case {
    let mut rng = Rng::new(seed);
    let mut normals =
        |n: usize| -> Vec<f64> { (0..n).map(|_| rng.normal() as f32 as f64).collect() };
    let (rows, d_in) = (x_shape[0] * x_shape[1], x_shape[2]);
    Case {
        x_shape,
        d_out,
        x: normals(rows * d_in),
        w: normals(d_in * d_out),
        bias: bias.then(|| normals(d_out)),
        dy: normals(rows * d_out),
    }
}

/// `[r, k] · [k, c]`, row-major, in f64.
fn product(a: &[f64], b: &[f64], r: usize, k: usize, c: usize) -> Vec<f64> {
    let mut out = vec![0.0; r * c];
    for i in 0..r {
        for l in 0..k {
            let a = a[i * k + l];
            for j in 0..c {
                out[i * c + j] += a * b[l * c + j];
            }
        }
    }
    out
}

fn transpose(x: &[f64], rows: usize, cols: usize) -> Vec<f64> {
    (0..rows * cols)
        .map(|e| x[(e % rows) * cols + e / rows])
        .collect()
}

/// `y`, `dx`, `dw` and `db` (empty without a bias) of `Σ y ∘ dy` in f64.
fn reference(c: &Case) -> [Vec<f64>; 4] {
    let (rows, d_in, d_out) = (c.x_shape[0] * c.x_shape[1], c.x_shape[2], c.d_out);
    let mut y = product(&c.x, &c.w, rows, d_in, d_out);
    if let Some(b) = &c.bias {
        for (e, v) in y.iter_mut().enumerate() {
            *v += b[e % d_out];
        }
    }
    let dx = product(&c.dy, &transpose(&c.w, d_in, d_out), rows, d_out, d_in);
    let dw = product(&transpose(&c.x, rows, d_in), &c.dy, d_in, rows, d_out);
    let db = match c.bias {
        Some(_) => (0..d_out)
            .map(|j| (0..rows).map(|i| c.dy[i * d_out + j]).sum())
            .collect(),
        None => Vec::new(),
    };
    [y, dx, dw, db]
}

/// The op's `y`, `dx`, `dw`, `db` through `Autodiff<B>` in `dt`; `w_view`: the weight stored
/// `[d_out, d_in]` and transposed.
fn run<B: MatmulBackend>(
    c: &Case,
    w_view: bool,
    dt: FloatDType,
) -> Result<[Vec<f64>; 4], FlaError> {
    let device = B::Device::default();
    let [b, t, d_in] = c.x_shape;
    let x = tensor::<Autodiff<B>, 3>(&c.x, c.x_shape, dt, &device).require_grad();
    // The leaf that gets the gradient: the weight as stored, `[d_out, d_in]` for the view.
    let (leaf, w) = if w_view {
        let stored = transpose(&c.w, d_in, c.d_out);
        let leaf = tensor::<Autodiff<B>, 2>(&stored, [c.d_out, d_in], dt, &device).require_grad();
        (leaf.clone(), leaf.transpose())
    } else {
        let leaf = tensor::<Autodiff<B>, 2>(&c.w, [d_in, c.d_out], dt, &device).require_grad();
        (leaf.clone(), leaf)
    };
    let bias = c
        .bias
        .as_ref()
        .map(|v| tensor::<Autodiff<B>, 1>(v, [c.d_out], dt, &device).require_grad());
    let y = linear(x.clone(), w.clone(), bias.clone())?;
    assert_eq!(y.dims(), [b, t, c.d_out]);
    assert_eq!(y.dtype(), dt.into());
    let dy = tensor::<Autodiff<B>, 3>(&c.dy, [b, t, c.d_out], dt, &device);
    let grads = (y.clone() * dy).sum().backward();
    let dw = values(leaf.grad(&grads).expect("gradient reached w"));
    // The view's gradient is the stored weight's, transposed back to `[d_in, d_out]`.
    let dw = if w_view {
        transpose(&dw, c.d_out, d_in)
    } else {
        dw
    };
    Ok([
        values(y.inner()),
        values(x.grad(&grads).expect("gradient reached x")),
        dw,
        bias.map(|b| values(b.grad(&grads).expect("gradient reached the bias")))
            .unwrap_or_default(),
    ])
}

fn run_on(imp: Impl, c: &Case, w_view: bool, dt: FloatDType) -> Result<[Vec<f64>; 4], FlaError> {
    match imp {
        Impl::Fusion => on_gpu!(fusion, run(c, w_view, dt)),
        Impl::Cube => on_gpu!(cube, run(c, w_view, dt)),
        Impl::TensorOps => run::<common::backends::NdArray>(c, w_view, dt),
    }
}

/// f32 bound: 1e-5 where the product is exact f32 (lavapipe, NdArray); 2e-3 on CUDA, where
/// cuBLASLt computes f32 on tensor cores in TF32 (10 bits of mantissa), as Burn's matmul does.
fn f32_tolerance(imp: Impl) -> f64 {
    if imp != Impl::TensorOps && runtime_name() == "cuda" {
        2e-3
    } else {
        1e-5
    }
}

#[rstest]
fn matches_reference(
    #[values(([1, 1, 7], 5), ([2, 33, 100], 60), ([1, 65, 64], 129))] size: ([usize; 3], usize),
    #[values(false, true)] bias: bool,
    #[values(false, true)] w_view: bool,
    #[values(Impl::Fusion, Impl::Cube, Impl::TensorOps)] imp: Impl,
) {
    let (x_shape, d_out) = size;
    let c = case(
        x_shape,
        d_out,
        bias,
        x_shape.iter().product::<usize>() as u64,
    );
    let got = run_on(imp, &c, w_view, FloatDType::F32).expect("valid inputs");
    let want = reference(&c);
    let tol = f32_tolerance(imp);
    for (name, (g, w)) in ["y", "dx", "dw", "db"].iter().zip(got.iter().zip(&want)) {
        assert_eq!(g.len(), w.len(), "{name}: length");
        if !w.is_empty() {
            check(name, g, w, tol);
        }
    }
}

/// A long product (1500 rows: the gradient of the weight sums over them) in f32 and in half
/// precision on the GPU backends.
#[rstest]
fn long_and_half(
    #[values(FloatDType::F32, FloatDType::F16, FloatDType::BF16)] dt: FloatDType,
    #[values(Impl::Fusion, Impl::Cube)] imp: Impl,
) {
    fn dtype_check<B: MatmulBackend>(dt: FloatDType) -> Result<(), FlaError> {
        B::matmul_check_dtype(&Default::default(), dt.into())
    }
    fn supported<B: MatmulBackend>(dt: FloatDType) -> bool {
        dtype_check::<B>(dt).is_ok()
    }
    let c = case([1, 1500, 60], 100, true, 1500);
    if !on_gpu!(fusion, supported(dt)) {
        // The refusal, asked of the check the op runs first, without making operands of the
        // dtype: their cast (at once on the plain backend, at the fused stream's next flush on
        // the other) is a kernel the device cannot compile, which fails its runtime thread for
        // every later test in the process.
        let refusal = match imp {
            Impl::Fusion => on_gpu!(fusion, dtype_check(dt)),
            _ => on_gpu!(cube, dtype_check(dt)),
        };
        assert!(
            matches!(refusal, Err(FlaError::UnsupportedDType { .. })),
            "{dt:?}: {refusal:?}"
        );
        return;
    }
    let got = run_on(imp, &c, true, dt);
    let got = got.expect("valid inputs");
    let want = reference(&c);
    let tol = if dt == FloatDType::F32 {
        f32_tolerance(imp)
    } else {
        half_tolerance(dt)
    };
    for (name, (g, w)) in ["y", "dx", "dw", "db"].iter().zip(got.iter().zip(&want)) {
        check(name, g, w, tol);
    }
}

/// The errors' messages; `mixed`: include operands of two dtypes (NdArray<f32> holds f32 only).
fn refused<B: MatmulBackend>(mixed: bool) -> Vec<String> {
    let device = B::Device::default();
    let m = |r: usize, c: usize| Tensor::<B, 2>::zeros([r, c], &device);
    let half = if mixed {
        FloatDType::F16
    } else {
        FloatDType::F32
    };
    let errors = [
        matmul(m(4, 3), m(5, 2)).map(|_| ()),
        matmul(m(0, 3), m(3, 2)).map(|_| ()),
        matmul(m(4, 3), m(3, 2).cast(half)).map(|_| ()),
        linear(Tensor::<B, 3>::zeros([2, 3, 4], &device), m(5, 6), None).map(|_| ()),
        linear(
            Tensor::<B, 3>::zeros([2, 3, 4], &device),
            m(4, 6),
            Some(Tensor::<B, 1>::zeros([5], &device)),
        )
        .map(|_| ()),
    ];
    errors
        .into_iter()
        .enumerate()
        // Without mixed dtypes the third product is valid.
        .filter(|(i, _)| mixed || *i != 2)
        .map(|(_, e)| e.expect_err("bad input must be refused").to_string())
        .collect()
}

fn refused_on(imp: Impl) -> Vec<String> {
    match imp {
        Impl::Fusion => on_gpu!(fusion, refused(true)),
        Impl::Cube => on_gpu!(cube, refused(true)),
        Impl::TensorOps => refused::<common::backends::NdArray>(false),
    }
}

#[rstest]
fn bad_input_is_refused(#[values(Impl::Fusion, Impl::Cube, Impl::TensorOps)] imp: Impl) {
    let e = refused_on(imp);
    let mut expect = vec![
        "inner sizes differ",
        "empty input",
        "share one dtype",
        "last axis must be 5",
        "bias must be [6]",
    ];
    if imp == Impl::TensorOps {
        expect.remove(2);
    }
    assert_eq!(e.len(), expect.len());
    for (got, want) in e.iter().zip(expect) {
        assert!(got.contains(want), "{got:?} should mention {want:?}");
    }
}
