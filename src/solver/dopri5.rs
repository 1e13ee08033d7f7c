//! Adaptive Dormand–Prince 5(4), reproducing torchdiffeq 0.2.5's `dopri5` as LFM calls it.
//!
//! Step control runs on the host in f64; inside a step, times and tableau weights are rounded to the state dtype
//! (see [`TimePrecision`]). The state never leaves the device: each attempted step sends one scalar (the error
//! norm) back to the host. torchdiffeq integrates a decreasing interval by negating time and the field; negation
//! is exact in floating point, so integrating directly with a signed step gives the same numbers.

use burn::tensor::{backend::Backend, Tensor};

use super::ops::{combine, error_ratio, rms, weighted_sum};
use super::tableau::{ALPHA, BETA, C_ERROR, C_MID, DFACTOR, IFACTOR, ORDER, SAFETY};
use super::{Counter, SolveOptions, SolverError, TimePrecision, Velocity};

/// Coefficients of the dense-output quartic of the last accepted step, `y(x) = e + d·x + c·x² + b·x³ + a·x⁴`
/// for `x = (t − t0)/(t1 − t0)`.
struct Interpolant<B: Backend, const D: usize> {
    t0: f64,
    t1: f64,
    coefficients: [Tensor<B, D>; 5],
}

impl<B: Backend, const D: usize> Interpolant<B, D> {
    /// torchdiffeq's `_interp_fit` from the step's stages.
    fn fit(
        y0: &Tensor<B, D>,
        y1: &Tensor<B, D>,
        k: &[Tensor<B, D>; 7],
        dt: f64,
        t0: f64,
        t1: f64,
        p: TimePrecision,
    ) -> Self {
        let terms: Vec<(&Tensor<B, D>, f64)> = k.iter().zip(C_MID).map(|(k, c)| (k, p.mul(dt, p.round(c)))).collect();
        let y_mid = combine(y0, &terms);
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
        Self { t0, t1, coefficients: [y0.clone(), d, c, b, a] }
    }

    /// torchdiffeq's `_interp_evaluate`: Horner-free power sum, `x` computed in f64 then rounded to the state dtype.
    fn evaluate(&self, t: f64, p: TimePrecision) -> Tensor<B, D> {
        let x = p.round((t - self.t0) / (self.t1 - self.t0));
        let [e, d, rest @ ..] = &self.coefficients;
        let mut total = e.clone() + d.clone().mul_scalar(x);
        let mut power = x;
        for coefficient in rest {
            power = p.mul(power, x);
            total = total + coefficient.clone().mul_scalar(power);
        }
        total
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
            y_stage = combine(&y, &terms);
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
        let ratio = p.round(error_ratio(weighted_sum(&error_terms), &y, &y1, rtol, atol));
        if !ratio.is_finite() {
            return Err(SolverError::NonFinite { step: attempt, t });
        }
        if ratio <= 1.0 {
            f.accept(t, direction * h);
            last = Some(Interpolant::fit(&y, &y1, &k, dts, t, t_next, p));
            let [.., k_last] = k;
            (y, k_first, t) = (y1, k_last, t_next);
        } else {
            f.stats.rejected += 1;
        }
        h = optimal_step(h, ratio);
        attempt += 1;
    }
    let interpolant = last.expect("the loop accepts at least one step before it ends");
    Ok(interpolant.evaluate(t_end, p))
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
    let y1 = combine(y0, &[(f0, direction * h0)]);
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
