//! `/api/v2/webhooks`: signed webhook subscriptions (webhooks.md), for the admin and `submitter` keys
//! (the role table in `api::group` says so); a submitter key sees and changes only its own, whose
//! deliveries carry only its own builds. The work is in `crate::webhooks`.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::Deserialize;
use utoipa::IntoParams;
use utoipa_axum::routes;

use crate::api::AppState;
use crate::api::error::{ApiResult, CodedError};
use crate::api::extract::{IdPath, JsonBody, QueryParams, bounded_int};
use crate::api::group::ApiRouter;
use crate::audit::Actor;
use crate::webhooks::{
    self, CreatedWebhook, DeliveryPage, DeliveryView, WebhookPage, WebhookRequest, WebhookUpdate, WebhookView,
};

pub fn router() -> ApiRouter {
    ApiRouter::new()
        .routes(routes!(list, create))
        .routes(routes!(show, update, delete))
        .routes(routes!(test))
        .routes(routes!(deliveries))
        .routes(routes!(redeliver))
}

/// The caller's subscriptions (an admin: every one), newest first; never their secrets.
#[utoipa::path(get, path = "/api/v2/webhooks", responses(
    (status = 200, description = "Subscriptions, newest first", body = WebhookPage)))]
async fn list(State(state): State<AppState>, actor: Actor) -> ApiResult<Json<WebhookPage>> {
    Ok(Json(webhooks::list(&state.pool, &actor).await?))
}

/// Subscribes a URL to event kinds; the answer carries the signing secret, shown this once.
#[utoipa::path(post, path = "/api/v2/webhooks", request_body = WebhookRequest, responses(
    (status = 201, description = "Created, with the secret (shown once)", body = CreatedWebhook),
    (status = 400, description = "A field out of bounds, or a refused target (`webhook_target_refused`: cloud metadata, or a private address while CONTROLLER_WEBHOOK_ALLOW_PRIVATE is off)", body = CodedError)))]
async fn create(
    State(state): State<AppState>,
    actor: Actor,
    JsonBody(body): JsonBody<WebhookRequest>,
) -> ApiResult<(StatusCode, Json<CreatedWebhook>)> {
    let allow_private = state.config.webhooks.webhook_allow_private;
    let created = webhooks::create(&state.pool, &state.secrets.certs_key, allow_private, &body, &actor).await?;
    Ok((StatusCode::CREATED, Json(created)))
}

/// One subscription.
#[utoipa::path(get, path = "/api/v2/webhooks/{id}", params(("id" = String, Path, description = "Webhook id")), responses(
    (status = 200, description = "The subscription", body = WebhookView),
    (status = 404, description = "`Webhook not found`", body = CodedError)))]
async fn show(State(state): State<AppState>, IdPath(id): IdPath, actor: Actor) -> ApiResult<Json<WebhookView>> {
    Ok(Json(webhooks::show(&state.pool, &id, &actor).await?))
}

/// Changes a subscription's URL, events, description or `active`.
#[utoipa::path(patch, path = "/api/v2/webhooks/{id}", params(("id" = String, Path, description = "Webhook id")), request_body = WebhookUpdate, responses(
    (status = 200, description = "Changed", body = WebhookView),
    (status = 400, description = "A field out of bounds, or a refused target", body = CodedError),
    (status = 404, description = "`Webhook not found`", body = CodedError)))]
async fn update(
    State(state): State<AppState>,
    IdPath(id): IdPath,
    actor: Actor,
    JsonBody(body): JsonBody<WebhookUpdate>,
) -> ApiResult<Json<WebhookView>> {
    let allow_private = state.config.webhooks.webhook_allow_private;
    Ok(Json(
        webhooks::update(&state.pool, allow_private, &id, &body, &actor).await?,
    ))
}

/// Deletes a subscription with its deliveries.
#[utoipa::path(delete, path = "/api/v2/webhooks/{id}", params(("id" = String, Path, description = "Webhook id")), responses(
    (status = 204, description = "Deleted"),
    (status = 404, description = "`Webhook not found`", body = CodedError)))]
async fn delete(State(state): State<AppState>, IdPath(id): IdPath, actor: Actor) -> ApiResult<StatusCode> {
    webhooks::delete(&state.pool, &id, &actor).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Sends a `webhook.test` event to this subscription alone.
#[utoipa::path(post, path = "/api/v2/webhooks/{id}/test", params(("id" = String, Path, description = "Webhook id")), responses(
    (status = 202, description = "Queued", body = DeliveryView),
    (status = 404, description = "`Webhook not found`", body = CodedError)))]
async fn test(
    State(state): State<AppState>,
    IdPath(id): IdPath,
    actor: Actor,
) -> ApiResult<(StatusCode, Json<DeliveryView>)> {
    Ok((
        StatusCode::ACCEPTED,
        Json(webhooks::test(&state.pool, &id, &actor).await?),
    ))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct DeliveriesQuery {
    /// 1–500 (default 50).
    limit: Option<String>,
}

/// A subscription's deliveries, newest first, each with every attempt (time, status, latency, error,
/// next retry).
#[utoipa::path(get, path = "/api/v2/webhooks/{id}/deliveries", params(("id" = String, Path, description = "Webhook id"), DeliveriesQuery), responses(
    (status = 200, description = "Deliveries, newest first", body = DeliveryPage),
    (status = 404, description = "`Webhook not found`", body = CodedError)))]
async fn deliveries(
    State(state): State<AppState>,
    IdPath(id): IdPath,
    QueryParams(q): QueryParams<DeliveriesQuery>,
    actor: Actor,
) -> ApiResult<Json<DeliveryPage>> {
    let limit = bounded_int(q.limit.as_deref(), "limit", 1, 500)?.unwrap_or(50);
    Ok(Json(webhooks::deliveries(&state.pool, &id, limit, &actor).await?))
}

/// Sends a delivery again with the same message id; its retry period starts anew.
#[utoipa::path(post, path = "/api/v2/webhooks/deliveries/{id}/redeliver", params(("id" = String, Path, description = "Delivery id")), responses(
    (status = 202, description = "Queued", body = DeliveryView),
    (status = 404, description = "`Delivery not found`", body = CodedError),
    (status = 409, description = "`Delivery in flight`", body = CodedError)))]
async fn redeliver(
    State(state): State<AppState>,
    Path(id): Path<String>,
    actor: Actor,
) -> ApiResult<(StatusCode, Json<DeliveryView>)> {
    Ok((
        StatusCode::ACCEPTED,
        Json(webhooks::redeliver(&state.pool, &id, &actor).await?),
    ))
}
