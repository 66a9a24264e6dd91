//! AVX-512F kernel: 8 rows x up to 3 zmm registers of outputs (24 accumulators of 32 registers).

use std::arch::x86_64::*;

use super::{Bf16, LoadFrom, PairDot, QuadDot, SimdVec};

#[derive(Clone, Copy, Debug)]
struct F32x16(__m512);

/// `value` unchanged, through an empty `asm!`, so the compiler can no longer see what made it.
/// A half-register multiply-add takes its broadcast input through it: seeing the low half of a
/// broadcast load, LLVM broadcast the value into a ymm from memory and then into the zmm from
/// that ymm, a shuffle per row and step of `k` on the FMA pipes, which cost as much as the half
/// register saved (784 -> 40 on Zen 4: 2.86 ms against 2.93 ms for 784 -> 48; through
/// `opaque`: 2.49 ms).
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn opaque(value: __m512) -> __m512 {
    // SAFETY: the caller guarantees AVX-512F; the casts reinterpret the bits.
    unsafe { _mm512_castsi512_ps(opaque_bits(_mm512_castps_si512(value))) }
}

/// [`opaque`] for integer registers.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn opaque_bits(value: __m512i) -> __m512i {
    let mut value = value;
    // SAFETY: an empty template: nothing runs, the register passes through.
    unsafe {
        std::arch::asm!(
            "/* {value} */",
            value = inout(zmm_reg) value,
            options(pure, nomem, nostack, preserves_flags),
        );
    }
    value
}

#[derive(Clone, Copy, Debug)]
struct F64x8(__m512d);

impl SimdVec for F32x16 {
    type Elem = f32;
    const LANES: usize = 16;
    const FAST_TRANSPOSE: bool = true;
    const HALF_LANES: usize = 8;

    #[inline(always)]
    unsafe fn mul_add_half(self, b: Self, acc: Self) -> Self {
        // SAFETY: the caller guarantees AVX-512F (which implies AVX2 and FMA).
        unsafe {
            let half = _mm256_fmadd_ps(
                _mm512_castps512_ps256(opaque(self.0)),
                _mm512_castps512_ps256(b.0),
                _mm512_castps512_ps256(acc.0),
            );
            F32x16(_mm512_castps256_ps512(half))
        }
    }

    #[inline(always)]
    unsafe fn store_half(self, ptr: *mut f32) {
        // SAFETY: the caller guarantees 8 writable values and AVX-512F.
        unsafe { _mm256_storeu_ps(ptr, _mm512_castps512_ps256(self.0)) }
    }

    #[inline(always)]
    unsafe fn zero() -> Self {
        // SAFETY: the caller guarantees AVX-512F.
        F32x16(unsafe { _mm512_setzero_ps() })
    }

    #[inline(always)]
    unsafe fn splat(ptr: *const f32) -> Self {
        // SAFETY: the caller guarantees `ptr` is readable and AVX-512F.
        F32x16(unsafe { _mm512_set1_ps(*ptr) })
    }

    #[inline(always)]
    unsafe fn load(ptr: *const f32) -> Self {
        // SAFETY: the caller guarantees 16 readable values and AVX-512F.
        F32x16(unsafe { _mm512_loadu_ps(ptr) })
    }

    #[inline(always)]
    unsafe fn store(self, ptr: *mut f32) {
        // SAFETY: the caller guarantees 16 writable values and AVX-512F.
        unsafe { _mm512_storeu_ps(ptr, self.0) }
    }

    #[inline(always)]
    unsafe fn store_stream(self, ptr: *mut f32) {
        // SAFETY: the caller guarantees 16 writable values aligned to 64 bytes and AVX-512F.
        unsafe { _mm512_stream_ps(ptr, self.0) }
    }

    #[inline(always)]
    unsafe fn fence_streams() {
        // SAFETY: SSE is part of x86-64.
        unsafe { _mm_sfence() }
    }

    #[inline(always)]
    unsafe fn mul_add(self, b: Self, acc: Self) -> Self {
        // SAFETY: the caller guarantees AVX-512F.
        F32x16(unsafe { _mm512_fmadd_ps(self.0, b.0, acc.0) })
    }

    #[inline(always)]
    unsafe fn fused_mul_add(self, b: Self, acc: Self) -> Self {
        // SAFETY: the caller guarantees AVX-512F.
        F32x16(unsafe { _mm512_fmadd_ps(self.0, b.0, acc.0) })
    }

    #[inline(always)]
    unsafe fn load_partial(ptr: *const f32, count: usize) -> Self {
        // SAFETY: the caller guarantees `count` readable values and AVX-512F; masked-off lanes
        // are not read (no fault past the end).
        F32x16(unsafe { _mm512_maskz_loadu_ps(((1u32 << count) - 1) as __mmask16, ptr) })
    }

    #[inline(always)]
    unsafe fn sum(self) -> f32 {
        // SAFETY: the caller guarantees AVX-512F.
        unsafe { _mm512_reduce_add_ps(self.0) }
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
        // SAFETY: the caller guarantees AVX-512F.
        F32x16(unsafe { _mm512_max_ps(_mm512_setzero_ps(), self.0) })
    }

    #[inline(always)]
    unsafe fn first(self) -> Self::Elem {
        // SAFETY: the caller guarantees the ISA.
        unsafe { _mm512_cvtss_f32(self.0) }
    }

    #[inline(always)]
    unsafe fn add(self, b: Self) -> Self {
        // SAFETY: the caller guarantees AVX-512F.
        F32x16(unsafe { _mm512_add_ps(self.0, b.0) })
    }

    #[inline(always)]
    unsafe fn sub(self, b: Self) -> Self {
        // SAFETY: the caller guarantees AVX-512F.
        F32x16(unsafe { _mm512_sub_ps(self.0, b.0) })
    }

    #[inline(always)]
    unsafe fn mul(self, b: Self) -> Self {
        // SAFETY: the caller guarantees AVX-512F.
        F32x16(unsafe { _mm512_mul_ps(self.0, b.0) })
    }

    #[inline(always)]
    unsafe fn div(self, b: Self) -> Self {
        // SAFETY: the caller guarantees AVX-512F.
        F32x16(unsafe { _mm512_div_ps(self.0, b.0) })
    }

    #[inline(always)]
    unsafe fn min(self, b: Self) -> Self {
        // SAFETY: the caller guarantees AVX-512F. VMINPS returns its second operand when either is NaN, as the contract says.
        F32x16(unsafe { _mm512_min_ps(self.0, b.0) })
    }

    #[inline(always)]
    unsafe fn max(self, b: Self) -> Self {
        // SAFETY: the caller guarantees AVX-512F. VMAXPS returns its second operand when either is NaN.
        F32x16(unsafe { _mm512_max_ps(self.0, b.0) })
    }

    #[inline(always)]
    unsafe fn abs(self) -> Self {
        // SAFETY: the caller guarantees AVX-512F.
        F32x16(unsafe { _mm512_abs_ps(self.0) })
    }

    #[inline(always)]
    unsafe fn neg(self) -> Self {
        // SAFETY: the caller guarantees AVX-512F. (Integer xor: the float one needs AVX-512DQ.)
        F32x16(unsafe {
            _mm512_castsi512_ps(_mm512_xor_si512(
                _mm512_castps_si512(self.0),
                _mm512_set1_epi32(i32::MIN),
            ))
        })
    }

    #[inline(always)]
    unsafe fn copy_sign(self, sign: Self) -> Self {
        // SAFETY: the caller guarantees AVX-512F.
        unsafe {
            // Bitwise select: the sign bit from `sign`, the rest from `self`.
            let sign_bit = _mm512_set1_epi32(i32::MIN);
            F32x16(_mm512_castsi512_ps(_mm512_or_si512(
                _mm512_andnot_si512(sign_bit, _mm512_castps_si512(self.0)),
                _mm512_and_si512(sign_bit, _mm512_castps_si512(sign.0)),
            )))
        }
    }

    #[inline(always)]
    unsafe fn select_lt(self, b: Self, if_less: Self, otherwise: Self) -> Self {
        // SAFETY: the caller guarantees AVX-512F.
        unsafe {
            let less = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(self.0, b.0);
            F32x16(_mm512_mask_blend_ps(less, otherwise.0, if_less.0))
        }
    }

    #[inline(always)]
    unsafe fn round_even(self) -> Self {
        // SAFETY: the caller guarantees AVX-512F.
        F32x16(unsafe {
            _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(self.0)
        })
    }

    #[inline(always)]
    unsafe fn scale_pow2(self, n: Self) -> Self {
        // SAFETY: the caller guarantees AVX-512F. VSCALEF rounds `self * 2^n` once, as a multiply by the exact power does.
        F32x16(unsafe { _mm512_scalef_ps(self.0, n.0) })
    }

    #[inline(always)]
    unsafe fn split_exponent(self) -> (Self, Self) {
        // SAFETY: the caller guarantees AVX-512F.
        unsafe {
            (
                F32x16(_mm512_getmant_ps::<_MM_MANT_NORM_1_2, _MM_MANT_SIGN_SRC>(
                    self.0,
                )),
                F32x16(_mm512_getexp_ps(self.0)),
            )
        }
    }

    #[inline(always)]
    unsafe fn transpose_square(src: *const f32, lds: usize, dst: *mut f32, ldd: usize) {
        // SAFETY: the caller guarantees 16 readable rows of 16 values at `src`, 16 writable
        // rows at `dst`, and AVX-512F.
        unsafe {
            let mut rows = [_mm512_setzero_ps(); 16];
            for (r, row) in rows.iter_mut().enumerate() {
                *row = _mm512_loadu_ps(src.add(r * lds));
            }
            // Pairs of rows interleaved, then pairs of pairs: `quads[4q + c]` holds, in 128-bit
            // lane `l`, column `4l + c` of rows `4q..4q + 4`.
            let mut quads = [_mm512_setzero_ps(); 16];
            for q in 0..4 {
                let [a, b, c, d] = [
                    rows[4 * q],
                    rows[4 * q + 1],
                    rows[4 * q + 2],
                    rows[4 * q + 3],
                ];
                let ab_lo = _mm512_castps_pd(_mm512_unpacklo_ps(a, b));
                let ab_hi = _mm512_castps_pd(_mm512_unpackhi_ps(a, b));
                let cd_lo = _mm512_castps_pd(_mm512_unpacklo_ps(c, d));
                let cd_hi = _mm512_castps_pd(_mm512_unpackhi_ps(c, d));
                quads[4 * q] = _mm512_castpd_ps(_mm512_unpacklo_pd(ab_lo, cd_lo));
                quads[4 * q + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(ab_lo, cd_lo));
                quads[4 * q + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(ab_hi, cd_hi));
                quads[4 * q + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(ab_hi, cd_hi));
            }
            // Gather the four 128-bit lanes holding each column: 0x88 takes lanes 0 and 2 of
            // each operand, 0xdd lanes 1 and 3.
            for c in 0..4 {
                let (q0, q1, q2, q3) = (quads[c], quads[4 + c], quads[8 + c], quads[12 + c]);
                let low_even = _mm512_shuffle_f32x4::<0x88>(q0, q1);
                let low_odd = _mm512_shuffle_f32x4::<0xdd>(q0, q1);
                let high_even = _mm512_shuffle_f32x4::<0x88>(q2, q3);
                let high_odd = _mm512_shuffle_f32x4::<0xdd>(q2, q3);
                let columns = [
                    (c, _mm512_shuffle_f32x4::<0x88>(low_even, high_even)),
                    (c + 8, _mm512_shuffle_f32x4::<0xdd>(low_even, high_even)),
                    (c + 4, _mm512_shuffle_f32x4::<0x88>(low_odd, high_odd)),
                    (c + 12, _mm512_shuffle_f32x4::<0xdd>(low_odd, high_odd)),
                ];
                for (column, value) in columns {
                    _mm512_storeu_ps(dst.add(column * ldd), value);
                }
            }
        }
    }
}

impl SimdVec for F64x8 {
    type Elem = f64;
    const LANES: usize = 8;
    const HALF_LANES: usize = 4;

    #[inline(always)]
    unsafe fn mul_add_half(self, b: Self, acc: Self) -> Self {
        // SAFETY: the caller guarantees AVX-512F (which implies AVX2 and FMA).
        unsafe {
            let half = _mm256_fmadd_pd(
                _mm512_castpd512_pd256(_mm512_castps_pd(opaque(_mm512_castpd_ps(self.0)))),
                _mm512_castpd512_pd256(b.0),
                _mm512_castpd512_pd256(acc.0),
            );
            F64x8(_mm512_castpd256_pd512(half))
        }
    }

    #[inline(always)]
    unsafe fn store_half(self, ptr: *mut f64) {
        // SAFETY: the caller guarantees 4 writable values and AVX-512F.
        unsafe { _mm256_storeu_pd(ptr, _mm512_castpd512_pd256(self.0)) }
    }

    #[inline(always)]
    unsafe fn zero() -> Self {
        // SAFETY: the caller guarantees AVX-512F.
        F64x8(unsafe { _mm512_setzero_pd() })
    }

    #[inline(always)]
    unsafe fn splat(ptr: *const f64) -> Self {
        // SAFETY: the caller guarantees `ptr` is readable and AVX-512F.
        F64x8(unsafe { _mm512_set1_pd(*ptr) })
    }

    #[inline(always)]
    unsafe fn load(ptr: *const f64) -> Self {
        // SAFETY: the caller guarantees 8 readable values and AVX-512F.
        F64x8(unsafe { _mm512_loadu_pd(ptr) })
    }

    #[inline(always)]
    unsafe fn store(self, ptr: *mut f64) {
        // SAFETY: the caller guarantees 8 writable values and AVX-512F.
        unsafe { _mm512_storeu_pd(ptr, self.0) }
    }

    #[inline(always)]
    unsafe fn mul_add(self, b: Self, acc: Self) -> Self {
        // SAFETY: the caller guarantees AVX-512F.
        F64x8(unsafe { _mm512_fmadd_pd(self.0, b.0, acc.0) })
    }

    #[inline(always)]
    unsafe fn fused_mul_add(self, b: Self, acc: Self) -> Self {
        // SAFETY: the caller guarantees AVX-512F.
        F64x8(unsafe { _mm512_fmadd_pd(self.0, b.0, acc.0) })
    }

    #[inline(always)]
    unsafe fn load_partial(ptr: *const f64, count: usize) -> Self {
        // SAFETY: the caller guarantees `count` readable values and AVX-512F; masked-off lanes
        // are not read (no fault past the end).
        F64x8(unsafe { _mm512_maskz_loadu_pd(((1u32 << count) - 1) as __mmask8, ptr) })
    }

    #[inline(always)]
    unsafe fn sum(self) -> f64 {
        // SAFETY: the caller guarantees AVX-512F.
        unsafe { _mm512_reduce_add_pd(self.0) }
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
        // SAFETY: the caller guarantees AVX-512F.
        F64x8(unsafe { _mm512_max_pd(_mm512_setzero_pd(), self.0) })
    }

    #[inline(always)]
    unsafe fn first(self) -> Self::Elem {
        // SAFETY: the caller guarantees the ISA.
        unsafe { _mm512_cvtsd_f64(self.0) }
    }

    #[inline(always)]
    unsafe fn add(self, b: Self) -> Self {
        // SAFETY: the caller guarantees AVX-512F.
        F64x8(unsafe { _mm512_add_pd(self.0, b.0) })
    }

    #[inline(always)]
    unsafe fn sub(self, b: Self) -> Self {
        // SAFETY: the caller guarantees AVX-512F.
        F64x8(unsafe { _mm512_sub_pd(self.0, b.0) })
    }

    #[inline(always)]
    unsafe fn mul(self, b: Self) -> Self {
        // SAFETY: the caller guarantees AVX-512F.
        F64x8(unsafe { _mm512_mul_pd(self.0, b.0) })
    }

    #[inline(always)]
    unsafe fn div(self, b: Self) -> Self {
        // SAFETY: the caller guarantees AVX-512F.
        F64x8(unsafe { _mm512_div_pd(self.0, b.0) })
    }

    #[inline(always)]
    unsafe fn min(self, b: Self) -> Self {
        // SAFETY: the caller guarantees AVX-512F. VMINPD returns its second operand when either is NaN, as the contract says.
        F64x8(unsafe { _mm512_min_pd(self.0, b.0) })
    }

    #[inline(always)]
    unsafe fn max(self, b: Self) -> Self {
        // SAFETY: the caller guarantees AVX-512F. VMAXPD returns its second operand when either is NaN.
        F64x8(unsafe { _mm512_max_pd(self.0, b.0) })
    }

    #[inline(always)]
    unsafe fn abs(self) -> Self {
        // SAFETY: the caller guarantees AVX-512F.
        F64x8(unsafe { _mm512_abs_pd(self.0) })
    }

    #[inline(always)]
    unsafe fn neg(self) -> Self {
        // SAFETY: the caller guarantees AVX-512F. (Integer xor: the float one needs AVX-512DQ.)
        F64x8(unsafe {
            _mm512_castsi512_pd(_mm512_xor_si512(
                _mm512_castpd_si512(self.0),
                _mm512_set1_epi64(i64::MIN),
            ))
        })
    }

    #[inline(always)]
    unsafe fn copy_sign(self, sign: Self) -> Self {
        // SAFETY: the caller guarantees AVX-512F.
        unsafe {
            // Bitwise select: the sign bit from `sign`, the rest from `self`.
            let sign_bit = _mm512_set1_epi64(i64::MIN);
            F64x8(_mm512_castsi512_pd(_mm512_or_si512(
                _mm512_andnot_si512(sign_bit, _mm512_castpd_si512(self.0)),
                _mm512_and_si512(sign_bit, _mm512_castpd_si512(sign.0)),
            )))
        }
    }

    #[inline(always)]
    unsafe fn select_lt(self, b: Self, if_less: Self, otherwise: Self) -> Self {
        // SAFETY: the caller guarantees AVX-512F.
        unsafe {
            let less = _mm512_cmp_pd_mask::<_CMP_LT_OQ>(self.0, b.0);
            F64x8(_mm512_mask_blend_pd(less, otherwise.0, if_less.0))
        }
    }

    #[inline(always)]
    unsafe fn round_even(self) -> Self {
        // SAFETY: the caller guarantees AVX-512F.
        F64x8(unsafe {
            _mm512_roundscale_pd::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(self.0)
        })
    }

    #[inline(always)]
    unsafe fn scale_pow2(self, n: Self) -> Self {
        // SAFETY: the caller guarantees AVX-512F. VSCALEF rounds `self * 2^n` once, as a multiply by the exact power does.
        F64x8(unsafe { _mm512_scalef_pd(self.0, n.0) })
    }

    #[inline(always)]
    unsafe fn split_exponent(self) -> (Self, Self) {
        // SAFETY: the caller guarantees AVX-512F.
        unsafe {
            (
                F64x8(_mm512_getmant_pd::<_MM_MANT_NORM_1_2, _MM_MANT_SIGN_SRC>(
                    self.0,
                )),
                F64x8(_mm512_getexp_pd(self.0)),
            )
        }
    }
}

/// bf16 weights widened to f32 in registers: 16 values (32 bytes) zero-extended to 32 bits each
/// and shifted into the top half, which is exactly the f32 of the same value.
impl LoadFrom<Bf16> for F32x16 {
    #[inline(always)]
    unsafe fn load_from(ptr: *const Bf16) -> Self {
        // SAFETY: the caller guarantees 16 readable values and AVX-512F.
        unsafe { widen(_mm256_loadu_si256(ptr.cast())) }
    }

    #[inline(always)]
    unsafe fn load_partial_from(ptr: *const Bf16, count: usize) -> Self {
        // SAFETY: the caller guarantees `count < 16` readable values and AVX-512BW and VL (the
        // bf16 kernels' features); masked-off values are not read.
        unsafe {
            widen(_mm256_maskz_loadu_epi16(
                ((1u32 << count) - 1) as __mmask16,
                ptr.cast(),
            ))
        }
    }

    #[inline(always)]
    unsafe fn splat_from(ptr: *const Bf16) -> Self {
        // SAFETY: the caller guarantees one readable value and AVX-512F.
        F32x16(unsafe { _mm512_set1_ps((*ptr).widen()) })
    }
}

/// 16 bf16 values as the f32s they are.
///
/// # Safety
/// The CPU supports AVX-512F.
#[inline(always)]
unsafe fn widen(values: __m256i) -> F32x16 {
    // SAFETY: the caller guarantees AVX-512F.
    F32x16(unsafe { _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(values))) })
}

// BW and VL, which `Isa::Avx512` requires: with VL the half registers' ymm multiply-adds reach
// all 32 registers, not only the 16 of AVX2's encoding.
target_kernels!(
    features = "avx512f,avx512bw,avx512vl",
    mr = 8,
    nv_max = 3,
    kernel_f32: F32x16 => f32, f32;
    kernel_f64: F64x8 => f64, f64;
);

// The partial loads of bf16 weights need AVX-512BW's 16-bit masks (and VL for 256 bits of them).
target_kernels!(
    features = "avx512f,avx512bw,avx512vl",
    mr = 8,
    nv_max = 3,
    kernel_bf16: F32x16 => Bf16, f32;
);

/// The mask of the first `count` of 16 lanes (all of them from 16 up).
#[inline(always)]
fn first_lanes(count: usize) -> u16 {
    if count >= 16 {
        u16::MAX
    } else {
        (1u16 << count) - 1
    }
}

/// AVX512_BF16: 16 f32 lanes, each adding the products of a pair of bf16 inputs and weights.
impl PairDot for F32x16 {
    type Pairs = __m512bh;

    #[inline(always)]
    unsafe fn splat_pair(ptr: *const Bf16) -> __m512bh {
        // SAFETY: the caller guarantees two readable values (one unaligned 32-bit read) and
        // AVX-512F; the bf16 vector is the same 512 bits.
        unsafe {
            let pair = _mm512_set1_epi32(ptr.cast::<i32>().read_unaligned());
            std::mem::transmute::<__m512i, __m512bh>(pair)
        }
    }

    #[inline(always)]
    unsafe fn load_pairs(ptr: *const Bf16) -> __m512bh {
        // SAFETY: the caller guarantees 32 readable values and AVX-512F.
        unsafe { std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(ptr.cast())) }
    }

    #[inline(always)]
    unsafe fn dot_pairs(self, a: __m512bh, b: __m512bh) -> Self {
        // SAFETY: the caller guarantees AVX512_BF16.
        F32x16(unsafe { _mm512_dpbf16_ps(self.0, a, b) })
    }

    #[inline(always)]
    unsafe fn dot_pairs_half(self, a: __m512bh, b: __m512bh) -> Self {
        // SAFETY: the caller guarantees AVX512_BF16 and VL. The broadcast goes through
        // `opaque_bits`, as `mul_add_half`'s does.
        unsafe {
            let a = std::mem::transmute::<__m512i, __m512bh>(opaque_bits(std::mem::transmute::<
                __m512bh,
                __m512i,
            >(a)));
            let half = _mm256_dpbf16_ps(
                _mm512_castps512_ps256(self.0),
                std::mem::transmute::<__m256i, __m256bh>(_mm512_castsi512_si256(
                    std::mem::transmute::<__m512bh, __m512i>(a),
                )),
                std::mem::transmute::<__m256i, __m256bh>(_mm512_castsi512_si256(
                    std::mem::transmute::<__m512bh, __m512i>(b),
                )),
            );
            F32x16(_mm512_castps256_ps512(half))
        }
    }

    #[inline(always)]
    unsafe fn load_pairs_half(ptr: *const Bf16) -> __m512bh {
        // SAFETY: the caller guarantees 16 readable values and AVX-512F.
        unsafe {
            std::mem::transmute::<__m512i, __m512bh>(_mm512_castsi256_si512(_mm256_loadu_si256(
                ptr.cast(),
            )))
        }
    }

    #[inline(always)]
    unsafe fn load_pairs_partial(ptr: *const Bf16, count: usize) -> __m512bh {
        // SAFETY: the caller guarantees `count <= 32` readable values and AVX-512BW; masked-off
        // values are not read.
        unsafe {
            let mask = if count >= 32 {
                u32::MAX
            } else {
                (1u32 << count) - 1
            };
            std::mem::transmute::<__m512i, __m512bh>(_mm512_maskz_loadu_epi16(mask, ptr.cast()))
        }
    }

    #[inline(always)]
    unsafe fn store_rounded(self, ptr: *mut Bf16, count: usize) {
        // SAFETY: the caller guarantees `count <= 16` writable values, AVX512_BF16, BW and VL;
        // masked-off values are not written.
        unsafe {
            let rounded = std::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(self.0));
            let mask = first_lanes(count);
            _mm256_mask_storeu_epi16(ptr.cast(), mask, rounded);
        }
    }
    #[inline(always)]
    unsafe fn store_rounded_two(self, next: Self, ptr: *mut Bf16) {
        // SAFETY: the caller guarantees 32 writable values and AVX512_BF16; `vcvtne2ps2bf16`
        // puts its second operand's values first.
        unsafe {
            let rounded =
                std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(next.0, self.0));
            _mm512_storeu_si512(ptr.cast(), rounded);
        }
    }
}

grouped_kernel!(
    features = "avx512f,avx512bw,avx512vl,avx512bf16",
    mr = 8,
    nv_max = 3,
    k_group = 2,
    kernel_bf16_pairs: F32x16 => Bf16, forward_pairs, dot_pairs_loop;
);

/// AVX512_VNNI: 16 i32 lanes, each adding the products of four u8 inputs and four s8 weights.
impl QuadDot for F32x16 {
    type Sums = __m512i;
    type Quads = __m512i;

    #[inline(always)]
    unsafe fn zero_sums() -> __m512i {
        // SAFETY: the caller guarantees AVX-512F.
        unsafe { _mm512_setzero_si512() }
    }

    #[inline(always)]
    unsafe fn splat_quad(ptr: *const u8) -> __m512i {
        // SAFETY: the caller guarantees four readable values (one unaligned 32-bit read) and
        // AVX-512F.
        unsafe { _mm512_set1_epi32(ptr.cast::<i32>().read_unaligned()) }
    }

    #[inline(always)]
    unsafe fn load_quads(ptr: *const i8) -> __m512i {
        // SAFETY: the caller guarantees 64 readable values and AVX-512F.
        unsafe { _mm512_loadu_si512(ptr.cast()) }
    }

    #[inline(always)]
    unsafe fn dot_quads(sums: __m512i, a: __m512i, b: __m512i) -> __m512i {
        // SAFETY: the caller guarantees AVX512_VNNI. `vpdpbusd` takes its first source as u8,
        // its second as s8, and does not saturate (four products of at most 255 * 128 fit).
        unsafe { _mm512_dpbusd_epi32(sums, a, b) }
    }

    #[inline(always)]
    unsafe fn dot_quads_half(sums: __m512i, a: __m512i, b: __m512i) -> __m512i {
        // SAFETY: the caller guarantees AVX512_VNNI and VL. The broadcast goes through
        // `opaque_bits`, as `mul_add_half`'s does.
        unsafe {
            let half = _mm256_dpbusd_epi32(
                _mm512_castsi512_si256(sums),
                _mm512_castsi512_si256(opaque_bits(a)),
                _mm512_castsi512_si256(b),
            );
            _mm512_castsi256_si512(half)
        }
    }

    #[inline(always)]
    unsafe fn load_quads_half(ptr: *const i8) -> __m512i {
        // SAFETY: the caller guarantees 32 readable values and AVX-512F.
        unsafe { _mm512_castsi256_si512(_mm256_loadu_si256(ptr.cast())) }
    }

    #[inline(always)]
    unsafe fn load_quads_partial(ptr: *const i8, count: usize) -> __m512i {
        // SAFETY: the caller guarantees `count <= 64` readable values and AVX-512BW; masked-off
        // bytes are not read.
        unsafe {
            let mask = if count >= 64 {
                u64::MAX
            } else {
                (1u64 << count) - 1
            };
            _mm512_maskz_loadu_epi8(mask, ptr)
        }
    }

    #[inline(always)]
    unsafe fn total(sums: __m512i) -> i32 {
        // SAFETY: the caller guarantees AVX-512F.
        unsafe { _mm512_reduce_add_epi32(sums) }
    }

    #[inline(always)]
    unsafe fn add_sums(a: __m512i, b: __m512i) -> __m512i {
        // SAFETY: the caller guarantees AVX-512F.
        unsafe { _mm512_add_epi32(a, b) }
    }

    #[inline(always)]
    unsafe fn to_floats(sums: __m512i) -> Self {
        // SAFETY: the caller guarantees AVX-512F.
        F32x16(unsafe { _mm512_cvtepi32_ps(sums) })
    }

    #[inline(always)]
    unsafe fn lowest_lane(self) -> f32 {
        // SAFETY: the caller guarantees AVX-512F.
        unsafe { _mm512_reduce_min_ps(self.0) }
    }

    #[inline(always)]
    unsafe fn highest_lane(self) -> f32 {
        // SAFETY: the caller guarantees AVX-512F.
        unsafe { _mm512_reduce_max_ps(self.0) }
    }

    #[inline(always)]
    unsafe fn store_quantized(self, inverse: Self, zero: f32, ptr: *mut u8, count: usize) -> u64 {
        // SAFETY: the caller guarantees `count <= 16` writable values and AVX-512F; masked-off
        // values are not written.
        unsafe {
            // `vcvtps2dq` rounds to nearest even (the default rounding mode; a NaN, or a value
            // out of i32's range, becomes i32::MIN), negative values are clamped to 0 and
            // `vpmovusdb` clamps to 255 as it narrows.
            let shifted = _mm512_fmadd_ps(self.0, inverse.0, _mm512_set1_ps(zero));
            let rounded = _mm512_cvtps_epi32(shifted);
            let mask = first_lanes(count);
            _mm512_mask_cvtusepi32_storeu_epi8(
                ptr.cast(),
                mask,
                _mm512_max_epi32(rounded, _mm512_setzero_si512()),
            );
            let floor = _mm512_set1_epi32(-32768);
            u64::from(_mm512_mask_cmple_epi32_mask(mask, rounded, floor))
        }
    }

    #[inline(always)]
    unsafe fn store_quantized_four(
        values: [Self; 4],
        inverse: Self,
        zero: f32,
        ptr: *mut u8,
    ) -> u64 {
        // SAFETY: the caller guarantees 64 writable values and AVX-512BW.
        unsafe {
            // The same bytes as `store_quantized`'s in fewer instructions (`vpmovusdb` is
            // several): `vpackssdw` to i16, `vpackuswb` to u8 (clamping to 0..=255), then the
            // 32-bit groups, which the packs interleave by 128-bit lane, put back in order.
            let [a, b, c, d] = values.map(|x| x.0);
            let (inverse, zero) = (inverse.0, _mm512_set1_ps(zero));
            let (a, b) = (
                _mm512_fmadd_ps(a, inverse, zero),
                _mm512_fmadd_ps(b, inverse, zero),
            );
            let (c, d) = (
                _mm512_fmadd_ps(c, inverse, zero),
                _mm512_fmadd_ps(d, inverse, zero),
            );
            let (a, b) = (_mm512_cvtps_epi32(a), _mm512_cvtps_epi32(b));
            let (c, d) = (_mm512_cvtps_epi32(c), _mm512_cvtps_epi32(d));
            let (low, high) = (_mm512_packs_epi32(a, b), _mm512_packs_epi32(c, d));
            // i32::MIN (a NaN's conversion) and anything at or below -32768 pack to -32768.
            let floor = _mm512_set1_epi16(-32768);
            let not_a_number = _mm512_cmpeq_epi16_mask(_mm512_min_epi16(low, high), floor);
            let order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
            let bytes = _mm512_permutexvar_epi32(order, _mm512_packus_epi16(low, high));
            _mm512_storeu_si512(ptr.cast(), bytes);
            u64::from(not_a_number)
        }
    }
}

grouped_kernel!(
    features = "avx512f,avx512bw,avx512vl,avx512vnni",
    mr = 8,
    nv_max = 3,
    k_group = 4,
    kernel_int8_quads: F32x16 => i8, forward_quads, dot_quads_loop;
);
