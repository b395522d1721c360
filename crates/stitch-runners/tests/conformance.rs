//! The conformance suite, run against every runner.

use std::sync::Arc;
use std::time::Duration;

use stitch_core::{BuildId, BuildRunner, ChangeSet, TriggerRequest};
use stitch_runners::conformance::{self, Checked, Scenario, Subject};
use stitch_runners::{FakeConfig, FakeRunner, LocalConfig, LocalRunner, NoopRunner};

fn request(head: &str) -> TriggerRequest {
    TriggerRequest::new(
        BuildId::new(),
        "conformance",
        ChangeSet::new(vec!["https://git.example/base/1".into()], vec![head.into()]),
    )
}

fn noop() -> Subject {
    Subject::new(
        || Arc::new(NoopRunner::new()) as Arc<dyn BuildRunner>,
        |scenario| match scenario {
            Scenario::Succeed => Some(request("https://git.example/c/1")),
            // A noop build is born succeeded: it cannot fail, run or be unknown.
            _ => None,
        },
    )
}

fn fake() -> Subject {
    Subject::new(
        || {
            let config = FakeConfig {
                accept_delay: Duration::from_millis(100),
                run_duration: Duration::from_millis(500),
                ..FakeConfig::default()
            };
            Arc::new(FakeRunner::new(config).unwrap()) as Arc<dyn BuildRunner>
        },
        |scenario| {
            let marker = match scenario {
                Scenario::Succeed => "",
                Scenario::Fail => "?stitch-fake=fail",
                Scenario::RunLong => "?stitch-fake=hang",
                Scenario::UnknownState => "?stitch-fake=unknown",
            };
            Some(request(&format!("https://git.example/c/1{marker}")))
        },
    )
}

/// The local command reads its scenario from the head URIs.
const LOCAL_COMMAND: &str = r#"
echo "building $STITCH_BUILD_ID"
case "$STITCH_HEAD" in
  *fail*) echo "tests failed" >&2; exit 3 ;;
  *long*) exec sleep 1000 ;;
esac
echo done
"#;

fn local() -> Subject {
    let root = Arc::new(tempfile::tempdir().unwrap());
    Subject::new(
        move || {
            // A fresh state directory per runner, so checks start from nothing.
            let state_dir = root.path().join(BuildId::new().as_str());
            let config = LocalConfig {
                concurrency: 4,
                cancel_grace: Duration::from_secs(2),
                ..LocalConfig::new(LOCAL_COMMAND, state_dir)
            };
            Arc::new(LocalRunner::new(config).unwrap()) as Arc<dyn BuildRunner>
        },
        |scenario| match scenario {
            Scenario::Succeed => Some(request("https://git.example/c/ok")),
            Scenario::Fail => Some(request("https://git.example/c/fail")),
            Scenario::RunLong => Some(request("https://git.example/c/long")),
            // A process has no provider states stitch could fail to know.
            Scenario::UnknownState => None,
        },
    )
    .with_deadline(Duration::from_secs(20))
}

macro_rules! conformance_tests {
    ($runner:ident: $($check:ident => $expect:expr),* $(,)?) => {
        mod $runner {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $check() {
                    let outcome = conformance::$check(&super::$runner()).await.unwrap();
                    assert_eq!(outcome, $expect);
                }
            )*
        }
    };
}

const PASSED: Checked = Checked::Passed;

conformance_tests!(noop:
    succeeding_build_succeeds => PASSED,
    failing_build_fails => Checked::Skipped(Scenario::Fail),
    cancel_running_build => Checked::Skipped(Scenario::RunLong),
    cancel_terminal_build_is_noop => PASSED,
    trigger_is_idempotent => PASSED,
    unknown_build_is_not_found => PASSED,
    unknown_state_is_unknown => Checked::Skipped(Scenario::UnknownState),
    finished_build_log_is_complete => Checked::NoLogs,
);

conformance_tests!(fake:
    succeeding_build_succeeds => PASSED,
    failing_build_fails => PASSED,
    cancel_running_build => PASSED,
    cancel_terminal_build_is_noop => PASSED,
    trigger_is_idempotent => PASSED,
    unknown_build_is_not_found => PASSED,
    unknown_state_is_unknown => PASSED,
    finished_build_log_is_complete => PASSED,
);

conformance_tests!(local:
    succeeding_build_succeeds => PASSED,
    failing_build_fails => PASSED,
    cancel_running_build => PASSED,
    cancel_terminal_build_is_noop => PASSED,
    trigger_is_idempotent => PASSED,
    unknown_build_is_not_found => PASSED,
    unknown_state_is_unknown => Checked::Skipped(Scenario::UnknownState),
    finished_build_log_is_complete => PASSED,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_all_covers_every_check() {
    let results = conformance::run_all(&fake()).await.unwrap();
    let names: Vec<_> = results.iter().map(|(n, _)| *n).collect();
    assert_eq!(names, conformance::CHECKS);
    assert!(results.iter().all(|(_, c)| *c == Checked::Passed));
}
