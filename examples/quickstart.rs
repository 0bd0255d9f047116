//! Runs each variant of the gated family through its Burn op on the default backend (`Wgpu`,
//! fusion on), forward and backward, and prints how far it lands from the f64 reference.
//!   cargo run --example quickstart

use burn::backend::{Autodiff, Wgpu};
use burn::tensor::{FloatDType, Tensor, TensorData};
use fla::kernels::gated::GateKind;
use fla::kernels::testing::{problem, rel_rmse, GatedCase};
use fla::kernels::FloatDType as KernelDType;
use fla::ops::device::check_wgpu;
use fla::ops::{
    fused_recurrent_gla, fused_recurrent_linear_attn, fused_recurrent_simple_gla, RecurrentOptions,
};

type B = Autodiff<Wgpu>;

fn tensor<const D: usize>(xs: &[f64], shape: [usize; D]) -> Tensor<B, D> {
    let data = TensorData::new(xs.iter().map(|&x| x as f32).collect::<Vec<_>>(), shape);
    Tensor::from_data(data, &Default::default())
}

fn values<const D: usize>(t: Tensor<burn::backend::Wgpu, D>) -> Vec<f64> {
    t.cast(FloatDType::F32)
        .into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .unwrap()
        .into_iter()
        .map(f64::from)
        .collect()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    check_wgpu(&Default::default())?;
    let [b, t, h, k, v] = [2, 256, 4, 64, 64];
    println!(
        "fused recurrent ops on Wgpu, B={b} T={t} H={h} K={k} V={v}, f32, vs the f64 recurrence:"
    );
    for (name, gate) in [
        ("linear_attn", GateKind::None),
        ("simple_gla", GateKind::Scalar),
        ("gla", GateKind::Vector),
    ] {
        let p = problem(
            gate,
            false,
            [b, t, h, k, v],
            false,
            None,
            true,
            KernelDType::F32,
        );
        let c = GatedCase::new(p, 1.0, 7);
        let (fwd, grads) = c.reference();
        let q = tensor(&c.q, [b, t, h, k]).require_grad();
        let kk = tensor(&c.k, [b, t, h, k]).require_grad();
        let vv = tensor(&c.v, [b, t, h, v]).require_grad();
        let h0 = tensor(c.h0.as_ref().unwrap(), [b, h, k, v]).require_grad();
        let opts = RecurrentOptions::default()
            .with_initial_state(h0.clone())
            .with_final_state();
        let out = match gate {
            GateKind::None => fused_recurrent_linear_attn(q.clone(), kk.clone(), vv.clone(), opts)?,
            GateKind::Scalar => fused_recurrent_simple_gla(
                q.clone(),
                kk.clone(),
                vv.clone(),
                Tensor::from_data(
                    TensorData::new(
                        c.g.as_ref()
                            .unwrap()
                            .iter()
                            .map(|&x| x as f32)
                            .collect::<Vec<_>>(),
                        [b, t, h],
                    ),
                    &Default::default(),
                ),
                opts,
            )?,
            GateKind::Vector => fused_recurrent_gla(
                q.clone(),
                kk.clone(),
                vv.clone(),
                tensor(c.g.as_ref().unwrap(), [b, t, h, k]),
                None,
                opts,
            )?,
        };
        let ht = out.final_state.clone().unwrap();
        let loss = (out.o.clone() * tensor(&c.d_o, [b, t, h, v])).sum()
            + (ht.clone() * tensor(c.d_ht.as_ref().unwrap(), [b, h, k, v])).sum();
        let g = loss.backward();
        println!(
            "  {name:<12} rel. RMSE  o {:.1e}  hT {:.1e}  dq {:.1e}  dk {:.1e}  dv {:.1e}  dh0 {:.1e}",
            rel_rmse(&values(out.o.inner()), &fwd.o),
            rel_rmse(&values(ht.inner()), &fwd.ht),
            rel_rmse(&values(q.grad(&g).unwrap()), &grads.dq),
            rel_rmse(&values(kk.grad(&g).unwrap()), &grads.dk),
            rel_rmse(&values(vv.grad(&g).unwrap()), &grads.dv),
            rel_rmse(&values(h0.grad(&g).unwrap()), grads.dh0.as_ref().unwrap()),
        );
    }
    Ok(())
}
