//! The post-ops: what may follow a layer's multiply-adds, applied to its outputs in registers in
//! the kernels' epilogue. One enum, matched exhaustively everywhere (a new variant that a match
//! forgets does not compile), and one list of names that the Python side checks its own table
//! against (`fusedae._native.POST_OPS`).

use std::fmt;

/// An elementwise op applied to a layer's outputs, with its parameters (as PyTorch's module of
/// the same name holds them; the kernels round them to their element type, as PyTorch does).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum PostOp {
    Identity,
    /// `max(0, x)`, NaN kept as NaN (as `torch.relu`).
    Relu,
    /// `x` where `x > 0`, else `negative_slope * x` (`nn.LeakyReLU`).
    LeakyRelu {
        negative_slope: f64,
    },
    /// `1 / (1 + exp(-x))` (`nn.Sigmoid`).
    Sigmoid,
    /// `nn.Tanh`.
    Tanh,
    /// `x * Phi(x)`, `Phi` the standard normal CDF (`nn.GELU()`).
    Gelu,
    /// `x / 2 * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 x^3)))` (`nn.GELU(approximate="tanh")`).
    GeluTanh,
    /// `x * sigmoid(x)` (`nn.SiLU`).
    Silu,
    /// `x` where `x > 0`, else `alpha * (exp(x) - 1)` (`nn.ELU`).
    Elu {
        alpha: f64,
    },
    /// `x` clamped to `[min_val, max_val]` (`nn.Hardtanh`; `nn.ReLU6` is `(0, 6)`).
    Hardtanh {
        min_val: f64,
        max_val: f64,
    },
    /// `log(1 + exp(beta x)) / beta`, or `x` where `beta x > threshold` (`nn.Softplus`).
    Softplus {
        beta: f64,
        threshold: f64,
    },
}

/// The smallest Softplus `beta` the kernels take: they flush `exp(beta x)` to 0 below
/// `exp(-87)` (float32; 1.7e-38 off at most) and divide it by `beta`, which keeps that within
/// 1e-30 down to this `beta` (at 1e-20 the result was 0 where PyTorch gives 1e-18). PyTorch's
/// Softplus takes smaller ones: the torch modules run such a layer as plain PyTorch.
pub const SOFTPLUS_MIN_BETA: f64 = 1.0 / (1u64 << 24) as f64;

impl PostOp {
    /// Every op's name, in declaration order: the names [`PostOp::parse`] takes.
    pub const NAMES: [&'static str; 11] = [
        "identity",
        "relu",
        "leaky_relu",
        "sigmoid",
        "tanh",
        "gelu",
        "gelu_tanh",
        "silu",
        "elu",
        "hardtanh",
        "softplus",
    ];

    /// Each op with PyTorch's default parameters, in the order of [`PostOp::NAMES`].
    const DEFAULTS: [PostOp; 11] = [
        PostOp::Identity,
        PostOp::Relu,
        PostOp::LeakyRelu {
            negative_slope: 0.01,
        },
        PostOp::Sigmoid,
        PostOp::Tanh,
        PostOp::Gelu,
        PostOp::GeluTanh,
        PostOp::Silu,
        PostOp::Elu { alpha: 1.0 },
        PostOp::Hardtanh {
            min_val: -1.0,
            max_val: 1.0,
        },
        PostOp::Softplus {
            beta: 1.0,
            threshold: 20.0,
        },
    ];

    pub fn name(self) -> &'static str {
        Self::NAMES[self.index()]
    }

    fn index(self) -> usize {
        match self {
            PostOp::Identity => 0,
            PostOp::Relu => 1,
            PostOp::LeakyRelu { .. } => 2,
            PostOp::Sigmoid => 3,
            PostOp::Tanh => 4,
            PostOp::Gelu => 5,
            PostOp::GeluTanh => 6,
            PostOp::Silu => 7,
            PostOp::Elu { .. } => 8,
            PostOp::Hardtanh { .. } => 9,
            PostOp::Softplus { .. } => 10,
        }
    }

    /// The op's parameters, in the order [`PostOp::parse`] takes them.
    pub fn params(self) -> Vec<f64> {
        match self {
            PostOp::Identity
            | PostOp::Relu
            | PostOp::Sigmoid
            | PostOp::Tanh
            | PostOp::Gelu
            | PostOp::GeluTanh
            | PostOp::Silu => vec![],
            PostOp::LeakyRelu { negative_slope } => vec![negative_slope],
            PostOp::Elu { alpha } => vec![alpha],
            PostOp::Hardtanh { min_val, max_val } => vec![min_val, max_val],
            PostOp::Softplus { beta, threshold } => vec![beta, threshold],
        }
    }

    /// The op `name`d with `params`: all of its parameters in order, or none for PyTorch's
    /// defaults. An unknown name, another number of parameters, a non-finite one, `min_val >=
    /// max_val` or `beta` below [`SOFTPLUS_MIN_BETA`] is an error that says what was expected.
    pub fn parse(name: &str, params: &[f64]) -> Result<PostOp, String> {
        let default = Self::NAMES
            .iter()
            .position(|&known| known == name)
            .map(|index| Self::DEFAULTS[index])
            .ok_or_else(|| {
                format!(
                    "unknown post-op {name:?}: expected one of {}",
                    Self::NAMES.join(", ")
                )
            })?;
        if params.is_empty() {
            return Ok(default);
        }
        let expected = default.params().len();
        if params.len() != expected {
            return Err(format!(
                "post-op {name:?} takes {expected} parameters ({}), got {}",
                default.param_names().join(", "),
                params.len()
            ));
        }
        if let Some(bad) = params.iter().find(|p| !p.is_finite()) {
            return Err(format!(
                "post-op {name:?}: parameters must be finite, got {bad}"
            ));
        }
        let op = match default {
            PostOp::LeakyRelu { .. } => PostOp::LeakyRelu {
                negative_slope: params[0],
            },
            PostOp::Elu { .. } => PostOp::Elu { alpha: params[0] },
            PostOp::Hardtanh { .. } => PostOp::Hardtanh {
                min_val: params[0],
                max_val: params[1],
            },
            PostOp::Softplus { .. } => PostOp::Softplus {
                beta: params[0],
                threshold: params[1],
            },
            other => other,
        };
        match op {
            PostOp::Hardtanh { min_val, max_val } if min_val >= max_val => Err(format!(
                "post-op \"hardtanh\": min_val ({min_val}) must be below max_val ({max_val})"
            )),
            PostOp::Softplus { beta, .. } if beta <= 0.0 => Err(format!(
                "post-op \"softplus\": beta must be positive, got {beta}"
            )),
            PostOp::Softplus { beta, .. } if beta < SOFTPLUS_MIN_BETA => Err(format!(
                "post-op \"softplus\": beta must be at least 2^-24 ({SOFTPLUS_MIN_BETA:e}), \
                 got {beta:e}: the kernels' exponential, 0 below exp(-87) in float32, is \
                 divided by beta"
            )),
            op => Ok(op),
        }
    }

    /// Whether the op's gradient is computed from its input (the pre-activation), rather than
    /// from its output as PyTorch's backward for it does (ReLU, Sigmoid, Tanh: `y (1 - y)`,
    /// ...). The backward computes such a layer's Linear again. (The Python op table says the
    /// same of each op; a test holds the two together.)
    pub fn gradient_reads_pre(self) -> bool {
        match self {
            PostOp::Identity | PostOp::Relu | PostOp::Sigmoid | PostOp::Tanh => false,
            PostOp::LeakyRelu { .. }
            | PostOp::Gelu
            | PostOp::GeluTanh
            | PostOp::Silu
            | PostOp::Elu { .. }
            | PostOp::Hardtanh { .. }
            | PostOp::Softplus { .. } => true,
        }
    }

    /// The names of the op's parameters, as PyTorch's module calls them.
    pub fn param_names(self) -> &'static [&'static str] {
        match self {
            PostOp::LeakyRelu { .. } => &["negative_slope"],
            PostOp::Elu { .. } => &["alpha"],
            PostOp::Hardtanh { .. } => &["min_val", "max_val"],
            PostOp::Softplus { .. } => &["beta", "threshold"],
            _ => &[],
        }
    }
}

impl fmt::Display for PostOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())?;
        let params = self.params();
        if !params.is_empty() {
            let names = self.param_names();
            let pairs: Vec<String> = names
                .iter()
                .zip(&params)
                .map(|(name, value)| format!("{name}={value}"))
                .collect();
            write!(f, "({})", pairs.join(", "))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_with_their_parameters() {
        for (index, name) in PostOp::NAMES.into_iter().enumerate() {
            let op = PostOp::parse(name, &[]).unwrap();
            assert_eq!(op, PostOp::DEFAULTS[index]);
            assert_eq!(op.name(), name);
            assert_eq!(PostOp::parse(name, &op.params()).unwrap(), op);
            assert_eq!(op.params().len(), op.param_names().len());
        }
        assert_eq!(
            PostOp::parse("hardtanh", &[0.0, 6.0]).unwrap(),
            PostOp::Hardtanh {
                min_val: 0.0,
                max_val: 6.0
            }
        );
        assert_eq!(
            PostOp::parse("softplus", &[2.0, 10.0]).unwrap().to_string(),
            "softplus(beta=2, threshold=10)"
        );
    }

    #[test]
    fn unknown_names_and_bad_parameters_are_errors() {
        let error = PostOp::parse("swish", &[]).unwrap_err();
        assert!(
            error.contains("expected one of identity, relu, leaky_relu"),
            "{error}"
        );
        assert!(PostOp::parse("relu", &[0.1]).is_err());
        assert!(PostOp::parse("leaky_relu", &[0.1, 0.2]).is_err());
        assert!(PostOp::parse("elu", &[f64::NAN]).is_err());
        assert!(PostOp::parse("hardtanh", &[1.0, 1.0]).is_err());
        assert!(PostOp::parse("softplus", &[0.0, 20.0]).is_err());
        assert!(PostOp::parse("softplus", &[1e-20, 20.0]).is_err());
        assert!(PostOp::parse("softplus", &[SOFTPLUS_MIN_BETA, 20.0]).is_ok());
    }
}
