//! Fused recurrent backward of the gated family (the math is in shared/MATH.md).
//!
//! Same grid as the forward. Pass 1 replays the forward to get `dq_t = scale · do_t S_tᵀ`; pass 2
//! runs `G_t = ∂L/∂S_t` backwards in time from `dhT`, giving `dk_t = v_t G_tᵀ`, `dv_t = k_t G_t` and
//! finally `dh0`. `dq` and `dk` sum over the value axis, which is split across cubes: each cube
//! writes an `f32` partial per value block and [`qk_grad_finalize_kernel`] sums them. Gate gradients
//! come from the cumulative-sum identity (no stored states): [`gate_cumsum_kernel`].

// An outer `if` on a compile-time flag is resolved when the kernel is specialised; merging it
// with the run-time condition inside would turn it into a run-time branch.
#![allow(clippy::collapsible_if)]

use cubecl::prelude::*;

use super::recurrent_fwd::{
    column_load, read_state, seq_length, seq_start, stage_len, stage_load, stage_slots,
    stage_store, staged_decay, token_at, write_state, RecurrentLayout,
};

#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn recurrent_bwd_kernel<F: Float>(
    q: &Array<F>,
    k: &Array<F>,
    v: &Array<F>,
    g: &Array<F>,
    gv: &Array<F>,
    h0: &Array<f32>,
    cu_seqlens: &Array<u32>,
    d_o: &Array<F>,
    d_ht: &Array<f32>,
    dq_part: &mut Array<f32>,
    dk_part: &mut Array<f32>,
    dv: &mut Array<F>,
    dh0: &mut Array<f32>,
    seq_len: u32,
    tokens: u32,
    scale: f32,
    #[comptime] c: RecurrentLayout,
    #[comptime] has_dht: bool,
    #[define(F)] _dtype: StorageType,
) {
    let tv = UNIT_POS_X as usize;
    let tk = UNIT_POS_Y as usize;
    let nh = CUBE_POS_Y as usize;
    let vb = CUBE_POS_X as usize;
    let n = nh / c.heads;
    let h = nh % c.heads;
    let col = vb * c.block_v + tv;
    let col_ok = col < c.v;
    let bos = seq_start(cu_seqlens, n, seq_len, c.varlen);
    let len = seq_length(cu_seqlens, n, seq_len, c.varlen);
    let state_base = nh * c.k * c.v;
    let threads = c.block_v * c.k_split;
    let unit = tk * c.block_v + tv;
    // Rows of one value block's partial: [NV, tokens, H, K].
    let part_base = vb * tokens as usize * c.heads * c.k;

    // Rows padded by one column: the reduction reads a row per unit, and an unpadded stride of
    // 32 floats would put a warp's 32 reads in one shared-memory bank.
    let mut red_k = SharedMemory::<f32>::new(c.rows * c.k_split * (c.block_v + 1));
    let mut red_v = SharedMemory::<f32>::new(c.k_split * c.block_v);
    let mut state = Array::<f32>::new(c.rows);
    // Staged key-side inputs, double-buffered and loaded a step ahead as in the forward.
    let sl = comptime!(stage_len(c.k));
    let mut stage = SharedMemory::<f32>::new(comptime!(2 * stage_len(c.k)));
    let mut regs = Array::<f32>::new(comptime!(3 * stage_slots(&c) + 1));
    let mut cur = Array::<f32>::new(3usize);
    let mut next = Array::<f32>::new(3usize);

    // Pass 1: replay the forward; dq_t reduces do_t ∘ S_t over this block's value columns.
    read_state(h0, &mut state, state_base, tk, col, c.has_h0, c);
    if len > 0 {
        let tok = token_at(bos, len, 0, c.reverse);
        stage_load::<F>(q, k, g, &mut regs, tok, h, unit, c);
        stage_store(&regs, &mut stage, 0, unit, c);
        column_load::<F>(v, gv, d_o, &mut next, tok, h, col, c);
    }
    sync_cube();
    for step in 0..len {
        let tok = token_at(bos, len, step, c.reverse);
        let qk_base = (tok * c.heads + h) * c.k;
        cur[0] = next[0];
        cur[1] = next[1];
        cur[2] = next[2];
        let more = step + 1 < len;
        if more {
            let nt = token_at(bos, len, step + 1, c.reverse);
            stage_load::<F>(q, k, g, &mut regs, nt, h, unit, c);
            column_load::<F>(v, gv, d_o, &mut next, nt, h, col, c);
        }
        let base = (step % 2) * sl;
        let vj = cur[0];
        let bj = cur[1];
        let doj = cur[2];
        #[unroll]
        for r in 0..c.rows {
            let i = tk + r * c.k_split;
            if i < c.k {
                let a = staged_decay(&stage, base, i, c);
                let s = a * state[r] * bj + stage[base + c.k + i] * vj;
                state[r] = s;
                red_k[i * (c.block_v + 1) + tv] = doj * s;
            }
        }
        if more {
            stage_store(&regs, &mut stage, ((step + 1) % 2) * sl, unit, c);
        }
        sync_cube();
        let mut i = unit;
        while i < c.k {
            let mut acc = 0.0f32;
            #[unroll]
            for j in 0..c.block_v {
                acc += red_k[i * (c.block_v + 1) + j];
            }
            dq_part[part_base + qk_base + i] = acc * scale;
            i += threads;
        }
        sync_cube();
    }

    // Pass 2: G backwards in time; G starts at dhT.
    read_state(d_ht, &mut state, state_base, tk, col, has_dht, c);
    if len > 0 {
        let tok = token_at(bos, len, 0, !c.reverse);
        stage_load::<F>(q, k, g, &mut regs, tok, h, unit, c);
        stage_store(&regs, &mut stage, 0, unit, c);
        column_load::<F>(v, gv, d_o, &mut next, tok, h, col, c);
    }
    sync_cube();
    for step in 0..len {
        let tok = token_at(bos, len, step, !c.reverse);
        let qk_base = (tok * c.heads + h) * c.k;
        cur[0] = next[0];
        cur[1] = next[1];
        cur[2] = next[2];
        let more = step + 1 < len;
        if more {
            let nt = token_at(bos, len, step + 1, !c.reverse);
            stage_load::<F>(q, k, g, &mut regs, nt, h, unit, c);
            column_load::<F>(v, gv, d_o, &mut next, nt, h, col, c);
        }
        let base = (step % 2) * sl;
        let vj = cur[0];
        let bj = cur[1];
        let doj = cur[2] * scale;
        let mut partial_v = 0.0f32;
        #[unroll]
        for r in 0..c.rows {
            let i = tk + r * c.k_split;
            if i < c.k {
                let gs = state[r] + stage[base + i] * doj;
                red_k[i * (c.block_v + 1) + tv] = vj * gs;
                partial_v += stage[base + c.k + i] * gs;
                let a = staged_decay(&stage, base, i, c);
                // What reaches S_{t-1}: diag(a_t) G_t diag(b_t).
                state[r] = gs * a * bj;
            }
        }
        red_v[unit] = partial_v;
        if more {
            stage_store(&regs, &mut stage, ((step + 1) % 2) * sl, unit, c);
        }
        sync_cube();
        let mut i = unit;
        while i < c.k {
            let mut acc = 0.0f32;
            #[unroll]
            for j in 0..c.block_v {
                acc += red_k[i * (c.block_v + 1) + j];
            }
            dk_part[part_base + qk_base + i] = acc;
            i += threads;
        }
        if tk == 0 && col_ok {
            let mut acc = 0.0f32;
            #[unroll]
            for s in 0..c.k_split {
                acc += red_v[s * c.block_v + tv];
            }
            dv[(tok * c.heads + h) * c.v + col] = F::cast_from(acc);
        }
        sync_cube();
    }

    if c.has_h0 {
        write_state(dh0, &state, state_base, tk, col, c);
    }
}

/// Linear index of this unit in a 2-D grid of 1-D cubes (grids over 65535 cubes need two axes).
#[cube]
pub fn linear_unit() -> usize {
    (CUBE_POS_Y as usize * CUBE_COUNT_X as usize + CUBE_POS_X as usize) * CUBE_DIM_X as usize
        + UNIT_POS_X as usize
}

/// Sums the per-value-block partials of `dq`, `dk` and, for a key gate, writes the per-step term
/// of the gate identity `q ∘ dq − k ∘ dk` (MATH.md).
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn qk_grad_finalize_kernel<F: Float>(
    q: &Array<F>,
    k: &Array<F>,
    dq_part: &Array<f32>,
    dk_part: &Array<f32>,
    dq: &mut Array<F>,
    dk: &mut Array<F>,
    term: &mut Array<f32>,
    len: u32,
    #[comptime] q_blocks: usize,
    #[comptime] k_blocks: usize,
    #[comptime] with_term: bool,
    #[define(F)] _dtype: StorageType,
) {
    let e = linear_unit();
    let len = len as usize;
    if e < len {
        let mut a = 0.0f32;
        let mut b = 0.0f32;
        #[unroll]
        for vb in 0..q_blocks {
            a += dq_part[vb * len + e];
        }
        #[unroll]
        for vb in 0..k_blocks {
            b += dk_part[vb * len + e];
        }
        dq[e] = F::cast_from(a);
        dk[e] = F::cast_from(b);
        if with_term {
            term[e] = f32::cast_from(q[e]) * a - f32::cast_from(k[e]) * b;
        }
    }
}

/// Per-step term of the value-gate identity, `o ∘ do − v ∘ dv`.
#[cube(launch)]
pub fn value_term_kernel<F: Float>(
    o: &Array<F>,
    d_o: &Array<F>,
    v: &Array<F>,
    dv: &Array<F>,
    term: &mut Array<f32>,
    len: u32,
    #[define(F)] _dtype: StorageType,
) {
    let e = linear_unit();
    if e < len as usize {
        term[e] = f32::cast_from(o[e]) * f32::cast_from(d_o[e])
            - f32::cast_from(v[e]) * f32::cast_from(dv[e]);
    }
}

/// `out[r] = Σ_i x[r, i]`, one unit per row: the scalar gate's per-step term from the key term.
#[cube(launch)]
pub fn row_sum_kernel(x: &Array<f32>, out: &mut Array<f32>, rows: u32, width: u32) {
    let r = linear_unit();
    if r < rows as usize {
        let w = width as usize;
        let mut acc = 0.0f32;
        for i in 0..w {
            acc += x[r * w + i];
        }
        out[r] = acc;
    }
}

/// Row and column sums of `dhT ∘ hT`: one unit per (sequence·head, index), `rows: [N·H, K]`,
/// `cols: [N·H, V]`.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn final_state_sums_kernel(
    ht: &Array<f32>,
    d_ht: &Array<f32>,
    rows: &mut Array<f32>,
    cols: &mut Array<f32>,
    units: u32,
    width: u32,
    k_dim: u32,
    v_dim: u32,
) {
    let u = linear_unit();
    if u < units as usize {
        let w = width as usize;
        let (kd, vd) = (k_dim as usize, v_dim as usize);
        let x = u % w;
        let nh = u / w;
        let base = nh * kd * vd;
        if x < kd {
            let mut acc = 0.0f32;
            for j in 0..vd {
                acc += d_ht[base + x * vd + j] * ht[base + x * vd + j];
            }
            rows[nh * kd + x] = acc;
        }
        if x < vd {
            let mut acc = 0.0f32;
            for i in 0..kd {
                acc += d_ht[base + i * vd + x] * ht[base + i * vd + x];
            }
            cols[nh * vd + x] = acc;
        }
    }
}

/// Which gate a [`gate_cumsum_kernel`] launch differentiates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GateAxis {
    /// `gk[.., K]`: the final-state term sums `dhT ∘ hT` over values.
    Key,
    /// `gv[.., V]`: sums over keys.
    Value,
    /// `g[..]`: reads the key term already summed over K ([`row_sum_kernel`]); the final-state
    /// term sums over everything.
    Scalar,
}

impl GateAxis {
    /// Gate columns per token and head.
    pub fn width(self, c: RecurrentLayout) -> usize {
        match self {
            GateAxis::Key => c.k,
            GateAxis::Value => c.v,
            GateAxis::Scalar => 1,
        }
    }
}

/// Where the gate's entry at `step` of a sequence lies in the term and in `dg`, which share their
/// layout (steps count backwards in processing order, the order in which [`gate_cumsum_kernel`]
/// accumulates).
#[cube]
fn gate_index(
    bos: usize,
    len: usize,
    step: usize,
    h: usize,
    col: usize,
    #[comptime] c: RecurrentLayout,
    #[comptime] axis: GateAxis,
) -> usize {
    let tok = token_at(bos, len, step, !c.reverse);
    let mut at = tok * c.heads + h;
    match comptime!(axis) {
        GateAxis::Key => {
            at = at * c.k + col;
        }
        GateAxis::Value => {
            at = at * c.v + col;
        }
        GateAxis::Scalar => {}
    }
    at
}

/// The first half of the gate's cumulative sum: one unit per (sequence, head, segment of
/// `seg_len` steps, gate column) sums its segment's terms into `seg[(nh · segs + s) · width +
/// col]`. A sequence walked by one unit (0.27 ms a layer of FLA's 340M recipe on an H100: 4096
/// units each 2048 dependent steps) left the GPU idle; segments give `segs` times the units and
/// `segs` times shorter chains.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn gate_segment_sums_kernel(
    term: &Array<f32>,
    cu_seqlens: &Array<u32>,
    seg: &mut Array<f32>,
    seq_len: u32,
    units: u32,
    segs: u32,
    seg_len: u32,
    #[comptime] c: RecurrentLayout,
    #[comptime] axis: GateAxis,
) {
    let u = linear_unit();
    if u < units as usize {
        let width = comptime!(axis.width(c));
        let col = u % width;
        let s = (u / width) % segs as usize;
        let nh = u / width / segs as usize;
        let n = nh / c.heads;
        let bos = seq_start(cu_seqlens, n, seq_len, c.varlen);
        let len = seq_length(cu_seqlens, n, seq_len, c.varlen);
        let first = s * seg_len as usize;
        let mut end = first + seg_len as usize;
        if end > len {
            end = len;
        }
        let mut acc = 0.0f32;
        for step in first..end {
            acc += term[gate_index(bos, len, step, nh % c.heads, col, c, axis)];
        }
        seg[u] = acc;
    }
}

/// `dg_r = Σ_{t at or after r in processing order} term_t + Σ(dhT ∘ hT)`: one unit per
/// (sequence, head, segment, gate column) starts from the sums of the segments before its own
/// ([`gate_segment_sums_kernel`]) and walks its segment.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn gate_cumsum_kernel<F: Float>(
    term: &Array<f32>,
    rows: &Array<f32>,
    cols: &Array<f32>,
    cu_seqlens: &Array<u32>,
    seg: &Array<f32>,
    dg: &mut Array<F>,
    seq_len: u32,
    units: u32,
    segs: u32,
    seg_len: u32,
    k_dim: u32,
    #[comptime] c: RecurrentLayout,
    #[comptime] axis: GateAxis,
    #[comptime] has_dht: bool,
    #[define(F)] _dtype: StorageType,
) {
    let u = linear_unit();
    if u < units as usize {
        let width = comptime!(axis.width(c));
        let col = u % width;
        let s = (u / width) % segs as usize;
        let nh = u / width / segs as usize;
        let n = nh / c.heads;
        let h = nh % c.heads;
        let bos = seq_start(cu_seqlens, n, seq_len, c.varlen);
        let len = seq_length(cu_seqlens, n, seq_len, c.varlen);

        // The final-state term, `Σ dhT ∘ hT` over the other axis, comes precomputed per row and
        // column ([`final_state_sums_kernel`]); lavapipe stops a shader invocation after about
        // 65536 loop iterations (seen here: outputs left unwritten), so loops stay short.
        let kd = k_dim as usize;
        let mut acc = 0.0f32;
        if has_dht {
            match comptime!(axis) {
                GateAxis::Key => {
                    acc = rows[nh * c.k + col];
                }
                GateAxis::Value => {
                    acc = cols[nh * c.v + col];
                }
                GateAxis::Scalar => {
                    for i in 0..kd {
                        acc += rows[nh * c.k + i];
                    }
                }
            }
        }
        for before in 0..s {
            acc += seg[(nh * segs as usize + before) * width + col];
        }
        let first = s * seg_len as usize;
        let mut end = first + seg_len as usize;
        if end > len {
            end = len;
        }
        for step in first..end {
            let at = gate_index(bos, len, step, h, col, c, axis);
            acc += term[at];
            dg[at] = F::cast_from(acc);
        }
    }
}
