//! `packaging/router.service`: systemd accepts it as written (no unknown key,
//! every command exists), its sandboxing keeps the exposure score low, and
//! the capabilities it grants are enough to splice in the kernel as an
//! unprivileged user (and to listen below port 1024); the router speaks the
//! notify protocol of its `Type=notify`, its stop timeout leaves the drain
//! room, and a port below 1024 without the capability names it.
use std::{
    io::{Read, Write},
    net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener},
    os::unix::net::UnixDatagram,
    process::Command,
    time::Duration,
};

use testkit::{Server, backends::Backend, clients, privileges::require_bpf, temp_dir};

const BIN: &str = env!("CARGO_BIN_EXE_router");
const UNIT: &str = include_str!("../../packaging/router.service");
/// Where the unit expects the binary (`cargo install --root /usr/local`).
const INSTALLED: &str = "/usr/local/bin/router";

/// The unit's values for `key`, in order.
fn values(key: &str) -> Vec<&'static str> {
    UNIT.lines()
        .filter_map(|line| line.strip_prefix(key)?.strip_prefix('='))
        .collect()
}

/// `packaging/router@.service`: the unit with binary upgrades (two
/// instances taking turns, issue 24).
const TEMPLATE: &str = include_str!("../../packaging/router@.service");

#[test]
fn systemd_accepts_the_upgrade_template_unit_as_confined_as_the_unit() {
    let dir = temp_dir("template");
    let unit = dir.path().join("router@a.service");
    std::fs::write(&unit, TEMPLATE.replace(INSTALLED, BIN)).unwrap();
    verify_and_rate(&unit);
    // Both instances take over from whichever runs, on one socket in a
    // directory that outlives either; the reload is the same SIGHUP.
    let exec = TEMPLATE
        .lines()
        .find_map(|line| line.strip_prefix("ExecStart="))
        .unwrap();
    assert!(
        exec.contains("--upgrade-socket /run/router/upgrade.sock")
            && exec.contains("--upgrade-from /run/router/upgrade.sock"),
        "{exec}"
    );
    for line in [
        "RuntimeDirectory=router",
        "RuntimeDirectoryPreserve=yes",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
    ] {
        assert!(TEMPLATE.lines().any(|l| l == line), "{line}");
    }
    // Everything else is the plain unit's.
    let rest = |unit: &str| -> Vec<String> {
        unit.lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .filter(|l| {
                ![
                    "Description=",
                    "ExecStart=",
                    "Runtime",
                    "RestrictAddressFamilies=",
                ]
                .iter()
                .any(|p| l.starts_with(p))
            })
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(rest(TEMPLATE), rest(UNIT));
}

/// `systemd-analyze verify` accepts `unit` without a message, and `security`
/// rates it well confined.
fn verify_and_rate(unit: &std::path::Path) {
    let output = Command::new("systemd-analyze")
        .arg("verify")
        .arg(unit)
        .output()
        .expect("systemd-analyze (scripts/setup.sh --test installs systemd)");
    let stderr = String::from_utf8_lossy(&output.stderr);
    // Unknown keys are only warned about: any message is a failure.
    assert!(
        output.status.success() && stderr.trim().is_empty(),
        "{stderr}"
    );
    // The overall exposure (0 = fully confined, 10 = not at all); the
    // capabilities the probe needs and the network cost about 2.
    let output = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--threshold=25", "--no-pager"])
        .arg(unit)
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{report}");
    let name = unit.file_name().unwrap().to_string_lossy();
    let score = report
        .lines()
        .find_map(|line| {
            line.split(&format!("Overall exposure level for {name}: "))
                .nth(1)
        })
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|score| score.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no exposure level in: {report}"));
    assert!(score <= 2.5, "exposure {score}: {report}");
}

#[test]
fn systemd_accepts_the_unit_and_rates_it_well_confined() {
    assert!(UNIT.contains(INSTALLED));
    let dir = temp_dir("unit");
    // verify checks that each command exists: point them at this build.
    let unit = dir.path().join("router.service");
    std::fs::write(&unit, UNIT.replace(INSTALLED, BIN)).unwrap();
    verify_and_rate(&unit);

    for (key, wanted) in [
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("DynamicUser", "yes"),
        ("ExecReload", "/bin/kill -HUP $MAINPID"),
        ("Type", "notify"),
    ] {
        assert!(values(key).contains(&wanted), "{key}={wanted}");
    }
    assert_eq!(
        values("AmbientCapabilities"),
        values("CapabilityBoundingSet"),
        "the bounding set is exactly the ambient set"
    );
}

/// A free port below 1024 on loopback.
fn privileged_port() -> u16 {
    (900..1024)
        .find(|port| TcpListener::bind((Ipv4Addr::LOCALHOST, *port)).is_ok())
        .expect("a free port below 1024")
}

#[test]
fn the_unit_s_capabilities_are_enough_to_splice_as_an_unprivileged_user() {
    if !require_bpf("unit_capabilities (needs root to drop privileges)") {
        return;
    }
    let capabilities: Vec<String> = values("AmbientCapabilities")[0]
        .split_whitespace()
        .map(|cap| format!("+{}", cap.trim_start_matches("CAP_").to_lowercase()))
        .collect();
    let set = format!("-all,{}", capabilities.join(","));
    // A copy that user nobody can reach (the build tree may be in /root).
    let dir = temp_dir("unit-caps");
    let binary = dir.path().join("router");
    std::fs::copy(BIN, &binary).unwrap();
    for path in [dir.path(), binary.as_path()] {
        Command::new("chmod").arg("755").arg(path).status().unwrap();
    }
    let backend = Backend::echo();
    let listen = SocketAddr::from((Ipv4Addr::LOCALHOST, privileged_port()));
    let mut command = Command::new("setpriv");
    command
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(format!("--inh-caps={set}"))
        .arg(format!("--ambient-caps={set}"))
        .arg(format!("--bounding-set={set}"))
        .args(["--no-new-privs", "--"])
        .arg(&binary)
        // Spliced from the first packet on: the few bytes below are enough.
        .args(["--listen", &listen.to_string(), "--mode", "ebpf"])
        .args(["--splice-after", "0", "--route"])
        .arg(format!("default={}", backend.addr));
    let mut router = Server::start_command(&mut command);
    assert_eq!(router.addr, listen);
    let status = std::fs::read_to_string(format!("/proc/{}/status", router.pid())).unwrap();
    assert!(status.contains("Uid:\t65534"), "{status}");

    let mut stream = clients::connect(router.addr).unwrap();
    stream.write_all(b"\x00first").unwrap();
    let mut echoed = [0u8; 6];
    stream.read_exact(&mut echoed).unwrap();
    stream.write_all(b"second").unwrap();
    stream.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).unwrap();
    assert_eq!([&echoed[..], &rest].concat(), b"\x00firstsecond");
    let stats = router.wait_stats(|s| s.get("active") == 0, Duration::from_secs(10));
    assert_eq!(stats.get("spliced"), 1, "{stats:?}");
    assert!(stats.get("kernel_redirected_bytes") >= 12, "{stats:?}");
}

#[test]
fn the_stop_timeout_leaves_the_drain_room_to_finish() {
    let stop = humantime::parse_duration(values("TimeoutStopSec")[0]).unwrap();
    let drain = router::config::Config::default().drain_timeout;
    assert!(
        stop >= drain + Duration::from_secs(10),
        "TimeoutStopSec {stop:?} vs drain_timeout {drain:?}"
    );
}

/// What a service manager receives on `NOTIFY_SOCKET`, with a deadline.
fn notification(socket: &UnixDatagram) -> String {
    let mut buffer = [0u8; 4096];
    let n = socket
        .recv(&mut buffer)
        .expect("a notification within 10 s");
    String::from_utf8_lossy(&buffer[..n]).into_owned()
}

#[test]
fn the_router_tells_the_service_manager_ready_reloading_and_stopping() {
    let dir = temp_dir("notify");
    let path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let backend = Backend::echo();
    let mut command = Command::new(BIN);
    command
        .env("NOTIFY_SOCKET", &path)
        .args(["--listen", "127.0.0.1:0", "--mode", "copy", "--route"])
        .arg(format!("default={}", backend.addr));
    let mut router = Server::start_command(&mut command);
    let ready = notification(&socket);
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready:?}");
    router.signal(libc::SIGHUP);
    let reloading = notification(&socket);
    let lines: Vec<&str> = reloading.lines().collect();
    assert_eq!(lines[0], "RELOADING=1", "{reloading:?}");
    // systemd 253 and later fail a reload without it.
    let usec: u64 = lines
        .iter()
        .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no MONOTONIC_USEC in {reloading:?}"));
    assert!(usec > 0);
    let ready = notification(&socket);
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready:?}");
    router.signal(libc::SIGTERM);
    let stopping = notification(&socket);
    assert!(stopping.lines().any(|l| l == "STOPPING=1"), "{stopping:?}");
    assert!(router.wait_exit(Duration::from_secs(10)).is_some());
}

#[test]
fn a_port_below_1024_without_the_capability_names_cap_net_bind_service() {
    let backend = Backend::echo();
    let listen = SocketAddr::from((Ipv4Addr::LOCALHOST, privileged_port()));
    let mut command = Command::new("setpriv");
    command
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .args(["--inh-caps=-all", "--ambient-caps=-all", "--"])
        .arg(BIN)
        .args(["--listen", &listen.to_string(), "--mode", "copy", "--route"])
        .arg(format!("default={}", backend.addr));
    let (status, stderr) = testkit::server::run_to_failure(&mut command);
    assert!(!status.success());
    assert!(
        stderr.contains(&format!("cannot listen on {listen}"))
            && stderr.contains("CAP_NET_BIND_SERVICE"),
        "{stderr}"
    );
}
