//! The delta rule's chunkwise backward on tile products ([`crate::tile::mma`]: tensor cores where
//! the device has them), three kernels after the forward's WY factors ([`super::tiled`]):
//!
//! - the states walk: the forward's walk without its output, storing the state entering each
//!   chunk and the chunk's corrected values `U = Ũ − W S` (`f32`), cubes `(value block, value
//!   head, sequence)`;
//! - the state-gradient walk, backwards from `dhT` with `G = ∂L/∂S_next` on chip, cubes as the
//!   states walk: stores `G` per chunk, forms the whole `dU = scale · (A ∘ D ∘ M)ᵀ dO + K̃ G` (with
//!   `A = Q Kᵀ` recomputed here, so the plain backward's `A` pairs and intra-chunk `dU` kernels
//!   are not needed), the chunk's share of `⟨G, S_next⟩` for the decay gradient, then
//!   `G ← γ_C G + (scale · γ ∘ Q)ᵀ dO − Wᵀ dU`; leaves `G` in `dh0`;
//! - `dq`, `dk⁻`, `dW` per (key block, chunk, value head) from the states and their gradients.
//!
//! The plain kernels of [`super::chunk`] do the rest (transposed solve, `dL`, `dk`/`dv`, `dβ`/`dg`)
//! on what these write, in the layouts the plain state passes write.

#![allow(clippy::collapsible_if)]

use cubecl::prelude::*;
use cubecl::server::Handle;

use super::tiled::{gpu_planes, rolled, walk_cubes, walk_layout};
use super::DeltaProblem;
use crate::gated::chunk::{chunk_len, place_of_chunk};
use crate::gated::launch::array;
use crate::gated::recurrent_fwd::{seq_length, seq_start};
use crate::gated::tiled::{
    accum, decay_state, fetch_tile, masked_decay, mma_state, nn, nt, round_state, scale_rows,
    stage_tile, state_io, store_tile, tile_bytes, tile_f, tile_h, tile_regs, tn, TiledLayout,
    PAD_F,
};
use crate::gated::tiled_launch::{cube_dim, tuning};
use crate::tile::{mma, put_tile, tile_entry};

/// `Λ` (the decays cumulated from the chunk start, precomputed in `gc`) of a chunk's rows; rows
/// past its end repeat the last (`Λ_C`), and it is 0 without a decay. Synchronise before reading.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(super) fn load_lam(
    gc: &Array<f32>,
    lam: &mut SharedMemory<f32>,
    bos: usize,
    p0: usize,
    cl: usize,
    hv: usize,
    #[comptime] l: TiledLayout,
) {
    let unit = UNIT_POS as usize;
    if unit < l.chunk {
        let mut g = 0.0f32;
        if comptime!(l.scalar_gate) {
            let mut row = unit;
            if row >= cl {
                row = cl - 1;
            }
            g = gc[(bos + p0 + row) * l.heads + hv];
        }
        lam[unit] = g;
    }
}

/// The states walk (see the module header; its tiles are a subset of the forward walk's, so the
/// forward's layout fits): `states[first + ci]` is the state entering chunk `ci`
/// of sequence `n` (`[chunks, HV, K, V]`), `u` is `U` (`[B·T, HV, V]`), both `f32`.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn delta_states_tiled_kernel<F: Float>(
    k: &Array<F>,
    w: &Array<f32>,
    ut: &Array<f32>,
    gc: &Array<f32>,
    h0: &mut Array<f32>,
    cu_seqlens: &Array<u32>,
    first_chunk: &Array<u32>,
    states: &mut Array<f32>,
    u: &mut Array<f32>,
    seq_len: u32,
    #[comptime] l: TiledLayout,
    #[define(F)] _dtype: StorageType,
) {
    let (c, kp, bv) = comptime!((l.chunk, l.kp, l.bv));
    let (kh, vh, vf) = comptime!((kp + l.ph, bv + l.ph, bv + PAD_F));
    let v0 = CUBE_POS_X as usize * bv;
    let hv = CUBE_POS_Y as usize;
    let n = CUBE_POS_Z as usize;
    let bos = seq_start(cu_seqlens, n, seq_len, l.varlen);
    let len = seq_length(cu_seqlens, n, seq_len, l.varlen);
    let first = first_chunk[n] as usize;
    let kv = comptime!(l.k * l.v);
    let lq = comptime!(TiledLayout {
        heads: l.qk_heads,
        ..l
    });
    let hq = hv / comptime!(l.heads / l.qk_heads);

    let mut sk = tile_h::<F>(c, kp, l);
    let mut sw = tile_h::<F>(c, kp, l);
    let mut sv = tile_h::<F>(c, bv, l);
    let mut so = tile_f(c, bv);
    let mut ss = tile_f(kp, bv);
    let mut ssh = tile_h::<F>(comptime!(if l.tile.cmma { kp } else { 1 }), bv, l);
    let mut lam = SharedMemory::<f32>::new(c);

    // Without h0 the slice is read from row K on: all outside, all zeros.
    let first_row = comptime!(if l.has_h0 { 0 } else { l.k });
    state_io(
        &mut ss,
        h0,
        (n * l.heads + hv) * kv,
        first_row,
        v0,
        kp,
        bv,
        true,
        l,
    );

    let mut rk = Array::<F>::new(comptime!(tile_regs(&l, kp)));
    let mut rw = Array::<F>::new(comptime!(tile_regs(&l, kp)));
    let mut ru = Array::<f32>::new(comptime!(tile_regs(&l, bv)));
    let chunks = len.div_ceil(c);
    let cl = chunk_len(len, 0, c);
    fetch_tile::<F, F>(k, &mut rk, bos, len, 0, cl, hq, 0, l.k, kp, lq);
    fetch_tile::<f32, F>(w, &mut rw, bos, len, 0, cl, hv, 0, l.k, kp, l);
    fetch_tile::<f32, f32>(ut, &mut ru, bos, len, 0, cl, hv, v0, l.v, bv, l);
    for ci in 0..chunks {
        let p0 = ci * c;
        let cl = chunk_len(len, p0, c);
        stage_tile::<F>(&rk, &mut sk, kp, l);
        stage_tile::<F>(&rw, &mut sw, kp, l);
        load_lam(gc, &mut lam, bos, p0, cl, hv, l);
        round_state::<F>(&ss, &mut ssh, kp, bv, l);
        state_io(
            &mut ss,
            states,
            ((first + ci) * l.heads + hv) * kv,
            0,
            v0,
            kp,
            bv,
            false,
            l,
        );
        sync_cube();
        // U = Ũ − W S, stored in f32 and rounded for the state update's product.
        let s = comptime!(nn(c, bv, kp, kh, 0, vf));
        mma_state::<F>(&sw, &ss, &ssh, 0, &mut so, 0, s, bv, l);
        sync_cube();
        #[unroll]
        for r in 0..comptime!(tile_regs(&l, bv)) {
            let (row, col) = tile_entry(r, bv, l.tile);
            if row < c {
                let x = ru[r] - so[row * vf + col];
                sv[row * vh + col] = F::cast_from(x);
                if row < cl && v0 + col < l.v {
                    u[((bos + p0 + row) * l.heads + hv) * l.v + v0 + col] = x;
                }
            }
        }
        if ci + 1 < chunks {
            let p1 = p0 + c;
            let cl1 = chunk_len(len, p1, c);
            fetch_tile::<F, F>(k, &mut rk, bos, len, p1, cl1, hq, 0, l.k, kp, lq);
            fetch_tile::<f32, F>(w, &mut rw, bos, len, p1, cl1, hv, 0, l.k, kp, l);
            fetch_tile::<f32, f32>(ut, &mut ru, bos, len, p1, cl1, hv, v0, l.v, bv, l);
        }
        scale_rows::<F>(&mut sk, &lam, 1.0f32, kp, true, l);
        decay_state(&mut ss, &lam, kp, bv, l);
        sync_cube();
        // S ← γ_C S + K̃ᵀ U
        let s = comptime!(accum(tn(kp, bv, c, kh, vh, vf)));
        mma::<F, F>(&sk, 0, &sv, 0, &mut ss, 0, s, l.tile);
        sync_cube();
    }
}

/// Shared-memory bytes of the state-gradient walk.
pub fn dstate_smem(l: &TiledLayout, e: usize) -> usize {
    let (c, kp, bv) = (l.chunk, l.kp, l.bv);
    let half_state = if l.tile.cmma {
        tile_bytes(kp, bv, e)
    } else {
        0
    };
    3 * tile_bytes(c, kp, e)
        + 2 * tile_bytes(c, bv, e)
        + tile_bytes(c, c, 4)
        + tile_bytes(c, c, e)
        + tile_bytes(c, bv, 4)
        + tile_bytes(kp, bv, 4)
        + half_state
        + 4 * (c + l.tile.threads())
}

/// The state-gradient walk (see the module header). Writes `d_states[first + ci]` (the gradient
/// of the state leaving chunk `ci`), the whole `du`, and for a decay `cterm[chunk, HV, V]`, the
/// per-column terms of `⟨G, S_next⟩ = γ_C ⟨G, S⟩ + ⟨K̃ G, U⟩` (`S` the state entering the chunk).
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn delta_dstate_tiled_kernel<F: Float>(
    q: &Array<F>,
    k: &Array<F>,
    d_o: &Array<F>,
    w: &Array<f32>,
    u: &Array<f32>,
    gc: &Array<f32>,
    states: &Array<f32>,
    d_ht: &mut Array<f32>,
    cu_seqlens: &Array<u32>,
    first_chunk: &Array<u32>,
    d_states: &mut Array<f32>,
    du: &mut Array<f32>,
    cterm: &mut Array<f32>,
    dh0: &mut Array<f32>,
    seq_len: u32,
    scale: f32,
    #[comptime] l: TiledLayout,
    #[comptime] has_dht: bool,
    #[define(F)] _dtype: StorageType,
) {
    let (c, kp, bv) = comptime!((l.chunk, l.kp, l.bv));
    let (kh, vh, ch) = comptime!((kp + l.ph, bv + l.ph, c + l.ph));
    let (vf, cf) = comptime!((bv + PAD_F, c + PAD_F));
    let threads = comptime!(l.tile.threads());
    let v0 = CUBE_POS_X as usize * bv;
    let hv = CUBE_POS_Y as usize;
    let n = CUBE_POS_Z as usize;
    let bos = seq_start(cu_seqlens, n, seq_len, l.varlen);
    let len = seq_length(cu_seqlens, n, seq_len, l.varlen);
    let first = first_chunk[n] as usize;
    let kv = comptime!(l.k * l.v);
    let lq = comptime!(TiledLayout {
        heads: l.qk_heads,
        ..l
    });
    let hq = hv / comptime!(l.heads / l.qk_heads);
    let unit = UNIT_POS as usize;

    let mut sq = tile_h::<F>(c, kp, l);
    let mut sk = tile_h::<F>(c, kp, l);
    let mut sw = tile_h::<F>(c, kp, l);
    let mut sdo = tile_h::<F>(c, bv, l);
    let mut sdh = tile_h::<F>(c, bv, l);
    let mut sa = tile_f(c, c);
    let mut sah = tile_h::<F>(c, c, l);
    let mut sdu = tile_f(c, bv);
    let mut sg = tile_f(kp, bv);
    let mut sgh = tile_h::<F>(comptime!(if l.tile.cmma { kp } else { 1 }), bv, l);
    let mut lam = SharedMemory::<f32>::new(c);
    let mut red = SharedMemory::<f32>::new(threads);

    let first_row = comptime!(if has_dht { 0 } else { l.k });
    state_io(
        &mut sg,
        d_ht,
        (n * l.heads + hv) * kv,
        first_row,
        v0,
        kp,
        bv,
        true,
        l,
    );

    let mut rq = Array::<F>::new(comptime!(tile_regs(&l, kp)));
    let mut rk = Array::<F>::new(comptime!(tile_regs(&l, kp)));
    let mut rw = Array::<F>::new(comptime!(tile_regs(&l, kp)));
    let mut rdo = Array::<F>::new(comptime!(tile_regs(&l, bv)));
    let chunks = len.div_ceil(c);
    // The last chunk first: it starts at (chunks − 1)·C and holds the rest.
    let mut plast = 0;
    if chunks > 0 {
        plast = (chunks - 1) * c;
    }
    let cl_last = len - plast;
    fetch_tile::<F, F>(q, &mut rq, bos, len, plast, cl_last, hq, 0, l.k, kp, lq);
    fetch_tile::<F, F>(k, &mut rk, bos, len, plast, cl_last, hq, 0, l.k, kp, lq);
    fetch_tile::<f32, F>(w, &mut rw, bos, len, plast, cl_last, hv, 0, l.k, kp, l);
    fetch_tile::<F, F>(d_o, &mut rdo, bos, len, plast, cl_last, hv, v0, l.v, bv, l);
    for cr in 0..chunks {
        let ci = chunks - 1 - cr;
        let p0 = ci * c;
        let cl = chunk_len(len, p0, c);
        let jc = first + ci;
        let base = (jc * l.heads + hv) * kv;
        stage_tile::<F>(&rq, &mut sq, kp, l);
        stage_tile::<F>(&rk, &mut sk, kp, l);
        stage_tile::<F>(&rw, &mut sw, kp, l);
        stage_tile::<F>(&rdo, &mut sdo, bv, l);
        load_lam(gc, &mut lam, bos, p0, cl, hv, l);
        round_state::<F>(&sg, &mut sgh, kp, bv, l);
        state_io(&mut sg, d_states, base, 0, v0, kp, bv, false, l);
        sync_cube();
        if cr + 1 < chunks {
            // Every chunk before the last is full.
            let p1 = p0 - c;
            fetch_tile::<F, F>(q, &mut rq, bos, len, p1, c, hq, 0, l.k, kp, lq);
            fetch_tile::<F, F>(k, &mut rk, bos, len, p1, c, hq, 0, l.k, kp, lq);
            fetch_tile::<f32, F>(w, &mut rw, bos, len, p1, c, hv, 0, l.k, kp, l);
            fetch_tile::<F, F>(d_o, &mut rdo, bos, len, p1, c, hv, v0, l.v, bv, l);
        }
        // A = Q Kᵀ
        mma::<F, F>(
            &sq,
            0,
            &sk,
            0,
            &mut sa,
            0,
            comptime!(nt(c, c, kp, kh, kh, cf)),
            l.tile,
        );
        sync_cube();
        masked_decay::<F>(&sa, &mut sah, &lam, scale, l);
        scale_rows::<F>(&mut sk, &lam, 1.0f32, kp, true, l);
        sync_cube();
        // dU = K̃ G first (alone, for the decay term), then + (scale · A ∘ D ∘ M)ᵀ dO.
        let s = comptime!(nn(c, bv, kp, kh, 0, vf));
        mma_state::<F>(&sk, &sg, &sgh, 0, &mut sdu, 0, s, bv, l);
        sync_cube();
        if comptime!(l.scalar_gate) {
            // This unit's column is the same in every entry it visits (`threads` is a multiple
            // of `bv`), so its partial sums belong to one column.
            let mut part = 0.0f32;
            #[unroll]
            for r in 0..comptime!((kp * bv).div_ceil(threads)) {
                let e = unit + r * threads;
                let (row, col) = (e / bv, e % bv);
                if row < l.k && v0 + col < l.v {
                    part += sg[row * vf + col] * states[base + row * l.v + v0 + col];
                }
            }
            part *= lam[comptime!(c - 1)].exp();
            #[unroll]
            for r in 0..comptime!((c * bv).div_ceil(threads)) {
                let e = unit + r * threads;
                let (row, col) = (e / bv, e % bv);
                if row < cl && v0 + col < l.v {
                    part +=
                        sdu[row * vf + col] * u[((bos + p0 + row) * l.heads + hv) * l.v + v0 + col];
                }
            }
            red[unit] = part;
            // Every unit has read `K̃ G` from `sdu` before the product below adds to it in place
            // (without this, a plane that finished its tile first changed entries a slower plane
            // had still to read: the decay term, and `dg`, came out wrong now and then on CUDA
            // under load).
            sync_cube();
        }
        let s = comptime!(accum(tn(c, bv, c, ch, vh, vf)));
        mma::<F, F>(&sah, 0, &sdo, 0, &mut sdu, 0, s, l.tile);
        sync_cube();
        if comptime!(l.scalar_gate) {
            if unit < bv && v0 + unit < l.v {
                let mut acc = 0.0f32;
                #[unroll]
                for m in 0..comptime!(threads / bv) {
                    acc += red[unit + m * bv];
                }
                cterm[(jc * l.heads + hv) * l.v + v0 + unit] = acc;
            }
        }
        store_tile::<f32>(&sdu, du, 0, bos, len, p0, cl, hv, v0, l.v, bv, l);
        // −dU in the products' dtype, q̃ = scale · γ ∘ Q, γ_C G.
        #[unroll]
        for r in 0..comptime!(tile_regs(&l, bv)) {
            let (row, col) = tile_entry(r, bv, l.tile);
            if row < c {
                sdh[row * vh + col] = F::cast_from(-sdu[row * vf + col]);
            }
        }
        scale_rows::<F>(&mut sq, &lam, scale, kp, false, l);
        decay_state(&mut sg, &lam, kp, bv, l);
        sync_cube();
        // G ← γ_C G + q̃ᵀ dO − Wᵀ dU
        let s = comptime!(accum(tn(kp, bv, c, kh, vh, vf)));
        mma::<F, F>(&sq, 0, &sdo, 0, &mut sg, 0, s, l.tile);
        sync_cube();
        mma::<F, F>(&sw, 0, &sdh, 0, &mut sg, 0, s, l.tile);
        sync_cube();
    }

    if comptime!(l.has_h0) {
        state_io(
            &mut sg,
            dh0,
            (n * l.heads + hv) * kv,
            0,
            v0,
            kp,
            bv,
            false,
            l,
        );
    }
}

/// Shared-memory bytes of the backward's `dq`/`dk⁻`/`dW` kernel with `l.bk` key rows per cube.
pub fn dqk_smem(l: &TiledLayout, e: usize) -> usize {
    let (c, bk, vp) = (l.chunk, l.bk, l.vp);
    let state_copy = if l.tile.cmma {
        tile_bytes(bk, vp, e)
    } else {
        0
    };
    tile_bytes(bk, vp, 4)
        + state_copy
        + 2 * tile_bytes(c, vp, e)
        + tile_bytes(c, bk, e)
        + tile_bytes(c, c, 4)
        + tile_bytes(c, c, e)
        + tile_bytes(c, bk, 4)
        + 4 * c
}

/// The backward's products with the per-chunk states, for key rows `k0 .. k0 + BK` of one chunk
/// and value head (cubes `(key block, chunk, value head)`), with `B = scale · (dO Uᵀ) ∘ D ∘ M`
/// (`D_rs = exp(Λ_r − Λ_s)`):
/// `dq = scale · γ ∘ (dO Sᵀ) + B K`, `dW = −dU Sᵀ` with `S` the state entering the chunk, and
/// `dk⁻ = exp(Λ_C − Λ) ∘ (U dS_Cᵀ) + Bᵀ Q` with `dS_C` the gradient of the state leaving it.
/// The plain kernels' `dq`/`dk⁻`/`dW` (per value head, `f32`) and their `dA` in one pass.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn delta_dqk_tiled_kernel<F: Float>(
    q: &Array<F>,
    k: &Array<F>,
    d_o: &Array<F>,
    u: &Array<f32>,
    du: &Array<f32>,
    gc: &Array<f32>,
    states: &mut Array<f32>,
    d_states: &mut Array<f32>,
    chunks: &Array<u32>,
    cu_seqlens: &Array<u32>,
    dq: &mut Array<f32>,
    dk_minus: &mut Array<f32>,
    dw: &mut Array<f32>,
    seq_len: u32,
    scale: f32,
    #[comptime] l: TiledLayout,
    #[define(F)] _dtype: StorageType,
) {
    let (c, bk, vp) = comptime!((l.chunk, l.bk, l.vp));
    let (bkh, vh, ch) = comptime!((bk + l.ph, vp + l.ph, c + l.ph));
    let (bkf, cf) = comptime!((bk + PAD_F, c + PAD_F));
    let k0 = CUBE_POS_X as usize * bk;
    let j = CUBE_POS_Y as usize;
    let hv = CUBE_POS_Z as usize;
    let (bos, len, p0, cl) = place_of_chunk(chunks, cu_seqlens, j, seq_len, c, l.varlen);
    let lq = comptime!(TiledLayout {
        heads: l.qk_heads,
        ..l
    });
    let hq = hv / comptime!(l.heads / l.qk_heads);
    let base = (j * l.heads + hv) * l.k * l.v;

    let mut ss = tile_f(bk, vp);
    let mut ssh = tile_h::<F>(comptime!(if l.tile.cmma { bk } else { 1 }), vp, l);
    let mut sx = tile_h::<F>(c, vp, l);
    let mut sy = tile_h::<F>(c, vp, l);
    let mut sk = tile_h::<F>(c, bk, l);
    let mut sa = tile_f(c, c);
    let mut sah = tile_h::<F>(c, c, l);
    let mut so = tile_f(c, bk);
    let mut lam = SharedMemory::<f32>::new(c);

    let mut rx = Array::<F>::new(comptime!(tile_regs(&l, vp)));
    let mut rk = Array::<F>::new(comptime!(tile_regs(&l, bk)));
    fetch_tile::<F, F>(d_o, &mut rx, bos, len, p0, cl, hv, 0, l.v, vp, l);
    stage_tile::<F>(&rx, &mut sx, vp, l);
    fetch_tile::<f32, F>(u, &mut rx, bos, len, p0, cl, hv, 0, l.v, vp, l);
    stage_tile::<F>(&rx, &mut sy, vp, l);
    fetch_tile::<F, F>(k, &mut rk, bos, len, p0, cl, hq, k0, l.k, bk, lq);
    stage_tile::<F>(&rk, &mut sk, bk, l);
    load_lam(gc, &mut lam, bos, p0, cl, hv, l);
    state_io(&mut ss, states, base, k0, 0, bk, vp, true, l);
    round_state::<F>(&ss, &mut ssh, bk, vp, l);
    sync_cube();
    // dO Uᵀ, then B = scale · (dO Uᵀ) ∘ D ∘ M and scale · γ ∘ dO in place.
    mma::<F, F>(
        &sx,
        0,
        &sy,
        0,
        &mut sa,
        0,
        comptime!(nt(c, c, vp, vh, vh, cf)),
        l.tile,
    );
    sync_cube();
    masked_decay::<F>(&sa, &mut sah, &lam, scale, l);
    scale_rows::<F>(&mut sx, &lam, scale, vp, false, l);
    sync_cube();
    // dq = B K + (scale · γ ∘ dO) Sᵀ
    mma::<F, F>(
        &sah,
        0,
        &sk,
        0,
        &mut so,
        0,
        comptime!(nn(c, bk, c, ch, bkh, bkf)),
        l.tile,
    );
    sync_cube();
    let s = comptime!(accum(nt(c, bk, vp, vh, 0, bkf)));
    mma_state::<F>(&sx, &ss, &ssh, 0, &mut so, 0, s, vp, l);
    sync_cube();
    store_tile::<f32>(&so, dq, 0, bos, len, p0, cl, hv, k0, l.k, bk, l);
    // dW = (−dU) Sᵀ
    fetch_tile::<f32, F>(du, &mut rx, bos, len, p0, cl, hv, 0, l.v, vp, l);
    #[unroll]
    for r in 0..comptime!(tile_regs(&l, vp)) {
        rx[r] = -rx[r];
    }
    stage_tile::<F>(&rx, &mut sx, vp, l);
    sync_cube();
    let s = comptime!(nt(c, bk, vp, vh, 0, bkf));
    mma_state::<F>(&sx, &ss, &ssh, 0, &mut so, 0, s, vp, l);
    sync_cube();
    store_tile::<f32>(&so, dw, 0, bos, len, p0, cl, hv, k0, l.k, bk, l);
    // dk⁻ = Bᵀ Q + (exp(Λ_C − Λ) ∘ U) dS_Cᵀ
    fetch_tile::<F, F>(q, &mut rk, bos, len, p0, cl, hq, k0, l.k, bk, lq);
    stage_tile::<F>(&rk, &mut sk, bk, l);
    scale_rows::<F>(&mut sy, &lam, 1.0f32, vp, true, l);
    state_io(&mut ss, d_states, base, k0, 0, bk, vp, true, l);
    round_state::<F>(&ss, &mut ssh, bk, vp, l);
    sync_cube();
    mma::<F, F>(
        &sah,
        0,
        &sk,
        0,
        &mut so,
        0,
        comptime!(tn(c, bk, c, ch, bkh, bkf)),
        l.tile,
    );
    sync_cube();
    let s = comptime!(accum(nt(c, bk, vp, vh, 0, bkf)));
    mma_state::<F>(&sy, &ss, &ssh, 0, &mut so, 0, s, vp, l);
    sync_cube();
    store_tile::<f32>(&so, dk_minus, 0, bos, len, p0, cl, hv, k0, l.k, bk, l);
}

/// Launches [`delta_states_tiled_kernel`]: the state entering every chunk (`[chunks, HV, K, V]`)
/// and `U` (`[B·T, HV, V]`), both `f32`, from the WY factors `W`, `Ũ`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn tiled_states<R: Runtime>(
    client: &ComputeClient<R>,
    p: &DeltaProblem,
    l: TiledLayout,
    (k, gc, h0): (&Handle, &Handle, Option<&Handle>),
    (w, ut): (&Handle, &Handle),
    (cu, cu_len, first): (&Handle, usize, &Handle),
    (states, states_len, u): (&Handle, usize, &Handle),
) {
    if p.num_seqs() == 0 {
        return;
    }
    let dummy = client.create_from_slice(f32::as_bytes(&[0.0]));
    let (qk, vo, sc) = p.lens();
    let tokens = p.tokens() * p.v_heads;
    let l = walk_layout(client, l);
    // Every access is guarded by the kernel's own conditions (rows in the sequence, columns in
    // K or V).
    unsafe {
        delta_states_tiled_kernel::launch_unchecked::<R>(
            client,
            walk_cubes(p, &l),
            cube_dim(&l),
            array(k, qk),
            array(w, tokens * p.k_dim),
            array(ut, tokens * p.v_dim),
            array(gc, if p.gated { sc } else { 1 }),
            array(h0.unwrap_or(&dummy), p.state_len().max(1)),
            array(cu, cu_len),
            array(first, p.num_seqs()),
            array(states, states_len.max(1)),
            array(u, vo),
            p.seq_len as u32,
            l,
            p.dtype.storage(),
        )
    };
}

/// The state-gradient walk's layout: the walk's planes, value blocks of 64/32/16 columns, the
/// largest that fits in shared memory and divides the cube's units (the decay term's column
/// sums rely on it); `FLA_DSTATE_BV` caps it. `None` where none fits.
pub(crate) fn dstate_layout<R: Runtime>(
    client: &ComputeClient<R>,
    p: &DeltaProblem,
    l: TiledLayout,
) -> Option<TiledLayout> {
    let l = walk_layout(client, l);
    let max_smem = client.properties().hardware.max_shared_memory_size;
    let elem = p.dtype.size();
    [64, 32, 16]
        .into_iter()
        .filter(|&bv| {
            bv <= l.vp.max(16)
                && l.tile.threads().is_multiple_of(bv)
                && tuning("FLA_DSTATE_BV").is_none_or(|t| bv <= t)
        })
        .map(|bv| TiledLayout { bv, ..l })
        .find(|l| dstate_smem(l, elem) <= max_smem)
}

/// Launches [`delta_dstate_tiled_kernel`]: `d_states` (`[chunks, HV, K, V]`), the whole `du`
/// (`[B·T, HV, V]`), `cterm` (`[chunks, HV, V]`, with a decay) and `dh0`, all `f32`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn tiled_dstate<R: Runtime>(
    client: &ComputeClient<R>,
    p: &DeltaProblem,
    l: TiledLayout,
    (q, k, d_o, gc): (&Handle, &Handle, &Handle, &Handle),
    (w, u, states, states_len): (&Handle, &Handle, &Handle, usize),
    (d_ht, dh0): (Option<&Handle>, Option<&Handle>),
    (cu, cu_len, first): (&Handle, usize, &Handle),
    (d_states, du, cterm, cterm_len): (&Handle, &Handle, &Handle, usize),
) {
    if p.num_seqs() == 0 {
        return;
    }
    let dummy = client.create_from_slice(f32::as_bytes(&[0.0]));
    let (qk, vo, sc) = p.lens();
    let tokens = p.tokens() * p.v_heads;
    let l = TiledLayout {
        has_h0: dh0.is_some(),
        ..l
    };
    // Every access is guarded by the kernel's own conditions (rows in the sequence, columns in
    // K or V).
    unsafe {
        delta_dstate_tiled_kernel::launch_unchecked::<R>(
            client,
            walk_cubes(p, &l),
            cube_dim(&l),
            array(q, qk),
            array(k, qk),
            array(d_o, vo),
            array(w, tokens * p.k_dim),
            array(u, vo),
            array(gc, if p.gated { sc } else { 1 }),
            array(states, states_len.max(1)),
            array(d_ht.unwrap_or(&dummy), p.state_len().max(1)),
            array(cu, cu_len),
            array(first, p.num_seqs()),
            array(d_states, states_len.max(1)),
            array(du, vo),
            array(cterm, cterm_len.max(1)),
            array(dh0.unwrap_or(&dummy), p.state_len().max(1)),
            p.seq_len as u32,
            p.scale,
            l,
            d_ht.is_some(),
            p.dtype.storage(),
        )
    };
}

/// The backward `dq`/`dk⁻`/`dW` kernel's layout: the forward's with key blocks of `bk` rows, the
/// largest of 64/32/16 whose tiles leave room for two cubes per multiprocessor (one where none
/// does), or `None` where even 16 rows do not fit (the plain kernels then take it).
pub(crate) fn dqk_layout<R: Runtime>(
    client: &ComputeClient<R>,
    p: &DeltaProblem,
    l: TiledLayout,
) -> Option<TiledLayout> {
    let max_smem = client.properties().hardware.max_shared_memory_size;
    let elem = p.dtype.size();
    // One cube per (key block, chunk, value head) and several dependent products per cube: the
    // warps hide the loads' latency (H200, T = 4096: 14.0 ms with 4 planes, 10.7 with 8, 6.4 with
    // 16, 4.8 with 32).
    let l = rolled(gpu_planes(client, l, 32, "FLA_DQK_PLANES"));
    let fits = |bk: usize, budget: usize| {
        let cand = TiledLayout { bk, ..l };
        (dqk_smem(&cand, elem) <= budget).then_some(cand)
    };
    let sizes = || {
        [64, 32, 16]
            .into_iter()
            .filter(|&bk| bk <= l.kp && tuning("FLA_DQK_BK").is_none_or(|t| bk <= t))
    };
    // Two cubes per multiprocessor by default; FLA_DQK_CUBES_PER_SM=1 lets 64-row key blocks in
    // (fewer cubes, each reading dO Uᵀ's operands half as often), for the sweep to weigh.
    let share = tuning("FLA_DQK_CUBES_PER_SM").unwrap_or(2).max(1);
    sizes()
        .find_map(|bk| fits(bk, max_smem / share))
        .or_else(|| sizes().find_map(|bk| fits(bk, max_smem)))
}

/// Launches [`delta_dqk_tiled_kernel`]: `dq` (per value head), `dk⁻`, `dW`, all `f32`
/// `[B·T, HV, K]`, from the per-chunk states and their gradients.
#[allow(clippy::too_many_arguments)]
pub(crate) fn tiled_dqk<R: Runtime>(
    client: &ComputeClient<R>,
    p: &DeltaProblem,
    l: TiledLayout,
    (q, k, d_o, gc): (&Handle, &Handle, &Handle, &Handle),
    (u, du, states, d_states): (&Handle, &Handle, &Handle, &Handle),
    (chunks, count): (&Handle, usize),
    (cu, cu_len): (&Handle, usize),
    (dq, dk_minus, dw): (&Handle, &Handle, &Handle),
) {
    if count == 0 {
        return;
    }
    let (qk, vo, sc) = p.lens();
    let per_k = p.tokens() * p.v_heads * p.k_dim;
    let states_len = count * p.v_heads * p.k_dim * p.v_dim;
    // Every access is guarded by the kernel's own conditions (rows in the chunk, columns in K
    // or V).
    unsafe {
        delta_dqk_tiled_kernel::launch_unchecked::<R>(
            client,
            CubeCount::Static(
                p.k_dim.div_ceil(l.bk) as u32,
                count as u32,
                p.v_heads as u32,
            ),
            cube_dim(&l),
            array(q, qk),
            array(k, qk),
            array(d_o, vo),
            array(u, vo),
            array(du, vo),
            array(gc, if p.gated { sc } else { 1 }),
            array(states, states_len),
            array(d_states, states_len),
            array(chunks, 2 * count),
            array(cu, cu_len),
            array(dq, per_k),
            array(dk_minus, per_k),
            array(dw, per_k),
            p.seq_len as u32,
            p.scale,
            l,
            p.dtype.storage(),
        )
    };
}

/// Shared-memory bytes of the tail kernel.
pub fn tail_smem(l: &TiledLayout, e: usize) -> usize {
    let (c, kp, vp) = (l.chunk, l.kp, l.vp);
    3 * tile_bytes(c, c, e)
        + tile_bytes(c, c, 4)
        + 2 * tile_bytes(c, kp, e)
        + 2 * tile_bytes(c, vp, e)
        + tile_bytes(c, kp, 4)
        + tile_bytes(c, kp.max(vp), 4)
        + 4 * (4 * c + 1)
}

/// The backward's tail, one cube per (chunk, value head), after the state passes and `dq`/`dk⁻`/
/// `dW`: with `T = (I + L)⁻¹` from the WY kernel,
/// - the transposed solve as products, `dR_W = Tᵀ dW`, `dR_U = Tᵀ dU`; `dv = β ∘ dR_U`;
/// - `dL = −(dR_W Wᵀ + dR_U Ũᵀ)` (strictly lower), `E = dL ∘ D`;
/// - `dkb = γ ∘ dR_W + E K` (the gradient through `β γ ∘ K` and `L`'s rows) and
///   `dk⁻ += (β ∘ E)ᵀ K` (through `L`'s columns); `dk⁻ + β ∘ dkb` is written over `dk⁻`, the
///   whole `dk` of this value head;
/// - `dβ_t = k_t · dkb_t + v_t · dR_U,t`, and `dg` as the plain scalars kernel forms it: `dΛ_t =
///   q_t · dq_t − k_t · dk⁻_t + β_t k_t · dkb_t`, cumulated from the chunk's end, plus the
///   chunk's `⟨dS_next, S_next⟩` (the sum of its `cterm` row) on every position.
///
/// It replaces the plain transposed solve, `dL` pairs, `dk`/`dv` and `dβ`/`dg` kernels.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn delta_tail_tiled_kernel<F: Float>(
    q: &Array<F>,
    k: &Array<F>,
    v: &Array<F>,
    beta: &Array<F>,
    gc: &Array<f32>,
    tmat: &Array<f32>,
    w: &Array<f32>,
    ut: &Array<f32>,
    dw: &Array<f32>,
    du: &Array<f32>,
    dq: &Array<f32>,
    cterm: &Array<f32>,
    chunks: &Array<u32>,
    cu_seqlens: &Array<u32>,
    dk_minus: &mut Array<f32>,
    dv: &mut Array<F>,
    dbeta: &mut Array<F>,
    dg: &mut Array<F>,
    seq_len: u32,
    #[comptime] l: TiledLayout,
    #[define(F)] _dtype: StorageType,
) {
    let (c, kp, vp) = comptime!((l.chunk, l.kp, l.vp));
    let xp = comptime!(kp.max(vp));
    let (kh, vh, ch) = comptime!((kp + l.ph, vp + l.ph, c + l.ph));
    let (kf, xf, cf) = comptime!((kp + PAD_F, xp + PAD_F, c + PAD_F));
    let threads = comptime!(l.tile.threads());
    let j = CUBE_POS_X as usize;
    let hv = CUBE_POS_Y as usize;
    let (bos, len, p0, cl) = place_of_chunk(chunks, cu_seqlens, j, seq_len, c, l.varlen);
    let lq = comptime!(TiledLayout {
        heads: l.qk_heads,
        ..l
    });
    let hq = hv / comptime!(l.heads / l.qk_heads);
    let unit = UNIT_POS as usize;

    let mut sth = tile_h::<F>(c, c, l);
    let mut se = tile_h::<F>(c, c, l);
    let mut seb = tile_h::<F>(c, c, l);
    let mut sl = tile_f(c, c);
    let mut sa = tile_h::<F>(c, kp, l);
    let mut sb = tile_h::<F>(c, kp, l);
    let mut sc = tile_h::<F>(c, vp, l);
    let mut sd = tile_h::<F>(c, vp, l);
    let mut sx = tile_f(c, kp);
    let mut sy = tile_f(c, xp);
    let mut bl = SharedMemory::<f32>::new(c);
    let mut lam = SharedMemory::<f32>::new(c);
    let mut vb = SharedMemory::<f32>::new(c);
    let mut dl = SharedMemory::<f32>::new(c);
    let mut ctot = SharedMemory::<f32>::new(1usize);

    // T, dW, dU, W, Ũ. Every fetch is staged before the next barrier: registers live across
    // barriers make lavapipe's compile of the kernel (a coroutine per invocation) very slow.
    let mut rc = Array::<F>::new(comptime!(tile_regs(&l, c)));
    let mut rk = Array::<F>::new(comptime!(tile_regs(&l, kp)));
    let mut rv = Array::<F>::new(comptime!(tile_regs(&l, vp)));
    fetch_tile::<f32, F>(tmat, &mut rc, bos, len, p0, cl, hv, 0, c, c, l);
    stage_tile::<F>(&rc, &mut sth, c, l);
    fetch_tile::<f32, F>(dw, &mut rk, bos, len, p0, cl, hv, 0, l.k, kp, l);
    stage_tile::<F>(&rk, &mut sa, kp, l);
    fetch_tile::<f32, F>(du, &mut rv, bos, len, p0, cl, hv, 0, l.v, vp, l);
    stage_tile::<F>(&rv, &mut sc, vp, l);
    fetch_tile::<f32, F>(w, &mut rk, bos, len, p0, cl, hv, 0, l.k, kp, l);
    stage_tile::<F>(&rk, &mut sb, kp, l);
    fetch_tile::<f32, F>(ut, &mut rv, bos, len, p0, cl, hv, 0, l.v, vp, l);
    stage_tile::<F>(&rv, &mut sd, vp, l);
    load_lam(gc, &mut lam, bos, p0, cl, hv, l);
    if unit < c {
        let mut b = 0.0f32;
        if unit < cl {
            b = f32::cast_from(beta[(bos + p0 + unit) * l.heads + hv]);
        }
        bl[unit] = b;
    }
    if unit == 0 {
        let mut acc = 0.0f32;
        if comptime!(l.scalar_gate) {
            let cb = (j * l.heads + hv) * l.v;
            for x in 0..l.v {
                acc += cterm[cb + x];
            }
        }
        ctot[0usize] = acc;
    }
    sync_cube();
    // dR_W = Tᵀ dW, dR_U = Tᵀ dU
    mma::<F, F>(
        &sth,
        0,
        &sa,
        0,
        &mut sx,
        0,
        comptime!(tn(c, kp, c, ch, kh, kf)),
        l.tile,
    );
    mma::<F, F>(
        &sth,
        0,
        &sc,
        0,
        &mut sy,
        0,
        comptime!(tn(c, vp, c, ch, vh, xf)),
        l.tile,
    );
    sync_cube();
    // dR_W and dR_U in the products' dtype; dkb starts as γ ∘ dR_W; dv = β ∘ dR_U.
    #[unroll]
    for r in 0..comptime!(tile_regs(&l, kp)) {
        let (row, col) = tile_entry(r, kp, l.tile);
        if row < c {
            let x = sx[row * kf + col];
            sa[row * kh + col] = F::cast_from(x);
            let mut f = 1.0f32;
            if comptime!(l.scalar_gate) {
                f = lam[row].exp();
            }
            sx[row * kf + col] = x * f;
        }
    }
    #[unroll]
    for r in 0..comptime!(tile_regs(&l, vp)) {
        let (row, col) = tile_entry(r, vp, l.tile);
        if row < c {
            let x = sy[row * xf + col];
            sc[row * vh + col] = F::cast_from(x);
            if row < cl && col < l.v {
                let at = ((bos + p0 + row) * l.heads + hv) * l.v + col;
                dv[at] = F::cast_from(bl[row] * x);
            }
        }
    }
    if unit < cl {
        // v_t · dR_U,t (read before dR_U's f32 tile is reused for dk⁻).
        let at = ((bos + p0 + unit) * l.heads + hv) * l.v;
        let mut acc = 0.0f32;
        for x in 0..l.v {
            acc += f32::cast_from(v[at + x]) * sy[unit * xf + x];
        }
        vb[unit] = acc;
    }
    sync_cube();
    // −dL = dR_W Wᵀ + dR_U Ũᵀ
    mma::<F, F>(
        &sa,
        0,
        &sb,
        0,
        &mut sl,
        0,
        comptime!(nt(c, c, kp, kh, kh, cf)),
        l.tile,
    );
    sync_cube();
    mma::<F, F>(
        &sc,
        0,
        &sd,
        0,
        &mut sl,
        0,
        comptime!(accum(nt(c, c, vp, vh, vh, cf))),
        l.tile,
    );
    sync_cube();
    // E = dL ∘ D (strictly lower) and β ∘ E; K over W; dk⁻ into the f32 tile.
    #[unroll]
    for r in 0..comptime!((c * c).div_ceil(threads)) {
        let e = unit + r * threads;
        if e < c * c {
            let (row, col) = (e / c, e % c);
            let mut x = 0.0f32;
            if col < row {
                x = -sl[row * cf + col];
                if comptime!(l.scalar_gate) {
                    x *= (lam[row] - lam[col]).exp();
                }
            }
            se[row * ch + col] = F::cast_from(x);
            seb[row * ch + col] = F::cast_from(bl[row] * x);
        }
    }
    fetch_tile::<F, F>(k, &mut rk, bos, len, p0, cl, hq, 0, l.k, kp, lq);
    stage_tile::<F>(&rk, &mut sb, kp, l);
    let mut rm = Array::<f32>::new(comptime!(tile_regs(&l, kp)));
    fetch_tile::<f32, f32>(dk_minus, &mut rm, bos, len, p0, cl, hv, 0, l.k, kp, l);
    put_tile::<f32>(&rm, &mut sy, c, kp, comptime!(xp - kp + PAD_F), l.tile);
    sync_cube();
    // dkb += E K, dk⁻ += (β ∘ E)ᵀ K
    mma::<F, F>(
        &se,
        0,
        &sb,
        0,
        &mut sx,
        0,
        comptime!(accum(nn(c, kp, c, ch, kh, kf))),
        l.tile,
    );
    mma::<F, F>(
        &seb,
        0,
        &sb,
        0,
        &mut sy,
        0,
        comptime!(accum(tn(c, kp, c, ch, kh, xf))),
        l.tile,
    );
    sync_cube();
    if unit < cl {
        let tok = bos + p0 + unit;
        let (qr, dr) = ((tok * l.qk_heads + hq) * l.k, (tok * l.heads + hv) * l.k);
        let mut kb = 0.0f32;
        let mut km = 0.0f32;
        let mut qd = 0.0f32;
        for i in 0..l.k {
            let ki = f32::cast_from(sb[unit * kh + i]);
            kb += ki * sx[unit * kf + i];
            km += ki * sy[unit * xf + i];
            qd += f32::cast_from(q[qr + i]) * dq[dr + i];
        }
        dbeta[tok * l.heads + hv] = F::cast_from(kb + vb[unit]);
        dl[unit] = qd - km + bl[unit] * kb;
    }
    // dk = dk⁻ + β ∘ dkb for this value head (the group's sum is formed after).
    #[unroll]
    for r in 0..comptime!(tile_regs(&l, kp)) {
        let (row, col) = tile_entry(r, kp, l.tile);
        if row < cl && col < l.k {
            let at = ((bos + p0 + row) * l.heads + hv) * l.k + col;
            dk_minus[at] = sy[row * xf + col] + bl[row] * sx[row * kf + col];
        }
    }
    if comptime!(l.scalar_gate) {
        sync_cube();
        if unit < cl {
            let mut run = ctot[0usize];
            for s in unit..cl {
                run += dl[s];
            }
            dg[(bos + p0 + unit) * l.heads + hv] = F::cast_from(run);
        }
    }
}

/// The tail kernel's layout (the WY kernel's), or `None` where its tiles do not fit in shared
/// memory (the plain kernels then take it).
pub(crate) fn tail_layout<R: Runtime>(
    client: &ComputeClient<R>,
    p: &DeltaProblem,
    l: TiledLayout,
) -> Option<TiledLayout> {
    let max_smem = client.properties().hardware.max_shared_memory_size;
    // One cube fills a multiprocessor's shared memory at K = V = 128: more warps hide latency
    // (H200, T = 4096: 7.9 ms with 4 planes, 4.2 with 8, 3.0 with 16, 2.9 with 32).
    let l = rolled(gpu_planes(client, l, 16, "FLA_TAIL_PLANES"));
    (tail_smem(&l, p.dtype.size()) <= max_smem && tuning("FLA_DELTA_TAIL") != Some(0)).then_some(l)
}

/// Launches [`delta_tail_tiled_kernel`]: `dv`, `dβ`, `dg` (with a decay) in the input dtype, and
/// over `dk_minus` the whole per-value-head `dk` in `f32`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn tiled_tail<R: Runtime>(
    client: &ComputeClient<R>,
    p: &DeltaProblem,
    l: TiledLayout,
    (q, k, v, beta, gc): (&Handle, &Handle, &Handle, &Handle, &Handle),
    (tmat, w, ut): (&Handle, &Handle, &Handle),
    (dw, du, dq, cterm, cterm_len): (&Handle, &Handle, &Handle, &Handle, usize),
    (chunks, count): (&Handle, usize),
    (cu, cu_len): (&Handle, usize),
    (dk_minus, dv, dbeta, dg): (&Handle, &Handle, &Handle, Option<&Handle>),
) {
    if count == 0 {
        return;
    }
    let dummy = client.create_from_slice(f32::as_bytes(&[0.0]));
    let (qk, vo, sc) = p.lens();
    let tokens = p.tokens() * p.v_heads;
    let per_k = tokens * p.k_dim;
    // Every access is guarded by the kernel's own conditions (rows in the chunk, columns in K
    // or V).
    unsafe {
        delta_tail_tiled_kernel::launch_unchecked::<R>(
            client,
            CubeCount::Static(count as u32, p.v_heads as u32, 1),
            cube_dim(&l),
            array(q, qk),
            array(k, qk),
            array(v, vo),
            array(beta, sc),
            array(gc, if p.gated { sc } else { 1 }),
            array(tmat, tokens * l.chunk),
            array(w, per_k),
            array(ut, vo),
            array(dw, per_k),
            array(du, vo),
            array(dq, per_k),
            array(cterm, cterm_len),
            array(chunks, 2 * count),
            array(cu, cu_len),
            array(dk_minus, per_k),
            array(dv, vo),
            array(dbeta, sc),
            array(dg.unwrap_or(&dummy), sc),
            p.seq_len as u32,
            l,
            p.dtype.storage(),
        )
    };
}
