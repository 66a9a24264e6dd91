//! The post-ops: what may follow a layer's multiply-adds, applied to its outputs in registers in
//! the kernels' epilogue. One enum, matched exhaustively everywhere (a new variant that a match
//! forgets does not compile), and one list of names that the Python side checks its own table
//! against (`fusedae._native.POST_OPS`).

use std::fmt;

/// An elementwise op applied to a layer's outputs, with its parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum PostOp {
    Identity,
    /// `max(0, x)`, NaN kept as NaN (as `torch.relu`).
    Relu,
}

impl PostOp {
    /// Every op's name, in declaration order: the names [`PostOp::parse`] takes.
    pub const NAMES: [&'static str; 2] = ["identity", "relu"];

    pub fn name(self) -> &'static str {
        match self {
            PostOp::Identity => Self::NAMES[0],
            PostOp::Relu => Self::NAMES[1],
        }
    }

    /// The op `name`d with `params` (none for every op today); an unknown name, or parameters
    /// an op does not take, is an error that says what was expected.
    pub fn parse(name: &str, params: &[f64]) -> Result<PostOp, String> {
        let op = [PostOp::Identity, PostOp::Relu]
            .into_iter()
            .find(|op| op.name() == name)
            .ok_or_else(|| {
                format!(
                    "unknown post-op {name:?}: expected one of {}",
                    Self::NAMES.join(", ")
                )
            })?;
        if !params.is_empty() {
            return Err(format!(
                "post-op {name:?} takes no parameters, got {}",
                params.len()
            ));
        }
        Ok(op)
    }
}

impl fmt::Display for PostOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_names_are_errors() {
        for name in PostOp::NAMES {
            assert_eq!(PostOp::parse(name, &[]).unwrap().name(), name);
        }
        let error = PostOp::parse("gelu", &[]).unwrap_err();
        assert!(error.contains("expected one of identity, relu"), "{error}");
        assert!(PostOp::parse("relu", &[0.1]).is_err());
    }
}
