//! Kernel-level tests of the delta-rule family (fused recurrent and chunkwise-parallel forms)
//! against the f64 naive recurrence: output, final state and every gradient (q, k, v, β, g, h0)
//! for random gradients on `o` and `hT`.
//!
//! Runtime: wgpu by default (lavapipe in CI); CUDA when built with `--features cuda` and
//! `FLA_TEST_RUNTIME=cuda`.

use cubecl::prelude::*;
use cubecl::server::Handle;
use fla_cubecl_kernels::delta::{
    delta_backward, delta_chunk_backward, delta_chunk_forward, delta_dqk_in_registers,
    delta_forward, delta_takes_tiles, DeltaBackwardBuffers, DeltaForwardBuffers, DeltaProblem,
    CHECKPOINT_EVERY,
};
use fla_cubecl_kernels::gated::{is_cpu_vulkan, CPU_VULKAN_MAX_SEQ, DEFAULT_CHUNK};
use fla_cubecl_kernels::testing::{decode, encode, rel_rmse, DeltaCase};
use fla_cubecl_kernels::{FloatDType, KernelError};
use rstest::rstest;

use crate::common::{assert_refused, check, runtime_name, tolerance, Refusal};

/// `[B, T, H, HV, K, V]`.
type Dims = [usize; 6];

/// Which form computes the call.
#[derive(Debug, Clone, Copy)]
enum Form {
    Recurrent,
    /// The chunkwise-parallel form with this chunk size.
    Chunk(usize),
}

const CHUNK: Form = Form::Chunk(DEFAULT_CHUNK);

fn problem(
    gated: bool,
    [batch, seq_len, heads, v_heads, k_dim, v_dim]: Dims,
    cu_seqlens: Option<Vec<usize>>,
    states: bool,
    dtype: FloatDType,
) -> DeltaProblem {
    DeltaProblem {
        batch,
        seq_len,
        heads,
        v_heads,
        k_dim,
        v_dim,
        gated,
        scale: (k_dim as f32).powf(-0.5),
        cu_seqlens,
        has_initial_state: states,
        output_final_state: states,
        dtype,
    }
}

fn case(gated: bool, dims: Dims, strength: f64, states: bool, dtype: FloatDType) -> DeltaCase {
    let seed = dims.iter().fold(gated as u64, |a, &d| a * 31 + d as u64);
    DeltaCase::new(problem(gated, dims, None, states, dtype), strength, seed)
}

struct Outputs {
    o: Vec<f64>,
    ht: Option<Vec<f64>>,
    dq: Vec<f64>,
    dk: Vec<f64>,
    dv: Vec<f64>,
    dbeta: Vec<f64>,
    dg: Option<Vec<f64>>,
    dh0: Option<Vec<f64>>,
}

fn run_kernels<R: Runtime>(
    client: &ComputeClient<R>,
    c: &DeltaCase,
    form: Form,
) -> Result<Outputs, KernelError> {
    let dt = c.p.dtype;
    let f32t = FloatDType::F32;
    let up = |xs: &[f64]| client.create_from_slice(&encode(dt, xs));
    let up32 = |xs: &[f64]| client.create_from_slice(&encode(f32t, xs));
    // Outputs start as NaN, so an element the kernels never write fails the comparison.
    let poison = |n: usize, d: FloatDType| client.create_from_slice(&encode(d, &vec![f64::NAN; n]));
    let down = |h: &Handle, d: FloatDType| decode(d, &client.read_one_unchecked(h.clone()));
    let (qk, vo, sc) = c.p.lens();
    let (q, k, v, beta) = (up(&c.q), up(&c.k), up(&c.v), up(&c.beta));
    let g = c.g.as_deref().map(up);
    let h0 = c.h0.as_deref().map(up32);
    let o = poison(vo, dt);
    let ht =
        c.p.output_final_state
            .then(|| poison(c.p.state_len(), f32t));
    let fwd = DeltaForwardBuffers {
        q: &q,
        k: &k,
        v: &v,
        beta: &beta,
        g: g.as_ref(),
        h0: h0.as_ref(),
        o: &o,
        ht: ht.as_ref(),
    };
    match form {
        Form::Recurrent => delta_forward(client, &c.p, fwd)?,
        Form::Chunk(size) => delta_chunk_forward(client, &c.p, size, fwd)?,
    }
    let d_o = up(&c.d_o);
    let d_ht = c.d_ht.as_deref().map(up32);
    let (dq, dk, dv, dbeta) = (
        poison(qk, dt),
        poison(qk, dt),
        poison(vo, dt),
        poison(sc, dt),
    );
    let dg = g.as_ref().map(|_| poison(sc, dt));
    let dh0 = h0.as_ref().map(|_| poison(c.p.state_len(), f32t));
    let bwd = DeltaBackwardBuffers {
        q: &q,
        k: &k,
        v: &v,
        beta: &beta,
        g: g.as_ref(),
        h0: h0.as_ref(),
        d_o: &d_o,
        d_ht: d_ht.as_ref(),
        dq: &dq,
        dk: &dk,
        dv: &dv,
        dbeta: &dbeta,
        dg: dg.as_ref(),
        dh0: dh0.as_ref(),
    };
    match form {
        Form::Recurrent => delta_backward(client, &c.p, bwd)?,
        Form::Chunk(size) => delta_chunk_backward(client, &c.p, size, bwd)?,
    }
    Ok(Outputs {
        o: down(&o, dt),
        ht: ht.as_ref().map(|h| down(h, f32t)),
        dq: down(&dq, dt),
        dk: down(&dk, dt),
        dv: down(&dv, dt),
        dbeta: down(&dbeta, dt),
        dg: dg.as_ref().map(|h| down(h, dt)),
        dh0: dh0.as_ref().map(|h| down(h, f32t)),
    })
}

/// `dβ` and `dg` are sums over the whole state of products whose terms cancel (the gated family's
/// gate gradients have the same property), so f32 rounding gives them a looser bound.
fn scalar_tolerance(dtype: FloatDType) -> f64 {
    match dtype {
        FloatDType::F32 => 1e-3,
        FloatDType::F16 | FloatDType::BF16 => 2e-2,
    }
}

fn compare<R: Runtime>(client: &ComputeClient<R>, c: &DeltaCase, form: Form) {
    let out = run_kernels(client, c, form).expect("kernels launch");
    let (fwd, grads) = c.reference();
    let tol = tolerance(c.p.dtype);
    let stol = scalar_tolerance(c.p.dtype);
    check("o", &out.o, &fwd.o, tol);
    if let Some(ht) = &out.ht {
        check("ht", ht, &fwd.ht, tol);
    }
    check("dq", &out.dq, &grads.dq, tol);
    check("dk", &out.dk, &grads.dk, tol);
    check("dv", &out.dv, &grads.dv, tol);
    check("dbeta", &out.dbeta, &grads.dbeta, stol);
    match (&out.dg, &grads.dg) {
        (Some(dg), Some(r)) => check("dg", dg, r, stol),
        (None, None) => {}
        _ => panic!("dg present in one of kernel and reference only"),
    }
    if let Some(dh0) = &out.dh0 {
        check("dh0", dh0, grads.dh0.as_ref().unwrap(), tol);
    }
}

#[rstest]
#[case::t1([2, 1, 2, 2, 16, 16])]
#[case::t63_odd_dims([2, 63, 2, 2, 60, 100])]
#[case::t65_k_gt_v([1, 65, 2, 2, 100, 60])]
#[case::t100_k128([1, 100, 1, 1, 128, 128])]
#[case::t7_k256_v32([1, 7, 1, 1, 256, 32])]
#[case::t40_k256([1, 40, 1, 1, 256, 256])]
fn sizes(
    #[case] dims: Dims,
    #[values(false, true)] gated: bool,
    #[values(Form::Recurrent, CHUNK)] form: Form,
) {
    let c = case(gated, dims, 1.0, true, FloatDType::F32);
    on_runtime!(compare(&c, form));
}

/// Spans of exactly one checkpoint interval, one step over, one under.
#[rstest]
fn checkpoint_boundaries(
    #[values(CHECKPOINT_EVERY - 1, CHECKPOINT_EVERY, CHECKPOINT_EVERY + 1, 3 * CHECKPOINT_EVERY)]
    t: usize,
) {
    let c = case(true, [1, t, 1, 2, 32, 48], 1.0, true, FloatDType::F32);
    on_runtime!(compare(&c, Form::Recurrent));
}

/// Sequences of one chunk less one position, exactly one, one more, and several, with a small
/// chunk so that the solve, the state pass and the decay sums cross many chunk boundaries.
#[rstest]
fn chunk_boundaries(#[values(15, 16, 17, 53)] t: usize, #[values(false, true)] gated: bool) {
    let c = case(gated, [2, t, 1, 2, 32, 48], 1.0, true, FloatDType::F32);
    on_runtime!(compare(&c, Form::Chunk(16)));
}

#[rstest]
fn t1500(#[values(false, true)] gated: bool, #[values(Form::Recurrent, CHUNK)] form: Form) {
    let c = case(gated, [1, 1500, 1, 1, 64, 64], 1.0, true, FloatDType::F32);
    on_runtime!(compare(&c, form));
}

#[rstest]
fn grouped_value_heads(
    #[values(1, 2, 4)] ratio: usize,
    #[values(false, true)] gated: bool,
    #[values(Form::Recurrent, CHUNK)] form: Form,
) {
    let c = case(
        gated,
        [2, 37, 2, 2 * ratio, 32, 24],
        1.0,
        true,
        FloatDType::F32,
    );
    on_runtime!(compare(&c, form));
}

/// Value heads wider than `MAX_HEAD_DIM` (FLA's 1.3B Gated DeltaNet has V = 512): each state
/// column evolves on its own, and the kernels split the value axis across cubes, so V = 520 (a
/// multiple of no value block) with grouped value heads must match the reference in both forms,
/// across a chunk boundary, with both states and every gradient.
#[rstest]
fn wide_values(#[values(false, true)] gated: bool, #[values(Form::Recurrent, CHUNK)] form: Form) {
    let c = case(gated, [1, 70, 1, 2, 32, 520], 1.0, true, FloatDType::F32);
    on_runtime!(compare(&c, form));
}

/// V-wide tiles of the tile-product chunk kernels (`vp` past 256): at chunk 32, K = 128,
/// V = 320 their shared memory fits a GPU's (an H200's 227 KB), so there the WY kernel, the walk
/// and the backward's tiled passes run with them; lavapipe's smaller shared memory sends the call
/// to the plain kernels, which must agree as well.
#[rstest]
fn wide_values_on_tiles(#[values(false, true)] gated: bool) {
    let c = case(gated, [1, 70, 1, 2, 128, 320], 1.0, true, FloatDType::F32);
    on_runtime!(compare_wide_on_tiles(&c));
}

fn compare_wide_on_tiles<R: Runtime>(client: &ComputeClient<R>, c: &DeltaCase) {
    if !is_cpu_vulkan(client) {
        assert!(
            delta_takes_tiles(client, &c.p, 32),
            "on a GPU, chunk 32 at V = 320 must take the tile-product path"
        );
    }
    compare(client, c, Form::Chunk(32));
}

#[rstest]
fn gate_strength(
    #[values(0.1, 1.0, 10.0)] strength: f64,
    #[values(Form::Recurrent, Form::Chunk(32))] form: Form,
) {
    let c = case(true, [1, 80, 2, 2, 60, 16], strength, true, FloatDType::F32);
    on_runtime!(compare(&c, form));
}

#[rstest]
fn without_states(
    #[values(false, true)] gated: bool,
    #[values(Form::Recurrent, CHUNK)] form: Form,
) {
    let c = case(gated, [2, 33, 2, 4, 32, 48], 1.0, false, FloatDType::F32);
    on_runtime!(compare(&c, form));
}

#[rstest]
fn varlen_with_empty_sequence(
    #[values(false, true)] gated: bool,
    #[values(Form::Recurrent, CHUNK)] form: Form,
) {
    // Lengths 1, 33, 0 (empty), 100.
    let cu = vec![0, 1, 34, 34, 134];
    let p = problem(
        gated,
        [1, 134, 2, 4, 64, 60],
        Some(cu),
        true,
        FloatDType::F32,
    );
    let c = DeltaCase::new(p, 1.0, 11);
    on_runtime!(compare(&c, form));
}

/// The tile-product path (WY kernel and walk) at chunk 16 on what the cases above give the
/// default chunk: head dims that are not multiples of 16, a varlen batch with an empty sequence,
/// no states. On a GPU the default chunk already takes that path; lavapipe's shared memory holds
/// the tiles of chunk 16 only, so this case keeps it tested in CI. One case with everything at
/// once and small dims, because lavapipe compiles each variant of the unrolled tiles for minutes.
#[test]
fn tiled_path_odd_dims_varlen_without_states() {
    // Lengths 1, 17, 0 (empty), 32.
    let cu = vec![0, 1, 18, 18, 50];
    let p = problem(
        true,
        [1, 50, 1, 2, 20, 12],
        Some(cu),
        false,
        FloatDType::F32,
    );
    let c = DeltaCase::new(p, 1.0, 17);
    on_runtime!(compare_on_tiles(&c, 16));
}

/// The WY kernel's inverse merges its 16-row diagonal blocks once at chunk 32, twice at 48 (the
/// second merge with a shorter lower block) and at 64 (the default on a GPU). Lavapipe's 32 KB of
/// shared memory holds the tiles of chunk 32 at these dims, not those of 48 or 64 (it computes
/// them on the plain kernels, which must agree as well); a GPU takes the tiles at all three.
/// T = 100 ends mid-chunk at each size.
#[rstest]
fn tiled_inverse_merges(#[values(32, 48, 64)] chunk: usize, #[values(false, true)] gated: bool) {
    let c = case(gated, [1, 100, 1, 2, 16, 16], 1.0, true, FloatDType::F32);
    on_runtime!(compare_merges(&c, chunk));
}

/// Strong decays (20x FLA's gate initialisation: `Λ` falls past −88 within 16 steps) in a chunk
/// that ends part-way through its second 16-row block (T = 52 at chunk 32: 20 rows), on the tile
/// products: the WY kernel's rows past the chunk's end must not turn `exp(Λ_r − Λ_s)` into an
/// overflow (`0 · inf` is NaN, which the blocked inverse's merge carries into the block's rows
/// inside the chunk through the zeros above its diagonal).
#[rstest]
fn strong_gates_in_a_partial_chunk_on_tiles(#[values(false, true)] states: bool) {
    let c = case(true, [1, 52, 1, 2, 16, 16], 20.0, states, FloatDType::F32);
    on_runtime!(compare_on_tiles(&c, 32));
}

fn compare_merges<R: Runtime>(client: &ComputeClient<R>, c: &DeltaCase, chunk: usize) {
    if chunk == 32 || !is_cpu_vulkan(client) {
        compare_on_tiles(client, c, chunk);
    } else {
        compare(client, c, Form::Chunk(chunk));
    }
}

fn compare_on_tiles<R: Runtime>(client: &ComputeClient<R>, c: &DeltaCase, chunk: usize) {
    assert!(
        delta_takes_tiles(client, &c.p, chunk),
        "chunk {chunk} must take the tile-product path"
    );
    compare(client, c, Form::Chunk(chunk));
}

#[rstest]
fn half_precision(
    #[values(FloatDType::F16, FloatDType::BF16)] dtype: FloatDType,
    #[values(false, true)] gated: bool,
    #[values(Form::Recurrent, CHUNK)] form: Form,
) {
    let c = case(gated, [2, 200, 2, 2, 64, 64], 1.0, true, dtype);
    on_runtime!(half_or_refused(&c, form));
}

/// The chunk form in f16 on odd and round sizes, grouped value heads and a variable-length batch
/// with an empty sequence, against the f64 recurrence at the half-precision tolerances: every
/// tensor-core path of the chunk kernels where the device has them (on CUDA, by default, the
/// backward's `dq`/`dk⁻`/`dW` kernel in registers: K = 256 takes two key blocks of 128, K = 60
/// and 100 zero-padded blocks; `FLA_DELTA_FRAG=0` tests the tiled kernel there instead).
#[rstest]
#[case::t1([1, 1, 1, 1, 16, 16], None, false)]
#[case::t63_k60_v100_grouped([1, 63, 1, 2, 60, 100], None, true)]
#[case::t65_k100_v60([1, 65, 2, 2, 100, 60], None, false)]
#[case::t130_k256([1, 130, 1, 1, 256, 128], None, true)]
#[case::varlen_empty([1, 134, 2, 4, 64, 60], Some(vec![0, 1, 34, 34, 134]), true)]
fn chunk_half_sizes(#[case] dims: Dims, #[case] cu: Option<Vec<usize>>, #[case] gated: bool) {
    let p = problem(gated, dims, cu, true, FloatDType::F16);
    let seed = dims
        .iter()
        .fold(gated as u64 + 7, |a, &d| a * 31 + d as u64);
    let c = DeltaCase::new(p, 1.0, seed);
    on_runtime!(half_or_refused(&c, CHUNK));
}

/// The backward's `dq`/`dk⁻`/`dW` kernel with its accumulators in registers is CUDA's (manual
/// MMA) in half precision, on by default and off where `FLA_DELTA_FRAG` lacks bit 1: by
/// default the half-precision cases above (and every other chunk case in f16/bf16) run through
/// it on CUDA.
#[test]
fn dqk_register_kernel_choice() {
    on_runtime!(check_dqk_choice());
}

fn check_dqk_choice<R: Runtime>(client: &ComputeClient<R>) {
    let asked = std::env::var("FLA_DELTA_FRAG")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(fla_cubecl_kernels::delta::DEFAULT_DELTA_FRAG)
        & 1
        != 0;
    for dtype in [FloatDType::F32, FloatDType::F16, FloatDType::BF16] {
        if dtype.check_supported(client).is_err() {
            continue;
        }
        for gated in [false, true] {
            let p = problem(gated, [2, 200, 2, 2, 64, 64], None, true, dtype);
            let expected = runtime_name() == "cuda" && dtype != FloatDType::F32 && asked;
            assert_eq!(
                delta_dqk_in_registers(client, &p),
                expected,
                "{dtype:?}, gated {gated}"
            );
        }
    }
}

/// Where the device computes the dtype the kernels must match the reference; where it cannot
/// (bf16 on Vulkan) the launch must be refused with `UnsupportedDType`.
fn half_or_refused<R: Runtime>(client: &ComputeClient<R>, c: &DeltaCase, form: Form) {
    match c.p.dtype.check_supported(client) {
        Ok(()) => compare(client, c, form),
        Err(_) => match run_kernels(client, c, form) {
            Err(KernelError::UnsupportedDType { .. }) => {}
            Err(other) => panic!("expected UnsupportedDType, got {other}"),
            Ok(_) => panic!("an unsupported dtype was launched"),
        },
    }
}

/// Half-precision error of `o` at T = 4096 against the f64 recurrence on the same rounded inputs,
/// no worse than FLA 0.6.0's own kernels measured against an f32 recurrence (relative RMSE
/// 4.4e-3 for `chunk_delta_rule`, 3.8e-3 for `chunk_gated_delta_rule`, issue 4).
#[rstest]
fn half_precision_error_at_4096(
    #[values(FloatDType::F16, FloatDType::BF16)] dtype: FloatDType,
    #[values(false, true)] gated: bool,
    #[values(Form::Recurrent, CHUNK)] form: Form,
) {
    let c = case(gated, [1, 4096, 1, 1, 128, 128], 1.0, false, dtype);
    on_runtime!(half_error_bounded(&c, form));
}

fn half_error_bounded<R: Runtime>(client: &ComputeClient<R>, c: &DeltaCase, form: Form) {
    if c.p.dtype.check_supported(client).is_err() {
        return half_or_refused(client, c, form);
    }
    let out = run_kernels(client, c, form).expect("kernels launch");
    let (fwd, _) = c.reference();
    let err = rel_rmse(&out.o, &fwd.o);
    let fla = if c.p.gated { 3.8e-3 } else { 4.4e-3 };
    eprintln!(
        "{} gated={} {form:?} o relative RMSE at T=4096: {err:.3e} (FLA {fla:e})",
        c.p.dtype.name(),
        c.p.gated
    );
    assert!(err <= fla, "relative RMSE {err:e} exceeds FLA's {fla:e}");
}

fn expect_invalid<R: Runtime>(client: &ComputeClient<R>, c: &DeltaCase, what: &str, form: Form) {
    assert_refused(run_kernels(client, c, form), Refusal::InvalidProblem, what);
}

#[rstest]
fn value_heads_must_be_a_multiple(#[values(Form::Recurrent, CHUNK)] form: Form) {
    let mut c = case(true, [1, 8, 2, 4, 16, 16], 1.0, true, FloatDType::F32);
    c.p.v_heads = 3;
    on_runtime!(expect_invalid(&c, "multiple", form));
}

#[rstest]
fn zero_length_refused(#[values(Form::Recurrent, CHUNK)] form: Form) {
    let mut c = case(false, [1, 4, 1, 1, 16, 16], 1.0, true, FloatDType::F32);
    c.p.seq_len = 0;
    on_runtime!(expect_invalid(&c, "zero-length", form));
}

#[rstest]
fn gate_flag_must_match_buffer(#[values(Form::Recurrent, CHUNK)] form: Form) {
    let mut c = case(true, [1, 4, 1, 1, 16, 16], 1.0, true, FloatDType::F32);
    c.p.gated = false;
    on_runtime!(expect_invalid(&c, "gated", form));
}

#[rstest]
#[case::not_increasing(vec![0, 10, 5, 20], "non-decreasing")]
#[case::wrong_end(vec![0, 10, 19], "end at T")]
fn bad_cu_seqlens(
    #[case] cu: Vec<usize>,
    #[case] what: &str,
    #[values(Form::Recurrent, CHUNK)] form: Form,
) {
    let p = problem(true, [1, 20, 1, 1, 16, 16], Some(cu), true, FloatDType::F32);
    let c = DeltaCase::new(p, 1.0, 3);
    on_runtime!(expect_invalid(&c, what, form));
}

/// The longest sequence lavapipe runs: the recurrent backward walks each step three times (the
/// forward replay, the span replay, the backward walk), and lavapipe counts every loop iteration
/// of an invocation, so check both forms right at the limit.
#[rstest]
fn at_the_cpu_vulkan_limit(#[values(Form::Recurrent, CHUNK)] form: Form) {
    let c = case(
        true,
        [1, CPU_VULKAN_MAX_SEQ, 1, 1, 16, 16],
        1.0,
        true,
        FloatDType::F32,
    );
    on_runtime!(compare(&c, form));
}

/// T = 65536 with strong decays (log gates scaled by 10): on a GPU no NaN or infinity anywhere
/// in the outputs or gradients; on lavapipe, past its loop limit, a `DeviceLimit` refusal.
#[rstest]
fn t65536_stable_or_refused(
    #[values(false, true)] gated: bool,
    #[values(Form::Recurrent, CHUNK)] form: Form,
) {
    let c = case(gated, [1, 65536, 1, 2, 64, 64], 10.0, true, FloatDType::F32);
    on_runtime!(refused_on_cpu_vulkan(&c, form));
}

/// More sequences times value heads than a grid axis holds (65535 on CUDA's y axis and on every
/// wgpu axis): a `DeviceLimit` on every runtime, not a failed launch or unwritten outputs.
#[rstest]
fn grid_past_the_device_limit_refused(#[values(Form::Recurrent, CHUNK)] form: Form) {
    let c = case(
        false,
        [70_000, 1, 1, 1, 16, 16],
        1.0,
        false,
        FloatDType::F32,
    );
    on_runtime!(expect_device_limit(&c, "grid", form));
}

/// The chunk backward's dβ/dg pass walks a whole chunk over K + V in one invocation: at V = 900
/// that passes lavapipe's loop limit, so there it is refused; a GPU runs it against the reference.
#[test]
fn wide_values_chunk_backward_within_the_cpu_loop_limit() {
    let c = case(true, [1, 70, 1, 1, 32, 900], 1.0, true, FloatDType::F32);
    on_runtime!(compare_or_refused_on_cpu_vulkan(&c, CHUNK));
}

fn compare_or_refused_on_cpu_vulkan<R: Runtime>(
    client: &ComputeClient<R>,
    c: &DeltaCase,
    form: Form,
) {
    if is_cpu_vulkan(client) {
        expect_device_limit(client, c, "loop iterations", form);
    } else {
        compare(client, c, form);
    }
}

fn expect_device_limit<R: Runtime>(
    client: &ComputeClient<R>,
    c: &DeltaCase,
    what: &str,
    form: Form,
) {
    assert_refused(run_kernels(client, c, form), Refusal::DeviceLimit, what);
}

fn refused_on_cpu_vulkan<R: Runtime>(client: &ComputeClient<R>, c: &DeltaCase, form: Form) {
    let result = run_kernels(client, c, form);
    if is_cpu_vulkan(client) {
        assert!(
            matches!(result, Err(KernelError::DeviceLimit(_))),
            "expected DeviceLimit on lavapipe"
        );
    } else {
        let out = result.expect("a GPU runs long sequences");
        assert_eq!(
            (out.ht.is_some(), out.dg.is_some(), out.dh0.is_some()),
            (c.p.output_final_state, c.p.gated, c.p.has_initial_state),
            "hT, dg and dh0 come back exactly where the problem asks for them"
        );
        let named = [
            ("o", &out.o),
            ("dq", &out.dq),
            ("dk", &out.dk),
            ("dv", &out.dv),
            ("dbeta", &out.dbeta),
        ];
        let named_opt = [("ht", &out.ht), ("dg", &out.dg), ("dh0", &out.dh0)];
        for (name, xs) in named.into_iter().chain(
            named_opt
                .into_iter()
                .filter_map(|(n, x)| x.as_ref().map(|x| (n, x))),
        ) {
            assert!(xs.iter().all(|x| x.is_finite()), "{name}: NaN or infinity");
        }
    }
}
