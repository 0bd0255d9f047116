//! The Transformer++ baseline on fused softmax attention: FLA's config.json, decoding from the
//! key/value cache like a whole forward (grouped heads, a sliding window shorter than the
//! sequence), rotary embeddings, training through the hand-derived backward, typed refusals.

use burn::backend::{Autodiff, NdArray};
use burn::optim::{AdamConfig, GradientsParams, Optimizer};
use burn::tensor::{Distribution, Int, Tensor, TensorData, Tolerance};
use fla_models::attn::rotary;
use fla_models::checkpoint::Pretrained;
use fla_models::generate::{generate, GenerationConfig};
use fla_models::transformer_model::{TransformerConfig, TransformerForCausalLM};

type B = NdArray<f32>;

fn tiny() -> TransformerConfig {
    TransformerConfig {
        hidden_size: 32,
        num_heads: 4,
        num_kv_heads: Some(2),
        num_hidden_layers: 2,
        vocab_size: 16,
        intermediate_size: Some(64),
        ..Default::default()
    }
}

fn ids<Bk: burn::tensor::backend::Backend>(
    rows: &[&[i64]],
    device: &Bk::Device,
) -> Tensor<Bk, 2, Int> {
    let flat: Vec<i64> = rows.iter().flat_map(|r| r.iter().copied()).collect();
    Tensor::from_data(TensorData::new(flat, [rows.len(), rows[0].len()]), device)
}

#[test]
fn reads_fla_config_json() {
    let json = r#"{"architectures": ["TransformerForCausalLM"], "model_type": "transformer",
        "hidden_size": 64, "num_heads": 4, "num_kv_heads": 2, "num_hidden_layers": 2,
        "window_size": 512, "rope_theta": 500000.0, "vocab_size": 512, "fuse_norm": true,
        "tie_word_embeddings": true, "torch_dtype": "float32"}"#;
    let dir = std::env::temp_dir().join(format!("fla-transformer-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("config.json");
    std::fs::write(&path, json).unwrap();
    let c = TransformerConfig::load(&path).expect("FLA config parses");
    assert_eq!(
        (c.hidden_size, c.num_heads, c.num_kv_heads),
        (64, 4, Some(2))
    );
    assert_eq!((c.window_size, c.rope_theta), (Some(512), 500000.0));
    let model = c.init::<B>(&Default::default()).unwrap();
    assert!(model.lm_head.is_none());
    // Grouped heads: k_proj maps 64 → 2 heads of 16.
    assert_eq!(model.model.layers[0].attn.k_proj.weight.dims(), [64, 32]);
    c.save(&path).unwrap();
    assert_eq!(TransformerConfig::load(&path).unwrap(), c);
}

fn decode_like_whole(config: TransformerConfig) {
    let device = Default::default();
    let model = config.init::<B>(&device).unwrap();
    let x = ids::<B>(
        &[&[1, 5, 3, 7, 2, 9, 11, 4], &[4, 4, 8, 0, 15, 6, 1, 2]],
        &device,
    );
    let (whole, _) = model.forward(x.clone(), None, false).unwrap();
    let (mut logits, mut cache) = model
        .forward(x.clone().narrow(1, 0, 3), None, true)
        .unwrap();
    for t in 3..8 {
        let (l, c) = model
            .forward(x.clone().narrow(1, t, 1), cache, true)
            .unwrap();
        logits = Tensor::cat(vec![logits, l], 1);
        cache = c;
    }
    whole
        .into_data()
        .assert_approx_eq::<f32>(&logits.into_data(), Tolerance::absolute(1e-4));
}

#[test]
fn decoding_matches_whole_sequence() {
    decode_like_whole(tiny());
}

/// A window of 3 tokens: the cache keeps only what later tokens see.
#[test]
fn decoding_with_a_window_matches_whole_sequence() {
    decode_like_whole(TransformerConfig {
        window_size: Some(3),
        ..tiny()
    });
}

/// Rotary embeddings rotate pairs: norms are kept, and a position's rotation does not depend on
/// what came before (continuing at an offset equals slicing the whole sequence's).
#[test]
fn rotary_rotates_pairs_by_position() {
    let device = Default::default();
    let x = Tensor::<B, 4>::random([1, 6, 2, 8], Distribution::Normal(0.0, 1.0), &device);
    let whole = rotary(x.clone(), 0, 10000.0);
    let tail = rotary(x.clone().narrow(1, 4, 2), 4, 10000.0);
    whole
        .clone()
        .narrow(1, 4, 2)
        .into_data()
        .assert_approx_eq::<f32>(&tail.into_data(), Tolerance::absolute(1e-5));
    let norm = |t: Tensor<B, 4>| t.square().sum_dim(3);
    norm(whole)
        .into_data()
        .assert_approx_eq::<f32>(&norm(x.clone()).into_data(), Tolerance::absolute(1e-4));
    // Position 0 is the identity.
    rotary(x.clone().narrow(1, 0, 1), 0, 10000.0)
        .into_data()
        .assert_approx_eq::<f32>(&x.narrow(1, 0, 1).into_data(), Tolerance::absolute(1e-6));
}

/// In half precision the rotation runs in f32 and matches the f32 one to the output's rounding
/// (f16: 2^-11 relative, values up to ~4 here). Its cos/sin tables used to take the backend's
/// default dtype, f16, and Burn's fusion refused their product with the f32 input.
#[test]
fn rotary_in_half_precision_matches_f32() {
    type H = burn::backend::Wgpu<burn::tensor::f16>;
    let x = Tensor::<H, 4>::random(
        [2, 65, 2, 16],
        Distribution::Normal(0.0, 1.0),
        &crate::half_device(),
    );
    assert_eq!(x.dtype(), burn::tensor::DType::F16);
    let got = rotary(x.clone(), 3, 10000.0);
    assert_eq!(got.dtype(), x.dtype());
    let same_input = Tensor::<B, 4>::from_data(x.into_data().convert::<f32>(), &Default::default());
    let want = rotary(same_input, 3, 10000.0);
    got.into_data()
        .convert::<f32>()
        .assert_approx_eq::<f32>(&want.into_data(), Tolerance::absolute(4e-3));
}

/// The whole model in half precision on the fused backend against f32 (see
/// `half_precision_matches_f32!`; measured max |Δ| in the logits about 1e-3).
#[test]
fn half_precision_model_matches_f32() {
    half_precision_matches_f32!(tiny());
}

#[test]
fn overfits_a_tiny_batch() {
    let device = Default::default();
    let mut model = tiny().init::<Autodiff<B>>(&device).unwrap();
    let batch = ids::<Autodiff<B>>(
        &[&[1, 2, 3, 4, 5, 6, 7, 8], &[8, 7, 6, 5, 4, 3, 2, 1]],
        &device,
    );
    let mut optim = AdamConfig::new().init();
    let first = model.loss(batch.clone()).unwrap().into_scalar();
    let mut last = first;
    for _ in 0..30 {
        let loss = model.loss(batch.clone()).unwrap();
        last = loss.clone().into_scalar();
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(1e-2, model, grads);
    }
    assert!(last < 0.5 * first, "loss {first} -> {last}");
}

/// A saved model loads back with the same logits, and generates from its cache.
#[test]
fn save_load_and_generate() {
    let device = Default::default();
    let config = tiny();
    let model = config.init::<B>(&device).unwrap();
    let dir = std::env::temp_dir().join(format!("fla-transformer-ckpt-{}", std::process::id()));
    model.save_pretrained(&config, &dir).unwrap();
    let (loaded, c) = TransformerForCausalLM::<B>::from_pretrained(&dir, &device).unwrap();
    assert_eq!(c, config);
    let x = ids::<B>(&[&[3, 1, 4, 1, 5]], &device);
    let (a, _) = model.forward(x.clone(), None, false).unwrap();
    let (b, _) = loaded.forward(x, None, false).unwrap();
    a.into_data()
        .assert_approx_eq::<f32>(&b.into_data(), Tolerance::absolute(1e-6));
    let cfg = GenerationConfig {
        max_new_tokens: 5,
        ..Default::default()
    };
    let out = generate(&loaded, &[3, 1, 4], &cfg, &device).unwrap();
    assert_eq!(out.tokens.len(), 5);
}

#[test]
fn unsupported_options_are_refused() {
    let device = Default::default();
    for bad in [
        TransformerConfig {
            attnres_block_size: Some(2),
            ..tiny()
        },
        TransformerConfig {
            num_kv_heads: Some(3),
            ..tiny()
        },
        TransformerConfig {
            window_size: Some(0),
            ..tiny()
        },
    ] {
        assert!(bad.init::<B>(&device).is_err(), "{bad:?} accepted");
    }
}

/// The Transformer's training step (rotary, fused attention, loss, every gradient, AdamW with
/// clipping) in half precision on the fused backend against f32 (`half_precision_trains!`).
#[test]
fn transformer_trains_in_half_precision() {
    half_precision_trains!(TransformerConfig {
        hidden_size: 64,
        num_heads: 2,
        num_hidden_layers: 2,
        vocab_size: 256,
        ..Default::default()
    });
}
