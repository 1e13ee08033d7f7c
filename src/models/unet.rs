//! The guided-diffusion `UNetModel` (Dhariwal & Nichol), which LFM builds with `--use_origin_adm`.
//!
//! Read alongside `models/guided_diffusion/unet.py`: the blocks, then the network. Each `TimestepEmbedSequential` is
//! a `Vec<Layer>`, so Burn's field path `input_blocks.1.0.in_layers_0.weight` is the PyTorch key after the renames
//! in [`unet_keys`]. `attention_resolutions` are **downsample factors** (1, 2, 4, …), as the reference compares them.

use burn::module::{Module, Param};
use burn::nn::{Dropout, DropoutConfig, Embedding};
use burn::tensor::{backend::Backend, Int, Tensor};
use serde::{Deserialize, Serialize};

use crate::checkpoint::KeyMap;
use crate::nn::attention::attention;
use crate::nn::embedding::timestep_embedding;
use crate::nn::init::{self, ConvSpec, Init};
use crate::nn::{avg_pool_2x, silu, upsample_nearest_2x, Activation, Conv2d, GroupNorm, Linear};

/// Renames between Burn field paths and the reference's `nn.Sequential` indices.
pub fn unet_keys() -> KeyMap {
    KeyMap::new(&[
        ("time_embed_0", "time_embed.0"),
        ("time_embed_2", "time_embed.2"),
        ("in_layers_0", "in_layers.0"),
        ("in_layers_2", "in_layers.2"),
        ("emb_layers_1", "emb_layers.1"),
        ("out_layers_0", "out_layers.0"),
        ("out_layers_3", "out_layers.3"),
        ("out_0", "out.0"),
        ("out_2", "out.2"),
    ])
}

/// GroupNorm32: 32 groups, eps 1e-5.
const GROUPS: usize = 32;
const GROUP_NORM_EPS: f64 = 1e-5;

/// Hyper-parameters of the guided-diffusion UNet, with the reference's constructor names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UNetConfig {
    /// Side of the (square) latent, `image_size / 8`.
    pub image_size: usize,
    /// Input channels (4; 9 for inpainting, 8 for semantic synthesis).
    pub in_channels: usize,
    /// Base width (`--nf`).
    pub model_channels: usize,
    /// Output channels.
    pub out_channels: usize,
    /// Residual blocks per level.
    pub num_res_blocks: usize,
    /// Downsample factors (1, 2, 4, …) with self-attention (`--attn_resolutions` as LFM passes it).
    pub attention_resolutions: Vec<usize>,
    /// Dropout inside the residual blocks (training only).
    #[serde(default)]
    pub dropout: f64,
    /// Width multiplier per level.
    pub channel_mult: Vec<usize>,
    /// Learned 3×3 convolutions in Downsample/Upsample (`--resamp_with_conv`).
    #[serde(default = "yes")]
    pub conv_resample: bool,
    /// Number of classes of the label embedding (`None`: unconditional).
    #[serde(default)]
    pub num_classes: Option<usize>,
    /// Attention heads (when `num_head_channels` is unset).
    pub num_heads: usize,
    /// Channels per head; overrides `num_heads` when set.
    #[serde(default)]
    pub num_head_channels: Option<usize>,
    /// Heads in the decoder's attention (default: `num_heads`).
    #[serde(default)]
    pub num_heads_upsample: Option<usize>,
    /// FiLM conditioning `norm(h)·(1 + scale) + shift` instead of adding the embedding.
    #[serde(default = "yes")]
    pub use_scale_shift_norm: bool,
    /// Residual blocks (instead of Downsample/Upsample layers) change the resolution.
    #[serde(default)]
    pub resblock_updown: bool,
    /// qkv split before heads (`QKVAttention`) instead of heads before qkv (`QKVAttentionLegacy`).
    #[serde(default)]
    pub use_new_attention_order: bool,
}

fn yes() -> bool {
    true
}

impl UNetConfig {
    /// Width of the time embedding.
    pub fn time_embed_dim(&self) -> usize {
        4 * self.model_channels
    }

    fn heads(&self, channels: usize, upsample: bool) -> usize {
        match self.num_head_channels {
            Some(per_head) => channels / per_head,
            None if upsample => self.num_heads_upsample.unwrap_or(self.num_heads),
            None => self.num_heads,
        }
    }

    /// Checks the sizes fit together; the message names the offending flag.
    pub fn validate(&self) -> Result<(), String> {
        if self.channel_mult.is_empty() || self.channel_mult.contains(&0) {
            return Err(format!("ch_mult {:?} must be non-empty positive multipliers", self.channel_mult));
        }
        if self.model_channels == 0 || self.in_channels == 0 || self.out_channels == 0 || self.num_res_blocks == 0 {
            return Err("nf, num_in_channels, num_out_channels and num_res_blocks must be at least 1".into());
        }
        for &mult in &self.channel_mult {
            let c = mult * self.model_channels;
            if !c.is_multiple_of(GROUPS) {
                return Err(format!("nf × ch_mult = {c} is not divisible by GroupNorm32's 32 groups"));
            }
            let heads = self.heads(c, false).max(self.heads(c, true));
            if let Some(per_head) = self.num_head_channels {
                if per_head == 0 || !c.is_multiple_of(per_head) {
                    return Err(format!("{c} channels are not divisible by num_head_channels {per_head}"));
                }
            } else if heads == 0 || !c.is_multiple_of(self.heads(c, false)) || !c.is_multiple_of(self.heads(c, true)) {
                return Err(format!("{c} channels are not divisible by num_heads {}", self.num_heads));
            }
        }
        let factor = 1 << (self.channel_mult.len() - 1);
        if self.image_size == 0 || !self.image_size.is_multiple_of(factor) {
            return Err(format!(
                "the latent side {} is not divisible by 2^(levels − 1) = {factor} (image_size / 8 with {} levels)",
                self.image_size,
                self.channel_mult.len()
            ));
        }
        if self.num_classes == Some(0) {
            return Err("num_classes must be at least 1 (or absent for an unconditional model)".into());
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(format!("dropout {} must be in [0, 1)", self.dropout));
        }
        Ok(())
    }

    /// The network with the reference's initialisation (PyTorch defaults; zeroed output convolutions).
    pub fn init<B: Backend>(&self, device: &B::Device) -> UNetModel<B> {
        let emb = self.time_embed_dim();
        let mc = self.model_channels;
        let res = |c_in: usize, c_out: usize, updown: Resize| ResBlock::new(self, c_in, c_out, updown, device);
        let attn = |c: usize, upsample: bool| {
            Layer::Attention(AttentionBlock::new(c, self.heads(c, upsample), self.use_new_attention_order, device))
        };
        let mut ch = self.channel_mult[0] * mc;
        let input_ch = ch;
        let mut input_blocks =
            vec![vec![Layer::Conv(init::conv2d(ConvSpec::same(self.in_channels, ch, 3), Init::TorchDefault, device))]];
        let mut chans = vec![ch];
        let mut ds = 1;
        for (level, &mult) in self.channel_mult.iter().enumerate() {
            for _ in 0..self.num_res_blocks {
                let mut layers = vec![Layer::Res(res(ch, mult * mc, Resize::None))];
                ch = mult * mc;
                if self.attention_resolutions.contains(&ds) {
                    layers.push(attn(ch, false));
                }
                input_blocks.push(layers);
                chans.push(ch);
            }
            if level + 1 != self.channel_mult.len() {
                input_blocks.push(vec![if self.resblock_updown {
                    Layer::Res(res(ch, ch, Resize::Down))
                } else {
                    Layer::Down(Downsample::new(ch, self.conv_resample, device))
                }]);
                chans.push(ch);
                ds *= 2;
            }
        }
        let middle_block =
            vec![Layer::Res(res(ch, ch, Resize::None)), attn(ch, false), Layer::Res(res(ch, ch, Resize::None))];
        let mut output_blocks = Vec::new();
        for (level, &mult) in self.channel_mult.iter().enumerate().rev() {
            for i in 0..=self.num_res_blocks {
                let skip = chans.pop().expect("one skip per input block");
                let mut layers = vec![Layer::Res(res(ch + skip, mc * mult, Resize::None))];
                ch = mc * mult;
                if self.attention_resolutions.contains(&ds) {
                    layers.push(attn(ch, true));
                }
                if level > 0 && i == self.num_res_blocks {
                    layers.push(if self.resblock_updown {
                        Layer::Res(res(ch, ch, Resize::Up))
                    } else {
                        Layer::Up(Upsample::new(ch, self.conv_resample, device))
                    });
                    ds /= 2;
                }
                output_blocks.push(layers);
            }
        }
        UNetModel {
            time_embed_0: init::linear(mc, emb, Init::TorchDefault, device),
            time_embed_2: init::linear(emb, emb, Init::TorchDefault, device),
            label_emb: self.num_classes.map(|n| init::embedding(n, emb, Init::Normal(1.0), device)),
            input_blocks,
            middle_block,
            output_blocks,
            out_0: GroupNorm::new(ch, GROUPS, GROUP_NORM_EPS, device),
            out_2: init::conv2d(ConvSpec::same(input_ch, self.out_channels, 3), Init::Zeros, device),
            config: self.clone(),
        }
    }
}

/// How a residual block changes the resolution (`resblock_updown`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resize {
    /// Same resolution.
    None,
    /// Nearest ×2.
    Up,
    /// 2×2 average pooling.
    Down,
}

impl Resize {
    fn apply<B: Backend>(self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        match self {
            Self::None => x,
            Self::Up => upsample_nearest_2x(x),
            Self::Down => avg_pool_2x(x),
        }
    }
}

/// The reference's `ResBlock`.
#[derive(Module, Debug)]
pub struct ResBlock<B: Backend> {
    /// `in_layers.0`: GroupNorm.
    pub in_layers_0: GroupNorm<B>,
    /// `in_layers.2`: 3×3 convolution.
    pub in_layers_2: Conv2d<B>,
    /// `emb_layers.1`: the embedding projection (after a SiLU).
    pub emb_layers_1: Linear<B>,
    /// `out_layers.0`: GroupNorm.
    pub out_layers_0: GroupNorm<B>,
    /// Dropout before the last convolution.
    pub dropout: Dropout,
    /// `out_layers.3`: the zero-initialised 3×3 convolution.
    pub out_layers_3: Conv2d<B>,
    /// A 1×1 convolution when the channel count changes.
    pub skip_connection: Option<Conv2d<B>>,
    /// Resolution change inside the block.
    pub resize: Resize,
    /// FiLM conditioning.
    pub use_scale_shift_norm: bool,
}

impl<B: Backend> ResBlock<B> {
    fn new(config: &UNetConfig, c_in: usize, c_out: usize, resize: Resize, device: &B::Device) -> Self {
        let emb_out = if config.use_scale_shift_norm { 2 * c_out } else { c_out };
        Self {
            in_layers_0: GroupNorm::new(c_in, GROUPS, GROUP_NORM_EPS, device),
            in_layers_2: init::conv2d(ConvSpec::same(c_in, c_out, 3), Init::TorchDefault, device),
            emb_layers_1: init::linear(config.time_embed_dim(), emb_out, Init::TorchDefault, device),
            out_layers_0: GroupNorm::new(c_out, GROUPS, GROUP_NORM_EPS, device),
            dropout: DropoutConfig::new(config.dropout).init(),
            out_layers_3: init::conv2d(ConvSpec::same(c_out, c_out, 3), Init::Zeros, device),
            skip_connection: (c_in != c_out)
                .then(|| init::conv2d(ConvSpec::same(c_in, c_out, 1), Init::TorchDefault, device)),
            resize,
            use_scale_shift_norm: config.use_scale_shift_norm,
        }
    }

    /// `skip(x) + out_layers(in_layers(x) ⊕ emb)`.
    pub fn forward(&self, x: Tensor<B, 4>, emb: Tensor<B, 2>) -> Tensor<B, 4> {
        let h = self.in_layers_0.forward_activated(x.clone(), Activation::Silu);
        let (h, x) = (self.resize.apply(h), self.resize.apply(x));
        let h = self.in_layers_2.forward(h);
        let emb_out = self.emb_layers_1.forward(silu(emb));
        let h = if self.use_scale_shift_norm {
            let c = emb_out.dims()[1] / 2;
            let (scale, shift) = (emb_out.clone().narrow(1, 0, c), emb_out.narrow(1, c, c));
            self.out_layers_0.forward_modulated(h, scale, shift, Activation::Silu)
        } else {
            let emb_out = emb_out.unsqueeze_dim::<3>(2).unsqueeze_dim::<4>(3);
            self.out_layers_0.forward_activated(h + emb_out, Activation::Silu)
        };
        let h = self.out_layers_3.forward(self.dropout.forward(h));
        match &self.skip_connection {
            Some(conv) => conv.forward(x) + h,
            None => x + h,
        }
    }
}

/// A 1-D convolution with kernel 1 (`conv_nd(1, …, 1)`), weight `[out, in, 1]`, computed as a matmul.
#[derive(Module, Debug)]
pub struct Conv1x1<B: Backend> {
    /// `[out, in, 1]`.
    pub weight: Param<Tensor<B, 3>>,
    /// `[out]`.
    pub bias: Param<Tensor<B, 1>>,
}

impl<B: Backend> Conv1x1<B> {
    fn new(c_in: usize, c_out: usize, init: Init, device: &B::Device) -> Self {
        let conv = init::conv2d(ConvSpec::same(c_in, c_out, 1), init, device);
        // Detached: a reshaped value is not a leaf, and an autodiff backend only tracks leaves as parameters.
        Self {
            weight: Param::from_tensor(conv.weight.val().reshape([c_out, c_in, 1]).detach()),
            bias: Param::from_tensor(conv.bias.expect("conv2d with bias").val().detach()),
        }
    }

    /// `[N, in, T] → [N, out, T]`.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [c_out, c_in, _] = self.weight.dims();
        let w = self.weight.val().reshape([1, c_out, c_in]);
        lfm_kernels::matmul::matmul(w, x) + self.bias.val().reshape([1, c_out, 1])
    }
}

/// Self-attention over the pixels of a feature map (`AttentionBlock`).
#[derive(Module, Debug)]
pub struct AttentionBlock<B: Backend> {
    /// GroupNorm before qkv.
    pub norm: GroupNorm<B>,
    /// The qkv projection `[3C, C, 1]`.
    pub qkv: Conv1x1<B>,
    /// The zero-initialised output projection.
    pub proj_out: Conv1x1<B>,
    /// Heads.
    pub num_heads: usize,
    /// `[q | k | v]` over all heads (new order) rather than per head (legacy).
    pub new_order: bool,
}

impl<B: Backend> AttentionBlock<B> {
    fn new(channels: usize, num_heads: usize, new_order: bool, device: &B::Device) -> Self {
        Self {
            norm: GroupNorm::new(channels, GROUPS, GROUP_NORM_EPS, device),
            qkv: Conv1x1::new(channels, 3 * channels, Init::TorchDefault, device),
            proj_out: Conv1x1::new(channels, channels, Init::Zeros, device),
            num_heads,
            new_order,
        }
    }

    /// `x + proj_out(attention(qkv(norm(x))))`.
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let [n, c, height, width] = x.dims();
        let t = height * width;
        let x = x.reshape([n, c, t]);
        let qkv = self.qkv.forward(self.norm.forward(x.clone()));
        let heads = self.num_heads;
        let ch = c / heads;
        // Legacy: per head [q(ch), k(ch), v(ch)]; new order: [q (all heads) | k | v].
        let (qkv, axis) = if self.new_order {
            (qkv.reshape([n, 3, heads, ch, t]), 1)
        } else {
            (qkv.reshape([n, heads, 3, ch, t]), 2)
        };
        let part =
            |i: usize| -> Tensor<B, 4> { qkv.clone().narrow(axis, i, 1).reshape([n, heads, ch, t]).swap_dims(2, 3) };
        let a = attention(part(0), part(1), part(2));
        let a = a.swap_dims(2, 3).reshape([n, c, t]);
        (x + self.proj_out.forward(a)).reshape([n, c, height, width])
    }
}

/// Stride-2 3×3 convolution, or 2×2 average pooling without `conv_resample`.
#[derive(Module, Debug)]
pub struct Downsample<B: Backend> {
    /// `op`, the strided convolution.
    pub op: Option<Conv2d<B>>,
}

impl<B: Backend> Downsample<B> {
    fn new(channels: usize, use_conv: bool, device: &B::Device) -> Self {
        let spec = ConvSpec { c_in: channels, c_out: channels, kernel: 3, stride: 2, padding: 1, bias: true };
        Self { op: use_conv.then(|| init::conv2d(spec, Init::TorchDefault, device)) }
    }

    /// Halves the resolution.
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        match &self.op {
            Some(conv) => conv.forward(x),
            None => avg_pool_2x(x),
        }
    }
}

/// Nearest ×2, then a 3×3 convolution with `conv_resample`.
#[derive(Module, Debug)]
pub struct Upsample<B: Backend> {
    /// `conv`.
    pub conv: Option<Conv2d<B>>,
}

impl<B: Backend> Upsample<B> {
    fn new(channels: usize, use_conv: bool, device: &B::Device) -> Self {
        Self { conv: use_conv.then(|| init::conv2d(ConvSpec::same(channels, channels, 3), Init::TorchDefault, device)) }
    }

    /// Doubles the resolution.
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let x = upsample_nearest_2x(x);
        match &self.conv {
            Some(conv) => conv.forward(x),
            None => x,
        }
    }
}

/// One entry of a `TimestepEmbedSequential`.
#[derive(Module, Debug)]
// Built once per model; the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
pub enum Layer<B: Backend> {
    /// The input convolution.
    Conv(Conv2d<B>),
    /// A residual block (receives the embedding).
    Res(ResBlock<B>),
    /// Self-attention.
    Attention(AttentionBlock<B>),
    /// Downsampling.
    Down(Downsample<B>),
    /// Upsampling.
    Up(Upsample<B>),
}

impl<B: Backend> Layer<B> {
    fn forward(&self, x: Tensor<B, 4>, emb: &Tensor<B, 2>) -> Tensor<B, 4> {
        match self {
            Self::Conv(conv) => conv.forward(x),
            Self::Res(block) => block.forward(x, emb.clone()),
            Self::Attention(block) => block.forward(x),
            Self::Down(down) => down.forward(x),
            Self::Up(up) => up.forward(x),
        }
    }
}

fn sequential<B: Backend>(layers: &[Layer<B>], x: Tensor<B, 4>, emb: &Tensor<B, 2>) -> Tensor<B, 4> {
    layers.iter().fold(x, |x, layer| layer.forward(x, emb))
}

/// The guided-diffusion UNet velocity network.
#[derive(Module, Debug)]
pub struct UNetModel<B: Backend> {
    /// `time_embed.0`.
    pub time_embed_0: Linear<B>,
    /// `time_embed.2`.
    pub time_embed_2: Linear<B>,
    /// Class embedding added to the time embedding.
    pub label_emb: Option<Embedding<B>>,
    /// Encoder; each output is pushed on the skip stack.
    pub input_blocks: Vec<Vec<Layer<B>>>,
    /// Bottleneck.
    pub middle_block: Vec<Layer<B>>,
    /// Decoder; each input is concatenated with a popped skip.
    pub output_blocks: Vec<Vec<Layer<B>>>,
    /// `out.0`: GroupNorm.
    pub out_0: GroupNorm<B>,
    /// `out.2`: the zero-initialised output convolution.
    pub out_2: Conv2d<B>,
    /// The hyper-parameters.
    #[module(skip)]
    pub config: UNetConfig,
}

impl<B: Backend> UNetModel<B> {
    /// The time (and label) embedding `[N or 1, 4·nf]`.
    pub fn embedding(&self, t: Tensor<B, 1>, y: Option<Tensor<B, 1, Int>>) -> Tensor<B, 2> {
        // Computed in f32 as the reference does, then in the layers' precision.
        let freq = crate::nn::dtype::to_dtype(
            timestep_embedding(t, self.config.model_channels, 10000.0),
            self.time_embed_0.weight.val().dtype(),
        );
        let emb = self.time_embed_2.forward(self.time_embed_0.forward_activated(freq, Activation::Silu));
        match (&self.label_emb, y) {
            (Some(table), Some(y)) => emb + table.weight.val().select(0, y),
            _ => emb,
        }
    }

    /// `v = model(t, x, y)`: `t` is `[N]` or one value for the batch; `y` (`[N]`) only for class-conditional
    /// models (callers check presence with [`crate::models::VelocityModel::check_labels`]).
    pub fn forward(&self, t: Tensor<B, 1>, x: Tensor<B, 4>, y: Option<Tensor<B, 1, Int>>) -> Tensor<B, 4> {
        let emb = self.embedding(t, y);
        let mut skips = Vec::with_capacity(self.input_blocks.len());
        let mut h = x;
        for block in &self.input_blocks {
            h = sequential(block, h, &emb);
            skips.push(h.clone());
        }
        h = sequential(&self.middle_block, h, &emb);
        for block in &self.output_blocks {
            let skip = skips.pop().expect("one skip per output block");
            h = sequential(block, Tensor::cat(vec![h, skip], 1), &emb);
        }
        self.out_2.forward(self.out_0.forward_activated(h, Activation::Silu))
    }

    /// Builds the network of `config` and fills it from a state_dict (keys without `module.`).
    pub fn load(
        config: &UNetConfig,
        weights: &crate::checkpoint::TensorMap,
        device: &B::Device,
    ) -> Result<Self, crate::checkpoint::CheckpointError> {
        crate::checkpoint::apply_weights(config.init(device), weights, &unet_keys())
    }
}
