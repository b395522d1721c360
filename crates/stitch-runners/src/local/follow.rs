//! Streaming a local build's `log.jsonl`: everything written so far, then
//! new lines as they are appended, until the build is terminal and the
//! file has been read to its end.

use std::collections::VecDeque;
use std::time::Duration;

use futures::StreamExt;
use stitch_core::{BuildId, LogLine, LogStream, RunnerError};
use tokio::io::AsyncReadExt;

use super::state::StateDir;

/// How often a follower at the end of the file looks for more.
const POLL: Duration = Duration::from_millis(100);

struct Follower {
    dir: StateDir,
    id: BuildId,
    file: Option<tokio::fs::File>,
    partial: Vec<u8>,
    ready: VecDeque<LogLine>,
    /// The build was seen terminal: read to the end once more, then stop.
    final_pass: bool,
    done: bool,
}

/// A stream of the build's log lines. Lines that do not parse (a torn
/// write from a crash) are skipped.
pub(crate) fn follow(dir: StateDir, id: BuildId) -> LogStream {
    let f = Follower {
        dir,
        id,
        file: None,
        partial: Vec::new(),
        ready: VecDeque::new(),
        final_pass: false,
        done: false,
    };
    futures::stream::unfold(f, |mut f| async move {
        match f.next().await {
            Ok(Some(line)) => Some((Ok(line), f)),
            Ok(None) => None,
            Err(e) => {
                // Report once, then end: the caller may open a new stream.
                f.done = true;
                f.ready.clear();
                Some((Err(e), f))
            }
        }
    })
    .boxed()
}

impl Follower {
    async fn next(&mut self) -> Result<Option<LogLine>, RunnerError> {
        loop {
            if let Some(line) = self.ready.pop_front() {
                return Ok(Some(line));
            }
            if self.done {
                return Ok(None);
            }
            if self.read_more().await? {
                continue;
            }
            // At the end of what is written.
            if self.final_pass {
                self.done = true;
                continue;
            }
            // The supervisor writes every line before the terminal state,
            // so once the state is terminal one more pass reads them all.
            let terminal = self
                .dir
                .read(&self.id)?
                .is_none_or(|s| s.status.is_terminal());
            if terminal {
                self.final_pass = true;
                continue;
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Read what is available; `true` if anything was read.
    async fn read_more(&mut self) -> Result<bool, RunnerError> {
        let path = self.dir.log_path(&self.id);
        if self.file.is_none() {
            match tokio::fs::File::open(&path).await {
                Ok(f) => self.file = Some(f),
                // Not started yet (or never will be): nothing to read.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
                Err(e) => {
                    return Err(RunnerError::Internal(format!(
                        "opening {}: {e}",
                        path.display()
                    )))
                }
            }
        }
        let Some(file) = self.file.as_mut() else {
            return Ok(false);
        };
        let mut chunk = vec![0u8; 64 * 1024];
        let n = file
            .read(&mut chunk)
            .await
            .map_err(|e| RunnerError::Internal(format!("reading {}: {e}", path.display())))?;
        if n == 0 {
            return Ok(false);
        }
        self.partial.extend_from_slice(&chunk[..n]);
        while let Some(end) = self.partial.iter().position(|&b| b == b'\n') {
            let raw: Vec<u8> = self.partial.drain(..=end).collect();
            let text = &raw[..raw.len() - 1];
            if text.is_empty() {
                continue;
            }
            match serde_json::from_slice::<LogLine>(text) {
                Ok(line) => self.ready.push_back(line),
                Err(e) => {
                    tracing::warn!(build_id = %self.id, error = %e, "skipping unreadable log line")
                }
            }
        }
        Ok(true)
    }
}
