//! The HTTP API (docs/openapi.yaml), in two parts a process composes as its role needs:
//!
//! - [`push_routes`]: `POST /v1/push`, push a message to uids and/or device tokens
//!   (standalone, gateway);
//! - [`ops_routes`]: `GET /healthz` (liveness) and `GET /metrics` (Prometheus), and a JSON
//!   404 for anything else (every role).
//!
//! It also holds what the gRPC push API shares with it: request validation
//! ([`validate_push`]), API keys ([`app_for_authorization`]) and the error mapping.
//!
//! Every error answers with a status and a JSON body
//! `{"error": {"code": "...", "message": "...", "field": "..."}}`; the mapping from
//! internal errors to statuses is [`ApiError::status`].

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use bytes::Bytes;
use http_body_util::BodyExt as _;
use pigeon_proto::device::Priority;
use serde::Deserialize;
use serde_json::json;
use serde_json::value::RawValue;
use tracing::Instrument as _;

use pigeon_proto::credential::{MAX_UID_LEN, valid_uid};

use crate::config::{AppSettings, Limits, Secret};
use crate::devices::{self, Devices};
use crate::message::{TagFilter, unix_millis};
use crate::metrics::Metrics;
use crate::push::{Class, Pipeline, PushError, PushOutcome, PushRequest};
use crate::rate_limit::{Limited, RateLimiter};
use crate::store::{Cancel, StoreError, TagChange};
use pigeon_proto::push as push_proto;

/// What the app-facing handlers (HTTP and gRPC) share.
pub struct PushApi {
    /// The apps, by API key.
    pub apps: Vec<AppSettings>,
    /// Request limits.
    pub limits: Limits,
    /// Where accepted pushes go.
    pub pipeline: Arc<Pipeline>,
    /// The device API (tags, aliases).
    pub devices: Arc<Devices>,
}

impl PushApi {
    /// The app-facing API of a process whose pushes and device lookups go to `store`, and
    /// whose live connections `fanout` reaches.
    pub fn new(
        apps: Vec<AppSettings>,
        limits: &Limits,
        store: Arc<dyn crate::store::Store>,
        fanout: Arc<dyn crate::push::Fanout>,
        metrics: Arc<Metrics>,
        buckets: Arc<dyn crate::rate_limit::Buckets>,
    ) -> Self {
        let limiter = Arc::new(RateLimiter::new(&apps, buckets));
        let pipeline = Pipeline::new(store.clone(), fanout.clone(), metrics, limiter, limits)
            .with_frequency_caps(&apps);
        Self {
            apps,
            limits: limits.clone(),
            pipeline: Arc::new(pipeline),
            devices: Arc::new(Devices::new(store, fanout, limits.clone())),
        }
    }
}

/// `POST /v1/push`, `GET /v1/messages/{id}` (a message's status), `DELETE
/// /v1/messages/{id}` (cancel a scheduled push), and the device
/// API: `GET` and `DELETE /v1/devices/{token}`,
/// `PUT /v1/devices/{token}/tags`, `PUT` and `DELETE /v1/devices/{token}/alias`,
/// `POST` and `GET /v1/tags/{tag}/devices`, `DELETE /v1/tags/{tag}`.
pub fn push_routes(api: Arc<PushApi>) -> Router {
    Router::new()
        .route("/v1/push", post(push))
        .route("/v1/devices/{token}", get(get_device).delete(delete_device))
        .route("/v1/devices/{token}/tags", put(put_tags))
        .route(
            "/v1/devices/{token}/alias",
            put(put_alias).delete(delete_alias),
        )
        .route(
            "/v1/tags/{tag}/devices",
            post(change_tag).get(list_tag_devices),
        )
        .route("/v1/tags/{tag}", delete(delete_tag))
        .route("/v1/messages/{id}", get(get_message).delete(cancel_message))
        .route(
            "/v1/users/{uid}/preferences",
            get(get_preferences).put(put_preferences),
        )
        .route("/v1/users/{uid}/devices", get(user_devices))
        .route("/v1/presence", get(presence))
        .route("/v1/stats", get(stats))
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .with_state(api)
}

/// What the health and metrics routes share.
struct Ops {
    metrics: Arc<Metrics>,
    /// `Bearer <token>` that `/metrics` requires, if any.
    authorization: Option<String>,
}

/// `GET /healthz`, `GET /metrics` (behind `metrics_token` when one is set), and a JSON 404
/// for every other path.
pub fn ops_routes(metrics: Arc<Metrics>, metrics_token: &Secret) -> Router {
    let token = metrics_token.expose();
    let ops = Ops {
        metrics,
        authorization: (!token.is_empty()).then(|| format!("Bearer {token}")),
    };
    Router::new()
        .route(
            "/healthz",
            get(|| async { axum::Json(json!({"status": "ok"})) }),
        )
        .route("/metrics", get(render_metrics))
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .fallback(|| async { ApiError::NotFound })
        .with_state(Arc::new(ops))
}

/// An API error, and what the caller sees of it.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No or a malformed `Authorization` header, or an unknown key.
    #[error("a valid API key is required: Authorization: Bearer <api key>")]
    Unauthorized,
    /// The body is not valid JSON or a field is invalid.
    #[error("{message}")]
    InvalidField {
        /// The field at fault, as a JSON path.
        field: String,
        /// What is wrong.
        message: String,
    },
    /// The payload (or the whole body) is over its limit.
    #[error("{0}")]
    TooLarge(String),
    /// The store cannot take more writes right now.
    #[error("overloaded, retry shortly")]
    Overloaded,
    /// The store failed; nothing was accepted.
    #[error("the message could not be stored; nothing was accepted")]
    Unavailable,
    /// No such route.
    #[error("no such endpoint")]
    NotFound,
    /// The token in the path is no device of the app.
    #[error("no device {0} in this app")]
    NoSuchDevice(String),
    /// The route exists, but not for this method.
    #[error("method not allowed here")]
    MethodNotAllowed,
    /// The request body could not be read (a malformed chunked encoding, a connection that
    /// broke off).
    #[error("the request body could not be read: {0}")]
    BadBody(String),
    /// The request body did not arrive within `limits.http_body_timeout`.
    #[error("the request body did not arrive in time")]
    BodyTimeout,
    /// The scheduled message has been sent (or is being sent): too late to cancel.
    #[error("message {0} has been sent; it can no longer be cancelled")]
    AlreadySent(String),
    /// No scheduled message of the app has that id.
    #[error("no scheduled message {0} in this app")]
    NoSuchMessage(String),
    /// No message of the app with that id has a status (none had, or it expired).
    #[error("no message {0} in this app (a status is kept for limits.message_retention)")]
    NoSuchStatus(String),
    /// A rate limit of the app is full; nothing was accepted.
    #[error("over the app's rate limit {}; retry after {} ms", .0.limit, .0.retry_after.as_millis())]
    RateLimited(Limited),
}

impl ApiError {
    /// The HTTP status of this error.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::InvalidField { .. } => StatusCode::BAD_REQUEST,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Overloaded | ApiError::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::NotFound
            | ApiError::NoSuchDevice(_)
            | ApiError::NoSuchMessage(_)
            | ApiError::NoSuchStatus(_) => StatusCode::NOT_FOUND,
            ApiError::AlreadySent(_) => StatusCode::CONFLICT,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::BadBody(_) => StatusCode::BAD_REQUEST,
            ApiError::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
        }
    }

    fn code(&self) -> &'static str {
        match self {
            ApiError::Unauthorized => "unauthorized",
            ApiError::InvalidField { .. } => "invalid_request",
            ApiError::TooLarge(_) => "too_large",
            ApiError::Overloaded => "overloaded",
            ApiError::RateLimited(_) => "rate_limited",
            ApiError::Unavailable => "unavailable",
            ApiError::NotFound
            | ApiError::NoSuchDevice(_)
            | ApiError::NoSuchMessage(_)
            | ApiError::NoSuchStatus(_) => "not_found",
            ApiError::AlreadySent(_) => "already_sent",
            ApiError::MethodNotAllowed => "method_not_allowed",
            ApiError::BadBody(_) => "bad_body",
            ApiError::BodyTimeout => "request_timeout",
        }
    }

    /// A field at fault, and what is wrong with it.
    pub(crate) fn invalid(field: &str, message: impl Into<String>) -> Self {
        ApiError::InvalidField {
            field: field.to_owned(),
            message: message.into(),
        }
    }
}

/// The gRPC push API's answer for each error.
impl From<ApiError> for tonic::Status {
    fn from(error: ApiError) -> Self {
        use tonic::Status;
        match &error {
            ApiError::Unauthorized => Status::unauthenticated(error.to_string()),
            ApiError::InvalidField { field, message } => {
                Status::invalid_argument(format!("{field}: {message}"))
            }
            ApiError::TooLarge(message) => Status::invalid_argument(message.clone()),
            ApiError::BadBody(_) => Status::invalid_argument(error.to_string()),
            ApiError::Overloaded => Status::resource_exhausted(error.to_string()),
            ApiError::Unavailable => Status::unavailable(error.to_string()),
            ApiError::BodyTimeout => Status::deadline_exceeded(error.to_string()),
            ApiError::NotFound | ApiError::MethodNotAllowed => {
                Status::unimplemented(error.to_string())
            }
            ApiError::NoSuchDevice(_) | ApiError::NoSuchMessage(_) | ApiError::NoSuchStatus(_) => {
                Status::not_found(error.to_string())
            }
            ApiError::AlreadySent(_) => Status::failed_precondition(error.to_string()),
            ApiError::RateLimited(limited) => {
                let mut status = Status::resource_exhausted(error.to_string());
                if let Ok(value) = retry_after_seconds(limited.retry_after).to_string().parse() {
                    status.metadata_mut().insert("retry-after", value);
                }
                status
            }
        }
    }
}

/// Whole seconds to wait, rounded up, as `Retry-After` counts them.
fn retry_after_seconds(wait: Duration) -> u64 {
    wait.as_micros().div_ceil(1_000_000).max(1) as u64
}

impl From<PushError> for ApiError {
    fn from(error: PushError) -> Self {
        match error {
            PushError::Store(error) => error.into(),
            PushError::Limited(limited) => ApiError::RateLimited(limited),
            PushError::Shed => ApiError::Overloaded,
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::Overloaded => ApiError::Overloaded,
            StoreError::Backend(_) | StoreError::Closed => {
                tracing::error!(%error, "push not accepted");
                ApiError::Unavailable
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({"code": self.code(), "message": self.to_string()});
        if let ApiError::InvalidField { field, .. } = &self {
            body["field"] = json!(field);
        }
        if let ApiError::RateLimited(limited) = &self {
            body["limit"] = json!(limited.limit);
            body["retry_after_ms"] = json!(limited.retry_after.as_millis() as u64);
        }
        let mut response = (self.status(), axum::Json(json!({ "error": body }))).into_response();
        match self {
            ApiError::Overloaded | ApiError::Unavailable => {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            ApiError::RateLimited(limited) => {
                response.headers_mut().insert(
                    header::RETRY_AFTER,
                    HeaderValue::from(retry_after_seconds(limited.retry_after)),
                );
            }
            ApiError::Unauthorized => {
                response
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            // The rest of the body may still be on its way, or never come: the connection
            // cannot carry another request.
            ApiError::BadBody(_) | ApiError::BodyTimeout | ApiError::TooLarge(_) => {
                response
                    .headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            _ => {}
        }
        response
    }
}

/// A push request's body. Each object of it is read through [`Object`], so that only a JSON
/// object is taken for one (serde would also take an array of the fields in order).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PushBody {
    audience: Object<AudienceBody>,
    payload: Box<RawValue>,
    #[serde(default)]
    ttl: Option<u64>,
    #[serde(default)]
    priority: Option<PriorityBody>,
    #[serde(default)]
    collapse_key: Option<String>,
    #[serde(default)]
    idempotency_key: Option<String>,
    #[serde(default)]
    class: Option<ClassBody>,
    #[serde(default)]
    send_at: Option<String>,
    #[serde(default)]
    category: Option<String>,
    #[serde(default)]
    pace: Option<u64>,
}

/// A push's `class`.
#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum ClassBody {
    Realtime,
    Notification,
    Marketing,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AudienceBody {
    #[serde(default)]
    uids: Vec<String>,
    #[serde(default)]
    tokens: Vec<String>,
    #[serde(default)]
    aliases: Vec<String>,
    #[serde(default)]
    all: bool,
    #[serde(default)]
    tags: Vec<String>,
    #[serde(default)]
    tags_and: Vec<String>,
    #[serde(default)]
    tags_not: Vec<String>,
}

/// Tags one push may name in each of `tags`, `tags_and` and `tags_not`, at most.
pub const MAX_TAGS_PER_KIND: usize = 20;

/// A `T` that must be written as a JSON object.
struct Object<T>(T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Object<T> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ObjectVisitor<T>(std::marker::PhantomData<T>);

        impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for ObjectVisitor<T> {
            type Value = T;

            fn expecting(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                formatter.write_str("a JSON object")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
                T::deserialize(serde::de::value::MapAccessDeserializer::new(map))
            }
        }

        deserializer
            .deserialize_map(ObjectVisitor(std::marker::PhantomData))
            .map(Object)
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum PriorityBody {
    High,
    Normal,
    Low,
}

const MAX_ID_LEN: usize = 256;
const MAX_KEY_LEN: usize = 128;
/// The longest a push's delivery may be spread over (`pace`): a day.
const MAX_PACE_SECONDS: u64 = 24 * 3600;

async fn render_metrics(State(ops): State<Arc<Ops>>, headers: HeaderMap) -> Response {
    if let Some(expected) = &ops.authorization {
        let presented = headers
            .get(header::AUTHORIZATION)
            .map(|value| value.as_bytes())
            .unwrap_or_default();
        if !constant_time_eq(presented, expected.as_bytes()) {
            return ApiError::Unauthorized.into_response();
        }
    }
    let text = ops.metrics.render();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

async fn push(State(api): State<Arc<PushApi>>, request: Request) -> Response {
    match handle_push(&api, request).await {
        Ok(response) => response,
        Err(error) => error.into_response(),
    }
}

/// The one path parameter of a route, or an error naming it.
fn path_param(path: Result<Path<String>, PathRejection>, name: &str) -> Result<String, ApiError> {
    path.map(|Path(value)| value)
        .map_err(|rejection| ApiError::invalid(name, rejection.body_text()))
}

/// A 200 with `body` as JSON.
fn ok(body: serde_json::Value) -> Response {
    (StatusCode::OK, axum::Json(body)).into_response()
}

/// Runs a device-API handler, turning its error into the JSON answer.
fn answer(result: Result<Response, ApiError>) -> Response {
    result.unwrap_or_else(IntoResponse::into_response)
}

async fn get_device(
    State(api): State<Arc<PushApi>>,
    headers: HeaderMap,
    token: Result<Path<String>, PathRejection>,
) -> Response {
    answer(
        async {
            let app = authenticate(&api.apps, &headers)?;
            let token = path_param(token, "token")?;
            let device = api.devices.get(&app.id, &token).await?;
            Ok(ok(json!(device)))
        }
        .await,
    )
}

/// `DELETE /v1/devices/{token}`: unregisters a device.
async fn delete_device(
    State(api): State<Arc<PushApi>>,
    headers: HeaderMap,
    token: Result<Path<String>, PathRejection>,
) -> Response {
    answer(
        async {
            let app = authenticate(&api.apps, &headers)?;
            let token = path_param(token, "token")?;
            api.devices.unregister(&app.id, &token).await?;
            Ok(ok(json!({"token": token, "unregistered": true})))
        }
        .await,
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TagsBody {
    tags: Vec<String>,
}

async fn put_tags(
    State(api): State<Arc<PushApi>>,
    token: Result<Path<String>, PathRejection>,
    request: Request,
) -> Response {
    answer(
        async {
            let app = authenticate(&api.apps, request.headers())?;
            let token = path_param(token, "token")?;
            let body: TagsBody = parse_json(&read_body(request, &api.limits).await?)?;
            let tags = api.devices.set_tags(&app.id, &token, body.tags).await?;
            Ok(ok(json!({"token": token, "tags": tags})))
        }
        .await,
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AliasBody {
    alias: String,
}

async fn put_alias(
    State(api): State<Arc<PushApi>>,
    token: Result<Path<String>, PathRejection>,
    request: Request,
) -> Response {
    answer(
        async {
            let app = authenticate(&api.apps, request.headers())?;
            let token = path_param(token, "token")?;
            let body: AliasBody = parse_json(&read_body(request, &api.limits).await?)?;
            api.devices
                .set_alias(&app.id, &token, Some(&body.alias))
                .await?;
            Ok(ok(json!({"token": token, "alias": body.alias})))
        }
        .await,
    )
}

async fn delete_alias(
    State(api): State<Arc<PushApi>>,
    headers: HeaderMap,
    token: Result<Path<String>, PathRejection>,
) -> Response {
    answer(
        async {
            let app = authenticate(&api.apps, &headers)?;
            let token = path_param(token, "token")?;
            api.devices.set_alias(&app.id, &token, None).await?;
            Ok(ok(json!({"token": token, "alias": null})))
        }
        .await,
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TagChangeBody {
    #[serde(default)]
    add: Vec<String>,
    #[serde(default)]
    remove: Vec<String>,
}

async fn change_tag(
    State(api): State<Arc<PushApi>>,
    tag: Result<Path<String>, PathRejection>,
    request: Request,
) -> Response {
    answer(
        async {
            let app = authenticate(&api.apps, request.headers())?;
            let tag = path_param(tag, "tag")?;
            let body: TagChangeBody = parse_json(&read_body(request, &api.limits).await?)?;
            let change = TagChange {
                add: body.add,
                remove: body.remove,
            };
            let changed = api.devices.change_tag(&app.id, &tag, change).await?;
            Ok(ok(json!(changed)))
        }
        .await,
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PageQuery {
    #[serde(default)]
    cursor: String,
    limit: Option<usize>,
}

async fn list_tag_devices(
    State(api): State<Arc<PushApi>>,
    headers: HeaderMap,
    tag: Result<Path<String>, PathRejection>,
    query: Result<Query<PageQuery>, QueryRejection>,
) -> Response {
    answer(
        async {
            let app = authenticate(&api.apps, &headers)?;
            let tag = path_param(tag, "tag")?;
            let Query(query) =
                query.map_err(|rejection| ApiError::invalid("query", rejection.body_text()))?;
            let page = api
                .devices
                .tag_devices(&app.id, &tag, &query.cursor, query.limit)
                .await?;
            Ok(ok(json!(page)))
        }
        .await,
    )
}

async fn delete_tag(
    State(api): State<Arc<PushApi>>,
    headers: HeaderMap,
    tag: Result<Path<String>, PathRejection>,
) -> Response {
    answer(
        async {
            let app = authenticate(&api.apps, &headers)?;
            let tag = path_param(tag, "tag")?;
            let removed = api.devices.delete_tag(&app.id, &tag).await?;
            Ok(ok(json!({"tag": tag, "removed": removed})))
        }
        .await,
    )
}

async fn handle_push(api: &PushApi, request: Request) -> Result<Response, ApiError> {
    let app = authenticate(&api.apps, request.headers())?;
    let span = crate::telemetry::push_span(&app.id, &crate::telemetry::Headers(request.headers()));
    let limits = &api.limits;
    let body = read_body(request, limits).await?;
    let request = parse_push(&app.id, &body, limits)?;
    let outcome = api.pipeline.push(request).instrument(span).await?;
    let body = match outcome {
        PushOutcome::Accepted {
            message_id,
            targets,
        } => json!({"message_id": message_id, "targets": targets}),
        PushOutcome::Duplicate { message_id } => {
            json!({"message_id": message_id, "duplicate": true})
        }
        PushOutcome::Scheduled {
            message_id,
            send_at_ms,
        } => json!({"message_id": message_id, "scheduled": true, "send_at": rfc3339(send_at_ms)}),
    };
    Ok((StatusCode::ACCEPTED, axum::Json(body)).into_response())
}

/// `GET /v1/users/{uid}/devices`.
async fn user_devices(
    State(api): State<Arc<PushApi>>,
    headers: HeaderMap,
    uid: Result<Path<String>, PathRejection>,
) -> Response {
    answer(
        async {
            let app = authenticate(&api.apps, &headers)?;
            let uid = path_param(uid, "uid")?;
            let devices = api.devices.of_user(&app.id, &uid).await?;
            Ok(ok(json!({"uid": uid, "devices": devices})))
        }
        .await,
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PresenceQuery {
    uids: String,
}

/// `GET /v1/presence?uids=a,b`.
async fn presence(
    State(api): State<Arc<PushApi>>,
    headers: HeaderMap,
    query: Result<Query<PresenceQuery>, QueryRejection>,
) -> Response {
    answer(
        async {
            let app = authenticate(&api.apps, &headers)?;
            let Query(query) =
                query.map_err(|rejection| ApiError::invalid("uids", rejection.body_text()))?;
            let uids: Vec<String> = query.uids.split(',').map(str::to_owned).collect();
            let presence = api.devices.presence(&app.id, &uids).await?;
            Ok(ok(json!({"presence": presence})))
        }
        .await,
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StatsQuery {
    from: Option<String>,
    to: Option<String>,
    step: Option<String>,
}

/// The minutes `from..to` and the step (minutes) of a statistics request from `from_ms`
/// (by default the hour up to the end of `to`'s minute) to `to_ms`, by `step` (by default a
/// minute): whole minutes, at most [`crate::stats::MAX_POINTS`] points; else an error naming
/// the field (HTTP and gRPC alike).
pub fn stats_range(
    from_ms: Option<u64>,
    to_ms: u64,
    step: Option<Duration>,
) -> Result<(u64, u64, u64), ApiError> {
    let from_ms = from_ms.unwrap_or(to_ms.div_ceil(60_000).saturating_sub(60) * 60_000);
    let step = step.unwrap_or(Duration::from_secs(60));
    if step.as_secs() < 60 || !step.as_secs().is_multiple_of(60) || step.subsec_nanos() != 0 {
        return Err(ApiError::invalid(
            "step",
            "must be whole minutes (1m at least)",
        ));
    }
    if from_ms >= to_ms {
        return Err(ApiError::invalid("to", "must be after from"));
    }
    // Whole minutes: from the one `from` is in to the one `to` is in.
    let (from, to) = (from_ms / 60_000, to_ms.div_ceil(60_000));
    let step = step.as_secs() / 60;
    if (to - from).div_ceil(step) > crate::stats::MAX_POINTS {
        return Err(ApiError::invalid(
            "step",
            format!(
                "gives more than {} points from `from` to `to`: take a longer step",
                crate::stats::MAX_POINTS
            ),
        ));
    }
    Ok((from, to, step))
}

/// `GET /v1/stats?from=&to=&step=`: the app's counts per class, a point per step (whole
/// minutes) from `from` to `to` (RFC 3339; by default the last hour, by the minute).
async fn stats(
    State(api): State<Arc<PushApi>>,
    headers: HeaderMap,
    query: Result<Query<StatsQuery>, QueryRejection>,
) -> Response {
    answer(
        async {
            let app = authenticate(&api.apps, &headers)?;
            let Query(query) =
                query.map_err(|rejection| ApiError::invalid("query", rejection.body_text()))?;
            let time = |field: &str, text: Option<&String>, default_ms: u64| match text {
                None => Ok(default_ms),
                Some(text) => parse_rfc3339(text)
                    .ok_or_else(|| ApiError::invalid(field, "must be an RFC 3339 time")),
            };
            let to_ms = time("to", query.to.as_ref(), unix_millis())?;
            let from_ms = query
                .from
                .as_ref()
                .map(|from| time("from", Some(from), 0))
                .transpose()?;
            let step = match &query.step {
                None => None,
                Some(text) => Some(
                    crate::config::parse_duration(text)
                        .map_err(|message| ApiError::invalid("step", message))?,
                ),
            };
            let (from, to, step) = stats_range(from_ms, to_ms, step)?;
            let points = api.pipeline.stats(&app.id, (from, to), step).await?;
            let points: Vec<_> = points
                .iter()
                .map(|point| {
                    let mut body = json!({"at": rfc3339(point.minute * 60_000)});
                    for (class, counts) in Class::ALL.iter().zip(&point.classes) {
                        body[class.name()] = json!({
                            "pushes": counts.pushes,
                            "targets": counts.targets,
                            "delivered": counts.delivered,
                            "acked": counts.acked,
                            "opened": counts.opened,
                            "expired": counts.expiring.max(0),
                        });
                    }
                    body
                })
                .collect();
            Ok(ok(json!({
                "from": rfc3339(from * 60_000),
                "to": rfc3339(to * 60_000),
                "step_seconds": step * 60,
                "points": points,
            })))
        }
        .await,
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PreferencesBody {
    opt_out: Vec<String>,
}

/// `GET /v1/users/{uid}/preferences`.
async fn get_preferences(
    State(api): State<Arc<PushApi>>,
    headers: HeaderMap,
    uid: Result<Path<String>, PathRejection>,
) -> Response {
    answer(
        async {
            let app = authenticate(&api.apps, &headers)?;
            let uid = path_param(uid, "uid")?;
            let opt_out = api.devices.opt_out(&app.id, &uid).await?;
            Ok(ok(json!({"uid": uid, "opt_out": opt_out})))
        }
        .await,
    )
}

/// `PUT /v1/users/{uid}/preferences`: replaces what the user opted out of.
async fn put_preferences(
    State(api): State<Arc<PushApi>>,
    uid: Result<Path<String>, PathRejection>,
    request: Request,
) -> Response {
    answer(
        async {
            let app = authenticate(&api.apps, request.headers())?;
            let uid = path_param(uid, "uid")?;
            let body: PreferencesBody = parse_json(&read_body(request, &api.limits).await?)?;
            let opt_out = api.devices.set_opt_out(&app.id, &uid, body.opt_out).await?;
            Ok(ok(json!({"uid": uid, "opt_out": opt_out})))
        }
        .await,
    )
}

/// `DELETE /v1/messages/{id}`: cancels a scheduled push that has not been sent.
async fn cancel_message(
    State(api): State<Arc<PushApi>>,
    headers: HeaderMap,
    id: Result<Path<String>, PathRejection>,
) -> Response {
    answer(
        async {
            let app = authenticate(&api.apps, &headers)?;
            let id = path_param(id, "id")?;
            cancel(&api.pipeline, &app.id, &id).await?;
            Ok(ok(json!({"message_id": id, "cancelled": true})))
        }
        .await,
    )
}

/// `GET /v1/messages/{id}`: the message's state, and what became of it.
async fn get_message(
    State(api): State<Arc<PushApi>>,
    headers: HeaderMap,
    id: Result<Path<String>, PathRejection>,
) -> Response {
    answer(
        async {
            let app = authenticate(&api.apps, &headers)?;
            let id = path_param(id, "id")?;
            let view = message_status(&api.pipeline, &app.id, &id).await?;
            Ok(ok(status_json(&view)))
        }
        .await,
    )
}

/// `app`'s message `id`'s status as the API shows it now (HTTP and gRPC alike).
pub async fn message_status(
    pipeline: &Pipeline,
    app: &str,
    id: &str,
) -> Result<push_proto::MessageStatus, ApiError> {
    if id.is_empty() || id.len() > MAX_KEY_LEN {
        return Err(ApiError::NoSuchStatus(id.to_owned()));
    }
    let record = pipeline.message_status(app, id).await?;
    match &record.status {
        Some(status) => Ok(status_view(id, status, &record, unix_millis())),
        None => Err(ApiError::NoSuchStatus(id.to_owned())),
    }
}

/// A message's status as the API shows it at `now_ms`. For a direct push, `targets` are
/// the devices it was recorded for; of those, `acked` acknowledged it, and the rest are
/// `waiting` until it expires, then `expired` (a TTL-0 push is never stored: the targets
/// it did not reach at once are `dropped`). A push stored once (to `all` or tags) has no
/// list of targets: its counts are of the devices that got it.
fn status_view(
    id: &str,
    status: &pigeon_proto::store::MessageStatus,
    record: &crate::store::StatusRecord,
    now_ms: u64,
) -> push_proto::MessageStatus {
    use pigeon_proto::store::message_status::State;
    let state = status.state();
    let accepted = state == State::Accepted;
    let ttl_zero = accepted && status.expires_at_ms == status.accepted_at_ms;
    let expired = accepted && now_ms >= status.expires_at_ms;
    let state_name = match state {
        State::Scheduled => "scheduled",
        State::Cancelled => "cancelled",
        State::Accepted if expired => "expired",
        State::Accepted | State::Unspecified => "accepted",
    };
    let targets = u64::from(status.targets);
    // Neither acknowledged nor put out of the device's queue by a newer push.
    let open = targets
        .saturating_sub(record.acked)
        .saturating_sub(record.collapsed)
        .saturating_sub(record.dropped);
    let mut dropped = u64::from(status.dropped) + record.dropped;
    let (waiting, lapsed) = match (status.shared, ttl_zero, expired) {
        (true, ..) => (None, None),
        (false, true, _) => {
            dropped += targets.saturating_sub(record.delivered);
            (Some(0), Some(0))
        }
        (false, false, true) => (Some(0), Some(open)),
        (false, false, false) => (Some(open), Some(0)),
    };
    push_proto::MessageStatus {
        message_id: id.to_owned(),
        state: state_name.to_owned(),
        class: status.class.clone(),
        audience: if status.shared { "shared" } else { "direct" }.to_owned(),
        accepted_at_ms: if accepted { status.accepted_at_ms } else { 0 },
        expires_at_ms: if accepted { status.expires_at_ms } else { 0 },
        send_at_ms: status.send_at_ms,
        targets: (!status.shared).then_some(targets),
        delivered: record.delivered,
        acked: record.acked,
        opened: record.opened,
        waiting,
        expired: lapsed,
        dropped,
        skipped: u64::from(status.skipped),
        unknown: u64::from(status.unknown),
        collapsed: record.collapsed,
    }
}

/// A message's status as JSON.
fn status_json(view: &push_proto::MessageStatus) -> serde_json::Value {
    let mut body = json!({
        "message_id": view.message_id,
        "state": view.state,
        "class": view.class,
        "audience": view.audience,
        "counts": {
            "targets": view.targets,
            "delivered": view.delivered,
            "acked": view.acked,
            "opened": view.opened,
            "waiting": view.waiting,
            "expired": view.expired,
            "collapsed": view.collapsed,
            "dropped": view.dropped,
            "skipped": view.skipped,
            "unknown": view.unknown,
        },
    });
    if view.accepted_at_ms > 0 {
        body["accepted_at"] = json!(rfc3339(view.accepted_at_ms));
        body["expires_at"] = json!(rfc3339(view.expires_at_ms));
    }
    if view.send_at_ms > 0 {
        body["send_at"] = json!(rfc3339(view.send_at_ms));
    }
    body
}

/// Cancels `app`'s scheduled push `id` (HTTP and gRPC alike).
pub async fn cancel(pipeline: &Pipeline, app: &str, id: &str) -> Result<(), ApiError> {
    if id.is_empty() || id.len() > MAX_KEY_LEN {
        return Err(ApiError::NoSuchMessage(id.to_owned()));
    }
    match pipeline.cancel(app, id).await? {
        Cancel::Cancelled => Ok(()),
        Cancel::Fired => Err(ApiError::AlreadySent(id.to_owned())),
        Cancel::Unknown => Err(ApiError::NoSuchMessage(id.to_owned())),
    }
}

/// Unix milliseconds as RFC 3339, in UTC.
pub fn rfc3339(unix_ms: u64) -> String {
    let nanos = i128::from(unix_ms) * 1_000_000;
    time::OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .ok()
        .and_then(|at| {
            at.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

/// An RFC 3339 time as unix milliseconds.
fn parse_rfc3339(text: &str) -> Option<u64> {
    let at =
        time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).ok()?;
    u64::try_from(at.unix_timestamp_nanos() / 1_000_000).ok()
}

/// The body of a request, within its size limit and `limits.http_body_timeout`.
async fn read_body(request: Request, limits: &Limits) -> Result<Bytes, ApiError> {
    // Room for the payload plus a full audience (or a tag change) of maximal ids, and the
    // JSON around them.
    let ids = limits.max_audience.max(limits.max_tag_batch);
    let limit = limits.max_payload_bytes + ids * (MAX_ID_LEN + 8) + 4096;
    let too_large = || ApiError::TooLarge(format!("request body is over {limit} bytes"));
    // A declared length over the limit is refused before the body is read, so a client that
    // asked `Expect: 100-continue` is not invited to send it.
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    if declared.is_some_and(|length| length > limit as u64) {
        return Err(too_large());
    }
    let body = http_body_util::Limited::new(request.into_body(), limit);
    let collected = tokio::time::timeout(limits.http_body_timeout, body.collect())
        .await
        .map_err(|_| ApiError::BodyTimeout)?;
    match collected {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(error) if error.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Err(error) => Err(ApiError::BadBody(error.to_string())),
    }
}

/// The app whose API key is in the `Authorization` header.
fn authenticate<'a>(
    apps: &'a [AppSettings],
    headers: &HeaderMap,
) -> Result<&'a AppSettings, ApiError> {
    let header = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok());
    app_for_authorization(apps, header)
}

/// The app whose API key an `Authorization` value (`Bearer <key>`) carries.
pub fn app_for_authorization<'a>(
    apps: &'a [AppSettings],
    authorization: Option<&str>,
) -> Result<&'a AppSettings, ApiError> {
    let key = authorization
        .and_then(|value| value.strip_prefix("Bearer "))
        .map(str::trim)
        .ok_or(ApiError::Unauthorized)?;
    // Compare against every app, in constant time per comparison, so timing says nothing
    // about which prefix of a key was right.
    let mut found = None;
    for app in apps {
        for api_key in app.api_keys() {
            if constant_time_eq(api_key.as_bytes(), key.as_bytes()) {
                found = Some(app);
            }
        }
    }
    found.ok_or(ApiError::Unauthorized)
}

/// Whether `a` and `b` are equal, in a time that depends only on their lengths.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Parses and validates a push body.
fn parse_push(app: &str, body: &[u8], limits: &Limits) -> Result<PushRequest, ApiError> {
    let parsed: PushBody = parse_json(body)?;
    validate_push(
        app,
        PushFields {
            uids: parsed.audience.0.uids,
            tokens: parsed.audience.0.tokens,
            aliases: parsed.audience.0.aliases,
            all: parsed.audience.0.all,
            tags: TagFilter {
                any: parsed.audience.0.tags,
                all: parsed.audience.0.tags_and,
                none: parsed.audience.0.tags_not,
            },
            payload: parsed.payload.get(),
            ttl_seconds: parsed.ttl,
            priority: match parsed.priority {
                Some(PriorityBody::High) => Priority::High,
                Some(PriorityBody::Low) => Priority::Low,
                Some(PriorityBody::Normal) | None => Priority::Normal,
            },
            collapse_key: parsed.collapse_key,
            idempotency_key: parsed.idempotency_key,
            class: match parsed.class {
                Some(ClassBody::Realtime) => Class::Realtime,
                Some(ClassBody::Marketing) => Class::Marketing,
                Some(ClassBody::Notification) | None => Class::Notification,
            },
            send_at: parsed.send_at,
            category: parsed.category,
            pace_seconds: parsed.pace,
        },
        limits,
    )
}

/// A request body that must be one JSON object of the shape `T`; errors name the field.
fn parse_json<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, ApiError> {
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    let Object(parsed): Object<T> =
        serde_path_to_error::deserialize(&mut deserializer).map_err(|error| {
            let path = error.path().to_string();
            let inner = error.into_inner();
            let field = if path == "." {
                // A missing or unknown field is reported at the parent: name it from the message.
                inner
                    .to_string()
                    .split('`')
                    .nth(1)
                    .unwrap_or("body")
                    .to_owned()
            } else {
                path
            };
            ApiError::invalid(&field, inner.to_string())
        })?;
    deserializer
        .end()
        .map_err(|error| ApiError::invalid("body", error.to_string()))?;
    Ok(parsed)
}

/// Checks that the payload is I-JSON (RFC 7493), which every device's JSON parser reads
/// alike: no lone surrogate in a string (`"\ud800"`), no number past the range of a double
/// (`1e999999`), no member name twice in one object. It is still relayed byte for byte.
fn check_json_text(payload: &str) -> Result<(), ApiError> {
    let mut deserializer = serde_json::Deserializer::from_str(payload);
    serde::Deserialize::deserialize(&mut deserializer)
        .and_then(|IJson| deserializer.end())
        .map_err(|error| ApiError::invalid("payload", format!("not I-JSON (RFC 7493): {error}")))
}

/// A JSON value that is I-JSON, checked as it is read, without building it.
struct IJson;

impl<'de> Deserialize<'de> for IJson {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(IJsonVisitor)
    }
}

struct IJsonVisitor;

impl<'de> serde::de::Visitor<'de> for IJsonVisitor {
    type Value = IJson;

    fn expecting(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("an I-JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<IJson, E> {
        Ok(IJson)
    }
    fn visit_i64<E>(self, _: i64) -> Result<IJson, E> {
        Ok(IJson)
    }
    fn visit_u64<E>(self, _: u64) -> Result<IJson, E> {
        Ok(IJson)
    }
    fn visit_f64<E: serde::de::Error>(self, value: f64) -> Result<IJson, E> {
        if value.is_finite() {
            Ok(IJson)
        } else {
            Err(E::custom("a number is out of the range of a double"))
        }
    }
    // Strings reach here decoded, so an unpaired surrogate escape has already failed.
    fn visit_str<E>(self, _: &str) -> Result<IJson, E> {
        Ok(IJson)
    }
    fn visit_unit<E>(self) -> Result<IJson, E> {
        Ok(IJson)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut items: A) -> Result<IJson, A::Error> {
        while items.next_element::<IJson>()?.is_some() {}
        Ok(IJson)
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut members: A) -> Result<IJson, A::Error> {
        let mut names = std::collections::HashSet::new();
        while let Some(name) = members.next_key::<String>()? {
            if !names.insert(name) {
                return Err(serde::de::Error::custom(
                    "a member name appears twice in an object",
                ));
            }
            members.next_value::<IJson>()?;
        }
        Ok(IJson)
    }
}

/// The fields of a push, however they arrived (JSON or gRPC), before validation.
#[derive(Debug)]
pub struct PushFields<'a> {
    /// Target uids.
    pub uids: Vec<String>,
    /// Target tokens.
    pub tokens: Vec<String>,
    /// Target aliases.
    pub aliases: Vec<String>,
    /// Every device of the app.
    pub all: bool,
    /// Devices by their tags (`tags`, `tags_and`, `tags_not`); empty lists name none.
    pub tags: TagFilter,
    /// The payload's JSON text, already known to be JSON.
    pub payload: &'a str,
    /// TTL in seconds, if given.
    pub ttl_seconds: Option<u64>,
    /// Priority.
    pub priority: Priority,
    /// Collapse key, if given.
    pub collapse_key: Option<String>,
    /// Idempotency key, if given.
    pub idempotency_key: Option<String>,
    /// Traffic class.
    pub class: Class,
    /// When to send it (RFC 3339), if later.
    pub send_at: Option<String>,
    /// Its category, if any.
    pub category: Option<String>,
    /// Seconds to spread its delivery over, if any.
    pub pace_seconds: Option<u64>,
}

/// Checks a push's fields against the limits; errors name the field (in the JSON API's
/// terms).
pub fn validate_push(
    app: &str,
    fields: PushFields<'_>,
    limits: &Limits,
) -> Result<PushRequest, ApiError> {
    let payload = fields.payload;
    if payload.len() > limits.max_payload_bytes {
        return Err(ApiError::TooLarge(format!(
            "payload is {} bytes; the limit is {}",
            payload.len(),
            limits.max_payload_bytes
        )));
    }
    let audience = AudienceBody {
        uids: fields.uids,
        tokens: fields.tokens,
        aliases: fields.aliases,
        all: fields.all,
        tags: Vec::new(),
        tags_and: Vec::new(),
        tags_not: Vec::new(),
    };
    let tags = fields.tags;
    let named = audience.uids.len() + audience.tokens.len() + audience.aliases.len();
    let by_tags = !(tags.any.is_empty() && tags.all.is_empty() && tags.none.is_empty());
    if audience.all && (named > 0 || by_tags) {
        return Err(ApiError::invalid(
            "audience.all",
            "every device of the app is everyone: name no uids, tokens, aliases or tags beside it",
        ));
    }
    if by_tags && named > 0 {
        return Err(ApiError::invalid(
            "audience",
            "tags (tags, tags_and, tags_not) cannot be combined with uids, tokens or aliases: push to each separately",
        ));
    }
    if named == 0 && !audience.all && !by_tags {
        return Err(ApiError::invalid(
            "audience",
            "name at least one of audience.uids, audience.tokens, audience.aliases, audience.tags, audience.tags_and or audience.tags_not, or set audience.all",
        ));
    }
    for (field, list) in [
        ("audience.tags", &tags.any),
        ("audience.tags_and", &tags.all),
        ("audience.tags_not", &tags.none),
    ] {
        if list.len() > MAX_TAGS_PER_KIND {
            return Err(ApiError::invalid(
                field,
                format!("at most {MAX_TAGS_PER_KIND} tags"),
            ));
        }
        devices::check_names(field, list)?;
    }
    if named > limits.max_audience {
        return Err(ApiError::invalid(
            "audience",
            format!(
                "at most {} uids, tokens and aliases per push",
                limits.max_audience
            ),
        ));
    }
    devices::check_names("audience.aliases", &audience.aliases)?;
    if let Some(index) = audience.uids.iter().position(|uid| !valid_uid(uid)) {
        return Err(ApiError::invalid(
            &format!("audience.uids[{index}]"),
            format!("must be 1 to {MAX_UID_LEN} bytes with no control characters"),
        ));
    }
    if let Some(index) = audience
        .tokens
        .iter()
        .position(|token| token.is_empty() || token.len() > MAX_ID_LEN)
    {
        return Err(ApiError::invalid(
            &format!("audience.tokens[{index}]"),
            format!("must be 1 to {MAX_ID_LEN} bytes"),
        ));
    }
    check_json_text(payload)?;
    let max_ttl = match fields.class {
        Class::Realtime => Duration::ZERO,
        Class::Notification => limits.max_ttl,
        Class::Marketing => limits.max_marketing_ttl.min(limits.max_ttl),
    };
    let ttl = match fields.ttl_seconds {
        None => limits.default_ttl.min(max_ttl),
        Some(seconds) => {
            let ttl = Duration::from_secs(seconds);
            if ttl > max_ttl {
                let message = match fields.class {
                    Class::Realtime => "a realtime push is never stored: 0 or none".to_owned(),
                    class => format!(
                        "at most {} seconds for class {}",
                        max_ttl.as_secs(),
                        class.name()
                    ),
                };
                return Err(ApiError::invalid("ttl", message));
            }
            ttl
        }
    };
    let collapse_key = fields.collapse_key.unwrap_or_default();
    if collapse_key.len() > MAX_KEY_LEN {
        return Err(ApiError::invalid(
            "collapse_key",
            format!("at most {MAX_KEY_LEN} bytes"),
        ));
    }
    if let Some(key) = &fields.idempotency_key
        && (key.is_empty() || key.len() > MAX_KEY_LEN)
    {
        return Err(ApiError::invalid(
            "idempotency_key",
            format!("must be 1 to {MAX_KEY_LEN} bytes"),
        ));
    }
    let send_at_ms = match &fields.send_at {
        None => None,
        Some(text) => {
            let at = parse_rfc3339(text).ok_or_else(|| {
                ApiError::invalid(
                    "send_at",
                    "must be an RFC 3339 time, e.g. 2026-12-24T18:00:00Z",
                )
            })?;
            let now = unix_millis();
            if at <= now {
                return Err(ApiError::invalid("send_at", "is in the past"));
            }
            let horizon = limits.max_send_ahead.as_millis() as u64;
            if at - now > horizon {
                return Err(ApiError::invalid(
                    "send_at",
                    format!(
                        "at most {} seconds ahead (limits.max_send_ahead)",
                        limits.max_send_ahead.as_secs()
                    ),
                ));
            }
            Some(at)
        }
    };
    if let Some(category) = &fields.category {
        devices::check_name("category", category)?;
    }
    let pace = match fields.pace_seconds {
        None | Some(0) => None,
        Some(seconds) => {
            if seconds > MAX_PACE_SECONDS {
                return Err(ApiError::invalid(
                    "pace",
                    format!("at most {MAX_PACE_SECONDS} seconds"),
                ));
            }
            if fields.class == Class::Realtime {
                return Err(ApiError::invalid("pace", "a realtime push is not paced"));
            }
            Some(Duration::from_secs(seconds))
        }
    };
    Ok(PushRequest {
        app: app.to_owned(),
        class: fields.class,
        category: fields.category,
        pace,
        send_at_ms,
        message_id: None,
        due_ms: 0,
        uids: audience.uids,
        tokens: audience.tokens,
        aliases: audience.aliases,
        all: audience.all,
        tags: by_tags.then_some(tags),
        payload: Bytes::copy_from_slice(payload.as_bytes()),
        ttl,
        priority: fields.priority,
        collapse_key,
        idempotency_key: fields.idempotency_key,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: &str) -> Result<PushRequest, ApiError> {
        parse_push("demo", body.as_bytes(), &Limits::default())
    }

    fn field_of(result: Result<PushRequest, ApiError>) -> String {
        match result {
            Err(ApiError::InvalidField { field, .. }) => field,
            Err(other) => panic!("expected an invalid field, got {other:?}"),
            Ok(_) => panic!("expected an error"),
        }
    }

    #[test]
    fn a_full_request_parses() {
        let request = parse(
            r#"{"audience":{"uids":["alice"],"tokens":["t1"]},"payload":{"a":[1,2]},
                "ttl":60,"priority":"high","collapse_key":"k","idempotency_key":"i"}"#,
        )
        .expect("valid");
        assert_eq!(request.uids, ["alice"]);
        assert_eq!(&request.payload[..], br#"{"a":[1,2]}"#);
        assert_eq!(request.ttl, Duration::from_secs(60));
        assert_eq!(request.priority, Priority::High);
    }

    #[test]
    fn each_bad_field_is_named() {
        assert_eq!(field_of(parse(r#"{"audience":{"uids":["a"]}}"#)), "payload");
        assert_eq!(field_of(parse(r#"{"payload":1}"#)), "audience");
        assert_eq!(
            field_of(parse(
                r#"{"audience":{"uids":["a"]},"payload":1,"ttl":"soon"}"#
            )),
            "ttl"
        );
        assert_eq!(
            field_of(parse(r#"{"audience":{"uids":["a"]},"payload":1,"ttl":-1}"#)),
            "ttl"
        );
        assert_eq!(
            field_of(parse(
                r#"{"audience":{"uids":["a"]},"payload":1,"priority":"urgent"}"#
            )),
            "priority"
        );
        assert_eq!(
            field_of(parse(r#"{"audience":{"uids":[7]},"payload":1}"#)),
            "audience.uids[0]"
        );
        assert_eq!(
            field_of(parse(r#"{"audience":{},"payload":1}"#)),
            "audience"
        );
        assert_eq!(
            field_of(parse(r#"{"audience":{"uids":[""]},"payload":1}"#)),
            "audience.uids[0]"
        );
        assert_eq!(
            field_of(parse(
                r#"{"audience":{"uids":["a"]},"payload":1,"colour":1}"#
            )),
            "colour"
        );
        assert_eq!(
            field_of(parse(
                r#"{"audience":{"uids":["a"]},"payload":1,"ttl":99999999999}"#
            )),
            "ttl"
        );
        assert_eq!(field_of(parse("not json")), "body");
    }

    #[test]
    fn only_objects_are_objects() {
        // serde would read a struct from an array of its fields, in order.
        assert_eq!(field_of(parse(r#"[{"uids":["x"]},1]"#)), "body");
        assert_eq!(
            field_of(parse(r#"{"audience":[["x"]],"payload":1}"#)),
            "audience"
        );
        for body in [
            r#"[{"uids":["x"]},1]"#,
            r#"{"audience":[["x"]],"payload":1}"#,
            r#"{"audience":"x","payload":1}"#,
        ] {
            let Err(error) = parse(body) else {
                panic!("{body} was accepted");
            };
            // Messages speak of the API, never of the server's types.
            assert!(!error.to_string().contains("struct"), "{error}");
        }
    }

    #[test]
    fn uids_follow_the_credential_rule() {
        assert_eq!(
            field_of(parse(
                r#"{"audience":{"uids":["carl","carl\u0000evil"]},"payload":1}"#
            )),
            "audience.uids[1]"
        );
        assert_eq!(
            field_of(parse(r#"{"audience":{"uids":["tab\tbed"]},"payload":1}"#)),
            "audience.uids[0]"
        );
        assert!(parse(r#"{"audience":{"uids":["张伟 2"]},"payload":1}"#).is_ok());
    }

    #[test]
    fn payloads_must_be_i_json() {
        for payload in [r#""\ud800""#, r#"{"n":1e999999}"#, r#"[-1e400]"#] {
            let body = format!(r#"{{"audience":{{"uids":["a"]}},"payload":{payload}}}"#);
            assert_eq!(field_of(parse(&body)), "payload", "{payload}");
        }
        let body = r#"{"audience":{"uids":["a"]},"payload":{"s":"\ud83d\ude00","n":1e308}}"#;
        let request = parse(body).expect("a surrogate pair and a large double are fine");
        assert_eq!(&request.payload[..], br#"{"s":"\ud83d\ude00","n":1e308}"#);
    }

    #[test]
    fn an_oversized_payload_is_too_large() {
        let body = format!(
            r#"{{"audience":{{"uids":["a"]}},"payload":"{}"}}"#,
            "x".repeat(5000)
        );
        assert!(matches!(parse(&body), Err(ApiError::TooLarge(_))));
    }
}
