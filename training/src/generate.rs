//! `fla-generate`: continues a prompt with a model saved in FLA's format (a directory with
//! config.json and model.safetensors, as `fla-train` writes it or FLA's `save_pretrained` does),
//! and prints the text with the prompt and decoding times, like FLA's
//! `benchmarks/benchmark_generation.py`.
//!
//!   cargo run -p training --bin fla-generate -- --model runs/gla-tiny/model --prompt "Of Man"
//!
//! Tokens are bytes (the vocabulary `fla-train` uses). A directory with a `tokenizer.json` is
//! refused: Hugging Face tokenizers are not wired in yet.

use std::path::{Path, PathBuf};

use burn::tensor::backend::Backend;
use clap::Parser;
use fla_burn::{AttentionBackend, DeltaRuleBackend, GatedRecurrentBackend};
use fla_models::checkpoint::Pretrained;
use fla_models::gated_deltanet::GatedDeltaNet;
use fla_models::generate::{generate, GenerationConfig};
use fla_models::gla::GatedLinearAttention;
use fla_models::lm::{ForCausalLM, TokenMixer};

#[derive(Parser, Debug)]
struct Args {
    /// A directory with config.json and model.safetensors (FLA's layout).
    #[arg(long)]
    model: PathBuf,
    #[arg(long)]
    prompt: String,
    /// wgpu (default), ndarray (tensor-op ops, CPU) or cuda (built with --features cuda)
    #[arg(long, default_value = "wgpu")]
    backend: String,
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// 0: greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    #[arg(long)]
    top_k: Option<usize>,
    #[arg(long)]
    top_p: Option<f64>,
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f64,
    /// Stop at this token id.
    #[arg(long)]
    eos: Option<usize>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

type Error = Box<dyn std::error::Error>;

fn run_model<B: Backend, M: TokenMixer<B>>(args: &Args) -> Result<(), Error>
where
    ForCausalLM<B, M>: Pretrained<B>,
{
    let device = B::Device::default();
    let (model, _) = ForCausalLM::<B, M>::from_pretrained(&args.model, &device)?;
    let vocab = model.model.embeddings.weight.dims()[0];
    if vocab < 256 {
        return Err(
            format!("byte-level prompts need a vocabulary of 256, the model has {vocab}").into(),
        );
    }
    let prompt: Vec<usize> = args.prompt.bytes().map(usize::from).collect();
    let cfg = GenerationConfig {
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        repetition_penalty: args.repetition_penalty,
        eos_token_id: args.eos,
        seed: args.seed,
    };
    let out = generate(&model, &prompt, &cfg, &device)?;
    // Ids past the byte range (a larger vocabulary) have no byte; they print as U+FFFD.
    let bytes: Vec<u8> = out
        .tokens
        .iter()
        .map(|&t| u8::try_from(t).unwrap_or(b'?'))
        .collect();
    println!("{}{}", args.prompt, String::from_utf8_lossy(&bytes));
    let steps = out.tokens.len().saturating_sub(1).max(1);
    eprintln!(
        "prompt: {} tokens in {:.1} ms; decoding: {} tokens in {:.1} ms ({:.2} ms/token)",
        prompt.len(),
        out.prompt_time.as_secs_f64() * 1e3,
        out.tokens.len(),
        out.decode_time.as_secs_f64() * 1e3,
        out.decode_time.as_secs_f64() * 1e3 / steps as f64
    );
    Ok(())
}

fn model_type(dir: &Path) -> Result<String, Error> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    json.get("model_type")
        .and_then(|t| t.as_str())
        .map(str::to_string)
        .ok_or_else(|| format!("{} has no model_type", path.display()).into())
}

fn run_backend<B: GatedRecurrentBackend + DeltaRuleBackend + AttentionBackend>(
    args: &Args,
) -> Result<(), Error> {
    if args.model.join("tokenizer.json").exists() {
        return Err("tokenizer.json found: only byte-level models are supported so far".into());
    }
    match model_type(&args.model)?.as_str() {
        "gla" => run_model::<B, GatedLinearAttention<B>>(args),
        "gated_deltanet" => run_model::<B, GatedDeltaNet<B>>(args),
        "transformer" => run_model::<B, fla_models::attn::Attention<B>>(args),
        other => Err(format!(
            "model_type {other:?} is not built (gla, gated_deltanet, transformer)"
        )
        .into()),
    }
}

fn run(args: Args) -> Result<(), Error> {
    match args.backend.as_str() {
        "ndarray" => run_backend::<burn::backend::NdArray>(&args),
        #[cfg(feature = "wgpu")]
        "wgpu" => {
            fla_burn::device::check_wgpu(&Default::default())?;
            run_backend::<burn::backend::Wgpu>(&args)
        }
        #[cfg(feature = "cuda")]
        "cuda" => run_backend::<burn::backend::Cuda>(&args),
        other => Err(format!("backend {other} is not built in (features: wgpu, cuda)").into()),
    }
}

fn main() -> std::process::ExitCode {
    match run(Args::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fla-generate: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
