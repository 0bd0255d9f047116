//! Host-side launchers of the delta-rule kernels: validate, choose tiles, launch.

use cubecl::prelude::*;
use cubecl::server::Handle;

use super::recurrent::{
    delta_bwd_kernel, delta_fwd_kernel, group_sum_kernel, stage_len, DeltaLayout, CHECKPOINT_EVERY,
};
use super::DeltaProblem;
use crate::gated::recurrent_fwd::RecurrentLayout;
use crate::gated::{
    array, check_grid, check_loop_limit, elementwise_grid, need, tiles_for, upload_cu_seqlens,
    ELEMWISE_THREADS,
};
use crate::problem::{addressable, fits, fits_opt};
use crate::KernelError;

/// Device buffers of a forward call (layouts in the module docs). Inputs are in the problem's
/// dtype; `h0` and `ht` are `f32`.
pub struct DeltaForwardBuffers<'a> {
    pub q: &'a Handle,
    pub k: &'a Handle,
    pub v: &'a Handle,
    pub beta: &'a Handle,
    /// Gated problems only.
    pub g: Option<&'a Handle>,
    pub h0: Option<&'a Handle>,
    /// Output `[B·T, HV, V]`.
    pub o: &'a Handle,
    /// Output `[N, HV, K, V]`, when the problem asks for the final state.
    pub ht: Option<&'a Handle>,
}

/// Device buffers of a backward call; every output is written in full.
pub struct DeltaBackwardBuffers<'a> {
    pub q: &'a Handle,
    pub k: &'a Handle,
    pub v: &'a Handle,
    pub beta: &'a Handle,
    pub g: Option<&'a Handle>,
    pub h0: Option<&'a Handle>,
    pub d_o: &'a Handle,
    pub d_ht: Option<&'a Handle>,
    pub dq: &'a Handle,
    pub dk: &'a Handle,
    pub dv: &'a Handle,
    pub dbeta: &'a Handle,
    /// Same shape as `g`, for gated problems.
    pub dg: Option<&'a Handle>,
    pub dh0: Option<&'a Handle>,
}

/// What this device refuses of a problem whatever the form and direction: the problem itself,
/// the dtype, lavapipe's loop limit, the grid's sequence axis. Callers that defer the launch
/// (Burn's fusion stream, the backward recorded for autodiff) run it first, so the deferred
/// launch does not fail on them.
pub fn delta_check_device<R: Runtime>(
    client: &ComputeClient<R>,
    p: &DeltaProblem,
) -> Result<(), KernelError> {
    p.validate()?;
    p.dtype.check_supported(client)?;
    check_loop_limit(client, p.longest())?;
    // Sequences times value heads on y, in both forms' kernels.
    check_grid(
        client,
        (1, p.num_seqs() * p.v_heads, 1),
        "the delta-rule kernels",
    )
}

/// Checks shared by both forms: [`delta_check_device`], and that the optional buffers match
/// the problem's flags.
pub(super) fn check<R: Runtime>(
    client: &ComputeClient<R>,
    p: &DeltaProblem,
    g: Option<&Handle>,
    h0: Option<&Handle>,
) -> Result<(), KernelError> {
    delta_check_device(client, p)?;
    if p.gated != g.is_some() {
        return Err(KernelError::InvalidProblem(format!(
            "gated = {} does not match the decay buffer given ({})",
            p.gated,
            g.is_some()
        )));
    }
    if p.has_initial_state != h0.is_some() {
        return Err(KernelError::InvalidProblem(
            "initial-state flag and buffer disagree".into(),
        ));
    }
    Ok(())
}

/// Every buffer of a forward call holds what the problem indexes (see [`fits`]).
pub(super) fn forward_buffers_fit(
    p: &DeltaProblem,
    b: &DeltaForwardBuffers<'_>,
) -> Result<(), KernelError> {
    let (qk, vo, sc) = p.lens();
    let e = p.dtype.size();
    for (name, h, n) in [
        ("q", b.q, qk),
        ("k", b.k, qk),
        ("v", b.v, vo),
        ("o", b.o, vo),
    ] {
        fits(name, h, n, e)?;
    }
    fits("beta", b.beta, sc, e)?;
    fits_opt("g", b.g, sc, e)?;
    fits_opt("h0", b.h0, p.state_len(), 4)?;
    fits_opt("ht", b.ht, p.state_len(), 4)
}

/// Every buffer of a backward call holds what the problem indexes (see [`fits`]).
pub(super) fn backward_buffers_fit(
    p: &DeltaProblem,
    b: &DeltaBackwardBuffers<'_>,
) -> Result<(), KernelError> {
    let (qk, vo, sc) = p.lens();
    let e = p.dtype.size();
    for (name, h, n) in [
        ("q", b.q, qk),
        ("k", b.k, qk),
        ("v", b.v, vo),
        ("d_o", b.d_o, vo),
        ("dq", b.dq, qk),
        ("dk", b.dk, qk),
        ("dv", b.dv, vo),
        ("beta", b.beta, sc),
        ("dbeta", b.dbeta, sc),
    ] {
        fits(name, h, n, e)?;
    }
    fits_opt("g", b.g, sc, e)?;
    fits_opt("dg", b.dg, sc, e)?;
    for (name, h) in [("h0", b.h0), ("d_ht", b.d_ht), ("dh0", b.dh0)] {
        fits_opt(name, h, p.state_len(), 4)?;
    }
    Ok(())
}

/// Tiles and layout; `backward` adds the backward's reduction buffers to the shared memory.
fn layout<R: Runtime>(
    client: &ComputeClient<R>,
    p: &DeltaProblem,
    backward: bool,
) -> Result<DeltaLayout, KernelError> {
    let (block_v, k_split) = tiles_for(client, p.k_dim, p.v_dim, |bv, ks, rows| {
        if backward {
            stage_len(p.k_dim) + 3 * bv * ks + rows * ks * (bv + 1)
        } else {
            3 * stage_len(p.k_dim) + 6 * bv * ks
        }
    })?;
    Ok(DeltaLayout {
        rec: RecurrentLayout {
            heads: p.v_heads,
            k: p.k_dim,
            v: p.v_dim,
            block_v,
            k_split,
            rows: p.k_dim.div_ceil(k_split),
            scalar_gate: false,
            vector_gate: false,
            value_gate: false,
            reverse: false,
            has_h0: p.has_initial_state,
            has_ht: p.output_final_state,
            varlen: p.cu_seqlens.is_some(),
        },
        qk_heads: p.heads,
        group: p.group(),
        gated: p.gated,
        span: checkpoint_span()?,
    })
}

/// Steps between the backward's stored states: [`CHECKPOINT_EVERY`], or `FLA_DELTA_SPAN` (1 to
/// 256) when set, a knob for measuring the trade between checkpoint memory and replay cost.
fn checkpoint_span() -> Result<usize, KernelError> {
    match std::env::var("FLA_DELTA_SPAN") {
        Err(_) => Ok(CHECKPOINT_EVERY),
        Ok(v) => match v.parse::<usize>() {
            Ok(n) if (1..=256).contains(&n) => Ok(n),
            _ => Err(KernelError::InvalidProblem(format!(
                "FLA_DELTA_SPAN={v:?} is not a step count from 1 to 256"
            ))),
        },
    }
}

fn grid<R: Runtime>(
    client: &ComputeClient<R>,
    p: &DeltaProblem,
    c: &DeltaLayout,
) -> Result<(CubeCount, CubeDim), KernelError> {
    let nv = p.v_dim.div_ceil(c.rec.block_v);
    let nh = p.num_seqs() * p.v_heads;
    check_grid(client, (nv, nh, 1), "the delta recurrent kernels")?;
    Ok((
        CubeCount::Static(nv as u32, nh as u32, 1),
        CubeDim::new_2d(c.rec.block_v as u32, c.rec.k_split as u32),
    ))
}

/// Launches the fused recurrent forward: writes `o` and, when asked, `ht`.
pub fn delta_forward<R: Runtime>(
    client: &ComputeClient<R>,
    p: &DeltaProblem,
    b: DeltaForwardBuffers<'_>,
) -> Result<(), KernelError> {
    check(client, p, b.g, b.h0)?;
    forward_buffers_fit(p, &b)?;
    if p.output_final_state != b.ht.is_some() {
        return Err(KernelError::InvalidProblem(
            "final-state flag and buffer disagree".into(),
        ));
    }
    let c = layout(client, p, false)?;
    let (count, dim) = grid(client, p, &c)?;
    let (cu, cu_len) = upload_cu_seqlens(client, p.cu_seqlens.as_deref());
    let dummy = client.create_from_slice(f32::as_bytes(&[0.0]));
    let (qk, vo, sc) = p.lens();
    delta_fwd_kernel::launch::<R>(
        client,
        count,
        dim,
        array(b.q, qk),
        array(b.k, qk),
        array(b.v, vo),
        array(b.beta, sc),
        array(b.g.unwrap_or(&dummy), sc),
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

/// Launches the fused recurrent backward and the kernels that sum its partials.
pub fn delta_backward<R: Runtime>(
    client: &ComputeClient<R>,
    p: &DeltaProblem,
    b: DeltaBackwardBuffers<'_>,
) -> Result<(), KernelError> {
    check(client, p, b.g, b.h0)?;
    backward_buffers_fit(p, &b)?;
    let c = layout(client, p, true)?;
    let (count, dim) = grid(client, p, &c)?;
    let (cu, cu_len) = upload_cu_seqlens(client, p.cu_seqlens.as_deref());
    let dummy = client.create_from_slice(f32::as_bytes(&[0.0]));
    let tokens = p.tokens();
    let (qk, vo, sc) = p.lens();
    let nv = p.v_dim.div_ceil(c.rec.block_v);
    // Partials: over value blocks per value head for dq/dk, [NV, tokens, HV, K]; per value
    // column for dβ/dg, [tokens, HV, V].
    let qk_part = tokens * p.v_heads * p.k_dim;
    let max_spans = p.longest().div_ceil(c.span).max(1);
    let ckpt_len = p.num_seqs() * p.v_heads * max_spans * p.k_dim * p.v_dim;
    addressable(nv * qk_part, "the delta backward's partial dq/dk")?;
    addressable(ckpt_len, "the delta backward's state checkpoints")?;
    let dq_part = client.empty(4 * nv * qk_part);
    let dk_part = client.empty(4 * nv * qk_part);
    let dbeta_part = client.empty(4 * vo);
    let dg_part = p.gated.then(|| client.empty(4 * vo));
    let checkpoints = client.empty(4 * ckpt_len.max(1));
    let dh0 = if p.has_initial_state {
        need(b.dh0, "dh0")?
    } else {
        &dummy
    };
    let dg = if p.gated {
        Some(need(b.dg, "dg")?)
    } else {
        None
    };
    delta_bwd_kernel::launch::<R>(
        client,
        count,
        dim,
        array(b.q, qk),
        array(b.k, qk),
        array(b.v, vo),
        array(b.beta, sc),
        array(b.g.unwrap_or(&dummy), sc),
        array(b.h0.unwrap_or(&dummy), p.state_len()),
        array(&cu, cu_len),
        array(b.d_o, vo),
        array(b.d_ht.unwrap_or(&dummy), p.state_len()),
        array(&checkpoints, ckpt_len),
        array(&dq_part, nv * qk_part),
        array(&dk_part, nv * qk_part),
        array(&dbeta_part, vo),
        array(dg_part.as_ref().unwrap_or(&dummy), vo),
        array(b.dv, vo),
        array(dh0, p.state_len()),
        p.seq_len as u32,
        tokens as u32,
        max_spans as u32,
        p.scale,
        c,
        b.d_ht.is_some(),
        p.dtype.storage(),
    );

    let sum = |part: &Handle, blocks: usize, part_len: usize, out: &Handle, len, inner, group| {
        group_sum_kernel::launch::<R>(
            client,
            elementwise_grid(len),
            CubeDim::new_1d(ELEMWISE_THREADS),
            array(part, blocks * part_len),
            array(out, len),
            len as u32,
            part_len as u32,
            inner as u32,
            group as u32,
            blocks as u32,
            p.dtype.storage(),
        );
    };
    sum(&dq_part, nv, qk_part, b.dq, qk, p.k_dim, p.group());
    sum(&dk_part, nv, qk_part, b.dk, qk, p.k_dim, p.group());
    sum(&dbeta_part, 1, vo, b.dbeta, sc, 1, p.v_dim);
    if let (Some(part), Some(dg)) = (&dg_part, dg) {
        sum(part, 1, vo, dg, sc, 1, p.v_dim);
    }
    Ok(())
}
