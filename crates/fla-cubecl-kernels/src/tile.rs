//! Products of tiles held in shared memory, on tensor cores or in plain arithmetic.
//!
//! The chunk kernels are written once around [`mma`]: `out (+)= A · B` over shared-memory tiles.
//! Where the device has cooperative matrices for the input type (CUDA, Vulkan with
//! `VK_KHR_cooperative_matrix`) the product runs on tensor cores, 16×16×16 fragments with `f32`
//! accumulation, one plane (warp) per output tile; elsewhere (lavapipe, `f32` inputs) every unit
//! computes whole output entries. Both paths share every other line of a kernel: the data movement,
//! masks and gates are tested on lavapipe in CI, and only the fragment arithmetic differs on a GPU.
//!
//! All loops here have compile-time bounds and are unrolled where the device needs it: lavapipe
//! stops a shader after about 65536 loop iterations in total, so a kernel's only run-time loop
//! may be the walk over chunks.

use cubecl::ir::features::EnumSet;
use cubecl::prelude::*;

/// The floating-point freedoms of helpers whose exponentials have exponents at most 0 (gates
/// cumulated from a chunk's start, scores less their row maximum or log-sum-exp): reduced
/// precision (CUDA's `__expf`, two instructions instead of a dozen), finite, non-NaN operands.
/// Its error, a few `f32` ulps per unit of the exponent, is far below the inputs' rounding.
pub(crate) fn fast_exp() -> EnumSet<FastMath> {
    FastMath::ReducedPrecision | FastMath::NotNaN | FastMath::NotInf
}

/// `exp(x)` in the form [`fast_exp`] allows, for exponents at most 0 wherever the result is kept
/// (a cumulated log gate, a score less its row's maximum or log-sum-exp, the change of a running
/// maximum; masked entries are set to 0 after).
#[cube(fast_math = fast_exp())]
pub(crate) fn exp_le0(x: f32) -> f32 {
    x.exp()
}

/// Rows and columns of one tensor-core fragment (16×16×16 for f16/bf16 into f32).
pub const FRAG: usize = 16;
/// Units per plane the tile kernels are laid out for (cube dim x).
pub const PLANE: usize = 32;

/// How a cube computes tile products: on tensor cores or not, with how many planes (rows of 32
/// units: the cube is `(32, planes)`), and whether inner loops must be unrolled (lavapipe counts
/// loop iterations).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TileConfig {
    pub cmma: bool,
    pub planes: usize,
    pub unroll: bool,
}

impl TileConfig {
    pub fn threads(&self) -> usize {
        self.planes * PLANE
    }
}

/// Row and column of the `r`-th entry of a `rows × cols` tile that this unit moves (entries
/// `unit + r · threads` in row-major order; rows past the tile mean "no entry"). Most tiles are
/// as wide as a divisor of the cube: then each unit keeps one column and walks rows, and the
/// index arithmetic per element is a few instructions (it dominated the tiled kernels).
#[cube]
pub fn tile_entry(r: usize, #[comptime] cols: usize, #[comptime] t: TileConfig) -> (usize, usize) {
    let threads = comptime!(t.threads());
    let unit = UNIT_POS as usize;
    let mut row = (unit + r * threads) / cols;
    let mut col = (unit + r * threads) % cols;
    if comptime!(threads % cols == 0) {
        row = unit / cols + r * comptime!(threads / cols);
        col = unit % cols;
    }
    (row, col)
}

/// Registers one unit needs to hold its entries of a `rows × cols` tile ([`tile_entry`]).
pub fn regs_for(rows: usize, cols: usize, t: &TileConfig) -> usize {
    (rows * cols).div_ceil(t.threads())
}

/// Writes this unit's entries of a `rows × cols` tile, held in registers (entry `r` as
/// [`tile_entry`] places it), into a padded row-major tile of leading dimension `cols + pad`.
#[cube]
pub fn put_tile<F: Float>(
    src: &Array<F>,
    dst: &mut SharedMemory<F>,
    #[comptime] rows: usize,
    #[comptime] cols: usize,
    #[comptime] pad: usize,
    #[comptime] t: TileConfig,
) {
    #[unroll]
    for r in 0..comptime!(regs_for(rows, cols, &t)) {
        let (row, c) = tile_entry(r, cols, t);
        if row < rows {
            dst[row * comptime!(cols + pad) + c] = src[r];
        }
    }
}

/// One product `out[m×n] (+)= A[m×k] · B[k×n]`. `A` is read row-major (`a[i·lda + l]`) or, with
/// `a_col`, column-major (`a[i + l·lda]`: the transpose of a row-major `k×m` tile); `B` likewise
/// (`b[l·ldb + j]`, or `b[l + j·ldb]` with `b_col`). `out` is row-major `f32`. With tensor cores,
/// `m`, `n`, `k` are multiples of 16 and every offset and leading dimension keeps 16-element
/// fragments aligned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MmaShape {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub lda: usize,
    pub ldb: usize,
    pub ldo: usize,
    pub a_col: bool,
    pub b_col: bool,
    pub accumulate: bool,
}

/// `out (+)= A · B` over shared memory, by the whole cube (every unit must call it; the caller
/// synchronises before reading `out` or overwriting `a`, `b`).
#[cube]
#[allow(clippy::too_many_arguments)]
pub fn mma<A: Float, B: Float>(
    a: &SharedMemory<A>,
    a_off: usize,
    b: &SharedMemory<B>,
    b_off: usize,
    out: &mut SharedMemory<f32>,
    out_off: usize,
    #[comptime] s: MmaShape,
    #[comptime] t: TileConfig,
) {
    if comptime!(t.cmma) {
        mma_cmma::<A, B>(a, a_off, b, b_off, out, out_off, s, t);
    } else {
        mma_plain::<A, B>(a, a_off, b, b_off, out, out_off, s, t);
    }
}

#[cube]
#[allow(clippy::too_many_arguments)]
fn mma_plain<A: Float, B: Float>(
    a: &SharedMemory<A>,
    a_off: usize,
    b: &SharedMemory<B>,
    b_off: usize,
    out: &mut SharedMemory<f32>,
    out_off: usize,
    #[comptime] s: MmaShape,
    #[comptime] t: TileConfig,
) {
    let threads = comptime!(t.threads());
    let entries = comptime!(s.m * s.n);
    let per = comptime!(entries.div_ceil(threads));
    let unit = UNIT_POS as usize;
    #[unroll]
    for r in 0..per {
        let e = unit + r * threads;
        if e < entries {
            let i = e / s.n;
            let j = e % s.n;
            let mut acc = 0.0f32;
            if comptime!(s.accumulate) {
                acc = out[out_off + i * s.ldo + j];
            }
            #[unroll(t.unroll)]
            for l in 0..s.k {
                let mut ai = a_off + i * s.lda + l;
                if comptime!(s.a_col) {
                    ai = a_off + i + l * s.lda;
                }
                let mut bi = b_off + l * s.ldb + j;
                if comptime!(s.b_col) {
                    bi = b_off + l + j * s.ldb;
                }
                acc += f32::cast_from(a[ai]) * f32::cast_from(b[bi]);
            }
            out[out_off + i * s.ldo + j] = acc;
        }
    }
}

#[cube]
#[allow(clippy::too_many_arguments)]
fn mma_cmma<A: Float, B: Float>(
    a: &SharedMemory<A>,
    a_off: usize,
    b: &SharedMemory<B>,
    b_off: usize,
    out: &mut SharedMemory<f32>,
    out_off: usize,
    #[comptime] s: MmaShape,
    #[comptime] t: TileConfig,
) {
    let tn = comptime!(s.n / FRAG);
    let tiles = comptime!((s.m / FRAG) * tn);
    let per = comptime!(tiles.div_ceil(t.planes));
    let a_layout = comptime!(if s.a_col {
        cmma::MatrixLayout::ColMajor
    } else {
        cmma::MatrixLayout::RowMajor
    });
    let b_layout = comptime!(if s.b_col {
        cmma::MatrixLayout::ColMajor
    } else {
        cmma::MatrixLayout::RowMajor
    });
    // One fragment spans 15 leading-dimension steps plus 16 entries.
    let a_span = comptime!((FRAG - 1) * s.lda + FRAG);
    let b_span = comptime!((FRAG - 1) * s.ldb + FRAG);
    let o_span = comptime!((FRAG - 1) * s.ldo + FRAG);
    let plane = UNIT_POS_Y as usize;
    #[unroll]
    for r in 0..per {
        // Uniform over the plane: every lane of a warp takes the same branch.
        let tile = plane + r * t.planes;
        if tile < tiles {
            let ti = tile / tn;
            let tj = tile % tn;
            let o = out_off + ti * FRAG * s.ldo + tj * FRAG;
            let acc = unsafe {
                cmma::Matrix::<f32>::uninitialized(
                    cmma::MatrixIdent::Accumulator,
                    FRAG,
                    FRAG,
                    FRAG,
                    cmma::MatrixLayout::Undefined,
                )
            };
            if comptime!(s.accumulate) {
                cmma::load_with_layout(
                    &acc,
                    &out.slice(o, o + o_span),
                    s.ldo as u32,
                    cmma::MatrixLayout::RowMajor,
                );
            } else {
                cmma::fill(&acc, 0.0f32);
            }
            #[unroll]
            for l in 0..comptime!(s.k / FRAG) {
                // Fragment (ti, l) of A and (l, tj) of B, in their storage orders.
                let mut ao = a_off + ti * FRAG * s.lda + l * FRAG;
                if comptime!(s.a_col) {
                    ao = a_off + ti * FRAG + l * FRAG * s.lda;
                }
                let mut bo = b_off + l * FRAG * s.ldb + tj * FRAG;
                if comptime!(s.b_col) {
                    bo = b_off + l * FRAG + tj * FRAG * s.ldb;
                }
                let fa = cmma::Matrix::<A>::from_slice(
                    cmma::MatrixIdent::A,
                    FRAG,
                    FRAG,
                    FRAG,
                    a_layout,
                    &a.slice(ao, ao + a_span),
                    s.lda as u32,
                );
                let fb = cmma::Matrix::<B>::from_slice(
                    cmma::MatrixIdent::B,
                    FRAG,
                    FRAG,
                    FRAG,
                    b_layout,
                    &b.slice(bo, bo + b_span),
                    s.ldb as u32,
                );
                cmma::execute::<A, B, f32, f32>(&fa, &fb, &acc, &acc);
            }
            cmma::store(
                &mut out.slice_mut(o, o + o_span),
                &acc,
                s.ldo as u32,
                cmma::MatrixLayout::RowMajor,
            );
        }
    }
}
