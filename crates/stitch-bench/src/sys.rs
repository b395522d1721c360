//! Process figures: CPU time and memory of this process, and of other
//! processes picked by name (a database server beside the benchmark).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use nix::sys::resource::{getrusage, UsageWho};
use nix::sys::time::TimeVal;
use nix::unistd::{sysconf, SysconfVar};

/// User + system CPU time of this process so far.
pub fn cpu_time() -> Duration {
    rusage_cpu(UsageWho::RUSAGE_SELF)
}

/// User + system CPU time of this process's waited-for children so far.
pub fn children_cpu_time() -> Duration {
    rusage_cpu(UsageWho::RUSAGE_CHILDREN)
}

fn rusage_cpu(who: UsageWho) -> Duration {
    let Ok(ru) = getrusage(who) else {
        return Duration::ZERO;
    };
    let tv =
        |t: TimeVal| Duration::new(t.tv_sec().max(0) as u64, (t.tv_usec().max(0) as u32) * 1000);
    tv(ru.user_time()) + tv(ru.system_time())
}

/// Clock ticks per second, the unit of `/proc/*/stat` CPU times.
pub fn clock_ticks_per_second() -> f64 {
    match sysconf(SysconfVar::CLK_TCK) {
        Ok(Some(n)) if n > 0 => n as f64,
        _ => 100.0,
    }
}

/// Peak resident set size in MiB (VmHWM).
pub fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

/// Wall and CPU time of one measured section.
pub struct Meter {
    wall: Instant,
    cpu: Duration,
}

impl Meter {
    pub fn start() -> Self {
        Self {
            wall: Instant::now(),
            cpu: cpu_time(),
        }
    }

    /// (wall seconds, CPU cores busy on average).
    pub fn stop(&self) -> (f64, f64) {
        let wall = self.wall.elapsed().as_secs_f64();
        let cpu = (cpu_time() - self.cpu).as_secs_f64();
        (wall, if wall > 0.0 { cpu / wall } else { 0.0 })
    }
}

/// The processes on this machine whose name (`/proc/PID/comm`) is one of a
/// few candidates, e.g. a database server's (`postgres` runs one process per
/// connection; `mariadbd` one process). The first candidate with a running
/// process is the one measured.
#[derive(Clone)]
pub struct NamedProcesses {
    name: String,
}

/// CPU time so far of each process of a [`NamedProcesses`].
pub struct ProcessesCpu(HashMap<u32, Duration>);

impl NamedProcesses {
    /// The first of `candidates` with at least one running process; `None`
    /// when none runs here (a database on another machine).
    pub fn find(candidates: &[&str]) -> Option<Self> {
        candidates
            .iter()
            .find(|name| !pids_named(name).is_empty())
            .map(|name| Self {
                name: (*name).to_string(),
            })
    }

    /// The process name measured.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// User + system CPU time of each matching process so far.
    pub fn cpu(&self) -> ProcessesCpu {
        ProcessesCpu(
            pids_named(&self.name)
                .into_iter()
                .filter_map(|pid| process_cpu(pid).map(|t| (pid, t)))
                .collect(),
        )
    }

    /// Proportional set size of all matching processes together, MiB
    /// (`Pss` counts memory shared between them, like PostgreSQL's shared
    /// buffers, once); falls back to the sum of `VmRSS` where
    /// `smaps_rollup` is not readable.
    pub fn memory_mib(&self) -> f64 {
        pids_named(&self.name)
            .into_iter()
            .map(|pid| {
                status_kib(&format!("/proc/{pid}/smaps_rollup"), "Pss:")
                    .or_else(|| status_kib(&format!("/proc/{pid}/status"), "VmRSS:"))
                    .unwrap_or(0.0)
            })
            .sum::<f64>()
            / 1024.0
    }
}

impl ProcessesCpu {
    /// CPU time used since `earlier`. A process that started in between
    /// counts from zero; one that exited in between is lost (connection
    /// pools keep their server processes, so little is).
    pub fn since(&self, earlier: &ProcessesCpu) -> Duration {
        self.0
            .iter()
            .map(|(pid, now)| now.saturating_sub(earlier.0.get(pid).copied().unwrap_or_default()))
            .sum()
    }
}

fn pids_named(name: &str) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()))
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|comm| comm.trim_end() == name)
        })
        .collect()
}

/// User + system time of process `pid` from `/proc/PID/stat`.
fn process_cpu(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The name may contain spaces and parentheses: fields start after the last ')'.
    let fields: Vec<&str> = stat[stat.rfind(')')? + 1..].split_whitespace().collect();
    // After "(comm) ": state is field 3, utime 14, stime 15.
    let ticks = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    let per_second = clock_ticks_per_second();
    Some(Duration::from_secs_f64(ticks / per_second))
}

/// The kB value of the line starting with `key` in a `/proc` key-value file.
fn status_kib(path: &str, key: &str) -> Option<f64> {
    std::fs::read_to_string(path).ok().and_then(|s| {
        s.lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<f64>().ok())
    })
}

/// User + system CPU time of process `pid` so far (another process, e.g. a
/// `stitch serve` child); `None` once it is gone.
pub fn pid_cpu(pid: u32) -> Option<Duration> {
    process_cpu(pid)
}

/// Resident set size of process `pid` now (`VmRSS`) and at its peak
/// (`VmHWM`), MiB.
pub fn pid_rss_mib(pid: u32) -> Option<(f64, f64)> {
    let path = format!("/proc/{pid}/status");
    Some((
        status_kib(&path, "VmRSS:")? / 1024.0,
        status_kib(&path, "VmHWM:")? / 1024.0,
    ))
}

/// Bytes in the files under `path`, recursively (0 for what cannot be read).
pub fn dir_bytes(path: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(path) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}
