//! Rate limits per client IP and per credential (R20): 429 with `Retry-After`. The defaults sit far
//! above what a worker fleet or the CLI sends; `0` disables a limit. The admin key has its own limit
//! (R56; none by default), so operator tools reading the whole queue in a burst are not refused; a
//! request only counts as admin when it carries the right key.

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::extract::{ConnectInfo, Request};
use axum::http::{HeaderValue, StatusCode, header};
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

    /// The buckets a request is charged to: one per credential it presents (T5), each in the admin key's
    /// own limiter or the shared one, keyed by the secret's digest.
    fn credential_limits(&self, request: &Request) -> Vec<(&DefaultKeyedRateLimiter<[u8; 16]>, [u8; 16])> {
        if self.per_admin.is_none() && self.per_credential.is_none() {
            return Vec::new();
        }
        let mut buckets = presented_credentials(request.headers())
            .into_iter()
            .filter_map(|(header_name, digest)| {
                let is_admin = (header_name == API_KEY || header_name == BEARER)
                    && bool::from(subtle::ConstantTimeEq::ct_eq(&digest[..], &self.admin_digest[..]));
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
            })
            .collect::<Vec<_>>();
        // The same secret in two headers (admin key and Bearer) is one credential, charged once.
        buckets.sort_by_key(|(_, key)| *key);
        buckets.dedup_by_key(|(_, key)| *key);
        buckets
    }

    /// `Err(seconds to wait)` when the IP's limit or any presented credential's is exhausted.
    fn check(
        &self,
        ip: Option<IpAddr>,
        credentials: &[(&DefaultKeyedRateLimiter<[u8; 16]>, [u8; 16])],
    ) -> Result<(), u64> {
        if self.per_ip.is_none() && credentials.is_empty() {
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
        // Every bucket is charged (no short cut), so a junk credential beside a real one cannot spare it.
        let mut wait = None;
        for (limiter, credential) in credentials {
            if let Err(not_until) = limiter.check_key(credential) {
                let seconds = not_until.wait_time_from(now).as_secs() + 1;
                wait = Some(wait.map_or(seconds, |w: u64| w.max(seconds)));
            }
        }
        wait.map_or(Ok(()), Err)
    }
}

/// `Authorization: Bearer <secret>`, named for the rate limit.
const BEARER: &str = "authorization";

/// What may authenticate a request, for the per-credential limit (T5): every header that carries a
/// secret — admin key or role key (`X-API-Key`), worker token, VM token, build token, `Authorization:
/// Bearer` — with the SHA-256 of the secret presented. Each is charged, because which one authenticates
/// depends on the route (worker and VM-token routes ignore `X-API-Key`): charging only one would let a
/// varying junk header beside the real credential get a fresh bucket per request. Nothing a client may
/// vary freely beside a secret (a worker id, a query) is part of a key. New kinds of credential are
/// added here.
pub fn presented_credentials(headers: &axum::http::HeaderMap) -> Vec<(&'static str, [u8; 32])> {
    [API_KEY, WORKER_TOKEN, VM_TOKEN, BUILD_TOKEN, BEARER]
        .into_iter()
        .filter_map(|name| {
            let value = headers.get(name)?;
            let secret = if name == BEARER {
                value.to_str().ok()?.strip_prefix("Bearer ")?.trim().as_bytes()
            } else {
                value.to_str().map_or(value.as_bytes(), |v| v.trim().as_bytes())
            };
            Some((name, Sha256::digest(secret).into()))
        })
        .collect()
}

impl RateLimits {
    /// Charges `request` to its limits: past a limit, the answer to send instead of running it, 429
    /// `{"error": "Too many requests"}` with `Retry-After` (called by the per-route middleware).
    pub fn refusal(&self, request: &Request) -> Option<Response> {
        let ip = request.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip());
        // Hash the credential only when a limit applies to it.
        let credentials = self.credential_limits(request);
        self.check(ip, &credentials).err().map(|wait| {
            metrics_rejected();
            let mut response = ApiError::new(StatusCode::TOO_MANY_REQUESTS, "Too many requests").into_response();
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(wait.max(1)));
            response
        })
    }
}

fn metrics_rejected() {
    metrics::counter!(crate::metrics::RATE_LIMITED).increment(1);
}
