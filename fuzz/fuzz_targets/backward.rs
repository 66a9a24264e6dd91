#![no_main]
//! Any chain's saving forward and backward on every ISA against the float64 oracle's backward.

use fusedae_fuzz::{check_backward, Case};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|case: Case| check_backward(&case));
