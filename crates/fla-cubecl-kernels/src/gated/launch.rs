//! Host-side launchers: validate, choose tile sizes from the device's limits, launch.

use cubecl::prelude::*;
use cubecl::server::Handle;

use super::chunk::{
    chunk_cumsum_kernel, chunk_dqk_kernel, chunk_dv_kernel, chunk_output_kernel,
    chunk_pairs_kernel, chunk_state_kernel, state_stage_len, ChunkLayout,
};
use super::recurrent_bwd::{
    final_state_sums_kernel, gate_cumsum_kernel, gate_segment_sums_kernel, qk_grad_finalize_kernel,
    recurrent_bwd_kernel, row_sum_kernel, value_term_kernel, GateAxis,
};
use super::recurrent_fwd::{recurrent_fwd_kernel, stage_len, RecurrentLayout};
use super::tiled_launch::{tiled_backward, tiled_forward, tiled_layout, tuning};
use super::{GateKind, GatedProblem};
use crate::problem::{fits, fits_opt};
use crate::KernelError;

/// Device buffers of a forward call, in the layouts of the crate docs. Inputs are in the problem's
/// dtype; `h0` and `ht` are `f32`. Absent optional buffers must agree with the problem.
pub struct ForwardBuffers<'a> {
    pub q: &'a Handle,
    pub k: &'a Handle,
    pub v: &'a Handle,
    pub g: Option<&'a Handle>,
    pub gv: Option<&'a Handle>,
    pub h0: Option<&'a Handle>,
    /// Output `[B*T, H, V]`.
    pub o: &'a Handle,
    /// Output `[N, H, K, V]`, when the problem asks for the final state.
    pub ht: Option<&'a Handle>,
    /// Output, optional: the chunk form's in-chunk scores under vector gates, for the backward
    /// to read instead of summing them again (FLA's chunk GLA keeps them too), in the input
    /// dtype with the shape [`chunk_scores_shape`] gives. Ignored where that is `None`.
    pub scores: Option<&'a Handle>,
}

/// Device buffers of a backward call. `o` is needed with a value gate and `ht` with `d_ht` (both
/// enter the gate gradients); outputs are written in full.
pub struct BackwardBuffers<'a> {
    pub q: &'a Handle,
    pub k: &'a Handle,
    pub v: &'a Handle,
    pub g: Option<&'a Handle>,
    pub gv: Option<&'a Handle>,
    pub h0: Option<&'a Handle>,
    pub o: Option<&'a Handle>,
    pub ht: Option<&'a Handle>,
    pub d_o: &'a Handle,
    pub d_ht: Option<&'a Handle>,
    pub dq: &'a Handle,
    pub dk: &'a Handle,
    pub dv: &'a Handle,
    /// Same shape as `g`, when the problem has a key gate.
    pub dg: Option<&'a Handle>,
    pub dgv: Option<&'a Handle>,
    pub dh0: Option<&'a Handle>,
    /// The scores a chunk forward of the same problem wrote to its
    /// [`ForwardBuffers::scores`], when it was given one: the backward then reads them instead
    /// of summing them again. Ignored where [`chunk_scores_shape`] is `None`.
    pub scores: Option<&'a Handle>,
}

/// The shape `[B·T, H, C]` of the in-chunk scores the chunk form at `chunk` sums on this device
/// (vector gates on the tiled path: `C` is that path's chunk), which a forward can keep for its
/// backward ([`ForwardBuffers::scores`]); `None` where it sums none, or where keeping them is
/// off (`FLA_GLA_KEEP_SCORES=0`; on by default, as FLA's `chunk_gla` keeps its `A`).
pub fn chunk_scores_shape<R: Runtime>(
    client: &ComputeClient<R>,
    p: &GatedProblem,
    chunk: usize,
) -> Option<[usize; 3]> {
    if tuning("FLA_GLA_KEEP_SCORES") == Some(0) {
        return None;
    }
    tiled_layout(client, p, chunk)
        .filter(|l| l.vector_gate)
        .map(|l| [p.tokens(), p.heads, l.chunk])
}

/// The caller's scores buffer where the chunk form at `chunk` keeps scores
/// ([`chunk_scores_shape`]), checked to hold them; `None` elsewhere, whatever was given (the
/// buffers' "ignored": a buffer given where keeping is off is neither written nor read).
fn kept_scores<'a, R: Runtime>(
    client: &ComputeClient<R>,
    p: &GatedProblem,
    chunk: usize,
    given: Option<&'a Handle>,
) -> Result<Option<&'a Handle>, KernelError> {
    let Some((given, shape)) = given.zip(chunk_scores_shape(client, p, chunk)) else {
        return Ok(None);
    };
    fits("scores", given, shape.iter().product(), p.dtype.size())?;
    Ok(Some(given))
}

/// Threads per cube for the recurrent kernels: enough to hide latency, few enough that a
/// 256-wide state keeps 32 rows per thread in registers.
const CUBE_THREADS: usize = 256;
pub(crate) const ELEMWISE_THREADS: u32 = 256;

pub(crate) fn array<R: Runtime>(h: &Handle, len: usize) -> ArrayArg<R> {
    unsafe { ArrayArg::from_raw_parts(h.clone(), len.max(1)) }
}

pub(crate) fn need<'a>(h: Option<&'a Handle>, what: &str) -> Result<&'a Handle, KernelError> {
    h.ok_or_else(|| KernelError::InvalidProblem(format!("missing buffer: {what}")))
}

/// Chooses `(block_v, k_split)` for a launch; `smem_rows` adds a `K × block_v` reduction buffer.
fn tiles<R: Runtime>(
    client: &ComputeClient<R>,
    p: &GatedProblem,
    smem_rows: bool,
) -> Result<(usize, usize), KernelError> {
    // Reduction buffers (the key-row one padded a column), two staging buffers.
    tiles_for(client, p.k_dim, p.v_dim, |block_v, k_split, rows| {
        let reduce_rows = if smem_rows {
            rows * k_split * (block_v + 1)
        } else {
            0
        };
        2 * block_v * k_split + reduce_rows + 2 * stage_len(p.k_dim)
    })
}

/// Chooses `(block_v, k_split)` for a cube holding a `K × block_v` state slice: the widest value
/// block whose shared memory, `smem_floats(block_v, k_split, rows)` f32 values, fits the device.
pub(crate) fn tiles_for<R: Runtime>(
    client: &ComputeClient<R>,
    k_dim: usize,
    v_dim: usize,
    smem_floats: impl Fn(usize, usize, usize) -> usize,
) -> Result<(usize, usize), KernelError> {
    let props = client.properties();
    let max_smem = props.hardware.max_shared_memory_size;
    let max_units = (props.hardware.max_units_per_cube as usize).min(CUBE_THREADS);
    let mut block_v = 32usize.min(v_dim.next_power_of_two()).max(1);
    loop {
        let k_split = (max_units / block_v).min(k_dim.next_power_of_two()).max(1);
        let rows = k_dim.div_ceil(k_split);
        let smem = 4 * smem_floats(block_v, k_split, rows);
        if smem <= max_smem {
            return Ok((block_v, k_split));
        }
        if block_v <= 4 {
            return Err(KernelError::DeviceLimit(format!(
                "K = {k_dim} needs more than the device's {max_smem} bytes of shared memory"
            )));
        }
        block_v /= 2;
    }
}

fn layout(p: &GatedProblem, block_v: usize, k_split: usize) -> RecurrentLayout {
    RecurrentLayout {
        heads: p.heads,
        k: p.k_dim,
        v: p.v_dim,
        block_v,
        k_split,
        rows: p.k_dim.div_ceil(k_split),
        scalar_gate: p.gate == GateKind::Scalar,
        vector_gate: p.gate == GateKind::Vector,
        value_gate: p.value_gate,
        reverse: p.reverse,
        has_h0: p.has_initial_state,
        has_ht: p.output_final_state,
        varlen: p.cu_seqlens.is_some(),
    }
}

fn cu_seqlens_handle<R: Runtime>(client: &ComputeClient<R>, p: &GatedProblem) -> (Handle, usize) {
    upload_cu_seqlens(client, p.cu_seqlens.as_deref())
}

/// `cu_seqlens` as a `u32` device buffer (a one-element placeholder without it) and its length.
pub(crate) fn upload_cu_seqlens<R: Runtime>(
    client: &ComputeClient<R>,
    cu_seqlens: Option<&[usize]>,
) -> (Handle, usize) {
    let cu: Vec<u32> = match cu_seqlens {
        Some(cu) => cu.iter().map(|&x| x as u32).collect(),
        None => vec![0],
    };
    (client.create_from_slice(u32::as_bytes(&cu)), cu.len())
}

/// `cubes` (at least one) laid out as `(x, y)` counts, each axis ≤ 65535; kernels find their cube
/// as `y · CUBE_COUNT_X + x` and skip those past the last.
pub(crate) fn cubes_2d(cubes: usize) -> (usize, usize) {
    let cubes = cubes.max(1);
    let x = cubes.min(65535);
    (x, cubes.div_ceil(x))
}

/// Shortest segment of the gate gradient's cumulative sum ([`gate_segment_sums_kernel`]), so
/// short sequences keep a segment or a few (a floor chosen, not measured).
const GATE_SEGMENT_MIN: usize = 32;

/// Grid for `units` independent threads: 1-D cubes over a 2-D count (each axis ≤ 65535).
pub(crate) fn elementwise_grid(units: usize) -> CubeCount {
    let (x, y) = cubes_2d(units.div_ceil(ELEMWISE_THREADS as usize));
    CubeCount::Static(x as u32, y as u32, 1)
}

fn grid(p: &GatedProblem, block_v: usize, k_split: usize) -> (CubeCount, CubeDim) {
    let nv = p.v_dim.div_ceil(block_v) as u32;
    let nh = (p.num_seqs() * p.heads) as u32;
    (
        CubeCount::Static(nv, nh, 1),
        CubeDim::new_2d(block_v as u32, k_split as u32),
    )
}

/// Refuses a grid whose axes pass the device's cube-count limits (CUDA allows 65535 cubes on y
/// and z, wgpu on every axis): such a launch fails or leaves its outputs unwritten. The axes that
/// grow are the batch (sequences times heads) and the number of chunks.
pub(crate) fn check_grid<R: Runtime>(
    client: &ComputeClient<R>,
    (x, y, z): (usize, usize, usize),
    what: &str,
) -> Result<(), KernelError> {
    let (mx, my, mz) = client.properties().hardware.max_cube_count;
    if x > mx as usize || y > my as usize || z > mz as usize {
        return Err(KernelError::DeviceLimit(format!(
            "{what}: a grid of ({x}, {y}, {z}) cubes, past this device's ({mx}, {my}, {mz}); \
             split the batch or the sequence"
        )));
    }
    Ok(())
}

/// Loop iterations one shader invocation may run on a CPU Vulkan driver (lavapipe), which cuts an
/// invocation off after about 65536 (see [`check_loop_limit`]), with a margin.
pub(crate) const CPU_VULKAN_MAX_ITERATIONS: usize = 60_000;

/// Longest sequence a kernel invocation may walk on a CPU Vulkan driver (lavapipe).
pub const CPU_VULKAN_MAX_SEQ: usize = 8192;

/// Whether `client` runs on a CPU Vulkan driver (lavapipe). cubecl-wgpu turns plane operations off
/// on CPU adapters (and only GPUs without subgroups share that), which is how it is recognised.
pub fn is_cpu_vulkan<R: Runtime>(client: &ComputeClient<R>) -> bool {
    R::name(client).starts_with("wgpu")
        && !client
            .properties()
            .features
            .plane
            .contains(cubecl::ir::features::Plane::Ops)
}

/// lavapipe stops a shader invocation after about 65536 loop iterations and leaves its outputs
/// unwritten: measured here, a 70000-token recurrent forward returns NaN from token 65535 on, the
/// chunk form is wrong at 60000 tokens (right at 40000), and the recurrent backward, whose steps
/// hold inner loops, is wrong at 16000 (right at 8000). A silent wrong answer is worse than a
/// refusal, so sequences longer than [`CPU_VULKAN_MAX_SEQ`] are refused there.
pub(crate) fn check_loop_limit<R: Runtime>(
    client: &ComputeClient<R>,
    longest: usize,
) -> Result<(), KernelError> {
    if is_cpu_vulkan(client) && longest > CPU_VULKAN_MAX_SEQ {
        return Err(KernelError::DeviceLimit(format!(
            "a sequence of {longest} tokens exceeds the {CPU_VULKAN_MAX_SEQ} that a CPU Vulkan \
             driver (lavapipe) runs in one shader invocation; split it, carrying the state \
             (initial_state / final state), or use a GPU"
        )));
    }
    Ok(())
}

/// What this device refuses of a problem whatever the form and direction: the problem itself,
/// the dtype, lavapipe's loop limit, the grid. Callers that defer the launch (Burn's fusion
/// stream, the backward recorded for autodiff) run it first, so the deferred launch does not
/// fail on them.
pub fn check_device<R: Runtime>(
    client: &ComputeClient<R>,
    p: &GatedProblem,
) -> Result<(), KernelError> {
    p.validate()?;
    p.dtype.check_supported(client)?;
    check_loop_limit(client, p.longest())?;
    // Sequences times heads on y (the recurrent kernels, the chunk state pass), sequences on z
    // (the tile kernels); the chunk count is checked where it is known.
    check_grid(
        client,
        (1, p.num_seqs() * p.heads, p.num_seqs()),
        "the gated kernels",
    )
}

fn check_common<R: Runtime>(
    client: &ComputeClient<R>,
    p: &GatedProblem,
    g: Option<&Handle>,
    gv: Option<&Handle>,
    h0: Option<&Handle>,
) -> Result<(), KernelError> {
    check_device(client, p)?;
    if (p.gate != GateKind::None) != g.is_some() {
        return Err(KernelError::InvalidProblem(format!(
            "gate kind {:?} does not match the gate buffer given ({})",
            p.gate,
            g.is_some()
        )));
    }
    if p.value_gate != gv.is_some() {
        return Err(KernelError::InvalidProblem(
            "value gate flag and buffer disagree".into(),
        ));
    }
    if p.has_initial_state != h0.is_some() {
        return Err(KernelError::InvalidProblem(
            "initial-state flag and buffer disagree".into(),
        ));
    }
    Ok(())
}

/// [`check_common`], the final-state buffer of a forward call, and that every buffer holds what
/// the problem indexes (see [`fits`]).
fn check_forward<R: Runtime>(
    client: &ComputeClient<R>,
    p: &GatedProblem,
    b: &ForwardBuffers<'_>,
) -> Result<(), KernelError> {
    check_common(client, p, b.g, b.gv, b.h0)?;
    if p.output_final_state != b.ht.is_some() {
        return Err(KernelError::InvalidProblem(
            "final-state flag and buffer disagree".into(),
        ));
    }
    let (qk, vo) = p.lens();
    let e = p.dtype.size();
    for (name, h, n) in [
        ("q", b.q, qk),
        ("k", b.k, qk),
        ("v", b.v, vo),
        ("o", b.o, vo),
    ] {
        fits(name, h, n, e)?;
    }
    fits_opt("g", b.g, p.gate_len(), e)?;
    fits_opt("gv", b.gv, vo, e)?;
    fits_opt("h0", b.h0, p.state_len(), 4)?;
    fits_opt("ht", b.ht, p.state_len(), 4)
}

/// [`check_common`] and that every buffer of a backward call holds what the problem indexes
/// (see [`fits`]).
fn check_backward<R: Runtime>(
    client: &ComputeClient<R>,
    p: &GatedProblem,
    b: &BackwardBuffers<'_>,
) -> Result<(), KernelError> {
    check_common(client, p, b.g, b.gv, b.h0)?;
    let (qk, vo) = p.lens();
    let e = p.dtype.size();
    for (name, h, n) in [
        ("q", b.q, qk),
        ("k", b.k, qk),
        ("v", b.v, vo),
        ("d_o", b.d_o, vo),
        ("dq", b.dq, qk),
        ("dk", b.dk, qk),
        ("dv", b.dv, vo),
    ] {
        fits(name, h, n, e)?;
    }
    for (name, h, n) in [
        ("g", b.g, p.gate_len()),
        ("dg", b.dg, p.gate_len()),
        ("gv", b.gv, vo),
        ("dgv", b.dgv, vo),
        ("o", b.o, vo),
    ] {
        fits_opt(name, h, n, e)?;
    }
    for (name, h) in [("h0", b.h0), ("ht", b.ht), ("d_ht", b.d_ht), ("dh0", b.dh0)] {
        fits_opt(name, h, p.state_len(), 4)?;
    }
    Ok(())
}

/// Launches the fused recurrent forward: writes `o` and, when asked, `ht`.
pub fn recurrent_forward<R: Runtime>(
    client: &ComputeClient<R>,
    p: &GatedProblem,
    b: ForwardBuffers<'_>,
) -> Result<(), KernelError> {
    check_forward(client, p, &b)?;
    let (block_v, k_split) = tiles(client, p, false)?;
    let c = layout(p, block_v, k_split);
    let (count, dim) = grid(p, block_v, k_split);
    let (cu, cu_len) = cu_seqlens_handle(client, p);
    let dummy = client.create_from_slice(f32::as_bytes(&[0.0]));
    let (qk, vo) = p.lens();
    recurrent_fwd_kernel::launch::<R>(
        client,
        count,
        dim,
        array(b.q, qk),
        array(b.k, qk),
        array(b.v, vo),
        array(b.g.unwrap_or(&dummy), p.gate_len()),
        array(b.gv.unwrap_or(&dummy), vo),
        array(b.h0.unwrap_or(&dummy), p.state_len()),
        array(&cu, cu_len),
        array(b.o, vo),
        array(b.ht.unwrap_or(&dummy), p.state_len()),
        p.seq_len as u32,
        p.scale,
        c,
        p.dtype.storage(),
    );
    Ok(())
}

/// Launches the fused recurrent backward and the gate-gradient kernels.
pub fn recurrent_backward<R: Runtime>(
    client: &ComputeClient<R>,
    p: &GatedProblem,
    b: BackwardBuffers<'_>,
) -> Result<(), KernelError> {
    check_backward(client, p, &b)?;
    let (block_v, k_split) = tiles(client, p, true)?;
    let c = layout(p, block_v, k_split);
    let (count, dim) = grid(p, block_v, k_split);
    let (cu, cu_len) = cu_seqlens_handle(client, p);
    let dummy = client.create_from_slice(f32::as_bytes(&[0.0]));
    let tokens = p.tokens();
    let (qk, vo) = p.lens();
    let nv = p.v_dim.div_ceil(block_v);
    crate::problem::addressable(nv * qk, "the recurrent backward's partial dq")?;
    let dq_part = client.empty(4 * nv * qk);
    let dk_part = client.empty(4 * nv * qk);
    let has_dht = b.d_ht.is_some();
    let dh0 = if p.has_initial_state {
        need(b.dh0, "dh0")?
    } else {
        &dummy
    };
    recurrent_bwd_kernel::launch::<R>(
        client,
        count,
        dim,
        array(b.q, qk),
        array(b.k, qk),
        array(b.v, vo),
        array(b.g.unwrap_or(&dummy), p.gate_len()),
        array(b.gv.unwrap_or(&dummy), vo),
        array(b.h0.unwrap_or(&dummy), p.state_len()),
        array(&cu, cu_len),
        array(b.d_o, vo),
        array(b.d_ht.unwrap_or(&dummy), p.state_len()),
        array(&dq_part, nv * qk),
        array(&dk_part, nv * qk),
        array(b.dv, vo),
        array(dh0, p.state_len()),
        p.seq_len as u32,
        tokens as u32,
        p.scale,
        c,
        has_dht,
        p.dtype.storage(),
    );

    let key_term = finalize_qk_grads(client, p, &b, (&dq_part, nv), (&dk_part, nv));
    gate_gradients(client, p, &b, key_term.as_ref(), c, (&cu, cu_len))
}

/// Sums the `f32` partials of `dq` and `dk` (`q_blocks` and `k_blocks` of `[B·T, H, K]` each)
/// into `b.dq`, `b.dk`; for a key gate also returns the identity's term `q ∘ dq − k ∘ dk`.
pub(crate) fn finalize_qk_grads<R: Runtime>(
    client: &ComputeClient<R>,
    p: &GatedProblem,
    b: &BackwardBuffers<'_>,
    (dq_part, q_blocks): (&Handle, usize),
    (dk_part, k_blocks): (&Handle, usize),
) -> Option<Handle> {
    let (qk, _) = p.lens();
    let dummy = client.create_from_slice(f32::as_bytes(&[0.0]));
    let key_term = (p.gate != GateKind::None).then(|| client.empty(4 * qk));
    qk_grad_finalize_kernel::launch::<R>(
        client,
        elementwise_grid(qk),
        CubeDim::new_1d(ELEMWISE_THREADS),
        array(b.q, qk),
        array(b.k, qk),
        array(dq_part, q_blocks * qk),
        array(dk_part, k_blocks * qk),
        array(b.dq, qk),
        array(b.dk, qk),
        array(key_term.as_ref().unwrap_or(&dummy), qk),
        qk as u32,
        q_blocks,
        k_blocks,
        key_term.is_some(),
        p.dtype.storage(),
    );
    key_term
}

/// The gate gradients from the identity of MATH.md: `key_term` holds `q ∘ dq − k ∘ dk` per token
/// (`f32`, `[B·T, H, K]`); a value gate's term is formed here from `o`, `dO`, `v` and `dv`.
fn gate_gradients<R: Runtime>(
    client: &ComputeClient<R>,
    p: &GatedProblem,
    b: &BackwardBuffers<'_>,
    key_term: Option<&Handle>,
    c: RecurrentLayout,
    (cu, cu_len): (&Handle, usize),
) -> Result<(), KernelError> {
    let dummy = client.create_from_slice(f32::as_bytes(&[0.0]));
    let tokens = p.tokens();
    let (qk, vo) = p.lens();
    let has_dht = b.d_ht.is_some();
    // The final-state term of the identity needs hT whenever a gradient arrives on it.
    let nh = p.num_seqs() * p.heads;
    let (rows, cols) = (
        client.empty(4 * nh * p.k_dim),
        client.empty(4 * nh * p.v_dim),
    );
    if has_dht && (p.gate != GateKind::None || p.value_gate) {
        let ht = need(b.ht, "ht (with d_ht)")?;
        let width = p.k_dim.max(p.v_dim);
        final_state_sums_kernel::launch::<R>(
            client,
            elementwise_grid(nh * width),
            CubeDim::new_1d(ELEMWISE_THREADS),
            array(ht, p.state_len()),
            array(b.d_ht.unwrap_or(&dummy), p.state_len()),
            array(&rows, nh * p.k_dim),
            array(&cols, nh * p.v_dim),
            (nh * width) as u32,
            width as u32,
            p.k_dim as u32,
            p.v_dim as u32,
        );
    }
    // Segments of about √T steps: as many units as steps per unit, each prefix at most √T long.
    // Every sequence gets the longest one's count, so with many short sequences beside a long
    // one the count is capped at a sixteenth of the mean length: the segment sums then stay
    // within a sixteenth of the term's size (and its 32-bit indices), as one walk per sequence
    // (a single segment) always does.
    let seg_len = (p.longest() as f64).sqrt().ceil() as usize;
    let cap = (tokens / (16 * p.num_seqs())).max(1);
    let segs = p
        .longest()
        .div_ceil(seg_len.max(GATE_SEGMENT_MIN))
        .clamp(1, cap);
    let seg_len = p.longest().div_ceil(segs).max(1);
    let cumsum = |term: &Handle, term_len: usize, dg: &Handle, dg_len: usize, axis, width| {
        let units = p.num_seqs() * p.heads * segs * width;
        let seg = client.empty(4 * units);
        gate_segment_sums_kernel::launch::<R>(
            client,
            elementwise_grid(units),
            CubeDim::new_1d(ELEMWISE_THREADS),
            array(term, term_len),
            array(cu, cu_len),
            array(&seg, units),
            p.seq_len as u32,
            units as u32,
            segs as u32,
            seg_len as u32,
            c,
            axis,
        );
        gate_cumsum_kernel::launch::<R>(
            client,
            elementwise_grid(units),
            CubeDim::new_1d(ELEMWISE_THREADS),
            array(term, term_len),
            array(&rows, nh * p.k_dim),
            array(&cols, nh * p.v_dim),
            array(cu, cu_len),
            array(&seg, units),
            array(dg, dg_len),
            p.seq_len as u32,
            units as u32,
            segs as u32,
            seg_len as u32,
            p.k_dim as u32,
            c,
            axis,
            has_dht,
            p.dtype.storage(),
        );
    };
    if let Some(term) = key_term {
        let dg = need(b.dg, "dg")?;
        match p.gate {
            GateKind::Vector => cumsum(term, qk, dg, qk, GateAxis::Key, p.k_dim),
            _ => {
                let rows = tokens * p.heads;
                let summed = client.empty(4 * rows);
                row_sum_kernel::launch::<R>(
                    client,
                    elementwise_grid(rows),
                    CubeDim::new_1d(ELEMWISE_THREADS),
                    array(term, qk),
                    array(&summed, rows),
                    rows as u32,
                    p.k_dim as u32,
                );
                cumsum(&summed, rows, dg, rows, GateAxis::Scalar, 1)
            }
        }
    }
    if p.value_gate {
        let term = client.empty(4 * vo);
        value_term_kernel::launch::<R>(
            client,
            elementwise_grid(vo),
            CubeDim::new_1d(ELEMWISE_THREADS),
            array(need(b.o, "o (with a value gate)")?, vo),
            array(b.d_o, vo),
            array(b.v, vo),
            array(b.dv, vo),
            array(&term, vo),
            vo as u32,
            p.dtype.storage(),
        );
        cumsum(&term, vo, need(b.dgv, "dgv")?, vo, GateAxis::Value, p.v_dim);
    }
    Ok(())
}

/// Default positions per chunk (FLA's).
pub const DEFAULT_CHUNK: usize = 64;
const CHUNK_THREADS: u32 = 256;

fn chunk_layout<R: Runtime>(
    client: &ComputeClient<R>,
    p: &GatedProblem,
    chunk: usize,
) -> Result<ChunkLayout, KernelError> {
    if p.value_gate {
        return Err(KernelError::InvalidProblem(
            "the chunk form has no value gate (gv); use the fused recurrent form".into(),
        ));
    }
    if chunk == 0 {
        return Err(KernelError::InvalidProblem("chunk size 0".into()));
    }
    let (block_v, k_split) = tiles(client, p, false)?;
    let max_smem = client.properties().hardware.max_shared_memory_size;
    let c = ChunkLayout {
        rec: layout(p, block_v, k_split),
        chunk,
    };
    if 4 * state_stage_len(&c) > max_smem {
        return Err(KernelError::DeviceLimit(format!(
            "the chunk state pass needs {} bytes of shared memory, the device has {max_smem}",
            4 * state_stage_len(&c)
        )));
    }
    Ok(c)
}

/// The chunk tables of a call: `(sequence, chunk index in the sequence)` per chunk (a
/// placeholder pair when there is none), each sequence's first chunk, and the chunk count.
pub(crate) fn chunk_tables(
    bounds: impl Iterator<Item = (usize, usize)>,
    chunk: usize,
) -> (Vec<u32>, Vec<u32>, usize) {
    let mut chunks = Vec::new();
    let mut first = Vec::new();
    for (n, (bos, eos)) in bounds.enumerate() {
        first.push((chunks.len() / 2) as u32);
        for ci in 0..(eos - bos).div_ceil(chunk) {
            chunks.extend([n as u32, ci as u32]);
        }
    }
    let count = chunks.len() / 2;
    if chunks.is_empty() {
        chunks.push(0);
    }
    (chunks, first, count)
}

/// What every chunk kernel of one call shares: the layout, the chunk tables (`(sequence, chunk
/// index)` per chunk and each sequence's first chunk, built on the host), `cu_seqlens` and `Λ`
/// (the log gates cumulated within each chunk; a placeholder without a gate).
struct ChunkCall<'a, R: Runtime> {
    client: &'a ComputeClient<R>,
    p: &'a GatedProblem,
    c: ChunkLayout,
    chunks: Handle,
    first: Handle,
    count: usize,
    cu: Handle,
    cu_len: usize,
    gc: Handle,
    dummy: Handle,
}

impl<'a, R: Runtime> ChunkCall<'a, R> {
    fn new(
        client: &'a ComputeClient<R>,
        p: &'a GatedProblem,
        chunk: usize,
        g: Option<&Handle>,
    ) -> Result<Self, KernelError> {
        let c = chunk_layout(client, p, chunk)?;
        let (chunks, first, count) = chunk_tables((0..p.num_seqs()).map(|n| p.bounds(n)), chunk);
        crate::problem::addressable(count * p.heads * p.k_dim * p.v_dim, "the per-chunk states")?;
        // The pair buffers hold a chunk's worth of entries per token and head (`pairs_len`),
        // more than the inputs when the chunk exceeds K and V.
        crate::problem::addressable(p.tokens() * p.heads * chunk, "the chunk pair buffers")?;
        check_grid(client, (1, count, p.heads), "the gated chunk kernels")?;
        let (cu, cu_len) = cu_seqlens_handle(client, p);
        let dummy = client.create_from_slice(f32::as_bytes(&[0.0]));
        let mut call = Self {
            client,
            p,
            c,
            chunks: client.create_from_slice(u32::as_bytes(&chunks)),
            first: client.create_from_slice(u32::as_bytes(&first)),
            count,
            cu,
            cu_len,
            gc: dummy.clone(),
            dummy,
        };
        if let Some(g) = g {
            let width = if c.rec.vector_gate { p.k_dim } else { 1 };
            let len = p.tokens() * p.heads * width;
            let gc = client.empty(4 * len);
            let units = count * p.heads * width;
            chunk_cumsum_kernel::launch::<R>(
                client,
                elementwise_grid(units),
                CubeDim::new_1d(ELEMWISE_THREADS),
                array(g, len),
                array(&call.chunks, 2 * count),
                array(&call.cu, cu_len),
                array(&gc, len),
                p.seq_len as u32,
                units as u32,
                c,
                p.dtype.storage(),
            );
            call.gc = gc;
        }
        Ok(call)
    }

    fn qk(&self) -> usize {
        self.p.tokens() * self.p.heads * self.p.k_dim
    }

    fn vo(&self) -> usize {
        self.p.tokens() * self.p.heads * self.p.v_dim
    }

    fn states_len(&self) -> usize {
        self.count * self.p.heads * self.p.k_dim * self.p.v_dim
    }

    fn pairs_len(&self) -> usize {
        self.p.tokens() * self.p.heads * self.c.chunk
    }

    /// Cubes over `(entries of one chunk, chunk, head)`, one unit per entry.
    fn grid(&self, entries: usize) -> CubeCount {
        CubeCount::Static(
            entries.div_ceil(CHUNK_THREADS as usize) as u32,
            self.count as u32,
            self.p.heads as u32,
        )
    }

    /// The state pass ([`chunk_state_kernel`]): per-chunk states (`[chunks, H, K, V]`, `f32`),
    /// from `init` and into `last` when given. Forward: `key = k`, `val = v`; backward: `key = q`,
    /// `val = dO`, walking the chunks in reverse.
    fn state_pass(
        &self,
        key: &Handle,
        val: &Handle,
        init: Option<&Handle>,
        last: Option<&Handle>,
        backward: bool,
    ) -> Handle {
        let (p, c) = (self.p, self.c);
        let states = self.client.empty(4 * self.states_len().max(1));
        chunk_state_kernel::launch::<R>(
            self.client,
            CubeCount::Static(
                p.v_dim.div_ceil(c.rec.block_v) as u32,
                (p.num_seqs() * p.heads) as u32,
                1,
            ),
            CubeDim::new_2d(c.rec.block_v as u32, c.rec.k_split as u32),
            array(key, self.qk()),
            array(val, self.vo()),
            array(&self.gc, p.gate_len()),
            array(init.unwrap_or(&self.dummy), p.state_len()),
            array(&self.cu, self.cu_len),
            array(&self.first, p.num_seqs()),
            array(&states, self.states_len()),
            array(last.unwrap_or(&self.dummy), p.state_len()),
            p.seq_len as u32,
            p.scale,
            c,
            backward,
            init.is_some(),
            last.is_some(),
            p.dtype.storage(),
        );
        states
    }

    /// Lower-triangular products inside each chunk ([`chunk_pairs_kernel`]): `A` from `(q, k)`
    /// with the gates (`gated`), or `dA` from `(dO, v)`; `a` and `b` have `width` columns.
    fn pairs(&self, a: &Handle, b: &Handle, width: usize, gated: bool) -> Handle {
        let p = self.p;
        let out = self.client.empty(4 * self.pairs_len());
        chunk_pairs_kernel::launch::<R>(
            self.client,
            self.grid(self.c.chunk * self.c.chunk),
            CubeDim::new_1d(CHUNK_THREADS),
            array(a, p.tokens() * p.heads * width),
            array(b, p.tokens() * p.heads * width),
            array(&self.gc, p.gate_len()),
            array(&self.chunks, 2 * self.count),
            array(&self.cu, self.cu_len),
            array(&out, self.pairs_len()),
            p.seq_len as u32,
            p.scale,
            self.c,
            gated,
            p.dtype.storage(),
        );
        out
    }
}

/// Launches the chunkwise-parallel forward (chunk size `chunk`): writes `o` and, when asked, `ht`.
pub fn chunk_forward<R: Runtime>(
    client: &ComputeClient<R>,
    p: &GatedProblem,
    chunk: usize,
    b: ForwardBuffers<'_>,
) -> Result<(), KernelError> {
    check_forward(client, p, &b)?;
    let b = ForwardBuffers {
        scores: kept_scores(client, p, chunk, b.scores)?,
        ..b
    };
    if let Some(l) = tiled_layout(client, p, chunk) {
        let (cu, cu_len) = cu_seqlens_handle(client, p);
        return tiled_forward(client, p, l, &b, (&cu, cu_len));
    }
    let call = ChunkCall::new(client, p, chunk, b.g)?;
    let states = call.state_pass(b.k, b.v, b.h0, b.ht, false);
    let pairs = call.pairs(b.q, b.k, p.k_dim, true);
    chunk_output_kernel::launch::<R>(
        client,
        call.grid(chunk * p.v_dim),
        CubeDim::new_1d(CHUNK_THREADS),
        array(b.q, call.qk()),
        array(b.v, call.vo()),
        array(&call.gc, p.gate_len()),
        array(&states, call.states_len()),
        array(&pairs, call.pairs_len()),
        array(&call.chunks, 2 * call.count),
        array(&call.cu, call.cu_len),
        array(b.o, call.vo()),
        p.seq_len as u32,
        p.scale,
        call.c,
        p.dtype.storage(),
    );
    Ok(())
}

/// Launches the chunkwise-parallel backward. The per-chunk states are recomputed, not stored by
/// the forward (as FLA does): one state pass costs less than keeping `[chunks, H, K, V]` in `f32`
/// alive between forward and backward.
pub fn chunk_backward<R: Runtime>(
    client: &ComputeClient<R>,
    p: &GatedProblem,
    chunk: usize,
    b: BackwardBuffers<'_>,
) -> Result<(), KernelError> {
    check_backward(client, p, &b)?;
    let b = BackwardBuffers {
        scores: kept_scores(client, p, chunk, b.scores)?,
        ..b
    };
    let dh0 = if p.has_initial_state {
        Some(need(b.dh0, "dh0")?)
    } else {
        None
    };
    if let Some(l) = tiled_layout(client, p, chunk) {
        let (cu, cu_len) = cu_seqlens_handle(client, p);
        let key_term = tiled_backward(client, p, l, &b, (&cu, cu_len))?;
        // The gate cumsum reads heads, dims and the direction only: no tiling.
        return gate_gradients(
            client,
            p,
            &b,
            key_term.as_ref(),
            layout(p, 1, 1),
            (&cu, cu_len),
        );
    }
    let call = ChunkCall::new(client, p, chunk, b.g)?;
    let (qk, vo, states_len, pairs_len) =
        (call.qk(), call.vo(), call.states_len(), call.pairs_len());
    let states = call.state_pass(b.k, b.v, b.h0, None, false);
    // dS leaving each chunk, walking the chunks backwards from dhT.
    let d_states = call.state_pass(b.q, b.d_o, b.d_ht, dh0, true);
    let pairs = call.pairs(b.q, b.k, p.k_dim, true);
    let d_pairs = call.pairs(b.d_o, b.v, p.v_dim, false);

    chunk_dv_kernel::launch::<R>(
        client,
        call.grid(chunk * p.v_dim),
        CubeDim::new_1d(CHUNK_THREADS),
        array(b.k, qk),
        array(b.d_o, vo),
        array(&call.gc, p.gate_len()),
        array(&d_states, states_len),
        array(&pairs, pairs_len),
        array(&call.chunks, 2 * call.count),
        array(&call.cu, call.cu_len),
        array(b.dv, vo),
        p.seq_len as u32,
        p.scale,
        call.c,
        p.dtype.storage(),
    );
    let key_term = (p.gate != GateKind::None).then(|| client.empty(4 * qk));
    chunk_dqk_kernel::launch::<R>(
        client,
        call.grid(chunk * p.k_dim),
        CubeDim::new_1d(CHUNK_THREADS),
        array(b.q, qk),
        array(b.k, qk),
        array(b.v, vo),
        array(b.d_o, vo),
        array(&call.gc, p.gate_len()),
        array(&states, states_len),
        array(&d_states, states_len),
        array(&d_pairs, pairs_len),
        array(&call.chunks, 2 * call.count),
        array(&call.cu, call.cu_len),
        array(b.dq, qk),
        array(b.dk, qk),
        array(key_term.as_ref().unwrap_or(&call.dummy), qk),
        p.seq_len as u32,
        p.scale,
        call.c,
        p.dtype.storage(),
    );
    gate_gradients(
        client,
        p,
        &b,
        key_term.as_ref(),
        call.c.rec,
        (&call.cu, call.cu_len),
    )
}
