//! `tandem agent`: enroll this laptop, check in, run the agent, show status, and the
//! lease gate.

use std::path::PathBuf;

use anyhow::Context as _;
use tandem_agent::api::{CheckinReport, Reply, Request};
use tandem_agent::checkin;
use tandem_agent::identity::Identity;
use tandem_agent::laptop::{Laptop, LaptopConfig, LaptopHooks};
use tandem_agent::AgentDir;

use crate::output::{print_json, Global};

/// Arguments of `tandem agent`.
#[derive(Debug, clap::Args)]
pub struct AgentArgs {
    /// The agent's directory (identity, state, keys, VM disks).
    #[arg(
        long,
        env = "TANDEM_AGENT_DIR",
        global = true,
        default_value = "/var/lib/tandem-agent"
    )]
    dir: PathBuf,
    /// Print one JSON document on stdout.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: AgentCommand,
}

#[derive(Debug, clap::Subcommand)]
enum AgentCommand {
    /// Enroll this device with a one-time token from the administrator.
    Enroll {
        /// Server URL.
        #[arg(long)]
        server: String,
        /// One-time enrollment token.
        #[arg(long, env = "TANDEM_ENROLL_TOKEN", hide_env_values = true)]
        token: String,
        /// Host name to report (default: /etc/hostname).
        #[arg(long)]
        hostname: Option<String>,
    },
    /// Check in once now.
    CheckIn,
    /// Run the agent daemon in the foreground: it owns both desktops, serves the local API
    /// the laptop verbs use, checks in, backs up and enforces the lease until stopped.
    Run {
        /// Check in this often instead of the policy's interval (e.g. 30s).
        #[arg(long)]
        interval: Option<humantime::Duration>,
        /// Directory of the built guest whose kernel and initramfs boot the bases.
        #[arg(
            long,
            env = "TANDEM_GUEST_DIR",
            default_value = "/var/cache/tandem/guest"
        )]
        guest_dir: PathBuf,
        /// Guest memory in MiB.
        #[arg(long, default_value_t = 256)]
        memory: u32,
        /// Accelerator: auto, kvm or tcg.
        #[arg(long, default_value = "auto")]
        accel: tandem_vm::Accel,
        /// Size of a new corporate user disk in MiB.
        #[arg(long, default_value_t = 128)]
        user_disk_mib: u64,
        /// First uid (and gid) the desktops' QEMUs run as when the daemon is root:
        /// corporate gets it, personal the next one.
        #[arg(long, default_value_t = tandem_agent::laptop::VmUsers::DEFAULT_BASE)]
        vm_uid_base: u32,
    },
    /// Back up the corporate user disk now (same as `tandem desktop backup`).
    Backup,
    /// Show enrollment, lease (days left), last check-in and kill state.
    Status,
    /// The corporate VM's gate: exit 0 when the lease allows starting it, 1 when refused.
    Lease {
        /// Evaluate at this unix time instead of the clock (for tests and what-ifs).
        #[arg(long, hide = true)]
        now: Option<u64>,
    },
}

/// Runs `tandem agent`.
pub fn run(args: AgentArgs, global: &Global) -> anyhow::Result<u8> {
    if let AgentCommand::Backup = args.command {
        // Runs its own async steps; it must not start inside the agent's runtime.
        return crate::cmd::desktop::backup_and_report(&args.dir, args.json, global);
    }
    crate::output::block_on(agent(args))?
}

async fn agent(args: AgentArgs) -> anyhow::Result<u8> {
    let dir = AgentDir::new(&args.dir);
    let json = args.json;
    match args.command {
        AgentCommand::Enroll {
            server,
            token,
            hostname,
        } => {
            let host = hostname.unwrap_or_else(tandem_agent::identity::hostname);
            let id = Identity::enroll(&dir, &server, &token, &host)
                .await
                .with_context(|| format!("enrolling with {server}"))?;
            if json {
                print_json(&id.info)?;
            } else {
                eprintln!(
                    "tandem: enrolled; run `tandem agent check-in` (or start the service) to get a lease"
                );
                println!("{}", id.info.device);
            }
            Ok(crate::exit::SUCCESS)
        }
        AgentCommand::CheckIn => {
            let report = if daemon_running(&dir) {
                let dir = args.dir.clone();
                let reply = tokio::task::spawn_blocking(move || {
                    crate::cmd::desktop::call(&dir, Request::CheckIn)
                })
                .await??;
                match reply {
                    Reply::CheckedIn(r) => *r,
                    other => anyhow::bail!("unexpected reply from the agent daemon: {other:?}"),
                }
            } else {
                // No daemon (yet): check in from here, with the same hooks it would use.
                let laptop = std::sync::Arc::new(Laptop::new(
                    dir.clone(),
                    laptop_config(PathBuf::new(), 256, tandem_vm::Accel::Auto, 128),
                    tokio::runtime::Handle::current(),
                ));
                let hooks = LaptopHooks(laptop);
                checkin::checkin_once(&dir, &hooks)
                    .await
                    .context("checking in")?
                    .into()
            };
            report_outcome(json, &report)?;
            Ok(crate::exit::SUCCESS)
        }
        AgentCommand::Run {
            interval,
            guest_dir,
            memory,
            accel,
            user_disk_mib,
            vm_uid_base,
        } => {
            eprintln!("tandem: agent daemon running on {}", args.dir.display());
            let mut config = laptop_config(guest_dir, memory, accel, user_disk_mib);
            config.vm_users = tandem_agent::laptop::VmUsers::when_root(vm_uid_base);
            tandem_agent::daemon::run(
                dir,
                config,
                checkin::RunOptions {
                    interval: interval.map(Into::into),
                },
                shutdown(),
            )
            .await?;
            Ok(crate::exit::SUCCESS)
        }
        AgentCommand::Backup => anyhow::bail!("backup runs outside the agent's runtime"),
        AgentCommand::Status => {
            let s = if daemon_running(&dir) {
                let d = args.dir.clone();
                match tokio::task::spawn_blocking(move || {
                    crate::cmd::desktop::call(&d, Request::Status)
                })
                .await??
                {
                    Reply::Status(s) => *s,
                    other => anyhow::bail!("unexpected reply from the agent daemon: {other:?}"),
                }
            } else {
                tandem_agent::status::status(&dir, tandem_agent::now())?
            };
            if json {
                print_json(&s)?;
            } else {
                match (&s.device, s.killed) {
                    (_, true) => {
                        println!("device      killed (acknowledged: {})", s.kill_acknowledged)
                    }
                    (Some(d), false) => {
                        println!("device      {d} ({})", s.user.as_deref().unwrap_or("?"))
                    }
                    (None, false) => println!("device      not enrolled"),
                }
                if let Some(server) = &s.server {
                    println!("server      {server}");
                }
                match (&s.lease, &s.lease_refusal) {
                    (Some(l), _) => println!("lease       {:.1} days left", l.days_left),
                    (None, Some(why)) => println!("lease       {why}"),
                    _ => {}
                }
                let ago = |t: u64| {
                    let d = tandem_agent::now().saturating_sub(t);
                    format!(
                        "{} ago",
                        humantime::format_duration(std::time::Duration::from_secs(d))
                    )
                };
                println!(
                    "check-in    last success {}, last error {}",
                    s.checkin
                        .last_success
                        .map(ago)
                        .unwrap_or_else(|| "never".into()),
                    s.checkin.last_error.as_deref().unwrap_or("none")
                );
            }
            Ok(crate::exit::SUCCESS)
        }
        AgentCommand::Lease { now } => {
            let now = now.unwrap_or_else(tandem_agent::now);
            match tandem_agent::lease::check(&dir, now) {
                Ok(s) => {
                    if json {
                        print_json(&serde_json::json!({"allowed": true, "lease": s}))?;
                    } else {
                        println!("allowed: {:.1} days left", s.days_left);
                    }
                    Ok(crate::exit::SUCCESS)
                }
                Err(e) => {
                    if json {
                        print_json(
                            &serde_json::json!({"allowed": false, "reason": e.to_string()}),
                        )?;
                    } else {
                        eprintln!("tandem: {e}");
                    }
                    Ok(crate::exit::FINDING)
                }
            }
        }
    }
}

fn daemon_running(dir: &AgentDir) -> bool {
    tandem_agent::laptop::socket_alive(&tandem_agent::api::socket_path(dir))
}

fn laptop_config(
    guest_dir: PathBuf,
    memory_mib: u32,
    accel: tandem_vm::Accel,
    user_disk_mib: u64,
) -> LaptopConfig {
    LaptopConfig {
        guest_dir,
        memory_mib,
        accel,
        user_disk_mib,
        vm_users: None,
    }
}

fn report_outcome(json: bool, o: &CheckinReport) -> anyhow::Result<()> {
    if json {
        return print_json(o);
    }
    if o.killed {
        eprintln!("tandem: this device was killed by an administrator; corporate keys and data are erased");
        println!("killed");
        return Ok(());
    }
    match &o.lease {
        Some(l) => println!(
            "checked in; lease until {}",
            humantime::format_rfc3339_seconds(
                std::time::UNIX_EPOCH + std::time::Duration::from_secs(l.not_after)
            )
        ),
        None => println!("checked in; no lease issued"),
    }
    for p in &o.pulls {
        match &p.error {
            None => println!("image {}: {}", p.image, p.outcome),
            Some(e) => eprintln!("tandem: image {}: pull failed: {e}", p.image),
        }
    }
    Ok(())
}

async fn shutdown() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
