//! A Jenkins build's console as stitch `LogLine`s: one step per build (its
//! console), data lines split from the progressive text, and the hidden
//! console notes Jenkins embeds (`ESC[8mha:…ESC[0m`) removed. The console
//! carries no per-line times: a line without one gets the time stitch read
//! it.

use chrono::{DateTime, Utc};

use crate::timed_lines::{self, LineStamp};

/// What opens a console note: a concealed (`ESC[8m`) `ha:` payload.
const NOTE_START: &str = "\u{1b}[8mha:";
/// What closes it.
const NOTE_END: &str = "\u{1b}[0m";

/// Jenkins' console lines: no stamps; console notes are dropped.
#[derive(Clone, Copy, Debug)]
pub struct JenkinsConsole;

impl LineStamp for JenkinsConsole {
    fn split(line: &str) -> (String, Option<DateTime<Utc>>) {
        (strip_notes(line), None)
    }
}

/// Splits a console that arrives in pieces into lines.
pub type LineSplitter = timed_lines::LineSplitter<JenkinsConsole>;

/// The line without its console notes (an unterminated note is kept as
/// text: it is not one).
pub fn strip_notes(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut rest = line;
    while let Some(at) = rest.find(NOTE_START) {
        let after = &rest[at + NOTE_START.len()..];
        let Some(end) = after.find(NOTE_END) else {
            break;
        };
        out.push_str(&rest[..at]);
        rest = &after[end + NOTE_END.len()..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_notes_are_dropped() {
        let line = "\u{1b}[8mha:////4Pb+ABCD==\u{1b}[0m[Pipeline] sh";
        assert_eq!(strip_notes(line), "[Pipeline] sh");
        assert_eq!(
            strip_notes("a\u{1b}[8mha:x\u{1b}[0mb\u{1b}[8mha:y\u{1b}[0mc"),
            "abc"
        );
        assert_eq!(strip_notes("plain"), "plain");
        let open = "x\u{1b}[8mha:never closed";
        assert_eq!(strip_notes(open), open);
    }

    #[test]
    fn lines_carry_no_time_of_their_own() {
        let t0 = DateTime::from_timestamp(1_000, 0).unwrap();
        let lines = timed_lines::parse::<JenkinsConsole>("+ make test\nok\n", t0, true);
        assert_eq!(lines.len(), 2);
        assert!(lines.iter().all(|l| l.time == t0));
        assert_eq!(lines[0].text, "+ make test");
    }

    #[test]
    fn a_captured_console_reads_as_its_lines() {
        let raw = include_str!("../../../stitch-fake-providers/tests/data/jenkins/console.txt");
        let lines = timed_lines::parse::<JenkinsConsole>(raw, Utc::now(), true);
        assert_eq!(lines[1].text, "[Pipeline] Start of Pipeline");
        assert_eq!(
            lines.last().map(|l| l.text.as_str()),
            Some("Finished: UNSTABLE")
        );
        assert!(lines.iter().all(|l| !l.text.contains('\u{1b}')));
    }
}
