//! Host side of the attention kernels: tile sizes from the device's limits, the launches.

use cubecl::prelude::*;
use cubecl::server::Handle;

use super::frag::{attn_fwd_frag_kernel, frag_fwd_smem, FRAG_M};
use super::kernels::{
    attn_delta_kernel, attn_dkv_kernel, attn_dq_kernel, attn_fwd_kernel, dkv_smem, dq_smem,
    fwd_smem, AttnLayout,
};
use super::AttnProblem;
use crate::gated::tiled_launch::tuning;
use crate::gated::{
    array, check_grid, elementwise_grid, has_cmma, is_cpu_vulkan, upload_cu_seqlens,
    ELEMWISE_THREADS,
};
use crate::problem::fits;
use crate::tile::{TileConfig, FRAG, PLANE};
use crate::{FloatDType, KernelError};
use cubecl::ir::features::MmaConfig;

/// Device buffers of a forward call: `q: [B·T_q, H, K]`, `k: [B·T_k, HK, K]`,
/// `v: [B·T_k, HK, V]` in the problem's dtype; outputs `o: [B·T_q, H, V]` (same dtype) and
/// `lse: [B·T_q, H]` (`f32`, what the backward reads).
pub struct AttnForwardBuffers<'a> {
    pub q: &'a Handle,
    pub k: &'a Handle,
    pub v: &'a Handle,
    pub o: &'a Handle,
    pub lse: &'a Handle,
}

/// Device buffers of a backward call: the forward's inputs and outputs, `d_o`, and the gradients
/// (each shaped like its input), written in full.
pub struct AttnBackwardBuffers<'a> {
    pub q: &'a Handle,
    pub k: &'a Handle,
    pub v: &'a Handle,
    pub o: &'a Handle,
    pub lse: &'a Handle,
    pub d_o: &'a Handle,
    pub dq: &'a Handle,
    pub dk: &'a Handle,
    pub dv: &'a Handle,
}

/// The three tiled kernels, each with its own tile sizes (their shared memory differs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttnKernel {
    Forward,
    Dq,
    Dkv,
}

/// Tile sizes for `kernel` on this device: the largest blocks, then the widest head-dimension
/// chunks, that fit its shared memory. [`KernelError::DeviceLimit`] when nothing fits.
pub fn attn_layout<R: Runtime>(
    client: &ComputeClient<R>,
    p: &AttnProblem,
    kernel: AttnKernel,
) -> Result<AttnLayout, KernelError> {
    let props = client.properties();
    let max_smem = props.hardware.max_shared_memory_size;
    let max_units = props.hardware.max_units_per_cube as usize;
    let cpu = is_cpu_vulkan(client);
    // 32 planes on a GPU: with fewer, each unit has more of the per-element work (staging, the
    // softmax row passes) and one cube per SM hides less latency (H200, T = 4096, B = 8, H = 16,
    // D = 128, forward / forward+backward: 8 planes 50.8 / 150 ms, 16 planes 28.9 / 90.3,
    // 32 planes 19.3 / 63.4). On lavapipe, where inner loops are unrolled, 256 units keep the
    // code small.
    let planes = tuning("FLA_ATTN_PLANES")
        .unwrap_or(if cpu { 8 } else { 32 })
        .min(max_units / PLANE)
        .max(1);
    let tile = TileConfig {
        cmma: has_cmma(client, p.dtype) && tuning("FLA_ATTN_CMMA") != Some(0),
        planes,
        unroll: cpu,
    };
    // Fetching ahead (H200, T = 4096, B = 8, H = 16, D = 128, bf16): the forward 19.3 -> 10.9 ms
    // at 32 planes (with 128-row blocks); the backward 99 -> 76 ms at 8 planes but 61 -> 82 at
    // 16 and 44 -> 62 at 32, where the units' registers are fewest: so the backward kernels run
    // without it (`FLA_ATTN_PREFETCH_BWD=1` turns it on, for measuring).
    let fetch_ahead = kernel == AttnKernel::Forward || tuning("FLA_ATTN_PREFETCH_BWD") == Some(1);
    let elem = p.dtype.size();
    let (dp, dvp) = (
        p.k_dim.next_multiple_of(FRAG),
        p.v_dim.next_multiple_of(FRAG),
    );
    // lavapipe runs 16-row blocks: the unrolled code of larger ones takes minutes to compile.
    let blocks: &[(usize, usize)] = if cpu {
        &[(16, 16)]
    } else {
        // 128 query rows halve the key/value traffic per query where they fit (the forward on
        // an H100/H200); the backward kernels hold more tiles and take 64.
        &[(128, 64), (64, 64), (32, 64), (32, 32), (16, 16)]
    };
    let smem = |l: &AttnLayout| match kernel {
        AttnKernel::Forward => fwd_smem(l, elem),
        AttnKernel::Dq => dq_smem(l, elem),
        AttnKernel::Dkv => dkv_smem(l, elem),
    };
    for &(bq, bk) in blocks {
        for width in [256, 128, 64, 32, 16] {
            let l = AttnLayout {
                heads: p.heads,
                kv_heads: p.kv_heads,
                d: p.k_dim,
                dv: p.v_dim,
                bq,
                bk,
                bd: dp.min(width),
                bdv: dvp.min(width),
                ph: 16 / elem,
                causal: p.causal,
                window: p.window.is_some(),
                softcap: p.softcap.is_some(),
                varlen: p.cu_seqlens.is_some(),
                fetch_ahead,
                tile,
            };
            if smem(&l) <= max_smem {
                return Ok(l);
            }
        }
    }
    Err(KernelError::DeviceLimit(format!(
        "no attention tiling of head dims K = {}, V = {} fits {max_smem} bytes of shared memory",
        p.k_dim, p.v_dim
    )))
}

/// What this device refuses of a problem, forward or backward: the problem itself, the dtype,
/// the sequence lengths' index range, a tiling of each kernel that fits shared memory, the grids.
/// Callers that defer the launch (Burn's fusion stream, the backward recorded for autodiff) run
/// it first, so the deferred launch does not fail on them.
pub fn attn_check_device<R: Runtime>(
    client: &ComputeClient<R>,
    p: &AttnProblem,
) -> Result<(), KernelError> {
    checked_layouts(client, p).map(|_| ())
}

/// The layout of the forward that keeps its accumulators in registers
/// ([`super::frag::attn_fwd_frag_kernel`]), where it applies: CUDA with `mma.sync` for the dtype
/// (f16, bf16), head dims of at most 128 (the output's registers), and shared memory for a key
/// and a value block; `None` elsewhere, where the shared-memory forward runs. `FLA_ATTN_FRAG=0`
/// turns it off; `FLA_ATTN_FRAG_PLANES` (16 query rows each) and `FLA_ATTN_FRAG_BK` (keys per
/// block) override its tile sizes, for measuring.
pub fn attn_fwd_registers<R: Runtime>(
    client: &ComputeClient<R>,
    p: &AttnProblem,
) -> Option<AttnLayout> {
    let props = client.properties();
    let mma = MmaConfig {
        a_type: p.dtype.storage(),
        b_type: p.dtype.storage(),
        cd_type: FloatDType::F32.storage(),
        m: 16,
        n: 8,
        k: 16,
    };
    let (dp, dvp) = (
        p.k_dim.next_multiple_of(FRAG),
        p.v_dim.next_multiple_of(FRAG),
    );
    if !R::name(client).contains("cuda")
        || !props.features.matmul.mma.contains(&mma)
        || dp > 128
        || dvp > 128
        || tuning("FLA_ATTN_FRAG") == Some(0)
    {
        return None;
    }
    let max_units = props.hardware.max_units_per_cube as usize;
    let planes = tuning("FLA_ATTN_FRAG_PLANES")
        .unwrap_or(4)
        .clamp(1, max_units / PLANE);
    let bk = tuning("FLA_ATTN_FRAG_BK")
        .unwrap_or(64)
        .next_multiple_of(FRAG)
        .clamp(FRAG, 128);
    let l = AttnLayout {
        heads: p.heads,
        kv_heads: p.kv_heads,
        d: p.k_dim,
        dv: p.v_dim,
        bq: FRAG_M * planes,
        bk,
        bd: dp,
        bdv: dvp,
        ph: 16 / p.dtype.size(),
        causal: p.causal,
        window: p.window.is_some(),
        softcap: p.softcap.is_some(),
        varlen: p.cu_seqlens.is_some(),
        fetch_ahead: false,
        tile: TileConfig {
            cmma: true,
            planes,
            unroll: false,
        },
    };
    (frag_fwd_smem(&l, p.dtype.size()) <= props.hardware.max_shared_memory_size).then_some(l)
}

/// [`attn_check_device`], returning the layouts it chose for the forward, `dq` and `dk`/`dv`
/// kernels (the launchers use them rather than choosing again).
fn checked_layouts<R: Runtime>(
    client: &ComputeClient<R>,
    p: &AttnProblem,
) -> Result<[AttnLayout; 3], KernelError> {
    p.validate()?;
    p.dtype.check_supported(client)?;
    if p.longest().max(p.kv_len) > u32::MAX as usize / 2 {
        return Err(KernelError::InvalidProblem(format!(
            "sequence of {} tokens is too long",
            p.longest()
        )));
    }
    let layouts = [
        attn_layout(client, p, AttnKernel::Forward)?,
        attn_layout(client, p, AttnKernel::Dq)?,
        attn_layout(client, p, AttnKernel::Dkv)?,
    ];
    let frag = attn_fwd_registers(client, p).map_or(0, |l| fwd_blocks(p, &l));
    let blocks = fwd_blocks(p, &layouts[0])
        .max(frag)
        .max(dq_blocks(p, &layouts[1]))
        .max(dkv_blocks(p, &layouts[2]));
    // Query or key blocks on x, heads on y, sequences on z.
    check_grid(
        client,
        (blocks, p.heads, p.num_seqs()),
        "the attention kernels",
    )?;
    Ok(layouts)
}

/// Cubes on x of the forward: query blocks times value-column blocks.
fn fwd_blocks(p: &AttnProblem, l: &AttnLayout) -> usize {
    p.longest().div_ceil(l.bq) * l.ndv()
}

/// Cubes on x of the `dq` kernel: query blocks times key-column blocks.
fn dq_blocks(p: &AttnProblem, l: &AttnLayout) -> usize {
    p.longest().div_ceil(l.bq) * l.nd()
}

/// Cubes on x of the `dk`/`dv` kernel: key blocks times the wider head's column blocks.
fn dkv_blocks(p: &AttnProblem, l: &AttnLayout) -> usize {
    let longest_k = if p.cu_seqlens.is_some() {
        p.longest()
    } else {
        p.kv_len
    };
    longest_k.div_ceil(l.bk) * l.nd().max(l.ndv())
}

fn cube_dim(l: &AttnLayout) -> CubeDim {
    CubeDim::new_2d(PLANE as u32, l.tile.planes as u32)
}

/// `(window, cap)` as the kernels take them (unused values when absent).
fn options(p: &AttnProblem) -> (u32, f32) {
    (
        p.window.map_or(0, |w| w.min(u32::MAX as usize / 2) as u32),
        p.softcap.unwrap_or(1.0),
    )
}

/// The forward: `o` and the log-sum-exp of each query row.
pub fn attn_forward<R: Runtime>(
    client: &ComputeClient<R>,
    p: &AttnProblem,
    b: AttnForwardBuffers<'_>,
) -> Result<(), KernelError> {
    let [l, _, _] = checked_layouts(client, p)?;
    let (nq, nk, nv, no, nl) = p.lens();
    let e = p.dtype.size();
    fits("q", b.q, nq, e)?;
    fits("k", b.k, nk, e)?;
    fits("v", b.v, nv, e)?;
    fits("o", b.o, no, e)?;
    fits("lse", b.lse, nl, 4)?;
    let (cu, cu_len) = upload_cu_seqlens(client, p.cu_seqlens.as_deref());
    let (window, cap) = options(p);
    let frag = attn_fwd_registers(client, p);
    let l = frag.unwrap_or(l);
    let blocks = fwd_blocks(p, &l);
    let grid = CubeCount::Static(blocks as u32, p.heads as u32, p.num_seqs() as u32);
    // Every access is guarded by the kernels' own conditions (rows inside the sequence, columns
    // inside the head).
    unsafe {
        if frag.is_some() {
            attn_fwd_frag_kernel::launch_unchecked::<R>(
                client,
                grid,
                cube_dim(&l),
                array(b.q, nq),
                array(b.k, nk),
                array(b.v, nv),
                array(&cu, cu_len),
                array(b.o, no),
                array(b.lse, nl),
                p.q_len as u32,
                p.kv_len as u32,
                p.scale,
                window,
                cap,
                l,
                p.dtype.storage(),
            )
        } else {
            attn_fwd_kernel::launch_unchecked::<R>(
                client,
                grid,
                cube_dim(&l),
                array(b.q, nq),
                array(b.k, nk),
                array(b.v, nv),
                array(&cu, cu_len),
                array(b.o, no),
                array(b.lse, nl),
                p.q_len as u32,
                p.kv_len as u32,
                p.scale,
                window,
                cap,
                l,
                p.dtype.storage(),
            )
        }
    };
    Ok(())
}

/// The backward: `dq`, `dk`, `dv` (summed over each key/value head's group of query heads).
pub fn attn_backward<R: Runtime>(
    client: &ComputeClient<R>,
    p: &AttnProblem,
    b: AttnBackwardBuffers<'_>,
) -> Result<(), KernelError> {
    let [_, lq, lkv] = checked_layouts(client, p)?;
    let (nq, nk, nv, no, nl) = p.lens();
    let e = p.dtype.size();
    for (name, h, n) in [
        ("q", b.q, nq),
        ("k", b.k, nk),
        ("v", b.v, nv),
        ("o", b.o, no),
        ("d_o", b.d_o, no),
        ("dq", b.dq, nq),
        ("dk", b.dk, nk),
        ("dv", b.dv, nv),
    ] {
        fits(name, h, n, e)?;
    }
    fits("lse", b.lse, nl, 4)?;
    let (cu, cu_len) = upload_cu_seqlens(client, p.cu_seqlens.as_deref());
    let (window, cap) = options(p);
    let delta = client.empty(4 * nl);
    unsafe {
        attn_delta_kernel::launch_unchecked::<R>(
            client,
            elementwise_grid(nl),
            CubeDim::new_1d(ELEMWISE_THREADS),
            array(b.o, no),
            array(b.d_o, no),
            array(&delta, nl),
            nl as u32,
            p.v_dim,
            p.dtype.storage(),
        )
    };
    let (dq_blocks, dkv_blocks) = (dq_blocks(p, &lq), dkv_blocks(p, &lkv));
    // Every access is guarded by the kernels' own conditions.
    unsafe {
        attn_dq_kernel::launch_unchecked::<R>(
            client,
            CubeCount::Static(dq_blocks as u32, p.heads as u32, p.num_seqs() as u32),
            cube_dim(&lq),
            array(b.q, nq),
            array(b.k, nk),
            array(b.v, nv),
            array(b.d_o, no),
            array(b.lse, nl),
            array(&delta, nl),
            array(&cu, cu_len),
            array(b.dq, nq),
            p.q_len as u32,
            p.kv_len as u32,
            p.scale,
            window,
            cap,
            lq,
            p.dtype.storage(),
        )
    };
    unsafe {
        attn_dkv_kernel::launch_unchecked::<R>(
            client,
            CubeCount::Static(dkv_blocks as u32, p.kv_heads as u32, p.num_seqs() as u32),
            cube_dim(&lkv),
            array(b.q, nq),
            array(b.k, nk),
            array(b.v, nv),
            array(b.d_o, no),
            array(b.lse, nl),
            array(&delta, nl),
            array(&cu, cu_len),
            array(b.dk, nk),
            array(b.dv, nv),
            p.q_len as u32,
            p.kv_len as u32,
            p.scale,
            window,
            cap,
            lkv,
            p.dtype.storage(),
        )
    };
    Ok(())
}
