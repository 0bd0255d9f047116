//! The delta rule's chunkwise forward on tile products ([`crate::tile::mma`]: tensor cores where
//! the device has them), in two kernels:
//!
//! - the WY factors of every chunk at once, one cube per (chunk, value head): `K Kᵀ` as a tile
//!   product, `L_rs = β_r exp(Λ_r − Λ_s) k_r·k_s` (`s < r`), the inverse `T = (I + L)⁻¹` in `f32` (a unit lower-triangular
//!   `C × C` matrix: its 16 × 16 diagonal blocks by substitution, one unit per column, then the
//!   blocks below them by products, as FLA's `solve_tril` merges its blocks), then `W = T (β γ ∘ K)` and `Ũ = T (β ∘ V)` as tile products. `L`, `W`, `Ũ` are written in
//!   `f32`, the form the plain chunk kernels read, so the backward takes them too;
//! - the walk over a sequence's chunks with the state on chip: the gated family's tiled forward
//!   ([`crate::gated::tiled::tiled_fwd_kernel`]) with its values replaced by `U = Ũ − W S`.
//!
//! `T` is rounded to the input dtype for the products on tensor cores (FLA rounds its inverse the
//! same way); on the plain path everything stays `f32`.

#![allow(clippy::collapsible_if)]

use cubecl::prelude::*;
use cubecl::server::Handle;

use super::tiled_bwd::load_lam;
use super::DeltaProblem;
use crate::gated::chunk::place_of_chunk;
use crate::gated::launch::{array, is_cpu_vulkan};
use crate::gated::tiled::{
    fetch_tile, fwd_smem, nn, nt, stage_tile, tile_bytes, tile_f, tile_h, tile_regs,
    tiled_fwd_kernel, TiledLayout, PAD_F,
};
use crate::gated::tiled_launch::{cube_dim, has_cmma, tuning};
use crate::tile::{mma, TileConfig, FRAG, PLANE};

/// Levels of merging 16-row blocks into the chunk's inverse (`⌈log2(C / 16)⌉`).
fn merge_levels(c: usize) -> usize {
    let mut levels = 0;
    while FRAG << levels < c {
        levels += 1;
    }
    levels
}

/// Columns of the WY kernel's `f32` scratch tile: the wider of the factors `W`, `Ũ` and the
/// inverse's merge products (`m` columns, up to 32 for chunks past 32).
fn scratch_cols(l: &TiledLayout) -> usize {
    let merge = if l.chunk > 2 * FRAG { 2 * FRAG } else { FRAG };
    l.kp.max(l.vp).max(merge)
}

/// Shared-memory bytes of the WY kernel.
pub fn wy_smem(l: &TiledLayout, e: usize) -> usize {
    let (c, kp, vp) = (l.chunk, l.kp, l.vp);
    tile_bytes(c, kp, e)
        + tile_bytes(c, vp, e)
        + 2 * tile_bytes(c, c, 4)
        + tile_bytes(c, c, e)
        + tile_bytes(c, scratch_cols(l), 4)
        + 8 * c
}

/// The WY factors of one chunk (see the module header). Cubes `(chunk, value head)`.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn delta_wy_kernel<F: Float>(
    k: &Array<F>,
    v: &Array<F>,
    beta: &Array<F>,
    gc: &Array<f32>,
    chunks: &Array<u32>,
    cu_seqlens: &Array<u32>,
    lmat: &mut Array<f32>,
    tmat: &mut Array<f32>,
    w: &mut Array<f32>,
    ut: &mut Array<f32>,
    seq_len: u32,
    #[comptime] l: TiledLayout,
    #[comptime] write_t: bool,
    #[define(F)] _dtype: StorageType,
) {
    let (c, kp, vp) = comptime!((l.chunk, l.kp, l.vp));
    let xp = comptime!(scratch_cols(&l));
    let (kh, vh, ch) = comptime!((kp + l.ph, vp + l.ph, c + l.ph));
    let (cf, xf) = comptime!((c + PAD_F, xp + PAD_F));
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

    let mut sk = tile_h::<F>(c, kp, l);
    let mut sv = tile_h::<F>(c, vp, l);
    let mut sa = tile_f(c, c);
    let mut st = tile_f(c, c);
    let mut sth = tile_h::<F>(c, c, l);
    let mut sx = tile_f(c, xp);
    let mut bl = SharedMemory::<f32>::new(c);
    let mut lam = SharedMemory::<f32>::new(c);

    let mut rk = Array::<F>::new(comptime!(tile_regs(&l, kp)));
    fetch_tile::<F, F>(k, &mut rk, bos, len, p0, cl, hq, 0, l.k, kp, lq);
    stage_tile::<F>(&rk, &mut sk, kp, l);
    let mut rv = Array::<F>::new(comptime!(tile_regs(&l, vp)));
    fetch_tile::<F, F>(v, &mut rv, bos, len, p0, cl, hv, 0, l.v, vp, l);
    stage_tile::<F>(&rv, &mut sv, vp, l);
    // Rows past the chunk's end get β = 0: their rows of L, W and Ũ are zero. Their `Λ` repeats
    // the last row's (as `load_lam` gives it), so that every `exp(Λ_r − Λ_s)` (`s < r`) stays at
    // most 1: with 0 there, a strongly decaying partial chunk (`Λ_s` below about −88) made it
    // overflow, and `0 · inf` put NaN into rows the blocked inverse's products then carry.
    if unit < c {
        let mut b = 0.0f32;
        if unit < cl {
            b = f32::cast_from(beta[(bos + p0 + unit) * l.heads + hv]);
        }
        bl[unit] = b;
    }
    load_lam(gc, &mut lam, bos, p0, cl, hv, l);
    sync_cube();
    // K Kᵀ
    mma::<F, F>(
        &sk,
        0,
        &sk,
        0,
        &mut sa,
        0,
        comptime!(nt(c, c, kp, kh, kh, cf)),
        l.tile,
    );
    sync_cube();
    // L (strictly lower; written out for the backward) and T = I.
    #[unroll]
    for r in 0..comptime!((c * c).div_ceil(threads)) {
        let e = unit + r * threads;
        if e < c * c {
            let (row, col) = (e / c, e % c);
            let mut x = 0.0f32;
            if col < row {
                x = bl[row] * sa[row * cf + col];
                if comptime!(l.scalar_gate) {
                    x *= (lam[row] - lam[col]).exp();
                }
            }
            // Kept negated: every step of the inverse below multiplies by `−L`.
            sa[row * cf + col] = -x;
            let mut one = 0.0f32;
            if row == col {
                one = 1.0;
            }
            st[row * cf + col] = one;
            if row < cl {
                lmat[((bos + p0 + row) * l.heads + hv) * c + col] = x;
            }
        }
    }
    sync_cube();
    // T = (I + L)⁻¹, blocked: each 16 × 16 diagonal block by substitution, one unit per column
    // (a column of a unit lower-triangular inverse needs only itself: no barrier), then adjacent
    // blocks merged, 16 + 16 and 32 + 16 or 32 + 32, by `T_BA = T_BB (−L_BA) T_AA`. In `f32` on
    // plain products: the serial depth is ~120 + 4·48 multiply-adds and seven barriers, where
    // one row per step took 63 barriers and ~2,000 dependent multiply-adds.
    #[unroll]
    for q in 0..comptime!(c.div_ceil(threads)) {
        let col = unit + q * threads;
        if col < c {
            let block_end = (col / FRAG + 1) * FRAG;
            for r in col + 1..block_end {
                let mut acc = 0.0f32;
                for s in col..r {
                    acc += sa[r * cf + s] * st[s * cf + col];
                }
                st[r * cf + col] = acc;
            }
        }
    }
    sync_cube();
    let plain = comptime!(TileConfig {
        cmma: false,
        ..l.tile
    });
    #[unroll]
    for level in 0..comptime!(merge_levels(c)) {
        let m = comptime!(FRAG << level);
        // X = (−L_BA) T_AA for every pair (A, B) of adjacent blocks of m rows (B may be shorter
        // at the end of the chunk), into `sx`'s rows of B.
        #[unroll]
        for pair in 0..comptime!(c.div_ceil(2 * m)) {
            let (a0, b0) = comptime!((2 * m * pair, 2 * m * pair + m));
            if comptime!(b0 < c) {
                let mb = comptime!((c - b0).min(m));
                let s = comptime!(nn(mb, m, m, cf, cf, xf));
                mma::<f32, f32>(
                    &sa,
                    b0 * cf + a0,
                    &st,
                    a0 * cf + a0,
                    &mut sx,
                    b0 * xf,
                    s,
                    plain,
                );
            }
        }
        sync_cube();
        // T_BA = T_BB X, into `sa`'s block of `−L_BA` (no longer needed), then into `T`.
        #[unroll]
        for pair in 0..comptime!(c.div_ceil(2 * m)) {
            let (a0, b0) = comptime!((2 * m * pair, 2 * m * pair + m));
            if comptime!(b0 < c) {
                let mb = comptime!((c - b0).min(m));
                let s = comptime!(nn(mb, m, mb, cf, xf, cf));
                mma::<f32, f32>(
                    &st,
                    b0 * cf + b0,
                    &sx,
                    b0 * xf,
                    &mut sa,
                    b0 * cf + a0,
                    s,
                    plain,
                );
            }
        }
        sync_cube();
        #[unroll]
        for r in 0..comptime!((c * c).div_ceil(threads)) {
            let e = unit + r * threads;
            let (row, col) = (e / c, e % c);
            // Entry (row, col) lies in a block T_BA of this level when the blocks of 2m rows
            // hold both, and row is in the lower half and col in the upper.
            if row < c && row / (2 * m) == col / (2 * m) && (row / m) % 2 == 1 && (col / m) % 2 == 0
            {
                st[row * cf + col] = sa[row * cf + col];
            }
        }
        sync_cube();
    }
    // T in the products' dtype; β γ ∘ K and β ∘ V in place.
    #[unroll]
    for r in 0..comptime!((c * c).div_ceil(threads)) {
        let e = unit + r * threads;
        if e < c * c {
            let (row, col) = (e / c, e % c);
            let x = st[row * cf + col];
            sth[row * ch + col] = F::cast_from(x);
            if comptime!(write_t) {
                if row < cl {
                    tmat[((bos + p0 + row) * l.heads + hv) * c + col] = x;
                }
            }
        }
    }
    #[unroll]
    for r in 0..comptime!((c * kp).div_ceil(threads)) {
        let e = unit + r * threads;
        if e < c * kp {
            let row = e / kp;
            let i = row * kh + e % kp;
            let mut f = bl[row];
            if comptime!(l.scalar_gate) {
                f *= lam[row].exp();
            }
            sk[i] = F::cast_from(f32::cast_from(sk[i]) * f);
        }
    }
    #[unroll]
    for r in 0..comptime!((c * vp).div_ceil(threads)) {
        let e = unit + r * threads;
        if e < c * vp {
            let row = e / vp;
            let i = row * vh + e % vp;
            sv[i] = F::cast_from(f32::cast_from(sv[i]) * bl[row]);
        }
    }
    sync_cube();
    // W = T (β γ ∘ K)
    mma::<F, F>(
        &sth,
        0,
        &sk,
        0,
        &mut sx,
        0,
        comptime!(nn(c, kp, c, ch, kh, xf)),
        l.tile,
    );
    sync_cube();
    store_rows(&sx, w, bos, p0, cl, hv, l.k, kp, l);
    sync_cube();
    // Ũ = T (β ∘ V)
    mma::<F, F>(
        &sth,
        0,
        &sv,
        0,
        &mut sx,
        0,
        comptime!(nn(c, vp, c, ch, vh, xf)),
        l.tile,
    );
    sync_cube();
    store_rows(&sx, ut, bos, p0, cl, hv, l.v, vp, l);
}

/// Rows `< cl`, columns `< width` of the `f32` tile `sx` (leading dimension [`scratch_cols`] + 4)
/// into `[B·T, HV, width]`.
#[cube]
#[allow(clippy::too_many_arguments)]
fn store_rows(
    sx: &SharedMemory<f32>,
    dst: &mut Array<f32>,
    bos: usize,
    p0: usize,
    cl: usize,
    hv: usize,
    #[comptime] width: usize,
    #[comptime] cols: usize,
    #[comptime] l: TiledLayout,
) {
    let threads = comptime!(l.tile.threads());
    let xf = comptime!(scratch_cols(&l) + PAD_F);
    let unit = UNIT_POS as usize;
    #[unroll]
    for r in 0..comptime!((l.chunk * cols).div_ceil(threads)) {
        let e = unit + r * threads;
        let (row, col) = (e / cols, e % cols);
        if row < cl && col < width {
            dst[((bos + p0 + row) * l.heads + hv) * width + col] = sx[row * xf + col];
        }
    }
}

/// Whether a chunk-form call of `p` with chunk size `chunk` takes the tile-product kernels on
/// this device (true on a GPU at the default chunk; on lavapipe for chunks of 16 or 32 only).
pub fn delta_takes_tiles<R: Runtime>(
    client: &ComputeClient<R>,
    p: &DeltaProblem,
    chunk: usize,
) -> bool {
    delta_tiled_layout(client, p, chunk).is_some()
}

/// Whether a chunk-form call of `p` at the default chunk size runs all its tile products on
/// tensor cores on this device, forward and backward (each backward kernel falls back to plain
/// arithmetic where its tiles do not fit): where it does, the chunk form was measured the faster
/// one beyond one chunk (the automatic mode choice of the Burn op reads this).
pub fn delta_chunk_on_tensor_cores<R: Runtime>(
    client: &ComputeClient<R>,
    p: &DeltaProblem,
) -> bool {
    use super::tiled_bwd::{dqk_layout, dstate_layout, tail_layout};
    delta_tiled_layout(client, p, crate::gated::DEFAULT_CHUNK).is_some_and(|l| {
        l.tile.cmma
            && tail_layout(client, p, l).is_some()
            && dqk_layout(client, p, l).is_some()
            && dstate_layout(client, p, l).is_some()
    })
}

/// The tiled layout of a delta-rule forward with chunk size `chunk`, or `None` where it does not
/// apply (a chunk that is not a multiple of 16 up to 64, or shared memory too small for it: the
/// plain chunk kernels take those calls).
pub(crate) fn delta_tiled_layout<R: Runtime>(
    client: &ComputeClient<R>,
    p: &DeltaProblem,
    chunk: usize,
) -> Option<TiledLayout> {
    if chunk == 0
        || !chunk.is_multiple_of(FRAG)
        || chunk > 64
        || tuning("FLA_DELTA_TILED") == Some(0)
    {
        return None;
    }
    let props = client.properties();
    let max_smem = props.hardware.max_shared_memory_size;
    let max_units = props.hardware.max_units_per_cube as usize;
    let cpu = is_cpu_vulkan(client);
    // The WY kernel's solve keeps one unit per column busy (64 at most), but its three products
    // and its loads gain from more warps: on an H200 (B=8, H=16, K=V=128, bf16, T=4096) it took
    // 2.9 ms per call with 4 planes, 2.4 with 8, 1.75 with 16 and 3.1 with 32. The walks take
    // their own count ([`walk_layout`]). Fewer on lavapipe keep the unrolled code small.
    let planes = if cpu { 2 } else { 16 }.min(max_units / PLANE).max(2);
    let tile = TileConfig {
        cmma: has_cmma(client, p.dtype) && tuning("FLA_TILED_CMMA") != Some(0),
        planes: tuning("FLA_TILED_PLANES").unwrap_or(planes),
        unroll: cpu,
    };
    let elem = p.dtype.size();
    let base = TiledLayout {
        heads: p.v_heads,
        k: p.k_dim,
        v: p.v_dim,
        kp: p.k_dim.next_multiple_of(FRAG),
        vp: p.v_dim.next_multiple_of(FRAG),
        chunk,
        bv: FRAG,
        bk: FRAG,
        nb: FRAG,
        ph: 16 / elem,
        scalar_gate: p.gated,
        vector_gate: false,
        qk_heads: p.heads,
        delta: true,
        reverse: false,
        varlen: p.cu_seqlens.is_some(),
        has_h0: p.has_initial_state,
        has_ht: p.output_final_state,
        span: 0,
        states: false,
        tile,
    };
    if wy_smem(&base, elem) > max_smem {
        return None;
    }
    let bv_max = tuning("FLA_TILED_BV").unwrap_or(64);
    [64, 32, 16]
        .into_iter()
        .filter(|&bv| bv <= base.vp.min(bv_max).max(FRAG))
        .map(|bv| TiledLayout { bv, ..base })
        .find(|l| fwd_smem(l, elem) <= max_smem)
}

/// The WY factors of every chunk by the tile-product kernel: `L`, `W`, `Ũ` in `f32`, laid out as
/// the plain pair and solve kernels lay them out (the forward's [`tiled_walk`] and the plain
/// backward both read them), and into `tmat` when given the inverse `T = (I + L)⁻¹` (`f32`, laid
/// out as `L`) for the tiled backward's tail.
#[allow(clippy::too_many_arguments)]
pub(crate) fn tiled_wy<R: Runtime>(
    client: &ComputeClient<R>,
    p: &DeltaProblem,
    l: TiledLayout,
    (k, v, beta, gc): (&Handle, &Handle, &Handle, &Handle),
    (chunks, count): (&Handle, usize),
    (cu, cu_len): (&Handle, usize),
    tmat: Option<&Handle>,
) -> [Handle; 3] {
    let dummy = client.create_from_slice(f32::as_bytes(&[0.0]));
    let l = rolled(l);
    let (qk, vo, sc) = p.lens();
    let tokens = p.tokens() * p.v_heads;
    let lmat = client.empty(4 * (tokens * l.chunk).max(1));
    let w = client.empty(4 * (tokens * p.k_dim).max(1));
    let ut = client.empty(4 * (tokens * p.v_dim).max(1));
    if count > 0 {
        // Every access is guarded by the kernel's own conditions (rows in the chunk, columns in
        // K or V).
        unsafe {
            delta_wy_kernel::launch_unchecked::<R>(
                client,
                CubeCount::Static(count as u32, p.v_heads as u32, 1),
                cube_dim(&l),
                array(k, qk),
                array(v, vo),
                array(beta, sc),
                array(gc, if p.gated { sc } else { 1 }),
                array(chunks, 2 * count),
                array(cu, cu_len),
                array(&lmat, tokens * l.chunk),
                array(tmat.unwrap_or(&dummy), tokens * l.chunk),
                array(&w, tokens * p.k_dim),
                array(&ut, tokens * p.v_dim),
                p.seq_len as u32,
                l,
                tmat.is_some(),
                p.dtype.storage(),
            )
        };
    }
    [lmat, w, ut]
}

/// The walk's layout: 32 planes on a GPU, where one cube per sequence and value block walks all
/// chunks and its warps are what hides latency (the gated family's walk measured 2.4x faster with
/// 32 planes than with 8 on an H100; the delta rule's three walks 1.3-1.4x faster with 32 than
/// with 16 on an H200). `FLA_WALK_PLANES` overrides.
pub(super) fn walk_layout<R: Runtime>(client: &ComputeClient<R>, l: TiledLayout) -> TiledLayout {
    gpu_planes(client, l, 32, "FLA_WALK_PLANES")
}

/// The walks' grid: one cube per value block, value head and sequence (each walks all chunks of
/// its sequence with its state block on chip).
pub(super) fn walk_cubes(p: &DeltaProblem, l: &TiledLayout) -> CubeCount {
    CubeCount::Static(
        p.v_dim.div_ceil(l.bv) as u32,
        p.v_heads as u32,
        p.num_seqs() as u32,
    )
}

/// `l` with its loops left as loops: for the kernels that handle one chunk per cube, whose loop
/// iterations stay far below lavapipe's per-invocation limit. Unrolled, their code takes lavapipe
/// minutes to compile (each barrier is a coroutine suspension point over all that code).
pub(super) fn rolled(l: TiledLayout) -> TiledLayout {
    TiledLayout {
        tile: TileConfig {
            unroll: false,
            ..l.tile
        },
        ..l
    }
}

/// `l` with `planes` planes per cube on a GPU (`var` overrides; capped by the device), unchanged
/// on lavapipe, where fewer keep the unrolled code small.
pub(super) fn gpu_planes<R: Runtime>(
    client: &ComputeClient<R>,
    l: TiledLayout,
    planes: usize,
    var: &str,
) -> TiledLayout {
    if is_cpu_vulkan(client) {
        return l;
    }
    let max_units = client.properties().hardware.max_units_per_cube as usize;
    let planes = tuning(var).unwrap_or(planes).min(max_units / PLANE).max(2);
    TiledLayout {
        tile: TileConfig { planes, ..l.tile },
        ..l
    }
}

/// The walk: `o` and, when asked, `ht`, from the WY factors `W`, `Ũ` of [`tiled_wy`].
#[allow(clippy::too_many_arguments)]
pub(crate) fn tiled_walk<R: Runtime>(
    client: &ComputeClient<R>,
    p: &DeltaProblem,
    l: TiledLayout,
    (q, k, g, h0): (&Handle, &Handle, Option<&Handle>, Option<&Handle>),
    (w, ut): (&Handle, &Handle),
    (o, ht): (&Handle, Option<&Handle>),
    (cu, cu_len): (&Handle, usize),
) {
    let dummy = client.create_from_slice(f32::as_bytes(&[0.0]));
    let (qk, vo, sc) = p.lens();
    let tokens = p.tokens() * p.v_heads;
    let l = walk_layout(client, l);
    // Every access is guarded by the kernel's own conditions (rows in the sequence, columns
    // in K or V).
    unsafe {
        tiled_fwd_kernel::launch_unchecked::<R>(
            client,
            walk_cubes(p, &l),
            cube_dim(&l),
            array(q, qk),
            array(k, qk),
            array(&dummy, 1),
            array(&dummy, 1),
            array(w, tokens * p.k_dim),
            array(ut, tokens * p.v_dim),
            array(g.unwrap_or(&dummy), if p.gated { sc } else { 1 }),
            array(&dummy, 1),
            array(h0.unwrap_or(&dummy), p.state_len()),
            array(cu, cu_len),
            array(o, vo),
            array(ht.unwrap_or(&dummy), p.state_len()),
            array(&dummy, 1),
            p.seq_len as u32,
            1,
            p.scale,
            l,
            p.dtype.storage(),
        )
    };
}
