//! The loop nests: a chain run block of rows by block of rows, each layer's outputs register
//! tile by register tile, hidden activations kept in scratch that stays in L1/L2. Generic over
//! [`SimdVec`] and the weights' storage type ([`LoadFrom`]), written once; the ISA files only wrap
//! [`forward_rows`].

use super::epilogue::StoredEpilogue;
use super::gradient::load_upto;
use super::microkernel::{
    dot_tile_rows, tile_rows, DotTile, FetchAhead, Seed, Tile, DOT_OUTS, DOT_ROWS,
};
use super::{
    padded, Element, LayerDesc, LoadFrom, Packed, Panels, PostOp, SimdVec, TileShape, L1_HALF_BYTES,
};

/// Scratch elements a kernel of `shape` needs to run `rows` rows through `chain`.
pub fn scratch_len<W, T>(shape: &TileShape, chain: &Packed<'_, W, T>, rows: usize) -> usize {
    // Saturating: a chain too large for memory asks for more scratch than any buffer holds.
    let widest = chain.layers.iter().map(|l| l.padded_out).max().unwrap_or(0);
    let in_registers_of_outputs = rows
        .min(shape.block_rows)
        .saturating_mul(widest)
        .saturating_mul(2);
    match shape.k_group {
        2 => return super::pairs::scratch_len(shape, chain, rows),
        4 => return super::quads::scratch_len(shape, chain, rows),
        _ => {}
    }
    match chain.lanes_layers.first() {
        Some(first) => {
            let widest = chain.lanes_layers.iter().map(|l| l.out_features).max();
            let values = widest.unwrap_or(0).saturating_mul(2);
            let in_lanes = shape
                .lanes_block()
                .saturating_mul(first.in_features.saturating_add(values));
            in_lanes.max(in_registers_of_outputs)
        }
        None => in_registers_of_outputs,
    }
}

/// Where a row of the `saved` buffer of [`forward_rows`] keeps one layer's values for a
/// backward: its outputs (after the post-op; every layer but the last, whose outputs are the
/// chain's), and its pre-activations where its op's gradient reads them
/// ([`PostOp::gradient_reads_pre`](super::PostOp::gradient_reads_pre)). Each is
/// `out_features` values from that column.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SavedColumns {
    pub outputs: Option<usize>,
    pub pre: Option<usize>,
}

/// Each layer's [`SavedColumns`]: the hidden layers' outputs side by side, then the
/// pre-activations kept, layer after layer; and the width of a row.
pub fn saved_columns(layers: &[LayerDesc]) -> (Vec<SavedColumns>, usize) {
    let last = layers.len().saturating_sub(1);
    // Saturating: a chain too large for memory asks for more than any buffer holds.
    let mut width = 0usize;
    let mut columns: Vec<SavedColumns> = layers
        .iter()
        .enumerate()
        .map(|(index, layer)| {
            let outputs = (index < last).then_some(width);
            if index < last {
                width = width.saturating_add(layer.out_features);
            }
            SavedColumns { outputs, pre: None }
        })
        .collect();
    for (column, layer) in columns.iter_mut().zip(layers) {
        if layer.post_op.gradient_reads_pre() {
            column.pre = Some(width);
            width = width.saturating_add(layer.out_features);
        }
    }
    (columns, width)
}

/// The width of a row of the `saved` buffer of [`forward_rows`] (see [`saved_columns`]).
pub fn saved_width(layers: &[LayerDesc]) -> usize {
    saved_columns(layers).1
}

/// Panics unless the chain, buffers and packing agree; after it, every pointer the loop nest
/// forms stays inside its slice. Which form each layer takes is the cost model's business; what
/// is checked here is only what the register tiles rely on.
#[inline(always)]
pub(super) fn check_chain<W, T>(
    shape: &TileShape,
    chain: &Packed<'_, W, T>,
    input: &[T],
    output: &[T],
    saved: Option<&[T]>,
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
        Some(output.len()),
        rows.checked_mul(last.out_features),
        "output matches the input rows"
    );
    if let Some(saved) = saved {
        assert_eq!(
            Some(saved.len()),
            rows.checked_mul(saved_width(layers)),
            "saved matches the rows"
        );
    }
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
        let (k, out, dot_from) = (layer.in_features, layer.out_features, layer.dot_from);
        assert!(dot_from <= out, "dot form starts inside the outputs");
        // A tile's stores end at a whole register, or at a half one where packing split there,
        // so they stay inside the row: padded to whole registers, or as long as the outputs.
        let split_at = dot_from % shape.lanes;
        let rows_fit = if rows_in_lanes {
            dot_from == 0 && layer.padded_out == out
        } else if dot_from < out {
            layer.padded_out == out
                && (split_at == 0 || (shape.half_lanes > 0 && split_at == shape.half_lanes))
        } else {
            layer.padded_out == shape.padded(out)
        };
        assert!(rows_fit, "packed for this tile shape");
        // Checked arithmetic: these types are public, and a wrapped sum would pass the test.
        let ends_within = |at: usize, count: Option<usize>, len: usize| {
            count
                .and_then(|n| at.checked_add(n))
                .is_some_and(|end| end <= len)
        };
        let dot_len = shape
            .lanes
            .checked_mul(k.div_ceil(shape.lanes))
            .and_then(|padded_k| padded_k.checked_mul(out - dot_from));
        assert!(
            ends_within(
                layer.weights_at,
                shape.grouped(k).checked_mul(shape.panel_columns(dot_from)),
                chain.weights.len()
            ) && ends_within(layer.dot_at, dot_len, chain.weights.len()),
            "packed weights in the buffer"
        );
        assert!(
            ends_within(layer.bias_at, Some(layer.padded_out), chain.biases.len()),
            "packed bias in the buffer"
        );
    }
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
/// With `saved` (`rows x` [`saved_width`]), each row also keeps what a backward reads
/// ([`saved_columns`]): every layer's outputs but the last's, and the pre-activations of the
/// layers whose op's gradient reads them (such a layer's tiles then store its Linear, which is
/// kept before the op's pass over the stored values: the same function of the same values as in
/// the tiles, so the same bits). Such a call runs every row in registers of outputs (rows in the
/// lanes would leave them transposed).
///
/// # Safety
/// The CPU supports `V`'s ISA, and `shape.lanes == V::LANES`, `shape.mr == MR`,
/// `shape.nv_max == NV_MAX`.
#[inline(always)]
pub unsafe fn forward_rows<V: LoadFrom<W>, W, const MR: usize, const NV_MAX: usize>(
    shape: &TileShape,
    chain: Packed<'_, W, V::Elem>,
    input: &[V::Elem],
    output: &mut [V::Elem],
    scratch: &mut [V::Elem],
    mut saved: Option<&mut [V::Elem]>,
    epilogue: StoredEpilogue<V::Elem>,
) {
    assert!(shape.lanes == V::LANES && shape.mr == MR && shape.nv_max == NV_MAX);
    assert!(shape.half_lanes == 0 || shape.half_lanes == V::HALF_LANES);
    assert!(MR <= 8 && NV_MAX <= 4 && shape.block_rows.is_multiple_of(MR));
    let rows = check_chain(shape, &chain, input, output, saved.as_deref());
    assert!(
        scratch.len() >= scratch_len(shape, &chain, rows),
        "scratch is large enough"
    );
    let layers = chain.layers;
    if rows == 0 {
        return;
    }
    // Whole blocks of rows-in-lanes rows where that packing exists; the rest (a small batch, the
    // last rows) in registers of outputs.
    let lanes_block = shape.lanes_block();
    let lanes_rows = if chain.lanes_layers.is_empty() || saved.is_some() {
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
            forward_rows_in_lanes::<V, W, MR, NV_MAX>(
                &chain,
                lanes_block,
                lanes_rows,
                lanes_input,
                lanes_output,
                scratch,
                epilogue,
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
    // Only a saving call lays out the saved columns (a Vec each call: a batch-1 cost).
    let saved_layout = saved.as_ref().map(|_| saved_columns(layers));
    let saved_width = saved_layout.as_ref().map_or(0, |(_, width)| *width);

    for block_start in (0..rows).step_by(block_rows) {
        let block = block_rows.min(rows - block_start);
        let block_input =
            &input[block_start * layers[0].in_features..][..block * layers[0].in_features];
        let mut src: *const V::Elem = block_input.as_ptr();
        let mut src_stride = layers[0].in_features;
        let mut into_ping = true;
        for (index, layer) in layers.iter().enumerate() {
            let is_last = index == last_index;
            let columns = saved_layout.as_ref().map(|(columns, _)| columns[index]);
            let keeps_pre = columns.is_some_and(|columns| columns.pre.is_some());
            let linear = LayerDesc {
                post_op: PostOp::Identity,
                ..*layer
            };
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
                layer: if keeps_pre { &linear } else { layer },
                weights: chain.weights,
                biases: chain.biases,
                rows: block,
                src,
                src_stride,
                dst,
                dst_stride,
                dst_is_output: direct,
                epilogue,
            };
            // SAFETY: `check_chain` proved the packed sizes; `src` holds `block` rows of at least
            // `layer.in_features` values at `src_stride`, `dst` has room for `block` rows of
            // `layer.padded_out` values at `dst_stride` (or exactly `out_features` when direct,
            // which then equals `padded_out`); the caller guarantees the ISA.
            unsafe {
                layer_block::<V, W, MR, NV_MAX>(&at);
                dot_layer_block::<V, W>(&at);
            };
            if let (Some(saved), Some(columns)) = (saved.as_deref_mut(), columns) {
                let block_saved = &mut saved[block_start * saved_width..][..block * saved_width];
                let out = layer.out_features;
                // SAFETY: `dst` holds `block` rows of `out` values `dst_stride` apart, as
                // written above; no slice into it is alive.
                let computed = |row: usize| unsafe {
                    std::slice::from_raw_parts(dst.add(row * dst_stride), out)
                };
                if let Some(pre) = columns.pre {
                    for (row, saved_row) in block_saved.chunks_exact_mut(saved_width).enumerate() {
                        saved_row[pre..][..out].copy_from_slice(computed(row));
                    }
                    // SAFETY: as for the tiles above, whose outputs these are.
                    unsafe { (epilogue.values)(layer.post_op, dst, dst_stride, block, out) };
                }
                if let Some(outputs) = columns.outputs {
                    for (row, saved_row) in block_saved.chunks_exact_mut(saved_width).enumerate() {
                        saved_row[outputs..][..out].copy_from_slice(computed(row));
                    }
                }
            }
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
unsafe fn forward_rows_in_lanes<V: LoadFrom<W>, W, const MR: usize, const NV_MAX: usize>(
    chain: &Packed<'_, W, V::Elem>,
    block: usize,
    rows: usize,
    input: &[V::Elem],
    output: &mut [V::Elem],
    scratch: &mut [V::Elem],
    epilogue: StoredEpilogue<V::Elem>,
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
                let weights = chain.weights.as_ptr().add(layer.dot_at);
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
                        k_stride: 1,
                        k: layer.in_features,
                        panel: src,
                        panel_stride: block,
                        last_lanes: V::LANES,
                        seed: Seed::RowBias(chain.biases.as_ptr().add(layer.bias_at + first)),
                        post_op: layer.post_op,
                        epilogue,
                        out: dst.add(first * block),
                        ldo: block,
                        prefetch_out: false,
                        fetch: FetchAhead::NONE,
                    };
                    tile_rows::<V, W, V::Elem, MR, NV_MAX, false>(
                        tile_outs.min(out - first),
                        NV_MAX,
                        &tile,
                    );
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

/// The most values a [`SimdVec::transpose_square`] moves: 16 x 16 (f32 in AVX-512 registers).
const WIDEST_SQUARE: usize = 16 * 16;

/// `dst[c * ldd + r] = src[r * lds + c]` for `r < rows`, `c < cols`: whole `LANES x LANES`
/// squares through [`SimdVec::transpose_square`], and the edges too, each through a square of
/// locals. The edges went value by value before, down `src`'s columns and across `dst`'s rows,
/// every write a line of its own: the seed encoder's 42 outputs leave 10 rows of 784 to the
/// edge, and that took most of a chain's packing, which training pays after every step.
///
/// # Safety
/// `src` is valid for reading `rows` rows of `cols` values `lds` apart, `dst` for writing `cols`
/// rows of `rows` values `ldd` apart, not overlapping `src`; the CPU supports the ISA.
#[inline(always)]
pub(super) unsafe fn transpose<V: SimdVec>(
    src: *const V::Elem,
    lds: usize,
    rows: usize,
    cols: usize,
    dst: *mut V::Elem,
    ldd: usize,
) {
    let lanes = V::LANES;
    assert!(lanes * lanes <= WIDEST_SQUARE, "{lanes} lanes");
    let (whole_rows, whole_cols) = (rows / lanes * lanes, cols / lanes * lanes);
    // SAFETY: every index is below `rows` / `cols`, as the caller guarantees valid, or inside
    // the locals (`lanes x lanes` values, checked above).
    unsafe {
        for r in (0..whole_rows).step_by(lanes) {
            for c in (0..whole_cols).step_by(lanes) {
                V::transpose_square(src.add(r * lds + c), lds, dst.add(c * ldd + r), ldd);
            }
        }
        if whole_rows == rows && whole_cols == cols {
            return;
        }
        // An edge square's values go into the top left of `square`; what the other values are
        // (zeros, or an earlier square's) only reaches the parts of `transposed` not copied out.
        let mut square = [V::Elem::ZERO; WIDEST_SQUARE];
        let mut transposed = [V::Elem::ZERO; WIDEST_SQUARE];
        for r in (0..rows).step_by(lanes) {
            let height = lanes.min(rows - r);
            let first_edge_col = if height == lanes { whole_cols } else { 0 };
            for c in (first_edge_col..cols).step_by(lanes) {
                let width = lanes.min(cols - c);
                for i in 0..height {
                    load_upto::<V>(src.add((r + i) * lds + c), width)
                        .store(square.as_mut_ptr().add(i * lanes));
                }
                V::transpose_square(square.as_ptr(), lanes, transposed.as_mut_ptr(), lanes);
                for j in 0..width {
                    let (from, to) = (
                        transposed.as_ptr().add(j * lanes),
                        dst.add((c + j) * ldd + r),
                    );
                    if height == lanes {
                        V::load(from).store(to);
                    } else {
                        std::ptr::copy_nonoverlapping(from, to, height);
                    }
                }
            }
        }
    }
}

/// [`Transpose`](super::Transpose)'s body: the lengths checked, then [`transpose`].
///
/// # Safety
/// The CPU supports `V`'s ISA.
#[inline(always)]
pub(super) unsafe fn transpose_matrix<V: SimdVec>(
    src: &[V::Elem],
    cols: usize,
    dst: &mut [V::Elem],
    dst_stride: usize,
) {
    let rows = src.len().checked_div(cols).unwrap_or(0);
    let dst_needed = match (rows, cols) {
        (0, _) | (_, 0) => Some(0),
        _ => (cols - 1)
            .checked_mul(dst_stride)
            .and_then(|start| start.checked_add(rows)),
    };
    assert!(
        rows * cols == src.len()
            && rows <= dst_stride
            && dst_needed.is_some_and(|needed| needed <= dst.len()),
        "transposing {} values as rows of {cols} into {}, rows {dst_stride} apart",
        src.len(),
        dst.len()
    );
    // SAFETY: `src` holds `rows` rows of `cols` values, `dst` room for `cols` rows of `rows`
    // values `dst_stride` apart, and a shared and a mutable borrow cannot overlap; the caller
    // guarantees the ISA.
    unsafe { transpose::<V>(src.as_ptr(), cols, rows, cols, dst.as_mut_ptr(), dst_stride) }
}

/// One layer's panel outputs (those before `dot_from`) for `rows` rows: every panel, every
/// register tile.
///
/// # Safety
/// As at the call in [`forward_rows`].
#[inline(always)]
pub(super) unsafe fn layer_block<V: LoadFrom<W>, W, const MR: usize, const NV_MAX: usize>(
    at: &Placement<'_, W, V::Elem>,
) {
    let (layer, rows) = (at.layer, at.rows);
    let panels = Panels::new(layer.dot_from, V::LANES, NV_MAX);
    let panel_bytes = layer.in_features * NV_MAX * V::LANES * std::mem::size_of::<W>();
    if panel_bytes <= L1_HALF_BYTES {
        // The panels stay in L1 whatever the order: go row tile by row tile, so each output row
        // is written left to right in one pass, a stream the prefetcher follows.
        for row in (0..rows).step_by(MR) {
            for (col, width) in panels.iter() {
                // SAFETY: `row < rows` and `col + width <= dot_from`, as `tile_at` requires.
                unsafe { tile_at::<V, W, MR, NV_MAX>(at, row, col, width) };
            }
        }
    } else {
        // Keep a large panel hot: every row tile of the block runs against it before the next.
        for (col, width) in panels.iter() {
            for row in (0..rows).step_by(MR) {
                // SAFETY: `row < rows` and `col + width <= dot_from`, as `tile_at` requires.
                unsafe { tile_at::<V, W, MR, NV_MAX>(at, row, col, width) };
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
pub(super) unsafe fn dot_layer_block<V: LoadFrom<W>, W>(at: &Placement<'_, W, V::Elem>) {
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
                        .weights
                        .as_ptr()
                        .add(layer.dot_at + (out - layer.dot_from) * padded_in),
                    ldw: padded_in,
                    bias: at.biases.as_ptr().add(layer.bias_at + out),
                    post_op: layer.post_op,
                    epilogue: at.epilogue,
                    out: at.dst.add(row * at.dst_stride + out),
                    ldo: at.dst_stride,
                };
                let rows = (at.rows - row).min(DOT_ROWS);
                dot_tile_rows::<V, W>(rows, (layer.out_features - out).min(DOT_OUTS), &tile);
            }
        }
    }
}

/// One layer's operands for a block of rows: where its inputs, packed weights and outputs are.
#[derive(Clone, Copy)]
pub(super) struct Placement<'a, W, T> {
    pub(super) layer: &'a LayerDesc,
    pub(super) weights: &'a [W],
    pub(super) biases: &'a [T],
    pub(super) rows: usize,
    pub(super) src: *const T,
    pub(super) src_stride: usize,
    pub(super) dst: *mut T,
    pub(super) dst_stride: usize,
    /// `dst` is the caller's output, possibly far from cache (not the L1/L2 scratch).
    pub(super) dst_is_output: bool,
    pub(super) epilogue: StoredEpilogue<T>,
}

/// The register tile at row `row` of a layer block and its panel `col..col + width`.
///
/// # Safety
/// As at the call in [`forward_rows`], with `row < at.rows` and `col..col + width` one of the
/// layer's [`Panels`] of `dot_from` columns, so every offset stays inside the buffers described
/// there.
#[inline(always)]
unsafe fn tile_at<V: LoadFrom<W>, W, const MR: usize, const NV_MAX: usize>(
    at: &Placement<'_, W, V::Elem>,
    row: usize,
    col: usize,
    width: usize,
) {
    let layer = at.layer;
    let nv = width.div_ceil(V::LANES);
    // SAFETY: see the function's contract.
    unsafe {
        let tile = Tile {
            a: at.src.add(row * at.src_stride),
            lda: at.src_stride,
            k_stride: 1,
            k: layer.in_features,
            panel: at
                .weights
                .as_ptr()
                .add(layer.weights_at + col * layer.in_features),
            panel_stride: layer.panel_stride(col, width),
            last_lanes: width - (nv - 1) * V::LANES,
            seed: Seed::ColumnBias(at.biases.as_ptr().add(layer.bias_at + col)),
            post_op: layer.post_op,
            epilogue: at.epilogue,
            out: at.dst.add(row * at.dst_stride + col),
            ldo: at.dst_stride,
            prefetch_out: at.dst_is_output,
            fetch: FetchAhead::NONE,
        };
        tile_rows::<V, V::Elem, W, MR, NV_MAX, false>((at.rows - row).min(MR), nv, &tile);
    }
}
