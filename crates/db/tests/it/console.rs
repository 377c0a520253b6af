//! The admin console's queries (sessions, device search and paging, audit search), one
//! story on both back-ends.

use tandem_db::{AuditSearch, Db, DeviceQuery, DeviceRow, DeviceSort, NewAudit, SessionRow};
use tandem_proto::fleet::{DeviceId, DeviceStatus};

async fn enroll(db: &dyn Db, user: &str, host: &str, at: u64) -> DeviceId {
    let token = format!("tok-{host}");
    db.add_enroll_token(&token, user, at, at + 3600)
        .await
        .expect("token");
    let row = DeviceRow::enrolling(
        DeviceId::generate(),
        tandem_proto::SigningKey::generate().public(),
        host,
        at,
    );
    db.enroll(&token, &row, at).await.expect("enroll");
    row.id
}

fn hosts(p: &tandem_db::DevicePage) -> Vec<String> {
    p.devices.iter().map(|d| d.hostname.clone()).collect()
}

async fn story(db: &dyn Db) {
    // Sessions: found by hash until they expire, gone after sign-out or pruning.
    let s = SessionRow {
        admin: "alice".into(),
        csrf: "c1".into(),
        created_at: 100,
        expires_at: 200,
    };
    db.create_session("h1", &s).await.expect("create");
    assert_eq!(db.session("h1", 150).await.expect("read"), Some(s.clone()));
    assert_eq!(db.session("h1", 200).await.expect("read"), None, "expired");
    assert_eq!(db.session("nope", 150).await.expect("read"), None);
    db.create_session("h2", &s).await.expect("create");
    db.delete_session("h2").await.expect("delete");
    assert_eq!(db.session("h2", 150).await.expect("read"), None);
    assert_eq!(db.prune_sessions(300).await.expect("prune"), 1);
    assert_eq!(db.session("h1", 150).await.expect("read"), None);

    // Devices: search, filters, sort and pages are done by the database.
    db.create_user("ann", "default", 1).await.expect("user");
    db.create_user("bob", "default", 1).await.expect("user");
    let mut ids = Vec::new();
    for i in 0..7u64 {
        let user = if i % 2 == 0 { "ann" } else { "bob" };
        ids.push(enroll(db, user, &format!("lap_{i}"), 10 + i).await);
    }
    enroll(db, "bob", "desk-100%", 30).await;
    let all = db
        .device_page(&DeviceQuery {
            limit: 3,
            ..Default::default()
        })
        .await
        .expect("page");
    assert_eq!(all.total, 8);
    assert_eq!(hosts(&all), ["lap_0", "lap_1", "lap_2"]);
    let page3 = db
        .device_page(&DeviceQuery {
            limit: 3,
            offset: 6,
            ..Default::default()
        })
        .await
        .expect("page");
    assert_eq!(hosts(&page3), ["lap_6", "desk-100%"]);
    // Case-insensitive substring; `_` and `%` are literal.
    let q = |search: &str| DeviceQuery {
        search: Some(search.into()),
        limit: 50,
        ..Default::default()
    };
    assert_eq!(db.device_page(&q("lap_")).await.expect("q").total, 7);
    assert_eq!(
        hosts(&db.device_page(&q("0%")).await.expect("q")),
        ["desk-100%"]
    );
    assert_eq!(db.device_page(&q("p%1")).await.expect("q").total, 0);
    assert_eq!(db.device_page(&q("ANN")).await.expect("q").total, 4);
    let by_id = db
        .device_page(&q(&ids[3].to_string()[..12]))
        .await
        .expect("q");
    assert_eq!(hosts(&by_id), ["lap_3"]);
    let desc = db
        .device_page(&DeviceQuery {
            user: Some("bob".into()),
            sort: DeviceSort::Hostname,
            descending: true,
            limit: 50,
            ..Default::default()
        })
        .await
        .expect("q");
    assert_eq!(hosts(&desc), ["lap_5", "lap_3", "lap_1", "desk-100%"]);

    // Leases and last contact.
    db.record_checkin(
        ids[0],
        DeviceStatus::Active,
        1000,
        "{}",
        Some(5000),
        vec![],
        None,
    )
    .await
    .expect("checkin");
    db.record_checkin(
        ids[1],
        DeviceStatus::Active,
        2000,
        "{}",
        Some(9000),
        vec![],
        None,
    )
    .await
    .expect("checkin");
    let expiring = db
        .device_page(&DeviceQuery {
            lease_from: Some(4000),
            lease_until: Some(6000),
            limit: 50,
            ..Default::default()
        })
        .await
        .expect("q");
    assert_eq!(hosts(&expiring), ["lap_0"]);
    let stale = db
        .device_page(&DeviceQuery {
            not_seen_since: Some(1500),
            sort: DeviceSort::LastCheckin,
            limit: 50,
            ..Default::default()
        })
        .await
        .expect("q");
    assert_eq!(stale.total, 7, "all but the one seen at 2000");
    assert_eq!(stale.devices[0].hostname, "lap_0", "checked-in rows first");
    db.order_kill(ids[2], "admin:alice", "lost", 3000)
        .await
        .expect("kill");
    let counts = db.device_counts().await.expect("counts");
    assert!(counts.contains(&(DeviceStatus::Active, 7)), "{counts:?}");
    assert!(
        counts.contains(&(DeviceStatus::KillPending, 1)),
        "{counts:?}"
    );
    let pending = db
        .device_page(&DeviceQuery {
            status: Some(DeviceStatus::KillPending),
            limit: 50,
            ..Default::default()
        })
        .await
        .expect("q");
    assert_eq!(hosts(&pending), ["lap_2"]);

    // Audit search: newest first, prefix filters, pages by id.
    for (actor, action, dev) in [
        ("admin:Alice", "device.kill-ordered", Some(ids[2])),
        ("admin:bob", "user.assigned", None),
        ("device:x", "device.checked-in", Some(ids[0])),
        ("admin:Alice", "policy.set", None),
    ] {
        db.append_audit(NewAudit {
            at: 5,
            actor: actor.into(),
            action: action.into(),
            device: dev,
            reason: None,
            detail: serde_json::json!({}),
        })
        .await
        .expect("audit");
    }
    let actions = |v: Vec<tandem_proto::fleet::AuditEntry>| {
        v.into_iter().map(|e| e.action).collect::<Vec<_>>()
    };
    let alice = db
        .audit_search(&AuditSearch {
            actor: Some("admin:alice".into()),
            ..Default::default()
        })
        .await
        .expect("audit");
    assert_eq!(
        actions(alice.clone()),
        ["policy.set", "device.kill-ordered"]
    );
    let older = db
        .audit_search(&AuditSearch {
            actor: Some("admin:".into()),
            before_id: Some(alice[0].id),
            limit: Some(1),
            ..Default::default()
        })
        .await
        .expect("audit");
    assert_eq!(actions(older), ["user.assigned"]);
    let dev = db
        .audit_search(&AuditSearch {
            device: Some(ids[0]),
            action: Some("device.".into()),
            ..Default::default()
        })
        .await
        .expect("audit");
    assert_eq!(actions(dev), ["device.checked-in"]);
}

#[tokio::test]
async fn console_queries_on_sqlite() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = tandem_db::open(&tandem_db::DatabaseUrl::Sqlite(dir.path().join("t.db")))
        .await
        .expect("open");
    story(db.as_ref()).await;
}

#[tokio::test]
async fn console_queries_on_postgres() {
    let Some(server) = tandem_db::scratch::test_server() else {
        return;
    };
    let url = tandem_db::scratch::create(&server)
        .await
        .expect("scratch database");
    let db = tandem_db::open(&url).await.expect("open");
    story(db.as_ref()).await;
}
