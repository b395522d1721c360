//! The task that owns one running build: it copies the command's output
//! into the log, carries out a cancel (asked in this runner, or by any
//! runner through the build's `cancel` marker) with SIGTERM and, after the
//! grace period, SIGKILL, and records how the command ended.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use nix::sys::signal::Signal;
use stitch_core::{BuildId, LogLine, OutputStream, StepKind};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::Child;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::process::{self, signal_group};
use super::state::LogWriter;
use super::Shared;

/// The single step every local build has.
pub(crate) const STEP_ID: i64 = 1;
pub(crate) const STEP_NAME: &str = "run";
/// Longest output line kept in one `LogLine`; longer lines are split so a
/// command printing without newlines cannot exhaust memory.
const MAX_LINE_BYTES: usize = 64 * 1024;
/// How long to keep reading output after the command exited and its group
/// was killed (a process that left the group may still hold the pipes).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a supervisor looks for a cancel marker dropped by another
/// runner (a cancel asked through its own runner arrives at once).
pub const CANCEL_POLL: Duration = Duration::from_millis(100);

/// Output lines waiting for the log writer.
type OutputLine = (OutputStream, String, chrono::DateTime<Utc>);

/// Append to the build log when it could be opened.
pub(crate) fn log(writer: &mut Option<LogWriter>, line: LogLine) {
    if let Some(w) = writer {
        w.write(&line);
    }
}

/// A note from stitch itself in the build's log (stderr of the step).
pub(crate) fn note(writer: &mut Option<LogWriter>, text: &str) {
    log(
        writer,
        LogLine::data(
            STEP_ID,
            OutputStream::Stderr,
            format!("stitch: {text}"),
            Utc::now(),
        ),
    );
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Run until the build's command has ended and its output is logged, then
/// record the outcome and free the slot. Returns early, recording nothing,
/// when the runner is dropped: like a crash, the next runner on the state
/// directory reports the build lost.
pub(crate) async fn supervise(
    shared: Arc<Shared>,
    id: BuildId,
    mut child: Child,
    pgid: i32,
    mut cancel_rx: watch::Receiver<bool>,
    mut writer: Option<LogWriter>,
    // Serves the command for as long as this task runs; dropped with it.
    _job_api: Option<stitch_job::JobApi>,
) {
    let shutdown = shared.shutdown.clone();
    let (tx, mut rx) = mpsc::channel::<OutputLine>(1024);
    if let Some(out) = child.stdout.take() {
        tokio::spawn(read_output(
            out,
            OutputStream::Stdout,
            tx.clone(),
            shutdown.clone(),
        ));
    }
    if let Some(err) = child.stderr.take() {
        tokio::spawn(read_output(
            err,
            OutputStream::Stderr,
            tx.clone(),
            shutdown.clone(),
        ));
    }
    drop(tx);

    let grace = shared.config.cancel_grace;
    let mut exit = None;
    let mut output_open = true;
    let mut cancel_seen = false;
    let mut watch_open = true;
    let mut marker_seen = false;
    let mut marker_poll = tokio::time::interval(CANCEL_POLL);
    marker_poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut kill_at: Option<Instant> = None;
    let mut drain_until: Option<Instant> = None;
    let mut cancelled_before_exit = false;

    while exit.is_none() || output_open {
        let asked = marker_seen || (watch_open && *cancel_rx.borrow_and_update());
        if !cancel_seen && asked {
            cancel_seen = true;
            if exit.is_none() {
                // The supervisor is the one that signals the group: it
                // knows the process is still its child, so the group id
                // cannot have been reused.
                if let Err(e) = signal_group(pgid, Signal::SIGTERM) {
                    tracing::warn!(build_id = %id, error = %e, "cannot send SIGTERM to process group {pgid}");
                }
                kill_at = Some(Instant::now() + grace);
            }
            note_cancel(&mut writer, exit.is_none().then_some(grace));
        }
        tokio::select! {
            biased;
            () = shutdown.cancelled() => return,
            line = rx.recv(), if output_open => match line {
                Some((stream, text, at)) => log(&mut writer, LogLine::data(STEP_ID, stream, text, at)),
                None => output_open = false,
            },
            status = child.wait(), if exit.is_none() => {
                cancelled_before_exit = cancel_seen
                    || *cancel_rx.borrow()
                    || shared.dir.cancel_requested(&id).is_some();
                exit = Some(status);
                // Whatever the command left behind in its group would hold
                // the output open and outlive the build. Still unreaped
                // members keep the group id from being reused.
                let _ = signal_group(pgid, Signal::SIGKILL);
                drain_until = Some(Instant::now() + DRAIN_TIMEOUT);
            },
            changed = cancel_rx.changed(), if !cancel_seen && watch_open => {
                if changed.is_err() {
                    watch_open = false; // sender gone: only the marker remains
                }
            },
            _ = marker_poll.tick(), if !cancel_seen && exit.is_none() => {
                marker_seen = shared.dir.cancel_requested(&id).is_some();
            },
            () = sleep_until_opt(kill_at), if exit.is_none() => {
                kill_at = None;
                let _ = signal_group(pgid, Signal::SIGKILL);
                note(&mut writer, &format!("grace period of {} is over: sent SIGKILL", humanize(grace)));
            },
            () = sleep_until_opt(drain_until), if output_open => {
                output_open = false;
                note(&mut writer, "output still open after the command exited; stopped reading it");
            },
        }
    }

    let Some(exit) = exit else { return };
    if cancelled_before_exit && !cancel_seen {
        note_cancel(&mut writer, None);
    }
    let outcome = process::outcome(&exit, cancelled_before_exit);
    log(
        &mut writer,
        LogLine::step_end(STEP_ID, STEP_NAME, StepKind::User, Utc::now()),
    );
    shared.finish_running(&id, outcome);
}

/// Log that a cancel arrived: `grace` is set when the command was still
/// running (it was sent SIGTERM, and SIGKILL may follow).
fn note_cancel(writer: &mut Option<LogWriter>, grace: Option<Duration>) {
    let text = match grace {
        Some(grace) => format!(
            "cancel requested: sent SIGTERM to the process group; SIGKILL follows in {} if it is still running",
            humanize(grace)
        ),
        None => "cancel requested as the command ended; the build is recorded cancelled"
            .to_string(),
    };
    note(writer, &text);
}

/// Copy one output pipe into the channel, line by line.
async fn read_output<R: AsyncRead + Unpin>(
    pipe: R,
    stream: OutputStream,
    tx: mpsc::Sender<OutputLine>,
    shutdown: CancellationToken,
) {
    let mut reader = BufReader::new(pipe);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let read = tokio::select! {
            () = shutdown.cancelled() => return,
            read = read_line_capped(&mut reader, &mut buf) => read,
        };
        match read {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                let text = String::from_utf8_lossy(&buf).into_owned();
                if tx.send((stream, text, Utc::now())).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Read up to and including the next `\n`, or `MAX_LINE_BYTES`, whichever
/// comes first. Returns the bytes read (0 at end of stream).
async fn read_line_capped<R: AsyncRead + Unpin>(
    reader: &mut BufReader<R>,
    buf: &mut Vec<u8>,
) -> std::io::Result<usize> {
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            return Ok(buf.len());
        }
        let room = MAX_LINE_BYTES - buf.len();
        let window = &available[..available.len().min(room)];
        let (take, done) = match window.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (window.len(), window.len() == room),
        };
        buf.extend_from_slice(&window[..take]);
        reader.consume(take);
        if done {
            return Ok(buf.len());
        }
    }
}

/// `10s`, `1.5s`, `250ms` for log notes.
pub(crate) fn humanize(d: Duration) -> String {
    if d.as_millis() % 1000 == 0 {
        format!("{}s", d.as_secs())
    } else if d < Duration::from_secs(1) {
        format!("{}ms", d.as_millis())
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn lines_are_split_at_newlines_and_capped() {
        let long = vec![b'x'; MAX_LINE_BYTES + 10];
        let mut input = b"one\ntwo\r\n".to_vec();
        input.extend_from_slice(&long);
        input.extend_from_slice(b"\nlast");
        let mut reader = BufReader::new(&input[..]);
        let mut lines = Vec::new();
        loop {
            let mut buf = Vec::new();
            if read_line_capped(&mut reader, &mut buf).await.unwrap() == 0 {
                break;
            }
            lines.push(buf);
        }
        assert_eq!(lines[0], b"one\n");
        assert_eq!(lines[1], b"two\r\n");
        assert_eq!(lines[2].len(), MAX_LINE_BYTES);
        assert_eq!(lines[3], b"xxxxxxxxxx\n");
        assert_eq!(lines[4], b"last");
        assert_eq!(lines.len(), 5);
    }

    #[test]
    fn durations_read_well() {
        assert_eq!(humanize(Duration::from_secs(10)), "10s");
        assert_eq!(humanize(Duration::from_millis(250)), "250ms");
        assert_eq!(humanize(Duration::from_millis(1500)), "1.5s");
    }
}
