//! One check-in, and the loop that repeats it with jitter and backoff.
//!
//! A check-in sends the device's status, receives a [`TargetState`] signed by the
//! server's state key, verifies it against the pinned key and this device's id, raises
//! the trusted-time high-water mark to the server's signing time, stores the lease and
//! the target state, executes a kill order (verified with the pinned kill key) if there
//! is one, and hands the target to the [`Hooks`] (image pulls, VM policy).
//!
//! Files: `<dir>/state/target.json` (`tandem-target-v1`, the signed envelope as
//! received), `<dir>/state/lease.json` (`tandem-lease-v1`), `<dir>/state/checkin.json`
//! (`tandem-checkin-v1`: last success, last error).

use std::future::Future;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tandem_proto::fleet::{
    self, CheckinRequest, CheckinResponse, DeviceId, KillAckRequest, KillOrder, Lease, TargetState,
};

use crate::client::{self, ClientError};
use crate::fsutil::{self, FileError};
use crate::identity::{Identity, IdentityError};
use crate::kill::{self, CorporateVms, KillError};
use crate::lease::{self, StoredLease};
use crate::AgentDir;

const TARGET_FORMAT: &str = "tandem-target-v1";
const CHECKIN_FORMAT: &str = "tandem-checkin-v1";

/// What the rest of the agent contributes to a check-in. The VM supervisor and the image
/// sync implement it; every method has a do-nothing default.
pub trait Hooks: CorporateVms {
    /// Fills in images held, VM states and last backup.
    fn status(&self, _report: &mut CheckinRequest) {}
    /// Acts on a verified target state: pull newly assigned image versions (image sync),
    /// pass policy and device controls to the VM specs. Errors are logged and retried at
    /// the next check-in; they never undo the lease.
    fn apply_target(&self, _target: &TargetState) -> Result<(), HookError> {
        Ok(())
    }
    /// Told every minute by the run loop what a running corporate VM must do under the
    /// lease: run, warn the user, shut down cleanly within the grace period, or stop.
    fn enforce_lease(&self, _what: lease::Enforcement) {}
}

impl Hooks for kill::NoVms {}

/// A hook could not act on the target state.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    /// The VM layer failed.
    #[error(transparent)]
    Vm(#[from] tandem_vm::VmError),
}

/// A check-in failed.
#[derive(Debug, thiserror::Error)]
pub enum CheckinError {
    /// Not enrolled, or identity damaged.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// The server could not be reached or refused.
    #[error("check-in failed: {0}")]
    Client(#[from] ClientError),
    /// The target state, lease or kill order does not verify with the pinned keys.
    #[error("check-in refused the server's answer: the {what} is forged or altered ({source})")]
    Forged {
        /// Which artifact.
        what: &'static str,
        /// Why.
        source: tandem_proto::SignError,
    },
    /// A signed artifact names another device.
    #[error(
        "check-in refused the server's answer: the {what} is for device {device}, not this one"
    )]
    WrongDevice {
        /// Which artifact.
        what: &'static str,
        /// The device it names.
        device: DeviceId,
    },
    /// The target state is older than the one we hold (a replay).
    #[error("check-in refused the server's answer: target state from {got} is older than the one held ({held})")]
    Stale {
        /// Its signing time.
        got: u64,
        /// The held one's.
        held: u64,
    },
    /// Executing a kill failed.
    #[error(transparent)]
    Kill(#[from] KillError),
    /// A state file failed.
    #[error(transparent)]
    File(#[from] FileError),
}

impl CheckinError {
    /// Whether retrying soon can help.
    pub fn is_temporary(&self) -> bool {
        matches!(self, CheckinError::Client(c) if c.is_temporary())
    }
}

/// The result of one check-in.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// The target state was applied.
    Applied {
        /// The verified target.
        target: Box<TargetState>,
        /// The verified lease, if one was issued.
        lease: Option<Lease>,
        /// Error from [`Hooks::apply_target`], if any.
        hook_error: Option<String>,
        /// Assigned image versions pulled (or found, or failed).
        pulls: Vec<crate::images::PullResult>,
    },
    /// The device executed a kill and the server has the acknowledgement.
    Killed,
}

/// When the last check-in succeeded or failed.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct CheckinLog {
    /// Last successful check-in (device clock).
    pub last_success: Option<u64>,
    /// Last attempt.
    pub last_attempt: Option<u64>,
    /// The error of the last attempt, if it failed.
    pub last_error: Option<String>,
}

/// Reads the check-in log.
pub fn log(dir: &AgentDir) -> Result<CheckinLog, FileError> {
    Ok(fsutil::read_state(&dir.state().join("checkin.json"), CHECKIN_FORMAT)?.unwrap_or_default())
}

fn write_log(dir: &AgentDir, l: &CheckinLog) -> Result<(), FileError> {
    fsutil::write_state(&dir.state().join("checkin.json"), CHECKIN_FORMAT, l)
}

#[derive(Debug, Serialize, Deserialize)]
struct StoredTarget {
    target: tandem_proto::Signed,
}

/// The last verified target state, if any (re-verified on read).
pub fn current_target(dir: &AgentDir) -> Result<Option<TargetState>, CheckinError> {
    let Some(stored) =
        fsutil::read_state::<StoredTarget>(&dir.state().join("target.json"), TARGET_FORMAT)?
    else {
        return Ok(None);
    };
    let id = Identity::load(dir)?;
    verify_target(&id, &stored.target).map(Some)
}

fn verify_target(id: &Identity, env: &tandem_proto::Signed) -> Result<TargetState, CheckinError> {
    let t: TargetState = env
        .verify(
            fleet::KIND_TARGET_STATE,
            std::slice::from_ref(&id.info.keys.state),
        )
        .map_err(|source| CheckinError::Forged {
            what: "target state",
            source,
        })?;
    if t.device != id.info.device {
        return Err(CheckinError::WrongDevice {
            what: "target state",
            device: t.device,
        });
    }
    Ok(t)
}

/// Applies a signed target state received from the server: verification, high-water
/// mark, lease, kill. Public so tests can feed it hostile input directly.
pub async fn apply(
    dir: &AgentDir,
    id: &Identity,
    http: &reqwest::Client,
    env: &tandem_proto::Signed,
    hooks: &dyn Hooks,
) -> Result<Outcome, CheckinError> {
    let target = verify_target(id, env)?;
    if let Some(held) =
        fsutil::read_state::<StoredTarget>(&dir.state().join("target.json"), TARGET_FORMAT)?
            .and_then(|s| verify_target(id, &s.target).ok())
    {
        if target.issued_at < held.issued_at {
            return Err(CheckinError::Stale {
                got: target.issued_at,
                held: held.issued_at,
            });
        }
    }
    lease::raise_high_water(dir, target.issued_at)?;
    if let Some(k) = &target.kill {
        let order: KillOrder = k
            .verify(
                fleet::KIND_KILL_ORDER,
                std::slice::from_ref(&id.info.keys.kill),
            )
            .map_err(|source| CheckinError::Forged {
                what: "kill order",
                source,
            })?;
        if order.device != id.info.device {
            return Err(CheckinError::WrongDevice {
                what: "kill order",
                device: order.device,
            });
        }
        let ack = kill::execute(dir, id, &order, hooks)?;
        send_ack(dir, id, http, ack).await?;
        return Ok(Outcome::Killed);
    }
    let lease = match &target.lease {
        Some(l) => {
            let lease: Lease = l
                .verify(fleet::KIND_LEASE, std::slice::from_ref(&id.info.keys.state))
                .map_err(|source| CheckinError::Forged {
                    what: "lease",
                    source,
                })?;
            if lease.device != id.info.device {
                return Err(CheckinError::WrongDevice {
                    what: "lease",
                    device: lease.device,
                });
            }
            fsutil::write_state(
                &dir.state().join("lease.json"),
                lease::LEASE_FORMAT,
                &StoredLease { lease: l.clone() },
            )?;
            Some(lease)
        }
        None => None,
    };
    fsutil::write_state(
        &dir.state().join("target.json"),
        TARGET_FORMAT,
        &StoredTarget {
            target: env.clone(),
        },
    )?;
    let hook_error = hooks.apply_target(&target).err().map(|e| e.to_string());
    if let Some(e) = &hook_error {
        tracing::warn!(
            error = e,
            "applying the target state failed; retrying at next check-in"
        );
    }
    Ok(Outcome::Applied {
        target: Box::new(target),
        lease,
        hook_error,
        pulls: Vec::new(),
    })
}

async fn send_ack(
    dir: &AgentDir,
    id: &Identity,
    http: &reqwest::Client,
    ack: tandem_proto::Signed,
) -> Result<(), CheckinError> {
    let res: Result<serde_json::Value, ClientError> = client::signed(
        http,
        id,
        reqwest::Method::POST,
        "/v1/kill-ack",
        Some(&KillAckRequest { ack }),
    )
    .await;
    match res {
        Ok(_) => {}
        // Accepted earlier, answer lost: the server already refuses us as killed.
        Err(e) if e.code() == Some("device_killed") => {}
        Err(e) => return Err(e.into()),
    }
    if let Some(mut rec) = kill::record(dir)? {
        rec.acknowledged = true;
        kill::save_record(dir, &rec)?;
    }
    Identity::destroy_key(dir)?;
    tracing::warn!("kill acknowledged by the server; device key destroyed");
    Ok(())
}

/// One check-in now.
#[tracing::instrument(skip_all, fields(dir = %dir.root().display()))]
pub async fn checkin_once(dir: &AgentDir, hooks: &dyn Hooks) -> Result<Outcome, CheckinError> {
    let http = client::http()?;
    if let Some(rec) = kill::record(dir)? {
        if rec.acknowledged {
            return Ok(Outcome::Killed);
        }
        // A kill was interrupted (crash or network): finish it, then acknowledge.
        let id = Identity::load(dir)?;
        let ack = match rec.ack {
            Some(a) => a,
            None => kill::execute(dir, &id, &rec.order, hooks)?,
        };
        send_ack(dir, &id, &http, ack).await?;
        return Ok(Outcome::Killed);
    }
    let id = std::sync::Arc::new(Identity::load(dir)?);
    let now = crate::now();
    let mut report = CheckinRequest {
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        clock: now,
        images: crate::images::held(dir),
        ..Default::default()
    };
    hooks.status(&mut report);
    let mut log_entry = log(dir)?;
    log_entry.last_attempt = Some(now);
    let res: Result<CheckinResponse, ClientError> = client::signed(
        &http,
        &id,
        reqwest::Method::POST,
        "/v1/checkin",
        Some(&report),
    )
    .await;
    let mut result = match res {
        Ok(resp) => apply(dir, &id, &http, &resp.target, hooks).await,
        Err(e) => Err(e.into()),
    };
    if let Ok(Outcome::Applied { target, pulls, .. }) = &mut result {
        *pulls = crate::images::pull_assigned(dir, id.clone(), target).await;
        // A bundle that fails to update leaves the previous one in use; retried next time.
        if let Err(e) = crate::rules::sync(dir, &id, &http, target.rules_version).await {
            tracing::warn!(error = %e, "scan rule bundle not updated");
        }
    }
    match &result {
        Ok(_) => {
            log_entry.last_success = Some(now);
            log_entry.last_error = None;
        }
        Err(e) => log_entry.last_error = Some(e.to_string()),
    }
    if !matches!(result, Ok(Outcome::Killed)) {
        write_log(dir, &log_entry)?;
    }
    result
}

/// Options of the check-in loop.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Check in this often instead of the policy's interval.
    pub interval: Option<Duration>,
}

/// Checks in until `shutdown` resolves or the device is killed: at the policy interval
/// (±10 % jitter so a fleet does not call in lockstep), backing off exponentially from
/// 5 s on temporary failures. Offline, the agent keeps running on its current lease.
pub async fn run(
    dir: &AgentDir,
    hooks: &dyn Hooks,
    opts: RunOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<(), CheckinError> {
    tokio::pin!(shutdown);
    let mut enforcer = Enforcer::default();
    let mut failures: u32 = 0;
    let mut interval = opts.interval.unwrap_or(Duration::from_secs(3600));
    loop {
        let wait = match checkin_once(dir, hooks).await {
            Ok(Outcome::Killed) => {
                tracing::warn!("device killed; agent stops");
                return Ok(());
            }
            Ok(Outcome::Applied { target, lease, .. }) => {
                failures = 0;
                if opts.interval.is_none() {
                    interval =
                        Duration::from_secs(u64::from(target.policy.checkin_interval_mins) * 60);
                }
                tracing::info!(
                    not_after = lease.as_ref().map(|l| l.not_after),
                    next_secs = interval.as_secs(),
                    "checked in"
                );
                jitter(interval)
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                let lease = lease::check(dir, crate::now());
                tracing::warn!(error = %e, temporary = e.is_temporary(), lease_ok = lease.is_ok(), "check-in failed; working offline on the current lease");
                jitter(retry_after(failures, e.is_temporary(), interval))
            }
        };
        // Between check-ins, re-evaluate the lease every minute so a running corporate
        // VM is warned, then shut down within the grace period, even when offline.
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            enforce(dir, hooks, &mut enforcer);
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                break;
            }
            tokio::select! {
                _ = &mut shutdown => return Ok(()),
                _ = tokio::time::sleep(left.min(ENFORCE_EVERY)) => {}
            }
        }
    }
}

/// How often the run loop re-evaluates the lease for a running corporate VM.
const ENFORCE_EVERY: Duration = Duration::from_secs(60);

/// What the enforcer remembers between evaluations.
#[derive(Debug, Default)]
struct Enforcer {
    expired_since: Option<u64>,
    last: Option<lease::Enforcement>,
}

fn enforce(dir: &AgentDir, hooks: &dyn Hooks, st: &mut Enforcer) {
    let now = crate::now();
    let gate = lease::check(dir, now);
    if matches!(gate, Err(lease::LeaseError::Expired { .. })) {
        st.expired_since.get_or_insert(now);
    } else {
        st.expired_since = None;
    }
    let e = lease::enforcement(&gate, now, st.expired_since);
    let changed = std::mem::discriminant(&e)
        != st.last.as_ref().map_or(
            std::mem::discriminant(&lease::Enforcement::Run),
            std::mem::discriminant,
        );
    if changed {
        match (&e, &gate) {
            (lease::Enforcement::Run, _) => tracing::info!("lease valid; corporate VM may run"),
            (lease::Enforcement::Warn { secs_left }, _) => {
                tracing::warn!(
                    secs_left,
                    "lease ends soon; connect to the network to renew it"
                )
            }
            (lease::Enforcement::Shutdown { grace_left }, _) => {
                tracing::warn!(grace_left, "lease ended; the corporate VM must shut down")
            }
            (lease::Enforcement::Stop, Err(why)) => {
                tracing::warn!(reason = %why, "corporate VM may not run")
            }
            (lease::Enforcement::Stop, Ok(_)) => {}
        }
    }
    st.last = Some(e);
    hooks.enforce_lease(e);
}

/// How long to wait after the `failures`-th failure in a row: 5 s doubling up to the
/// check-in interval for temporary failures, the interval itself for permanent ones
/// (retrying a refused request sooner cannot help).
fn retry_after(failures: u32, temporary: bool, interval: Duration) -> Duration {
    if !temporary {
        return interval;
    }
    Duration::from_secs(5)
        .saturating_mul(2u32.saturating_pow(failures.clamp(1, 16) - 1))
        .min(interval)
}

fn jitter(d: Duration) -> Duration {
    let f: f64 = rand::Rng::gen_range(&mut rand::thread_rng(), 0.9..1.1);
    d.mul_f64(f)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::fixture;
    use tandem_proto::fleet::{Assignments, Policy};
    use tandem_proto::SigningKey;

    fn target(f: &crate::testkit::Fixture, issued_at: u64) -> TargetState {
        TargetState {
            device: f.device,
            issued_at,
            assignments: Assignments::default(),
            policy_name: "default".into(),
            policy: Policy::default(),
            lease: Some(f.state_key.sign(
                fleet::KIND_LEASE,
                &Lease {
                    device: f.device,
                    issued_at,
                    not_after: issued_at + 86_400,
                    policy_hash: Policy::default().hash(),
                },
            )),
            kill: None,
            rules_version: None,
        }
    }

    async fn apply_env(
        f: &crate::testkit::Fixture,
        env: &tandem_proto::Signed,
    ) -> Result<Outcome, CheckinError> {
        let id = Identity::load(&f.dir).expect("identity");
        let http = client::http().expect("http");
        apply(&f.dir, &id, &http, env, &kill::NoVms).await
    }

    #[test]
    fn backoff_doubles_from_five_seconds_up_to_the_interval() {
        let hour = Duration::from_secs(3600);
        let waits: Vec<u64> = (1..=11)
            .map(|n| retry_after(n, true, hour).as_secs())
            .collect();
        assert_eq!(waits, [5, 10, 20, 40, 80, 160, 320, 640, 1280, 2560, 3600]);
        assert_eq!(retry_after(1, false, hour), hour);
        assert_eq!(retry_after(u32::MAX, true, hour), hour);
        let d = jitter(Duration::from_secs(100));
        assert!(
            d >= Duration::from_secs(90) && d <= Duration::from_secs(110),
            "{d:?}"
        );
    }

    #[tokio::test]
    async fn valid_target_stores_lease_and_raises_trusted_time() {
        let f = fixture();
        let env = f
            .state_key
            .sign(fleet::KIND_TARGET_STATE, &target(&f, 5000));
        let out = apply_env(&f, &env).await.expect("applies");
        assert!(matches!(out, Outcome::Applied { lease: Some(_), .. }));
        assert_eq!(lease::high_water(&f.dir).expect("hw"), 5000);
        assert!(lease::check(&f.dir, 5001).is_ok());
        assert_eq!(
            current_target(&f.dir).expect("read"),
            Some(target(&f, 5000))
        );
    }

    #[tokio::test]
    async fn forged_altered_foreign_and_stale_targets_are_refused() {
        let f = fixture();
        let mut altered = f
            .state_key
            .sign(fleet::KIND_TARGET_STATE, &target(&f, 5000));
        altered.payload = altered
            .payload
            .replace("\"lease_days\":14", "\"lease_days\":999");
        assert!(matches!(
            apply_env(&f, &altered).await,
            Err(CheckinError::Forged { .. })
        ));
        let forger = SigningKey::generate();
        let mut forged = forger.sign(fleet::KIND_TARGET_STATE, &target(&f, 5000));
        forged.key_id = f.state_key.public().id();
        assert!(matches!(
            apply_env(&f, &forged).await,
            Err(CheckinError::Forged { .. })
        ));
        let mut other = target(&f, 5000);
        other.device = fleet::DeviceId::generate();
        let env = f.state_key.sign(fleet::KIND_TARGET_STATE, &other);
        assert!(matches!(
            apply_env(&f, &env).await,
            Err(CheckinError::WrongDevice { .. })
        ));
        // Nothing of the refused answers was stored.
        assert!(matches!(
            lease::check(&f.dir, 5001),
            Err(lease::LeaseError::Missing)
        ));

        let newer = f
            .state_key
            .sign(fleet::KIND_TARGET_STATE, &target(&f, 6000));
        apply_env(&f, &newer).await.expect("applies");
        let replay = f
            .state_key
            .sign(fleet::KIND_TARGET_STATE, &target(&f, 5000));
        assert!(matches!(
            apply_env(&f, &replay).await,
            Err(CheckinError::Stale { .. })
        ));
    }

    #[tokio::test]
    async fn kill_order_signed_with_the_wrong_key_erases_nothing() {
        let f = fixture();
        std::fs::create_dir_all(f.dir.keys()).expect("mkdir");
        std::fs::write(f.dir.keys().join("store.key"), b"k").expect("write");
        let mut t = target(&f, 5000);
        t.lease = None;
        let order = KillOrder {
            device: f.device,
            ordered_at: 4000,
            actor: "admin:x".into(),
            reason: "test".into(),
        };
        // The state key may sign target states, not kill orders.
        t.kill = Some(f.state_key.sign(fleet::KIND_KILL_ORDER, &order));
        let env = f.state_key.sign(fleet::KIND_TARGET_STATE, &t);
        assert!(matches!(
            apply_env(&f, &env).await,
            Err(CheckinError::Forged {
                what: "kill order",
                ..
            })
        ));
        assert!(f.dir.keys().join("store.key").exists());
        assert!(!kill::is_killed(&f.dir).expect("read"));
        // With the kill key it executes (the ack then fails: no server on port 1).
        t.kill = Some(f.kill_key.sign(fleet::KIND_KILL_ORDER, &order));
        let env = f.state_key.sign(fleet::KIND_TARGET_STATE, &t);
        let err = apply_env(&f, &env).await.expect_err("ack cannot be sent");
        assert!(err.is_temporary(), "{err}");
        assert!(!f.dir.keys().exists());
        let rec = kill::record(&f.dir).expect("read").expect("killed");
        assert!(rec.ack.is_some() && !rec.acknowledged);
    }
}
