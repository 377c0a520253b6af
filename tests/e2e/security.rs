//! End-to-end tests: the security boundaries of issue 12 against the real `tandem server`
//! and `tandem agent` binaries on loopback. Attacks are crafted with the same request
//! signing the agent uses.

use std::io::Write as _;
use std::path::Path;

use tandem_proto::auth::{self, RequestSignature};
use tandem_proto::SigningKey;
use tandem_tools::clock::now_secs as now;

use super::fleet::{Backend, Fleet};
use super::util::{run, tandem, wait_for, Reaped};

fn device_key(dir: &Path) -> SigningKey {
    let text = std::fs::read_to_string(dir.join("identity/device.key")).expect("device key");
    SigningKey::from_base64(&text).expect("key parses")
}

/// Sends one request signed as `device`; returns the status and the JSON body (or Null).
fn signed(
    base: &str,
    device: &str,
    key: &SigningKey,
    method: &str,
    path: &str,
    body: &[u8],
) -> (u16, serde_json::Value) {
    let s = RequestSignature::sign(key, device, method, path, now(), body);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let http = reqwest::Client::new();
        let resp = http
            .request(
                reqwest::Method::from_bytes(method.as_bytes()).expect("method"),
                format!("{base}{path}"),
            )
            .header(auth::HEADER_DEVICE, s.device)
            .header(auth::HEADER_TIME, s.time.to_string())
            .header(auth::HEADER_NONCE, s.nonce)
            .header(auth::HEADER_SIGNATURE, s.signature)
            .header("content-type", "application/json")
            .body(body.to_vec())
            .send()
            .await
            .expect("server answers");
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await.expect("body");
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
        )
    })
}

/// Issue 12, must-fix 5: a user disk holding several GiB of data backs up. Its manifest
/// (one entry per 64 KiB) is far larger than axum's 2 MiB default body limit, which made
/// every such backup fail with 413 forever. The data repeats 64 distinct chunks so only
/// those travel; the disk's tail is a hole.
#[test]
fn backup_of_a_disk_holding_several_gib_commits() {
    const CHUNK: usize = 64 << 10;
    const DATA: u64 = 3 << 30;
    let f = Fleet::start(Backend::Sqlite).expect("a SQLite fleet always starts");
    f.admin(&["user", "create", "dana"]).ok();
    let (dir, dev) = f.enroll("laptop-d", "dana");
    let disk = tandem_desktop::Layout::new(&dir).corporate_user_disk();
    std::fs::create_dir_all(disk.parent().expect("parent")).expect("desktop dir");
    {
        let mut block = vec![0u8; 64 * CHUNK];
        for (i, c) in block.chunks_mut(CHUNK).enumerate() {
            c.fill(i as u8 + 1);
            c[..8].copy_from_slice(&(i as u64).to_le_bytes());
        }
        let mut w = std::io::BufWriter::with_capacity(
            8 << 20,
            std::fs::File::create(&disk).expect("user disk"),
        );
        for _ in 0..DATA / block.len() as u64 {
            w.write_all(&block).expect("write");
        }
        let file = w.into_inner().expect("flush");
        file.set_len(DATA + (1 << 20)).expect("hole at the end");
    }
    let data_entries = DATA / CHUNK as u64;
    // Backups run in the agent daemon (where one exists; the command then asks it).
    let _daemon = Reaped::spawn(tandem().args(["agent", "run", "--dir"]).arg(&dir));
    assert!(
        wait_for(60, || dir.join("agent.sock").exists()),
        "agent daemon did not start"
    );
    let b1 = run(tandem()
        .args(["agent", "backup", "--json", "--dir"])
        .arg(&dir))
    .ok()
    .json();
    assert_eq!(b1["backup"]["seq"], 1, "{b1}");
    assert_eq!(b1["backup"]["data_chunks"], data_entries);
    assert_eq!(b1["uploaded_chunks"], 64);
    assert_eq!(b1["disk_bytes"], DATA + (1 << 20));
    // The committed manifest is indeed beyond one default-sized request.
    let record = f
        .tmp
        .path()
        .join("srv/backups")
        .join(
            "dana"
                .bytes()
                .map(|b| format!("{b:02x}"))
                .collect::<String>(),
        )
        .join(format!("{:020}.json", 1));
    let len = std::fs::metadata(&record).expect("record").len();
    assert!(len > 2 << 20, "manifest of {len} bytes is not over 2 MiB");
    // The next backup moves no chunk and commits too.
    let b2 = run(tandem()
        .args(["agent", "backup", "--json", "--dir"])
        .arg(&dir))
    .ok()
    .json();
    assert_eq!(b2["backup"]["seq"], 2);
    assert_eq!(b2["uploaded_chunks"], 0);
    let listed = f.admin(&["backups", "list", &dev, "--json"]).ok().json();
    assert_eq!(listed.as_array().map(Vec::len), Some(2));
    let _ = std::fs::remove_file(&disk);
}

/// Issue 12, must-fix 4 and 1, against the real binaries: a device cannot launder an
/// image chunk through its own backup, cannot use the shared store's dedup query, and
/// loses user data the moment a kill is ordered (not when it chooses to acknowledge).
#[test]
fn laundering_dedup_probing_and_kill_pending_access_are_refused() {
    let f = Fleet::start(Backend::Sqlite).expect("a SQLite fleet always starts");
    f.admin(&["user", "create", "erin"]).ok();
    let (dir, dev) = f.enroll("laptop-e", "erin");
    let key = device_key(&dir);
    // IT publishes an image that is not assigned to erin.
    let srv = f.tmp.path().join("srv");
    let disk = f.tmp.path().join("secret.raw");
    let secret: Vec<u8> = (0..256 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    std::fs::write(&disk, &secret).expect("disk");
    run(tandem()
        .args(["image", "publish", "confidential"])
        .arg(&disk)
        .arg("--data")
        .arg(&srv)
        // A raw disk with no filesystem cannot be malware-scanned: publish it anyway.
        .args(["--force", "--json"]))
    .ok();
    let stolen_id = tandem_proto::ChunkId::of(&secret[..64 << 10]);
    // The chunk is really on the server (asked as the admin, who may).
    let ask = serde_json::to_vec(&serde_json::json!({ "chunks": [stolen_id] })).expect("json");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let lacking: serde_json::Value = rt.block_on(async {
        reqwest::Client::new()
            .post(format!("{}/v1/chunks/missing", f.url))
            .bearer_auth(&f.token)
            .header("content-type", "application/json")
            .body(ask.clone())
            .send()
            .await
            .expect("server answers")
            .json()
            .await
            .expect("json")
    });
    assert_eq!(
        lacking["chunks"],
        serde_json::json!([]),
        "the image chunk is stored"
    );

    // The shared store's dedup query is not for devices.
    let (s, body) = signed(&f.url, &dev, &key, "POST", "/v1/chunks/missing", &ask);
    assert_eq!(
        (s, body["code"].as_str()),
        (403, Some("admin_only")),
        "{body}"
    );
    // The backup namespace says "missing": nothing about what the server holds elsewhere.
    let (s, body) = signed(
        &f.url,
        &dev,
        &key,
        "POST",
        "/v1/backups/chunks/missing",
        &ask,
    );
    assert_eq!(s, 200, "{body}");
    assert_eq!(body["chunks"][0], serde_json::json!(stolen_id));
    // A backup naming the image chunk is refused, so there is nothing to read back.
    let up = serde_json::json!({
        "manifest": {
            "format": 1, "name": "backup", "version": 1,
            "size": 65536, "chunk_size": 65536, "chunks": [stolen_id]
        },
        "taken_at": now(),
    });
    let (s, body) = signed(
        &f.url,
        &dev,
        &key,
        "POST",
        "/v1/backups",
        &serde_json::to_vec(&up).expect("json"),
    );
    assert_eq!(s, 409, "laundering must be refused: {body}");
    let (s, _) = signed(
        &f.url,
        &dev,
        &key,
        "GET",
        &format!("/v1/backups/1/chunks/{stolen_id}"),
        &[],
    );
    assert_eq!(s, 404);

    // Kill ordered, not yet acknowledged: user data is refused at once, check-in works.
    f.admin(&["device", "kill", &dev, "--reason", "stolen"])
        .ok();
    let (s, body) = signed(&f.url, &dev, &key, "GET", "/v1/escrow", &[]);
    assert_eq!(
        (s, body["code"].as_str()),
        (403, Some("kill_pending")),
        "{body}"
    );
    let (s, body) = signed(&f.url, &dev, &key, "GET", "/v1/backups/latest/head", &[]);
    assert_eq!(
        (s, body["code"].as_str()),
        (403, Some("kill_pending")),
        "{body}"
    );
    let (s, body) = signed(
        &f.url,
        &dev,
        &key,
        "GET",
        &format!("/v1/devices/{dev}"),
        &[],
    );
    assert_eq!(s, 200, "{body}");
    let audit = f.admin(&["audit", "--device", &dev, "--json"]).ok().json();
    let refusals = audit
        .as_array()
        .expect("entries")
        .iter()
        .filter(|e| e["action"] == "device.refused" && e["detail"]["why"] == "kill-pending")
        .count();
    assert_eq!(refusals, 2, "{audit}");
}

/// Should-fix: admin credentials and enrollment tokens can be revoked, effective at once;
/// the last admin credential cannot be.
#[test]
fn revoked_admin_credentials_and_enrollment_tokens_are_refused() {
    let f = Fleet::start(Backend::Sqlite).expect("a SQLite fleet always starts");
    f.admin(&["user", "create", "gus"]).ok();
    let token = f.new_token("gus", "1h");
    let revoked = f
        .admin(&[
            "token",
            "revoke",
            "--user",
            "gus",
            "--reason",
            "mailed to the wrong person",
            "--json",
        ])
        .ok()
        .json();
    assert_eq!(revoked["revoked"], 1);
    let dir = f.agent_dir("laptop-g");
    let ran = f.agent(
        &dir,
        &[
            "enroll",
            "--server",
            &f.url,
            "--token",
            &token,
            "--hostname",
            "g",
        ],
    );
    assert_ne!(ran.code, 0, "a revoked token must not enroll");
    assert!(ran.stderr.contains("token"), "{}", ran.stderr);

    // A second credential, revoked by the first: refused from then on.
    let srv = f.tmp.path().join("srv");
    let second =
        run(tandem()
            .args(["server", "--data"])
            .arg(&srv)
            .args(["admin-token", "--name", "ops"]))
        .ok()
        .stdout
        .trim()
        .to_string();
    let as_ops = |args: &[&str]| {
        run(tandem()
            .args(["admin", "--server", &f.url, "--token", &second])
            .args(args))
    };
    as_ops(&["user", "list"]).ok();
    f.admin(&["revoke-admin", "ops"]).ok();
    let ran = as_ops(&["user", "list"]);
    assert_ne!(ran.code, 0, "a revoked admin credential must be refused");
    // The last credential stays.
    let ran = f.admin(&["revoke-admin", "admin"]);
    assert_ne!(ran.code, 0);
    f.admin(&["user", "list"]).ok();
    let audit = f.admin(&["audit", "--json"]).ok().json();
    let actions: Vec<&str> = audit
        .as_array()
        .expect("entries")
        .iter()
        .filter_map(|e| e["action"].as_str())
        .collect();
    assert!(actions.contains(&"token.revoked") && actions.contains(&"admin.revoked"));
}

/// Should-fix: with `--admin-token-file` the first admin credential goes to a new 0600 file,
/// never to stdout (a service journal).
#[test]
fn first_admin_token_can_go_to_a_file_instead_of_the_journal() {
    use std::os::unix::fs::PermissionsExt as _;
    let tmp = tempfile::tempdir().expect("tempdir");
    let port = super::util::free_port();
    let out = tmp.path().join("server.out");
    let token_file = tmp.path().join("admin.token");
    let _server = Reaped::spawn(
        tandem()
            .args(["server", "--data"])
            .arg(tmp.path().join("srv"))
            .args([
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--admin-token-file",
            ])
            .arg(&token_file)
            .stdout(std::fs::File::create(&out).expect("stdout file"))
            .stderr(std::process::Stdio::null()),
    );
    assert!(super::util::wait_for_text(&out, "listening on", 60));
    let token = std::fs::read_to_string(&token_file).expect("token file");
    let token = token.trim();
    assert!(token.starts_with("tdm-admin-"));
    let mode = std::fs::metadata(&token_file)
        .expect("meta")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let stdout = std::fs::read_to_string(&out).expect("stdout");
    assert!(!stdout.contains(token), "the token must not be printed");
    run(tandem()
        .args([
            "admin",
            "--server",
            &format!("http://127.0.0.1:{port}"),
            "--token",
            token,
        ])
        .args(["user", "list"]))
    .ok();
}
