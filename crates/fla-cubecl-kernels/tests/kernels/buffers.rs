//! Every launcher refuses a buffer shorter than its problem indexes. The kernels run unchecked,
//! indexing by the problem's extents, so a short buffer would otherwise be read or written past
//! its end (another allocation's memory on a GPU). Each case makes one buffer at a time one
//! element short, the others exact, and expects [`KernelError::Buffer`] naming that buffer;
//! nothing is launched, so the cases cost no kernel compilation.

use cubecl::prelude::*;
use cubecl::server::Handle;
use fla_cubecl_kernels::adamw::{adamw_step, AdamWProblem, AdamWStep, Slot};
use fla_cubecl_kernels::attn::{
    attn_backward, attn_forward, AttnBackwardBuffers, AttnForwardBuffers, AttnProblem,
};
use fla_cubecl_kernels::cross_entropy::{
    cross_entropy_backward, cross_entropy_forward, CrossEntropyProblem,
};
use fla_cubecl_kernels::delta::{
    delta_backward, delta_chunk_backward, delta_chunk_forward, delta_forward, DeltaBackwardBuffers,
    DeltaForwardBuffers, DeltaProblem,
};
use fla_cubecl_kernels::gated::{
    chunk_backward, chunk_forward, recurrent_backward, recurrent_forward, BackwardBuffers,
    ForwardBuffers, GateKind, GatedProblem,
};
use fla_cubecl_kernels::norm::{
    norm_backward, norm_forward, NormBackwardBuffers, NormForwardBuffers, NormProblem,
};
use fla_cubecl_kernels::swiglu::{swiglu_backward, swiglu_forward, SwigluProblem};
use fla_cubecl_kernels::{FloatDType, KernelError};
use rstest::rstest;

use crate::common::runtime_name;

/// A buffer of a launch: its name in the launcher's errors, elements, bytes per element.
type Spec = (&'static str, usize, usize);

/// Calls `launch` once per buffer of `specs` with that buffer one element short and every other
/// exact, and checks the refusal names it.
fn each_short<R: Runtime>(
    client: &ComputeClient<R>,
    what: &str,
    specs: &[Spec],
    launch: impl Fn(&[Handle]) -> Result<(), KernelError>,
) {
    for short in 0..specs.len() {
        let handles: Vec<Handle> = specs
            .iter()
            .enumerate()
            .map(|(i, &(_, n, bytes))| {
                assert!(n > 1, "a spec needs two elements to be made short");
                client.empty((n - usize::from(i == short)) * bytes)
            })
            .collect();
        let name = specs[short].0;
        match launch(&handles) {
            Err(KernelError::Buffer(m)) => assert!(
                m.starts_with(&format!("{name} holds ")),
                "{what}: {name} was short, the error names another: {m}"
            ),
            other => panic!("{what}: {name} one element short was not refused: {other:?}"),
        }
    }
}

const F: usize = 4;

fn swiglu<R: Runtime>(client: &ComputeClient<R>) {
    let p = SwigluProblem {
        len: 10,
        dtype: FloatDType::F32,
    };
    let n = p.len;
    each_short(
        client,
        "swiglu forward",
        &[("g", n, F), ("u", n, F), ("y", n, F)],
        |h| swiglu_forward(client, &p, &h[0], &h[1], &h[2]),
    );
    let specs = [
        ("g", n, F),
        ("u", n, F),
        ("dy", n, F),
        ("dg", n, F),
        ("du", n, F),
    ];
    each_short(client, "swiglu backward", &specs, |h| {
        swiglu_backward(client, &p, [&h[0], &h[1], &h[2]], [&h[3], &h[4]])
    });
}

fn norm<R: Runtime>(client: &ComputeClient<R>) {
    let p = NormProblem {
        rows: 3,
        dim: 8,
        eps: 1e-6,
        gated: true,
        dtype: FloatDType::F32,
    };
    let (n, d, r) = (p.rows * p.dim, p.dim, p.rows);
    let specs = [
        ("x", n, F),
        ("w", d, F),
        ("g", n, F),
        ("y", n, F),
        ("rstd", r, 4),
    ];
    each_short(client, "norm forward", &specs, |h| {
        let b = NormForwardBuffers {
            x: &h[0],
            w: &h[1],
            g: Some(&h[2]),
            y: &h[3],
            rstd: &h[4],
        };
        norm_forward(client, &p, b)
    });
    let specs = [
        ("x", n, F),
        ("w", d, F),
        ("g", n, F),
        ("rstd", r, 4),
        ("dy", n, F),
        ("dx", n, F),
        ("dw", d, F),
        ("dg", n, F),
    ];
    each_short(client, "norm backward", &specs, |h| {
        let b = NormBackwardBuffers {
            x: &h[0],
            w: &h[1],
            g: Some(&h[2]),
            rstd: &h[3],
            dy: &h[4],
            dx: &h[5],
            dw: &h[6],
            dg: Some(&h[7]),
        };
        norm_backward(client, &p, b)
    });
}

fn cross_entropy<R: Runtime>(client: &ComputeClient<R>) {
    let p = CrossEntropyProblem {
        rows: 3,
        vocab: 10,
        dtype: FloatDType::F32,
    };
    let (n, r) = (p.rows * p.vocab, p.rows);
    let specs = [
        ("logits", n, F),
        ("targets", r, 4),
        ("loss", r, 4),
        ("lse", r, 4),
    ];
    each_short(client, "cross-entropy forward", &specs, |h| {
        cross_entropy_forward(client, &p, [&h[0], &h[1]], [&h[2], &h[3]])
    });
    let specs = [
        ("logits", n, F),
        ("targets", r, 4),
        ("lse", r, 4),
        ("dloss", r, 4),
        ("dlogits", n, F),
    ];
    each_short(client, "cross-entropy backward", &specs, |h| {
        cross_entropy_backward(client, &p, [&h[0], &h[1], &h[2], &h[3]], &h[4])
    });
}

fn adamw<R: Runtime>(client: &ComputeClient<R>) {
    let p = AdamWProblem {
        len: 10,
        dtype: FloatDType::F32,
        has_state: true,
    };
    let s = AdamWStep {
        lr: 1e-3,
        beta_1: 0.9,
        beta_2: 0.999,
        epsilon: 1e-8,
        weight_decay: 0.01,
        cautious_weight_decay: false,
        clip: None,
        time: 2,
    };
    let n = p.len;
    let specs = [("grad", n, F), ("param", n, F), ("m", n, F), ("v", n, F)];
    each_short(client, "adamw", &specs, |h| {
        let [p_, m, v] = [1, 2, 3].map(|i| Slot::InPlace(&h[i]));
        adamw_step(client, &p, &s, &h[0], [p_, m, v])
    });
    // Results written to fresh buffers: the sources and the targets are both checked.
    let specs = [
        ("grad", n, F),
        ("param", n, F),
        ("m", n, F),
        ("v", n, F),
        ("param", n, F),
        ("m", n, F),
        ("v", n, F),
    ];
    each_short(client, "adamw into fresh buffers", &specs, |h| {
        let [p_, m, v] = [1, 2, 3].map(|i| Slot::Into {
            from: &h[i],
            to: &h[i + 3],
        });
        adamw_step(client, &p, &s, &h[0], [p_, m, v])
    });
}

fn attn<R: Runtime>(client: &ComputeClient<R>) {
    let p = AttnProblem {
        batch: 1,
        q_len: 5,
        kv_len: 5,
        heads: 2,
        kv_heads: 1,
        k_dim: 4,
        v_dim: 6,
        scale: 0.5,
        causal: true,
        window: None,
        softcap: None,
        cu_seqlens: None,
        dtype: FloatDType::F32,
    };
    let (nq, nk, nv, no, nl) = p.lens();
    let specs = [
        ("q", nq, F),
        ("k", nk, F),
        ("v", nv, F),
        ("o", no, F),
        ("lse", nl, 4),
    ];
    each_short(client, "attention forward", &specs, |h| {
        let b = AttnForwardBuffers {
            q: &h[0],
            k: &h[1],
            v: &h[2],
            o: &h[3],
            lse: &h[4],
        };
        attn_forward(client, &p, b)
    });
    // The forward's buffers (`o` and `lse` now read), then the gradients.
    let specs = [
        &specs[..],
        &[("d_o", no, F), ("dq", nq, F), ("dk", nk, F), ("dv", nv, F)],
    ]
    .concat();
    each_short(client, "attention backward", &specs, |h| {
        let b = AttnBackwardBuffers {
            q: &h[0],
            k: &h[1],
            v: &h[2],
            o: &h[3],
            lse: &h[4],
            d_o: &h[5],
            dq: &h[6],
            dk: &h[7],
            dv: &h[8],
        };
        attn_backward(client, &p, b)
    });
}

/// Both forms of the gated family, with every optional buffer present (key and value gates, the
/// initial and final states).
fn gated<R: Runtime>(client: &ComputeClient<R>) {
    let p = GatedProblem {
        batch: 1,
        seq_len: 5,
        heads: 2,
        k_dim: 4,
        v_dim: 6,
        gate: GateKind::Vector,
        value_gate: true,
        scale: 0.5,
        reverse: false,
        cu_seqlens: None,
        has_initial_state: true,
        output_final_state: true,
        dtype: FloatDType::F32,
    };
    let qk = p.tokens() * p.heads * p.k_dim;
    let vo = p.tokens() * p.heads * p.v_dim;
    let (gl, st) = (p.gate_len(), p.state_len());
    let specs = [
        ("q", qk, F),
        ("k", qk, F),
        ("v", vo, F),
        ("g", gl, F),
        ("gv", vo, F),
        ("h0", st, 4),
        ("o", vo, F),
        ("ht", st, 4),
    ];
    let forward = |h: &[Handle], chunked: bool| {
        let b = ForwardBuffers {
            q: &h[0],
            k: &h[1],
            v: &h[2],
            g: Some(&h[3]),
            gv: Some(&h[4]),
            h0: Some(&h[5]),
            o: &h[6],
            ht: Some(&h[7]),
            scores: None,
        };
        if chunked {
            chunk_forward(client, &p, 64, b)
        } else {
            recurrent_forward(client, &p, b)
        }
    };
    each_short(client, "gated recurrent forward", &specs, |h| {
        forward(h, false)
    });
    each_short(client, "gated chunk forward", &specs, |h| forward(h, true));
    // The forward's buffers (`o` and `ht` now read), then the gradients.
    let specs = [
        &specs[..],
        &[
            ("d_o", vo, F),
            ("d_ht", st, 4),
            ("dq", qk, F),
            ("dk", qk, F),
            ("dv", vo, F),
            ("dg", gl, F),
            ("dgv", vo, F),
            ("dh0", st, 4),
        ],
    ]
    .concat();
    let backward = |h: &[Handle], chunked: bool| {
        let b = BackwardBuffers {
            q: &h[0],
            k: &h[1],
            v: &h[2],
            g: Some(&h[3]),
            gv: Some(&h[4]),
            h0: Some(&h[5]),
            o: Some(&h[6]),
            ht: Some(&h[7]),
            d_o: &h[8],
            d_ht: Some(&h[9]),
            dq: &h[10],
            dk: &h[11],
            dv: &h[12],
            dg: Some(&h[13]),
            dgv: Some(&h[14]),
            dh0: Some(&h[15]),
            scores: None,
        };
        if chunked {
            chunk_backward(client, &p, 64, b)
        } else {
            recurrent_backward(client, &p, b)
        }
    };
    each_short(client, "gated recurrent backward", &specs, |h| {
        backward(h, false)
    });
    each_short(client, "gated chunk backward", &specs, |h| {
        backward(h, true)
    });
}

/// Both forms of the delta rule, gated, grouped value heads, with both states.
fn delta<R: Runtime>(client: &ComputeClient<R>) {
    let p = DeltaProblem {
        batch: 1,
        seq_len: 5,
        heads: 1,
        v_heads: 2,
        k_dim: 4,
        v_dim: 6,
        gated: true,
        scale: 0.5,
        cu_seqlens: None,
        has_initial_state: true,
        output_final_state: true,
        dtype: FloatDType::F32,
    };
    let (qk, vo, sc) = p.lens();
    let st = p.state_len();
    let specs = [
        ("q", qk, F),
        ("k", qk, F),
        ("v", vo, F),
        ("beta", sc, F),
        ("g", sc, F),
        ("h0", st, 4),
        ("o", vo, F),
        ("ht", st, 4),
    ];
    let forward = |h: &[Handle], chunked: bool| {
        let b = DeltaForwardBuffers {
            q: &h[0],
            k: &h[1],
            v: &h[2],
            beta: &h[3],
            g: Some(&h[4]),
            h0: Some(&h[5]),
            o: &h[6],
            ht: Some(&h[7]),
        };
        if chunked {
            delta_chunk_forward(client, &p, 64, b)
        } else {
            delta_forward(client, &p, b)
        }
    };
    each_short(client, "delta recurrent forward", &specs, |h| {
        forward(h, false)
    });
    each_short(client, "delta chunk forward", &specs, |h| forward(h, true));
    // The forward's inputs (its outputs are not read), then the gradients.
    let specs = [
        &specs[..6],
        &[
            ("d_o", vo, F),
            ("d_ht", st, 4),
            ("dq", qk, F),
            ("dk", qk, F),
            ("dv", vo, F),
            ("dbeta", sc, F),
            ("dg", sc, F),
            ("dh0", st, 4),
        ],
    ]
    .concat();
    let backward = |h: &[Handle], chunked: bool| {
        let b = DeltaBackwardBuffers {
            q: &h[0],
            k: &h[1],
            v: &h[2],
            beta: &h[3],
            g: Some(&h[4]),
            h0: Some(&h[5]),
            d_o: &h[6],
            d_ht: Some(&h[7]),
            dq: &h[8],
            dk: &h[9],
            dv: &h[10],
            dbeta: &h[11],
            dg: Some(&h[12]),
            dh0: Some(&h[13]),
        };
        if chunked {
            delta_chunk_backward(client, &p, 64, b)
        } else {
            delta_backward(client, &p, b)
        }
    };
    each_short(client, "delta recurrent backward", &specs, |h| {
        backward(h, false)
    });
    each_short(client, "delta chunk backward", &specs, |h| {
        backward(h, true)
    });
}

#[rstest]
#[case::swiglu("swiglu")]
#[case::norm("norm")]
#[case::cross_entropy("cross_entropy")]
#[case::adamw("adamw")]
#[case::attn("attn")]
#[case::gated("gated")]
#[case::delta("delta")]
fn short_buffers_are_refused(#[case] family: &str) {
    match family {
        "swiglu" => on_runtime!(swiglu()),
        "norm" => on_runtime!(norm()),
        "cross_entropy" => on_runtime!(cross_entropy()),
        "adamw" => on_runtime!(adamw()),
        "attn" => on_runtime!(attn()),
        "gated" => on_runtime!(gated()),
        "delta" => on_runtime!(delta()),
        other => unreachable!("no family {other}"),
    }
}
