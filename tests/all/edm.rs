//! EDM DhariwalUNet parity with `golden/adm_edm_tiny` (from `.pth` and `.safetensors`, cpu and wgpu), LFM's CFG
//! semantics for it, and the parameter counts of the full-size configurations.

use burn::module::Module;
use burn::tensor::{backend::Backend, Int, Tensor};
use lfm::backend::{Cpu, Wgpu};
use lfm::checkpoint::{read_weights, HostTensor, TensorMap};
use lfm::models::{EdmConfig, EdmUNet, ModelConfig, Precision, Preset, VelocityModel};

use crate::common::*;

const CASE: &str = "adm_edm_tiny";

/// The UNet of the golden case, from the constructor kwargs in its `config.json`.
pub fn golden_config() -> EdmConfig {
    let c = constructor_kwargs(CASE);
    let int = |k: &str| c[k].as_u64().unwrap() as usize;
    let list = |k: &str| c[k].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
    EdmConfig {
        img_resolution: int("img_resolution"),
        in_channels: int("in_channels"),
        out_channels: int("out_channels"),
        label_dim: int("label_dim"),
        model_channels: int("model_channels"),
        channel_mult: list("channel_mult"),
        channel_mult_emb: int("channel_mult_emb"),
        num_blocks: int("num_blocks"),
        attn_resolutions: list("attn_resolutions"),
        dropout: c["dropout"].as_f64().unwrap(),
        label_dropout: c["label_dropout"].as_f64().unwrap(),
    }
}

pub(crate) fn golden_weights() -> TensorMap {
    read_weights(&fixture(&format!("{CASE}/model.pth"))).unwrap().tensors
}

fn silu(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| x / (1.0 + (-x).exp())).collect()
}

pub(crate) fn check<B: Backend>(model: &EdmUNet<B>, device: &B::Device, rel: f64) {
    let io = io(CASE);
    let x = tensor::<B, 4>(get(&io, "x"), device);
    let t = tensor::<B, 1>(get(&io, "t"), device);
    let emb = values(model.embedding(t.clone(), None, false));
    assert_close("emb", &emb, &silu(&get(&io, "debug.map_layer1").to_f32()), rel, 1e-6);
    assert_close("v", &values(model.forward(t, x, None)), &get(&io, "v").to_f32(), rel, 1e-6);
}

#[test]
fn edm_unet_matches_reference_from_pth_on_cpu() {
    let model = EdmUNet::<Cpu>::load(&golden_config(), &golden_weights(), &cpu()).unwrap();
    check(&model, &cpu(), 1e-5);
}

#[test]
fn edm_unet_matches_reference_from_safetensors_on_cpu() {
    let Some(path) = shared(&format!("golden/{CASE}/model.safetensors")) else { return };
    let weights = read_weights(&path).unwrap().tensors;
    let model = EdmUNet::<Cpu>::load(&golden_config(), &weights, &cpu()).unwrap();
    check(&model, &cpu(), 1e-5);
}

#[test]
fn edm_unet_matches_reference_on_wgpu() {
    let Some(device) = wgpu() else { return };
    let model = EdmUNet::<Wgpu>::load(&golden_config(), &golden_weights(), &device).unwrap();
    check(&model, &device, 1e-4);
}

/// The network with weights in `precision` (f16 or bf16): within that format's rounding of the reference, and
/// not equal to the f32 output. Run on CUDA (`tests/all/cuda.rs`); on wgpu the 16-bit layers EDM shares with the
/// guided UNet (GroupNorm with f32 statistics, convolutions, attention) are checked by the UNet's f16 test, and
/// EDM's own layers by its f32 test: compiling every kernel again in f16 cost lavapipe over a minute.
pub(crate) fn edm_unet_in_half_precision<B: Backend>(device: &B::Device, precision: Precision) {
    let model = VelocityModel::EdmUnet(EdmUNet::<B>::load(&golden_config(), &golden_weights(), device).unwrap());
    assert_unconditional_half_precision(CASE, model, device, precision);
}

/// The golden weights plus a `map_label` for `label_dim` classes.
fn conditional(label_dim: usize) -> EdmUNet<Cpu> {
    let config = EdmConfig { label_dim, ..golden_config() };
    let mut weights = golden_weights();
    let emb = config.emb_channels();
    let table: Vec<f32> = (0..label_dim * emb).map(|i| ((i * 53 % 97) as f32 / 97.0) - 0.5).collect();
    weights.insert("map_label.weight".into(), HostTensor::f32(vec![emb, label_dim], table));
    EdmUNet::load(&config, &weights, &cpu()).unwrap()
}

/// LFM's EDM CFG: `forward_with_cfg` on `[x; x]` with `[y; anything]` gives `v_u + s·(v_c − v_u)` on both halves,
/// where `v_c = model(t, x, y)` and `v_u` is the model with no label term (not the model with label 0).
#[test]
fn edm_cfg_drops_the_label_term_of_the_second_half() {
    let model = conditional(5);
    let io = io(CASE);
    let x = tensor::<Cpu, 4>(get(&io, "x"), &cpu());
    let t = Tensor::<Cpu, 1>::from_floats([0.4], &cpu());
    let y = Tensor::<Cpu, 1, Int>::from_ints([3, 1], &cpu());
    let v_c = values(model.forward(t.clone(), x.clone(), Some(y.clone())));
    let v_u = values(model.forward(t.clone(), x.clone(), None));
    let v_label0 = values(model.forward(t.clone(), x.clone(), Some(Tensor::from_ints([0, 0], &cpu()))));
    assert!(v_u.iter().zip(&v_label0).any(|(a, b)| (a - b).abs() > 1e-4), "label 0 must differ from no label");
    let doubled = Tensor::cat(vec![x.clone(), x], 0);
    let labels = Tensor::cat(vec![y, Tensor::from_ints([0, 0], &cpu())], 0);
    let scale = 1.25;
    let guided = values(model.forward_with_cfg(t, doubled, labels, scale));
    let want: Vec<f32> = v_u.iter().zip(&v_c).map(|(u, c)| u + scale as f32 * (c - u)).collect();
    let half = want.len();
    assert_close("cfg first half", &guided[..half], &want, 1e-5, 1e-6);
    assert_close("cfg second half", &guided[half..], &want, 1e-5, 1e-6);
}

/// LFM-REFERENCE.md §3.4: ffhq/bed ADM (nf 256, ch 1 2 3 4, attn 16 8 4) 406.40M; ImageNet (label_dim 1000) 407.42M.
#[test]
fn full_size_edm_unets_have_the_reference_parameter_counts() {
    for (preset, want) in [("ffhq_adm", 406.40), ("imnet_adm", 407.42)] {
        let ModelConfig::EdmUnet(config) = Preset::find(preset).unwrap().model() else { panic!("{preset} is EDM") };
        config.validate().unwrap();
        let got = config.init::<Cpu>(&cpu()).num_params() as f64 / 1e6;
        assert!((got - want).abs() < 0.005, "{preset}: {got:.3}M parameters, reference {want}M");
    }
}
