//! `fla-generate`: continues a prompt with a model saved in FLA's format (a directory with
//! config.json and model.safetensors, as `fla-train` writes it or FLA's `save_pretrained` does),
//! and prints the text with the prompt and decoding times, like FLA's
//! `benchmarks/benchmark_generation.py`.
//!
//!   cargo run -p training --bin fla-generate -- --model runs/gla-tiny/model --prompt "Of Man"
//!
//! Text is tokenised with the directory's `tokenizer.json` (Hugging Face's format, as
//! `fla-train --tokenizer` saves it and FLA's hub checkpoints carry it), or as bytes without one.

mod saved;

use std::path::PathBuf;

use burn::tensor::backend::Backend;
use clap::Parser;
use fla_models::checkpoint::Pretrained;
use fla_models::generate::{generate, GenerationConfig};
use fla_models::lm::{ForCausalLM, TokenMixer};
use saved::{with_model, Error, WithModel};
use training::tokenizer::Tokenizer;

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
    /// Stop at this token id; default: the tokeniser's end-of-text token, if it has one.
    #[arg(long)]
    eos: Option<usize>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

struct Generate<'a>(&'a Args);

impl<B: Backend> WithModel<B> for Generate<'_> {
    fn run<M: TokenMixer<B>>(
        self,
        model: ForCausalLM<B, M>,
        tokenizer: &Tokenizer,
    ) -> Result<(), Error>
    where
        ForCausalLM<B, M>: Pretrained<B>,
    {
        let args = self.0;
        let device = B::Device::default();
        let prompt = tokenizer.encode(&args.prompt)?;
        let cfg = GenerationConfig {
            max_new_tokens: args.max_new_tokens,
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
            repetition_penalty: args.repetition_penalty,
            eos_token_id: args.eos.or_else(|| tokenizer.end_of_text()),
            seed: args.seed,
        };
        let out = generate(&model, &prompt, &cfg, &device)?;
        println!("{}{}", args.prompt, tokenizer.decode(&out.tokens)?);
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
}

fn run(args: Args) -> Result<(), Error> {
    saved::on_backend!(args.backend.as_str(), B => with_model::<B, _>(&args.model, Generate(&args)))
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
