//! Weights in PyTorch layout (`[out, in]` row-major) -> the panel layout the kernels read.
//! Runs once per weight version; see `kernels/mod.rs` for the layout.

use std::fmt::Debug;
use std::marker::PhantomData;
use std::sync::{Mutex, PoisonError};

use bytemuck::Zeroable;

use crate::kernels::{
    Bf16, Element, LayerDesc, Packed, TileShape, INT8_CHANNEL_VALUES, LINE_BYTES,
};
use crate::ops::PostOp;

/// A kernel's [`crate::kernels::Transpose`], made safe to call by its caller, who checked the ISA:
/// `(src, cols, dst, dst_stride)`.
pub type PanelTranspose<'a, T> = &'a dyn Fn(&[T], usize, &mut [T], usize);

/// A type that weights computed in `T` can be stored as (the kernels widen it back on load,
/// through [`crate::kernels::LoadFrom`], or multiply it as it is). Every compute type stores as
/// itself; bf16 rounds in [`Storage::store`]; int8 scales each output's weights
/// ([`Storage::store_channel`]).
pub trait Storage<T: Copy>: bytemuck::Pod + Send + Sync + Debug + 'static {
    /// Values kept per output after the biases (see [`PackedChain::pack`]): none where each
    /// weight is stored alone.
    const CHANNEL_VALUES: usize = 0;

    /// `value` rounded to this type.
    fn store(value: T) -> Self;

    /// Why this type cannot store the weight `value` faithfully, if it cannot: the end of
    /// "precision P ...", for [`Mlp::new`](crate::mlp::Mlp::new)'s error.
    fn refuses(value: T) -> Option<&'static str> {
        let _ = value;
        None
    }

    /// `buffer` as values of `T`, where this type is `T` (packing then transposes a register
    /// square of weights at a time instead of storing value by value).
    fn as_compute_mut(buffer: &mut [Self]) -> Option<&mut [T]> {
        let _ = buffer;
        None
    }

    /// Stores one output's weights (`row`, a row of PyTorch's `W`) into `stored` and writes the
    /// values kept for it ([`Storage::CHANNEL_VALUES`] of them) to `channel`.
    fn store_channel(row: &[T], stored: &mut [Self], channel: &mut [T]) {
        debug_assert!(channel.is_empty());
        for (stored, &value) in stored.iter_mut().zip(row) {
            *stored = Self::store(value);
        }
    }
}

impl<T: Element> Storage<T> for T {
    #[inline(always)]
    fn store(value: T) -> T {
        value
    }

    fn as_compute_mut(buffer: &mut [T]) -> Option<&mut [T]> {
        Some(buffer)
    }
}

impl Storage<f32> for Bf16 {
    #[inline(always)]
    fn store(value: f32) -> Bf16 {
        Bf16::round(value)
    }

    /// A finite value beyond bf16's range would be stored as an infinity, silently (a tester's
    /// weight of 3.4e38 gave inf for 1.7e38).
    fn refuses(value: f32) -> Option<&'static str> {
        (value.is_finite() && Bf16::round(value).widen().is_infinite())
            .then_some("holds at most 3.39e38: run this chain at fp32")
    }
}

/// Symmetric int8 per output channel: `W_j` stored as `round(W_j / s_j)` with `s_j = max |W_j| /
/// 127` (1 for an all-zero row), keeping `s_j` and the sum of the stored values (for the
/// inputs' zero points; exact in f32 for any `k` below 2^17).
impl Storage<f32> for i8 {
    const CHANNEL_VALUES: usize = INT8_CHANNEL_VALUES;

    /// `value` at scale 1: rounded to nearest even and clamped to `-127..=127`.
    #[inline(always)]
    fn store(value: f32) -> i8 {
        value.round_ties_even().clamp(-127.0, 127.0) as i8
    }

    /// Weights scaled per output need finite values: an infinity would scale its row to
    /// nothing, silently.
    fn refuses(value: f32) -> Option<&'static str> {
        (!value.is_finite()).then_some("needs finite weights")
    }

    fn store_channel(row: &[f32], stored: &mut [i8], channel: &mut [f32]) {
        let scale = int8_scale(row);
        let mut sum = 0.0f32;
        for (stored, &value) in stored.iter_mut().zip(row) {
            *stored = Self::store(value / scale);
            sum += f32::from(*stored);
        }
        channel.copy_from_slice(&[scale, sum]);
    }
}

/// The scale of one output's int8 weights: `max |w| / 127`, or 1 where they are all zero (or
/// not finite: such a weight stores as a clamped value, and the chain's `check` refuses it
/// earlier).
pub fn int8_scale(row: &[f32]) -> f32 {
    let largest = row.iter().fold(0.0f32, |m, &w| m.max(w.abs()));
    if largest > 0.0 && largest.is_finite() {
        largest / 127.0
    } else {
        1.0
    }
}

/// 64 bytes on a 64-byte boundary: a buffer of them starts on a cache line whatever it holds.
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C, align(64))]
pub struct CacheLine([u64; 8]);

const _: () = assert!(std::mem::size_of::<CacheLine>() == LINE_BYTES);

/// Buffers of dropped chains, kept for the next packing: a training step packs its chains again
/// after every optimizer step, and without them each packing of a chain with megabytes of
/// weights got fresh pages from the kernel (glibc hands blocks that large back, or maps them
/// anew), their faults most of its time: the MNIST autoencoder 784-256-64-32-64-256-784 packed
/// in 1,485 us, in 138 us where glibc was told to keep its memory.
static SPARE_BUFFERS: Mutex<Vec<Vec<CacheLine>>> = Mutex::new(Vec::new());

/// Buffers smaller than this come from `malloc`'s free lists, without faults (the seed's
/// encoder's, 134 KB, packed as fast either way).
const SPARE_MIN_BYTES: usize = 1 << 20;

/// The most [`SPARE_BUFFERS`] holds, all together (the oldest go first).
const SPARE_MAX_BYTES: usize = 64 << 20;

/// A spare buffer of at least `lines` lines (and at most twice that), if one is kept.
fn take_spare(lines: usize) -> Option<Vec<CacheLine>> {
    if lines * LINE_BYTES < SPARE_MIN_BYTES {
        return None;
    }
    let mut spare = SPARE_BUFFERS.lock().unwrap_or_else(PoisonError::into_inner);
    let fits = |buffer: &Vec<CacheLine>| (lines..=2 * lines).contains(&buffer.capacity());
    let best = (0..spare.len())
        .filter(|&at| fits(&spare[at]))
        .min_by_key(|&at| spare[at].capacity())?;
    Some(spare.swap_remove(best))
}

/// Keeps `buffer` for [`take_spare`] if it is large enough and fits.
fn keep_spare(buffer: Vec<CacheLine>) {
    let bytes = buffer.capacity() * LINE_BYTES;
    if !(SPARE_MIN_BYTES..=SPARE_MAX_BYTES).contains(&bytes) {
        return;
    }
    let mut spare = SPARE_BUFFERS.lock().unwrap_or_else(PoisonError::into_inner);
    let mut kept: usize = spare.iter().map(|b| b.capacity() * LINE_BYTES).sum();
    while kept + bytes > SPARE_MAX_BYTES {
        kept -= spare.remove(0).capacity() * LINE_BYTES;
    }
    spare.push(buffer);
}

/// A zero-initialised buffer of `T` that starts on a cache line, so no SIMD load of a panel row
/// straddles two lines. Its memory goes back to [`SPARE_BUFFERS`] when it is dropped.
#[derive(Clone, Debug)]
pub struct AlignedBuf<T> {
    lines: Vec<CacheLine>,
    len: usize,
    element: PhantomData<T>,
}

impl<T: bytemuck::Pod> AlignedBuf<T> {
    pub fn zeros(len: usize) -> Self {
        const { assert!(std::mem::align_of::<T>() <= LINE_BYTES) };
        let count = (len * std::mem::size_of::<T>()).div_ceil(LINE_BYTES);
        let lines = match take_spare(count) {
            Some(mut buffer) => {
                buffer.clear();
                buffer.resize(count, CacheLine::zeroed());
                buffer
            }
            None => vec![CacheLine::zeroed(); count],
        };
        AlignedBuf {
            lines,
            len,
            element: PhantomData,
        }
    }

    /// `parts` one after the other (zeros past them, to the end of the line). Written line by
    /// line into a buffer taken as it is, not zeroed first: `malloc`'s zeroing of the seed's
    /// 134 KB made packing its chains 1.1x slower.
    pub fn concat(parts: &[&[T]]) -> Self {
        const { assert!(std::mem::align_of::<T>() <= LINE_BYTES) };
        let len = parts.iter().map(|part| part.len()).sum::<usize>();
        let count = (len * std::mem::size_of::<T>()).div_ceil(LINE_BYTES);
        let mut lines = take_spare(count).unwrap_or_default();
        lines.clear();
        lines.reserve_exact(count);
        let mut staged = CacheLine::zeroed();
        let mut staged_bytes = 0;
        for part in parts {
            let mut bytes: &[u8] = bytemuck::cast_slice(part);
            if staged_bytes > 0 {
                let take = bytes.len().min(LINE_BYTES - staged_bytes);
                bytemuck::bytes_of_mut(&mut staged)[staged_bytes..][..take]
                    .copy_from_slice(&bytes[..take]);
                (staged_bytes, bytes) = (staged_bytes + take, &bytes[take..]);
                if staged_bytes < LINE_BYTES {
                    continue;
                }
                lines.push(staged);
            }
            let whole = bytes.chunks_exact(LINE_BYTES);
            let tail = whole.remainder();
            lines.extend(whole.map(bytemuck::pod_read_unaligned::<CacheLine>));
            staged = CacheLine::zeroed();
            bytemuck::bytes_of_mut(&mut staged)[..tail.len()].copy_from_slice(tail);
            staged_bytes = tail.len();
        }
        if staged_bytes > 0 {
            lines.push(staged);
        }
        AlignedBuf {
            lines,
            len,
            element: PhantomData,
        }
    }

    pub fn as_slice(&self) -> &[T] {
        &bytemuck::cast_slice(&self.lines)[..self.len]
    }

    pub fn as_mut_slice(&mut self) -> &mut [T] {
        &mut bytemuck::cast_slice_mut(&mut self.lines)[..self.len]
    }
}

impl<T> Drop for AlignedBuf<T> {
    fn drop(&mut self) {
        keep_spare(std::mem::take(&mut self.lines));
    }
}

/// One Linear layer in PyTorch layout, borrowed for packing.
#[derive(Clone, Copy, Debug)]
pub struct LayerSpec<'a, T> {
    /// `out_features x in_features`, row-major (as `nn.Linear.weight`).
    pub weight: &'a [T],
    /// `out_features` values, or none for `bias=False`.
    pub bias: Option<&'a [T]>,
    pub out_features: usize,
    pub in_features: usize,
    /// Applied to this layer's outputs.
    pub post_op: PostOp,
}

/// A whole chain packed for one [`TileShape`]: every layer's weights, stored as `W`, in one
/// cache-line aligned buffer, and their biases, in the compute type `T`, in another.
#[derive(Clone, Debug)]
pub struct PackedChain<W, T> {
    layers: Vec<LayerDesc>,
    /// The chain again for rows in the lanes, or empty (see [`TileShape::rows_in_lanes`]).
    lanes_layers: Vec<LayerDesc>,
    weights: AlignedBuf<W>,
    biases: AlignedBuf<T>,
}

impl<W: Storage<T>, T: Element> PackedChain<W, T> {
    /// Packs every layer, its weights stored as `W` (rounded by [`Storage::store`]); the caller
    /// has checked that the lengths match the shapes. Each layer's biases take `padded_out`
    /// values from `bias_at`, then each of `W`'s [`Storage::CHANNEL_VALUES`] as many.
    /// `transpose`, the kernel's [`crate::kernels::Transpose`] where it has one, lays out the
    /// panels of weights stored as `T`.
    pub fn pack(
        shape: &TileShape,
        specs: &[LayerSpec<'_, T>],
        transpose: Option<PanelTranspose<'_, T>>,
    ) -> Self {
        // Each layer's panels and bias start on a cache line.
        let weights_line = LINE_BYTES / std::mem::size_of::<W>();
        let biases_line = LINE_BYTES / std::mem::size_of::<T>();
        let (mut weights_len, mut biases_len) = (0, 0);
        let widths: Vec<usize> = specs
            .iter()
            .map(|spec| spec.in_features)
            .chain(specs.last().map(|spec| spec.out_features))
            .collect();
        let mut lay_out = |spec: &LayerSpec<'_, T>, rows_in_lanes: bool| {
            let (k, out) = (spec.in_features, spec.out_features);
            let (dot_from, padded_out) = shape.form(k, out, rows_in_lanes);
            let weights_at = weights_len;
            let dot_at = weights_at + shape.grouped(k) * shape.panel_columns(dot_from);
            weights_len =
                (dot_at + (out - dot_from) * shape.padded(k)).next_multiple_of(weights_line);
            let bias_at = biases_len;
            biases_len =
                (bias_at + (1 + W::CHANNEL_VALUES) * padded_out).next_multiple_of(biases_line);
            LayerDesc {
                in_features: k,
                out_features: out,
                padded_out,
                weights_at,
                bias_at,
                post_op: spec.post_op,
                dot_from,
                dot_at,
                panel_columns: shape.panel_columns(dot_from),
            }
        };
        let layers: Vec<LayerDesc> = specs.iter().map(|spec| lay_out(spec, false)).collect();
        let lanes_layers: Vec<LayerDesc> = if shape.rows_in_lanes(&widths, std::mem::size_of::<T>())
        {
            specs.iter().map(|spec| lay_out(spec, true)).collect()
        } else {
            Vec::new()
        };
        let mut weights = AlignedBuf::zeros(weights_len);
        let mut biases = AlignedBuf::zeros(biases_len);
        let lanes_specs = specs.iter().take(lanes_layers.len());
        for (spec, layer) in specs
            .iter()
            .zip(&layers)
            .chain(lanes_specs.zip(&lanes_layers))
        {
            if shape.k_group > 1 {
                let channels = &mut biases.as_mut_slice()[layer.bias_at + layer.padded_out..];
                pack_grouped_panels(shape, spec, layer, weights.as_mut_slice(), channels);
            } else {
                assert_eq!(
                    W::CHANNEL_VALUES,
                    0,
                    "values kept per output need grouped panels"
                );
                pack_panels(shape, spec, layer, weights.as_mut_slice(), transpose);
                pack_rows(shape, spec, layer, weights.as_mut_slice());
            }
            if let Some(bias) = spec.bias {
                biases.as_mut_slice()[layer.bias_at..][..spec.out_features].copy_from_slice(bias);
            }
        }
        PackedChain {
            layers,
            lanes_layers,
            weights,
            biases,
        }
    }
}

impl<W: bytemuck::Pod, T: bytemuck::Pod> PackedChain<W, T> {
    pub fn layers(&self) -> &[LayerDesc] {
        &self.layers
    }

    pub fn view(&self) -> Packed<'_, W, T> {
        Packed {
            layers: &self.layers,
            weights: self.weights.as_slice(),
            biases: self.biases.as_slice(),
            lanes_layers: &self.lanes_layers,
        }
    }
}

/// Writes the weight rows of `spec`'s dot-form outputs (`dot_from..out`) at `layer.dot_at`, each
/// padded with zeros to whole registers.
fn pack_rows<W: Storage<T>, T: Element>(
    shape: &TileShape,
    spec: &LayerSpec<'_, T>,
    layer: &LayerDesc,
    buffer: &mut [W],
) {
    let k = spec.in_features;
    let padded_in = shape.padded(k);
    let dot_outs = spec.out_features - layer.dot_from;
    let rows = &mut buffer[layer.dot_at..][..dot_outs * padded_in];
    for (packed, row) in rows
        .chunks_exact_mut(padded_in)
        .zip(spec.weight[layer.dot_from * k..].chunks_exact(k))
    {
        for (stored, &value) in packed.iter_mut().zip(row) {
            *stored = W::store(value);
        }
    }
}

/// Writes the weights of `spec`'s panel outputs (`0..dot_from`) as k-major panels at
/// `layer.weights_at`, the last one's rows padded with zeros to `layer.panel_columns` (whole
/// registers, or a half where the last register runs in its half), so every panel row starts
/// where a register load does not cross a cache line. Rows of 42 made seven loads in eight
/// cross one: on the Intel Xeon the seed's encoder ran 1.29x faster at batch 1 with its rows
/// padded to 48 (14% more bytes), 1.07x from 7 rows up. A panel is its block of weight rows
/// transposed: by `transpose` where the weights are stored as `T`, else value by value.
fn pack_panels<W: Storage<T>, T: Element>(
    shape: &TileShape,
    spec: &LayerSpec<'_, T>,
    layer: &LayerDesc,
    buffer: &mut [W],
    transpose: Option<PanelTranspose<'_, T>>,
) {
    assert_eq!(
        spec.weight.len(),
        spec.out_features * spec.in_features,
        "weight is out x in"
    );
    let k = spec.in_features;
    for (col, width) in shape.panels(layer.dot_from).iter() {
        let stride = layer.panel_stride(col, width);
        let panel = &mut buffer[layer.weights_at + col * k..][..stride * k];
        let weight_rows = &spec.weight[col * k..][..width * k];
        if let Some(transpose) = transpose {
            if let Some(panel) = W::as_compute_mut(panel) {
                transpose(weight_rows, k, panel, stride);
                continue;
            }
        }
        // A block of `k` at a time: each weight row's block is one or two cache lines, and the
        // panel rows written stay in L1. Walking `W` down its columns made packing the training
        // path's largest cost after the kernels (the chain is packed again after every step).
        for start in (0..k).step_by(PACK_BLOCK) {
            let end = (start + PACK_BLOCK).min(k);
            let panel_rows = &mut panel[start * stride..end * stride];
            for (j, weight_row) in weight_rows.chunks_exact(k).enumerate() {
                for (panel_row, &value) in panel_rows
                    .chunks_exact_mut(stride)
                    .zip(&weight_row[start..end])
                {
                    panel_row[j] = W::store(value);
                }
            }
        }
    }
}

/// Writes `spec`'s panels for a kernel taking `k` in groups ([`TileShape::k_group`]) at
/// `layer.weights_at`: panels of whole registers (the last one a half where
/// [`TileShape::panel_columns`] says so), each panel row one group of `k` for every column, the
/// group's values side by side (`k_group = 2`: `W[c, 2p], W[c, 2p + 1]` for each column `c` of
/// row `p`); zeros past the outputs and past `k`. The dot-form outputs' rows as `pack_rows`
/// lays them out. Each output's channel values go to `channels`, `layer.padded_out` apart.
fn pack_grouped_panels<W: Storage<T>, T: Element>(
    shape: &TileShape,
    spec: &LayerSpec<'_, T>,
    layer: &LayerDesc,
    buffer: &mut [W],
    channels: &mut [T],
) {
    let (k, group) = (spec.in_features, shape.k_group);
    let grouped_k = shape.grouped(k);
    let columns = shape.panel_columns(layer.dot_from);
    let mut stored = vec![W::zeroed(); k];
    let mut channel = vec![T::ZERO; W::CHANNEL_VALUES];
    let padded_in = shape.padded(k);
    for (c, weight_row) in spec.weight.chunks_exact(k).enumerate().skip(layer.dot_from) {
        let at = layer.dot_at + (c - layer.dot_from) * padded_in;
        W::store_channel(weight_row, &mut buffer[at..][..k], &mut channel);
        for (i, &value) in channel.iter().enumerate() {
            channels[i * layer.padded_out + c] = value;
        }
    }
    for (col, width) in shape.panels(columns).iter() {
        let panel = &mut buffer[layer.weights_at + col * grouped_k..][..width * grouped_k];
        for (c, weight_row) in spec
            .weight
            .chunks_exact(k)
            .enumerate()
            .skip(col)
            .take(width.min(layer.dot_from.saturating_sub(col)))
        {
            W::store_channel(weight_row, &mut stored, &mut channel);
            for (i, &value) in channel.iter().enumerate() {
                channels[i * layer.padded_out + c] = value;
            }
            let c = c - col;
            for (j, &value) in stored.iter().enumerate() {
                let (row, within) = (j / group, j % group);
                panel[(row * width + c) * group + within] = value;
            }
        }
    }
}

/// Values of `k` packed at a time (see `pack_panels`).
const PACK_BLOCK: usize = 16;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_buf_is_cache_line_aligned() {
        for len in [0, 1, 7, 100] {
            let buf = AlignedBuf::<f32>::zeros(len);
            assert_eq!(buf.as_slice().len(), len);
            assert_eq!(buf.as_slice().as_ptr() as usize % LINE_BYTES, 0);
        }
    }

    #[test]
    fn a_buffer_made_from_a_dropped_one_starts_as_zeros_again() {
        let len = SPARE_MIN_BYTES / std::mem::size_of::<f32>() + 3;
        for _ in 0..3 {
            let mut buf = AlignedBuf::<f32>::zeros(len);
            assert!(buf.as_slice().iter().all(|&v| v == 0.0));
            assert_eq!(buf.as_slice().as_ptr() as usize % LINE_BYTES, 0);
            buf.as_mut_slice().fill(1.0);
        }
    }

    #[test]
    fn concat_joins_parts_that_end_anywhere_in_a_line() {
        for lengths in [
            &[5, 33, 0, 100, 7][..],
            &[16, 16],
            &[0],
            &[],
            &[1 << 18, 3, 1 << 18],
        ] {
            let parts: Vec<Vec<f32>> = lengths
                .iter()
                .enumerate()
                .map(|(p, &n)| (0..n).map(|i| (p * 1_000_000 + i) as f32).collect())
                .collect();
            let borrowed: Vec<&[f32]> = parts.iter().map(Vec::as_slice).collect();
            let joined = AlignedBuf::concat(&borrowed);
            assert_eq!(joined.as_slice(), parts.concat(), "{lengths:?}");
            assert_eq!(joined.as_slice().as_ptr() as usize % LINE_BYTES, 0);
            let halves: Vec<&[u16]> = borrowed.iter().map(|p| bytemuck::cast_slice(p)).collect();
            assert_eq!(
                AlignedBuf::concat(&halves).as_slice(),
                halves.concat(),
                "{lengths:?}"
            );
        }
    }

    /// A one-row tile shape without rows in the lanes: packing only looks at lanes and panels.
    fn shape(lanes: usize, nv_max: usize) -> TileShape {
        TileShape {
            lanes,
            mr: 1,
            nv_max,
            block_rows: 1,
            fast_transpose: false,
            half_lanes: 0,
            k_group: 1,
        }
    }

    #[test]
    fn packs_panels_k_major_the_last_padded_to_whole_registers() {
        let shape = shape(2, 2);
        // 5 outputs x 2 inputs (bias padded to 6): one panel of 4 columns, one of 1 in rows of 2.
        let weight: Vec<f32> = (0..10).map(|v| v as f32).collect();
        let spec = LayerSpec {
            weight: &weight,
            bias: Some(&[1.0; 5]),
            out_features: 5,
            in_features: 2,
            post_op: PostOp::Relu,
        };
        let chain = PackedChain::<f32, f32>::pack(&shape, &[spec, spec], None);
        let view = chain.view();
        let first = view.layers[0];
        assert_eq!(
            (
                first.padded_out,
                first.weights_at,
                first.bias_at,
                first.post_op
            ),
            (6, 0, 0, PostOp::Relu)
        );
        assert_eq!(
            (view.layers[1].weights_at, view.layers[1].bias_at),
            (16, 16)
        );
        // Panel 0, k=0: W[0..4, 0]; k=1: W[0..4, 1]. Panel 1, k=0: W[4, 0], 0; k=1: W[4, 1], 0.
        let expected = [0., 2., 4., 6., 1., 3., 5., 7., 8., 0., 9., 0.];
        assert_eq!(&view.weights[..12], &expected);
        assert_eq!(first.panel_columns, 6);
        assert_eq!(&view.biases[..6], &[1., 1., 1., 1., 1., 0.]);
        assert_eq!(view.weights.as_ptr() as usize % LINE_BYTES, 0);
        assert_eq!(view.biases.as_ptr() as usize % LINE_BYTES, 0);
    }

    #[test]
    fn splits_a_short_tail_into_dot_form_rows() {
        let shape = shape(4, 1);
        // 5 outputs x 50 inputs: outputs 0..4 in one panel, output 4 as a row padded to 52.
        let weight: Vec<f32> = (0..250).map(|v| v as f32).collect();
        let spec = LayerSpec {
            weight: &weight,
            bias: None,
            out_features: 5,
            in_features: 50,
            post_op: PostOp::Identity,
        };
        let chain = PackedChain::<f32, f32>::pack(&shape, &[spec], None);
        let view = chain.view();
        let layer = view.layers[0];
        assert_eq!(
            (layer.dot_from, layer.dot_at, layer.padded_out),
            (4, 200, 5)
        );
        assert_eq!(&view.weights[..5], &[0., 50., 100., 150., 1.]);
        assert_eq!(&view.weights[200..202], &[200., 201.]);
        assert_eq!(&view.weights[249..252], &[249., 0., 0.]);
        assert_eq!(view.weights.len(), 256);
        assert_eq!(view.biases, &[0.; 16]);
    }
}
