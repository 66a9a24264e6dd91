//! Timing probes: the FMA ceiling kernel speeds are quoted against, and the opt-in measurement
//! of whether a half register costs half (`FUSEDAE_HALF_REGISTERS=probe`). Nothing here decides
//! what a kernel computes by default: a timing depends on the load on the machine, and the form
//! packing picks must not (see `dispatch::half_registers_cheaper`).

use std::time::{Duration, Instant};

use crate::dispatch::{Float, Isa, Weights};
use crate::kernels::{fma_loop_flops, Bf16, Element, Kernel, PeakLoop};
use crate::mlp::Error;

/// Measures the FMA ceiling of one thread for `isa` in `T`: runs register-only multiply-adds
/// for about `seconds` and returns GFLOP/s (the best of several rounds).
pub fn fma_peak_gflops<T: Float>(isa: Isa, seconds: f64) -> Result<f64, Error> {
    let isa = crate::dispatch::require(isa)?;
    Ok(peak_gflops(&T::kernel(isa), seconds))
}

/// The ceiling of `isa`'s bf16 kernel's own instruction, as [`fma_peak_gflops`]: `vdpbf16ps`
/// where it multiplies bf16 pairs (counted as the FMAs it replaces), else the f32 FMA.
pub fn bf16_peak_gflops(isa: Isa, seconds: f64) -> Result<f64, Error> {
    let isa = crate::dispatch::require(isa)?;
    Ok(match <Bf16 as Weights<f32>>::kernel_for(isa) {
        Some(kernel) => peak_gflops(&kernel, seconds),
        None => peak_gflops(&f32::kernel(isa), seconds),
    })
}

/// The ceiling of `isa`'s int8 kernel's own instruction, as [`fma_peak_gflops`]: `vpdpbusd`
/// where it multiplies int8 (counted as the FMAs it replaces), else the f32 FMA.
pub fn int8_peak_gflops(isa: Isa, seconds: f64) -> Result<f64, Error> {
    let isa = crate::dispatch::require(isa)?;
    Ok(match <i8 as Weights<f32>>::kernel_for(isa) {
        Some(kernel) => peak_gflops(&kernel, seconds),
        None => peak_gflops(&f32::kernel(isa), seconds),
    })
}

/// GFLOP/s of `kernel`'s peak loop, the best of rounds over about `seconds`. The caller has
/// checked that this CPU supports the kernel's ISA.
fn peak_gflops<W, T: Element>(kernel: &Kernel<W, T>, seconds: f64) -> f64 {
    let lanes = kernel.shape.lanes * kernel.shape.k_group;
    let seed: Vec<T> = vec![T::ZERO; lanes];
    let iterations = 100_000;
    let flops = fma_loop_flops(iterations, lanes) as f64;
    let deadline = Instant::now() + Duration::from_secs_f64(seconds.max(0.0));
    let mut best = 0.0_f64;
    loop {
        let start = Instant::now();
        // SAFETY: the caller checked that this CPU supports the kernel's ISA.
        std::hint::black_box(unsafe { (kernel.peak)(iterations, std::hint::black_box(&seed)) });
        best = best.max(flops / start.elapsed().as_secs_f64() / 1e9);
        if Instant::now() >= deadline {
            return best;
        }
    }
}

/// Whether a multiply-add on half a register costs half as much as on a whole one for `isa`'s
/// float32 kernel: its FMA loop timed against the same loop with every third chain in a half
/// register, alternating runs of a few microseconds, the fastest of each kept, so a preempted run
/// does not decide. False where the register type has no half. The caller has checked that this
/// CPU supports `isa`.
pub fn half_is_cheaper(isa: Isa) -> bool {
    const ITERATIONS: usize = 4096;
    const ROUNDS: usize = 7;
    let kernel = f32::isa_kernel(isa);
    let Some(half) = kernel.peak_half else {
        return false;
    };
    let seed = vec![1.0_f32; kernel.shape.lanes];
    let time = |run: PeakLoop<f32>| {
        let start = Instant::now();
        // SAFETY: the caller guarantees that this CPU supports the kernel's ISA.
        std::hint::black_box(unsafe { run(ITERATIONS, &seed) });
        start.elapsed()
    };
    let (mut best_full, mut best_half) = (Duration::MAX, Duration::MAX);
    for _ in 0..ROUNDS {
        best_full = best_full.min(time(kernel.peak));
        best_half = best_half.min(time(half));
    }
    // 5/6 expected where the half is cheaper, 1 where it is not.
    best_half.as_secs_f64() < 0.92 * best_full.as_secs_f64()
}
