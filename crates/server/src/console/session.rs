//! Console sessions: sign-in with an admin credential, the session cookie, CSRF tokens,
//! sign-out. The policy is in the module doc of `console`.

use axum::extract::{FromRequestParts, Query, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::Form;
use tandem_db::SessionRow;

use super::view;
use super::ConsoleState;
use crate::auth::hash_secret;
use crate::{audit, now};

/// The session cookie's name.
pub const COOKIE: &str = "tandem_console";
/// The sign-in form's one-time cookie.
pub const LOGIN_COOKIE: &str = "tandem_console_login";
/// Lifetime of a sign-in form.
const LOGIN_FORM_SECS: u64 = 600;

/// When the console's cookies carry the `Secure` attribute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CookieSecurity {
    /// When the request came over TLS: `X-Forwarded-Proto: https` from the TLS-terminating
    /// proxy in front of the server (the server itself speaks plain HTTP). The header can
    /// only make a cookie stricter, so trusting it is safe.
    Auto,
    /// Always (a TLS proxy that does not send the header).
    Always,
    /// Never (plain HTTP on a trusted network only).
    Never,
}

impl CookieSecurity {
    fn secure(self, headers: &HeaderMap) -> bool {
        match self {
            CookieSecurity::Always => true,
            CookieSecurity::Never => false,
            CookieSecurity::Auto => headers
                .get("x-forwarded-proto")
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.trim().eq_ignore_ascii_case("https")),
        }
    }
}

/// The value of cookie `name` in the request's `Cookie` headers.
pub(super) fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim())
}

fn set_cookie(name: &str, value: &str, max_age: u64, secure: bool) -> HeaderValue {
    let secure = if secure { "; Secure" } else { "" };
    HeaderValue::from_str(&format!(
        "{name}={value}; Path=/console; Max-Age={max_age}; HttpOnly; SameSite=Strict{secure}"
    ))
    .expect("cookie values are hex and fixed text")
}

/// Constant-time equality of two secrets.
pub(super) fn same_secret(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A signed-in admin, from a valid session cookie. Pages that take it redirect to the
/// sign-in page otherwise.
#[derive(Debug, Clone)]
pub struct Session {
    /// The admin credential's name.
    pub admin: String,
    /// The CSRF token every form of this session carries.
    pub csrf: String,
    id_hash: String,
}

impl Session {
    /// The audit log's actor text.
    pub fn actor(&self) -> String {
        format!("admin:{}", self.admin)
    }

    /// Refuses a form whose CSRF token is not this session's (and audits the attempt).
    pub async fn check_csrf(&self, st: &ConsoleState, given: &str) -> Result<(), Response> {
        if same_secret(given, &self.csrf) {
            return Ok(());
        }
        audit(
            &st.app,
            &self.actor(),
            "console.csrf-refused",
            None,
            None,
            serde_json::json!({}),
        )
        .await;
        Err(view::message_page(
            StatusCode::FORBIDDEN,
            "Form refused",
            "This form did not carry this session's security token, so nothing was changed. \
             Reload the page and submit it again.",
        ))
    }
}

/// Why a page refused to render: not signed in.
#[derive(Debug)]
pub struct SignIn(String);

impl IntoResponse for SignIn {
    fn into_response(self) -> Response {
        let mut r =
            Redirect::to(&format!("/console/login?next={}", encode(&self.0))).into_response();
        r.headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        r
    }
}

impl FromRequestParts<ConsoleState> for Session {
    type Rejection = SignIn;
    async fn from_request_parts(parts: &mut Parts, st: &ConsoleState) -> Result<Self, SignIn> {
        // After sign-in the browser GETs `next`: a form's target would not answer a GET.
        let next = if parts.method == axum::http::Method::GET {
            safe_next(parts.uri.path())
        } else {
            "/console"
        };
        let back = SignIn(next.to_string());
        let Some(value) = cookie(&parts.headers, COOKIE) else {
            return Err(back);
        };
        // Only well-formed values reach the database.
        if value.len() != 64 || !value.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(back);
        }
        let id_hash = hash_secret(value);
        match st.app.db.session(&id_hash, now()).await {
            Ok(Some(row)) => Ok(Session {
                admin: row.admin,
                csrf: row.csrf,
                id_hash,
            }),
            Ok(None) => Err(back),
            Err(e) => {
                tracing::error!(error = %e, "console session lookup failed");
                Err(back)
            }
        }
    }
}

/// Percent-encodes a path for a query value.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'/' | b'-' | b'_' | b'.' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Where to go after sign-in: a console path, never another site.
fn safe_next(next: &str) -> &str {
    let ok = next.starts_with("/console")
        && !next.contains("//")
        && !next.contains('\\')
        && next
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/-_.".contains(&b));
    if ok {
        next
    } else {
        "/console"
    }
}

/// Query of the sign-in page.
#[derive(Debug, serde::Deserialize)]
pub struct LoginQuery {
    #[serde(default)]
    next: Option<String>,
}

/// `GET /console/login`.
pub async fn login_page(
    State(st): State<ConsoleState>,
    headers: HeaderMap,
    Query(q): Query<LoginQuery>,
) -> Response {
    login_form(
        &st,
        &headers,
        q.next.as_deref().unwrap_or("/console"),
        None,
        StatusCode::OK,
    )
}

fn login_form(
    st: &ConsoleState,
    headers: &HeaderMap,
    next: &str,
    error: Option<&str>,
    status: StatusCode,
) -> Response {
    let token = hex_secret();
    let mut r = (status, view::login_page(&token, safe_next(next), error)).into_response();
    r.headers_mut().append(
        header::SET_COOKIE,
        set_cookie(
            LOGIN_COOKIE,
            &token,
            LOGIN_FORM_SECS,
            st.config.secure.secure(headers),
        ),
    );
    r
}

fn hex_secret() -> String {
    hex::encode(rand::random::<[u8; 32]>())
}

/// The sign-in form.
#[derive(Debug, serde::Deserialize)]
pub struct LoginForm {
    token: String,
    csrf: String,
    #[serde(default)]
    next: Option<String>,
}

/// `POST /console/login`.
pub async fn login(
    State(st): State<ConsoleState>,
    peer: Option<axum::Extension<axum::extract::ConnectInfo<std::net::SocketAddr>>>,
    headers: HeaderMap,
    Form(f): Form<LoginForm>,
) -> Response {
    let next = f.next.as_deref().unwrap_or("/console").to_string();
    let form_ok = cookie(&headers, LOGIN_COOKIE).is_some_and(|c| same_secret(c, &f.csrf));
    if !form_ok {
        return login_form(
            &st,
            &headers,
            &next,
            Some("The sign-in form expired or was not sent by this page; try again."),
            StatusCode::FORBIDDEN,
        );
    }
    let admin = match st.app.db.admin_by_hash(&hash_secret(f.token.trim())).await {
        Ok(a) => a,
        Err(e) => {
            tracing::error!(error = %e, "console sign-in lookup failed");
            return view::message_page(
                StatusCode::INTERNAL_SERVER_ERROR,
                "Sign-in failed",
                "The server could not check the credential; the server log has the details.",
            );
        }
    };
    let Some(admin) = admin else {
        // Anyone can provoke this: rate-limited per network source.
        let source = peer
            .map(|p| p.0 .0.ip().to_string())
            .unwrap_or_else(|| "unknown".into());
        crate::auth::audit_limited(
            &st.app,
            &source,
            "server",
            "console.sign-in-refused",
            None,
            serde_json::json!({"why": "unknown admin credential", "source": source}),
        )
        .await;
        return login_form(
            &st,
            &headers,
            &next,
            Some("Unknown admin credential. Use a token from `tandem server admin-token`."),
            StatusCode::UNAUTHORIZED,
        );
    };
    let id = hex_secret();
    let now = now();
    let row = SessionRow {
        admin: admin.clone(),
        csrf: hex_secret(),
        created_at: now,
        expires_at: now + st.config.session_secs,
    };
    if let Err(e) = st.app.db.create_session(&hash_secret(&id), &row).await {
        tracing::error!(error = %e, "console session could not be stored");
        return view::message_page(
            StatusCode::INTERNAL_SERVER_ERROR,
            "Sign-in failed",
            "The server could not store the session; the server log has the details.",
        );
    }
    // Expired sessions of everyone are dropped at each sign-in.
    if let Err(e) = st.app.db.prune_sessions(now).await {
        tracing::warn!(error = %e, "could not prune expired console sessions");
    }
    audit(
        &st.app,
        &format!("admin:{admin}"),
        "console.signed-in",
        None,
        None,
        serde_json::json!({"expires_at": row.expires_at}),
    )
    .await;
    let secure = st.config.secure.secure(&headers);
    let mut r = Redirect::to(safe_next(&next)).into_response();
    let h = r.headers_mut();
    h.append(
        header::SET_COOKIE,
        set_cookie(COOKIE, &id, st.config.session_secs, secure),
    );
    h.append(header::SET_COOKIE, set_cookie(LOGIN_COOKIE, "", 0, secure));
    r
}

/// A form that carries only the CSRF token.
#[derive(Debug, serde::Deserialize)]
pub struct CsrfForm {
    /// The session's token.
    pub csrf: String,
}

/// `POST /console/logout`.
pub async fn logout(
    State(st): State<ConsoleState>,
    s: Session,
    headers: HeaderMap,
    Form(f): Form<CsrfForm>,
) -> Response {
    if let Err(r) = s.check_csrf(&st, &f.csrf).await {
        return r;
    }
    if let Err(e) = st.app.db.delete_session(&s.id_hash).await {
        tracing::error!(error = %e, "console session could not be deleted");
        return view::message_page(
            StatusCode::INTERNAL_SERVER_ERROR,
            "Sign-out failed",
            "The server could not end the session; the server log has the details.",
        );
    }
    audit(
        &st.app,
        &s.actor(),
        "console.signed-out",
        None,
        None,
        serde_json::json!({}),
    )
    .await;
    let mut r = Redirect::to("/console/login").into_response();
    r.headers_mut().append(
        header::SET_COOKIE,
        set_cookie(COOKIE, "", 0, st.config.secure.secure(&headers)),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_stays_on_the_console() {
        assert_eq!(safe_next("/console/devices"), "/console/devices");
        assert_eq!(safe_next("//evil.example/console"), "/console");
        assert_eq!(safe_next("https://evil.example"), "/console");
        assert_eq!(safe_next("/console//evil"), "/console");
        assert_eq!(safe_next("/console/x?y=<script>"), "/console");
    }

    #[test]
    fn cookies_are_found_among_others() {
        let mut h = HeaderMap::new();
        h.append(
            header::COOKIE,
            HeaderValue::from_static("a=1; tandem_console=abc"),
        );
        h.append(header::COOKIE, HeaderValue::from_static("b=2"));
        assert_eq!(cookie(&h, COOKIE), Some("abc"));
        assert_eq!(cookie(&h, "b"), Some("2"));
        assert_eq!(cookie(&h, "tandem"), None);
    }

    #[test]
    fn secrets_compare_whole() {
        assert!(same_secret("abc", "abc"));
        assert!(!same_secret("abc", "abd"));
        assert!(!same_secret("abc", "ab"));
        assert!(!same_secret("", "a"));
    }

    #[test]
    fn cookie_flags() {
        let v = set_cookie(COOKIE, "ff", 60, true);
        let v = v.to_str().expect("ascii");
        for flag in [
            "HttpOnly",
            "SameSite=Strict",
            "Secure",
            "Path=/console",
            "Max-Age=60",
        ] {
            assert!(v.contains(flag), "{v} lacks {flag}");
        }
        assert!(!set_cookie(COOKIE, "ff", 60, false)
            .to_str()
            .expect("ascii")
            .contains("Secure"));
    }
}
