//! Chunkwise-parallel form of the delta-rule family through the WY/UT representation, plain path
//! (no tensor cores yet).
//!
//! Per chunk of `C` positions, value head `hv`, with `S` the state entering the chunk, `Λ_r` the
//! log decays cumulated from the chunk start (0 for the plain delta rule), `γ_r = exp(Λ_r)` and
//! `γ_C` the chunk's total:
//! - `L_rs = β_r exp(Λ_r − Λ_s) (k_r · k_s)` for `s < r` (strictly lower), and the solve
//!   `(I + L) [W | Ũ] = [β γ ∘ K | β ∘ V]` by forward substitution, so that the delta rule's
//!   corrections inside the chunk are `U = Ũ − W S`;
//! - `O = scale · (γ ∘ Q S + A U)`, `A_rs = exp(Λ_r − Λ_s) (q_r · k_s)` for `s ≤ r`;
//! - `S_next = γ_C S + K̃ᵀ U`, `K̃_s = k_s exp(Λ_C − Λ_s)`.
//!
//! The backward is the same graph walked the other way: `dU = scale · Aᵀ dO + K̃ dS_next`,
//! `dS = γ_C dS_next + scale · (γ ∘ Q)ᵀ dO − Wᵀ dU` chunk to chunk; per chunk `dA = scale · dO Uᵀ`,
//! `dW = −dU Sᵀ`, then the transposed solve `(I + L)ᵀ [dR_W | dR_U] = [dW | dU]` and
//! `dL_rs = −(dR_W,r · W_s + dR_U,r · Ũ_s)`, from which `dk`, `dv = β dR_U` and `dβ` follow.
//! The decay gradient uses the identity that every factor `exp(Λ_r − Λ_s)` adds `+x` to `dΛ_r`
//! and `−x` to `dΛ_s`: `dΛ_t = q_t · dq_t − k_t · dk⁻_t + k_t · dk⁺_t` (`dk⁺` the parts through
//! `W`'s right-hand side and `L`'s row, `dk⁻` those through `A`, `K̃` and `L`'s column), plus
//! `⟨dS_next, S_next⟩` on the chunk's last position, then `dg` is `dΛ` cumulated backwards.
//!
//! Every `exp` is of `Λ_r − Λ_s` with `s ≤ r`, of `Λ_r` or of `Λ_C − Λ_s`: at most 1, whatever the
//! decay. Intermediates are `f32`; the per-chunk states are recomputed in the backward (as FLA
//! does). Matrices inside a chunk are stored by row token: `[B·T, HV, C]`.

// An outer `if` on a compile-time flag is resolved when the kernel is specialised; merging it
// with the run-time condition inside would turn it into a run-time branch.
#![allow(clippy::collapsible_if)]

use cubecl::prelude::*;

use crate::gated::chunk::{chunk_len, chunk_place, ChunkLayout};
use crate::gated::recurrent_bwd::linear_unit;
use crate::gated::recurrent_fwd::{read_state, seq_length, seq_start, write_state};

/// Compile-time shape of a chunk launch. `place` carries the chunk size, the value-head count
/// (`place.rec.heads` is `HV`), the head dims and the varlen flag, in the form the gated family's
/// chunk helpers (`chunk_place`, the decay cumsum) read, and the state passes' tiling
/// (`block_v`, `k_split`, `rows`) in the form the recurrent kernels' state helpers read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DeltaChunkLayout {
    pub place: ChunkLayout,
    /// Query/key heads `H`.
    pub qk_heads: usize,
    /// Value heads per query/key head.
    pub group: usize,
    pub gated: bool,
}

/// `Λ` of value head `hv` at token `tok` (0 without a decay).
#[cube]
fn lam(gc: &Array<f32>, tok: usize, hv: usize, #[comptime] c: DeltaChunkLayout) -> f32 {
    let mut x = 0.0f32;
    if c.gated {
        x = gc[tok * c.place.rec.heads + hv];
    }
    x
}

/// `exp(Λ_a − Λ_b)` (1 without a decay).
#[cube]
fn ratio(gc: &Array<f32>, a: usize, b: usize, hv: usize, #[comptime] c: DeltaChunkLayout) -> f32 {
    let mut x = 1.0f32;
    if c.gated {
        x = (lam(gc, a, hv, c) - lam(gc, b, hv, c)).exp();
    }
    x
}

/// Offset of the query/key row that value head `hv` reads at token `tok`.
#[cube]
fn qk_at(tok: usize, hv: usize, #[comptime] c: DeltaChunkLayout) -> usize {
    (tok * c.qk_heads + hv / c.group) * c.place.rec.k
}

/// Offset of a `[B·T, HV, width]` row.
#[cube]
fn hv_at(
    tok: usize,
    hv: usize,
    #[comptime] width: usize,
    #[comptime] c: DeltaChunkLayout,
) -> usize {
    (tok * c.place.rec.heads + hv) * width
}

/// Element `e` of the unit-per-entry grids: cubes `(entry block, chunk, value head)`.
#[cube]
fn entry() -> (usize, usize, usize) {
    (
        CUBE_POS_X as usize * CUBE_DIM_X as usize + UNIT_POS_X as usize,
        CUBE_POS_Y as usize,
        CUBE_POS_Z as usize,
    )
}

/// Query/key pair products inside each chunk, one unit per entry `(r, s)` of a chunk:
/// `lmat`: `L_rs = β_r exp(Λ_r − Λ_s) (k_r · k_s)` for `s < r` (`a = b = k`); otherwise
/// `A_rs = exp(Λ_r − Λ_s) (q_r · k_s)` for `s ≤ r` (`a = q`, `b = k`). Other entries are 0.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn delta_qk_pairs_kernel<F: Float>(
    a: &Array<F>,
    b: &Array<F>,
    beta: &Array<F>,
    gc: &Array<f32>,
    chunks: &Array<u32>,
    cu_seqlens: &Array<u32>,
    out: &mut Array<f32>,
    seq_len: u32,
    #[comptime] c: DeltaChunkLayout,
    #[comptime] lmat: bool,
    #[define(F)] _dtype: StorageType,
) {
    let (e, j, hv) = entry();
    let cc = c.place.chunk;
    let r = e / cc;
    let s = e % cc;
    let (bos, _len, p0, cl) = chunk_place(chunks, cu_seqlens, j, seq_len, c.place);
    if r < cl {
        let tr = bos + p0 + r;
        let ts = bos + p0 + s;
        let mut keep = s <= r;
        if lmat {
            keep = s < r;
        }
        let mut acc = 0.0f32;
        if keep {
            let (ar, bs) = (qk_at(tr, hv, c), qk_at(ts, hv, c));
            for i in 0..c.place.rec.k {
                acc += f32::cast_from(a[ar + i]) * f32::cast_from(b[bs + i]);
            }
            acc *= ratio(gc, tr, ts, hv, c);
            if lmat {
                acc *= f32::cast_from(beta[tr * c.place.rec.heads + hv]);
            }
        }
        out[hv_at(tr, hv, cc, c) + s] = acc;
    }
}

/// `dA_rs = scale · dO_r · U_s` for `s ≤ r`, 0 above the diagonal; one unit per entry.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn delta_do_u_pairs_kernel<F: Float>(
    d_o: &Array<F>,
    u: &Array<f32>,
    chunks: &Array<u32>,
    cu_seqlens: &Array<u32>,
    out: &mut Array<f32>,
    seq_len: u32,
    scale: f32,
    #[comptime] c: DeltaChunkLayout,
    #[define(F)] _dtype: StorageType,
) {
    let (e, j, hv) = entry();
    let (cc, vd) = (c.place.chunk, c.place.rec.v);
    let r = e / cc;
    let s = e % cc;
    let (bos, _len, p0, cl) = chunk_place(chunks, cu_seqlens, j, seq_len, c.place);
    if r < cl {
        let tr = bos + p0 + r;
        let mut acc = 0.0f32;
        if s <= r {
            let (ar, bs) = (hv_at(tr, hv, vd, c), hv_at(bos + p0 + s, hv, vd, c));
            for x in 0..vd {
                acc += f32::cast_from(d_o[ar + x]) * u[bs + x];
            }
            acc *= scale;
        }
        out[hv_at(tr, hv, cc, c) + s] = acc;
    }
}

/// `dL_rs = −(dR_W,r · W_s + dR_U,r · Ũ_s)` for `s < r`, 0 elsewhere; one unit per entry.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn delta_dl_pairs_kernel(
    drw: &Array<f32>,
    dru: &Array<f32>,
    w: &Array<f32>,
    ut: &Array<f32>,
    chunks: &Array<u32>,
    cu_seqlens: &Array<u32>,
    out: &mut Array<f32>,
    seq_len: u32,
    #[comptime] c: DeltaChunkLayout,
) {
    let (e, j, hv) = entry();
    let (cc, kd, vd) = (c.place.chunk, c.place.rec.k, c.place.rec.v);
    let r = e / cc;
    let s = e % cc;
    let (bos, _len, p0, cl) = chunk_place(chunks, cu_seqlens, j, seq_len, c.place);
    if r < cl {
        let tr = bos + p0 + r;
        let ts = bos + p0 + s;
        let mut acc = 0.0f32;
        if s < r {
            let (ar, bs) = (hv_at(tr, hv, kd, c), hv_at(ts, hv, kd, c));
            for i in 0..kd {
                acc += drw[ar + i] * w[bs + i];
            }
            let (ar, bs) = (hv_at(tr, hv, vd, c), hv_at(ts, hv, vd, c));
            for x in 0..vd {
                acc += dru[ar + x] * ut[bs + x];
            }
        }
        out[hv_at(tr, hv, cc, c) + s] = -acc;
    }
}

/// In-place triangular solve of column `col` of one chunk of `x: [B·T, HV, width]`:
/// `(I + L) X = B` by forward substitution, or `(I + L)ᵀ X = B` by back substitution
/// (`transpose`). `L` is unit-free strictly lower (`lmat`, rows by token).
#[cube]
#[allow(clippy::too_many_arguments)]
fn substitute(
    x: &mut Array<f32>,
    lmat: &Array<f32>,
    t0: usize,
    cl: usize,
    hv: usize,
    col: usize,
    #[comptime] width: usize,
    #[comptime] transpose: bool,
    #[comptime] c: DeltaChunkLayout,
) {
    let cc = c.place.chunk;
    if transpose {
        for step in 0..cl {
            let r = cl - 1 - step;
            let at = hv_at(t0 + r, hv, width, c) + col;
            let mut acc = x[at];
            for s in (r + 1)..cl {
                acc -= lmat[hv_at(t0 + s, hv, cc, c) + r] * x[hv_at(t0 + s, hv, width, c) + col];
            }
            x[at] = acc;
        }
    } else {
        for r in 0..cl {
            let at = hv_at(t0 + r, hv, width, c) + col;
            let row = hv_at(t0 + r, hv, cc, c);
            let mut acc = x[at];
            for s in 0..r {
                acc -= lmat[row + s] * x[hv_at(t0 + s, hv, width, c) + col];
            }
            x[at] = acc;
        }
    }
}

/// The per-chunk solve, one unit per column of `[W | Ũ]` (K + V columns). Forward: fills the
/// right-hand side `β γ ∘ K | β ∘ V` and solves `(I + L) X = ·` into `xk = W`, `xv = Ũ`.
/// Backward: solves `(I + L)ᵀ X = ·` in place, `xk = dW → dR_W`, `xv = dU → dR_U`.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn delta_solve_kernel<F: Float>(
    k: &Array<F>,
    v: &Array<F>,
    beta: &Array<F>,
    gc: &Array<f32>,
    lmat: &Array<f32>,
    chunks: &Array<u32>,
    cu_seqlens: &Array<u32>,
    xk: &mut Array<f32>,
    xv: &mut Array<f32>,
    seq_len: u32,
    #[comptime] c: DeltaChunkLayout,
    #[comptime] backward: bool,
    #[define(F)] _dtype: StorageType,
) {
    let (col, j, hv) = entry();
    let (kd, vd) = (c.place.rec.k, c.place.rec.v);
    let (bos, _len, p0, cl) = chunk_place(chunks, cu_seqlens, j, seq_len, c.place);
    let t0 = bos + p0;
    if col < kd {
        if !backward {
            for r in 0..cl {
                let t = t0 + r;
                let mut f = f32::cast_from(beta[t * c.place.rec.heads + hv]);
                if c.gated {
                    f *= lam(gc, t, hv, c).exp();
                }
                xk[hv_at(t, hv, kd, c) + col] = f * f32::cast_from(k[qk_at(t, hv, c) + col]);
            }
        }
        substitute(xk, lmat, t0, cl, hv, col, kd, backward, c);
    } else if col < kd + vd {
        let x = col - kd;
        if !backward {
            for r in 0..cl {
                let t = t0 + r;
                let f = f32::cast_from(beta[t * c.place.rec.heads + hv]);
                xv[hv_at(t, hv, vd, c) + x] = f * f32::cast_from(v[hv_at(t, hv, vd, c) + x]);
            }
        }
        substitute(xv, lmat, t0, cl, hv, x, vd, backward, c);
    }
}

/// Shared-memory floats of a state-pass cube: the cross-row reduction `[KS, block_v]` and one
/// chunk's `U` (forward) or `dU` (backward) columns `[C, block_v]`.
pub fn state_smem_len(c: &DeltaChunkLayout) -> usize {
    c.place.rec.k_split * c.place.rec.block_v + c.place.chunk * c.place.rec.block_v
}

/// Sums `part` over the `KS` threads of value column `tv` (all threads call it; the sum is
/// returned to every thread). Two barriers: one before reading, one before `red` is reused.
#[cube]
fn column_sum(
    red: &mut SharedMemory<f32>,
    part: f32,
    tv: usize,
    tk: usize,
    #[comptime] c: DeltaChunkLayout,
) -> f32 {
    red[tk * c.place.rec.block_v + tv] = part;
    sync_cube();
    let mut acc = 0.0f32;
    #[unroll]
    for y in 0..c.place.rec.k_split {
        acc += red[y * c.place.rec.block_v + tv];
    }
    sync_cube();
    acc
}

/// The forward state pass. One cube per (value block, sequence·value head); thread `(x, y)` owns
/// value column `x` and key rows `y, y + KS, ...` of the `f32` state, as the recurrent kernels
/// do, and walks the chunks in order: stores the entering state, forms
/// `U[:, x] = Ũ[:, x] − W S[:, x]` (one cross-row sum per position), then `S ← γ_C S + K̃ᵀ U`.
/// The per-thread rows are unrolled: lavapipe stops an invocation after about 65536 loop
/// iterations, so no loop over the key axis may sit inside the walk over positions.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn delta_chunk_state_kernel<F: Float>(
    k: &Array<F>,
    w: &Array<f32>,
    ut: &Array<f32>,
    gc: &Array<f32>,
    h0: &Array<f32>,
    cu_seqlens: &Array<u32>,
    first_chunk: &Array<u32>,
    states: &mut Array<f32>,
    u: &mut Array<f32>,
    ht: &mut Array<f32>,
    seq_len: u32,
    #[comptime] c: DeltaChunkLayout,
    #[comptime] has_h0: bool,
    #[comptime] has_ht: bool,
    #[define(F)] _dtype: StorageType,
) {
    let (kd, vd, hvs, cc) = (
        c.place.rec.k,
        c.place.rec.v,
        c.place.rec.heads,
        c.place.chunk,
    );
    let rows = comptime!(c.place.rec.rows);
    let tv = UNIT_POS_X as usize;
    let tk = UNIT_POS_Y as usize;
    let col = CUBE_POS_X as usize * c.place.rec.block_v + tv;
    let col_ok = col < vd;
    let nh = CUBE_POS_Y as usize;
    let n = nh / hvs;
    let hv = nh % hvs;
    let bos = seq_start(cu_seqlens, n, seq_len, c.place.rec.varlen);
    let len = seq_length(cu_seqlens, n, seq_len, c.place.rec.varlen);
    let first = first_chunk[n] as usize;
    let kv = kd * vd;
    let mut red = SharedMemory::<f32>::new(comptime!(c.place.rec.k_split * c.place.rec.block_v));
    let mut uch = SharedMemory::<f32>::new(comptime!(cc * c.place.rec.block_v));
    let mut s = Array::<f32>::new(rows);
    read_state(h0, &mut s, nh * kv, tk, col, has_h0, c.place.rec);
    for ci in 0..len.div_ceil(cc) {
        let p0 = ci * cc;
        let cl = chunk_len(len, p0, cc);
        let t0 = bos + p0;
        let base = ((first + ci) * hvs + hv) * kv;
        write_state(states, &s, base, tk, col, c.place.rec);
        for r in 0..cl {
            let wr = hv_at(t0 + r, hv, kd, c);
            let mut part = 0.0f32;
            #[unroll]
            for m in 0..rows {
                let i = tk + m * c.place.rec.k_split;
                if i < kd {
                    part += w[wr + i] * s[m];
                }
            }
            let ws = column_sum(&mut red, part, tv, tk, c);
            if col_ok {
                let at = hv_at(t0 + r, hv, vd, c) + col;
                let ur = ut[at] - ws;
                if tk == 0 {
                    u[at] = ur;
                }
                uch[r * c.place.rec.block_v + tv] = ur;
            }
        }
        sync_cube();
        let last = t0 + cl - 1;
        if c.gated {
            let decay = lam(gc, last, hv, c).exp();
            #[unroll]
            for m in 0..rows {
                s[m] *= decay;
            }
        }
        for r in 0..cl {
            let t = t0 + r;
            let ur = uch[r * c.place.rec.block_v + tv] * ratio(gc, last, t, hv, c);
            let kr = qk_at(t, hv, c);
            #[unroll]
            for m in 0..rows {
                let i = tk + m * c.place.rec.k_split;
                if i < kd {
                    s[m] += f32::cast_from(k[kr + i]) * ur;
                }
            }
        }
        // `uch` is rewritten by the next chunk.
        sync_cube();
    }
    if has_ht {
        write_state(ht, &s, nh * kv, tk, col, c.place.rec);
    }
}

/// `O = scale · (γ ∘ Q S + A U)`, one unit per output entry `(r, x)` of a chunk.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn delta_chunk_output_kernel<F: Float>(
    q: &Array<F>,
    gc: &Array<f32>,
    states: &Array<f32>,
    amat: &Array<f32>,
    u: &Array<f32>,
    chunks: &Array<u32>,
    cu_seqlens: &Array<u32>,
    o: &mut Array<F>,
    seq_len: u32,
    scale: f32,
    #[comptime] c: DeltaChunkLayout,
    #[define(F)] _dtype: StorageType,
) {
    let (e, j, hv) = entry();
    let (kd, vd, hvs, cc) = (
        c.place.rec.k,
        c.place.rec.v,
        c.place.rec.heads,
        c.place.chunk,
    );
    let r = e / vd;
    let x = e % vd;
    let (bos, _len, p0, cl) = chunk_place(chunks, cu_seqlens, j, seq_len, c.place);
    if r < cl {
        let t0 = bos + p0;
        let tr = t0 + r;
        let base = (j * hvs + hv) * kd * vd;
        let qr = qk_at(tr, hv, c);
        let mut inter = 0.0f32;
        for i in 0..kd {
            inter += f32::cast_from(q[qr + i]) * states[base + i * vd + x];
        }
        if c.gated {
            inter *= lam(gc, tr, hv, c).exp();
        }
        let row = hv_at(tr, hv, cc, c);
        let mut intra = 0.0f32;
        for s in 0..(r + 1) {
            intra += amat[row + s] * u[hv_at(t0 + s, hv, vd, c) + x];
        }
        o[hv_at(tr, hv, vd, c) + x] = F::cast_from(scale * (inter + intra));
    }
}

/// `dU_s = scale · Σ_{r ≥ s} A_rs dO_r`, the part of `dU` inside the chunk; one unit per entry.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn delta_du_intra_kernel<F: Float>(
    d_o: &Array<F>,
    amat: &Array<f32>,
    chunks: &Array<u32>,
    cu_seqlens: &Array<u32>,
    du: &mut Array<f32>,
    seq_len: u32,
    scale: f32,
    #[comptime] c: DeltaChunkLayout,
    #[define(F)] _dtype: StorageType,
) {
    let (e, j, hv) = entry();
    let (vd, cc) = (c.place.rec.v, c.place.chunk);
    let s = e / vd;
    let x = e % vd;
    let (bos, _len, p0, cl) = chunk_place(chunks, cu_seqlens, j, seq_len, c.place);
    if s < cl {
        let t0 = bos + p0;
        let mut acc = 0.0f32;
        for r in s..cl {
            acc += amat[hv_at(t0 + r, hv, cc, c) + s]
                * f32::cast_from(d_o[hv_at(t0 + r, hv, vd, c) + x]);
        }
        du[hv_at(t0 + s, hv, vd, c) + x] = scale * acc;
    }
}

/// The backward state pass, with the forward's thread layout, walking the chunks in reverse from
/// `dhT`: stores `dS_next` of each chunk, completes `dU += K̃ dS_next`, writes the chunk's share
/// of `⟨dS_next, S_next⟩` per column (`cterm: [chunks, HV, V]`, gated only), then
/// `dS ← γ_C dS + scale · (γ ∘ Q)ᵀ dO − Wᵀ dU`; leaves `dS` in `dh0`.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn delta_chunk_dstate_kernel<F: Float>(
    q: &Array<F>,
    k: &Array<F>,
    d_o: &Array<F>,
    w: &Array<f32>,
    u: &Array<f32>,
    gc: &Array<f32>,
    states: &Array<f32>,
    d_ht: &Array<f32>,
    cu_seqlens: &Array<u32>,
    first_chunk: &Array<u32>,
    d_states: &mut Array<f32>,
    du: &mut Array<f32>,
    cterm: &mut Array<f32>,
    dh0: &mut Array<f32>,
    seq_len: u32,
    scale: f32,
    #[comptime] c: DeltaChunkLayout,
    #[comptime] has_dht: bool,
    #[comptime] has_dh0: bool,
    #[define(F)] _dtype: StorageType,
) {
    let (kd, vd, hvs, cc) = (
        c.place.rec.k,
        c.place.rec.v,
        c.place.rec.heads,
        c.place.chunk,
    );
    let rows = comptime!(c.place.rec.rows);
    let tv = UNIT_POS_X as usize;
    let tk = UNIT_POS_Y as usize;
    let col = CUBE_POS_X as usize * c.place.rec.block_v + tv;
    let col_ok = col < vd;
    let nh = CUBE_POS_Y as usize;
    let n = nh / hvs;
    let hv = nh % hvs;
    let bos = seq_start(cu_seqlens, n, seq_len, c.place.rec.varlen);
    let len = seq_length(cu_seqlens, n, seq_len, c.place.rec.varlen);
    let first = first_chunk[n] as usize;
    let kv = kd * vd;
    let nc = len.div_ceil(cc);
    let mut red = SharedMemory::<f32>::new(comptime!(c.place.rec.k_split * c.place.rec.block_v));
    let mut duch = SharedMemory::<f32>::new(comptime!(cc * c.place.rec.block_v));
    let mut ds = Array::<f32>::new(rows);
    read_state(d_ht, &mut ds, nh * kv, tk, col, has_dht, c.place.rec);
    for step in 0..nc {
        let ci = nc - 1 - step;
        let p0 = ci * cc;
        let cl = chunk_len(len, p0, cc);
        let t0 = bos + p0;
        let jc = first + ci;
        let base = (jc * hvs + hv) * kv;
        let last = t0 + cl - 1;
        let decay = lam(gc, last, hv, c).exp();
        let mut own = 0.0f32;
        #[unroll]
        for m in 0..rows {
            let i = tk + m * c.place.rec.k_split;
            if i < kd && col_ok {
                d_states[base + i * vd + col] = ds[m];
                if c.gated {
                    own += ds[m] * states[base + i * vd + col];
                }
            }
        }
        let mut cpart = 0.0f32;
        if c.gated {
            cpart = decay * column_sum(&mut red, own, tv, tk, c);
        }
        for s in 0..cl {
            let t = t0 + s;
            let kr = qk_at(t, hv, c);
            let at = hv_at(t, hv, vd, c) + col;
            // Read before the barrier inside `column_sum`: thread `(x, 0)` rewrites `du[at]` after it.
            let mut prev = 0.0f32;
            let mut us = 0.0f32;
            if col_ok {
                prev = du[at];
                if c.gated {
                    us = u[at];
                }
            }
            let mut part = 0.0f32;
            #[unroll]
            for m in 0..rows {
                let i = tk + m * c.place.rec.k_split;
                if i < kd {
                    part += f32::cast_from(k[kr + i]) * ds[m];
                }
            }
            let acc = column_sum(&mut red, part, tv, tk, c) * ratio(gc, last, t, hv, c);
            if col_ok {
                if c.gated {
                    cpart += us * acc;
                }
                let full = prev + acc;
                duch[s * c.place.rec.block_v + tv] = full;
                if tk == 0 {
                    du[at] = full;
                }
            }
        }
        if c.gated {
            if tk == 0 && col_ok {
                cterm[(jc * hvs + hv) * vd + col] = cpart;
            }
            #[unroll]
            for m in 0..rows {
                ds[m] *= decay;
            }
        }
        sync_cube();
        for r in 0..cl {
            let t = t0 + r;
            let mut dor = 0.0f32;
            if col_ok {
                dor = scale * f32::cast_from(d_o[hv_at(t, hv, vd, c) + col]);
            }
            if c.gated {
                dor *= lam(gc, t, hv, c).exp();
            }
            let dur = duch[r * c.place.rec.block_v + tv];
            let (qr, wr) = (qk_at(t, hv, c), hv_at(t, hv, kd, c));
            #[unroll]
            for m in 0..rows {
                let i = tk + m * c.place.rec.k_split;
                if i < kd {
                    ds[m] += f32::cast_from(q[qr + i]) * dor - w[wr + i] * dur;
                }
            }
        }
        // `duch` is rewritten by the next chunk.
        sync_cube();
    }
    if has_dh0 {
        write_state(dh0, &ds, nh * kv, tk, col, c.place.rec);
    }
}

/// One unit per `(t, i)`, i < K, of a chunk:
/// `dq_t = scale γ_t dO_t Sᵀ + Σ_{s ≤ t} dA_ts exp(Λ_t − Λ_s) k_s` (per value head),
/// `dk⁻_t = Σ_{r ≥ t} dA_rt exp(Λ_r − Λ_t) q_r + exp(Λ_C − Λ_t) U_t dS_nextᵀ` (the `A` and `K̃`
/// parts of `dk`) and `dW_t = −dU_t Sᵀ`.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn delta_chunk_dqk_kernel<F: Float>(
    q: &Array<F>,
    k: &Array<F>,
    d_o: &Array<F>,
    gc: &Array<f32>,
    states: &Array<f32>,
    d_states: &Array<f32>,
    damat: &Array<f32>,
    u: &Array<f32>,
    du: &Array<f32>,
    chunks: &Array<u32>,
    cu_seqlens: &Array<u32>,
    dq: &mut Array<f32>,
    dk_minus: &mut Array<f32>,
    dw: &mut Array<f32>,
    seq_len: u32,
    scale: f32,
    #[comptime] c: DeltaChunkLayout,
    #[define(F)] _dtype: StorageType,
) {
    let (e, j, hv) = entry();
    let (kd, vd, hvs, cc) = (
        c.place.rec.k,
        c.place.rec.v,
        c.place.rec.heads,
        c.place.chunk,
    );
    let t = e / kd;
    let i = e % kd;
    let (bos, _len, p0, cl) = chunk_place(chunks, cu_seqlens, j, seq_len, c.place);
    if t < cl {
        let t0 = bos + p0;
        let tt = t0 + t;
        let last = t0 + cl - 1;
        let srow = (j * hvs + hv) * kd * vd + i * vd;
        let vrow = hv_at(tt, hv, vd, c);
        let mut inter = 0.0f32;
        let mut kt = 0.0f32;
        let mut wt = 0.0f32;
        for x in 0..vd {
            let sx = states[srow + x];
            inter += f32::cast_from(d_o[vrow + x]) * sx;
            kt += u[vrow + x] * d_states[srow + x];
            wt += du[vrow + x] * sx;
        }
        let mut dqt = scale * inter;
        if c.gated {
            dqt *= lam(gc, tt, hv, c).exp();
        }
        let row = hv_at(tt, hv, cc, c);
        for s in 0..(t + 1) {
            let ts = t0 + s;
            dqt +=
                damat[row + s] * ratio(gc, tt, ts, hv, c) * f32::cast_from(k[qk_at(ts, hv, c) + i]);
        }
        let mut dkt = kt * ratio(gc, last, tt, hv, c);
        for r in t..cl {
            let tr = t0 + r;
            dkt += damat[hv_at(tr, hv, cc, c) + t]
                * ratio(gc, tr, tt, hv, c)
                * f32::cast_from(q[qk_at(tr, hv, c) + i]);
        }
        let at = hv_at(tt, hv, kd, c) + i;
        dq[at] = dqt;
        dk_minus[at] = dkt;
        dw[at] = -wt;
    }
}

/// One unit per `(t, e)`, e < K + V, of a chunk, after the transposed solve. Key columns:
/// `dkb_t = γ_t dR_W,t + Σ_{s < t} dL_ts exp(Λ_t − Λ_s) k_s` (so `dk⁺ = β dkb` and the `β`
/// gradient through `K` is `k_t · dkb_t`), and `dk⁻_t += Σ_{r > t} dL_rt β_r exp(Λ_r − Λ_t) k_r`.
/// Value columns: `dv_t = β_t dR_U,t`.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn delta_chunk_dkv_kernel<F: Float>(
    k: &Array<F>,
    beta: &Array<F>,
    gc: &Array<f32>,
    dlmat: &Array<f32>,
    drw: &Array<f32>,
    dru: &Array<f32>,
    chunks: &Array<u32>,
    cu_seqlens: &Array<u32>,
    dkb: &mut Array<f32>,
    dk_minus: &mut Array<f32>,
    dv: &mut Array<F>,
    seq_len: u32,
    #[comptime] c: DeltaChunkLayout,
    #[define(F)] _dtype: StorageType,
) {
    let (e, j, hv) = entry();
    let (kd, vd, hvs, cc) = (
        c.place.rec.k,
        c.place.rec.v,
        c.place.rec.heads,
        c.place.chunk,
    );
    let width = kd + vd;
    let t = e / width;
    let col = e % width;
    let (bos, _len, p0, cl) = chunk_place(chunks, cu_seqlens, j, seq_len, c.place);
    if t < cl {
        let t0 = bos + p0;
        let tt = t0 + t;
        if col < kd {
            let at = hv_at(tt, hv, kd, c) + col;
            let mut plus = drw[at];
            if c.gated {
                plus *= lam(gc, tt, hv, c).exp();
            }
            let row = hv_at(tt, hv, cc, c);
            for s in 0..t {
                let ts = t0 + s;
                plus += dlmat[row + s]
                    * ratio(gc, tt, ts, hv, c)
                    * f32::cast_from(k[qk_at(ts, hv, c) + col]);
            }
            let mut minus = dk_minus[at];
            for r in (t + 1)..cl {
                let tr = t0 + r;
                minus += dlmat[hv_at(tr, hv, cc, c) + t]
                    * f32::cast_from(beta[tr * hvs + hv])
                    * ratio(gc, tr, tt, hv, c)
                    * f32::cast_from(k[qk_at(tr, hv, c) + col]);
            }
            dkb[at] = plus;
            dk_minus[at] = minus;
        } else {
            let at = hv_at(tt, hv, vd, c) + col - kd;
            dv[at] = F::cast_from(f32::cast_from(beta[tt * hvs + hv]) * dru[at]);
        }
    }
}

/// `dβ` and `dg`, one unit per (chunk, value head), walking the chunk backwards:
/// `dβ_t = k_t · dkb_t + v_t · dR_U,t`; `dΛ_t = q_t · dq_t − k_t · dk⁻_t + β_t k_t · dkb_t`, plus
/// `⟨dS_next, S_next⟩` (summed from `cterm`) on the last position, cumulated from the end.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn delta_chunk_scalars_kernel<F: Float>(
    q: &Array<F>,
    k: &Array<F>,
    v: &Array<F>,
    beta: &Array<F>,
    dq: &Array<f32>,
    dk_minus: &Array<f32>,
    dkb: &Array<f32>,
    dru: &Array<f32>,
    cterm: &Array<f32>,
    chunks: &Array<u32>,
    cu_seqlens: &Array<u32>,
    dbeta: &mut Array<F>,
    dg: &mut Array<F>,
    seq_len: u32,
    units: u32,
    #[comptime] c: DeltaChunkLayout,
    #[define(F)] _dtype: StorageType,
) {
    let unit = linear_unit();
    if unit < units as usize {
        let (kd, vd, hvs) = (c.place.rec.k, c.place.rec.v, c.place.rec.heads);
        let j = unit / hvs;
        let hv = unit % hvs;
        let (bos, _len, p0, cl) = chunk_place(chunks, cu_seqlens, j, seq_len, c.place);
        let t0 = bos + p0;
        let mut run = 0.0f32;
        if c.gated {
            let cb = (j * hvs + hv) * vd;
            for x in 0..vd {
                run += cterm[cb + x];
            }
        }
        for step in 0..cl {
            let tt = t0 + cl - 1 - step;
            let (qr, kr, vr) = (qk_at(tt, hv, c), hv_at(tt, hv, kd, c), hv_at(tt, hv, vd, c));
            let mut kb = 0.0f32;
            let mut qd = 0.0f32;
            let mut km = 0.0f32;
            for i in 0..kd {
                let ki = f32::cast_from(k[qr + i]);
                kb += ki * dkb[kr + i];
                qd += f32::cast_from(q[qr + i]) * dq[kr + i];
                km += ki * dk_minus[kr + i];
            }
            let mut vb = 0.0f32;
            for x in 0..vd {
                vb += f32::cast_from(v[vr + x]) * dru[vr + x];
            }
            let b = f32::cast_from(beta[tt * hvs + hv]);
            dbeta[tt * hvs + hv] = F::cast_from(kb + vb);
            if c.gated {
                run += qd - km + b * kb;
                dg[tt * hvs + hv] = F::cast_from(run);
            }
        }
    }
}

/// `dk = Σ over the head's group of value heads of (dk⁻ + β dkb)`, cast to the input dtype; one
/// unit per element of `dk: [B·T, H, K]`.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn delta_dk_combine_kernel<F: Float>(
    dk_minus: &Array<f32>,
    dkb: &Array<f32>,
    beta: &Array<F>,
    dk: &mut Array<F>,
    len: u32,
    #[comptime] c: DeltaChunkLayout,
    #[define(F)] _dtype: StorageType,
) {
    let e = linear_unit();
    if e < len as usize {
        let kd = c.place.rec.k;
        let i = e % kd;
        let th = e / kd;
        let h = th % c.qk_heads;
        let t = th / c.qk_heads;
        let mut acc = 0.0f32;
        for m in 0..c.group {
            let hv = h * c.group + m;
            let at = hv_at(t, hv, kd, c) + i;
            acc += dk_minus[at] + f32::cast_from(beta[t * c.place.rec.heads + hv]) * dkb[at];
        }
        dk[e] = F::cast_from(acc);
    }
}
