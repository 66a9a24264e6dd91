//! The post-ops in registers: one function for every op and every register type, used by every
//! form, so a result does not depend on which form the cost model picked.

use super::{PostOp, SimdVec};

/// `op` applied to each lane of `value`.
///
/// # Safety
/// The CPU supports `V`'s ISA.
#[inline(always)]
pub(super) unsafe fn apply<V: SimdVec>(op: PostOp, value: V) -> V {
    // SAFETY: forwarded from the caller.
    unsafe {
        match op {
            PostOp::Identity => value,
            PostOp::Relu => value.relu(),
        }
    }
}

/// `op` applied to one value (a dot-form output), through the register function on a
/// broadcast of it.
///
/// # Safety
/// The CPU supports `V`'s ISA.
#[inline(always)]
pub(super) unsafe fn apply_one<V: SimdVec>(op: PostOp, value: V::Elem) -> V::Elem {
    // SAFETY: forwarded from the caller; `value` is a readable local.
    unsafe { apply(op, V::splat(&value)).first() }
}
