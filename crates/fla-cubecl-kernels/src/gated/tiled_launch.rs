//! Host side of the tiled chunk kernels ([`super::tiled`]): which calls they take, their tile
//! sizes from the device's limits, and the launches.

use cubecl::ir::features::MmaConfig;
use cubecl::prelude::*;
use cubecl::server::Handle;

use super::launch::{
    array, finalize_qk_grads, is_cpu_vulkan, need, BackwardBuffers, ForwardBuffers,
};
use super::tiled::{
    dkv_smem, dq_smem, fwd_smem, tiled_dkv_kernel, tiled_dq_kernel, tiled_fwd_kernel, TiledLayout,
};
use super::{GateKind, GatedProblem};
use crate::tile::{TileConfig, FRAG, PLANE};
use crate::FloatDType;

/// Largest chunk the tiled kernels take (shared memory grows with its square).
const MAX_TILED_CHUNK: usize = 64;

/// Whether the tiled kernels run 16×16×16 tensor-core products of `dtype` into `f32` on this
/// device. CUDA only for now: Vulkan reports cooperative matrices too, but the tiled kernels'
/// `cmma` path has been tested on CUDA alone (an H100), so wgpu takes the plain path, which CI
/// tests on lavapipe, until it is tested there as well.
pub fn has_cmma<R: Runtime>(client: &ComputeClient<R>, dtype: FloatDType) -> bool {
    if dtype == FloatDType::F32 || !R::name(client).contains("cuda") {
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
/// one, or the largest multiple of 16 below it that fits, and 16 for vector gates (the result
/// differs only by rounding).
pub fn tiled_layout<R: Runtime>(
    client: &ComputeClient<R>,
    p: &GatedProblem,
    chunk: usize,
) -> Option<TiledLayout> {
    if p.value_gate || !chunk.is_multiple_of(FRAG) || chunk == 0 {
        return None;
    }
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
    // Vector gates take chunks of one fragment: their intra-chunk terms are computed entry by
    // entry (`C` multiply-adds and exponentials per key per position), so a short chunk keeps
    // them as cheap per position as the tile products, and it needs no sub-chunking.
    let mut c = if p.gate == GateKind::Vector {
        FRAG
    } else {
        chunk.min(MAX_TILED_CHUNK)
    };
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
            tile,
        };
        let widths = |limit: usize| {
            [64, 32, 16]
                .into_iter()
                .filter(move |&w| w <= limit.max(FRAG))
        };
        let bv_max = tuning("FLA_TILED_BV").unwrap_or(64);
        let bv = widths(vp.min(bv_max)).find(|&bv| {
            let l = TiledLayout { bv, ..base };
            fwd_smem(&l, elem) <= max_smem && dkv_smem(&l, elem) <= max_smem
        });
        let bk = widths(kp).find(|&bk| dq_smem(&TiledLayout { bk, ..base }, elem) <= max_smem);
        if let (Some(bv), Some(bk)) = (bv, bk) {
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

/// The forward through the tiled kernel (checks done by the caller).
pub(crate) fn tiled_forward<R: Runtime>(
    client: &ComputeClient<R>,
    p: &GatedProblem,
    l: TiledLayout,
    b: &ForwardBuffers<'_>,
    (cu, cu_len): (&Handle, usize),
) {
    let dummy = client.create_from_slice(f32::as_bytes(&[0.0]));
    let (qk, vo) = (
        p.tokens() * p.heads * p.k_dim,
        p.tokens() * p.heads * p.v_dim,
    );
    // Every access is guarded by the kernels' own conditions (rows in the sequence, columns
    // in K or V); the per-access bounds checks cost a third of the instructions.
    unsafe {
        tiled_fwd_kernel::launch_unchecked::<R>(
            client,
            cube_count(p, p.v_dim.div_ceil(l.bv)),
            cube_dim(&l),
            array(b.q, qk),
            array(b.k, qk),
            array(b.v, vo),
            array(&dummy, 1),
            array(&dummy, 1),
            array(b.g.unwrap_or(&dummy), p.gate_len()),
            array(b.h0.unwrap_or(&dummy), p.state_len()),
            array(cu, cu_len),
            array(b.o, vo),
            array(b.ht.unwrap_or(&dummy), p.state_len()),
            p.seq_len as u32,
            p.scale,
            l,
            p.dtype.storage(),
        )
    };
}

/// The backward through the tiled kernels: `dv`, `dh0`, and `dq`, `dk` with the key gate's term
/// of the identity (returned, `f32` `[B·T, H, K]`) for the gate gradient.
pub(crate) fn tiled_backward<R: Runtime>(
    client: &ComputeClient<R>,
    p: &GatedProblem,
    l: TiledLayout,
    b: &BackwardBuffers<'_>,
    (cu, cu_len): (&Handle, usize),
) -> Result<Option<Handle>, crate::KernelError> {
    let dummy = client.create_from_slice(f32::as_bytes(&[0.0]));
    let (qk, vo) = (
        p.tokens() * p.heads * p.k_dim,
        p.tokens() * p.heads * p.v_dim,
    );
    let nv = p.v_dim.div_ceil(l.bv);
    let dq_part = client.empty(4 * qk);
    let dk_part = client.empty(4 * nv * qk);
    let dh0 = if p.has_initial_state {
        need(b.dh0, "dh0")?
    } else {
        &dummy
    };
    // Every access is guarded by the kernels' own conditions (rows in the sequence, columns
    // in K or V); the per-access bounds checks cost a third of the instructions.
    unsafe {
        tiled_dq_kernel::launch_unchecked::<R>(
            client,
            cube_count(p, p.k_dim.div_ceil(l.bk)),
            cube_dim(&l),
            array(b.k, qk),
            array(b.v, vo),
            array(b.g.unwrap_or(&dummy), p.gate_len()),
            array(b.h0.unwrap_or(&dummy), p.state_len()),
            array(cu, cu_len),
            array(b.d_o, vo),
            array(&dq_part, qk),
            p.seq_len as u32,
            p.scale,
            l,
            p.dtype.storage(),
        )
    };
    // Every access is guarded by the kernels' own conditions (rows in the sequence, columns
    // in K or V); the per-access bounds checks cost a third of the instructions.
    unsafe {
        tiled_dkv_kernel::launch_unchecked::<R>(
            client,
            cube_count(p, nv),
            cube_dim(&l),
            array(b.q, qk),
            array(b.k, qk),
            array(b.v, vo),
            array(b.g.unwrap_or(&dummy), p.gate_len()),
            array(cu, cu_len),
            array(b.d_o, vo),
            array(b.d_ht.unwrap_or(&dummy), p.state_len()),
            array(&dk_part, nv * qk),
            array(b.dv, vo),
            array(dh0, p.state_len()),
            p.seq_len as u32,
            qk as u32,
            p.scale,
            l,
            b.d_ht.is_some(),
            p.dtype.storage(),
        )
    };
    let key_term = finalize_qk_grads(client, p, b, (&dq_part, 1), (&dk_part, nv));
    Ok(key_term)
}
