//! Shared by the storage TLS suites: whether a store's connection is
//! encrypted, by the database server's own account.

use stitch_store::{Store, StorePool};

/// Whether `store`'s pool connection is encrypted (PostgreSQL's
/// `pg_stat_ssl`, MySQL's `Ssl_cipher`); always false on SQLite.
pub async fn connection_uses_tls(store: &Store) -> bool {
    match store.pool() {
        StorePool::Postgres(p) => {
            sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
                .fetch_one(&p)
                .await
                .unwrap()
        }
        StorePool::MySql(p) => {
            let cipher: String = sqlx::query_scalar(
                "SELECT CAST(VARIABLE_VALUE AS CHAR) FROM information_schema.SESSION_STATUS \
                 WHERE VARIABLE_NAME = 'Ssl_cipher'",
            )
            .fetch_one(&p)
            .await
            .unwrap();
            !cipher.is_empty()
        }
        StorePool::Sqlite(_) => false,
    }
}
