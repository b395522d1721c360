//! Where the fake remembers cancellations: always in this process, and in a
//! shared directory when one is configured so every instance sees them.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use chrono::{DateTime, Utc};
use stitch_core::{BuildId, RunnerError};

/// In-process entries kept at most; the oldest builds are forgotten first
/// (build ids sort by creation time), which only matters for builds that
/// were cancelled long ago and are terminal anyway.
const MAX_REMEMBERED: usize = 100_000;

pub(crate) struct CancelStore {
    memory: Mutex<BTreeMap<BuildId, DateTime<Utc>>>,
    dir: Option<PathBuf>,
}

impl CancelStore {
    pub(crate) fn new(dir: Option<PathBuf>) -> Self {
        Self {
            memory: Mutex::new(BTreeMap::new()),
            dir,
        }
    }

    fn path(&self, id: &BuildId) -> Option<PathBuf> {
        self.dir.as_ref().map(|d| d.join(format!("{id}.cancel")))
    }

    /// When the build was cancelled, if it was.
    pub(crate) fn get(&self, id: &BuildId) -> Result<Option<DateTime<Utc>>, RunnerError> {
        if let Some(at) = self.lock().get(id) {
            return Ok(Some(*at));
        }
        let Some(path) = self.path(id) else {
            return Ok(None);
        };
        match std::fs::read_to_string(&path) {
            Ok(text) => DateTime::parse_from_rfc3339(text.trim())
                .map(|t| Some(t.with_timezone(&Utc)))
                .map_err(|e| {
                    RunnerError::Internal(format!("corrupt cancel record {}: {e}", path.display()))
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(RunnerError::Internal(format!(
                "reading cancel record {}: {e}",
                path.display()
            ))),
        }
    }

    /// Record a cancel at `at`; the first record wins, and its time is
    /// returned.
    pub(crate) fn record(
        &self,
        id: &BuildId,
        at: DateTime<Utc>,
    ) -> Result<DateTime<Utc>, RunnerError> {
        let at = match self.path(id) {
            Some(path) => write_first(&path, at)?,
            None => at,
        };
        let mut memory = self.lock();
        let at = *memory.entry(id.clone()).or_insert(at);
        while memory.len() > MAX_REMEMBERED {
            memory.pop_first();
        }
        Ok(at)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<BuildId, DateTime<Utc>>> {
        // A panic while holding this lock cannot leave the map inconsistent
        // (single inserts/removes), so a poisoned lock is still usable.
        self.memory.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Write `at` to `path` unless the file exists; return the time on disk.
/// Hard-linking a complete temp file into place makes "first writer wins"
/// atomic across processes, and readers never see a half-written file.
fn write_first(path: &std::path::Path, at: DateTime<Utc>) -> Result<DateTime<Utc>, RunnerError> {
    let io = |what: &str, e: std::io::Error| {
        RunnerError::Internal(format!("{what} {}: {e}", path.display()))
    };
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let tmp = path.with_extension(format!(
        "cancel.{}.{}.tmp",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let mut f = std::fs::File::create(&tmp).map_err(|e| io("creating cancel record for", e))?;
    f.write_all(at.to_rfc3339().as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|e| io("writing cancel record for", e))?;
    let linked = std::fs::hard_link(&tmp, path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok(at),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let text = std::fs::read_to_string(path).map_err(|e| io("reading cancel record", e))?;
            DateTime::parse_from_rfc3339(text.trim())
                .map(|t| t.with_timezone(&Utc))
                .map_err(|e| {
                    RunnerError::Internal(format!("corrupt cancel record {}: {e}", path.display()))
                })
        }
        Err(e) => Err(io("recording cancel at", e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_cancel_wins_across_stores_sharing_a_dir() {
        let dir = tempfile::tempdir().unwrap();
        let a = CancelStore::new(Some(dir.path().to_path_buf()));
        let b = CancelStore::new(Some(dir.path().to_path_buf()));
        let id = BuildId::new();
        assert_eq!(b.get(&id).unwrap(), None);
        let t1 = Utc::now();
        let t2 = t1 + chrono::Duration::seconds(5);
        let first = a.record(&id, t1).unwrap();
        assert_eq!(b.record(&id, t2).unwrap(), first);
        assert_eq!(b.get(&id).unwrap(), Some(first));
        // Only the record itself is left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn memory_only_store_is_per_instance() {
        let a = CancelStore::new(None);
        let b = CancelStore::new(None);
        let id = BuildId::new();
        a.record(&id, Utc::now()).unwrap();
        assert!(a.get(&id).unwrap().is_some());
        assert_eq!(b.get(&id).unwrap(), None);
    }
}
