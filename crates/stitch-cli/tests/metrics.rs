//! `/metrics` as an operator reads it: a real `stitch serve` (one server in
//! its own process, so every metric recorded anywhere in it is on its
//! `/metrics`) runs builds on the stateful fake Buildkite — with signed
//! webhooks, a rate-limit storm and a forged webhook — and on the `fake`
//! runner, and one retention pass; then every metric of the catalog
//! (`stitch_core::metric::ALL`) must be exported with its help, type,
//! labels and buckets, no label may carry a build id or a URL, and every
//! metric the Grafana dashboard and the alert rules under `deploy/` name
//! must be among them. The metrics table of `docs/operations.md` lists the
//! catalog exactly.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use stitch_core::metric::{self, MetricKind, MetricSpec};
use stitch_fake_providers::buildkite::{
    FakeBuildkite, FakeOptions, Timing, WebhookAuth, WebhookTarget,
};
use support::serve::{Serve, STITCH};
use yaml_rust2::{Yaml, YamlLoader};

const TOKEN: &str = "bk-test-token";
const SECRET: &str = "whsec-0123456789abcdef";

fn repo_file(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo_file(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// One sample line of the exposition.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// The exposition: `# HELP` and `# TYPE` per metric, and the samples.
#[derive(Debug, Default)]
struct Exposition {
    help: BTreeMap<String, String>,
    kind: BTreeMap<String, String>,
    samples: Vec<Sample>,
}

impl Exposition {
    fn parse(text: &str) -> Self {
        let mut e = Self::default();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
                e.help.insert(name.to_string(), help.to_string());
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                e.kind.insert(name.to_string(), kind.to_string());
            } else if !line.starts_with('#') {
                let (series, value) = line.rsplit_once(' ').unwrap();
                let (name, labels) = match series.split_once('{') {
                    Some((name, rest)) => (name, parse_labels(rest.trim_end_matches('}'))),
                    None => (series, BTreeMap::new()),
                };
                e.samples.push(Sample {
                    name: name.to_string(),
                    labels,
                    value: value.parse().unwrap(),
                });
            }
        }
        e
    }

    fn samples<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| s.name == name)
    }

    /// The value of `name` with exactly these labels.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let want: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.samples(name)
            .find(|s| s.labels == want)
            .map(|s| s.value)
    }

    /// The sum of `name` over the samples whose labels include these.
    fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples(name)
            .filter(|s| {
                labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| s.value)
            .sum()
    }
}

/// `a="x",b="y"` (label values here never contain quotes or commas).
fn parse_labels(text: &str) -> BTreeMap<String, String> {
    text.split("\",")
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap();
            (k.to_string(), v.trim_matches('"').to_string())
        })
        .collect()
}

/// Every `stitch_…` name in `text`, each as written.
fn stitch_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let mut at = 0;
    while let Some(found) = text[at..].find("stitch_") {
        let start = at + found;
        let mut end = start;
        while end < bytes.len() && word(bytes[end]) {
            end += 1;
        }
        if start == 0 || !word(bytes[start - 1]) {
            names.insert(text[start..end].to_string());
        }
        at = end.max(start + 1);
    }
    names
}

/// The metric a name in an expression refers to: a histogram's series
/// carry `_bucket`, `_sum` and `_count`.
fn metric_of(name: &str) -> Option<&'static MetricSpec> {
    metric::find(name).or_else(|| {
        ["_bucket", "_sum", "_count"].iter().find_map(|suffix| {
            let base = name.strip_suffix(suffix)?;
            metric::find(base).filter(|m| m.kind == MetricKind::Histogram)
        })
    })
}

/// Every string in a JSON document.
fn json_strings(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::String(s) => out.push(s.clone()),
        serde_json::Value::Array(a) => a.iter().for_each(|v| json_strings(v, out)),
        serde_json::Value::Object(o) => o.values().for_each(|v| json_strings(v, out)),
        _ => {}
    }
}

/// The `expr` of every rule in a Prometheus rules file.
fn rule_exprs(doc: &Yaml) -> Vec<String> {
    let mut exprs = Vec::new();
    for group in doc["groups"].as_vec().expect("groups") {
        for rule in group["rules"].as_vec().expect("rules") {
            exprs.push(
                rule["expr"]
                    .as_str()
                    .unwrap_or_else(|| panic!("a rule without expr: {rule:?}"))
                    .to_string(),
            );
        }
    }
    exprs
}

/// Whether `expr`'s brackets pair up outside its string literals: a
/// sanity check, since no PromQL parser is among the dependencies
/// (`promtool check rules deploy/prometheus/alerts.yml` is the full one).
fn balanced(expr: &str) -> bool {
    let mut open = Vec::new();
    let mut quoted = false;
    for c in expr.chars() {
        match c {
            '"' => quoted = !quoted,
            _ if quoted => {}
            '(' | '[' | '{' => open.push(c),
            ')' | ']' | '}' => {
                let want = match c {
                    ')' => '(',
                    ']' => '[',
                    _ => '{',
                };
                if open.pop() != Some(want) {
                    return false;
                }
            }
            _ => {}
        }
    }
    open.is_empty() && !quoted
}

/// The `stitch_*` names the deploy files use, by file.
fn deploy_names() -> BTreeMap<&'static str, BTreeSet<String>> {
    let dashboard: serde_json::Value =
        serde_json::from_str(&read("deploy/grafana/stitch.json")).expect("dashboard JSON");
    let mut strings = Vec::new();
    json_strings(&dashboard, &mut strings);
    let alerts = YamlLoader::load_from_str(&read("deploy/prometheus/alerts.yml")).expect("YAML");
    let exprs = rule_exprs(&alerts[0]);
    assert!(exprs.len() >= 6, "{exprs:?}");
    let queries = dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t["expr"].as_str().map(str::to_string));
    for expr in exprs.iter().cloned().chain(queries) {
        assert!(balanced(&expr), "unbalanced: {expr}");
    }
    BTreeMap::from([
        (
            "deploy/grafana/stitch.json",
            strings.iter().flat_map(|s| stitch_names(s)).collect(),
        ),
        (
            "deploy/prometheus/alerts.yml",
            exprs.iter().flat_map(|s| stitch_names(s)).collect(),
        ),
    ])
}

#[test]
fn the_docs_and_deploy_files_name_only_catalogued_metrics() {
    // docs/operations.md: the table under "### Metrics" names each metric
    // once, in its first column.
    let ops = read("docs/operations.md");
    let table = ops
        .split("\n### Metrics\n")
        .nth(1)
        .expect("docs/operations.md has a ### Metrics section");
    let documented: BTreeSet<String> = table
        .lines()
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .filter_map(|l| l.split('|').nth(1))
        .flat_map(stitch_names)
        .collect();
    let catalogued: BTreeSet<String> = metric::ALL.iter().map(|m| m.name.to_string()).collect();
    assert_eq!(documented, catalogued, "docs/operations.md's metrics table");
    for (file, names) in deploy_names() {
        assert!(!names.is_empty(), "{file} names no metric");
        for name in names {
            assert!(metric_of(&name).is_some(), "{file}: {name} is not a metric");
        }
    }
}

const SIGNED_WEBHOOK: &str = r#"
[queues.ci.buildkite.webhook]
mode = "signature"
secret_env = "BK_WEBHOOK_SECRET"
"#;

fn config(fake: &FakeBuildkite) -> String {
    format!(
        r#"data_dir = "{{data}}"
[retention]
interval = "1s"
[queues.ci]
runner = "buildkite"
poll = {{ accepted = "200ms", running = "200ms" }}
retry = {{ max_attempts = 30, initial = "100ms", max = "2s" }}
[queues.ci.buildkite]
org = "acme"
pipeline = "app"
token_env = "BK_TOKEN"
api_url = "{api}"
request_timeout = "2s"
rate_limit = {{ requests = 100000, window = "1s" }}
{SIGNED_WEBHOOK}
[queues.plain]
runner = "fake"
poll = {{ accepted = "100ms", running = "100ms" }}
[queues.plain.fake]
accept_delay = "100ms"
run_duration = "2s"
"#,
        api = fake.url(),
    )
}

async fn scrape(http: &reqwest::Client, s: &Serve) -> String {
    let r = http
        .get(format!("{}/metrics", s.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    r.text().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_exports_every_documented_metric() {
    let fake = FakeBuildkite::start(FakeOptions {
        token: TOKEN.into(),
        timing: Timing {
            schedule: Duration::from_millis(100),
            run: Duration::from_millis(600),
            ..Timing::default()
        },
        // Only so that answers carry `RateLimit-Remaining`.
        rate_limit: Some((100_000, Duration::from_secs(60))),
        ..FakeOptions::default()
    })
    .await
    .unwrap();
    let s = Serve::start(
        STITCH,
        &config(&fake),
        &[("BK_TOKEN", TOKEN), ("BK_WEBHOOK_SECRET", SECRET)],
    )
    .await;
    fake.set_webhook(Some(WebhookTarget {
        url: format!("{}/webhooks/buildkite", s.base),
        auth: WebhookAuth::Signature(SECRET.into()),
        job_events: true,
    }));
    let http = reqwest::Client::new();

    // The first create meets a 429 with a 1 s reset: one rate-limit pause.
    fake.rate_limit_storm(Duration::from_secs(1));
    let ci = s.create(&http, "ci", "https://git.example/c/1").await;
    let plain = s
        .create(&http, "plain", "https://example.com/change/2")
        .await;
    let ids = [ci.clone(), plain.clone()];
    let done = s
        .wait_all_terminal(&http, &ids, Duration::from_secs(60))
        .await;
    assert_eq!(done[&ci], "succeeded");
    assert_eq!(done[&plain], "succeeded");
    fake.webhook_delivered(&ci, "build.finished").await;
    // A forged delivery.
    let forged = s
        .webhook(
            &http,
            "buildkite",
            &[("x-buildkite-signature", "timestamp=1,signature=00")],
            b"{}".to_vec(),
        )
        .await;
    assert_eq!(forged.status().as_u16(), 401);

    // Retention runs a pass a second after start; its lease row lands in
    // the data directory, and the pass's gauges follow.
    let text = stitch_testkit::dir_change(&[&s.data], "a retention pass on /metrics", || {
        let http = http.clone();
        let s = &s;
        async move {
            let text = scrape(&http, s).await;
            Exposition::parse(&text)
                .value(metric::DATABASE_SIZE, &[])
                .map(|_| text)
        }
    })
    .await;
    let e = Exposition::parse(&text);

    // Every catalogued metric, with its help, type, labels and buckets.
    for m in metric::ALL {
        assert_eq!(
            e.kind.get(m.name).map(String::as_str),
            Some(m.kind.as_str()),
            "# TYPE of {}\n{text}",
            m.name
        );
        assert_eq!(
            e.help.get(m.name).map(String::as_str),
            Some(m.help),
            "# HELP of {}",
            m.name
        );
        let series = match m.kind {
            MetricKind::Histogram => format!("{}_bucket", m.name),
            _ => m.name.to_string(),
        };
        let samples: Vec<&Sample> = e.samples(&series).collect();
        assert!(!samples.is_empty(), "no samples of {series}\n{text}");
        let want: BTreeSet<&str> = m.labels.iter().copied().collect();
        for sample in &samples {
            let got: BTreeSet<&str> = sample
                .labels
                .keys()
                .map(String::as_str)
                .filter(|k| *k != "le")
                .collect();
            assert_eq!(got, want, "labels of {sample:?}");
        }
        if m.kind == MetricKind::Histogram {
            let first = &samples[0].labels;
            let bounds: Vec<String> = samples
                .iter()
                .filter(|s| {
                    s.labels
                        .iter()
                        .all(|(k, v)| k == "le" || first.get(k) == Some(v))
                })
                .map(|s| s.labels["le"].clone())
                .collect();
            let mut expected: Vec<String> = m.buckets.iter().map(|b| b.to_string()).collect();
            expected.push("+Inf".into());
            assert_eq!(bounds, expected, "buckets of {}", m.name);
            assert!(e.samples(&format!("{}_sum", m.name)).next().is_some());
            assert!(e.samples(&format!("{}_count", m.name)).next().is_some());
        }
    }

    // Bounded labels: no build id, change URL or provider URL anywhere.
    for id in &ids {
        assert!(!text.contains(id.as_str()), "{id} in /metrics");
    }
    for leak in ["git.example", "example.com", &fake.url()] {
        assert!(!text.contains(leak), "{leak} in /metrics");
    }

    // And they say what happened.
    let count = |name: &str, labels: &[(&str, &str)]| e.sum(&format!("{name}_count"), labels);
    for queue in ["ci", "plain"] {
        assert_eq!(
            count(
                metric::BUILD_DURATION,
                &[("queue", queue), ("outcome", "succeeded")]
            ),
            1.0,
            "{queue}"
        );
        for status in ["accepted", "running", "unknown"] {
            assert_eq!(
                e.value(metric::BUILDS, &[("queue", queue), ("status", status)]),
                Some(0.0),
                "{queue} {status}"
            );
        }
    }
    // The fake runner's build ran for 2 s under 100 ms polls: seen running,
    // and polled on its cadence (nothing wakes a `fake` build early).
    assert_eq!(count(metric::BUILD_QUEUED, &[("queue", "plain")]), 1.0);
    assert!(count(metric::POLL_LAG, &[("queue", "plain")]) >= 1.0);
    assert!(
        e.sum(
            metric::PROVIDER_REQUESTS,
            &[
                ("provider", "buildkite"),
                ("operation", "create_build"),
                ("status", "429")
            ]
        ) >= 1.0,
        "{text}"
    );
    assert!(
        e.sum(
            metric::PROVIDER_REQUESTS,
            &[("provider", "buildkite"), ("operation", "get_build")]
        ) >= 1.0
    );
    assert!(e
        .value(
            metric::PROVIDER_RATE_LIMIT_PAUSES,
            &[("provider", "buildkite")]
        )
        .is_some_and(|n| n >= 1.0));
    assert!(e
        .value(
            metric::PROVIDER_BUDGET_REMAINING,
            &[("provider", "buildkite")]
        )
        .is_some_and(|n| n > 0.0));
    assert!(
        e.value(
            metric::WEBHOOK_DELIVERIES,
            &[("provider", "buildkite"), ("outcome", "woken")]
        )
        .is_some_and(|n| n >= 1.0),
        "{text}"
    );
    assert_eq!(
        e.value(
            metric::WEBHOOK_DELIVERIES,
            &[("provider", "buildkite"), ("outcome", "bad_signature")]
        ),
        Some(1.0)
    );
    for topic in ["trigger", "signal"] {
        assert_eq!(
            e.value(metric::DEAD_LETTERS, &[("topic", topic)]),
            Some(0.0)
        );
        assert!(e.value(metric::QUEUE_DEPTH, &[("topic", topic)]).is_some());
    }

    // Every metric the dashboard and the alert rules name is exported.
    for (file, names) in deploy_names() {
        for name in names {
            let m = metric_of(&name).unwrap_or_else(|| panic!("{file}: {name} is not a metric"));
            assert!(e.kind.contains_key(m.name), "{file}: {name} not exported");
        }
    }
}
