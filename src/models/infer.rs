//! Inferring a network's configuration from the names and shapes of its weights, where they determine it.

use super::dit::{DiTConfig, DIT_SIZES};
use super::edm::EdmConfig;
use super::unet::UNetConfig;
use crate::checkpoint::TensorMap;

fn shape<'a>(weights: &'a TensorMap, key: &str) -> Result<&'a [usize], String> {
    weights.get(key).map(|t| t.shape.as_slice()).ok_or_else(|| format!("the checkpoint has no `{key}`"))
}

/// The largest index `i` of keys `{prefix}{i}.…`, plus one.
fn count_indexed(weights: &TensorMap, prefix: &str) -> usize {
    weights
        .keys()
        .filter_map(|k| k.strip_prefix(prefix)?.split('.').next()?.parse::<usize>().ok())
        .max()
        .map_or(0, |m| m + 1)
}

pub(super) fn infer_dit(w: &TensorMap) -> Result<DiTConfig, String> {
    let &[hidden, in_channels, p, _] = shape(w, "x_embedder.proj.weight")? else {
        return Err("x_embedder.proj.weight is not 4-D".into());
    };
    let &[_, tokens, _] = shape(w, "pos_embed")? else { return Err("pos_embed is not 3-D".into()) };
    let grid = (tokens as f64).sqrt().round() as usize;
    if grid * grid != tokens {
        return Err(format!("pos_embed has {tokens} tokens, not a square grid"));
    }
    let depth = count_indexed(w, "blocks.");
    let &[mlp_hidden, _] = shape(w, "blocks.0.mlp.fc1.weight")? else { return Err("fc1 is not 2-D".into()) };
    let &[rows, _] = shape(w, "y_embedder.embedding_table.weight")? else {
        return Err("label table is not 2-D".into());
    };
    let &[out, _] = shape(w, "final_layer.linear.weight")? else { return Err("final linear is not 2-D".into()) };
    // Heads leave no trace in the weights; the named sizes fix them.
    let num_heads = DIT_SIZES.iter().find(|s| s.2 == hidden).map(|s| s.3).ok_or_else(|| {
        format!(
            "hidden size {hidden} is not one of the named DiT sizes, so the number of heads is unknown; pass --config"
        )
    })?;
    // A table with more than one row has the null class as its last row (label dropout was on).
    let (num_classes, label_dropout) = if rows > 1 { (rows - 1, 0.1) } else { (1, 0.0) };
    Ok(DiTConfig {
        input_size: grid * p,
        patch_size: p,
        in_channels,
        hidden_size: hidden,
        depth,
        num_heads,
        mlp_ratio: mlp_hidden as f64 / hidden as f64,
        num_classes,
        label_dropout,
        learn_sigma: out == 2 * p * p * in_channels,
    })
}

/// The guided UNet's structure follows from its keys; the latent size, the heads and the attention order do not,
/// so they take LFM's values (32×32 latents, 4 heads, legacy order); `--config` overrides them.
pub(super) fn infer_guided(w: &TensorMap) -> Result<UNetConfig, String> {
    let &[_, model_channels] = shape(w, "time_embed.0.weight")? else {
        return Err("time_embed.0.weight is not 2-D".into());
    };
    let &[_, in_channels, _, _] = shape(w, "input_blocks.0.0.weight")? else {
        return Err("input_blocks.0.0.weight is not 4-D".into());
    };
    let &[out_channels, ..] = shape(w, "out.2.weight")? else { return Err("out.2.weight has no shape".into()) };
    let has = |key: String| w.contains_key(&key);
    let inputs = count_indexed(w, "input_blocks.");
    let outputs = count_indexed(w, "output_blocks.");
    // An output block whose second or third layer is a residual block upsamples with it (resblock_updown).
    let updown_levels =
        (0..outputs).filter(|i| (1..3).any(|j| has(format!("output_blocks.{i}.{j}.in_layers.0.weight")))).count();
    let resblock_updown = updown_levels > 0;
    let downsamplers = if resblock_updown {
        updown_levels
    } else {
        // A Downsample is a strided conv (`op`) or, without conv_resample, a parameterless average pool.
        (1..inputs)
            .filter(|i| {
                has(format!("input_blocks.{i}.0.op.weight"))
                    || !w.keys().any(|k| k.starts_with(&format!("input_blocks.{i}.")))
            })
            .count()
    };
    let levels = downsamplers + 1;
    if inputs == 0 || !inputs.is_multiple_of(levels) || inputs / levels < 2 {
        return Err(format!("{inputs} input blocks do not form {levels} levels of residual blocks"));
    }
    let num_res_blocks = inputs / levels - 1;
    let mut channel_mult = Vec::with_capacity(levels);
    let mut attention_resolutions = Vec::new();
    for level in 0..levels {
        let first = 1 + level * (num_res_blocks + 1);
        let &[c, ..] = shape(w, &format!("input_blocks.{first}.0.in_layers.2.weight"))? else {
            return Err(format!("input_blocks.{first}.0.in_layers.2.weight has no shape"));
        };
        if !c.is_multiple_of(model_channels) {
            return Err(format!("level {level} has {c} channels, not a multiple of nf = {model_channels}"));
        }
        channel_mult.push(c / model_channels);
        if has(format!("input_blocks.{first}.1.qkv.weight")) {
            attention_resolutions.push(1 << level);
        }
    }
    let &[emb_out, _] = shape(w, "input_blocks.1.0.emb_layers.1.weight")? else {
        return Err("input_blocks.1.0.emb_layers.1.weight is not 2-D".into());
    };
    Ok(UNetConfig {
        image_size: 32,
        in_channels,
        model_channels,
        out_channels,
        num_res_blocks,
        attention_resolutions,
        dropout: 0.0,
        conv_resample: resblock_updown || levels == 1 || w.keys().any(|k| k.ends_with(".op.weight")),
        num_classes: w.get("label_emb.weight").map(|t| t.shape[0]),
        num_heads: 4,
        num_head_channels: None,
        num_heads_upsample: None,
        use_scale_shift_norm: emb_out == 2 * channel_mult[0] * model_channels,
        resblock_updown,
        use_new_attention_order: false,
        channel_mult,
    })
}

pub(super) fn infer_edm(w: &TensorMap) -> Result<EdmConfig, String> {
    let &[emb, model_channels] = shape(w, "map_layer0.weight")? else {
        return Err("map_layer0.weight is not 2-D".into());
    };
    // The encoder's keys carry the resolutions: `enc.{R}x{R}_conv` is the first level.
    let conv_key = w
        .keys()
        .find(|k| k.starts_with("enc.") && k.ends_with("_conv.weight"))
        .ok_or("the checkpoint has no `enc.{R}x{R}_conv.weight`")?;
    let res_text = conv_key.trim_start_matches("enc.").split('x').next().unwrap_or_default();
    let img_resolution: usize = res_text.parse().map_err(|_| format!("cannot read the resolution of `{conv_key}`"))?;
    let &[_, in_channels, _, _] = shape(w, conv_key)? else { return Err(format!("{conv_key} is not 4-D")) };
    let &[out_channels, ..] = shape(w, "out_conv.weight")? else { return Err("out_conv.weight has no shape".into()) };
    let mut channel_mult = Vec::new();
    let mut num_blocks = 0;
    let mut attn_resolutions = Vec::new();
    let mut res = img_resolution;
    loop {
        let blocks = (0..).take_while(|i| w.contains_key(&format!("enc.{res}x{res}_block{i}.conv0.weight"))).count();
        if blocks == 0 {
            break;
        }
        num_blocks = blocks;
        let &[c, ..] = shape(w, &format!("enc.{res}x{res}_block0.conv0.weight"))? else { unreachable!() };
        channel_mult.push(c / model_channels);
        if w.contains_key(&format!("enc.{res}x{res}_block0.qkv.weight"))
            || w.contains_key(&format!("dec.{res}x{res}_block0.qkv.weight"))
        {
            attn_resolutions.push(res);
        }
        if res < 2 || !w.contains_key(&format!("enc.{}x{}_down.conv0.weight", res / 2, res / 2)) {
            break;
        }
        res /= 2;
    }
    if channel_mult.is_empty() {
        return Err(format!("no encoder blocks `enc.{img_resolution}x{img_resolution}_block0.*` found"));
    }
    let label_dim = w.get("map_label.weight").map_or(0, |t| t.shape[1]);
    Ok(EdmConfig {
        img_resolution,
        in_channels,
        out_channels,
        label_dim,
        model_channels,
        channel_mult,
        channel_mult_emb: emb / model_channels,
        num_blocks,
        attn_resolutions,
        dropout: 0.0,
        label_dropout: 0.0,
    })
}
