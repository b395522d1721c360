//! `stitch serve` as a child process of a benchmark: the release `stitch`
//! binary beside this program (or a given one), started from a config file
//! with a clean environment, waited on until healthy, stopped with SIGTERM.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context;

/// The `stitch` binary: `given`, or `stitch` beside this program (e.g.
/// `target/release/stitch`). An error says how to build it.
pub fn stitch_binary(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    let stitch = match given {
        Some(p) => p.to_path_buf(),
        None => std::env::current_exe()?
            .parent()
            .map(|d| d.join("stitch"))
            .context("locating the stitch binary")?,
    };
    anyhow::ensure!(
        stitch.is_file(),
        "no stitch binary at {} (build it: cargo build --release -p stitch-cli, or pass --stitch-bin)",
        stitch.display()
    );
    Ok(stitch)
}

/// A `stitch` command with this process's environment minus every
/// `STITCH_*` variable (they would override the config file), plus `env`,
/// logging warnings only.
pub fn stitch_command(stitch: &Path, env: &[(&str, &str)]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(stitch);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("STITCH_") {
            cmd.env_remove(key);
        }
    }
    cmd.env("STITCH_LOG", "warn");
    for (key, value) in env {
        cmd.env(key, value);
    }
    cmd
}

/// `stitch migrate --config CONFIG`.
pub async fn migrate(stitch: &Path, config: &Path, env: &[(&str, &str)]) -> anyhow::Result<()> {
    let out = stitch_command(stitch, env)
        .arg("migrate")
        .arg("--config")
        .arg(config)
        .output()
        .await?;
    anyhow::ensure!(
        out.status.success(),
        "stitch migrate failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// One `stitch serve` child on a free loopback port; its stderr goes to
/// `serve-<name>.log` in the directory it was given.
pub struct ServeChild {
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    /// Its process id (for CPU and memory readings).
    pub pid: u32,
    child: tokio::process::Child,
    log: PathBuf,
}

impl ServeChild {
    /// Starts `stitch serve --config CONFIG` named `name`
    /// (`STITCH_NODE_NAME`), with `env` added.
    pub fn spawn(
        stitch: &Path,
        config: &Path,
        log_dir: &Path,
        name: &str,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let log = log_dir.join(format!("serve-{name}.log"));
        let child = stitch_command(stitch, env)
            .arg("serve")
            .arg("--config")
            .arg(config)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .env("STITCH_NODE_NAME", name)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", stitch.display()))?;
        let pid = child.id().context("stitch serve exited at once")?;
        Ok(Self {
            base: format!("http://127.0.0.1:{port}"),
            pid,
            child,
            log,
        })
    }

    /// Waits up to 60 s for `/healthz` to answer 2xx; an exit or a timeout
    /// is an error carrying the end of the server's log.
    pub async fn wait_healthy(&mut self, http: &reqwest::Client) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                anyhow::bail!("stitch serve exited ({status}): {}", self.log_tail());
            }
            let ok = http
                .get(format!("{}/healthz", self.base))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ok {
                return Ok(());
            }
            // A child process has no readiness event to wait on but its
            // health answer; poll it.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        anyhow::bail!("stitch serve not healthy after 60 s: {}", self.log_tail())
    }

    /// The last 3,000 characters of the server's log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let chars: Vec<char> = text.chars().collect();
        chars[chars.len().saturating_sub(3000)..].iter().collect()
    }

    /// SIGTERM, then up to 20 s for a clean shutdown, then SIGKILL.
    pub async fn stop(mut self) {
        if let Ok(pid) = i32::try_from(self.pid) {
            // Our own child, not yet reaped: the pid is still its.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        if tokio::time::timeout(Duration::from_secs(20), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}
