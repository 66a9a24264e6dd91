//! The bf16-pairs form: a chain whose weights are bf16, multiplied two inputs at a time by one
//! instruction per register ([`PairDot::dot_pairs`], AVX512_BF16's `vdpbf16ps`: each f32 lane
//! adds the products of a pair of bf16 inputs and a pair of bf16 weights), twice the work of an
//! FMA per instruction.
//!
//! Packing ([`TileShape::k_group`] = 2): every layer as panels of whole registers, `k` rounded
//! up to even, each panel row one pair of `k` for every column, side by side; where half
//! registers are cheaper (Zen 4), the last register a half and the outputs past it in dot form
//! as the cost model says (784 -> 42 as 40 + 2); no rows in the lanes. The loop nest rounds
//! each block's input rows to bf16 once (the first block in a pass, every later one by the
//! first layer's tiles of the block before, as they multiply: [`RoundAhead`]), runs each layer
//! as register tiles seeded with the bias in f32 (`R x NV` accumulators, one broadcast of an
//! input pair and `NV` loads of weight pairs per step), applies the post-op in f32 and rounds
//! the hidden layer's outputs to bf16 for the next; the last layer's outputs are stored as f32.
//! Error: see `docs/precision.md`.

use super::chain::check_chain;
use super::epilogue::{self, StoredEpilogue};
use super::microkernel::{grouped_tile, streams_output, sum_sets, FetchAhead, GroupedTile};
use super::peak::PEAK_CHAINS;
use super::{Bf16, LayerDesc, Packed, SimdVec, TileShape, L1_HALF_BYTES, LINE_BYTES};
use crate::ops::PostOp;

/// f32 values in a cache line.
pub(super) const LINE_VALUES: usize = LINE_BYTES / std::mem::size_of::<f32>();

/// An f32 register that multiplies bf16 pairs.
pub trait PairDot: SimdVec<Elem = f32> {
    /// `LANES` pairs of bf16 values.
    type Pairs: Copy;

    /// The pair at `ptr` in every lane.
    ///
    /// # Safety
    /// `ptr` is valid for two reads; the CPU supports the ISA.
    unsafe fn splat_pair(ptr: *const Bf16) -> Self::Pairs;
    /// `LANES` pairs (`2 * LANES` values).
    ///
    /// # Safety
    /// `ptr` is valid for `2 * LANES` reads; the CPU supports the ISA.
    unsafe fn load_pairs(ptr: *const Bf16) -> Self::Pairs;
    /// Per lane, `self + a.0 * b.0 + a.1 * b.1`, the products exact (bf16 x bf16 fits an f32),
    /// the sums rounded to f32.
    ///
    /// # Safety
    /// The CPU supports the ISA.
    unsafe fn dot_pairs(self, a: Self::Pairs, b: Self::Pairs) -> Self;
    /// [`PairDot::dot_pairs`] on the low [`SimdVec::HALF_LANES`] lanes (the others unspecified).
    ///
    /// # Safety
    /// The type has a half register; the CPU supports the ISA.
    unsafe fn dot_pairs_half(self, a: Self::Pairs, b: Self::Pairs) -> Self;
    /// `HALF_LANES` pairs (`2 * HALF_LANES` values), the other lanes unspecified.
    ///
    /// # Safety
    /// The type has a half register; `ptr` is valid for `2 * HALF_LANES` reads; the CPU
    /// supports the ISA.
    unsafe fn load_pairs_half(ptr: *const Bf16) -> Self::Pairs;
    /// The first `count <= 2 * LANES` values at `ptr` as pairs, zeros after (nothing past them
    /// is read).
    ///
    /// # Safety
    /// `ptr` is valid for `count` reads; the CPU supports the ISA.
    unsafe fn load_pairs_partial(ptr: *const Bf16, count: usize) -> Self::Pairs;
    /// Stores the first `count <= LANES` lanes rounded to bf16 (nearest even, [`Bf16::round`]).
    ///
    /// # Safety
    /// `ptr` is valid for `count` writes; the CPU supports the ISA.
    unsafe fn store_rounded(self, ptr: *mut Bf16, count: usize);
    /// Stores `self`'s lanes then `next`'s, rounded as [`PairDot::store_rounded`] (one
    /// instruction for both where the ISA has it).
    ///
    /// # Safety
    /// `ptr` is valid for `2 * LANES` writes; the CPU supports the ISA.
    unsafe fn store_rounded_two(self, next: Self, ptr: *mut Bf16);
}

/// Scratch elements (f32) the pairs form needs for `rows` rows: a block of f32 outputs of the
/// widest layer, and two blocks of bf16 rows as wide as the widest layer input.
pub fn scratch_len<W, T>(shape: &TileShape, chain: &Packed<'_, W, T>, rows: usize) -> usize {
    let block = rows.min(shape.block_rows);
    let widest_out = chain.layers.iter().map(|l| l.padded_out).max().unwrap_or(0);
    let values = block.saturating_mul(widest_out);
    let widest_in = widest_input_stride(shape, chain.layers);
    let rounded = rounded_block_len(block, widest_in).saturating_mul(2);
    values.saturating_add(rounded.div_ceil(2))
}

/// bf16 values of a block of `block` rows of any layer's input (`widest_in` values a row at
/// most), rounded up to whole cache lines so that the second block starts aligned as the first.
fn rounded_block_len(block: usize, widest_in: usize) -> usize {
    let lines = LINE_BYTES / std::mem::size_of::<Bf16>();
    block.saturating_mul(widest_in).next_multiple_of(lines)
}

/// Layer `index`'s input row length in a form taking `k` in groups: the chain's input, or the
/// layer below's padded outputs, rounded up to whole groups; worked out where it is needed (a
/// `Vec` of them cost an allocation on every call).
#[inline(always)]
pub(super) fn input_stride(shape: &TileShape, layers: &[LayerDesc], index: usize) -> usize {
    let width = match index.checked_sub(1) {
        Some(below) => layers[below].padded_out,
        None => layers[0].in_features,
    };
    shape.grouped(width)
}

/// The longest layer input row in a form taking `k` in groups ([`input_stride`]).
pub(super) fn widest_input_stride(shape: &TileShape, layers: &[LayerDesc]) -> usize {
    (0..layers.len())
        .map(|index| input_stride(shape, layers, index))
        .max()
        .unwrap_or(0)
}

/// The loop nest of the pairs form; ISA files wrap it in `#[target_feature]`.
///
/// # Safety
/// The CPU supports `V`'s ISA, and `shape.lanes == V::LANES`, `shape.mr == MR`,
/// `shape.nv_max == NV_MAX`, `shape.k_group == 2`. (The packing, shapes and lengths are
/// checked, with a panic on mismatch.) `HALVES`: the half-register tiles are compiled in (see
/// `microkernel::grouped_tile`); without them `shape.half_lanes` must be 0.
#[inline(always)]
pub unsafe fn forward_pairs<
    V: PairDot,
    const MR: usize,
    const NV_MAX: usize,
    const HALVES: bool,
>(
    shape: &TileShape,
    chain: Packed<'_, Bf16, f32>,
    input: &[f32],
    output: &mut [f32],
    scratch: &mut [f32],
    saved: Option<&mut [f32]>,
    epilogue: StoredEpilogue<f32>,
) {
    assert!(shape.lanes == V::LANES && shape.mr == MR && shape.nv_max == NV_MAX);
    assert!(shape.k_group == 2 && (shape.half_lanes == 0 || shape.half_lanes == V::HALF_LANES));
    assert!(
        HALVES || shape.half_lanes == 0,
        "half-register tiles compiled in"
    );
    assert!(MR <= 8 && NV_MAX <= 4 && shape.block_rows.is_multiple_of(MR));
    assert!(
        saved.is_none(),
        "the pairs form keeps no activations (inference only)"
    );
    let rows = check_chain(shape, &chain, input, output, None);
    let layers = chain.layers;
    assert!(
        chain.lanes_layers.is_empty() && layers.iter().all(|l| l.padded_out >= l.out_features),
        "packed as panels of whole or half registers"
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
    let stride = |index: usize| input_stride(shape, layers, index);
    // Two blocks of bf16 rows: the one the layers read (the block's input, then each hidden
    // layer's outputs), and the next block's input, which the first layer's tiles round.
    let widest_in = widest_input_stride(shape, layers);
    let rounded_len = rounded_block_len(block_rows, widest_in);
    let (current, next) = bytemuck::cast_slice_mut::<f32, Bf16>(rest).split_at_mut(rounded_len);
    let mut rounded_blocks = [current.as_mut_ptr(), next[..rounded_len].as_mut_ptr()];
    let first_in = layers[0].in_features;
    let last = layers.len() - 1;
    let out_features = layers[last].out_features;

    let stream_output = streams_output::<V>(output, out_features, layers[last].post_op);
    // SAFETY: the input holds the first block's rows, and `rounded_blocks[0]` room for them at
    // `stride(0) = grouped(first_in)`.
    unsafe {
        round_rows::<V>(
            rows,
            input.as_ptr(),
            first_in,
            block_rows,
            first_in,
            rounded_blocks[0],
            stride(0),
        )
    };
    for block_start in (0..rows).step_by(block_rows) {
        let block = block_rows.min(rows - block_start);
        let next_rows = block_rows.min(rows - block_start - block);
        let next_input = input[(block_start + block) * first_in..].as_ptr();
        let after_next = (block_start + block + next_rows).min(rows);
        let after_next_rows = block_rows.min(rows - after_next);
        let after_next_input = &input[after_next * first_in..][..after_next_rows * first_in];
        let [rounded, next_rounded] = rounded_blocks;
        for (index, layer) in layers.iter().enumerate() {
            let direct = index == last && layer.padded_out == layer.out_features;
            let block_output = &mut output[block_start * out_features..][..block * out_features];
            let (dst, ldo) = if direct {
                (block_output.as_mut_ptr(), out_features)
            } else {
                (values.as_mut_ptr(), layer.padded_out)
            };
            let pairs = layer.in_features.div_ceil(2);
            let grouped_k = 2 * pairs;
            let panel_bytes = grouped_k * NV_MAX * V::LANES * std::mem::size_of::<Bf16>();
            let panels = shape.panels(shape.panel_columns(layer.dot_from));
            // Row tile by row tile where the panels stay in L1 whatever the order, else panel
            // by panel, so a large panel stays hot for every row tile of the block (as
            // `chain::layer_block`). One loop, not a closure: a closure would not inherit the
            // ISA's target features, and its intrinsics would become calls.
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
                // SAFETY: `check_chain` proved the panels and biases in bounds; the rows `row..`
                // of `rounded` hold `grouped_k` values each at `stride(index)` (written by
                // `round_rows`), and `dst` has room for `block` rows of `padded_out` values at
                // `ldo` (exactly `out_features` when direct, which then equals `padded_out`); the
                // input holds the `next_rows` rows from `next_input` that the first layer's tiles
                // round, and `next_rounded` (the other block, which no layer reads now) room for
                // them at `stride(0)`.
                unsafe {
                    let tile = PairTile {
                        a: rounded.add(row * stride(index)),
                        lda: stride(index),
                        pairs,
                        panel: chain
                            .weights
                            .as_ptr()
                            .add(layer.weights_at + col * grouped_k),
                        panel_width: width,
                        bias: chain.biases.as_ptr().add(layer.bias_at + col),
                        post_op: layer.post_op,
                        out: dst.add(row * ldo + col),
                        ldo,
                        prefetch_out: direct && !stream_output,
                        stream_out: direct && stream_output,
                        round_ahead: if index == 0 {
                            RoundAhead::share(
                                next_rows,
                                row_tiles * col_tiles,
                                order,
                                (next_input, first_in, first_in),
                                (next_rounded, stride(0)),
                            )
                        } else {
                            RoundAhead::NONE
                        },
                        fetch: FetchAhead::share(
                            index,
                            after_next_input,
                            row_tiles * col_tiles,
                            order,
                            pairs,
                        ),
                    };
                    let rows = (block - row).min(MR);
                    grouped_tile::<V, PairTile, MR, NV_MAX, HALVES>(rows, width, &tile);
                    if !epilogue::runs_on_accumulators(layer.post_op) {
                        let (registers, half) = (width.div_ceil(V::LANES), width % V::LANES > 0);
                        (epilogue.tile)(layer.post_op, tile.out, ldo, rows, registers, half);
                    }
                }
            }
            if index == 0 && col_tiles == 0 {
                // No tile to round the next block as it goes (every output in dot form).
                // SAFETY: the input holds the next block's `next_rows` rows, and `next_rounded`
                // room for them at `stride(0)`.
                unsafe {
                    round_rows::<V>(
                        0,
                        next_input,
                        first_in,
                        next_rows,
                        first_in,
                        next_rounded,
                        stride(0),
                    )
                };
            }
            if layer.dot_from < layer.out_features {
                let dots = PairDots {
                    a: rounded,
                    lda: stride(index),
                    values: grouped_k,
                    weights: chain.weights[layer.dot_at..].as_ptr(),
                    ldw: shape.padded(layer.in_features),
                    outs: layer.out_features - layer.dot_from,
                    bias: chain.biases[layer.bias_at + layer.dot_from..].as_ptr(),
                    post_op: layer.post_op,
                    out: dst.wrapping_add(layer.dot_from),
                    ldo,
                };
                // SAFETY: `check_chain` proved the dot-form rows and biases in bounds; `rounded`
                // holds `block` rows of `grouped_k` values at `stride(index)`, and `dst` room
                // for `block` rows at `ldo` whose columns `dot_from..out_features` no tile
                // writes.
                unsafe { dot_outputs::<V, _>(&dots, block, epilogue) };
            }
            if index < last {
                // SAFETY: `values` holds `block` rows of `padded_out` values, and `rounded` room
                // for `block` rows of `stride(index + 1) = padded_out >= grouped(out)` values.
                unsafe {
                    round_rows::<V>(
                        0,
                        values.as_ptr(),
                        layer.padded_out,
                        block,
                        layer.out_features,
                        rounded,
                        stride(index + 1),
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
        rounded_blocks = [next_rounded, rounded];
    }
    if stream_output {
        // SAFETY: the kernel's ISA, which the caller guarantees.
        unsafe { V::fence_streams() };
    }
}

/// Before an input pass works on row `row` of `src` (rows `lds` apart, `count` values used):
/// fetches row `row + 2`, if it is one of the `streamed_rows` (0 for none). A pass with little
/// work per value stalls on every line of a batch streaming from memory (bf16, 784 -> 42 -> 16
/// at 4096 rows: a quarter of the time).
///
/// # Safety
/// The CPU supports `V`'s ISA.
#[inline(always)]
pub(super) unsafe fn fetch_row_ahead<V: SimdVec<Elem = f32>>(
    src: *const f32,
    lds: usize,
    row: usize,
    count: usize,
    streamed_rows: usize,
) {
    if row + 2 < streamed_rows {
        let ahead = src.wrapping_add((row + 2) * lds);
        for line in (0..count).step_by(LINE_VALUES) {
            // SAFETY: a prefetch never faults, whatever the address; the caller guarantees the
            // ISA.
            unsafe { V::prefetch(ahead.wrapping_add(line)) };
        }
    }
}

/// `rows` rows of `count` f32 values `lds` apart, rounded to bf16 into rows `ldd` apart, with a
/// zero after an odd `count` (so the last pair's second value multiplies a zero weight as a
/// zero, never as a NaN). `streamed_rows`: where `src` is the caller's input, likely far from
/// cache, the rows it holds from `src` on (this block's and the next ones'), fetched two rows
/// ahead by [`fetch_row_ahead`]; 0 where `src` is a hidden layer's outputs in scratch.
///
/// # Safety
/// `src` is valid for reading the rows, `dst` for writing `rows` rows of `count + count % 2`
/// values (`ldd >= count + count % 2`); the CPU supports the ISA.
#[inline(always)]
unsafe fn round_rows<V: PairDot>(
    streamed_rows: usize,
    src: *const f32,
    lds: usize,
    rows: usize,
    count: usize,
    dst: *mut Bf16,
    ldd: usize,
) {
    // SAFETY: every access is inside the rows the caller guarantees.
    unsafe {
        for r in 0..rows {
            let (from, to) = (src.add(r * lds), dst.add(r * ldd));
            fetch_row_ahead::<V>(src, lds, r, count, streamed_rows);
            let mut at = 0;
            while at < count {
                at += round_piece::<V>(from.add(at), to.add(at), count - at);
            }
            end_row(to, count);
        }
    }
}

/// Rounds the next piece of a row whose `left` values (`left > 0`) lie at `from`, into `to`:
/// two registers where that many are left, else the row's rest; returns the values rounded.
///
/// # Safety
/// `from` is valid for reading `left` values, `to` for writing as many; the CPU supports the
/// ISA.
#[inline(always)]
unsafe fn round_piece<V: PairDot>(from: *const f32, to: *mut Bf16, left: usize) -> usize {
    let lanes = V::LANES;
    // SAFETY: forwarded from the caller; every access is among the `left` values.
    unsafe {
        if left >= 2 * lanes {
            let next = V::load(from.add(lanes));
            V::load(from).store_rounded_two(next, to);
            return 2 * lanes;
        }
        let whole = if left >= lanes {
            V::load(from).store_rounded(to, lanes);
            lanes
        } else {
            0
        };
        if left > whole {
            V::load_partial(from.add(whole), left - whole)
                .store_rounded(to.add(whole), left - whole);
        }
        left
    }
}

/// Ends a rounded row of `count` values at `row`: a zero after an odd `count`.
///
/// # Safety
/// `row` is valid for writing `count + count % 2` values.
#[inline(always)]
unsafe fn end_row(row: *mut Bf16, count: usize) {
    if count % 2 == 1 {
        // SAFETY: the caller guarantees the row's room.
        unsafe { *row.add(count) = Bf16::default() };
    }
}

/// How far ahead of the piece it rounds [`RoundAhead::step`] fetches into L1: 32 lines, about 16
/// steps of the tile's `k` (the share's rows follow each other in the caller's input).
const ROUND_FETCH_VALUES: usize = 32 * LINE_VALUES;

/// A first-layer tile's share of the next block's input rows, rounded to bf16 as the tile's
/// products go: a piece ([`round_piece`]) a step of `k`, and what is left after the loop.
///
/// A pass of its own over the block (as [`round_rows`]) took 10.5% of the bf16 encoder
/// 784 -> 42 -> 16 at 4,096 rows (Zen 4): it does little per value and waits on each line,
/// where the tiles leave the load and store ports idle while `vdpbf16ps` runs. Rounding as the
/// tiles go ran that encoder 1.09x and the AE 1.04x faster than the pass (1 thread, one
/// process), with the lines of the block after next fetched into L2 meanwhile
/// ([`FetchAhead`]); with the lines read from L3 (fetched only 32 lines ahead), 0.93x: each
/// piece's loads stalled the tile.
#[derive(Clone, Copy)]
struct RoundAhead {
    /// The next piece's values and where they go.
    from: *const f32,
    to: *mut Bf16,
    /// Values left in the current row.
    left: usize,
    /// Rows of the share after the current one.
    rows_after: usize,
    /// The values in a row, and the strides of the rows.
    count: usize,
    lds: usize,
    ldd: usize,
}

impl RoundAhead {
    const NONE: RoundAhead = RoundAhead {
        from: std::ptr::null(),
        to: std::ptr::null_mut(),
        left: 0,
        rows_after: 0,
        count: 0,
        lds: 0,
        ldd: 0,
    };

    /// Tile `tile`'s share of `rows` rows of `count` values (`count > 0`) at `src`, `lds` apart,
    /// to round into `dst`, `ldd` apart: the rows cut into `tiles` shares in order.
    fn share(
        rows: usize,
        tiles: usize,
        tile: usize,
        (src, lds, count): (*const f32, usize, usize),
        (dst, ldd): (*mut Bf16, usize),
    ) -> RoundAhead {
        // Before the division: the last block (every block of a small call) has no next one.
        if rows == 0 || count == 0 {
            return RoundAhead::NONE;
        }
        let per_tile = rows.div_ceil(tiles.max(1));
        let first = (tile * per_tile).min(rows);
        let share = per_tile.min(rows - first);
        if share == 0 {
            return RoundAhead::NONE;
        }
        RoundAhead {
            from: src.wrapping_add(first * lds),
            to: dst.wrapping_add(first * ldd),
            left: count,
            rows_after: share - 1,
            count,
            lds,
            ldd,
        }
    }

    /// Whether the share has anything left to round.
    fn has_rows(&self) -> bool {
        self.left > 0
    }

    /// Rounds the next piece (if any), fetching the values [`ROUND_FETCH_VALUES`] ahead.
    ///
    /// # Safety
    /// The share's rows are readable and their destinations writable (as
    /// [`RoundAhead::share`] was given them, `ldd >= count + count % 2`); the CPU supports the
    /// ISA.
    #[inline(always)]
    unsafe fn step<V: PairDot>(&mut self) {
        if self.left == 0 {
            return;
        }
        // SAFETY: the piece lies in the current row, which the caller guarantees; a prefetch
        // never faults, whatever the address.
        unsafe {
            V::prefetch(self.from.wrapping_add(ROUND_FETCH_VALUES));
            V::prefetch(self.from.wrapping_add(ROUND_FETCH_VALUES + LINE_VALUES));
            let done = round_piece::<V>(self.from, self.to, self.left);
            self.left -= done;
            if self.left > 0 {
                self.from = self.from.add(done);
                self.to = self.to.add(done);
                return;
            }
            let count = self.count;
            let row_start = self.to.add(done).sub(count);
            end_row(row_start, count);
            if self.rows_after > 0 {
                self.rows_after -= 1;
                self.left = count;
                self.from = self.from.add(done).sub(count).add(self.lds);
                self.to = row_start.add(self.ldd);
            }
        }
    }

    /// Rounds what is left of the share.
    ///
    /// # Safety
    /// As [`RoundAhead::step`].
    #[inline(always)]
    unsafe fn finish<V: PairDot>(&mut self) {
        while self.has_rows() {
            // SAFETY: forwarded from the caller.
            unsafe { self.step::<V>() };
        }
    }
}

/// Rows and outputs of the dot form computed together: eight independent sums, each input
/// chunk loaded once for both outputs and each weight chunk once for the four rows.
const DOT_ROWS: usize = 4;
const DOT_OUTS: usize = 2;

/// Pointers for a block's dot-form outputs of the pairs form: `outs` outputs of each of the
/// block's bf16 input rows (`values` each, `k` rounded up to even), from `outs` weight rows of
/// `ldw` values (zeros past `k`) with their biases.
struct PairDots {
    a: *const Bf16,
    lda: usize,
    values: usize,
    weights: *const Bf16,
    ldw: usize,
    outs: usize,
    bias: *const f32,
    post_op: PostOp,
    /// The block's first dot-form output.
    out: *mut f32,
    ldo: usize,
}

/// A block's dot-form outputs in a grouped form (the bf16 pairs' [`PairDots`], the int8 quads'):
/// where they go, and the tile that computes `R` rows' outputs `out..out + C` from row `row`.
pub(super) trait DotOutputs<V> {
    /// The dot-form outputs of each row.
    fn outs(&self) -> usize;
    fn post_op(&self) -> PostOp;
    /// The block's first dot-form output, and the rows' stride.
    fn out(&self) -> (*mut f32, usize);
    /// # Safety
    /// The rows `row..row + R` are in the block and the outputs `out..out + C` among the
    /// dot-form ones; the CPU supports `V`'s ISA.
    unsafe fn tile<const R: usize, const C: usize, const KS: usize>(&self, row: usize, out: usize);
}

/// The dot-form outputs of `block` rows, [`DOT_ROWS`] rows by [`DOT_OUTS`] outputs at a time.
///
/// # Safety
/// `dots` points at `block` rows and their outputs as it says; the CPU supports the ISA.
#[inline(always)]
pub(super) unsafe fn dot_outputs<V, D: DotOutputs<V>>(
    dots: &D,
    block: usize,
    epilogue: StoredEpilogue<f32>,
) {
    let (outs, post_op) = (dots.outs(), dots.post_op());
    for row in (0..block).step_by(DOT_ROWS) {
        let rows = (block - row).min(DOT_ROWS);
        for out in (0..outs).step_by(DOT_OUTS) {
            // SAFETY: forwarded from the caller, for rows `row..row + rows` and outputs
            // `out..out + outs`.
            unsafe {
                match (rows, (outs - out).min(DOT_OUTS)) {
                    (1, 1) => dots.tile::<1, 1, 4>(row, out),
                    (2, 1) => dots.tile::<2, 1, 2>(row, out),
                    (3, 1) => dots.tile::<3, 1, 1>(row, out),
                    (4, 1) => dots.tile::<4, 1, 1>(row, out),
                    (1, 2) => dots.tile::<1, 2, 4>(row, out),
                    (2, 2) => dots.tile::<2, 2, 2>(row, out),
                    (3, 2) => dots.tile::<3, 2, 1>(row, out),
                    (4, 2) => dots.tile::<4, 2, 1>(row, out),
                    _ => unreachable!("dot tiles are at most {DOT_ROWS} x {DOT_OUTS}"),
                }
            }
        }
        if !epilogue::runs_on_accumulators(post_op) {
            let (first, ldo) = dots.out();
            // SAFETY: the rows' dot-form outputs were just stored.
            unsafe { (epilogue.values)(post_op, first.add(row * ldo), ldo, rows, outs) };
        }
    }
}

impl<V: PairDot> DotOutputs<V> for PairDots {
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
        unsafe { pair_dot_tile::<V, R, C, KS>(self, row, out) }
    }
}

/// `R` rows' dot-form outputs `out..out + C` from row `row`: each a sum of lane-wise pair
/// products over whole registers (the last one loaded masked: nothing past the row is read),
/// in `KS` sets over consecutive registers (few rows have few independent sums), added across
/// the register, then the bias and the post-op where it runs on accumulators.
///
/// # Safety
/// As for [`dot_outputs`], with rows `row..row + R` in the block and outputs
/// `out..out + C` among the dot-form ones.
#[inline(always)]
unsafe fn pair_dot_tile<V: PairDot, const R: usize, const C: usize, const KS: usize>(
    dots: &PairDots,
    row: usize,
    out: usize,
) {
    let register = 2 * V::LANES;
    let (whole, tail) = (dots.values / register, dots.values % register);
    // SAFETY: the caller guarantees `R` rows of `values` readable values from `row`, `C` weight
    // rows of `ldw >= values` values from `out` with their biases, and room for the outputs;
    // the whole registers end at `whole * register <= values`, the tail load at `values`.
    unsafe {
        let a = dots.a.add(row * dots.lda);
        let w = dots.weights.add(out * dots.ldw);
        let chunk = |at: usize, count: usize| DotChunk {
            a: a.add(at),
            lda: dots.lda,
            w: w.add(at),
            ldw: dots.ldw,
            count,
        };
        let mut acc = [[[V::zero(); C]; R]; KS];
        for group in 0..whole / KS {
            for (s, set) in acc.iter_mut().enumerate() {
                pair_dot_chunk(set, &chunk((group * KS + s) * register, register));
            }
        }
        for at in (whole / KS * KS..whole).map(|index| index * register) {
            pair_dot_chunk(&mut acc[0], &chunk(at, register));
        }
        if tail > 0 {
            pair_dot_chunk(&mut acc[0], &chunk(whole * register, tail));
        }
        for (r, sums) in sum_sets(&acc).iter().enumerate() {
            for (c, sum) in sums.iter().enumerate() {
                let value = sum.sum() + *dots.bias.add(out + c);
                *dots.out.add((row + r) * dots.ldo + out + c) =
                    epilogue::apply_one_on_accumulator::<V>(dots.post_op, value);
            }
        }
    }
}

/// One register's worth of `k` of a dot tile: `count` values (a whole register, or the tail) of
/// each of its rows at `a` (`lda` apart) and its weight rows at `w` (`ldw` apart).
pub(super) struct DotChunk<A, W> {
    pub(super) a: *const A,
    pub(super) lda: usize,
    pub(super) w: *const W,
    pub(super) ldw: usize,
    pub(super) count: usize,
}

/// `acc[r][c] += a_r . w_c` over one chunk: each weight register loaded once for the rows,
/// each input register once for the outputs.
///
/// # Safety
/// `chunk` points at `R` rows and `C` weight rows of `count` readable values each; the CPU
/// supports the ISA.
#[inline(always)]
unsafe fn pair_dot_chunk<V: PairDot, const R: usize, const C: usize>(
    acc: &mut [[V; C]; R],
    chunk: &DotChunk<Bf16, Bf16>,
) {
    // SAFETY: forwarded from the caller.
    unsafe {
        let mut weights = [pairs_at::<V>(chunk.w, chunk.count); C];
        for (c, weight) in weights.iter_mut().enumerate().skip(1) {
            *weight = pairs_at::<V>(chunk.w.add(c * chunk.ldw), chunk.count);
        }
        for (r, sums) in acc.iter_mut().enumerate() {
            let x = pairs_at::<V>(chunk.a.add(r * chunk.lda), chunk.count);
            for (sum, &weight) in sums.iter_mut().zip(&weights) {
                *sum = sum.dot_pairs(x, weight);
            }
        }
    }
}

/// The `count` values at `at` as pairs: a whole register, or its first `count` values.
///
/// # Safety
/// `at` is valid for `count <= 2 * LANES` reads; the CPU supports the ISA.
#[inline(always)]
unsafe fn pairs_at<V: PairDot>(at: *const Bf16, count: usize) -> V::Pairs {
    // SAFETY: forwarded from the caller.
    unsafe {
        if count == 2 * V::LANES {
            V::load_pairs(at)
        } else {
            V::load_pairs_partial(at, count)
        }
    }
}

/// Pointers for one register tile of the pairs form: `rows x (registers * LANES)` outputs from
/// `rows` bf16 input rows and a panel of `pairs` rows of `panel_width` weight pairs.
struct PairTile {
    a: *const Bf16,
    lda: usize,
    pairs: usize,
    panel: *const Bf16,
    /// Outputs in the panel (whole registers).
    panel_width: usize,
    bias: *const f32,
    post_op: PostOp,
    out: *mut f32,
    ldo: usize,
    /// Rows of the next block's input to round as the products go (the first layer's tiles).
    round_ahead: RoundAhead,
    /// Lines of the block after next to fetch into L2 as the products go, for the next block's
    /// tiles to round.
    fetch: FetchAhead,
    /// Fetch the output lines before the products: `out` is the caller's output, likely far
    /// from cache (as `microkernel::Tile::prefetch_out`).
    prefetch_out: bool,
    /// Store the outputs past the caches ([`SimdVec::store_stream`]): they are the caller's, far
    /// larger than cache, and aligned to whole registers.
    stream_out: bool,
}

impl<V: PairDot> GroupedTile<V> for PairTile {
    #[inline(always)]
    unsafe fn run<const R: usize, const NV: usize, const KS: usize, const HALF: bool>(&self) {
        // SAFETY: forwarded from the caller.
        unsafe {
            // Only the tiles of three rows or more (`KS == 1`) round as they go (the others
            // after their loop): at batch 1 and 2 even an empty step in the loop slowed the call
            // by a quarter.
            if KS == 1 && (self.round_ahead.has_rows() || self.fetch.has_lines()) {
                pair_tile::<V, R, NV, KS, true, HALF>(self)
            } else {
                pair_tile::<V, R, NV, KS, false, HALF>(self)
            }
        }
    }
}

/// The microkernel: `R x NV` accumulators seeded with the bias, per pair of `k` one broadcast of
/// each row's input pair and `NV` loads of weight pairs, `KS` accumulator sets over consecutive
/// pairs summed at the end, the post-op where it runs on accumulators, stored as f32.
///
/// With `ROUND`, each step of `k` also rounds a piece of the tile's [`RoundAhead`] share (every
/// tile rounds the rest of its share after the loop); with `HALF`, the last register's
/// products, biases and stores cover its half.
///
/// # Safety
/// `tile` points at `R` input rows of `2 * pairs` readable values, a panel of `pairs` rows of
/// `2 * panel_width` values with `NV * LANES <= panel_width` (with `HALF`, `(NV - 1) * LANES +
/// HALF_LANES`), as many biases, and room for the outputs; `HALF` only where `V` has a half
/// register; the share's rows as [`RoundAhead::step`] requires; the CPU supports the ISA.
#[inline(always)]
unsafe fn pair_tile<
    V: PairDot,
    const R: usize,
    const NV: usize,
    const KS: usize,
    const ROUND: bool,
    const HALF: bool,
>(
    tile: &PairTile,
) {
    let lanes = V::LANES;
    let step = 2 * tile.panel_width;
    // SAFETY: the caller guarantees the ISA, `R` input rows of `2 * pairs` values, `pairs` panel
    // rows of `step` values (each register's pairs inside), the biases and `R` output rows of
    // `NV` registers (the last one's half with `HALF`); the split loop reads pairs
    // `0..pairs / KS * KS`, the tail the rest.
    unsafe {
        let mut acc = [[[V::zero(); NV]; R]; KS];
        for v in 0..NV {
            let at = tile.bias.add(v * lanes);
            let bias = if HALF && v == NV - 1 {
                V::load_partial(at, V::HALF_LANES)
            } else {
                V::load(at)
            };
            for row in acc[0].iter_mut() {
                row[v] = bias;
            }
        }
        if tile.prefetch_out {
            for r in 0..R {
                for v in 0..NV {
                    V::prefetch(tile.out.add(r * tile.ldo + v * lanes));
                }
            }
        }
        let (mut a, mut panel) = (tile.a, tile.panel);
        let (mut round, mut fetch) = (tile.round_ahead, tile.fetch);
        for _ in 0..tile.pairs / KS {
            for (s, set) in acc.iter_mut().enumerate() {
                if ROUND {
                    round.step::<V>();
                    fetch.step::<V>();
                }
                let b = panel_row::<V, NV, HALF>(panel.add(s * step));
                for (r, row) in set.iter_mut().enumerate() {
                    let x = V::splat_pair(a.add(r * tile.lda + 2 * s));
                    dot_pairs_row::<V, NV, HALF>(row, x, &b);
                }
            }
            a = a.add(2 * KS);
            panel = panel.add(KS * step);
        }
        for _ in 0..tile.pairs % KS {
            let b = panel_row::<V, NV, HALF>(panel);
            for (r, row) in acc[0].iter_mut().enumerate() {
                let x = V::splat_pair(a.add(r * tile.lda));
                dot_pairs_row::<V, NV, HALF>(row, x, &b);
            }
            a = a.add(2);
            panel = panel.add(step);
        }
        round.finish::<V>();
        for (r, row) in sum_sets(&acc).iter().enumerate() {
            for (v, &value) in row.iter().enumerate() {
                let value = epilogue::apply_on_accumulators(tile.post_op, value);
                let out = tile.out.add(r * tile.ldo + v * lanes);
                if HALF && v == NV - 1 {
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

/// One panel row: `NV` registers of weight pairs, the last one a half with `HALF`.
///
/// # Safety
/// `row` is valid for `NV * 2 * LANES` reads (with `HALF`, the last register's half); the CPU
/// supports the ISA, and `V` has a half register if `HALF`.
#[inline(always)]
unsafe fn panel_row<V: PairDot, const NV: usize, const HALF: bool>(
    row: *const Bf16,
) -> [V::Pairs; NV] {
    // SAFETY: forwarded from the caller.
    unsafe {
        let mut b = [weight_pairs::<V>(row, HALF && NV == 1); NV];
        for (v, reg) in b.iter_mut().enumerate().skip(1) {
            *reg = weight_pairs::<V>(row.add(v * 2 * V::LANES), HALF && v == NV - 1);
        }
        b
    }
}

/// One register of weight pairs at `at`, or its half.
///
/// # Safety
/// As for [`panel_row`]'s registers.
#[inline(always)]
unsafe fn weight_pairs<V: PairDot>(at: *const Bf16, half: bool) -> V::Pairs {
    // SAFETY: forwarded from the caller.
    unsafe {
        if half {
            V::load_pairs_half(at)
        } else {
            V::load_pairs(at)
        }
    }
}

/// `row[v] += x . b[v]` pair by pair, the last register in its half with `HALF`.
///
/// # Safety
/// The CPU supports the ISA, and `V` has a half register if `HALF`.
#[inline(always)]
unsafe fn dot_pairs_row<V: PairDot, const NV: usize, const HALF: bool>(
    row: &mut [V; NV],
    x: V::Pairs,
    b: &[V::Pairs; NV],
) {
    // SAFETY: forwarded from the caller.
    unsafe {
        for (v, (value, &weights)) in row.iter_mut().zip(b).enumerate() {
            *value = if HALF && v == NV - 1 {
                value.dot_pairs_half(x, weights)
            } else {
                value.dot_pairs(x, weights)
            };
        }
    }
}

/// The bf16 dot-product ceiling: `iterations x PEAK_CHAINS` independent register
/// [`PairDot::dot_pairs`] and nothing else; each does the work of `2 * LANES` FMAs, so
/// [`fma_loop_flops`](super::fma_loop_flops)`(iterations, 2 * LANES)` counts its
/// floating-point operations.
///
/// # Safety
/// The CPU supports `V`'s ISA.
#[inline(always)]
pub unsafe fn dot_pairs_loop<V: PairDot>(iterations: usize, seed: &[f32]) -> f32 {
    assert!(seed.len() >= 2 * V::LANES);
    let pairs: Vec<Bf16> = seed.iter().map(|&x| Bf16::round(x)).collect();
    // SAFETY: `pairs` holds `2 * LANES` values; the caller guarantees the ISA.
    unsafe {
        let x = V::load_pairs(pairs.as_ptr());
        let mut acc = [V::zero(); PEAK_CHAINS];
        for _ in 0..iterations {
            for a in acc.iter_mut() {
                *a = a.dot_pairs(x, x);
            }
        }
        let mut sum = V::zero();
        for a in acc {
            sum = sum.add(a);
        }
        sum.sum()
    }
}
