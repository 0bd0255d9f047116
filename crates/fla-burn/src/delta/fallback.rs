//! The delta rule through plain Burn tensor ops: correct on any backend, one step at a time,
//! state and arithmetic in f32, every state of a group of sequences kept for the backward (this
//! path is for CPUs and checking, not for long sequences).

use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, Tensor, TensorMetadata};
use fla_cubecl_kernels::delta::DeltaProblem;

use super::{describe, describe_backward, DeltaForward, DeltaGrads, DeltaOptions, DeltaTensors};
use crate::gated::fallback::{group_state, outer, seq_groups, stack_steps, step, unwrap, wrap};
use crate::FlaError;

/// Inputs in f32, `q` and `k` repeated over each query/key head's group of value heads, and the
/// per-token scalars `β`, `g` as `[B, T, HV, 1]`.
struct Inputs<B: Backend> {
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    beta: Tensor<B, 4>,
    g: Option<Tensor<B, 4>>,
    h0: Option<Tensor<B, 4>>,
}

/// `[B, T, H, K]` → `[B, T, H·G, K]`, head `h` repeated for value heads `h·G .. h·G + G`.
pub(crate) fn repeat_heads<B: Backend>(t: Tensor<B, 4>, group: usize) -> Tensor<B, 4> {
    let [b, l, h, d] = t.dims();
    t.unsqueeze_dim::<5>(3)
        .expand([b, l, h, group, d])
        .reshape([b, l, h * group, d])
}

/// The inverse sum of [`repeat_heads`]: `[B, T, H·G, K]` → `[B, T, H, K]`.
pub(crate) fn sum_groups<B: Backend>(t: Tensor<B, 4>, group: usize) -> Tensor<B, 4> {
    let [b, l, hv, d] = t.dims();
    t.reshape([b, l, hv / group, group, d])
        .sum_dim(3)
        .squeeze_dim::<4>(3)
}

fn inputs<B: Backend>(x: DeltaTensors<B>, p: &DeltaProblem) -> Inputs<B> {
    let scalar = |t: FloatTensor<B>| wrap::<B, 3>(t).unsqueeze_dim::<4>(3);
    Inputs {
        q: repeat_heads(wrap(x.q), p.group()),
        k: repeat_heads(wrap(x.k), p.group()),
        v: wrap(x.v),
        beta: scalar(x.beta),
        g: x.g.map(scalar),
        h0: x.h0.map(wrap),
    }
}

/// One step's tensors: `q, k: [b, HV, K]`, `v: [b, HV, V]`, `α, β: [b, HV, 1, 1]`.
struct Step<B: Backend> {
    q: Tensor<B, 3>,
    k: Tensor<B, 3>,
    v: Tensor<B, 3>,
    alpha: Tensor<B, 4>,
    beta: Tensor<B, 4>,
}

fn at<B: Backend>(x: &Inputs<B>, rows: &std::ops::Range<usize>, tok: usize) -> Step<B> {
    let pick = |t: &Tensor<B, 4>| step(&t.clone().slice([rows.clone()]), tok);
    let beta = pick(&x.beta).unsqueeze_dim::<4>(3);
    let alpha = match &x.g {
        Some(g) => pick(g).exp().unsqueeze_dim::<4>(3),
        None => beta.ones_like(),
    };
    Step {
        q: pick(&x.q),
        k: pick(&x.k),
        v: pick(&x.v),
        alpha,
        beta,
    }
}

/// `k S` of a `[b, HV, K]` row and a `[b, HV, K, V]` state: `[b, HV, 1, V]`.
fn row_times<B: Backend>(k: &Tensor<B, 3>, s: &Tensor<B, 4>) -> Tensor<B, 4> {
    (k.clone().unsqueeze_dim::<4>(3) * s.clone()).sum_dim(2)
}

/// One step of the recurrence: `S_t` from `S_{t-1}`.
fn advance<B: Backend>(st: &Step<B>, s: Tensor<B, 4>) -> Tensor<B, 4> {
    let ks = row_times(&st.k, &s);
    let u = st.beta.clone() * (st.v.clone().unsqueeze_dim::<4>(2) - st.alpha.clone() * ks);
    s * st.alpha.clone() + st.k.clone().unsqueeze_dim::<4>(3) * u
}

fn initial_state<B: Backend>(
    x: &Inputs<B>,
    p: &DeltaProblem,
    gi: usize,
    rows: usize,
    device: &B::Device,
) -> Tensor<B, 4> {
    let dims = [rows, p.v_heads, p.k_dim, p.v_dim];
    group_state(x.h0.as_ref(), p.cu_seqlens.is_some(), gi, dims, device)
}

pub fn forward<B: Backend>(
    x: DeltaTensors<B>,
    opts: &DeltaOptions,
) -> Result<DeltaForward<B>, FlaError> {
    let p = describe(&x, opts)?;
    let dtype = x.q.dtype();
    let device = B::float_device(&x.q);
    let x = inputs(x, &p);
    let mut outs = Vec::new();
    let mut finals = Vec::new();
    for (gi, (rows, toks)) in seq_groups(p.batch, p.seq_len, p.cu_seqlens.as_deref())
        .into_iter()
        .enumerate()
    {
        let mut s = initial_state(&x, &p, gi, rows.len(), &device);
        let mut o = Vec::new();
        for tok in toks {
            let st = at(&x, &rows, tok);
            s = advance(&st, s);
            o.push(Some(
                row_times(&st.q, &s).squeeze_dim::<3>(2) * p.scale as f64,
            ));
        }
        if !o.is_empty() {
            outs.push(stack_steps(o));
        }
        finals.push(s);
    }
    let ht = p
        .output_final_state
        .then(|| unwrap(Tensor::cat(finals, 0), DType::F32));
    Ok(DeltaForward {
        o: unwrap(Tensor::cat(outs, 1), dtype),
        ht,
    })
}

pub fn backward<B: Backend>(
    x: DeltaTensors<B>,
    d_o: FloatTensor<B>,
    d_ht: Option<FloatTensor<B>>,
    opts: &DeltaOptions,
) -> Result<DeltaGrads<B>, FlaError> {
    let p = describe_backward(&x, &d_o, d_ht.as_ref(), opts)?;
    let dtype = x.q.dtype();
    let device = B::float_device(&x.q);
    let x = inputs(x, &p);
    let d_o: Tensor<B, 4> = wrap(d_o);
    let d_ht: Option<Tensor<B, 4>> = d_ht.map(wrap);
    let scale = p.scale as f64;
    let (mut dqs, mut dks, mut dvs, mut dbs, mut dgs, mut dh0s) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    for (gi, (rows, toks)) in seq_groups(p.batch, p.seq_len, p.cu_seqlens.as_deref())
        .into_iter()
        .enumerate()
    {
        let nrows = rows.len();
        // Every state of the group, S_0 ..= S_L.
        let mut states = vec![initial_state(&x, &p, gi, nrows, &device)];
        for tok in toks.clone() {
            let st = at(&x, &rows, tok);
            states.push(advance(&st, states.last().unwrap().clone()));
        }
        let state_rows = if p.cu_seqlens.is_some() {
            gi..gi + 1
        } else {
            rows.clone()
        };
        let mut gm = match &d_ht {
            Some(d) => d.clone().slice([state_rows]),
            None => Tensor::zeros([nrows, p.v_heads, p.k_dim, p.v_dim], &device),
        };
        let len = toks.len();
        let (mut dq, mut dk, mut dv, mut db, mut dg) = (
            vec![None; len],
            vec![None; len],
            vec![None; len],
            vec![None; len],
            vec![None; len],
        );
        for (i, tok) in toks.clone().enumerate().rev() {
            let st = at(&x, &rows, tok);
            let do_t = step(&d_o.clone().slice([rows.clone()]), tok);
            let (prev, cur) = (&states[i], &states[i + 1]);
            gm = gm + outer(st.q.clone() * scale, do_t.clone());
            dq[i] = Some(
                (do_t.unsqueeze_dim::<4>(2) * cur.clone())
                    .sum_dim(3)
                    .squeeze_dim::<3>(3)
                    * scale,
            );
            let kg = row_times(&st.k, &gm);
            let ks = row_times(&st.k, prev);
            let w = st.v.clone().unsqueeze_dim::<4>(2) - st.alpha.clone() * ks.clone();
            let u = st.beta.clone() * w.clone();
            dv[i] = Some((st.beta.clone() * kg.clone()).squeeze_dim::<3>(2));
            db[i] = Some((kg.clone() * w).sum_dim(3).squeeze_dim::<3>(3));
            let ab = st.alpha.clone() * st.beta.clone();
            let dk_t = (gm.clone() * u).sum_dim(3) - (prev.clone() * kg.clone()).sum_dim(3) * ab;
            dk[i] = Some(dk_t.squeeze_dim::<3>(3));
            let direct = (gm.clone() * prev.clone()).sum_dim(3).sum_dim(2);
            let through_k = (kg.clone() * ks).sum_dim(3) * st.beta.clone();
            dg[i] = Some(((direct - through_k) * st.alpha.clone()).squeeze_dim::<3>(3));
            gm = (gm - st.k.clone().unsqueeze_dim::<4>(3) * kg * st.beta.clone()) * st.alpha;
        }
        if len > 0 {
            dqs.push(stack_steps(dq));
            dks.push(stack_steps(dk));
            dvs.push(stack_steps(dv));
            dbs.push(stack_steps(db));
            dgs.push(stack_steps(dg));
        }
        dh0s.push(gm);
    }
    let scalar =
        |parts: Vec<Tensor<B, 4>>| unwrap(Tensor::cat(parts, 1).squeeze_dim::<3>(3), dtype);
    let group = p.group();
    Ok(DeltaGrads {
        dq: unwrap(sum_groups(Tensor::cat(dqs, 1), group), dtype),
        dk: unwrap(sum_groups(Tensor::cat(dks, 1), group), dtype),
        dv: unwrap(Tensor::cat(dvs, 1), dtype),
        dbeta: scalar(dbs),
        dg: p.gated.then(|| scalar(dgs)),
        dh0: p
            .has_initial_state
            .then(|| unwrap(Tensor::cat(dh0s, 0), DType::F32)),
    })
}
