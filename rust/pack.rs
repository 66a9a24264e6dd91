//! Weights in PyTorch layout (`[out, in]` row-major) -> the panel layout the kernels read.
//! Runs once per weight version; see `kernels/mod.rs` for the layout.

use crate::kernels::{Element, LayerView, TileShape};

/// A zero-initialised buffer whose first element sits on a 64-byte (cache-line) boundary, so no
/// SIMD load of a panel row straddles two lines.
#[derive(Clone, Debug)]
pub struct AlignedBuf<T> {
    storage: Vec<T>,
    offset: usize,
    len: usize,
}

const ALIGN_BYTES: usize = 64;

impl<T: Element> AlignedBuf<T> {
    pub fn zeros(len: usize) -> Self {
        let slack = ALIGN_BYTES / std::mem::size_of::<T>();
        let storage = vec![T::ZERO; len + slack];
        let offset = storage.as_ptr().align_offset(ALIGN_BYTES).min(slack);
        AlignedBuf {
            storage,
            offset,
            len,
        }
    }

    pub fn as_slice(&self) -> &[T] {
        &self.storage[self.offset..self.offset + self.len]
    }

    pub fn as_mut_slice(&mut self) -> &mut [T] {
        &mut self.storage[self.offset..self.offset + self.len]
    }
}

/// Whether a layer's outputs go through ReLU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    Identity,
    Relu,
}

/// A layer packed for one [`TileShape`].
#[derive(Clone, Debug)]
pub struct PackedLayer<T> {
    pub in_features: usize,
    pub out_features: usize,
    pub padded_out: usize,
    pub activation: Activation,
    weights: AlignedBuf<T>,
    bias: AlignedBuf<T>,
}

impl<T: Element> PackedLayer<T> {
    /// Packs `weight` (`out_features x in_features`, row-major) and `bias` (`out_features`, or
    /// zeros when absent). The caller has checked the lengths.
    pub fn pack(
        shape: &TileShape,
        weight: &[T],
        bias: Option<&[T]>,
        out_features: usize,
        in_features: usize,
        activation: Activation,
    ) -> Self {
        assert_eq!(
            weight.len(),
            out_features * in_features,
            "weight is out x in"
        );
        let padded_out = shape.padded(out_features);
        let mut packed = AlignedBuf::zeros(in_features * padded_out);
        let panels = packed.as_mut_slice();
        let panel_width = shape.panel_width();
        for col in (0..padded_out).step_by(panel_width) {
            let width = panel_width.min(padded_out - col);
            let panel = &mut panels[col * in_features..][..width * in_features];
            for (k, panel_row) in panel.chunks_exact_mut(width).enumerate() {
                for (j, value) in panel_row.iter_mut().enumerate() {
                    let out = col + j;
                    if out < out_features {
                        *value = weight[out * in_features + k];
                    }
                }
            }
        }
        let mut padded_bias = AlignedBuf::zeros(padded_out);
        if let Some(bias) = bias {
            assert_eq!(bias.len(), out_features, "bias has out_features values");
            padded_bias.as_mut_slice()[..out_features].copy_from_slice(bias);
        }
        PackedLayer {
            in_features,
            out_features,
            padded_out,
            activation,
            weights: packed,
            bias: padded_bias,
        }
    }

    pub fn view(&self) -> LayerView<'_, T> {
        LayerView {
            in_features: self.in_features,
            out_features: self.out_features,
            padded_out: self.padded_out,
            weights: self.weights.as_slice(),
            bias: self.bias.as_slice(),
            relu: self.activation == Activation::Relu,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_buf_is_cache_line_aligned() {
        for len in [0, 1, 7, 100] {
            let buf = AlignedBuf::<f32>::zeros(len);
            assert_eq!(buf.as_slice().len(), len);
            assert_eq!(buf.as_slice().as_ptr() as usize % ALIGN_BYTES, 0);
        }
    }

    #[test]
    fn packs_panels_k_major_with_zero_padding() {
        let shape = TileShape {
            lanes: 2,
            mr: 1,
            nv_max: 2,
            block_rows: 1,
        };
        // 5 outputs x 2 inputs -> padded to 6: one panel of 4 columns, one of 2.
        let weight: Vec<f32> = (0..10).map(|v| v as f32).collect();
        let layer = PackedLayer::pack(&shape, &weight, Some(&[1.0; 5]), 5, 2, Activation::Relu);
        let view = layer.view();
        assert_eq!(view.padded_out, 6);
        // Panel 0, k=0: W[0..4, 0]; k=1: W[0..4, 1]. Panel 1, k=0: W[4, 0], pad; k=1: W[4, 1], pad.
        let expected = [0., 2., 4., 6., 1., 3., 5., 7., 8., 0., 9., 0.];
        assert_eq!(view.weights, &expected);
        assert_eq!(view.bias, &[1., 1., 1., 1., 1., 0.]);
    }
}
