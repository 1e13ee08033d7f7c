//! An exponential moving average of the trained weights, `ema ← d·ema + (1 − d)·θ` after every optimiser step
//! (LFM's `--use_ema`, decay 0.9999), kept on the device without gradients.

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::{backend::Backend, Tensor};

/// The averaged copy of a model.
#[derive(Debug)]
pub struct Ema<M> {
    /// The averaged weights (a full model, ready for sampling).
    pub model: M,
    /// The decay `d`.
    pub decay: f64,
}

impl<M> Ema<M> {
    /// Starts the average at the model's current weights.
    pub fn new(model: M, decay: f64) -> Self {
        Self { model, decay }
    }

    /// Moves the average towards `current` (the trained model's weights after a step).
    pub fn update<B: Backend>(&mut self, current: &M)
    where
        M: Module<B>,
    {
        let mut flat = Flatten { values: Vec::new() };
        current.visit(&mut flat);
        let mut blend = Blend { values: flat.values.into_iter(), decay: self.decay };
        let model = std::mem::replace(&mut self.model, current.clone());
        self.model = model.map(&mut blend);
        assert!(blend.values.next().is_none(), "the average and the model have the same parameters");
    }
}

/// Every float parameter, flattened, in visiting order.
struct Flatten<B: Backend> {
    values: Vec<Tensor<B, 1>>,
}

impl<B: Backend> ModuleVisitor<B> for Flatten<B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let value = param.val();
        let n = value.shape().num_elements();
        self.values.push(value.reshape([n]));
    }
}

/// `d·average + (1 − d)·current`, parameter by parameter in the same visiting order.
struct Blend<B: Backend> {
    values: std::vec::IntoIter<Tensor<B, 1>>,
    decay: f64,
}

impl<B: Backend> ModuleMapper<B> for Blend<B> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, average, mapper) = param.consume();
        let current = self.values.next().expect("the average and the model have the same parameters");
        let current: Tensor<B, D> = current.reshape(average.dims());
        let blended = average.mul_scalar(self.decay) + current.mul_scalar(1.0 - self.decay);
        Param::from_mapped_value(id, blended, mapper)
    }
}
