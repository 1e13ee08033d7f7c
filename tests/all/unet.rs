//! Guided-diffusion UNet parity with `golden/adm_origin_tiny` (from `.pth` and `.safetensors`, cpu and wgpu), the
//! new attention order, class conditioning, and the parameter counts of LFM's full-size configurations.

use burn::module::Module;
use burn::tensor::backend::Backend;
use lfm::backend::{Cpu, Wgpu};
use lfm::checkpoint::{read_weights, HostTensor, TensorMap};
use lfm::models::{LfmFlags, ModelConfig, Precision, UNetConfig, UNetModel, VelocityModel};

use crate::common::*;

const CASE: &str = "adm_origin_tiny";

/// The UNet of the golden case, from the constructor kwargs in its `config.json`.
pub fn golden_config() -> UNetConfig {
    let c = constructor_kwargs(CASE);
    let int = |k: &str| c[k].as_u64().unwrap() as usize;
    let list = |k: &str| c[k].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
    let optional = |k: &str| c[k].as_i64().filter(|&v| v > 0).map(|v| v as usize);
    UNetConfig {
        image_size: int("image_size"),
        in_channels: int("in_channels"),
        model_channels: int("model_channels"),
        out_channels: int("out_channels"),
        num_res_blocks: int("num_res_blocks"),
        attention_resolutions: list("attention_resolutions"),
        dropout: c["dropout"].as_f64().unwrap(),
        channel_mult: list("channel_mult"),
        conv_resample: c["conv_resample"].as_bool().unwrap(),
        num_classes: c["num_classes"].as_u64().map(|v| v as usize),
        num_heads: int("num_heads"),
        num_head_channels: optional("num_head_channels"),
        num_heads_upsample: optional("num_heads_upsample"),
        use_scale_shift_norm: c["use_scale_shift_norm"].as_bool().unwrap(),
        resblock_updown: c["resblock_updown"].as_bool().unwrap(),
        use_new_attention_order: c["use_new_attention_order"].as_bool().unwrap(),
    }
}

pub(crate) fn golden_weights() -> TensorMap {
    read_weights(&fixture(&format!("{CASE}/model.pth"))).unwrap().tensors
}

/// The golden UNet's weights with its input convolution widened to `in_channels` (input channel `i` reads the
/// weights of the golden channel `i mod 4`): a conditional UNet with real, non-zero weights everywhere.
pub(crate) fn golden_weights_with_inputs(in_channels: usize) -> TensorMap {
    let mut weights = golden_weights();
    let conv = weights["input_blocks.0.0.weight"].clone();
    let [c_out, c_in, kh, kw] = conv.shape[..] else { panic!("a 4-d input convolution") };
    let old = conv.to_f32();
    let per_in = kh * kw;
    let widened: Vec<f32> = (0..c_out)
        .flat_map(|o| (0..in_channels).map(move |i| (o, i % c_in)))
        .flat_map(|(o, i)| old[(o * c_in + i) * per_in..(o * c_in + i + 1) * per_in].to_vec())
        .collect();
    weights.insert("input_blocks.0.0.weight".into(), HostTensor::f32(vec![c_out, in_channels, kh, kw], widened));
    weights
}

pub(crate) fn check<B: Backend>(model: &UNetModel<B>, device: &B::Device, rel: f64) {
    let io = io(CASE);
    let x = tensor::<B, 4>(get(&io, "x"), device);
    let t = tensor::<B, 1>(get(&io, "t"), device);
    assert_close("emb", &values(model.embedding(t.clone(), None)), &get(&io, "debug.emb").to_f32(), rel, 1e-6);
    assert_close("v", &values(model.forward(t, x, None)), &get(&io, "v").to_f32(), rel, 1e-6);
}

/// The network with weights in `precision` (f16 or bf16): within that format's rounding of the reference, and
/// not equal to the f32 output.
pub(crate) fn guided_unet_in_half_precision<B: Backend>(device: &B::Device, precision: Precision) {
    let model = VelocityModel::GuidedUnet(UNetModel::<B>::load(&golden_config(), &golden_weights(), device).unwrap());
    assert_unconditional_half_precision(CASE, model, device, precision);
}

#[test]
fn guided_unet_computes_in_f16_on_wgpu() {
    if let Some(device) = wgpu() {
        guided_unet_in_half_precision::<Wgpu>(&device, Precision::F16);
    }
}

#[test]
fn guided_unet_matches_reference_from_pth_on_cpu() {
    let model = UNetModel::<Cpu>::load(&golden_config(), &golden_weights(), &cpu()).unwrap();
    check(&model, &cpu(), 1e-5);
}

#[test]
fn guided_unet_matches_reference_from_safetensors_on_cpu() {
    let Some(path) = shared(&format!("golden/{CASE}/model.safetensors")) else { return };
    let weights = read_weights(&path).unwrap().tensors;
    let model = UNetModel::<Cpu>::load(&golden_config(), &weights, &cpu()).unwrap();
    check(&model, &cpu(), 1e-5);
}

#[test]
fn guided_unet_matches_reference_on_wgpu() {
    let Some(device) = wgpu() else { return };
    let model = UNetModel::<Wgpu>::load(&golden_config(), &golden_weights(), &device).unwrap();
    check(&model, &device, 1e-4);
}

/// `QKVAttention` splits q|k|v before the heads; the same weights with their qkv rows permuted into that order
/// must give the legacy model's output exactly.
#[test]
fn new_attention_order_is_the_legacy_order_permuted() {
    let legacy = golden_weights();
    let config = golden_config();
    let mut permuted = legacy.clone();
    for (key, tensor) in legacy.iter().filter(|(k, _)| k.contains(".qkv.")) {
        let rows = tensor.shape[0];
        let per_row = tensor.numel() / rows;
        let c = rows / 3;
        let heads = config.num_heads;
        let ch = c / heads;
        let old = tensor.to_f32();
        let mut new = vec![0f32; old.len()];
        for h in 0..heads {
            for part in 0..3 {
                for i in 0..ch {
                    let from = h * 3 * ch + part * ch + i;
                    let to = part * c + h * ch + i;
                    new[to * per_row..(to + 1) * per_row].copy_from_slice(&old[from * per_row..(from + 1) * per_row]);
                }
            }
        }
        permuted.insert(key.clone(), HostTensor::f32(tensor.shape.clone(), new));
    }
    let new_order = UNetConfig { use_new_attention_order: true, ..config };
    let model = UNetModel::<Cpu>::load(&new_order, &permuted, &cpu()).unwrap();
    check(&model, &cpu(), 1e-5);
    // …and the legacy model reading the permuted weights is a different function: the layouts really differ.
    let wrong = UNetModel::<Cpu>::load(&golden_config(), &permuted, &cpu()).unwrap();
    let io = io(CASE);
    let v = values(wrong.forward(tensor(get(&io, "t"), &cpu()), tensor(get(&io, "x"), &cpu()), None));
    let want = get(&io, "v").to_f32();
    assert!(v.iter().zip(&want).any(|(a, b)| (a - b).abs() > 1e-3), "qkv order had no effect");
}

/// A class-conditional UNet adds `label_emb[y]` to the time embedding.
#[test]
fn class_labels_add_their_embedding_row() {
    let classes = 3;
    let config = UNetConfig { num_classes: Some(classes), ..golden_config() };
    let mut weights = golden_weights();
    let emb = 4 * config.model_channels;
    let table: Vec<f32> = (0..classes * emb).map(|i| ((i * 37 % 101) as f32 / 101.0) - 0.5).collect();
    weights.insert("label_emb.weight".into(), HostTensor::f32(vec![classes, emb], table.clone()));
    let model = UNetModel::<Cpu>::load(&config, &weights, &cpu()).unwrap();
    let io = io(CASE);
    let t = tensor::<Cpu, 1>(get(&io, "t"), &cpu());
    let y = burn::tensor::Tensor::<Cpu, 1, burn::tensor::Int>::from_ints([2, 0], &cpu());
    let with = values(model.embedding(t.clone(), Some(y)));
    let without = values(model.embedding(t, None));
    let expected: Vec<f32> =
        without.iter().enumerate().map(|(i, w)| w + table[[2, 0][i / emb] * emb + i % emb]).collect();
    assert_close("emb + label_emb[y]", &with, &expected, 1e-6, 1e-6);
}

fn params(flags: LfmFlags) -> f64 {
    let config = flags.to_model().unwrap();
    config.validate().unwrap();
    let ModelConfig::GuidedUnet(c) = config else { panic!("expected the guided UNet") };
    c.init::<Cpu>(&cpu()).num_params() as f64 / 1e6
}

/// LFM-REFERENCE.md §3.3: celeb256 (ch 1 2 2 2) 153.10M, church (1 2 3 4) 356.07M, celeb512 (1 2 2 2 4) 352.16M,
/// inpainting (9 input channels) 356.08M, semantic synthesis (8) 356.07M.
#[test]
fn full_size_guided_unets_have_the_reference_parameter_counts() {
    let base = || lfm::models::Preset::find("church_adm").unwrap().flags();
    let cases = [
        ("celeb256_adm", lfm::models::Preset::find("celeb256_adm").unwrap().flags(), 153.10),
        ("church_adm", base(), 356.07),
        ("celeb512_adm", lfm::models::Preset::find("celeb512_adm").unwrap().flags(), 352.16),
        ("inpainting", LfmFlags { num_in_channels: 9, ..base() }, 356.08),
        ("semantic", LfmFlags { num_in_channels: 8, ..base() }, 356.07),
    ];
    for (name, flags, want) in cases {
        let got = params(flags);
        assert!((got - want).abs() < 0.005, "{name}: {got:.3}M parameters, reference {want}M");
    }
}

#[test]
fn cpu_group_norm_kernel_equals_the_tensor_route() {
    use burn::module::Param;
    use burn::tensor::{Distribution, Tensor};
    use lfm::nn::{group_norm_reference, Activation, GroupNorm};
    // The same norm on the CPU kernel (ndarray at inference) and as Burn's tensor ops (`group_norm_reference`, the
    // route GPU backends take), with random γ, β, an offset mean and odd spatial sizes.
    for (batch, channels, groups, [h, w]) in [(2, 8, 4, [5, 3]), (3, 64, 32, [8, 8]), (1, 6, 1, [1, 1])] {
        let x = Tensor::<Cpu, 4>::random([batch, channels, h, w], Distribution::Normal(0.5, 2.0), &cpu());
        let [gamma, beta] =
            [0, 1].map(|_| Tensor::<Cpu, 1>::random([channels], Distribution::Normal(0.0, 1.0), &cpu()));
        let [scale, shift] =
            [0, 1].map(|_| Tensor::<Cpu, 2>::random([batch, channels], Distribution::Normal(0.0, 1.0), &cpu()));
        let kernel = GroupNorm {
            weight: Param::from_tensor(gamma.clone()),
            bias: Param::from_tensor(beta.clone()),
            num_groups: groups,
            eps: 1e-5,
        };
        let tensor_ops = |modulation: Option<[Tensor<Cpu, 2>; 2]>, activation| {
            let flat = x.clone().reshape([batch, channels, h * w]);
            let y = group_norm_reference(flat, [gamma.clone(), beta.clone()], modulation, groups, 1e-5, activation);
            y.reshape([batch, channels, h, w])
        };
        for activation in [Activation::None, Activation::Silu] {
            let case = format!("{batch}×{channels}×{h}×{w}, {groups} groups, {activation:?}");
            let got = kernel.forward_activated(x.clone(), activation);
            let want = tensor_ops(None, activation);
            assert_eq!(got.dims(), [batch, channels, h, w], "{case}");
            assert_close(&case, &values(got), &values(want), 2e-6, 2e-6);
            // Per-sample modulations, and one `[1, C]` row for the whole batch (a single time value).
            for rows in [batch, 1] {
                let [scale, shift] = [&scale, &shift].map(|t| t.clone().narrow(0, 0, rows));
                let got = kernel.forward_modulated(x.clone(), scale.clone(), shift.clone(), activation);
                let want = tensor_ops(Some([scale, shift]), activation);
                assert_close(&format!("modulated ({rows} rows) {case}"), &values(got), &values(want), 2e-6, 2e-6);
            }
        }
        // A sample's output does not depend on the rest of the batch.
        let last = kernel.forward_activated(x.clone().narrow(0, batch - 1, 1), Activation::Silu);
        let all = kernel.forward_activated(x, Activation::Silu).narrow(0, batch - 1, 1);
        assert_eq!(values(last), values(all), "batch independence");
    }
    // No pixels: an empty result of the right shape.
    let norm = GroupNorm::<Cpu>::new(8, 4, 1e-5, &cpu());
    assert_eq!(
        norm.forward_activated(Tensor::<Cpu, 4>::zeros([2, 8, 0, 3], &cpu()), Activation::Silu).dims(),
        [2, 8, 0, 3]
    );
}
