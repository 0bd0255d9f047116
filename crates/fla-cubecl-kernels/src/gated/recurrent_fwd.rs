//! Fused recurrent forward of the gated family.
//!
//! One cube per (value block, sequence·head). Thread `(x, y)` owns column `x` of the value block
//! and the key rows `y, y + KS, y + 2·KS, ...` of the `f32` state, held in registers for the whole
//! sequence. Each step updates those rows and reduces `q_t S_t` over the key axis through shared
//! memory; the reduction buffer alternates between two halves so one barrier per step suffices.

// An outer `if` on a compile-time flag is resolved when the kernel is specialised; merging it
// with the run-time condition inside would turn it into a run-time branch.
#![allow(clippy::collapsible_if)]

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

/// Length of one staging buffer: `q_t`, `k_t` and the key decay `exp(gk_t)` (K each), then the
/// scalar decay `exp(g_t)`.
pub fn stage_len(k: usize) -> usize {
    3 * k + 1
}

/// Per-thread registers that carry one step's staged values from global memory to shared memory.
pub fn stage_slots(c: &RecurrentLayout) -> usize {
    c.k.div_ceil(c.block_v * c.k_split)
}

/// Loads the key-side vectors of token `tok` into registers, spread over the cube's units.
/// Loading a step ahead and storing after the step's arithmetic hides the load latency, and each
/// value (and each `exp`) is computed once per cube instead of once per value column.
#[cube]
#[allow(clippy::too_many_arguments)]
pub fn stage_load<F: Float>(
    q: &Array<F>,
    k: &Array<F>,
    g: &Array<F>,
    regs: &mut Array<f32>,
    tok: usize,
    h: usize,
    unit: usize,
    #[comptime] c: RecurrentLayout,
) {
    let threads = c.block_v * c.k_split;
    let slots = comptime!(stage_slots(&c));
    let qk_base = (tok * c.heads + h) * c.k;
    #[unroll]
    for s in 0..slots {
        let e = unit + s * threads;
        if e < c.k {
            regs[3 * s] = f32::cast_from(q[qk_base + e]);
            regs[3 * s + 1] = f32::cast_from(k[qk_base + e]);
            let mut a = 1.0f32;
            if c.vector_gate {
                a = f32::cast_from(g[qk_base + e]).exp();
            }
            regs[3 * s + 2] = a;
        }
    }
    if c.scalar_gate {
        if unit == 0 {
            regs[3 * slots] = f32::cast_from(g[tok * c.heads + h]).exp();
        }
    }
}

/// Stores what [`stage_load`] loaded into the staging buffer starting at `base`.
#[cube]
pub fn stage_store(
    regs: &Array<f32>,
    stage: &mut SharedMemory<f32>,
    base: usize,
    unit: usize,
    #[comptime] c: RecurrentLayout,
) {
    let threads = c.block_v * c.k_split;
    let slots = comptime!(stage_slots(&c));
    #[unroll]
    for s in 0..slots {
        let e = unit + s * threads;
        if e < c.k {
            stage[base + e] = regs[3 * s];
            stage[base + c.k + e] = regs[3 * s + 1];
            stage[base + 2 * c.k + e] = regs[3 * s + 2];
        }
    }
    if c.scalar_gate {
        if unit == 0 {
            stage[base + 3 * c.k] = regs[3 * slots];
        }
    }
}

/// Decay of key row `i` from a staging buffer.
#[cube]
pub fn staged_decay(
    stage: &SharedMemory<f32>,
    base: usize,
    i: usize,
    #[comptime] c: RecurrentLayout,
) -> f32 {
    let mut a = 1.0f32;
    if c.vector_gate {
        a = stage[base + 2 * c.k + i];
    }
    if c.scalar_gate {
        a = stage[base + 3 * c.k];
    }
    a
}

/// Value-side inputs of one token for this unit's column: `(v, exp(gv))` packed in a 2-array.
#[cube]
#[allow(clippy::too_many_arguments)]
pub fn column_load<F: Float>(
    v: &Array<F>,
    gv: &Array<F>,
    extra: &Array<F>,
    out: &mut Array<f32>,
    tok: usize,
    h: usize,
    col: usize,
    #[comptime] c: RecurrentLayout,
) {
    let mut vj = 0.0f32;
    let mut bj = 1.0f32;
    let mut xj = 0.0f32;
    if col < c.v {
        let idx = (tok * c.heads + h) * c.v + col;
        vj = f32::cast_from(v[idx]);
        xj = f32::cast_from(extra[idx]);
        if c.value_gate {
            bj = f32::cast_from(gv[idx]).exp();
        }
    }
    out[0] = vj;
    out[1] = bj;
    out[2] = xj;
}

/// Loads this unit's rows of a state `[N, H, K, V]` starting at `base` into registers, or zeros
/// when the state is absent.
#[cube]
#[allow(clippy::too_many_arguments)]
pub fn read_state(
    src: &Array<f32>,
    state: &mut Array<f32>,
    base: usize,
    tk: usize,
    col: usize,
    #[comptime] present: bool,
    #[comptime] c: RecurrentLayout,
) {
    #[unroll]
    for r in 0..c.rows {
        let i = tk + r * c.k_split;
        let mut s = 0.0f32;
        if present {
            if i < c.k && col < c.v {
                s = src[base + i * c.v + col];
            }
        }
        state[r] = s;
    }
}

/// Stores this unit's rows of a state, the inverse of [`read_state`].
#[cube]
pub fn write_state(
    dst: &mut Array<f32>,
    state: &Array<f32>,
    base: usize,
    tk: usize,
    col: usize,
    #[comptime] c: RecurrentLayout,
) {
    #[unroll]
    for r in 0..c.rows {
        let i = tk + r * c.k_split;
        if i < c.k && col < c.v {
            dst[base + i * c.v + col] = state[r];
        }
    }
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
    read_state(h0, &mut state, state_base, tk, col, c.has_h0, c);

    let unit = tk * c.block_v + tv;
    let half = c.k_split * c.block_v;
    let sl = comptime!(stage_len(c.k));
    let mut red = SharedMemory::<f32>::new(2 * c.k_split * c.block_v);
    let mut stage = SharedMemory::<f32>::new(comptime!(2 * stage_len(c.k)));
    let mut regs = Array::<f32>::new(comptime!(3 * stage_slots(&c) + 1));
    let mut cur = Array::<f32>::new(3usize);
    let mut next = Array::<f32>::new(3usize);
    if len > 0 {
        let tok = token_at(bos, len, 0, c.reverse);
        stage_load::<F>(q, k, g, &mut regs, tok, h, unit, c);
        stage_store(&regs, &mut stage, 0, unit, c);
        column_load::<F>(v, gv, v, &mut next, tok, h, col, c);
    }
    sync_cube();
    for step in 0..len {
        let tok = token_at(bos, len, step, c.reverse);
        cur[0] = next[0];
        cur[1] = next[1];
        let more = step + 1 < len;
        if more {
            let nt = token_at(bos, len, step + 1, c.reverse);
            stage_load::<F>(q, k, g, &mut regs, nt, h, unit, c);
            column_load::<F>(v, gv, v, &mut next, nt, h, col, c);
        }
        let base = (step % 2) * sl;
        let vj = cur[0];
        let bj = cur[1];
        let mut partial = 0.0f32;
        #[unroll]
        for r in 0..c.rows {
            let i = tk + r * c.k_split;
            if i < c.k {
                let a = staged_decay(&stage, base, i, c);
                let s = a * state[r] * bj + stage[base + c.k + i] * vj;
                state[r] = s;
                partial += stage[base + i] * s;
            }
        }
        let buf = (step % 2) * half;
        red[buf + tk * c.block_v + tv] = partial;
        if more {
            stage_store(&regs, &mut stage, ((step + 1) % 2) * sl, unit, c);
        }
        sync_cube();
        if tk == 0 && col_ok {
            let mut acc = 0.0f32;
            #[unroll]
            for s in 0..c.k_split {
                acc += red[buf + s * c.block_v + tv];
            }
            o[(tok * c.heads + h) * c.v + col] = F::cast_from(acc * scale);
        }
    }

    if c.has_ht {
        write_state(ht, &state, state_base, tk, col, c);
    }
}
