//! ODE solvers for `dx/dt = v(t, x)` over Burn tensors.
//!
//! The solvers know nothing about flow matching: they integrate any [`Velocity`] from `t0` to `t1` (forwards or
//! backwards). `dopri5` reproduces torchdiffeq's adaptive solver as LFM calls it (float64 step control on the
//! host, stage times in the state dtype, dense-output end value); `euler`, `midpoint` and `rk4` reproduce its
//! fixed-grid solvers; `heun` is the classic 2-evaluation trapezoidal predictor–corrector.

mod dopri5;
mod fixed;
mod ops;
mod precision;
pub use lfm_kernels::tableau;

use std::fmt;
use std::str::FromStr;

use burn::tensor::{backend::Backend, Tensor};

pub use precision::TimePrecision;

/// A velocity field `v(t, x)`: the right-hand side of the ODE.
pub trait Velocity<B: Backend, const D: usize> {
    /// Evaluates the field. `t` is the exact time the field must see, already rounded to the state's dtype.
    fn velocity(&mut self, t: f64, x: Tensor<B, D>) -> Tensor<B, D>;
}

impl<B: Backend, const D: usize, F> Velocity<B, D> for F
where
    F: FnMut(f64, Tensor<B, D>) -> Tensor<B, D>,
{
    fn velocity(&mut self, t: f64, x: Tensor<B, D>) -> Tensor<B, D> {
        self(t, x)
    }
}

/// The integration method.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Method {
    /// Adaptive Dormand–Prince 5(4), torchdiffeq's `dopri5` (LFM's default).
    #[default]
    Dopri5,
    /// Explicit Euler, 1 evaluation per step.
    Euler,
    /// Explicit midpoint, 2 evaluations per step.
    Midpoint,
    /// Heun's method (trapezoidal predictor–corrector), 2 evaluations per step.
    Heun,
    /// torchdiffeq's `rk4`: the 3/8-rule fourth-order method, 4 evaluations per step.
    Rk4,
}

impl Method {
    /// Every method, in the order the CLI lists them.
    pub const ALL: [Method; 5] = [Method::Dopri5, Method::Euler, Method::Midpoint, Method::Heun, Method::Rk4];

    /// The method's name as the CLI and torchdiffeq spell it.
    pub fn name(self) -> &'static str {
        match self {
            Method::Dopri5 => "dopri5",
            Method::Euler => "euler",
            Method::Midpoint => "midpoint",
            Method::Heun => "heun",
            Method::Rk4 => "rk4",
        }
    }

    /// Whether the method chooses its own steps.
    pub fn is_adaptive(self) -> bool {
        matches!(self, Method::Dopri5)
    }

    /// Velocity evaluations per step of a fixed-step method.
    pub fn evaluations_per_step(self) -> usize {
        match self {
            Method::Euler => 1,
            Method::Midpoint | Method::Heun => 2,
            Method::Rk4 => 4,
            Method::Dopri5 => 6,
        }
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Method {
    type Err = SolverError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Method::ALL
            .into_iter()
            .find(|m| m.name() == s.to_ascii_lowercase())
            .ok_or_else(|| SolverError::UnknownMethod(s.to_string()))
    }
}

/// How a fixed-step method lays out its grid.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Grid {
    /// torchdiffeq's `step_size` option: `ceil(|t1 − t0| / h + 1)` points `t0 ± i·h` built in the state dtype, the
    /// last one replaced by `t1` (LFM's `--step_size`, default 0.01).
    StepSize(f64),
    /// Exactly this many equal steps from `t0` to `t1`.
    Steps(usize),
}

/// Everything a solve needs besides the field and the initial state.
#[derive(Debug, Clone, PartialEq)]
pub struct SolveOptions {
    /// The integration method.
    pub method: Method,
    /// Start time (LFM: 1.0, noise).
    pub t0: f64,
    /// End time (LFM: 0.0, data).
    pub t1: f64,
    /// Relative tolerance of the adaptive method.
    pub rtol: f64,
    /// Absolute tolerance of the adaptive method.
    pub atol: f64,
    /// First step of the adaptive method (magnitude); `None` selects it with Hairer's algorithm as torchdiffeq does.
    pub first_step: Option<f64>,
    /// Grid of the fixed-step methods.
    pub grid: Grid,
    /// Refuse to spend more than this many velocity evaluations (an error, never a hang).
    pub max_nfe: Option<usize>,
    /// Check the state for NaN/inf after every fixed step (the adaptive method always checks, through its error norm).
    pub check_finite: bool,
    /// Keep every evaluated time and every accepted step in the statistics.
    pub record: bool,
    /// Use lfm's fused CubeCL kernels for the RK arithmetic where the backend has them and they are switched on
    /// (`lfm_kernels::has_kernels`); the plain Burn tensor expressions otherwise. Both give the same steps; fused rounds once per element instead of once
    /// per operation.
    pub fused_kernels: bool,
}

impl Default for SolveOptions {
    /// LFM's sampling defaults: dopri5 from t = 1 to t = 0 (its `odeint(t=[1, 0])`) with atol = rtol = 1e-5.
    fn default() -> Self {
        Self {
            method: Method::Dopri5,
            t0: 1.0,
            t1: 0.0,
            rtol: 1e-5,
            atol: 1e-5,
            first_step: None,
            grid: Grid::StepSize(0.01),
            max_nfe: Some(100_000),
            check_finite: true,
            record: false,
            fused_kernels: true,
        }
    }
}

/// One evaluation of the velocity field.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Evaluation {
    /// The solver's time for this evaluation (before torchdiffeq's one-ulp nudge of a step's last stage).
    pub t: f64,
    /// The time the field actually received.
    pub t_field: f64,
}

/// One accepted step of the adaptive solver.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Step {
    /// Start time of the step.
    pub t0: f64,
    /// Signed size of the step (negative when integrating towards smaller t).
    pub dt: f64,
}

/// What a solve cost.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SolveStats {
    /// Number of velocity evaluations, including the adaptive solver's start-up evaluations.
    pub nfe: usize,
    /// Accepted steps.
    pub accepted: usize,
    /// Rejected steps (adaptive solver only).
    pub rejected: usize,
    /// Every evaluation, in call order (only with [`SolveOptions::record`]).
    pub evaluations: Vec<Evaluation>,
    /// Every accepted step (only with [`SolveOptions::record`]).
    pub steps: Vec<Step>,
}

/// The end state of a solve and its statistics.
#[derive(Debug, Clone)]
pub struct Solution<B: Backend, const D: usize> {
    /// The state at `t1`.
    pub state: Tensor<B, D>,
    /// What it cost.
    pub stats: SolveStats,
}

/// Why a solve failed.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SolverError {
    /// The method name is not one of the supported ones.
    #[error("unknown solver '{0}': use one of dopri5, euler, midpoint, heun, rk4")]
    UnknownMethod(String),
    /// The options do not make sense.
    #[error("invalid solver options: {0}")]
    InvalidOptions(String),
    /// What was to be solved does not fit the velocity field (labels, conditions or guidance the network cannot
    /// take).
    #[error("invalid sampling input: {0}")]
    InvalidInput(String),
    /// The evaluation budget ran out.
    #[error(
        "the solver needed more than {max_nfe} velocity evaluations (stopped at t = {t:.6} after {nfe}); \
         raise the evaluation budget (max_nfe), loosen the tolerances (rtol, atol), or use a fixed-step solver"
    )]
    MaxNfeExceeded {
        /// The budget.
        max_nfe: usize,
        /// Evaluations spent so far.
        nfe: usize,
        /// The time reached.
        t: f64,
    },
    /// The state or the velocity stopped being finite.
    #[error(
        "the state became NaN or infinite in step {step} (t = {t:.6}); the velocity field diverged — check the \
         checkpoint, the input scaling and the precision"
    )]
    NonFinite {
        /// Index of the step (0-based) in which it happened.
        step: usize,
        /// Start time of that step.
        t: f64,
    },
    /// The adaptive step became too small to advance time.
    #[error("the step size underflowed at t = {t:.9} (dt = {dt:e}); the problem is too stiff for dopri5 at these tolerances")]
    StepUnderflow {
        /// The time reached.
        t: f64,
        /// The step that no longer advances it.
        dt: f64,
    },
}

/// Integrates `dx/dt = v(t, x)` from `options.t0` to `options.t1` starting at `x0`.
pub fn solve<B: Backend, const D: usize, V: Velocity<B, D> + ?Sized>(
    velocity: &mut V,
    x0: Tensor<B, D>,
    options: &SolveOptions,
) -> Result<Solution<B, D>, SolverError> {
    validate(options)?;
    let precision = TimePrecision::of(x0.dtype());
    let mut counter = Counter::new(velocity, precision, options);
    let state = match options.method {
        Method::Dopri5 => dopri5::solve(&mut counter, x0, options)?,
        method => fixed::solve(&mut counter, x0, options, method)?,
    };
    Ok(Solution { state, stats: counter.stats })
}

fn validate(options: &SolveOptions) -> Result<(), SolverError> {
    let bad = |msg: String| Err(SolverError::InvalidOptions(msg));
    if !options.t0.is_finite() || !options.t1.is_finite() {
        return bad(format!("t0 = {} and t1 = {} must be finite", options.t0, options.t1));
    }
    if options.method.is_adaptive() {
        if !(options.rtol >= 0.0 && options.atol >= 0.0 && options.rtol + options.atol > 0.0) {
            return bad(format!("rtol = {} and atol = {} must be ≥ 0 and not both 0", options.rtol, options.atol));
        }
        if let Some(h) = options.first_step {
            if !(h > 0.0 && h.is_finite()) {
                return bad(format!("first step {h} must be a positive number"));
            }
        }
    } else {
        match options.grid {
            Grid::StepSize(h) if !(h > 0.0 && h.is_finite()) => {
                return bad(format!("step size {h} must be a positive number"))
            }
            Grid::Steps(0) => return bad("the number of steps must be at least 1".into()),
            _ => {}
        }
    }
    Ok(())
}

/// Wraps the field: counts evaluations, enforces the budget, records times.
pub(crate) struct Counter<'a, B: Backend, const D: usize, V: Velocity<B, D> + ?Sized> {
    velocity: &'a mut V,
    pub(crate) precision: TimePrecision,
    /// Whether the RK arithmetic may use fused kernels.
    pub(crate) fused: bool,
    max_nfe: Option<usize>,
    record: bool,
    pub(crate) stats: SolveStats,
    _backend: std::marker::PhantomData<B>,
}

impl<'a, B: Backend, const D: usize, V: Velocity<B, D> + ?Sized> Counter<'a, B, D, V> {
    fn new(velocity: &'a mut V, precision: TimePrecision, options: &SolveOptions) -> Self {
        Self {
            velocity,
            precision,
            fused: options.fused_kernels,
            max_nfe: options.max_nfe,
            record: options.record,
            stats: SolveStats::default(),
            _backend: std::marker::PhantomData,
        }
    }

    /// Fails before a step that would need `evaluations` more calls than the budget allows.
    pub(crate) fn reserve(&self, evaluations: usize, t: f64) -> Result<(), SolverError> {
        match self.max_nfe {
            Some(max_nfe) if self.stats.nfe + evaluations > max_nfe => {
                Err(SolverError::MaxNfeExceeded { max_nfe, nfe: self.stats.nfe, t })
            }
            _ => Ok(()),
        }
    }

    /// Evaluates the field at solver time `t`; the field receives `t_field` (usually `t` in the state's dtype).
    pub(crate) fn eval_at(&mut self, t: f64, t_field: f64, x: Tensor<B, D>) -> Tensor<B, D> {
        self.stats.nfe += 1;
        if self.record {
            self.stats.evaluations.push(Evaluation { t, t_field });
        }
        self.velocity.velocity(t_field, x)
    }

    /// Evaluates the field at `t`, rounded to the state's dtype.
    pub(crate) fn eval(&mut self, t: f64, x: Tensor<B, D>) -> Tensor<B, D> {
        let t_field = self.precision.round(t);
        self.eval_at(t, t_field, x)
    }

    pub(crate) fn accept(&mut self, t0: f64, dt: f64) {
        self.stats.accepted += 1;
        if self.record {
            self.stats.steps.push(Step { t0, dt });
        }
    }
}
