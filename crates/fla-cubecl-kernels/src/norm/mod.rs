//! RMSNorm over the last axis, fused, optionally followed by a swish gate (FLA's `RMSNorm` and
//! `FusedRMSNormGated` with `activation="swish"`, the norm before the gate).
//!
//! Per row `x ∈ R^D` with weight `w ∈ R^D`: `r = 1 / sqrt(mean(x²) + ε)`, `x̂ = r · x`,
//! `n = x̂ ∘ w`, and `y = n` or, gated, `y = n ∘ swish(g)` with `swish(g) = g · σ(g)`. All of it
//! in `f32` whatever the inputs' dtype; `r` is kept (`f32`) for the backward:
//! - `∂n = ∂y` or `∂y ∘ swish(g)`, and `∂g = ∂y ∘ n ∘ σ(g) (1 + g (1 − σ(g)))`;
//! - `∂w = Σ_rows ∂n ∘ x̂`;
//! - `∂x = r · (∂x̂ − x̂ · mean(∂x̂ ∘ x̂))` with `∂x̂ = ∂n ∘ w`.
//!
//! The backward's `dw` sums over rows in two steps: each cube of the backward adds its rows'
//! products into one row of partials (each row lane in registers, then across lanes in shared
//! memory), then one cube per 32 columns adds the partials, split over
//! lanes and summed across them in shared memory (a single thread per column adding every
//! partial in turn would be a chain of thousands of dependent loads on a GPU).
//!
//! Why fused: through Burn's tensor ops the forward is eight ops (a cast, the square, the mean,
//! the root, the division, the weight) and its autodiff backward about as many again, each a
//! pass over the activations; here it is one pass forward and one backward (plus a small sum of
//! the weight's per-block partials).

mod kernels;
pub mod naive;

pub(crate) use kernels::cube_sum;
pub use kernels::NormLayout;

use cubecl::prelude::*;
use cubecl::server::Handle;

use crate::gated::{array, check_grid, cubes_2d};
use crate::problem::{self, fits};
use crate::tile::PLANE;
use crate::{FloatDType, KernelError};
use kernels::{column_sum_kernel, rms_norm_bwd_kernel, rms_norm_fwd_kernel};

/// The widest row the kernels take: each unit holds `D / units` entries of a row in registers.
pub const MAX_NORM_DIM: usize = 32768;

/// Entries of a row each unit holds, where the row is long enough to give every unit that many.
const ENTRIES_PER_UNIT: usize = 8;

/// Units a cube aims for, filled with as many rows as fit (short rows share a cube, and each
/// barrier of the row sums, with others).
const CUBE_UNITS: usize = 256;

/// Threads the backward aims to keep busy across its cubes (an H100's or H200's worth: 132 SMs
/// × 2048).
const BACKWARD_THREADS: usize = 1 << 18;

/// The most cubes of the backward, so that summing their `dw` partials (one row per cube)
/// stays short: a lane of the column sum adds its rows one dependent load after another.
const MAX_BLOCKS: usize = 1024;

/// The shape and options of one norm call, shared by the kernels and the naive reference.
#[derive(Debug, Clone, PartialEq)]
pub struct NormProblem {
    /// Rows normalised independently (every axis but the last, flattened).
    pub rows: usize,
    /// The normalised axis `D`.
    pub dim: usize,
    /// `ε`, added to the mean square.
    pub eps: f32,
    /// Whether a swish gate `g` (shaped like `x`) multiplies the normalised rows.
    pub gated: bool,
    pub dtype: FloatDType,
}

impl NormProblem {
    /// Checks sizes and `ε`.
    pub fn validate(&self) -> Result<(), KernelError> {
        let bad = |m: String| Err(KernelError::InvalidProblem(m));
        if self.rows == 0 || self.dim == 0 {
            return bad(format!(
                "zero-length input ({} rows of {} entries)",
                self.rows, self.dim
            ));
        }
        if self.dim > MAX_NORM_DIM {
            return bad(format!(
                "normalised axis of {} entries, more than the fused norm's {MAX_NORM_DIM}",
                self.dim
            ));
        }
        if !(self.eps.is_finite() && self.eps >= 0.0) {
            return bad(format!("eps {} must be finite and not negative", self.eps));
        }
        problem::addressable(problem::elements(&[self.rows, self.dim]), "x")
    }

    /// Elements of `x` (and `y`, `g`).
    pub fn len(&self) -> usize {
        self.rows * self.dim
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Device buffers of a forward call: `x: [rows, D]`, `w: [D]`, `g` (gated only, like `x`) in the
/// problem's dtype; outputs `y` (like `x`) and `rstd: [rows]` (`f32`, what the backward reads).
pub struct NormForwardBuffers<'a> {
    pub x: &'a Handle,
    pub w: &'a Handle,
    pub g: Option<&'a Handle>,
    pub y: &'a Handle,
    pub rstd: &'a Handle,
}

/// Device buffers of a backward call: the forward's inputs, its `rstd`, `dy`, and the
/// gradients, each shaped like its input and written in full (`dg` gated only).
pub struct NormBackwardBuffers<'a> {
    pub x: &'a Handle,
    pub w: &'a Handle,
    pub g: Option<&'a Handle>,
    pub rstd: &'a Handle,
    pub dy: &'a Handle,
    pub dx: &'a Handle,
    pub dw: &'a Handle,
    pub dg: Option<&'a Handle>,
}

/// Lanes per row and rows per cube, for kernels that hold rows side by side in a cube (the norm,
/// the cross-entropy). Lanes: a power of two (the sums halve), enough that each takes at most
/// [`ENTRIES_PER_UNIT`] entries of a `width`-long row where the device allows, at most
/// `max_lanes`, and at least 8 (each row lane then reads runs of 8 neighbouring entries). Rows:
/// as many as fill [`CUBE_UNITS`] units.
pub(crate) fn row_lanes<R: Runtime>(
    client: &ComputeClient<R>,
    width: usize,
    max_lanes: usize,
) -> (usize, usize) {
    let cap = 1usize << max_lanes.min(max_cube_units(client)).ilog2();
    let units = width
        .div_ceil(ENTRIES_PER_UNIT)
        .next_power_of_two()
        .clamp(8.min(cap), cap);
    (units, rows_per_cube(client, units))
}

fn max_cube_units<R: Runtime>(client: &ComputeClient<R>) -> usize {
    (client.properties().hardware.max_units_per_cube as usize).max(1)
}

/// Rows of `units` lanes (a power of two the device's cubes hold) that fill [`CUBE_UNITS`] units.
fn rows_per_cube<R: Runtime>(client: &ComputeClient<R>, units: usize) -> usize {
    let cap = 1usize << max_cube_units(client).ilog2();
    (CUBE_UNITS.min(cap) / units).max(1)
}

/// Up to 1024 lanes a row: each holds its entries in registers, in vectors of the widest size
/// the device loads well that divides `D` (16 bytes: 8 half-precision entries, 4 `f32`); no more
/// lanes than a row has vectors (a lane without one would only idle through the sums).
fn layout<R: Runtime>(client: &ComputeClient<R>, p: &NormProblem) -> NormLayout {
    let vector = client
        .io_optimized_vector_sizes(p.dtype.size())
        .filter(|&n| n > 0 && p.dim.is_multiple_of(n))
        .max()
        .unwrap_or(1);
    let (lanes, _) = row_lanes(client, p.dim, 1024);
    let units = lanes.min((p.dim / vector).next_power_of_two());
    NormLayout {
        dim: p.dim,
        vector,
        units,
        rows: rows_per_cube(client, units),
        gated: p.gated,
    }
}

/// Cubes of the forward: one per `l.rows` rows.
fn forward_cubes(p: &NormProblem, l: &NormLayout) -> (usize, usize) {
    cubes_2d(p.rows.div_ceil(l.rows))
}

fn checked<R: Runtime>(client: &ComputeClient<R>, p: &NormProblem) -> Result<(), KernelError> {
    p.validate()?;
    p.dtype.check_supported(client)?;
    let (x, y) = forward_cubes(p, &layout(client, p));
    check_grid(client, (x, y, 1), "the norm")
}

/// The gate's buffer (or its gradient's): required when gated, refused when not (the kernels
/// never touch it then, and `stand_in` fills the argument).
fn gate_buffer<'a>(
    h: Option<&'a Handle>,
    p: &NormProblem,
    stand_in: &'a Handle,
    what: &str,
) -> Result<&'a Handle, KernelError> {
    match (h, p.gated) {
        (Some(h), true) => Ok(h),
        (None, true) => Err(KernelError::InvalidProblem(format!(
            "missing buffer: {what} (the problem is gated)"
        ))),
        // A gradient buffer the kernels would leave unwritten is a caller's mistake.
        (Some(_), false) => Err(KernelError::InvalidProblem(format!(
            "buffer {what} given for an ungated problem"
        ))),
        (None, false) => Ok(stand_in),
    }
}

/// The forward: `y` and the reciprocal RMS of each row.
pub fn norm_forward<R: Runtime>(
    client: &ComputeClient<R>,
    p: &NormProblem,
    b: NormForwardBuffers<'_>,
) -> Result<(), KernelError> {
    checked(client, p)?;
    let g = gate_buffer(b.g, p, b.x, "g")?;
    let e = p.dtype.size();
    for (name, h, n) in [("x", b.x, p.len()), ("g", g, p.len()), ("y", b.y, p.len())] {
        fits(name, h, n, e)?;
    }
    fits("w", b.w, p.dim, e)?;
    fits("rstd", b.rstd, p.rows, 4)?;
    let l = layout(client, p);
    let (gx, gy) = forward_cubes(p, &l);
    // In vectors of `l.vector` entries.
    let n = p.len() / l.vector;
    // Every access is guarded by the kernel's own conditions (rows and columns in range).
    unsafe {
        rms_norm_fwd_kernel::launch_unchecked::<R>(
            client,
            CubeCount::Static(gx as u32, gy as u32, 1),
            CubeDim::new_2d(l.units as u32, l.rows as u32),
            l.vector,
            array(b.x, n),
            array(b.w, l.width()),
            array(g, n),
            array(b.y, n),
            array(b.rstd, p.rows),
            p.rows as u32,
            p.eps,
            1.0 / p.dim as f32,
            l,
            p.dtype.storage(),
        )
    };
    Ok(())
}

/// The backward: `dx`, `dw` and, gated, `dg`.
pub fn norm_backward<R: Runtime>(
    client: &ComputeClient<R>,
    p: &NormProblem,
    b: NormBackwardBuffers<'_>,
) -> Result<(), KernelError> {
    checked(client, p)?;
    let g = gate_buffer(b.g, p, b.x, "g")?;
    let l = layout(client, p);
    // Ungated, a buffer of its own (the kernel never writes it): no output is bound twice. It
    // holds the one vector its array declares.
    let unused = client.empty(64);
    let dg = gate_buffer(b.dg, p, &unused, "dg")?;
    let e = p.dtype.size();
    for (name, h, n) in [
        ("x", b.x, p.len()),
        ("g", g, p.len()),
        ("dy", b.dy, p.len()),
    ] {
        fits(name, h, n, e)?;
    }
    fits("dx", b.dx, p.len(), e)?;
    fits("w", b.w, p.dim, e)?;
    fits("dw", b.dw, p.dim, e)?;
    fits("rstd", b.rstd, p.rows, 4)?;
    if p.gated {
        fits("dg", dg, p.len(), e)?;
    }
    let dg_len = if p.gated { p.len() / l.vector } else { 1 };
    // Each row lane of each cube takes every `blocks · rows`-th row and keeps its share of `dw`
    // in registers; the cube sums its lanes' shares and writes them once, as one row of
    // `[blocks, D]` partials.
    let blocks = p
        .rows
        .div_ceil(l.rows)
        .min((BACKWARD_THREADS / (l.units * l.rows)).max(1))
        .min(MAX_BLOCKS);
    let (gx, gy) = cubes_2d(blocks);
    let n = p.len() / l.vector;
    let part = client.empty(4 * blocks * p.dim);
    unsafe {
        rms_norm_bwd_kernel::launch_unchecked::<R>(
            client,
            CubeCount::Static(gx as u32, gy as u32, 1),
            CubeDim::new_2d(l.units as u32, l.rows as u32),
            l.vector,
            array(b.x, n),
            array(b.w, l.width()),
            array(g, n),
            array(b.rstd, p.rows),
            array(b.dy, n),
            array(b.dx, n),
            array(dg, dg_len),
            array(&part, blocks * p.dim),
            p.rows as u32,
            blocks as u32,
            1.0 / p.dim as f32,
            l,
            p.dtype.storage(),
        )
    };
    // Columns of `dw` in tiles of 32 per cube, each column's partials split over as many lanes
    // (a power of two, up to 32) as the device's cubes hold.
    let max_units = client.properties().hardware.max_units_per_cube as usize;
    let lanes = (max_units / PLANE).clamp(1, PLANE);
    let lanes = 1usize << lanes.ilog2();
    unsafe {
        column_sum_kernel::launch_unchecked::<R>(
            client,
            CubeCount::Static(p.dim.div_ceil(PLANE) as u32, 1, 1),
            CubeDim::new_2d(PLANE as u32, lanes as u32),
            array(&part, blocks * p.dim),
            array(b.dw, p.dim),
            blocks as u32,
            p.dim as u32,
            lanes,
            p.dtype.storage(),
        )
    };
    Ok(())
}
