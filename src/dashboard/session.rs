//! Dashboard sign-in: the admin key buys a session cookie (HttpOnly, SameSite=Strict, Secure behind
//! TLS, expiring, a random id whose SHA-256 alone is stored in `dashboard_sessions`, so every instance
//! shares sessions and a database leak yields no usable cookie). Every state-changing request carries
//! the session's CSRF token and an Origin (or Referer) of this host. Wrong keys are answered after a
//! delay, and sign-ins are rate limited per client IP.

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use chrono::{DateTime, Utc};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use sqlx::PgPool;

use super::cache::ReadCache;
use crate::api::{ApiError, AppState};
use crate::identity::{Access, Principal, Role};
use crate::ids::{hash_secret, new_secret, secret_matches};

/// The session cookie's name.
pub const COOKIE: &str = "expo_dashboard";
/// How long a wrong key waits before its answer.
pub const WRONG_KEY_DELAY: Duration = Duration::from_secs(1);

/// A signed-in operator.
#[derive(Debug, Clone)]
pub struct Session {
    id_hash: Vec<u8>,
    pub csrf: String,
    /// The key that signed in (`admin` for the built-in key) and its role.
    pub name: String,
    pub role: Role,
    /// The key's id (`None`: the built-in key).
    pub key_id: Option<String>,
    /// The client's address and user agent on this request, for audit rows.
    pub ip: Option<IpAddr>,
    pub user_agent: Option<String>,
    /// The newest event this instance had delivered when the request arrived, before the page read
    /// anything: the page's live stream resumes after it, so a change committed before the page was
    /// read but delivered (and so dropped from the read cache) only after is still followed.
    pub events_at: i64,
}

/// A live session's row: its CSRF token, and who signed in with which role.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct SessionRow {
    csrf_token: String,
    key_name: String,
    role: String,
    key_id: Option<String>,
}

/// The live session with this id hash; a session of a revoked or expired key is not live.
const SESSION_SQL: &str = "SELECT s.csrf_token, s.key_name, s.role, s.key_id FROM dashboard_sessions s
     LEFT JOIN api_keys k ON k.id = s.key_id
     WHERE s.id_hash = $1 AND s.expires_at > $2
       AND (s.key_id IS NULL OR (k.revoked_at IS NULL AND (k.expires_at IS NULL OR k.expires_at > $2)))";

impl Session {
    fn from_row(id_hash: Vec<u8>, row: &SessionRow) -> Session {
        Session {
            id_hash,
            csrf: row.csrf_token.clone(),
            name: row.key_name.clone(),
            // Only viewer, operator and admin keys sign in; anything else reads as the least of them.
            role: Role::parse(&row.role).unwrap_or(Role::Viewer),
            key_id: row.key_id.clone(),
            ip: None,
            user_agent: None,
            events_at: -1,
        }
    }

    /// Who acts through this session, for the audit row of its action.
    pub fn actor(&self) -> crate::audit::Actor {
        crate::audit::Actor {
            key_id: self.key_id.clone(),
            name: self.name.clone(),
            role: self.role.as_str().to_string(),
            ip: self.ip.map(|ip| ip.to_string()),
            user_agent: self.user_agent.clone(),
        }
    }

    /// Refuses (403) what this session's role may not do, whatever the page showed.
    pub fn may(&self, access: Access) -> Result<(), ApiError> {
        if access.allows(self.role) {
            Ok(())
        } else {
            tracing::warn!(role = self.role.as_str(), "dashboard action refused: insufficient role");
            Err(ApiError::forbidden("Insufficient role"))
        }
    }

    /// The CSRF token for action forms, empty when the role may not act (the pages then show no
    /// action controls).
    pub fn action_csrf(&self) -> &str {
        if Access::Operator.allows(self.role) {
            &self.csrf
        } else {
            ""
        }
    }
}

/// Who a sign-in key is, when it may sign in (viewer, operator or admin; not revoked or expired).
pub async fn sign_in_as(state: &AppState, presented: &str) -> Option<Principal> {
    crate::api::auth::principal(state, presented.trim())
        .await
        .ok()
        .flatten()
        .filter(|who| Access::Viewer.allows(who.role()))
}

/// Sign-in attempts per client IP.
pub struct SignInLimiter(DefaultKeyedRateLimiter<IpAddr>);

impl SignInLimiter {
    pub fn new(per_minute: u32) -> Self {
        let rate = NonZeroU32::new(per_minute).unwrap_or(NonZeroU32::MIN);
        Self(RateLimiter::dashmap(Quota::per_minute(rate)))
    }

    /// Whether this IP may try again now.
    pub fn allow(&self, ip: IpAddr) -> bool {
        if self.0.len() > 10_000 {
            self.0.retain_recent();
        }
        self.0.check_key(&ip).is_ok()
    }
}

/// The client's IP (the peer address; the dashboard never trusts forwarding headers for limits).
pub struct ClientIp(pub IpAddr);

impl<S: Send + Sync> FromRequestParts<S> for ClientIp {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let ip = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map_or(IpAddr::from([0, 0, 0, 0]), |c| c.0.ip());
        Ok(ClientIp(ip))
    }
}

/// Starts a session; returns the cookie value to set. The `dashboard.sign_in` audit row is written in
/// the same transaction (never the key).
pub async fn create(
    pool: &PgPool,
    ttl_secs: u64,
    who: &Principal,
    now: DateTime<Utc>,
    actor: &crate::audit::Actor,
) -> Result<String, sqlx::Error> {
    let id = new_secret();
    let expires = now + chrono::Duration::seconds(i64::try_from(ttl_secs).unwrap_or(i64::MAX / 2).min(31_536_000));
    sqlx::query("DELETE FROM dashboard_sessions WHERE expires_at < $1")
        .bind(now)
        .execute(pool)
        .await?;
    let mut tx = pool.begin().await?;
    sqlx::query(
        "INSERT INTO dashboard_sessions (id_hash, csrf_token, created_at, expires_at, key_id, key_name, role)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(hash_secret(&id))
    .bind(new_secret())
    .bind(now)
    .bind(expires)
    .bind(who.key_id())
    .bind(who.name())
    .bind(who.role().as_str())
    .execute(&mut *tx)
    .await?;
    let change = crate::audit::Change::new("dashboard.sign_in", "session", "dashboard")
        .after(serde_json::json!({ "outcome": "signed_in" }));
    crate::audit::record(&mut tx, actor, change).await?;
    tx.commit().await?;
    Ok(id)
}

/// Ends a session server-side.
pub async fn end(pool: &PgPool, session: &Session) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("DELETE FROM dashboard_sessions WHERE id_hash = $1")
        .bind(&session.id_hash)
        .execute(&mut *tx)
        .await?;
    let change = crate::audit::Change::new("dashboard.sign_out", "session", "dashboard");
    crate::audit::record(&mut tx, &session.actor(), change).await?;
    tx.commit().await?;
    Ok(())
}

/// The session named by the request's cookie, if it is live.
pub async fn from_headers(pool: &PgPool, headers: &HeaderMap) -> Result<Option<Session>, sqlx::Error> {
    let Some(id) = cookie(headers, COOKIE) else {
        return Ok(None);
    };
    if id.len() > 128 {
        return Ok(None);
    }
    let id_hash = hash_secret(id);
    let row: Option<SessionRow> = sqlx::query_as(SESSION_SQL)
        .bind(&id_hash)
        .bind(Utc::now())
        .fetch_optional(pool)
        .await?;
    Ok(row.map(|row| Session::from_row(id_hash, &row)))
}

/// Why a session lookup found nothing to cache.
enum Lookup {
    Missing,
    Db(sqlx::Error),
}

/// [`from_headers`] through the dashboard's read cache: a live session is looked up at most once per
/// TTL on this instance, however many pages it has open.
pub async fn from_headers_cached(
    pool: &PgPool,
    cache: &ReadCache,
    headers: &HeaderMap,
) -> Result<Option<Session>, sqlx::Error> {
    let Some(id) = cookie(headers, COOKIE) else {
        return Ok(None);
    };
    if id.len() > 128 {
        return Ok(None);
    }
    let id_hash = hash_secret(id);
    let found = cache
        .session(&id_hash, || async {
            sqlx::query_as::<_, SessionRow>(SESSION_SQL)
                .bind(&id_hash)
                .bind(Utc::now())
                .fetch_optional(pool)
                .await
                .map_err(Lookup::Db)?
                .ok_or(Lookup::Missing)
        })
        .await;
    match found {
        Ok(row) => Ok(Some(Session::from_row(id_hash, &row))),
        Err(Lookup::Missing) => Ok(None),
        Err(Lookup::Db(error)) => Err(error),
    }
}

/// The value of cookie `name`.
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find_map(|(k, v)| (k == name).then_some(v))
        .filter(|v| !v.is_empty())
}

/// Whether the request came over TLS (a terminating proxy says so in `X-Forwarded-Proto`).
fn over_tls(headers: &HeaderMap) -> bool {
    headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("https"))
}

/// `Set-Cookie` for a new session.
pub fn set_cookie(headers: &HeaderMap, id: &str, ttl_secs: u64) -> HeaderValue {
    let secure = if over_tls(headers) { "; Secure" } else { "" };
    let value = format!("{COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={ttl_secs}{secure}");
    HeaderValue::from_str(&value).unwrap_or(HeaderValue::from_static("expo_dashboard=; Path=/"))
}

/// `Set-Cookie` that removes the session cookie.
pub fn clear_cookie() -> HeaderValue {
    HeaderValue::from_static("expo_dashboard=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0")
}

/// A same-origin check for state-changing requests: `Origin` (or, failing that, `Referer`) must name
/// this host. Browsers send `Origin` on every form POST.
pub fn same_origin(headers: &HeaderMap) -> bool {
    let Some(host) = headers.get(header::HOST).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let source = headers
        .get(header::ORIGIN)
        .or_else(|| headers.get(header::REFERER))
        .and_then(|v| v.to_str().ok());
    let Some(source) = source else { return false };
    let rest = source
        .strip_prefix("http://")
        .or_else(|| source.strip_prefix("https://"));
    rest.is_some_and(|rest| rest.split('/').next() == Some(host))
}

/// Checks a state-changing request: same origin and the session's CSRF token.
pub fn check_action(session: &Session, headers: &HeaderMap, token: Option<&str>) -> Result<(), ApiError> {
    let token_ok = token.is_some_and(|t| secret_matches(t, &session.csrf));
    if same_origin(headers) && token_ok {
        Ok(())
    } else {
        Err(ApiError::forbidden("Cross-site request refused"))
    }
}

/// What a request without a live session gets: pages go to the sign-in form, everything else is 401.
pub struct SignInRequired {
    page: bool,
    /// The page asked for, so sign-in leads back to it.
    wanted: Option<String>,
}

/// A page to return to after sign-in: a dashboard path of this origin (never `//host` or a scheme),
/// short, and valid in a `Location` header.
pub fn safe_next(next: &str) -> Option<&str> {
    let ok = next.starts_with("/dashboard")
        && !next.starts_with("/dashboard/login")
        && !next.contains("//")
        && !next.contains('\\')
        && next.len() <= 1000
        && HeaderValue::from_str(next).is_ok();
    ok.then_some(next)
}

impl IntoResponse for SignInRequired {
    fn into_response(self) -> Response {
        if self.page {
            match self
                .wanted
                .as_deref()
                .and_then(safe_next)
                .filter(|w| *w != "/dashboard")
            {
                Some(wanted) => {
                    let query = form_urlencoded::Serializer::new(String::new())
                        .append_pair("next", wanted)
                        .finish();
                    Redirect::to(&format!("/dashboard/login?{query}")).into_response()
                }
                None => Redirect::to("/dashboard/login").into_response(),
            }
        } else {
            (StatusCode::UNAUTHORIZED, "Sign in required").into_response()
        }
    }
}

impl FromRequestParts<AppState> for Session {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let page = parts.method == axum::http::Method::GET
            && !parts.headers.contains_key("hx-request")
            && parts
                .headers
                .get(header::ACCEPT)
                .is_none_or(|v| v.to_str().is_ok_and(|v| v.contains("text/html") || v.contains("*/*")))
            && !parts.uri.path().ends_with("/events");
        let events_at = state.events.delivered();
        let found = match parts.extensions.get::<Arc<ReadCache>>() {
            Some(cache) => from_headers_cached(&state.pool, cache, &parts.headers).await,
            None => from_headers(&state.pool, &parts.headers).await,
        };
        match found {
            Ok(Some(mut session)) => {
                let (ip, user_agent) = crate::api::auth::client_of(parts);
                session.ip = ip;
                session.user_agent = user_agent.map(crate::audit::clip);
                session.events_at = events_at;
                Ok(session)
            }
            Ok(None) => Err(SignInRequired {
                page,
                wanted: parts.uri.path_and_query().map(|p| p.as_str().to_string()),
            }
            .into_response()),
            Err(error) => Err(super::pages::error_page(ApiError::from(error)).into_response()),
        }
    }
}

/// A header's value as text, if it is.
pub fn header_str(headers: &HeaderMap, name: header::HeaderName) -> Option<&str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}
