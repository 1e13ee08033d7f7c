//! The Dormand–Prince 5(4) tableau, in one place for the generic solver and the fused kernels.
//!
//! Values are the exact rationals torchdiffeq uses (`dopri5.py`), evaluated in f64; solvers round them to
//! the state dtype before use, as torchdiffeq does when it moves the tableau to the state's dtype.

/// Stage times `c_i` of the six new stages of a step (the first stage reuses the previous step's last one).
pub const ALPHA: [f64; 6] = [1.0 / 5.0, 3.0 / 10.0, 4.0 / 5.0, 8.0 / 9.0, 1.0, 1.0];

/// Row `i` holds the weights `a_{i+1, j}` of the stage inputs `y + h·Σ_j a_{i+1,j}·k_j`, `j = 0..=i`.
pub const BETA: [&[f64]; 6] = [
    &[1.0 / 5.0],
    &[3.0 / 40.0, 9.0 / 40.0],
    &[44.0 / 45.0, -56.0 / 15.0, 32.0 / 9.0],
    &[19372.0 / 6561.0, -25360.0 / 2187.0, 64448.0 / 6561.0, -212.0 / 729.0],
    &[9017.0 / 3168.0, -355.0 / 33.0, 46732.0 / 5247.0, 49.0 / 176.0, -5103.0 / 18656.0],
    &[35.0 / 384.0, 0.0, 500.0 / 1113.0, 125.0 / 192.0, -2187.0 / 6784.0, 11.0 / 84.0],
];

/// Weights of the 5th-order solution. They equal the last row of [`BETA`] (first-same-as-last), so the solution
/// is the input of the last stage and costs no extra pass.
pub const C_SOL: [f64; 7] = [35.0 / 384.0, 0.0, 500.0 / 1113.0, 125.0 / 192.0, -2187.0 / 6784.0, 11.0 / 84.0, 0.0];

/// Weights of the error estimate: 5th-order minus 4th-order solution.
pub const C_ERROR: [f64; 7] = [
    35.0 / 384.0 - 1951.0 / 21600.0,
    0.0,
    500.0 / 1113.0 - 22642.0 / 50085.0,
    125.0 / 192.0 - 451.0 / 720.0,
    -2187.0 / 6784.0 - -12231.0 / 42400.0,
    11.0 / 84.0 - 649.0 / 6300.0,
    -1.0 / 60.0,
];

/// Weights giving the solution at the step's midpoint, for the dense-output (4th-order Hermite) polynomial.
pub const C_MID: [f64; 7] = [
    6025192743.0 / 30085553152.0 / 2.0,
    0.0,
    51252292925.0 / 65400821598.0 / 2.0,
    -2691868925.0 / 45128329728.0 / 2.0,
    187940372067.0 / 1594534317056.0 / 2.0,
    -1776094331.0 / 19743644256.0 / 2.0,
    11237099.0 / 235043384.0 / 2.0,
];

/// Order of the method, used by the step-size controller (`h·min(10, max(0.9·err^(−1/5), 0.2))`).
pub const ORDER: u32 = 5;

/// Safety factor of the step-size controller.
pub const SAFETY: f64 = 0.9;

/// Largest growth of the step size after one step.
pub const IFACTOR: f64 = 10.0;

/// Largest shrink of the step size after a rejected step.
pub const DFACTOR: f64 = 0.2;
