//! Nearest-neighbour ×2 upsampling and 2×2 average pooling under autodiff, one pass each way: each is the other's
//! backward pass (up to the factor ¼), where Burn's autodiff runs `expand` and its reductions.

use burn::backend::autodiff::{checkpoint::base::Checkpointer, grads::Gradients, ops::Backward, ops::Ops};
use burn::tensor::{backend::Backend, Tensor};

use super::{applies, lift, lower, record, register, tensor, values, Inner};
use crate::nn::cpu::{block_sum_2x_into, repeat_2x_into};

/// Which way a resampling goes.
#[derive(Debug, Clone, Copy)]
enum Direction {
    /// Nearest-neighbour ×2 upsampling.
    Up,
    /// 2×2 average pooling with stride 2.
    Down,
}

/// Nearest-neighbour ×2 upsampling of `x` `[N, C, H, W]` when `B` is `Autodiff<NdArray<f32>>` and `x` is `f32`;
/// `None` otherwise. Keeps nothing for the backward pass.
pub(crate) fn upsample_nearest_2x<B: Backend>(x: &Tensor<B, 4>) -> Option<Tensor<B, 4>> {
    resample(x, Direction::Up)
}

/// 2×2 average pooling with stride 2 of `x` `[N, C, H, W]` (`H`, `W` even) when `B` is `Autodiff<NdArray<f32>>` and
/// `x` is `f32`; `None` otherwise. Keeps nothing for the backward pass.
pub(crate) fn avg_pool_2x<B: Backend>(x: &Tensor<B, 4>) -> Option<Tensor<B, 4>> {
    resample(x, Direction::Down)
}

fn resample<B: Backend>(x: &Tensor<B, 4>, direction: Direction) -> Option<Tensor<B, 4>> {
    if !applies::<B>(&[x.dtype()]) {
        return None;
    }
    let dims = x.dims();
    let [n, c, h, w] = dims;
    let x = lift(x);
    let out = record(ResampleBackward { dims, direction }, [&x], || {
        let xs = values(x.primitive.clone());
        let out = match direction {
            Direction::Up => {
                let mut out = vec![0.0f32; n * c * 4 * h * w];
                repeat_2x_into(&xs, [h, w], 1.0, &mut out);
                tensor(out, [n, c, 2 * h, 2 * w])
            }
            Direction::Down => {
                let mut out = vec![0.0f32; n * c * (h / 2) * (w / 2)];
                block_sum_2x_into(&xs, [h, w], 0.25, &mut out);
                tensor(out, [n, c, h / 2, w / 2])
            }
        };
        (out, ())
    });
    Some(lower(out))
}

#[derive(Debug)]
struct ResampleBackward {
    /// The input's `[N, C, H, W]`.
    dims: [usize; 4],
    direction: Direction,
}

impl Backward<Inner, 1> for ResampleBackward {
    type State = ();

    /// Upsampling: `dx` is the sum of each 2×2 block of `dy`; pooling: `dx` is `dy / 4` repeated over each block.
    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let [node] = ops.parents.map(|p| p.map(|p| p.id));
        let [n, c, h, w] = self.dims;
        let dy = values(grads.consume::<Inner>(&ops.node));
        register(grads, node, &self.dims, || {
            let mut dx = vec![0.0f32; n * c * h * w];
            match self.direction {
                Direction::Up => block_sum_2x_into(&dy, [2 * h, 2 * w], 1.0, &mut dx),
                Direction::Down => repeat_2x_into(&dy, [h / 2, w / 2], 0.25, &mut dx),
            }
            dx
        });
    }
}
