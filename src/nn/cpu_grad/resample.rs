//! Nearest-neighbour ×2 upsampling and 2×2 average pooling under autodiff, one pass each way: each is the other's
//! backward pass (up to the factor ¼), where Burn's autodiff runs `expand` and its reductions.

use burn::backend::autodiff::{checkpoint::base::Checkpointer, grads::Gradients, ops::Backward, ops::Ops};
use burn::tensor::{backend::Backend, Tensor};

use super::{applies, lift, lower, record, register, tensor, values, Inner};
use crate::nn::cpu::Resample;

/// Nearest-neighbour ×2 upsampling of `x` `[N, C, H, W]` when `B` is `Autodiff<NdArray<f32>>` and `x` is `f32`;
/// `None` otherwise. Keeps nothing for the backward pass.
pub(crate) fn upsample_nearest_2x<B: Backend>(x: &Tensor<B, 4>) -> Option<Tensor<B, 4>> {
    resample(x, Resample::Up)
}

/// 2×2 average pooling with stride 2 of `x` `[N, C, H, W]` (`H`, `W` even) when `B` is `Autodiff<NdArray<f32>>` and
/// `x` is `f32`; `None` otherwise. Keeps nothing for the backward pass.
pub(crate) fn avg_pool_2x<B: Backend>(x: &Tensor<B, 4>) -> Option<Tensor<B, 4>> {
    resample(x, Resample::Down)
}

fn resample<B: Backend>(x: &Tensor<B, 4>, resample: Resample) -> Option<Tensor<B, 4>> {
    if !applies::<B>(&[x.dtype()]) {
        return None;
    }
    let dims = x.dims();
    let x = lift(x);
    let out = record(ResampleBackward { dims, resample }, [&x], || {
        let out = resample.forward(&values(x.primitive.clone()), dims);
        (tensor(out, resample.out_dims(dims)), ())
    });
    Some(lower(out))
}

#[derive(Debug)]
struct ResampleBackward {
    /// The input's `[N, C, H, W]`.
    dims: [usize; 4],
    resample: Resample,
}

impl Backward<Inner, 1> for ResampleBackward {
    type State = ();

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let [node] = ops.parents.map(|p| p.map(|p| p.id));
        let dy = values(grads.consume::<Inner>(&ops.node));
        register(grads, node, &self.dims, || self.resample.backward(&dy, self.dims));
    }
}
