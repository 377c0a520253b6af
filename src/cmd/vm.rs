//! `tandem vm`: run a VM in the foreground, or start, stop and inspect named VMs under a
//! state directory (each owned by a detached `tandem vm supervise` process).

use std::io::{BufRead as _, Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use tandem_vm::rundir::{self, Phase, RunDir, VmState};
use tandem_vm::{
    Accel, Boot, DeviceControls, DiskFormat, DiskSpec, Exit, Network, Serial, Vm, VmSpec, Vnc,
};

use crate::cmd::desktop::recovery as desktop_recovery;
use crate::exit;
use crate::output::{print_json, Global};
use tandem_agent::laptop::Recovery;

/// Arguments of `tandem vm`.
#[derive(Debug, clap::Args)]
pub struct VmArgs {
    #[command(subcommand)]
    command: VmCommand,
}

/// Where named VMs live.
#[derive(Debug, Clone, clap::Args)]
pub struct StateDirArg {
    /// State directory of named VMs.
    #[arg(long, env = "TANDEM_STATE_DIR", default_value = "/var/lib/tandem/vms")]
    pub state_dir: PathBuf,
}

/// The parts of a VM spec given on the command line.
#[derive(Debug, Clone, clap::Args)]
pub struct SpecArgs {
    /// Boot a disk of the built guest by name (gold-v1, gold-v2, personal): sets --kernel,
    /// --initrd and the first --disk.
    #[arg(long)]
    image: Option<String>,
    /// Directory of the built guest (`tandem guest build`).
    #[arg(
        long,
        env = "TANDEM_GUEST_DIR",
        default_value = "/var/cache/tandem/guest"
    )]
    guest_dir: PathBuf,
    /// Linux kernel (bzImage) for direct kernel boot.
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// initramfs for direct kernel boot.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, default_value = tandem_guest::DEFAULT_CMDLINE)]
    append: String,
    /// A disk: PATH[,format=raw|qcow2][,ro][,volatile][,secret=KEYFILE]; repeat for more. The format
    /// defaults to what the file's header says.
    #[arg(long = "disk")]
    disks: Vec<String>,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256)]
    memory: u32,
    /// Virtual CPUs.
    #[arg(long, default_value_t = 1)]
    cpus: u32,
    /// Accelerator: auto (KVM only with vmx/svm and a working /dev/kvm), kvm or tcg.
    #[arg(long, default_value = "auto")]
    accel: Accel,
    /// Network: none or user.
    #[arg(long, default_value = "none", value_parser = parse_network)]
    net: Network,
    /// VNC display number on 127.0.0.1.
    #[arg(long)]
    vnc: Option<u16>,
    /// VNC websocket port on 127.0.0.1 (for noVNC); needs --vnc.
    #[arg(long, requires = "vnc")]
    vnc_websocket: Option<u16>,
    /// Offer a USB controller.
    #[arg(long)]
    usb: bool,
}

fn parse_network(s: &str) -> Result<Network, String> {
    match s {
        "none" => Ok(Network::None),
        "user" => Ok(Network::User),
        other => Err(format!("unknown network `{other}`; use none or user")),
    }
}

/// Parses `PATH[,format=…][,ro][,secret=…]`.
pub fn parse_disk(text: &str) -> anyhow::Result<DiskSpec> {
    let mut parts = text.split(',');
    let path = PathBuf::from(parts.next().unwrap_or_default());
    if path.as_os_str().is_empty() {
        bail!("--disk needs a path: PATH[,format=raw|qcow2][,ro][,secret=KEYFILE]");
    }
    let mut format = None;
    let mut read_only = false;
    let mut snapshot = false;
    let mut secret_file = None;
    for opt in parts {
        match opt.split_once('=') {
            Some(("format", "raw")) => format = Some(DiskFormat::Raw),
            Some(("format", "qcow2")) => format = Some(DiskFormat::Qcow2),
            Some(("secret", file)) => secret_file = Some(PathBuf::from(file)),
            None if opt == "ro" => read_only = true,
            None if opt == "volatile" => snapshot = true,
            _ => bail!("unknown disk option `{opt}` in `{text}`; use format=raw|qcow2, ro, volatile or secret=KEYFILE"),
        }
    }
    let format = match format {
        Some(f) => f,
        None => tandem_vm::spec::detect_format(&path)
            .with_context(|| format!("disk {} cannot be read", path.display()))?,
    };
    Ok(DiskSpec {
        path,
        format,
        read_only,
        snapshot,
        secret_file,
        reconnect_backing: false,
    })
}

impl SpecArgs {
    /// Builds the spec; sockets and logs are filled in by the caller.
    pub fn to_spec(
        &self,
        name: &str,
        serial: Serial,
        qmp_socket: PathBuf,
    ) -> anyhow::Result<VmSpec> {
        let mut disks = Vec::new();
        let mut kernel = self.kernel.clone();
        let mut initrd = self.initrd.clone();
        if let Some(image) = &self.image {
            let text =
                std::fs::read_to_string(self.guest_dir.join("guest.json")).with_context(|| {
                    format!(
                        "no built guest in {}; run `tandem guest build --out {}`",
                        self.guest_dir.display(),
                        self.guest_dir.display()
                    )
                })?;
            let assets: tandem_guest::GuestAssets = serde_json::from_str(&text)
                .context("guest.json is damaged; rebuild with `tandem guest build`")?;
            let disk = assets.image(image).with_context(|| {
                format!("the guest has no image `{image}`; it has gold-v1, gold-v2, personal")
            })?;
            kernel.get_or_insert(assets.kernel.clone());
            initrd.get_or_insert(assets.initrd.clone());
            // The built image is shared: the guest's writes stay in a throwaway layer.
            disks.push(DiskSpec {
                path: disk.to_path_buf(),
                format: DiskFormat::Raw,
                read_only: false,
                snapshot: true,
                secret_file: None,
                reconnect_backing: false,
            });
        }
        for d in &self.disks {
            disks.push(parse_disk(d)?);
        }
        let boot = match kernel {
            Some(kernel) => Boot::Kernel {
                kernel,
                initrd,
                cmdline: self.append.clone(),
            },
            None if disks.is_empty() => {
                bail!("nothing to boot: pass --image NAME, or --kernel/--initrd with --disk, or --disk alone")
            }
            None => Boot::Disk,
        };
        Ok(VmSpec {
            name: name.to_string(),
            memory_mib: self.memory,
            vcpus: self.cpus,
            boot,
            disks,
            serial,
            qmp_socket,
            vnc: self.vnc.map(|display| Vnc {
                display,
                websocket: self.vnc_websocket,
            }),
            network: self.net,
            accel: self.accel,
            controls: DeviceControls { usb: self.usb },
            run_as: None,
        })
    }
}

#[derive(Debug, clap::Subcommand)]
enum VmCommand {
    /// Run a VM in the foreground; its serial console goes to stdout.
    Run {
        #[command(flatten)]
        spec: SpecArgs,
        /// VM name.
        #[arg(long, default_value = "foreground")]
        name: String,
        /// Also keep the serial output in this file.
        #[arg(long)]
        serial_log: Option<PathBuf>,
        /// Stop the VM (QMP quit) as soon as the console prints this text.
        #[arg(long)]
        exit_on: Option<String>,
        /// Give up (and stop the VM) after this many seconds.
        #[arg(long)]
        timeout: Option<u64>,
        /// Print the QEMU command line this would run, one argument per line, and exit.
        #[arg(long)]
        print_qemu_command: bool,
    },
    /// Start a named VM in the background under a supervisor.
    Start {
        /// VM name.
        name: String,
        #[command(flatten)]
        spec: SpecArgs,
        #[command(flatten)]
        state: StateDirArg,
        /// Print the state as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Stop a named VM: power button, then quit after the timeout, then kill.
    Stop {
        /// VM name.
        name: String,
        #[command(flatten)]
        state: StateDirArg,
        /// Seconds the guest gets to power off.
        #[arg(long, default_value_t = 30)]
        timeout: u64,
        /// Print the state as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show one named VM.
    Status {
        /// VM name.
        name: String,
        #[command(flatten)]
        state: StateDirArg,
        /// Print the state as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List named VMs.
    List {
        #[command(flatten)]
        state: StateDirArg,
        /// Print as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Attach to a named VM's serial console (Ctrl-] detaches), or print/drive it.
    Console {
        /// VM name.
        name: String,
        #[command(flatten)]
        state: StateDirArg,
        /// Print everything the console printed so far and exit.
        #[arg(long)]
        log: bool,
        /// Type this line into the console and exit.
        #[arg(long)]
        send: Option<String>,
        /// Wait until the console has printed this text (exit 3 on timeout).
        #[arg(long)]
        wait_for: Option<String>,
        /// Seconds to wait for --wait-for.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
    },
    /// Take a recovery point of the personal desktop.
    Snapshot {
        /// The desktop (personal).
        desktop: tandem_desktop::Desktop,
        /// Recovery point name.
        snapshot: String,
        #[command(flatten)]
        dir: crate::cmd::desktop::AgentDirArg,
    },
    /// List the personal desktop's recovery points.
    Snapshots {
        /// The desktop (personal).
        desktop: tandem_desktop::Desktop,
        #[command(flatten)]
        dir: crate::cmd::desktop::AgentDirArg,
        /// Print as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Roll the personal desktop back to a recovery point (VM off).
    Rollback {
        /// The desktop (personal).
        desktop: tandem_desktop::Desktop,
        /// Recovery point name.
        snapshot: String,
        #[command(flatten)]
        dir: crate::cmd::desktop::AgentDirArg,
    },
    /// Reset the personal desktop to its pristine base (VM off).
    Reset {
        /// The desktop (personal).
        desktop: tandem_desktop::Desktop,
        #[command(flatten)]
        dir: crate::cmd::desktop::AgentDirArg,
    },
    /// The supervisor of a named VM (started by `vm start`).
    #[command(hide = true)]
    Supervise {
        /// VM name.
        name: String,
        #[command(flatten)]
        state: StateDirArg,
    },
}

/// Runs `tandem vm`.
pub fn run(args: VmArgs, global: &Global) -> anyhow::Result<u8> {
    match args.command {
        VmCommand::Run {
            spec,
            name,
            serial_log,
            exit_on,
            timeout,
            print_qemu_command,
        } => {
            if print_qemu_command {
                let qmp = std::env::temp_dir().join(format!("tandem-{name}-qmp.sock"));
                let spec = spec.to_spec(&name, Serial::Stdio { log: serial_log }, qmp)?;
                println!("{}", tandem_vm::QEMU);
                for arg in spec.qemu_args(tandem_vm::accel::resolve(spec.accel)) {
                    println!("{}", arg.to_string_lossy());
                }
                return Ok(exit::SUCCESS);
            }
            run_foreground(&spec, &name, serial_log, exit_on, timeout)
        }
        VmCommand::Start {
            name,
            spec,
            state,
            json,
        } => {
            let st = start_named(&state.state_dir, &name, &spec)?;
            report(&st, json, global)?;
            Ok(if st.phase == Phase::Running {
                exit::SUCCESS
            } else {
                exit::ERROR
            })
        }
        VmCommand::Stop {
            name,
            state,
            timeout,
            json,
        } => {
            let rd = RunDir::existing(&state.state_dir, &name)?;
            let st = rd.stop(Duration::from_secs(timeout))?;
            report(&st, json, global)?;
            Ok(exit::SUCCESS)
        }
        VmCommand::Status { name, state, json } => {
            let rd = RunDir::existing(&state.state_dir, &name)?;
            report(&rd.state()?, json, global)?;
            Ok(exit::SUCCESS)
        }
        VmCommand::List { state, json } => {
            let all = rundir::list(&state.state_dir)?;
            if json {
                print_json(&all)?;
            } else if all.is_empty() {
                println!("no VMs in {}", state.state_dir.display());
            } else {
                println!(
                    "{:<16} {:<9} {:<6} {:>8}  STARTED",
                    "NAME", "STATE", "ACCEL", "PID"
                );
                for s in &all {
                    println!(
                        "{:<16} {:<9} {:<6} {:>8}  {}",
                        s.name,
                        phase_name(s.phase),
                        s.accel.as_deref().unwrap_or("-"),
                        s.qemu_pid
                            .map(|p| p.to_string())
                            .unwrap_or_else(|| "-".into()),
                        s.started_at.map(ago).unwrap_or_else(|| "-".into())
                    );
                }
            }
            Ok(exit::SUCCESS)
        }
        VmCommand::Console {
            name,
            state,
            log,
            send,
            wait_for,
            timeout,
        } => console(&state.state_dir, &name, log, send, wait_for, timeout),
        VmCommand::Snapshot {
            desktop,
            snapshot,
            dir,
        } => desktop_recovery(
            &dir.dir,
            desktop,
            Recovery::Snapshot { name: snapshot },
            false,
        ),
        VmCommand::Snapshots { desktop, dir, json } => {
            desktop_recovery(&dir.dir, desktop, Recovery::List, json)
        }
        VmCommand::Rollback {
            desktop,
            snapshot,
            dir,
        } => desktop_recovery(
            &dir.dir,
            desktop,
            Recovery::Rollback { name: snapshot },
            false,
        ),
        VmCommand::Reset { desktop, dir } => {
            desktop_recovery(&dir.dir, desktop, Recovery::Reset, false)
        }
        VmCommand::Supervise { name, state } => {
            let rd = RunDir::existing(&state.state_dir, &name)?;
            match rd.supervise()? {
                Exit::Stopped { .. } => Ok(exit::SUCCESS),
                Exit::Crashed { .. } => Ok(exit::ERROR),
            }
        }
    }
}

fn phase_name(p: Phase) -> &'static str {
    match p {
        Phase::Starting => "starting",
        Phase::Running => "running",
        Phase::Stopped => "stopped",
        Phase::Crashed => "crashed",
        Phase::Failed => "failed",
    }
}

fn ago(unix: u64) -> String {
    let now = tandem_tools::clock::now_secs();
    format!(
        "{} ago",
        humantime::format_duration(Duration::from_secs(now.saturating_sub(unix)))
    )
}

fn report(st: &VmState, json: bool, _global: &Global) -> anyhow::Result<()> {
    if json {
        return print_json(st);
    }
    let mut line = format!("{}: {}", st.name, phase_name(st.phase));
    if let Some(a) = &st.accel {
        line.push_str(&format!(" ({a})"));
    }
    if let Some(pid) = st.qemu_pid {
        line.push_str(&format!(", qemu pid {pid}"));
    }
    println!("{line}");
    if let Some(e) = &st.error {
        println!("  error: {e}");
    }
    match &st.exit {
        Some(Exit::Crashed {
            status,
            last_serial,
        }) => {
            println!("  crashed: {status}");
            if !last_serial.is_empty() {
                println!("  last console lines:");
                for l in last_serial {
                    println!("    {l}");
                }
            }
        }
        Some(Exit::Stopped { how }) => println!("  stopped ({how})"),
        None => {}
    }
    Ok(())
}

/// Starts a named VM under a detached supervisor and waits until it runs (or failed).
pub fn start_named(state_dir: &Path, name: &str, spec_args: &SpecArgs) -> anyhow::Result<VmState> {
    let rd = RunDir::new(state_dir, name)?;
    if let Some(pid) = rd.running_supervisor()? {
        return Err(tandem_vm::VmError::AlreadyRunning {
            name: name.to_string(),
            pid,
        }
        .into());
    }
    let spec = spec_args.to_spec(
        name,
        Serial::File {
            log: PathBuf::new(),
        },
        PathBuf::new(),
    )?;
    let spec = rd.place(spec);
    spec.validate()?;
    rd.write_spec(&spec)?;
    start_supervisor(state_dir, &rd)
}

/// Launches `tandem vm supervise` for a prepared run directory.
fn start_supervisor(state_dir: &Path, rd: &RunDir) -> anyhow::Result<VmState> {
    use std::os::unix::process::CommandExt as _;
    rd.reset_state()?;
    let log = std::fs::File::create(rd.path().join("supervisor.log"))
        .with_context(|| format!("writing {}", rd.path().display()))?;
    let name = rd
        .path()
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    std::process::Command::new(std::env::current_exe().context("locating the tandem binary")?)
        .args(["vm", "supervise", &name, "--state-dir"])
        .arg(state_dir)
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .context("starting the VM supervisor")?;
    let st = rd.wait_started(Duration::from_secs(60))?;
    if st.phase == Phase::Failed {
        bail!(
            "VM `{name}` did not start: {}",
            st.error.as_deref().unwrap_or("unknown error")
        );
    }
    Ok(st)
}

fn run_foreground(
    spec_args: &SpecArgs,
    name: &str,
    serial_log: Option<PathBuf>,
    exit_on: Option<String>,
    timeout: Option<u64>,
) -> anyhow::Result<u8> {
    let tmp = tempfile_dir()?;
    let spec = spec_args.to_spec(
        name,
        Serial::Stdio { log: serial_log },
        tmp.join("qmp.sock"),
    )?;
    let result = (|| {
        let mut vm = Vm::start(&spec, &tmp.join("qemu.log"))?;
        let out = vm.take_serial_output().context("QEMU serial pipe")?;
        let (seen_tx, seen_rx) = std::sync::mpsc::channel::<()>();
        let needle = exit_on.clone();
        let copier = std::thread::spawn(move || {
            let mut reader = std::io::BufReader::new(out);
            let mut stdout = std::io::stdout();
            let mut line = Vec::new();
            let mut sent = false;
            loop {
                line.clear();
                match reader.read_until(b'\n', &mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let _ = stdout.write_all(&line);
                        let _ = stdout.flush();
                        if !sent {
                            if let Some(n) = &needle {
                                if String::from_utf8_lossy(&line).contains(n.as_str()) {
                                    sent = true;
                                    let _ = seen_tx.send(());
                                }
                            }
                        }
                    }
                }
            }
        });
        let deadline = timeout.map(|t| Instant::now() + Duration::from_secs(t));
        let outcome = loop {
            if seen_rx.try_recv().is_ok() {
                if let Ok(mut q) = vm.qmp() {
                    let _ = q.quit();
                }
                let _ = vm.wait();
                break Ok(exit::SUCCESS);
            }
            if let Some(exit) = vm.try_wait()? {
                break match (exit, &exit_on) {
                    (Exit::Stopped { .. }, None) => Ok(exit::SUCCESS),
                    (Exit::Stopped { .. }, Some(text)) => Err(anyhow::anyhow!(
                        "the VM stopped before its console printed `{text}`"
                    )),
                    (Exit::Crashed { status, .. }, _) => {
                        Err(anyhow::anyhow!("the VM crashed: QEMU ended with {status}"))
                    }
                };
            }
            if deadline.is_some_and(|d| Instant::now() > d) {
                vm.kill();
                break Err(anyhow::anyhow!(
                    "timed out after {} s{}",
                    timeout.unwrap_or(0),
                    exit_on
                        .as_ref()
                        .map(|t| format!(" waiting for `{t}` on the console"))
                        .unwrap_or_default()
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let _ = copier.join();
        outcome
    })();
    let _ = std::fs::remove_dir_all(&tmp);
    result
}

fn tempfile_dir() -> anyhow::Result<PathBuf> {
    let base = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let dir = base.join(format!(
        "tandem-vm-{}",
        tandem_tools::atomic::unique_suffix()
    ));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

fn console(
    state_dir: &Path,
    name: &str,
    log: bool,
    send: Option<String>,
    wait_for: Option<String>,
    timeout: u64,
) -> anyhow::Result<u8> {
    let rd = RunDir::existing(state_dir, name)?;
    if log {
        let bytes = std::fs::read(rd.serial_log()).unwrap_or_default();
        std::io::stdout().write_all(&bytes)?;
        return Ok(exit::SUCCESS);
    }
    if send.is_some() || wait_for.is_some() {
        if let Some(line) = send {
            let mut sock = std::os::unix::net::UnixStream::connect(rd.console_socket())
                .with_context(|| {
                    format!(
                        "VM `{name}` has no console; is it running? (`tandem vm status {name}`)"
                    )
                })?;
            sock.write_all(line.as_bytes())?;
            sock.write_all(b"\n")?;
            sock.flush()?;
            // Give QEMU a moment to take the bytes before the socket closes.
            std::thread::sleep(Duration::from_millis(200));
        }
        if let Some(text) = wait_for {
            let deadline = Instant::now() + Duration::from_secs(timeout);
            loop {
                let bytes = std::fs::read(rd.serial_log()).unwrap_or_default();
                if String::from_utf8_lossy(&bytes).contains(&text) {
                    break;
                }
                if Instant::now() > deadline {
                    bail!("VM `{name}` did not print `{text}` within {timeout} s; see `tandem vm console {name} --log`");
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        return Ok(exit::SUCCESS);
    }
    let sock = std::os::unix::net::UnixStream::connect(rd.console_socket()).with_context(|| {
        format!("VM `{name}` has no console; is it running? (`tandem vm status {name}`)")
    })?;
    eprintln!("connected to {name}'s console; Ctrl-] detaches");
    let mut from_vm = sock.try_clone()?;
    let mut to_vm = sock;
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        let mut out = std::io::stdout();
        while let Ok(n) = from_vm.read(&mut buf) {
            if n == 0 || out.write_all(&buf[..n]).and_then(|_| out.flush()).is_err() {
                break;
            }
        }
    });
    let mut stdin = std::io::stdin();
    let mut buf = [0u8; 1024];
    loop {
        let n = stdin.read(&mut buf)?;
        if n == 0 {
            break;
        }
        if let Some(pos) = buf[..n].iter().position(|&b| b == 0x1d) {
            to_vm.write_all(&buf[..pos])?;
            break;
        }
        to_vm.write_all(&buf[..n])?;
    }
    let _ = to_vm.shutdown(std::net::Shutdown::Both);
    let _ = reader.join();
    Ok(exit::SUCCESS)
}
