//! End-to-end tests: fleet. The real `tandem server` and `tandem agent` binaries on
//! loopback, each story on SQLite and on PostgreSQL (a fresh database per test on the
//! server named by TANDEM_TEST_POSTGRES_URL; TANDEM_REQUIRE_POSTGRES=1 makes its absence
//! a failure). Protocol attacks are crafted with the same signing code the agent uses.

use std::path::{Path, PathBuf};

use tandem_proto::auth::{self, RequestSignature};
use tandem_proto::fleet::{self, KillAck, KillAckRequest};
use tandem_proto::SigningKey;
use tandem_tools::clock::now_secs as now;

use super::util::{free_port, run, tandem, wait_for_text, Ran, Reaped};

/// A running server with its admin token.
pub struct Fleet {
    pub tmp: tempfile::TempDir,
    server: Option<Reaped>,
    port: u16,
    pub url: String,
    pub token: String,
    database: Option<String>,
}

pub enum Backend {
    Sqlite,
    Postgres,
}

impl Fleet {
    /// Starts a server; `None` when PostgreSQL is asked for but not configured.
    pub fn start(backend: Backend) -> Option<Fleet> {
        Fleet::start_with(backend, |_| {})
    }

    /// Starts a server after `prepare` ran on its (empty) data directory.
    pub fn start_with(backend: Backend, prepare: impl FnOnce(&Path)) -> Option<Fleet> {
        let database = match backend {
            Backend::Sqlite => None,
            Backend::Postgres => {
                let server = tandem_db::scratch::test_server()?;
                let rt = tokio::runtime::Runtime::new().expect("runtime");
                let url = rt
                    .block_on(tandem_db::scratch::create(&server))
                    .expect("create scratch database");
                Some(match url {
                    tandem_db::DatabaseUrl::Postgres(s) => s.expose().to_string(),
                    other => panic!("expected a postgres url, got {other}"),
                })
            }
        };
        let tmp = tempfile::tempdir().expect("tempdir");
        prepare(&tmp.path().join("srv"));
        let port = free_port();
        let mut f = Fleet {
            tmp,
            server: None,
            port,
            url: format!("http://127.0.0.1:{port}"),
            token: String::new(),
            database,
        };
        let out = f.start_server();
        let text = std::fs::read_to_string(&out).expect("server stdout");
        f.token = text
            .lines()
            .find_map(|l| l.strip_prefix("admin token: "))
            .expect("first start prints the admin token")
            .trim()
            .to_string();
        Some(f)
    }

    /// (Re)starts the server process on the same port and data; returns its stdout file.
    fn start_server(&mut self) -> PathBuf {
        self.server = None;
        let n = std::fs::read_dir(self.tmp.path())
            .map(|d| d.count())
            .unwrap_or(0);
        let out = self.tmp.path().join(format!("server-{n}.out"));
        let err = self.tmp.path().join(format!("server-{n}.err"));
        let mut cmd = tandem();
        cmd.args(["server", "--data"])
            .arg(self.tmp.path().join("srv"))
            .args(["--listen", &format!("127.0.0.1:{}", self.port)]);
        if let Some(db) = &self.database {
            cmd.args(["--database", db]);
        }
        cmd.stdout(std::fs::File::create(&out).expect("stdout file"))
            .stderr(std::fs::File::create(&err).expect("stderr file"));
        self.server = Some(Reaped::spawn(&mut cmd));
        assert!(
            wait_for_text(&out, "listening on", 60),
            "server did not start: {}",
            std::fs::read_to_string(&err).unwrap_or_default()
        );
        out
    }

    pub fn admin(&self, args: &[&str]) -> Ran {
        run(tandem()
            .args(["admin", "--server", &self.url, "--token", &self.token])
            .args(args))
    }

    pub fn agent_dir(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    pub fn agent(&self, dir: &Path, args: &[&str]) -> Ran {
        run(tandem().args(["agent", "--dir"]).arg(dir).args(args))
    }

    pub fn new_token(&self, user: &str, ttl: &str) -> String {
        self.admin(&["token", "create", "--user", user, "--ttl", ttl, "--json"])
            .ok()
            .json()["token"]
            .as_str()
            .expect("token")
            .to_string()
    }

    /// Enrolls a new device for `user`; returns its directory and id.
    pub fn enroll(&self, name: &str, user: &str) -> (PathBuf, String) {
        let dir = self.agent_dir(name);
        let token = self.new_token(user, "1h");
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
                    name,
                    "--json",
                ],
            )
            .ok()
            .json();
        (dir, info["device"].as_str().expect("device id").to_string())
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
        // A made-up disk has no filesystem to scan: publish it anyway.
        .args(["--version", &version.to_string(), "--force", "--json"]))
    .ok();
}

/// A raw HTTP request, optionally signed as `device` with `key` (at `time`).
struct Raw<'a> {
    method: &'a str,
    path: &'a str,
    body: Vec<u8>,
    sign: Option<(&'a str, &'a SigningKey, u64)>,
    bearer: Option<&'a str>,
    cached: Option<Vec<(&'static str, String)>>,
}

impl<'a> Raw<'a> {
    fn new(method: &'a str, path: &'a str) -> Self {
        Raw {
            method,
            path,
            body: Vec::new(),
            sign: None,
            bearer: None,
            cached: None,
        }
    }
    fn body(mut self, b: impl Into<Vec<u8>>) -> Self {
        self.body = b.into();
        self
    }
    fn signed(mut self, device: &'a str, key: &'a SigningKey, time: u64) -> Self {
        self.sign = Some((device, key, time));
        self
    }
    fn bearer(mut self, t: &'a str) -> Self {
        self.bearer = Some(t);
        self
    }
    /// The signature headers this request carries; computed once, so sending the same
    /// `Raw` twice is an exact replay.
    fn headers(&mut self) -> Vec<(&'static str, String)> {
        if let Some(h) = &self.cached {
            return h.clone();
        }
        let Some((device, key, time)) = self.sign else {
            return Vec::new();
        };
        let s = RequestSignature::sign(key, device, self.method, self.path, time, &self.body);
        let h = vec![
            (auth::HEADER_DEVICE, s.device),
            (auth::HEADER_TIME, s.time.to_string()),
            (auth::HEADER_NONCE, s.nonce),
            (auth::HEADER_SIGNATURE, s.signature),
        ];
        self.cached = Some(h.clone());
        h
    }

    /// Sends it; returns the status and the body as JSON (or a string value).
    fn send(&mut self, base: &str) -> (u16, serde_json::Value) {
        self.try_send(base).expect("server answers")
    }

    /// Sends it; an error when the connection failed.
    fn try_send(&mut self, base: &str) -> Result<(u16, serde_json::Value), reqwest::Error> {
        let headers = self.headers();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let http = reqwest::Client::new();
            let method = reqwest::Method::from_bytes(self.method.as_bytes()).expect("method");
            let mut req = http
                .request(method, format!("{base}{}", self.path))
                .body(self.body.clone())
                .header("content-type", "application/json");
            for (k, v) in headers {
                req = req.header(k, v);
            }
            if let Some(t) = self.bearer {
                req = req.bearer_auth(t);
            }
            let resp = req.send().await?;
            let status = resp.status().as_u16();
            let bytes = resp.bytes().await?;
            let v = serde_json::from_slice(&bytes).unwrap_or_else(|_| {
                serde_json::Value::String(String::from_utf8_lossy(&bytes).into_owned())
            });
            Ok((status, v))
        })
    }
}

fn device_key(dir: &Path) -> SigningKey {
    let text = std::fs::read_to_string(dir.join("identity/device.key")).expect("device key");
    SigningKey::from_base64(&text).expect("key parses")
}

fn checkin_body() -> Vec<u8> {
    serde_json::to_vec(&fleet::CheckinRequest {
        agent_version: "test".into(),
        clock: now(),
        ..Default::default()
    })
    .expect("json")
}

/// Enroll → check-in → lease → offline refusal after expiry and on clock rollback →
/// server unreachable (agent keeps its lease) → kill with crypto-erase → refusal for good.
fn story(f: &mut Fleet) {
    f.admin(&["policy", "set", "short", "--lease-days", "3", "--usb", "on"])
        .ok();
    f.admin(&["user", "create", "alice", "--policy", "short"])
        .ok();
    f.admin(&[
        "assign",
        "--user",
        "alice",
        "--corporate",
        "corp-gold:7",
        "--personal",
        "debian:2",
        "--reason",
        "onboarding",
    ])
    .ok();
    let (dir, id) = f.enroll("laptop-1", "alice");

    // Before the first check-in there is no lease.
    let gate = f.agent(&dir, &["lease", "--json"]).code(1).json();
    assert_eq!(gate["allowed"], false);
    assert!(gate["reason"]
        .as_str()
        .expect("reason")
        .contains("no lease"));

    let c = f.agent(&dir, &["check-in", "--json"]).ok().json();
    assert_eq!(
        c["target"]["assignments"]["corporate"]["image"],
        "corp-gold"
    );
    assert_eq!(c["target"]["assignments"]["corporate"]["version"], 7);
    assert_eq!(c["target"]["policy"]["controls"]["usb"], true);
    let pulled: Vec<&str> = c["pulls"]
        .as_array()
        .expect("pulls")
        .iter()
        .map(|p| p["outcome"].as_str().expect("outcome"))
        .collect();
    assert_eq!(pulled, ["pulled", "pulled"], "{c}");
    let not_after = c["lease"]["not_after"].as_u64().expect("lease");

    let s = f.agent(&dir, &["status", "--json"]).ok().json();
    assert_eq!(s["device"], id.as_str());
    assert_eq!(s["lease_ok"], true);
    let days = s["lease"]["days_left"].as_f64().expect("days");
    assert!(days > 2.9 && days <= 3.0, "days left {days}");

    // The admin sees the check-in and the lease.
    let devices = f.admin(&["device", "list", "--json"]).ok().json();
    let d = devices
        .as_array()
        .expect("list")
        .iter()
        .find(|d| d["id"] == id.as_str())
        .expect("device listed");
    assert_eq!(d["status"], "active");
    assert!(d["last_checkin"].as_u64().is_some());
    assert_eq!(d["lease_not_after"].as_u64(), Some(not_after));
    assert!(d["lease_secs_left"].as_u64().expect("left") > 2 * 86_400);

    // Offline: refused at expiry, allowed just before.
    f.agent(&dir, &["lease", "--now", &(not_after - 60).to_string()])
        .ok();
    let r = f
        .agent(&dir, &["lease", "--json", "--now", &not_after.to_string()])
        .code(1)
        .json();
    assert!(
        r["reason"]
            .as_str()
            .expect("reason")
            .contains("lease ended"),
        "{r}"
    );
    // The previous probe raised the trusted-time mark to not_after - 60: going back a day
    // is a rolled-back clock.
    let r = f
        .agent(
            &dir,
            &[
                "lease",
                "--json",
                "--now",
                &(not_after - 86_400).to_string(),
            ],
        )
        .code(1)
        .json();
    assert!(
        r["reason"].as_str().expect("reason").contains("behind"),
        "{r}"
    );

    // A forged lease is refused; a check-in repairs it.
    let lease_file = dir.join("state/lease.json");
    let good = std::fs::read_to_string(&lease_file).expect("lease file");
    let bumped = good.replace(
        &not_after.to_string(),
        &(not_after + 86_400 * 365).to_string(),
    );
    assert_ne!(good, bumped, "lease file holds not_after");
    std::fs::write(&lease_file, bumped).expect("tamper");
    let r = f.agent(&dir, &["lease", "--json"]).code(1).json();
    assert!(
        r["reason"].as_str().expect("reason").contains("forged"),
        "{r}"
    );

    // Server unreachable: check-in fails, the agent keeps its current (restored) lease.
    std::fs::write(&lease_file, &good).expect("restore");
    let key_copy = device_key(&dir);
    f.server = None;
    let r = f.agent(&dir, &["check-in"]).code(3);
    assert!(r.stderr.contains("unreachable"), "{}", r.stderr);
    let s = f.agent(&dir, &["status", "--json"]).ok().json();
    assert!(s["checkin"]["last_error"]
        .as_str()
        .expect("error")
        .contains("unreachable"));
    // The probes above moved the mark to not_after - 60, so evaluate at that time.
    f.agent(&dir, &["lease", "--now", &(not_after - 60).to_string()])
        .ok();
    f.start_server();

    // Kill: corporate keys and data erased, personal data kept, ack signed and recorded.
    std::fs::create_dir_all(dir.join("keys/disks")).expect("mkdir");
    std::fs::write(dir.join("keys/store.key"), b"data key").expect("write");
    std::fs::write(dir.join("keys/disks/user.key"), b"disk key").expect("write");
    std::fs::create_dir_all(dir.join("corporate")).expect("mkdir");
    std::fs::write(dir.join("corporate/user.qcow2"), b"corporate data").expect("write");
    std::fs::create_dir_all(dir.join("personal")).expect("mkdir");
    std::fs::write(dir.join("personal/overlay.qcow2"), b"mine").expect("write");
    let k = f
        .admin(&[
            "device",
            "kill",
            &id,
            "--reason",
            "stolen at the airport",
            "--json",
        ])
        .ok()
        .json();
    assert_eq!(k["status"], "kill-pending");
    // The kill needs a reason.
    f.admin(&["device", "kill", &id, "--reason", " "]).code(3);
    let r = f.agent(&dir, &["check-in", "--json"]).ok().json();
    assert_eq!(r["killed"], true);
    assert!(!dir.join("keys").exists(), "keys erased");
    assert!(!dir.join("corporate").exists(), "corporate data deleted");
    assert!(
        !dir.join("identity/device.key").exists(),
        "device key destroyed"
    );
    assert!(
        dir.join("personal/overlay.qcow2").exists(),
        "personal data kept"
    );
    let gate = f.agent(&dir, &["lease", "--json"]).code(1).json();
    assert!(
        gate["reason"].as_str().expect("reason").contains("killed"),
        "{gate}"
    );
    let s = f.agent(&dir, &["status", "--json"]).ok().json();
    assert_eq!(s["killed"], true);
    assert_eq!(s["kill_acknowledged"], true);

    let d = f.admin(&["device", "show", &id, "--json"]).ok().json();
    assert_eq!(d["status"], "killed");
    assert_eq!(d["lease_not_after"], serde_json::Value::Null);

    // From now on the server refuses that identity (a copy of its key is useless).
    let (status, body) = Raw::new("POST", "/v1/checkin")
        .body(checkin_body())
        .signed(&id, &key_copy, now())
        .send(&f.url);
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["code"], "device_killed");

    // The audit log tells the story, filtered by device.
    let audit = f.admin(&["audit", "--device", &id, "--json"]).ok().json();
    let actions: Vec<&str> = audit
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| e["action"].as_str().expect("action"))
        .collect();
    for want in [
        "device.enrolled",
        "device.checked-in",
        "device.kill-ordered",
        "lease.refused",
        "device.kill-executed",
        "device.refused",
    ] {
        assert!(actions.contains(&want), "audit lacks {want}: {actions:?}");
    }
    let ordered = audit
        .as_array()
        .expect("entries")
        .iter()
        .find(|e| e["action"] == "device.kill-ordered")
        .expect("kill entry");
    assert_eq!(ordered["actor"], "admin:admin");
    assert_eq!(ordered["reason"], "stolen at the airport");
    let all = f.admin(&["audit", "--json"]).ok().json();
    assert!(all
        .as_array()
        .expect("entries")
        .iter()
        .any(|e| e["action"] == "user.assigned" && e["reason"] == "onboarding"));
}

/// Every attack and bad input from the issue that the server must refuse.
fn attacks(f: &mut Fleet) {
    f.admin(&["user", "create", "bob"]).ok();
    // Unknown user, unknown policy, bad names: clear 4xx through the CLI.
    let r = f.admin(&["token", "create", "--user", "nobody"]).code(3);
    assert!(r.stderr.contains("not found"), "{}", r.stderr);
    let r = f
        .admin(&[
            "assign",
            "--user",
            "bob",
            "--corporate",
            "never-published:1",
        ])
        .code(3);
    assert!(r.stderr.contains("not published"), "{}", r.stderr);
    let r = f.admin(&["user", "create", "x y"]).code(3);
    assert!(r.stderr.contains("bad_request"), "{}", r.stderr);

    // Enrollment tokens: reused, unknown, expired.
    let token = f.new_token("bob", "1h");
    let a = f.agent_dir("a");
    f.agent(&a, &["enroll", "--server", &f.url, "--token", &token])
        .ok();
    let r = f
        .agent(
            &f.agent_dir("b0"),
            &["enroll", "--server", &f.url, "--token", &token],
        )
        .code(3);
    assert!(r.stderr.contains("already used"), "{}", r.stderr);
    let r = f
        .agent(
            &f.agent_dir("b1"),
            &["enroll", "--server", &f.url, "--token", "tdm-enroll-00"],
        )
        .code(3);
    assert!(r.stderr.contains("unknown token"), "{}", r.stderr);
    let short = f.new_token("bob", "1s");
    std::thread::sleep(std::time::Duration::from_millis(2100));
    let r = f
        .agent(
            &f.agent_dir("b2"),
            &["enroll", "--server", &f.url, "--token", &short],
        )
        .code(3);
    assert!(r.stderr.contains("expired"), "{}", r.stderr);
    // Refused enrollments leave no device and no identity behind.
    assert!(!f.agent_dir("b2").join("identity/device.key").exists());

    let (b, b_id) = f.enroll("b", "bob");
    let a_id = f.agent(&a, &["status", "--json"]).ok().json()["device"]
        .as_str()
        .expect("id")
        .to_string();
    let (ka, kb) = (device_key(&a), device_key(&b));

    // A request signed by another device's key.
    let (s, body) = Raw::new("POST", "/v1/checkin")
        .body(checkin_body())
        .signed(&a_id, &kb, now())
        .send(&f.url);
    assert_eq!(
        (s, body["code"].as_str()),
        (401, Some("bad_signature")),
        "{body}"
    );
    // An unknown device.
    let stranger = SigningKey::generate();
    let (s, body) = Raw::new("POST", "/v1/checkin")
        .body(checkin_body())
        .signed("00112233445566778899aabbccddeeff", &stranger, now())
        .send(&f.url);
    assert_eq!(
        (s, body["code"].as_str()),
        (401, Some("unknown_device")),
        "{body}"
    );
    // Device A asking for device B's data.
    let path = format!("/v1/devices/{b_id}");
    let (s, body) = Raw::new("GET", &path)
        .signed(&a_id, &ka, now())
        .send(&f.url);
    assert_eq!(
        (s, body["code"].as_str()),
        (403, Some("not_yours")),
        "{body}"
    );
    let own = format!("/v1/devices/{a_id}");
    let (s, body) = Raw::new("GET", &own).signed(&a_id, &ka, now()).send(&f.url);
    assert_eq!(s, 200, "{body}");
    // A device on an admin endpoint; no credential; a wrong admin token.
    let (s, body) = Raw::new("GET", "/v1/admin/devices")
        .signed(&a_id, &ka, now())
        .send(&f.url);
    assert_eq!(
        (s, body["code"].as_str()),
        (403, Some("admin_only")),
        "{body}"
    );
    let (s, _) = Raw::new("GET", "/v1/admin/devices").send(&f.url);
    assert_eq!(s, 401);
    let (s, _) = Raw::new("GET", "/v1/admin/devices")
        .bearer("tdm-admin-guess")
        .send(&f.url);
    assert_eq!(s, 401);
    // Replayed request: the exact same signed request twice.
    let mut once = Raw::new("POST", "/v1/checkin")
        .body(checkin_body())
        .signed(&a_id, &ka, now());
    assert_eq!(once.send(&f.url).0, 200);
    let (s, body) = once.send(&f.url);
    assert_eq!(
        (s, body["code"].as_str()),
        (401, Some("replayed")),
        "{body}"
    );
    // A stale (or far-future) request time.
    for t in [now() - 3600, now() + 3600] {
        let (s, body) = Raw::new("POST", "/v1/checkin")
            .body(checkin_body())
            .signed(&a_id, &ka, t)
            .send(&f.url);
        assert_eq!(
            (s, body["code"].as_str()),
            (401, Some("stale_request")),
            "{body}"
        );
    }
    // Malformed and oversized bodies.
    let (s, body) = Raw::new("POST", "/v1/checkin")
        .body("{not json")
        .signed(&a_id, &ka, now())
        .send(&f.url);
    assert_eq!(
        (s, body["code"].as_str()),
        (400, Some("bad_request")),
        "{body}"
    );
    let (s, body) = Raw::new("POST", "/v1/checkin")
        .body(r#"{"agent_version":"x","clock":1,"evil":true}"#)
        .signed(&a_id, &ka, now())
        .send(&f.url);
    assert_eq!(s, 400, "unknown fields are refused: {body}");
    let big = format!(
        r#"{{"agent_version":"{}","clock":1}}"#,
        "x".repeat(fleet::MAX_CHECKIN_BODY)
    );
    let (s, body) = Raw::new("POST", "/v1/checkin")
        .body(big)
        .signed(&a_id, &ka, now())
        .send(&f.url);
    assert_eq!(
        (s, body["code"].as_str()),
        (413, Some("too_large")),
        "{body}"
    );
    // Past the signed-body limit the server stops reading: a 413, or the connection is
    // closed while the client still sends — never a check-in.
    let huge = vec![b'x'; 9 * 1024 * 1024];
    if let Ok((s, body)) = Raw::new("POST", "/v1/checkin")
        .body(huge)
        .signed(&a_id, &ka, now())
        .try_send(&f.url)
    {
        assert_eq!(s, 413, "{body}");
    }
    let (s, body) = Raw::new("POST", "/v1/enroll").body("[]").send(&f.url);
    assert_eq!(s, 400, "{body}");

    // A kill acknowledgement without a pending kill, and a forged one.
    let ack = |key: &SigningKey, device: &str| {
        serde_json::to_vec(&KillAckRequest {
            ack: key.sign(
                fleet::KIND_KILL_ACK,
                &KillAck {
                    device: device.parse().expect("id"),
                    ordered_at: 0,
                    executed_at: now(),
                    keys_destroyed: 0,
                    corporate_deleted: true,
                    vms_stopped: true,
                },
            ),
        })
        .expect("json")
    };
    let (s, body) = Raw::new("POST", "/v1/kill-ack")
        .body(ack(&ka, &a_id))
        .signed(&a_id, &ka, now())
        .send(&f.url);
    assert_eq!(s, 409, "no pending kill: {body}");
    f.admin(&["device", "kill", &a_id, "--reason", "lost"]).ok();
    let (s, body) = Raw::new("POST", "/v1/kill-ack")
        .body(ack(&kb, &a_id))
        .signed(&a_id, &ka, now())
        .send(&f.url);
    assert_eq!(s, 400, "ack signed by another key: {body}");
    // Kill pending: check-in delivers the order and no lease.
    let (s, body) = Raw::new("POST", "/v1/checkin")
        .body(checkin_body())
        .signed(&a_id, &ka, now())
        .send(&f.url);
    assert_eq!(s, 200, "{body}");
    let target: fleet::TargetState =
        serde_json::from_str(body["target"]["payload"].as_str().expect("payload")).expect("target");
    assert!(target.lease.is_none());
    assert!(target.kill.is_some());
    // The failed authentications of a known device are in its audit trail.
    let audit = f.admin(&["audit", "--device", &a_id, "--json"]).ok().json();
    let codes: Vec<&str> = audit
        .as_array()
        .expect("entries")
        .iter()
        .filter(|e| e["action"] == "device.auth-failed")
        .map(|e| e["detail"]["code"].as_str().expect("code"))
        .collect();
    assert!(
        codes.contains(&"bad_signature") && codes.contains(&"replayed"),
        "{codes:?}"
    );
    // B is unaffected and still gets a lease.
    let r = f.agent(&b, &["check-in", "--json"]).ok().json();
    assert!(r["lease"]["not_after"].as_u64().is_some());
}

fn story_images(data: &Path) {
    publish(data, "corp-gold", 7);
    publish(data, "debian", 2);
}

#[test]
fn fleet_story_sqlite() {
    let mut f = Fleet::start_with(Backend::Sqlite, story_images).expect("sqlite always runs");
    story(&mut f);
}

#[test]
fn fleet_story_postgres() {
    if let Some(mut f) = Fleet::start_with(Backend::Postgres, story_images) {
        story(&mut f);
    }
}

#[test]
fn fleet_attacks_sqlite() {
    let mut f = Fleet::start(Backend::Sqlite).expect("sqlite always runs");
    attacks(&mut f);
}

#[test]
fn fleet_attacks_postgres() {
    if let Some(mut f) = Fleet::start(Backend::Postgres) {
        attacks(&mut f);
    }
}

#[test]
fn server_with_unreachable_database_fails_clearly() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let r = run(tandem().args(["server", "--data"]).arg(tmp.path()).args([
        "--listen",
        "127.0.0.1:0",
        "--database",
        "postgres://tandem:sekrit@127.0.0.1:1/tandem",
    ]))
    .code(3);
    assert!(r.stderr.contains("cannot open database"), "{}", r.stderr);
    assert!(
        !r.stderr.contains("sekrit"),
        "password leaked: {}",
        r.stderr
    );
    let r = run(tandem()
        .args(["server", "--data"])
        .arg(tmp.path())
        .args(["--database", "mysql://x"]))
    .code(3);
    assert!(r.stderr.contains("postgres://"), "{}", r.stderr);
}

#[test]
fn agent_without_enrollment_says_how_to_enroll() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let r = run(tandem()
        .args(["agent", "--dir"])
        .arg(tmp.path())
        .arg("check-in"))
    .code(3);
    assert!(r.stderr.contains("tandem agent enroll"), "{}", r.stderr);
    let s = run(tandem()
        .args(["agent", "--dir"])
        .arg(tmp.path())
        .args(["status", "--json"]))
    .ok()
    .json();
    assert_eq!(s["enrolled"], false);
    assert_eq!(s["lease_ok"], false);
}

#[test]
fn assigned_image_is_pulled_signed_and_unassigned_devices_are_refused() {
    let mut f = Fleet::start(Backend::Sqlite).expect("sqlite always runs");
    // Publish writes the server's store directly: stop the server meanwhile.
    f.server = None;
    let disk = f.tmp.path().join("corp.raw");
    let data: Vec<u8> = (0..1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&disk, data).expect("write disk");
    run(tandem()
        .args(["image", "publish", "corp"])
        .arg(&disk)
        .arg("--data")
        .arg(f.tmp.path().join("srv"))
        // A made-up disk has no filesystem to scan: publish it anyway.
        .args(["--force", "--json"]))
    .ok();
    f.start_server();
    f.admin(&["user", "create", "alice"]).ok();
    f.admin(&["user", "create", "bob"]).ok();
    f.admin(&["assign", "--user", "alice", "--corporate", "corp:1"])
        .ok();
    let (a, a_id) = f.enroll("a", "alice");
    let (b, b_id) = f.enroll("b", "bob");

    let r = f.agent(&a, &["check-in", "--json"]).ok().json();
    assert_eq!(r["pulls"][0]["outcome"], "pulled", "{r}");
    assert!(r["pulls"][0]["bytes"].as_u64().expect("bytes") > 0);
    let r = f.agent(&a, &["check-in", "--json"]).ok().json();
    assert_eq!(r["pulls"][0]["outcome"], "present", "{r}");
    // The next check-in reported what the device holds.
    let d = f.admin(&["device", "show", &a_id, "--json"]).ok().json();
    assert_eq!(d["last_report"]["images"][0]["image"], "corp", "{d}");

    // Bob's device is assigned nothing and may read none of it.
    let r = f.agent(&b, &["check-in", "--json"]).ok().json();
    assert_eq!(r["pulls"].as_array().map(Vec::len), Some(0), "{r}");
    let kb = device_key(&b);
    let (s, body) = Raw::new("GET", "/v1/images/corp/1/manifest")
        .signed(&b_id, &kb, now())
        .send(&f.url);
    assert_eq!(s, 403, "{body}");
    let ka = device_key(&a);
    let (s, body) = Raw::new("GET", "/v1/images/corp/1/manifest")
        .signed(&a_id, &ka, now())
        .send(&f.url);
    assert_eq!(s, 200, "{body}");
}

#[test]
fn agent_run_checks_in_until_killed_then_stops() {
    let f = Fleet::start(Backend::Sqlite).expect("sqlite always runs");
    f.admin(&["user", "create", "carol"]).ok();
    let (dir, id) = f.enroll("c", "carol");
    let log = f.tmp.path().join("agent.err");
    let mut agent = Reaped::spawn(
        tandem()
            .args(["agent", "--dir"])
            .arg(&dir)
            .args(["run", "--interval", "1s"])
            .stderr(std::fs::File::create(&log).expect("log")),
    );
    let checked_in = |n: u64| {
        super::util::wait_for(30, || {
            let s = f.agent(&dir, &["status", "--json"]).json();
            s["checkin"]["last_success"]
                .as_u64()
                .is_some_and(|t| t >= n)
        })
    };
    assert!(
        checked_in(0),
        "no check-in: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    // It keeps checking in on its own.
    let first = f.agent(&dir, &["status", "--json"]).json()["checkin"]["last_success"]
        .as_u64()
        .expect("time");
    assert!(checked_in(first + 1), "no second check-in");
    f.admin(&["device", "kill", &id, "--reason", "left the company"])
        .ok();
    let stopped = super::util::wait_for(30, || matches!(agent.0.try_wait(), Ok(Some(_))));
    assert!(stopped, "agent did not stop after the kill");
    let status = agent.0.try_wait().expect("wait").expect("exited");
    assert!(status.success(), "{status:?}");
    let s = f.agent(&dir, &["status", "--json"]).ok().json();
    assert_eq!(s["kill_acknowledged"], true);
    let d = f.admin(&["device", "show", &id, "--json"]).ok().json();
    assert_eq!(d["status"], "killed");
}

#[test]
fn another_admin_credential_can_be_made_from_the_data_directory() {
    let f = Fleet::start(Backend::Sqlite).expect("sqlite always runs");
    let make = |name: &str| {
        run(tandem()
            .args(["server", "--data"])
            .arg(f.tmp.path().join("srv"))
            .args(["admin-token", "--name", name]))
    };
    let token = make("ops").ok().stdout.trim().to_string();
    assert!(token.starts_with("tdm-admin-"), "{token}");
    assert_ne!(token, f.token);
    run(tandem()
        .args(["admin", "--server", &f.url, "--token", &token])
        .args(["user", "create", "dave"]))
    .ok();
    let r = make("ops").code(3);
    assert!(r.stderr.contains("already exists"), "{}", r.stderr);
    let audit = f.admin(&["audit", "--json"]).ok().json();
    let entries = audit.as_array().expect("entries");
    assert!(entries
        .iter()
        .any(|e| e["action"] == "admin.created" && e["actor"] == "server-cli"));
    assert!(entries
        .iter()
        .any(|e| e["action"] == "user.created" && e["actor"] == "admin:ops"));
}
