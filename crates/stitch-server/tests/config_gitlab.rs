//! `[queues.NAME.gitlab]`: defaults, the webhook's poll, and every bad
//! value reported at its key (real TOML files; the environment is passed
//! in, never mutated).

use std::time::Duration;

use stitch_server::config::{GitlabSection, RunnerSection};

mod config_support;

use config_support::{assert_problem, load_text, problems};

fn gitlab_of(c: &stitch_server::config::Config) -> GitlabSection {
    match &c.queues["app"].runner {
        RunnerSection::Gitlab(gl) => gl.clone(),
        other => panic!("not a gitlab queue: {other:?}"),
    }
}

const GITLAB: &str = r#"
[queues.app]
runner = "gitlab"
[queues.app.gitlab]
project = "acme/app"
"#;

#[test]
fn gitlab_section_defaults() {
    let c = load_text(GITLAB, &[("GITLAB_TOKEN", "glpat-x")]).unwrap();
    let gl = gitlab_of(&c);
    assert_eq!(gl.api_url, "https://gitlab.com/api/v4");
    assert_eq!(gl.git_ref, "main");
    assert_eq!(gl.token_env, "GITLAB_TOKEN");
    assert!(gl.trigger_token_env.is_none());
    assert!(gl.variables.is_empty());
    assert_eq!(gl.rate_limit.requests, 2000);
    assert_eq!(gl.rate_limit.window, Duration::from_secs(60));
    assert_eq!(gl.request_timeout, Duration::from_secs(30));
    assert_eq!(gl.log_poll, Duration::from_secs(2));
    assert_eq!(gl.max_log_bytes, 16 * 1024 * 1024);
    assert!(gl.webhook.is_none());
    let policy = stitch_server::runners::poll_policy(&c, &c.queues["app"]);
    assert_eq!(
        policy.delay(stitch_core::BuildStatus::Running),
        Duration::from_secs(2),
        "without webhooks the queue's own poll cadence"
    );

    let hooked = format!("{GITLAB}[queues.app.gitlab.webhook]\nsecret_env = \"GL_HOOK\"\n");
    let c = load_text(&hooked, &[("GITLAB_TOKEN", "t"), ("GL_HOOK", "s")]).unwrap();
    let w = gitlab_of(&c).webhook.unwrap();
    assert_eq!(w.poll, Duration::from_secs(60));
    assert_eq!(
        stitch_server::runners::poll_policy(&c, &c.queues["app"])
            .delay(stitch_core::BuildStatus::Running),
        Duration::from_secs(60),
        "webhooks make polling the slow safety net"
    );
}

#[test]
fn a_gitlab_queue_needs_its_table_and_project() {
    let p = problems("[queues.app]\nrunner = \"gitlab\"\n", &[]);
    assert_eq!(p.len(), 1, "{p:#?}");
    assert_problem(
        &p,
        "queues.app.gitlab",
        "needs a [queues.NAME.gitlab] table with project",
    );

    let p = problems(
        "[queues.app]\nrunner = \"gitlab\"\n[queues.app.gitlab]\nref = \"main\"\n",
        &[("GITLAB_TOKEN", "t")],
    );
    assert_problem(&p, "queues.app.gitlab.project", "missing");

    let p = problems(
        "[queues.app]\nrunner = \"fake\"\n[queues.app.gitlab]\nproject = \"a/b\"\n",
        &[],
    );
    assert_problem(&p, "queues.app.gitlab", "only read by runner = \"gitlab\"");
}

#[test]
fn gitlab_problems_name_their_keys() {
    let p = problems(GITLAB, &[]);
    assert_eq!(p.len(), 1, "{p:#?}");
    assert_problem(
        &p,
        "queues.app.gitlab.token_env",
        "\"GITLAB_TOKEN\" is unset or empty",
    );

    let bad = r#"
[queues.app]
runner = "gitlab"
[queues.app.gitlab]
project = "acme//app"
ref = " "
api_url = "gitlab.example"
token_env = "GL_TOKEN"
trigger_token_env = "GL_TRIGGER"
variables = { STITCH_BUILD_ID = "forged", "DEPLOY-ENV" = "x", DEPLOY = "no" }
rate_limit = { requests = 1, window = "1m" }
request_timeout = "0s"
log_poll = "0s"
max_log_bytes = 0
[queues.app.gitlab.webhook]
secret_env = "GL_HOOK"
poll = "0s"
"#;
    let p = problems(bad, &[("GL_TOKEN", "t"), ("GL_TRIGGER", " ")]);
    assert_problem(
        &p,
        "queues.app.gitlab.project",
        "not a GitLab project id or path",
    );
    assert_problem(&p, "queues.app.gitlab.ref", "must not be empty");
    assert_problem(&p, "queues.app.gitlab.api_url", "http://");
    assert_problem(
        &p,
        "queues.app.gitlab.trigger_token_env",
        "\"GL_TRIGGER\" is unset or empty",
    );
    assert_problem(
        &p,
        "queues.app.gitlab.variables.STITCH_BUILD_ID",
        "stitch's own",
    );
    assert_problem(
        &p,
        "queues.app.gitlab.variables.DEPLOY-ENV",
        "letters, digits and '_'",
    );
    assert_problem(&p, "queues.app.gitlab.rate_limit.requests", "at least 2");
    assert_problem(&p, "queues.app.gitlab.request_timeout", "greater than zero");
    assert_problem(&p, "queues.app.gitlab.log_poll", "greater than zero");
    assert_problem(&p, "queues.app.gitlab.max_log_bytes", "at least 1");
    assert_problem(
        &p,
        "queues.app.gitlab.webhook.secret_env",
        "\"GL_HOOK\" is unset",
    );
    assert_problem(&p, "queues.app.gitlab.webhook.poll", "greater than zero");
    assert!(
        !p.iter().any(|(k, _)| k.ends_with("variables.DEPLOY")),
        "a good variable is no problem: {p:#?}"
    );
    // No secret's value appears in any message.
    assert!(p.iter().all(|(_, m)| !m.contains("forged")), "{p:#?}");

    let typo = format!("{GITLAB}projct = \"x\"\n");
    let p = problems(&typo, &[("GITLAB_TOKEN", "t")]);
    assert_problem(&p, "queues.app.gitlab.projct", "unknown key");
}
