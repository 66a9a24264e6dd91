//! Portable kernel: one element per "register". It runs everywhere (aarch64 included) and is the
//! oracle the SIMD kernels are tested against. Its multiply-add rounds twice (no FMA), so SIMD
//! results differ from it by float rounding only.

use super::{Element, SimdVec};

#[derive(Clone, Copy, Debug)]
struct Lane<T>(T);

impl<T: Element> SimdVec for Lane<T> {
    type Elem = T;
    const LANES: usize = 1;

    #[inline(always)]
    unsafe fn zero() -> Self {
        Lane(T::ZERO)
    }

    #[inline(always)]
    unsafe fn splat(ptr: *const T) -> Self {
        // SAFETY: the caller guarantees `ptr` is valid for one read.
        Lane(unsafe { *ptr })
    }

    #[inline(always)]
    unsafe fn load(ptr: *const T) -> Self {
        // SAFETY: the caller guarantees `ptr` is valid for one read.
        Lane(unsafe { *ptr })
    }

    #[inline(always)]
    unsafe fn store(self, ptr: *mut T) {
        // SAFETY: the caller guarantees `ptr` is valid for one write.
        unsafe { *ptr = self.0 }
    }

    #[inline(always)]
    unsafe fn mul_add(self, b: Self, acc: Self) -> Self {
        Lane(self.0 * b.0 + acc.0)
    }

    #[inline(always)]
    unsafe fn add(self, b: Self) -> Self {
        Lane(self.0 + b.0)
    }

    #[inline(always)]
    unsafe fn load_partial(_ptr: *const T, _count: usize) -> Self {
        // One lane: a partial load reads nothing.
        Lane(T::ZERO)
    }

    #[inline(always)]
    unsafe fn sum(self) -> T {
        self.0
    }

    #[inline(always)]
    unsafe fn prefetch(_ptr: *const T) {}

    #[inline(always)]
    unsafe fn prefetch_to_l2(_ptr: *const T) {}

    #[inline(always)]
    unsafe fn first(self) -> T {
        self.0
    }

    #[inline(always)]
    unsafe fn relu(self) -> Self {
        // `NaN < 0` is false, so NaN passes through as in torch.relu.
        if self.0 < T::ZERO {
            Lane(T::ZERO)
        } else {
            self
        }
    }

    #[inline(always)]
    unsafe fn sub(self, b: Self) -> Self {
        Lane(self.0 - b.0)
    }

    #[inline(always)]
    unsafe fn mul(self, b: Self) -> Self {
        Lane(self.0 * b.0)
    }

    #[inline(always)]
    unsafe fn fused_mul_add(self, b: Self, acc: Self) -> Self {
        Lane(self.0.fused_mul_add(b.0, acc.0))
    }

    #[inline(always)]
    unsafe fn div(self, b: Self) -> Self {
        Lane(self.0 / b.0)
    }

    #[inline(always)]
    unsafe fn min(self, b: Self) -> Self {
        if self.0 < b.0 {
            self
        } else {
            b
        }
    }

    #[inline(always)]
    unsafe fn max(self, b: Self) -> Self {
        if self.0 > b.0 {
            self
        } else {
            b
        }
    }

    #[inline(always)]
    unsafe fn abs(self) -> Self {
        Lane(self.0.abs())
    }

    #[inline(always)]
    unsafe fn neg(self) -> Self {
        Lane(-self.0)
    }

    #[inline(always)]
    unsafe fn copy_sign(self, sign: Self) -> Self {
        Lane(self.0.copy_sign(sign.0))
    }

    #[inline(always)]
    unsafe fn select_lt(self, b: Self, if_less: Self, otherwise: Self) -> Self {
        if self.0 < b.0 {
            if_less
        } else {
            otherwise
        }
    }

    #[inline(always)]
    unsafe fn round_even(self) -> Self {
        Lane(self.0.round_even())
    }

    #[inline(always)]
    unsafe fn scale_pow2(self, n: Self) -> Self {
        Lane(self.0.scale_pow2(n.0))
    }

    #[inline(always)]
    unsafe fn split_exponent(self) -> (Self, Self) {
        let (mantissa, exponent) = self.0.split_exponent();
        (Lane(mantissa), Lane(exponent))
    }
}

target_kernels!(
    mr = 4,
    nv_max = 4,
    kernel_f32: Lane<f32> => f32, f32;
    kernel_f64: Lane<f64> => f64, f64;
);
