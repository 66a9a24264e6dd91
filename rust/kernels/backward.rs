//! The chain's backward, block of rows by block of rows, last layer first, with the forward's
//! register tiles (generic over [`SimdVec`], written once; the ISA files only wrap
//! [`backward_rows`]). For layer `i`, with `g` the gradient of its outputs:
//!
//! - `delta = g * op'(...)`, from the outputs the forward kept (or its pre-activations, where
//!   the op's gradient reads them), and the bias gradient as `delta`'s column sums
//!   (`gradient.rs`), or, where the layer's inputs end inside a register, by the weight
//!   gradient's tiles against a column of ones in the inputs' first padding lane;
//! - the inputs' gradient `delta W`, with the caller's row-major `W` as the panel: its rows are
//!   `k`-major already, so the backward packs nothing. The first layer's goes straight into the
//!   caller's `grad_input` where its rows are whole registers, else through scratch. It runs
//!   first: its tiles read `delta` in row order, fetching ahead, so the weight gradient's
//!   tiles find the block in cache (a wide `grad_output` streams from memory);
//! - the weight gradient `delta^T a` (`a` the layer's inputs) added to the caller's buffer:
//!   tiles of up to `MR` outputs (as even as they come) by registers of inputs, `k` running
//!   over the block's rows, `delta` read in place (each step of `k` broadcasts the tile's
//!   outputs' values from one row of `delta`: `Tile::k_stride`) and `a` too, a row a step,
//!   but where the bias gradient rides in a column of ones past the inputs: there each column
//!   panel of `a` is copied first. A wide layer of narrow inputs (the decoder's last) runs it
//!   transposed instead, `a^T delta`: tiles of up to `MR` inputs by registers of outputs,
//!   transposed into place at the end ([`transposes_weight_gradient`]).

use super::chain::{check_chain, saved_columns};
use super::gradient::{column_sums, delta_rows, load_upto};
use super::microkernel::{FetchAhead, Seed, Tile};
use super::{
    padded, Element, LayerDesc, LoadFrom, Packed, PostOp, SimdVec, StoredEpilogue, TileShape,
    LINE_BYTES,
};

/// The backward's register tiles, out of line, compiled once per ISA (`target_kernels!`):
/// inlined at each call, their hundreds of instances took the crate's build from 2.5 to 8
/// minutes, and each tile runs long enough (`k` = a block of rows, or a layer's outputs) for a
/// call not to count.
#[derive(Clone, Copy)]
pub(super) struct BackwardCalls<T: 'static> {
    /// [`tile_rows`](super::microkernel::tile_rows) for the inputs' gradient, `delta` read a
    /// row per tile row: `(rows, registers, tile)`.
    pub(super) input_gradient_tile: unsafe fn(usize, usize, &Tile<T, T, T>),
    /// [`tile_rows`](super::microkernel::tile_rows), `STRIDED`, for the weight gradient, `delta`
    /// read a row per step of `k`: `(rows, registers, tile)`.
    pub(super) weight_gradient_tile: unsafe fn(usize, usize, &Tile<T, T, T>),
    /// The post-ops' passes, for the tiles (whose post-op is the identity: never called).
    pub(super) epilogue: StoredEpilogue<T>,
}

/// What a backward reads: the forward's input, kept activations ([`saved_columns`]) and
/// output, the gradient of that output, and each layer's weight as the model holds it.
#[derive(Clone, Copy, Debug)]
pub struct BackwardInputs<'a, T> {
    pub input: &'a [T],
    pub saved: &'a [T],
    pub output: &'a [T],
    pub grad_output: &'a [T],
    /// Layer `i`'s weight, `out x in` row-major (`nn.Linear.weight`): the values the chain was
    /// packed from.
    pub weights: &'a [&'a [T]],
    /// Whether layer `i`'s weight and bias gradients are wanted.
    pub needs_params: &'a [bool],
}

/// Where one layer's gradients sit in a gradient buffer ([`gradient_layout`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GradientAt {
    /// The weight gradient: `out` rows of `weight_stride` values, the first `in` of them real;
    /// or, `transposed`, `in` rows (one per input) of `weight_stride == out` values.
    pub weight_at: usize,
    pub weight_stride: usize,
    /// The bias gradient: `out` values (padded to whole registers); `transposed`, the row after
    /// the weight gradient's.
    pub bias_at: usize,
    /// Whether the weight gradient is stored input by input ([`transposes_weight_gradient`]).
    pub transposed: bool,
}

/// Whether a layer's weight gradient runs transposed, its tiles up to `MR` inputs by registers of
/// outputs (stored input by input, then moved into place by the kernel's register transpose):
/// where the inputs end inside a register, the outputs are whole registers and fill at least a
/// panel, and the transposed products take at least 1/16 fewer multiply-adds. The decoder's
/// last layer (42 -> 784, 16 lanes) multiplies 43 inputs (the bias's column of ones among them)
/// by 49 registers of outputs, not 784 outputs by 3 registers of 42 inputs, an eighth of whose
/// lanes are padding: 10% fewer multiply-adds.
pub fn transposes_weight_gradient(shape: &TileShape, layer: &LayerDesc) -> bool {
    let (inputs, outputs, lanes) = (layer.in_features, layer.out_features, shape.lanes);
    let transposed_products = (inputs + 1) * (outputs / lanes);
    let products = outputs * inputs.div_ceil(lanes);
    !inputs.is_multiple_of(lanes)
        && outputs.is_multiple_of(lanes)
        && outputs >= shape.panel_width()
        && 16 * transposed_products <= 15 * products
}

/// Each layer's place in a gradient buffer for kernels of `shape`, and the buffer's length:
/// rows padded to whole registers, so the tiles load and store whole registers.
pub fn gradient_layout(shape: &TileShape, layers: &[LayerDesc]) -> (Vec<GradientAt>, usize) {
    let lanes = shape.lanes;
    let mut len = 0usize;
    let places = layers
        .iter()
        .map(|layer| {
            let transposed = transposes_weight_gradient(shape, layer);
            let (rows, weight_stride) = if transposed {
                (layer.in_features, padded(layer.out_features, lanes))
            } else {
                (layer.out_features, padded(layer.in_features, lanes))
            };
            let weight_at = len;
            let bias_at = weight_at + rows * weight_stride;
            len = bias_at + padded(layer.out_features, lanes);
            GradientAt {
                weight_at,
                weight_stride,
                bias_at,
                transposed,
            }
        })
        .collect();
    (places, len)
}

/// Scratch elements [`backward_rows`] needs for `rows` rows: two blocks of the widest layer,
/// a block's bias gradient and the largest chunk of a layer's inputs packed.
pub fn backward_scratch_len(shape: &TileShape, layers: &[LayerDesc], rows: usize) -> usize {
    let block = rows.min(block_rows(shape, layers));
    let packed = layers
        .iter()
        .map(|layer| {
            let width = padded(layer.in_features, shape.lanes);
            chunk_rows(shape, block, width).saturating_mul(width)
        })
        .max()
        .unwrap_or(0);
    let widest = widest(layers, shape.lanes);
    block
        .saturating_mul(widest)
        .saturating_mul(2)
        .saturating_add(widest)
        .saturating_add(packed)
}

/// How many values of a layer's inputs a weight gradient takes at once (packed, where they need
/// the column of ones): 128 KiB of f32, which stay in L2 while every tile of outputs reads them.
const PACKED_VALUES: usize = 32 * 1024;

/// Rows of a block of `block` rows whose inputs, `width` values a row (padded), a weight
/// gradient takes at once: as many as [`PACKED_VALUES`] holds, at least the forward's block
/// (a chunk's tiles add their sums to the gradient, a load and a store per register). The
/// seed's encoder (784 wide) takes the forward's 64 rows at a time (AVX-512); a 42-wide layer
/// its whole block.
fn chunk_rows(shape: &TileShape, block: usize, width: usize) -> usize {
    block.min(shape.block_rows.max(PACKED_VALUES / width.max(1)))
}

/// How many values of deltas (`block x out`) a block may hold: 64 KiB of f32, which stays in
/// L2 beside the weights while every weight-gradient tile broadcasts from it.
const DELTA_VALUES: usize = 16 * 1024;
/// The most forward blocks a backward block spans.
const MAX_BLOCKS: usize = 4;

/// Rows per block of the backward. A weight gradient's tiles run `k` over a block's rows and
/// then add their sums to the gradient (a load, an add and a store per register), so a longer
/// block amortizes that; but the block's deltas must stay in L2. Measured on Zen 3 (with the
/// deltas transposed then): the seed's encoder (widest output 42) 1.14x faster at 1,024 rows
/// and 1.23x at 4,096 with blocks 4x the forward's; its decoder (784) 0.88x with them, so it
/// keeps the forward's. With the deltas read in place, the seed AE (784) ran 0.94-1.00x with
/// blocks of 160 rows and 1.00-1.05x with 32 against its 64 (Emerald Rapids, 1 thread, noisy):
/// it keeps them.
fn block_rows(shape: &TileShape, layers: &[LayerDesc]) -> usize {
    let widest_out = layers
        .iter()
        .map(|l| padded(l.out_features, shape.lanes))
        .max()
        .unwrap_or(1)
        .max(1);
    let fitting = DELTA_VALUES / widest_out / shape.mr * shape.mr;
    fitting.clamp(shape.block_rows, MAX_BLOCKS * shape.block_rows)
}

/// Copies `rows` rows of `width` values, `lds` apart from `src`, into `dst` as column panels of
/// `panel_width` values (the last one narrower where `width` ends), each panel `rows` rows of
/// whole registers (zeros past its width, but with `ones_column` a one just past it), the panel
/// starting at column `col` at `dst + col * rows`. Row by row: the rows are read in order, a
/// stream the hardware prefetchers follow (a layer's inputs at 4,096 rows do not fit in L2:
/// 12.8 MB at 784 wide, and read panel by panel, their rows a whole input row apart across
/// pages, the encoder's backward spent 43% of its time waiting on those loads, Zen 4).
///
/// # Safety
/// `src` is readable for `rows x width` values at its stride, `dst` writable for `rows x
/// padded(width, LANES)` values, not overlapping it; `panel_width` is a multiple of `LANES`;
/// `ones_column` only where `width` is not; the CPU supports `V`'s ISA.
#[inline(always)]
unsafe fn pack_panels<V: SimdVec>(
    rows: usize,
    width: usize,
    src: *const V::Elem,
    lds: usize,
    panel_width: usize,
    ones_column: bool,
    dst: *mut V::Elem,
) {
    // SAFETY: loads cover columns `< width` of rows `< rows` (the tail partially); panel `col`
    // takes `rows x padded(min(panel_width, width - col))` values from `dst + col * rows`, which
    // the panels before it end at, and all of them `rows x padded(width)`; the one goes to the
    // last panel's column `columns`, inside its row where `width` ends inside a register.
    unsafe {
        for row in 0..rows {
            for col in (0..width).step_by(panel_width) {
                let columns = panel_width.min(width - col);
                let panel_row = dst.add(col * rows + row * padded(columns, V::LANES));
                for offset in (0..columns).step_by(V::LANES) {
                    let count = V::LANES.min(columns - offset);
                    load_upto::<V>(src.add(row * lds + col + offset), count)
                        .store(panel_row.add(offset));
                }
                if ones_column && col + columns == width {
                    *panel_row.add(columns) = V::Elem::from_f64(1.0);
                }
            }
        }
    }
}

/// A block's weight and bias gradients of a layer whose weight gradient runs transposed
/// ([`transposes_weight_gradient`]), added to `weight_grad` (its `in + 1` rows of `stride`
/// values, the bias's last): each chunk of the layer's inputs (`below`, `k` wide) packed
/// with a column of ones (a narrow copy: the inputs end inside a register), then tiles of up to
/// `MR` of its columns (`even_tiles`), the ones' among them, by a panel of the outputs' columns
/// of `delta`, read in place a row per step of `k`, the tiles of a panel one after another while
/// it is in L1.
///
/// # Safety
/// `below` and `delta` hold `block` rows at their strides, `k` and `out` values wide, `packed`
/// `chunk_rows x padded(k)` values, `weight_grad` `k + 1` rows of `stride >= padded(out)`
/// values; `k` is not whole registers; `calls` are `V`'s ISA's, which the CPU supports.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn transposed_weight_gradient<V: SimdVec, const MR: usize, const NV_MAX: usize>(
    chunk_rows: usize,
    block: usize,
    (k, out): (usize, usize),
    (below, ld_below): (*const V::Elem, usize),
    (delta, ld_delta): (*const V::Elem, usize),
    packed: *mut V::Elem,
    weight_grad: *mut V::Elem,
    stride: usize,
    calls: BackwardCalls<V::Elem>,
) {
    let width = padded(k, V::LANES);
    let panel_width = NV_MAX * V::LANES;
    // SAFETY: the packed chunk is `chunk x width` values, its ones in column `k < width`; a
    // tile reads its rows `first..first + tile_rows` (`even_tiles` of the `k + 1`: columns
    // `<= k`) and `delta`'s columns `col..col + columns` (the last register's past `out` masked
    // by `last_lanes`) of the chunk's rows, and adds to rows `<= k` of `weight_grad`, whole
    // registers inside `stride`; the ISA is the caller's guarantee.
    unsafe {
        for chunk_start in (0..block).step_by(chunk_rows) {
            let chunk = chunk_rows.min(block - chunk_start);
            let chunk_below = below.add(chunk_start * ld_below);
            pack_panels::<V>(chunk, k, chunk_below, ld_below, width, true, packed);
            for col in (0..out).step_by(panel_width) {
                let columns = panel_width.min(out - col);
                let nv = columns.div_ceil(V::LANES);
                for (first, tile_rows) in even_tiles(k + 1, MR) {
                    let tile = Tile {
                        a: packed.add(first).cast_const(),
                        lda: 1,
                        k_stride: width,
                        k: chunk,
                        panel: delta.add(chunk_start * ld_delta + col),
                        panel_stride: ld_delta,
                        last_lanes: columns - (nv - 1) * V::LANES,
                        seed: Seed::Output,
                        post_op: PostOp::Identity,
                        epilogue: calls.epilogue,
                        out: weight_grad.add(first * stride + col),
                        ldo: stride,
                        prefetch_out: false,
                        fetch: FetchAhead::NONE,
                    };
                    (calls.weight_gradient_tile)(tile_rows, nv, &tile);
                }
            }
        }
    }
}

/// `count` rows as tiles of at most `mr`, as even as they come: `(first, rows)` of each. 42 rows
/// of 8 go as six of 7, not five of 8 and one of 2, whose tile multiplies two rows for the same
/// loads of a panel as eight.
fn even_tiles(count: usize, mr: usize) -> impl ExactSizeIterator<Item = (usize, usize)> {
    let tiles = count.div_ceil(mr);
    let (rows, extra) = (count / tiles.max(1), count % tiles.max(1));
    (0..tiles).map(move |tile| {
        (
            tile * rows + tile.min(extra),
            rows + usize::from(tile < extra),
        )
    })
}

/// The most values a row of any layer's inputs or outputs takes, padded to whole registers.
fn widest(layers: &[LayerDesc], lanes: usize) -> usize {
    layers
        .iter()
        .map(|l| padded(l.in_features.max(l.out_features), lanes))
        .max()
        .unwrap_or(0)
}

/// The backward of `chain` over a contiguous run of rows: `grad_input` (if wanted) gets the
/// input's gradient, and `grads` ([`gradient_layout`]) has each wanted layer's weight and bias
/// gradients over these rows added to it. Layers below the lowest one whose gradients are
/// wanted are skipped (with no `grad_input`).
///
/// # Safety
/// The CPU supports `V`'s ISA, and `shape.lanes == V::LANES`, `shape.mr == MR`,
/// `shape.nv_max == NV_MAX`; `calls` are that ISA's. (Shapes and lengths are
/// checked, with a panic on mismatch.)
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(super) unsafe fn backward_rows<V: LoadFrom<W>, W, const MR: usize, const NV_MAX: usize>(
    shape: &TileShape,
    chain: Packed<'_, W, V::Elem>,
    inputs: &BackwardInputs<'_, V::Elem>,
    mut grad_input: Option<&mut [V::Elem]>,
    grads: &mut [V::Elem],
    scratch: &mut [V::Elem],
    calls: BackwardCalls<V::Elem>,
) {
    assert!(shape.lanes == V::LANES && shape.mr == MR && shape.nv_max == NV_MAX);
    assert!(MR <= 8 && NV_MAX <= 4 && shape.block_rows.is_multiple_of(MR));
    let layers = chain.layers;
    let rows = check_chain(
        shape,
        &chain,
        inputs.input,
        inputs.output,
        Some(inputs.saved),
    );
    assert_eq!(
        inputs.grad_output.len(),
        inputs.output.len(),
        "grad_output matches the output"
    );
    assert!(
        inputs.weights.len() == layers.len() && inputs.needs_params.len() == layers.len(),
        "a weight and a flag per layer"
    );
    for (weight, layer) in inputs.weights.iter().zip(layers) {
        assert_eq!(
            Some(weight.len()),
            layer.out_features.checked_mul(layer.in_features),
            "weights match the layers"
        );
    }
    if let Some(grad_input) = &grad_input {
        assert_eq!(grad_input.len(), inputs.input.len(), "grad_input matches");
    }
    let (places, grads_len) = gradient_layout(shape, layers);
    assert!(
        grads.len() >= grads_len,
        "the gradient buffer holds every layer"
    );
    assert!(
        scratch.len() >= backward_scratch_len(shape, layers, rows),
        "scratch is large enough"
    );
    let lowest = if grad_input.is_some() {
        0
    } else {
        match inputs.needs_params.iter().position(|&needs| needs) {
            Some(lowest) => lowest,
            None => return,
        }
    };
    if rows == 0 {
        return;
    }

    // Where a layer's inputs end inside a register, its packed inputs carry a column of ones in
    // the first padding lane, so the weight gradient's tiles add up the bias gradient there in
    // passing (moved to its place below); a pass of its own over the deltas, the first reader
    // of a 784-wide `grad_output`, waited on memory (the seed AE's backward 1.08x without it).
    let bias_in_padding = |index: usize| {
        inputs.needs_params[index]
            && !layers[index].in_features.is_multiple_of(V::LANES)
            && !places[index].transposed
    };
    let padding_column = |index: usize| {
        let place = places[index];
        let (k, out) = (layers[index].in_features, layers[index].out_features);
        (0..out).map(move |o| place.weight_at + o * place.weight_stride + k)
    };
    for index in (lowest..layers.len()).filter(|&index| bias_in_padding(index)) {
        for at in padding_column(index) {
            grads[at] = Element::ZERO;
        }
    }

    let block_rows = rows.min(block_rows(shape, layers));
    let widest = widest(layers, V::LANES);
    // Two buffers for the deltas and the gradients of the layers' inputs, each written while
    // the other (or `grad_output`) is read; a delta of an op without a gradient (the identity)
    // is the gradient itself, wherever it is.
    let (first_buffer, rest) = scratch.split_at_mut(block_rows * widest);
    let (second_buffer, rest) = rest.split_at_mut(block_rows * widest);
    // A block's bias gradient, summed apart, then added to the gradient: summed straight into
    // it row by row, a call's rows (up to `SUMMED_ROWS`, 4,608) went through as many roundings
    // (a bias gradient of one sign was 4e-5 off in float32, against PyTorch's 1e-7); so, a
    // block's rows, then the blocks.
    let (block_bias_grad, rest) = rest.split_at_mut(widest);
    let buffers = [first_buffer.as_mut_ptr(), second_buffer.as_mut_ptr()];
    let other = |held: *const V::Elem| {
        if std::ptr::eq(held, buffers[0]) {
            buffers[1]
        } else {
            buffers[0]
        }
    };
    let panel_width = NV_MAX * V::LANES;
    // A chunk of a layer's inputs packed for its weight gradient.
    let packed = rest;
    let (columns, saved_width) = saved_columns(layers);
    let (first_in, last_out) = (layers[0].in_features, layers[layers.len() - 1].out_features);
    // Where the input's rows are whole registers, the first layer's tiles store its gradient
    // straight into `grad_input` (a copy out of scratch took 10% of the seed encoder's
    // backward); else into scratch, copied after.
    let grad_input_direct = grad_input.is_some() && first_in.is_multiple_of(V::LANES);

    for block_start in (0..rows).step_by(block_rows) {
        let block = block_rows.min(rows - block_start);
        let input = &inputs.input[block_start * first_in..][..block * first_in];
        let saved = &inputs.saved[block_start * saved_width..][..block * saved_width];
        let output = &inputs.output[block_start * last_out..][..block * last_out];
        let grad_output = &inputs.grad_output[block_start * last_out..][..block * last_out];
        // The gradient of the current layer's outputs.
        let (mut grad, mut ldg): (*const V::Elem, usize) = (grad_output.as_ptr(), last_out);
        for index in (lowest..layers.len()).rev() {
            let layer = &layers[index];
            let (k, out) = (layer.in_features, layer.out_features);
            // The layer's inputs and outputs as the forward left them.
            let (below, ld_below, all_below) =
                match index.checked_sub(1).and_then(|i| columns[i].outputs) {
                    Some(at) => (saved[at..].as_ptr(), saved_width, inputs.saved),
                    None => (input.as_ptr(), first_in, inputs.input),
                };
            // What the op's gradient reads: its pre-activations, or its outputs.
            let (value, ld_value) = match (columns[index].pre, columns[index].outputs) {
                (Some(at), _) | (None, Some(at)) => (saved[at..].as_ptr(), saved_width),
                (None, None) => (output.as_ptr(), last_out),
            };
            let needs_params = inputs.needs_params[index];
            let ones_column = bias_in_padding(index);
            let transposed = places[index].transposed;
            let sums_bias = needs_params && !ones_column && !transposed;
            let bias_grad = if sums_bias {
                let sums = &mut block_bias_grad[..padded(out, V::LANES)];
                sums.fill(Element::ZERO);
                sums.as_mut_ptr()
            } else {
                std::ptr::null_mut()
            };
            // SAFETY: the buffers hold `block` rows at the strides given (checked above and by
            // `check_chain`); `delta`, `grad_below` and `pre` each hold `block` rows of `widest >=
            // padded(width)` values for every width of the chain, as `bias_grad` (the block's, in
            // scratch) holds `padded(out)` (a weight gradient's tile reads
            // `delta`'s columns `first..first + tile_rows`, `even_tiles` of `out`, of rows
            // `chunk_start..chunk_start + chunk`, `ld_delta >= out` apart), `packed` `chunk_rows x
            // padded(k)` values for every layer (`backward_scratch_len`); the weight panels are the
            // caller's `out x k` matrices and every tile reads columns `< k` of them (`last_lanes`
            // masks the rest), as a weight gradient's tile reads the layer's inputs where it takes
            // them in place (`block` rows of `k` from `below`, `ld_below >= k` apart); the gradient
            // rows are whole registers of `weight_stride` (the column of ones' lane `k` is inside,
            // `k` not being whole registers); `grad_input` (written directly only where `first_in`
            // is whole registers, so no tile stores past a row) holds the block's `block x
            // first_in` values from `block_start` (its length is the input's, asserted above); the
            // ISA is the caller's guarantee.
            unsafe {
                let (delta, ld_delta): (*const V::Elem, usize) =
                    if matches!(layer.post_op, PostOp::Identity) {
                        if !bias_grad.is_null() {
                            column_sums::<V>(block, out, grad, ldg, bias_grad);
                        }
                        (grad, ldg)
                    } else {
                        let delta = other(grad);
                        let ld_delta = padded(out, V::LANES);
                        delta_rows::<V>(
                            layer.post_op,
                            block,
                            out,
                            grad,
                            ldg,
                            value,
                            ld_value,
                            delta,
                            ld_delta,
                            bias_grad,
                        );
                        (delta, ld_delta)
                    };
                if sums_bias {
                    let bias_grad = &mut grads[places[index].bias_at..][..out];
                    for (sum, &block_sum) in bias_grad.iter_mut().zip(&*block_bias_grad) {
                        *sum = *sum + block_sum;
                    }
                }
                // The inputs' gradient first: its tiles read `delta` row by row, fetching each next
                // tile's rows as they go (a 784-wide `grad_output` streams from memory), so the
                // weight gradient's tiles below, a row of `delta` a step, find the block in cache.
                let below_wanted = !(index == lowest && (index > 0 || grad_input.is_none()));
                let mut below_gradient = None;
                if below_wanted {
                    let weight = inputs.weights[index].as_ptr();
                    let direct = index == 0 && grad_input_direct;
                    let (below_grad, ld_below_grad) = match grad_input.as_deref_mut() {
                        Some(grad_input) if direct => {
                            (grad_input[block_start * first_in..].as_mut_ptr(), first_in)
                        }
                        _ => (other(delta), padded(k, V::LANES)),
                    };
                    for row in (0..block).step_by(MR) {
                        for col in (0..k).step_by(panel_width) {
                            let width = panel_width.min(k - col);
                            let nv = width.div_ceil(V::LANES);
                            let tile = Tile {
                                a: delta.add(row * ld_delta),
                                lda: ld_delta,
                                k_stride: 1,
                                k: out,
                                panel: weight.add(col),
                                panel_stride: k,
                                last_lanes: width - (nv - 1) * V::LANES,
                                seed: Seed::Zero,
                                post_op: PostOp::Identity,
                                epilogue: calls.epilogue,
                                out: below_grad.add(row * ld_below_grad + col),
                                ldo: ld_below_grad,
                                // The caller's array may be far from cache (12.8 MB at 4,096 rows
                                // of 784).
                                prefetch_out: direct,
                                fetch: FetchAhead::NONE,
                            };
                            (calls.input_gradient_tile)(MR.min(block - row), nv, &tile);
                        }
                    }
                    below_gradient = Some((below_grad, ld_below_grad));
                }
                if needs_params && transposed {
                    transposed_weight_gradient::<V, MR, NV_MAX>(
                        chunk_rows(shape, block_rows, padded(k, V::LANES)),
                        block,
                        (k, out),
                        (below, ld_below),
                        (delta, ld_delta),
                        packed.as_mut_ptr(),
                        grads[places[index].weight_at..].as_mut_ptr(),
                        places[index].weight_stride,
                        calls,
                    );
                } else if needs_params {
                    let place = places[index];
                    let weight_grad = grads[place.weight_at..].as_mut_ptr();
                    // A chunk of rows at a time (`chunk_rows`: its inputs stay in L2), column
                    // panel outer, so a panel stays in cache while every tile of outputs runs
                    // over it. The tiles read the inputs where they lie, each `k` step a row:
                    // the rows fetched ahead into L2 (below) serve them as well as a packed copy
                    // would, without the copy (the seed encoder's backward 1.08-1.11x at
                    // 1,024-4,096 rows of inputs streamed from memory, 1.02-1.13x at 256; Zen 4).
                    // Inputs that need the column of ones are packed into column panels first.
                    let chunk_rows = chunk_rows(shape, block_rows, padded(k, V::LANES));
                    for chunk_start in (0..block).step_by(chunk_rows) {
                        let chunk = chunk_rows.min(block - chunk_start);
                        let chunk_below = below.add(chunk_start * ld_below);
                        if ones_column {
                            pack_panels::<V>(
                                chunk,
                                k,
                                chunk_below,
                                ld_below,
                                panel_width,
                                ones_column,
                                packed.as_mut_ptr(),
                            );
                        }
                        // The rows after this chunk (the next chunk's, or the next block's), whole
                        // rows, fetched into L2 by the tiles a few lines a step as they multiply
                        // (a wide input does not fit in L2, and its packing waited on memory):
                        // each tile a part, a step every cache line of its `k`.
                        let next_row = (block_start + chunk_start + chunk).min(rows);
                        let next_rows = chunk.min(rows - next_row);
                        let ahead = &all_below[next_row * ld_below..][..next_rows * ld_below];
                        let tiles = k.div_ceil(panel_width) * even_tiles(out, MR).len();
                        let steps = chunk.div_ceil(LINE_BYTES / size_of::<V::Elem>());
                        let mut tile_index = 0;
                        for col in (0..k).step_by(panel_width) {
                            let width = panel_width.min(k - col);
                            let nv = width.div_ceil(V::LANES);
                            // The last panel's column of ones, stored too.
                            let stored = width + usize::from(ones_column && col + width == k);
                            for (first, tile_rows) in even_tiles(out, MR) {
                                let tile = Tile {
                                    a: delta.add(chunk_start * ld_delta + first),
                                    lda: 1,
                                    k_stride: ld_delta,
                                    k: chunk,
                                    panel: if ones_column {
                                        packed.as_ptr().add(col * chunk)
                                    } else {
                                        chunk_below.add(col)
                                    },
                                    panel_stride: if ones_column {
                                        nv * V::LANES
                                    } else {
                                        ld_below
                                    },
                                    last_lanes: stored - (nv - 1) * V::LANES,
                                    seed: Seed::Output,
                                    post_op: PostOp::Identity,
                                    epilogue: calls.epilogue,
                                    out: weight_grad.add(first * place.weight_stride + col),
                                    ldo: place.weight_stride,
                                    prefetch_out: false,
                                    fetch: FetchAhead::part(ahead, tiles, tile_index, steps),
                                };
                                (calls.weight_gradient_tile)(tile_rows, nv, &tile);
                                tile_index += 1;
                            }
                        }
                    }
                }
                if let Some(at) = below_gradient {
                    (grad, ldg) = at;
                }
            }
        }
        if let (Some(grad_input), false) = (grad_input.as_deref_mut(), grad_input_direct) {
            let block_grad = &mut grad_input[block_start * first_in..][..block * first_in];
            for (row, values) in block_grad.chunks_exact_mut(first_in).enumerate() {
                // SAFETY: the first layer's loop above left the input's gradient in a scratch
                // buffer, `block` rows of `first_in` values `ldg` apart, not overlapping
                // `grad_input`.
                values.copy_from_slice(unsafe {
                    std::slice::from_raw_parts(grad.add(row * ldg), first_in)
                });
            }
        }
    }
    for index in (lowest..layers.len()).filter(|&index| bias_in_padding(index)) {
        let bias_at = places[index].bias_at;
        for (o, at) in padding_column(index).enumerate() {
            let sum = std::mem::take(&mut grads[at]);
            grads[bias_at + o] = grads[bias_at + o] + sum;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{
        even_tiles, gradient_layout, transposes_weight_gradient, GradientAt, LayerDesc, TileShape,
    };
    use crate::kernels::PostOp;

    fn shape(lanes: usize, mr: usize, nv_max: usize) -> TileShape {
        TileShape {
            lanes,
            mr,
            nv_max,
            block_rows: 8 * mr,
            fast_transpose: true,
            half_lanes: 0,
            k_group: 1,
        }
    }

    fn layer(in_features: usize, out_features: usize) -> LayerDesc {
        LayerDesc {
            in_features,
            out_features,
            padded_out: out_features,
            weights_at: 0,
            bias_at: 0,
            post_op: PostOp::Identity,
            dot_from: out_features,
            dot_at: 0,
            panel_columns: out_features,
        }
    }

    #[test]
    fn wide_outputs_of_narrow_inputs_transpose_their_weight_gradient() {
        let (avx512, avx2, neon, scalar) = (
            shape(16, 8, 3),
            shape(8, 6, 2),
            shape(4, 6, 4),
            shape(1, 4, 4),
        );
        // (shape, in, out, transposed)
        for (shape, inputs, outputs, want) in [
            (avx512, 42, 784, true),
            (avx512, 784, 42, false), // the inputs are whole registers
            (avx512, 42, 16, false),  // less than a panel of outputs
            (avx512, 42, 100, false), // outputs not whole registers
            (avx512, 45, 784, false), // 46 x 49 against 784 x 3: 4% fewer, not 1/16
            (avx2, 42, 784, true),
            (avx2, 42, 16, true),   // 43 x 2 against 16 x 6
            (neon, 42, 784, false), // 43 x 196 against 784 x 11: 2% fewer
            (neon, 1, 64, true),
            (avx512, 2, 64, true),
            (scalar, 42, 784, false),
        ] {
            let got = transposes_weight_gradient(&shape, &layer(inputs, outputs));
            assert_eq!(got, want, "{} lanes, {inputs} -> {outputs}", shape.lanes);
        }
    }

    #[test]
    fn a_transposed_weight_gradient_takes_a_row_per_input_and_the_bias_after() {
        let layers = [layer(784, 42), layer(42, 784)];
        let (places, len) = gradient_layout(&shape(16, 8, 3), &layers);
        let encoder = GradientAt {
            weight_at: 0,
            weight_stride: 784,
            bias_at: 42 * 784,
            transposed: false,
        };
        let decoder_at = 42 * 784 + 48;
        let decoder = GradientAt {
            weight_at: decoder_at,
            weight_stride: 784,
            bias_at: decoder_at + 42 * 784,
            transposed: true,
        };
        assert_eq!(places, [encoder, decoder]);
        assert_eq!(len, decoder_at + 43 * 784);
    }

    #[test]
    fn rows_split_into_tiles_as_even_as_they_come() {
        let tiles = |count, mr| even_tiles(count, mr).collect::<Vec<_>>();
        assert_eq!(
            tiles(42, 8),
            [(0, 7), (7, 7), (14, 7), (21, 7), (28, 7), (35, 7)]
        );
        assert_eq!(
            tiles(43, 8),
            [(0, 8), (8, 7), (15, 7), (22, 7), (29, 7), (36, 7)]
        );
        assert_eq!(tiles(16, 8), [(0, 8), (8, 8)]);
        assert_eq!(tiles(5, 8), [(0, 5)]);
        assert_eq!(tiles(0, 8), []);
        for mr in 1..=8 {
            for count in 0..100 {
                let split = tiles(count, mr);
                assert_eq!(split.len(), count.div_ceil(mr));
                let mut next = 0;
                for (first, rows) in split {
                    assert!(first == next && (1..=mr).contains(&rows), "{count} of {mr}");
                    next += rows;
                }
                assert_eq!(next, count);
            }
        }
    }
}
