//! Kernel-level tests of the fused RMSNorm (plain and swish-gated) against the f64 reference:
//! `y`, the saved reciprocal RMS, and `dx`, `dw`, `dg` for a random `dy`; row widths that are
//! not multiples of the cube's units (60, 100) and wider than it, one row and many, `ε` that
//! dominates tiny rows, and refused input.

use cubecl::prelude::*;
use cubecl::server::Handle;
use fla_cubecl_kernels::norm::{
    norm_backward, norm_forward, NormBackwardBuffers, NormForwardBuffers, NormProblem,
};
use fla_cubecl_kernels::testing::{decode, encode, NormCase};
use fla_cubecl_kernels::{FloatDType, KernelError};
use rstest::rstest;

use crate::common::{
    assert_dtype_refused, assert_refused, base_dtype, check, computes, runtime_name, tolerance,
    Refusal,
};

struct Outputs {
    y: Vec<f64>,
    rstd: Vec<f64>,
    dx: Vec<f64>,
    dw: Vec<f64>,
    dg: Vec<f64>,
}

fn run_kernels<R: Runtime>(
    client: &ComputeClient<R>,
    c: &NormCase,
) -> Result<Outputs, KernelError> {
    let p = &c.p;
    let dt = p.dtype;
    let f32t = FloatDType::F32;
    let up = |xs: &[f64]| client.create_from_slice(&encode(dt, xs));
    // Outputs start as NaN, so an element the kernels never write fails the comparison.
    let poison = |n: usize, d: FloatDType| client.create_from_slice(&encode(d, &vec![f64::NAN; n]));
    let down = |h: &Handle, d: FloatDType| decode(d, &client.read_one_unchecked(h.clone()));
    let n = p.len();
    let (x, w, dy) = (up(&c.x), up(&c.w), up(&c.dy));
    let g = p.gated.then(|| up(&c.g));
    let (y, rstd) = (poison(n, dt), poison(p.rows, f32t));
    norm_forward(
        client,
        p,
        NormForwardBuffers {
            x: &x,
            w: &w,
            g: g.as_ref(),
            y: &y,
            rstd: &rstd,
        },
    )?;
    let (dx, dw) = (poison(n, dt), poison(p.dim, dt));
    let dg = p.gated.then(|| poison(n, dt));
    norm_backward(
        client,
        p,
        NormBackwardBuffers {
            x: &x,
            w: &w,
            g: g.as_ref(),
            rstd: &rstd,
            dy: &dy,
            dx: &dx,
            dw: &dw,
            dg: dg.as_ref(),
        },
    )?;
    Ok(Outputs {
        y: down(&y, dt),
        rstd: down(&rstd, f32t),
        dx: down(&dx, dt),
        dw: down(&dw, dt),
        dg: dg.map(|h| down(&h, dt)).unwrap_or_default(),
    })
}

fn problem(rows: usize, dim: usize, gated: bool, dtype: FloatDType) -> NormProblem {
    NormProblem {
        rows,
        dim,
        eps: 1e-5,
        gated,
        dtype,
    }
}

fn compare(c: &NormCase) {
    let out = on_runtime!(run_kernels(c)).expect("valid problem");
    let (f, g) = c.reference();
    let tol = tolerance(c.p.dtype);
    check("y", &out.y, &f.y, tol);
    check("rstd", &out.rstd, &f.rstd, tol);
    check("dx", &out.dx, &g.dx, tol);
    // dw sums every row's products: half-precision rounding of the result alone is 2^-9.
    check("dw", &out.dw, &g.dw, tol);
    check("dg", &out.dg, &g.dg, tol);
}

#[rstest]
#[case::one_row(1, 64)]
#[case::head_dim_60(7, 60)]
#[case::head_dim_100(65, 100)]
#[case::round(63, 128)]
#[case::gla_value_head(33, 256)]
#[case::hidden_1024(9, 1024)]
#[case::past_one_register_per_unit(5, 4100)]
#[case::many_rows(1500, 16)]
// Rows that no vector load divides evenly but 1 (odd D) or 2 (D = 6).
#[case::odd_dim(7, 33)]
#[case::dim_of_two_vectors(5, 6)]
// More rows than the backward's cubes × row lanes (1024 × 32 at D = 16): lanes walk two rows or
// one, the cube's trip count set by its first row.
#[case::strided_backward(40_000, 16)]
fn matches_reference(#[case] rows: usize, #[case] dim: usize, #[values(false, true)] gated: bool) {
    let seed = (rows * 131 + dim) as u64 * 2 + gated as u64;
    compare(&NormCase::new(
        problem(rows, dim, gated, base_dtype()),
        1.0,
        seed,
    ));
}

/// f16 and bf16 where the device computes them (lavapipe: f16 only); elsewhere the call is
/// refused with the dtype's name, before anything reaches the device.
#[rstest]
fn half_precision(
    #[values(FloatDType::F16, FloatDType::BF16)] dtype: FloatDType,
    #[values(false, true)] gated: bool,
    // D = 100 divides into 16-byte vectors of 4 half-precision entries only, D = 128 into 8.
    #[values(100, 128)] dim: usize,
) {
    let seed = 3 + gated as u64 + dim as u64;
    let c = NormCase::new(problem(65, dim, gated, dtype), 1.0, seed);
    if on_runtime!(computes(dtype)) {
        compare(&c);
    } else {
        assert_dtype_refused(on_runtime!(run_kernels(&c)), dtype);
    }
}

/// Rows whose mean square is far below `ε`: `ε` decides the scale, as in the reference.
#[test]
fn eps_dominates_tiny_rows() {
    let mut p = problem(17, 100, true, base_dtype());
    p.eps = 1e-2;
    compare(&NormCase::new(p, 1e-3, 5));
}

/// Large gates: swish's saturated ends (σ → 0 and 1) stay finite and exact.
#[test]
fn large_gates() {
    compare(&NormCase::new(problem(9, 128, true, base_dtype()), 30.0, 7));
}

fn refuse<R: Runtime>(
    client: &ComputeClient<R>,
    p: NormProblem,
    with_gate: bool,
) -> Result<(), KernelError> {
    let h = client.create_from_slice(&encode(FloatDType::F32, &[0.0; 4]));
    norm_forward(
        client,
        &p,
        NormForwardBuffers {
            x: &h,
            w: &h,
            g: with_gate.then_some(&h),
            y: &h,
            rstd: &h,
        },
    )
}

#[rstest]
#[case::no_rows(problem(0, 64, false, FloatDType::F32), false, "zero-length")]
#[case::no_columns(problem(4, 0, false, FloatDType::F32), false, "zero-length")]
#[case::too_wide(
    problem(1, 40000, false, FloatDType::F32),
    false,
    "more than the fused norm"
)]
#[case::gate_missing(problem(4, 64, true, FloatDType::F32), false, "missing buffer: g")]
#[case::gate_not_asked(problem(4, 64, false, FloatDType::F32), true, "ungated")]
#[case::negative_eps(NormProblem { eps: -1.0, ..problem(4, 64, false, FloatDType::F32) }, false, "eps")]
fn bad_input_is_refused(#[case] p: NormProblem, #[case] with_gate: bool, #[case] what: &str) {
    assert_refused(
        on_runtime!(refuse(p, with_gate)),
        Refusal::InvalidProblem,
        what,
    );
}
