//! Real database failures are classified the way callers retry them:
//! deadlocks, lock wait timeouts, serialization failures, read-only servers
//! and lost connections are retryable; a constraint violation is final.

mod support;

use sqlx::{Connection, Executor, MySqlConnection, PgConnection};
use stitch_mq::{MqError, StorageFailure};
use support::{MySqlDatabase, PgDatabase};

fn class(e: sqlx::Error) -> StorageFailure {
    let e = MqError::from(e);
    let class = e.storage_failure().expect("a storage error");
    assert_eq!(e.is_retryable(), class != StorageFailure::Other, "{e}");
    class
}

async fn pg(db: &PgDatabase) -> PgConnection {
    PgConnection::connect_with(&db.options("errors").await)
        .await
        .expect("connect")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_failures_are_classified() {
    let Some(db) = PgDatabase::connect().await else {
        return;
    };
    let mut a = pg(&db).await;
    let mut b = pg(&db).await;
    a.execute("CREATE TABLE t (id INT PRIMARY KEY, v INT); INSERT INTO t VALUES (1, 0), (2, 0)")
        .await
        .unwrap();

    // Constraint violation: final.
    let e = a.execute("INSERT INTO t VALUES (1, 0)").await.unwrap_err();
    assert_eq!(class(e), StorageFailure::Other);

    // Lock wait timeout.
    let mut ta = a.begin().await.unwrap();
    ta.execute("UPDATE t SET v = 1 WHERE id = 1").await.unwrap();
    b.execute("SET lock_timeout = '100ms'").await.unwrap();
    let e = b
        .execute("UPDATE t SET v = 2 WHERE id = 1")
        .await
        .unwrap_err();
    assert_eq!(class(e), StorageFailure::LockTimeout);
    ta.rollback().await.unwrap();
    b.execute("SET lock_timeout = 0").await.unwrap();

    // Deadlock: each holds one row and wants the other's.
    let mut ta = a.begin().await.unwrap();
    let mut tb = b.begin().await.unwrap();
    ta.execute("UPDATE t SET v = 1 WHERE id = 1").await.unwrap();
    tb.execute("UPDATE t SET v = 1 WHERE id = 2").await.unwrap();
    let (ra, rb) = tokio::join!(
        ta.execute("UPDATE t SET v = 2 WHERE id = 2"),
        tb.execute("UPDATE t SET v = 2 WHERE id = 1")
    );
    let e = ra
        .err()
        .or(rb.err())
        .expect("one side is the deadlock victim");
    assert_eq!(class(e), StorageFailure::Deadlock);
    drop((ta, tb));

    // Serialization failure: write skew between two serializable transactions.
    let mut ta = a.begin().await.unwrap();
    let mut tb = b.begin().await.unwrap();
    ta.execute("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE")
        .await
        .unwrap();
    tb.execute("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE")
        .await
        .unwrap();
    ta.execute("SELECT sum(v) FROM t").await.unwrap();
    tb.execute("SELECT sum(v) FROM t").await.unwrap();
    ta.execute("UPDATE t SET v = v + 1 WHERE id = 1")
        .await
        .unwrap();
    tb.execute("UPDATE t SET v = v + 1 WHERE id = 2")
        .await
        .unwrap();
    ta.commit().await.unwrap();
    let e = tb.commit().await.unwrap_err();
    assert_eq!(class(e), StorageFailure::SerializationFailure);

    // Read-only server (what a demoted primary answers after a failover).
    b.execute("SET default_transaction_read_only = on")
        .await
        .unwrap();
    let e = b
        .execute("UPDATE t SET v = 3 WHERE id = 1")
        .await
        .unwrap_err();
    assert_eq!(class(e), StorageFailure::ReadOnly);

    // Lost connection.
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut b)
        .await
        .unwrap();
    // With a timeout, PostgreSQL (14+) answers once the backend is gone.
    let gone: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1, 10000)")
        .bind(pid)
        .fetch_one(&mut a)
        .await
        .unwrap();
    assert!(gone, "backend {pid} still running after 10 s");
    let e = b.execute("SELECT 1").await.unwrap_err();
    assert_eq!(class(e), StorageFailure::ConnectionLost);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_failures_are_classified() {
    let Some(db) = MySqlDatabase::connect().await else {
        return;
    };
    let opts = db.options("errors").await;
    let mut a = MySqlConnection::connect_with(&opts).await.unwrap();
    let mut b = MySqlConnection::connect_with(&opts).await.unwrap();
    a.execute("CREATE TABLE t (id INT PRIMARY KEY, v INT) ENGINE = InnoDB")
        .await
        .unwrap();
    a.execute("INSERT INTO t VALUES (1, 0), (2, 0)")
        .await
        .unwrap();

    let e = a.execute("INSERT INTO t VALUES (1, 0)").await.unwrap_err();
    assert_eq!(class(e), StorageFailure::Other);

    // Lock wait timeout.
    let mut ta = a.begin().await.unwrap();
    ta.execute("UPDATE t SET v = 1 WHERE id = 1").await.unwrap();
    b.execute("SET SESSION innodb_lock_wait_timeout = 1")
        .await
        .unwrap();
    let e = b
        .execute("UPDATE t SET v = 2 WHERE id = 1")
        .await
        .unwrap_err();
    assert_eq!(class(e), StorageFailure::LockTimeout);
    ta.rollback().await.unwrap();

    // Deadlock.
    b.execute("SET SESSION innodb_lock_wait_timeout = 20")
        .await
        .unwrap();
    let mut ta = a.begin().await.unwrap();
    let mut tb = b.begin().await.unwrap();
    ta.execute("UPDATE t SET v = 1 WHERE id = 1").await.unwrap();
    tb.execute("UPDATE t SET v = 1 WHERE id = 2").await.unwrap();
    let (ra, rb) = tokio::join!(
        ta.execute("UPDATE t SET v = 2 WHERE id = 2"),
        tb.execute("UPDATE t SET v = 2 WHERE id = 1")
    );
    let e = ra
        .err()
        .or(rb.err())
        .expect("one side is the deadlock victim");
    assert_eq!(class(e), StorageFailure::Deadlock);
    drop((ta, tb));

    // Read-only transaction (what a read-only replica answers).
    b.execute("SET SESSION TRANSACTION READ ONLY")
        .await
        .unwrap();
    let mut tb = b.begin().await.unwrap();
    let e = tb
        .execute("UPDATE t SET v = 3 WHERE id = 1")
        .await
        .unwrap_err();
    assert_eq!(class(e), StorageFailure::ReadOnly);
    drop(tb);

    // Lost connection.
    let id: u64 = sqlx::query_scalar("SELECT CONNECTION_ID()")
        .fetch_one(&mut b)
        .await
        .unwrap();
    // KILL CONNECTION shuts the victim's socket down before it answers.
    a.execute(format!("KILL CONNECTION {id}").as_str())
        .await
        .unwrap();
    let e = b.execute("SELECT 1").await.unwrap_err();
    assert_eq!(class(e), StorageFailure::ConnectionLost);
}
