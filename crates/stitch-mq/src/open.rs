//! One entry point from a storage URL to a driver: `sqlite://PATH`,
//! `postgres://…` (or `postgresql://…`) and `mysql://…` (MySQL or MariaDB).

use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::broadcast;

use crate::driver::*;
use crate::error::{MqError, MqResult};
use crate::message::Millis;
use crate::mysql::MySqlDriver;
use crate::postgres::PostgresDriver;
use crate::sqlite::SqliteDriver;

/// The storage engine a URL names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendKind {
    /// An embedded SQLite file.
    Sqlite,
    /// A PostgreSQL server.
    Postgres,
    /// A MySQL or MariaDB server.
    MySql,
}

impl BackendKind {
    /// The engine of `url` from its scheme.
    pub fn of_url(url: &str) -> MqResult<Self> {
        let scheme = url.split_once(':').map(|(s, _)| s).unwrap_or_default();
        match scheme.to_ascii_lowercase().as_str() {
            "sqlite" => Ok(Self::Sqlite),
            "postgres" | "postgresql" => Ok(Self::Postgres),
            "mysql" | "mariadb" => Ok(Self::MySql),
            _ => Err(MqError::InvalidConfig(format!(
                "unsupported storage URL {:?}: use sqlite://PATH, postgres://… or mysql://…",
                redact(url)
            ))),
        }
    }
}

/// The URL without a password, for error messages and logs: the one in the
/// user part (`user:***@host`) and a `password=` query parameter (which
/// sqlx also reads on PostgreSQL URLs).
pub fn redact(url: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let mut out = redact_userinfo(base);
    if let Some(query) = query {
        out.push('?');
        let pairs: Vec<&str> = query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((key, _)) if key.eq_ignore_ascii_case("password") => "password=***",
                _ => pair,
            })
            .collect();
        out.push_str(&pairs.join("&"));
    }
    out
}

/// Masks the password of `scheme://user:password@host…`. The user part ends
/// at the authority's last `@` (the authority ends at the first `/`), as
/// sqlx's URL parser reads it, so a password with an unescaped `@` is masked
/// whole.
fn redact_userinfo(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority = rest.split('/').next().unwrap_or_default();
    let Some(at) = authority.rfind('@') else {
        return url.to_string();
    };
    let userinfo = &rest[..at];
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***{}", &rest[at..]),
        None => url.to_string(),
    }
}

/// A driver for any of the SQL backends. The variants give access to each
/// backend's own extras (pools, publishing inside a caller's transaction).
#[derive(Clone)]
pub enum AnyDriver {
    /// SQLite.
    Sqlite(SqliteDriver),
    /// PostgreSQL.
    Postgres(PostgresDriver),
    /// MySQL / MariaDB.
    MySql(MySqlDriver),
}

impl AnyDriver {
    /// Which engine this is.
    pub fn kind(&self) -> BackendKind {
        match self {
            AnyDriver::Sqlite(_) => BackendKind::Sqlite,
            AnyDriver::Postgres(_) => BackendKind::Postgres,
            AnyDriver::MySql(_) => BackendKind::MySql,
        }
    }

    fn inner(&self) -> &dyn Driver {
        match self {
            AnyDriver::Sqlite(d) => d,
            AnyDriver::Postgres(d) => d,
            AnyDriver::MySql(d) => d,
        }
    }

    /// As a shared driver for `Queue::new`.
    pub fn into_shared(self) -> Arc<dyn Driver> {
        match self {
            AnyDriver::Sqlite(d) => Arc::new(d),
            AnyDriver::Postgres(d) => Arc::new(d),
            AnyDriver::MySql(d) => Arc::new(d),
        }
    }
}

#[async_trait]
impl Driver for AnyDriver {
    fn name(&self) -> &'static str {
        self.inner().name()
    }

    fn wakeups(&self) -> Option<broadcast::Receiver<String>> {
        self.inner().wakeups()
    }

    async fn publish(
        &self,
        topic: &str,
        msgs: &[NewMessage],
        now: Millis,
    ) -> MqResult<PublishReport> {
        self.inner().publish(topic, msgs, now).await
    }

    async fn register_group(&self, topic: &str, group: &str, now: Millis) -> MqResult<()> {
        self.inner().register_group(topic, group, now).await
    }

    async fn lease_tick(&self, tick: &LeaseTick) -> MqResult<LeaseReport> {
        self.inner().lease_tick(tick).await
    }

    async fn deregister(&self, topic: &str, group: &str, subscriber: &str) -> MqResult<()> {
        self.inner().deregister(topic, group, subscriber).await
    }

    async fn recover(
        &self,
        topic: &str,
        group: &str,
        subscriber: &str,
        now: Millis,
    ) -> MqResult<u64> {
        self.inner().recover(topic, group, subscriber, now).await
    }

    async fn claim(&self, req: &ClaimRequest) -> MqResult<ClaimResult> {
        self.inner().claim(req).await
    }

    async fn apply(&self, outcomes: &[Outcome], now: Millis) -> MqResult<Vec<MqResult<()>>> {
        self.inner().apply(outcomes, now).await
    }

    async fn wake(&self, topic: &str, partition_key: &str, now: Millis) -> MqResult<u64> {
        self.inner().wake(topic, partition_key, now).await
    }

    async fn dead_letters(
        &self,
        topic: &str,
        after_id: i64,
        limit: usize,
    ) -> MqResult<Vec<DeadLetter>> {
        self.inner().dead_letters(topic, after_id, limit).await
    }

    async fn replay_dead_letter(&self, topic: &str, dlq_id: i64, now: Millis) -> MqResult<()> {
        self.inner().replay_dead_letter(topic, dlq_id, now).await
    }

    async fn gc(&self, now: Millis, retention_ms: Millis, stale_ms: Millis) -> MqResult<GcReport> {
        self.inner().gc(now, retention_ms, stale_ms).await
    }

    async fn prune_dead_letters(&self, failed_before: Millis, limit: usize) -> MqResult<u64> {
        self.inner().prune_dead_letters(failed_before, limit).await
    }

    async fn count_dead_letters_before(&self, failed_before: Millis) -> MqResult<u64> {
        self.inner().count_dead_letters_before(failed_before).await
    }

    async fn stats(&self, topic: &str, group: &str) -> MqResult<TopicStats> {
        self.inner().stats(topic, group).await
    }

    async fn groups(&self, topic: &str) -> MqResult<Vec<String>> {
        self.inner().groups(topic).await
    }

    async fn partitions(&self, query: &PartitionQuery) -> MqResult<Vec<PartitionInfo>> {
        self.inner().partitions(query).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schemes_select_backends() {
        assert_eq!(
            BackendKind::of_url("sqlite:///tmp/x.db").unwrap(),
            BackendKind::Sqlite
        );
        assert_eq!(
            BackendKind::of_url("postgres://u@h/db").unwrap(),
            BackendKind::Postgres
        );
        assert_eq!(
            BackendKind::of_url("postgresql://u@h/db").unwrap(),
            BackendKind::Postgres
        );
        assert_eq!(
            BackendKind::of_url("mysql://root@h/db").unwrap(),
            BackendKind::MySql
        );
        assert_eq!(
            BackendKind::of_url("mariadb://root@h/db").unwrap(),
            BackendKind::MySql
        );
    }

    #[test]
    fn unknown_scheme_is_refused_without_the_password() {
        let err = BackendKind::of_url("redis://user:secret@host/0").unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, MqError::InvalidConfig(_)));
        assert!(text.contains("redis://user:***@host/0"), "{text}");
        assert!(!text.contains("secret"), "{text}");
        assert!(BackendKind::of_url("no-scheme").is_err());
    }

    #[test]
    fn redact_masks_passwords_and_keeps_tls_parameters() {
        assert_eq!(
            redact("postgres://u:secret@db:5432/s?sslmode=verify-full&sslrootcert=/etc/ca.crt"),
            "postgres://u:***@db:5432/s?sslmode=verify-full&sslrootcert=/etc/ca.crt"
        );
        assert_eq!(
            redact("postgres://u@db/s?sslmode=require&password=secret&application_name=x"),
            "postgres://u@db/s?sslmode=require&password=***&application_name=x"
        );
        assert_eq!(
            redact("mysql://root@db/s?ssl-mode=REQUIRED"),
            "mysql://root@db/s?ssl-mode=REQUIRED"
        );
        // A password holding an unescaped '@' is still masked whole.
        assert_eq!(redact("postgres://u:p@ss@db/s"), "postgres://u:***@db/s");
        assert_eq!(
            redact("sqlite:///var/lib/x@y.db"),
            "sqlite:///var/lib/x@y.db"
        );
    }
}
