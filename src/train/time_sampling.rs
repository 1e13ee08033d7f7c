//! How training draws each example's time `t` on the path (1 = noise, 0 = data; [`crate::flow`]).
//!
//! LFM draws `t` uniformly. The logit-normal alternative (Esser et al. 2024, "Scaling Rectified Flow Transformers")
//! draws `t = sigmoid(mean + std·n)` with `n` standard normal: fewer examples at the two ends, where the target is
//! either nearly fixed (pure noise) or unpredictable (clean data), more in the middle, where the velocity decides
//! what the sample becomes.

use std::fmt;
use std::str::FromStr;

use rand::Rng;
use rand_distr::StandardNormal;
use serde::{Deserialize, Serialize};

/// The distribution of training times.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum TimeSampling {
    /// Uniform on [0, 1), as LFM.
    #[default]
    Uniform,
    /// `sigmoid(mean + std·n)`, `n` standard normal; a positive mean leans towards noise (t = 1).
    LogitNormal {
        /// Mean of the logit.
        mean: f64,
        /// Standard deviation of the logit (> 0).
        std: f64,
    },
}

impl TimeSampling {
    /// One time, drawn from `rng`. Uniform draws one `f32` per time, as every run before this option did, so
    /// their streams (and their resumes) are unchanged.
    pub fn draw(&self, rng: &mut impl Rng) -> f32 {
        match *self {
            TimeSampling::Uniform => rng.random::<f32>(),
            TimeSampling::LogitNormal { mean, std } => {
                let n: f64 = rng.sample(StandardNormal);
                (1.0 / (1.0 + (-(mean + std * n)).exp())) as f32
            }
        }
    }
}

impl fmt::Display for TimeSampling {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TimeSampling::Uniform => write!(f, "uniform"),
            TimeSampling::LogitNormal { mean, std } => write!(f, "logit-normal:{mean}:{std}"),
        }
    }
}

impl FromStr for TimeSampling {
    type Err = String;

    /// `uniform`, `logit-normal` (mean 0, std 1) or `logit-normal:MEAN:STD`.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let usage = "expected uniform, logit-normal or logit-normal:MEAN:STD (e.g. logit-normal:0:1)";
        let mut parts = text.trim().split(':');
        match parts.next() {
            Some("uniform") if parts.next().is_none() => Ok(TimeSampling::Uniform),
            Some("logit-normal") => {
                let numbers: Vec<&str> = parts.collect();
                let (mean, std) = match numbers.as_slice() {
                    [] => (0.0, 1.0),
                    [mean, std] => {
                        let number =
                            |s: &str| s.trim().parse::<f64>().map_err(|_| format!("'{s}' is not a number; {usage}"));
                        (number(mean)?, number(std)?)
                    }
                    _ => return Err(format!("'{text}': {usage}")),
                };
                if !(mean.is_finite() && std > 0.0 && std.is_finite()) {
                    return Err(format!("'{text}': the mean must be finite and the std a finite number > 0"));
                }
                Ok(TimeSampling::LogitNormal { mean, std })
            }
            _ => Err(format!("'{text}': {usage}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_draws_the_stream_runs_have_always_drawn() {
        let mut a = crate::noise::rng(7, 3);
        let mut b = crate::noise::rng(7, 3);
        for _ in 0..100 {
            assert_eq!(TimeSampling::Uniform.draw(&mut a), b.random::<f32>());
        }
    }

    #[test]
    fn logit_normal_times_have_the_asked_logit_moments() {
        let sampling = TimeSampling::LogitNormal { mean: 0.5, std: 0.8 };
        let mut rng = crate::noise::rng(1, 0);
        let logits: Vec<f64> = (0..200_000)
            .map(|_| {
                let t = sampling.draw(&mut rng) as f64;
                assert!(t > 0.0 && t < 1.0, "time {t} outside (0, 1)");
                (t / (1.0 - t)).ln()
            })
            .collect();
        let n = logits.len() as f64;
        let mean = logits.iter().sum::<f64>() / n;
        let std = (logits.iter().map(|l| (l - mean).powi(2)).sum::<f64>() / n).sqrt();
        // Standard errors: 0.8 / √200,000 ≈ 0.0018 for the mean, about 0.0013 for the std.
        assert!((mean - 0.5).abs() < 0.01, "logit mean {mean}");
        assert!((std - 0.8).abs() < 0.01, "logit std {std}");
        // More weight in the middle than uniform: P(0.25 < t < 0.75) for N(0.5, 0.8²) logits is about 0.75, for
        // uniform times 0.5.
        let middle = logits.iter().filter(|l| l.abs() < 3f64.ln()).count() as f64 / n;
        assert!(middle > 0.7, "share of times in (0.25, 0.75): {middle}");
    }

    #[test]
    fn parses_and_prints_and_refuses_with_the_usage() {
        assert_eq!("uniform".parse(), Ok(TimeSampling::Uniform));
        assert_eq!("logit-normal".parse(), Ok(TimeSampling::LogitNormal { mean: 0.0, std: 1.0 }));
        let shifted: TimeSampling = "logit-normal:-0.5:1.2".parse().unwrap();
        assert_eq!(shifted, TimeSampling::LogitNormal { mean: -0.5, std: 1.2 });
        assert_eq!(shifted.to_string().parse(), Ok(shifted));
        for bad in
            ["normal", "uniform:1", "logit-normal:1", "logit-normal:a:1", "logit-normal:0:0", "logit-normal:0:-1"]
        {
            let error = bad.parse::<TimeSampling>().unwrap_err();
            assert!(error.contains(bad) || error.contains("not a number"), "{bad}: {error}");
        }
    }
}
