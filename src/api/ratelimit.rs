//! Rate limits per client IP and per credential (R20): 429 with `Retry-After`. The defaults sit far
//! above what a worker fleet or the CLI sends; `0` disables a limit. The admin key has its own limit
//! (R56; none by default), so operator tools reading the whole queue in a burst are not refused; a
//! request only counts as admin when it carries the right key.

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use sha2::{Digest, Sha256};

use super::auth::{API_KEY, BUILD_TOKEN, VM_TOKEN, WORKER_ID, WORKER_TOKEN};
use super::error::ApiError;

/// The limiters of one server.
pub struct RateLimits {
    per_ip: Option<DefaultKeyedRateLimiter<IpAddr>>,
    per_credential: Option<DefaultKeyedRateLimiter<[u8; 16]>>,
    per_admin: Option<DefaultKeyedRateLimiter<[u8; 16]>>,
    /// Digest of the admin key, to tell it from other credentials.
    admin_digest: [u8; 32],
    checks: AtomicU64,
    /// Built once: a new quanta clock runs CPUID (a VM exit under virtualisation) on every call.
    clock: DefaultClock,
}

/// The limits to apply, in requests per second (0 = none).
pub struct Rates {
    pub per_ip: u32,
    pub per_credential: u32,
    pub per_admin: u32,
}

/// How often (in checked requests) idle keys are forgotten, keeping memory bounded.
const RETAIN_EVERY: u64 = 10_000;

fn limiter<K: std::hash::Hash + Eq + Clone>(per_second: u32) -> Option<DefaultKeyedRateLimiter<K>> {
    let rate = NonZeroU32::new(per_second)?;
    let burst = NonZeroU32::new(per_second.saturating_mul(2)).unwrap_or(rate);
    Some(RateLimiter::dashmap(Quota::per_second(rate).allow_burst(burst)))
}

impl RateLimits {
    pub fn new(rates: Rates, admin_key: &str) -> Self {
        Self {
            per_ip: limiter(rates.per_ip),
            per_credential: limiter(rates.per_credential),
            per_admin: limiter(rates.per_admin),
            admin_digest: Sha256::digest(admin_key.as_bytes()).into(),
            checks: AtomicU64::new(0),
            clock: DefaultClock::default(),
        }
    }

    /// The limiter for a request's credential (the admin key's own, or the shared one) and the key
    /// within it.
    fn credential_limit(&self, request: &Request) -> Option<(&DefaultKeyedRateLimiter<[u8; 16]>, [u8; 16])> {
        if self.per_admin.is_none() && self.per_credential.is_none() {
            return None;
        }
        let (header_name, digest) = presented_credential(request.headers())?;
        let is_admin =
            header_name == API_KEY && bool::from(subtle::ConstantTimeEq::ct_eq(&digest[..], &self.admin_digest[..]));
        let limiter = if is_admin {
            self.per_admin.as_ref()
        } else {
            self.per_credential.as_ref()
        }?;
        let mut key = Sha256::new();
        key.update(digest);
        if is_admin {
            // G0 workers share the admin key: its own limit applies per worker id (R56).
            if let Some(worker) = request.headers().get(WORKER_ID) {
                key.update(worker.as_bytes());
            }
            if let Some(query) = request.uri().query() {
                query
                    .split('&')
                    .filter(|kv| kv.starts_with("worker_id="))
                    .for_each(|kv| key.update(kv.as_bytes()));
            }
        }
        let full = key.finalize();
        let mut short = [0u8; 16];
        short.copy_from_slice(&full[..16]);
        Some((limiter, short))
    }

    /// `Err(seconds to wait)` when either limit is exhausted.
    fn check(
        &self,
        ip: Option<IpAddr>,
        credential: Option<(&DefaultKeyedRateLimiter<[u8; 16]>, [u8; 16])>,
    ) -> Result<(), u64> {
        if self.per_ip.is_none() && credential.is_none() {
            return Ok(());
        }
        if self.checks.fetch_add(1, Ordering::Relaxed) % RETAIN_EVERY == RETAIN_EVERY - 1 {
            self.per_ip.iter().for_each(|l| l.retain_recent());
            self.per_credential.iter().for_each(|l| l.retain_recent());
            self.per_admin.iter().for_each(|l| l.retain_recent());
        }
        let now = self.clock.now();
        if let (Some(limiter), Some(ip)) = (&self.per_ip, ip) {
            limiter
                .check_key(&ip)
                .map_err(|not_until| not_until.wait_time_from(now).as_secs() + 1)?;
        }
        if let Some((limiter, credential)) = credential {
            limiter
                .check_key(&credential)
                .map_err(|not_until| not_until.wait_time_from(now).as_secs() + 1)?;
        }
        Ok(())
    }
}

/// What authenticates a request, for the per-credential limit (T5): the header that carries the
/// secret and the SHA-256 of the secret presented — admin key, worker token, VM token or build token.
/// Nothing a client may vary freely beside the secret (a worker id, a query) is part of it, so a wrong
/// key or a token is limited as one credential however the rest of the request changes. New kinds of
/// credential are added here.
pub fn presented_credential(headers: &axum::http::HeaderMap) -> Option<(&'static str, [u8; 32])> {
    [API_KEY, WORKER_TOKEN, VM_TOKEN, BUILD_TOKEN]
        .into_iter()
        .find_map(|name| {
            let value = headers.get(name)?;
            let trimmed = value.to_str().map_or(value.as_bytes(), |v| v.trim().as_bytes());
            Some((name, Sha256::digest(trimmed).into()))
        })
}

/// Middleware: 429 `{"error": "Too many requests"}` with `Retry-After` past a limit.
pub async fn enforce(State(limits): State<Arc<RateLimits>>, request: Request, next: Next) -> Response {
    let ip = request.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip());
    // Hash the credential only when a limit applies to it.
    let credential = limits.credential_limit(&request);
    match limits.check(ip, credential) {
        Ok(()) => next.run(request).await,
        Err(wait) => {
            metrics_rejected();
            let mut response = ApiError::new(StatusCode::TOO_MANY_REQUESTS, "Too many requests").into_response();
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(wait.max(1)));
            response
        }
    }
}

fn metrics_rejected() {
    metrics::counter!(crate::metrics::RATE_LIMITED).increment(1);
}
