//! P-IDS and U-IDS (Zhao et al., "Large Scale Image Completion via Co-Modulated GANs"), as LFM's
//! `cal_inpainting.py` computes them: a linear SVM separates real from inpainted Inception features; U-IDS is its
//! training error, P-IDS the share of pairs where the inpainted image scores as more real than its original.
//!
//! The SVM is scikit-learn's `LinearSVC(dual=False)` (liblinear's L2-regularised squared-hinge primal, C = 1, the
//! intercept a weight on a constant feature 1 that is regularised like the others), solved here to a tight
//! tolerance by Newton's method with conjugate-gradient steps in f64.

/// A fitted linear classifier `score(x) = w·x + b` (positive = real).
#[derive(Debug, Clone, PartialEq)]
pub struct LinearSvm {
    /// `w`.
    pub weights: Vec<f64>,
    /// `b`.
    pub bias: f64,
}

impl LinearSvm {
    /// The decision value of one feature vector.
    pub fn score(&self, x: &[f32]) -> f64 {
        self.weights.iter().zip(x).map(|(w, &v)| w * v as f64).sum::<f64>() + self.bias
    }
}

/// The inpainting scores.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Ids {
    /// Paired inception discriminative score: the share of pairs whose inpainted image scores above its original.
    pub p_ids: f64,
    /// Unpaired inception discriminative score: the SVM's misclassification rate over both sets.
    pub u_ids: f64,
}

/// Why the scores could not be computed.
#[derive(Debug, thiserror::Error)]
pub enum IdsError {
    /// The two sets differ in size or dimension.
    #[error("P-IDS pairs real and inpainted images: {0}")]
    Mismatch(String),
    /// A feature is NaN or infinite.
    #[error("the features hold NaN or infinite values")]
    NonFinite,
}

/// Fits `LinearSVC(dual=False, C = c)` on rows of `features` (`dim` values each) labelled `real[i]`.
pub fn fit_linear_svm(features: &[f32], real: &[bool], dim: usize, c: f64) -> LinearSvm {
    let n = real.len();
    let d = dim + 1; // the constant feature of the intercept
                     // Rows of f64 with the constant appended, contiguous so that the products below vectorise.
    let rows: Vec<f64> =
        features.chunks(dim).flat_map(|x| x.iter().map(|&v| v as f64).chain(std::iter::once(1.0))).collect();
    let row = |i: usize| &rows[i * d..(i + 1) * d];
    let y: Vec<f64> = real.iter().map(|&r| if r { 1.0 } else { -1.0 }).collect();
    let scores = |w: &[f64]| -> Vec<f64> { (0..n).map(|i| dot(row(i), w)).collect() };
    let objective = |w: &[f64], z: &[f64]| {
        let hinge: f64 = z.iter().zip(&y).map(|(z, y)| (1.0 - y * z).max(0.0).powi(2)).sum();
        0.5 * dot(w, w) + c * hinge
    };
    let mut w = vec![0.0; d];
    let mut z = scores(&w);
    let mut f = objective(&w, &z);
    let mut first_norm = None;
    for _ in 0..100 {
        let active: Vec<usize> = (0..n).filter(|&i| y[i] * z[i] < 1.0).collect();
        // ∇f = w + 2C Σ_active (z_i − y_i) x_i
        let mut grad = w.clone();
        for &i in &active {
            axpy(2.0 * c * (z[i] - y[i]), row(i), &mut grad);
        }
        let norm = dot(&grad, &grad).sqrt();
        let first = *first_norm.get_or_insert(norm);
        if norm <= 1e-10 * first.max(1.0) {
            break;
        }
        // The generalised Hessian H v = v + 2C X_activeᵀ X_active v, solved for the Newton direction by CG.
        let hessian = |v: &[f64]| -> Vec<f64> {
            let mut out = v.to_vec();
            for &i in &active {
                axpy(2.0 * c * dot(row(i), v), row(i), &mut out);
            }
            out
        };
        let step = conjugate_gradient(&hessian, &grad, 1e-4 * norm, 4 * d);
        // Backtracking (Armijo) along −step.
        let slope = dot(&grad, &step);
        let mut alpha = 1.0;
        loop {
            let candidate: Vec<f64> = w.iter().zip(&step).map(|(w, s)| w - alpha * s).collect();
            let cz = scores(&candidate);
            let cf = objective(&candidate, &cz);
            if cf <= f - 1e-4 * alpha * slope || alpha < 1e-10 {
                (w, z, f) = (candidate, cz, cf);
                break;
            }
            alpha *= 0.5;
        }
    }
    let bias = w.pop().expect("the intercept weight");
    LinearSvm { weights: w, bias }
}

/// Solves `A s = b` for a symmetric positive-definite `A` given as a product.
fn conjugate_gradient(a: &dyn Fn(&[f64]) -> Vec<f64>, b: &[f64], tolerance: f64, max_iter: usize) -> Vec<f64> {
    let mut s = vec![0.0; b.len()];
    let mut r = b.to_vec();
    let mut p = r.clone();
    let mut rr = dot(&r, &r);
    for _ in 0..max_iter {
        if rr.sqrt() <= tolerance {
            break;
        }
        let ap = a(&p);
        let alpha = rr / dot(&p, &ap);
        for i in 0..s.len() {
            s[i] += alpha * p[i];
            r[i] -= alpha * ap[i];
        }
        let next = dot(&r, &r);
        for i in 0..p.len() {
            p[i] = r[i] + next / rr * p[i];
        }
        rr = next;
    }
    s
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// `out += alpha·x`.
fn axpy(alpha: f64, x: &[f64], out: &mut [f64]) {
    for (o, v) in out.iter_mut().zip(x) {
        *o += alpha * v;
    }
}

/// P-IDS and U-IDS of paired features: `real[i]` is the original of `fake[i]` (`dim` values per image).
pub fn inpainting_ids(real: &[f32], fake: &[f32], dim: usize) -> Result<Ids, IdsError> {
    if real.len() != fake.len() || real.is_empty() || !real.len().is_multiple_of(dim) {
        return Err(IdsError::Mismatch(format!(
            "{} real and {} inpainted feature values of dimension {dim}",
            real.len(),
            fake.len()
        )));
    }
    if real.iter().chain(fake).any(|v| !v.is_finite()) {
        return Err(IdsError::NonFinite);
    }
    let n = real.len() / dim;
    let features = [real, fake].concat();
    let labels: Vec<bool> = (0..2 * n).map(|i| i < n).collect();
    let svm = fit_linear_svm(&features, &labels, dim, 1.0);
    let real_scores: Vec<f64> = real.chunks(dim).map(|x| svm.score(x)).collect();
    let fake_scores: Vec<f64> = fake.chunks(dim).map(|x| svm.score(x)).collect();
    // scikit-learn predicts the positive class (real) for a score > 0.
    let wrong = real_scores.iter().filter(|&&s| s <= 0.0).count() + fake_scores.iter().filter(|&&s| s > 0.0).count();
    let above = real_scores.iter().zip(&fake_scores).filter(|(r, f)| f > r).count();
    Ok(Ids { p_ids: above as f64 / n as f64, u_ids: wrong as f64 / (2 * n) as f64 })
}
