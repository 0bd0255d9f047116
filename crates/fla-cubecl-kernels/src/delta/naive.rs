//! The naive delta-rule recurrence in `f64`: the reference the kernels and ops are tested against.
//!
//! It keeps every state of a sequence and applies the gradient formulas of shared/MATH.md
//! directly; its own test checks them against finite differences of the forward.

use super::DeltaProblem;

/// Inputs in the kernels' flat layouts (see the module docs), as `f64`.
#[derive(Debug, Clone)]
pub struct DeltaInputs<'a> {
    pub q: &'a [f64],
    pub k: &'a [f64],
    pub v: &'a [f64],
    /// `[B·T, HV]`.
    pub beta: &'a [f64],
    /// `[B·T, HV]`, log decays; gated problems only.
    pub g: Option<&'a [f64]>,
    /// `[N, HV, K, V]`.
    pub h0: Option<&'a [f64]>,
}

#[derive(Debug, Clone)]
pub struct DeltaForward {
    pub o: Vec<f64>,
    pub ht: Vec<f64>,
}

#[derive(Debug, Clone)]
pub struct DeltaGrads {
    pub dq: Vec<f64>,
    pub dk: Vec<f64>,
    pub dv: Vec<f64>,
    pub dbeta: Vec<f64>,
    pub dg: Option<Vec<f64>>,
    pub dh0: Option<Vec<f64>>,
}

/// Indices and scalars of one (token, value head).
struct At {
    qk: usize,
    vo: usize,
    alpha: f64,
    beta: f64,
}

fn at(p: &DeltaProblem, x: &DeltaInputs, tok: usize, hv: usize) -> At {
    let h = hv / p.group();
    let sc = tok * p.v_heads + hv;
    At {
        qk: (tok * p.heads + h) * p.k_dim,
        vo: sc * p.v_dim,
        alpha: x.g.map_or(1.0, |g| g[sc].exp()),
        beta: x.beta[sc],
    }
}

/// `k S` for a row `k` and a row-major `K × V` state.
fn row_times(k: &[f64], s: &[f64], vd: usize) -> Vec<f64> {
    let mut out = vec![0.0; vd];
    for (i, &ki) in k.iter().enumerate() {
        for j in 0..vd {
            out[j] += ki * s[i * vd + j];
        }
    }
    out
}

/// Runs one (sequence, value head) forward, writing `o` and returning `S_0 ..= S_L`.
fn states(p: &DeltaProblem, x: &DeltaInputs, n: usize, hv: usize, o: &mut [f64]) -> Vec<Vec<f64>> {
    let (kd, vd) = (p.k_dim, p.v_dim);
    let base = (n * p.v_heads + hv) * kd * vd;
    let mut s: Vec<f64> = match x.h0 {
        Some(h0) => h0[base..base + kd * vd].to_vec(),
        None => vec![0.0; kd * vd],
    };
    let mut all = vec![s.clone()];
    let (bos, eos) = p.bounds(n);
    for tok in bos..eos {
        let a = at(p, x, tok, hv);
        let k = &x.k[a.qk..a.qk + kd];
        let ks = row_times(k, &s, vd);
        let u: Vec<f64> = (0..vd)
            .map(|j| a.beta * (x.v[a.vo + j] - a.alpha * ks[j]))
            .collect();
        for i in 0..kd {
            for j in 0..vd {
                s[i * vd + j] = a.alpha * s[i * vd + j] + k[i] * u[j];
            }
        }
        let qs = row_times(&x.q[a.qk..a.qk + kd], &s, vd);
        for j in 0..vd {
            o[a.vo + j] = p.scale as f64 * qs[j];
        }
        all.push(s.clone());
    }
    all
}

pub fn forward(p: &DeltaProblem, x: &DeltaInputs) -> DeltaForward {
    let (_, vo, _) = p.lens();
    let mut o = vec![0.0; vo];
    let mut ht = vec![0.0; p.state_len()];
    let kv = p.k_dim * p.v_dim;
    for n in 0..p.num_seqs() {
        for hv in 0..p.v_heads {
            let all = states(p, x, n, hv, &mut o);
            let base = (n * p.v_heads + hv) * kv;
            ht[base..base + kv].copy_from_slice(all.last().unwrap());
        }
    }
    DeltaForward { o, ht }
}

/// Gradients for output gradients `d_o` and, when given, `d_ht`.
pub fn backward(
    p: &DeltaProblem,
    x: &DeltaInputs,
    d_o: &[f64],
    d_ht: Option<&[f64]>,
) -> DeltaGrads {
    let (kd, vd) = (p.k_dim, p.v_dim);
    let (qk, vo, sc) = p.lens();
    let scale = p.scale as f64;
    let mut dq = vec![0.0; qk];
    let mut dk = vec![0.0; qk];
    let mut dv = vec![0.0; vo];
    let mut dbeta = vec![0.0; sc];
    let mut dg = vec![0.0; sc];
    let mut dh0 = vec![0.0; p.state_len()];
    let mut scratch = vec![0.0; vo];
    for n in 0..p.num_seqs() {
        let (bos, eos) = p.bounds(n);
        for hv in 0..p.v_heads {
            let all = states(p, x, n, hv, &mut scratch);
            let base = (n * p.v_heads + hv) * kd * vd;
            let mut gm: Vec<f64> = match d_ht {
                Some(d) => d[base..base + kd * vd].to_vec(),
                None => vec![0.0; kd * vd],
            };
            for (step, tok) in (bos..eos).enumerate().rev() {
                let a = at(p, x, tok, hv);
                let (q, k) = (&x.q[a.qk..a.qk + kd], &x.k[a.qk..a.qk + kd]);
                let (prev, cur) = (&all[step], &all[step + 1]);
                let dot = &d_o[a.vo..a.vo + vd];
                // G_t = (what reaches S_t from later steps) + scale · q_tᵀ do_t.
                for i in 0..kd {
                    for j in 0..vd {
                        gm[i * vd + j] += scale * q[i] * dot[j];
                    }
                }
                for i in 0..kd {
                    let mut acc = 0.0;
                    for j in 0..vd {
                        acc += cur[i * vd + j] * dot[j];
                    }
                    dq[a.qk + i] += scale * acc;
                }
                let kg = row_times(k, &gm, vd);
                let ks = row_times(k, prev, vd);
                let w: Vec<f64> = (0..vd).map(|j| x.v[a.vo + j] - a.alpha * ks[j]).collect();
                let sc_i = tok * p.v_heads + hv;
                let mut gs = 0.0;
                for j in 0..vd {
                    dv[a.vo + j] = a.beta * kg[j];
                    dbeta[sc_i] += kg[j] * w[j];
                    gs -= a.beta * kg[j] * ks[j];
                }
                for i in 0..kd {
                    let mut acc = 0.0;
                    for j in 0..vd {
                        let (g_ij, s_ij) = (gm[i * vd + j], prev[i * vd + j]);
                        acc += a.beta * w[j] * g_ij - a.alpha * a.beta * kg[j] * s_ij;
                        gs += g_ij * s_ij;
                    }
                    dk[a.qk + i] += acc;
                }
                dg[sc_i] = a.alpha * gs;
                // G_{t-1} = P_tᵀ G_t, P_t = α_t (I − β_t k_tᵀ k_t).
                for i in 0..kd {
                    for j in 0..vd {
                        gm[i * vd + j] = a.alpha * (gm[i * vd + j] - a.beta * k[i] * kg[j]);
                    }
                }
            }
            dh0[base..base + kd * vd].copy_from_slice(&gm);
        }
    }
    DeltaGrads {
        dq,
        dk,
        dv,
        dbeta,
        dg: p.gated.then_some(dg),
        dh0: p.has_initial_state.then_some(dh0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::DeltaCase;
    use crate::FloatDType;

    /// `Σ o ∘ d_o + Σ hT ∘ d_ht`, whose gradient is what [`backward`] returns.
    fn loss(c: &DeltaCase, x: &DeltaInputs) -> f64 {
        let f = forward(&c.p, x);
        let mut l: f64 = f.o.iter().zip(&c.d_o).map(|(a, b)| a * b).sum();
        if let Some(d) = &c.d_ht {
            l += f.ht.iter().zip(d).map(|(a, b)| a * b).sum::<f64>();
        }
        l
    }

    /// Central differences of the loss in every input element, against the formulas.
    #[test]
    fn gradients_match_finite_differences() {
        let p = DeltaProblem {
            batch: 1,
            seq_len: 6,
            heads: 1,
            v_heads: 2,
            k_dim: 3,
            v_dim: 4,
            gated: true,
            scale: 0.7,
            cu_seqlens: Some(vec![0, 4, 4, 6]),
            has_initial_state: true,
            output_final_state: true,
            dtype: FloatDType::F32,
        };
        let c = DeltaCase::new(p, 1.0, 7);
        let g = backward(&c.p, &c.inputs(), &c.d_o, c.d_ht.as_deref());
        let eps = 1e-6;
        let fields: [(&str, Vec<f64>, &[f64]); 6] = [
            ("q", c.q.clone(), &g.dq),
            ("k", c.k.clone(), &g.dk),
            ("v", c.v.clone(), &g.dv),
            ("beta", c.beta.clone(), &g.dbeta),
            ("g", c.g.clone().unwrap(), g.dg.as_deref().unwrap()),
            ("h0", c.h0.clone().unwrap(), g.dh0.as_deref().unwrap()),
        ];
        for (name, base, grad) in fields {
            for e in 0..base.len() {
                let shifted = |d: f64| {
                    let mut c2 = c.clone();
                    let mut x = base.clone();
                    x[e] += d;
                    match name {
                        "q" => c2.q = x,
                        "k" => c2.k = x,
                        "v" => c2.v = x,
                        "beta" => c2.beta = x,
                        "g" => c2.g = Some(x),
                        _ => c2.h0 = Some(x),
                    }
                    loss(&c2, &c2.inputs())
                };
                let fd = (shifted(eps) - shifted(-eps)) / (2.0 * eps);
                assert!(
                    (fd - grad[e]).abs() <= 1e-6 * (1.0 + fd.abs()),
                    "d{name}[{e}]: formula {} vs finite difference {fd}",
                    grad[e]
                );
            }
        }
    }
}
