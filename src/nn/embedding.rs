//! Sinusoidal embeddings of time and position.

use burn::tensor::{backend::Backend, Tensor, TensorData};

/// Sinusoidal time embedding `[cos(t·f_i), sin(t·f_i)]` with `f_i = exp(−ln(max_period)·i/half)`, `half = dim/2`
/// (GLIDE / guided-diffusion / DiT; raw t, no ×1000). An odd `dim` gets a zero column at the end.
pub fn timestep_embedding<B: Backend>(t: Tensor<B, 1>, dim: usize, max_period: f64) -> Tensor<B, 2> {
    let half = dim / 2;
    let (device, t_dtype) = (t.device(), t.dtype());
    // The reference computes the frequencies in float32.
    let freqs: Vec<f32> = (0..half).map(|i| ((-(max_period.ln() as f32)) * i as f32 / half as f32).exp()).collect();
    let freqs = Tensor::<B, 1>::from_data(TensorData::new(freqs, [half]), (&device, t_dtype));
    let args = t.unsqueeze_dim::<2>(1) * freqs.unsqueeze_dim(0);
    let mut embedding = Tensor::cat(vec![args.clone().cos(), args.sin()], 1);
    if dim % 2 == 1 {
        let n = embedding.dims()[0];
        embedding = Tensor::cat(vec![embedding, Tensor::zeros([n, 1], (&device, t_dtype))], 1);
    }
    embedding
}

/// MAE's fixed 2-D sin-cos positional table for a `grid × grid` token grid, `[grid², dim]`, row-major tokens.
/// The first `dim/2` channels encode the column index, the last `dim/2` the row; each half is `[sin, cos]` with
/// `ω_i = 10000^(−i/(dim/4))`, computed in f64 as numpy does.
pub fn sincos_2d_table(dim: usize, grid: usize) -> Vec<f32> {
    assert!(dim.is_multiple_of(4), "the 2-D sin-cos table needs a width divisible by 4");
    let quarter = dim / 4;
    let omega: Vec<f64> = (0..quarter).map(|i| 1.0 / 10000f64.powf(i as f64 / quarter as f64)).collect();
    let mut table = Vec::with_capacity(grid * grid * dim);
    for row in 0..grid {
        for col in 0..grid {
            for pos in [col as f32 as f64, row as f32 as f64] {
                table.extend(omega.iter().map(|w| (pos * w).sin() as f32));
                table.extend(omega.iter().map(|w| (pos * w).cos() as f32));
            }
        }
    }
    table
}
