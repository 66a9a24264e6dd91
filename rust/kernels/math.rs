//! The activations' math, lane by lane in registers, written once over [`SimdVec`] for both
//! element types; what differs by type (range limits, the split of `ln 2`, the polynomials'
//! coefficients, fitted by `tools/fit_activations.py` into `coefficients.rs`) is in its
//! [`Constants`] (`Element::MATH`).
//!
//! Accuracy comes from avoiding cancellation rather than from long polynomials: a sigmoid is
//! `1 / (1 + z)` or `z / (1 + z)` with `z = exp(-|x|)`, never `1 - something`; `tanh` goes
//! through `expm1`, exact near 0; the GELU's normal CDF is `exp(-x^2 / 2)` times a fitted tail
//! (its argument's square carried as two values, so the exponential stays accurate to `|x| ~ 38`),
//! and `1 - tail` only on the side where it is at least a half; the tanh GELU is `x sigmoid(2u)`
//! with `2u` carried as two values; softplus is `max(y, 0) + log1p(exp(-|y|))`, two terms of one
//! sign. No branch, no gather, one division at most per op.
//! `docs/activations.md` has the measured errors.

use super::coefficients::{
    EXPM1_F32, EXPM1_F64, LOG1P_F32, LOG1P_F64, NORMAL_TAIL_F32, NORMAL_TAIL_F64,
    NORMAL_TAIL_K_F32, NORMAL_TAIL_K_F64,
};
use super::{Element, SimdVec};

/// The numbers the functions need, per element type.
#[derive(Debug)]
pub struct Constants<T: 'static> {
    log2_e: T,
    /// `ln 2` split in two: `ln2_hi` has enough trailing zero bits that `n * ln2_hi` is exact
    /// for every `n` an exponential meets, so the reduction `x - n ln 2` does not round away the
    /// low bits even where the multiply-add rounds twice (the portable kernel).
    ln2_hi: T,
    ln2_lo: T,
    /// The most negative argument whose exponential is computed: `exp(lower)` is still normal
    /// (so `2^n` is in `scale_pow2`'s range); below it the result is 0, off by less than
    /// `exp(lower)` (1.6e-38 for f32, 3e-308 for f64).
    exp_lower: T,
    /// `expm1(r) = r + r^2 P(r)` for `|r| <= ln(2) / 2`.
    expm1: &'static [T],
    /// `log1p(z) = 2s + s^3 P(s^2)`, `s = z / (2 + z)`, for `0 <= z <= 1`.
    log1p: &'static [T],
    /// `Phi(-a) = exp(-a^2 / 2) t P(t)` with `t = k / (k + a)` over the range of `a` where
    /// `exp(-a^2 / 2)` is above `exp(lower)`.
    normal_tail: &'static [T],
    normal_tail_k: T,
    /// `c = 2 sqrt(2 / pi) 0.044715` and `k = 1 / 0.044715`, each split in two (`hi + lo`
    /// within 1e-15 relative): the tanh GELU is `x sigmoid(2u)`, since `1 + tanh(u) = 2
    /// sigmoid(2u)`, with `2u = c x (x^2 + k)`. `k_hi` is a multiple of the ulp of `[256, 512)`
    /// (2^-15 for f32, 2^-44 for f64), which makes `k_hi + x^2` a Fast2Sum (its rounding error
    /// exact) for every `x^2 < 512 - k`.
    gelu_tanh_c_hi: T,
    gelu_tanh_c_lo: T,
    gelu_tanh_k_hi: T,
    gelu_tanh_k_lo: T,
}

pub(super) const F32: Constants<f32> = Constants {
    log2_e: std::f32::consts::LOG2_E,
    ln2_hi: 0.693_145_75,
    ln2_lo: 1.428_606_8e-6,
    exp_lower: -87.0,
    expm1: &EXPM1_F32,
    log1p: &LOG1P_F32,
    normal_tail: &NORMAL_TAIL_F32,
    normal_tail_k: NORMAL_TAIL_K_F32,
    gelu_tanh_c_hi: 0.071_354_814,
    gelu_tanh_c_lo: 2.398_832_5e-9,
    gelu_tanh_k_hi: 22.363_861,
    gelu_tanh_k_lo: -1.081_748e-6,
};

pub(super) const F64: Constants<f64> = Constants {
    log2_e: std::f64::consts::LOG2_E,
    ln2_hi: 6.931_471_803_691_238e-1,
    ln2_lo: 1.908_214_929_270_587_7e-10,
    exp_lower: -708.0,
    expm1: &EXPM1_F64,
    log1p: &LOG1P_F64,
    normal_tail: &NORMAL_TAIL_F64,
    normal_tail_k: NORMAL_TAIL_K_F64,
    gelu_tanh_c_hi: 0.071_354_816_272_600_25,
    gelu_tanh_c_lo: -6.175_149_918_155_315e-19,
    gelu_tanh_k_hi: 22.363_860_002_236_38,
    gelu_tanh_k_lo: 7.068_084_733_670_861e-15,
};

/// A register of `value`, converted from f64 to the element type.
///
/// # Safety
/// The CPU supports `V`'s ISA.
#[inline(always)]
pub(super) unsafe fn splat_f64<V: SimdVec>(value: f64) -> V {
    // SAFETY: forwarded from the caller.
    unsafe { V::constant(V::Elem::from_f64(value)) }
}

/// `c[0] + c[1] x + c[2] x^2 + ...` by Horner's rule.
///
/// # Safety
/// The CPU supports `V`'s ISA.
#[inline(always)]
unsafe fn polynomial<V: SimdVec>(x: V, coefficients: &[V::Elem]) -> V {
    let (&last, rest) = coefficients
        .split_last()
        .expect("a polynomial has a coefficient");
    // SAFETY: forwarded from the caller.
    unsafe {
        rest.iter()
            .rev()
            .fold(V::constant(last), |acc, &c| acc.mul_add(x, V::constant(c)))
    }
}

/// `(n, r)` with `x = n ln 2 + r`, `n` integral and `|r| <= ln(2) / 2` (a little more after
/// rounding), for `|x|` within the exponentials' range.
///
/// # Safety
/// The CPU supports `V`'s ISA.
#[inline(always)]
unsafe fn reduce<V: SimdVec>(x: V) -> (V, V) {
    let c = &V::Elem::MATH;
    // SAFETY: forwarded from the caller.
    unsafe {
        let n = x.mul(V::constant(c.log2_e)).round_even();
        let r = n.mul_add(V::constant(c.ln2_hi).neg(), x);
        (n, n.mul_add(V::constant(c.ln2_lo).neg(), r))
    }
}

/// `expm1(r)` for a reduced `r`.
///
/// # Safety
/// The CPU supports `V`'s ISA.
#[inline(always)]
unsafe fn expm1_reduced<V: SimdVec>(r: V) -> V {
    // SAFETY: forwarded from the caller.
    unsafe { r.mul(r).mul_add(polynomial(r, V::Elem::MATH.expm1), r) }
}

/// `exp(hi + lo)` for `hi <= 0` (or NaN) and `|lo|` below an ulp of `hi`: 0 where `hi` is
/// below the range (`-inf` included), NaN for NaN. `lo` carries what `hi` rounded off, where
/// the argument was computed.
///
/// # Safety
/// The CPU supports `V`'s ISA.
#[inline(always)]
pub(super) unsafe fn exp_nonpositive<V: SimdVec>(hi: V, lo: Option<V>) -> V {
    // SAFETY: forwarded from the caller.
    unsafe {
        let lower = V::constant(V::Elem::MATH.exp_lower);
        // `lower.max(NaN)` is NaN, which the rest keeps.
        let (n, r) = reduce(lower.max(hi));
        let r = lo.map_or(r, |lo| r.add(lo));
        let value = expm1_reduced(r).add(splat_f64(1.0)).scale_pow2(n);
        hi.select_lt(lower, V::zero(), value)
    }
}

/// `exp(x) - 1` for `x <= 0` (or NaN), accurate near 0: -1 below the range (`-inf`
/// included). `expm1(-0)` is `+0`.
///
/// # Safety
/// The CPU supports `V`'s ISA.
#[inline(always)]
unsafe fn expm1_nonpositive<V: SimdVec>(x: V) -> V {
    // SAFETY: forwarded from the caller.
    unsafe {
        let one = splat_f64::<V>(1.0);
        let (n, r) = reduce(V::constant(V::Elem::MATH.exp_lower).max(x));
        let power = one.scale_pow2(n);
        // 2^n (1 + expm1(r)) - 1, with 2^n - 1 exact where it matters (n >= -24 for f32).
        expm1_reduced(r).mul_add(power, power.sub(one))
    }
}

/// `log(1 + z)` for `0 <= z <= 1` (or NaN), accurate for tiny `z`.
///
/// # Safety
/// The CPU supports `V`'s ISA.
#[inline(always)]
unsafe fn log1p_unit<V: SimdVec>(z: V) -> V {
    // SAFETY: forwarded from the caller.
    unsafe {
        let s = z.div(splat_f64::<V>(2.0).add(z));
        let s2 = s.mul(s);
        s.mul(s2)
            .mul_add(polynomial(s2, V::Elem::MATH.log1p), s.add(s))
    }
}

/// `(numerator, denominator)` with `sigmoid(x) = numerator / denominator`, so an op that
/// multiplies the sigmoid by something divides once.
///
/// # Safety
/// The CPU supports `V`'s ISA.
#[inline(always)]
unsafe fn sigmoid_fraction<V: SimdVec>(x: V) -> (V, V) {
    // SAFETY: forwarded from the caller.
    unsafe {
        let one = splat_f64::<V>(1.0);
        let z = exp_nonpositive(x.abs().neg(), None);
        (x.select_lt(V::zero(), z, one), one.add(z))
    }
}

/// `1 / (1 + exp(-x))`.
///
/// # Safety
/// The CPU supports `V`'s ISA.
#[inline(always)]
pub(super) unsafe fn sigmoid<V: SimdVec>(x: V) -> V {
    // SAFETY: forwarded from the caller.
    unsafe {
        let (numerator, denominator) = sigmoid_fraction(x);
        numerator.div(denominator)
    }
}

/// `x sigmoid(x)`.
///
/// # Safety
/// The CPU supports `V`'s ISA.
#[inline(always)]
pub(super) unsafe fn silu<V: SimdVec>(x: V) -> V {
    // SAFETY: forwarded from the caller.
    unsafe {
        let (numerator, denominator) = sigmoid_fraction(x);
        x.mul(numerator).div(denominator)
    }
}

/// `tanh(x) = -expm1(-2|x|) / (2 + expm1(-2|x|))` with the sign of `x`.
///
/// # Safety
/// The CPU supports `V`'s ISA.
#[inline(always)]
pub(super) unsafe fn tanh<V: SimdVec>(x: V) -> V {
    // SAFETY: forwarded from the caller.
    unsafe {
        let m = expm1_nonpositive(x.abs().mul(splat_f64(-2.0)));
        m.neg().div(m.add(splat_f64(2.0))).copy_sign(x)
    }
}

/// `x Phi(x)`, `Phi` the standard normal CDF (see [`normal_cdf`]).
///
/// # Safety
/// The CPU supports `V`'s ISA.
#[inline(always)]
pub(super) unsafe fn gelu<V: SimdVec>(x: V) -> V {
    // SAFETY: forwarded from the caller.
    unsafe { x.mul(normal_cdf(x).0) }
}

/// `(Phi(x), exp(-x^2 / 2))`: `Phi(-|x|)` from its fitted tail, `Phi(|x|) = 1 - Phi(-|x|)`, and
/// the Gaussian that tail is a multiple of (GELU's gradient needs it too).
///
/// # Safety
/// The CPU supports `V`'s ISA.
#[inline(always)]
pub(super) unsafe fn normal_cdf<V: SimdVec>(x: V) -> (V, V) {
    let c = &V::Elem::MATH;
    // SAFETY: forwarded from the caller.
    unsafe {
        let a = x.abs();
        let k = V::constant(c.normal_tail_k);
        let t = k.div(k.add(a));
        let tail = t.mul(polynomial(t, c.normal_tail));
        // a^2 = square + square_error exactly: at |x| = 13 in f32, a^2 / 2 rounded alone would
        // be off by 4e-6, and the exponential by as much, relative.
        let square = a.mul(a);
        let square_error = a.fused_mul_add(a, square.neg());
        let minus_half = splat_f64::<V>(-0.5);
        let gaussian = exp_nonpositive(square.mul(minus_half), Some(square_error.mul(minus_half)));
        let lower = gaussian.mul(tail);
        let cdf = x.select_lt(V::zero(), lower, splat_f64::<V>(1.0).sub(lower));
        (cdf, gaussian)
    }
}

/// `x / 2 (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))`, as `x sigmoid(2u)` with `2u = c x (x^2 +
/// k)` carried as two values: the sigmoid of `2u ~ -70` turns an absolute error in `2u` into
/// the same relative one in the result, so `2u` rounded once in f32 (6e-8 of 70) would already
/// be off by 4e-6 relative. Every rounding on the way is caught: `x^2` and both products by
/// FMAs, the sum by a Fast2Sum, and `c`, `k` are split in two. `|x|` is clamped to 22 first
/// (there `|2u| = 795`, so `exp(-|2u|)` is 0 in both types and the sigmoid has saturated), so
/// nothing overflows and the Fast2Sum's condition holds; `2u` is odd, so it is computed for
/// `|x|` and `-|2u|` goes to the exponential directly.
///
/// # Safety
/// The CPU supports `V`'s ISA.
#[inline(always)]
pub(super) unsafe fn gelu_tanh<V: SimdVec>(x: V) -> V {
    let c = &V::Elem::MATH;
    // SAFETY: forwarded from the caller.
    unsafe {
        // NaN stays NaN (`limit.min(NaN)` is NaN).
        let a = splat_f64::<V>(22.0).min(x.abs());
        let minus_a = a.neg();
        // a^2 = square - minus_square_error exactly.
        let square = a.mul(a);
        let minus_square_error = minus_a.fused_mul_add(a, square);
        // square + k_hi = sum + sum_error exactly (a Fast2Sum: `k_hi`'s last bit is no finer
        // than the ulps of `square` and `sum`, as `sum < 512`), so a^2 + k = sum + sum_lo.
        let k_hi = V::constant(c.gelu_tanh_k_hi);
        let sum = square.add(k_hi);
        let sum_error = square.sub(sum.sub(k_hi));
        let sum_lo = sum_error
            .add(V::constant(c.gelu_tanh_k_lo))
            .sub(minus_square_error);
        // a (sum + sum_lo) = product - minus_product_lo (to the rounding of the small terms).
        let product = a.mul(sum);
        let minus_product_lo = minus_a.mul_add(sum_lo, minus_a.fused_mul_add(sum, product));
        // -|2u| = -c (product - minus_product_lo) = hi + lo: hi = -c_hi product rounded, lo =
        // what that rounded off (an FMA gives its negative), + c_hi minus_product_lo - c_lo
        // product.
        let c_hi = V::constant(c.gelu_tanh_c_hi);
        let hi = c_hi.neg().mul(product);
        let minus_lo_of_hi = c_hi.fused_mul_add(product, hi);
        let lo = c_hi
            .mul_add(
                minus_product_lo,
                V::constant(c.gelu_tanh_c_lo).neg().mul(product),
            )
            .sub(minus_lo_of_hi);
        // sigmoid(2u) = 1 / (1 + z) for x >= 0, z / (1 + z) below, z = exp(-|2u|).
        let one = splat_f64::<V>(1.0);
        let z = exp_nonpositive(hi, Some(lo));
        x.mul(x.select_lt(V::zero(), z, one)).div(one.add(z))
    }
}

/// `x` where `x > 0`, else `alpha expm1(x)`.
///
/// # Safety
/// The CPU supports `V`'s ISA.
#[inline(always)]
pub(super) unsafe fn elu<V: SimdVec>(x: V, alpha: V) -> V {
    // SAFETY: forwarded from the caller.
    unsafe {
        // `min` gives 0 for NaN, which the select then passes through as `x`; `-0` is `x` too.
        let negative = alpha.mul(expm1_nonpositive(x.min(V::zero())));
        x.select_lt(V::zero(), negative, x)
    }
}

/// `x` where `beta x > threshold`, else `log1p(exp(beta x)) / beta`, the latter as
/// `(max(y, 0) + log1p(exp(-|y|))) / beta` with `y = beta x` (no overflow, no cancellation),
/// and `y`'s rounding error carried into the exponential.
///
/// # Safety
/// The CPU supports `V`'s ISA.
#[inline(always)]
pub(super) unsafe fn softplus<V: SimdVec>(x: V, beta: V, threshold: V) -> V {
    // SAFETY: forwarded from the caller.
    unsafe {
        let y = x.mul(beta);
        let y_error = x.fused_mul_add(beta, y.neg());
        // -|y| = -|y_rounded| - sign(y) y_error.
        let error_of_negative_magnitude = y.select_lt(V::zero(), y_error, y_error.neg());
        let z = exp_nonpositive(y.abs().neg(), Some(error_of_negative_magnitude));
        let soft = V::zero().max(y).add(log1p_unit(z)).div(beta);
        threshold.select_lt(y, x, soft)
    }
}
