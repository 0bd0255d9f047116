//! The attention forward with its running output in registers, on CUDA's `mma.sync` tensor-core
//! instructions (m16n8k16, `f32` accumulators).
//!
//! [`super::kernels::attn_fwd_kernel`] goes through shared memory for every product: scores,
//! probabilities and the output accumulator are tiles that each key block reads and writes
//! again, which bounds it far below the tensor cores. Here each plane (warp) owns 16 query rows
//! and keeps them in registers through the whole key loop: its queries (the `A` operand of
//! `S = Q Kᵀ`), the block's scores, and the output `O`. The online softmax runs on the score
//! registers in place (a row's maximum and sum gathered across the four lanes that hold it), and
//! the probabilities become the `A` operand of `O += P V` without leaving the registers: the
//! accumulators of two adjacent 8-key tiles are laid out as one 16-key `A` fragment. Only the
//! key and value blocks pass through shared memory, staged once per block for all planes.
//!
//! The register layout is PTX's for `mma.m16n8k16` with 16-bit inputs, which CubeCL's
//! `MmaDefinition::position_of_nth` also reports on CUDA (lane `l`, `g = l / 4`, `t = l % 4`;
//! pairs of adjacent columns share a 32-bit register):
//! - `A` (16×16, row-major pairs): `[g][2t..]`, `[g+8][2t..]`, `[g][2t+8..]`, `[g+8][2t+8..]`;
//! - `B` (16×8, pairs down a column): `[2t..][g]`, `[2t+8..][g]`;
//! - accumulator (16×8): `[g][2t..]`, `[g+8][2t..]`.
//!
//! CubeCL compiles manual MMA only for CUDA (SPIR-V has no such instruction), so Vulkan and
//! lavapipe run the shared-memory kernel; both compute the same thing, and the attention tests
//! run this one wherever the device has it.

use cubecl::cmma::{MatrixIdent, MmaDefinition};
use cubecl::prelude::*;

use super::kernels::{bounds, capped, key_offset, key_range, sees, stage, tile_h, AttnLayout};
use crate::gated::chunk::chunk_len;

/// Rows of a plane's query block, and the `m`, `n`, `k` of one instruction.
pub const FRAG_M: usize = 16;
pub const FRAG_N: usize = 8;
pub const FRAG_K: usize = 16;

/// Shared memory of the kernel: the key block (also the query block, staged once before the
/// loop) and the value block, input dtype, rows padded by `l.ph` elements.
pub fn frag_fwd_smem(l: &AttnLayout, e: usize) -> usize {
    l.bq.max(l.bk) * (l.bd + l.ph) * e + l.bk * (l.bdv + l.ph) * e
}

/// The row maximum of `x` over the four lanes of a quad (the lanes holding one row's columns).
#[cube]
fn quad_max(x: f32) -> f32 {
    let a = max(x, plane_shuffle_xor(x, 1u32));
    max(a, plane_shuffle_xor(a, 2u32))
}

#[cube]
fn quad_sum(x: f32) -> f32 {
    let a = x + plane_shuffle_xor(x, 1u32);
    a + plane_shuffle_xor(a, 2u32)
}

/// Forward: `o` and the rows' log-sum-exp, as [`super::kernels::attn_fwd_kernel`] computes them.
/// Cubes `(query block, head, sequence)` of `(32, planes)` units; `l.bq = 16 · planes`, `l.bd`
/// and `l.bdv` the head dims rounded up to 16 (whole heads), `l.bk` a multiple of 16.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn attn_fwd_frag_kernel<F: Float>(
    q: &Array<F>,
    k: &Array<F>,
    v: &Array<F>,
    cu_seqlens: &Array<u32>,
    o: &mut Array<F>,
    lse: &mut Array<f32>,
    q_len: u32,
    kv_len: u32,
    scale: f32,
    window: u32,
    cap: f32,
    #[comptime] l: AttnLayout,
    #[define(F)] _dtype: StorageType,
) {
    let (bq, bk, dp, dvp) = comptime!((l.bq, l.bk, l.bd, l.bdv));
    let (ldk, ldv) = comptime!((dp + l.ph, dvp + l.ph));
    // Instruction tiles: key tiles of 8 in a block, 16-column steps of the head dims, 8-column
    // output tiles, 16-key steps of `P V`.
    let (nkt, ndk, nvt, nks) = comptime!((bk / FRAG_N, dp / FRAG_K, dvp / FRAG_N, bk / FRAG_K));
    let qb = CUBE_POS_X as usize;
    let h = CUBE_POS_Y as usize;
    let n = CUBE_POS_Z as usize;
    let hk = h / comptime!(l.heads / l.kv_heads);
    let (q0, lq, k0, lk) = bounds(cu_seqlens, n, q_len, kv_len, l.varlen);
    let i0 = qb * bq;
    // Uniform over the cube: blocks past a shorter sequence's end have nothing to do.
    if i0 < lq {
        let rows = chunk_len(lq, i0, bq);
        let off = key_offset(lq, lk);
        let def = MmaDefinition::<F, F, f32>::new(FRAG_M, FRAG_N, FRAG_K);
        let size!(NA) = def.vector_size(MatrixIdent::A);
        let size!(NB) = def.vector_size(MatrixIdent::B);
        let size!(NC) = def.vector_size(MatrixIdent::Accumulator);
        let lane = UNIT_POS_PLANE as usize;
        let g = lane / 4;
        let t = lane % 4;
        // This plane's first row in the block, and its two rows' places in the sequence.
        let pr = UNIT_POS_Y as usize * FRAG_M;
        let mut sk = tile_h::<F>(comptime!(bq.max(bk)), dp, l);
        let mut sv = tile_h::<F>(bk, dvp, l);

        // The queries, staged through the key tile, then held as `A` fragments per 16 columns.
        stage::<F>(q, &mut sk, q0 + i0, rows, h, 0, l.heads, l.d, bq, dp, l);
        sync_cube();
        let mut qa = Array::<Vector<F, NA>>::new(comptime!(ndk * 4));
        #[unroll]
        for s in 0..ndk {
            #[unroll]
            for r in 0..4usize {
                let row = pr + g + (r % 2) * 8;
                let col = s * FRAG_K + 2 * t + (r / 2) * 8;
                let mut x = Vector::empty();
                x[0] = sk[row * ldk + col];
                x[1] = sk[row * ldk + col + 1];
                qa[s * 4 + r] = x;
            }
        }

        let zero = Vector::<f32, NC>::cast_from(0.0f32);
        let mut oacc = Array::<Vector<f32, NC>>::new(comptime!(nvt * 2));
        #[unroll]
        for j in 0..comptime!(nvt * 2) {
            oacc[j] = zero;
        }
        // Running maximum and this lane's part of the running sum, for rows g and g + 8.
        let mut m0 = f32::new(-1.0e30);
        let mut m1 = f32::new(-1.0e30);
        let mut l0 = f32::new(0.0);
        let mut l1 = f32::new(0.0);
        let pos0 = i0 + pr + g + off;

        let (j_lo, j_hi) = key_range(i0 + off, rows, lk, window, l);
        let kb_lo = j_lo / bk;
        let kb_hi = j_hi.div_ceil(bk);
        for kb in kb_lo..kb_hi {
            let j0 = kb * bk;
            let kr = chunk_len(lk, j0, bk);
            // Every plane is done with the previous block (and, first, with the queries).
            sync_cube();
            stage::<F>(k, &mut sk, k0 + j0, kr, hk, 0, l.kv_heads, l.d, bk, dp, l);
            stage::<F>(v, &mut sv, k0 + j0, kr, hk, 0, l.kv_heads, l.dv, bk, dvp, l);
            sync_cube();

            // S = Q Kᵀ, one 16 × 8 accumulator per 8 keys.
            let mut sacc = Array::<Vector<f32, NC>>::new(comptime!(nkt * 2));
            #[unroll]
            for j in 0..nkt {
                let mut c = Array::<Vector<f32, NC>>::new(2usize);
                c[0] = zero;
                c[1] = zero;
                #[unroll]
                for s in 0..ndk {
                    let mut a = Array::<Vector<F, NA>>::new(4usize);
                    #[unroll]
                    for r in 0..4usize {
                        a[r] = qa[s * 4 + r];
                    }
                    let mut b = Array::<Vector<F, NB>>::new(2usize);
                    #[unroll]
                    for r in 0..2usize {
                        let at = (j * FRAG_N + g) * ldk + s * FRAG_K + 2 * t + r * 8;
                        let mut x = Vector::empty();
                        x[0] = sk[at];
                        x[1] = sk[at + 1];
                        b[r] = x;
                    }
                    let d = def.execute(&a, &b, &c);
                    c[0] = d[0];
                    c[1] = d[1];
                }
                sacc[j * 2] = c[0];
                sacc[j * 2 + 1] = c[1];
            }

            // Scale, cap and mask; the rows' new maxima.
            let mut mx0 = f32::new(-1.0e30);
            let mut mx1 = f32::new(-1.0e30);
            #[unroll]
            for j in 0..nkt {
                #[unroll]
                for half in 0..2usize {
                    let row = pr + g + half * 8;
                    let mut x = sacc[j * 2 + half];
                    #[unroll]
                    for e in 0..2usize {
                        let col = j * FRAG_N + 2 * t + e;
                        let mut y = capped(x[e], scale, cap, l);
                        if !(row < rows && col < kr && sees(pos0 + half * 8, j0 + col, window, l)) {
                            y = -1.0e30f32;
                        }
                        x[e] = y;
                        if half == 0 {
                            mx0 = max(mx0, y);
                        } else {
                            mx1 = max(mx1, y);
                        }
                    }
                    sacc[j * 2 + half] = x;
                }
            }
            let n0 = max(m0, quad_max(mx0));
            let n1 = max(m1, quad_max(mx1));
            let alpha0 = (m0 - n0).exp();
            let alpha1 = (m1 - n1).exp();
            m0 = n0;
            m1 = n1;

            // Probabilities in place; this lane's sums; the output rescaled.
            let mut p0 = f32::new(0.0);
            let mut p1 = f32::new(0.0);
            #[unroll]
            for j in 0..nkt {
                #[unroll]
                for half in 0..2usize {
                    let mut x = sacc[j * 2 + half];
                    #[unroll]
                    for e in 0..2usize {
                        let y = x[e];
                        let mut p = 0.0f32;
                        if half == 0 {
                            if y > -1.0e30f32 {
                                p = (y - n0).exp();
                            }
                            p0 += p;
                        } else {
                            if y > -1.0e30f32 {
                                p = (y - n1).exp();
                            }
                            p1 += p;
                        }
                        x[e] = p;
                    }
                    sacc[j * 2 + half] = x;
                }
            }
            l0 = l0 * alpha0 + p0;
            l1 = l1 * alpha1 + p1;
            #[unroll]
            for j in 0..nvt {
                let mut x = oacc[j * 2];
                x[0] *= alpha0;
                x[1] *= alpha0;
                oacc[j * 2] = x;
                let mut y = oacc[j * 2 + 1];
                y[0] *= alpha1;
                y[1] *= alpha1;
                oacc[j * 2 + 1] = y;
            }

            // O += P V: the probabilities of keys 16s .. 16s + 15 are the accumulators of key
            // tiles 2s and 2s + 1, rounded to the input dtype (as FlashAttention does).
            #[unroll]
            for s in 0..nks {
                let mut a = Array::<Vector<F, NA>>::new(4usize);
                #[unroll]
                for r in 0..4usize {
                    let x = sacc[s * 4 + r];
                    let mut y = Vector::empty();
                    y[0] = F::cast_from(x[0]);
                    y[1] = F::cast_from(x[1]);
                    a[r] = y;
                }
                #[unroll]
                for j in 0..nvt {
                    let mut b = Array::<Vector<F, NB>>::new(2usize);
                    #[unroll]
                    for r in 0..2usize {
                        let key = s * FRAG_K + 2 * t + r * 8;
                        let col = j * FRAG_N + g;
                        let mut x = Vector::empty();
                        x[0] = sv[key * ldv + col];
                        x[1] = sv[(key + 1) * ldv + col];
                        b[r] = x;
                    }
                    let mut c = Array::<Vector<f32, NC>>::new(2usize);
                    c[0] = oacc[j * 2];
                    c[1] = oacc[j * 2 + 1];
                    let d = def.execute(&a, &b, &c);
                    oacc[j * 2] = d[0];
                    oacc[j * 2 + 1] = d[1];
                }
            }
        }

        // The rows' sums over their four lanes; the normalised output and the log-sum-exp.
        let z0 = quad_sum(l0);
        let z1 = quad_sum(l1);
        #[unroll]
        for half in 0..2usize {
            let row = pr + g + half * 8;
            let mut z = z0;
            let mut m = m0;
            if half == 1 {
                z = z1;
                m = m1;
            }
            if row < rows {
                let at = (q0 + i0 + row) * l.heads + h;
                #[unroll]
                for j in 0..nvt {
                    let x = oacc[j * 2 + half];
                    #[unroll]
                    for e in 0..2usize {
                        let col = j * FRAG_N + 2 * t + e;
                        if col < l.dv {
                            o[at * l.dv + col] = F::cast_from(select(z > 0.0f32, x[e] / z, 0.0f32));
                        }
                    }
                }
                if t == 0 {
                    let mut x = 0.0f32;
                    if z > 0.0f32 {
                        x = m + z.ln();
                    }
                    lse[at] = x;
                }
            }
        }
    }
}
