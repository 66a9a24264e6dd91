//! The int8 form: a chain whose weights are int8 with a scale per output channel, multiplied four
//! inputs at a time by one instruction per register ([`QuadDot::dot_quads`], AVX512_VNNI's
//! `vpdpbusd`: each i32 lane adds the products of four u8 inputs and four s8 weights), four times
//! the work of an FMA per instruction.
//!
//! Packing ([`TileShape::k_group`] = 4, storage `i8`): every layer as panels of whole registers,
//! `k` rounded up to a multiple of 4, each panel row one group of 4 for every column; beside each
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
use super::pairs::{fetch_row_ahead, input_strides};
use super::peak::PEAK_CHAINS;
use super::{Packed, Panels, SimdVec, TileShape, L1_HALF_BYTES};
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
    let quantized = block.saturating_mul(input_strides(shape, chain).max().unwrap_or(0));
    values
        .saturating_add(block.saturating_mul(2))
        .saturating_add(quantized.div_ceil(4))
}

/// The loop nest of the int8 form; ISA files wrap it in `#[target_feature]`.
///
/// # Safety
/// The CPU supports `V`'s ISA, and `shape.lanes == V::LANES`, `shape.mr == MR`,
/// `shape.nv_max == NV_MAX`, `shape.k_group == 4`. (The packing, shapes and lengths are
/// checked, with a panic on mismatch.)
#[inline(always)]
pub unsafe fn forward_quads<V: QuadDot, const MR: usize, const NV_MAX: usize>(
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
    assert!(shape.k_group == 4 && shape.half_lanes == 0);
    assert!(MR <= 8 && NV_MAX <= 4 && shape.block_rows.is_multiple_of(MR));
    assert!(
        saved.is_none(),
        "the int8 form keeps no activations (inference only)"
    );
    let rows = check_chain(shape, &chain, input, output, None);
    let layers = chain.layers;
    assert!(
        chain.lanes_layers.is_empty()
            && layers.iter().all(|l| l.dot_from == l.out_features
                && l.padded_out == shape.padded(l.out_features)
                && l.bias_at + (1 + INT8_CHANNEL_VALUES) * l.padded_out <= chain.biases.len()),
        "packed as panels of whole registers, with each channel's scale and weight sum"
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
    let strides: Vec<usize> = input_strides(shape, &chain).collect();
    let quantized_len = block_rows * strides.iter().max().copied().unwrap_or(0);
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
        // `quantized` has room for `block` rows of `strides[0] = grouped(first_in)` values, the
        // scales and zeros for `block` rows.
        unsafe {
            quantize_rows::<V>(
                rows - block_start,
                input.as_ptr().add(block_start * first_in),
                first_in,
                block,
                first_in,
                quantized.as_mut_ptr(),
                strides[0],
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
            let panels = Panels::new(layer.padded_out, V::LANES, NV_MAX);
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
                // `strides[index]` (written by `quantize_rows`, with their scales and zeros),
                // and `dst` has room for `block` rows of `padded_out` values at `ldo`.
                unsafe {
                    let tile = QuadTile {
                        a: quantized.as_ptr().add(row * strides[index]),
                        lda: strides[index],
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
                    let (rows, registers) = ((block - row).min(MR), width / V::LANES);
                    grouped_tile::<V, QuadTile, MR, NV_MAX>(rows, registers, &tile);
                    if !epilogue::runs_on_accumulators(layer.post_op) {
                        (epilogue.tile)(layer.post_op, tile.out, ldo, rows, registers, false);
                    }
                }
            }
            if index < last {
                // SAFETY: `values` holds `block` rows of `padded_out` values, and `quantized`
                // room for `block` rows of `strides[index + 1] = padded_out >= grouped(out)`.
                unsafe {
                    quantize_rows::<V>(
                        0,
                        values.as_ptr(),
                        layer.padded_out,
                        block,
                        layer.out_features,
                        quantized.as_mut_ptr(),
                        strides[index + 1],
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
/// where the range is not finite (the row then comes out NaN), scale 1 where it is empty, and
/// at least the smallest normal f32 (whose inverse is finite) where it is subnormal.
fn row_quantization(lo: f32, hi: f32) -> (f32, f32) {
    let range = hi - lo;
    if !range.is_finite() {
        return (f32::NAN, 0.0);
    }
    if range == 0.0 {
        return (1.0, 0.0);
    }
    let scale = (range / 255.0).max(f32::MIN_POSITIVE);
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
    unsafe fn run<const R: usize, const NV: usize, const KS: usize>(&self) {
        // SAFETY: forwarded from the caller.
        unsafe {
            // Only the tiles of three rows or more (`KS == 1`) fetch: at batch 1 and 2 even an
            // empty fetch loop per step slowed the call by a quarter.
            if KS == 1 && self.fetch.has_lines() {
                quad_tile::<V, R, NV, KS, true>(self)
            } else {
                quad_tile::<V, R, NV, KS, false>(self)
            }
        }
    }
}

/// The microkernel: `R x NV` i32 sums, per quad of `k` one broadcast of each row's input quad
/// and `NV` loads of weight quads, `KS` sets over consecutive quads added at the end; then in
/// f32 the zero point's correction, the scales, the bias and the post-op where it runs on
/// accumulators, stored as f32.
///
/// With `FETCH`, each step of `k` also fetches its lines of [`FetchAhead`].
///
/// # Safety
/// `tile` points at `R` input rows of `4 * quads` readable values and their scales and zeros, a
/// panel of `quads` rows of `4 * panel_width` values with `NV * LANES <= panel_width`, as many
/// channel values, and room for the outputs; the CPU supports the ISA.
#[inline(always)]
unsafe fn quad_tile<
    V: QuadDot,
    const R: usize,
    const NV: usize,
    const KS: usize,
    const FETCH: bool,
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
                let b = panel_row::<V, NV>(panel.add(s * step));
                for (r, row) in set.iter_mut().enumerate() {
                    let x = V::splat_quad(a.add(r * tile.lda + 4 * s));
                    for (value, &weights) in row.iter_mut().zip(&b) {
                        *value = V::dot_quads(*value, x, weights);
                    }
                }
            }
            a = a.add(4 * KS);
            panel = panel.add(KS * step);
        }
        for _ in 0..tile.quads % KS {
            let b = panel_row::<V, NV>(panel);
            for (r, row) in sums[0].iter_mut().enumerate() {
                let x = V::splat_quad(a.add(r * tile.lda));
                for (value, &weights) in row.iter_mut().zip(&b) {
                    *value = V::dot_quads(*value, x, weights);
                }
            }
            a = a.add(4);
            panel = panel.add(step);
        }
        // Added up into a new array: the epilogue's loops index it, and an array indexed so
        // stays in memory, which for `sums` itself would put every `dot_quads` through the stack.
        let mut totals = sums[0];
        for set in &sums[1..] {
            for (total_row, set_row) in totals.iter_mut().zip(set) {
                for (total, &value) in total_row.iter_mut().zip(set_row) {
                    *total = V::add_sums(*total, value);
                }
            }
        }
        for (r, row) in totals.iter().enumerate() {
            let row_scale = V::splat(tile.row_scales.add(r));
            let minus_zero = V::splat(tile.row_zeros.add(r)).neg();
            for (v, &total) in row.iter().enumerate() {
                // One rounding for `sum - zero * weight_sum`: the FMA's product is exact.
                let centred = minus_zero.mul_add(
                    V::load(tile.weight_sums.add(v * lanes)),
                    V::to_floats(total),
                );
                let scale = row_scale.mul(V::load(tile.scales.add(v * lanes)));
                let value = centred.mul_add(scale, V::load(tile.bias.add(v * lanes)));
                let value = epilogue::apply_on_accumulators(tile.post_op, value);
                let out = tile.out.add(r * tile.ldo + v * lanes);
                if tile.stream_out {
                    value.store_stream(out);
                } else {
                    value.store(out);
                }
            }
        }
    }
}

/// One panel row: `NV` registers of weight quads.
///
/// # Safety
/// `row` is valid for `NV * 4 * LANES` reads; the CPU supports the ISA.
#[inline(always)]
unsafe fn panel_row<V: QuadDot, const NV: usize>(row: *const i8) -> [V::Quads; NV] {
    // SAFETY: forwarded from the caller.
    unsafe {
        let mut b = [V::load_quads(row); NV];
        for (v, reg) in b.iter_mut().enumerate().skip(1) {
            *reg = V::load_quads(row.add(v * 4 * V::LANES));
        }
        b
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
