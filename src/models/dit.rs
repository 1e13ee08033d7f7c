//! DiT (Peebles & Xie) with LFM's `(t, x, y)` signature, `forward_with_cfg` and the S/B/L/XL × /2 /4 /8 sizes.
//!
//! Read top to bottom like the reference `models/DiT.py`: embedders, the adaLN-Zero block, the final layer, the
//! network, then the named sizes. Field names are the reference's attribute names, so checkpoint keys map one to
//! one; the Sequential indices Rust cannot spell are renamed in [`dit_keys`].

use burn::module::{Module, Param};
use burn::nn::Embedding;
use burn::tensor::{backend::Backend, Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::checkpoint::KeyMap;
use crate::nn::attention::packed_attention;
use crate::nn::embedding::{sincos_2d_table, timestep_embedding};
use crate::nn::init::{self, ConvSpec, Init};
use crate::nn::{add_gated, layer_norm_modulate, silu, Activation, Conv2d, Linear};

/// Renames between Burn field paths and LFM's DiT state_dict keys.
pub fn dit_keys() -> KeyMap {
    KeyMap::new(&[("mlp_0", "mlp.0"), ("mlp_2", "mlp.2"), ("ada_ln_modulation", "adaLN_modulation.1")])
}

/// Hyper-parameters of a DiT, with the reference's constructor names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DiTConfig {
    /// Side of the (square) latent, `image_size / f` (`img_resolution`).
    pub input_size: usize,
    /// Patch side.
    pub patch_size: usize,
    /// Latent channels.
    pub in_channels: usize,
    /// Token width.
    pub hidden_size: usize,
    /// Number of blocks.
    pub depth: usize,
    /// Attention heads.
    pub num_heads: usize,
    /// MLP width ÷ token width.
    pub mlp_ratio: f64,
    /// Number of classes (1 for LFM's unconditional runs).
    pub num_classes: usize,
    /// Probability of replacing a label by the null class in training; > 0 adds the null row used by CFG.
    pub label_dropout: f64,
    /// Predict a variance too (doubles the output channels); LFM always uses `false`.
    #[serde(default)]
    pub learn_sigma: bool,
}

/// The named sizes: (name, depth, hidden, heads, patch).
pub const DIT_SIZES: [(&str, usize, usize, usize, usize); 12] = [
    ("DiT-XL/2", 28, 1152, 16, 2),
    ("DiT-XL/4", 28, 1152, 16, 4),
    ("DiT-XL/8", 28, 1152, 16, 8),
    ("DiT-L/2", 24, 1024, 16, 2),
    ("DiT-L/4", 24, 1024, 16, 4),
    ("DiT-L/8", 24, 1024, 16, 8),
    ("DiT-B/2", 12, 768, 12, 2),
    ("DiT-B/4", 12, 768, 12, 4),
    ("DiT-B/8", 12, 768, 12, 8),
    ("DiT-S/2", 12, 384, 6, 2),
    ("DiT-S/4", 12, 384, 6, 4),
    ("DiT-S/8", 12, 384, 6, 8),
];

impl DiTConfig {
    /// A named size (`DiT-B/2`, …) on a latent of side `input_size` with `in_channels` channels.
    pub fn named(
        name: &str,
        input_size: usize,
        in_channels: usize,
        num_classes: usize,
        label_dropout: f64,
    ) -> Option<Self> {
        let (_, depth, hidden_size, num_heads, patch_size) = DIT_SIZES.iter().find(|s| s.0 == name)?;
        Some(Self {
            input_size,
            patch_size: *patch_size,
            in_channels,
            hidden_size: *hidden_size,
            depth: *depth,
            num_heads: *num_heads,
            mlp_ratio: 4.0,
            num_classes,
            label_dropout,
            learn_sigma: false,
        })
    }

    /// Output channels.
    pub fn out_channels(&self) -> usize {
        if self.learn_sigma {
            2 * self.in_channels
        } else {
            self.in_channels
        }
    }

    /// Rows of the label table: the classes plus a null row when label dropout is on.
    pub fn label_rows(&self) -> usize {
        self.num_classes + usize::from(self.label_dropout > 0.0)
    }

    /// Tokens per image.
    pub fn num_tokens(&self) -> usize {
        (self.input_size / self.patch_size).pow(2)
    }

    /// Checks the sizes fit together; the message names the offending flag.
    pub fn validate(&self) -> Result<(), String> {
        if self.patch_size == 0 || !self.input_size.is_multiple_of(self.patch_size) {
            return Err(format!(
                "the latent side {} is not divisible by the patch size {}",
                self.input_size, self.patch_size
            ));
        }
        if self.num_heads == 0 || !self.hidden_size.is_multiple_of(self.num_heads) {
            return Err(format!("hidden_size {} is not divisible by num_heads {}", self.hidden_size, self.num_heads));
        }
        if !self.hidden_size.is_multiple_of(4) {
            return Err(format!("hidden_size {} must be divisible by 4 (2-D sin-cos positions)", self.hidden_size));
        }
        if self.num_classes == 0 {
            return Err("num_classes must be at least 1 (LFM uses 1 for unconditional models)".into());
        }
        if self.depth == 0 || self.in_channels == 0 {
            return Err("depth and in_channels must be at least 1".into());
        }
        Ok(())
    }

    /// A DiT with the reference's initialisation (xavier linears, zeroed adaLN and output layers).
    pub fn init<B: Backend>(&self, device: &B::Device) -> DiT<B> {
        let d = self.hidden_size;
        let mlp_hidden = (d as f64 * self.mlp_ratio) as usize;
        let p = self.patch_size;
        let grid = self.input_size / p;
        let table = sincos_2d_table(d, grid);
        let pos_embed =
            Tensor::<B, 3>::from_data(TensorData::new(table, [1, grid * grid, d]).convert::<B::FloatElem>(), device);
        DiT {
            x_embedder: PatchEmbed {
                proj: init::conv2d(
                    ConvSpec { c_in: self.in_channels, c_out: d, kernel: p, stride: p, padding: 0, bias: true },
                    Init::XavierUniform,
                    device,
                ),
            },
            t_embedder: TimestepEmbedder {
                mlp_0: init::linear(FREQUENCY_EMBEDDING_SIZE, d, Init::Normal(0.02), device),
                mlp_2: init::linear(d, d, Init::Normal(0.02), device),
            },
            y_embedder: LabelEmbedder {
                embedding_table: init::embedding(self.label_rows(), d, Init::Normal(0.02), device),
            },
            pos_embed: Param::from_tensor(pos_embed).set_require_grad(false),
            blocks: (0..self.depth)
                .map(|_| DiTBlock {
                    attn: Attention {
                        qkv: init::linear(d, 3 * d, Init::XavierUniform, device),
                        proj: init::linear(d, d, Init::XavierUniform, device),
                        num_heads: self.num_heads,
                    },
                    mlp: Mlp {
                        fc1: init::linear(d, mlp_hidden, Init::XavierUniform, device),
                        fc2: init::linear(mlp_hidden, d, Init::XavierUniform, device),
                    },
                    ada_ln_modulation: init::linear(d, 6 * d, Init::Zeros, device),
                })
                .collect(),
            final_layer: FinalLayer {
                linear: init::linear(d, p * p * self.out_channels(), Init::Zeros, device),
                ada_ln_modulation: init::linear(d, 2 * d, Init::Zeros, device),
            },
            config: self.clone(),
        }
    }
}

/// Width of the sinusoidal time features.
pub const FREQUENCY_EMBEDDING_SIZE: usize = 256;

/// timm's `PatchEmbed`: a stride-`p` convolution, tokens in row-major order.
#[derive(Module, Debug)]
pub struct PatchEmbed<B: Backend> {
    /// The patchifying convolution.
    pub proj: Conv2d<B>,
}

impl<B: Backend> PatchEmbed<B> {
    /// `[N, C, H, W] → [N, T, D]`.
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 3> {
        self.proj.forward(x).flatten::<3>(2, 3).swap_dims(1, 2)
    }
}

/// Time `t ∈ [0, 1]` → sinusoid(256) → Linear, SiLU, Linear.
#[derive(Module, Debug)]
pub struct TimestepEmbedder<B: Backend> {
    /// `mlp.0`.
    pub mlp_0: Linear<B>,
    /// `mlp.2`.
    pub mlp_2: Linear<B>,
}

impl<B: Backend> TimestepEmbedder<B> {
    /// `[N] → [N, D]` (a one-element `t` gives one row that broadcasts over the batch).
    pub fn forward(&self, t: Tensor<B, 1>) -> Tensor<B, 2> {
        // Computed in f32 as the reference does, then in the layers' precision.
        let freq = crate::nn::dtype::to_dtype(
            timestep_embedding(t, FREQUENCY_EMBEDDING_SIZE, 10000.0),
            self.mlp_0.weight.val().dtype(),
        );
        self.mlp_2.forward(silu(self.mlp_0.forward(freq)))
    }
}

/// Class label → vector; the last row is the null class when label dropout is on (training drops labels on the
/// host: [`crate::train::batches::label_dropout`]).
#[derive(Module, Debug)]
pub struct LabelEmbedder<B: Backend> {
    /// The table.
    pub embedding_table: Embedding<B>,
}

impl<B: Backend> LabelEmbedder<B> {
    /// `[N] → [N, D]`.
    pub fn forward(&self, labels: Tensor<B, 1, Int>) -> Tensor<B, 2> {
        self.embedding_table.weight.val().select(0, labels)
    }
}

/// timm's `Attention` with a fused qkv projection laid out `[q | k | v] × heads × head_dim`.
#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    /// `qkv`.
    pub qkv: Linear<B>,
    /// `proj`.
    pub proj: Linear<B>,
    /// Heads.
    pub num_heads: usize,
}

impl<B: Backend> Attention<B> {
    /// `[N, T, D] → [N, T, D]`.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let qkv = self.qkv.forward(x);
        self.proj.forward(packed_attention(qkv, self.num_heads))
    }
}

/// timm's `Mlp` with the tanh-approximated GELU.
#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    /// `fc1`.
    pub fc1: Linear<B>,
    /// `fc2`.
    pub fc2: Linear<B>,
}

impl<B: Backend> Mlp<B> {
    /// `[N, T, D] → [N, T, D]`.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.fc2.forward(self.fc1.forward_activated(x, Activation::GeluTanh))
    }
}

/// Splits `[N, k·D]` into `k` chunks of `[N, D]`.
fn chunks<B: Backend, const K: usize>(x: Tensor<B, 2>) -> [Tensor<B, 2>; K] {
    let parts = x.chunk(K, 1);
    std::array::from_fn(|i| parts[i].clone())
}

/// A DiT block with adaLN-Zero conditioning.
#[derive(Module, Debug)]
pub struct DiTBlock<B: Backend> {
    /// Self-attention.
    pub attn: Attention<B>,
    /// Feed-forward.
    pub mlp: Mlp<B>,
    /// `adaLN_modulation.1` (after a SiLU): six modulation vectors.
    pub ada_ln_modulation: Linear<B>,
}

impl<B: Backend> DiTBlock<B> {
    /// `x + gate·attn(modulate(norm(x)))`, then the same with the MLP.
    pub fn forward(&self, x: Tensor<B, 3>, c: Tensor<B, 2>) -> Tensor<B, 3> {
        let [shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp] =
            chunks::<B, 6>(self.ada_ln_modulation.forward(silu(c)));
        let x = add_gated(x.clone(), gate_msa, self.attn.forward(layer_norm_modulate(x, shift_msa, scale_msa, 1e-6)));
        add_gated(x.clone(), gate_mlp, self.mlp.forward(layer_norm_modulate(x, shift_mlp, scale_mlp, 1e-6)))
    }
}

/// Final adaLN and the projection to patches.
#[derive(Module, Debug)]
pub struct FinalLayer<B: Backend> {
    /// `linear`.
    pub linear: Linear<B>,
    /// `adaLN_modulation.1`.
    pub ada_ln_modulation: Linear<B>,
}

impl<B: Backend> FinalLayer<B> {
    /// `[N, T, D] → [N, T, p²·C]`.
    pub fn forward(&self, x: Tensor<B, 3>, c: Tensor<B, 2>) -> Tensor<B, 3> {
        let [shift, scale] = chunks::<B, 2>(self.ada_ln_modulation.forward(silu(c)));
        self.linear.forward(layer_norm_modulate(x, shift, scale, 1e-6))
    }
}

/// The DiT velocity network.
#[derive(Module, Debug)]
pub struct DiT<B: Backend> {
    /// Patch embedding.
    pub x_embedder: PatchEmbed<B>,
    /// Time embedding.
    pub t_embedder: TimestepEmbedder<B>,
    /// Label embedding.
    pub y_embedder: LabelEmbedder<B>,
    /// The frozen 2-D sin-cos positions `[1, T, D]` (stored in the state_dict, never trained).
    pub pos_embed: Param<Tensor<B, 3>>,
    /// The transformer blocks.
    pub blocks: Vec<DiTBlock<B>>,
    /// Output layer.
    pub final_layer: FinalLayer<B>,
    /// The hyper-parameters.
    #[module(skip)]
    pub config: DiTConfig,
}

impl<B: Backend> DiT<B> {
    /// The label the reference uses when `y` is `None`: the last row of the table.
    pub fn default_label(&self) -> usize {
        self.config.label_rows() - 1
    }

    /// `v = model(t, x, y)`: `t` is `[N]` or one value for the whole batch, `x` is `[N, C, H, W]`, `y` is `[N]`
    /// (default: the last table row, as the reference).
    pub fn forward(&self, t: Tensor<B, 1>, x: Tensor<B, 4>, y: Option<Tensor<B, 1, Int>>) -> Tensor<B, 4> {
        let [n, _, h, w] = x.dims();
        let device = x.device();
        let y = y.unwrap_or_else(|| Tensor::full([n], self.default_label() as i64, &device));
        let tokens = self.x_embedder.forward(x) + self.pos_embed.val();
        let c = self.t_embedder.forward(t) + self.y_embedder.forward(y);
        let tokens = self.blocks.iter().fold(tokens, |x, block| block.forward(x, c.clone()));
        let patches = self.final_layer.forward(tokens, c);
        self.unpatchify(patches, h, w)
    }

    /// `[N, T, p·p·C]` (inner order p, p, C) → `[N, C, H, W]`.
    pub fn unpatchify(&self, x: Tensor<B, 3>, height: usize, width: usize) -> Tensor<B, 4> {
        let n = x.dims()[0];
        let p = self.config.patch_size;
        let c = self.config.out_channels();
        let (gh, gw) = (height / p, width / p);
        x.reshape([n, gh, gw, p, p, c]).permute([0, 5, 1, 3, 2, 4]).reshape([n, c, gh * p, gw * p])
    }

    /// Classifier-free guidance on the batch `x` (`n` samples, labels `y`): one pass over `[x; x]` with labels
    /// `[y; null]`, `v_u + s·(v_c − v_u)` on the first `in_channels` channels, then the conditional pass's other
    /// channels (learned σ). `t` is one time or one per sample. Needs the null row (label dropout > 0).
    pub fn guided(&self, t: Tensor<B, 1>, x: Tensor<B, 4>, y: Tensor<B, 1, Int>, cfg_scale: f64) -> Tensor<B, 4> {
        let n = x.dims()[0];
        let null = Tensor::full([n], self.config.num_classes as i64, &y.device());
        let out = self.forward(
            super::doubled_time(t, n),
            Tensor::cat(vec![x.clone(), x], 0),
            Some(Tensor::cat(vec![y, null], 0)),
        );
        let (c_in, c_out) = (self.config.in_channels, self.config.out_channels());
        let eps = super::cfg_guide(out.clone().narrow(1, 0, c_in), cfg_scale);
        match c_out > c_in {
            true => Tensor::cat(vec![eps, out.narrow(0, 0, n).narrow(1, c_in, c_out - c_in)], 1),
            false => eps,
        }
    }

    /// LFM's `forward_with_cfg`, kept for parity with the reference: the batch is `[x; x]` with labels
    /// `[y; y_null]`; the first half is evaluated twice (both label halves), `v_u + s·(v_c − v_u)` is formed on the
    /// first `in_channels` channels and returned for both halves (the other channels as each pass made them).
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
        let out = self.forward(t, Tensor::cat(vec![first.clone(), first], 0), Some(y));
        let (c_in, c_out) = (self.config.in_channels, self.config.out_channels());
        let eps = super::cfg_guide(out.clone().narrow(1, 0, c_in), cfg_scale);
        let eps = Tensor::cat(vec![eps.clone(), eps], 0);
        match c_out > c_in {
            true => Tensor::cat(vec![eps, out.narrow(1, c_in, c_out - c_in)], 1),
            false => eps,
        }
    }
}

impl<B: Backend> DiT<B> {
    /// Builds the network described by `config` and fills it from a state_dict (keys without `module.`).
    /// Fails with a precise report if any key is missing, unexpected or of the wrong shape.
    pub fn load(
        config: &DiTConfig,
        weights: &crate::checkpoint::TensorMap,
        device: &B::Device,
    ) -> Result<Self, crate::checkpoint::CheckpointError> {
        crate::checkpoint::apply_weights(config.init(device), weights, &dit_keys())
    }
}
