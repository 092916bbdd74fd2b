//! `pigeon gateway`: the push API of cluster mode, over HTTP/JSON (`/v1/push`, the same as
//! standalone) and gRPC (`pigeon.push.v1.Push`).
//!
//! A push takes the push pipeline (`crate::push`), with Redis as the store and the nodes as
//! the fan-out (docs/delivery.md):
//! 1. resolved: uids to tokens, tokens checked, in Redis;
//! 2. recorded: one Lua script per target device stores the message under the device's
//!    next seq and returns the device's route. From here on, nothing is lost: the API
//!    answers 202 only after every target is recorded, and 503 if any could not be;
//! 3. fanned out by [`Peers`]: batched Deliver calls to the nodes holding the routed
//!    targets. A target that is not reached live stays in the store and is read from there
//!    at the device's next heartbeat, push or reconnect, on whichever node.
//!
//! The gateway keeps no state another copy could not rebuild: only caches of node
//! addresses, gRPC channels and breakers.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use pigeon_proto::device::Priority;
use pigeon_proto::push::push_server::{self, PushServer};
use pigeon_proto::push::{self as push_proto, TargetCounts as TargetCountsProto};
use serde_json::value::RawValue;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status};

use super::peers::Peers;
use super::{declared_apps, open_redis};
use crate::api::{self, ApiError, PushApi, PushFields, app_for_authorization, validate_push};
use crate::config::Settings;
use crate::listener;
use crate::message::TagFilter;
use crate::metrics::Metrics;
use crate::process::{self, Running, StartError};
use crate::push::{Class, PushOutcome};
use crate::store::TagChange;
use tracing::Instrument as _;

/// The push API over gRPC, sharing the HTTP API's apps, limits and pipeline.
struct PushGrpc {
    api: Arc<PushApi>,
}

impl PushGrpc {
    /// The app whose API key the call carries, and the call's message.
    fn authorized<T>(&self, request: Request<T>) -> Result<(String, T), Status> {
        let authorization = request
            .metadata()
            .get("authorization")
            .and_then(|value| value.to_str().ok());
        let app = app_for_authorization(&self.api.apps, authorization)?
            .id
            .clone();
        Ok((app, request.into_inner()))
    }
}

#[tonic::async_trait]
impl push_server::Push for PushGrpc {
    async fn push(
        &self,
        request: Request<push_proto::PushRequest>,
    ) -> Result<Response<push_proto::PushResponse>, Status> {
        let api = &self.api;
        let span = crate::telemetry::push_span("", &crate::telemetry::Metadata(request.metadata()));
        let (app, body) = self.authorized(request)?;
        span.record("app", app.as_str());
        let payload: &RawValue =
            serde_json::from_str(&body.payload_json).map_err(|error| ApiError::InvalidField {
                field: "payload_json".into(),
                message: format!("not JSON: {error}"),
            })?;
        let priority = Priority::try_from(body.priority).map_err(|_| ApiError::InvalidField {
            field: "priority".into(),
            message: format!(
                "{} is no priority: PRIORITY_NORMAL (0), PRIORITY_HIGH (1) or PRIORITY_LOW (2)",
                body.priority
            ),
        })?;
        let class = match push_proto::Class::try_from(body.class) {
            Ok(push_proto::Class::Realtime) => Class::Realtime,
            Ok(push_proto::Class::Marketing) => Class::Marketing,
            Ok(push_proto::Class::Notification | push_proto::Class::Unspecified) => {
                Class::Notification
            }
            Err(_) => {
                return Err(ApiError::invalid(
                    "class",
                    format!(
                        "{} is no class: CLASS_REALTIME (1), CLASS_NOTIFICATION (2) or CLASS_MARKETING (3)",
                        body.class
                    ),
                )
                .into());
            }
        };
        let push = validate_push(
            &app,
            PushFields {
                uids: body.uids,
                tokens: body.tokens,
                aliases: body.aliases,
                all: body.all,
                tags: TagFilter {
                    any: body.tags,
                    all: body.tags_and,
                    none: body.tags_not,
                },
                payload: payload.get(),
                ttl_seconds: body.ttl_seconds,
                priority,
                collapse_key: (!body.collapse_key.is_empty()).then_some(body.collapse_key),
                idempotency_key: (!body.idempotency_key.is_empty()).then_some(body.idempotency_key),
                class,
                send_at: (!body.send_at.is_empty()).then_some(body.send_at),
                category: (!body.category.is_empty()).then_some(body.category),
                pace_seconds: Some(u64::from(body.pace_seconds)),
            },
            &api.limits,
        )?;
        let outcome = api.pipeline.push(push).instrument(span).await;
        let response = match outcome.map_err(ApiError::from)? {
            PushOutcome::Accepted {
                message_id,
                targets,
            } => push_proto::PushResponse {
                message_id,
                duplicate: false,
                targets: Some(TargetCountsProto {
                    delivered: targets.delivered,
                    stored: targets.stored,
                    unknown: targets.unknown,
                    dropped: targets.dropped,
                    skipped: targets.skipped,
                }),
                ..Default::default()
            },
            PushOutcome::Duplicate { message_id } => push_proto::PushResponse {
                message_id,
                duplicate: true,
                ..Default::default()
            },
            PushOutcome::Scheduled {
                message_id,
                send_at_ms,
            } => push_proto::PushResponse {
                message_id,
                scheduled: true,
                send_at: api::rfc3339(send_at_ms),
                ..Default::default()
            },
        };
        Ok(Response::new(response))
    }

    async fn get_device(
        &self,
        request: Request<push_proto::GetDeviceRequest>,
    ) -> Result<Response<push_proto::Device>, Status> {
        let (app, body) = self.authorized(request)?;
        let device = self.api.devices.get(&app, &body.token).await?;
        Ok(Response::new(push_proto::Device {
            token: device.token,
            uid: device.uid,
            alias: device.alias.unwrap_or_default(),
            tags: device.tags,
            online: device.online,
        }))
    }

    async fn set_device_tags(
        &self,
        request: Request<push_proto::SetDeviceTagsRequest>,
    ) -> Result<Response<push_proto::SetDeviceTagsResponse>, Status> {
        let (app, body) = self.authorized(request)?;
        let tags = self
            .api
            .devices
            .set_tags(&app, &body.token, body.tags)
            .await?;
        Ok(Response::new(push_proto::SetDeviceTagsResponse {
            token: body.token,
            tags,
        }))
    }

    async fn set_device_alias(
        &self,
        request: Request<push_proto::SetDeviceAliasRequest>,
    ) -> Result<Response<push_proto::SetDeviceAliasResponse>, Status> {
        let (app, body) = self.authorized(request)?;
        let alias = (!body.alias.is_empty()).then_some(body.alias.as_str());
        self.api.devices.set_alias(&app, &body.token, alias).await?;
        Ok(Response::new(push_proto::SetDeviceAliasResponse {
            token: body.token,
            alias: body.alias,
        }))
    }

    async fn change_tag_devices(
        &self,
        request: Request<push_proto::ChangeTagDevicesRequest>,
    ) -> Result<Response<push_proto::ChangeTagDevicesResponse>, Status> {
        let (app, body) = self.authorized(request)?;
        let change = TagChange {
            add: body.add,
            remove: body.remove,
        };
        let changed = self.api.devices.change_tag(&app, &body.tag, change).await?;
        Ok(Response::new(push_proto::ChangeTagDevicesResponse {
            added: changed.added,
            removed: changed.removed,
            unknown: changed.unknown,
            over_limit: changed.over_limit,
        }))
    }

    async fn list_tag_devices(
        &self,
        request: Request<push_proto::ListTagDevicesRequest>,
    ) -> Result<Response<push_proto::ListTagDevicesResponse>, Status> {
        let (app, body) = self.authorized(request)?;
        let limit = body.limit.map(|limit| limit as usize);
        let page = self
            .api
            .devices
            .tag_devices(&app, &body.tag, &body.cursor, limit)
            .await?;
        Ok(Response::new(push_proto::ListTagDevicesResponse {
            devices: page.devices,
            next_cursor: page.next_cursor.unwrap_or_default(),
        }))
    }

    async fn delete_tag(
        &self,
        request: Request<push_proto::DeleteTagRequest>,
    ) -> Result<Response<push_proto::DeleteTagResponse>, Status> {
        let (app, body) = self.authorized(request)?;
        let removed = self.api.devices.delete_tag(&app, &body.tag).await?;
        Ok(Response::new(push_proto::DeleteTagResponse {
            tag: body.tag,
            removed,
        }))
    }

    async fn cancel_message(
        &self,
        request: Request<push_proto::CancelMessageRequest>,
    ) -> Result<Response<push_proto::CancelMessageResponse>, Status> {
        let (app, body) = self.authorized(request)?;
        api::cancel(&self.api.pipeline, &app, &body.message_id).await?;
        Ok(Response::new(push_proto::CancelMessageResponse {
            message_id: body.message_id,
        }))
    }

    async fn get_message(
        &self,
        request: Request<push_proto::GetMessageRequest>,
    ) -> Result<Response<push_proto::MessageStatus>, Status> {
        let (app, body) = self.authorized(request)?;
        let status = api::message_status(&self.api.pipeline, &app, &body.message_id).await?;
        Ok(Response::new(status))
    }

    async fn get_stats(
        &self,
        request: Request<push_proto::GetStatsRequest>,
    ) -> Result<Response<push_proto::Stats>, Status> {
        let (app, body) = self.authorized(request)?;
        let to_ms = match body.to_ms {
            0 => crate::message::unix_millis(),
            to_ms => to_ms,
        };
        let from_ms = (body.from_ms > 0).then_some(body.from_ms);
        let step = (body.step_seconds > 0)
            .then(|| std::time::Duration::from_secs(u64::from(body.step_seconds)));
        let (from, to, step) = api::stats_range(from_ms, to_ms, step)?;
        let points = self
            .api
            .pipeline
            .stats(&app, (from, to), step)
            .await
            .map_err(ApiError::from)?;
        let counts = |counts: &crate::store::StatsCounts| push_proto::StatsCounts {
            pushes: counts.pushes,
            targets: counts.targets,
            delivered: counts.delivered,
            acked: counts.acked,
            opened: counts.opened,
            expired: counts.expiring.max(0) as u64,
        };
        let points = points
            .iter()
            .map(|point| {
                let [realtime, notification, marketing] = &point.classes;
                push_proto::StatsPoint {
                    at_ms: point.minute * 60_000,
                    realtime: Some(counts(realtime)),
                    notification: Some(counts(notification)),
                    marketing: Some(counts(marketing)),
                }
            })
            .collect();
        Ok(Response::new(push_proto::Stats {
            from_ms: from * 60_000,
            to_ms: to * 60_000,
            step_seconds: (step * 60) as u32,
            points,
        }))
    }

    async fn delete_device(
        &self,
        request: Request<push_proto::DeleteDeviceRequest>,
    ) -> Result<Response<push_proto::DeleteDeviceResponse>, Status> {
        let (app, body) = self.authorized(request)?;
        self.api.devices.unregister(&app, &body.token).await?;
        Ok(Response::new(push_proto::DeleteDeviceResponse {
            token: body.token,
        }))
    }
}

/// A running gateway.
pub struct Gateway {
    /// The HTTP push API.
    pub http_addr: SocketAddr,
    /// The gRPC push API.
    pub grpc_addr: SocketAddr,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    drain_timeout: Duration,
    pipeline: Arc<crate::push::Pipeline>,
}

/// Starts a gateway.
pub async fn start(settings: Settings) -> Result<Gateway, StartError> {
    let apps = declared_apps(&settings)?;
    let limits = &settings.limits;
    let (store, membership, buckets) = open_redis(&settings).await?;
    let (http_listener, http_addr) = process::bind_http(&settings)?;
    let (grpc_listener, grpc_addr) = process::bind_grpc(&settings)?;
    let peers = Arc::new(Peers::new(membership, settings.cluster.clone()));
    let metrics = Arc::new(Metrics::default());
    metrics.watch_peers(peers.clone());
    metrics.watch_redis();
    let app_ids = apps.iter().map(|app| app.id.clone()).collect();
    let push_api = Arc::new(PushApi::new(
        apps,
        limits,
        store.clone(),
        peers.clone(),
        metrics.clone(),
        buckets,
    ));
    let shutdown = CancellationToken::new();
    let tracker = TaskTracker::new();
    tracker.spawn(crate::device_expiry::run(
        store.clone(),
        peers,
        app_ids,
        limits.device_inactivity,
        shutdown.clone(),
    ));
    tracker.spawn(crate::scheduler::run(
        store,
        push_api.pipeline.clone(),
        limits.message_retention,
        shutdown.clone(),
    ));
    let pipeline = push_api.pipeline.clone();
    let router =
        api::push_routes(push_api.clone()).merge(api::ops_routes(metrics, &settings.metrics_token));
    listener::serve_http(http_listener, router, limits, shutdown.clone(), &tracker);
    let grpc_shutdown = shutdown.clone();
    let grpc = process::grpc_server(limits)
        .add_service(PushServer::new(PushGrpc { api: push_api }))
        .serve_with_incoming_shutdown(listener::incoming(grpc_listener), async move {
            grpc_shutdown.cancelled().await
        });
    tracker.spawn(async move {
        if let Err(error) = grpc.await {
            tracing::error!(%error, "gRPC push API failed");
        }
    });
    Ok(Gateway {
        http_addr,
        grpc_addr,
        shutdown,
        tracker,
        drain_timeout: limits.drain_timeout,
        pipeline,
    })
}

impl Running for Gateway {
    fn banner(&self) -> String {
        format!(
            "pigeon gateway is running\n  push api:         http://{}/v1/push\n  push grpc:        {}\n",
            self.http_addr, self.grpc_addr
        )
    }

    /// Stops taking requests and lets those in progress finish, up to the drain timeout;
    /// then writes what the pipeline holds for Redis (statuses, statistics).
    async fn shutdown(self) -> bool {
        self.shutdown.cancel();
        self.tracker.close();
        let drained = tokio::time::timeout(self.drain_timeout, self.tracker.wait())
            .await
            .is_ok();
        self.pipeline.flush(self.drain_timeout).await;
        drained
    }
}
