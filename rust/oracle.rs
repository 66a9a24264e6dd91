//! The float64 oracle every kernel is checked against: one dot product at a time, each op
//! written for accuracy, the backward from calculus; and first-order bounds on how far a
//! kernel's rounding may take its results from the oracle's. For the tests and the fuzzers
//! (`fuzz/`, through the `oracle` feature); not part of the library's API.

use crate::mlp::LayerSpec;
use crate::ops::PostOp;

/// A layer that owns its parameters (the oracle's, the tests' and the fuzzers' chains).
#[derive(Clone, Debug)]
pub struct OwnedLayer<T> {
    pub weight: Vec<T>,
    pub bias: Option<Vec<T>>,
    pub out_features: usize,
    pub in_features: usize,
    pub post_op: PostOp,
}

impl<T> OwnedLayer<T> {
    pub fn spec(&self) -> LayerSpec<'_, T> {
        LayerSpec {
            weight: &self.weight,
            bias: self.bias.as_deref(),
            out_features: self.out_features,
            in_features: self.in_features,
            post_op: self.post_op,
        }
    }
}

/// The oracle: one dot product at a time, in f64.
pub fn reference(layers: &[OwnedLayer<f64>], input: &[f64]) -> Vec<f64> {
    reference_layers(layers, input).pop().expect("a layer")
}

/// Every layer's outputs, row-major, from the oracle.
pub fn reference_layers(layers: &[OwnedLayer<f64>], input: &[f64]) -> Vec<Vec<f64>> {
    let pre = reference_linears(layers, input);
    layers
        .iter()
        .zip(pre)
        .map(|(layer, pre)| {
            pre.into_iter()
                .map(|v| reference_op(layer.post_op, v))
                .collect()
        })
        .collect()
}

/// Every layer's Linear (before its op), row-major, from the oracle.
pub fn reference_linears(layers: &[OwnedLayer<f64>], input: &[f64]) -> Vec<Vec<f64>> {
    let rows = input.len() / layers[0].in_features;
    let mut current = input.to_vec();
    let mut linears = Vec::new();
    for layer in layers {
        let mut next = vec![0.0; rows * layer.out_features];
        for r in 0..rows {
            for o in 0..layer.out_features {
                let x = &current[r * layer.in_features..][..layer.in_features];
                let w = &layer.weight[o * layer.in_features..][..layer.in_features];
                let mut sum = layer.bias.as_ref().map_or(0.0, |b| b[o]);
                sum += x.iter().zip(w).map(|(a, b)| a * b).sum::<f64>();
                next[r * layer.out_features + o] = sum;
            }
        }
        current = next
            .iter()
            .map(|&v| reference_op(layer.post_op, v))
            .collect();
        linears.push(next);
    }
    linears
}

/// `op'(x)` in f64, from calculus (PyTorch's choice at the kinks: 0 at ReLU's 0).
pub fn reference_slope(op: PostOp, x: f64) -> f64 {
    let sigmoid = |v: f64| 1.0 / (1.0 + (-v).exp());
    let step = |inside: bool, otherwise: f64| if inside { 1.0 } else { otherwise };
    match op {
        PostOp::Identity => 1.0,
        // NaN passes, as `threshold_backward` zeroes only where `x <= 0`.
        PostOp::Relu => step(x > 0.0 || x.is_nan(), 0.0),
        PostOp::LeakyRelu { negative_slope } => step(x > 0.0, negative_slope),
        PostOp::Sigmoid => sigmoid(x) * (1.0 - sigmoid(x)),
        PostOp::Tanh => 1.0 - x.tanh() * x.tanh(),
        PostOp::Gelu => {
            let density = (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt();
            0.5 * libm::erfc(-x / std::f64::consts::SQRT_2) + x * density
        }
        PostOp::GeluTanh => {
            let c = (2.0 / std::f64::consts::PI).sqrt();
            let s = sigmoid(2.0 * c * (x + 0.044715 * x * x * x));
            s + x * s * (1.0 - s) * 2.0 * c * (1.0 + 3.0 * 0.044715 * x * x)
        }
        PostOp::Silu => sigmoid(x) * (1.0 + x * (1.0 - sigmoid(x))),
        PostOp::Elu { alpha } => step(x > 0.0, alpha * x.exp()),
        PostOp::Hardtanh { min_val, max_val } => step(min_val < x && x < max_val, 0.0),
        PostOp::Softplus { beta, threshold } => step(beta * x > threshold, sigmoid(beta * x)),
    }
}

/// The oracle's backward: `(grad_input, grads)`, `grads` laid out as [`Mlp::backward`]
/// writes them.
pub fn reference_backward(
    layers: &[OwnedLayer<f64>],
    input: &[f64],
    grad_output: &[f64],
) -> (Vec<f64>, Vec<f64>) {
    let rows = input.len() / layers[0].in_features;
    let linears = reference_linears(layers, input);
    let outputs = reference_layers(layers, input);
    let mut grad = grad_output.to_vec();
    let mut per_layer = Vec::new();
    for (index, layer) in layers.iter().enumerate().rev() {
        let (k, out) = (layer.in_features, layer.out_features);
        let below = if index == 0 {
            input
        } else {
            &outputs[index - 1][..]
        };
        let delta: Vec<f64> = grad
            .iter()
            .zip(&linears[index])
            .map(|(&g, &x)| g * reference_slope(layer.post_op, x))
            .collect();
        let mut weight_grad = vec![0.0; out * k];
        let mut bias_grad = vec![0.0; out];
        let mut grad_below = vec![0.0; rows * k];
        for r in 0..rows {
            for o in 0..out {
                let d = delta[r * out + o];
                bias_grad[o] += d;
                for j in 0..k {
                    weight_grad[o * k + j] += d * below[r * k + j];
                    grad_below[r * k + j] += d * layer.weight[o * k + j];
                }
            }
        }
        weight_grad.extend(bias_grad);
        per_layer.push(weight_grad);
        grad = grad_below;
    }
    per_layer.reverse();
    (grad, per_layer.concat())
}

/// `op` in f64, each written to keep its accuracy over the whole range: the sigmoid forms
/// as `x / (1 + exp(-x))` (no `1 - ...`), the GELU's left tail through `erfc`, the tanh
/// GELU as `x sigmoid(2u)`.
pub fn reference_op(op: PostOp, x: f64) -> f64 {
    let sigmoid = |v: f64| 1.0 / (1.0 + (-v).exp());
    match op {
        PostOp::Identity => x,
        PostOp::Relu if x < 0.0 => 0.0,
        PostOp::Relu => x,
        PostOp::LeakyRelu { negative_slope } => {
            if x > 0.0 {
                x
            } else {
                negative_slope * x
            }
        }
        PostOp::Sigmoid => sigmoid(x),
        PostOp::Tanh => x.tanh(),
        PostOp::Gelu => 0.5 * x * libm::erfc(-x / std::f64::consts::SQRT_2),
        PostOp::GeluTanh => {
            let u = (2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x);
            x * sigmoid(2.0 * u)
        }
        PostOp::Silu => x * sigmoid(x),
        PostOp::Elu { alpha } => {
            if x > 0.0 {
                x
            } else {
                alpha * x.exp_m1()
            }
        }
        // f64::max and min drop a NaN; torch.nn.functional.hardtanh keeps it.
        PostOp::Hardtanh { .. } if x.is_nan() => x,
        PostOp::Hardtanh { min_val, max_val } => max_val.min(min_val.max(x)),
        PostOp::Softplus { beta, threshold } => {
            if beta * x > threshold {
                x
            } else {
                (beta * x).exp().ln_1p() / beta
            }
        }
    }
}

/// What a kernel's element type does to results: its unit roundoff, the relative error of its
/// ops (what `every_activation_matches_its_f64_reference_on_every_isa` holds them to) and the
/// absolute error of an op near zero (results below it may come out as zero).
#[derive(Clone, Copy, Debug)]
pub struct Precision {
    pub unit: f64,
    pub op_relative: f64,
    pub op_absolute: f64,
    /// The unit roundoff of the type weights are stored in, and layer inputs may be rounded to
    /// before they are multiplied (bf16: `2^-8`), or 0 where both stay in the compute type.
    pub stored_unit: f64,
    /// int8: each output's weights rounded to a multiple of `s_w = max |W_j| / 127`, and (where
    /// the kernel multiplies int8) each layer's input row to one of `s_x = range / 255`.
    pub int8: bool,
}

impl Precision {
    pub const F32: Precision = Precision {
        unit: f32::EPSILON as f64 / 2.0,
        op_relative: 1e-6,
        op_absolute: 1e-30,
        stored_unit: 0.0,
        int8: false,
    };
    pub const F64: Precision = Precision {
        unit: f64::EPSILON / 2.0,
        op_relative: 1e-13,
        op_absolute: 1e-30,
        stored_unit: 0.0,
        int8: false,
    };
    /// bf16 weights (and, where the kernel multiplies bf16, inputs), f32 sums and ops.
    pub const BF16: Precision = Precision {
        stored_unit: 1.0 / 256.0,
        ..Precision::F32
    };
    /// int8 weights per output channel, inputs per row to u8 with a zero point, exact i32 sums,
    /// f32 scaling and ops.
    pub const INT8: Precision = Precision {
        int8: true,
        ..Precision::F32
    };

    /// A sum of `terms` products, in any order, with or without FMA: at most this times the
    /// sum of the products' magnitudes away from the exact sum (twice the textbook `n u`, for
    /// the products' own rounding and the reductions of split sums), plus the subnormals'
    /// absolute spacing per term; with narrower storage, each weight and each input rounded
    /// to it first (`2 u_s` more: `(2 u_s + 2 (k + 1) u) sum |w| |x|`).
    fn sum_error(self, terms: usize, magnitude: f64) -> f64 {
        let terms = terms as f64 + 1.0;
        2.0 * (self.stored_unit + terms * self.unit) * magnitude
            + terms * f64::from(f32::MIN_POSITIVE) * self.unit
    }
}

/// A bound on `|op(x) - op(y)| / |x - y|`.
fn lipschitz(op: PostOp) -> f64 {
    match op {
        PostOp::Identity | PostOp::Relu | PostOp::Tanh | PostOp::Hardtanh { .. } => 1.0,
        PostOp::Softplus { .. } => 1.0,
        PostOp::LeakyRelu { negative_slope } => negative_slope.abs().max(1.0),
        PostOp::Elu { alpha } => alpha.abs().max(1.0),
        PostOp::Sigmoid => 0.25,
        PostOp::Gelu | PostOp::GeluTanh => 1.13,
        PostOp::Silu => 1.1,
    }
}

/// A bound on `|op'(x) - op'(y)| / |x - y|` away from the kinks ([`kinks`]).
fn slope_lipschitz(op: PostOp) -> f64 {
    match op {
        PostOp::Identity | PostOp::Relu | PostOp::LeakyRelu { .. } | PostOp::Hardtanh { .. } => 0.0,
        PostOp::Sigmoid => 0.1,
        PostOp::Tanh => 0.77,
        PostOp::Gelu | PostOp::GeluTanh => 0.8,
        PostOp::Silu => 0.5,
        PostOp::Elu { alpha } => alpha.abs(),
        PostOp::Softplus { beta, .. } => beta.abs() / 4.0,
    }
}

/// Where `op'` jumps: a pre-activation this close to one may take either side's slope.
fn kinks(op: PostOp) -> Vec<f64> {
    match op {
        PostOp::Relu | PostOp::LeakyRelu { .. } | PostOp::Elu { .. } => vec![0.0],
        PostOp::Hardtanh { min_val, max_val } => vec![min_val, max_val],
        PostOp::Softplus { beta, threshold } => vec![threshold / beta],
        _ => Vec::new(),
    }
}

/// Where `op` itself jumps, and by how much: Softplus returns `x` where `beta x > threshold`
/// (PyTorch's switch), `(softplus(threshold) - threshold) / beta` below its value there (2e-9 at
/// the defaults, 3.13 at `beta = 0.1, threshold = 1`).
fn jump(op: PostOp) -> Option<(f64, f64)> {
    match op {
        PostOp::Softplus { beta, threshold } => {
            // softplus(t) - t, without overflow either side
            let gap = (-threshold.abs()).exp().ln_1p() + (-threshold).max(0.0);
            Some((threshold / beta, gap / beta))
        }
        _ => None,
    }
}

/// First-order bounds on how far a kernel computing at `precision` may be from the oracle on
/// `input` (finite values): per layer, row-major, the bound on its pre-activations and on its
/// outputs. The kernel's rounding of each sum ([`Precision::sum_error`]), carried through the
/// next layer's weights and each op's Lipschitz constant, plus each op's own error, plus an
/// op's jump ([`jump`]) where the exact pre-activation is within its bound of it.
pub fn forward_bounds(
    layers: &[OwnedLayer<f64>],
    input: &[f64],
    precision: Precision,
) -> (Vec<Vec<f64>>, Vec<Vec<f64>>) {
    let rows = input.len() / layers[0].in_features;
    let linears = reference_linears(layers, input);
    let outputs = reference_layers(layers, input);
    let (mut pre_bounds, mut out_bounds) = (Vec::new(), Vec::new());
    let mut below_bound = vec![0.0; input.len()];
    for (index, layer) in layers.iter().enumerate() {
        let k = layer.in_features;
        let below = if index == 0 {
            input
        } else {
            &outputs[index - 1][..]
        };
        let mut pre = vec![0.0; rows * layer.out_features];
        let mut out = vec![0.0; rows * layer.out_features];
        for r in 0..rows {
            let (x, x_bound) = (&below[r * k..][..k], &below_bound[r * k..][..k]);
            let row_scale = if precision.int8 {
                int8_row_scale(x, x_bound)
            } else {
                0.0
            };
            for o in 0..layer.out_features {
                let w = &layer.weight[o * k..][..k];
                let bias = layer.bias.as_ref().map_or(0.0, |b| b[o].abs());
                let carried: f64 = w.iter().zip(x_bound).map(|(w, e)| w.abs() * e).sum();
                let magnitude: f64 = w
                    .iter()
                    .zip(x.iter().zip(x_bound))
                    .map(|(w, (x, e))| w.abs() * (x.abs() + e))
                    .sum::<f64>()
                    + bias;
                let at = r * layer.out_features + o;
                pre[at] = carried + precision.sum_error(k, magnitude);
                if precision.int8 {
                    pre[at] += int8_error(w, x, x_bound, row_scale, precision);
                }
                let lipschitz = lipschitz(layer.post_op);
                out[at] = lipschitz * pre[at]
                    + precision.op_relative * (outputs[index][at].abs() + lipschitz * pre[at])
                    + precision.op_absolute;
                if let Some((point, size)) = jump(layer.post_op) {
                    if (linears[index][at] - point).abs() <= pre[at] {
                        out[at] += size;
                    }
                }
            }
        }
        below_bound.clone_from(&out);
        pre_bounds.push(pre);
        out_bounds.push(out);
    }
    (pre_bounds, out_bounds)
}

/// The largest scale an int8 kernel may quantize the row `x` to (each value computed within
/// `x_bound` of it): its range with 0, widened by the bounds, over 255 (at least the smallest
/// normal f32, as the int8 kernel: `quads::row_quantization`).
fn int8_row_scale(x: &[f64], x_bound: &[f64]) -> f64 {
    let (lo, hi) = x
        .iter()
        .zip(x_bound)
        .fold((0.0f64, 0.0f64), |(lo, hi), (x, e)| {
            (lo.min(x - e), hi.max(x + e))
        });
    ((hi - lo) / 255.0).max(f64::from(f32::MIN_POSITIVE))
}

/// What int8 adds to one output's bound, beside the f32 arithmetic ([`Precision::sum_error`]):
/// each weight off by at most `s_w / 2`, each input by at most `s_x / 2` (`row_scale`), both
/// with a margin for the f32 roundings of `w / s_w` and `x / s_x + z`; and the f32 conversion
/// and zero-point correction of i32 sums up to `sum |w| (|x| + |min x| + s_x) / (s_x s_w)`.
fn int8_error(w: &[f64], x: &[f64], x_bound: &[f64], row_scale: f64, precision: Precision) -> f64 {
    let largest = w.iter().fold(0.0f64, |m, w| m.max(w.abs()));
    let weight_scale = largest / 127.0;
    let half = 0.5 * (1.0 + 1e-4);
    let lowest = x
        .iter()
        .zip(x_bound)
        .fold(0.0f64, |lo, (x, e)| lo.min(x - e))
        .abs();
    let (mut weights, mut inputs, mut shifted) = (0.0, 0.0, 0.0);
    for (w, (x, e)) in w.iter().zip(x.iter().zip(x_bound)) {
        let input = x.abs() + e + half * row_scale;
        weights += w.abs();
        inputs += input;
        shifted += (w.abs() + half * weight_scale) * (input + lowest);
    }
    half * row_scale * weights + half * weight_scale * inputs + 8.0 * precision.unit * shifted
}

/// Per row: whether some pre-activation lies within (4 times) its bound of a kink of its op,
/// where a kernel may rightly take the other side's slope.
pub fn rows_near_a_kink(
    layers: &[OwnedLayer<f64>],
    input: &[f64],
    precision: Precision,
) -> Vec<bool> {
    let rows = input.len() / layers[0].in_features;
    let linears = reference_linears(layers, input);
    let (pre_bounds, _) = forward_bounds(layers, input, precision);
    (0..rows)
        .map(|r| {
            layers.iter().enumerate().any(|(index, layer)| {
                let out = layer.out_features;
                let kinks = kinks(layer.post_op);
                (0..out).any(|o| {
                    let (x, bound) = (linears[index][r * out + o], pre_bounds[index][r * out + o]);
                    kinks.iter().any(|kink| (x - kink).abs() <= 4.0 * bound)
                })
            })
        })
        .collect()
}

/// First-order bounds on how far a kernel's backward at `precision` may be from
/// [`reference_backward`], laid out as its result `(grad_input, grads)`, for rows away from the
/// kinks ([`rows_near_a_kink`]): the forward's bounds carried through each op's slope, and each
/// sum's rounding.
pub fn backward_bounds(
    layers: &[OwnedLayer<f64>],
    input: &[f64],
    grad_output: &[f64],
    precision: Precision,
) -> (Vec<f64>, Vec<f64>) {
    let rows = input.len() / layers[0].in_features;
    let linears = reference_linears(layers, input);
    let outputs = reference_layers(layers, input);
    let (pre_bounds, out_bounds) = forward_bounds(layers, input, precision);
    let mut grad = grad_output.to_vec();
    let mut grad_bound = vec![0.0; grad.len()];
    let mut per_layer = Vec::new();
    for (index, layer) in layers.iter().enumerate().rev() {
        let (k, out) = (layer.in_features, layer.out_features);
        let (below, below_bound) = if index == 0 {
            (input, vec![0.0; input.len()])
        } else {
            (&outputs[index - 1][..], out_bounds[index - 1].clone())
        };
        let mut delta = vec![0.0; rows * out];
        let mut delta_bound = vec![0.0; rows * out];
        for at in 0..rows * out {
            let slope = reference_slope(layer.post_op, linears[index][at]);
            delta[at] = grad[at] * slope;
            delta_bound[at] = grad[at].abs()
                * (slope_lipschitz(layer.post_op) * pre_bounds[index][at]
                    + precision.op_relative * slope.abs().max(1.0))
                + grad_bound[at] * (slope.abs() + lipschitz(layer.post_op) * precision.unit)
                + 2.0 * precision.unit * delta[at].abs();
        }
        let mut weight_bound = vec![0.0; out * k];
        let mut bias_bound = vec![0.0; out];
        let mut below_grad = vec![0.0; rows * k];
        let mut below_grad_bound = vec![0.0; rows * k];
        for o in 0..out {
            let mut bias_magnitude = 0.0;
            for r in 0..rows {
                bias_magnitude += delta[r * out + o].abs();
                bias_bound[o] += delta_bound[r * out + o];
            }
            bias_bound[o] += precision.sum_error(rows, bias_magnitude);
            for j in 0..k {
                let (mut carried, mut magnitude) = (0.0, 0.0);
                for r in 0..rows {
                    let (d, e) = (delta[r * out + o], delta_bound[r * out + o]);
                    let (a, a_bound) = (below[r * k + j], below_bound[r * k + j]);
                    carried += e * (a.abs() + a_bound) + d.abs() * a_bound;
                    magnitude += d.abs() * a.abs();
                }
                weight_bound[o * k + j] = carried + precision.sum_error(rows, magnitude);
            }
        }
        for r in 0..rows {
            for j in 0..k {
                let (mut carried, mut magnitude) = (0.0, 0.0);
                for o in 0..out {
                    let w = layer.weight[o * k + j].abs();
                    below_grad[r * k + j] += delta[r * out + o] * layer.weight[o * k + j];
                    carried += delta_bound[r * out + o] * w;
                    magnitude += delta[r * out + o].abs() * w;
                }
                below_grad_bound[r * k + j] = carried + precision.sum_error(out, magnitude);
            }
        }
        weight_bound.extend(bias_bound);
        per_layer.push(weight_bound);
        grad = below_grad;
        grad_bound = below_grad_bound;
    }
    per_layer.reverse();
    (grad_bound, per_layer.concat())
}
