//! The GLA model: reads FLA's config.json, decodes step by step like a whole forward, and learns
//! (a tiny overfit run through the hand-derived backward on NdArray).

use burn::backend::{Autodiff, NdArray};
use burn::optim::{AdamConfig, GradientsParams, Optimizer};
use burn::tensor::{Int, Tensor, TensorData, Tolerance};
use fla_models::gla_model::GlaConfig;

type B = NdArray<f32>;

fn tiny() -> GlaConfig {
    GlaConfig {
        hidden_size: 32,
        num_heads: 2,
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
    // Shaped like FLA's config.json: extra keys are ignored, FLA's names are read.
    let json = r#"{"architectures": ["GLAForCausalLM"], "model_type": "gla", "attn_mode": "chunk",
        "hidden_size": 128, "expand_k": 0.5, "expand_v": 1, "num_heads": 4, "num_hidden_layers": 2,
        "use_short_conv": true, "conv_size": 4, "hidden_ratio": 4, "intermediate_size": null,
        "norm_eps": 1e-06, "use_gk": true, "use_gv": false, "tie_word_embeddings": true,
        "vocab_size": 512, "fuse_norm": true, "torch_dtype": "float32"}"#;
    let dir = std::env::temp_dir().join(format!("fla-gla-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("config.json");
    std::fs::write(&path, json).unwrap();
    let c = GlaConfig::load(&path).expect("FLA config parses");
    assert_eq!((c.hidden_size, c.num_heads, c.vocab_size), (128, 4, 512));
    assert!(c.use_short_conv && c.tie_word_embeddings);
    assert_eq!(c.intermediate_size, None);
    assert_eq!(c.expand_v, 1.0);
    let model = c.init::<B>(&Default::default()).unwrap();
    assert!(model.lm_head.is_none());
    // Missing fields take FLA's defaults; a round trip keeps every field.
    std::fs::write(&path, r#"{"hidden_size": 64}"#).unwrap();
    let d = GlaConfig::load(&path).unwrap();
    assert_eq!(
        d,
        GlaConfig {
            hidden_size: 64,
            ..Default::default()
        }
    );
    d.save(&path).unwrap();
    assert_eq!(GlaConfig::load(&path).unwrap(), d);
    std::fs::write(&path, "{ not json").unwrap();
    assert!(matches!(
        GlaConfig::load(&path),
        Err(fla_models::gla_model::ConfigError::Parse(..))
    ));
}

#[test]
fn decoding_matches_whole_sequence() {
    let device = Default::default();
    let model = GlaConfig {
        use_short_conv: true,
        ..tiny()
    }
    .init::<B>(&device)
    .unwrap();
    let x = ids::<B>(&[&[1, 5, 3, 7, 2, 9], &[4, 4, 8, 0, 15, 6]], &device);
    let (whole, _) = model.forward(x.clone(), None, false).unwrap();
    let (mut logits, mut cache) = model
        .forward(x.clone().narrow(1, 0, 2), None, true)
        .unwrap();
    for t in 2..6 {
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

/// FLA's `attn_mode` values are accepted, anything else is refused by name.
#[test]
fn attn_mode_is_checked() {
    let device = Default::default();
    for mode in ["chunk", "fused_chunk", "fused_recurrent"] {
        let config = GlaConfig {
            attn_mode: mode.into(),
            ..tiny()
        };
        assert!(config.init::<B>(&device).is_ok(), "{mode} refused");
    }
    let bad = GlaConfig {
        attn_mode: "parallel".into(),
        ..tiny()
    };
    match bad.init::<B>(&device) {
        Err(fla_burn::FlaError::Unsupported(msg)) => assert!(msg.contains("parallel"), "{msg}"),
        Err(other) => panic!("expected Unsupported, got {other}"),
        Ok(_) => panic!("unknown attn_mode accepted"),
    }
}

/// GLA (the gated op, the gated norm) in half precision on the fused backend against f32
/// (`half_precision_matches_f32!`).
#[test]
fn gla_in_half_precision_matches_f32() {
    half_precision_matches_f32!(tiny());
}

/// GLA's training step (loss, every gradient, AdamW with clipping) in half precision on the fused
/// backend against f32, at the training preset's shapes (`half_precision_trains!`).
#[test]
fn gla_trains_in_half_precision() {
    half_precision_trains!(GlaConfig {
        hidden_size: 64,
        num_heads: 2,
        num_hidden_layers: 2,
        vocab_size: 256,
        use_short_conv: true,
        attn_mode: "fused_recurrent".into(),
        ..Default::default()
    });
}

/// Ids outside the vocabulary (16 here) are an error from `forward` and `loss`, not a panic in
/// the embedding's gather (CPU) or another row read silently (GPU).
#[test]
fn ids_outside_the_vocabulary_are_refused() {
    let device = Default::default();
    let model = tiny().init::<B>(&device).unwrap();
    for bad in [16, 1000, -1] {
        let x = ids::<B>(&[&[1, 5, bad, 7]], &device);
        match model.forward(x.clone(), None, false) {
            Err(fla_burn::FlaError::Shape(msg)) => assert!(msg.contains("vocabulary"), "{msg}"),
            Err(other) => panic!("{bad}: expected Shape, got {other}"),
            Ok(_) => panic!("{bad}: id outside the vocabulary accepted"),
        }
        assert!(model.loss(x).is_err(), "{bad}: loss accepted it");
    }
    let fine = ids::<B>(&[&[0, 15, 3]], &device);
    assert!(model.loss(fine).is_ok());
}

/// Caches for fewer (or more) layers than the model has are an error, not layers silently
/// restarted from an empty state.
#[test]
fn caches_must_cover_every_layer() {
    let device = Default::default();
    let model = tiny().init::<B>(&device).unwrap();
    let x = ids::<B>(&[&[1, 5, 3]], &device);
    let (_, cache) = model.forward(x.clone(), None, true).unwrap();
    let mut cache = cache.expect("asked for caches");
    assert_eq!(cache.len(), 2);
    cache.pop();
    match model.forward(x.narrow(1, 0, 1), Some(cache), true) {
        Err(fla_burn::FlaError::Shape(msg)) => assert!(msg.contains("1 layer caches"), "{msg}"),
        other => panic!("expected Shape, got {:?}", other.map(|_| ())),
    }
}

/// A short convolution needs two taps at least (its decoding cache holds `conv_size - 1`).
#[test]
fn conv_size_below_two_is_refused() {
    let device = Default::default();
    for size in [0, 1] {
        let config = GlaConfig {
            use_short_conv: true,
            conv_size: size,
            ..tiny()
        };
        match config.init::<B>(&device) {
            Err(fla_burn::FlaError::Shape(msg)) => assert!(msg.contains("conv_size"), "{msg}"),
            Err(other) => panic!("expected Shape, got {other}"),
            Ok(_) => panic!("conv_size {size} accepted"),
        }
    }
    // Without the convolution the size is not used.
    let unused = GlaConfig {
        use_short_conv: false,
        conv_size: 0,
        ..tiny()
    };
    assert!(unused.init::<B>(&device).is_ok());
}

/// Sampling settings that would pick tokens silently wrong are refused before anything runs;
/// the edges that are valid (top_p 1, top_k 1, temperature 0) run.
#[test]
fn generation_settings_are_checked() {
    use fla_models::generate::{generate, GenerationConfig};
    let device = Default::default();
    let model = tiny().init::<B>(&device).unwrap();
    let base = GenerationConfig {
        max_new_tokens: 3,
        ..Default::default()
    };
    let bad = [
        GenerationConfig {
            temperature: f64::NAN,
            ..base.clone()
        },
        GenerationConfig {
            temperature: -1.0,
            ..base.clone()
        },
        GenerationConfig {
            top_p: Some(-0.1),
            temperature: 1.0,
            ..base.clone()
        },
        GenerationConfig {
            top_p: Some(f64::NAN),
            temperature: 1.0,
            ..base.clone()
        },
        GenerationConfig {
            top_p: Some(1.5),
            temperature: 1.0,
            ..base.clone()
        },
        GenerationConfig {
            repetition_penalty: 0.0,
            ..base.clone()
        },
        GenerationConfig {
            repetition_penalty: f64::INFINITY,
            ..base.clone()
        },
    ];
    for cfg in bad {
        match generate(&model, &[1, 2], &cfg, &device) {
            Err(fla_burn::FlaError::Unsupported(_)) => {}
            Err(other) => panic!("{cfg:?}: expected Unsupported, got {other}"),
            Ok(_) => panic!("{cfg:?} accepted"),
        }
    }
    let greedy = generate(&model, &[1, 2], &base, &device).unwrap();
    // Each of these samples the arg max, so gives the greedy tokens: top_k 1; top_p 0 (as
    // transformers, the likeliest token alone; top_k 0 is no limit); a temperature so small
    // that the scaled logits overflow.
    let edges = [
        GenerationConfig {
            temperature: 0.7,
            top_k: Some(1),
            top_p: Some(1.0),
            ..base.clone()
        },
        GenerationConfig {
            temperature: 0.7,
            top_k: Some(0),
            top_p: Some(0.0),
            ..base.clone()
        },
        GenerationConfig {
            temperature: 1e-300,
            ..base.clone()
        },
    ];
    for cfg in edges {
        assert_eq!(
            generate(&model, &[1, 2], &cfg, &device).unwrap().tokens,
            greedy.tokens,
            "{cfg:?}"
        );
    }
}
