#![no_main]
//! Any chain, rows and thread count: every ISA against the scalar kernel and the float64 oracle.

use fusedae_fuzz::{check_forward, Case};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|case: Case| check_forward(&case));
