//! The hourly counts of finished builds, read in the database for every
//! backend over [`Ops`]: one grouped count, then one indexed read per hour
//! for its median run time. [`crate::HourlyHistory`] keeps them between
//! answers.

use std::collections::BTreeMap;

use crate::error::Result;
use crate::model::{FinishedCount, FinishedHour};
use crate::ops::Ops;
use crate::rows::{time, HOUR_MS};

/// The hours of builds finished in `[since_ms, until_ms)`, oldest first;
/// hours without builds are absent. An hour cut by a bound counts only
/// the part inside it.
///
/// The statements are separate reads, not one snapshot: a build finishing
/// between them can move the current hour's median by one place, which an
/// answer a moment later would show anyway.
pub(crate) async fn finished_hours<O: Ops>(
    ops: &mut O,
    since_ms: i64,
    until_ms: i64,
) -> Result<Vec<FinishedHour>> {
    let mut hours: BTreeMap<i64, (Vec<FinishedCount>, u64)> = BTreeMap::new();
    for row in ops.finished_counts(since_ms, until_ms).await? {
        let (counts, started) = hours.entry(row.hour_ms).or_default();
        counts.push(row.count);
        *started += row.started;
    }
    let mut out = Vec::with_capacity(hours.len());
    for (hour_ms, (mut counts, started)) in hours {
        let median_duration_ms = match started {
            0 => None,
            n => {
                let from = hour_ms.max(since_ms);
                let to = hour_ms.saturating_add(HOUR_MS).min(until_ms);
                // The lower middle one of an even count; a run time below
                // 0 (clocks of two writers apart) counts as 0.
                ops.nth_run_time(from, to, (n - 1) / 2)
                    .await?
                    .map(|ms| u64::try_from(ms).unwrap_or(0))
            }
        };
        counts.sort_by(|a, b| (&a.queue, a.status.as_str()).cmp(&(&b.queue, b.status.as_str())));
        out.push(FinishedHour {
            start: time(hour_ms, || format!("finished hour {hour_ms}"))?,
            counts,
            median_duration_ms,
        });
    }
    Ok(out)
}
