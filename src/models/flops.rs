//! Analytic forward-pass FLOP counts (2 per multiply-add of every convolution, linear layer and attention matmul;
//! normalisations and pointwise ops are left out, as is customary), for throughput figures.

use super::dit::{DiTConfig, FREQUENCY_EMBEDDING_SIZE};
use super::edm::EdmConfig;
use super::unet::UNetConfig;
use super::ModelConfig;

fn linear(d_in: usize, d_out: usize) -> f64 {
    2.0 * d_in as f64 * d_out as f64
}

fn conv(side: usize, c_in: usize, c_out: usize, kernel: usize) -> f64 {
    2.0 * (side * side) as f64 * (c_in * c_out * kernel * kernel) as f64
}

/// Self-attention over `tokens` tokens of width `c`: the qkv and output projections plus QKᵀ and AV.
fn attention(tokens: usize, c: usize) -> f64 {
    tokens as f64 * (linear(c, 3 * c) + linear(c, c)) + 2.0 * 2.0 * (tokens * tokens) as f64 * c as f64
}

impl DiTConfig {
    /// FLOPs of one forward pass of one sample.
    pub fn flops(&self) -> f64 {
        let (d, t, p) = (self.hidden_size, self.num_tokens(), self.patch_size);
        let mlp = (d as f64 * self.mlp_ratio) as usize;
        let embed = t as f64 * linear(self.in_channels * p * p, d) + linear(FREQUENCY_EMBEDDING_SIZE, d) + linear(d, d);
        let block = attention(t, d) + t as f64 * (linear(d, mlp) + linear(mlp, d)) + linear(d, 6 * d);
        let last = t as f64 * linear(d, p * p * self.out_channels()) + linear(d, 2 * d);
        embed + self.depth as f64 * block + last
    }
}

impl UNetConfig {
    /// FLOPs of one forward pass of one sample on a `side × side` latent.
    pub fn flops(&self, side: usize) -> f64 {
        let mc = self.model_channels;
        let emb = self.time_embed_dim();
        let res = |r: usize, c_in: usize, c_out: usize| {
            conv(r, c_in, c_out, 3)
                + conv(r, c_out, c_out, 3)
                + linear(emb, if self.use_scale_shift_norm { 2 * c_out } else { c_out })
                + if c_in != c_out { conv(r, c_in, c_out, 1) } else { 0.0 }
        };
        let resample = |r: usize, c: usize| if self.resblock_updown { res(r, c, c) } else { conv(r, c, c, 3) };
        let mut total = linear(mc, emb) + linear(emb, emb);
        let mut ch = self.channel_mult[0] * mc;
        total += conv(side, self.in_channels, ch, 3);
        let mut chans = vec![ch];
        let (mut ds, mut r) = (1, side);
        for (level, &mult) in self.channel_mult.iter().enumerate() {
            for _ in 0..self.num_res_blocks {
                total += res(r, ch, mult * mc);
                ch = mult * mc;
                if self.attention_resolutions.contains(&ds) {
                    total += attention(r * r, ch);
                }
                chans.push(ch);
            }
            if level + 1 != self.channel_mult.len() {
                total += if self.conv_resample || self.resblock_updown { resample(r / 2, ch) } else { 0.0 };
                chans.push(ch);
                ds *= 2;
                r /= 2;
            }
        }
        total += 2.0 * res(r, ch, ch) + attention(r * r, ch);
        for (level, &mult) in self.channel_mult.iter().enumerate().rev() {
            for i in 0..=self.num_res_blocks {
                let skip = chans.pop().unwrap_or(0);
                total += res(r, ch + skip, mc * mult);
                ch = mc * mult;
                if self.attention_resolutions.contains(&ds) {
                    total += attention(r * r, ch);
                }
                if level > 0 && i == self.num_res_blocks {
                    total += if self.conv_resample || self.resblock_updown { resample(2 * r, ch) } else { 0.0 };
                    ds /= 2;
                    r *= 2;
                }
            }
        }
        total + conv(side, ch, self.out_channels, 3)
    }
}

impl EdmConfig {
    /// FLOPs of one forward pass of one sample on its `img_resolution` latent.
    pub fn flops(&self) -> f64 {
        let emb = self.emb_channels();
        let mut total = linear(self.model_channels, emb) + linear(emb, emb) + linear(self.label_dim, emb);
        let model = self.init_shapes();
        for (side, block) in model.blocks {
            let (c_in, c_out, heads) = block;
            total += conv(side, c_in, c_out, 3) + conv(side, c_out, c_out, 3) + linear(emb, 2 * c_out);
            if c_in != c_out {
                total += conv(side, c_in, c_out, 1);
            }
            if heads > 0 {
                total += attention(side * side, c_out);
            }
        }
        total
            + conv(self.img_resolution, self.in_channels, model.first, 3)
            + conv(self.img_resolution, model.first, self.out_channels, 3)
    }
}

impl ModelConfig {
    /// FLOPs of one forward pass of one sample on the network's own latent size.
    pub fn flops(&self) -> f64 {
        match self {
            Self::Dit(c) => c.flops(),
            Self::GuidedUnet(c) => c.flops(c.image_size),
            Self::EdmUnet(c) => c.flops(),
        }
    }
}
