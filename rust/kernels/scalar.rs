//! Portable kernel: one element per "register". It runs everywhere (aarch64 included) and is the
//! oracle the SIMD kernels are tested against. Its multiply-add rounds twice (no FMA), so SIMD
//! results differ from it by float rounding only.

use super::{Bf16, Element, LoadFrom, SimdVec};

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

/// bf16 weights widened one at a time.
impl LoadFrom<Bf16> for Lane<f32> {
    #[inline(always)]
    unsafe fn load_from(ptr: *const Bf16) -> Self {
        // SAFETY: the caller guarantees one readable value.
        Lane(unsafe { *ptr }.widen())
    }

    #[inline(always)]
    unsafe fn load_partial_from(_ptr: *const Bf16, _count: usize) -> Self {
        // One lane: a partial load has `count == 0` values, and reads nothing.
        Lane(0.0)
    }

    #[inline(always)]
    unsafe fn splat_from(ptr: *const Bf16) -> Self {
        // SAFETY: the caller guarantees one readable value.
        Lane(unsafe { *ptr }.widen())
    }
}

target_kernels!(
    mr = 4,
    nv_max = 4,
    kernel_f32: Lane<f32> => f32, f32;
    kernel_f64: Lane<f64> => f64, f64;
    kernel_bf16: Lane<f32> => Bf16, f32;
);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dispatch::Isa;
    use crate::mlp::Mlp;
    use crate::ops::PostOp;
    use crate::pack::LayerSpec;

    /// The safe API, packing and the loop nests take weights stored in another type than the
    /// one they compute in, with no code but its `Storage`, `LoadFrom` and `Weights`: bf16
    /// weights, f32 compute and I/O, against an f64 reference on the same (rounded) weights.
    #[test]
    fn weights_stored_narrower_than_the_compute_type_run_in_the_same_loop_nest() {
        let widths = [64, 42, 2];
        let mut next = {
            let mut state = 12345u32;
            move || {
                state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (state >> 8) as f32 / (1u32 << 24) as f32 - 0.5
            }
        };
        let weights: Vec<Vec<f32>> = widths
            .windows(2)
            .map(|pair| (0..pair[0] * pair[1]).map(|_| next()).collect())
            .collect();
        let biases: Vec<Vec<f32>> = widths[1..]
            .iter()
            .map(|&out| (0..out).map(|_| next()).collect())
            .collect();
        let specs: Vec<LayerSpec<'_, f32>> = (0..2)
            .map(|i| LayerSpec {
                weight: &weights[i],
                bias: Some(&biases[i]),
                out_features: widths[i + 1],
                in_features: widths[i],
                post_op: [PostOp::Relu, PostOp::Identity][i],
            })
            .collect();
        let mlp = Mlp::<f32, Bf16>::new(&specs, Isa::Scalar).unwrap();
        let rows = 37;
        let input: Vec<f32> = (0..rows * widths[0]).map(|_| next()).collect();
        let mut output = vec![0.0; rows * widths[2]];
        mlp.forward(&input, &mut output).unwrap();
        let widened = |w: f32| f64::from(Bf16::round(w).widen());
        for (row, got) in output.chunks_exact(widths[2]).enumerate() {
            let x = &input[row * widths[0]..][..widths[0]];
            let hidden: Vec<f64> = (0..widths[1])
                .map(|o| {
                    let w = &weights[0][o * widths[0]..][..widths[0]];
                    let sum: f64 = x
                        .iter()
                        .zip(w)
                        .map(|(&a, &b)| f64::from(a) * widened(b))
                        .sum();
                    (sum + f64::from(biases[0][o])).max(0.0)
                })
                .collect();
            for (o, &value) in got.iter().enumerate() {
                let w = &weights[1][o * widths[1]..][..widths[1]];
                let sum: f64 = hidden.iter().zip(w).map(|(&a, &b)| a * widened(b)).sum();
                let want = sum + f64::from(biases[1][o]);
                assert!(
                    (f64::from(value) - want).abs() < 1e-5,
                    "row {row}: {value} vs {want}"
                );
            }
        }
    }
}
