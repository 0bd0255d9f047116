//! Kernel-level tests of the fused cross-entropy against the f64 reference: `loss`, `lse` and
//! `dlogits` for a random `dloss`, on vocabularies from 1 to 32,000 entries (rows sharing a cube
//! and rows longer than a cube), ignored and out-of-range targets, large logits, half precision,
//! refused input.

use cubecl::prelude::*;
use cubecl::server::Handle;
use fla_cubecl_kernels::cross_entropy::{
    cross_entropy_backward, cross_entropy_forward, naive, CrossEntropyProblem,
};
use fla_cubecl_kernels::testing::{decode, encode, round_to, Rng};
use fla_cubecl_kernels::{FloatDType, KernelError};
use rstest::rstest;

use crate::common::{
    assert_dtype_refused, assert_refused, base_dtype, check, computes, runtime_name, tolerance,
    Refusal,
};

type Run = [Vec<f64>; 3];

fn run_kernels<R: Runtime>(
    client: &ComputeClient<R>,
    p: &CrossEntropyProblem,
    logits: &[f64],
    targets: &[i64],
    dloss: &[f64],
) -> Result<Run, KernelError> {
    let dt = p.dtype;
    let f32s = |xs: &[f64]| client.create_from_slice(&encode(FloatDType::F32, xs));
    let ids: Vec<u8> = targets
        .iter()
        .flat_map(|&t| (t as i32).to_le_bytes())
        .collect();
    // Outputs start as NaN, so an element the kernels never write fails the comparison.
    let poison =
        |n: usize, dt: FloatDType| client.create_from_slice(&encode(dt, &vec![f64::NAN; n]));
    let down = |h: &Handle, dt: FloatDType| decode(dt, &client.read_one_unchecked(h.clone()));
    let x = client.create_from_slice(&encode(dt, logits));
    let t = client.create_from_slice(&ids);
    let (loss, lse) = (
        poison(p.rows, FloatDType::F32),
        poison(p.rows, FloatDType::F32),
    );
    let dx = poison(p.len(), dt);
    cross_entropy_forward(client, p, [&x, &t], [&loss, &lse])?;
    cross_entropy_backward(client, p, [&x, &t, &lse, &f32s(dloss)], &dx)?;
    Ok([
        down(&loss, FloatDType::F32),
        down(&lse, FloatDType::F32),
        down(&dx, dt),
    ])
}

/// Logits `spread` times standard normal (rounded to the dtype), targets uniform over the
/// vocabulary, `dloss` uniform in [0, 1) (a mean's `1 / rows` and more).
fn inputs(p: &CrossEntropyProblem, spread: f64, seed: u64) -> (Vec<f64>, Vec<i64>, Vec<f64>) {
    let mut rng = Rng::new(seed);
    let logits = (0..p.len())
        .map(|_| round_to(p.dtype, spread * rng.normal()))
        .collect();
    let targets = (0..p.rows)
        .map(|_| (rng.next_u64() % p.vocab as u64) as i64)
        .collect();
    let dloss = (0..p.rows).map(|_| rng.uniform()).collect();
    (logits, targets, dloss)
}

fn compare(p: &CrossEntropyProblem, logits: &[f64], targets: &[i64], dloss: &[f64]) -> Run {
    let out = on_runtime!(run_kernels(p, logits, targets, dloss)).expect("valid problem");
    let (loss, lse) = naive::forward(logits, targets, p.vocab);
    // The sums are f32 whatever the logits' dtype; the gradient is stored in it.
    let f32_tol = tolerance(FloatDType::F32);
    check("lse", &out[1], &lse, f32_tol);
    // A row whose loss is 0 would make the relative error of `loss` meaningless alone: checked
    // together with lse, whose size it shares.
    let both = |a: &[f64], b: &[f64]| [a, b].concat();
    check("loss", &both(&out[0], &out[1]), &both(&loss, &lse), f32_tol);
    let want = naive::backward(logits, targets, p.vocab, dloss);
    check("dlogits", &out[2], &want, tolerance(p.dtype));
    // The target entries (about −dloss each) dominate the relative error of a long row: the
    // softmax alone, off the targets, is checked on its own.
    let off = |xs: &[f64]| -> Vec<f64> {
        let hit = |i: usize| targets[i / p.vocab] == (i % p.vocab) as i64;
        xs.iter()
            .enumerate()
            .filter(|&(i, _)| !hit(i))
            .map(|(_, &x)| x)
            .collect()
    };
    check(
        "dlogits off the targets",
        &off(&out[2]),
        &off(&want),
        tolerance(p.dtype),
    );
    out
}

#[rstest]
#[case::one_entry(1, 1)]
#[case::one_row(1, 7)]
#[case::rows_share_a_cube(1500, 60)]
#[case::odd(63, 100)]
#[case::odd_rows(65, 1000)]
#[case::wider_than_a_cube(5, 5003)]
#[case::llama_vocab(3, 32000)]
fn matches_reference(#[case] rows: usize, #[case] vocab: usize) {
    let p = CrossEntropyProblem {
        rows,
        vocab,
        dtype: base_dtype(),
    };
    let (x, t, d) = inputs(&p, 2.0, (rows * vocab) as u64);
    compare(&p, &x, &t, &d);
}

/// Logits in the thousands: the running maximum keeps every exponent at most 0.
#[test]
fn large_logits() {
    let p = CrossEntropyProblem {
        rows: 17,
        vocab: 3000,
        dtype: base_dtype(),
    };
    let (x, t, d) = inputs(&p, 2000.0, 11);
    compare(&p, &x, &t, &d);
}

/// Masked entries (−∞ logits) weigh nothing: every row of a wide vocabulary with a third of its
/// entries at −∞, through the lanes' groups of 8 and their tails.
#[test]
fn masked_logits() {
    let p = CrossEntropyProblem {
        rows: 9,
        vocab: 5003,
        dtype: base_dtype(),
    };
    let (mut x, t, d) = inputs(&p, 2.0, 19);
    for (i, v) in x.iter_mut().enumerate() {
        let (row, col) = (i / p.vocab, i % p.vocab);
        if col % 3 == row % 3 && col as i64 != t[row] {
            *v = f64::NEG_INFINITY;
        }
    }
    compare(&p, &x, &t, &d);
}

/// A negative target ignores its row (loss and gradient exactly 0, even with a NaN logit in
/// it); one at or past the vocabulary gives NaN loss and gradient on its row alone. A vocabulary
/// of 3000 sends each lane through a group of 8 and a tail.
#[test]
fn ignored_and_out_of_range_targets() {
    let v = 3000;
    let p = CrossEntropyProblem {
        rows: 6,
        vocab: v,
        dtype: base_dtype(),
    };
    let (mut x, mut t, d) = inputs(&p, 2.0, 13);
    t[1] = -100;
    x[v + 17] = f64::NAN;
    t[4] = v as i64;
    let [loss, lse, dx] = on_runtime!(run_kernels(&p, &x, &t, &d)).expect("valid problem");
    assert_eq!(loss[1], 0.0);
    assert!(dx[v..2 * v].iter().all(|&g| g == 0.0));
    assert!(loss[4].is_nan() && dx[4 * v..5 * v].iter().all(|g| g.is_nan()));
    // The other rows are untouched by their neighbours.
    let keep = [0, 2, 3, 5];
    let (want_loss, want_lse) = naive::forward(&x, &t, p.vocab);
    let want_dx = naive::backward(&x, &t, p.vocab, &d);
    let tol = tolerance(FloatDType::F32);
    for r in keep {
        check("loss", &[loss[r]], &[want_loss[r]], tol);
        let row = r * p.vocab..(r + 1) * p.vocab;
        check(
            "dlogits",
            &dx[row.clone()],
            &want_dx[row],
            tolerance(p.dtype),
        );
    }
    let keep_lse: Vec<usize> = vec![0, 2, 3, 4, 5];
    let pick = |xs: &[f64]| keep_lse.iter().map(|&r| xs[r]).collect::<Vec<_>>();
    check("lse", &pick(&lse), &pick(&want_lse), tol);
}

/// f16 and bf16 where the device computes them; elsewhere the call is refused with the dtype's
/// name.
#[rstest]
fn half_precision(#[values(FloatDType::F16, FloatDType::BF16)] dtype: FloatDType) {
    let p = CrossEntropyProblem {
        rows: 33,
        vocab: 2000,
        dtype,
    };
    let (x, t, d) = inputs(&p, 3.0, 5);
    if on_runtime!(computes(dtype)) {
        compare(&p, &x, &t, &d);
    } else {
        assert_dtype_refused(on_runtime!(run_kernels(&p, &x, &t, &d)), dtype);
    }
}

#[rstest]
#[case::no_rows(0, 10)]
#[case::no_vocabulary(4, 0)]
fn empty_input_is_refused(#[case] rows: usize, #[case] vocab: usize) {
    let p = CrossEntropyProblem {
        rows,
        vocab,
        dtype: FloatDType::F32,
    };
    assert_refused(
        on_runtime!(run_kernels(&p, &[], &vec![0; rows], &vec![0.0; rows])),
        Refusal::InvalidProblem,
        "zero-length",
    );
}
