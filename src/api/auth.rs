//! Credentials (api.md §2): the admin key, build access tokens, worker tokens and VM tokens.
//! Secrets are compared as fixed-length digests in constant time (R6) and stored only as hashes.

use axum::http::HeaderMap;
use chrono::Utc;

use super::AppState;
use super::error::{ApiError, ApiResult};
use crate::identity::{self, Access, Principal, Role};
use crate::ids::{hash_secret, valid_id};
use crate::queue::{Build, Worker};

pub const API_KEY: &str = "x-api-key";
pub const BUILD_TOKEN: &str = "x-build-token";
pub const WORKER_TOKEN: &str = "x-worker-token";
pub const WORKER_ID: &str = "x-worker-id";
pub const VM_TOKEN: &str = "x-vm-token";

pub fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
}

/// Who an `X-API-Key` value is: the built-in admin key, or a stored key that is neither revoked nor
/// expired (401 `API key revoked` / `API key expired`); `None` for a value that is no key at all.
pub async fn principal(state: &AppState, presented: &str) -> ApiResult<Option<Principal>> {
    // One digest of the presented value serves both the built-in key's comparison and the stored
    // keys' look-up (which is by that same digest).
    let digest = crate::ids::secret_digest(presented);
    if crate::ids::digests_match(&digest, &state.secrets.api_key_digest) {
        return Ok(Some(Principal::BuiltIn));
    }
    let Some(key) = identity::lookup_digest(&state.pool, &state.keys, presented, &digest).await? else {
        return Ok(None);
    };
    if key.revoked_at.is_some() {
        return Err(ApiError::unauthorized("API key revoked"));
    }
    if key.expired(Utc::now()) {
        return Err(ApiError::unauthorized("API key expired"));
    }
    if key.enroll && key.spent_at.is_some() {
        return Err(ApiError::unauthorized("Enrollment key already used"));
    }
    Ok(Some(Principal::Key(key)))
}

/// A key whose role is too small: `/api/v2` says so with a code, G0 routes keep their wording.
pub fn insufficient_role(native: bool) -> ApiError {
    if native {
        ApiError::forbidden("Insufficient role").with_code("insufficient_role")
    } else {
        ApiError::forbidden("Invalid API key")
    }
}

/// The caller of `presented` when its role is one `access` admits (403 otherwise). An enrollment key
/// only registers (`enrolling` is set for the register route alone).
pub async fn key_with_access(
    state: &AppState,
    presented: &str,
    access: Access,
    native: bool,
    enrolling: bool,
) -> ApiResult<Principal> {
    let principal = principal(state, presented)
        .await?
        .ok_or_else(|| ApiError::forbidden("Invalid API key"))?;
    if !access.allows(principal.role()) || (principal.enrolling() && !enrolling) {
        return Err(insufficient_role(native));
    }
    Ok(principal)
}

/// Requires an `X-API-Key` whose role `access` admits: 401 when missing (or revoked, expired), 403
/// when wrong or too small a role.
pub async fn require_key(state: &AppState, headers: &HeaderMap, access: Access, native: bool) -> ApiResult<Principal> {
    match header(headers, API_KEY) {
        None => Err(ApiError::unauthorized("Missing X-API-Key header")),
        Some(key) => key_with_access(state, key, access, native, false).await,
    }
}

/// Whether a key may act for this worker: the admin (built-in or stored) for any, a worker key only
/// for the workers it registered (403 `Worker not registered with this key`, unknown workers too).
pub async fn may_act_for(state: &AppState, principal: &Principal, worker_id: &str) -> ApiResult<()> {
    let Some(key_id) = principal.key_id() else {
        return Ok(());
    };
    if principal.role() == Role::Admin {
        return Ok(());
    }
    let bound = worker_by_id(state, worker_id)
        .await?
        .is_some_and(|w| w.registered_by.as_deref() == Some(key_id));
    if bound {
        Ok(())
    } else {
        Err(ApiError::forbidden("Worker not registered with this key"))
    }
}

/// The key a request was authenticated with (set by the credential layer of key-accepting routes).
#[derive(Debug, Clone)]
pub struct KeyCaller(pub Principal);

/// A validated worker id from a header, query or form field; malformed ids are 400.
pub fn worker_id(value: Option<&str>) -> ApiResult<Option<String>> {
    match value.map(str::trim).filter(|v| !v.is_empty()) {
        None => Ok(None),
        Some(id) if valid_id(id) => Ok(Some(id.to_string())),
        Some(_) => Err(ApiError::bad_request("Invalid worker id")),
    }
}

/// The worker owning an unexpired, unrevoked token (from the short-lived cache when possible).
pub async fn worker_by_token(state: &AppState, token: &str) -> ApiResult<Worker> {
    let hash = hash_secret(token);
    let now = Utc::now();
    if let Some(worker) = state.workers.by_token(&hash)
        && worker.token_expires_at.is_some_and(|at| at > now)
    {
        return Ok(worker);
    }
    let worker: Option<Worker> = sqlx::query_as(
        "SELECT * FROM workers WHERE token_hash = $1 AND token_expires_at > $2 AND admin_state <> 'revoked'",
    )
    .bind(&hash)
    .bind(now)
    .fetch_optional(&state.pool)
    .await?;
    let worker = worker.ok_or_else(|| ApiError::unauthorized("Invalid or expired worker token"))?;
    state.workers.put_token(&hash, &worker);
    Ok(worker)
}

/// The worker with this id (from the short-lived cache when possible).
pub async fn worker_by_id(state: &AppState, id: &str) -> ApiResult<Option<Worker>> {
    if let Some(worker) = state.workers.by_id(id) {
        return Ok(Some(worker));
    }
    let worker = crate::queue::find_worker(&state.pool, id).await?;
    if let Some(worker) = &worker {
        state.workers.put_id(worker);
    }
    Ok(worker)
}

/// Owner endpoints without a key: this build's access token alone (R34).
pub fn require_build_token(headers: &HeaderMap, build: &Build) -> ApiResult<()> {
    let Some(token) = header(headers, BUILD_TOKEN) else {
        return Err(ApiError::unauthorized("Missing X-API-Key or X-Build-Token header"));
    };
    let presented = hash_secret(token);
    match &build.access_token_hash {
        Some(expected) if subtle::ConstantTimeEq::ct_eq(presented.as_slice(), expected.as_slice()).into() => Ok(()),
        _ => Err(ApiError::forbidden("Invalid or expired build token")),
    }
}

/// Rejects owner requests that carry no credential at all before the build is looked up.
pub fn require_owner_credential(headers: &HeaderMap) -> ApiResult<()> {
    if header(headers, API_KEY).is_none() && header(headers, BUILD_TOKEN).is_none() {
        return Err(ApiError::unauthorized("Missing X-API-Key or X-Build-Token header"));
    }
    Ok(())
}

/// Who is calling a build-scoped worker endpoint, resolved from one of the accepted credentials.
#[derive(Debug, Clone)]
pub struct BuildCaller {
    pub worker_id: String,
    /// Present when the credential is scoped to one attempt (VM token).
    pub lease_token: Option<i64>,
    /// Rule 4 (telemetry): only ids, no secret. Such a caller may add CPU samples to the build it
    /// holds, nothing else (no log lines, no lease extension), and its hold is checked before its body
    /// is read.
    pub keyless: bool,
}

impl BuildCaller {
    pub fn holder(&self) -> crate::queue::Holder<'_> {
        crate::queue::Holder {
            worker_id: &self.worker_id,
            lease_token: self.lease_token,
        }
    }

    /// Whether this caller holds the build's current attempt.
    pub fn holds(&self, build: &Build) -> bool {
        build.state().is_held()
            && build.lease_owner.as_deref() == Some(self.worker_id.as_str())
            && self.lease_token.is_none_or(|t| build.lease_token == Some(t))
    }
}

/// Which extra credential forms of api.md §2 an endpoint accepts, and how it words a missing worker id.
#[derive(Debug, Clone, Copy, Default)]
pub struct CallerRules {
    /// Rule 4 (telemetry): `X-Worker-Id` + `X-Build-Id` matching the current assignment, no key.
    pub worker_and_build_ids: bool,
    /// Rule 5 (log posts): `X-API-Key` carrying the attempt's unexpired OTP, with a matching `X-Worker-Id`.
    pub otp_as_api_key: bool,
    /// Answer a missing worker id with 400 `worker_id required` (heartbeat) instead of 401.
    pub worker_id_is_a_parameter: bool,
}

/// Resolves a build-scoped worker credential (api.md §2): a VM token of this build's current attempt,
/// a worker token, or the admin key with a worker id (header, or `fallback_worker_id` from the query or
/// form), plus the forms `rules` enables. The caller's hold on the build is checked by the operation.
pub async fn build_caller(
    state: &AppState,
    headers: &HeaderMap,
    build_id: &str,
    fallback_worker_id: Option<&str>,
    rules: CallerRules,
) -> ApiResult<BuildCaller> {
    if let Some(vm_token) = header(headers, VM_TOKEN) {
        let held: Option<(String, i64)> = sqlx::query_as(
            "SELECT lease_owner, lease_token FROM builds
             WHERE id = $1 AND vm_token_hash = $2 AND vm_token_expires_at > $3 AND state IN ('assigned', 'building')",
        )
        .bind(build_id)
        .bind(hash_secret(vm_token))
        .bind(Utc::now())
        .fetch_optional(&state.pool)
        .await?;
        let (worker_id, lease_token) = held.ok_or_else(|| ApiError::unauthorized("Invalid or expired VM token"))?;
        return Ok(BuildCaller {
            worker_id,
            lease_token: Some(lease_token),
            keyless: false,
        });
    }
    if let Some(token) = header(headers, WORKER_TOKEN) {
        let worker = worker_by_token(state, token).await?;
        return Ok(BuildCaller {
            worker_id: worker.id,
            lease_token: None,
            keyless: false,
        });
    }
    let named_worker = worker_id(header(headers, WORKER_ID))?.or(worker_id(fallback_worker_id)?);
    let key = header(headers, API_KEY);
    let who = match key {
        Some(key) => principal(state, key).await?,
        None => None,
    };
    match key {
        Some(_) if who.is_some() => {
            let who = who.unwrap_or(Principal::BuiltIn);
            if !Access::Worker.allows(who.role()) || who.enrolling() {
                return Err(ApiError::forbidden("Invalid API key"));
            }
            let worker_id = named_worker.ok_or_else(|| missing_worker(rules))?;
            may_act_for(state, &who, &worker_id).await?;
            Ok(BuildCaller {
                worker_id,
                lease_token: None,
                keyless: false,
            })
        }
        Some(key) if rules.otp_as_api_key && named_worker.is_some() => {
            let worker_id = named_worker.unwrap_or_default();
            let lease_token: Option<i64> = sqlx::query_scalar(
                "SELECT lease_token FROM builds WHERE id = $1 AND lease_owner = $2 AND otp_hash = $3
                   AND otp_expires_at > $4 AND state IN ('assigned', 'building')",
            )
            .bind(build_id)
            .bind(&worker_id)
            .bind(hash_secret(key))
            .bind(Utc::now())
            .fetch_optional(&state.pool)
            .await?;
            let lease_token = lease_token.ok_or_else(|| ApiError::forbidden("Invalid API key"))?;
            Ok(BuildCaller {
                worker_id,
                lease_token: Some(lease_token),
                keyless: false,
            })
        }
        Some(_) => Err(ApiError::forbidden("Invalid API key")),
        None => match (named_worker, header(headers, "x-build-id")) {
            (Some(worker_id), Some(named_build)) if rules.worker_and_build_ids => {
                if named_build != build_id {
                    return Err(ApiError::not_authorized_for_build());
                }
                Ok(BuildCaller {
                    worker_id,
                    lease_token: None,
                    keyless: true,
                })
            }
            _ => Err(ApiError::unauthorized("Missing X-API-Key header")),
        },
    }
}

/// Authenticates the credential of an upload before a byte of its body is read (R41): a VM token of
/// some attempt in progress, a valid worker token, or the admin key. Which build the caller may
/// report on is checked once the form names it ([`build_caller`]).
pub async fn require_upload_credential(state: &AppState, headers: &HeaderMap) -> ApiResult<()> {
    if let Some(vm_token) = header(headers, VM_TOKEN) {
        let held: Option<i32> = sqlx::query_scalar(
            "SELECT 1 FROM builds
             WHERE vm_token_hash = $1 AND vm_token_expires_at > $2 AND state IN ('assigned', 'building')
             LIMIT 1",
        )
        .bind(hash_secret(vm_token))
        .bind(Utc::now())
        .fetch_optional(&state.pool)
        .await?;
        return held
            .map(|_| ())
            .ok_or_else(|| ApiError::unauthorized("Invalid or expired VM token"));
    }
    if let Some(token) = header(headers, WORKER_TOKEN) {
        return worker_by_token(state, token).await.map(|_| ());
    }
    require_key(state, headers, Access::Worker, false).await.map(|_| ())
}

fn missing_worker(rules: CallerRules) -> ApiError {
    if rules.worker_id_is_a_parameter {
        ApiError::bad_request("worker_id required")
    } else {
        ApiError::unauthorized("Missing X-Worker-Id header")
    }
}

/// The credential a group of routes demands, enforced by a route layer ([`Credential::guard`]) that runs
/// before any handler: a route gets its credential from the group it is added to, never from a line
/// in its handler. Checks that need the request's build or form (which build a worker holds, whose
/// token a build carries) finish in the handler with [`build_caller`] or [`OwnedBuild`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Credential {
    /// No credential (health, statistics, the API document).
    Public,
    /// The admin key in `X-API-Key`: 401 when missing, 403 when wrong.
    Admin,
    /// The admin key in `X-API-Key` or `Authorization: Bearer` (Prometheus scrapers).
    AdminOrBearer,
    /// The admin key or the build's `X-Build-Token` (build owners); the token is matched against the
    /// build by [`OwnedBuild`].
    Owner,
    /// The admin key when one is presented, else a worker's `X-Worker-Token` (register).
    AdminOrWorkerToken,
    /// A worker's `X-Worker-Token` when one is presented, else the admin key (poll).
    WorkerTokenOrAdmin,
    /// A VM token of an attempt in progress, a worker token, or the admin key, checked before the
    /// body is read (uploads).
    Upload,
    /// A valid `X-Worker-Token` alone; the worker is handed to the handler as a request extension.
    WorkerToken,
    /// A build-scoped worker credential (api.md §2): VM token, worker token, admin key + worker id,
    /// or the telemetry and OTP forms. The layer only requires one of them to be present; the handler
    /// resolves it against the build by [`build_caller`] **before reading the body** (handlers take the
    /// body unread and call `extract::read_body` afterwards), so a stranger's body is never read.
    BuildScoped,
    /// The worker side of a build-scoped credential — a worker token, or the admin key + worker id —
    /// for what a VM must not ask (its own readiness and token, `vm-status`: a VM token is 403 there,
    /// api.md §4). Checked like [`Credential::BuildScoped`]; documented without the VM token.
    BuildScopedWorker,
    /// An `X-VM-Token` (presence checked by the layer), resolved against the build by [`build_caller`]
    /// before the body is read.
    VmToken,
    /// The attempt's one-time password, in the JSON body.
    Otp,
}

impl Credential {
    /// The security schemes of the OpenAPI document this credential accepts (any one of).
    pub fn schemes(self) -> &'static [&'static str] {
        match self {
            Credential::Public | Credential::Otp => &[],
            Credential::Admin => &["api_key"],
            Credential::AdminOrBearer => &["api_key", "bearer"],
            Credential::Owner => &["api_key", "build_token"],
            Credential::AdminOrWorkerToken | Credential::WorkerTokenOrAdmin => &["worker_token", "api_key"],
            Credential::Upload | Credential::BuildScoped => &["vm_token", "worker_token", "api_key"],
            Credential::BuildScopedWorker => &["worker_token", "api_key"],
            Credential::WorkerToken => &["worker_token"],
            Credential::VmToken => &["vm_token"],
        }
    }

    /// The credential's name in the document (`x-credential`).
    pub fn name(self) -> &'static str {
        match self {
            Credential::Public => "public",
            Credential::Admin => "admin_key",
            Credential::AdminOrBearer => "admin_key_or_bearer",
            Credential::Owner => "admin_key_or_build_token",
            Credential::AdminOrWorkerToken => "admin_key_or_worker_token",
            Credential::WorkerTokenOrAdmin => "worker_token_or_admin_key",
            Credential::Upload => "upload",
            Credential::WorkerToken => "worker_token",
            Credential::BuildScoped => "build_scoped",
            Credential::BuildScopedWorker => "build_scoped_worker",
            Credential::VmToken => "vm_token",
            Credential::Otp => "otp",
        }
    }

    /// The 401 message of a request without this credential; `None` for routes that need none.
    pub fn missing_message(self) -> Option<&'static str> {
        match self {
            Credential::Public | Credential::Otp => None,
            Credential::Owner => Some("Missing X-API-Key or X-Build-Token header"),
            Credential::WorkerToken => Some("Missing X-Worker-Token header"),
            Credential::VmToken => Some("Missing X-VM-Token header"),
            _ => Some("Missing X-API-Key header"),
        }
    }

    /// Refuses a request that does not carry this credential (401 missing, 403 wrong or too small a
    /// role for `access`), with the exact G0 wording; answers the worker of a worker token and the
    /// caller of a key.
    pub async fn check(
        self,
        state: &AppState,
        headers: &HeaderMap,
        access: Access,
        native: bool,
    ) -> ApiResult<(Option<Worker>, Option<Principal>)> {
        let key = |access| require_key(state, headers, access, native);
        match self {
            Credential::Public | Credential::Otp => Ok((None, None)),
            Credential::Admin => Ok((None, Some(key(access).await?))),
            Credential::AdminOrBearer => {
                let bearer = header(headers, "authorization").and_then(|v| v.strip_prefix("Bearer "));
                match (bearer, header(headers, API_KEY)) {
                    (Some(bearer), None) => Ok((
                        None,
                        Some(key_with_access(state, bearer.trim(), access, native, false).await?),
                    )),
                    _ => Ok((None, Some(key(access).await?))),
                }
            }
            Credential::Owner => require_owner_credential(headers).map(|()| (None, None)),
            Credential::WorkerTokenOrAdmin => match header(headers, WORKER_TOKEN) {
                Some(token) => worker_by_token(state, token).await.map(|w| (Some(w), None)),
                None => Ok((None, Some(key(access).await?))),
            },
            Credential::AdminOrWorkerToken => match (header(headers, API_KEY), header(headers, WORKER_TOKEN)) {
                // A key (with or without a worker token) is a key's call; a wrong key is 403.
                (Some(presented), _) => Ok((
                    None,
                    Some(key_with_access(state, presented, access, native, true).await?),
                )),
                (None, Some(token)) => worker_by_token(state, token).await.map(|w| (Some(w), None)),
                (None, None) => Err(ApiError::unauthorized("Missing X-API-Key header")),
            },
            Credential::Upload => require_upload_credential(state, headers).await.map(|()| (None, None)),
            Credential::WorkerToken => {
                let token = header(headers, WORKER_TOKEN)
                    .ok_or_else(|| ApiError::unauthorized("Missing X-Worker-Token header"))?;
                worker_by_token(state, token).await.map(|w| (Some(w), None))
            }
            Credential::BuildScoped | Credential::BuildScopedWorker => {
                let present = [VM_TOKEN, WORKER_TOKEN, API_KEY, WORKER_ID]
                    .iter()
                    .any(|name| header(headers, name).is_some());
                if present {
                    Ok((None, None))
                } else {
                    Err(ApiError::unauthorized("Missing X-API-Key header"))
                }
            }
            Credential::VmToken => match header(headers, VM_TOKEN) {
                Some(_) => Ok((None, None)),
                None => Err(ApiError::unauthorized("Missing X-VM-Token header")),
            },
        }
    }

    /// The route layer enforcing this credential, with the least role the route's entry in the role
    /// table (`group::access`) names. Its state is shared (one reference count per request, not a
    /// copy of every handle in the state), and the check's future is boxed apart, so what stays
    /// allocated while the route runs (a long poll waits for minutes) is small.
    pub async fn guard(
        axum::extract::State(guarded): axum::extract::State<std::sync::Arc<(AppState, Credential)>>,
        mut request: axum::extract::Request,
        next: axum::middleware::Next,
    ) -> axum::response::Response {
        let (state, credential) = &*guarded;
        use axum::response::IntoResponse;
        let path = request
            .extensions()
            .get::<axum::extract::MatchedPath>()
            .map(|p| p.as_str())
            .unwrap_or_default();
        // A route without an entry cannot be built (`Group::routes`); the fallback is the most restrictive.
        let access = super::group::access(request.method().as_str(), path).unwrap_or(Access::Admin);
        let native = request.uri().path().starts_with("/api/v2/");
        match Box::pin(credential.check(state, request.headers(), access, native)).await {
            Ok((worker, principal)) => {
                if let Some(worker) = worker {
                    request.extensions_mut().insert(TokenWorker(worker));
                }
                if let Some(principal) = principal {
                    request.extensions_mut().insert(KeyCaller(principal));
                }
                next.run(request).await
            }
            Err(e) => e.into_response(),
        }
    }
}

/// The worker a `X-Worker-Token` identified (set by the [`Credential::WorkerToken`] and
/// token-accepting layers).
#[derive(Debug, Clone)]
pub struct TokenWorker(pub Worker);

/// A build whose owner is calling: the admin key, the submitter key that submitted it, or this build's
/// token (401 without any, 404 unknown build — and another submitter's build, 403 wrong token or key).
/// Owner handlers take it instead of looking the build up.
pub struct OwnedBuild {
    pub build: Build,
    /// Whether the caller used an admin key (else a submitter key or the build token).
    pub admin: bool,
    /// Who is calling, for the audit row of an owner's action.
    pub actor: crate::audit::Actor,
}

impl axum::extract::FromRequestParts<AppState> for OwnedBuild {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, state: &AppState) -> ApiResult<Self> {
        let super::extract::IdPath(id) = super::extract::IdPath::from_request_parts(parts, state).await?;
        require_owner_credential(&parts.headers)?;
        // A wrong key is refused before the lookup, so it cannot tell which builds exist.
        let caller = match header(&parts.headers, API_KEY) {
            Some(presented) => Some(key_with_access(state, presented, Access::Submitter, false, false).await?),
            None => None,
        };
        // A build token for an unknown build is answered as a wrong token (T14): without a key, 404
        // versus 403 would tell a junk token which build ids exist.
        let build = crate::queue::find_build(&state.pool, &id).await?.ok_or_else(|| {
            if caller.is_some() {
                ApiError::build_not_found()
            } else {
                ApiError::forbidden("Invalid or expired build token")
            }
        })?;
        match &caller {
            Some(who) if who.role() == Role::Submitter => {
                if build.submitted_by.is_none() || build.submitted_by.as_deref() != who.key_id() {
                    return Err(ApiError::build_not_found());
                }
            }
            Some(_) => {}
            None => require_build_token(&parts.headers, &build)?,
        }
        let admin = caller.as_ref().is_some_and(|who| who.role() == Role::Admin);
        let (ip, user_agent) = client_of(parts);
        let actor = match &caller {
            Some(who) => crate::audit::Actor::key(who, ip, user_agent),
            None => crate::audit::Actor::build_token(ip, user_agent),
        };
        Ok(OwnedBuild { build, admin, actor })
    }
}

/// The client's address (the peer) and user agent, for audit rows.
pub fn client_of(parts: &axum::http::request::Parts) -> (Option<std::net::IpAddr>, Option<&str>) {
    let ip = parts
        .extensions
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0.ip());
    (ip, header(&parts.headers, "user-agent"))
}

/// The key behind a route of a key-taking group, as the actor of its audit row: the route layer
/// ([`Credential::guard`]) has checked the key and left it in the request.
impl axum::extract::FromRequestParts<AppState> for crate::audit::Actor {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, _: &AppState) -> ApiResult<Self> {
        let (ip, user_agent) = client_of(parts);
        match parts.extensions.get::<KeyCaller>() {
            Some(KeyCaller(who)) => Ok(crate::audit::Actor::key(who, ip, user_agent)),
            None => Err(ApiError::internal(anyhow::anyhow!(
                "an audited route was reached without a key ({})",
                parts.uri.path()
            ))),
        }
    }
}
