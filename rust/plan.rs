//! The cost model: which form each layer takes for a kernel's tile shape (panels, dot form,
//! half registers, rows in the lanes). Policy, not SIMD: it only counts multiply-adds, with
//! constants measured once on the project's machines, and packing follows what it says. It
//! depends on the CPU's identity only through [`TileShape::half_lanes`], never on a timing, so
//! the same input on the same machine always runs the same sums.

use crate::kernels::{TileShape, L1_HALF_BYTES};

/// A dot-form multiply-add and a horizontal sum, in padded multiply-adds, for
/// [`TileShape::dot_from`].
const DOT_FMA_COST: usize = 3;
const DOT_SUM_COST: usize = 8;
/// Transposing one value, in multiply-adds of one lane, for [`TileShape::rows_in_lanes`].
const TRANSPOSE_COST: usize = 3;

impl TileShape {
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
        let last = match width - whole {
            0 => 0,
            _ if self.ends_in_half(width) => self.half_lanes,
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
        // The grouped forms take a dot form only beside a half register: their dot form costs
        // more than padding to a whole register does.
        if self.k_group > 1 && self.half_lanes == 0 {
            return (out_features, self.padded(out_features));
        }
        let dot_from = self.dot_from(in_features, out_features);
        if dot_from < out_features {
            (dot_from, out_features)
        } else {
            (dot_from, self.padded(out_features))
        }
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
        if !self.fast_transpose
            || self.k_group > 1
            || widths.len() < 2
            || !widths.iter().all(|&w| fits_l1(w))
        {
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
