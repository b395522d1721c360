//! The `stitch serve` harness is `stitch_testkit::serve`, shared by every
//! crate's tests; this file names the binary these tests built.

#![allow(dead_code)] // each test file uses its own part of the helpers

pub use stitch_testkit::serve::Serve;

/// The `stitch` binary cargo built for these tests.
pub const STITCH: &str = env!("CARGO_BIN_EXE_stitch");
