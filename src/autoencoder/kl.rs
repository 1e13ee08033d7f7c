//! Stable Diffusion's KL autoencoder (`diffusers.AutoencoderKL`, e.g. `stabilityai/sd-vae-ft-mse`), computing what
//! diffusers computes for any of its configurations built from `DownEncoderBlock2D` / `UpDecoderBlock2D`.
//!
//! Field names are diffusers' attribute names, so Burn's paths are the `diffusion_pytorch_model.safetensors` keys;
//! the older attention names (`query`, `key`, `value`, `proj_attn`) are renamed on load.

use burn::module::Module;
use burn::tensor::{backend::Backend, Tensor};
use serde::{Deserialize, Serialize};

use crate::checkpoint::{HostTensor, KeyMap, TensorMap};
use crate::nn::attention::attention;
use crate::nn::init::{self, ConvSpec, Init};
use crate::nn::{upsample_nearest_2x, Activation, Conv2d, GroupNorm, Linear};

/// diffusers' GroupNorm epsilon in the VAE.
const EPS: f64 = 1e-6;

/// The hyper-parameters of a diffusers `AutoencoderKL` (its `config.json`; unknown keys are ignored).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AutoencoderKLConfig {
    /// Image channels in.
    #[serde(default = "three")]
    pub in_channels: usize,
    /// Image channels out.
    #[serde(default = "three")]
    pub out_channels: usize,
    /// Width of each resolution level.
    pub block_out_channels: Vec<usize>,
    /// Residual blocks per encoder level (the decoder has one more).
    #[serde(default = "one")]
    pub layers_per_block: usize,
    /// Latent channels.
    #[serde(default = "four")]
    pub latent_channels: usize,
    /// GroupNorm groups.
    #[serde(default = "thirty_two")]
    pub norm_num_groups: usize,
    /// The factor LFM multiplies latents by (`--scale_factor`, 0.18215 for the SD VAE).
    #[serde(default = "sd_scale")]
    pub scaling_factor: f64,
    /// Self-attention in the middle blocks.
    #[serde(default = "yes")]
    pub mid_block_add_attention: bool,
    /// Activation; only `silu` is supported.
    #[serde(default = "silu_name")]
    pub act_fn: String,
}

fn three() -> usize {
    3
}
fn one() -> usize {
    1
}
fn four() -> usize {
    4
}
fn thirty_two() -> usize {
    32
}
fn sd_scale() -> f64 {
    crate::flow::SD_VAE_SCALE_FACTOR
}
fn yes() -> bool {
    true
}
fn silu_name() -> String {
    "silu".into()
}

impl AutoencoderKLConfig {
    /// `stabilityai/sd-vae-ft-mse` (and every SD 1.x VAE): 128-256-512-512, two blocks per level, 4 latent channels.
    pub fn sd_vae_ft_mse() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            block_out_channels: vec![128, 256, 512, 512],
            layers_per_block: 2,
            latent_channels: 4,
            norm_num_groups: 32,
            scaling_factor: sd_scale(),
            mid_block_add_attention: true,
            act_fn: silu_name(),
        }
    }

    /// Reads diffusers' `config.json`.
    pub fn from_json(text: &str) -> Result<Self, String> {
        let config: Self =
            serde_json::from_str(text).map_err(|e| format!("not a diffusers AutoencoderKL config: {e}"))?;
        config.validate()?;
        Ok(config)
    }

    /// diffusers' `config.json` for this architecture (what `AutoencoderKL.from_pretrained` and
    /// [`AutoencoderKLConfig::from_json`] read).
    pub fn to_diffusers_json(&self) -> String {
        let levels = self.block_out_channels.len();
        let mut value = serde_json::to_value(self).expect("config serialises");
        let object = value.as_object_mut().expect("an object");
        object.insert("_class_name".into(), "AutoencoderKL".into());
        object.insert("down_block_types".into(), vec!["DownEncoderBlock2D"; levels].into());
        object.insert("up_block_types".into(), vec!["UpDecoderBlock2D"; levels].into());
        serde_json::to_string_pretty(&value).expect("json")
    }

    /// Checks the sizes fit together.
    pub fn validate(&self) -> Result<(), String> {
        if self.act_fn != "silu" {
            return Err(format!("act_fn {} is not supported (only silu, as every SD VAE)", self.act_fn));
        }
        if self.block_out_channels.is_empty() || self.layers_per_block == 0 || self.latent_channels == 0 {
            return Err("block_out_channels, layers_per_block and latent_channels must be non-empty/positive".into());
        }
        if let Some(c) =
            self.block_out_channels.iter().find(|&&c| self.norm_num_groups == 0 || c % self.norm_num_groups != 0)
        {
            return Err(format!("{c} channels are not divisible by norm_num_groups {}", self.norm_num_groups));
        }
        Ok(())
    }

    /// The spatial downsampling factor (2^(levels − 1)).
    pub fn factor(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }

    /// The autoencoder with PyTorch's default initialisation (for tests and benchmarks; loading overwrites it).
    pub fn init<B: Backend>(&self, device: &B::Device) -> AutoencoderKL<B> {
        let boc = &self.block_out_channels;
        let last = *boc.last().expect("validated");
        let groups = self.norm_num_groups;
        let conv3 = |c_in, c_out| init::conv2d(ConvSpec::same(c_in, c_out, 3), Init::TorchDefault, device);
        let conv1 = |c_in, c_out| init::conv2d(ConvSpec::same(c_in, c_out, 1), Init::TorchDefault, device);
        let resnet = |c_in, c_out| Resnet::new(c_in, c_out, groups, device);
        let mid = || MidBlock {
            resnets: vec![resnet(last, last), resnet(last, last)],
            attentions: if self.mid_block_add_attention {
                vec![SelfAttention::new(last, groups, device)]
            } else {
                vec![]
            },
        };
        let mut down_blocks = Vec::new();
        let mut c = boc[0];
        for (i, &out) in boc.iter().enumerate() {
            let resnets = (0..self.layers_per_block).map(|j| resnet(if j == 0 { c } else { out }, out)).collect();
            c = out;
            let downsamplers = if i + 1 < boc.len() {
                let spec = ConvSpec { c_in: out, c_out: out, kernel: 3, stride: 2, padding: 0, bias: true };
                vec![Resample { conv: init::conv2d(spec, Init::TorchDefault, device) }]
            } else {
                vec![]
            };
            down_blocks.push(DownBlock { resnets, downsamplers });
        }
        let reversed: Vec<usize> = boc.iter().rev().copied().collect();
        let mut up_blocks = Vec::new();
        let mut c = reversed[0];
        for (i, &out) in reversed.iter().enumerate() {
            let resnets = (0..=self.layers_per_block).map(|j| resnet(if j == 0 { c } else { out }, out)).collect();
            c = out;
            let upsamplers = if i + 1 < reversed.len() { vec![Resample { conv: conv3(out, out) }] } else { vec![] };
            up_blocks.push(UpBlock { resnets, upsamplers });
        }
        AutoencoderKL {
            encoder: Encoder {
                conv_in: conv3(self.in_channels, boc[0]),
                down_blocks,
                mid_block: mid(),
                conv_norm_out: GroupNorm::new(last, groups, EPS, device),
                conv_out: conv3(last, 2 * self.latent_channels),
            },
            quant_conv: conv1(2 * self.latent_channels, 2 * self.latent_channels),
            post_quant_conv: conv1(self.latent_channels, self.latent_channels),
            decoder: Decoder {
                conv_in: conv3(self.latent_channels, last),
                mid_block: mid(),
                up_blocks,
                conv_norm_out: GroupNorm::new(boc[0], groups, EPS, device),
                conv_out: conv3(boc[0], self.out_channels),
            },
            config: self.clone(),
        }
    }
}

/// `ResnetBlock2D` without a time embedding: `shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x))))))`.
#[derive(Module, Debug)]
pub struct Resnet<B: Backend> {
    /// First GroupNorm.
    pub norm1: GroupNorm<B>,
    /// First 3×3 convolution.
    pub conv1: Conv2d<B>,
    /// Second GroupNorm.
    pub norm2: GroupNorm<B>,
    /// Second 3×3 convolution.
    pub conv2: Conv2d<B>,
    /// 1×1 convolution when the width changes.
    pub conv_shortcut: Option<Conv2d<B>>,
}

impl<B: Backend> Resnet<B> {
    fn new(c_in: usize, c_out: usize, groups: usize, device: &B::Device) -> Self {
        let conv = |a, b, k| init::conv2d(ConvSpec::same(a, b, k), Init::TorchDefault, device);
        Self {
            norm1: GroupNorm::new(c_in, groups, EPS, device),
            conv1: conv(c_in, c_out, 3),
            norm2: GroupNorm::new(c_out, groups, EPS, device),
            conv2: conv(c_out, c_out, 3),
            conv_shortcut: (c_in != c_out).then(|| conv(c_in, c_out, 1)),
        }
    }

    /// The residual block.
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let h = self.conv1.forward(self.norm1.forward_activated(x.clone(), Activation::Silu));
        let h = self.conv2.forward(self.norm2.forward_activated(h, Activation::Silu));
        match &self.conv_shortcut {
            Some(conv) => conv.forward(x) + h,
            None => x + h,
        }
    }
}

/// Single-head self-attention over all pixels with a residual (diffusers' `Attention` in the mid block).
#[derive(Module, Debug)]
pub struct SelfAttention<B: Backend> {
    /// GroupNorm before the projections.
    pub group_norm: GroupNorm<B>,
    /// Query projection.
    pub to_q: Linear<B>,
    /// Key projection.
    pub to_k: Linear<B>,
    /// Value projection.
    pub to_v: Linear<B>,
    /// `to_out.0`, the output projection.
    pub to_out: Vec<Linear<B>>,
}

impl<B: Backend> SelfAttention<B> {
    fn new(c: usize, groups: usize, device: &B::Device) -> Self {
        let linear = || init::linear(c, c, Init::TorchDefault, device);
        Self {
            group_norm: GroupNorm::new(c, groups, EPS, device),
            to_q: linear(),
            to_k: linear(),
            to_v: linear(),
            to_out: vec![linear()],
        }
    }

    /// `x + to_out(softmax(q·kᵀ/√C)·v)` over the `H·W` pixels.
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let [n, c, h, w] = x.dims();
        let tokens = self.group_norm.forward(x.clone()).reshape([n, c, h * w]).swap_dims(1, 2);
        let head = |layer: &Linear<B>| layer.forward(tokens.clone()).unsqueeze_dim::<4>(1);
        let a = attention(head(&self.to_q), head(&self.to_k), head(&self.to_v)).squeeze_dim::<3>(1);
        let out = self.to_out[0].forward(a).swap_dims(1, 2).reshape([n, c, h, w]);
        x + out
    }
}

/// The middle block: resnet, attention, resnet.
#[derive(Module, Debug)]
pub struct MidBlock<B: Backend> {
    /// The two residual blocks.
    pub resnets: Vec<Resnet<B>>,
    /// The attention (absent when `mid_block_add_attention` is false).
    pub attentions: Vec<SelfAttention<B>>,
}

impl<B: Backend> MidBlock<B> {
    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let x = self.resnets[0].forward(x);
        let x = self.attentions.iter().fold(x, |x, a| a.forward(x));
        self.resnets[1].forward(x)
    }
}

/// A resampling convolution (`downsamplers.0` / `upsamplers.0`).
#[derive(Module, Debug)]
pub struct Resample<B: Backend> {
    /// `conv`.
    pub conv: Conv2d<B>,
}

/// `DownEncoderBlock2D`.
#[derive(Module, Debug)]
pub struct DownBlock<B: Backend> {
    /// Residual blocks.
    pub resnets: Vec<Resnet<B>>,
    /// A stride-2 convolution after right/bottom zero padding, except on the last level.
    pub downsamplers: Vec<Resample<B>>,
}

/// `UpDecoderBlock2D`.
#[derive(Module, Debug)]
pub struct UpBlock<B: Backend> {
    /// Residual blocks.
    pub resnets: Vec<Resnet<B>>,
    /// Nearest ×2 then a 3×3 convolution, except on the last level.
    pub upsamplers: Vec<Resample<B>>,
}

/// The encoder: image → `2·latent_channels` moments (before `quant_conv`).
#[derive(Module, Debug)]
pub struct Encoder<B: Backend> {
    /// Input convolution.
    pub conv_in: Conv2d<B>,
    /// Levels.
    pub down_blocks: Vec<DownBlock<B>>,
    /// Middle block.
    pub mid_block: MidBlock<B>,
    /// Final GroupNorm.
    pub conv_norm_out: GroupNorm<B>,
    /// Output convolution.
    pub conv_out: Conv2d<B>,
}

impl<B: Backend> Encoder<B> {
    /// `[N, 3, H, W] → [N, 2·latent, H/f, W/f]`.
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let mut x = self.conv_in.forward(x);
        for block in &self.down_blocks {
            x = block.resnets.iter().fold(x, |x, r| r.forward(x));
            for down in &block.downsamplers {
                // diffusers pads one zero column right and one row below, then convolves with stride 2.
                x = down.conv.forward(crate::nn::pad_zeros(x, [0, 1, 0, 1]));
            }
        }
        let x = self.mid_block.forward(x);
        self.conv_out.forward(self.conv_norm_out.forward_activated(x, Activation::Silu))
    }
}

/// The decoder: latent (after `post_quant_conv`) → image in about [-1, 1].
#[derive(Module, Debug)]
pub struct Decoder<B: Backend> {
    /// Input convolution.
    pub conv_in: Conv2d<B>,
    /// Middle block.
    pub mid_block: MidBlock<B>,
    /// Levels, coarse to fine.
    pub up_blocks: Vec<UpBlock<B>>,
    /// Final GroupNorm.
    pub conv_norm_out: GroupNorm<B>,
    /// Output convolution.
    pub conv_out: Conv2d<B>,
}

impl<B: Backend> Decoder<B> {
    /// `[N, latent, h, w] → [N, 3, h·f, w·f]`.
    pub fn forward(&self, z: Tensor<B, 4>) -> Tensor<B, 4> {
        let mut x = self.mid_block.forward(self.conv_in.forward(z));
        for block in &self.up_blocks {
            x = block.resnets.iter().fold(x, |x, r| r.forward(x));
            for up in &block.upsamplers {
                x = up.conv.forward(upsample_nearest_2x(x));
            }
        }
        self.conv_out.forward(self.conv_norm_out.forward_activated(x, Activation::Silu))
    }
}

/// The encoder's diagonal Gaussian over (unscaled) latents.
#[derive(Debug, Clone)]
pub struct Posterior<B: Backend> {
    /// Mean.
    pub mean: Tensor<B, 4>,
    /// Log-variance, clamped to [−30, 20] as diffusers does.
    pub logvar: Tensor<B, 4>,
}

impl<B: Backend> Posterior<B> {
    /// Standard deviation `exp(logvar / 2)`.
    pub fn std(&self) -> Tensor<B, 4> {
        self.logvar.clone().mul_scalar(0.5).exp()
    }

    /// `mean + std·eps` for standard-normal `eps`.
    pub fn sample_with(&self, eps: Tensor<B, 4>) -> Tensor<B, 4> {
        self.mean.clone() + self.std() * eps
    }
}

/// diffusers' `AutoencoderKL`.
#[derive(Module, Debug)]
pub struct AutoencoderKL<B: Backend> {
    /// Encoder.
    pub encoder: Encoder<B>,
    /// 1×1 convolution on the moments.
    pub quant_conv: Conv2d<B>,
    /// 1×1 convolution on the latent before decoding.
    pub post_quant_conv: Conv2d<B>,
    /// Decoder.
    pub decoder: Decoder<B>,
    /// The hyper-parameters.
    #[module(skip)]
    pub config: AutoencoderKLConfig,
}

impl<B: Backend> AutoencoderKL<B> {
    /// `quant_conv(encoder(x))`: mean and raw log-variance stacked on the channels.
    pub fn moments(&self, images: Tensor<B, 4>) -> Tensor<B, 4> {
        self.quant_conv.forward(self.encoder.forward(images))
    }

    /// The posterior of images in [-1, 1] (unscaled latents).
    pub fn posterior(&self, images: Tensor<B, 4>) -> Posterior<B> {
        let moments = self.moments(images);
        let c = self.config.latent_channels;
        Posterior { mean: moments.clone().narrow(1, 0, c), logvar: moments.narrow(1, c, c).clamp(-30.0, 20.0) }
    }

    /// LFM's scaled latent of images in [-1, 1] (a posterior sample with `eps`, else its mean) together with the
    /// (unscaled) posterior, from one encoder pass.
    pub fn encode_with_posterior(
        &self,
        images: Tensor<B, 4>,
        eps: Option<Tensor<B, 4>>,
    ) -> (Tensor<B, 4>, Posterior<B>) {
        let posterior = self.posterior(images);
        let z = match eps {
            Some(eps) => posterior.sample_with(eps),
            None => posterior.mean.clone(),
        };
        // The one place the scale factor is applied on the way in.
        (z.mul_scalar(self.config.scaling_factor), posterior)
    }

    /// Unscaled latents → images in about [-1, 1] (`vae.decode(z).sample`).
    pub fn decode_unscaled(&self, z: Tensor<B, 4>) -> Tensor<B, 4> {
        self.decoder.forward(self.post_quant_conv.forward(z))
    }

    /// Loads diffusers-format weights (`diffusion_pytorch_model.safetensors` / `.bin`, old or new attention names).
    pub fn load(
        config: &AutoencoderKLConfig,
        weights: &TensorMap,
        device: &B::Device,
    ) -> Result<Self, crate::checkpoint::CheckpointError> {
        crate::checkpoint::apply_weights(config.init(device), &diffusers_names(weights), &KeyMap::default())
    }
}

/// Renames the attention parameters of older diffusers checkpoints (`query`, `key`, `value`, `proj_attn`, some as
/// 1×1 convolutions) to the current names and shapes.
fn diffusers_names(weights: &TensorMap) -> TensorMap {
    const OLD: [(&str, &str); 4] =
        [(".query.", ".to_q."), (".key.", ".to_k."), (".value.", ".to_v."), (".proj_attn.", ".to_out.0.")];
    weights
        .iter()
        .map(|(key, tensor)| {
            let mut name = key.clone();
            let mut tensor: HostTensor = tensor.clone();
            if key.contains(".attentions.") {
                for (old, new) in OLD {
                    name = name.replace(old, new);
                }
                if tensor.shape.len() == 4 && tensor.shape[2..] == [1, 1] {
                    tensor.shape.truncate(2);
                }
            }
            (name, tensor)
        })
        .collect()
}
