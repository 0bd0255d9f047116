//! The norm's kernels: one cube per row (forward) or per block of rows (backward), each unit
//! holding the row's entries `u, u + units, ...` in registers, the row's sums taken across the
//! cube in shared memory (no plane operations: lavapipe has none).

use cubecl::prelude::*;

use crate::swiglu::sigmoid;

/// Compile-time shape of a norm launch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NormLayout {
    /// The normalised axis `D`.
    pub dim: usize,
    /// Units per cube, a power of two.
    pub units: usize,
    pub gated: bool,
}

impl NormLayout {
    /// Entries of a row each unit holds.
    pub fn per_unit(&self) -> usize {
        self.dim.div_ceil(self.units)
    }

    /// Halvings of the cube-wide sum.
    pub fn levels(&self) -> usize {
        self.units.trailing_zeros() as usize
    }
}

/// The sum of `value` over the cube's units, returned to every unit. `scratch` holds one entry
/// per unit; every unit of the cube must call this (it synchronises).
#[cube]
fn cube_sum(value: f32, scratch: &mut SharedMemory<f32>, #[comptime] l: NormLayout) -> f32 {
    let u = UNIT_POS as usize;
    scratch[u] = value;
    sync_cube();
    // A run-time variable: it changes in the (unrolled) loop.
    let mut stride = comptime!(l.units / 2).runtime();
    #[unroll]
    for _ in 0..comptime!(l.levels()) {
        if u < stride {
            scratch[u] += scratch[u + stride];
        }
        sync_cube();
        stride /= 2;
    }
    let total = scratch[0];
    // No unit may overwrite its entry for the next sum before every unit has read this one.
    sync_cube();
    total
}

/// Forward. Cubes: one per row over a 2-D grid; `units` units.
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
    let mut scratch = SharedMemory::<f32>::new(comptime!(l.units));
    let row = (CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) as usize;
    // Uniform over the cube: a cube past the last row skips its barriers as a whole.
    if row < rows as usize {
        let u = UNIT_POS as usize;
        let base = row * comptime!(l.dim);
        let mut xs = Array::<f32>::new(comptime!(l.per_unit()));
        let mut squares = 0.0f32;
        #[unroll]
        for i in 0..comptime!(l.per_unit()) {
            let col = i * comptime!(l.units) + u;
            let mut v = 0.0f32;
            if col < comptime!(l.dim) {
                v = f32::cast_from(x[base + col]);
            }
            xs[i] = v;
            squares += v * v;
        }
        let r = 1.0f32 / f32::sqrt(cube_sum(squares, &mut scratch, l) * inv_dim + eps);
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
/// the launcher). Cube `b` takes rows `b, b + blocks, ...`.
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
    let mut scratch = SharedMemory::<f32>::new(comptime!(l.units));
    let block = (CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) as usize;
    let per = comptime!(l.per_unit());
    let u = UNIT_POS as usize;
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
        let mut row = block;
        // The same number of rows for every unit of the cube, so the sums' barriers line up.
        while row < rows as usize {
            let base = row * comptime!(l.dim);
            let r = rstd[row];
            let mut dot = 0.0f32;
            #[unroll]
            for i in 0..per {
                let col = i * comptime!(l.units) + u;
                let mut xv = 0.0f32;
                let mut dn = 0.0f32;
                if col < comptime!(l.dim) {
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
            let mean = cube_sum(dot, &mut scratch, l) * inv_dim;
            #[unroll]
            for i in 0..per {
                let col = i * comptime!(l.units) + u;
                if col < comptime!(l.dim) {
                    dx[base + col] = F::cast_from(r * (dxh[i] - xh[i] * mean));
                }
            }
            row += blocks as usize;
        }
        #[unroll]
        for i in 0..per {
            let col = i * comptime!(l.units) + u;
            if col < comptime!(l.dim) {
                part[block * comptime!(l.dim) + col] = dw[i];
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
    scratch[lane * width + x] = acc;
    sync_cube();
    let mut stride = comptime!(lanes / 2).runtime();
    #[unroll]
    for _ in 0..comptime!(lanes.trailing_zeros() as usize) {
        if lane < stride {
            scratch[lane * width + x] += scratch[(lane + stride) * width + x];
        }
        sync_cube();
        stride /= 2;
    }
    if lane == 0 && col < cols as usize {
        out[col] = F::cast_from(scratch[x]);
    }
}
