//! Kernel-level tests of fused softmax attention against the f64 naive attention: output,
//! log-sum-exp, and `dq`, `dk`, `dv` for a random gradient on the output; causal and not,
//! sliding windows smaller and larger than the sequence, grouped heads, soft-capping, decoding
//! queries against a longer key sequence, variable-length batches with an empty sequence.
//!
//! Runtime: wgpu by default (lavapipe in CI); CUDA when built with `--features cuda` and
//! `FLA_TEST_RUNTIME=cuda`.

use cubecl::prelude::*;
use cubecl::server::Handle;
use fla_cubecl_kernels::attn::{
    attn_backward, attn_bwd_registers, attn_forward, attn_fwd_registers, AttnBackwardBuffers,
    AttnForwardBuffers, AttnProblem,
};
use fla_cubecl_kernels::testing::{decode, encode, AttnCase};
use fla_cubecl_kernels::{FloatDType, KernelError};
use rstest::rstest;

use crate::common::{assert_refused, base_dtype, check, runtime_name, tolerance, Refusal};

/// `[B, T_q, T_k, H, HK, K, V]`.
type Dims = [usize; 7];

#[derive(Debug, Clone, Copy, Default)]
struct Opts {
    causal: bool,
    window: Option<usize>,
    softcap: Option<f32>,
}

const CAUSAL: Opts = Opts {
    causal: true,
    window: None,
    softcap: None,
};
const FULL: Opts = Opts {
    causal: false,
    window: None,
    softcap: None,
};

fn problem(
    [batch, q_len, kv_len, heads, kv_heads, k_dim, v_dim]: Dims,
    o: Opts,
    cu_seqlens: Option<Vec<usize>>,
    dtype: FloatDType,
) -> AttnProblem {
    AttnProblem {
        batch,
        q_len,
        kv_len,
        heads,
        kv_heads,
        k_dim,
        v_dim,
        scale: (k_dim as f32).powf(-0.5),
        causal: o.causal,
        window: o.window,
        softcap: o.softcap,
        cu_seqlens,
        dtype,
    }
}

struct Outputs {
    o: Vec<f64>,
    lse: Vec<f64>,
    dq: Vec<f64>,
    dk: Vec<f64>,
    dv: Vec<f64>,
}

fn run_kernels<R: Runtime>(
    client: &ComputeClient<R>,
    c: &AttnCase,
) -> Result<Outputs, KernelError> {
    let dt = c.p.dtype;
    let f32t = FloatDType::F32;
    let up = |xs: &[f64]| client.create_from_slice(&encode(dt, xs));
    // Outputs start as NaN, so an element the kernels never write fails the comparison.
    let poison = |n: usize, d: FloatDType| client.create_from_slice(&encode(d, &vec![f64::NAN; n]));
    let down = |h: &Handle, d: FloatDType| decode(d, &client.read_one_unchecked(h.clone()));
    let (nq, nk, nv, no, nl) = c.p.lens();
    let (q, k, v) = (up(&c.q), up(&c.k), up(&c.v));
    let (o, lse) = (poison(no, dt), poison(nl, f32t));
    attn_forward(
        client,
        &c.p,
        AttnForwardBuffers {
            q: &q,
            k: &k,
            v: &v,
            o: &o,
            lse: &lse,
        },
    )?;
    let d_o = up(&c.d_o);
    let (dq, dk, dv) = (poison(nq, dt), poison(nk, dt), poison(nv, dt));
    attn_backward(
        client,
        &c.p,
        AttnBackwardBuffers {
            q: &q,
            k: &k,
            v: &v,
            o: &o,
            lse: &lse,
            d_o: &d_o,
            dq: &dq,
            dk: &dk,
            dv: &dv,
        },
    )?;
    Ok(Outputs {
        o: down(&o, dt),
        lse: down(&lse, f32t),
        dq: down(&dq, dt),
        dk: down(&dk, dt),
        dv: down(&dv, dt),
    })
}

fn compare<R: Runtime>(client: &ComputeClient<R>, c: &AttnCase) {
    if c.p.dtype.check_supported(client).is_err() {
        // The device cannot compute this dtype (bf16 on lavapipe): the launchers must refuse it
        // by name, before anything runs.
        match run_kernels(client, c) {
            Err(KernelError::UnsupportedDType { .. }) => return,
            other => panic!(
                "{:?} on {}: expected UnsupportedDType, got {:?}",
                c.p.dtype,
                runtime_name(),
                other.map(|_| ())
            ),
        }
    }
    let out = run_kernels(client, c).expect("kernels launch");
    let (fwd, grads) = c.reference();
    let tol = tolerance(c.p.dtype);
    check("o", &out.o, &fwd.o, tol);
    check("lse", &out.lse, &fwd.lse, tol);
    check("dq", &out.dq, &grads.dq, tol);
    check("dk", &out.dk, &grads.dk, tol);
    check("dv", &out.dv, &grads.dv, tol);
}

fn case(dims: Dims, o: Opts, dtype: FloatDType) -> AttnCase {
    let seed = dims.iter().fold(o.causal as u64, |a, &d| a * 31 + d as u64);
    AttnCase::new(problem(dims, o, None, dtype), 1.0, seed)
}

/// Odd and round lengths and head dims, causal and not (K = 17 with V = 34: loads of single
/// entries in the register kernels, whose loads are as wide as both head dims allow).
#[rstest]
#[case::t1([2, 1, 1, 2, 2, 64, 64])]
#[case::t63([2, 63, 63, 2, 2, 64, 64])]
#[case::t65_d100([1, 65, 65, 2, 2, 100, 100])]
#[case::t64_k60_v100([1, 64, 64, 1, 1, 60, 100])]
#[case::t17_d128([1, 17, 17, 2, 2, 128, 128])]
#[case::t33_d16([2, 33, 33, 3, 3, 16, 16])]
#[case::t20_k17_v34([1, 20, 20, 2, 1, 17, 34])]
fn sizes(#[case] dims: Dims, #[values(CAUSAL, FULL)] o: Opts) {
    on_runtime!(compare(&case(dims, o, base_dtype())));
}

#[rstest]
fn t1500() {
    on_runtime!(compare(&case(
        [1, 1500, 1500, 1, 1, 64, 64],
        CAUSAL,
        base_dtype()
    )));
}

/// Grouped-query attention: 1, 2 and 4 query heads per key/value head.
#[rstest]
fn grouped_heads(#[values(1, 2, 4)] ratio: usize, #[values(CAUSAL, FULL)] o: Opts) {
    let dims = [2, 40, 40, 4, 4 / ratio, 32, 48];
    on_runtime!(compare(&case(dims, o, base_dtype())));
}

/// Windows smaller than the sequence (several key blocks dropped), equal, and larger.
#[rstest]
fn sliding_window(#[values(1, 5, 16, 70, 300)] w: usize, #[values(true, false)] causal: bool) {
    let o = Opts {
        causal,
        window: Some(w),
        softcap: None,
    };
    on_runtime!(compare(&case([1, 70, 70, 2, 1, 32, 32], o, base_dtype())));
}

/// Scores soft-capped (Gemma 2 style); a large spread so the cap acts.
#[rstest]
fn softcap(#[values(CAUSAL, FULL)] o: Opts) {
    let o = Opts {
        softcap: Some(5.0),
        ..o
    };
    let p = problem([1, 50, 50, 2, 2, 32, 32], o, None, base_dtype());
    on_runtime!(compare(&AttnCase::new(p, 3.0, 7)));
}

/// Peaked softmax rows (large scores): the running maximum moves between key blocks.
#[rstest]
fn peaked_scores(#[values(CAUSAL, FULL)] o: Opts) {
    let p = problem([1, 90, 90, 1, 1, 64, 64], o, None, base_dtype());
    on_runtime!(compare(&AttnCase::new(p, 4.0, 11)));
}

/// Decoding: a few queries at the end of a longer key/value cache.
#[rstest]
fn decoding(#[values(1, 3, 20)] tq: usize, #[values(CAUSAL, FULL)] o: Opts) {
    on_runtime!(compare(&case([2, tq, 70, 2, 1, 64, 64], o, base_dtype())));
}

/// Variable-length batch with an empty sequence and sequences that end mid-block.
#[rstest]
fn varlen(#[values(CAUSAL, FULL)] o: Opts) {
    let cu = vec![0, 15, 15, 80, 81, 100];
    let p = problem([1, 100, 100, 2, 2, 32, 40], o, Some(cu), base_dtype());
    on_runtime!(compare(&AttnCase::new(p, 1.0, 3)));
}

#[rstest]
fn varlen_window() {
    let o = Opts {
        causal: true,
        window: Some(9),
        softcap: None,
    };
    let cu = vec![0, 30, 30, 77];
    let p = problem([1, 77, 77, 4, 2, 16, 16], o, Some(cu), base_dtype());
    on_runtime!(compare(&AttnCase::new(p, 1.0, 5)));
}

/// Half precision (bf16 where the device computes it: CUDA).
#[rstest]
fn half_precision(
    #[values(FloatDType::F16, FloatDType::BF16)] dtype: FloatDType,
    #[values(CAUSAL, FULL)] o: Opts,
) {
    on_runtime!(compare(&case([2, 130, 130, 2, 1, 64, 64], o, dtype)));
    on_runtime!(compare(&case([1, 65, 65, 2, 2, 100, 100], o, dtype)));
}

/// Which kernels a call takes: on CUDA in f16/bf16 with head dims of at most 128, the ones that
/// hold their accumulators in registers, forward and backward (so every CUDA half-precision case
/// above tests them); elsewhere (Vulkan, lavapipe, f32, wider heads) the shared-memory ones.
#[rstest]
fn forward_kernel_choice(
    #[values(FloatDType::F32, FloatDType::F16, FloatDType::BF16)] dtype: FloatDType,
    #[values(60, 128, 256)] d: usize,
) {
    let p = problem([1, 8, 8, 2, 2, d, d], CAUSAL, None, dtype);
    on_runtime!(expect_forward_choice(&p));
}

fn expect_forward_choice<R: Runtime>(client: &ComputeClient<R>, p: &AttnProblem) {
    let l = attn_fwd_registers(client, p);
    let registers = runtime_name() == "cuda" && p.dtype != FloatDType::F32 && p.k_dim <= 128;
    assert_eq!(
        l.is_some(),
        registers,
        "{:?}, K = {}: {l:?}",
        p.dtype,
        p.k_dim
    );
    let bwd = attn_bwd_registers(client, p);
    assert_eq!(bwd.is_some(), registers, "backward: {bwd:?}");
    if let (Some(l), Some([dq, dkv])) = (l, bwd) {
        assert_eq!(l.bq, 16 * l.tile.planes, "16 query rows per plane: {l:?}");
        assert_eq!(
            dq.bq,
            16 * dq.tile.planes,
            "16 query rows per plane: {dq:?}"
        );
        assert_eq!(
            dkv.bk,
            16 * dkv.tile.planes,
            "16 key rows per plane: {dkv:?}"
        );
        for l in [l, dq, dkv] {
            assert!(l.bd >= p.k_dim && l.bd % 16 == 0, "whole heads: {l:?}");
            assert!(l.bq % 16 == 0 && l.bk % 16 == 0, "{l:?}");
            assert!(
                p.k_dim.is_multiple_of(l.vector) && p.v_dim.is_multiple_of(l.vector),
                "{l:?}"
            );
        }
    }
}

/// Bad problems are refused before anything is launched.
#[rstest]
#[case::heads_not_multiple([1, 8, 8, 3, 2, 16, 16], CAUSAL, None, "multiple")]
#[case::queries_after_keys([1, 9, 8, 2, 2, 16, 16], CAUSAL, None, "must not exceed")]
#[case::zero_keys([1, 8, 0, 2, 2, 16, 16], FULL, None, "zero-length")]
#[case::zero_window([1, 8, 8, 2, 2, 16, 16], Opts { window: Some(0), ..CAUSAL }, None, "window")]
#[case::bad_cap([1, 8, 8, 2, 2, 16, 16], Opts { softcap: Some(-1.0), ..CAUSAL }, None, "soft cap")]
#[case::varlen_lengths([1, 8, 9, 2, 2, 16, 16], FULL, Some(vec![0, 8]), "share one token axis")]
fn bad_problems(
    #[case] dims: Dims,
    #[case] o: Opts,
    #[case] cu: Option<Vec<usize>>,
    #[case] needle: &str,
) {
    let err = problem(dims, o, cu, base_dtype())
        .validate()
        .expect_err("refused");
    assert!(err.to_string().contains(needle), "{err}");
}

/// More sequences than a grid axis holds (65535 on CUDA's z axis and on every wgpu axis): a
/// `DeviceLimit` on every runtime, not a failed launch or unwritten outputs.
#[test]
fn grid_past_the_device_limit_refused() {
    let c = case([70_000, 1, 1, 1, 1, 16, 16], FULL, FloatDType::F32);
    on_runtime!(expect_grid_refused(&c));
}

fn expect_grid_refused<R: Runtime>(client: &ComputeClient<R>, c: &AttnCase) {
    assert_refused(run_kernels(client, c), Refusal::DeviceLimit, "grid");
}
