//! The LFM path against `golden/fm_loss` (x_t, u, loss) on cpu and wgpu: `path_sample` and `loss` are what a
//! training step computes.

use burn::tensor::backend::Backend;
use lfm::backend::{Cpu, Wgpu};
use lfm::flow;

use crate::common::*;

pub(crate) fn check<B: Backend>(device: &B::Device) {
    let io = io("fm_loss");
    let z0 = tensor::<B, 4>(get(&io, "z0"), device);
    let z1 = tensor::<B, 4>(get(&io, "z1"), device);
    let t = tensor::<B, 1>(get(&io, "t"), device);
    let path = flow::path_sample(z0, z1, t);
    assert_close("x_t", &values(path.x_t), &get(&io, "x_t").to_f32(), 1e-6, 1e-7);
    assert_close("u", &values(path.u.clone()), &get(&io, "u").to_f32(), 1e-6, 1e-7);
    let v = tensor::<B, 4>(get(&io, "v"), device);
    let loss = flow::loss(v, path.u);
    assert_close("loss", &values(loss), &get(&io, "loss").to_f32(), 1e-6, 0.0);
}

#[test]
fn path_and_loss_match_reference_on_cpu() {
    check::<Cpu>(&cpu());
}

#[test]
fn path_and_loss_match_reference_on_wgpu() {
    if let Some(device) = wgpu() {
        check::<Wgpu>(&device);
    }
}
