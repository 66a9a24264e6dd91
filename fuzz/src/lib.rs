//! What the fuzz targets share: a fuzzer's bytes turned into a chain (1 to 8 layers, widths 1 to
//! 1100, any post-op with its parameters, with or without bias, float32 or float64), its rows
//! (0 to 300, NaN, infinities, subnormals and -0.0 among the inputs) and a thread count; and the
//! checks of every ISA this CPU runs against the scalar kernel and the float64 oracle, within the
//! oracle's first-order error bounds (`fusedae::oracle`).
//!
//! The fuzzer chooses the structure and where the special values go; the weights and ordinary
//! inputs come from a generator it seeds, so a 1100 x 1100 layer needs no megabytes of input.

use arbitrary::Arbitrary;
use fusedae::dispatch::{self, Float};
use fusedae::oracle::{
    backward_bounds, forward_bounds, reference_backward, reference_layers, rows_near_a_kink,
    OwnedLayer, Precision,
};
use fusedae::{threads, Isa, Mlp, PostOp};

/// Most multiply-adds per row times rows in one case, so that the float64 oracle (one dot
/// product at a time) keeps a case to tens of milliseconds: wide chains get fewer rows.
const MAX_FORWARD_WORK: usize = 4_000_000;
const MAX_BACKWARD_WORK: usize = 1_000_000;
const MAX_WIDTH: usize = 1100;
const MAX_ROWS: usize = 300;
const MAX_LAYERS: usize = 8;

#[derive(Debug, Arbitrary)]
pub struct Case {
    double: bool,
    in_features: u16,
    layers: Vec<LayerCase>,
    rows: u16,
    threads: u8,
    seed: u64,
    specials: Vec<Special>,
    /// Backward only: which layers want their parameters' gradients, and the input's.
    needs_params: u8,
    needs_input: bool,
}

#[derive(Debug, Arbitrary)]
struct LayerCase {
    out_features: u16,
    op: u8,
    params: [u16; 2],
    bias: bool,
}

/// A special value at `(row, column)` of the input (NaN and infinities: forward only) or, for
/// the finite ones, of a weight.
#[derive(Debug, Arbitrary)]
struct Special {
    row: u16,
    column: u16,
    kind: u8,
    in_weights: bool,
}

/// A width from 1 to 1100, small ones (to 64) as likely as the rest.
fn width(raw: u16) -> usize {
    let limit = if raw & 0x8000 == 0 { 64 } else { MAX_WIDTH };
    1 + usize::from(raw & 0x7fff) % limit
}

/// `raw` mapped onto `[low, high]`.
fn in_range(raw: u16, low: f64, high: f64) -> f64 {
    low + (high - low) * f64::from(raw) / f64::from(u16::MAX)
}

/// The op numbered `raw`, its parameters drawn from `params` within the ranges the error
/// bounds are stated for.
fn post_op(raw: u8, params: [u16; 2]) -> PostOp {
    let name = PostOp::NAMES[usize::from(raw) % PostOp::NAMES.len()];
    let values: Vec<f64> = match name {
        "leaky_relu" => vec![in_range(params[0], 0.0, 1.0)],
        "elu" => vec![in_range(params[0], 0.0, 2.0)],
        "hardtanh" => {
            let low = in_range(params[0], -3.0, 0.0);
            vec![low, low + in_range(params[1], 0.01, 3.0)]
        }
        "softplus" => vec![
            in_range(params[0], 0.25, 4.0),
            in_range(params[1], 1.0, 30.0),
        ],
        _ => vec![],
    };
    PostOp::parse(name, &values).expect("parameters within the op's ranges")
}

/// `op` with its parameters rounded to `T`, as the kernels use them.
fn rounded_params<T: Float>(op: PostOp) -> PostOp
where
    f64: From<T>,
{
    let params: Vec<f64> = op
        .params()
        .iter()
        .map(|&p| f64::from(T::from_f64(p)))
        .collect();
    PostOp::parse(op.name(), &params).expect("rounding keeps an op's parameters valid")
}

/// splitmix64: the weights' and ordinary inputs' generator.
struct Generator(u64);

impl Generator {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[-scale, scale)`.
    fn uniform(&mut self, scale: f64) -> f64 {
        scale * ((self.next() >> 11) as f64 / (1u64 << 52) as f64 - 1.0)
    }
}

/// A special value of `T`: finite ones only where `finite`.
fn special<T: Float>(kind: u8, finite: bool) -> T
where
    f64: From<T>,
{
    let subnormal = if T::NAME == "float32" { 1e-40 } else { 1e-310 };
    let kinds = [
        0.0,
        -0.0,
        subnormal,
        -subnormal,
        f64::NAN,
        f64::INFINITY,
        f64::NEG_INFINITY,
    ];
    let count = if finite { 4 } else { kinds.len() };
    T::from_f64(kinds[usize::from(kind) % count])
}

/// A case built: the chain in `T` and the same numbers in f64 for the oracle.
pub struct Built<T> {
    pub layers: Vec<OwnedLayer<T>>,
    pub oracle_layers: Vec<OwnedLayer<f64>>,
    pub input: Vec<T>,
    pub rows: usize,
}

impl Case {
    /// The chain, rows and inputs in `T`, with rows cut so the case stays within `max_work`;
    /// `specials_finite`: no NaN or infinity among the inputs.
    fn build<T: Float>(&self, max_work: usize, specials_finite: bool) -> Option<Built<T>>
    where
        f64: From<T>,
    {
        if self.layers.is_empty() {
            return None;
        }
        let mut generator = Generator(self.seed);
        let in_features = width(self.in_features);
        let mut layers = Vec::new();
        let mut fan_in = in_features;
        for layer in self.layers.iter().take(MAX_LAYERS) {
            let out = width(layer.out_features);
            let scale = 1.5 / (fan_in as f64).sqrt();
            layers.push(OwnedLayer {
                weight: (0..out * fan_in)
                    .map(|_| T::from_f64(generator.uniform(scale)))
                    .collect(),
                bias: layer.bias.then(|| {
                    (0..out)
                        .map(|_| T::from_f64(generator.uniform(0.5)))
                        .collect()
                }),
                out_features: out,
                in_features: fan_in,
                post_op: rounded_params::<T>(post_op(layer.op, layer.params)),
            });
            fan_in = out;
        }
        let work_per_row: usize = layers.iter().map(|l| l.in_features * l.out_features).sum();
        let rows = (usize::from(self.rows) % (MAX_ROWS + 1)).min(max_work / work_per_row);
        let mut input: Vec<T> = (0..rows * in_features)
            .map(|_| T::from_f64(generator.uniform(3.0)))
            .collect();
        for special_case in &self.specials {
            if special_case.in_weights {
                let count = layers.len();
                let layer = &mut layers[usize::from(special_case.row) % count];
                let at = usize::from(special_case.column) % layer.weight.len();
                layer.weight[at] = special(special_case.kind, true);
            } else if !input.is_empty() {
                let at = (usize::from(special_case.row) * in_features
                    + usize::from(special_case.column))
                    % input.len();
                input[at] = special(special_case.kind, specials_finite);
            }
        }
        let oracle_layers = layers.iter().map(to_f64).collect();
        Some(Built {
            layers,
            oracle_layers,
            input,
            rows,
        })
    }

    fn set_threads(&self) {
        threads::set_num_threads(1 + usize::from(self.threads) % 4).expect("1 to 4 threads");
    }
}

fn to_f64<T: Float>(layer: &OwnedLayer<T>) -> OwnedLayer<f64>
where
    f64: From<T>,
{
    OwnedLayer {
        weight: layer.weight.iter().map(|&v| f64::from(v)).collect(),
        bias: layer
            .bias
            .as_ref()
            .map(|b| b.iter().map(|&v| f64::from(v)).collect()),
        out_features: layer.out_features,
        in_features: layer.in_features,
        post_op: layer.post_op,
    }
}

fn precision<T: Float>() -> Precision {
    if T::NAME == "float32" {
        Precision::F32
    } else {
        Precision::F64
    }
}

fn mlp<T: Float>(layers: &[OwnedLayer<T>], isa: Isa) -> Mlp<T> {
    let specs: Vec<_> = layers.iter().map(OwnedLayer::spec).collect();
    Mlp::new(&specs, isa).expect("a valid chain")
}

/// `got` against the oracle's `want`: NaN where it has NaN, the same infinity, else within
/// `bound` (where the bound is finite: rows with an infinite input have none).
fn check_value(got: f64, want: f64, bound: f64, context: &dyn Fn() -> String) {
    if want.is_nan() {
        assert!(got.is_nan(), "{}: got {got:e}, want NaN", context());
    } else if want.is_infinite() {
        assert_eq!(got, want, "{}", context());
    } else if bound.is_finite() {
        assert!(
            (got - want).abs() <= bound,
            "{}: got {got:e}, want {want:e} within {bound:e}",
            context()
        );
    } else {
        assert!(got.is_finite(), "{}: got {got:e}, want {want:e}", context());
    }
}

/// Every ISA's forward against the oracle and against the scalar kernel.
pub fn check_forward(case: &Case) {
    if case.double {
        forward_in::<f64>(case);
    } else {
        forward_in::<f32>(case);
    }
}

fn forward_in<T: Float>(case: &Case)
where
    f64: From<T>,
{
    let Some(built) = case.build::<T>(MAX_FORWARD_WORK, false) else {
        return;
    };
    case.set_threads();
    let input64: Vec<f64> = built.input.iter().map(|&v| f64::from(v)).collect();
    let want = reference_layers(&built.oracle_layers, &input64)
        .pop()
        .expect("a layer");
    let (_, out_bounds) = forward_bounds(&built.oracle_layers, &input64, precision::<T>());
    let bound = out_bounds.last().expect("a layer");
    let run = |isa: Isa| {
        let mlp = mlp(&built.layers, isa);
        let mut output = vec![T::ZERO; built.rows * mlp.out_features()];
        mlp.forward(&built.input, &mut output)
            .expect("shapes agree");
        output.into_iter().map(f64::from).collect::<Vec<f64>>()
    };
    let scalar = run(Isa::Scalar);
    for isa in dispatch::available() {
        let got = run(isa);
        for (at, &value) in got.iter().enumerate() {
            let context = || format!("{isa} {}, output {at}", T::NAME);
            check_value(value, want[at], bound[at], &context);
            // Both within the bound of the oracle, so within twice it of each other.
            check_value(value, scalar[at], 2.0 * bound[at], &context);
        }
    }
}

/// Every ISA's saving forward and backward against the oracle's backward, on finite inputs,
/// the gradient of the rows near a kink set to zero (there either slope is right).
pub fn check_backward(case: &Case) {
    if case.double {
        backward_in::<f64>(case);
    } else {
        backward_in::<f32>(case);
    }
}

fn backward_in<T: Float>(case: &Case)
where
    f64: From<T>,
{
    let Some(built) = case.build::<T>(MAX_BACKWARD_WORK, true) else {
        return;
    };
    case.set_threads();
    let precision = precision::<T>();
    let input64: Vec<f64> = built.input.iter().map(|&v| f64::from(v)).collect();
    let out_features = built.layers.last().expect("a layer").out_features;
    let near_a_kink = rows_near_a_kink(&built.oracle_layers, &input64, precision);
    let mut generator = Generator(case.seed ^ 0x5eed);
    let grad_output: Vec<T> = (0..built.rows * out_features)
        .map(|at| {
            let value = generator.uniform(1.0);
            T::from_f64(if near_a_kink[at / out_features] {
                0.0
            } else {
                value
            })
        })
        .collect();
    let grad_output64: Vec<f64> = grad_output.iter().map(|&v| f64::from(v)).collect();
    let (want_input, want) = reference_backward(&built.oracle_layers, &input64, &grad_output64);
    let (input_bound, bound) =
        backward_bounds(&built.oracle_layers, &input64, &grad_output64, precision);
    let needs_params: Vec<bool> = (0..built.layers.len())
        .map(|index| case.needs_params >> index & 1 == 1)
        .collect();
    // Where each layer's gradients start in the flat result.
    let mut starts = Vec::new();
    let mut start = 0;
    for layer in &built.layers {
        starts.push(start..start + layer.out_features * (layer.in_features + 1));
        start += layer.out_features * (layer.in_features + 1);
    }
    for isa in dispatch::available() {
        let mlp = mlp(&built.layers, isa);
        let mut output = vec![T::ZERO; built.rows * out_features];
        let mut saved = vec![T::ZERO; built.rows * mlp.info().saved_width];
        mlp.forward_saving(&built.input, &mut output, &mut saved)
            .expect("shapes agree");
        let mut grad_input = vec![T::ZERO; built.input.len()];
        let mut grads = vec![T::ZERO; mlp.gradients_len()];
        mlp.backward(
            &built.input,
            &saved,
            &output,
            &grad_output,
            &needs_params,
            case.needs_input.then_some(&mut grad_input[..]),
            &mut grads,
        )
        .expect("shapes agree");
        if case.needs_input {
            for (at, &value) in grad_input.iter().enumerate() {
                let context = || format!("{isa} {} grad_input {at}", T::NAME);
                check_value(f64::from(value), want_input[at], input_bound[at], &context);
            }
        }
        for (index, range) in starts.iter().enumerate() {
            for at in range.clone() {
                let value = f64::from(grads[at]);
                let context = || format!("{isa} {} layer {index} gradient {at}", T::NAME);
                if needs_params[index] {
                    check_value(value, want[at], bound[at], &context);
                } else {
                    assert_eq!(value, 0.0, "{}: not wanted, so zero", context());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arbitrary::Unstructured;

    /// The checks pass on cases from plain random bytes (what a fuzzer starts from).
    #[test]
    fn random_cases_pass() {
        let mut generator = Generator(42);
        for _ in 0..200 {
            let bytes: Vec<u8> = (0..256).map(|_| generator.next() as u8).collect();
            let case = Case::arbitrary(&mut Unstructured::new(&bytes)).expect("enough bytes");
            check_forward(&case);
            check_backward(&case);
        }
    }
}
