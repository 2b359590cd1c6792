//! The operators' HTTPS API on the hub (`[hub].ops`), used by `gatewayctl`.
//!
//! Every request carries `Authorization: Bearer gwa1.ACCOUNT.SECRET`; the hub
//! keeps only the credential's digest. Each account holds one role (system,
//! security or audit administrator) and each route needs one action of
//! `gateway_core::fleet::allowed`; a refusal names the role that may. Every
//! action, allowed or refused, is written to the hub's audit chain with the
//! account.
//!
//! | route | action |
//! |---|---|
//! | `GET /v1/whoami` | any account |
//! | `POST /v1/tokens` `{"device", "expires_s"}` | token create (system) |
//! | `GET /v1/devices`, `GET /v1/devices/{id}`, `GET /v1/config` | devices read (system, security) |
//! | `POST /v1/devices/{id}/config` (TOML body) | config push: policy sections (security), the rest (system) |
//! | `GET /v1/devices/{id}/config?version=N\|applied` | devices read: a stored version, the newest, or what the box runs |
//! | `POST /v1/devices/{id}/revoke` | revoke (security) |
//! | `POST /v1/devices/{id}/commands/{reconnect,diagnostics}` | command (system) |
//! | `GET /v1/devices/{id}/audit?since=YYYY-MM-DD` | audit read (audit) |
//! | `POST /v1/consumers` `{"name", "csr", "days"}` | consumer create (system) |
//! | `GET /v1/consumers` | devices read (system, security) |
//! | `POST /v1/consumers/{name}/grants` `{"stream"}`, `.../grants/revoke` | consumer grant (security) |
//! | `POST /v1/consumers/{name}/revoke` | consumer revoke (security) |

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use gateway_core::config::Role;
use gateway_core::fleet::{
    self, Action, AdminRole, CommandKind, EXPORT_FORMAT, ExportHeader, Secret,
};
use gateway_store::registry::{LabelChange, NewToken, RegistryError};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::hub::{Fleet, OpsError};
use crate::node::PeerAttempt;
use crate::node::clock::now_ms;
use crate::node::http;

/// An error answer: status and message (JSON `{"error": ...}`).
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    /// An answer of `status` saying `message`.
    pub fn new(status: StatusCode, message: String) -> Self {
        ApiError { status, message }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(json!({ "error": self.message }))).into_response()
    }
}

/// A route's answer.
pub type Answer = Result<Response, ApiError>;

/// A JSON body, or a 400 naming the field that is wrong.
pub(super) fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." { "body".to_owned() } else { path };
        ApiError::new(StatusCode::BAD_REQUEST, format!("{field}: {}", e.inner()))
    })
}

/// A device id from the path, or a 400 saying what a device id looks like.
pub(super) fn checked_id(id: &str) -> Result<(), ApiError> {
    gateway_core::units::check_name("device", id).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("device: {}; {}", e.message, e.hint),
        )
    })
}

/// A failure of the hub: 503 when its store is unavailable (PostgreSQL down
/// or failing over: try again), else 500.
pub(super) fn internal<E: std::fmt::Display + 'static>(e: E) -> ApiError {
    let any = &e as &dyn std::any::Any;
    let retry = any
        .downcast_ref::<RegistryError>()
        .or_else(|| match any.downcast_ref::<OpsError>() {
            Some(OpsError::Fleet(r)) => Some(r),
            _ => None,
        })
        .is_some_and(RegistryError::retry_later)
        || any
            .downcast_ref::<gateway_store::error::StoreError>()
            .is_some_and(gateway_store::error::StoreError::retry_later);
    if retry {
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the hub's store is unavailable, nothing was changed; try again: {e}"),
        );
    }
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
}

pub(super) fn role_for(action: Action) -> &'static str {
    match action {
        Action::TokenCreate
        | Action::DevicesLabel
        | Action::DevicesVars
        | Action::Command
        | Action::ConfigPushOther
        | Action::ConsumerCreate
        | Action::FirmwareUpload
        | Action::FirmwareRollout => "system administrator",
        Action::ConfigPushPolicy
        | Action::Revoke
        | Action::TokenReplace
        | Action::ConsumerGrant
        | Action::ConsumerRevoke => "security administrator",
        Action::AuditRead => "audit administrator",
        Action::AlarmAck | Action::BanLift => "security administrator",
        Action::AlarmsRead => "system, security or audit administrator",
        Action::DevicesRead => "system or security administrator",
    }
}

pub(super) fn role_name(r: AdminRole) -> &'static str {
    match r {
        AdminRole::System => "system administrator",
        AdminRole::Security => "security administrator",
        AdminRole::Audit => "audit administrator",
    }
}

/// Who sent a request: its headers (the credential) and the peer's address,
/// which is what the audit names when the credential is not valid.
pub struct Caller {
    headers: HeaderMap,
    peer: SocketAddr,
}

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Caller {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<Self, Self::Rejection> {
        let peer = parts
            .extensions
            .get::<axum::extract::ConnectInfo<Peer>>()
            .map_or_else(|| ([0, 0, 0, 0], 0).into(), |c| c.0.0);
        Ok(Caller {
            headers: parts.headers.clone(),
            peer,
        })
    }
}

/// The address of a connection, for [`Caller`].
#[derive(Clone, Copy)]
struct Peer(SocketAddr);

/// The account a request's credential belongs to. A missing, malformed or
/// unknown credential is refused as an unauthenticated peer: audited under its
/// address (summarised), what it claimed only in the detail.
pub(super) async fn account(
    fleet: &Fleet,
    caller: &Caller,
) -> Result<(String, AdminRole), ApiError> {
    let refuse = |reason: &str, claimed: &str| {
        fleet.ctx().refuse_peer(
            caller.peer,
            true,
            PeerAttempt::OperatorCredential,
            reason,
            claimed,
        );
        ApiError::new(StatusCode::UNAUTHORIZED, reason.to_owned())
    };
    let Some(header) = caller.headers.get("authorization") else {
        return Err(refuse(
            "no credential: send Authorization: Bearer gwa1.ACCOUNT.SECRET",
            "",
        ));
    };
    let header = String::from_utf8_lossy(header.as_bytes());
    let Some(bearer) = header.strip_prefix("Bearer ") else {
        return Err(refuse("the credential is not a Bearer one", &header));
    };
    let Some(secret) = Secret::parse(fleet::CREDENTIAL_KIND, bearer) else {
        return Err(refuse("malformed credential", bearer));
    };
    let found = fleet
        .registry()
        .account(secret.digest())
        .await
        .map_err(internal)?;
    found.ok_or_else(|| refuse("unknown credential", &format!("account {}", secret.owner)))
}

/// Who is asking, checked for `action`; refusals are audited.
/// `event`: the action's audit event without `admin.` (the one its allowed
/// form records too, as [`audit_ok`]); `what`: the action in words.
pub(super) async fn authorize(
    fleet: &Fleet,
    caller: &Caller,
    action: Action,
    event: &str,
    what: &str,
    object: &str,
) -> Result<(String, AdminRole), ApiError> {
    // The object comes from the request (a path's device id): escaped and
    // capped before it is audited.
    debug_assert!(
        fleet::is_admin_event(event),
        "undocumented event admin.{event}"
    );
    let (name, role) = account(fleet, caller).await?;
    if !fleet::allowed(role, action) {
        let message = format!(
            "account {name} ({}) may not {what}: that is the {}'s",
            role_name(role),
            role_for(action)
        );
        return Err(refuse_role(fleet, &name, object, event, message));
    }
    Ok((name, role))
}

/// An operator refused for their role: logged, audited (`admin.EVENT`, rule
/// `roles`) under the account, with `object` (from the request) escaped and
/// capped, and answered 403 with `message`.
pub(super) fn refuse_role(
    fleet: &Fleet,
    account: &str,
    object: &str,
    event: &str,
    message: String,
) -> ApiError {
    refuse_for(
        fleet,
        (account, object, event),
        "roles",
        StatusCode::FORBIDDEN,
        message,
    )
}

/// An operator's request refused under `rule`: logged, audited
/// (`admin.EVENT`, deny) under the account with `object` (from the request)
/// escaped and capped, and answered with `status` and `message`.
pub(super) fn refuse_for(
    fleet: &Fleet,
    (account, object, event): (&str, &str, &str),
    rule: &str,
    status: StatusCode,
    message: String,
) -> ApiError {
    warn!(%message, rule, "Operator API: refused");
    fleet.ctx().audit.record(
        account,
        &gateway_core::refusals::peer_text(object),
        &format!("admin.{event}"),
        "deny",
        rule,
        message.clone(),
    );
    ApiError::new(status, message)
}

pub(super) fn audit_ok(fleet: &Fleet, account: &str, what: &str, object: &str, detail: String) {
    debug_assert!(
        fleet::is_admin_event(what),
        "undocumented event admin.{what}"
    );
    fleet
        .ctx()
        .audit
        .record(account, object, &format!("admin.{what}"), "ok", "", detail);
}

/// Serves the API on `listener` with TLS until `stop`.
pub async fn serve(
    fleet: Arc<Fleet>,
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    stop: CancellationToken,
) {
    let ctx = fleet.ctx().clone();
    let app = Router::new()
        .route("/v1/whoami", get(whoami))
        .route("/v1/tokens", post(token_create))
        .route("/v1/devices", get(devices_list))
        .route("/v1/devices/{id}", get(device_show))
        .route("/v1/devices/{id}/revoke", post(revoke))
        .route("/v1/devices/{id}/labels", post(device_label))
        .route(
            "/v1/devices/{id}/config",
            post(config_push).get(config_show),
        )
        .route("/v1/devices/{id}/commands/{kind}", post(command))
        .route("/v1/devices/{id}/audit", get(audit_export))
        .route("/v1/config", get(config_status))
        .route("/v1/consumers", post(consumer_create).get(consumer_list))
        .route("/v1/consumers/{name}/grants", post(consumer_grant))
        .route(
            "/v1/consumers/{name}/grants/revoke",
            post(consumer_revoke_grant),
        )
        .route("/v1/consumers/{name}/revoke", post(consumer_revoke))
        .route("/v1/alarms", get(alarms_list))
        .route("/v1/alarms/{id}/ack", post(alarm_ack))
        .route("/v1/bans", get(bans_list))
        .route("/v1/bans/lift", post(ban_lift))
        .merge(super::rollout_api::routes())
        .merge(super::firmware_api::routes())
        .with_state(fleet);
    let listener = http::Listener {
        tcp: listener,
        security: http::Security::Tls(tokio_rustls::TlsAcceptor::from(tls), None),
        what: "Operator API",
        limits: ctx.http_limits(),
    };
    http::serve(Some(ctx), listener, app, |addr, _| Peer(addr), stop).await;
}

async fn whoami(State(fleet): State<Arc<Fleet>>, caller: Caller) -> Answer {
    let (name, role) = account(&fleet, &caller).await?;
    Ok(axum::Json(json!({ "account": name, "role": role.as_str() })).into_response())
}

#[derive(Deserialize)]
struct TokenReq {
    device: String,
    expires_s: Option<u64>,
    /// Re-enroll a device that is enrolled (the security administrator's).
    #[serde(default)]
    replace: bool,
    /// Labels the device arrives with (KEY=VALUE).
    #[serde(default)]
    labels: Vec<String>,
}

/// `POST /v1/devices/{id}/labels`: KEY=VALUE to set, KEY- to remove.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LabelReq {
    labels: Vec<String>,
}

/// The label change `items` (KEY=VALUE, KEY-) make to `device`, or a 400
/// naming the first bad one.
fn label_change(device: &str, items: &[String]) -> Result<LabelChange, ApiError> {
    let mut change = LabelChange {
        device: device.to_owned(),
        ..LabelChange::default()
    };
    if items.len() > gateway_core::selector::MAX_LABELS {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!(
                "labels: at most {} at once",
                gateway_core::selector::MAX_LABELS
            ),
        ));
    }
    for (i, item) in items.iter().enumerate() {
        match gateway_core::selector::parse_assignment(item) {
            Ok((k, Some(v))) => change.set.push((k, v)),
            Ok((k, None)) => change.remove.push(k),
            Err(e) => {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    format!("labels[{i}]: {e}"),
                ));
            }
        }
    }
    Ok(change)
}

async fn device_label(
    State(fleet): State<Arc<Fleet>>,
    caller: Caller,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Answer {
    let (by, _) = authorize(
        &fleet,
        &caller,
        Action::DevicesLabel,
        "device.label",
        "label devices",
        &id,
    )
    .await?;
    checked_id(&id)?;
    let req: LabelReq = parse_json(&body)?;
    let change = label_change(&id, &req.labels)?;
    let now = fleet
        .registry()
        .set_labels(change)
        .await
        .map_err(labels_err)?;
    let text: Vec<String> = now.iter().map(|(k, v)| format!("{k}={v}")).collect();
    audit_ok(&fleet, &by, "device.label", &id, text.join(","));
    let labels: serde_json::Map<String, Value> = now
        .into_iter()
        .map(|(k, v)| (k, Value::String(v)))
        .collect();
    Ok(axum::Json(json!({ "device": id, "labels": labels })).into_response())
}

fn labels_err(e: RegistryError) -> ApiError {
    match e {
        RegistryError::Refused(m) => ApiError::new(StatusCode::BAD_REQUEST, format!("labels: {m}")),
        other => internal(other),
    }
}

async fn token_create(
    State(fleet): State<Arc<Fleet>>,
    caller: Caller,
    body: axum::body::Bytes,
) -> Answer {
    // Parsed before the credential is checked (for the audit's object), but
    // answered only after it.
    let parsed: Result<TokenReq, ApiError> = parse_json(&body);
    // authorize() escapes and caps it before it is audited.
    let object = parsed.as_ref().map_or("token", |r| r.device.as_str());
    let replace = parsed.as_ref().is_ok_and(|r| r.replace);
    let (action, what) = if replace {
        (Action::TokenReplace, "re-enroll a device that is enrolled")
    } else {
        (Action::TokenCreate, "create enrollment tokens")
    };
    let (by, _) = authorize(&fleet, &caller, action, "token.create", what, object).await?;
    let req = parsed?;
    if let Err(e) = gateway_core::units::check_name("device", &req.device) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("device: {}; {}", e.message, e.hint),
        ));
    }
    let max_s = fleet
        .ctx()
        .policy()
        .config()
        .hub()
        .map_or(7 * 86_400, |h| h.settings.max_token_lifetime.as_secs());
    let expires_s = req.expires_s.unwrap_or(86_400.min(max_s));
    if expires_s == 0 || expires_s > max_s {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!(
                "expires_s: {expires_s} is outside 1..={max_s} (a token lives at most [hub].max_token_lifetime, {max_s} s)"
            ),
        ));
    }
    // A token for a device that is enrolled would make a second identity for
    // a department: that takes --replace, the security administrator's.
    if !req.replace {
        let row = fleet
            .registry()
            .device(req.device.clone())
            .await
            .map_err(internal)?;
        if let Some(row) = row.filter(|r| {
            // An expired certificate cannot connect: enrolling again is the
            // way back for a box that was off too long.
            r.revoked_ms.is_none() && r.not_after_ms.is_some_and(|t| t > now_ms())
        }) {
            let online = fleet.connected(&req.device);
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                format!(
                    "device {} is enrolled ({}, certificate valid until {} ms): a token would make a second identity for it; \
                     to re-enroll it, the security administrator runs gatewayctl token create --device {} --replace, or revokes it first",
                    req.device,
                    if online { "online" } else { "offline" },
                    row.not_after_ms.unwrap_or_default(),
                    req.device
                ),
            ));
        }
    }
    let labels = label_change(&req.device, &req.labels)?;
    let secret = crate::fleet::new_secret(fleet::TOKEN_KIND, req.device.clone());
    let expires_ms =
        now_ms() + i64::try_from(expires_s.saturating_mul(1000)).unwrap_or(i64::MAX / 2);
    fleet
        .registry()
        .create_token(NewToken {
            device: req.device.clone(),
            digest: secret.digest(),
            expires_ms,
            by: by.clone(),
            now_ms: now_ms(),
            replaces: req.replace,
        })
        .await
        .map_err(|e| ApiError::new(StatusCode::CONFLICT, e.to_string()))?;
    if !labels.set.is_empty() || !labels.remove.is_empty() {
        fleet
            .registry()
            .set_labels(labels)
            .await
            .map_err(labels_err)?;
    }
    info!(device = %req.device, by, expires_s, "Enrollment token created");
    audit_ok(
        &fleet,
        &by,
        "token.create",
        &req.device,
        format!(
            "expires_s={expires_s} replace={} labels={}",
            req.replace,
            req.labels.join(",")
        ),
    );
    Ok((
        StatusCode::CREATED,
        axum::Json(
            json!({ "device": req.device, "token": secret.to_text(), "expires_ms": expires_ms }),
        ),
    )
        .into_response())
}

/// A device's state: `revoked`, `online`, `never-seen` or `offline`.
fn state_of(fleet: &Fleet, row: &gateway_store::registry::DeviceRow) -> &'static str {
    /// The one field wanted of a heartbeat (read without building the rest:
    /// a query over 10,000 devices reads 10,000 of them).
    #[derive(Deserialize)]
    struct Interval {
        interval_s: Option<u64>,
    }
    let interval = row
        .status
        .as_ref()
        .and_then(|(_, j)| serde_json::from_str::<Interval>(j).ok())
        .and_then(|v| v.interval_s)
        .unwrap_or(10);
    let online = fleet::online(
        fleet.connected(&row.id),
        row.status.as_ref().map(|s| s.0),
        interval,
        now_ms(),
    );
    if row.revoked_ms.is_some() {
        "revoked"
    } else if online {
        "online"
    } else if row.status.is_none() {
        "never-seen"
    } else {
        "offline"
    }
}

/// What operators see of one device.
fn device_view(fleet: &Fleet, row: &gateway_store::registry::DeviceRow) -> Value {
    let connected = fleet.connected(&row.id);
    let status: Value = row
        .status
        .as_ref()
        .and_then(|(_, j)| serde_json::from_str(j).ok())
        .unwrap_or(Value::Null);
    let state = state_of(fleet, row);
    let result: Value = row
        .applied
        .as_ref()
        .and_then(|(_, j, _)| serde_json::from_str(j).ok())
        .unwrap_or(Value::Null);
    json!({
        "id": row.id,
        "state": state,
        "connected": connected,
        "last_heartbeat_ms": row.status.as_ref().map(|s| s.0),
        "enrolled_ms": row.enrolled_ms,
        "cert_not_after_ms": row.not_after_ms,
        "revoked_ms": row.revoked_ms,
        "config_desired": row.desired,
        "config_applied": row.applied.as_ref().map(|a| a.0),
        "config_result": result,
        "audit_head": row.audit.as_ref().map(|a| a.0),
        "audit_broken": row.audit.as_ref().and_then(|a| a.1.clone()),
        "status": status,
    })
}

/// Up to `limit` devices after `after` (by id) that `selector` picks, with
/// their labels: the registry reads, a page at a time, only the rows its
/// stored columns let match (labels, revocation, drift, certificate,
/// heartbeat); the whole selector is checked here (being online is known
/// only here).
pub(super) async fn select(
    fleet: &Fleet,
    selector: &gateway_core::selector::Selector,
    mut after: Option<String>,
    limit: usize,
) -> Result<Vec<(gateway_store::registry::DeviceRow, BTreeMap<String, String>)>, ApiError> {
    let mut out = Vec::new();
    let now = now_ms();
    let stored = selector.stored(now);
    loop {
        let page = fleet
            .registry()
            .devices_page(after.take(), DEVICES_PAGE_MAX, stored.clone())
            .await
            .map_err(internal)?;
        let full = page.rows.len() == DEVICES_PAGE_MAX;
        after = page.rows.last().map(|r| r.id.clone());
        let mut labels: HashMap<String, BTreeMap<String, String>> = HashMap::new();
        for (d, k, v) in page.labels {
            labels.entry(d).or_default().insert(k, v);
        }
        for r in page.rows {
            let l = labels.remove(&r.id).unwrap_or_default();
            let facts = gateway_core::selector::Facts {
                labels: &l,
                state: state_of(fleet, &r),
                drift: r
                    .desired
                    .is_some_and(|d| r.applied.as_ref().is_none_or(|a| a.0 < d)),
                cert_left_ms: r.not_after_ms.map(|t| t - now),
            };
            if selector.matches(&facts) {
                out.push((r, l));
                if out.len() == limit {
                    return Ok(out);
                }
            }
        }
        if !full {
            return Ok(out);
        }
    }
}

/// `GET /v1/devices?selector=S&after=ID&limit=N`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DevicesQuery {
    #[serde(default)]
    selector: String,
    after: Option<String>,
    limit: Option<usize>,
}

/// Devices per page when the caller does not say; and at most.
const DEVICES_PAGE: usize = 500;
const DEVICES_PAGE_MAX: usize = 5000;

/// The devices a selector picks, filtered and paged here at the hub (by id):
/// `{"devices": [...], "next": ID or null, "selector": S}`.
async fn devices_list(
    State(fleet): State<Arc<Fleet>>,
    caller: Caller,
    Query(q): Query<DevicesQuery>,
) -> Answer {
    authorize(
        &fleet,
        &caller,
        Action::DevicesRead,
        "device.list",
        "list devices",
        "devices",
    )
    .await?;
    let selector = gateway_core::selector::Selector::parse(&q.selector)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("selector: {e}")))?;
    let limit = q.limit.unwrap_or(DEVICES_PAGE);
    if limit == 0 || limit > DEVICES_PAGE_MAX {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("limit: {limit} is outside 1..={DEVICES_PAGE_MAX}"),
        ));
    }
    let found = select(&fleet, &selector, q.after.clone(), limit + 1).await?;
    let mut out = Vec::new();
    let mut next = None;
    for (r, labels) in &found {
        if out.len() == limit {
            next = out.last().map(|v: &Value| v["id"].clone());
            break;
        }
        let mut view = device_view(&fleet, r);
        view["labels"] = json!(labels);
        out.push(view);
    }
    Ok(axum::Json(json!({
        "devices": out,
        "next": next,
        "selector": selector.to_string(),
    }))
    .into_response())
}

async fn device_show(
    State(fleet): State<Arc<Fleet>>,
    caller: Caller,
    Path(id): Path<String>,
) -> Answer {
    authorize(
        &fleet,
        &caller,
        Action::DevicesRead,
        "device.show",
        "show devices",
        &id,
    )
    .await?;
    checked_id(&id)?;
    let row = fleet
        .registry()
        .device(id.clone())
        .await
        .map_err(internal)?;
    match row {
        Some(row) => Ok(axum::Json(device_view(&fleet, &row)).into_response()),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no device {id} on this hub"),
        )),
    }
}

async fn config_status(State(fleet): State<Arc<Fleet>>, caller: Caller) -> Answer {
    authorize(
        &fleet,
        &caller,
        Action::DevicesRead,
        "config.status",
        "read config status",
        "config",
    )
    .await?;
    let rows = fleet.registry().devices().await.map_err(internal)?;
    let out: Vec<Value> = rows
        .iter()
        .map(|r| {
            let result: Value = r
                .applied
                .as_ref()
                .and_then(|(_, j, _)| serde_json::from_str(j).ok())
                .unwrap_or(Value::Null);
            json!({
                "id": r.id,
                "desired": r.desired,
                "applied": r.applied.as_ref().map(|a| a.0),
                "in_sync": r.desired.is_none_or(|d| r.applied.as_ref().is_some_and(|a| a.0 >= d)),
                "result": result,
            })
        })
        .collect();
    Ok(axum::Json(Value::Array(out)).into_response())
}

async fn revoke(State(fleet): State<Arc<Fleet>>, caller: Caller, Path(id): Path<String>) -> Answer {
    let (by, _) = authorize(
        &fleet,
        &caller,
        Action::Revoke,
        "device.revoke",
        "revoke devices",
        &id,
    )
    .await?;
    checked_id(&id)?;
    let fresh = fleet.revoke(&id, &by).await.map_err(internal)?;
    Ok(axum::Json(json!({ "device": id, "revoked": true, "already": !fresh })).into_response())
}

/// `?file=NAME`: the name of the file the operator pushed, for the errors.
#[derive(Debug, Deserialize)]
struct PushQuery {
    file: Option<String>,
    /// The operator knows the change needs the box to restart.
    #[serde(default)]
    restart: bool,
}

/// The file name a push's errors are located in: the operator's own (its
/// last component, if it is a plain name of at most 128 characters), else
/// `ID.toml`.
fn push_file_name(file: Option<&str>, id: &str) -> String {
    file.and_then(|f| f.rsplit('/').next())
        .filter(|f| {
            !f.is_empty()
                && f.len() <= 128
                && f.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
        })
        .map_or_else(|| format!("{id}.toml"), str::to_owned)
}

/// The part of a change `action` covers, naming its keys, for a refusal.
pub(super) fn changed_part(action: Action, old: &str, new: &str) -> String {
    let (policy, other) = fleet::changed_keys(old, new);
    if action == Action::ConfigPushPolicy {
        format!(
            "policy keys ({}; the table in docs/operate.md, \"Push config\")",
            some_keys(&policy)
        )
    } else {
        format!("non-policy keys ({})", some_keys(&other))
    }
}

/// Up to eight of `keys`, for a message (and the audit): the operator's file
/// names them, so each is escaped and capped as a peer's text is.
pub(super) fn some_keys(keys: &[String]) -> String {
    let mut s = keys
        .iter()
        .take(8)
        .map(|k| gateway_core::refusals::peer_text(k))
        .collect::<Vec<_>>()
        .join(", ");
    if keys.len() > 8 {
        s += &format!(" and {} more", keys.len() - 8);
    }
    if s.is_empty() {
        s = "the entries' order or number".into();
    }
    s
}

async fn config_push(
    State(fleet): State<Arc<Fleet>>,
    caller: Caller,
    Path(id): Path<String>,
    Query(q): Query<PushQuery>,
    body: String,
) -> Answer {
    // Any account that may push something gets this far; the change decides.
    let (by, role) = account(&fleet, &caller).await?;
    if !fleet::allowed(role, Action::ConfigPushOther)
        && !fleet::allowed(role, Action::ConfigPushPolicy)
    {
        let message = format!(
            "account {by} ({}) may not push config: a change of the policy sections is the {}'s, of the others the {}'s",
            role_name(role),
            role_for(Action::ConfigPushPolicy),
            role_for(Action::ConfigPushOther),
        );
        return Err(refuse_role(&fleet, &by, &id, "config.push", message));
    }
    let refuse = |status: StatusCode, message: String, errors: Vec<String>| {
        // A role refusal, or a config the hub will not offer.
        let why = if status == StatusCode::FORBIDDEN {
            "roles"
        } else {
            "config"
        };
        fleet
            .ctx()
            .audit
            .record(&by, &id, "admin.config.push", "deny", why, message.clone());
        warn!(device = %id, by, %message, "Config push refused");
        Ok((
            status,
            axum::Json(json!({ "error": message, "errors": errors })),
        )
            .into_response())
    };
    let config =
        match super::pushed_config::check_text(&body, &push_file_name(q.file.as_deref(), &id)) {
            Ok(c) => c,
            Err(errors) => {
                return refuse(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    format!("the config does not check ({} errors)", errors.len()),
                    errors,
                );
            }
        };
    if config.node.id != id || !matches!(config.role, Role::Edge(_)) {
        return refuse(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!(
                "the config is for node {} ({}), not for edge {id}",
                config.node.id,
                if matches!(config.role, Role::Edge(_)) {
                    "edge"
                } else {
                    "hub"
                }
            ),
            vec![],
        );
    }
    let reg = fleet.registry();
    let base = match reg.desired(id.clone()).await.map_err(internal)? {
        Some(desired) => Some(desired),
        None => reg.applied(id.clone()).await.map_err(internal)?,
    };
    let Some((base_version, base_text)) = base else {
        return refuse(
            StatusCode::CONFLICT,
            format!("the hub has not seen {id}'s config yet; it reports it when it first connects"),
            vec![],
        );
    };
    let change = fleet::classify_change(&base_text, &body);
    if !change.policy && !change.other {
        return refuse(
            StatusCode::CONFLICT,
            format!("the config equals version {base_version}; nothing to push"),
            vec![],
        );
    }
    for (changed, action) in [
        (change.policy, Action::ConfigPushPolicy),
        (change.other, Action::ConfigPushOther),
    ] {
        if changed && !fleet::allowed(role, action) {
            let part = changed_part(action, &base_text, &body);
            return refuse(
                StatusCode::FORBIDDEN,
                format!(
                    "account {by} ({}) may not change {part}: that is the {}'s; push those changes separately",
                    role_name(role),
                    role_for(action)
                ),
                vec![],
            );
        }
    }
    // A key the box cannot reload is put in force only by restarting it: the
    // operator says so, or the box would refuse the version.
    let restart = gateway_core::config::restart::restart_needed_over(&base_text, &config);
    if let (Some(what), false) = (restart, q.restart) {
        return refuse(
            StatusCode::CONFLICT,
            format!(
                "the change to {what} takes a restart of the box: push it again with --restart (the box restarts itself, then tries the version as any push), or leave {what} as it is"
            ),
            vec![],
        );
    }
    let version = fleet.push(&id, body, &by).await.map_err(internal)?;
    audit_ok(
        &fleet,
        &by,
        "config.push",
        &id,
        format!(
            "version={version} policy={} other={}{}",
            change.policy,
            change.other,
            restart.map_or(String::new(), |what| format!(" restart={what}"))
        ),
    );
    Ok((
        StatusCode::CREATED,
        axum::Json(json!({ "device": id, "version": version, "change": change, "offered": fleet.connected(&id) })),
    )
        .into_response())
}

async fn command(
    State(fleet): State<Arc<Fleet>>,
    caller: Caller,
    Path((id, kind)): Path<(String, String)>,
) -> Answer {
    let (by, _) = authorize(
        &fleet,
        &caller,
        Action::Command,
        "command",
        "run remote commands",
        &id,
    )
    .await?;
    checked_id(&id)?;
    let kind = match kind.as_str() {
        "reconnect" => CommandKind::Reconnect,
        "diagnostics" => CommandKind::Diagnostics,
        other => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!("no command {other:?}; there are reconnect and diagnostics"),
            ));
        }
    };
    audit_ok(
        &fleet,
        &by,
        "command",
        &id,
        format!("{kind:?}").to_lowercase(),
    );
    match fleet.command(&id, kind).await {
        Ok((ok, output)) => {
            let output: Value = serde_json::from_str(&output).unwrap_or(Value::String(output));
            Ok(axum::Json(json!({ "device": id, "ok": ok, "output": output })).into_response())
        }
        Err(e) => Err(ApiError::new(StatusCode::GATEWAY_TIMEOUT, e.to_string())),
    }
}

#[derive(Deserialize)]
struct Which {
    version: Option<String>,
}

async fn config_show(
    State(fleet): State<Arc<Fleet>>,
    caller: Caller,
    Path(id): Path<String>,
    Query(q): Query<Which>,
) -> Answer {
    authorize(
        &fleet,
        &caller,
        Action::DevicesRead,
        "config.show",
        "read config",
        &id,
    )
    .await?;
    checked_id(&id)?;
    let reg = fleet.registry();
    let found = match q.version.as_deref() {
        Some("applied") => reg
            .applied(id.clone())
            .await
            .map_err(internal)?
            .map(|(v, t)| (format!("applied, version {v}"), t)),
        Some(n) => match n.parse::<u64>() {
            Ok(v) => reg
                .config_version(id.clone(), v)
                .await
                .map_err(internal)?
                .map(|t| (format!("version {v}"), t)),
            Err(_) => None,
        },
        None => reg
            .desired(id.clone())
            .await
            .map_err(internal)?
            .map(|(v, t)| (format!("desired, version {v}"), t)),
    };
    match found {
        Some((what, text)) => Ok((
            [
                ("content-type", "application/toml"),
                ("x-gateway-config", what.as_str()),
            ],
            text,
        )
            .into_response()),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!(
                "no such config of {id} ({}); give a pushed version number, or applied",
                q.version.as_deref().unwrap_or("nothing pushed yet")
            ),
        )),
    }
}

#[derive(Deserialize)]
struct Since {
    since: Option<String>,
}

async fn audit_export(
    State(fleet): State<Arc<Fleet>>,
    caller: Caller,
    Path(id): Path<String>,
    Query(q): Query<Since>,
) -> Answer {
    let (by, _) = authorize(
        &fleet,
        &caller,
        Action::AuditRead,
        "audit.export",
        "read audit",
        &id,
    )
    .await?;
    checked_id(&id)?;
    let since_ms = match q.since.as_deref() {
        None => 0,
        Some(s) => match s.parse::<gateway_core::units::Date>() {
            // Dates are China Standard Time, like assessment dates.
            Ok(d) => d.days_since_epoch() * 86_400_000 - 8 * 3_600_000,
            Err(e) => {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    format!("since: {e}; {}", e.hint),
                ));
            }
        },
    };
    let found = fleet
        .registry()
        .audit_export(id.clone(), since_ms)
        .await
        .map_err(internal)?;
    let Some(export) = found else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no audit collected from {id}"),
        ));
    };
    let mut header = ExportHeader {
        format: EXPORT_FORMAT.into(),
        device: id.clone(),
        anchor_seq: export.anchor_seq,
        anchor_hash: export.anchor_hash,
        head_seq: export.head_seq,
        head_hash: export.head_hash,
        continuous: export.continuous,
        exported_ms: now_ms(),
        signed_by: None,
        hub_cert_pem: None,
        signature: None,
    };
    fleet.sign_export(&mut header);
    let mut out = serde_json::to_string(&header).map_err(internal)?;
    let records = export.records;
    for r in &records {
        out.push('\n');
        out += &serde_json::to_string(r).map_err(internal)?;
    }
    out.push('\n');
    audit_ok(
        &fleet,
        &by,
        "audit.export",
        &id,
        format!("records={} since_ms={since_ms}", records.len()),
    );
    Ok(([("content-type", "application/x-ndjson")], out).into_response())
}

/// Longest certificate request accepted (a real one is under 1 KiB).
const MAX_CSR: usize = 16 * 1024;
/// Longest a consumer certificate may be valid, days.
const MAX_CONSUMER_DAYS: u32 = 825;

/// A consumer name from the path or body, or a 400 saying what one looks like.
fn checked_consumer(name: &str) -> Result<(), ApiError> {
    gateway_core::units::check_name("consumer", name).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("name: {}; {}", e.message, e.hint),
        )
    })
}

#[derive(Deserialize)]
struct ConsumerReq {
    name: String,
    csr: String,
    days: Option<u32>,
}

async fn consumer_create(
    State(fleet): State<Arc<Fleet>>,
    caller: Caller,
    body: axum::body::Bytes,
) -> Answer {
    let parsed: Result<ConsumerReq, ApiError> = parse_json(&body);
    let object = parsed.as_ref().map_or("consumer", |r| r.name.as_str());
    let (by, _) = authorize(
        &fleet,
        &caller,
        Action::ConsumerCreate,
        "consumer.create",
        "create consumers",
        object,
    )
    .await?;
    let req = parsed?;
    checked_consumer(&req.name)?;
    if req.csr.len() > MAX_CSR {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("csr: longer than {MAX_CSR} bytes; a certificate request is about 1 KiB"),
        ));
    }
    let days = req.days.unwrap_or(365);
    if !(1..=MAX_CONSUMER_DAYS).contains(&days) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("days: {days} is outside 1..={MAX_CONSUMER_DAYS}"),
        ));
    }
    let (cert, not_after_ms, serial) = fleet
        .signer()
        .sign_consumer(&req.csr, &req.name, now_ms(), days)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("csr: {e}")))?;
    let added = fleet
        .registry()
        .add_consumer(gateway_store::registry::NewConsumer {
            name: req.name.clone(),
            serial: serial.clone(),
            not_after_ms,
            by: by.clone(),
            now_ms: now_ms(),
        })
        .await;
    match added {
        Ok(()) => {}
        Err(e @ gateway_store::registry::RegistryError::ConsumerExists(_)) => {
            return Err(ApiError::new(StatusCode::CONFLICT, e.to_string()));
        }
        Err(e) => return Err(internal(e)),
    }
    audit_ok(
        &fleet,
        &by,
        "consumer.create",
        &req.name,
        format!("certificate serial {serial}, valid {days} days"),
    );
    info!(consumer = %req.name, by, %serial, "Consumer created");
    Ok(axum::Json(json!({
        "name": req.name, "certificate": cert, "serial": serial, "not_after_ms": not_after_ms,
    }))
    .into_response())
}

async fn consumer_list(State(fleet): State<Arc<Fleet>>, caller: Caller) -> Answer {
    authorize(
        &fleet,
        &caller,
        Action::DevicesRead,
        "consumer.list",
        "list consumers",
        "consumers",
    )
    .await?;
    let rows = fleet.registry().consumers().await.map_err(internal)?;
    let grants = fleet
        .consumers()
        .sink()
        .store()
        .grants(None)
        .await
        .map_err(internal)?;
    let list: Vec<Value> = rows
        .iter()
        .map(|c| {
            let mine: Vec<Value> = grants
                .iter()
                .filter(|g| g.consumer == c.name)
                .map(|g| {
                    json!({
                        "stream": format!("{}/{}", g.stream.device, g.stream.channel),
                        "cursor": g.acked,
                    })
                })
                .collect();
            json!({
                "name": c.name, "serial": c.serial, "not_after_ms": c.not_after_ms,
                "created_by": c.created_by, "created_ms": c.created_ms,
                "revoked_ms": c.revoked_ms, "grants": mine,
            })
        })
        .collect();
    Ok(axum::Json(json!({ "consumers": list })).into_response())
}

#[derive(Deserialize)]
struct GrantReq {
    stream: String,
}

/// The `DEVICE/CHANNEL` of a grant request, checked.
fn checked_stream(stream: &str) -> Result<gateway_store::sink::StreamKey, ApiError> {
    let bad = |m: String| ApiError::new(StatusCode::BAD_REQUEST, format!("stream: {m}"));
    let Some((device, channel)) = stream.split_once('/') else {
        return Err(bad(format!(
            "{:?} is not DEVICE/CHANNEL",
            gateway_core::refusals::peer_text(stream)
        )));
    };
    crate::channel::consumer_api::stream_of(device, channel)
        .map_err(|(field, m)| bad(format!("{field}: {m}")))
}

/// A consumer that exists and is not revoked, or the 404 / 409.
async fn live_consumer(fleet: &Fleet, name: &str) -> Result<(), ApiError> {
    checked_consumer(name)?;
    match fleet
        .registry()
        .consumer(name.to_owned())
        .await
        .map_err(internal)?
    {
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no consumer {name}; gatewayctl consumer list shows them"),
        )),
        Some(c) if c.revoked_ms.is_some() => Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("consumer {name} is revoked"),
        )),
        Some(_) => Ok(()),
    }
}

async fn consumer_grant(
    State(fleet): State<Arc<Fleet>>,
    caller: Caller,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> Answer {
    let (by, _) = authorize(
        &fleet,
        &caller,
        Action::ConsumerGrant,
        "consumer.grant",
        "grant consumers a department's data",
        &name,
    )
    .await?;
    let req: GrantReq = parse_json(&body)?;
    let stream = checked_stream(&req.stream)?;
    live_consumer(&fleet, &name).await?;
    let new = fleet
        .consumers()
        .sink()
        .store()
        .grant(stream.clone(), name.clone(), now_ms())
        .await
        .map_err(internal)?;
    let what = format!("{}/{}", stream.device, stream.channel);
    audit_ok(
        &fleet,
        &by,
        "consumer.grant",
        &name,
        format!("may read {what}{}", if new { "" } else { " (already)" }),
    );
    Ok(axum::Json(json!({ "consumer": name, "stream": what, "already": !new })).into_response())
}

async fn consumer_revoke_grant(
    State(fleet): State<Arc<Fleet>>,
    caller: Caller,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> Answer {
    let (by, _) = authorize(
        &fleet,
        &caller,
        Action::ConsumerGrant,
        "consumer.revoke-grant",
        "withdraw consumers' grants",
        &name,
    )
    .await?;
    let req: GrantReq = parse_json(&body)?;
    let stream = checked_stream(&req.stream)?;
    checked_consumer(&name)?;
    let what = format!("{}/{}", stream.device, stream.channel);
    let freed = fleet
        .consumers()
        .sink()
        .store()
        .revoke_grant(stream, name.clone())
        .await
        .map_err(internal)?;
    let Some(freed) = freed else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("consumer {name} is not granted {what}"),
        ));
    };
    audit_ok(
        &fleet,
        &by,
        "consumer.revoke-grant",
        &name,
        format!(
            "may no longer read {what}; {freed} records every other consumer had left the sink"
        ),
    );
    Ok(axum::Json(json!({ "consumer": name, "stream": what, "removed": freed })).into_response())
}

async fn consumer_revoke(
    State(fleet): State<Arc<Fleet>>,
    caller: Caller,
    Path(name): Path<String>,
) -> Answer {
    let (by, _) = authorize(
        &fleet,
        &caller,
        Action::ConsumerRevoke,
        "consumer.revoke",
        "revoke consumers",
        &name,
    )
    .await?;
    checked_consumer(&name)?;
    let revoked = fleet
        .registry()
        .revoke_consumer(name.clone(), by.clone(), now_ms())
        .await
        .map_err(internal)?;
    let Some(fresh) = revoked else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no consumer {name}"),
        ));
    };
    // Refused from the next request on (the registry says so); its open
    // connections close now, and its grants go.
    fleet.consumers().close(&name);
    let grants = fleet
        .consumers()
        .sink()
        .store()
        .drop_consumer(name.clone())
        .await
        .map_err(internal)?;
    audit_ok(
        &fleet,
        &by,
        "consumer.revoke",
        &name,
        format!("{grants} grants withdrawn, connections closed"),
    );
    Ok(axum::Json(
        json!({ "consumer": name, "revoked": true, "already": !fresh, "grants": grants }),
    )
    .into_response())
}

/// The most alarms one listing returns.
const MAX_ALARMS_LISTED: usize = 10_000;

#[derive(Deserialize)]
struct AlarmsQuery {
    device: Option<String>,
    since_ms: Option<i64>,
    #[serde(default)]
    unacked: bool,
    limit: Option<usize>,
}

fn alarm_json(row: &gateway_store::registry::AlarmRow) -> Value {
    let mut v = serde_json::to_value(&row.alarm).unwrap_or(Value::Null);
    v["device"] = Value::String(row.device.clone());
    v["acked_by"] = row
        .acked
        .as_ref()
        .map_or(Value::Null, |(by, _)| Value::String(by.clone()));
    v["acked_ms"] = row.acked.as_ref().map_or(Value::Null, |(_, at)| json!(at));
    v
}

async fn alarms_list(
    State(fleet): State<Arc<Fleet>>,
    caller: Caller,
    Query(q): Query<AlarmsQuery>,
) -> Answer {
    authorize(
        &fleet,
        &caller,
        Action::AlarmsRead,
        "alarm.list",
        "read alarms",
        "alarms",
    )
    .await?;
    if let Some(d) = &q.device {
        checked_id(d)?;
    }
    let query = gateway_store::registry::AlarmQuery {
        device: q.device,
        since_ms: q.since_ms,
        unacked: q.unacked,
        limit: q.limit.unwrap_or(1_000).min(MAX_ALARMS_LISTED),
    };
    let rows = fleet.registry().alarms(query).await.map_err(internal)?;
    let alarms: Vec<Value> = rows.iter().map(alarm_json).collect();
    Ok(axum::Json(json!({ "alarms": alarms })).into_response())
}

async fn alarm_ack(
    State(fleet): State<Arc<Fleet>>,
    caller: Caller,
    Path(id): Path<String>,
) -> Answer {
    let (by, _) = authorize(
        &fleet,
        &caller,
        Action::AlarmAck,
        "alarm.ack",
        "acknowledge alarms",
        &id,
    )
    .await?;
    if !gateway_core::detect::valid_alarm_id(&id) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "an alarm id is letters, digits, - and _ (as `gatewayctl alarms list` prints it)"
                .into(),
        ));
    }
    match fleet
        .registry()
        .ack_alarm(id.clone(), by.clone(), now_ms())
        .await
        .map_err(internal)?
    {
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no alarm {id}"),
        )),
        Some(fresh) => {
            if fresh {
                audit_ok(&fleet, &by, "alarm.ack", &id, String::new());
            }
            Ok(
                axum::Json(json!({ "alarm": id, "acked": true, "already": !fresh }))
                    .into_response(),
            )
        }
    }
}

async fn bans_list(State(fleet): State<Arc<Fleet>>, caller: Caller) -> Answer {
    authorize(
        &fleet,
        &caller,
        Action::AlarmsRead,
        "ban.list",
        "read alarms",
        "bans",
    )
    .await?;
    let bans: Vec<Value> = fleet
        .ctx()
        .guard
        .active_bans()
        .into_iter()
        .map(|(ip, until)| {
            json!({
                "source": ip.to_string(),
                "until_ms": until,
                "until": gateway_core::units::rfc3339_cst(until),
            })
        })
        .collect();
    Ok(axum::Json(json!({ "node": fleet.ctx().id, "bans": bans })).into_response())
}

#[derive(Deserialize)]
struct LiftRequest {
    address: String,
    device: Option<String>,
}

async fn ban_lift(
    State(fleet): State<Arc<Fleet>>,
    caller: Caller,
    axum::Json(r): axum::Json<LiftRequest>,
) -> Answer {
    let (by, _) = authorize(
        &fleet,
        &caller,
        Action::BanLift,
        "ban.lift",
        "lift bans",
        &r.address,
    )
    .await?;
    let Ok(ip) = r.address.parse::<std::net::IpAddr>() else {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!(
                "{:?} is not an IP address",
                gateway_core::refusals::peer_text(&r.address)
            ),
        ));
    };
    let here = fleet.ctx().id.clone();
    let device = r.device.unwrap_or_else(|| here.clone());
    checked_id(&device)?;
    let (lifted, output) = if device == here {
        let lifted = fleet.ctx().guard.lift(ip);
        (
            lifted,
            if lifted { "lifted" } else { "not banned" }.to_owned(),
        )
    } else {
        fleet
            .lift_ban(&device, ip.to_string())
            .await
            .map_err(|e| ApiError::new(StatusCode::GATEWAY_TIMEOUT, e.to_string()))?
    };
    audit_ok(
        &fleet,
        &by,
        "ban.lift",
        &ip.to_string(),
        format!("device={device} lifted={lifted}"),
    );
    Ok(axum::Json(
        json!({ "device": device, "address": ip.to_string(), "lifted": lifted, "output": output }),
    )
    .into_response())
}
