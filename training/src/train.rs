//! `fla-train`: trains a small linear-attention language model (GLA by default, or another
//! family of fla-models) on the bundled corpus (Milton's *Paradise Lost*) or a user's text
//! (`--data`: a .txt or .jsonl file or a folder of them), byte-level or with a `tokenizer.json`,
//! and reports training and validation loss.
//!
//!   cargo run -p training --bin fla-train                 # wgpu (lavapipe without a GPU)
//!   cargo run -p training --bin fla-train -- --backend ndarray
//!   cargo run -p training --bin fla-train -- --model gated-deltanet   # or transformer
//!   cargo run -p training --bin fla-train -- bpe --vocab-size 1024 --out runs/tokenizer.json
//!   cargo run -p training --bin fla-train -- --tokenizer runs/tokenizer.json
//!
//! Training runs on burn-train's learner: AdamW with linear warmup then cosine decay, per-tensor
//! gradient clipping and gradient accumulation, its metrics (loss, perplexity, learning rate,
//! tokens/s) logged under the run folder and shown in its terminal UI when stdout is a terminal,
//! and its checkpointer: checkpoints every `--checkpoint-every` steps and `--resume` from the
//! newest one (bit-exact on the same backend); Ctrl-C ends the run after the step in flight with a
//! checkpoint (see [`crate::strategy`] for the loop). At the end the model is written in FLA's
//! format (`runs/<model>-tiny/model/`: config.json + model.safetensors) for `fla-generate` and
//! FLA; a metrics CSV and PNG/SVG loss curves beside it; `fla-eval` evaluates the saved model.

use crate::checkpoint::{AtomicRecorder, Checkpoints, KeepRecent};
use crate::learner::{Failure, PlainRenderer, StatMetric, Trainee, WarmupCosine, Windows};
use crate::plot;
use crate::precision::{LossScale, Precision, ScaleState};
use crate::strategy::{Plan, StepLoop};

use std::io::{IsTerminal, Write};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::data::{self, Corpus};
use crate::tokenizer::Tokenizer;
use burn::backend::Autodiff;
use burn::grad_clipping::GradientClippingConfig;
use burn::module::{AutodiffModule, Module, ModuleDisplay};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::FloatDType;
use burn::train::metric::LearningRateMetric;
use burn::train::{Interrupter, Learner, SupervisedTraining, TrainingStrategy};
use clap::{Parser, Subcommand};
use fla_burn::{
    AdamWBackend, AttentionBackend, DeltaRuleBackend, FlaError, FusedAdamWConfig,
    GatedRecurrentBackend, LayerBackend,
};
use fla_models::checkpoint::Pretrained;
use fla_models::delta_net::DeltaNet;
use fla_models::delta_net_model::DeltaNetConfig;
use fla_models::gated_deltanet::GatedDeltaNet;
use fla_models::gated_deltanet_model::GatedDeltaNetConfig;
use fla_models::gla::GatedLinearAttention;
use fla_models::gla_model::GlaConfig;
use fla_models::hgrn2::Hgrn2Attention;
use fla_models::hgrn2_model::Hgrn2Config;
use fla_models::lm::{ForCausalLM, TokenMixer};
use fla_models::retnet::MultiScaleRetention;
use fla_models::retnet_model::RetNetConfig;
use fla_models::transformer_model::TransformerConfig;

/// The config type a model family saves with.
type PretrainedConfig<B, M> = <ForCausalLM<B, M> as Pretrained<B>>::Config;

/// A model built for training, with the config it saves with.
type Built<B, M> = (ForCausalLM<B, M>, PretrainedConfig<B, M>);

#[derive(Parser, Debug)]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    train: Args,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Train a byte-level BPE tokeniser on the text and write it as tokenizer.json (then train a
    /// model with `--tokenizer FILE`).
    Bpe {
        /// Text to train on (as for training); default: the bundled corpus.
        #[arg(long)]
        data: Option<std::path::PathBuf>,
        /// Ids in the vocabulary: 256 bytes, <|endoftext|> and the merges.
        #[arg(long, default_value_t = 1024)]
        vocab_size: usize,
        #[arg(long, default_value = "runs/tokenizer.json")]
        out: std::path::PathBuf,
    },
}

#[derive(Parser, Debug)]
struct Args {
    /// wgpu (default), ndarray (tensor-op ops, CPU) or cuda (built with --features cuda)
    #[arg(long, default_value = "wgpu")]
    backend: String,
    /// gla (GLA, FLA's GLAConfig), gated-deltanet (Gated DeltaNet), delta-net (DeltaNet), retnet
    /// (RetNet), hgrn2 (HGRN2) or transformer (softmax attention), each with FLA's config
    #[arg(long, default_value = "gla")]
    model: String,
    /// One of FLA's config.json files for the `--model` family (e.g. training/configs/gla-340M.json,
    /// FLA's 340M GLA recipe) instead of the tiny preset that `--hidden`, `--layers`, `--heads`
    /// shape; its vocab_size must cover the tokeniser's ids.
    #[arg(long)]
    config: Option<std::path::PathBuf>,
    /// Start from a model saved in FLA's format (a folder with config.json and
    /// model.safetensors: an earlier run's export, or FLA's own checkpoint of the `--model`
    /// family) instead of freshly initialised weights; its config sets the shape.
    #[arg(long, conflicts_with = "config")]
    init: Option<std::path::PathBuf>,
    /// Training text: a .txt/.md file, a .jsonl file ("text" per line) or a folder of them
    /// (recursively); default: the bundled corpus. The last 5% of its tokens are validation.
    #[arg(long)]
    data: Option<std::path::PathBuf>,
    /// A Hugging Face tokenizer.json (e.g. from `fla-train bpe`); default: bytes (256 ids). It is
    /// saved with the model, so `fla-generate` and `fla-eval` use it.
    #[arg(long)]
    tokenizer: Option<std::path::PathBuf>,
    #[arg(long, default_value_t = 100)]
    steps: usize,
    #[arg(long, default_value_t = 16)]
    batch: usize,
    #[arg(long, default_value_t = 64)]
    seq_len: usize,
    #[arg(long, default_value_t = 64)]
    hidden: usize,
    #[arg(long, default_value_t = 2)]
    layers: usize,
    #[arg(long, default_value_t = 2)]
    heads: usize,
    #[arg(long, default_value_t = 3e-3)]
    lr: f64,
    #[arg(long, default_value_t = 20)]
    warmup: usize,
    /// After warmup the learning rate follows a cosine down to this fraction of `--lr` at the
    /// last step (FLA's recipes: warmup then cosine); 1 keeps it constant.
    #[arg(long, default_value_t = 0.1)]
    min_lr_ratio: f64,
    /// Clip the gradients to this L2 norm, taken over all of them together (PyTorch's
    /// `clip_grad_norm_`, as FLA's and Hugging Face's training clip); 0 turns clipping off.
    #[arg(long, default_value_t = 1.0)]
    clip_grad_norm: f32,
    /// Clip each parameter's gradient to `--clip-grad-norm` on its own instead (Burn's
    /// `GradientClipping::Norm`, what fla-train did before 2026-12-06).
    #[arg(long)]
    clip_per_tensor: bool,
    /// Micro-batches of `--batch` sequences whose gradients add up to one optimiser step.
    #[arg(long, default_value_t = 1)]
    grad_accum: usize,
    /// Evaluate the validation loss every this many steps.
    #[arg(long, default_value_t = 25)]
    eval_every: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Metrics CSV (step, train loss, validation loss); default runs/<model>-tiny/metrics.csv.
    #[arg(long)]
    metrics: Option<String>,
    /// CubeCL's autotune effort (minimal, balanced, extensive, full) unless CUBECL_AUTOTUNE_LEVEL
    /// is set. On a fresh CUDA machine `balanced` compiles hundreds of matmul candidates before
    /// the first step (measured on an H100: no step within 150 s for this tiny model; with
    /// `minimal`, 30 steps in 146 s including compilation). Autotune results and compiled kernels
    /// are cached on disk (the `target/` beside the nearest Cargo.toml, else `~/.cache/cubecl`; see
    /// `fla_burn::device::configure_cubecl`): a second run on the same machine starts in seconds.
    #[arg(long, default_value = "minimal")]
    autotune: String,
    /// The run's folder (default runs/<model>-tiny): burn-train's checkpoints (`checkpoint/`:
    /// model, optimizer, schedule and loop state per step) and metric logs (`train/`, `valid/`,
    /// per evaluation window), and by default the metrics CSV, its plots and the exported model.
    #[arg(long)]
    run_dir: Option<std::path::PathBuf>,
    /// Save a checkpoint every this many steps (and at the end); 0: only at the end.
    #[arg(long, default_value_t = 50)]
    checkpoint_every: usize,
    /// Where the trained model is written in FLA's format (config.json + model.safetensors);
    /// default runs/<model>-tiny/model.
    #[arg(long)]
    export: Option<std::path::PathBuf>,
    /// Continue from the newest checkpoint in the run folder up to `--steps`.
    #[arg(long)]
    resume: bool,
    /// f32 (default); bf16-mixed (CUDA) and f16-mixed (wgpu, CUDA): f32 master weights, the
    /// parameters and AdamW's state in f32 and each step's forward and backward on a copy of the
    /// whole model in bf16 / f16 (f16 with GradScaler's dynamic loss scaling); bf16 (= bf16-true,
    /// CUDA): parameters, activations and optimizer state all in bf16 (updates smaller than half
    /// a weight's bf16 ulp are lost). The loss's softmax is f32 in every mode. f16 parameters are
    /// refused: with Adam's state in f16 its epsilon (1e-8) underflows to zero and parameters
    /// without gradient (unused embedding rows) turn NaN (measured on lavapipe at step 15).
    #[arg(long, default_value = "f32")]
    precision: String,
    /// f16-mixed: the initial loss scale (default 65536, GradScaler's; with `--resume`, the
    /// checkpoint's); halved and the step skipped whenever the gradients overflow, doubled after
    /// 2000 steps without.
    #[arg(long)]
    loss_scale: Option<f64>,
    /// Stop after this step (a checkpoint is saved there), as a time-limited session would; the
    /// learning-rate schedule still spans `--steps`, and `--resume` continues the run.
    #[arg(long)]
    stop_at: Option<usize>,
}

/// The schedule `args` asks for (stepped by burn-train's learner).
fn schedule(args: &Args) -> WarmupCosine {
    WarmupCosine {
        peak: args.lr,
        warmup: args.warmup,
        steps: args.steps,
        min_ratio: args.min_lr_ratio,
        grad_accum: args.grad_accum,
        micro: 0,
    }
}

/// What the loop needs of a backend: every op family, with and without autodiff.
trait TrainBackend:
    AutodiffBackend<
        InnerBackend: GatedRecurrentBackend + DeltaRuleBackend + AttentionBackend + AdamWBackend,
    > + GatedRecurrentBackend
    + DeltaRuleBackend
    + AttentionBackend
{
}
impl<B> TrainBackend for B where
    B: AutodiffBackend<
            InnerBackend: GatedRecurrentBackend
                              + DeltaRuleBackend
                              + AttentionBackend
                              + AdamWBackend,
        > + GatedRecurrentBackend
        + DeltaRuleBackend
        + AttentionBackend
{
}

/// Builds the `--model` family's tiny preset and trains it.
fn train_family<B: TrainBackend>(
    args: &Args,
    text: &Text,
) -> Result<(), Box<dyn std::error::Error>> {
    let vocab_size = text.tokenizer.vocab_size();
    // The presets divide the hidden size by the heads (head and expansion sizes).
    if args.heads == 0 {
        return Err("--heads 0: the presets need at least one head".into());
    }
    // Mixed precision computes in a dtype the backend's float type is not: the kernels' device
    // must support it (f16 on a Vulkan device without shaderFloat16 is refused here, by name).
    if let Some(dtype) = text.precision.compute() {
        B::gated_check_dtype(&Default::default(), dtype.into())?;
    }
    match args.model.as_str() {
        "gla" => train::<B, GatedLinearAttention<B>>(args, text, "GLA", |device| {
            let config = GlaConfig {
                hidden_size: args.hidden,
                num_heads: args.heads,
                num_hidden_layers: args.layers,
                vocab_size,
                use_short_conv: true,
                attn_mode: "fused_recurrent".into(),
                ..Default::default()
            };
            Ok((config.init(device)?, config))
        }),
        "gated-deltanet" => train::<B, GatedDeltaNet<B>>(args, text, "Gated DeltaNet", |device| {
            // FLA's layout (6·hidden² per layer with the output gate) scaled down: key heads of
            // hidden / heads / 2 dims, values twice as wide.
            let config = GatedDeltaNetConfig {
                hidden_size: args.hidden,
                num_heads: args.heads,
                head_dim: (args.hidden / args.heads / 2).max(1),
                expand_v: 2.0,
                num_hidden_layers: args.layers,
                vocab_size,
                attn_mode: "fused_recurrent".into(),
                ..Default::default()
            };
            Ok((config.init(device)?, config))
        }),
        "delta-net" => train::<B, DeltaNet<B>>(args, text, "DeltaNet", |device| {
            let config = DeltaNetConfig {
                hidden_size: args.hidden,
                num_heads: args.heads,
                num_hidden_layers: args.layers,
                vocab_size,
                attn_mode: "fused_recurrent".into(),
                ..Default::default()
            };
            Ok((config.init(device)?, config))
        }),
        "retnet" => train::<B, MultiScaleRetention<B>>(args, text, "RetNet", |device| {
            // FLA's RetNet layout (values twice as wide as keys, MLP ratio 2) at this size.
            let config = RetNetConfig {
                hidden_size: args.hidden,
                num_heads: args.heads,
                num_hidden_layers: args.layers,
                vocab_size,
                attn_mode: "fused_recurrent".into(),
                ..Default::default()
            };
            Ok((config.init(device)?, config))
        }),
        "hgrn2" => train::<B, Hgrn2Attention<B>>(args, text, "HGRN2", |device| {
            let config = Hgrn2Config {
                hidden_size: args.hidden,
                expand_ratio: Some((args.hidden / args.heads).max(1)),
                num_hidden_layers: args.layers,
                vocab_size,
                attn_mode: "fused_recurrent".into(),
                ..Default::default()
            };
            Ok((config.init(device)?, config))
        }),
        "transformer" => {
            train::<B, fla_models::attn::Attention<B>>(args, text, "Transformer", |device| {
                // The softmax-attention baseline (FLA's TransformerConfig) at the same size.
                let config = TransformerConfig {
                    hidden_size: args.hidden,
                    num_heads: args.heads,
                    num_hidden_layers: args.layers,
                    vocab_size,
                    ..Default::default()
                };
                Ok((config.init(device)?, config))
            })
        }
        other => {
            Err(format!(
                "unknown --model {other:?} (gla, gated-deltanet, delta-net, retnet, hgrn2, transformer)"
            )
            .into())
        }
    }
}

/// The `--model` family's model built from one of FLA's `config.json` files (any field FLA's
/// config of that family has; absent ones take FLA's defaults).
fn from_config<B, M>(
    path: &std::path::Path,
    vocab: usize,
    device: &B::Device,
) -> Result<Built<B, M>, Box<dyn std::error::Error>>
where
    B: AutodiffBackend + LayerBackend,
    B::InnerBackend: LayerBackend + AdamWBackend,
    ForCausalLM<B, M>: Pretrained<B>,
    PretrainedConfig<B, M>: Default,
    M: TokenMixer<B>,
{
    let family = <ForCausalLM<B, M> as Pretrained<B>>::FAMILY;
    let config: PretrainedConfig<B, M> = fla_models::lm::load_config(path, family)?;
    // Absent and unknown fields are allowed (FLA's files carry fields this port does not use), so
    // another family's file would parse: its model_type tells.
    let model_type = |v: &serde_json::Value| v.get("model_type").cloned();
    let expected = model_type(&serde_json::to_value(PretrainedConfig::<B, M>::default())?);
    let value = serde_json::to_value(&config)?;
    let found = model_type(&value);
    if found != expected {
        return Err(format!(
            "{}: model_type {} is not --model {family}'s ({})",
            path.display(),
            found.unwrap_or_default(),
            expected.unwrap_or_default()
        )
        .into());
    }
    // Every config of FLA's families names its vocabulary size; the tokeniser's ids must fit.
    let size = value
        .get("vocab_size")
        .and_then(|v| v.as_u64())
        .ok_or_else(|| format!("{}: no vocab_size", path.display()))?;
    if (size as usize) < vocab {
        return Err(format!(
            "{}: vocab_size {size} is smaller than the tokeniser's {vocab} ids",
            path.display()
        )
        .into());
    }
    let model = ForCausalLM::<B, M>::build(&config, device)?;
    Ok((model, config))
}

/// What every family's run shares: the tokenised training text, its tokeniser, the interrupter
/// Ctrl-C stops, and the precision it trains in.
struct Text {
    tokenizer: Tokenizer,
    corpus: Corpus,
    interrupter: Interrupter,
    precision: Precision,
}

fn train<B, M>(
    args: &Args,
    text: &Text,
    family: &str,
    build: impl FnOnce(&B::Device) -> Result<Built<B, M>, FlaError>,
) -> Result<(), Box<dyn std::error::Error>>
where
    B: AutodiffBackend + LayerBackend,
    B::InnerBackend: LayerBackend + AdamWBackend,
    ForCausalLM<B, M>: Pretrained<B>,
    PretrainedConfig<B, M>: Default,
    M: TokenMixer<B> + AutodiffModule<B> + ModuleDisplay + 'static,
    M::InnerModule: TokenMixer<B::InnerBackend> + ModuleDisplay,
{
    let device = B::Device::default();
    // Parameter initialisation draws from the backend's generator: seeded, a run is repeatable
    // (and a resumed one can match an uninterrupted one).
    B::seed(&device, args.seed);
    let run_dir = args
        .run_dir
        .clone()
        .unwrap_or_else(|| format!("runs/{}-tiny", args.model).into());
    let metrics = args
        .metrics
        .clone()
        .unwrap_or_else(|| run_dir.join("metrics.csv").display().to_string());
    let files = Checkpoints::new(run_dir.join("checkpoint"));
    let vocab = text.tokenizer.vocab_size();
    let (model, config) = match (&args.init, &args.config) {
        (Some(dir), _) => {
            // Built from its config as for `--config` (family and vocabulary checked), then its
            // weights loaded into that model: one build, not a second one in `from_pretrained`.
            let (mut model, config) =
                from_config::<B, M>(&dir.join("config.json"), vocab, &device)?;
            // In the backend's float type whatever the file's (FLA's are bf16): f32 under mixed
            // precision, whose per-step copy is cast from them.
            fla_models::checkpoint::load_safetensors(&mut model, &dir.join("model.safetensors"))?;
            (model, config)
        }
        (None, Some(path)) => from_config::<B, M>(path, vocab, &device)?,
        (None, None) => build(&device)?,
    };
    if args.grad_accum == 0 {
        return Err("--grad-accum must be at least 1".into());
    }
    if args.eval_every == 0 {
        return Err("--eval-every must be at least 1".into());
    }
    let num_params = model.num_params();
    let failure = Failure::default();
    let clip = (args.clip_grad_norm > 0.0).then_some(args.clip_grad_norm);
    let (per_tensor, global) = match args.clip_per_tensor {
        true => (clip.map(GradientClippingConfig::Norm), None),
        false => (None, clip),
    };
    // Burn's AdamW with each parameter's step (clipping included) one fused op: about 27
    // element-wise kernels per parameter tensor become one. Clipping by the global norm adds
    // a reduction per gradient and one coefficient, read by every step on the device.
    let optim = FusedAdamWConfig::new()
        .with_weight_decay(0.01)
        .with_grad_clipping(per_tensor)
        .with_max_global_norm(global)
        .init()?;
    let precision = text.precision;
    let loss_scale = LossScale::new(
        precision
            .scales_loss()
            .then(|| ScaleState::new(args.loss_scale.unwrap_or(ScaleState::INITIAL))),
    );
    let trainee = Trainee::new(
        model,
        args.grad_accum,
        failure.clone(),
        precision.compute(),
        loss_scale.clone(),
    );
    let mut learner = Learner::new(trainee, optim, schedule(args));
    // Read here rather than through burn-train's `checkpoint(epoch)`, which panics on a file it
    // cannot read: a missing or corrupt checkpoint is an error that names it.
    let resumed = if args.resume {
        let step = files
            .latest()?
            .ok_or_else(|| format!("--resume: no checkpoint in {}", files.dir.display()))?;
        let state = files.state(step)?;
        learner.load_model(files.load::<B, _>("model", step, &device)?);
        learner.load_optim(files.load::<B, _>("optim", step, &device)?);
        learner.load_scheduler(files.load::<B, _>("scheduler", step, &device)?);
        // The checkpoint's scale, unless `--loss-scale` asks for another.
        if let (Some(_), Some(saved), None) = (loss_scale.get(), state.loss_scale, args.loss_scale)
        {
            loss_scale.set(saved);
        }
        println!("resumed from {} (step {step})", files.dir.display());
        Some(state)
    } else {
        None
    };
    if let Some(dir) = std::path::Path::new(&metrics).parent() {
        std::fs::create_dir_all(dir)?;
    }
    // A resumed run keeps the metrics up to its checkpoint and appends from there.
    let kept = match &resumed {
        Some(state) => std::fs::read_to_string(&metrics)
            .unwrap_or_default()
            .lines()
            .skip(1)
            .filter(|l| {
                l.split(',')
                    .next()
                    .and_then(|s| s.parse::<usize>().ok())
                    .is_some_and(|step| step <= state.step)
            })
            .map(|l| format!("{l}\n"))
            .collect::<String>(),
        None => String::new(),
    };
    let mut csv = std::fs::File::create(&metrics)?;
    writeln!(
        csv,
        "step,train_loss,valid_loss,learning_rate,valid_perplexity,tokens_per_s,loss_scale,skipped"
    )?;
    csv.write_all(kept.as_bytes())?;
    // burn-train's interactive UI owns a terminal; elsewhere the loop prints its own lines.
    let print = !std::io::stdout().is_terminal();
    let shape = serde_json::to_value(&config)?;
    let field = |name: &str| shape.get(name).and_then(|v| v.as_u64()).unwrap_or(0);
    println!(
        "{family} {} layers, hidden {}, {num_params} parameters; {} training tokens ({} ids)",
        field("num_hidden_layers"),
        field("hidden_size"),
        text.corpus.train.len(),
        text.tokenizer.vocab_size()
    );
    let first_step = resumed.as_ref().map_or(1, |s| s.step + 1);
    // `--stop-at` ends the session early; the schedule still spans `--steps`, so a later
    // `--resume` continues exactly where an uninterrupted run would be.
    let last = args.stop_at.unwrap_or(args.steps).min(args.steps);
    let train_loader = Windows::<B>::new(
        text.corpus.train.clone().into(),
        args.batch,
        args.seq_len,
        args.seed,
        (first_step - 1) * args.grad_accum..args.steps * args.grad_accum,
        device.clone(),
    );
    // A fixed validation set: the same four batches at every evaluation.
    let valid_loader = Windows::<B::InnerBackend>::new(
        text.corpus.valid.clone().into(),
        args.batch,
        args.seq_len,
        args.seed ^ 0xDEAD_BEEF,
        0..4,
        device.clone(),
    );
    let keep = KeepRecent {
        files: files.clone(),
        keep: 2,
        saved: files
            .complete()?
            .into_iter()
            .filter(|&s| s < first_step)
            .collect(),
    };
    let strategy = Arc::new(StepLoop::<B, M> {
        plan: Plan {
            first_step,
            last,
            steps: args.steps,
            grad_accum: args.grad_accum,
            eval_every: args.eval_every,
            checkpoint_every: args.checkpoint_every,
            micro_tokens: args.batch * args.seq_len,
            print,
            resumed,
        },
        files,
        csv: Mutex::new(csv),
        failure,
        loss_scale,
        device: device.clone(),
        outcome: Mutex::new(None),
    });
    let mut training =
        SupervisedTraining::new(&run_dir, Arc::new(train_loader), Arc::new(valid_loader))
            .metrics((StatMetric::loss(), StatMetric::perplexity()))
            .metric_train_numeric(StatMetric::tokens_per_second())
            .metric_train_numeric(LearningRateMetric::new())
            .with_file_checkpointer(AtomicRecorder::default())
            .with_checkpointing_strategy(keep)
            .with_interrupter(text.interrupter.clone())
            .with_training_strategy(TrainingStrategy::Custom(strategy.clone()))
            .num_epochs(args.steps.div_ceil(args.eval_every));
    if print {
        training = training.renderer(PlainRenderer);
    }
    let _ = training.launch(learner);
    let outcome = strategy
        .outcome
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
        .ok_or("the training loop did not run")?;
    let (report, trained) = outcome?;
    if let Some(step) = report.stopped_at {
        println!(
            "interrupted: stopped after step {step} with a checkpoint in {}; `--resume` continues",
            strategy.files.dir.display()
        );
    }
    // The trained model as FLA saves one: `fla-generate --model DIR` and FLA's
    // `AutoModelForCausalLM.from_pretrained(DIR)` read it.
    let export = args.export.clone().unwrap_or_else(|| run_dir.join("model"));
    trained.lm.save_pretrained(&config, &export)?;
    text.tokenizer.save_to_model_dir(&export)?;
    println!(
        "model (FLA's config.json + model.safetensors) in {}",
        export.display()
    );
    drop(strategy);
    let csv_text = std::fs::read_to_string(&metrics)?;
    let png = std::path::Path::new(&metrics).with_extension("png");
    plot::loss_png(&csv_text, &png)?;
    plot::loss_svg(&csv_text, &png.with_extension("svg"))?;
    println!("loss curves in {} (and .svg)", png.display());
    println!(
        "validation loss {:.4} -> {:.4}; metrics in {metrics}",
        report.start_valid, report.last_valid
    );
    Ok(())
}

/// `fla-train`'s entry point (the binary is this call).
pub fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Bpe {
            data,
            vocab_size,
            out,
        }) => train_tokenizer(data.as_deref(), vocab_size, &out),
        None => run(cli.train),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fla-train: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// `fla-train bpe`: a byte-level BPE trained on the text, written as tokenizer.json.
fn train_tokenizer(
    data: Option<&std::path::Path>,
    vocab_size: usize,
    out: &std::path::Path,
) -> Result<(), Box<dyn std::error::Error>> {
    let docs = data::documents(data)?;
    let t0 = Instant::now();
    let tokenizer = Tokenizer::train_bpe(docs.iter(), vocab_size)?;
    let dir = out.parent().filter(|d| !d.as_os_str().is_empty());
    if let Some(dir) = dir {
        std::fs::create_dir_all(dir)?;
    }
    tokenizer.save(out)?;
    let (chars, tokens) = docs.iter().try_fold((0, 0), |(c, t), d| {
        tokenizer.encode(d).map(|ids| (c + d.len(), t + ids.len()))
    })?;
    println!(
        "BPE of {} ids trained in {:.1} s: {} bytes -> {} tokens ({:.2} bytes/token); written to {}",
        tokenizer.vocab_size(),
        t0.elapsed().as_secs_f64(),
        chars,
        tokens,
        chars as f64 / tokens.max(1) as f64,
        out.display()
    );
    Ok(())
}

fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    fla_burn::device::configure_cubecl(&args.autotune)?;
    // Checked before the corpus is read: a typo is reported at once.
    let precision = Precision::parse(&args.precision)?;
    match args.loss_scale {
        Some(_) if !precision.scales_loss() => {
            return Err("--loss-scale applies to --precision f16-mixed only".into())
        }
        Some(s) if !(s.is_finite() && s > 0.0) => {
            return Err(format!("--loss-scale must be positive and finite, not {s}").into())
        }
        _ => {}
    }
    let tokenizer = match &args.tokenizer {
        Some(path) => Tokenizer::from_file(path)?,
        None => Tokenizer::Bytes,
    };
    let docs = data::documents(args.data.as_deref())?;
    let corpus = Corpus::new(&docs, &tokenizer, args.seq_len + 1)?;
    let interrupter = Interrupter::new();
    // The loop checks the interrupter after each step (burn-train's terminal UI stops it too); a
    // second Ctrl-C ends the process at once.
    let stop = interrupter.clone();
    ctrlc::set_handler(move || {
        if stop.should_stop() {
            std::process::exit(130);
        }
        stop.stop(None);
    })
    .map_err(|e| format!("cannot install the Ctrl-C handler: {e}"))?;
    let text = Text {
        tokenizer,
        corpus,
        interrupter,
        precision,
    };
    let unsupported = |backend: &str| -> Result<(), Box<dyn std::error::Error>> {
        Err(format!(
            "--precision {} is not available on --backend {backend} (bf16 needs --backend \
             cuda: lavapipe has no bf16, and Vulkan no bf16 arithmetic; f16-mixed needs wgpu \
             or cuda)",
            args.precision
        )
        .into())
    };
    match args.backend.as_str() {
        "ndarray" => match precision {
            Precision::F32 => train_family::<Autodiff<burn::backend::NdArray>>(&args, &text),
            _ => unsupported("ndarray"),
        },
        #[cfg(feature = "wgpu")]
        "wgpu" => {
            fla_burn::device::check_wgpu(&Default::default())?;
            match precision {
                Precision::F32 | Precision::Mixed(FloatDType::F16) => {
                    train_family::<Autodiff<burn::backend::Wgpu>>(&args, &text)
                }
                _ => unsupported("wgpu"),
            }
        }
        #[cfg(feature = "cuda")]
        "cuda" => match precision {
            Precision::Bf16True => {
                train_family::<Autodiff<burn::backend::Cuda<burn::tensor::bf16>>>(&args, &text)
            }
            _ => train_family::<Autodiff<burn::backend::Cuda>>(&args, &text),
        },
        other => Err(format!("backend {other} is not built in (features: wgpu, cuda)").into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine_to_the_floor() {
        let a = Cli::parse_from([
            "fla-train",
            "--steps",
            "110",
            "--warmup",
            "10",
            "--lr",
            "1e-3",
            "--min-lr-ratio",
            "0.1",
        ])
        .train;
        let schedule = schedule(&a);
        let lr = |s| schedule.at(s);
        assert!((lr(5) - 5e-4).abs() < 1e-15);
        assert!((lr(10) - 1e-3).abs() < 1e-15);
        // Halfway through the decay: 0.1 + 0.9 · 0.5.
        assert!((lr(60) - 0.55e-3).abs() < 1e-12);
        assert!((lr(110) - 1e-4).abs() < 1e-15);
        assert!((11..110).all(|s| lr(s + 1) < lr(s)));
    }
}
