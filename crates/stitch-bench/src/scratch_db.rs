//! The databases `stitch-bench serve` runs a server on: SQLite in a data
//! dir, or a fresh PostgreSQL schema / MariaDB (MySQL) database per scenario,
//! created before the scenario and dropped after it.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::Context;
use reqwest::Url;
use sqlx::{ConnectOptions, Connection, Executor};

use crate::sys::NamedProcesses;

/// One storage engine a benchmark run measures.
#[derive(Clone)]
pub enum Backend {
    Sqlite,
    /// A server URL; each scenario gets its own schema in that database.
    Postgres(String),
    /// A server URL; each scenario gets its own database on that server.
    MySql(String),
}

impl Backend {
    /// `sqlite`, `postgres` or `mysql` (with the servers' URLs).
    pub fn parse(name: &str, postgres_url: &str, mysql_url: &str) -> anyhow::Result<Self> {
        Ok(match name {
            "sqlite" => Backend::Sqlite,
            "postgres" | "postgresql" => Backend::Postgres(postgres_url.to_string()),
            "mysql" | "mariadb" => Backend::MySql(mysql_url.to_string()),
            other => anyhow::bail!("unknown backend {other:?}: use sqlite, postgres or mysql"),
        })
    }

    /// Column heading of the backend's figures.
    pub fn label(&self) -> &'static str {
        match self {
            Backend::Sqlite => "SQLite",
            Backend::Postgres(_) => "PostgreSQL",
            Backend::MySql(_) => "MariaDB",
        }
    }

    /// The database server's processes on this machine, measured beside
    /// stitch's own CPU; `None` for SQLite (inside the stitch process) and
    /// for a server on another machine.
    pub fn server_processes(&self) -> Option<NamedProcesses> {
        match self {
            Backend::Sqlite => None,
            Backend::Postgres(_) => NamedProcesses::find(&["postgres"]),
            Backend::MySql(_) => NamedProcesses::find(&["mariadbd", "mysqld"]),
        }
    }

    /// A fresh, empty database for `scenario` (a data dir under `dir`, and on
    /// the servers a schema or database of its own).
    pub async fn scratch(&self, dir: &Path, scenario: &str) -> anyhow::Result<Scratch> {
        let data_dir = dir.join(format!("{}-{scenario}", self.label().to_lowercase()));
        std::fs::create_dir_all(&data_dir)
            .with_context(|| format!("creating {}", data_dir.display()))?;
        let name = format!("stitch_bench_{}_{scenario}", std::process::id());
        let storage_url = self.create(&name).await.with_context(|| {
            format!(
                "{}: creating the scratch schema / database {name}",
                self.describe()
            )
        })?;
        Ok(Scratch {
            backend: self.clone(),
            name,
            data_dir,
            storage_url,
        })
    }

    /// The backend and its server's URL (password masked).
    fn describe(&self) -> String {
        match self {
            Backend::Sqlite => "SQLite".to_string(),
            Backend::Postgres(url) | Backend::MySql(url) => {
                format!("{} at {}", self.label(), stitch_mq::open::redact(url))
            }
        }
    }

    /// Creates schema / database `name` on a server; its storage URL.
    async fn create(&self, name: &str) -> anyhow::Result<Option<String>> {
        Ok(match self {
            Backend::Sqlite => None,
            Backend::Postgres(url) => {
                let mut admin = postgres_options(url)?.connect().await?;
                admin
                    .execute(
                        format!("DROP SCHEMA IF EXISTS {name} CASCADE; CREATE SCHEMA {name}")
                            .as_str(),
                    )
                    .await?;
                admin.close().await?;
                let mut with_schema = parse_url(url)?;
                with_schema
                    .query_pairs_mut()
                    .append_pair("options", &format!("-csearch_path={name}"));
                Some(with_schema.to_string())
            }
            Backend::MySql(url) => {
                let mut admin = mysql_options(url)?.connect().await?;
                admin
                    .execute(format!("DROP DATABASE IF EXISTS {name}").as_str())
                    .await?;
                admin
                    .execute(format!("CREATE DATABASE {name}").as_str())
                    .await?;
                admin.close().await?;
                let mut with_db = parse_url(url)?;
                with_db.set_path(&format!("/{name}"));
                Some(with_db.to_string())
            }
        })
    }
}

/// A fresh database for one scenario on one backend.
pub struct Scratch {
    backend: Backend,
    /// Schema (PostgreSQL) or database (MariaDB) name.
    name: String,
    /// The server's data dir (SQLite lives here).
    pub data_dir: PathBuf,
    /// `storage.url` of the server; `None` = SQLite in `data_dir`.
    pub storage_url: Option<String>,
}

impl Scratch {
    /// The backend this database is on.
    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    /// Drops the schema / database (SQLite's files go with the temp dir).
    pub async fn drop_database(self) -> anyhow::Result<()> {
        let what = format!("{}: dropping {}", self.backend.describe(), self.name);
        self.drop_inner().await.context(what)
    }

    async fn drop_inner(&self) -> anyhow::Result<()> {
        match &self.backend {
            Backend::Sqlite => {}
            Backend::Postgres(url) => {
                let mut admin = postgres_options(url)?.connect().await?;
                admin
                    .execute(format!("DROP SCHEMA IF EXISTS {} CASCADE", self.name).as_str())
                    .await?;
                admin.close().await?;
            }
            Backend::MySql(url) => {
                let mut admin = mysql_options(url)?.connect().await?;
                admin
                    .execute(format!("DROP DATABASE IF EXISTS {}", self.name).as_str())
                    .await?;
                admin.close().await?;
            }
        }
        Ok(())
    }
}

fn parse_url(url: &str) -> anyhow::Result<Url> {
    Url::parse(url)
        .with_context(|| format!("invalid database URL {:?}", stitch_mq::open::redact(url)))
}

fn postgres_options(url: &str) -> anyhow::Result<sqlx::postgres::PgConnectOptions> {
    sqlx::postgres::PgConnectOptions::from_str(url)
        .with_context(|| format!("PostgreSQL URL {}", stitch_mq::open::redact(url)))
}

fn mysql_options(url: &str) -> anyhow::Result<sqlx::mysql::MySqlConnectOptions> {
    sqlx::mysql::MySqlConnectOptions::from_str(url)
        .with_context(|| format!("MySQL URL {}", stitch_mq::open::redact(url)))
}
