//! Time arithmetic in the state's dtype.
//!
//! torchdiffeq keeps its step controller in float64, but inside an RK step it casts `t0`, `dt` and `t1` to the
//! state's dtype and forms the stage times and the tableau-weighted step sizes there. Reproducing that rounding is
//! what makes the evaluated times (and so the network's inputs) agree with the reference to the last digit.

use burn::tensor::DType;

/// The floating-point precision in which a solver rounds times and tableau weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimePrecision {
    /// Round through `f32` (float32, float16 and bfloat16 states).
    F32,
    /// Keep full `f64` (float64 states).
    F64,
}

impl TimePrecision {
    /// The precision torchdiffeq would use for a state of this dtype.
    pub fn of(dtype: DType) -> Self {
        match dtype {
            DType::F64 => Self::F64,
            _ => Self::F32,
        }
    }

    /// Rounds a value to this precision.
    pub fn round(self, x: f64) -> f64 {
        match self {
            Self::F32 => x as f32 as f64,
            Self::F64 => x,
        }
    }

    /// `a + b`, rounded as the state dtype would round it.
    pub fn add(self, a: f64, b: f64) -> f64 {
        match self {
            Self::F32 => (a as f32 + b as f32) as f64,
            Self::F64 => a + b,
        }
    }

    /// `a − b`, rounded as the state dtype would round it.
    pub fn sub(self, a: f64, b: f64) -> f64 {
        match self {
            Self::F32 => (a as f32 - b as f32) as f64,
            Self::F64 => a - b,
        }
    }

    /// `a · b`, rounded as the state dtype would round it.
    pub fn mul(self, a: f64, b: f64) -> f64 {
        match self {
            Self::F32 => (a as f32 * b as f32) as f64,
            Self::F64 => a * b,
        }
    }

    /// The neighbouring representable value of `x` in the direction of `towards` (C's `nextafter`).
    pub fn next_after(self, x: f64, towards: f64) -> f64 {
        match self {
            Self::F32 => next_after_f32(x as f32, towards as f32) as f64,
            Self::F64 => next_after_f64(x, towards),
        }
    }
}

fn next_after_f32(x: f32, towards: f32) -> f32 {
    if x.is_nan() || towards.is_nan() {
        return f32::NAN;
    }
    if x == towards {
        return towards;
    }
    if x == 0.0 {
        let tiny = f32::from_bits(1);
        return if towards > 0.0 { tiny } else { -tiny };
    }
    let bits = x.to_bits();
    let away_from_zero = (towards > x) == (x > 0.0);
    f32::from_bits(if away_from_zero { bits + 1 } else { bits - 1 })
}

fn next_after_f64(x: f64, towards: f64) -> f64 {
    if x.is_nan() || towards.is_nan() {
        return f64::NAN;
    }
    if x == towards {
        return towards;
    }
    if x == 0.0 {
        let tiny = f64::from_bits(1);
        return if towards > 0.0 { tiny } else { -tiny };
    }
    let bits = x.to_bits();
    let away_from_zero = (towards > x) == (x > 0.0);
    f64::from_bits(if away_from_zero { bits + 1 } else { bits - 1 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_after_moves_one_ulp() {
        let p = TimePrecision::F32;
        assert_eq!(p.next_after(1.0, 2.0), (1.0f32 + f32::EPSILON) as f64);
        assert_eq!(p.next_after(1.0, 0.0), (1.0f32 - f32::EPSILON / 2.0) as f64);
        assert_eq!(p.next_after(-1.0, 0.0), (-1.0f32 + f32::EPSILON / 2.0) as f64);
        assert_eq!(TimePrecision::F64.next_after(0.0, -1.0), -f64::from_bits(1));
        assert_eq!(TimePrecision::F64.next_after(1.0, 2.0), 1.0 + f64::EPSILON);
    }
}
