//! Matrix products through NVIDIA's cuBLASLt on the CUDA runtime (experimental).
//!
//! Why: CubeCL's own matmul kernels (what Burn's `matmul` runs) issue WMMA / `mma.sync` only, not
//! Hopper's `wgmma`, and reach about a third of the tensor cores' bf16 rate on an H100, where
//! cuBLAS reaches most of it (`benches/results/README.md`, "Matmuls in a training step").
//!
//! How it is ordered with CubeCL's work: the buffers' resources name the CUDA stream whose
//! memory pool owns them (a field our vendored cubecl-cuda adds, `vendor/README.md`). When the
//! three buffers share one stream, the product is enqueued on it, behind every kernel CubeCL has
//! launched there and ahead of every later one, with no host wait: CubeCL's pool reuses freed
//! memory in that same stream order, as it does for its own kernels. Buffers of different
//! streams (work split across threads) take the slow path: wait for this thread's stream, run
//! on a stream of our own, wait for it.
//!
//! The library is loaded at run time (cudarc's dynamic loading): nothing to link when building,
//! and a machine without `libcublasLt.so` gets an error at the first call.

use std::collections::HashMap;
use std::sync::Mutex;

use cubecl::cuda::CudaRuntime;
use cubecl::prelude::*;
use cubecl::server::Handle;
use cudarc::cublaslt::{result as lt, sys};
use cudarc::driver::result as drv;

use crate::{FloatDType, KernelError};

/// Bytes of cuBLASLt's scratch workspace (its heuristics pick kernels that fit).
const WORKSPACE: usize = 32 << 20;

/// `C = op(A) · op(B)`, all row-major in memory: `op(A)` is `[m, k]`, `op(B)` `[k, n]`, `C`
/// `[m, n]` with rows `ldc` elements apart. `a_trans`: `A` is stored `[k, m]` (rows `lda` apart)
/// and used transposed, as a transposed view of a row-major tensor is; likewise `b_trans` with
/// `B` stored `[n, k]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct GemmProblem {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub a_trans: bool,
    pub b_trans: bool,
    pub lda: usize,
    pub ldb: usize,
    pub ldc: usize,
    pub dtype: FloatDType,
}

impl GemmProblem {
    pub fn validate(&self) -> Result<(), KernelError> {
        let bad = |m: String| Err(KernelError::InvalidProblem(m));
        if self.m == 0 || self.n == 0 || self.k == 0 {
            return bad(format!(
                "zero-length product ({} x {} x {})",
                self.m, self.k, self.n
            ));
        }
        // Stored rows: A `[m, k]` or `[k, m]`, B `[k, n]` or `[n, k]`.
        let (a_cols, b_cols) = (
            if self.a_trans { self.m } else { self.k },
            if self.b_trans { self.k } else { self.n },
        );
        if self.lda < a_cols || self.ldb < b_cols || self.ldc < self.n {
            return bad(format!(
                "row strides (lda {}, ldb {}, ldc {}) shorter than the rows ({a_cols}, {b_cols}, {})",
                self.lda, self.ldb, self.ldc, self.n
            ));
        }
        Ok(())
    }
}

/// One product's cuBLASLt objects and chosen algorithm, made once per problem: a training step
/// repeats a few dozen shapes hundreds of times, and the heuristic query is a host round trip.
struct Plan {
    desc: sys::cublasLtMatmulDesc_t,
    /// B's, A's and C's layouts (cuBLASLt's operand order, see `plan`).
    layouts: [sys::cublasLtMatrixLayout_t; 3],
    algo: sys::cublasLtMatmulAlgo_t,
}

/// The library's handle, the stream of the slow path, one workspace per stream (two streams
/// must not share one: their products may run at once) and the plans, made on the runtime's
/// thread.
struct Blas {
    handle: sys::cublasLtHandle_t,
    own_stream: sys::cudaStream_t,
    workspaces: HashMap<usize, u64>,
    plans: HashMap<GemmProblem, Plan>,
}

// Used only from CubeCL's runtime thread, under the mutex.
unsafe impl Send for Blas {}

static BLAS: Mutex<Option<Blas>> = Mutex::new(None);

fn blas_error(what: &str, e: impl std::fmt::Debug) -> KernelError {
    KernelError::Library(format!("cuBLASLt {what}: {e:?}"))
}

fn data_type(dtype: FloatDType) -> sys::cudaDataType {
    match dtype {
        FloatDType::BF16 => sys::cudaDataType::CUDA_R_16BF,
        FloatDType::F16 => sys::cudaDataType::CUDA_R_16F,
        FloatDType::F32 => sys::cudaDataType::CUDA_R_32F,
    }
}

/// Describes the product to cuBLASLt and asks its heuristic for an algorithm.
///
/// cuBLASLt is column-major: a row-major `C [m, n]` is the column-major `Cᵀ [n, m]`, so it
/// computes `Cᵀ = op(B)ᵀ · op(A)ᵀ` with `B`'s memory as its first operand.
fn plan(handle: sys::cublasLtHandle_t, p: &GemmProblem) -> Result<Plan, KernelError> {
    let ty = data_type(p.dtype);
    let (m, n, k) = (p.m as u64, p.n as u64, p.k as u64);
    // cuBLAS's `cublasOperation_t` (not in cudarc's cuBLASLt bindings): 0 = N, 1 = T.
    let op = |t: bool| -> i32 { t as i32 };
    // First operand: B's memory, seen column-major: `[n, k]` (ld ldb) unless B is stored `[n, k]`
    // row-major, then `[k, n]` and transposed. Second: A's, `[k, m]` or, transposed, `[m, k]`.
    let (b_rows, b_cols) = if p.b_trans { (k, n) } else { (n, k) };
    let (a_rows, a_cols) = if p.a_trans { (m, k) } else { (k, m) };
    let compute = if p.dtype == FloatDType::F32 {
        // f32 on tensor cores at reduced precision, as Burn's own f32 matmul does on CUDA.
        sys::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32
    } else {
        sys::cublasComputeType_t::CUBLAS_COMPUTE_32F
    };
    let desc = lt::create_matmul_desc(compute, sys::cudaDataType::CUDA_R_32F)
        .map_err(|e| blas_error("descriptor", e))?;
    let layouts = [
        lt::create_matrix_layout(ty, b_rows, b_cols, p.ldb as i64),
        lt::create_matrix_layout(ty, a_rows, a_cols, p.lda as i64),
        lt::create_matrix_layout(ty, n, m, p.ldc as i64),
    ];
    let pref = lt::create_matmul_pref().map_err(|e| blas_error("preference", e));
    let chosen = (|| unsafe {
        let pref = *pref.as_ref().map_err(|e| e.clone())?;
        let [lb, la, lc] = [&layouts[0], &layouts[1], &layouts[2]]
            .map(|l| l.as_ref().map(|l| *l).map_err(|e| blas_error("layout", e)));
        let (lb, la, lc) = (lb?, la?, lc?);
        let (op_first, op_second) = (op(p.b_trans), op(p.a_trans));
        let attr = sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA;
        lt::set_matmul_desc_attribute(desc, attr, (&op_first as *const _) as *const _, 4)
            .map_err(|e| blas_error("transa", e))?;
        let attr = sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB;
        lt::set_matmul_desc_attribute(desc, attr, (&op_second as *const _) as *const _, 4)
            .map_err(|e| blas_error("transb", e))?;
        let size = WORKSPACE;
        let attr =
            sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES;
        lt::set_matmul_pref_attribute(pref, attr, (&size as *const usize) as *const _, 8)
            .map_err(|e| blas_error("workspace size", e))?;
        let heuristic = lt::get_matmul_algo_heuristic(handle, desc, lb, la, lc, lc, pref)
            .map_err(|e| blas_error("no algorithm", e))?;
        Ok::<_, KernelError>(([lb, la, lc], heuristic.algo))
    })();
    unsafe {
        if let Ok(pref) = pref {
            let _ = lt::destroy_matmul_pref(pref);
        }
        if chosen.is_err() {
            for l in layouts.into_iter().flatten() {
                let _ = lt::destroy_matrix_layout(l);
            }
            let _ = lt::destroy_matmul_desc(desc);
        }
    }
    let (layouts, algo) = chosen?;
    Ok(Plan {
        desc,
        layouts,
        algo,
    })
}

/// Runs the product on the pointers (byte offsets already applied), on the runtime's thread:
/// enqueued on `stream` without waiting, or, without one, on our own stream, waited for.
fn run_gemm(
    p: &GemmProblem,
    [a, b, c]: [u64; 3],
    stream: Option<sys::cudaStream_t>,
) -> Result<(), KernelError> {
    let mut guard = BLAS.lock().map_err(|e| blas_error("lock", e))?;
    if guard.is_none() {
        let handle = lt::create_handle().map_err(|e| blas_error("create", e))?;
        let own = drv::stream::create(drv::stream::StreamKind::NonBlocking)
            .map_err(|e| blas_error("stream", e))?;
        *guard = Some(Blas {
            handle,
            own_stream: own as sys::cudaStream_t,
            workspaces: HashMap::new(),
            plans: HashMap::new(),
        });
    }
    let blas = guard.as_mut().expect("made above");
    let on = stream.unwrap_or(blas.own_stream);
    let workspace = match blas.workspaces.get(&(on as usize)) {
        Some(w) => *w,
        None => {
            let w =
                unsafe { drv::malloc_sync(WORKSPACE) }.map_err(|e| blas_error("workspace", e))?;
            blas.workspaces.insert(on as usize, w);
            w
        }
    };
    if !blas.plans.contains_key(p) {
        let made = plan(blas.handle, p)?;
        blas.plans.insert(p.clone(), made);
    }
    let plan = &blas.plans[p];
    let [lb, la, lc] = plan.layouts;
    let (alpha, beta) = (1.0f32, 0.0f32);
    unsafe {
        lt::matmul(
            blas.handle,
            plan.desc,
            (&alpha as *const f32) as *const _,
            (&beta as *const f32) as *const _,
            b as *const _,
            lb,
            a as *const _,
            la,
            c as *const _,
            lc,
            c as *mut _,
            lc,
            &plan.algo,
            workspace as *mut _,
            WORKSPACE,
            on,
        )
        .map_err(|e| blas_error("matmul", e))?;
        if stream.is_none() {
            drv::stream::synchronize(on as _).map_err(|e| blas_error("stream sync", e))?;
        }
    }
    Ok(())
}

/// `C = op(A) · op(B)` on the CUDA runtime through cuBLASLt; `a`, `b`, `c` hold the problem's
/// dtype, `c` written in full. Enqueued on CubeCL's stream when the three buffers share one,
/// else run between host waits (module doc).
pub fn cublaslt_gemm(
    client: &ComputeClient<CudaRuntime>,
    p: &GemmProblem,
    [a, b]: [&Handle; 2],
    c: &Handle,
) -> Result<(), KernelError> {
    p.validate()?;
    p.dtype.check_supported(client)?;
    let resource = |h: &Handle| {
        client
            .get_resource(h.clone())
            .map_err(|e| blas_error("buffer", e))
    };
    // Holding the resources keeps the buffers allocated until the product is enqueued; after
    // that, CubeCL reuses their memory only behind it in the stream's order.
    let (ra, rb, rc) = (resource(a)?, resource(b)?, resource(c)?);
    let ptrs = [ra.resource().ptr, rb.resource().ptr, rc.resource().ptr];
    let streams = [
        ra.resource().stream,
        rb.resource().stream,
        rc.resource().stream,
    ];
    let shared = (streams[0] == streams[1] && streams[1] == streams[2]).then_some(streams[2]);
    if shared.is_none() {
        cubecl::future::block_on(client.sync()).map_err(|e| blas_error("sync", e))?;
    }
    let problem = p.clone();
    // A raw stream pointer is not `Send`; the runtime thread gets it as an address.
    let shared = shared.map(|s| s as usize);
    client
        .exclusive(move || {
            // cudarc panics where the library cannot be loaded: an error here, not a panic on
            // the runtime's thread.
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                run_gemm(&problem, ptrs, shared.map(|s| s as sys::cudaStream_t))
            }))
            .unwrap_or_else(|_| {
                Err(blas_error(
                    "call",
                    "panicked (is libcublasLt.so installed?)",
                ))
            })
        })
        .map_err(|e| blas_error("runtime thread", e))??;
    drop((ra, rb, rc));
    Ok(())
}
