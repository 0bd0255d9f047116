//! GLA's chunk walks (vector gates) with the state in tensor-core registers, on CUDA's `mma.sync`
//! ([`crate::frag`]): the forward, and the backward's `dk`/`dv` and `dq` walks. What follows
//! describes the forward; the backward walks are built the same way.
//!
//! The walk of [`super::tiled`] keeps the state `S[K, BV]` in shared memory and runs every
//! product through `cmma` fragments that go back to shared memory after each product, with 32
//! planes per cube and about ten barriers a chunk; Nsight Compute counted ~1,300 instructions per
//! warp per chunk, the index arithmetic and guards of element-wise passes as much as the products.
//! Here each plane owns 16-row groups of the state's keys and holds their `S` in accumulator
//! registers through the whole walk: the decay `diag(exp(Λ_C)) S` scales a lane's own rows, the
//! update `k̃ᵀ V` accumulates into them, and only the state's rounded copy (the `B` operand of
//! `q̃ S`) goes through shared memory, written once a chunk. A chunk costs three barriers.
//!
//! Per chunk of `C` positions (the math of [`super::tiled`], vector gates):
//! - `q̃ = scale · q ∘ exp(Λ_r)`, `k̃ = k ∘ exp(Λ_C − Λ_s)` in place in the staged tiles;
//! - `O = q̃ S + A V`, `A` the in-chunk scores of [`super::tiled::vector_scores_kernel`] (0 above
//!   the diagonal, so only the blocks on or below it are multiplied); each plane computes a
//!   16-row, `ow`-column piece and writes it from its registers;
//! - `S ← diag(exp(Λ_C)) S + k̃ᵀ V`.

#![allow(clippy::collapsible_if)]

use cubecl::cmma::{MatrixIdent, MmaDefinition};
use cubecl::prelude::*;

use super::chunk::chunk_len;
use super::recurrent_fwd::{seq_length, seq_start};
use super::tiled::{tile_bytes, PAD_F};
use crate::frag::{
    fetch_slots, half_of, lane_gt, ldm4, mma_acc, put_slots, slots_per_unit, store_acc, tile_slots,
    zeros, Staging, FRAG_K, FRAG_M, FRAG_N,
};
use crate::tile::{exp_le0, fast_exp};

/// Compile-time shape of a register walk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GlaFragLayout {
    pub heads: usize,
    pub k: usize,
    pub v: usize,
    /// `K` rounded up to 16.
    pub kp: usize,
    /// Positions per chunk (a multiple of 16).
    pub chunk: usize,
    /// Value columns per cube (a multiple of 16).
    pub bv: usize,
    /// Planes per cube; plane `p` owns the state's row groups `p, p + planes, …`.
    pub planes: usize,
    /// Output columns per plane: `bv · (chunk / 16) / planes`, a multiple of 16.
    pub ow: usize,
    pub varlen: bool,
    pub has_h0: bool,
    pub has_ht: bool,
    /// `Λ` holds one value per position and head (`[B·T, H]`: a scalar gate, simple GLA's
    /// route through these walks), which every key column reads.
    pub scalar_gate: bool,
    pub staging: Staging,
}

impl GlaFragLayout {
    /// Row groups of 16 keys of the state.
    pub fn groups(&self) -> usize {
        self.kp / FRAG_M
    }
    /// Row groups each plane owns (the last planes may own one fewer).
    pub fn groups_per_plane(&self) -> usize {
        self.groups().div_ceil(self.planes)
    }
}

/// Shared memory of the forward: `q̃`, `k̃` (`C × kp`), `v` (`C × bv`), the scores (`C × C`) in
/// the input dtype, `Λ` (`C × kp`, `f32`) and the state's rounded copy (`kp × bv`). The tiles are
/// the tiled kernels' ([`tile_bytes`]: rows padded by 16 bytes, the `ph` of the 16-bit dtypes
/// these kernels take).
pub fn gla_frag_fwd_smem(l: &GlaFragLayout, e: usize) -> usize {
    2 * tile_bytes(l.chunk, l.kp, e)
        + tile_bytes(l.chunk, l.bv, e)
        + tile_bytes(l.chunk, l.chunk, e)
        + tile_bytes(l.chunk, l.kp, 4)
        + tile_bytes(l.kp, l.bv, e)
}

/// `Λ` entries (`C × kp`) each unit fetches.
pub fn gate_entries(l: &GlaFragLayout) -> usize {
    (l.chunk * l.kp).div_ceil(l.staging.threads)
}

/// Fetches this unit's entries of the chunk's cumulated gates `Λ` (rows `p0 ..` of the sequence
/// at `bos`; rows past its end repeat its last, so row `C − 1` holds the chunk's total decay
/// whatever its length; columns past `K` read 0; under a scalar gate each row's one value).
#[cube]
#[allow(clippy::too_many_arguments)]
fn fetch_gates(
    lam: &Array<f32>,
    dst: &mut Array<f32>,
    bos: usize,
    p0: usize,
    cl: usize,
    h: usize,
    #[comptime] l: GlaFragLayout,
) {
    let unit = UNIT_POS as usize;
    #[unroll]
    for r in 0..comptime!(gate_entries(&l)) {
        let e = unit + r * comptime!(l.staging.threads);
        let row = e / l.kp;
        let col = e % l.kp;
        let mut x = 0.0f32;
        if row < l.chunk && col < l.k {
            let mut at = row;
            if at >= cl {
                at = cl - 1;
            }
            if comptime!(l.scalar_gate) {
                x = lam[(bos + p0 + at) * l.heads + h];
            } else {
                x = lam[((bos + p0 + at) * l.heads + h) * l.k + col];
            }
        }
        dst[r] = x;
    }
}

/// Writes what [`fetch_gates`] fetched into the padded `C × kp` tile.
#[cube]
fn put_gates(src: &Array<f32>, dst: &mut SharedMemory<f32>, #[comptime] l: GlaFragLayout) {
    let unit = UNIT_POS as usize;
    #[unroll]
    for r in 0..comptime!(gate_entries(&l)) {
        let e = unit + r * comptime!(l.staging.threads);
        let row = e / l.kp;
        if row < l.chunk {
            dst[row * comptime!(l.kp + PAD_F) + e % l.kp] = src[r];
        }
    }
}

/// Scales entry `(r, j)` of the staged `C × kp` tile by `factor · exp(Λ_rj)` (`from_end =
/// false`: `q̃`) or by `exp(Λ_{C−1,j} − Λ_rj)` (`from_end`: `k̃`), each unit its own vectors.
#[cube(fast_math = fast_exp())]
fn scale_by_gates<F: Float, N: Size>(
    t: &mut SharedMemory<Vector<F, N>>,
    lam: &SharedMemory<f32>,
    factor: f32,
    #[comptime] from_end: bool,
    #[comptime] l: GlaFragLayout,
) {
    let s = l.staging;
    let (cv, ld, ldl) = comptime!((l.kp / s.vector, (l.kp + s.ph) / s.vector, l.kp + PAD_F));
    let slots = comptime!(l.chunk * cv);
    let last = comptime!((l.chunk - 1) * (l.kp + PAD_F));
    let unit = UNIT_POS as usize;
    #[unroll]
    for r in 0..comptime!(slots_per_unit(l.chunk, l.kp, &s)) {
        let e = unit + r * comptime!(s.threads);
        if e < slots {
            let row = e / cv;
            let c0 = (e % cv) * comptime!(s.vector);
            let at = row * ld + e % cv;
            let mut x = t[at];
            #[unroll]
            for i in 0..comptime!(s.vector) {
                let mut ex = lam[row * ldl + c0 + i];
                if comptime!(from_end) {
                    ex = lam[last + c0 + i] - ex;
                }
                x[i] = F::cast_from(f32::cast_from(x[i]) * factor * ex.exp());
            }
            t[at] = x;
        }
    }
}

/// Where a walk's cube `(value block, head, sequence)` walks: its value block, head, its
/// sequence's first token and length, and the offset of its state `[K, V]` in `[N, H, K, V]`.
#[cube]
fn walk_place(
    cu_seqlens: &Array<u32>,
    seq_len: u32,
    #[comptime] l: GlaFragLayout,
) -> (usize, usize, usize, usize, usize) {
    let h = CUBE_POS_Y as usize;
    let n = CUBE_POS_Z as usize;
    let bos = seq_start(cu_seqlens, n, seq_len, l.varlen);
    let len = seq_length(cu_seqlens, n, seq_len, l.varlen);
    (
        CUBE_POS_X as usize,
        h,
        bos,
        len,
        (n * l.heads + h) * l.k * l.v,
    )
}

/// Reads (`load`, zeros outside `K × V` and without `h0`) or writes this plane's rows of the
/// state's slice `[kp, bv]` at column `v0` of `[N, H, K, V]` into or from its accumulators.
#[cube]
fn state_io<NC: Size>(
    acc: &mut Array<Vector<f32, NC>>,
    global: &mut Array<f32>,
    base: usize,
    v0: usize,
    #[comptime] load: bool,
    #[comptime] l: GlaFragLayout,
) {
    let (g, t) = lane_gt();
    let plane = UNIT_POS_Y as usize;
    let nt = comptime!(l.bv / FRAG_N);
    #[unroll]
    for gi in 0..comptime!(l.groups_per_plane()) {
        let grp = plane + gi * comptime!(l.planes);
        #[unroll]
        for j in 0..nt {
            #[unroll]
            for half in 0..2usize {
                let row = grp * FRAG_M + g + half * 8;
                let slot = (gi * nt + j) * 2 + half;
                let mut x = acc[slot];
                #[unroll]
                for e in 0..2usize {
                    let col = v0 + j * FRAG_N + 2 * t + e;
                    let inside = grp < comptime!(l.groups()) && row < l.k && col < l.v;
                    if comptime!(load) {
                        let mut y = 0.0f32;
                        if inside {
                            y = global[base + row * l.v + col];
                        }
                        x[e] = y;
                    } else if inside {
                        global[base + row * l.v + col] = x[e];
                    }
                }
                if comptime!(load) {
                    acc[slot] = x;
                }
            }
        }
    }
}

/// Writes this plane's rows of the state (or of its gradient) in accumulators, rounded to the
/// input dtype, into the pair tile `dst` (`kp × bv`, rows `ld` entries apart): the `B` operand of
/// the products with the state.
#[cube]
fn round_rows<F: Float, NA: Size, NC: Size>(
    acc: &Array<Vector<f32, NC>>,
    dst: &mut SharedMemory<Vector<F, NA>>,
    #[comptime] ld: usize,
    #[comptime] l: GlaFragLayout,
) {
    let (g, t) = lane_gt();
    let plane = UNIT_POS_Y as usize;
    let nt = comptime!(l.bv / FRAG_N);
    #[unroll]
    for gi in 0..comptime!(l.groups_per_plane()) {
        let grp = plane + gi * comptime!(l.planes);
        if grp < comptime!(l.groups()) {
            #[unroll]
            for j in 0..nt {
                #[unroll]
                for half in 0..2usize {
                    let x = acc[(gi * nt + j) * 2 + half];
                    let mut y = Vector::<F, NA>::empty();
                    y[0] = F::cast_from(x[0]);
                    y[1] = F::cast_from(x[1]);
                    let row = grp * FRAG_M + g + half * 8;
                    dst[(row * ld + j * FRAG_N + 2 * t) / 2] = y;
                }
            }
        }
    }
}

/// `acc ← diag(exp(Λ_C)) acc + Xᵀ Y` for this plane's row groups of the state (or its
/// gradient): the decay of each key row by the chunk's total gate (row `C − 1` of `lam`), then
/// the product of the staged `X` (`C × kp`, `k̃` or `q̃`, read transposed) and `Y` (`C × bv`,
/// `v` or `d_o`).
#[cube]
fn update_rows<F: Float, N: Size, NA: Size, NB: Size, NC: Size>(
    acc: &mut Array<Vector<f32, NC>>,
    lam: &SharedMemory<f32>,
    x: &SharedMemory<Vector<F, N>>,
    y: &SharedMemory<Vector<F, N>>,
    #[comptime] l: GlaFragLayout,
) {
    let st = l.staging;
    let (c, kp, bv) = comptime!((l.chunk, l.kp, l.bv));
    let (ldk, ldv) = comptime!((kp + st.ph, bv + st.ph));
    let nt = comptime!(bv / FRAG_N);
    let last = comptime!((c - 1) * (kp + PAD_F));
    let (g, _) = lane_gt();
    let plane = UNIT_POS_Y as usize;
    #[unroll]
    for gi in 0..comptime!(l.groups_per_plane()) {
        let grp = plane + gi * comptime!(l.planes);
        if grp < comptime!(l.groups()) {
            let d0 = exp_le0(lam[last + grp * FRAG_M + g]);
            let d1 = exp_le0(lam[last + grp * FRAG_M + g + 8]);
            #[unroll]
            for j in 0..nt {
                let mut u = acc[(gi * nt + j) * 2];
                u[0] *= d0;
                u[1] *= d0;
                acc[(gi * nt + j) * 2] = u;
                let mut w = acc[(gi * nt + j) * 2 + 1];
                w[0] *= d1;
                w[1] *= d1;
                acc[(gi * nt + j) * 2 + 1] = w;
            }
            #[unroll]
            for s in 0..comptime!(c / FRAG_K) {
                // `A = Xᵀ`: keys `16 grp ..` down, positions `16 s ..` across.
                let fa = ldm4::<F, N, NA>(x, s * FRAG_K, grp * FRAG_M, ldk, st.vector, true, true);
                times_rows::<F, N, NA, NB, NC>(
                    &fa,
                    y,
                    s * FRAG_K,
                    0usize,
                    acc,
                    gi * nt,
                    bv,
                    ldv,
                    st.vector,
                );
            }
        }
    }
}

/// `acc += A · B` for the `A` fragment `fa` (16 rows) and `B` rows `k0 .. k0 + 16`, columns
/// `col0 .. col0 + width` of a padded tile (`ld` entries a row, in vectors of `vector`): `width /
/// 8` accumulator tiles from tile `t0` on.
#[cube]
#[allow(clippy::too_many_arguments)]
fn times_rows<F: Float, NT: Size, NA: Size, NB: Size, NC: Size>(
    fa: &Array<Vector<F, NA>>,
    b: &SharedMemory<Vector<F, NT>>,
    k0: usize,
    col0: usize,
    acc: &mut Array<Vector<f32, NC>>,
    t0: usize,
    #[comptime] width: usize,
    #[comptime] ld: usize,
    #[comptime] vector: usize,
) {
    #[unroll]
    for j in 0..comptime!(width / FRAG_K) {
        let r = ldm4::<F, NT, NB>(b, k0, col0 + j * FRAG_K, ld, vector, false, true);
        mma_acc::<F, NA, NB, NC>(fa, &half_of::<F, NB>(&r, 0usize), acc, t0 + 2 * j);
        mma_acc::<F, NA, NB, NC>(fa, &half_of::<F, NB>(&r, 1usize), acc, t0 + 2 * j + 1);
    }
}

/// `acc += X · S` for this plane's piece: rows `16 orow ..` of the staged `C × kp` tile `x` times
/// the rounded state (or gradient) `sh`, columns `ocol .. ocol + ow` (`q̃ S`, `k̃ G`).
#[cube]
fn rows_times_state<F: Float, N: Size, NA: Size, NB: Size, NC: Size>(
    x: &SharedMemory<Vector<F, N>>,
    sh: &SharedMemory<Vector<F, NA>>,
    orow: usize,
    ocol: usize,
    acc: &mut Array<Vector<f32, NC>>,
    #[comptime] l: GlaFragLayout,
) {
    let st = l.staging;
    let (ldk, ldv) = comptime!((l.kp + st.ph, l.bv + st.ph));
    #[unroll]
    for s in 0..comptime!(l.kp / FRAG_K) {
        let fa = ldm4::<F, N, NA>(x, orow * FRAG_M, s * FRAG_K, ldk, st.vector, false, false);
        times_rows::<F, NA, NA, NB, NC>(&fa, sh, s * FRAG_K, ocol, acc, 0usize, l.ow, ldv, 2usize);
    }
}

/// `X Sᵀ` over the chunk (`C × kp`, `X` the staged `C × bv` tile, `S` the rounded state or
/// gradient) in 16 × 16 pieces shared round-robin by the planes, stored in `f32` (rows below
/// `cl`, keys below `K`, token `tok0 + r`, from `offset` on), entry `(r, j)` times
/// `factor · exp(Λ_rj)` (`dq`'s state term from `dO Sᵀ`) or, `from_end`, times
/// `factor · exp(Λ_{C−1,j} − Λ_rj)` (`dk`'s from `V Gᵀ`).
#[cube]
#[allow(clippy::too_many_arguments)]
fn state_t_pieces<F: Float, N: Size, NA: Size, NB: Size, NC: Size>(
    x: &SharedMemory<Vector<F, N>>,
    sh: &SharedMemory<Vector<F, NA>>,
    lam: &SharedMemory<f32>,
    dst: &mut Array<f32>,
    offset: usize,
    tok0: usize,
    cl: usize,
    h: usize,
    factor: f32,
    #[comptime] from_end: bool,
    #[comptime] l: GlaFragLayout,
) {
    let (g, t) = lane_gt();
    let plane = UNIT_POS_Y as usize;
    let (rgs, kgroups) = comptime!((l.chunk / FRAG_M, l.kp / FRAG_K));
    let ldl = comptime!(l.kp + PAD_F);
    let last = comptime!((l.chunk - 1) * (l.kp + PAD_F));
    #[unroll]
    for pi in 0..comptime!((rgs * kgroups).div_ceil(l.planes)) {
        let piece = plane + pi * comptime!(l.planes);
        if piece < comptime!(rgs * kgroups) {
            let prow = piece % rgs;
            let pcol = piece / rgs;
            let acc = piece_times_state_t::<F, N, NA, NB, NC>(x, sh, prow, pcol, l);
            #[unroll]
            for half in 0..2usize {
                let row = prow * FRAG_M + g + half * 8;
                if row < cl {
                    let at = offset + ((tok0 + row) * l.heads + h) * l.k;
                    #[unroll]
                    for j in 0..2usize {
                        let y = acc[j * 2 + half];
                        #[unroll]
                        for e in 0..2usize {
                            let key = pcol * FRAG_K + j * FRAG_N + 2 * t + e;
                            if key < l.k {
                                let mut ex = lam[row * ldl + key];
                                if comptime!(from_end) {
                                    ex = lam[last + key] - ex;
                                }
                                dst[at + key] = y[e] * factor * exp_le0(ex);
                            }
                        }
                    }
                }
            }
        }
    }
}

/// One 16 × 16 piece of `X Sᵀ` (`V Gᵀ` for `dk`, `dO Sᵀ` for `dq`): rows `16 prow ..` of the
/// staged `C × bv` tile `x` times keys `16 pcol ..` of the rounded state (or gradient) `sh`, read
/// with rows and columns exchanged (`B = Sᵀ`), over the block's `bv` columns.
#[cube]
fn piece_times_state_t<F: Float, N: Size, NA: Size, NB: Size, NC: Size>(
    x: &SharedMemory<Vector<F, N>>,
    sh: &SharedMemory<Vector<F, NA>>,
    prow: usize,
    pcol: usize,
    #[comptime] l: GlaFragLayout,
) -> Array<Vector<f32, NC>> {
    let st = l.staging;
    let ldv = comptime!(l.bv + st.ph);
    let mut acc = zeros::<NC>(2usize);
    #[unroll]
    for s in 0..comptime!(l.bv / FRAG_K) {
        let fa = ldm4::<F, N, NA>(x, prow * FRAG_M, s * FRAG_K, ldv, st.vector, false, false);
        let r = ldm4::<F, NA, NB>(sh, pcol * FRAG_K, s * FRAG_K, ldv, 2usize, true, false);
        mma_acc::<F, NA, NB, NC>(&fa, &half_of::<F, NB>(&r, 0usize), &mut acc, 0usize);
        mma_acc::<F, NA, NB, NC>(&fa, &half_of::<F, NB>(&r, 1usize), &mut acc, 1usize);
    }
    acc
}

/// Fetches a chunk's `q`, `k`, `v` (columns `v0 ..`), scores and `Λ` (rows `p0 ..` of the
/// sequence at `bos`, `cl` of them) into this unit's registers, for [`put_chunk`].
#[cube]
#[allow(clippy::too_many_arguments)]
fn fetch_chunk<F: Float, N: Size>(
    q: &Array<Vector<F, N>>,
    k: &Array<Vector<F, N>>,
    v: &Array<Vector<F, N>>,
    a: &Array<Vector<F, N>>,
    gates_cum: &Array<f32>,
    rq: &mut Array<Vector<F, N>>,
    rk: &mut Array<Vector<F, N>>,
    rv: &mut Array<Vector<F, N>>,
    ra: &mut Array<Vector<F, N>>,
    rl: &mut Array<f32>,
    bos: usize,
    p0: usize,
    cl: usize,
    h: usize,
    v0: usize,
    #[comptime] l: GlaFragLayout,
) {
    let st = l.staging;
    let (c, kp, bv) = comptime!((l.chunk, l.kp, l.bv));
    let r0 = bos + p0;
    fetch_slots::<F, N>(q, rq, r0, cl, h, 0usize, l.heads, l.k, c, kp, st);
    fetch_slots::<F, N>(k, rk, r0, cl, h, 0usize, l.heads, l.k, c, kp, st);
    fetch_slots::<F, N>(v, rv, r0, cl, h, v0, l.heads, l.v, c, bv, st);
    fetch_slots::<F, N>(a, ra, r0, cl, h, 0usize, l.heads, c, c, c, st);
    fetch_gates(gates_cum, rl, bos, p0, cl, h, l);
}

/// Writes what [`fetch_chunk`] fetched into the tiles.
#[cube]
#[allow(clippy::too_many_arguments)]
fn put_chunk<F: Float, N: Size>(
    rq: &Array<Vector<F, N>>,
    rk: &Array<Vector<F, N>>,
    rv: &Array<Vector<F, N>>,
    ra: &Array<Vector<F, N>>,
    rl: &Array<f32>,
    sq: &mut SharedMemory<Vector<F, N>>,
    sk: &mut SharedMemory<Vector<F, N>>,
    sv: &mut SharedMemory<Vector<F, N>>,
    sa: &mut SharedMemory<Vector<F, N>>,
    slam: &mut SharedMemory<f32>,
    #[comptime] l: GlaFragLayout,
) {
    let st = l.staging;
    let (c, kp, bv) = comptime!((l.chunk, l.kp, l.bv));
    put_slots::<F, N>(rq, sq, c, kp, st);
    put_slots::<F, N>(rk, sk, c, kp, st);
    put_slots::<F, N>(rv, sv, c, bv, st);
    put_slots::<F, N>(ra, sa, c, c, st);
    put_gates(rl, slam, l);
}

/// Forward, vector gates: `o` and, when asked, `ht`. Cubes `(value block, head, sequence)` of
/// `(32, planes)` units. `a` holds the in-chunk scores and `gates_cum` the gates cumulated from
/// each chunk's start, both from [`super::tiled::vector_scores_kernel`] at the same chunk.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn gla_fwd_frag_kernel<F: Float, N: Size>(
    q: &Array<Vector<F, N>>,
    k: &Array<Vector<F, N>>,
    v: &Array<Vector<F, N>>,
    a: &Array<Vector<F, N>>,
    gates_cum: &Array<f32>,
    h0: &mut Array<f32>,
    cu_seqlens: &Array<u32>,
    o: &mut Array<F>,
    ht: &mut Array<f32>,
    seq_len: u32,
    scale: f32,
    #[comptime] l: GlaFragLayout,
    #[define(F)] _dtype: StorageType,
) {
    let st = l.staging;
    let (c, kp, bv) = comptime!((l.chunk, l.kp, l.bv));
    let (ldv, ldc) = comptime!((bv + st.ph, c + st.ph));
    let (rgs, nt) = comptime!((c / FRAG_M, bv / FRAG_N));
    let (vb, h, bos, len, base) = walk_place(cu_seqlens, seq_len, l);
    let v0 = vb * bv;
    let def = MmaDefinition::<F, F, f32>::new(FRAG_M, FRAG_N, FRAG_K);
    let size!(NA) = def.vector_size(MatrixIdent::A);
    let size!(NB) = def.vector_size(MatrixIdent::B);
    let size!(NC) = def.vector_size(MatrixIdent::Accumulator);
    let plane = UNIT_POS_Y as usize;

    let mut sq = tile_slots::<F, N>(c, kp, st);
    let mut sk = tile_slots::<F, N>(c, kp, st);
    let mut sv = tile_slots::<F, N>(c, bv, st);
    let mut sa = tile_slots::<F, N>(c, c, st);
    let mut slam = SharedMemory::<f32>::new(comptime!(c * (kp + PAD_F)));
    // The state rounded to the input dtype, written in pairs from the accumulators.
    let mut ssh = SharedMemory::<Vector<F, NA>>::new_aligned(comptime!(kp * ldv / 2), 64usize);

    // This plane's state rows, `groups_per_plane` groups of 16 × bv.
    let mut sacc = zeros::<NC>(comptime!(l.groups_per_plane() * nt));
    if comptime!(l.has_h0) {
        state_io::<NC>(&mut sacc, h0, base, v0, true, l);
    }
    // This plane's output piece: rows `16 · orow ..`, columns `ocol ..` of the block.
    let orow = plane % rgs;
    let ocol = (plane / rgs) * l.ow;

    let mut rq = Array::<Vector<F, N>>::new(comptime!(slots_per_unit(c, kp, &st)));
    let mut rk = Array::<Vector<F, N>>::new(comptime!(slots_per_unit(c, kp, &st)));
    let mut rv = Array::<Vector<F, N>>::new(comptime!(slots_per_unit(c, bv, &st)));
    let mut ra = Array::<Vector<F, N>>::new(comptime!(slots_per_unit(c, c, &st)));
    let mut rl = Array::<f32>::new(comptime!(gate_entries(&l)));
    let chunks = len.div_ceil(c);
    if chunks > 0 {
        let cl = chunk_len(len, 0, c);
        fetch_chunk::<F, N>(
            q, k, v, a, gates_cum, &mut rq, &mut rk, &mut rv, &mut ra, &mut rl, bos, 0, cl, h, v0,
            l,
        );
    }
    for ci in 0..chunks {
        let p0 = ci * c;
        let cl = chunk_len(len, p0, c);
        // Every plane is done with the previous chunk's tiles.
        sync_cube();
        put_chunk::<F, N>(
            &rq, &rk, &rv, &ra, &rl, &mut sq, &mut sk, &mut sv, &mut sa, &mut slam, l,
        );
        if ci + 1 < chunks {
            let p1 = p0 + c;
            let cl1 = chunk_len(len, p1, c);
            fetch_chunk::<F, N>(
                q, k, v, a, gates_cum, &mut rq, &mut rk, &mut rv, &mut ra, &mut rl, bos, p1, cl1,
                h, v0, l,
            );
        }
        // The state's rounded copy, each plane its rows.
        round_rows::<F, NA, NC>(&sacc, &mut ssh, ldv, l);
        sync_cube();
        scale_by_gates::<F, N>(&mut sq, &slam, scale, false, l);
        scale_by_gates::<F, N>(&mut sk, &slam, 1.0f32, true, l);
        sync_cube();

        // O = q̃ S + A V for this plane's piece (the scores are 0 above the diagonal).
        let mut oacc = zeros::<NC>(comptime!(l.ow / FRAG_N));
        rows_times_state::<F, N, NA, NB, NC>(&sq, &ssh, orow, ocol, &mut oacc, l);
        #[unroll]
        for s in 0..rgs {
            if s <= orow {
                let fa =
                    ldm4::<F, N, NA>(&sa, orow * FRAG_M, s * FRAG_K, ldc, st.vector, false, false);
                times_rows::<F, N, NA, NB, NC>(
                    &fa,
                    &sv,
                    s * FRAG_K,
                    ocol,
                    &mut oacc,
                    0usize,
                    l.ow,
                    ldv,
                    st.vector,
                );
            }
        }
        // This plane's piece: rows `16 orow ..`, block columns `ocol ..`, `ow` of them.
        let (r0, c0) = (orow * FRAG_M, v0 + ocol);
        store_acc::<F, NC>(
            &oacc,
            o,
            bos + p0,
            r0,
            cl,
            h,
            c0,
            1.0f32,
            1.0f32,
            false,
            l.heads,
            l.v,
            l.ow,
        );

        // S ← diag(exp(Λ_C)) S + k̃ᵀ V, each plane its rows (needed after the last chunk only
        // as `ht`; uniform over the cube).
        let mut update = ci + 1 < chunks;
        if comptime!(l.has_ht) {
            update = true;
        }
        if update {
            update_rows::<F, N, NA, NB, NC>(&mut sacc, &slam, &sk, &sv, l);
        }
    }
    if comptime!(l.has_ht) {
        state_io::<NC>(&mut sacc, ht, base, v0, false, l);
    }
}

/// Shared memory of the `dk`/`dv` walk: `q̃`, `k̃` (`C × kp`), `v`, `d_o` (`C × bv`), the scores
/// (`C × C`), `Λ` (`C × kp`, `f32`) and the state gradient's rounded copy (`kp × bv`).
pub fn gla_frag_dkv_smem(l: &GlaFragLayout, e: usize) -> usize {
    gla_frag_fwd_smem(l, e) + tile_bytes(l.chunk, l.bv, e)
}

/// Backward under vector gates, walking the chunks backwards from `dhT` with the state's gradient
/// `G[kp, bv]` in accumulator registers: `dv`, this value block's partial of `dk` (the state's
/// term, `exp(Λ_C − Λ_s) ∘ (V Gᵀ)`, `f32` into `dk_part` from `vb · dk_len` on; the in-chunk
/// term is the `dq` walk's) and `dh0`, as [`super::tiled::tiled_dkv_kernel`] computes them:
/// - `dV = Aᵀ dO + k̃ G`, each plane a 16-row, `ow`-column piece (only the score blocks on or
///   below the diagonal);
/// - `dK` in 16 × 16 pieces shared round-robin by the planes;
/// - `G ← diag(exp(Λ_C)) G + q̃ᵀ dO`.
///
/// Cubes `(value block, head, sequence)` of `(32, planes)` units.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn gla_dkv_frag_kernel<F: Float, N: Size>(
    q: &Array<Vector<F, N>>,
    k: &Array<Vector<F, N>>,
    v: &Array<Vector<F, N>>,
    a: &Array<Vector<F, N>>,
    gates_cum: &Array<f32>,
    cu_seqlens: &Array<u32>,
    d_o: &Array<Vector<F, N>>,
    d_ht: &mut Array<f32>,
    dk_part: &mut Array<f32>,
    dv: &mut Array<F>,
    dh0: &mut Array<f32>,
    seq_len: u32,
    dk_len: u32,
    scale: f32,
    #[comptime] l: GlaFragLayout,
    #[comptime] has_dht: bool,
    #[define(F)] _dtype: StorageType,
) {
    let st = l.staging;
    let (c, kp, bv) = comptime!((l.chunk, l.kp, l.bv));
    let (ldv, ldc) = comptime!((bv + st.ph, c + st.ph));
    let (rgs, nt) = comptime!((c / FRAG_M, bv / FRAG_N));
    let (vb, h, bos, len, base) = walk_place(cu_seqlens, seq_len, l);
    let v0 = vb * bv;
    let part = vb * dk_len as usize;
    let def = MmaDefinition::<F, F, f32>::new(FRAG_M, FRAG_N, FRAG_K);
    let size!(NA) = def.vector_size(MatrixIdent::A);
    let size!(NB) = def.vector_size(MatrixIdent::B);
    let size!(NC) = def.vector_size(MatrixIdent::Accumulator);
    let plane = UNIT_POS_Y as usize;

    let mut sq = tile_slots::<F, N>(c, kp, st);
    let mut sk = tile_slots::<F, N>(c, kp, st);
    let mut sv = tile_slots::<F, N>(c, bv, st);
    let mut sdo = tile_slots::<F, N>(c, bv, st);
    let mut sa = tile_slots::<F, N>(c, c, st);
    let mut slam = SharedMemory::<f32>::new(comptime!(c * (kp + PAD_F)));
    let mut sgh = SharedMemory::<Vector<F, NA>>::new_aligned(comptime!(kp * ldv / 2), 64usize);

    let mut gacc = zeros::<NC>(comptime!(l.groups_per_plane() * nt));
    if comptime!(has_dht) {
        state_io::<NC>(&mut gacc, d_ht, base, v0, true, l);
    }
    let orow = plane % rgs;
    let ocol = (plane / rgs) * l.ow;

    let mut rq = Array::<Vector<F, N>>::new(comptime!(slots_per_unit(c, kp, &st)));
    let mut rk = Array::<Vector<F, N>>::new(comptime!(slots_per_unit(c, kp, &st)));
    let mut rv = Array::<Vector<F, N>>::new(comptime!(slots_per_unit(c, bv, &st)));
    let mut rdo = Array::<Vector<F, N>>::new(comptime!(slots_per_unit(c, bv, &st)));
    let mut ra = Array::<Vector<F, N>>::new(comptime!(slots_per_unit(c, c, &st)));
    let mut rl = Array::<f32>::new(comptime!(gate_entries(&l)));
    let chunks = len.div_ceil(c);
    // The last chunk first: it holds the rest of the sequence.
    if chunks > 0 {
        let p0 = (chunks - 1) * c;
        let cl = chunk_len(len, p0, c);
        fetch_chunk::<F, N>(
            q, k, v, a, gates_cum, &mut rq, &mut rk, &mut rv, &mut ra, &mut rl, bos, p0, cl, h, v0,
            l,
        );
        fetch_slots::<F, N>(d_o, &mut rdo, bos + p0, cl, h, v0, l.heads, l.v, c, bv, st);
    }
    for cr in 0..chunks {
        let ci = chunks - 1 - cr;
        let p0 = ci * c;
        let cl = chunk_len(len, p0, c);
        sync_cube();
        put_chunk::<F, N>(
            &rq, &rk, &rv, &ra, &rl, &mut sq, &mut sk, &mut sv, &mut sa, &mut slam, l,
        );
        put_slots::<F, N>(&rdo, &mut sdo, c, bv, st);
        if ci > 0 {
            // Every chunk before the last is full.
            let p1 = p0 - c;
            fetch_chunk::<F, N>(
                q, k, v, a, gates_cum, &mut rq, &mut rk, &mut rv, &mut ra, &mut rl, bos, p1, c, h,
                v0, l,
            );
            fetch_slots::<F, N>(d_o, &mut rdo, bos + p1, c, h, v0, l.heads, l.v, c, bv, st);
        }
        round_rows::<F, NA, NC>(&gacc, &mut sgh, ldv, l);
        sync_cube();
        scale_by_gates::<F, N>(&mut sq, &slam, scale, false, l);
        scale_by_gates::<F, N>(&mut sk, &slam, 1.0f32, true, l);
        sync_cube();

        // dV = Aᵀ dO + k̃ G for this plane's piece (`Aᵀ` is 0 below its diagonal block).
        let mut vacc = zeros::<NC>(comptime!(l.ow / FRAG_N));
        #[unroll]
        for s in 0..rgs {
            if s >= orow {
                let fa =
                    ldm4::<F, N, NA>(&sa, s * FRAG_K, orow * FRAG_M, ldc, st.vector, true, true);
                times_rows::<F, N, NA, NB, NC>(
                    &fa,
                    &sdo,
                    s * FRAG_K,
                    ocol,
                    &mut vacc,
                    0usize,
                    l.ow,
                    ldv,
                    st.vector,
                );
            }
        }
        rows_times_state::<F, N, NA, NB, NC>(&sk, &sgh, orow, ocol, &mut vacc, l);
        let (r0, c0) = (orow * FRAG_M, v0 + ocol);
        store_acc::<F, NC>(
            &vacc,
            dv,
            bos + p0,
            r0,
            cl,
            h,
            c0,
            1.0f32,
            1.0f32,
            false,
            l.heads,
            l.v,
            l.ow,
        );

        // dK's state term, exp(Λ_C − Λ_s) ∘ (V Gᵀ).
        let tok0 = bos + p0;
        state_t_pieces::<F, N, NA, NB, NC>(
            &sv, &sgh, &slam, dk_part, part, tok0, cl, h, 1.0f32, true, l,
        );

        // G ← diag(exp(Λ_C)) G + q̃ᵀ dO (needed before the first chunk only as `dh0`; uniform
        // over the cube).
        let mut update = ci > 0;
        if comptime!(l.has_h0) {
            update = true;
        }
        if update {
            update_rows::<F, N, NA, NB, NC>(&mut gacc, &slam, &sq, &sdo, l);
        }
    }
    if comptime!(l.has_h0) {
        state_io::<NC>(&mut gacc, dh0, base, v0, false, l);
    }
}

/// Shared memory of the `dq` walk: `k̃` (`C × kp`), `v`, `d_o` (`C × bv`), `Λ` (`C × kp`,
/// `f32`) and the state's rounded copy (`kp × bv`).
pub fn gla_frag_dq_smem(l: &GlaFragLayout, e: usize) -> usize {
    tile_bytes(l.chunk, l.kp, e)
        + 2 * tile_bytes(l.chunk, l.bv, e)
        + tile_bytes(l.chunk, l.kp, 4)
        + tile_bytes(l.kp, l.bv, e)
}

/// Backward under vector gates, `dq`'s state term, walking the chunks forwards with this value
/// block's state `S[kp, bv]` in accumulator registers (the forward's recurrence,
/// `S ← diag(exp(Λ_C)) S + k̃ᵀ V`): `dq_r = scale · exp(Λ_r) ∘ (dO_r Sᵀ)` over the block's value
/// columns, in 16 × 16 pieces shared round-robin by the planes (`B = Sᵀ`: the rounded state read
/// with rows and columns exchanged), one `f32` partial per value block into `dq_part` from
/// `vb · dq_len` on. The in-chunk term is [`super::tiled::vector_grads_kernel`]'s partial.
///
/// Cubes `(value block, head, sequence)` of `(32, planes)` units.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn gla_dq_frag_kernel<F: Float, N: Size>(
    k: &Array<Vector<F, N>>,
    v: &Array<Vector<F, N>>,
    gates_cum: &Array<f32>,
    h0: &mut Array<f32>,
    cu_seqlens: &Array<u32>,
    d_o: &Array<Vector<F, N>>,
    dq_part: &mut Array<f32>,
    seq_len: u32,
    dq_len: u32,
    scale: f32,
    #[comptime] l: GlaFragLayout,
    #[define(F)] _dtype: StorageType,
) {
    let st = l.staging;
    let (c, kp, bv) = comptime!((l.chunk, l.kp, l.bv));
    let ldv = comptime!(bv + st.ph);
    let nt = comptime!(bv / FRAG_N);
    let (vb, h, bos, len, base) = walk_place(cu_seqlens, seq_len, l);
    let v0 = vb * bv;
    let part = vb * dq_len as usize;
    let def = MmaDefinition::<F, F, f32>::new(FRAG_M, FRAG_N, FRAG_K);
    let size!(NA) = def.vector_size(MatrixIdent::A);
    let size!(NB) = def.vector_size(MatrixIdent::B);
    let size!(NC) = def.vector_size(MatrixIdent::Accumulator);

    let mut sk = tile_slots::<F, N>(c, kp, st);
    let mut sv = tile_slots::<F, N>(c, bv, st);
    let mut sdo = tile_slots::<F, N>(c, bv, st);
    let mut slam = SharedMemory::<f32>::new(comptime!(c * (kp + PAD_F)));
    let mut ssh = SharedMemory::<Vector<F, NA>>::new_aligned(comptime!(kp * ldv / 2), 64usize);

    let mut sacc = zeros::<NC>(comptime!(l.groups_per_plane() * nt));
    if comptime!(l.has_h0) {
        state_io::<NC>(&mut sacc, h0, base, v0, true, l);
    }

    let mut rk = Array::<Vector<F, N>>::new(comptime!(slots_per_unit(c, kp, &st)));
    let mut rv = Array::<Vector<F, N>>::new(comptime!(slots_per_unit(c, bv, &st)));
    let mut rdo = Array::<Vector<F, N>>::new(comptime!(slots_per_unit(c, bv, &st)));
    let mut rl = Array::<f32>::new(comptime!(gate_entries(&l)));
    let chunks = len.div_ceil(c);
    if chunks > 0 {
        let cl = chunk_len(len, 0, c);
        fetch_slots::<F, N>(k, &mut rk, bos, cl, h, 0usize, l.heads, l.k, c, kp, st);
        fetch_slots::<F, N>(v, &mut rv, bos, cl, h, v0, l.heads, l.v, c, bv, st);
        fetch_slots::<F, N>(d_o, &mut rdo, bos, cl, h, v0, l.heads, l.v, c, bv, st);
        fetch_gates(gates_cum, &mut rl, bos, 0, cl, h, l);
    }
    for ci in 0..chunks {
        let p0 = ci * c;
        let cl = chunk_len(len, p0, c);
        // Every plane is done with the previous chunk's tiles.
        sync_cube();
        put_slots::<F, N>(&rk, &mut sk, c, kp, st);
        put_slots::<F, N>(&rv, &mut sv, c, bv, st);
        put_slots::<F, N>(&rdo, &mut sdo, c, bv, st);
        put_gates(&rl, &mut slam, l);
        if ci + 1 < chunks {
            let p1 = p0 + c;
            let cl1 = chunk_len(len, p1, c);
            let r1 = bos + p1;
            fetch_slots::<F, N>(k, &mut rk, r1, cl1, h, 0usize, l.heads, l.k, c, kp, st);
            fetch_slots::<F, N>(v, &mut rv, r1, cl1, h, v0, l.heads, l.v, c, bv, st);
            fetch_slots::<F, N>(d_o, &mut rdo, r1, cl1, h, v0, l.heads, l.v, c, bv, st);
            fetch_gates(gates_cum, &mut rl, bos, p1, cl1, h, l);
        }
        round_rows::<F, NA, NC>(&sacc, &mut ssh, ldv, l);
        sync_cube();

        // dQ's state term, scale · exp(Λ_r) ∘ (dO Sᵀ).
        let tok0 = bos + p0;
        state_t_pieces::<F, N, NA, NB, NC>(
            &sdo, &ssh, &slam, dq_part, part, tok0, cl, h, scale, false, l,
        );

        // S ← diag(exp(Λ_C)) S + k̃ᵀ V, each plane its rows (no chunk after the last needs it;
        // uniform over the cube).
        if ci + 1 < chunks {
            scale_by_gates::<F, N>(&mut sk, &slam, 1.0f32, true, l);
            sync_cube();
            update_rows::<F, N, NA, NB, NC>(&mut sacc, &slam, &sk, &sv, l);
        }
    }
}
