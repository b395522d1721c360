//! `[queues.NAME.fake]`, checked by the fake runner's own rules.

use std::time::Duration;

use stitch_runners::fake::FakeSection;
use stitch_runners::{FakeConfig, FakeConfigError};

use super::super::problems::{with, Problems, Seg};

/// Each reported field is reset and the rest checked again, so that every
/// bad field is reported.
pub(super) fn validate(key: &[Seg], fake: &FakeSection, problems: &mut Problems) {
    let mut check = FakeConfig {
        accept_delay: fake.accept_delay,
        run_duration: fake.run_duration,
        slow_factor: fake.slow_factor,
        cancel_dir: None,
    };
    for _ in 0..3 {
        let field = match check.validate() {
            Ok(()) => return,
            Err(e @ FakeConfigError::ZeroSlowFactor) => {
                check.slow_factor = 1;
                problems.report(with(key, &["slow_factor"]), e.to_string());
                continue;
            }
            Err(e @ FakeConfigError::TimingTooLong { field, .. }) => {
                problems.report(with(key, &[field]), e.to_string());
                field
            }
            Err(e) => {
                problems.report(key.to_vec(), e.to_string());
                return;
            }
        };
        match field {
            "accept_delay" => check.accept_delay = Duration::ZERO,
            _ => check.run_duration = Duration::ZERO,
        }
    }
}
