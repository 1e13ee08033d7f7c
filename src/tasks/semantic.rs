//! Conditioning inputs of LFM's downstream tasks, concatenated to the latent before the velocity network.

use burn::module::Module;
use burn::tensor::{backend::Backend, Tensor, TensorData};

use crate::checkpoint::{CheckpointError, KeyMap, TensorMap};
use crate::nn::init::{self, ConvSpec, Init};
use crate::nn::{avg_pool_2x, Conv2d};

/// LDM's `SpatialRescaler` as LFM's semantic synthesis uses it: a one-hot segmentation map is bilinearly halved
/// `n_stages` times (for exact halving, bilinear at scale 0.5 is the 2×2 mean) and projected to the latent's
/// channels by a bias-free 1×1 convolution (`channel_mapper`, saved as `cond_stage_model_<E>.pth`).
#[derive(Module, Debug)]
pub struct SpatialRescaler<B: Backend> {
    /// `channel_mapper`: `[out, classes, 1, 1]`, no bias.
    pub channel_mapper: Conv2d<B>,
    /// Number of halvings (3: 256 px → 32).
    pub n_stages: usize,
}

impl<B: Backend> SpatialRescaler<B> {
    /// A rescaler with PyTorch's default initialisation.
    pub fn new(classes: usize, out_channels: usize, n_stages: usize, device: &B::Device) -> Self {
        let spec = ConvSpec { c_in: classes, c_out: out_channels, kernel: 1, stride: 1, padding: 0, bias: false };
        Self { channel_mapper: init::conv2d(spec, Init::TorchDefault, device), n_stages }
    }

    /// Loads `channel_mapper.weight` (classes and output channels from its shape).
    pub fn load(weights: &TensorMap, n_stages: usize, device: &B::Device) -> Result<Self, CheckpointError> {
        let shape = weights.get("channel_mapper.weight").map(|t| t.shape.clone()).unwrap_or_default();
        let (out, classes) = match shape.as_slice() {
            [out, classes, 1, 1] => (*out, *classes),
            _ => (4, 19),
        };
        crate::checkpoint::apply_weights(Self::new(classes, out, n_stages, device), weights, &KeyMap::default())
    }

    /// Number of segmentation classes.
    pub fn classes(&self) -> usize {
        self.channel_mapper.weight.dims()[1]
    }

    /// One-hot maps `[N, classes, H, W]` → `[N, out, H/2ⁿ, W/2ⁿ]`.
    pub fn forward(&self, one_hot: Tensor<B, 4>) -> Tensor<B, 4> {
        let x = (0..self.n_stages).fold(one_hot, |x, _| avg_pool_2x(x));
        self.project(x)
    }

    /// The projection alone, of maps already at the latent's resolution (class shares per latent cell, see
    /// [`class_shares`]).
    pub fn project(&self, shares: Tensor<B, 4>) -> Tensor<B, 4> {
        self.channel_mapper.forward(shares)
    }

    /// The weights in LFM's `cond_stage_model` layout (`channel_mapper.weight`).
    pub fn state_dict(&self) -> TensorMap {
        crate::checkpoint::collect_weights(self, &KeyMap::default())
    }
}

/// A class-index map (`height × width` values in `0..classes`) as a one-hot tensor `[1, classes, H, W]`.
pub fn one_hot<B: Backend>(
    indices: &[u8],
    width: usize,
    height: usize,
    classes: usize,
    device: &B::Device,
) -> Result<Tensor<B, 4>, String> {
    if let Some(&bad) = indices.iter().find(|&&c| c as usize >= classes) {
        return Err(format!("the segmentation map holds class {bad}, but the model knows classes 0..{}", classes - 1));
    }
    let mut values = vec![0f32; classes * width * height];
    for (p, &c) in indices.iter().enumerate() {
        values[c as usize * width * height + p] = 1.0;
    }
    Ok(Tensor::from_data(TensorData::new(values, [1, classes, height, width]).convert::<B::FloatElem>(), device))
}

/// The share of each class in every `factor × factor` cell of a `size × size` class map: `[classes, size/f,
/// size/f]` values, the one-hot map halved log₂ f times as LDM's `SpatialRescaler` does.
pub fn class_fractions(map: &[u8], size: usize, factor: usize, classes: usize) -> Vec<f32> {
    let side = size / factor;
    let mut out = vec![0f32; classes * side * side];
    let share = 1.0 / (factor * factor) as f32;
    for (y, row) in map.chunks(size).enumerate() {
        for (x, &c) in row.iter().enumerate() {
            out[(c as usize * side + y / factor) * side + x / factor] += share;
        }
    }
    out
}

/// Square class maps (`size × size` class indices each) as class shares per latent cell, `[maps, classes, size/f,
/// size/f]`: the input of [`SpatialRescaler::project`], equal to what [`SpatialRescaler::forward`] makes of the one-hot
/// maps before projecting them, but built on the host without the full-resolution one-hot tensor.
pub fn class_shares<B: Backend>(
    maps: &[Vec<u8>],
    size: usize,
    factor: usize,
    classes: usize,
    device: &B::Device,
) -> Result<Tensor<B, 4>, String> {
    if let Some(map) = maps.iter().find(|m| m.len() != size * size) {
        return Err(format!("a segmentation map has {} values; {size}×{size} maps have {}", map.len(), size * size));
    }
    if let Some(&bad) = maps.iter().flatten().find(|&&c| c as usize >= classes) {
        return Err(format!("the segmentation map holds class {bad}, but the model knows classes 0..{}", classes - 1));
    }
    let side = size / factor;
    let shares = maps.iter().flat_map(|map| class_fractions(map, size, factor, classes)).collect();
    let data = TensorData::new(shares, [maps.len(), classes, side, side]).convert::<B::FloatElem>();
    Ok(Tensor::from_data(data, device))
}
