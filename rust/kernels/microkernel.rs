//! The register tiles: panels (a broadcast input times registers of weights, `MR` rows by `NV`
//! registers of accumulators) and dot form (lane-wise products summed across the register).
//! Each ends in the epilogue: bias, post-op, store (or store, then the post-op over the stored
//! tile, for the ops of tens of instructions: see `epilogue.rs`).

use super::epilogue::{self, StoredEpilogue};
use super::{LoadFrom, PostOp, SimdVec, LINE_BYTES, STREAM_MIN_BYTES};

/// Most rows and outputs of a dot-form register tile: 16 independent accumulators, enough to
/// keep the FMA units busy, and 4 + 4 loads per 16 FMAs.
pub(super) const DOT_ROWS: usize = 4;
pub(super) const DOT_OUTS: usize = 4;
/// Steps of `k` a register tile takes per turn of its loop (see [`register_tile`]).
const CHUNK: usize = 4;
/// The same for the `STRIDED` tiles (or `KS` steps, where that is more).
const STRIDED_CHUNK: usize = 2;

/// Pointers for one dot-form register tile: `rows x outs` outputs from `rows x k` inputs and
/// `outs` weight rows of `ldw` values (zeros past `k`), stored as `W`, computed in `T`.
pub(super) struct DotTile<W, T> {
    pub(super) x: *const T,
    pub(super) ldx: usize,
    pub(super) k: usize,
    pub(super) w: *const W,
    pub(super) ldw: usize,
    pub(super) bias: *const T,
    /// Applied to every output.
    pub(super) post_op: PostOp,
    pub(super) epilogue: StoredEpilogue<T>,
    pub(super) out: *mut T,
    pub(super) ldo: usize,
}

/// Picks the dot-form register tile for a run-time row count and output count (`1..=4` each).
///
/// # Safety
/// `tile` points at `rows` input rows of `k` readable values, `outs` weight rows of `ldw >=
/// padded(k)` values, `outs` biases and room for `rows x outs` outputs; the CPU supports the ISA.
#[inline(always)]
pub(super) unsafe fn dot_tile_rows<V: LoadFrom<W>, W>(
    rows: usize,
    outs: usize,
    tile: &DotTile<W, V::Elem>,
) {
    // SAFETY: forwarded from the caller.
    unsafe {
        match rows {
            1 => dot_tile_outs::<V, W, 1>(outs, tile),
            2 => dot_tile_outs::<V, W, 2>(outs, tile),
            3 => dot_tile_outs::<V, W, 3>(outs, tile),
            4 => dot_tile_outs::<V, W, 4>(outs, tile),
            _ => unreachable!("dot tiles are at most 4 rows"),
        }
        if !epilogue::runs_on_accumulators(tile.post_op) {
            (tile.epilogue.values)(tile.post_op, tile.out, tile.ldo, rows, outs);
        }
    }
}

/// # Safety
/// As for [`dot_tile_rows`].
#[inline(always)]
unsafe fn dot_tile_outs<V: LoadFrom<W>, W, const R: usize>(
    outs: usize,
    tile: &DotTile<W, V::Elem>,
) {
    // SAFETY: forwarded from the caller.
    unsafe {
        match outs {
            1 => dot_tile::<V, W, R, 1>(tile),
            2 => dot_tile::<V, W, R, 2>(tile),
            3 => dot_tile::<V, W, R, 3>(tile),
            4 => dot_tile::<V, W, R, 4>(tile),
            _ => unreachable!("dot tiles are at most 4 outputs"),
        }
    }
}

/// The dot-form microkernel: `R x C` accumulators along `k`, the input's tail loaded masked (so
/// nothing past `k` is read; the weights' padding is zeros), then one horizontal sum each, the
/// bias and the post-op.
///
/// # Safety
/// As for [`dot_tile_rows`], with `rows == R` and `outs == C`.
#[inline(always)]
unsafe fn dot_tile<V: LoadFrom<W>, W, const R: usize, const C: usize>(tile: &DotTile<W, V::Elem>) {
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
                let w = V::load_from(tile.w.add(c * tile.ldw + at));
                for (row, x) in acc.iter_mut().zip(&xs) {
                    row[c] = x.mul_add(w, row[c]);
                }
            }
        }
        for (r, row) in acc.iter().enumerate() {
            for (c, value) in row.iter().enumerate() {
                let value = value.sum() + *tile.bias.add(c);
                *tile.out.add(r * tile.ldo + c) =
                    epilogue::apply_one_on_accumulator::<V>(tile.post_op, value);
            }
        }
    }
}

/// Pointers for one register tile: `rows x (nv * LANES)` outputs from `rows x k` values of `A`
/// (each broadcast) and a panel of `k` rows of `B`, computed in `T`. In the panel form `A` is
/// the activations and `B` the packed weights; with rows in the lanes, the other way round.
pub(super) struct Tile<A, B, T> {
    pub(super) a: *const A,
    /// Values from one tile row of `a` to the next: 1 for the `STRIDED` tiles, which read it as
    /// that constant.
    pub(super) lda: usize,
    /// Values from one step of `k` in `a` to the next: read only by the `STRIDED` tiles (the
    /// backward's weight gradients, whose `a` is `delta` read in place: one step a row, the
    /// tile's rows side by side), 1 for the others.
    pub(super) k_stride: usize,
    pub(super) k: usize,
    pub(super) panel: *const B,
    /// Values from one panel row to the next: the panel's width where it is packed, a matrix's
    /// row length where the panel is a slice of its columns (the backward's products).
    pub(super) panel_stride: usize,
    /// Lanes of the last register that have weights (`1..=LANES`); the rest load as zeros.
    pub(super) last_lanes: usize,
    pub(super) seed: Seed<T>,
    /// Applied to every output.
    pub(super) post_op: PostOp,
    pub(super) epilogue: StoredEpilogue<T>,
    pub(super) out: *mut T,
    pub(super) ldo: usize,
    /// Fetch the output lines before the multiply-adds (see `register_tile`).
    pub(super) prefetch_out: bool,
    /// Lines to fetch into L2 as the multiply-adds go, a step every cache line of `a`'s `k`,
    /// instead of the next tile's rows of `a`: read only by the `STRIDED` tiles (the
    /// backward's weight gradients fetch the next chunk of their inputs), [`FetchAhead::NONE`]
    /// for the others.
    pub(super) fetch: FetchAhead,
}

/// What a register tile's accumulators start from.
#[derive(Clone, Copy)]
pub(super) enum Seed<T> {
    /// One bias value per output column: `nv * LANES` values (only those of real weights where
    /// the last register runs in its half).
    ColumnBias(*const T),
    /// One bias value per tile row, broadcast along it (rows in the lanes).
    RowBias(*const T),
    /// Zeros: a product without a bias (the backward's input gradients).
    Zero,
    /// The outputs as they are, so the products add to them (weight gradients summed block
    /// after block); the output rows are readable for `nv` whole registers.
    Output,
}

/// `N <= MAX`, as a constant: a match arm guarded by it is dropped before code generation where
/// it is false (rustc skips branches on constants when it collects what to compile), so each
/// loop nest compiles only the register tiles its `MR` and `NV_MAX` can pick. The comparison
/// written in the guard would not be folded that early: every ISA would compile all 64 tiles.
struct AtMost<const N: usize, const MAX: usize>;

impl<const N: usize, const MAX: usize> AtMost<N, MAX> {
    const HOLDS: bool = N <= MAX;
}

/// Whether `V` has half registers ([`SimdVec::HALF_LANES`]), as a constant for the same reason.
struct Halves<V>(std::marker::PhantomData<V>);

impl<V: SimdVec> Halves<V> {
    const EXIST: bool = V::HALF_LANES > 0;
}

/// A share of a later block of the caller's input rows for one register tile of a grouped
/// form's first layer to fetch into L2 (a block is larger than L1), a few lines per step of `k`,
/// while it multiplies: the next block for the int8 quads, the block after next for the bf16
/// pairs (whose tiles round the next block as they go). The grouped forms rounded or quantized
/// each block's input in a pass of little work per value, which stalled on every line streaming
/// from memory (784 -> 42 -> 16 at 4096 rows: the bf16 call ran 1.36x slower than on rows
/// already in cache, the f32 call 1.03x: its tiles read the input themselves, and fetch the
/// next tile's rows as they go). Measured with it: bf16 1.29-1.37x -> 1.52-1.61x our f32, int8
/// 1.53-1.62x -> 1.85-2.06x (Zen 5, 1 thread).
#[derive(Clone, Copy)]
pub(super) struct FetchAhead {
    first_line: *const u8,
    lines: usize,
    per_step: usize,
}

impl FetchAhead {
    pub(super) const NONE: FetchAhead = FetchAhead {
        first_line: std::ptr::null(),
        lines: 0,
        per_step: 0,
    };

    /// Tile `tile`'s share of `next_block`, cut into `tiles` shares in order, to fetch over
    /// `steps` steps; nothing for any layer but the first (`layer == 0`), whose input it is.
    pub(super) fn share<T>(
        layer: usize,
        next_block: &[T],
        tiles: usize,
        tile: usize,
        steps: usize,
    ) -> FetchAhead {
        if layer != 0 {
            return FetchAhead::NONE;
        }
        FetchAhead::part(next_block, tiles, tile, steps)
    }

    /// Tile `tile`'s part of the lines of `values`, cut into `tiles` parts in order, to fetch
    /// over `steps` steps.
    pub(super) fn part<T>(values: &[T], tiles: usize, tile: usize, steps: usize) -> FetchAhead {
        let (start, bytes) = (values.as_ptr().cast::<u8>(), size_of_val(values));
        if bytes == 0 || tiles == 0 || steps == 0 {
            return FetchAhead::NONE;
        }
        let offset = start as usize % LINE_BYTES;
        let lines = (offset + bytes).div_ceil(LINE_BYTES);
        let per_tile = lines.div_ceil(tiles);
        let first = (tile * per_tile).min(lines);
        let count = per_tile.min(lines - first);
        FetchAhead {
            first_line: start.wrapping_sub(offset).wrapping_add(first * LINE_BYTES),
            lines: count,
            per_step: count.div_ceil(steps),
        }
    }

    /// Whether this share has anything to fetch.
    pub(super) fn has_lines(&self) -> bool {
        self.lines > 0
    }

    /// Fetches the next step's lines (`per_step`, or the share's last ones) and moves past
    /// them: called once per step of a tile's `k` loop, on a copy of the tile's share. A cursor,
    /// not the step's index: the index's multiplications and bounds were about a dozen integer
    /// instructions a step, which on Intel share ports with `vpdpbusd`.
    ///
    /// # Safety
    /// The CPU supports `V`'s ISA.
    #[inline(always)]
    pub(super) unsafe fn step<V: SimdVec>(&mut self) {
        let count = self.per_step.min(self.lines);
        for _ in 0..count {
            // SAFETY: a prefetch never faults, whatever the address; the caller guarantees the ISA.
            unsafe { V::prefetch_to_l2(self.first_line.cast()) };
            self.first_line = self.first_line.wrapping_add(LINE_BYTES);
        }
        self.lines -= count;
    }
}

/// Whether a grouped form stores the chain's `output` past the caches
/// ([`SimdVec::store_stream`]): it is at least [`STREAM_MIN_BYTES`], every output register
/// starts on a line, and the last op runs on the accumulators (the others read the stored tile
/// back).
pub(super) fn streams_output<V: SimdVec<Elem = f32>>(
    output: &[f32],
    out_features: usize,
    last_op: PostOp,
) -> bool {
    V::LANES * size_of::<f32>() == LINE_BYTES
        && size_of_val(output) >= STREAM_MIN_BYTES
        && (output.as_ptr() as usize).is_multiple_of(LINE_BYTES)
        && out_features.is_multiple_of(V::LANES)
        && epilogue::runs_on_accumulators(last_op)
}

/// A register tile of a form taking `k` in groups (the bf16 pairs, the int8 quads) on register
/// type `V`, run with its shape as constants: `R` rows, `NV` registers (the last one in its half
/// with `HALF`: its products, loads and stores cover [`SimdVec::HALF_LANES`] lanes), `KS` sets
/// of sums over consecutive groups of `k`.
pub(super) trait GroupedTile<V> {
    /// # Safety
    /// The tile's pointers cover `R` rows and `NV` registers (each form says what that means);
    /// `HALF` only where `V` has a half register; the CPU supports `V`'s ISA.
    unsafe fn run<const R: usize, const NV: usize, const KS: usize, const HALF: bool>(&self);
}

/// Picks a grouped form's register tile for a run-time row count (`1..=MR`) and `width` in
/// outputs (`1..=NV_MAX` registers, the last one a half where `width` ends in one), splitting
/// `k` across extra sets of sums for few rows, as [`tile_rows`] does.
///
/// `HALVES`: whether the half-register tiles are compiled in (a width ending in a half register
/// is then a bug).
///
/// # Safety
/// As [`GroupedTile::run`]'s, with `rows` rows and `width` a whole number of registers, or of
/// half registers where `V` has them and `HALVES`.
#[inline(always)]
pub(super) unsafe fn grouped_tile<
    V: SimdVec,
    T: GroupedTile<V>,
    const MR: usize,
    const NV_MAX: usize,
    const HALVES: bool,
>(
    rows: usize,
    width: usize,
    tile: &T,
) {
    let (registers, half) = (width.div_ceil(V::LANES), !width.is_multiple_of(V::LANES));
    debug_assert!(!half || width % V::LANES == V::HALF_LANES);
    // SAFETY: forwarded from the caller.
    unsafe {
        match (registers, half) {
            (1, false) => grouped_tile_width::<V, T, 1, MR, false>(rows, tile),
            (1, true) if HALVES && Halves::<V>::EXIST => {
                grouped_tile_width::<V, T, 1, MR, true>(rows, tile)
            }
            (2, false) if AtMost::<2, NV_MAX>::HOLDS => {
                grouped_tile_width::<V, T, 2, MR, false>(rows, tile)
            }
            (2, true) if HALVES && Halves::<V>::EXIST && AtMost::<2, NV_MAX>::HOLDS => {
                grouped_tile_width::<V, T, 2, MR, true>(rows, tile)
            }
            (3, false) if AtMost::<3, NV_MAX>::HOLDS => {
                grouped_tile_width::<V, T, 3, MR, false>(rows, tile)
            }
            (3, true) if HALVES && Halves::<V>::EXIST && AtMost::<3, NV_MAX>::HOLDS => {
                grouped_tile_width::<V, T, 3, MR, true>(rows, tile)
            }
            (4, false) if AtMost::<4, NV_MAX>::HOLDS => {
                grouped_tile_width::<V, T, 4, MR, false>(rows, tile)
            }
            (4, true) if HALVES && Halves::<V>::EXIST && AtMost::<4, NV_MAX>::HOLDS => {
                grouped_tile_width::<V, T, 4, MR, true>(rows, tile)
            }
            _ => unreachable!("panels are at most {NV_MAX} registers wide"),
        }
    }
}

/// # Safety
/// As for [`grouped_tile`], with `registers == NV`.
#[inline(always)]
unsafe fn grouped_tile_width<
    V,
    T: GroupedTile<V>,
    const NV: usize,
    const MR: usize,
    const HALF: bool,
>(
    rows: usize,
    tile: &T,
) {
    // SAFETY: forwarded from the caller.
    unsafe {
        match rows {
            1 => tile.run::<1, NV, 4, HALF>(),
            2 if AtMost::<2, MR>::HOLDS => tile.run::<2, NV, 2, HALF>(),
            3 if AtMost::<3, MR>::HOLDS => tile.run::<3, NV, 1, HALF>(),
            4 if AtMost::<4, MR>::HOLDS => tile.run::<4, NV, 1, HALF>(),
            5 if AtMost::<5, MR>::HOLDS => tile.run::<5, NV, 1, HALF>(),
            6 if AtMost::<6, MR>::HOLDS => tile.run::<6, NV, 1, HALF>(),
            7 if AtMost::<7, MR>::HOLDS => tile.run::<7, NV, 1, HALF>(),
            8 if AtMost::<8, MR>::HOLDS => tile.run::<8, NV, 1, HALF>(),
            _ => unreachable!("register tiles are at most {MR} rows"),
        }
    }
}

/// Picks the register tile for a run-time row count (`1..=MR`) and width (`1..=NV_MAX` registers).
/// `STRIDED`: `a`'s steps of `k` lie `tile.k_stride` apart and its rows side by side (see
/// [`register_tile`]).
///
/// # Safety
/// `tile` points at `rows` valid input rows (`k` values each, `k_stride` apart with
/// `STRIDED`), a panel of `k` rows `panel_stride` apart, each of
/// `(nv - 1) * LANES + last_lanes` readable values, the values its [`Seed`] reads, and room
/// for the outputs.
#[inline(always)]
pub(super) unsafe fn tile_rows<
    V: LoadFrom<A> + LoadFrom<B>,
    A,
    B,
    const MR: usize,
    const NV_MAX: usize,
    const STRIDED: bool,
>(
    rows: usize,
    nv: usize,
    tile: &Tile<A, B, V::Elem>,
) {
    // The last register in its half where its outputs fit (`tile_width`'s `HALF`). Its stores
    // then write `HALF_LANES` values, which the row has room for: packing pads the row to whole
    // registers, or ends the panels at a whole register or at one plus `V::HALF_LANES`
    // (`TileShape::dot_from`, with `forward_rows` asserting `half_lanes` is 0 or
    // `V::HALF_LANES`, and `check_chain` that the packing follows the shape), and the
    // backward's buffers are rows of whole registers; rows-in-lanes tiles (one bias per row)
    // are always whole registers.
    let row_bias = matches!(tile.seed, Seed::RowBias(_));
    let half = V::HALF_LANES > 0 && tile.last_lanes <= V::HALF_LANES && !row_bias;
    // SAFETY: forwarded from the caller.
    unsafe {
        match (nv, half) {
            (1, false) => tile_width::<V, A, B, 1, false, MR, STRIDED>(rows, tile),
            (2, false) if AtMost::<2, NV_MAX>::HOLDS => {
                tile_width::<V, A, B, 2, false, MR, STRIDED>(rows, tile)
            }
            (3, false) if AtMost::<3, NV_MAX>::HOLDS => {
                tile_width::<V, A, B, 3, false, MR, STRIDED>(rows, tile)
            }
            (4, false) if AtMost::<4, NV_MAX>::HOLDS => {
                tile_width::<V, A, B, 4, false, MR, STRIDED>(rows, tile)
            }
            (1, true) if Halves::<V>::EXIST => {
                tile_width::<V, A, B, 1, true, MR, STRIDED>(rows, tile)
            }
            (2, true) if Halves::<V>::EXIST && AtMost::<2, NV_MAX>::HOLDS => {
                tile_width::<V, A, B, 2, true, MR, STRIDED>(rows, tile)
            }
            (3, true) if Halves::<V>::EXIST && AtMost::<3, NV_MAX>::HOLDS => {
                tile_width::<V, A, B, 3, true, MR, STRIDED>(rows, tile)
            }
            (4, true) if Halves::<V>::EXIST && AtMost::<4, NV_MAX>::HOLDS => {
                tile_width::<V, A, B, 4, true, MR, STRIDED>(rows, tile)
            }
            _ => unreachable!("panels are at most {NV_MAX} registers wide"),
        }
        if !epilogue::runs_on_accumulators(tile.post_op) {
            (tile.epilogue.tile)(tile.post_op, tile.out, tile.ldo, rows, nv, half);
        }
    }
}

/// With `HALF`, the last register's multiply-adds, bias and stores cover only its low
/// [`SimdVec::HALF_LANES`] lanes (`last_lanes` fits them).
///
/// # Safety
/// As for [`tile_rows`].
#[inline(always)]
unsafe fn tile_width<
    V: LoadFrom<A> + LoadFrom<B>,
    A,
    B,
    const NV: usize,
    const HALF: bool,
    const MR: usize,
    const STRIDED: bool,
>(
    rows: usize,
    tile: &Tile<A, B, V::Elem>,
) {
    // SAFETY: forwarded from the caller.
    unsafe {
        // Few rows give few independent accumulators, too few to hide the FMA latency: split
        // `k` across extra accumulator sets (summed at the end) so batch 1 runs at throughput.
        match rows {
            1 => register_tile::<V, A, B, 1, NV, 4, HALF, STRIDED>(tile),
            2 if AtMost::<2, MR>::HOLDS => register_tile::<V, A, B, 2, NV, 2, HALF, STRIDED>(tile),
            3 if AtMost::<3, MR>::HOLDS => register_tile::<V, A, B, 3, NV, 1, HALF, STRIDED>(tile),
            4 if AtMost::<4, MR>::HOLDS => register_tile::<V, A, B, 4, NV, 1, HALF, STRIDED>(tile),
            5 if AtMost::<5, MR>::HOLDS => register_tile::<V, A, B, 5, NV, 1, HALF, STRIDED>(tile),
            6 if AtMost::<6, MR>::HOLDS => register_tile::<V, A, B, 6, NV, 1, HALF, STRIDED>(tile),
            7 if AtMost::<7, MR>::HOLDS => register_tile::<V, A, B, 7, NV, 1, HALF, STRIDED>(tile),
            8 if AtMost::<8, MR>::HOLDS => register_tile::<V, A, B, 8, NV, 1, HALF, STRIDED>(tile),
            _ => unreachable!("register tiles are at most {MR} rows"),
        }
    }
}

/// The microkernel: `R x NV` registers of accumulators seeded as [`Seed`] says, one broadcast of an
/// input value and `NV` panel loads per step of `k`, the post-op applied in registers. With
/// `KS > 1`, consecutive steps of `k` go to `KS` separate accumulator sets, added up before the
/// post-op. With `STRIDED`, `a`'s steps of `k` lie `k_stride` apart and its rows 1 apart; else
/// its steps 1 apart and its rows `lda`. Either way one of the two is a constant, so a chunk of
/// steps (below) loads at constant offsets from a few pointers. Once per cache line of `k` the
/// tile fetches ahead ([`fetch_at_line`]).
///
/// # Safety
/// As for [`tile_rows`], with `rows == R` and `nv == NV`.
#[inline(always)]
unsafe fn register_tile<
    V: LoadFrom<A> + LoadFrom<B>,
    A,
    B,
    const R: usize,
    const NV: usize,
    const KS: usize,
    const HALF: bool,
    const STRIDED: bool,
>(
    tile: &Tile<A, B, V::Elem>,
) {
    let lanes = V::LANES;
    let step = tile.panel_stride;
    let k_stride = if STRIDED { tile.k_stride } else { 1 };
    let lda = if STRIDED { 1 } else { tile.lda };
    debug_assert!(!STRIDED || tile.lda == 1);
    // SAFETY: the caller guarantees the ISA and that `R` rows of `k` inputs, `k` panel rows of
    // `(NV - 1) * LANES + last_lanes` values, the seed's values (`NV * LANES` column biases,
    // `(NV - 1) * LANES + last_lanes` with
    // `HALF`; `R` row biases; `R` output rows of `NV` registers) and `R` output rows are in
    // bounds; the split loop reads steps `0..k / KS * KS` and the tail loop the rest, so every
    // `k` index is `< k`; `panel_row` reads only those values of a panel row.
    unsafe {
        let mut acc = [[[V::zero(); NV]; R]; KS];
        match tile.seed {
            Seed::RowBias(bias) => {
                for (r, row) in acc[0].iter_mut().enumerate() {
                    *row = [V::splat(bias.add(r)); NV];
                }
            }
            Seed::ColumnBias(bias) => {
                for v in 0..NV {
                    let bias = if HALF && v == NV - 1 {
                        V::load_partial(bias.add(v * lanes), tile.last_lanes)
                    } else {
                        V::load(bias.add(v * lanes))
                    };
                    for row in acc[0].iter_mut() {
                        row[v] = bias;
                    }
                }
            }
            Seed::Zero => {}
            Seed::Output => {
                for (r, row) in acc[0].iter_mut().enumerate() {
                    for (v, value) in row.iter_mut().enumerate() {
                        *value = V::load(tile.out.add(r * tile.ldo + v * lanes));
                    }
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
        let mut fetch = tile.fetch;
        let line = 64 / std::mem::size_of::<A>();
        // `CHUNK` steps of `k` per turn of the loop (`CHUNK / KS` iterations), their loads at
        // constant offsets: the pointer, counter and line arithmetic runs once a chunk (on the
        // AMX Xeon, whose two FMA ports that integer work shared: seed encoder forward 1.11x at
        // 256 and 4096 rows). `STRIDED`, two steps: with four, LLVM spilled the accumulators to
        // the stack (weight gradient 0.6x); two ran 1.02-1.04x faster than one.
        // A chunk starts every line, as it divides `line`; each accumulator sees its steps in
        // the same order, so the sums are the same bits.
        let chunk_steps = if STRIDED {
            STRIDED_CHUNK.max(KS)
        } else {
            CHUNK
        };
        const {
            assert!(
                CHUNK.is_multiple_of(KS)
                    && (KS > STRIDED_CHUNK || STRIDED_CHUNK.is_multiple_of(KS))
            )
        };
        let iterations = tile.k / KS;
        let chunks = iterations / (chunk_steps / KS);
        for chunk in 0..chunks {
            if (chunk * chunk_steps).is_multiple_of(line) {
                fetch_at_line::<V, A, R, STRIDED>(a, lda, k_stride, &mut fetch);
            }
            for offset in (0..chunk_steps).step_by(KS) {
                multiply_add_step::<V, A, B, R, NV, KS, HALF>(
                    tile, &mut acc, a, panel, offset, lda, k_stride,
                );
            }
            a = a.add(chunk_steps * k_stride);
            panel = panel.add(chunk_steps * step);
        }
        for iteration in chunks * (chunk_steps / KS)..iterations {
            if (iteration * KS).is_multiple_of(line) {
                fetch_at_line::<V, A, R, STRIDED>(a, lda, k_stride, &mut fetch);
            }
            multiply_add_step::<V, A, B, R, NV, KS, HALF>(
                tile, &mut acc, a, panel, 0, lda, k_stride,
            );
            a = a.add(KS * k_stride);
            panel = panel.add(KS * step);
        }
        for _ in 0..tile.k % KS {
            let b = panel_row::<V, B, NV>(panel, tile.last_lanes);
            for (r, row) in acc[0].iter_mut().enumerate() {
                let x = <V as LoadFrom<A>>::splat_from(a.add(r * lda));
                multiply_add_row::<V, NV, HALF>(x, &b, row);
            }
            a = a.add(k_stride);
            panel = panel.add(step);
        }
        let total = sum_sets(&acc);
        for (r, row) in total.iter().enumerate() {
            for (v, &value) in row.iter().enumerate() {
                let value = epilogue::apply_on_accumulators(tile.post_op, value);
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

/// A register tile's fetching ahead, once per cache line of its `a`: its share of
/// [`Tile::fetch`] where it has one (`STRIDED` only), else, where `a`'s rows are contiguous, the
/// same columns of the next tile's `R` rows (`lda` apart), so a large input streaming from memory
/// is in cache one tile ahead (the hardware prefetcher alone misses the start of every row).
///
/// # Safety
/// The CPU supports `V`'s ISA (a prefetch never faults, whatever the address).
#[inline(always)]
unsafe fn fetch_at_line<V: SimdVec, A, const R: usize, const STRIDED: bool>(
    a: *const A,
    lda: usize,
    k_stride: usize,
    fetch: &mut FetchAhead,
) {
    // SAFETY: forwarded from the caller.
    unsafe {
        if STRIDED && fetch.has_lines() {
            fetch.step::<V>();
        } else if k_stride == 1 {
            for r in 0..R {
                V::prefetch(a.wrapping_add((R + r) * lda).cast());
            }
        }
    }
}

/// One step of `k` for each of the `KS` accumulator sets of a register tile, `offset` steps past
/// `a` and `panel` (set `s` takes step `offset + s`), `a`'s rows `lda` apart and its steps
/// `k_stride`.
///
/// # Safety
/// As for [`register_tile`], with the steps read inside its `k`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn multiply_add_step<
    V: LoadFrom<A> + LoadFrom<B>,
    A,
    B,
    const R: usize,
    const NV: usize,
    const KS: usize,
    const HALF: bool,
>(
    tile: &Tile<A, B, V::Elem>,
    acc: &mut [[[V; NV]; R]; KS],
    a: *const A,
    panel: *const B,
    offset: usize,
    lda: usize,
    k_stride: usize,
) {
    // SAFETY: forwarded from the caller.
    unsafe {
        for (s, set) in acc.iter_mut().enumerate() {
            let step = offset + s;
            let b = panel_row::<V, B, NV>(panel.add(step * tile.panel_stride), tile.last_lanes);
            for (r, row) in set.iter_mut().enumerate() {
                let x = <V as LoadFrom<A>>::splat_from(a.add(r * lda + step * k_stride));
                multiply_add_row::<V, NV, HALF>(x, &b, row);
            }
        }
    }
}

/// The `KS` accumulator sets of a register tile added into one, in order (the first set
/// first, so a tile without split sets returns it unchanged).
///
/// # Safety
/// The CPU supports `V`'s ISA.
#[inline(always)]
pub(super) unsafe fn sum_sets<V: SimdVec, const R: usize, const NV: usize, const KS: usize>(
    acc: &[[[V; NV]; R]; KS],
) -> [[V; NV]; R] {
    let mut total = acc[0];
    for set in &acc[1..] {
        for (sum_row, row) in total.iter_mut().zip(set) {
            for (sum, &value) in sum_row.iter_mut().zip(row) {
                // SAFETY: the caller guarantees the ISA.
                *sum = unsafe { sum.add(value) };
            }
        }
    }
    total
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
unsafe fn panel_row<V: LoadFrom<B>, B, const NV: usize>(
    row: *const B,
    last_lanes: usize,
) -> [V; NV] {
    // SAFETY: forwarded from the caller; the last load reads `last_lanes` values only.
    unsafe {
        let mut b = [V::zero(); NV];
        for (v, reg) in b.iter_mut().enumerate().take(NV - 1) {
            *reg = V::load_from(row.add(v * V::LANES));
        }
        let last = row.add((NV - 1) * V::LANES);
        b[NV - 1] = if last_lanes == V::LANES {
            V::load_from(last)
        } else {
            V::load_partial_from(last, last_lanes)
        };
        b
    }
}

#[cfg(test)]
mod tests {
    use super::FetchAhead;

    #[test]
    fn fetch_shares_cover_every_line_of_the_block_once() {
        let block = vec![0u8; 10_000];
        for offset in [0, 1, 16, 63] {
            for bytes in [1, 63, 64, 65, 3136, 9_000] {
                for tiles in [1, 3, 8, 13] {
                    for steps in [1, 5, 392] {
                        let next_block = &block[offset..][..bytes];
                        let start = next_block.as_ptr();
                        let first_line = start as usize / 64;
                        let last_line = (start as usize + bytes - 1) / 64;
                        let mut fetched = Vec::new();
                        for tile in 0..tiles {
                            let share = FetchAhead::share(0, next_block, tiles, tile, steps);
                            assert!(share.per_step * steps >= share.lines);
                            let base = share.first_line as usize;
                            assert_eq!(base % 64, 0);
                            fetched.extend((0..share.lines).map(|line| base / 64 + line));
                        }
                        let expected: Vec<usize> = (first_line..=last_line).collect();
                        assert_eq!(fetched, expected, "{offset} {bytes} {tiles} {steps}");
                    }
                }
            }
        }
        assert!(!FetchAhead::share(0, &block[..0], 4, 0, 8).has_lines());
        assert!(!FetchAhead::share(1, &block[..], 4, 0, 8).has_lines());
    }
}
