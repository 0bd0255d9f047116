//! The naive `f64` reference for softmax attention: every score of a row materialised, forward
//! and backward by the direct formulas.

use super::AttnProblem;

/// Forward results: `o: [B·T_q, H, V]` and the log-sum-exp of each row's scores `[B·T_q, H]`.
#[derive(Debug, Clone)]
pub struct AttnForward {
    pub o: Vec<f64>,
    pub lse: Vec<f64>,
}

/// Gradients in the inputs' layouts.
#[derive(Debug, Clone)]
pub struct AttnGrads {
    pub dq: Vec<f64>,
    pub dk: Vec<f64>,
    pub dv: Vec<f64>,
}

/// Visits every (sequence, head, query) row with its visible keys' scores after the cap, their
/// raw scaled products, and the row's normaliser.
fn rows(
    p: &AttnProblem,
    q: &[f64],
    k: &[f64],
    mut f: impl FnMut(usize, usize, usize, &[(usize, f64, f64)], f64),
) {
    let (hq, hk, d) = (p.heads, p.kv_heads, p.k_dim);
    for n in 0..p.num_seqs() {
        let (q0, lq, k0, lk) = p.seq(n);
        for h in 0..hq {
            let g = h / p.group();
            for i in 0..lq {
                let qi = &q[((q0 + i) * hq + h) * d..][..d];
                let mut scores = Vec::new();
                for j in 0..lk {
                    if !p.visible(i, j, lq, lk) {
                        continue;
                    }
                    let kj = &k[((k0 + j) * hk + g) * d..][..d];
                    let raw = p.scale as f64 * qi.iter().zip(kj).map(|(a, b)| a * b).sum::<f64>();
                    let x = match p.softcap {
                        Some(c) => c as f64 * (raw / c as f64).tanh(),
                        None => raw,
                    };
                    scores.push((j, x, raw));
                }
                let m = scores.iter().map(|s| s.1).fold(f64::NEG_INFINITY, f64::max);
                let lse = m + scores.iter().map(|s| (s.1 - m).exp()).sum::<f64>().ln();
                f(n, h, i, &scores, lse);
            }
        }
    }
}

pub fn forward(p: &AttnProblem, q: &[f64], k: &[f64], v: &[f64]) -> AttnForward {
    let (hq, hk, dv) = (p.heads, p.kv_heads, p.v_dim);
    let (_, _, _, no, nl) = p.lens();
    let mut o = vec![0.0; no];
    let mut lse_out = vec![0.0; nl];
    rows(p, q, k, |n, h, i, scores, lse| {
        let (q0, _, k0, _) = p.seq(n);
        let g = h / p.group();
        let row = (q0 + i) * hq + h;
        lse_out[row] = lse;
        for &(j, x, _) in scores {
            let pij = (x - lse).exp();
            let vj = &v[((k0 + j) * hk + g) * dv..][..dv];
            for (oc, vc) in o[row * dv..][..dv].iter_mut().zip(vj) {
                *oc += pij * vc;
            }
        }
    });
    AttnForward { o, lse: lse_out }
}

/// Gradients for `d_o = ∂L/∂o`: `dp_ij = d_o_i · v_j`, `ds_ij = p_ij (dp_ij − Σ_l p_il dp_il)`,
/// through the cap's `1 − tanh²`, then `dq_i = Σ_j ds_ij scale k_j`, `dk_j = Σ_i ds_ij scale q_i`,
/// `dv_j = Σ_i p_ij d_o_i`.
pub fn backward(p: &AttnProblem, q: &[f64], k: &[f64], v: &[f64], d_o: &[f64]) -> AttnGrads {
    let (hq, hk, d, dv) = (p.heads, p.kv_heads, p.k_dim, p.v_dim);
    let (nq, nk, nv, _, _) = p.lens();
    let mut g = AttnGrads {
        dq: vec![0.0; nq],
        dk: vec![0.0; nk],
        dv: vec![0.0; nv],
    };
    let scale = p.scale as f64;
    rows(p, q, k, |n, h, i, scores, lse| {
        let (q0, _, k0, _) = p.seq(n);
        let kh = h / p.group();
        let row = (q0 + i) * hq + h;
        let doi = &d_o[row * dv..][..dv];
        let probs: Vec<f64> = scores.iter().map(|s| (s.1 - lse).exp()).collect();
        let dps: Vec<f64> = scores
            .iter()
            .map(|s| {
                let vj = &v[((k0 + s.0) * hk + kh) * dv..][..dv];
                doi.iter().zip(vj).map(|(a, b)| a * b).sum()
            })
            .collect();
        let delta: f64 = probs.iter().zip(&dps).map(|(a, b)| a * b).sum();
        for ((&(j, _, raw), pij), dp) in scores.iter().zip(&probs).zip(&dps) {
            let mut ds = pij * (dp - delta) * scale;
            if let Some(c) = p.softcap {
                let t = (raw / c as f64).tanh();
                ds *= 1.0 - t * t;
            }
            let krow = ((k0 + j) * hk + kh) * d;
            for c in 0..d {
                g.dq[row * d + c] += ds * k[krow + c];
                g.dk[krow + c] += ds * q[row * d + c];
            }
            let vrow = ((k0 + j) * hk + kh) * dv;
            for (dvc, doc) in g.dv[vrow..vrow + dv].iter_mut().zip(doi) {
                *dvc += pij * doc;
            }
        }
    });
    g
}
