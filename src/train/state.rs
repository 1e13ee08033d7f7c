//! The resumable state of a training run, shared by `lfm train` and `lfm train-autoencoder`: a `train-state/`
//! folder inside the output folder holding the step's state files (Burn records) and `state.json`, which names them
//! and is written last (temp file + rename), so a crash at any point leaves the previous checkpoint whole; the
//! previous step's files are removed only after the new `state.json` is in place.

use std::path::{Path, PathBuf};

use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::mixed::LossScaler;
use super::settings::RunSettings;
use super::{SavedState, TrainError, Trainer};
use crate::checkpoint::{write_safetensors, CONFIG_METADATA_KEY};
use crate::io::write_atomic;
use crate::models::ModelConfig;

/// The state folder of an output folder.
#[derive(Debug, Clone)]
pub struct StateFolder {
    dir: PathBuf,
}

/// `path: error` as a [`TrainError::Io`].
pub(crate) fn io_error(path: &Path, e: impl std::fmt::Display) -> TrainError {
    TrainError::Io(format!("{}: {e}", path.display()))
}

impl StateFolder {
    /// The folder holding the training state inside `out_dir` (`train-state/`).
    pub fn of(out_dir: &Path) -> Self {
        Self { dir: out_dir.join("train-state") }
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Creates the folder.
    pub fn create(&self) -> Result<(), TrainError> {
        std::fs::create_dir_all(&self.dir).map_err(|e| io_error(&self.dir, e))
    }

    /// `state.json`, if there is one.
    pub fn read<S: DeserializeOwned>(&self) -> Result<Option<S>, TrainError> {
        let path = self.dir.join("state.json");
        if !path.exists() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&path).map_err(|e| io_error(&path, e))?;
        serde_json::from_str(&text).map(Some).map_err(|e| {
            TrainError::Invalid(format!(
                "{}: damaged training state ({e}); delete the folder to restart",
                path.display()
            ))
        })
    }

    /// What to start from: the previous state when `resume` (there must be one), nothing for a new run (there must
    /// be none: a finished or interrupted run is never overwritten).
    pub fn start<S: DeserializeOwned>(&self, out_dir: &Path, resume: bool) -> Result<Option<S>, TrainError> {
        match (resume, self.read::<S>()?) {
            (true, Some(state)) => Ok(Some(state)),
            (true, None) => {
                Err(TrainError::Invalid(format!("--resume: {} holds no training state", out_dir.display())))
            }
            (false, Some(_)) => Err(TrainError::Invalid(format!(
                "{} already holds a training run: pass --resume to continue it, or choose another --out",
                out_dir.display()
            ))),
            (false, None) => Ok(None),
        }
    }

    /// The bytes of a state file `state.json` names.
    pub fn read_file(&self, name: &str) -> Result<Vec<u8>, TrainError> {
        let path = self.dir.join(name);
        std::fs::read(&path).map_err(|e| io_error(&path, e))
    }

    /// Writes a state file (atomically).
    pub fn write_file(&self, name: &str, bytes: &[u8]) -> Result<(), TrainError> {
        let path = self.dir.join(name);
        write_atomic(&path, bytes).map_err(|e| io_error(&path, e))
    }

    /// Writes `state.json` (atomically, after the files it names), then removes `stale`: the files of the previous
    /// state that this one no longer names.
    pub fn commit<S: Serialize>(&self, state: &S, stale: &[String]) -> Result<(), TrainError> {
        let json = serde_json::to_vec_pretty(state).expect("training states serialise");
        self.write_file("state.json", &json)?;
        for name in stale {
            let _ = std::fs::remove_file(self.dir.join(name));
        }
        Ok(())
    }

    /// The message of a state file that Burn could not read back.
    pub fn damaged(&self, e: impl std::fmt::Display) -> TrainError {
        TrainError::Invalid(format!("{}: {e}; the checkpoint is damaged (truncated?)", self.dir.display()))
    }
}

/// What `state.json` records.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct State {
    /// Steps completed.
    pub step: usize,
    /// The network.
    pub model: ModelConfig,
    /// The run.
    pub settings: RunSettings,
    /// File of the model's state (Burn record), relative to the state folder.
    pub model_file: String,
    /// File of the optimiser's state.
    pub optimizer_file: String,
    /// File of the moving average's state, when kept.
    #[serde(default)]
    pub ema_file: Option<String>,
    /// Images that could not be read so far.
    pub unreadable_images: usize,
    /// The loss scale of an f16 run.
    #[serde(default)]
    pub loss_scaler: Option<LossScaler>,
}

/// The segmentation projection a semantic run writes next to `model.safetensors`.
pub const RESCALER_FILE: &str = "rescaler.safetensors";
/// Its moving average, next to `ema.safetensors`.
pub const EMA_RESCALER_FILE: &str = "rescaler-ema.safetensors";

/// Reads `state.json` of an output folder of `lfm train`, if there is one.
pub fn read_state(out_dir: &Path) -> Result<Option<State>, TrainError> {
    StateFolder::of(out_dir).read()
}

/// Writes a checkpoint of `trainer`: the state files of this step, `model.safetensors` (and the moving average's,
/// and a semantic run's projection) for `lfm sample`, then `state.json`; then removes the previous step's state
/// files.
pub(crate) fn save<B: Backend>(
    trainer: &Trainer<Autodiff<B>>,
    config: &ModelConfig,
    settings: &RunSettings,
    out_dir: &Path,
    unreadable: usize,
) -> Result<State, TrainError> {
    let folder = StateFolder::of(out_dir);
    let previous: Option<State> = folder.read().ok().flatten();
    let saved = trainer.save_state().map_err(TrainError::Invalid)?;
    let step = trainer.step;
    let (model_file, optimizer_file) = (format!("model-{step:09}.mpk"), format!("optimizer-{step:09}.mpk"));
    folder.write_file(&model_file, &saved.model)?;
    folder.write_file(&optimizer_file, &saved.optimizer)?;
    let ema_file = match &saved.ema {
        Some(bytes) => {
            let name = format!("ema-{step:09}.mpk");
            folder.write_file(&name, bytes)?;
            Some(name)
        }
        None => None,
    };
    let metadata = std::collections::HashMap::from([
        (CONFIG_METADATA_KEY.to_string(), config.to_json()),
        ("lfm.train.step".to_string(), step.to_string()),
    ]);
    let weights_path = out_dir.join("model.safetensors");
    write_safetensors(&weights_path, &trainer.model().state_dict(), Some(metadata.clone()))
        .map_err(|e| TrainError::Io(e.to_string()))?;
    if let Some(ema) = trainer.ema() {
        write_safetensors(&out_dir.join("ema.safetensors"), &ema.state_dict(), Some(metadata.clone()))
            .map_err(|e| TrainError::Io(e.to_string()))?;
    }
    // Semantic synthesis: the projection of the maps, for `lfm sample --cond-checkpoint` (LFM's cond_stage_model).
    let rescalers = [
        (RESCALER_FILE, trainer.rescaler().map(|r| r.state_dict())),
        (EMA_RESCALER_FILE, trainer.ema_rescaler().map(|r| r.state_dict())),
    ];
    for (name, weights) in rescalers {
        if let Some(weights) = weights {
            let step_only = std::collections::HashMap::from([("lfm.train.step".to_string(), step.to_string())]);
            write_safetensors(&out_dir.join(name), &weights, Some(step_only))
                .map_err(|e| TrainError::Io(e.to_string()))?;
        }
    }
    let state = State {
        step,
        model: config.clone(),
        settings: settings.clone(),
        model_file,
        optimizer_file,
        ema_file,
        unreadable_images: unreadable,
        loss_scaler: saved.loss_scaler.clone(),
    };
    let stale: Vec<String> = previous
        .filter(|p| p.step != step)
        .map(|old| [Some(old.model_file), Some(old.optimizer_file), old.ema_file].into_iter().flatten().collect())
        .unwrap_or_default();
    folder.commit(&state, &stale)?;
    Ok(state)
}

/// Restores `trainer` from the checkpoint `state` describes, after checking that the run is the same one.
pub(crate) fn resume<B: Backend>(
    trainer: &mut Trainer<Autodiff<B>>,
    state: &State,
    config: &ModelConfig,
    settings: &RunSettings,
    out_dir: &Path,
    device: &B::Device,
) -> Result<(), TrainError> {
    if &state.model != config
        || state.settings.seed != settings.seed
        || state.settings.batch_size != settings.batch_size
        || state.settings.ema_decay != settings.ema_decay
        || state.settings.task != settings.task
        || state.settings.precision != settings.precision
    {
        return Err(TrainError::Invalid(
            "--resume: the model, seed, batch size, EMA decay, task or precision differ from the checkpoint's; \
             resume with the same ones"
                .into(),
        ));
    }
    let folder = StateFolder::of(out_dir);
    let saved = SavedState {
        model: folder.read_file(&state.model_file)?,
        optimizer: folder.read_file(&state.optimizer_file)?,
        ema: state.ema_file.as_deref().map(|name| folder.read_file(name)).transpose()?,
        loss_scaler: state.loss_scaler.clone(),
    };
    trainer.load_state(saved, state.step, device).map_err(|e| folder.damaged(e))
}
