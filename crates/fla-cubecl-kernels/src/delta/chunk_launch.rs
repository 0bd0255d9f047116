//! Host-side launchers of the delta rule's chunkwise-parallel form (kernels in [`super::chunk`]).

use cubecl::prelude::*;
use cubecl::server::Handle;

use super::chunk::{
    delta_chunk_dkv_kernel, delta_chunk_dqk_kernel, delta_chunk_dstate_kernel,
    delta_chunk_output_kernel, delta_chunk_scalars_kernel, delta_chunk_state_kernel,
    delta_dk_combine_kernel, delta_dl_pairs_kernel, delta_do_u_pairs_kernel, delta_du_intra_kernel,
    delta_qk_pairs_kernel, delta_solve_kernel, state_smem_len, DeltaChunkLayout,
};
use super::frag::{dqk_registers, frag_dqk};
use super::launch::{backward_buffers_fit, check, forward_buffers_fit};
use super::recurrent::group_sum_kernel;
use super::tiled::{delta_tiled_layout, tiled_walk, tiled_wy};
use super::tiled_bwd::{
    dqk_layout, dstate_layout, tail_layout, tiled_dqk, tiled_dstate, tiled_states, tiled_tail,
};
use super::{DeltaBackwardBuffers, DeltaForwardBuffers, DeltaProblem};
use crate::gated::chunk::{chunk_cumsum_kernel, ChunkLayout};
use crate::gated::recurrent_fwd::RecurrentLayout;
use crate::gated::tiled_launch::tuning;
use crate::gated::TiledLayout;
use crate::gated::{
    array, check_grid, chunk_tables, elementwise_grid, is_cpu_vulkan, need, upload_cu_seqlens,
    CPU_VULKAN_MAX_ITERATIONS, ELEMWISE_THREADS,
};
use crate::problem::addressable;
use crate::KernelError;

/// Threads per cube of the unit-per-entry kernels.
const ENTRY_THREADS: usize = 256;
/// Key rows each thread of a state pass keeps (unrolled), so `KS = ⌈K / 16⌉` threads share a
/// state column.
const STATE_ROWS: usize = 16;
/// Threads per cube of the state passes.
const STATE_THREADS: usize = 256;

/// What every kernel of one chunk call shares: layout, chunk tables, `cu_seqlens`, and `Λ` (the
/// decays cumulated within each chunk; a placeholder for the plain delta rule).
struct DeltaChunkCall<'a, R: Runtime> {
    client: &'a ComputeClient<R>,
    p: &'a DeltaProblem,
    c: DeltaChunkLayout,
    chunks: Handle,
    first: Handle,
    count: usize,
    cu: Handle,
    cu_len: usize,
    gc: Handle,
    dummy: Handle,
    /// The tile-product kernels' layout where they take this call ([`super::tiled`]).
    tiled: Option<TiledLayout>,
}

impl<'a, R: Runtime> DeltaChunkCall<'a, R> {
    fn new(
        client: &'a ComputeClient<R>,
        p: &'a DeltaProblem,
        chunk: usize,
        g: Option<&Handle>,
        has_ht: bool,
    ) -> Result<Self, KernelError> {
        if chunk == 0 {
            return Err(KernelError::InvalidProblem("chunk size 0".into()));
        }
        let k_split = p.k_dim.div_ceil(STATE_ROWS);
        let c = DeltaChunkLayout {
            place: ChunkLayout {
                rec: RecurrentLayout {
                    heads: p.v_heads,
                    k: p.k_dim,
                    v: p.v_dim,
                    block_v: (STATE_THREADS / k_split).min(32).min(p.v_dim),
                    k_split,
                    rows: p.k_dim.div_ceil(k_split),
                    scalar_gate: p.gated,
                    vector_gate: false,
                    value_gate: false,
                    reverse: false,
                    has_h0: p.has_initial_state,
                    has_ht,
                    varlen: p.cu_seqlens.is_some(),
                },
                chunk,
            },
            qk_heads: p.heads,
            group: p.group(),
            gated: p.gated,
        };
        let smem = 4 * state_smem_len(&c);
        let max_smem = client.properties().hardware.max_shared_memory_size;
        if smem > max_smem {
            return Err(KernelError::DeviceLimit(format!(
                "the delta chunk state pass needs {smem} bytes of shared memory, the device has \
                 {max_smem}"
            )));
        }
        let (chunks, first, count) = chunk_tables((0..p.num_seqs()).map(|n| p.bounds(n)), chunk);
        // The widest per-token buffers ([B·T, HV, K, V or C]) and the per-chunk states.
        let widest = p.tokens() * p.v_heads * p.k_dim.max(p.v_dim).max(chunk);
        addressable(widest, "a delta chunk buffer")?;
        addressable(
            count * p.v_heads * p.k_dim * p.v_dim,
            "the delta chunk states",
        )?;
        // Chunks on y and value heads on z (the per-chunk kernels), sequences times value heads
        // on y (the state pass), chunks on x and sequences on z (the tile-product kernels).
        let seqs = p.num_seqs();
        check_grid(
            client,
            (count, count.max(seqs * p.v_heads), p.v_heads.max(seqs)),
            "the delta chunk kernels",
        )?;
        let (cu, cu_len) = upload_cu_seqlens(client, p.cu_seqlens.as_deref());
        let dummy = client.create_from_slice(f32::as_bytes(&[0.0]));
        let chunks = client.create_from_slice(u32::as_bytes(&chunks));
        let gc = match g {
            Some(g) => {
                let (_, _, sc) = p.lens();
                let gc = client.empty(4 * sc);
                let units = count * p.v_heads;
                chunk_cumsum_kernel::launch::<R>(
                    client,
                    elementwise_grid(units),
                    CubeDim::new_1d(ELEMWISE_THREADS),
                    array(g, sc),
                    array(&chunks, 2 * count.max(1)),
                    array(&cu, cu_len),
                    array(&gc, sc),
                    p.seq_len as u32,
                    units as u32,
                    c.place,
                    p.dtype.storage(),
                );
                gc
            }
            None => dummy.clone(),
        };
        Ok(Self {
            client,
            p,
            c,
            chunks,
            first: client.create_from_slice(u32::as_bytes(&first)),
            count,
            cu,
            cu_len,
            gc,
            dummy,
            tiled: delta_tiled_layout(client, p, chunk),
        })
    }

    /// Elements of `[B·T, HV, width]`.
    fn per_token(&self, width: usize) -> usize {
        self.p.tokens() * self.p.v_heads * width
    }

    fn f32_buffer(&self, width: usize) -> Handle {
        self.client.empty(4 * self.per_token(width).max(1))
    }

    fn states_len(&self) -> usize {
        self.count * self.p.v_heads * self.p.k_dim * self.p.v_dim
    }

    /// Unit-per-entry cubes over `(entries of one chunk, chunk, value head)`.
    fn grid(&self, entries: usize) -> (CubeCount, CubeDim) {
        (
            CubeCount::Static(
                entries.div_ceil(ENTRY_THREADS) as u32,
                self.count as u32,
                self.p.v_heads as u32,
            ),
            CubeDim::new_1d(ENTRY_THREADS as u32),
        )
    }

    /// Cubes over (value block, sequence·value head); threads (value column, key-row split).
    fn state_grid(&self) -> (CubeCount, CubeDim) {
        (
            CubeCount::Static(
                self.p.v_dim.div_ceil(self.c.place.rec.block_v) as u32,
                (self.p.num_seqs() * self.p.v_heads) as u32,
                1,
            ),
            CubeDim::new_2d(
                self.c.place.rec.block_v as u32,
                self.c.place.rec.k_split as u32,
            ),
        )
    }

    fn g_len(&self) -> usize {
        if self.p.gated {
            self.p.lens().2
        } else {
            1
        }
    }

    /// `L` (`lmat`) or `A` as `[B·T, HV, C]`.
    fn qk_pairs(&self, a: &Handle, b: &Handle, beta: &Handle, lmat: bool) -> Handle {
        let (qk, _, sc) = self.p.lens();
        let out = self.f32_buffer(self.c.place.chunk);
        let (count, dim) = self.grid(self.c.place.chunk * self.c.place.chunk);
        delta_qk_pairs_kernel::launch::<R>(
            self.client,
            count,
            dim,
            array(a, qk),
            array(b, qk),
            array(beta, sc),
            array(&self.gc, self.g_len()),
            array(&self.chunks, 2 * self.count.max(1)),
            array(&self.cu, self.cu_len),
            array(&out, self.per_token(self.c.place.chunk)),
            self.p.seq_len as u32,
            self.c,
            lmat,
            self.p.dtype.storage(),
        );
        out
    }

    /// The per-chunk solve: forward fills `xk = W`, `xv = Ũ`; backward solves in place.
    #[allow(clippy::too_many_arguments)]
    fn solve(
        &self,
        k: &Handle,
        v: &Handle,
        beta: &Handle,
        lmat: &Handle,
        xk: &Handle,
        xv: &Handle,
        backward: bool,
    ) {
        let (qk, vo, sc) = self.p.lens();
        let (count, dim) = self.grid(self.p.k_dim + self.p.v_dim);
        delta_solve_kernel::launch::<R>(
            self.client,
            count,
            dim,
            array(k, qk),
            array(v, vo),
            array(beta, sc),
            array(&self.gc, self.g_len()),
            array(lmat, self.per_token(self.c.place.chunk)),
            array(&self.chunks, 2 * self.count.max(1)),
            array(&self.cu, self.cu_len),
            array(xk, self.per_token(self.p.k_dim)),
            array(xv, self.per_token(self.p.v_dim)),
            self.p.seq_len as u32,
            self.c,
            backward,
            self.p.dtype.storage(),
        );
    }

    /// The WY factors `L`, `W`, `Ũ`: by the tile-product kernel where it applies, else by the
    /// pair and solve kernels.
    /// With `tmat` (tiled only), the inverse `T = (I + L)⁻¹` is written there too.
    fn wy(&self, k: &Handle, v: &Handle, beta: &Handle, tmat: Option<&Handle>) -> [Handle; 3] {
        if let Some(l) = self.tiled {
            return tiled_wy(
                self.client,
                self.p,
                l,
                (k, v, beta, &self.gc),
                (&self.chunks, self.count),
                (&self.cu, self.cu_len),
                tmat,
            );
        }
        let lmat = self.qk_pairs(k, k, beta, true);
        let w = self.f32_buffer(self.p.k_dim);
        let ut = self.f32_buffer(self.p.v_dim);
        self.solve(k, v, beta, &lmat, &w, &ut, false);
        [lmat, w, ut]
    }

    /// `L`, `W`, `Ũ`, then the state pass: returns `(L, W, Ũ, states entering each chunk, U)`.
    fn forward_states(
        &self,
        k: &Handle,
        v: &Handle,
        beta: &Handle,
        h0: Option<&Handle>,
        ht: Option<&Handle>,
        tmat: Option<&Handle>,
    ) -> [Handle; 5] {
        let p = self.p;
        let [lmat, w, ut] = self.wy(k, v, beta, tmat);
        let states = self.client.empty(4 * self.states_len().max(1));
        let u = self.f32_buffer(p.v_dim);
        if let (Some(l), None, true) = (self.tiled, ht, tuning("FLA_DELTA_STATES") != Some(0)) {
            tiled_states(
                self.client,
                p,
                l,
                (k, &self.gc, h0),
                (&w, &ut),
                (&self.cu, self.cu_len, &self.first),
                (&states, self.states_len(), &u),
            );
            return [lmat, w, ut, states, u];
        }
        let (count, dim) = self.state_grid();
        delta_chunk_state_kernel::launch::<R>(
            self.client,
            count,
            dim,
            array(k, p.lens().0),
            array(&w, self.per_token(p.k_dim)),
            array(&ut, self.per_token(p.v_dim)),
            array(&self.gc, self.g_len()),
            array(h0.unwrap_or(&self.dummy), p.state_len()),
            array(&self.cu, self.cu_len),
            array(&self.first, p.num_seqs()),
            array(&states, self.states_len().max(1)),
            array(&u, self.per_token(p.v_dim)),
            array(ht.unwrap_or(&self.dummy), p.state_len()),
            p.seq_len as u32,
            self.c,
            h0.is_some(),
            ht.is_some(),
            p.dtype.storage(),
        );
        [lmat, w, ut, states, u]
    }

    /// The plain backward state pass: `dU` inside each chunk from the `A` pairs, then the walk
    /// that stores `dS_next` per chunk, completes `dU`, writes the decay term and leaves `dh0`.
    #[allow(clippy::type_complexity)]
    fn plain_dstate(
        &self,
        b: &DeltaBackwardBuffers<'_>,
        (w, u, states): (&Handle, &Handle, &Handle),
        dh0: Option<&Handle>,
        (du, d_states, cterm, cterm_len): (&Handle, &Handle, &Handle, usize),
    ) {
        let p = self.p;
        let (qk, vo, _) = p.lens();
        let chunk = self.c.place.chunk;
        let amat = self.qk_pairs(b.q, b.k, b.beta, false);
        let cu = || array(&self.cu, self.cu_len);
        if self.count > 0 {
            let (count, dim) = self.grid(chunk * p.v_dim);
            delta_du_intra_kernel::launch::<R>(
                self.client,
                count,
                dim,
                array(b.d_o, vo),
                array(&amat, self.per_token(chunk)),
                array(&self.chunks, 2 * self.count),
                cu(),
                array(du, vo),
                p.seq_len as u32,
                p.scale,
                self.c,
                p.dtype.storage(),
            );
        }
        let (count, dim) = self.state_grid();
        delta_chunk_dstate_kernel::launch::<R>(
            self.client,
            count,
            dim,
            array(b.q, qk),
            array(b.k, qk),
            array(b.d_o, vo),
            array(w, self.per_token(p.k_dim)),
            array(u, vo),
            array(&self.gc, self.g_len()),
            array(states, self.states_len().max(1)),
            array(b.d_ht.unwrap_or(&self.dummy), p.state_len()),
            cu(),
            array(&self.first, p.num_seqs()),
            array(d_states, self.states_len().max(1)),
            array(du, vo),
            array(cterm, cterm_len),
            array(dh0.unwrap_or(&self.dummy), p.state_len()),
            p.seq_len as u32,
            p.scale,
            self.c,
            b.d_ht.is_some(),
            dh0.is_some(),
            p.dtype.storage(),
        );
    }
}

/// Launches the chunkwise-parallel forward (chunk size `chunk`): writes `o` and, when asked, `ht`.
pub fn delta_chunk_forward<R: Runtime>(
    client: &ComputeClient<R>,
    p: &DeltaProblem,
    chunk: usize,
    b: DeltaForwardBuffers<'_>,
) -> Result<(), KernelError> {
    check(client, p, b.g, b.h0)?;
    forward_buffers_fit(p, &b)?;
    if p.output_final_state != b.ht.is_some() {
        return Err(KernelError::InvalidProblem(
            "final-state flag and buffer disagree".into(),
        ));
    }
    let call = DeltaChunkCall::new(client, p, chunk, b.g, b.ht.is_some())?;
    if let Some(l) = call.tiled {
        // The WY factors, then one walk per sequence with the state on chip.
        let [_, w, ut] = call.wy(b.k, b.v, b.beta, None);
        if p.num_seqs() > 0 {
            tiled_walk(
                client,
                p,
                l,
                (b.q, b.k, b.g, b.h0),
                (&w, &ut),
                (b.o, b.ht),
                (&call.cu, call.cu_len),
            );
        }
        return Ok(());
    }
    let [_, _, _, states, u] = call.forward_states(b.k, b.v, b.beta, b.h0, b.ht, None);
    if call.count == 0 {
        return Ok(());
    }
    let amat = call.qk_pairs(b.q, b.k, b.beta, false);
    let (count, dim) = call.grid(chunk * p.v_dim);
    let (qk, vo, _) = p.lens();
    delta_chunk_output_kernel::launch::<R>(
        client,
        count,
        dim,
        array(b.q, qk),
        array(&call.gc, call.g_len()),
        array(&states, call.states_len().max(1)),
        array(&amat, call.per_token(chunk)),
        array(&u, vo),
        array(&call.chunks, 2 * call.count),
        array(&call.cu, call.cu_len),
        array(b.o, vo),
        p.seq_len as u32,
        p.scale,
        call.c,
        p.dtype.storage(),
    );
    Ok(())
}

/// Launches the chunkwise-parallel backward. The forward's intermediates (`L`, `W`, `Ũ`, the
/// per-chunk states, `U`) are recomputed rather than kept alive between the passes.
pub fn delta_chunk_backward<R: Runtime>(
    client: &ComputeClient<R>,
    p: &DeltaProblem,
    chunk: usize,
    b: DeltaBackwardBuffers<'_>,
) -> Result<(), KernelError> {
    check(client, p, b.g, b.h0)?;
    backward_buffers_fit(p, &b)?;
    let dh0 = if p.has_initial_state {
        Some(need(b.dh0, "dh0")?)
    } else {
        None
    };
    let dg = if p.gated {
        Some(need(b.dg, "dg")?)
    } else {
        None
    };
    // The plain dβ/dg pass walks a chunk's tokens over K and V in one invocation, which lavapipe
    // cuts off past its loop limit (a silent wrong answer): refused there.
    let iterations = chunk.min(p.longest()) * (p.k_dim + p.v_dim) + p.v_dim;
    if is_cpu_vulkan(client) && iterations > CPU_VULKAN_MAX_ITERATIONS {
        return Err(KernelError::DeviceLimit(format!(
            "the delta chunk backward at chunk {chunk}, K = {}, V = {} runs {iterations} loop \
             iterations in one invocation, more than a CPU Vulkan driver (lavapipe) runs; use a \
             smaller chunk, the recurrent form, or a GPU",
            p.k_dim, p.v_dim
        )));
    }
    let call = DeltaChunkCall::new(client, p, chunk, b.g, false)?;
    // The tile-product tail takes the transposed solve and everything after it where it fits;
    // it reads the WY kernel's inverse `T`.
    let tail = call.tiled.and_then(|l| tail_layout(client, p, l));
    let tmat = tail.map(|_| call.f32_buffer(chunk));
    let [lmat, w, ut, states, u] = call.forward_states(b.k, b.v, b.beta, b.h0, None, tmat.as_ref());
    let (qk, vo, sc) = p.lens();
    let (kd, vd) = (p.k_dim, p.v_dim);
    let tok_c = call.per_token(chunk);
    let chunks = || array(&call.chunks, 2 * call.count.max(1));
    let cu = || array(&call.cu, call.cu_len);
    let gc = || array(&call.gc, call.g_len());
    let seq = p.seq_len as u32;
    let dtype = p.dtype.storage();

    let du = call.f32_buffer(vd);
    let d_states = client.empty(4 * call.states_len().max(1));
    let cterm_len = (call.count * p.v_heads * vd).max(1);
    let cterm = client.empty(4 * cterm_len);
    if let Some(l) = call
        .tiled
        .filter(|_| tuning("FLA_DELTA_DSTATE") != Some(0))
        .and_then(|l| dstate_layout(client, p, l))
    {
        tiled_dstate(
            client,
            p,
            l,
            (b.q, b.k, b.d_o, &call.gc),
            (&w, &u, &states, call.states_len()),
            (b.d_ht, dh0),
            (&call.cu, call.cu_len, &call.first),
            (&d_states, &du, &cterm, cterm_len),
        );
    } else {
        call.plain_dstate(
            &b,
            (&w, &u, &states),
            dh0,
            (&du, &d_states, &cterm, cterm_len),
        );
    }
    if call.count == 0 {
        return Ok(());
    }
    let dq_hv = call.f32_buffer(kd);
    let dk_minus = call.f32_buffer(kd);
    let dw = call.f32_buffer(kd);
    if let Some(fl) = call.tiled.and_then(|l| dqk_registers(client, p, l)) {
        frag_dqk(
            client,
            p,
            fl,
            (b.q, b.k, b.d_o, &call.gc),
            (&u, &du, &states, &d_states),
            (&call.chunks, call.count),
            (&call.cu, call.cu_len),
            (&dq_hv, &dk_minus, &dw),
        );
    } else if let Some(l) = call.tiled.and_then(|l| dqk_layout(client, p, l)) {
        tiled_dqk(
            client,
            p,
            l,
            (b.q, b.k, b.d_o, &call.gc),
            (&u, &du, &states, &d_states),
            (&call.chunks, call.count),
            (&call.cu, call.cu_len),
            (&dq_hv, &dk_minus, &dw),
        );
    } else {
        let d_amat = call.f32_buffer(chunk);
        let (count, dim) = call.grid(chunk * chunk);
        delta_do_u_pairs_kernel::launch::<R>(
            client,
            count,
            dim,
            array(b.d_o, vo),
            array(&u, vo),
            chunks(),
            cu(),
            array(&d_amat, tok_c),
            seq,
            p.scale,
            call.c,
            dtype,
        );
        let (count, dim) = call.grid(chunk * kd);
        delta_chunk_dqk_kernel::launch::<R>(
            client,
            count,
            dim,
            array(b.q, qk),
            array(b.k, qk),
            array(b.d_o, vo),
            gc(),
            array(&states, call.states_len()),
            array(&d_states, call.states_len()),
            array(&d_amat, tok_c),
            array(&u, vo),
            array(&du, vo),
            chunks(),
            cu(),
            array(&dq_hv, call.per_token(kd)),
            array(&dk_minus, call.per_token(kd)),
            array(&dw, call.per_token(kd)),
            seq,
            p.scale,
            call.c,
            dtype,
        );
    }
    let group_sum = |src: &Handle, dst: &Handle| {
        group_sum_kernel::launch::<R>(
            client,
            elementwise_grid(qk),
            CubeDim::new_1d(ELEMWISE_THREADS),
            array(src, call.per_token(kd)),
            array(dst, qk),
            qk as u32,
            call.per_token(kd) as u32,
            kd as u32,
            p.group() as u32,
            1,
            dtype,
        )
    };
    if let (Some(l), Some(tmat)) = (tail, &tmat) {
        tiled_tail(
            client,
            p,
            l,
            (b.q, b.k, b.v, b.beta, &call.gc),
            (tmat, &w, &ut),
            (&dw, &du, &dq_hv, &cterm, cterm_len),
            (&call.chunks, call.count),
            (&call.cu, call.cu_len),
            (&dk_minus, b.dv, b.dbeta, dg),
        );
        group_sum(&dq_hv, b.dq);
        group_sum(&dk_minus, b.dk);
        return Ok(());
    }
    // dW → dR_W and dU → dR_U in place.
    call.solve(b.k, b.v, b.beta, &lmat, &dw, &du, true);
    let d_lmat = call.f32_buffer(chunk);
    let (count, dim) = call.grid(chunk * chunk);
    delta_dl_pairs_kernel::launch::<R>(
        client,
        count,
        dim,
        array(&dw, call.per_token(kd)),
        array(&du, vo),
        array(&w, call.per_token(kd)),
        array(&ut, vo),
        chunks(),
        cu(),
        array(&d_lmat, tok_c),
        seq,
        call.c,
    );
    let dkb = call.f32_buffer(kd);
    let (count, dim) = call.grid(chunk * (kd + vd));
    delta_chunk_dkv_kernel::launch::<R>(
        client,
        count,
        dim,
        array(b.k, qk),
        array(b.beta, sc),
        gc(),
        array(&d_lmat, tok_c),
        array(&dw, call.per_token(kd)),
        array(&du, vo),
        chunks(),
        cu(),
        array(&dkb, call.per_token(kd)),
        array(&dk_minus, call.per_token(kd)),
        array(b.dv, vo),
        seq,
        call.c,
        dtype,
    );
    let units = call.count * p.v_heads;
    delta_chunk_scalars_kernel::launch::<R>(
        client,
        elementwise_grid(units),
        CubeDim::new_1d(ELEMWISE_THREADS),
        array(b.q, qk),
        array(b.k, qk),
        array(b.v, vo),
        array(b.beta, sc),
        array(&dq_hv, call.per_token(kd)),
        array(&dk_minus, call.per_token(kd)),
        array(&dkb, call.per_token(kd)),
        array(&du, vo),
        array(&cterm, cterm_len),
        chunks(),
        cu(),
        array(b.dbeta, sc),
        array(dg.unwrap_or(&call.dummy), if p.gated { sc } else { 1 }),
        seq,
        units as u32,
        call.c,
        dtype,
    );
    group_sum(&dq_hv, b.dq);
    delta_dk_combine_kernel::launch::<R>(
        client,
        elementwise_grid(qk),
        CubeDim::new_1d(ELEMWISE_THREADS),
        array(&dk_minus, call.per_token(kd)),
        array(&dkb, call.per_token(kd)),
        array(b.beta, sc),
        array(b.dk, qk),
        qk as u32,
        call.c,
        dtype,
    );
    Ok(())
}
