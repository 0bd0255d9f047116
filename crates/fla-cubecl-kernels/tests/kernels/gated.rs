//! Kernel-level tests of the gated family, fused recurrent and chunk forms, against the f64 naive
//! recurrence.
//!
//! Runtime: wgpu by default (lavapipe in CI); CUDA when built with `--features cuda` and
//! `FLA_TEST_RUNTIME=cuda` (or when it is the only one compiled in).

use cubecl::prelude::*;
use cubecl::server::Handle;
use fla_cubecl_kernels::gated::naive;
use fla_cubecl_kernels::gated::{
    chunk_backward, chunk_forward, chunk_scores_shape, is_cpu_vulkan, recurrent_backward,
    recurrent_forward, simple_scores_layout, BackwardBuffers, ForwardBuffers, GateKind,
    CPU_VULKAN_MAX_SEQ, DEFAULT_CHUNK, VECTOR_CHUNK,
};
use fla_cubecl_kernels::testing::{decode, encode, problem, rel_rmse, GatedCase};
use fla_cubecl_kernels::{FloatDType, KernelError};
use rstest::rstest;

use crate::common::{assert_refused, check, runtime_name, tolerance, Refusal};

#[derive(Clone, Copy, Debug, PartialEq)]
enum Variant {
    LinearAttn,
    SimpleGla,
    Gla,
    GlaWithValueGate,
}

impl Variant {
    fn gate(self) -> GateKind {
        match self {
            Variant::LinearAttn => GateKind::None,
            Variant::SimpleGla => GateKind::Scalar,
            Variant::Gla | Variant::GlaWithValueGate => GateKind::Vector,
        }
    }
}

type Case = GatedCase;

/// Which form of the kernels a test runs.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    Recurrent,
    /// Chunkwise-parallel with this many positions per chunk.
    Chunk(usize),
}

const CHUNK: Mode = Mode::Chunk(DEFAULT_CHUNK);

#[allow(clippy::too_many_arguments)]
fn make_case(
    variant: Variant,
    batch: usize,
    seq_len: usize,
    heads: usize,
    k_dim: usize,
    v_dim: usize,
    strength: f64,
    reverse: bool,
    cu_seqlens: Option<Vec<usize>>,
    states: bool,
    dtype: FloatDType,
) -> Case {
    let p = problem(
        variant.gate(),
        variant == Variant::GlaWithValueGate,
        [batch, seq_len, heads, k_dim, v_dim],
        reverse,
        cu_seqlens,
        states,
        dtype,
    );
    let seed = (seq_len * 7919 + k_dim * 31 + v_dim * 17 + heads) as u64 + variant as u64;
    GatedCase::new(p, strength, seed)
}

struct Outputs {
    o: Vec<f64>,
    ht: Option<Vec<f64>>,
    dq: Vec<f64>,
    dk: Vec<f64>,
    dv: Vec<f64>,
    dg: Option<Vec<f64>>,
    dgv: Option<Vec<f64>>,
    dh0: Option<Vec<f64>>,
}

/// Runs the forward then the backward. The chunk form keeps its in-chunk scores for the backward
/// where it sums any (vector gates on the tiled path), as the Burn ops do.
fn run_kernels<R: Runtime>(
    client: &ComputeClient<R>,
    c: &Case,
    mode: Mode,
) -> Result<Outputs, KernelError> {
    run_kernels_keeping(client, c, mode, true)
}

/// [`run_kernels`], keeping the chunk form's scores for the backward or not (`keep`).
fn run_kernels_keeping<R: Runtime>(
    client: &ComputeClient<R>,
    c: &Case,
    mode: Mode,
    keep: bool,
) -> Result<Outputs, KernelError> {
    let dt = c.p.dtype;
    let up = |xs: &[f64]| client.create_from_slice(&encode(dt, xs));
    let up32 = |xs: &[f64]| client.create_from_slice(&encode(FloatDType::F32, xs));
    // Outputs start as NaN, so an element the kernel never writes fails the comparison.
    let poison = |n: usize, d: FloatDType| client.create_from_slice(&encode(d, &vec![f64::NAN; n]));
    let down = |h: &Handle, d: FloatDType| decode(d, &client.read_one_unchecked(h.clone()));

    let (q, k, v) = (up(&c.q), up(&c.k), up(&c.v));
    let g = c.g.as_deref().map(up);
    let gv = c.gv.as_deref().map(up);
    let h0 = c.h0.as_deref().map(up32);
    let o = poison(c.v.len(), dt);
    let ht =
        c.p.output_final_state
            .then(|| poison(c.p.state_len(), FloatDType::F32));
    // Poisoned too: a score the forward leaves unwritten reaches the backward's results as NaN.
    let scores = match mode {
        Mode::Chunk(size) if keep => {
            chunk_scores_shape(client, &c.p, size).map(|d| poison(d.iter().product(), dt))
        }
        _ => None,
    };
    let fwd = ForwardBuffers {
        q: &q,
        k: &k,
        v: &v,
        g: g.as_ref(),
        gv: gv.as_ref(),
        h0: h0.as_ref(),
        o: &o,
        ht: ht.as_ref(),
        scores: scores.as_ref(),
    };
    match mode {
        Mode::Recurrent => recurrent_forward(client, &c.p, fwd)?,
        Mode::Chunk(size) => chunk_forward(client, &c.p, size, fwd)?,
    }
    let d_o = up(&c.d_o);
    let d_ht = c.d_ht.as_deref().map(up32);
    let dq = poison(c.q.len(), dt);
    let dk = poison(c.k.len(), dt);
    let dv = poison(c.v.len(), dt);
    let dg = g.as_ref().map(|_| poison(c.p.gate_len(), dt));
    let dgv = gv.as_ref().map(|_| poison(c.v.len(), dt));
    let dh0 = h0
        .as_ref()
        .map(|_| poison(c.p.state_len(), FloatDType::F32));
    let bwd = BackwardBuffers {
        q: &q,
        k: &k,
        v: &v,
        g: g.as_ref(),
        gv: gv.as_ref(),
        h0: h0.as_ref(),
        o: Some(&o),
        ht: ht.as_ref(),
        d_o: &d_o,
        d_ht: d_ht.as_ref(),
        dq: &dq,
        dk: &dk,
        dv: &dv,
        dg: dg.as_ref(),
        dgv: dgv.as_ref(),
        dh0: dh0.as_ref(),
        scores: scores.as_ref(),
    };
    match mode {
        Mode::Recurrent => recurrent_backward(client, &c.p, bwd)?,
        Mode::Chunk(size) => chunk_backward(client, &c.p, size, bwd)?,
    }
    Ok(Outputs {
        o: down(&o, dt),
        ht: ht.as_ref().map(|h| down(h, FloatDType::F32)),
        dq: down(&dq, dt),
        dk: down(&dk, dt),
        dv: down(&dv, dt),
        dg: dg.as_ref().map(|h| down(h, dt)),
        dgv: dgv.as_ref().map(|h| down(h, dt)),
        dh0: dh0.as_ref().map(|h| down(h, FloatDType::F32)),
    })
}

/// Gate gradients come from the cumulative-sum identity of MATH.md (as FLA's kernels do), a
/// difference of sums whose terms are much larger than the result when gates are strong or K is
/// large: f32 rounding of those terms, not a defect, sets this bound (measured up to 1.3e-4 on
/// lavapipe here and 6e-4 in the top-level tests, log gates scaled by 10).
fn gate_tolerance(dtype: FloatDType) -> f64 {
    match dtype {
        FloatDType::F32 => 1e-3,
        // The tiled chunk kernels take bf16 operands on tensor cores (the decayed `A`, the state,
        // `q`, `k` scaled by their gates), as FLA's do: 3.2e-2 measured on CUDA at T = 200.
        FloatDType::BF16 => 4e-2,
        FloatDType::F16 => 2e-2,
    }
}

fn compare<R: Runtime>(client: &ComputeClient<R>, c: &Case) {
    compare_mode(client, c, Mode::Recurrent)
}

fn compare_mode<R: Runtime>(client: &ComputeClient<R>, c: &Case, mode: Mode) {
    let out = run_kernels(client, c, mode).expect("kernels launch");
    let (fwd, grads) = c.reference();
    let tol = tolerance(c.p.dtype);
    let gate_tol = gate_tolerance(c.p.dtype);
    check("o", &out.o, &fwd.o, tol);
    if let Some(ht) = &out.ht {
        check("ht", ht, &fwd.ht, tol);
    }
    check("dq", &out.dq, &grads.dq, tol);
    check("dk", &out.dk, &grads.dk, tol);
    check("dv", &out.dv, &grads.dv, tol);
    if let Some(dg) = &out.dg {
        check("dg", dg, grads.dg.as_ref().unwrap(), gate_tol);
    }
    if let Some(dgv) = &out.dgv {
        check("dgv", dgv, grads.dgv.as_ref().unwrap(), gate_tol);
    }
    if let Some(dh0) = &out.dh0 {
        check("dh0", dh0, grads.dh0.as_ref().unwrap(), tol);
    }
}

#[rstest]
#[case::t1(1, 16, 16)]
#[case::t63_odd_dims(63, 60, 100)]
#[case::t64(64, 64, 64)]
#[case::t65_k_gt_v(65, 100, 60)]
#[case::t500_k128(500, 128, 128)]
#[case::t20_k256(20, 256, 256)]
#[case::t7_k256_v32(7, 256, 32)]
fn sizes(
    #[case] t: usize,
    #[case] k: usize,
    #[case] v: usize,
    #[values(
        Variant::LinearAttn,
        Variant::SimpleGla,
        Variant::Gla,
        Variant::GlaWithValueGate
    )]
    variant: Variant,
) {
    let c = make_case(
        variant,
        2,
        t,
        2,
        k,
        v,
        1.0,
        false,
        None,
        true,
        FloatDType::F32,
    );
    on_runtime!(compare(&c));
}

/// Value heads wider than `MAX_HEAD_DIM` (FLA's 1.3B GLA has V = 512): the gated kernels split
/// the value axis across cubes, so V = 520 (a multiple of no value block) must match the
/// reference in both forms, across a chunk boundary, with both states and every gradient. The
/// value gate (recurrent form only) has the gradient that walks the value axis: a cumulative sum
/// over `V`.
#[rstest]
#[case::simple_gla_recurrent(Variant::SimpleGla, Mode::Recurrent)]
#[case::simple_gla_chunk(Variant::SimpleGla, CHUNK)]
#[case::gla_recurrent(Variant::Gla, Mode::Recurrent)]
#[case::gla_chunk(Variant::Gla, CHUNK)]
#[case::value_gate_recurrent(Variant::GlaWithValueGate, Mode::Recurrent)]
fn wide_values(#[case] variant: Variant, #[case] mode: Mode) {
    let c = make_case(
        variant,
        1,
        70,
        2,
        32,
        520,
        1.0,
        false,
        None,
        true,
        FloatDType::F32,
    );
    on_runtime!(compare_mode(&c, mode));
}

#[rstest]
fn gate_strength_and_direction(
    #[values(0.1, 1.0, 10.0)] strength: f64,
    #[values(false, true)] reverse: bool,
    #[values(Variant::SimpleGla, Variant::Gla, Variant::GlaWithValueGate)] variant: Variant,
) {
    let c = make_case(
        variant,
        1,
        65,
        3,
        60,
        16,
        strength,
        reverse,
        None,
        true,
        FloatDType::F32,
    );
    on_runtime!(compare(&c));
}

#[rstest]
fn without_states(
    #[values(Variant::LinearAttn, Variant::SimpleGla, Variant::Gla)] variant: Variant,
) {
    let c = make_case(
        variant,
        2,
        33,
        2,
        32,
        48,
        1.0,
        false,
        None,
        false,
        FloatDType::F32,
    );
    on_runtime!(compare(&c));
}

#[rstest]
fn varlen_with_empty_sequence(
    #[values(
        Variant::LinearAttn,
        Variant::SimpleGla,
        Variant::Gla,
        Variant::GlaWithValueGate
    )]
    variant: Variant,
    #[values(false, true)] reverse: bool,
) {
    // Lengths 1, 15, 0 (empty), 300.
    let cu = vec![0, 1, 16, 16, 316];
    let c = make_case(
        variant,
        1,
        316,
        2,
        64,
        60,
        1.0,
        reverse,
        Some(cu),
        true,
        FloatDType::F32,
    );
    on_runtime!(compare(&c));
}

#[rstest]
fn half_precision(
    #[values(FloatDType::F16, FloatDType::BF16)] dtype: FloatDType,
    #[values(Variant::SimpleGla, Variant::Gla)] variant: Variant,
) {
    let c = make_case(variant, 2, 200, 2, 64, 64, 1.0, false, None, true, dtype);
    on_runtime!(half_or_refused(&c, Mode::Recurrent));
}

/// Where the device computes the dtype the kernels must match the reference; where it cannot
/// (bf16 on Vulkan) the launch must be refused with `UnsupportedDType`, not compiled and crashed.
fn half_or_refused<R: Runtime>(client: &ComputeClient<R>, c: &Case, mode: Mode) {
    match c.p.dtype.check_supported(client) {
        Ok(()) => compare_mode(client, c, mode),
        Err(_) => match run_kernels(client, c, mode) {
            Err(KernelError::UnsupportedDType { .. }) => {}
            Err(other) => panic!("expected UnsupportedDType, got {other}"),
            Ok(_) => panic!("an unsupported dtype was launched"),
        },
    }
}

/// More sequences (times heads) than a grid axis holds (65535 on CUDA's y and z axes and on
/// every wgpu axis): a `DeviceLimit` on every runtime, not a failed launch or unwritten outputs.
#[rstest]
fn grid_past_the_device_limit_refused(#[values(Mode::Recurrent, CHUNK)] mode: Mode) {
    let c = make_case(
        Variant::SimpleGla,
        70_000,
        1,
        1,
        16,
        16,
        1.0,
        false,
        None,
        false,
        FloatDType::F32,
    );
    on_runtime!(expect_grid_refused(&c, mode));
}

fn expect_grid_refused<R: Runtime>(client: &ComputeClient<R>, c: &Case, mode: Mode) {
    assert_refused(run_kernels(client, c, mode), Refusal::DeviceLimit, "grid");
}

fn expect_invalid<R: Runtime>(client: &ComputeClient<R>, c: &Case, what: &str) {
    expect_invalid_mode(client, c, what, Mode::Recurrent)
}

fn expect_invalid_mode<R: Runtime>(client: &ComputeClient<R>, c: &Case, what: &str, mode: Mode) {
    assert_refused(run_kernels(client, c, mode), Refusal::InvalidProblem, what);
}

#[rstest]
#[case::not_increasing(vec![0, 10, 5, 20], "non-decreasing")]
#[case::wrong_end(vec![0, 10, 19], "end at T")]
#[case::not_from_zero(vec![1, 10, 20], "start at 0")]
fn bad_cu_seqlens(#[case] cu: Vec<usize>, #[case] what: &str) {
    let c = make_case(
        Variant::Gla,
        1,
        20,
        1,
        16,
        16,
        1.0,
        false,
        Some(cu),
        false,
        FloatDType::F32,
    );
    on_runtime!(expect_invalid(&c, what));
}

#[test]
fn varlen_needs_batch_one() {
    let mut c = make_case(
        Variant::Gla,
        2,
        20,
        1,
        16,
        16,
        1.0,
        false,
        None,
        false,
        FloatDType::F32,
    );
    c.p.cu_seqlens = Some(vec![0, 20]);
    on_runtime!(expect_invalid(&c, "batch size 1"));
}

#[test]
fn zero_length_refused() {
    let mut c = make_case(
        Variant::Gla,
        1,
        4,
        1,
        16,
        16,
        1.0,
        false,
        None,
        false,
        FloatDType::F32,
    );
    c.p.seq_len = 0;
    on_runtime!(expect_invalid(&c, "zero-length"));
}

/// The reference itself: its hand-derived gradients against central finite differences in f64.
#[rstest]
fn naive_backward_matches_finite_differences(
    #[values(
        Variant::LinearAttn,
        Variant::SimpleGla,
        Variant::Gla,
        Variant::GlaWithValueGate
    )]
    variant: Variant,
    #[values(false, true)] reverse: bool,
) {
    let mut c = make_case(
        variant,
        1,
        5,
        1,
        3,
        4,
        1.0,
        reverse,
        None,
        true,
        FloatDType::F32,
    );
    c.p.dtype = FloatDType::F32;
    let loss = |c: &Case| -> f64 {
        let f = naive::forward(&c.p, &c.inputs());
        let lo: f64 = f.o.iter().zip(&c.d_o).map(|(a, b)| a * b).sum();
        let lh: f64 =
            f.ht.iter()
                .zip(c.d_ht.as_ref().unwrap())
                .map(|(a, b)| a * b)
                .sum();
        lo + lh
    };
    let grads = naive::backward(&c.p, &c.inputs(), &c.d_o, c.d_ht.as_deref());
    let eps = 1e-6;
    let fd = |c: &Case, pick: &dyn Fn(&mut Case) -> &mut Vec<f64>| -> Vec<f64> {
        let n = pick(&mut c.clone()).len();
        (0..n)
            .map(|i| {
                let mut a = c.clone();
                pick(&mut a)[i] += eps;
                let mut b = c.clone();
                pick(&mut b)[i] -= eps;
                (loss(&a) - loss(&b)) / (2.0 * eps)
            })
            .collect()
    };
    check("fd dq", &grads.dq, &fd(&c, &|c| &mut c.q), 1e-6);
    check("fd dk", &grads.dk, &fd(&c, &|c| &mut c.k), 1e-6);
    check("fd dv", &grads.dv, &fd(&c, &|c| &mut c.v), 1e-6);
    check(
        "fd dh0",
        grads.dh0.as_ref().unwrap(),
        &fd(&c, &|c| c.h0.as_mut().unwrap()),
        1e-6,
    );
    if c.g.is_some() {
        check(
            "fd dg",
            grads.dg.as_ref().unwrap(),
            &fd(&c, &|c| c.g.as_mut().unwrap()),
            1e-6,
        );
    }
    if c.gv.is_some() {
        check(
            "fd dgv",
            grads.dgv.as_ref().unwrap(),
            &fd(&c, &|c| c.gv.as_mut().unwrap()),
            1e-6,
        );
    }
}

// ---- Chunkwise-parallel form ----

/// Chunk boundaries (63/64/65, 127/128/129), odd head dims, long sequences.
#[rstest]
#[case::t1(1, 16, 16)]
#[case::t63(63, 60, 100)]
#[case::t64(64, 64, 64)]
#[case::t65(65, 100, 60)]
#[case::t127(127, 32, 32)]
#[case::t128(128, 32, 48)]
#[case::t129(129, 48, 32)]
#[case::t1500(1500, 64, 64)]
#[case::t2048(2048, 32, 32)]
#[case::t20_k256(20, 256, 256)]
fn chunk_sizes(
    #[case] t: usize,
    #[case] k: usize,
    #[case] v: usize,
    #[values(Variant::LinearAttn, Variant::SimpleGla, Variant::Gla)] variant: Variant,
) {
    let c = make_case(
        variant,
        2,
        t,
        2,
        k,
        v,
        1.0,
        false,
        None,
        true,
        FloatDType::F32,
    );
    on_runtime!(compare_mode(&c, CHUNK));
}

/// The fused walk, the split's alternative (`split_forward` in the crate's `gated::tiled_launch`),
/// past one span: CUDA takes it where its cubes fill the GPU, but wgpu (and so CI) takes the split
/// wherever a sequence has two spans. The walk is chosen through `FLA_TILED_SPLIT=0`, which the
/// kernels read at each call; set here, it would also reach the tests running beside this one,
/// so this test runs [`fused_walk_cases`] in a child process of this test binary.
#[test]
fn chunk_fused_walk_past_one_span() {
    run_in_child("gated::fused_walk_cases", "FLA_TILED_SPLIT", "0");
}

/// Runs the ignored test `name` alone in a child process of this test binary with `var=value`
/// set, for kernel settings read from the environment at each call, which would otherwise reach
/// the tests running beside it; fails unless it ran and passed.
fn run_in_child(name: &str, var: &str, value: &str) {
    run_in_child_with(name, &[(var, value)]);
}

/// [`run_in_child`] with several settings.
fn run_in_child_with(name: &str, vars: &[(&str, &str)]) {
    let exe = std::env::current_exe().expect("the test binary's path");
    let out = std::process::Command::new(exe)
        .args(["--ignored", "--exact", name])
        .envs(vars.iter().copied())
        .output()
        .expect("the test binary runs");
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{log}");
    assert!(log.contains("1 passed"), "the cases did not run: {log}");
}

/// The cases of [`chunk_fused_walk_past_one_span`], which runs this (ignored otherwise: it checks
/// the walk only with `FLA_TILED_SPLIT=0` set for its whole process).
#[test]
#[ignore = "run by chunk_fused_walk_past_one_span, in a process of its own"]
fn fused_walk_cases() {
    assert_eq!(std::env::var("FLA_TILED_SPLIT").as_deref(), Ok("0"));
    for variant in [Variant::LinearAttn, Variant::SimpleGla, Variant::Gla] {
        for (t, k, v) in [(129, 48, 32), (1500, 64, 64)] {
            let c = make_case(
                variant,
                2,
                t,
                2,
                k,
                v,
                1.0,
                false,
                None,
                true,
                FloatDType::F32,
            );
            on_runtime!(compare_mode(&c, CHUNK));
        }
    }
}

/// Vector gates in chunks other than their default of 32 (`FLA_TILED_VCHUNK`, a measurement aid
/// the kernels read at each call): the in-chunk scores and terms summed entry by entry over 16
/// and 64 positions. Run in child processes of this test binary, as
/// [`chunk_fused_walk_past_one_span`] is, so that the setting reaches no other test.
#[rstest]
fn chunk_vector_gates_in_other_chunks(#[values("16", "64")] chunk: &str) {
    run_in_child("gated::other_vector_chunk_cases", "FLA_TILED_VCHUNK", chunk);
}

/// The in-chunk scores and both in-chunk gradient terms with their off-diagonal 16 × 16 blocks
/// as tile products, FLA's factoring (the default where the tiled kernels have tensor cores;
/// forced here with `FLA_GLA_SCORES_TC=1`, `FLA_GLA_GRADS_TC=1`, so lavapipe runs it on the
/// plain path), at chunks of 32 (one block boundary) and 64 (three), in processes of their own
/// ([`factored_cases`]); the scores' diagonal blocks summed one entry per unit, and with each
/// unit's rows in registers (`FLA_GLA_DIAG_REGS=1`).
#[rstest]
fn chunk_factored_in_chunk_terms(
    #[values("32", "64")] chunk: &str,
    #[values("0", "1")] diag_regs: &str,
) {
    run_in_child_with(
        "gated::factored_cases",
        &[
            ("FLA_TILED_VCHUNK", chunk),
            ("FLA_GLA_SCORES_TC", "1"),
            ("FLA_GLA_GRADS_TC", "1"),
            ("FLA_GLA_DIAG_REGS", diag_regs),
        ],
    );
}

/// The cases of [`chunk_factored_in_chunk_terms`] (ignored otherwise: they need its settings
/// for their whole process): chunk boundaries, both directions, `K` not a multiple of 16, in
/// half precision and narrow heads, so that lavapipe's 32 KB of shared memory holds a chunk of 32
/// with the factored terms' tiles (checked: a shorter chunk would have no block boundary to
/// test). Chunks of 64 fit on CUDA only; elsewhere they run at the chunk that fits.
#[test]
#[ignore = "run by chunk_factored_in_chunk_terms, in a process of its own"]
fn factored_cases() {
    let chunk: usize = std::env::var("FLA_TILED_VCHUNK")
        .expect("FLA_TILED_VCHUNK is set")
        .parse()
        .unwrap();
    for (t, k, v, reverse) in [
        (65, 16, 16, false),
        (130, 32, 16, true),
        (100, 24, 16, false),
    ] {
        let c = gla_case(t, k, v, reverse, FloatDType::F16);
        on_runtime!(compare_factored(&c, chunk));
    }
}

/// Simple GLA through the vector-gate walks (`FLA_SIMPLE_SCORES=3`, opt-in: its scores and
/// cumulated gates from `scalar_scores_kernel`, then GLA's forward walk and `dk`/`dv` walk, on
/// CUDA in half precision those with their state in registers, the in-chunk terms of `dq` and
/// `dk` from `scalar_grads_kernel` and `dq`'s state term from the scalar walk), in a process of
/// its own
/// ([`simple_scores_cases`]). `FLA_TILED_SPLIT=0`: these small grids would otherwise split,
/// which the route leaves to the scalar walks.
#[test]
fn chunk_simple_gla_through_scores() {
    run_in_child_with(
        "gated::simple_scores_cases",
        &[("FLA_SIMPLE_SCORES", "3"), ("FLA_TILED_SPLIT", "0")],
    );
}

/// The cases of [`chunk_simple_gla_through_scores`] (ignored otherwise: they need its settings
/// for their whole process): output, final state and every gradient against the reference at
/// chunk boundaries, `K` and `V` not multiples of 16, both directions, strong gates, half
/// precision, and a variable-length batch with an empty sequence. Each checks that the route
/// is taken.
#[test]
#[ignore = "run by chunk_simple_gla_through_scores, in a process of its own"]
fn simple_scores_cases() {
    assert_eq!(std::env::var("FLA_SIMPLE_SCORES").as_deref(), Ok("3"));
    // The last three have narrow heads, so that lavapipe's 32 KB of shared memory holds chunks
    // of 32 (two 16-row blocks; the wider heads run there at 16): those must not fall shorter.
    for (t, k, v, strength, reverse, states, dtype, min_chunk) in [
        (1, 16, 16, 1.0, false, true, FloatDType::F32, 16),
        (65, 60, 100, 1.0, false, true, FloatDType::F32, 16),
        (130, 48, 32, 1.0, true, true, FloatDType::F32, 16),
        (150, 60, 16, 10.0, false, true, FloatDType::F32, 16),
        (129, 32, 16, 1.0, false, true, FloatDType::F16, 32),
        (200, 16, 32, 1.0, true, true, FloatDType::F32, 32),
        (97, 16, 40, 1.0, false, false, FloatDType::F32, 32),
    ] {
        let c = make_case(
            Variant::SimpleGla,
            2,
            t,
            2,
            k,
            v,
            strength,
            reverse,
            None,
            states,
            dtype,
        );
        on_runtime!(compare_simple_scores(&c, min_chunk));
    }
    // Lengths 1, 69, 0 (empty), 130, 64, both directions.
    for reverse in [false, true] {
        let c = varlen_case(Variant::SimpleGla, reverse, vec![0, 1, 70, 70, 200, 264]);
        on_runtime!(compare_simple_scores(&c, 16));
    }
}

fn compare_simple_scores<R: Runtime>(client: &ComputeClient<R>, c: &Case, min_chunk: usize) {
    for backward in [false, true] {
        let l = simple_scores_layout(client, &c.p, DEFAULT_CHUNK, backward);
        let l = l.unwrap_or_else(|| panic!("the route is taken (backward: {backward}): {:?}", c.p));
        assert!(
            l.chunk >= min_chunk,
            "chunk {} < {min_chunk}: {:?}",
            l.chunk,
            c.p
        );
    }
    compare_mode(client, c, CHUNK);
}

/// A GLA case of 2 sequences and 2 heads at FLA's gate strength, with states.
fn gla_case(t: usize, k: usize, v: usize, reverse: bool, dtype: FloatDType) -> Case {
    make_case(Variant::Gla, 2, t, 2, k, v, 1.0, reverse, None, true, dtype)
}

fn compare_factored<R: Runtime>(client: &ComputeClient<R>, c: &Case, chunk: usize) {
    let l = fla_cubecl_kernels::gated::tiled_layout(client, &c.p, DEFAULT_CHUNK)
        .expect("a tiled layout");
    if chunk == 32 || runtime_name() == "cuda" {
        assert_eq!(l.chunk, chunk, "the asked chunk fits: {l:?}");
    }
    compare_mode(client, c, CHUNK);
}

/// The cases of [`chunk_vector_gates_in_other_chunks`] (ignored otherwise: they need
/// `FLA_TILED_VCHUNK` set for their whole process): chunk boundaries, both directions and a
/// variable-length batch with an empty sequence.
#[test]
#[ignore = "run by chunk_vector_gates_in_other_chunks, in a process of its own"]
fn other_vector_chunk_cases() {
    assert!(std::env::var("FLA_TILED_VCHUNK").is_ok());
    for (t, k, v, reverse) in [
        (1, 16, 16, false),
        (65, 60, 100, false),
        (130, 48, 32, true),
    ] {
        let c = gla_case(t, k, v, reverse, FloatDType::F32);
        on_runtime!(compare_mode(&c, CHUNK));
    }
    let c = varlen_case(Variant::Gla, false, vec![0, 1, 70, 70, 200]);
    on_runtime!(compare_mode(&c, CHUNK));
}

#[rstest]
fn chunk_gate_strength_and_direction(
    #[values(0.1, 1.0, 10.0)] strength: f64,
    #[values(false, true)] reverse: bool,
    #[values(Variant::SimpleGla, Variant::Gla)] variant: Variant,
) {
    let c = make_case(
        variant,
        1,
        150,
        3,
        60,
        16,
        strength,
        reverse,
        None,
        true,
        FloatDType::F32,
    );
    on_runtime!(compare_mode(&c, CHUNK));
}

/// Sequences that start and end mid-chunk, and an empty one.
#[rstest]
fn chunk_varlen_with_empty_sequence(
    #[values(Variant::LinearAttn, Variant::SimpleGla, Variant::Gla)] variant: Variant,
    #[values(false, true)] reverse: bool,
) {
    // Lengths 1, 69, 0 (empty), 130, 64.
    let c = varlen_case(variant, reverse, vec![0, 1, 70, 70, 200, 264]);
    on_runtime!(compare_mode(&c, CHUNK));
}

/// An f32 batch of the sequences `cu` bounds (`B = 1`), 2 heads, K = 64, V = 60, with states.
fn varlen_case(variant: Variant, reverse: bool, cu: Vec<usize>) -> Case {
    let t = *cu.last().expect("cu_seqlens ends at T");
    make_case(
        variant,
        1,
        t,
        2,
        64,
        60,
        1.0,
        reverse,
        Some(cu),
        true,
        FloatDType::F32,
    )
}

/// The backward reading the scores its forward kept gives the gradients it gives summing them
/// again, bit for bit (the same kernel sums them either way), on sequences that start and end
/// mid-chunk with an empty one; only vector gates on the tiled path keep any. Keeping them is on
/// by default (`FLA_GLA_KEEP_SCORES=0` turns it off); the choice itself is checked on every
/// runtime.
#[test]
fn chunk_kept_scores_match_recomputed() {
    // Lengths 1, 69, 0 (empty), 130, 64.
    let c = varlen_case(Variant::Gla, false, vec![0, 1, 70, 70, 200, 264]);
    on_runtime!(kept_matches_recomputed(&c));
}

fn kept_matches_recomputed<R: Runtime>(client: &ComputeClient<R>, c: &Case) {
    let shape = chunk_scores_shape(client, &c.p, DEFAULT_CHUNK);
    let asked = std::env::var("FLA_GLA_KEEP_SCORES").ok();
    let keeps = asked.as_deref() != Some("0");
    assert_eq!(
        shape.map(|d| [d[0], d[1]]),
        keeps.then(|| [c.p.tokens(), c.p.heads]),
        "kept scores where the runtime keeps them (FLA_GLA_KEEP_SCORES={asked:?})"
    );
    // Eight entries, far fewer than the scores: refused where they are kept, ignored (neither
    // written nor refused) where they are not.
    let short = forward_with_short_scores(client, c);
    if !keeps {
        short.expect("a scores buffer is ignored where none is kept");
        return;
    }
    match short {
        Err(KernelError::Buffer(m)) => assert!(m.contains("scores"), "{m}"),
        other => panic!("expected a buffer error naming the scores, got {other:?}"),
    }
    let kept = run_kernels_keeping(client, c, CHUNK, true).expect("kernels launch");
    let again = run_kernels_keeping(client, c, CHUNK, false).expect("kernels launch");
    assert_eq!(kept.o, again.o, "o");
    assert_eq!(kept.dq, again.dq, "dq");
    assert_eq!(kept.dk, again.dk, "dk");
    assert_eq!(kept.dv, again.dv, "dv");
    assert_eq!(kept.dg, again.dg, "dg");
    assert_eq!(kept.dh0, again.dh0, "dh0");
}

/// The chunk forward of `c` (vector gates, with states) given a scores buffer of 8 entries.
fn forward_with_short_scores<R: Runtime>(
    client: &ComputeClient<R>,
    c: &Case,
) -> Result<(), KernelError> {
    let short = client.create_from_slice(&encode(FloatDType::F32, &[0.0; 8]));
    let o = client.create_from_slice(&encode(FloatDType::F32, &vec![0.0; c.v.len()]));
    let [q, k, v] = [&c.q, &c.k, &c.v].map(|x| client.create_from_slice(&encode(c.p.dtype, x)));
    let g = client.create_from_slice(&encode(c.p.dtype, c.g.as_deref().unwrap()));
    let h0 =
        c.h0.as_deref()
            .map(|x| client.create_from_slice(&encode(FloatDType::F32, x)));
    let ht = client.create_from_slice(&encode(FloatDType::F32, &vec![0.0; c.p.state_len()]));
    let fwd = ForwardBuffers {
        q: &q,
        k: &k,
        v: &v,
        g: Some(&g),
        gv: None,
        h0: h0.as_ref(),
        o: &o,
        ht: Some(&ht),
        scores: Some(&short),
    };
    chunk_forward(client, &c.p, DEFAULT_CHUNK, fwd)
}

#[rstest]
fn chunk_without_states(
    #[values(Variant::LinearAttn, Variant::SimpleGla, Variant::Gla)] variant: Variant,
) {
    let c = make_case(
        variant,
        2,
        100,
        2,
        32,
        48,
        1.0,
        false,
        None,
        false,
        FloatDType::F32,
    );
    on_runtime!(compare_mode(&c, CHUNK));
}

/// Chunk sizes other than the default: 16, 32 and 48 take the tiled kernels (vector gates in
/// chunks of at most 32), 50 (not a multiple of 16) the plain chunk kernels.
#[rstest]
fn chunk_other_sizes(
    #[values(16, 32, 48, 50)] size: usize,
    #[values(Variant::SimpleGla, Variant::Gla)] variant: Variant,
) {
    let c = make_case(
        variant,
        1,
        130,
        2,
        40,
        24,
        1.0,
        false,
        None,
        true,
        FloatDType::F32,
    );
    on_runtime!(compare_mode(&c, Mode::Chunk(size)));
}

#[rstest]
fn chunk_half_precision(
    #[values(FloatDType::F16, FloatDType::BF16)] dtype: FloatDType,
    #[values(Variant::SimpleGla, Variant::Gla)] variant: Variant,
) {
    let c = make_case(variant, 2, 200, 2, 64, 64, 1.0, false, None, true, dtype);
    on_runtime!(half_or_refused(&c, CHUNK));
}

/// GLA's chunk form in half precision on odd and round sizes, with and without states, and a
/// variable-length batch with an empty sequence: every tensor-core path of the chunk walks (the
/// tiled kernels' `cmma`; on CUDA with `FLA_GLA_FRAG=7 FLA_TILED_SPLIT=0` the forward, `dk`/`dv`
/// and `dq` walks with the state in registers, where their tiling applies: not at K = V = 16)
/// against the f64 recurrence, at the half-precision tolerances. K = 128, V = 256 is FLA's 340M
/// recipe's head; K = 256 takes the register walks' 8-plane layout.
#[rstest]
#[case::t1(1, 1, 16, 16, None)]
#[case::t63_k60_v100(2, 63, 60, 100, None)]
#[case::t65_k100_v60(2, 65, 100, 60, None)]
#[case::t130_k128_v256(1, 130, 128, 256, None)]
#[case::t97_k256_v128(1, 97, 256, 128, None)]
#[case::varlen_empty(1, 111, 64, 64, Some(vec![0, 40, 40, 111]))]
fn chunk_gla_half_sizes(
    #[case] batch: usize,
    #[case] t: usize,
    #[case] k: usize,
    #[case] v: usize,
    #[case] cu: Option<Vec<usize>>,
    #[values(FloatDType::F16, FloatDType::BF16)] dtype: FloatDType,
    #[values(true, false)] states: bool,
) {
    let c = make_case(
        Variant::Gla,
        batch,
        t,
        2,
        k,
        v,
        1.0,
        false,
        cu,
        states,
        dtype,
    );
    on_runtime!(half_or_refused(&c, CHUNK));
}

#[test]
fn chunk_refuses_value_gate() {
    let c = make_case(
        Variant::GlaWithValueGate,
        1,
        20,
        1,
        16,
        16,
        1.0,
        false,
        None,
        false,
        FloatDType::F32,
    );
    on_runtime!(expect_invalid_mode(&c, "value gate", CHUNK));
}

/// Half-precision error at T = 4096 against the f64 recurrence on the same rounded inputs, bounded
/// by what FLA 0.6.0 measures for its own chunk kernels (relative RMSE 2.4e-3 for chunk_simple_gla,
/// 2.5e-3 for chunk_gla, bf16, against an f32 recurrence; the bf16 rounding floor is 1.7e-3).
/// Where bf16 cannot run (Vulkan, lavapipe) it must be refused; f16 runs everywhere.
#[rstest]
fn chunk_half_precision_error_at_4096(
    #[values(FloatDType::F16, FloatDType::BF16)] dtype: FloatDType,
    #[values(Variant::SimpleGla, Variant::Gla)] variant: Variant,
) {
    let c = make_case(variant, 1, 4096, 2, 64, 64, 1.0, false, None, true, dtype);
    on_runtime!(half_error_bounded(&c));
}

fn half_error_bounded<R: Runtime>(client: &ComputeClient<R>, c: &Case) {
    if c.p.dtype.check_supported(client).is_err() {
        return half_or_refused(client, c, CHUNK);
    }
    let out = run_kernels(client, c, CHUNK).expect("kernels launch");
    let (fwd, _) = c.reference();
    let fla = if c.p.gate == GateKind::Scalar {
        2.4e-3
    } else {
        2.5e-3
    };
    let err = rel_rmse(&out.o, &fwd.o);
    eprintln!(
        "{:?} {:?} T=4096: o relative RMSE {err:.2e} (FLA: {fla:.1e})",
        c.p.dtype, c.p.gate
    );
    assert!(err <= fla, "o: relative RMSE {err:e} above FLA's {fla:e}");
}

/// Sequences at the CPU Vulkan driver's limit run correctly in both forms; longer ones are refused
/// there (lavapipe would stop the shader and leave outputs unwritten) and computed elsewhere.
#[rstest]
fn long_sequences(#[values(Mode::Recurrent, CHUNK)] mode: Mode) {
    let at = make_case(
        Variant::Gla,
        1,
        CPU_VULKAN_MAX_SEQ,
        1,
        16,
        16,
        0.1,
        false,
        None,
        true,
        FloatDType::F32,
    );
    on_runtime!(compare_mode(&at, mode));
    let over = make_case(
        Variant::Gla,
        1,
        CPU_VULKAN_MAX_SEQ + 1,
        1,
        16,
        16,
        0.1,
        false,
        None,
        true,
        FloatDType::F32,
    );
    on_runtime!(refused_on_cpu_vulkan(&over, mode));
}

/// T = 65536 with strong gates (log gates scaled by 10), both forms: on a GPU no NaN or
/// infinity in any output or gradient; on lavapipe, past its loop limit, a `DeviceLimit` refusal.
#[rstest]
fn t65536_strong_gates_finite_or_refused(
    #[values(Mode::Recurrent, CHUNK)] mode: Mode,
    #[values(Variant::SimpleGla, Variant::Gla)] variant: Variant,
) {
    let c = make_case(
        variant,
        1,
        65536,
        2,
        64,
        64,
        10.0,
        false,
        None,
        true,
        FloatDType::F32,
    );
    on_runtime!(finite_or_refused(&c, mode));
}

fn finite_or_refused<R: Runtime>(client: &ComputeClient<R>, c: &Case, mode: Mode) {
    let result = run_kernels(client, c, mode);
    if is_cpu_vulkan(client) {
        assert!(matches!(result, Err(KernelError::DeviceLimit(_))));
        return;
    }
    let out = result.expect("a GPU runs long sequences");
    let vectors = [Some(&out.o), out.ht.as_ref(), Some(&out.dq), Some(&out.dk)];
    let more = [Some(&out.dv), out.dg.as_ref(), out.dh0.as_ref()];
    for (i, xs) in vectors.into_iter().chain(more).flatten().enumerate() {
        assert!(
            xs.iter().all(|x| x.is_finite()),
            "output {i} has NaN or inf"
        );
    }
}

fn refused_on_cpu_vulkan<R: Runtime>(client: &ComputeClient<R>, c: &Case, mode: Mode) {
    match (is_cpu_vulkan(client), run_kernels(client, c, mode)) {
        (true, Err(KernelError::DeviceLimit(msg))) => assert!(msg.contains("lavapipe"), "{msg}"),
        (true, other) => panic!(
            "expected DeviceLimit on a CPU Vulkan driver, got {:?}",
            other.err()
        ),
        (false, _) => compare_mode(client, c, mode),
    }
}

/// Which chunk kernels a call takes: the tiled ones at chunk sizes that are multiples of 16 (in
/// chunks of at most `VECTOR_CHUNK` for vector gates), the plain ones at other sizes; on Vulkan
/// (48 KB of shared memory) and lavapipe (32 KB) the tiled kernels may shrink the chunk to fit.
#[rstest]
fn chunk_kernel_choice(
    #[values(Variant::LinearAttn, Variant::SimpleGla, Variant::Gla)] variant: Variant,
    #[values(16, 50, 64)] size: usize,
) {
    let c = make_case(
        variant,
        1,
        10,
        2,
        64,
        64,
        1.0,
        false,
        None,
        true,
        FloatDType::F32,
    );
    on_runtime!(expect_kernel_choice(&c, variant, size));
}

fn expect_kernel_choice<R: Runtime>(
    client: &ComputeClient<R>,
    c: &Case,
    variant: Variant,
    size: usize,
) {
    let l = fla_cubecl_kernels::gated::tiled_layout(client, &c.p, size);
    let tiled = size.is_multiple_of(16);
    assert_eq!(l.is_some(), tiled, "{variant:?} at chunk {size}: {l:?}");
    if let Some(l) = l {
        assert!(l.chunk <= size && l.chunk % 16 == 0);
        assert_eq!(l.vector_gate, variant == Variant::Gla);
        if variant == Variant::Gla {
            let vector = VECTOR_CHUNK.min(size);
            if runtime_name() == "cuda" {
                assert_eq!(
                    l.chunk, vector,
                    "vector gates take chunks of {vector}: {l:?}"
                );
            } else {
                assert!(l.chunk <= vector, "vector gates: {l:?}");
            }
        } else if runtime_name() == "cuda" {
            // Vulkan's 48 KB of shared memory (and lavapipe's 32 KB) may take shorter chunks.
            assert_eq!(l.chunk, size, "a CUDA GPU holds a full chunk: {l:?}");
        }
    }
    // GLA's walks with the state in registers: CUDA's (manual MMA), in half precision, the walks
    // `FLA_GLA_FRAG` asks for (a bit per walk: 1 the forward, 2 `dk`/`dv`, 4 `dq`), by default
    // the forward and `dk`/`dv`.
    let asked = |bit: usize| {
        std::env::var("FLA_GLA_FRAG")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(fla_cubecl_kernels::gated::DEFAULT_GLA_FRAG)
            & bit
            != 0
    };
    for dtype in [FloatDType::F32, FloatDType::F16, FloatDType::BF16] {
        let mut p = c.p.clone();
        p.dtype = dtype;
        if dtype.check_supported(client).is_err() {
            continue;
        }
        if let Some(l) = fla_cubecl_kernels::gated::tiled_layout(client, &p, size) {
            let registers =
                runtime_name() == "cuda" && dtype != FloatDType::F32 && variant == Variant::Gla;
            let fwd = fla_cubecl_kernels::gated::gla_fwd_registers(client, &p, &l);
            let dkv = fla_cubecl_kernels::gated::gla_dkv_registers(client, &p, &l);
            let dq = fla_cubecl_kernels::gated::gla_dq_registers(client, &p, &l);
            assert_eq!(fwd.is_some(), registers && asked(1), "{dtype:?}: {fwd:?}");
            assert_eq!(dkv.is_some(), registers && asked(2), "{dtype:?}: {dkv:?}");
            assert_eq!(dq.is_some(), registers && asked(4), "{dtype:?}: {dq:?}");
        }
    }
    if runtime_name() == "cuda" {
        // Every GPU the CUDA runtime runs on since Volta has f16/bf16 tensor cores.
        for dtype in [FloatDType::F16, FloatDType::BF16] {
            assert!(
                fla_cubecl_kernels::gated::has_cmma(client, dtype),
                "{dtype:?}"
            );
        }
    }
}
