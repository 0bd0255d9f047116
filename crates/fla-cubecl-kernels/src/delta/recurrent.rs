//! Fused recurrent kernels of the delta-rule family (the math is in shared/MATH.md).
//!
//! One cube per (value block, sequence·value head), as in the gated family: thread `(x, y)` owns
//! column `x` of the value block and the key rows `y, y + KS, ...` of the `f32` state. Every state
//! column evolves on its own (`S_t[:, j] = α (I − β kᵀk) S_{t-1}[:, j] + β kᵀ v_j`), so the value
//! axis splits across cubes; only `k S_{t-1}` and `q S_{t-1}` need a reduction over the key rows
//! of a column, one shared-memory round per step.
//!
//! The backward needs `S_{t-1}` again while `G_t = ∂L/∂S_t` runs backwards in time. Running the
//! recurrence backwards (`S_{t-1}` from `S_t`) divides by `α` and is unstable under strong gates,
//! so the first pass (which also forms `dq`) stores the state every [`CHECKPOINT_EVERY`] steps,
//! and the second pass replays each such span forwards from its checkpoint, keeping the span's
//! states in per-thread local memory, before walking it backwards.

// An outer `if` on a compile-time flag is resolved when the kernel is specialised; merging it
// with the run-time condition inside would turn it into a run-time branch.
#![allow(clippy::collapsible_if)]

use cubecl::prelude::*;

use crate::gated::recurrent_bwd::linear_unit;
use crate::gated::recurrent_fwd::{
    read_state, seq_length, seq_start, write_state, RecurrentLayout,
};

/// Default steps between stored states in the backward ([`DeltaLayout::span`]): the replayed
/// span lives in local memory (`span × rows` floats per thread), the checkpoints in global memory
/// (`N·HV·⌈T / span⌉` states).
pub const CHECKPOINT_EVERY: usize = 32;

/// Compile-time shape of a delta-rule launch. `rec.heads` is the value-head count `HV`; the
/// gate flags of `rec` are unused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DeltaLayout {
    pub rec: RecurrentLayout,
    /// Query/key heads `H`.
    pub qk_heads: usize,
    /// Value heads per query/key head, `HV / H`.
    pub group: usize,
    pub gated: bool,
    /// Steps between the backward's stored states.
    pub span: usize,
}

/// Length of one staging buffer: `q_t`, `k_t` (K each), then `α_t` and `β_t`.
pub fn stage_len(k: usize) -> usize {
    2 * k + 2
}

/// Staged-value registers per thread.
pub fn stage_slots(c: &DeltaLayout) -> usize {
    c.rec.k.div_ceil(c.rec.block_v * c.rec.k_split)
}

/// Loads `q_t`, `k_t`, `α_t = exp(g_t)` and `β_t` of token `tok`, value head `hv`, into
/// registers spread over the cube's units (stored into shared memory by [`stage_store`]).
#[cube]
#[allow(clippy::too_many_arguments)]
pub fn stage_load<F: Float>(
    q: &Array<F>,
    k: &Array<F>,
    beta: &Array<F>,
    g: &Array<F>,
    regs: &mut Array<f32>,
    tok: usize,
    hv: usize,
    unit: usize,
    #[comptime] c: DeltaLayout,
) {
    let threads = c.rec.block_v * c.rec.k_split;
    let slots = comptime!(stage_slots(&c));
    let qk_base = (tok * c.qk_heads + hv / c.group) * c.rec.k;
    #[unroll]
    for s in 0..slots {
        let e = unit + s * threads;
        if e < c.rec.k {
            regs[2 * s] = f32::cast_from(q[qk_base + e]);
            regs[2 * s + 1] = f32::cast_from(k[qk_base + e]);
        }
    }
    if unit == 0 {
        let idx = tok * c.rec.heads + hv;
        let mut a = 1.0f32;
        if c.gated {
            a = f32::cast_from(g[idx]).exp();
        }
        regs[2 * slots] = a;
        regs[2 * slots + 1] = f32::cast_from(beta[idx]);
    }
}

/// Stores what [`stage_load`] loaded into the staging buffer starting at `base`.
#[cube]
pub fn stage_store(
    regs: &Array<f32>,
    stage: &mut SharedMemory<f32>,
    base: usize,
    unit: usize,
    #[comptime] c: DeltaLayout,
) {
    let threads = c.rec.block_v * c.rec.k_split;
    let slots = comptime!(stage_slots(&c));
    #[unroll]
    for s in 0..slots {
        let e = unit + s * threads;
        if e < c.rec.k {
            stage[base + e] = regs[2 * s];
            stage[base + c.rec.k + e] = regs[2 * s + 1];
        }
    }
    if unit == 0 {
        stage[base + 2 * c.rec.k] = regs[2 * slots];
        stage[base + 2 * c.rec.k + 1] = regs[2 * slots + 1];
    }
}

/// Element `col` of a `[B·T, HV, V]` row, 0 outside the value axis.
#[cube]
pub fn column_value<F: Float>(
    x: &Array<F>,
    tok: usize,
    hv: usize,
    col: usize,
    #[comptime] c: DeltaLayout,
) -> f32 {
    let mut out = 0.0f32;
    if col < c.rec.v {
        out = f32::cast_from(x[(tok * c.rec.heads + hv) * c.rec.v + col]);
    }
    out
}

/// Sum over the key-splitting threads of this unit's column in a reduction buffer.
#[cube]
pub fn column_sum(
    red: &SharedMemory<f32>,
    base: usize,
    tv: usize,
    #[comptime] c: DeltaLayout,
) -> f32 {
    let mut acc = 0.0f32;
    #[unroll]
    for s in 0..c.rec.k_split {
        acc += red[base + s * c.rec.block_v + tv];
    }
    acc
}

/// Forward. Staging is triple-buffered and the reduction buffer double-buffered, so one barrier
/// per step orders everything: a buffer is refilled only after every unit has passed the barrier
/// of the step after its last reader.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn delta_fwd_kernel<F: Float>(
    q: &Array<F>,
    k: &Array<F>,
    v: &Array<F>,
    beta: &Array<F>,
    g: &Array<F>,
    h0: &Array<f32>,
    cu_seqlens: &Array<u32>,
    o: &mut Array<F>,
    ht: &mut Array<f32>,
    seq_len: u32,
    scale: f32,
    #[comptime] c: DeltaLayout,
    #[define(F)] _dtype: StorageType,
) {
    let tv = UNIT_POS_X as usize;
    let tk = UNIT_POS_Y as usize;
    let nh = CUBE_POS_Y as usize;
    let n = nh / c.rec.heads;
    let hv = nh % c.rec.heads;
    let col = CUBE_POS_X as usize * c.rec.block_v + tv;
    let bos = seq_start(cu_seqlens, n, seq_len, c.rec.varlen);
    let len = seq_length(cu_seqlens, n, seq_len, c.rec.varlen);
    let state_base = nh * c.rec.k * c.rec.v;
    let kd = c.rec.k;

    let mut state = Array::<f32>::new(c.rec.rows);
    read_state(h0, &mut state, state_base, tk, col, c.rec.has_h0, c.rec);

    let unit = tk * c.rec.block_v + tv;
    let threads = comptime!(c.rec.k_split * c.rec.block_v);
    let sl = comptime!(stage_len(c.rec.k));
    // Per step: k·S, q·S and q·k partials, three `threads`-long rows, twice.
    let mut red = SharedMemory::<f32>::new(comptime!(6 * c.rec.k_split * c.rec.block_v));
    let mut stage = SharedMemory::<f32>::new(comptime!(3 * stage_len(c.rec.k)));
    let mut regs = Array::<f32>::new(comptime!(2 * stage_slots(&c) + 2));
    let mut next_v = 0.0f32;
    if len > 0 {
        stage_load::<F>(q, k, beta, g, &mut regs, bos, hv, unit, c);
        stage_store(&regs, &mut stage, 0, unit, c);
        next_v = column_value::<F>(v, bos, hv, col, c);
    }
    sync_cube();
    for step in 0..len {
        let tok = bos + step;
        let vj = next_v;
        let more = step + 1 < len;
        if more {
            stage_load::<F>(q, k, beta, g, &mut regs, tok + 1, hv, unit, c);
            next_v = column_value::<F>(v, tok + 1, hv, col, c);
        }
        let base = (step % 3) * sl;
        let mut pk = 0.0f32;
        let mut pq = 0.0f32;
        let mut pqk = 0.0f32;
        #[unroll]
        for r in 0..c.rec.rows {
            let i = tk + r * c.rec.k_split;
            if i < kd {
                let qi = stage[base + i];
                let ki = stage[base + kd + i];
                pk += ki * state[r];
                pq += qi * state[r];
                pqk += qi * ki;
            }
        }
        let buf = (step % 2) * 3 * threads;
        red[buf + unit] = pk;
        red[buf + threads + unit] = pq;
        red[buf + 2 * threads + unit] = pqk;
        if more {
            stage_store(&regs, &mut stage, ((step + 1) % 3) * sl, unit, c);
        }
        sync_cube();
        let ks = column_sum(&red, buf, tv, c);
        let qs = column_sum(&red, buf + threads, tv, c);
        let qk = column_sum(&red, buf + 2 * threads, tv, c);
        let alpha = stage[base + 2 * kd];
        let b = stage[base + 2 * kd + 1];
        let u = b * (vj - alpha * ks);
        #[unroll]
        for r in 0..c.rec.rows {
            let i = tk + r * c.rec.k_split;
            if i < kd {
                state[r] = alpha * state[r] + stage[base + kd + i] * u;
            }
        }
        // q_t S_t = α q_t S_{t-1} + (q_t · k_t) u_t.
        if tk == 0 && col < c.rec.v {
            o[(tok * c.rec.heads + hv) * c.rec.v + col] =
                F::cast_from(scale * (alpha * qs + qk * u));
        }
    }

    if c.rec.has_ht {
        write_state(ht, &state, state_base, tk, col, c.rec);
    }
}

/// Loads token `tok`'s staged values straight into `stage` (callers synchronise around it).
#[cube]
#[allow(clippy::too_many_arguments)]
fn stage_now<F: Float>(
    q: &Array<F>,
    k: &Array<F>,
    beta: &Array<F>,
    g: &Array<F>,
    regs: &mut Array<f32>,
    stage: &mut SharedMemory<f32>,
    tok: usize,
    hv: usize,
    unit: usize,
    #[comptime] c: DeltaLayout,
) {
    stage_load::<F>(q, k, beta, g, regs, tok, hv, unit, c);
    stage_store(regs, stage, 0, unit, c);
}

/// Backward: pass 1 replays the forward for `dq_t = scale · S_t do_tᵀ` and stores a checkpoint
/// every `span` steps; pass 2 walks the spans from last to first, replaying each
/// from its checkpoint and then running `G` backwards through it:
/// `dv_t = β kG`, `dβ_t = kG · w`, `dk_t = G uᵀ − αβ S_{t-1} kGᵀ`,
/// `dg_t = α (Σ G ∘ S_{t-1} − β kG · (k S_{t-1}))`, `G_{t-1} = α (G − β kᵀ kG)`, with
/// `kG = k_t G_t`, `w = v_t − α k_t S_{t-1}`, `u = β w`. Sums over the value axis are left as
/// `f32` partials (per value block for `dq`, `dk`; per value column for `dβ`, `dg`) and summed
/// by [`group_sum_kernel`], which also sums a query/key head's group of value heads.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn delta_bwd_kernel<F: Float>(
    q: &Array<F>,
    k: &Array<F>,
    v: &Array<F>,
    beta: &Array<F>,
    g: &Array<F>,
    h0: &Array<f32>,
    cu_seqlens: &Array<u32>,
    d_o: &Array<F>,
    d_ht: &Array<f32>,
    checkpoints: &mut Array<f32>,
    dq_part: &mut Array<f32>,
    dk_part: &mut Array<f32>,
    dbeta_part: &mut Array<f32>,
    dg_part: &mut Array<f32>,
    dv: &mut Array<F>,
    dh0: &mut Array<f32>,
    seq_len: u32,
    tokens: u32,
    max_spans: u32,
    scale: f32,
    #[comptime] c: DeltaLayout,
    #[comptime] has_dht: bool,
    #[define(F)] _dtype: StorageType,
) {
    let tv = UNIT_POS_X as usize;
    let tk = UNIT_POS_Y as usize;
    let nh = CUBE_POS_Y as usize;
    let vb = CUBE_POS_X as usize;
    let n = nh / c.rec.heads;
    let hv = nh % c.rec.heads;
    let col = vb * c.rec.block_v + tv;
    let col_ok = col < c.rec.v;
    let bos = seq_start(cu_seqlens, n, seq_len, c.rec.varlen);
    let len = seq_length(cu_seqlens, n, seq_len, c.rec.varlen);
    let kd = c.rec.k;
    let kv = comptime!(c.rec.k * c.rec.v);
    let state_base = nh * kv;
    let threads = comptime!(c.rec.block_v * c.rec.k_split);
    let unit = tk * c.rec.block_v + tv;
    let span = c.span;
    let ckpt_base = nh * max_spans as usize * kv;
    // Partials: [NV, tokens, HV, K] for dq/dk; per value column, [tokens, HV, V], for dβ/dg.
    let tokens = tokens as usize;
    let qk_part = vb * tokens * c.rec.heads * kd;
    let row_stride = comptime!(c.rec.block_v + 1);

    let mut stage = SharedMemory::<f32>::new(comptime!(stage_len(c.rec.k)));
    let mut regs = Array::<f32>::new(comptime!(2 * stage_slots(&c) + 2));
    let mut red_c = SharedMemory::<f32>::new(comptime!(c.rec.block_v * c.rec.k_split));
    // Rows padded by one column against shared-memory bank conflicts (as in the gated backward).
    let mut red_k =
        SharedMemory::<f32>::new(comptime!(c.rec.rows * c.rec.k_split * (c.rec.block_v + 1)));
    let mut red_s = SharedMemory::<f32>::new(comptime!(2 * c.rec.block_v * c.rec.k_split));
    let mut state = Array::<f32>::new(c.rec.rows);
    let mut gm = Array::<f32>::new(c.rec.rows);
    let mut hist = Array::<f32>::new(comptime!(c.span * c.rec.rows));
    let mut ks_hist = Array::<f32>::new(c.span);

    // Pass 1: the forward again; dq_t reduces S_t do_t over this block's columns.
    read_state(h0, &mut state, state_base, tk, col, c.rec.has_h0, c.rec);
    for step in 0..len {
        let tok = bos + step;
        if step % span == 0 {
            write_state(
                checkpoints,
                &state,
                ckpt_base + (step / span) * kv,
                tk,
                col,
                c.rec,
            );
        }
        stage_now::<F>(q, k, beta, g, &mut regs, &mut stage, tok, hv, unit, c);
        let vj = column_value::<F>(v, tok, hv, col, c);
        let doj = column_value::<F>(d_o, tok, hv, col, c);
        sync_cube();
        let mut pk = 0.0f32;
        #[unroll]
        for r in 0..c.rec.rows {
            let i = tk + r * c.rec.k_split;
            if i < kd {
                pk += stage[kd + i] * state[r];
            }
        }
        red_c[unit] = pk;
        sync_cube();
        let ks = column_sum(&red_c, 0, tv, c);
        let alpha = stage[2 * kd];
        let u = stage[2 * kd + 1] * (vj - alpha * ks);
        #[unroll]
        for r in 0..c.rec.rows {
            let i = tk + r * c.rec.k_split;
            if i < kd {
                let s = alpha * state[r] + stage[kd + i] * u;
                state[r] = s;
                red_k[i * row_stride + tv] = doj * s;
            }
        }
        sync_cube();
        let mut i = unit;
        while i < kd {
            let mut acc = 0.0f32;
            #[unroll]
            for j in 0..c.rec.block_v {
                acc += red_k[i * row_stride + j];
            }
            dq_part[qk_part + (tok * c.rec.heads + hv) * kd + i] = acc * scale;
            i += threads;
        }
        sync_cube();
    }

    // Pass 2: G backwards, span by span.
    read_state(d_ht, &mut gm, state_base, tk, col, has_dht, c.rec);
    // Written out: the cube macro translates arithmetic, not `usize::div_ceil`.
    #[allow(clippy::manual_div_ceil)]
    let spans = (len + span - 1) / span;
    for back in 0..spans {
        let sp = spans - 1 - back;
        let first = sp * span;
        let mut count = len - first;
        if count > span {
            count = span;
        }
        read_state(
            checkpoints,
            &mut state,
            ckpt_base + sp * kv,
            tk,
            col,
            true,
            c.rec,
        );
        // Replay the span, keeping S_{t-1} and k_t S_{t-1} of each step.
        for s in 0..count {
            let tok = bos + first + s;
            stage_now::<F>(q, k, beta, g, &mut regs, &mut stage, tok, hv, unit, c);
            let vj = column_value::<F>(v, tok, hv, col, c);
            sync_cube();
            let mut pk = 0.0f32;
            #[unroll]
            for r in 0..c.rec.rows {
                let i = tk + r * c.rec.k_split;
                if i < kd {
                    pk += stage[kd + i] * state[r];
                }
                hist[s * c.rec.rows + r] = state[r];
            }
            red_c[unit] = pk;
            sync_cube();
            let ks = column_sum(&red_c, 0, tv, c);
            ks_hist[s] = ks;
            let alpha = stage[2 * kd];
            let u = stage[2 * kd + 1] * (vj - alpha * ks);
            #[unroll]
            for r in 0..c.rec.rows {
                let i = tk + r * c.rec.k_split;
                if i < kd {
                    state[r] = alpha * state[r] + stage[kd + i] * u;
                }
            }
            sync_cube();
        }
        // Walk it backwards.
        for back_s in 0..count {
            let s = count - 1 - back_s;
            let tok = bos + first + s;
            stage_now::<F>(q, k, beta, g, &mut regs, &mut stage, tok, hv, unit, c);
            let vj = column_value::<F>(v, tok, hv, col, c);
            let doj = column_value::<F>(d_o, tok, hv, col, c) * scale;
            sync_cube();
            let mut pkg = 0.0f32;
            #[unroll]
            for r in 0..c.rec.rows {
                let i = tk + r * c.rec.k_split;
                if i < kd {
                    let gi = gm[r] + stage[i] * doj;
                    gm[r] = gi;
                    pkg += stage[kd + i] * gi;
                }
            }
            red_c[unit] = pkg;
            sync_cube();
            let kg = column_sum(&red_c, 0, tv, c);
            let ks = ks_hist[s];
            let alpha = stage[2 * kd];
            let b = stage[2 * kd + 1];
            let w = vj - alpha * ks;
            let u = b * w;
            if tk == 0 && col_ok {
                dv[(tok * c.rec.heads + hv) * c.rec.v + col] = F::cast_from(b * kg);
            }
            let mut pdg = 0.0f32;
            #[unroll]
            for r in 0..c.rec.rows {
                let i = tk + r * c.rec.k_split;
                if i < kd {
                    let prev = hist[s * c.rec.rows + r];
                    let gi = gm[r];
                    red_k[i * row_stride + tv] = u * gi - alpha * b * kg * prev;
                    pdg += gi * prev;
                    gm[r] = alpha * (gi - b * stage[kd + i] * kg);
                }
            }
            let mut pdb = 0.0f32;
            if tk == 0 {
                pdg -= b * kg * ks;
                pdb = kg * w;
            }
            red_s[unit] = pdg;
            red_s[threads + unit] = pdb;
            sync_cube();
            let mut i = unit;
            while i < kd {
                let mut acc = 0.0f32;
                #[unroll]
                for j in 0..c.rec.block_v {
                    acc += red_k[i * row_stride + j];
                }
                dk_part[qk_part + (tok * c.rec.heads + hv) * kd + i] = acc;
                i += threads;
            }
            // Per-column sums; the sum over columns is left to `group_sum_kernel` (a loop over
            // the whole cube here would run long enough, summed over a sequence, to hit
            // lavapipe's loop limit).
            if tk == 0 && col_ok {
                let at = (tok * c.rec.heads + hv) * c.rec.v + col;
                dbeta_part[at] = column_sum(&red_s, threads, tv, c);
                if c.gated {
                    dg_part[at] = alpha * column_sum(&red_s, 0, tv, c);
                }
            }
            sync_cube();
        }
    }

    if c.rec.has_h0 {
        write_state(dh0, &gm, state_base, tk, col, c.rec);
    }
}

/// `out[(o, i)] = Σ_{block < blocks} Σ_{m < group} part[block][(o · group + m, i)]`, with `i`
/// running over `inner`: sums per-value-block partials and the value heads that share a
/// query/key head (`dq`, `dk`), or the per-column partials of a scalar (`dβ`, `dg`: `inner` 1,
/// `group` V). One unit per output element.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn group_sum_kernel<F: Float>(
    part: &Array<f32>,
    out: &mut Array<F>,
    len: u32,
    part_len: u32,
    inner: u32,
    group: u32,
    // At run time, not unrolled: the value blocks grow with V (128 at V = 4096), and one kernel
    // per V would be compiled and carried for nothing.
    blocks: u32,
    #[define(F)] _dtype: StorageType,
) {
    let e = linear_unit();
    if e < len as usize {
        let inner = inner as usize;
        let outer = e / inner;
        let i = e % inner;
        let group = group as usize;
        let mut acc = 0.0f32;
        for b in 0..blocks as usize {
            for m in 0..group {
                acc += part[b * part_len as usize + (outer * group + m) * inner + i];
            }
        }
        out[e] = F::cast_from(acc);
    }
}
