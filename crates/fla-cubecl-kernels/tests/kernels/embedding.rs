//! Kernel-level tests of the embedding backward against the f64 reference: one token to several
//! token blocks, vocabularies from 1 row to past a cube of ids, odd widths, ids repeated many
//! times, ids outside the table, half precision, bit-identical reruns, refused input.

use cubecl::prelude::*;
use fla_cubecl_kernels::embedding::{embedding_backward, naive, EmbeddingProblem, TOKEN_BLOCK};
use fla_cubecl_kernels::testing::{decode, encode, round_to, Rng};
use fla_cubecl_kernels::{FloatDType, KernelError};
use rstest::rstest;

use crate::common::{
    assert_dtype_refused, assert_refused, base_dtype, check, computes, runtime_name, tolerance,
    Refusal,
};

fn run_kernel<R: Runtime>(
    client: &ComputeClient<R>,
    p: &EmbeddingProblem,
    dy: &[f64],
    ids: &[i64],
) -> Result<Vec<f64>, KernelError> {
    let id_bytes: Vec<u8> = ids.iter().flat_map(|&t| (t as i32).to_le_bytes()).collect();
    let dy = client.create_from_slice(&encode(p.dtype, dy));
    let ids = client.create_from_slice(&id_bytes);
    // The output starts as NaN, so an entry the kernel never writes fails the comparison.
    let dw = client.create_from_slice(&encode(p.dtype, &vec![f64::NAN; p.vocab * p.dim]));
    embedding_backward(client, p, [&dy, &ids], &dw)?;
    Ok(decode(p.dtype, &client.read_one_unchecked(dw)))
}

/// `dy` standard normal (rounded to the dtype); ids uniform over `0 .. spread` (a small spread
/// repeats ids many times).
fn inputs(p: &EmbeddingProblem, spread: usize, seed: u64) -> (Vec<f64>, Vec<i64>) {
    let mut rng = Rng::new(seed);
    let dy = (0..p.tokens * p.dim)
        .map(|_| round_to(p.dtype, rng.normal()))
        .collect();
    let ids = (0..p.tokens)
        .map(|_| (rng.next_u64() % spread as u64) as i64)
        .collect();
    (dy, ids)
}

fn compare(p: &EmbeddingProblem, dy: &[f64], ids: &[i64]) -> Vec<f64> {
    let out = on_runtime!(run_kernel(p, dy, ids)).expect("valid problem");
    let want = naive::backward(dy, ids, p.vocab, p.dim);
    check("dW", &out, &want, tolerance(p.dtype));
    // Rows no id points at are exactly zero, not merely small.
    for v in 0..p.vocab {
        if !ids.contains(&(v as i64)) {
            assert!(
                out[v * p.dim..(v + 1) * p.dim].iter().all(|&x| x == 0.0),
                "row {v} has no token but a nonzero gradient"
            );
        }
    }
    out
}

#[rstest]
#[case::one_token(1, 1, 1)]
#[case::odd(63, 97, 60)]
#[case::odd_wide(65, 300, 100)]
#[case::vocab_past_a_cube(1500, 1000, 17)]
#[case::several_token_blocks(2 * TOKEN_BLOCK + 5, 511, 8)]
fn matches_reference(#[case] tokens: usize, #[case] vocab: usize, #[case] dim: usize) {
    let p = EmbeddingProblem {
        tokens,
        vocab,
        dim,
        dtype: base_dtype(),
    };
    let (dy, ids) = inputs(&p, vocab, (tokens * vocab + dim) as u64);
    compare(&p, &dy, &ids);
}

/// Every token on a handful of ids (long sums, across token blocks), and most rows untouched.
#[test]
fn repeated_ids() {
    let p = EmbeddingProblem {
        tokens: TOKEN_BLOCK + 300,
        vocab: 700,
        dim: 33,
        dtype: base_dtype(),
    };
    let (dy, ids) = inputs(&p, 3, 7);
    compare(&p, &dy, &ids);
}

/// Ids outside the table (negative, at and past the vocabulary, and one equal to a padding
/// unit's id in the last cube) contribute nothing; the rest are summed as usual.
#[test]
fn ids_outside_the_table_are_skipped() {
    let p = EmbeddingProblem {
        tokens: 40,
        vocab: 10,
        dim: 5,
        dtype: base_dtype(),
    };
    let (dy, mut ids) = inputs(&p, 10, 3);
    ids[0] = -1;
    ids[7] = 10;
    ids[8] = 255;
    ids[20] = i32::MAX as i64;
    compare(&p, &dy, &ids);
}

/// The sums run in token order: two runs give the same bits.
#[test]
fn reruns_are_identical() {
    let p = EmbeddingProblem {
        tokens: 3 * TOKEN_BLOCK,
        vocab: 50,
        dim: 16,
        dtype: base_dtype(),
    };
    let (dy, ids) = inputs(&p, 50, 5);
    let a = on_runtime!(run_kernel(&p, &dy, &ids)).expect("valid problem");
    let b = on_runtime!(run_kernel(&p, &dy, &ids)).expect("valid problem");
    assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()));
}

/// f16 and bf16 where the device computes them (sums in f32, stored in the dtype); elsewhere the
/// call is refused with the dtype's name.
#[rstest]
fn half_precision(#[values(FloatDType::F16, FloatDType::BF16)] dtype: FloatDType) {
    let p = EmbeddingProblem {
        tokens: 900,
        vocab: 130,
        dim: 64,
        dtype,
    };
    let (dy, ids) = inputs(&p, 130, 9);
    if on_runtime!(computes(dtype)) {
        compare(&p, &dy, &ids);
    } else {
        assert_dtype_refused(on_runtime!(run_kernel(&p, &dy, &ids)), dtype);
    }
}

#[rstest]
#[case::no_tokens(0, 10, 4)]
#[case::no_vocabulary(4, 0, 4)]
#[case::no_width(4, 10, 0)]
fn empty_input_is_refused(#[case] tokens: usize, #[case] vocab: usize, #[case] dim: usize) {
    let p = EmbeddingProblem {
        tokens,
        vocab,
        dim,
        dtype: FloatDType::F32,
    };
    assert_refused(
        on_runtime!(run_kernel(&p, &vec![0.0; tokens * dim], &vec![0; tokens])),
        Refusal::InvalidProblem,
        "zero-length",
    );
}

/// On a CPU Vulkan driver (lavapipe), which cuts an invocation off past about 65,536 loop
/// iterations, a backward whose row sum could run longer (every token on one id) is refused
/// before launch; a GPU runs it.
#[test]
fn past_the_cpu_loop_limit() {
    let p = EmbeddingProblem {
        tokens: 70_000,
        vocab: 10,
        dim: 4,
        dtype: FloatDType::F32,
    };
    let (dy, ids) = inputs(&p, 10, 21);
    if on_runtime!(is_cpu_vulkan()) {
        assert_refused(
            on_runtime!(run_kernel(&p, &dy, &ids)),
            Refusal::DeviceLimit,
            "CPU Vulkan driver (lavapipe)",
        );
    } else {
        compare(&p, &dy, &ids);
    }
}

fn is_cpu_vulkan<R: Runtime>(client: &ComputeClient<R>) -> bool {
    fla_cubecl_kernels::gated::is_cpu_vulkan(client)
}
