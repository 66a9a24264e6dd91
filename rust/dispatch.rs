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

/// The CPU's vendor as CPUID names it (`"AuthenticAMD"`, `"GenuineIntel"`), or `""` off x86-64:
/// what per-CPU choices that no instruction set tells apart are made from. Read once (CPUID
/// traps to the hypervisor in a VM).
pub fn cpu_vendor() -> &'static str {
    static VENDOR: OnceLock<String> = OnceLock::new();
    VENDOR.get_or_init(cpu::vendor)
}

/// The CPU's identity, from CPUID.
mod cpu {
    /// CPUID leaf 0's vendor string.
    #[cfg(target_arch = "x86_64")]
    pub fn vendor() -> String {
        // `__cpuid` is safe in the Rust this was written with (1.95) and unsafe in older ones,
        // which `rust-version` still admits.
        #[allow(unused_unsafe)]
        // SAFETY: CPUID exists on every x86-64 CPU; leaf 0 always does.
        let leaf = unsafe { std::arch::x86_64::__cpuid(0) };
        let bytes: Vec<u8> = [leaf.ebx, leaf.edx, leaf.ecx]
            .iter()
            .flat_map(|word| word.to_le_bytes())
            .collect();
        String::from_utf8_lossy(&bytes)
            .trim_end_matches('\0')
            .to_owned()
    }

    #[cfg(not(target_arch = "x86_64"))]
    pub fn vendor() -> String {
        String::new()
    }

    /// The CPU's family where its vendor is AMD (CPUID leaf 1), else None.
    #[cfg(target_arch = "x86_64")]
    fn amd_family() -> Option<u32> {
        if super::cpu_vendor() != "AuthenticAMD" {
            return None;
        }
        #[allow(unused_unsafe)]
        // SAFETY: CPUID exists on every x86-64 CPU; leaf 1 always does.
        let signature = unsafe { std::arch::x86_64::__cpuid(1) };
        let base_family = (signature.eax >> 8) & 0xf;
        let family = if base_family == 0xf {
            base_family + ((signature.eax >> 20) & 0xff)
        } else {
            base_family
        };
        Some(family)
    }

    /// Whether this CPU runs a 512-bit FMA as two 256-bit halves: AMD family 19h (Zen 4).
    #[cfg(target_arch = "x86_64")]
    pub fn splits_512_bit_fma() -> bool {
        amd_family() == Some(0x19)
    }

    /// Whether this CPU's `vdpbf16ps` forms bf16 products faster than its FMA forms f32 ones:
    /// AMD's (Zen 4 and 5: one 512-bit instruction a cycle, twice the FMA's products). Intel's
    /// AVX512_BF16 cores run it at half the FMA's rate (an Emerald Rapids VM: 89 against 178
    /// GFLOP/s, `fusedae._native.fma_peak_gflops`), where the pairs form ran at 0.55-0.76x the
    /// f32 kernel's speed from 64 rows up.
    #[cfg(target_arch = "x86_64")]
    pub fn bf16_pairs_outrun_fma() -> bool {
        amd_family().is_some()
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
    /// The widest layer input its kernel sums exactly.
    const MAX_IN_FEATURES: usize = usize::MAX;

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

/// How the bf16 precision runs on AVX-512 (elsewhere always [`Bf16Form::Emulated`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bf16Form {
    /// The bf16-pairs kernel (AVX512_BF16's `vdpbf16ps`, the inputs rounded to bf16 too).
    Pairs,
    /// The f32 kernel's loop nest on weights stored as bf16, widened in registers: half the
    /// bytes, faster than f32 at batch 1 and slower from 64 rows up (measured on Intel: 1.0-1.7x
    /// and 0.85-0.95x).
    Widening,
    /// The f32 kernel on the weights rounded to bf16 and held as f32
    /// ([`Mlp::rounded_to_bf16`](crate::mlp::Mlp::rounded_to_bf16)): as fast as fp32.
    Emulated,
    /// [`Bf16Form::Emulated`] for calls of more than [`PAIRS_MAX_ROWS`] rows, the pairs for
    /// fewer: where `vdpbf16ps` runs at half the FMA's rate (Intel) the pairs lose from 4 rows
    /// up, but a call of one or two rows is bound by the weights' bytes, which they halve.
    PairsForFewRows,
}

/// The most rows a call of a [`Bf16Form::PairsForFewRows`] chain runs on the pairs. Measured on
/// an Intel Emerald Rapids VM (1 thread, pairs against the f32 kernel on rounded weights, in
/// one process): 1 row 1.4-1.7x faster (the seed encoder 1.85 against 3.12 us), 2 rows
/// 1.07-1.22x, 3 rows 0.91-0.99x, 4 rows 0.77-0.91x.
pub const PAIRS_MAX_ROWS: usize = 2;

/// How this process runs bf16 on `isa`, decided once from the CPU: the pairs where `vdpbf16ps`
/// outruns the f32 FMA (AMD); the pairs for calls of a row or two and else the f32 kernel on
/// rounded weights where it does not (Intel's AVX512_BF16); elsewhere that f32 kernel alone,
/// which is never slower than fp32 (a widening kernel for AVX2 took twice the f32 kernel's time
/// at batch 1, its 16-bit partial loads, and 7% more at 4096 rows on Zen 5; the AVX-512 one ran
/// at 0.85-0.95x from 64 rows up on Intel). The same bound holds for each; the numbers differ
/// by the pairs' rounded inputs. `FUSEDAE_BF16=native|widen|emulate` forces one on AVX-512
/// (native only with AVX512_BF16), to compare them or to take the widening kernel's batch-1
/// speed.
pub fn bf16_form(isa: Isa) -> Bf16Form {
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512 {
        static FORM: OnceLock<Bf16Form> = OnceLock::new();
        return *FORM.get_or_init(|| {
            let has_pairs = std::arch::is_x86_feature_detected!("avx512bf16");
            let by_cpu = || match (has_pairs, cpu::bf16_pairs_outrun_fma()) {
                (true, true) => Bf16Form::Pairs,
                (true, false) => Bf16Form::PairsForFewRows,
                (false, _) => Bf16Form::Emulated,
            };
            let Ok(value) = std::env::var("FUSEDAE_BF16") else {
                return by_cpu();
            };
            match value.trim().to_ascii_lowercase().as_str() {
                "" => by_cpu(),
                "native" if has_pairs => Bf16Form::Pairs,
                "widen" => Bf16Form::Widening,
                "emulate" => Bf16Form::Emulated,
                other => {
                    // Read where no error can be returned (the first bf16 chain packed).
                    eprintln!(
                        "fusedae: FUSEDAE_BF16={other:?} ignored (expected native, widen or \
                         emulate; native needs AVX512_BF16); deciding from the CPU"
                    );
                    by_cpu()
                }
            }
        });
    }
    let _ = isa;
    Bf16Form::Emulated
}

/// Whether `isa`'s bf16 chains keep their weights stored as bf16 only (pairs or widening),
/// rather than rounded and held as f32 ([`Bf16Form::Emulated`], and beside the pairs in
/// [`Bf16Form::PairsForFewRows`]).
pub fn bf16_weights_narrow(isa: Isa) -> bool {
    matches!(bf16_form(isa), Bf16Form::Pairs | Bf16Form::Widening)
}

/// bf16 weights, f32 sums and I/O, on AVX-512 only: multiplied as bf16 pairs where
/// [`bf16_form`] says so (the inputs rounded to bf16 too; for few rows only, beside the f32
/// kernel, in [`Bf16Form::PairsForFewRows`]), else widened to f32 in registers.
impl Weights<f32> for Bf16 {
    const PRECISION: &'static str = "bf16";
    const TRAINS: bool = false;

    fn kernel_for(isa: Isa) -> Option<Kernel<Bf16, f32>> {
        let kernel: Option<Kernel<Bf16, f32>> = match (isa, bf16_form(isa)) {
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx512, Bf16Form::Pairs | Bf16Form::PairsForFewRows) => {
                Some(kernels::avx512::kernel_bf16_pairs())
            }
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx512, Bf16Form::Widening) => Some(kernels::avx512::kernel_bf16()),
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
    /// Each output's sum of `in_features` products of a u8 input and an s8 weight (at most
    /// 255 x 127 each) is kept in i32: 66,311 of them fit in any case, one more may not.
    const MAX_IN_FEATURES: usize = i32::MAX as usize / (255 * 127);

    fn kernel_for(isa: Isa) -> Option<Kernel<i8, f32>> {
        #[cfg(target_arch = "x86_64")]
        if multiplies_int8(isa) {
            let kernel = kernels::avx512::kernel_int8_quads();
            return Some(kernel.with_half_registers(half_registers_cheaper(isa)));
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
