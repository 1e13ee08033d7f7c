//! EDM's `DhariwalUNet` (Karras et al.'s re-implementation of ADM), which LFM builds with `--model_type adm` without
//! `--use_origin_adm`.
//!
//! Read alongside `models/EDM.py`: the convolution with resampling, the `UNetBlock`, then the network. The encoder
//! and decoder are `ModuleDict`s keyed `{R}x{R}_conv|_down|_block{i}` and `{R}x{R}_in0|_in1|_up|_block{i}`; here
//! they are vectors, renamed to those keys by [`EdmConfig::keys`]. `attn_resolutions` are **resolutions** (16, 8, …).

use burn::module::{Module, Param};
use burn::nn::{Dropout, DropoutConfig};
use burn::tensor::{backend::Backend, Int, Tensor};
use serde::{Deserialize, Serialize};

use crate::checkpoint::KeyMap;
use crate::nn::attention::attention;
use crate::nn::embedding::timestep_embedding;
use crate::nn::init::{self, ConvSpec, Init};
use crate::nn::{avg_pool_2x, conv2d_padded, silu, upsample_nearest_2x, Activation, GroupNorm, Linear};

/// Channels per attention head (`channels_per_head=64` in every DhariwalUNet block).
pub const CHANNELS_PER_HEAD: usize = 64;
const GROUP_NORM_EPS: f64 = 1e-5;

/// EDM's GroupNorm: `min(32, C/4)` groups.
fn group_norm<B: Backend>(channels: usize, device: &B::Device) -> GroupNorm<B> {
    GroupNorm::new(channels, edm_groups(channels), GROUP_NORM_EPS, device)
}

fn edm_groups(channels: usize) -> usize {
    32.min(channels / 4)
}

/// Hyper-parameters of EDM's DhariwalUNet, with the reference's constructor names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EdmConfig {
    /// Side of the (square) latent, `image_size / f`.
    pub img_resolution: usize,
    /// Input channels.
    pub in_channels: usize,
    /// Output channels.
    pub out_channels: usize,
    /// Number of classes of the one-hot label input (0: unconditional).
    #[serde(default)]
    pub label_dim: usize,
    /// Base width (`--nf`).
    pub model_channels: usize,
    /// Width multiplier per level.
    pub channel_mult: Vec<usize>,
    /// Embedding width ÷ `model_channels`.
    #[serde(default = "four")]
    pub channel_mult_emb: usize,
    /// Residual blocks per level (`--num_res_blocks`).
    pub num_blocks: usize,
    /// Feature-map resolutions with self-attention.
    pub attn_resolutions: Vec<usize>,
    /// Dropout inside the blocks (training only).
    #[serde(default)]
    pub dropout: f64,
    /// Probability of zeroing the label in training (classifier-free guidance).
    #[serde(default)]
    pub label_dropout: f64,
}

fn four() -> usize {
    4
}

/// What each encoder entry is, in `ModuleDict` order.
#[derive(Debug, Clone, PartialEq)]
enum EncSpec {
    Conv { c_in: usize, c_out: usize },
    Block(BlockSpec),
}

/// The block geometry FLOP counts need.
pub(crate) struct EdmShapes {
    /// Width of the first level.
    pub first: usize,
    /// (output side, (input channels, output channels, heads)) of every block.
    pub blocks: Vec<(usize, (usize, usize, usize))>,
}

/// The encoder and decoder entries with their `ModuleDict` keys.
type Layout = (Vec<(String, EncSpec)>, Vec<(String, BlockSpec)>);

/// One `UNetBlock`'s geometry.
#[derive(Debug, Clone, Copy, PartialEq)]
struct BlockSpec {
    /// Side of the block's output.
    res: usize,
    c_in: usize,
    c_out: usize,
    resample: Resample,
    attention: bool,
}

impl EdmConfig {
    /// Width of the embedding vector.
    pub fn emb_channels(&self) -> usize {
        self.model_channels * self.channel_mult_emb
    }

    /// The encoder and decoder as the reference's constructor lays them out: (key, spec).
    fn layout(&self) -> Layout {
        let mc = self.model_channels;
        let block = |res, c_in, c_out, resample, attention| BlockSpec { res, c_in, c_out, resample, attention };
        let mut enc = Vec::new();
        let mut cout = self.in_channels;
        for (level, &mult) in self.channel_mult.iter().enumerate() {
            let res = self.img_resolution >> level;
            if level == 0 {
                let cin = cout;
                cout = mc * mult;
                enc.push((format!("{res}x{res}_conv"), EncSpec::Conv { c_in: cin, c_out: cout }));
            } else {
                enc.push((format!("{res}x{res}_down"), EncSpec::Block(block(res, cout, cout, Resample::Down, false))));
            }
            for idx in 0..self.num_blocks {
                let cin = cout;
                cout = mc * mult;
                let attn = self.attn_resolutions.contains(&res);
                enc.push((
                    format!("{res}x{res}_block{idx}"),
                    EncSpec::Block(block(res, cin, cout, Resample::None, attn)),
                ));
            }
        }
        let mut skips: Vec<usize> = enc
            .iter()
            .map(|(_, spec)| match spec {
                EncSpec::Conv { c_out, .. } => *c_out,
                EncSpec::Block(b) => b.c_out,
            })
            .collect();
        let mut dec = Vec::new();
        for (level, &mult) in self.channel_mult.iter().enumerate().rev() {
            let res = self.img_resolution >> level;
            if level + 1 == self.channel_mult.len() {
                dec.push((format!("{res}x{res}_in0"), block(res, cout, cout, Resample::None, true)));
                dec.push((format!("{res}x{res}_in1"), block(res, cout, cout, Resample::None, false)));
            } else {
                dec.push((format!("{res}x{res}_up"), block(res, cout, cout, Resample::Up, false)));
            }
            for idx in 0..=self.num_blocks {
                let cin = cout + skips.pop().expect("one skip per encoder entry");
                cout = mc * mult;
                let attn = self.attn_resolutions.contains(&res);
                dec.push((format!("{res}x{res}_block{idx}"), block(res, cin, cout, Resample::None, attn)));
            }
        }
        (enc, dec)
    }

    /// Burn field paths → the reference's `ModuleDict` keys; the `resample_filter` buffers are recomputed, not read.
    pub fn keys(&self) -> KeyMap {
        let (enc, dec) = self.layout();
        let mut keys = KeyMap::default().ignoring(&["resample_filter"]);
        for (i, (name, _)) in enc.iter().enumerate() {
            keys = keys.rename(format!("enc.{i}"), format!("enc.{name}"));
        }
        for (i, (name, _)) in dec.iter().enumerate() {
            keys = keys.rename(format!("dec.{i}"), format!("dec.{name}"));
        }
        keys
    }

    /// Every block as (output side, (input channels, output channels, heads)), and the first level's width.
    pub(crate) fn init_shapes(&self) -> EdmShapes {
        let (enc, dec) = self.layout();
        let heads = |b: &BlockSpec| if b.attention { b.c_out / CHANNELS_PER_HEAD } else { 0 };
        let blocks = enc
            .iter()
            .filter_map(|(_, s)| if let EncSpec::Block(b) = s { Some(*b) } else { None })
            .chain(dec.iter().map(|(_, b)| *b))
            .map(|b| (b.res, (b.c_in, b.c_out, heads(&b))))
            .collect();
        EdmShapes { first: self.model_channels * self.channel_mult[0], blocks }
    }

    /// Checks the sizes fit together; the message names the offending flag.
    pub fn validate(&self) -> Result<(), String> {
        if self.channel_mult.is_empty() || self.channel_mult.contains(&0) {
            return Err(format!("ch_mult {:?} must be non-empty positive multipliers", self.channel_mult));
        }
        if self.model_channels == 0 || self.in_channels == 0 || self.out_channels == 0 || self.num_blocks == 0 {
            return Err("nf, num_in_channels, num_out_channels and num_res_blocks must be at least 1".into());
        }
        let factor = 1 << (self.channel_mult.len() - 1);
        if self.img_resolution == 0 || !self.img_resolution.is_multiple_of(factor) {
            return Err(format!(
                "the latent side {} is not divisible by 2^(levels − 1) = {factor} ({} levels)",
                self.img_resolution,
                self.channel_mult.len()
            ));
        }
        let (enc, dec) = self.layout();
        let mut channels: Vec<usize> = dec.iter().flat_map(|(_, b)| [b.c_in, b.c_out]).collect();
        channels.extend(enc.iter().filter_map(|(_, s)| if let EncSpec::Block(b) = s { Some(b.c_in) } else { None }));
        for c in channels {
            let groups = edm_groups(c);
            if groups == 0 || !c.is_multiple_of(groups) {
                return Err(format!("{c} channels cannot be split into EDM's min(32, C/4) = {groups} norm groups"));
            }
        }
        if !(0.0..1.0).contains(&self.dropout) || !(0.0..1.0).contains(&self.label_dropout) {
            return Err("dropout and label_dropout must be in [0, 1)".into());
        }
        Ok(())
    }

    /// The network with EDM's initialisation (kaiming-uniform·√(1/3), zeroed output convolutions).
    pub fn init<B: Backend>(&self, device: &B::Device) -> EdmUNet<B> {
        let emb = self.emb_channels();
        let (enc, dec) = self.layout();
        let block = |spec: BlockSpec| UNetBlock::new(spec, emb, self.dropout, device);
        let out_c = self.model_channels * self.channel_mult[0];
        EdmUNet {
            map_layer0: init::linear(self.model_channels, emb, Init::TorchDefault, device),
            map_layer1: init::linear(emb, emb, Init::TorchDefault, device),
            map_label: (self.label_dim > 0)
                .then(|| init::linear_no_bias(self.label_dim, emb, Init::Normal(1.0), device)),
            enc: enc
                .into_iter()
                .map(|(_, spec)| match spec {
                    EncSpec::Conv { c_in, c_out } => {
                        EncLayer::Conv(EdmConv::new(c_in, c_out, 3, Resample::None, Init::TorchDefault, device))
                    }
                    EncSpec::Block(b) => EncLayer::Block(block(b)),
                })
                .collect(),
            dec: dec.into_iter().map(|(_, spec)| block(spec)).collect(),
            out_norm: group_norm(out_c, device),
            out_conv: EdmConv::new(out_c, self.out_channels, 3, Resample::None, Init::Zeros, device),
            config: self.clone(),
        }
    }
}

/// The resampling an EDM convolution applies before its kernel (the `[1, 1]` filter).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resample {
    /// None.
    None,
    /// Nearest ×2 (the transposed `[1, 1]` filter).
    Up,
    /// 2×2 average (the `[1, 1]` filter, stride 2).
    Down,
}

/// EDM's `Conv2d`: optional resampling, then an optional `k×k` convolution ("same" padding) with bias.
#[derive(Module, Debug)]
pub struct EdmConv<B: Backend> {
    /// `[out, in, k, k]`; absent for a weightless resample (a skip path that keeps the channel count).
    pub weight: Option<Param<Tensor<B, 4>>>,
    /// `[out]`.
    pub bias: Option<Param<Tensor<B, 1>>>,
    /// Resampling before the kernel.
    pub resample: Resample,
}

impl<B: Backend> EdmConv<B> {
    fn new(c_in: usize, c_out: usize, kernel: usize, resample: Resample, init: Init, device: &B::Device) -> Self {
        if kernel == 0 {
            return Self { weight: None, bias: None, resample };
        }
        let conv = init::conv2d(ConvSpec::same(c_in, c_out, kernel), init, device);
        Self { weight: Some(conv.weight), bias: conv.bias, resample }
    }

    /// Resample, then convolve.
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let x = match self.resample {
            Resample::None => x,
            Resample::Up => upsample_nearest_2x(x),
            Resample::Down => avg_pool_2x(x),
        };
        match &self.weight {
            Some(w) => {
                let pad = w.dims()[3] / 2;
                conv2d_padded(x, w.val(), self.bias.as_ref().map(|b| b.val()), 1, [pad, pad], Activation::None)
            }
            None => x,
        }
    }
}

/// EDM's `UNetBlock` as DhariwalUNet configures it (adaptive scale, skip_scale 1, heads = C/64).
#[derive(Module, Debug)]
pub struct UNetBlock<B: Backend> {
    /// GroupNorm on the input.
    pub norm0: GroupNorm<B>,
    /// 3×3 convolution (with the block's resampling).
    pub conv0: EdmConv<B>,
    /// Embedding → (scale, shift).
    pub affine: Linear<B>,
    /// GroupNorm after conv0.
    pub norm1: GroupNorm<B>,
    /// Dropout before conv1.
    pub dropout: Dropout,
    /// The zero-initialised 3×3 convolution.
    pub conv1: EdmConv<B>,
    /// Skip path when the channels or the resolution change.
    pub skip: Option<EdmConv<B>>,
    /// GroupNorm before qkv (attention blocks).
    pub norm2: Option<GroupNorm<B>>,
    /// 1×1 qkv convolution, channels interleaved per head as `[C/heads, 3]`.
    pub qkv: Option<EdmConv<B>>,
    /// Zero-initialised 1×1 output projection.
    pub proj: Option<EdmConv<B>>,
    /// Attention heads (0: no attention).
    pub num_heads: usize,
    /// Input channels (the decoder concatenates a skip when the incoming width differs).
    pub in_channels: usize,
}

impl<B: Backend> UNetBlock<B> {
    fn new(spec: BlockSpec, emb_channels: usize, dropout: f64, device: &B::Device) -> Self {
        let BlockSpec { c_in, c_out, resample, attention, .. } = spec;
        // Heads round down: a block narrower than 64 channels gets no attention, as in the reference.
        let num_heads = if attention { c_out / CHANNELS_PER_HEAD } else { 0 };
        let conv = |ci, co, k, r, init| EdmConv::new(ci, co, k, r, init, device);
        let skip = (c_in != c_out || resample != Resample::None)
            .then(|| conv(c_in, c_out, if c_in != c_out { 1 } else { 0 }, resample, Init::TorchDefault));
        Self {
            norm0: group_norm(c_in, device),
            conv0: conv(c_in, c_out, 3, resample, Init::TorchDefault),
            affine: init::linear(emb_channels, 2 * c_out, Init::TorchDefault, device),
            norm1: group_norm(c_out, device),
            dropout: DropoutConfig::new(dropout).init(),
            conv1: conv(c_out, c_out, 3, Resample::None, Init::Zeros),
            skip,
            norm2: (num_heads > 0).then(|| group_norm(c_out, device)),
            qkv: (num_heads > 0).then(|| conv(c_out, 3 * c_out, 1, Resample::None, Init::TorchDefault)),
            proj: (num_heads > 0).then(|| conv(c_out, c_out, 1, Resample::None, Init::Zeros)),
            num_heads,
            in_channels: c_in,
        }
    }

    /// The residual block, then (if configured) self-attention.
    pub fn forward(&self, x: Tensor<B, 4>, emb: Tensor<B, 2>) -> Tensor<B, 4> {
        let orig = x.clone();
        let x = self.conv0.forward(self.norm0.forward_activated(x, Activation::Silu));
        let params = self.affine.forward(emb);
        let c = params.dims()[1] / 2;
        let (scale, shift) = (params.clone().narrow(1, 0, c), params.narrow(1, c, c));
        let x = self.norm1.forward_modulated(x, scale, shift, Activation::Silu);
        let x = self.conv1.forward(self.dropout.forward(x));
        let x = x + match &self.skip {
            Some(skip) => skip.forward(orig),
            None => orig,
        };
        match (&self.norm2, &self.qkv, &self.proj) {
            (Some(norm), Some(qkv), Some(proj)) => {
                let [n, c, h, w] = x.dims();
                let (heads, t) = (self.num_heads, h * w);
                let ch = c / heads;
                // Interleaved: output channel = (head, channel-in-head, q|k|v).
                let qkv = qkv.forward(norm.forward(x.clone())).reshape([n, heads, ch, 3, t]);
                let part = |i: usize| -> Tensor<B, 4> {
                    qkv.clone().narrow(3, i, 1).reshape([n, heads, ch, t]).swap_dims(2, 3)
                };
                let a = attention(part(0), part(1), part(2)).swap_dims(2, 3).reshape([n, c, h, w]);
                proj.forward(a) + x
            }
            _ => x,
        }
    }
}

/// An encoder entry: the input convolution or a block.
#[derive(Module, Debug)]
// Built once per model; the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
pub enum EncLayer<B: Backend> {
    /// `{R}x{R}_conv`.
    Conv(EdmConv<B>),
    /// `{R}x{R}_down` or `_block{i}`.
    Block(UNetBlock<B>),
}

/// EDM's DhariwalUNet velocity network.
#[derive(Module, Debug)]
pub struct EdmUNet<B: Backend> {
    /// Noise embedding → embedding width.
    pub map_layer0: Linear<B>,
    /// Second mapping layer.
    pub map_layer1: Linear<B>,
    /// One-hot label → embedding (no bias).
    pub map_label: Option<Linear<B>>,
    /// Encoder, in `ModuleDict` order; every output is a skip.
    pub enc: Vec<EncLayer<B>>,
    /// Decoder, in `ModuleDict` order.
    pub dec: Vec<UNetBlock<B>>,
    /// Final GroupNorm.
    pub out_norm: GroupNorm<B>,
    /// Zero-initialised output convolution.
    pub out_conv: EdmConv<B>,
    /// The hyper-parameters.
    #[module(skip)]
    pub config: EdmConfig,
}

impl<B: Backend> EdmUNet<B> {
    /// The embedding `silu(map_layer1(silu(map_layer0(pos(t)))) + map_label(one_hot(y)))`; with `drop_half_label`
    /// the second half of the batch gets no label term (LFM's CFG).
    pub fn embedding(&self, t: Tensor<B, 1>, y: Option<Tensor<B, 1, Int>>, drop_half_label: bool) -> Tensor<B, 2> {
        // Computed in f32 as the reference does, then in the layers' precision.
        let noise = crate::nn::dtype::to_dtype(
            timestep_embedding(t, self.config.model_channels, 10000.0),
            self.map_layer0.weight.val().dtype(),
        );
        let emb = self.map_layer1.forward(self.map_layer0.forward_activated(noise, Activation::Silu));
        let emb = match (&self.map_label, y) {
            (Some(map_label), Some(y)) => {
                let n = y.dims()[0];
                // map_label(one_hot(y)) is the row y of the (transposed) weight.
                let mut label = map_label.weight.val().select(0, y);
                if drop_half_label {
                    let keep = n / 2;
                    let zeros = crate::nn::dtype::to_dtype(
                        Tensor::<B, 2>::zeros([n - keep, label.dims()[1]], &label.device()),
                        label.dtype(),
                    );
                    label = Tensor::cat(vec![label.narrow(0, 0, keep), zeros], 0);
                }
                emb + label
            }
            _ => emb,
        };
        silu(emb)
    }

    /// `v = model(t, x, y)`: `t` is `[N]` or one value for the batch, `y` (`[N]`) for class-conditional models.
    pub fn forward(&self, t: Tensor<B, 1>, x: Tensor<B, 4>, y: Option<Tensor<B, 1, Int>>) -> Tensor<B, 4> {
        self.forward_inner(t, x, y, false)
    }

    fn forward_inner(
        &self,
        t: Tensor<B, 1>,
        x: Tensor<B, 4>,
        y: Option<Tensor<B, 1, Int>>,
        drop_half_label: bool,
    ) -> Tensor<B, 4> {
        let emb = self.embedding(t, y, drop_half_label);
        let mut skips = Vec::with_capacity(self.enc.len());
        let mut x = x;
        for layer in &self.enc {
            x = match layer {
                EncLayer::Conv(conv) => conv.forward(x),
                EncLayer::Block(block) => block.forward(x, emb.clone()),
            };
            skips.push(x.clone());
        }
        for block in &self.dec {
            if x.dims()[1] != block.in_channels {
                let skip = skips.pop().expect("a skip for every widening decoder block");
                x = Tensor::cat(vec![x, skip], 1);
            }
            x = block.forward(x, emb.clone());
        }
        self.out_conv.forward(self.out_norm.forward_activated(x, Activation::Silu))
    }

    /// Classifier-free guidance on the batch `x` (`n` samples, labels `y`): one pass over `[x; x]`, the second half
    /// without its label term (its one-hot zeroed), and `v_u + s·(v_c − v_u)`. `t` is one time or one per sample.
    pub fn guided(&self, t: Tensor<B, 1>, x: Tensor<B, 4>, y: Tensor<B, 1, Int>, cfg_scale: f64) -> Tensor<B, 4> {
        let n = x.dims()[0];
        let doubled = Tensor::cat(vec![x.clone(), x], 0);
        let out =
            self.forward_inner(super::doubled_time(t, n), doubled, Some(Tensor::cat(vec![y.clone(), y], 0)), true);
        super::cfg_guide(out, cfg_scale)
    }

    /// LFM's `forward_with_cfg` for EDM, kept for parity with the reference: the first half of `[x; x]` is
    /// evaluated with its labels and with no label term; `v_u + s·(v_c − v_u)` is returned for both halves.
    /// Sampling uses [`Self::guided`].
    pub fn forward_with_cfg(
        &self,
        t: Tensor<B, 1>,
        x: Tensor<B, 4>,
        y: Tensor<B, 1, Int>,
        cfg_scale: f64,
    ) -> Tensor<B, 4> {
        let half = x.dims()[0] / 2;
        let first = x.narrow(0, 0, half);
        let out = self.forward_inner(t, Tensor::cat(vec![first.clone(), first], 0), Some(y), true);
        let guided = super::cfg_guide(out, cfg_scale);
        Tensor::cat(vec![guided.clone(), guided], 0)
    }

    /// Builds the network of `config` and fills it from a state_dict (keys without `module.`).
    pub fn load(
        config: &EdmConfig,
        weights: &crate::checkpoint::TensorMap,
        device: &B::Device,
    ) -> Result<Self, crate::checkpoint::CheckpointError> {
        crate::checkpoint::apply_weights(config.init(device), weights, &config.keys())
    }
}
