//! Feature statistics (mean and covariance accumulated in f64) and the Fréchet distance between two of them,
//! `|μ₁ − μ₂|² + Tr(Σ₁ + Σ₂ − 2·(Σ₁Σ₂)^½)`, as pytorch-fid's `calculate_frechet_distance` computes it.
//!
//! `Tr((Σ₁Σ₂)^½)` is the sum of the square roots of the eigenvalues of `Σ₁Σ₂`, which are those of the symmetric
//! positive semi-definite `Σ₁^½ Σ₂ Σ₁^½`: two symmetric eigen-decompositions instead of a general matrix square
//! root, stable for the singular covariances of small sample sets (eigenvalues below zero by rounding count as 0,
//! as the real part of scipy's `sqrtm` does).

use nalgebra::{DMatrix, DVector};

/// Why a distance or statistics could not be computed.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum FidError {
    /// The two sets of statistics have different dimensions, or a matrix is not square.
    #[error("feature dimensions differ: {0}")]
    Dimensions(String),
    /// A value is NaN or infinite.
    #[error("the statistics hold NaN or infinite values ({0}); the features are broken")]
    NonFinite(&'static str),
    /// Fewer than two samples.
    #[error("a covariance needs at least two samples, got {0}")]
    TooFewSamples(usize),
}

/// Mean and covariance of a set of feature vectors.
#[derive(Debug, Clone, PartialEq)]
pub struct Statistics {
    /// Mean `μ` (d).
    pub mu: Vec<f64>,
    /// Covariance `Σ` (d × d, row-major), unbiased (`np.cov(rowvar=False)`).
    pub sigma: Vec<f64>,
}

impl Statistics {
    /// Feature dimension.
    pub fn dim(&self) -> usize {
        self.mu.len()
    }

    fn check(&self, which: &'static str) -> Result<(), FidError> {
        let d = self.dim();
        if self.sigma.len() != d * d {
            return Err(FidError::Dimensions(format!("{which}: μ has {d} values but Σ has {}", self.sigma.len())));
        }
        if self.mu.iter().chain(&self.sigma).any(|v| !v.is_finite()) {
            return Err(FidError::NonFinite(which));
        }
        Ok(())
    }
}

/// Accumulates feature vectors batch by batch (sums in f64), so that no features need be kept.
#[derive(Debug, Clone)]
pub struct Accumulator {
    dim: usize,
    count: usize,
    sum: DVector<f64>,
    outer: DMatrix<f64>,
}

impl Accumulator {
    /// An empty accumulator for `dim`-dimensional features.
    pub fn new(dim: usize) -> Self {
        Self { dim, count: 0, sum: DVector::zeros(dim), outer: DMatrix::zeros(dim, dim) }
    }

    /// Adds `n` feature vectors given row-major (`features.len() == n · dim`).
    pub fn add(&mut self, features: &[f32]) -> Result<(), FidError> {
        if !features.len().is_multiple_of(self.dim) {
            return Err(FidError::Dimensions(format!("{} values are not rows of {}", features.len(), self.dim)));
        }
        let n = features.len() / self.dim;
        let batch = DMatrix::from_row_iterator(n, self.dim, features.iter().map(|&v| v as f64));
        self.sum += batch.row_sum().transpose();
        self.outer += batch.transpose() * &batch;
        self.count += n;
        Ok(())
    }

    /// Number of vectors added.
    pub fn count(&self) -> usize {
        self.count
    }

    /// The mean and the unbiased covariance.
    pub fn finish(&self) -> Result<Statistics, FidError> {
        if self.count < 2 {
            return Err(FidError::TooFewSamples(self.count));
        }
        let n = self.count as f64;
        let mu = &self.sum / n;
        let sigma = (&self.outer - &mu * mu.transpose() * n) / (n - 1.0);
        Ok(Statistics { mu: mu.iter().copied().collect(), sigma: sigma.transpose().iter().copied().collect() })
    }
}

/// The symmetric square root of a symmetric positive semi-definite matrix (negative eigenvalues clamped to 0).
fn sqrt_psd(m: &DMatrix<f64>) -> DMatrix<f64> {
    let eigen = m.clone().symmetric_eigen();
    let roots = eigen.eigenvalues.map(|l| l.max(0.0).sqrt());
    &eigen.eigenvectors * DMatrix::from_diagonal(&roots) * eigen.eigenvectors.transpose()
}

/// The Fréchet distance between two Gaussians given by their statistics.
pub fn frechet_distance(a: &Statistics, b: &Statistics) -> Result<f64, FidError> {
    a.check("first statistics")?;
    b.check("second statistics")?;
    if a.dim() != b.dim() {
        return Err(FidError::Dimensions(format!("{} vs {}", a.dim(), b.dim())));
    }
    let d = a.dim();
    let s1 = DMatrix::from_row_slice(d, d, &a.sigma);
    let s2 = DMatrix::from_row_slice(d, d, &b.sigma);
    // Symmetrise against rounding in the stored matrices.
    let (s1, s2) = ((&s1 + s1.transpose()) / 2.0, (&s2 + s2.transpose()) / 2.0);
    let root1 = sqrt_psd(&s1);
    let inner = &root1 * &s2 * &root1;
    let inner = (&inner + inner.transpose()) / 2.0;
    let tr_covmean: f64 = inner.symmetric_eigenvalues().iter().map(|l| l.max(0.0).sqrt()).sum();
    let diff: f64 = a.mu.iter().zip(&b.mu).map(|(x, y)| (x - y) * (x - y)).sum();
    Ok(diff + s1.trace() + s2.trace() - 2.0 * tr_covmean)
}
