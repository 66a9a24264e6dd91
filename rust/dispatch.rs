//! Picks the kernel for this CPU: detected once, cached, overridable with `FUSEDAE_ISA`.

use std::fmt;
use std::sync::OnceLock;

use crate::kernels::{self, Bf16, Element, Kernel};
use crate::pack::Storage;

/// The instruction sets fusedae has kernels for, best first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Isa {
    Avx512,
    Avx2,
    Neon,
    Scalar,
}

impl Isa {
    pub const ALL: [Isa; 4] = [Isa::Avx512, Isa::Avx2, Isa::Neon, Isa::Scalar];

    pub fn name(self) -> &'static str {
        match self {
            Isa::Avx512 => "avx512",
            Isa::Avx2 => "avx2",
            Isa::Neon => "neon",
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
            // F, BW and VL: every AVX-512 CPU but the Xeon Phi (the bf16 kernel's partial
            // loads take 16-bit masks).
            Isa::Avx512 => {
                std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512bw")
                    && std::arch::is_x86_feature_detected!("avx512vl")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
            }
            #[cfg(not(target_arch = "x86_64"))]
            Isa::Avx512 | Isa::Avx2 => false,
            #[cfg(target_arch = "aarch64")]
            Isa::Neon => std::arch::is_aarch64_feature_detected!("neon"),
            #[cfg(not(target_arch = "aarch64"))]
            Isa::Neon => false,
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
                "unknown ISA {name:?}: expected one of {} (FUSEDAE_ISA)",
                Isa::ALL.map(Isa::name).join(", ")
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

/// How `FUSEDAE_HALF_REGISTERS` may set whether half registers count as cheaper.
const HALF_REGISTERS_VALUES: &str = "on, off or probe";

/// Whether `isa`'s kernels count a multiply-add on half a register as half the cost of a whole
/// one, which changes the forms packing picks (784 -> 42 as 40 + 2 outputs rather than padded
/// to 48), and so the order of some sums. Decided once per process from the CPU's identity, so
/// two processes on one machine compute the same bits whatever the load: true for AVX-512 on
/// AMD family 19h (Zen 4, which runs a 512-bit FMA as two 256-bit halves), false elsewhere
/// (Intel server cores and Zen 5 have full-width 512-bit units). `FUSEDAE_HALF_REGISTERS=on|off`
/// forces it; `=probe` times it instead (load-dependent: for experiments only).
pub fn half_registers_cheaper(isa: Isa) -> bool {
    static SETTING: OnceLock<HalfRegisters> = OnceLock::new();
    static PROBED: OnceLock<bool> = OnceLock::new();
    if f32::isa_kernel(isa).half_register_lanes == 0 {
        return false;
    }
    match SETTING.get_or_init(HalfRegisters::from_env) {
        HalfRegisters::On => true,
        HalfRegisters::Off => false,
        HalfRegisters::Probe => *PROBED.get_or_init(|| crate::probe::half_is_cheaper(isa)),
        // Cached: CPUID traps to the hypervisor in a VM (about 8 us a leaf, measured on a KVM
        // guest), and every chain packed (each training step repacks) asks.
        HalfRegisters::ByCpu => {
            static SPLITS: OnceLock<bool> = OnceLock::new();
            *SPLITS.get_or_init(cpu::splits_512_bit_fma)
        }
    }
}

/// Where [`half_registers_cheaper`] comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum HalfRegisters {
    On,
    Off,
    Probe,
    ByCpu,
}

impl HalfRegisters {
    /// `FUSEDAE_HALF_REGISTERS`; an unknown value is ignored with a warning on stderr (read where
    /// no error can be returned: the first kernel built).
    fn from_env() -> HalfRegisters {
        match std::env::var("FUSEDAE_HALF_REGISTERS") {
            Err(_) => HalfRegisters::ByCpu,
            Ok(value) => match value.trim().to_ascii_lowercase().as_str() {
                "" => HalfRegisters::ByCpu,
                "on" | "1" => HalfRegisters::On,
                "off" | "0" => HalfRegisters::Off,
                "probe" => HalfRegisters::Probe,
                other => {
                    eprintln!(
                        "fusedae: FUSEDAE_HALF_REGISTERS={other:?} ignored (expected \
                         {HALF_REGISTERS_VALUES}); deciding from the CPU"
                    );
                    HalfRegisters::ByCpu
                }
            },
        }
    }
}

/// The CPU's identity, from CPUID.
mod cpu {
    /// Whether this CPU runs a 512-bit FMA as two 256-bit halves: AMD family 19h (Zen 4).
    #[cfg(target_arch = "x86_64")]
    pub fn splits_512_bit_fma() -> bool {
        use std::arch::x86_64::__cpuid;
        // `__cpuid` is safe in the Rust this was written with (1.95) and unsafe in older ones,
        // which `rust-version` still admits.
        #[allow(unused_unsafe)]
        // SAFETY: CPUID exists on every x86-64 CPU; leaves 0 and 1 always do.
        let (vendor, signature) = unsafe { (__cpuid(0), __cpuid(1)) };
        let is_amd = [vendor.ebx, vendor.edx, vendor.ecx]
            .iter()
            .flat_map(|word| word.to_le_bytes())
            .eq(*b"AuthenticAMD");
        let base_family = (signature.eax >> 8) & 0xf;
        let family = if base_family == 0xf {
            base_family + ((signature.eax >> 20) & 0xff)
        } else {
            base_family
        };
        is_amd && family == 0x19
    }

    #[cfg(not(target_arch = "x86_64"))]
    pub fn splits_512_bit_fma() -> bool {
        false
    }
}

/// The values a chain takes, gives and computes in. Its weights may be stored in a narrower type,
/// chosen when it is packed (`Mlp`'s `W`, see [`Weights`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F32,
    F64,
}

impl DType {
    /// As numpy names it.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => f32::NAME,
            DType::F64 => f64::NAME,
        }
    }
}

/// Float types with a kernel per ISA.
pub trait Float: Element {
    const DTYPE: DType;
    /// The precision of a chain whose weights are stored in this type: `"fp32"` or `"fp64"`.
    const PRECISION: &'static str;

    /// The kernel `isa`'s file builds (running it needs `isa.is_supported()`), half registers
    /// not chosen.
    fn isa_kernel(isa: Isa) -> Kernel<Self, Self>;

    /// The kernel for `isa`, with half registers chosen for this CPU.
    fn kernel(isa: Isa) -> Kernel<Self, Self> {
        Self::isa_kernel(isa).with_half_registers(half_registers_cheaper(isa))
    }
}

/// The types a chain computing in `T` can store its weights as, each with a kernel for the ISAs
/// that read them as stored. Every float type stores as itself, on every ISA; bf16 and int8 join
/// here.
pub trait Weights<T: Float>: Storage<T> {
    /// What `fusedae.info()` and errors call this storage: `"fp32"`, `"fp64"`, `"bf16"`.
    const PRECISION: &'static str;
    /// Whether chains stored so can train (keep activations, run a backward): only those
    /// stored in their compute type; the narrower ones are for inference.
    const TRAINS: bool;

    /// The kernel for `isa`, with half registers chosen for this CPU; `None` where `isa` has no
    /// kernel for this storage.
    fn kernel_for(isa: Isa) -> Option<Kernel<Self, T>>;
}

impl<T: Float> Weights<T> for T {
    const PRECISION: &'static str = T::PRECISION;
    const TRAINS: bool = true;

    fn kernel_for(isa: Isa) -> Option<Kernel<T, T>> {
        Some(T::kernel(isa))
    }
}

/// Whether `isa`'s bf16 kernel multiplies bf16 as it is (AVX512_BF16's `vdpbf16ps`), rather than
/// widening the weights to f32 in registers. `FUSEDAE_BF16=widen` forces the widening kernel
/// (to compare the two on one machine); read once per process.
pub fn multiplies_bf16(isa: Isa) -> bool {
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512 {
        // Read once per process, as `FUSEDAE_ISA` is.
        static NATIVE: OnceLock<bool> = OnceLock::new();
        return *NATIVE.get_or_init(|| {
            let forced_off = std::env::var("FUSEDAE_BF16").is_ok_and(|v| v.trim() == "widen");
            !forced_off && std::arch::is_x86_feature_detected!("avx512bf16")
        });
    }
    let _ = isa;
    false
}

/// Whether `isa` runs the bf16 precision on weights stored as bf16 (AVX-512: multiplied as bf16
/// pairs with AVX512_BF16, else widened in registers, which at batch 1 is faster than f32 for
/// the halved bytes) rather than on the f32 kernel with the weights rounded to bf16
/// ([`Mlp::rounded_to_bf16`](crate::mlp::Mlp::rounded_to_bf16)): a widening kernel for AVX2
/// took twice the f32 kernel's time at batch 1 (its 16-bit partial loads) and 7% more at 4096
/// rows on Zen 5, so there is none; NEON's is not written until it can be measured on Graviton
/// or Apple silicon. Same numbers either way, but for the pairs' rounded inputs.
pub fn bf16_weights_narrow(isa: Isa) -> bool {
    isa == Isa::Avx512
}

/// bf16 weights, f32 sums and I/O, on AVX-512 only ([`bf16_weights_narrow`]): multiplied as bf16
/// pairs where the CPU can ([`multiplies_bf16`]: the inputs rounded to bf16 too), else widened
/// to f32 in registers.
impl Weights<f32> for Bf16 {
    const PRECISION: &'static str = "bf16";
    const TRAINS: bool = false;

    fn kernel_for(isa: Isa) -> Option<Kernel<Bf16, f32>> {
        let kernel: Option<Kernel<Bf16, f32>> = match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 if multiplies_bf16(isa) => Some(kernels::avx512::kernel_bf16_pairs()),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => Some(kernels::avx512::kernel_bf16()),
            _ => None,
        };
        kernel.map(|kernel| kernel.with_half_registers(half_registers_cheaper(isa)))
    }
}

/// Whether `isa` multiplies int8 as it is (AVX512_VNNI's `vpdpbusd`, u8 x s8 into i32): the
/// ISAs with an int8 kernel. Elsewhere int8 runs as the f32 kernel on the weights rounded to
/// their int8 values ([`Mlp::rounded_to_int8`](crate::mlp::Mlp::rounded_to_int8)), the inputs
/// left in f32: as fast as fp32, within the same bound (the inputs' rounding is one of its
/// terms).
pub fn multiplies_int8(isa: Isa) -> bool {
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512 {
        return std::arch::is_x86_feature_detected!("avx512vnni");
    }
    let _ = isa;
    false
}

/// int8 weights with a scale per output, inputs quantized per row to u8, i32 sums, f32 I/O: on
/// AVX-512 with VNNI only ([`multiplies_int8`]).
impl Weights<f32> for i8 {
    const PRECISION: &'static str = "int8";
    const TRAINS: bool = false;

    fn kernel_for(isa: Isa) -> Option<Kernel<i8, f32>> {
        #[cfg(target_arch = "x86_64")]
        if multiplies_int8(isa) {
            return Some(kernels::avx512::kernel_int8_quads());
        }
        let _ = isa;
        None
    }
}

impl Float for f32 {
    const DTYPE: DType = DType::F32;
    const PRECISION: &'static str = "fp32";
    fn isa_kernel(isa: Isa) -> Kernel<f32, f32> {
        match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => kernels::avx512::kernel_f32(),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => kernels::avx2::kernel_f32(),
            #[cfg(target_arch = "aarch64")]
            Isa::Neon => kernels::neon::kernel_f32(),
            _ => kernels::scalar::kernel_f32(),
        }
    }
}

impl Float for f64 {
    const DTYPE: DType = DType::F64;
    const PRECISION: &'static str = "fp64";
    fn isa_kernel(isa: Isa) -> Kernel<f64, f64> {
        match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => kernels::avx512::kernel_f64(),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => kernels::avx2::kernel_f64(),
            #[cfg(target_arch = "aarch64")]
            Isa::Neon => kernels::neon::kernel_f64(),
            _ => kernels::scalar::kernel_f64(),
        }
    }
}
