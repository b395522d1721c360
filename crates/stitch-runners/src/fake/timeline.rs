//! The simulated life of one fake build, computed from its ref alone:
//! accepted for `accept_ms`, then running through three steps for `run_ms`,
//! then terminal. Every answer (status, log lines) is a pure function of
//! the ref, the clock and the cancel time, so any instance gives the same one.

use chrono::{DateTime, Duration as TimeDelta, Utc};
use stitch_core::metadata::keys;
use stitch_core::{BuildId, BuildMetadata, BuildStatus, LogLine, OutputStream, StepKind};

/// What the fake does with a build after it was accepted; stored in the ref.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FakeOutcome {
    Succeed,
    Fail,
    StatusError,
    Hang,
    Unknown,
}

impl FakeOutcome {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            FakeOutcome::Succeed => "succeed",
            FakeOutcome::Fail => "fail",
            FakeOutcome::StatusError => "status-error",
            FakeOutcome::Hang => "hang",
            FakeOutcome::Unknown => "unknown",
        }
    }

    pub(crate) fn parse(s: &str) -> Option<Self> {
        [
            FakeOutcome::Succeed,
            FakeOutcome::Fail,
            FakeOutcome::StatusError,
            FakeOutcome::Hang,
            FakeOutcome::Unknown,
        ]
        .into_iter()
        .find(|o| o.as_str() == s)
    }

    /// Builds that never finish on their own.
    fn is_endless(self) -> bool {
        matches!(self, FakeOutcome::Hang | FakeOutcome::Unknown)
    }
}

/// The provider state an `unknown` build reports, for the metadata.
pub(crate) const MYSTERY_STATE: &str = "mystery";

/// One step of the simulated pipeline; offsets are per mille of the run.
struct Step {
    id: i64,
    name: &'static str,
    kind: StepKind,
    command: Option<&'static str>,
    start: i64,
    end: i64,
    /// (per mille, stream, text) output lines of a normal run.
    lines: &'static [(i64, OutputStream, &'static str)],
}

const STEPS: [Step; 3] = [
    Step {
        id: 1,
        name: "checkout",
        kind: StepKind::System,
        command: None,
        start: 0,
        end: 150,
        lines: &[
            (20, OutputStream::Stdout, "Fetching the change set"),
            (100, OutputStream::Stdout, "Applied base and head changes"),
        ],
    },
    Step {
        id: 2,
        name: "build",
        kind: StepKind::User,
        command: Some("make build"),
        start: 150,
        end: 500,
        lines: &[
            (250, OutputStream::Stdout, "Compiling widgets v0.1.0"),
            (400, OutputStream::Stdout, "Compiling app v0.1.0"),
            (480, OutputStream::Stdout, "Finished release build"),
        ],
    },
    Step {
        id: 3,
        name: "test",
        kind: StepKind::User,
        command: Some("make test"),
        start: 500,
        end: 1000,
        lines: &[
            (550, OutputStream::Stdout, "running 3 tests"),
            (700, OutputStream::Stdout, "test widgets::basics ... ok"),
        ],
    },
];

const TEST_PASS: [(i64, OutputStream, &str); 2] = [
    (850, OutputStream::Stdout, "test app::smoke ... ok"),
    (
        950,
        OutputStream::Stdout,
        "test result: ok. 3 passed; 0 failed",
    ),
];
const TEST_FAIL: [(i64, OutputStream, &str); 2] = [
    (850, OutputStream::Stderr, "test app::smoke ... FAILED"),
    (
        950,
        OutputStream::Stderr,
        "test result: FAILED. 2 passed; 1 failed (stitch-fake=fail)",
    ),
];

/// A fake build's timeline. Times are milliseconds after the build id was
/// minted.
pub(crate) struct Timeline {
    pub(crate) build_id: BuildId,
    pub(crate) outcome: FakeOutcome,
    pub(crate) accept_ms: i64,
    pub(crate) run_ms: i64,
    /// Finite prefix of the log; endless builds continue with heartbeats.
    fixed: Vec<(i64, LineSpec)>,
}

#[derive(Clone, Copy)]
enum LineSpec {
    Start(usize),
    End(usize),
    Data(i64, OutputStream, &'static str),
}

impl Timeline {
    pub(crate) fn new(
        build_id: BuildId,
        outcome: FakeOutcome,
        accept_ms: i64,
        run_ms: i64,
    ) -> Self {
        let mut t = Self {
            build_id,
            outcome,
            accept_ms,
            run_ms,
            fixed: Vec::new(),
        };
        t.fixed = t.plan();
        t
    }

    fn at(&self, per_mille: i64) -> i64 {
        self.accept_ms + self.run_ms * per_mille / 1000
    }

    fn plan(&self) -> Vec<(i64, LineSpec)> {
        let mut out = Vec::new();
        for (i, step) in STEPS.iter().enumerate() {
            out.push((self.at(step.start), LineSpec::Start(i)));
            for &(pm, stream, text) in step.lines {
                out.push((self.at(pm), LineSpec::Data(step.id, stream, text)));
            }
            let last = i == STEPS.len() - 1;
            if last && self.outcome.is_endless() {
                // The test step never ends; heartbeats follow.
                break;
            }
            if last {
                let tail = if self.outcome == FakeOutcome::Fail {
                    &TEST_FAIL
                } else {
                    &TEST_PASS
                };
                for &(pm, stream, text) in tail {
                    out.push((self.at(pm), LineSpec::Data(step.id, stream, text)));
                }
            }
            out.push((self.at(step.end), LineSpec::End(i)));
        }
        out
    }

    fn heartbeat_ms(&self) -> i64 {
        (self.run_ms / 5).max(100)
    }

    fn test_start_ms(&self) -> i64 {
        self.at(STEPS[2].start)
    }

    /// When the build was minted (its clock's zero).
    fn origin(&self) -> DateTime<Utc> {
        self.build_id.created_at()
    }

    /// `t` as milliseconds on this build's clock.
    pub(crate) fn rel(&self, t: DateTime<Utc>) -> i64 {
        (t - self.origin()).num_milliseconds()
    }

    fn abs(&self, rel_ms: i64) -> DateTime<Utc> {
        self.origin() + TimeDelta::milliseconds(rel_ms)
    }

    /// The status at `now`, given the recorded cancel time (if any).
    pub(crate) fn status_at(
        &self,
        now: i64,
        cancel_at: Option<i64>,
    ) -> (BuildStatus, BuildMetadata) {
        let mut meta = BuildMetadata::new().with("fake_outcome", self.outcome.as_str());
        if cancel_at.is_some_and(|c| now >= c) {
            return (BuildStatus::Cancelled, meta);
        }
        if now < self.accept_ms {
            return (BuildStatus::Accepted, meta);
        }
        if self.outcome == FakeOutcome::Unknown {
            meta.insert("provider_state", MYSTERY_STATE);
            return (BuildStatus::Unknown, meta);
        }
        if self.outcome.is_endless() || now < self.accept_ms + self.run_ms {
            let step = STEPS
                .iter()
                .rev()
                .find(|s| now >= self.at(s.start))
                .map_or("checkout", |s| s.name);
            meta.insert("fake_step", step);
            return (BuildStatus::Running, meta);
        }
        if self.outcome == FakeOutcome::Fail {
            meta.insert(keys::EXIT_STATUS, "1");
            meta.insert(
                keys::ERROR,
                "step `test` failed: 1 test failed (stitch-fake=fail)",
            );
            return (BuildStatus::Failed, meta);
        }
        (BuildStatus::Succeeded, meta)
    }

    /// The `i`-th line of an uncancelled run, with its time.
    fn base_line(&self, i: usize) -> Option<(i64, LineSpec)> {
        if let Some(l) = self.fixed.get(i) {
            return Some(*l);
        }
        if !self.outcome.is_endless() {
            return None;
        }
        let k = i64::try_from(i - self.fixed.len()).ok()?;
        let at = self.test_start_ms() + (k + 1) * self.heartbeat_ms();
        Some((at, LineSpec::Data(STEPS[2].id, OutputStream::Stdout, "")))
    }

    /// How many lines of an uncancelled run come at or before `t`. Inclusive,
    /// because a follower may already have emitted a line stamped with the
    /// very millisecond the cancel was recorded in.
    fn lines_before(&self, t: i64) -> usize {
        let fixed = self.fixed.iter().take_while(|(at, _)| *at <= t).count();
        if fixed < self.fixed.len() || !self.outcome.is_endless() {
            return fixed;
        }
        // Heartbeat k is at test_start + (k+1)*hb; count those <= t.
        let since = t - self.test_start_ms();
        let beats = if since >= 0 {
            since / self.heartbeat_ms()
        } else {
            0
        };
        fixed + usize::try_from(beats).unwrap_or(usize::MAX - fixed)
    }

    /// The `i`-th log line, or `None` once the log is complete. Lines carry
    /// their own times; a caller streaming live waits until each is due.
    pub(crate) fn line(&self, i: usize, cancel_at: Option<i64>) -> Option<LogLine> {
        let Some(c) = cancel_at else {
            return self.base_line(i).map(|l| self.render(l));
        };
        if c <= self.accept_ms {
            return None; // cancelled before anything ran
        }
        let cut = self.lines_before(c);
        if i < cut {
            return self.base_line(i).map(|l| self.render(l));
        }
        // After the cut: a note and the end of the step that was running.
        let open = STEPS.iter().rposition(|s| self.at(s.start) <= c)?;
        match i - cut {
            0 => Some(self.render((
                c,
                LineSpec::Data(STEPS[open].id, OutputStream::Stderr, "build cancelled"),
            ))),
            1 => Some(self.render((c, LineSpec::End(open)))),
            _ => None,
        }
    }

    fn render(&self, (at, spec): (i64, LineSpec)) -> LogLine {
        let time = self.abs(at);
        match spec {
            LineSpec::Start(i) => {
                let s = &STEPS[i];
                LogLine::step_start(s.id, s.name, s.kind, s.command.map(str::to_string), time)
            }
            LineSpec::End(i) => {
                let s = &STEPS[i];
                LogLine::step_end(s.id, s.name, s.kind, time)
            }
            LineSpec::Data(step, stream, "") => {
                // Heartbeat of an endless build.
                let secs = (at - self.test_start_ms()) / 1000;
                let text = if self.outcome == FakeOutcome::Unknown {
                    format!("provider reports state {MYSTERY_STATE:?} after {secs}s (stitch-fake=unknown)")
                } else {
                    format!("test app::smoke has been running for {secs}s (stitch-fake=hang)")
                };
                LogLine::data(step, stream, text, time)
            }
            LineSpec::Data(step, stream, text) => LogLine::data(step, stream, text, time),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use stitch_core::{LogKind, StepStatus};

    fn tl(outcome: FakeOutcome) -> Timeline {
        Timeline::new(BuildId::new(), outcome, 1000, 5000)
    }

    fn all_lines(t: &Timeline, cancel: Option<i64>, max: usize) -> Vec<LogLine> {
        (0..max).map_while(|i| t.line(i, cancel)).collect()
    }

    #[test]
    fn phases_follow_the_clock() {
        let t = tl(FakeOutcome::Succeed);
        assert_eq!(t.status_at(0, None).0, BuildStatus::Accepted);
        assert_eq!(t.status_at(999, None).0, BuildStatus::Accepted);
        let (s, m) = t.status_at(1000, None);
        assert_eq!(
            (s, m.get("fake_step")),
            (BuildStatus::Running, Some("checkout"))
        );
        assert_eq!(t.status_at(4000, None).1.get("fake_step"), Some("test"));
        assert_eq!(t.status_at(6000, None).0, BuildStatus::Succeeded);
        let (s, m) = tl(FakeOutcome::Fail).status_at(6000, None);
        assert_eq!((s, m.get("exit_status")), (BuildStatus::Failed, Some("1")));
        assert_eq!(
            tl(FakeOutcome::Hang).status_at(1_000_000, None).0,
            BuildStatus::Running
        );
        let (s, m) = tl(FakeOutcome::Unknown).status_at(2000, None);
        assert_eq!(
            (s, m.get("provider_state")),
            (BuildStatus::Unknown, Some(MYSTERY_STATE))
        );
        assert_eq!(t.status_at(3000, Some(2500)).0, BuildStatus::Cancelled);
        assert_eq!(t.status_at(2000, Some(2500)).0, BuildStatus::Running);
    }

    #[test]
    fn finished_log_has_balanced_steps_in_time_order() {
        for outcome in [FakeOutcome::Succeed, FakeOutcome::Fail] {
            let t = tl(outcome);
            let lines = all_lines(&t, None, 100);
            assert_eq!(lines.len(), 3 * 2 + 2 + 3 + 4);
            assert!(lines.windows(2).all(|w| w[0].time <= w[1].time));
            let starts = lines
                .iter()
                .filter(|l| l.step_status == Some(StepStatus::Start))
                .count();
            let ends = lines
                .iter()
                .filter(|l| l.step_status == Some(StepStatus::End))
                .count();
            assert_eq!((starts, ends), (3, 3));
            assert_eq!(t.rel(lines.last().unwrap().time), 6000);
        }
        let failing = all_lines(&tl(FakeOutcome::Fail), None, 100);
        assert!(failing
            .iter()
            .any(|l| l.stream == Some(OutputStream::Stderr) && l.content.contains("FAILED")));
    }

    #[test]
    fn endless_logs_heartbeat() {
        let t = tl(FakeOutcome::Hang);
        let lines = all_lines(&t, None, 50);
        assert_eq!(lines.len(), 50);
        assert!(lines.windows(2).all(|w| w[0].time <= w[1].time));
        assert!(lines[49].content.contains("stitch-fake=hang"));
        assert!(lines
            .iter()
            .all(|l| l.step_status != Some(StepStatus::End) || l.step_id < 3));
    }

    #[test]
    fn cancel_cuts_the_log_and_closes_the_open_step() {
        let t = tl(FakeOutcome::Hang);
        let c = 20_000;
        let lines = all_lines(&t, Some(c), 1000);
        let n = lines.len();
        assert!(n > 10 && n < 1000);
        assert!(lines[..n - 2].iter().all(|l| t.rel(l.time) < c));
        assert_eq!(lines[n - 2].content, "build cancelled");
        assert_eq!(lines[n - 1].kind, LogKind::Control);
        assert_eq!(
            (lines[n - 1].step_id, lines[n - 1].step_status),
            (3, Some(StepStatus::End))
        );

        // Cancelled mid-build: step 2 is closed, step 3 never starts.
        let t = tl(FakeOutcome::Succeed);
        let lines = all_lines(&t, Some(2500), 100);
        assert_eq!(lines.last().unwrap().step_id, 2);
        assert!(lines.iter().all(|l| l.step_id <= 2));

        // Cancelled while accepted: no log at all.
        assert!(all_lines(&t, Some(500), 100).is_empty());
    }
}
