//! Model configurations from LFM's flags (JSON, TOML, LFM's config.yaml, a content.pth's `args`), the released
//! presets, inference from weights, and clear errors for flags that do not describe a checkpoint.

use std::io::Write;

use lfm::backend::Cpu;
use lfm::checkpoint::{read_weights, CheckpointError};
use lfm::models::{
    weights_and_config, ConfigChoice, DiTConfig, EdmConfig, EdmUNet, LfmFlags, ModelConfig, Preset, PRESETS,
};

use crate::common::*;

#[test]
fn golden_lfm_flags_build_the_golden_networks() {
    let origin = ModelConfig::from_json(&lfm_flags("adm_origin_tiny").to_string()).unwrap();
    assert_eq!(origin, ModelConfig::GuidedUnet(crate::unet::golden_config()));
    let edm = ModelConfig::from_json(&lfm_flags("adm_edm_tiny").to_string()).unwrap();
    assert_eq!(edm, ModelConfig::EdmUnet(crate::edm::golden_config()));
}

#[test]
fn toml_flags_and_our_own_json_round_trip() {
    let toml = r#"
        model_type = "adm"
        image_size = 64
        f = 8
        num_in_channels = 4
        num_out_channels = 4
        nf = 32
        ch_mult = [1, 2]
        num_res_blocks = 1
        attn_resolutions = [4]
        label_dim = 0
    "#;
    let config = ModelConfig::from_text(toml, "edm.toml").unwrap();
    assert_eq!(config, ModelConfig::EdmUnet(crate::edm::golden_config()));
    assert_eq!(ModelConfig::from_json(&config.to_json()).unwrap(), config);
}

/// What OmegaConf writes for LFM's celeb_f8_dit run (`OmegaConf.save(vars(args))`), abridged to a few training keys.
const CELEB_DIT_YAML: &str = "\
seed: 1024
resume: false
model_ckpt: null
model_type: DiT-L/2
image_size: 256
f: 8
scale_factor: 0.18215
num_in_channels: 4
num_out_channels: 4
nf: 256
num_res_blocks: 2
attn_resolutions:
- 16
- 8
- 4
ch_mult:
- 1
- 2
- 3
- 4
dropout: 0.0
label_dim: 0
augment_dim: 0
num_classes: 1
label_dropout: 0.0
layout: false
use_origin_adm: false
use_scale_shift_norm: true
resblock_updown: false
use_new_attention_order: false
centered: true
resamp_with_conv: true
num_heads: 4
num_head_upsample: -1
num_head_channels: -1
pretrained_autoencoder_ckpt: stabilityai/sd-vae-ft-mse
exp: celeb_f8_dit
dataset: celeba_256
batch_size: 32
num_epoch: 500
lr: 0.0002
";

#[test]
fn lfm_config_yaml_loads() {
    let config = ModelConfig::from_text(CELEB_DIT_YAML, "config.yaml").unwrap();
    // num_heads: 4 in the file is the argparse default for the UNet; a named DiT size keeps its own 16 heads.
    assert_eq!(config, ModelConfig::Dit(DiTConfig::named("DiT-L/2", 32, 4, 1, 0.0).unwrap()));
    assert_eq!(config, Preset::find("celeb256_dit").unwrap().model());
}

#[test]
fn custom_dit_sizes_need_their_dimensions() {
    let custom = r#"{"model_type": "DiT", "image_size": 64, "num_in_channels": 4, "num_classes": 1,
        "depth": 2, "hidden_size": 64, "patch_size": 2, "num_heads": 4}"#;
    let ModelConfig::Dit(c) = ModelConfig::from_json(custom).unwrap() else { panic!() };
    assert_eq!(c, crate::dit::config("dit_tiny"));
    let missing = r#"{"model_type": "DiT", "image_size": 64, "num_classes": 1, "depth": 2}"#;
    let err = ModelConfig::from_json(missing).unwrap_err();
    assert!(err.contains("hidden_size"), "{err}");
    let conflicting = r#"{"model_type": "DiT-B/2", "num_classes": 1, "depth": 4}"#;
    let err = ModelConfig::from_json(conflicting).unwrap_err();
    assert!(err.contains("DiT-B/2 has depth 12"), "{err}");
}

#[test]
fn unsupported_or_incomplete_flags_are_explained() {
    let cases = [
        (r#"{"use_origin_adm": true, "layout": true}"#, "--layout"),
        (r#"{"model_type": "ncsn++"}"#, "not supported"),
        (r#"{"model_type": "unet"}"#, "unknown model_type"),
        (r#"{"model_type": "DiT-B/2"}"#, "needs num_classes"),
        (r#"{"model_type": "DiT-Q/2", "num_classes": 1}"#, "unknown DiT size"),
        (r#"{"model_type": "adm", "image_size": 60}"#, "not divisible"),
        (r#"{"preset": "celeb1024_adm"}"#, "unknown preset"),
        (r#"{"nf": "wide"}"#, "bad LFM flag"),
        // Another kind of file (here a diffusers autoencoder config) would otherwise build LFM's default network.
        (r#"{"_class_name": "AutoencoderKL", "latent_channels": 4}"#, "none of its keys is a model flag"),
    ];
    for (text, expected) in cases {
        let err = ModelConfig::from_json(text).and_then(|c| c.validate().map(|_| c)).unwrap_err();
        assert!(err.contains(expected), "{text}: {err}");
    }
}

#[test]
fn every_preset_is_a_valid_network_of_the_right_family() {
    for preset in PRESETS {
        let config = preset.model();
        config.validate().unwrap_or_else(|e| panic!("{}: {e}", preset.name));
        let family = config.family();
        let expected = match preset.name {
            n if n.ends_with("_dit") => "DiT",
            "celeb256_adm" | "celeb512_adm" | "church_adm" => "guided-diffusion UNet",
            _ => "EDM DhariwalUNet",
        };
        assert_eq!(family, expected, "{}", preset.name);
        assert_eq!(config.channels(), (4, 4), "{}", preset.name);
        let side = if preset.name == "celeb512_adm" { 64 } else { 32 };
        assert_eq!(config.latent_size(), side, "{}", preset.name);
    }
    assert_eq!(Preset::find("imnet_dit").unwrap().cfg_scale, Some(1.5));
    assert_eq!(Preset::find("imnet_adm").unwrap().cfg_scale, Some(1.25));
    let ModelConfig::Dit(imnet) = Preset::find("imnet_dit").unwrap().model() else { panic!() };
    assert_eq!((imnet.hidden_size, imnet.label_rows()), (768, 1001));
    // celeb256_adm: attention at downsample factor 8 of a 4-level UNet (16 is never reached) plus the middle block.
    let ModelConfig::GuidedUnet(celeb) = Preset::find("celeb256_adm").unwrap().model() else { panic!() };
    assert_eq!(
        (celeb.channel_mult.as_slice(), celeb.attention_resolutions.as_slice()),
        (&[1, 2, 2, 2][..], &[16, 8][..])
    );
}

#[test]
fn architectures_are_inferred_from_the_weights() {
    let weights = read_weights(&fixture("adm_origin_tiny/model.pth")).unwrap().tensors;
    let ModelConfig::GuidedUnet(inferred) = ModelConfig::infer(&weights).unwrap() else { panic!("not a UNet") };
    // The latent size leaves no trace in a UNet's weights (LFM's 32 is assumed); everything else must match.
    let golden = crate::unet::golden_config();
    assert_eq!(inferred, lfm::models::UNetConfig { image_size: 32, attention_resolutions: vec![2], ..golden });
    let weights = read_weights(&fixture("adm_edm_tiny/model.pth")).unwrap().tensors;
    assert_eq!(ModelConfig::infer(&weights).unwrap(), ModelConfig::EdmUnet(crate::edm::golden_config()));
    // An autoencoder passed as the velocity network is named for what it is.
    let weights = read_weights(&fixture("vae_tiny/model.safetensors")).unwrap().tensors;
    let err = ModelConfig::infer(&weights).unwrap_err();
    assert!(err.contains("holds a KL autoencoder (diffusers AutoencoderKL), not a velocity network"), "{err}");
}

#[test]
fn flags_that_do_not_describe_the_checkpoint_are_explained() {
    let weights = read_weights(&fixture("adm_edm_tiny/model.pth")).unwrap().tensors;
    let wrong = EdmConfig { channel_mult: vec![1, 3], ..crate::edm::golden_config() };
    let err = EdmUNet::<Cpu>::load(&wrong, &weights, &cpu()).unwrap_err();
    let CheckpointError::Mismatch(report) = &err else { panic!("{err}") };
    let text = err.to_string();
    assert!(
        report
            .shape_mismatches
            .iter()
            .any(|(k, f, m)| k == "enc.4x4_block0.conv0.weight" && f == &[64, 32, 3, 3] && m == &[96, 32, 3, 3]),
        "{text}"
    );
    assert!(text.contains("ch_mult"), "{text}");
    // One level fewer: the 4×4 blocks are unexpected, named with the reference's keys.
    let shallow = EdmConfig { channel_mult: vec![1], attn_resolutions: vec![], ..crate::edm::golden_config() };
    let CheckpointError::Mismatch(report) = EdmUNet::<Cpu>::load(&shallow, &weights, &cpu()).unwrap_err() else {
        panic!()
    };
    assert!(report.unexpected.iter().any(|k| k == "enc.4x4_block0.qkv.weight"), "{report}");
}

/// LFM's `content.pth` pickles its argparse Namespace as `args`; lfm reads the model flags from it.
#[test]
fn content_pth_args_give_the_config() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("content.pth");
    let mut zip = zip::ZipWriter::new(std::fs::File::create(&path).unwrap());
    let options = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    let text = |s: &str| {
        let mut b = vec![b'X'];
        b.extend_from_slice(&(s.len() as u32).to_le_bytes());
        b.extend_from_slice(s.as_bytes());
        b
    };
    let int = |v: u8| vec![b'K', v];
    let mut p = vec![0x80, 2, b'}', b'('];
    // args = Namespace(model_type='adm', image_size=64, num_in_channels=4, num_out_channels=4, nf=32,
    //                  ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[4], num_classes=None, exp='x')
    p.extend(text("args"));
    p.extend_from_slice(b"cargparse\nNamespace\n)\x81}(");
    for (k, v) in [
        ("model_type", text("adm")),
        ("image_size", int(64)),
        ("num_in_channels", int(4)),
        ("num_out_channels", int(4)),
        ("nf", int(32)),
        ("num_res_blocks", int(1)),
        ("num_classes", vec![b'N']),
        ("exp", text("x")),
    ] {
        p.extend(text(k));
        p.extend(v);
    }
    p.extend(text("ch_mult"));
    p.extend_from_slice(b"](K\x01K\x02e");
    p.extend(text("attn_resolutions"));
    p.extend_from_slice(b"]K\x04a");
    p.extend_from_slice(b"ub");
    // model_dict = {'module.w': tensor of 2 floats}
    p.extend(text("model_dict"));
    p.extend_from_slice(b"ccollections\nOrderedDict\n)R(");
    p.extend(text("module.w"));
    p.extend_from_slice(b"ctorch._utils\n_rebuild_tensor_v2\n(");
    p.push(b'(');
    p.extend(text("storage"));
    p.extend_from_slice(b"ctorch\nFloatStorage\n");
    p.extend(text("0"));
    p.extend(text("cpu"));
    p.extend_from_slice(b"K\x02tQK\x00K\x02\x85K\x01\x85\x89ccollections\nOrderedDict\n)RtR");
    p.extend_from_slice(b"uu.");
    zip.start_file("content/data.pkl", options).unwrap();
    zip.write_all(&p).unwrap();
    zip.start_file("content/data/0", options).unwrap();
    zip.write_all(&[0u8; 8]).unwrap();
    zip.finish().unwrap();
    let (config, weights, source) = weights_and_config(&path, ConfigChoice::Detect).unwrap();
    assert!(source.contains("LFM training flags"), "{source}");
    assert!(weights.contains_key("w"));
    assert_eq!(config, ModelConfig::EdmUnet(crate::edm::golden_config()));
    let flags = LfmFlags::default();
    assert_eq!((flags.nf, flags.num_heads, flags.ch_mult.len()), (256, 4, 6), "argparse defaults");
}

/// DiT-B/2 at 256 px is 23.01 GFLOPs in the DiT paper (fvcore counts multiply-adds); ours counts 2 per multiply-add.
#[test]
fn dit_flops_match_the_dit_paper() {
    let config = DiTConfig::named("DiT-B/2", 32, 4, 1, 0.0).unwrap();
    let gmacs = config.flops() / 2e9;
    assert!((gmacs - 23.01).abs() < 0.1, "DiT-B/2: {gmacs:.2} GMACs, paper 23.01");
    let unet = Preset::find("celeb256_adm").unwrap().model().flops();
    let edm = Preset::find("ffhq_adm").unwrap().model().flops();
    // The 406M-parameter EDM UNet costs more than the 153M celeb256 UNet; both are of the order of DiT-B/2.
    assert!(edm > unet && unet > 0.5 * config.flops(), "UNet {unet:e}, EDM {edm:e}");
}
