//! GitHub job logs as stitch `LogLine`s. Each job is a step (control start
//! with its name, data lines, control end). A raw log line is
//! `<RFC 3339 UTC time, 7 fractional digits>Z <text>`; the first may start
//! with a byte-order mark. The time becomes the line's `time` and is cut
//! from its text; lines without one (continuations) inherit the previous
//! line's time.

use chrono::{DateTime, Utc};
use stitch_core::{LogLine, StepKind};

use super::model::Job;
pub use crate::timed_lines::TimedLine;
use crate::timed_lines::{self, LineStamp};

/// GitHub's stamps: a `<RFC 3339 UTC time>Z ` prefix, after a byte-order
/// mark on a log's first line.
#[derive(Clone, Copy, Debug)]
pub struct GithubStamp;

impl LineStamp for GithubStamp {
    fn split(line: &str) -> (String, Option<DateTime<Utc>>) {
        let line = line.strip_prefix('\u{feff}').unwrap_or(line);
        match split_stamp(line) {
            Some((t, text)) => (text.to_string(), Some(t)),
            None => (line.to_string(), None),
        }
    }
}

/// Splits a raw job log (read whole, once the job finished) into timed
/// lines. `start` is the time of lines before the first stamped one. A
/// trailing newline ends the log, it does not open an empty line.
pub fn parse_log(raw: &str, start: DateTime<Utc>) -> Vec<TimedLine> {
    let raw = raw.strip_prefix('\u{feff}').unwrap_or(raw);
    // A log of one bare newline has no lines (not one empty one).
    if raw == "\n" {
        return Vec::new();
    }
    timed_lines::parse::<GithubStamp>(raw, start, true)
}

/// `("2026-03-12T09:14:09.1183520Z", "text")` → the time and the text.
fn split_stamp(line: &str) -> Option<(DateTime<Utc>, &str)> {
    let (stamp, text) = match line.split_once(' ') {
        Some(pair) => pair,
        None => (line, ""),
    };
    // Cheap shape check before parsing: `YYYY-MM-DDTHH:MM:SS…Z`.
    let b = stamp.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[10] != b'T' || !stamp.ends_with('Z') {
        return None;
    }
    let t = DateTime::parse_from_rfc3339(stamp)
        .ok()?
        .with_timezone(&Utc);
    Some((t, text))
}

/// Parses an RFC 3339 time of the REST API.
pub fn parse_time(s: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// The control line opening `job`'s step.
pub(crate) fn step_start(step_id: i64, job: &Job, fallback: DateTime<Utc>) -> LogLine {
    let time = job
        .started_at
        .as_deref()
        .and_then(parse_time)
        .unwrap_or(fallback);
    let steps: Vec<&str> = job.steps.iter().map(|s| s.name.as_str()).collect();
    let command = (!steps.is_empty()).then(|| steps.join(" → "));
    LogLine::step_start(step_id, job.name.clone(), StepKind::User, command, time)
}

/// The control line closing `job`'s step.
pub(crate) fn step_end(step_id: i64, job: &Job, fallback: DateTime<Utc>) -> LogLine {
    let time = job
        .completed_at
        .as_deref()
        .and_then(parse_time)
        .unwrap_or(fallback);
    LogLine::step_end(step_id, job.name.clone(), StepKind::User, time)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn t0() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap()
    }

    #[test]
    fn the_captured_log_parses() {
        let raw = include_str!("../../../stitch-fake-providers/tests/data/github/job_log.txt");
        assert!(raw.starts_with('\u{feff}'));
        let lines = parse_log(raw, t0());
        assert_eq!(lines[0].text, "Current runner version: '2.321.0'");
        assert_eq!(
            lines[0].time,
            parse_time("2026-03-12T09:14:09.1183520Z").unwrap()
        );
        assert_eq!(lines[1].text, "##[group]Operating System");
        assert!(lines.iter().any(|l| l.text == "cargo build --workspace"));
        assert!(lines.iter().all(|l| !l.text.starts_with("2026-")));
        assert!(lines.iter().all(|l| !l.text.contains('\u{feff}')));
        assert_eq!(lines.last().unwrap().text, "Cleaning up orphan processes");
    }

    #[test]
    fn continuations_inherit_the_time_and_crlf_is_trimmed() {
        let raw = "2026-03-12T09:14:09.1183520Z first\r\nsecond line\n2026-03-12T09:14:10Z \n";
        let lines = parse_log(raw, t0());
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0].text, "first");
        assert_eq!(lines[1].text, "second line");
        assert_eq!(lines[1].time, lines[0].time);
        assert_eq!(lines[2].text, "");
        assert_eq!(lines[2].time.timestamp(), lines[0].time.timestamp() + 1);
        let lines = parse_log("no stamp at all", t0());
        assert_eq!(lines[0].time, t0());
        assert!(parse_log("", t0()).is_empty());
        assert!(parse_log("\u{feff}", t0()).is_empty());
        assert!(parse_log("\u{feff}\n", t0()).is_empty());
        assert_eq!(parse_log("\n\n", t0()).len(), 2);
        // Things that look a little like times stay text.
        let lines = parse_log("2026-03-12 not a stamp", t0());
        assert_eq!(lines[0].text, "2026-03-12 not a stamp");
    }
}
