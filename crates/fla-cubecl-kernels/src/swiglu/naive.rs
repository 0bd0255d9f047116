//! SwiGLU's activation in `f64`, element by element: the reference of the kernels and the ops.

fn sigmoid(g: f64) -> f64 {
    1.0 / (1.0 + (-g).exp())
}

/// `y = g σ(g) u`.
pub fn forward(g: &[f64], u: &[f64]) -> Vec<f64> {
    g.iter().zip(u).map(|(&g, &u)| g * sigmoid(g) * u).collect()
}

/// `(dg, du)` for `dy`, by the product rule on `g σ(g)` and `u`.
pub fn backward(g: &[f64], u: &[f64], dy: &[f64]) -> (Vec<f64>, Vec<f64>) {
    let mut dg = Vec::with_capacity(g.len());
    let mut du = Vec::with_capacity(g.len());
    for ((&g, &u), &d) in g.iter().zip(u).zip(dy) {
        let s = sigmoid(g);
        // d(g σ(g))/dg = σ(g) + g σ(g) (1 − σ(g)).
        dg.push(d * u * (s + g * s * (1.0 - s)));
        du.push(d * g * s);
    }
    (dg, du)
}
