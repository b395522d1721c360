//! `stitch job exec` and `stitch job promise-failure`: what a CI job runs.

use std::ffi::OsString;
use std::sync::Arc;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use stitch_job::{
    Declare, JobApi, JobApiClient, JobApiError, Outcome, PromiseFailure, PromiseFailureCoordinator,
    PromiseFailureResult, ServerClient, Unconfigured,
};
use stitch_server::config::LogFormat;
use tokio::signal::unix::{signal, SignalKind};

use crate::exit::{BUILD_FAILED, OK, UNAVAILABLE, USAGE};

/// Logs to stderr (stdout belongs to the job), `info` unless `STITCH_LOG`
/// (or else `RUST_LOG`) says otherwise; text unless `--log-format json`.
fn init_job_tracing(format: Option<LogFormat>) {
    // No exporter: a job's spans are not the service's.
    let _ =
        stitch_server::telemetry::init(format.unwrap_or_default(), None, "info", std::io::stderr);
}

/// `stitch job exec -- CMD [ARGS...]`.
pub async fn exec(command: Vec<OsString>, log_format: Option<LogFormat>) -> u8 {
    init_job_tracing(log_format);
    let Some((program, args)) = command.split_first() else {
        eprintln!("stitch job exec: no command given; usage: stitch job exec -- CMD [ARGS...]");
        return USAGE;
    };
    let declarer: Arc<dyn Declare> = match ServerClient::from_env() {
        Ok(client) => Arc::new(client),
        Err(e) => {
            tracing::warn!("promise-failure calls will be refused: {e}");
            Arc::new(Unconfigured(e.to_string()))
        }
    };
    let api = match JobApi::start(PromiseFailureCoordinator::new(declarer)) {
        Ok(api) => api,
        Err(e) => {
            eprintln!("stitch job exec: cannot start the job API: {e}");
            return UNAVAILABLE;
        }
    };
    // Listen before spawning, so a signal arriving at once is forwarded.
    let (mut term, mut int) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(t), Ok(i)) => (t, i),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("stitch job exec: cannot handle signals: {e}");
            return UNAVAILABLE;
        }
    };
    let mut child = match tokio::process::Command::new(program)
        .args(args)
        .envs(api.env())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!(
                "stitch job exec: cannot run {}: {e}",
                program.to_string_lossy()
            );
            // The shell's codes: 127 not found, 126 found but not runnable.
            return if e.kind() == std::io::ErrorKind::NotFound {
                127
            } else {
                126
            };
        }
    };
    let pid = child.id().and_then(|p| i32::try_from(p).ok());
    let forward = |sig: Signal| {
        if let Some(pid) = pid {
            let _ = kill(Pid::from_raw(pid), sig);
        }
    };
    let status = loop {
        tokio::select! {
            status = child.wait() => break status,
            _ = term.recv() => forward(Signal::SIGTERM),
            _ = int.recv() => forward(Signal::SIGINT),
        }
    };
    api.shutdown().await;
    match status {
        Ok(st) => exit_code(st),
        Err(e) => {
            eprintln!("stitch job exec: lost track of the command: {e}");
            UNAVAILABLE
        }
    }
}

/// The command's exit code, or 128 + the signal that killed it.
fn exit_code(status: std::process::ExitStatus) -> u8 {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => (code & 0xff) as u8,
        (None, Some(sig)) => (128 + sig).clamp(0, 255) as u8,
        (None, None) => UNAVAILABLE,
    }
}

/// `stitch job promise-failure --exit-status N [--reason TEXT]`.
pub async fn promise_failure(
    exit_status: i64,
    reason: Option<String>,
    log_format: Option<LogFormat>,
) -> u8 {
    init_job_tracing(log_format);
    let promise = match PromiseFailure::new(exit_status, reason) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("stitch job promise-failure: {e}");
            return USAGE;
        }
    };
    if let Some(client) = JobApiClient::from_env() {
        let answer = match client {
            Ok(c) => c.promise_failure(&promise).await,
            Err(e) => Err(e),
        };
        match answer {
            Ok(result) => return report(&promise, &result),
            Err(JobApiError::Refused { status, message }) => {
                eprintln!("stitch job promise-failure: the job API refused the request (HTTP {status}): {message}");
                return USAGE;
            }
            // Unreachable or garbled: declaring directly is safe, the
            // server treats the same exit status again as a no-op.
            Err(e) => tracing::warn!("{e}; declaring directly to the stitch server"),
        }
    } else {
        tracing::debug!("no job API in the environment; declaring directly to the stitch server");
    }
    let direct = match ServerClient::from_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("stitch job promise-failure: {e}");
            return USAGE;
        }
    };
    let declaration = direct.declare(&promise).await;
    report(
        &promise,
        &PromiseFailureResult::from_declaration(Outcome::Declared, &declaration),
    )
}

fn report(promise: &PromiseFailure, result: &PromiseFailureResult) -> u8 {
    let n = promise.exit_status;
    if result.accepted {
        match result.outcome {
            Outcome::Declared => tracing::info!("promised exit status {n}: declared"),
            Outcome::Debounced => {
                tracing::debug!("promised exit status {n}: already declared (debounced)")
            }
        }
        return OK;
    }
    let detail = result.error.as_deref().unwrap_or("no detail");
    let (what, code) = match result.upstream_status {
        Some(409) => ("a different exit status was already promised", BUILD_FAILED),
        Some(422) => ("the build is no longer running", BUILD_FAILED),
        Some(403) => ("the job token does not belong to this build", BUILD_FAILED),
        Some(404) => ("the stitch server does not know this build", BUILD_FAILED),
        Some(401) => (
            "the stitch server wants a job token (STITCH_JOB_TOKEN)",
            BUILD_FAILED,
        ),
        Some(s) if (400..500).contains(&s) => ("the stitch server refused it", BUILD_FAILED),
        Some(_) => ("the stitch server failed to record it", UNAVAILABLE),
        None => ("the stitch server could not be reached", UNAVAILABLE),
    };
    eprintln!("stitch job promise-failure: could not promise exit status {n}: {what} ({detail})");
    code
}
