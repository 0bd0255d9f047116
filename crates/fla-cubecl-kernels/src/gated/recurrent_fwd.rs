//! Fused recurrent forward of the gated family.
//!
//! One cube per (value block, sequence·head). Thread `(x, y)` owns column `x` of the value block
//! and the key rows `y, y + KS, y + 2·KS, ...` of the `f32` state, held in registers for the whole
//! sequence. Each step updates those rows and reduces `q_t S_t` over the key axis through shared
//! memory; the reduction buffer alternates between two halves so one barrier per step suffices.

use cubecl::prelude::*;

/// Compile-time shape of a recurrent launch; every distinct value compiles its own kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RecurrentLayout {
    pub heads: usize,
    pub k: usize,
    pub v: usize,
    /// Value columns per cube (`CUBE_DIM_X`).
    pub block_v: usize,
    /// Threads splitting the key axis (`CUBE_DIM_Y`).
    pub k_split: usize,
    /// State rows per thread, `ceil(k / k_split)`.
    pub rows: usize,
    pub scalar_gate: bool,
    pub vector_gate: bool,
    pub value_gate: bool,
    pub reverse: bool,
    pub has_h0: bool,
    pub has_ht: bool,
    pub varlen: bool,
}

/// First token and length of sequence `n` in the flattened token axis.
#[cube]
pub fn seq_start(
    cu_seqlens: &Array<u32>,
    n: usize,
    seq_len: u32,
    #[comptime] varlen: bool,
) -> usize {
    let mut bos = n * seq_len as usize;
    if varlen {
        bos = cu_seqlens[n] as usize;
    }
    bos
}

#[cube]
pub fn seq_length(
    cu_seqlens: &Array<u32>,
    n: usize,
    seq_len: u32,
    #[comptime] varlen: bool,
) -> usize {
    let mut len = seq_len as usize;
    if varlen {
        len = (cu_seqlens[n + 1] - cu_seqlens[n]) as usize;
    }
    len
}

/// Token processed at `step` of a sequence starting at `bos` with `len` tokens.
#[cube]
pub fn token_at(bos: usize, len: usize, step: usize, #[comptime] backwards: bool) -> usize {
    let mut tok = bos + step;
    if backwards {
        tok = bos + len - 1 - step;
    }
    tok
}

/// Key-side decay `exp(g)` of row `i` at a token; `a_scalar` is the token's scalar-gate factor.
#[cube]
pub fn key_decay<F: Float>(
    g: &Array<F>,
    qk_base: usize,
    i: usize,
    a_scalar: f32,
    #[comptime] vector_gate: bool,
) -> f32 {
    let mut a = a_scalar;
    if vector_gate {
        a = f32::cast_from(g[qk_base + i]).exp();
    }
    a
}

#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn recurrent_fwd_kernel<F: Float>(
    q: &Array<F>,
    k: &Array<F>,
    v: &Array<F>,
    g: &Array<F>,
    gv: &Array<F>,
    h0: &Array<f32>,
    cu_seqlens: &Array<u32>,
    o: &mut Array<F>,
    ht: &mut Array<f32>,
    seq_len: u32,
    scale: f32,
    #[comptime] c: RecurrentLayout,
    #[define(F)] _dtype: StorageType,
) {
    let tv = UNIT_POS_X as usize;
    let tk = UNIT_POS_Y as usize;
    let nh = CUBE_POS_Y as usize;
    let n = nh / c.heads;
    let h = nh % c.heads;
    let col = CUBE_POS_X as usize * c.block_v + tv;
    let col_ok = col < c.v;
    let bos = seq_start(cu_seqlens, n, seq_len, c.varlen);
    let len = seq_length(cu_seqlens, n, seq_len, c.varlen);
    let state_base = nh * c.k * c.v;

    let mut state = Array::<f32>::new(c.rows);
    #[unroll]
    for r in 0..c.rows {
        let i = tk + r * c.k_split;
        let mut s = 0.0f32;
        if c.has_h0 {
            if i < c.k && col_ok {
                s = h0[state_base + i * c.v + col];
            }
        }
        state[r] = s;
    }

    let half = c.k_split * c.block_v;
    let mut red = SharedMemory::<f32>::new(2 * c.k_split * c.block_v);
    for step in 0..len {
        let tok = token_at(bos, len, step, c.reverse);
        let qk_base = (tok * c.heads + h) * c.k;
        let v_idx = (tok * c.heads + h) * c.v + col;
        let mut vj = 0.0f32;
        let mut bj = 1.0f32;
        if col_ok {
            vj = f32::cast_from(v[v_idx]);
            if c.value_gate {
                bj = f32::cast_from(gv[v_idx]).exp();
            }
        }
        let mut a_scalar = 1.0f32;
        if c.scalar_gate {
            a_scalar = f32::cast_from(g[tok * c.heads + h]).exp();
        }
        let mut partial = 0.0f32;
        #[unroll]
        for r in 0..c.rows {
            let i = tk + r * c.k_split;
            if i < c.k {
                let a = key_decay::<F>(g, qk_base, i, a_scalar, c.vector_gate);
                let s = a * state[r] * bj + f32::cast_from(k[qk_base + i]) * vj;
                state[r] = s;
                partial += f32::cast_from(q[qk_base + i]) * s;
            }
        }
        let buf = (step % 2) * half;
        red[buf + tk * c.block_v + tv] = partial;
        sync_cube();
        if tk == 0 && col_ok {
            let mut acc = 0.0f32;
            #[unroll]
            for s in 0..c.k_split {
                acc += red[buf + s * c.block_v + tv];
            }
            o[v_idx] = F::cast_from(acc * scale);
        }
    }

    if c.has_ht {
        #[unroll]
        for r in 0..c.rows {
            let i = tk + r * c.k_split;
            if i < c.k && col_ok {
                ht[state_base + i * c.v + col] = state[r];
            }
        }
    }
}
