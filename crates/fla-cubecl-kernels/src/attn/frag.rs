//! The attention kernels with their accumulators in registers, on CUDA's `mma.sync` tensor-core
//! instructions (m16n8k16, `f32` accumulators): forward, `dq`, and `dk`/`dv`.
//!
//! The kernels of [`super::kernels`] go through shared memory for every product: scores,
//! probabilities and accumulators are tiles that each block reads and writes again, which bounds
//! them far below the tensor cores. Here each plane (warp) owns 16 rows of the block its cube
//! keeps (query rows in the forward and `dq`, key rows in `dk`/`dv`) and holds their scores and
//! accumulators in registers through the whole loop over the other side's blocks. The softmax
//! and its gradient run on the score registers in place (a row's maximum and sum gathered across
//! the four lanes that hold it), and probabilities and score gradients become the `A` operand of
//! the next product without leaving the registers: the accumulators of two adjacent 8-column
//! tiles are laid out as one 16-column `A` fragment. Only the blocks of the loop pass through
//! shared memory, staged once per block for all planes.
//!
//! The register layout, the `ldmatrix` loads and the staging of tiles are [`crate::frag`]'s.
//!
//! CubeCL compiles manual MMA and `ldmatrix` only for CUDA (SPIR-V has no such instructions), so
//! Vulkan and lavapipe run the shared-memory kernels; both compute the same thing, and the
//! attention tests run these wherever the device has them.

#![allow(clippy::collapsible_if)]

use cubecl::cmma::{MatrixIdent, MmaDefinition};
use cubecl::prelude::*;

use crate::frag::{acc_times_rows, lane_gt, scores_step, scores_tiles, store_acc, zeros, Staging};
pub use crate::frag::{FRAG_K, FRAG_M, FRAG_N};

use super::kernels::{
    bounds, cap_grad, capped, h_bytes, key_offset, key_range, next_query_block, query_blocks, sees,
    AttnLayout,
};
use crate::gated::chunk::chunk_len;
use crate::tile::exp_le0;

/// Shared memory of the forward: the key block (also the query block, staged once before the
/// loop) and the value block.
pub fn frag_fwd_smem(l: &AttnLayout, e: usize) -> usize {
    let rows = l.bq.max(l.bk);
    h_bytes(rows, l.bd, l, e) + h_bytes(rows, l.bdv, l, e)
}

/// Shared memory of `dq`: as the forward's (queries and `d_o` pass through the key and value
/// tiles first).
pub fn frag_dq_smem(l: &AttnLayout, e: usize) -> usize {
    frag_fwd_smem(l, e)
}

/// Shared memory of `dk`/`dv`: the cube's key and value block, the loop's query and `d_o` block,
/// and its rows' log-sum-exp and `δ`.
pub fn frag_dkv_smem(l: &AttnLayout, e: usize) -> usize {
    h_bytes(l.bk, l.bd, l, e)
        + h_bytes(l.bk, l.bdv, l, e)
        + h_bytes(l.bq, l.bd, l, e)
        + h_bytes(l.bq, l.bdv, l, e)
        + 8 * l.bq
}

/// A row's value gathered over the four lanes of a quad (the lanes holding its columns).
#[cube]
fn quad_max(x: f32) -> f32 {
    let a = max(x, plane_shuffle_xor(x, 1u32));
    max(a, plane_shuffle_xor(a, 2u32))
}

#[cube]
fn quad_sum(x: f32) -> f32 {
    let a = x + plane_shuffle_xor(x, 1u32);
    a + plane_shuffle_xor(a, 2u32)
}

/// `exp(x)` for an exponent at most 0 wherever the result is kept: [`exp_le0`] (CUDA's
/// two-instruction form) with the layout's second round, the precise one without. The
/// backward's masked pairs (set to 0 after) can have exponents far above 0, so the fast form
/// takes `min(x, 0)`: it promises finite operands and results.
#[cube]
#[allow(unused_assignments)]
fn exp_kept(x: f32, #[comptime] l: AttnLayout) -> f32 {
    let mut y = f32::new(0.0);
    if comptime!(l.fast_paths) {
        y = exp_le0(min(x, 0.0f32));
    } else {
        y = x.exp();
    }
    y
}

/// How this layout's kernels stage tiles ([`crate::frag::Staging`]).
pub(super) fn staging(l: &AttnLayout) -> Staging {
    Staging {
        vector: l.vector,
        ph: l.ph,
        threads: l.tile.threads(),
    }
}

/// A padded tile of `rows × cols` input-dtype entries in slots of `l.vector`.
#[cube]
fn tile_v<F: Float, N: Size>(
    #[comptime] rows: usize,
    #[comptime] cols: usize,
    #[comptime] l: AttnLayout,
) -> SharedMemory<Vector<F, N>> {
    crate::frag::tile_slots::<F, N>(rows, cols, comptime!(staging(&l)))
}

/// Slots (vectors of `l.vector`) of a `rows × cols` tile that one unit stages.
pub(super) fn slots_per_unit(rows: usize, cols: usize, l: &AttnLayout) -> usize {
    crate::frag::slots_per_unit(rows, cols, &staging(l))
}

/// [`crate::frag::fetch_slots`] in this layout: rows `row0 ..` below `valid` of head `h`.
#[cube]
#[allow(clippy::too_many_arguments)]
fn fetch_v<F: Float, N: Size>(
    src: &Array<Vector<F, N>>,
    dst: &mut Array<Vector<F, N>>,
    row0: usize,
    valid: usize,
    h: usize,
    #[comptime] heads: usize,
    #[comptime] width: usize,
    #[comptime] rows: usize,
    #[comptime] cols: usize,
    #[comptime] l: AttnLayout,
) {
    crate::frag::fetch_slots::<F, N>(
        src,
        dst,
        row0,
        valid,
        h,
        0usize,
        heads,
        width,
        rows,
        cols,
        comptime!(staging(&l)),
    );
}

/// [`crate::frag::put_slots`] in this layout.
#[cube]
fn put_v<F: Float, N: Size>(
    src: &Array<Vector<F, N>>,
    dst: &mut SharedMemory<Vector<F, N>>,
    #[comptime] rows: usize,
    #[comptime] cols: usize,
    #[comptime] l: AttnLayout,
) {
    crate::frag::put_slots::<F, N>(src, dst, rows, cols, comptime!(staging(&l)));
}

/// [`crate::frag::stage_cast`] in this layout: a tile staged at once.
#[cube]
#[allow(clippy::too_many_arguments)]
fn stage_v<F: Float, N: Size>(
    src: &Array<Vector<F, N>>,
    dst: &mut SharedMemory<Vector<F, N>>,
    row0: usize,
    valid: usize,
    h: usize,
    #[comptime] heads: usize,
    #[comptime] width: usize,
    #[comptime] rows: usize,
    #[comptime] cols: usize,
    #[comptime] l: AttnLayout,
) {
    crate::frag::stage_cast::<F, F, N>(
        src,
        dst,
        row0,
        valid,
        h,
        0usize,
        heads,
        width,
        rows,
        cols,
        comptime!(staging(&l)),
    );
}

/// Registers of a prefetched tile (one placeholder when the kernel does not fetch ahead).
pub(super) fn ahead_slots(rows: usize, cols: usize, l: &AttnLayout) -> usize {
    if l.fetch_ahead {
        slots_per_unit(rows, cols, l)
    } else {
        1
    }
}

/// Whether every query row of a block (`i0 + off ..`, `bq` of them) sees every key of a key
/// block (`j0 ..`, `bk` of them): then the scores need no mask. Rows past a sequence's end
/// compute on zeros and are never written, so only keys past it (`kr < bk`) and the causal and
/// window bounds count.
#[cube]
#[allow(clippy::too_many_arguments)]
fn whole_block(
    i0: usize,
    off: usize,
    j0: usize,
    kr: usize,
    window: u32,
    #[comptime] bq: usize,
    #[comptime] bk: usize,
    #[comptime] l: AttnLayout,
) -> bool {
    let mut full = kr == bk;
    if comptime!(!l.fast_paths) {
        full = false;
    }
    if comptime!(l.causal) {
        full = full && j0 + bk <= i0 + off + 1;
    }
    if comptime!(l.window) {
        full = full && j0 + window as usize + 1 > i0 + off + bq;
    }
    full
}

/// [`crate::frag::ldm4`] on a padded tile of `cols` columns of this layout.
#[cube]
fn ldm4<F: Float, N: Size, NO: Size>(
    t: &SharedMemory<Vector<F, N>>,
    row0: usize,
    col0: usize,
    #[comptime] cols: usize,
    #[comptime] swap: bool,
    #[comptime] trans: bool,
    #[comptime] l: AttnLayout,
) -> Array<Vector<F, NO>> {
    crate::frag::ldm4::<F, N, NO>(t, row0, col0, comptime!(cols + l.ph), l.vector, swap, trans)
}

/// The `A` fragments of this plane's 16 rows `r0 ..` of a `width`-column tile, 16 columns each
/// (fragment `s` in entries `4s .. 4s + 4`): operands a kernel holds through its loop.
#[cube]
fn hold_rows<F: Float, N: Size, NA: Size>(
    t: &SharedMemory<Vector<F, N>>,
    r0: usize,
    #[comptime] width: usize,
    #[comptime] l: AttnLayout,
) -> Array<Vector<F, NA>> {
    let mut held = Array::<Vector<F, NA>>::new(comptime!(width / FRAG_K * 4));
    #[unroll]
    for s in 0..comptime!(width / FRAG_K) {
        let a = ldm4::<F, N, NA>(t, r0, s * FRAG_K, width, false, false, l);
        #[unroll]
        for r in 0..4usize {
            held[s * 4 + r] = a[r];
        }
    }
    held
}

/// The forward's scores of one key block in place: scaled and capped, and with `masked`, -1e30
/// where a row does not see a key (or lies past the block's `rows`, or the key past `kr`).
/// Returns this lane's maxima of rows `g` and `g + 8`.
#[cube]
#[allow(clippy::too_many_arguments)]
fn fwd_scores<NC: Size>(
    sacc: &mut Array<Vector<f32, NC>>,
    pr: usize,
    rows: usize,
    pos0: usize,
    j0: usize,
    kr: usize,
    scale: f32,
    window: u32,
    cap: f32,
    #[comptime] masked: bool,
    #[comptime] l: AttnLayout,
) -> (f32, f32) {
    let (g, t) = lane_gt();
    let mut mx0 = f32::new(-1.0e30);
    let mut mx1 = f32::new(-1.0e30);
    #[unroll]
    for j in 0..comptime!(l.bk / FRAG_N) {
        #[unroll]
        for half in 0..2usize {
            let row = pr + g + half * 8;
            let mut x = sacc[j * 2 + half];
            #[unroll]
            for e in 0..2usize {
                let col = j * FRAG_N + 2 * t + e;
                let mut y = capped(x[e], scale, cap, l);
                if comptime!(masked) {
                    if !(row < rows && col < kr && sees(pos0 + half * 8, j0 + col, window, l)) {
                        y = -1.0e30f32;
                    }
                }
                x[e] = y;
                if half == 0 {
                    mx0 = max(mx0, y);
                } else {
                    mx1 = max(mx1, y);
                }
            }
            sacc[j * 2 + half] = x;
        }
    }
    (mx0, mx1)
}

/// Forward: `o` and the rows' log-sum-exp, as [`super::kernels::attn_fwd_kernel`] computes them.
/// Cubes `(query block, head, sequence)` of `(32, planes)` units; `l.bq = 16 · planes`, `l.bd`
/// and `l.bdv` the head dims rounded up to 16 (whole heads), `l.bk` a multiple of 16.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments, unused_assignments)]
pub fn attn_fwd_frag_kernel<F: Float, N: Size>(
    q: &Array<Vector<F, N>>,
    k: &Array<Vector<F, N>>,
    v: &Array<Vector<F, N>>,
    cu_seqlens: &Array<u32>,
    o: &mut Array<F>,
    lse: &mut Array<f32>,
    q_len: u32,
    kv_len: u32,
    scale: f32,
    window: u32,
    cap: f32,
    #[comptime] l: AttnLayout,
    #[define(F)] _dtype: StorageType,
) {
    let (bq, bk, dp, dvp) = comptime!((l.bq, l.bk, l.bd, l.bdv));
    let (nkt, ndk) = comptime!((bk / FRAG_N, dp / FRAG_K));
    let qb = CUBE_POS_X as usize;
    let h = CUBE_POS_Y as usize;
    let n = CUBE_POS_Z as usize;
    let hk = h / comptime!(l.heads / l.kv_heads);
    let (q0, lq, k0, lk) = bounds(cu_seqlens, n, q_len, kv_len, l.varlen);
    let i0 = qb * bq;
    // Uniform over the cube: blocks past a shorter sequence's end have nothing to do.
    if i0 < lq {
        let rows = chunk_len(lq, i0, bq);
        let off = key_offset(lq, lk);
        let def = MmaDefinition::<F, F, f32>::new(FRAG_M, FRAG_N, FRAG_K);
        let size!(NA) = def.vector_size(MatrixIdent::A);
        let size!(NB) = def.vector_size(MatrixIdent::B);
        let size!(NC) = def.vector_size(MatrixIdent::Accumulator);
        let (g, t) = lane_gt();
        // This plane's first row in the block.
        let pr = UNIT_POS_Y as usize * FRAG_M;
        let mut sk = tile_v::<F, N>(comptime!(bq.max(bk)), dp, l);
        let mut sv = tile_v::<F, N>(comptime!(bq.max(bk)), dvp, l);

        // The queries, staged through the key tile, then held as `A` fragments per 16 columns.
        stage_v::<F, N>(q, &mut sk, q0 + i0, rows, h, l.heads, l.d, bq, dp, l);
        sync_cube();
        let qa = hold_rows::<F, N, NA>(&sk, pr, dp, l);

        let mut oacc = zeros::<NC>(comptime!(dvp / FRAG_N));
        // Running maximum and this lane's part of the running sum, for rows g and g + 8.
        let mut m0 = f32::new(-1.0e30);
        let mut m1 = f32::new(-1.0e30);
        let mut l0 = f32::new(0.0);
        let mut l1 = f32::new(0.0);
        let pos0 = i0 + pr + g + off;

        let (j_lo, j_hi) = key_range(i0 + off, rows, lk, window, l);
        let kb_lo = j_lo / bk;
        let kb_hi = j_hi.div_ceil(bk);
        let mut rk = Array::<Vector<F, N>>::new(comptime!(ahead_slots(bk, dp, &l)));
        let mut rv = Array::<Vector<F, N>>::new(comptime!(ahead_slots(bk, dvp, &l)));
        if comptime!(l.fetch_ahead) {
            if kb_lo < kb_hi {
                let j0 = kb_lo * bk;
                let kr = chunk_len(lk, j0, bk);
                fetch_v::<F, N>(k, &mut rk, k0 + j0, kr, hk, l.kv_heads, l.d, bk, dp, l);
                fetch_v::<F, N>(v, &mut rv, k0 + j0, kr, hk, l.kv_heads, l.dv, bk, dvp, l);
            }
        }
        for kb in kb_lo..kb_hi {
            let j0 = kb * bk;
            let kr = chunk_len(lk, j0, bk);
            // Every plane is done with the previous block (and, first, with the queries).
            sync_cube();
            if comptime!(l.fetch_ahead) {
                put_v::<F, N>(&rk, &mut sk, bk, dp, l);
                put_v::<F, N>(&rv, &mut sv, bk, dvp, l);
                if kb + 1 < kb_hi {
                    let j1 = j0 + bk;
                    let kr1 = chunk_len(lk, j1, bk);
                    fetch_v::<F, N>(k, &mut rk, k0 + j1, kr1, hk, l.kv_heads, l.d, bk, dp, l);
                    fetch_v::<F, N>(v, &mut rv, k0 + j1, kr1, hk, l.kv_heads, l.dv, bk, dvp, l);
                }
            } else {
                stage_v::<F, N>(k, &mut sk, k0 + j0, kr, hk, l.kv_heads, l.d, bk, dp, l);
                stage_v::<F, N>(v, &mut sv, k0 + j0, kr, hk, l.kv_heads, l.dv, bk, dvp, l);
            }
            sync_cube();

            // S = Q Kᵀ, one 16 × 8 accumulator tile per 8 keys.
            let mut sacc = zeros::<NC>(nkt);
            #[unroll]
            for s in 0..ndk {
                let mut a = Array::<Vector<F, NA>>::new(4usize);
                #[unroll]
                for r in 0..4usize {
                    a[r] = qa[s * 4 + r];
                }
                scores_step::<F, N, NA, NB, NC>(
                    &a,
                    &sk,
                    &mut sacc,
                    s,
                    bk,
                    dp,
                    comptime!(staging(&l)),
                );
            }

            // Scale, cap and mask (not where every row sees every key); the rows' new maxima.
            // (Both branches set them; a cube variable needs a value first.)
            let mut mx0 = f32::new(-1.0e30);
            let mut mx1 = f32::new(-1.0e30);
            if whole_block(i0, off, j0, kr, window, bq, bk, l) {
                let (a0, a1) = fwd_scores::<NC>(
                    &mut sacc, pr, rows, pos0, j0, kr, scale, window, cap, false, l,
                );
                mx0 = a0;
                mx1 = a1;
            } else {
                let (a0, a1) = fwd_scores::<NC>(
                    &mut sacc, pr, rows, pos0, j0, kr, scale, window, cap, true, l,
                );
                mx0 = a0;
                mx1 = a1;
            }
            let n0 = max(m0, quad_max(mx0));
            let n1 = max(m1, quad_max(mx1));
            let alpha0 = exp_kept(m0 - n0, l);
            let alpha1 = exp_kept(m1 - n1, l);
            m0 = n0;
            m1 = n1;

            // Probabilities in place; this lane's sums; the output rescaled.
            let mut p0 = f32::new(0.0);
            let mut p1 = f32::new(0.0);
            #[unroll]
            for j in 0..nkt {
                #[unroll]
                for half in 0..2usize {
                    let mut n = n0;
                    if half == 1 {
                        n = n1;
                    }
                    let mut x = sacc[j * 2 + half];
                    #[unroll]
                    for e in 0..2usize {
                        // Masked scores (-1e30) give 0, also while a row has seen no key.
                        let p = select(x[e] > -1.0e30f32, exp_kept(x[e] - n, l), 0.0f32);
                        if half == 0 {
                            p0 += p;
                        } else {
                            p1 += p;
                        }
                        x[e] = p;
                    }
                    sacc[j * 2 + half] = x;
                }
            }
            l0 = l0 * alpha0 + p0;
            l1 = l1 * alpha1 + p1;
            #[unroll]
            for j in 0..comptime!(dvp / FRAG_N) {
                let mut x = oacc[j * 2];
                x[0] *= alpha0;
                x[1] *= alpha0;
                oacc[j * 2] = x;
                let mut y = oacc[j * 2 + 1];
                y[0] *= alpha1;
                y[1] *= alpha1;
                oacc[j * 2 + 1] = y;
            }

            // O += P V.
            acc_times_rows::<F, N, NA, NB, NC>(
                &sacc,
                &sv,
                &mut oacc,
                bk,
                dvp,
                comptime!(staging(&l)),
            );
        }

        // The rows' sums over their four lanes; the normalised output and the log-sum-exp.
        let z0 = quad_sum(l0);
        let z1 = quad_sum(l1);
        store_acc::<F, NC>(
            &oacc,
            o,
            q0 + i0,
            pr,
            rows,
            h,
            0usize,
            z0,
            z1,
            true,
            l.heads,
            l.dv,
            dvp,
        );
        if t == 0 {
            #[unroll]
            for half in 0..2usize {
                let row = pr + g + half * 8;
                let mut z = z0;
                let mut m = m0;
                if half == 1 {
                    z = z1;
                    m = m1;
                }
                if row < rows {
                    let mut x = f32::new(0.0);
                    if z > 0.0f32 {
                        x = m + z.ln();
                    }
                    lse[(q0 + i0 + row) * l.heads + h] = x;
                }
            }
        }
    }
}

/// `dq`'s score gradients of one key block in place of the scores `sacc`, from `dP` (`pacc`):
/// `dS = P ∘ (dP − δ) · ∂x/∂s`, `P = exp(x − lse)`; with `masked`, 0 where a row does not see a
/// key (or lies past `rows`, or the key past `kr`).
#[cube]
#[allow(clippy::too_many_arguments)]
fn dq_grads<NC: Size>(
    sacc: &mut Array<Vector<f32, NC>>,
    pacc: &Array<Vector<f32, NC>>,
    r0: usize,
    rows: usize,
    pos0: usize,
    j0: usize,
    kr: usize,
    lse0: f32,
    lse1: f32,
    del0: f32,
    del1: f32,
    scale: f32,
    window: u32,
    cap: f32,
    #[comptime] masked: bool,
    #[comptime] l: AttnLayout,
) {
    let (_, t) = lane_gt();
    #[unroll]
    for j in 0..comptime!(l.bk / FRAG_N) {
        #[unroll]
        for half in 0..2usize {
            let row = r0 + half * 8;
            let mut m = lse0;
            let mut d = del0;
            if half == 1 {
                m = lse1;
                d = del1;
            }
            let mut x = sacc[j * 2 + half];
            let dpv = pacc[j * 2 + half];
            #[unroll]
            for e in 0..2usize {
                let col = j * FRAG_N + 2 * t + e;
                let y = capped(x[e], scale, cap, l);
                let mut p = exp_kept(y - m, l);
                if comptime!(masked) {
                    if !(row < rows && col < kr && sees(pos0 + half * 8, j0 + col, window, l)) {
                        p = 0.0f32;
                    }
                }
                x[e] = p * (dpv[e] - d) * cap_grad(y, scale, cap, l);
            }
            sacc[j * 2 + half] = x;
        }
    }
}

/// Backward `dq`. Cubes `(query block, head, sequence)` of `(32, planes)` units, the forward's
/// layout; each plane keeps its 16 rows' queries, `d_o` and `dq` in registers over the key
/// blocks.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn attn_dq_frag_kernel<F: Float, N: Size>(
    q: &Array<Vector<F, N>>,
    k: &Array<Vector<F, N>>,
    v: &Array<Vector<F, N>>,
    d_o: &Array<Vector<F, N>>,
    lse: &Array<f32>,
    delta: &Array<f32>,
    cu_seqlens: &Array<u32>,
    dq: &mut Array<F>,
    q_len: u32,
    kv_len: u32,
    scale: f32,
    window: u32,
    cap: f32,
    #[comptime] l: AttnLayout,
    #[define(F)] _dtype: StorageType,
) {
    let (bq, bk, dp, dvp) = comptime!((l.bq, l.bk, l.bd, l.bdv));
    let (nkt, ndk, ndv) = comptime!((bk / FRAG_N, dp / FRAG_K, dvp / FRAG_K));
    let qb = CUBE_POS_X as usize;
    let h = CUBE_POS_Y as usize;
    let n = CUBE_POS_Z as usize;
    let hk = h / comptime!(l.heads / l.kv_heads);
    let (q0, lq, k0, lk) = bounds(cu_seqlens, n, q_len, kv_len, l.varlen);
    let i0 = qb * bq;
    if i0 < lq {
        let rows = chunk_len(lq, i0, bq);
        let off = key_offset(lq, lk);
        let def = MmaDefinition::<F, F, f32>::new(FRAG_M, FRAG_N, FRAG_K);
        let size!(NA) = def.vector_size(MatrixIdent::A);
        let size!(NB) = def.vector_size(MatrixIdent::B);
        let size!(NC) = def.vector_size(MatrixIdent::Accumulator);
        let (g, _) = lane_gt();
        let pr = UNIT_POS_Y as usize * FRAG_M;
        let mut sk = tile_v::<F, N>(comptime!(bq.max(bk)), dp, l);
        let mut sv = tile_v::<F, N>(comptime!(bq.max(bk)), dvp, l);

        // Queries and `d_o` through the key and value tiles into registers.
        stage_v::<F, N>(q, &mut sk, q0 + i0, rows, h, l.heads, l.d, bq, dp, l);
        stage_v::<F, N>(d_o, &mut sv, q0 + i0, rows, h, l.heads, l.dv, bq, dvp, l);
        sync_cube();
        let qa = hold_rows::<F, N, NA>(&sk, pr, dp, l);
        let doa = hold_rows::<F, N, NA>(&sv, pr, dvp, l);
        // Log-sum-exp and δ of rows g and g + 8 (0 past the block's rows, which are masked).
        let mut lse0 = f32::new(0.0);
        let mut lse1 = f32::new(0.0);
        let mut del0 = f32::new(0.0);
        let mut del1 = f32::new(0.0);
        let r0 = pr + g;
        if r0 < rows {
            lse0 = lse[(q0 + i0 + r0) * l.heads + h];
            del0 = delta[(q0 + i0 + r0) * l.heads + h];
        }
        if r0 + 8 < rows {
            lse1 = lse[(q0 + i0 + r0 + 8) * l.heads + h];
            del1 = delta[(q0 + i0 + r0 + 8) * l.heads + h];
        }
        let pos0 = i0 + r0 + off;
        let mut dqacc = zeros::<NC>(comptime!(dp / FRAG_N));

        let (j_lo, j_hi) = key_range(i0 + off, rows, lk, window, l);
        let kb_lo = j_lo / bk;
        let kb_hi = j_hi.div_ceil(bk);
        let mut rk = Array::<Vector<F, N>>::new(comptime!(ahead_slots(bk, dp, &l)));
        let mut rv = Array::<Vector<F, N>>::new(comptime!(ahead_slots(bk, dvp, &l)));
        if comptime!(l.fetch_ahead) {
            if kb_lo < kb_hi {
                let j0 = kb_lo * bk;
                let kr = chunk_len(lk, j0, bk);
                fetch_v::<F, N>(k, &mut rk, k0 + j0, kr, hk, l.kv_heads, l.d, bk, dp, l);
                fetch_v::<F, N>(v, &mut rv, k0 + j0, kr, hk, l.kv_heads, l.dv, bk, dvp, l);
            }
        }
        for kb in kb_lo..kb_hi {
            let j0 = kb * bk;
            let kr = chunk_len(lk, j0, bk);
            sync_cube();
            if comptime!(l.fetch_ahead) {
                put_v::<F, N>(&rk, &mut sk, bk, dp, l);
                put_v::<F, N>(&rv, &mut sv, bk, dvp, l);
                if kb + 1 < kb_hi {
                    let j1 = j0 + bk;
                    let kr1 = chunk_len(lk, j1, bk);
                    fetch_v::<F, N>(k, &mut rk, k0 + j1, kr1, hk, l.kv_heads, l.d, bk, dp, l);
                    fetch_v::<F, N>(v, &mut rv, k0 + j1, kr1, hk, l.kv_heads, l.dv, bk, dvp, l);
                }
            } else {
                stage_v::<F, N>(k, &mut sk, k0 + j0, kr, hk, l.kv_heads, l.d, bk, dp, l);
                stage_v::<F, N>(v, &mut sv, k0 + j0, kr, hk, l.kv_heads, l.dv, bk, dvp, l);
            }
            sync_cube();

            // S = Q Kᵀ and dP = dO Vᵀ.
            let mut sacc = zeros::<NC>(nkt);
            let mut pacc = zeros::<NC>(nkt);
            #[unroll]
            for s in 0..ndk {
                let mut a = Array::<Vector<F, NA>>::new(4usize);
                #[unroll]
                for r in 0..4usize {
                    a[r] = qa[s * 4 + r];
                }
                scores_step::<F, N, NA, NB, NC>(
                    &a,
                    &sk,
                    &mut sacc,
                    s,
                    bk,
                    dp,
                    comptime!(staging(&l)),
                );
            }
            #[unroll]
            for s in 0..ndv {
                let mut a = Array::<Vector<F, NA>>::new(4usize);
                #[unroll]
                for r in 0..4usize {
                    a[r] = doa[s * 4 + r];
                }
                scores_step::<F, N, NA, NB, NC>(
                    &a,
                    &sv,
                    &mut pacc,
                    s,
                    bk,
                    dvp,
                    comptime!(staging(&l)),
                );
            }
            // dS = P ∘ (dP − δ) · ∂x/∂s, in place of S (no mask where every row sees every key).
            if whole_block(i0, off, j0, kr, window, bq, bk, l) {
                dq_grads::<NC>(
                    &mut sacc, &pacc, r0, rows, pos0, j0, kr, lse0, lse1, del0, del1, scale,
                    window, cap, false, l,
                );
            } else {
                dq_grads::<NC>(
                    &mut sacc, &pacc, r0, rows, pos0, j0, kr, lse0, lse1, del0, del1, scale,
                    window, cap, true, l,
                );
            }
            // dQ += dS K.
            acc_times_rows::<F, N, NA, NB, NC>(
                &sacc,
                &sk,
                &mut dqacc,
                bk,
                dp,
                comptime!(staging(&l)),
            );
        }
        store_acc::<F, NC>(
            &dqacc,
            dq,
            q0 + i0,
            pr,
            rows,
            h,
            0usize,
            1.0f32,
            1.0f32,
            false,
            l.heads,
            l.d,
            dp,
        );
    }
}

/// The log-sum-exp and δ of row `UNIT_POS` of a query block (rows `row0 ..`, 0 past `valid`),
/// for the units below the block's length.
#[cube]
fn row_stats(
    lse: &Array<f32>,
    delta: &Array<f32>,
    row0: usize,
    valid: usize,
    h: usize,
    #[comptime] heads: usize,
) -> (f32, f32) {
    let row = UNIT_POS as usize;
    let mut a = f32::new(0.0);
    let mut b = f32::new(0.0);
    if row < valid {
        a = lse[(row0 + row) * heads + h];
        b = delta[(row0 + row) * heads + h];
    }
    (a, b)
}

/// `dk`/`dv`'s probabilities and score gradients of one query block, transposed (keys down,
/// queries across), in place: `Pᵀ` of `Sᵀ` (`sacc`) and `dSᵀ = Pᵀ ∘ (dPᵀ − δ) · ∂x/∂s` of `dPᵀ`
/// (`pacc`); with `masked`, 0 where a query does not see a key (or lies past `rows`, or the key
/// past `kr`).
#[cube]
#[allow(clippy::too_many_arguments)]
fn dkv_grads<NC: Size>(
    sacc: &mut Array<Vector<f32, NC>>,
    pacc: &mut Array<Vector<f32, NC>>,
    slse: &SharedMemory<f32>,
    sdel: &SharedMemory<f32>,
    key0: usize,
    kr: usize,
    rows: usize,
    i0: usize,
    off: usize,
    j0: usize,
    scale: f32,
    window: u32,
    cap: f32,
    #[comptime] masked: bool,
    #[comptime] l: AttnLayout,
) {
    let (_, t) = lane_gt();
    #[unroll]
    for j in 0..comptime!(l.bq / FRAG_N) {
        #[unroll]
        for half in 0..2usize {
            let key = key0 + half * 8;
            let mut x = sacc[j * 2 + half];
            let mut y = pacc[j * 2 + half];
            #[unroll]
            for e in 0..2usize {
                let col = j * FRAG_N + 2 * t + e;
                let s = capped(x[e], scale, cap, l);
                let mut p = exp_kept(s - slse[col], l);
                if comptime!(masked) {
                    if !(key < kr && col < rows && sees(i0 + col + off, j0 + key, window, l)) {
                        p = 0.0f32;
                    }
                }
                x[e] = p;
                y[e] = p * (y[e] - sdel[col]) * cap_grad(s, scale, cap, l);
            }
            sacc[j * 2 + half] = x;
            pacc[j * 2 + half] = y;
        }
    }
}

/// Backward `dk`, `dv`, summed over the query heads of a group. Cubes `(key block, key/value
/// head, sequence)` of `(32, planes)` units, `l.bk = 16 · planes` keys, the loop over query
/// blocks of `l.bq` rows; each plane keeps its 16 keys' `dk` and `dv` in registers, and reads
/// its keys and values from the block staged once.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn attn_dkv_frag_kernel<F: Float, N: Size>(
    q: &Array<Vector<F, N>>,
    k: &Array<Vector<F, N>>,
    v: &Array<Vector<F, N>>,
    d_o: &Array<Vector<F, N>>,
    lse: &Array<f32>,
    delta: &Array<f32>,
    cu_seqlens: &Array<u32>,
    dk: &mut Array<F>,
    dv: &mut Array<F>,
    q_len: u32,
    kv_len: u32,
    scale: f32,
    window: u32,
    cap: f32,
    #[comptime] l: AttnLayout,
    #[define(F)] _dtype: StorageType,
) {
    let (bq, bk, dp, dvp) = comptime!((l.bq, l.bk, l.bd, l.bdv));
    let nqt = comptime!(bq / FRAG_N);
    let kb = CUBE_POS_X as usize;
    let hk = CUBE_POS_Y as usize;
    let n = CUBE_POS_Z as usize;
    let group = comptime!(l.heads / l.kv_heads);
    let (q0, lq, k0, lk) = bounds(cu_seqlens, n, q_len, kv_len, l.varlen);
    let j0 = kb * bk;
    if j0 < lk {
        let kr = chunk_len(lk, j0, bk);
        let off = key_offset(lq, lk);
        let def = MmaDefinition::<F, F, f32>::new(FRAG_M, FRAG_N, FRAG_K);
        let size!(NA) = def.vector_size(MatrixIdent::A);
        let size!(NB) = def.vector_size(MatrixIdent::B);
        let size!(NC) = def.vector_size(MatrixIdent::Accumulator);
        let (g, _) = lane_gt();
        // This plane's first key in the block.
        let pk = UNIT_POS_Y as usize * FRAG_M;
        let mut sk = tile_v::<F, N>(bk, dp, l);
        let mut sv = tile_v::<F, N>(bk, dvp, l);
        let mut sq = tile_v::<F, N>(bq, dp, l);
        let mut sdo = tile_v::<F, N>(bq, dvp, l);
        let mut slse = SharedMemory::<f32>::new(bq);
        let mut sdel = SharedMemory::<f32>::new(bq);
        stage_v::<F, N>(k, &mut sk, k0 + j0, kr, hk, l.kv_heads, l.d, bk, dp, l);
        stage_v::<F, N>(v, &mut sv, k0 + j0, kr, hk, l.kv_heads, l.dv, bk, dvp, l);

        let (qb_lo, qb_hi) = query_blocks(j0, kr, off, lq, window, l);
        let mut dkacc = zeros::<NC>(comptime!(dp / FRAG_N));
        let mut dvacc = zeros::<NC>(comptime!(dvp / FRAG_N));
        // The keys of rows g and g + 8 of this plane.
        let key0 = pk + g;
        let unit = UNIT_POS as usize;
        // The next block's queries, `d_o`, and (unit `i`) its row `i`'s log-sum-exp and δ.
        let mut rq = Array::<Vector<F, N>>::new(comptime!(ahead_slots(bq, dp, &l)));
        let mut rdo = Array::<Vector<F, N>>::new(comptime!(ahead_slots(bq, dvp, &l)));
        let mut rl = f32::new(0.0);
        let mut rd = f32::new(0.0);
        if comptime!(l.fetch_ahead) {
            if qb_lo < qb_hi {
                let i0 = qb_lo * bq;
                let rows = chunk_len(lq, i0, bq);
                let h = hk * group;
                fetch_v::<F, N>(q, &mut rq, q0 + i0, rows, h, l.heads, l.d, bq, dp, l);
                fetch_v::<F, N>(d_o, &mut rdo, q0 + i0, rows, h, l.heads, l.dv, bq, dvp, l);
                let (a, b) = row_stats(lse, delta, q0 + i0, rows, h, l.heads);
                rl = a;
                rd = b;
            }
        }
        for gi in 0..group {
            let h = hk * group + gi;
            for qb in qb_lo..qb_hi {
                let i0 = qb * bq;
                let rows = chunk_len(lq, i0, bq);
                // Every plane is done with the previous block.
                sync_cube();
                if comptime!(l.fetch_ahead) {
                    put_v::<F, N>(&rq, &mut sq, bq, dp, l);
                    put_v::<F, N>(&rdo, &mut sdo, bq, dvp, l);
                    if unit < bq {
                        slse[unit] = rl;
                        sdel[unit] = rd;
                    }
                    let (nh, nqb, more) = next_query_block(h, qb, qb_lo, qb_hi, gi, group);
                    if more {
                        let i1 = nqb * bq;
                        let rows1 = chunk_len(lq, i1, bq);
                        fetch_v::<F, N>(q, &mut rq, q0 + i1, rows1, nh, l.heads, l.d, bq, dp, l);
                        fetch_v::<F, N>(
                            d_o,
                            &mut rdo,
                            q0 + i1,
                            rows1,
                            nh,
                            l.heads,
                            l.dv,
                            bq,
                            dvp,
                            l,
                        );
                        let (a, b) = row_stats(lse, delta, q0 + i1, rows1, nh, l.heads);
                        rl = a;
                        rd = b;
                    }
                } else {
                    stage_v::<F, N>(q, &mut sq, q0 + i0, rows, h, l.heads, l.d, bq, dp, l);
                    stage_v::<F, N>(d_o, &mut sdo, q0 + i0, rows, h, l.heads, l.dv, bq, dvp, l);
                    let (a, b) = row_stats(lse, delta, q0 + i0, rows, h, l.heads);
                    if unit < bq {
                        slse[unit] = a;
                        sdel[unit] = b;
                    }
                }
                sync_cube();

                // Sᵀ = K Qᵀ and dPᵀ = V dOᵀ (keys down, queries across).
                let mut sacc = zeros::<NC>(nqt);
                let mut pacc = zeros::<NC>(nqt);
                scores_tiles::<F, N, NA, NB, NC>(
                    &sk,
                    pk,
                    &sq,
                    &mut sacc,
                    bq,
                    dp,
                    comptime!(staging(&l)),
                );
                scores_tiles::<F, N, NA, NB, NC>(
                    &sv,
                    pk,
                    &sdo,
                    &mut pacc,
                    bq,
                    dvp,
                    comptime!(staging(&l)),
                );
                // Pᵀ in place of Sᵀ, dSᵀ in place of dPᵀ (no mask where every query sees every
                // key).
                if whole_block(i0, off, j0, kr, window, bq, bk, l) {
                    dkv_grads::<NC>(
                        &mut sacc, &mut pacc, &slse, &sdel, key0, kr, rows, i0, off, j0, scale,
                        window, cap, false, l,
                    );
                } else {
                    dkv_grads::<NC>(
                        &mut sacc, &mut pacc, &slse, &sdel, key0, kr, rows, i0, off, j0, scale,
                        window, cap, true, l,
                    );
                }
                // dV += Pᵀ dO, dK += dSᵀ Q.
                acc_times_rows::<F, N, NA, NB, NC>(
                    &sacc,
                    &sdo,
                    &mut dvacc,
                    bq,
                    dvp,
                    comptime!(staging(&l)),
                );
                acc_times_rows::<F, N, NA, NB, NC>(
                    &pacc,
                    &sq,
                    &mut dkacc,
                    bq,
                    dp,
                    comptime!(staging(&l)),
                );
            }
        }
        store_acc::<F, NC>(
            &dkacc,
            dk,
            k0 + j0,
            pk,
            kr,
            hk,
            0usize,
            1.0f32,
            1.0f32,
            false,
            l.kv_heads,
            l.d,
            dp,
        );
        store_acc::<F, NC>(
            &dvacc,
            dv,
            k0 + j0,
            pk,
            kr,
            hk,
            0usize,
            1.0f32,
            1.0f32,
            false,
            l.kv_heads,
            l.dv,
            dvp,
        );
    }
}
