//! The process exit codes every subcommand returns (documented in
//! `stitch --help` and `docs/api.md`).

/// Success (for `build watch`/`trigger --wait`: the build succeeded).
pub(crate) const OK: u8 = 0;
/// The build ended failed or cancelled.
pub(crate) const BUILD_FAILED: u8 = 1;
/// Bad arguments or configuration.
pub(crate) const USAGE: u8 = 2;
/// The server or database could not be reached.
pub(crate) const UNAVAILABLE: u8 = 3;
