//! Chunkwise-parallel form of the gated family (MATH.md, "Chunkwise-parallel form"), plain path.
//!
//! Each sequence is cut into chunks of `C` positions in processing order (so `reverse` is only a
//! different token map). Inside a chunk, with `Λ_r` the log gates cumulated from the chunk start,
//! `Λ_C` the chunk's total and `S` the state entering the chunk:
//! - `O = scale · (q̃ S + A V)`, `q̃_r = q_r ∘ exp(Λ_r)`,
//!   `A_rs = Σ_i q_r[i] k_s[i] exp(Λ_r[i] − Λ_s[i])` for `s ≤ r` (0 above the diagonal);
//! - `S_next = diag(exp Λ_C) S + k̃ᵀ V`, `k̃_s = k_s ∘ exp(Λ_C − Λ_s)`.
//!
//! The backward has the same shape: `dS` runs backwards chunk to chunk with
//! `dS_in = diag(exp Λ_C) dS_out + scale · q̃ᵀ dO` (the state pass with other operands), then per
//! chunk `dA = scale · dO Vᵀ` and
//! - `dv_s = scale · Σ_{r≥s} A_rs dO_r + k̃_s dS_out`,
//! - `dq_r = scale · (dO_r S_inᵀ) ∘ exp(Λ_r) + Σ_{s≤r} dA_rs k_s ∘ exp(Λ_r − Λ_s)`,
//! - `dk_s = (v_s dS_outᵀ) ∘ exp(Λ_C − Λ_s) + Σ_{r≥s} dA_rs q_r ∘ exp(Λ_r − Λ_s)`;
//!
//! the gate gradients then come from the same identity as the recurrent form.
//!
//! Every `exp` here is of a difference `Λ_r − Λ_s` with `s ≤ r` (or of `Λ_r`, `Λ_C − Λ_s`), so it
//! is at most 1 and never overflows, whatever the gate strength: the plain path computes it per
//! element in `f32` instead of factoring it (which would need the sub-chunking of MATH.md).
//! Intermediates (`Λ`, per-chunk states, `A`, `dA`) are `f32`.

// An outer `if` on a compile-time flag is resolved when the kernel is specialised; merging it
// with the run-time condition inside would turn it into a run-time branch.
#![allow(clippy::collapsible_if)]

use cubecl::prelude::*;

use super::recurrent_bwd::linear_unit;
use super::recurrent_fwd::{
    read_state, seq_length, seq_start, token_at, write_state, RecurrentLayout,
};

/// Compile-time shape of a chunk launch: the recurrent kernels' layout (heads, dims, gates,
/// direction, varlen, and the state pass's tiling: value columns per cube, threads splitting the
/// key axis, key rows per thread) and the chunk size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ChunkLayout {
    pub rec: RecurrentLayout,
    /// Positions per chunk, `C`.
    pub chunk: usize,
}

impl ChunkLayout {
    pub fn gated(&self) -> bool {
        self.rec.scalar_gate || self.rec.vector_gate
    }
}

/// Where chunk `j` of the flattened chunk list lies: `(first token of its sequence, sequence
/// length, position of the chunk's first step in the sequence, positions in the chunk)`. `chunks`
/// holds `(sequence, chunk index in the sequence)`.
#[cube]
pub fn chunk_place(
    chunks: &Array<u32>,
    cu_seqlens: &Array<u32>,
    j: usize,
    seq_len: u32,
    #[comptime] c: ChunkLayout,
) -> (usize, usize, usize, usize) {
    place_of_chunk(chunks, cu_seqlens, j, seq_len, c.chunk, c.rec.varlen)
}

/// [`chunk_place`] for kernels whose layout is not a [`ChunkLayout`] (the tiled ones).
#[cube]
pub fn place_of_chunk(
    chunks: &Array<u32>,
    cu_seqlens: &Array<u32>,
    j: usize,
    seq_len: u32,
    #[comptime] chunk: usize,
    #[comptime] varlen: bool,
) -> (usize, usize, usize, usize) {
    let n = chunks[2 * j] as usize;
    let p0 = chunks[2 * j + 1] as usize * chunk;
    let bos = seq_start(cu_seqlens, n, seq_len, varlen);
    let len = seq_length(cu_seqlens, n, seq_len, varlen);
    (bos, len, p0, chunk_len(len, p0, chunk))
}

/// Positions of chunk starting at `p0` in a sequence of `len`.
#[cube]
pub fn chunk_len(len: usize, p0: usize, #[comptime] chunk: usize) -> usize {
    let rest = len - p0;
    let mut cl = rest;
    if rest > chunk {
        cl = chunk;
    }
    cl
}

/// Cumulated log gate `Λ` of key dim `i` at token `tok` (0 without a gate).
#[cube]
pub fn lambda(gc: &Array<f32>, tok: usize, h: usize, i: usize, #[comptime] c: ChunkLayout) -> f32 {
    let mut x = 0.0f32;
    if c.rec.vector_gate {
        x = gc[(tok * c.rec.heads + h) * c.rec.k + i];
    }
    if c.rec.scalar_gate {
        x = gc[tok * c.rec.heads + h];
    }
    x
}

/// `Λ`: log gates cumulated from each chunk's start, in processing order. One unit per
/// (chunk, head, gate column).
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn chunk_cumsum_kernel<F: Float>(
    g: &Array<F>,
    chunks: &Array<u32>,
    cu_seqlens: &Array<u32>,
    gc: &mut Array<f32>,
    seq_len: u32,
    units: u32,
    #[comptime] c: ChunkLayout,
    #[define(F)] _dtype: StorageType,
) {
    let u = linear_unit();
    if u < units as usize {
        let width = comptime!(if c.rec.vector_gate { c.rec.k } else { 1usize });
        let col = u % width;
        let jh = u / width;
        let h = jh % c.rec.heads;
        let j = jh / c.rec.heads;
        let (bos, len, p0, cl) = chunk_place(chunks, cu_seqlens, j, seq_len, c);
        let mut acc = 0.0f32;
        for s in 0..cl {
            let tok = token_at(bos, len, p0 + s, c.rec.reverse);
            let idx = (tok * c.rec.heads + h) * width + col;
            acc += f32::cast_from(g[idx]);
            gc[idx] = acc;
        }
    }
}

/// Positions of a chunk staged in shared memory at once by [`chunk_state_kernel`].
pub const STATE_SUB: usize = 16;

/// Shared-memory floats of one [`chunk_state_kernel`] cube.
pub fn state_stage_len(c: &ChunkLayout) -> usize {
    STATE_SUB * c.rec.k + STATE_SUB * c.rec.block_v + c.rec.k
}

/// The state pass, walking each sequence's chunks in order (`backward = false`) or in reverse.
///
/// Forward: stores the state entering each chunk into `states: [chunks, H, K, V]`, then
/// `S ← diag(exp Λ_C) S + k̃ᵀ V`; starts from `init` (h0) and leaves `S` in `last` (hT).
/// Backward: stores the gradient leaving each chunk, then `dS ← diag(exp Λ_C) dS + scale · q̃ᵀ dO`
/// (`key = q`, `val = dO`); starts from `init` (dhT) and leaves `dS` in `last` (dh0).
/// Thread `(x, y)` of a cube owns value column `x` and key rows `y, y + KS, ...` in registers.
/// The cube stages [`STATE_SUB`] positions at a time in shared memory (the key-side vectors with
/// their gate factors, the value block) with coalesced loads, so the arithmetic reads on-chip
/// memory instead of waiting on one global load per position.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn chunk_state_kernel<F: Float>(
    key: &Array<F>,
    val: &Array<F>,
    gc: &Array<f32>,
    init: &Array<f32>,
    cu_seqlens: &Array<u32>,
    first_chunk: &Array<u32>,
    states: &mut Array<f32>,
    last: &mut Array<f32>,
    seq_len: u32,
    scale: f32,
    #[comptime] c: ChunkLayout,
    #[comptime] backward: bool,
    #[comptime] has_init: bool,
    #[comptime] has_last: bool,
    #[define(F)] _dtype: StorageType,
) {
    let tv = UNIT_POS_X as usize;
    let tk = UNIT_POS_Y as usize;
    let nh = CUBE_POS_Y as usize;
    let n = nh / c.rec.heads;
    let h = nh % c.rec.heads;
    let col0 = CUBE_POS_X as usize * c.rec.block_v;
    let col = col0 + tv;
    let col_ok = col < c.rec.v;
    let bos = seq_start(cu_seqlens, n, seq_len, c.rec.varlen);
    let len = seq_length(cu_seqlens, n, seq_len, c.rec.varlen);
    let nc = len.div_ceil(c.chunk);
    let first = first_chunk[n] as usize;
    let state_base = nh * c.rec.k * c.rec.v;
    let units = comptime!(c.rec.block_v * c.rec.k_split);
    let unit = tk * c.rec.block_v + tv;
    // Shared memory: keys [SUB, K], values [SUB, block_v], decays [K].
    let key_len = comptime!(STATE_SUB * c.rec.k);
    let val_off = key_len;
    let dec_off = comptime!(STATE_SUB * c.rec.k + STATE_SUB * c.rec.block_v);
    let mut stage = SharedMemory::<f32>::new(comptime!(state_stage_len(&c)));

    let mut state = Array::<f32>::new(c.rec.rows);
    read_state(init, &mut state, state_base, tk, col, has_init, c.rec);

    for step in 0..nc {
        let mut ci = step;
        if backward {
            ci = nc - 1 - step;
        }
        let p0 = ci * c.chunk;
        let cl = chunk_len(len, p0, c.chunk);
        let out_base = ((first + ci) * c.rec.heads + h) * c.rec.k * c.rec.v;
        let last_tok = token_at(bos, len, p0 + cl - 1, c.rec.reverse);
        if comptime!(c.gated()) {
            sync_cube();
            #[unroll]
            for m in 0..comptime!(c.rec.k.div_ceil(units)) {
                let e = unit + m * units;
                if e < c.rec.k {
                    stage[dec_off + e] = lambda(gc, last_tok, h, e, c).exp();
                }
            }
            sync_cube();
        }
        #[unroll]
        for r in 0..c.rec.rows {
            let i = tk + r * c.rec.k_split;
            if i < c.rec.k {
                if col_ok {
                    states[out_base + i * c.rec.v + col] = state[r];
                }
                if comptime!(c.gated()) {
                    state[r] *= stage[dec_off + i];
                }
            }
        }
        let subs = cl.div_ceil(STATE_SUB);
        for sub in 0..subs {
            let s0 = sub * STATE_SUB;
            let rest = cl - s0;
            let mut sl = rest;
            if rest > STATE_SUB {
                sl = STATE_SUB;
            }
            sync_cube();
            #[unroll]
            for m in 0..comptime!(key_len.div_ceil(units)) {
                let e = unit + m * units;
                let s = e / c.rec.k;
                let i = e % c.rec.k;
                if e < key_len && s < sl {
                    let tok = token_at(bos, len, p0 + s0 + s, c.rec.reverse);
                    let mut x = f32::cast_from(key[(tok * c.rec.heads + h) * c.rec.k + i]);
                    if backward {
                        x *= scale;
                        if comptime!(c.gated()) {
                            x *= lambda(gc, tok, h, i, c).exp();
                        }
                    } else {
                        if comptime!(c.gated()) {
                            x *= (lambda(gc, last_tok, h, i, c) - lambda(gc, tok, h, i, c)).exp();
                        }
                    }
                    stage[e] = x;
                }
            }
            #[unroll]
            for m in 0..comptime!((STATE_SUB * c.rec.block_v).div_ceil(units)) {
                let e = unit + m * units;
                let s = e / c.rec.block_v;
                let x = e % c.rec.block_v;
                if e < comptime!(STATE_SUB * c.rec.block_v) && s < sl {
                    let tok = token_at(bos, len, p0 + s0 + s, c.rec.reverse);
                    let mut y = 0.0f32;
                    if col0 + x < c.rec.v {
                        y = f32::cast_from(val[(tok * c.rec.heads + h) * c.rec.v + col0 + x]);
                    }
                    stage[val_off + e] = y;
                }
            }
            sync_cube();
            for s in 0..sl {
                let vj = stage[val_off + s * c.rec.block_v + tv];
                #[unroll]
                for r in 0..c.rec.rows {
                    let i = tk + r * c.rec.k_split;
                    if i < c.rec.k {
                        state[r] += stage[s * c.rec.k + i] * vj;
                    }
                }
            }
        }
    }
    if has_last {
        write_state(last, &state, state_base, tk, col, c.rec);
    }
}

/// Pairwise products inside each chunk, lower triangle (`s ≤ r`) only, the rest zero:
/// `gated`: `out_rs = Σ_i a_r[i] b_s[i] exp(Λ_r[i] − Λ_s[i])` (the forward's `A`, with `a = q`,
/// `b = k`, width K); otherwise `out_rs = scale · a_r · b_s` (the backward's `dA`, `a = dO`,
/// `b = v`, width V). `out: [B·T, H, C]` by the token of row `r`. One unit per entry; cubes
/// `(entry block, chunk, head)`.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn chunk_pairs_kernel<F: Float>(
    a: &Array<F>,
    b: &Array<F>,
    gc: &Array<f32>,
    chunks: &Array<u32>,
    cu_seqlens: &Array<u32>,
    out: &mut Array<f32>,
    seq_len: u32,
    scale: f32,
    #[comptime] c: ChunkLayout,
    #[comptime] gated: bool,
    #[define(F)] _dtype: StorageType,
) {
    let e = CUBE_POS_X as usize * CUBE_DIM_X as usize + UNIT_POS_X as usize;
    let j = CUBE_POS_Y as usize;
    let h = CUBE_POS_Z as usize;
    let r = e / c.chunk;
    let s = e % c.chunk;
    let (bos, len, p0, cl) = chunk_place(chunks, cu_seqlens, j, seq_len, c);
    if r < cl {
        let tr = token_at(bos, len, p0 + r, c.rec.reverse);
        let mut acc = 0.0f32;
        if s <= r {
            let ts = token_at(bos, len, p0 + s, c.rec.reverse);
            let width = comptime!(if gated { c.rec.k } else { c.rec.v });
            let (ar, bs) = (
                (tr * c.rec.heads + h) * width,
                (ts * c.rec.heads + h) * width,
            );
            if gated && comptime!(c.rec.vector_gate) {
                for i in 0..width {
                    let d = lambda(gc, tr, h, i, c) - lambda(gc, ts, h, i, c);
                    acc += f32::cast_from(a[ar + i]) * f32::cast_from(b[bs + i]) * d.exp();
                }
            } else {
                for i in 0..width {
                    acc += f32::cast_from(a[ar + i]) * f32::cast_from(b[bs + i]);
                }
                if gated && comptime!(c.rec.scalar_gate) {
                    acc *= (lambda(gc, tr, h, 0, c) - lambda(gc, ts, h, 0, c)).exp();
                }
                if !gated {
                    acc *= scale;
                }
            }
        }
        out[(tr * c.rec.heads + h) * c.chunk + s] = acc;
    }
}

/// `O = scale · (q̃ S_in + A V)`: one unit per (position, value column); cubes
/// `(entry block, chunk, head)`.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn chunk_output_kernel<F: Float>(
    q: &Array<F>,
    v: &Array<F>,
    gc: &Array<f32>,
    states: &Array<f32>,
    pairs: &Array<f32>,
    chunks: &Array<u32>,
    cu_seqlens: &Array<u32>,
    o: &mut Array<F>,
    seq_len: u32,
    scale: f32,
    #[comptime] c: ChunkLayout,
    #[define(F)] _dtype: StorageType,
) {
    let e = CUBE_POS_X as usize * CUBE_DIM_X as usize + UNIT_POS_X as usize;
    let j = CUBE_POS_Y as usize;
    let h = CUBE_POS_Z as usize;
    let r = e / c.rec.v;
    let x = e % c.rec.v;
    let (bos, len, p0, cl) = chunk_place(chunks, cu_seqlens, j, seq_len, c);
    if r < cl {
        let tr = token_at(bos, len, p0 + r, c.rec.reverse);
        let sb = (j * c.rec.heads + h) * c.rec.k * c.rec.v;
        let qb = (tr * c.rec.heads + h) * c.rec.k;
        let mut acc = 0.0f32;
        for i in 0..c.rec.k {
            let mut qi = f32::cast_from(q[qb + i]);
            if comptime!(c.gated()) {
                qi *= lambda(gc, tr, h, i, c).exp();
            }
            acc += qi * states[sb + i * c.rec.v + x];
        }
        let ab = (tr * c.rec.heads + h) * c.chunk;
        for s in 0..r + 1 {
            let ts = token_at(bos, len, p0 + s, c.rec.reverse);
            acc += pairs[ab + s] * f32::cast_from(v[(ts * c.rec.heads + h) * c.rec.v + x]);
        }
        o[(tr * c.rec.heads + h) * c.rec.v + x] = F::cast_from(acc * scale);
    }
}

/// `dv_s = scale · Σ_{r≥s} A_rs dO_r + k̃_s dS_out`: one unit per (position, value column).
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn chunk_dv_kernel<F: Float>(
    k: &Array<F>,
    d_o: &Array<F>,
    gc: &Array<f32>,
    d_states: &Array<f32>,
    pairs: &Array<f32>,
    chunks: &Array<u32>,
    cu_seqlens: &Array<u32>,
    dv: &mut Array<F>,
    seq_len: u32,
    scale: f32,
    #[comptime] c: ChunkLayout,
    #[define(F)] _dtype: StorageType,
) {
    let e = CUBE_POS_X as usize * CUBE_DIM_X as usize + UNIT_POS_X as usize;
    let j = CUBE_POS_Y as usize;
    let h = CUBE_POS_Z as usize;
    let s = e / c.rec.v;
    let x = e % c.rec.v;
    let (bos, len, p0, cl) = chunk_place(chunks, cu_seqlens, j, seq_len, c);
    if s < cl {
        let ts = token_at(bos, len, p0 + s, c.rec.reverse);
        let last_tok = token_at(bos, len, p0 + cl - 1, c.rec.reverse);
        let mut intra = 0.0f32;
        for r in s..cl {
            let tr = token_at(bos, len, p0 + r, c.rec.reverse);
            intra += pairs[(tr * c.rec.heads + h) * c.chunk + s]
                * f32::cast_from(d_o[(tr * c.rec.heads + h) * c.rec.v + x]);
        }
        let sb = (j * c.rec.heads + h) * c.rec.k * c.rec.v;
        let kb = (ts * c.rec.heads + h) * c.rec.k;
        let mut inter = 0.0f32;
        for i in 0..c.rec.k {
            let mut ki = f32::cast_from(k[kb + i]);
            if comptime!(c.gated()) {
                ki *= (lambda(gc, last_tok, h, i, c) - lambda(gc, ts, h, i, c)).exp();
            }
            inter += ki * d_states[sb + i * c.rec.v + x];
        }
        dv[(ts * c.rec.heads + h) * c.rec.v + x] = F::cast_from(intra * scale + inter);
    }
}

/// `dq` and `dk` of one (position, key dim) each, and for a key gate the identity's term
/// `q ∘ dq − k ∘ dk` (f32). `d_pairs` is `dA = scale · dO Vᵀ`.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn chunk_dqk_kernel<F: Float>(
    q: &Array<F>,
    k: &Array<F>,
    v: &Array<F>,
    d_o: &Array<F>,
    gc: &Array<f32>,
    states: &Array<f32>,
    d_states: &Array<f32>,
    d_pairs: &Array<f32>,
    chunks: &Array<u32>,
    cu_seqlens: &Array<u32>,
    dq: &mut Array<F>,
    dk: &mut Array<F>,
    term: &mut Array<f32>,
    seq_len: u32,
    scale: f32,
    #[comptime] c: ChunkLayout,
    #[define(F)] _dtype: StorageType,
) {
    let e = CUBE_POS_X as usize * CUBE_DIM_X as usize + UNIT_POS_X as usize;
    let j = CUBE_POS_Y as usize;
    let h = CUBE_POS_Z as usize;
    let p = e / c.rec.k;
    let i = e % c.rec.k;
    let (bos, len, p0, cl) = chunk_place(chunks, cu_seqlens, j, seq_len, c);
    if p < cl {
        let tp = token_at(bos, len, p0 + p, c.rec.reverse);
        let last_tok = token_at(bos, len, p0 + cl - 1, c.rec.reverse);
        let lp = lambda(gc, tp, h, i, c);
        let sb = (j * c.rec.heads + h) * c.rec.k * c.rec.v + i * c.rec.v;
        let vb = (tp * c.rec.heads + h) * c.rec.v;
        // Inter-chunk terms through the stored states.
        let mut dq_acc = 0.0f32;
        let mut dk_acc = 0.0f32;
        for x in 0..c.rec.v {
            dq_acc += f32::cast_from(d_o[vb + x]) * states[sb + x];
            dk_acc += f32::cast_from(v[vb + x]) * d_states[sb + x];
        }
        dq_acc *= scale;
        if comptime!(c.gated()) {
            dq_acc *= lp.exp();
            dk_acc *= (lambda(gc, last_tok, h, i, c) - lp).exp();
        }
        // Intra-chunk terms through dA (row p for dq, column p for dk).
        let pb = (tp * c.rec.heads + h) * c.chunk;
        for s in 0..p + 1 {
            let ts = token_at(bos, len, p0 + s, c.rec.reverse);
            let mut w = d_pairs[pb + s] * f32::cast_from(k[(ts * c.rec.heads + h) * c.rec.k + i]);
            if comptime!(c.gated()) {
                w *= (lp - lambda(gc, ts, h, i, c)).exp();
            }
            dq_acc += w;
        }
        for r in p..cl {
            let tr = token_at(bos, len, p0 + r, c.rec.reverse);
            let mut w = d_pairs[(tr * c.rec.heads + h) * c.chunk + p]
                * f32::cast_from(q[(tr * c.rec.heads + h) * c.rec.k + i]);
            if comptime!(c.gated()) {
                w *= (lambda(gc, tr, h, i, c) - lp).exp();
            }
            dk_acc += w;
        }
        let idx = (tp * c.rec.heads + h) * c.rec.k + i;
        dq[idx] = F::cast_from(dq_acc);
        dk[idx] = F::cast_from(dk_acc);
        if comptime!(c.gated()) {
            term[idx] = f32::cast_from(q[idx]) * dq_acc - f32::cast_from(k[idx]) * dk_acc;
        }
    }
}
