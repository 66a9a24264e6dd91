//! fusedae: fused CPU kernels for chains of Linear layers, each followed by a post-op.
//!
//! Modules, from the bottom: `ops` (the post-ops), `kernels` (unsafe SIMD, using only `ops`),
//! `plan` (the cost model: which form each layer takes), `dispatch` (which kernel; the CPU's
//! identity) with `probe` (timings: the FMA ceiling, and the half-register probe `dispatch`
//! runs only when asked), `pack` (weights -> panels), `mlp` (the safe API, threads, scratch),
//! `python` (the PyO3 bindings, the only module that knows Python); `oracle` (the float64
//! reference, for the tests and the fuzzers).

pub mod dispatch;
pub mod kernels;
pub mod mlp;
pub mod ops;
/// The float64 oracle and error bounds, for the tests and the fuzzers (`oracle` feature).
#[cfg(any(test, feature = "oracle"))]
pub mod oracle;
pub mod pack;
pub mod plan;
pub mod probe;
#[cfg(feature = "python")]
mod python;
pub mod threads;

pub use dispatch::Isa;
pub use mlp::{AnyMlp, DType, Error, LayerSpec, Mlp};
pub use ops::PostOp;
