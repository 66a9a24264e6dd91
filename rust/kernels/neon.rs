//! NEON (AArch64 Advanced SIMD) kernel: 6 rows x up to 4 q registers of outputs (24 accumulators
//! of 32 registers, 4 more for a panel row and 1 for the broadcast input: 29); why this shape is in
//! `docs/kernels.md`.

use std::arch::aarch64::*;
use std::arch::asm;

use super::SimdVec;

#[derive(Clone, Copy, Debug)]
struct F32x4(float32x4_t);

#[derive(Clone, Copy, Debug)]
struct F64x2(float64x2_t);

/// `PRFM PLDL1KEEP`: a hint that never faults (the `core::arch` prefetch is unstable).
///
#[inline(always)]
fn prefetch_l1<T>(ptr: *const T) {
    // SAFETY: PRFM is a hint: it neither faults nor changes memory or flags, whatever the address.
    unsafe {
        asm!("prfm pldl1keep, [{0}]", in(reg) ptr, options(nostack, readonly, preserves_flags))
    }
}

/// `PRFM PLDL2KEEP`: into L2 only, so what L1 holds now stays.
///
#[inline(always)]
fn prefetch_l2<T>(ptr: *const T) {
    // SAFETY: PRFM is a hint: it neither faults nor changes memory or flags, whatever the address.
    unsafe {
        asm!("prfm pldl2keep, [{0}]", in(reg) ptr, options(nostack, readonly, preserves_flags))
    }
}

impl SimdVec for F32x4 {
    type Elem = f32;
    const LANES: usize = 4;
    // Four TRN pairs: the 4 x 4 transpose costs 8 permutes for 16 values.
    const FAST_TRANSPOSE: bool = true;
    // No half register: a 64-bit FMLA takes the same issue slot as a 128-bit one on the Arm
    // cores we know (Neoverse N1/V1/V2, Cortex-A7x, Apple M), so a half would save nothing.

    #[inline(always)]
    unsafe fn zero() -> Self {
        // SAFETY: the caller guarantees NEON.
        unsafe { F32x4(vdupq_n_f32(0.0)) }
    }

    #[inline(always)]
    unsafe fn splat(ptr: *const f32) -> Self {
        // SAFETY: the caller guarantees NEON and `ptr` readable (LD1R reads one value).
        F32x4(unsafe { vld1q_dup_f32(ptr) })
    }

    #[inline(always)]
    unsafe fn load(ptr: *const f32) -> Self {
        // SAFETY: the caller guarantees NEON and 4 readable values.
        F32x4(unsafe { vld1q_f32(ptr) })
    }

    #[inline(always)]
    unsafe fn store(self, ptr: *mut f32) {
        // SAFETY: the caller guarantees NEON and 4 writable values.
        unsafe { vst1q_f32(ptr, self.0) }
    }

    #[inline(always)]
    unsafe fn mul_add(self, b: Self, acc: Self) -> Self {
        // SAFETY: the caller guarantees NEON.
        unsafe { F32x4(vfmaq_f32(acc.0, self.0, b.0)) }
    }

    #[inline(always)]
    unsafe fn fused_mul_add(self, b: Self, acc: Self) -> Self {
        // SAFETY: the caller guarantees NEON.
        unsafe { F32x4(vfmaq_f32(acc.0, self.0, b.0)) }
    }

    #[inline(always)]
    unsafe fn load_partial(ptr: *const f32, count: usize) -> Self {
        // NEON has no masked load: the first `count` values lane by lane (or as a pair).
        // SAFETY: the caller guarantees NEON and `count` readable values; each arm reads only those.
        F32x4(unsafe {
            let zero = vdupq_n_f32(0.0);
            match count {
                0 => zero,
                1 => vld1q_lane_f32::<0>(ptr, zero),
                2 => vcombine_f32(vld1_f32(ptr), vdup_n_f32(0.0)),
                _ => vld1q_lane_f32::<2>(ptr.add(2), vcombine_f32(vld1_f32(ptr), vdup_n_f32(0.0))),
            }
        })
    }

    #[inline(always)]
    unsafe fn sum(self) -> f32 {
        // SAFETY: the caller guarantees NEON.
        unsafe { vaddvq_f32(self.0) }
    }

    #[inline(always)]
    unsafe fn prefetch(ptr: *const f32) {
        prefetch_l1(ptr)
    }

    #[inline(always)]
    unsafe fn prefetch_to_l2(ptr: *const f32) {
        prefetch_l2(ptr)
    }

    #[inline(always)]
    unsafe fn relu(self) -> Self {
        // Cleared where `x < 0` only: NaN compares false and survives, as in torch.relu, and -0
        // stays -0 as in the other kernels (FMAX against 0 would turn it into +0).
        // SAFETY: the caller guarantees NEON.
        unsafe {
            let negative = vcltzq_f32(self.0);
            F32x4(vreinterpretq_f32_u32(vbicq_u32(
                vreinterpretq_u32_f32(self.0),
                negative,
            )))
        }
    }

    #[inline(always)]
    unsafe fn first(self) -> f32 {
        // SAFETY: the caller guarantees NEON.
        unsafe { vgetq_lane_f32::<0>(self.0) }
    }

    #[inline(always)]
    unsafe fn add(self, b: Self) -> Self {
        // SAFETY: the caller guarantees NEON.
        unsafe { F32x4(vaddq_f32(self.0, b.0)) }
    }

    #[inline(always)]
    unsafe fn sub(self, b: Self) -> Self {
        // SAFETY: the caller guarantees NEON.
        unsafe { F32x4(vsubq_f32(self.0, b.0)) }
    }

    #[inline(always)]
    unsafe fn mul(self, b: Self) -> Self {
        // SAFETY: the caller guarantees NEON.
        unsafe { F32x4(vmulq_f32(self.0, b.0)) }
    }

    #[inline(always)]
    unsafe fn div(self, b: Self) -> Self {
        // SAFETY: the caller guarantees NEON.
        unsafe { F32x4(vdivq_f32(self.0, b.0)) }
    }

    #[inline(always)]
    unsafe fn min(self, b: Self) -> Self {
        // FMIN returns NaN for a NaN operand: compare and select gives x86's `b` instead.
        // SAFETY: the caller guarantees NEON.
        unsafe { F32x4(vbslq_f32(vcltq_f32(self.0, b.0), self.0, b.0)) }
    }

    #[inline(always)]
    unsafe fn max(self, b: Self) -> Self {
        // As `min`: `self` only where it is larger, else `b` (NaN included).
        // SAFETY: the caller guarantees NEON.
        unsafe { F32x4(vbslq_f32(vcgtq_f32(self.0, b.0), self.0, b.0)) }
    }

    #[inline(always)]
    unsafe fn abs(self) -> Self {
        // SAFETY: the caller guarantees NEON.
        unsafe { F32x4(vabsq_f32(self.0)) }
    }

    #[inline(always)]
    unsafe fn neg(self) -> Self {
        // SAFETY: the caller guarantees NEON.
        unsafe { F32x4(vnegq_f32(self.0)) }
    }

    #[inline(always)]
    unsafe fn copy_sign(self, sign: Self) -> Self {
        // SAFETY: the caller guarantees NEON.
        unsafe {
            let sign_bit = vdupq_n_u32(0x8000_0000);
            F32x4(vbslq_f32(sign_bit, sign.0, self.0))
        }
    }

    #[inline(always)]
    unsafe fn select_lt(self, b: Self, if_less: Self, otherwise: Self) -> Self {
        // SAFETY: the caller guarantees NEON.
        unsafe { F32x4(vbslq_f32(vcltq_f32(self.0, b.0), if_less.0, otherwise.0)) }
    }

    #[inline(always)]
    unsafe fn round_even(self) -> Self {
        // SAFETY: the caller guarantees NEON.
        unsafe { F32x4(vrndnq_f32(self.0)) }
    }

    #[inline(always)]
    unsafe fn scale_pow2(self, n: Self) -> Self {
        // 2^n built in the exponent field: exact for the normal range the contract allows.
        // SAFETY: the caller guarantees NEON.
        unsafe {
            let biased = vaddq_s32(vcvtnq_s32_f32(n.0), vdupq_n_s32(127));
            let power = vreinterpretq_f32_s32(vshlq_n_s32::<23>(biased));
            F32x4(vmulq_f32(self.0, power))
        }
    }

    #[inline(always)]
    unsafe fn split_exponent(self) -> (Self, Self) {
        // Positive lanes have a clear sign bit, so the shift leaves the biased exponent alone.
        // SAFETY: the caller guarantees NEON.
        unsafe {
            let bits = vreinterpretq_u32_f32(self.0);
            let biased = vreinterpretq_s32_u32(vshrq_n_u32::<23>(bits));
            let exponent = vsubq_s32(biased, vdupq_n_s32(127));
            let mantissa = vorrq_u32(
                vandq_u32(bits, vdupq_n_u32(0x007f_ffff)),
                vdupq_n_u32(0x3f80_0000),
            );
            (
                F32x4(vreinterpretq_f32_u32(mantissa)),
                F32x4(vcvtq_f32_s32(exponent)),
            )
        }
    }

    #[inline(always)]
    unsafe fn transpose_square(src: *const f32, lds: usize, dst: *mut f32, ldd: usize) {
        // SAFETY: the caller guarantees NEON, 4 readable rows of 4 values at `src` and 4 writable
        // rows at `dst`.
        unsafe {
            let [r0, r1, r2, r3] = [0, 1, 2, 3].map(|r| vld1q_f32(src.add(r * lds)));
            // Pairs of lanes first (`even01 = [r0[0], r1[0], r0[2], r1[2]]`), then pairs of pairs
            // as 64-bit lanes.
            let (even01, odd01) = (vtrn1q_f32(r0, r1), vtrn2q_f32(r0, r1));
            let (even23, odd23) = (vtrn1q_f32(r2, r3), vtrn2q_f32(r2, r3));
            let wide = vreinterpretq_f64_f32;
            let columns = [
                vtrn1q_f64(wide(even01), wide(even23)),
                vtrn1q_f64(wide(odd01), wide(odd23)),
                vtrn2q_f64(wide(even01), wide(even23)),
                vtrn2q_f64(wide(odd01), wide(odd23)),
            ];
            for (c, column) in columns.into_iter().enumerate() {
                vst1q_f32(dst.add(c * ldd), vreinterpretq_f32_f64(column));
            }
        }
    }
}

impl SimdVec for F64x2 {
    type Elem = f64;
    const LANES: usize = 2;

    #[inline(always)]
    unsafe fn zero() -> Self {
        // SAFETY: the caller guarantees NEON.
        unsafe { F64x2(vdupq_n_f64(0.0)) }
    }

    #[inline(always)]
    unsafe fn splat(ptr: *const f64) -> Self {
        // SAFETY: the caller guarantees NEON and `ptr` readable (LD1R reads one value).
        F64x2(unsafe { vld1q_dup_f64(ptr) })
    }

    #[inline(always)]
    unsafe fn load(ptr: *const f64) -> Self {
        // SAFETY: the caller guarantees NEON and 2 readable values.
        F64x2(unsafe { vld1q_f64(ptr) })
    }

    #[inline(always)]
    unsafe fn store(self, ptr: *mut f64) {
        // SAFETY: the caller guarantees NEON and 2 writable values.
        unsafe { vst1q_f64(ptr, self.0) }
    }

    #[inline(always)]
    unsafe fn mul_add(self, b: Self, acc: Self) -> Self {
        // SAFETY: the caller guarantees NEON.
        unsafe { F64x2(vfmaq_f64(acc.0, self.0, b.0)) }
    }

    #[inline(always)]
    unsafe fn fused_mul_add(self, b: Self, acc: Self) -> Self {
        // SAFETY: the caller guarantees NEON.
        unsafe { F64x2(vfmaq_f64(acc.0, self.0, b.0)) }
    }

    #[inline(always)]
    unsafe fn load_partial(ptr: *const f64, count: usize) -> Self {
        // SAFETY: the caller guarantees NEON and `count` (0 or 1: `< LANES`) readable values;
        // only a `count` of 1 reads one.
        F64x2(unsafe {
            let zero = vdupq_n_f64(0.0);
            if count == 0 {
                zero
            } else {
                vld1q_lane_f64::<0>(ptr, zero)
            }
        })
    }

    #[inline(always)]
    unsafe fn sum(self) -> f64 {
        // SAFETY: the caller guarantees NEON.
        unsafe { vaddvq_f64(self.0) }
    }

    #[inline(always)]
    unsafe fn prefetch(ptr: *const f64) {
        prefetch_l1(ptr)
    }

    #[inline(always)]
    unsafe fn prefetch_to_l2(ptr: *const f64) {
        prefetch_l2(ptr)
    }

    #[inline(always)]
    unsafe fn relu(self) -> Self {
        // As for f32: cleared where `x < 0` only, so NaN and -0 stay.
        // SAFETY: the caller guarantees NEON.
        unsafe {
            let negative = vcltzq_f64(self.0);
            F64x2(vreinterpretq_f64_u64(vbicq_u64(
                vreinterpretq_u64_f64(self.0),
                negative,
            )))
        }
    }

    #[inline(always)]
    unsafe fn first(self) -> f64 {
        // SAFETY: the caller guarantees NEON.
        unsafe { vgetq_lane_f64::<0>(self.0) }
    }

    #[inline(always)]
    unsafe fn add(self, b: Self) -> Self {
        // SAFETY: the caller guarantees NEON.
        unsafe { F64x2(vaddq_f64(self.0, b.0)) }
    }

    #[inline(always)]
    unsafe fn sub(self, b: Self) -> Self {
        // SAFETY: the caller guarantees NEON.
        unsafe { F64x2(vsubq_f64(self.0, b.0)) }
    }

    #[inline(always)]
    unsafe fn mul(self, b: Self) -> Self {
        // SAFETY: the caller guarantees NEON.
        unsafe { F64x2(vmulq_f64(self.0, b.0)) }
    }

    #[inline(always)]
    unsafe fn div(self, b: Self) -> Self {
        // SAFETY: the caller guarantees NEON.
        unsafe { F64x2(vdivq_f64(self.0, b.0)) }
    }

    #[inline(always)]
    unsafe fn min(self, b: Self) -> Self {
        // FMIN returns NaN for a NaN operand: compare and select gives x86's `b` instead.
        // SAFETY: the caller guarantees NEON.
        unsafe { F64x2(vbslq_f64(vcltq_f64(self.0, b.0), self.0, b.0)) }
    }

    #[inline(always)]
    unsafe fn max(self, b: Self) -> Self {
        // As `min`: `self` only where it is larger, else `b` (NaN included).
        // SAFETY: the caller guarantees NEON.
        unsafe { F64x2(vbslq_f64(vcgtq_f64(self.0, b.0), self.0, b.0)) }
    }

    #[inline(always)]
    unsafe fn abs(self) -> Self {
        // SAFETY: the caller guarantees NEON.
        unsafe { F64x2(vabsq_f64(self.0)) }
    }

    #[inline(always)]
    unsafe fn neg(self) -> Self {
        // SAFETY: the caller guarantees NEON.
        unsafe { F64x2(vnegq_f64(self.0)) }
    }

    #[inline(always)]
    unsafe fn copy_sign(self, sign: Self) -> Self {
        // SAFETY: the caller guarantees NEON.
        unsafe {
            let sign_bit = vdupq_n_u64(0x8000_0000_0000_0000);
            F64x2(vbslq_f64(sign_bit, sign.0, self.0))
        }
    }

    #[inline(always)]
    unsafe fn select_lt(self, b: Self, if_less: Self, otherwise: Self) -> Self {
        // SAFETY: the caller guarantees NEON.
        unsafe { F64x2(vbslq_f64(vcltq_f64(self.0, b.0), if_less.0, otherwise.0)) }
    }

    #[inline(always)]
    unsafe fn round_even(self) -> Self {
        // SAFETY: the caller guarantees NEON.
        unsafe { F64x2(vrndnq_f64(self.0)) }
    }

    #[inline(always)]
    unsafe fn scale_pow2(self, n: Self) -> Self {
        // 2^n built in the exponent field (AArch64 converts f64 <-> i64 directly).
        // SAFETY: the caller guarantees NEON.
        unsafe {
            let biased = vaddq_s64(vcvtnq_s64_f64(n.0), vdupq_n_s64(1023));
            let power = vreinterpretq_f64_s64(vshlq_n_s64::<52>(biased));
            F64x2(vmulq_f64(self.0, power))
        }
    }

    #[inline(always)]
    unsafe fn split_exponent(self) -> (Self, Self) {
        // Positive lanes have a clear sign bit, so the shift leaves the biased exponent alone.
        // SAFETY: the caller guarantees NEON.
        unsafe {
            let bits = vreinterpretq_u64_f64(self.0);
            let biased = vreinterpretq_s64_u64(vshrq_n_u64::<52>(bits));
            let exponent = vsubq_s64(biased, vdupq_n_s64(1023));
            let mantissa = vorrq_u64(
                vandq_u64(bits, vdupq_n_u64(0x000f_ffff_ffff_ffff)),
                vdupq_n_u64(0x3ff0_0000_0000_0000),
            );
            (
                F64x2(vreinterpretq_f64_u64(mantissa)),
                F64x2(vcvtq_f64_s64(exponent)),
            )
        }
    }
}

target_kernels!(
    features = "neon",
    mr = 6,
    nv_max = 4,
    kernel_f32: F32x4 => f32, f32;
    kernel_f64: F64x2 => f64, f64;
);
