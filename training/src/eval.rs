//! `fla-eval`: evaluates a model saved in FLA's format (config.json + model.safetensors, as
//! `fla-train` or FLA's `save_pretrained` writes it) the way FLA users do with lm-eval-harness,
//! on text tokenised by the model directory's `tokenizer.json` (bytes without one):
//!
//! - perplexity of a text (by default the bundled corpus's validation split, the last 5% that
//!   `fla-train` holds out), in windows of `--seq-len` tokens moved by `--stride` (each token is
//!   scored once, with at least `seq_len − stride` tokens of context after the first window);
//!   reports loss (nats per token), perplexity and bits per byte (over the text's UTF-8 bytes);
//! - multiple choice (`--choices FILE.jsonl`, one `{"context": ..., "choices": [...], "label": i}`
//!   per line): a choice's score is the log-likelihood of its tokens after the context's; reports
//!   accuracy and length-normalised accuracy (lm-eval's `acc` and `acc_norm`).
//!
//!   cargo run --release -p training --bin fla-eval -- --model runs/gla-tiny/model

use fla_burn::LayerBackend;
use std::path::PathBuf;
use std::time::Instant;

use crate::data::{self, Corpus};
use crate::saved::{self, with_model, Error, WithModel};
use crate::tokenizer::Tokenizer;
use burn::tensor::activation::log_softmax;
use burn::tensor::{FloatDType, Int, Tensor, TensorData};
use clap::Parser;
use fla_models::checkpoint::Pretrained;
use fla_models::lm::{ForCausalLM, TokenMixer};

#[derive(Parser, Debug)]
struct Args {
    /// A directory with config.json and model.safetensors (FLA's layout).
    #[arg(long)]
    model: PathBuf,
    /// wgpu (default), ndarray (tensor-op ops, CPU) or cuda (built with --features cuda)
    #[arg(long, default_value = "wgpu")]
    backend: String,
    /// f32; f16 (wgpu, cuda): the weights cast to f16, the model computing in f16; bf16 (cuda).
    /// Log-probabilities are f32 in every case.
    #[arg(long, default_value = "f32")]
    precision: String,
    /// Text to measure perplexity on (a .txt or .jsonl file or a folder of them, read as
    /// `fla-train --data` reads it); default: the bundled corpus's validation split.
    #[arg(long)]
    text: Option<PathBuf>,
    /// Only the first this many tokens of the text.
    #[arg(long)]
    max_tokens: Option<usize>,
    /// Predictions per window.
    #[arg(long, default_value_t = 256)]
    seq_len: usize,
    /// Tokens a window moves by (at most --seq-len; default --seq-len: windows do not overlap).
    #[arg(long)]
    stride: Option<usize>,
    /// Windows per forward pass.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Multiple-choice questions (JSON lines: context, choices, label).
    #[arg(long)]
    choices: Option<PathBuf>,
}

/// One window of a strided evaluation: tokens `start .. end` go in, targets `start + 1 .. end`
/// are predicted, and those from `first` on are scored.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Window {
    start: usize,
    end: usize,
    first: usize,
}

/// Windows over `n` tokens with `ctx` predictions each, moved by `stride` (1 ..= ctx): every
/// target `1 .. n` is scored exactly once, by the first window that predicts it.
fn windows(n: usize, ctx: usize, stride: usize) -> Vec<Window> {
    let mut out = Vec::new();
    let mut scored_to = 1;
    let mut start = 0;
    while scored_to < n {
        let end = (start + ctx + 1).min(n);
        out.push(Window {
            start,
            end,
            first: scored_to.max(start + 1),
        });
        scored_to = end;
        start += stride;
    }
    out
}

/// Sum of `log p(target)` over the scored targets of `rows` (token rows of one length, each with
/// the first target position it scores, counted within the row: targets `1 .. len`).
fn scored_log_likelihood<B: LayerBackend, M: TokenMixer<B>>(
    model: &ForCausalLM<B, M>,
    rows: &[(&[usize], usize)],
    device: &B::Device,
) -> Result<Vec<f64>, Error> {
    let len = rows[0].0.len();
    let n = rows.len();
    let ids: Vec<i64> = rows
        .iter()
        .flat_map(|(r, _)| r.iter().map(|&b| b as i64))
        .collect();
    let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [n, len]), device);
    // The tokeniser's ids, which the model's vocabulary was checked to cover when it loaded.
    let (logits, _) = model.forward_checked_ids(ids.clone().narrow(1, 0, len - 1), None, false)?;
    let targets = ids.narrow(1, 1, len - 1).unsqueeze_dim::<3>(2);
    // Log-probabilities in f32 whatever the model computes in (as the training loss does).
    let logp = log_softmax(logits.cast(FloatDType::F32), 2)
        .gather(2, targets)
        .squeeze_dim::<2>(2);
    // Targets before a row's first scored one are context only.
    let mask: Vec<f32> = rows
        .iter()
        .flat_map(|&(_, first)| (1..len).map(move |t| if t >= first { 1.0 } else { 0.0 }))
        .collect();
    let mask = Tensor::<B, 2>::from_data(
        TensorData::new(mask, [n, len - 1]),
        (device, FloatDType::F32.into()),
    );
    let sums = (logp * mask).sum_dim(1).into_data().convert::<f64>();
    Ok(sums.to_vec::<f64>().map_err(|e| format!("{e:?}"))?)
}

/// `(scored tokens, total negative log-likelihood)` of `text`.
fn perplexity<B: LayerBackend, M: TokenMixer<B>>(
    model: &ForCausalLM<B, M>,
    text: &[usize],
    args: &Args,
) -> Result<(usize, f64, usize), Error> {
    let stride = args.stride.unwrap_or(args.seq_len);
    if args.seq_len == 0 || stride == 0 || stride > args.seq_len {
        return Err(format!(
            "--stride ({stride}) must be between 1 and --seq-len ({})",
            args.seq_len
        )
        .into());
    }
    if text.len() < 2 {
        return Err(format!(
            "perplexity needs at least 2 tokens, the text has {}",
            text.len()
        )
        .into());
    }
    let device = B::Device::default();
    let wins = windows(text.len(), args.seq_len, stride);
    let (mut nll, mut count) = (0.0, 0);
    // Windows of one length go through together (only the last one is shorter).
    for group in wins.chunk_by(|a, b| a.end - a.start == b.end - b.start) {
        for batch in group.chunks(args.batch.max(1)) {
            let rows: Vec<(&[usize], usize)> = batch
                .iter()
                .map(|w| (&text[w.start..w.end], w.first - w.start))
                .collect();
            nll -= scored_log_likelihood(model, &rows, &device)?
                .iter()
                .sum::<f64>();
            count += batch.iter().map(|w| w.end - w.first).sum::<usize>();
        }
    }
    Ok((count, nll, wins.len()))
}

/// One multiple-choice question.
#[derive(serde::Deserialize)]
struct Question {
    context: String,
    choices: Vec<String>,
    label: usize,
}

fn read_questions(path: &PathBuf) -> Result<Vec<Question>, Error> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let at = || format!("{} line {}", path.display(), i + 1);
        let q: Question = serde_json::from_str(line).map_err(|e| format!("{}: {e}", at()))?;
        if q.context.is_empty() || q.choices.is_empty() || q.choices.iter().any(String::is_empty) {
            return Err(format!("{}: empty context or choice", at()).into());
        }
        if q.label >= q.choices.len() {
            return Err(
                format!("{}: label {} of {} choices", at(), q.label, q.choices.len()).into(),
            );
        }
        out.push(q);
    }
    if out.is_empty() {
        return Err(format!("{}: no questions", path.display()).into());
    }
    Ok(out)
}

/// `(acc, acc_norm)`: how often the most likely choice is the label, by total log-likelihood
/// and by log-likelihood per byte of the choice (lm-eval's `acc_norm`). Context and choice are
/// tokenised apart and joined, as lm-eval does.
fn multiple_choice<B: LayerBackend, M: TokenMixer<B>>(
    model: &ForCausalLM<B, M>,
    tokenizer: &Tokenizer,
    questions: &[Question],
) -> Result<(f64, f64), Error> {
    let device = B::Device::default();
    let (mut hits, mut hits_norm) = (0, 0);
    for q in questions {
        // One forward pass per choice, at its own length (no padding to reason about).
        let mut scores = Vec::with_capacity(q.choices.len());
        let context = tokenizer.encode(&q.context)?;
        for c in &q.choices {
            let seq = [context.clone(), tokenizer.encode(c)?].concat();
            scores.push(scored_log_likelihood(model, &[(&seq, context.len())], &device)?[0]);
        }
        let best = |f: &dyn Fn(usize) -> f64| {
            (0..scores.len())
                .max_by(|&a, &b| f(a).total_cmp(&f(b)))
                .unwrap_or(0)
        };
        hits += usize::from(best(&|i| scores[i]) == q.label);
        hits_norm += usize::from(best(&|i| scores[i] / q.choices[i].len() as f64) == q.label);
    }
    let n = questions.len() as f64;
    Ok((hits as f64 / n, hits_norm as f64 / n))
}

struct Evaluate<'a>(&'a Args);

impl<B: LayerBackend> WithModel<B> for Evaluate<'_> {
    fn run<M: TokenMixer<B>>(
        self,
        model: ForCausalLM<B, M>,
        tokenizer: &Tokenizer,
    ) -> Result<(), Error>
    where
        ForCausalLM<B, M>: Pretrained<B>,
    {
        let args = self.0;
        let (source, owned) = match &args.text {
            Some(p) => (
                p.display().to_string(),
                data::tokens(&data::documents(Some(p))?, tokenizer)?,
            ),
            None => (
                "the bundled validation split".into(),
                Corpus::new(&data::documents(None)?, tokenizer, 1)?.valid,
            ),
        };
        let owned: Vec<usize> = owned.into_iter().map(|t| t as usize).collect();
        let text = &owned[..args.max_tokens.unwrap_or(owned.len()).min(owned.len())];
        // Bits per byte compare models across tokenisers: the loss over the bytes the tokens
        // stand for.
        let bytes_per_token = tokenizer.byte_len(text)? as f64 / text.len().max(1) as f64;
        let t0 = Instant::now();
        let (count, nll, wins) = perplexity(&model, text, args)?;
        let secs = t0.elapsed().as_secs_f64();
        let loss = nll / count as f64;
        println!(
            "perplexity on {source}: {count} tokens in {wins} windows of {} predictions: \
             loss {loss:.4}, perplexity {:.3}, {:.4} bits per byte ({secs:.1} s, {:.0} tokens/s)",
            args.seq_len,
            loss.exp(),
            loss / std::f64::consts::LN_2 / bytes_per_token,
            count as f64 / secs
        );
        if let Some(path) = &args.choices {
            let questions = read_questions(path)?;
            let (acc, acc_norm) = multiple_choice(&model, tokenizer, &questions)?;
            println!(
                "multiple choice on {}: {} questions, acc {acc:.4}, acc_norm {acc_norm:.4}",
                path.display(),
                questions.len()
            );
        }
        Ok(())
    }
}

fn run(args: Args) -> Result<(), Error> {
    fla_burn::device::configure_cubecl("minimal")?;
    saved::on_backend!(args.backend.as_str(), args.precision.as_str(), B => with_model::<B, _>(&args.model, saved::cast_for(&args.precision), Evaluate(&args)))
}

/// `fla-eval`'s entry point (the binary is this call).
pub fn main() -> std::process::ExitCode {
    match run(Args::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fla-eval: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;
    use fla_models::gla_model::GlaConfig;
    use rstest::rstest;

    /// Every target is scored once, each window predicts at most `ctx` tokens, and each scored
    /// target after the first window has at least `ctx − stride` tokens of context.
    #[rstest]
    fn windows_score_each_target_once(
        #[values(2, 3, 17, 64, 65, 100)] n: usize,
        #[values((8, 8), (8, 3), (16, 1), (1, 1))] cs: (usize, usize),
    ) {
        let (ctx, stride) = cs;
        let wins = windows(n, ctx, stride);
        let mut seen = vec![0; n];
        for (i, w) in wins.iter().enumerate() {
            assert!(w.end - w.start <= ctx + 1 && w.first > w.start && w.first <= w.end);
            seen[w.first..w.end].iter_mut().for_each(|c| *c += 1);
            // The first scored target has the least context.
            if i > 0 {
                assert!(w.first - w.start >= ctx - stride, "{w:?}");
            }
        }
        assert_eq!(seen[0], 0);
        assert!(seen[1..].iter().all(|&c| c == 1), "{seen:?}");
    }

    fn tiny_model() -> ForCausalLM<NdArray, fla_models::gla::GatedLinearAttention<NdArray>> {
        let config = GlaConfig {
            hidden_size: 32,
            num_heads: 2,
            num_hidden_layers: 1,
            vocab_size: 256,
            ..Default::default()
        };
        config.init(&Default::default()).expect("tiny GLA")
    }

    fn args(seq_len: usize, stride: usize, batch: usize) -> Args {
        Args::parse_from([
            "fla-eval",
            "--model",
            "unused",
            "--seq-len",
            &seq_len.to_string(),
            "--stride",
            &stride.to_string(),
            "--batch",
            &batch.to_string(),
        ])
    }

    /// Non-overlapping windows of one batch give the model's own mean cross-entropy; batching
    /// and a shorter last window change nothing.
    #[test]
    fn perplexity_equals_the_training_loss() {
        let model = tiny_model();
        let text: Vec<usize> = data::CORPUS.bytes().take(97).map(usize::from).collect();
        let ids: Vec<i64> = text[..33].iter().map(|&b| b as i64).collect();
        let ids = Tensor::<NdArray, 2, Int>::from_data(
            TensorData::new(ids, [1, 33]),
            &Default::default(),
        );
        let loss: f64 = model.loss(ids).expect("loss").into_scalar().into();
        let (count, nll, wins) = perplexity(&model, &text[..33], &args(32, 32, 1)).expect("ppl");
        assert_eq!((count, wins), (32, 1));
        assert!(
            (nll / 32.0 - loss).abs() < 1e-5 * loss,
            "{} vs {loss}",
            nll / 32.0
        );

        // 96 targets in windows of 20 predictions (the last one 16): batch 1 and 3 agree.
        let one = perplexity(&model, &text, &args(20, 20, 1)).expect("ppl");
        let three = perplexity(&model, &text, &args(20, 20, 3)).expect("ppl");
        assert_eq!(one.0, 96);
        assert_eq!((one.0, one.2), (three.0, three.2));
        assert!((one.1 - three.1).abs() < 1e-4 * one.1);
    }

    #[test]
    fn bad_input_is_refused() {
        let model = tiny_model();
        let err = perplexity(&model, &[97, 98, 99], &args(4, 5, 1)).unwrap_err();
        assert!(err.to_string().contains("--stride"), "{err}");
        let err = perplexity(&model, &[97], &args(4, 4, 1)).unwrap_err();
        assert!(err.to_string().contains("at least 2 tokens"), "{err}");
        let dir = std::env::temp_dir().join(format!("fla-eval-q-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (body, needle) in [
            (
                "{\"context\": \"a\", \"choices\": [\"b\"], \"label\": 1}",
                "label 1 of 1",
            ),
            (
                "{\"context\": \"\", \"choices\": [\"b\"], \"label\": 0}",
                "empty",
            ),
            ("not json", "line 1"),
            ("", "no questions"),
        ] {
            let path = dir.join("q.jsonl");
            std::fs::write(&path, body).unwrap();
            let err = read_questions(&path).err().expect("refused");
            assert!(err.to_string().contains(needle), "{body}: {err}");
        }
    }

    /// A choice's score is what the context adds up to with the choice minus what it adds up to
    /// alone (a causal model's predictions of the context do not see the choice), and the
    /// answers follow the scores.
    #[test]
    fn multiple_choice_scores_the_choice_tokens() {
        let model = tiny_model();
        let device = Default::default();
        let (ctx, choices) = ("Of Man's first", [" disobedience", " fruit", "!"]);
        let bytes = |s: &str| s.bytes().map(usize::from).collect::<Vec<_>>();
        let ll = |seq: &[usize], first: usize| {
            scored_log_likelihood(&model, &[(seq, first)], &device).expect("ll")[0]
        };
        let scores: Vec<f64> = choices
            .iter()
            .map(|c| {
                let seq = [bytes(ctx), bytes(c)].concat();
                let whole = ll(&seq, 1) - ll(&bytes(ctx), 1);
                let direct = ll(&seq, ctx.len());
                assert!(
                    (whole - direct).abs() < 1e-4 * direct.abs(),
                    "{whole} vs {direct}"
                );
                direct
            })
            .collect();
        let best = (0..3)
            .max_by(|&a, &b| scores[a].total_cmp(&scores[b]))
            .unwrap();
        let questions: Vec<Question> = (0..3)
            .map(|label| Question {
                context: ctx.into(),
                choices: choices.iter().map(|c| c.to_string()).collect(),
                label,
            })
            .collect();
        let t = Tokenizer::Bytes;
        let (acc, _) = multiple_choice(&model, &t, &questions).expect("mc");
        assert_eq!(acc, 1.0 / 3.0);
        let (acc, _) = multiple_choice(&model, &t, &questions[best..best + 1]).expect("mc");
        assert_eq!(acc, 1.0);
    }
}
