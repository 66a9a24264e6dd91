//! Picks the kernel for this CPU: detected once, cached, overridable with `FUSEDAE_ISA`.

use std::cell::RefCell;
use std::fmt;
use std::sync::OnceLock;
use std::thread::LocalKey;

use crate::kernels::{self, Element, Kernel};

/// The instruction sets fusedae has kernels for, best first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Isa {
    Avx512,
    Avx2,
    Scalar,
}

impl Isa {
    pub const ALL: [Isa; 3] = [Isa::Avx512, Isa::Avx2, Isa::Scalar];

    pub fn name(self) -> &'static str {
        match self {
            Isa::Avx512 => "avx512",
            Isa::Avx2 => "avx2",
            Isa::Scalar => "scalar",
        }
    }

    pub fn parse(name: &str) -> Result<Isa, IsaError> {
        Isa::ALL
            .into_iter()
            .find(|isa| isa.name() == name.trim().to_ascii_lowercase())
            .ok_or_else(|| IsaError::Unknown(name.to_owned()))
    }

    /// Whether this CPU (and this build's target) can run the kernel.
    pub fn is_supported(self) -> bool {
        match self {
            Isa::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => std::arch::is_x86_feature_detected!("avx512f"),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
            }
            #[cfg(not(target_arch = "x86_64"))]
            Isa::Avx512 | Isa::Avx2 => false,
        }
    }

    /// The best supported ISA.
    pub fn detect() -> Isa {
        Isa::ALL
            .into_iter()
            .find(|isa| isa.is_supported())
            .unwrap_or(Isa::Scalar)
    }
}

impl fmt::Display for Isa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IsaError {
    Unknown(String),
    Unsupported(Isa),
}

impl fmt::Display for IsaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IsaError::Unknown(name) => write!(
                f,
                "unknown ISA {name:?}: expected one of avx512, avx2, scalar (FUSEDAE_ISA)"
            ),
            IsaError::Unsupported(isa) => write!(
                f,
                "ISA {isa} was requested but this CPU does not support it; supported: {}",
                available()
                    .iter()
                    .map(|i| i.name())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }
}

impl std::error::Error for IsaError {}

/// Every ISA this CPU can run, best first.
pub fn available() -> Vec<Isa> {
    Isa::ALL
        .into_iter()
        .filter(|isa| isa.is_supported())
        .collect()
}

/// Checks that `isa` can run here.
pub fn require(isa: Isa) -> Result<Isa, IsaError> {
    if isa.is_supported() {
        Ok(isa)
    } else {
        Err(IsaError::Unsupported(isa))
    }
}

/// The ISA every new plan uses: `FUSEDAE_ISA` if set (an error if this CPU lacks it), else the
/// best one detected. Read once per process.
pub fn selected() -> Result<Isa, IsaError> {
    static SELECTED: OnceLock<Result<Isa, IsaError>> = OnceLock::new();
    SELECTED
        .get_or_init(|| match std::env::var("FUSEDAE_ISA") {
            Ok(name) if !name.trim().is_empty() => Isa::parse(&name).and_then(require),
            _ => Ok(Isa::detect()),
        })
        .clone()
}

/// Whether `isa`'s kernels count a half register as half the cost of a whole one (measured once;
/// see `TileShape::half_lanes`), which changes the forms packing picks.
pub fn half_registers_cheaper(isa: Isa) -> bool {
    f32::kernel(isa).shape.half_lanes > 0
}

/// Float types with a kernel per ISA.
pub trait Float: Element {
    /// The kernel for `isa` (running it needs `isa.is_supported()`).
    fn kernel(isa: Isa) -> Kernel<Self>;
    /// This thread's reusable scratch buffer for the kernels.
    fn scratch() -> &'static LocalKey<RefCell<Vec<Self>>>;
}

thread_local! {
    static SCRATCH_F32: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    static SCRATCH_F64: RefCell<Vec<f64>> = const { RefCell::new(Vec::new()) };
}

impl Float for f32 {
    fn kernel(isa: Isa) -> Kernel<f32> {
        match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => kernels::avx512::kernel_f32(),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => kernels::avx2::kernel_f32(),
            _ => kernels::scalar::kernel_f32(),
        }
    }

    fn scratch() -> &'static LocalKey<RefCell<Vec<f32>>> {
        &SCRATCH_F32
    }
}

impl Float for f64 {
    fn kernel(isa: Isa) -> Kernel<f64> {
        match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => kernels::avx512::kernel_f64(),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => kernels::avx2::kernel_f64(),
            _ => kernels::scalar::kernel_f64(),
        }
    }

    fn scratch() -> &'static LocalKey<RefCell<Vec<f64>>> {
        &SCRATCH_F64
    }
}
