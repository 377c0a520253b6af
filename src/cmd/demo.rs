//! `tandem demo`: the whole Tandem story on one machine, narrated, with real QEMU guests,
//! a real server on loopback and a real agent directory. It cleans up after itself.
//!
//! Every step runs this same binary as a subprocess, exactly as an administrator or a
//! laptop user would type it, so the demo exercises the product rather than a shortcut.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

use crate::exit;
use crate::output::Global;

/// Arguments of `tandem demo`.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Keep the demo's directories (server data, agent dir) instead of deleting them.
    #[arg(long)]
    keep: bool,
    /// Directory of the built guest.
    #[arg(
        long,
        env = "TANDEM_GUEST_DIR",
        default_value = "/var/cache/tandem/guest"
    )]
    guest_dir: PathBuf,
}

struct Story {
    exe: PathBuf,
    root: PathBuf,
    server_url: String,
    admin_token: String,
    server: Option<Child>,
    /// The agent daemons (`tandem agent run`), one per laptop.
    daemons: Vec<Child>,
    step: usize,
    guest_dir: PathBuf,
    /// Console lines already shown, per VM, for the current boot.
    shown: std::cell::RefCell<std::collections::HashMap<String, usize>>,
    /// The laptop the story is on (the second one appears after the theft).
    laptop: std::cell::RefCell<PathBuf>,
}

impl Story {
    fn agent(&self) -> PathBuf {
        self.root.join("laptop")
    }
    fn data(&self) -> PathBuf {
        self.root.join("server")
    }
    fn vms(&self) -> PathBuf {
        self.laptop.borrow().join("vms")
    }

    fn laptop2(&self) -> PathBuf {
        self.root.join("laptop2")
    }

    /// Moves the story to another laptop.
    fn switch_to(&self, laptop: PathBuf) {
        *self.laptop.borrow_mut() = laptop;
        self.shown.borrow_mut().clear();
    }

    fn say(&mut self, title: &str) {
        self.step += 1;
        println!("\n== {}. {title}", self.step);
    }

    fn note(&self, text: &str) {
        println!("   {text}");
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.exe);
        c.args(args)
            .env("TANDEM_SERVER", &self.server_url)
            .env("TANDEM_ADMIN_TOKEN", &self.admin_token)
            .env("TANDEM_AGENT_DIR", self.agent())
            .env("TANDEM_GUEST_DIR", &self.guest_dir)
            .env_remove("TANDEM_LOG");
        c
    }

    /// Runs a step's command; shows it and its output; fails the demo when it fails.
    fn run(&self, args: &[&str]) -> anyhow::Result<String> {
        println!("   $ tandem {}", args.join(" "));
        let out = self
            .cmd(args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running tandem {}", args.join(" ")))?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        for line in stdout
            .lines()
            .chain(stderr.lines())
            .filter(|l| !l.trim().is_empty())
        {
            println!("     {line}");
        }
        if !out.status.success() {
            bail!("`tandem {}` failed: {}", args.join(" "), stderr.trim());
        }
        Ok(stdout)
    }

    /// Runs a command that must be refused; shows the refusal.
    fn refused(&self, args: &[&str]) -> anyhow::Result<String> {
        println!("   $ tandem {}", args.join(" "));
        let out = self.cmd(args).stdin(Stdio::null()).output()?;
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        for line in stderr.lines() {
            println!("     {line}");
        }
        if out.status.success() {
            bail!("`tandem {}` should have been refused", args.join(" "));
        }
        Ok(stderr)
    }

    /// Runs a command for its JSON answer (not shown: the story shows what matters).
    fn json(&self, args: &[&str]) -> anyhow::Result<serde_json::Value> {
        let out = self.cmd(args).stdin(Stdio::null()).output()?;
        if !out.status.success() {
            bail!(
                "`tandem {}` failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        serde_json::from_str(&text)
            .with_context(|| format!("`tandem {}` printed no JSON", args.join(" ")))
    }

    /// Waits until the desktop's console printed `text` in this boot, and shows the lines
    /// that start with `tandem-`.
    fn console_until(&self, vm: &str, text: &str) -> anyhow::Result<Vec<String>> {
        let log = self.vms().join(vm).join("serial.log");
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            let content = std::fs::read(&log).unwrap_or_default();
            let content = String::from_utf8_lossy(&content).into_owned();
            if content.contains(text) {
                let lines: Vec<String> = content
                    .lines()
                    .map(|l| l.trim_end_matches('\r').to_string())
                    .filter(|l| l.starts_with("tandem-"))
                    .collect();
                let mut shown = self.shown.borrow_mut();
                let already = shown.entry(vm.to_string()).or_insert(0);
                for l in lines.iter().skip(*already) {
                    println!("     [{vm} console] {l}");
                }
                *already = lines.len();
                return Ok(lines);
            }
            if Instant::now() > deadline {
                bail!(
                    "the {vm} VM did not print `{text}` within 180 s; see {}",
                    log.display()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Starts the laptop's agent daemon in the background and waits for its socket.
    fn start_daemon(&mut self, laptop: &Path) -> anyhow::Result<()> {
        println!(
            "   $ tandem agent run --dir {} &   (the daemon that owns the laptop)",
            laptop.display()
        );
        let name = laptop
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let log = std::fs::File::create(self.root.join(format!("daemon-{name}.log")))?;
        let child = self
            .cmd(&["agent", "run", "--dir", &laptop.to_string_lossy()])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting the agent daemon")?;
        self.daemons.push(child);
        let socket = laptop.join("agent.sock");
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            if Instant::now() > deadline {
                bail!("the agent daemon did not come up; see daemon-{name}.log");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    /// Starts a desktop and waits until its console is ready.
    fn start_desktop(&self, desktop: &str) -> anyhow::Result<()> {
        let agent = self.laptop.borrow().clone();
        self.run(&[
            "desktop",
            "start",
            desktop,
            "--dir",
            &agent.to_string_lossy(),
        ])?;
        self.shown.borrow_mut().insert(desktop.to_string(), 0);
        self.console_until(desktop, "tandem-boot: ready").map(drop)
    }

    fn type_into(&self, vm: &str, line: &str) -> anyhow::Result<()> {
        println!("   (typing into the {vm} console) {line}");
        let vms = self.vms();
        let state = vms.to_string_lossy();
        let out = self
            .cmd(&["vm", "console", vm, "--state-dir", &state, "--send", line])
            .output()?;
        if !out.status.success() {
            bail!("typing into {vm}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }
}

impl Drop for Story {
    fn drop(&mut self) {
        for laptop in [self.agent(), self.laptop2()] {
            for vm in ["corporate", "personal"] {
                let _ = self
                    .cmd(&["vm", "stop", vm, "--timeout", "10", "--state-dir"])
                    .arg(laptop.join("vms"))
                    .output();
            }
        }
        for mut d in self.daemons.drain(..) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(d.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = d.wait();
        }
        if let Some(mut s) = self.server.take() {
            let _ = s.kill();
            let _ = s.wait();
        }
    }
}

fn wait_for_file(path: &Path, secs: u64) -> anyhow::Result<String> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Ok(text) = std::fs::read_to_string(path) {
            if !text.trim().is_empty() {
                return Ok(text.trim().to_string());
            }
        }
        if Instant::now() > deadline {
            bail!("{} did not appear within {secs} s", path.display());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs `tandem demo`.
pub fn run(args: DemoArgs, global: &Global) -> anyhow::Result<u8> {
    let root = tempfile_root()?;
    let result = story(&root, &args, global);
    if args.keep {
        println!("\nkept the demo's directories in {}", root.display());
    } else {
        let _ = std::fs::remove_dir_all(&root);
    }
    result.map(|_| exit::SUCCESS)
}

fn tempfile_root() -> anyhow::Result<PathBuf> {
    let root = std::env::temp_dir().join(format!("tandem-demo-{}", std::process::id()));
    std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
    Ok(root)
}

fn story(root: &Path, args: &DemoArgs, global: &Global) -> anyhow::Result<()> {
    println!("Tandem demo: one laptop, a corporate and a personal desktop, managed from a server.");
    let mut s = Story {
        exe: std::env::current_exe().context("locating the tandem binary")?,
        root: root.to_path_buf(),
        server_url: String::new(),
        admin_token: String::new(),
        server: None,
        daemons: Vec::new(),
        step: 0,
        guest_dir: args.guest_dir.clone(),
        shown: Default::default(),
        laptop: std::cell::RefCell::new(root.join("laptop")),
    };

    s.say("Build the demo guest (Debian cloud kernel, busybox initramfs, gold v1/v2 and personal root disks)");
    let assets = crate::cmd::guest::build_guest(&args.guest_dir, global.quiet)?;
    let gold1 = assets
        .image("gold-v1")
        .context("guest has no gold-v1")?
        .to_path_buf();
    let gold2 = assets
        .image("gold-v2")
        .context("guest has no gold-v2")?
        .to_path_buf();
    let personal = assets
        .image("personal")
        .context("guest has no personal image")?
        .to_path_buf();
    s.note(&format!(
        "kernel {} ({})",
        assets.kernel.display(),
        assets.kernel_package
    ));

    s.say("Start the management server (SQLite + a local chunk store, on 127.0.0.1)");
    let ready = root.join("server.url");
    let log = std::fs::File::create(root.join("server.log"))?;
    let data = s.data();
    println!(
        "   $ tandem server --data {} --listen 127.0.0.1:0",
        data.display()
    );
    let child = Command::new(&s.exe)
        .args(["server", "--listen", "127.0.0.1:0", "--data"])
        .arg(&data)
        .arg("--ready-file")
        .arg(&ready)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting the server")?;
    s.server = Some(child);
    s.server_url = wait_for_file(&ready, 30)?;
    let server_log = std::fs::read_to_string(root.join("server.log")).unwrap_or_default();
    s.admin_token = server_log
        .lines()
        .find_map(|l| l.strip_prefix("admin token: "))
        .map(str::to_string)
        .context("the server did not print its first-start admin credential")?;
    s.note(&format!(
        "server at {}; admin credential printed once at first start",
        s.server_url
    ));

    s.say("IT scans gold v1 offline (no boot), then publishes it");
    s.run(&["scan", "image", &gold1.to_string_lossy()])?;
    let data_s = data.to_string_lossy().into_owned();
    s.run(&[
        "image",
        "publish",
        "corp-gold",
        &gold1.to_string_lossy(),
        "--data",
        &data_s,
    ])?;
    s.run(&[
        "image",
        "publish",
        "personal-base",
        &personal.to_string_lossy(),
        "--data",
        &data_s,
    ])?;

    s.say("IT creates a user, assigns the desktops, and hands out a one-time enrollment token");
    s.run(&["admin", "user", "create", "alice"])?;
    s.run(&[
        "admin",
        "assign",
        "--user",
        "alice",
        "--corporate",
        "corp-gold:1",
        "--personal",
        "personal-base:1",
        "--reason",
        "new hire",
    ])?;
    let token = s.json(&["admin", "token", "create", "--user", "alice", "--json"])?;
    let token = token["token"]
        .as_str()
        .context("token create printed no token")?
        .to_string();

    s.say("The laptop enrolls (it makes its own key), checks in and gets a signed 14-day lease");
    let agent = s.agent();
    let agent_s = agent.to_string_lossy().into_owned();
    s.run(&[
        "agent",
        "enroll",
        "--dir",
        &agent_s,
        "--server",
        &s.server_url.clone(),
        "--token",
        &token,
    ])?;
    s.run(&["agent", "check-in", "--dir", &agent_s])?;
    s.run(&["agent", "status", "--dir", &agent_s])?;

    s.say(
        "The laptop syncs its assigned images (every chunk verified against the signed manifest)",
    );
    let key = s.json(&["image", "key", "--data", &data_s]).ok();
    let key = match key {
        Some(serde_json::Value::String(k)) => k,
        _ => s
            .run(&["image", "key", "--data", &data_s])?
            .trim()
            .to_string(),
    };
    let url = s.server_url.clone();
    s.run(&[
        "image",
        "pull",
        "corp-gold@1",
        "--server",
        &url,
        "--dir",
        &agent_s,
        "--image-key",
        &key,
    ])?;
    s.run(&[
        "image",
        "pull",
        "personal-base@1",
        "--server",
        &url,
        "--dir",
        &agent_s,
    ])?;

    s.say("Start the agent daemon: from now on it owns the laptop (desktops, bases over NBD, check-ins, backups)");
    s.start_daemon(&agent)?;

    s.say("Boot the corporate desktop: gold v1 under a volatile overlay, encrypted user disk");
    s.start_desktop("corporate")?;
    s.type_into("corporate", "echo 'Q3 plan, draft 2' > /home/user/notes.txt; echo 'malware' > /usr/bin/evil; sync; echo tandem-demo: saved")?;
    s.console_until("corporate", "tandem-demo: saved")?;
    s.note("back up the user disk while the desktop runs (paused for the copy, then resumed):");
    s.run(&["desktop", "backup", "--dir", &agent_s])?;
    s.run(&["desktop", "stop", "corporate", "--dir", &agent_s])?;

    s.say("IT publishes gold v2; the laptop sees how little will move, then pulls it");
    s.run(&[
        "image",
        "publish",
        "corp-gold",
        &gold2.to_string_lossy(),
        "--data",
        &data_s,
    ])?;
    s.run(&[
        "admin",
        "assign",
        "--user",
        "alice",
        "--corporate",
        "corp-gold:2",
        "--reason",
        "monthly update",
    ])?;
    s.run(&[
        "image",
        "pull",
        "corp-gold@2",
        "--server",
        &url,
        "--dir",
        &agent_s,
        "--dry-run",
    ])?;
    s.run(&[
        "image",
        "pull",
        "corp-gold@2",
        "--server",
        &url,
        "--dir",
        &agent_s,
    ])?;
    s.run(&["agent", "check-in", "--dir", &agent_s])?;

    s.say("Reboot the corporate desktop: it runs v2, the user's file survived, the system change did not");
    s.start_desktop("corporate")?;
    s.type_into(
        "corporate",
        "ls /usr/bin/evil 2>/dev/null || echo tandem-demo: system change gone",
    )?;
    let lines = s.console_until("corporate", "tandem-demo: system change gone")?;
    if !lines.iter().any(|l| l.contains("tandem-gold 2")) {
        bail!("the corporate desktop did not boot gold v2");
    }
    if !lines
        .iter()
        .any(|l| l.contains("tandem-user-file: Q3 plan, draft 2"))
    {
        bail!("the user's file did not survive the update");
    }
    s.type_into(
        "corporate",
        "echo 'Q3 plan, final' >> /home/user/notes.txt; sync; echo tandem-demo: edited",
    )?;
    s.console_until("corporate", "tandem-demo: edited")?;

    s.say("Both desktops at once: the personal one starts next to the corporate one (each its own QEMU)");
    s.start_desktop("personal")?;
    s.run(&["desktop", "status", "--dir", &agent_s])?;
    let both = s.json(&["desktop", "status", "--dir", &agent_s, "--json"])?;
    let running = both
        .as_array()
        .map(|a| a.iter().filter(|v| v["phase"] == "running").count())
        .unwrap_or(0);
    if running != 2 {
        bail!("expected both desktops running, got {both}");
    }
    s.run(&["desktop", "stop", "corporate", "--dir", &agent_s])?;
    s.note("the next backup (desktop off) moves only what changed:");
    s.run(&["desktop", "backup", "--dir", &agent_s])?;

    s.say("The personal desktop: the user breaks it, rolls back, then resets it");
    s.type_into(
        "personal",
        "echo tuned > /root/state.txt; sync; echo tandem-demo: tuned",
    )?;
    s.console_until("personal", "tandem-demo: tuned")?;
    s.run(&["vm", "snapshot", "personal", "tuned", "--dir", &agent_s])?;
    s.type_into(
        "personal",
        "echo BROKEN > /root/state.txt; sync; echo tandem-demo: broken",
    )?;
    s.console_until("personal", "tandem-demo: broken")?;
    s.refused(&["vm", "reset", "personal", "--dir", &agent_s])?;
    s.run(&["desktop", "stop", "personal", "--dir", &agent_s])?;
    s.run(&["vm", "rollback", "personal", "tuned", "--dir", &agent_s])?;
    s.start_desktop("personal")?;
    s.console_until("personal", "tandem-personal-state: tuned")?;
    s.run(&["desktop", "stop", "personal", "--dir", &agent_s])?;
    s.run(&["vm", "reset", "personal", "--dir", &agent_s])?;
    s.start_desktop("personal")?;
    s.console_until("personal", "tandem-personal-state: pristine")?;
    s.run(&["desktop", "stop", "personal", "--dir", &agent_s])?;

    s.say("The laptop is stolen: IT enrolls a replacement and moves alice's desktop to it");
    let device_of = |dir: &str| -> anyhow::Result<String> {
        let status = s.json(&["agent", "status", "--dir", dir, "--json"])?;
        Ok(status["device"]
            .as_str()
            .or_else(|| status["device_id"].as_str())
            .context("agent status names no device")?
            .to_string())
    };
    let device = device_of(&agent_s)?;
    let laptop2 = s.laptop2();
    let laptop2_s = laptop2.to_string_lossy().into_owned();
    let token2 = s.json(&["admin", "token", "create", "--user", "alice", "--json"])?;
    let token2 = token2["token"]
        .as_str()
        .context("token create printed no token")?
        .to_string();
    s.run(&[
        "agent", "enroll", "--dir", &laptop2_s, "--server", &url, "--token", &token2,
    ])?;
    let device2 = device_of(&laptop2_s)?;
    s.run(&[
        "admin",
        "device",
        "replace",
        &device,
        &device2,
        "--reason",
        "reported stolen",
    ])?;
    s.run(&["admin", "backups", "list", "alice"])?;

    s.say("The thief boots the stolen laptop's corporate desktop; at its next check-in the kill lands");
    s.note("(until it calls in, only the lease limits it: still valid, so the desktop starts)");
    s.start_desktop("corporate")?;
    let _ = s.run(&["agent", "check-in", "--dir", &agent_s]);
    let status = s.json(&["desktop", "status", "--dir", &agent_s, "--json"])?;
    let corporate_phase = status
        .as_array()
        .and_then(|a| a.iter().find(|v| v["name"] == "corporate"))
        .map(|v| v["phase"].as_str().unwrap_or("?").to_string())
        .unwrap_or_else(|| "?".into());
    s.note(&format!("corporate VM after the kill: {corporate_phase}"));
    if corporate_phase == "running" {
        bail!("the kill did not stop the running corporate VM");
    }
    s.refused(&["desktop", "start", "corporate", "--dir", &agent_s])?;
    let keys_left = agent.join("keys").join("wrap.key").exists();
    let disk_left = agent.join("corporate").join("user.qcow2").exists();
    s.note(&format!(
        "corporate keys on the laptop: {}; corporate user disk: {}",
        if keys_left {
            "STILL THERE"
        } else {
            "destroyed"
        },
        if disk_left { "STILL THERE" } else { "deleted" }
    ));
    if keys_left || disk_left {
        bail!("the kill did not erase the corporate data");
    }

    s.say("The replacement laptop checks in, syncs, and starts alice's corporate desktop: her file is back");
    s.switch_to(laptop2.clone());
    s.start_daemon(&laptop2)?;
    s.run(&["agent", "check-in", "--dir", &laptop2_s])?;
    s.start_desktop("corporate")?;
    let lines = s.console_until("corporate", "tandem-boot: ready")?;
    if !lines
        .iter()
        .any(|l| l.contains("tandem-user-file: Q3 plan, draft 2"))
    {
        bail!("the user's file did not come back on the replacement laptop");
    }
    s.run(&["desktop", "stop", "corporate", "--dir", &laptop2_s])?;
    s.run(&["admin", "audit", "--device", &device])?;
    println!(
        "\nDemo complete: every step above ran the real binary, QEMU and server on this machine."
    );
    Ok(())
}
