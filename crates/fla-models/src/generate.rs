//! Text generation: the prompt in one call (the op's whole-sequence form), then one token per
//! call on the recurrent caches, as FLA's `generate` does. Sampling follows transformers' order:
//! repetition penalty, temperature, top-k, top-p, then a draw (or the arg max when greedy).

use std::time::{Duration, Instant};

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use fla_burn::{FlaError, LayerBackend};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use crate::lm::{ForCausalLM, TokenMixer};

/// How tokens are chosen; the defaults are greedy decoding of up to 64 tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationConfig {
    pub max_new_tokens: usize,
    /// 0 is greedy (the arg max); otherwise logits are divided by it before sampling.
    pub temperature: f64,
    /// Sample among the `k` likeliest tokens only (0, as in transformers, or `None`: all).
    pub top_k: Option<usize>,
    /// Sample among the likeliest tokens whose probabilities sum to at least `p` (nucleus).
    pub top_p: Option<f64>,
    /// transformers' CTRL-style penalty on tokens already in the sequence (1.0: none).
    pub repetition_penalty: f64,
    /// Stop after generating this token (it is kept in the output).
    pub eos_token_id: Option<usize>,
    pub seed: u64,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        Self {
            max_new_tokens: 64,
            temperature: 0.0,
            top_k: None,
            top_p: None,
            repetition_penalty: 1.0,
            eos_token_id: None,
            seed: 0,
        }
    }
}

impl GenerationConfig {
    /// Refuses settings that would silently pick the wrong token: a temperature that is NaN,
    /// infinite or negative (NaN would skip the greedy branch and sample from nonsense), a
    /// top-p outside [0, 1] or NaN, a repetition penalty that is not a positive number.
    pub fn validate(&self) -> Result<(), FlaError> {
        let bad = |m: String| Err(FlaError::Unsupported(m));
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return bad(format!(
                "temperature {} (0 for greedy, or a positive number)",
                self.temperature
            ));
        }
        if let Some(p) = self.top_p {
            // As transformers: 0 keeps the likeliest token alone, 1 keeps every token.
            if !(0.0..=1.0).contains(&p) {
                return bad(format!("top_p {p} outside [0, 1]"));
            }
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return bad(format!(
                "repetition_penalty {} (a positive number; 1 is none)",
                self.repetition_penalty
            ));
        }
        Ok(())
    }
}

/// The new tokens and where the time went (the first call's kernel compilation included).
#[derive(Debug, Clone)]
pub struct Generation {
    pub tokens: Vec<usize>,
    /// The prompt's forward pass, up to the first new token.
    pub prompt_time: Duration,
    /// The decoding steps after the first token.
    pub decode_time: Duration,
}

/// Chooses the next token from one row of logits (errors on an empty row or a config that
/// [`GenerationConfig::validate`] refuses).
pub fn choose(
    logits: &mut [f32],
    seen: &[usize],
    cfg: &GenerationConfig,
    rng: &mut StdRng,
) -> Result<usize, FlaError> {
    cfg.validate()?;
    if logits.is_empty() {
        return Err(FlaError::Empty("no logits to choose a token from".into()));
    }
    if cfg.repetition_penalty != 1.0 {
        let p = cfg.repetition_penalty as f32;
        for &t in seen {
            if let Some(l) = logits.get_mut(t) {
                *l = if *l > 0.0 { *l / p } else { *l * p };
            }
        }
    }
    let argmax = |l: &[f32]| {
        l.iter()
            .enumerate()
            .fold((0, f32::NEG_INFINITY), |best, (i, &x)| {
                if x > best.1 {
                    (i, x)
                } else {
                    best
                }
            })
            .0
    };
    if cfg.temperature <= 0.0 {
        return Ok(argmax(logits));
    }
    let t = cfg.temperature as f32;
    // Candidates, likeliest first.
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    if let Some(k) = cfg.top_k.filter(|&k| k > 0) {
        order.truncate(k);
    }
    let top = logits[order[0]] / t;
    if !top.is_finite() {
        // A temperature so small that the scaled logits overflow f32: the limit is greedy.
        return Ok(order[0]);
    }
    let mut probs: Vec<f64> = order
        .iter()
        .map(|&i| ((logits[i] / t - top) as f64).exp())
        .collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if let Some(p) = cfg.top_p {
        // Keep the smallest prefix whose mass reaches p (always at least one token).
        let mut mass = 0.0;
        let keep = probs
            .iter()
            .position(|&q| {
                mass += q;
                mass >= p
            })
            .map_or(probs.len(), |i| i + 1);
        order.truncate(keep);
        probs.truncate(keep);
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|q| *q /= total);
    }
    let mut u: f64 = rng.random();
    for (i, &q) in order.iter().zip(&probs) {
        if u < q {
            return Ok(*i);
        }
        u -= q;
    }
    // Rounding left a sliver of mass past the last candidate: it is the draw.
    Ok(*order.last().expect("the row is not empty"))
}

fn last_logits<B: Backend>(logits: Tensor<B, 3>) -> Vec<f32> {
    let [_, t, v] = logits.dims();
    logits
        .narrow(1, t - 1, 1)
        .reshape([v])
        .into_data()
        .convert::<f32>()
        .to_vec()
        .expect("f32 logits")
}

fn ids<B: Backend>(tokens: &[usize], device: &B::Device) -> Tensor<B, 2, Int> {
    let data: Vec<i64> = tokens.iter().map(|&t| t as i64).collect();
    Tensor::from_data(TensorData::new(data, [1, tokens.len()]), device)
}

/// Continues `prompt` (token ids, at least one) with up to `cfg.max_new_tokens` tokens.
pub fn generate<B: LayerBackend, M: TokenMixer<B>>(
    model: &ForCausalLM<B, M>,
    prompt: &[usize],
    cfg: &GenerationConfig,
    device: &B::Device,
) -> Result<Generation, FlaError> {
    cfg.validate()?;
    if prompt.is_empty() {
        return Err(FlaError::Empty(
            "generation needs a prompt of at least one token".into(),
        ));
    }
    let vocab = model.model.embeddings.weight.dims()[0];
    if let Some(&bad) = prompt.iter().find(|&&t| t >= vocab) {
        return Err(FlaError::Shape(format!(
            "prompt token {bad} is outside the vocabulary of {vocab}"
        )));
    }
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let mut seen = prompt.to_vec();
    let mut tokens = Vec::new();
    let start = Instant::now();
    let (logits, mut cache) = model.forward_checked_ids(ids(prompt, device), None, true)?;
    let mut row = last_logits(logits);
    let mut prompt_time = None;
    while tokens.len() < cfg.max_new_tokens {
        let next = choose(&mut row, &seen, cfg, &mut rng)?;
        tokens.push(next);
        seen.push(next);
        if prompt_time.is_none() {
            prompt_time = Some(start.elapsed());
        }
        if Some(next) == cfg.eos_token_id || tokens.len() == cfg.max_new_tokens {
            break;
        }
        let (logits, c) = model.forward_checked_ids(ids(&[next], device), cache, true)?;
        cache = c;
        row = last_logits(logits);
    }
    let prompt_time = prompt_time.unwrap_or_else(|| start.elapsed());
    Ok(Generation {
        tokens,
        prompt_time,
        decode_time: start.elapsed() - prompt_time,
    })
}
