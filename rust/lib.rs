//! fusedae: fused CPU kernels for chains of Linear layers, each followed by a post-op.
//!
//! Modules, from the bottom: `ops` (the post-ops), `kernels` (unsafe SIMD, using only `ops`),
//! `plan` (the cost model: which form each layer takes), `dispatch` (which kernel; the CPU's
//! identity) with `probe` (timings: the FMA ceiling, and the half-register probe `dispatch`
//! runs only when asked), `pack` (weights -> panels), `mlp` (the safe API, threads, scratch),
//! `python` (the PyO3 bindings, the only module that knows Python).

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
