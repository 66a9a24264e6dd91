//! Microkernels for a fused chain of Linear layers: the only place with `unsafe` SIMD.
//!
//! # Contract
//!
//! Each ISA file (`scalar.rs`, `avx2.rs`, `avx512.rs`, `neon.rs`) exports `kernel_f32()` and
//! `kernel_f64()`, returning a [`Kernel`]: a [`TileShape`] that says how weights must be packed for
//! it, and a [`ChainKernel`] function that runs the whole chain for a contiguous run of rows.
//!
//! All layers' weights live in one packed buffer, stored as the kernel's weight type (read
//! through [`LoadFrom`]), and their biases in another, in the compute type; a [`LayerDesc`]
//! says where each layer sits in both.
//!
//! Weights of a layer `[out, in]` are packed into column panels of at most `nv_max * lanes`
//! outputs (the last panel may be narrower, and need not be a multiple of `lanes`; one of a
//! register or less shares the registers of the panel before it, see [`Panels`]): a panel
//! starting at output column `c0` sits at `weights_at + c0 * in` and stores its
//! `width` columns k-major (`in` rows of `width` values; the last panel's rows padded with zeros
//! to [`LayerDesc::panel_columns`], so each row starts where a register load stays within a
//! cache line). A panel's last register is loaded masked when `width` is not a multiple of
//! `lanes`, so the outputs are computed up to `padded_out`, a multiple of `lanes`, with zeros
//! past `out` (or only up to the end of a half register, see below: the rest of such a row is
//! never written, and never read); the bias (`padded_out` values, zero-padded) is at `bias_at`
//! in the biases.
//!
//! A layer's last outputs may instead be in dot-product form (see [`TileShape::dot_from`]):
//! outputs `dot_from..out` keep their weights row-major at `dot_at`, rows of `in` values padded
//! with zeros to whole registers ([`padded`]), and each is a horizontal sum of lane-wise products.
//! Panels then cover only the outputs before `dot_from`, a multiple of `lanes` (or, where half a
//! register costs half, of [`TileShape::half_lanes`]), and nothing is padded (`padded_out ==
//! out`). A layer of very few outputs is all dot form (`dot_from == 0`); a wide one with a short
//! tail and few inputs per output may be split (130 -> 97: 96 + 1; on Zen 4, 784 -> 42: 40 + 2).
//!
//! A register tile's last register runs in its low half ([`SimdVec::HALF_LANES`]) when its
//! outputs fit there: multiply-adds, bias and stores all cover that half only.
//!
//! A chain of narrow layers on an ISA with a register transpose may also be packed a second
//! time, every layer as rows ([`Packed::lanes_layers`], see [`TileShape::rows_in_lanes`]): whole
//! blocks of `nv_max * lanes` batch rows then run with the rows in the lanes, so no output is
//! padded (64 -> 42 -> 2 at 4096 rows: 75% -> 85% of the FMA peak); the other rows, and every
//! small batch, run as above.
//!
//! Each layer's outputs go through its [`PostOp`] in registers before they are stored
//! (`epilogue.rs`), the same function in both forms, so a result does not depend on the form.
//!
//! # Files
//!
//! - `mod.rs`: this contract ([`Element`], [`SimdVec`], [`LoadFrom`], [`Kernel`]) and
//!   [`target_kernels!`],
//!   which writes every ISA's thin `#[target_feature]` entry points from one list;
//! - `layout.rs`: [`TileShape`], [`LayerDesc`], [`Packed`]: what packing and kernels agree on;
//! - `chain.rs`: the loop nests (panels and dot form, rows in the lanes), generic over
//!   [`SimdVec`], written once; `pairs.rs`: the bf16-pairs form ([`PairDot`], `vdpbf16ps`); `quads.rs`: the int8 form ([`QuadDot`], `vpdpbusd`); `backward.rs`: the backward's, on the same register tiles, and
//!   `gradient.rs`: the post-ops' gradients;
//! - `microkernel.rs`: the register tiles; `epilogue.rs`: the post-ops, in the math of
//!   `math.rs` (its polynomials in `coefficients.rs`); `peak.rs`: the FMA loop that measures the
//!   ceiling;
//! - `storage.rs`: the weight types narrower than the compute type ([`Bf16`]);
//! - `scalar.rs`, `avx2.rs`, `avx512.rs`, `neon.rs`: one [`SimdVec`] per register type (and
//!   its [`LoadFrom`] of the narrower weights), nothing else.
//!
//! Which form a layer takes is policy, not SIMD: the cost model is in `plan.rs`, outside this
//! module (and the timings, the FMA ceiling and the opt-in half-register probe, in `probe.rs`).

#[macro_use]
mod entry_points;

mod backward;
mod chain;
mod coefficients;
mod epilogue;
mod gradient;
mod layout;
mod math;
mod microkernel;
mod pairs;
mod peak;
mod quads;
mod storage;

pub mod scalar;

#[cfg(target_arch = "x86_64")]
pub mod avx2;
#[cfg(target_arch = "x86_64")]
pub mod avx512;
#[cfg(target_arch = "aarch64")]
pub mod neon;

use std::fmt::Debug;
use std::ops::{Add, Div, Mul, Neg, Sub};

pub use crate::ops::PostOp;
use backward::{backward_rows, BackwardCalls};
pub use backward::{backward_scratch_len, gradient_layout, BackwardInputs, GradientAt};
pub use chain::{forward_rows, saved_columns, saved_width, scratch_len, SavedColumns};
pub use epilogue::StoredEpilogue;
pub use layout::{
    padded, LayerDesc, Packed, Panels, TileShape, L1_HALF_BYTES, LINE_BYTES, STREAM_MIN_BYTES,
};
pub use math::Constants;
pub use pairs::{dot_pairs_loop, forward_pairs, PairDot};
pub use peak::{fma_loop, fma_loop_flops};
pub use quads::{dot_quads_loop, forward_quads, QuadDot, INT8_CHANNEL_VALUES};
pub use storage::Bf16;

/// The float types the kernels compute in.
pub trait Element:
    Copy
    + Default
    + Debug
    + Send
    + Sync
    + PartialOrd
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + bytemuck::Pod
    + 'static
{
    const ZERO: Self;
    /// `"float32"` or `"float64"`, as numpy names it.
    const NAME: &'static str;
    /// The largest and smallest binary exponents of a normal value (127 and -126 for f32).
    const MAX_EXPONENT: i32;
    const MIN_EXPONENT: i32;
    /// What the activations' math needs for this type (`math.rs`).
    const MATH: Constants<Self>;

    /// The nearest value of the type (an op's parameter, held as f64, rounded as PyTorch rounds
    /// it for a tensor of this type).
    fn from_f64(value: f64) -> Self;

    /// Neither infinite nor NaN.
    fn is_finite(self) -> bool;

    /// The portable forms of [`SimdVec`]'s bit-level primitives, one value at a time.
    fn abs(self) -> Self;
    /// See [`SimdVec::fused_mul_add`].
    fn fused_mul_add(self, b: Self, acc: Self) -> Self;
    fn copy_sign(self, sign: Self) -> Self;
    /// Rounded to the nearest integer, ties to even.
    fn round_even(self) -> Self;
    /// See [`SimdVec::scale_pow2`].
    fn scale_pow2(self, n: Self) -> Self;
    /// See [`SimdVec::split_exponent`].
    fn split_exponent(self) -> (Self, Self);
}

impl Element for f32 {
    const ZERO: Self = 0.0;
    const NAME: &'static str = "float32";
    const MAX_EXPONENT: i32 = 127;
    const MIN_EXPONENT: i32 = -126;
    const MATH: Constants<Self> = math::F32;

    fn from_f64(value: f64) -> Self {
        value as f32
    }

    fn is_finite(self) -> bool {
        f32::is_finite(self)
    }

    fn abs(self) -> Self {
        f32::abs(self)
    }

    fn fused_mul_add(self, b: Self, acc: Self) -> Self {
        f32::mul_add(self, b, acc)
    }

    fn copy_sign(self, sign: Self) -> Self {
        f32::copysign(self, sign)
    }

    fn round_even(self) -> Self {
        f32::round_ties_even(self)
    }

    fn scale_pow2(self, n: Self) -> Self {
        self * f32::from_bits(((n as i32 + 127) as u32) << 23)
    }

    fn split_exponent(self) -> (Self, Self) {
        let bits = self.to_bits();
        let exponent = ((bits >> 23) & 0xff) as i32 - 127;
        (
            f32::from_bits((bits & 0x007f_ffff) | 0x3f80_0000),
            exponent as f32,
        )
    }
}

impl Element for f64 {
    const ZERO: Self = 0.0;
    const NAME: &'static str = "float64";
    const MAX_EXPONENT: i32 = 1023;
    const MIN_EXPONENT: i32 = -1022;
    const MATH: Constants<Self> = math::F64;

    fn from_f64(value: f64) -> Self {
        value
    }

    fn is_finite(self) -> bool {
        f64::is_finite(self)
    }

    fn abs(self) -> Self {
        f64::abs(self)
    }

    fn fused_mul_add(self, b: Self, acc: Self) -> Self {
        f64::mul_add(self, b, acc)
    }

    fn copy_sign(self, sign: Self) -> Self {
        f64::copysign(self, sign)
    }

    fn round_even(self) -> Self {
        f64::round_ties_even(self)
    }

    fn scale_pow2(self, n: Self) -> Self {
        self * f64::from_bits(((n as i64 + 1023) as u64) << 52)
    }

    fn split_exponent(self) -> (Self, Self) {
        let bits = self.to_bits();
        let exponent = ((bits >> 52) & 0x7ff) as i64 - 1023;
        (
            f64::from_bits((bits & 0x000f_ffff_ffff_ffff) | 0x3ff0_0000_0000_0000),
            exponent as f64,
        )
    }
}

/// One SIMD register of `LANES` elements. Every method is only called from inside a
/// `#[target_feature]` wrapper whose features cover the instructions it uses.
pub trait SimdVec: Copy {
    type Elem: Element;
    const LANES: usize;

    /// # Safety
    /// The CPU supports the ISA of the implementation.
    unsafe fn zero() -> Self;
    /// Broadcast `*ptr` to every lane.
    ///
    /// # Safety
    /// `ptr` is valid for one read; the CPU supports the ISA.
    unsafe fn splat(ptr: *const Self::Elem) -> Self;
    /// # Safety
    /// `ptr` is valid for `LANES` reads (no alignment needed); the CPU supports the ISA.
    unsafe fn load(ptr: *const Self::Elem) -> Self;
    /// # Safety
    /// `ptr` is valid for `LANES` writes (no alignment needed); the CPU supports the ISA.
    unsafe fn store(self, ptr: *mut Self::Elem);
    /// [`SimdVec::store`] past the caches where the ISA has such a store (non-temporal), for
    /// outputs far larger than cache: it skips reading each line in before writing it. Ordered
    /// with the stores that follow only after [`SimdVec::fence_streams`].
    ///
    /// # Safety
    /// As for [`SimdVec::store`], and `ptr` is aligned to `LANES` values.
    #[inline(always)]
    unsafe fn store_stream(self, ptr: *mut Self::Elem) {
        // SAFETY: forwarded from the caller.
        unsafe { self.store(ptr) }
    }
    /// Orders every [`SimdVec::store_stream`] before the stores that follow (another thread
    /// reads the outputs once the call has returned).
    ///
    /// # Safety
    /// The CPU supports the ISA.
    #[inline(always)]
    unsafe fn fence_streams() {}
    /// `self * b + acc`.
    ///
    /// # Safety
    /// The CPU supports the ISA.
    unsafe fn mul_add(self, b: Self, acc: Self) -> Self;
    /// # Safety
    /// The CPU supports the ISA.
    unsafe fn add(self, b: Self) -> Self;
    /// Loads the first `count < LANES` values at `ptr`, zeros in the other lanes.
    ///
    /// # Safety
    /// `ptr` is valid for `count` reads; the CPU supports the ISA.
    unsafe fn load_partial(ptr: *const Self::Elem, count: usize) -> Self;
    /// The sum of the lanes.
    ///
    /// # Safety
    /// The CPU supports the ISA.
    unsafe fn sum(self) -> Self::Elem;
    /// Hints that `ptr` will be read soon; never faults, whatever the address.
    ///
    /// # Safety
    /// The CPU supports the ISA.
    unsafe fn prefetch(ptr: *const Self::Elem);
    /// Hints that `ptr` will be read later: fetched into L2 only, so it does not evict what L1
    /// holds now; never faults, whatever the address.
    ///
    /// # Safety
    /// The CPU supports the ISA.
    unsafe fn prefetch_to_l2(ptr: *const Self::Elem);
    /// The first lane (where [`SimdVec::splat`] put a value).
    ///
    /// # Safety
    /// The CPU supports the ISA.
    unsafe fn first(self) -> Self::Elem;
    /// `max(0, x)` that keeps NaN as NaN, like `torch.relu`.
    ///
    /// # Safety
    /// The CPU supports the ISA.
    unsafe fn relu(self) -> Self;

    // The primitives the activations (`math.rs`) are written in. Each is one instruction or a
    // few on every ISA, and gives the same bits on every ISA for the inputs its doc allows.

    /// A register with `value` in every lane.
    ///
    /// # Safety
    /// The CPU supports the ISA.
    #[inline(always)]
    unsafe fn constant(value: Self::Elem) -> Self {
        // SAFETY: `value` is a readable local; the caller guarantees the ISA.
        unsafe { Self::splat(&value) }
    }
    /// # Safety
    /// The CPU supports the ISA.
    unsafe fn sub(self, b: Self) -> Self;
    /// # Safety
    /// The CPU supports the ISA.
    unsafe fn mul(self, b: Self) -> Self;
    /// `self * b + acc` rounded once, where [`SimdVec::mul_add`] may round twice (the portable
    /// kernel's does): what error-free products (`a * b - round(a * b)`) need. The FMA
    /// instruction on the SIMD ISAs; the portable kernel calls libm's `fma`.
    ///
    /// # Safety
    /// The CPU supports the ISA.
    unsafe fn fused_mul_add(self, b: Self, acc: Self) -> Self;
    /// Correctly rounded division.
    ///
    /// # Safety
    /// The CPU supports the ISA.
    unsafe fn div(self, b: Self) -> Self;
    /// The smaller of each pair of lanes; `b` where either is NaN (x86's `MINPS` operand order,
    /// so `x.min(limit)` returns `limit` for a NaN `x`, and `limit.min(x)` returns NaN).
    ///
    /// # Safety
    /// The CPU supports the ISA.
    unsafe fn min(self, b: Self) -> Self;
    /// The larger of each pair of lanes; `b` where either is NaN (as [`SimdVec::min`]).
    ///
    /// # Safety
    /// The CPU supports the ISA.
    unsafe fn max(self, b: Self) -> Self;
    /// `|x|` (the sign bit cleared: NaN stays NaN).
    ///
    /// # Safety
    /// The CPU supports the ISA.
    unsafe fn abs(self) -> Self;
    /// `-x` (the sign bit flipped).
    ///
    /// # Safety
    /// The CPU supports the ISA.
    unsafe fn neg(self) -> Self;
    /// `self` with the sign of `sign` (NaN signs included).
    ///
    /// # Safety
    /// The CPU supports the ISA.
    unsafe fn copy_sign(self, sign: Self) -> Self;
    /// Per lane, `if_less` where `self < b`, else `otherwise` (a NaN compares false).
    ///
    /// # Safety
    /// The CPU supports the ISA.
    unsafe fn select_lt(self, b: Self, if_less: Self, otherwise: Self) -> Self;
    /// Rounded to the nearest integer, ties to even (|x| < 2^22 for f32, 2^51 for f64).
    ///
    /// # Safety
    /// The CPU supports the ISA.
    unsafe fn round_even(self) -> Self;
    /// `self * 2^n`, rounded once, for integral `n` with `2^n` normal (`MIN_EXPONENT <= n <=
    /// MAX_EXPONENT` of [`Element`]); other `n` give unspecified results.
    ///
    /// # Safety
    /// The CPU supports the ISA.
    unsafe fn scale_pow2(self, n: Self) -> Self;
    /// `(m, e)` with `self = m * 2^e`, `1 <= m < 2` and `e` integral, for positive normal
    /// finite lanes; other lanes give unspecified results.
    ///
    /// # Safety
    /// The CPU supports the ISA.
    unsafe fn split_exponent(self) -> (Self, Self);

    /// Lanes of the register's low half where the ISA has a narrower register for it (AVX-512:
    /// a ymm), 0 where it has none. A tile's last register uses the half when its outputs fit:
    /// never slower, and on CPUs that run a 512-bit FMA as two 256-bit halves (Zen 4) it costs
    /// half as much (see [`TileShape::half_lanes`]).
    const HALF_LANES: usize = 0;

    /// `self * b + acc` in the low [`SimdVec::HALF_LANES`] lanes; the other lanes of the result
    /// are unspecified. Only types with a half register implement it.
    ///
    /// # Safety
    /// The CPU supports the ISA; only called where `HALF_LANES > 0`.
    #[inline(always)]
    unsafe fn mul_add_half(self, _b: Self, _acc: Self) -> Self {
        unreachable!("mul_add_half on a register type without a half register")
    }

    /// Stores the low [`SimdVec::HALF_LANES`] lanes. Only types with a half register implement
    /// it: the loop nest never takes the half path on the others.
    ///
    /// # Safety
    /// `ptr` is valid for `HALF_LANES` writes; the CPU supports the ISA.
    #[inline(always)]
    unsafe fn store_half(self, _ptr: *mut Self::Elem) {
        unreachable!("store_half on a register type without a half register")
    }

    /// Whether [`SimdVec::transpose_square`] works in registers, fast enough for a chain to run
    /// with batch rows in the lanes (see [`TileShape::rows_in_lanes`]).
    const FAST_TRANSPOSE: bool = false;

    /// `dst[c * ldd + r] = src[r * lds + c]` for `r, c < LANES`.
    ///
    /// # Safety
    /// `src` is valid for reading `LANES` rows of `LANES` values `lds` apart, `dst` for writing
    /// `LANES` rows of `LANES` values `ldd` apart, and they do not overlap; the CPU supports
    /// the ISA.
    #[inline(always)]
    unsafe fn transpose_square(
        src: *const Self::Elem,
        lds: usize,
        dst: *mut Self::Elem,
        ldd: usize,
    ) {
        for r in 0..Self::LANES {
            for c in 0..Self::LANES {
                // SAFETY: `r, c < LANES`, inside both blocks as the caller guarantees.
                unsafe { *dst.add(c * ldd + r) = *src.add(r * lds + c) };
            }
        }
    }
}

/// Registers that values stored as `S` load into, widened to the register's element type where
/// `S` is narrower. The kernels read packed weights only through it, so weights stored in
/// another type (bf16, say, with f32 compute) join by implementing it for the register types
/// they widen into, without another loop nest. Every register type reads its own element type.
pub trait LoadFrom<S>: SimdVec {
    /// [`SimdVec::load`] from `S` values.
    ///
    /// # Safety
    /// `ptr` is valid for `LANES` reads (no alignment needed); the CPU supports the ISA.
    unsafe fn load_from(ptr: *const S) -> Self;
    /// [`SimdVec::load_partial`] from `S` values.
    ///
    /// # Safety
    /// `ptr` is valid for `count` reads; the CPU supports the ISA.
    unsafe fn load_partial_from(ptr: *const S, count: usize) -> Self;
    /// [`SimdVec::splat`] from an `S` value.
    ///
    /// # Safety
    /// `ptr` is valid for one read; the CPU supports the ISA.
    unsafe fn splat_from(ptr: *const S) -> Self;
}

impl<V: SimdVec> LoadFrom<V::Elem> for V {
    #[inline(always)]
    unsafe fn load_from(ptr: *const V::Elem) -> Self {
        // SAFETY: forwarded from the caller.
        unsafe { V::load(ptr) }
    }

    #[inline(always)]
    unsafe fn load_partial_from(ptr: *const V::Elem, count: usize) -> Self {
        // SAFETY: forwarded from the caller.
        unsafe { V::load_partial(ptr, count) }
    }

    #[inline(always)]
    unsafe fn splat_from(ptr: *const V::Elem) -> Self {
        // SAFETY: forwarded from the caller.
        unsafe { V::splat(ptr) }
    }
}

/// Runs the chain, its weights stored as `W`, computed in `T`, on `input` (`rows x
/// layers[0].in_features`, row-major) into `output`
/// (`rows x last.out_features`), using `scratch` (at least [`scratch_len`] elements), and with
/// `saved` (`rows x` [`saved_width`]) keeps every layer's outputs but the last's for a backward
/// (see [`forward_rows`]). The
/// shape is the kernel's own ([`Kernel::shape`]), or that with another `half_lanes` (0 or the
/// register's half): the packing follows it, the register tiles do not depend on it.
///
/// # Safety
/// The CPU supports the kernel's ISA. (The shape, the packing, the shapes and the lengths are
/// checked, with a panic on mismatch.)
pub type ChainKernel<W, T> =
    unsafe fn(&TileShape, Packed<'_, W, T>, &[T], &mut [T], &mut [T], Option<&mut [T]>);

/// Runs the chain's backward ([`backward_rows`]) on a contiguous run of rows: `(shape, chain,
/// inputs, grad_input, grads, scratch)`, `scratch` at least [`backward_scratch_len`] elements.
///
/// # Safety
/// The CPU supports the kernel's ISA. (Shapes and lengths are checked, with a panic on
/// mismatch.)
pub type ChainBackward<W, T> = unsafe fn(
    &TileShape,
    Packed<'_, W, T>,
    &BackwardInputs<'_, T>,
    Option<&mut [T]>,
    &mut [T],
    &mut [T],
);

/// Transposes a row-major matrix: `(src, cols, dst, dst_stride)`, `src` holding
/// `src.len() / cols` rows of `cols` values, `dst` receiving its `cols` rows `dst_stride` apart
/// (at least the row count; what lies between is left as it is). Packing lays a block of weight
/// rows out as a panel this way, a register square at a time.
///
/// # Safety
/// The CPU supports the kernel's ISA. (The lengths are checked, with a panic on mismatch.)
pub type Transpose<T> = unsafe fn(&[T], usize, &mut [T], usize);

/// Runs [`fma_loop`] for an ISA: `(iterations, seed) -> value`.
///
/// # Safety
/// The CPU supports the kernel's ISA.
pub type PeakLoop<T> = unsafe fn(usize, &[T]) -> T;

/// One ISA's entry points for weights stored as `W` and computed in `T` (its inputs, outputs
/// and scratch), and the tile shape packing must follow.
#[derive(Clone, Copy, Debug)]
pub struct Kernel<W: 'static, T: 'static> {
    pub shape: TileShape,
    pub forward: ChainKernel<W, T>,
    /// The loop nest compiled without and with its half-register tiles, of which
    /// [`Kernel::with_half_registers`] makes one `forward`: with one copy holding both, a
    /// grouped form whose shape had no half registers ran its calls of one row at 0.97x, with
    /// two at 1.00x (784 -> 42 -> 16 in int8 on Zen 4, one process). None where one loop nest
    /// serves both.
    pub forward_by_halves: Option<[ChainKernel<W, T>; 2]>,
    /// None for a kernel whose form keeps no activations (inference only).
    pub backward: Option<ChainBackward<W, T>>,
    /// The ceiling of the kernel's own multiply-add instruction (an FMA, or a dot product of
    /// [`TileShape::k_group`] pairs), counted by [`fma_loop_flops`] with `lanes * k_group`.
    pub peak: PeakLoop<T>,
    /// [`fma_loop`] with every third chain in a half register, where the register type has one.
    pub peak_half: Option<PeakLoop<T>>,
    /// None for a form that packs its weights otherwise (in groups of `k`).
    pub transpose: Option<Transpose<T>>,
    /// The register type's [`SimdVec::HALF_LANES`].
    pub half_register_lanes: usize,
}

impl<W, T> Kernel<W, T> {
    /// This kernel with packing choosing half registers where they fit (`cheaper`: a multiply-add
    /// on one costs half; see [`TileShape::half_lanes`]) or never.
    pub fn with_half_registers(self, cheaper: bool) -> Self {
        let half_lanes = if cheaper { self.half_register_lanes } else { 0 };
        let forward = match self.forward_by_halves {
            Some(forwards) => forwards[usize::from(half_lanes > 0)],
            None => self.forward,
        };
        Kernel {
            shape: TileShape {
                half_lanes,
                ..self.shape
            },
            forward,
            ..self
        }
    }
}
