//! DiT parity with `golden/dit_tiny` and `golden/dit_tiny_cond_cfg`, from `.pth` and `.safetensors`, cpu and wgpu.

use burn::tensor::backend::Backend;
use lfm::backend::{Cpu, Wgpu};
use lfm::checkpoint::read_weights;
use lfm::models::{DiT, DiTConfig, Precision, VelocityModel};

use crate::common::*;

/// The DiT of a golden case, built from the constructor kwargs in its `config.json`.
pub fn config(case: &str) -> DiTConfig {
    let text = std::fs::read_to_string(fixture(&format!("{case}/config.json"))).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let c = &json["constructor"]["kwargs"];
    let int = |k: &str| c[k].as_u64().unwrap() as usize;
    DiTConfig {
        input_size: int("img_resolution"),
        patch_size: int("patch_size"),
        in_channels: int("in_channels"),
        hidden_size: int("hidden_size"),
        depth: int("depth"),
        num_heads: int("num_heads"),
        mlp_ratio: c["mlp_ratio"].as_f64().unwrap(),
        num_classes: int("num_classes"),
        label_dropout: c["label_dropout"].as_f64().unwrap(),
        learn_sigma: c["learn_sigma"].as_bool().unwrap(),
    }
}

/// The golden DiT of `case` loaded from `file` (`model.pth` or `model.safetensors`).
pub fn load<B: Backend>(case: &str, file: &str, device: &B::Device) -> DiT<B> {
    let weights = read_weights(&fixture(&format!("{case}/{file}"))).unwrap();
    DiT::load(&config(case), &weights.tensors, device).unwrap()
}

const REL: f64 = 1e-5;
const ABS: f64 = 1e-6;

pub(crate) fn unconditional<B: Backend>(device: &B::Device, file: &str, rel: f64) {
    let io = io("dit_tiny");
    let model = load::<B>("dit_tiny", file, device);
    let x = tensor::<B, 4>(get(&io, "x"), device);
    let t = tensor::<B, 1>(get(&io, "t"), device);
    assert_close("t_emb", &values(model.t_embedder.forward(t.clone())), &get(&io, "debug.t_emb").to_f32(), rel, ABS);
    assert_close(
        "patch_tokens",
        &values(model.x_embedder.forward(x.clone())),
        &get(&io, "debug.patch_tokens").to_f32(),
        rel,
        ABS,
    );
    assert_close("v", &values(model.forward(t, x.clone(), None)), &get(&io, "v").to_f32(), rel, ABS);
    let t_scalar = tensor::<B, 1>(get(&io, "t_scalar"), device);
    assert_close("v_scalar_t", &values(model.forward(t_scalar, x, None)), &get(&io, "v_scalar_t").to_f32(), rel, ABS);
}

pub(crate) fn conditional<B: Backend>(device: &B::Device, file: &str, rel: f64) {
    let io = io("dit_tiny_cond_cfg");
    let model = load::<B>("dit_tiny_cond_cfg", file, device);
    assert_eq!(model.config.label_rows(), 11);
    let x = tensor::<B, 4>(get(&io, "x"), device);
    let t = tensor::<B, 1>(get(&io, "t"), device);
    let y = int_tensor::<B, 1>(get(&io, "y"), device);
    assert_close("y_emb", &values(model.y_embedder.forward(y.clone())), &get(&io, "debug.y_emb").to_f32(), rel, ABS);
    assert_close("v", &values(model.forward(t, x, Some(y))), &get(&io, "v").to_f32(), rel, ABS);
    let cx = tensor::<B, 4>(get(&io, "cfg.x"), device);
    let cy = int_tensor::<B, 1>(get(&io, "cfg.y"), device);
    let ct = tensor::<B, 1>(get(&io, "cfg.t"), device);
    let guided = model.forward_with_cfg(ct, cx, cy, 1.5);
    assert_close("cfg.v", &values(guided), &get(&io, "cfg.v").to_f32(), rel, ABS);
}

#[test]
fn dit_matches_reference_from_pth_on_cpu() {
    unconditional::<Cpu>(&cpu(), "model.pth", REL);
}

#[test]
fn dit_matches_reference_from_safetensors_on_cpu() {
    unconditional::<Cpu>(&cpu(), "model.safetensors", REL);
}

#[test]
fn conditional_dit_and_cfg_match_reference_on_cpu() {
    conditional::<Cpu>(&cpu(), "model.pth", REL);
    conditional::<Cpu>(&cpu(), "model.safetensors", REL);
}

#[test]
fn dit_and_cfg_match_reference_on_wgpu() {
    if let Some(device) = wgpu() {
        unconditional::<Wgpu>(&device, "model.safetensors", 1e-4);
        conditional::<Wgpu>(&device, "model.pth", 1e-4);
    }
}

/// DiT and its CFG forward with weights in `precision` (f16 or bf16): within that format's rounding of the
/// reference, and not equal to the f32 output.
pub(crate) fn dit_and_cfg_in_half_precision<B: Backend>(device: &B::Device, precision: Precision) {
    let io = io("dit_tiny_cond_cfg");
    let model = VelocityModel::Dit(load::<B>("dit_tiny_cond_cfg", "model.pth", device));
    let x = tensor::<B, 4>(get(&io, "x"), device);
    let t = tensor::<B, 1>(get(&io, "t"), device);
    let y = int_tensor::<B, 1>(get(&io, "y"), device);
    let (cx, ct) = (tensor::<B, 4>(get(&io, "cfg.x"), device), tensor::<B, 1>(get(&io, "cfg.t"), device));
    let cy = int_tensor::<B, 1>(get(&io, "cfg.y"), device);
    let full = values(model.forward(t.clone(), x.clone(), Some(y.clone())));
    let full_cfg = values(model.forward_with_cfg(ct.clone(), cx.clone(), cy.clone(), 1.5).unwrap());
    let half = half_model(model, precision);
    let v = half.forward(t, x, Some(y));
    assert_eq!(v.dtype(), burn::tensor::DType::F32, "the output comes back in the input's dtype");
    assert_half_close("v", precision, &values(v), &full, &get(&io, "v").to_f32());
    let guided = values(half.forward_with_cfg(ct, cx, cy, 1.5).unwrap());
    assert_half_close("cfg.v", precision, &guided, &full_cfg, &get(&io, "cfg.v").to_f32());
}

#[test]
fn dit_and_cfg_compute_in_f16_on_wgpu() {
    if let Some(device) = wgpu() {
        dit_and_cfg_in_half_precision::<Wgpu>(&device, Precision::F16);
    }
}

#[test]
fn pos_embed_equals_the_constructor_table() {
    // The stored pos_embed is the fixed sin-cos table; our init must compute the same one.
    let weights = read_weights(&fixture("dit_tiny/model.safetensors")).unwrap();
    let stored = weights.tensors["pos_embed"].to_f32();
    let computed = values(config("dit_tiny").init::<Cpu>(&cpu()).pos_embed.val());
    assert_close("pos_embed", &computed, &stored, 1e-6, 1e-7);
}

#[test]
fn named_sizes_have_the_reference_parameter_counts() {
    use burn::module::Module;
    // LFM-REFERENCE.md §3.2 (analytic, without the frozen pos_embed): DiT-B/2 129.54M with 1 class and 130.30M
    // with 1001 label rows (ImageNet); DiT-L/2 456.80M.
    let millions = |cfg: DiTConfig| {
        let pos_embed = cfg.num_tokens() * cfg.hidden_size;
        (cfg.init::<Cpu>(&cpu()).num_params() - pos_embed) as f64 / 1e6
    };
    for (name, classes, dropout, want) in
        [("DiT-B/2", 1, 0.0, 129.54), ("DiT-B/2", 1000, 0.1, 130.30), ("DiT-L/2", 1, 0.0, 456.80)]
    {
        let got = millions(DiTConfig::named(name, 32, 4, classes, dropout).unwrap());
        assert!(
            (got - want).abs() < 0.005,
            "{name} with {classes} classes has {got:.3}M parameters, reference {want}M"
        );
    }
}

/// Training's label dropout: none at p = 0, all at p = 1, about half at p = 0.5; the same draws for the same (seed,
/// step), whatever the batch is split into, and fresh ones at the next step.
#[test]
fn label_dropout_is_keyed_by_seed_and_step() {
    use lfm::train::batches::label_dropout;
    assert!(label_dropout(7, 3, 64, 0.0).iter().all(|&d| !d));
    assert!(label_dropout(7, 3, 64, 1.0).iter().all(|&d| d));
    let half = label_dropout(7, 3, 4096, 0.5);
    let share = half.iter().filter(|&&d| d).count() as f64 / half.len() as f64;
    assert!((share - 0.5).abs() < 0.03, "dropped {share:.3} of the labels with p = 0.5");
    assert_eq!(label_dropout(7, 3, 4096, 0.5), half, "a resumed step draws the same labels");
    assert_eq!(label_dropout(7, 3, 100, 0.5)[..], half[..100], "draws depend on the place in the batch only");
    assert_ne!(label_dropout(7, 4, 4096, 0.5), half, "the next step draws afresh");
    assert_ne!(label_dropout(8, 3, 4096, 0.5), half, "another seed draws afresh");
}

#[test]
fn cpu_dit_kernels_equal_burns_ops() {
    use burn::tensor::{Distribution, Tensor};
    use lfm::nn::{cpu, Activation};
    let normal = |dims: [usize; 3]| Tensor::<Cpu, 3>::random(dims, Distribution::Normal(0.0, 1.0), &cpu());
    // Linear: one block of rows and several (64 rows per task), row-major weights and the transposed views
    // checkpoints load, with and without bias.
    for (batch, tokens, k, n) in [(2, 7, 16, 48), (3, 49, 64, 192), (1, 1, 5, 3)] {
        for (transposed, with_bias) in [(false, true), (true, true), (true, false)] {
            let x = normal([batch, tokens, k]);
            let weight = if transposed {
                Tensor::<Cpu, 2>::random([n, k], Distribution::Normal(0.0, 1.0), &cpu()).transpose()
            } else {
                Tensor::<Cpu, 2>::random([k, n], Distribution::Normal(0.0, 1.0), &cpu())
            };
            let bias = with_bias.then(|| Tensor::<Cpu, 1>::random([n], Distribution::Normal(0.0, 1.0), &cpu()));
            let case = format!("{batch}×{tokens}×{k} → {n}, transposed {transposed}, bias {with_bias}");
            let want = burn::tensor::module::linear(x.clone(), weight.clone(), bias.clone());
            let got = cpu::linear(x.clone(), weight.clone(), bias.clone(), Activation::None);
            assert_eq!(got.dims(), [batch, tokens, n], "{case}");
            assert_close(&case, &values(got.clone()), &values(want), 1e-5 * (k as f64).sqrt(), 1e-5);
            // The fused activations are the tensor expressions on the same output: ReLU exactly, GELU to the
            // rounding of its exponential (lfm's vectorised `exp` against the C library's, within 2 ulp).
            let relu = values(cpu::linear(x.clone(), weight.clone(), bias.clone(), Activation::Relu));
            assert_eq!(relu, values(Activation::Relu.apply(got.clone())), "ReLU {case}");
            let gelu = values(cpu::linear(x.clone(), weight.clone(), bias.clone(), Activation::GeluTanh));
            assert_close(&format!("GELU {case}"), &gelu, &values(Activation::GeluTanh.apply(got.clone())), 1e-6, 1e-7);
            // A sample's rows do not depend on the rest of the batch (sampling promises the same result for any
            // batch size).
            let last = cpu::linear(x.clone().narrow(0, batch - 1, 1), weight, bias, Activation::None);
            assert_eq!(values(last), values(got.narrow(0, batch - 1, 1)), "batch independence, {case}");
        }
    }
    // Attention straight from a fused qkv projection: against the tensor route (split heads, Burn's attention,
    // heads joined) on 1 to 4 heads, odd token counts included; a sample's output does not depend on the batch.
    for (batch, tokens, heads, head_dim) in [(2, 7, 1, 8), (3, 49, 4, 32), (1, 1, 2, 3)] {
        let c = heads * head_dim;
        let qkv = normal([batch, tokens, 3 * c]);
        let split = qkv.clone().reshape([batch, tokens, 3, heads, head_dim]).permute([2, 0, 3, 1, 4]);
        let part = |i: usize| split.clone().narrow(0, i, 1).squeeze_dim::<4>(0);
        let want = lfm_kernels::attention::attention_reference(part(0), part(1), part(2))
            .swap_dims(1, 2)
            .reshape([batch, tokens, c]);
        let got = lfm::nn::attention::packed_attention(qkv.clone(), heads);
        let case = format!("attention {batch}×{tokens}, {heads} heads of {head_dim}");
        assert_eq!(got.dims(), [batch, tokens, c], "{case}");
        assert_close(&case, &values(got.clone()), &values(want), 1e-5, 1e-6);
        let last = lfm::nn::attention::packed_attention(qkv.narrow(0, batch - 1, 1), heads);
        assert_eq!(values(last), values(got.narrow(0, batch - 1, 1)), "batch independence, {case}");
    }
    // adaLN and the gated residual, per-sample vectors over tokens.
    let (x, y) = (normal([3, 10, 24]), normal([3, 10, 24]));
    let [shift, scale, gate] =
        [0, 1, 2].map(|_| Tensor::<Cpu, 2>::random([3, 24], Distribution::Normal(0.0, 1.0), &cpu()));
    let want = lfm::nn::modulate(lfm::nn::layer_norm(x.clone(), 1e-6), shift.clone(), scale.clone());
    let got = lfm::nn::layer_norm_modulate(x.clone(), shift, scale, 1e-6);
    assert_close("layer_norm_modulate", &values(got), &values(want), 1e-6, 1e-6);
    let want = x.clone() + gate.clone().unsqueeze_dim::<3>(1) * y.clone();
    assert_eq!(values(lfm::nn::add_gated(x, gate.clone(), y)), values(want), "add_gated");
    // No tokens: empty results of the right shape, not a panic.
    let none = Tensor::<Cpu, 3>::zeros([3, 0, 24], &cpu());
    let [shift, scale] = [0, 1].map(|_| Tensor::<Cpu, 2>::zeros([3, 24], &cpu()));
    assert_eq!(lfm::nn::layer_norm_modulate(none.clone(), shift, scale, 1e-6).dims(), [3, 0, 24]);
    assert_eq!(lfm::nn::add_gated(none.clone(), gate, none.clone()).dims(), [3, 0, 24]);
    assert_eq!(lfm::nn::attention::packed_attention(Tensor::<Cpu, 3>::zeros([3, 0, 72], &cpu()), 4).dims(), [3, 0, 24]);
}
