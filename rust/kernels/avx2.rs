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
}

target_kernels!(
    features = "avx2,fma",
    mr = 6,
    nv_max = 2,
    kernel_f32: F32x8 => f32, f32;
    kernel_f64: F64x4 => f64, f64;
);
