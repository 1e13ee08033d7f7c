//! 2-D convolution under autodiff: the inference kernel forward (im2col blocks and GEMMs, bias fused); backward per
//! image `dX = col2im(Wᵀ·dY)` and `dW += dY·columnsᵀ` with the columns rebuilt from the saved input (Burn's
//! im2col route keeps `kh·kw` copies of the input for its matmul's backward), and the bias gradient as plane sums.

use burn::backend::autodiff::{checkpoint::base::Checkpointer, grads::Gradients, ops::Backward, ops::Ops};
use burn::tensor::ops::FloatTensor;
use burn::tensor::{backend::Backend, Tensor, TensorMetadata};
use gemm::Parallelism;
use rayon::prelude::*;

use super::{applies, inner, lift, lower, record, register, values, Inner};
use crate::nn::cpu::{self, Geometry};
use crate::nn::Activation;

/// `conv2d(x, weight, bias)` (`x` `[N, in, H, W]`, `weight` `[out, in, kh, kw]`, a square `stride`, symmetric zero
/// `padding`) when `B` is `Autodiff<NdArray<f32>>` and the tensors are `f32`; `None` otherwise.
pub(crate) fn conv2d<B: Backend>(
    x: &Tensor<B, 4>,
    weight: &Tensor<B, 4>,
    bias: Option<&Tensor<B, 1>>,
    stride: usize,
    padding: [usize; 2],
) -> Option<Tensor<B, 4>> {
    let mut dtypes = vec![x.dtype(), weight.dtype()];
    dtypes.extend(bias.map(|b| b.dtype()));
    if !applies::<B>(&dtypes) {
        return None;
    }
    let (x, w) = (lift(x), lift(weight));
    let input: [usize; 4] = x.primitive.shape().dims();
    let geometry = Geometry::new(input, w.primitive.shape().dims(), stride, padding);
    let op = ConvBackward { geometry, n: input[0] };
    let forward = |b: Option<FloatTensor<Inner>>| {
        let output = cpu::conv2d(
            inner(x.primitive.clone()),
            inner(w.primitive.clone()),
            b.map(inner),
            stride,
            padding,
            Activation::None,
        );
        (output.into_primitive().tensor(), [x.primitive.clone(), w.primitive.clone()])
    };
    let out = match bias {
        Some(bias) => {
            let b = lift(bias);
            record(op, [&x, &w, &b], || forward(Some(b.primitive.clone())))
        }
        None => record(NoBias(op), [&x, &w], || forward(None)),
    };
    Some(lower(out))
}

#[derive(Debug)]
struct ConvBackward {
    geometry: Geometry,
    n: usize,
}

/// The same convolution without a bias (two parents).
#[derive(Debug)]
struct NoBias(ConvBackward);

impl Backward<Inner, 3> for ConvBackward {
    /// The input and the weight.
    type State = [FloatTensor<Inner>; 2];

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let [node_x, node_w, node_b] = ops.parents.map(|p| p.map(|p| p.id));
        let dy = values(grads.consume::<Inner>(&ops.node));
        let [x, w] = ops.state;
        let (dx, dw) = self.input_and_weight(&dy, x, w, node_x.is_some(), node_w.is_some());
        let g = self.geometry;
        register(grads, node_x, &self.input_dims(), || dx.unwrap_or_default());
        register(grads, node_w, &self.weight_dims(), || dw.unwrap_or_default());
        register(grads, node_b, &[g.weight_dims()[0]], || self.bias_gradient(&dy));
    }
}

impl Backward<Inner, 2> for NoBias {
    /// The input and the weight.
    type State = [FloatTensor<Inner>; 2];

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let [node_x, node_w] = ops.parents.map(|p| p.map(|p| p.id));
        let dy = values(grads.consume::<Inner>(&ops.node));
        let [x, w] = ops.state;
        let (dx, dw) = self.0.input_and_weight(&dy, x, w, node_x.is_some(), node_w.is_some());
        register(grads, node_x, &self.0.input_dims(), || dx.unwrap_or_default());
        register(grads, node_w, &self.0.weight_dims(), || dw.unwrap_or_default());
    }
}

impl ConvBackward {
    fn input_dims(&self) -> [usize; 4] {
        self.geometry.input_dims(self.n)
    }

    fn weight_dims(&self) -> [usize; 4] {
        self.geometry.weight_dims()
    }

    /// `dX` and `dW` (each only when wanted): the images split into one contiguous part per core, each part with
    /// its own `dW` summed at the end; a batch smaller than the core count splits each GEMM instead.
    fn input_and_weight(
        &self,
        dy: &[f32],
        x: FloatTensor<Inner>,
        w: FloatTensor<Inner>,
        want_dx: bool,
        want_dw: bool,
    ) -> (Option<Vec<f32>>, Option<Vec<f32>>) {
        let (g, n) = (self.geometry, self.n);
        let (image_in, image_out, weight_len) = (g.image_len(), g.out_image_len(), g.weight_len());
        let mut dx = want_dx.then(|| vec![0.0f32; n * image_in]);
        if n == 0 || !(want_dx || want_dw) {
            return (dx, want_dw.then(|| vec![0.0f32; weight_len]));
        }
        let (x, w) = (values(x), values(w));
        let threads = rayon::current_num_threads();
        let parts = threads.min(n);
        let per_part = n.div_ceil(parts);
        let parallelism = if parts < threads { Parallelism::Rayon(threads) } else { Parallelism::None };
        let part = |first: usize, dx: Option<&mut [f32]>| {
            let mut dw = want_dw.then(|| vec![0.0f32; weight_len]);
            let mut scratch = Vec::new();
            let images = first..(first + per_part).min(n);
            let mut dx_images = dx.map(|dx| dx.chunks_exact_mut(image_in.max(1)));
            for i in images {
                let dx = dx_images.as_mut().and_then(|chunks| chunks.next());
                let (x, dy) = (&x[i * image_in..(i + 1) * image_in], &dy[i * image_out..(i + 1) * image_out]);
                g.backward_image(x, &w, dy, dx, dw.as_deref_mut(), parallelism, &mut scratch);
            }
            dw
        };
        let partial_dw: Vec<Option<Vec<f32>>> = match dx.as_deref_mut() {
            Some(dx) if image_in > 0 => {
                dx.par_chunks_mut(per_part * image_in).enumerate().map(|(i, dx)| part(i * per_part, Some(dx))).collect()
            }
            _ => (0..parts).into_par_iter().map(|i| part(i * per_part, None)).collect(),
        };
        let dw = want_dw.then(|| {
            let mut partials = partial_dw.into_iter().flatten();
            let mut sum = partials.next().unwrap_or_else(|| vec![0.0f32; weight_len]);
            for partial in partials {
                sum.iter_mut().zip(&partial).for_each(|(s, p)| *s += p);
            }
            sum
        });
        (dx, dw)
    }

    /// `db`: each output channel's gradient summed over its planes (f64 sums, rounded once).
    fn bias_gradient(&self, dy: &[f32]) -> Vec<f32> {
        let g = self.geometry;
        let plane = g.out_plane();
        let channels = g.weight_dims()[0];
        let mut sums = vec![0.0f64; channels];
        if plane > 0 && channels > 0 {
            for (i, channel_plane) in dy.chunks_exact(plane).enumerate() {
                sums[i % channels] += channel_plane.iter().map(|&v| v as f64).sum::<f64>();
            }
        }
        sums.into_iter().map(|s| s as f32).collect()
    }
}
