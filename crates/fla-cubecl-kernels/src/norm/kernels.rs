//! The norm's kernels. A cube holds `rows` rows side by side (units `(x, y)`: entry lane `x`
//! of the row in lane `y`); each unit holds its row's entries `x, x + units, ...` in registers,
//! and the row sums go through shared memory, one segment per row (no plane operations:
//! lavapipe has none). Several rows per cube share each barrier of the sums: with one row of
//! 128 entries per cube the forward was bound by its barriers (measured on an H200: 6.5x FLA's
//! time at `[8, 4096, 16, 128]`).

use cubecl::prelude::*;

use crate::swiglu::sigmoid;

/// Compile-time shape of a norm launch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NormLayout {
    /// The normalised axis `D`.
    pub dim: usize,
    /// Units per row, a power of two.
    pub units: usize,
    /// Rows per cube (the cube is `units × rows` units).
    pub rows: usize,
    pub gated: bool,
}

impl NormLayout {
    /// Entries of a row each unit holds.
    pub fn per_unit(&self) -> usize {
        self.dim.div_ceil(self.units)
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

/// Forward. Cubes: one per `rows` rows over a 2-D grid.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn rms_norm_fwd_kernel<F: Float>(
    x: &Array<F>,
    w: &Array<F>,
    g: &Array<F>,
    y: &mut Array<F>,
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
    let base = row * comptime!(l.dim);
    let mut xs = Array::<f32>::new(comptime!(l.per_unit()));
    let mut squares = 0.0f32;
    #[unroll]
    for i in 0..comptime!(l.per_unit()) {
        let col = i * comptime!(l.units) + u;
        let mut v = 0.0f32;
        if live && col < comptime!(l.dim) {
            v = f32::cast_from(x[base + col]);
        }
        xs[i] = v;
        squares += v * v;
    }
    let r = 1.0f32 / f32::sqrt(cube_sum(squares, &mut scratch, l.units) * inv_dim + eps);
    if live {
        if u == 0 {
            rstd[row] = r;
        }
        #[unroll]
        for i in 0..comptime!(l.per_unit()) {
            let col = i * comptime!(l.units) + u;
            if col < comptime!(l.dim) {
                let mut out = xs[i] * r * f32::cast_from(w[col]);
                if comptime!(l.gated) {
                    let gv = f32::cast_from(g[base + col]);
                    out *= gv * sigmoid(gv);
                }
                y[base + col] = F::cast_from(out);
            }
        }
    }
}

/// Backward: `dx`, `dg`, and per cube its rows' share of `dw` (`part: [blocks, D]`, summed by
/// the launcher). Row lane `y` of cube `b` takes rows `b·rows + y`, then strides of
/// `blocks · rows`.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn rms_norm_bwd_kernel<F: Float>(
    x: &Array<F>,
    w: &Array<F>,
    g: &Array<F>,
    rstd: &Array<f32>,
    dy: &Array<F>,
    dx: &mut Array<F>,
    dg: &mut Array<F>,
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
    let u = UNIT_POS_X as usize;
    let lane = UNIT_POS_Y as usize;
    // Uniform over the cube: a cube past the last block skips its barriers as a whole.
    if block < blocks as usize {
        let mut ws = Array::<f32>::new(per);
        let mut dw = Array::<f32>::new(per);
        #[unroll]
        for i in 0..per {
            let col = i * comptime!(l.units) + u;
            let mut v = 0.0f32;
            if col < comptime!(l.dim) {
                v = f32::cast_from(w[col]);
            }
            ws[i] = v;
            dw[i] = 0.0f32;
        }
        let mut xh = Array::<f32>::new(per);
        let mut dxh = Array::<f32>::new(per);
        let stride = blocks as usize * comptime!(l.rows);
        // The cube's first row sets the trip count, the same for every unit, so the sums'
        // barriers line up; a lane whose row lies past the end computes on zeros.
        let mut first = block * comptime!(l.rows);
        while first < rows as usize {
            let row = first + lane;
            let live = row < rows as usize;
            let base = row * comptime!(l.dim);
            let mut r = 0.0f32;
            if live {
                r = rstd[row];
            }
            let mut dot = 0.0f32;
            #[unroll]
            for i in 0..per {
                let col = i * comptime!(l.units) + u;
                let mut xv = 0.0f32;
                let mut dn = 0.0f32;
                if live && col < comptime!(l.dim) {
                    xv = f32::cast_from(x[base + col]) * r;
                    dn = f32::cast_from(dy[base + col]);
                    if comptime!(l.gated) {
                        let gv = f32::cast_from(g[base + col]);
                        let s = sigmoid(gv);
                        let n = xv * ws[i];
                        dg[base + col] = F::cast_from(dn * n * s * (1.0f32 + gv * (1.0f32 - s)));
                        dn *= gv * s;
                    }
                }
                dw[i] += dn * xv;
                xh[i] = xv;
                dxh[i] = dn * ws[i];
                dot += dxh[i] * xv;
            }
            let mean = cube_sum(dot, &mut scratch, l.units) * inv_dim;
            if live {
                #[unroll]
                for i in 0..per {
                    let col = i * comptime!(l.units) + u;
                    if col < comptime!(l.dim) {
                        dx[base + col] = F::cast_from(r * (dxh[i] - xh[i] * mean));
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
            let total = tree_sum(dw[i], &mut scratch, u, lane, comptime!(l.units), l.rows);
            let col = i * comptime!(l.units) + u;
            if lane == 0 && col < comptime!(l.dim) {
                part[block * comptime!(l.dim) + col] = total;
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
