//! The claim stays on its partial indexes however much history `builds` holds (R16, P6).

use expo_controller::queue::claim_sql;

use crate::support::fresh_database;

async fn plan(pool: &sqlx::PgPool, platforms: &[&str], generic: bool) -> String {
    let mut conn = pool.acquire().await.unwrap();
    let mode = if generic { "force_generic_plan" } else { "auto" };
    sqlx::query(sqlx::AssertSqlSafe(format!("SET plan_cache_mode = {mode}")))
        .execute(&mut *conn)
        .await
        .unwrap();
    let explain = format!("EXPLAIN {}", claim_sql(platforms.len()));
    let lines: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(explain))
        .bind("w")
        .bind(chrono::Utc::now())
        .bind(platforms)
        .bind(600i64)
        .bind(vec![0u8; 32])
        .bind(600i64)
        .bind("name")
        .bind(true)
        .bind(300i64)
        .bind(600i64)
        .fetch_all(&mut *conn)
        .await
        .unwrap();
    lines.join("\n")
}

#[tokio::test]
async fn the_claim_uses_its_indexes_on_a_large_table() {
    let (_, pool) = fresh_database(2).await;
    sqlx::query(
        "INSERT INTO builds (id, state, queue, run_at, submitted_at, completed_at, source_key, attempt, worker_id)
         SELECT 'h' || g, CASE WHEN g % 7 = 0 THEN 'failed' ELSE 'completed' END, CASE WHEN g % 2 = 0 THEN 'ios' ELSE 'android' END,
                now() - interval '2 days', now() - interval '2 days', now() - interval '1 day', 'builds/h/source.zip', 1, 'old'
         FROM generate_series(1, 100000) g",
    )
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO builds (id, state, queue, run_at, submitted_at, source_key)
         SELECT 'q' || g, 'pending', CASE WHEN g % 2 = 0 THEN 'ios' ELSE 'android' END, now(), now(), 'builds/q/source.zip'
         FROM generate_series(1, 50) g",
    )
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query("ANALYZE builds").execute(&pool).await.unwrap();
    for generic in [false, true] {
        let one = plan(&pool, &["ios"], generic).await;
        assert!(
            one.contains("builds_claim_queue_idx"),
            "one platform (generic={generic}):\n{one}"
        );
        let both = plan(&pool, &["ios", "android"], generic).await;
        assert!(
            both.contains("builds_claim_idx") || both.contains("builds_claim_queue_idx"),
            "both (generic={generic}):\n{both}"
        );
        for p in [&one, &both] {
            assert!(!p.contains("Seq Scan on builds"), "no sequential scan of builds:\n{p}");
        }
    }
}
