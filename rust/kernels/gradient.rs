//! The post-ops' gradients in registers: `grad * op'(...)`, from the op's output where PyTorch's
//! backward reads it (ReLU, Sigmoid, Tanh) and from its input otherwise
//! ([`PostOp::gradient_reads_pre`]), each in the order of operations of PyTorch's CPU formula
//! (`aten/src/ATen/native/cpu/*Kernel.cpp`), so the two round alike.

use super::math::{self, splat_f64};
use super::{PostOp, SimdVec};

/// `1 / sqrt(2 pi)`: the standard normal density at 0.
const NORMAL_DENSITY_AT_0: f64 = 0.398_942_280_401_432_7;
/// `sqrt(2 / pi)` and `0.044715`, GELU(tanh)'s constants.
const GELU_TANH_BETA: f64 = 0.797_884_560_802_865_4;
const GELU_TANH_KAPPA: f64 = 0.044715;

/// `grad * op'(x)`, where `value` is the op's output `op(x)`, or `x` itself where the op's
/// gradient reads its input ([`PostOp::gradient_reads_pre`]).
///
/// # Safety
/// The CPU supports `V`'s ISA.
#[inline(always)]
pub(super) unsafe fn chain_rule<V: SimdVec>(op: PostOp, grad: V, value: V) -> V {
    // SAFETY: forwarded from the caller.
    unsafe {
        let zero = V::zero();
        let one = splat_f64::<V>(1.0);
        match op {
            PostOp::Identity => grad,
            // Zero where the output is `<= 0`, as `threshold_backward`: a NaN output passes the
            // gradient (the inner select tells NaN from the outputs' 0 and -0).
            PostOp::Relu => zero.select_lt(value, grad, value.select_lt(one, zero, grad)),
            // `(1 - y) y`, as `sigmoid_backward`.
            PostOp::Sigmoid => grad.mul(one.sub(value)).mul(value),
            // `1 - y^2`, as `tanh_backward`.
            PostOp::Tanh => grad.mul(one.sub(value.mul(value))),
            PostOp::LeakyRelu { negative_slope } => {
                zero.select_lt(value, grad, grad.mul(splat_f64(negative_slope)))
            }
            // Inside `(min_val, max_val)` only.
            PostOp::Hardtanh { min_val, max_val } => {
                let above_min = splat_f64::<V>(min_val).select_lt(value, grad, zero);
                value.select_lt(splat_f64(max_val), above_min, zero)
            }
            // `Phi(x) + x phi(x)`.
            PostOp::Gelu => {
                let (cdf, gaussian) = math::normal_cdf(value);
                let density = gaussian.mul(splat_f64(NORMAL_DENSITY_AT_0));
                grad.mul(cdf.add(value.mul(density)))
            }
            // `(1 + t) / 2 + x / 2 (1 - t^2) beta (1 + 3 kappa x^2)`, `t = tanh(beta (x + kappa
            // x^3))`, as `GeluBackwardKernelImpl`.
            PostOp::GeluTanh => {
                let half = splat_f64::<V>(0.5);
                let square = value.mul(value);
                let cube = square.mul(value);
                let beta = splat_f64::<V>(GELU_TANH_BETA);
                let kappa = splat_f64::<V>(GELU_TANH_KAPPA);
                let inner = beta.mul(value.add(kappa.mul(cube)));
                let t = math::tanh(inner);
                let left = half.mul(value);
                let left_derivative = half.mul(one.add(t));
                let tanh_derivative = one.sub(t.mul(t));
                let inner_derivative =
                    beta.mul(one.add(splat_f64::<V>(3.0).mul(kappa).mul(square)));
                let right_derivative = left.mul(tanh_derivative).mul(inner_derivative);
                grad.mul(left_derivative.add(right_derivative))
            }
            // `s (1 + x (1 - s))`, `s = sigmoid(x)`.
            PostOp::Silu => {
                let s = math::sigmoid(value);
                grad.mul(s).mul(one.add(value.mul(one.sub(s))))
            }
            // `alpha exp(x)` where `x <= 0`, and NaN where `x` is (`zero.min` keeps it), as
            // PyTorch's vectorized kernel: a diverging run's NaN reaches the gradients.
            PostOp::Elu { alpha } => {
                let exp = math::exp_nonpositive(zero.min(value), None);
                let negative = grad.mul(splat_f64::<V>(alpha).mul(exp));
                zero.select_lt(value, grad, negative)
            }
            // `sigmoid(beta x)`, or 1 where `beta x > threshold` (the op is `x` there).
            PostOp::Softplus { beta, threshold } => {
                let scaled = value.mul(splat_f64(beta));
                let slope = grad.mul(math::sigmoid(scaled));
                splat_f64::<V>(threshold).select_lt(scaled, grad, slope)
            }
        }
    }
}

/// `delta = grad * op'(value)` for `rows` rows of `width` values (`grad`, `value` and `delta`
/// rows `ldg`, `ldv` and `ldd` apart; `delta`'s rows padded to whole registers, zeros past
/// `width`), and with `bias_grad` (whole registers covering `width`), each column's sum of
/// `delta` added to it.
///
/// # Safety
/// `grad` and `value` are readable for `rows x width` values at their strides, `delta` writable
/// for `rows` rows of `padded(width, LANES)` values, `bias_grad` (if not null) readable and
/// writable for as many; they do not overlap; the CPU supports `V`'s ISA.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(super) unsafe fn delta_rows<V: SimdVec>(
    op: PostOp,
    rows: usize,
    width: usize,
    grad: *const V::Elem,
    ldg: usize,
    value: *const V::Elem,
    ldv: usize,
    delta: *mut V::Elem,
    ldd: usize,
    bias_grad: *mut V::Elem,
) {
    let lanes = V::LANES;
    // SAFETY: every column `col < width` (the tail loaded partially) and row `< rows`, inside
    // the buffers as the caller guarantees; stores cover whole registers of `delta`'s padded
    // rows and of `bias_grad`.
    unsafe {
        // Row by row, each row's values in order: a stream the prefetcher follows (column by
        // column, the 784-wide rows of a block came from L2 at every step).
        for row in 0..rows {
            for col in (0..width).step_by(lanes) {
                let count = lanes.min(width - col);
                let g = load_upto::<V>(grad.add(row * ldg + col), count);
                let v = load_upto::<V>(value.add(row * ldv + col), count);
                // Lanes past `width` hold `0 * op'(0)`: zero, as the padding must be.
                let d = chain_rule(op, g, v);
                d.store(delta.add(row * ldd + col));
                if !bias_grad.is_null() {
                    let at = bias_grad.add(col);
                    V::load(at).add(d).store(at);
                }
            }
        }
    }
}

/// Adds each column's sum over `rows` rows of `width` values (`ld` apart) to `sums` (whole
/// registers covering `width`).
///
/// # Safety
/// `values` is readable for `rows x width` values at its stride, `sums` readable and writable
/// for `padded(width, LANES)`; the CPU supports `V`'s ISA.
#[inline(always)]
pub(super) unsafe fn column_sums<V: SimdVec>(
    rows: usize,
    width: usize,
    values: *const V::Elem,
    ld: usize,
    sums: *mut V::Elem,
) {
    // SAFETY: as in `delta_rows`.
    unsafe {
        for row in 0..rows {
            for col in (0..width).step_by(V::LANES) {
                let value = load_upto::<V>(values.add(row * ld + col), V::LANES.min(width - col));
                let at = sums.add(col);
                V::load(at).add(value).store(at);
            }
        }
    }
}

/// `count` values at `ptr` (`1..=LANES`), zeros in the other lanes.
///
/// # Safety
/// `ptr` is valid for `count` reads; the CPU supports `V`'s ISA.
#[inline(always)]
pub(super) unsafe fn load_upto<V: SimdVec>(ptr: *const V::Elem, count: usize) -> V {
    // SAFETY: forwarded from the caller.
    unsafe {
        if count == V::LANES {
            V::load(ptr)
        } else {
            V::load_partial(ptr, count)
        }
    }
}
