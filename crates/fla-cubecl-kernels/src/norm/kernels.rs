//! The norm's kernels. A cube holds `rows` rows side by side (units `(x, y)`: entry lane `x`
//! of the row in lane `y`); each unit holds its row's entries `x, x + units, ...` in registers,
//! and the row sums go through shared memory, one segment per row (no plane operations:
//! lavapipe has none). Several rows per cube share each barrier of the sums: with one row of
//! 128 entries per cube the forward was bound by its barriers (measured on an H200: 6.5x FLA's
//! time at `[8, 4096, 16, 128]`).

use cubecl::prelude::*;

use crate::swiglu::sigmoid_lanes;

/// Compile-time shape of a norm launch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NormLayout {
    /// The normalised axis `D`, in entries.
    pub dim: usize,
    /// Entries per vector (`D` is a multiple): a unit loads `vector` neighbouring entries at
    /// once, 16 bytes where the device and `D` allow.
    pub vector: usize,
    /// Units per row, a power of two.
    pub units: usize,
    /// Rows per cube (the cube is `units × rows` units).
    pub rows: usize,
    pub gated: bool,
}

impl NormLayout {
    /// Vectors per row.
    pub fn width(&self) -> usize {
        self.dim / self.vector
    }

    /// Vectors of a row each unit holds.
    pub fn per_unit(&self) -> usize {
        self.width().div_ceil(self.units)
    }
}

/// The sum of `count` values (a power of two) held by units `k = 0..count`, unit `k`'s at
/// `scratch[at + k · step]`, returned to each of them. Every unit of the cube must call this (it
/// synchronises), each with its own `at`, `k` and `value`; groups with different `at` sum side
/// by side. No unit may write its entry before every unit has read the last sum's total: the
/// closing barrier sees to that.
#[cube]
fn tree_sum(
    value: f32,
    scratch: &mut SharedMemory<f32>,
    at: usize,
    k: usize,
    step: usize,
    #[comptime] count: usize,
) -> f32 {
    scratch[at + k * step] = value;
    sync_cube();
    // A run-time variable: it changes in the (unrolled) loop.
    let mut stride = comptime!(count / 2).runtime();
    #[unroll]
    for _ in 0..comptime!(count.trailing_zeros() as usize) {
        if k < stride {
            scratch[at + k * step] += scratch[at + (k + stride) * step];
        }
        sync_cube();
        stride /= 2;
    }
    let total = scratch[at];
    sync_cube();
    total
}

/// The sum of `value` over the `units` units (a power of two) of this unit's row of the cube
/// (`UNIT_POS_Y`), returned to each of them. `scratch` holds one entry per unit of the cube;
/// every unit of the cube must call this (it synchronises). Also the AdamW step's gradient norm
/// (one row).
#[cube]
pub(crate) fn cube_sum(
    value: f32,
    scratch: &mut SharedMemory<f32>,
    #[comptime] units: usize,
) -> f32 {
    let at = UNIT_POS_Y as usize * units;
    tree_sum(value, scratch, at, UNIT_POS_X as usize, 1, units)
}

/// The sum of a vector's `l.vector` entries.
#[cube]
fn lane_sum<N: Size>(v: Vector<f32, N>, #[comptime] l: NormLayout) -> f32 {
    let mut total = 0.0f32;
    #[unroll]
    for j in 0..comptime!(l.vector) {
        total += v[j];
    }
    total
}

/// Forward. Cubes: one per `rows` rows over a 2-D grid. Buffers in vectors of `N` entries.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn rms_norm_fwd_kernel<F: Float, N: Size>(
    x: &Array<Vector<F, N>>,
    w: &Array<Vector<F, N>>,
    g: &Array<Vector<F, N>>,
    y: &mut Array<Vector<F, N>>,
    rstd: &mut Array<f32>,
    rows: u32,
    eps: f32,
    inv_dim: f32,
    #[comptime] l: NormLayout,
    #[define(F)] _dtype: StorageType,
) {
    let mut scratch = SharedMemory::<f32>::new(comptime!(l.units * l.rows));
    let row =
        (CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) as usize * comptime!(l.rows) + UNIT_POS_Y as usize;
    // Not uniform over the cube (its last rows may lie past the end): a row lane past the end
    // computes on zeros and writes nothing, but reaches every barrier.
    let live = row < rows as usize;
    let u = UNIT_POS_X as usize;
    let base = row * comptime!(l.width());
    let zero = Vector::<f32, N>::new(0.0f32);
    let mut xs = Array::<Vector<f32, N>>::new(comptime!(l.per_unit()));
    // The weight and the gate's swish, loaded with `x`, before the row sum: their loads then
    // overlap the sum's barriers instead of waiting after them.
    let mut ws = Array::<Vector<f32, N>>::new(comptime!(l.per_unit()));
    let mut gs = Array::<Vector<f32, N>>::new(comptime!(if l.gated { l.per_unit() } else { 1 }));
    let mut squares = zero;
    #[unroll]
    for i in 0..comptime!(l.per_unit()) {
        let col = i * comptime!(l.units) + u;
        let mut v = zero;
        let mut gv = zero;
        let mut wv = zero;
        if live && col < comptime!(l.width()) {
            v = Vector::<f32, N>::cast_from(x[base + col]);
            wv = Vector::<f32, N>::cast_from(w[col]);
            if comptime!(l.gated) {
                gv = Vector::<f32, N>::cast_from(g[base + col]);
            }
        }
        xs[i] = v;
        ws[i] = wv;
        if comptime!(l.gated) {
            gs[i] = gv * sigmoid_lanes(gv);
        }
        squares += v * v;
    }
    let total = cube_sum(lane_sum(squares, l), &mut scratch, l.units);
    let r = 1.0f32 / f32::sqrt(total * inv_dim + eps);
    if live {
        if u == 0 {
            rstd[row] = r;
        }
        let rv = Vector::<f32, N>::new(r);
        #[unroll]
        for i in 0..comptime!(l.per_unit()) {
            let col = i * comptime!(l.units) + u;
            if col < comptime!(l.width()) {
                let mut out = xs[i] * rv * ws[i];
                if comptime!(l.gated) {
                    out *= gs[i];
                }
                y[base + col] = Vector::<F, N>::cast_from(out);
            }
        }
    }
}

/// Backward: `dx`, `dg`, and per cube its rows' share of `dw` (`part: [blocks, D]`, `f32`
/// entries, summed by the launcher). Row lane `y` of cube `b` takes rows `b·rows + y`, then
/// strides of `blocks · rows`. Inputs and gradients in vectors of `N` entries.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn rms_norm_bwd_kernel<F: Float, N: Size>(
    x: &Array<Vector<F, N>>,
    w: &Array<Vector<F, N>>,
    g: &Array<Vector<F, N>>,
    rstd: &Array<f32>,
    dy: &Array<Vector<F, N>>,
    dx: &mut Array<Vector<F, N>>,
    dg: &mut Array<Vector<F, N>>,
    part: &mut Array<f32>,
    rows: u32,
    blocks: u32,
    inv_dim: f32,
    #[comptime] l: NormLayout,
    #[define(F)] _dtype: StorageType,
) {
    let mut scratch = SharedMemory::<f32>::new(comptime!(l.units * l.rows));
    let block = (CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) as usize;
    let per = comptime!(l.per_unit());
    let width = comptime!(l.width());
    let u = UNIT_POS_X as usize;
    let lane = UNIT_POS_Y as usize;
    let zero = Vector::<f32, N>::new(0.0f32);
    let one = Vector::<f32, N>::new(1.0f32);
    // Uniform over the cube: a cube past the last block skips its barriers as a whole.
    if block < blocks as usize {
        let mut ws = Array::<Vector<f32, N>>::new(per);
        let mut dw = Array::<Vector<f32, N>>::new(per);
        #[unroll]
        for i in 0..per {
            let col = i * comptime!(l.units) + u;
            let mut v = zero;
            if col < width {
                v = Vector::<f32, N>::cast_from(w[col]);
            }
            ws[i] = v;
            dw[i] = zero;
        }
        let mut xh = Array::<Vector<f32, N>>::new(per);
        let mut dxh = Array::<Vector<f32, N>>::new(per);
        let stride = blocks as usize * comptime!(l.rows);
        // The cube's first row sets the trip count, the same for every unit, so the sums'
        // barriers line up; a lane whose row lies past the end computes on zeros.
        let mut first = block * comptime!(l.rows);
        while first < rows as usize {
            let row = first + lane;
            let live = row < rows as usize;
            let base = row * width;
            let mut r = 0.0f32;
            if live {
                r = rstd[row];
            }
            let rv = Vector::<f32, N>::new(r);
            let mut dot = zero;
            #[unroll]
            for i in 0..per {
                let col = i * comptime!(l.units) + u;
                let mut xv = zero;
                let mut dn = zero;
                if live && col < width {
                    xv = Vector::<f32, N>::cast_from(x[base + col]) * rv;
                    dn = Vector::<f32, N>::cast_from(dy[base + col]);
                    if comptime!(l.gated) {
                        let gv = Vector::<f32, N>::cast_from(g[base + col]);
                        let s = sigmoid_lanes(gv);
                        let n = xv * ws[i];
                        dg[base + col] =
                            Vector::<F, N>::cast_from(dn * n * s * (one + gv * (one - s)));
                        dn *= gv * s;
                    }
                }
                dw[i] += dn * xv;
                xh[i] = xv;
                dxh[i] = dn * ws[i];
                dot += dxh[i] * xv;
            }
            let mean = cube_sum(lane_sum(dot, l), &mut scratch, l.units) * inv_dim;
            if live {
                let mv = Vector::<f32, N>::new(mean);
                #[unroll]
                for i in 0..per {
                    let col = i * comptime!(l.units) + u;
                    if col < width {
                        dx[base + col] = Vector::<F, N>::cast_from(rv * (dxh[i] - xh[i] * mv));
                    }
                }
            }
            first += stride;
        }
        // The row lanes' shares summed in shared memory, one entry of each unit at a time, so
        // the cube writes one row of partials (the column sum after it then adds `blocks` rows,
        // not `blocks · rows`: a lane of it adds its rows one dependent load after another).
        #[unroll]
        for i in 0..per {
            let col = i * comptime!(l.units) + u;
            let share = dw[i];
            #[unroll]
            for j in 0..comptime!(l.vector) {
                let total = tree_sum(share[j], &mut scratch, u, lane, comptime!(l.units), l.rows);
                if lane == 0 && col < width {
                    part[block * comptime!(l.dim) + col * comptime!(l.vector) + j] = total;
                }
            }
        }
    }
}

/// `out[c] = Σ_r part[r, c]` over `part: [rows, cols]` (`f32`), written in `F`. Cubes: one per
/// 32 columns; units `(column in the tile, lane)`, `lanes` a power of two, each lane adding rows
/// `lane, lane + lanes, ...` before the lanes are summed in shared memory.
#[cube(launch_unchecked)]
pub fn column_sum_kernel<F: Float>(
    part: &Array<f32>,
    out: &mut Array<F>,
    rows: u32,
    cols: u32,
    #[comptime] lanes: usize,
    #[define(F)] _dtype: StorageType,
) {
    let width = CUBE_DIM_X as usize;
    let x = UNIT_POS_X as usize;
    let col = CUBE_POS_X as usize * width + x;
    let lane = UNIT_POS_Y as usize;
    let mut scratch = SharedMemory::<f32>::new(comptime!(lanes * 32));
    let mut acc = 0.0f32;
    if col < cols as usize {
        let mut r = lane;
        while r < rows as usize {
            acc += part[r * cols as usize + col];
            r += lanes;
        }
    }
    // Every unit reaches the barriers below, whatever its column and row count.
    let total = tree_sum(acc, &mut scratch, x, lane, width, lanes);
    if lane == 0 && col < cols as usize {
        out[col] = F::cast_from(total);
    }
}
