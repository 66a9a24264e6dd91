//! The post-ops in registers: one function for every op and every register type, used by every
//! form, so a result does not depend on which form the cost model picked. Parameters arrive as
//! f64 and are rounded to the element type, as PyTorch rounds a module's parameters for a
//! float32 tensor.
//!
//! Identity and ReLU run on a tile's accumulators before they are stored. The others run over
//! the stored tile, still in L1, in one loop per tile (`apply_to_stored_tile`), compiled once per
//! register type in a function of its own that the tiles call through [`StoredEpilogue`]. Their
//! code in the register tiles (hundreds of instances: rows x registers x forms x ISAs) made the
//! crate take many minutes to compile, and even LeakyReLU's and Hardtanh's few instructions
//! there made LLVM keep the accumulators in memory (see [`apply_on_accumulators`]).

use super::math::{self, splat_f64};
use super::{PostOp, SimdVec};

/// The passes of the ops that do not [`runs_on_accumulators`] over stored outputs, one
/// `#[target_feature]` function each per register type (written by `target_kernels!`):
/// `tile(op, out, ldo, rows, registers, half)` is [`apply_to_stored_tile`],
/// `values(op, out, ldo, rows, outs)` is [`apply_to_stored_values`].
#[derive(Clone, Copy, Debug)]
pub struct StoredEpilogue<T> {
    pub tile: unsafe fn(PostOp, *mut T, usize, usize, usize, bool),
    pub values: unsafe fn(PostOp, *mut T, usize, usize, usize),
}

/// Whether `op` is cheap enough to run on the accumulators as they are stored.
#[inline(always)]
pub(super) fn runs_on_accumulators(op: PostOp) -> bool {
    match op {
        PostOp::Identity | PostOp::Relu => true,
        PostOp::LeakyRelu { .. }
        | PostOp::Hardtanh { .. }
        | PostOp::Sigmoid
        | PostOp::Tanh
        | PostOp::Gelu
        | PostOp::GeluTanh
        | PostOp::Silu
        | PostOp::Elu { .. }
        | PostOp::Softplus { .. } => false,
    }
}

/// `op` applied to each lane of `value` where it [`runs_on_accumulators`], else `value` as it
/// is (the tile's post-pass applies it). Only identity and ReLU run here: with more ops' code in
/// the register tiles (LeakyReLU and Hardtanh included), LLVM kept their accumulators in memory,
/// a store per multiply-add, and every AVX-512 chain ran 2-2.5x slower.
///
/// # Safety
/// The CPU supports `V`'s ISA.
#[inline(always)]
pub(super) unsafe fn apply_on_accumulators<V: SimdVec>(op: PostOp, value: V) -> V {
    match op {
        // SAFETY: forwarded from the caller.
        PostOp::Relu => unsafe { value.relu() },
        PostOp::Identity
        | PostOp::LeakyRelu { .. }
        | PostOp::Hardtanh { .. }
        | PostOp::Sigmoid
        | PostOp::Tanh
        | PostOp::Gelu
        | PostOp::GeluTanh
        | PostOp::Silu
        | PostOp::Elu { .. }
        | PostOp::Softplus { .. } => value,
    }
}

/// `op` applied to each lane of `value`.
///
/// # Safety
/// The CPU supports `V`'s ISA.
#[inline(always)]
unsafe fn apply<V: SimdVec>(op: PostOp, value: V) -> V {
    // SAFETY: forwarded from the caller.
    unsafe {
        match op {
            PostOp::Identity | PostOp::Relu => apply_on_accumulators(op, value),
            // `0 < NaN` is false, so NaN takes the other side, and stays NaN times the slope.
            PostOp::LeakyRelu { negative_slope } => {
                V::zero().select_lt(value, value, value.mul(splat_f64(negative_slope)))
            }
            // `min_val.max(NaN)` and `max_val.min(NaN)` are NaN (see `SimdVec::min`).
            PostOp::Hardtanh { min_val, max_val } => {
                splat_f64::<V>(max_val).min(splat_f64::<V>(min_val).max(value))
            }
            PostOp::Sigmoid => math::sigmoid(value),
            PostOp::Tanh => math::tanh(value),
            PostOp::Gelu => math::gelu(value),
            PostOp::GeluTanh => math::gelu_tanh(value),
            PostOp::Silu => math::silu(value),
            PostOp::Elu { alpha } => math::elu(value, splat_f64(alpha)),
            PostOp::Softplus { beta, threshold } => {
                math::softplus(value, splat_f64(beta), splat_f64(threshold))
            }
        }
    }
}

/// `op` applied to one value (a dot-form output), through the register function on a
/// broadcast of it.
///
/// # Safety
/// The CPU supports `V`'s ISA.
#[inline(always)]
unsafe fn apply_one<V: SimdVec>(op: PostOp, value: V::Elem) -> V::Elem {
    // SAFETY: forwarded from the caller; `value` is a readable local.
    unsafe { apply(op, V::splat(&value)).first() }
}

/// [`apply_on_accumulators`] for one value (a dot-form output).
///
/// # Safety
/// The CPU supports `V`'s ISA.
#[inline(always)]
pub(super) unsafe fn apply_one_on_accumulator<V: SimdVec>(op: PostOp, value: V::Elem) -> V::Elem {
    // SAFETY: forwarded from the caller; `value` is a readable local.
    unsafe { apply_on_accumulators(op, V::splat(&value)).first() }
}

/// `op`, unless it [`runs_on_accumulators`], applied to a stored register tile: `rows` rows
/// `ldo` apart of `registers` registers, the last one only its low [`SimdVec::HALF_LANES`] with
/// `half` (what the tile stored).
///
/// # Safety
/// The tile's values are readable and writable at `out`; the CPU supports `V`'s ISA; `half`
/// only where `V::HALF_LANES > 0`.
#[inline(always)]
pub(super) unsafe fn apply_to_stored_tile<V: SimdVec>(
    op: PostOp,
    out: *mut V::Elem,
    ldo: usize,
    rows: usize,
    registers: usize,
    half: bool,
) {
    if runs_on_accumulators(op) {
        return;
    }
    // SAFETY: every address is inside the stored tile, as the caller guarantees; the half
    // register reads and writes `HALF_LANES < LANES` values only.
    unsafe {
        for r in 0..rows {
            for v in 0..registers {
                let at = out.add(r * ldo + v * V::LANES);
                if half && v == registers - 1 {
                    apply(op, V::load_partial(at, V::HALF_LANES)).store_half(at);
                } else {
                    apply(op, V::load(at)).store(at);
                }
            }
        }
    }
}

/// `op`, unless it [`runs_on_accumulators`], applied to stored dot-form outputs: `rows` rows
/// `ldo` apart of `outs` values.
///
/// # Safety
/// The values are readable and writable at `out`; the CPU supports `V`'s ISA.
#[inline(always)]
pub(super) unsafe fn apply_to_stored_values<V: SimdVec>(
    op: PostOp,
    out: *mut V::Elem,
    ldo: usize,
    rows: usize,
    outs: usize,
) {
    if runs_on_accumulators(op) {
        return;
    }
    // SAFETY: every address is inside the stored outputs, as the caller guarantees.
    unsafe {
        for r in 0..rows {
            for c in 0..outs {
                let at = out.add(r * ldo + c);
                *at = apply_one::<V>(op, *at);
            }
        }
    }
}
