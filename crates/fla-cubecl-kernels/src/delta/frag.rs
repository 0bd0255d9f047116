//! The delta rule backward's `dq`/`dk⁻`/`dW` kernel with its accumulators in tensor-core
//! registers (CUDA's `mma.sync`, the building blocks of [`crate::frag`]).
//!
//! [`super::tiled_bwd::delta_dqk_tiled_kernel`] computes the same products through shared memory:
//! every product's result is a tile that the next product reads back, with a barrier between
//! each, and `B = scale · (dO Uᵀ) ∘ D ∘ M` is formed again for every key block. Here each plane
//! owns 16 rows of the chunk and keeps `B` and the output rows in registers: `B` becomes the `A`
//! operand of `B K` without leaving them, and only the operands (`dO`, `U`, `dU`, a key block of
//! `K`/`Q` and of the states) pass through shared memory, staged once for all planes. A cube takes
//! up to 128 key columns, so at `K ≤ 128` the chunk's `dO`, `U`, `dU` are read once.
//!
//! On by default on CUDA in half precision ([`DEFAULT_DELTA_FRAG`]; `FLA_DELTA_FRAG=0` turns it
//! off): Vulkan and lavapipe have no such instructions, and `f32` inputs have no 16-bit
//! products, so they keep the tiled kernel. A cube has one plane per 16 rows (4 at chunk 64)
//! with ~104 KB of shared memory at K = V = 128, two cubes a multiprocessor; fetching `Q` and
//! `dS_C` during the first products, as the attention kernels fetch ahead, is the next step if
//! it is latency-bound.

use cubecl::cmma::{MatrixIdent, MmaDefinition};
use cubecl::prelude::*;
use cubecl::server::Handle;

use super::tiled_bwd::load_lam;
use super::DeltaProblem;
use crate::frag::{
    acc_times_rows, lane_gt, registers_available, scores_tiles, stage_cast, store_acc, tile_slots,
    widest_vector, zeros, Staging, FRAG_K, FRAG_M, FRAG_N,
};
use crate::gated::chunk::place_of_chunk;
use crate::gated::launch::array;
use crate::gated::tiled::{tile_bytes, TiledLayout};
use crate::gated::tiled_launch::tuning;
use crate::tile::{exp_le0, fast_exp, PLANE};

/// Compile-time shape of the register kernel: the tiled layout it replaces (chunk, heads, dims,
/// gate, varlen; `t.bk` key columns per cube), and how it stages tiles. One plane per 16 rows of
/// the chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DeltaFragLayout {
    pub t: TiledLayout,
    pub staging: Staging,
}

impl DeltaFragLayout {
    pub fn planes(&self) -> usize {
        self.t.chunk / FRAG_M
    }
}

/// Shared memory of the kernel: `dO`, `U`, `dU` (`C × vp`), the key block of `K` then `Q`
/// (`C × bk`), of the state then its gradient (`bk × vp`), all in the input dtype, and `Λ`.
pub fn delta_frag_dqk_smem(l: &DeltaFragLayout, e: usize) -> usize {
    let t = &l.t;
    3 * tile_bytes(t.chunk, t.vp, e)
        + tile_bytes(t.chunk, t.bk, e)
        + tile_bytes(t.bk, t.vp, e)
        + 4 * t.chunk
}

/// `B` (rows `r0 ..` of the chunk, `n` columns) `· factor · exp(Λ_r − Λ_s)` where the row `r`
/// sees the column `s` (`s ≤ r`), 0 elsewhere; with `transposed` the same of `Bᵀ` (rows `s`,
/// columns `r ≥ s`).
#[cube(fast_math = fast_exp())]
fn mask_decay_acc<NC: Size>(
    acc: &mut Array<Vector<f32, NC>>,
    lam: &SharedMemory<f32>,
    r0: usize,
    factor: f32,
    #[comptime] n: usize,
    #[comptime] transposed: bool,
    #[comptime] gated: bool,
) {
    let (g, t) = lane_gt();
    #[unroll]
    for j in 0..comptime!(n / FRAG_N) {
        #[unroll]
        for half in 0..2usize {
            let row = r0 + g + half * 8;
            let mut x = acc[j * 2 + half];
            #[unroll]
            for e in 0..2usize {
                let col = j * FRAG_N + 2 * t + e;
                let mut late = row;
                let mut early = col;
                if comptime!(transposed) {
                    late = col;
                    early = row;
                }
                let mut y = 0.0f32;
                if early <= late {
                    y = x[e] * factor;
                    if comptime!(gated) {
                        y *= exp_le0(lam[late] - lam[early]);
                    }
                }
                x[e] = y;
            }
            acc[j * 2 + half] = x;
        }
    }
}

/// Rows `r0 ..` of accumulator tiles (`n` columns) times `factor · exp(Λ_r)`, or with
/// `from_end` times `factor · exp(Λ_C − Λ_r)` (`Λ_C` the last of the chunk's `c` rows); times
/// `factor` alone without a decay.
#[cube(fast_math = fast_exp())]
#[allow(clippy::too_many_arguments)]
fn scale_acc_rows<NC: Size>(
    acc: &mut Array<Vector<f32, NC>>,
    lam: &SharedMemory<f32>,
    r0: usize,
    factor: f32,
    #[comptime] n: usize,
    #[comptime] from_end: bool,
    #[comptime] c: usize,
    #[comptime] gated: bool,
) {
    let (g, _) = lane_gt();
    #[unroll]
    for half in 0..2usize {
        let row = r0 + g + half * 8;
        let mut f = factor;
        if comptime!(gated) {
            if comptime!(from_end) {
                f *= exp_le0(lam[comptime!(c - 1)] - lam[row]);
            } else {
                f *= exp_le0(lam[row]);
            }
        }
        #[unroll]
        for j in 0..comptime!(n / FRAG_N) {
            acc[j * 2 + half] = acc[j * 2 + half] * Vector::<f32, NC>::cast_from(f);
        }
    }
}

/// The products of [`super::tiled_bwd::delta_dqk_tiled_kernel`] for key columns `k0 .. k0 + bk`
/// of one chunk and value head (cubes `(key block, chunk, value head)`, one plane per 16 rows),
/// with `B = scale · (dO Uᵀ) ∘ D ∘ M` (`D_rs = exp(Λ_r − Λ_s)`, `M` causal):
/// - `dq = scale · γ ∘ (dO Sᵀ) + B K` and `dW = −dU Sᵀ`, `S` the state entering the chunk;
/// - `dk⁻ = exp(Λ_C − Λ) ∘ (U dS_Cᵀ) + Bᵀ Q`, `dS_C` the gradient of the state leaving it, with
///   `Bᵀ` formed as `scale · (U dOᵀ) ∘ Dᵀ ∘ Mᵀ` in the rows of this plane's keys.
///
/// `u`, `du`, `states`, `d_states` are `f32`, rounded to the input dtype when staged (the tiled
/// kernel rounds them the same way); `B` and `Bᵀ` are rounded as the `A` operand of their product.
/// Writes `dq` (per value head), `dk⁻`, `dW`, all `f32` `[B·T, HV, K]`.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn delta_dqk_frag_kernel<F: Float, N: Size>(
    q: &Array<Vector<F, N>>,
    k: &Array<Vector<F, N>>,
    d_o: &Array<Vector<F, N>>,
    u: &Array<Vector<f32, N>>,
    du: &Array<Vector<f32, N>>,
    gc: &Array<f32>,
    states: &Array<Vector<f32, N>>,
    d_states: &Array<Vector<f32, N>>,
    chunks: &Array<u32>,
    cu_seqlens: &Array<u32>,
    dq: &mut Array<f32>,
    dk_minus: &mut Array<f32>,
    dw: &mut Array<f32>,
    seq_len: u32,
    scale: f32,
    #[comptime] l: DeltaFragLayout,
    #[define(F)] _dtype: StorageType,
) {
    let t = l.t;
    let st = l.staging;
    let (c, bk, vp) = comptime!((t.chunk, t.bk, t.vp));
    let k0 = CUBE_POS_X as usize * bk;
    let j = CUBE_POS_Y as usize;
    let hv = CUBE_POS_Z as usize;
    let (bos, _len, p0, cl) = place_of_chunk(chunks, cu_seqlens, j, seq_len, c, t.varlen);
    let hq = hv / comptime!(t.heads / t.qk_heads);
    let tok0 = bos + p0;
    // The state's rows `k0 ..` in `[chunks · HV · K, V]`.
    let srow0 = (j * t.heads + hv) * t.k + k0;
    let krows = t.k - k0;
    let def = MmaDefinition::<F, F, f32>::new(FRAG_M, FRAG_N, FRAG_K);
    let size!(NA) = def.vector_size(MatrixIdent::A);
    let size!(NB) = def.vector_size(MatrixIdent::B);
    let size!(NC) = def.vector_size(MatrixIdent::Accumulator);
    // This plane's first row of the chunk.
    let pr = UNIT_POS_Y as usize * FRAG_M;

    let mut sdo = tile_slots::<F, N>(c, vp, st);
    let mut su = tile_slots::<F, N>(c, vp, st);
    let mut sdu = tile_slots::<F, N>(c, vp, st);
    let mut sx = tile_slots::<F, N>(c, bk, st);
    let mut ss = tile_slots::<F, N>(bk, vp, st);
    let mut lam = SharedMemory::<f32>::new(c);

    stage_cast::<F, F, N>(d_o, &mut sdo, tok0, cl, hv, 0usize, t.heads, t.v, c, vp, st);
    stage_cast::<f32, F, N>(u, &mut su, tok0, cl, hv, 0usize, t.heads, t.v, c, vp, st);
    stage_cast::<f32, F, N>(du, &mut sdu, tok0, cl, hv, 0usize, t.heads, t.v, c, vp, st);
    stage_cast::<F, F, N>(k, &mut sx, tok0, cl, hq, k0, t.qk_heads, t.k, c, bk, st);
    stage_cast::<f32, F, N>(
        states, &mut ss, srow0, krows, 0usize, 0usize, 1usize, t.v, bk, vp, st,
    );
    load_lam(gc, &mut lam, bos, p0, cl, hv, t);
    sync_cube();

    // B of this plane's rows.
    let mut b = zeros::<NC>(comptime!(c / FRAG_N));
    scores_tiles::<F, N, NA, NB, NC>(&sdo, pr, &su, &mut b, c, vp, st);
    mask_decay_acc::<NC>(&mut b, &lam, pr, scale, c, false, t.scalar_gate);
    // dq = scale · γ ∘ (dO Sᵀ) + B K
    let mut acc = zeros::<NC>(comptime!(bk / FRAG_N));
    scores_tiles::<F, N, NA, NB, NC>(&sdo, pr, &ss, &mut acc, bk, vp, st);
    scale_acc_rows::<NC>(&mut acc, &lam, pr, scale, bk, false, c, t.scalar_gate);
    acc_times_rows::<F, N, NA, NB, NC>(&b, &sx, &mut acc, c, bk, st);
    store_acc::<f32, NC>(
        &acc, dq, tok0, pr, cl, hv, k0, 1.0f32, 1.0f32, false, t.heads, t.k, bk,
    );
    // dW = −dU Sᵀ
    let mut acc = zeros::<NC>(comptime!(bk / FRAG_N));
    scores_tiles::<F, N, NA, NB, NC>(&sdu, pr, &ss, &mut acc, bk, vp, st);
    scale_acc_rows::<NC>(&mut acc, &lam, pr, -1.0f32, bk, false, c, false);
    store_acc::<f32, NC>(
        &acc, dw, tok0, pr, cl, hv, k0, 1.0f32, 1.0f32, false, t.heads, t.k, bk,
    );

    // Every plane is done with `K` and `S`: the queries and the state's gradient take their
    // tiles.
    sync_cube();
    stage_cast::<F, F, N>(q, &mut sx, tok0, cl, hq, k0, t.qk_heads, t.k, c, bk, st);
    stage_cast::<f32, F, N>(
        d_states, &mut ss, srow0, krows, 0usize, 0usize, 1usize, t.v, bk, vp, st,
    );
    sync_cube();
    // dk⁻ = exp(Λ_C − Λ) ∘ (U dS_Cᵀ) + Bᵀ Q, this plane's rows now keys.
    let mut bt = zeros::<NC>(comptime!(c / FRAG_N));
    scores_tiles::<F, N, NA, NB, NC>(&su, pr, &sdo, &mut bt, c, vp, st);
    mask_decay_acc::<NC>(&mut bt, &lam, pr, scale, c, true, t.scalar_gate);
    let mut acc = zeros::<NC>(comptime!(bk / FRAG_N));
    scores_tiles::<F, N, NA, NB, NC>(&su, pr, &ss, &mut acc, bk, vp, st);
    scale_acc_rows::<NC>(&mut acc, &lam, pr, 1.0f32, bk, true, c, t.scalar_gate);
    acc_times_rows::<F, N, NA, NB, NC>(&bt, &sx, &mut acc, c, bk, st);
    store_acc::<f32, NC>(
        &acc, dk_minus, tok0, pr, cl, hv, k0, 1.0f32, 1.0f32, false, t.heads, t.k, bk,
    );
}

/// Whether the backward takes [`delta_dqk_frag_kernel`] where it applies (bit 1 of
/// `FLA_DELTA_FRAG`, which overrides it). On an H100 (bf16, B = 8, H = 16, K = V = 128, one call,
/// 2026-12-07) it took `chunk_delta_rule` forward+backward from 16.30 to 13.39 ms at T = 4096
/// (25.32 against 31.04 at 8192) and `chunk_gated_delta_rule` from 17.99 to 14.92 (27.90
/// against 34.92), and its CUDA half-precision tests (odd sizes, K = 256, grouped heads, a
/// variable-length batch with an empty sequence, T = 4096) passed, 22 of 22.
pub const DEFAULT_DELTA_FRAG: usize = 1;

/// The register kernel's layout for a backward whose tiled layout is `l`, or `None` where it
/// does not apply: off where `FLA_DELTA_FRAG` lacks bit 1 ([`DEFAULT_DELTA_FRAG`] has it), and
/// only on CUDA with `mma.sync`/`ldmatrix` for the dtype. Key blocks of 128 columns (the chunk's
/// `dO`, `U`, `dU` staged once at `K ≤ 128`), else 64, 32 or 16, the widest that fits twice on a
/// multiprocessor, or once.
pub(crate) fn dqk_registers<R: Runtime>(
    client: &ComputeClient<R>,
    p: &DeltaProblem,
    l: TiledLayout,
) -> Option<DeltaFragLayout> {
    if tuning("FLA_DELTA_FRAG").unwrap_or(DEFAULT_DELTA_FRAG) & 1 == 0
        || !registers_available(client, p.dtype)
    {
        return None;
    }
    let planes = l.chunk / FRAG_M;
    let max_units = client.properties().hardware.max_units_per_cube as usize;
    if planes * PLANE > max_units {
        return None;
    }
    let smem = client.properties().hardware.max_shared_memory_size;
    let elem = p.dtype.size();
    let vector = widest_vector(&[p.k_dim, p.v_dim]);
    let layout = |bk: usize| DeltaFragLayout {
        t: TiledLayout { bk, ..l },
        staging: Staging {
            vector,
            ph: 16 / elem,
            threads: planes * PLANE,
        },
    };
    let sizes = || {
        [128, 64, 32, 16]
            .into_iter()
            .filter(|&bk| bk <= l.kp && tuning("FLA_DQK_BK").is_none_or(|t| bk <= t))
    };
    let fits = |bk: usize, budget: usize| {
        let cand = layout(bk);
        (delta_frag_dqk_smem(&cand, elem) <= budget).then_some(cand)
    };
    sizes()
        .find_map(|bk| fits(bk, smem / 2))
        .or_else(|| sizes().find_map(|bk| fits(bk, smem)))
}

/// Launches [`delta_dqk_frag_kernel`] (see [`super::tiled_bwd::tiled_dqk`], whose buffers it
/// takes and writes alike).
#[allow(clippy::too_many_arguments)]
pub(crate) fn frag_dqk<R: Runtime>(
    client: &ComputeClient<R>,
    p: &DeltaProblem,
    l: DeltaFragLayout,
    (q, k, d_o, gc): (&Handle, &Handle, &Handle, &Handle),
    (u, du, states, d_states): (&Handle, &Handle, &Handle, &Handle),
    (chunks, count): (&Handle, usize),
    (cu, cu_len): (&Handle, usize),
    (dq, dk_minus, dw): (&Handle, &Handle, &Handle),
) {
    if count == 0 {
        return;
    }
    let (qk, vo, sc) = p.lens();
    let vs = l.staging.vector;
    let per_k = p.tokens() * p.v_heads * p.k_dim;
    let states_len = count * p.v_heads * p.k_dim * p.v_dim;
    // Every access is guarded by the kernel's own conditions (rows in the chunk or below K,
    // columns in K or V); the vectorised tensors are read in vectors of `vs` entries, which
    // divide K and V.
    unsafe {
        delta_dqk_frag_kernel::launch_unchecked::<R>(
            client,
            CubeCount::Static(
                p.k_dim.div_ceil(l.t.bk) as u32,
                count as u32,
                p.v_heads as u32,
            ),
            CubeDim::new_2d(PLANE as u32, l.planes() as u32),
            vs,
            array(q, qk / vs),
            array(k, qk / vs),
            array(d_o, vo / vs),
            array(u, vo / vs),
            array(du, vo / vs),
            array(gc, if p.gated { sc } else { 1 }),
            array(states, states_len / vs),
            array(d_states, states_len / vs),
            array(chunks, 2 * count),
            array(cu, cu_len),
            array(dq, per_k),
            array(dk_minus, per_k),
            array(dw, per_k),
            p.seq_len as u32,
            p.scale,
            l,
            p.dtype.storage(),
        )
    };
}

/// Whether a backward of `p` at the default chunk takes [`delta_dqk_frag_kernel`] on this device
/// (for the tests, which check that the CUDA runs they ask it of do run it).
pub fn delta_dqk_in_registers<R: Runtime>(client: &ComputeClient<R>, p: &DeltaProblem) -> bool {
    super::tiled::delta_tiled_layout(client, p, crate::gated::DEFAULT_CHUNK)
        .and_then(|l| dqk_registers(client, p, l))
        .is_some()
}
