//! The naive recurrence in `f64`: the reference every kernel and op is tested against.
//!
//! The backward uses the direct gradient formulas (stored states, `dg = Σ G ∘ (a S_{t-1} b)`), not
//! the cumulative-sum identity the kernels use, so a test against it checks that identity too.

use super::{GateKind, GatedProblem};

/// Inputs in the kernels' flat layouts (see the crate docs), as `f64`.
#[derive(Debug, Clone)]
pub struct NaiveInputs<'a> {
    pub q: &'a [f64],
    pub k: &'a [f64],
    pub v: &'a [f64],
    /// `[B*T, H]` for a scalar gate, `[B*T, H, K]` for a vector gate.
    pub g: Option<&'a [f64]>,
    /// `[B*T, H, V]`.
    pub gv: Option<&'a [f64]>,
    /// `[N, H, K, V]`.
    pub h0: Option<&'a [f64]>,
}

#[derive(Debug, Clone)]
pub struct NaiveForward {
    pub o: Vec<f64>,
    pub ht: Vec<f64>,
}

#[derive(Debug, Clone)]
pub struct NaiveGrads {
    pub dq: Vec<f64>,
    pub dk: Vec<f64>,
    pub dv: Vec<f64>,
    pub dg: Option<Vec<f64>>,
    pub dgv: Option<Vec<f64>>,
    pub dh0: Option<Vec<f64>>,
}

struct Step {
    a: Vec<f64>,
    b: Vec<f64>,
}

/// Decay factors of one token: `a = exp(gk)` over K, `b = exp(gv)` over V.
fn decay(p: &GatedProblem, x: &NaiveInputs, tok: usize, h: usize) -> Step {
    let (kd, vd, hh) = (p.k_dim, p.v_dim, p.heads);
    let a = match p.gate {
        GateKind::None => vec![1.0; kd],
        GateKind::Scalar => vec![x.g.unwrap()[tok * hh + h].exp(); kd],
        GateKind::Vector => (0..kd)
            .map(|i| x.g.unwrap()[(tok * hh + h) * kd + i].exp())
            .collect(),
    };
    let b = match (p.value_gate, x.gv) {
        (true, Some(gv)) => (0..vd).map(|j| gv[(tok * hh + h) * vd + j].exp()).collect(),
        _ => vec![1.0; vd],
    };
    Step { a, b }
}

/// Token indices of sequence `n` in processing order.
fn order(p: &GatedProblem, n: usize) -> Vec<usize> {
    let (bos, eos) = p.bounds(n);
    if p.reverse {
        (bos..eos).rev().collect()
    } else {
        (bos..eos).collect()
    }
}

/// Runs one (sequence, head) forward, returning every state `S_0 ..= S_L` in processing order.
fn states(p: &GatedProblem, x: &NaiveInputs, n: usize, h: usize, o: &mut [f64]) -> Vec<Vec<f64>> {
    let (kd, vd, hh) = (p.k_dim, p.v_dim, p.heads);
    let base = (n * hh + h) * kd * vd;
    let mut s: Vec<f64> = match x.h0 {
        Some(h0) => h0[base..base + kd * vd].to_vec(),
        None => vec![0.0; kd * vd],
    };
    let mut all = vec![s.clone()];
    for tok in order(p, n) {
        let st = decay(p, x, tok, h);
        let qk = (tok * hh + h) * kd;
        let vo = (tok * hh + h) * vd;
        for i in 0..kd {
            for j in 0..vd {
                s[i * vd + j] = st.a[i] * s[i * vd + j] * st.b[j] + x.k[qk + i] * x.v[vo + j];
            }
        }
        for j in 0..vd {
            o[vo + j] = p.scale as f64 * (0..kd).map(|i| x.q[qk + i] * s[i * vd + j]).sum::<f64>();
        }
        all.push(s.clone());
    }
    all
}

pub fn forward(p: &GatedProblem, x: &NaiveInputs) -> NaiveForward {
    let mut o = vec![0.0; p.tokens() * p.heads * p.v_dim];
    let mut ht = vec![0.0; p.state_len()];
    let kv = p.k_dim * p.v_dim;
    for n in 0..p.num_seqs() {
        for h in 0..p.heads {
            let all = states(p, x, n, h, &mut o);
            let base = (n * p.heads + h) * kv;
            ht[base..base + kv].copy_from_slice(all.last().unwrap());
        }
    }
    NaiveForward { o, ht }
}

/// Gradients for a loss with `∂L/∂o = d_o` and `∂L/∂hT = d_ht`.
pub fn backward(
    p: &GatedProblem,
    x: &NaiveInputs,
    d_o: &[f64],
    d_ht: Option<&[f64]>,
) -> NaiveGrads {
    let (kd, vd, hh) = (p.k_dim, p.v_dim, p.heads);
    let tokens = p.tokens();
    let scale = p.scale as f64;
    let mut dq = vec![0.0; tokens * hh * kd];
    let mut dk = vec![0.0; tokens * hh * kd];
    let mut dv = vec![0.0; tokens * hh * vd];
    let mut dg = vec![0.0; p.gate_len()];
    let mut dgv = vec![0.0; tokens * hh * vd];
    let mut dh0 = vec![0.0; p.state_len()];
    let mut scratch_o = vec![0.0; tokens * hh * vd];
    for n in 0..p.num_seqs() {
        for h in 0..hh {
            let all = states(p, x, n, h, &mut scratch_o);
            let base = (n * hh + h) * kd * vd;
            let mut g: Vec<f64> = match d_ht {
                Some(d) => d[base..base + kd * vd].to_vec(),
                None => vec![0.0; kd * vd],
            };
            let ord = order(p, n);
            for (idx, &tok) in ord.iter().enumerate().rev() {
                let qk = (tok * hh + h) * kd;
                let vo = (tok * hh + h) * vd;
                let (s_prev, s_cur) = (&all[idx], &all[idx + 1]);
                for i in 0..kd {
                    for j in 0..vd {
                        g[i * vd + j] += scale * x.q[qk + i] * d_o[vo + j];
                    }
                }
                for i in 0..kd {
                    dq[qk + i] = scale
                        * (0..vd)
                            .map(|j| d_o[vo + j] * s_cur[i * vd + j])
                            .sum::<f64>();
                    dk[qk + i] = (0..vd).map(|j| x.v[vo + j] * g[i * vd + j]).sum::<f64>();
                }
                for j in 0..vd {
                    dv[vo + j] = (0..kd).map(|i| x.k[qk + i] * g[i * vd + j]).sum::<f64>();
                }
                let st = decay(p, x, tok, h);
                for i in 0..kd {
                    for j in 0..vd {
                        let e = g[i * vd + j] * st.a[i] * s_prev[i * vd + j] * st.b[j];
                        match p.gate {
                            GateKind::None => {}
                            GateKind::Scalar => dg[tok * hh + h] += e,
                            GateKind::Vector => dg[qk + i] += e,
                        }
                        dgv[vo + j] += e;
                        g[i * vd + j] *= st.a[i] * st.b[j];
                    }
                }
            }
            dh0[base..base + kd * vd].copy_from_slice(&g);
        }
    }
    NaiveGrads {
        dq,
        dk,
        dv,
        dg: (p.gate != GateKind::None).then_some(dg),
        dgv: p.value_gate.then_some(dgv),
        dh0: x.h0.map(|_| dh0),
    }
}
