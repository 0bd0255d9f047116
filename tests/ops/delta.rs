//! The delta-rule family's Burn ops end to end: fused (`Wgpu`/`Cuda`, with and without fusion)
//! and tensor-op (NdArray) implementations under `Autodiff`, against the f64 reference and each
//! other, and the typed errors of bad input.

use crate::common::{self, check, tensor, values, Impl};
use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use burn::tensor::{FloatDType, Tensor};
use fla::kernels::delta::DeltaProblem;
use fla::kernels::testing::{round_to, DeltaCase};
use fla::kernels::FloatDType as KernelDType;
use fla::ops::{delta_rule, gated_delta_rule, DeltaMode, DeltaRuleBackend, DeltaRuleOptions};
use fla::FlaError;
use rstest::rstest;

/// What one run through `Autodiff` returns: outputs and every input's gradient.
#[derive(Debug)]
struct Run {
    o: Vec<f64>,
    ht: Vec<f64>,
    dq: Vec<f64>,
    dk: Vec<f64>,
    dv: Vec<f64>,
    dbeta: Vec<f64>,
    dg: Option<Vec<f64>>,
    dh0: Vec<f64>,
}

fn dtype_of(d: KernelDType) -> FloatDType {
    match d {
        KernelDType::F32 => FloatDType::F32,
        KernelDType::F16 => FloatDType::F16,
        KernelDType::BF16 => FloatDType::BF16,
    }
}

/// `[B, T, H, HV, K, V]`.
fn case(gated: bool, dims: [usize; 6], cu_seqlens: Option<Vec<usize>>, strength: f64) -> DeltaCase {
    let [batch, seq_len, heads, v_heads, k_dim, v_dim] = dims;
    let p = DeltaProblem {
        batch,
        seq_len,
        heads,
        v_heads,
        k_dim,
        v_dim,
        gated,
        scale: (k_dim as f32).powf(-0.5),
        cu_seqlens,
        has_initial_state: true,
        output_final_state: true,
        dtype: KernelDType::F32,
    };
    let seed = dims
        .iter()
        .fold(gated as u64 + 5, |a, &d| a * 37 + d as u64);
    DeltaCase::new(p, strength, seed)
}

/// Forward and backward through `Autodiff<B>` with the loss `Σ o ∘ do + Σ hT ∘ dhT`.
fn run<B: DeltaRuleBackend>(c: &DeltaCase, mode: DeltaMode) -> Result<Run, FlaError> {
    let device = B::Device::default();
    let p = &c.p;
    let dt = dtype_of(p.dtype);
    let [b, t, h, hv, kd, vd] = [p.batch, p.seq_len, p.heads, p.v_heads, p.k_dim, p.v_dim];
    let n = p.num_seqs();
    let t4 =
        |x: &[f64], s: [usize; 4], d| tensor::<Autodiff<B>, 4>(x, s, d, &device).require_grad();
    let t3 = |x: &[f64]| tensor::<Autodiff<B>, 3>(x, [b, t, hv], dt, &device).require_grad();
    let q = t4(&c.q, [b, t, h, kd], dt);
    let k = t4(&c.k, [b, t, h, kd], dt);
    let v = t4(&c.v, [b, t, hv, vd], dt);
    let beta = t3(&c.beta);
    let h0 = t4(c.h0.as_ref().unwrap(), [n, hv, kd, vd], FloatDType::F32);
    let mut opts = DeltaRuleOptions::default()
        .with_scale(p.scale as f64)
        .with_initial_state(h0.clone())
        .with_final_state()
        .with_mode(mode);
    opts.cu_seqlens = p.cu_seqlens.clone();
    let g = c.g.as_deref().map(t3);
    let out = match &g {
        Some(g) => gated_delta_rule(
            q.clone(),
            k.clone(),
            v.clone(),
            g.clone(),
            beta.clone(),
            opts,
        )?,
        None => delta_rule(q.clone(), k.clone(), v.clone(), beta.clone(), opts)?,
    };
    let d_o = tensor::<Autodiff<B>, 4>(&c.d_o, [b, t, hv, vd], dt, &device);
    let d_ht = tensor::<Autodiff<B>, 4>(
        c.d_ht.as_ref().unwrap(),
        [n, hv, kd, vd],
        FloatDType::F32,
        &device,
    );
    let ht = out.final_state.expect("final state requested");
    let loss = (out.o.clone().cast(FloatDType::F32) * d_o.cast(FloatDType::F32)).sum()
        + (ht.clone() * d_ht).sum();
    let grads = loss.backward();
    let grad4 =
        |x: &Tensor<Autodiff<B>, 4>| values(x.grad(&grads).expect("gradient reached input"));
    let grad3 =
        |x: &Tensor<Autodiff<B>, 3>| values(x.grad(&grads).expect("gradient reached input"));
    Ok(Run {
        o: values(out.o.inner()),
        ht: values(ht.inner()),
        dq: grad4(&q),
        dk: grad4(&k),
        dv: grad4(&v),
        dbeta: grad3(&beta),
        dg: g.as_ref().map(grad3),
        dh0: grad4(&h0),
    })
}

fn run_on(imp: Impl, c: &DeltaCase) -> Result<Run, FlaError> {
    run_in(imp, c, DeltaMode::Auto)
}

fn run_in(imp: Impl, c: &DeltaCase, mode: DeltaMode) -> Result<Run, FlaError> {
    match imp {
        Impl::Fusion => on_gpu!(fusion, run(c, mode)),
        Impl::Cube => on_gpu!(cube, run(c, mode)),
        Impl::TensorOps => run::<common::backends::NdArray>(c, mode),
    }
}

/// `(outputs and vector gradients, dβ and dg)`: the scalar gradients sum whole states of
/// products whose terms cancel, so f32 rounding sets a looser bound (as for gate gradients).
fn tolerances(imp: Impl, dtype: KernelDType) -> (f64, f64) {
    match dtype {
        KernelDType::F32 if imp != Impl::TensorOps && common::runtime_name() == "cuda" => {
            (1e-4, 1e-3)
        }
        KernelDType::F32 => (1e-5, 1e-3),
        _ => (1e-2, 2e-2),
    }
}

fn against_reference(imp: Impl, c: &DeltaCase) {
    against_reference_in(imp, c, DeltaMode::Auto)
}

fn against_reference_in(imp: Impl, c: &DeltaCase, mode: DeltaMode) {
    let r = run_in(imp, c, mode).expect("valid inputs");
    let (tol, stol) = tolerances(imp, c.p.dtype);
    let (fwd, grads) = c.reference();
    check("o", &r.o, &fwd.o, tol);
    check("ht", &r.ht, &fwd.ht, tol);
    check("dq", &r.dq, &grads.dq, tol);
    check("dk", &r.dk, &grads.dk, tol);
    check("dv", &r.dv, &grads.dv, tol);
    check("dh0", &r.dh0, grads.dh0.as_ref().unwrap(), tol);
    check("dbeta", &r.dbeta, &grads.dbeta, stol);
    match (&r.dg, &grads.dg) {
        (Some(dg), Some(want)) => check("dg", dg, want, stol),
        (None, None) => {}
        _ => panic!("dg on one side only"),
    }
}

#[rstest]
#[case::t1([2, 1, 2, 2, 16, 16])]
#[case::t63_odd_dims([2, 63, 2, 2, 60, 100])]
#[case::t65_grouped([1, 65, 1, 2, 100, 60])]
#[case::t100_k128([1, 100, 1, 1, 128, 128])]
fn autodiff_matches_reference(
    #[case] dims: [usize; 6],
    #[values(false, true)] gated: bool,
    #[values(Impl::Fusion, Impl::Cube, Impl::TensorOps)] imp: Impl,
) {
    against_reference(imp, &case(gated, dims, None, 1.0));
}

#[rstest]
fn grouped_heads_strong_gates_and_varlen(
    #[values(Impl::Fusion, Impl::TensorOps)] imp: Impl,
    #[values(2, 4)] ratio: usize,
) {
    // Lengths 1, 40, 0 (empty), 30; log decays scaled by 10.
    let cu = vec![0, 1, 41, 41, 71];
    against_reference(
        imp,
        &case(true, [1, 71, 2, 2 * ratio, 32, 24], Some(cu), 10.0),
    );
}

/// Each form forced (`Auto` takes the recurrent form): a batch shorter than one chunk, odd head
/// dims (60, 100) at T = 65 and T = 1500 (a partial last chunk), and a varlen batch with an empty
/// sequence and a sequence over one chunk, strong decays in all.
#[rstest]
#[case::short([2, 40, 2, 2, 32, 48], None)]
#[case::t65_odd_dims([2, 65, 2, 2, 60, 100], None)]
#[case::t1500_odd_dims([1, 1500, 1, 2, 100, 60], None)]
#[case::varlen([1, 171, 2, 4, 32, 24], Some(vec![0, 1, 101, 101, 171]))]
fn forced_modes(
    #[case] dims: [usize; 6],
    #[case] cu: Option<Vec<usize>>,
    #[values(DeltaMode::FusedRecurrent, DeltaMode::Chunk)] mode: DeltaMode,
    #[values(false, true)] gated: bool,
) {
    against_reference_in(Impl::Fusion, &case(gated, dims, cu, 10.0), mode);
}

/// The fused op and the tensor-op fallback agree with each other, not only with the reference.
#[test]
fn fused_matches_tensor_ops() {
    let c = case(true, [2, 40, 2, 4, 32, 48], None, 1.0);
    let a = run_on(Impl::Fusion, &c).unwrap();
    let b = run_on(Impl::TensorOps, &c).unwrap();
    let (tol, stol) = tolerances(Impl::Fusion, KernelDType::F32);
    for (name, x, y, t) in [
        ("o", &a.o, &b.o, tol),
        ("ht", &a.ht, &b.ht, tol),
        ("dq", &a.dq, &b.dq, tol),
        ("dk", &a.dk, &b.dk, tol),
        ("dv", &a.dv, &b.dv, tol),
        ("dh0", &a.dh0, &b.dh0, tol),
        ("dbeta", &a.dbeta, &b.dbeta, stol),
        ("dg", a.dg.as_ref().unwrap(), b.dg.as_ref().unwrap(), stol),
    ] {
        check(name, x, y, t);
    }
}

/// A loss on the final state alone: every gradient flows through hT.
#[test]
fn loss_on_final_state_only() {
    let mut c = case(true, [1, 50, 1, 2, 16, 16], None, 1.0);
    c.d_o.iter_mut().for_each(|x| *x = 0.0);
    against_reference(Impl::Fusion, &c);
}

#[rstest]
fn half_precision(#[values(false, true)] gated: bool) {
    let mut c = case(gated, [2, 100, 2, 2, 64, 64], None, 1.0);
    c.p.dtype = KernelDType::F16;
    let round = |xs: &mut Vec<f64>| {
        xs.iter_mut()
            .for_each(|x| *x = round_to(KernelDType::F16, *x))
    };
    for xs in [&mut c.q, &mut c.k, &mut c.v, &mut c.beta, &mut c.d_o] {
        round(xs);
    }
    if let Some(g) = c.g.as_mut() {
        round(g);
    }
    against_reference(Impl::Fusion, &c);
}

/// `use_qk_l2norm` normalises q and k before the rule as FLA's kernels do, `x / sqrt(‖x‖² +
/// 1e-6)`: the same as normalising them by hand, output and gradients (the gradient then flows
/// through the normalisation).
#[test]
fn qk_l2norm_matches_normalising_by_hand() {
    type B = Autodiff<common::backends::NdArray>;
    let device = Default::default();
    let [b, t, h, kd, vd] = [1, 12, 2, 8, 8];
    let q = Tensor::<B, 4>::random([b, t, h, kd], burn::tensor::Distribution::Default, &device)
        .require_grad();
    let k = Tensor::<B, 4>::random([b, t, h, kd], burn::tensor::Distribution::Default, &device)
        .require_grad();
    let v = Tensor::<B, 4>::random([b, t, h, vd], burn::tensor::Distribution::Default, &device);
    let beta = Tensor::<B, 3>::full([b, t, h], 0.5, &device);
    let norm = |x: Tensor<B, 4>| x.clone() / (x.square().sum_dim(3) + 1e-6).sqrt();
    let fused = delta_rule(
        q.clone(),
        k.clone(),
        v.clone(),
        beta.clone(),
        DeltaRuleOptions::default().with_qk_l2norm(),
    )
    .unwrap()
    .o;
    let by_hand = delta_rule(
        norm(q.clone()),
        norm(k.clone()),
        v,
        beta,
        DeltaRuleOptions::default(),
    )
    .unwrap()
    .o;
    check(
        "o",
        &values(fused.clone().inner()),
        &values(by_hand.clone().inner()),
        1e-6,
    );
    let ga = fused.sum().backward();
    let gb = by_hand.sum().backward();
    for x in [&q, &k] {
        check(
            "grad",
            &values(x.grad(&ga).unwrap()),
            &values(x.grad(&gb).unwrap()),
            1e-6,
        );
    }
}

// ---- bad input ----

fn normal<B: Backend, const D: usize>(shape: [usize; D]) -> Tensor<B, D> {
    Tensor::random(
        shape,
        burn::tensor::Distribution::Default,
        &Default::default(),
    )
}

fn expect_err<T>(r: Result<T, FlaError>, want: fn(&FlaError) -> bool, what: &str) {
    match r {
        Err(e) if want(&e) => {}
        Err(e) => panic!("{what}: wrong error {e:?}"),
        Ok(_) => panic!("{what}: accepted"),
    }
}

/// `other`: a float dtype the backend holds that differs from the default f32.
fn bad_inputs<B: DeltaRuleBackend>(other: FloatDType) {
    let opts = DeltaRuleOptions::<B>::default;
    let shape = |e: &FlaError| matches!(e, FlaError::Shape(_));
    let q = normal::<B, 4>([1, 8, 2, 16]);
    let v = normal::<B, 4>([1, 8, 4, 16]);
    let beta = normal::<B, 3>([1, 8, 4]);
    let r = delta_rule(
        q.clone(),
        q.clone(),
        normal([1, 8, 3, 16]),
        normal([1, 8, 3]),
        opts(),
    );
    expect_err(
        r,
        |e| matches!(e, FlaError::Shape(m) if m.contains("multiple")),
        "HV = 3, H = 2",
    );
    let r = delta_rule(q.clone(), q.clone(), v.clone(), normal([1, 8, 2]), opts());
    expect_err(r, shape, "beta with H heads instead of HV");
    let r = gated_delta_rule(
        q.clone(),
        q.clone(),
        v.clone(),
        normal([1, 7, 4]),
        beta.clone(),
        opts(),
    );
    expect_err(r, shape, "g of the wrong length");
    let r = delta_rule(
        q.clone(),
        normal([1, 8, 2, 15]),
        v.clone(),
        beta.clone(),
        opts(),
    );
    expect_err(r, shape, "k and q differ");
    let r = delta_rule(
        q.clone(),
        q.clone(),
        normal([2, 8, 4, 16]),
        beta.clone(),
        opts(),
    );
    expect_err(r, shape, "batch mismatch");
    let r = delta_rule(
        q.clone(),
        q.clone(),
        v.clone(),
        beta.clone(),
        opts().with_initial_state(normal([1, 2, 16, 16])),
    );
    expect_err(r, shape, "initial state with H heads instead of HV");
    let r = delta_rule(
        q.clone(),
        q.clone(),
        v.clone(),
        beta.clone(),
        opts().with_cu_seqlens(vec![0, 5, 9]),
    );
    expect_err(
        r,
        |e| matches!(e, FlaError::CuSeqlens(_)),
        "cu_seqlens past T",
    );
    let r = delta_rule(
        q.clone().cast(other),
        q.clone(),
        v.clone(),
        beta.clone(),
        opts(),
    );
    expect_err(r, |e| matches!(e, FlaError::DType(_)), "mixed dtypes");
    let r = delta_rule(
        normal([1, 0, 2, 16]),
        normal([1, 0, 2, 16]),
        normal([1, 0, 4, 16]),
        normal([1, 0, 4]),
        opts(),
    );
    expect_err(r, |e| matches!(e, FlaError::Empty(_)), "zero-length input");
}

#[test]
fn bad_inputs_fused() {
    on_gpu!(fusion, bad_inputs(FloatDType::F16));
    on_gpu!(cube, bad_inputs(FloatDType::F16));
}

#[test]
fn bad_inputs_tensor_ops() {
    bad_inputs::<Autodiff<common::backends::NdArray>>(FloatDType::F64);
}

/// f64 has no fused kernel; bf16 has none on Vulkan. Both are refused with `UnsupportedDType`.
#[test]
fn unsupported_dtypes_are_refused() {
    on_gpu!(fusion, unsupported_dtypes());
}

fn unsupported_dtypes<Fused: DeltaRuleBackend>() {
    let q = normal::<Fused, 4>([1, 4, 1, 8]);
    let beta = normal::<Fused, 3>([1, 4, 1]);
    let unsupported = |e: &FlaError| matches!(e, FlaError::UnsupportedDType { .. });
    let cast = |d| {
        delta_rule(
            q.clone().cast(d),
            q.clone().cast(d),
            q.clone().cast(d),
            beta.clone().cast(d),
            DeltaRuleOptions::default(),
        )
    };
    expect_err(cast(FloatDType::F64), unsupported, "f64");
    if common::runtime_name() == "wgpu" {
        expect_err(cast(FloatDType::BF16), unsupported, "bf16 on Vulkan");
    }
}

/// A sequence past what lavapipe runs in one shader invocation, through the fusion stream (which
/// defers the launch) and autodiff: on lavapipe an error naming the limit from the forward call,
/// not a panic when the stream executes; on a GPU it runs.
#[rstest]
fn long_sequence_on_the_fusion_stream(
    #[values(DeltaMode::FusedRecurrent, DeltaMode::Chunk)] mode: DeltaMode,
) {
    let t = fla::kernels::gated::CPU_VULKAN_MAX_SEQ + 7;
    let c = case(true, [1, t, 1, 1, 16, 16], None, 1.0);
    match (common::is_cpu_vulkan(), run_in(Impl::Fusion, &c, mode)) {
        (true, Err(FlaError::Kernel(msg))) => assert!(msg.contains("lavapipe"), "{msg}"),
        (true, other) => panic!("expected the loop limit, got {:?}", other.map(|_| ())),
        (false, r) => {
            r.expect("a GPU runs long sequences");
        }
    }
}
