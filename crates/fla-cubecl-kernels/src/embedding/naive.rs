//! The embedding backward in `f64`, token by token: the reference of the kernels and the ops.

/// `dW [vocab, dim]`: row `v` is the sum of the rows of `dy [tokens, dim]` whose id is `v`; ids
/// outside `0 .. vocab` contribute nothing.
pub fn backward(dy: &[f64], ids: &[i64], vocab: usize, dim: usize) -> Vec<f64> {
    let mut dw = vec![0.0; vocab * dim];
    for (row, &id) in dy.chunks(dim).zip(ids) {
        if (0..vocab as i64).contains(&id) {
            let v = id as usize;
            for (w, &g) in dw[v * dim..(v + 1) * dim].iter_mut().zip(row) {
                *w += g;
            }
        }
    }
    dw
}
