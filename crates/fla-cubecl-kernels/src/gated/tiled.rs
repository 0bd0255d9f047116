//! Chunkwise-parallel form of the gated family, fused: one cube walks
//! a sequence's chunks keeping its slice of the state on chip, and every product inside a chunk is
//! a tile product ([`crate::tile::mma`]: tensor cores where the device has them).
//!
//! The math is the chunk form of [`super::chunk`] with a scalar gate, where the decay between two
//! positions factors: `A = (Q Kᵀ) ∘ D`, `D_rs = exp(λ_r − λ_s)` for `s ≤ r` (at most 1, so no
//! overflow whatever the gate), `λ` the log gate cumulated from the chunk start.
//!
//! Three kernels, as FLA's `fused_chunk` kernels split the work:
//! - forward, cubes `(value block, head, sequence)`, state slice `S[K, BV]` in shared memory:
//!   `O = scale · (q̃ S + (A ∘ D ∘ M) V)`, then `S ← exp(λ_C) S + k̃ᵀ V`;
//! - backward `dq`, cubes `(key block, head, sequence)`, walking forwards with `S[BK, V]`:
//!   `dQ = (scale · dA ∘ D ∘ M) K + (scale · exp(λ_r) dO) Sᵀ`, `dA = dO Vᵀ`;
//! - backward `dk, dv, dh0`, cubes `(value block, head, sequence)`, walking backwards with
//!   `G = ∂L/∂S` (from `dhT`): `dV = (scale · A ∘ D ∘ M)ᵀ dO + k̃ G`,
//!   `dK = (scale · dA ∘ D ∘ M)ᵀ Q + ṽ Gᵀ` (a partial over the value block),
//!   `G ← exp(λ_C) G + q̃ᵀ dO`;
//!
//! with `q̃_r = scale · exp(λ_r) q_r`, `k̃_s = exp(λ_C − λ_s) k_s`, `ṽ_s = exp(λ_C − λ_s) v_s`.
//! Rows past a sequence's end are loaded as zeros and their gates as 0, so a last, short chunk
//! needs no other care. States and products accumulate in `f32`; the operands of a product are
//! in the input dtype (the state is rounded to it for `q̃ S`, as FLA does).
//!
//! Vector gates (GLA, `Λ_r ∈ R^K` cumulated per key) take the same three walks in chunks of 16:
//! the decay no longer factors out of `Q Kᵀ`, so the scores `A_rs = Σ_j q_rj k_sj exp(Λ_rj − Λ_sj)`
//! and the in-chunk terms of `dq` and `dk` are summed entry by entry, every exponent at most 0
//! (FLA's sub-chunks of 16 do the same on their diagonal blocks); the gates move to the key
//! columns of `q̃ = scale · q ∘ exp(Λ_r)`, `k̃ = k ∘ exp(Λ_C − Λ_s)` and of the state's decay
//! `diag(exp(Λ_C))`, and `dk`'s state term is `exp(Λ_C − Λ_s) ∘ (V Gᵀ)`. Those entry-by-entry
//! sums are done once, not once per block of a walk: the scores by a kernel of their own
//! ([`vector_scores_kernel`], every chunk in parallel) whose `[B·T, H, C]` output the forward and
//! `dk`/`dv` walks read as a tile (and which a forward can keep for its backward, as FLA's chunk
//! GLA keeps its `A`: the backward then only cumulates the gates), and `dk`'s in-chunk term by
//! the `dq` walk, which holds the whole `dA = dO Vᵀ` and writes it as one more partial of `dk`.
//! A scalar gate can take the same walks (opt-in: `tiled_launch::simple_scores_route`): its
//! scores and `Λ` repeated over the keys from [`scalar_scores_kernel`], the in-chunk terms of
//! `dq` and `dk` from [`scalar_grads_kernel`], both tile products with the decay applied entry
//! by entry.
//!
//! Each walk can also be split ([`TiledLayout::span`], [`TiledLayout::states`]; where it is
//! taken: `tiled_launch::split_forward`): a states pass, the forward walk (or, for `G`, the
//! `dk, dv` walk) keeping only the state's update, in chunks of 64 whatever the gate, writes
//! the state entering each span of 64 positions (`G` at each span's end) to memory; then the
//! same kernels run with one cube per span, starting from those states, all spans in parallel.
//!
//! Every exponential here has an exponent at most 0, and the helpers that take them compile with
//! reduced-precision exponentials (`fast_math`: CUDA's `__expf`, two instructions instead of a
//! dozen): its error, a few `f32` ulps per unit of the exponent, is far below the rounding of
//! the inputs, and the instruction count is what bounds these kernels (Nsight Compute on an H200:
//! issue slots 63 % busy, memory 3 % of its bandwidth).

#![allow(clippy::collapsible_if)]

use cubecl::prelude::*;

use super::chunk::chunk_len;
use super::recurrent_fwd::{seq_length, seq_start, token_at};
use super::tiled_launch::tuning;
use crate::tile::{fast_exp, mma, put_tile, regs_for, tile_entry, MmaShape, TileConfig, FRAG};

/// Compile-time shape of a tiled chunk launch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TiledLayout {
    pub heads: usize,
    pub k: usize,
    pub v: usize,
    /// `K` and `V` rounded up to a fragment (16).
    pub kp: usize,
    pub vp: usize,
    /// Positions per chunk (a multiple of 16).
    pub chunk: usize,
    /// Value columns per cube (forward, `dk`/`dv` pass) and key rows per cube (`dq` pass).
    pub bv: usize,
    pub bk: usize,
    /// Key columns of `dK` computed at once (divides `kp`).
    pub nb: usize,
    /// Row padding of input-dtype tiles, in elements (16 bytes: 8 half-precision values, 4 f32).
    pub ph: usize,
    pub scalar_gate: bool,
    /// A log gate per key dimension (GLA): the decay between two positions no longer factors
    /// out of `Q Kᵀ`, so the chunk's scores and the intra-chunk parts of `dq` and `dk` are
    /// computed entry by entry, `exp(Λ_r − Λ_s)` inside the sum over keys (at most 1 for `s ≤ r`:
    /// no overflow whatever the gates); the products with the state stay tile products.
    pub vector_gate: bool,
    /// Query/key heads: `heads` in the gated family; fewer in the delta rule's forward, whose
    /// `heads` are its value heads (each query/key head serves `heads / qk_heads` of them).
    pub qk_heads: usize,
    /// The delta rule's forward ([`crate::delta::tiled`]): the values are `U = Ũ − W S`, from
    /// the chunk's WY factors `W` and `Ũ` (`f32` inputs) and the state entering it.
    pub delta: bool,
    pub reverse: bool,
    pub varlen: bool,
    pub has_h0: bool,
    pub has_ht: bool,
    /// Chunks per cube (0: one cube walks the whole sequence), in the forward, `dq` and `dk`/`dv`
    /// kernels alike. With spans, cube `x` is `span · blocks + block` (value blocks; key blocks
    /// for `dq`), and a cube starts its span from the state (the forward, `dq`) or the state's
    /// gradient (`dk`/`dv`) that a states pass ([`TiledLayout::states`]) left in `hs` instead of
    /// walking every chunk before it: the chunks of a sequence then run in parallel, as FLA's
    /// `chunk_fwd_o` does, and only the states passes are sequential.
    pub span: usize,
    /// The forward's states pass: the walk keeps only the state's update (no queries, scores or
    /// outputs) and writes the state entering each chunk to `hs` (`[N, spans, H, K, V]`, `f32`).
    pub states: bool,
    pub tile: TileConfig,
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

/// `A · B`, all row-major.
pub fn nn(m: usize, n: usize, k: usize, lda: usize, ldb: usize, ldo: usize) -> MmaShape {
    shape(m, n, k, lda, ldb, ldo)
}

/// `A · Bᵀ` with `B` stored row-major (`n × k`).
pub fn nt(m: usize, n: usize, k: usize, lda: usize, ldb: usize, ldo: usize) -> MmaShape {
    MmaShape {
        b_col: true,
        ..shape(m, n, k, lda, ldb, ldo)
    }
}

/// `Aᵀ · B` with `A` stored row-major (`k × m`).
pub fn tn(m: usize, n: usize, k: usize, lda: usize, ldb: usize, ldo: usize) -> MmaShape {
    MmaShape {
        a_col: true,
        ..shape(m, n, k, lda, ldb, ldo)
    }
}

pub fn accum(s: MmaShape) -> MmaShape {
    MmaShape {
        accumulate: true,
        ..s
    }
}

/// Padding of each shared-memory row, in elements: 16 bytes (8 half-precision values, 4 `f32`;
/// the layout's `ph` for input-dtype tiles, [`PAD_F`] for `f32` ones). Without it, the rows of a 16×16 fragment 128 or 256 bytes apart all fall into
/// the same banks and its loads serialise. Fragment starts stay 32-byte aligned, as `wmma` needs.
pub const PAD_H: usize = 8;
pub const PAD_F: usize = 4;

/// Bytes of a `rows × cols` tile of `elem`-byte values with padded rows, rounded up to the 64
/// bytes each tile is aligned to ([`tile_h`], [`tile_f`]: CUDA sizes a kernel's shared memory
/// from the aligned offsets; whole tiles of 16 rows are multiples already, the states passes'
/// one-row tiles are not).
pub(crate) fn tile_bytes(rows: usize, cols: usize, elem: usize) -> usize {
    let pad = if elem == 4 { PAD_F } else { PAD_H };
    (rows * (cols + pad) * elem).next_multiple_of(64)
}

/// Shared-memory bytes of the forward kernel.
pub fn fwd_smem(l: &TiledLayout, e: usize) -> usize {
    let (c, kp, bv) = (l.chunk, l.kp, l.bv);
    // The states pass keeps one row of the query, score and output tiles.
    let co = if l.states { 1 } else { c };
    let half_state = if l.tile.cmma {
        tile_bytes(kp, bv, e)
    } else {
        0
    };
    // The delta rule's `W` tile.
    let w = if l.delta { tile_bytes(c, kp, e) } else { 0 };
    tile_bytes(co, kp, e)
        + tile_bytes(c, kp, e)
        + tile_bytes(c, bv, e)
        + tile_bytes(co, c, 4)
        + tile_bytes(co, c, e)
        + tile_bytes(co, bv, 4)
        + tile_bytes(kp, bv, 4)
        + half_state
        + w
        + key_gates_bytes(l, kp)
        + 8 * c
}

/// Shared-memory bytes of [`vector_scores_kernel`].
pub fn scores_smem(l: &TiledLayout, e: usize) -> usize {
    2 * tile_bytes(l.chunk, l.kp, e)
        + tile_bytes(l.chunk, l.chunk, e)
        + key_gates_bytes(l, l.kp)
        + 4 * score_scratch_len(l, factored_scores_on(l), diag_regs_on(l))
        + factored_smem(l)
}

/// Shared-memory bytes of the cumulated vector gates `Λ` (`C × cols`, `f32`), 0 without them.
fn key_gates_bytes(l: &TiledLayout, cols: usize) -> usize {
    if l.vector_gate {
        tile_bytes(l.chunk, cols, 4)
    } else {
        0
    }
}

/// Shared-memory bytes of the `dq` kernel.
pub fn dq_smem(l: &TiledLayout, e: usize) -> usize {
    let (c, vp, bk) = (l.chunk, l.vp, l.bk);
    let half_state = if l.tile.cmma {
        tile_bytes(bk, vp, e)
    } else {
        0
    };
    tile_bytes(c, bk, e)
        + 2 * tile_bytes(c, vp, e)
        + tile_bytes(c, c, 4)
        + tile_bytes(c, c, e)
        + tile_bytes(c, bk, 4)
        + tile_bytes(bk, vp, 4)
        + half_state
        + key_gates_bytes(l, bk)
        + dk_intra_bytes(l, e)
        + factored_grads_smem(l, bk, e)
        + 8 * c
}

/// The `dq` walk's query tile and in-chunk `dk` tile under vector gates (0 without them).
fn dk_intra_bytes(l: &TiledLayout, e: usize) -> usize {
    if l.vector_gate {
        tile_bytes(l.chunk, l.bk, e) + tile_bytes(l.chunk, l.bk, 4)
    } else {
        0
    }
}

/// Shared-memory bytes of the `dk`/`dv` kernel.
pub fn dkv_smem(l: &TiledLayout, e: usize) -> usize {
    let (c, kp, bv) = (l.chunk, l.kp, l.bv);
    // The states pass keeps one row of the key, value, score and gradient tiles.
    let co = if l.states { 1 } else { c };
    let half_state = if l.tile.cmma {
        tile_bytes(kp, bv, e)
    } else {
        0
    };
    tile_bytes(c, kp, e)
        + tile_bytes(co, kp, e)
        + tile_bytes(co, bv, e)
        + tile_bytes(c, bv, e)
        + tile_bytes(co, c, 4)
        + tile_bytes(co, c, e)
        + tile_bytes(co, bv, 4)
        + tile_bytes(co, l.nb, 4)
        + tile_bytes(kp, bv, 4)
        + half_state
        + key_gates_bytes(l, kp)
        + 8 * c
}

/// A shared-memory tile of `rows × (cols + pad)` values.
#[cube]
pub(crate) fn tile_h<F: Float>(
    #[comptime] rows: usize,
    #[comptime] cols: usize,
    #[comptime] l: TiledLayout,
) -> SharedMemory<F> {
    SharedMemory::<F>::new_aligned(comptime!(rows * (cols + l.ph)), 64usize)
}

#[cube]
pub(crate) fn tile_f(#[comptime] rows: usize, #[comptime] cols: usize) -> SharedMemory<f32> {
    SharedMemory::<f32>::new_aligned(comptime!(rows * (cols + PAD_F)), 64usize)
}

/// Fetches rows `p0 .. p0 + C` (processing order) of columns `col0 .. col0 + cols` of a
/// `[B·T, H, width]` tensor into this unit's registers (zeros outside the sequence or the
/// tensor's columns); [`stage_tile`] then writes them to a padded row-major `C × cols` tile.
/// Fetching the next chunk before computing the current one keeps the loads in flight during
/// the products instead of stalling on them after each barrier.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn fetch_tile<S: Float, F: Float>(
    src: &Array<S>,
    regs: &mut Array<F>,
    bos: usize,
    len: usize,
    p0: usize,
    cl: usize,
    h: usize,
    col0: usize,
    #[comptime] width: usize,
    #[comptime] cols: usize,
    #[comptime] l: TiledLayout,
) {
    fetch_rows::<S, F>(src, regs, bos, len, p0, cl, h, col0, width, cols, false, l);
}

/// [`fetch_tile`], where with `repeat_last` the rows past the sequence repeat its last row
/// (`cl ≥ 1`) instead of reading as zeros.
#[cube]
#[allow(clippy::too_many_arguments)]
fn fetch_rows<S: Float, F: Float>(
    src: &Array<S>,
    regs: &mut Array<F>,
    bos: usize,
    len: usize,
    p0: usize,
    cl: usize,
    h: usize,
    col0: usize,
    #[comptime] width: usize,
    #[comptime] cols: usize,
    #[comptime] repeat_last: bool,
    #[comptime] l: TiledLayout,
) {
    let threads = comptime!(l.tile.threads());
    let entries = comptime!(l.chunk * cols);
    #[unroll]
    for r in 0..comptime!(entries.div_ceil(threads)) {
        let (row, c) = tile_entry(r, cols, l.tile);
        let col = col0 + c;
        let mut x = F::cast_from(0.0f32);
        let mut at = row;
        let mut inside = row < cl;
        if comptime!(repeat_last) {
            inside = row < l.chunk;
            if at >= cl {
                at = cl - 1;
            }
        }
        if inside && col < width {
            let tok = token_at(bos, len, p0 + at, l.reverse);
            x = F::cast_from(src[(tok * l.heads + h) * width + col]);
        }
        regs[r] = x;
    }
}

/// Writes what [`fetch_tile`] fetched into the tile.
#[cube]
pub(crate) fn stage_tile<F: Float>(
    regs: &Array<F>,
    dst: &mut SharedMemory<F>,
    #[comptime] cols: usize,
    #[comptime] l: TiledLayout,
) {
    put_tile::<F>(regs, dst, l.chunk, cols, l.ph, l.tile);
}

/// Registers one unit needs for a `C × cols` tile.
pub fn tile_regs(l: &TiledLayout, cols: usize) -> usize {
    regs_for(l.chunk, cols, &l.tile)
}

/// Stores rows `< cl` of a padded row-major `C × cols` `f32` tile into columns `col0 ..` of a
/// `[B·T, H, width]` tensor starting at `offset`, converting to `O`.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn store_tile<O: Float>(
    src: &SharedMemory<f32>,
    dst: &mut Array<O>,
    offset: usize,
    bos: usize,
    len: usize,
    p0: usize,
    cl: usize,
    h: usize,
    col0: usize,
    #[comptime] width: usize,
    #[comptime] cols: usize,
    #[comptime] l: TiledLayout,
) {
    let threads = comptime!(l.tile.threads());
    let entries = comptime!(l.chunk * cols);
    let ld = comptime!(cols + PAD_F);
    #[unroll]
    for r in 0..comptime!(entries.div_ceil(threads)) {
        let (row, c) = tile_entry(r, cols, l.tile);
        let col = col0 + c;
        if row < cl && col < width {
            let tok = token_at(bos, len, p0 + row, l.reverse);
            dst[offset + (tok * l.heads + h) * width + col] = O::cast_from(src[row * ld + c]);
        }
    }
}

/// Stages the chunk's raw log gates (0 past its end, and without a gate).
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn load_gates<F: Float>(
    g: &Array<F>,
    gl: &mut SharedMemory<f32>,
    bos: usize,
    len: usize,
    p0: usize,
    cl: usize,
    h: usize,
    #[comptime] l: TiledLayout,
) {
    let unit = UNIT_POS as usize;
    if unit < l.chunk {
        let mut x = 0.0f32;
        if comptime!(l.scalar_gate) {
            if unit < cl {
                let tok = token_at(bos, len, p0 + unit, l.reverse);
                x = f32::cast_from(g[tok * l.heads + h]);
            }
        }
        gl[unit] = x;
    }
}

/// `λ_r`, the gates cumulated from the chunk start (after [`load_gates`] and a barrier). Rows past
/// the end repeat the last, so `λ[C − 1]` is the chunk's total.
#[cube]
pub(crate) fn cumulate_gates(
    gl: &SharedMemory<f32>,
    lam: &mut SharedMemory<f32>,
    #[comptime] l: TiledLayout,
) {
    let unit = UNIT_POS as usize;
    if unit < l.chunk {
        let mut acc = 0.0f32;
        #[unroll(l.tile.unroll)]
        for u in 0..l.chunk {
            if u <= unit {
                acc += gl[u];
            }
        }
        lam[unit] = acc;
    }
}

/// `dst[r, s] = factor · src[r, s] · exp(λ_r − λ_s)` for `s ≤ r`, 0 above the diagonal (both
/// `C × C`, padded rows).
#[cube(fast_math = fast_exp())]
pub(crate) fn masked_decay<F: Float>(
    src: &SharedMemory<f32>,
    dst: &mut SharedMemory<F>,
    lam: &SharedMemory<f32>,
    factor: f32,
    #[comptime] l: TiledLayout,
) {
    let threads = comptime!(l.tile.threads());
    let c = comptime!(l.chunk);
    let (lds, ldd) = comptime!((l.chunk + PAD_F, l.chunk + l.ph));
    let unit = UNIT_POS as usize;
    #[unroll]
    for r in 0..comptime!((c * c).div_ceil(threads)) {
        let e = unit + r * threads;
        if e < c * c {
            let row = e / c;
            let col = e % c;
            let mut x = 0.0f32;
            if col <= row {
                x = src[row * lds + col] * factor;
                if comptime!(l.scalar_gate) {
                    x *= (lam[row] - lam[col]).exp();
                }
            }
            dst[row * ldd + col] = F::cast_from(x);
        }
    }
}

/// Scales row `r` of a padded row-major `C × cols` tile by `factor · exp(λ_r)`
/// (`from_end = false`) or by `factor · exp(λ_C − λ_r)` (`from_end`).
#[cube(fast_math = fast_exp())]
pub(crate) fn scale_rows<F: Float>(
    t: &mut SharedMemory<F>,
    lam: &SharedMemory<f32>,
    factor: f32,
    #[comptime] cols: usize,
    #[comptime] from_end: bool,
    #[comptime] l: TiledLayout,
) {
    let threads = comptime!(l.tile.threads());
    let entries = comptime!(l.chunk * cols);
    let ld = comptime!(cols + l.ph);
    let unit = UNIT_POS as usize;
    #[unroll]
    for r in 0..comptime!(entries.div_ceil(threads)) {
        let e = unit + r * threads;
        if e < entries {
            let row = e / cols;
            let i = row * ld + e % cols;
            let mut f = factor;
            if comptime!(l.scalar_gate) {
                if comptime!(from_end) {
                    f *= (lam[comptime!(l.chunk - 1)] - lam[row]).exp();
                } else {
                    f *= lam[row].exp();
                }
            }
            t[i] = F::cast_from(f32::cast_from(t[i]) * f);
        }
    }
}

/// Multiplies a padded `rows × cols` `f32` state tile by the chunk's decay `exp(λ_C)`.
#[cube(fast_math = fast_exp())]
pub(crate) fn decay_state(
    s: &mut SharedMemory<f32>,
    lam: &SharedMemory<f32>,
    #[comptime] rows: usize,
    #[comptime] cols: usize,
    #[comptime] l: TiledLayout,
) {
    if comptime!(l.scalar_gate) {
        let threads = comptime!(l.tile.threads());
        let entries = comptime!(rows * cols);
        let ld = comptime!(cols + PAD_F);
        let unit = UNIT_POS as usize;
        let f = lam[comptime!(l.chunk - 1)].exp();
        #[unroll]
        for r in 0..comptime!(entries.div_ceil(threads)) {
            let e = unit + r * threads;
            if e < entries {
                let i = (e / cols) * ld + e % cols;
                s[i] *= f;
            }
        }
    }
}

/// The chunk's cumulated vector log gates `Λ` (`C × cols`, `f32`; one entry where there are none).
#[cube]
pub(crate) fn key_gates_tile(
    #[comptime] cols: usize,
    #[comptime] l: TiledLayout,
) -> SharedMemory<f32> {
    tile_f(
        comptime!(if l.vector_gate { l.chunk } else { 1 }),
        comptime!(if l.vector_gate { cols } else { 1 }),
    )
}

/// Registers for fetching a chunk's vector gates (one where there are none).
pub fn key_gate_regs(l: &TiledLayout, cols: usize) -> usize {
    if l.vector_gate {
        tile_regs(l, cols)
    } else {
        1
    }
}

/// Fetches the chunk's vector gates, columns `col0 .. col0 + cols` (see [`fetch_tile`]): in a
/// states pass the raw log gates (it cumulates them over its own, longer chunks), elsewhere `Λ`,
/// cumulated from the chunk start by [`vector_scores_kernel`], so that the walks spend neither
/// the serial cumulation nor its barrier on every chunk.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn fetch_key_gates<F: Float>(
    g: &Array<F>,
    lam: &Array<f32>,
    regs: &mut Array<f32>,
    bos: usize,
    len: usize,
    p0: usize,
    cl: usize,
    h: usize,
    col0: usize,
    #[comptime] cols: usize,
    #[comptime] l: TiledLayout,
) {
    if comptime!(l.vector_gate) {
        if comptime!(l.states) {
            fetch_tile::<F, f32>(g, regs, bos, len, p0, cl, h, col0, l.k, cols, l);
        } else {
            // Rows past the sequence repeat its last (as `cumulate_key_gates` leaves them), so
            // row `C − 1` holds the chunk's total decay whatever its length.
            fetch_rows::<f32, f32>(lam, regs, bos, len, p0, cl, h, col0, l.k, cols, true, l);
        }
    }
}

/// Writes the fetched gates into `lam` (rows past the sequence hold 0).
#[cube]
pub(crate) fn stage_key_gates(
    regs: &Array<f32>,
    lam: &mut SharedMemory<f32>,
    #[comptime] cols: usize,
    #[comptime] l: TiledLayout,
) {
    if comptime!(l.vector_gate) {
        put_tile::<f32>(regs, lam, l.chunk, cols, PAD_F, l.tile);
    }
}

/// Cumulates the staged gates down each column in place (after a barrier): `Λ_r = Σ_{u ≤ r} g_u`
/// from the chunk start; rows past the end repeat the last, so row `C − 1` is the chunk's total.
#[cube]
pub(crate) fn cumulate_key_gates(
    lam: &mut SharedMemory<f32>,
    #[comptime] cols: usize,
    #[comptime] l: TiledLayout,
) {
    if comptime!(l.vector_gate) {
        let threads = comptime!(l.tile.threads());
        let ld = comptime!(cols + PAD_F);
        let unit = UNIT_POS as usize;
        #[unroll]
        for b in 0..comptime!(cols.div_ceil(threads)) {
            let col = unit + b * threads;
            if col < cols {
                let mut acc = 0.0f32;
                #[unroll(l.tile.unroll)]
                for r in 0..l.chunk {
                    acc += lam[r * ld + col];
                    lam[r * ld + col] = acc;
                }
            }
        }
    }
}

/// Scores of a chunk on or below its diagonal, `C (C + 1) / 2`: the only ones
/// [`key_gated_scores`] sums (the rest are 0).
pub fn score_entries(l: &TiledLayout) -> usize {
    l.chunk * (l.chunk + 1) / 2
}

/// How many units share one score of [`key_gated_scores`] (each sums a slice of the keys): the
/// `C (C + 1) / 2` scores alone would leave most of the cube idle through a `K`-long loop. A
/// power of two whose slices are whole fragments, as many as the cube has units for.
pub fn score_split(l: &TiledLayout) -> usize {
    let mut split = 1;
    while 2 * split * score_entries(l) <= l.tile.threads()
        && (l.kp / FRAG).is_multiple_of(2 * split)
    {
        split *= 2;
    }
    split
}

/// Row and column of the `e`-th score on or below the diagonal of a `C × C` chunk (`C` even).
/// Rows `p` and `C − 1 − p` pair up into `C + 1` entries, so that consecutive units take
/// consecutive entries of the triangle with none of them masked out.
#[cube]
pub(crate) fn triangle_entry(e: usize, #[comptime] c: usize) -> (usize, usize) {
    let p = e / comptime!(c + 1);
    let i = e % comptime!(c + 1);
    let mut row = p;
    let mut col = i;
    if i > p {
        row = comptime!(c - 1) - p;
        col = i - p - 1;
    }
    (row, col)
}

/// The inverse of [`triangle_entry`], for `col ≤ row`.
#[cube]
pub(crate) fn triangle_index(row: usize, col: usize, #[comptime] c: usize) -> usize {
    let mut e = row * comptime!(c + 1) + col;
    if row >= comptime!(c / 2) {
        let p = comptime!(c - 1) - row;
        e = p * comptime!(c + 1) + col + p + 1;
    }
    e
}

/// Scratch for the partial scores of [`key_gated_scores`] or [`factored_scores`] (one entry
/// without vector gates).
#[cube]
pub(crate) fn score_scratch(
    #[comptime] l: TiledLayout,
    #[comptime] factored: bool,
    #[comptime] regs: bool,
) -> SharedMemory<f32> {
    SharedMemory::<f32>::new(comptime!(score_scratch_len(&l, factored, regs)))
}

fn score_scratch_len(l: &TiledLayout, factored: bool, regs: bool) -> usize {
    match (l.vector_gate && !l.states, factored) {
        (false, _) => 1,
        (true, false) => score_split(l) * score_entries(l),
        (true, true) => factored_split(l, regs) * diag_entries(l),
    }
}

/// Key slices [`factored_scores`] sums each diagonal score in: [`diag_reg_split`] with its rows
/// in registers, [`diag_split`] otherwise.
fn factored_split(l: &TiledLayout, regs: bool) -> usize {
    if regs {
        diag_reg_split(l)
    } else {
        diag_split(l)
    }
}

/// Rows of the sub-chunks of [`factored_scores`]: one tensor-core fragment.
pub(crate) const SUB: usize = FRAG;
/// Scores on or below the diagonal of one `SUB × SUB` block.
const SUB_TRI: usize = SUB * (SUB + 1) / 2;

/// Scores [`factored_scores`] sums entry by entry: the lower triangles of the chunk's diagonal
/// `SUB × SUB` blocks.
fn diag_entries(l: &TiledLayout) -> usize {
    l.chunk / SUB * SUB_TRI
}

/// [`score_split`] for the [`diag_entries`].
fn diag_split(l: &TiledLayout) -> usize {
    let mut split = 1;
    while 2 * split * diag_entries(l) <= l.tile.threads() && (l.kp / FRAG).is_multiple_of(2 * split)
    {
        split *= 2;
    }
    split
}

/// Units of [`diag_rows_in_registers`] that share one row pair of a diagonal block, each
/// summing the keys `j ≡ unit (mod split)`: as many as the cube has units for, in powers of two,
/// while each still takes at least 8 keys (its rows' queries and gates stay in registers, four
/// slices of `kp / split`). At most 16, so that it divides `kp` (a multiple of 16).
fn diag_reg_split(l: &TiledLayout) -> usize {
    let pairs = l.chunk / SUB * (SUB / 2);
    let mut split = 1;
    while 2 * split * pairs <= l.tile.threads() && l.kp >= 16 * split && split < 16 {
        split *= 2;
    }
    split
}

/// Whether [`factored_scores`] sums its diagonal blocks with each unit's rows in registers
/// ([`diag_rows_in_registers`]) rather than one entry per unit from shared memory: opt-in
/// (`FLA_GLA_DIAG_REGS=1`) until a GPU has timed it. Its partial sums take more shared memory
/// (`split` of them per entry: 17 KB at a chunk of 32 and `K = 128`, 35 KB at 64, against 2 KB),
/// which [`scores_smem`] counts, so on a device with little of it the layout can fall to a
/// shorter chunk with it on.
pub fn diag_regs_on(l: &TiledLayout) -> bool {
    factored_scores_on(l) && tuning("FLA_GLA_DIAG_REGS") == Some(1)
}

/// Whether the scores kernel takes [`factored_scores`]: where the layout has tensor cores
/// (CUDA); `FLA_GLA_SCORES_TC=1` or `=0` overrides.
pub fn factored_scores_on(l: &TiledLayout) -> bool {
    tuning("FLA_GLA_SCORES_TC").map_or(l.tile.cmma, |v| v == 1)
}

/// Whether the `dq` walk (and [`vector_grads_kernel`]) take the in-chunk terms of `dq` and `dk`
/// with their off-diagonal blocks as tile products ([`factored_grads`]): where the layout has
/// tensor cores (CUDA), the products' point; `FLA_GLA_GRADS_TC=1` or `=0` overrides (lavapipe's
/// tests take it on the plain path).
pub fn factored_grads_on(l: &TiledLayout) -> bool {
    tuning("FLA_GLA_GRADS_TC").map_or(l.tile.cmma, |v| v == 1)
}

/// Shared-memory bytes [`factored_grads`] adds to the `dq` walk and [`vector_grads_kernel`]:
/// the scaled keys and queries (`C × cols`, input dtype) and the `dq` products (`C × cols`,
/// `f32`; the `dk` ones go to the walk's own `dk` tile).
fn factored_grads_smem(l: &TiledLayout, cols: usize, e: usize) -> usize {
    if l.vector_gate && factored_grads_on(l) {
        2 * tile_bytes(l.chunk, cols, e) + tile_bytes(l.chunk, cols, 4)
    } else {
        0
    }
}

/// Shared-memory bytes [`factored_scores`] adds to the scores kernel: its `C × C` `f32` tile of
/// the off-diagonal blocks.
fn factored_smem(l: &TiledLayout) -> usize {
    if factored_scores_on(l) {
        tile_bytes(l.chunk, l.chunk, 4)
    } else {
        0
    }
}

/// The chunk's scores under vector gates, `dst[r, s] = factor · Σ_j q_rj k_sj exp(Λ_rj − Λ_sj)`
/// for `s ≤ r`, 0 above the diagonal (`C × C`, input dtype; `q`, `k` are `C × kp` tiles).
/// [`score_split`] units sum a slice of the keys each for one score of the triangle
/// ([`triangle_entry`]) into `part`, then one unit per score adds them up (the caller
/// synchronises before reading `dst`). Exponentials in reduced precision (CUDA's `__expf`):
/// every exponent is at most 0, where its error stays within a few `f32` ulps per unit of the
/// exponent, far below the inputs' rounding.
#[cube(fast_math = fast_exp())]
pub(crate) fn key_gated_scores<F: Float>(
    q: &SharedMemory<F>,
    k: &SharedMemory<F>,
    lam: &SharedMemory<f32>,
    part: &mut SharedMemory<f32>,
    dst: &mut SharedMemory<F>,
    factor: f32,
    #[comptime] l: TiledLayout,
) {
    let c = comptime!(l.chunk);
    let cc = comptime!(l.chunk * l.chunk);
    let tri = comptime!(score_entries(&l));
    let split = comptime!(score_split(&l));
    let slice = comptime!(l.kp / split);
    let ldd = comptime!(l.chunk + l.ph);
    let unit = UNIT_POS as usize;
    #[unroll]
    for r in 0..comptime!((tri * split).div_ceil(l.tile.threads())) {
        let u = unit + r * comptime!(l.tile.threads());
        if u < tri * split {
            let e = u % tri;
            let j0 = (u / tri) * slice;
            let (row, col) = triangle_entry(e, c);
            part[u] = decayed_dot::<F>(q, k, lam, row, col, j0, slice, l);
        }
    }
    sync_cube();
    #[unroll]
    for r in 0..comptime!(cc.div_ceil(l.tile.threads())) {
        let e = unit + r * comptime!(l.tile.threads());
        if e < cc {
            let (row, col) = (e / c, e % c);
            let mut x = 0.0f32;
            if col <= row {
                let t = triangle_index(row, col, c);
                #[unroll]
                for p in 0..split {
                    x += part[p * tri + t];
                }
            }
            dst[row * ldd + col] = F::cast_from(x * factor);
        }
    }
}

/// One score's sum over the keys `j0 .. j0 + slice`: `Σ_j q_rj k_sj exp(Λ_rj − Λ_sj)` from the
/// staged query and key tiles and their gates (`row` = `r`, `col` = `s ≤ r`).
#[cube(fast_math = fast_exp())]
fn decayed_dot<F: Float>(
    q: &SharedMemory<F>,
    k: &SharedMemory<F>,
    lam: &SharedMemory<f32>,
    row: usize,
    col: usize,
    j0: usize,
    #[comptime] slice: usize,
    #[comptime] l: TiledLayout,
) -> f32 {
    let (ldh, ldl) = comptime!((l.kp + l.ph, l.kp + PAD_F));
    let mut x = 0.0f32;
    #[unroll(l.tile.unroll)]
    for jj in 0..slice {
        let j = j0 + jj;
        let decay = (lam[row * ldl + j] - lam[col * ldl + j]).exp();
        x += f32::cast_from(q[row * ldh + j]) * f32::cast_from(k[col * ldh + j]) * decay;
    }
    x
}

/// [`key_gated_scores`] with the off-diagonal blocks on tensor cores, as FLA's chunk GLA sums
/// them: for the rows `r` of the `SUB`-row block `I` and a key position `s` before it,
/// `exp(Λ_r − Λ_s) = exp(Λ_r − Λ_b) · exp(Λ_b − Λ_s)` with `b = SUB·I`, the block's first row,
/// both exponents at most 0 (the gates' logs are at most 0, so `Λ` falls along the chunk), so
/// `A[I, < b] = (q ∘ exp(Λ − Λ_b))[I] · (k ∘ exp(Λ_b − Λ))[< b]ᵀ` is one product of tiles
/// (operands rounded to the input dtype, as FLA rounds them). Only the lower triangles of the
/// diagonal blocks are summed entry by entry (`C / SUB · SUB (SUB + 1) / 2` scores instead of
/// `C (C + 1) / 2`, each `K` exponentials). `q` and `k` come staged (their tiles, which this
/// overwrites) and in this unit's registers as [`fetch_tile`] left them; `lam` is `Λ`; `part`
/// holds the diagonal blocks' partial sums and `off` (`C × C` `f32`) the products. Writes
/// `dst` as [`key_gated_scores`] does (the caller synchronises before reading it).
#[cube(fast_math = fast_exp())]
#[allow(clippy::too_many_arguments)]
pub(crate) fn factored_scores<F: Float>(
    q: &mut SharedMemory<F>,
    rq: &Array<F>,
    k: &mut SharedMemory<F>,
    rk: &Array<F>,
    lam: &SharedMemory<f32>,
    part: &mut SharedMemory<f32>,
    off: &mut SharedMemory<f32>,
    dst: &mut SharedMemory<F>,
    factor: f32,
    #[comptime] l: TiledLayout,
    #[comptime] regs: bool,
) {
    let c = comptime!(l.chunk);
    let (sub, sub_tri) = comptime!((SUB, SUB_TRI));
    let threads = comptime!(l.tile.threads());
    let diag = comptime!(diag_entries(&l));
    let split = comptime!(factored_split(&l, regs));
    let slice = comptime!(l.kp / split);
    let (ldh, ldl, ldd, ldo) =
        comptime!((l.kp + l.ph, l.kp + PAD_F, l.chunk + l.ph, l.chunk + PAD_F));
    let unit = UNIT_POS as usize;
    // The diagonal blocks, entry by entry, from the raw tiles.
    if comptime!(regs) {
        diag_rows_in_registers::<F>(q, k, lam, part, l);
    } else {
        #[unroll]
        for r in 0..comptime!((diag * split).div_ceil(threads)) {
            let u = unit + r * threads;
            if u < diag * split {
                let e = u % diag;
                let j0 = (u / diag) * slice;
                let base = (e / sub_tri) * sub;
                let (rr, cc) = triangle_entry(e % sub_tri, SUB);
                part[u] = decayed_dot::<F>(q, k, lam, base + rr, base + cc, j0, slice, l);
            }
        }
    }
    sync_cube();
    // `q ∘ exp(Λ − Λ_b)` over the query tile, each row against its own block's first row.
    #[unroll]
    for r in 0..comptime!(regs_for(l.chunk, l.kp, &l.tile)) {
        let (row, j) = tile_entry(r, comptime!(l.kp), l.tile);
        if row < c {
            let b = (row / sub) * sub;
            let decay = (lam[row * ldl + j] - lam[b * ldl + j]).exp();
            q[row * ldh + j] = F::cast_from(f32::cast_from(rq[r]) * decay);
        }
    }
    // Each later block against the keys before it (chunks of at most 64: blocks 1 to 3).
    if comptime!(c > SUB) {
        off_diagonal_block::<F>(q, k, rk, lam, off, 1usize, l);
    }
    if comptime!(c > 2 * SUB) {
        off_diagonal_block::<F>(q, k, rk, lam, off, 2usize, l);
    }
    if comptime!(c > 3 * SUB) {
        off_diagonal_block::<F>(q, k, rk, lam, off, 3usize, l);
    }
    #[unroll]
    for r in 0..comptime!((l.chunk * l.chunk).div_ceil(threads)) {
        let e = unit + r * threads;
        if e < comptime!(l.chunk * l.chunk) {
            let (row, col) = (e / c, e % c);
            let base = (row / sub) * sub;
            let mut x = 0.0f32;
            if col < base {
                x = off[row * ldo + col];
            } else if col <= row {
                let t = (row / sub) * sub_tri + triangle_index(row - base, col - base, SUB);
                #[unroll]
                for p in 0..split {
                    x += part[p * diag + t];
                }
            }
            dst[row * ldd + col] = F::cast_from(x * factor);
        }
    }
}

/// The lower triangles of the chunk's diagonal `SUB × SUB` blocks for [`factored_scores`], into
/// `part` as its entry-by-entry loop leaves them (`part[p · diag + t]`, `p` the key slice, `t`
/// the entry), but with each unit's rows in registers: a unit takes rows `i` and `SUB − 1 − i`
/// of one block (`i < SUB / 2`: 17 scores between them, every unit the same work) and the keys
/// `j ≡ p (mod split)`, holds those rows' queries and gates, and walks the block's 16 key
/// positions once, each key position's key and gate loaded once for both rows. That is two
/// shared-memory loads per key and position where [`decayed_dot`] takes four per score entry.
/// Consecutive units take consecutive `p` (consecutive keys) of the same rows, so the `split`
/// units of a row pair load a key position's keys and gates without bank conflicts; a plane
/// holds `32 / split` row pairs, whose branches (`s ≤ i`, `s ≤ 15 − i`) differ, and whose
/// preloaded rows can share banks (about two ways at `split = 16`).
#[cube(fast_math = fast_exp())]
fn diag_rows_in_registers<F: Float>(
    q: &SharedMemory<F>,
    k: &SharedMemory<F>,
    lam: &SharedMemory<f32>,
    part: &mut SharedMemory<f32>,
    #[comptime] l: TiledLayout,
) {
    let threads = comptime!(l.tile.threads());
    let split = comptime!(diag_reg_split(&l));
    let slice = comptime!(l.kp / split);
    let diag = comptime!(diag_entries(&l));
    let units = comptime!(l.chunk / SUB * (SUB / 2) * split);
    let (ldh, ldl) = comptime!((l.kp + l.ph, l.kp + PAD_F));
    let unit = UNIT_POS as usize;
    #[unroll]
    for r in 0..comptime!(units.div_ceil(threads)) {
        let u = unit + r * threads;
        if u < units {
            let p = u % split;
            let pair = (u / split) % comptime!(SUB / 2);
            let block = u / comptime!(split * (SUB / 2));
            let base = block * SUB;
            // Row `lo` scores positions `..= pair`, row `hi` positions `..= SUB − 1 − pair`.
            let lo = base + pair;
            let hi = base + comptime!(SUB - 1) - pair;
            let mut qlo = Array::<f32>::new(slice);
            let mut qhi = Array::<f32>::new(slice);
            let mut llo = Array::<f32>::new(slice);
            let mut lhi = Array::<f32>::new(slice);
            #[unroll]
            for jj in 0..slice {
                let j = jj * split + p;
                qlo[jj] = f32::cast_from(q[lo * ldh + j]);
                qhi[jj] = f32::cast_from(q[hi * ldh + j]);
                llo[jj] = lam[lo * ldl + j];
                lhi[jj] = lam[hi * ldl + j];
            }
            let at = p * diag + block * comptime!(SUB_TRI);
            #[unroll]
            for s in 0..SUB {
                let col = base + s;
                // Position `s` against both rows (`s ≤ pair`), or against `hi` alone; past `hi`
                // nothing (the exponent would be positive there).
                if s <= pair {
                    let mut xlo = 0.0f32;
                    let mut xhi = 0.0f32;
                    #[unroll]
                    for jj in 0..slice {
                        let j = jj * split + p;
                        let kv = f32::cast_from(k[col * ldh + j]);
                        let ls = lam[col * ldl + j];
                        xhi += qhi[jj] * kv * (lhi[jj] - ls).exp();
                        xlo += qlo[jj] * kv * (llo[jj] - ls).exp();
                    }
                    part[at + triangle_index(comptime!(SUB - 1) - pair, s, SUB)] = xhi;
                    part[at + triangle_index(pair, s, SUB)] = xlo;
                } else if s <= comptime!(SUB - 1) - pair {
                    let mut xhi = 0.0f32;
                    #[unroll]
                    for jj in 0..slice {
                        let j = jj * split + p;
                        let kv = f32::cast_from(k[col * ldh + j]);
                        xhi += qhi[jj] * kv * (lhi[jj] - lam[col * ldl + j]).exp();
                    }
                    part[at + triangle_index(comptime!(SUB - 1) - pair, s, SUB)] = xhi;
                }
            }
        }
    }
}

/// Block `i`'s scores against the keys before it, for [`factored_scores`]: the keys scaled to
/// the block's first row `b`, `k ∘ exp(Λ_b − Λ)` (rows `< b`, over the key tile, from this
/// unit's registers `rk`), then `off[b.., ..b] = q̃[b..b + SUB] · k̃[..b]ᵀ` (`q̃` already in `q`).
/// Synchronises before and after the product.
#[cube(fast_math = fast_exp())]
fn off_diagonal_block<F: Float>(
    q: &SharedMemory<F>,
    k: &mut SharedMemory<F>,
    rk: &Array<F>,
    lam: &SharedMemory<f32>,
    off: &mut SharedMemory<f32>,
    #[comptime] i: usize,
    #[comptime] l: TiledLayout,
) {
    let b = comptime!(i * SUB);
    let (ldh, ldl, ldo) = comptime!((l.kp + l.ph, l.kp + PAD_F, l.chunk + PAD_F));
    #[unroll]
    for r in 0..comptime!(regs_for(l.chunk, l.kp, &l.tile)) {
        let (row, j) = tile_entry(r, comptime!(l.kp), l.tile);
        if row < b {
            let decay = (lam[b * ldl + j] - lam[row * ldl + j]).exp();
            k[row * ldh + j] = F::cast_from(f32::cast_from(rk[r]) * decay);
        }
    }
    sync_cube();
    mma::<F, F>(
        q,
        comptime!(b * ldh),
        k,
        0,
        off,
        comptime!(b * ldo),
        comptime!(nt(SUB, b, l.kp, ldh, ldh, ldo)),
        l.tile,
    );
    sync_cube();
}

/// The off-diagonal blocks of `dq`'s and `dk`'s in-chunk terms under vector gates on tensor
/// cores, as [`factored_scores`] takes the scores' (FLA's chunk GLA backward splits them the
/// same way). With `b = SUB·I` the first row of block `I`, `exp(Λ_r − Λ_s) = exp(Λ_r − Λ_b) ·
/// exp(Λ_b − Λ_s)` for `s < b ≤ r`, both exponents at most 0, so
/// - `dq`: block `I`'s rows against the keys before it are `offq[I] = dA[I, < b] ·
///   (k ∘ exp(Λ_b − Λ))[< b]`;
/// - `dk`: block `I − 1`'s keys against the queries from `b` on are `offk[I − 1] =
///   dA[≥ b, I − 1]ᵀ · (q ∘ exp(Λ − Λ_b))[≥ b]`;
///
/// operands rounded to the input dtype (`dA` into `dah`). FLA keeps these operands in `f32`
/// (TF32 products; it rounds only the forward scores' operands, as [`factored_scores`] does), so
/// in bf16 this rounds more than FLA does here: the CUDA half-precision tests, the bf16 error at
/// T = 4096 among them, pass with it (2026-12-07). In f16, entries of `dA` past 65504 would
/// overflow here where the `f32` sums of the entry-by-entry path did not. The rest, the
/// diagonal blocks entry by entry and the factors `exp(Λ_r − Λ_b)`, `exp(Λ_b − Λ_s)`, is
/// [`key_gated_dq`]'s and [`key_gated_dk`]'s with `factored`. `q`, `k` are the raw `C × cols`
/// tiles and `lam` their gates, `da` the unmasked `dO Vᵀ` (`C × C` `f32`); `x`, `y` hold the
/// scaled keys and queries. Block 0's rows of `offq` and the last block's of `offk` are not
/// written. Synchronises after each block (the caller, before: `da` must be complete).
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn factored_grads<F: Float>(
    da: &SharedMemory<f32>,
    dah: &mut SharedMemory<F>,
    q: &SharedMemory<F>,
    k: &SharedMemory<F>,
    lam: &SharedMemory<f32>,
    x: &mut SharedMemory<F>,
    y: &mut SharedMemory<F>,
    offq: &mut SharedMemory<f32>,
    offk: &mut SharedMemory<f32>,
    #[comptime] cols: usize,
    #[comptime] l: TiledLayout,
) {
    let c = comptime!(l.chunk);
    // `dA` in the input dtype, the products' `A` operand (read after the first block's barrier).
    round_tile::<F>(da, dah, c, c, l);
    // Chunks of at most 64: boundaries 1 to 3.
    if comptime!(c > SUB) {
        grads_block::<F>(dah, q, k, lam, x, y, offq, offk, 1usize, cols, l);
    }
    if comptime!(c > 2 * SUB) {
        grads_block::<F>(dah, q, k, lam, x, y, offq, offk, 2usize, cols, l);
    }
    if comptime!(c > 3 * SUB) {
        grads_block::<F>(dah, q, k, lam, x, y, offq, offk, 3usize, cols, l);
    }
}

/// Boundary `i` of [`factored_grads`]: the keys before `b = SUB·i` and the queries from it on,
/// scaled; a barrier; the two products; a barrier.
#[cube(fast_math = fast_exp())]
#[allow(clippy::too_many_arguments)]
fn grads_block<F: Float>(
    dah: &SharedMemory<F>,
    q: &SharedMemory<F>,
    k: &SharedMemory<F>,
    lam: &SharedMemory<f32>,
    x: &mut SharedMemory<F>,
    y: &mut SharedMemory<F>,
    offq: &mut SharedMemory<f32>,
    offk: &mut SharedMemory<f32>,
    #[comptime] i: usize,
    #[comptime] cols: usize,
    #[comptime] l: TiledLayout,
) {
    let (c, b) = comptime!((l.chunk, i * SUB));
    let (ldk, ldl, ldc) = comptime!((cols + l.ph, cols + PAD_F, l.chunk + l.ph));
    #[unroll]
    for r in 0..comptime!(regs_for(l.chunk, cols, &l.tile)) {
        let (row, j) = tile_entry(r, cols, l.tile);
        if row < c {
            let diff = lam[row * ldl + j] - lam[b * ldl + j];
            if row < b {
                x[row * ldk + j] = F::cast_from(f32::cast_from(k[row * ldk + j]) * (-diff).exp());
            } else {
                y[row * ldk + j] = F::cast_from(f32::cast_from(q[row * ldk + j]) * diff.exp());
            }
        }
    }
    sync_cube();
    mma::<F, F>(
        dah,
        comptime!(b * ldc),
        x,
        0,
        offq,
        comptime!(b * ldl),
        comptime!(nn(SUB, cols, b, ldc, ldk, ldl)),
        l.tile,
    );
    mma::<F, F>(
        dah,
        comptime!(b * ldc + b - SUB),
        y,
        comptime!(b * ldk),
        offk,
        comptime!((b - SUB) * ldl),
        comptime!(tn(SUB, cols, c - b, ldc, ldk, ldl)),
        l.tile,
    );
    sync_cube();
}

/// `dq` under vector gates, in place over `out` (`C × cols` `f32`): with `state_term`, `out`
/// holds `dO Sᵀ` and becomes `factor · exp(Λ_rj) out[r, j]` (the `dq` walk's term); with `intra`,
/// `factor · Σ_{s ≤ r} dA_rs k_sj exp(Λ_rj − Λ_sj)` is added (or, alone, written: the term of
/// [`vector_grads_kernel`]), with `dA = dO Vᵀ` unmasked in `da` (`C × C` `f32`) and `k` the
/// `C × cols` key tile (neither tile is read without it). With `factored`, only the keys of
/// `r`'s own block are summed here and `exp(Λ_r − Λ_b) · off[r]` adds the rest
/// ([`factored_grads`]; `off` is not read otherwise).
#[cube(fast_math = fast_exp())]
#[allow(clippy::too_many_arguments)]
pub(crate) fn key_gated_dq<F: Float>(
    da: &SharedMemory<f32>,
    k: &SharedMemory<F>,
    lam: &SharedMemory<f32>,
    off: &SharedMemory<f32>,
    out: &mut SharedMemory<f32>,
    factor: f32,
    #[comptime] cols: usize,
    #[comptime] state_term: bool,
    #[comptime] intra: bool,
    #[comptime] factored: bool,
    #[comptime] l: TiledLayout,
) {
    let threads = comptime!(l.tile.threads());
    let c = comptime!(l.chunk);
    let entries = comptime!(c * cols);
    // The blocks summed entry by entry: `SUB` rows with `factored`, the whole chunk otherwise.
    let blk = comptime!(if factored { SUB } else { l.chunk });
    // `out` and `lam` are both `C × cols` f32 tiles: one leading dimension.
    let (lda, ldk, ldl) = comptime!((c + PAD_F, cols + l.ph, cols + PAD_F));
    #[unroll]
    for r in 0..comptime!(entries.div_ceil(threads)) {
        let (row, j) = tile_entry(r, cols, l.tile);
        if row < c {
            let lr = lam[row * ldl + j];
            let mut x = 0.0f32;
            if comptime!(state_term) {
                x = lr.exp() * out[row * ldl + j];
            }
            // The first key summed here: the block's first with `factored`, 0 otherwise.
            let first = (row / blk) * blk;
            if comptime!(factored) {
                if first > 0 {
                    x += (lr - lam[first * ldl + j]).exp() * off[row * ldl + j];
                }
            }
            if comptime!(intra && l.tile.unroll) {
                // Compile-time bounds for lavapipe (see `crate::tile`), the mask inside.
                #[unroll]
                for s in 0..c {
                    if s <= row && s >= first {
                        let decay = (lr - lam[s * ldl + j]).exp();
                        x += da[row * lda + s] * f32::cast_from(k[s * ldk + j]) * decay;
                    }
                }
            } else if comptime!(intra) {
                // A plane's units share `row` (tiles as wide as a plane or wider), so the
                // causal bound costs no divergence and skips the masked half.
                for s in first..row + 1 {
                    let decay = (lr - lam[s * ldl + j]).exp();
                    x += da[row * lda + s] * f32::cast_from(k[s * ldk + j]) * decay;
                }
            }
            out[row * ldl + j] = x * factor;
        }
    }
}

/// The in-chunk term of `dk` under vector gates, for the `cols` key columns of the tiles given:
/// `out[s, j] = factor · Σ_{r ≥ s} dA_rs q_rj exp(Λ_rj − Λ_sj)` (`C × cols` `f32`), with
/// `dA = dO Vᵀ` over every value column, unmasked, in `da` (`C × C` `f32`), `q` the `C × cols`
/// query tile and `lam` its `C × cols` gates. The tiled `dq` walk (or, beside the `dq` register
/// walk, [`vector_grads_kernel`]) computes it beside `dq`'s in-chunk term (it holds the whole
/// `dA`), once per key column; the `dk`/`dv` walk adds the state's term per value block. With
/// `factored`, `out` comes holding [`factored_grads`]'s products: only the queries of `s`'s own
/// block are summed here and `exp(Λ_b − Λ_s) · out[s]` (`b` the next block's first row) adds
/// the rest.
#[cube(fast_math = fast_exp())]
#[allow(clippy::too_many_arguments)]
pub(crate) fn key_gated_dk<F: Float>(
    da: &SharedMemory<f32>,
    q: &SharedMemory<F>,
    lam: &SharedMemory<f32>,
    out: &mut SharedMemory<f32>,
    factor: f32,
    #[comptime] cols: usize,
    #[comptime] factored: bool,
    #[comptime] l: TiledLayout,
) {
    let threads = comptime!(l.tile.threads());
    let c = comptime!(l.chunk);
    let entries = comptime!(c * cols);
    // The blocks summed entry by entry: `SUB` rows with `factored`, the whole chunk otherwise.
    let blk = comptime!(if factored { SUB } else { l.chunk });
    // `out` and `lam` are both `C × cols` f32 tiles: one leading dimension.
    let (lda, ldq, ldl) = comptime!((c + PAD_F, cols + l.ph, cols + PAD_F));
    #[unroll]
    for r in 0..comptime!(entries.div_ceil(threads)) {
        let (row, j) = tile_entry(r, cols, l.tile);
        if row < c {
            let ls = lam[row * ldl + j];
            let mut x = 0.0f32;
            // One past the last query summed here: the block's end with `factored`, the
            // chunk's otherwise (`row < C`).
            let end = (row / blk + 1) * blk;
            if comptime!(factored) {
                if end < c {
                    x = (lam[end * ldl + j] - ls).exp() * out[row * ldl + j];
                }
            }
            if comptime!(l.tile.unroll) {
                #[unroll]
                for u in 0..c {
                    if u >= row && u < end {
                        let decay = (lam[u * ldl + j] - ls).exp();
                        x += da[u * lda + row] * f32::cast_from(q[u * ldq + j]) * decay;
                    }
                }
            } else {
                // As in `key_gated_dq`: the causal bound instead of the mask.
                for u in row..end {
                    let decay = (lam[u * ldl + j] - ls).exp();
                    x += da[u * lda + row] * f32::cast_from(q[u * ldq + j]) * decay;
                }
            }
            out[row * ldl + j] = x * factor;
        }
    }
}

/// Stores rows `< cl` of the `dk`/`dv` walk's `C × cols` `f32` tile of `V Gᵀ` (key columns
/// `col0 ..`) as `dk`'s state term under vector gates, `exp(Λ_{C−1,i} − Λ_si) (V Gᵀ)_si` (key
/// `i = col0 + j`; `lam` is `C × kp`): [`store_tile`] with the decay folded in.
#[cube(fast_math = fast_exp())]
#[allow(clippy::too_many_arguments)]
pub(crate) fn store_keys_decayed(
    src: &SharedMemory<f32>,
    lam: &SharedMemory<f32>,
    dst: &mut Array<f32>,
    offset: usize,
    bos: usize,
    len: usize,
    p0: usize,
    cl: usize,
    h: usize,
    col0: usize,
    #[comptime] cols: usize,
    #[comptime] l: TiledLayout,
) {
    let threads = comptime!(l.tile.threads());
    let entries = comptime!(l.chunk * cols);
    let (ld, ldl) = comptime!((cols + PAD_F, l.kp + PAD_F));
    let last = comptime!((l.chunk - 1) * (l.kp + PAD_F));
    #[unroll]
    for r in 0..comptime!(entries.div_ceil(threads)) {
        let (row, c) = tile_entry(r, cols, l.tile);
        let col = col0 + c;
        if row < cl && col < l.k {
            let decay = (lam[last + col] - lam[row * ldl + col]).exp();
            let tok = token_at(bos, len, p0 + row, l.reverse);
            dst[offset + (tok * l.heads + h) * l.k + col] = src[row * ld + c] * decay;
        }
    }
}

/// Scales entry `(r, j)` of a `C × cols` key tile by `factor · exp(Λ_rj)` (`from_end = false`)
/// or by `factor · exp(Λ_{C−1,j} − Λ_rj)` (`from_end`): `q̃` and `k̃` under vector gates.
#[cube(fast_math = fast_exp())]
pub(crate) fn scale_keys<F: Float>(
    t: &mut SharedMemory<F>,
    lam: &SharedMemory<f32>,
    factor: f32,
    #[comptime] cols: usize,
    #[comptime] from_end: bool,
    #[comptime] l: TiledLayout,
) {
    let entries = comptime!(l.chunk * cols);
    let (ld, ldl) = comptime!((cols + l.ph, cols + PAD_F));
    #[unroll]
    for r in 0..comptime!(entries.div_ceil(l.tile.threads())) {
        let (row, j) = tile_entry(r, cols, l.tile);
        if row < l.chunk {
            let mut e = lam[row * ldl + j];
            if comptime!(from_end) {
                e = lam[comptime!(l.chunk - 1) * ldl + j] - e;
            }
            let i = row * ld + j;
            t[i] = F::cast_from(f32::cast_from(t[i]) * factor * e.exp());
        }
    }
}

/// Multiplies row `i` of a padded `rows × cols` `f32` state tile (key `i` of the tile's keys)
/// by the chunk's decay `exp(Λ_{C−1,i})`. `lam` holds the gates of exactly the tile's keys
/// (`C × rows`), so its leading dimension is `rows + PAD_F`.
#[cube(fast_math = fast_exp())]
pub(crate) fn decay_state_keys(
    s: &mut SharedMemory<f32>,
    lam: &SharedMemory<f32>,
    #[comptime] rows: usize,
    #[comptime] cols: usize,
    #[comptime] l: TiledLayout,
) {
    let threads = comptime!(l.tile.threads());
    let entries = comptime!(rows * cols);
    let (ld, last) = comptime!((cols + PAD_F, (l.chunk - 1) * (rows + PAD_F)));
    let unit = UNIT_POS as usize;
    #[unroll]
    for r in 0..comptime!(entries.div_ceil(threads)) {
        let e = unit + r * threads;
        if e < entries {
            let row = e / cols;
            s[row * ld + e % cols] *= lam[last + row].exp();
        }
    }
}

/// The state's copy in the input dtype, the operand of tensor-core products (none without them).
#[cube]
pub(crate) fn round_state<F: Float>(
    s: &SharedMemory<f32>,
    sh: &mut SharedMemory<F>,
    #[comptime] rows: usize,
    #[comptime] cols: usize,
    #[comptime] l: TiledLayout,
) {
    if comptime!(l.tile.cmma) {
        round_tile::<F>(s, sh, rows, cols, l);
    }
}

/// A padded `rows × cols` `f32` tile rounded into a padded tile of the input dtype, each unit
/// its own entries.
#[cube]
fn round_tile<F: Float>(
    s: &SharedMemory<f32>,
    sh: &mut SharedMemory<F>,
    #[comptime] rows: usize,
    #[comptime] cols: usize,
    #[comptime] l: TiledLayout,
) {
    let (lds, ldh) = comptime!((cols + PAD_F, cols + l.ph));
    #[unroll]
    for r in 0..comptime!(regs_for(rows, cols, &l.tile)) {
        let (row, col) = tile_entry(r, cols, l.tile);
        if row < rows {
            sh[row * ldh + col] = F::cast_from(s[row * lds + col]);
        }
    }
}

/// Reads (`load`) or writes a padded state slice `[rows, cols]` at `(row0, col0)` of
/// `[N, H, K, V]`; entries outside `K × V` read as 0.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn state_io(
    s: &mut SharedMemory<f32>,
    global: &mut Array<f32>,
    base: usize,
    row0: usize,
    col0: usize,
    #[comptime] rows: usize,
    #[comptime] cols: usize,
    #[comptime] load: bool,
    #[comptime] l: TiledLayout,
) {
    let threads = comptime!(l.tile.threads());
    let entries = comptime!(rows * cols);
    let ld = comptime!(cols + PAD_F);
    let unit = UNIT_POS as usize;
    #[unroll]
    for r in 0..comptime!(entries.div_ceil(threads)) {
        let e = unit + r * threads;
        if e < entries {
            let (row, col) = (e / cols, e % cols);
            let i = row0 + row;
            let j = col0 + col;
            let inside = i < l.k && j < l.v;
            if comptime!(load) {
                let mut x = 0.0f32;
                if inside {
                    x = global[base + i * l.v + j];
                }
                s[row * ld + col] = x;
            } else if inside {
                global[base + i * l.v + j] = s[row * ld + col];
            }
        }
    }
}

/// `out (+)= A · S` (or `A · Sᵀ` with `s.b_col`) for a padded `rows × cols` state tile from row
/// `row0` on: on tensor cores its copy in the input dtype `sh` (they take no `f32` operand), in
/// plain arithmetic the `f32` tile `sf` itself. `s.ldb` is set here from `cols`.
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn mma_state<F: Float>(
    a: &SharedMemory<F>,
    sf: &SharedMemory<f32>,
    sh: &SharedMemory<F>,
    row0: usize,
    out: &mut SharedMemory<f32>,
    out_off: usize,
    #[comptime] s: MmaShape,
    #[comptime] cols: usize,
    #[comptime] l: TiledLayout,
) {
    if comptime!(l.tile.cmma) {
        let ld = comptime!(cols + l.ph);
        let s = comptime!(MmaShape { ldb: ld, ..s });
        mma::<F, F>(a, 0, sh, row0 * ld, out, out_off, s, l.tile);
    } else {
        let ld = comptime!(cols + PAD_F);
        let s = comptime!(MmaShape { ldb: ld, ..s });
        mma::<F, f32>(a, 0, sf, row0 * ld, out, out_off, s, l.tile);
    }
}

/// This cube's block (of `blocks` value or key blocks) and span ([`TiledLayout::span`]; 0
/// without spans) from `CUBE_POS_X`.
#[cube]
pub(crate) fn block_and_span(
    #[comptime] blocks: usize,
    #[comptime] l: TiledLayout,
) -> (usize, usize) {
    let mut block = CUBE_POS_X as usize;
    let mut span = 0usize;
    if comptime!(l.span > 0) {
        block = CUBE_POS_X as usize % blocks;
        span = CUBE_POS_X as usize / blocks;
    }
    (block, span)
}

/// Offset of slice `i` (a span's, or in a states pass a chunk's) of sequence `n`, head `h` in a
/// states buffer `hs` (`[N, spans, H, K, V]`).
#[cube]
pub(crate) fn hs_offset(
    n: usize,
    spans: u32,
    i: usize,
    h: usize,
    #[comptime] l: TiledLayout,
) -> usize {
    ((n * spans as usize + i) * l.heads + h) * l.k * l.v
}

/// The chunks a cube walks, `first .. end`: all of the sequence's, or those of its span (none
/// for a span past the sequence's end).
#[cube]
pub(crate) fn chunk_range(len: usize, span: usize, #[comptime] l: TiledLayout) -> (usize, usize) {
    let mut first = 0usize;
    let mut end = len.div_ceil(l.chunk);
    if comptime!(l.span > 0) {
        let span_end = (span + 1) * comptime!(l.span);
        if span_end < end {
            end = span_end;
        }
        first = span * comptime!(l.span);
    }
    (first, end)
}

/// Writes a chunk's scores, the padded `C × C` tile `sa` (input dtype), to `a` (`[B·T, H, C]`):
/// row `r` at the token of position `p0 + r` (processing order), rows below `cl` only.
#[cube]
#[allow(clippy::too_many_arguments)]
fn store_scores<F: Float>(
    sa: &SharedMemory<F>,
    a: &mut Array<F>,
    bos: usize,
    len: usize,
    p0: usize,
    cl: usize,
    h: usize,
    #[comptime] l: TiledLayout,
) {
    let (c, ldd) = comptime!((l.chunk, l.chunk + l.ph));
    let cc = comptime!(l.chunk * l.chunk);
    let threads = comptime!(l.tile.threads());
    let unit = UNIT_POS as usize;
    #[unroll]
    for r in 0..comptime!(cc.div_ceil(threads)) {
        let e = unit + r * threads;
        if e < cc {
            let (row, col) = (e / c, e % c);
            if row < cl {
                let tok = token_at(bos, len, p0 + row, l.reverse);
                a[(tok * l.heads + h) * c + col] = sa[row * ldd + col];
            }
        }
    }
}

/// How many of the chunks `x, x + stride, …` below `chunks` a cube of the all-chunks kernels
/// ([`vector_scores_kernel`], [`vector_grads_kernel`]) takes.
#[cube]
// `manual_div_ceil`: the count divides by a runtime stride, spelled out as the kernel tested on
// CUDA has it.
#[allow(clippy::manual_div_ceil)]
fn chunk_rounds(chunks: usize, x: usize, stride: usize) -> usize {
    let mut rounds = 0;
    if x < chunks {
        rounds = (chunks - x + stride - 1) / stride;
    }
    rounds
}

/// The in-chunk scores under vector gates, for every chunk of every sequence:
/// `a[tok, h, s] = scale · Σ_j q_rj k_sj exp(Λ_rj − Λ_sj)` for `s ≤ r` and 0 above the diagonal
/// (input dtype, `[B·T, H, C]`), where `tok` is the token at position `r` of its chunk (processing
/// order) and `s` a position of the same chunk. They depend on neither the state nor the values,
/// so they are summed here once per head and read by the forward and `dk`/`dv` walks, where each
/// value block's cube used to sum them again (four times a head at FLA's 340M shape), as FLA's
/// intra-chunk kernel does before its output kernel. Without `sum` only `Λ` is written: the
/// backward of a forward that kept its scores. Cubes `(x, head, sequence)`: cube `x` takes
/// chunks `x, x + X, …` (`X` cubes along x).
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn vector_scores_kernel<F: Float>(
    q: &Array<F>,
    k: &Array<F>,
    g: &Array<F>,
    cu_seqlens: &Array<u32>,
    a: &mut Array<F>,
    gates_cum: &mut Array<f32>,
    seq_len: u32,
    scale: f32,
    #[comptime] l: TiledLayout,
    #[comptime] sum: bool,
    #[comptime] factored: bool,
    #[comptime] diag_regs: bool,
    #[define(F)] _dtype: StorageType,
) {
    let (c, kp) = comptime!((l.chunk, l.kp));
    let h = CUBE_POS_Y as usize;
    let n = CUBE_POS_Z as usize;
    let bos = seq_start(cu_seqlens, n, seq_len, l.varlen);
    let len = seq_length(cu_seqlens, n, seq_len, l.varlen);

    // Without `sum` the query, key and score tiles go unused: one entry each, so that the
    // gates' cumsum alone does not hold their shared memory.
    let (sr, sqc, sac) = comptime!(if sum { (c, kp, c) } else { (1, 1, 1) });
    let mut sq = tile_h::<F>(sr, sqc, l);
    let mut sk = tile_h::<F>(sr, sqc, l);
    let mut sa = tile_h::<F>(sr, sac, l);
    let mut lamk = key_gates_tile(kp, l);
    let mut spart = score_scratch(l, factored, diag_regs);
    let mut soff = tile_f(
        comptime!(if factored { c } else { 1 }),
        comptime!(if factored { c } else { 1 }),
    );
    let mut rq = Array::<F>::new(comptime!(tile_regs(&l, kp)));
    let mut rk = Array::<F>::new(comptime!(tile_regs(&l, kp)));
    let mut rg = Array::<f32>::new(comptime!(key_gate_regs(&l, kp)));

    let x = CUBE_POS_X as usize;
    let stride = CUBE_COUNT_X as usize;
    let rounds = chunk_rounds(len.div_ceil(c), x, stride);
    // Uniform over the cube: its barriers are reached by every unit.
    for round in 0..rounds {
        let p0 = (x + round * stride) * c;
        let cl = chunk_len(len, p0, c);
        if comptime!(sum) {
            fetch_tile::<F, F>(q, &mut rq, bos, len, p0, cl, h, 0, l.k, kp, l);
            fetch_tile::<F, F>(k, &mut rk, bos, len, p0, cl, h, 0, l.k, kp, l);
        }
        // The raw log gates (this layout is not a states pass's).
        fetch_tile::<F, f32>(g, &mut rg, bos, len, p0, cl, h, 0, l.k, kp, l);
        if comptime!(sum) {
            stage_tile::<F>(&rq, &mut sq, kp, l);
            stage_tile::<F>(&rk, &mut sk, kp, l);
        }
        stage_key_gates(&rg, &mut lamk, kp, l);
        sync_cube();
        cumulate_key_gates(&mut lamk, kp, l);
        sync_cube();
        // `Λ` for the walks, beside the scores (both only read `lamk`).
        store_tile::<f32>(&lamk, gates_cum, 0, bos, len, p0, cl, h, 0, l.k, kp, l);
        if comptime!(sum) {
            if comptime!(factored) {
                factored_scores::<F>(
                    &mut sq, &rq, &mut sk, &rk, &lamk, &mut spart, &mut soff, &mut sa, scale, l,
                    diag_regs,
                );
            } else {
                key_gated_scores::<F>(&sq, &sk, &lamk, &mut spart, &mut sa, scale, l);
            }
            sync_cube();
            store_scores::<F>(&sa, a, bos, len, p0, cl, h, l);
        }
        // The next round overwrites the tiles.
        sync_cube();
    }
}

/// Shared-memory bytes of [`scalar_scores_kernel`] at the layout `l` (the vector-gate layout its
/// walks take): `q`, `k` (`C × kp`), the scores in `f32` and in the input dtype (`C × C`) and
/// the chunk's gates, raw and cumulated.
pub fn scalar_scores_smem(l: &TiledLayout, e: usize) -> usize {
    2 * tile_bytes(l.chunk, l.kp, e)
        + tile_bytes(l.chunk, l.chunk, 4)
        + tile_bytes(l.chunk, l.chunk, e)
        + 8 * l.chunk
}

/// The in-chunk scores and cumulated gates of a scalar gate, for every chunk of every sequence,
/// in the form the vector-gate walks read ([`vector_scores_kernel`]'s outputs), so that simple
/// GLA can take those walks (on CUDA the forward walk with its state in registers,
/// [`super::frag::gla_fwd_frag_kernel`]):
/// - `a[tok, h, s] = scale · (q_r · k_s) · exp(λ_r − λ_s)` for `s ≤ r`, 0 above the diagonal
///   (input dtype, `[B·T, H, C]`): one tile product `Q Kᵀ`, then the decay entry by entry, every
///   exponent at most 0, as the scalar walk computes its scores ([`masked_decay`]);
/// - `gates_cum[tok, h, j] = λ_r` for every key column `j` (`f32`, `[B·T, H, K]`): the scalar
///   gate cumulated from the chunk's start, repeated across the keys, which is what the vector
///   walks' `Λ` is for a gate that is the same on every key; with `compact`, once per position
///   (`[B·T, H]`, for the register walks, which read it so: `GlaFragLayout::scalar_gate`).
///
/// `l` is the scalar layout of the walks' chunk (`scalar_gate` set: [`load_gates`] reads one
/// gate per position). Cubes `(x, head, sequence)`: cube `x` takes chunks `x, x + X, …`.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn scalar_scores_kernel<F: Float>(
    q: &Array<F>,
    k: &Array<F>,
    g: &Array<F>,
    cu_seqlens: &Array<u32>,
    a: &mut Array<F>,
    gates_cum: &mut Array<f32>,
    seq_len: u32,
    scale: f32,
    #[comptime] l: TiledLayout,
    #[comptime] compact: bool,
    #[define(F)] _dtype: StorageType,
) {
    let (c, kp) = comptime!((l.chunk, l.kp));
    let (kh, cf) = comptime!((kp + l.ph, c + PAD_F));
    // `Λ`'s columns: the keys, or one.
    let lk = comptime!(if compact { 1 } else { l.k });
    let ck = comptime!(l.chunk * lk);
    let threads = comptime!(l.tile.threads());
    let h = CUBE_POS_Y as usize;
    let n = CUBE_POS_Z as usize;
    let bos = seq_start(cu_seqlens, n, seq_len, l.varlen);
    let len = seq_length(cu_seqlens, n, seq_len, l.varlen);
    let unit = UNIT_POS as usize;

    let mut sq = tile_h::<F>(c, kp, l);
    let mut sk = tile_h::<F>(c, kp, l);
    let mut sa = tile_f(c, c);
    let mut sah = tile_h::<F>(c, c, l);
    let mut gl = SharedMemory::<f32>::new(c);
    let mut lam = SharedMemory::<f32>::new(c);
    let mut rq = Array::<F>::new(comptime!(tile_regs(&l, kp)));
    let mut rk = Array::<F>::new(comptime!(tile_regs(&l, kp)));

    let x = CUBE_POS_X as usize;
    let stride = CUBE_COUNT_X as usize;
    let rounds = chunk_rounds(len.div_ceil(c), x, stride);
    // Uniform over the cube: its barriers are reached by every unit.
    for round in 0..rounds {
        let p0 = (x + round * stride) * c;
        let cl = chunk_len(len, p0, c);
        fetch_tile::<F, F>(q, &mut rq, bos, len, p0, cl, h, 0, l.k, kp, l);
        fetch_tile::<F, F>(k, &mut rk, bos, len, p0, cl, h, 0, l.k, kp, l);
        stage_tile::<F>(&rq, &mut sq, kp, l);
        stage_tile::<F>(&rk, &mut sk, kp, l);
        load_gates::<F>(g, &mut gl, bos, len, p0, cl, h, l);
        sync_cube();
        cumulate_gates(&gl, &mut lam, l);
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
        // `Λ` for the walks: `λ_r` on every key column, or once (`compact`); rows in the
        // sequence only: the walks repeat its last row past its end.
        #[unroll]
        for r in 0..comptime!(ck.div_ceil(threads)) {
            let e = unit + r * threads;
            if e < ck {
                let (row, col) = (e / lk, e % lk);
                if row < cl {
                    let tok = token_at(bos, len, p0 + row, l.reverse);
                    gates_cum[(tok * l.heads + h) * lk + col] = lam[row];
                }
            }
        }
        sync_cube();
        store_scores::<F>(&sah, a, bos, len, p0, cl, h, l);
        // The next round overwrites the tiles.
        sync_cube();
    }
}

/// Shared-memory bytes of [`scalar_grads_kernel`] at the layout `l`: [`scalar_scores_kernel`]'s
/// tiles (`q`, `k`, the chunk's `C × C` tile in `f32` and the input dtype, its gates), holding
/// `dA` where that kernel holds the scores, plus `v` and `d_o` (`C × bv`) and `nb` columns of a
/// result (`f32`).
pub fn scalar_grads_smem(l: &TiledLayout, e: usize) -> usize {
    scalar_scores_smem(l, e) + 2 * tile_bytes(l.chunk, l.bv, e) + tile_bytes(l.chunk, l.nb, 4)
}

/// The in-chunk terms of `dq` and `dk` under a scalar gate, for every chunk of every sequence:
/// `dq_r = Σ_{s ≤ r} scale · dA_rs · exp(λ_r − λ_s) · k_s` and
/// `dk_s = Σ_{r ≥ s} scale · dA_rs · exp(λ_r − λ_s) · q_r`, `dA = dO Vᵀ` (summed over value
/// blocks of `bv` columns), as `f32` partials into `dq_part` from `dq_slot` on and `dk_part`
/// from `dk_slot` on. They depend on no state, so that simple GLA's backward on GLA's walks
/// ([`tiled_launch::simple_scores_route`](super::tiled_launch)) can leave them to this kernel,
/// every chunk in parallel: the vector-gate `dk`/`dv` walk (on CUDA with the state's gradient
/// in registers, [`super::frag::gla_dkv_frag_kernel`]) writes only `dk`'s state term, and the
/// scalar `dq` walk ([`tiled_dq_kernel`] without `in_chunk`) only `dq`'s. Tile products and the
/// decay entry by entry (exponents at most 0), as the scalar walks compute them. `l` is a
/// scalar layout (`scalar_gate` set). Cubes `(x, head, sequence)`: cube `x` takes chunks
/// `x, x + X, …`.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn scalar_grads_kernel<F: Float>(
    q: &Array<F>,
    k: &Array<F>,
    v: &Array<F>,
    d_o: &Array<F>,
    g: &Array<F>,
    cu_seqlens: &Array<u32>,
    dq_part: &mut Array<f32>,
    dk_part: &mut Array<f32>,
    dq_slot: u32,
    dk_slot: u32,
    seq_len: u32,
    scale: f32,
    #[comptime] l: TiledLayout,
    #[define(F)] _dtype: StorageType,
) {
    let (c, kp, bv, nb) = comptime!((l.chunk, l.kp, l.bv, l.nb));
    let (kh, vh, ch) = comptime!((kp + l.ph, bv + l.ph, c + l.ph));
    let (cf, nf) = comptime!((c + PAD_F, nb + PAD_F));
    let h = CUBE_POS_Y as usize;
    let n = CUBE_POS_Z as usize;
    let bos = seq_start(cu_seqlens, n, seq_len, l.varlen);
    let len = seq_length(cu_seqlens, n, seq_len, l.varlen);
    let (q_slot, k_slot) = (dq_slot as usize, dk_slot as usize);

    let mut sq = tile_h::<F>(c, kp, l);
    let mut sk = tile_h::<F>(c, kp, l);
    let mut sv = tile_h::<F>(c, bv, l);
    let mut sdo = tile_h::<F>(c, bv, l);
    let mut sa = tile_f(c, c);
    let mut sah = tile_h::<F>(c, c, l);
    let mut sout = tile_f(c, nb);
    let mut gl = SharedMemory::<f32>::new(c);
    let mut lam = SharedMemory::<f32>::new(c);
    let mut rq = Array::<F>::new(comptime!(tile_regs(&l, kp)));
    let mut rk = Array::<F>::new(comptime!(tile_regs(&l, kp)));
    let mut rv = Array::<F>::new(comptime!(tile_regs(&l, bv)));
    let mut rdo = Array::<F>::new(comptime!(tile_regs(&l, bv)));

    let x = CUBE_POS_X as usize;
    let stride = CUBE_COUNT_X as usize;
    let rounds = chunk_rounds(len.div_ceil(c), x, stride);
    // Uniform over the cube: its barriers are reached by every unit.
    for round in 0..rounds {
        let p0 = (x + round * stride) * c;
        let cl = chunk_len(len, p0, c);
        fetch_tile::<F, F>(q, &mut rq, bos, len, p0, cl, h, 0, l.k, kp, l);
        fetch_tile::<F, F>(k, &mut rk, bos, len, p0, cl, h, 0, l.k, kp, l);
        stage_tile::<F>(&rq, &mut sq, kp, l);
        stage_tile::<F>(&rk, &mut sk, kp, l);
        load_gates::<F>(g, &mut gl, bos, len, p0, cl, h, l);
        // dA = dO Vᵀ, a value block at a time.
        #[unroll]
        for vb in 0..comptime!(l.v.div_ceil(bv)) {
            let v0 = vb * bv;
            fetch_tile::<F, F>(v, &mut rv, bos, len, p0, cl, h, v0, l.v, bv, l);
            fetch_tile::<F, F>(d_o, &mut rdo, bos, len, p0, cl, h, v0, l.v, bv, l);
            stage_tile::<F>(&rv, &mut sv, bv, l);
            stage_tile::<F>(&rdo, &mut sdo, bv, l);
            sync_cube();
            // The first block writes `dA`, the others add to it.
            let s = comptime!(if vb == 0 {
                nt(c, c, bv, vh, vh, cf)
            } else {
                accum(nt(c, c, bv, vh, vh, cf))
            });
            mma::<F, F>(&sdo, 0, &sv, 0, &mut sa, 0, s, l.tile);
            // The next block overwrites the value tiles.
            sync_cube();
        }
        cumulate_gates(&gl, &mut lam, l);
        sync_cube();
        masked_decay::<F>(&sa, &mut sah, &lam, scale, l);
        sync_cube();
        // dK = (dA ∘ D ∘ M)ᵀ Q and dQ = (dA ∘ D ∘ M) K, `nb` key columns at a time.
        #[unroll]
        for kb in 0..comptime!(kp / nb) {
            let col0 = kb * nb;
            let s = comptime!(tn(c, nb, c, ch, kh, nf));
            mma::<F, F>(&sah, 0, &sq, col0, &mut sout, 0, s, l.tile);
            sync_cube();
            store_tile::<f32>(
                &sout, dk_part, k_slot, bos, len, p0, cl, h, col0, l.k, nb, l,
            );
            sync_cube();
            let s = comptime!(nn(c, nb, c, ch, kh, nf));
            mma::<F, F>(&sah, 0, &sk, col0, &mut sout, 0, s, l.tile);
            sync_cube();
            store_tile::<f32>(
                &sout, dq_part, q_slot, bos, len, p0, cl, h, col0, l.k, nb, l,
            );
            sync_cube();
        }
    }
}

/// The in-chunk terms of `dq` and `dk` under vector gates, for every chunk of every sequence:
/// `dq_r = scale · Σ_{s ≤ r} dA_rs k_s ∘ exp(Λ_r − Λ_s)` and
/// `dk_s = scale · Σ_{r ≥ s} dA_rs q_r ∘ exp(Λ_r − Λ_s)`, `dA = dO Vᵀ` over every value column
/// (`f32`, as partials of `[B·T, H, K]` at element offsets `dq_slot`, `dk_slot`), entry by
/// entry, every exponent at most 0, as [`vector_scores_kernel`] sums the scores. They depend on
/// no state: the `dq` walk with the state in registers ([`super::frag::gla_dq_frag_kernel`])
/// leaves them to this kernel, every chunk in parallel. The tiled `dq` walk sums them itself:
/// taking them out of it measured slower on an H100 (2026-12-07, `chunk_gla` at T = 4096,
/// forward+backward 12.87 ms against 11.74 in an earlier call, the forward 3.46 against 3.61),
/// as its chain of chunks is bound by latency, where the extra arithmetic costs little. Its tiles
/// are a subset of the tiled `dq` walk's at the same layout (`dq_smem`), so they fit where the
/// layout does. Cubes
/// `(x · key blocks, head, sequence)`: key block `CUBE_POS_X % blocks` of the chunks
/// `x, x + X, …` (`X = CUBE_COUNT_X / blocks`).
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn vector_grads_kernel<F: Float>(
    q: &Array<F>,
    k: &Array<F>,
    v: &Array<F>,
    d_o: &Array<F>,
    gates_cum: &Array<f32>,
    cu_seqlens: &Array<u32>,
    dq_part: &mut Array<f32>,
    dk_part: &mut Array<f32>,
    dq_slot: u32,
    dk_slot: u32,
    seq_len: u32,
    scale: f32,
    #[comptime] l: TiledLayout,
    #[comptime] factored: bool,
    #[define(F)] _dtype: StorageType,
) {
    let (c, vp, bk) = comptime!((l.chunk, l.vp, l.bk));
    let (vh, cf) = comptime!((vp + l.ph, c + PAD_F));
    // [`factored_grads`]'s tiles, one entry each without it.
    let fc = comptime!(if factored { c } else { 1 });
    let blocks = comptime!(l.k.div_ceil(l.bk));
    let h = CUBE_POS_Y as usize;
    let n = CUBE_POS_Z as usize;
    let bos = seq_start(cu_seqlens, n, seq_len, l.varlen);
    let len = seq_length(cu_seqlens, n, seq_len, l.varlen);
    let k0 = (CUBE_POS_X as usize % blocks) * bk;

    let mut sq = tile_h::<F>(c, bk, l);
    let mut sk = tile_h::<F>(c, bk, l);
    let mut sv = tile_h::<F>(c, vp, l);
    let mut sdo = tile_h::<F>(c, vp, l);
    let mut sa = tile_f(c, c);
    let mut lamk = key_gates_tile(bk, l);
    let mut sdq = tile_f(c, bk);
    let mut sdk = tile_f(c, bk);
    let mut sah = tile_h::<F>(fc, c, l);
    let mut sx = tile_h::<F>(fc, bk, l);
    let mut sy = tile_h::<F>(fc, bk, l);
    let mut soff = tile_f(fc, bk);
    let mut rq = Array::<F>::new(comptime!(tile_regs(&l, bk)));
    let mut rk = Array::<F>::new(comptime!(tile_regs(&l, bk)));
    let mut rv = Array::<F>::new(comptime!(tile_regs(&l, vp)));
    let mut rdo = Array::<F>::new(comptime!(tile_regs(&l, vp)));
    let mut rg = Array::<f32>::new(comptime!(key_gate_regs(&l, bk)));

    let x = CUBE_POS_X as usize / blocks;
    let stride = CUBE_COUNT_X as usize / blocks;
    let rounds = chunk_rounds(len.div_ceil(c), x, stride);
    // Uniform over the cube: its barriers are reached by every unit.
    for round in 0..rounds {
        let p0 = (x + round * stride) * c;
        let cl = chunk_len(len, p0, c);
        fetch_tile::<F, F>(q, &mut rq, bos, len, p0, cl, h, k0, l.k, bk, l);
        fetch_tile::<F, F>(k, &mut rk, bos, len, p0, cl, h, k0, l.k, bk, l);
        fetch_tile::<F, F>(v, &mut rv, bos, len, p0, cl, h, 0, l.v, vp, l);
        fetch_tile::<F, F>(d_o, &mut rdo, bos, len, p0, cl, h, 0, l.v, vp, l);
        fetch_rows::<f32, f32>(
            gates_cum, &mut rg, bos, len, p0, cl, h, k0, l.k, bk, true, l,
        );
        stage_tile::<F>(&rq, &mut sq, bk, l);
        stage_tile::<F>(&rk, &mut sk, bk, l);
        stage_tile::<F>(&rv, &mut sv, vp, l);
        stage_tile::<F>(&rdo, &mut sdo, vp, l);
        stage_key_gates(&rg, &mut lamk, bk, l);
        sync_cube();
        // dA = dO Vᵀ
        mma::<F, F>(
            &sdo,
            0,
            &sv,
            0,
            &mut sa,
            0,
            comptime!(nt(c, c, vp, vh, vh, cf)),
            l.tile,
        );
        sync_cube();
        if comptime!(factored) {
            factored_grads::<F>(
                &sa, &mut sah, &sq, &sk, &lamk, &mut sx, &mut sy, &mut soff, &mut sdk, bk, l,
            );
        }
        key_gated_dq::<F>(
            &sa, &sk, &lamk, &soff, &mut sdq, scale, bk, false, true, factored, l,
        );
        key_gated_dk::<F>(&sa, &sq, &lamk, &mut sdk, scale, bk, factored, l);
        sync_cube();
        let (qs, ks) = (dq_slot as usize, dk_slot as usize);
        store_tile::<f32>(&sdq, dq_part, qs, bos, len, p0, cl, h, k0, l.k, bk, l);
        store_tile::<f32>(&sdk, dk_part, ks, bos, len, p0, cl, h, k0, l.k, bk, l);
        // The next round overwrites the tiles.
        sync_cube();
    }
}

/// Forward: `o` and, when asked, `ht`. Cubes `(value block, head, sequence)`, `(32, planes)` units.
/// Under vector gates the in-chunk scores come from [`vector_scores_kernel`] (`a`).
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn tiled_fwd_kernel<F: Float>(
    q: &Array<F>,
    k: &Array<F>,
    v: &Array<F>,
    a: &Array<F>,
    w: &Array<f32>,
    ut: &Array<f32>,
    g: &Array<F>,
    gates_cum: &Array<f32>,
    h0: &mut Array<f32>,
    cu_seqlens: &Array<u32>,
    o: &mut Array<F>,
    ht: &mut Array<f32>,
    hs: &mut Array<f32>,
    seq_len: u32,
    spans: u32,
    scale: f32,
    #[comptime] l: TiledLayout,
    #[define(F)] _dtype: StorageType,
) {
    let (c, kp, bv) = comptime!((l.chunk, l.kp, l.bv));
    // Leading dimensions: input-dtype tiles (`h`) and f32 tiles (`f`).
    let (kh, vh, ch) = comptime!((kp + l.ph, bv + l.ph, c + l.ph));
    let (vf, cf) = comptime!((bv + PAD_F, c + PAD_F));
    let (vb, span) = block_and_span(comptime!(l.v.div_ceil(bv)), l);
    let v0 = vb * bv;
    let h = CUBE_POS_Y as usize;
    let n = CUBE_POS_Z as usize;
    let bos = seq_start(cu_seqlens, n, seq_len, l.varlen);
    let len = seq_length(cu_seqlens, n, seq_len, l.varlen);
    let base = (n * l.heads + h) * l.k * l.v;
    // Queries and keys of this head's group (the delta rule's grouped value heads).
    let lq = comptime!(TiledLayout {
        heads: l.qk_heads,
        ..l
    });
    let hq = h / comptime!(l.heads / l.qk_heads);
    // The delta rule's tiles and registers (one entry where unused).
    let (dk, dv) = comptime!(if l.delta { (kp, bv) } else { (1, 1) });

    // The states pass needs no queries, scores or outputs (one entry each).
    let co = comptime!(if l.states { 1 } else { c });
    let mut sq = tile_h::<F>(co, kp, l);
    let mut sk = tile_h::<F>(c, kp, l);
    let mut sv = tile_h::<F>(c, bv, l);
    let mut sw = tile_h::<F>(comptime!(if l.delta { c } else { 1 }), dk, l);
    let mut sa = tile_f(co, c);
    let mut sah = tile_h::<F>(co, c, l);
    let mut so = tile_f(co, bv);
    let mut ss = tile_f(kp, bv);
    let mut ssh = tile_h::<F>(comptime!(if l.tile.cmma { kp } else { 1 }), bv, l);
    let mut gl = SharedMemory::<f32>::new(c);
    let mut lam = SharedMemory::<f32>::new(c);
    let mut lamk = key_gates_tile(kp, l);

    // Without h0 the slice is read from row K on: all outside, all zeros. A span starts from
    // the state the states pass left for it in `hs`, given here as `h0`.
    let first_row = comptime!(if l.has_h0 || l.span > 0 { 0 } else { l.k });
    let mut h0_base = base;
    if comptime!(l.span > 0) {
        h0_base = hs_offset(n, spans, span, h, l);
    }
    state_io(&mut ss, h0, h0_base, first_row, v0, kp, bv, true, l);

    let mut rq = Array::<F>::new(comptime!(if l.states { 1 } else { tile_regs(&l, kp) }));
    let mut rk = Array::<F>::new(comptime!(tile_regs(&l, kp)));
    let mut rv = Array::<F>::new(comptime!(tile_regs(&l, if l.delta { 1 } else { bv })));
    let mut rw = Array::<F>::new(comptime!(tile_regs(&l, dk)));
    let mut ru = Array::<f32>::new(comptime!(tile_regs(&l, dv)));
    let mut rg = Array::<f32>::new(comptime!(key_gate_regs(&l, kp)));
    // The in-chunk scores under vector gates, from `vector_scores_kernel`.
    let scores = comptime!(l.vector_gate && !l.states);
    let mut ra = Array::<F>::new(comptime!(if scores { tile_regs(&l, c) } else { 1 }));
    let (first, end) = chunk_range(len, span, l);
    if first < end {
        let p0 = first * c;
        let cl = chunk_len(len, p0, c);
        if comptime!(!l.states) {
            fetch_tile::<F, F>(q, &mut rq, bos, len, p0, cl, hq, 0, l.k, kp, lq);
        }
        if comptime!(scores) {
            fetch_tile::<F, F>(a, &mut ra, bos, len, p0, cl, h, 0, c, c, l);
        }
        fetch_tile::<F, F>(k, &mut rk, bos, len, p0, cl, hq, 0, l.k, kp, lq);
        fetch_key_gates::<F>(g, gates_cum, &mut rg, bos, len, p0, cl, h, 0, kp, l);
        if comptime!(l.delta) {
            fetch_tile::<f32, F>(w, &mut rw, bos, len, p0, cl, h, 0, l.k, kp, l);
            fetch_tile::<f32, f32>(ut, &mut ru, bos, len, p0, cl, h, v0, l.v, bv, l);
        } else {
            fetch_tile::<F, F>(v, &mut rv, bos, len, p0, cl, h, v0, l.v, bv, l);
        }
    }
    for ci in first..end {
        let p0 = ci * c;
        let cl = chunk_len(len, p0, c);
        if comptime!(!l.states) {
            stage_tile::<F>(&rq, &mut sq, kp, l);
        }
        if comptime!(scores) {
            stage_tile::<F>(&ra, &mut sah, c, l);
        }
        stage_tile::<F>(&rk, &mut sk, kp, l);
        if comptime!(l.delta) {
            stage_tile::<F>(&rw, &mut sw, kp, l);
        } else {
            stage_tile::<F>(&rv, &mut sv, bv, l);
        }
        load_gates::<F>(g, &mut gl, bos, len, p0, cl, h, l);
        stage_key_gates(&rg, &mut lamk, kp, l);
        if comptime!(l.states) {
            // The state entering this chunk, for the output pass.
            let at = hs_offset(n, spans, ci, h, l);
            state_io(&mut ss, hs, at, 0, v0, kp, bv, false, l);
        } else {
            round_state::<F>(&ss, &mut ssh, kp, bv, l);
        }
        sync_cube();
        if comptime!(l.delta) {
            // U = Ũ − W S, the chunk's values after the delta rule's corrections, in f32
            // before it is rounded to the products' input dtype.
            let s = comptime!(nn(c, bv, kp, kh, 0, vf));
            mma_state::<F>(&sw, &ss, &ssh, 0, &mut so, 0, s, bv, l);
            sync_cube();
            #[unroll]
            for r in 0..comptime!(tile_regs(&l, bv)) {
                let (row, col) = tile_entry(r, bv, l.tile);
                if row < c {
                    sv[row * vh + col] = F::cast_from(ru[r] - so[row * vf + col]);
                }
            }
        }
        if ci + 1 < end {
            let p1 = p0 + c;
            let cl1 = chunk_len(len, p1, c);
            if comptime!(!l.states) {
                fetch_tile::<F, F>(q, &mut rq, bos, len, p1, cl1, hq, 0, l.k, kp, lq);
            }
            if comptime!(scores) {
                fetch_tile::<F, F>(a, &mut ra, bos, len, p1, cl1, h, 0, c, c, l);
            }
            fetch_tile::<F, F>(k, &mut rk, bos, len, p1, cl1, hq, 0, l.k, kp, lq);
            fetch_key_gates::<F>(g, gates_cum, &mut rg, bos, len, p1, cl1, h, 0, kp, l);
            if comptime!(l.delta) {
                fetch_tile::<f32, F>(w, &mut rw, bos, len, p1, cl1, h, 0, l.k, kp, l);
                fetch_tile::<f32, f32>(ut, &mut ru, bos, len, p1, cl1, h, v0, l.v, bv, l);
            } else {
                fetch_tile::<F, F>(v, &mut rv, bos, len, p1, cl1, h, v0, l.v, bv, l);
            }
        }
        if comptime!(l.states) {
            // Only the gates' cumulation, for the state's update below.
            if comptime!(l.vector_gate) {
                cumulate_key_gates(&mut lamk, kp, l);
            } else {
                cumulate_gates(&gl, &mut lam, l);
            }
            sync_cube();
        } else {
            if comptime!(l.vector_gate) {
                // The scores and `Λ` were staged with the chunk's tiles, so the product with the
                // scores below shares this phase (it reads neither `q` nor the gates).
                scale_keys::<F>(&mut sq, &lamk, scale, kp, false, l);
            } else {
                cumulate_gates(&gl, &mut lam, l);
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
                scale_rows::<F>(&mut sq, &lam, scale, kp, false, l);
                sync_cube();
            }
            // O = (A ∘ D ∘ M) V + q̃ S
            mma::<F, F>(
                &sah,
                0,
                &sv,
                0,
                &mut so,
                0,
                comptime!(nn(c, bv, c, ch, vh, vf)),
                l.tile,
            );
            sync_cube();
            let s = comptime!(accum(nn(c, bv, kp, kh, 0, vf)));
            mma_state::<F>(&sq, &ss, &ssh, 0, &mut so, 0, s, bv, l);
            sync_cube();
            store_tile::<F>(&so, o, 0, bos, len, p0, cl, h, v0, l.v, bv, l);
        }
        // The state after the last chunk is needed only as `ht` (uniform over the cube).
        let mut update = ci + 1 < end;
        if comptime!(l.has_ht) {
            update = true;
        }
        if update {
            if comptime!(l.vector_gate) {
                scale_keys::<F>(&mut sk, &lamk, 1.0f32, kp, true, l);
                decay_state_keys(&mut ss, &lamk, kp, bv, l);
            } else {
                scale_rows::<F>(&mut sk, &lam, 1.0f32, kp, true, l);
                decay_state(&mut ss, &lam, kp, bv, l);
            }
            sync_cube();
            // S ← exp(λ_C) S + k̃ᵀ V
            let s = comptime!(accum(tn(kp, bv, c, kh, vh, vf)));
            mma::<F, F>(&sk, 0, &sv, 0, &mut ss, 0, s, l.tile);
            sync_cube();
        }
    }

    if comptime!(l.has_ht) {
        state_io(&mut ss, ht, base, 0, v0, kp, bv, false, l);
    }
}

/// Backward, `dq` (as an `f32` buffer `[B·T, H, K]`). Cubes `(key block, head, sequence)`.
/// Under vector gates also `dk`'s in-chunk term for the block's keys, into `dk_part` from
/// `dk_slot` on (the partial after the `dk`/`dv` walk's value blocks). Under a scalar gate
/// without `in_chunk`, `dq`'s state term alone: [`scalar_grads_kernel`] writes the in-chunk
/// one, every chunk in parallel, which takes two of the four tile products per chunk off this
/// chain of chunks.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn tiled_dq_kernel<F: Float>(
    k: &Array<F>,
    v: &Array<F>,
    g: &Array<F>,
    gates_cum: &Array<f32>,
    h0: &mut Array<f32>,
    cu_seqlens: &Array<u32>,
    d_o: &Array<F>,
    dq: &mut Array<f32>,
    q: &Array<F>,
    dk_part: &mut Array<f32>,
    dk_slot: u32,
    seq_len: u32,
    spans: u32,
    scale: f32,
    #[comptime] l: TiledLayout,
    #[comptime] factored: bool,
    #[comptime] in_chunk: bool,
    #[define(F)] _dtype: StorageType,
) {
    let (c, vp, bk) = comptime!((l.chunk, l.vp, l.bk));
    // Vector gates sum the in-chunk terms here whatever `in_chunk` says.
    let in_chunk = comptime!(in_chunk || l.vector_gate);
    // `dA`'s tiles, one entry each for the state term alone.
    let ca = comptime!(if in_chunk { c } else { 1 });
    // Under vector gates this walk also writes `dk`'s in-chunk term for its key columns (it
    // holds the whole `dA`), into `dk_part` from `dk_slot` on; one tile entry each otherwise.
    let vg = comptime!(if l.vector_gate { c } else { 1 });
    // [`factored_grads`]'s tiles (vector gates only), one entry each without it.
    let factored = comptime!(factored && l.vector_gate);
    let fc = comptime!(if factored { c } else { 1 });
    let (bkh, vh, ch) = comptime!((bk + l.ph, vp + l.ph, c + l.ph));
    let (bkf, vf, cf) = comptime!((bk + PAD_F, vp + PAD_F, c + PAD_F));
    let (kb, span) = block_and_span(comptime!(l.k.div_ceil(bk)), l);
    let k0 = kb * bk;
    let h = CUBE_POS_Y as usize;
    let n = CUBE_POS_Z as usize;
    let bos = seq_start(cu_seqlens, n, seq_len, l.varlen);
    let len = seq_length(cu_seqlens, n, seq_len, l.varlen);
    let mut base = (n * l.heads + h) * l.k * l.v;
    if comptime!(l.span > 0) {
        // The state entering the span, from the forward's states pass (given as `h0`).
        base = hs_offset(n, spans, span, h, l);
    }

    let mut sk = tile_h::<F>(c, bk, l);
    let mut sv = tile_h::<F>(c, vp, l);
    let mut sdo = tile_h::<F>(c, vp, l);
    let mut sa = tile_f(ca, ca);
    let mut sah = tile_h::<F>(ca, ca, l);
    let mut sdq = tile_f(c, bk);
    let mut ss = tile_f(bk, vp);
    let mut ssh = tile_h::<F>(comptime!(if l.tile.cmma { bk } else { 1 }), vp, l);
    let mut gl = SharedMemory::<f32>::new(c);
    let mut lam = SharedMemory::<f32>::new(c);
    let mut lamk = key_gates_tile(bk, l);
    let mut sq = tile_h::<F>(vg, bk, l);
    let mut sdk = tile_f(vg, bk);
    let mut sx = tile_h::<F>(fc, bk, l);
    let mut sy = tile_h::<F>(fc, bk, l);
    let mut soff = tile_f(fc, bk);

    let mut first_row = k0;
    if comptime!(!l.has_h0 && l.span == 0) {
        first_row = l.k;
    }
    state_io(&mut ss, h0, base, first_row, 0, bk, vp, true, l);

    let mut rk = Array::<F>::new(comptime!(tile_regs(&l, bk)));
    let mut rv = Array::<F>::new(comptime!(tile_regs(&l, vp)));
    let mut rdo = Array::<F>::new(comptime!(tile_regs(&l, vp)));
    let mut rg = Array::<f32>::new(comptime!(key_gate_regs(&l, bk)));
    let mut rq = Array::<F>::new(comptime!(if l.vector_gate { tile_regs(&l, bk) } else { 1 }));
    let (first, end) = chunk_range(len, span, l);
    if first < end {
        let p0 = first * c;
        let cl = chunk_len(len, p0, c);
        fetch_tile::<F, F>(k, &mut rk, bos, len, p0, cl, h, k0, l.k, bk, l);
        fetch_key_gates::<F>(g, gates_cum, &mut rg, bos, len, p0, cl, h, k0, bk, l);
        if comptime!(l.vector_gate) {
            fetch_tile::<F, F>(q, &mut rq, bos, len, p0, cl, h, k0, l.k, bk, l);
        }
        fetch_tile::<F, F>(v, &mut rv, bos, len, p0, cl, h, 0, l.v, vp, l);
        fetch_tile::<F, F>(d_o, &mut rdo, bos, len, p0, cl, h, 0, l.v, vp, l);
    }
    for ci in first..end {
        let p0 = ci * c;
        let cl = chunk_len(len, p0, c);
        stage_tile::<F>(&rk, &mut sk, bk, l);
        stage_tile::<F>(&rv, &mut sv, vp, l);
        stage_tile::<F>(&rdo, &mut sdo, vp, l);
        if comptime!(l.vector_gate) {
            stage_tile::<F>(&rq, &mut sq, bk, l);
        }
        load_gates::<F>(g, &mut gl, bos, len, p0, cl, h, l);
        stage_key_gates(&rg, &mut lamk, bk, l);
        round_state::<F>(&ss, &mut ssh, bk, vp, l);
        sync_cube();
        if ci + 1 < end {
            let p1 = p0 + c;
            let cl1 = chunk_len(len, p1, c);
            fetch_tile::<F, F>(k, &mut rk, bos, len, p1, cl1, h, k0, l.k, bk, l);
            fetch_key_gates::<F>(g, gates_cum, &mut rg, bos, len, p1, cl1, h, k0, bk, l);
            if comptime!(l.vector_gate) {
                fetch_tile::<F, F>(q, &mut rq, bos, len, p1, cl1, h, k0, l.k, bk, l);
            }
            fetch_tile::<F, F>(v, &mut rv, bos, len, p1, cl1, h, 0, l.v, vp, l);
            fetch_tile::<F, F>(d_o, &mut rdo, bos, len, p1, cl1, h, 0, l.v, vp, l);
        }
        if comptime!(in_chunk) {
            // dA = dO Vᵀ
            let s = comptime!(nt(c, c, vp, vh, vh, cf));
            mma::<F, F>(&sdo, 0, &sv, 0, &mut sa, 0, s, l.tile);
        }
        if comptime!(l.vector_gate) {
            // dO Sᵀ, gated per key below (`Λ` was staged with the chunk's tiles).
            let s = comptime!(nt(c, bk, vp, vh, 0, bkf));
            mma_state::<F>(&sdo, &ss, &ssh, 0, &mut sdq, 0, s, vp, l);
            sync_cube();
            if comptime!(factored) {
                factored_grads::<F>(
                    &sa, &mut sah, &sq, &sk, &lamk, &mut sx, &mut sy, &mut soff, &mut sdk, bk, l,
                );
            }
            key_gated_dq::<F>(
                &sa, &sk, &lamk, &soff, &mut sdq, scale, bk, true, true, factored, l,
            );
            key_gated_dk::<F>(&sa, &sq, &lamk, &mut sdk, scale, bk, factored, l);
            sync_cube();
            let slot = dk_slot as usize;
            store_tile::<f32>(&sdk, dk_part, slot, bos, len, p0, cl, h, k0, l.k, bk, l);
        } else {
            cumulate_gates(&gl, &mut lam, l);
            sync_cube();
            if comptime!(in_chunk) {
                masked_decay::<F>(&sa, &mut sah, &lam, scale, l);
            }
            scale_rows::<F>(&mut sdo, &lam, scale, vp, false, l);
            sync_cube();
            // dQ = (dA ∘ D ∘ M) K + (scale · exp(λ) dO) Sᵀ, or the second term alone.
            if comptime!(in_chunk) {
                let s = comptime!(nn(c, bk, c, ch, bkh, bkf));
                mma::<F, F>(&sah, 0, &sk, 0, &mut sdq, 0, s, l.tile);
                sync_cube();
            }
            let s = comptime!(if in_chunk {
                accum(nt(c, bk, vp, vh, 0, bkf))
            } else {
                nt(c, bk, vp, vh, 0, bkf)
            });
            mma_state::<F>(&sdo, &ss, &ssh, 0, &mut sdq, 0, s, vp, l);
            sync_cube();
        }
        store_tile::<f32>(&sdq, dq, 0, bos, len, p0, cl, h, k0, l.k, bk, l);
        // No chunk after the last needs the state (uniform over the cube).
        if ci + 1 < end {
            if comptime!(l.vector_gate) {
                scale_keys::<F>(&mut sk, &lamk, 1.0f32, bk, true, l);
                decay_state_keys(&mut ss, &lamk, bk, vp, l);
            } else {
                scale_rows::<F>(&mut sk, &lam, 1.0f32, bk, true, l);
                decay_state(&mut ss, &lam, bk, vp, l);
            }
            sync_cube();
            // S ← exp(λ_C) S + k̃ᵀ V
            let s = comptime!(accum(tn(bk, vp, c, bkh, vh, vf)));
            mma::<F, F>(&sk, 0, &sv, 0, &mut ss, 0, s, l.tile);
            sync_cube();
        }
    }
}

/// Backward, `dv`, the value block's partial of `dk` (`f32`, `[blocks, B·T, H, K]`) and `dh0`.
/// Cubes `(value block, head, sequence)`, walking the chunks backwards from `dhT`. Under vector
/// gates the partial is the state's term alone (the `dq` walk, [`vector_grads_kernel`] or, for
/// simple GLA on this walk, [`scalar_grads_kernel`] writes the in-chunk one) and the scores come
/// from [`vector_scores_kernel`] or [`scalar_scores_kernel`] (`a`).
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn tiled_dkv_kernel<F: Float>(
    q: &Array<F>,
    k: &Array<F>,
    v: &Array<F>,
    a: &Array<F>,
    g: &Array<F>,
    gates_cum: &Array<f32>,
    cu_seqlens: &Array<u32>,
    d_o: &Array<F>,
    d_ht: &mut Array<f32>,
    dk_part: &mut Array<f32>,
    dv: &mut Array<F>,
    dh0: &mut Array<f32>,
    hs: &mut Array<f32>,
    seq_len: u32,
    spans: u32,
    dk_len: u32,
    scale: f32,
    #[comptime] l: TiledLayout,
    #[comptime] has_dht: bool,
    #[define(F)] _dtype: StorageType,
) {
    let (c, kp, bv, nb) = comptime!((l.chunk, l.kp, l.bv, l.nb));
    let (kh, vh, ch) = comptime!((kp + l.ph, bv + l.ph, c + l.ph));
    let (vf, cf, nf) = comptime!((bv + PAD_F, c + PAD_F, nb + PAD_F));
    let (vb, span) = block_and_span(comptime!(l.v.div_ceil(bv)), l);
    let v0 = vb * bv;
    let h = CUBE_POS_Y as usize;
    let n = CUBE_POS_Z as usize;
    let bos = seq_start(cu_seqlens, n, seq_len, l.varlen);
    let len = seq_length(cu_seqlens, n, seq_len, l.varlen);
    let base = (n * l.heads + h) * l.k * l.v;
    // This cube's partial of dk: value block `vb` of `[blocks, B·T·H·K]`.
    let part = vb * dk_len as usize;

    // The states pass needs no keys, values, scores or gradients but the state's (one entry).
    let co = comptime!(if l.states { 1 } else { c });
    let mut sq = tile_h::<F>(c, kp, l);
    let mut sk = tile_h::<F>(co, kp, l);
    let mut sv = tile_h::<F>(co, bv, l);
    let mut sdo = tile_h::<F>(c, bv, l);
    let mut sa = tile_f(co, c);
    let mut sah = tile_h::<F>(co, c, l);
    let mut sdv = tile_f(co, bv);
    let mut sdk = tile_f(co, nb);
    let mut sg = tile_f(kp, bv);
    let mut sgh = tile_h::<F>(comptime!(if l.tile.cmma { kp } else { 1 }), bv, l);
    let mut gl = SharedMemory::<f32>::new(c);
    let mut lam = SharedMemory::<f32>::new(c);
    let mut lamk = key_gates_tile(kp, l);

    // `dhT`, or with spans the gradient at the span's end that the states pass left in `hs`
    // (given here as `d_ht`).
    let first_row = comptime!(if has_dht || l.span > 0 { 0 } else { l.k });
    let mut g_base = base;
    if comptime!(l.span > 0) {
        g_base = hs_offset(n, spans, span, h, l);
    }
    state_io(&mut sg, d_ht, g_base, first_row, v0, kp, bv, true, l);

    let kv = comptime!(if l.states { 1 } else { kp });
    let mut rq = Array::<F>::new(comptime!(tile_regs(&l, kp)));
    let mut rk = Array::<F>::new(comptime!(tile_regs(&l, kv)));
    let mut rv = Array::<F>::new(comptime!(tile_regs(&l, if l.states { 1 } else { bv })));
    let mut rdo = Array::<F>::new(comptime!(tile_regs(&l, bv)));
    let mut rg = Array::<f32>::new(comptime!(key_gate_regs(&l, kp)));
    // The in-chunk scores under vector gates, from `vector_scores_kernel`.
    let scores = comptime!(l.vector_gate && !l.states);
    let mut ra = Array::<F>::new(comptime!(if scores { tile_regs(&l, c) } else { 1 }));
    let (first, end) = chunk_range(len, span, l);
    // The last chunk first: it starts at (end − 1)·C and holds the rest of the sequence or of
    // the span.
    if first < end {
        let plast = (end - 1) * c;
        let cl_last = chunk_len(len, plast, c);
        fetch_tile::<F, F>(q, &mut rq, bos, len, plast, cl_last, h, 0, l.k, kp, l);
        if comptime!(!l.states) {
            fetch_tile::<F, F>(k, &mut rk, bos, len, plast, cl_last, h, 0, l.k, kp, l);
            fetch_tile::<F, F>(v, &mut rv, bos, len, plast, cl_last, h, v0, l.v, bv, l);
        }
        if comptime!(scores) {
            fetch_tile::<F, F>(a, &mut ra, bos, len, plast, cl_last, h, 0, c, c, l);
        }
        fetch_tile::<F, F>(d_o, &mut rdo, bos, len, plast, cl_last, h, v0, l.v, bv, l);
        fetch_key_gates::<F>(g, gates_cum, &mut rg, bos, len, plast, cl_last, h, 0, kp, l);
    }
    for ci in first..end {
        let cr = ci - first;
        let p0 = (end - 1 - cr) * c;
        let cl = chunk_len(len, p0, c);
        stage_tile::<F>(&rq, &mut sq, kp, l);
        if comptime!(!l.states) {
            stage_tile::<F>(&rk, &mut sk, kp, l);
            stage_tile::<F>(&rv, &mut sv, bv, l);
        }
        if comptime!(scores) {
            stage_tile::<F>(&ra, &mut sah, c, l);
        }
        stage_tile::<F>(&rdo, &mut sdo, bv, l);
        load_gates::<F>(g, &mut gl, bos, len, p0, cl, h, l);
        stage_key_gates(&rg, &mut lamk, kp, l);
        if comptime!(l.states) {
            // The gradient at this chunk's end, for the output pass.
            let at = hs_offset(n, spans, end - 1 - cr, h, l);
            state_io(&mut sg, hs, at, 0, v0, kp, bv, false, l);
        } else {
            round_state::<F>(&sg, &mut sgh, kp, bv, l);
        }
        sync_cube();
        if ci + 1 < end {
            // Every chunk before the last is full.
            let p1 = p0 - c;
            fetch_tile::<F, F>(q, &mut rq, bos, len, p1, c, h, 0, l.k, kp, l);
            if comptime!(!l.states) {
                fetch_tile::<F, F>(k, &mut rk, bos, len, p1, c, h, 0, l.k, kp, l);
                fetch_tile::<F, F>(v, &mut rv, bos, len, p1, c, h, v0, l.v, bv, l);
            }
            if comptime!(scores) {
                fetch_tile::<F, F>(a, &mut ra, bos, len, p1, c, h, 0, c, c, l);
            }
            fetch_tile::<F, F>(d_o, &mut rdo, bos, len, p1, c, h, v0, l.v, bv, l);
            fetch_key_gates::<F>(g, gates_cum, &mut rg, bos, len, p1, c, h, 0, kp, l);
        }
        // The gradient before the first chunk is needed only as `dh0` (uniform over the cube).
        let mut update = ci + 1 < end;
        if comptime!(l.has_h0) {
            update = true;
        }
        if comptime!(l.states) {
            if comptime!(l.vector_gate) {
                cumulate_key_gates(&mut lamk, kp, l);
                sync_cube();
                scale_keys::<F>(&mut sq, &lamk, scale, kp, false, l);
                decay_state_keys(&mut sg, &lamk, kp, bv, l);
            } else {
                cumulate_gates(&gl, &mut lam, l);
                sync_cube();
                scale_rows::<F>(&mut sq, &lam, scale, kp, false, l);
                decay_state(&mut sg, &lam, kp, bv, l);
            }
            sync_cube();
        } else if comptime!(l.vector_gate) {
            // The scores and `Λ` were staged with the chunk's tiles; `dk`'s in-chunk term is
            // the `dq` walk's.
            scale_keys::<F>(&mut sk, &lamk, 1.0f32, kp, true, l);
            // dV = (scale · A ∘ M)ᵀ dO + k̃ G
            mma::<F, F>(
                &sah,
                0,
                &sdo,
                0,
                &mut sdv,
                0,
                comptime!(tn(c, bv, c, ch, vh, vf)),
                l.tile,
            );
            sync_cube();
            let s = comptime!(accum(nn(c, bv, kp, kh, 0, vf)));
            mma_state::<F>(&sk, &sg, &sgh, 0, &mut sdv, 0, s, bv, l);
            sync_cube();
            store_tile::<F>(&sdv, dv, 0, bos, len, p0, cl, h, v0, l.v, bv, l);
            // dK's state term, exp(Λ_C − Λ) ∘ (V Gᵀ), `nb` key columns at a time.
            #[unroll]
            for kb in 0..comptime!(kp / nb) {
                let col0 = kb * nb;
                let s = comptime!(nt(c, nb, bv, vh, 0, nf));
                mma_state::<F>(&sv, &sg, &sgh, col0, &mut sdk, 0, s, bv, l);
                sync_cube();
                store_keys_decayed(&sdk, &lamk, dk_part, part, bos, len, p0, cl, h, col0, nb, l);
                sync_cube();
            }
            if update {
                scale_keys::<F>(&mut sq, &lamk, scale, kp, false, l);
                decay_state_keys(&mut sg, &lamk, kp, bv, l);
                sync_cube();
            }
        } else {
            cumulate_gates(&gl, &mut lam, l);
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
            // dV = (A ∘ D ∘ M)ᵀ dO (+ k̃ G below); dA = dO Vᵀ
            mma::<F, F>(
                &sah,
                0,
                &sdo,
                0,
                &mut sdv,
                0,
                comptime!(tn(c, bv, c, ch, vh, vf)),
                l.tile,
            );
            mma::<F, F>(
                &sdo,
                0,
                &sv,
                0,
                &mut sa,
                0,
                comptime!(nt(c, c, bv, vh, vh, cf)),
                l.tile,
            );
            sync_cube();
            let s = comptime!(accum(nn(c, bv, kp, kh, 0, vf)));
            mma_state::<F>(&sk, &sg, &sgh, 0, &mut sdv, 0, s, bv, l);
            masked_decay::<F>(&sa, &mut sah, &lam, scale, l);
            scale_rows::<F>(&mut sv, &lam, 1.0f32, bv, true, l);
            sync_cube();
            store_tile::<F>(&sdv, dv, 0, bos, len, p0, cl, h, v0, l.v, bv, l);
            // dK = (dA ∘ D ∘ M)ᵀ Q + ṽ Gᵀ, `nb` key columns at a time.
            #[unroll]
            for kb in 0..comptime!(kp / nb) {
                let col0 = kb * nb;
                let s = comptime!(tn(c, nb, c, ch, kh, nf));
                mma::<F, F>(&sah, 0, &sq, col0, &mut sdk, 0, s, l.tile);
                sync_cube();
                let s = comptime!(accum(nt(c, nb, bv, vh, 0, nf)));
                mma_state::<F>(&sv, &sg, &sgh, col0, &mut sdk, 0, s, bv, l);
                sync_cube();
                store_tile::<f32>(&sdk, dk_part, part, bos, len, p0, cl, h, col0, l.k, nb, l);
                sync_cube();
            }
            if update {
                scale_rows::<F>(&mut sq, &lam, scale, kp, false, l);
                decay_state(&mut sg, &lam, kp, bv, l);
                sync_cube();
            }
        }
        if update {
            // G ← exp(λ_C) G + q̃ᵀ dO
            let s = comptime!(accum(tn(kp, bv, c, kh, vh, vf)));
            mma::<F, F>(&sq, 0, &sdo, 0, &mut sg, 0, s, l.tile);
            sync_cube();
        }
    }

    if comptime!(l.has_h0) {
        state_io(&mut sg, dh0, base, 0, v0, kp, bv, false, l);
    }
}
