//! The operators' routes of running a province (merged into
//! [`super::ops_api`]'s router, checked and audited the same way):
//!
//! | route | action |
//! |---|---|
//! | `POST /v1/templates/{name}` (template body) | config push: policy sections (security), the rest (system), by what the new version changes |
//! | `GET /v1/templates`, `GET /v1/templates/{name}?version=N` | devices read |
//! | `POST /v1/devices/{id}/vars` `{"set": {..}, "remove": [..], "replace"}` | devices vars (system) |
//! | `GET /v1/devices/{id}/vars` | devices read |
//! | `POST /v1/rollouts` `{"template", "selector", "waves", ...}` | config push, for what its configs change |
//! | `GET /v1/rollouts`, `GET /v1/rollouts/{id}` | devices read |
//! | `POST /v1/rollouts/{id}/{pause,abort}` | any account that may push |
//! | `POST /v1/rollouts/{id}/{resume,rollback}` | the role that started it |

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use gateway_core::fleet::{self, Action, AdminRole};
use gateway_core::rollout::{self, FailureLimit, Rollout, State as RState};
use gateway_core::template;
use gateway_store::registry::{Members, NewRollout, NewTemplate, RegistryError, VarsChange};
use serde::Deserialize;
use serde_json::{Value, json};

use super::hub::Fleet;
use super::ops_api::{
    Answer, ApiError, Caller, account, audit_ok, authorize, changed_part, checked_id, internal,
    parse_json, refuse_role, role_for, role_name, select,
};
use super::rollout::{self as ctl, RolloutError};
use crate::node::clock::now_ms;

/// The routes.
pub fn routes() -> Router<Arc<Fleet>> {
    Router::new()
        .route("/v1/templates", get(template_list))
        .route(
            "/v1/templates/{name}",
            post(template_push).get(template_show),
        )
        .route("/v1/devices/{id}/vars", post(vars_set).get(vars_show))
        .route("/v1/rollouts", post(rollout_start).get(rollout_list))
        .route("/v1/rollouts/{id}", get(rollout_show))
        .route("/v1/rollouts/{id}/{verb}", post(rollout_command))
}

fn bad(message: String) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, message)
}

fn checked_template(name: &str) -> Result<(), ApiError> {
    gateway_core::units::check_name("template", name)
        .map_err(|e| bad(format!("template: {}; {}", e.message, e.hint)))
}

/// An account that may push something (either part), or the refusal.
async fn pusher(
    fleet: &Fleet,
    caller: &Caller,
    (event, what): (&str, &str),
    object: &str,
) -> Result<(String, AdminRole), ApiError> {
    let (by, role) = account(fleet, caller).await?;
    if fleet::allowed(role, Action::ConfigPushOther)
        || fleet::allowed(role, Action::ConfigPushPolicy)
    {
        return Ok((by, role));
    }
    authorize(fleet, caller, Action::ConfigPushOther, event, what, object).await
}

/// Refuses `role` a change that touches a part it may not change, naming
/// the part (and the device, when one is concerned).
fn role_covers(
    fleet: &Fleet,
    (by, role): (&str, AdminRole),
    (old, new): (&str, &str),
    (event, whose): (&str, &str),
    object: &str,
) -> Result<(), ApiError> {
    let change = fleet::classify_change(old, new);
    for action in ctl::role_needed(change) {
        if !fleet::allowed(role, action) {
            let message = format!(
                "account {by} ({}) may not change {}{whose}: that is the {}'s; make those changes separately",
                role_name(role),
                changed_part(action, old, new),
                role_for(action)
            );
            return Err(refuse_role(fleet, by, object, event, message));
        }
    }
    Ok(())
}

async fn template_push(
    State(fleet): State<Arc<Fleet>>,
    caller: Caller,
    Path(name): Path<String>,
    body: String,
) -> Answer {
    let (by, role) = pusher(&fleet, &caller, ("template.push", "push templates"), &name).await?;
    checked_template(&name)?;
    if body.len() > template::MAX_TEMPLATE {
        return Err(bad(format!(
            "the template is larger than {} bytes",
            template::MAX_TEMPLATE
        )));
    }
    let file = format!("template {name}");
    let unprocessable = |errors: Vec<String>| {
        Ok((
            StatusCode::UNPROCESSABLE_ENTITY,
            axum::Json(json!({
                "error": format!("the template does not read ({} errors)", errors.len()),
                "errors": errors,
            })),
        )
            .into_response())
    };
    let variables = match template::variables(&body) {
        Ok(v) => v,
        Err(es) => {
            return unprocessable(
                es.iter()
                    .map(|e| format!("{file}:{}:{}: {}", e.line, e.column, e.message))
                    .collect(),
            );
        }
    };
    if let Err(e) = template::check_toml(&body) {
        return unprocessable(vec![format!(
            "{file}:{}:{}: {}",
            e.line, e.column, e.message
        )]);
    }
    let symbolic = template::symbolic(&body);
    let reg = fleet.registry();
    let before = reg.template(name.clone(), None).await.map_err(internal)?;
    let old = before
        .as_ref()
        .map(|t| template::symbolic(&t.text))
        .unwrap_or_default();
    let change = fleet::classify_change(&old, &symbolic);
    if !change.policy && !change.other {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "the template equals version {}; nothing to push",
                before.map_or(0, |t| t.version)
            ),
        ));
    }
    // A new template changes no box (a rollout of it is classified against
    // each box's config); each version after it is classified against the
    // one before, as pushes are.
    if before.is_some() {
        role_covers(
            &fleet,
            (&by, role),
            (&old, &symbolic),
            ("template.push", " of the template"),
            &name,
        )?;
    }
    let version = reg
        .put_template(NewTemplate {
            name: name.clone(),
            text: body,
            by: by.clone(),
            now_ms: now_ms(),
        })
        .await
        .map_err(internal)?;
    audit_ok(
        &fleet,
        &by,
        "template.push",
        &name,
        format!(
            "version={version} policy={} other={}",
            change.policy, change.other
        ),
    );
    Ok((
        StatusCode::CREATED,
        axum::Json(json!({
            "template": name,
            "version": version,
            "change": change,
            "variables": variables,
        })),
    )
        .into_response())
}

async fn template_list(State(fleet): State<Arc<Fleet>>, caller: Caller) -> Answer {
    authorize(
        &fleet,
        &caller,
        Action::DevicesRead,
        "template.list",
        "list templates",
        "templates",
    )
    .await?;
    let all = fleet.registry().templates().await.map_err(internal)?;
    let out: Vec<Value> = all
        .iter()
        .map(|t| {
            json!({
                "name": t.name,
                "version": t.version,
                "by": t.by,
                "at_ms": t.at_ms,
                "variables": template::variables(&t.text).unwrap_or_default(),
            })
        })
        .collect();
    Ok(axum::Json(Value::Array(out)).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Version {
    version: Option<u64>,
}

async fn template_show(
    State(fleet): State<Arc<Fleet>>,
    caller: Caller,
    Path(name): Path<String>,
    Query(q): Query<Version>,
) -> Answer {
    authorize(
        &fleet,
        &caller,
        Action::DevicesRead,
        "template.show",
        "read templates",
        &name,
    )
    .await?;
    checked_template(&name)?;
    match fleet
        .registry()
        .template(name.clone(), q.version)
        .await
        .map_err(internal)?
    {
        Some(t) => Ok((
            [
                ("content-type", "application/toml"),
                (
                    "x-gateway-template",
                    &format!("{} version {}", t.name, t.version),
                ),
            ],
            t.text,
        )
            .into_response()),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!(
                "no template {name}{} on this hub; gatewayctl template list shows them",
                q.version
                    .map(|v| format!(" version {v}"))
                    .unwrap_or_default()
            ),
        )),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VarsReq {
    #[serde(default)]
    set: BTreeMap<String, String>,
    #[serde(default)]
    remove: Vec<String>,
    #[serde(default)]
    replace: bool,
}

async fn vars_set(
    State(fleet): State<Arc<Fleet>>,
    caller: Caller,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Answer {
    let (by, _) = authorize(
        &fleet,
        &caller,
        Action::DevicesVars,
        "device.vars",
        "set device variables",
        &id,
    )
    .await?;
    checked_id(&id)?;
    let req: VarsReq = parse_json(&body)?;
    if req.set.len() + req.remove.len() > template::MAX_VARIABLES {
        return Err(bad(format!(
            "at most {} variables at once",
            template::MAX_VARIABLES
        )));
    }
    for (k, v) in &req.set {
        template::check_variable(k, v).map_err(|e| bad(format!("set.{k}: {e}")))?;
    }
    let after = fleet
        .registry()
        .set_vars(VarsChange {
            device: id.clone(),
            set: req.set.into_iter().collect(),
            remove: req.remove,
            replace: req.replace,
        })
        .await
        .map_err(|e| match e {
            RegistryError::Refused(m) => bad(format!("vars: {m}")),
            other => internal(other),
        })?;
    let names: Vec<&str> = after.iter().map(|(k, _)| k.as_str()).collect();
    audit_ok(&fleet, &by, "device.vars", &id, names.join(","));
    let vars: serde_json::Map<String, Value> = after
        .into_iter()
        .map(|(k, v)| (k, Value::String(v)))
        .collect();
    Ok(axum::Json(json!({ "device": id, "vars": vars })).into_response())
}

async fn vars_show(
    State(fleet): State<Arc<Fleet>>,
    caller: Caller,
    Path(id): Path<String>,
) -> Answer {
    authorize(
        &fleet,
        &caller,
        Action::DevicesRead,
        "device.vars.show",
        "read device variables",
        &id,
    )
    .await?;
    checked_id(&id)?;
    let vars: serde_json::Map<String, Value> = fleet
        .registry()
        .vars(vec![id.clone()])
        .await
        .map_err(internal)?
        .into_iter()
        .map(|(_, k, v)| (k, Value::String(v)))
        .collect();
    Ok(axum::Json(json!({ "device": id, "vars": vars })).into_response())
}

/// `POST /v1/rollouts`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StartReq {
    #[serde(default)]
    template: String,
    /// A firmware version instead of a template.
    #[serde(default)]
    firmware: Option<String>,
    /// For firmware: the boxes' trial time (`[update] trial`).
    #[serde(default)]
    trial: Option<String>,
    version: Option<u64>,
    #[serde(default)]
    selector: String,
    waves: String,
    #[serde(default)]
    min_wave: Option<usize>,
    #[serde(default)]
    max_failures: Option<String>,
    #[serde(default)]
    soak: Option<String>,
    #[serde(default)]
    dry_run: bool,
    #[serde(default)]
    restart: bool,
}

/// At most this many errors are listed in a refusal (the count says the rest).
const ERRORS_SHOWN: usize = 50;
/// The largest rollout.
pub const MAX_ROLLOUT: usize = 50_000;

async fn rollout_start(
    State(fleet): State<Arc<Fleet>>,
    caller: Caller,
    body: axum::body::Bytes,
) -> Answer {
    // Who asks, before what they ask is read.
    account(&fleet, &caller).await?;
    let req: StartReq = parse_json(&body)?;
    if let Some(version) = req.firmware.clone() {
        return firmware_start(&fleet, &caller, req, version).await;
    }
    let (by, role) = pusher(
        &fleet,
        &caller,
        ("rollout.start", "start rollouts"),
        "rollouts",
    )
    .await?;
    checked_template(&req.template)?;
    let steps = rollout::parse_waves(&req.waves).map_err(bad)?;
    let limit_spec = req.max_failures.clone().unwrap_or_else(|| "0".into());
    let limit = FailureLimit::parse(&limit_spec).map_err(bad)?;
    let soak = match &req.soak {
        Some(s) => gateway_core::units::parse_duration(s)
            .map_err(|e| bad(format!("soak: {}; {}", e.message, e.hint)))?,
        None => std::time::Duration::from_secs(60),
    };
    let min_wave = req.min_wave.unwrap_or(1);
    if min_wave > MAX_ROLLOUT {
        return Err(bad(format!("min_wave: at most {MAX_ROLLOUT}")));
    }
    let selector = gateway_core::selector::Selector::parse(&req.selector)
        .map_err(|e| bad(format!("selector: {e}")))?;
    let reg = fleet.registry();
    let Some(t) = reg
        .template(req.template.clone(), req.version)
        .await
        .map_err(internal)?
    else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no template {} on this hub", req.template),
        ));
    };
    let picked = picked_for_rollout(&fleet, &selector).await?;
    // Every device's config, rendered and checked, against what it has.
    let mut vars: HashMap<String, BTreeMap<String, String>> = HashMap::new();
    for (d, k, v) in reg.vars(picked.clone()).await.map_err(internal)? {
        vars.entry(d).or_default().insert(k, v);
    }
    let mut bases = Vec::with_capacity(picked.len());
    for d in &picked {
        let base = match reg.desired(d.clone()).await.map_err(internal)? {
            Some(b) => Some(b),
            None => reg.applied(d.clone()).await.map_err(internal)?,
        };
        bases.push(base.map(|b| b.1));
    }
    let (name, version, text) = (t.name.clone(), t.version, t.text.clone());
    let devices = picked.clone();
    let checked = tokio::task::spawn_blocking(move || {
        let none = BTreeMap::new();
        devices
            .iter()
            .zip(bases)
            .map(|(d, base)| {
                let r =
                    ctl::render_checked((&name, version, &text), d, vars.get(d).unwrap_or(&none));
                let restart = match (&r, &base) {
                    (Ok((_, config)), Some(b)) => {
                        gateway_core::config::restart::restart_needed_over(b, config)
                    }
                    _ => None,
                };
                (r.map(|(text, _)| text), base, restart)
            })
            .collect::<Vec<_>>()
    })
    .await
    .map_err(internal)?;
    let mut errors = Vec::new();
    let (mut policy, mut other, mut unchanged) = (0usize, 0usize, 0usize);
    let mut first_policy = None;
    let mut first_other = None;
    for (d, (rendered, base, restart)) in picked.iter().zip(&checked) {
        if let (Some(what), false) = (restart, req.restart) {
            errors.push(format!(
                "{}: the change to {what} takes a restart of the box: start the rollout with --restart (each box restarts itself, then tries its version), or leave {what} as it is",
                ctl::rendered_name(&t.name, t.version, d)
            ));
            continue;
        }
        match (rendered, base) {
            (Err(es), _) => errors.extend(es.iter().cloned()),
            (Ok(_), None) => errors.push(format!(
                "{}: the hub has not seen {d}'s config yet (it reports it when it first connects)",
                ctl::rendered_name(&t.name, t.version, d)
            )),
            (Ok(text), Some(base)) => {
                let c = fleet::classify_change(base, text);
                if c.policy {
                    policy += 1;
                    first_policy.get_or_insert((d.clone(), base.as_str(), text.as_str()));
                }
                if c.other {
                    other += 1;
                    first_other.get_or_insert((d.clone(), base.as_str(), text.as_str()));
                }
                if !c.policy && !c.other {
                    unchanged += 1;
                }
            }
        }
    }
    if !errors.is_empty() {
        let n = errors.len();
        errors.truncate(ERRORS_SHOWN);
        fleet.ctx().audit.record(
            &by,
            &t.name,
            "admin.rollout.start",
            "deny",
            "config",
            format!("{n} errors in the rendered configs"),
        );
        return Ok((
            StatusCode::UNPROCESSABLE_ENTITY,
            axum::Json(json!({
                "error": format!(
                    "{n} error(s) in the configs template {} v{} renders for the {} selected devices{}; nothing was started",
                    t.name, t.version, picked.len(),
                    if n > ERRORS_SHOWN { format!(" (the first {ERRORS_SHOWN} shown)") } else { String::new() }
                ),
                "errors": errors,
            })),
        )
            .into_response());
    }
    // The first device each part changes on, against its own config.
    for (d, base, text) in first_policy.iter().chain(&first_other) {
        role_covers(
            &fleet,
            (&by, role),
            (base, text),
            ("rollout.start", &format!(" on {d}")),
            &t.name,
        )?;
    }
    let ends = rollout::plan(picked.len(), &steps, min_wave);
    let summary = json!({
        "template": t.name,
        "template_version": t.version,
        "devices": picked.len(),
        "waves": ends.iter().scan(0, |prev, &e| { let n = e - *prev; *prev = e; Some(n) }).collect::<Vec<_>>(),
        "max_failures": limit.allowed(picked.len()),
        "changes": { "policy": policy, "other": other, "unchanged": unchanged },
    });
    if req.dry_run {
        return Ok(axum::Json(summary).into_response());
    }
    let id = new_id();
    let mut doc = draft(
        id.clone(),
        (&picked, &ends, &selector),
        (&req.waves, limit_spec, limit),
        u64::try_from(soak.as_millis()).unwrap_or(u64::MAX),
        (&by, role),
    );
    doc.template = t.name.clone();
    doc.template_version = t.version;
    doc.restart = req.restart;
    create(&fleet, &by, &doc, picked).await?;
    audit_ok(
        &fleet,
        &by,
        "rollout.start",
        &id,
        format!(
            "template={} v{} selector={:?} waves={} max_failures={} soak_ms={} devices={}",
            doc.template,
            doc.template_version,
            doc.selector,
            doc.waves_spec,
            doc.max_failures_spec,
            doc.soak_ms,
            doc.devices.len()
        ),
    );
    let mut out = summary;
    out["id"] = json!(id);
    Ok((StatusCode::CREATED, axum::Json(out)).into_response())
}

/// A new rollout's id: `r-` the time (China Standard Time) and a random part.
fn new_id() -> String {
    format!(
        "r-{}-{:04x}",
        gateway_core::units::rfc3339_cst(now_ms())
            .chars()
            .filter(char::is_ascii_digit)
            .take(14)
            .collect::<String>(),
        rand::random::<u16>()
    )
}

/// A new rollout `id` of nothing yet (the caller says what it rolls out)
/// over `picked` in waves ending at `ends`.
fn draft(
    id: String,
    (picked, ends, selector): (&[String], &[usize], &gateway_core::selector::Selector),
    (waves, limit_spec, limit): (&str, String, FailureLimit),
    soak_ms: u64,
    (by, role): (&str, AdminRole),
) -> Rollout {
    Rollout {
        id,
        template: String::new(),
        template_version: 0,
        selector: selector.to_string(),
        waves_spec: waves.to_owned(),
        waves: ends.to_vec(),
        max_failures_spec: limit_spec,
        max_failures: limit.allowed(picked.len()),
        soak_ms,
        by: by.to_owned(),
        by_role: role.as_str().to_owned(),
        restart: false,
        created_ms: now_ms(),
        state: RState::Running,
        reason: None,
        wave_started_ms: vec![],
        failure_base: 0,
        pushing: None,
        rollback_started_ms: None,
        devices: rollout::members(picked.to_vec(), ends),
        firmware: None,
    }
}

/// Stores rollout `doc` over `devices` (none of which may be in another
/// active rollout) and wakes the controllers.
async fn create(
    fleet: &Fleet,
    by: &str,
    doc: &Rollout,
    devices: Vec<String>,
) -> Result<(), ApiError> {
    fleet
        .registry()
        .create_rollout(NewRollout {
            id: doc.id.clone(),
            json: serde_json::to_string(doc).map_err(internal)?,
            devices,
            now_ms: now_ms(),
        })
        .await
        .map_err(|e| match e {
            e @ RegistryError::InRollout { .. } => {
                fleet.ctx().audit.record(
                    by,
                    &doc.id,
                    "admin.rollout.start",
                    "deny",
                    "config",
                    e.to_string(),
                );
                ApiError::new(StatusCode::CONFLICT, e.to_string())
            }
            other => internal(other),
        })?;
    fleet.wake_rollouts();
    Ok(())
}

/// The devices `selector` picks for a rollout (not revoked), at least one
/// and at most [`MAX_ROLLOUT`].
async fn picked_for_rollout(
    fleet: &Fleet,
    selector: &gateway_core::selector::Selector,
) -> Result<Vec<String>, ApiError> {
    let picked: Vec<String> = select(fleet, selector, None, MAX_ROLLOUT + 1)
        .await?
        .into_iter()
        .filter(|(row, _)| row.revoked_ms.is_none())
        .map(|(row, _)| row.id)
        .collect();
    if picked.is_empty() {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!(
                "the selector {selector:?} picks no device (revoked ones are never rolled out to)"
            ),
        ));
    }
    if picked.len() > MAX_ROLLOUT {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("the selector picks more than {MAX_ROLLOUT} devices; narrow it"),
        ));
    }
    Ok(picked)
}

/// `POST /v1/rollouts` with `firmware`: a firmware version in waves (system
/// administrator). The version must be complete in the hubs' store.
async fn firmware_start(fleet: &Fleet, caller: &Caller, req: StartReq, version: String) -> Answer {
    let (by, role) = authorize(
        fleet,
        caller,
        Action::FirmwareRollout,
        "rollout.start",
        "start firmware rollouts",
        "rollouts",
    )
    .await?;
    if !req.template.is_empty() || req.version.is_some() || req.restart {
        return Err(bad(
            "a firmware rollout takes no template, version or restart".into(),
        ));
    }
    if gateway_core::firmware::version_numbers(&version).is_none() {
        return Err(bad(format!(
            "firmware: {:?} is not a version (dotted numbers, as gatewayctl firmware list shows)",
            gateway_core::refusals::peer_text(&version)
        )));
    }
    let steps = rollout::parse_waves(&req.waves).map_err(bad)?;
    let limit_spec = req.max_failures.clone().unwrap_or_else(|| "0".into());
    let limit = FailureLimit::parse(&limit_spec).map_err(bad)?;
    let duration = |name: &str, v: &Option<String>, default: u64| match v {
        Some(s) => gateway_core::units::parse_duration(s)
            .map_err(|e| bad(format!("{name}: {}; {}", e.message, e.hint))),
        None => Ok(std::time::Duration::from_secs(default)),
    };
    let soak = duration("soak", &req.soak, 0)?;
    let trial = duration("trial", &req.trial, 15 * 60)?;
    if trial.is_zero() {
        return Err(bad(
            "trial: must be longer than 0 s (the boxes' [update] trial)".into(),
        ));
    }
    let min_wave = req.min_wave.unwrap_or(1);
    if min_wave > MAX_ROLLOUT {
        return Err(bad(format!("min_wave: at most {MAX_ROLLOUT}")));
    }
    let selector = gateway_core::selector::Selector::parse(&req.selector)
        .map_err(|e| bad(format!("selector: {e}")))?;
    let stored = fleet
        .registry()
        .firmware(version.clone())
        .await
        .map_err(internal)?;
    if !stored.as_ref().is_some_and(|f| f.row.complete) {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!(
                "firmware {version} is not {} on the hubs' store; gatewayctl firmware upload BUNDLE first",
                if stored.is_some() {
                    "complete"
                } else {
                    "uploaded"
                }
            ),
        ));
    }
    let picked = picked_for_rollout(fleet, &selector).await?;
    let ends = rollout::plan(picked.len(), &steps, min_wave);
    let summary = json!({
        "firmware": version,
        "devices": picked.len(),
        "waves": ends.iter().scan(0, |prev, &e| { let n = e - *prev; *prev = e; Some(n) }).collect::<Vec<_>>(),
        "max_failures": limit.allowed(picked.len()),
        "trial_ms": trial.as_millis(),
    });
    if req.dry_run {
        return Ok(axum::Json(summary).into_response());
    }
    let ms = |d: std::time::Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    let mut doc = draft(
        new_id(),
        (&picked, &ends, &selector),
        (&req.waves, limit_spec, limit),
        ms(soak),
        (&by, role),
    );
    doc.firmware = Some(rollout::FirmwareRollout {
        version: version.clone(),
        trial_ms: ms(trial),
    });
    create(fleet, &by, &doc, picked).await?;
    audit_ok(
        fleet,
        &by,
        "rollout.start",
        &doc.id,
        format!(
            "firmware={version} selector={:?} waves={} max_failures={} trial_ms={} devices={}",
            doc.selector,
            doc.waves_spec,
            doc.max_failures_spec,
            ms(trial),
            doc.devices.len()
        ),
    );
    let mut out = summary;
    out["id"] = json!(doc.id);
    Ok((StatusCode::CREATED, axum::Json(out)).into_response())
}

fn rollout_err(e: RolloutError) -> ApiError {
    match e {
        RolloutError::Unknown(_) => ApiError::new(StatusCode::NOT_FOUND, e.to_string()),
        RolloutError::Refused(_) => ApiError::new(StatusCode::CONFLICT, e.to_string()),
        RolloutError::Registry(RegistryError::InRollout { .. }) => {
            ApiError::new(StatusCode::CONFLICT, e.to_string())
        }
        RolloutError::Registry(r) => internal(r),
        RolloutError::Corrupt(..) => internal(e),
    }
}

fn checked_rollout(id: &str) -> Result<(), ApiError> {
    if rollout::valid_id(id) {
        Ok(())
    } else {
        Err(bad(format!(
            "rollout: {:?} is not a rollout id (r-DIGITS-HEX, as gatewayctl rollout list shows)",
            gateway_core::refusals::peer_text(id)
        )))
    }
}

/// A rollout's status: per wave, each status with its devices.
fn status_json(doc: &Rollout, st: &[rollout::DeviceStatus]) -> Value {
    let mut waves = Vec::new();
    let mut start = 0;
    for (k, &end) in doc.waves.iter().enumerate() {
        let mut by_status: BTreeMap<&str, Vec<Value>> = BTreeMap::new();
        for (m, s) in doc.devices.iter().zip(st).filter(|(m, _)| m.wave == k) {
            let mut entry = json!({ "device": m.device });
            if let Some(v) = m.pushed {
                entry["version"] = json!(v);
            }
            if let Some(v) = m.rollback {
                entry["rollback_version"] = json!(v);
            }
            if let Some(d) = s.detail() {
                entry["detail"] = json!(d);
            }
            by_status.entry(s.as_str()).or_default().push(entry);
        }
        let counts: BTreeMap<&str, usize> = by_status.iter().map(|(k, v)| (*k, v.len())).collect();
        waves.push(json!({
            "wave": k + 1,
            "size": end - start,
            "started_ms": doc.wave_started_ms.get(k),
            "counts": counts,
            "devices": by_status,
        }));
        start = end;
    }
    json!({
        "id": doc.id,
        "template": doc.template,
        "template_version": doc.template_version,
        "firmware": doc.firmware.as_ref().map(|f| &f.version),
        "trial_ms": doc.firmware.as_ref().map(|f| f.trial_ms),
        "selector": doc.selector,
        "waves_spec": doc.waves_spec,
        "max_failures": doc.max_failures_spec,
        "max_failures_allowed": doc.max_failures,
        "soak_ms": doc.soak_ms,
        "by": doc.by,
        "created_ms": doc.created_ms,
        "state": doc.state.as_str(),
        "reason": doc.reason,
        "wave": doc.wave_started_ms.len(),
        "failures": rollout::failures(st),
        "devices": doc.devices.len(),
        "waves": waves,
    })
}

async fn rollout_list(State(fleet): State<Arc<Fleet>>, caller: Caller) -> Answer {
    authorize(
        &fleet,
        &caller,
        Action::DevicesRead,
        "rollout.list",
        "list rollouts",
        "rollouts",
    )
    .await?;
    let rows = fleet.registry().rollouts(false).await.map_err(internal)?;
    let out: Vec<Value> = rows
        .iter()
        .filter_map(|r| serde_json::from_str::<Rollout>(&r.json).ok())
        .map(|d| {
            json!({
                "id": d.id,
                "template": d.template,
                "template_version": d.template_version,
                "firmware": d.firmware.as_ref().map(|f| &f.version),
                "state": d.state.as_str(),
                "reason": d.reason,
                "devices": d.devices.len(),
                "wave": d.wave_started_ms.len(),
                "waves": d.waves.len(),
                "by": d.by,
                "created_ms": d.created_ms,
            })
        })
        .collect();
    Ok(axum::Json(Value::Array(out)).into_response())
}

async fn rollout_show(
    State(fleet): State<Arc<Fleet>>,
    caller: Caller,
    Path(id): Path<String>,
) -> Answer {
    authorize(
        &fleet,
        &caller,
        Action::DevicesRead,
        "rollout.status",
        "read rollouts",
        &id,
    )
    .await?;
    checked_rollout(&id)?;
    let (doc, st) = current(&fleet, &id).await?;
    Ok(axum::Json(status_json(&doc, &st)).into_response())
}

/// Rollout `id` and its members' statuses now.
async fn current(
    fleet: &Fleet,
    id: &str,
) -> Result<(Rollout, Vec<rollout::DeviceStatus>), ApiError> {
    let row = fleet
        .registry()
        .rollout(id.to_owned())
        .await
        .map_err(internal)?
        .ok_or_else(|| rollout_err(RolloutError::Unknown(id.to_owned())))?;
    let doc: Rollout = serde_json::from_str(&row.json).map_err(internal)?;
    let rows = ctl::all_rows(fleet).await.map_err(internal)?;
    let st = ctl::statuses(&doc, &rows, now_ms());
    Ok((doc, st))
}

async fn rollout_command(
    State(fleet): State<Arc<Fleet>>,
    caller: Caller,
    Path((id, verb)): Path<(String, String)>,
) -> Answer {
    if !["pause", "resume", "abort", "rollback"].contains(&verb.as_str()) {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "the rollout commands are pause, resume, abort and rollback".into(),
        ));
    }
    let (by, role) = pusher(
        &fleet,
        &caller,
        (&format!("rollout.{verb}"), &format!("{verb} rollouts")),
        &id,
    )
    .await?;
    checked_rollout(&id)?;
    // The failures counted now (for resume).
    let failures_now = if verb == "resume" {
        rollout::failures(&current(&fleet, &id).await?.1)
    } else {
        0
    };
    let who = format!("{verb} by {by}");
    let done = ctl::update(&fleet, &id, |d| {
        let same_role = d.by_role == role.as_str();
        let refuse = |why: String| Err(RolloutError::Refused(why));
        match verb.as_str() {
            "pause" => {
                if d.state != RState::Running {
                    return refuse(format!("rollout {} is {}, not running", d.id, d.state.as_str()));
                }
                d.state = RState::Paused;
                d.reason = Some(who.clone());
                Ok(Some(Members::Keep))
            }
            "resume" => {
                if d.state != RState::Paused {
                    return refuse(format!("rollout {} is {}, not paused", d.id, d.state.as_str()));
                }
                if !same_role {
                    return refuse(format!(
                        "rollout {} pushes as the {} administrator who started it; resume it with such an account",
                        d.id, d.by_role
                    ));
                }
                d.state = RState::Running;
                d.reason = Some(who.clone());
                d.failure_base = failures_now;
                Ok(Some(Members::Keep))
            }
            "abort" => {
                if !matches!(d.state, RState::Running | RState::Paused) {
                    return refuse(format!("rollout {} is {}; only a running or paused one is aborted", d.id, d.state.as_str()));
                }
                d.state = RState::Aborted;
                d.reason = Some(who.clone());
                Ok(Some(Members::Release))
            }
            _ => {
                if !same_role {
                    return refuse(format!(
                        "rollout {} pushed as the {} administrator who started it; roll it back with such an account",
                        d.id, d.by_role
                    ));
                }
                if d.firmware.is_some() {
                    return refuse(format!(
                        "rollout {} is of firmware: a hub does not roll firmware back; each box keeps its previous version in its other slot and goes back to it by itself when the new one fails its trial. Abort this rollout, then roll the previous version out",
                        d.id
                    ));
                }
                if matches!(d.state, RState::RollingBack | RState::RolledBack) {
                    return refuse(format!("rollout {} is {} already", d.id, d.state.as_str()));
                }
                let members = if d.state.holds_devices() {
                    Members::Keep
                } else {
                    Members::Claim(
                        d.devices
                            .iter()
                            .filter(|m| m.pushed.is_some())
                            .map(|m| m.device.clone())
                            .collect(),
                    )
                };
                d.state = RState::RollingBack;
                d.reason = Some(who.clone());
                d.rollback_started_ms = Some(now_ms());
                Ok(Some(members))
            }
        }
    })
    .await
    .map_err(|e| {
        fleet.ctx().audit.record(&by, &id, &format!("admin.rollout.{verb}"), "deny", "config", e.to_string());
        rollout_err(e)
    })?;
    let Some(doc) = done else {
        return Err(rollout_err(RolloutError::Unknown(id)));
    };
    audit_ok(
        &fleet,
        &by,
        &format!("rollout.{verb}"),
        &id,
        format!("state={}", doc.state.as_str()),
    );
    Ok(axum::Json(json!({ "id": id, "state": doc.state.as_str() })).into_response())
}
