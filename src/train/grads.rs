//! Gradient accounting over a whole model: the global L2 norm of every parameter's gradient, and clipping to it
//! as `torch.nn.utils.clip_grad_norm_` does (one norm over all parameters, not one per tensor as Burn's own
//! `GradientClipping::Norm`); and every gradient of a model packed into one host buffer and back (for sums across
//! nodes, see [`super::nodes`]).

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{ElementConversion, Tensor, TensorData};

/// Σ‖g‖² over the parameters, kept on the device until the end (one read back).
struct SquaredNorm<'a, B: AutodiffBackend> {
    grads: &'a GradientsParams,
    total: Option<Tensor<B::InnerBackend, 1>>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for SquaredNorm<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(g) = self.grads.get::<B::InnerBackend, D>(param.id) {
            let s = g.powi_scalar(2).sum();
            self.total = Some(match self.total.take() {
                Some(t) => t + s,
                None => s,
            });
        }
    }
}

/// Multiplies every gradient by a factor.
struct Scale<'a> {
    grads: &'a mut GradientsParams,
    factor: f64,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Scale<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(g) = self.grads.remove::<B::InnerBackend, D>(param.id) {
            self.grads.register::<B::InnerBackend, D>(param.id, g.mul_scalar(self.factor));
        }
    }
}

/// The L2 norm of all of `model`'s gradients taken together.
pub fn global_norm<B: AutodiffBackend, M: Module<B>>(model: &M, grads: &GradientsParams) -> f64 {
    let mut visitor = SquaredNorm::<B> { grads, total: None };
    model.visit(&mut visitor);
    visitor.total.map_or(0.0, |t| t.into_scalar().elem::<f64>().sqrt())
}

/// Multiplies every gradient of `model` by `factor`.
pub fn scale<B: AutodiffBackend, M: Module<B>>(model: &M, grads: &mut GradientsParams, factor: f64) {
    model.visit(&mut Scale { grads, factor });
}

/// Scales gradients whose global norm is `norm` so that it is at most `max_norm` (PyTorch's `clip_grad_norm_`:
/// factor `max_norm / (norm + 1e-6)` when below 1).
pub fn clip_to_norm<B: AutodiffBackend, M: Module<B>>(
    model: &M,
    grads: &mut GradientsParams,
    norm: f64,
    max_norm: f64,
) {
    let factor = max_norm / (norm + 1e-6);
    if factor < 1.0 {
        scale::<B, M>(model, grads, factor);
    }
}

/// Scales the gradients so that their global norm is at most `max_norm` ([`clip_to_norm`]). Returns the norm
/// before clipping.
pub fn clip_global_norm<B: AutodiffBackend, M: Module<B>>(
    model: &M,
    grads: &mut GradientsParams,
    max_norm: f64,
) -> f64 {
    let norm = global_norm::<B, M>(model, grads);
    clip_to_norm::<B, M>(model, grads, norm, max_norm);
    norm
}

/// Collects the flattened gradients, in the model's visit order, and one presence flag per parameter.
struct Pack<'a, B: AutodiffBackend> {
    grads: &'a GradientsParams,
    parts: Vec<Tensor<B::InnerBackend, 1>>,
    flags: Vec<f32>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Pack<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let grad = self.grads.get::<B::InnerBackend, D>(param.id);
        self.flags.push(if grad.is_some() { 1.0 } else { 0.0 });
        // Absent gradients take their place as zeros, so that the buffer's layout is the same on every node.
        let value = param.val();
        let grad = grad.unwrap_or_else(|| Tensor::zeros(value.shape(), &value.device()));
        self.parts.push(grad.flatten::<1>(0, D - 1));
    }
}

/// Every parameter's gradient in `model`'s visit order (zeros where it has none), flattened into one buffer (one
/// read from the device), followed by one flag per parameter: 1 where it has a gradient, 0 where not.
pub fn pack<B: AutodiffBackend, M: Module<B>>(model: &M, grads: &GradientsParams) -> Vec<f32> {
    let mut visitor = Pack::<B> { grads, parts: Vec::new(), flags: Vec::new() };
    model.visit(&mut visitor);
    let mut values = if visitor.parts.is_empty() {
        Vec::new()
    } else {
        Tensor::cat(visitor.parts, 0).into_data().convert::<f32>().to_vec::<f32>().expect("f32 values")
    };
    values.extend(visitor.flags);
    values
}

/// Registers the gradients of a [`pack`]ed buffer.
struct Unpack<'a, B: AutodiffBackend> {
    all: Tensor<B::InnerBackend, 1>,
    flags: &'a [f32],
    offset: usize,
    index: usize,
    grads: GradientsParams,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Unpack<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let shape = param.val().shape();
        let n = shape.num_elements();
        if self.flags[self.index] > 0.0 {
            self.grads
                .register::<B::InnerBackend, D>(param.id, self.all.clone().narrow(0, self.offset, n).reshape(shape));
        }
        self.offset += n;
        self.index += 1;
    }
}

/// The gradients of a [`pack`]ed buffer of `model`, on `device`: those whose flag is non-zero (present on any node
/// whose buffers were summed).
pub fn unpack<B: AutodiffBackend, M: Module<B>>(model: &M, packed: &[f32], device: &B::Device) -> GradientsParams {
    struct Count(usize);
    impl<B: AutodiffBackend> ModuleVisitor<B> for Count {
        fn visit_float<const D: usize>(&mut self, _: &Param<Tensor<B, D>>) {
            self.0 += 1;
        }
    }
    let mut count = Count(0);
    model.visit(&mut count);
    let count = count.0;
    let (values, flags) = packed.split_at(packed.len() - count);
    let all = Tensor::from_data(TensorData::new(values.to_vec(), [values.len()]).convert::<B::FloatElem>(), device);
    let mut visitor = Unpack::<B> { all, flags, offset: 0, index: 0, grads: GradientsParams::new() };
    model.visit(&mut visitor);
    visitor.grads
}
