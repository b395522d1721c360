//! TLS settings of `storage.url` against servers that accept only TLS:
//! PostgreSQL (`STITCH_TEST_POSTGRES_TLS_URL`, `hostssl` lines only) and
//! MariaDB/MySQL (`STITCH_TEST_MYSQL_TLS_URL`, `require_secure_transport`),
//! whose certificates `STITCH_TEST_TLS_CA` signed (.ci/database-tls.sh sets
//! them up). A verified connection is refused against another CA, `require`
//! encrypts without a CA, and a connection without TLS is refused; errors
//! never show the URL's password. That a verified connection carries builds
//! end to end is in storage_backends.rs. Unset, the tests skip, unless
//! `STITCH_REQUIRE_DATABASES=1`.

use std::path::{Path, PathBuf};
use std::process::Command;

use sqlx::{ConnectOptions, Connection};
use stitch_server::config::Config;
use stitch_server::state::{self, StartError};

#[path = "../../stitch-mq/tests/support/mod.rs"]
mod support;
mod tls_support;
use tls_support::connection_uses_tls;

/// Written in every URL below: it must not appear in any error.
const PASSWORD: &str = "hunter2-never-shown";

const PG: &str = "STITCH_TEST_POSTGRES_TLS_URL";
const MYSQL: &str = "STITCH_TEST_MYSQL_TLS_URL";

/// `var`'s URL with the query parameters `params`. PostgreSQL's URLs carry
/// [`PASSWORD`]: that server trusts 127.0.0.1 and does not check it.
fn url_with(var: &str, params: &[(&str, &str)]) -> reqwest::Url {
    let base = std::env::var(var).unwrap();
    let mut url = reqwest::Url::parse(&base).unwrap();
    if var == PG {
        url.set_password(Some(PASSWORD)).unwrap();
    }
    url.query_pairs_mut().extend_pairs(params);
    url
}

fn config(url: &reqwest::Url) -> Config {
    let mut config = Config::default();
    config.storage.url = Some(url.to_string());
    config
}

/// A self-signed CA with the same name as the servers' CA but a key of its
/// own: what a client holding the wrong CA file has.
fn another_ca(dir: &Path) -> PathBuf {
    let crt = dir.join("another-ca.crt");
    let out = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
        .args(["ec_paramgen_curve:prime256v1", "-nodes", "-days", "1"])
        .args(["-subj", "/CN=stitch test CA"])
        .args(["-addext", "basicConstraints=critical,CA:TRUE"])
        .arg("-keyout")
        .arg(dir.join("another-ca.key"))
        .arg("-out")
        .arg(&crt)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    crt
}

/// Opens the store and queue as `stitch serve` does; the error as text.
async fn open_error(url: &reqwest::Url) -> String {
    match state::open_storage(&config(url)).await {
        Ok((store, _)) => {
            store.close().await;
            panic!("{} opened", stitch_mq::open::redact(url.as_str()))
        }
        Err(e) => {
            let text = e.to_string();
            assert!(matches!(e, StartError::Store(_)), "{e:?}");
            assert!(!text.contains(PASSWORD), "{text}");
            text
        }
    }
}

/// Opens the store and queue as `stitch serve` does and reports whether
/// the store's connection is encrypted, by the server's account.
async fn opens_with_tls(url: &reqwest::Url) -> bool {
    let (store, _driver) = state::open_storage(&config(url))
        .await
        .unwrap_or_else(|e| panic!("{}: {e}", stitch_mq::open::redact(url.as_str())));
    let tls = connection_uses_tls(&store).await;
    store.close().await;
    tls
}

/// How many tables the PostgreSQL schema of storage `name` has.
async fn pg_tables(db: &support::PgDatabase, name: &str) -> i64 {
    let mut conn = db.options(name).await.connect().await.unwrap();
    let n = sqlx::query_scalar(
        "SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = $1",
    )
    .bind(db.schema(name))
    .fetch_one(&mut conn)
    .await
    .unwrap();
    let _ = conn.close().await;
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_verify_full_refuses_a_server_certificate_from_another_ca() {
    let Some(db) = support::PgDatabase::connect_to(PG).await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let wrong = another_ca(dir.path());
    let schema = db.schema("wrong_ca");
    db.options("wrong_ca").await;
    let url = url_with(
        PG,
        &[
            ("sslmode", "verify-full"),
            ("sslrootcert", &wrong.display().to_string()),
            ("options", &format!("-csearch_path={schema}")),
        ],
    );
    let text = open_error(&url).await;
    assert!(text.contains("invalid peer certificate"), "{text}");
    // Nothing was migrated.
    assert_eq!(pg_tables(&db, "wrong_ca").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_verify_full_with_the_servers_ca_connects_over_tls() {
    let Some(db) = support::PgDatabase::connect_to(PG).await else {
        return;
    };
    let Some(ca) = support::url_from_env("STITCH_TEST_TLS_CA") else {
        return;
    };
    db.options("verify_full").await;
    let url = url_with(
        PG,
        &[
            ("sslmode", "verify-full"),
            ("sslrootcert", &ca),
            (
                "options",
                &format!("-csearch_path={}", db.schema("verify_full")),
            ),
        ],
    );
    assert!(opens_with_tls(&url).await);
    assert!(pg_tables(&db, "verify_full").await > 0, "migrated");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_sslmode_require_encrypts_without_a_ca() {
    let Some(db) = support::PgDatabase::connect_to(PG).await else {
        return;
    };
    db.options("require").await;
    let url = url_with(
        PG,
        &[
            ("sslmode", "require"),
            (
                "options",
                &format!("-csearch_path={}", db.schema("require")),
            ),
        ],
    );
    assert!(opens_with_tls(&url).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_without_tls_is_refused_by_the_tls_only_server() {
    let Some(db) = support::PgDatabase::connect_to(PG).await else {
        return;
    };
    db.options("plain").await;
    let url = url_with(
        PG,
        &[
            ("sslmode", "disable"),
            ("options", &format!("-csearch_path={}", db.schema("plain"))),
        ],
    );
    let text = open_error(&url).await;
    assert!(text.contains("no encryption"), "{text}");
    assert_eq!(pg_tables(&db, "plain").await, 0);
}

/// The MySQL server's URL on the database of storage `name`. MariaDB checks
/// passwords: [`PASSWORD`] goes in only where the connection must fail
/// before the login.
fn mysql_url(
    db: &support::MySqlDatabase,
    name: &str,
    password: Option<&str>,
    params: &[(&str, &str)],
) -> reqwest::Url {
    let mut url = url_with(MYSQL, params);
    url.set_path(&format!("/{}", db.database(name)));
    url.set_password(password).unwrap();
    url
}

/// How many tables the MySQL database of storage `name` has.
async fn mysql_tables(db: &support::MySqlDatabase, name: &str) -> i64 {
    let mut conn = db.options(name).await.connect().await.unwrap();
    let n =
        sqlx::query_scalar("SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = ?")
            .bind(db.database(name))
            .fetch_one(&mut conn)
            .await
            .unwrap();
    let _ = conn.close().await;
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_verify_identity_refuses_a_server_certificate_from_another_ca() {
    let Some(db) = support::MySqlDatabase::connect_to(MYSQL).await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let wrong = another_ca(dir.path());
    db.options("wrong_ca").await;
    let url = mysql_url(
        &db,
        "wrong_ca",
        Some(PASSWORD),
        &[
            ("ssl-mode", "VERIFY_IDENTITY"),
            ("ssl-ca", &wrong.display().to_string()),
        ],
    );
    let text = open_error(&url).await;
    assert!(text.contains("invalid peer certificate"), "{text}");
    assert_eq!(mysql_tables(&db, "wrong_ca").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_ssl_mode_required_encrypts_without_a_ca() {
    let Some(db) = support::MySqlDatabase::connect_to(MYSQL).await else {
        return;
    };
    db.options("required").await;
    let url = mysql_url(&db, "required", None, &[("ssl-mode", "REQUIRED")]);
    assert!(opens_with_tls(&url).await);
    assert!(mysql_tables(&db, "required").await > 0, "migrated");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_without_tls_is_refused_by_the_tls_only_server() {
    let Some(db) = support::MySqlDatabase::connect_to(MYSQL).await else {
        return;
    };
    db.options("plain").await;
    let url = mysql_url(&db, "plain", None, &[("ssl-mode", "DISABLED")]);
    let text = open_error(&url).await;
    // MariaDB answers a plain login under require_secure_transport with
    // "Access denied"; MySQL 8 names the insecure transport.
    assert!(
        text.contains("Access denied") || text.contains("insecure transport"),
        "{text}"
    );
    assert_eq!(mysql_tables(&db, "plain").await, 0);
}
