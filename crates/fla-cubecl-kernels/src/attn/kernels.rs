//! The flash-attention kernels: forward (online softmax), the backward's row term
//! `δ_i = d_o_i · o_i`, `dq`, and `dk`/`dv`.
//!
//! Every product is a [`crate::tile::mma`] over shared-memory tiles (tensor cores where the
//! device has them). The head dimension is staged in chunks of `bd` (`bdv` for values) columns:
//! on a GPU one chunk holds a whole head and the operand that stays fixed over a kernel's loop is
//! staged once; with little shared memory (lavapipe: 32 KB) scores accumulate over several chunks.
//! The same chunk widths split the outputs: a cube computes `bd` columns of `dq`/`dk` and `bdv`
//! columns of `o`/`dv` (several cubes recompute the scores when a head spans several chunks).
//!
//! Scores, probabilities and accumulators are `f32`; the operands of the second product of each
//! pair (`P`, `dS`) are rounded to the input dtype for the tensor cores, as FlashAttention does.

#![allow(clippy::collapsible_if)]

use cubecl::prelude::*;

use crate::gated::chunk::chunk_len;
use crate::gated::recurrent_bwd::linear_unit;
use crate::tile::{mma, put_tile, regs_for, tile_entry, MmaShape, TileConfig};

/// Compile-time shape of an attention launch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AttnLayout {
    pub heads: usize,
    pub kv_heads: usize,
    pub d: usize,
    pub dv: usize,
    /// Query rows and key rows per block (multiples of 16).
    pub bq: usize,
    pub bk: usize,
    /// Entries per load of the register kernels ([`super::frag`]): 8, 4, 2 or 1, the widest that
    /// divides both head dims; the shared-memory kernels read single entries (1).
    pub vector: usize,
    /// Columns per staged chunk of `q`/`k` and of `v`/`d_o` (multiples of 16).
    pub bd: usize,
    pub bdv: usize,
    /// Row padding of input-dtype tiles, in elements (16 bytes).
    pub ph: usize,
    pub causal: bool,
    pub window: bool,
    pub softcap: bool,
    pub varlen: bool,
    /// Fetch each loop's next block into registers during the current block's products (where
    /// a head fits one column chunk, see [`AttnLayout::prefetch`]).
    pub fetch_ahead: bool,
    /// The register kernels' second round ([`super::frag`]): each loop fetching its next block
    /// into registers (with `fetch_ahead`), blocks where every query sees every key taking the
    /// scores without a mask, exponentials in CUDA's two-instruction form. Off (the first
    /// round, tested on CUDA) unless `FLA_ATTN_FRAG_FAST=1`, until its CUDA tests run.
    pub fast_paths: bool,
    pub tile: TileConfig,
}

impl AttnLayout {
    /// Chunks of the head dimension of `q`/`k` and of `v`.
    pub fn nd(&self) -> usize {
        self.d.div_ceil(self.bd)
    }
    pub fn ndv(&self) -> usize {
        self.dv.div_ceil(self.bdv)
    }
    /// Whether the loop fetches its next block's moving operands into registers while the
    /// current block's products run: asked for, and a head fits one column chunk.
    pub fn prefetch(&self) -> bool {
        self.fetch_ahead && self.nd() == 1 && self.ndv() == 1
    }
    /// Units sharing one score row in the row passes.
    fn per_row(&self) -> usize {
        (self.tile.threads() / self.bq).clamp(1, self.bk)
    }
}

/// Padding of `f32` tile rows (16 bytes), so fragment rows do not share banks.
pub const PAD_F: usize = 4;
// A masked score is written as -1e30 (literal in the kernels: cube code takes no `const`):
// finite, so no `inf − inf` arises, and far below any real score.

/// Bytes of a padded input-dtype tile.
pub(super) fn h_bytes(rows: usize, cols: usize, l: &AttnLayout, e: usize) -> usize {
    rows * (cols + l.ph) * e
}
fn f_bytes(rows: usize, cols: usize) -> usize {
    rows * (cols + PAD_F) * 4
}

/// Shared-memory bytes of each kernel for layout `l` and `e`-byte inputs.
pub fn fwd_smem(l: &AttnLayout, e: usize) -> usize {
    let (bq, bk) = (l.bq, l.bk);
    h_bytes(bq, l.bd, l, e)
        + h_bytes(bk, l.bd, l, e)
        + h_bytes(bk, l.bdv, l, e)
        + f_bytes(bq, bk)
        + h_bytes(bq, bk, l, e)
        + f_bytes(bq, l.bdv)
        + 4 * bq * (3 + 2 * l.per_row())
}

pub fn dq_smem(l: &AttnLayout, e: usize) -> usize {
    let (bq, bk) = (l.bq, l.bk);
    h_bytes(bq, l.bd, l, e)
        + h_bytes(bk, l.bd, l, e)
        + h_bytes(bq, l.bdv, l, e)
        + h_bytes(bk, l.bdv, l, e)
        + 2 * f_bytes(bq, bk)
        + h_bytes(bq, bk, l, e)
        + f_bytes(bq, l.bd)
        + 8 * bq
}

pub fn dkv_smem(l: &AttnLayout, e: usize) -> usize {
    let (bq, bk) = (l.bq, l.bk);
    h_bytes(bq, l.bd, l, e)
        + h_bytes(bk, l.bd, l, e)
        + h_bytes(bq, l.bdv, l, e)
        + h_bytes(bk, l.bdv, l, e)
        + 2 * f_bytes(bq, bk)
        + 2 * h_bytes(bq, bk, l, e)
        + f_bytes(bk, l.bd)
        + f_bytes(bk, l.bdv)
        + 8 * bq
}

fn shape(m: usize, n: usize, k: usize, lda: usize, ldb: usize, ldo: usize) -> MmaShape {
    MmaShape {
        m,
        n,
        k,
        lda,
        ldb,
        ldo,
        a_col: false,
        b_col: false,
        accumulate: false,
    }
}

#[cube]
pub(super) fn tile_h<F: Float>(
    #[comptime] rows: usize,
    #[comptime] cols: usize,
    #[comptime] l: AttnLayout,
) -> SharedMemory<F> {
    SharedMemory::<F>::new_aligned(comptime!(rows * (cols + l.ph)), 64usize)
}

#[cube]
fn tile_f(#[comptime] rows: usize, #[comptime] cols: usize) -> SharedMemory<f32> {
    SharedMemory::<f32>::new_aligned(comptime!(rows * (cols + PAD_F)), 64usize)
}

/// Fetches rows `row0 .. row0 + rows` (those below `valid`) and columns `col0 .. col0 + cols`
/// (those below `width`) of head `h` of a `[tokens, heads, width]` tensor into this unit's
/// registers, zeros elsewhere, so partial blocks and padded head dims need no other care;
/// [`put_tile`] then writes them to a padded tile. Fetching a loop's next block before the current
/// block's products keeps the loads in flight during them instead of stalling after a barrier.
#[cube]
#[allow(clippy::too_many_arguments)]
fn fetch<F: Float>(
    src: &Array<F>,
    dst: &mut Array<F>,
    row0: usize,
    valid: usize,
    h: usize,
    col0: usize,
    #[comptime] heads: usize,
    #[comptime] width: usize,
    #[comptime] rows: usize,
    #[comptime] cols: usize,
    #[comptime] l: AttnLayout,
) {
    #[unroll]
    for r in 0..comptime!(regs_for(rows, cols, &l.tile)) {
        let (row, c) = tile_entry(r, cols, l.tile);
        let col = col0 + c;
        let mut x = F::cast_from(0.0f32);
        if row < valid && col < width {
            x = src[((row0 + row) * heads + h) * width + col];
        }
        dst[r] = x;
    }
}

/// [`fetch`] then [`put_tile`]: a tile staged at once.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(super) fn stage<F: Float>(
    src: &Array<F>,
    dst: &mut SharedMemory<F>,
    row0: usize,
    valid: usize,
    h: usize,
    col0: usize,
    #[comptime] heads: usize,
    #[comptime] width: usize,
    #[comptime] rows: usize,
    #[comptime] cols: usize,
    #[comptime] l: AttnLayout,
) {
    let mut held = Array::<F>::new(comptime!(regs_for(rows, cols, &l.tile)));
    fetch::<F>(
        src, &mut held, row0, valid, h, col0, heads, width, rows, cols, l,
    );
    put_tile::<F>(&held, dst, rows, cols, l.ph, l.tile);
}

/// [`fetch`] of block rows `row0 ..` (`valid` of them) of head `h` of a pair of tensors with `K`
/// and `V` columns (`k` and `v`, or `q` and `d_o`), whole heads: the prefetching loops' moving
/// operands.
#[cube]
#[allow(clippy::too_many_arguments)]
fn fetch_pair<F: Float>(
    a: &Array<F>,
    b: &Array<F>,
    ra: &mut Array<F>,
    rb: &mut Array<F>,
    row0: usize,
    valid: usize,
    h: usize,
    #[comptime] heads: usize,
    #[comptime] rows: usize,
    #[comptime] l: AttnLayout,
) {
    fetch::<F>(a, ra, row0, valid, h, 0, heads, l.d, rows, l.bd, l);
    fetch::<F>(b, rb, row0, valid, h, 0, heads, l.dv, rows, l.bdv, l);
}

/// Registers of one operand of [`fetch_pair`] (one placeholder when the kernel does not prefetch).
fn pair_regs(rows: usize, values: bool, l: &AttnLayout) -> usize {
    if !l.prefetch() {
        return 1;
    }
    regs_for(rows, if values { l.bdv } else { l.bd }, &l.tile)
}

/// Sets every entry of a padded `rows × cols` `f32` tile to `x`.
#[cube]
fn fill_f(
    t: &mut SharedMemory<f32>,
    x: f32,
    #[comptime] rows: usize,
    #[comptime] cols: usize,
    #[comptime] threads: usize,
) {
    let entries = comptime!(rows * cols);
    let unit = UNIT_POS as usize;
    #[unroll]
    for r in 0..comptime!(entries.div_ceil(threads)) {
        let e = unit + r * threads;
        if e < entries {
            t[(e / cols) * comptime!(cols + PAD_F) + e % cols] = x;
        }
    }
}

/// Writes rows below `valid` and columns below `width` of a padded `f32` tile, times `factor`
/// (and divided by `norm[row]` when `normalise`), to head `h` of a `[tokens, heads, width]`
/// tensor.
#[cube]
#[allow(clippy::too_many_arguments)]
fn store<O: Float>(
    src: &SharedMemory<f32>,
    norm: &SharedMemory<f32>,
    dst: &mut Array<O>,
    row0: usize,
    valid: usize,
    h: usize,
    col0: usize,
    #[comptime] normalise: bool,
    #[comptime] heads: usize,
    #[comptime] width: usize,
    #[comptime] rows: usize,
    #[comptime] cols: usize,
    #[comptime] threads: usize,
) {
    let entries = comptime!(rows * cols);
    let unit = UNIT_POS as usize;
    #[unroll]
    for r in 0..comptime!(entries.div_ceil(threads)) {
        let e = unit + r * threads;
        if e < entries {
            let row = e / cols;
            let c = e % cols;
            let col = col0 + c;
            if row < valid && col < width {
                let mut x = src[row * comptime!(cols + PAD_F) + c];
                if comptime!(normalise) {
                    let z = norm[row];
                    x = select(z > 0.0f32, x / z, 0.0f32);
                }
                dst[((row0 + row) * heads + h) * width + col] = O::cast_from(x);
            }
        }
    }
}

/// Whether the query at key position `pos` sees key `j`.
#[cube]
pub(super) fn sees(pos: usize, j: usize, window: u32, #[comptime] l: AttnLayout) -> bool {
    let mut ok = true;
    if comptime!(l.causal) {
        ok = j <= pos;
    }
    if comptime!(l.window) {
        ok = ok && j + window as usize > pos;
    }
    ok
}

#[cube]
pub(super) fn smaller(a: usize, b: usize) -> usize {
    let mut m = a;
    if b < a {
        m = b;
    }
    m
}

/// Keys `[lo, hi)` that any of the `rows` queries from key position `pos0` on can see: up to the
/// last query's position (causal), from the first query's window start (window).
#[cube]
pub(super) fn key_range(
    pos0: usize,
    rows: usize,
    lk: usize,
    window: u32,
    #[comptime] l: AttnLayout,
) -> (usize, usize) {
    let mut lo = 0usize;
    if comptime!(l.window) {
        if pos0 + 1 > window as usize {
            lo = pos0 + 1 - window as usize;
        }
    }
    let mut hi = lk;
    if comptime!(l.causal) {
        hi = smaller(lk, pos0 + rows);
    }
    (lo, hi)
}

/// Key position of a sequence's first query: its queries are the last `lq` of `lk` positions
/// (0 when there are more queries than keys, which only non-causal, unwindowed calls allow).
#[cube]
pub(super) fn key_offset(lq: usize, lk: usize) -> usize {
    let mut off = 0usize;
    if lk > lq {
        off = lk - lq;
    }
    off
}

/// The `dk`/`dv` loop's block after query block `qb` of head `h` (head `gi` of a group of
/// `group`, blocks `qb_lo .. qb_hi` each): this head's next, or the group's next head's first;
/// `false` after the group's last block.
#[cube]
pub(super) fn next_query_block(
    h: usize,
    qb: usize,
    qb_lo: usize,
    qb_hi: usize,
    gi: usize,
    group: usize,
) -> (usize, usize, bool) {
    let mut nh = h;
    let mut nqb = qb + 1;
    let mut more = true;
    if nqb >= qb_hi {
        nh = h + 1;
        nqb = qb_lo;
        more = gi + 1 < group;
    }
    (nh, nqb, more)
}

/// Query blocks `[lo, hi)` (of `l.bq` rows) holding a query that sees any key of the key block
/// `j0 ..` (`kr` keys): positions from its first key (causal) up to its last key plus the
/// window; empty when none does.
#[cube]
pub(super) fn query_blocks(
    j0: usize,
    kr: usize,
    off: usize,
    lq: usize,
    window: u32,
    #[comptime] l: AttnLayout,
) -> (usize, usize) {
    let mut i_lo = 0usize;
    if comptime!(l.causal) {
        if j0 > off {
            i_lo = j0 - off;
        }
    }
    let mut i_hi = lq;
    if comptime!(l.window) {
        let reach = j0 + kr - 1 + window as usize;
        i_hi = 0;
        if reach > off {
            i_hi = smaller(lq, reach - off);
        }
    }
    let mut qb_lo = i_lo / l.bq;
    let qb_hi = i_hi.div_ceil(l.bq);
    if i_lo >= i_hi {
        qb_lo = qb_hi;
    }
    (qb_lo, qb_hi)
}

/// The score after scale and cap.
#[cube]
pub(super) fn capped(s: f32, scale: f32, cap: f32, #[comptime] l: AttnLayout) -> f32 {
    let mut x = s * scale;
    if comptime!(l.softcap) {
        x = cap * (x / cap).tanh();
    }
    x
}

/// `∂x/∂s` of [`capped`] from its result `x`: `scale · (1 − tanh²)`, `tanh = x / cap`.
#[cube]
pub(super) fn cap_grad(x: f32, scale: f32, cap: f32, #[comptime] l: AttnLayout) -> f32 {
    let mut g = scale;
    if comptime!(l.softcap) {
        let t = x / cap;
        g = scale * (1.0f32 - t * t);
    }
    g
}

/// `(first query row, queries, first key row, keys)` of sequence `n`.
#[cube]
pub(super) fn bounds(
    cu_seqlens: &Array<u32>,
    n: usize,
    q_len: u32,
    kv_len: u32,
    #[comptime] varlen: bool,
) -> (usize, usize, usize, usize) {
    let mut q0 = n * q_len as usize;
    let mut lq = q_len as usize;
    let mut k0 = n * kv_len as usize;
    let mut lk = kv_len as usize;
    if comptime!(varlen) {
        q0 = cu_seqlens[n] as usize;
        lq = (cu_seqlens[n + 1] - cu_seqlens[n]) as usize;
        k0 = q0;
        lk = lq;
    }
    (q0, lq, k0, lk)
}

/// `S = Q Kᵀ` (or, with `values`, `dP = dO Vᵀ`) for query rows `qrow ..` and key rows
/// `krow ..` (global token rows), over the head's column chunks (`bd` of `K`, or `bdv` of `V`).
/// With one chunk, the operand that stays fixed over the caller's loop is staged already: the
/// key side with `fixed_k`, else the query side.
#[cube]
#[allow(clippy::too_many_arguments)]
fn scores<F: Float>(
    a: &Array<F>,
    b: &Array<F>,
    sa: &mut SharedMemory<F>,
    sb: &mut SharedMemory<F>,
    out: &mut SharedMemory<f32>,
    qrow: usize,
    qvalid: usize,
    h: usize,
    krow: usize,
    kvalid: usize,
    hk: usize,
    #[comptime] fixed_k: bool,
    #[comptime] values: bool,
    #[comptime] l: AttnLayout,
) {
    let (w, width) = comptime!(if values { (l.bdv, l.dv) } else { (l.bd, l.d) });
    let chunks = comptime!(width.div_ceil(w));
    #[unroll]
    for dc in 0..chunks {
        if comptime!(chunks > 1 || fixed_k) {
            stage::<F>(a, sa, qrow, qvalid, h, dc * w, l.heads, width, l.bq, w, l);
        }
        if comptime!(chunks > 1 || !fixed_k) {
            stage::<F>(
                b,
                sb,
                krow,
                kvalid,
                hk,
                dc * w,
                l.kv_heads,
                width,
                l.bk,
                w,
                l,
            );
        }
        scores_chunk::<F>(sa, sb, out, dc > 0, values, l);
    }
}

/// One column chunk's `out (+)= A Bᵀ` (`bq × bk`) from staged tiles, between barriers.
#[cube]
fn scores_chunk<F: Float>(
    sa: &SharedMemory<F>,
    sb: &SharedMemory<F>,
    out: &mut SharedMemory<f32>,
    #[comptime] accumulate: bool,
    #[comptime] values: bool,
    #[comptime] l: AttnLayout,
) {
    let w = comptime!(if values { l.bdv } else { l.bd });
    sync_cube();
    let s = comptime!(MmaShape {
        b_col: true,
        accumulate,
        ..shape(l.bq, l.bk, w, w + l.ph, w + l.ph, l.bk + PAD_F)
    });
    mma::<F, F>(sa, 0, sb, 0, out, 0, s, l.tile);
    sync_cube();
}

/// The backward's two score products for a block pair: `S = Q Kᵀ` into `ss` and `dP = dO Vᵀ`
/// into `sdp`. Prefetching loops have staged every operand already; otherwise [`scores`]
/// stages what moves (the key side is fixed with `fixed_k`).
#[cube]
#[allow(clippy::too_many_arguments)]
fn scores_and_grads<F: Float>(
    q: &Array<F>,
    k: &Array<F>,
    d_o: &Array<F>,
    v: &Array<F>,
    sq: &mut SharedMemory<F>,
    sk: &mut SharedMemory<F>,
    sdo: &mut SharedMemory<F>,
    sv: &mut SharedMemory<F>,
    ss: &mut SharedMemory<f32>,
    sdp: &mut SharedMemory<f32>,
    qrow: usize,
    qvalid: usize,
    h: usize,
    krow: usize,
    kvalid: usize,
    hk: usize,
    #[comptime] fixed_k: bool,
    #[comptime] l: AttnLayout,
) {
    if comptime!(l.prefetch()) {
        scores_chunk::<F>(sq, sk, ss, false, false, l);
        scores_chunk::<F>(sdo, sv, sdp, false, true, l);
    } else {
        scores::<F>(
            q, k, sq, sk, ss, qrow, qvalid, h, krow, kvalid, hk, fixed_k, false, l,
        );
        scores::<F>(
            d_o, v, sdo, sv, sdp, qrow, qvalid, h, krow, kvalid, hk, fixed_k, true, l,
        );
    }
}

/// Forward: `o` and the rows' log-sum-exp. Cubes `(query block · value chunk, head, sequence)`.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn attn_fwd_kernel<F: Float>(
    q: &Array<F>,
    k: &Array<F>,
    v: &Array<F>,
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
    let (bq, bk, bdv) = comptime!((l.bq, l.bk, l.bdv));
    let threads = comptime!(l.tile.threads());
    let tpr = comptime!(l.per_row());
    let ndv = comptime!(l.ndv());
    let (lds, ldp) = comptime!((bk + PAD_F, bk + l.ph));
    let qb = CUBE_POS_X as usize / ndv;
    let vc = CUBE_POS_X as usize % ndv;
    let h = CUBE_POS_Y as usize;
    let n = CUBE_POS_Z as usize;
    let hk = h / comptime!(l.heads / l.kv_heads);
    let (q0, lq, k0, lk) = bounds(cu_seqlens, n, q_len, kv_len, l.varlen);
    let i0 = qb * bq;
    // Uniform over the cube: blocks past a shorter sequence's end have nothing to do.
    if i0 < lq {
        let rows = chunk_len(lq, i0, bq);
        let off = key_offset(lq, lk);
        let mut sq = tile_h::<F>(bq, l.bd, l);
        let mut sk = tile_h::<F>(bk, l.bd, l);
        let mut sv = tile_h::<F>(bk, bdv, l);
        let mut ss = tile_f(bq, bk);
        let mut sp = tile_h::<F>(bq, bk, l);
        let mut so = tile_f(bq, bdv);
        // Running maximum, normaliser and rescale factor per row; per-unit partials.
        let mut sm = SharedMemory::<f32>::new(bq);
        let mut sl = SharedMemory::<f32>::new(bq);
        let mut sa = SharedMemory::<f32>::new(bq);
        let mut part = SharedMemory::<f32>::new(comptime!(bq * tpr));
        let mut psum = SharedMemory::<f32>::new(comptime!(bq * tpr));
        let unit = UNIT_POS as usize;

        // Keys any row of the block sees.
        let (j_lo, j_hi) = key_range(i0 + off, rows, lk, window, l);
        fill_f(&mut so, 0.0f32, bq, bdv, threads);
        #[unroll]
        for r in 0..comptime!(bq.div_ceil(threads)) {
            let row = unit + r * threads;
            if row < bq {
                sm[row] = -1.0e30f32;
                sl[row] = 0.0f32;
            }
        }
        if comptime!(l.nd() == 1) {
            stage::<F>(q, &mut sq, q0 + i0, rows, h, 0, l.heads, l.d, bq, l.bd, l);
        }
        let pre = comptime!(l.prefetch());
        let kb_lo = j_lo / bk;
        let kb_hi = j_hi.div_ceil(bk);
        let mut rk = Array::<F>::new(comptime!(pair_regs(bk, false, &l)));
        let mut rv = Array::<F>::new(comptime!(pair_regs(bk, true, &l)));
        if comptime!(pre) {
            if kb_lo < kb_hi {
                let j0 = kb_lo * bk;
                let kr = chunk_len(lk, j0, bk);
                fetch_pair::<F>(k, v, &mut rk, &mut rv, k0 + j0, kr, hk, l.kv_heads, bk, l);
            }
        }
        for kb in kb_lo..kb_hi {
            let j0 = kb * bk;
            let kr = chunk_len(lk, j0, bk);
            if comptime!(pre) {
                // The previous block ended with a barrier: its tiles are free.
                put_tile::<F>(&rk, &mut sk, bk, l.bd, l.ph, l.tile);
                put_tile::<F>(&rv, &mut sv, bk, bdv, l.ph, l.tile);
                if kb + 1 < kb_hi {
                    let j1 = j0 + bk;
                    let kr1 = chunk_len(lk, j1, bk);
                    fetch_pair::<F>(k, v, &mut rk, &mut rv, k0 + j1, kr1, hk, l.kv_heads, bk, l);
                }
                scores_chunk::<F>(&sq, &sk, &mut ss, false, false, l);
            } else {
                stage::<F>(
                    v,
                    &mut sv,
                    k0 + j0,
                    kr,
                    hk,
                    vc * bdv,
                    l.kv_heads,
                    l.dv,
                    bk,
                    bdv,
                    l,
                );
                scores::<F>(
                    q,
                    k,
                    &mut sq,
                    &mut sk,
                    &mut ss,
                    q0 + i0,
                    rows,
                    h,
                    k0 + j0,
                    kr,
                    hk,
                    false,
                    false,
                    l,
                );
            }
            // Row pass 1: scale, cap and mask the scores; each unit's maximum over its columns.
            #[unroll]
            for r in 0..comptime!((bq * tpr).div_ceil(threads)) {
                let u = unit + r * threads;
                let row = u / tpr;
                let part_i = u % tpr;
                if row < bq {
                    let pos = i0 + row + off;
                    let mut mx = f32::new(-1.0e30);
                    #[unroll]
                    for c in 0..comptime!(bk.div_ceil(tpr)) {
                        let col = part_i + c * tpr;
                        if col < bk {
                            let mut x = capped(ss[row * lds + col], scale, cap, l);
                            if !(row < rows && col < kr && sees(pos, j0 + col, window, l)) {
                                x = -1.0e30f32;
                            }
                            ss[row * lds + col] = x;
                            mx = max(mx, x);
                        }
                    }
                    part[row * tpr + part_i] = mx;
                }
            }
            sync_cube();
            // Row pass 2: the new maximum, probabilities (rounded for the product), partial sums,
            // and the accumulator's rows rescaled.
            #[unroll]
            for r in 0..comptime!((bq * tpr).div_ceil(threads)) {
                let u = unit + r * threads;
                let row = u / tpr;
                let part_i = u % tpr;
                if row < bq {
                    let m_old = sm[row];
                    let mut m_new = m_old;
                    #[unroll]
                    for t in 0..tpr {
                        m_new = max(m_new, part[row * tpr + t]);
                    }
                    let mut sum = 0.0f32;
                    #[unroll]
                    for c in 0..comptime!(bk.div_ceil(tpr)) {
                        let col = part_i + c * tpr;
                        if col < bk {
                            let x = ss[row * lds + col];
                            let mut p = 0.0f32;
                            if x > -1.0e30f32 {
                                p = (x - m_new).exp();
                            }
                            sp[row * ldp + col] = F::cast_from(p);
                            sum += p;
                        }
                    }
                    psum[row * tpr + part_i] = sum;
                    let alpha = (m_old - m_new).exp();
                    #[unroll]
                    for c in 0..comptime!(bdv.div_ceil(tpr)) {
                        let col = part_i + c * tpr;
                        if col < bdv {
                            so[row * comptime!(bdv + PAD_F) + col] *= alpha;
                        }
                    }
                    if part_i == 0 {
                        sa[row] = m_new;
                    }
                }
            }
            sync_cube();
            // O += P V; the row statistics update beside it (disjoint memory).
            let s = comptime!(MmaShape {
                accumulate: true,
                ..shape(bq, bdv, bk, ldp, bdv + l.ph, bdv + PAD_F)
            });
            mma::<F, F>(&sp, 0, &sv, 0, &mut so, 0, s, l.tile);
            #[unroll]
            for r in 0..comptime!(bq.div_ceil(threads)) {
                let row = unit + r * threads;
                if row < bq {
                    let m_new = sa[row];
                    let mut sum = 0.0f32;
                    #[unroll]
                    for t in 0..tpr {
                        sum += psum[row * tpr + t];
                    }
                    sl[row] = sl[row] * (sm[row] - m_new).exp() + sum;
                    sm[row] = m_new;
                }
            }
            sync_cube();
        }
        store::<F>(
            &so,
            &sl,
            o,
            q0 + i0,
            rows,
            h,
            vc * bdv,
            true,
            l.heads,
            l.dv,
            bq,
            bdv,
            threads,
        );
        if vc == 0 {
            #[unroll]
            for r in 0..comptime!(bq.div_ceil(threads)) {
                let row = unit + r * threads;
                if row < rows {
                    let z = sl[row];
                    let mut x = 0.0f32;
                    if z > 0.0f32 {
                        x = sm[row] + z.ln();
                    }
                    lse[(q0 + i0 + row) * l.heads + h] = x;
                }
            }
        }
    }
}

/// `δ = rowsum(d_o ∘ o)` per (token, head), in `f32`: the backward's softmax term.
#[cube(launch_unchecked)]
pub fn attn_delta_kernel<F: Float>(
    o: &Array<F>,
    d_o: &Array<F>,
    delta: &mut Array<f32>,
    rows: u32,
    #[comptime] width: usize,
    #[define(F)] _dtype: StorageType,
) {
    let r = linear_unit();
    if r < rows as usize {
        let mut acc = 0.0f32;
        for c in 0..width {
            acc += f32::cast_from(o[r * width + c]) * f32::cast_from(d_o[r * width + c]);
        }
        delta[r] = acc;
    }
}

/// Stages the log-sum-exp and `δ` of query rows `row0 ..` of head `h` (0 past `valid`).
#[cube]
#[allow(clippy::too_many_arguments)]
fn stage_rows(
    lse: &Array<f32>,
    delta: &Array<f32>,
    slse: &mut SharedMemory<f32>,
    sdel: &mut SharedMemory<f32>,
    row0: usize,
    valid: usize,
    h: usize,
    #[comptime] l: AttnLayout,
) {
    let threads = comptime!(l.tile.threads());
    let unit = UNIT_POS as usize;
    #[unroll]
    for r in 0..comptime!(l.bq.div_ceil(threads)) {
        let row = unit + r * threads;
        if row < l.bq {
            let mut a = 0.0f32;
            let mut b = 0.0f32;
            if row < valid {
                a = lse[(row0 + row) * l.heads + h];
                b = delta[(row0 + row) * l.heads + h];
            }
            slse[row] = a;
            sdel[row] = b;
        }
    }
}

/// From `S` and `dP`: `P = exp(x − lse)` (0 where masked) and `dS = P ∘ (dP − δ) · ∂x/∂s`, the
/// gradient of the raw product `q · k` (the scale included).
#[cube]
#[allow(clippy::too_many_arguments)]
fn probs_and_grads<F: Float>(
    ss: &SharedMemory<f32>,
    sdp: &SharedMemory<f32>,
    slse: &SharedMemory<f32>,
    sdel: &SharedMemory<f32>,
    sp: &mut SharedMemory<F>,
    sds: &mut SharedMemory<F>,
    i0: usize,
    rows: usize,
    off: usize,
    j0: usize,
    kr: usize,
    scale: f32,
    window: u32,
    cap: f32,
    #[comptime] write_p: bool,
    #[comptime] l: AttnLayout,
) {
    let threads = comptime!(l.tile.threads());
    let (bq, bk) = comptime!((l.bq, l.bk));
    let (lds, ldp) = comptime!((bk + PAD_F, bk + l.ph));
    let unit = UNIT_POS as usize;
    #[unroll]
    for r in 0..comptime!((bq * bk).div_ceil(threads)) {
        let e = unit + r * threads;
        if e < comptime!(bq * bk) {
            let row = e / bk;
            let col = e % bk;
            let x = capped(ss[row * lds + col], scale, cap, l);
            let g = cap_grad(x, scale, cap, l);
            let mut p = 0.0f32;
            if row < rows && col < kr && sees(i0 + row + off, j0 + col, window, l) {
                p = (x - slse[row]).exp();
            }
            let ds = p * (sdp[row * lds + col] - sdel[row]) * g;
            if comptime!(write_p) {
                sp[row * ldp + col] = F::cast_from(p);
            }
            sds[row * ldp + col] = F::cast_from(ds);
        }
    }
}

/// Backward `dq`. Cubes `(query block · column chunk, head, sequence)`.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn attn_dq_kernel<F: Float>(
    q: &Array<F>,
    k: &Array<F>,
    v: &Array<F>,
    d_o: &Array<F>,
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
    let (bq, bk, bd) = comptime!((l.bq, l.bk, l.bd));
    let threads = comptime!(l.tile.threads());
    let nd = comptime!(l.nd());
    let qb = CUBE_POS_X as usize / nd;
    let dc = CUBE_POS_X as usize % nd;
    let h = CUBE_POS_Y as usize;
    let n = CUBE_POS_Z as usize;
    let hk = h / comptime!(l.heads / l.kv_heads);
    let (q0, lq, k0, lk) = bounds(cu_seqlens, n, q_len, kv_len, l.varlen);
    let i0 = qb * bq;
    if i0 < lq {
        let rows = chunk_len(lq, i0, bq);
        let off = key_offset(lq, lk);
        let mut sq = tile_h::<F>(bq, bd, l);
        let mut sk = tile_h::<F>(bk, bd, l);
        let mut sdo = tile_h::<F>(bq, l.bdv, l);
        let mut sv = tile_h::<F>(bk, l.bdv, l);
        let mut ss = tile_f(bq, bk);
        let mut sdp = tile_f(bq, bk);
        let mut sds = tile_h::<F>(bq, bk, l);
        // Probabilities are not needed here: a placeholder for `probs_and_grads`.
        let mut sp = tile_h::<F>(1usize, 1usize, l);
        let mut sdq = tile_f(bq, bd);
        let mut slse = SharedMemory::<f32>::new(bq);
        let mut sdel = SharedMemory::<f32>::new(bq);

        let (j_lo, j_hi) = key_range(i0 + off, rows, lk, window, l);
        fill_f(&mut sdq, 0.0f32, bq, bd, threads);
        stage_rows(lse, delta, &mut slse, &mut sdel, q0 + i0, rows, h, l);
        if comptime!(nd == 1) {
            stage::<F>(q, &mut sq, q0 + i0, rows, h, 0, l.heads, l.d, bq, bd, l);
        }
        if comptime!(l.ndv() == 1) {
            stage::<F>(
                d_o,
                &mut sdo,
                q0 + i0,
                rows,
                h,
                0,
                l.heads,
                l.dv,
                bq,
                l.bdv,
                l,
            );
        }
        let pre = comptime!(l.prefetch());
        let kb_lo = j_lo / bk;
        let kb_hi = j_hi.div_ceil(bk);
        let mut rk = Array::<F>::new(comptime!(pair_regs(bk, false, &l)));
        let mut rv = Array::<F>::new(comptime!(pair_regs(bk, true, &l)));
        if comptime!(pre) {
            if kb_lo < kb_hi {
                let j0 = kb_lo * bk;
                let kr = chunk_len(lk, j0, bk);
                fetch_pair::<F>(k, v, &mut rk, &mut rv, k0 + j0, kr, hk, l.kv_heads, bk, l);
            }
        }
        for kb in kb_lo..kb_hi {
            let j0 = kb * bk;
            let kr = chunk_len(lk, j0, bk);
            if comptime!(pre) {
                put_tile::<F>(&rk, &mut sk, bk, bd, l.ph, l.tile);
                put_tile::<F>(&rv, &mut sv, bk, l.bdv, l.ph, l.tile);
                if kb + 1 < kb_hi {
                    let j1 = j0 + bk;
                    let kr1 = chunk_len(lk, j1, bk);
                    fetch_pair::<F>(k, v, &mut rk, &mut rv, k0 + j1, kr1, hk, l.kv_heads, bk, l);
                }
            }
            scores_and_grads::<F>(
                q,
                k,
                d_o,
                v,
                &mut sq,
                &mut sk,
                &mut sdo,
                &mut sv,
                &mut ss,
                &mut sdp,
                q0 + i0,
                rows,
                h,
                k0 + j0,
                kr,
                hk,
                false,
                l,
            );
            probs_and_grads::<F>(
                &ss, &sdp, &slse, &sdel, &mut sp, &mut sds, i0, rows, off, j0, kr, scale, window,
                cap, false, l,
            );
            // With several chunks, `sk` holds the last one: stage this cube's.
            if comptime!(nd > 1) {
                stage::<F>(
                    k,
                    &mut sk,
                    k0 + j0,
                    kr,
                    hk,
                    dc * bd,
                    l.kv_heads,
                    l.d,
                    bk,
                    bd,
                    l,
                );
            }
            sync_cube();
            let s = comptime!(MmaShape {
                accumulate: true,
                ..shape(bq, bd, bk, bk + l.ph, bd + l.ph, bd + PAD_F)
            });
            mma::<F, F>(&sds, 0, &sk, 0, &mut sdq, 0, s, l.tile);
            sync_cube();
        }
        store::<F>(
            &sdq,
            &slse,
            dq,
            q0 + i0,
            rows,
            h,
            dc * bd,
            false,
            l.heads,
            l.d,
            bq,
            bd,
            threads,
        );
    }
}

/// Backward `dk`, `dv`, summed over the query heads of a group. Cubes
/// `(key block · column chunk, key/value head, sequence)`; chunk `c` computes `dk` columns
/// `c · bd ..` (when `c < nd`) and `dv` columns `c · bdv ..` (when `c < ndv`).
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn attn_dkv_kernel<F: Float>(
    q: &Array<F>,
    k: &Array<F>,
    v: &Array<F>,
    d_o: &Array<F>,
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
    let (bq, bk, bd, bdv) = comptime!((l.bq, l.bk, l.bd, l.bdv));
    let threads = comptime!(l.tile.threads());
    let (nd, ndv) = comptime!((l.nd(), l.ndv()));
    let nc = comptime!(if nd > ndv { nd } else { ndv });
    let kb = CUBE_POS_X as usize / nc;
    let cc = CUBE_POS_X as usize % nc;
    let hk = CUBE_POS_Y as usize;
    let n = CUBE_POS_Z as usize;
    let group = comptime!(l.heads / l.kv_heads);
    let (q0, lq, k0, lk) = bounds(cu_seqlens, n, q_len, kv_len, l.varlen);
    let j0 = kb * bk;
    if j0 < lk {
        let kr = chunk_len(lk, j0, bk);
        let off = key_offset(lq, lk);
        let mut sq = tile_h::<F>(bq, bd, l);
        let mut sk = tile_h::<F>(bk, bd, l);
        let mut sdo = tile_h::<F>(bq, bdv, l);
        let mut sv = tile_h::<F>(bk, bdv, l);
        let mut ss = tile_f(bq, bk);
        let mut sdp = tile_f(bq, bk);
        let mut sp = tile_h::<F>(bq, bk, l);
        let mut sds = tile_h::<F>(bq, bk, l);
        let mut sdk = tile_f(bk, bd);
        let mut sdv = tile_f(bk, bdv);
        let mut slse = SharedMemory::<f32>::new(bq);
        let mut sdel = SharedMemory::<f32>::new(bq);

        fill_f(&mut sdk, 0.0f32, bk, bd, threads);
        fill_f(&mut sdv, 0.0f32, bk, bdv, threads);
        if comptime!(nd == 1) {
            stage::<F>(k, &mut sk, k0 + j0, kr, hk, 0, l.kv_heads, l.d, bk, bd, l);
        }
        if comptime!(ndv == 1) {
            stage::<F>(v, &mut sv, k0 + j0, kr, hk, 0, l.kv_heads, l.dv, bk, bdv, l);
        }
        let (qb_lo, qb_hi) = query_blocks(j0, kr, off, lq, window, l);
        let pre = comptime!(l.prefetch());
        let mut rq = Array::<F>::new(comptime!(pair_regs(bq, false, &l)));
        let mut rdo = Array::<F>::new(comptime!(pair_regs(bq, true, &l)));
        if comptime!(pre) {
            if qb_lo < qb_hi {
                let i0 = qb_lo * bq;
                let rows = chunk_len(lq, i0, bq);
                let h = hk * group;
                fetch_pair::<F>(q, d_o, &mut rq, &mut rdo, q0 + i0, rows, h, l.heads, bq, l);
            }
        }
        for g in 0..group {
            let h = hk * group + g;
            for qb in qb_lo..qb_hi {
                let i0 = qb * bq;
                let rows = chunk_len(lq, i0, bq);
                stage_rows(lse, delta, &mut slse, &mut sdel, q0 + i0, rows, h, l);
                if comptime!(pre) {
                    put_tile::<F>(&rq, &mut sq, bq, bd, l.ph, l.tile);
                    put_tile::<F>(&rdo, &mut sdo, bq, bdv, l.ph, l.tile);
                    let (nh, nqb, more) = next_query_block(h, qb, qb_lo, qb_hi, g, group);
                    if more {
                        let i1 = nqb * bq;
                        let rows1 = chunk_len(lq, i1, bq);
                        fetch_pair::<F>(
                            q,
                            d_o,
                            &mut rq,
                            &mut rdo,
                            q0 + i1,
                            rows1,
                            nh,
                            l.heads,
                            bq,
                            l,
                        );
                    }
                }
                scores_and_grads::<F>(
                    q,
                    k,
                    d_o,
                    v,
                    &mut sq,
                    &mut sk,
                    &mut sdo,
                    &mut sv,
                    &mut ss,
                    &mut sdp,
                    q0 + i0,
                    rows,
                    h,
                    k0 + j0,
                    kr,
                    hk,
                    true,
                    l,
                );
                probs_and_grads::<F>(
                    &ss, &sdp, &slse, &sdel, &mut sp, &mut sds, i0, rows, off, j0, kr, scale,
                    window, cap, true, l,
                );
                // With several chunks, `sq`/`sdo` hold the last ones: stage this cube's.
                if comptime!(nd > 1) {
                    if cc < nd {
                        stage::<F>(
                            q,
                            &mut sq,
                            q0 + i0,
                            rows,
                            h,
                            cc * bd,
                            l.heads,
                            l.d,
                            bq,
                            bd,
                            l,
                        );
                    }
                }
                if comptime!(ndv > 1) {
                    if cc < ndv {
                        stage::<F>(
                            d_o,
                            &mut sdo,
                            q0 + i0,
                            rows,
                            h,
                            cc * bdv,
                            l.heads,
                            l.dv,
                            bq,
                            bdv,
                            l,
                        );
                    }
                }
                sync_cube();
                // dV += Pᵀ dO, dK += dSᵀ Q.
                if cc < ndv {
                    let s = comptime!(MmaShape {
                        a_col: true,
                        accumulate: true,
                        ..shape(bk, bdv, bq, bk + l.ph, bdv + l.ph, bdv + PAD_F)
                    });
                    mma::<F, F>(&sp, 0, &sdo, 0, &mut sdv, 0, s, l.tile);
                }
                if cc < nd {
                    let s = comptime!(MmaShape {
                        a_col: true,
                        accumulate: true,
                        ..shape(bk, bd, bq, bk + l.ph, bd + l.ph, bd + PAD_F)
                    });
                    mma::<F, F>(&sds, 0, &sq, 0, &mut sdk, 0, s, l.tile);
                }
                sync_cube();
            }
        }
        if cc < nd {
            store::<F>(
                &sdk,
                &slse,
                dk,
                k0 + j0,
                kr,
                hk,
                cc * bd,
                false,
                l.kv_heads,
                l.d,
                bk,
                bd,
                threads,
            );
        }
        if cc < ndv {
            store::<F>(
                &sdv,
                &slse,
                dv,
                k0 + j0,
                kr,
                hk,
                cc * bdv,
                false,
                l.kv_heads,
                l.dv,
                bk,
                bdv,
                threads,
            );
        }
    }
}
