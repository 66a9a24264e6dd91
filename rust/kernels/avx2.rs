//! AVX2+FMA kernel: 6 rows x up to 2 ymm registers of outputs (12 accumulators of 16 registers).

use std::arch::x86_64::*;

use super::SimdVec;

#[derive(Clone, Copy, Debug)]
struct F32x8(__m256);

#[derive(Clone, Copy, Debug)]
struct F64x4(__m256d);

impl SimdVec for F32x8 {
    type Elem = f32;
    const LANES: usize = 8;
    const FAST_TRANSPOSE: bool = true;

    #[inline(always)]
    unsafe fn zero() -> Self {
        // SAFETY: the caller guarantees AVX2 and FMA.
        F32x8(unsafe { _mm256_setzero_ps() })
    }

    #[inline(always)]
    unsafe fn splat(ptr: *const f32) -> Self {
        // SAFETY: the caller guarantees `ptr` is readable and AVX2 and FMA.
        F32x8(unsafe { _mm256_set1_ps(*ptr) })
    }

    #[inline(always)]
    unsafe fn load(ptr: *const f32) -> Self {
        // SAFETY: the caller guarantees 8 readable values and AVX2 and FMA.
        F32x8(unsafe { _mm256_loadu_ps(ptr) })
    }

    #[inline(always)]
    unsafe fn store(self, ptr: *mut f32) {
        // SAFETY: the caller guarantees 8 writable values and AVX2 and FMA.
        unsafe { _mm256_storeu_ps(ptr, self.0) }
    }

    #[inline(always)]
    unsafe fn mul_add(self, b: Self, acc: Self) -> Self {
        // SAFETY: the caller guarantees AVX2 and FMA.
        F32x8(unsafe { _mm256_fmadd_ps(self.0, b.0, acc.0) })
    }

    #[inline(always)]
    unsafe fn fused_mul_add(self, b: Self, acc: Self) -> Self {
        // SAFETY: the caller guarantees AVX2 and FMA.
        F32x8(unsafe { _mm256_fmadd_ps(self.0, b.0, acc.0) })
    }

    #[inline(always)]
    unsafe fn load_partial(ptr: *const f32, count: usize) -> Self {
        // SAFETY: the caller guarantees `count` readable values and AVX2 and FMA; masked-off lanes
        // are not read (no fault past the end).
        F32x8(unsafe {
            _mm256_maskload_ps(
                ptr,
                _mm256_cmpgt_epi32(
                    _mm256_set1_epi32(count as i32),
                    _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                ),
            )
        })
    }

    #[inline(always)]
    unsafe fn sum(self) -> f32 {
        // SAFETY: the caller guarantees AVX2 and FMA.
        unsafe {
            let half = _mm_add_ps(
                _mm256_castps256_ps128(self.0),
                _mm256_extractf128_ps::<1>(self.0),
            );
            let pairs = _mm_hadd_ps(half, half);
            _mm_cvtss_f32(_mm_hadd_ps(pairs, pairs))
        }
    }

    #[inline(always)]
    unsafe fn prefetch(ptr: *const f32) {
        // SAFETY: a prefetch is a hint that never faults; SSE is part of x86-64.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(ptr.cast()) }
    }

    #[inline(always)]
    unsafe fn prefetch_to_l2(ptr: *const f32) {
        // SAFETY: a prefetch is a hint that never faults; SSE is part of x86-64.
        unsafe { _mm_prefetch::<_MM_HINT_T1>(ptr.cast()) }
    }

    #[inline(always)]
    unsafe fn relu(self) -> Self {
        // MAXPS returns its second operand when either is NaN, so NaN survives as in torch.relu.
        // SAFETY: the caller guarantees AVX2 and FMA.
        F32x8(unsafe { _mm256_max_ps(_mm256_setzero_ps(), self.0) })
    }

    #[inline(always)]
    unsafe fn first(self) -> Self::Elem {
        // SAFETY: the caller guarantees the ISA.
        unsafe { _mm256_cvtss_f32(self.0) }
    }

    #[inline(always)]
    unsafe fn add(self, b: Self) -> Self {
        // SAFETY: the caller guarantees AVX2 and FMA.
        F32x8(unsafe { _mm256_add_ps(self.0, b.0) })
    }

    #[inline(always)]
    unsafe fn sub(self, b: Self) -> Self {
        // SAFETY: the caller guarantees AVX2 and FMA.
        F32x8(unsafe { _mm256_sub_ps(self.0, b.0) })
    }

    #[inline(always)]
    unsafe fn mul(self, b: Self) -> Self {
        // SAFETY: the caller guarantees AVX2 and FMA.
        F32x8(unsafe { _mm256_mul_ps(self.0, b.0) })
    }

    #[inline(always)]
    unsafe fn div(self, b: Self) -> Self {
        // SAFETY: the caller guarantees AVX2 and FMA.
        F32x8(unsafe { _mm256_div_ps(self.0, b.0) })
    }

    #[inline(always)]
    unsafe fn min(self, b: Self) -> Self {
        // SAFETY: the caller guarantees AVX2. MINPS returns its second operand when either is NaN, as the contract says.
        F32x8(unsafe { _mm256_min_ps(self.0, b.0) })
    }

    #[inline(always)]
    unsafe fn max(self, b: Self) -> Self {
        // SAFETY: the caller guarantees AVX2. MAXPS returns its second operand when either is NaN.
        F32x8(unsafe { _mm256_max_ps(self.0, b.0) })
    }

    #[inline(always)]
    unsafe fn abs(self) -> Self {
        // SAFETY: the caller guarantees AVX2 and FMA.
        F32x8(unsafe { _mm256_andnot_ps(_mm256_set1_ps(-0.0), self.0) })
    }

    #[inline(always)]
    unsafe fn neg(self) -> Self {
        // SAFETY: the caller guarantees AVX2 and FMA.
        F32x8(unsafe { _mm256_xor_ps(self.0, _mm256_set1_ps(-0.0)) })
    }

    #[inline(always)]
    unsafe fn copy_sign(self, sign: Self) -> Self {
        // SAFETY: the caller guarantees AVX2 and FMA.
        unsafe {
            let sign_bit = _mm256_set1_ps(-0.0);
            F32x8(_mm256_or_ps(
                _mm256_andnot_ps(sign_bit, self.0),
                _mm256_and_ps(sign_bit, sign.0),
            ))
        }
    }

    #[inline(always)]
    unsafe fn select_lt(self, b: Self, if_less: Self, otherwise: Self) -> Self {
        // SAFETY: the caller guarantees AVX2 and FMA.
        unsafe {
            let less = _mm256_cmp_ps::<_CMP_LT_OQ>(self.0, b.0);
            F32x8(_mm256_blendv_ps(otherwise.0, if_less.0, less))
        }
    }

    #[inline(always)]
    unsafe fn round_even(self) -> Self {
        // SAFETY: the caller guarantees AVX2 and FMA.
        F32x8(unsafe {
            _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(self.0)
        })
    }

    #[inline(always)]
    unsafe fn scale_pow2(self, n: Self) -> Self {
        // SAFETY: the caller guarantees AVX2 and FMA.
        unsafe {
            // 2^n built in the exponent field: exact for the normal range the contract allows.
            let biased = _mm256_add_epi32(_mm256_cvtps_epi32(n.0), _mm256_set1_epi32(127));
            let power = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(biased));
            F32x8(_mm256_mul_ps(self.0, power))
        }
    }

    #[inline(always)]
    unsafe fn split_exponent(self) -> (Self, Self) {
        // SAFETY: the caller guarantees AVX2 and FMA. Positive lanes have a clear sign bit, so the shift leaves the biased exponent alone.
        unsafe {
            let bits = _mm256_castps_si256(self.0);
            let biased = _mm256_srli_epi32::<23>(bits);
            let exponent = _mm256_sub_epi32(biased, _mm256_set1_epi32(127));
            let mantissa = _mm256_or_si256(
                _mm256_and_si256(bits, _mm256_set1_epi32(0x007f_ffff)),
                _mm256_set1_epi32(0x3f80_0000),
            );
            (
                F32x8(_mm256_castsi256_ps(mantissa)),
                F32x8(_mm256_cvtepi32_ps(exponent)),
            )
        }
    }

    #[inline(always)]
    unsafe fn transpose_square(src: *const f32, lds: usize, dst: *mut f32, ldd: usize) {
        // SAFETY: the caller guarantees 8 readable rows of 8 values at `src`, 8 writable rows
        // at `dst`, and AVX2.
        unsafe {
            let mut rows = [_mm256_setzero_ps(); 8];
            for (r, row) in rows.iter_mut().enumerate() {
                *row = _mm256_loadu_ps(src.add(r * lds));
            }
            // `quads[4h + c]` holds, in 128-bit half `l`, column `4l + c` of rows `4h..4h + 4`.
            let mut quads = [_mm256_setzero_ps(); 8];
            for h in 0..2 {
                let [a, b, c, d] = [
                    rows[4 * h],
                    rows[4 * h + 1],
                    rows[4 * h + 2],
                    rows[4 * h + 3],
                ];
                let (ab_lo, ab_hi) = (_mm256_unpacklo_ps(a, b), _mm256_unpackhi_ps(a, b));
                let (cd_lo, cd_hi) = (_mm256_unpacklo_ps(c, d), _mm256_unpackhi_ps(c, d));
                quads[4 * h] = _mm256_shuffle_ps::<0x44>(ab_lo, cd_lo);
                quads[4 * h + 1] = _mm256_shuffle_ps::<0xee>(ab_lo, cd_lo);
                quads[4 * h + 2] = _mm256_shuffle_ps::<0x44>(ab_hi, cd_hi);
                quads[4 * h + 3] = _mm256_shuffle_ps::<0xee>(ab_hi, cd_hi);
            }
            for c in 0..4 {
                let (low, high) = (quads[c], quads[4 + c]);
                let first = _mm256_permute2f128_ps::<0x20>(low, high);
                let second = _mm256_permute2f128_ps::<0x31>(low, high);
                _mm256_storeu_ps(dst.add(c * ldd), first);
                _mm256_storeu_ps(dst.add((c + 4) * ldd), second);
            }
        }
    }
}

impl SimdVec for F64x4 {
    type Elem = f64;
    const LANES: usize = 4;

    #[inline(always)]
    unsafe fn zero() -> Self {
        // SAFETY: the caller guarantees AVX2 and FMA.
        F64x4(unsafe { _mm256_setzero_pd() })
    }

    #[inline(always)]
    unsafe fn splat(ptr: *const f64) -> Self {
        // SAFETY: the caller guarantees `ptr` is readable and AVX2 and FMA.
        F64x4(unsafe { _mm256_set1_pd(*ptr) })
    }

    #[inline(always)]
    unsafe fn load(ptr: *const f64) -> Self {
        // SAFETY: the caller guarantees 4 readable values and AVX2 and FMA.
        F64x4(unsafe { _mm256_loadu_pd(ptr) })
    }

    #[inline(always)]
    unsafe fn store(self, ptr: *mut f64) {
        // SAFETY: the caller guarantees 4 writable values and AVX2 and FMA.
        unsafe { _mm256_storeu_pd(ptr, self.0) }
    }

    #[inline(always)]
    unsafe fn mul_add(self, b: Self, acc: Self) -> Self {
        // SAFETY: the caller guarantees AVX2 and FMA.
        F64x4(unsafe { _mm256_fmadd_pd(self.0, b.0, acc.0) })
    }

    #[inline(always)]
    unsafe fn fused_mul_add(self, b: Self, acc: Self) -> Self {
        // SAFETY: the caller guarantees AVX2 and FMA.
        F64x4(unsafe { _mm256_fmadd_pd(self.0, b.0, acc.0) })
    }

    #[inline(always)]
    unsafe fn load_partial(ptr: *const f64, count: usize) -> Self {
        // SAFETY: the caller guarantees `count` readable values and AVX2 and FMA; masked-off lanes
        // are not read (no fault past the end).
        F64x4(unsafe {
            _mm256_maskload_pd(
                ptr,
                _mm256_cmpgt_epi64(
                    _mm256_set1_epi64x(count as i64),
                    _mm256_setr_epi64x(0, 1, 2, 3),
                ),
            )
        })
    }

    #[inline(always)]
    unsafe fn sum(self) -> f64 {
        // SAFETY: the caller guarantees AVX2 and FMA.
        unsafe {
            let half = _mm_add_pd(
                _mm256_castpd256_pd128(self.0),
                _mm256_extractf128_pd::<1>(self.0),
            );
            _mm_cvtsd_f64(_mm_hadd_pd(half, half))
        }
    }

    #[inline(always)]
    unsafe fn prefetch(ptr: *const f64) {
        // SAFETY: a prefetch is a hint that never faults; SSE is part of x86-64.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(ptr.cast()) }
    }

    #[inline(always)]
    unsafe fn prefetch_to_l2(ptr: *const f64) {
        // SAFETY: a prefetch is a hint that never faults; SSE is part of x86-64.
        unsafe { _mm_prefetch::<_MM_HINT_T1>(ptr.cast()) }
    }

    #[inline(always)]
    unsafe fn relu(self) -> Self {
        // MAXPD returns its second operand when either is NaN, so NaN survives.
        // SAFETY: the caller guarantees AVX2 and FMA.
        F64x4(unsafe { _mm256_max_pd(_mm256_setzero_pd(), self.0) })
    }

    #[inline(always)]
    unsafe fn first(self) -> Self::Elem {
        // SAFETY: the caller guarantees the ISA.
        unsafe { _mm256_cvtsd_f64(self.0) }
    }

    #[inline(always)]
    unsafe fn add(self, b: Self) -> Self {
        // SAFETY: the caller guarantees AVX2 and FMA.
        F64x4(unsafe { _mm256_add_pd(self.0, b.0) })
    }

    #[inline(always)]
    unsafe fn sub(self, b: Self) -> Self {
        // SAFETY: the caller guarantees AVX2 and FMA.
        F64x4(unsafe { _mm256_sub_pd(self.0, b.0) })
    }

    #[inline(always)]
    unsafe fn mul(self, b: Self) -> Self {
        // SAFETY: the caller guarantees AVX2 and FMA.
        F64x4(unsafe { _mm256_mul_pd(self.0, b.0) })
    }

    #[inline(always)]
    unsafe fn div(self, b: Self) -> Self {
        // SAFETY: the caller guarantees AVX2 and FMA.
        F64x4(unsafe { _mm256_div_pd(self.0, b.0) })
    }

    #[inline(always)]
    unsafe fn min(self, b: Self) -> Self {
        // SAFETY: the caller guarantees AVX2. MINPD returns its second operand when either is NaN, as the contract says.
        F64x4(unsafe { _mm256_min_pd(self.0, b.0) })
    }

    #[inline(always)]
    unsafe fn max(self, b: Self) -> Self {
        // SAFETY: the caller guarantees AVX2. MAXPD returns its second operand when either is NaN.
        F64x4(unsafe { _mm256_max_pd(self.0, b.0) })
    }

    #[inline(always)]
    unsafe fn abs(self) -> Self {
        // SAFETY: the caller guarantees AVX2 and FMA.
        F64x4(unsafe { _mm256_andnot_pd(_mm256_set1_pd(-0.0), self.0) })
    }

    #[inline(always)]
    unsafe fn neg(self) -> Self {
        // SAFETY: the caller guarantees AVX2 and FMA.
        F64x4(unsafe { _mm256_xor_pd(self.0, _mm256_set1_pd(-0.0)) })
    }

    #[inline(always)]
    unsafe fn copy_sign(self, sign: Self) -> Self {
        // SAFETY: the caller guarantees AVX2 and FMA.
        unsafe {
            let sign_bit = _mm256_set1_pd(-0.0);
            F64x4(_mm256_or_pd(
                _mm256_andnot_pd(sign_bit, self.0),
                _mm256_and_pd(sign_bit, sign.0),
            ))
        }
    }

    #[inline(always)]
    unsafe fn select_lt(self, b: Self, if_less: Self, otherwise: Self) -> Self {
        // SAFETY: the caller guarantees AVX2 and FMA.
        unsafe {
            let less = _mm256_cmp_pd::<_CMP_LT_OQ>(self.0, b.0);
            F64x4(_mm256_blendv_pd(otherwise.0, if_less.0, less))
        }
    }

    #[inline(always)]
    unsafe fn round_even(self) -> Self {
        // SAFETY: the caller guarantees AVX2 and FMA.
        F64x4(unsafe {
            _mm256_round_pd::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(self.0)
        })
    }

    #[inline(always)]
    unsafe fn scale_pow2(self, n: Self) -> Self {
        // SAFETY: the caller guarantees AVX2 and FMA.
        unsafe {
            // AVX2 has no f64 -> i64 conversion: `n + 1023 + 2^52` holds `n + 1023` in its low
            // mantissa bits, which the shift moves into the exponent field (exact for the normal
            // range the contract allows).
            let shifted = _mm256_add_pd(n.0, _mm256_set1_pd(1023.0 + 4_503_599_627_370_496.0));
            let power = _mm256_castsi256_pd(_mm256_slli_epi64::<52>(_mm256_castpd_si256(shifted)));
            F64x4(_mm256_mul_pd(self.0, power))
        }
    }

    #[inline(always)]
    unsafe fn split_exponent(self) -> (Self, Self) {
        // SAFETY: the caller guarantees AVX2 and FMA. Positive lanes have a clear sign bit, so the shift leaves the biased exponent alone.
        unsafe {
            // The biased exponent, put in the low mantissa bits of 2^52 and subtracted back out
            // (AVX2 has no i64 -> f64 conversion).
            let bits = _mm256_castpd_si256(self.0);
            let biased = _mm256_srli_epi64::<52>(bits);
            let two_52 = _mm256_set1_epi64x(0x4330_0000_0000_0000);
            let exponent = _mm256_sub_pd(
                _mm256_castsi256_pd(_mm256_or_si256(biased, two_52)),
                _mm256_set1_pd(4_503_599_627_370_496.0 + 1023.0),
            );
            let mantissa = _mm256_or_si256(
                _mm256_and_si256(bits, _mm256_set1_epi64x(0x000f_ffff_ffff_ffff)),
                _mm256_set1_epi64x(0x3ff0_0000_0000_0000),
            );
            (F64x4(_mm256_castsi256_pd(mantissa)), F64x4(exponent))
        }
    }
}

target_kernels!(
    features = "avx2,fma",
    mr = 6,
    nv_max = 2,
    kernel_f32: F32x8 => f32, f32;
    kernel_f64: F64x4 => f64, f64;
);
