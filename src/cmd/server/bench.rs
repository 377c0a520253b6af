//! `tandem server bench-checkin` (hidden): the load generator of `bench/checkin/`.
//! Enrolls N simulated devices (each with its own key, through the real enrollment API),
//! then has them check in concurrently with real signed requests, and prints check-ins
//! per second and latency percentiles. Every answer's target state is verified, so a
//! fast error path cannot pass for a fast check-in.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tandem_proto::auth::{self, RequestSignature};
use tandem_proto::fleet::{
    self, CheckinRequest, CheckinResponse, CreateToken, CreateUser, DeviceId, EnrollRequest,
    EnrollResponse, TargetState, TokenCreated, UserInfo,
};
use tandem_proto::SigningKey;
use tandem_tools::clock::now_secs as now;

use crate::cmd::admin::AdminClient;
use crate::output::{print_json, Global};

/// Arguments of the load generator.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Server URL.
    #[arg(long)]
    server: String,
    /// Admin credential.
    #[arg(long, env = "TANDEM_ADMIN_TOKEN", hide_env_values = true)]
    token: String,
    /// Simulated devices to enroll.
    #[arg(long, default_value_t = 1000)]
    devices: usize,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Check-ins per device.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// Print one JSON document.
    #[arg(long)]
    json: bool,
}

struct Sim {
    id: DeviceId,
    key: SigningKey,
}

/// Runs the load generator.
pub fn run(args: BenchArgs, _global: &Global) -> anyhow::Result<u8> {
    crate::output::block_on(bench(args))?
}

async fn bench(a: BenchArgs) -> anyhow::Result<u8> {
    let admin = AdminClient::new(&a.server, &a.token)?;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(a.concurrency)
        .timeout(Duration::from_secs(120))
        .build()?;
    let user = format!("bench-{}", &DeviceId::generate().to_string()[..8]);
    let _: UserInfo = admin
        .call(
            reqwest::Method::POST,
            "/v1/admin/users",
            Some(&CreateUser {
                name: user.clone(),
                policy: None,
            }),
        )
        .await?;
    // Enroll.
    let t0 = Instant::now();
    let admin = Arc::new(admin);
    let sims = parallel(a.devices, a.concurrency, {
        let (admin, http, server, user) =
            (admin.clone(), http.clone(), a.server.clone(), user.clone());
        move |i| {
            let (admin, http, server, user) =
                (admin.clone(), http.clone(), server.clone(), user.clone());
            async move {
                let t: TokenCreated = admin
                    .call(
                        reqwest::Method::POST,
                        "/v1/admin/tokens",
                        Some(&CreateToken {
                            user,
                            ttl_secs: Some(3600),
                        }),
                    )
                    .await?;
                let key = SigningKey::generate();
                let resp = http
                    .post(format!("{server}/v1/enroll"))
                    .json(&EnrollRequest {
                        token: t.token,
                        device_key: key.public(),
                        hostname: format!("sim-{i}"),
                    })
                    .send()
                    .await?
                    .error_for_status()?;
                let e: EnrollResponse = resp.json().await?;
                anyhow::Ok((Sim { id: e.device, key }, e.keys.state))
            }
        }
    })
    .await?;
    let enroll_secs = t0.elapsed().as_secs_f64();
    let state_key = sims
        .first()
        .map(|(_, k)| k.clone())
        .context("no devices enrolled (--devices 0?)")?;
    let sims: Arc<Vec<Sim>> = Arc::new(sims.into_iter().map(|(s, _)| s).collect());
    eprintln!(
        "tandem: enrolled {} devices in {enroll_secs:.1}s; checking in",
        sims.len()
    );

    // Check in.
    let total = sims.len() * a.rounds;
    let t1 = Instant::now();
    let latencies = parallel(total, a.concurrency, {
        let (sims, http, server) = (sims.clone(), http.clone(), a.server.clone());
        move |i| {
            let (sims, http, server, state_key) = (
                sims.clone(),
                http.clone(),
                server.clone(),
                state_key.clone(),
            );
            async move {
                let sim = &sims[i % sims.len()];
                let body = serde_json::to_vec(&CheckinRequest {
                    agent_version: "bench".into(),
                    clock: now(),
                    ..Default::default()
                })?;
                let sig = RequestSignature::sign(
                    &sim.key,
                    &sim.id.to_string(),
                    "POST",
                    "/v1/checkin",
                    now(),
                    &body,
                );
                let start = Instant::now();
                let resp = http
                    .post(format!("{server}/v1/checkin"))
                    .header(auth::HEADER_DEVICE, sig.device)
                    .header(auth::HEADER_TIME, sig.time.to_string())
                    .header(auth::HEADER_NONCE, sig.nonce)
                    .header(auth::HEADER_SIGNATURE, sig.signature)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await?
                    .error_for_status()?;
                let r: CheckinResponse = resp.json().await?;
                let elapsed = start.elapsed();
                let t: TargetState = r
                    .target
                    .verify(fleet::KIND_TARGET_STATE, std::slice::from_ref(&state_key))?;
                anyhow::ensure!(
                    t.device == sim.id && t.lease.is_some(),
                    "wrong target state"
                );
                anyhow::Ok(elapsed)
            }
        }
    })
    .await?;
    let secs = t1.elapsed().as_secs_f64();
    let mut ms: Vec<f64> = latencies.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    ms.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| ms[((ms.len() as f64 - 1.0) * p).round() as usize];
    let out = serde_json::json!({
        "devices": sims.len(),
        "concurrency": a.concurrency,
        "checkins": ms.len(),
        "seconds": secs,
        "checkins_per_sec": ms.len() as f64 / secs,
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "enroll_seconds": enroll_secs,
    });
    if a.json {
        print_json(&out)?;
    } else {
        println!(
            "{} check-ins from {} devices in {secs:.2}s: {:.0}/s, p50 {:.2} ms, p99 {:.2} ms",
            ms.len(),
            sims.len(),
            ms.len() as f64 / secs,
            pct(0.50),
            pct(0.99)
        );
    }
    Ok(crate::exit::SUCCESS)
}

/// Runs `f(0..n)` with at most `c` in flight; fails on the first error.
async fn parallel<T, F, Fut>(n: usize, c: usize, f: F) -> anyhow::Result<Vec<T>>
where
    T: Send + 'static,
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = anyhow::Result<T>> + Send + 'static,
{
    let next = Arc::new(AtomicUsize::new(0));
    let f = Arc::new(f);
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..c.max(1) {
        let (next, f) = (next.clone(), f.clone());
        set.spawn(async move {
            let mut out = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return anyhow::Ok(out);
                }
                out.push((i, f(i).await?));
            }
        });
    }
    let mut all = Vec::with_capacity(n);
    while let Some(r) = set.join_next().await {
        all.extend(r.context("load task panicked")??);
    }
    all.sort_by_key(|(i, _)| *i);
    Ok(all.into_iter().map(|(_, t)| t).collect())
}
