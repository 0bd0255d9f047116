//! The gated recurrence through plain Burn tensor ops: correct on any backend, one step at a
//! time, state and arithmetic in f32. Same algorithm as the fused kernels (gate gradients through
//! the cumulative-sum identity of MATH.md), so it doubles as their reference inside Burn.

use std::ops::Range;

use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, FloatDType, Tensor, TensorMetadata, TensorPrimitive};
use fla_cubecl_kernels::gated::{GateKind, GatedProblem};

use super::{
    describe, describe_backward, float_dtype, GatedForward, GatedGrads, GatedOptions, GatedTensors,
};
use crate::FlaError;

pub(crate) fn wrap<B: Backend, const D: usize>(t: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::<B, D>::from_primitive(TensorPrimitive::Float(t)).cast(FloatDType::F32)
}

pub(crate) fn unwrap<B: Backend, const D: usize>(t: Tensor<B, D>, dtype: DType) -> FloatTensor<B> {
    t.cast(float_dtype(dtype)).into_primitive().tensor()
}

/// The tensors of one group of sequences that run side by side: a batch of `b` rows over the
/// same token range (all of `B` without `cu_seqlens`, one sequence at a time with it).
struct Group<B: Backend> {
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    /// `[b, L, H, K]` (a scalar gate is broadcast over K), absent without a key gate.
    g: Option<Tensor<B, 4>>,
    gv: Option<Tensor<B, 4>>,
}

struct Inputs<B: Backend> {
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    g: Option<Tensor<B, 4>>,
    gv: Option<Tensor<B, 4>>,
    h0: Option<Tensor<B, 4>>,
}

fn inputs<B: Backend>(x: GatedTensors<B>, p: &GatedProblem) -> Inputs<B> {
    let g = x.g.map(|g| match p.gate {
        GateKind::Scalar => wrap::<B, 3>(g).unsqueeze_dim::<4>(3),
        _ => wrap::<B, 4>(g),
    });
    Inputs {
        q: wrap(x.q),
        k: wrap(x.k),
        v: wrap(x.v),
        g,
        gv: x.gv.map(wrap),
        h0: x.h0.map(wrap),
    }
}

fn groups(p: &GatedProblem) -> Vec<(Range<usize>, Range<usize>)> {
    seq_groups(p.batch, p.seq_len, p.cu_seqlens.as_deref())
}

/// `(batch rows, token range)` of each group of sequences run side by side: all of `B` without
/// `cu_seqlens`, one sequence at a time with it.
pub(crate) fn seq_groups(
    batch: usize,
    seq_len: usize,
    cu_seqlens: Option<&[usize]>,
) -> Vec<(Range<usize>, Range<usize>)> {
    match cu_seqlens {
        None => vec![(0..batch, 0..seq_len)],
        Some(cu) => cu.windows(2).map(|w| (0..1, w[0]..w[1])).collect(),
    }
}

fn slice_group<B: Backend>(x: &Inputs<B>, rows: &Range<usize>, toks: &Range<usize>) -> Group<B> {
    let s = |t: &Tensor<B, 4>| t.clone().slice([rows.clone(), toks.clone()]);
    Group {
        q: s(&x.q),
        k: s(&x.k),
        v: s(&x.v),
        g: x.g.as_ref().map(s),
        gv: x.gv.as_ref().map(s),
    }
}

/// Row `t` of a `[b, L, H, D]` tensor as `[b, H, D]`.
pub(crate) fn step<B: Backend>(t: &Tensor<B, 4>, i: usize) -> Tensor<B, 3> {
    t.clone().narrow(1, i, 1).squeeze_dim::<3>(1)
}

/// `a_t` as `[b, H, K|1, 1]` and `b_t` as `[b, H, 1, V]`, when present.
fn decays<B: Backend>(grp: &Group<B>, i: usize) -> (Option<Tensor<B, 4>>, Option<Tensor<B, 4>>) {
    let a = grp
        .g
        .as_ref()
        .map(|g| step(g, i).exp().unsqueeze_dim::<4>(3));
    let b = grp
        .gv
        .as_ref()
        .map(|g| step(g, i).exp().unsqueeze_dim::<4>(2));
    (a, b)
}

fn apply_decay<B: Backend>(
    s: Tensor<B, 4>,
    a: &Option<Tensor<B, 4>>,
    b: &Option<Tensor<B, 4>>,
) -> Tensor<B, 4> {
    let s = match a {
        Some(a) => s * a.clone(),
        None => s,
    };
    match b {
        Some(b) => s * b.clone(),
        None => s,
    }
}

/// Outer product of `[b, H, K]` and `[b, H, V]` rows: `[b, H, K, V]`.
pub(crate) fn outer<B: Backend>(x: Tensor<B, 3>, y: Tensor<B, 3>) -> Tensor<B, 4> {
    x.unsqueeze_dim::<4>(3) * y.unsqueeze_dim::<4>(2)
}

/// Processing order of a sequence of `len` tokens.
fn order(len: usize, reverse: bool) -> Vec<usize> {
    if reverse {
        (0..len).rev().collect()
    } else {
        (0..len).collect()
    }
}

/// Stacks per-step `[b, H, D]` rows (indexed by token) into `[b, L, H, D]`.
pub(crate) fn stack_steps<B: Backend>(rows: Vec<Option<Tensor<B, 3>>>) -> Tensor<B, 4> {
    Tensor::stack::<4>(
        rows.into_iter()
            .map(|r| r.expect("every step written"))
            .collect(),
        1,
    )
}

fn initial_state<B: Backend>(
    x: &Inputs<B>,
    p: &GatedProblem,
    gi: usize,
    rows: usize,
    device: &B::Device,
) -> Tensor<B, 4> {
    let dims = [rows, p.heads, p.k_dim, p.v_dim];
    group_state(x.h0.as_ref(), p.cu_seqlens.is_some(), gi, dims, device)
}

/// The initial state of group `gi` (see [`seq_groups`]): all of `h0` without `cu_seqlens`, its
/// row `gi` with them, zeros of `dims` without `h0`.
pub(crate) fn group_state<B: Backend>(
    h0: Option<&Tensor<B, 4>>,
    varlen: bool,
    gi: usize,
    dims: [usize; 4],
    device: &B::Device,
) -> Tensor<B, 4> {
    match (h0, varlen) {
        (Some(h0), false) => h0.clone(),
        (Some(h0), true) => h0.clone().narrow(0, gi, 1),
        (None, _) => Tensor::zeros(dims, device),
    }
}

pub fn forward<B: Backend>(
    x: GatedTensors<B>,
    opts: &GatedOptions,
) -> Result<GatedForward<B>, FlaError> {
    let p = describe(&x, opts)?;
    let dtype = x.q.dtype();
    let device = B::float_device(&x.q);
    let x = inputs(x, &p);
    let scale = p.scale as f64;
    let mut outs = Vec::new();
    let mut finals = Vec::new();
    for (gi, (rows, toks)) in groups(&p).into_iter().enumerate() {
        let mut s = initial_state(&x, &p, gi, rows.len(), &device);
        let len = toks.len();
        if len > 0 {
            let grp = slice_group(&x, &rows, &toks);
            let mut o: Vec<Option<Tensor<B, 3>>> = vec![None; len];
            for i in order(len, p.reverse) {
                let (a, b) = decays(&grp, i);
                s = apply_decay(s, &a, &b) + outer(step(&grp.k, i), step(&grp.v, i));
                let o_t = (step(&grp.q, i).unsqueeze_dim::<4>(3) * s.clone()).sum_dim(2);
                o[i] = Some(o_t.squeeze_dim::<3>(2) * scale);
            }
            outs.push(stack_steps(o));
        }
        finals.push(s);
    }
    let o = Tensor::cat(outs, 1);
    let ht = p
        .output_final_state
        .then(|| unwrap(Tensor::cat(finals, 0), DType::F32));
    Ok(GatedForward {
        o: unwrap(o, dtype),
        ht,
        scores: None,
    })
}

#[allow(clippy::too_many_arguments)]
pub fn backward<B: Backend>(
    x: GatedTensors<B>,
    o: FloatTensor<B>,
    ht: Option<FloatTensor<B>>,
    d_o: FloatTensor<B>,
    d_ht: Option<FloatTensor<B>>,
    opts: &GatedOptions,
) -> Result<GatedGrads<B>, FlaError> {
    let p = describe_backward(&x, &o, ht.as_ref(), &d_o, d_ht.as_ref(), opts)?;
    let dtype = x.q.dtype();
    let device = B::float_device(&x.q);
    let scalar_gate = p.gate == GateKind::Scalar;
    let x = inputs(x, &p);
    let o: Tensor<B, 4> = wrap(o);
    let d_o: Tensor<B, 4> = wrap(d_o);
    let ht: Option<Tensor<B, 4>> = ht.map(wrap);
    let d_ht: Option<Tensor<B, 4>> = d_ht.map(wrap);
    let scale = p.scale as f64;

    let (mut dqs, mut dks, mut dvs, mut dgs, mut dgvs, mut dh0s) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    for (gi, (rows, toks)) in groups(&p).into_iter().enumerate() {
        let nrows = rows.len();
        let len = toks.len();
        let grp = slice_group(&x, &rows, &toks);
        let d_o_g = d_o.clone().slice([rows.clone(), toks.clone()]);
        let o_g = o.clone().slice([rows.clone(), toks.clone()]);
        let state_rows = if p.cu_seqlens.is_some() {
            gi..gi + 1
        } else {
            rows.clone()
        };
        let (ht_g, d_ht_g) = match (&ht, &d_ht) {
            (Some(h), Some(d)) => (
                Some(h.clone().slice([state_rows.clone()])),
                Some(d.clone().slice([state_rows.clone()])),
            ),
            _ => (None, None),
        };
        let ord = order(len, p.reverse);

        // Pass 1: replay the forward for dq_t = scale · do_t S_tᵀ.
        let mut s = initial_state(&x, &p, gi, nrows, &device);
        let mut dq: Vec<Option<Tensor<B, 3>>> = vec![None; len];
        for &i in &ord {
            let (a, b) = decays(&grp, i);
            s = apply_decay(s, &a, &b) + outer(step(&grp.k, i), step(&grp.v, i));
            let dq_t = (step(&d_o_g, i).unsqueeze_dim::<4>(2) * s.clone()).sum_dim(3);
            dq[i] = Some(dq_t.squeeze_dim::<3>(3) * scale);
        }

        // Pass 2: G = ∂L/∂S_t backwards in time, and the gate identity's running sums.
        let mut gm = match &d_ht_g {
            Some(d) => d.clone(),
            None => Tensor::zeros([nrows, p.heads, p.k_dim, p.v_dim], &device),
        };
        let final_term = match (&ht_g, &d_ht_g) {
            (Some(h), Some(d)) => Some(h.clone() * d.clone()),
            _ => None,
        };
        let mut acc_k: Option<Tensor<B, 3>> = grp.g.as_ref().map(|_| match &final_term {
            Some(f) => f.clone().sum_dim(3).squeeze_dim::<3>(3),
            None => Tensor::zeros([nrows, p.heads, p.k_dim], &device),
        });
        let mut acc_v: Option<Tensor<B, 3>> = grp.gv.as_ref().map(|_| match &final_term {
            Some(f) => f.clone().sum_dim(2).squeeze_dim::<3>(2),
            None => Tensor::zeros([nrows, p.heads, p.v_dim], &device),
        });
        let (mut dk, mut dv, mut dg, mut dgv): (Vec<Option<Tensor<B, 3>>>, Vec<_>, Vec<_>, Vec<_>) = (
            vec![None; len],
            vec![None; len],
            vec![None; len],
            vec![None; len],
        );
        for &i in ord.iter().rev() {
            let (q_t, k_t, v_t, do_t) = (
                step(&grp.q, i),
                step(&grp.k, i),
                step(&grp.v, i),
                step(&d_o_g, i),
            );
            gm = gm + outer(q_t.clone() * scale, do_t.clone());
            let dk_t = (v_t.clone().unsqueeze_dim::<4>(2) * gm.clone())
                .sum_dim(3)
                .squeeze_dim::<3>(3);
            let dv_t = (k_t.clone().unsqueeze_dim::<4>(3) * gm.clone())
                .sum_dim(2)
                .squeeze_dim::<3>(2);
            if let Some(acc) = acc_k.take() {
                let acc = acc + q_t * dq[i].clone().unwrap() - k_t * dk_t.clone();
                dg[i] = Some(acc.clone());
                acc_k = Some(acc);
            }
            if let Some(acc) = acc_v.take() {
                let acc = acc + step(&o_g, i) * do_t - v_t * dv_t.clone();
                dgv[i] = Some(acc.clone());
                acc_v = Some(acc);
            }
            dk[i] = Some(dk_t);
            dv[i] = Some(dv_t);
            let (a, b) = decays(&grp, i);
            gm = apply_decay(gm, &a, &b);
        }
        if len > 0 {
            dqs.push(stack_steps(dq));
            dks.push(stack_steps(dk));
            dvs.push(stack_steps(dv));
            if grp.g.is_some() {
                dgs.push(stack_steps(dg));
            }
            if grp.gv.is_some() {
                dgvs.push(stack_steps(dgv));
            }
        }
        dh0s.push(gm);
    }
    let dg = (!dgs.is_empty()).then(|| {
        let dg = Tensor::cat(dgs, 1);
        if scalar_gate {
            unwrap(dg.sum_dim(3).squeeze_dim::<3>(3), dtype)
        } else {
            unwrap(dg, dtype)
        }
    });
    Ok(GatedGrads {
        dq: unwrap(Tensor::cat(dqs, 1), dtype),
        dk: unwrap(Tensor::cat(dks, 1), dtype),
        dv: unwrap(Tensor::cat(dvs, 1), dtype),
        dg,
        dgv: (!dgvs.is_empty()).then(|| unwrap(Tensor::cat(dgvs, 1), dtype)),
        dh0: x
            .h0
            .as_ref()
            .map(|_| unwrap(Tensor::cat(dh0s, 0), DType::F32)),
    })
}
