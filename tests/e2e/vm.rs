//! End-to-end tests: the VM supervisor with real QEMU (TCG) and the built guest.

use std::path::Path;

use super::util::*;

const READY: &str = "tandem-boot: ready";

fn guest_file(name: &str) -> std::path::PathBuf {
    guest().join(name)
}

#[test]
fn foreground_run_boots_the_guest_and_prints_its_release_marker() {
    let ran = run(tandem()
        .args(["vm", "run", "--image", "gold-v1", "--guest-dir"])
        .arg(guest())
        .args(["--accel", "auto", "--exit-on", READY, "--timeout", "120"]))
    .ok();
    assert!(
        ran.stdout.contains("tandem-release: tandem-gold 1"),
        "{}",
        ran.stdout
    );
    assert!(ran.stdout.contains(READY));
}

#[test]
fn named_vm_starts_stops_gracefully_and_refuses_a_second_copy() {
    let vm = NamedVm::new("e2e-named");
    let guest = guest();
    let start = |vm: &NamedVm| {
        run(&mut vm.cmd(
            "start",
            &[
                "--image",
                "gold-v1",
                "--guest-dir",
                guest.to_str().expect("utf8"),
                "--json",
            ],
        ))
    };
    let first = start(&vm).ok().json();
    assert_eq!(first["phase"], "running");
    assert_eq!(
        first["accel"], "tcg",
        "this machine has no vmx/svm: auto must pick TCG"
    );

    let second = start(&vm).code(3);
    assert!(
        second.stderr.contains("already running"),
        "{}",
        second.stderr
    );

    run(&mut vm.cmd(
        "console",
        &[
            "--wait-for",
            "tandem-release: tandem-gold 1",
            "--timeout",
            "120",
        ],
    ))
    .ok();
    run(&mut vm.cmd("console", &["--wait-for", READY, "--timeout", "60"])).ok();
    let listed = run(tandem()
        .args(["vm", "list", "--json", "--state-dir"])
        .arg(vm.state.path()))
    .ok()
    .json();
    assert_eq!(listed[0]["name"], vm.name.as_str());

    let stopped = run(&mut vm.cmd("stop", &["--timeout", "60", "--json"]))
        .ok()
        .json();
    assert_eq!(stopped["phase"], "stopped");
    assert_eq!(
        stopped["exit"]["how"], "guest",
        "the guest should power off on ACPI: {stopped}"
    );
    let log = run(&mut vm.cmd("console", &["--log"])).ok();
    assert!(
        log.stdout.contains("tandem-guest: powering off"),
        "{}",
        log.stdout
    );
    assert!(!process_running_with(&format!("tandem-{}", vm.name)));
}

#[test]
fn qemu_killed_from_outside_is_reported_as_a_crash_with_console_lines() {
    let vm = NamedVm::new("e2e-crash");
    let guest = guest();
    let st = run(&mut vm.cmd(
        "start",
        &[
            "--image",
            "gold-v1",
            "--guest-dir",
            guest.to_str().expect("utf8"),
            "--json",
        ],
    ))
    .ok()
    .json();
    run(&mut vm.cmd("console", &["--wait-for", READY, "--timeout", "120"])).ok();
    let pid = st["qemu_pid"].as_i64().expect("qemu pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill qemu");
    assert!(
        wait_for(30, || vm.status()["phase"] == "crashed"),
        "{}",
        vm.status()
    );
    let st = vm.status();
    assert!(
        st["exit"]["status"]
            .as_str()
            .unwrap_or("")
            .contains("signal"),
        "{st}"
    );
    let lines = st["exit"]["last_serial"].to_string();
    assert!(lines.contains("tandem-release: tandem-gold 1"), "{st}");
}

#[test]
fn killing_the_supervisor_takes_qemu_down_with_it() {
    let vm = NamedVm::new("e2e-orphan");
    let guest = guest();
    let st = run(&mut vm.cmd(
        "start",
        &[
            "--image",
            "gold-v1",
            "--guest-dir",
            guest.to_str().expect("utf8"),
            "--json",
        ],
    ))
    .ok()
    .json();
    let sup = st["supervisor_pid"].as_i64().expect("supervisor pid");
    let qemu = st["qemu_pid"].as_i64().expect("qemu pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(sup as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill supervisor");
    assert!(
        wait_for(15, || !Path::new(&format!("/proc/{qemu}")).exists()
            || std::fs::read_to_string(format!("/proc/{qemu}/stat"))
                .is_ok_and(|s| s.contains(") Z "))),
        "QEMU {qemu} outlived its supervisor"
    );
    assert_eq!(vm.status()["phase"], "crashed");
}

/// Runs a foreground VM expected to be refused before QEMU starts; returns stderr.
fn refused(args: &[&str], envs: &[(&str, &str)]) -> String {
    let mut cmd = tandem();
    cmd.args(["vm", "run", "--name", "e2e-bad", "--timeout", "30"])
        .args(args);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let ran = run(&mut cmd).code(3);
    assert!(ran.stderr.starts_with("tandem: "), "{}", ran.stderr);
    ran.stderr
}

#[test]
fn bad_inputs_get_one_clear_error_and_leave_no_qemu() {
    let dir = tempfile::tempdir().expect("tempdir");
    let kernel = guest_file("vmlinuz");
    let initrd = guest_file("initrd.img");
    let disk = dir.path().join("disk.raw");
    std::fs::write(&disk, vec![0u8; 1 << 20]).expect("write disk");
    let junk = dir.path().join("junk.bin");
    std::fs::write(&junk, b"this is not a kernel at all").expect("write junk");
    let k = kernel.to_str().expect("utf8");
    let i = initrd.to_str().expect("utf8");
    let d = disk.to_str().expect("utf8");
    let j = junk.to_str().expect("utf8");

    let e = refused(
        &[
            "--kernel",
            "/nonexistent/vmlinuz",
            "--initrd",
            i,
            "--disk",
            d,
        ],
        &[],
    );
    assert!(
        e.contains("kernel /nonexistent/vmlinuz cannot be read"),
        "{e}"
    );
    let e = refused(&["--kernel", j, "--initrd", i, "--disk", d], &[]);
    assert!(e.contains("not a Linux bzImage"), "{e}");
    let e = refused(
        &[
            "--kernel",
            k,
            "--initrd",
            "/nonexistent/initrd",
            "--disk",
            d,
        ],
        &[],
    );
    assert!(
        e.contains("initrd /nonexistent/initrd cannot be read"),
        "{e}"
    );
    let e = refused(&["--kernel", k, "--initrd", j, "--disk", d], &[]);
    assert!(e.contains("not a cpio archive"), "{e}");
    let e = refused(
        &[
            "--kernel",
            k,
            "--initrd",
            i,
            "--disk",
            "/nonexistent/disk.raw,format=raw",
        ],
        &[],
    );
    assert!(
        e.contains("disk /nonexistent/disk.raw cannot be read"),
        "{e}"
    );

    let qcow = dir.path().join("disk.qcow2");
    let made = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&qcow)
        .arg("16M")
        .status()
        .expect("qemu-img");
    assert!(made.success());
    let wrong = format!("{},format=raw", qcow.display());
    let e = refused(&["--kernel", k, "--initrd", i, "--disk", &wrong], &[]);
    assert!(e.contains("is qcow2 but was declared raw"), "{e}");
    let odd = dir.path().join("odd.raw");
    std::fs::write(&odd, vec![1u8; 1000]).expect("write");
    let e = refused(
        &[
            "--kernel",
            k,
            "--initrd",
            i,
            "--disk",
            odd.to_str().expect("utf8"),
        ],
        &[],
    );
    assert!(e.contains("multiple of 512"), "{e}");

    let e = refused(
        &["--kernel", k, "--initrd", i, "--disk", d],
        &[("PATH", "/nonexistent")],
    );
    assert!(e.contains("qemu-system-x86_64 is not installed"), "{e}");

    let busy = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = busy.local_addr().expect("addr").port();
    let ws = port.to_string();
    let e = refused(
        &[
            "--kernel",
            k,
            "--initrd",
            i,
            "--disk",
            d,
            "--vnc",
            "90",
            "--vnc-websocket",
            &ws,
        ],
        &[],
    );
    assert!(
        e.contains(&format!("port 127.0.0.1:{port} is in use")),
        "{e}"
    );

    assert!(
        !process_running_with("tandem-e2e-bad"),
        "a QEMU was left behind"
    );
}

#[test]
fn named_vm_bad_state_dir_and_busy_socket_are_refused() {
    let guest = guest();
    let g = guest.to_str().expect("utf8");
    let file = tempfile::NamedTempFile::new().expect("temp file");
    let ran = run(tandem()
        .args([
            "vm",
            "start",
            "e2e-unwritable",
            "--image",
            "gold-v1",
            "--guest-dir",
            g,
            "--state-dir",
        ])
        .arg(file.path().join("sub")))
    .code(3);
    assert!(ran.stderr.contains("is not writable"), "{}", ran.stderr);

    let vm = NamedVm::new("e2e-sock");
    let dir = vm.state.path().join(&vm.name);
    std::fs::create_dir_all(&dir).expect("mkdir");
    let _listener = std::os::unix::net::UnixListener::bind(dir.join("qmp.sock")).expect("bind");
    let ran = run(&mut vm.cmd("start", &["--image", "gold-v1", "--guest-dir", g])).code(3);
    assert!(
        ran.stderr.contains("is in use by another process"),
        "{}",
        ran.stderr
    );
    assert!(!process_running_with(&format!("tandem-{}", vm.name)));
}

#[test]
fn explicit_tcg_and_bad_accel_value() {
    let ran = run(tandem().args(["vm", "run", "--accel", "warp", "--image", "gold-v1"])).code(3);
    assert!(
        ran.stderr.contains("unknown accelerator `warp`"),
        "{}",
        ran.stderr
    );
}
