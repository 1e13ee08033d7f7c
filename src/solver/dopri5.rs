//! Adaptive Dormand–Prince 5(4), reproducing torchdiffeq 0.2.5's `dopri5` as LFM calls it.
//!
//! Step control runs on the host in f64; inside a step, times and tableau weights are rounded to the state dtype
//! (see [`TimePrecision`]). The state never leaves the device: each attempted step sends one scalar (the error
//! norm) back to the host. torchdiffeq integrates a decreasing interval by negating time and the field; negation
//! is exact in floating point, so integrating directly with a signed step gives the same numbers.

use burn::tensor::{backend::Backend, Tensor};

use super::ops::{combine, error_ratio, rms};
use super::tableau::{ALPHA, BETA, C_ERROR, C_MID, DFACTOR, IFACTOR, ORDER, SAFETY};
use super::{Counter, SolveOptions, SolverError, TimePrecision, Velocity};

/// The dense output of the last accepted step: torchdiffeq's quartic `y(x) = e + d·x + c·x² + b·x³ + a·x⁴`,
/// `x = (t − t0)/(t1 − t0)`, kept as the step's tensors and evaluated only when asked (LFM asks once, at the end).
struct Interpolant<B: Backend, const D: usize> {
    t0: f64,
    t1: f64,
    dt: f64,
    y0: Tensor<B, D>,
    y1: Tensor<B, D>,
    k: [Tensor<B, D>; 7],
}

impl<B: Backend, const D: usize> Interpolant<B, D> {
    /// The value at `t`: torchdiffeq's `_interp_fit` + `_interp_evaluate` operation for operation, or, fused, the same
    /// polynomial expanded into one linear combination of the step's tensors with weights computed in f64.
    fn evaluate(&self, t: f64, p: TimePrecision, fused: bool) -> Tensor<B, D> {
        let x = p.round((t - self.t0) / (self.t1 - self.t0));
        if fused && lfm_kernels::has_kernels::<B>() {
            return self.evaluate_fused(x);
        }
        let (y0, y1, k, dt) = (&self.y0, &self.y1, &self.k, self.dt);
        let terms: Vec<(&Tensor<B, D>, f64)> = k.iter().zip(C_MID).map(|(k, c)| (k, p.mul(dt, p.round(c)))).collect();
        let y_mid = combine(y0, &terms, false);
        let (f0, f1) = (&k[0], &k[6]);
        let s = |x: f64| p.round(x);
        // a = 2·dt·(f1 − f0) − 8·(y1 + y0) + 16·y_mid
        let a = (f1.clone() - f0.clone()).mul_scalar(p.mul(2.0, dt)) - (y1.clone() + y0.clone()).mul_scalar(8.0)
            + y_mid.clone().mul_scalar(16.0);
        // b = dt·(5·f0 − 3·f1) + 18·y0 + 14·y1 − 32·y_mid
        let b = (f0.clone().mul_scalar(5.0) - f1.clone().mul_scalar(3.0)).mul_scalar(s(dt))
            + y0.clone().mul_scalar(18.0)
            + y1.clone().mul_scalar(14.0)
            - y_mid.clone().mul_scalar(32.0);
        // c = dt·(f1 − 4·f0) − 11·y0 − 5·y1 + 16·y_mid
        let c = (f1.clone() - f0.clone().mul_scalar(4.0)).mul_scalar(s(dt))
            - y0.clone().mul_scalar(11.0)
            - y1.clone().mul_scalar(5.0)
            + y_mid.mul_scalar(16.0);
        let d = f0.clone().mul_scalar(s(dt));
        // Power sum (not Horner), as torchdiffeq.
        let mut total = y0.clone() + d.mul_scalar(x);
        let mut power = x;
        for coefficient in [c, b, a] {
            power = p.mul(power, x);
            total = total + coefficient.mul_scalar(power);
        }
        total
    }

    /// Collecting the quartic's terms by tensor: y0·(1 − 11x² + 18x³ − 8x⁴) + y1·(−5x² + 14x³ − 8x⁴)
    /// + y_mid·16x²(1 − x)² + dt·f0·x(1 − x)²(1 − 2x) + dt·f1·x²(x − 1)(2x − 1), with y_mid = y0 + dt·Σ c_mid_i·k_i.
    fn evaluate_fused(&self, x: f64) -> Tensor<B, D> {
        let (x2, x3, x4) = (x * x, x * x * x, x * x * x * x);
        let mid = 16.0 * x2 - 32.0 * x3 + 16.0 * x4;
        let mut k_weights: [f64; 7] = std::array::from_fn(|i| mid * self.dt * C_MID[i]);
        k_weights[0] += self.dt * (x - 4.0 * x2 + 5.0 * x3 - 2.0 * x4);
        k_weights[6] += self.dt * (x2 - 3.0 * x3 + 2.0 * x4);
        let mut terms = vec![
            (&self.y0, 1.0 - 11.0 * x2 + 18.0 * x3 - 8.0 * x4 + mid),
            (&self.y1, -5.0 * x2 + 14.0 * x3 - 8.0 * x4),
        ];
        terms.extend(self.k.iter().zip(k_weights));
        lfm_kernels::rk::linear_combination_on(&terms, true)
    }
}

pub(crate) fn solve<B: Backend, const D: usize, V: Velocity<B, D> + ?Sized>(
    f: &mut Counter<'_, B, D, V>,
    y0: Tensor<B, D>,
    options: &SolveOptions,
) -> Result<Tensor<B, D>, SolverError> {
    let p = f.precision;
    let (t_start, t_end) = (options.t0, options.t1);
    if t_start == t_end {
        return Ok(y0);
    }
    let direction = if t_end > t_start { 1.0 } else { -1.0 };
    let (rtol, atol) = (options.rtol, options.atol);

    f.reserve(2, t_start)?;
    let f0 = f.eval(t_start, y0.clone());
    let mut h = match options.first_step {
        Some(h) => h,
        None => initial_step(f, &y0, &f0, t_start, direction, rtol, atol),
    };

    let (mut y, mut k_first, mut t) = (y0, f0, t_start);
    let mut last: Option<Interpolant<B, D>> = None;
    let mut attempt = 0usize;
    // torchdiffeq steps past the end and interpolates back; it never clips the last step.
    while direction * (t_end - t) > 0.0 {
        f.reserve(6, t)?;
        let t_next = t + direction * h;
        if t_next == t {
            return Err(SolverError::StepUnderflow { t, dt: direction * h });
        }
        // Inside the step, t0, dt and t1 live in the state dtype.
        let (t0s, dts, t1s) = (p.round(t), p.round(direction * h), p.round(t_next));
        let mut k: [Tensor<B, D>; 7] = std::array::from_fn(|_| k_first.clone());
        let mut y_stage = y.clone();
        for (i, (alpha, beta)) in ALPHA.iter().zip(BETA).enumerate() {
            let terms: Vec<(&Tensor<B, D>, f64)> =
                k[..=i].iter().zip(beta).map(|(k, b)| (k, p.mul(p.round(*b), dts))).collect();
            y_stage = combine(&y, &terms, f.fused);
            k[i + 1] = if *alpha == 1.0 {
                // Stages at the step's end are evaluated one ulp inside the step (torchdiffeq's Perturb.PREV).
                let nudged = p.next_after(t1s, t0s);
                f.eval_at(t1s, nudged, y_stage.clone())
            } else {
                f.eval(p.add(t0s, p.mul(p.round(*alpha), dts)), y_stage.clone())
            };
        }
        // First-same-as-last: the 5th-order solution is the last stage's input.
        let y1 = y_stage;
        let error_terms: Vec<(&Tensor<B, D>, f64)> =
            k.iter().zip(C_ERROR).map(|(k, c)| (k, p.mul(dts, p.round(c)))).collect();
        let ratio = p.round(error_ratio(&error_terms, &y, &y1, rtol, atol, f.fused));
        if !ratio.is_finite() {
            return Err(SolverError::NonFinite { step: attempt, t });
        }
        if ratio <= 1.0 {
            f.accept(t, direction * h);
            let k_last = k[6].clone();
            last = Some(Interpolant { t0: t, t1: t_next, dt: dts, y0: y, y1: y1.clone(), k });
            (y, k_first, t) = (y1, k_last, t_next);
        } else {
            f.stats.rejected += 1;
        }
        h = optimal_step(h, ratio);
        attempt += 1;
    }
    let interpolant = last.expect("the loop accepts at least one step before it ends");
    Ok(interpolant.evaluate(t_end, p, f.fused))
}

/// Hairer's initial step (Solving ODEs I, II.4), as torchdiffeq computes it: in the state dtype, with one probe
/// evaluation at `t0 + h0` whose time is formed in f64.
fn initial_step<B: Backend, const D: usize, V: Velocity<B, D> + ?Sized>(
    f: &mut Counter<'_, B, D, V>,
    y0: &Tensor<B, D>,
    f0: &Tensor<B, D>,
    t0: f64,
    direction: f64,
    rtol: f64,
    atol: f64,
) -> f64 {
    let p = f.precision;
    let scale = y0.clone().abs().mul_scalar(rtol).add_scalar(atol);
    let d0 = p.round(rms(y0.clone() / scale.clone()));
    let d1 = p.round(rms(f0.clone() / scale.clone()));
    let h0 = if d0 < 1e-5 || d1 < 1e-5 { p.round(1e-6) } else { p.round(p.mul(0.01, d0) / d1) };
    let y1 = combine(y0, &[(f0, direction * h0)], f.fused);
    let f1 = f.eval(t0 + direction * h0, y1);
    let d2 = p.round(p.round(rms((f1 - f0.clone()) / scale)) / h0);
    let h1 = if d1 <= 1e-15 && d2 <= 1e-15 {
        p.round(1e-6).max(p.mul(h0, 1e-3))
    } else {
        p.round((p.round(0.01 / d1.max(d2))).powf(1.0 / (ORDER as f64)))
    };
    p.mul(100.0, h0).min(h1)
}

/// torchdiffeq's `_optimal_step_size`: never shrinks after an accepted step, never grows more than 10×.
fn optimal_step(h: f64, ratio: f64) -> f64 {
    if ratio == 0.0 {
        return h * IFACTOR;
    }
    let dfactor = if ratio < 1.0 { 1.0 } else { DFACTOR };
    let factor = IFACTOR.min((SAFETY / ratio.powf(1.0 / ORDER as f64)).max(dfactor));
    h * factor
}
