//! Cross-entropy in `f64`, row by row: the reference of the kernels and the ops.

/// `(loss, lse)` per row of `logits: [rows, vocab]`: `lse = log Σ_v exp(x_v)` and
/// `loss = lse − x_t`; a negative target is ignored (loss 0), one past the vocabulary gives NaN.
pub fn forward(logits: &[f64], targets: &[i64], vocab: usize) -> (Vec<f64>, Vec<f64>) {
    let mut loss = Vec::with_capacity(targets.len());
    let mut lse = Vec::with_capacity(targets.len());
    for (row, &t) in logits.chunks(vocab).zip(targets) {
        let m = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let l = m + row.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
        lse.push(l);
        loss.push(match t {
            t if t < 0 => 0.0,
            t if t as usize >= vocab => f64::NAN,
            t => l - row[t as usize],
        });
    }
    (loss, lse)
}

/// `∂logits` for `dloss` per row: `dloss · (softmax(x) − onehot(t))`, 0 on ignored rows.
pub fn backward(logits: &[f64], targets: &[i64], vocab: usize, dloss: &[f64]) -> Vec<f64> {
    let (_, lse) = forward(logits, targets, vocab);
    let mut d = Vec::with_capacity(logits.len());
    for (((row, &t), &l), &g) in logits.chunks(vocab).zip(targets).zip(&lse).zip(dloss) {
        for (v, &x) in row.iter().enumerate() {
            let hit = if v as i64 == t { 1.0 } else { 0.0 };
            d.push(if t < 0 {
                0.0
            } else {
                g * ((x - l).exp() - hit)
            });
        }
    }
    d
}
