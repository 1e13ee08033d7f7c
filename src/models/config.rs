//! Model configurations: our own (stored with every converted checkpoint) and LFM's command-line flags (JSON, TOML,
//! or the `config.yaml` LFM saves). The released experiments are in `presets.rs`, inference from weights in
//! `infer.rs`.

use serde::{Deserialize, Serialize};

use super::dit::{DiTConfig, DIT_SIZES};
use super::edm::EdmConfig;
use super::infer::{infer_dit, infer_edm, infer_guided};
use super::presets::Preset;
use super::unet::UNetConfig;
use crate::checkpoint::TensorMap;

/// Why the guided-diffusion UNet cannot be sampled with classifier-free guidance.
pub(crate) const NO_GUIDANCE_FOR_THE_GUIDED_UNET: &str =
    "classifier-free guidance is not defined for the guided-diffusion \
     UNet (LFM has no forward_with_cfg for it): sample without a CFG scale";

/// Which network, with its hyper-parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "network", rename_all = "snake_case")]
pub enum ModelConfig {
    /// A DiT.
    Dit(DiTConfig),
    /// The guided-diffusion UNet (`--use_origin_adm`).
    GuidedUnet(UNetConfig),
    /// EDM's DhariwalUNet (`--model_type adm`).
    EdmUnet(EdmConfig),
}

impl ModelConfig {
    /// Reads a configuration file's text: our own JSON (with a `network` key), or LFM's flags as JSON, TOML or YAML
    /// (LFM's saved `config.yaml`). `name` (the file name) picks the format by extension.
    pub fn from_text(text: &str, name: &str) -> Result<Self, String> {
        let lower = name.to_ascii_lowercase();
        let (value, user_written): (serde_json::Value, bool) = if lower.ends_with(".toml") {
            (toml::from_str(text).map_err(|e| format!("not valid TOML: {e}"))?, true)
        } else if lower.ends_with(".yaml") || lower.ends_with(".yml") {
            (serde_yaml::from_str(text).map_err(|e| format!("not valid YAML: {e}"))?, false)
        } else {
            (serde_json::from_str(text).map_err(|e| format!("not valid JSON: {e}"))?, true)
        };
        Self::from_value(value, user_written)
    }

    /// Reads our JSON configuration (what `lfm convert` stores in the safetensors metadata) or LFM flags as JSON.
    pub fn from_json(text: &str) -> Result<Self, String> {
        Self::from_text(text, "config.json")
    }

    /// LFM's training flags as saved in a `content.pth` (`args`) or `config.yaml`.
    pub fn from_lfm_args(args: serde_json::Value) -> Result<Self, String> {
        Self::from_value(args, false)
    }

    fn from_value(value: serde_json::Value, user_written: bool) -> Result<Self, String> {
        let serde_json::Value::Object(map) = &value else {
            return Err("a model config must be a table of keys".into());
        };
        if map.contains_key("network") {
            return serde_json::from_value(value).map_err(|e| format!("not an lfm model config: {e}"));
        }
        if user_written {
            // LFM's own config.yaml holds every training flag; a hand-written file should only hold model flags.
            let unknown: Vec<&str> =
                map.keys().map(String::as_str).filter(|k| !LfmFlags::KEYS.contains(k) && *k != "preset").collect();
            if !unknown.is_empty() && unknown.len() == map.len() {
                // Not one model flag: another kind of file (an autoencoder's config.json, a training log), which
                // would otherwise build LFM's default network.
                return Err(format!(
                    "none of its keys is a model flag ({}): a model config holds LFM's flags (model_type, \
                     image_size, nf, ch_mult, …), a `preset`, or lfm's own form with `network`",
                    unknown.join(", ")
                ));
            }
            if !unknown.is_empty() {
                tracing::warn!("config keys not used by the model (typos?): {}", unknown.join(", "));
            }
        }
        if let Some(preset) = map.get("preset") {
            let name = preset.as_str().ok_or("`preset` must be a string")?;
            if map.len() > 1 {
                return Err("a config with `preset` must not set other keys".into());
            }
            return Preset::find(name).map(|p| p.model());
        }
        let flags: LfmFlags = serde_json::from_value(value).map_err(|e| format!("bad LFM flag: {e}"))?;
        flags.to_model()
    }

    /// The configuration as JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("configs serialise")
    }

    /// A short name of the network family.
    pub fn family(&self) -> &'static str {
        match self {
            Self::Dit(_) => "DiT",
            Self::GuidedUnet(_) => "guided-diffusion UNet",
            Self::EdmUnet(_) => "EDM DhariwalUNet",
        }
    }

    /// Latent channels the network reads and writes: (input, output).
    pub fn channels(&self) -> (usize, usize) {
        match self {
            Self::Dit(c) => (c.in_channels, c.out_channels()),
            Self::GuidedUnet(c) => (c.in_channels, c.out_channels),
            Self::EdmUnet(c) => (c.in_channels, c.out_channels),
        }
    }

    /// The labels the network accepts: `None` for an unconditional network, else the number of valid labels
    /// (DiT: its table rows, including the null class; UNets: their classes).
    pub fn label_count(&self) -> Option<usize> {
        match self {
            Self::Dit(c) => (c.num_classes > 1 || c.label_dropout > 0.0).then(|| c.label_rows()),
            Self::GuidedUnet(c) => c.num_classes,
            Self::EdmUnet(c) => (c.label_dim > 0).then_some(c.label_dim),
        }
    }

    /// The number of real classes of a class-conditional network (DiT: without the null row), `None` if
    /// unconditional.
    pub fn classes(&self) -> Option<usize> {
        match self {
            Self::Dit(c) => self.label_count().map(|_| c.num_classes),
            _ => self.label_count(),
        }
    }

    /// The label of the "unconditional" half of a CFG batch: DiT's null row (only with label dropout), EDM's 0
    /// (whose one-hot is zeroed); `None` when the network has no CFG.
    pub fn null_label(&self) -> Option<i64> {
        match self {
            Self::Dit(c) => (c.label_dropout > 0.0).then_some(c.num_classes as i64),
            Self::EdmUnet(c) => (c.label_dim > 0).then_some(0),
            Self::GuidedUnet(_) => None,
        }
    }

    /// Whether LFM defines classifier-free guidance for this network (DiT and EDM; not the guided UNet).
    pub fn supports_cfg(&self) -> bool {
        !matches!(self, Self::GuidedUnet(_))
    }

    /// Whether classifier-free guidance can run on this network: LFM defines it for DiT (with a null row, i.e.
    /// trained with label dropout) and class-conditional EDM UNets, not for the guided-diffusion UNet.
    pub fn check_guidance(&self) -> Result<(), String> {
        match (self, self.null_label()) {
            (Self::GuidedUnet(_), _) => Err(NO_GUIDANCE_FOR_THE_GUIDED_UNET.into()),
            (_, None) => Err("classifier-free guidance needs a class-conditional model trained with label dropout (a \
                              null class); this one has none: sample without a CFG scale"
                .into()),
            _ => Ok(()),
        }
    }

    /// Side of the latent the network was built for.
    pub fn latent_size(&self) -> usize {
        match self {
            Self::Dit(c) => c.input_size,
            Self::GuidedUnet(c) => c.image_size,
            Self::EdmUnet(c) => c.img_resolution,
        }
    }

    /// Infers the architecture from parameter names and shapes, where they determine it.
    pub fn infer(weights: &TensorMap) -> Result<Self, String> {
        if weights.contains_key("x_embedder.proj.weight") {
            return infer_dit(weights).map(Self::Dit);
        }
        if weights.contains_key("time_embed.0.weight") && weights.contains_key("input_blocks.0.0.weight") {
            return infer_guided(weights).map(Self::GuidedUnet);
        }
        if weights.contains_key("map_layer0.weight") && weights.keys().any(|k| k.starts_with("enc.")) {
            return infer_edm(weights).map(Self::EdmUnet);
        }
        if let Some(kind) = crate::checkpoint::recognise(weights.keys()).filter(|kind| !kind.velocity) {
            return Err(format!("the file holds {}, not a velocity network (which --checkpoint takes)", kind.name));
        }
        Err("cannot tell the architecture from the tensor names: expected DiT (`x_embedder.*`), guided-diffusion UNet \
             (`time_embed.*`, `input_blocks.*`) or EDM DhariwalUNet (`map_layer0.*`, `enc.*`) weights; pass --config"
            .into())
    }

    /// Checks the hyper-parameters fit together.
    pub fn validate(&self) -> Result<(), String> {
        match self {
            Self::Dit(c) => c.validate(),
            Self::GuidedUnet(c) => c.validate(),
            Self::EdmUnet(c) => c.validate(),
        }
    }
}

/// LFM's model flags (`train_flow_latent.py` / `test_flow_latent.py`), with argparse's defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LfmFlags {
    /// `adm`, `DiT-B/2`, … or `DiT` for a custom DiT size.
    pub model_type: String,
    /// The guided-diffusion UNet instead of EDM's.
    pub use_origin_adm: bool,
    /// Image side in pixels.
    pub image_size: usize,
    /// Autoencoder downsampling factor.
    pub f: usize,
    /// Network input channels.
    pub num_in_channels: usize,
    /// Network output channels.
    pub num_out_channels: usize,
    /// Base width.
    pub nf: usize,
    /// Width multipliers.
    pub ch_mult: Vec<usize>,
    /// Attention: downsample factors (guided UNet) or resolutions (EDM).
    pub attn_resolutions: Vec<usize>,
    /// Residual blocks per level.
    pub num_res_blocks: usize,
    /// Attention heads (guided UNet; custom DiT).
    pub num_heads: usize,
    /// Channels per head, −1 = use `num_heads`.
    pub num_head_channels: i64,
    /// Decoder heads, −1 = `num_heads`.
    pub num_head_upsample: i64,
    /// Dropout.
    pub dropout: f64,
    /// Classes (DiT, guided UNet).
    pub num_classes: Option<usize>,
    /// One-hot label width (EDM), 0 = unconditional.
    pub label_dim: usize,
    /// Label dropout for CFG training.
    pub label_dropout: f64,
    /// FiLM conditioning in the guided UNet.
    pub use_scale_shift_norm: bool,
    /// Residual up/down blocks in the guided UNet.
    pub resblock_updown: bool,
    /// `QKVAttention` instead of the legacy order.
    pub use_new_attention_order: bool,
    /// Learned resampling convolutions in the guided UNet.
    pub resamp_with_conv: bool,
    /// LFM's `UNetModelAttn` (layout-to-image); not supported.
    pub layout: bool,
    /// Custom DiT depth.
    pub depth: Option<usize>,
    /// Custom DiT width.
    pub hidden_size: Option<usize>,
    /// Custom DiT patch size.
    pub patch_size: Option<usize>,
    /// Custom DiT MLP ratio.
    pub mlp_ratio: Option<f64>,
}

impl Default for LfmFlags {
    fn default() -> Self {
        Self {
            model_type: "adm".into(),
            use_origin_adm: false,
            image_size: 32,
            f: 8,
            num_in_channels: 3,
            num_out_channels: 3,
            nf: 256,
            ch_mult: vec![1, 1, 2, 2, 4, 4],
            attn_resolutions: vec![16],
            num_res_blocks: 2,
            num_heads: 4,
            num_head_channels: -1,
            num_head_upsample: -1,
            dropout: 0.0,
            num_classes: None,
            label_dim: 0,
            label_dropout: 0.0,
            use_scale_shift_norm: true,
            resblock_updown: false,
            use_new_attention_order: false,
            resamp_with_conv: true,
            layout: false,
            depth: None,
            hidden_size: None,
            patch_size: None,
            mlp_ratio: None,
        }
    }
}

impl LfmFlags {
    /// The keys a model config may hold.
    pub const KEYS: &'static [&'static str] = &[
        "model_type",
        "use_origin_adm",
        "image_size",
        "f",
        "num_in_channels",
        "num_out_channels",
        "nf",
        "ch_mult",
        "attn_resolutions",
        "num_res_blocks",
        "num_heads",
        "num_head_channels",
        "num_head_upsample",
        "dropout",
        "num_classes",
        "label_dim",
        "label_dropout",
        "use_scale_shift_norm",
        "resblock_updown",
        "use_new_attention_order",
        "resamp_with_conv",
        "layout",
        "depth",
        "hidden_size",
        "patch_size",
        "mlp_ratio",
    ];

    fn latent_side(&self, f: usize) -> Result<usize, String> {
        if f == 0 || !self.image_size.is_multiple_of(f) {
            return Err(format!("image_size {} is not divisible by the autoencoder factor {f}", self.image_size));
        }
        Ok(self.image_size / f)
    }

    /// The network LFM's `create_network` builds from these flags.
    pub fn to_model(&self) -> Result<ModelConfig, String> {
        let per_head = |v: i64| (v > 0).then_some(v as usize);
        if self.use_origin_adm {
            if self.layout {
                return Err(
                    "--layout (UNetModelAttn, layout-to-image) is not supported: no released LFM model uses it".into(),
                );
            }
            return Ok(ModelConfig::GuidedUnet(UNetConfig {
                // get_flow_model hard-codes the factor 8.
                image_size: self.latent_side(8)?,
                in_channels: self.num_in_channels,
                model_channels: self.nf,
                out_channels: self.num_out_channels,
                num_res_blocks: self.num_res_blocks,
                attention_resolutions: self.attn_resolutions.clone(),
                dropout: self.dropout,
                channel_mult: self.ch_mult.clone(),
                conv_resample: self.resamp_with_conv,
                num_classes: self.num_classes,
                num_heads: self.num_heads,
                num_head_channels: per_head(self.num_head_channels),
                num_heads_upsample: per_head(self.num_head_upsample),
                use_scale_shift_norm: self.use_scale_shift_norm,
                resblock_updown: self.resblock_updown,
                use_new_attention_order: self.use_new_attention_order,
            }));
        }
        if self.model_type.starts_with("DiT") {
            return self.to_dit().map(ModelConfig::Dit);
        }
        match self.model_type.as_str() {
            "adm" => Ok(ModelConfig::EdmUnet(EdmConfig {
                img_resolution: self.latent_side(self.f)?,
                in_channels: self.num_in_channels,
                out_channels: self.num_out_channels,
                label_dim: self.label_dim,
                model_channels: self.nf,
                channel_mult: self.ch_mult.clone(),
                channel_mult_emb: 4,
                num_blocks: self.num_res_blocks,
                attn_resolutions: self.attn_resolutions.clone(),
                dropout: self.dropout,
                label_dropout: self.label_dropout,
            })),
            "ncsn++" | "ddpm++" | "adm_context" => Err(format!(
                "model_type {} (EDM's SongUNet / context UNet) is not supported: no released LFM model uses it; \
                 supported are adm (with or without use_origin_adm) and the DiT sizes",
                self.model_type
            )),
            other => Err(format!(
                "unknown model_type `{other}`: use adm, DiT-S|B|L|XL/2|4|8, or DiT with depth, hidden_size, \
                 patch_size and num_heads"
            )),
        }
    }

    fn to_dit(&self) -> Result<DiTConfig, String> {
        let input_size = self.latent_side(self.f)?;
        let num_classes = self
            .num_classes
            .ok_or("a DiT needs num_classes (LFM uses --num_classes 1 --label_dropout 0 for unconditional models)")?;
        let custom = [self.depth, self.hidden_size, self.patch_size];
        if let Some(named) =
            DiTConfig::named(&self.model_type, input_size, self.num_in_channels, num_classes, self.label_dropout)
        {
            let fixed = [named.depth, named.hidden_size, named.patch_size];
            for ((given, fixed), name) in custom.iter().zip(fixed).zip(["depth", "hidden_size", "patch_size"]) {
                if given.is_some_and(|g| g != fixed) {
                    return Err(format!(
                        "{} has {name} {fixed}; use model_type DiT for a custom size",
                        self.model_type
                    ));
                }
            }
            return Ok(named);
        }
        if self.model_type != "DiT" {
            let names: Vec<&str> = DIT_SIZES.iter().map(|s| s.0).collect();
            return Err(format!(
                "unknown DiT size `{}`: use one of {} or DiT with depth, hidden_size, patch_size, num_heads",
                self.model_type,
                names.join(", ")
            ));
        }
        let missing: Vec<&str> =
            [("depth", self.depth), ("hidden_size", self.hidden_size), ("patch_size", self.patch_size)]
                .iter()
                .filter(|(_, v)| v.is_none())
                .map(|(name, _)| *name)
                .collect();
        if !missing.is_empty() {
            return Err(format!("a custom DiT (model_type DiT) needs {}", missing.join(", ")));
        }
        let need = |v: Option<usize>| v.unwrap_or_default();
        Ok(DiTConfig {
            input_size,
            patch_size: need(self.patch_size),
            in_channels: self.num_in_channels,
            hidden_size: need(self.hidden_size),
            depth: need(self.depth),
            num_heads: self.num_heads,
            mlp_ratio: self.mlp_ratio.unwrap_or(4.0),
            num_classes,
            label_dropout: self.label_dropout,
            learn_sigma: false,
        })
    }
}
