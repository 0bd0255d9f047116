//! Parity with FLA itself: tiny models built, saved and run by FLA 0.6.0 + transformers on a GPU
//! (`tests/fixtures/make_fixtures.py` says how), loaded here unchanged.
//!
//! FLA's logits come from its `fused_recurrent` mode in f32 (elementwise arithmetic, no TF32
//! products). Tolerance: relative RMSE 1e-3 (issue 6's bar); what we measure is ~1e-6, and the
//! failure message prints it.

use std::path::{Path, PathBuf};

use burn::backend::{NdArray, Wgpu};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use burn_store::{ModuleStore, SafetensorsStore};
use fla_burn::{AttentionBackend, LayerBackend};
use fla_models::attn::{Attention, KvCache};
use fla_models::checkpoint::{CheckpointError, Pretrained, PretrainedError};
use fla_models::delta_net::DeltaNet;
use fla_models::gated_deltanet::GatedDeltaNet;
use fla_models::gated_deltanet_model::GatedDeltaNetConfig;
use fla_models::generate::{generate, GenerationConfig};
use fla_models::gla::GatedLinearAttention;
use fla_models::gla_model::{GlaConfig, GlaForCausalLM};
use fla_models::hgrn2::Hgrn2Attention;
use fla_models::hybrid::{Hybrid, HybridCache};
use fla_models::lm::{ForCausalLM, TokenMixer};
use fla_models::modules::LayerCache;
use fla_models::retnet::MultiScaleRetention;
use rstest::rstest;

const TOLERANCE: f64 = 1e-3;
/// On CUDA, Burn's f32 matmuls (the model's linear layers, not our kernels) measured 7e-4 to
/// 1.1e-3 against FLA, where NdArray and wgpu give ~1e-6: consistent with TF32 products in
/// CubeCL's CUDA matmul. The 1e-3 bar holds on the other backends; CUDA gets 2e-3.
const CUDA_TOLERANCE: f64 = 2e-3;

fn fixture(family: &str) -> PathBuf {
    // The source tree's path when it exists; from the repository root otherwise (executables
    // carried to another machine run there).
    let built = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let root = if built.is_dir() {
        built
    } else {
        PathBuf::from("crates/fla-models/tests/fixtures")
    };
    root.join(family)
}

fn expected(family: &str, name: &str) -> TensorData {
    let mut store = SafetensorsStore::from_file(fixture(family).join("expected.safetensors"));
    store
        .get_snapshot(name)
        .expect("the fixture reads")
        .unwrap_or_else(|| panic!("the fixture has {name}"))
        .to_data()
        .expect("the fixture's data")
}

fn floats(d: TensorData) -> Vec<f64> {
    d.convert::<f64>().to_vec().expect("f64 data")
}

fn ids(d: TensorData) -> Vec<usize> {
    d.convert::<i64>()
        .to_vec::<i64>()
        .expect("i64 data")
        .into_iter()
        .map(|t| t as usize)
        .collect()
}

fn rel_rmse(got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len(), "sizes differ");
    let err: f64 = got.iter().zip(want).map(|(a, b)| (a - b).powi(2)).sum();
    let norm: f64 = want.iter().map(|b| b * b).sum();
    (err / norm).sqrt()
}

/// The bar of this run: [`CUDA_TOLERANCE`] when the fused cases run on CUDA (the NdArray cases
/// of that run share it), [`TOLERANCE`] otherwise.
fn tolerance() -> f64 {
    let cuda = cfg!(feature = "cuda") && std::env::var("FLA_TEST_RUNTIME").as_deref() == Ok("cuda");
    if cuda {
        CUDA_TOLERANCE
    } else {
        TOLERANCE
    }
}

fn close(what: &str, got: TensorData, want: TensorData) {
    assert_eq!(got.shape, want.shape, "{what}: shape");
    let e = rel_rmse(&floats(got), &floats(want));
    let tol = tolerance();
    assert!(e <= tol, "{what}: relative RMSE {e:.3e} > {tol:e}");
    eprintln!("{what}: relative RMSE {e:.3e}");
}

fn input_ids<B: Backend>(family: &str, device: &B::Device) -> Tensor<B, 2, Int> {
    let data = expected(family, "input_ids");
    Tensor::from_data(data, device)
}

fn load<B: Backend, M>(family: &str, device: &B::Device) -> ForCausalLM<B, M>
where
    ForCausalLM<B, M>: Pretrained<B>,
{
    ForCausalLM::<B, M>::from_pretrained(fixture(family), device)
        .unwrap_or_else(|e| panic!("{family} loads: {e}"))
        .0
}

/// The recurrent state in a layer's cache (none for a softmax-attention layer).
trait RecurrentState<B: Backend> {
    fn recurrent_state(self) -> Option<Tensor<B, 4>>;
}

impl<B: Backend> RecurrentState<B> for LayerCache<B> {
    fn recurrent_state(self) -> Option<Tensor<B, 4>> {
        Some(self.state)
    }
}

impl<B: Backend> RecurrentState<B> for KvCache<B> {
    fn recurrent_state(self) -> Option<Tensor<B, 4>> {
        None
    }
}

impl<B: AttentionBackend> RecurrentState<B> for HybridCache<B, LayerCache<B>> {
    fn recurrent_state(self) -> Option<Tensor<B, 4>> {
        match self {
            HybridCache::Linear(c) => Some(c.state),
            HybridCache::Attention(_) => None,
        }
    }
}

/// The prompt as one call: logits, and each recurrent layer's state after it.
fn whole<B: LayerBackend, M: TokenMixer<B>>(family: &str, device: &B::Device)
where
    ForCausalLM<B, M>: Pretrained<B>,
    M::Cache: RecurrentState<B>,
{
    let model = load::<B, M>(family, device);
    let (logits, caches) = model
        .forward(input_ids(family, device), None, true)
        .expect("forward");
    close("logits", logits.into_data(), expected(family, "logits"));
    for (i, c) in caches.expect("caches").into_iter().enumerate() {
        if let Some(state) = c.recurrent_state() {
            close(
                &format!("state of layer {i}"),
                state.into_data(),
                expected(family, &format!("state.{i}")),
            );
        }
    }
}

/// The same tokens one call each, every call continuing from the caches of the one before.
fn stepwise<B: LayerBackend, M: TokenMixer<B>>(family: &str, device: &B::Device)
where
    ForCausalLM<B, M>: Pretrained<B>,
{
    let model = load::<B, M>(family, device);
    let ids = input_ids::<B>(family, device);
    let t = ids.dims()[1];
    let mut cache = None;
    let mut out = Vec::with_capacity(t);
    for s in 0..t {
        let (logits, c) = model
            .forward(ids.clone().narrow(1, s, 1), cache, true)
            .expect("step");
        cache = c;
        out.push(logits);
    }
    close(
        "step-by-step logits",
        Tensor::cat(out, 1).into_data(),
        expected(family, "logits"),
    );
}

/// Greedy decoding from a 10-token prompt gives FLA's `generate(do_sample=False)` token ids.
fn greedy<B: LayerBackend, M: TokenMixer<B>>(family: &str, device: &B::Device)
where
    ForCausalLM<B, M>: Pretrained<B>,
{
    let model = load::<B, M>(family, device);
    let prompt = ids(expected(family, "prompt_ids"));
    let want = ids(expected(family, "greedy_ids"));
    let cfg = GenerationConfig {
        max_new_tokens: want.len() - prompt.len(),
        ..Default::default()
    };
    let got = generate(&model, &prompt, &cfg, device).expect("generate");
    assert_eq!(got.tokens, want[prompt.len()..], "greedy tokens");
}

/// "fused": the fused kernels on the runtime `FLA_TEST_RUNTIME` names (wgpu by default; cuda
/// when built with the `cuda` feature); "ndarray": the tensor-op fallback.
fn runtime(backend: &str) -> &'static str {
    match (backend, std::env::var("FLA_TEST_RUNTIME").as_deref()) {
        ("ndarray", _) => "ndarray",
        (_, Ok("cuda")) if cfg!(feature = "cuda") => "cuda",
        (_, Ok("cuda")) => panic!("FLA_TEST_RUNTIME=cuda needs the cuda feature"),
        _ => "wgpu",
    }
}

/// Runs `$f::<$B, mixer>` for the family named by `$family`.
macro_rules! for_family {
    ($f:ident, $family:expr, $B:ty) => {
        match $family {
            "gla" => $f::<$B, GatedLinearAttention<$B>>($family, &Default::default()),
            "gated_deltanet" => $f::<$B, GatedDeltaNet<$B>>($family, &Default::default()),
            "delta_net" => $f::<$B, DeltaNet<$B>>($family, &Default::default()),
            "retnet" => $f::<$B, MultiScaleRetention<$B>>($family, &Default::default()),
            "hgrn2" => $f::<$B, Hgrn2Attention<$B>>($family, &Default::default()),
            "gla_hybrid" => {
                $f::<$B, Hybrid<$B, GatedLinearAttention<$B>>>($family, &Default::default())
            }
            "transformer" => $f::<$B, Attention<$B>>($family, &Default::default()),
            other => panic!("no family {other:?}"),
        }
    };
}

#[cfg(feature = "cuda")]
macro_rules! cuda_case {
    ($f:ident, $family:expr) => {
        for_family!($f, $family, burn::backend::Cuda)
    };
}

#[cfg(not(feature = "cuda"))]
macro_rules! cuda_case {
    ($f:ident, $family:expr) => {{
        let _ = $family;
        unreachable!("runtime() refuses cuda without the feature")
    }};
}

macro_rules! dispatch {
    ($f:ident, $family:expr, $backend:expr) => {
        match runtime($backend) {
            "cuda" => cuda_case!($f, $family),
            "ndarray" => for_family!($f, $family, NdArray),
            _ => for_family!($f, $family, Wgpu),
        }
    };
}

#[rstest]
fn whole_sequence_matches_fla(
    #[values(
        "gla",
        "gated_deltanet",
        "delta_net",
        "retnet",
        "hgrn2",
        "gla_hybrid",
        "transformer"
    )]
    family: &str,
    #[values("ndarray", "fused")] backend: &str,
) {
    dispatch!(whole, family, backend);
}

#[rstest]
fn token_by_token_matches_fla(
    #[values(
        "gla",
        "gated_deltanet",
        "delta_net",
        "retnet",
        "hgrn2",
        "gla_hybrid",
        "transformer"
    )]
    family: &str,
    #[values("ndarray", "fused")] backend: &str,
) {
    dispatch!(stepwise, family, backend);
}

#[rstest]
fn greedy_generation_matches_fla(
    #[values(
        "gla",
        "gated_deltanet",
        "delta_net",
        "retnet",
        "hgrn2",
        "gla_hybrid",
        "transformer"
    )]
    family: &str,
    #[values("ndarray", "fused")] backend: &str,
) {
    dispatch!(greedy, family, backend);
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("fla-models-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn names_and_shapes(path: &Path) -> Vec<(String, Vec<usize>)> {
    let mut store = SafetensorsStore::from_file(path);
    let mut all: Vec<_> = store
        .get_all_snapshots()
        .expect("the file reads")
        .iter()
        .map(|(k, s)| (k.clone(), s.shape.to_vec()))
        .collect();
    all.sort();
    all
}

/// Saving writes FLA's file back: the same tensor names and shapes (FLA's layout), and loading
/// what we saved gives the same logits.
fn round_trip<B: LayerBackend, M: TokenMixer<B>>(family: &str, device: &B::Device)
where
    ForCausalLM<B, M>: Pretrained<B>,
{
    let dir = scratch(family);
    let ids = input_ids::<B>(family, device);
    let (model, config) =
        ForCausalLM::<B, M>::from_pretrained(fixture(family), device).expect("loads");
    let before = model.forward(ids.clone(), None, false).unwrap().0;
    model.save_pretrained(&config, &dir).expect("saves");
    assert_eq!(
        names_and_shapes(&dir.join("model.safetensors")),
        names_and_shapes(&fixture(family).join("model.safetensors")),
        "the saved file has FLA's names and shapes"
    );
    let (back, _) = ForCausalLM::<B, M>::from_pretrained(&dir, device).expect("loads back");
    let after = back.forward(ids, None, false).unwrap().0;
    assert_eq!(
        before.into_data(),
        after.into_data(),
        "same logits after the round trip"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[rstest]
fn save_pretrained_round_trip(
    #[values(
        "gla",
        "gated_deltanet",
        "delta_net",
        "retnet",
        "hgrn2",
        "gla_hybrid",
        "transformer"
    )]
    family: &str,
) {
    for_family!(round_trip, family, NdArray);
}

/// `src` (an f32 safetensors file) written to `dst` with every F32 tensor in `dtype` (`BF16` or
/// `F16`), as FLA saves its checkpoints.
fn to_half_file(src: &Path, dst: &Path, dtype: &str) {
    use burn::tensor::{bf16, f16};
    let bytes = std::fs::read(src).unwrap();
    let len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&bytes[8..8 + len]).unwrap();
    let data = &bytes[8 + len..];
    let (mut head, mut body) = (serde_json::Map::new(), Vec::new());
    for (name, mut entry) in header {
        if name == "__metadata__" {
            head.insert(name, entry);
            continue;
        }
        let [a, b] = [0, 1].map(|i| entry["data_offsets"][i].as_u64().unwrap() as usize);
        let start = body.len();
        if entry["dtype"] == "F32" {
            for c in data[a..b].chunks_exact(4) {
                let x = f32::from_le_bytes(c.try_into().unwrap());
                let bits = match dtype {
                    "BF16" => bf16::from_f32(x).to_bits(),
                    _ => f16::from_f32(x).to_bits(),
                };
                body.extend_from_slice(&bits.to_le_bytes());
            }
            entry["dtype"] = dtype.into();
        } else {
            body.extend_from_slice(&data[a..b]);
        }
        entry["data_offsets"] = serde_json::json!([start, body.len()]);
        head.insert(name, entry);
    }
    let mut head = serde_json::to_vec(&head).unwrap();
    head.resize(head.len().div_ceil(8) * 8, b' ');
    let mut file = (head.len() as u64).to_le_bytes().to_vec();
    file.extend(head);
    file.extend(body);
    std::fs::write(dst, file).unwrap();
}

/// A half-precision checkpoint (FLA saves bf16) loads into an f32 model, converted on the host:
/// NdArray (and lavapipe) cannot hold bf16 tensors at all, and an f32 model on bf16 weights
/// would compute in bf16. The logits are the f32 fixture's to the weights' rounding (and not
/// equal to them: the weights were rounded).
#[rstest]
fn half_precision_checkpoint_loads_in_f32(#[values("BF16", "F16")] dtype: &str) {
    let dir = scratch(&format!("gla-{dtype}"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(fixture("gla").join("config.json"), dir.join("config.json")).unwrap();
    let file = dir.join("model.safetensors");
    to_half_file(&fixture("gla").join("model.safetensors"), &file, dtype);
    let device = Default::default();
    let (model, _) = GlaForCausalLM::<NdArray>::from_pretrained(&dir, &device)
        .expect("a half-precision checkpoint loads");
    let ids = input_ids::<NdArray>("gla", &device);
    let got = model.forward(ids.clone(), None, false).unwrap().0;
    assert_eq!(got.dtype(), burn::tensor::DType::F32);
    let want = load::<NdArray, GatedLinearAttention<NdArray>>("gla", &device)
        .forward(ids, None, false)
        .unwrap()
        .0;
    let scale: f32 = want.clone().abs().max().into_scalar();
    let diff: f32 = (got - want).abs().max().into_scalar();
    assert!(
        diff > 0.0 && diff < 5e-2 * scale,
        "{dtype} weights: logits off by {diff} (largest {scale})"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

fn load_gla(config: &GlaConfig, file: &Path) -> Result<(), CheckpointError> {
    let mut model = config.init::<NdArray>(&Default::default()).expect("builds");
    fla_models::checkpoint::load_safetensors(&mut model, file)
}

#[test]
fn mis_shaped_tensor_is_named() {
    let dir = fixture("gla");
    let mut config = GlaConfig::load(dir.join("config.json")).unwrap();
    config.intermediate_size = Some(128);
    let err = load_gla(&config, &dir.join("model.safetensors")).unwrap_err();
    match err {
        CheckpointError::Shape {
            name,
            expected,
            found,
            ..
        } => {
            assert!(
                name.starts_with("model.layers.") && name.contains(".mlp."),
                "{name}"
            );
            assert_ne!(expected, found);
            assert!(
                found.contains(&256) && expected.contains(&128),
                "{expected:?} {found:?}"
            );
        }
        other => panic!("expected a shape error, got {other}"),
    }
}

#[test]
fn unexpected_and_missing_tensors_are_named() {
    let dir = fixture("gla");
    let mut config = GlaConfig::load(dir.join("config.json")).unwrap();
    config.use_short_conv = false;
    match load_gla(&config, &dir.join("model.safetensors")).unwrap_err() {
        CheckpointError::Unexpected(_, names) => {
            assert!(
                names.contains(&"model.layers.0.attn.q_conv1d.weight".to_string()),
                "{names:?}"
            )
        }
        other => panic!("expected unexpected tensors, got {other}"),
    }
    // The Gated DeltaNet fixture ties its head to the embeddings: untied, lm_head is missing.
    let dir = fixture("gated_deltanet");
    let mut config = GatedDeltaNetConfig::load(dir.join("config.json")).unwrap();
    config.tie_word_embeddings = false;
    let mut model = config.init::<NdArray>(&Default::default()).unwrap();
    match fla_models::checkpoint::load_safetensors(&mut model, &dir.join("model.safetensors"))
        .unwrap_err()
    {
        CheckpointError::Missing(_, names) => assert_eq!(names, ["lm_head.weight"]),
        other => panic!("expected a missing tensor, got {other}"),
    }
}

#[test]
fn missing_files_and_bad_configs_are_errors() {
    let dir = scratch("missing");
    std::fs::create_dir_all(&dir).unwrap();
    match GlaForCausalLM::<NdArray>::from_pretrained(&dir, &Default::default()) {
        Err(PretrainedError::Config(_)) => {}
        other => panic!("expected a config error, got {:?}", other.map(|_| ())),
    }
    std::fs::write(dir.join("config.json"), "{\"hidden_size\": \"wide\"}").unwrap();
    match GlaForCausalLM::<NdArray>::from_pretrained(&dir, &Default::default()) {
        Err(PretrainedError::Config(e)) => assert!(e.to_string().contains("GLA"), "{e}"),
        other => panic!("expected a parse error, got {:?}", other.map(|_| ())),
    }
    std::fs::copy(fixture("gla").join("config.json"), dir.join("config.json")).unwrap();
    match GlaForCausalLM::<NdArray>::from_pretrained(&dir, &Default::default()) {
        Err(PretrainedError::Checkpoint(CheckpointError::Io(p, _))) => {
            assert!(p.ends_with("model.safetensors"))
        }
        other => panic!("expected a missing checkpoint, got {:?}", other.map(|_| ())),
    }
    std::fs::write(dir.join("model.safetensors"), b"not a safetensors file").unwrap();
    match GlaForCausalLM::<NdArray>::from_pretrained(&dir, &Default::default()) {
        Err(PretrainedError::Checkpoint(CheckpointError::Io(..))) => {}
        other => panic!(
            "expected a corrupt checkpoint error, got {:?}",
            other.map(|_| ())
        ),
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Writes a model of ours (Burn's own random initialisation, not FLA's weights) in FLA's format
/// with its logits on the fixture's input ids, to `target/fla-export/<family>/`; FLA loads it on
/// the GPU machine and compares (`make_fixtures.py --check-ours target/fla-export`). Here it
/// checks that the directory loads back to the same logits.
fn export<B: LayerBackend, M: TokenMixer<B>>(family: &str, device: &B::Device)
where
    ForCausalLM<B, M>: Pretrained<B>,
{
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../target/fla-export")
        .join(family);
    let ids = input_ids::<B>(family, device);
    let config: <ForCausalLM<B, M> as Pretrained<B>>::Config =
        fla_models::lm::load_config(&fixture(family).join("config.json"), "fixture")
            .expect("the fixture's config");
    let model = ForCausalLM::<B, M>::build(&config, device).expect("builds");
    model.save_pretrained(&config, &dir).expect("saves");
    let back = ForCausalLM::<B, M>::from_pretrained(&dir, device)
        .unwrap()
        .0;
    let logits = model.forward(ids.clone(), None, false).unwrap().0;
    let reloaded = back.forward(ids.clone(), None, false).unwrap().0;
    let data = logits.into_data();
    assert_eq!(data, reloaded.into_data(), "the export loads back");
    let json = serde_json::json!({
        "input_ids": ids.into_data().convert::<i64>().to_vec::<i64>().unwrap(),
        "input_shape": [2, 80],
        "logits_shape": data.shape.as_ref(),
        "logits": data.convert::<f32>().to_vec::<f32>().unwrap(),
    });
    std::fs::write(dir.join("ours.json"), json.to_string()).unwrap();
}

#[rstest]
fn export_for_fla(
    #[values(
        "gla",
        "gated_deltanet",
        "delta_net",
        "retnet",
        "hgrn2",
        "gla_hybrid",
        "transformer"
    )]
    family: &str,
) {
    for_family!(export, family, NdArray);
}
