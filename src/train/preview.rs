//! Preview grids of a run: a few samples from the moving average (or the network) written every so many steps, from
//! the same noise each time, so the grids of a run show one set of samples improving.

use std::path::Path;

use burn::backend::Autodiff;
use burn::tensor::backend::Backend;

use super::batches::PREVIEW;
use super::state::io_error;
use super::{TrainError, Trainer};
use crate::autoencoder::AnyAutoencoder;

/// Samples in a preview grid (one row per class for class-conditional models, classes cycling), drawn from the same
/// noise every time, so the grids of a run show one set of samples improving.
pub const PREVIEW_SAMPLES: usize = 16;
/// Euler steps of a preview (previews are for watching a run, not for scoring it).
pub const PREVIEW_STEPS: usize = 20;

/// Samples [`PREVIEW_SAMPLES`] images from the moving average (or the network, without one) with
/// [`PREVIEW_STEPS`] Euler steps from fixed noise, and writes them as `previews/step-<step>.png`, four per row.
pub(crate) fn write_preview<B: Backend>(
    trainer: &Trainer<Autodiff<B>>,
    autoencoder: &AnyAutoencoder<B>,
    seed: u64,
    out_dir: &Path,
) -> Result<(), TrainError> {
    use burn::module::AutodiffModule;
    let current;
    let model = match trainer.ema() {
        Some(ema) => ema,
        None => {
            current = trainer.model().valid();
            &current
        }
    };
    let plan = crate::sample::Plan {
        autoencoder: Some(autoencoder),
        solve: crate::solver::SolveOptions {
            method: crate::solver::Method::Euler,
            grid: crate::solver::Grid::Steps(PREVIEW_STEPS),
            ..Default::default()
        },
        seed: seed ^ PREVIEW,
        // One row of four per class, for as many classes as fit, then cycling.
        classes: Some(crate::sample::ClassChoice::Rows(4)),
        ..crate::sample::Plan::new(model, PREVIEW_SAMPLES)
    };
    let mut grid = crate::sample::pipeline::ImageGrid::default();
    crate::sample::run(&plan, &crate::sample::Conditions::None, &mut [&mut grid], &mut |_| {})
        .map_err(|e| TrainError::Invalid(format!("preview: {e}")))?;
    let dir = out_dir.join("previews");
    std::fs::create_dir_all(&dir).map_err(|e| io_error(&dir, e))?;
    let path = dir.join(format!("step-{:09}.png", trainer.step));
    crate::image::write_rgb(&path, &grid.grid(4)).map_err(|e| io_error(&path, e))
}
