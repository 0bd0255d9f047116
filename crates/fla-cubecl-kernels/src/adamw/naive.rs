//! One AdamW step in `f64`, written as Burn's `AdamW` and `GradientClipping` state it (clip, then
//! each moment, the corrections, the decay, the update): the reference of the kernels and ops.

use super::{AdamWStep, GradClip};

/// `(param, m, v)` after the step; `state` is `(m, v)` from the previous step, `None` on the
/// first. `tiny` is what clipping by norm adds to the norm (the dtype's smallest normal).
pub fn step(
    param: &[f64],
    grad: &[f64],
    state: Option<(&[f64], &[f64])>,
    s: &AdamWStep,
    tiny: f64,
) -> [Vec<f64>; 3] {
    let grad: Vec<f64> = match s.clip {
        None => grad.to_vec(),
        Some(GradClip::Value(c)) => {
            let c = c as f64;
            grad.iter().map(|&g| g.clamp(-c, c)).collect()
        }
        Some(GradClip::Norm(c)) => {
            let norm = grad.iter().map(|g| g * g).sum::<f64>().sqrt();
            let coef = (c as f64 / (norm + tiny)).min(1.0);
            grad.iter().map(|g| g * coef).collect()
        }
    };
    let (b1, b2) = (s.beta_1 as f64, s.beta_2 as f64);
    let zeros = vec![0.0; grad.len()];
    let (m0, v0) = state.unwrap_or((&zeros, &zeros));
    let m: Vec<f64> = m0
        .iter()
        .zip(&grad)
        .map(|(m, g)| b1 * m + (1.0 - b1) * g)
        .collect();
    let v: Vec<f64> = v0
        .iter()
        .zip(&grad)
        .map(|(v, g)| b2 * v + (1.0 - b2) * g * g)
        .collect();
    let t = s.time as i32;
    let (c1, c2) = (1.0 - b1.powi(t), 1.0 - b2.powi(t));
    let decay = s.lr * s.weight_decay as f64;
    let p = param
        .iter()
        .zip(m.iter().zip(&v))
        .map(|(&p, (&m, &v))| {
            let delta = (m / c1) / ((v / c2).sqrt() + s.epsilon as f64);
            let differ = (p >= 0.0) != (m >= 0.0);
            let kept = if s.cautious_weight_decay && differ {
                p
            } else {
                p - decay * p
            };
            kept - s.lr * delta
        })
        .collect();
    [p, m, v]
}
