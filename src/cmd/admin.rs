//! `tandem admin`: fleet administration against a running server, authenticated with the
//! admin credential printed at the server's first start.

use anyhow::Context as _;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tandem_proto::api::ApiErrorBody;
use tandem_proto::fleet::{
    Assign, AuditEntry, CreateToken, CreateUser, DeviceInfo, ImageRef, KillRequest, Policy,
    PolicyInfo, SetPolicy, TokenCreated, UserInfo,
};
use tandem_tools::clock::now_secs as now;

use crate::output::{print_json, Global};

/// Arguments of `tandem admin`.
#[derive(Debug, clap::Args)]
pub struct AdminArgs {
    /// Server URL, e.g. http://127.0.0.1:8080.
    #[arg(
        long,
        env = "TANDEM_SERVER",
        global = true,
        default_value = "http://127.0.0.1:8080"
    )]
    server: String,
    /// Admin credential (printed at the server's first start).
    #[arg(
        long,
        env = "TANDEM_ADMIN_TOKEN",
        hide_env_values = true,
        global = true
    )]
    token: Option<String>,
    /// Print one JSON document on stdout.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: AdminCommand,
}

#[derive(Debug, clap::Subcommand)]
enum AdminCommand {
    /// Users: the people whose devices enroll.
    #[command(subcommand)]
    User(UserCmd),
    /// One-time enrollment tokens.
    #[command(subcommand)]
    Token(TokenCmd),
    /// Devices: list, show, kill, replace.
    #[command(subcommand)]
    Device(DeviceCmd),
    /// Backups of users' corporate disks.
    #[command(subcommand)]
    Backups(BackupsCmd),
    /// Assign images and a policy to a user.
    Assign {
        /// The user.
        #[arg(long)]
        user: String,
        /// Corporate gold image, IMAGE:VERSION.
        #[arg(long, value_parser = parse_image_ref)]
        corporate: Option<ImageRef>,
        /// Personal base image, IMAGE:VERSION.
        #[arg(long, value_parser = parse_image_ref)]
        personal: Option<ImageRef>,
        /// Policy name.
        #[arg(long)]
        policy: Option<String>,
        /// Why, for the audit log.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Named policies: lease length, check-in interval, device controls.
    #[command(subcommand)]
    Policy(PolicyCmd),
    /// Revoke an admin credential by name (never the last one); it is refused at once.
    RevokeAdmin {
        /// The credential's name (`admin` for the first one).
        name: String,
    },
    /// Read the audit log.
    Audit {
        /// Only this device.
        #[arg(long)]
        device: Option<String>,
        /// Only entries since: a duration ago (`1h`, `2days`), unix seconds, or RFC 3339.
        #[arg(long)]
        since: Option<String>,
        /// At most this many (newest).
        #[arg(long)]
        limit: Option<u32>,
    },
}

#[derive(Debug, clap::Subcommand)]
enum UserCmd {
    /// Create a user.
    Create {
        /// Unique name.
        name: String,
        /// Policy (default `default`).
        #[arg(long)]
        policy: Option<String>,
    },
    /// List users.
    List,
}

#[derive(Debug, clap::Subcommand)]
enum TokenCmd {
    /// Create a one-time enrollment token for a user's device.
    Create {
        /// The user.
        #[arg(long)]
        user: String,
        /// Lifetime (default 1h, at most 7days).
        #[arg(long, default_value = "1h")]
        ttl: humantime::Duration,
    },
    /// End every unused enrollment token of a user (sent to the wrong person, not needed).
    Revoke {
        /// The user.
        #[arg(long)]
        user: String,
        /// Why, for the audit log.
        #[arg(long)]
        reason: Option<String>,
    },
}

#[derive(Debug, clap::Subcommand)]
enum DeviceCmd {
    /// List devices with last check-in and lease left.
    List,
    /// Show one device.
    Show {
        /// Device id.
        id: String,
    },
    /// Mark a device lost or stolen: at its next contact it erases its corporate data.
    Kill {
        /// Device id.
        id: String,
        /// Why (required; goes into the audit log).
        #[arg(long)]
        reason: String,
    },
    /// Move a user's corporate desktop to a new device (enrolled for the same user): the
    /// old one is killed; the new one restores the escrowed key and latest backup.
    Replace {
        /// The old device.
        old: String,
        /// The new device.
        new: String,
        /// Why (required; goes into the audit log).
        #[arg(long)]
        reason: String,
    },
}

#[derive(Debug, clap::Subcommand)]
enum BackupsCmd {
    /// List a user's backups (by user name or by one of the user's device ids).
    List {
        /// User name or device id.
        who: String,
    },
    /// Drop all but a user's newest backups and free their space (e.g. to get under the
    /// backup quota).
    Prune {
        /// User name or device id.
        who: String,
        /// How many of the newest backups stay.
        #[arg(long)]
        keep: u32,
        /// Why, for the audit log.
        #[arg(long)]
        reason: String,
    },
}

#[derive(Debug, clap::Subcommand)]
enum PolicyCmd {
    /// Create or change a policy (unset flags keep their current value).
    Set {
        /// Policy name.
        name: String,
        /// Lease length in days.
        #[arg(long)]
        lease_days: Option<u32>,
        /// Minutes between check-ins.
        #[arg(long)]
        checkin_mins: Option<u32>,
        /// Minutes between backups.
        #[arg(long)]
        backup_mins: Option<u32>,
        /// Most backup data stored per user, in MiB (0 = no limit; default 65536).
        #[arg(long)]
        backup_quota_mb: Option<u64>,
        /// Scan schedule (daily, weekly, never).
        #[arg(long)]
        scan: Option<String>,
        /// USB pass-through into the corporate VM.
        #[arg(long)]
        usb: Option<OnOff>,
        /// Clipboard sharing.
        #[arg(long)]
        clipboard: Option<OnOff>,
        /// Network for the corporate VM.
        #[arg(long)]
        network: Option<OnOff>,
        /// Why, for the audit log.
        #[arg(long)]
        reason: Option<String>,
    },
    /// List policies.
    List,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum OnOff {
    On,
    Off,
}

impl OnOff {
    fn on(self) -> bool {
        matches!(self, OnOff::On)
    }
}

fn parse_image_ref(s: &str) -> Result<ImageRef, String> {
    let (image, version) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("expected IMAGE:VERSION, got {s:?}"))?;
    let version = version
        .parse()
        .map_err(|_| format!("version in {s:?} must be a number"))?;
    Ok(ImageRef {
        image: image.to_string(),
        version,
    })
}

/// An authenticated HTTP client for the admin API.
pub struct AdminClient {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl AdminClient {
    /// A client for `server` with `token`.
    pub fn new(server: &str, token: &str) -> anyhow::Result<Self> {
        Ok(AdminClient {
            http: reqwest::Client::builder()
                .connect_timeout(std::time::Duration::from_secs(10))
                .timeout(std::time::Duration::from_secs(120))
                .build()?,
            base: server.trim_end_matches('/').to_string(),
            token: token.to_string(),
        })
    }

    /// Sends one request and decodes the answer or the server's error.
    pub async fn call<B: Serialize, R: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&B>,
    ) -> anyhow::Result<R> {
        let url = format!("{}{path}", self.base);
        let mut req = self.http.request(method, &url).bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req
            .send()
            .await
            .with_context(|| format!("cannot reach the server at {}", self.base))?;
        let status = resp.status();
        let bytes = resp.bytes().await?;
        if !status.is_success() {
            let msg = match serde_json::from_slice::<ApiErrorBody>(&bytes) {
                Ok(b) => format!("{} ({})", b.message, b.code),
                Err(_) => String::from_utf8_lossy(&bytes).into_owned(),
            };
            anyhow::bail!("server refused ({status}): {msg}");
        }
        serde_json::from_slice(&bytes).with_context(|| format!("malformed answer from {url}"))
    }
}

const NO_BODY: Option<&()> = None;

/// Runs `tandem admin`.
pub fn run(args: AdminArgs, _global: &Global) -> anyhow::Result<u8> {
    let token = args.token.clone().context(
        "no admin token: pass --token or set TANDEM_ADMIN_TOKEN (printed at the server's first start)",
    )?;
    let client = AdminClient::new(&args.server, &token)?;
    crate::output::block_on(admin(client, args))?
}

async fn admin(c: AdminClient, args: AdminArgs) -> anyhow::Result<u8> {
    use reqwest::Method;
    let json = args.json;
    match args.command {
        AdminCommand::User(UserCmd::Create { name, policy }) => {
            let u: UserInfo = c
                .call(
                    Method::POST,
                    "/v1/admin/users",
                    Some(&CreateUser { name, policy }),
                )
                .await?;
            emit(json, &u, || {
                println!("created user {} (policy {})", u.name, u.policy)
            })?;
        }
        AdminCommand::User(UserCmd::List) => {
            let users: Vec<UserInfo> = c.call(Method::GET, "/v1/admin/users", NO_BODY).await?;
            emit(json, &users, || {
                println!(
                    "{:<20} {:<12} {:<24} PERSONAL",
                    "USER", "POLICY", "CORPORATE"
                );
                for u in &users {
                    println!(
                        "{:<20} {:<12} {:<24} {}",
                        u.name,
                        u.policy,
                        opt_ref(&u.assignments.corporate),
                        opt_ref(&u.assignments.personal)
                    );
                }
            })?;
        }
        AdminCommand::Token(TokenCmd::Create { user, ttl }) => {
            let t: TokenCreated = c
                .call(
                    Method::POST,
                    "/v1/admin/tokens",
                    Some(&CreateToken {
                        user,
                        ttl_secs: Some(ttl.as_secs()),
                    }),
                )
                .await?;
            emit(json, &t, || {
                eprintln!(
                    "tandem: one-time enrollment token for {} (expires {}); on the laptop run \
                     `tandem agent enroll --server URL --token TOKEN`",
                    t.user,
                    fmt_time(t.expires_at)
                );
                println!("{}", t.token);
            })?;
        }
        AdminCommand::Token(TokenCmd::Revoke { user, reason }) => {
            let r: tandem_proto::fleet::TokensRevoked = c
                .call(
                    Method::POST,
                    "/v1/admin/tokens/revoke",
                    Some(&tandem_proto::fleet::RevokeTokens { user, reason }),
                )
                .await?;
            emit(json, &r, || {
                println!(
                    "{} unused enrollment token(s) of {} revoked",
                    r.revoked, r.user
                )
            })?;
        }
        AdminCommand::RevokeAdmin { name } => {
            let r: serde_json::Value = c
                .call(Method::DELETE, &format!("/v1/admin/admins/{name}"), NO_BODY)
                .await?;
            emit(json, &r, || println!("admin credential {name} revoked"))?;
        }
        AdminCommand::Device(DeviceCmd::List) => {
            let devices: Vec<DeviceInfo> =
                c.call(Method::GET, "/v1/admin/devices", NO_BODY).await?;
            emit(json, &devices, || {
                println!(
                    "{:<32} {:<12} {:<16} {:<12} {:<20} LEASE LEFT",
                    "DEVICE", "USER", "HOST", "STATUS", "LAST CHECK-IN"
                );
                for d in &devices {
                    println!(
                        "{:<32} {:<12} {:<16} {:<12} {:<20} {}",
                        d.id.to_string(),
                        d.user,
                        d.hostname,
                        d.status.to_string(),
                        d.last_checkin.map(ago).unwrap_or_else(|| "never".into()),
                        left(d)
                    );
                }
            })?;
        }
        AdminCommand::Device(DeviceCmd::Show { id }) => {
            let d: DeviceInfo = c
                .call(Method::GET, &format!("/v1/devices/{id}"), NO_BODY)
                .await?;
            emit(json, &d, || {
                println!("device      {}", d.id);
                println!("user        {}", d.user);
                println!("host        {}", d.hostname);
                println!("status      {}", d.status);
                println!("enrolled    {}", fmt_time(d.enrolled_at));
                println!(
                    "check-in    {}",
                    d.last_checkin.map(ago).unwrap_or_else(|| "never".into())
                );
                println!("lease left  {}", left(&d));
                if let Some(r) = &d.kill_reason {
                    println!("kill reason {r}");
                }
            })?;
        }
        AdminCommand::Device(DeviceCmd::Replace { old, new, reason }) => {
            let r: serde_json::Value = c
                .call(
                    Method::POST,
                    &format!("/v1/admin/devices/{old}/replace"),
                    Some(&tandem_proto::backup::ReplaceRequest { new, reason }),
                )
                .await?;
            emit(json, &r, || {
                println!(
                    "{} replaces {} for {}: the old device is killed at its next contact; the new one restores backup {} at its next corporate start",
                    r["new"].as_str().unwrap_or("?"),
                    r["old"].as_str().unwrap_or("?"),
                    r["user"].as_str().unwrap_or("?"),
                    r["latest_backup"].as_u64().map(|s| s.to_string()).unwrap_or_else(|| "(none yet)".into())
                )
            })?;
        }
        AdminCommand::Backups(BackupsCmd::Prune { who, keep, reason }) => {
            let r: tandem_proto::backup::PruneReport = c
                .call(
                    Method::POST,
                    &format!("/v1/admin/backups/{who}/prune"),
                    Some(&tandem_proto::backup::PruneRequest { keep, reason }),
                )
                .await?;
            emit(json, &r, || {
                println!(
                    "{}: dropped {} backups, freed {:.1} MB; backups now occupy {:.1} MB",
                    r.user,
                    r.dropped.len(),
                    r.bytes_freed as f64 / 1e6,
                    r.stored_bytes as f64 / 1e6
                );
            })?;
        }
        AdminCommand::Backups(BackupsCmd::List { who }) => {
            let list: Vec<tandem_proto::backup::BackupInfo> = c
                .call(Method::GET, &format!("/v1/admin/backups/{who}"), NO_BODY)
                .await?;
            emit(json, &list, || {
                println!(
                    "{:>5}  {:<20} {:<34} {:>10} {:>8}",
                    "SEQ", "TAKEN", "DEVICE", "SIZE MB", "CHUNKS"
                );
                for b in &list {
                    println!(
                        "{:>5}  {:<20} {:<34} {:>10.1} {:>8}",
                        b.seq,
                        humantime::format_rfc3339_seconds(
                            std::time::UNIX_EPOCH + std::time::Duration::from_secs(b.taken_at)
                        ),
                        b.device,
                        b.size as f64 / 1e6,
                        b.data_chunks
                    );
                }
            })?;
        }
        AdminCommand::Device(DeviceCmd::Kill { id, reason }) => {
            let d: DeviceInfo = c
                .call(
                    Method::POST,
                    &format!("/v1/admin/devices/{id}/kill"),
                    Some(&KillRequest { reason }),
                )
                .await?;
            emit(json, &d, || {
                eprintln!(
                    "tandem: kill ordered for {}: at its next contact it stops its corporate VM, \
                     erases corporate keys and data, and acknowledges; until then its lease \
                     ({}) locks it",
                    d.id,
                    left(&d)
                );
                println!("{} {}", d.id, d.status);
            })?;
        }
        AdminCommand::Assign {
            user,
            corporate,
            personal,
            policy,
            reason,
        } => {
            let u: UserInfo = c
                .call(
                    Method::POST,
                    "/v1/admin/assign",
                    Some(&Assign {
                        user,
                        corporate,
                        personal,
                        policy,
                        reason,
                    }),
                )
                .await?;
            emit(json, &u, || {
                println!(
                    "{}: policy {}, corporate {}, personal {}",
                    u.name,
                    u.policy,
                    opt_ref(&u.assignments.corporate),
                    opt_ref(&u.assignments.personal)
                )
            })?;
        }
        AdminCommand::Policy(PolicyCmd::Set {
            name,
            lease_days,
            checkin_mins,
            backup_mins,
            backup_quota_mb,
            scan,
            usb,
            clipboard,
            network,
            reason,
        }) => {
            let all: Vec<PolicyInfo> = c.call(Method::GET, "/v1/admin/policies", NO_BODY).await?;
            let mut p = all
                .into_iter()
                .find(|p| p.name == name)
                .map(|p| p.policy)
                .unwrap_or_default();
            apply(&mut p.lease_days, lease_days);
            apply(&mut p.checkin_interval_mins, checkin_mins);
            apply(&mut p.backup_interval_mins, backup_mins);
            apply(&mut p.backup_quota_mb, backup_quota_mb);
            apply(&mut p.scan_schedule, scan);
            apply(&mut p.controls.usb, usb.map(OnOff::on));
            apply(&mut p.controls.clipboard, clipboard.map(OnOff::on));
            apply(&mut p.controls.network, network.map(OnOff::on));
            let saved: PolicyInfo = c
                .call(
                    Method::PUT,
                    &format!("/v1/admin/policies/{name}"),
                    Some(&SetPolicy { policy: p, reason }),
                )
                .await?;
            emit(json, &saved, || print_policy(&saved))?;
        }
        AdminCommand::Policy(PolicyCmd::List) => {
            let all: Vec<PolicyInfo> = c.call(Method::GET, "/v1/admin/policies", NO_BODY).await?;
            emit(json, &all, || all.iter().for_each(print_policy))?;
        }
        AdminCommand::Audit {
            device,
            since,
            limit,
        } => {
            let mut q = Vec::new();
            if let Some(d) = device {
                q.push(format!("device={d}"));
            }
            if let Some(s) = since {
                q.push(format!("since={}", parse_since(&s)?));
            }
            if let Some(l) = limit {
                q.push(format!("limit={l}"));
            }
            let path = if q.is_empty() {
                "/v1/admin/audit".to_string()
            } else {
                format!("/v1/admin/audit?{}", q.join("&"))
            };
            let entries: Vec<AuditEntry> = c.call(Method::GET, &path, NO_BODY).await?;
            emit(json, &entries, || {
                for e in &entries {
                    println!(
                        "{} {:<22} {:<40} {}{}{}",
                        fmt_time(e.at),
                        e.action,
                        e.actor,
                        e.device.map(|d| format!("device={d} ")).unwrap_or_default(),
                        e.reason
                            .as_ref()
                            .map(|r| format!("reason={r:?} "))
                            .unwrap_or_default(),
                        e.detail
                    );
                }
            })?;
        }
    }
    Ok(crate::exit::SUCCESS)
}

fn apply<T>(slot: &mut T, v: Option<T>) {
    if let Some(v) = v {
        *slot = v;
    }
}

fn emit<T: Serialize>(json: bool, v: &T, human: impl FnOnce()) -> anyhow::Result<()> {
    if json {
        print_json(v)
    } else {
        human();
        Ok(())
    }
}

fn print_policy(p: &PolicyInfo) {
    let Policy {
        lease_days,
        checkin_interval_mins,
        backup_interval_mins,
        scan_schedule,
        controls,
        backup_quota_mb,
    } = &p.policy;
    let quota = match backup_quota_mb {
        0 => "no backup quota".to_string(),
        mb => format!("backup quota {mb} MiB per user"),
    };
    println!(
        "{}: lease {lease_days} days, check-in every {checkin_interval_mins} min, backup every \
         {backup_interval_mins} min, {quota}, scan {scan_schedule}, usb {}, clipboard {}, network {}",
        p.name,
        on(controls.usb),
        on(controls.clipboard),
        on(controls.network)
    );
}

fn on(b: bool) -> &'static str {
    if b {
        "on"
    } else {
        "off"
    }
}

fn opt_ref(r: &Option<ImageRef>) -> String {
    r.as_ref()
        .map(|r| r.to_string())
        .unwrap_or_else(|| "-".into())
}

fn fmt_time(t: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_secs(t))
        .to_string()
}

fn ago(t: u64) -> String {
    let d = now().saturating_sub(t);
    format!(
        "{} ago",
        humantime::format_duration(std::time::Duration::from_secs(d))
    )
}

fn left(d: &DeviceInfo) -> String {
    match d.lease_not_after {
        None => "none".into(),
        Some(_) if d.lease_secs_left == 0 => "expired".into(),
        Some(_) => format!("{:.1} days", d.lease_secs_left as f64 / 86_400.0),
    }
}

fn parse_since(s: &str) -> anyhow::Result<u64> {
    if let Ok(n) = s.parse::<u64>() {
        return Ok(n);
    }
    if let Ok(d) = humantime::parse_duration(s) {
        return Ok(now().saturating_sub(d.as_secs()));
    }
    if let Ok(t) = humantime::parse_rfc3339_weak(s) {
        return Ok(t
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0));
    }
    anyhow::bail!("--since {s:?}: use a duration ago (1h, 2days), unix seconds, or RFC 3339")
}
