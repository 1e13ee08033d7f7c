//! Gradient accounting over a whole model: the global L2 norm of every parameter's gradient, and clipping to it
//! as `torch.nn.utils.clip_grad_norm_` does (one norm over all parameters, not one per tensor as Burn's own
//! `GradientClipping::Norm`); and every gradient of a model packed into one device buffer and back (for sums across
//! processes, see [`super::group`]).

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{ElementConversion, Tensor, TensorData};

/// The float element of `B`'s inner backend.
pub type InnerElem<B> = burn::tensor::ops::FloatElem<<B as AutodiffBackend>::InnerBackend>;

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
        // Absent gradients take their place as zeros, so that the buffer's layout is the same on every process.
        let value = param.val();
        let grad = grad.unwrap_or_else(|| Tensor::zeros(value.shape(), &value.device()));
        self.parts.push(grad.flatten::<1>(0, D - 1));
    }
}

/// Every parameter's gradient in `model`'s visit order (zeros where it has none), flattened into one buffer on the
/// device of `model`'s first parameter, followed by one flag per parameter (1 where it has a gradient, 0 where not)
/// and then `extra` (values summed along with the gradients, such as the loss). The layout is the same on every
/// process of a run, so that the buffers of all processes can be summed element by element.
pub fn pack<B: AutodiffBackend, M: Module<B>>(
    model: &M,
    grads: &GradientsParams,
    extra: &[f32],
    device: &burn::tensor::ops::Device<B::InnerBackend>,
) -> Tensor<B::InnerBackend, 1> {
    let mut visitor = Pack::<B> { grads, parts: Vec::new(), flags: Vec::new() };
    model.visit(&mut visitor);
    let mut tail = visitor.flags;
    tail.extend_from_slice(extra);
    let len = tail.len();
    let tail = Tensor::from_data(TensorData::new(tail, [len]).convert::<InnerElem<B>>(), device);
    let mut parts = visitor.parts;
    parts.push(tail);
    Tensor::cat(parts, 0)
}

/// The number of parameter tensors of `model` (the flags of a [`pack`]ed buffer).
pub fn parameter_count<B: AutodiffBackend, M: Module<B>>(model: &M) -> usize {
    struct Count(usize);
    impl<B: AutodiffBackend> ModuleVisitor<B> for Count {
        fn visit_float<const D: usize>(&mut self, _: &Param<Tensor<B, D>>) {
            self.0 += 1;
        }
    }
    let mut count = Count(0);
    model.visit(&mut count);
    count.0
}

/// Where [`Unpack`] reads each gradient from: a packed buffer on the device, or one on the host.
trait PackedSource<B: AutodiffBackend> {
    /// The `shape.num_elements()` values from `offset` on, as a tensor of `shape`.
    fn gradient<const D: usize>(&self, offset: usize, shape: burn::tensor::Shape) -> Tensor<B::InnerBackend, D>;
}

/// A [`pack`]ed buffer on the device: each gradient is a view of it.
struct DeviceBuffer<B: AutodiffBackend>(Tensor<B::InnerBackend, 1>);

impl<B: AutodiffBackend> PackedSource<B> for DeviceBuffer<B> {
    fn gradient<const D: usize>(&self, offset: usize, shape: burn::tensor::Shape) -> Tensor<B::InnerBackend, D> {
        let n = shape.num_elements();
        self.0.clone().narrow(0, offset, n).reshape(shape)
    }
}

/// A [`pack_host`]ed buffer: each gradient is uploaded from its own slice.
struct HostBuffer<'a, B: AutodiffBackend> {
    values: &'a [f32],
    device: &'a burn::tensor::ops::Device<B::InnerBackend>,
}

impl<B: AutodiffBackend> PackedSource<B> for HostBuffer<'_, B> {
    fn gradient<const D: usize>(&self, offset: usize, shape: burn::tensor::Shape) -> Tensor<B::InnerBackend, D> {
        let n = shape.num_elements();
        let data = TensorData::new(self.values[offset..offset + n].to_vec(), shape);
        Tensor::from_data(data.convert::<InnerElem<B>>(), self.device)
    }
}

/// Registers the gradients of a packed buffer (those whose flag is set), walking the layout [`pack`] wrote.
struct Unpack<'a, S> {
    source: S,
    flags: &'a [f32],
    offset: usize,
    index: usize,
    grads: GradientsParams,
}

impl<B: AutodiffBackend, S: PackedSource<B>> ModuleVisitor<B> for Unpack<'_, S> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let shape = param.val().shape();
        let n = shape.num_elements();
        if self.flags[self.index] > 0.0 {
            let grad = self.source.gradient::<D>(self.offset, shape);
            self.grads.register::<B::InnerBackend, D>(param.id, grad);
        }
        self.offset += n;
        self.index += 1;
    }
}

/// Walks `model` over a packed buffer read through `source`.
fn unpack_from<B: AutodiffBackend, M: Module<B>, S: PackedSource<B>>(
    model: &M,
    source: S,
    flags: &[f32],
) -> GradientsParams {
    let mut visitor = Unpack { source, flags, offset: 0, index: 0, grads: GradientsParams::new() };
    model.visit(&mut visitor);
    visitor.grads
}

/// The gradients of a [`pack`]ed buffer of `model` (those whose flag is non-zero: present on any process whose
/// buffers were summed) and its `extra_len` extra values.
pub fn unpack<B: AutodiffBackend, M: Module<B>>(
    model: &M,
    packed: Tensor<B::InnerBackend, 1>,
    extra_len: usize,
) -> (GradientsParams, Vec<f32>) {
    let count = parameter_count::<B, M>(model);
    let len = packed.dims()[0];
    // The flags and extras are a few hundred values: one small read.
    let tail = packed.clone().narrow(0, len - count - extra_len, count + extra_len);
    let tail = tail.into_data().convert::<f32>().to_vec::<f32>().expect("f32 values");
    let (flags, extra) = tail.split_at(count);
    (unpack_from::<B, M, _>(model, DeviceBuffer::<B>(packed), flags), extra.to_vec())
}

/// Collects every parameter's gradient into one host buffer, in `model`'s visit order (zeros where it has none),
/// and its presence flag.
struct PackHost<'a, B: AutodiffBackend> {
    grads: &'a GradientsParams,
    values: Vec<f32>,
    flags: Vec<f32>,
    _backend: std::marker::PhantomData<B>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for PackHost<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        match self.grads.get::<B::InnerBackend, D>(param.id) {
            Some(grad) => {
                // On the CPU backend, straight from the gradient's buffer (`into_data` of a buffer the gradients
                // still share copies element by element: seconds per step for DiT-B/2).
                crate::nn::cpu::with_values(grad, |values| self.values.extend_from_slice(values));
                self.flags.push(1.0);
            }
            None => {
                self.values.resize(self.values.len() + param.val().shape().num_elements(), 0.0);
                self.flags.push(0.0);
            }
        }
    }
}

/// [`pack`] into a host buffer: the same layout, read parameter by parameter straight into `buffer` (no
/// concatenation on the device and no second copy on the host), for transports that sum host memory (MPI). The
/// buffer is overwritten; passing the same one every step keeps its pages mapped.
pub fn pack_host<B: AutodiffBackend, M: Module<B>>(
    model: &M,
    grads: &GradientsParams,
    extra: &[f32],
    buffer: &mut Vec<f32>,
) {
    let count = parameter_count::<B, M>(model);
    buffer.clear();
    // Burn's `num_params` is the number of float parameter elements: the gradients' part of the buffer.
    buffer.reserve(model.num_params() + count + extra.len());
    let mut visitor = PackHost::<B> {
        grads,
        values: std::mem::take(buffer),
        flags: Vec::with_capacity(count),
        _backend: std::marker::PhantomData,
    };
    model.visit(&mut visitor);
    *buffer = visitor.values;
    buffer.extend(visitor.flags);
    buffer.extend_from_slice(extra);
}

/// The gradients of a [`pack_host`]ed buffer of `model`, on `device`, and its `extra_len` extra values.
pub fn unpack_host<B: AutodiffBackend, M: Module<B>>(
    model: &M,
    packed: &[f32],
    extra_len: usize,
    device: &burn::tensor::ops::Device<B::InnerBackend>,
) -> (GradientsParams, Vec<f32>) {
    let count = parameter_count::<B, M>(model);
    let (values, tail) = packed.split_at(packed.len() - count - extra_len);
    let (flags, extra) = tail.split_at(count);
    (unpack_from::<B, M, _>(model, HostBuffer::<B> { values, device }, flags), extra.to_vec())
}

#[cfg(test)]
mod tests {
    use burn::backend::{Autodiff, NdArray};
    use burn::nn::{Linear, LinearConfig};

    use super::*;

    type B = Autodiff<NdArray<f32>>;

    /// Two layers, the second unused by the loss: its parameters have no gradient (flag 0).
    #[derive(Module, Debug)]
    struct TwoLayers<B: burn::tensor::backend::Backend> {
        used: Linear<B>,
        unused: Linear<B>,
    }

    fn model_and_grads() -> (TwoLayers<B>, GradientsParams) {
        let device = Default::default();
        let model = TwoLayers {
            used: LinearConfig::new(3, 5).init::<B>(&device),
            unused: LinearConfig::new(2, 7).init::<B>(&device),
        };
        let x = Tensor::<B, 2>::from_floats([[0.5, -1.0, 2.0], [1.5, 0.25, -0.75]], &device);
        let loss = model.used.forward(x).powi_scalar(2).sum();
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        (model, grads)
    }

    fn values<const D: usize>(t: Tensor<burn::backend::NdArray<f32>, D>) -> Vec<f32> {
        t.into_data().to_vec::<f32>().unwrap()
    }

    /// Both packings keep every gradient, skip the absent ones and carry the extras, on the device and on the host.
    #[test]
    fn packed_gradients_unpack_to_the_same_gradients() {
        let (model, grads) = model_and_grads();
        let device = Default::default();
        let weight = |g: &GradientsParams| values(g.get::<NdArray<f32>, 2>(model.used.weight.id).unwrap());
        let bias =
            |g: &GradientsParams| values(g.get::<NdArray<f32>, 1>(model.used.bias.as_ref().unwrap().id).unwrap());
        let absent = |g: &GradientsParams| g.get::<NdArray<f32>, 2>(model.unused.weight.id).is_none();

        let packed = pack::<B, _>(&model, &grads, &[0.25, 4.0], &device);
        // 15 + 5 + 14 + 7 values, 4 flags, 2 extras.
        assert_eq!(packed.dims(), [15 + 5 + 14 + 7 + 4 + 2]);
        let (device_grads, extra) = unpack::<B, _>(&model, packed, 2);
        let mut host = vec![f32::NAN; 3];
        pack_host::<B, _>(&model, &grads, &[0.25, 4.0], &mut host);
        let (host_grads, host_extra) = unpack_host::<B, _>(&model, &host, 2, &device);
        for (unpacked, extra) in [(&device_grads, extra), (&host_grads, host_extra)] {
            assert_eq!(weight(unpacked), weight(&grads));
            assert_eq!(bias(unpacked), bias(&grads));
            assert!(absent(unpacked), "a parameter without a gradient stays without one");
            assert_eq!(extra, vec![0.25, 4.0]);
        }
        assert_eq!(&host[41..], &[1.0, 1.0, 0.0, 0.0, 0.25, 4.0], "flags, then the extras");
    }
}
