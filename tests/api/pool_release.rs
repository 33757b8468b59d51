//! A connection going back to the pool (`db::connect` with the vendored sqlx-postgres,
//! `vendor/README.md`): no round trip when it is clean, and still clean when a statement or a
//! transaction was abandoned half-way.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use expo_controller::config::DbConfig;
use sqlx::PgPool;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

async fn pool_of_one(url: &str) -> PgPool {
    expo_controller::db::connect(&DbConfig {
        db_pool_size: 1,
        ..DbConfig::new(url)
    })
    .await
    .unwrap()
}

/// The backend's state as PostgreSQL reports it to another session: `idle` for a connection resting in
/// the pool, `idle in transaction` for one left inside a transaction block.
async fn backend_state(admin: &PgPool, pid: i32) -> String {
    sqlx::query_scalar("SELECT state FROM pg_stat_activity WHERE pid = $1")
        .bind(pid)
        .fetch_one(admin)
        .await
        .unwrap()
}

async fn backend_pid(pool: &PgPool) -> i32 {
    sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_statement_dropped_mid_flight_leaves_the_pooled_connection_clean() {
    let (url, admin) = crate::support::fresh_database(1).await;
    let pool = pool_of_one(&url).await;
    let pid = backend_pid(&pool).await;

    let abandoned = tokio::time::timeout(
        Duration::from_millis(200),
        sqlx::query_scalar::<_, i32>("SELECT 7 FROM pg_sleep(1)").fetch_one(&pool),
    )
    .await;
    assert!(abandoned.is_err(), "the statement was dropped while the server ran it");
    {
        let _back_in_the_pool = pool.acquire().await.unwrap();
        assert_eq!(
            backend_state(&admin, pid).await,
            "idle",
            "the abandoned statement's answer was drained before the connection rested in the pool"
        );
    }

    let answer: i32 = sqlx::query_scalar("SELECT $1::int + 1")
        .bind(41)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(
        answer, 42,
        "the next statement gets its own answer, not the abandoned one's"
    );
    assert_eq!(
        backend_pid(&pool).await,
        pid,
        "the same pooled connection was reused, not replaced"
    );
    pool.close().await;
    admin.close().await;
}

#[tokio::test]
async fn a_transaction_dropped_without_commit_is_rolled_back_before_the_connection_is_reused() {
    let (url, admin) = crate::support::fresh_database(1).await;
    sqlx::query("CREATE TABLE pool_release_probe (n int)")
        .execute(&admin)
        .await
        .unwrap();
    let pool = pool_of_one(&url).await;
    let pid = backend_pid(&pool).await;

    let mut tx = pool.begin().await.unwrap();
    sqlx::query("INSERT INTO pool_release_probe VALUES (1)")
        .execute(&mut *tx)
        .await
        .unwrap();
    drop(tx);

    {
        let _back_in_the_pool = pool.acquire().await.unwrap();
        assert_eq!(
            backend_state(&admin, pid).await,
            "idle",
            "the dropped transaction was rolled back before the connection rested in the pool"
        );
    }
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM pool_release_probe")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(rows, 0, "the dropped transaction's insert was rolled back");
    let seen_elsewhere: i64 = sqlx::query_scalar("SELECT count(*) FROM pool_release_probe")
        .fetch_one(&admin)
        .await
        .unwrap();
    assert_eq!(seen_elsewhere, 0);
    pool.close().await;
    admin.close().await;
}

/// sqlx-core "pings" every connection it takes back (Sync → ReadyForQuery); the vendored
/// sqlx-postgres answers that at once for a connection with nothing pending. Counted at the protocol
/// level by a proxy between the pool and PostgreSQL: one Sync per statement, none per release.
#[tokio::test]
async fn a_clean_connection_goes_back_to_the_pool_without_a_round_trip() {
    let (url, admin) = crate::support::fresh_database(1).await;
    let (proxied, syncs) = sync_counting_proxy(&url).await;
    let pool = pool_of_one(&proxied).await;
    let statement = || sqlx::query_scalar::<_, i32>("SELECT $1::int").bind(1).fetch_one(&pool);
    for _ in 0..3 {
        statement().await.unwrap();
    }
    let before = {
        let _held = pool.acquire().await.unwrap(); // the last release is over
        syncs.load(Ordering::SeqCst)
    };
    const STATEMENTS: usize = 20;
    for _ in 0..STATEMENTS {
        statement().await.unwrap();
    }
    let _held = pool.acquire().await.unwrap();
    let after = syncs.load(Ordering::SeqCst);
    assert_eq!(
        after - before,
        STATEMENTS,
        "one Sync per statement (its own); a release of a clean connection sends none"
    );
    drop(_held);
    pool.close().await;
    admin.close().await;
}

/// A TCP proxy in front of the PostgreSQL of `url`; returns the URL through it and the count of Sync
/// messages the clients sent (counted before they are forwarded).
async fn sync_counting_proxy(url: &str) -> (String, Arc<AtomicUsize>) {
    let target = url::Url::parse(url).unwrap();
    let upstream = format!("{}:{}", target.host_str().unwrap(), target.port().unwrap());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut proxied = target.clone();
    proxied.set_host(Some("127.0.0.1")).unwrap();
    proxied.set_port(Some(listener.local_addr().unwrap().port())).unwrap();
    // No SSLRequest: the proxy reads the plain protocol.
    proxied.query_pairs_mut().append_pair("sslmode", "disable");
    let syncs = Arc::new(AtomicUsize::new(0));
    let counter = syncs.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = TcpStream::connect(&upstream).await else {
                return;
            };
            let (mut client_read, mut client_write) = client.into_split();
            let (mut server_read, mut server_write) = server.into_split();
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
            });
            let counter = counter.clone();
            tokio::spawn(async move {
                let mut frames = FrontendFrames::default();
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let n = match client_read.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    counter.fetch_add(frames.syncs_in(&buf[..n]), Ordering::SeqCst);
                    if server_write.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (proxied.to_string(), syncs)
}

/// The frontend side of the PostgreSQL protocol, split into messages: the untyped startup message,
/// then (type byte, length) frames.
#[derive(Default)]
struct FrontendFrames {
    pending: Vec<u8>,
    started: bool,
}

impl FrontendFrames {
    /// The number of Sync messages (`S`, length 4) that `bytes` completes.
    fn syncs_in(&mut self, bytes: &[u8]) -> usize {
        self.pending.extend_from_slice(bytes);
        let mut syncs = 0;
        loop {
            let type_len = usize::from(self.started);
            if self.pending.len() < type_len + 4 {
                return syncs;
            }
            let len_bytes: [u8; 4] = self.pending[type_len..type_len + 4].try_into().unwrap();
            let frame = type_len + u32::from_be_bytes(len_bytes) as usize;
            if self.pending.len() < frame {
                return syncs;
            }
            if self.started && self.pending[0] == b'S' {
                syncs += 1;
            }
            self.started = true;
            self.pending.drain(..frame);
        }
    }
}
