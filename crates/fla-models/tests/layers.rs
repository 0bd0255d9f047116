//! Layer tests on NdArray (the tensor-op implementation of the ops): a whole sequence and the same
//! sequence decoded step by step from the cache agree; the convolution matches its definition;
//! gradients reach every parameter.

use burn::backend::{Autodiff, NdArray};
use burn::module::Module;
use burn::tensor::{Distribution, Tensor, TensorData, Tolerance};
use fla_models::gla::GatedLinearAttentionConfig;
use fla_models::modules::{GatedMlpConfig, ShortConvolutionConfig};

type B = NdArray<f32>;

fn close(a: Tensor<B, 3>, b: Tensor<B, 3>) {
    a.into_data()
        .assert_approx_eq::<f32>(&b.into_data(), Tolerance::absolute(2e-5));
}

#[test]
fn mlp_intermediate_size_follows_fla() {
    // FLA: int(2/3 · 4 · 1024) = 2730, rounded up to a multiple of 256 = 2816.
    assert_eq!(GatedMlpConfig::new(1024).intermediate(), 2816);
    assert_eq!(
        GatedMlpConfig::new(64)
            .with_intermediate_size(Some(100))
            .intermediate(),
        100
    );
}

#[test]
fn short_convolution_matches_definition_and_streams() {
    let device = Default::default();
    let conv = ShortConvolutionConfig::new(3)
        .with_kernel_size(4)
        .with_bias(true)
        .init::<B>(&device);
    let x = Tensor::<B, 3>::random([2, 9, 3], Distribution::Normal(0.0, 1.0), &device);
    let (y, _) = conv.forward(x.clone(), None);
    // Definition, element by element.
    let (xs, w, bias) = (
        x.to_data().to_vec::<f32>().unwrap(),
        conv.weight.val().to_data().to_vec::<f32>().unwrap(),
        conv.bias
            .as_ref()
            .unwrap()
            .val()
            .to_data()
            .to_vec::<f32>()
            .unwrap(),
    );
    let mut want = vec![0f32; 2 * 9 * 3];
    for b in 0..2 {
        for t in 0..9 {
            for d in 0..3 {
                let mut acc = bias[d];
                for j in 0..4 {
                    let s = t as isize - 3 + j as isize;
                    if s >= 0 {
                        acc += w[d * 4 + j] * xs[(b * 9 + s as usize) * 3 + d];
                    }
                }
                want[(b * 9 + t) * 3 + d] = acc / (1.0 + (-acc).exp());
            }
        }
    }
    close(
        y.clone(),
        Tensor::from_data(TensorData::new(want, [2, 9, 3]), &device),
    );
    // In two pieces through the cache.
    let (y1, c) = conv.forward(x.clone().narrow(1, 0, 5), None);
    let (y2, _) = conv.forward(x.narrow(1, 5, 4), Some(c));
    close(y, Tensor::cat(vec![y1, y2], 1));
}

#[test]
fn gla_layer_decodes_step_by_step_like_the_whole_sequence() {
    let device = Default::default();
    for short_conv in [false, true] {
        let layer = GatedLinearAttentionConfig::new()
            .with_hidden_size(32)
            .with_num_heads(2)
            .with_use_short_conv(short_conv)
            .init::<B>(&device)
            .unwrap();
        let x = Tensor::<B, 3>::random([2, 7, 32], Distribution::Normal(0.0, 1.0), &device);
        let (whole, _) = layer.forward(x.clone(), None, false).unwrap();
        let (mut out, mut cache) = layer
            .forward(x.clone().narrow(1, 0, 3), None, true)
            .unwrap();
        for t in 3..7 {
            let (y, c) = layer
                .forward(x.clone().narrow(1, t, 1), cache, true)
                .unwrap();
            out = Tensor::cat(vec![out, y], 1);
            cache = c;
        }
        close(whole, out);
    }
}

#[test]
fn gla_layer_trains() {
    let device = Default::default();
    let layer = GatedLinearAttentionConfig::new()
        .with_hidden_size(16)
        .with_num_heads(2)
        .with_use_short_conv(true)
        .init::<Autodiff<B>>(&device)
        .unwrap();
    let x = Tensor::<Autodiff<B>, 3>::random([1, 5, 16], Distribution::Normal(0.0, 1.0), &device);
    let (y, _) = layer.forward(x, None, false).unwrap();
    let grads = y.powi_scalar(2).sum().backward();
    let q = layer
        .q_proj
        .weight
        .grad(&grads)
        .expect("q_proj gets a gradient");
    let gk = layer
        .gk_proj_1
        .weight
        .grad(&grads)
        .expect("gk_proj gets a gradient");
    assert!(q.abs().sum().into_scalar() > 0.0 && gk.abs().sum().into_scalar() > 0.0);
    assert!(layer.num_params() > 0);
}

#[test]
fn gla_config_refuses_dims_that_do_not_split() {
    let r = GatedLinearAttentionConfig::new()
        .with_hidden_size(30)
        .with_num_heads(4)
        .init::<B>(&Default::default());
    assert!(r.is_err());
}
