//! Checkpoints of a training run: the model and optimizer records (full precision, so a resumed
//! run continues bit for bit on the same backend) and the loop's own state (step, sampler, losses).
//!
//! Each checkpoint is a folder `step-NNNNNNNN` under the checkpoint directory, written as
//! `step-NNNNNNNN.tmp` and renamed when complete: a run killed while saving leaves only a `.tmp`
//! folder, which resuming ignores.

use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::optim::Optimizer;
use burn::record::{FullPrecisionSettings, NamedMpkFileRecorder, Recorder};
use burn::tensor::backend::AutodiffBackend;
use serde::{Deserialize, Serialize};

/// What the training loop needs besides the records to continue exactly where it stopped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoopState {
    pub step: usize,
    /// The batch sampler's state.
    pub rng: u64,
    pub start_valid: f64,
    pub last_valid: f64,
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

fn recorder() -> NamedMpkFileRecorder<FullPrecisionSettings> {
    NamedMpkFileRecorder::new()
}

fn folder(dir: &Path, step: usize) -> PathBuf {
    dir.join(format!("step-{step:08}"))
}

/// Saves model, optimizer and loop state after `state.step` steps.
pub fn save<B, M, O>(
    dir: &Path,
    model: &M,
    optim: &O,
    state: &LoopState,
) -> Result<PathBuf, CheckpointError>
where
    B: AutodiffBackend,
    M: Module<B> + burn::module::AutodiffModule<B>,
    O: Optimizer<M, B>,
{
    let done = folder(dir, state.step);
    let tmp = done.with_extension("tmp");
    let err = |e: String| CheckpointError::Write(done.clone(), e);
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| err(e.to_string()))?;
    model
        .clone()
        .save_file(tmp.join("model"), &recorder())
        .map_err(|e| err(e.to_string()))?;
    Recorder::<B>::record(&recorder(), optim.to_record(), tmp.join("optimizer"))
        .map_err(|e| err(e.to_string()))?;
    let json = serde_json::to_string_pretty(state).map_err(|e| err(e.to_string()))?;
    std::fs::write(tmp.join("state.json"), json).map_err(|e| err(e.to_string()))?;
    let _ = std::fs::remove_dir_all(&done);
    std::fs::rename(&tmp, &done).map_err(|e| err(e.to_string()))?;
    Ok(done)
}

/// The newest complete checkpoint in `dir`, if any.
pub fn latest(dir: &Path) -> Result<Option<PathBuf>, CheckpointError> {
    if !dir.exists() {
        return Ok(None);
    }
    let entries =
        std::fs::read_dir(dir).map_err(|e| CheckpointError::Dir(dir.into(), e.to_string()))?;
    let mut best: Option<(usize, PathBuf)> = None;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(step) = name
            .strip_prefix("step-")
            .and_then(|s| s.parse::<usize>().ok())
        else {
            continue; // `.tmp` folders and anything else
        };
        if best.as_ref().is_none_or(|(s, _)| step > *s) {
            best = Some((step, entry.path()));
        }
    }
    Ok(best.map(|(_, p)| p))
}

/// Loads a checkpoint written by [`save`] into `model` and `optim`.
pub fn load<B, M, O>(
    path: &Path,
    model: M,
    optim: O,
    device: &B::Device,
) -> Result<(M, O, LoopState), CheckpointError>
where
    B: AutodiffBackend,
    M: Module<B> + burn::module::AutodiffModule<B>,
    O: Optimizer<M, B>,
{
    let err = |e: String| CheckpointError::Corrupt(path.into(), e);
    let json = std::fs::read_to_string(path.join("state.json")).map_err(|e| err(e.to_string()))?;
    let state: LoopState = serde_json::from_str(&json).map_err(|e| err(e.to_string()))?;
    let model = model
        .load_file(path.join("model"), &recorder(), device)
        .map_err(|e| err(e.to_string()))?;
    let record = Recorder::<B>::load(&recorder(), path.join("optimizer"), device)
        .map_err(|e| err(e.to_string()))?;
    Ok((model, optim.load_record(record), state))
}
