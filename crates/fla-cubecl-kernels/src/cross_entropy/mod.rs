//! Cross-entropy over a vocabulary, fused (FLA's `FusedCrossEntropyLoss`, the language-model loss).
//!
//! Per row `x ∈ R^V` of logits with target `t`: `lse = log Σ_v exp(x_v)`, `loss = lse − x_t`, all in
//! `f32` whatever the logits' dtype; `lse` is kept for the backward,
//! `∂x_v = ∂loss · (exp(x_v − lse) − [v = t])`. A negative target marks a row to ignore (PyTorch's
//! `ignore_index = -100` convention): its loss and its gradient are 0. A target at or past `V`
//! cannot be reported from inside a kernel, and reading past the row would be a silent wrong
//! answer, so its loss and gradient are NaN. Logits of −∞ (masked entries) weigh nothing; a row
//! of nothing but −∞, or with a +∞ or NaN logit, has a NaN or infinite loss, as the f64 reference
//! has.
//!
//! The forward reads each row once: every unit keeps a running maximum and the sum of exponentials
//! scaled to it over its share of the row (entries `x, x + units, ...`: neighbouring units read
//! neighbouring entries), then the units' pairs are merged in shared memory. Rows shorter than a
//! cube share one, as the norm's do.
//!
//! Why fused: through Burn's tensor ops the loss is a cast of the logits to `f32`, a log-softmax of
//! six passes and a gather, and autodiff keeps the `f32` log-probabilities (8 bytes per logit in
//! all at a 32,000-entry vocabulary: 4.2 GB for 16,384 tokens); here the forward reads the logits
//! once, keeps 8 bytes per row, and the backward reads them once more and writes the gradient.

pub mod naive;

use cubecl::prelude::*;
use cubecl::server::Handle;

use crate::gated::{array, check_grid, cubes_2d};
use crate::norm::row_lanes;
use crate::problem::{self, fits};
use crate::{FloatDType, KernelError};

/// One call: `rows` rows of `vocab` logits in `dtype`, one `i32` target per row.
#[derive(Debug, Clone, PartialEq)]
pub struct CrossEntropyProblem {
    pub rows: usize,
    pub vocab: usize,
    pub dtype: FloatDType,
}

impl CrossEntropyProblem {
    pub fn validate(&self) -> Result<(), KernelError> {
        if self.rows == 0 || self.vocab == 0 {
            return Err(KernelError::InvalidProblem(format!(
                "zero-length input to cross-entropy: {} rows of {} logits",
                self.rows, self.vocab
            )));
        }
        if self.vocab > i32::MAX as usize {
            return Err(KernelError::InvalidProblem(format!(
                "a vocabulary of {} entries is past the kernels' i32 targets",
                self.vocab
            )));
        }
        problem::addressable(self.rows * self.vocab, "logits")
    }

    pub fn len(&self) -> usize {
        self.rows * self.vocab
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Compile-time shape of a launch: `units` lanes per row (a power of two), `rows` rows per cube.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CrossEntropyLayout {
    pub units: usize,
    pub rows: usize,
}

/// The lowest finite `f32`: the running maximum's start, so that no `exp(−∞ − (−∞))` appears.
/// (A literal where used: cube code takes no `const`.)
#[cube]
fn lowest() -> f32 {
    f32::new(-3.4028235e38)
}

/// Index of this unit's row, and whether it lies before the end.
#[cube]
fn this_row(rows: u32, #[comptime] l: CrossEntropyLayout) -> (usize, bool) {
    let row =
        (CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) as usize * comptime!(l.rows) + UNIT_POS_Y as usize;
    (row, row < rows as usize)
}

/// Forward: `loss` and `lse` per row.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn cross_entropy_fwd_kernel<F: Float>(
    logits: &Array<F>,
    targets: &Array<i32>,
    loss: &mut Array<f32>,
    lse: &mut Array<f32>,
    rows: u32,
    vocab: u32,
    nan: f32,
    #[comptime] l: CrossEntropyLayout,
    #[define(F)] _dtype: StorageType,
) {
    let mut maxima = SharedMemory::<f32>::new(comptime!(l.units * l.rows));
    let mut sums = SharedMemory::<f32>::new(comptime!(l.units * l.rows));
    let (row, live) = this_row(rows, l);
    let u = UNIT_POS_X as usize;
    let base = row * vocab as usize;
    // Not uniform over the cube: a row lane past the end keeps the empty sum and writes nothing,
    // but reaches every barrier.
    let mut m = lowest();
    let mut s = 0.0f32;
    if live {
        let mut col = u;
        // Whole groups of GROUP entries first (8, a literal: cube code takes no `const`): their
        // loads are in flight together, and the maximum moves, with one rescale of the sum, once
        // per group. One entry at a time, each load waited for in turn, the forward took 1.7x
        // FLA's time on an H100.
        while col + comptime!(7 * l.units) < vocab as usize {
            let mut xs = Array::<f32>::new(8usize);
            #[unroll]
            for j in 0..8usize {
                xs[j] = f32::cast_from(logits[base + col + j * comptime!(l.units)]);
            }
            let mut mx = m;
            #[unroll]
            for j in 0..8usize {
                mx = max(mx, xs[j]);
            }
            s *= f32::exp(m - mx);
            m = mx;
            #[unroll]
            for j in 0..8usize {
                s += f32::exp(xs[j] - m);
            }
            col += comptime!(8 * l.units);
        }
        while col < vocab as usize {
            let x = f32::cast_from(logits[base + col]);
            if x > m {
                s = s * f32::exp(m - x) + 1.0f32;
                m = x;
            } else {
                s += f32::exp(x - m);
            }
            col += comptime!(l.units);
        }
    }
    // Merges the lanes' (maximum, sum) pairs by halving.
    let at = UNIT_POS_Y as usize * comptime!(l.units);
    maxima[at + u] = m;
    sums[at + u] = s;
    sync_cube();
    let mut stride = comptime!(l.units / 2).runtime();
    #[unroll]
    for _ in 0..comptime!(l.units.trailing_zeros() as usize) {
        if u < stride {
            let (m1, m2) = (maxima[at + u], maxima[at + u + stride]);
            let mx = max(m1, m2);
            sums[at + u] =
                sums[at + u] * f32::exp(m1 - mx) + sums[at + u + stride] * f32::exp(m2 - mx);
            maxima[at + u] = mx;
        }
        sync_cube();
        stride /= 2;
    }
    if live && u == 0 {
        let l_row = maxima[at] + sums[at].ln();
        let t = targets[row];
        let mut out = 0.0f32;
        if t >= 0 {
            if t < vocab as i32 {
                out = l_row - f32::cast_from(logits[base + t as usize]);
            } else {
                out = nan;
            }
        }
        loss[row] = out;
        lse[row] = l_row;
    }
}

/// One logit's gradient, `d · (softmax − onehot)`: `x` the logit at column `col`, `lse` its row's
/// log-sum-exp, `t` the row's target.
#[cube]
fn entry_grad(x: f32, lse: f32, col: usize, t: i32, d: f32) -> f32 {
    let mut p = f32::exp(x - lse);
    if col as i32 == t {
        p -= 1.0f32;
    }
    d * p
}

/// Backward: `dlogits` from `lse` and `dloss` per row.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn cross_entropy_bwd_kernel<F: Float>(
    logits: &Array<F>,
    targets: &Array<i32>,
    lse: &Array<f32>,
    dloss: &Array<f32>,
    dlogits: &mut Array<F>,
    rows: u32,
    vocab: u32,
    nan: f32,
    #[comptime] l: CrossEntropyLayout,
    #[define(F)] _dtype: StorageType,
) {
    let (row, live) = this_row(rows, l);
    if live {
        let base = row * vocab as usize;
        let t = targets[row];
        let l_row = lse[row];
        let mut col = UNIT_POS_X as usize;
        if t < 0 {
            // An ignored row: exactly 0 whatever its logits (0 · NaN would not be).
            while col < vocab as usize {
                dlogits[base + col] = F::cast_from(0.0f32);
                col += comptime!(l.units);
            }
        } else {
            let mut d = dloss[row];
            if t >= vocab as i32 {
                d = nan;
            }
            // Groups of 8 loads in flight together, as in the forward.
            while col + comptime!(7 * l.units) < vocab as usize {
                let mut xs = Array::<f32>::new(8usize);
                #[unroll]
                for j in 0..8usize {
                    xs[j] = f32::cast_from(logits[base + col + j * comptime!(l.units)]);
                }
                #[unroll]
                for j in 0..8usize {
                    let at = col + j * comptime!(l.units);
                    dlogits[base + at] = F::cast_from(entry_grad(xs[j], l_row, at, t, d));
                }
                col += comptime!(8 * l.units);
            }
            while col < vocab as usize {
                let x = f32::cast_from(logits[base + col]);
                dlogits[base + col] = F::cast_from(entry_grad(x, l_row, col, t, d));
                col += comptime!(l.units);
            }
        }
    }
}

/// At most 256 lanes a row (one cube): a lane walks its share of a long row.
fn layout<R: Runtime>(client: &ComputeClient<R>, p: &CrossEntropyProblem) -> CrossEntropyLayout {
    let (units, rows) = row_lanes(client, p.vocab, 256);
    CrossEntropyLayout { units, rows }
}

fn checked<R: Runtime>(
    client: &ComputeClient<R>,
    p: &CrossEntropyProblem,
) -> Result<(CrossEntropyLayout, CubeCount), KernelError> {
    p.validate()?;
    p.dtype.check_supported(client)?;
    let l = layout(client, p);
    let (x, y) = cubes_2d(p.rows.div_ceil(l.rows));
    check_grid(client, (x, y, 1), "cross-entropy")?;
    Ok((l, CubeCount::Static(x as u32, y as u32, 1)))
}

/// The forward. Buffers: `logits` (`rows × vocab`, the problem's dtype), `targets` (`rows`,
/// `i32`), and the outputs `loss` and `lse` (`rows`, `f32`).
pub fn cross_entropy_forward<R: Runtime>(
    client: &ComputeClient<R>,
    p: &CrossEntropyProblem,
    [logits, targets]: [&Handle; 2],
    [loss, lse]: [&Handle; 2],
) -> Result<(), KernelError> {
    let (l, cubes) = checked(client, p)?;
    fits("logits", logits, p.len(), p.dtype.size())?;
    for (name, h) in [("targets", targets), ("loss", loss), ("lse", lse)] {
        fits(name, h, p.rows, 4)?;
    }
    // Every access is guarded by the kernel's own bounds (rows, columns, the target's range).
    unsafe {
        cross_entropy_fwd_kernel::launch_unchecked::<R>(
            client,
            cubes,
            CubeDim::new_2d(l.units as u32, l.rows as u32),
            array(logits, p.len()),
            array(targets, p.rows),
            array(loss, p.rows),
            array(lse, p.rows),
            p.rows as u32,
            p.vocab as u32,
            // An argument: CubeCL's CUDA code writes a NaN literal as `NaN`, which nvcc rejects.
            f32::NAN,
            l,
            p.dtype.storage(),
        )
    };
    Ok(())
}

/// The backward: `dlogits` (`rows × vocab`, the problem's dtype) from the forward's `lse` and the
/// loss gradient `dloss` (`rows`, `f32`).
pub fn cross_entropy_backward<R: Runtime>(
    client: &ComputeClient<R>,
    p: &CrossEntropyProblem,
    [logits, targets, lse, dloss]: [&Handle; 4],
    dlogits: &Handle,
) -> Result<(), KernelError> {
    let (l, cubes) = checked(client, p)?;
    fits("logits", logits, p.len(), p.dtype.size())?;
    fits("dlogits", dlogits, p.len(), p.dtype.size())?;
    for (name, h) in [("targets", targets), ("lse", lse), ("dloss", dloss)] {
        fits(name, h, p.rows, 4)?;
    }
    unsafe {
        cross_entropy_bwd_kernel::launch_unchecked::<R>(
            client,
            cubes,
            CubeDim::new_2d(l.units as u32, l.rows as u32),
            array(logits, p.len()),
            array(targets, p.rows),
            array(lse, p.rows),
            array(dloss, p.rows),
            array(dlogits, p.len()),
            p.rows as u32,
            p.vocab as u32,
            // An argument: CubeCL's CUDA code writes a NaN literal as `NaN`, which nvcc rejects.
            f32::NAN,
            l,
            p.dtype.storage(),
        )
    };
    Ok(())
}
