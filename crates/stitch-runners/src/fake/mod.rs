//! `fake`: a simulated CI for the zero-config default and for tests.
//!
//! A build is accepted for `accept_delay`, runs three steps (`checkout`,
//! `build`, `test`) for `run_duration`, then succeeds — unless a marker
//! `stitch-fake=<token>` in a head change URI says otherwise (see
//! [`FakeMarker`]). Log lines are synthesised from the same timeline.
//!
//! **Stateless across instances.** The ref records the outcome and timings,
//! and the build's clock starts when its id was minted
//! ([`BuildId::created_at`]), so `status`, `logs` and a repeated `trigger`
//! (same id → same ref) give the same answer on every instance. Only
//! cancellation is state: it is remembered in-process, and in
//! `FakeConfig::cancel_dir` when set so that every instance sharing that
//! directory sees it. Without a `cancel_dir`, a cancel is only visible to
//! the instance that received it.
//!
//! Because the outcome lives in the ref, a handle without a ref is
//! `NotFound`; triggering again is always safe.

mod cancels;
pub mod marker;
mod section;
mod timeline;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use futures::StreamExt;
use stitch_core::{
    async_trait, BuildHandle, BuildId, BuildRunner, LogStream, RunnerError, RunnerRef,
    StatusReport, TriggerRequest,
};

use cancels::CancelStore;
pub use marker::{FakeMarker, UnknownMarker, MARKER_PREFIX};
pub use section::FakeSection;
use timeline::{FakeOutcome, Timeline};

/// The ref id prefix; the rest is the build id.
const REF_PREFIX: &str = "fake-";
/// Longest accepted timing, so millisecond arithmetic cannot overflow.
const MAX_TIMING: Duration = Duration::from_secs(30 * 24 * 3600);
/// How often a log follower re-checks for a cancel while waiting for the
/// next line to be due.
const FOLLOW_TICK: Duration = Duration::from_millis(200);

/// Timings of the simulated CI.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FakeConfig {
    /// How long a build stays `accepted` before it runs. Default 1 s.
    pub accept_delay: Duration,
    /// How long a build runs. Default 5 s.
    pub run_duration: Duration,
    /// Run-time multiplier for builds marked `stitch-fake=slow`. Default 6.
    pub slow_factor: u32,
    /// Directory where cancellations are recorded so that every instance
    /// sharing it sees them. Default none (in-process only).
    pub cancel_dir: Option<PathBuf>,
}

impl Default for FakeConfig {
    fn default() -> Self {
        Self {
            accept_delay: Duration::from_secs(1),
            run_duration: Duration::from_secs(5),
            slow_factor: 6,
            cancel_dir: None,
        }
    }
}

/// Why a [`FakeConfig`] cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum FakeConfigError {
    /// `slow_factor` is 0.
    #[error("fake.slow_factor must be at least 1")]
    ZeroSlowFactor,
    /// A timing is beyond what the simulation supports.
    #[error("fake.{field} is {value:?}; at most 30 days is supported (slow builds included)")]
    TimingTooLong {
        /// The config field.
        field: &'static str,
        /// Its value.
        value: Duration,
    },
    /// The cancel directory could not be created.
    #[error("cannot create fake.cancel_dir {path}: {source}")]
    CancelDir {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

impl FakeConfig {
    /// Check the settings without touching the file system.
    pub fn validate(&self) -> Result<(), FakeConfigError> {
        if self.slow_factor == 0 {
            return Err(FakeConfigError::ZeroSlowFactor);
        }
        if self.accept_delay > MAX_TIMING {
            return Err(FakeConfigError::TimingTooLong {
                field: "accept_delay",
                value: self.accept_delay,
            });
        }
        let slow_run = self.run_duration.saturating_mul(self.slow_factor);
        if slow_run > MAX_TIMING {
            return Err(FakeConfigError::TimingTooLong {
                field: "run_duration",
                value: slow_run,
            });
        }
        Ok(())
    }
}

/// The simulated CI runner. See the module docs.
pub struct FakeRunner {
    config: FakeConfig,
    cancels: Arc<CancelStore>,
}

impl std::fmt::Debug for FakeRunner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeRunner")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl FakeRunner {
    /// A fake runner; creates `cancel_dir` if set.
    pub fn new(config: FakeConfig) -> Result<Self, FakeConfigError> {
        config.validate()?;
        if let Some(dir) = &config.cancel_dir {
            std::fs::create_dir_all(dir).map_err(|source| FakeConfigError::CancelDir {
                path: dir.clone(),
                source,
            })?;
        }
        Ok(Self {
            cancels: Arc::new(CancelStore::new(config.cancel_dir.clone())),
            config,
        })
    }

    /// The configuration in use.
    pub fn config(&self) -> &FakeConfig {
        &self.config
    }

    fn timeline(handle: &BuildHandle) -> Result<Timeline, RunnerError> {
        let Some(r) = &handle.runner_ref else {
            return Err(RunnerError::NotFound(format!(
                "the fake runner finds builds only by their ref (it keeps no state) and build {} \
                 has none; triggering it again is safe",
                handle.build_id
            )));
        };
        let malformed = |why: &str| {
            RunnerError::NotFound(format!(
                "{:?} is not a fake runner ref for build {}: {why}",
                r.id, handle.build_id
            ))
        };
        let id: BuildId =
            r.id.strip_prefix(REF_PREFIX)
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| malformed("id is not fake-<build id>"))?;
        if id != handle.build_id {
            return Err(malformed("it names another build"));
        }
        let outcome = r
            .data("outcome")
            .and_then(FakeOutcome::parse)
            .ok_or_else(|| malformed("missing or unknown outcome"))?;
        let ms = |key: &str| {
            r.data(key)
                .and_then(|v| v.parse::<i64>().ok())
                .filter(|v| (0..=MAX_TIMING.as_millis() as i64).contains(v))
                .ok_or_else(|| malformed(&format!("missing or invalid {key}")))
        };
        Ok(Timeline::new(id, outcome, ms("accept_ms")?, ms("run_ms")?))
    }

    fn provider_unavailable(tl: &Timeline) -> Result<(), RunnerError> {
        if tl.outcome == FakeOutcome::StatusError {
            return Err(RunnerError::http(
                503,
                "fake provider unavailable for this build (stitch-fake=status-error)",
            ));
        }
        Ok(())
    }

    fn cancel_at(&self, tl: &Timeline) -> Result<Option<i64>, RunnerError> {
        Ok(self.cancels.get(&tl.build_id)?.map(|t| tl.rel(t)))
    }
}

fn millis(d: Duration) -> u128 {
    d.as_millis()
}

#[async_trait]
impl BuildRunner for FakeRunner {
    fn name(&self) -> &'static str {
        "fake"
    }

    async fn trigger(&self, req: &TriggerRequest) -> Result<RunnerRef, RunnerError> {
        req.validate()
            .map_err(|e| RunnerError::InvalidRequest(e.to_string()))?;
        let markers = marker::parse_markers(&req.changes.head)
            .map_err(|e| RunnerError::InvalidRequest(e.to_string()))?;
        let has = |m: FakeMarker| markers.contains(&m);
        if has(FakeMarker::TriggerReject) {
            return Err(RunnerError::InvalidRequest(
                "fake provider rejected the build (stitch-fake=trigger-reject)".into(),
            ));
        }
        if has(FakeMarker::TriggerError) {
            return Err(RunnerError::http(
                503,
                "fake provider unavailable (stitch-fake=trigger-error)",
            ));
        }
        // One outcome per build; the most disruptive marker wins.
        let outcome = if has(FakeMarker::StatusError) {
            FakeOutcome::StatusError
        } else if has(FakeMarker::Hang) {
            FakeOutcome::Hang
        } else if has(FakeMarker::Unknown) {
            FakeOutcome::Unknown
        } else if has(FakeMarker::Fail) {
            FakeOutcome::Fail
        } else {
            FakeOutcome::Succeed
        };
        let run = if has(FakeMarker::Slow) {
            self.config
                .run_duration
                .saturating_mul(self.config.slow_factor)
        } else {
            self.config.run_duration
        };
        Ok(RunnerRef::new(format!("{REF_PREFIX}{}", req.build_id))
            .with_data("outcome", outcome.as_str())
            .with_data("accept_ms", millis(self.config.accept_delay).to_string())
            .with_data("run_ms", millis(run).to_string()))
    }

    async fn status(&self, handle: &BuildHandle) -> Result<StatusReport, RunnerError> {
        let tl = Self::timeline(handle)?;
        Self::provider_unavailable(&tl)?;
        let cancel_at = self.cancel_at(&tl)?;
        let (status, metadata) = tl.status_at(tl.rel(Utc::now()), cancel_at);
        Ok(StatusReport::new(status).with_metadata(metadata))
    }

    async fn cancel(&self, handle: &BuildHandle) -> Result<(), RunnerError> {
        let tl = Self::timeline(handle)?;
        Self::provider_unavailable(&tl)?;
        let now = Utc::now();
        let (status, _) = tl.status_at(tl.rel(now), self.cancel_at(&tl)?);
        if status.is_terminal() {
            return Ok(()); // finished (or already cancelled): nothing to do
        }
        self.cancels.record(&tl.build_id, now)?;
        Ok(())
    }

    async fn logs(&self, handle: &BuildHandle) -> Result<LogStream, RunnerError> {
        let tl = Self::timeline(handle)?;
        Self::provider_unavailable(&tl)?;
        let follower = Follower {
            tl,
            cancels: Arc::clone(&self.cancels),
            next: 0,
            failed: false,
        };
        Ok(futures::stream::unfold(follower, Follower::next_line).boxed())
    }
}

/// Live reader of a fake build's log: emits each line once it is due.
struct Follower {
    tl: Timeline,
    cancels: Arc<CancelStore>,
    next: usize,
    failed: bool,
}

impl Follower {
    async fn next_line(mut self) -> Option<(Result<stitch_core::LogLine, RunnerError>, Self)> {
        if self.failed {
            return None;
        }
        loop {
            let cancel_at = match self.cancels.get(&self.tl.build_id) {
                Ok(c) => c.map(|t| self.tl.rel(t)),
                Err(e) => {
                    self.failed = true;
                    return Some((Err(e), self));
                }
            };
            let line = self.tl.line(self.next, cancel_at)?;
            let wait = line.time - Utc::now();
            match wait.to_std() {
                // Negative (already due) fails to convert: emit now.
                Err(_) => {
                    self.next += 1;
                    return Some((Ok(line), self));
                }
                Ok(wait) if wait.is_zero() => {
                    self.next += 1;
                    return Some((Ok(line), self));
                }
                // Wake at least every tick so a cancel cuts the wait short.
                Ok(wait) => tokio::time::sleep(wait.min(FOLLOW_TICK)).await,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use stitch_core::{BuildStatus, ChangeSet};

    fn req(head: &str) -> TriggerRequest {
        TriggerRequest::new(BuildId::new(), "default", ChangeSet::head_only([head]))
    }

    #[tokio::test]
    async fn markers_choose_trigger_errors() {
        let fake = FakeRunner::new(FakeConfig::default()).unwrap();
        let err = fake
            .trigger(&req("c?stitch-fake=trigger-error"))
            .await
            .unwrap_err();
        assert!(err.is_retryable(), "{err}");
        let err = fake
            .trigger(&req("c?stitch-fake=trigger-reject"))
            .await
            .unwrap_err();
        assert!(matches!(err, RunnerError::InvalidRequest(_)), "{err}");
        let err = fake.trigger(&req("c?stitch-fake=boom")).await.unwrap_err();
        assert!(err.to_string().contains("valid markers"), "{err}");
    }

    #[tokio::test]
    async fn status_error_marker_fails_status_retryably() {
        let fake = FakeRunner::new(FakeConfig::default()).unwrap();
        let r = req("c#stitch-fake=status-error");
        let handle = r.handle().with_ref(fake.trigger(&r).await.unwrap());
        let err = fake.status(&handle).await.unwrap_err();
        assert!(
            matches!(err, RunnerError::Http { status: 503, .. }),
            "{err}"
        );
        assert!(err.is_retryable());
    }

    #[tokio::test]
    async fn slow_multiplies_the_run() {
        let fake = FakeRunner::new(FakeConfig::default()).unwrap();
        let r = fake
            .trigger(&req("c?stitch-fake=slow&stitch-fake=fail"))
            .await
            .unwrap();
        assert_eq!(r.data("run_ms"), Some("30000"));
        assert_eq!(r.data("outcome"), Some("fail"));
    }

    #[tokio::test]
    async fn refs_that_do_not_parse_are_not_found() {
        let fake = FakeRunner::new(FakeConfig::default()).unwrap();
        let r = req("c");
        let good = fake.trigger(&r).await.unwrap();
        let cases = [
            RunnerRef::new("nonsense"),
            RunnerRef::new(good.id.clone()),
            RunnerRef {
                data: [("outcome".to_string(), "explode".to_string())].into(),
                ..good.clone()
            },
            RunnerRef::new(format!("fake-{}", BuildId::new())),
        ];
        for bad in cases {
            let err = fake
                .status(&r.handle().with_ref(bad.clone()))
                .await
                .unwrap_err();
            assert!(err.is_not_found(), "{bad:?}: {err}");
        }
    }

    #[tokio::test]
    async fn cancel_is_shared_through_cancel_dir() {
        let dir = tempfile::tempdir().unwrap();
        let config = FakeConfig {
            accept_delay: Duration::ZERO,
            cancel_dir: Some(dir.path().join("cancels")),
            ..FakeConfig::default()
        };
        let a = FakeRunner::new(config.clone()).unwrap();
        let b = FakeRunner::new(config).unwrap();
        let r = req("c?stitch-fake=hang");
        let handle = r.handle().with_ref(a.trigger(&r).await.unwrap());
        a.cancel(&handle).await.unwrap();
        assert_eq!(
            b.status(&handle).await.unwrap().status,
            BuildStatus::Cancelled
        );
    }

    #[test]
    fn config_is_checked() {
        let bad = FakeConfig {
            slow_factor: 0,
            ..FakeConfig::default()
        };
        assert!(matches!(
            FakeRunner::new(bad),
            Err(FakeConfigError::ZeroSlowFactor)
        ));
        let bad = FakeConfig {
            run_duration: Duration::from_secs(10 * 24 * 3600),
            ..FakeConfig::default()
        };
        assert!(FakeRunner::new(bad)
            .unwrap_err()
            .to_string()
            .contains("30 days"));
    }
}
