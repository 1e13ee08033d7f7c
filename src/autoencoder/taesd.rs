//! TAESD (madebyollin), the tiny distilled twin of the SD VAE: the same latent space, already on the scaled SD
//! scale (LFM's `z`), a deterministic encoder, images in [0, 1].
//!
//! Both networks are `nn.Sequential`s in the reference; their parameter layers are kept here in order, and
//! [`ENCODER`] / [`DECODER`] spell out the full sequence (with the parameterless layers), whose indices are the
//! checkpoint keys (`3.conv.2.weight`). diffusers' `AutoencoderTiny` prefix (`encoder.layers.N`) is accepted too.

use burn::module::Module;
use burn::tensor::activation::relu;
use burn::tensor::{backend::Backend, Tensor};

use crate::checkpoint::{CheckpointError, KeyMap, TensorMap};
use crate::nn::init::{self, ConvSpec, Init};
use crate::nn::{upsample_nearest_2x, Activation, Conv2d};

/// Width of every hidden layer.
const WIDTH: usize = 64;
/// Latent channels.
pub const LATENT_CHANNELS: usize = 4;

/// TAESD's downsampling factor (that of SD's VAE).
pub const FACTOR: usize = 8;

/// One entry of the reference's `nn.Sequential`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// 3×3 convolution with bias, `(in, out)`.
    Conv(usize, usize),
    /// 3×3 stride-2 convolution without bias.
    ConvDown,
    /// 3×3 convolution without bias (after an upsample).
    ConvNoBias,
    /// The residual `Block` (three 3×3 convolutions, ReLU, identity skip).
    Block,
    /// ReLU.
    Relu,
    /// Nearest ×2.
    Upsample,
    /// `tanh(x / 3)·3`.
    Clamp,
}

use Op::*;

/// The encoder: image in [0, 1] → scaled latent.
pub const ENCODER: [Op; 15] = [
    Conv(3, WIDTH),
    Block,
    ConvDown,
    Block,
    Block,
    Block,
    ConvDown,
    Block,
    Block,
    Block,
    ConvDown,
    Block,
    Block,
    Block,
    Conv(WIDTH, LATENT_CHANNELS),
];

/// The decoder: scaled latent → image in about [0, 1].
pub const DECODER: [Op; 20] = [
    Clamp,
    Conv(LATENT_CHANNELS, WIDTH),
    Relu,
    Block,
    Block,
    Block,
    Upsample,
    ConvNoBias,
    Block,
    Block,
    Block,
    Upsample,
    ConvNoBias,
    Block,
    Block,
    Block,
    Upsample,
    ConvNoBias,
    Block,
    Conv(WIDTH, 3),
];

/// TAESD's residual block: `relu(conv(x) + x)` with `conv` = conv, ReLU, conv, ReLU, conv.
#[derive(Module, Debug)]
pub struct Block<B: Backend> {
    /// The three convolutions (`conv.0`, `conv.2`, `conv.4`).
    pub conv: Vec<Conv2d<B>>,
}

impl<B: Backend> Block<B> {
    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        // The ReLUs run fused into the convolutions on the CPU (the same values).
        let h = self.conv[0].forward_activated(x.clone(), Activation::Relu);
        let h = self.conv[1].forward_activated(h, Activation::Relu);
        relu(self.conv[2].forward(h) + x)
    }
}

/// A layer with parameters.
#[derive(Module, Debug)]
// Built once per model; the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
pub enum Layer<B: Backend> {
    /// A convolution.
    Conv(Conv2d<B>),
    /// A residual block.
    Block(Block<B>),
}

/// One of TAESD's two halves: its parameter layers, in order, and the full op sequence.
#[derive(Module, Debug)]
pub struct Half<B: Backend> {
    /// The parameter layers in sequence order.
    pub layers: Vec<Layer<B>>,
    /// The whole sequence.
    #[module(skip)]
    pub ops: Vec<Op>,
}

fn has_params(op: &Op) -> bool {
    matches!(op, Conv(..) | ConvDown | ConvNoBias | Block)
}

impl<B: Backend> Half<B> {
    fn new(ops: &[Op], device: &B::Device) -> Self {
        let conv = |c_in, c_out, stride, bias| {
            let spec = ConvSpec { c_in, c_out, kernel: 3, stride, padding: 1, bias };
            init::conv2d(spec, Init::TorchDefault, device)
        };
        let layers = ops
            .iter()
            .filter(|op| has_params(op))
            .map(|op| match *op {
                Conv(c_in, c_out) => Layer::Conv(conv(c_in, c_out, 1, true)),
                ConvDown => Layer::Conv(conv(WIDTH, WIDTH, 2, false)),
                ConvNoBias => Layer::Conv(conv(WIDTH, WIDTH, 1, false)),
                _ => Layer::Block(Block { conv: (0..3).map(|_| conv(WIDTH, WIDTH, 1, true)).collect() }),
            })
            .collect();
        Self { layers, ops: ops.to_vec() }
    }

    /// Burn paths (`layers.{k}`, `conv.{i}`) → the reference's Sequential indices.
    fn keys(&self) -> KeyMap {
        let mut keys = KeyMap::default();
        let indices = self.ops.iter().enumerate().filter(|(_, op)| has_params(op)).map(|(i, _)| i);
        for (k, index) in indices.enumerate() {
            keys = keys.rename(format!("layers.{k}"), format!("{index}"));
        }
        // Highest first, so that a renamed key is not renamed again.
        for (i, torch) in [(2, 4), (1, 2)] {
            keys = keys.rename(format!("conv.{i}"), format!("conv.{torch}"));
        }
        keys
    }

    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let mut layers = self.layers.iter();
        let mut x = x;
        for op in &self.ops {
            x = match op {
                Relu => relu(x),
                Upsample => upsample_nearest_2x(x),
                Clamp => x.div_scalar(3.0).tanh().mul_scalar(3.0),
                _ => match layers.next().expect("one layer per parameter op") {
                    Layer::Conv(conv) => conv.forward(x),
                    Layer::Block(block) => block.forward(x),
                },
            };
        }
        x
    }
}

/// TAESD: encoder and decoder.
#[derive(Module, Debug)]
pub struct Taesd<B: Backend> {
    /// Image in [0, 1] → scaled latent.
    pub encoder: Half<B>,
    /// Scaled latent → image in about [0, 1].
    pub decoder: Half<B>,
}

impl<B: Backend> Taesd<B> {
    /// TAESD with PyTorch's default initialisation (for tests and benchmarks; loading overwrites it).
    pub fn init(device: &B::Device) -> Self {
        Self { encoder: Half::new(&ENCODER, device), decoder: Half::new(&DECODER, device) }
    }

    /// Loads the two halves from their state_dicts: the original `taesd_encoder.pth` / `taesd_decoder.pth` (or
    /// their safetensors), keys `0.weight`, `1.conv.0.weight`, …; diffusers' `encoder.layers.` / `decoder.layers.`
    /// prefixes are stripped.
    pub fn load(encoder: &TensorMap, decoder: &TensorMap, device: &B::Device) -> Result<Self, CheckpointError> {
        let init = Self::init(device);
        let encoder_keys = init.encoder.keys();
        let decoder_keys = init.decoder.keys();
        let encoder =
            crate::checkpoint::apply_weights(init.encoder, &strip(encoder, "encoder.layers."), &encoder_keys)?;
        let decoder =
            crate::checkpoint::apply_weights(init.decoder, &strip(decoder, "decoder.layers."), &decoder_keys)?;
        Ok(Self { encoder, decoder })
    }

    /// Image in [0, 1] → scaled latent.
    pub fn encode(&self, images: Tensor<B, 4>) -> Tensor<B, 4> {
        self.encoder.forward(images)
    }

    /// Scaled latent → image in about [0, 1].
    pub fn decode(&self, latents: Tensor<B, 4>) -> Tensor<B, 4> {
        self.decoder.forward(latents)
    }
}

fn strip(weights: &TensorMap, prefix: &str) -> TensorMap {
    weights.iter().map(|(k, v)| (k.strip_prefix(prefix).unwrap_or(k).to_string(), v.clone())).collect()
}
