//! Checks shared by every family's problem description: batch layout, head sizes, `cu_seqlens`.

use cubecl::server::Handle;

use crate::KernelError;

/// Largest head dimension the recurrent kernels hold on chip (state rows per thread are unrolled).
/// It bounds `K` everywhere, and `V` where a kernel keeps a whole value row on chip (attention);
/// the linear-attention families (gated and delta rule) split `V` across cubes, so they have a
/// wider bound, [`MAX_VALUE_DIM`] (each family passes its bound as [`validate`]'s `max_v`).
pub const MAX_HEAD_DIM: usize = 256;

/// Largest value head dim of the linear-attention families (gated and delta rule). FLA's own
/// configs need more than [`MAX_HEAD_DIM`] (GLA and Gated DeltaNet at 1.3B: `V = 512`). Every
/// column of their state `S[K, V]` evolves on its own given `k` (and `β`, the decays), so the
/// recurrent kernels split `V` into blocks of value columns across cubes, the plain chunk kernels
/// are elementwise over it and their state pass splits it the same way. The tile-product chunk
/// kernels hold `V`-wide tiles on chip: wide values step them down to shorter chunks or send the
/// call to the plain path (slower, not wrong). The recurrent backwards' partial `dq`/`dk` grow
/// with `V / 32`; buffers past 32-bit indices are refused ([`addressable`]). Tested at `V = 520`.
pub const MAX_VALUE_DIM: usize = 4096;

/// Number of independent sequences: `B`, or `len(cu_seqlens) - 1`.
pub fn num_seqs(batch: usize, cu_seqlens: Option<&[usize]>) -> usize {
    match cu_seqlens {
        Some(cu) => cu.len().saturating_sub(1),
        None => batch,
    }
}

/// `(start, end)` token indices of sequence `n` in the flattened `[B·T]` token axis.
pub fn bounds(seq_len: usize, cu_seqlens: Option<&[usize]>, n: usize) -> (usize, usize) {
    match cu_seqlens {
        Some(cu) => (cu[n], cu[n + 1]),
        None => (n * seq_len, (n + 1) * seq_len),
    }
}

/// Tokens in the longest sequence of a batch (`T`, or the widest `cu_seqlens` interval).
pub fn longest(batch: usize, seq_len: usize, cu_seqlens: Option<&[usize]>) -> usize {
    match cu_seqlens {
        Some(cu) => cu
            .windows(2)
            .map(|w| w[1].saturating_sub(w[0]))
            .max()
            .unwrap_or(0),
        None if batch == 0 => 0,
        None => seq_len,
    }
}

/// Elements of a buffer of these dimensions, saturating: a product past `usize` is refused by
/// [`addressable`] like any other past 32 bits.
pub fn elements(dims: &[usize]) -> usize {
    dims.iter().fold(1, |n, &d| n.saturating_mul(d))
}

/// Kernels index with 32-bit integers: a buffer of more elements would wrap silently, so it is
/// refused before anything is allocated.
pub fn addressable(len: usize, what: &str) -> Result<(), KernelError> {
    if len > u32::MAX as usize {
        return Err(KernelError::DeviceLimit(format!(
            "{what} would hold {len} elements, more than the kernels' 32-bit indices address; \
             split the batch"
        )));
    }
    Ok(())
}

/// Checks that buffer `name` holds `elems` elements of `bytes` bytes each. The launchers run
/// their kernels unchecked, indexing by the problem's extents: a shorter buffer would be read or
/// written past its end, so it is refused first.
pub(crate) fn fits(name: &str, h: &Handle, elems: usize, bytes: usize) -> Result<(), KernelError> {
    let need = (elems as u64).saturating_mul(bytes as u64);
    let have = h.size_in_used();
    if have < need {
        return Err(KernelError::Buffer(format!(
            "{name} holds {have} bytes; the problem indexes {elems} elements of {bytes} bytes \
             ({need} bytes)"
        )));
    }
    Ok(())
}

/// [`fits`] for an optional buffer (absent is not checked).
pub(crate) fn fits_opt(
    name: &str,
    h: Option<&Handle>,
    elems: usize,
    bytes: usize,
) -> Result<(), KernelError> {
    h.map_or(Ok(()), |h| fits(name, h, elems, bytes))
}

/// Validates `[B, T, H, K, V]` (`K` at most [`MAX_HEAD_DIM`], `V` at most `max_v`, inputs within
/// 32-bit indices), the scale
/// and `cu_seqlens` (which needs `B = 1`, starts at 0, never decreases and ends at `T`).
pub fn validate(
    [batch, seq_len, heads, k_dim, v_dim]: [usize; 5],
    max_v: usize,
    scale: f32,
    cu_seqlens: Option<&[usize]>,
) -> Result<(), KernelError> {
    let bad = |m: String| Err(KernelError::InvalidProblem(m));
    if batch == 0 || seq_len == 0 {
        return bad(format!("zero-length input (B = {batch}, T = {seq_len})"));
    }
    if heads == 0 || k_dim == 0 || v_dim == 0 {
        return bad(format!(
            "zero-sized heads or head dims (H = {heads}, K = {k_dim}, V = {v_dim})"
        ));
    }
    if k_dim > MAX_HEAD_DIM {
        return bad(format!(
            "key head dim K = {k_dim} exceeds the supported maximum {MAX_HEAD_DIM}"
        ));
    }
    if v_dim > max_v {
        return bad(format!(
            "value head dim V = {v_dim} exceeds this family's supported maximum {max_v}"
        ));
    }
    // q and k are [B·T, H, K], v (or the output) [B·T, H, V].
    addressable(
        elements(&[batch, seq_len, heads, k_dim.max(v_dim)]),
        "q, k or v",
    )?;
    if !scale.is_finite() {
        return bad(format!("scale {scale} is not finite"));
    }
    if let Some(cu) = cu_seqlens {
        if batch != 1 {
            return bad(format!("cu_seqlens needs batch size 1, got B = {batch}"));
        }
        if cu.len() < 2 {
            return bad("cu_seqlens needs at least two entries [0, T]".into());
        }
        if cu[0] != 0 {
            return bad(format!("cu_seqlens must start at 0, starts at {}", cu[0]));
        }
        if let Some(w) = cu.windows(2).find(|w| w[1] < w[0]) {
            return bad(format!(
                "cu_seqlens must be non-decreasing, has {} then {}",
                w[0], w[1]
            ));
        }
        let last = *cu.last().expect("two entries checked");
        if last != seq_len {
            return bad(format!(
                "cu_seqlens must end at T = {seq_len}, ends at {last}"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(r: Result<(), KernelError>) -> String {
        match r {
            Err(KernelError::InvalidProblem(m)) => m,
            other => panic!("expected InvalidProblem, got {other:?}"),
        }
    }

    #[test]
    fn head_dims_bounded_per_family() {
        let dims = |k, v| [2, 5, 3, k, v];
        assert!(validate(dims(256, 256), MAX_HEAD_DIM, 1.0, None).is_ok());
        let k = message(validate(dims(257, 64), usize::MAX, 1.0, None));
        assert!(k.contains("K = 257"), "{k}");
        let v = message(validate(dims(64, 257), MAX_HEAD_DIM, 1.0, None));
        assert!(v.contains("V = 257") && v.contains("256"), "{v}");
        // A family that splits V across cubes passes its own bound.
        assert!(validate(dims(256, 512), 4096, 1.0, None).is_ok());
    }

    #[test]
    fn buffers_past_32_bit_indices_refused() {
        assert!(addressable(u32::MAX as usize, "q").is_ok());
        // 2^22 tokens of 8 heads of 128: 2^32 elements.
        match validate([1, 1 << 22, 8, 128, 64], MAX_HEAD_DIM, 1.0, None) {
            Err(KernelError::DeviceLimit(m)) => assert!(m.contains("q, k or v"), "{m}"),
            other => panic!("expected DeviceLimit, got {other:?}"),
        }
        match addressable(u32::MAX as usize + 1, "the states") {
            Err(KernelError::DeviceLimit(m)) => assert!(m.contains("the states"), "{m}"),
            other => panic!("expected DeviceLimit, got {other:?}"),
        }
    }
}
