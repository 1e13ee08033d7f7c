//! Model configurations: our own (serialised with every converted checkpoint) and inference from weights.

use serde::{Deserialize, Serialize};

use super::dit::{DiTConfig, DIT_SIZES};
use crate::checkpoint::TensorMap;

/// Which network, with its hyper-parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "network", rename_all = "snake_case")]
pub enum ModelConfig {
    /// A DiT.
    Dit(DiTConfig),
}

impl ModelConfig {
    /// Reads our JSON configuration (what `lfm convert` stores in the safetensors metadata).
    pub fn from_json(text: &str) -> Result<Self, String> {
        serde_json::from_str(text).map_err(|e| format!("not an lfm model config: {e}"))
    }

    /// The configuration as JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("configs serialise")
    }

    /// Infers the architecture from parameter names and shapes, where they determine it.
    pub fn infer(weights: &TensorMap) -> Result<Self, String> {
        if weights.contains_key("x_embedder.proj.weight") {
            return infer_dit(weights).map(Self::Dit);
        }
        Err("cannot tell the architecture from the tensor names (no `x_embedder.proj.weight`): only DiT checkpoints \
             are recognised so far; pass --config"
            .into())
    }

    /// Checks the hyper-parameters fit together.
    pub fn validate(&self) -> Result<(), String> {
        match self {
            Self::Dit(c) => c.validate(),
        }
    }
}

fn shape<'a>(weights: &'a TensorMap, key: &str) -> Result<&'a [usize], String> {
    weights.get(key).map(|t| t.shape.as_slice()).ok_or_else(|| format!("the checkpoint has no `{key}`"))
}

fn infer_dit(w: &TensorMap) -> Result<DiTConfig, String> {
    let &[hidden, in_channels, p, _] = shape(w, "x_embedder.proj.weight")? else {
        return Err("x_embedder.proj.weight is not 4-D".into());
    };
    let &[_, tokens, _] = shape(w, "pos_embed")? else { return Err("pos_embed is not 3-D".into()) };
    let grid = (tokens as f64).sqrt().round() as usize;
    if grid * grid != tokens {
        return Err(format!("pos_embed has {tokens} tokens, not a square grid"));
    }
    let depth = w
        .keys()
        .filter_map(|k| k.strip_prefix("blocks.")?.split('.').next()?.parse::<usize>().ok())
        .max()
        .map_or(0, |m| m + 1);
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
