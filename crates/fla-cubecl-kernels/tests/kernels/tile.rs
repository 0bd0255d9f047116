//! `tile::mma` alone, every operand layout, against an f64 product: on tensor cores where the
//! device has them for the dtype (CUDA, f16/bf16), in plain arithmetic elsewhere. The chunk
//! kernels stand on it, so a layout mistake shows here first, with its name.

use cubecl::prelude::*;
use fla_cubecl_kernels::gated::{has_cmma, is_cpu_vulkan};
use fla_cubecl_kernels::testing::{decode, encode, Rng};
use fla_cubecl_kernels::tile::{mma, MmaShape, TileConfig};
use fla_cubecl_kernels::FloatDType;
use rstest::rstest;

use crate::common::{check, runtime_name};

/// Stages `a`, `b` (and `out` when accumulating) in shared memory, runs one product, writes `out`.
#[cube(launch)]
fn mma_kernel<F: Float>(
    a: &Array<F>,
    b: &Array<F>,
    out: &mut Array<f32>,
    #[comptime] s: MmaShape,
    #[comptime] t: TileConfig,
    #[comptime] sizes: (usize, usize, usize),
    #[define(F)] _dtype: StorageType,
) {
    let mut sa = SharedMemory::<F>::new_aligned(sizes.0, 64usize);
    let mut sb = SharedMemory::<F>::new_aligned(sizes.1, 64usize);
    let mut so = SharedMemory::<f32>::new_aligned(sizes.2, 64usize);
    let unit = UNIT_POS as usize;
    let threads = comptime!(t.threads());
    for e in range_stepped(unit, sizes.0, threads) {
        sa[e] = a[e];
    }
    for e in range_stepped(unit, sizes.1, threads) {
        sb[e] = b[e];
    }
    for e in range_stepped(unit, sizes.2, threads) {
        so[e] = out[e];
    }
    sync_cube();
    mma::<F, F>(&sa, 0, &sb, 0, &mut so, 0, s, t);
    sync_cube();
    for e in range_stepped(unit, sizes.2, threads) {
        out[e] = so[e];
    }
}

/// The layouts the chunk kernels use (`A·B`, `A·Bᵀ`, `Aᵀ·B`), writing and accumulating, on
/// one fragment and on several in each direction (sizes that fit lavapipe's 32 KB in f32).
#[rstest]
#[case::nn_one_fragment((false, false), false, (16, 16, 16))]
#[case::nt((false, true), false, (48, 32, 32))]
#[case::tn_accumulate((true, false), true, (32, 16, 64))]
#[case::nn_accumulate((false, false), true, (32, 48, 16))]
fn products(
    #[case] layout: (bool, bool),
    #[case] accumulate: bool,
    #[case] mnk: (usize, usize, usize),
    #[values(FloatDType::F32, FloatDType::F16, FloatDType::BF16)] dtype: FloatDType,
) {
    on_runtime!(product(layout, accumulate, mnk, dtype));
}

fn product<R: Runtime>(
    client: &ComputeClient<R>,
    (a_col, b_col): (bool, bool),
    accumulate: bool,
    (m, n, k): (usize, usize, usize),
    dtype: FloatDType,
) {
    if dtype.check_supported(client).is_err() {
        eprintln!("{dtype:?} not supported on {}: skipped", runtime_name());
        return;
    }
    // Padded leading dimensions, as the chunk kernels use them (16 bytes).
    let pad = 16 / dtype.size();
    let (lda, ldb, ldo) = (
        if a_col { m } else { k } + pad,
        if b_col { k } else { n } + pad,
        n + 4,
    );
    let a_len = if a_col { k * lda } else { m * lda };
    let b_len = if b_col { n * ldb } else { k * ldb };
    let o_len = m * ldo;
    let mut rng = Rng::new(7);
    let a = rng.normals(a_len, dtype);
    let b = rng.normals(b_len, dtype);
    let o0 = rng.normals(o_len, FloatDType::F32);
    let at = |i: usize, l: usize| {
        if a_col {
            a[i + l * lda]
        } else {
            a[i * lda + l]
        }
    };
    let bt = |l: usize, j: usize| {
        if b_col {
            b[l + j * ldb]
        } else {
            b[l * ldb + j]
        }
    };
    let mut expect = o0.clone();
    for i in 0..m {
        for j in 0..n {
            let dot: f64 = (0..k).map(|l| at(i, l) * bt(l, j)).sum();
            let e = &mut expect[i * ldo + j];
            *e = if accumulate { *e + dot } else { dot };
        }
    }
    let s = MmaShape {
        m,
        n,
        k,
        lda,
        ldb,
        ldo,
        a_col,
        b_col,
        accumulate,
    };
    let t = TileConfig {
        cmma: has_cmma(client, dtype),
        planes: 8,
        unroll: is_cpu_vulkan(client),
    };
    let (ha, hb) = (
        client.create_from_slice(&encode(dtype, &a)),
        client.create_from_slice(&encode(dtype, &b)),
    );
    let ho = client.create_from_slice(&encode(FloatDType::F32, &o0));
    unsafe {
        mma_kernel::launch::<R>(
            client,
            CubeCount::Static(1, 1, 1),
            CubeDim::new_2d(32, t.planes as u32),
            ArrayArg::from_raw_parts(ha, a_len),
            ArrayArg::from_raw_parts(hb, b_len),
            ArrayArg::from_raw_parts(ho.clone(), o_len),
            s,
            t,
            (a_len, b_len, o_len),
            dtype.storage(),
        )
    };
    let got = decode(FloatDType::F32, &client.read_one_unchecked(ho));
    // Entries between tiles (the leading-dimension padding) must be left as they were.
    let pad: Vec<usize> = (0..o_len).filter(|e| e % ldo >= n).collect();
    for &e in &pad {
        assert_eq!(got[e], o0[e], "padding entry {e} overwritten");
    }
    // Inputs are exact in the dtype; only f32 accumulation order differs.
    check(
        &format!(
            "mma {m}x{n}x{k} a_col={a_col} b_col={b_col} acc={accumulate} cmma={}",
            t.cmma
        ),
        &got,
        &expect,
        1e-5,
    );
}
