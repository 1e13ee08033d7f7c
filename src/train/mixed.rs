//! Mixed-precision training: f32 master weights and optimiser state, the forward and backward passes in f16 or
//! bf16. Each step casts the weights *inside* the autodiff graph (so gradients reach the f32 weights through the
//! cast, in f32), the network computes in the 16-bit format with f32 statistics and attention sums (see
//! [`crate::models::precision`]), and the loss, the optimiser and the moving average stay in f32. f16's narrow
//! exponent range flushes small gradients to zero, so f16 runs scale the loss first ([`LossScaler`], as PyTorch's
//! `GradScaler`); bf16 has f32's range and needs none.

use burn::module::{Module, ModuleMapper, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor};
use serde::{Deserialize, Serialize};

use crate::nn::dtype::to_dtype;

/// The loss scale f16 runs start from (PyTorch's `GradScaler` default, 2¹⁶).
pub const INITIAL_LOSS_SCALE: f64 = 65536.0;
/// Consecutive steps with finite gradients after which the scale doubles (PyTorch's default).
pub const GROWTH_INTERVAL: usize = 2000;

/// Dynamic loss scaling: the loss is multiplied by `scale` before the backward pass and the gradients divided by
/// it after; a step whose gradients overflowed (inf or NaN) is skipped and the scale halved; after
/// [`GROWTH_INTERVAL`] good steps in a row it doubles. Saved with the checkpoint, so a resumed run scales exactly as
/// an uninterrupted one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LossScaler {
    /// The factor the loss is multiplied by.
    pub scale: f64,
    /// Steps with finite gradients since the last change of the scale.
    pub good_steps: usize,
}

impl Default for LossScaler {
    fn default() -> Self {
        Self { scale: INITIAL_LOSS_SCALE, good_steps: 0 }
    }
}

impl LossScaler {
    /// Records a step's outcome (`finite`: every gradient was finite) and returns whether to apply its update.
    pub fn update(&mut self, finite: bool) -> bool {
        if !finite {
            // Never below one: a scale that small means the loss itself is not finite, which the run reports.
            self.scale = (self.scale / 2.0).max(1.0);
            self.good_steps = 0;
            return false;
        }
        self.good_steps += 1;
        if self.good_steps == GROWTH_INTERVAL {
            self.scale *= 2.0;
            self.good_steps = 0;
        }
        true
    }
}

/// Casts every float parameter inside the autodiff graph (no detach): the cast copy is what the forward pass
/// reads, and the gradients flow back through the cast to the original parameters.
struct CastInGraph(DType);

impl<B: Backend> ModuleMapper<B> for CastInGraph {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, tensor, mapper) = param.consume();
        Param::from_mapped_value(id, to_dtype(tensor, self.0), mapper)
    }
}

/// `module` with its float parameters cast to `dtype` as graph operations of the current step (the master
/// parameters stay as they are and receive the gradients).
pub fn cast_in_graph<B: Backend, M: Module<B>>(module: M, dtype: DType) -> M {
    module.map(&mut CastInGraph(dtype))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scale_halves_on_overflow_and_doubles_after_a_run_of_good_steps() {
        let mut scaler = LossScaler::default();
        assert!(!scaler.update(false));
        assert_eq!(scaler.scale, INITIAL_LOSS_SCALE / 2.0);
        for _ in 0..GROWTH_INTERVAL - 1 {
            assert!(scaler.update(true));
        }
        assert_eq!((scaler.scale, scaler.good_steps), (INITIAL_LOSS_SCALE / 2.0, GROWTH_INTERVAL - 1));
        assert!(scaler.update(true));
        assert_eq!((scaler.scale, scaler.good_steps), (INITIAL_LOSS_SCALE, 0));
        let mut floor = LossScaler { scale: 1.0, good_steps: 5 };
        assert!(!floor.update(false));
        assert_eq!((floor.scale, floor.good_steps), (1.0, 0));
    }
}
