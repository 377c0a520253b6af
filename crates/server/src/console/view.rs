//! The console's look: one layout, small formatting helpers, the stylesheet (compiled into
//! the binary) and the headers every page is sent with. Templates are `maud` macros,
//! checked and compiled with the server; every interpolated value is HTML-escaped.

use std::time::Instant;

use axum::extract::Request;
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Response};
use maud::{html, Markup, DOCTYPE};

use super::session::Session;
use crate::error::ApiError;

const STYLE: &str = include_str!("style.css");

/// `GET /console/style.css`.
pub async fn stylesheet() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=3600"),
        ],
        STYLE,
    )
        .into_response()
}

/// Adds the security headers to every console response, and the time the server spent
/// on it (`Server-Timing: app;dur=<ms>`: database reads plus rendering) for benchmarks.
pub async fn page_headers(req: Request, next: Next) -> Response {
    let started = Instant::now();
    let mut r = next.run(req).await;
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    let h = r.headers_mut();
    let set = |h: &mut axum::http::HeaderMap, k: &'static str, v: &'static str| {
        if !h.contains_key(k) {
            h.insert(k, HeaderValue::from_static(v));
        }
    };
    set(h, "cache-control", "no-store");
    set(
        h,
        "content-security-policy",
        "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; \
         frame-ancestors 'none'; base-uri 'none'",
    );
    set(h, "x-frame-options", "DENY");
    set(h, "x-content-type-options", "nosniff");
    set(h, "referrer-policy", "same-origin");
    if let Ok(v) = HeaderValue::from_str(&format!("app;dur={ms:.3}")) {
        h.insert("server-timing", v);
    }
    r
}

/// Navigation entries: (path, label).
const NAV: &[(&str, &str)] = &[
    ("/console", "Overview"),
    ("/console/devices", "Devices"),
    ("/console/users", "Users"),
    ("/console/policies", "Policies"),
    ("/console/images", "Images"),
    ("/console/backups", "Backups"),
    ("/console/audit", "Audit log"),
];

/// A full page for a signed-in admin.
pub fn page(s: &Session, active: &str, title: &str, body: Markup) -> Response {
    let m = html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · Tandem console" }
                link rel="stylesheet" href="/console/style.css";
            }
            body {
                header.top {
                    a.brand href="/console" { "Tandem" }
                    nav {
                        @for (path, label) in NAV {
                            a href=(path) class=[(*path == active).then_some("on")] { (label) }
                        }
                    }
                    form.signout method="post" action="/console/logout" {
                        span.who { "Signed in as " strong #admin-name { (s.admin) } }
                        input type="hidden" name="csrf" value=(s.csrf);
                        button type="submit" { "Sign out" }
                    }
                }
                main {
                    h1 { (title) }
                    (body)
                }
            }
        }
    };
    Html(m.into_string()).into_response()
}

/// The sign-in page.
pub fn login_page(csrf: &str, next: &str, error: Option<&str>) -> Html<String> {
    let m = html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { "Sign in · Tandem console" }
                link rel="stylesheet" href="/console/style.css";
            }
            body.login {
                main {
                    h1 { "Tandem console" }
                    @if let Some(e) = error { p.error role="alert" { (e) } }
                    form method="post" action="/console/login" {
                        label for="token" { "Admin credential" }
                        input #token type="password" name="token" autocomplete="current-password"
                            required placeholder="tdm-admin-…";
                        input type="hidden" name="csrf" value=(csrf);
                        input type="hidden" name="next" value=(next);
                        button #sign-in type="submit" { "Sign in" }
                    }
                    p.hint {
                        "The token printed at the server's first start, or one made with "
                        code { "tandem server admin-token --name NAME" } "."
                    }
                }
            }
        }
    };
    Html(m.into_string())
}

/// A page with one message (errors, refusals) that needs no session.
pub fn message_page(status: StatusCode, title: &str, text: &str) -> Response {
    let m = html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                title { (title) " · Tandem console" }
                link rel="stylesheet" href="/console/style.css";
            }
            body.login {
                main {
                    h1 { (title) }
                    p.error role="alert" { (text) }
                    p { a href="/console" { "Back to the console" } }
                }
            }
        }
    };
    (status, Html(m.into_string())).into_response()
}

/// An API error as a page: a 4xx shows its message (what to fix), a 5xx says little and
/// is logged with a request id.
pub fn error_page(e: ApiError) -> Response {
    let status = match &e {
        ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
        ApiError::Unauthorized { .. } => StatusCode::UNAUTHORIZED,
        ApiError::Forbidden { .. } => StatusCode::FORBIDDEN,
        ApiError::NotFound(_) => StatusCode::NOT_FOUND,
        ApiError::Conflict(_) => StatusCode::CONFLICT,
        ApiError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
        ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    if let ApiError::Internal(inner) = &e {
        let request_id = hex::encode(rand::random::<[u8; 8]>());
        tracing::error!(request_id, error = %inner, "console request failed");
        return message_page(
            status,
            "Something went wrong",
            &format!("Internal error (request {request_id}); the server log has the details."),
        );
    }
    message_page(status, "Not done", &e.to_string())
}

/// Unix seconds as `YYYY-MM-DD HH:MM:SS UTC`.
pub fn time(t: u64) -> String {
    let st = std::time::UNIX_EPOCH + std::time::Duration::from_secs(t);
    humantime::format_rfc3339_seconds(st)
        .to_string()
        .replace('T', " ")
        .replace('Z', " UTC")
}

/// A duration in the largest sensible unit: `3 d 4 h`, `5 h 2 min`, `40 s`.
pub fn span(secs: u64) -> String {
    let (d, h, m) = (secs / 86_400, secs % 86_400 / 3600, secs % 3600 / 60);
    if d > 0 {
        format!("{d} d {h} h")
    } else if h > 0 {
        format!("{h} h {m} min")
    } else if m > 0 {
        format!("{m} min")
    } else {
        format!("{secs} s")
    }
}

/// `t` relative to `now`: `3 h ago`, `in 2 d 1 h`, or `never`.
pub fn ago(t: Option<u64>, now: u64) -> String {
    match t {
        None => "never".into(),
        Some(t) if t <= now => format!("{} ago", span(now - t)),
        Some(t) => format!("in {}", span(t - now)),
    }
}

/// Bytes in binary units.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Percent-encodes a query value.
pub fn q(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        assert_eq!(time(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(span(90_000), "1 d 1 h");
        assert_eq!(ago(Some(40), 100), "1 min ago");
        assert_eq!(ago(Some(100 + 7200), 100), "in 2 h 0 min");
        assert_eq!(ago(None, 1), "never");
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(3 << 20), "3.0 MiB");
        assert_eq!(q("a b&c=d"), "a%20b%26c%3Dd");
    }
}
