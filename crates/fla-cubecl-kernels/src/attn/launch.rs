//! Host side of the attention kernels: tile sizes from the device's limits, the launches.

use cubecl::prelude::*;
use cubecl::server::Handle;

use super::frag::{
    attn_dkv_frag_kernel, attn_dq_frag_kernel, attn_fwd_frag_kernel, frag_dkv_smem, frag_dq_smem,
    frag_fwd_smem, FRAG_M,
};
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
use crate::KernelError;

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
                vector: 1,
                bd: dp.min(width),
                bdv: dvp.min(width),
                ph: 16 / elem,
                causal: p.causal,
                window: p.window.is_some(),
                softcap: p.softcap.is_some(),
                varlen: p.cu_seqlens.is_some(),
                fetch_ahead,
                fast_paths: false,
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

/// Whether the kernels that keep their accumulators in registers ([`super::frag`]) run this
/// problem: CUDA with `mma.sync` and `ldmatrix` for the dtype (f16, bf16) and head dims of at
/// most 128 (the accumulators' registers); `FLA_ATTN_FRAG=0` turns them off, for measuring.
fn frag_applies<R: Runtime>(client: &ComputeClient<R>, p: &AttnProblem) -> bool {
    crate::frag::registers_available(client, p.dtype)
        && p.k_dim.next_multiple_of(FRAG) <= 128
        && p.v_dim.next_multiple_of(FRAG) <= 128
        && tuning("FLA_ATTN_FRAG") != Some(0)
}

/// A register kernel's layout: whole heads (rounded up to 16), `planes` planes of 16 rows,
/// `bq` query rows and `bk` key rows per block; `None` when `smem` of it does not fit.
fn frag_layout<R: Runtime>(
    client: &ComputeClient<R>,
    p: &AttnProblem,
    planes: usize,
    bq: usize,
    bk: usize,
    smem: fn(&AttnLayout, usize) -> usize,
) -> Option<AttnLayout> {
    // Loads in vectors of up to 16 bytes: the widest that divides both head dims.
    let vector = crate::frag::widest_vector(&[p.k_dim, p.v_dim]);
    let fast = tuning("FLA_ATTN_FRAG_FAST") == Some(1);
    let l = AttnLayout {
        heads: p.heads,
        kv_heads: p.kv_heads,
        d: p.k_dim,
        dv: p.v_dim,
        bq,
        bk,
        vector,
        bd: p.k_dim.next_multiple_of(FRAG),
        bdv: p.v_dim.next_multiple_of(FRAG),
        ph: 16 / p.dtype.size(),
        causal: p.causal,
        window: p.window.is_some(),
        softcap: p.softcap.is_some(),
        varlen: p.cu_seqlens.is_some(),
        // With the second round, each loop fetches its next block into registers during the
        // current block's products (`FLA_ATTN_FRAG_PREFETCH=0` stages it after the barrier).
        fetch_ahead: fast && tuning("FLA_ATTN_FRAG_PREFETCH") != Some(0),
        fast_paths: fast,
        tile: TileConfig {
            cmma: true,
            planes,
            unroll: false,
        },
    };
    (smem(&l, p.dtype.size()) <= client.properties().hardware.max_shared_memory_size).then_some(l)
}

/// Planes of a register kernel (`var` overrides `planes`) and a block length (`len_var`
/// overrides `len`), a multiple of 16 up to 128.
fn frag_sizes<R: Runtime>(
    client: &ComputeClient<R>,
    var: &str,
    len_var: &str,
    len: usize,
    planes: usize,
) -> (usize, usize) {
    let max_planes = client.properties().hardware.max_units_per_cube as usize / PLANE;
    let planes = tuning(var).unwrap_or(planes).clamp(1, max_planes);
    let len = tuning(len_var)
        .unwrap_or(len)
        .next_multiple_of(FRAG)
        .clamp(FRAG, 128);
    (planes, len)
}

/// The layout of the forward that keeps its accumulators in registers
/// ([`super::frag::attn_fwd_frag_kernel`]: 16 query rows per plane), where it applies
/// ([`frag_applies`], and shared memory for a key and a value block); `None` elsewhere, where the
/// shared-memory forward runs. `FLA_ATTN_FRAG_PLANES` and `FLA_ATTN_FRAG_BK` (keys per block)
/// override its sizes, for measuring.
pub fn attn_fwd_registers<R: Runtime>(
    client: &ComputeClient<R>,
    p: &AttnProblem,
) -> Option<AttnLayout> {
    if !frag_applies(client, p) {
        return None;
    }
    // 8 planes (128 query rows): H100, bf16, B = 8, H = 16, D = 128, causal, T = 4096, with the
    // fragments read entry by entry: 6.9 ms against 9.0 at 4 planes (keys and values are staged
    // once for twice the rows).
    let (planes, bk) = frag_sizes(client, "FLA_ATTN_FRAG_PLANES", "FLA_ATTN_FRAG_BK", 64, 8);
    frag_layout(client, p, planes, FRAG_M * planes, bk, frag_fwd_smem)
}

/// The layouts of the backward kernels that keep their accumulators in registers, `dq` (16 query
/// rows per plane, key blocks of 32) and `dk`/`dv` (16 key rows per plane, query blocks of 32),
/// 4 planes each, where they apply (as [`attn_fwd_registers`]); `None` elsewhere.
/// `FLA_ATTN_FRAG_BWD_PLANES`, `FLA_ATTN_FRAG_DQ_BK` and `FLA_ATTN_FRAG_DKV_BQ` override their
/// sizes, for measuring. H100, bf16, B = 8, H = 16, D = 128, causal, forward+backward at
/// T = 4096 / 8192: 4 planes 27.0 / 91.3 ms, 8 planes 23.9 / 80.1, 4 planes with blocks of 64
/// 28.1 / 96.5. The default stays at 4, the size the CUDA tests ran, until they run at 8.
pub fn attn_bwd_registers<R: Runtime>(
    client: &ComputeClient<R>,
    p: &AttnProblem,
) -> Option<[AttnLayout; 2]> {
    if !frag_applies(client, p) {
        return None;
    }
    let (planes, bk) = frag_sizes(
        client,
        "FLA_ATTN_FRAG_BWD_PLANES",
        "FLA_ATTN_FRAG_DQ_BK",
        32,
        4,
    );
    let dq = frag_layout(client, p, planes, FRAG_M * planes, bk, frag_dq_smem)?;
    let (_, bq) = frag_sizes(
        client,
        "FLA_ATTN_FRAG_BWD_PLANES",
        "FLA_ATTN_FRAG_DKV_BQ",
        32,
        4,
    );
    // The `dk`/`dv` kernel reads a query block's log-sum-exp and δ one row per unit.
    if bq > planes * PLANE {
        return None;
    }
    let dkv = frag_layout(client, p, planes, bq, FRAG_M * planes, frag_dkv_smem)?;
    Some([dq, dkv])
}

/// The layouts the launchers use, chosen once by [`checked_layouts`]: the register kernels'
/// where they apply (`frag_fwd`, `frag_bwd`), the shared-memory kernels' elsewhere.
struct Chosen {
    fwd: AttnLayout,
    dq: AttnLayout,
    dkv: AttnLayout,
    frag_fwd: bool,
    frag_bwd: bool,
}

/// [`attn_check_device`], returning the layouts it chose for the forward, `dq` and `dk`/`dv`
/// kernels (the launchers use them rather than choosing again).
fn checked_layouts<R: Runtime>(
    client: &ComputeClient<R>,
    p: &AttnProblem,
) -> Result<Chosen, KernelError> {
    p.validate()?;
    p.dtype.check_supported(client)?;
    if p.longest().max(p.kv_len) > u32::MAX as usize / 2 {
        return Err(KernelError::InvalidProblem(format!(
            "sequence of {} tokens is too long",
            p.longest()
        )));
    }
    let [fwd, dq, dkv] = [
        attn_layout(client, p, AttnKernel::Forward)?,
        attn_layout(client, p, AttnKernel::Dq)?,
        attn_layout(client, p, AttnKernel::Dkv)?,
    ];
    let frag_fwd = attn_fwd_registers(client, p);
    let frag_bwd = attn_bwd_registers(client, p);
    let blocks = fwd_blocks(p, &fwd)
        .max(frag_fwd.map_or(0, |l| fwd_blocks(p, &l)))
        .max(frag_bwd.map_or(0, |[dq, dkv]| dq_blocks(p, &dq).max(dkv_blocks(p, &dkv))))
        .max(dq_blocks(p, &dq))
        .max(dkv_blocks(p, &dkv));
    // Query or key blocks on x, heads on y, sequences on z.
    check_grid(
        client,
        (blocks, p.heads, p.num_seqs()),
        "the attention kernels",
    )?;
    let [dq, dkv] = frag_bwd.unwrap_or([dq, dkv]);
    Ok(Chosen {
        fwd: frag_fwd.unwrap_or(fwd),
        dq,
        dkv,
        frag_fwd: frag_fwd.is_some(),
        frag_bwd: frag_bwd.is_some(),
    })
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
    let chosen = checked_layouts(client, p)?;
    let l = chosen.fwd;
    let (nq, nk, nv, no, nl) = p.lens();
    let e = p.dtype.size();
    fits("q", b.q, nq, e)?;
    fits("k", b.k, nk, e)?;
    fits("v", b.v, nv, e)?;
    fits("o", b.o, no, e)?;
    fits("lse", b.lse, nl, 4)?;
    let (cu, cu_len) = upload_cu_seqlens(client, p.cu_seqlens.as_deref());
    let (window, cap) = options(p);
    let blocks = fwd_blocks(p, &l);
    let grid = CubeCount::Static(blocks as u32, p.heads as u32, p.num_seqs() as u32);
    // Every access is guarded by the kernels' own conditions (rows inside the sequence, columns
    // inside the head).
    // The register kernels read `q`, `k`, `v` (and `d_o`) in vectors of `l.vector` entries.
    let vs = l.vector;
    macro_rules! launch {
        ($kernel:ident $(, $vector:expr)?) => {
            unsafe {
                $kernel::launch_unchecked::<R>(
                    client,
                    grid,
                    cube_dim(&l),
                    $($vector,)?
                    array(b.q, nq / vs),
                    array(b.k, nk / vs),
                    array(b.v, nv / vs),
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
    }
    if chosen.frag_fwd {
        launch!(attn_fwd_frag_kernel, vs);
    } else {
        launch!(attn_fwd_kernel);
    }
    Ok(())
}

/// The backward: `dq`, `dk`, `dv` (summed over each key/value head's group of query heads).
pub fn attn_backward<R: Runtime>(
    client: &ComputeClient<R>,
    p: &AttnProblem,
    b: AttnBackwardBuffers<'_>,
) -> Result<(), KernelError> {
    let chosen = checked_layouts(client, p)?;
    let (lq, lkv) = (chosen.dq, chosen.dkv);
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
    let dq_grid = CubeCount::Static(dq_blocks as u32, p.heads as u32, p.num_seqs() as u32);
    let dkv_grid = CubeCount::Static(dkv_blocks as u32, p.kv_heads as u32, p.num_seqs() as u32);
    // Every access is guarded by the kernels' own conditions.
    macro_rules! launch_dq {
        ($kernel:ident $(, $vector:expr)?) => {
            unsafe {
                $kernel::launch_unchecked::<R>(
                    client,
                    dq_grid,
                    cube_dim(&lq),
                    $($vector,)?
                    array(b.q, nq / lq.vector),
                    array(b.k, nk / lq.vector),
                    array(b.v, nv / lq.vector),
                    array(b.d_o, no / lq.vector),
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
            }
        };
    }
    macro_rules! launch_dkv {
        ($kernel:ident $(, $vector:expr)?) => {
            unsafe {
                $kernel::launch_unchecked::<R>(
                    client,
                    dkv_grid,
                    cube_dim(&lkv),
                    $($vector,)?
                    array(b.q, nq / lkv.vector),
                    array(b.k, nk / lkv.vector),
                    array(b.v, nv / lkv.vector),
                    array(b.d_o, no / lkv.vector),
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
            }
        };
    }
    if chosen.frag_bwd {
        launch_dq!(attn_dq_frag_kernel, lq.vector);
        launch_dkv!(attn_dkv_frag_kernel, lkv.vector);
    } else {
        launch_dq!(attn_dq_kernel);
        launch_dkv!(attn_dkv_kernel);
    }
    Ok(())
}
