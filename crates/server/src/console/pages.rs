//! The console's pages and form actions. Each page reads through the function behind a
//! JSON route; each action builds the JSON body the CLI would send and calls the route's
//! handler with the session's admin, so validation and audit are the API's own.

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Redirect, Response};
use axum::{Form, Json};
use maud::{html, Markup};
use serde::Deserialize;
use tandem_proto::backup::ReplaceRequest;
use tandem_proto::fleet::{
    Assign, DeviceControls, DeviceInfo, DeviceStatus, ImageRef, KillRequest, Policy, SetPolicy,
};

use super::api::{self, AuditQuery, DeviceSearch, OverviewQuery};
use super::session::Session;
use super::view::{self, ago, bytes, page, q, span, time};
use super::ConsoleState;
use crate::auth::Admin;
use crate::error::ApiError;
use crate::{admin, now};

fn body<T: serde::Serialize>(v: &T) -> Bytes {
    Bytes::from(serde_json::to_vec(v).expect("serializing plain data cannot fail"))
}

/// Notices shown after an action (`?done=CODE`): a closed list, so a link cannot make the
/// console say arbitrary things.
fn notice(code: Option<&str>) -> Markup {
    let text = match code {
        Some("kill-ordered") => "Kill ordered. The device stops its corporate desktop, erases its keys and corporate data at its next contact; until then its lease locks it.",
        Some("replaced") => "Replacement done: the old device is being killed and the new one gets the user's disk from the latest backup.",
        Some("assigned") => "Assignment saved. Devices pick it up at their next check-in.",
        Some("policy-saved") => "Policy saved. Devices pick it up at their next check-in.",
        _ => return html! {},
    };
    html! { p.flash role="status" { (text) } }
}

/// Query with only a notice.
#[derive(Debug, Default, Deserialize)]
pub struct Done {
    #[serde(default)]
    done: Option<String>,
}

fn status_badge(s: DeviceStatus) -> Markup {
    html! { span class={"st st-" (s.as_str())} { (s.as_str()) } }
}

fn lease_cell(d: &DeviceInfo, now: u64) -> Markup {
    match (d.status, d.lease_not_after) {
        (DeviceStatus::Active, Some(n)) if n > now => html! { (span(n - now)) },
        (DeviceStatus::Active, Some(_)) => html! { span.muted { "expired" } },
        (_, _) => html! { span.muted { "none" } },
    }
}

fn device_rows(devices: &[DeviceInfo], now: u64) -> Markup {
    html! {
        @for d in devices {
            tr {
                td { a href={"/console/devices/" (d.id)} { (d.hostname) } }
                td { a href={"/console/devices?user=" (q(&d.user))} { (d.user) } }
                td { (status_badge(d.status)) }
                td { (ago(d.last_checkin, now)) }
                td { (lease_cell(d, now)) }
                td.mono { (d.id.to_string()[..12]) "…" }
            }
        }
    }
}

fn device_table(devices: &[DeviceInfo], now: u64) -> Markup {
    html! {
        table {
            thead { tr { th { "Host" } th { "User" } th { "State" } th { "Last check-in" } th { "Lease left" } th { "Id" } } }
            tbody { (device_rows(devices, now)) }
        }
    }
}

/// `GET /console`.
pub async fn overview(
    State(st): State<ConsoleState>,
    s: Session,
    Query(oq): Query<OverviewQuery>,
) -> Response {
    let o = match api::overview(&st, &oq).await {
        Ok(o) => o,
        Err(e) => return view::error_page(e),
    };
    let count = |want: DeviceStatus| {
        o.by_state
            .iter()
            .find(|(s, _)| *s == want)
            .map(|(_, n)| *n)
            .unwrap_or(0)
    };
    let total: u64 = o.by_state.iter().map(|(_, n)| n).sum();
    let body = html! {
        div.cards {
            div.card { div.n #count-total { (total) } div.l { "devices" } }
            div.card.good { div.n #count-active { (count(DeviceStatus::Active)) } div.l { a href="/console/devices?status=active" { "active" } } }
            div.card.warn { div.n #count-kill-pending { (count(DeviceStatus::KillPending)) } div.l { a href="/console/devices?status=kill-pending" { "kill pending" } } }
            div.card.bad { div.n #count-killed { (count(DeviceStatus::Killed)) } div.l { a href="/console/devices?status=killed" { "killed" } } }
            div.card.warn { div.n { (o.leases_expiring.total) } div.l { "leases ending in 3 days" } }
            div.card.warn { div.n { (o.not_seen.total) } div.l { "not seen for " (o.stale_days) " days" } }
            div.card.bad { div.n { (o.backups_overdue.total) } div.l { "backups overdue" } }
        }
        h2 { "Leases ending in the next 3 days" }
        @if o.leases_expiring.devices.is_empty() { p.muted { "None." } } @else { (device_table(&o.leases_expiring.devices, o.now)) }
        h2 { "Not seen for " (o.stale_days) " days or more" }
        form.filters method="get" action="/console" {
            div { label for="stale_days" { "Days" } input #stale_days type="number" name="stale_days" min="1" value=(o.stale_days); }
            button type="submit" { "Show" }
        }
        @if o.not_seen.devices.is_empty() { p.muted { "None." } } @else { (device_table(&o.not_seen.devices, o.now)) }
        h2 { "Backups overdue" }
        p.hint { "Active devices whose last backup is older than twice their policy's backup interval, or that reported none." }
        @if o.backups_overdue.devices.is_empty() { p.muted { "None." } } @else { (device_table(&o.backups_overdue.devices, o.now)) }
        h2 { "Infected scans" }
        p.muted { "No scan results are stored on the server: publishing refuses infected images, and laptops keep their scan reports." }
    };
    page(&s, "/console", "Fleet overview", body)
}

fn sort_link(sq: &DeviceSearch, col: &str, label: &str) -> Markup {
    let current = sq.sort.as_deref().unwrap_or("enrolled");
    let desc = sq.order.as_deref() == Some("desc");
    let order = if current == col && !desc {
        "desc"
    } else {
        "asc"
    };
    let arrow = match (current == col, desc) {
        (true, false) => " ▲",
        (true, true) => " ▼",
        _ => "",
    };
    let href = search_href(sq, Some(col), Some(order), Some(1));
    html! { a href=(href) { (label) (arrow) } }
}

fn search_href(
    sq: &DeviceSearch,
    sort: Option<&str>,
    order: Option<&str>,
    page: Option<u64>,
) -> String {
    let mut parts = Vec::new();
    let mut add = |k: &str, v: Option<&str>| {
        if let Some(v) = v.filter(|v| !v.is_empty()) {
            parts.push(format!("{k}={}", q(v)));
        }
    };
    add("q", sq.q.as_deref());
    add("status", sq.status.as_deref());
    add("user", sq.user.as_deref());
    add("sort", sort.or(sq.sort.as_deref()));
    add("order", order.or(sq.order.as_deref()));
    let page = page.or(sq.page).unwrap_or(1).to_string();
    add("page", Some(&page));
    format!("/console/devices?{}", parts.join("&"))
}

/// `GET /console/devices`.
pub async fn devices(
    State(st): State<ConsoleState>,
    s: Session,
    Query(sq): Query<DeviceSearch>,
) -> Response {
    let r = match api::search_devices(&st, &sq).await {
        Ok(r) => r,
        Err(e) => return view::error_page(e),
    };
    let now = now();
    let pages = r.total.div_ceil(u64::from(r.per_page)).max(1);
    let status = sq.status.as_deref().unwrap_or("");
    let body = html! {
        form.filters method="get" action="/console/devices" {
            div { label for="q" { "Search host, user or id" } input #q type="search" name="q" value=[sq.q.as_deref()]; }
            div { label for="status" { "State" }
                select #status name="status" {
                    option value="" selected[status.is_empty()] { "any" }
                    @for st in ["active", "kill-pending", "killed"] { option value=(st) selected[status == st] { (st) } }
                }
            }
            @if let Some(u) = sq.user.as_deref().filter(|u| !u.is_empty()) { input type="hidden" name="user" value=(u); }
            button #search type="submit" { "Search" }
        }
        p.muted #result-count { (r.total) " devices" @if let Some(u) = sq.user.as_deref().filter(|u| !u.is_empty()) { " of user " strong { (u) } } }
        table #devices {
            thead { tr {
                th { (sort_link(&sq, "hostname", "Host")) }
                th { (sort_link(&sq, "user", "User")) }
                th { (sort_link(&sq, "status", "State")) }
                th { (sort_link(&sq, "last-checkin", "Last check-in")) }
                th { (sort_link(&sq, "lease", "Lease left")) }
                th { (sort_link(&sq, "enrolled", "Enrolled")) }
                th { "Agent" }
            } }
            tbody {
                @for d in &r.devices {
                    tr {
                        td { a href={"/console/devices/" (d.id)} { (d.hostname) } }
                        td { a href={"/console/devices?user=" (q(&d.user))} { (d.user) } }
                        td { (status_badge(d.status)) }
                        td { (ago(d.last_checkin, now)) }
                        td { (lease_cell(d, now)) }
                        td { (time(d.enrolled_at)) }
                        td { @if let Some(rep) = &d.last_report { (rep.agent_version) } @else { span.muted { "–" } } }
                    }
                }
            }
        }
        div.pager {
            @if r.page > 1 { a #prev href=(search_href(&sq, None, None, Some(r.page - 1))) { "← Previous" } }
            span { "Page " (r.page) " of " (pages) }
            @if r.page < pages { a #next href=(search_href(&sq, None, None, Some(r.page + 1))) { "Next →" } }
        }
    };
    page(&s, "/console/devices", "Devices", body)
}

/// `GET /console/devices/{id}`.
pub async fn device(
    State(st): State<ConsoleState>,
    s: Session,
    Path(id): Path<String>,
    Query(done): Query<Done>,
) -> Response {
    let d = match api::parse_device(&id) {
        Ok(id) => match api::device_detail(&st, id).await {
            Ok(d) => d,
            Err(e) => return view::error_page(e),
        },
        Err(e) => return view::error_page(e),
    };
    let now = now();
    let dev = &d.device;
    let rep = dev.last_report.as_ref();
    let body = html! {
        (notice(done.done.as_deref()))
        div.cols {
            dl.kv {
                dt { "Id" } dd.mono #device-id { (dev.id) }
                dt { "Owner" } dd { a href={"/console/users#u-" (q(&dev.user))} { (dev.user) } " · policy " (d.policy) }
                dt { "State" } dd #device-state { (status_badge(dev.status)) }
                dt { "Key fingerprint" } dd.mono { (d.key_id) }
                dt { "Public key" } dd.mono { (d.public_key) }
                dt { "Enrolled" } dd { (time(dev.enrolled_at)) }
                dt { "Last check-in" } dd { (ago(dev.last_checkin, now)) @if let Some(t) = dev.last_checkin { " (" (time(t)) ")" } }
                dt { "Lease" } dd {
                    @if dev.status == DeviceStatus::Active { (lease_cell(dev, now)) " left" } @else { "no new lease (" (dev.status.as_str()) ")" }
                    @if let Some(n) = dev.lease_not_after { " — last lease ends " (time(n)) }
                }
                dt { "Assigned" } dd {
                    @if d.assigned.is_empty() { span.muted { "nothing" } }
                    @for (slot, r) in &d.assigned { div { (slot) ": " (r) } }
                }
                @if let Some(reason) = &dev.kill_reason {
                    dt { "Kill" } dd { "ordered by " (d.kill_actor.as_deref().unwrap_or("?")) " " (ago(d.kill_ordered_at, now)) ": " (reason)
                        @if let Some(k) = d.killed_at { br; "acknowledged " (time(k)) } }
                }
            }
            dl.kv {
                dt { "Last report" } dd { @if let Some(r) = rep { "agent " (r.agent_version) ", clock " (time(r.clock)) } @else { span.muted { "none yet" } } }
                dt { "Image versions held" } dd {
                    @match rep { Some(r) if !r.images.is_empty() => { @for i in &r.images { div { (i) } } }, _ => { span.muted { "none reported" } } }
                }
                dt { "Desktops" } dd {
                    @match rep { Some(r) if !r.vms.is_empty() => { @for v in &r.vms { div { (v.name) ": " (v.state) } } }, _ => { span.muted { "none reported" } } }
                }
                dt { "Last backup (device)" } dd { (ago(rep.and_then(|r| r.last_backup), now)) }
                dt { "Last backup (server)" } dd {
                    @if let Some(b) = d.backups.first() { "#" (b.seq) " from " span.mono { (b.device.get(..12).unwrap_or(&b.device)) } ", " (ago(Some(b.committed_at), now)) ", " (bytes(b.size)) }
                    @else { span.muted { "none" } }
                    " · " a href={"/console/backups?user=" (q(&dev.user))} { "all backups" }
                }
            }
        }
        @if dev.status == DeviceStatus::Active {
            div.cols {
                div {
                    h2 { "Kill this device" }
                    form.stack #kill-form method="post" action={"/console/devices/" (dev.id) "/kill"} {
                        input type="hidden" name="csrf" value=(s.csrf);
                        div { label for="reason" { "Reason (goes into the kill order and the audit log)" }
                            input #reason type="text" name="reason" required size="40" placeholder="reported stolen"; }
                        button.danger #kill type="submit" { "Kill device" }
                    }
                }
                div {
                    h2 { "Replace with another device" }
                    form.stack #replace-form method="post" action={"/console/devices/" (dev.id) "/replace"} {
                        input type="hidden" name="csrf" value=(s.csrf);
                        div { label for="new" { "New device id (enrolled for " (dev.user) ")" }
                            input #new type="text" name="new" required size="34"; }
                        div { label for="replace-reason" { "Reason" }
                            input #replace-reason type="text" name="reason" required size="40" placeholder="laptop broken"; }
                        button.danger type="submit" { "Kill this one and re-provision the new one" }
                    }
                }
            }
        }
        h2 { "Audit trail" }
        (audit_table(&d.audit, false))
    };
    page(&s, "/console/devices", &dev.hostname, body)
}

/// A form that kills.
#[derive(Debug, Deserialize)]
pub struct KillForm {
    csrf: String,
    reason: String,
}

/// `POST /console/devices/{id}/kill`: `POST /v1/admin/devices/{id}/kill`.
pub async fn kill(
    State(st): State<ConsoleState>,
    s: Session,
    Path(id): Path<String>,
    Form(f): Form<KillForm>,
) -> Response {
    if let Err(r) = s.check_csrf(&st, &f.csrf).await {
        return r;
    }
    let req = KillRequest { reason: f.reason };
    match admin::kill_device(
        State(st.app.clone()),
        Admin(s.admin.clone()),
        Path(id),
        body(&req),
    )
    .await
    {
        Ok(Json(d)) => {
            Redirect::to(&format!("/console/devices/{}?done=kill-ordered", d.id)).into_response()
        }
        Err(e) => view::error_page(e),
    }
}

/// A form that replaces.
#[derive(Debug, Deserialize)]
pub struct ReplaceForm {
    csrf: String,
    new: String,
    reason: String,
}

/// `POST /console/devices/{id}/replace`: `POST /v1/admin/devices/{id}/replace`.
pub async fn replace(
    State(st): State<ConsoleState>,
    s: Session,
    Path(id): Path<String>,
    Form(f): Form<ReplaceForm>,
) -> Response {
    if let Err(r) = s.check_csrf(&st, &f.csrf).await {
        return r;
    }
    let req = ReplaceRequest {
        new: f.new.trim().to_string(),
        reason: f.reason,
    };
    let bst = crate::backups::BackupState {
        app: st.app.clone(),
        svc: st.backups.clone(),
    };
    match crate::backups::replace(
        State(bst),
        Admin(s.admin.clone()),
        Path(id.clone()),
        body(&req),
    )
    .await
    {
        Ok(_) => {
            Redirect::to(&format!("/console/devices/{}?done=replaced", q(&id))).into_response()
        }
        Err(e) => view::error_page(e),
    }
}

async fn image_refs(st: &ConsoleState) -> Result<Vec<ImageRef>, ApiError> {
    let images = st.images.clone();
    let list = tokio::task::spawn_blocking(move || images.catalog().list())
        .await
        .map_err(|e| ApiError::Internal(crate::error::InternalError::Storage(e.to_string())))?
        .map_err(|e| ApiError::Internal(crate::error::InternalError::Storage(e.to_string())))?;
    Ok(list
        .into_iter()
        .flat_map(|i| {
            let name = i.name;
            i.versions.into_iter().map(move |version| ImageRef {
                image: name.clone(),
                version,
            })
        })
        .collect())
}

/// `GET /console/users`.
pub async fn users(
    State(st): State<ConsoleState>,
    s: Session,
    Query(done): Query<Done>,
) -> Response {
    let me = Admin(s.admin.clone());
    let users = match admin::list_users(State(st.app.clone()), me.clone()).await {
        Ok(Json(u)) => u,
        Err(e) => return view::error_page(e),
    };
    let policies = match admin::list_policies(State(st.app.clone()), me).await {
        Ok(Json(p)) => p,
        Err(e) => return view::error_page(e),
    };
    let refs = match image_refs(&st).await {
        Ok(r) => r,
        Err(e) => return view::error_page(e),
    };
    let image_select = |name: &str, current: &Option<ImageRef>| {
        html! {
            select name=(name) {
                option value="" { "keep: " (current.as_ref().map(|r| r.to_string()).unwrap_or_else(|| "none".into())) }
                @for r in &refs { option value=(r) { (r) } }
            }
        }
    };
    let body = html! {
        (notice(done.done.as_deref()))
        p.hint { "Create users and enrollment tokens with " code { "tandem admin user create" } " and " code { "tandem admin token create" } "." }
        table #users {
            thead { tr { th { "User" } th { "Policy" } th { "Corporate" } th { "Personal" } th { "Change" } } }
            tbody {
                @for u in &users {
                    tr id={"u-" (u.name)} {
                        td { a href={"/console/devices?user=" (q(&u.name))} { (u.name) } br; span.muted { "since " (time(u.created_at)) } }
                        td { (u.policy) }
                        td { @if let Some(r) = &u.assignments.corporate { (r) } @else { span.muted { "none" } } }
                        td { @if let Some(r) = &u.assignments.personal { (r) } @else { span.muted { "none" } } }
                        td {
                            form.inline method="post" action={"/console/users/" (q(&u.name)) "/assign"} {
                                input type="hidden" name="csrf" value=(s.csrf);
                                select name="policy" {
                                    @for p in &policies { option value=(p.name) selected[p.name == u.policy] { (p.name) } }
                                }
                                (image_select("corporate", &u.assignments.corporate))
                                (image_select("personal", &u.assignments.personal))
                                input type="text" name="reason" placeholder="reason" size="12";
                                button type="submit" { "Save" }
                            }
                        }
                    }
                }
            }
        }
    };
    page(&s, "/console/users", "Users", body)
}

/// A user assignment form.
#[derive(Debug, Deserialize)]
pub struct AssignForm {
    csrf: String,
    #[serde(default)]
    policy: Option<String>,
    #[serde(default)]
    corporate: Option<String>,
    #[serde(default)]
    personal: Option<String>,
    #[serde(default)]
    reason: Option<String>,
}

fn parse_ref(s: &Option<String>) -> Result<Option<ImageRef>, ApiError> {
    let Some(s) = s.as_deref().map(str::trim).filter(|s| !s.is_empty()) else {
        return Ok(None);
    };
    let (image, version) = s
        .rsplit_once(':')
        .ok_or_else(|| ApiError::BadRequest(format!("image {s:?} must be NAME:VERSION")))?;
    let version = version
        .parse()
        .map_err(|_| ApiError::BadRequest(format!("image {s:?} must be NAME:VERSION")))?;
    Ok(Some(ImageRef {
        image: image.to_string(),
        version,
    }))
}

fn reason(r: Option<String>) -> Option<String> {
    r.map(|r| r.trim().to_string()).filter(|r| !r.is_empty())
}

async fn do_assign(st: &ConsoleState, s: &Session, req: Assign) -> Result<(), ApiError> {
    let Json(_user) =
        admin::assign(State(st.app.clone()), Admin(s.admin.clone()), body(&req)).await?;
    Ok(())
}

/// `POST /console/users/{name}/assign`: `POST /v1/admin/assign`.
pub async fn assign_user(
    State(st): State<ConsoleState>,
    s: Session,
    Path(name): Path<String>,
    Form(f): Form<AssignForm>,
) -> Response {
    if let Err(r) = s.check_csrf(&st, &f.csrf).await {
        return r;
    }
    let req = match (parse_ref(&f.corporate), parse_ref(&f.personal)) {
        (Ok(corporate), Ok(personal)) => Assign {
            user: name,
            corporate,
            personal,
            policy: f.policy.filter(|p| !p.is_empty()),
            reason: reason(f.reason),
        },
        (Err(e), _) | (_, Err(e)) => return view::error_page(e),
    };
    match do_assign(&st, &s, req).await {
        Ok(()) => Redirect::to("/console/users?done=assigned").into_response(),
        Err(e) => view::error_page(e),
    }
}

fn policy_fields(p: &Policy) -> Markup {
    html! {
        div { label { "Lease (days)" } input type="number" name="lease_days" min="1" max="365" value=(p.lease_days); }
        div { label { "Check-in every (minutes)" } input type="number" name="checkin_interval_mins" min="1" value=(p.checkin_interval_mins); }
        div { label { "Backup every (minutes)" } input type="number" name="backup_interval_mins" min="1" value=(p.backup_interval_mins); }
        div { label { "Offline scan" } input type="text" name="scan_schedule" value=(p.scan_schedule); }
        div { label { "Backup quota per user (MiB, 0 = none)" } input type="number" name="backup_quota_mb" min="0" value=(p.backup_quota_mb); }
        div { label { "Corporate desktop may use" }
            label { input type="checkbox" name="usb" value="on" checked[p.controls.usb]; " USB devices" }
            label { input type="checkbox" name="clipboard" value="on" checked[p.controls.clipboard]; " the clipboard" }
            label { input type="checkbox" name="network" value="on" checked[p.controls.network]; " the network" }
        }
        div { label { "Reason" } input type="text" name="reason" size="30"; }
    }
}

/// `GET /console/policies`.
pub async fn policies(
    State(st): State<ConsoleState>,
    s: Session,
    Query(done): Query<Done>,
) -> Response {
    let list = match admin::list_policies(State(st.app.clone()), Admin(s.admin.clone())).await {
        Ok(Json(p)) => p,
        Err(e) => return view::error_page(e),
    };
    let body = html! {
        (notice(done.done.as_deref()))
        div.cards {
            @for p in &list {
                form.stack method="post" action={"/console/policies/" (q(&p.name))} {
                    h2 { (p.name) }
                    input type="hidden" name="csrf" value=(s.csrf);
                    (policy_fields(&p.policy))
                    button type="submit" { "Save " (p.name) }
                }
            }
        }
        h2 { "New policy" }
        form.stack method="post" action="/console/policies/+new" {
            input type="hidden" name="csrf" value=(s.csrf);
            div { label { "Name" } input type="text" name="name" required; }
            (policy_fields(&Policy::default()))
            button type="submit" { "Create" }
        }
    };
    page(&s, "/console/policies", "Policies", body)
}

/// A policy form.
#[derive(Debug, Deserialize)]
pub struct PolicyForm {
    csrf: String,
    #[serde(default)]
    name: Option<String>,
    lease_days: String,
    checkin_interval_mins: String,
    backup_interval_mins: String,
    scan_schedule: String,
    #[serde(default)]
    backup_quota_mb: Option<String>,
    #[serde(default)]
    usb: Option<String>,
    #[serde(default)]
    clipboard: Option<String>,
    #[serde(default)]
    network: Option<String>,
    #[serde(default)]
    reason: Option<String>,
}

fn number(what: &str, v: &str) -> Result<u32, ApiError> {
    v.trim()
        .parse()
        .map_err(|_| ApiError::BadRequest(format!("{what} must be a whole number, not {v:?}")))
}

/// `POST /console/policies/{name}`: `PUT /v1/admin/policies/{name}` (`+new` takes the
/// name from the form).
pub async fn set_policy(
    State(st): State<ConsoleState>,
    s: Session,
    Path(name): Path<String>,
    Form(f): Form<PolicyForm>,
) -> Response {
    if let Err(r) = s.check_csrf(&st, &f.csrf).await {
        return r;
    }
    let name = if name == "+new" {
        f.name.clone().unwrap_or_default().trim().to_string()
    } else {
        name
    };
    let policy = (|| {
        Ok::<_, ApiError>(Policy {
            lease_days: number("lease days", &f.lease_days)?,
            checkin_interval_mins: number("check-in interval", &f.checkin_interval_mins)?,
            backup_interval_mins: number("backup interval", &f.backup_interval_mins)?,
            scan_schedule: f.scan_schedule.trim().to_string(),
            controls: DeviceControls {
                usb: f.usb.is_some(),
                clipboard: f.clipboard.is_some(),
                network: f.network.is_some(),
            },
            backup_quota_mb: match f.backup_quota_mb.as_deref().map(str::trim) {
                None | Some("") => tandem_proto::fleet::DEFAULT_BACKUP_QUOTA_MB,
                Some(v) => number("backup quota", v)?.into(),
            },
        })
    })();
    let policy = match policy {
        Ok(p) => p,
        Err(e) => return view::error_page(e),
    };
    let req = SetPolicy {
        policy,
        reason: reason(f.reason),
    };
    match admin::set_policy(
        State(st.app.clone()),
        Admin(s.admin.clone()),
        Path(name),
        body(&req),
    )
    .await
    {
        Ok(_) => Redirect::to("/console/policies?done=policy-saved").into_response(),
        Err(e) => view::error_page(e),
    }
}

/// `GET /console/images`.
pub async fn images(
    State(st): State<ConsoleState>,
    s: Session,
    Query(done): Query<Done>,
) -> Response {
    let images = match api::image_details(&st).await {
        Ok(i) => i,
        Err(e) => return view::error_page(e),
    };
    let users = match admin::list_users(State(st.app.clone()), Admin(s.admin.clone())).await {
        Ok(Json(u)) => u,
        Err(e) => return view::error_page(e),
    };
    let body = html! {
        (notice(done.done.as_deref()))
        @if images.is_empty() { p.muted { "No image is published yet: " code { "tandem image publish" } "." } }
        @for i in &images {
            h2 id={"img-" (i.name)} { (i.name) }
            table {
                thead { tr { th { "Version" } th { "Disk size" } th { "Data chunks" } th { "Stored" } th { "Only in this version" } th { "Corporate for" } th { "Personal for" } th { "Assign" } } }
                tbody {
                    @for v in &i.versions {
                        tr id={"v-" (i.name) "-" (v.version)} {
                            td { strong { (v.version) } }
                            td { (bytes(v.stats.size)) }
                            td { (v.stats.data_chunks) }
                            td { (bytes(v.stats.stored_bytes)) }
                            td { (bytes(v.stats.own_bytes)) }
                            td.corporate-users { @if v.corporate_users.is_empty() { span.muted { "–" } } @else { (v.corporate_users.join(", ")) } }
                            td.personal-users { @if v.personal_users.is_empty() { span.muted { "–" } } @else { (v.personal_users.join(", ")) } }
                            td {
                                form.inline method="post" action={"/console/images/" (q(&i.name)) "/" (v.version) "/assign"} {
                                    input type="hidden" name="csrf" value=(s.csrf);
                                    select name="user" { @for u in &users { option value=(u.name) { (u.name) } } }
                                    select name="slot" { option value="corporate" { "corporate" } option value="personal" { "personal" } }
                                    input type="text" name="reason" placeholder="reason" size="10";
                                    button type="submit" { "Assign" }
                                }
                            }
                        }
                    }
                }
            }
        }
    };
    page(&s, "/console/images", "Images", body)
}

/// A version assignment form.
#[derive(Debug, Deserialize)]
pub struct VersionAssignForm {
    csrf: String,
    user: String,
    slot: String,
    #[serde(default)]
    reason: Option<String>,
}

/// `POST /console/images/{name}/{version}/assign`: `POST /v1/admin/assign`.
pub async fn assign_version(
    State(st): State<ConsoleState>,
    s: Session,
    Path((image, version)): Path<(String, u64)>,
    Form(f): Form<VersionAssignForm>,
) -> Response {
    if let Err(r) = s.check_csrf(&st, &f.csrf).await {
        return r;
    }
    let r = Some(ImageRef { image, version });
    let (corporate, personal) = match f.slot.as_str() {
        "corporate" => (r, None),
        "personal" => (None, r),
        other => {
            return view::error_page(ApiError::BadRequest(format!(
                "slot {other:?} must be corporate or personal"
            )))
        }
    };
    let req = Assign {
        user: f.user,
        corporate,
        personal,
        policy: None,
        reason: reason(f.reason),
    };
    match do_assign(&st, &s, req).await {
        Ok(()) => Redirect::to("/console/images?done=assigned").into_response(),
        Err(e) => view::error_page(e),
    }
}

/// Query of the backups page.
#[derive(Debug, Default, Deserialize)]
pub struct BackupsQuery {
    #[serde(default)]
    user: Option<String>,
}

/// `GET /console/backups`: `GET /v1/admin/backups/{user}`.
pub async fn backups(
    State(st): State<ConsoleState>,
    s: Session,
    Query(bq): Query<BackupsQuery>,
) -> Response {
    let users = match admin::list_users(State(st.app.clone()), Admin(s.admin.clone())).await {
        Ok(Json(u)) => u,
        Err(e) => return view::error_page(e),
    };
    let user = bq
        .user
        .filter(|u| !u.is_empty())
        .or_else(|| users.first().map(|u| u.name.clone()));
    let list = match &user {
        None => Vec::new(),
        Some(u) => {
            let bst = crate::backups::BackupState {
                app: st.app.clone(),
                svc: st.backups.clone(),
            };
            match crate::backups::admin_list(State(bst), Admin(s.admin.clone()), Path(u.clone()))
                .await
            {
                Ok(Json(mut l)) => {
                    l.reverse();
                    l
                }
                Err(e) => return view::error_page(e),
            }
        }
    };
    let now = now();
    let body = html! {
        form.filters method="get" action="/console/backups" {
            div { label for="user" { "User" }
                select #user name="user" {
                    @for u in &users { option value=(u.name) selected[Some(&u.name) == user.as_ref()] { (u.name) } }
                }
            }
            button type="submit" { "Show" }
        }
        @if let Some(u) = &user {
            h2 { "Backups of " (u) }
            @if list.is_empty() { p.muted { "None yet." } } @else {
                table #backups {
                    thead { tr { th { "#" } th { "Committed" } th { "Taken" } th { "From device" } th { "Disk size" } th { "Data chunks" } } }
                    tbody {
                        @for b in &list {
                            tr {
                                td { (b.seq) }
                                td { (time(b.committed_at)) " (" (ago(Some(b.committed_at), now)) ")" }
                                td { (time(b.taken_at)) }
                                td.mono { a href={"/console/devices/" (b.device)} { (b.device.get(..12).unwrap_or(&b.device)) "…" } }
                                td { (bytes(b.size)) }
                                td { (b.data_chunks) }
                            }
                        }
                    }
                }
            }
        }
    };
    page(&s, "/console/backups", "Backups", body)
}

fn audit_table(entries: &[tandem_proto::fleet::AuditEntry], with_device: bool) -> Markup {
    html! {
        @if entries.is_empty() { p.muted { "No entries." } } @else {
            table #audit {
                thead { tr { th { "When" } th { "Actor" } th { "Action" } @if with_device { th { "Device" } } th { "Reason" } th { "Details" } } }
                tbody {
                    @for e in entries {
                        tr {
                            td { (time(e.at)) }
                            td.actor { (e.actor) }
                            td.action { (e.action) }
                            @if with_device { td.mono { @if let Some(d) = e.device { a href={"/console/devices/" (d)} { (d.to_string()[..12]) "…" } } } }
                            td { (e.reason.as_deref().unwrap_or("")) }
                            td.mono { @if e.detail != serde_json::json!({}) { (e.detail) } }
                        }
                    }
                }
            }
        }
    }
}

/// `GET /console/audit`.
pub async fn audit(
    State(st): State<ConsoleState>,
    s: Session,
    Query(aq): Query<AuditQuery>,
) -> Response {
    let entries = match api::audit_search(&st, &aq).await {
        Ok(e) => e,
        Err(e) => return view::error_page(e),
    };
    let limit = aq.limit.unwrap_or(100).clamp(1, 1000);
    let older = (entries.len() as u32 >= limit)
        .then(|| entries.last().map(|e| e.id))
        .flatten();
    let keep = |k: &str, v: &Option<String>| {
        v.as_deref()
            .filter(|v| !v.is_empty())
            .map(|v| format!("&{k}={}", q(v)))
            .unwrap_or_default()
    };
    let body = html! {
        form.filters method="get" action="/console/audit" {
            div { label for="actor" { "Actor starts with" } input #actor type="text" name="actor" placeholder="admin:" value=[aq.actor.as_deref()]; }
            div { label for="action" { "Action starts with" } input #action type="text" name="action" placeholder="device." value=[aq.action.as_deref()]; }
            div { label for="device" { "Device id" } input #device type="text" name="device" size="34" value=[aq.device.as_deref()]; }
            button #filter type="submit" { "Filter" }
        }
        (audit_table(&entries, true))
        @if let Some(before) = older {
            div.pager { a #older href={"/console/audit?before=" (before) (keep("actor", &aq.actor)) (keep("action", &aq.action)) (keep("device", &aq.device))} { "Older entries →" } }
        }
    };
    page(&s, "/console/audit", "Audit log", body)
}
