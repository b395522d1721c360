//! A vendor's raw job log as timed lines, for every vendor runner: the log
//! is split at `\n` (arriving whole or in pieces cut anywhere, even inside
//! a UTF-8 sequence), `\r` is trimmed, and each line's time is read from
//! it; a line without one inherits the previous line's time.
//!
//! The seam: how a vendor stamps its lines (Buildkite's `ESC _bk;t=…`
//! markers, GitHub's RFC 3339 prefixes) is a [`LineStamp`]; the splitting
//! and the inheritance are written once, here, with what the vendors that
//! fetch a job's log by byte offset share (`JobRead`) and their timestamp
//! forms (`parse_vendor_time`).

use std::marker::PhantomData;

use chrono::{DateTime, Utc};
use stitch_core::{LogLine, OutputStream};

/// How one vendor marks a log line with its time.
pub trait LineStamp {
    /// The line's text without the vendor's time marks, and the time they
    /// give (`None`: the line carries none).
    fn split(line: &str) -> (String, Option<DateTime<Utc>>);
}

/// One parsed line of a raw job log: its time and its text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TimedLine {
    /// From the line's stamp, else the previous line's time.
    pub time: DateTime<Utc>,
    /// The line without its stamp or trailing `\r`.
    pub text: String,
}

/// Turns a raw log that arrives in pieces into [`TimedLine`]s: complete
/// lines as they arrive, the unterminated rest when the log is finished.
#[derive(Debug)]
pub struct LineSplitter<S> {
    partial: Vec<u8>,
    time: DateTime<Utc>,
    stamp: PhantomData<fn() -> S>,
}

impl<S> Clone for LineSplitter<S> {
    fn clone(&self) -> Self {
        Self {
            partial: self.partial.clone(),
            time: self.time,
            stamp: PhantomData,
        }
    }
}

impl<S: LineStamp> LineSplitter<S> {
    /// A splitter whose lines before the first stamped one get `start`.
    pub fn new(start: DateTime<Utc>) -> Self {
        Self {
            partial: Vec::new(),
            time: start,
            stamp: PhantomData,
        }
    }

    /// The complete lines `bytes` ends (with what earlier pushes left open).
    pub fn push(&mut self, bytes: &[u8]) -> Vec<TimedLine> {
        let mut lines = Vec::new();
        let mut rest = bytes;
        while let Some(at) = rest.iter().position(|b| *b == b'\n') {
            self.partial.extend_from_slice(&rest[..at]);
            let piece = std::mem::take(&mut self.partial);
            lines.push(self.line(&piece));
            rest = &rest[at + 1..];
        }
        self.partial.extend_from_slice(rest);
        lines
    }

    /// The unterminated last line, if any (call once the log is complete).
    pub fn finish(&mut self) -> Option<TimedLine> {
        if self.partial.is_empty() {
            return None;
        }
        let piece = std::mem::take(&mut self.partial);
        Some(self.line(&piece))
    }

    /// Bytes held back in an unterminated line.
    pub fn pending(&self) -> usize {
        self.partial.len()
    }

    fn line(&mut self, piece: &[u8]) -> TimedLine {
        let text = String::from_utf8_lossy(piece);
        let (text, stamp) = S::split(text.trim_end_matches('\r'));
        if let Some(t) = stamp {
            self.time = t;
        }
        TimedLine {
            time: self.time,
            text,
        }
    }
}

/// Splits a raw log read whole into timed lines. A last line without a
/// trailing newline is included only when `complete` (the job finished):
/// otherwise it may still grow. A trailing newline ends the last line, it
/// does not open an empty one.
pub fn parse<S: LineStamp>(raw: &str, start: DateTime<Utc>, complete: bool) -> Vec<TimedLine> {
    let mut splitter = LineSplitter::<S>::new(start);
    let mut lines = splitter.push(raw.as_bytes());
    if complete {
        lines.extend(splitter.finish());
    }
    lines
}

/// Data lines of a job's step. The vendors merge stdout and stderr into
/// one log, so every line is tagged `stdout`.
pub fn data_lines(step_id: i64, lines: &[TimedLine]) -> Vec<LogLine> {
    lines
        .iter()
        .map(|l| LogLine::data(step_id, OutputStream::Stdout, l.text.clone(), l.time))
        .collect()
}

/// The line that ends a build's log cut at `max_bytes` (`max_log_bytes`),
/// saying where the rest is (`provider`, e.g. "Buildkite").
pub fn truncation_line(
    step_id: i64,
    max_bytes: u64,
    provider: &str,
    now: DateTime<Utc>,
) -> LogLine {
    LogLine::data(
        step_id,
        OutputStream::Stderr,
        format!(
            "[stitch] log truncated: this build's log passed the {max_bytes}-byte limit \
             (max_log_bytes); the rest is on {provider}"
        ),
        now,
    )
}

/// Parses a vendor's timestamp: RFC 3339 as the REST APIs write it
/// (`2026-01-02T03:04:05.123Z`), or the `2018-03-25 03:58:14 UTC` form of
/// older webhook payloads (Buildkite's, GitLab's).
pub fn parse_vendor_time(s: &str) -> Option<DateTime<Utc>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Some(t.with_timezone(&Utc));
    }
    chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S UTC")
        .ok()
        .map(|n| n.and_utc())
}

/// How far one job's raw log was read (for a vendor whose log is fetched
/// by byte offset), and the line it left open.
#[derive(Debug)]
pub(crate) struct JobRead<S> {
    pub(crate) bytes_read: u64,
    pub(crate) splitter: LineSplitter<S>,
}

impl<S> Clone for JobRead<S> {
    fn clone(&self) -> Self {
        Self {
            bytes_read: self.bytes_read,
            splitter: self.splitter.clone(),
        }
    }
}

impl<S: LineStamp> JobRead<S> {
    pub(crate) fn new(start: DateTime<Utc>) -> Self {
        Self {
            bytes_read: 0,
            splitter: LineSplitter::new(start),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    /// `@<unix seconds> ` opens a stamped line.
    struct AtSeconds;

    impl LineStamp for AtSeconds {
        fn split(line: &str) -> (String, Option<DateTime<Utc>>) {
            let stamped = line.strip_prefix('@').and_then(|rest| {
                let (secs, text) = rest.split_once(' ')?;
                Some((text, DateTime::from_timestamp(secs.parse().ok()?, 0)?))
            });
            match stamped {
                Some((text, t)) => (text.to_string(), Some(t)),
                None => (line.to_string(), None),
            }
        }
    }

    fn t0() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap()
    }

    #[test]
    fn unstamped_lines_inherit_the_time_before_them() {
        let lines = parse::<AtSeconds>("first\r\n@100 second\nthird\n", t0(), true);
        let got: Vec<(&str, i64)> = lines
            .iter()
            .map(|l| (l.text.as_str(), l.time.timestamp()))
            .collect();
        assert_eq!(
            got,
            [("first", t0().timestamp()), ("second", 100), ("third", 100)]
        );
    }

    #[test]
    fn the_open_last_line_waits_for_the_end() {
        assert_eq!(parse::<AtSeconds>("one\ntw", t0(), false).len(), 1);
        let done = parse::<AtSeconds>("one\ntw", t0(), true);
        assert_eq!(done[1].text, "tw");
        assert!(parse::<AtSeconds>("", t0(), true).is_empty());
        let mut s = LineSplitter::<AtSeconds>::new(t0());
        assert!(s.push(b"ab").is_empty());
        assert_eq!(s.pending(), 2);
        assert_eq!(s.finish().map(|l| l.text).as_deref(), Some("ab"));
        assert_eq!(s.finish(), None);
    }

    #[test]
    fn data_lines_are_stdout_of_their_step() {
        let lines = data_lines(3, &parse::<AtSeconds>("@5 x\n", t0(), true));
        assert_eq!(
            lines,
            [LogLine::data(
                3,
                OutputStream::Stdout,
                "x".to_string(),
                DateTime::from_timestamp(5, 0).unwrap()
            )]
        );
    }

    #[test]
    fn both_vendor_time_forms_parse() {
        // Buildkite's REST form with millis, GitLab's webhook form.
        let rest = parse_vendor_time("2018-03-25T03:58:14.123Z").unwrap();
        let hook = parse_vendor_time("2018-03-25 03:58:14 UTC").unwrap();
        assert_eq!(rest.timestamp(), hook.timestamp());
        assert_eq!(
            parse_vendor_time("2016-08-12T15:23:28.000Z"),
            parse_vendor_time("2016-08-12 15:23:28 UTC")
        );
        assert!(parse_vendor_time("yesterday").is_none());
        assert!(
            parse_vendor_time("2016-08-12 15:23:28").is_none(),
            "no zone"
        );
    }
}
