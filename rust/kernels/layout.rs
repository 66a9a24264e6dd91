//! What packing and the kernels agree on: the tile shape a kernel wants, and where each packed
//! layer sits (see the module docs of `kernels` for the layout).

use super::{PostOp, SimdVec};

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
    /// as much as on the whole register (Zen 4 runs a 512-bit FMA as two 256-bit ones; see
    /// `dispatch::half_registers_cheaper`), else 0. Only the choice of forms depends on it,
    /// never a result's correctness.
    pub half_lanes: usize,
    /// Inputs one multiply-add instruction takes per output lane: 1 for an FMA, 2 for a kernel
    /// that multiplies bf16 pairs (`vdpbf16ps`). Above 1, every layer is packed as panels of
    /// whole registers (the last one a half where half registers are cheaper), `k` rounded up
    /// to whole groups, each panel row holding a group of `k` for each output, interleaved (see
    /// `pairs.rs`); a dot form only beside a half register; no rows in the lanes.
    pub k_group: usize,
}

impl TileShape {
    /// The shape of a kernel on register type `V` with `mr` rows and up to `nv_max` registers
    /// of outputs per tile, half registers not (yet) chosen.
    pub fn for_register<V: SimdVec>(mr: usize, nv_max: usize) -> TileShape {
        TileShape {
            lanes: V::LANES,
            mr,
            nv_max,
            block_rows: 8 * mr,
            fast_transpose: V::FAST_TRANSPOSE,
            half_lanes: 0,
            k_group: 1,
        }
    }

    pub fn panel_width(&self) -> usize {
        self.nv_max * self.lanes
    }

    /// How the first `columns` outputs of a layer split into panels (see [`Panels`]).
    pub fn panels(&self, columns: usize) -> Panels {
        Panels::new(columns, self.lanes, self.nv_max)
    }

    #[inline(always)]
    pub fn padded(&self, width: usize) -> usize {
        padded(width, self.lanes)
    }

    /// `k` rounded up to whole groups of [`TileShape::k_group`].
    #[inline(always)]
    pub fn grouped(&self, k: usize) -> usize {
        padded(k, self.k_group)
    }

    /// The columns a layer's panels hold for its first `dot_from` outputs: padded to whole
    /// registers, or to a half one where the last register runs in its half (the grouped forms'
    /// tiles load whole or half registers only; the others' rows then start on cache lines, see
    /// `pack_panels`).
    #[inline(always)]
    pub fn panel_columns(&self, dot_from: usize) -> usize {
        if self.ends_in_half(dot_from) {
            dot_from.next_multiple_of(self.half_lanes)
        } else {
            self.padded(dot_from)
        }
    }

    /// Whether panels of `width` outputs end in a half register: where the outputs past the
    /// last whole register fit in one, and the last panel holds more than that register (a half
    /// register alone in its panel runs no faster than a whole one; see `plan.rs`).
    #[inline(always)]
    pub fn ends_in_half(&self, width: usize) -> bool {
        let tail = width % self.lanes;
        let panels = self.panels(width);
        let last_panel = panels.get(panels.count().saturating_sub(1)).1;
        0 < tail && tail <= self.half_lanes && last_panel > self.lanes
    }

    /// Batch rows in one rows-in-lanes block: a register tile's width.
    pub fn lanes_block(&self) -> usize {
        self.panel_width()
    }
}

/// A layer's panel outputs split into panels, as packing lays them out and the kernels walk
/// them: `nv_max` registers wide, except that a last panel of one register or less shares the
/// registers of the panel before it (3 + 1 -> 2 + 2 with `nv_max = 3`). A one-register panel
/// has a broadcast per multiply-add and ran at 70% of the FMA peak on Zen 5 (two or three
/// registers: 88-93%); 256 outputs are 16 registers, 64 are four. Each panel stores its `k`
/// rows at its own width, so panel `col..col + width` starts at `col * k` whatever the split.
#[derive(Clone, Copy, Debug)]
pub struct Panels {
    columns: usize,
    lanes: usize,
    nv_max: usize,
}

impl Panels {
    pub fn new(columns: usize, lanes: usize, nv_max: usize) -> Panels {
        Panels {
            columns,
            lanes,
            nv_max,
        }
    }

    pub fn count(&self) -> usize {
        self.columns.div_ceil(self.nv_max * self.lanes)
    }

    /// Panel `index`'s first column and width (`index < count()`).
    pub fn get(&self, index: usize) -> (usize, usize) {
        let full = self.nv_max * self.lanes;
        let (whole, rest) = (self.columns / full, self.columns % full);
        if self.nv_max >= 3 && whole > 0 && 0 < rest && rest <= self.lanes && index + 1 >= whole {
            let shared = self.nv_max.div_ceil(2) * self.lanes;
            let start = (whole - 1) * full;
            return if index + 1 == whole {
                (start, shared)
            } else {
                (start + shared, full + rest - shared)
            };
        }
        let col = index * full;
        (col, full.min(self.columns - col))
    }

    pub fn iter(self) -> impl Iterator<Item = (usize, usize)> {
        (0..self.count()).map(move |index| self.get(index))
    }
}

/// Half of a 32 KiB L1: the most a weight panel kept per row tile, or a rows-in-lanes block of
/// activations, may take.
pub const L1_HALF_BYTES: usize = 16 << 10;

/// A cache line.
pub const LINE_BYTES: usize = 64;

/// Outputs at least this large are stored past the caches where the form can
/// ([`SimdVec::store_stream`](super::SimdVec::store_stream)). The kernel sees one thread's chunk
/// of rows, an eighth of its share (4096 rows of 784 values on 2 threads: 800 KB chunks of a
/// 12.8 MB output), so the bound is on the chunk: half a Zen 4 L2.
pub const STREAM_MIN_BYTES: usize = 512 << 10;

/// `width` rounded up to whole registers of `lanes`. With a mask where `lanes` is a power of two
/// (every register and group here): the division, by a count the compiler does not know, cost
/// several nanoseconds a call at batch 1, where each call works out its layers' widths.
#[inline(always)]
pub fn padded(width: usize, lanes: usize) -> usize {
    if lanes.is_power_of_two() {
        (width + (lanes - 1)) & !(lanes - 1)
    } else {
        width.div_ceil(lanes) * lanes
    }
}

/// Where one packed layer sits in its chain's buffer (see the module docs for the layout).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LayerDesc {
    pub in_features: usize,
    pub out_features: usize,
    pub padded_out: usize,
    pub weights_at: usize,
    pub bias_at: usize,
    /// Applied to every output in the epilogue.
    pub post_op: PostOp,
    /// Outputs from here on are in dot-product form (see the module docs).
    pub dot_from: usize,
    /// Where the dot-form weight rows start.
    pub dot_at: usize,
    /// Columns the panels hold ([`TileShape::panel_columns`]): the last panel's rows are
    /// padded to them.
    pub panel_columns: usize,
}

impl LayerDesc {
    /// Values from one row of the panel `col..col + width` to the next: its width, but for the
    /// last panel, whose rows are padded to [`LayerDesc::panel_columns`].
    #[inline(always)]
    pub fn panel_stride(&self, col: usize, width: usize) -> usize {
        if col + width == self.dot_from {
            self.panel_columns - col
        } else {
            width
        }
    }
}

/// A packed chain: its layers and the buffers they point into, weights stored as `W`, biases in
/// the compute type `T` (they seed the accumulators).
#[derive(Clone, Copy, Debug)]
pub struct Packed<'a, W, T> {
    pub layers: &'a [LayerDesc],
    /// Every layer's panels and dot-form rows, at [`LayerDesc::weights_at`] and
    /// [`LayerDesc::dot_at`].
    pub weights: &'a [W],
    /// Every layer's bias, at [`LayerDesc::bias_at`].
    pub biases: &'a [T],
    /// The same layers packed again for batch rows in the lanes ([`TileShape::rows_in_lanes`]),
    /// each as dot-form rows (`dot_from == 0`, `padded_out == out`); empty if not worth it.
    pub lanes_layers: &'a [LayerDesc],
}
