//! The overview's hourly history of finished builds, kept between answers
//! by [`HourlyHistory`]: hours that can no longer change are counted once
//! by the database (`hour_counts`), the hours that still can are counted
//! from the event log.

use std::collections::{BTreeMap, HashSet};

use chrono::{DateTime, TimeDelta, Utc};
use stitch_core::{BuildId, BuildStatus};

use crate::error::Result;
use crate::model::{FinishedBuild, FinishedCount, FinishedHour};
use crate::rows::{time, HOUR_MS};
use crate::store::Store;

/// Builds the unsettled hours may hold in memory (about 80 bytes each,
/// mostly the build id that makes counting idempotent): with more, those
/// hours are counted by the database on every answer instead, as before
/// [`HourlyHistory`] kept them.
const MAX_TRACKED: usize = 500_000;

/// Events read per query while catching up.
const EVENT_BATCH: u32 = 5_000;

/// An unsettled tally further behind the event log than this is counted
/// afresh rather than brought up to date event by event (an overview
/// nobody asked for in a long while): one read of the hours is then the
/// cheaper of the two.
const MAX_CATCH_UP: u64 = 100_000;

/// The overview's last day of finished builds hour by hour, kept between
/// answers so that an answer costs little however many builds finished.
///
/// The rule, in one place:
///
/// * An hour that ended more than [`HourlyHistory::SETTLED_AFTER`] ago is
///   **settled**: no build will finish in it any more. Its counts and
///   median are kept once known and never read again.
/// * The hours since (usually only the current one) are **unsettled**.
///   They are counted once, from the database (every build finished since
///   their start: id, queue, status, run time), and from then on from the
///   event log: each answer reads the events committed since the last
///   (database-wide seqs, so events of other stitch processes on the same
///   database too) with their builds, and counts each build that has
///   finished once, by id. The median is exact: the hours' run times are
///   kept, and the middle one is selected when they changed.
/// * When an unsettled hour settles, its tally moves to the settled ones
///   as it stands; the database is not read for it again.
/// * The unsettled hours are counted afresh from the database when the
///   events since the last answer are gone (events retention) or more
///   than [`MAX_CATCH_UP`]; and on every answer while they hold more than
///   [`MAX_TRACKED`] builds.
///
/// A build counts in the hour of its `finished_at`. One that finishes
/// with a time in an hour already settled (a writer's clock more than
/// `SETTLED_AFTER` behind) is not counted, as before. Builds deleted by
/// retention stay counted: a caller whose build retention is shorter than
/// the window plus `SETTLED_AFTER` must not keep counts
/// ([`HourlyHistory::forget`], and count with
/// [`crate::Store::finished_hours`]).
#[derive(Default)]
pub struct HourlyHistory {
    settled: Option<Settled>,
    unsettled: Option<Unsettled>,
    /// The start of unsettled hours found to hold more than
    /// [`MAX_TRACKED`] builds: not tallied again until they settle.
    too_many_from: Option<i64>,
}

/// The settled hours `[from, until)` (epoch milliseconds).
struct Settled {
    from: i64,
    until: i64,
    hours: Vec<FinishedHour>,
}

/// The builds finished at or after `from` (an hour's start, epoch
/// milliseconds), as of event `seq`: every build whose finishing event has
/// a seq up to `seq` is counted, and maybe some later ones.
struct Unsettled {
    from: i64,
    seq: u64,
    tracked: usize,
    hours: BTreeMap<i64, Tally>,
}

/// One unsettled hour.
#[derive(Default)]
struct Tally {
    /// The builds counted, so a build read twice (in the first count and
    /// from an event, or from several events) counts once.
    ids: HashSet<BuildId>,
    /// Per queue and status (by its name, the order answers use).
    counts: BTreeMap<(String, &'static str), (BuildStatus, u64)>,
    /// Run times of the builds that had started, in no order.
    run_times: Vec<u64>,
    /// The median of `run_times`, while they are unchanged.
    median: Option<Option<u64>>,
}

/// How bringing the unsettled hours up to date went.
enum CatchUp {
    Current,
    /// Events are missing or too many: count afresh.
    Stale,
    /// More builds than [`MAX_TRACKED`].
    TooMany,
}

impl HourlyHistory {
    /// How long after its end an hour is settled. A build's finish time is
    /// its writer's clock when it became terminal, committed within
    /// moments; this covers a slow commit and another stitch process's
    /// clock running somewhat behind.
    pub const SETTLED_AFTER: TimeDelta = TimeDelta::minutes(5);

    /// Nothing counted yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Drops everything counted: the next answer counts afresh.
    pub fn forget(&mut self) {
        *self = Self::default();
    }

    /// The builds finished from `first_hour` (on the hour) on, hour by
    /// hour, oldest first, as of event `event_seq` or later (read it
    /// before calling: an event committed meanwhile is then counted by this
    /// answer or the next). `now` is the caller's clock; it decides which
    /// hours are settled. Hours without builds are absent. Hours ahead of
    /// `now` are included: the queues' totals count a build whose finish
    /// time is ahead of this clock.
    pub async fn hours(
        &mut self,
        store: &Store,
        now: DateTime<Utc>,
        first_hour: DateTime<Utc>,
        event_seq: u64,
    ) -> Result<Vec<FinishedHour>> {
        let first = first_hour.timestamp_millis();
        let settle_ms = Self::SETTLED_AFTER.num_milliseconds();
        let settled_until = hour_start(now.timestamp_millis().saturating_sub(settle_ms)).max(first);

        if let Some(mut unsettled) = self.unsettled.take() {
            match unsettled.catch_up(store, event_seq).await? {
                CatchUp::Current => self.unsettled = Some(unsettled),
                CatchUp::Stale => {}
                CatchUp::TooMany => self.too_many_from = Some(unsettled.from),
            }
        }

        let kept = self
            .settled
            .take()
            .filter(|s| s.from <= first && first <= s.until && s.until <= settled_until);
        let mut settled = match kept {
            Some(mut s) => {
                s.hours.retain(|h| h.start.timestamp_millis() >= first);
                s.from = first;
                s
            }
            None => Settled {
                from: first,
                until: first,
                hours: Vec::new(),
            },
        };
        // Hours that settled since the last answer come from the tally,
        // when it starts where the settled hours end.
        if self.unsettled.as_ref().map(|u| u.from) != Some(settled.until) {
            self.unsettled = None;
        }
        if let Some(unsettled) = &mut self.unsettled {
            settled.hours.extend(unsettled.settle(settled_until)?);
            settled.until = settled_until;
        }
        if settled.until < settled_until {
            let since = time(settled.until, || "settled hours".into())?;
            let until = time(settled_until, || "settled hours".into())?;
            settled
                .hours
                .extend(store.finished_hours(since, Some(until)).await?);
            settled.until = settled_until;
        }
        let mut hours = settled.hours.clone();
        self.settled = Some(settled);

        if self.unsettled.is_none() && self.too_many_from != Some(settled_until) {
            self.unsettled = Unsettled::count(store, settled_until, event_seq).await?;
            if self.unsettled.is_none() {
                self.too_many_from = Some(settled_until);
            }
        }
        match &mut self.unsettled {
            Some(u) => hours.extend(u.hours()?),
            None => {
                let since = time(settled_until, || "unsettled hours".into())?;
                hours.extend(store.finished_hours(since, None).await?);
            }
        }
        Ok(hours)
    }
}

impl Unsettled {
    /// Counts the builds finished at or after `from` in the database, as
    /// of event `seq` (read before); `None` when there are more than
    /// [`MAX_TRACKED`].
    async fn count(store: &Store, from: i64, seq: u64) -> Result<Option<Self>> {
        let limit = u32::try_from(MAX_TRACKED + 1).unwrap_or(u32::MAX);
        let since = time(from, || "unsettled hours".into())?;
        let builds = store.finished_since(since, limit).await?;
        if builds.len() > MAX_TRACKED {
            return Ok(None);
        }
        let mut unsettled = Self {
            from,
            seq,
            tracked: 0,
            hours: BTreeMap::new(),
        };
        for build in builds {
            unsettled.add(build);
        }
        Ok(Some(unsettled))
    }

    /// Reads the events after `seq` up to at least `until_seq` and counts
    /// the finished builds they name.
    async fn catch_up(&mut self, store: &Store, until_seq: u64) -> Result<CatchUp> {
        if until_seq.saturating_sub(self.seq) > MAX_CATCH_UP {
            return Ok(CatchUp::Stale);
        }
        while self.seq < until_seq {
            let batch = store.finished_by_events(self.seq, EVENT_BATCH).await?;
            match batch.first() {
                // The log's retained part is a gapless run of seqs: a
                // first one further on means retention deleted events not
                // yet read, and with them perhaps builds' finishes.
                Some((first, _)) if *first != self.seq + 1 => return Ok(CatchUp::Stale),
                // Events up to `until_seq` were committed, and are gone.
                None => return Ok(CatchUp::Stale),
                Some(_) => {}
            }
            for (seq, build) in batch {
                self.seq = seq;
                if let Some(build) = build {
                    self.add(build);
                }
            }
            if self.tracked > MAX_TRACKED {
                return Ok(CatchUp::TooMany);
            }
        }
        Ok(CatchUp::Current)
    }

    /// Counts a finished build, once.
    fn add(&mut self, build: FinishedBuild) {
        let finished = build.finished_at.timestamp_millis();
        if finished < self.from {
            // Its hour is settled: the settled count stands.
            return;
        }
        let tally = self.hours.entry(hour_start(finished)).or_default();
        if !tally.ids.insert(build.id) {
            return;
        }
        self.tracked += 1;
        let key = (build.queue, build.status.as_str());
        tally.counts.entry(key).or_insert((build.status, 0)).1 += 1;
        if let Some(started) = build.started_at {
            // A run time below 0 (two writers' clocks apart) counts as 0,
            // as in the database's median.
            let run = finished.saturating_sub(started.timestamp_millis());
            tally.run_times.push(u64::try_from(run).unwrap_or(0));
            tally.median = None;
        }
    }

    /// Takes the hours before `until` out of the tally, which from then on
    /// starts at `until`.
    fn settle(&mut self, until: i64) -> Result<Vec<FinishedHour>> {
        let later = self.hours.split_off(&until);
        let settled = std::mem::replace(&mut self.hours, later);
        self.from = self.from.max(until);
        let mut out = Vec::with_capacity(settled.len());
        for (start, mut tally) in settled {
            self.tracked = self.tracked.saturating_sub(tally.ids.len());
            out.push(tally.hour(start)?);
        }
        Ok(out)
    }

    /// Every unsettled hour, oldest first.
    fn hours(&mut self) -> Result<Vec<FinishedHour>> {
        self.hours
            .iter_mut()
            .map(|(start, tally)| tally.hour(*start))
            .collect()
    }
}

impl Tally {
    fn hour(&mut self, start: i64) -> Result<FinishedHour> {
        let median = match self.median {
            Some(median) => median,
            None => {
                let median = lower_median(&mut self.run_times);
                self.median = Some(median);
                median
            }
        };
        Ok(FinishedHour {
            start: time(start, || format!("finished hour {start}"))?,
            counts: self
                .counts
                .iter()
                .map(|((queue, _), (status, count))| FinishedCount {
                    queue: queue.clone(),
                    status: *status,
                    count: *count,
                })
                .collect(),
            median_duration_ms: median,
        })
    }
}

/// The lower middle one of `values` (reordered), as the database's median
/// reads it: the one at `(n - 1) / 2` in ascending order.
fn lower_median(values: &mut [u64]) -> Option<u64> {
    let middle = values.len().checked_sub(1)? / 2;
    let (_, median, _) = values.select_nth_unstable(middle);
    Some(*median)
}

/// The start of the UTC hour holding `ms` (epoch milliseconds).
fn hour_start(ms: i64) -> i64 {
    ms - ms.rem_euclid(HOUR_MS)
}
