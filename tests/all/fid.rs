//! The Fréchet distance against pytorch-fid (`golden/frechet`), and feature statistics.

use lfm::metrics::fid::{frechet_distance, Accumulator, FidError, Statistics};

use crate::common::*;

fn stats(io: &lfm::checkpoint::TensorMap, prefix: &str, i: usize) -> Statistics {
    Statistics {
        mu: get(io, &format!("{prefix}mu{i}")).to_f64(),
        sigma: get(io, &format!("{prefix}sigma{i}")).to_f64(),
    }
}

#[test]
fn frechet_distance_matches_pytorch_fid() {
    let io = io("frechet");
    for (prefix, tol) in [("", 1e-8), ("lowrank.", 1e-6)] {
        let got = frechet_distance(&stats(&io, prefix, 1), &stats(&io, prefix, 2)).unwrap();
        let want = get(&io, &format!("{prefix}fd")).to_f64()[0];
        assert!(((got - want) / want).abs() <= tol, "{prefix}fd: {got} vs pytorch-fid {want}");
    }
}

#[test]
fn statistics_of_a_set_against_itself_give_zero() {
    let mut acc = Accumulator::new(3);
    // Two batches, as features arrive.
    acc.add(&[1.0, 2.0, 0.5, 0.0, 1.0, 1.5]).unwrap();
    acc.add(&[2.0, 0.0, 1.0, 1.0, 3.0, -1.0, 0.5, 0.5, 0.5]).unwrap();
    let s = acc.finish().unwrap();
    assert_eq!(acc.count(), 5);
    // np.mean / np.cov(rowvar=False) of the five rows.
    let rows = [[1.0, 2.0, 0.5], [0.0, 1.0, 1.5], [2.0, 0.0, 1.0], [1.0, 3.0, -1.0], [0.5, 0.5, 0.5]];
    for j in 0..3 {
        let mean = rows.iter().map(|r| r[j]).sum::<f64>() / 5.0;
        assert!((s.mu[j] - mean).abs() < 1e-12);
        for k in 0..3 {
            let mk = rows.iter().map(|r| r[k]).sum::<f64>() / 5.0;
            let cov = rows.iter().map(|r| (r[j] - mean) * (r[k] - mk)).sum::<f64>() / 4.0;
            assert!((s.sigma[j * 3 + k] - cov).abs() < 1e-12, "Σ[{j},{k}]");
        }
    }
    assert!(frechet_distance(&s, &s).unwrap().abs() < 1e-9);
    // Errors: mismatched dimensions, broken values, too few samples.
    let other = Statistics { mu: vec![0.0; 2], sigma: vec![1.0, 0.0, 0.0, 1.0] };
    assert!(matches!(frechet_distance(&s, &other), Err(FidError::Dimensions(_))));
    let broken = Statistics { mu: vec![f64::NAN, 0.0, 0.0], ..s.clone() };
    assert!(matches!(frechet_distance(&broken, &s), Err(FidError::NonFinite(_))));
    assert_eq!(Accumulator::new(3).finish().unwrap_err(), FidError::TooFewSamples(0));
}
