//! The process exit codes every subcommand returns (documented in
//! `stitch --help` and `docs/cli.md`).

/// Success (for `build watch`/`trigger --wait`: the build succeeded).
pub(crate) const OK: u8 = 0;
/// The build ended failed or cancelled.
pub(crate) const BUILD_FAILED: u8 = 1;
/// Bad arguments or configuration.
pub(crate) const USAGE: u8 = 2;
/// The server or database could not be reached.
pub(crate) const UNAVAILABLE: u8 = 3;

/// The exit codes as `stitch --help` prints them (and docs/cli.md, which
/// is rendered from the same text).
pub(crate) const EXIT_CODES_HELP: &str = "\
Exit codes:
  0  success; for `build watch` and `--wait`: the build succeeded
  1  `build watch` and `--wait`: the build failed or was cancelled
  2  usage or input error: bad arguments or configuration, a request the
     server refused (unknown build or queue, …), nothing to show yet
     (`build logs` of a build without a log, `build open` without a URL)
  3  the server or database could not be reached, a stream was cut and
     could not be resumed, or an internal error
`stitch job exec` exits with its command's code; `stitch job
promise-failure` documents its own.";
