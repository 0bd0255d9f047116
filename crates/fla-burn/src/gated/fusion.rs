//! `Fusion<B>` (what `burn::backend::Wgpu` and `burn::backend::Cuda` are by default): the op is
//! registered in the fusion stream as a custom operation that runs the inner backend's kernels
//! when the stream executes. Inputs are validated before registration, so the deferred
//! execution cannot fail on them.

use burn::tensor::{DType, Shape, TensorMetadata};
use burn_fusion::stream::{Operation, OperationStreams};
use burn_fusion::{Fusion, FusionBackend, FusionRuntime, FusionTensor};
use burn_ir::{CustomOpIr, HandleContainer, OperationIr, TensorIr};

use super::{
    describe, describe_backward, GatedForward, GatedGrads, GatedOptions, GatedRecurrentBackend,
    GatedTensors,
};
use crate::FlaError;

/// Which optional tensors a call carries, in the order they were listed in the op's IR.
#[derive(Debug, Clone, Copy)]
struct Present {
    g: bool,
    gv: bool,
    h0: bool,
}

fn listed<B: FusionBackend>(
    x: &GatedTensors<Fusion<B>>,
) -> (Vec<FusionTensor<B::FusionRuntime>>, Present) {
    let mut v = vec![x.q.clone(), x.k.clone(), x.v.clone()];
    let present = Present {
        g: x.g.is_some(),
        gv: x.gv.is_some(),
        h0: x.h0.is_some(),
    };
    v.extend(x.g.clone());
    v.extend(x.gv.clone());
    v.extend(x.h0.clone());
    (v, present)
}

/// Rebuilds the inner backend's inputs from the IR's input list (same order as [`listed`]).
fn take_inputs<B: FusionBackend>(
    ir: &[TensorIr],
    present: Present,
    handles: &mut HandleContainer<<B::FusionRuntime as FusionRuntime>::FusionHandle>,
) -> (GatedTensors<B>, usize) {
    let mut it = ir.iter();
    let mut next = || handles.get_float_tensor::<B>(it.next().expect("listed input"));
    let q = next();
    let k = next();
    let v = next();
    let g = present.g.then(&mut next);
    let gv = present.gv.then(&mut next);
    let h0 = present.h0.then(&mut next);
    let used = 3 + present.g as usize + present.gv as usize + present.h0 as usize;
    (GatedTensors { q, k, v, g, gv, h0 }, used)
}

fn uninit<B: FusionBackend>(
    x: &FusionTensor<B::FusionRuntime>,
    dims: Vec<usize>,
    dtype: DType,
) -> TensorIr {
    TensorIr::uninit(x.client.create_empty_handle(), Shape::from(dims), dtype)
}

#[derive(Debug, Clone)]
struct ForwardOp<B> {
    desc: CustomOpIr,
    opts: GatedOptions,
    present: Present,
    _b: core::marker::PhantomData<B>,
}

impl<B: FusionBackend + GatedRecurrentBackend> Operation<B::FusionRuntime> for ForwardOp<B> {
    fn execute(
        &self,
        handles: &mut HandleContainer<<B::FusionRuntime as FusionRuntime>::FusionHandle>,
    ) {
        let (x, _) = take_inputs::<B>(&self.desc.inputs, self.present, handles);
        let out = B::gated_recurrent_forward(x, &self.opts)
            .expect("inputs were validated before the op was registered");
        handles.register_float_tensor::<B>(&self.desc.outputs[0].id, out.o);
        if let Some(ht) = out.ht {
            handles.register_float_tensor::<B>(&self.desc.outputs[1].id, ht);
        }
    }
}

#[derive(Debug, Clone)]
struct BackwardOp<B> {
    desc: CustomOpIr,
    opts: GatedOptions,
    present: Present,
    has_ht: bool,
    has_dht: bool,
    _b: core::marker::PhantomData<B>,
}

impl<B: FusionBackend + GatedRecurrentBackend> Operation<B::FusionRuntime> for BackwardOp<B> {
    fn execute(
        &self,
        handles: &mut HandleContainer<<B::FusionRuntime as FusionRuntime>::FusionHandle>,
    ) {
        let ir = &self.desc.inputs;
        let (x, mut at) = take_inputs::<B>(ir, self.present, handles);
        let mut next = || {
            at += 1;
            handles.get_float_tensor::<B>(&ir[at - 1])
        };
        let o = next();
        let ht = self.has_ht.then(&mut next);
        let d_o = next();
        let d_ht = self.has_dht.then(&mut next);
        let grads = B::gated_recurrent_backward(x, o, ht, d_o, d_ht, &self.opts)
            .expect("inputs were validated before the op was registered");
        let mut outs = self.desc.outputs.iter();
        let mut put =
            |t| handles.register_float_tensor::<B>(&outs.next().expect("listed output").id, t);
        put(grads.dq);
        put(grads.dk);
        put(grads.dv);
        grads.dg.into_iter().for_each(&mut put);
        grads.dgv.into_iter().for_each(&mut put);
        grads.dh0.into_iter().for_each(&mut put);
    }
}

impl<B: FusionBackend + GatedRecurrentBackend> GatedRecurrentBackend for Fusion<B> {
    fn gated_recurrent_forward(
        x: GatedTensors<Self>,
        opts: &GatedOptions,
    ) -> Result<GatedForward<Self>, FlaError> {
        let p = describe(&x, opts)?;
        let dtype = x.q.dtype();
        B::gated_check_dtype(
            &<Self as burn::tensor::ops::FloatTensorOps<Self>>::float_device(&x.q),
            dtype,
        )?;
        let client = x.q.client.clone();
        let (inputs, present) = listed(&x);
        let mut outputs = vec![uninit::<B>(
            &x.q,
            vec![p.batch, p.seq_len, p.heads, p.v_dim],
            dtype,
        )];
        if p.output_final_state {
            outputs.push(uninit::<B>(
                &x.q,
                vec![p.num_seqs(), p.heads, p.k_dim, p.v_dim],
                DType::F32,
            ));
        }
        let streams = OperationStreams::with_inputs(&inputs);
        let input_ir: Vec<TensorIr> = inputs.into_iter().map(|t| t.into_ir()).collect();
        let desc = CustomOpIr::new("fla_gated_recurrent_forward", &input_ir, &outputs);
        let op = ForwardOp::<B> {
            desc: desc.clone(),
            opts: opts.clone(),
            present,
            _b: Default::default(),
        };
        let mut out = client.register(streams, OperationIr::Custom(desc), op);
        let ht = p.output_final_state.then(|| out.pop().unwrap());
        let o = out.pop().unwrap();
        Ok(GatedForward { o, ht })
    }

    fn gated_recurrent_backward(
        x: GatedTensors<Self>,
        o: FusionTensor<B::FusionRuntime>,
        ht: Option<FusionTensor<B::FusionRuntime>>,
        d_o: FusionTensor<B::FusionRuntime>,
        d_ht: Option<FusionTensor<B::FusionRuntime>>,
        opts: &GatedOptions,
    ) -> Result<GatedGrads<Self>, FlaError> {
        describe_backward(&x, &o, ht.as_ref(), &d_o, d_ht.as_ref(), opts)?;
        let dtype = x.q.dtype();
        B::gated_check_dtype(
            &<Self as burn::tensor::ops::FloatTensorOps<Self>>::float_device(&x.q),
            dtype,
        )?;
        let client = x.q.client.clone();
        let (mut inputs, present) = listed(&x);
        let has_ht = ht.is_some();
        let has_dht = d_ht.is_some();
        inputs.push(o);
        inputs.extend(ht);
        inputs.push(d_o);
        inputs.extend(d_ht);
        let mut outputs = vec![
            uninit::<B>(&x.q, x.q.shape().to_vec(), dtype),
            uninit::<B>(&x.q, x.k.shape().to_vec(), dtype),
            uninit::<B>(&x.q, x.v.shape().to_vec(), dtype),
        ];
        for t in [&x.g, &x.gv].into_iter().flatten() {
            outputs.push(uninit::<B>(&x.q, t.shape().to_vec(), dtype));
        }
        if let Some(h0) = &x.h0 {
            outputs.push(uninit::<B>(&x.q, h0.shape().to_vec(), DType::F32));
        }
        let streams = OperationStreams::with_inputs(&inputs);
        let input_ir: Vec<TensorIr> = inputs.into_iter().map(|t| t.into_ir()).collect();
        let desc = CustomOpIr::new("fla_gated_recurrent_backward", &input_ir, &outputs);
        let op = BackwardOp::<B> {
            desc: desc.clone(),
            opts: opts.clone(),
            present,
            has_ht,
            has_dht,
            _b: Default::default(),
        };
        let mut out = client
            .register(streams, OperationIr::Custom(desc), op)
            .into_iter();
        let mut next = || out.next().expect("registered output");
        let dq = next();
        let dk = next();
        let dv = next();
        let dg = present.g.then(&mut next);
        let dgv = present.gv.then(&mut next);
        let dh0 = present.h0.then(&mut next);
        Ok(GatedGrads {
            dq,
            dk,
            dv,
            dg,
            dgv,
            dh0,
        })
    }

    fn gated_check_dtype(device: &Self::Device, dtype: DType) -> Result<(), FlaError> {
        B::gated_check_dtype(device, dtype)
    }
}
