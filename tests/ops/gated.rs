//! The gated family's Burn ops end to end: fused (`Wgpu`/`Cuda`, with and without fusion) and
//! tensor-op (NdArray) implementations under `Autodiff`, against the f64 reference and each
//! other, and the typed errors of bad input.

use crate::common::{self, check, tensor, values, Impl};
use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, FloatDType, Tensor};
use fla::kernels::gated::GateKind;
use fla::kernels::testing::{problem, GatedCase};
use fla::kernels::FloatDType as KernelDType;
use fla::ops::{
    fused_recurrent_gla, fused_recurrent_linear_attn, fused_recurrent_retention,
    fused_recurrent_simple_gla, gla, linear_attn, retention, retention_decay, simple_gla,
    GatedMode, GatedRecurrentBackend, RecurrentOptions,
};
use fla::FlaError;
use rstest::rstest;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Variant {
    LinearAttn,
    Retention,
    SimpleGla,
    Gla,
    GlaWithValueGate,
}

impl Variant {
    fn gate(self) -> GateKind {
        match self {
            Variant::LinearAttn => GateKind::None,
            Variant::Retention | Variant::SimpleGla => GateKind::Scalar,
            Variant::Gla | Variant::GlaWithValueGate => GateKind::Vector,
        }
    }
}

fn case(
    variant: Variant,
    dims: [usize; 5],
    strength: f64,
    reverse: bool,
    cu_seqlens: Option<Vec<usize>>,
    dtype: KernelDType,
) -> GatedCase {
    let p = problem(
        variant.gate(),
        variant == Variant::GlaWithValueGate,
        dims,
        reverse,
        cu_seqlens,
        true,
        dtype,
    );
    let seed = dims.iter().fold(variant as u64, |s, &d| s * 131 + d as u64);
    let mut c = GatedCase::new(p, strength, seed);
    if variant == Variant::Retention {
        // The op's fixed decays, rounded as the op rounds them, broadcast over tokens.
        let decay = retention_decay(c.p.heads);
        let g: Vec<f64> = (0..c.p.tokens() * c.p.heads)
            .map(|i| decay[i % c.p.heads] as f32 as f64)
            .collect();
        c.g = Some(g);
    }
    c
}

struct Run {
    o: Vec<f64>,
    ht: Vec<f64>,
    dq: Vec<f64>,
    dk: Vec<f64>,
    dv: Vec<f64>,
    dg: Option<Vec<f64>>,
    dgv: Option<Vec<f64>>,
    dh0: Vec<f64>,
}

fn dtype_of(d: KernelDType) -> FloatDType {
    match d {
        KernelDType::F32 => FloatDType::F32,
        KernelDType::F16 => FloatDType::F16,
        KernelDType::BF16 => FloatDType::BF16,
    }
}

/// Forward and backward through `Autodiff<B>` with the loss `Σ o ∘ do + Σ hT ∘ dhT`, in the
/// given form.
fn run<B: GatedRecurrentBackend>(
    c: &GatedCase,
    variant: Variant,
    mode: GatedMode,
) -> Result<Run, FlaError> {
    let device = B::Device::default();
    let p = &c.p;
    let dt = dtype_of(p.dtype);
    let [b, t, h, kd, vd] = [p.batch, p.seq_len, p.heads, p.k_dim, p.v_dim];
    let n = p.num_seqs();
    let t4 =
        |x: &[f64], s: [usize; 4], d| tensor::<Autodiff<B>, 4>(x, s, d, &device).require_grad();
    let q = t4(&c.q, [b, t, h, kd], dt);
    let k = t4(&c.k, [b, t, h, kd], dt);
    let v = t4(&c.v, [b, t, h, vd], dt);
    let h0 = t4(c.h0.as_ref().unwrap(), [n, h, kd, vd], FloatDType::F32);
    let opts = RecurrentOptions {
        scale: Some(p.scale as f64),
        initial_state: Some(h0.clone()),
        output_final_state: true,
        reverse: p.reverse,
        cu_seqlens: p.cu_seqlens.clone(),
        mode,
    };
    let mut g3 = None;
    let mut g4 = None;
    let mut gv = None;
    let out = match variant {
        Variant::LinearAttn => linear_attn(q.clone(), k.clone(), v.clone(), opts)?,
        Variant::Retention => retention(q.clone(), k.clone(), v.clone(), None, opts)?,
        Variant::SimpleGla => {
            let g = tensor::<Autodiff<B>, 3>(c.g.as_ref().unwrap(), [b, t, h], dt, &device)
                .require_grad();
            g3 = Some(g.clone());
            simple_gla(q.clone(), k.clone(), v.clone(), g, opts)?
        }
        Variant::Gla | Variant::GlaWithValueGate => {
            let g = t4(c.g.as_ref().unwrap(), [b, t, h, kd], dt);
            g4 = Some(g.clone());
            gv = c.gv.as_ref().map(|x| t4(x, [b, t, h, vd], dt));
            gla(q.clone(), k.clone(), v.clone(), g, gv.clone(), opts)?
        }
    };
    let d_o = tensor::<Autodiff<B>, 4>(&c.d_o, [b, t, h, vd], dt, &device);
    let d_ht = tensor::<Autodiff<B>, 4>(
        c.d_ht.as_ref().unwrap(),
        [n, h, kd, vd],
        FloatDType::F32,
        &device,
    );
    let ht = out.final_state.expect("final state requested");
    let loss = (out.o.clone().cast(FloatDType::F32) * d_o.cast(FloatDType::F32)).sum()
        + (ht.clone() * d_ht).sum();
    let grads = loss.backward();
    let grad4 =
        |x: &Tensor<Autodiff<B>, 4>| values(x.grad(&grads).expect("gradient reached input"));
    Ok(Run {
        o: values(out.o.inner()),
        ht: values(ht.inner()),
        dq: grad4(&q),
        dk: grad4(&k),
        dv: grad4(&v),
        dg: g3
            .map(|g| values(g.grad(&grads).expect("gradient reached g")))
            .or_else(|| g4.as_ref().map(grad4)),
        dgv: gv.as_ref().map(grad4),
        dh0: grad4(&h0),
    })
}

fn run_on(imp: Impl, c: &GatedCase, variant: Variant) -> Result<Run, FlaError> {
    run_mode(imp, c, variant, GatedMode::FusedRecurrent)
}

fn run_mode(imp: Impl, c: &GatedCase, variant: Variant, mode: GatedMode) -> Result<Run, FlaError> {
    match imp {
        Impl::Fusion => on_gpu!(fusion, run(c, variant, mode)),
        Impl::Cube => on_gpu!(cube, run(c, variant, mode)),
        Impl::TensorOps => run::<common::backends::NdArray>(c, variant, mode),
    }
}

fn tolerances(imp: Impl, dtype: KernelDType) -> (f64, f64) {
    match dtype {
        // CUDA's exp and fused multiply-adds stray further from f64 than lavapipe or the CPU.
        KernelDType::F32 if imp != Impl::TensorOps && common::runtime_name() == "cuda" => {
            (1e-4, 1e-3)
        }
        // Gate gradients come from the cumulative-sum identity: see the kernel tests (measured up
        // to 6e-4 here with log gates scaled by 10, in both implementations).
        KernelDType::F32 => (1e-5, 1e-3),
        _ => (1e-2, 2e-2),
    }
}

fn compare(r: &Run, c: &GatedCase, variant: Variant, (tol, gate_tol): (f64, f64)) {
    let (fwd, grads) = c.reference();
    check("o", &r.o, &fwd.o, tol);
    check("ht", &r.ht, &fwd.ht, tol);
    check("dq", &r.dq, &grads.dq, tol);
    check("dk", &r.dk, &grads.dk, tol);
    check("dv", &r.dv, &grads.dv, tol);
    check("dh0", &r.dh0, grads.dh0.as_ref().unwrap(), tol);
    if variant == Variant::Retention {
        assert!(r.dg.is_none(), "retention's decay is a constant");
    } else if let Some(dg) = &r.dg {
        check("dg", dg, grads.dg.as_ref().unwrap(), gate_tol);
    }
    if let Some(dgv) = &r.dgv {
        check("dgv", dgv, grads.dgv.as_ref().unwrap(), gate_tol);
    }
}

fn against_reference(imp: Impl, c: &GatedCase, variant: Variant) {
    chunk_or_not_against_reference(imp, c, variant, GatedMode::FusedRecurrent)
}

fn chunk_or_not_against_reference(imp: Impl, c: &GatedCase, variant: Variant, mode: GatedMode) {
    let r = run_mode(imp, c, variant, mode).expect("valid inputs");
    compare(&r, c, variant, tolerances(imp, c.p.dtype));
}

#[rstest]
#[case::t1([2, 1, 2, 16, 16])]
#[case::t63_odd_dims([2, 63, 2, 60, 100])]
#[case::t64([1, 64, 2, 64, 64])]
#[case::t65_k_gt_v([2, 65, 1, 100, 60])]
#[case::t500_k128([1, 500, 1, 128, 128])]
fn autodiff_matches_reference(
    #[case] dims: [usize; 5],
    #[values(
        Variant::LinearAttn,
        Variant::Retention,
        Variant::SimpleGla,
        Variant::Gla,
        Variant::GlaWithValueGate
    )]
    variant: Variant,
    #[values(Impl::Fusion, Impl::TensorOps)] imp: Impl,
) {
    let c = case(variant, dims, 1.0, false, None, KernelDType::F32);
    against_reference(imp, &c, variant);
}

/// The fused recurrent form over a long sequence (the tensor-op fallback's 1500-step graph is
/// left to the shorter cases).
#[rstest]
fn recurrent_t1500(#[values(Variant::Retention, Variant::Gla)] variant: Variant) {
    let c = case(
        variant,
        [1, 1500, 1, 60, 100],
        1.0,
        false,
        None,
        KernelDType::F32,
    );
    chunk_or_not_against_reference(Impl::Fusion, &c, variant, GatedMode::FusedRecurrent);
}

#[rstest]
fn cube_backend_without_fusion(
    #[values(Variant::LinearAttn, Variant::SimpleGla, Variant::GlaWithValueGate)] variant: Variant,
) {
    let c = case(
        variant,
        [2, 33, 2, 32, 48],
        1.0,
        false,
        None,
        KernelDType::F32,
    );
    against_reference(Impl::Cube, &c, variant);
}

#[rstest]
fn strong_gates_and_reverse(
    #[values(0.1, 10.0)] strength: f64,
    #[values(false, true)] reverse: bool,
    #[values(Variant::SimpleGla, Variant::GlaWithValueGate)] variant: Variant,
    #[values(Impl::Fusion, Impl::TensorOps)] imp: Impl,
) {
    let c = case(
        variant,
        [1, 65, 2, 60, 16],
        strength,
        reverse,
        None,
        KernelDType::F32,
    );
    against_reference(imp, &c, variant);
}

#[rstest]
fn varlen_with_empty_sequence(
    #[values(
        Variant::LinearAttn,
        Variant::Retention,
        Variant::SimpleGla,
        Variant::Gla,
        Variant::GlaWithValueGate
    )]
    variant: Variant,
    #[values(Impl::Fusion, Impl::TensorOps)] imp: Impl,
) {
    // Sequences of lengths 1, 15, 0 and 300 packed into B = 1.
    let cu = vec![0, 1, 16, 16, 316];
    let c = case(
        variant,
        [1, 316, 2, 32, 20],
        1.0,
        false,
        Some(cu),
        KernelDType::F32,
    );
    against_reference(imp, &c, variant);
}

/// Two runs of one gated case agree on the output, the final state and every gradient, within
/// the fused kernels' f32 tolerances.
fn agree(a: &Run, b: &Run) {
    let (tol, gate_tol) = tolerances(Impl::Fusion, KernelDType::F32);
    for (name, x, y, t) in [
        ("o", &a.o, &b.o, tol),
        ("ht", &a.ht, &b.ht, tol),
        ("dq", &a.dq, &b.dq, tol),
        ("dk", &a.dk, &b.dk, tol),
        ("dv", &a.dv, &b.dv, tol),
        ("dh0", &a.dh0, &b.dh0, tol),
        (
            "dg",
            a.dg.as_ref().unwrap(),
            b.dg.as_ref().unwrap(),
            gate_tol,
        ),
    ] {
        check(name, x, y, t);
    }
}

/// The fused op and the tensor-op fallback agree with each other, not only with the reference.
#[rstest]
fn fused_matches_tensor_ops(
    #[values(Variant::SimpleGla, Variant::Gla, Variant::GlaWithValueGate)] variant: Variant,
) {
    let c = case(
        variant,
        [2, 40, 2, 24, 40],
        1.0,
        true,
        None,
        KernelDType::F32,
    );
    let a = run_on(Impl::Fusion, &c, variant).unwrap();
    let b = run_on(Impl::TensorOps, &c, variant).unwrap();
    agree(&a, &b);
}

/// A loss on the final state alone: every gradient flows through hT.
#[rstest]
fn loss_on_final_state_only(
    #[values(Variant::LinearAttn, Variant::SimpleGla, Variant::GlaWithValueGate)] variant: Variant,
    #[values(Impl::Fusion, Impl::TensorOps)] imp: Impl,
) {
    let mut c = case(
        variant,
        [2, 30, 2, 16, 24],
        1.0,
        false,
        None,
        KernelDType::F32,
    );
    c.d_o = vec![0.0; c.d_o.len()];
    against_reference(imp, &c, variant);
}

#[rstest]
fn half_precision(#[values(Variant::SimpleGla, Variant::Gla)] variant: Variant) {
    let c = case(
        variant,
        [2, 100, 2, 32, 32],
        1.0,
        false,
        None,
        KernelDType::F16,
    );
    against_reference(Impl::Fusion, &c, variant);
}

// ---- chunk form through the Burn op ----

#[rstest]
#[case::t1([2, 1, 2, 16, 16])]
#[case::t63_odd_dims([2, 63, 2, 60, 100])]
#[case::t64([1, 64, 2, 64, 64])]
#[case::t65_k_gt_v([2, 65, 1, 100, 60])]
#[case::t129([1, 129, 2, 32, 32])]
#[case::t1500([1, 1500, 1, 64, 64])]
fn chunk_autodiff_matches_reference(
    #[case] dims: [usize; 5],
    #[values(
        Variant::LinearAttn,
        Variant::Retention,
        Variant::SimpleGla,
        Variant::Gla
    )]
    variant: Variant,
) {
    let c = case(variant, dims, 1.0, false, None, KernelDType::F32);
    chunk_or_not_against_reference(Impl::Fusion, &c, variant, GatedMode::Chunk);
}

#[rstest]
fn chunk_strong_gates_reverse_and_varlen(
    #[values(0.1, 10.0)] strength: f64,
    #[values(false, true)] reverse: bool,
    #[values(Variant::SimpleGla, Variant::Gla)] variant: Variant,
    #[values(Impl::Fusion, Impl::Cube)] imp: Impl,
) {
    // Lengths 1, 69, 0 (empty), 130 and 64: sequences start and end mid-chunk.
    let cu = vec![0, 1, 70, 70, 200, 264];
    let c = case(
        variant,
        [1, 264, 2, 60, 16],
        strength,
        reverse,
        Some(cu),
        KernelDType::F32,
    );
    chunk_or_not_against_reference(imp, &c, variant, GatedMode::Chunk);
}

/// The chunk form of the variants without gates (linear attention) or with fixed ones
/// (retention) over sequences that start and end mid-chunk, one of them empty.
#[rstest]
fn chunk_varlen_ungated_and_fixed_decay(
    #[values(Variant::LinearAttn, Variant::Retention)] variant: Variant,
) {
    let cu = vec![0, 1, 70, 70, 200, 264];
    let c = case(
        variant,
        [1, 264, 2, 60, 16],
        1.0,
        false,
        Some(cu),
        KernelDType::F32,
    );
    chunk_or_not_against_reference(Impl::Fusion, &c, variant, GatedMode::Chunk);
}

#[rstest]
fn chunk_loss_on_final_state_only(
    #[values(Variant::LinearAttn, Variant::SimpleGla, Variant::Gla)] variant: Variant,
) {
    // Weak gates: over 130 steps unit-strength decays multiply to ~1e-40, below f32's normal
    // range, and dh0 would be compared in denormals.
    let mut c = case(
        variant,
        [2, 130, 2, 16, 24],
        0.1,
        false,
        None,
        KernelDType::F32,
    );
    c.d_o = vec![0.0; c.d_o.len()];
    chunk_or_not_against_reference(Impl::Fusion, &c, variant, GatedMode::Chunk);
}

#[rstest]
fn chunk_half_precision(#[values(Variant::SimpleGla, Variant::Gla)] variant: Variant) {
    let c = case(
        variant,
        [2, 200, 2, 32, 32],
        1.0,
        false,
        None,
        KernelDType::F16,
    );
    chunk_or_not_against_reference(Impl::Fusion, &c, variant, GatedMode::Chunk);
}

/// The two forms agree with each other, not only with the reference.
#[test]
fn chunk_agrees_with_recurrent() {
    let c = case(
        Variant::Gla,
        [2, 200, 2, 32, 32],
        1.0,
        false,
        None,
        KernelDType::F32,
    );
    let a = run_mode(Impl::Fusion, &c, Variant::Gla, GatedMode::Chunk).unwrap();
    let b = run_mode(Impl::Fusion, &c, Variant::Gla, GatedMode::FusedRecurrent).unwrap();
    agree(&a, &b);
}

/// The chunk form has no value gate: every implementation says so rather than ignoring `gv`.
#[rstest]
fn chunk_refuses_value_gate(#[values(Impl::Fusion, Impl::TensorOps)] imp: Impl) {
    let c = case(
        Variant::GlaWithValueGate,
        [1, 100, 1, 16, 16],
        1.0,
        false,
        None,
        KernelDType::F32,
    );
    match run_mode(imp, &c, Variant::GlaWithValueGate, GatedMode::Chunk) {
        Err(FlaError::Unsupported(msg)) => assert!(msg.contains("value gate"), "{msg}"),
        Err(other) => panic!("expected Unsupported, got {other}"),
        Ok(_) => panic!("chunk form accepted a value gate"),
    }
}

// ---- bad input ----

fn normal<B: Backend, const D: usize>(shape: [usize; D]) -> Tensor<B, D> {
    Tensor::random(
        shape,
        burn::tensor::Distribution::Normal(0.0, 1.0),
        &Default::default(),
    )
}

fn gla_call<B: GatedRecurrentBackend>(
    q: [usize; 4],
    k: [usize; 4],
    v: [usize; 4],
    gk: [usize; 4],
    opts: RecurrentOptions<B>,
) -> Result<(), FlaError> {
    fused_recurrent_gla(
        normal::<B, 4>(q),
        normal(k),
        normal(v),
        normal(gk),
        None,
        opts,
    )
    .map(|_| ())
}

fn expect_err<T>(r: Result<T, FlaError>, want: fn(&FlaError) -> bool, what: &str) {
    match r {
        Err(e) if want(&e) => {}
        Err(e) => panic!("{what}: wrong error {e}"),
        Ok(_) => panic!("{what}: accepted"),
    }
}

/// `other`: a float dtype the backend holds that differs from the default f32.
fn bad_inputs<B: GatedRecurrentBackend>(other: FloatDType) {
    let o = RecurrentOptions::<B>::default;
    let shape = |e: &FlaError| matches!(e, FlaError::Shape(_));
    let cu = |e: &FlaError| matches!(e, FlaError::CuSeqlens(_));
    expect_err(
        gla_call::<B>(
            [1, 8, 2, 16],
            [1, 8, 2, 12],
            [1, 8, 2, 16],
            [1, 8, 2, 16],
            o(),
        ),
        shape,
        "k dim",
    );
    expect_err(
        gla_call::<B>(
            [1, 8, 2, 16],
            [1, 8, 2, 16],
            [1, 8, 3, 16],
            [1, 8, 2, 16],
            o(),
        ),
        shape,
        "heads",
    );
    expect_err(
        gla_call::<B>(
            [1, 8, 2, 16],
            [1, 8, 2, 16],
            [1, 8, 2, 16],
            [1, 8, 2, 8],
            o(),
        ),
        shape,
        "gate",
    );
    let h0 = o().with_initial_state(normal([1, 2, 16, 8]));
    expect_err(
        gla_call::<B>(
            [1, 8, 2, 16],
            [1, 8, 2, 16],
            [1, 8, 2, 16],
            [1, 8, 2, 16],
            h0,
        ),
        shape,
        "state",
    );
    let dims = [1, 8, 2, 16];
    expect_err(
        gla_call::<B>(
            dims,
            dims,
            dims,
            dims,
            o().with_cu_seqlens(vec![0, 5, 3, 8]),
        ),
        cu,
        "not increasing",
    );
    expect_err(
        gla_call::<B>(dims, dims, dims, dims, o().with_cu_seqlens(vec![0, 5, 7])),
        cu,
        "end",
    );
    let b2 = [2, 8, 2, 16];
    expect_err(
        gla_call::<B>(b2, b2, b2, b2, o().with_cu_seqlens(vec![0, 8])),
        cu,
        "batch",
    );
    let empty = [1, 0, 2, 16];
    expect_err(
        gla_call::<B>(empty, empty, empty, empty, o()),
        |e| matches!(e, FlaError::Empty(_)),
        "zero length",
    );
    let q = normal::<B, 4>(dims);
    let g = normal::<B, 3>([1, 8, 2]).cast(other);
    expect_err(
        fused_recurrent_simple_gla(q.clone(), q.clone(), q.clone(), g, o()),
        |e| matches!(e, FlaError::DType(_)),
        "mixed dtypes",
    );
    expect_err(
        fused_recurrent_retention(q.clone(), q.clone(), q, Some(&[-0.1]), o()),
        shape,
        "decay per head",
    );
}

fn bad_inputs_with_autodiff<B: GatedRecurrentBackend>() {
    bad_inputs::<B>(FloatDType::F16);
    bad_inputs::<Autodiff<B>>(FloatDType::F16);
}

#[test]
fn bad_inputs_fused() {
    on_gpu!(fusion, bad_inputs_with_autodiff());
}

#[test]
fn bad_inputs_tensor_ops() {
    // NdArray holds f32 and f64 but no f16.
    bad_inputs::<common::backends::NdArray>(FloatDType::F64);
}

/// f64 has no fused kernel; bf16 has none on Vulkan (storage only). Both are refused with
/// `UnsupportedDType` before anything is compiled; CUDA computes bf16.
#[test]
fn unsupported_dtypes_are_refused() {
    on_gpu!(fusion, unsupported_dtypes());
}

fn unsupported_dtypes<Fused: GatedRecurrentBackend>() {
    let device = Default::default();
    let q = normal::<Fused, 4>([1, 4, 1, 16]).cast(FloatDType::F64);
    expect_err(
        fused_recurrent_linear_attn(q.clone(), q.clone(), q, RecurrentOptions::default()),
        |e| matches!(e, FlaError::UnsupportedDType { .. }),
        "f64",
    );
    let bf16 = Fused::gated_check_dtype(&device, DType::BF16);
    if common::runtime_name() == "cuda" {
        assert_eq!(bf16, Ok(()));
    } else {
        expect_err(
            bf16,
            |e| matches!(e, FlaError::UnsupportedDType { .. }),
            "bf16 on wgpu",
        );
    }
}

/// Without a Vulkan driver the runtime check returns `NoDevice` instead of panicking. Runs in a
/// child process (the driver choice is made once per process) with no driver files.
#[cfg(feature = "wgpu")]
#[test]
fn no_driver_is_an_error() {
    if std::env::var("FLA_NO_DRIVER_CHILD").is_ok() {
        let r = fla::ops::device::check_wgpu(&Default::default());
        // The error says what to install, not only wgpu's internal reason.
        assert!(
            matches!(&r, Err(FlaError::NoDevice(why)) if why.contains("mesa-vulkan-drivers")),
            "got {r:?}"
        );
        return;
    }
    // libtest names a test by its path below the crate root (`gated::no_driver_is_an_error`).
    let module = module_path!().split_once("::").map_or("", |(_, m)| m);
    let name = format!("{module}::no_driver_is_an_error");
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", &name, "--nocapture"])
        .env("FLA_NO_DRIVER_CHILD", "1")
        .env("VK_DRIVER_FILES", "/nonexistent.json")
        .env("VK_ICD_FILENAMES", "/nonexistent.json")
        .env("WGPU_BACKEND", "vulkan")
        .output()
        .expect("child test runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "child saw no NoDevice error: {stdout}"
    );
    // A filter that matches nothing also succeeds: the child must have run this very test.
    assert!(
        stdout.contains("test result: ok. 1 passed"),
        "the child ran no test named {name}: {stdout}"
    );
}

/// A sequence past what lavapipe runs in one shader invocation, through the fusion stream (which
/// defers the launch) and autodiff: on lavapipe an error naming the limit from the forward call,
/// not a panic when the stream executes; on a GPU it runs.
#[rstest]
fn long_sequence_on_the_fusion_stream(
    #[values(GatedMode::FusedRecurrent, GatedMode::Chunk)] mode: GatedMode,
) {
    let t = fla::kernels::gated::CPU_VULKAN_MAX_SEQ + 7;
    let c = case(
        Variant::Gla,
        [1, t, 1, 16, 16],
        1.0,
        false,
        None,
        KernelDType::F32,
    );
    match (
        common::is_cpu_vulkan(),
        run_mode(Impl::Fusion, &c, Variant::Gla, mode),
    ) {
        (true, Err(FlaError::Kernel(msg))) => assert!(msg.contains("lavapipe"), "{msg}"),
        (true, other) => panic!("expected the loop limit, got {:?}", other.map(|_| ())),
        (false, r) => {
            r.expect("a GPU runs long sequences");
        }
    }
}
