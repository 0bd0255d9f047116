//! Checkpoints of a training run, in burn-train's layout: its checkpointer writes
//! `model-N.mpk`, `optim-N.mpk` and `scheduler-N.mpk` (N: the step) under the run's
//! `checkpoint/` folder, and the loop adds `state-N.json`, its own state, once those three are on
//! disk. Each file is written under another name and renamed when complete ([`AtomicRecorder`]),
//! so a run killed while saving leaves no half-written checkpoint that looks whole: resuming takes
//! the newest step whose four files all exist, and reports a file that exists but does not load
//! as corrupt instead of panicking as burn-train's own restore does.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};

use burn::prelude::Backend;
use burn::record::{
    FileRecorder, FullPrecisionSettings, NamedMpkFileRecorder, Recorder, RecorderError,
};
use burn::train::checkpoint::{CheckpointingAction, CheckpointingStrategy};
use burn::train::metric::store::EventStoreClient;
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::precision::ScaleState;

/// What the training loop needs besides burn-train's records to continue where it stopped (the
/// batches are a function of the step, the learning rate of the scheduler's record).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoopState {
    pub step: usize,
    pub start_valid: f64,
    pub last_valid: f64,
    /// The loss scale after `step` (f16 mixed precision only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_scale: Option<ScaleState>,
}

/// Why a checkpoint could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("cannot write checkpoint {0}: {1}")]
    Write(PathBuf, String),
    #[error("checkpoint {0} is unreadable or corrupt: {1}")]
    Corrupt(PathBuf, String),
    #[error("cannot read the checkpoint directory {0}: {1}")]
    Dir(PathBuf, String),
}

/// Named MessagePack in full precision (a resumed run continues bit for bit on the same
/// backend), each file written as `NAME-partial.mpk` and renamed to `NAME.mpk` once complete.
#[derive(Debug, Clone, Default)]
pub struct AtomicRecorder(NamedMpkFileRecorder<FullPrecisionSettings>);

impl<B: Backend> Recorder<B> for AtomicRecorder {
    type Settings = FullPrecisionSettings;
    type RecordArgs = PathBuf;
    type RecordOutput = ();
    type LoadArgs = PathBuf;

    fn save_item<I: Serialize>(&self, item: I, file: PathBuf) -> Result<(), RecorderError> {
        let name = file
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        // No dot in the temporary name: the inner recorder replaces an extension with its own.
        let partial = file.with_file_name(format!("{name}-partial"));
        Recorder::<B>::save_item(&self.0, item, partial.clone())?;
        std::fs::rename(partial.with_extension("mpk"), file.with_extension("mpk"))
            .map_err(|e| RecorderError::Unknown(format!("{}: {e}", file.display())))
    }

    fn load_item<I: DeserializeOwned>(&self, file: &mut PathBuf) -> Result<I, RecorderError> {
        Recorder::<B>::load_item(&self.0, file)
    }
}

impl<B: Backend> FileRecorder<B> for AtomicRecorder {
    fn file_extension() -> &'static str {
        "mpk"
    }
}

/// The files of a run's checkpoints, in `dir` (the run's `checkpoint/` folder).
#[derive(Debug, Clone)]
pub struct Checkpoints {
    pub dir: PathBuf,
}

/// burn-train's checkpointer names its three records so.
const RECORDS: [&str; 3] = ["model", "optim", "scheduler"];

impl Checkpoints {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    fn state_path(&self, step: usize) -> PathBuf {
        self.dir.join(format!("state-{step}.json"))
    }

    /// `model-N`, `optim-N`, `scheduler-N` without their extension, as burn-train names them.
    pub fn record(&self, name: &str, step: usize) -> PathBuf {
        self.dir.join(format!("{name}-{step}"))
    }

    fn records_written(&self, step: usize) -> bool {
        RECORDS
            .iter()
            .all(|r| self.record(r, step).with_extension("mpk").is_file())
    }

    /// Removes whatever an earlier run left of `step`'s checkpoint, before this run writes it: the
    /// wait for its records must not be satisfied by old files.
    pub fn clear(&self, step: usize) {
        let _ = std::fs::remove_file(self.state_path(step));
        for r in RECORDS {
            let _ = std::fs::remove_file(self.record(r, step).with_extension("mpk"));
        }
    }

    /// Writes the loop's state for `step`, which makes the step's checkpoint complete.
    pub fn write_state(&self, state: &LoopState) -> Result<(), CheckpointError> {
        let path = self.state_path(state.step);
        let err = |e: String| CheckpointError::Write(path.clone(), e);
        let json = serde_json::to_string_pretty(state).map_err(|e| err(e.to_string()))?;
        let tmp = path.with_extension("json-partial");
        std::fs::write(&tmp, json).map_err(|e| err(e.to_string()))?;
        std::fs::rename(&tmp, &path).map_err(|e| err(e.to_string()))
    }

    /// Waits until burn-train's checkpointer (which saves on its own threads) has renamed the
    /// step's three records into place, or `failed` says it stopped.
    pub fn wait_for_records(
        &self,
        step: usize,
        failed: impl Fn() -> Option<String>,
    ) -> Result<(), CheckpointError> {
        while !self.records_written(step) {
            if let Some(why) = failed() {
                return Err(CheckpointError::Write(self.record("model", step), why));
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        Ok(())
    }

    /// Steps with a complete checkpoint (all four files), oldest first.
    pub fn complete(&self) -> Result<Vec<usize>, CheckpointError> {
        if !self.dir.exists() {
            return Ok(Vec::new());
        }
        let entries = std::fs::read_dir(&self.dir)
            .map_err(|e| CheckpointError::Dir(self.dir.clone(), e.to_string()))?;
        let mut steps: Vec<usize> = entries
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name.strip_prefix("state-")?
                    .strip_suffix(".json")?
                    .parse()
                    .ok()
            })
            .filter(|&s| self.records_written(s))
            .collect();
        steps.sort_unstable();
        Ok(steps)
    }

    /// The newest complete checkpoint's step, if any.
    pub fn latest(&self) -> Result<Option<usize>, CheckpointError> {
        Ok(self.complete()?.last().copied())
    }

    /// The loop state of `step`'s checkpoint.
    pub fn state(&self, step: usize) -> Result<LoopState, CheckpointError> {
        let path = self.state_path(step);
        let err = |e: String| CheckpointError::Corrupt(path.clone(), e);
        let json = std::fs::read_to_string(&path).map_err(|e| err(e.to_string()))?;
        let state: LoopState = serde_json::from_str(&json).map_err(|e| err(e.to_string()))?;
        if state.step != step {
            return Err(err(format!("holds step {}", state.step)));
        }
        Ok(state)
    }

    /// One of `step`'s records, read with typed errors.
    pub fn load<B: Backend, R: burn::record::Record<B>>(
        &self,
        name: &str,
        step: usize,
        device: &B::Device,
    ) -> Result<R, CheckpointError> {
        let path = self.record(name, step);
        Recorder::<B>::load(&AtomicRecorder::default(), path.clone(), device)
            .map_err(|e| CheckpointError::Corrupt(path.with_extension("mpk"), e.to_string()))
    }
}

/// burn-train's checkpointing strategy for checkpoints keyed by step: save, and delete the oldest
/// once more than `keep` are on disk (its own `KeepLastNCheckpoints` assumes consecutive keys).
/// The loop-state file goes first, so a checkpoint being deleted stops counting as complete.
pub struct KeepRecent {
    pub files: Checkpoints,
    pub keep: usize,
    pub saved: VecDeque<usize>,
}

impl CheckpointingStrategy for KeepRecent {
    fn checkpointing(&mut self, step: usize, _: &EventStoreClient) -> Vec<CheckpointingAction> {
        self.actions(step)
    }
}

impl KeepRecent {
    /// What saving `step` does (the metrics store burn-train passes is not needed).
    pub fn actions(&mut self, step: usize) -> Vec<CheckpointingAction> {
        let mut actions = vec![CheckpointingAction::Save];
        if !self.saved.contains(&step) {
            self.saved.push_back(step);
        }
        while self.saved.len() > self.keep.max(1) {
            if let Some(old) = self.saved.pop_front() {
                let _ = std::fs::remove_file(self.files.state_path(old));
                actions.push(CheckpointingAction::Delete(old));
            }
        }
        actions
    }
}

/// `path` with its parents created.
pub fn ensure_dir(path: &Path) -> Result<(), CheckpointError> {
    std::fs::create_dir_all(path).map_err(|e| CheckpointError::Dir(path.into(), e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;

    fn fresh(name: &str) -> Checkpoints {
        let dir = std::env::temp_dir().join(format!("fla-ckpt-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Checkpoints::new(dir)
    }

    fn save_step(files: &Checkpoints, step: usize) {
        for r in RECORDS {
            Recorder::<NdArray>::record(&AtomicRecorder::default(), step, files.record(r, step))
                .unwrap();
        }
        files
            .write_state(&LoopState {
                step,
                start_valid: 5.0,
                last_valid: 4.0,
                loss_scale: None,
            })
            .unwrap();
    }

    /// Only steps with all four files count; a record under its temporary name does not.
    #[test]
    fn latest_is_the_newest_complete_step() {
        let files = fresh("latest");
        assert_eq!(files.latest().unwrap(), None);
        save_step(&files, 4);
        save_step(&files, 8);
        assert_eq!(files.complete().unwrap(), vec![4, 8]);
        let optim = files.record("optim", 8).with_extension("mpk");
        std::fs::rename(&optim, files.dir.join("optim-8-partial.mpk")).unwrap();
        assert_eq!(files.latest().unwrap(), Some(4));
        let step: usize = files
            .load::<NdArray, usize>("scheduler", 4, &Default::default())
            .unwrap();
        assert_eq!(step, 4);
        // No file left under a temporary name by a complete save.
        assert!(!files.dir.join("model-4-partial.mpk").exists());
    }

    /// Keeps the newest `keep` checkpoints, dropping the oldest's state first.
    #[test]
    fn keep_recent_deletes_the_oldest() {
        let files = fresh("keep");
        let mut keep = KeepRecent {
            files: files.clone(),
            keep: 2,
            saved: VecDeque::new(),
        };
        save_step(&files, 3);
        assert_eq!(keep.actions(3), vec![CheckpointingAction::Save]);
        assert_eq!(keep.actions(6), vec![CheckpointingAction::Save]);
        assert_eq!(
            keep.actions(7),
            vec![CheckpointingAction::Save, CheckpointingAction::Delete(3)]
        );
        assert!(!files.dir.join("state-3.json").exists());
        assert_eq!(files.latest().unwrap(), None);
    }
}
