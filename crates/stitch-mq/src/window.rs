//! The per-partition delivery decision, shared by every backend so they
//! cannot drift: given the cursor and the stored rows after it (with this
//! group's delivery state), decide what to deliver, what to dead-letter,
//! where the cursor moves and when the partition is next due.

use crate::message::Millis;

/// A stored message after the cursor, with this group's state for it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct WindowRow {
    pub seq: i64,
    pub available_at: Millis,
    pub state: Option<RowState>,
}

/// A group's delivery state for one message.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RowState {
    pub attempt: u32,
    pub invisible_until: Millis,
    pub postponed: bool,
    pub done: bool,
}

/// Limits of one window decision.
#[derive(Clone, Copy, Debug)]
pub(crate) struct WindowLimits {
    pub now: Millis,
    pub batch_size: u32,
    pub max_deliver: usize,
    pub visibility_ms: Millis,
    pub max_attempts: u32,
}

impl WindowLimits {
    /// The limits of one partition inside `req`, after `delivered` messages
    /// of the same claim.
    pub(crate) fn for_claim(req: &crate::driver::ClaimRequest, delivered: usize) -> Self {
        Self {
            now: req.now,
            batch_size: req.batch_size,
            max_deliver: req.max_messages.saturating_sub(delivered),
            visibility_ms: req.visibility_ms,
            max_attempts: req.max_attempts,
        }
    }
}

/// The failure recorded for a message whose redeliveries ran out.
pub(crate) fn exhausted_failure(attempts: u32) -> crate::message::Failure {
    crate::message::Failure::new(format!(
        "redelivered {attempts} times without an outcome (consumer crashed or visibility timeout expired)"
    ))
}

/// What to do with a partition.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct WindowPlan {
    /// New contiguous-done watermark.
    pub cursor: i64,
    /// (seq, attempt) to mark delivered.
    pub deliver: Vec<(i64, u32)>,
    /// (seq, attempts made) whose redeliveries ran out: dead-letter them.
    pub exhausted: Vec<(i64, u32)>,
    /// When the partition is next due; `None` = nothing pending.
    pub next_due: Option<Millis>,
}

/// Decides one partition. `rows` are in seq order starting after `cursor`;
/// `truncated` says the scan stopped at its limit with more rows stored.
pub(crate) fn plan_window(
    cursor: i64,
    rows: &[WindowRow],
    truncated: bool,
    lim: WindowLimits,
) -> WindowPlan {
    let mut plan = WindowPlan {
        cursor,
        ..WindowPlan::default()
    };
    let mut contiguous = true;
    let mut window = 0u32;
    let mut stopped = false;
    let mut due: Option<Millis> = None;
    let earliest = |d: &mut Option<Millis>, t: Millis| *d = Some(d.map_or(t, |x| x.min(t)));

    for row in rows {
        let state = row.state;
        if state.is_some_and(|s| s.done) {
            if contiguous {
                plan.cursor = row.seq;
            }
            continue;
        }
        let invisible_until = state.map_or(Millis::MIN, |s| s.invisible_until);
        let deliverable = row.available_at <= lim.now && invisible_until <= lim.now;
        let attempt = state.map_or(0, |s| s.attempt) + 1;
        if deliverable && lim.max_attempts > 0 && attempt > lim.max_attempts {
            // Delivered max_attempts times without an outcome (consumer
            // crashed or timed out each time): stop the poison loop.
            plan.exhausted.push((row.seq, attempt - 1));
            if contiguous {
                plan.cursor = row.seq;
            }
            continue;
        }
        contiguous = false;
        if window >= lim.batch_size {
            stopped = true;
            break;
        }
        window += 1;
        if !deliverable {
            earliest(&mut due, row.available_at.max(invisible_until));
            if state.is_some_and(|s| s.postponed) && invisible_until > lim.now {
                // A postponed message is a barrier: nothing after it moves.
                stopped = true;
                break;
            }
            continue;
        }
        if plan.deliver.len() >= lim.max_deliver {
            earliest(&mut due, lim.now);
            stopped = true;
            break;
        }
        plan.deliver.push((row.seq, attempt));
        earliest(&mut due, lim.now + lim.visibility_ms);
    }
    if truncated && !stopped {
        earliest(&mut due, lim.now);
    }
    plan.next_due = due;
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: Millis = 1_000;

    fn lim(batch: u32) -> WindowLimits {
        WindowLimits {
            now: NOW,
            batch_size: batch,
            max_deliver: 100,
            visibility_ms: 50,
            max_attempts: 3,
        }
    }

    fn fresh(seq: i64) -> WindowRow {
        WindowRow {
            seq,
            available_at: 0,
            state: None,
        }
    }

    fn with(seq: i64, attempt: u32, until: Millis, postponed: bool, done: bool) -> WindowRow {
        WindowRow {
            seq,
            available_at: 0,
            state: Some(RowState {
                attempt,
                invisible_until: until,
                postponed,
                done,
            }),
        }
    }

    #[test]
    fn delivers_up_to_the_window() {
        let rows: Vec<_> = (1..=5).map(fresh).collect();
        let p = plan_window(0, &rows, false, lim(3));
        assert_eq!(p.deliver, vec![(1, 1), (2, 1), (3, 1)]);
        assert_eq!(p.next_due, Some(NOW + 50));
        assert_eq!(p.cursor, 0);
    }

    #[test]
    fn done_prefix_advances_cursor_only_contiguously() {
        let rows = vec![
            with(1, 1, 0, false, true),
            with(2, 1, 2000, false, false),
            with(3, 1, 0, false, true),
            fresh(4),
        ];
        let p = plan_window(0, &rows, false, lim(10));
        assert_eq!(p.cursor, 1);
        assert_eq!(p.deliver, vec![(4, 1)]);
        assert_eq!(p.next_due, Some(NOW + 50));
    }

    #[test]
    fn in_flight_does_not_block_but_postpone_does() {
        let rows = vec![with(1, 1, 2000, false, false), fresh(2)];
        assert_eq!(plan_window(0, &rows, false, lim(10)).deliver, vec![(2, 1)]);
        let rows = vec![with(1, 0, 2000, true, false), fresh(2)];
        let p = plan_window(0, &rows, false, lim(10));
        assert!(p.deliver.is_empty());
        assert_eq!(p.next_due, Some(2000));
        // A due postponed message redelivers first, as attempt 1.
        let rows = vec![with(1, 0, 900, true, false), fresh(2)];
        assert_eq!(
            plan_window(0, &rows, false, lim(10)).deliver,
            vec![(1, 1), (2, 1)]
        );
    }

    #[test]
    fn batch_of_one_serializes() {
        let rows = vec![with(1, 1, 2000, false, false), fresh(2)];
        let p = plan_window(0, &rows, false, lim(1));
        assert!(p.deliver.is_empty());
        assert_eq!(p.next_due, Some(2000));
    }

    #[test]
    fn exhausted_redeliveries_dead_letter() {
        let rows = vec![with(1, 3, 900, false, false), fresh(2)];
        let p = plan_window(0, &rows, false, lim(10));
        assert_eq!(p.exhausted, vec![(1, 3)]);
        assert_eq!(p.cursor, 1);
        assert_eq!(p.deliver, vec![(2, 1)]);
    }

    #[test]
    fn empty_means_nothing_due_and_truncated_means_now() {
        let p = plan_window(7, &[], false, lim(10));
        assert_eq!(p.next_due, None);
        assert_eq!(p.cursor, 7);
        let rows = vec![with(8, 1, 0, false, true)];
        let p = plan_window(7, &rows, true, lim(10));
        assert_eq!(p.next_due, Some(NOW));
        assert_eq!(p.cursor, 8);
    }

    #[test]
    fn delayed_messages_count_toward_the_window() {
        let rows = vec![
            WindowRow {
                seq: 1,
                available_at: 5000,
                state: None,
            },
            fresh(2),
        ];
        let p = plan_window(0, &rows, false, lim(10));
        assert_eq!(p.deliver, vec![(2, 1)]);
        assert_eq!(p.next_due, Some(NOW + 50));
        let p = plan_window(0, &rows, false, lim(1));
        assert!(p.deliver.is_empty());
        assert_eq!(p.next_due, Some(5000));
    }

    #[test]
    fn delivery_budget_stops_and_stays_due() {
        let rows: Vec<_> = (1..=5).map(fresh).collect();
        let mut l = lim(10);
        l.max_deliver = 2;
        let p = plan_window(0, &rows, false, l);
        assert_eq!(p.deliver.len(), 2);
        assert_eq!(p.next_due, Some(NOW));
    }
}
