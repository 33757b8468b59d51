//! State-change events for the dashboard's SSE stream (`GET /api/v2/events`). An instance publishes an
//! event through PostgreSQL (`NOTIFY expo_events`), so every instance's subscribers see every change;
//! each instance's LISTEN loop hands received events to a broadcast channel. Subscribers are released
//! when their client goes away (R21).

use std::sync::Arc;

use chrono::Utc;
use serde::Serialize;
use sqlx::PgPool;
use tokio::sync::{broadcast, mpsc, watch};

/// The NOTIFY channel of events.
pub const EVENTS_CHANNEL: &str = "expo_events";

/// One state change.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    /// `build.submitted`, `build.assigned`, `build.progress`, `build.finished`, `build.updated`,
    /// `worker.online`, `worker.offline`.
    pub kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub build_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub worker_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub progress: Option<i16>,
    pub at: String,
}

impl Event {
    pub fn build(kind: &'static str, build_id: &str, state: &str) -> Self {
        Self {
            kind,
            build_id: Some(build_id.to_string()),
            worker_id: None,
            state: Some(state.to_string()),
            progress: None,
            at: Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        }
    }

    pub fn worker(kind: &'static str, worker_id: &str) -> Self {
        Self {
            kind,
            build_id: None,
            worker_id: Some(worker_id.to_string()),
            state: None,
            progress: None,
            at: Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        }
    }

    pub fn with_worker(mut self, worker_id: &str) -> Self {
        self.worker_id = Some(worker_id.to_string());
        self
    }

    pub fn with_progress(mut self, progress: Option<i16>) -> Self {
        self.progress = progress;
        self
    }
}

/// This instance's event hub.
#[derive(Debug)]
pub struct Events {
    subscribers: broadcast::Sender<Arc<str>>,
    outbox: mpsc::UnboundedSender<String>,
}

impl Events {
    /// The hub and the receiving end of its outbox (for [`forward`]).
    pub fn new() -> (Arc<Self>, mpsc::UnboundedReceiver<String>) {
        let (subscribers, _) = broadcast::channel(1024);
        let (outbox, pending) = mpsc::unbounded_channel();
        (Arc::new(Self { subscribers, outbox }), pending)
    }

    /// Publishes to every instance (fire and forget: never delays the request).
    pub fn publish(&self, event: Event) {
        if let Ok(json) = serde_json::to_string(&event) {
            let _ = self.outbox.send(json);
        }
    }

    /// Hands an event received from PostgreSQL to this instance's subscribers.
    pub fn deliver(&self, payload: &str) {
        let _ = self.subscribers.send(Arc::from(payload));
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<str>> {
        self.subscribers.subscribe()
    }

    /// Open SSE subscriptions on this instance.
    pub fn subscribers(&self) -> usize {
        self.subscribers.receiver_count()
    }
}

/// The SSE answer of the event stream, shared by `/api/v2/events` (admin key) and `/dashboard/events`
/// (session cookie), so both serve exactly the same stream. The subscription ends with the connection.
pub fn sse_response(
    events: &Events,
    _headers: &axum::http::HeaderMap,
) -> axum::response::sse::Sse<
    impl futures_util::Stream<Item = Result<axum::response::sse::Event, std::convert::Infallible>> + use<>,
> {
    use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
    use tokio::sync::broadcast::error::RecvError;
    let receiver = events.subscribe();
    let stream = futures_util::stream::unfold(receiver, |mut receiver| async move {
        loop {
            match receiver.recv().await {
                Ok(payload) => {
                    let kind = serde_json::from_str::<serde_json::Value>(&payload)
                        .ok()
                        .and_then(|v| v["kind"].as_str().map(str::to_string))
                        .unwrap_or_else(|| "event".into());
                    return Some((Ok(SseEvent::default().event(kind).data(payload.as_ref())), receiver));
                }
                Err(RecvError::Lagged(missed)) => tracing::warn!(missed, "SSE subscriber lagged"),
                Err(RecvError::Closed) => return None,
            }
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(std::time::Duration::from_secs(15)))
}

/// Sends published events to PostgreSQL in batches until `shutdown` flips.
pub async fn forward(pool: PgPool, mut pending: mpsc::UnboundedReceiver<String>, mut shutdown: watch::Receiver<bool>) {
    loop {
        let first = tokio::select! {
            next = pending.recv() => match next { Some(event) => event, None => return },
            _ = shutdown.changed() => return,
        };
        let mut batch = vec![first];
        while batch.len() < 256 {
            match pending.try_recv() {
                Ok(event) => batch.push(event),
                Err(_) => break,
            }
        }
        let sent = sqlx::query("SELECT pg_notify($1, e) FROM unnest($2::text[]) AS e")
            .bind(EVENTS_CHANNEL)
            .bind(&batch)
            .execute(&pool)
            .await;
        if let Err(error) = sent {
            tracing::warn!(%error, dropped = batch.len(), "events not published");
        }
    }
}
