//! SUM and AVG over floating-point values in a view, kept exactly. A float running total
//! keeps the rounding of rows long retracted (1e20 + 1 - 1e20 is 0 in floats, and
//! 0.1 + 0.2 - 0.1 is 0.20000000000000004), so a view's sum would drift from what a query of
//! the same rows answers. Here every finite value is added into (and on retraction taken out
//! of) a fixed-point integer in units of 2^-1074, the smallest f64, which holds any sum of
//! f64s without rounding; the sum is rounded to the nearest f64 only when it is read. NaN and
//! the infinities are counted apart, so retracting them works too.
//!
//! `group.rs` uses this accumulator in place of DataFusion's sliding one for these
//! aggregates; it speaks DataFusion's `Accumulator` so the group's update, retraction and
//! checkpoint encoding stay the same for every retractable aggregate.

use datafusion::arrow::array::{Array, ArrayRef, AsArray, BinaryArray};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Float64Type};
use datafusion::common::{DataFusionError, ScalarValue};
use datafusion::logical_expr::Accumulator;

/// The sign limb of a limb: all ones when its top bit is set, else zero.
fn ext(limb: u64) -> u64 {
    if limb >> 63 == 1 { u64::MAX } else { 0 }
}

/// 2^k as an f64, for -1022 <= k <= 1023.
fn pow2(k: i64) -> f64 {
    f64::from_bits(((k + 1023) as u64) << 52)
}

/// A signed integer in units of 2^-1074, two's complement over 64-bit limbs. Only the limbs
/// that carry bits are held: `limbs[0]` is limb `low` of the whole number (every limb below
/// it is zero) and the last limb is always a pure sign limb (zero or all ones, the sign of
/// the limb under it), so an addition never overflows. Zero holds no limbs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct FixedPoint {
    low: usize,
    limbs: Vec<u64>,
}

impl FixedPoint {
    fn is_negative(&self) -> bool {
        self.limbs.last().is_some_and(|l| *l == u64::MAX)
    }

    /// Makes the held limbs cover limbs `from..=to` of the number, plus a sign limb above.
    fn cover(&mut self, from: usize, to: usize) {
        if self.limbs.is_empty() {
            self.low = from;
            self.limbs = vec![0; to - from + 2];
            return;
        }
        if from < self.low {
            let n = self.low - from;
            self.limbs.splice(0..0, std::iter::repeat_n(0, n));
            self.low = from;
        }
        let sign = self.limbs.last().copied().unwrap_or(0);
        while self.low + self.limbs.len() < to + 2 {
            self.limbs.push(sign);
        }
    }

    /// Adds, or subtracts, the 128-bit `parts` (low limb first) placed at limb `at`.
    fn add_at(&mut self, at: usize, parts: [u64; 2], subtract: bool) {
        self.cover(at, at + 1);
        let start = at - self.low;
        let mut carry = false;
        for (k, limb) in self.limbs[start..].iter_mut().enumerate() {
            let part = parts.get(k).copied().unwrap_or(0);
            if subtract {
                let (v, b1) = limb.overflowing_sub(part);
                let (v, b2) = v.overflowing_sub(carry as u64);
                *limb = v;
                carry = b1 || b2;
            } else {
                let (v, c1) = limb.overflowing_add(part);
                let (v, c2) = v.overflowing_add(carry as u64);
                *limb = v;
                carry = c1 || c2;
            }
            if k >= 1 && !carry {
                break;
            }
        }
        self.normalize();
    }

    /// Adds another number (two's complement, sign-extended to the wider of the two).
    fn add(&mut self, other: &FixedPoint) {
        if other.limbs.is_empty() {
            return;
        }
        let top = other.low + other.limbs.len() - 1;
        self.cover(other.low, top);
        let other_sign = other.limbs.last().copied().unwrap_or(0);
        let start = other.low - self.low;
        let mut carry = false;
        for (k, limb) in self.limbs[start..].iter_mut().enumerate() {
            let part = other.limbs.get(k).copied().unwrap_or(other_sign);
            let (v, c1) = limb.overflowing_add(part);
            let (v, c2) = v.overflowing_add(carry as u64);
            *limb = v;
            carry = c1 || c2;
        }
        self.normalize();
    }

    /// Restores the invariants: a pure sign limb on top and no more; no zero limbs below.
    fn normalize(&mut self) {
        if self.limbs.iter().all(|l| *l == 0) {
            self.limbs.clear();
            self.low = 0;
            return;
        }
        let n = self.limbs.len();
        if n == 1 || self.limbs[n - 1] != ext(self.limbs[n - 2]) {
            let sign = ext(self.limbs[n - 1]);
            self.limbs.push(sign);
        }
        while self.limbs.len() >= 3 {
            let n = self.limbs.len();
            if self.limbs[n - 2] != ext(self.limbs[n - 3]) {
                break;
            }
            self.limbs.pop();
        }
        let zeros = self.limbs.iter().take_while(|l| **l == 0).count();
        if zeros > 0 {
            self.limbs.drain(..zeros);
            self.low += zeros;
        }
    }

    /// The nearest f64 (ties to even).
    fn to_f64(&self) -> f64 {
        if self.limbs.is_empty() {
            return 0.0;
        }
        let negative = self.is_negative();
        let mut magnitude = self.limbs.clone();
        if negative {
            let mut carry = true;
            for limb in magnitude.iter_mut() {
                let (v, c) = (!*limb).overflowing_add(carry as u64);
                *limb = v;
                carry = c;
            }
        }
        let Some(j) = magnitude.iter().rposition(|l| *l != 0) else {
            return 0.0;
        };
        // The highest set bit, counted from the first held limb.
        let top = j * 64 + 63 - magnitude[j].leading_zeros() as usize;
        // The 64 bits from the highest set bit down, and whether any bit below them is set.
        let (window, sticky) = if top >= 63 {
            let start = top - 63;
            let (i, off) = (start / 64, start % 64);
            let lo = magnitude[i] as u128;
            let hi = magnitude.get(i + 1).copied().unwrap_or(0) as u128;
            let window = (((hi << 64) | lo) >> off) as u64;
            let below = magnitude[..i].iter().any(|l| *l != 0)
                || (off > 0 && magnitude[i] & ((1u64 << off) - 1) != 0);
            (window, below)
        } else {
            (magnitude[0] << (63 - top), false)
        };
        // NOTE: the sticky bit sits under the rounding bit, so the conversion rounds the
        // whole number once; scaling by a power of two is then exact unless the result is
        // subnormal, and a subnormal result has at most 53 bits, all in the window.
        let rounded = (window | sticky as u64) as f64;
        let exponent = (self.low * 64 + top) as i64 - 63 - 1074;
        let value = if exponent > 2000 {
            f64::INFINITY
        } else {
            let half = exponent / 2;
            rounded * pow2(half) * pow2(exponent - half)
        };
        if negative { -value } else { value }
    }

    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&(self.low as u64).to_le_bytes());
        out.extend_from_slice(&(self.limbs.len() as u64).to_le_bytes());
        for limb in &self.limbs {
            out.extend_from_slice(&limb.to_le_bytes());
        }
    }

    fn decode(bytes: &mut &[u8]) -> Option<Self> {
        let low = take_u64(bytes)? as usize;
        let n = take_u64(bytes)? as usize;
        if n > bytes.len() / 8 || low > 1 << 20 {
            return None;
        }
        let limbs = (0..n)
            .map(|_| take_u64(bytes))
            .collect::<Option<Vec<_>>>()?;
        let mut number = FixedPoint { low, limbs };
        number.normalize();
        Some(number)
    }
}

fn take_u64(bytes: &mut &[u8]) -> Option<u64> {
    let (head, rest) = bytes.split_first_chunk::<8>()?;
    *bytes = rest;
    Some(u64::from_le_bytes(*head))
}

/// The exact SUM (or AVG) accumulator of one group.
#[derive(Debug, Clone)]
pub(super) struct ExactFloatSum {
    sum: FixedPoint,
    /// Non-NULL inputs, and among them NaNs, +inf and -inf (weighted counts).
    values: i64,
    nan: i64,
    pos_inf: i64,
    neg_inf: i64,
    average: bool,
    output: DataType,
}

impl ExactFloatSum {
    /// A fresh SUM (or, with `average`, AVG) whose result has type `output`.
    pub(super) fn new(average: bool, output: DataType) -> Self {
        Self {
            sum: FixedPoint::default(),
            values: 0,
            nan: 0,
            pos_inf: 0,
            neg_inf: 0,
            average,
            output,
        }
    }

    fn add_value(&mut self, x: f64, retract: bool) {
        let weight = if retract { -1 } else { 1 };
        self.values += weight;
        if x.is_nan() {
            self.nan += weight;
            return;
        }
        if x.is_infinite() {
            if x > 0.0 {
                self.pos_inf += weight;
            } else {
                self.neg_inf += weight;
            }
            return;
        }
        let bits = x.to_bits();
        let exponent = ((bits >> 52) & 0x7ff) as usize;
        let fraction = bits & ((1u64 << 52) - 1);
        // value = mantissa * 2^(shift - 1074)
        let (mantissa, shift) = if exponent == 0 {
            (fraction, 0)
        } else {
            (fraction | (1u64 << 52), exponent - 1)
        };
        if mantissa == 0 {
            return;
        }
        let wide = (mantissa as u128) << (shift % 64);
        let negative = bits >> 63 == 1;
        self.sum.add_at(
            shift / 64,
            [wide as u64, (wide >> 64) as u64],
            negative != retract,
        );
    }

    fn apply(&mut self, values: &[ArrayRef], retract: bool) -> datafusion::common::Result<()> {
        let Some(values) = values.first() else {
            return Ok(());
        };
        let values = cast(values, &DataType::Float64)?;
        let values = values.as_primitive::<Float64Type>();
        for i in 0..values.len() {
            if values.is_valid(i) {
                self.add_value(values.value(i), retract);
            }
        }
        Ok(())
    }
}

impl Accumulator for ExactFloatSum {
    fn update_batch(&mut self, values: &[ArrayRef]) -> datafusion::common::Result<()> {
        self.apply(values, false)
    }

    fn retract_batch(&mut self, values: &[ArrayRef]) -> datafusion::common::Result<()> {
        self.apply(values, true)
    }

    fn supports_retract_batch(&self) -> bool {
        true
    }

    fn evaluate(&mut self) -> datafusion::common::Result<ScalarValue> {
        let value = if self.values <= 0 {
            None
        } else if self.nan > 0 || (self.pos_inf > 0 && self.neg_inf > 0) {
            Some(f64::NAN)
        } else if self.pos_inf > 0 {
            Some(f64::INFINITY)
        } else if self.neg_inf > 0 {
            Some(f64::NEG_INFINITY)
        } else {
            let sum = self.sum.to_f64();
            Some(if self.average {
                sum / self.values as f64
            } else {
                sum
            })
        };
        ScalarValue::Float64(value).cast_to(&self.output)
    }

    fn size(&self) -> usize {
        std::mem::size_of::<Self>() + self.sum.limbs.capacity() * 8
    }

    /// One binary value: the four counts, then the number.
    fn state(&mut self) -> datafusion::common::Result<Vec<ScalarValue>> {
        let mut out = Vec::with_capacity(48 + self.sum.limbs.len() * 8);
        for n in [self.values, self.nan, self.pos_inf, self.neg_inf] {
            out.extend_from_slice(&n.to_le_bytes());
        }
        self.sum.encode(&mut out);
        Ok(vec![ScalarValue::Binary(Some(out))])
    }

    fn merge_batch(&mut self, states: &[ArrayRef]) -> datafusion::common::Result<()> {
        let Some(states) = states.first() else {
            return Ok(());
        };
        let states = cast(states, &DataType::Binary)?;
        let states: &BinaryArray = states.as_binary();
        for i in 0..states.len() {
            if states.is_null(i) {
                continue;
            }
            let mut bytes = states.value(i);
            let corrupt = || DataFusionError::Internal("exact sum state is corrupt".into());
            let mut counts = [0i64; 4];
            for c in counts.iter_mut() {
                *c = take_u64(&mut bytes).ok_or_else(corrupt)? as i64;
            }
            let number = FixedPoint::decode(&mut bytes).ok_or_else(corrupt)?;
            self.values += counts[0];
            self.nan += counts[1];
            self.pos_inf += counts[2];
            self.neg_inf += counts[3];
            self.sum.add(&number);
        }
        Ok(())
    }
}

/// A fresh exact accumulator, boxed as the group state holds it.
pub(super) fn exact_float_sum(average: bool, output: DataType) -> Box<dyn Accumulator> {
    Box::new(ExactFloatSum::new(average, output))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    /// The input arrays of a sum: one Float64 array.
    fn floats(values: &[f64]) -> Vec<ArrayRef> {
        vec![Arc::new(datafusion::arrow::array::Float64Array::from(
            values.to_vec(),
        ))]
    }

    fn sum_of(add: &[f64], retract: &[f64]) -> f64 {
        let mut acc = ExactFloatSum::new(false, DataType::Float64);
        acc.update_batch(&floats(add)).unwrap();
        acc.retract_batch(&floats(retract)).unwrap();
        match acc.evaluate().unwrap() {
            ScalarValue::Float64(Some(v)) => v,
            other => panic!("sum is {other:?}"),
        }
    }

    #[test]
    fn retracting_leaves_exactly_the_sum_of_the_rest() {
        assert_eq!(sum_of(&[0.1, 0.2], &[0.1]), 0.2);
        assert_eq!(sum_of(&[1e20, 1.0], &[1e20]), 1.0);
        assert_eq!(sum_of(&[1e308, 1e308, -1e308], &[1e308]), 0.0);
        assert_eq!(sum_of(&[5e-324, 5e-324], &[]), 1e-323);
        assert_eq!(sum_of(&[-2.5, 1.25], &[]), -1.25);
        assert_eq!(sum_of(&[f64::MAX, f64::MAX], &[]), f64::INFINITY);
    }

    /// The sum rounds once, to nearest with ties to even, as the exact sum computed with
    /// integers says (values that are integers below 2^62 in units of 2^-20).
    #[test]
    fn rounding_is_that_of_the_exact_sum() {
        let mut seed: u64 = 0x5eed_0001;
        println!("seed {seed:#x}");
        for _ in 0..2000 {
            let mut units = Vec::new();
            for _ in 0..8 {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let unit = ((seed >> 4) as i64) >> (seed % 40);
                units.push(if seed & 1 == 1 { -unit } else { unit });
            }
            let exact: i128 = units.iter().map(|u| *u as i128).sum();
            let values: Vec<f64> = units.iter().map(|u| *u as f64 / 1048576.0).collect();
            // Every value is exact as an f64 only when it has at most 53 bits.
            if units.iter().any(|u| u.unsigned_abs() >= 1 << 53) {
                continue;
            }
            let expected = exact as f64 / 1048576.0;
            assert_eq!(sum_of(&values, &[]), expected, "units {units:?}");
        }
    }

    #[test]
    fn nan_and_infinities_are_counted_apart() {
        assert!(sum_of(&[f64::NAN, 1.0], &[]).is_nan());
        assert_eq!(sum_of(&[f64::NAN, 1.0], &[f64::NAN]), 1.0);
        assert!(sum_of(&[f64::INFINITY, f64::NEG_INFINITY], &[]).is_nan());
        assert_eq!(
            sum_of(&[f64::INFINITY, f64::NEG_INFINITY, 2.0], &[f64::INFINITY]),
            f64::NEG_INFINITY
        );
    }

    #[test]
    fn the_state_round_trips_and_merges() {
        let mut a = ExactFloatSum::new(true, DataType::Float64);
        a.update_batch(&floats(&[1e20, -3.5, 1.0, f64::INFINITY]))
            .unwrap();
        a.retract_batch(&floats(&[1e20, f64::INFINITY])).unwrap();
        let state = a.state().unwrap();
        let mut b = ExactFloatSum::new(true, DataType::Float64);
        let arrays: Vec<ArrayRef> = state.iter().map(|s| s.to_array().unwrap()).collect();
        b.merge_batch(&arrays).unwrap();
        assert_eq!(b.evaluate().unwrap(), ScalarValue::Float64(Some(-1.25)));
        b.retract_batch(&floats(&[-3.5, 1.0])).unwrap();
        assert_eq!(b.evaluate().unwrap(), ScalarValue::Float64(None));
        assert!(b.sum.limbs.is_empty(), "zero holds no limbs: {:?}", b.sum);
    }
}
