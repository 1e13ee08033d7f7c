//! LFM's released experiments as presets: the flags its scripts pass, the checkpoint, the CFG scale, the FID.

use super::config::{LfmFlags, ModelConfig};

/// One of LFM's released experiments (README table and `test_args/`).
#[derive(Debug, Clone, PartialEq)]
pub struct Preset {
    /// Name as in LFM's `test_args/` (`celeb256_dit`, …).
    pub name: &'static str,
    /// LFM's `--dataset`.
    pub dataset: &'static str,
    /// LFM's experiment folder.
    pub exp: &'static str,
    /// The released checkpoint file.
    pub checkpoint: &'static str,
    /// The classifier-free guidance scale LFM samples with.
    pub cfg_scale: Option<f64>,
    /// FID reported in LFM's README.
    pub fid: f64,
    network: PresetNetwork,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum PresetNetwork {
    /// DiT size, classes, label dropout.
    Dit(&'static str, usize, f64),
    /// Guided UNet: image size, ch_mult, attention downsample factors.
    Guided(usize, &'static [usize], &'static [usize]),
    /// EDM UNet: ch_mult, attention resolutions, label_dim.
    Edm(&'static [usize], &'static [usize], usize),
}

/// LFM's released experiments (LFM-REFERENCE.md §7): all on the f8 SD VAE latents, nf 256, two blocks per level.
pub const PRESETS: &[Preset] = &[
    Preset::new("celeb256_dit", "celeba_256", "celeb_f8_dit", "model_475.pth", None, 5.26, dit("DiT-L/2")),
    Preset::new("ffhq_dit", "ffhq_256", "ffhq_f8_dit", "model_475.pth", None, 4.55, dit("DiT-L/2")),
    Preset::new("bed_dit", "lsun_bedroom", "bed_f8_dit", "model_550.pth", None, 4.92, dit("DiT-L/2")),
    Preset::new("church_dit", "lsun_church", "church_f8_dit", "model_575.pth", None, 5.54, dit("DiT-L/2")),
    Preset::new(
        "imnet_dit",
        "imagenet_256",
        "imnet_f8_ditb2",
        "model_875.pth",
        Some(1.5),
        4.46,
        PresetNetwork::Dit("DiT-B/2", 1000, 0.1),
    ),
    Preset::new(
        "celeb256_adm",
        "celeba_256",
        "celeb256_f8_adm",
        "model_480.pth",
        None,
        5.67,
        PresetNetwork::Guided(256, &[1, 2, 2, 2], &[16, 8]),
    ),
    Preset::new(
        "celeb512_adm",
        "celeba_512",
        "celeb512_f8_adm",
        "model_425.pth",
        None,
        6.35,
        PresetNetwork::Guided(512, &[1, 2, 2, 2, 4], &[16, 8]),
    ),
    Preset::new("ffhq_adm", "ffhq_256", "ffhq_f8_adm", "model_325.pth", None, 6.12, edm(0)),
    Preset::new("bed_adm", "lsun_bedroom", "bed_f8_adm", "model_425.pth", None, 7.05, edm(0)),
    Preset::new(
        "church_adm",
        "lsun_church",
        "church_f8_adm",
        "model_425.pth",
        None,
        7.7,
        PresetNetwork::Guided(256, &[1, 2, 3, 4], &[16, 8]),
    ),
    Preset::new("imnet_adm", "imagenet_256", "imnet_f8_adm", "model_1125.pth", Some(1.25), 8.58, edm(1000)),
];

const fn dit(size: &'static str) -> PresetNetwork {
    PresetNetwork::Dit(size, 1, 0.0)
}

const fn edm(label_dim: usize) -> PresetNetwork {
    PresetNetwork::Edm(&[1, 2, 3, 4], &[16, 8, 4], label_dim)
}

impl Preset {
    const fn new(
        name: &'static str,
        dataset: &'static str,
        exp: &'static str,
        checkpoint: &'static str,
        cfg_scale: Option<f64>,
        fid: f64,
        network: PresetNetwork,
    ) -> Self {
        Self { name, dataset, exp, checkpoint, cfg_scale, fid, network }
    }

    /// The preset called `name`, or an error listing them all.
    pub fn find(name: &str) -> Result<&'static Preset, String> {
        PRESETS.iter().find(|p| p.name == name).ok_or_else(|| {
            let names: Vec<&str> = PRESETS.iter().map(|p| p.name).collect();
            format!("unknown preset `{name}`; the presets are {}", names.join(", "))
        })
    }

    /// The flags LFM's scripts pass for this experiment.
    pub fn flags(&self) -> LfmFlags {
        let base = LfmFlags {
            image_size: 256,
            num_in_channels: 4,
            num_out_channels: 4,
            nf: 256,
            num_res_blocks: 2,
            ..LfmFlags::default()
        };
        match self.network {
            PresetNetwork::Dit(size, classes, dropout) => {
                LfmFlags { model_type: size.into(), num_classes: Some(classes), label_dropout: dropout, ..base }
            }
            PresetNetwork::Guided(image_size, ch_mult, attn) => LfmFlags {
                use_origin_adm: true,
                image_size,
                ch_mult: ch_mult.to_vec(),
                attn_resolutions: attn.to_vec(),
                ..base
            },
            PresetNetwork::Edm(ch_mult, attn, label_dim) => LfmFlags {
                ch_mult: ch_mult.to_vec(),
                attn_resolutions: attn.to_vec(),
                label_dim,
                num_classes: (label_dim > 0).then_some(label_dim),
                ..base
            },
        }
    }

    /// The network of this experiment.
    pub fn model(&self) -> ModelConfig {
        self.flags().to_model().expect("presets are valid")
    }
}
