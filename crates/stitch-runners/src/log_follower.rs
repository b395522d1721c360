//! Following a vendor build's log as it grows, for every vendor runner:
//! read the build, emit the lines it added, wait `poll`, read it again,
//! until the vendor says nothing more will come; a failed read ends the
//! log with that error.
//!
//! The seams:
//! - a vendor implements [`LogSource`] (how to read its build again, and
//!   which lines one read of it adds) and keeps its jobs' step ids and
//!   open/closed state in [`Steps`];
//! - a runner serves the [`LogFollower`] to one viewer
//!   ([`LogFollower::into_stream`]) or shares one follower between every
//!   viewer of a build ([`SharedLogs`]), so that viewers do not multiply
//!   the requests the vendor's rate limit counts.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use futures::StreamExt;
use stitch_core::{async_trait, BuildId, LogLine, LogStream, RunnerError};
use tokio::sync::watch;
use tokio::task::AbortHandle;

/// What one vendor's follower reads.
#[async_trait]
pub trait LogSource: Send + 'static {
    /// The build (run) as one read of the vendor's API returns it.
    type Build: Send + 'static;
    /// What the vendor's calls fail with.
    type Error: Into<RunnerError> + Send;

    /// Reads the build again (every `poll`, after the first read).
    async fn reread(&mut self) -> Result<Self::Build, Self::Error>;

    /// The lines `build` adds to those of earlier reads.
    async fn read(&mut self, build: &Self::Build) -> Result<Batch, Self::Error>;
}

/// What one read of a build adds to its log.
#[derive(Debug, Default)]
pub struct Batch {
    /// The new lines.
    pub lines: Vec<LogLine>,
    /// Nothing more will come (the build is terminal, or a cap was
    /// reached): the log ends after these lines.
    pub finished: bool,
}

/// Reads a build's log as it grows, batch by batch (see the module docs).
pub struct LogFollower<S: LogSource> {
    source: S,
    poll: Duration,
    /// The build as the caller last read it: the first batch needs no read.
    first: Option<S::Build>,
    done: bool,
}

impl<S: LogSource> LogFollower<S> {
    /// A follower of `first` (already read), re-reading it every `poll`.
    pub fn new(source: S, first: S::Build, poll: Duration) -> Self {
        Self {
            source,
            poll,
            first: Some(first),
            done: false,
        }
    }

    /// Whether the log ended: no batch will follow.
    pub fn done(&self) -> bool {
        self.done
    }

    /// The next batch: the lines of the first read at once, later ones
    /// after `poll`. An error ends the log.
    pub async fn next_batch(&mut self) -> Vec<Result<LogLine, RunnerError>> {
        let build = match self.first.take() {
            Some(b) => b,
            None => {
                tokio::time::sleep(self.poll).await;
                match self.source.reread().await {
                    Ok(b) => b,
                    Err(e) => {
                        self.done = true;
                        return vec![Err(e.into())];
                    }
                }
            }
        };
        match self.source.read(&build).await {
            Ok(batch) => {
                self.done = batch.finished;
                batch.lines.into_iter().map(Ok).collect()
            }
            Err(e) => {
                self.done = true;
                vec![Err(e.into())]
            }
        }
    }

    /// The log as a stream for one viewer.
    pub fn into_stream(self) -> LogStream {
        futures::stream::unfold(self, |mut f| async move {
            if f.done {
                return None;
            }
            let batch = f.next_batch().await;
            Some((futures::stream::iter(batch), f))
        })
        .flatten()
        .boxed()
    }
}

/// Per job of a build: the step it became and what the follower knows of
/// it. Step ids count from 1 in the order jobs were first seen.
#[derive(Debug)]
pub struct Steps<K, S> {
    jobs: Vec<(K, Step<S>)>,
}

/// One job's step.
#[derive(Debug)]
pub struct Step<S> {
    /// The step id of the job's lines.
    pub id: i64,
    /// Its start line was emitted.
    pub opened: bool,
    /// Its end line was emitted: nothing more comes from this job.
    pub closed: bool,
    /// What else the vendor keeps per job (read offsets, a line splitter).
    pub state: S,
}

impl<K, S> Default for Steps<K, S> {
    fn default() -> Self {
        Self { jobs: Vec::new() }
    }
}

impl<K: PartialEq, S> Steps<K, S> {
    /// The step of job `key`, given the next step id (and `state()`) the
    /// first time the job is seen.
    pub fn step(&mut self, key: K, state: impl FnOnce() -> S) -> &mut Step<S> {
        let at = match self.jobs.iter().position(|(k, _)| *k == key) {
            Some(at) => at,
            None => {
                let id = self.jobs.len() as i64 + 1;
                self.jobs.push((
                    key,
                    Step {
                        id,
                        opened: false,
                        closed: false,
                        state: state(),
                    },
                ));
                self.jobs.len() - 1
            }
        };
        &mut self.jobs[at].1
    }
}

/// The followers of the builds someone is viewing, one per build, each
/// shared by all its viewers (see [`SharedLog`]).
#[derive(Default)]
pub struct SharedLogs {
    followers: Mutex<HashMap<BuildId, Weak<SharedLog>>>,
}

impl SharedLogs {
    /// A new viewer of `id`'s log, if a follower of it is running.
    pub fn join(&self, id: &BuildId) -> Option<LogStream> {
        let followers = self.followers.lock().unwrap_or_else(|p| p.into_inner());
        let shared = followers.get(id).and_then(Weak::upgrade)?;
        Some(shared.viewer())
    }

    /// A new viewer of `id`'s log: of the follower another viewer started
    /// meanwhile, else of `follower`, started now.
    pub fn join_or_start<S: LogSource>(&self, id: &BuildId, follower: LogFollower<S>) -> LogStream {
        let mut followers = self.followers.lock().unwrap_or_else(|p| p.into_inner());
        followers.retain(|_, f| f.strong_count() > 0);
        if let Some(shared) = followers.get(id).and_then(Weak::upgrade) {
            return shared.viewer();
        }
        let shared = SharedLog::start(follower);
        followers.insert(id.clone(), Arc::downgrade(&shared));
        shared.viewer()
    }
}

/// One build's log as its follower produced it so far.
#[derive(Default)]
struct LogHistory {
    lines: Vec<Result<LogLine, RunnerError>>,
    /// The follower finished: no line will be added.
    done: bool,
}

/// One follower task and the lines it produced, shared by every viewer of
/// the build. Viewers hold it through `Arc`; when the last one is dropped,
/// the task is aborted (it fetches nothing for nobody).
struct SharedLog {
    history: Arc<Mutex<LogHistory>>,
    /// Bumped after every batch the task adds.
    updates: watch::Receiver<u64>,
    task: AbortHandle,
}

impl Drop for SharedLog {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl SharedLog {
    fn start<S: LogSource>(follower: LogFollower<S>) -> Arc<Self> {
        let history = Arc::new(Mutex::new(LogHistory::default()));
        let (tx, updates) = watch::channel(0u64);
        let task = tokio::spawn(follow(follower, history.clone(), tx));
        Arc::new(Self {
            history,
            updates,
            task: task.abort_handle(),
        })
    }

    /// A stream of every line from the first, following until the
    /// follower is done.
    fn viewer(self: &Arc<Self>) -> LogStream {
        let rx = self.updates.clone();
        futures::stream::unfold(
            (self.clone(), 0usize, rx),
            |(shared, next, mut rx)| async move {
                loop {
                    // Marks the current batch seen before reading it, so a
                    // batch added after the read wakes `changed` below.
                    rx.borrow_and_update();
                    let (batch, done) = {
                        let h = shared.history.lock().unwrap_or_else(|p| p.into_inner());
                        (h.lines[next.min(h.lines.len())..].to_vec(), h.done)
                    };
                    if !batch.is_empty() {
                        let next = next + batch.len();
                        return Some((futures::stream::iter(batch), (shared, next, rx)));
                    }
                    if done || rx.changed().await.is_err() {
                        return None;
                    }
                }
            },
        )
        .flatten()
        .boxed()
    }
}

/// The follower task: batches into the history until the follower is done.
async fn follow<S: LogSource>(
    mut follower: LogFollower<S>,
    history: Arc<Mutex<LogHistory>>,
    updates: watch::Sender<u64>,
) {
    loop {
        let batch = follower.next_batch().await;
        {
            let mut h = history.lock().unwrap_or_else(|p| p.into_inner());
            h.lines.extend(batch);
            h.done = follower.done;
        }
        updates.send_modify(|n| *n += 1);
        if follower.done {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;
    use stitch_core::OutputStream;

    /// A build of `n` reads: read `i` adds line `i`; the last is terminal;
    /// `fail_at` makes that read fail.
    struct Counting {
        reads: u32,
        last: u32,
        fail_at: Option<u32>,
    }

    #[async_trait]
    impl LogSource for Counting {
        type Build = u32;
        type Error = RunnerError;

        async fn reread(&mut self) -> Result<u32, RunnerError> {
            self.reads += 1;
            if self.fail_at == Some(self.reads) {
                return Err(RunnerError::Transport("gone".into()));
            }
            Ok(self.reads)
        }

        async fn read(&mut self, build: &u32) -> Result<Batch, RunnerError> {
            Ok(Batch {
                lines: vec![LogLine::data(
                    1,
                    OutputStream::Stdout,
                    build.to_string(),
                    Utc::now(),
                )],
                finished: *build >= self.last,
            })
        }
    }

    fn follower(last: u32, fail_at: Option<u32>) -> LogFollower<Counting> {
        let source = Counting {
            reads: 1,
            last,
            fail_at,
        };
        LogFollower::new(source, 1, Duration::ZERO)
    }

    fn texts(lines: &[Result<LogLine, RunnerError>]) -> Vec<String> {
        lines
            .iter()
            .map(|l| match l {
                Ok(l) => l.content.clone(),
                Err(e) => format!("error: {e}"),
            })
            .collect()
    }

    #[tokio::test]
    async fn a_follower_reads_until_the_source_finishes_or_fails() {
        let lines: Vec<_> = follower(3, None).into_stream().collect().await;
        assert_eq!(texts(&lines), ["1", "2", "3"]);
        let lines: Vec<_> = follower(9, Some(3)).into_stream().collect().await;
        assert_eq!(texts(&lines)[..2], ["1", "2"]);
        assert_eq!(lines.len(), 3);
        assert!(
            lines[2].is_err(),
            "a failed read ends the log with its error"
        );
    }

    #[tokio::test]
    async fn viewers_of_one_build_share_one_follower() {
        let logs = SharedLogs::default();
        let id = BuildId::new();
        assert!(logs.join(&id).is_none());
        let first = logs.join_or_start(&id, follower(3, None));
        let second = logs.join(&id).expect("the first viewer's follower runs");
        let third = logs.join_or_start(&id, follower(1, Some(2)));
        for viewer in [first, second, third] {
            let lines: Vec<_> = viewer.collect().await;
            assert_eq!(texts(&lines), ["1", "2", "3"]);
        }
    }

    #[test]
    fn steps_are_numbered_in_the_order_jobs_are_first_seen() {
        let mut steps: Steps<&str, u8> = Steps::default();
        assert_eq!(steps.step("b", || 7).id, 1);
        assert_eq!(steps.step("a", || 0).id, 2);
        let b = steps.step("b", || 0);
        assert_eq!((b.id, b.state), (1, 7), "state is made once");
        b.opened = true;
        assert!(steps.step("b", || 0).opened);
    }
}
