//! `tandem desktop`: start, stop and inspect the laptop's desktops, and the personal
//! desktop's recovery points — each a request to the agent daemon (`tandem agent run`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use tandem_agent::api::{self, Reply, Request};
use tandem_agent::escrow::Provisioning;
use tandem_agent::laptop::{BaseChoice, Recovered, Recovery};
use tandem_agent::AgentDir;
use tandem_desktop::Desktop;

use crate::exit;
use crate::output::{print_json, Global};

/// Arguments of `tandem desktop`.
#[derive(Debug, clap::Args)]
pub struct DesktopArgs {
    #[command(subcommand)]
    command: DesktopCommand,
}

/// The agent directory the desktops live in (its daemon serves them).
#[derive(Debug, Clone, clap::Args)]
pub struct AgentDirArg {
    /// Agent directory.
    #[arg(
        long = "dir",
        env = "TANDEM_AGENT_DIR",
        default_value = "/var/lib/tandem-agent"
    )]
    pub dir: PathBuf,
}

#[derive(Debug, clap::Subcommand)]
enum DesktopCommand {
    /// Start a desktop (the corporate one only with a valid lease).
    Start {
        /// corporate or personal.
        desktop: Desktop,
        #[command(flatten)]
        dir: AgentDirArg,
        /// Personal base: NAME@VERSION (or NAME for the newest) from this laptop's store.
        /// Default: the version the personal disk was made on, else the assigned one.
        #[arg(long, conflicts_with = "base_file")]
        image: Option<String>,
        /// Personal base: a raw file instead of the synced store (development).
        #[arg(long)]
        base_file: Option<PathBuf>,
        /// Print the VM state as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Stop a desktop (power button, then quit, then kill).
    Stop {
        /// corporate or personal.
        desktop: Desktop,
        #[command(flatten)]
        dir: AgentDirArg,
        /// Seconds the guest gets to power off.
        #[arg(long, default_value_t = 30)]
        timeout: u64,
    },
    /// Back up the corporate user disk now (point-in-time; only what the server lacks
    /// travels).
    Backup {
        #[command(flatten)]
        dir: AgentDirArg,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Both desktops' states.
    Status {
        #[command(flatten)]
        dir: AgentDirArg,
        /// Print as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Sends one request to the daemon serving `dir`.
pub fn call(dir: &Path, request: Request) -> anyhow::Result<Reply> {
    Ok(api::call(&api::socket_path(&AgentDir::new(dir)), request)?)
}

fn unexpected(r: Reply) -> anyhow::Error {
    anyhow::anyhow!("the agent daemon answered with an unexpected reply ({r:?}); are the daemon and the CLI the same version?")
}

/// Runs `tandem desktop`.
pub fn run(args: DesktopArgs, global: &Global) -> anyhow::Result<u8> {
    match args.command {
        DesktopCommand::Start {
            desktop,
            dir,
            image,
            base_file,
            json,
        } => {
            let base_file = base_file.map(|p| std::path::absolute(&p).unwrap_or(p));
            let reply = call(
                &dir.dir,
                Request::DesktopStart {
                    desktop,
                    base: BaseChoice { image, base_file },
                },
            )?;
            let Reply::Started(s) = reply else {
                return Err(unexpected(reply));
            };
            match &s.provisioning {
                Some(Provisioning::Restored {
                    seq,
                    chunks,
                    disk_bytes,
                }) => eprintln!(
                    "corporate: restored the user disk from backup {seq} ({chunks} chunks, {:.1} MB)",
                    *disk_bytes as f64 / 1e6
                ),
                Some(Provisioning::EscrowedNoBackup) => {
                    eprintln!("corporate: the server holds no backup yet; a new user disk is created")
                }
                _ => {}
            }
            if !s.collected.dropped.is_empty() {
                let names: Vec<String> = s
                    .collected
                    .dropped
                    .iter()
                    .map(|r| format!("{}@{}", r.image, r.version))
                    .collect();
                eprintln!("removed {} (no desktop uses it any more)", names.join(", "));
            }
            if let Some(e) = &s.collect_error {
                eprintln!("tandem: warning: {e}; retried at the next start");
            }
            if json {
                print_json(&s.state)?;
            } else if !global.quiet {
                println!(
                    "{desktop}: running ({}) on {}; console: tandem vm console {desktop} --state-dir {}",
                    s.state.accel.as_deref().unwrap_or("-"),
                    s.base,
                    dir.dir.join("vms").display()
                );
            }
            Ok(exit::SUCCESS)
        }
        DesktopCommand::Stop {
            desktop,
            dir,
            timeout,
        } => {
            let reply = call(
                &dir.dir,
                Request::DesktopStop {
                    desktop,
                    timeout_secs: timeout,
                },
            )?;
            let Reply::Stopped(st) = reply else {
                return Err(unexpected(reply));
            };
            match st.exit {
                Some(tandem_vm::Exit::Stopped { how }) if how != "guest" => {
                    println!("{desktop}: stopped ({how}: the guest did not power off in time)")
                }
                _ => println!("{desktop}: stopped"),
            }
            Ok(exit::SUCCESS)
        }
        DesktopCommand::Backup { dir, json } => backup_and_report(&dir.dir, json, global),
        DesktopCommand::Status { dir, json } => {
            let reply = call(&dir.dir, Request::DesktopStatus)?;
            let Reply::Desktops(all) = reply else {
                return Err(unexpected(reply));
            };
            if json {
                print_json(&all)?;
            } else {
                for d in [Desktop::Corporate, Desktop::Personal] {
                    let phase = all
                        .iter()
                        .find(|s| s.name == d.name())
                        .map(|s| format!("{:?}", s.phase).to_lowercase())
                        .unwrap_or_else(|| "never started".into());
                    println!("{:<10} {phase}", d.name());
                }
            }
            Ok(exit::SUCCESS)
        }
    }
}

/// `tandem desktop backup` / `tandem agent backup`: back up through the daemon and say
/// what moved.
pub fn backup_and_report(dir: &Path, json: bool, global: &Global) -> anyhow::Result<u8> {
    let reply = call(dir, Request::Backup)?;
    let Reply::Backup(report) = reply else {
        return Err(unexpected(reply));
    };
    if json {
        print_json(&report)?;
    } else if !global.quiet {
        println!(
            "backup {} committed: disk {:.1} MB, {} data chunks, {} uploaded ({:.2} MB); the rest was already on the server",
            report.backup.seq,
            report.disk_bytes as f64 / 1e6,
            report.data_chunks,
            report.uploaded_chunks,
            report.uploaded_bytes as f64 / 1e6
        );
    }
    Ok(exit::SUCCESS)
}

/// `tandem vm snapshot|snapshots|rollback|reset` on a desktop, through the daemon.
pub fn recovery(dir: &Path, desktop: Desktop, action: Recovery, json: bool) -> anyhow::Result<u8> {
    let reply = call(
        dir,
        Request::Recovery {
            desktop,
            action: action.clone(),
        },
    )?;
    let Reply::Recovered(done) = reply else {
        return Err(unexpected(reply));
    };
    match (action, done) {
        (Recovery::Snapshot { name }, _) => println!("{desktop}: recovery point `{name}` taken"),
        (Recovery::List, Recovered::Snapshots(list)) => {
            if json {
                print_json(&list)?;
            } else if list.is_empty() {
                println!("{desktop}: no recovery points");
            } else {
                for s in list {
                    println!(
                        "{}\t{}",
                        s.name,
                        humantime::format_rfc3339_seconds(
                            std::time::UNIX_EPOCH + Duration::from_secs(s.date_sec)
                        )
                    );
                }
            }
        }
        (Recovery::Rollback { name }, _) => {
            println!("{desktop}: rolled back to `{name}`; it takes effect at the next start")
        }
        (Recovery::Reset, _) => {
            println!("{desktop}: reset to the pristine base; every recovery point is gone")
        }
        (_, other) => return Err(unexpected(Reply::Recovered(other))),
    }
    Ok(exit::SUCCESS)
}
