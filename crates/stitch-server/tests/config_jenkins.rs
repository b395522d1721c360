//! `[queues.NAME.jenkins]`: defaults, and every rule of the section with
//! the key it is reported at. Real TOML files; the environment is passed
//! in, never mutated.

use std::time::Duration;

use stitch_server::config::{JenkinsSection, RunnerSection};

mod config_support;

use config_support::{assert_problem, load_text, problems};

const JENKINS: &str = r#"
[queues.app]
runner = "jenkins"
[queues.app.jenkins]
url = "https://ci.example.com/jenkins"
job = "team/app"
user = "stitch-bot"
"#;

const TOKEN: (&str, &str) = ("JENKINS_API_TOKEN", "11aa22bb");

fn jenkins_of(toml: &str) -> JenkinsSection {
    let c = load_text(toml, &[TOKEN]).unwrap_or_else(|e| panic!("{e:?}"));
    match &c.queues["app"].runner {
        RunnerSection::Jenkins(jk) => jk.clone(),
        other => panic!("not a jenkins queue: {other:?}"),
    }
}

#[test]
fn jenkins_section_defaults() {
    let jk = jenkins_of(JENKINS);
    assert_eq!(jk.url, "https://ci.example.com/jenkins");
    assert_eq!(jk.job, "team/app");
    assert_eq!(jk.user, "stitch-bot");
    assert_eq!(jk.token_env, "JENKINS_API_TOKEN");
    assert!(jk.parameters.is_empty());
    assert_eq!(jk.rate_limit.requests, 600);
    assert_eq!(jk.rate_limit.window, Duration::from_secs(60));
    assert_eq!(jk.request_timeout, Duration::from_secs(30));
    assert_eq!(jk.log_poll, Duration::from_secs(2));
    assert_eq!(jk.max_log_bytes, 16 * 1024 * 1024);
    assert_eq!(jk.lookup_depth, 1000);
}

#[test]
fn jenkins_settings_are_read() {
    let jk = jenkins_of(&format!(
        "{JENKINS}token_env = \"JENKINS_API_TOKEN\"\nrequest_timeout = \"5s\"\nlog_poll = \"500ms\"\n\
         lookup_depth = 200\nrate_limit = {{ requests = 60, window = \"10s\" }}\n\
         [queues.app.jenkins.parameters]\nDEPLOY = \"no\"\nNODE_LABEL = \"linux\"\n"
    ));
    assert_eq!(jk.parameters["DEPLOY"], "no");
    assert_eq!(jk.parameters["NODE_LABEL"], "linux");
    assert_eq!(jk.request_timeout, Duration::from_secs(5));
    assert_eq!(jk.log_poll, Duration::from_millis(500));
    assert_eq!(jk.lookup_depth, 200);
    assert_eq!(jk.rate_limit.requests, 60);
}

#[test]
fn a_jenkins_queue_needs_its_table_and_its_keys() {
    let p = problems("[queues.app]\nrunner = \"jenkins\"\n", &[TOKEN]);
    assert_eq!(p.len(), 1, "{p:#?}");
    assert_problem(
        &p,
        "queues.app.jenkins",
        "needs a [queues.NAME.jenkins] table with url, job and user",
    );
    let p = problems(
        "[queues.app]\nrunner = \"jenkins\"\n[queues.app.jenkins]\nurl = \"https://ci\"\n",
        &[TOKEN],
    );
    assert_problem(
        &p,
        "queues.app.jenkins.job",
        "missing; runner \"jenkins\" needs job",
    );
    let p = problems(
        "[queues.app]\nrunner = \"jenkins\"\n[queues.app.jenkins]\nurl = \"https://ci\"\njob = \"app\"\n",
        &[TOKEN],
    );
    assert_problem(
        &p,
        "queues.app.jenkins.user",
        "missing; runner \"jenkins\" needs user",
    );
    let p = problems(&format!("{JENKINS}branch = \"main\"\n"), &[TOKEN]);
    assert_problem(&p, "queues.app.jenkins.branch", "");
    let p = problems(
        "[queues.app]\nrunner = \"fake\"\n[queues.app.jenkins]\nurl = \"https://ci\"\n",
        &[],
    );
    assert_problem(
        &p,
        "queues.app.jenkins",
        "only read by runner = \"jenkins\"",
    );
}

#[test]
fn jenkins_problems_name_their_keys() {
    let p = problems(JENKINS, &[]);
    assert_eq!(p.len(), 1, "{p:#?}");
    assert_problem(
        &p,
        "queues.app.jenkins.token_env",
        "\"JENKINS_API_TOKEN\" is unset or empty",
    );
    let bad = r#"
[queues.app]
runner = "jenkins"
[queues.app.jenkins]
url = "https://admin:hunter2@ci.example.com"
job = "team//app"
user = "a:b"
token_env = "JK_TOKEN"
request_timeout = "0s"
log_poll = "0s"
max_log_bytes = 0
lookup_depth = 0
rate_limit = { requests = 1, window = "1m" }
[queues.app.jenkins.parameters]
STITCH_BUILD_ID = "mine"
"#;
    let p = problems(bad, &[("JK_TOKEN", "t")]);
    assert_problem(&p, "queues.app.jenkins.url", "without credentials");
    assert_problem(&p, "queues.app.jenkins.job", "not a job path");
    assert_problem(&p, "queues.app.jenkins.user", "no ':'");
    assert_problem(
        &p,
        "queues.app.jenkins.request_timeout",
        "greater than zero",
    );
    assert_problem(&p, "queues.app.jenkins.log_poll", "greater than zero");
    assert_problem(&p, "queues.app.jenkins.max_log_bytes", "at least 1");
    assert_problem(&p, "queues.app.jenkins.lookup_depth", "at least 1");
    assert_problem(&p, "queues.app.jenkins.rate_limit.requests", "at least 2");
    assert_problem(
        &p,
        "queues.app.jenkins.parameters.STITCH_BUILD_ID",
        "set by stitch",
    );
    assert_eq!(p.len(), 9, "{p:#?}");
    // No message repeats the password the URL carried.
    assert!(p.iter().all(|(_, m)| !m.contains("hunter2")), "{p:#?}");
    let p = problems(
        &JENKINS.replace("https://ci.example.com/jenkins", "ci.example.com"),
        &[TOKEN],
    );
    assert_problem(&p, "queues.app.jenkins.url", "http:// or https://");
}
