//! Microkernels for a fused chain of Linear layers: the only place with `unsafe` SIMD.
//!
//! # Contract
//!
//! Each ISA file (`scalar.rs`, `avx2.rs`, `avx512.rs`) exports `kernel_f32()` and `kernel_f64()`,
//! returning a [`Kernel`]: a [`TileShape`] that says how weights must be packed for it, and a
//! [`ChainKernel`] function that runs the whole chain for a contiguous run of rows.
//!
//! All layers of a chain live in one packed buffer; a [`LayerDesc`] says where each one sits.
//! Weights of a layer `[out, in]` are packed into column panels of at most `nv_max * lanes`
//! outputs (the last panel may be narrower, and need not be a multiple of `lanes`): panel `p`
//! starts at output column `c0 = p * nv_max * lanes`, at `weights_at + c0 * in`, and stores its
//! `width` columns k-major (`in` rows of `width` values). A panel's last register is loaded
//! masked when `width` is not a multiple of `lanes`, so the outputs are computed up to
//! `padded_out`, a multiple of `lanes`, with zeros past `out` (or only up to the end of a half
//! register, see below: the rest of such a row is never written, and never read); the bias
//! (`padded_out` values, zero-padded) is at `bias_at`.
//!
//! A layer's last outputs may instead be in dot-product form (see [`TileShape::dot_from`]):
//! outputs `dot_from..out` keep their weights row-major at `dot_at`, rows of `in` values padded
//! with zeros to whole registers ([`padded`]), and each is a horizontal sum of lane-wise products.
//! Panels then cover only the outputs before `dot_from`, a multiple of `lanes` (or, where half a
//! register costs half, of [`TileShape::half_lanes`]), and nothing is padded (`padded_out ==
//! out`). A layer of very few outputs is all dot form (`dot_from == 0`); a wide one with a short
//! tail and few inputs per output may be split (130 -> 97: 96 + 1; on Zen 4, 784 -> 42: 40 + 2).
//!
//! A register tile's last register runs in its low half ([`SimdVec::HALF_LANES`]) when its
//! outputs fit there: multiply-adds, bias and stores all cover that half only.
//!
//! A chain of narrow layers on an ISA with a register transpose may also be packed a second
//! time, every layer as rows ([`Packed::lanes_layers`], see [`TileShape::rows_in_lanes`]): whole
//! blocks of `nv_max * lanes` batch rows then run with the rows in the lanes, so no output is
//! padded (64 -> 42 -> 2 at 4096 rows: 75% -> 85% of the FMA peak); the other rows, and every
//! small batch, run as above.
//!
//! The ISA files only implement [`SimdVec`] and wrap [`forward_rows`] in a thin
//! `#[target_feature]` function; the loop nest lives once, here.

pub mod scalar;

#[cfg(target_arch = "x86_64")]
pub mod avx2;
#[cfg(target_arch = "x86_64")]
pub mod avx512;

use std::fmt::Debug;
use std::ops::{Add, Mul};

/// The float types the kernels compute in.
pub trait Element:
    Copy
    + Default
    + Debug
    + Send
    + Sync
    + PartialOrd
    + Add<Output = Self>
    + Mul<Output = Self>
    + 'static
{
    const ZERO: Self;
    /// `"float32"` or `"float64"`, as numpy names it.
    const NAME: &'static str;
}

impl Element for f32 {
    const ZERO: Self = 0.0;
    const NAME: &'static str = "float32";
}

impl Element for f64 {
    const ZERO: Self = 0.0;
    const NAME: &'static str = "float64";
}

/// One SIMD register of `LANES` elements. Every method is only called from inside a
/// `#[target_feature]` wrapper whose features cover the instructions it uses.
pub trait SimdVec: Copy {
    type Elem: Element;
    const LANES: usize;

    /// # Safety
    /// The CPU supports the ISA of the implementation.
    unsafe fn zero() -> Self;
    /// Broadcast `*ptr` to every lane.
    ///
    /// # Safety
    /// `ptr` is valid for one read; the CPU supports the ISA.
    unsafe fn splat(ptr: *const Self::Elem) -> Self;
    /// # Safety
    /// `ptr` is valid for `LANES` reads (no alignment needed); the CPU supports the ISA.
    unsafe fn load(ptr: *const Self::Elem) -> Self;
    /// # Safety
    /// `ptr` is valid for `LANES` writes (no alignment needed); the CPU supports the ISA.
    unsafe fn store(self, ptr: *mut Self::Elem);
    /// `self * b + acc`.
    ///
    /// # Safety
    /// The CPU supports the ISA.
    unsafe fn mul_add(self, b: Self, acc: Self) -> Self;
    /// # Safety
    /// The CPU supports the ISA.
    unsafe fn add(self, b: Self) -> Self;
    /// Loads the first `count < LANES` values at `ptr`, zeros in the other lanes.
    ///
    /// # Safety
    /// `ptr` is valid for `count` reads; the CPU supports the ISA.
    unsafe fn load_partial(ptr: *const Self::Elem, count: usize) -> Self;
    /// The sum of the lanes.
    ///
    /// # Safety
    /// The CPU supports the ISA.
    unsafe fn sum(self) -> Self::Elem;
    /// Hints that `ptr` will be read soon; never faults, whatever the address.
    ///
    /// # Safety
    /// The CPU supports the ISA.
    unsafe fn prefetch(ptr: *const Self::Elem);
    /// Hints that `ptr` will be read later: fetched into L2 only, so it does not evict what L1
    /// holds now; never faults, whatever the address.
    ///
    /// # Safety
    /// The CPU supports the ISA.
    unsafe fn prefetch_to_l2(ptr: *const Self::Elem);
    /// `max(0, x)` that keeps NaN as NaN, like `torch.relu`.
    ///
    /// # Safety
    /// The CPU supports the ISA.
    unsafe fn relu(self) -> Self;

    /// Lanes of the register's low half where the ISA has a narrower register for it (AVX-512:
    /// a ymm), 0 where it has none. A tile's last register uses the half when its outputs fit:
    /// never slower, and on CPUs that run a 512-bit FMA as two 256-bit halves (Zen 4) it costs
    /// half as much (see [`TileShape::half_lanes`]).
    const HALF_LANES: usize = 0;

    /// `self * b + acc` in the low [`SimdVec::HALF_LANES`] lanes; the other lanes of the result
    /// are unspecified.
    ///
    /// # Safety
    /// The CPU supports the ISA; only called where `HALF_LANES > 0`.
    #[inline(always)]
    unsafe fn mul_add_half(self, b: Self, acc: Self) -> Self {
        // SAFETY: forwarded from the caller.
        unsafe { self.mul_add(b, acc) }
    }

    /// Stores the low [`SimdVec::HALF_LANES`] lanes.
    ///
    /// # Safety
    /// `ptr` is valid for `HALF_LANES` writes; the CPU supports the ISA.
    #[inline(always)]
    unsafe fn store_half(self, _ptr: *mut Self::Elem) {
        assert!(
            Self::HALF_LANES == 0,
            "a type with a half register implements store_half"
        );
    }

    /// Whether [`SimdVec::transpose_square`] works in registers, fast enough for a chain to run
    /// with batch rows in the lanes (see [`TileShape::rows_in_lanes`]).
    const FAST_TRANSPOSE: bool = false;

    /// `dst[c * ldd + r] = src[r * lds + c]` for `r, c < LANES`.
    ///
    /// # Safety
    /// `src` is valid for reading `LANES` rows of `LANES` values `lds` apart, `dst` for writing
    /// `LANES` rows of `LANES` values `ldd` apart, and they do not overlap; the CPU supports
    /// the ISA.
    #[inline(always)]
    unsafe fn transpose_square(
        src: *const Self::Elem,
        lds: usize,
        dst: *mut Self::Elem,
        ldd: usize,
    ) {
        for r in 0..Self::LANES {
            for c in 0..Self::LANES {
                // SAFETY: `r, c < LANES`, inside both blocks as the caller guarantees.
                unsafe { *dst.add(c * ldd + r) = *src.add(r * lds + c) };
            }
        }
    }
}

/// How a kernel tiles its work; packing follows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TileShape {
    /// Elements per SIMD register.
    pub lanes: usize,
    /// Batch rows per register tile.
    pub mr: usize,
    /// Most registers of outputs per register tile (a panel is `nv_max * lanes` outputs wide).
    pub nv_max: usize,
    /// Rows run through the whole chain before the next block starts (a multiple of `mr`).
    pub block_rows: usize,
    /// The register type's [`SimdVec::FAST_TRANSPOSE`].
    pub fast_transpose: bool,
    /// The register type's [`SimdVec::HALF_LANES`] where a multiply-add on the half costs half
    /// as much as on the whole register (measured: Zen 4 runs a 512-bit FMA as two 256-bit
    /// ones), else 0. Only the choice of forms depends on it, never a result's correctness.
    pub half_lanes: usize,
}

impl TileShape {
    pub fn panel_width(&self) -> usize {
        self.nv_max * self.lanes
    }

    pub fn padded(&self, width: usize) -> usize {
        padded(width, self.lanes)
    }

    /// The first output computed in dot-product form (`out_features` if none is): the outputs
    /// past the last whole register (or, with a cheaper [`TileShape::half_lanes`], past the last
    /// half register) go to dot form when that costs less than computing them in a padded
    /// register for every `k` (see `panel_cost`; a tie keeps the padding, then the split at
    /// whole registers). 784 -> 42 on Zen 4: 40 in panels (the last register a half) and 2 in
    /// dot form; 42 -> 2: all dot form.
    pub fn dot_from(&self, in_features: usize, out_features: usize) -> usize {
        let whole = out_features / self.lanes * self.lanes;
        let after_half = whole + self.half_lanes;
        [out_features, whole, after_half]
            .into_iter()
            .filter(|&split| split <= out_features)
            .min_by_key(|&split| {
                let dot_cost =
                    (out_features - split) * self.lanes * self.dot_output_cost(in_features);
                self.panel_cost(in_features, split) + dot_cost
            })
            .expect("at least one split")
    }

    /// Multiply-adds of one lane, per row, for `width` outputs of `in_features` inputs in
    /// panels: whole registers, the last one a half where it fits in one and that is cheaper.
    /// A half register alone in its panel counts whole: its input broadcasts, not its
    /// multiply-adds, bound it (42 -> 2 at 40 rows: 0.58 us, against 0.27 us in dot form).
    fn panel_cost(&self, in_features: usize, width: usize) -> usize {
        let whole = width / self.lanes * self.lanes;
        let last_panel = width - width.saturating_sub(1) / self.panel_width() * self.panel_width();
        let last = match width - whole {
            0 => 0,
            tail if tail <= self.half_lanes && last_panel > self.lanes => self.half_lanes,
            _ => self.lanes,
        };
        in_features * (whole + last)
    }

    /// One dot-form output of `in_features` inputs, in padded multiply-adds: measured on Zen 4,
    /// a dot-form multiply-add costs about three padded ones (two loads each, and the input rows
    /// reread per output tile), plus a horizontal sum.
    fn dot_output_cost(&self, in_features: usize) -> usize {
        DOT_FMA_COST * self.padded(in_features) / self.lanes + DOT_SUM_COST
    }

    /// A layer's `(dot_from, padded_out)`: where its dot-form outputs start, and the row stride
    /// of its outputs (whole registers, unless part of it is in dot form). With rows in the lanes
    /// every layer is packed as dot-form rows and nothing is padded.
    pub fn form(
        &self,
        in_features: usize,
        out_features: usize,
        rows_in_lanes: bool,
    ) -> (usize, usize) {
        if rows_in_lanes {
            return (0, out_features);
        }
        let dot_from = self.dot_from(in_features, out_features);
        if dot_from < out_features {
            (dot_from, out_features)
        } else {
            (dot_from, self.padded(out_features))
        }
    }

    /// Batch rows in one rows-in-lanes block: a register tile's width.
    pub fn lanes_block(&self) -> usize {
        self.panel_width()
    }

    /// Whether a chain of these widths runs with batch rows in the lanes: the input block
    /// transposed to `in x rows`, each layer computing `out x rows` from row-major weights
    /// broadcast one at a time, the output transposed back. No output is padded to a whole
    /// register (a 42-wide layer does 42/48 of the multiply-adds), at the price of the two
    /// transposes, so only where that saves more than it costs, counted in multiply-adds of
    /// one lane per row.
    pub fn rows_in_lanes(&self, widths: &[usize], value_bytes: usize) -> bool {
        // A block's activations (`width x lanes_block` values) must stay in L1: streaming them
        // from L2 for every tile of outputs loses more than the padding costs (784 -> 42 did).
        let fits_l1 = |width: usize| width * self.lanes_block() * value_bytes <= L1_HALF_BYTES;
        if !self.fast_transpose || widths.len() < 2 || !widths.iter().all(|&w| fits_l1(w)) {
            return false;
        }
        let mut saved = 0;
        for pair in widths.windows(2) {
            let (k, out) = (pair[0], pair[1]);
            let dot_from = self.dot_from(k, out);
            let dot_cost = (out - dot_from) * self.lanes * self.dot_output_cost(k);
            let now = self.panel_cost(k, dot_from) + dot_cost;
            saved += now.saturating_sub(k * out);
        }
        let transposed = widths[0] + widths[widths.len() - 1];
        saved > transposed * TRANSPOSE_COST
    }
}

/// A dot-form multiply-add and a horizontal sum, in padded multiply-adds, for
/// [`TileShape::dot_from`].
const DOT_FMA_COST: usize = 3;
const DOT_SUM_COST: usize = 8;
/// Transposing one value, in multiply-adds of one lane, for [`TileShape::rows_in_lanes`].
const TRANSPOSE_COST: usize = 3;
/// Half of a 32 KiB L1: the most a weight panel kept per row tile, or a rows-in-lanes block of
/// activations, may take.
const L1_HALF_BYTES: usize = 16 << 10;

/// `width` rounded up to whole registers of `lanes`.
pub fn padded(width: usize, lanes: usize) -> usize {
    width.div_ceil(lanes) * lanes
}

/// Where one packed layer sits in its chain's buffer (see the module docs for the layout).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LayerDesc {
    pub in_features: usize,
    pub out_features: usize,
    pub padded_out: usize,
    pub weights_at: usize,
    pub bias_at: usize,
    pub relu: bool,
    /// Outputs from here on are in dot-product form (see the module docs).
    pub dot_from: usize,
    /// Where the dot-form weight rows start.
    pub dot_at: usize,
}

/// A packed chain: its layers and the buffer they point into.
#[derive(Clone, Copy, Debug)]
pub struct Packed<'a, T> {
    pub layers: &'a [LayerDesc],
    pub data: &'a [T],
    /// The same layers packed again for batch rows in the lanes ([`TileShape::rows_in_lanes`]),
    /// each as dot-form rows (`dot_from == 0`, `padded_out == out`); empty if not worth it.
    pub lanes_layers: &'a [LayerDesc],
}

/// Independent multiply-add chains in [`fma_loop`]: enough to cover FMA latency x issue width.
const PEAK_CHAINS: usize = 12;

/// The FMA-throughput ceiling: `iterations x PEAK_CHAINS` independent register FMAs and nothing
/// else. Returns a value that depends on every FMA, so none is optimised away. With
/// `HALF_CHAINS`, every third chain runs in the registers' low half ([`SimdVec::mul_add_half`]):
/// as fast as without where a half costs as much as a whole register, 5/6 of the time where it
/// costs half (see [`half_is_cheaper`]).
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

/// Whether a multiply-add on half a register costs half as much as on a whole one, timed
/// with `full` ([`fma_loop`]) against `half` (the same with `HALF_CHAINS`) for the same ISA: alternating
/// runs of a few microseconds, the fastest of each kept, so a preempted run does not decide.
///
/// # Safety
/// The CPU supports the ISA of both loops.
pub unsafe fn half_is_cheaper<T: Element>(
    full: PeakLoop<T>,
    half: PeakLoop<T>,
    seed: &[T],
) -> bool {
    const ITERATIONS: usize = 4096;
    const ROUNDS: usize = 7;
    let time = |run: PeakLoop<T>| {
        let start = std::time::Instant::now();
        // SAFETY: the caller guarantees the ISA.
        std::hint::black_box(unsafe { run(ITERATIONS, seed) });
        start.elapsed()
    };
    let (mut best_full, mut best_half) = (std::time::Duration::MAX, std::time::Duration::MAX);
    for _ in 0..ROUNDS {
        best_full = best_full.min(time(full));
        best_half = best_half.min(time(half));
    }
    // 5/6 expected where the half is cheaper, 1 where it is not.
    best_half.as_secs_f64() < 0.92 * best_full.as_secs_f64()
}

/// Floating-point operations one call of [`fma_loop`] performs.
pub fn fma_loop_flops(iterations: usize, lanes: usize) -> usize {
    2 * lanes * PEAK_CHAINS * (iterations + 1)
}

/// Runs the chain on `input` (`rows x layers[0].in_features`, row-major) into `output`
/// (`rows x last.out_features`), using `scratch` (at least [`scratch_len`] elements). The
/// shape is the kernel's own ([`Kernel::shape`]), or that with another `half_lanes` (0 or the
/// register's half): the packing follows it, the register tiles do not depend on it.
///
/// # Safety
/// The CPU supports the kernel's ISA. (The shape, the packing, the shapes and the lengths are
/// checked, with a panic on mismatch.)
pub type ChainKernel<T> = unsafe fn(&TileShape, Packed<'_, T>, &[T], &mut [T], &mut [T]);

/// Runs [`fma_loop`] for an ISA: `(iterations, seed) -> value`.
///
/// # Safety
/// The CPU supports the kernel's ISA.
pub type PeakLoop<T> = unsafe fn(usize, &[T]) -> T;

#[derive(Clone, Copy, Debug)]
pub struct Kernel<T: 'static> {
    pub shape: TileShape,
    pub forward: ChainKernel<T>,
    pub peak: PeakLoop<T>,
}

/// Scratch elements a kernel of `shape` needs to run `rows` rows through `chain`.
pub fn scratch_len<T>(shape: &TileShape, chain: &Packed<'_, T>, rows: usize) -> usize {
    let widest = chain.layers.iter().map(|l| l.padded_out).max().unwrap_or(0);
    let in_registers_of_outputs = 2 * rows.min(shape.block_rows) * widest;
    match chain.lanes_layers.first() {
        Some(first) => {
            let widest = chain.lanes_layers.iter().map(|l| l.out_features).max();
            let in_lanes = shape.lanes_block() * (first.in_features + 2 * widest.unwrap_or(0));
            in_lanes.max(in_registers_of_outputs)
        }
        None => in_registers_of_outputs,
    }
}

/// Panics unless the chain, buffers and packing agree; after it, every pointer the loop nest
/// forms stays inside its slice.
fn check_chain<T>(
    shape: &TileShape,
    chain: &Packed<'_, T>,
    input: &[T],
    output: &[T],
    scratch: &[T],
) -> usize {
    let layers = chain.layers;
    let first = layers.first().expect("a chain has at least one layer");
    let last = layers.last().expect("a chain has at least one layer");
    assert!(first.in_features > 0, "layers have at least one input");
    assert!(
        input.len().is_multiple_of(first.in_features),
        "input is whole rows"
    );
    let rows = input.len() / first.in_features;
    assert_eq!(
        output.len(),
        rows * last.out_features,
        "output matches the input rows"
    );
    for pair in layers.windows(2) {
        assert_eq!(pair[0].out_features, pair[1].in_features, "layers chain");
    }
    if !chain.lanes_layers.is_empty() {
        assert_eq!(
            chain.lanes_layers.len(),
            layers.len(),
            "both packings hold every layer"
        );
        for (lanes_layer, layer) in chain.lanes_layers.iter().zip(layers) {
            assert!(
                (lanes_layer.in_features, lanes_layer.out_features)
                    == (layer.in_features, layer.out_features),
                "same layers"
            );
        }
    }
    let in_lanes = layers.iter().map(|layer| (layer, false));
    for (layer, rows_in_lanes) in in_lanes.chain(chain.lanes_layers.iter().map(|l| (l, true))) {
        let (k, out) = (layer.in_features, layer.out_features);
        let (dot_from, padded_out) = shape.form(k, out, rows_in_lanes);
        assert!(
            layer.padded_out == padded_out && layer.dot_from == dot_from,
            "packed for this ISA"
        );
        assert!(
            layer.weights_at + k * dot_from <= chain.data.len()
                && layer.dot_at + (out - dot_from) * shape.padded(k) <= chain.data.len(),
            "packed weights in the buffer"
        );
        assert!(
            layer.bias_at + layer.padded_out <= chain.data.len(),
            "packed bias in the buffer"
        );
    }
    assert!(
        scratch.len() >= scratch_len(shape, chain, rows),
        "scratch is large enough"
    );
    rows
}

/// The fused loop nest, generic over the register type; ISA files wrap it in `#[target_feature]`.
///
/// Whole blocks of rows go through `forward_rows_in_lanes` where the chain has that packing;
/// the other rows run block by block, each layer's panel outputs register tile by register tile
/// (panel by panel, so a large panel stays in cache while every tile of the block uses it, or
/// row tile by row tile when the panels fit L1), then its dot-form outputs. Hidden activations
/// go to `scratch` (two ping-pong buffers that stay in L1/L2), never to the caller.
///
/// # Safety
/// The CPU supports `V`'s ISA, and `shape.lanes == V::LANES`, `shape.mr == MR`,
/// `shape.nv_max == NV_MAX`.
#[inline(always)]
pub unsafe fn forward_rows<V: SimdVec, const MR: usize, const NV_MAX: usize>(
    shape: &TileShape,
    chain: Packed<'_, V::Elem>,
    input: &[V::Elem],
    output: &mut [V::Elem],
    scratch: &mut [V::Elem],
) {
    assert!(shape.lanes == V::LANES && shape.mr == MR && shape.nv_max == NV_MAX);
    assert!(shape.half_lanes == 0 || shape.half_lanes == V::HALF_LANES);
    assert!(MR <= 8 && NV_MAX <= 4 && shape.block_rows.is_multiple_of(MR));
    let rows = check_chain(shape, &chain, input, output, scratch);
    let layers = chain.layers;
    if rows == 0 {
        return;
    }
    // Whole blocks of rows-in-lanes rows where that packing exists; the rest (a small batch, the
    // last rows) in registers of outputs.
    let lanes_block = shape.lanes_block();
    let lanes_rows = if chain.lanes_layers.is_empty() {
        0
    } else {
        rows / lanes_block * lanes_block
    };
    let out_features = layers[layers.len() - 1].out_features;
    let (lanes_input, input) = input.split_at(lanes_rows * layers[0].in_features);
    let (lanes_output, output) = output.split_at_mut(lanes_rows * out_features);
    if lanes_rows > 0 {
        // SAFETY: as for this function; `check_chain` proved the sizes of both packings.
        unsafe {
            forward_rows_in_lanes::<V, MR, NV_MAX>(
                &chain,
                lanes_block,
                lanes_rows,
                lanes_input,
                lanes_output,
                scratch,
            )
        };
    }
    let rows = rows - lanes_rows;
    if rows == 0 {
        return;
    }
    let last_index = layers.len() - 1;
    let block_rows = rows.min(shape.block_rows);
    let widest = layers.iter().map(|l| l.padded_out).max().unwrap_or(0);
    let (ping, rest) = scratch.split_at_mut(block_rows * widest);
    let pong = &mut rest[..block_rows * widest];

    for block_start in (0..rows).step_by(block_rows) {
        let block = block_rows.min(rows - block_start);
        let block_input =
            &input[block_start * layers[0].in_features..][..block * layers[0].in_features];
        let mut src: *const V::Elem = block_input.as_ptr();
        let mut src_stride = layers[0].in_features;
        let mut into_ping = true;
        for (index, layer) in layers.iter().enumerate() {
            let is_last = index == last_index;
            let direct = is_last && layer.padded_out == layer.out_features;
            let (dst, dst_stride): (*mut V::Elem, usize) = if direct {
                let block_output =
                    &mut output[block_start * out_features..][..block * out_features];
                (block_output.as_mut_ptr(), out_features)
            } else if into_ping {
                (ping.as_mut_ptr(), layer.padded_out)
            } else {
                (pong.as_mut_ptr(), layer.padded_out)
            };
            let at = Placement {
                layer,
                data: chain.data,
                rows: block,
                src,
                src_stride,
                dst,
                dst_stride,
                dst_is_output: direct,
            };
            // SAFETY: `check_chain` proved the packed sizes; `src` holds `block` rows of at least
            // `layer.in_features` values at `src_stride`, `dst` has room for `block` rows of
            // `layer.padded_out` values at `dst_stride` (or exactly `out_features` when direct,
            // which then equals `padded_out`); the caller guarantees the ISA.
            unsafe {
                layer_block::<V, MR, NV_MAX>(&at);
                dot_layer_block::<V>(&at);
            };
            if is_last && !direct {
                let hidden = if into_ping { &ping[..] } else { &pong[..] };
                let block_output =
                    &mut output[block_start * out_features..][..block * out_features];
                for (out_row, row) in block_output
                    .chunks_exact_mut(out_features)
                    .zip(hidden.chunks_exact(layer.padded_out))
                {
                    out_row.copy_from_slice(&row[..out_features]);
                }
            }
            src = dst;
            src_stride = dst_stride;
            into_ping = !into_ping;
        }
    }
}

/// The chain with batch rows in the lanes, one block of `NV_MAX * LANES` rows at a time: the
/// block's input transposed into scratch, each layer's `out x rows` computed by the same register
/// tiles with the roles swapped (a weight broadcast per tile row, a register of rows per
/// column), the last layer's transposed back into the output rows.
///
/// # Safety
/// As for [`forward_rows`], for a chain with `lanes_layers`, after `check_chain`.
#[inline(always)]
unsafe fn forward_rows_in_lanes<V: SimdVec, const MR: usize, const NV_MAX: usize>(
    chain: &Packed<'_, V::Elem>,
    block: usize,
    rows: usize,
    input: &[V::Elem],
    output: &mut [V::Elem],
    scratch: &mut [V::Elem],
) {
    debug_assert!(block == NV_MAX * V::LANES && rows.is_multiple_of(block));
    let layers = chain.lanes_layers;
    let first_in = layers[0].in_features;
    let out_features = layers[layers.len() - 1].out_features;
    let widest = layers.iter().map(|l| l.out_features).max().unwrap_or(0);
    let (transposed_input, rest) = scratch.split_at_mut(block * first_in);
    let (ping, rest) = rest.split_at_mut(block * widest);
    let pong = &mut rest[..block * widest];
    let line = 64 / std::mem::size_of::<V::Elem>();
    for block_start in (0..rows).step_by(block) {
        // SAFETY: the input holds `rows` (whole blocks of) rows of `first_in` values and
        // `transposed_input` has `first_in` rows of `block` values; in the layer loop, `src`
        // holds `in_features` rows of `block` values and `dst` room for `out_features` such
        // rows, the packed rows and biases are in bounds (`check_chain`), and every tile covers
        // `NV_MAX` registers = `block` columns; the output has `block` rows of `out_features`
        // values from `block_start`.
        unsafe {
            transpose::<V>(
                input.as_ptr().add(block_start * first_in),
                first_in,
                block,
                first_in,
                transposed_input.as_mut_ptr(),
                block,
            );
            // The next block's input lines, fetched into L2 a few per tile of the first layer,
            // so they are in cache when its transpose reads them: on a batch streaming from
            // memory the transposes' strided reads stall on every line (digits at 4096 rows
            // from 256 MB: 354 -> 260 us). Into L1 they evicted this block's working set (272
            // us); all at once came later (335 us); two blocks ahead gained nothing.
            let next_rows = rows - block_start - block;
            let next = input
                .as_ptr()
                .wrapping_add((block_start + block) * first_in);
            let lines = (next_rows.min(block) * first_in).div_ceil(line);
            let mut src: *const V::Elem = transposed_input.as_ptr();
            let mut into_ping = true;
            for (index, layer) in layers.iter().enumerate() {
                let dst = if into_ping {
                    ping.as_mut_ptr()
                } else {
                    pong.as_mut_ptr()
                };
                let out = layer.out_features;
                // Even tiles: 42 outputs as 6 tiles of 7, not 5 of 8 and one of 2.
                let tile_outs = out.div_ceil(out.div_ceil(MR));
                let weights = chain.data.as_ptr().add(layer.dot_at);
                let lda = padded(layer.in_features, V::LANES);
                let tiles = out.div_ceil(tile_outs);
                for (t, first) in (0..out).step_by(tile_outs).enumerate() {
                    if index == 0 {
                        for l in t * lines / tiles..(t + 1) * lines / tiles {
                            V::prefetch_to_l2(next.wrapping_add(l * line));
                        }
                    }
                    let tile = Tile {
                        a: weights.add(first * lda),
                        lda,
                        k: layer.in_features,
                        panel: src,
                        panel_width: block,
                        last_lanes: V::LANES,
                        bias: chain.data.as_ptr().add(layer.bias_at + first),
                        bias_per_row: true,
                        relu: layer.relu,
                        out: dst.add(first * block),
                        ldo: block,
                        prefetch_out: false,
                    };
                    tile_rows::<V>(tile_outs.min(out - first), NV_MAX, &tile);
                }
                src = dst;
                into_ping = !into_ping;
            }
            transpose::<V>(
                src,
                block,
                out_features,
                block,
                output.as_mut_ptr().add(block_start * out_features),
                out_features,
            );
        }
    }
}

/// `dst[c * ldd + r] = src[r * lds + c]` for `r < rows`, `c < cols`: whole `LANES x LANES`
/// squares through [`SimdVec::transpose_square`], the edges one value at a time.
///
/// # Safety
/// `src` is valid for reading `rows` rows of `cols` values `lds` apart, `dst` for writing `cols`
/// rows of `rows` values `ldd` apart, not overlapping `src`; the CPU supports the ISA.
#[inline(always)]
unsafe fn transpose<V: SimdVec>(
    src: *const V::Elem,
    lds: usize,
    rows: usize,
    cols: usize,
    dst: *mut V::Elem,
    ldd: usize,
) {
    let lanes = V::LANES;
    let (whole_rows, whole_cols) = (rows / lanes * lanes, cols / lanes * lanes);
    // SAFETY: every index is below `rows` / `cols`, as the caller guarantees valid.
    unsafe {
        for r in (0..whole_rows).step_by(lanes) {
            for c in (0..whole_cols).step_by(lanes) {
                V::transpose_square(src.add(r * lds + c), lds, dst.add(c * ldd + r), ldd);
            }
            for c in whole_cols..cols {
                for i in r..r + lanes {
                    *dst.add(c * ldd + i) = *src.add(i * lds + c);
                }
            }
        }
        for r in whole_rows..rows {
            for c in 0..cols {
                *dst.add(c * ldd + r) = *src.add(r * lds + c);
            }
        }
    }
}

/// One layer's panel outputs (those before `dot_from`) for `rows` rows: every panel, every
/// register tile.
///
/// # Safety
/// As at the call in [`forward_rows`].
#[inline(always)]
unsafe fn layer_block<V: SimdVec, const MR: usize, const NV_MAX: usize>(
    at: &Placement<'_, V::Elem>,
) {
    let (layer, rows) = (at.layer, at.rows);
    let panel_width = NV_MAX * V::LANES;
    let panel_bytes = layer.in_features * panel_width * std::mem::size_of::<V::Elem>();
    if panel_bytes <= L1_HALF_BYTES {
        // The panels stay in L1 whatever the order: go row tile by row tile, so each output row
        // is written left to right in one pass, a stream the prefetcher follows.
        for row in (0..rows).step_by(MR) {
            for col in (0..layer.dot_from).step_by(panel_width) {
                // SAFETY: `row < rows` and `col < dot_from`, as `tile_at` requires.
                unsafe { tile_at::<V, MR, NV_MAX>(at, row, col) };
            }
        }
    } else {
        // Keep a large panel hot: every row tile of the block runs against it before the next.
        for col in (0..layer.dot_from).step_by(panel_width) {
            for row in (0..rows).step_by(MR) {
                // SAFETY: `row < rows` and `col < dot_from`, as `tile_at` requires.
                unsafe { tile_at::<V, MR, NV_MAX>(at, row, col) };
            }
        }
    }
}

/// A layer's dot-form outputs (`dot_from..out`) for `rows` rows, register tile by register
/// tile: each output is the lane-wise product of an input row with a weight row, summed.
///
/// # Safety
/// As at the call in [`forward_rows`].
#[inline(always)]
unsafe fn dot_layer_block<V: SimdVec>(at: &Placement<'_, V::Elem>) {
    let layer = at.layer;
    let padded_in = padded(layer.in_features, V::LANES);
    for row in (0..at.rows).step_by(DOT_ROWS) {
        for out in (layer.dot_from..layer.out_features).step_by(DOT_OUTS) {
            // SAFETY: `row < rows` and `dot_from <= out < out_features`: the tile's input rows,
            // weight rows (`check_chain` proved the dot rows in bounds), biases and outputs are
            // inside the buffers described at the call in `forward_rows`.
            unsafe {
                let tile = DotTile {
                    x: at.src.add(row * at.src_stride),
                    ldx: at.src_stride,
                    k: layer.in_features,
                    w: at
                        .data
                        .as_ptr()
                        .add(layer.dot_at + (out - layer.dot_from) * padded_in),
                    ldw: padded_in,
                    bias: at.data.as_ptr().add(layer.bias_at + out),
                    relu: layer.relu,
                    out: at.dst.add(row * at.dst_stride + out),
                    ldo: at.dst_stride,
                };
                let rows = (at.rows - row).min(DOT_ROWS);
                dot_tile_rows::<V>(rows, (layer.out_features - out).min(DOT_OUTS), &tile);
            }
        }
    }
}

/// Most rows and outputs of a dot-form register tile: 16 independent accumulators, enough to
/// keep the FMA units busy, and 4 + 4 loads per 16 FMAs.
const DOT_ROWS: usize = 4;
const DOT_OUTS: usize = 4;

/// Pointers for one dot-form register tile: `rows x outs` outputs from `rows x k` inputs and
/// `outs` weight rows of `ldw` values (zeros past `k`).
struct DotTile<T> {
    x: *const T,
    ldx: usize,
    k: usize,
    w: *const T,
    ldw: usize,
    bias: *const T,
    relu: bool,
    out: *mut T,
    ldo: usize,
}

/// Picks the dot-form register tile for a run-time row count and output count (`1..=4` each).
///
/// # Safety
/// `tile` points at `rows` input rows of `k` readable values, `outs` weight rows of `ldw >=
/// padded(k)` values, `outs` biases and room for `rows x outs` outputs; the CPU supports the ISA.
#[inline(always)]
unsafe fn dot_tile_rows<V: SimdVec>(rows: usize, outs: usize, tile: &DotTile<V::Elem>) {
    // SAFETY: forwarded from the caller.
    unsafe {
        match rows {
            1 => dot_tile_outs::<V, 1>(outs, tile),
            2 => dot_tile_outs::<V, 2>(outs, tile),
            3 => dot_tile_outs::<V, 3>(outs, tile),
            4 => dot_tile_outs::<V, 4>(outs, tile),
            _ => unreachable!("dot tiles are at most 4 rows"),
        }
    }
}

/// # Safety
/// As for [`dot_tile_rows`].
#[inline(always)]
unsafe fn dot_tile_outs<V: SimdVec, const R: usize>(outs: usize, tile: &DotTile<V::Elem>) {
    // SAFETY: forwarded from the caller.
    unsafe {
        match outs {
            1 => dot_tile::<V, R, 1>(tile),
            2 => dot_tile::<V, R, 2>(tile),
            3 => dot_tile::<V, R, 3>(tile),
            4 => dot_tile::<V, R, 4>(tile),
            _ => unreachable!("dot tiles are at most 4 outputs"),
        }
    }
}

/// The dot-form microkernel: `R x C` accumulators along `k`, the input's tail loaded masked (so
/// nothing past `k` is read; the weights' padding is zeros), then one horizontal sum each, the
/// bias and the ReLU.
///
/// # Safety
/// As for [`dot_tile_rows`], with `rows == R` and `outs == C`.
#[inline(always)]
unsafe fn dot_tile<V: SimdVec, const R: usize, const C: usize>(tile: &DotTile<V::Elem>) {
    let lanes = V::LANES;
    let (full, tail) = (tile.k / lanes, tile.k % lanes);
    // SAFETY: the caller guarantees the ISA, `R` rows of `k` readable inputs (chunks `0..full`
    // are whole, the tail load reads `tail` values), `C` weight rows of at least
    // `(full + 1) * lanes` values when `tail > 0` (else `full * lanes`), `C` biases and room for
    // `R x C` outputs.
    unsafe {
        let mut acc = [[V::zero(); C]; R];
        for chunk in 0..full + usize::from(tail > 0) {
            let at = chunk * lanes;
            let mut xs = [V::zero(); R];
            for (r, x) in xs.iter_mut().enumerate() {
                let row = tile.x.add(r * tile.ldx + at);
                *x = if chunk < full {
                    V::load(row)
                } else {
                    V::load_partial(row, tail)
                };
            }
            for c in 0..C {
                let w = V::load(tile.w.add(c * tile.ldw + at));
                for (row, x) in acc.iter_mut().zip(&xs) {
                    row[c] = x.mul_add(w, row[c]);
                }
            }
        }
        for (r, row) in acc.iter().enumerate() {
            for (c, value) in row.iter().enumerate() {
                let value = value.sum() + *tile.bias.add(c);
                // `NaN < 0` is false: NaN passes through as in torch.relu.
                let value = if tile.relu && value < V::Elem::ZERO {
                    V::Elem::ZERO
                } else {
                    value
                };
                *tile.out.add(r * tile.ldo + c) = value;
            }
        }
    }
}

/// One layer's operands for a block of rows: where its inputs, packed weights and outputs are.
#[derive(Clone, Copy)]
struct Placement<'a, T> {
    layer: &'a LayerDesc,
    data: &'a [T],
    rows: usize,
    src: *const T,
    src_stride: usize,
    dst: *mut T,
    dst_stride: usize,
    /// `dst` is the caller's output, possibly far from cache (not the L1/L2 scratch).
    dst_is_output: bool,
}

/// The register tile at row `row` and output column `col` of a layer block.
///
/// # Safety
/// As at the call in [`forward_rows`], with `row < at.rows` and `col < at.layer.dot_from`, so
/// every offset stays inside the buffers described there.
#[inline(always)]
unsafe fn tile_at<V: SimdVec, const MR: usize, const NV_MAX: usize>(
    at: &Placement<'_, V::Elem>,
    row: usize,
    col: usize,
) {
    let layer = at.layer;
    let width = (NV_MAX * V::LANES).min(layer.dot_from - col);
    let nv = width.div_ceil(V::LANES);
    // SAFETY: see the function's contract.
    unsafe {
        let tile = Tile {
            a: at.src.add(row * at.src_stride),
            lda: at.src_stride,
            k: layer.in_features,
            panel: at
                .data
                .as_ptr()
                .add(layer.weights_at + col * layer.in_features),
            panel_width: width,
            last_lanes: width - (nv - 1) * V::LANES,
            bias: at.data.as_ptr().add(layer.bias_at + col),
            bias_per_row: false,
            relu: layer.relu,
            out: at.dst.add(row * at.dst_stride + col),
            ldo: at.dst_stride,
            prefetch_out: at.dst_is_output,
        };
        tile_rows::<V>((at.rows - row).min(MR), nv, &tile);
    }
}

/// Pointers for one register tile: `rows x (nv * LANES)` outputs from `rows x k` inputs.
struct Tile<T> {
    a: *const T,
    lda: usize,
    k: usize,
    panel: *const T,
    /// Values per panel row: the outputs this tile computes from real weights.
    panel_width: usize,
    /// Lanes of the last register that have weights (`1..=LANES`); the rest load as zeros.
    last_lanes: usize,
    bias: *const T,
    /// One bias value per tile row (broadcast along it), rather than one per output column.
    bias_per_row: bool,
    relu: bool,
    out: *mut T,
    ldo: usize,
    /// Fetch the output lines before the multiply-adds (see `register_tile`).
    prefetch_out: bool,
}

/// Picks the register tile for a run-time row count (`1..=8`) and width (`1..=4` registers).
///
/// # Safety
/// `tile` points at `rows` valid input rows, a panel of `k` rows of `panel_width` values (which
/// `nv` registers cover), `nv * LANES` bias values (only `panel_width` where the last register
/// runs in its half; `rows` with `bias_per_row`), and room for
/// the outputs.
#[inline(always)]
unsafe fn tile_rows<V: SimdVec>(rows: usize, nv: usize, tile: &Tile<V::Elem>) {
    // The last register in its half where its outputs fit (`tile_width`'s `HALF`). Its stores
    // then write `HALF_LANES` values, which the row has room for: packing pads the row to whole
    // registers, or ends the panels at a whole register or at one plus `V::HALF_LANES`
    // (`TileShape::dot_from`, with `forward_rows` asserting `half_lanes` is 0 or
    // `V::HALF_LANES`, and `check_chain` that the packing follows the shape); rows-in-lanes
    // tiles (one bias per row) are always whole registers.
    let half = V::HALF_LANES > 0 && tile.last_lanes <= V::HALF_LANES && !tile.bias_per_row;
    // SAFETY: forwarded from the caller.
    unsafe {
        match (nv, half) {
            (1, false) => tile_width::<V, 1, false>(rows, tile),
            (2, false) => tile_width::<V, 2, false>(rows, tile),
            (3, false) => tile_width::<V, 3, false>(rows, tile),
            (4, false) => tile_width::<V, 4, false>(rows, tile),
            (1, true) => tile_width::<V, 1, true>(rows, tile),
            (2, true) => tile_width::<V, 2, true>(rows, tile),
            (3, true) => tile_width::<V, 3, true>(rows, tile),
            (4, true) => tile_width::<V, 4, true>(rows, tile),
            _ => unreachable!("panels are at most 4 registers wide"),
        }
    }
}

/// With `HALF`, the last register's multiply-adds, bias and stores cover only its low
/// [`SimdVec::HALF_LANES`] lanes (`last_lanes` fits them).
///
/// # Safety
/// As for [`tile_rows`].
#[inline(always)]
unsafe fn tile_width<V: SimdVec, const NV: usize, const HALF: bool>(
    rows: usize,
    tile: &Tile<V::Elem>,
) {
    // SAFETY: forwarded from the caller.
    unsafe {
        // Few rows give few independent accumulators, too few to hide the FMA latency: split
        // `k` across extra accumulator sets (summed at the end) so batch 1 runs at throughput.
        match rows {
            1 => register_tile::<V, 1, NV, 4, HALF>(tile),
            2 => register_tile::<V, 2, NV, 2, HALF>(tile),
            3 => register_tile::<V, 3, NV, 1, HALF>(tile),
            4 => register_tile::<V, 4, NV, 1, HALF>(tile),
            5 => register_tile::<V, 5, NV, 1, HALF>(tile),
            6 => register_tile::<V, 6, NV, 1, HALF>(tile),
            7 => register_tile::<V, 7, NV, 1, HALF>(tile),
            8 => register_tile::<V, 8, NV, 1, HALF>(tile),
            _ => unreachable!("register tiles are at most 8 rows"),
        }
    }
}

/// The microkernel: `R x NV` registers of accumulators seeded with the bias, one broadcast of an
/// input value and `NV` panel loads per step of `k`, ReLU applied in registers. With `KS > 1`,
/// consecutive steps of `k` go to `KS` separate accumulator sets, added up before the ReLU.
///
/// # Safety
/// As for [`tile_rows`], with `rows == R` and `nv == NV`.
#[inline(always)]
unsafe fn register_tile<
    V: SimdVec,
    const R: usize,
    const NV: usize,
    const KS: usize,
    const HALF: bool,
>(
    tile: &Tile<V::Elem>,
) {
    let lanes = V::LANES;
    let step = tile.panel_width;
    // SAFETY: the caller guarantees the ISA and that `R` rows of `k` inputs, `k` panel rows of
    // `panel_width` values, `NV * LANES` bias values (`panel_width` with `HALF`; `R` per row)
    // and `R` output rows are in
    // bounds; the split loop reads steps `0..k / KS * KS` and the tail loop the rest, so every
    // `k` index is `< k`; `panel_row` reads only `panel_width` values of a panel row.
    unsafe {
        let mut acc = [[[V::zero(); NV]; R]; KS];
        if tile.bias_per_row {
            for (r, row) in acc[0].iter_mut().enumerate() {
                *row = [V::splat(tile.bias.add(r)); NV];
            }
        } else {
            for v in 0..NV {
                let bias = if HALF && v == NV - 1 {
                    V::load_partial(tile.bias.add(v * lanes), tile.last_lanes)
                } else {
                    V::load(tile.bias.add(v * lanes))
                };
                for row in acc[0].iter_mut() {
                    row[v] = bias;
                }
            }
        }
        if tile.prefetch_out {
            // A wide last layer writing a large batch stores to memory far from cache (42 ->
            // 784 at 4096 rows: 12.8 MB): fetch the lines now, a whole tile of multiply-adds
            // before the stores need them (that layer alone: a few percent faster).
            for r in 0..R {
                for v in 0..NV {
                    V::prefetch(tile.out.add(r * tile.ldo + v * lanes));
                }
            }
        }
        let mut a = tile.a;
        let mut panel = tile.panel;
        let line = 64 / std::mem::size_of::<V::Elem>();
        for iteration in 0..tile.k / KS {
            if (iteration * KS).is_multiple_of(line) {
                // Once per cache line: fetch the same columns of the next tile's rows, so a large
                // input streaming from memory is in cache one tile ahead (the hardware prefetcher
                // alone misses the start of every row).
                for r in 0..R {
                    V::prefetch(a.wrapping_add((R + r) * tile.lda));
                }
            }
            for (s, set) in acc.iter_mut().enumerate() {
                let b = panel_row::<V, NV>(panel.add(s * step), tile.last_lanes);
                for (r, row) in set.iter_mut().enumerate() {
                    let x = V::splat(a.add(r * tile.lda + s));
                    multiply_add_row::<V, NV, HALF>(x, &b, row);
                }
            }
            a = a.add(KS);
            panel = panel.add(KS * step);
        }
        for _ in 0..tile.k % KS {
            let b = panel_row::<V, NV>(panel, tile.last_lanes);
            for (r, row) in acc[0].iter_mut().enumerate() {
                let x = V::splat(a.add(r * tile.lda));
                multiply_add_row::<V, NV, HALF>(x, &b, row);
            }
            a = a.add(1);
            panel = panel.add(step);
        }
        let (total, rest) = acc.split_at_mut(1);
        for set in rest.iter() {
            for (sum_row, row) in total[0].iter_mut().zip(set) {
                for (sum, &value) in sum_row.iter_mut().zip(row) {
                    *sum = sum.add(value);
                }
            }
        }
        for (r, row) in total[0].iter().enumerate() {
            for (v, &value) in row.iter().enumerate() {
                let value = if tile.relu { value.relu() } else { value };
                let out = tile.out.add(r * tile.ldo + v * lanes);
                if HALF && v == NV - 1 {
                    value.store_half(out);
                } else {
                    value.store(out);
                }
            }
        }
    }
}

/// `row[v] += x * b[v]`, the last register in its half with `HALF`.
///
/// # Safety
/// The CPU supports `V`'s ISA; `HALF` only where `V::HALF_LANES > 0`.
#[inline(always)]
unsafe fn multiply_add_row<V: SimdVec, const NV: usize, const HALF: bool>(
    x: V,
    b: &[V; NV],
    row: &mut [V; NV],
) {
    // SAFETY: forwarded from the caller.
    unsafe {
        for v in 0..NV {
            row[v] = if HALF && v == NV - 1 {
                x.mul_add_half(b[v], row[v])
            } else {
                x.mul_add(b[v], row[v])
            };
        }
    }
}

/// One panel row as `NV` registers, the last holding `last_lanes` values and zeros after them.
///
/// # Safety
/// `row` is valid for `(NV - 1) * LANES + last_lanes` reads; the CPU supports `V`'s ISA.
#[inline(always)]
unsafe fn panel_row<V: SimdVec, const NV: usize>(
    row: *const V::Elem,
    last_lanes: usize,
) -> [V; NV] {
    // SAFETY: forwarded from the caller; the last load reads `last_lanes` values only.
    unsafe {
        let mut b = [V::zero(); NV];
        for (v, reg) in b.iter_mut().enumerate().take(NV - 1) {
            *reg = V::load(row.add(v * V::LANES));
        }
        let last = row.add((NV - 1) * V::LANES);
        b[NV - 1] = if last_lanes == V::LANES {
            V::load(last)
        } else {
            V::load_partial(last, last_lanes)
        };
        b
    }
}
