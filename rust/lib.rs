//! fusedae: fused CPU kernels for chains of Linear layers, each followed by a post-op.
//!
//! Layers, each using only those below it: `ops` (the post-ops), `kernels` (unsafe SIMD),
//! `plan` (the cost model: which form each layer takes), `dispatch` (which kernel; the CPU's
//! identity), `probe` (timings, opt-in), `pack` (weights -> panels), `mlp` (the safe API,
//! threads, scratch), `python` (the PyO3 bindings).

pub mod dispatch;
pub mod kernels;
pub mod mlp;
pub mod ops;
pub mod pack;
pub mod plan;
pub mod probe;
#[cfg(feature = "python")]
mod python;
pub mod threads;

pub use dispatch::Isa;
pub use mlp::{AnyMlp, DType, Error, LayerSpec, Mlp};
pub use ops::PostOp;
