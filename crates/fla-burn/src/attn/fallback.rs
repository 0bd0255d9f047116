//! Softmax attention through plain Burn tensor ops: correct on any backend, in f32, with the
//! `T_q × T_k` scores materialised (this path is for CPUs and checking, not for long sequences).

use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Bool, Tensor, TensorData, TensorMetadata};
use fla_cubecl_kernels::attn::AttnProblem;

use super::{describe, describe_backward, AttnForward, AttnGrads, AttnOpOptions, AttnTensors};
use crate::delta::fallback::{repeat_heads, sum_groups};
use crate::gated::fallback::{unwrap, wrap};
use crate::FlaError;

/// Stands for a masked score: finite, so fully masked rows stay free of NaN.
const MASKED: f32 = -1.0e30;

/// Which scores are masked out, `[1, 1, T_q, T_k]` (true: masked): the causal mask and window
/// from the problem, and with `cu_seqlens` everything across sequences.
fn hidden<B: Backend>(p: &AttnProblem, device: &B::Device) -> Tensor<B, 4, Bool> {
    let (tq, tk) = (p.q_len, p.kv_len);
    let mut mask = vec![true; tq * tk];
    for n in 0..p.num_seqs() {
        let (q0, lq, k0, lk) = p.seq(n);
        for i in 0..lq {
            for j in 0..lk {
                if p.visible(i, j, lq, lk) {
                    // Batch rows share one mask; with cu_seqlens the offsets place the block.
                    let (r, c) = if p.cu_seqlens.is_some() {
                        (q0 + i, k0 + j)
                    } else {
                        (i, j)
                    };
                    mask[r * tk + c] = false;
                }
            }
        }
        if p.cu_seqlens.is_none() {
            break;
        }
    }
    Tensor::<B, 2, Bool>::from_data(TensorData::new(mask, [tq, tk]), device).reshape([1, 1, tq, tk])
}

/// Heads-first f32 operands `[B, H, T, D]`, keys and values repeated over their query heads.
struct Operands<B: Backend> {
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
}

fn operands<B: Backend>(x: AttnTensors<B>, p: &AttnProblem) -> Operands<B> {
    let heads_first = |t: Tensor<B, 4>| t.swap_dims(1, 2);
    Operands {
        q: heads_first(wrap(x.q)),
        k: heads_first(repeat_heads(wrap(x.k), p.group())),
        v: heads_first(repeat_heads(wrap(x.v), p.group())),
    }
}

/// Scores after scale, cap and mask, and the raw scaled products (for the cap's gradient).
fn scores<B: Backend>(p: &AttnProblem, x: &Operands<B>) -> (Tensor<B, 4>, Tensor<B, 4>) {
    let raw = x.q.clone().matmul(x.k.clone().swap_dims(2, 3)) * p.scale;
    let capped = match p.softcap {
        Some(c) => (raw.clone() / c).tanh() * c,
        None => raw.clone(),
    };
    let mask = hidden::<B>(p, &raw.device()).expand(raw.shape());
    (capped.mask_fill(mask, MASKED), raw)
}

pub(crate) fn forward<B: Backend>(
    x: AttnTensors<B>,
    opts: &AttnOpOptions,
) -> Result<AttnForward<B>, FlaError> {
    let p = describe(&x, opts)?;
    let dtype = x.q.dtype();
    let x = operands(x, &p);
    let (s, _) = scores(&p, &x);
    let m = s.clone().max_dim(3);
    let lse = m.clone() + (s.clone() - m).exp().sum_dim(3).log();
    let probs = (s - lse.clone()).exp();
    let o = probs.matmul(x.v).swap_dims(1, 2);
    let lse: Tensor<B, 3> = lse.squeeze_dim::<3>(3).swap_dims(1, 2);
    Ok(AttnForward {
        o: unwrap(o, dtype),
        lse: unwrap(lse, burn::tensor::DType::F32),
    })
}

pub(crate) fn backward<B: Backend>(
    x: AttnTensors<B>,
    out: AttnForward<B>,
    d_o: FloatTensor<B>,
    opts: &AttnOpOptions,
) -> Result<AttnGrads<B>, FlaError> {
    let p = describe_backward(&x, &out, &d_o, opts)?;
    let dtype = x.q.dtype();
    let x = operands(x, &p);
    let (s, raw) = scores(&p, &x);
    let lse: Tensor<B, 3> = wrap(out.lse);
    let probs = (s - lse.swap_dims(1, 2).unsqueeze_dim::<4>(3)).exp();
    let d_o = wrap::<B, 4>(d_o).swap_dims(1, 2);
    let o = wrap::<B, 4>(out.o).swap_dims(1, 2);
    let d_p = d_o.clone().matmul(x.v.swap_dims(2, 3));
    let delta = (d_o.clone() * o).sum_dim(3);
    let mut d_s = probs.clone() * (d_p - delta) * p.scale;
    if let Some(c) = p.softcap {
        let t = (raw / c).tanh();
        d_s = d_s * (t.clone() * t).neg().add_scalar(1.0);
    }
    let dq = d_s.clone().matmul(x.k).swap_dims(1, 2);
    let dk = d_s.swap_dims(2, 3).matmul(x.q).swap_dims(1, 2);
    let dv = probs.swap_dims(2, 3).matmul(d_o).swap_dims(1, 2);
    Ok(AttnGrads {
        dq: unwrap(dq, dtype),
        dk: unwrap(sum_groups(dk, p.group()), dtype),
        dv: unwrap(sum_groups(dv, p.group()), dtype),
    })
}
