//! GitLab job traces as stitch `LogLine`s: each job is a step (control
//! start with its name, data lines, control end). Two stamps give a line
//! its time: the runner's timestamp prefix (`<RFC 3339> <stream><O|E>[+] `,
//! GitLab Runner 17 and later) and the `section_start:<unix>:<name>` /
//! `section_end:…` markers that fold the trace into sections (both are
//! removed from the text). Lines without either inherit the previous
//! line's time.

use chrono::{DateTime, Utc};
use stitch_core::{LogLine, StepKind};

use super::model::Job;
pub use crate::timed_lines::TimedLine;
use crate::timed_lines::{self, parse_vendor_time, LineStamp};

/// GitLab's stamps (see the module docs).
#[derive(Clone, Copy, Debug)]
pub struct GitlabStamp;

impl LineStamp for GitlabStamp {
    fn split(line: &str) -> (String, Option<DateTime<Utc>>) {
        let (rest, prefixed) = strip_prefix_time(line);
        let (text, section) = strip_sections(rest);
        (text, prefixed.or(section))
    }
}

/// Turns a trace that arrives in pieces into [`TimedLine`]s.
pub type LineSplitter = timed_lines::LineSplitter<GitlabStamp>;

/// Splits a trace into lines and reads their times; a last line without a
/// newline is included only when `complete`.
pub fn parse_trace(raw: &str, start: DateTime<Utc>, complete: bool) -> Vec<TimedLine> {
    timed_lines::parse::<GitlabStamp>(raw, start, complete)
}

/// `2024-06-12T10:00:00.123456Z 00O+ text` → (`text`, the time). The
/// stream id is two hex digits, `O`/`E` says stdout/stderr and `+` marks a
/// continued line.
fn strip_prefix_time(line: &str) -> (&str, Option<DateTime<Utc>>) {
    let Some((stamp, rest)) = line.split_once(' ') else {
        return (line, None);
    };
    let Ok(time) = DateTime::parse_from_rfc3339(stamp) else {
        return (line, None);
    };
    let tag_len = rest.find(' ').unwrap_or(rest.len());
    let tag = &rest[..tag_len];
    let bytes = tag.as_bytes();
    let well_formed = (3..=4).contains(&bytes.len())
        && bytes[..2].iter().all(u8::is_ascii_hexdigit)
        && matches!(bytes[2], b'O' | b'E')
        && (bytes.len() == 3 || bytes[3] == b'+');
    if !well_formed {
        return (line, None);
    }
    let text = rest.get(tag_len + 1..).unwrap_or("");
    (text, Some(time.with_timezone(&Utc)))
}

/// Removes `ESC[0K section_(start|end):<unix>:<name>[opts] \r ESC[0K`
/// markers; the first one's time is returned.
fn strip_sections(line: &str) -> (String, Option<DateTime<Utc>>) {
    const CLEAR: &str = "\u{1b}[0K";
    let mut out = String::with_capacity(line.len());
    let mut first = None;
    let mut rest = line;
    loop {
        let found = ["section_start:", "section_end:"]
            .iter()
            .filter_map(|m| rest.find(m).map(|at| (at, m.len())))
            .min();
        let Some((at, marker_len)) = found else { break };
        let mut before = &rest[..at];
        if let Some(stripped) = before.strip_suffix(CLEAR) {
            before = stripped;
        }
        out.push_str(before);
        let after = &rest[at + marker_len..];
        let digits = after.bytes().take_while(u8::is_ascii_digit).count();
        if first.is_none() {
            first = after[..digits]
                .parse::<i64>()
                .ok()
                .and_then(|s| DateTime::from_timestamp(s, 0));
        }
        // The marker runs to its `\r`; the clear after it belongs to it.
        let end = after.find('\r').map(|i| i + 1).unwrap_or(after.len());
        let mut tail = &after[end..];
        if let Some(t) = tail.strip_prefix(CLEAR) {
            tail = t;
        }
        rest = tail;
    }
    out.push_str(rest);
    (out, first)
}

/// How far one job's trace was read, and the line it left open.
pub(crate) type JobRead = timed_lines::JobRead<GitlabStamp>;

/// The control line opening `job`'s step (its stage as the command).
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
        job.stage.as_ref().map(|s| format!("stage {s}")),
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
    fn section_markers_become_times_and_vanish() {
        let raw = "\u{1b}[0Ksection_start:1767225600:prepare_executor[collapsed=true]\r\u{1b}[0K\u{1b}[0;1mPreparing the \"docker\" executor\u{1b}[0;m\n\
                   Using docker image ruby:3.3\n\
                   \u{1b}[0Ksection_end:1767225605:prepare_executor\r\u{1b}[0K\n\
                   $ make test\n";
        let lines = parse_trace(raw, t0(), false);
        assert_eq!(lines.len(), 4);
        assert_eq!(
            lines[0].text,
            "\u{1b}[0;1mPreparing the \"docker\" executor\u{1b}[0;m"
        );
        assert_eq!(lines[0].time.timestamp(), 1_767_225_600);
        assert_eq!(lines[1].time, lines[0].time, "inherits");
        assert_eq!(lines[2].text, "");
        assert_eq!(lines[2].time.timestamp(), 1_767_225_605);
        assert_eq!(lines[3].text, "$ make test");
    }

    #[test]
    fn runner_timestamp_prefixes_are_read() {
        let raw = "2026-01-01T00:00:03.250000Z 00O $ make test\n\
                   2026-01-01T00:00:04.000000Z 01E+ warning: slow\n\
                   2026-01-01 not a stamp\n";
        let lines = parse_trace(raw, t0(), true);
        assert_eq!(lines[0].text, "$ make test");
        assert_eq!(
            lines[0].time.timestamp_millis(),
            t0().timestamp_millis() + 3250
        );
        assert_eq!(lines[1].text, "warning: slow");
        assert_eq!(lines[1].time.timestamp(), t0().timestamp() + 4);
        assert_eq!(lines[2].text, "2026-01-01 not a stamp");
        assert_eq!(lines[2].time, lines[1].time);
        let (text, t) = GitlabStamp::split("2026-01-01T00:00:00Z 0xO text");
        assert_eq!((text.as_str(), t), ("2026-01-01T00:00:00Z 0xO text", None));
    }

    #[test]
    fn pieces_cut_anywhere_give_the_lines_of_the_whole() {
        let raw =
            "\u{1b}[0Ksection_start:1767225600:s\r\u{1b}[0Kh\u{e9}llo \u{2603}\r\nsecond\nthird";
        let whole = parse_trace(raw, t0(), true);
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
}
