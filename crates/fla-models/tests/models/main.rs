//! Layer, model and parity tests, one test binary (each test binary links and monomorphises
//! Burn's backends again; one is built where five were). Select a file's tests by its module:
//! `cargo test -p fla-models --test models parity::`.

/// A model config's tiny model in half precision on the fused backend (`Wgpu<f16>`, Burn's
/// fusion) against the same weights in f32 on NdArray: the logits agree to half precision's
/// rounding through the layers (bound 2e-2 absolute on logits of order 1). A mixed-dtype product
/// anywhere in the model (as the rotary tables were) fails it with `DTypeMismatch`, and a
/// computation that loses half precision's range or accuracy fails the bound.
macro_rules! half_precision_matches_f32 {
    ($config:expr) => {{
        use burn::module::Module;
        use burn::record::{BinBytesRecorder, FullPrecisionSettings, Recorder};
        use burn::tensor::{Int, Tensor, TensorData, Tolerance};
        type F = burn::backend::NdArray<f32>;
        type H = burn::backend::Wgpu<burn::tensor::f16>;
        let (cpu, gpu) = (Default::default(), Default::default());
        let recorder = BinBytesRecorder::<FullPrecisionSettings>::default();
        let bytes = recorder
            .record($config.init::<F>(&cpu).unwrap().into_record(), ())
            .unwrap();
        let full = $config
            .init::<F>(&cpu)
            .unwrap()
            .load_record(recorder.load(bytes.clone(), &cpu).unwrap());
        let half = $config
            .init::<H>(&gpu)
            .unwrap()
            .load_record(recorder.load(bytes, &gpu).unwrap());
        let ids: Vec<i64> = vec![1, 5, 2, 9, 3, 3, 7, 4, 0, 15, 8, 6, 2, 1];
        let (want, _) = full
            .forward(
                Tensor::<F, 2, Int>::from_data(TensorData::new(ids.clone(), [2, 7]), &cpu),
                None,
                false,
            )
            .unwrap();
        let (got, _) = half
            .forward(
                Tensor::<H, 2, Int>::from_data(TensorData::new(ids, [2, 7]), &gpu),
                None,
                false,
            )
            .unwrap();
        let got = got.into_data().convert::<f32>();
        let diff = got
            .iter::<f32>()
            .zip(want.to_data().iter::<f32>())
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        eprintln!("half-precision logits: max |diff| {diff:.2e}");
        got.assert_approx_eq::<f32>(&want.into_data(), Tolerance::absolute(2e-2));
    }};
}

mod gated_deltanet;
mod layers;
mod model;
mod parity;
mod transformer;
