//! `stitch serve` with a `[spindle]` section mounts the Tangled spindle's
//! routes on the API listener, beside an unchanged `/v1` API.

use std::process::{Child, Command, Stdio};

/// Kills the server when the test ends, passed or not.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_mounts_the_spindle_routes() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("stitch.toml");
    // Jetstream is unreachable here: the spindle keeps retrying in the
    // background while its HTTP surface serves.
    std::fs::write(
        &config,
        format!(
            r#"data_dir = "{data}"
[spindle]
hostname = "spindle.example.com"
owner = "did:plc:abc123"
default_queue = "default"
jetstream_url = "ws://127.0.0.1:1/subscribe"
dev = true
"#,
            data = dir.path().join("data").display()
        ),
    )
    .unwrap();
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let log = dir.path().join("serve.log");
    let server = Server(
        Command::new(env!("CARGO_BIN_EXE_stitch"))
            .args(["serve", "--config"])
            .arg(&config)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .env("STITCH_LOG", "error")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    stitch_testkit::serve::wait_serving(&log, server.0.id()).await;
    let http = reqwest::Client::new();
    let owner = http
        .get(format!("{base}/xrpc/sh.tangled.owner"))
        .send()
        .await
        .unwrap();
    assert_eq!(owner.status(), 200);
    assert_eq!(owner.text().await.unwrap(), r#"{"owner":"did:plc:abc123"}"#);
    let logs = http
        .get(format!("{base}/logs/knot.example.com/3lzabcdefghij/ci.yml"))
        .send()
        .await
        .unwrap();
    assert_eq!(logs.status(), 404);
    let builds = http.get(format!("{base}/v1/builds")).send().await.unwrap();
    assert_eq!(builds.status(), 200);
    let unknown = http.get(format!("{base}/v1/nope")).send().await.unwrap();
    assert_eq!(unknown.status(), 404);
}
