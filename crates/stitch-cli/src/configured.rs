//! Loading the configuration (and what it opens) for the subcommands that
//! work on the configured storage directly rather than through a server.

use stitch_server::config::{self, LoadOptions};

use crate::exit::{UNAVAILABLE, USAGE};
use crate::ConfigArgs;

/// The load options `--config`/`--data-dir` name.
pub(crate) fn load_options(args: &ConfigArgs) -> LoadOptions {
    LoadOptions {
        file: args.config.clone(),
        data_dir: args.data_dir.clone(),
        ..LoadOptions::default()
    }
}

/// Opens the message queue of the configured database for an `mq`
/// command; on failure prints why and returns the exit code (2 for the
/// configuration, 3 for the database).
pub(crate) async fn open_configured_queue(args: &ConfigArgs) -> Result<stitch_mq::Queue, u8> {
    let config = match config::load(&load_options(args)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{}", config::render_problems(&e));
            return Err(USAGE);
        }
    };
    stitch_server::state::open_queue(&config)
        .await
        .map_err(|e| {
            eprintln!("stitch: {e}");
            UNAVAILABLE
        })
}
