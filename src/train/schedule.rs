//! Learning-rate schedules of `lfm train` and `lfm train-autoencoder`.

use serde::{Deserialize, Serialize};

/// Half a cosine from `lr` (at `progress` 0) down to `min_lr` (at `progress` 1).
pub fn cosine_between(lr: f64, min_lr: f64, progress: f64) -> f64 {
    min_lr + (lr - min_lr) * (1.0 + (std::f64::consts::PI * progress).cos()) / 2.0
}

/// How the learning rate evolves.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Schedule {
    /// The same rate throughout (LFM's `--no_lr_decay`).
    Constant,
    /// LFM's `CosineAnnealingLR(T_max = epochs, eta_min)`, stepped once per epoch.
    Cosine {
        /// The floor (LFM: 1e-5).
        min_lr: f64,
        /// `T_max`.
        epochs: usize,
    },
    /// The same cosine stepped at every optimiser step over `steps` steps, so that runs of a few epochs anneal
    /// smoothly to the floor (the per-epoch schedule of a 2-epoch run holds `lr` for one epoch and the midpoint for
    /// the other).
    CosinePerStep {
        /// The floor.
        min_lr: f64,
        /// Steps over which the rate falls from `lr` to `min_lr` (the run's total).
        steps: usize,
    },
}

impl Schedule {
    /// The rate at `step` (0-based), which falls in `epoch`, for base rate `lr`.
    pub fn lr(&self, lr: f64, step: usize, epoch: usize) -> f64 {
        let cosine = |min_lr: f64, done: usize, total: usize| {
            cosine_between(lr, min_lr, done.min(total) as f64 / total.max(1) as f64)
        };
        match *self {
            Self::Constant => lr,
            Self::Cosine { min_lr, epochs } => cosine(min_lr, epoch, epochs),
            Self::CosinePerStep { min_lr, steps } => cosine(min_lr, step, steps),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Schedule;

    /// Both cosine schedules against values worked by hand: (1 + cos(π·k/4)) / 2 = 1, 0.853553…, 0.5, 0.146446….
    #[test]
    fn cosine_schedules_step_per_epoch_or_per_step() {
        let per_step = Schedule::CosinePerStep { min_lr: 0.0, steps: 4 };
        let expected = [1e-3, 0.853_553_390_593_273_7e-3, 0.5e-3, 0.146_446_609_406_726_24e-3, 0.0];
        for (step, want) in expected.iter().enumerate() {
            let got = per_step.lr(1e-3, step, 0);
            assert!((got - want).abs() < 1e-15, "step {step}: {got} vs {want}");
        }
        // Past the end it stays at the floor; the floor is respected.
        let floored = Schedule::CosinePerStep { min_lr: 2e-5, steps: 4 };
        assert!((floored.lr(1e-3, 9, 3) - 2e-5).abs() < 1e-18);
        assert!((floored.lr(1e-3, 2, 0) - (2e-5 + 0.5 * (1e-3 - 2e-5))).abs() < 1e-15);
        // LFM's schedule changes only between epochs, whatever the step.
        let per_epoch = Schedule::Cosine { min_lr: 0.0, epochs: 2 };
        assert_eq!(per_epoch.lr(1e-3, 0, 0), per_epoch.lr(1e-3, 900, 0));
        assert!((per_epoch.lr(1e-3, 1000, 1) - 0.5e-3).abs() < 1e-15);
        assert_eq!(Schedule::Constant.lr(1e-3, 7, 3), 1e-3);
    }
}
