//! Fixed-grid solvers with torchdiffeq's semantics (`euler`, `midpoint`, `rk4` = its 3/8-rule variant) and Heun.

use burn::tensor::{backend::Backend, Tensor};

use super::ops::{all_finite, combine};
use super::{Counter, Grid, Method, SolveOptions, SolverError, TimePrecision, Velocity};

/// The time grid, in the state's dtype, from `t0` to `t1` inclusive.
pub(crate) fn time_grid(t0: f64, t1: f64, grid: Grid, p: TimePrecision) -> Vec<f64> {
    let (t0, t1) = (p.round(t0), p.round(t1));
    if t0 == t1 {
        return vec![t0];
    }
    let direction = if t1 > t0 { 1.0 } else { -1.0 };
    let mut times = match grid {
        Grid::StepSize(h) => {
            // torchdiffeq: niters = ceil((end − start)/step + 1), t = arange(niters)·step + start, in the t dtype.
            let h = p.round(h);
            let span = p.sub(t1, t0).abs();
            let niters = p.add(p.round(span / h), 1.0).ceil() as usize;
            (0..niters).map(|i| p.add(t0, direction * p.mul(i as f64, h))).collect::<Vec<_>>()
        }
        Grid::Steps(n) => (0..=n).map(|i| p.round(t0 + (t1 - t0) * i as f64 / n as f64)).collect(),
    };
    if let Some(last) = times.last_mut() {
        *last = t1;
    }
    times
}

pub(crate) fn solve<B: Backend, const D: usize, V: Velocity<B, D> + ?Sized>(
    f: &mut Counter<'_, B, D, V>,
    mut y: Tensor<B, D>,
    options: &SolveOptions,
    method: Method,
) -> Result<Tensor<B, D>, SolverError> {
    let p = f.precision;
    let grid = time_grid(options.t0, options.t1, options.grid, p);
    for (step, pair) in grid.windows(2).enumerate() {
        let (t0, t1) = (pair[0], pair[1]);
        f.reserve(method.evaluations_per_step(), t0)?;
        let dt = p.sub(t1, t0);
        y = match method {
            Method::Euler => {
                let k1 = f.eval(t0, y.clone());
                combine(&y, &[(&k1, dt)], f.fused)
            }
            Method::Midpoint => {
                let half = p.mul(0.5, dt);
                let k1 = f.eval(t0, y.clone());
                let k2 = f.eval(p.add(t0, half), combine(&y, &[(&k1, half)], f.fused));
                combine(&y, &[(&k2, dt)], f.fused)
            }
            Method::Heun => {
                let k1 = f.eval(t0, y.clone());
                let k2 = f.eval(t1, combine(&y, &[(&k1, dt)], f.fused));
                let half = p.mul(0.5, dt);
                combine(&y, &[(&k1, half), (&k2, half)], f.fused)
            }
            Method::Rk4 => rk4_three_eighths(f, &y, t0, t1, dt),
            Method::Dopri5 => unreachable!("dopri5 is adaptive"),
        };
        f.accept(t0, dt);
        if options.check_finite && !all_finite(&y) {
            return Err(SolverError::NonFinite { step, t: t0 });
        }
    }
    Ok(y)
}

/// torchdiffeq's `rk4_alt_step_func` (Kutta's 3/8 rule), operation for operation.
fn rk4_three_eighths<B: Backend, const D: usize, V: Velocity<B, D> + ?Sized>(
    f: &mut Counter<'_, B, D, V>,
    y: &Tensor<B, D>,
    t0: f64,
    t1: f64,
    dt: f64,
) -> Tensor<B, D> {
    let p = f.precision;
    let third = p.round(1.0 / 3.0);
    let two_thirds = p.round(2.0 / 3.0);
    let k1 = f.eval(t0, y.clone());
    if f.fused && lfm_kernels::has_kernels::<B>() {
        // The same stages as one fused combination each (rounded once per element, not once per operation).
        let fused = f.fused;
        let k2 = f.eval(p.add(t0, p.mul(dt, third)), combine(y, &[(&k1, dt * third)], fused));
        let k3 = f.eval(p.add(t0, p.mul(dt, two_thirds)), combine(y, &[(&k2, dt), (&k1, -dt * third)], fused));
        let k4 = f.eval(t1, combine(y, &[(&k1, dt), (&k2, -dt), (&k3, dt)], fused));
        let (eighth, three_eighths) = (dt * 0.125, dt * 0.375);
        return combine(y, &[(&k1, eighth), (&k2, three_eighths), (&k3, three_eighths), (&k4, eighth)], fused);
    }
    // y0 + dt·k1·(1/3)
    let k2 = f.eval(p.add(t0, p.mul(dt, third)), y.clone() + k1.clone().mul_scalar(dt).mul_scalar(third));
    // y0 + dt·(k2 − k1·(1/3))
    let k3 = f
        .eval(p.add(t0, p.mul(dt, two_thirds)), y.clone() + (k2.clone() - k1.clone().mul_scalar(third)).mul_scalar(dt));
    // y0 + dt·(k1 − k2 + k3)
    let k4 = f.eval(t1, y.clone() + (k1.clone() - k2.clone() + k3.clone()).mul_scalar(dt));
    // (k1 + 3·(k2 + k3) + k4)·dt·0.125
    y.clone() + (k1 + (k2 + k3).mul_scalar(3.0) + k4).mul_scalar(dt).mul_scalar(0.125)
}
