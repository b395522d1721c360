//! Buildkite job logs as stitch `LogLine`s: each command job is a step
//! (control start with its name and command, data lines, control end), and
//! the agent's `ESC _bk;t=<unix millis> BEL` timestamp markers become each
//! line's `time` (lines without one inherit the previous line's time).

use chrono::{DateTime, Utc};
use stitch_core::{LogLine, StepKind};

use super::model::Job;
pub use crate::timed_lines::TimedLine;
use crate::timed_lines::{self, parse_vendor_time, LineStamp};

/// The marker the agent writes before a timestamp; an `ESC` usually
/// precedes it and a `BEL` ends the timestamp.
const MARKER: &str = "_bk;t=";

/// Buildkite's stamps: `ESC _bk;t=<unix millis> BEL` markers anywhere in
/// the line; the first one gives the line's time.
#[derive(Clone, Copy, Debug)]
pub struct BuildkiteStamp;

impl LineStamp for BuildkiteStamp {
    fn split(line: &str) -> (String, Option<DateTime<Utc>>) {
        strip_markers(line)
    }
}

/// Turns a raw Buildkite log that arrives in pieces into [`TimedLine`]s.
pub type LineSplitter = timed_lines::LineSplitter<BuildkiteStamp>;

/// Splits a raw log into lines and reads their timestamps. A last line
/// without a trailing newline is included only when `complete` (the job
/// finished): otherwise it may still grow.
pub fn parse_log(raw: &str, start: DateTime<Utc>, complete: bool) -> Vec<TimedLine> {
    timed_lines::parse::<BuildkiteStamp>(raw, start, complete)
}

/// The text without markers, and the first marker's time.
fn strip_markers(line: &str) -> (String, Option<DateTime<Utc>>) {
    let mut out = String::with_capacity(line.len());
    let mut first = None;
    let mut rest = line;
    while let Some(at) = rest.find(MARKER) {
        let mut before = &rest[..at];
        // The escape that opens the APC sequence belongs to the marker.
        if let Some(stripped) = before.strip_suffix('\u{1b}') {
            before = stripped;
        }
        out.push_str(before);
        let after = &rest[at + MARKER.len()..];
        let digits = after.bytes().take_while(u8::is_ascii_digit).count();
        let stamp = after[..digits]
            .parse::<i64>()
            .ok()
            .and_then(DateTime::from_timestamp_millis);
        if first.is_none() {
            first = stamp;
        }
        let mut tail = &after[digits..];
        if let Some(t) = tail.strip_prefix('\u{7}') {
            tail = t;
        }
        rest = tail;
    }
    out.push_str(rest);
    (out, first)
}

/// How far one job's log was read, and the line it left open.
pub(crate) type JobRead = timed_lines::JobRead<BuildkiteStamp>;

/// The control line opening `job`'s step.
pub(crate) fn step_start(step_id: i64, job: &Job, fallback: DateTime<Utc>) -> LogLine {
    let time = job
        .started_at
        .as_deref()
        .and_then(parse_vendor_time)
        .unwrap_or(fallback);
    LogLine::step_start(
        step_id,
        job.display_name(),
        StepKind::User,
        job.command.clone(),
        time,
    )
}

/// The control line closing `job`'s step.
pub(crate) fn step_end(step_id: i64, job: &Job, fallback: DateTime<Utc>) -> LogLine {
    let time = job
        .finished_at
        .as_deref()
        .and_then(parse_vendor_time)
        .unwrap_or(fallback);
    LogLine::step_end(step_id, job.display_name(), StepKind::User, time)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn t0() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap()
    }

    #[test]
    fn markers_become_times_and_vanish_from_the_text() {
        let raw = "\u{1b}_bk;t=1767225600123\u{7}~~~ Running commands\r\n\
                   plain line\n\
                   \u{1b}_bk;t=1767225601000\u{7}$ make test\n";
        let lines = parse_log(raw, t0(), false);
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0].text, "~~~ Running commands");
        assert_eq!(lines[0].time.timestamp_millis(), 1_767_225_600_123);
        assert_eq!(lines[1].text, "plain line");
        assert_eq!(lines[1].time, lines[0].time, "inherits the previous time");
        assert_eq!(lines[2].text, "$ make test");
        assert_eq!(lines[2].time.timestamp_millis(), 1_767_225_601_000);
    }

    #[test]
    fn partial_last_lines_wait_for_completion() {
        let raw = "one\ntw";
        assert_eq!(parse_log(raw, t0(), false).len(), 1);
        let done = parse_log(raw, t0(), true);
        assert_eq!(done.len(), 2);
        assert_eq!(done[1].text, "tw");
        assert_eq!(done[1].time, t0());
        assert!(parse_log("", t0(), true).is_empty());
    }

    #[test]
    fn pieces_cut_anywhere_give_the_lines_of_the_whole() {
        let raw = "\u{1b}_bk;t=1767225600123\u{7}h\u{e9}llo \u{2603}\r\nsecond\nthird";
        let whole = parse_log(raw, t0(), true);
        let bytes = raw.as_bytes();
        for cut in 0..bytes.len() {
            let mut s = LineSplitter::new(t0());
            let mut lines = s.push(&bytes[..cut]);
            lines.extend(s.push(&bytes[cut..]));
            lines.extend(s.finish());
            assert_eq!(lines, whole, "cut at {cut}");
        }
        assert_eq!(whole[0].text, "h\u{e9}llo \u{2603}");
    }

    #[test]
    fn bare_and_repeated_markers() {
        let (text, t) = strip_markers("_bk;t=1000x _bk;t=2000\u{7}y");
        assert_eq!(text, "x y");
        assert_eq!(t.unwrap().timestamp_millis(), 1000);
        let (text, t) = strip_markers("_bk;t=notanumber");
        assert_eq!(text, "notanumber");
        assert!(t.is_none());
        let (text, _) = strip_markers("\u{1b}[31mred\u{1b}[0m");
        assert_eq!(text, "\u{1b}[31mred\u{1b}[0m", "other escapes are kept");
    }
}
