//! The norm in `f64`, row by row, straight from its definition (see the module's docs): the
//! reference the kernels and the Burn ops are tested against.

use super::NormProblem;

/// `y` and the reciprocal RMS of each row.
#[derive(Debug, Clone)]
pub struct NormForward {
    pub y: Vec<f64>,
    pub rstd: Vec<f64>,
}

/// Gradients; `dg` is empty without a gate.
#[derive(Debug, Clone)]
pub struct NormGrads {
    pub dx: Vec<f64>,
    pub dw: Vec<f64>,
    pub dg: Vec<f64>,
}

fn sigmoid(g: f64) -> f64 {
    1.0 / (1.0 + (-g).exp())
}

fn rstd(p: &NormProblem, row: &[f64]) -> f64 {
    let mean = row.iter().map(|v| v * v).sum::<f64>() / p.dim as f64;
    1.0 / (mean + p.eps as f64).sqrt()
}

/// `g` is read only when the problem is gated.
pub fn forward(p: &NormProblem, x: &[f64], w: &[f64], g: &[f64]) -> NormForward {
    let d = p.dim;
    let mut y = vec![0.0; p.len()];
    let mut rs = vec![0.0; p.rows];
    for r in 0..p.rows {
        let row = &x[r * d..(r + 1) * d];
        let rr = rstd(p, row);
        rs[r] = rr;
        for c in 0..d {
            let mut v = row[c] * rr * w[c];
            if p.gated {
                let gv = g[r * d + c];
                v *= gv * sigmoid(gv);
            }
            y[r * d + c] = v;
        }
    }
    NormForward { y, rstd: rs }
}

/// Gradients for `dy = ∂L/∂y`: each written as the chain rule of the forward's steps.
pub fn backward(p: &NormProblem, x: &[f64], w: &[f64], g: &[f64], dy: &[f64]) -> NormGrads {
    let d = p.dim;
    let mut dx = vec![0.0; p.len()];
    let mut dw = vec![0.0; d];
    let mut dg = vec![0.0; if p.gated { p.len() } else { 0 }];
    for r in 0..p.rows {
        let row = &x[r * d..(r + 1) * d];
        let rr = rstd(p, row);
        // ∂L/∂n per entry, then through n = x̂ ∘ w.
        let mut dxh = vec![0.0; d];
        for c in 0..d {
            let i = r * d + c;
            let xh = row[c] * rr;
            let mut dn = dy[i];
            if p.gated {
                let gv = g[i];
                let s = sigmoid(gv);
                dg[i] = dy[i] * xh * w[c] * s * (1.0 + gv * (1.0 - s));
                dn *= gv * s;
            }
            dw[c] += dn * xh;
            dxh[c] = dn * w[c];
        }
        // x̂ = r x with r = (mean(x²) + ε)^(-1/2): ∂r/∂x_j = −r³ x_j / D.
        let dr: f64 = (0..d).map(|c| dxh[c] * row[c]).sum();
        for c in 0..d {
            dx[r * d + c] = dxh[c] * rr - dr * rr.powi(3) * row[c] / d as f64;
        }
    }
    NormGrads { dx, dw, dg }
}
