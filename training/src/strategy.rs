//! fla-train's loop as a burn-train learning strategy. burn-train's own single-device strategy
//! evaluates and checkpoints once per epoch and drops a partial epoch on interruption; a language
//! model is trained for a number of optimiser steps, evaluated every `--eval-every` steps,
//! checkpointed every `--checkpoint-every` and on Ctrl-C after the step in flight. So this
//! strategy keeps burn-train's learner (model, AdamW, schedule, `train_step`/`optimizer_step`),
//! its event processor (metrics, their logs under the run folder, the terminal UI), its
//! checkpointer and its interrupter, and decides itself when each happens: an "epoch" of the
//! metrics is one evaluation window.

use fla_burn::{AdamWBackend, FusedAdamWOptimizer, LayerBackend};
use std::io::Write;
use std::sync::Mutex;
use std::time::Instant;

use burn::data::dataloader::Progress;
use burn::module::{AutodiffModule, ModuleDisplay};
use burn::optim::GradientsAccumulator;
use burn::tensor::backend::AutodiffBackend;
use burn::train::metric::store::EventStoreClient;
use burn::train::{
    EventProcessorTraining, InferenceStep, Interrupter, Learner, LearnerEvent,
    LearningCheckpointer, LearningComponentsMarker, SupervisedLearningStrategy,
    SupervisedTrainingEventProcessor, TrainLoader, TrainingComponents, TrainingItem, ValidLoader,
};
use fla_models::lm::TokenMixer;

use crate::checkpoint::{Checkpoints, LoopState};
use crate::learner::{scalar, Failure, LmOutput, Trainee, WarmupCosine};
use crate::precision::{unscale, LossScale};

pub type Optim<B, M> = FusedAdamWOptimizer<Trainee<B, M>, B>;
/// The learner's types: backend, schedule, model, optimiser.
pub type Components<B, M> = LearningComponentsMarker<B, WarmupCosine, Trainee<B, M>, Optim<B, M>>;

/// What burn-train's terminal UI says when its user stops the run (any other message on the
/// interrupter comes from a failed checkpoint save).
const TUI_STOP: &str = "Stopping training from user input.";

/// When the loop evaluates, checkpoints and stops.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The first step to run: 1, or one past the resumed checkpoint's.
    pub first_step: usize,
    /// The last step to run (`--stop-at`, else `--steps`).
    pub last: usize,
    /// The steps the schedule spans.
    pub steps: usize,
    pub grad_accum: usize,
    pub eval_every: usize,
    pub checkpoint_every: usize,
    /// Tokens predicted per micro-batch.
    pub micro_tokens: usize,
    /// Print a line per evaluation (off under the terminal UI, which owns the screen).
    pub print: bool,
    /// The resumed checkpoint's loop state.
    pub resumed: Option<LoopState>,
}

/// How a run ended.
#[derive(Debug, Clone)]
pub struct Report {
    pub start_valid: f64,
    pub last_valid: f64,
    /// The step after which Ctrl-C (or the terminal UI) stopped the run.
    pub stopped_at: Option<usize>,
}

/// The strategy: the plan, where checkpoints and metrics go, and, once `fit` returns, the
/// outcome (the trained model with autodiff, for FLA's export, or the error that stopped it).
pub struct StepLoop<B: AutodiffBackend, M> {
    pub plan: Plan,
    pub files: Checkpoints,
    pub csv: Mutex<std::fs::File>,
    pub failure: Failure,
    /// f16 mixed precision's loss scale (shared with the training step), else `None` inside.
    pub loss_scale: LossScale,
    pub device: B::Device,
    pub outcome: Mutex<Option<Outcome<B, M>>>,
}

/// The report and the trained model, or why the loop stopped.
pub type Outcome<B, M> = Result<(Report, Trainee<B, M>), String>;

type Events<B, M> = SupervisedTrainingEventProcessor<Components<B, M>>;

impl<B, M> StepLoop<B, M>
where
    B: AutodiffBackend + LayerBackend,
    B::InnerBackend: LayerBackend + AdamWBackend,
    M: TokenMixer<B> + AutodiffModule<B> + ModuleDisplay + 'static,
    M::InnerModule: TokenMixer<B::InnerBackend> + ModuleDisplay,
{
    fn row(&self, line: String) -> Result<(), String> {
        let mut csv = self.csv.lock().unwrap_or_else(|e| e.into_inner());
        writeln!(csv, "{line}").map_err(|e| format!("metrics CSV: {e}"))
    }

    /// The mean validation loss of the current model; with `events`, each batch also goes to
    /// burn-train's validation metrics.
    fn validate(
        &self,
        learner: &Learner<Components<B, M>>,
        valid: &ValidLoader<Components<B, M>>,
        mut events: Option<(&mut Events<B, M>, Progress)>,
    ) -> Result<f64, String> {
        // Cast once for the whole evaluation in mixed precision, not once per batch.
        let model = learner.model().valid().computing();
        let mut batches = valid.iter();
        let (mut total, mut n) = (0.0, 0);
        while let Some(batch) = batches.next() {
            let out: LmOutput<_> = InferenceStep::step(&model, batch);
            if let Some(e) = self.failure.take() {
                return Err(e);
            }
            total += scalar(out.loss.clone());
            n += 1;
            if let Some((events, global)) = events.as_mut() {
                let item =
                    TrainingItem::new(out, batches.progress(), global.clone(), Some(n), None);
                events.process_valid(LearnerEvent::ProcessedItem(item));
            }
        }
        if n == 0 {
            return Err("the validation set is empty".into());
        }
        Ok(total / n as f64)
    }

    /// With a loss scale: divides it out of `grads` and updates it; false when the gradients
    /// overflowed and the step is to be skipped (GradScaler's rule), an error when they overflow
    /// at the smallest scale ([`crate::precision::ScaleState::MIN`]). Without one: true.
    fn unscaled(
        &self,
        model: &Trainee<B, M>,
        grads: &mut burn::optim::GradientsParams,
        step: usize,
        train_loss: f64,
    ) -> Result<bool, String> {
        let Some(mut state) = self.loss_scale.get() else {
            return Ok(true);
        };
        let finite = unscale::<B, _>(model, grads, state.scale).is_finite();
        let take = state
            .update(finite)
            .map_err(|e| format!("step {step} (training loss {train_loss}): {e}"))?;
        if !take && self.plan.print {
            println!(
                "step {step:>5}  gradients overflowed in f16: step skipped, loss scale now {}",
                state.scale
            );
        }
        self.loss_scale.set(state);
        Ok(take)
    }

    #[allow(clippy::too_many_arguments)]
    fn run(
        &self,
        learner: &mut Learner<Components<B, M>>,
        events: &mut Events<B, M>,
        mut checkpointer: Option<&mut LearningCheckpointer<Components<B, M>>>,
        interrupter: &Interrupter,
        store: &EventStoreClient,
        train: &TrainLoader<Components<B, M>>,
        valid: &ValidLoader<Components<B, M>>,
    ) -> Result<Report, String> {
        let p = &self.plan;
        let windows = p.steps.div_ceil(p.eval_every).max(1);
        let (start_valid, mut last_valid) = match &p.resumed {
            Some(state) => (state.start_valid, state.last_valid),
            None => {
                let v = self.validate(learner, valid, None)?;
                if p.print {
                    println!("step {:>5}  valid loss {v:.4}", 0);
                }
                self.row(format!("0,,{v},0,{},,,", v.exp()))?;
                (v, v)
            }
        };
        let mut batches = train.iter();
        let (mut t0, mut window_start) = (Instant::now(), p.first_step - 1);
        let mut stopped_at = None;
        for step in p.first_step..=p.last {
            let window = (step - 1) / p.eval_every + 1;
            let global = Progress::new(window, windows);
            let in_window = (p.steps - (window - 1) * p.eval_every).min(p.eval_every);
            let step_start = Instant::now();
            let mut accumulated = GradientsAccumulator::new();
            let mut items = Vec::with_capacity(p.grad_accum);
            let mut train_loss = 0.0;
            for _ in 0..p.grad_accum {
                learner.lr_step();
                let batch = batches
                    .next()
                    .ok_or("the training data loader ran out of batches")?;
                let out = learner.train_step(batch);
                if let Some(e) = self.failure.take() {
                    return Err(e);
                }
                train_loss += scalar(out.item.loss.clone());
                accumulated.accumulate(&learner.model(), out.grads);
                items.push(out.item);
            }
            train_loss /= p.grad_accum as f64;
            let mut grads = accumulated.grads();
            // The scale this step's loss was multiplied by (none without f16-mixed).
            let scale_cell = self
                .loss_scale
                .get()
                .map_or(String::new(), |s| s.scale.to_string());
            let taken = self.unscaled(&learner.model(), &mut grads, step, train_loss)?;
            if taken {
                learner.optimizer_step(grads);
            }
            // The step's own rate, evaluation aside: wait for its backward and update (queued,
            // not yet run, on a GPU).
            B::sync(&self.device).map_err(|e| format!("device: {e:?}"))?;
            let seconds = step_start.elapsed().as_secs_f64();
            let lr = learner.lr_current();
            let before = ((step - 1) % p.eval_every) * p.grad_accum;
            for (i, mut item) in items.into_iter().enumerate() {
                item.seconds = seconds / p.grad_accum as f64;
                let progress = Progress::new(before + i + 1, in_window * p.grad_accum);
                let iteration = (step - 1) * p.grad_accum + i + 1;
                let item =
                    TrainingItem::new(item, progress, global.clone(), Some(iteration), Some(lr));
                events.process_train(LearnerEvent::ProcessedItem(item));
            }
            let step_rate = (p.grad_accum * p.micro_tokens) as f64 / seconds;
            let interrupted = interrupter.should_stop();
            let (mut valid_cell, mut ppl_cell, mut report) = (String::new(), String::new(), None);
            if step % p.eval_every == 0 || step == p.last || interrupted {
                events.process_train(LearnerEvent::EndEpoch(window));
                last_valid = self.validate(learner, valid, Some((&mut *events, global)))?;
                events.process_valid(LearnerEvent::EndEpoch(window));
                let ppl = last_valid.exp();
                (valid_cell, ppl_cell) = (format!("{last_valid}"), format!("{ppl}"));
                // Over the steps since the last report: the first window includes kernel
                // compilation.
                let tokens = (step - window_start) * p.grad_accum * p.micro_tokens;
                let tok_s = tokens as f64 / t0.elapsed().as_secs_f64();
                (t0, window_start) = (Instant::now(), step);
                report = Some(format!("step {step:>5}  train loss {train_loss:.4}  valid loss {last_valid:.4} (ppl {ppl:.2})  lr {lr:.2e}  {tok_s:.0} tokens/s"));
            }
            let skipped = u8::from(!taken);
            self.row(format!(
                "{step},{train_loss},{valid_cell},{lr},{ppl_cell},{step_rate:.1},{scale_cell},{skipped}"
            ))?;
            let every = p.checkpoint_every;
            if (every > 0 && step % every == 0) || step == p.last || interrupted {
                let checkpointer = checkpointer
                    .as_deref_mut()
                    .ok_or("no checkpointer configured")?;
                self.files.clear(step);
                checkpointer.checkpoint(learner, step, store);
                // burn-train saves on its own threads; a failed save stops the interrupter with
                // its error, which ends the wait.
                self.files
                    .wait_for_records(step, || interrupter.get_message().filter(|m| m != TUI_STOP))
                    .map_err(|e| e.to_string())?;
                let state = LoopState {
                    step,
                    start_valid,
                    last_valid,
                    loss_scale: self.loss_scale.get(),
                };
                self.files.write_state(&state).map_err(|e| e.to_string())?;
            }
            // Printed after the checkpoint: with Ctrl-C in a pipeline (`| tee`), stdout may be
            // gone and printing fail, which must not cost the step's checkpoint.
            if let (Some(report), true) = (report, p.print) {
                println!("{report}");
            }
            if interrupted {
                stopped_at = Some(step);
                break;
            }
        }
        Ok(Report {
            start_valid,
            last_valid,
            stopped_at,
        })
    }
}

impl<B, M> SupervisedLearningStrategy<Components<B, M>> for StepLoop<B, M>
where
    B: AutodiffBackend + LayerBackend,
    B::InnerBackend: LayerBackend + AdamWBackend,
    M: TokenMixer<B> + AutodiffModule<B> + ModuleDisplay + 'static,
    M::InnerModule: TokenMixer<B::InnerBackend> + ModuleDisplay,
{
    fn fit(
        &self,
        components: TrainingComponents<Components<B, M>>,
        mut learner: Learner<Components<B, M>>,
        train: TrainLoader<Components<B, M>>,
        valid: ValidLoader<Components<B, M>>,
        _starting_epoch: usize,
    ) -> (Trainee<B, M>, Events<B, M>) {
        let mut events = components.event_processor;
        let mut checkpointer = components.checkpointer;
        let result = self.run(
            &mut learner,
            &mut events,
            checkpointer.as_mut(),
            &components.interrupter,
            &components.event_store,
            &train,
            &valid,
        );
        // Joins the checkpointer's threads: every save asked for is on disk when `launch` returns.
        drop(checkpointer);
        let model = learner.model();
        let outcome = result.map(|report| (report, model.clone()));
        *self.outcome.lock().unwrap_or_else(|e| e.into_inner()) = Some(outcome);
        (model, events)
    }
}
