//! `stitch mq partitions`: a read-only page of a topic's partitions with
//! their cursor, next due time, lease and in-flight deliveries, straight
//! from the configured database (like `stitch mq dlq`).

use stitch_mq::{Admin, Millis, MqError, PartitionFilter, PartitionInfo};

use crate::configured::open_configured_queue;
use crate::exit::{OK, UNAVAILABLE, USAGE};
use crate::PartitionsArgs;

/// Runs the command; returns the exit code.
pub async fn run(args: PartitionsArgs) -> u8 {
    let queue = match open_configured_queue(&args.config).await {
        Ok(q) => q,
        Err(code) => return code,
    };
    let admin = queue.admin();
    let group = match &args.group {
        Some(g) => g.clone(),
        None => match only_group(&admin, &args.topic).await {
            Ok(g) => g,
            Err(code) => return code,
        },
    };
    let filter = PartitionFilter {
        owner: args.owner.clone(),
        due: args.due,
        after: args.after.clone(),
        limit: args.limit as usize,
    };
    let page = match admin.partitions(&args.topic, &group, &filter).await {
        Ok(p) => p,
        Err(e) => return fail(&e),
    };
    let now = stitch_mq::now_millis();
    // A full page may have a successor; an empty next page ends the listing.
    let next_after = (page.len() == filter.limit)
        .then(|| page.last().map(|p| p.partition_key.clone()))
        .flatten();
    if args.json {
        print_json(&args.topic, &group, now, &page, next_after.as_deref());
    } else {
        print_table(&args, &group, now, &page, next_after.as_deref());
    }
    OK
}

/// The topic's one consumer group, or the exit code after saying why not.
async fn only_group(admin: &Admin, topic: &str) -> Result<String, u8> {
    let groups = admin.groups(topic).await.map_err(|e| fail(&e))?;
    match groups.as_slice() {
        [] => Err(fail(&MqError::UnknownTopic(topic.to_string()))),
        [one] => Ok(one.clone()),
        many => {
            eprintln!(
                "stitch: topic {topic:?} has several consumer groups ({}): choose one with --group",
                many.join(", ")
            );
            Err(USAGE)
        }
    }
}

/// Prints the error; input errors exit 2, storage errors 3.
fn fail(e: &MqError) -> u8 {
    match e {
        MqError::UnknownTopic(_) => {
            eprintln!("stitch: {e} (stitch serve consumes the topics trigger and signal)");
            USAGE
        }
        MqError::InvalidTopic(_)
        | MqError::InvalidName { .. }
        | MqError::UnknownGroup { .. }
        | MqError::InvalidLimit { .. } => {
            eprintln!("stitch: {e}");
            USAGE
        }
        _ => {
            eprintln!("stitch: {e}");
            UNAVAILABLE
        }
    }
}

fn print_json(topic: &str, group: &str, now: Millis, page: &[PartitionInfo], next: Option<&str>) {
    let partitions: Vec<serde_json::Value> = page
        .iter()
        .map(|p| {
            serde_json::json!({
                "partition": p.partition_key,
                "cursor": p.cursor,
                "next_due": p.next_due,
                "due": p.next_due.is_some_and(|d| d <= now),
                "lease_owner": p.lease_owner,
                "lease_expires": p.lease_expires,
                "lease_expired": p.lease_expires.map(|e| e <= now),
                "in_flight": p.in_flight,
            })
        })
        .collect();
    let doc = serde_json::json!({
        "topic": topic,
        "group": group,
        "now": now,
        "partitions": partitions,
        "next_after": next,
    });
    println!("{doc}");
}

fn print_table(
    args: &PartitionsArgs,
    group: &str,
    now: Millis,
    page: &[PartitionInfo],
    next: Option<&str>,
) {
    println!(
        "topic {}, group {group}: {} partition(s)",
        args.topic,
        page.len()
    );
    if page.is_empty() {
        return;
    }
    let header = [
        "PARTITION",
        "CURSOR",
        "NEXT DUE",
        "LEASE OWNER",
        "LEASE",
        "IN FLIGHT",
    ];
    let rows: Vec<[String; 6]> = page
        .iter()
        .map(|p| {
            [
                p.partition_key.clone(),
                p.cursor.to_string(),
                next_due(p.next_due, now),
                p.lease_owner.clone().unwrap_or_else(|| "-".into()),
                lease(p.lease_expires, now),
                p.in_flight.to_string(),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &[&str]| {
        let padded: Vec<String> = cells
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(&header);
    for row in &rows {
        line(&row.each_ref().map(String::as_str));
    }
    if let Some(after) = next {
        let mut more = format!(
            "more: stitch mq partitions --topic {} --group {group}",
            args.topic
        );
        if let Some(owner) = &args.owner {
            more.push_str(&format!(" --owner {owner}"));
        }
        if args.due {
            more.push_str(" --due");
        }
        more.push_str(&format!(" --limit {} --after {after}", args.limit));
        println!("{more}");
    }
}

fn next_due(at: Option<Millis>, now: Millis) -> String {
    match at {
        None => "-".into(),
        Some(t) if t <= now => "due".into(),
        Some(t) => format!("in {}", span(t - now)),
    }
}

fn lease(expires: Option<Millis>, now: Millis) -> String {
    match expires {
        None => "-".into(),
        Some(t) if t > now => format!("{} left", span(t - now)),
        Some(t) => format!("expired {} ago", span(now - t)),
    }
}

/// A duration in milliseconds for people: 1.5s, 12m30s, 3h05m.
fn span(ms: Millis) -> String {
    let ms = ms.max(0);
    if ms < 60_000 {
        format!("{:.1}s", ms as f64 / 1000.0)
    } else if ms < 3_600_000 {
        format!("{}m{:02}s", ms / 60_000, ms % 60_000 / 1000)
    } else {
        format!("{}h{:02}m", ms / 3_600_000, ms % 3_600_000 / 60_000)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_and_states_read_well() {
        assert_eq!(span(1500), "1.5s");
        assert_eq!(span(750_000), "12m30s");
        assert_eq!(span(3 * 3_600_000 + 5 * 60_000), "3h05m");
        assert_eq!(next_due(None, 10), "-");
        assert_eq!(next_due(Some(10), 10), "due");
        assert_eq!(next_due(Some(2010), 10), "in 2.0s");
        assert_eq!(lease(None, 10), "-");
        assert_eq!(lease(Some(5010), 10), "5.0s left");
        assert_eq!(lease(Some(10), 3010), "expired 3.0s ago");
    }
}
