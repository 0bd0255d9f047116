//! What burn-train's learner needs of a language model: batches from a data loader, a train and
//! an inference step, an output its metrics read, the metrics themselves and the learning-rate
//! schedule. The training loop itself (when to evaluate and checkpoint, resuming) is
//! [`crate::strategy`].

use fla_burn::{AdamWBackend, LayerBackend};
use std::ops::Range;
use std::sync::{Arc, Mutex};

use burn::data::dataloader::{DataLoader, DataLoaderIterator, Progress};
use burn::lr_scheduler::LrScheduler;
use burn::module::{AutodiffModule, Module, ModuleDisplay};
use burn::optim::GradientsParams;
use burn::prelude::Backend;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{FloatDType, Int, Tensor, TensorData};
use burn::train::metric::state::{FormatOptions, NumericMetricState};
use burn::train::metric::{
    Adaptor, Metric, MetricAttributes, MetricDefinition, MetricMetadata, MetricName, Numeric,
    NumericAttributes, NumericEntry, SerializedEntry,
};
use burn::train::renderer::{
    EvaluationName, EvaluationProgress, MetricState, MetricsRenderer, MetricsRendererEvaluation,
    MetricsRendererTraining, ProgressType, TrainingProgress,
};
use burn::train::{InferenceStep, ItemLazy, TrainOutput, TrainStep};
use fla_models::lm::{ForCausalLM, TokenMixer};

use crate::precision::{initialized, CastParams, LossScale};

/// `[rows, len + 1]` token ids: inputs and, shifted by one, their targets.
#[derive(Clone, Debug)]
pub struct LmBatch<B: Backend> {
    pub ids: Tensor<B, 2, Int>,
}

/// Random windows of a token stream, as burn's data loader: batch `i` holds windows
/// `i·rows .. (i+1)·rows`, and window `j` starts where a generator seeded with (`seed`, `j`)
/// says. A batch is thus a function of its index alone: a run resumed at step `s` draws exactly
/// the batches an uninterrupted one draws from step `s`, and `rows` sequences in `k` micro-batches
/// of `rows / k` are the same windows in the same order as one batch of `rows`.
#[derive(Clone)]
pub struct Windows<B: Backend> {
    data: Arc<[u32]>,
    rows: usize,
    len: usize,
    seed: u64,
    batches: Range<usize>,
    device: B::Device,
}

/// The start of window `j` among `n` possible starts (SplitMix64 of `seed` and `j`).
fn window_start(seed: u64, j: usize, n: usize) -> usize {
    let mut z = seed.wrapping_add((j as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    ((z ^ (z >> 31)) % n as u64) as usize
}

impl<B: Backend> Windows<B> {
    /// Batches `batches` of `rows` windows of `len + 1` tokens; `data` must hold more than
    /// `len + 1` tokens (the corpus split checks it).
    pub fn new(
        data: Arc<[u32]>,
        rows: usize,
        len: usize,
        seed: u64,
        batches: Range<usize>,
        device: B::Device,
    ) -> Self {
        Self {
            data,
            rows,
            len,
            seed,
            batches,
            device,
        }
    }

    fn batch(&self, i: usize) -> LmBatch<B> {
        let starts = self.data.len() - self.len - 1;
        let ids: Vec<i64> = (i * self.rows..(i + 1) * self.rows)
            .flat_map(|j| {
                let s = window_start(self.seed, j, starts);
                self.data[s..s + self.len + 1].iter().map(|&t| t as i64)
            })
            .collect();
        LmBatch {
            ids: Tensor::from_data(
                TensorData::new(ids, [self.rows, self.len + 1]),
                &self.device,
            ),
        }
    }
}

struct WindowsIter<'a, B: Backend> {
    loader: &'a Windows<B>,
    next: usize,
}

impl<B: Backend> Iterator for WindowsIter<'_, B> {
    type Item = LmBatch<B>;
    fn next(&mut self) -> Option<LmBatch<B>> {
        let i = self.next;
        (i < self.loader.batches.end).then(|| {
            self.next += 1;
            self.loader.batch(i)
        })
    }
}

impl<B: Backend> DataLoaderIterator<LmBatch<B>> for WindowsIter<'_, B> {
    fn progress(&self) -> Progress {
        let r = &self.loader.batches;
        Progress::new(self.next - r.start, r.len())
    }
}

impl<B: Backend> DataLoader<B, LmBatch<B>> for Windows<B> {
    fn iter<'a>(&'a self) -> Box<dyn DataLoaderIterator<LmBatch<B>> + 'a> {
        Box::new(WindowsIter {
            loader: self,
            next: self.batches.start,
        })
    }

    fn num_items(&self) -> usize {
        self.batches.len() * self.rows
    }

    fn to_device(&self, device: &B::Device) -> Arc<dyn DataLoader<B, LmBatch<B>>> {
        Arc::new(Self {
            device: device.clone(),
            ..self.clone()
        })
    }

    fn slice(&self, start: usize, end: usize) -> Arc<dyn DataLoader<B, LmBatch<B>>> {
        let first = self.batches.start;
        let end = (first + end).min(self.batches.end);
        Arc::new(Self {
            batches: (first + start).min(end)..end,
            ..self.clone()
        })
    }
}

/// The first error a step met. burn-train's steps cannot return one, so a failing step records
/// it here, contributes no gradient, and the loop ([`crate::strategy`]) stops and reports it.
#[derive(Clone, Debug, Default)]
pub struct Failure(Arc<Mutex<Option<String>>>);

impl Failure {
    pub fn set(&self, message: String) {
        let mut slot = self.0.lock().unwrap_or_else(|e| e.into_inner());
        slot.get_or_insert(message);
    }

    pub fn take(&self) -> Option<String> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

/// A language model as burn-train trains it: fla-models' [`ForCausalLM`] (a type of another crate,
/// hence this wrapper for burn-train's step traits), with the number of micro-batches a step's
/// gradients add up over.
#[derive(Module, Debug)]
pub struct Trainee<B: Backend, M> {
    pub lm: ForCausalLM<B, M>,
    #[module(skip)]
    grad_accum: usize,
    #[module(skip)]
    failure: Failure,
    /// Mixed precision: the dtype of the weights' per-step copy the model computes with.
    #[module(skip)]
    compute: Option<FloatDType>,
    /// Mixed precision in f16: the loss scale.
    #[module(skip)]
    loss_scale: LossScale,
}

impl<B: LayerBackend, M: TokenMixer<B> + ModuleDisplay> Trainee<B, M> {
    pub fn new(
        lm: ForCausalLM<B, M>,
        grad_accum: usize,
        failure: Failure,
        compute: Option<FloatDType>,
        loss_scale: LossScale,
    ) -> Self {
        Self {
            // The mixed-precision step clones the model: its parameters must exist first.
            lm: initialized(lm),
            grad_accum,
            failure,
            compute,
            loss_scale,
        }
    }

    /// The model as each step computes it, made once: in mixed precision its weights cast to the
    /// compute dtype (what every `loss` otherwise does per batch), so that an evaluation over many
    /// batches casts once.
    pub fn computing(self) -> Self {
        match self.compute {
            Some(dtype) => Self {
                lm: self.lm.map(&mut CastParams(dtype)),
                compute: None,
                ..self
            },
            None => self,
        }
    }

    /// The batch's mean next-token loss; a failure is recorded and read as NaN. In mixed
    /// precision the model runs on a copy of its weights cast to the compute dtype (through the
    /// graph, so the gradients reach these weights in their own dtype).
    fn loss(&self, batch: LmBatch<B>) -> Option<Tensor<B, 1>> {
        // The batches' ids are the tokeniser's, which the model's vocabulary was checked to cover
        // when the run started: no per-step readback of them.
        let loss = match self.compute {
            Some(dtype) => self
                .lm
                .clone()
                .map(&mut CastParams(dtype))
                .loss_checked_ids(batch.ids),
            None => self.lm.loss_checked_ids(batch.ids),
        };
        loss.map_err(|e| self.failure.set(e.to_string())).ok()
    }
}

/// One step's output: its mean loss (f32 whatever the parameters' dtype), the tokens it predicted
/// and, for a training step, the seconds the step took (set by the loop once the device is done).
pub struct LmOutput<B: Backend> {
    pub loss: Tensor<B, 1>,
    pub tokens: usize,
    pub seconds: f64,
}

/// [`LmOutput`] read back to the host, as the metrics see it.
#[derive(Clone, Debug)]
pub struct LmStats {
    pub loss: f64,
    pub tokens: usize,
    pub seconds: f64,
}

/// A one-element tensor's value in the tensor's own dtype: the loss is f32 even where the
/// backend's float type is bf16, and `into_scalar` would round it to bf16.
pub fn scalar<B: Backend>(t: Tensor<B, 1>) -> f64 {
    t.into_data().iter::<f64>().next().unwrap_or(f64::NAN)
}

impl<B: Backend> ItemLazy for LmOutput<B> {
    type ItemSync = LmStats;
    fn sync(self) -> LmStats {
        LmStats {
            loss: scalar(self.loss),
            tokens: self.tokens,
            seconds: self.seconds,
        }
    }
}

impl Adaptor<LmStats> for LmStats {
    fn adapt(&self) -> LmStats {
        self.clone()
    }
}

fn nan_output<B: Backend>(device: &B::Device) -> LmOutput<B> {
    LmOutput {
        loss: Tensor::from_data(TensorData::new(vec![f32::NAN], [1]), device),
        tokens: 0,
        seconds: 0.0,
    }
}

impl<B, M> TrainStep for Trainee<B, M>
where
    B: AutodiffBackend + LayerBackend,
    B::InnerBackend: LayerBackend + AdamWBackend,
    M: TokenMixer<B> + AutodiffModule<B> + ModuleDisplay,
    M::InnerModule: TokenMixer<B::InnerBackend> + ModuleDisplay,
{
    type Input = LmBatch<B>;
    type Output = LmOutput<B>;

    fn step(&self, batch: LmBatch<B>) -> TrainOutput<LmOutput<B>> {
        let [rows, t] = batch.ids.dims();
        let device = batch.ids.device();
        let Some(loss) = self.loss(batch) else {
            return TrainOutput {
                grads: GradientsParams::new(),
                item: nan_output(&device),
            };
        };
        // Micro-batches' gradients add up (burn's accumulator sums): each counts 1/k, so k
        // micro-batches of n rows step as one batch of k·n.
        // In f16 the loss is scaled so that small gradients stay above f16's underflow; the
        // loop divides the scale out before the optimizer step.
        let factor = self.loss_scale.get().map_or(1.0, |s| s.scale) / self.grad_accum as f64;
        let scaled = if factor != 1.0 {
            loss.clone().mul_scalar(factor)
        } else {
            loss.clone()
        };
        let grads = scaled.backward();
        let item = LmOutput {
            loss: loss.detach(),
            tokens: rows * (t - 1),
            seconds: 0.0,
        };
        TrainOutput::new(self, grads, item)
    }
}

impl<B: LayerBackend, M: TokenMixer<B> + ModuleDisplay> InferenceStep for Trainee<B, M> {
    type Input = LmBatch<B>;
    type Output = LmOutput<B>;

    fn step(&self, batch: LmBatch<B>) -> LmOutput<B> {
        let [rows, t] = batch.ids.dims();
        let device = batch.ids.device();
        match self.loss(batch) {
            Some(loss) => LmOutput {
                loss,
                tokens: rows * (t - 1),
                seconds: 0.0,
            },
            None => nan_output(&device),
        }
    }
}

/// Linear warmup to `peak`, then a cosine to `min_ratio · peak` at step `steps` (FLA's recipes).
/// burn-train steps the schedule once per micro-batch; the optimiser step a micro-batch belongs
/// to sets its rate, so accumulation does not stretch the schedule. Its record is the micro-batch
/// count, so a resumed run takes the same rates as an uninterrupted one.
#[derive(Clone, Debug)]
pub struct WarmupCosine {
    pub peak: f64,
    pub warmup: usize,
    pub steps: usize,
    pub min_ratio: f64,
    pub grad_accum: usize,
    pub micro: usize,
}

impl WarmupCosine {
    /// The rate of optimiser step `step` (counted from 1).
    pub fn at(&self, step: usize) -> f64 {
        let warmup = self.warmup.max(1);
        if step <= warmup {
            return self.peak * step as f64 / warmup as f64;
        }
        let span = self.steps.saturating_sub(warmup).max(1) as f64;
        let progress = ((step - warmup) as f64 / span).min(1.0);
        let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
        self.peak * (self.min_ratio + (1.0 - self.min_ratio) * cosine)
    }
}

impl LrScheduler for WarmupCosine {
    type Record<B: Backend> = usize;

    fn step(&mut self) -> f64 {
        self.micro += 1;
        self.at(self.micro.div_ceil(self.grad_accum.max(1)))
    }

    fn to_record<B: Backend>(&self) -> usize {
        self.micro
    }

    fn load_record<B: Backend>(mut self, micro: usize) -> Self {
        self.micro = micro;
        self
    }
}

/// A numeric metric of [`LmStats`]: its name, how it reads a batch (None: no value, e.g. a
/// training-only figure on a validation batch) and whether higher is better.
#[derive(Clone)]
pub struct StatMetric {
    name: MetricName,
    read: fn(&LmStats) -> Option<f64>,
    unit: Option<&'static str>,
    higher_is_better: bool,
    precision: usize,
    state: NumericMetricState,
}

impl StatMetric {
    fn new(
        name: &str,
        read: fn(&LmStats) -> Option<f64>,
        unit: Option<&'static str>,
        higher_is_better: bool,
        precision: usize,
    ) -> Self {
        Self {
            name: Arc::new(name.to_string()),
            read,
            unit,
            higher_is_better,
            precision,
            state: NumericMetricState::default(),
        }
    }

    /// Mean next-token cross-entropy ("Loss", as burn-train's own loss metric is named, so its
    /// checkpoint and early-stop strategies find it).
    pub fn loss() -> Self {
        Self::new("Loss", |s| Some(s.loss), None, false, 4)
    }

    /// exp(loss) of each batch (burn-train's epoch figure averages these; the metrics CSV holds
    /// exp of the mean loss).
    pub fn perplexity() -> Self {
        Self::new("Perplexity", |s| Some(s.loss.exp()), None, false, 2)
    }

    /// Tokens predicted per second of the training step (device work included).
    pub fn tokens_per_second() -> Self {
        Self::new(
            // A file name in burn-train's logs: no slash.
            "Tokens per second",
            |s| (s.seconds > 0.0).then(|| s.tokens as f64 / s.seconds),
            Some("tok/s"),
            true,
            0,
        )
    }
}

impl Metric for StatMetric {
    type Input = LmStats;

    fn name(&self) -> MetricName {
        self.name.clone()
    }

    fn attributes(&self) -> MetricAttributes {
        NumericAttributes {
            unit: self.unit.map(str::to_string),
            higher_is_better: self.higher_is_better,
        }
        .into()
    }

    fn update(&mut self, item: &LmStats, _metadata: &MetricMetadata) -> SerializedEntry {
        let mut format = FormatOptions::new(self.name.clone()).precision(self.precision);
        if let Some(unit) = self.unit {
            format = format.unit(unit);
        }
        match (self.read)(item) {
            Some(value) => self.state.update(value, item.tokens.max(1), format),
            None => SerializedEntry::new(String::new(), String::new()),
        }
    }

    fn clear(&mut self) {
        self.state.reset()
    }
}

impl Numeric for StatMetric {
    fn value(&self) -> NumericEntry {
        self.state.current_value()
    }

    fn running_value(&self) -> NumericEntry {
        self.state.running_value()
    }
}

/// burn-train's renderer when stdout is not a terminal: silent, as the loop prints a line per
/// evaluation (burn-train's own text renderer prints every batch's progress). On a terminal
/// burn-train's interactive UI renders instead.
pub struct PlainRenderer;

impl MetricsRendererTraining for PlainRenderer {
    fn update_train(&mut self, _: MetricState) {}
    fn update_valid(&mut self, _: MetricState) {}
    fn render_train(&mut self, _: TrainingProgress, _: Vec<ProgressType>) {}
    fn render_valid(&mut self, _: TrainingProgress, _: Vec<ProgressType>) {}
}

impl MetricsRendererEvaluation for PlainRenderer {
    fn update_test(&mut self, _: EvaluationName, _: MetricState) {}
    fn render_test(&mut self, _: EvaluationProgress, _: Vec<ProgressType>) {}
}

impl MetricsRenderer for PlainRenderer {
    fn manual_close(&mut self) {}
    fn register_metric(&mut self, _: MetricDefinition) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;

    fn windows(rows: usize, batches: Range<usize>) -> Windows<NdArray> {
        let data: Arc<[u32]> = (0..1000).collect::<Vec<u32>>().into();
        Windows::new(data, rows, 7, 3, batches, Default::default())
    }

    fn ids(batch: LmBatch<NdArray>) -> Vec<i64> {
        batch.ids.into_data().iter::<i64>().collect()
    }

    /// Two micro-batches of 2 rows are one batch of 4, and a loader started at batch `i` (a
    /// resumed run) yields what a loader from 0 yields from `i` on.
    #[test]
    fn batches_are_a_function_of_their_index() {
        let four: Vec<Vec<i64>> = windows(4, 0..3).iter().map(ids).collect();
        let two: Vec<Vec<i64>> = windows(2, 0..6).iter().map(ids).collect();
        for (i, whole) in four.iter().enumerate() {
            assert_eq!(
                *whole,
                [two[2 * i].clone(), two[2 * i + 1].clone()].concat()
            );
        }
        let resumed: Vec<Vec<i64>> = windows(2, 3..6).iter().map(ids).collect();
        assert_eq!(resumed, two[3..]);
        // Windows of consecutive tokens, not all the same.
        assert!(four[0].windows(2).take(7).all(|w| w[1] == w[0] + 1));
        assert_ne!(four[0], four[1]);
        let loader = windows(2, 3..6);
        let mut iter = loader.iter();
        iter.next();
        assert_eq!(iter.progress().items_processed, 1);
        assert_eq!(iter.progress().items_total, 3);
        let sliced: Vec<Vec<i64>> = loader.slice(1, 2).iter().map(ids).collect();
        assert_eq!(sliced, two[4..5]);
    }

    /// burn-train steps the schedule per micro-batch: with 2 micro-batches a step, micro-batches
    /// 2s-1 and 2s both take step s's rate; the record restores the position.
    #[test]
    fn schedule_follows_optimiser_steps() {
        let mut s = WarmupCosine {
            peak: 1e-3,
            warmup: 4,
            steps: 20,
            min_ratio: 0.1,
            grad_accum: 2,
            micro: 0,
        };
        let rates: Vec<f64> = (0..6).map(|_| s.step()).collect();
        for (i, r) in rates.iter().enumerate() {
            assert_eq!(*r, s.at(i / 2 + 1));
        }
        let record = LrScheduler::to_record::<NdArray>(&s);
        let mut resumed = WarmupCosine {
            micro: 0,
            ..s.clone()
        }
        .load_record::<NdArray>(record);
        assert_eq!(resumed.step(), s.step());
    }
}
