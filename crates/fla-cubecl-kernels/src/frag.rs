//! Building blocks of the kernels that keep their accumulators in tensor-core registers (CUDA's
//! `mma.sync`, m16n8k16, 16-bit inputs, `f32` accumulators, through CubeCL's manual MMA): the
//! attention kernels ([`crate::attn`]), the gated family's chunk walks ([`crate::gated`]) and the
//! delta rule's backward `dq`/`dk⁻`/`dW` kernel ([`crate::delta`]).
//!
//! The register layout is PTX's for `mma.m16n8k16` with 16-bit inputs, which CubeCL's
//! `MmaDefinition::position_of_nth` also reports on CUDA (lane `l`, `g = l / 4`, `t = l % 4`;
//! pairs of adjacent entries share a 32-bit register):
//! - `A` (16×16, pairs along a row): `[g][2t..]`, `[g+8][2t..]`, `[g][2t+8..]`, `[g+8][2t+8..]`;
//! - `B` (16×8, pairs down a column): `[2t..][g]`, `[2t+8..][g]`;
//! - accumulator (16×8, pairs along a row): `[g][2t..]`, `[g+8][2t..]`.
//!
//! Fragments come from shared memory by `ldmatrix` (four 8×8 matrices per instruction, `.trans`
//! for operands stored the other way round); tiles are staged from global memory in vectors of up
//! to eight entries (16 bytes), each unit holding whole vectors. CubeCL compiles manual MMA and
//! `ldmatrix` only for CUDA (SPIR-V has neither), so these kernels exist beside plain ones that
//! every device runs.

use cubecl::cmma::{MatrixIdent, MmaDefinition};
use cubecl::ir::features::MmaConfig;
use cubecl::prelude::*;

use crate::FloatDType;

/// Rows of an `A` fragment and an accumulator tile, and the `m`, `n`, `k` of one instruction.
pub const FRAG_M: usize = 16;
pub const FRAG_N: usize = 8;
pub const FRAG_K: usize = 16;

/// Whether this device runs these kernels for `dtype`: CUDA, with `mma.sync` m16n8k16 of
/// `dtype` into `f32` and `ldmatrix` of it (f16 and bf16 on sm_80 and later).
pub fn registers_available<R: Runtime>(client: &ComputeClient<R>, dtype: FloatDType) -> bool {
    let mma = MmaConfig {
        a_type: dtype.storage(),
        b_type: dtype.storage(),
        cd_type: FloatDType::F32.storage(),
        m: FRAG_M as u32,
        n: FRAG_N as u32,
        k: FRAG_K as u32,
    };
    let matmul = &client.properties().features.matmul;
    R::name(client).contains("cuda")
        && matmul.mma.contains(&mma)
        && matmul.ldmatrix.contains(&dtype.storage())
}

/// How a cube stages tiles: entries per vector (8, 4, 2 or 1: 16 bytes at most), the padding of
/// each tile row in entries (16 bytes, so that the eight rows of an `ldmatrix` matrix fall in
/// different banks), and the cube's units.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Staging {
    pub vector: usize,
    pub ph: usize,
    pub threads: usize,
}

/// The widest vector (8, 4, 2 or 1 entries) that divides every width given: rows of those widths
/// then start on a whole vector.
pub fn widest_vector(widths: &[usize]) -> usize {
    [8, 4, 2, 1]
        .into_iter()
        .find(|v| widths.iter().all(|w| w % v == 0))
        .unwrap_or(1)
}

/// `g` and `t` of this lane.
#[cube]
pub fn lane_gt() -> (usize, usize) {
    let lane = UNIT_POS_PLANE as usize;
    (lane / 4, lane % 4)
}

/// A padded tile of `rows × cols` entries in vectors of `s.vector`, rows 16-byte aligned for
/// `ldmatrix`.
#[cube]
pub fn tile_slots<F: Float, N: Size>(
    #[comptime] rows: usize,
    #[comptime] cols: usize,
    #[comptime] s: Staging,
) -> SharedMemory<Vector<F, N>> {
    SharedMemory::<Vector<F, N>>::new_aligned(comptime!(rows * (cols + s.ph) / s.vector), 64usize)
}

/// Vectors of a `rows × cols` tile that one unit stages.
pub fn slots_per_unit(rows: usize, cols: usize, s: &Staging) -> usize {
    (rows * cols / s.vector).div_ceil(s.threads)
}

/// Fetches this unit's vectors of rows `row0 ..` (those below `valid`) and columns `col0 ..` (a
/// whole vector) of head `h` of a `[tokens, heads, width]` tensor for a `rows × cols` tile, zeros
/// past `valid` and `width` (so partial blocks and padded head dims need no other care).
/// [`put_slots`] writes them; loops fetch their next block before the current block's products,
/// so the loads are in flight during them.
#[cube]
#[allow(clippy::too_many_arguments)]
pub fn fetch_slots<F: Float, N: Size>(
    src: &Array<Vector<F, N>>,
    dst: &mut Array<Vector<F, N>>,
    row0: usize,
    valid: usize,
    h: usize,
    col0: usize,
    #[comptime] heads: usize,
    #[comptime] width: usize,
    #[comptime] rows: usize,
    #[comptime] cols: usize,
    #[comptime] s: Staging,
) {
    fetch_cast::<F, F, N>(src, dst, row0, valid, h, col0, heads, width, rows, cols, s);
}

/// [`fetch_slots`] from a tensor of another float type (the `f32` intermediates a backward
/// reads), each vector converted to the tile's dtype (a no-op where the types agree).
#[cube]
#[allow(clippy::too_many_arguments)]
pub fn fetch_cast<S: Float, F: Float, N: Size>(
    src: &Array<Vector<S, N>>,
    dst: &mut Array<Vector<F, N>>,
    row0: usize,
    valid: usize,
    h: usize,
    col0: usize,
    #[comptime] heads: usize,
    #[comptime] width: usize,
    #[comptime] rows: usize,
    #[comptime] cols: usize,
    #[comptime] s: Staging,
) {
    let (wv, cv) = comptime!((width / s.vector, cols / s.vector));
    let c0 = col0 / comptime!(s.vector);
    let slots = comptime!(rows * cv);
    let unit = UNIT_POS as usize;
    #[unroll]
    for r in 0..comptime!(slots_per_unit(rows, cols, &s)) {
        let e = unit + r * comptime!(s.threads);
        let row = e / cv;
        let c = c0 + e % cv;
        let mut x = Vector::<F, N>::cast_from(0.0f32);
        if e < slots && row < valid && c < wv {
            x = Vector::<F, N>::cast_from(src[((row0 + row) * heads + h) * wv + c]);
        }
        dst[r] = x;
    }
}

/// Writes the vectors [`fetch_slots`] fetched into a padded `rows × cols` tile.
#[cube]
pub fn put_slots<F: Float, N: Size>(
    src: &Array<Vector<F, N>>,
    dst: &mut SharedMemory<Vector<F, N>>,
    #[comptime] rows: usize,
    #[comptime] cols: usize,
    #[comptime] s: Staging,
) {
    let (cv, ld) = comptime!((cols / s.vector, (cols + s.ph) / s.vector));
    let slots = comptime!(rows * cv);
    let unit = UNIT_POS as usize;
    #[unroll]
    for r in 0..comptime!(slots_per_unit(rows, cols, &s)) {
        let e = unit + r * comptime!(s.threads);
        if e < slots {
            dst[(e / cv) * ld + e % cv] = src[r];
        }
    }
}

/// [`fetch_cast`] then [`put_slots`]: rows `row0 ..` (below `valid`), columns `col0 ..` of head `h`
/// of a `[rows, heads, width]` tensor of `S`s staged at once as a `rows × cols` tile of `F`s.
#[cube]
#[allow(clippy::too_many_arguments)]
pub fn stage_cast<S: Float, F: Float, N: Size>(
    src: &Array<Vector<S, N>>,
    dst: &mut SharedMemory<Vector<F, N>>,
    row0: usize,
    valid: usize,
    h: usize,
    col0: usize,
    #[comptime] heads: usize,
    #[comptime] width: usize,
    #[comptime] rows: usize,
    #[comptime] cols: usize,
    #[comptime] s: Staging,
) {
    let mut held = Array::<Vector<F, N>>::new(comptime!(slots_per_unit(rows, cols, &s)));
    fetch_cast::<S, F, N>(
        src, &mut held, row0, valid, h, col0, heads, width, rows, cols, s,
    );
    put_slots::<F, N>(&held, dst, rows, cols, s);
}

/// Four 8×8 matrices by `ldmatrix` (`.trans` with `trans`) from a padded tile of `cols` columns
/// (`ld = cols + ph` entries a row, in vectors of `vector`): matrix `m` has rows
/// `row0 + 8·(m % 2) ..` and columns `col0 + 8·(m / 2) ..` (`swap` exchanges the two offsets).
/// This gives
/// - an `A` fragment at `(row0, col0)`;
/// - with `swap`, the two `B` fragments `(k, n) = t[n0 + n][k0 + k]` of columns `n0 = row0` and
///   `n0 + 8`, `k0 = col0`;
/// - with `trans`, the two `B` fragments `(k, n) = t[k0 + k][n0 + n]` of `k0 = row0` and columns
///   `n0 = col0`, `n0 + 8`;
/// - with both, the `A` fragment `(m, k) = t[k0 + k][m0 + m]` of `k0 = row0`, `m0 = col0` (an
///   operand stored transposed).
#[cube]
#[allow(clippy::too_many_arguments)]
pub fn ldm4<F: Float, N: Size, NO: Size>(
    t: &SharedMemory<Vector<F, N>>,
    row0: usize,
    col0: usize,
    #[comptime] ld: usize,
    #[comptime] vector: usize,
    #[comptime] swap: bool,
    #[comptime] trans: bool,
) -> Array<Vector<F, NO>> {
    let def = MmaDefinition::<F, F, f32>::new(FRAG_M, FRAG_N, FRAG_K);
    let lane = UNIT_POS_PLANE as usize;
    let m = lane / 8;
    let mut dr = (m % 2) * 8;
    let mut dc = (m / 2) * 8;
    if comptime!(swap) {
        dr = (m / 2) * 8;
        dc = (m % 2) * 8;
    }
    let at = ((row0 + dr + lane % 8) * ld + col0 + dc) / vector;
    let row = t.slice(at, at + comptime!(8 / vector));
    def.load_matrix::<Vector<F, N>, NO>(&row, MatrixIdent::A, 4usize, trans)
}

/// Registers `2i`, `2i + 1` of a four-register load: one `B` fragment.
#[cube]
pub fn half_of<F: Float, NB: Size>(
    r: &Array<Vector<F, NB>>,
    #[comptime] i: usize,
) -> Array<Vector<F, NB>> {
    let mut b = Array::<Vector<F, NB>>::new(2usize);
    b[0] = r[2 * i];
    b[1] = r[2 * i + 1];
    b
}

/// The `A` fragment of columns `16 s ..` of a row of accumulator tiles (tiles `2s` and `2s + 1`),
/// rounded to the input dtype (as FlashAttention rounds `P` and `dS`).
#[cube]
pub fn a_from_acc<F: Float, NA: Size, NC: Size>(
    acc: &Array<Vector<f32, NC>>,
    s: usize,
) -> Array<Vector<F, NA>> {
    let mut a = Array::<Vector<F, NA>>::new(4usize);
    #[unroll]
    for r in 0..4usize {
        let x = acc[s * 4 + r];
        let mut y = Vector::<F, NA>::empty();
        y[0] = F::cast_from(x[0]);
        y[1] = F::cast_from(x[1]);
        a[r] = y;
    }
    a
}

/// Accumulator tile `j` of `acc` (entries `2j`, `2j + 1`) `+= a · b`.
#[cube]
pub fn mma_acc<F: Float, NA: Size, NB: Size, NC: Size>(
    a: &Array<Vector<F, NA>>,
    b: &Array<Vector<F, NB>>,
    acc: &mut Array<Vector<f32, NC>>,
    j: usize,
) {
    let def = MmaDefinition::<F, F, f32>::new(FRAG_M, FRAG_N, FRAG_K);
    let mut c = Array::<Vector<f32, NC>>::new(2usize);
    c[0] = acc[j * 2];
    c[1] = acc[j * 2 + 1];
    let d = def.execute(a, b, &c);
    acc[j * 2] = d[0];
    acc[j * 2 + 1] = d[1];
}

/// Writes accumulator tiles (16 rows from `row0` of the `valid` in the block, `width / 8` tiles
/// from column `col0`) times `1 / z` per row half (`z0` for rows `g`, `z1` for `g + 8`; 0 where
/// `z` is 0 when `normalise`) to head `h` of a `[tokens, heads, cols]` tensor, columns below
/// `cols`.
#[cube]
#[allow(clippy::too_many_arguments)]
pub fn store_acc<F: Float, NC: Size>(
    acc: &Array<Vector<f32, NC>>,
    dst: &mut Array<F>,
    tok0: usize,
    row0: usize,
    valid: usize,
    h: usize,
    col0: usize,
    z0: f32,
    z1: f32,
    #[comptime] normalise: bool,
    #[comptime] heads: usize,
    #[comptime] cols: usize,
    #[comptime] width: usize,
) {
    let (g, q) = lane_gt();
    #[unroll]
    for half in 0..2usize {
        let row = row0 + g + half * 8;
        let mut z = z0;
        if half == 1 {
            z = z1;
        }
        if row < valid {
            let at = ((tok0 + row) * heads + h) * cols;
            #[unroll]
            for j in 0..comptime!(width / FRAG_N) {
                let x = acc[j * 2 + half];
                #[unroll]
                for e in 0..2usize {
                    let col = col0 + j * FRAG_N + 2 * q + e;
                    if col < cols {
                        let mut y = x[e];
                        if comptime!(normalise) {
                            y = select(z > 0.0f32, y / z, 0.0f32);
                        }
                        dst[at + col] = F::cast_from(y);
                    }
                }
            }
        }
    }
}

/// `tiles` zeroed accumulator tiles.
#[cube]
pub fn zeros<NC: Size>(#[comptime] tiles: usize) -> Array<Vector<f32, NC>> {
    let mut acc = Array::<Vector<f32, NC>>::new(comptime!(tiles * 2));
    #[unroll]
    for j in 0..comptime!(tiles * 2) {
        acc[j] = Vector::<f32, NC>::cast_from(0.0f32);
    }
    acc
}

/// `acc = A Bᵀ` for the 16 rows `r0 ..` of tile `a` against the `n` rows of tile `b` (`n / 8`
/// accumulator tiles), over `width` columns (both tiles `width` wide, staged as `s` says): scores
/// `Q Kᵀ` and their kin, with `A` read from shared memory.
#[cube]
#[allow(clippy::too_many_arguments)]
pub fn scores_tiles<F: Float, N: Size, NA: Size, NB: Size, NC: Size>(
    a: &SharedMemory<Vector<F, N>>,
    r0: usize,
    b: &SharedMemory<Vector<F, N>>,
    acc: &mut Array<Vector<f32, NC>>,
    #[comptime] n: usize,
    #[comptime] width: usize,
    #[comptime] s: Staging,
) {
    #[unroll]
    for k in 0..comptime!(width / FRAG_K) {
        let fa = ldm4::<F, N, NA>(
            a,
            r0,
            k * FRAG_K,
            comptime!(width + s.ph),
            s.vector,
            false,
            false,
        );
        scores_step::<F, N, NA, NB, NC>(&fa, b, acc, k, n, width, s);
    }
}

/// One 16-column step `k` of [`scores_tiles`] with the `A` fragment given.
#[cube]
#[allow(clippy::too_many_arguments)]
pub fn scores_step<F: Float, N: Size, NA: Size, NB: Size, NC: Size>(
    fa: &Array<Vector<F, NA>>,
    b: &SharedMemory<Vector<F, N>>,
    acc: &mut Array<Vector<f32, NC>>,
    k: usize,
    #[comptime] n: usize,
    #[comptime] width: usize,
    #[comptime] s: Staging,
) {
    #[unroll]
    for j in 0..comptime!(n / FRAG_K) {
        let r = ldm4::<F, N, NB>(
            b,
            j * FRAG_K,
            k * FRAG_K,
            comptime!(width + s.ph),
            s.vector,
            true,
            false,
        );
        mma_acc::<F, NA, NB, NC>(fa, &half_of::<F, NB>(&r, 0usize), acc, 2 * j);
        mma_acc::<F, NA, NB, NC>(fa, &half_of::<F, NB>(&r, 1usize), acc, 2 * j + 1);
    }
}

/// `acc += X · B` for `X` the accumulator tiles `x` (16 rows, `k` columns, rounded) and `B`
/// rows `..k` of tile `b`, `width` columns (`width / 8` accumulator tiles).
#[cube]
pub fn acc_times_rows<F: Float, N: Size, NA: Size, NB: Size, NC: Size>(
    x: &Array<Vector<f32, NC>>,
    b: &SharedMemory<Vector<F, N>>,
    acc: &mut Array<Vector<f32, NC>>,
    #[comptime] k: usize,
    #[comptime] width: usize,
    #[comptime] s: Staging,
) {
    #[unroll]
    for i in 0..comptime!(k / FRAG_K) {
        let fa = a_from_acc::<F, NA, NC>(x, i);
        #[unroll]
        for j in 0..comptime!(width / FRAG_K) {
            let r = ldm4::<F, N, NB>(
                b,
                i * FRAG_K,
                j * FRAG_K,
                comptime!(width + s.ph),
                s.vector,
                false,
                true,
            );
            mma_acc::<F, NA, NB, NC>(&fa, &half_of::<F, NB>(&r, 0usize), acc, 2 * j);
            mma_acc::<F, NA, NB, NC>(&fa, &half_of::<F, NB>(&r, 1usize), acc, 2 * j + 1);
        }
    }
}
