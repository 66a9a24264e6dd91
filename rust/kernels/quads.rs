//! The int8 form: a chain whose weights are int8 with a scale per output channel, multiplied four
//! inputs at a time by one instruction per register ([`QuadDot::dot_quads`], AVX512_VNNI's
//! `vpdpbusd`: each i32 lane adds the products of four u8 inputs and four s8 weights), four times
//! the work of an FMA per instruction.
//!
//! Packing ([`TileShape::k_group`] = 4, storage `i8`): every layer as panels of whole registers
//! (the last one a half, and outputs in dot form, as in `pairs.rs`), `k` rounded up to a
//! multiple of 4, each panel row one group of 4 for every column; beside each
//! layer's bias, per output, its scale `s_w = max |W_j| / 127` and the sum of its stored weights.
//! The loop nest quantizes each layer's input rows to u8 once per block, each row with its own
//! scale and zero point (`s_x = (max(x, 0) - min(x, 0)) / 255`, `z = round(-min(x, 0) / s_x)`:
//! 0 after a ReLU), runs each layer as register tiles of i32 sums, then in f32
//! `(sum - z * weight_sum) * s_x * s_w + bias` and the post-op; the hidden layers' f32 outputs
//! are quantized again for the next layer, the last layer's stored as f32. A row holding a NaN
//! or an infinity comes out all NaN. Error: see `docs/precision.md`.

use super::chain::check_chain;
use super::epilogue::{self, StoredEpilogue};
use super::microkernel::{grouped_tile, streams_output, FetchAhead, GroupedTile};
use super::pairs::{
    dot_outputs, fetch_row_ahead, input_stride, widest_input_stride, DotChunk, DotOutputs,
};
use super::peak::PEAK_CHAINS;
use super::{Packed, SimdVec, TileShape, L1_HALF_BYTES};
use crate::ops::PostOp;

/// Values per output kept after the bias by int8 packing: the channel's scale and weight sum.
pub const INT8_CHANNEL_VALUES: usize = 2;

/// An f32 register whose ISA multiplies u8 by s8 quads into i32 lanes.
pub trait QuadDot: SimdVec<Elem = f32> {
    /// `LANES` i32 sums.
    type Sums: Copy;
    /// `LANES` groups of four bytes.
    type Quads: Copy;

    /// Zero sums.
    ///
    /// # Safety
    /// The CPU supports the ISA.
    unsafe fn zero_sums() -> Self::Sums;
    /// The four u8 at `ptr` in every lane.
    ///
    /// # Safety
    /// `ptr` is valid for four reads; the CPU supports the ISA.
    unsafe fn splat_quad(ptr: *const u8) -> Self::Quads;
    /// `LANES` quads of s8 (`4 * LANES` values).
    ///
    /// # Safety
    /// `ptr` is valid for `4 * LANES` reads; the CPU supports the ISA.
    unsafe fn load_quads(ptr: *const i8) -> Self::Quads;
    /// Per lane, `sums + a.0 * b.0 + ... + a.3 * b.3`, `a` as u8 and `b` as s8, exact in i32.
    ///
    /// # Safety
    /// The CPU supports the ISA.
    unsafe fn dot_quads(sums: Self::Sums, a: Self::Quads, b: Self::Quads) -> Self::Sums;
    /// [`QuadDot::dot_quads`] on the low [`SimdVec::HALF_LANES`] lanes (the others unspecified).
    ///
    /// # Safety
    /// The type has a half register; the CPU supports the ISA.
    unsafe fn dot_quads_half(sums: Self::Sums, a: Self::Quads, b: Self::Quads) -> Self::Sums;
    /// `HALF_LANES` quads of s8 (`4 * HALF_LANES` values), the other lanes unspecified.
    ///
    /// # Safety
    /// The type has a half register; `ptr` is valid for `4 * HALF_LANES` reads; the CPU
    /// supports the ISA.
    unsafe fn load_quads_half(ptr: *const i8) -> Self::Quads;
    /// The first `count <= 4 * LANES` bytes at `ptr`, zeros after (nothing past them is read).
    ///
    /// # Safety
    /// `ptr` is valid for `count` reads; the CPU supports the ISA.
    unsafe fn load_quads_partial(ptr: *const i8, count: usize) -> Self::Quads;
    /// The sum of the lanes (exact: the callers' sums stay far inside i32).
    ///
    /// # Safety
    /// The CPU supports the ISA.
    unsafe fn total(sums: Self::Sums) -> i32;
    /// Lane-wise `a + b`.
    ///
    /// # Safety
    /// The CPU supports the ISA.
    unsafe fn add_sums(a: Self::Sums, b: Self::Sums) -> Self::Sums;
    /// The sums as f32 (rounded to nearest where above `2^24`).
    ///
    /// # Safety
    /// The CPU supports the ISA.
    unsafe fn to_floats(sums: Self::Sums) -> Self;
    /// The least lane (any lane, where one is NaN: the caller checks for those apart).
    ///
    /// # Safety
    /// The CPU supports the ISA.
    unsafe fn lowest_lane(self) -> f32;
    /// The greatest lane (any lane, where one is NaN).
    ///
    /// # Safety
    /// The CPU supports the ISA.
    unsafe fn highest_lane(self) -> f32;
    /// Stores the first `count <= LANES` lanes quantized: `self * inverse + zero` (`zero` a
    /// whole number; one fused multiply-add) rounded to nearest even, clamped to `0..=255` (a
    /// NaN lane to anything there). Returns nonzero if a stored lane's value was NaN or rounded
    /// to `-32768` or below (which a row quantized by its own range never reaches: its values
    /// lie within `-0.5..=255.5`, give or take the float32 roundings).
    ///
    /// # Safety
    /// `ptr` is valid for `count` writes; the CPU supports the ISA.
    unsafe fn store_quantized(self, inverse: Self, zero: f32, ptr: *mut u8, count: usize) -> u64;
    /// Stores four registers' lanes quantized as [`QuadDot::store_quantized`], in order (one
    /// narrowing for all four where the ISA has it), and returns what it returns.
    ///
    /// # Safety
    /// `ptr` is valid for `4 * LANES` writes; the CPU supports the ISA.
    unsafe fn store_quantized_four(
        values: [Self; 4],
        inverse: Self,
        zero: f32,
        ptr: *mut u8,
    ) -> u64;
}

/// Scratch elements (f32) the int8 form needs for `rows` rows: a block of f32 outputs of the
/// widest layer, each block row's scale and zero point, and a block of u8 rows as wide as the
/// widest layer input.
pub fn scratch_len<W, T>(shape: &TileShape, chain: &Packed<'_, W, T>, rows: usize) -> usize {
    let block = rows.min(shape.block_rows);
    let widest_out = chain.layers.iter().map(|l| l.padded_out).max().unwrap_or(0);
    let values = block.saturating_mul(widest_out);
    let quantized = block.saturating_mul(widest_input_stride(shape, chain.layers));
    values
        .saturating_add(block.saturating_mul(2))
        .saturating_add(quantized.div_ceil(4))
}

/// The loop nest of the int8 form; ISA files wrap it in `#[target_feature]`.
///
/// # Safety
/// The CPU supports `V`'s ISA, and `shape.lanes == V::LANES`, `shape.mr == MR`,
/// `shape.nv_max == NV_MAX`, `shape.k_group == 4`. (The packing, shapes and lengths are
/// checked, with a panic on mismatch.) `HALVES`: the half-register tiles are compiled in (see
/// `microkernel::grouped_tile`); without them `shape.half_lanes` must be 0.
#[inline(always)]
pub unsafe fn forward_quads<
    V: QuadDot,
    const MR: usize,
    const NV_MAX: usize,
    const HALVES: bool,
>(
    shape: &TileShape,
    chain: Packed<'_, i8, f32>,
    input: &[f32],
    output: &mut [f32],
    scratch: &mut [f32],
    saved: Option<&mut [f32]>,
    epilogue: StoredEpilogue<f32>,
) {
    assert!(shape.lanes == V::LANES);
    assert!(shape.mr == MR && shape.nv_max == NV_MAX);
    assert!(shape.k_group == 4 && (shape.half_lanes == 0 || shape.half_lanes == V::HALF_LANES));
    assert!(
        HALVES || shape.half_lanes == 0,
        "half-register tiles compiled in"
    );
    assert!(MR <= 8 && NV_MAX <= 4 && shape.block_rows.is_multiple_of(MR));
    assert!(
        saved.is_none(),
        "the int8 form keeps no activations (inference only)"
    );
    let rows = check_chain(shape, &chain, input, output, None);
    let layers = chain.layers;
    assert!(
        chain.lanes_layers.is_empty()
            && layers.iter().all(|l| {
                let dot_len = shape.padded(l.in_features) * (l.out_features - l.dot_from);
                l.bias_at + (1 + INT8_CHANNEL_VALUES) * l.padded_out <= chain.biases.len()
                    && l.dot_at + dot_len <= chain.weights.len()
            }),
        "packed as panels of whole or half registers, with each channel's scale and weight sum"
    );
    assert!(
        scratch.len() >= scratch_len(shape, &chain, rows),
        "scratch is large enough"
    );
    if rows == 0 {
        return;
    }
    let block_rows = rows.min(shape.block_rows);
    let widest = layers.iter().map(|l| l.padded_out).max().unwrap_or(0);
    let (values, rest) = scratch.split_at_mut(block_rows * widest);
    let (row_scales, rest) = rest.split_at_mut(block_rows);
    let (row_zeros, rest) = rest.split_at_mut(block_rows);
    let stride = |index: usize| input_stride(shape, layers, index);
    let quantized_len = block_rows * widest_input_stride(shape, layers);
    let quantized: &mut [u8] = &mut bytemuck::cast_slice_mut(rest)[..quantized_len];
    let first_in = layers[0].in_features;
    let last = layers.len() - 1;
    let out_features = layers[last].out_features;

    let stream_output = streams_output::<V>(output, out_features, layers[last].post_op);
    for block_start in (0..rows).step_by(block_rows) {
        let block = block_rows.min(rows - block_start);
        let next_rows = block_rows.min(rows - block_start - block);
        let next_input = &input[(block_start + block) * first_in..][..next_rows * first_in];
        // SAFETY: the input holds `block` rows of `first_in` values from `block_start`;
        // `quantized` has room for `block` rows of `stride(0) = grouped(first_in)` values, the
        // scales and zeros for `block` rows.
        unsafe {
            quantize_rows::<V>(
                rows - block_start,
                input.as_ptr().add(block_start * first_in),
                first_in,
                block,
                first_in,
                quantized.as_mut_ptr(),
                stride(0),
                row_scales.as_mut_ptr(),
                row_zeros.as_mut_ptr(),
            )
        };
        for (index, layer) in layers.iter().enumerate() {
            let direct = index == last && layer.padded_out == layer.out_features;
            let block_output = &mut output[block_start * out_features..][..block * out_features];
            let (dst, ldo) = if direct {
                (block_output.as_mut_ptr(), out_features)
            } else {
                (values.as_mut_ptr(), layer.padded_out)
            };
            let quads = layer.in_features.div_ceil(4);
            let grouped_k = 4 * quads;
            let panel_bytes = grouped_k * NV_MAX * V::LANES;
            let panels = shape.panels(shape.panel_columns(layer.dot_from));
            let channels = layer.bias_at..layer.bias_at + 3 * layer.padded_out;
            let channels = &chain.biases[channels];
            // Row tile by row tile where the panels stay in L1 whatever the order, else panel by
            // panel (as `pairs::forward_pairs`); one loop, not a closure, for the target features.
            let (row_tiles, col_tiles) = (block.div_ceil(MR), panels.count());
            let rows_outer = panel_bytes <= L1_HALF_BYTES;
            for order in 0..row_tiles * col_tiles {
                let (row_tile, col_tile) = if rows_outer {
                    (order / col_tiles, order % col_tiles)
                } else {
                    (order % row_tiles, order / row_tiles)
                };
                let row = row_tile * MR;
                let (col, width) = panels.get(col_tile);
                // SAFETY: `check_chain` proved the panels in bounds, the assertion above the
                // channel values; rows `row..` of `quantized` hold `grouped_k` values each at
                // `stride(index)` (written by `quantize_rows`, with their scales and zeros),
                // and `dst` has room for `block` rows of `padded_out` values at `ldo`.
                unsafe {
                    let tile = QuadTile {
                        a: quantized.as_ptr().add(row * stride(index)),
                        lda: stride(index),
                        row_scales: row_scales.as_ptr().add(row),
                        row_zeros: row_zeros.as_ptr().add(row),
                        quads,
                        panel: chain
                            .weights
                            .as_ptr()
                            .add(layer.weights_at + col * grouped_k),
                        panel_width: width,
                        bias: channels.as_ptr().add(col),
                        scales: channels.as_ptr().add(layer.padded_out + col),
                        weight_sums: channels.as_ptr().add(2 * layer.padded_out + col),
                        post_op: layer.post_op,
                        out: dst.add(row * ldo + col),
                        ldo,
                        prefetch_out: direct && !stream_output,
                        stream_out: direct && stream_output,
                        fetch: FetchAhead::share(
                            index,
                            next_input,
                            row_tiles * col_tiles,
                            order,
                            quads,
                        ),
                    };
                    let rows = (block - row).min(MR);
                    grouped_tile::<V, QuadTile, MR, NV_MAX, HALVES>(rows, width, &tile);
                    if !epilogue::runs_on_accumulators(layer.post_op) {
                        let (registers, half) = (width.div_ceil(V::LANES), width % V::LANES > 0);
                        (epilogue.tile)(layer.post_op, tile.out, ldo, rows, registers, half);
                    }
                }
            }
            if layer.dot_from < layer.out_features {
                let dots = QuadDots {
                    a: quantized.as_ptr(),
                    lda: stride(index),
                    row_scales: row_scales.as_ptr(),
                    row_zeros: row_zeros.as_ptr(),
                    bytes: grouped_k,
                    weights: chain.weights[layer.dot_at..].as_ptr(),
                    ldw: shape.padded(layer.in_features),
                    outs: layer.out_features - layer.dot_from,
                    bias: channels[layer.dot_from..].as_ptr(),
                    scales: channels[layer.padded_out + layer.dot_from..].as_ptr(),
                    weight_sums: channels[2 * layer.padded_out + layer.dot_from..].as_ptr(),
                    post_op: layer.post_op,
                    out: dst.wrapping_add(layer.dot_from),
                    ldo,
                };
                // SAFETY: the assertion above proved the dot-form rows and channel values in
                // bounds; `quantized` holds `block` rows of `grouped_k` values at `stride(index)`
                // with their scales and zeros, and `dst` room for `block` rows at `ldo` whose
                // columns `dot_from..out_features` no tile writes.
                unsafe { dot_outputs::<V, _>(&dots, block, epilogue) };
            }
            if index < last {
                // SAFETY: `values` holds `block` rows of `padded_out` values, and `quantized`
                // room for `block` rows of `stride(index + 1) = padded_out >= grouped(out)`.
                unsafe {
                    quantize_rows::<V>(
                        0,
                        values.as_ptr(),
                        layer.padded_out,
                        block,
                        layer.out_features,
                        quantized.as_mut_ptr(),
                        stride(index + 1),
                        row_scales.as_mut_ptr(),
                        row_zeros.as_mut_ptr(),
                    )
                };
            } else if !direct {
                for (out_row, row) in block_output
                    .chunks_exact_mut(out_features)
                    .zip(values.chunks_exact(layer.padded_out))
                {
                    out_row.copy_from_slice(&row[..out_features]);
                }
            }
        }
    }
    if stream_output {
        // SAFETY: the kernel's ISA, which the caller guarantees.
        unsafe { V::fence_streams() };
    }
}

/// The scale and zero point that map `lo..=hi` (`lo <= 0 <= hi`) onto `0..=255`: a NaN scale
/// where either end is not finite (the row then comes out NaN), scale 1 where the range is
/// empty, and at least the smallest normal f32 (whose inverse is finite) where it is subnormal.
fn row_quantization(lo: f32, hi: f32) -> (f32, f32) {
    if !(lo.is_finite() && hi.is_finite()) {
        return (f32::NAN, 0.0);
    }
    let range = hi - lo;
    if range == 0.0 {
        return (1.0, 0.0);
    }
    // Finite values of both signs near f32's largest span more than it holds: their 255th is
    // taken in f64 (in f32 the range was infinite and the row came out NaN).
    let step = if range.is_finite() {
        range / 255.0
    } else {
        ((f64::from(hi) - f64::from(lo)) / 255.0) as f32
    };
    let scale = step.max(f32::MIN_POSITIVE);
    (scale, (-lo / scale).round_ties_even().clamp(0.0, 255.0))
}

/// `rows` rows of `count` f32 values `lds` apart, quantized to u8 rows `ldd` apart (zeros after
/// `count`, up to a multiple of 4), each row's scale and zero point ([`row_quantization`] of its
/// range and 0) written to `scales` and `zeros`. `streamed_rows`: as for
/// [`fetch_row_ahead`].
///
/// # Safety
/// `src` is valid for reading the rows, `dst` for writing `rows` rows of `count.next_multiple_of
/// (4) <= ldd` values, `scales` and `zeros` for `rows` values; the CPU supports the ISA.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn quantize_rows<V: QuadDot>(
    streamed_rows: usize,
    src: *const f32,
    lds: usize,
    rows: usize,
    count: usize,
    dst: *mut u8,
    ldd: usize,
    scales: *mut f32,
    zeros: *mut f32,
) {
    let lanes = V::LANES;
    let (whole, tail) = (count / lanes * lanes, count % lanes);
    // SAFETY: every access is inside the rows the caller guarantees.
    unsafe {
        // Every row's range first, then every row quantized: a row's quantization waits for its
        // range's reductions and scale, and in one pass per row that wait held back the next
        // row's loads. A few rows at a time, so that the second pass reads them from L1.
        for group in (0..rows).step_by(QUANTIZE_GROUP_ROWS) {
            let group_rows = group..rows.min(group + QUANTIZE_GROUP_ROWS);
            for r in group_rows.clone() {
                let from = src.add(r * lds);
                fetch_row_ahead::<V>(src, lds, r, count, streamed_rows);
                // Zeros in the partial register's other lanes: 0 is in every row's range anyway.
                // RANGE_SETS independent sets: with one, the latency of its operations bound the
                // pass. Minimum and maximum may drop a NaN; the quantizing pass below finds those.
                let mut sets = [[V::zero(); 2]; RANGE_SETS];
                let sets_end = whole / (RANGE_SETS * lanes) * (RANGE_SETS * lanes);
                for at in (0..sets_end).step_by(RANGE_SETS * lanes) {
                    for (index, set) in sets.iter_mut().enumerate() {
                        include_in_range(set, V::load(from.add(at + index * lanes)));
                    }
                }
                for (set, at) in sets.iter_mut().zip((sets_end..whole).step_by(lanes)) {
                    include_in_range(set, V::load(from.add(at)));
                }
                if tail > 0 {
                    include_in_range(&mut sets[0], V::load_partial(from.add(whole), tail));
                }
                let [mut lo, mut hi] = sets[0];
                for &[set_lo, set_hi] in &sets[1..] {
                    (lo, hi) = (lo.min(set_lo), hi.max(set_hi));
                }
                let (scale, zero) = row_quantization(lo.lowest_lane(), hi.highest_lane());
                *scales.add(r) = scale;
                *zeros.add(r) = zero;
            }
            for r in group_rows {
                let (from, to) = (src.add(r * lds), dst.add(r * ldd));
                let (scale, zero) = (*scales.add(r), *zeros.add(r));
                // A NaN row quantizes to anything: its scale makes every output NaN.
                let inverse = V::constant(if scale.is_nan() { 0.0 } else { 1.0 / scale });
                // Nonzero once a value was NaN: a NaN in the row (the values of a row quantized by
                // its finite range lie within -0.5..=255.5).
                let mut not_a_number = 0;
                let fours = count / (4 * lanes) * (4 * lanes);
                for at in (0..fours).step_by(4 * lanes) {
                    let values = [
                        V::load(from.add(at)),
                        V::load(from.add(at + lanes)),
                        V::load(from.add(at + 2 * lanes)),
                        V::load(from.add(at + 3 * lanes)),
                    ];
                    not_a_number |= V::store_quantized_four(values, inverse, zero, to.add(at));
                }
                for at in (fours..whole).step_by(lanes) {
                    let x = V::load(from.add(at));
                    not_a_number |= x.store_quantized(inverse, zero, to.add(at), lanes);
                }
                if tail > 0 {
                    let x = V::load_partial(from.add(whole), tail);
                    not_a_number |= x.store_quantized(inverse, zero, to.add(whole), tail);
                }
                if not_a_number != 0 {
                    *scales.add(r) = f32::NAN;
                }
                for pad in count..count.next_multiple_of(4) {
                    *to.add(pad) = 0;
                }
            }
        }
    }
}

/// Rows whose range pass and quantizing pass run back to back (see `quantize_rows`): 8 rows of
/// 784 values are 25 KB, within L1. Measured against a whole block (64 rows, which the second
/// pass read from L2) on the encoder 784-42-16 at 4,096 rows: 4 rows 1.02x, 8 rows 1.02-1.05x,
/// 16 rows 1.02x (Emerald Rapids, 1 thread, tools/ab_builds.py).
const QUANTIZE_GROUP_ROWS: usize = 8;

/// Independent `(lo, hi)` sets a row's range pass keeps (see `quantize_rows`).
const RANGE_SETS: usize = 4;

/// Widens a row's range `[lo, hi]` by `x`: lane-wise minimum and maximum (an infinity makes the
/// range infinite; a NaN may be dropped).
///
/// # Safety
/// The CPU supports `V`'s ISA.
#[inline(always)]
unsafe fn include_in_range<V: SimdVec>(set: &mut [V; 2], x: V) {
    // SAFETY: forwarded from the caller.
    unsafe {
        *set = [set[0].min(x), set[1].max(x)];
    }
}

/// Pointers for a block's dot-form outputs of the int8 form: `outs` outputs of each of the
/// block's u8 input rows (`bytes` values each, with their scales and zero points), from `outs`
/// weight rows of `ldw` values (zeros past `k`) with their channels' biases, scales and weight
/// sums.
struct QuadDots {
    a: *const u8,
    lda: usize,
    row_scales: *const f32,
    row_zeros: *const f32,
    /// The rows' values, `k` rounded up to whole quads (zeros past `k`).
    bytes: usize,
    weights: *const i8,
    ldw: usize,
    outs: usize,
    bias: *const f32,
    scales: *const f32,
    weight_sums: *const f32,
    post_op: PostOp,
    /// The block's first dot-form output.
    out: *mut f32,
    ldo: usize,
}

impl<V: QuadDot> DotOutputs<V> for QuadDots {
    #[inline(always)]
    fn outs(&self) -> usize {
        self.outs
    }
    #[inline(always)]
    fn post_op(&self) -> PostOp {
        self.post_op
    }
    #[inline(always)]
    fn out(&self) -> (*mut f32, usize) {
        (self.out, self.ldo)
    }
    #[inline(always)]
    unsafe fn tile<const R: usize, const C: usize, const KS: usize>(&self, row: usize, out: usize) {
        // SAFETY: forwarded from the caller.
        unsafe { quad_dot_tile::<V, R, C, KS>(self, row, out) }
    }
}

/// `R` rows' dot-form outputs `out..out + C` from row `row`: each output's i32 sum over whole
/// registers of quads (the last one loaded masked: nothing past the row is read), in `KS` sets
/// over consecutive registers (few rows have few independent sums), then the tiles' float
/// epilogue on it, operation for operation, so a dot-form output has the bits it would have in
/// a panel.
///
/// # Safety
/// As for [`dot_outputs`], with rows `row..row + R` in the block and outputs
/// `out..out + C` among the dot-form ones.
#[inline(always)]
unsafe fn quad_dot_tile<V: QuadDot, const R: usize, const C: usize, const KS: usize>(
    dots: &QuadDots,
    row: usize,
    out: usize,
) {
    let register = 4 * V::LANES;
    let (whole, tail) = (dots.bytes / register, dots.bytes % register);
    // SAFETY: the caller guarantees `R` rows of `bytes` readable values from `row`, `C` weight
    // rows of `ldw >= bytes` values from `out` with their channel values, and room for the
    // outputs; the whole registers end at `whole * register <= bytes`, the tail load at `bytes`.
    unsafe {
        let a = dots.a.add(row * dots.lda).cast::<i8>();
        let w = dots.weights.add(out * dots.ldw);
        let chunk = |at: usize, count: usize| DotChunk {
            a: a.add(at),
            lda: dots.lda,
            w: w.add(at),
            ldw: dots.ldw,
            count,
        };
        let mut sums = [[[V::zero_sums(); C]; R]; KS];
        for group in 0..whole / KS {
            for (s, set) in sums.iter_mut().enumerate() {
                quad_dot_chunk::<V, R, C>(set, &chunk((group * KS + s) * register, register));
            }
        }
        for at in (whole / KS * KS..whole).map(|index| index * register) {
            quad_dot_chunk::<V, R, C>(&mut sums[0], &chunk(at, register));
        }
        if tail > 0 {
            quad_dot_chunk::<V, R, C>(&mut sums[0], &chunk(whole * register, tail));
        }
        let totals = add_sum_sets::<V, R, C, KS>(&sums);
        for (r, row_sums) in totals.iter().enumerate() {
            let at = row + r;
            let (row_scale, minus_zero) = (*dots.row_scales.add(at), -*dots.row_zeros.add(at));
            for (c, &sum) in row_sums.iter().enumerate() {
                let channel = out + c;
                let total = V::total(sum) as f32;
                let centred = minus_zero.mul_add(*dots.weight_sums.add(channel), total);
                let scale = row_scale * *dots.scales.add(channel);
                let value = centred.mul_add(scale, *dots.bias.add(channel));
                *dots.out.add(at * dots.ldo + channel) =
                    epilogue::apply_one_on_accumulator::<V>(dots.post_op, value);
            }
        }
    }
}

/// `sums[r][c] += a_r . w_c` over one chunk (as `pairs::pair_dot_chunk`).
///
/// # Safety
/// `chunk` points at `R` rows and `C` weight rows of `count` readable values each; the CPU
/// supports the ISA.
#[inline(always)]
unsafe fn quad_dot_chunk<V: QuadDot, const R: usize, const C: usize>(
    sums: &mut [[V::Sums; C]; R],
    chunk: &DotChunk<i8, i8>,
) {
    // SAFETY: forwarded from the caller.
    unsafe {
        let mut weights = [quads_at::<V>(chunk.w, chunk.count); C];
        for (c, weight) in weights.iter_mut().enumerate().skip(1) {
            *weight = quads_at::<V>(chunk.w.add(c * chunk.ldw), chunk.count);
        }
        for (r, row_sums) in sums.iter_mut().enumerate() {
            let x = quads_at::<V>(chunk.a.add(r * chunk.lda), chunk.count);
            for (sum, &weight) in row_sums.iter_mut().zip(&weights) {
                *sum = V::dot_quads(*sum, x, weight);
            }
        }
    }
}

/// The `count` values at `at` as quads: a whole register, or its first `count` values.
///
/// # Safety
/// `at` is valid for `count <= 4 * LANES` reads; the CPU supports the ISA.
#[inline(always)]
unsafe fn quads_at<V: QuadDot>(at: *const i8, count: usize) -> V::Quads {
    // SAFETY: forwarded from the caller.
    unsafe {
        if count == 4 * V::LANES {
            V::load_quads(at)
        } else {
            V::load_quads_partial(at, count)
        }
    }
}

/// Pointers for one register tile of the int8 form: `rows x (registers * LANES)` outputs from
/// `rows` u8 input rows (with their scales and zero points) and a panel of `quads` rows of
/// `panel_width` weight quads (with their channels' biases, scales and weight sums).
struct QuadTile {
    a: *const u8,
    lda: usize,
    row_scales: *const f32,
    row_zeros: *const f32,
    quads: usize,
    panel: *const i8,
    /// Outputs in the panel (whole registers).
    panel_width: usize,
    bias: *const f32,
    scales: *const f32,
    weight_sums: *const f32,
    post_op: PostOp,
    out: *mut f32,
    ldo: usize,
    /// Lines of the next block's input to fetch as the products go (the first layer's tiles).
    fetch: FetchAhead,
    /// Fetch the output lines before the products (as `microkernel::Tile::prefetch_out`).
    prefetch_out: bool,
    /// Store the outputs past the caches ([`SimdVec::store_stream`]): they are the caller's, far
    /// larger than cache, and aligned to whole registers.
    stream_out: bool,
}

impl<V: QuadDot> GroupedTile<V> for QuadTile {
    #[inline(always)]
    unsafe fn run<const R: usize, const NV: usize, const KS: usize, const HALF: bool>(&self) {
        // SAFETY: forwarded from the caller.
        unsafe {
            // Only the tiles of three rows or more (`KS == 1`) fetch: at batch 1 and 2 even an
            // empty fetch loop per step slowed the call by a quarter.
            if KS == 1 && self.fetch.has_lines() {
                quad_tile::<V, R, NV, KS, true, HALF>(self)
            } else {
                quad_tile::<V, R, NV, KS, false, HALF>(self)
            }
        }
    }
}

/// The microkernel: `R x NV` i32 sums, per quad of `k` one broadcast of each row's input quad
/// and `NV` loads of weight quads, `KS` sets over consecutive quads added at the end; then in
/// f32 the zero point's correction, the scales, the bias and the post-op where it runs on
/// accumulators, stored as f32.
///
/// With `FETCH`, each step of `k` also fetches its lines of [`FetchAhead`]; with `HALF`, the
/// last register's products, channel values and stores cover its half.
///
/// # Safety
/// `tile` points at `R` input rows of `4 * quads` readable values and their scales and zeros, a
/// panel of `quads` rows of `4 * panel_width` values with `NV * LANES <= panel_width` (with
/// `HALF`, `(NV - 1) * LANES + HALF_LANES`), as many channel values, and room for the outputs;
/// `HALF` only where `V` has a half register; the CPU supports the ISA.
#[inline(always)]
unsafe fn quad_tile<
    V: QuadDot,
    const R: usize,
    const NV: usize,
    const KS: usize,
    const FETCH: bool,
    const HALF: bool,
>(
    tile: &QuadTile,
) {
    let lanes = V::LANES;
    let step = 4 * tile.panel_width;
    // SAFETY: the caller guarantees the ISA, `R` input rows of `4 * quads` values with their
    // scales and zeros, `quads` panel rows of `step` values (each register's quads inside),
    // `NV * LANES` of each channel value and `R` output rows of `NV` registers; the split loop
    // reads quads `0..quads / KS * KS`, the tail the rest.
    unsafe {
        let mut sums = [[[V::zero_sums(); NV]; R]; KS];
        if tile.prefetch_out {
            for r in 0..R {
                for v in 0..NV {
                    V::prefetch(tile.out.add(r * tile.ldo + v * lanes));
                }
            }
        }
        let (mut a, mut panel, mut fetch) = (tile.a, tile.panel, tile.fetch);
        for _ in 0..tile.quads / KS {
            for (s, set) in sums.iter_mut().enumerate() {
                if FETCH {
                    fetch.step::<V>();
                }
                let b = panel_row::<V, NV, HALF>(panel.add(s * step));
                for (r, row) in set.iter_mut().enumerate() {
                    let x = V::splat_quad(a.add(r * tile.lda + 4 * s));
                    dot_quads_row::<V, NV, HALF>(row, x, &b);
                }
            }
            a = a.add(4 * KS);
            panel = panel.add(KS * step);
        }
        for _ in 0..tile.quads % KS {
            let b = panel_row::<V, NV, HALF>(panel);
            for (r, row) in sums[0].iter_mut().enumerate() {
                let x = V::splat_quad(a.add(r * tile.lda));
                dot_quads_row::<V, NV, HALF>(row, x, &b);
            }
            a = a.add(4);
            panel = panel.add(step);
        }
        let totals = add_sum_sets::<V, R, NV, KS>(&sums);
        for (r, row) in totals.iter().enumerate() {
            let row_scale = V::splat(tile.row_scales.add(r));
            let minus_zero = V::splat(tile.row_zeros.add(r)).neg();
            for (v, &total) in row.iter().enumerate() {
                let half = HALF && v == NV - 1;
                let at = v * lanes;
                // One rounding for `sum - zero * weight_sum`: the FMA's product is exact.
                let centred = minus_zero.mul_add(
                    channel_values::<V>(tile.weight_sums.add(at), half),
                    V::to_floats(total),
                );
                let scale = row_scale.mul(channel_values::<V>(tile.scales.add(at), half));
                let value = centred.mul_add(scale, channel_values::<V>(tile.bias.add(at), half));
                let value = epilogue::apply_on_accumulators(tile.post_op, value);
                let out = tile.out.add(r * tile.ldo + v * lanes);
                if half {
                    value.store_half(out);
                } else if tile.stream_out {
                    value.store_stream(out);
                } else {
                    value.store(out);
                }
            }
        }
    }
}

/// The `KS` sets of a tile's i32 sums added into one, in order (as `microkernel::sum_sets` for
/// f32): into a new array, which the epilogue's loops index (an array indexed so stays in
/// memory, which for the sets themselves would put every `dot_quads` through the stack).
///
/// # Safety
/// The CPU supports `V`'s ISA.
#[inline(always)]
unsafe fn add_sum_sets<V: QuadDot, const R: usize, const NV: usize, const KS: usize>(
    sets: &[[[V::Sums; NV]; R]; KS],
) -> [[V::Sums; NV]; R] {
    let mut totals = sets[0];
    for set in &sets[1..] {
        for (total_row, set_row) in totals.iter_mut().zip(set) {
            for (total, &value) in total_row.iter_mut().zip(set_row) {
                // SAFETY: the caller guarantees the ISA.
                *total = unsafe { V::add_sums(*total, value) };
            }
        }
    }
    totals
}

/// One register of channel values (biases, scales or weight sums) at `at`, or its half, which
/// reads nothing past the half's outputs.
///
/// # Safety
/// `at` is valid for `LANES` reads (`HALF_LANES` with `half`); the CPU supports the ISA.
#[inline(always)]
unsafe fn channel_values<V: QuadDot>(at: *const f32, half: bool) -> V {
    // SAFETY: forwarded from the caller.
    unsafe {
        if half {
            V::load_partial(at, V::HALF_LANES)
        } else {
            V::load(at)
        }
    }
}

/// One panel row: `NV` registers of weight quads, the last one a half with `HALF`.
///
/// # Safety
/// `row` is valid for `NV * 4 * LANES` reads (with `HALF`, the last register's half); the CPU
/// supports the ISA, and `V` has a half register if `HALF`.
#[inline(always)]
unsafe fn panel_row<V: QuadDot, const NV: usize, const HALF: bool>(
    row: *const i8,
) -> [V::Quads; NV] {
    // SAFETY: forwarded from the caller.
    unsafe {
        let mut b = [weight_quads::<V>(row, HALF && NV == 1); NV];
        for (v, reg) in b.iter_mut().enumerate().skip(1) {
            *reg = weight_quads::<V>(row.add(v * 4 * V::LANES), HALF && v == NV - 1);
        }
        b
    }
}

/// One register of weight quads at `at`, or its half.
///
/// # Safety
/// As for [`panel_row`]'s registers.
#[inline(always)]
unsafe fn weight_quads<V: QuadDot>(at: *const i8, half: bool) -> V::Quads {
    // SAFETY: forwarded from the caller.
    unsafe {
        if half {
            V::load_quads_half(at)
        } else {
            V::load_quads(at)
        }
    }
}

/// `row[v] += x . b[v]` quad by quad, the last register in its half with `HALF`.
///
/// # Safety
/// The CPU supports the ISA, and `V` has a half register if `HALF`.
#[inline(always)]
unsafe fn dot_quads_row<V: QuadDot, const NV: usize, const HALF: bool>(
    row: &mut [V::Sums; NV],
    x: V::Quads,
    b: &[V::Quads; NV],
) {
    // SAFETY: forwarded from the caller.
    unsafe {
        for (v, (value, &weights)) in row.iter_mut().zip(b).enumerate() {
            *value = if HALF && v == NV - 1 {
                V::dot_quads_half(*value, x, weights)
            } else {
                V::dot_quads(*value, x, weights)
            };
        }
    }
}

/// The int8 dot-product ceiling: `iterations x PEAK_CHAINS` independent [`QuadDot::dot_quads`]
/// and nothing else; each does the work of `4 * LANES` FMAs, so
/// [`fma_loop_flops`](super::fma_loop_flops)`(iterations, 4 * LANES)` counts its operations.
///
/// # Safety
/// The CPU supports `V`'s ISA.
#[inline(always)]
pub unsafe fn dot_quads_loop<V: QuadDot>(iterations: usize, seed: &[f32]) -> f32 {
    assert!(seed.len() >= 4 * V::LANES);
    let bytes: Vec<i8> = seed.iter().map(|&x| x.clamp(0.0, 127.0) as i8).collect();
    // SAFETY: `bytes` holds `4 * LANES` values; the caller guarantees the ISA.
    unsafe {
        let x = V::load_quads(bytes.as_ptr());
        let mut sums = [V::zero_sums(); PEAK_CHAINS];
        for _ in 0..iterations {
            for s in sums.iter_mut() {
                *s = V::dot_quads(*s, x, x);
            }
        }
        let mut total = V::zero();
        for s in sums {
            total = total.add(V::to_floats(s));
        }
        total.sum()
    }
}

#[cfg(test)]
mod tests {
    use super::row_quantization;

    #[test]
    fn a_row_spanning_more_than_f32_holds_gets_a_finite_scale() {
        let (scale, zero) = row_quantization(-3e38, 3e38);
        let want = 6e38 / 255.0;
        assert!((f64::from(scale) - want).abs() <= 1e-6 * want, "{scale}");
        assert_eq!(zero, 128.0); // 127.5, ties to even
        let (scale, zero) = row_quantization(-1.0, 3.0);
        assert_eq!((scale, zero), (4.0 / 255.0, 64.0));
        assert_eq!(row_quantization(0.0, 0.0), (1.0, 0.0));
        assert!(row_quantization(f32::NEG_INFINITY, 1.0).0.is_nan());
        assert!(row_quantization(0.0, f32::NAN).0.is_nan());
    }
}
