//! `config::load`: layering (defaults → file → `STITCH_*` → CLI), error
//! collection with key paths, and every validation rule. Real TOML files in
//! temporary directories; the environment is passed in, never mutated.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use stitch_server::config::{
    api_tokens, load, render_problems, ApiConfig, BuildkiteSection, Config, FakeSection,
    GithubSection, HttpConfig, LoadOptions, LocalSection, PollConfig, QueueConfig, RetentionConfig,
    RetentionSetting, RetryConfig, RunnerKind, RunnerSection, StorageConfig,
};

mod config_support;

use config_support::{assert_only_problem, assert_problem, ok, problems, setup};

/// The runner sections of a queue, which must have that runner.
#[track_caller]
fn local_of(q: &QueueConfig) -> &LocalSection {
    match &q.runner {
        RunnerSection::Local(local) => local,
        other => panic!("not a local queue: {other:?}"),
    }
}

#[track_caller]
fn buildkite_of(q: &QueueConfig) -> &BuildkiteSection {
    match &q.runner {
        RunnerSection::Buildkite(bk) => bk,
        other => panic!("not a buildkite queue: {other:?}"),
    }
}

#[track_caller]
fn github_of(q: &QueueConfig) -> &GithubSection {
    match &q.runner {
        RunnerSection::Github(gh) => gh,
        other => panic!("not a github queue: {other:?}"),
    }
}

const LOCAL_CI: &str = r#"
[queues.ci]
runner = "local"
[queues.ci.local]
command = "make test"
"#;

// ---------------------------------------------------------------------------
// Defaults and layering

#[test]
fn defaults_without_file_or_env() {
    let config = setup(None, &[]).ok();
    assert_eq!(config, Config::default());
    assert_eq!(
        config.listen,
        "127.0.0.1:7700".parse::<SocketAddr>().unwrap()
    );
    assert_eq!(config.data_dir, PathBuf::from("./stitch-data"));
    assert_eq!(config.queues.keys().collect::<Vec<_>>(), ["default"]);
    assert_eq!(config.queues["default"].runner.kind(), RunnerKind::Fake);
}

#[test]
fn unrelated_stitch_env_vars_are_ignored() {
    let config = setup(
        None,
        &[
            ("STITCH_SERVER", "http://ci.example.com:7700"),
            ("STITCH_TOKEN", "client-secret"),
            ("STITCH_API_TOKEN", "server-secret"),
            ("STITCH_CONFIG", "/etc/stitch.toml"),
            ("STITCH_LOG", "debug"),
            ("STITCH_BUILD_ID", "01J0000000000000000000000"),
            ("STITCH_QUEUE", "ci"),
            ("STITCH_BASE", "[]"),
            ("STITCH_HEAD", "[\"https://example.com/change/1\"]"),
            ("STITCH_METADATA", "{}"),
            ("STITCH_JOB_ID", "7"),
            ("STITCH_JOB_TOKEN", "job-secret"),
            ("STITCH_TEST_DATABASE_URL", "postgres://u:p@localhost/db"),
            ("STITCH_REQUIRE_DATABASES", "1"),
            ("STITCH_LISTEN_ADDR", "0.0.0.0:1"),
            ("PATH", "/usr/bin"),
        ],
    )
    .ok();
    assert_eq!(config, Config::default());
}

#[test]
fn full_file_round_trip() {
    let text = r#"
listen = "127.0.0.1:7701"
data_dir = "./my-data"

[storage]
url = "sqlite://my-data/stitch.db"

[api]
tokens_env = ["MY_API_TOKEN", "MY_OTHER_TOKEN"]
public_url = "http://127.0.0.1:7701"
max_body_bytes = 65536

[queues.default]
runner = "fake"
[queues.default.fake]
accept_delay = "500ms"
run_duration = "3s"
slow_factor = 2

[queues.ci]
runner = "local"
concurrency = 4
fail_fast = true
accepted_timeout = "30m"
max_duration = "2h"
poll = { accepted = "5s", running = "2s" }
retry = { max_attempts = 10, initial = "1s", max = "5m" }
[queues.ci.local]
command = "make test"
workdir = "."
cancel_grace = "15s"
env = { CI = "true", Mixed_Case = "kept" }

[queues.quiet]
runner = "noop"
"#;
    let config = ok(
        text,
        &[("MY_API_TOKEN", "secret-1"), ("MY_OTHER_TOKEN", "secret-2")],
    );

    let mut queues = BTreeMap::new();
    queues.insert(
        "default".to_string(),
        QueueConfig {
            runner: RunnerSection::Fake(FakeSection {
                accept_delay: Duration::from_millis(500),
                run_duration: Duration::from_secs(3),
                slow_factor: 2,
            }),
            ..QueueConfig::default()
        },
    );
    queues.insert(
        "ci".to_string(),
        QueueConfig {
            concurrency: Some(4),
            fail_fast: true,
            accepted_timeout: Some(Duration::from_secs(30 * 60)),
            max_duration: Some(Duration::from_secs(2 * 3600)),
            poll: PollConfig {
                accepted: Duration::from_secs(5),
                running: Duration::from_secs(2),
            },
            retry: RetryConfig {
                max_attempts: 10,
                initial: Duration::from_secs(1),
                max: Duration::from_secs(300),
            },
            runner: RunnerSection::Local(LocalSection {
                command: "make test".into(),
                workdir: Some(PathBuf::from(".")),
                cancel_grace: Duration::from_secs(15),
                env: [("CI", "true"), ("Mixed_Case", "kept")]
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                pass_env: Vec::new(),
                user: None,
                group: None,
            }),
        },
    );
    queues.insert(
        "quiet".to_string(),
        QueueConfig {
            runner: RunnerSection::Noop,
            ..QueueConfig::default()
        },
    );
    let expected = Config {
        listen: "127.0.0.1:7701".parse().unwrap(),
        data_dir: PathBuf::from("./my-data"),
        storage: StorageConfig {
            url: Some("sqlite://my-data/stitch.db".into()),
        },
        cluster: Default::default(),
        api: ApiConfig {
            tokens_env: vec!["MY_API_TOKEN".into(), "MY_OTHER_TOKEN".into()],
            public_url: Some("http://127.0.0.1:7701".into()),
            max_body_bytes: 65536,
        },
        queues,
        webhooks: Default::default(),
        spindle: None,
        http: Default::default(),
        retention: Default::default(),
        telemetry: Default::default(),
    };
    assert_eq!(config, expected);
}

#[test]
fn local_section_defaults() {
    let config = ok(LOCAL_CI, &[]);
    let local = local_of(&config.queues["ci"]).clone();
    assert_eq!(local.workdir, None, "unset: a scratch directory per build");
    assert!(local.pass_env.is_empty());
    assert_eq!((local.user, local.group), (None, None));
    assert_eq!(local.cancel_grace, Duration::from_secs(10));
    assert!(local.env.is_empty());
}

#[test]
fn file_without_queues_keeps_the_builtin_default_queue() {
    let config = ok("listen = \"127.0.0.1:7800\"\n", &[]);
    assert_eq!(config.queues, Config::default().queues);
    assert_eq!(config.listen.port(), 7800);
}

#[test]
fn file_queues_replace_the_builtin_default_queue() {
    let config = ok(LOCAL_CI, &[]);
    assert_eq!(config.queues.keys().collect::<Vec<_>>(), ["ci"]);
}

#[test]
fn env_overrides_the_file() {
    let text = r#"
listen = "127.0.0.1:7701"
data_dir = "./file-data"
[storage]
url = "sqlite://file.db"
[api]
tokens_env = ["FILE_TOKEN"]
[queues.ci]
runner = "local"
concurrency = 2
poll = { accepted = "5s", running = "2s" }
[queues.ci.local]
command = "make test"
"#;
    let config = ok(
        text,
        &[
            ("STITCH_LISTEN", "127.0.0.1:7702"),
            ("STITCH_DATA_DIR", "./env-data"),
            ("STITCH_STORAGE__URL", "sqlite://env.db"),
            ("STITCH_API__TOKENS_ENV", "ENV_TOKEN"),
            ("STITCH_QUEUES__CI__CONCURRENCY", "8"),
            ("STITCH_QUEUES__CI__POLL__RUNNING", "750ms"),
            ("STITCH_QUEUES__CI__FAIL_FAST", "true"),
            ("ENV_TOKEN", "t"),
        ],
    );
    assert_eq!(config.listen.port(), 7702);
    assert_eq!(config.data_dir, PathBuf::from("./env-data"));
    assert_eq!(config.storage.url.as_deref(), Some("sqlite://env.db"));
    assert_eq!(config.api.tokens_env, ["ENV_TOKEN"]);
    let ci = &config.queues["ci"];
    assert_eq!(ci.concurrency, Some(8));
    assert!(ci.fail_fast);
    // Sibling keys the environment did not touch keep the file's values.
    assert_eq!(ci.poll.accepted, Duration::from_secs(5));
    assert_eq!(ci.poll.running, Duration::from_millis(750));
    assert_eq!(local_of(ci).command, "make test");
}

#[test]
fn cli_overrides_win_over_env_and_file() {
    let mut s = setup(
        Some("listen = \"127.0.0.1:7701\"\ndata_dir = \"./file-data\"\n"),
        &[
            ("STITCH_LISTEN", "127.0.0.1:7702"),
            ("STITCH_DATA_DIR", "./env-data"),
        ],
    );
    s.opts.listen = Some("127.0.0.1:7703".parse().unwrap());
    s.opts.data_dir = Some(PathBuf::from("./cli-data"));
    let config = s.ok();
    assert_eq!(config.listen.port(), 7703);
    assert_eq!(config.data_dir, PathBuf::from("./cli-data"));
}

#[test]
fn cli_override_hides_a_bad_value_it_replaces() {
    let mut s = setup(Some("listen = \"not an address\"\n"), &[]);
    assert_only_problem(&s.problems(), "listen", "invalid");
    s.opts.listen = Some("127.0.0.1:7703".parse().unwrap());
    assert_eq!(s.ok().listen.port(), 7703);
}

#[test]
fn env_creates_a_queue_and_overrides_a_queue_key() {
    let text = r#"
[queues.ci]
runner = "local"
[queues.ci.local]
command = "make test"
"#;
    let config = ok(
        text,
        &[
            ("STITCH_QUEUES__CI__LOCAL__COMMAND", "make check"),
            ("STITCH_QUEUES__NIGHTLY__RUNNER", "local"),
            ("STITCH_QUEUES__NIGHTLY__LOCAL__COMMAND", "make nightly"),
            ("STITCH_QUEUES__NIGHTLY__MAX_DURATION", "6h"),
        ],
    );
    assert_eq!(config.queues.keys().collect::<Vec<_>>(), ["ci", "nightly"]);
    assert_eq!(local_of(&config.queues["ci"]).command, "make check");
    let nightly = &config.queues["nightly"];
    assert_eq!(nightly.runner.kind(), RunnerKind::Local);
    assert_eq!(local_of(nightly).command, "make nightly");
    assert_eq!(nightly.max_duration, Some(Duration::from_secs(6 * 3600)));
}

#[test]
fn env_only_queues_replace_the_builtin_default_queue() {
    let config = setup(
        None,
        &[
            ("STITCH_QUEUES__CI__RUNNER", "local"),
            ("STITCH_QUEUES__CI__LOCAL__COMMAND", "make test"),
        ],
    )
    .ok();
    assert_eq!(config.queues.keys().collect::<Vec<_>>(), ["ci"]);

    // Overriding the built-in queue by name keeps it (with the override).
    let config = setup(None, &[("STITCH_QUEUES__DEFAULT__CONCURRENCY", "3")]).ok();
    assert_eq!(config.queues.keys().collect::<Vec<_>>(), ["default"]);
    assert_eq!(config.queues["default"].runner.kind(), RunnerKind::Fake);
    assert_eq!(config.queues["default"].concurrency, Some(3));
}

#[test]
fn env_keys_are_lower_cased_and_may_contain_dots() {
    let config = setup(None, &[("STITCH_QUEUES__TEAM.APP__RUNNER", "noop")]).ok();
    assert_eq!(config.queues.keys().collect::<Vec<_>>(), ["team.app"]);
    assert_eq!(config.queues["team.app"].runner.kind(), RunnerKind::Noop);
}

#[test]
fn env_values_of_string_keys_are_verbatim() {
    let config = ok(
        LOCAL_CI,
        &[
            (
                "STITCH_QUEUES__CI__LOCAL__COMMAND",
                "[ -f Makefile ] && make, or not",
            ),
            ("STITCH_QUEUES__CI__LOCAL__WORKDIR", "true"),
            ("STITCH_STORAGE__URL", "sqlite://a,b.db"),
        ],
    );
    let local = local_of(&config.queues["ci"]).clone();
    assert_eq!(local.command, "[ -f Makefile ] && make, or not");
    assert_eq!(local.workdir, Some(PathBuf::from("true")));
    assert_eq!(config.storage.url.as_deref(), Some("sqlite://a,b.db"));
}

#[test]
fn env_values_of_runner_keys_take_the_type_of_their_key() {
    let c = ok(
        BUILDKITE,
        &[
            ("BK_TOKEN", "t"),
            ("STITCH_QUEUES__APP__BUILDKITE__MAX_LOG_BYTES", "1024"),
            ("STITCH_QUEUES__APP__BUILDKITE__ALLOW_REF_OVERRIDE", "true"),
            ("STITCH_QUEUES__APP__BUILDKITE__RATE_LIMIT__REQUESTS", "50"),
            ("STITCH_QUEUES__APP__BUILDKITE__RATE_LIMIT__WINDOW", "30s"),
            ("STITCH_QUEUES__APP__BUILDKITE__BRANCH", "123"),
            ("STITCH_QUEUES__APP__BUILDKITE__COMMIT", "\"abc\""),
        ],
    );
    let bk = buildkite_of(&c.queues["app"]);
    assert_eq!(bk.max_log_bytes, 1024);
    assert!(bk.allow_ref_override);
    assert_eq!(bk.rate_limit.requests, 50);
    assert_eq!(bk.rate_limit.window, Duration::from_secs(30));
    assert_eq!(bk.branch, "123", "a number for a string key is its text");
    assert_eq!(bk.commit, "\"abc\"", "quotes of a string key are kept");

    let c = ok(
        LOCAL_CI,
        &[
            ("STITCH_QUEUES__CI__LOCAL__ENV__N", "1"),
            ("STITCH_QUEUES__CI__LOCAL__CANCEL_GRACE", "3s"),
        ],
    );
    let local = local_of(&c.queues["ci"]);
    // Variable names are read in lower case.
    assert_eq!(local.env["n"], "1");
    assert_eq!(local.cancel_grace, Duration::from_secs(3));
}

#[test]
fn runner_keys_of_the_wrong_type_are_all_reported_with_their_source() {
    let p = problems(
        &format!(
            "{BUILDKITE}max_log_bytes = \"lots\"\nrequest_timeout = 5\n\
             [queues.ci]\nrunner = \"local\"\n[queues.ci.local]\ncommand = 5\n"
        ),
        &[
            ("BK_TOKEN", "t"),
            ("STITCH_QUEUES__APP__BUILDKITE__ALLOW_REF_OVERRIDE", "maybe"),
        ],
    );
    assert_problem(
        &p,
        "queues.app.buildkite.max_log_bytes",
        "expected u64, found string \"lots\"",
    );
    assert_problem(
        &p,
        "queues.app.buildkite.request_timeout",
        "durations are strings like",
    );
    assert_problem(
        &p,
        "queues.app.buildkite.allow_ref_override",
        "expected a boolean, found string \"maybe\" (set by STITCH_QUEUES__APP__BUILDKITE__ALLOW_REF_OVERRIDE)",
    );
    assert_problem(&p, "queues.ci.local.command", "expected a string");
    assert_eq!(p.len(), 4, "{p:#?}");
}

#[test]
fn unknown_runner_kind_from_the_environment_names_the_variable() {
    let p = setup(None, &[("STITCH_QUEUES__CI__RUNNER", "travis")]).problems();
    assert_only_problem(
        &p,
        "queues.ci.runner",
        "unknown value \"travis\"; expected one of: noop, fake, local, buildkite, github, \
         gitlab, jenkins (set by STITCH_QUEUES__CI__RUNNER)",
    );
}

#[test]
fn a_queue_without_its_runner_table_is_still_checked_whole() {
    let p = problems(
        "[queues.ci]\nrunner = \"github\"\nconcurrency = 0\n\
         [queues.ci.buildkite]\norg = \"acme\"\npipeline = \"app\"\n",
        &[],
    );
    assert_problem(&p, "queues.ci.github", "needs a [queues.NAME.github] table");
    assert_problem(
        &p,
        "queues.ci.buildkite",
        "only read by runner = \"buildkite\"",
    );
    assert_problem(&p, "queues.ci.concurrency", "at least 1");
    assert_eq!(p.len(), 3, "{p:#?}");
    // The same when extraction drops the runner's table for a missing key.
    let p = problems(
        "[queues.ci]\nrunner = \"local\"\nconcurrency = 0\n[queues.ci.local]\nworkdir = \"src\"\n",
        &[],
    );
    assert_problem(&p, "queues.ci.local.command", "missing");
    assert_problem(&p, "queues.ci.concurrency", "at least 1");
    assert_eq!(p.len(), 2, "{p:#?}");
}

#[test]
fn env_tokens_env_accepts_a_comma_list_or_an_array() {
    let env = [("A_TOKEN", "a"), ("B_TOKEN", "b")];
    for value in [
        "A_TOKEN,B_TOKEN",
        " A_TOKEN , B_TOKEN ",
        "[\"A_TOKEN\", \"B_TOKEN\"]",
        "[A_TOKEN, B_TOKEN]",
    ] {
        let mut vars = env.to_vec();
        vars.push(("STITCH_API__TOKENS_ENV", value));
        let config = setup(None, &vars).ok();
        assert_eq!(config.api.tokens_env, ["A_TOKEN", "B_TOKEN"], "{value}");
    }
}

#[test]
fn env_inline_table_and_specific_variable_combine() {
    let config = setup(
        None,
        &[
            (
                "STITCH_QUEUES__CI",
                "{ runner = \"local\", concurrency = 2 }",
            ),
            ("STITCH_QUEUES__CI__LOCAL__COMMAND", "make"),
            ("STITCH_QUEUES__CI__CONCURRENCY", "5"),
        ],
    )
    .ok();
    let ci = &config.queues["ci"];
    assert_eq!(ci.runner.kind(), RunnerKind::Local);
    assert_eq!(ci.concurrency, Some(5));
}

#[test]
fn empty_env_values_count_as_unset() {
    let config = ok(
        "[storage]\nurl = \"sqlite://file.db\"\n",
        &[("STITCH_STORAGE__URL", ""), ("STITCH_LISTEN", "")],
    );
    assert_eq!(config.storage.url.as_deref(), Some("sqlite://file.db"));
    assert_eq!(config.listen, Config::default().listen);
}

// ---------------------------------------------------------------------------
// Errors from reading: files, unknown keys, types

#[test]
fn missing_file_is_an_error_naming_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nope.toml");
    let err = load(&LoadOptions {
        file: Some(path.clone()),
        env: Some(BTreeMap::new()),
        ..LoadOptions::default()
    })
    .unwrap_err();
    assert_eq!(err.problems.len(), 1);
    assert_eq!(err.problems[0].key, path.display().to_string());
    assert!(err.problems[0].message.contains("cannot read"), "{err}");
    assert!(render_problems(&err).contains("nope.toml"));
}

#[test]
fn invalid_toml_reports_the_position() {
    let p = problems(
        "listen = \"127.0.0.1:7700\"\n[queues.ci\nrunner = \"local\"\n",
        &[],
    );
    assert_eq!(p.len(), 1, "{p:#?}");
    assert!(p[0].0.ends_with("stitch.toml"), "{p:#?}");
    assert!(p[0].1.starts_with("not valid TOML at line 2"), "{p:#?}");
    assert!(!p[0].1.contains('\n'));
}

#[test]
fn unknown_keys_in_the_file_are_errors_naming_the_key_path() {
    let p = problems(
        r#"
webhooks = { gitlab = { mode = "token" } }
spindel = true
[storage]
path = "x.db"
[queues.ci]
runner = "local"
concurency = 4
poll = { accepted = "5s", runing = "2s" }
[queues.ci.local]
command = "make"
comand = "make"
"#,
        &[],
    );
    assert_problem(
        &p,
        "spindel",
        "unknown key; expected one of: listen, data_dir, storage, cluster, api, queues, webhooks",
    );
    assert_problem(
        &p,
        "webhooks.gitlab",
        "unknown key; expected one of: github",
    );
    assert_problem(&p, "storage.path", "unknown key");
    assert_problem(
        &p,
        "queues.ci.concurency",
        "unknown key; expected one of: runner, concurrency",
    );
    assert_problem(&p, "queues.ci.poll.runing", "unknown key");
    assert_problem(&p, "queues.ci.local.comand", "unknown key");
    assert_eq!(p.len(), 6, "{p:#?}");
}

#[test]
fn unknown_key_from_env_names_the_variable() {
    let p = setup(None, &[("STITCH_QUEUES__DEFAULT__CONCURENCY", "4")]).problems();
    assert_only_problem(
        &p,
        "queues.default.concurency",
        "(set by STITCH_QUEUES__DEFAULT__CONCURENCY)",
    );
    let p = setup(None, &[("STITCH_API__TOKEN_ENV", "X")]).problems();
    assert_only_problem(&p, "api.token_env", "unknown key");
}

#[test]
fn type_errors_name_the_key_path() {
    let p = problems(
        r#"
listen = 7700
[api]
max_body_bytes = "big"
tokens_env = ["A_TOKEN", 5]
[queues.ci]
runner = "local"
concurrency = -1
fail_fast = "yes"
[queues.ci.local]
command = "make"
"#,
        &[("A_TOKEN", "a")],
    );
    assert_problem(
        &p,
        "listen",
        "expected socket address, found signed int `7700`",
    );
    assert_problem(&p, "api.max_body_bytes", "expected usize");
    assert_problem(&p, "api.tokens_env[1]", "expected a string");
    assert_problem(&p, "queues.ci.concurrency", "expected u32");
    assert_problem(&p, "queues.ci.fail_fast", "expected a boolean");
    assert_eq!(p.len(), 5, "{p:#?}");
}

#[test]
fn type_error_from_env_names_the_variable() {
    let p = setup(None, &[("STITCH_QUEUES__DEFAULT__CONCURRENCY", "lots")]).problems();
    assert_only_problem(&p, "queues.default.concurrency", "expected u32");
    assert!(
        p[0].1
            .ends_with("(set by STITCH_QUEUES__DEFAULT__CONCURRENCY)"),
        "{p:#?}"
    );
}

#[test]
fn bad_duration_strings() {
    let p = problems(
        r#"
[queues.ci]
runner = "local"
accepted_timeout = "5 parsecs"
max_duration = 30
poll = { accepted = "fast" }
[queues.ci.local]
command = "make"
cancel_grace = "10"
"#,
        &[],
    );
    assert_problem(
        &p,
        "queues.ci.accepted_timeout",
        "invalid duration \"5 parsecs\": unknown time unit \"parsecs\"",
    );
    assert_problem(
        &p,
        "queues.ci.accepted_timeout",
        "\"500ms\", \"5s\", \"30m\", \"2h\"",
    );
    assert_problem(&p, "queues.ci.max_duration", "expected a duration");
    assert_problem(&p, "queues.ci.poll.accepted", "invalid duration");
    assert_problem(&p, "queues.ci.local.cancel_grace", "invalid duration");
    assert_eq!(p.len(), 4, "{p:#?}");
}

#[test]
fn unknown_runner_does_not_cascade() {
    let p = problems(
        "[queues.ci]\nrunner = \"docker\"\n[queues.ci.local]\ncommand = \"make\"\n",
        &[],
    );
    // Not also "table [queues.ci.local] is only read by runner = local".
    assert_only_problem(
        &p,
        "queues.ci.runner",
        "unknown value \"docker\"; expected one of: noop, fake, local",
    );
}

#[test]
fn several_problems_are_reported_at_once() {
    let p = problems(
        r#"
listen = "0.0.0.0:7700"
colour = "blue"
[storage]
url = "redis://stitch:hunter2@db/0"
[api]
max_body_bytes = 0
[queues.ci]
runner = "local"
concurrency = 0
accepted_timeout = "soon"
retry = { max_attempts = 0 }
[queues.nightly]
runner = "local"
"#,
        &[],
    );
    assert_problem(&p, "colour", "unknown key");
    assert_problem(&p, "listen", "not a loopback address");
    assert_problem(&p, "storage.url", "unsupported storage url");
    assert_problem(&p, "api.max_body_bytes", "at least 1");
    assert_problem(&p, "queues.ci.concurrency", "at least 1");
    assert_problem(&p, "queues.ci.accepted_timeout", "invalid duration");
    assert_problem(&p, "queues.ci.retry.max_attempts", "at least 1");
    assert_problem(&p, "queues.ci.local.command", "missing");
    assert_problem(&p, "queues.nightly.local.command", "missing");
    assert_eq!(p.len(), 9, "{p:#?}");
    // Sorted by key path.
    let keys: Vec<&str> = p.iter().map(|(k, _)| k.as_str()).collect();
    let mut sorted = keys.clone();
    sorted.sort();
    assert_eq!(keys, sorted);
}

// ---------------------------------------------------------------------------
// Validation rules, one by one

#[test]
fn invalid_queue_names() {
    let p = problems(
        "[queues.\"team/app\"]\nrunner = \"noop\"\n[queues.\"\"]\n",
        &[],
    );
    assert_problem(&p, "queues.\"team/app\"", "contains '/'");
    assert_problem(&p, "queues.\"\"", "empty");
    assert_eq!(p.len(), 2, "{p:#?}");
}

#[test]
fn local_runner_without_a_local_table() {
    let p = problems("[queues.ci]\nrunner = \"local\"\n", &[]);
    assert_only_problem(
        &p,
        "queues.ci.local.command",
        "missing; runner \"local\" needs a command",
    );
}

#[test]
fn local_table_without_a_command() {
    let p = problems(
        "[queues.ci]\nrunner = \"local\"\n[queues.ci.local]\nworkdir = \"src\"\n",
        &[],
    );
    assert_only_problem(
        &p,
        "queues.ci.local.command",
        "missing; runner \"local\" needs a command",
    );
}

#[test]
fn local_runner_with_an_empty_command() {
    let p = problems(
        "[queues.ci]\nrunner = \"local\"\n[queues.ci.local]\ncommand = \"  \"\n",
        &[],
    );
    assert_only_problem(
        &p,
        "queues.ci.local.command",
        "empty; runner \"local\" needs a command",
    );
}

#[test]
fn local_table_on_a_non_local_queue() {
    let p = problems(
        "[queues.ci]\nrunner = \"fake\"\n[queues.ci.local]\ncommand = \"make\"\n",
        &[],
    );
    assert_only_problem(
        &p,
        "queues.ci.local",
        "table [queues.ci.local] is only read by runner = \"local\" (this queue has runner = \"fake\")",
    );
}

#[test]
fn fake_table_on_a_non_fake_queue() {
    let p = problems(
        "[queues.ci]\nrunner = \"local\"\n[queues.ci.local]\ncommand = \"make\"\n[queues.ci.fake]\nslow_factor = 2\n",
        &[],
    );
    assert_only_problem(&p, "queues.ci.fake", "only read by runner = \"fake\"");
}

#[test]
fn fake_settings_use_the_fake_runner_rules() {
    let p = problems(
        "[queues.q.fake]\nslow_factor = 0\naccept_delay = \"31days\"\nrun_duration = \"40days\"\n",
        &[],
    );
    assert_problem(&p, "queues.q.fake.slow_factor", "at least 1");
    assert_problem(&p, "queues.q.fake.accept_delay", "at most 30 days");
    assert_problem(&p, "queues.q.fake.run_duration", "at most 30 days");
    assert_eq!(p.len(), 3, "{p:#?}");
}

#[test]
fn local_env_uses_the_local_runner_rules() {
    let p = problems(
        r#"
[queues.ci]
runner = "local"
[queues.ci.local]
command = "make"
env = { STITCH_BUILD_ID = "x", "A=B" = "y", OK = "fine" }
"#,
        &[],
    );
    assert_problem(
        &p,
        "queues.ci.local.env.STITCH_BUILD_ID",
        "which the local runner sets",
    );
    assert_problem(&p, "queues.ci.local.env.\"A=B\"", "invalid variable name");
    assert_eq!(p.len(), 2, "{p:#?}");
}

#[test]
fn example_config_in_the_repository_is_valid() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/local.toml");
    if !path.exists() {
        return;
    }
    let config = load(&LoadOptions {
        file: Some(path),
        env: Some(BTreeMap::new()),
        ..LoadOptions::default()
    })
    .unwrap_or_else(|e| panic!("{}", render_problems(&e)));
    assert!(config.queues.contains_key("ci"));
}

#[test]
fn toml_examples_in_the_docs_are_valid() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../docs/configuration.md");
    let Ok(doc) = std::fs::read_to_string(&path) else {
        return;
    };
    let blocks: Vec<&str> = doc
        .split("```toml\n")
        .skip(1)
        .map(|rest| rest.split("```").next().unwrap_or_default())
        .collect();
    assert!(blocks.len() >= 2, "no TOML examples in {}", path.display());
    for block in blocks {
        setup(Some(block), &[("STITCH_API_TOKEN", "t")]).ok();
    }
}

#[test]
fn zero_poll_delays() {
    let p = problems(
        "[queues.q]\npoll = { accepted = \"0s\", running = \"0ms\" }\n",
        &[],
    );
    assert_problem(&p, "queues.q.poll.accepted", "greater than zero");
    assert_problem(&p, "queues.q.poll.running", "greater than zero");
    assert_eq!(p.len(), 2, "{p:#?}");
}

#[test]
fn retry_max_attempts_zero() {
    let p = problems("[queues.q]\nretry = { max_attempts = 0 }\n", &[]);
    assert_only_problem(&p, "queues.q.retry.max_attempts", "at least 1");
}

#[test]
fn retry_initial_longer_than_max() {
    let p = problems(
        "[queues.q]\nretry = { initial = \"1m\", max = \"30s\" }\n",
        &[],
    );
    assert_only_problem(
        &p,
        "queues.q.retry.initial",
        "1m is longer than retry.max (30s)",
    );
}

#[test]
fn retry_initial_zero() {
    let p = problems("[queues.q]\nretry = { initial = \"0s\" }\n", &[]);
    assert_only_problem(&p, "queues.q.retry.initial", "greater than zero");
}

#[test]
fn zero_deadlines() {
    let p = problems(
        "[queues.q]\naccepted_timeout = \"0s\"\nmax_duration = \"0m\"\n",
        &[],
    );
    assert_problem(&p, "queues.q.accepted_timeout", "greater than zero");
    assert_problem(&p, "queues.q.max_duration", "greater than zero");
    assert_eq!(p.len(), 2, "{p:#?}");
}

#[test]
fn zero_concurrency() {
    let p = problems("[queues.q]\nconcurrency = 0\n", &[]);
    assert_only_problem(&p, "queues.q.concurrency", "at least 1");
}

#[test]
fn zero_max_body_bytes() {
    let p = problems("[api]\nmax_body_bytes = 0\n", &[]);
    assert_only_problem(&p, "api.max_body_bytes", "at least 1");
}

#[test]
fn tokens_env_naming_unset_or_empty_variables() {
    let p = problems(
        "[api]\ntokens_env = [\"SET_TOKEN\", \"UNSET_TOKEN\", \"EMPTY_TOKEN\"]\n",
        &[("SET_TOKEN", "s3cret"), ("EMPTY_TOKEN", " ")],
    );
    assert_problem(
        &p,
        "api.tokens_env[1]",
        "environment variable \"UNSET_TOKEN\" is unset or empty",
    );
    assert_problem(
        &p,
        "api.tokens_env[2]",
        "environment variable \"EMPTY_TOKEN\" is unset or empty",
    );
    assert_eq!(p.len(), 2, "{p:#?}");
    assert!(!p.iter().any(|(_, m)| m.contains("s3cret")));
}

#[test]
fn storage_url_names_sqlite_postgres_or_mysql() {
    for (url, fragment) in [
        (
            "redis://stitch:hunter2@db/0",
            "unsupported storage url; use sqlite://PATH, postgres://… or mysql://…",
        ),
        ("/var/lib/stitch.db", "unsupported storage url"),
        ("sqlite://", "needs a path"),
        ("postgres://", "needs a host and database"),
        ("mysql://", "needs a host and database"),
    ] {
        let p = problems(&format!("[storage]\nurl = {url:?}\n"), &[]);
        assert_only_problem(&p, "storage.url", fragment);
        assert!(!p[0].1.contains("hunter2"), "password echoed: {p:#?}");
    }
    for url in [
        "sqlite://x/stitch.db",
        "postgres://stitch:hunter2@db/stitch",
        "postgresql://db/stitch?options=-csearch_path%3Dci",
        "mysql://root:hunter2@db/stitch",
        "mariadb://root@db/stitch",
    ] {
        assert_eq!(
            ok(&format!("[storage]\nurl = {url:?}\n"), &[])
                .storage
                .url
                .as_deref(),
            Some(url)
        );
    }
}

#[test]
fn non_loopback_listen_needs_tokens() {
    let p = problems("listen = \"0.0.0.0:7700\"\n", &[]);
    assert_only_problem(&p, "listen", "0.0.0.0:7700 is not a loopback address");
    let config = ok(
        "listen = \"0.0.0.0:7700\"\n[api]\ntokens_env = [\"API_TOKEN\"]\n",
        &[("API_TOKEN", "t")],
    );
    assert_eq!(config.listen.port(), 7700);
    ok("listen = \"[::1]:7700\"\n", &[]);

    let mut s = setup(None, &[]);
    s.opts.listen = Some("0.0.0.0:7700".parse().unwrap());
    assert_only_problem(&s.problems(), "listen", "(set by --listen)");
}

#[test]
fn public_url_must_be_http() {
    let p = problems("[api]\npublic_url = \"ci.example.com:7700\"\n", &[]);
    assert_only_problem(&p, "api.public_url", "http:// or https://");
}

#[test]
fn empty_queue_table_is_an_error() {
    let p = problems("[queues]\n", &[]);
    assert_only_problem(&p, "queues", "no queues defined");
}

#[test]
fn empty_data_dir_is_an_error() {
    let p = problems("data_dir = \"\"\n", &[]);
    assert_only_problem(&p, "data_dir", "must not be empty");
}

// ---------------------------------------------------------------------------
// Rendering and tokens

#[test]
fn render_problems_prints_one_line_per_problem() {
    let err = setup(
        Some("[queues.ci]\nrunner = \"local\"\npoll = { running = \"0s\" }\n"),
        &[],
    )
    .load()
    .unwrap_err();
    assert_eq!(
        render_problems(&err),
        "queues.ci.local.command: missing; runner \"local\" needs a command\n\
         queues.ci.poll.running: must be greater than zero"
    );
    assert!(err
        .to_string()
        .starts_with("invalid configuration: queues.ci.local.command: missing"));
}

#[test]
fn api_tokens_resolves_variable_names() {
    let config = ok(
        "[api]\ntokens_env = [\"A_TOKEN\", \"B_TOKEN\"]\n",
        &[("A_TOKEN", "a"), ("B_TOKEN", " b\n")],
    );
    let env: BTreeMap<&str, &str> = [("A_TOKEN", "a"), ("B_TOKEN", " b\n")]
        .into_iter()
        .collect();
    assert_eq!(
        api_tokens(&config, |k| env.get(k).map(|v| v.to_string())),
        ["a", "b"]
    );
    // Unset at runtime: skipped, not an empty token.
    assert_eq!(
        api_tokens(&config, |k| (k == "B_TOKEN").then(|| "b".to_string())),
        ["b"]
    );
    assert!(api_tokens(&Config::default(), |_| Some("x".into())).is_empty());

    let s = setup(None, &[("A_TOKEN", "from-options")]);
    assert_eq!(s.opts.env_var("A_TOKEN").as_deref(), Some("from-options"));
}

const BUILDKITE: &str = r#"
[queues.app]
runner = "buildkite"
[queues.app.buildkite]
org = "acme"
pipeline = "app-ci"
token_env = "BK_TOKEN"
"#;

#[test]
fn buildkite_section_defaults() {
    let c = ok(BUILDKITE, &[("BK_TOKEN", "t")]);
    let bk = buildkite_of(&c.queues["app"]).clone();
    assert_eq!(bk.branch, "main");
    assert_eq!(bk.commit, "HEAD");
    assert!(!bk.allow_ref_override);
    assert_eq!(bk.api_url, "https://api.buildkite.com");
    assert_eq!(bk.rate_limit.requests, 200);
    assert_eq!(bk.rate_limit.window, Duration::from_secs(60));
    assert_eq!(bk.max_log_bytes, 16 * 1024 * 1024);
    assert!(bk.webhook.is_none());
    let with_hook =
        format!("{BUILDKITE}[queues.app.buildkite.webhook]\nsecret_env = \"BK_HOOK\"\n");
    let c = ok(&with_hook, &[("BK_TOKEN", "t"), ("BK_HOOK", "s")]);
    let w = buildkite_of(&c.queues["app"]).clone().webhook.unwrap();
    assert_eq!(w.mode, stitch_server::config::WebhookModeName::Signature);
    assert_eq!(w.max_age, Duration::from_secs(300));
    assert_eq!(w.poll, Duration::from_secs(60));
    assert_eq!(
        stitch_server::runners::poll_policy(&c, &c.queues["app"])
            .delay(stitch_core::BuildStatus::Running),
        Duration::from_secs(60),
        "webhooks make polling the slow safety net"
    );
}

#[test]
fn buildkite_problems_name_their_keys() {
    let p = problems(BUILDKITE, &[]);
    assert_only_problem(
        &p,
        "queues.app.buildkite.token_env",
        "\"BK_TOKEN\" is unset or empty",
    );

    let p = problems("[queues.app]\nrunner = \"buildkite\"\n", &[]);
    assert_only_problem(
        &p,
        "queues.app.buildkite",
        "needs a [queues.NAME.buildkite] table",
    );

    let p = problems(
        "[queues.app]\nrunner = \"buildkite\"\n[queues.app.buildkite]\norg = \"acme\"\n",
        &[],
    );
    assert_problem(&p, "queues.app.buildkite.pipeline", "missing");

    let bad = r#"
[queues.app]
runner = "buildkite"
[queues.app.buildkite]
org = "acme corp"
pipeline = ""
token_env = "BK_TOKEN"
api_url = "ftp://x"
rate_limit = { requests = 1, window = "1m" }
request_timeout = "0s"
max_log_bytes = 0
[queues.app.buildkite.webhook]
mode = "hmac"
secret_env = "BK_HOOK"
"#;
    let p = problems(bad, &[("BK_TOKEN", "t")]);
    assert_problem(
        &p,
        "queues.app.buildkite.webhook.mode",
        "unknown value \"hmac\"",
    );
    let fixed = bad.replace("mode = \"hmac\"\n", "max_age = \"0s\"\n");
    let p = problems(&fixed, &[("BK_TOKEN", "t")]);
    assert_problem(&p, "queues.app.buildkite.org", "not a Buildkite slug");
    assert_problem(&p, "queues.app.buildkite.pipeline", "not a Buildkite slug");
    assert_problem(&p, "queues.app.buildkite.api_url", "http://");
    assert_problem(&p, "queues.app.buildkite.rate_limit.requests", "at least 2");
    assert_problem(
        &p,
        "queues.app.buildkite.request_timeout",
        "greater than zero",
    );
    assert_problem(&p, "queues.app.buildkite.max_log_bytes", "at least 1");
    assert_problem(
        &p,
        "queues.app.buildkite.webhook.secret_env",
        "\"BK_HOOK\" is unset",
    );
    assert_problem(
        &p,
        "queues.app.buildkite.webhook.max_age",
        "greater than zero",
    );

    let wrong_runner = format!(
        "{}\n",
        BUILDKITE.replace("runner = \"buildkite\"", "runner = \"fake\"")
    );
    let p = problems(&wrong_runner, &[("BK_TOKEN", "t")]);
    assert_only_problem(
        &p,
        "queues.app.buildkite",
        "only read by runner = \"buildkite\"",
    );
}

// ---------------------------------------------------------------------------
// [spindle]

const SPINDLE: &str = r#"
[spindle]
hostname = "spindle.example.com"
owner = "did:plc:abc123"
default_queue = "default"
"#;

#[test]
fn spindle_section_parses_with_defaults() {
    let config = ok(SPINDLE, &[]);
    let s = config.spindle.expect("spindle section");
    assert_eq!(s.hostname, "spindle.example.com");
    assert_eq!(s.owner, "did:plc:abc123");
    assert_eq!(s.default_queue, "default");
    assert_eq!(
        s.jetstream_url,
        "wss://jetstream1.us-west.bsky.network/subscribe"
    );
    assert_eq!(s.plc_url, "https://plc.directory");
    assert!(!s.dev);
    assert!(ok("", &[]).spindle.is_none());
}

#[test]
fn spindle_env_overrides_are_verbatim_strings() {
    let config = ok(
        SPINDLE,
        &[
            ("STITCH_SPINDLE__HOSTNAME", "ci.example.org"),
            ("STITCH_SPINDLE__DEV", "true"),
        ],
    );
    let s = config.spindle.unwrap();
    assert_eq!(s.hostname, "ci.example.org");
    assert!(s.dev);
}

#[test]
fn spindle_problems_name_their_keys() {
    let p = problems(
        r#"
[spindle]
hostname = "https://spindle.example.com/"
owner = "alice"
default_queue = "nope"
jetstream_url = "https://jetstream.example.com"
plc_url = "plc.directory"
colour = "blue"
"#,
        &[],
    );
    assert_problem(&p, "spindle.hostname", "bare hostname");
    assert_problem(&p, "spindle.owner", "DID");
    assert_problem(&p, "spindle.default_queue", "not a configured queue");
    assert_problem(&p, "spindle.jetstream_url", "ws://");
    assert_problem(&p, "spindle.plc_url", "http://");
    assert_problem(&p, "spindle.colour", "");
    let p = problems("[spindle]\nhostname = \"x.test\"\n", &[]);
    assert_problem(&p, "spindle.owner", "");
}

// ---------------------------------------------------------------------------
// GitHub Actions

const GITHUB: &str = r#"
[queues.gh]
runner = "github"
[queues.gh.github]
owner = "acme"
repo = "app"
workflow = "stitch.yml"
token_env = "GH_TOKEN"
"#;

#[test]
fn github_section_defaults_and_webhook_poll() {
    let c = ok(GITHUB, &[("GH_TOKEN", "t")]);
    let gh = github_of(&c.queues["gh"]).clone();
    assert_eq!(gh.git_ref, "main");
    assert_eq!(gh.api_url, "https://api.github.com");
    assert_eq!(gh.api_version, "2022-11-28");
    assert_eq!(gh.max_inputs, 25);
    assert_eq!(gh.rate_limit.requests, 5000);
    assert_eq!(gh.rate_limit.window, Duration::from_secs(3600));
    assert!(c.webhooks.github.is_none());
    let with_hook = format!(
        "{GITHUB}ref = \"release\"\ninputs = {{ environment = \"staging\" }}\n\
         [webhooks.github]\nsecret_env = \"GH_HOOK\"\npoll = \"2m\"\n"
    );
    let c = ok(&with_hook, &[("GH_TOKEN", "t"), ("GH_HOOK", "s")]);
    let gh = github_of(&c.queues["gh"]).clone();
    assert_eq!(gh.git_ref, "release");
    assert_eq!(gh.inputs["environment"], "staging");
    let w = c.webhooks.github.unwrap();
    assert_eq!(w.secret_env, "GH_HOOK");
    assert_eq!(w.poll, Duration::from_secs(120));
    // Environment overrides reach the new keys as strings.
    let c = ok(
        GITHUB,
        &[
            ("GH_TOKEN", "t"),
            ("STITCH_QUEUES__GH__GITHUB__REF", "v1.2"),
            ("STITCH_QUEUES__GH__GITHUB__INPUTS__LEVEL", "3"),
        ],
    );
    let gh = github_of(&c.queues["gh"]).clone();
    assert_eq!(gh.git_ref, "v1.2");
    assert_eq!(gh.inputs["level"], "3");
}

#[test]
fn github_problems_name_their_keys() {
    let p = problems(GITHUB, &[]);
    assert_only_problem(
        &p,
        "queues.gh.github.token_env",
        "\"GH_TOKEN\" is unset or empty",
    );

    let p = problems("[queues.gh]\nrunner = \"github\"\n", &[]);
    assert_only_problem(&p, "queues.gh.github", "needs a [queues.NAME.github] table");

    let p = problems(
        "[queues.gh]\nrunner = \"github\"\n[queues.gh.github]\nowner = \"acme\"\nrepo = \"app\"\n",
        &[],
    );
    assert_problem(
        &p,
        "queues.gh.github.workflow",
        "missing; runner \"github\" needs workflow",
    );

    let both = format!("{GITHUB}app_id = \"1\"\n");
    let p = problems(&both, &[("GH_TOKEN", "t")]);
    assert_only_problem(&p, "queues.gh.github.token_env", "not both");

    let partial_app = GITHUB.replace(
        "token_env = \"GH_TOKEN\"",
        "app_id = \"1\"\ninstallation_id = 7",
    );
    let p = problems(&partial_app, &[]);
    assert_only_problem(
        &p,
        "queues.gh.github.private_key_file",
        "a GitHub App needs",
    );

    let none = GITHUB.replace("token_env = \"GH_TOKEN\"\n", "");
    let p = problems(&none, &[]);
    assert_only_problem(
        &p,
        "queues.gh.github.token_env",
        "missing; set token_env, or app_id",
    );

    let bad = format!(
        "{}\n",
        GITHUB
            .replace(
                "workflow = \"stitch.yml\"",
                "workflow = \".github/workflows/stitch.yml\"\n\
             api_url = \"ftp://x\"\napi_version = \"latest\"\nmax_inputs = 6\n\
             inputs = { a = \"1\", b = \"2\" }\nrequest_timeout = \"0s\"\n\
             app_id = \"1\"\nprivate_key_file = \"/nonexistent/key.pem\"\ninstallation_id = 7"
            )
            .replace("owner = \"acme\"", "owner = \"acme corp\"")
            .replace("token_env = \"GH_TOKEN\"\n", "")
    );
    let p = problems(
        &format!("{bad}[webhooks.github]\nsecret_env = \"GH_HOOK\"\n"),
        &[],
    );
    assert_problem(&p, "queues.gh.github.owner", "not a GitHub name");
    assert_problem(&p, "queues.gh.github.workflow", "file name");
    assert_problem(&p, "queues.gh.github.api_url", "http://");
    assert_problem(
        &p,
        "queues.gh.github.api_version",
        "not a GitHub API version",
    );
    assert_problem(&p, "queues.gh.github.inputs", "exceed GitHub's limit of 6");
    assert_problem(&p, "queues.gh.github.request_timeout", "greater than zero");
    assert_problem(
        &p,
        "queues.gh.github.private_key_file",
        "cannot read /nonexistent/key.pem",
    );
    assert_problem(&p, "webhooks.github.secret_env", "\"GH_HOOK\" is unset");
    assert_eq!(p.len(), 8, "{p:#?}");

    let wrong_runner = GITHUB.replace("runner = \"github\"", "runner = \"fake\"");
    let p = problems(&wrong_runner, &[("GH_TOKEN", "t")]);
    assert_only_problem(&p, "queues.gh.github", "only read by runner = \"github\"");
}

// ---------------------------------------------------------------------------
// [http]

#[test]
fn http_defaults_file_and_env() {
    let c = ok("", &[]);
    assert_eq!(
        c.http,
        HttpConfig {
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(30),
            max_connections: 4096,
            ws_max_message_bytes: 65536,
        }
    );
    let c = ok(
        "[http]\nheader_read_timeout = \"2s\"\nmax_connections = 10\n",
        &[
            ("STITCH_HTTP__BODY_READ_TIMEOUT", "5s"),
            ("STITCH_HTTP__WS_MAX_MESSAGE_BYTES", "4096"),
            ("STITCH_HTTP__MAX_CONNECTIONS", "20"),
        ],
    );
    assert_eq!(
        c.http,
        HttpConfig {
            header_read_timeout: Duration::from_secs(2),
            body_read_timeout: Duration::from_secs(5),
            max_connections: 20,
            ws_max_message_bytes: 4096,
        }
    );
}

#[test]
fn http_rejects_limits_that_cannot_work() {
    let p = problems(
        "[http]\nheader_read_timeout = \"0s\"\nbody_read_timeout = \"0s\"\nmax_connections = 0\nws_max_message_bytes = 100\n",
        &[],
    );
    assert_problem(&p, "http.header_read_timeout", "greater than zero");
    assert_problem(&p, "http.body_read_timeout", "greater than zero");
    assert_problem(&p, "http.max_connections", "at least 1");
    assert_problem(&p, "http.ws_max_message_bytes", "at least 125");
    assert_eq!(p.len(), 4, "{p:#?}");
    let p = problems("", &[("STITCH_HTTP__MAX_CONNECTIONS", "0")]);
    assert_only_problem(
        &p,
        "http.max_connections",
        "(set by STITCH_HTTP__MAX_CONNECTIONS)",
    );
    assert_only_problem(
        &problems("[http]\nidle_timeout = \"1s\"\n", &[]),
        "http.idle_timeout",
        "unknown key",
    );
    assert_only_problem(
        &problems("[http]\nbody_read_timeout = \"soon\"\n", &[]),
        "http.body_read_timeout",
        "invalid duration",
    );
}

// ---------------------------------------------------------------------------
// [cluster]

#[test]
fn cluster_defaults_file_and_env() {
    let c = ok("", &[]);
    assert_eq!(c.cluster.lease, Duration::from_secs(30));
    assert_eq!(c.cluster.delivery_timeout, Duration::from_secs(300));
    assert_eq!(c.cluster.poll_interval, Duration::from_millis(500));
    let c = ok(
        "[cluster]\nlease = \"3s\"\ndelivery_timeout = \"15s\"\n",
        &[("STITCH_CLUSTER__POLL_INTERVAL", "200ms")],
    );
    assert_eq!(c.cluster.lease, Duration::from_secs(3));
    assert_eq!(c.cluster.delivery_timeout, Duration::from_secs(15));
    assert_eq!(c.cluster.poll_interval, Duration::from_millis(200));
}

#[test]
fn cluster_rejects_settings_that_cannot_work() {
    let p = problems(
        "[cluster]\nlease = \"100ms\"\ndelivery_timeout = \"10ms\"\npoll_interval = \"0s\"\nleases = \"1s\"\n",
        &[],
    );
    assert_problem(&p, "cluster.leases", "unknown key");
    let p = problems(
        "[cluster]\nlease = \"100ms\"\ndelivery_timeout = \"10ms\"\npoll_interval = \"0s\"\n",
        &[],
    );
    assert_problem(&p, "cluster.lease", "at least 300ms");
    assert_problem(&p, "cluster.delivery_timeout", "at least 1s");
    assert_problem(&p, "cluster.poll_interval", "greater than zero");
    assert_eq!(p.len(), 3, "{p:#?}");
    assert_problem(
        &problems("[cluster]\nlease = \"soon\"\n", &[]),
        "cluster.lease",
        "durations are strings like",
    );
}

#[test]
fn local_pass_env_user_and_group_are_read_and_checked() {
    let config = ok(
        &format!("{LOCAL_CI}pass_env = [\"CARGO_HOME\", \"SSH_AUTH_SOCK\"]\n"),
        &[],
    );
    let local = local_of(&config.queues["ci"]).clone();
    assert_eq!(local.pass_env, ["CARGO_HOME", "SSH_AUTH_SOCK"]);
    if nix::unistd::geteuid().is_root() {
        let config = ok(
            &format!("{LOCAL_CI}user = \"nobody\"\n"),
            &[("STITCH_QUEUES__CI__LOCAL__GROUP", "0")],
        );
        let local = local_of(&config.queues["ci"]).clone();
        assert_eq!(local.user.as_deref(), Some("nobody"));
        assert_eq!(
            local.group.as_deref(),
            Some("0"),
            "a numeric id from the environment stays a string"
        );
    }

    let p = problems(
        &format!(
            "{LOCAL_CI}pass_env = [\"STITCH_JOB_TOKEN\", \"A=B\", \"CC\"]\nenv = {{ CC = \"gcc\" }}\n\
             user = \"no-such-user-stitch\"\ngroup = \"no-such-group-stitch\"\n"
        ),
        &[],
    );
    assert_problem(&p, "queues.ci.local.pass_env[0]", "sets for every build");
    assert_problem(&p, "queues.ci.local.pass_env[1]", "invalid variable name");
    assert_problem(&p, "queues.ci.local.pass_env[2]", "local.env also sets");
    if nix::unistd::geteuid().is_root() {
        assert_problem(
            &p,
            "queues.ci.local.user",
            "local.user \"no-such-user-stitch\": no such user on this machine",
        );
    } else {
        assert_problem(&p, "queues.ci.local.user", "need stitch to run as root");
    }
    assert_eq!(p.len(), 4, "{p:#?}");
}

// ---------------------------------------------------------------------------
// [retention]

#[test]
fn retention_defaults() {
    let config = setup(None, &[]).ok();
    const DAY: u64 = 24 * 3600;
    assert_eq!(
        config.retention,
        RetentionConfig {
            builds: RetentionSetting::After(Duration::from_secs(30 * DAY)),
            events: RetentionSetting::After(Duration::from_secs(7 * DAY)),
            dead_letters: RetentionSetting::After(Duration::from_secs(30 * DAY)),
            interval: RetentionSetting::After(Duration::from_secs(600)),
        }
    );
}

#[test]
fn retention_keys_take_durations_or_off_from_file_and_env() {
    let config = ok(
        r#"
[retention]
builds = "90d"
events = "off"
dead_letters = "12h"
interval = "5m"
"#,
        &[
            ("STITCH_RETENTION__INTERVAL", "off"),
            ("STITCH_RETENTION__DEAD_LETTERS", "1d"),
        ],
    );
    assert_eq!(
        config.retention.builds,
        RetentionSetting::After(Duration::from_secs(90 * 24 * 3600))
    );
    assert_eq!(config.retention.events, RetentionSetting::Off);
    assert_eq!(
        config.retention.dead_letters,
        RetentionSetting::After(Duration::from_secs(24 * 3600))
    );
    assert_eq!(config.retention.interval, RetentionSetting::Off);
    assert_eq!(config.retention.interval.duration(), None);
}

#[test]
fn bad_retention_values_name_the_key() {
    let p = problems(
        r#"
[retention]
builds = "forever"
events = 7
dead_letters = "0s"
interval = "10ms"
"#,
        &[("STITCH_RETENTION__KEEP", "1d")],
    );
    assert_problem(&p, "retention.builds", "invalid duration \"forever\"");
    assert_problem(&p, "retention.builds", "or \"off\"");
    assert_problem(&p, "retention.events", "expected a string");
    assert_problem(&p, "retention.dead_letters", "use \"off\"");
    assert_problem(&p, "retention.interval", "at least 1s");
    assert_problem(&p, "retention.keep", "unknown key");
    assert_eq!(p.len(), 5, "{p:#?}");
}
