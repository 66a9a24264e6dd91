//! fusedae: fused CPU kernels for chains of Linear layers with ReLU or identity between them.
//!
//! Layers, each using only those below it: `kernels` (unsafe SIMD), `dispatch` (which kernel),
//! `pack` (weights -> panels), `mlp` (the safe API, threads), `python` (the PyO3 bindings).

pub mod dispatch;
pub mod kernels;
pub mod mlp;
pub mod pack;
#[cfg(feature = "python")]
mod python;
pub mod threads;

pub use dispatch::Isa;
pub use mlp::{Error, LayerSpec, Mlp};
pub use pack::Activation;
