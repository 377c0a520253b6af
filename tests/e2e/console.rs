//! End-to-end tests: the admin console. The real `tandem server` on 127.0.0.1 with a fleet
//! enrolled through the real CLI; a headless Chromium (Debian's `chromium` and
//! `chromium-driver`) driven over WebDriver signs in, searches, kills, assigns and reads the
//! audit log; plain HTTP requests try to cross the session and CSRF boundaries.
//!
//! Screenshots go to `TANDEM_SCREENSHOT_DIR` when set (the ones in docs/screenshots/ come
//! from here), else to the test's temporary directory.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};
use tandem_proto::auth::{self, RequestSignature};
use tandem_proto::SigningKey;
use tandem_tools::clock::now_secs as now;

use super::util::{free_port, run, tandem, wait_for, wait_for_text, Ran, Reaped};

/// A running server started for console tests (its own environment).
struct Console {
    tmp: tempfile::TempDir,
    _server: Reaped,
    url: String,
    /// The first-start admin credential (`admin`).
    token: String,
}

impl Console {
    /// Starts a server on a fresh data directory; `prepare` runs on that (empty) directory
    /// first, `env` is added to the server's environment.
    fn start(prepare: impl FnOnce(&Path), env: &[(&str, &str)]) -> Console {
        let tmp = tempfile::tempdir().expect("tempdir");
        let data = tmp.path().join("srv");
        prepare(&data);
        let out = tmp.path().join("server.out");
        let mut cmd = tandem();
        cmd.args(["server", "--data"])
            .arg(&data)
            .args(["--listen", "127.0.0.1:0"])
            .envs(env.iter().copied())
            .stdout(std::fs::File::create(&out).expect("stdout file"))
            .stderr(std::fs::File::create(tmp.path().join("server.err")).expect("stderr file"));
        let server = Reaped::spawn(&mut cmd);
        assert!(
            wait_for_text(&out, "listening on", 60),
            "server did not start: {}",
            std::fs::read_to_string(tmp.path().join("server.err")).unwrap_or_default()
        );
        let text = std::fs::read_to_string(&out).expect("server stdout");
        let line = |p: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(p))
                .unwrap_or_else(|| panic!("server printed no {p:?}: {text}"))
                .trim()
                .to_string()
        };
        Console {
            url: line("listening on "),
            token: line("admin token: "),
            _server: server,
            tmp,
        }
    }

    fn data(&self) -> PathBuf {
        self.tmp.path().join("srv")
    }

    fn admin(&self, args: &[&str]) -> Ran {
        run(tandem()
            .args(["admin", "--server", &self.url, "--token", &self.token])
            .args(args))
    }

    fn agent(&self, dir: &Path, args: &[&str]) -> Ran {
        run(tandem().args(["agent", "--dir"]).arg(dir).args(args))
    }

    /// Enrolls device `host` for `user` through the real enrollment path and checks it in
    /// once; returns its directory and id.
    fn enroll(&self, host: &str, user: &str) -> (PathBuf, String) {
        let token = self
            .admin(&["token", "create", "--user", user, "--json"])
            .ok()
            .json()["token"]
            .as_str()
            .expect("token")
            .to_string();
        let dir = self.tmp.path().join(host);
        let info = self
            .agent(
                &dir,
                &[
                    "enroll",
                    "--server",
                    &self.url,
                    "--token",
                    &token,
                    "--hostname",
                    host,
                    "--json",
                ],
            )
            .ok()
            .json();
        self.agent(&dir, &["check-in", "--json"]).ok();
        (dir, info["device"].as_str().expect("device id").to_string())
    }

    /// A named admin credential made from the data directory (as an operator would).
    fn named_admin(&self, name: &str) -> String {
        let r = run(tandem().args(["server", "--data"]).arg(self.data()).args([
            "admin-token",
            "--name",
            name,
        ]))
        .ok();
        r.stdout.trim().to_string()
    }
}

/// Publishes a small made-up disk as `name` version `version` into a server data dir.
fn publish(data: &Path, name: &str, version: u64) {
    std::fs::create_dir_all(data).expect("data dir");
    let disk = data.with_file_name(format!("{name}-{version}.raw"));
    let bytes: Vec<u8> = (0..256 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761).wrapping_add(version as u32) >> 13) as u8)
        .collect();
    std::fs::write(&disk, bytes).expect("write disk");
    run(tandem()
        .args(["image", "publish", name])
        .arg(&disk)
        .arg("--data")
        .arg(data)
        .args(["--version", &version.to_string(), "--force", "--json"]))
    .ok();
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// chromedriver on a free loopback port, killed (with its browser) when dropped.
struct Driver {
    _child: Reaped,
    url: String,
    _profile: tempfile::TempDir,
}

impl Driver {
    fn start() -> Driver {
        let port = free_port();
        let log = tempfile::NamedTempFile::new().expect("log file");
        let child = Reaped::spawn(
            Command::new("chromedriver")
                .arg(format!("--port={port}"))
                .arg("--allowed-ips=127.0.0.1")
                .stdout(log.reopen().expect("log"))
                .stderr(std::process::Stdio::null()),
        );
        let url = format!("http://127.0.0.1:{port}");
        let up = wait_for(30, || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        assert!(
            up,
            "chromedriver did not start (install Debian's chromium and chromium-driver): {}",
            std::fs::read_to_string(log.path()).unwrap_or_default()
        );
        Driver {
            _child: child,
            url,
            _profile: tempfile::tempdir().expect("profile dir"),
        }
    }

    async fn browser(&self) -> Client {
        let profile = self._profile.path().display().to_string();
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            serde_json::json!({
                "binary": "/usr/bin/chromium",
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync",
                    "--window-size=1360,900",
                    format!("--user-data-dir={profile}"),
                ],
            }),
        );
        ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&self.url)
            .await
            .expect("WebDriver session with headless Chromium")
    }
}

/// Where screenshots go.
fn shot_dir(tmp: &Path) -> PathBuf {
    let dir = std::env::var_os("TANDEM_SCREENSHOT_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| tmp.join("screenshots"));
    std::fs::create_dir_all(&dir).expect("screenshot dir");
    dir
}

async fn shot(c: &Client, dir: &Path, name: &str) {
    let png = c.screenshot().await.expect("screenshot");
    assert!(png.starts_with(b"\x89PNG"), "a PNG");
    std::fs::write(dir.join(format!("{name}.png")), png).expect("write screenshot");
}

async fn text(c: &Client, css: &str) -> String {
    c.find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("no {css}: {e}"))
        .text()
        .await
        .expect("text")
}

/// Clicks `css` and waits until the browser left the page (the old document went stale).
async fn click_and_wait(c: &Client, css: &str) {
    let old = c.find(Locator::Css("html")).await.expect("document");
    c.find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("no {css}: {e}"))
        .click()
        .await
        .expect("click");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while old.tag_name().await.is_ok() {
        assert!(
            std::time::Instant::now() < deadline,
            "{css} did not load a page"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn path(c: &Client) -> String {
    c.current_url().await.expect("url").path().to_string()
}

async fn rows(c: &Client, css: &str) -> Vec<String> {
    let mut out = Vec::new();
    for r in c.find_all(Locator::Css(css)).await.expect("rows") {
        out.push(r.text().await.expect("row text"));
    }
    out
}

/// The browser story: sign in, overview, device list, search, kill, assign, audit log,
/// sign out. Saves screenshots of the main pages.
#[test]
fn console_in_a_browser_runs_the_fleet() {
    let f = Console::start(
        |data| {
            publish(data, "corp-gold", 1);
            publish(data, "corp-gold", 2);
        },
        &[],
    );
    let carol = f.named_admin("carol");
    for u in ["alice", "bob"] {
        f.admin(&["user", "create", u]).ok();
    }
    f.admin(&["assign", "--user", "alice", "--corporate", "corp-gold:1"])
        .ok();
    let (_, _alice1) = f.enroll("alice-laptop", "alice");
    let (_, _alice2) = f.enroll("alice-desk", "alice");
    let (bob_dir, bob) = f.enroll("bob-laptop", "bob");
    let bob_key = std::fs::read_to_string(bob_dir.join("identity/device.key")).expect("key");
    let shots = shot_dir(f.tmp.path());
    let driver = Driver::start();

    rt().block_on(async {
        let c = driver.browser().await;
        let base = &f.url;

        // Not signed in: every page sends the browser to the sign-in page.
        c.goto(&format!("{base}/console/devices"))
            .await
            .expect("goto");
        assert_eq!(path(&c).await, "/console/login");
        shot(&c, &shots, "console-sign-in").await;
        // A wrong credential is refused.
        c.find(Locator::Css("#token"))
            .await
            .expect("token field")
            .send_keys("tdm-admin-nope")
            .await
            .expect("type");
        click_and_wait(&c, "#sign-in").await;
        assert!(text(&c, ".error")
            .await
            .contains("Unknown admin credential"));
        // The right one signs in and goes back to the page asked for.
        c.find(Locator::Css("#token"))
            .await
            .expect("token field")
            .send_keys(&carol)
            .await
            .expect("type");
        click_and_wait(&c, "#sign-in").await;
        assert_eq!(path(&c).await, "/console/devices");
        assert_eq!(text(&c, "#admin-name").await, "carol");

        // Device list: the seeded fleet, then a search.
        assert_eq!(text(&c, "#result-count").await, "3 devices");
        let all = rows(&c, "#devices tbody tr").await;
        assert_eq!(all.len(), 3, "{all:?}");
        shot(&c, &shots, "console-devices").await;
        let q = c.find(Locator::Css("#q")).await.expect("search box");
        q.send_keys("bob").await.expect("type");
        click_and_wait(&c, "#search").await;
        let found = rows(&c, "#devices tbody tr").await;
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].contains("bob-laptop"), "{found:?}");

        // Overview counts the fleet by state.
        c.goto(&format!("{base}/console")).await.expect("goto");
        assert_eq!(text(&c, "#count-active").await, "3");
        shot(&c, &shots, "console-overview").await;

        // Kill bob's laptop from its page.
        c.goto(&format!("{base}/console/devices?q=bob"))
            .await
            .expect("goto");
        click_and_wait(&c, "#devices tbody a[href^='/console/devices/']").await;
        assert_eq!(path(&c).await, format!("/console/devices/{bob}"));
        c.find(Locator::Css("#reason"))
            .await
            .expect("reason")
            .send_keys("stolen from a car")
            .await
            .expect("type");
        click_and_wait(&c, "#kill").await;
        c.wait()
            .at_most(Duration::from_secs(20))
            .for_element(Locator::Css(".flash"))
            .await
            .expect("notice");
        assert_eq!(text(&c, "#device-state").await, "kill-pending");
        assert!(
            c.find_all(Locator::Css("#kill"))
                .await
                .expect("find")
                .is_empty(),
            "no second kill"
        );
        let trail = rows(&c, "#audit tbody tr").await;
        assert!(
            trail.iter().any(|r| r.contains("admin:carol")
                && r.contains("device.kill-ordered")
                && r.contains("stolen from a car")),
            "{trail:?}"
        );
        shot(&c, &shots, "console-device").await;

        // Assign version 2 to alice from the images page.
        c.goto(&format!("{base}/console/images"))
            .await
            .expect("goto");
        let row = c
            .find(Locator::Css("#v-corp-gold-2"))
            .await
            .expect("version row");
        row.find(Locator::Css("select[name=user]"))
            .await
            .expect("user")
            .select_by_value("alice")
            .await
            .expect("select");
        row.find(Locator::Css("select[name=slot]"))
            .await
            .expect("slot")
            .select_by_value("corporate")
            .await
            .expect("select");
        row.find(Locator::Css("input[name=reason]"))
            .await
            .expect("reason")
            .send_keys("pilot")
            .await
            .expect("type");
        click_and_wait(&c, "#v-corp-gold-2 button").await;
        c.wait()
            .at_most(Duration::from_secs(20))
            .for_element(Locator::Css(".flash"))
            .await
            .expect("notice");
        assert_eq!(text(&c, "#v-corp-gold-2 .corporate-users").await, "alice");
        assert_eq!(text(&c, "#v-corp-gold-1 .corporate-users").await, "–");
        shot(&c, &shots, "console-images").await;

        // The audit log, filtered to admins: both actions with carol's name.
        c.goto(&format!("{base}/console/audit"))
            .await
            .expect("goto");
        c.find(Locator::Css("#actor"))
            .await
            .expect("actor")
            .send_keys("admin:carol")
            .await
            .expect("type");
        click_and_wait(&c, "#filter").await;
        let log = rows(&c, "#audit tbody tr").await;
        assert!(log.iter().all(|r| r.contains("admin:carol")), "{log:?}");
        for want in ["device.kill-ordered", "user.assigned", "console.signed-in"] {
            assert!(
                log.iter().any(|r| r.contains(want)),
                "{want} missing: {log:?}"
            );
        }
        shot(&c, &shots, "console-audit").await;

        // Sign out: the session is gone.
        click_and_wait(&c, "form.signout button").await;
        assert_eq!(path(&c).await, "/console/login");
        c.goto(&format!("{base}/console/audit"))
            .await
            .expect("goto");
        assert_eq!(path(&c).await, "/console/login");
        c.close().await.expect("close browser");
    });

    // The API the CLI uses agrees: alice runs v2, the kill is audited under carol's name.
    let users = f.admin(&["user", "list", "--json"]).ok().json();
    let alice = users
        .as_array()
        .expect("users")
        .iter()
        .find(|u| u["name"] == "alice")
        .expect("alice");
    assert_eq!(alice["assignments"]["corporate"]["version"], 2);
    let audit = f.admin(&["audit", "--device", &bob, "--json"]).ok().json();
    assert!(
        audit
            .as_array()
            .expect("entries")
            .iter()
            .any(|e| e["action"] == "device.kill-ordered"
                && e["actor"] == "admin:carol"
                && e["reason"] == "stolen from a car"),
        "{audit}"
    );
    // The device executes the kill at its next contact, and is refused from then on.
    let r = f.agent(&bob_dir, &["check-in", "--json"]).ok().json();
    assert_eq!(r["killed"], true);
    let key = SigningKey::from_base64(&bob_key).expect("key");
    let body = serde_json::to_vec(&tandem_proto::fleet::CheckinRequest {
        agent_version: "test".into(),
        clock: now(),
        ..Default::default()
    })
    .expect("json");
    let sig = RequestSignature::sign(&key, &bob, "POST", "/v1/checkin", now(), &body);
    let (status, answer) = rt().block_on(async {
        let r = reqwest::Client::new()
            .post(format!("{}/v1/checkin", f.url))
            .header(auth::HEADER_DEVICE, sig.device)
            .header(auth::HEADER_TIME, sig.time.to_string())
            .header(auth::HEADER_NONCE, sig.nonce)
            .header(auth::HEADER_SIGNATURE, sig.signature)
            .body(body)
            .send()
            .await
            .expect("server answers");
        (r.status().as_u16(), r.text().await.expect("body"))
    });
    assert_eq!(status, 403, "{answer}");
    assert!(answer.contains("device_killed"), "{answer}");
}

/// A plain HTTP client that never follows redirects.
fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client")
}

/// Every `name=value` of the response's `Set-Cookie` headers, with their attributes.
fn set_cookies(r: &reqwest::Response) -> Vec<String> {
    r.headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().expect("ascii").to_string())
        .collect()
}

fn cookie_value(set: &[String], name: &str) -> Option<String> {
    set.iter().find_map(|c| {
        c.split(';')
            .next()
            .and_then(|kv| kv.trim().strip_prefix(&format!("{name}=")))
            .filter(|v| !v.is_empty())
            .map(str::to_string)
    })
}

/// The value of `<input name="csrf" value="…">` in a page.
fn csrf_in(html: &str) -> String {
    let at = html
        .find("name=\"csrf\" value=\"")
        .expect("page has a CSRF field");
    let rest = &html[at + "name=\"csrf\" value=\"".len()..];
    rest[..rest.find('"').expect("closing quote")].to_string()
}

/// Signs in over plain HTTP; returns the session cookie value and the Set-Cookie headers.
async fn sign_in(base: &str, token: &str, extra: &[(&str, &str)]) -> (String, Vec<String>) {
    let c = http();
    let page = c
        .get(format!("{base}/console/login"))
        .send()
        .await
        .expect("login page");
    let login_cookie =
        cookie_value(&set_cookies(&page), "tandem_console_login").expect("login cookie");
    let csrf = csrf_in(&page.text().await.expect("html"));
    let mut req = c
        .post(format!("{base}/console/login"))
        .header("cookie", format!("tandem_console_login={login_cookie}"))
        .form(&[("token", token), ("csrf", &csrf), ("next", "/console")]);
    for (k, v) in extra {
        req = req.header(*k, *v);
    }
    let r = req.send().await.expect("sign in");
    assert_eq!(r.status().as_u16(), 303, "signed in and redirected");
    let set = set_cookies(&r);
    (
        cookie_value(&set, "tandem_console").expect("session cookie"),
        set,
    )
}

const PAGES: &[&str] = &[
    "/console",
    "/console/devices",
    "/console/devices?q=x&sort=hostname&order=desc&page=2",
    "/console/users",
    "/console/policies",
    "/console/images",
    "/console/backups",
    "/console/audit",
];

/// GETs `path` with `cookie`; returns the status and the Location header.
async fn get(base: &str, path: &str, cookie: Option<&str>) -> (u16, String) {
    let mut req = http().get(format!("{base}{path}"));
    if let Some(c) = cookie {
        req = req.header("cookie", format!("tandem_console={c}"));
    }
    let r = req.send().await.expect("answer");
    let loc = r
        .headers()
        .get("location")
        .map(|v| v.to_str().expect("ascii").to_string())
        .unwrap_or_default();
    (r.status().as_u16(), loc)
}

async fn assert_refused(base: &str, path: &str, cookie: Option<&str>, what: &str) {
    let (status, loc) = get(base, path, cookie).await;
    assert_eq!(status, 303, "{what}: {path} answered {status}");
    assert!(
        loc.starts_with("/console/login"),
        "{what}: {path} sent to {loc}"
    );
}

#[test]
fn console_pages_refuse_missing_forged_and_expired_sessions() {
    let f = Console::start(|_| {}, &[("TANDEM_CONSOLE_SESSION_SECS", "5")]);
    f.admin(&["user", "create", "alice"]).ok();
    let (_, dev) = f.enroll("alice-laptop", "alice");
    let device_page = format!("/console/devices/{dev}");
    rt().block_on(async {
        let base = &f.url;
        let forged = "ab".repeat(32);
        let mut pages: Vec<&str> = PAGES.to_vec();
        pages.push(&device_page);
        for p in &pages {
            assert_refused(base, p, None, "no cookie").await;
            assert_refused(base, p, Some(&forged), "forged cookie").await;
            assert_refused(
                base,
                p,
                Some("'; DROP TABLE console_sessions; --"),
                "junk cookie",
            )
            .await;
        }
        // Actions without a session change nothing.
        let r = http()
            .post(format!("{base}{device_page}/kill"))
            .form(&[("csrf", "x"), ("reason", "no session")])
            .send()
            .await
            .expect("answer");
        assert_eq!(r.status().as_u16(), 303);
        // After signing in the browser lands on the console, not on the form's target.
        assert_eq!(
            r.headers()
                .get("location")
                .map(|v| v.to_str().expect("ascii")),
            Some("/console/login?next=/console")
        );
        // A real session opens every page, until it expires.
        let (session, _) = sign_in(base, &f.token, &[]).await;
        for p in &pages {
            let (status, _) = get(base, p, Some(&session)).await;
            assert_eq!(status, 200, "{p} with a valid session");
        }
        tokio::time::sleep(Duration::from_secs(6)).await;
        for p in &pages {
            assert_refused(base, p, Some(&session), "expired session").await;
        }
    });
    let d = f.admin(&["device", "show", &dev, "--json"]).ok().json();
    assert_eq!(d["status"], "active", "nothing was killed");
}

#[test]
fn console_posts_without_the_csrf_token_are_refused() {
    let f = Console::start(|_| {}, &[]);
    f.admin(&["user", "create", "alice"]).ok();
    let (_, dev) = f.enroll("alice-laptop", "alice");
    rt().block_on(async {
        let base = &f.url;
        let (session, _) = sign_in(base, &f.token, &[]).await;
        let kill = format!("{base}/console/devices/{dev}/kill");
        let cookie = format!("tandem_console={session}");
        // Missing token, wrong token, another session's token.
        let (other, _) = sign_in(base, &f.token, &[]).await;
        let page = http()
            .get(format!("{base}/console/devices/{dev}"))
            .header("cookie", format!("tandem_console={other}"))
            .send()
            .await
            .expect("page");
        let other_csrf = csrf_in(&page.text().await.expect("html"));
        let zeros = "0".repeat(64);
        for form in [
            vec![("reason", "no token")],
            vec![("csrf", zeros.as_str()), ("reason", "wrong token")],
            vec![
                ("csrf", other_csrf.as_str()),
                ("reason", "other session's token"),
            ],
        ] {
            let r = http()
                .post(&kill)
                .header("cookie", &cookie)
                .form(&form)
                .send()
                .await
                .expect("answer");
            let status = r.status().as_u16();
            assert!(status == 403 || status == 422, "{form:?} answered {status}");
        }
        // Sign-out and sign-in need their tokens too.
        let r = http()
            .post(format!("{base}/console/logout"))
            .header("cookie", &cookie)
            .form(&[("csrf", "nope")])
            .send()
            .await
            .expect("answer");
        assert_eq!(r.status().as_u16(), 403);
        let (status, _) = get(base, "/console", Some(&session)).await;
        assert_eq!(status, 200, "the session survived a forged sign-out");
        let r = http()
            .post(format!("{base}/console/login"))
            .form(&[("token", f.token.as_str()), ("csrf", "forged")])
            .send()
            .await
            .expect("answer");
        assert_eq!(r.status().as_u16(), 403, "sign-in without its form cookie");
        assert!(cookie_value(&set_cookies(&r), "tandem_console").is_none());
        // With the token the same form works.
        let page = http()
            .get(format!("{base}/console/devices/{dev}"))
            .header("cookie", &cookie)
            .send()
            .await
            .expect("page");
        let csrf = csrf_in(&page.text().await.expect("html"));
        let r = http()
            .post(&kill)
            .header("cookie", &cookie)
            .form(&[("csrf", csrf.as_str()), ("reason", "with token")])
            .send()
            .await
            .expect("answer");
        assert_eq!(r.status().as_u16(), 303);
    });
    let audit = f.admin(&["audit", "--json"]).ok().json();
    let entries = audit.as_array().expect("entries");
    let refused = entries
        .iter()
        .filter(|e| e["action"] == "console.csrf-refused")
        .count();
    // The kill form without any token is refused by the form parser before the check.
    assert_eq!(
        refused, 3,
        "wrong and foreign kill tokens, forged sign-out: {audit}"
    );
    let kills: Vec<_> = entries
        .iter()
        .filter(|e| e["action"] == "device.kill-ordered")
        .collect();
    assert_eq!(kills.len(), 1, "{audit}");
    assert_eq!(kills[0]["reason"], "with token");
    assert_eq!(kills[0]["actor"], "admin:admin");
}

#[test]
fn console_session_from_one_server_does_not_open_another() {
    let a = Console::start(|_| {}, &[]);
    let b = Console::start(|_| {}, &[]);
    rt().block_on(async {
        let (session, _) = sign_in(&a.url, &a.token, &[]).await;
        assert_eq!(get(&a.url, "/console", Some(&session)).await.0, 200);
        for p in PAGES {
            assert_refused(&b.url, p, Some(&session), "cookie from another server").await;
        }
    });
}

#[test]
fn console_session_cookie_flags_and_page_headers() {
    let plain = Console::start(|_| {}, &[]);
    let forced = Console::start(|_| {}, &[("TANDEM_CONSOLE_SECURE_COOKIE", "always")]);
    rt().block_on(async {
        let has = |set: &[String], name: &str, flag: &str| {
            set.iter()
                .find(|c| c.starts_with(&format!("{name}=")))
                .unwrap_or_else(|| panic!("no {name} cookie in {set:?}"))
                .split(';')
                .any(|a| a.trim().eq_ignore_ascii_case(flag))
        };
        let (session, set) = sign_in(&plain.url, &plain.token, &[]).await;
        assert_eq!(session.len(), 64, "32 random bytes");
        for flag in ["HttpOnly", "SameSite=Strict", "Path=/console"] {
            assert!(has(&set, "tandem_console", flag), "{flag} missing: {set:?}");
        }
        assert!(
            !has(&set, "tandem_console", "Secure"),
            "plain HTTP: {set:?}"
        );
        assert!(
            set.iter()
                .any(|c| c.starts_with("tandem_console=") && c.contains("Max-Age=28800")),
            "{set:?}"
        );
        // Behind a TLS proxy (X-Forwarded-Proto) and when forced, the cookie is Secure.
        let (_, set) = sign_in(&plain.url, &plain.token, &[("x-forwarded-proto", "https")]).await;
        assert!(has(&set, "tandem_console", "Secure"), "{set:?}");
        let (_, set) = sign_in(&forced.url, &forced.token, &[]).await;
        assert!(has(&set, "tandem_console", "Secure"), "{set:?}");
        // Pages carry no-store, a script-free CSP and no framing.
        let r = http()
            .get(format!("{}/console", plain.url))
            .header("cookie", format!("tandem_console={session}"))
            .send()
            .await
            .expect("page");
        let h = |k: &str| {
            r.headers()
                .get(k)
                .map(|v| v.to_str().expect("ascii").to_string())
                .unwrap_or_default()
        };
        assert_eq!(h("cache-control"), "no-store");
        assert!(h("content-security-policy").contains("default-src 'none'"));
        assert!(
            !h("content-security-policy").contains("script-src"),
            "no script allowed"
        );
        assert_eq!(h("x-frame-options"), "DENY");
        let html = r.text().await.expect("html");
        assert!(!html.contains("<script"), "the console sends no JavaScript");
    });
}

#[test]
fn console_json_routes_are_admin_api_routes() {
    let f = Console::start(|_| {}, &[]);
    f.admin(&["user", "create", "alice"]).ok();
    for i in 0..3 {
        f.enroll(&format!("lap-{i}"), "alice");
    }
    rt().block_on(async {
        let url = format!(
            "{}/v1/admin/devices/search?q=LAP-&sort=hostname&order=desc&per_page=2",
            f.url
        );
        let r = http().get(&url).send().await.expect("answer");
        assert_eq!(r.status().as_u16(), 401, "needs the admin bearer token");
        let r = http()
            .get(&url)
            .bearer_auth(&f.token)
            .send()
            .await
            .expect("answer");
        assert_eq!(r.status().as_u16(), 200);
        let v: serde_json::Value = r.json().await.expect("json");
        assert_eq!(v["total"], 3);
        let hosts: Vec<_> = v["devices"]
            .as_array()
            .expect("devices")
            .iter()
            .map(|d| d["hostname"].clone())
            .collect();
        assert_eq!(hosts, ["lap-2", "lap-1"]);
        let r = http()
            .get(format!(
                "{}/v1/admin/devices/search?sort=secret_column",
                f.url
            ))
            .bearer_auth(&f.token)
            .send()
            .await
            .expect("answer");
        assert_eq!(
            r.status().as_u16(),
            400,
            "sort columns come from a closed list"
        );
        let o: serde_json::Value = http()
            .get(format!("{}/v1/admin/overview", f.url))
            .bearer_auth(&f.token)
            .send()
            .await
            .expect("answer")
            .json()
            .await
            .expect("json");
        assert_eq!(o["by_state"], serde_json::json!([["active", 3]]));
    });
}
