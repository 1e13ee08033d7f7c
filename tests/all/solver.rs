//! Solvers against `golden/ode_dopri5`: the analytic float64 linear ODE, dopri5 and the fixed-step solvers with
//! the dit_tiny velocity field, on cpu and wgpu; plus budgets, NaN detection and Heun's order.

use burn::tensor::{backend::Backend, DType, Tensor, TensorData};
use lfm::backend::{Cpu, Cpu64, Wgpu};
use lfm::solver::{solve, Grid, Method, SolveOptions, SolverError};

use crate::common::*;

/// A float64 vector on the CPU (the device's default float dtype is f32, so the dtype is explicit).
fn f64_tensor<const D: usize>(values: Vec<f64>, shape: [usize; D]) -> Tensor<Cpu64, D> {
    Tensor::from_data(TensorData::new(values, shape), (&Default::default(), DType::F64))
}

fn linear_problem() -> (Vec<f64>, Vec<f64>, [f64; 2]) {
    let io = io("ode_dopri5");
    let t = get(&io, "linear.t").to_f64();
    (get(&io, "linear.A").to_f64(), get(&io, "linear.y0").to_f64(), [t[0], t[1]])
}

/// dy/dt = A·y on float64 tensors.
fn linear_field(a: &[f64]) -> impl FnMut(f64, Tensor<Cpu64, 1>) -> Tensor<Cpu64, 1> {
    let n = (a.len() as f64).sqrt() as usize;
    let a = f64_tensor(a.to_vec(), [n, n]);
    move |_t, y: Tensor<Cpu64, 1>| a.clone().matmul(y.unsqueeze_dim::<2>(1)).squeeze_dim::<1>(1)
}

#[test]
fn dopri5_matches_torchdiffeq_on_the_linear_ode() {
    let io = io("ode_dopri5");
    let (a, y0, [t0, t1]) = linear_problem();
    let y0 = f64_tensor(y0, [16]);
    let options = SolveOptions { t0, t1, rtol: 1e-6, atol: 1e-6, record: true, ..Default::default() };
    let solution = solve(&mut linear_field(&a), y0, &options).unwrap();
    let stats = &solution.stats;
    assert_eq!(stats.nfe as i64, get(&io, "linear.nfe").to_i64()[0]);
    let times: Vec<f64> = stats.evaluations.iter().map(|e| e.t).collect();
    let field_times: Vec<f64> = stats.evaluations.iter().map(|e| e.t_field).collect();
    assert_close_f64("linear.t_eval", &times, &get(&io, "linear.t_eval").to_f64(), 1e-9);
    assert_close_f64("linear.t_eval_func", &field_times, &get(&io, "linear.t_eval_func").to_f64(), 1e-9);
    let starts: Vec<f64> = stats.steps.iter().map(|s| s.t0).collect();
    let sizes: Vec<f64> = stats.steps.iter().map(|s| s.dt).collect();
    assert_close_f64("linear.accepted_t0", &starts, &get(&io, "linear.accepted_t0").to_f64(), 1e-9);
    assert_close_f64("linear.accepted_dt", &sizes, &get(&io, "linear.accepted_dt").to_f64(), 1e-9);
    let y1 = solution.state.into_data().into_vec::<f64>().unwrap();
    assert_close_f64("linear.y1", &y1, &get(&io, "linear.y1").to_f64(), 1e-9);
    // And the reference itself is within the tolerance of the exact solution.
    assert_close_f64("linear.y1 vs expm", &y1, &get(&io, "linear.y1_exact").to_f64(), 1e-4);
}

fn dit_field<B: Backend>(device: &B::Device) -> impl FnMut(f64, Tensor<B, 4>) -> Tensor<B, 4> {
    let model = crate::dit::load::<B>("dit_tiny", "model.safetensors", device);
    let device = device.clone();
    move |t, x| {
        let t = Tensor::<B, 1>::from_data(TensorData::new(vec![t as f32], [1]).convert::<B::FloatElem>(), &device);
        model.forward(t, x, None)
    }
}

pub(crate) fn dopri5_with_dit<B: Backend>(device: &B::Device, state_rel: f64, fused_kernels: bool) {
    let io = io("ode_dopri5");
    let x1 = tensor::<B, 4>(get(&io, "x1"), device);
    let options = SolveOptions { record: true, fused_kernels, ..Default::default() };
    let solution = solve(&mut dit_field::<B>(device), x1, &options).unwrap();
    let stats = &solution.stats;
    assert_eq!(stats.nfe as i64, get(&io, "nfe").to_i64()[0], "NFE");
    let times: Vec<f64> = stats.evaluations.iter().map(|e| e.t).collect();
    let field_times: Vec<f64> = stats.evaluations.iter().map(|e| e.t_field).collect();
    // Start-up (f0, Hairer's probe) and the whole first step depend only on the initial-step selection: they
    // agree with torchdiffeq to float32 precision, including the one-ulp nudge of the stages at the step's end.
    let startup = 8;
    assert_close_f64(
        "t_eval (start-up and first step)",
        &times[..startup],
        &get(&io, "t_eval").to_f64()[..startup],
        1e-6,
    );
    assert_close_f64(
        "t_eval_model (start-up and first step)",
        &field_times[..startup],
        &get(&io, "t_eval_model").to_f64()[..startup],
        1e-6,
    );
    assert_close_f64(
        "first accepted step",
        &[stats.steps[0].t0, -stats.steps[0].dt],
        &[get(&io, "accepted_t0").to_f64()[0], get(&io, "accepted_dt").to_f64()[0]],
        1e-6,
    );
    // After the first step the sizes are not reproducible from another float32 network: the first step's error
    // estimate (Σ c_j·k_j·dt ≈ 8e-10 per element) is smaller than the float32 rounding of the network outputs it
    // combines (~1e-7·|v|·dt·c ≈ 3e-10), so torchdiffeq's own ratio (4.1e-5) is largely rounding noise: the same
    // k's accumulated in f64 give 5.8e-5 here. The controller itself is checked digit for digit on the float64
    // linear ODE above. What must agree is the work and the answer: the same NFE, the same accepted/rejected
    // counts, the final state to 1e-5 of its magnitude, and step sizes within 10%.
    assert_eq!((stats.accepted, stats.rejected), (get(&io, "accepted_t0").shape[0], 0));
    // torchdiffeq stores its internal (negated, positive) step sizes.
    let sizes: Vec<f64> = stats.steps.iter().map(|s| -s.dt).collect();
    for (got, want) in sizes.iter().zip(get(&io, "accepted_dt").to_f64()) {
        assert!((got / want - 1.0).abs() < 0.1, "accepted step {got} vs torchdiffeq {want}");
    }
    assert_close("x0", &values(solution.state), &get(&io, "x0").to_f32(), state_rel, 1e-6);
}

pub(crate) fn fixed_with_dit<B: Backend>(device: &B::Device, state_rel: f64, fused_kernels: bool) {
    let io = io("ode_dopri5");
    for method in [Method::Euler, Method::Midpoint, Method::Rk4] {
        let name = method.name();
        let x1 = tensor::<B, 4>(get(&io, "x1"), device);
        let options =
            SolveOptions { method, grid: Grid::StepSize(0.05), record: true, fused_kernels, ..Default::default() };
        let solution = solve(&mut dit_field::<B>(device), x1, &options).unwrap();
        assert_eq!(solution.stats.nfe as i64, get(&io, &format!("{name}.nfe")).to_i64()[0], "{name} NFE");
        let times: Vec<f64> = solution.stats.evaluations.iter().map(|e| e.t_field).collect();
        // The grid values are float32 numbers: they must agree exactly.
        assert_close_f64(&format!("{name}.t_eval"), &times, &get(&io, &format!("{name}.t_eval")).to_f64(), 0.0);
        assert_close(
            &format!("{name}.x0"),
            &values(solution.state),
            &get(&io, &format!("{name}.x0")).to_f32(),
            state_rel,
            1e-6,
        );
    }
}

#[test]
fn dopri5_with_dit_matches_torchdiffeq_on_cpu() {
    dopri5_with_dit::<Cpu>(&cpu(), 1e-5, true);
}

#[test]
fn fixed_step_solvers_with_dit_match_torchdiffeq_on_cpu() {
    fixed_with_dit::<Cpu>(&cpu(), 1e-5, true);
}

/// On wgpu, both with lfm's fused RK kernels (the default) and with the plain Burn expressions: the same NFE,
/// accepted/rejected counts, grid and final state as torchdiffeq either way.
#[test]
fn solvers_with_dit_match_torchdiffeq_on_wgpu_fused_and_unfused() {
    if let Some(device) = wgpu() {
        assert!(lfm_kernels::has_kernels::<Wgpu>() && !lfm_kernels::has_kernels::<Cpu>());
        for fused in [true, false] {
            dopri5_with_dit::<Wgpu>(&device, 1e-4, fused);
            fixed_with_dit::<Wgpu>(&device, 1e-4, fused);
        }
    }
}

#[test]
fn heun_spends_two_evaluations_per_step_and_is_second_order() {
    let (a, y0, [t0, t1]) = linear_problem();
    let exact = io("ode_dopri5");
    let exact = get(&exact, "linear.y1_exact").to_f64();
    let error = |steps: usize| {
        let y = f64_tensor(y0.clone(), [16]);
        let options = SolveOptions { method: Method::Heun, t0, t1, grid: Grid::Steps(steps), ..Default::default() };
        let solution = solve(&mut linear_field(&a), y, &options).unwrap();
        assert_eq!(solution.stats.nfe, 2 * steps);
        let y = solution.state.into_data().into_vec::<f64>().unwrap();
        y.iter().zip(&exact).map(|(a, b)| (a - b).powi(2)).sum::<f64>().sqrt()
    };
    let ratio = error(20) / error(40);
    assert!((3.5..4.5).contains(&ratio), "halving the step divided the error by {ratio}, expected ≈4");
}

#[test]
fn integrating_backwards_matches_forwards_in_reverse() {
    // dy/dt = −y from 1 to 0 gives y(0) = y(1)·e.
    let y = f64_tensor(vec![1.0, -2.0], [2]);
    let options = SolveOptions { rtol: 1e-10, atol: 1e-10, ..Default::default() };
    let out = solve(&mut |_t, y: Tensor<Cpu64, 1>| y.neg(), y, &options).unwrap();
    let out = out.state.into_data().into_vec::<f64>().unwrap();
    assert_close_f64("y(0)", &out, &[std::f64::consts::E, -2.0 * std::f64::consts::E], 1e-8);
}

#[test]
fn exceeding_the_evaluation_budget_is_an_error() {
    let y = f64_tensor(vec![1.0], [1]);
    // A stiff problem at a tight tolerance needs far more than 50 evaluations.
    let options = SolveOptions { rtol: 1e-12, atol: 1e-12, max_nfe: Some(50), ..Default::default() };
    let err = solve(&mut |_t, y: Tensor<Cpu64, 1>| y.mul_scalar(-1000.0), y, &options).unwrap_err();
    assert!(matches!(err, SolverError::MaxNfeExceeded { max_nfe: 50, .. }), "{err}");
    assert!(err.to_string().contains("max_nfe"), "{err}");
}

#[test]
fn a_diverging_field_is_reported_with_its_step() {
    let y = Tensor::<Cpu, 1>::from_data(TensorData::new(vec![1.0f32], [1]), &cpu());
    let nan_after = |limit: f64| move |t: f64, y: Tensor<Cpu, 1>| if t < limit { y.mul_scalar(f32::NAN) } else { y };
    for method in [Method::Dopri5, Method::Euler] {
        let options = SolveOptions { method, grid: Grid::Steps(10), ..Default::default() };
        let err = solve(&mut nan_after(0.55), y.clone(), &options).unwrap_err();
        assert!(matches!(err, SolverError::NonFinite { .. }), "{method}: {err}");
        assert!(err.to_string().contains("NaN"), "{err}");
    }
    let SolverError::NonFinite { step, .. } = solve(
        &mut nan_after(0.55),
        y,
        &SolveOptions { method: Method::Euler, grid: Grid::Steps(10), ..Default::default() },
    )
    .unwrap_err() else {
        unreachable!()
    };
    // Steps start at 1.0, 0.9, …, 0.5: the first evaluation below 0.55 is the step starting at 0.5.
    assert_eq!(step, 5);
}

#[test]
fn unknown_method_and_bad_options_are_errors() {
    assert_eq!(
        "rk45".parse::<Method>().unwrap_err().to_string(),
        "unknown solver 'rk45': use one of dopri5, euler, midpoint, heun, rk4"
    );
    let y = Tensor::<Cpu, 1>::from_data(TensorData::new(vec![1.0f32], [1]), &cpu());
    let options = SolveOptions { method: Method::Euler, grid: Grid::StepSize(-0.1), ..Default::default() };
    assert!(matches!(solve(&mut |_t, y| y, y, &options), Err(SolverError::InvalidOptions(_))));
}
