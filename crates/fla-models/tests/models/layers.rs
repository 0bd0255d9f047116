//! Layer tests on NdArray (the tensor-op implementation of the ops): a whole sequence and the same
//! sequence decoded step by step from the cache agree; the convolution matches its definition;
//! gradients reach every parameter.

use burn::backend::{Autodiff, NdArray};
use burn::module::Module;
use burn::tensor::{Distribution, Tensor, TensorData, Tolerance};
use fla_models::delta_net::{DeltaNetLayerConfig, QkActivation, QkNorm};
use fla_models::delta_net_model::DeltaNetConfig;
use fla_models::gla::GatedLinearAttentionConfig;
use fla_models::hgrn2::Hgrn2AttentionConfig;
use fla_models::hgrn2_model::Hgrn2Config;
use fla_models::lm::TokenMixer;
use fla_models::modules::{GatedMlpConfig, ShortConvolutionConfig};
use fla_models::retnet::MultiScaleRetentionConfig;
use fla_models::retnet_model::RetNetConfig;

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
    let (y, _) = conv.forward(x.clone(), None).unwrap();
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
    let (y1, c) = conv.forward(x.clone().narrow(1, 0, 5), None).unwrap();
    let (y2, _) = conv.forward(x.narrow(1, 5, 4), Some(c)).unwrap();
    close(y, Tensor::cat(vec![y1, y2], 1));
}

/// A cache from another batch or width, an input of another width, or an empty input is an
/// error naming the shapes, not a panic inside `cat` or a silently shifted window.
#[test]
fn short_convolution_refuses_mismatched_shapes() {
    let device = Default::default();
    let conv = ShortConvolutionConfig::new(3)
        .with_kernel_size(4)
        .init::<B>(&device);
    let x = Tensor::<B, 3>::zeros([2, 5, 3], &device);
    for (cache, what) in [
        ([1, 3, 3], "another batch"),
        ([2, 2, 3], "another window"),
        ([2, 3, 4], "another width"),
    ] {
        let c = Tensor::<B, 3>::zeros(cache, &device);
        match conv.forward(x.clone(), Some(c)) {
            Err(fla_burn::FlaError::Shape(msg)) => assert!(msg.contains("cache"), "{msg}"),
            other => panic!("{what}: expected Shape, got {:?}", other.map(|_| ())),
        }
    }
    let wide = Tensor::<B, 3>::zeros([2, 5, 4], &device);
    assert!(matches!(
        conv.forward(wide, None),
        Err(fla_burn::FlaError::Shape(_))
    ));
    let empty = Tensor::<B, 3>::zeros([2, 0, 3], &device);
    assert!(matches!(
        conv.forward(empty, None),
        Err(fla_burn::FlaError::Empty(_))
    ));
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

/// A whole sequence, and the same sequence as a 3-token prompt then single tokens from the
/// cache, give the same outputs (state, convolutions and positions carried).
fn streams_like_whole<M: TokenMixer<B>>(layer: &M, hidden: usize) {
    let device = Default::default();
    let x = Tensor::<B, 3>::random([2, 7, hidden], Distribution::Normal(0.0, 1.0), &device);
    let (whole, _) = layer.mix(x.clone(), None, false).unwrap();
    let (mut out, mut cache) = layer.mix(x.clone().narrow(1, 0, 3), None, true).unwrap();
    for t in 3..7 {
        let (y, c) = layer.mix(x.clone().narrow(1, t, 1), cache, true).unwrap();
        out = Tensor::cat(vec![out, y], 1);
        cache = c;
    }
    close(whole, out);
}

/// DeltaNet's other options (FLA's `qk_activation`, `qk_norm`, no convolutions, no β, output
/// gate, negative eigenvalues) stream like the whole sequence.
#[rstest::rstest]
#[case(QkActivation::Silu, QkNorm::L2, true, true, false)]
#[case(QkActivation::Elu, QkNorm::Sum, false, false, true)]
#[case(QkActivation::Relu, QkNorm::L2, true, true, true)]
#[case(QkActivation::Identity, QkNorm::Sum, false, true, false)]
fn delta_net_options_stream(
    #[case] act: QkActivation,
    #[case] norm: QkNorm,
    #[case] conv: bool,
    #[case] beta: bool,
    #[case] gate: bool,
) {
    let layer = DeltaNetLayerConfig::new()
        .with_hidden_size(24)
        .with_num_heads(2)
        .with_expand_v(2.0)
        .with_qk_activation(act)
        .with_qk_norm(norm)
        .with_use_short_conv(conv)
        .with_use_beta(beta)
        .with_use_gate(gate)
        .with_allow_neg_eigval(gate)
        .init::<B>(&Default::default())
        .unwrap();
    streams_like_whole(&layer, 24);
}

/// RetNet with grouped key/value heads (two query heads per key head) and without the output
/// gate: the rotary positions continue across calls.
#[test]
fn retnet_grouped_heads_stream() {
    for gate in [true, false] {
        let layer = MultiScaleRetentionConfig::new()
            .with_hidden_size(32)
            .with_num_heads(4)
            .with_num_kv_heads(Some(2))
            .with_use_output_gate(gate)
            .init::<B>(&Default::default())
            .unwrap();
        assert_eq!(layer.k_proj.weight.dims(), [32, 16]);
        streams_like_whole(&layer, 32);
    }
}

#[test]
fn hgrn2_streams_with_and_without_convolutions() {
    for conv in [false, true] {
        let layer = Hgrn2AttentionConfig::new()
            .with_hidden_size(32)
            .with_expand_ratio(8)
            .with_use_short_conv(conv)
            .with_layer_idx(1)
            .init::<B>(&Default::default())
            .unwrap();
        streams_like_whole(&layer, 32);
    }
}

/// Gradients reach every family's projections (and HGRN2's lower bounds) through the ops'
/// backward.
#[test]
fn new_families_train() {
    type A = Autodiff<B>;
    let device = Default::default();
    let ids = Tensor::<A, 2, burn::tensor::Int>::from_data(
        TensorData::new(vec![1i64, 5, 9, 3, 7, 2, 8, 4], [2, 4]),
        &device,
    );
    let delta = DeltaNetConfig {
        hidden_size: 16,
        num_heads: 2,
        num_hidden_layers: 1,
        vocab_size: 16,
        ..Default::default()
    }
    .init::<A>(&device)
    .unwrap();
    let grads = delta.loss(ids.clone()).unwrap().backward();
    let attn = &delta.model.layers[0].attn;
    for w in [
        &attn.q_proj.weight,
        &attn.k_proj.weight,
        &attn.v_proj.weight,
    ] {
        assert!(w.grad(&grads).unwrap().abs().sum().into_scalar() > 0.0);
    }
    assert!(attn.b_proj.as_ref().unwrap().weight.grad(&grads).is_some());
    let retnet = RetNetConfig {
        hidden_size: 16,
        num_heads: 2,
        num_hidden_layers: 1,
        vocab_size: 16,
        ..Default::default()
    }
    .init::<A>(&device)
    .unwrap();
    let grads = retnet.loss(ids.clone()).unwrap().backward();
    let attn = &retnet.model.layers[0].attn;
    assert!(
        attn.k_proj
            .weight
            .grad(&grads)
            .unwrap()
            .abs()
            .sum()
            .into_scalar()
            > 0.0
    );
    let hgrn2 = Hgrn2Config {
        hidden_size: 16,
        expand_ratio: Some(8),
        num_hidden_layers: 2,
        vocab_size: 16,
        ..Default::default()
    }
    .init::<A>(&device)
    .unwrap();
    let grads = hgrn2.loss(ids).unwrap().backward();
    let lb = hgrn2.model.lower_bounds.as_ref().unwrap();
    assert!(lb.grad(&grads).unwrap().abs().sum().into_scalar() > 0.0);
    let f = &hgrn2.model.layers[1].attn.f_proj.weight;
    assert!(f.grad(&grads).unwrap().abs().sum().into_scalar() > 0.0);
}

/// What these ports do not build, or configs that do not fit, are errors naming the field.
#[test]
fn new_family_configs_refuse_what_they_cannot_build() {
    let device = Default::default();
    fn err<M>(r: Result<fla_models::lm::ForCausalLM<B, M>, fla_burn::FlaError>) -> String {
        r.map(|_| ()).unwrap_err().to_string()
    }
    let e = err(DeltaNetConfig {
        qk_activation: "gelu".into(),
        hidden_size: 16,
        num_heads: 2,
        num_hidden_layers: 1,
        ..Default::default()
    }
    .init::<B>(&device));
    assert!(e.contains("qk_activation") && e.contains("gelu"), "{e}");
    let e = err(DeltaNetConfig {
        qk_norm: "none".into(),
        hidden_size: 16,
        num_heads: 2,
        num_hidden_layers: 1,
        ..Default::default()
    }
    .init::<B>(&device));
    assert!(e.contains("qk_norm"), "{e}");
    let e = err(DeltaNetConfig {
        hidden_size: 16,
        num_heads: 3,
        num_hidden_layers: 1,
        ..Default::default()
    }
    .init::<B>(&device));
    assert!(e.contains("3 heads"), "{e}");
    let e = err(RetNetConfig {
        hidden_size: 16,
        num_heads: 4,
        num_kv_heads: Some(3),
        num_hidden_layers: 1,
        ..Default::default()
    }
    .init::<B>(&device));
    assert!(e.contains("num_kv_heads"), "{e}");
    let e = err(RetNetConfig {
        feature_map: Some("elu".into()),
        hidden_size: 16,
        num_heads: 2,
        num_hidden_layers: 1,
        ..Default::default()
    }
    .init::<B>(&device));
    assert!(e.contains("feature_map"), "{e}");
    let e = err(RetNetConfig {
        attn_mode: "parallel".into(),
        hidden_size: 16,
        num_heads: 2,
        num_hidden_layers: 1,
        ..Default::default()
    }
    .init::<B>(&device));
    assert!(e.contains("attn_mode"), "{e}");
    let e = err(Hgrn2Config {
        hidden_size: 20,
        expand_ratio: Some(8),
        num_hidden_layers: 1,
        ..Default::default()
    }
    .init::<B>(&device));
    assert!(e.contains("expand_ratio"), "{e}");
    let e = err(Hgrn2Config {
        attn: Some(serde_json::json!({"layers": [1]})),
        hidden_size: 16,
        expand_ratio: Some(8),
        num_hidden_layers: 1,
        ..Default::default()
    }
    .init::<B>(&device));
    assert!(e.contains("hybrid"), "{e}");
}

/// FLA's `attn` field builds softmax attention into the listed layers (grouped heads, a window)
/// and the family's mixer elsewhere; the hybrid model decodes token by token like the whole
/// sequence, its key/value and recurrent caches side by side.
#[test]
fn hybrid_model_builds_the_listed_layers_and_streams() {
    use fla_models::hybrid::Hybrid;
    let device = Default::default();
    let config = DeltaNetConfig {
        hidden_size: 32,
        num_heads: 2,
        num_hidden_layers: 3,
        vocab_size: 40,
        attn: Some(
            serde_json::json!({"layers": [1], "num_heads": 4, "num_kv_heads": 2,
                                      "window_size": 3}),
        ),
        ..Default::default()
    };
    let model = config.init_hybrid::<B>(&device).unwrap();
    let kinds: Vec<bool> = model
        .model
        .layers
        .iter()
        .map(|l| matches!(l.attn, Hybrid::Attention(_)))
        .collect();
    assert_eq!(kinds, [false, true, false]);
    let ids = Tensor::<B, 2, burn::tensor::Int>::from_data(
        TensorData::new((0..16i64).map(|i| (i * 7) % 40).collect(), [2, 8]),
        &device,
    );
    let (whole, _) = model.forward(ids.clone(), None, false).unwrap();
    let (mut out, mut cache) = model
        .forward(ids.clone().narrow(1, 0, 2), None, true)
        .unwrap();
    for t in 2..8 {
        let (y, c) = model
            .forward(ids.clone().narrow(1, t, 1), cache, true)
            .unwrap();
        out = Tensor::cat(vec![out, y], 1);
        cache = c;
    }
    close(whole, out);
    // The plain model refuses the field rather than dropping the attention layers.
    let e = config
        .init::<B>(&device)
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(e.contains("init_hybrid"), "{e}");
}

#[test]
fn attn_specs_are_checked_as_fla_checks_them() {
    use fla_models::hybrid::parse_attn;
    let one = serde_json::json!({"layers": [0, 2], "num_heads": 4});
    let specs = parse_attn(&Some(one), 3).unwrap();
    assert_eq!(specs[0].rope_theta, 10000.0);
    assert_eq!(specs[0].num_kv_heads, None);
    let list =
        serde_json::json!([{"layers": [0], "num_heads": 2}, {"layers": [1], "num_heads": 4}]);
    assert_eq!(parse_attn(&Some(list), 2).unwrap().len(), 2);
    assert!(parse_attn(&None, 2).unwrap().is_empty());
    for (bad, what) in [
        (
            serde_json::json!({"layers": [3], "num_heads": 2}),
            "out of range",
        ),
        (
            serde_json::json!([{"layers": [1], "num_heads": 2}, {"layers": [1], "num_heads": 2}]),
            "twice",
        ),
        (
            serde_json::json!({"layers": [0], "num_heads": 0}),
            "positive",
        ),
        (serde_json::json!({"layers": [0]}), "num_heads"),
    ] {
        let e = parse_attn(&Some(bad), 3).unwrap_err().to_string();
        assert!(e.contains(what), "{e}");
    }
}

/// RetNet (rotary and the retention op) in half precision on the fused backend against f32
/// (`half_precision_matches_f32!`), at norm eps 1e-2 for the reason `retnet_trains_in_half_precision`
/// gives: at the default 1e-6 the logits' max |diff| was about 1e-3 on most random inits (six
/// runs: 1.0e-3 to 1.5e-3) and 2.9e-2 on one (a CI-like run), over the bound, where the first
/// token's output norm sees an input rms under sqrt(eps).
#[test]
fn retnet_in_half_precision_matches_f32() {
    half_precision_matches_f32!(RetNetConfig {
        hidden_size: 32,
        num_heads: 2,
        num_hidden_layers: 2,
        vocab_size: 16,
        norm_eps: 1e-2,
        ..Default::default()
    });
}

/// DeltaNet's, RetNet's and HGRN2's training steps in half precision on the fused backend against
/// f32, at `fla-train`'s preset shapes (`half_precision_trains!`).
#[test]
fn delta_net_trains_in_half_precision() {
    half_precision_trains!(DeltaNetConfig {
        hidden_size: 64,
        num_heads: 2,
        num_hidden_layers: 2,
        vocab_size: 256,
        attn_mode: "fused_recurrent".into(),
        ..Default::default()
    });
}

/// DeltaNet's other feature path in half precision against f32 (`half_precision_matches_f32!`):
/// elu+1 feature maps with sum normalisation, no β (every write at full strength), no short
/// convolutions, and the output gate (its swish-gated norm), where the default path above has
/// SiLU, L2 norms, β and convolutions.
#[test]
fn delta_net_elu_without_beta_in_half_precision_matches_f32() {
    half_precision_matches_f32!(DeltaNetConfig {
        hidden_size: 32,
        num_heads: 2,
        num_hidden_layers: 2,
        vocab_size: 16,
        qk_activation: "elu".into(),
        qk_norm: "sum".into(),
        use_beta: false,
        use_short_conv: false,
        use_gate: true,
        ..Default::default()
    });
}

/// At a norm eps of 1e-2 (every norm of the model's), not RetNet's default 1e-6: the first
/// token's retention output is `scale·(q₀·k₀)·v₀`, and where `q₀·k₀` of some sequence and head is
/// near zero the output norm's input has an rms under `sqrt(eps)`, where the norm's gradient is
/// large and fast-changing. At eps 1e-6 rounding the weights to f16 alone, in f32 arithmetic,
/// moved the gradients by 7-16 % (relative L2) on 5 of 12 random inits (with and without the
/// output gate), and f16 against f32 by up to 35 %; at eps 1e-5 rounding alone moved them by up
/// to 3.5 %: a property of the model (FLA's RetNet has the same norm), not an arithmetic error,
/// which the check's premise refuses. At eps 1e-2 rounding alone stayed under 0.09 % and f16
/// against f32 under 0.4 % on 12 inits. The price: retention outputs whose mean square is not
/// well above 1e-2 are only partly normalised, so this runs the same f16 arithmetic on a softer
/// norm than the default's.
#[test]
fn retnet_trains_in_half_precision() {
    half_precision_trains!(RetNetConfig {
        hidden_size: 64,
        num_heads: 2,
        num_hidden_layers: 2,
        vocab_size: 256,
        attn_mode: "fused_recurrent".into(),
        norm_eps: 1e-2,
        ..Default::default()
    });
}

#[test]
fn hgrn2_trains_in_half_precision() {
    half_precision_trains!(Hgrn2Config {
        hidden_size: 64,
        expand_ratio: Some(32),
        num_hidden_layers: 2,
        vocab_size: 256,
        attn_mode: "fused_recurrent".into(),
        ..Default::default()
    });
}
