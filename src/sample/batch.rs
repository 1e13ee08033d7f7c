//! One batch: its noise, labels and condition solved from t = 1 to t = 0 by a velocity network, with classifier-free
//! guidance on the un-doubled batch ([`VelocityModel::guided`]).

use std::ops::Range;
use std::time::Instant;

use burn::tensor::{backend::Backend, Int, Tensor, TensorData};

use crate::models::VelocityModel;
use crate::solver::{solve, SolveOptions, SolveStats, SolverError};

/// One batch: its noise, labels and extra input channels (inpainting: masked-image latent and mask).
#[derive(Debug, Clone)]
pub struct BatchInput<B: Backend> {
    /// `x1`, the state at t = 1.
    pub noise: Tensor<B, 4>,
    /// Labels, for class-conditional models.
    pub labels: Option<Vec<i64>>,
    /// Channels concatenated to the state before every evaluation (`[n, k, h, w]`).
    pub condition: Option<Tensor<B, 4>>,
}

/// Classifier-free guidance as a solve applies it: `uncond + scale·(cond − uncond)` above scale 1, as LFM does.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Guidance {
    /// The scale (1 or below: no guidance).
    pub scale: f64,
    /// Guide only at times `t` in `[from, to]` (Kynkäänniemi et al. 2024, "Applying guidance in a limited interval
    /// improves sample and distribution quality"); elsewhere the conditional velocity alone, one evaluation instead of
    /// two. `None`: at every time, as LFM.
    pub interval: Option<(f64, f64)>,
}

impl Guidance {
    /// Guidance at every time with this scale.
    pub fn scale(scale: f64) -> Self {
        Self { scale, interval: None }
    }

    /// Whether the solve guides its evaluation at time `t`. Times within 1e-6 of an end of the interval count as
    /// inside: solvers hold their time grid in the state's precision (0.6 in f32 is 0.6000000238), and an end the
    /// user wrote as 0.6 means that grid point.
    pub fn applies_at(&self, t: f64) -> bool {
        const SLACK: f64 = 1e-6;
        self.scale > 1.0 && self.interval.is_none_or(|(from, to)| from - SLACK <= t && t <= to + SLACK)
    }

    /// Why the scale or interval would sample something else than asked (NaN fails `> 1` and would quietly switch
    /// guidance off).
    fn check(&self) -> Result<(), SolverError> {
        let invalid = |why: String| Err(SolverError::InvalidOptions(why));
        if !(self.scale.is_finite() && self.scale >= 0.0) {
            return invalid(format!("the CFG scale {} must be a finite number ≥ 0", self.scale));
        }
        match self.interval {
            Some((from, to)) if !(0.0 <= from && from <= to && to <= 1.0) => invalid(format!(
                "the guidance interval [{from}, {to}] must lie in [0, 1] with its start at or before its end"
            )),
            _ => Ok(()),
        }
    }
}

/// A solved batch.
#[derive(Debug, Clone)]
pub struct BatchOutput<B: Backend> {
    /// `x0`, the latents at t = 0.
    pub latents: Tensor<B, 4>,
    /// What the solve cost.
    pub stats: SolveStats,
    /// Wall-clock seconds of the solve.
    pub seconds: f64,
}

/// Solves one batch from t = 1 to t = 0, guided as `guidance` says when the batch has labels. `progress(t, nfe)` is
/// called after every velocity evaluation. Inputs that do not fit the network (labels, condition, guidance) are
/// refused before any evaluation.
pub fn sample_batch<B: Backend>(
    model: &VelocityModel<B>,
    input: BatchInput<B>,
    guidance: Option<Guidance>,
    options: &SolveOptions,
    progress: &mut dyn FnMut(f64, usize),
) -> Result<BatchOutput<B>, SolverError> {
    if let Some(guidance) = &guidance {
        guidance.check()?;
    }
    let device = input.noise.device();
    let [n, _, h, w] = input.noise.dims();
    let invalid = |why: String| Err(SolverError::InvalidInput(why));
    if let Some(labels) = input.labels.as_ref().filter(|y| y.len() != n) {
        return invalid(format!("{} labels for a batch of {n}: give one label per sample", labels.len()));
    }
    if let Some([cn, _, ch, cw]) =
        input.condition.as_ref().map(|c| c.dims()).filter(|c| [c[0], c[2], c[3]] != [n, h, w])
    {
        return invalid(format!(
            "a condition of {cn}×{ch}×{cw} for a batch of {n}×{h}×{w}: one per sample, the latents' size"
        ));
    }
    model.check_labels(input.labels.as_deref()).map_err(SolverError::InvalidInput)?;
    let cfg = guidance.filter(|g| g.scale > 1.0 && input.labels.is_some());
    if cfg.is_some() {
        model.check_guidance().map_err(|e| SolverError::InvalidInput(e.to_string()))?;
    }
    let labels =
        input.labels.as_ref().map(|y| Tensor::<B, 1, Int>::from_data(TensorData::new(y.clone(), [n]), &device));
    // The network on samples `range` of the batch; it couples no samples, so parts of the batch can be evaluated
    // apart.
    let evaluate = |t: f64, t_tensor: &Tensor<B, 1>, x: Tensor<B, 4>, range: Range<usize>| -> Tensor<B, 4> {
        let len = range.len();
        let x = match &input.condition {
            Some(c) => Tensor::cat(vec![x, c.clone().narrow(0, range.start, len)], 1),
            None => x,
        };
        let labels = labels.as_ref().map(|y| y.clone().narrow(0, range.start, len));
        match (cfg.filter(|g| g.applies_at(t)), labels) {
            (Some(guidance), Some(y)) => model
                .guided(t_tensor.clone(), x, y, guidance.scale)
                .expect("check_guidance accepted this network above"),
            (_, labels) => model.forward(t_tensor.clone(), x, labels),
        }
    };
    // On the CPU each evaluation is split over the cores: Burn's ndarray backend threads its matrix products but
    // runs element-wise work on one core, so one pass keeps barely more than one core busy.
    let threads = if crate::nn::is_ndarray::<B>() { rayon::current_num_threads() } else { 1 };
    let mut nfe = 0;
    let mut field = |t: f64, x: Tensor<B, 4>| -> Tensor<B, 4> {
        let t_tensor =
            Tensor::<B, 1>::from_data(TensorData::new(vec![t as f32], [1]).convert::<B::FloatElem>(), &device);
        let parts = crate::nn::cpu::in_parts(n, threads, |range| {
            let x = if range.len() == n { x.clone() } else { x.clone().narrow(0, range.start, range.len()) };
            evaluate(t, &t_tensor, x, range)
        });
        let v = if parts.len() == 1 { parts.into_iter().next().expect("one part") } else { Tensor::cat(parts, 0) };
        nfe += 1;
        progress(t, nfe);
        v
    };
    let start = Instant::now();
    let solution = solve(&mut field, input.noise, options)?;
    Ok(BatchOutput { latents: solution.state, stats: solution.stats, seconds: start.elapsed().as_secs_f64() })
}
