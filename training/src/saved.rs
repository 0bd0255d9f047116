//! Models saved in FLA's format (a directory with config.json and model.safetensors), whatever
//! their family: the binaries that read one (`fla-generate`, `fla-eval`) share the dispatch on
//! `model_type` here.

use std::path::Path;

use crate::tokenizer::Tokenizer;
use burn::tensor::backend::Backend;
use fla_burn::{AttentionBackend, DeltaRuleBackend, GatedRecurrentBackend};
use fla_models::checkpoint::Pretrained;
use fla_models::gated_deltanet::GatedDeltaNet;
use fla_models::gla::GatedLinearAttention;
use fla_models::lm::{ForCausalLM, TokenMixer};

pub type Error = Box<dyn std::error::Error>;

/// What a binary does with a loaded model and its tokeniser; generic over the family, which is
/// known only once config.json is read.
pub trait WithModel<B: Backend> {
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

/// Loads the model in `dir` on `B`'s default device with the directory's tokeniser (its
/// tokenizer.json, or bytes) and hands both to `task`; a model whose vocabulary is smaller than
/// the tokeniser's is refused.
pub fn with_model<B, W>(dir: &Path, task: W) -> Result<(), Error>
where
    B: GatedRecurrentBackend + DeltaRuleBackend + AttentionBackend,
    W: WithModel<B>,
{
    fn load<B: Backend, M: TokenMixer<B>, W: WithModel<B>>(
        dir: &Path,
        tokenizer: &Tokenizer,
        task: W,
    ) -> Result<(), Error>
    where
        ForCausalLM<B, M>: Pretrained<B>,
    {
        let (model, _) = ForCausalLM::<B, M>::from_pretrained(dir, &B::Device::default())?;
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
    let tokenizer = &Tokenizer::for_model_dir(dir)?;
    use fla_models::delta_net::DeltaNet;
    use fla_models::hgrn2::Hgrn2Attention;
    use fla_models::hybrid::Hybrid;
    use fla_models::retnet::MultiScaleRetention;
    let (family, hybrid) = model_type(dir)?;
    match (family.as_str(), hybrid) {
        ("gla", false) => load::<B, GatedLinearAttention<B>, W>(dir, tokenizer, task),
        ("gla", true) => load::<B, Hybrid<B, GatedLinearAttention<B>>, W>(dir, tokenizer, task),
        ("gated_deltanet", false) => load::<B, GatedDeltaNet<B>, W>(dir, tokenizer, task),
        ("gated_deltanet", true) => load::<B, Hybrid<B, GatedDeltaNet<B>>, W>(dir, tokenizer, task),
        ("delta_net", false) => load::<B, DeltaNet<B>, W>(dir, tokenizer, task),
        ("delta_net", true) => load::<B, Hybrid<B, DeltaNet<B>>, W>(dir, tokenizer, task),
        ("retnet", false) => load::<B, MultiScaleRetention<B>, W>(dir, tokenizer, task),
        ("retnet", true) => load::<B, Hybrid<B, MultiScaleRetention<B>>, W>(dir, tokenizer, task),
        ("hgrn2", false) => load::<B, Hgrn2Attention<B>, W>(dir, tokenizer, task),
        ("hgrn2", true) => load::<B, Hybrid<B, Hgrn2Attention<B>>, W>(dir, tokenizer, task),
        ("transformer", _) => load::<B, fla_models::attn::Attention<B>, W>(dir, tokenizer, task),
        (other, _) => Err(format!(
            "model_type {other:?} is not built (gla, gated_deltanet, delta_net, retnet, hgrn2, transformer)"
        )
        .into()),
    }
}

/// Runs `$body` with the type `$B` set to the backend named `$name` (ndarray, wgpu, cuda) at the
/// float precision `$precision` (f32; bf16 on cuda), or returns an error naming what is not
/// available; wgpu is checked for an adapter first.
macro_rules! on_backend {
    ($name:expr, $precision:expr, $B:ident => $body:expr) => {
        match ($name, $precision) {
            (_, p) if !["f32", "bf16"].contains(&p) => {
                Err(format!("unknown --precision {p:?} (f32, bf16)").into())
            }
            ("ndarray", "f32") => {
                type $B = burn::backend::NdArray;
                $body
            }
            #[cfg(feature = "wgpu")]
            ("wgpu", "f32") => {
                fla_burn::device::check_wgpu(&Default::default())?;
                type $B = burn::backend::Wgpu;
                $body
            }
            #[cfg(feature = "cuda")]
            ("cuda", "f32") => {
                type $B = burn::backend::Cuda;
                $body
            }
            #[cfg(feature = "cuda")]
            ("cuda", "bf16") => {
                type $B = burn::backend::Cuda<burn::tensor::bf16>;
                $body
            }
            (b @ ("ndarray" | "wgpu"), p) if p != "f32" => Err(format!(
                "--precision {p} is not available on --backend {b} (bf16 needs --backend cuda)"
            )
            .into()),
            (other, _) => {
                Err(format!("backend {other} is not built in (features: wgpu, cuda)").into())
            }
        }
    };
}
pub(crate) use on_backend;
