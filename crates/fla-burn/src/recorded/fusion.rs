//! Registers a family's forward or backward in a `Fusion<B>` stream (what `burn::backend::Wgpu`
//! and `burn::backend::Cuda` are by default) as a custom operation that runs the inner backend's
//! kernels when the stream executes. The family validates inputs before registration, so the
//! deferred execution cannot fail on them.

use burn::tensor::{DType, Shape, TensorMetadata};
use burn_fusion::stream::{Operation, OperationStreams};
use burn_fusion::{FusionBackend, FusionRuntime, FusionTensor};
use burn_ir::{CustomOpIr, HandleContainer, OperationIr, TensorIr};

use super::{Inputs, Outputs, StateOp};

type Handles<B> =
    HandleContainer<<<B as FusionBackend>::FusionRuntime as FusionRuntime>::FusionHandle>;
type FTensor<B> = FusionTensor<<B as FusionBackend>::FusionRuntime>;

/// Which of the six inputs are present, in order: the IR lists only those.
type Present = [bool; 6];

fn uninit<B: FusionBackend>(like: &FTensor<B>, dims: Vec<usize>, dtype: DType) -> TensorIr {
    TensorIr::uninit(like.client.create_empty_handle(), Shape::from(dims), dtype)
}

/// Rebuilds the inner inputs from the first IR entries; returns them and how many were used.
fn take_inputs<B: FusionBackend>(
    ir: &[TensorIr],
    present: Present,
    handles: &mut Handles<B>,
) -> (Inputs<B>, usize) {
    let mut it = ir.iter();
    let x = present.map(|p| p.then(|| handles.get_float_tensor::<B>(it.next().expect("listed"))));
    (x, present.iter().filter(|&&p| p).count())
}

#[derive(Debug, Clone)]
struct ForwardOp<B, O> {
    desc: CustomOpIr,
    op: O,
    present: Present,
    _b: core::marker::PhantomData<B>,
}

impl<B: FusionBackend, O: StateOp<B>> Operation<B::FusionRuntime> for ForwardOp<B, O> {
    fn execute(&self, handles: &mut Handles<B>) {
        let (x, _) = take_inputs::<B>(&self.desc.inputs, self.present, handles);
        let out = self
            .op
            .forward(x)
            .expect("inputs were validated before the op was registered");
        let mut ids = self.desc.outputs.iter().map(|t| &t.id);
        handles.register_float_tensor::<B>(ids.next().expect("o"), out.o);
        if let Some(ht) = out.ht {
            handles.register_float_tensor::<B>(ids.next().expect("hT listed"), ht);
        }
        // Listed exactly where the inner backend said it keeps one (`forward_keeping`).
        if let Some(id) = ids.next() {
            let aux = out
                .aux
                .expect("the inner forward keeps the intermediate it announced");
            handles.register_float_tensor::<B>(id, aux);
        }
    }
}

/// Registers the forward; `o` has shape `o_dims` in the first input's dtype, `hT` (when
/// `ht_dims` is given) is `f32`.
pub(crate) fn forward<B: FusionBackend, O: StateOp<B>>(
    op: &O,
    x: Inputs<burn_fusion::Fusion<B>>,
    o_dims: Vec<usize>,
    ht_dims: Option<Vec<usize>>,
) -> Outputs<burn_fusion::Fusion<B>> {
    forward_keeping(op, x, o_dims, ht_dims, None)
}

/// [`forward`], where the inner forward also keeps an intermediate for the backward
/// ([`Outputs::aux`]) of shape `aux_dims` in the first input's dtype. The inner backend must
/// return one exactly when `aux_dims` is given.
pub(crate) fn forward_keeping<B: FusionBackend, O: StateOp<B>>(
    op: &O,
    x: Inputs<burn_fusion::Fusion<B>>,
    o_dims: Vec<usize>,
    ht_dims: Option<Vec<usize>>,
    aux_dims: Option<Vec<usize>>,
) -> Outputs<burn_fusion::Fusion<B>> {
    let first = x[0].clone().expect("the first input is required");
    let client = first.client.clone();
    let present = x.each_ref().map(|t| t.is_some());
    let inputs: Vec<FTensor<B>> = x.into_iter().flatten().collect();
    let mut outputs = vec![uninit::<B>(&first, o_dims, first.dtype())];
    let has_ht = ht_dims.is_some();
    if let Some(dims) = ht_dims {
        outputs.push(uninit::<B>(&first, dims, DType::F32));
    }
    let has_aux = aux_dims.is_some();
    if let Some(dims) = aux_dims {
        outputs.push(uninit::<B>(&first, dims, first.dtype()));
    }
    let streams = OperationStreams::with_inputs(&inputs);
    let input_ir: Vec<TensorIr> = inputs.into_iter().map(|t| t.into_ir()).collect();
    let desc = CustomOpIr::new(O::FORWARD, &input_ir, &outputs);
    let node = ForwardOp::<B, O> {
        desc: desc.clone(),
        op: op.clone(),
        present,
        _b: Default::default(),
    };
    let mut out = client.register(streams, OperationIr::Custom(desc), node);
    let aux = has_aux.then(|| out.pop().expect("registered aux"));
    let ht = has_ht.then(|| out.pop().expect("registered hT"));
    let o = out.pop().expect("registered o");
    Outputs { o, ht, aux }
}

#[derive(Debug, Clone)]
struct BackwardOp<B, O> {
    desc: CustomOpIr,
    op: O,
    present: Present,
    has_out: bool,
    has_ht: bool,
    has_aux: bool,
    has_dht: bool,
    _b: core::marker::PhantomData<B>,
}

impl<B: FusionBackend, O: StateOp<B>> Operation<B::FusionRuntime> for BackwardOp<B, O> {
    fn execute(&self, handles: &mut Handles<B>) {
        let ir = &self.desc.inputs;
        let (x, mut at) = take_inputs::<B>(ir, self.present, handles);
        let mut next = || {
            at += 1;
            handles.get_float_tensor::<B>(&ir[at - 1])
        };
        let out = self.has_out.then(|| {
            let o = next();
            let ht = self.has_ht.then(&mut next);
            let aux = self.has_aux.then(&mut next);
            Outputs { o, ht, aux }
        });
        let d_o = next();
        let d_ht = self.has_dht.then(&mut next);
        let grads = self
            .op
            .backward(x, out, d_o, d_ht)
            .expect("inputs were validated before the op was registered");
        let mut outs = self.desc.outputs.iter();
        for grad in grads.into_iter().flatten() {
            handles.register_float_tensor::<B>(&outs.next().expect("listed output").id, grad);
        }
    }
}

/// Registers the backward; each gradient has its input's shape and dtype. `out` (the forward's
/// outputs) is listed when the family's backward reads them.
pub(crate) fn backward<B: FusionBackend, O: StateOp<B>>(
    op: &O,
    x: Inputs<burn_fusion::Fusion<B>>,
    out: Option<Outputs<burn_fusion::Fusion<B>>>,
    d_o: FTensor<B>,
    d_ht: Option<FTensor<B>>,
) -> Inputs<burn_fusion::Fusion<B>> {
    let first = x[0].clone().expect("the first input is required");
    let client = first.client.clone();
    let present = x.each_ref().map(|t| t.is_some());
    let outputs: Vec<TensorIr> = x
        .iter()
        .flatten()
        .map(|t| uninit::<B>(&first, t.shape().to_vec(), t.dtype()))
        .collect();
    let has_out = out.is_some();
    let has_ht = out.as_ref().is_some_and(|o| o.ht.is_some());
    let has_aux = out.as_ref().is_some_and(|o| o.aux.is_some());
    let has_dht = d_ht.is_some();
    let mut inputs: Vec<FTensor<B>> = x.into_iter().flatten().collect();
    if let Some(out) = out {
        inputs.push(out.o);
        inputs.extend(out.ht);
        inputs.extend(out.aux);
    }
    inputs.push(d_o);
    inputs.extend(d_ht);
    let streams = OperationStreams::with_inputs(&inputs);
    let input_ir: Vec<TensorIr> = inputs.into_iter().map(|t| t.into_ir()).collect();
    let desc = CustomOpIr::new(O::BACKWARD, &input_ir, &outputs);
    let node = BackwardOp::<B, O> {
        desc: desc.clone(),
        op: op.clone(),
        present,
        has_out,
        has_ht,
        has_aux,
        has_dht,
        _b: Default::default(),
    };
    let mut grads = client
        .register(streams, OperationIr::Custom(desc), node)
        .into_iter();
    present.map(|p| p.then(|| grads.next().expect("registered gradient")))
}
