//! Flow-matching training: one optimiser step ([`trainer`]), a run's settings ([`settings`]), its batches
//! ([`batches`]) and their times ([`time_sampling`]), its resumable state ([`state`]) and the loop of `lfm train`
//! ([`run`]); the autoencoder's trainer ([`autoencoder`]) shares the state folder.

pub mod autoencoder;
pub mod batches;
pub mod ema;
pub mod grads;
pub mod group;
pub mod metrics_log;
pub mod mixed;
pub mod preview;
pub mod run;
pub mod schedule;
pub mod settings;
pub mod state;
pub mod step;
pub mod time_sampling;
pub mod trainer;

use burn::optim::AdamWConfig;

pub use settings::RunSettings;
pub use step::{DeviceShards, Step};
pub use time_sampling::TimeSampling;
pub use trainer::{flow_matching_loss, Batch, SavedState, StepReport, TrainNet, Trainer};

/// AdamW as LFM configures it: betas (0.9, 0.999), eps 1e-8, weight decay 0 (LFM's `--beta1/--beta2` are ignored).
pub fn lfm_adamw() -> AdamWConfig {
    AdamWConfig::new().with_beta_1(0.9).with_beta_2(0.999).with_epsilon(1e-8).with_weight_decay(0.0)
}

/// Why a run stopped.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// Files could not be read or written.
    #[error("{0}")]
    Io(String),
    /// The settings, data or checkpoint do not fit together.
    #[error("{0}")]
    Invalid(String),
    /// The loss stopped being finite.
    #[error("the loss became {loss} at step {step}; lower --lr or check the data")]
    NonFinite {
        /// The step.
        step: usize,
        /// The loss value.
        loss: f64,
    },
    /// A run of several processes lost or could not reach the others.
    #[error(transparent)]
    Group(#[from] group::GroupError),
}
