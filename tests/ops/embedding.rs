//! The embedding lookup as a Burn op end to end: fused backward (`Wgpu`/`Cuda`, with and without
//! fusion) and tensor-op (NdArray) implementations under `Autodiff`, against the f64 reference
//! and Burn's own `Embedding`, other int dtypes, ids outside the table in the backward, half
//! precision, and the typed errors of bad input.

use crate::common::{self, check, tensor, tolerance, values, Impl};
use burn::backend::Autodiff;
use burn::nn::EmbeddingConfig;
use burn::tensor::backend::Backend;
use burn::tensor::{FloatDType, Int, IntDType, Tensor, TensorData, TensorPrimitive};
use fla::kernels::embedding::{naive, EmbeddingProblem};
use fla::kernels::testing::Rng;
use fla::ops::{embedding, EmbeddingBackend};
use fla::FlaError;
use rstest::rstest;

struct Case {
    batch: usize,
    seq: usize,
    vocab: usize,
    dim: usize,
    weight: Vec<f64>,
    ids: Vec<i64>,
    /// The gradient arriving on the lookup's output, `[batch · seq, dim]`.
    dy: Vec<f64>,
}

/// A standard normal table and `dy` (f32 values), ids uniform over `0 .. spread`.
fn case(batch: usize, seq: usize, vocab: usize, dim: usize, spread: usize, seed: u64) -> Case {
    let mut rng = Rng::new(seed);
    let mut normal = |n: usize| {
        (0..n)
            .map(|_| rng.normal() as f32 as f64)
            .collect::<Vec<_>>()
    };
    let weight = normal(vocab * dim);
    let dy = normal(batch * seq * dim);
    let ids = (0..batch * seq)
        .map(|_| (rng.next_u64() % spread as u64) as i64)
        .collect();
    Case {
        batch,
        seq,
        vocab,
        dim,
        weight,
        ids,
        dy,
    }
}

fn ids<B: Backend>(c: &Case, device: &B::Device) -> Tensor<B, 2, Int> {
    Tensor::from_data(TensorData::new(c.ids.clone(), [c.batch, c.seq]), device)
}

/// The lookup and `∂weight` through `Autodiff<B>` with the loss `Σ rows ∘ dy`; the ids in `int`
/// (the backend's own int type when `None`).
fn run<B: EmbeddingBackend>(c: &Case, int: Option<IntDType>) -> Result<[Vec<f64>; 2], FlaError> {
    let device = B::Device::default();
    let dt = FloatDType::F32;
    let w = tensor::<Autodiff<B>, 2>(&c.weight, [c.vocab, c.dim], dt, &device).require_grad();
    let mut t = ids::<Autodiff<B>>(c, &device);
    if let Some(int) = int {
        t = t.cast(int);
    }
    let rows = embedding(w.clone(), t)?;
    let dy = tensor::<Autodiff<B>, 3>(&c.dy, [c.batch, c.seq, c.dim], dt, &device);
    let grads = (rows.clone() * dy).sum().backward();
    Ok([
        values(rows.inner()),
        values(w.grad(&grads).expect("gradient reached the table")),
    ])
}

fn run_on(imp: Impl, c: &Case, int: Option<IntDType>) -> Result<[Vec<f64>; 2], FlaError> {
    match imp {
        Impl::Fusion => on_gpu!(fusion, run(c, int)),
        Impl::Cube => on_gpu!(cube, run(c, int)),
        Impl::TensorOps => run::<common::backends::NdArray>(c, int),
    }
}

fn check_case(c: &Case, [rows, dw]: &[Vec<f64>; 2], tol: f64) {
    let want_rows: Vec<f64> = c
        .ids
        .iter()
        .flat_map(|&v| c.weight[v as usize * c.dim..(v as usize + 1) * c.dim].to_vec())
        .collect();
    check("rows", rows, &want_rows, tol);
    check(
        "dweight",
        dw,
        &naive::backward(&c.dy, &c.ids, c.vocab, c.dim),
        tol,
    );
}

#[rstest]
fn matches_reference(
    #[values((1, 1, 1, 1), (2, 63, 97, 60), (3, 65, 300, 100), (4, 1500, 256, 17))] shape: (
        usize,
        usize,
        usize,
        usize,
    ),
    #[values(Impl::Fusion, Impl::Cube, Impl::TensorOps)] imp: Impl,
) {
    let (batch, seq, vocab, dim) = shape;
    let c = case(batch, seq, vocab, dim, vocab, (batch * seq * vocab) as u64);
    let out = run_on(imp, &c, None).expect("valid inputs");
    check_case(&c, &out, tolerance(imp));
}

/// A handful of ids repeated thousands of times (long sums across the kernels' token blocks).
#[rstest]
fn repeated_ids(#[values(Impl::Fusion, Impl::Cube, Impl::TensorOps)] imp: Impl) {
    let c = case(2, 4500, 1000, 24, 3, 5);
    let out = run_on(imp, &c, None).expect("valid inputs");
    check_case(&c, &out, tolerance(imp));
}

/// Ids of another int type than the backend's (the fused kernels read `i32`).
#[rstest]
fn other_int_types(
    #[values(IntDType::I64, IntDType::I32, IntDType::U32)] int: IntDType,
    #[values(Impl::Fusion, Impl::Cube, Impl::TensorOps)] imp: Impl,
) {
    let c = case(3, 40, 50, 12, 50, 3);
    let out = run_on(imp, &c, Some(int)).expect("valid inputs");
    check_case(&c, &out, tolerance(imp));
}

/// The same loss and table gradient as Burn's own `Embedding` (what the language models ran
/// before).
#[rstest]
fn matches_burn_embedding(#[values(Impl::Fusion, Impl::TensorOps)] imp: Impl) {
    fn go<B: EmbeddingBackend>(c: &Case, ours: bool) -> [Vec<f64>; 2] {
        let device = B::Device::default();
        let mut module = EmbeddingConfig::new(c.vocab, c.dim).init::<Autodiff<B>>(&device);
        let w = tensor::<Autodiff<B>, 2>(&c.weight, [c.vocab, c.dim], FloatDType::F32, &device);
        module.weight = burn::module::Param::from_tensor(w);
        let t = ids::<Autodiff<B>>(c, &device);
        let rows = if ours {
            embedding(module.weight.val(), t).expect("valid inputs")
        } else {
            module.forward(t)
        };
        let dy = tensor::<Autodiff<B>, 3>(&c.dy, [c.batch, c.seq, c.dim], FloatDType::F32, &device);
        let grads = (rows.clone() * dy).sum().backward();
        let dw = module
            .weight
            .grad(&grads)
            .expect("gradient reached the table");
        [values(rows.inner()), values(dw)]
    }
    let c = case(2, 70, 90, 33, 90, 17);
    let (ours, burn) = match imp {
        Impl::Fusion => (
            on_gpu!(fusion, go(&c, true)),
            on_gpu!(fusion, go(&c, false)),
        ),
        _ => {
            type B = common::backends::NdArray;
            (go::<B>(&c, true), go::<B>(&c, false))
        }
    };
    check("rows", &ours[0], &burn[0], tolerance(imp));
    check("dweight", &ours[1], &burn[1], tolerance(imp));
}

/// The backward alone: an id outside the table (negative or past it) contributes nothing, and
/// the table's other rows are as the reference has them; rows no id points at are exactly 0.
#[rstest]
fn backward_skips_ids_outside_the_table(#[values(Impl::Fusion, Impl::TensorOps)] imp: Impl) {
    fn go<B: EmbeddingBackend>(c: &Case) -> Vec<f64> {
        let device = B::Device::default();
        let n = c.batch * c.seq;
        let dy = tensor::<B, 2>(&c.dy, [n, c.dim], FloatDType::F32, &device);
        let t = ids::<B>(c, &device).reshape([n]);
        let dw =
            B::embedding_weight_grad(dy.into_primitive().tensor(), t.into_primitive(), c.vocab)
                .expect("valid inputs");
        values(Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(dw)))
    }
    let mut c = case(1, 30, 20, 7, 10, 29);
    c.ids[0] = -3;
    c.ids[5] = 20;
    c.ids[6] = 1000;
    let dw = match imp {
        Impl::Fusion => on_gpu!(fusion, go(&c)),
        _ => go::<common::backends::NdArray>(&c),
    };
    check(
        "dweight",
        &dw,
        &naive::backward(&c.dy, &c.ids, c.vocab, c.dim),
        tolerance(imp),
    );
    assert!(dw[10 * c.dim..].iter().all(|&x| x == 0.0));
}

/// A half-precision table through the fused backend: the backward sums in `f32` and stores in
/// the table's dtype (bf16 where the device computes it; elsewhere the typed refusal, asked of
/// the op's check: making such a tensor on lavapipe takes its runtime down for later tests).
#[rstest]
fn half_precision(#[values(FloatDType::F16, FloatDType::BF16)] dtype: FloatDType) {
    fn go<B: EmbeddingBackend>(dtype: FloatDType) {
        let device = B::Device::default();
        let p = EmbeddingProblem {
            tokens: 600,
            vocab: 64,
            dim: 48,
            dtype: fla::kernels::FloatDType::F32,
        };
        if let Err(e) = Autodiff::<B>::embedding_check(&device, dtype.into(), &p) {
            assert!(
                matches!(e, FlaError::UnsupportedDType { .. }),
                "{dtype:?}: {e}"
            );
            return;
        }
        let mut c = case(2, 300, 64, 48, 64, 9);
        let w = tensor::<Autodiff<B>, 2>(&c.weight, [c.vocab, c.dim], dtype, &device);
        c.weight = values(w.clone().inner());
        let w = w.require_grad();
        let dy = tensor::<Autodiff<B>, 3>(&c.dy, [c.batch, c.seq, c.dim], dtype, &device);
        c.dy = values(dy.clone().inner());
        let rows = embedding(w.clone(), ids::<Autodiff<B>>(&c, &device)).expect("valid inputs");
        let grads = (rows.clone() * dy).sum().backward();
        let out = [
            values(rows.inner()),
            values(w.grad(&grads).expect("gradient reached the table")),
        ];
        // The products `rows ∘ dy` are rounded to the dtype before the sum's backward hands
        // `dy` on; the rows themselves are exact copies.
        check_case(&c, &out, 1e-2);
    }
    on_gpu!(fusion, go(dtype));
}

/// Typed errors, before anything reaches the device.
#[rstest]
#[case::no_tokens([3, 4], [1, 0], "zero-length")]
#[case::no_vocabulary([0, 4], [1, 2], "zero-length")]
#[case::no_width([3, 0], [1, 2], "zero-length")]
fn bad_input(#[case] table: [usize; 2], #[case] shape: [usize; 2], #[case] needle: &str) {
    fn go<B: EmbeddingBackend>(table: [usize; 2], shape: [usize; 2]) -> Result<(), FlaError> {
        let device = B::Device::default();
        let t = Tensor::<B, 2, Int>::zeros(shape, &device);
        embedding(Tensor::<B, 2>::ones(table, &device), t)?;
        Ok(())
    }
    for imp in [Impl::Fusion, Impl::TensorOps] {
        let err = match imp {
            Impl::Fusion => on_gpu!(fusion, go(table, shape)),
            _ => go::<common::backends::NdArray>(table, shape),
        }
        .expect_err("refused");
        assert!(
            matches!(err, FlaError::Empty(_)) && err.to_string().contains(needle),
            "{imp:?}: {err}"
        );
    }
}

/// A gradient of the wrong shape or dtype, or ids of the wrong rank, are refused by name.
#[rstest]
fn bad_backward_input(#[values(Impl::Fusion, Impl::TensorOps)] imp: Impl) {
    fn go<B: EmbeddingBackend>() -> Vec<FlaError> {
        let device = B::Device::default();
        let ids = || Tensor::<B, 1, Int>::zeros([4], &device).into_primitive();
        let dy = |n: usize| {
            Tensor::<B, 2>::ones([n, 3], &device)
                .into_primitive()
                .tensor()
        };
        vec![
            B::embedding_weight_grad(dy(5), ids(), 10).expect_err("rows differ"),
            B::embedding_weight_grad(
                Tensor::<B, 3>::ones([4, 3, 1], &device)
                    .into_primitive()
                    .tensor(),
                ids(),
                10,
            )
            .expect_err("rank"),
            B::embedding_weight_grad(
                dy(4),
                Tensor::<B, 2, Int>::zeros([4, 1], &device).into_primitive(),
                10,
            )
            .expect_err("ids rank"),
        ]
    }
    let errs = match imp {
        Impl::Fusion => on_gpu!(fusion, go()),
        _ => go::<common::backends::NdArray>(),
    };
    for (err, needle) in errs.iter().zip(["5 rows for 4 ids", "[N, D]", "[N]"]) {
        assert!(
            matches!(err, FlaError::Shape(_)) && err.to_string().contains(needle),
            "{imp:?}: {err}"
        );
    }
}
