//! The same story body against both back-ends.

use std::sync::Arc;

use tandem_db::{
    AuditFilter, CheckinOutcome, Db, DbError, DeviceRow, NewAudit, NewNonce, TokenRefusal,
};
use tandem_proto::fleet::{DeviceId, DeviceStatus, ImageRef};

fn device() -> DeviceRow {
    DeviceRow::enrolling(
        DeviceId::generate(),
        tandem_proto::SigningKey::generate().public(),
        "laptop-1",
        0,
    )
}

async fn story(db: &dyn Db) {
    // Admin credentials.
    assert_eq!(db.admin_count().await.expect("count"), 0);
    db.add_admin("admin", "h1", 10).await.expect("add admin");
    assert_eq!(
        db.admin_by_hash("h1").await.expect("find").as_deref(),
        Some("admin")
    );
    assert_eq!(db.admin_by_hash("nope").await.expect("find"), None);
    // Revocation: never the last credential; a revoked one no longer authenticates.
    assert!(matches!(
        db.revoke_admin("admin").await,
        Err(DbError::Conflict { .. })
    ));
    db.add_admin("temp", "h2", 10).await.expect("add admin");
    db.revoke_admin("temp").await.expect("revoke");
    assert_eq!(db.admin_by_hash("h2").await.expect("find"), None);
    assert!(matches!(
        db.revoke_admin("temp").await,
        Err(DbError::NotFound { .. })
    ));

    // Users and policies.
    assert!(
        db.policy("default").await.expect("policy").is_some(),
        "migration seeds default"
    );
    db.create_user("alice", "default", 11)
        .await
        .expect("create");
    assert!(matches!(
        db.create_user("alice", "default", 12).await,
        Err(DbError::Conflict { .. })
    ));
    db.put_policy("strict", r#"{"lease_days":1}"#, 13)
        .await
        .expect("put");
    db.put_policy("strict", r#"{"lease_days":2}"#, 14)
        .await
        .expect("replace");
    assert_eq!(
        db.policy("strict").await.expect("read").as_deref(),
        Some(r#"{"lease_days":2}"#)
    );
    assert_eq!(db.policies().await.expect("list").len(), 2);
    let mut alice = db.user("alice").await.expect("read").expect("exists");
    alice.policy = "strict".into();
    alice.corporate = Some(ImageRef {
        image: "corp".into(),
        version: 7,
    });
    db.update_user(&alice).await.expect("update");
    assert_eq!(
        db.user("alice").await.expect("read").expect("exists"),
        alice
    );
    assert!(db.user("bob").await.expect("read").is_none());
    let (u, p) = db
        .user_with_policy("alice")
        .await
        .expect("read")
        .expect("exists");
    assert_eq!((u, p.as_str()), (alice.clone(), r#"{"lease_days":2}"#));
    assert!(db.user_with_policy("bob").await.expect("read").is_none());

    // Enrollment tokens: single use, expiry, unknown.
    db.add_enroll_token("t1", "alice", 100, 200)
        .await
        .expect("token");
    db.add_enroll_token("t2", "alice", 100, 150)
        .await
        .expect("token");
    let d1 = device();
    assert_eq!(db.enroll("t1", &d1, 120).await.expect("enroll"), "alice");
    let again = db.enroll("t1", &device(), 121).await;
    assert!(
        matches!(again, Err(DbError::Token(TokenRefusal::Used))),
        "{again:?}"
    );
    let late = db.enroll("t2", &device(), 150).await;
    assert!(
        matches!(late, Err(DbError::Token(TokenRefusal::Expired))),
        "{late:?}"
    );
    let unknown = db.enroll("t3", &device(), 120).await;
    assert!(
        matches!(unknown, Err(DbError::Token(TokenRefusal::Unknown))),
        "{unknown:?}"
    );
    // A refused enrollment leaves no device behind.
    assert_eq!(db.devices().await.expect("list").len(), 1);
    // Revoking a user's tokens ends the unused, unexpired ones (t2 and t4; t1 is used);
    // a revoked token is refused.
    db.add_enroll_token("t4", "alice", 100, 500)
        .await
        .expect("token");
    assert_eq!(
        db.revoke_enroll_tokens("alice", 122).await.expect("revoke"),
        2
    );
    assert_eq!(
        db.revoke_enroll_tokens("alice", 122).await.expect("again"),
        0
    );
    let revoked = db.enroll("t4", &device(), 123).await;
    assert!(
        matches!(revoked, Err(DbError::Token(TokenRefusal::Expired))),
        "{revoked:?}"
    );

    let got = db.device(d1.id).await.expect("read").expect("exists");
    assert_eq!(got.user, "alice");
    assert_eq!(got.public_key, d1.public_key);
    assert_eq!(got.status, DeviceStatus::Active);

    // Check-in keeps the last lease when none is issued.
    let entry = |at| NewAudit {
        at,
        actor: "device".into(),
        action: "device.checked-in".into(),
        device: Some(d1.id),
        reason: None,
        detail: serde_json::json!({}),
    };
    assert_eq!(
        db.record_checkin(
            d1.id,
            DeviceStatus::Active,
            130,
            "{}",
            Some(1000),
            vec![entry(130)],
            None
        )
        .await
        .expect("checkin"),
        CheckinOutcome::Recorded
    );
    // With the request's nonce in the same transaction: once, then a replay that writes
    // nothing (no audit row, no new report).
    let nonce = NewNonce {
        device: d1.id,
        nonce: "00112233445566778899aabbccddeeff".into(),
        at: 131,
    };
    for (want, at, audit) in [
        (CheckinOutcome::Recorded, 131, vec![entry(131), entry(131)]),
        (CheckinOutcome::Replayed, 132, vec![entry(132)]),
    ] {
        let got = db
            .record_checkin(
                d1.id,
                DeviceStatus::Active,
                at,
                "{\"a\":1}",
                None,
                audit,
                Some(nonce.clone()),
            )
            .await
            .expect("checkin");
        assert_eq!(got, want);
    }
    assert!(
        !db.record_nonce(d1.id, &nonce.nonce, 131)
            .await
            .expect("nonce"),
        "the check-in recorded its nonce"
    );
    let checkins = db
        .audit(AuditFilter {
            device: Some(d1.id),
            ..Default::default()
        })
        .await
        .expect("audit");
    assert_eq!(
        checkins.len(),
        3,
        "check-in audit rows commit with the check-in"
    );
    let got = db.device(d1.id).await.expect("read").expect("exists");
    assert_eq!(got.last_checkin, Some(131));
    assert_eq!(got.lease_not_after, Some(1000));

    // Kill: active -> pending -> killed, and not twice.
    assert!(matches!(
        db.complete_kill(d1.id, "{}", 140).await,
        Err(DbError::NotFound { .. })
    ));
    db.order_kill(d1.id, "admin:admin", "stolen", 140)
        .await
        .expect("order");
    // A check-in that read the device as active before the kill order gets no lease: the
    // conditional write finds the status changed and writes nothing (issue 12).
    let stale = NewNonce {
        device: d1.id,
        nonce: "ffeeddccbbaa99887766554433221100".into(),
        at: 141,
    };
    assert_eq!(
        db.record_checkin(
            d1.id,
            DeviceStatus::Active,
            141,
            "{}",
            Some(99_999),
            vec![entry(141)],
            Some(stale.clone())
        )
        .await
        .expect("stale check-in"),
        CheckinOutcome::StatusChanged
    );
    assert!(
        db.record_nonce(d1.id, &stale.nonce, 141)
            .await
            .expect("nonce"),
        "rolled back with the check-in: the caller decides again with the same request"
    );
    let got = db.device(d1.id).await.expect("read").expect("exists");
    assert_eq!(
        got.lease_not_after,
        Some(1000),
        "no lease past the kill order"
    );
    assert_eq!(got.last_checkin, Some(131));
    assert_eq!(
        db.record_checkin(
            d1.id,
            DeviceStatus::KillPending,
            142,
            "{}",
            None,
            vec![],
            None
        )
        .await
        .expect("kill-pending check-in"),
        CheckinOutcome::Recorded
    );
    assert!(matches!(
        db.order_kill(d1.id, "admin:admin", "again", 141).await,
        Err(DbError::Conflict { .. })
    ));
    assert!(matches!(
        db.order_kill(DeviceId::generate(), "a", "b", 141).await,
        Err(DbError::NotFound { .. })
    ));
    db.complete_kill(d1.id, "{\"ack\":1}", 150)
        .await
        .expect("complete");
    let got = db.device(d1.id).await.expect("read").expect("exists");
    assert_eq!(got.status, DeviceStatus::Killed);
    assert_eq!(got.kill_reason.as_deref(), Some("stolen"));
    assert_eq!(got.killed_at, Some(150));
    assert_eq!(got.lease_not_after, None);

    // Audit: filter by device and time, oldest first.
    for (at, dev) in [(1, Some(d1.id)), (2, None), (3, Some(d1.id))] {
        db.append_audit(NewAudit {
            at,
            actor: "server".into(),
            action: format!("a{at}"),
            device: dev,
            reason: None,
            detail: serde_json::json!({"n": at}),
        })
        .await
        .expect("append");
    }
    let all = db.audit(AuditFilter::default()).await.expect("audit");
    let ats: Vec<u64> = all.iter().map(|e| e.at).collect();
    assert_eq!(
        ats,
        vec![130, 131, 131, 1, 2, 3],
        "oldest first, in insertion order"
    );
    let mine = db
        .audit(AuditFilter {
            device: Some(d1.id),
            since: Some(2),
            limit: None,
        })
        .await
        .expect("audit");
    let actions: Vec<&str> = mine.iter().map(|e| e.action.as_str()).collect();
    assert_eq!(
        actions,
        [
            "device.checked-in",
            "device.checked-in",
            "device.checked-in",
            "a3"
        ]
    );
    assert_eq!(mine[3].detail, serde_json::json!({"n": 3}));
    let last = db
        .audit(AuditFilter {
            limit: Some(2),
            ..Default::default()
        })
        .await
        .expect("audit");
    assert_eq!(last.iter().map(|e| e.at).collect::<Vec<_>>(), vec![2, 3]);
}

#[tokio::test]
async fn story_on_sqlite() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = tandem_db::DatabaseUrl::Sqlite(dir.path().join("t.db"));
    let db = tandem_db::open(&url).await.expect("open");
    story(db.as_ref()).await;
    // Reopening runs no migration twice and keeps the data.
    drop(db);
    let db = tandem_db::open(&url).await.expect("reopen");
    assert_eq!(db.admin_count().await.expect("count"), 1);
}

#[tokio::test]
async fn story_on_postgres() {
    let Some(server) = tandem_db::scratch::test_server() else {
        return;
    };
    let url = tandem_db::scratch::create(&server)
        .await
        .expect("scratch database");
    let db = tandem_db::open(&url).await.expect("open");
    story(db.as_ref()).await;
    drop(db);
    let db = tandem_db::open(&url).await.expect("reopen");
    assert_eq!(db.admin_count().await.expect("count"), 1);
}

#[tokio::test]
async fn unreachable_postgres_is_a_clear_error() {
    // Port 1 on loopback: nothing listens there.
    let url = tandem_db::DatabaseUrl::parse("postgres://tandem:secret@127.0.0.1:1/x").expect("url");
    let err = tandem_db::open(&url).await.expect_err("must fail");
    let text = err.to_string();
    assert!(text.contains("cannot open database"), "{text}");
    assert!(!text.contains("secret"), "password leaked: {text}");
}

#[tokio::test]
async fn audit_rows_cannot_be_changed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("t.db");
    let db = tandem_db::open(&tandem_db::DatabaseUrl::Sqlite(path.clone()))
        .await
        .expect("open");
    db.append_audit(NewAudit {
        at: 1,
        actor: "server".into(),
        action: "x".into(),
        device: None,
        reason: None,
        detail: serde_json::json!({}),
    })
    .await
    .expect("append");
    drop(db);
    use sqlx::Connection as _;
    let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite:{}", path.display()))
        .await
        .expect("connect");
    let upd = sqlx::query("UPDATE audit SET action = 'y'")
        .execute(&mut conn)
        .await;
    assert!(upd.is_err(), "update must be refused");
    let del = sqlx::query("DELETE FROM audit").execute(&mut conn).await;
    assert!(del.is_err(), "delete must be refused");
}

/// Replay protection shared through the database: `a` and `b` are two handles on one
/// database (two replicas). A nonce is fresh once per device, whichever handle sees it
/// first; of many racing inserts of one nonce exactly one wins; pruning drops only rows
/// signed before the horizon.
async fn nonces(a: Arc<dyn Db>, b: Arc<dyn Db>) {
    let (d1, d2) = (DeviceId::generate(), DeviceId::generate());
    let n = "0123456789abcdef0123456789abcdef";
    assert!(a.record_nonce(d1, n, 1_000).await.expect("record"));
    assert!(
        !b.record_nonce(d1, n, 1_000).await.expect("record"),
        "the other replica sees the replay"
    );
    assert!(
        !a.record_nonce(d1, n, 1_001).await.expect("record"),
        "a replay is a replay whatever time it claims"
    );
    assert!(
        b.record_nonce(d2, n, 1_000).await.expect("record"),
        "another device's nonce is its own"
    );
    // Racing inserts of one nonce from both handles: exactly one is fresh.
    let race = "fedcba9876543210fedcba9876543210";
    let tries = (0..16).map(|i| {
        let db = if i % 2 == 0 { a.clone() } else { b.clone() };
        tokio::spawn(async move { db.record_nonce(d1, race, 1_002).await.expect("record") })
    });
    let mut fresh = 0;
    for t in tries {
        fresh += usize::from(t.await.expect("join"));
    }
    assert_eq!(fresh, 1, "exactly one of the racing inserts wins");
    // Pruning by request time: rows signed before the horizon go, later ones stay.
    assert!(a.record_nonce(d1, "late", 2_000).await.expect("record"));
    assert_eq!(
        b.prune_nonces(1_001).await.expect("prune"),
        2,
        "d1 and d2 at 1000"
    );
    assert!(
        a.record_nonce(d1, n, 1_000).await.expect("record"),
        "pruned"
    );
    assert!(
        !b.record_nonce(d1, race, 1_002).await.expect("record"),
        "kept"
    );
    assert!(
        !b.record_nonce(d1, "late", 2_000).await.expect("record"),
        "kept"
    );
    assert_eq!(a.prune_nonces(0).await.expect("prune"), 0);
    // The migration's time says since when nonces are recorded.
    let since = a.nonces_recorded_since().await.expect("since");
    assert!(since > 1_600_000_000, "{since}");
    assert_eq!(b.nonces_recorded_since().await.expect("since"), since);
}

#[tokio::test]
async fn nonces_on_sqlite() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = tandem_db::DatabaseUrl::Sqlite(dir.path().join("t.db"));
    let a = tandem_db::open(&url).await.expect("open");
    let b = tandem_db::open(&url).await.expect("open again");
    nonces(a, b).await;
}

#[tokio::test]
async fn nonces_on_postgres() {
    let Some(server) = tandem_db::scratch::test_server() else {
        return;
    };
    let url = tandem_db::scratch::create(&server)
        .await
        .expect("scratch database");
    let a = tandem_db::open(&url).await.expect("open");
    let b = tandem_db::open(&url).await.expect("open again");
    nonces(a, b).await;
}
