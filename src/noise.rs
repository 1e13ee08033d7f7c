//! Deterministic per-sample noise: sample `i` of a seed gets the same values whatever the batch it is drawn in.

use rand::{rngs::StdRng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};

/// The generator of sample `index` of stream `seed`.
pub fn rng(seed: u64, index: u64) -> StdRng {
    // SplitMix64 of (seed, index): independent streams for neighbouring seeds and indices.
    let mut z = seed.wrapping_add(index.wrapping_mul(0x9E37_79B9_7F4A_7C15)).wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    StdRng::seed_from_u64(z ^ (z >> 31))
}

/// `len` standard-normal values for sample `index` of stream `seed`.
pub fn standard_normal(seed: u64, index: u64, len: usize) -> Vec<f32> {
    let mut rng = rng(seed, index);
    (0..len).map(|_| StandardNormal.sample(&mut rng)).collect()
}

/// A uniformly random integer in `0..n` for sample `index` of stream `seed` (a stream apart from the noise's).
pub fn uniform_index(seed: u64, index: u64, n: usize) -> usize {
    use rand::Rng;
    rng(seed ^ 0x1ABE_15EE_D000_0000, index).random_range(0..n)
}

/// Noise for samples `first..first + count`, concatenated.
pub fn batch(seed: u64, first: u64, count: usize, per_sample: usize) -> Vec<f32> {
    (0..count as u64).flat_map(|i| standard_normal(seed, first + i, per_sample)).collect()
}
