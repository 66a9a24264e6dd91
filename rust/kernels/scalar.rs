//! Portable kernel: one element per "register". It runs everywhere (aarch64 included) and is the
//! oracle the SIMD kernels are tested against. Its multiply-add rounds twice (no FMA), so SIMD
//! results differ from it by float rounding only.

use super::{fma_loop, forward_rows, Element, Kernel, Packed, SimdVec, TileShape};

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
    unsafe fn relu(self) -> Self {
        // `NaN < 0` is false, so NaN passes through as in torch.relu.
        if self.0 < T::ZERO {
            Lane(T::ZERO)
        } else {
            self
        }
    }
}

const MR: usize = 4;
const NV_MAX: usize = 4;
const SHAPE: TileShape = TileShape {
    lanes: 1,
    mr: MR,
    nv_max: NV_MAX,
    block_rows: 8 * MR,
    fast_transpose: false,
    half_lanes: 0,
};

/// # Safety
/// Always safe to call: the shape and layers are checked before any pointer is formed.
unsafe fn forward<T: Element>(
    shape: &TileShape,
    chain: Packed<'_, T>,
    input: &[T],
    output: &mut [T],
    scratch: &mut [T],
) {
    // SAFETY: plain Rust arithmetic needs no CPU feature; `forward_rows` checks the shape.
    unsafe { forward_rows::<Lane<T>, MR, NV_MAX>(shape, chain, input, output, scratch) }
}

/// # Safety
/// Always safe to call.
unsafe fn peak<T: Element>(iterations: usize, seed: &[T]) -> T {
    // SAFETY: plain Rust arithmetic needs no CPU feature.
    unsafe { fma_loop::<Lane<T>, false>(iterations, seed) }
}

pub fn kernel_f32() -> Kernel<f32> {
    Kernel {
        shape: SHAPE,
        forward: forward::<f32>,
        peak: peak::<f32>,
    }
}

pub fn kernel_f64() -> Kernel<f64> {
    Kernel {
        shape: SHAPE,
        forward: forward::<f64>,
        peak: peak::<f64>,
    }
}
