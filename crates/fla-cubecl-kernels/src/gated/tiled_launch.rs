//! Host side of the tiled chunk kernels ([`super::tiled`]): which calls they take, their tile
//! sizes from the device's limits, and the launches.

use cubecl::ir::features::MmaConfig;
use cubecl::prelude::*;
use cubecl::server::Handle;

use super::frag::{
    gla_dkv_frag_kernel, gla_dq_frag_kernel, gla_frag_dkv_smem, gla_frag_dq_smem,
    gla_frag_fwd_smem, gla_fwd_frag_kernel, GlaFragLayout,
};
use super::launch::{
    array, finalize_qk_grads, is_cpu_vulkan, need, BackwardBuffers, ForwardBuffers,
};
use super::tiled::{
    diag_regs_on, dkv_smem, dq_smem, factored_grads_on, factored_scores_on, fwd_smem,
    scalar_grads_kernel, scalar_grads_smem, scalar_scores_kernel, scalar_scores_smem, scores_smem,
    tiled_dkv_kernel, tiled_dq_kernel, tiled_fwd_kernel, vector_grads_kernel, vector_scores_kernel,
    TiledLayout,
};
use super::{GateKind, GatedProblem};
use crate::frag::{registers_available, widest_vector, Staging};
use crate::tile::{TileConfig, FRAG, PLANE};
use crate::FloatDType;

/// Largest chunk the tiled kernels take (shared memory grows with its square).
const MAX_TILED_CHUNK: usize = 64;
// `factored_scores` and `factored_grads` take at most three block boundaries a chunk.
const _: () = assert!(MAX_TILED_CHUNK <= 4 * super::tiled::SUB);

/// Positions per chunk under vector gates. Their in-chunk terms are summed entry by entry (`C`
/// multiply-adds and exponentials per key per position) by `vector_scores_kernel` and the `dq`
/// walk, once per head; a longer chunk makes that work grow while the walks' steps (the state's
/// decay and rounding, about ten barriers each) become fewer. Measured on an H100 (2026-12-06,
/// `benches/gpu/gla_scores.sh`): 32 against 16 gave 1.07x on FLA's 340M recipe cut to 4 layers
/// (494,400 against 463,100 tokens/s in one call, 498,200 against 465,700 in another) and 1.02x
/// on `chunk_gla` at B = 8, H = 16, K = V = 128, T = 4096 (11.74 against 11.97 ms
/// forward+backward); 64 matched 32 on the recipe but took 16.8 ms there.
pub const VECTOR_CHUNK: usize = 32;

/// Whether the tiled kernels run 16×16×16 tensor-core products of `dtype` into `f32` on this
/// device. CUDA by default. Vulkan reports cooperative matrices too (VK_KHR_cooperative_matrix
/// on NVIDIA's driver), but the tiled kernels' `cmma` path has been tested on CUDA alone, so wgpu
/// takes the plain path (which CI tests on lavapipe) unless `FLA_VULKAN_CMMA=1` opts in, for
/// testing and timing that path on a GPU (`benches/gpu/gated_gpu.sh vulkan-cmma`).
pub fn has_cmma<R: Runtime>(client: &ComputeClient<R>, dtype: FloatDType) -> bool {
    let cuda = R::name(client).contains("cuda");
    if dtype == FloatDType::F32 || !(cuda || tuning("FLA_VULKAN_CMMA") == Some(1)) {
        return false;
    }
    let f32_type = FloatDType::F32.storage();
    client
        .properties()
        .features
        .matmul
        .cmma
        .contains(&MmaConfig {
            a_type: dtype.storage(),
            b_type: dtype.storage(),
            cd_type: f32_type,
            m: FRAG as u32,
            n: FRAG as u32,
            k: FRAG as u32,
        })
}

/// The tiled kernels' layout for this call, or `None` where they do not apply: a value gate (the
/// chunk form has none), a chunk size that is not a multiple of 16, or a device whose shared
/// memory holds no tiling (the plain chunk kernels take those calls). The chunk is the requested
/// one, or the largest multiple of 16 below it that fits, and at most [`VECTOR_CHUNK`] for vector
/// gates (the result differs only by rounding).
pub fn tiled_layout<R: Runtime>(
    client: &ComputeClient<R>,
    p: &GatedProblem,
    chunk: usize,
) -> Option<TiledLayout> {
    if p.value_gate || !chunk.is_multiple_of(FRAG) || chunk == 0 {
        return None;
    }
    // Vector gates take chunks of `VECTOR_CHUNK`, or of the size asked where it is shorter
    // (`FLA_TILED_VCHUNK`, a multiple of 16 up to 64, overrides both: a measurement aid).
    let c = if p.gate == GateKind::Vector {
        chunk_tuning("FLA_TILED_VCHUNK").unwrap_or(VECTOR_CHUNK.min(chunk))
    } else {
        chunk.min(MAX_TILED_CHUNK)
    };
    layout_from(client, p, c, scores_smem, true)
}

/// [`tiled_layout`] from the chunk `c` down: the first multiple of 16 at or below it whose
/// tiles fit, the scores kernel's under vector gates (`scores_of`) among them, and the `dq`
/// walk's where `with_dq` (without it, `bk` is 16: a layout for the other walks only).
fn layout_from<R: Runtime>(
    client: &ComputeClient<R>,
    p: &GatedProblem,
    mut c: usize,
    scores_of: fn(&TiledLayout, usize) -> usize,
    with_dq: bool,
) -> Option<TiledLayout> {
    let props = client.properties();
    let max_smem = props.hardware.max_shared_memory_size;
    let max_units = props.hardware.max_units_per_cube as usize;
    let cpu = is_cpu_vulkan(client);
    // The most units per cube: a GPU keeps one cube per SM (shared memory), so its warps are
    // what hides latency (32 planes measured 2.4x faster than 8 on an H100); on lavapipe, where
    // every inner loop is unrolled (it counts loop iterations), fewer entries per unit keep the
    // code small enough to compile in seconds.
    let planes = 32.min(max_units / PLANE).max(1);
    let planes = tuning("FLA_TILED_PLANES").unwrap_or(planes);
    let tile = TileConfig {
        cmma: has_cmma(client, p.dtype) && tuning("FLA_TILED_CMMA") != Some(0),
        planes,
        unroll: cpu,
    };
    let (kp, vp) = (
        p.k_dim.next_multiple_of(FRAG),
        p.v_dim.next_multiple_of(FRAG),
    );
    let elem = p.dtype.size();
    while c >= FRAG {
        let base = TiledLayout {
            heads: p.heads,
            k: p.k_dim,
            v: p.v_dim,
            kp,
            vp,
            chunk: c,
            bv: FRAG,
            bk: FRAG,
            nb: FRAG,
            ph: 16 / elem,
            scalar_gate: p.gate == GateKind::Scalar,
            vector_gate: p.gate == GateKind::Vector,
            qk_heads: p.heads,
            delta: false,
            reverse: p.reverse,
            varlen: p.cu_seqlens.is_some(),
            has_h0: p.has_initial_state,
            has_ht: p.output_final_state,
            span: 0,
            states: false,
            tile,
        };
        let widths = |limit: usize| {
            [256, 128, 64, 32, 16]
                .into_iter()
                .filter(move |&w| w <= limit.max(FRAG))
        };
        // Blocks wider than 64 are measurement aids for now (`FLA_TILED_BV`, `FLA_TILED_BK`):
        // fewer, wider cubes, each walking more of the state.
        let bv_max = tuning("FLA_TILED_BV").unwrap_or(64);
        let bv = widths(vp.min(bv_max)).find(|&bv| {
            let l = TiledLayout { bv, ..base };
            fwd_smem(&l, elem) <= max_smem && dkv_smem(&l, elem) <= max_smem
        });
        let bk_max = tuning("FLA_TILED_BK").unwrap_or(64);
        let bk = match with_dq {
            true => widths(kp.min(bk_max))
                .find(|&bk| dq_smem(&TiledLayout { bk, ..base }, elem) <= max_smem),
            false => Some(FRAG),
        };
        let scores_fit = !base.vector_gate || scores_of(&base, elem) <= max_smem;
        if let (Some(bv), Some(bk), true) = (bv, bk, scores_fit) {
            // Widest dK column block that still fits beside the rest.
            let nb = [kp, 64, 32, 16]
                .into_iter()
                .filter(|nb| kp % nb == 0)
                .find(|&nb| dkv_smem(&TiledLayout { bv, nb, ..base }, elem) <= max_smem)
                .unwrap_or(FRAG);
            return Some(TiledLayout { bv, bk, nb, ..base });
        }
        c -= FRAG;
    }
    None
}

/// A chunk override for measuring ([`tuning`]): taken where it is a multiple of 16 the tiled
/// kernels hold (at most [`MAX_TILED_CHUNK`]).
fn chunk_tuning(name: &str) -> Option<usize> {
    tuning(name).filter(|c| c.is_multiple_of(FRAG) && (FRAG..=MAX_TILED_CHUNK).contains(c))
}

/// `p` with its gate taken as a vector gate: the problem GLA's walks see when simple GLA takes
/// them ([`simple_scores_route`]).
fn vector_gated(p: &GatedProblem) -> GatedProblem {
    GatedProblem {
        gate: GateKind::Vector,
        ..p.clone()
    }
}

/// Tile-size overrides for benchmarking (`FLA_TILED_PLANES`, `FLA_TILED_BV`, `FLA_TILED_CMMA=0`):
/// measurement aids, not a user setting; the defaults are what the measurements chose.
pub(crate) fn tuning(name: &str) -> Option<usize> {
    std::env::var(name).ok()?.parse().ok()
}

pub(crate) fn cube_dim(l: &TiledLayout) -> CubeDim {
    CubeDim::new_2d(PLANE as u32, l.tile.planes as u32)
}

fn cube_count(p: &GatedProblem, blocks: usize) -> CubeCount {
    CubeCount::Static(blocks as u32, p.heads as u32, p.num_seqs() as u32)
}

/// What [`split_forward`] needs of the device: shared memory per cube, its SM count (none on
/// wgpu) and the most cubes along a grid's x.
#[derive(Debug, Clone, Copy)]
struct DeviceSize {
    smem: usize,
    sms: Option<u32>,
    max_x: u32,
}

fn device_size<R: Runtime>(client: &ComputeClient<R>) -> DeviceSize {
    let hw = &client.properties().hardware;
    DeviceSize {
        smem: hw.max_shared_memory_size,
        sms: hw.num_streaming_multiprocessors,
        max_x: hw.max_cube_count.0,
    }
}

/// Positions per span of the forward's split (see [`split_forward`]): FLA's chunk.
const SPAN_TOKENS: usize = 64;

/// A split's layouts: the states pass (`walk`) and the span passes (`out`), with its spans per
/// sequence and the elements of its states buffer `[N, spans, H, K, V]`.
struct Split {
    walk: TiledLayout,
    out: TiledLayout,
    spans: usize,
    hs_len: usize,
}

/// The split (forward and backward), where it applies.
///
/// The fused walk ([`TiledLayout::span`] 0) runs one cube per value block, head and sequence
/// through every chunk, so it keeps only `V / bv · H · N` cubes busy: 256 at FLA's benchmark
/// shape (B = 8, H = 16, V = 128), enough for an H200's 132 SMs (one such cube fills an SM's
/// shared memory), but 32 at B = 1, a quarter of the GPU. The split runs a states pass (the same
/// walk keeping only the state's update, in chunks of 64 whatever the gate) that writes the
/// state entering each span of 64 positions, then one cube per span, value block, head and
/// sequence, all in parallel (FLA's `chunk_fwd_h` / `chunk_fwd_o`). It does the walk's work
/// plus the states pass and their round trip through memory, so it pays only where the walk
/// leaves SMs idle: taken where the walk's cubes would fill less than half of the device's SMs,
/// and where the device does not report them (wgpu). Measured on an H100 at FLA's shape (B = 8,
/// T = 4096, bf16, 2026-12-08): the split is slower there, as the rule has it (simple GLA
/// forward 2.59 ms against the walk's 2.06, GLA 4.02 against 2.60); the side of the rule where
/// it is taken (B = 1) is not yet timed. `FLA_TILED_SPLIT=1` forces the split and `=0` the
/// walk, for measuring. `None` also for one span, for states past 32-bit indices and for grids
/// past the device's cubes along x.
fn split_forward(p: &GatedProblem, l: &TiledLayout, device: DeviceSize) -> Option<Split> {
    let blocks = p.v_dim.div_ceil(l.bv).max(p.k_dim.div_ceil(l.bk));
    let walk_cubes = p.v_dim.div_ceil(l.bv) * p.heads * p.num_seqs();
    let idle = device.sms.is_none_or(|sms| 2 * walk_cubes < sms as usize);
    match tuning("FLA_TILED_SPLIT") {
        Some(0) => return None,
        Some(_) => {}
        None if !idle => return None,
        None => {}
    }
    // The longest span, a multiple of the chunk, whose states passes (forward and reverse) fit
    // in shared memory (lavapipe's is small) and whose scalar gates the cube's units cover (one
    // per position: `load_gates`).
    let elem = p.dtype.size();
    let walk = (1..=SPAN_TOKENS.max(l.chunk) / l.chunk)
        .rev()
        .map(|m| TiledLayout {
            chunk: m * l.chunk,
            states: true,
            ..*l
        })
        .find(|w| {
            fwd_smem(w, elem) <= device.smem
                && dkv_smem(w, elem) <= device.smem
                && w.tile.threads() >= w.chunk
        })?;
    let span_tokens = walk.chunk;
    let spans = p.longest().div_ceil(span_tokens);
    let hs_len = p.num_seqs() * spans * p.heads * p.k_dim * p.v_dim;
    if spans < 2 || hs_len > u32::MAX as usize || blocks * spans > device.max_x as usize {
        return None;
    }
    // The output pass has many cubes of a span each: fewer planes per cube can let several
    // share an SM (a measurement aid, `FLA_TILED_SPAN_PLANES`).
    let tile = TileConfig {
        planes: tuning("FLA_TILED_SPAN_PLANES").unwrap_or(l.tile.planes),
        ..l.tile
    };
    let out = TiledLayout {
        span: span_tokens / l.chunk,
        has_ht: false,
        tile,
        ..*l
    };
    Some(Split {
        walk,
        out,
        spans,
        hs_len,
    })
}

/// One launch of the forward kernel on `b`'s inputs: the fused walk, a states pass (writes
/// `hs`; `o` and `ht` unread) or the span passes (`h0` then holds the states in `hs`).
#[allow(clippy::too_many_arguments)]
fn forward_launch<R: Runtime>(
    client: &ComputeClient<R>,
    p: &GatedProblem,
    l: TiledLayout,
    blocks: usize,
    b: &ForwardBuffers<'_>,
    (a, cum): (&Handle, &Handle),
    (h0, h0_len): (&Handle, usize),
    (hs, hs_len, spans): (&Handle, usize, usize),
    (cu, cu_len): (&Handle, usize),
) {
    let dummy = client.create_from_slice(f32::as_bytes(&[0.0]));
    let (qk, vo) = p.lens();
    // Every access is guarded by the kernels' own conditions (rows in the sequence, columns
    // in K or V); the per-access bounds checks cost a third of the instructions.
    unsafe {
        tiled_fwd_kernel::launch_unchecked::<R>(
            client,
            cube_count(p, blocks),
            cube_dim(&l),
            array(b.q, qk),
            array(b.k, qk),
            array(b.v, vo),
            array(a, scores_len(p, &l)),
            array(&dummy, 1),
            array(&dummy, 1),
            array(b.g.unwrap_or(&dummy), b.g.map_or(1, |_| p.gate_len())),
            array(cum, cum_len(p, &l)),
            array(h0, h0_len),
            array(cu, cu_len),
            array(b.o, vo),
            array(b.ht.unwrap_or(&dummy), p.state_len()),
            array(hs, hs_len),
            p.seq_len as u32,
            spans as u32,
            p.scale,
            l,
            p.dtype.storage(),
        )
    };
}

/// Elements of the in-chunk scores under vector gates (`[B·T, H, C]`), 1 without them.
fn scores_len(p: &GatedProblem, l: &TiledLayout) -> usize {
    if l.vector_gate {
        p.tokens() * p.heads * l.chunk
    } else {
        1
    }
}

/// Elements of the vector gates cumulated from each chunk's start (`[B·T, H, K]` `f32`), 1
/// without them.
fn cum_len(p: &GatedProblem, l: &TiledLayout) -> usize {
    if l.vector_gate {
        p.gate_len()
    } else {
        1
    }
}

/// What [`vector_scores`] does with the in-chunk scores: sums them into a buffer of its own
/// (`Temporary`) or into the caller's (`Into`, a forward keeping them for its backward), or
/// takes those a forward kept (`Kept`) and only cumulates the gates.
#[derive(Clone, Copy)]
enum Scores<'a> {
    Temporary,
    Into(&'a Handle),
    Kept(&'a Handle),
}

/// The in-chunk scores and the gates cumulated from each chunk's start, under vector gates
/// ([`vector_scores_kernel`]), for the walks to read; placeholders without them.
fn vector_scores<R: Runtime>(
    client: &ComputeClient<R>,
    p: &GatedProblem,
    l: &TiledLayout,
    (q, k, g): (&Handle, &Handle, Option<&Handle>),
    (cu, cu_len): (&Handle, usize),
    scores: Scores<'_>,
) -> Result<(Handle, Handle), crate::KernelError> {
    let len = scores_len(p, l);
    if !l.vector_gate {
        let dummy = || client.create_from_slice(f32::as_bytes(&[0.0]));
        return Ok((dummy(), dummy()));
    }
    crate::problem::addressable(len, "the in-chunk scores")?;
    let g = need(g, "the vector gates")?;
    let (a, sum) = match scores {
        Scores::Temporary => (client.empty(len * p.dtype.size()), true),
        Scores::Into(h) => (h.clone(), true),
        Scores::Kept(h) => (h.clone(), false),
    };
    let cum = client.empty(4 * cum_len(p, l));
    // Every chunk is a cube of its own here, so fewer planes a cube let more cubes share an SM
    // and hide each other's latency (`FLA_GLA_SCORES_PLANES`, at most the walks' planes: a
    // measurement aid).
    let tile = TileConfig {
        planes: tuning("FLA_GLA_SCORES_PLANES")
            .filter(|&n| n > 0 && n <= l.tile.planes)
            .unwrap_or(l.tile.planes),
        ..l.tile
    };
    let l = TiledLayout {
        span: 0,
        states: false,
        tile,
        ..*l
    };
    let (qk, _) = p.lens();
    // Every access is guarded by the kernel's own conditions (rows in the sequence, columns in K).
    unsafe {
        vector_scores_kernel::launch_unchecked::<R>(
            client,
            chunk_grid(client, p, &l, 1),
            cube_dim(&l),
            array(q, qk),
            array(k, qk),
            array(g, p.gate_len()),
            array(cu, cu_len),
            array(&a, len),
            array(&cum, cum_len(p, &l)),
            p.seq_len as u32,
            p.scale,
            l,
            sum,
            sum && factored_scores_on(&l),
            sum && diag_regs_on(&l),
            p.dtype.storage(),
        )
    };
    Ok((a, cum))
}

/// The grid of an all-chunks kernel, `(X · blocks, head, sequence)`: X cubes per block along x,
/// one per chunk of the longest sequence as far as the grid goes; past that, each cube takes
/// every X-th chunk of its block.
fn chunk_grid<R: Runtime>(
    client: &ComputeClient<R>,
    p: &GatedProblem,
    l: &TiledLayout,
    blocks: usize,
) -> CubeCount {
    let x = p.longest().div_ceil(l.chunk).max(1);
    let x = x.min(device_size(client).max_x as usize / blocks).max(1);
    CubeCount::Static((x * blocks) as u32, p.heads as u32, p.num_seqs() as u32)
}

/// The in-chunk terms of `dq` and `dk` under vector gates ([`vector_grads_kernel`]), every chunk
/// in parallel, into partial `dq_slot` of `dq_part` (`dq_blocks` partials) and the partial of
/// `dk_part` after the `dk`/`dv` walk's `nv` value blocks (beside the `dq` register walk, which
/// takes vector gates only).
#[allow(clippy::too_many_arguments)]
fn vector_grads<R: Runtime>(
    client: &ComputeClient<R>,
    p: &GatedProblem,
    l: &TiledLayout,
    b: &BackwardBuffers<'_>,
    cum: &Handle,
    (dq_part, dq_blocks, dq_slot): (&Handle, usize, usize),
    (dk_part, nv): (&Handle, usize),
    (cu, cu_len): (&Handle, usize),
) {
    let l = TiledLayout {
        span: 0,
        states: false,
        ..*l
    };
    let (qk, vo) = p.lens();
    let nk = p.k_dim.div_ceil(l.bk);
    // Every access is guarded by the kernel's own conditions (rows in the sequence, columns in K
    // or V).
    unsafe {
        vector_grads_kernel::launch_unchecked::<R>(
            client,
            chunk_grid(client, p, &l, nk),
            cube_dim(&l),
            array(b.q, qk),
            array(b.k, qk),
            array(b.v, vo),
            array(b.d_o, vo),
            array(cum, cum_len(p, &l)),
            array(cu, cu_len),
            array(dq_part, dq_blocks * qk),
            array(dk_part, (nv + 1) * qk),
            (dq_slot * qk) as u32,
            (nv * qk) as u32,
            p.seq_len as u32,
            p.scale,
            l,
            factored_grads_on(&l),
            p.dtype.storage(),
        )
    };
}

/// The forward through the tiled kernel (checks done by the caller): the split of
/// [`split_forward`] where it applies, the fused walk elsewhere; under vector gates, the
/// in-chunk scores first.
pub(crate) fn tiled_forward<R: Runtime>(
    client: &ComputeClient<R>,
    p: &GatedProblem,
    l: TiledLayout,
    b: &ForwardBuffers<'_>,
    cu: (&Handle, usize),
) -> Result<(), crate::KernelError> {
    if let Some(lv) = simple_scores_route(client, p, &l, SIMPLE_FORWARD) {
        return simple_forward(client, p, lv, b, cu);
    }
    let dummy = client.create_from_slice(f32::as_bytes(&[0.0]));
    let nv = p.v_dim.div_ceil(l.bv);
    let h0 = (b.h0.unwrap_or(&dummy), p.state_len());
    let into = b.scores.map_or(Scores::Temporary, Scores::Into);
    let (a, cum) = vector_scores(client, p, &l, (b.q, b.k, b.g), cu, into)?;
    let scores = (&a, &cum);
    match split_forward(p, &l, device_size(client)) {
        Some(s) => {
            let hs = client.empty(4 * s.hs_len);
            let states = (&hs, s.hs_len, s.spans);
            // The states pass reads the raw gates (its chunks are longer).
            forward_launch(client, p, s.walk, nv, b, (&dummy, &dummy), h0, states, cu);
            let (blocks, h0) = (nv * s.spans, (&hs, s.hs_len));
            let states = (&dummy, 1, s.spans);
            forward_launch(client, p, s.out, blocks, b, scores, h0, states, cu);
        }
        None => match gla_fwd_registers(client, p, &l) {
            Some(fl) => gla_frag_forward(client, p, fl, b, scores, h0, cu),
            None => forward_launch(client, p, l, nv, b, scores, h0, (&dummy, 1, 1), cu),
        },
    }
    Ok(())
}

/// The layout of simple GLA's forward (or, with `backward`, its backward) through the
/// vector-gate walks, where it is taken (see [`simple_scores_route`]), for the chunk form at
/// `chunk`; `None` where it takes the scalar walks.
pub fn simple_scores_layout<R: Runtime>(
    client: &ComputeClient<R>,
    p: &GatedProblem,
    chunk: usize,
    backward: bool,
) -> Option<TiledLayout> {
    let l = tiled_layout(client, p, chunk)?;
    if backward {
        simple_backward_route(client, p, &l).map(|r| r.walks)
    } else {
        simple_scores_route(client, p, &l, SIMPLE_FORWARD)
    }
}

/// The bits of `FLA_SIMPLE_SCORES`: simple GLA's forward ([`simple_forward`]) and backward
/// (in [`tiled_backward`]) through the vector-gate walks.
const SIMPLE_FORWARD: usize = 1;
const SIMPLE_BACKWARD: usize = 2;

/// Simple GLA (a scalar gate) through GLA's walks: its in-chunk scores and cumulated gates by
/// a kernel of their own ([`scalar_scores_kernel`], every chunk in parallel: one tile product
/// `Q Kᵀ` and the decay), which the vector-gate walks read as they read
/// [`vector_scores_kernel`]'s. On CUDA in half precision those walks keep their state in
/// registers ([`super::frag`]).
/// - Forward (`FLA_SIMPLE_SCORES` bit 1): the vector forward walk. The scalar walk it replaces
///   ([`tiled_fwd_kernel`] with `scalar_gate`) sums `Q Kᵀ` again for each value block and keeps
///   the state in shared memory; on an H100 it took 1.72 ms of `chunk_simple_gla`'s 2.0 ms
///   forward at B = 8, H = 16, K = V = 128, T = 4096, where FLA's whole forward takes 0.5
///   (2026-12-07, CubeCL's profiler).
/// - Backward (bit 2): the vector `dk`/`dv` walk (the scalar one took 2.63 ms of the backward's
///   6.2 there) for `dk`'s state term and `dv`; the scalar `dq` walk (1.57 ms there) for `dq`'s
///   state term alone; the in-chunk terms of both from [`scalar_grads_kernel`], every chunk in
///   parallel.
///
/// The cost for the tiled vector walks (lavapipe; `f32` on CUDA): `Λ` repeated over the keys
/// (`[B·T, H, K]` `f32`, written once and read by each value block's walk); the register walks
/// read it once per position (`GlaFragLayout::scalar_gate`).
///
/// Opt-in: slower than the scalar walks where it was timed (H100, 2026-12-08, T = 4096, bf16,
/// B = 8, H = 16, K = V = 128: forward 2.34 ms against 1.93, forward+backward 8.51 against
/// 6.99; the `dk`/`dv` register walk takes 2.54 ms at chunks of 64 where GLA's takes 1.38 at
/// its 32; at `FLA_SIMPLE_CHUNK=32` the forward is 1.83, the backward slower still). Tested on
/// lavapipe and CUDA (`chunk_simple_gla_through_scores`). Taken for scalar gates where the
/// forward does not split ([`split_forward`]: the states pass there reads the raw gates), at the
/// chunk the scalar walk takes or the largest multiple of 16 below it where the vector forward
/// and `dk`/`dv` walks' tiles fit with [`scalar_scores_kernel`]'s (`FLA_SIMPLE_CHUNK` overrides
/// the start, for measuring). The backward ([`simple_backward_route`]) is not taken where no
/// tiling of [`scalar_grads_kernel`], or of the scalar `dq` walk, fits at that chunk.
fn simple_scores_route<R: Runtime>(
    client: &ComputeClient<R>,
    p: &GatedProblem,
    l: &TiledLayout,
    which: usize,
) -> Option<TiledLayout> {
    if tuning("FLA_SIMPLE_SCORES").unwrap_or(0) & which == 0
        || !l.scalar_gate
        || l.delta
        || split_forward(p, l, device_size(client)).is_some()
    {
        return None;
    }
    let c = chunk_tuning("FLA_SIMPLE_CHUNK").unwrap_or(l.chunk);
    // The route runs the scalar `dq` walk ([`SimpleBackward::dq`]), not the vector one.
    layout_from(client, &vector_gated(p), c, scalar_scores_smem, false)
}

/// The layouts of simple GLA's backward on the route: the vector walks' (`walks`, from
/// [`simple_scores_route`]), the scalar `dq` walk's at their chunk and [`scalar_grads_kernel`]'s.
#[derive(Clone, Copy)]
struct SimpleBackward {
    walks: TiledLayout,
    dq: TiledLayout,
    grads: TiledLayout,
}

/// Simple GLA's backward through the vector-gate walks, where it is taken: the route's
/// conditions, and the scalar `dq` walk and [`scalar_grads_kernel`] fit at the walks' chunk.
fn simple_backward_route<R: Runtime>(
    client: &ComputeClient<R>,
    p: &GatedProblem,
    l: &TiledLayout,
) -> Option<SimpleBackward> {
    let walks = simple_scores_route(client, p, l, SIMPLE_BACKWARD)?;
    Some(SimpleBackward {
        walks,
        dq: simple_dq_layout(client, p, &walks)?,
        grads: scalar_grads_layout(client, p, &walks)?,
    })
}

/// The scalar `dq` walk's layout on the route, at the vector walks' chunk (`lv.chunk`): it
/// writes `dq`'s state term, and [`scalar_grads_kernel`] the in-chunk one for the same chunks.
fn simple_dq_layout<R: Runtime>(
    client: &ComputeClient<R>,
    p: &GatedProblem,
    lv: &TiledLayout,
) -> Option<TiledLayout> {
    layout_from(client, p, lv.chunk, scores_smem, true).filter(|l| l.chunk == lv.chunk)
}

/// [`scalar_grads_kernel`]'s layout beside the walks' `lv`: the widest value block (64 at most)
/// and key column block that fit in shared memory.
fn scalar_grads_layout<R: Runtime>(
    client: &ComputeClient<R>,
    p: &GatedProblem,
    lv: &TiledLayout,
) -> Option<TiledLayout> {
    let smem = client.properties().hardware.max_shared_memory_size;
    let elem = p.dtype.size();
    let nbs = [lv.kp, 64, 32, 16];
    [64, 32, 16]
        .into_iter()
        .filter(|&bv| bv <= lv.vp.max(FRAG))
        .flat_map(|bv| {
            nbs.into_iter()
                .filter(|&nb| lv.kp.is_multiple_of(nb))
                .map(move |nb| TiledLayout {
                    bv,
                    nb,
                    scalar_gate: true,
                    vector_gate: false,
                    ..*lv
                })
        })
        .find(|ld| scalar_grads_smem(ld, elem) <= smem)
}

/// Simple GLA's in-chunk scores and cumulated gates at the vector walks' layout `lv`
/// ([`scalar_scores_kernel`]): `(a, Λ)` as [`vector_scores`] gives them, or with `compact` `Λ`
/// once per position, for a register walk to read ([`simple_cum_len`] elements).
fn scalar_scores<R: Runtime>(
    client: &ComputeClient<R>,
    p: &GatedProblem,
    lv: &TiledLayout,
    (q, k, g): (&Handle, &Handle, Option<&Handle>),
    (cu, cu_len): (&Handle, usize),
    compact: bool,
) -> Result<(Handle, Handle), crate::KernelError> {
    let len = p.tokens() * p.heads * lv.chunk;
    let cum_len = simple_cum_len(p, compact);
    crate::problem::addressable(len, "the in-chunk scores")?;
    crate::problem::addressable(cum_len, "the cumulated gates")?;
    let a = client.empty(len * p.dtype.size());
    let cum = client.empty(4 * cum_len);
    let ls = TiledLayout {
        scalar_gate: true,
        vector_gate: false,
        ..*lv
    };
    let (qk, _) = p.lens();
    // Every access is guarded by the kernel's own conditions (rows in the sequence, columns in K).
    unsafe {
        scalar_scores_kernel::launch_unchecked::<R>(
            client,
            chunk_grid(client, p, &ls, 1),
            cube_dim(&ls),
            array(q, qk),
            array(k, qk),
            array(need(g, "the scalar gates")?, p.gate_len()),
            array(cu, cu_len),
            array(&a, len),
            array(&cum, cum_len),
            p.seq_len as u32,
            p.scale,
            ls,
            compact,
            p.dtype.storage(),
        )
    };
    Ok((a, cum))
}

/// Elements of simple GLA's `Λ` on the route: `[B·T, H, K]`, or `[B·T, H]` when `compact`.
fn simple_cum_len(p: &GatedProblem, compact: bool) -> usize {
    p.tokens() * p.heads * if compact { 1 } else { p.k_dim }
}

/// The in-chunk terms of simple GLA's `dq` and `dk` ([`scalar_grads_kernel`] at its layout
/// `ld`) into partial `q_slot` of `dq_part` and `k_slot` of `dk_part`, every chunk in parallel.
fn scalar_grads<R: Runtime>(
    client: &ComputeClient<R>,
    p: &GatedProblem,
    ld: TiledLayout,
    b: &BackwardBuffers<'_>,
    (dq_part, q_blocks, q_slot): (&Handle, usize, usize),
    (dk_part, k_blocks, k_slot): (&Handle, usize, usize),
    (cu, cu_len): (&Handle, usize),
) -> Result<(), crate::KernelError> {
    let (qk, vo) = p.lens();
    // Every access is guarded by the kernel's own conditions (rows in the sequence, columns in K
    // or V).
    unsafe {
        scalar_grads_kernel::launch_unchecked::<R>(
            client,
            chunk_grid(client, p, &ld, 1),
            cube_dim(&ld),
            array(b.q, qk),
            array(b.k, qk),
            array(b.v, vo),
            array(b.d_o, vo),
            array(need(b.g, "the scalar gates")?, p.gate_len()),
            array(cu, cu_len),
            array(dq_part, q_blocks * qk),
            array(dk_part, k_blocks * qk),
            (q_slot * qk) as u32,
            (k_slot * qk) as u32,
            p.seq_len as u32,
            p.scale,
            ld,
            p.dtype.storage(),
        )
    };
    Ok(())
}

/// Simple GLA's forward through the vector-gate walks ([`simple_scores_route`]), at their
/// layout `lv`.
fn simple_forward<R: Runtime>(
    client: &ComputeClient<R>,
    p: &GatedProblem,
    lv: TiledLayout,
    b: &ForwardBuffers<'_>,
    (cu, cu_len): (&Handle, usize),
) -> Result<(), crate::KernelError> {
    // The walks' layouts are a vector gate's (the tiled walk reads `Λ` with a column per key).
    let pv = vector_gated(p);
    // The register walk reads `Λ` once per position (the scalar problem's gate length).
    let frag = gla_fwd_registers(client, &pv, &lv);
    let scores = (b.q, b.k, b.g);
    let (a, cum) = scalar_scores(client, p, &lv, scores, (cu, cu_len), frag.is_some())?;
    let dummy = client.create_from_slice(f32::as_bytes(&[0.0]));
    let h0 = (b.h0.unwrap_or(&dummy), p.state_len());
    // The vector walks read `Λ`, not the raw gates.
    let b = ForwardBuffers {
        g: None,
        scores: None,
        ..*b
    };
    match frag {
        Some(fl) => {
            let fl = GlaFragLayout {
                scalar_gate: true,
                ..fl
            };
            gla_frag_forward(client, p, fl, &b, (&a, &cum), h0, (cu, cu_len));
        }
        None => {
            let nv = p.v_dim.div_ceil(lv.bv);
            let none = (&dummy, 1, 1);
            forward_launch(client, &pv, lv, nv, &b, (&a, &cum), h0, none, (cu, cu_len));
        }
    }
    Ok(())
}

/// The register walks GLA's chunk form takes by default (bits of `FLA_GLA_FRAG`): the forward
/// (1) and `dk`/`dv` (2). On an H100 (bf16, B = 8, H = 16, K = V = 128, T = 4096, one call) they
/// took `chunk_gla` from 3.459 / 11.796 ms (forward / forward+backward, tiled walks) to 3.075 /
/// 10.499, and their whole CUDA test set passed. The `dq` walk (4) passed too but was slower
/// (11.558 with all three): it stays off. `FLA_GLA_FRAG=0` turns them all off.
pub const DEFAULT_GLA_FRAG: usize = 3;

/// The layout of GLA's forward walk with the state in tensor-core registers
/// ([`super::frag::gla_fwd_frag_kernel`]) for a call the fused walk `l` takes, where it applies
/// ([`gla_frag_layout`]); value blocks of 64 (`FLA_GLA_FRAG_BV` overrides, for measuring).
pub fn gla_fwd_registers<R: Runtime>(
    client: &ComputeClient<R>,
    p: &GatedProblem,
    l: &TiledLayout,
) -> Option<GlaFragLayout> {
    gla_frag_layout(client, p, l, 1, &frag_widths(l), gla_frag_fwd_smem)
}

/// The layout of GLA's `dq` walk with the state in registers
/// ([`super::frag::gla_dq_frag_kernel`]), where it applies ([`gla_frag_layout`]): value blocks
/// as the forward's.
pub fn gla_dq_registers<R: Runtime>(
    client: &ComputeClient<R>,
    p: &GatedProblem,
    l: &TiledLayout,
) -> Option<GlaFragLayout> {
    gla_frag_layout(client, p, l, 4, &frag_widths(l), gla_frag_dq_smem)
}

/// Value blocks the forward and `dq` register walks try, widest first: 64 at most
/// (`FLA_GLA_FRAG_BV` overrides, for measuring).
fn frag_widths(l: &TiledLayout) -> Vec<usize> {
    let bv_max = tuning("FLA_GLA_FRAG_BV").unwrap_or(64).min(l.vp);
    [256, 128, 64, 32, 16]
        .into_iter()
        .filter(|&bv| bv <= bv_max.max(FRAG))
        .collect()
}

/// The layout of GLA's `dk`/`dv` walk with the state's gradient in registers
/// ([`super::frag::gla_dkv_frag_kernel`]), where it applies ([`gla_frag_layout`]): the fused
/// walk's value blocks, as the partial `dk` buffer has one partial per block.
pub fn gla_dkv_registers<R: Runtime>(
    client: &ComputeClient<R>,
    p: &GatedProblem,
    l: &TiledLayout,
) -> Option<GlaFragLayout> {
    gla_frag_layout(client, p, l, 2, &[l.bv], gla_frag_dkv_smem)
}

/// A register walk's layout, the first of the value blocks `widths` that tiles and fits: vector
/// gates walked forwards (no split, no delta rule, no reversed sequences), CUDA with `mma.sync`
/// and `ldmatrix` for the dtype. `FLA_GLA_FRAG` picks the walks, a bit per walk (`which`: 1 the
/// forward, 2 `dk`/`dv`, 4 `dq`); the default is [`DEFAULT_GLA_FRAG`]. `FLA_GLA_FRAG_PLANES`
/// overrides their planes (4, 8 past K = 128), for measuring.
fn gla_frag_layout<R: Runtime>(
    client: &ComputeClient<R>,
    p: &GatedProblem,
    l: &TiledLayout,
    which: usize,
    widths: &[usize],
    smem_of: fn(&GlaFragLayout, usize) -> usize,
) -> Option<GlaFragLayout> {
    if tuning("FLA_GLA_FRAG").unwrap_or(DEFAULT_GLA_FRAG) & which == 0
        || !l.vector_gate
        || l.delta
        || l.reverse
        || l.states
        || l.span > 0
        || !registers_available(client, p.dtype)
    {
        return None;
    }
    // Planes share the output's 16-row groups evenly, and each owns at most two of the state's
    // (16 × bv accumulators each: 64 registers a lane at bv = 64).
    let groups = l.chunk / FRAG;
    let planes = tuning("FLA_GLA_FRAG_PLANES").unwrap_or(if l.kp > 128 { 8 } else { 4 });
    let max_planes = client.properties().hardware.max_units_per_cube as usize / PLANE;
    if planes == 0 || !planes.is_multiple_of(groups) || planes > max_planes {
        return None;
    }
    let staging = Staging {
        vector: widest_vector(&[p.k_dim, p.v_dim, l.chunk]),
        ph: l.ph,
        threads: planes * PLANE,
    };
    let smem = client.properties().hardware.max_shared_memory_size;
    widths
        .iter()
        .map(|&bv| GlaFragLayout {
            heads: p.heads,
            k: p.k_dim,
            v: p.v_dim,
            kp: l.kp,
            chunk: l.chunk,
            bv,
            planes,
            ow: bv * groups / planes,
            varlen: l.varlen,
            has_h0: l.has_h0,
            has_ht: l.has_ht,
            scalar_gate: false,
            staging,
        })
        .find(|fl| {
            // At most 64 accumulator registers a lane for the state (two groups at bv = 64):
            // more would spill.
            fl.ow >= FRAG
                && (fl.bv * groups).is_multiple_of(planes * FRAG)
                && fl.groups_per_plane() * fl.bv <= 128
                && smem_of(fl, p.dtype.size()) <= smem
        })
}

/// The register walks' cubes: `(value block, head, sequence)`.
fn frag_grid(p: &GatedProblem, fl: &GlaFragLayout) -> CubeCount {
    let blocks = p.v_dim.div_ceil(fl.bv) as u32;
    CubeCount::Static(blocks, p.heads as u32, p.num_seqs() as u32)
}

/// The forward walk with the state in registers (the scores and cumulated gates computed).
#[allow(clippy::too_many_arguments)]
fn gla_frag_forward<R: Runtime>(
    client: &ComputeClient<R>,
    p: &GatedProblem,
    fl: GlaFragLayout,
    b: &ForwardBuffers<'_>,
    (a, cum): (&Handle, &Handle),
    (h0, h0_len): (&Handle, usize),
    (cu, cu_len): (&Handle, usize),
) {
    let dummy = client.create_from_slice(f32::as_bytes(&[0.0]));
    let (qk, vo) = p.lens();
    let vs = fl.staging.vector;
    let scores = p.tokens() * p.heads * fl.chunk;
    // Every access is guarded by the kernel's own conditions (rows in the sequence, columns in
    // K or V); `q`, `k`, `v` and the scores are read in vectors of `vs` entries.
    unsafe {
        gla_fwd_frag_kernel::launch_unchecked::<R>(
            client,
            frag_grid(p, &fl),
            CubeDim::new_2d(PLANE as u32, fl.planes as u32),
            vs,
            array(b.q, qk / vs),
            array(b.k, qk / vs),
            array(b.v, vo / vs),
            array(a, scores / vs),
            array(cum, p.gate_len()),
            array(h0, h0_len),
            array(cu, cu_len),
            array(b.o, vo),
            array(b.ht.unwrap_or(&dummy), p.state_len()),
            p.seq_len as u32,
            p.scale,
            fl,
            p.dtype.storage(),
        )
    };
}

/// The backward through the tiled kernels: `dv`, `dh0`, and `dq`, `dk` with the key gate's term
/// of the identity (returned, `f32` `[B·T, H, K]`) for the gate gradient. Where the forward
/// splits ([`split_forward`]), so does the backward: the forward's states pass runs again (FLA
/// recomputes its states too), `dq` runs per span from them, a reverse states pass leaves the
/// state's gradient at each span's end in the same buffer, and `dk`, `dv` run per span from it.
pub(crate) fn tiled_backward<R: Runtime>(
    client: &ComputeClient<R>,
    p: &GatedProblem,
    l: TiledLayout,
    b: &BackwardBuffers<'_>,
    (cu, cu_len): (&Handle, usize),
) -> Result<Option<Handle>, crate::KernelError> {
    let dummy = client.create_from_slice(f32::as_bytes(&[0.0]));
    let (qk, vo) = p.lens();
    // Simple GLA through the vector-gate `dk`/`dv` walk (`FLA_SIMPLE_SCORES` bit 2, see
    // [`simple_backward_route`]): that walk at the vector layout `lw` on the scores and `Λ` of
    // [`scalar_scores_kernel`], `dq`'s state term from the scalar walk at the same chunk, and
    // the in-chunk terms of both (which those walks leave to others) from
    // [`scalar_grads_kernel`].
    let route = simple_backward_route(client, p, &l);
    let pv = vector_gated(p);
    let (pw, lw) = match route {
        Some(r) => (&pv, r.walks),
        None => (p, l),
    };
    let nv = p.v_dim.div_ceil(lw.bv);
    // The `dq` walk's layout (on the route at the vector walks' chunk).
    let lq = route.map_or(l, |r| r.dq);
    let nk = p.k_dim.div_ceil(lq.bk);
    // The route is taken only where the forward does not split.
    let split = route
        .is_none()
        .then(|| split_forward(p, &l, device_size(client)))
        .flatten();
    // The `dq` walk with the state in registers writes one partial per value block of its own.
    let dq_frag = split
        .is_none()
        .then(|| gla_dq_registers(client, p, &l))
        .flatten();
    // One partial `dk` per value block and, under vector gates, one more for the in-chunk term
    // (the tiled `dq` walk's, or `vector_grads_kernel`'s beside the `dq` register walk, which
    // writes one partial of `dq` per value block of its own and leaves `dq`'s in-chunk term to
    // one more; on the route, `scalar_grads_kernel`'s, which also writes `dq`'s in-chunk term
    // beside the walk's state term), indexed in 32 bits: the inputs' own check does not cover
    // them.
    let dk_blocks = nv + usize::from(lw.vector_gate);
    let dq_blocks = match (dq_frag, route) {
        (Some(fl), _) => p.v_dim.div_ceil(fl.bv) + 1,
        (None, Some(_)) => 2,
        (None, None) => 1,
    };
    crate::problem::addressable(dk_blocks * qk, "the tiled backward's partial dk")?;
    crate::problem::addressable(dq_blocks * qk, "the tiled backward's partial dq")?;
    let dq_part = client.empty(4 * dq_blocks * qk);
    let dk_part = client.empty(4 * dk_blocks * qk);
    // The `dk`/`dv` walk in registers, where it applies; on the route it reads `Λ` once per
    // position (the only walk here that reads it: the scalar `dq` walk reads the raw gates).
    let dkv_frag = split
        .is_none()
        .then(|| gla_dkv_registers(client, pw, &lw))
        .flatten()
        .map(|fl| GlaFragLayout {
            scalar_gate: route.is_some(),
            ..fl
        });
    let (a, cum) = match route {
        Some(r) => {
            let compact = dkv_frag.is_some();
            scalar_scores(client, p, &r.walks, (b.q, b.k, b.g), (cu, cu_len), compact)?
        }
        None => {
            let kept = b.scores.map_or(Scores::Temporary, Scores::Kept);
            vector_scores(client, p, &l, (b.q, b.k, b.g), (cu, cu_len), kept)?
        }
    };
    // `Λ`'s length: per key under vector gates, a placeholder under scalar ones; on the route
    // per key, or per position where the register walk reads it.
    let cum_n = match route {
        Some(_) => simple_cum_len(p, dkv_frag.is_some()),
        None => cum_len(p, &l),
    };
    let dh0 = if p.has_initial_state {
        need(b.dh0, "dh0")?
    } else {
        &dummy
    };
    let h0 = b.h0.unwrap_or(&dummy);
    let d_ht = b.d_ht.unwrap_or(&dummy);
    // Every access is guarded by the kernels' own conditions (rows in the sequence, columns
    // in K or V); the per-access bounds checks cost a third of the instructions.
    // `in_chunk`: the walk sums `dq`'s in-chunk term too (everywhere but the route).
    let dq = |l: TiledLayout,
              blocks: usize,
              (h0, h0_len): (&Handle, usize),
              spans: usize,
              in_chunk: bool| unsafe {
        tiled_dq_kernel::launch_unchecked::<R>(
            client,
            cube_count(p, blocks),
            cube_dim(&l),
            array(b.k, qk),
            array(b.v, vo),
            array(b.g.unwrap_or(&dummy), p.gate_len()),
            array(&cum, cum_n),
            array(h0, h0_len),
            array(cu, cu_len),
            array(b.d_o, vo),
            array(&dq_part, dq_blocks * qk),
            array(b.q, qk),
            array(&dk_part, dk_blocks * qk),
            (nv * qk) as u32,
            p.seq_len as u32,
            spans as u32,
            p.scale,
            l,
            factored_grads_on(&l),
            in_chunk,
            p.dtype.storage(),
        )
    };
    let dkv = |l: TiledLayout,
               blocks: usize,
               (d_ht, has_dht): (&Handle, bool),
               (hs, hs_len): (&Handle, usize),
               spans: usize| unsafe {
        tiled_dkv_kernel::launch_unchecked::<R>(
            client,
            cube_count(p, blocks),
            cube_dim(&l),
            array(b.q, qk),
            array(b.k, qk),
            array(b.v, vo),
            array(&a, scores_len(p, &l)),
            array(b.g.unwrap_or(&dummy), p.gate_len()),
            array(&cum, cum_n),
            array(cu, cu_len),
            array(b.d_o, vo),
            array(d_ht, p.state_len().max(hs_len)),
            array(&dk_part, dk_blocks * qk),
            array(b.dv, vo),
            array(dh0, p.state_len()),
            array(hs, hs_len),
            p.seq_len as u32,
            spans as u32,
            qk as u32,
            p.scale,
            l,
            has_dht,
            p.dtype.storage(),
        )
    };
    match split {
        Some(Split {
            walk,
            out,
            spans,
            hs_len,
        }) => {
            let hs = client.empty(4 * hs_len);
            // The forward's states pass alone (no `ht`), on the backward's inputs.
            let walk = TiledLayout {
                has_ht: false,
                ..walk
            };
            let inputs = ForwardBuffers {
                q: b.q,
                k: b.k,
                v: b.v,
                g: b.g,
                gv: None,
                h0: b.h0,
                o: &dummy,
                ht: None,
                scores: None,
            };
            let states = (&hs, hs_len, spans);
            let h0 = (h0, p.state_len());
            forward_launch(
                client,
                p,
                walk,
                nv,
                &inputs,
                (&dummy, &dummy),
                h0,
                states,
                (cu, cu_len),
            );
            dq(out, nk * spans, (&hs, hs_len), spans, true);
            // The reverse states pass overwrites `hs` with the gradients: the launches run in
            // order on one stream, so `dq` has read the states by then.
            dkv(walk, nv, (d_ht, b.d_ht.is_some()), (&hs, hs_len), spans);
            let out = TiledLayout {
                has_h0: false,
                ..out
            };
            dkv(out, nv * spans, (&hs, true), (&dummy, 1), spans);
        }
        None => {
            match dq_frag {
                Some(fl) => {
                    let h0 = (h0, p.state_len());
                    gla_frag_dq(
                        client,
                        p,
                        fl,
                        b,
                        &cum,
                        h0,
                        (&dq_part, dq_blocks),
                        (cu, cu_len),
                    );
                    let parts = (&dq_part, dq_blocks, dq_blocks - 1);
                    vector_grads(client, p, &l, b, &cum, parts, (&dk_part, nv), (cu, cu_len));
                }
                None => dq(lq, nk, (h0, p.state_len()), 1, route.is_none()),
            }
            if let Some(r) = route {
                let dq_parts = (&dq_part, dq_blocks, 1);
                let dk_parts = (&dk_part, dk_blocks, nv);
                scalar_grads(client, p, r.grads, b, dq_parts, dk_parts, (cu, cu_len))?;
            }
            match dkv_frag {
                Some(fl) => {
                    let (a, cum) = (&a, &cum);
                    let d_ht = (d_ht, b.d_ht.is_some());
                    // On the route the scalar problem: `Λ` has its gate's length.
                    gla_frag_dkv(
                        client,
                        p,
                        fl,
                        b,
                        (a, cum),
                        d_ht,
                        (&dk_part, dk_blocks),
                        dh0,
                        (cu, cu_len),
                    );
                }
                None => dkv(lw, nv, (d_ht, b.d_ht.is_some()), (&dummy, 1), 1),
            }
        }
    }
    let key_term = finalize_qk_grads(client, p, b, (&dq_part, dq_blocks), (&dk_part, dk_blocks));
    Ok(key_term)
}

/// The `dq` walk with the state in registers (its state term, one partial per value block of
/// `fl` into `dq_part`; the cumulated gates computed).
#[allow(clippy::too_many_arguments)]
fn gla_frag_dq<R: Runtime>(
    client: &ComputeClient<R>,
    p: &GatedProblem,
    fl: GlaFragLayout,
    b: &BackwardBuffers<'_>,
    cum: &Handle,
    (h0, h0_len): (&Handle, usize),
    (dq_part, dq_blocks): (&Handle, usize),
    (cu, cu_len): (&Handle, usize),
) {
    let (qk, vo) = p.lens();
    let vs = fl.staging.vector;
    // Every access is guarded by the kernel's own conditions (rows in the sequence, columns in
    // K or V); `k`, `v` and `d_o` are read in vectors of `vs` entries.
    unsafe {
        gla_dq_frag_kernel::launch_unchecked::<R>(
            client,
            frag_grid(p, &fl),
            CubeDim::new_2d(PLANE as u32, fl.planes as u32),
            vs,
            array(b.k, qk / vs),
            array(b.v, vo / vs),
            array(cum, p.gate_len()),
            array(h0, h0_len),
            array(cu, cu_len),
            array(b.d_o, vo / vs),
            array(dq_part, dq_blocks * qk),
            p.seq_len as u32,
            qk as u32,
            p.scale,
            fl,
            p.dtype.storage(),
        )
    };
}

/// The `dk`/`dv` walk with the state's gradient in registers (the scores and cumulated gates
/// computed; `dk_part` holds one partial per value block of `fl`, the fused walk's).
#[allow(clippy::too_many_arguments)]
fn gla_frag_dkv<R: Runtime>(
    client: &ComputeClient<R>,
    p: &GatedProblem,
    fl: GlaFragLayout,
    b: &BackwardBuffers<'_>,
    (a, cum): (&Handle, &Handle),
    (d_ht, has_dht): (&Handle, bool),
    (dk_part, dk_blocks): (&Handle, usize),
    dh0: &Handle,
    (cu, cu_len): (&Handle, usize),
) {
    let (qk, vo) = p.lens();
    let vs = fl.staging.vector;
    let scores = p.tokens() * p.heads * fl.chunk;
    // Every access is guarded by the kernel's own conditions (rows in the sequence, columns in
    // K or V); `q`, `k`, `v`, `d_o` and the scores are read in vectors of `vs` entries.
    unsafe {
        gla_dkv_frag_kernel::launch_unchecked::<R>(
            client,
            frag_grid(p, &fl),
            CubeDim::new_2d(PLANE as u32, fl.planes as u32),
            vs,
            array(b.q, qk / vs),
            array(b.k, qk / vs),
            array(b.v, vo / vs),
            array(a, scores / vs),
            array(cum, p.gate_len()),
            array(cu, cu_len),
            array(b.d_o, vo / vs),
            array(d_ht, p.state_len()),
            array(dk_part, dk_blocks * qk),
            array(b.dv, vo),
            array(dh0, p.state_len()),
            p.seq_len as u32,
            qk as u32,
            p.scale,
            fl,
            has_dht,
            p.dtype.storage(),
        )
    };
}
