//! The FMA-throughput ceiling: register-only multiply-adds that kernel speeds are quoted
//! against, and that the opt-in half-register probe times.

use super::SimdVec;

/// Independent multiply-add chains in [`fma_loop`]: enough to cover FMA latency x issue width.
pub(super) const PEAK_CHAINS: usize = 12;

/// The FMA-throughput ceiling: `iterations x PEAK_CHAINS` independent register FMAs and nothing
/// else. Returns a value that depends on every FMA, so none is optimised away. With
/// `HALF_CHAINS`, every third chain runs in the registers' low half ([`SimdVec::mul_add_half`]):
/// as fast as without where a half costs as much as a whole register, 5/6 of the time where it
/// costs half (see `probe::half_is_cheaper`).
///
/// # Safety
/// The CPU supports `V`'s ISA; `HALF_CHAINS` only where `V::HALF_LANES > 0`.
#[inline(always)]
pub unsafe fn fma_loop<V: SimdVec, const HALF_CHAINS: bool>(
    iterations: usize,
    seed: &[V::Elem],
) -> V::Elem {
    assert!(seed.len() >= V::LANES && (!HALF_CHAINS || V::HALF_LANES > 0));
    // SAFETY: `seed` holds at least `LANES` values; the caller guarantees the ISA.
    unsafe {
        let x = V::load(seed.as_ptr());
        let mut acc = [x; PEAK_CHAINS];
        for _ in 0..iterations {
            for (chain, a) in acc.iter_mut().enumerate() {
                *a = if HALF_CHAINS && chain % 3 == 2 {
                    a.mul_add_half(x, x)
                } else {
                    a.mul_add(x, x)
                };
            }
        }
        let mut sum = V::zero();
        for a in acc {
            sum = a.mul_add(x, sum);
        }
        sum.sum()
    }
}

/// Floating-point operations one call of [`fma_loop`] performs.
pub fn fma_loop_flops(iterations: usize, lanes: usize) -> usize {
    2 * lanes * PEAK_CHAINS * (iterations + 1)
}
