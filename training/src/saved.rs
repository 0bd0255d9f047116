//! Models saved in FLA's format (a directory with config.json and model.safetensors), whatever
//! their family: the binaries that read one (`fla-generate`, `fla-eval`) share the dispatch on
//! `model_type` here.

use std::path::Path;

use crate::precision::CastParams;
use crate::tokenizer::Tokenizer;
use burn::module::Module;
use burn::tensor::FloatDType;
use fla_burn::{AttentionBackend, DeltaRuleBackend, GatedRecurrentBackend, LayerBackend};
use fla_models::checkpoint::Pretrained;
use fla_models::gated_deltanet::GatedDeltaNet;
use fla_models::gla::GatedLinearAttention;
use fla_models::lm::{ForCausalLM, TokenMixer};

pub type Error = Box<dyn std::error::Error>;

/// What a binary does with a loaded model and its tokeniser; generic over the family, which is
/// known only once config.json is read.
pub trait WithModel<B: LayerBackend> {
    fn run<M: TokenMixer<B>>(
        self,
        model: ForCausalLM<B, M>,
        tokenizer: &Tokenizer,
    ) -> Result<(), Error>
    where
        ForCausalLM<B, M>: Pretrained<B>;
}

/// The `model_type` field of `dir/config.json`, and whether the model is a hybrid (FLA's `attn`
/// field: softmax attention in some layers).
pub fn model_type(dir: &Path) -> Result<(String, bool), Error> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let hybrid = json.get("attn").is_some_and(|a| !a.is_null());
    json.get("model_type")
        .and_then(|t| t.as_str())
        .map(|t| (t.to_string(), hybrid))
        .ok_or_else(|| format!("{} has no model_type", path.display()).into())
}

/// The dtype `--precision` asks the model's weights to be cast to after loading, on a backend
/// whose float type is f32: `f16` (wgpu, cuda). `None` for f32 and bf16: the loader converts
/// every checkpoint to the backend's float type (f32, or bf16 on `Cuda<bf16>`, see
/// [`on_backend`]).
pub fn cast_for(precision: &str) -> Option<FloatDType> {
    (precision == "f16").then_some(FloatDType::F16)
}

/// Loads the model in `dir` on `B`'s default device with the directory's tokeniser (its
/// tokenizer.json, or bytes) and hands both to `task`; a model whose vocabulary is smaller than
/// the tokeniser's is refused. With `cast`, the weights are cast to that dtype after loading
/// (the model then computes in it; the device must support it).
pub fn with_model<B, W>(dir: &Path, cast: Option<FloatDType>, task: W) -> Result<(), Error>
where
    B: GatedRecurrentBackend + DeltaRuleBackend + AttentionBackend,
    W: WithModel<B>,
{
    fn load<B: LayerBackend, M: TokenMixer<B>, W: WithModel<B>>(
        dir: &Path,
        cast: Option<FloatDType>,
        tokenizer: &Tokenizer,
        task: W,
    ) -> Result<(), Error>
    where
        ForCausalLM<B, M>: Pretrained<B>,
    {
        let (model, _) = ForCausalLM::<B, M>::from_pretrained(dir, &B::Device::default())?;
        let model = match cast {
            Some(dtype) => model.map(&mut CastParams(dtype)),
            None => model,
        };
        let vocab = model.model.embeddings.weight.dims()[0];
        let tokens = tokenizer.vocab_size();
        if vocab < tokens {
            return Err(format!(
                "the tokeniser has {tokens} ids, the model's vocabulary only {vocab}"
            )
            .into());
        }
        task.run(model, tokenizer)
    }
    if let Some(dtype) = cast {
        B::gated_check_dtype(&B::Device::default(), dtype.into())?;
    }
    let tokenizer = &Tokenizer::for_model_dir(dir)?;
    use fla_models::delta_net::DeltaNet;
    use fla_models::hgrn2::Hgrn2Attention;
    use fla_models::hybrid::Hybrid;
    use fla_models::retnet::MultiScaleRetention;
    let (family, hybrid) = model_type(dir)?;
    match (family.as_str(), hybrid) {
        ("gla", false) => load::<B, GatedLinearAttention<B>, W>(dir, cast, tokenizer, task),
        ("gla", true) => load::<B, Hybrid<B, GatedLinearAttention<B>>, W>(dir, cast, tokenizer, task),
        ("gated_deltanet", false) => load::<B, GatedDeltaNet<B>, W>(dir, cast, tokenizer, task),
        ("gated_deltanet", true) => load::<B, Hybrid<B, GatedDeltaNet<B>>, W>(dir, cast, tokenizer, task),
        ("delta_net", false) => load::<B, DeltaNet<B>, W>(dir, cast, tokenizer, task),
        ("delta_net", true) => load::<B, Hybrid<B, DeltaNet<B>>, W>(dir, cast, tokenizer, task),
        ("retnet", false) => load::<B, MultiScaleRetention<B>, W>(dir, cast, tokenizer, task),
        ("retnet", true) => load::<B, Hybrid<B, MultiScaleRetention<B>>, W>(dir, cast, tokenizer, task),
        ("hgrn2", false) => load::<B, Hgrn2Attention<B>, W>(dir, cast, tokenizer, task),
        ("hgrn2", true) => load::<B, Hybrid<B, Hgrn2Attention<B>>, W>(dir, cast, tokenizer, task),
        ("transformer", _) => load::<B, fla_models::attn::Attention<B>, W>(dir, cast, tokenizer, task),
        (other, _) => Err(format!(
            "model_type {other:?} is not built (gla, gated_deltanet, delta_net, retnet, hgrn2, transformer)"
        )
        .into()),
    }
}

/// Runs `$body` with the type `$B` set to the backend named `$name` (ndarray, wgpu, cuda) for
/// the precision `$precision` (f32; f16 on wgpu and cuda, where `$body` casts the weights, see
/// [`cast_for`]; bf16 on cuda), or returns an error naming what is not available; wgpu is checked
/// for an adapter first.
macro_rules! on_backend {
    ($name:expr, $precision:expr, $B:ident => $body:expr) => {
        match ($name, $precision) {
            (_, p) if !["f32", "f16", "bf16"].contains(&p) => {
                Err(format!("unknown --precision {p:?} (f32, f16, bf16)").into())
            }
            ("ndarray", "f32") => {
                type $B = burn::backend::NdArray;
                $body
            }
            #[cfg(feature = "wgpu")]
            ("wgpu", "f32" | "f16") => {
                fla_burn::device::check_wgpu(&Default::default())?;
                type $B = burn::backend::Wgpu;
                $body
            }
            #[cfg(feature = "cuda")]
            ("cuda", "f32" | "f16") => {
                type $B = burn::backend::Cuda;
                $body
            }
            #[cfg(feature = "cuda")]
            ("cuda", "bf16") => {
                type $B = burn::backend::Cuda<burn::tensor::bf16>;
                $body
            }
            // Before the precision's message: without the feature, wgpu takes no precision.
            #[cfg(not(feature = "wgpu"))]
            ("wgpu", _) => Err("backend wgpu is not built in (features: wgpu, cuda)".into()),
            (b @ ("ndarray" | "wgpu"), p) if p != "f32" => Err(format!(
                "--precision {p} is not available on --backend {b} (bf16 needs --backend cuda, \
                 f16 wgpu or cuda)"
            )
            .into()),
            (other, _) => {
                Err(format!("backend {other} is not built in (features: wgpu, cuda)").into())
            }
        }
    };
}
pub(crate) use on_backend;
