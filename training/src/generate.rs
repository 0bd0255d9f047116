//! `fla-generate`: continues a prompt with a model saved in FLA's format (a directory with
//! config.json and model.safetensors, as `fla-train` writes it or FLA's `save_pretrained` does),
//! and prints the text with the prompt and decoding times, like FLA's
//! `benchmarks/benchmark_generation.py`.
//!
//!   cargo run -p training --bin fla-generate -- --model runs/gla-tiny/model --prompt "Of Man"
//!
//! Text is tokenised with the directory's `tokenizer.json` (Hugging Face's format, as
//! `fla-train --tokenizer` saves it and FLA's hub checkpoints carry it), or as bytes without one.

use fla_burn::LayerBackend;
use std::path::PathBuf;

use crate::saved::{self, with_model, Error, WithModel};
use crate::tokenizer::Tokenizer;
use clap::Parser;
use fla_models::checkpoint::Pretrained;
use fla_models::generate::{generate, Generation, GenerationConfig};
use fla_models::lm::{ForCausalLM, TokenMixer};

#[derive(Parser, Debug)]
struct Args {
    /// A directory with config.json and model.safetensors (FLA's layout).
    #[arg(long)]
    model: PathBuf,
    /// The prompt as text (tokenised with the directory's tokenizer.json, or as bytes).
    #[arg(
        long,
        required_unless_present = "prompt_ids",
        conflicts_with = "prompt_ids"
    )]
    prompt: Option<String>,
    /// The prompt as token ids, comma-separated (benchmarks, and comparing ids with FLA's
    /// `generate`); the new tokens are then printed as ids too.
    #[arg(long, value_delimiter = ',')]
    prompt_ids: Option<Vec<usize>>,
    /// wgpu (default), ndarray (tensor-op ops, CPU) or cuda (built with --features cuda)
    #[arg(long, default_value = "wgpu")]
    backend: String,
    /// f32; f16 (wgpu, cuda): the f32 weights cast to f16 on loading, the model computing in f16;
    /// bf16 (cuda only): weights and activations in bf16, as FLA's benchmarks run.
    #[arg(long, default_value = "f32")]
    precision: String,
    /// CubeCL's autotune effort (minimal, balanced, extensive, full); see fla-train --help.
    #[arg(long, default_value = "minimal")]
    autotune: String,
    /// Generate this many times and report the median of all runs but the first, which
    /// compiles the kernels (1: the one run's times, compilation included).
    #[arg(long, default_value_t = 1)]
    repeat: usize,
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

impl<B: LayerBackend> WithModel<B> for Generate<'_> {
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
        let prompt = match (&args.prompt, &args.prompt_ids) {
            (Some(text), _) => tokenizer.encode(text)?,
            (None, Some(ids)) => ids.clone(),
            (None, None) => return Err("give --prompt or --prompt-ids".into()),
        };
        let cfg = GenerationConfig {
            max_new_tokens: args.max_new_tokens,
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
            repetition_penalty: args.repetition_penalty,
            eos_token_id: args.eos.or_else(|| tokenizer.end_of_text()),
            seed: args.seed,
        };
        let runs = (0..args.repeat.max(1))
            .map(|_| generate(&model, &prompt, &cfg, &device))
            .collect::<Result<Vec<_>, _>>()?;
        let out = &runs[0];
        match &args.prompt {
            Some(text) => println!("{text}{}", tokenizer.decode(&out.tokens)?),
            None => println!("{:?}", out.tokens),
        }
        // Warm runs only, when there are any: the first compiles every kernel it meets.
        let timed = if runs.len() > 1 {
            &runs[1..]
        } else {
            &runs[..]
        };
        let median = |f: &dyn Fn(&Generation) -> f64| {
            let mut v: Vec<f64> = timed.iter().map(f).collect();
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let prompt_ms = median(&|g| g.prompt_time.as_secs_f64() * 1e3);
        let decode_ms = median(&|g| g.decode_time.as_secs_f64() * 1e3);
        let steps = out.tokens.len().saturating_sub(1).max(1);
        eprintln!(
            "prompt: {} tokens in {prompt_ms:.1} ms; decoding: {} tokens in {decode_ms:.1} ms \
             ({:.2} ms/token); total {:.1} ms{}",
            prompt.len(),
            out.tokens.len(),
            decode_ms / steps as f64,
            prompt_ms + decode_ms,
            if runs.len() > 1 {
                format!(" (median of {} runs after a warm-up run)", timed.len())
            } else {
                String::new()
            }
        );
        Ok(())
    }
}

fn run(args: Args) -> Result<(), Error> {
    fla_burn::device::configure_cubecl(&args.autotune)?;
    saved::on_backend!(args.backend.as_str(), args.precision.as_str(), B => with_model::<B, _>(&args.model, saved::cast_for(&args.precision), Generate(&args)))
}

/// `fla-generate`'s entry point (the binary is this call).
pub fn main() -> std::process::ExitCode {
    match run(Args::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fla-generate: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
