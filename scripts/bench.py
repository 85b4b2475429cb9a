#!/usr/bin/env python3
"""The side-by-side benchmark behind scripts/bench.sh (run that: it installs
the peers and builds the router first).

Contenders (all on loopback, same client, same backends): direct (no proxy),
router ebpf, router copy, HAProxy mode tcp with and without splice-auto, nginx
stream, socat fork. For each workload every contender is started, then the
repetitions are interleaved (rep 1 of every contender, then rep 2, ...), so a
noisy machine hurts all of them alike; medians with min/max are reported.
"""
import argparse
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ROUTER = ROOT / "target/release/router"
# The other build's contenders, with --compare.
BEFORE = " (before)"
LOADGEN = ROOT / "target/release/loadgen"
USER_HZ = os.sysconf("SC_CLK_TCK")
NAME = "bench.test"
# Each proxied connection takes two descriptors in the proxy and the hard
# limit is 20,000 here (it cannot be raised), so 10,000 is out of reach.
FD_HARD_LIMIT = 20000
# The scaling run's top level: under the router's default connection limit,
# derived from that descriptor limit (9,872 here).
TOP_LEVEL = 9800
# The small request/response workload (redis-benchmark -c 50 -d 64): its
# requests per command, and the bound on one run's time.
REDIS_CONNECTIONS = 50
REDIS_REQUESTS = 50000
REDIS_TIMEOUT_S = 120
# "Userspace CPU per GB spliced ≈ 0": at most 1% of a core at 1 GB/s.
NEAR_ZERO_CPU_S_PER_GB = 0.01


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, proc=None, seconds=10):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {seconds}s")


def listening(port):
    """Whether a socket listens on 127.0.0.1:`port` (read from
    /proc/net/tcp: no connection is made)."""
    local = f"0100007F:{port:04X}"
    rows = (line.split() for line in Path("/proc/net/tcp").read_text().splitlines()[1:])
    return any(f[1] == local and f[3] == "0A" for f in rows)


def wait_listening(port, proc, seconds=10):
    """wait_port without connecting. A peer passes a check connection on to
    the backend, where iperf3's server takes it for a test; one passed on
    late lands among the measured runs (a quick run's iperf3 log showed
    such empty tests between them, and two 64-stream runs failed)."""
    deadline = time.time() + seconds
    while not listening(port):
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}")
        if time.time() > deadline:
            raise RuntimeError(f"nothing listens on port {port} after {seconds}s")
        time.sleep(0.05)


def run(cmd, timeout):
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))}: exit {done.returncode}: {done.stderr.strip()[-400:]}")
    return done.stdout


class Processes:
    """Every process the run starts, stopped on exit whatever happens."""

    def __init__(self, logs):
        self.procs = []
        self.logs = logs

    def start(self, name, cmd, **kwargs):
        log = open(self.logs / f"{name}.log", "ab")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, **kwargs)
        self.procs.append(proc)
        return proc

    def stop(self, proc):
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def stop_all(self):
        for proc in reversed(self.procs):
            try:
                self.stop(proc)
            except ProcessLookupError:
                pass


def process_tree(pid):
    """pid and its descendants (nginx workers, socat children)."""
    pids = [pid]
    try:
        for child in Path(f"/proc/{pid}/task").glob("*/children"):
            for c in child.read_text().split():
                pids += process_tree(int(c))
    except OSError:  # it exited meanwhile (socat's children do)
        pass
    return pids


def cpu_seconds(pid):
    """user+sys of a process tree, reaped children included."""
    total = 0
    for p in process_tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # exited meanwhile
            continue
        total += sum(int(x) for x in fields[11:15])
    return total / USER_HZ


def rss_kib(pid):
    total = 0
    for p in process_tree(pid):
        try:
            m = re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{p}/status").read_text())
        except OSError:  # exited meanwhile
            continue
        total += int(m.group(1)) if m else 0
    return total


def machine_cpu():
    """(busy, softirq) seconds summed over all CPUs."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = f[:8]
    return (user + nice + system + irq + softirq + steal) / USER_HZ, softirq / USER_HZ


# ---------------------------------------------------------------- contenders


def settle(pid, quiet_cpu_s=0.005, interval=0.1, limit=10.0):
    """Waits until process `pid` (if any) used less than `quiet_cpu_s` of CPU
    over `interval` (it finished setting up or tearing down connections),
    at most `limit` seconds, then a fifth of a second more."""
    deadline = time.time() + limit
    while pid and time.time() < deadline:
        before = cpu_seconds(pid)
        time.sleep(interval)
        if cpu_seconds(pid) - before < quiet_cpu_s:
            break
    time.sleep(0.2)


class Contender:
    """A proxy (or none) started for one workload, towards given backends."""

    name = "?"

    def start(self, procs, workdir, routes):
        """routes: {"kind": "default"|"host"|"sni", "backend": port,
        "idle": port or None}. Returns the port clients connect to."""
        raise NotImplementedError

    pid = None


class Direct(Contender):
    name = "direct"

    def start(self, procs, workdir, routes):
        self.pid = None
        self.idle_port = routes.get("idle")
        return routes["backend"]


class Router(Contender):
    def __init__(self, mode, binary=ROUTER, tag=""):
        self.mode = mode
        self.binary = binary
        self.name = f"router {mode}{tag}"

    def start(self, procs, workdir, routes):
        port = free_port()
        kind, backend = routes["kind"], routes["backend"]
        flags = [f"--route=preamble:idle=127.0.0.1:{routes['idle']}"] if routes.get("idle") else []
        flags.append(f"--route={kind}{':' + NAME if kind != 'default' else ''}=127.0.0.1:{backend}")
        proc = procs.start(
            self.name.replace(" ", "-").replace("(", "").replace(")", ""),
            [self.binary, "--listen", f"127.0.0.1:{port}", "--mode", self.mode, *flags],
            env={**os.environ, "RUST_LOG": "warn"},
        )
        wait_port(port, proc)
        self.pid = proc.pid
        self.idle_port = port
        return port


# The peers: each as its users tune it for these workloads ("tuned", what the
# goal rows compare with), and as the runs before issue 22 ran it, with the
# default buffers ("(defaults)", extra rows). The report prints each one's
# whole configuration and what each tuned setting does (`settings`).
TUNED = " tuned"
DEFAULTS = " (defaults)"
# The router's copy mode reads into a buffer that grows up to 256 KiB
# (MAX_BUFFER in splice/src/forward.rs): the tuned peers move as much per call.
COPY_BUFFER = 262144
# The router's listen backlog (BACKLOG in splice/src/runtime.rs).
BACKLOG = 4096
# HAProxy asks for 2 descriptors per connection, 2 per pipe and a few more
# (28 here) at start-up, and refuses to start past the hard limit: 9,850
# connections (the scaling run's 9,800 and the active stream) and 64 pipes
# (one per stream of the 64-stream run) take 19,856 of the 20,000.
HAPROXY_MAXCONN = TOP_LEVEL + 50
HAPROXY_MAXPIPES = 64
# Placeholders the report shows in the configurations it prints.
SHOWN_ROUTES = {"kind": "default", "backend": "BACKEND"}


def slug(name):
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


class Peer(Contender):
    """A proxy the router is compared with; `configuration(port, routes)` is
    its whole configuration (a file's text, or socat's command line)."""

    base = "?"
    # (setting, what it does) of the tuned configuration, for the report.
    settings = []
    # Settings left at their defaults in the tuned configuration, and why.
    not_set = []

    def __init__(self, tuned):
        self.tuned = tuned
        self.name = self.base + (TUNED if tuned else DEFAULTS)

    def configuration(self, port, routes, idle_port=None):
        raise NotImplementedError

    def command(self, config_path):
        raise NotImplementedError

    def start(self, procs, workdir, routes):
        port = free_port()
        self.idle_port = free_port() if routes.get("idle") else None
        text = self.configuration(port, routes, self.idle_port)
        conf = workdir / f"{slug(self.name)}.conf"
        conf.write_text(text.replace("WORKDIR", str(workdir)))
        proc = procs.start(slug(self.name), self.command(conf))
        wait_listening(port, proc)
        if self.idle_port:
            wait_listening(self.idle_port, proc)
        self.pid = proc.pid
        return port


class Haproxy(Peer):
    base = "haproxy"
    settings = [
        ("tune.bufsize 262144", "Each connection's two buffers (one per direction) hold 256 KiB instead of 16 KiB: one read or write moves up to 256 KiB, as the router's copy mode does. They are allocated while data waits in them, so idle connections do not pay for them."),
        ("tune.pipesize 1048576", "The kernel pipes that splicing goes through hold 1 MiB (`fs.pipe-max-size` here) instead of 64 KiB: fewer splice() calls per byte."),
        ("option splice-auto", "HAProxy moves a direction's bytes socket → pipe → socket with splice(2), never copying them to userspace, once its heuristics judge that worth it (a transfer that fills its buffer); small exchanges stay in the buffers."),
        ("nbthread 2", "One thread per core (HAProxy's default here as well: `haproxy -vv` says default=2)."),
        ("cpu-map auto:1/1-2 0-1", "Pins thread 1 to CPU 0 and thread 2 to CPU 1, as the router pins one executor per core."),
        (f"maxconn {HAPROXY_MAXCONN}", f"Up to {HAPROXY_MAXCONN:,} concurrent connections (the frontend's limit defaults to it), room for the scaling run's {TOP_LEVEL:,}; it is also the listen backlog asked for (the kernel caps it at `net.core.somaxconn`, 4,096 here, the router's backlog)."),
        (f"maxpipes {HAPROXY_MAXPIPES}", f"At most {HAPROXY_MAXPIPES} pipes for splicing (default maxconn/4): HAProxy reserves 2 descriptors per connection and 2 per pipe and will not start past the 20,000-descriptor hard limit; {HAPROXY_MAXPIPES} is one per stream of the 64-stream run, and a direction that finds no pipe is copied."),
    ]
    not_set = [
        ("tune.maxaccept", "HAProxy 2.6's manual: the default (4) \"showed best results\" and \"it should normally not be needed to tweak this value\"."),
        ("tune.rcvbuf.* / tune.sndbuf.*", "The manual: \"should normally never be set\"; the kernel autotunes socket buffers, as it does for the router."),
        ("option tcp-smart-accept / tcp-smart-connect", "Each saves one ACK packet per connection by delaying it; off by default in mode tcp (they delay a server-speaks-first protocol), and the router does not save that packet either."),
    ]

    def configuration(self, port, routes, idle_port=None):
        kind, backend = routes["kind"], routes["backend"]
        if self.tuned:
            tuning = (f"    maxconn {HAPROXY_MAXCONN}\n    maxpipes {HAPROXY_MAXPIPES}\n    nbthread 2\n    cpu-map auto:1/1-2 0-1\n"
                      "    tune.bufsize 262144\n    tune.pipesize 1048576\n")
        else:
            tuning = "    maxconn 4000\n    nbthread 2\n"
        # SNI: route on the ClientHello as the router does. Host: mode tcp
        # cannot read headers, so it forwards (the router routes).
        inspect = ""
        if kind == "sni":
            inspect = (
                "    tcp-request inspect-delay 5s\n"
                "    tcp-request content accept if { req_ssl_hello_type 1 }\n"
                f"    use_backend to_backend if {{ req_ssl_sni -i {NAME} }}\n"
            )
        idle = ""
        if idle_port:
            idle = (f"frontend idle\n    bind 127.0.0.1:{idle_port}\n    default_backend to_idle\n"
                    f"backend to_idle\n    server i 127.0.0.1:{routes['idle']}\n")
        return (
            f"global\n{tuning}"
            "defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 60s\n    timeout server 60s\n"
            + ("    option splice-auto\n" if self.tuned else "")
            + f"frontend in\n    bind 127.0.0.1:{port}\n{inspect}    default_backend to_backend\n"
            + f"backend to_backend\n    server b 127.0.0.1:{backend}\n"
            + idle
        )

    def command(self, config_path):
        return ["haproxy", "-db", "-f", config_path]


class Nginx(Peer):
    base = "nginx stream"
    settings = [
        ("proxy_buffer_size 256k", "The buffer nginx reads into, one per direction of each connection, is 256 KiB instead of 16 KiB: up to 256 KiB per read and write, as the router's copy mode."),
        ("worker_processes 2", "One worker process per core (what `auto` gives here)."),
        ("worker_cpu_affinity auto", "Binds each worker to its own CPU, as the router pins one executor per core."),
        ("worker_connections 10000", f"Each worker may hold 10,000 connections (client and backend sides both count): the scaling run's {TOP_LEVEL:,}, spread over two workers, fit."),
        ("multi_accept on", "A worker accepts every pending connection when it wakes, not one per wake-up."),
        ("listen … reuseport", "Each worker has its own listening socket and the kernel spreads new connections over them: no accept lock, no thundering herd."),
        (f"listen … backlog={BACKLOG}", f"A listen queue as long as the router's ({BACKLOG:,}; nginx asks for 511 by default)."),
        (f"worker_rlimit_nofile {FD_HARD_LIMIT}", "The workers may open as many descriptors as the hard limit allows."),
    ]
    not_set = [
        ("tcp_nodelay", "Already on by default in the stream module (both sockets), as the router sets it."),
    ]

    def configuration(self, port, routes, idle_port=None):
        kind, backend = routes["kind"], routes["backend"]
        listen = f"reuseport backlog={BACKLOG}" if self.tuned else "reuseport"
        if kind == "sni":
            server = (
                f"    map $ssl_preread_server_name $to {{ {NAME} 127.0.0.1:{backend}; default 127.0.0.1:{backend}; }}\n"
                f"    server {{ listen 127.0.0.1:{port} {listen}; ssl_preread on; proxy_pass $to; }}\n"
            )
        else:
            server = f"    server {{ listen 127.0.0.1:{port} {listen}; proxy_pass 127.0.0.1:{backend}; }}\n"
        if idle_port:
            server += f"    server {{ listen 127.0.0.1:{idle_port} {listen}; proxy_pass 127.0.0.1:{routes['idle']}; }}\n"
        name = slug(self.name)
        main = f"worker_processes 2;\n{'worker_cpu_affinity auto;' + chr(10) if self.tuned else ''}worker_rlimit_nofile {FD_HARD_LIMIT};\n"
        events = "events { worker_connections 10000; multi_accept on; }\n" if self.tuned else "events { worker_connections 9000; }\n"
        return (
            "load_module /usr/lib/nginx/modules/ngx_stream_module.so;\n"
            f"{main}daemon off;\npid WORKDIR/{name}.pid;\nerror_log WORKDIR/{name}.err warn;\n{events}"
            "stream {\n" + ("    proxy_buffer_size 256k;\n" if self.tuned else "") + f"{server}}}\n"
        )

    def command(self, config_path):
        return ["nginx", "-c", config_path, "-p", config_path.parent]


class Socat(Peer):
    base = "socat"
    settings = [
        (f"-b {COPY_BUFFER}", f"Moves up to {COPY_BUFFER // 1024} KiB per read and write (default 8,192 B): the router's copy mode reads into a buffer that starts at 16 KiB and grows fourfold while reads fill it, up to {COPY_BUFFER // 1024} KiB (splice/src/forward.rs)."),
        ("nodelay (both sockets)", "TCP_NODELAY on the client's and the backend's socket, as the router sets on both."),
        (f"backlog={BACKLOG}", f"A listen queue as long as the router's ({BACKLOG:,}; socat's default is 5)."),
        ("fork", "One process per connection: socat's only way to serve connections concurrently (the default rows fork too)."),
    ]
    not_set = [
        ("rcvbuf / sndbuf", "Setting a socket buffer turns off the kernel's autotuning of it; the router's copy mode leaves them to the kernel."),
    ]

    def configuration(self, port, routes, idle_port=None):
        if idle_port:
            raise ValueError("socat is not run with held idle connections (a process each)")
        if self.tuned:
            return (f"socat -b {COPY_BUFFER} TCP-LISTEN:{port},bind=127.0.0.1,fork,reuseaddr,backlog={BACKLOG},nodelay "
                    f"TCP:127.0.0.1:{routes['backend']},nodelay")
        return f"socat TCP-LISTEN:{port},bind=127.0.0.1,fork,reuseaddr,backlog=1024 TCP:127.0.0.1:{routes['backend']}"

    def command(self, config_path):
        return config_path.read_text().split()


# ---------------------------------------------------------------- workloads


def iperf_command(port, streams, seconds):
    return ["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(seconds), "-P", str(streams), "-J"]


def iperf_result(stdout):
    """Throughput and bytes of an `iperf3 -J` run, or the error it reported."""
    out = json.loads(stdout)
    if "error" in out:
        raise RuntimeError(f"iperf3: {out['error']}")
    end = out["end"]["sum_received"]
    return {"gbit_per_s": end["bits_per_second"] / 1e9, "bytes": end["bytes"]}


def iperf(port, streams, seconds):
    return iperf_result(run(iperf_command(port, streams, seconds), seconds + 30))


def sockperf_ping_pong(port, seconds):
    """64 B ping-pong: (round-trip percentiles in µs keyed "50.000" etc.,
    round trips made)."""
    out = run(["sockperf", "ping-pong", "--tcp", "-i", "127.0.0.1", "-p", str(port), "-m", "64", "-t", str(seconds), "--full-rtt"], seconds + 30)
    pct = {m.group(1): float(m.group(2)) for m in re.finditer(r"percentile (\d+\.\d+) =\s+([\d.]+)", out)}
    round_trips = int(re.search(r"\[Valid Duration\].*?RunTime=[\d.]+ sec; SentMessages=(\d+)", out).group(1))
    return pct, round_trips


def sockperf(port, seconds):
    pct, _ = sockperf_ping_pong(port, seconds)
    return {"p50_us": pct["50.000"], "p99_us": pct["99.000"], "p999_us": pct["99.900"]}


def wrk(port, seconds):
    out = run(
        ["wrk", "-t2", "-c32", f"-d{seconds}s", "-H", f"Host: {NAME}", "-H", "Connection: close", f"http://127.0.0.1:{port}/"],
        seconds + 30,
    )
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    failed = (sum(int(x) for x in errors.groups()) if errors else 0) + (int(bad.group(1)) if bad else 0)
    return {"conn_per_s": rate, "errors": failed}


def redis_benchmark(port, requests):
    """The key-value store's own client: 50 connections, SET then GET of 64 B
    values, one request in flight per connection, `requests` of each.
    Requests/s over both (total requests / total time), and the client's
    p50 and p99 per command (ms)."""
    out = run(
        ["redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-c", str(REDIS_CONNECTIONS), "-n", str(requests),
         "-d", "64", "-P", "1", "-t", "set,get", "--csv"],
        REDIS_TIMEOUT_S,
    )
    tests = {}
    for line in out.splitlines()[1:]:
        test, rps, _avg, _min, p50, _p95, p99, _max = (f.strip('"') for f in line.split(","))
        tests[test] = (float(rps), float(p50), float(p99))
    if set(tests) != {"SET", "GET"}:
        raise RuntimeError(f"redis-benchmark: no SET and GET results in {out.strip()[-300:]!r}")
    seconds = sum(requests / rps for rps, _, _ in tests.values())
    metrics = {"req_per_s": 2 * requests / seconds}
    for test, (rps, p50, p99) in tests.items():
        metrics.update({f"{test.lower()}_req_per_s": rps, f"{test.lower()}_p50_ms": p50, f"{test.lower()}_p99_ms": p99})
    return metrics


def tls_connect(port, seconds):
    out = run([LOADGEN, "connect", "--addr", f"127.0.0.1:{port}", "--sni", NAME, "--concurrency", "32", "--seconds", str(seconds)], seconds + 30)
    fields = dict(kv.split("=") for kv in out.split())
    return {"conn_per_s": float(fields["conn_per_s"]), "errors": int(fields["errors"])}


class Bench:
    def __init__(self, args):
        self.args = args
        self.quick = args.quick
        self.reps = args.reps or (1 if self.quick else 5)
        # SETs, then GETs, per redis-benchmark run.
        self.redis_requests = REDIS_REQUESTS // 10 if self.quick else REDIS_REQUESTS
        self.workdir = Path(tempfile.mkdtemp(prefix="router-bench-"))
        self.procs = Processes(self.workdir)
        self.results = []  # dicts: workload, contender, rep, metrics...
        # Workloads taken from an earlier run's log instead of measured.
        self.skip = set(args.skip.split(",")) if args.skip else set()
        if args.prior_log:
            self.results += prior_results(args.prior_log, self.skip)

    def seconds(self, full):
        return max(1, full // 5) if self.quick else full

    def backends(self):
        p = {k: free_port() for k in ("iperf", "sockperf", "http", "tls", "idle", "redis")}
        self.procs.start("iperf3", ["iperf3", "-s", "-p", str(p["iperf"]), "-B", "127.0.0.1"])
        self.procs.start("sockperf", ["sockperf", "server", "--tcp", "-i", "127.0.0.1", "-p", str(p["sockperf"])])
        conf = self.workdir / "nginx-http.conf"
        conf.write_text(
            f"worker_processes 2;\nworker_rlimit_nofile {FD_HARD_LIMIT};\ndaemon off;\npid {self.workdir}/nginx-http.pid;\n"
            f"error_log {self.workdir}/nginx-http.err warn;\nevents {{ worker_connections 8000; }}\n"
            "http { access_log off; server { listen 127.0.0.1:%d reuseport; location / { return 200 \"ok\\n\"; } } }\n" % p["http"]
        )
        self.procs.start("nginx-http", ["nginx", "-c", conf, "-p", self.workdir])
        self.procs.start("tls-stub", [LOADGEN, "serve", "--listen", f"127.0.0.1:{p['tls']}", "--close"])
        self.procs.start("idle", [LOADGEN, "serve", "--listen", f"127.0.0.1:{p['idle']}", "--reply", "k"])
        # The key-value store as a cache runs it: in memory only.
        self.procs.start("redis", ["redis-server", "--port", str(p["redis"]), "--bind", "127.0.0.1", "--save", "",
                                   "--appendonly", "no", "--protected-mode", "no", "--daemonize", "no"])
        for port in p.values():
            wait_port(port)
        time.sleep(1)  # iperf3 recovers from the check (see `interleaved`)
        return p

    def routers(self):
        """The router in both modes; with --compare, each beside the other
        binary (an A/B of two builds in one session)."""
        if not self.args.compare:
            return [Router("ebpf"), Router("copy")]
        before = Path(self.args.compare).resolve()
        return [Router("ebpf"), Router("ebpf", before, BEFORE), Router("copy"), Router("copy", before, BEFORE)]

    def contenders(self):
        if self.args.compare:
            return [Direct(), *self.routers()]
        return [Direct(), *self.routers(), *self.tuned_peers(), Socat(True), Haproxy(False), Nginx(False), Socat(False)]

    def tuned_peers(self):
        """The peers the scaling run holds connections through too (socat,
        a process per connection, is left out there)."""
        return [Haproxy(True), Nginx(True)]

    def scaling_contenders(self):
        if self.args.compare:
            return [Direct(), *self.routers()]
        return [Direct(), *self.routers(), *self.tuned_peers()]

    def interleaved(self, workload, routes, measure, contenders=None):
        """Starts every contender, then runs `measure(port)` rep by rep,
        rotating who goes first; records CPU around each run."""
        contenders = contenders or self.contenders()
        started = []
        for c in contenders:
            port = c.start(self.procs, self.workdir, routes)
            started.append((c, port))
        # The router's start was checked with a bare connection (which it
        # does not pass on: it waits for a first packet); the peers' by
        # their listening sockets. A moment for every contender to settle.
        time.sleep(1)
        for rep in range(self.reps):
            order = started[rep % len(started):] + started[: rep % len(started)]
            for c, port in order:
                cpu0, (busy0, soft0) = cpu_seconds(c.pid) if c.pid else 0.0, machine_cpu()
                # A failed run is tried once more (an iperf3 server still
                # busy with the previous test, a control connection reset);
                # a second failure is a result, not a crash. The first
                # error is kept with the result.
                retried = None
                for attempt in range(2):
                    try:
                        metrics = measure(port)
                        break
                    except Exception as error:
                        metrics = {"failed": str(error)[:200]}
                        if attempt == 0:
                            retried = metrics["failed"]
                            print(f"  {workload:10} rep {rep + 1}/{self.reps} {c.name:15} failed, once more: {retried}", flush=True)
                            time.sleep(1)
                if retried is not None:
                    metrics["retried_after"] = retried
                busy1, soft1 = machine_cpu()
                metrics["proxy_cpu_s"] = (cpu_seconds(c.pid) - cpu0) if c.pid else 0.0
                metrics["machine_busy_s"] = busy1 - busy0
                metrics["softirq_s"] = soft1 - soft0
                self.results.append({"workload": workload, "contender": c.name, "rep": rep, **metrics})
                shown = {k: round(v, 3) if isinstance(v, float) else v for k, v in metrics.items()}
                print(f"  {workload:10} rep {rep + 1}/{self.reps} {c.name:15} {shown}", flush=True)
        for c, _ in started:
            if c.pid:
                self.procs.stop(next(p for p in self.procs.procs if p.pid == c.pid))

    def scaling(self, ports, levels):
        """N connections held idle through the proxy, one active iperf3
        stream: throughput and the proxy's RSS per held connection.

        The levels are swept up, then down, in turn (1 → top, top → 1, ...):
        a drift of the machine's speed during a contender's sweeps then
        weighs on every level alike, and no level is always measured first
        (the first one, N = 1, was the slow one in two full runs)."""
        for c in self.scaling_contenders():
            port = c.start(self.procs, self.workdir, {"kind": "default", "backend": ports["iperf"], "idle": ports["idle"]})
            # The router answers on one core while another may still be
            # starting (loading its probe): its RSS peaks at 43-44 MB then
            # and holds ~15 MB after. The baseline is read once it is quiet.
            settle(c.pid)
            holds = []  # (connections, process), in the order they were opened
            base_rss = None
            for rep in range(self.reps):
                for level in levels if rep % 2 == 0 else levels[::-1]:
                    self.hold(c, ports, holds, level - 1)
                    rss = rss_kib(c.pid) if c.pid else 0
                    # The baseline is the first visit of the first level (one
                    # connection, after the executors' first allocations),
                    # not a fresh process's.
                    base_rss = rss if base_rss is None else base_rss
                    cpu0 = cpu_seconds(c.pid) if c.pid else 0.0
                    m = iperf(port, 1, self.seconds(2))
                    m["proxy_cpu_s"] = (cpu_seconds(c.pid) - cpu0) if c.pid else 0.0
                    m.update(level=level, rss_kib=rss, base_rss_kib=base_rss)
                    self.results.append({"workload": "scaling", "contender": c.name, "rep": rep, **m})
                    print(f"  scaling    {level:>5} conns {c.name:15} rep {rep + 1}/{self.reps} {m['gbit_per_s']:.2f} Gbit/s rss {rss} KiB", flush=True)
            self.hold(c, ports, holds, 0)
            if c.pid:
                self.procs.stop(next(p for p in self.procs.procs if p.pid == c.pid))

    def hold(self, c, ports, holds, target):
        """Opens or closes idle connections through contender `c` until
        `target` are held: closing drops the last opened group, opening adds
        one group (so a sweep down undoes a sweep up, group by group)."""
        held = sum(n for n, _ in holds)
        if held == target:
            return
        while held > target:
            n, process = holds.pop()
            process.stdin.close()
            process.wait(60)
            held -= n
        if held < target:
            idle_target = c.idle_port if c.pid else ports["idle"]
            # The router routes the held connections by a preamble; the
            # peers have a second listener towards the idle backend.
            first = "ROUTE idle\\r\\nx" if isinstance(c, Router) else "x"
            process = subprocess.Popen(
                [LOADGEN, "hold", "--addr", f"127.0.0.1:{idle_target}", "--first", first, "--connections", str(target - held), "--seconds", "300"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            )
            line = process.stdout.readline()
            if "workload=hold" not in line:
                process.kill()
                raise RuntimeError(f"{c.name}: holding {target - held} more connections failed: {line!r}")
            holds.append((target - held, process))
        settle(c.pid)


    def run(self):
        started = time.time()
        ports = self.backends()
        bulk = self.seconds(10)
        # 10 s for the 1-stream bulk run (the figure), 2 s for the
        # others; redis-benchmark is bounded by its request count.
        short = self.seconds(2)
        print(f"bench: {self.reps} repetitions, bulk {bulk}s, others {short}s; logs in {self.workdir}", flush=True)
        workloads = [
            ("bulk1", lambda: self.interleaved("bulk1", {"kind": "default", "backend": ports["iperf"]}, lambda p: iperf(p, 1, bulk))),
            ("bulk64", lambda: self.interleaved("bulk64", {"kind": "default", "backend": ports["iperf"]}, lambda p: iperf(p, 64, short))),
            ("latency", lambda: self.interleaved("latency", {"kind": "default", "backend": ports["sockperf"]}, lambda p: sockperf(p, short))),
            ("conn_http", lambda: self.interleaved("conn_http", {"kind": "host", "backend": ports["http"]}, lambda p: wrk(p, short))),
            ("conn_tls", lambda: self.interleaved("conn_tls", {"kind": "sni", "backend": ports["tls"]}, lambda p: tls_connect(p, short))),
            ("small_rr", lambda: self.interleaved("small_rr", {"kind": "default", "backend": ports["redis"]}, lambda p: redis_benchmark(p, self.redis_requests))),
            ("scaling", lambda: self.scaling(ports, [1, 100, 1000] if self.quick else [1, 100, 1000, TOP_LEVEL])),
        ]
        for name, measure in workloads:
            if name not in self.skip:
                begun = time.time()
                measure()
                print(f"bench: {name} took {time.time() - begun:.0f} s", flush=True)
        self.elapsed = time.time() - started


# ---------------------------------------------------------------- report


NAN = float("nan")


def med(values):
    return statistics.median(values) if values else NAN


def version(cmd, word=None):
    """The first line `cmd` prints (the first holding `word`, if given)."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True)
        lines = (out.stdout + out.stderr).strip().splitlines()
        return next(line for line in lines if word is None or word in line)
    except Exception:
        return "?"


def report(bench, out, command):
    rows = bench.results
    # Contenders in the bench's order; any other name a --from-json run
    # holds (an earlier run's peers) after them.
    known = [c.name for c in bench.contenders()]
    present = {r["contender"] for r in rows}
    names = [n for n in known if n in present] + sorted(present - set(known))
    peers = [n for n in names if n != "direct" and not n.startswith("router")]
    # The goal rows compare with the tuned peers (all peers in a run that had none).
    tuned = [n for n in peers if n.endswith(TUNED)] or peers
    haproxies = [n for n in peers if n.startswith("haproxy")]
    ebpf, copy = "router ebpf", "router copy"

    def values(workload, name, key):
        return [r[key] for r in rows if r["workload"] == workload and r["contender"] == name and key in r]

    def failures(workload, name):
        return [r["failed"] for r in rows if r["workload"] == workload and r["contender"] == name and "failed" in r]

    def best(medians, among, higher_better=True):
        """(name, median) of the best of `among` (NaN if none measured)."""
        measured = [(medians[n], n) for n in among if medians.get(n, NAN) == medians.get(n, NAN)]
        if not measured:
            return "none", NAN
        value, name = (max if higher_better else min)(measured)
        return name, value

    def spread(v, fmt):
        return f"{fmt.format(med(v))} ({fmt.format(min(v))}–{fmt.format(max(v))})"

    lines = ["# Benchmark: router vs direct, HAProxy, nginx stream, socat", ""]
    lines += [
        f"Command: `{command}` ({bench.reps} interleaved repetitions per point; whole run "
        f"{bench.elapsed / 60:.1f} min). Generated by scripts/bench.py; do not edit by hand.",
        "",
        f"Machine: {os.cpu_count()} cores, kernel {platform.release()}, loopback only. Client, backends and "
        "proxy share the same cores, so every figure is under that contention (the direct run too).",
        "",
        "Versions: " + "; ".join(
            [version([ROUTER, "--version"]), version(["haproxy", "-v"]), version(["nginx", "-v"]),
             version(["socat", "-V"], "socat version").split(" on ")[0], version(["iperf3", "--version"]), version(["sockperf", "--version"]),
             version(["wrk", "--version"])[:30], version(["redis-server", "--version"])[:40],
             version(["redis-benchmark", "--version"]), version(["uname", "-r"])]),
        "",
    ]
    lines += contenders_section()

    def table(title, workload, key, unit, higher_better=True, fmt="{:.2f}"):
        lines.extend([f"## {title}", "", f"| contender | {unit} median (min–max) | vs direct | vs best tuned peer |", "|---|---:|---:|---:|"])
        medians = {n: med(values(workload, n, key)) for n in names}
        _, best_tuned = best(medians, tuned, higher_better)
        for n in names:
            v = values(workload, n, key)
            if not v:
                lines.append(f"| {n} | failed: {'; '.join(failures(workload, n))[:120]} | | |")
                continue
            lines.append(
                f"| {n} | {spread(v, fmt)} | {medians[n] / medians['direct']:.2f} | {medians[n] / best_tuned:.2f} |"
                + (f" ({len(failures(workload, n))} failed)" if failures(workload, n) else "")
            )
        lines.append("")
        return medians

    bulk1 = table("Bulk throughput, 1 stream (iperf3)", "bulk1", "gbit_per_s", "Gbit/s")
    bulk64 = table("Bulk throughput, 64 streams (iperf3 -P 64)", "bulk64", "gbit_per_s", "Gbit/s")

    lines.extend(["## Request/response latency, 64 B ping-pong (sockperf --full-rtt), µs", "",
                  "Added latency: the contender's percentile less direct's, in the same repetition; the median over the repetitions, and the worst one.", "",
                  "| contender | p50 | p99 | p99.9 | added p50 (worst) | added p99 (worst) |", "|---|---:|---:|---:|---:|---:|"])

    def added(name, key):
        """(median, worst) over the repetitions of `name`'s `key` less
        direct's in the same repetition."""
        direct = {r["rep"]: r[key] for r in rows if r["workload"] == "latency" and r["contender"] == "direct" and key in r}
        deltas = [r[key] - direct[r["rep"]] for r in rows
                  if r["workload"] == "latency" and r["contender"] == name and key in r and r["rep"] in direct]
        return med(deltas), max(deltas, default=NAN)

    for n in names:
        p50, p99, p999 = (med(values("latency", n, k)) for k in ("p50_us", "p99_us", "p999_us"))
        (a50, w50), (a99, w99) = added(n, "p50_us"), added(n, "p99_us")
        lines.append(f"| {n} | {p50:.1f} | {p99:.1f} | {p999:.1f} | {a50:+.1f} ({w50:+.1f}) | {a99:+.1f} ({w99:+.1f}) |")
    lines.append("")

    http = table("New connections/s, HTTP Host routed (wrk, Connection: close, 32 connections)", "conn_http", "conn_per_s", "conn/s", fmt="{:.0f}")
    lines.append("HAProxy (mode tcp), nginx stream and socat forward these without reading the Host header; the router routes on it.\n")
    tls = table("New connections/s, TLS SNI routed (loadgen connect --sni, 32 at once)", "conn_tls", "conn_per_s", "conn/s", fmt="{:.0f}")
    lines.append("HAProxy routes on `req_ssl_sni`, nginx on `ssl_preread`; socat forwards. The backend answers each ClientHello with a short reply and closes (no TLS handshake: this measures the proxies, not crypto).\n")
    errors = {w: sum(r.get("errors", 0) for r in rows if r["workload"] == w) for w in ("conn_http", "conn_tls")}
    lines.append(f"Connection errors over all runs: HTTP {errors['conn_http']}, TLS {errors['conn_tls']}.\n")

    lines.extend([
        f"## Small request/response: redis-benchmark, {REDIS_CONNECTIONS} connections, 64 B values", "",
        f"redis-server (in memory, no persistence) behind each contender; `redis-benchmark -c {REDIS_CONNECTIONS} -d 64 -P 1 -t set,get` "
        f"sends {bench.redis_requests:,} SETs, then as many GETs, one request in flight per connection. "
        "Requests/s over both commands (all requests over the time both took); the client's latency percentiles per command.", "",
        "| contender | req/s median (min–max) | vs direct | vs best tuned peer | SET p50 / p99 ms | GET p50 / p99 ms |",
        "|---|---:|---:|---:|---:|---:|"])
    small = {n: med(values("small_rr", n, "req_per_s")) for n in names}
    _, best_small = best(small, tuned)
    for n in names:
        v = values("small_rr", n, "req_per_s")
        if not v:
            lines.append(f"| {n} | failed: {'; '.join(failures('small_rr', n))[:120]} | | | | |")
            continue
        latency = [f"{med(values('small_rr', n, f'{t}_p50_ms')):.3f} / {med(values('small_rr', n, f'{t}_p99_ms')):.3f}" for t in ("set", "get")]
        lines.append(f"| {n} | {spread(v, '{:.0f}')} | {small[n] / small['direct']:.2f} | {small[n] / best_small:.2f} | {latency[0]} | {latency[1]} |"
                     + (f" ({len(failures('small_rr', n))} failed)" if failures("small_rr", n) else ""))
    lines.append("")

    lines.extend(["## CPU per GB forwarded (bulk runs)", "",
                  "Proxy user+sys (its own process tree), softirq and whole-machine busy CPU seconds (/proc/stat, all CPUs: client and backend included, which every contender shares) per GB, from the 1-stream and 64-stream runs. "
                  "The router's in-kernel forwarding runs in softirq and kworker context, so it appears in the machine column, not the proxy's.", "",
                  "| contender | proxy s/GB (1 / 64 streams) | softirq s/GB | machine s/GB | machine vs best tuned peer |", "|---|---:|---:|---:|---:|"])

    def cpu_per_gb(workload, name, key):
        rs = [r for r in rows if r["workload"] == workload and r["contender"] == name and "bytes" in r]
        gb = sum(r["bytes"] for r in rs) / 1e9
        return sum(r[key] for r in rs) / gb if gb else NAN

    machine = {w: {n: cpu_per_gb(w, n, "machine_busy_s") for n in names} for w in ("bulk1", "bulk64")}
    best_machine = {w: best(machine[w], tuned, higher_better=False) for w in machine}
    for n in names:
        lines.append(" | ".join([f"| {n}"] + [
            f"{cpu_per_gb('bulk1', n, key):.3f} / {cpu_per_gb('bulk64', n, key):.3f}"
            for key in ("proxy_cpu_s", "softirq_s", "machine_busy_s")]
            + [f"{machine['bulk1'][n] / best_machine['bulk1'][1]:.2f} / {machine['bulk64'][n] / best_machine['bulk64'][1]:.2f}"]) + " |")
    lines.append("")

    lines.extend(["## Scaling: N concurrent connections, 1 active iperf3 stream", "",
                  "N − 1 connections are held idle through the proxy (each answered once by an idle backend: the router routes them by a preamble, the peers have a second listener towards that backend), plus the active stream. "
                  "socat is left out (a process per connection). "
                  "Each repetition sweeps the levels, upwards and downwards in turn (the idle connections are opened on the way up and closed on the way down), "
                  "so that no level is always measured first and a drift of the machine's speed weighs on every level alike. "
                  f"The top level is {TOP_LEVEL:,}, not 10,000: a proxied connection takes two descriptors and the open-files hard limit here is {FD_HARD_LIMIT:,} (it cannot be raised); "
                  "the router derives its default connection limit from it (9,872 here: half the descriptors left after its reserve) and refuses past it.", "",
                  "RSS is read at each level's first visit, before its first run (nginx: master and workers together). Per held connection: the growth from N = 1, and from the level below.", "",
                  "| contender | N | Gbit/s median (min–max) | vs N=1 | proxy RSS KiB | RSS per held connection | from the level below |", "|---|---:|---:|---:|---:|---:|---:|"])
    levels = sorted({r["level"] for r in rows if r["workload"] == "scaling"})
    scaled = [n for n in names if any(r["workload"] == "scaling" and r["contender"] == n for r in rows)]

    def per_connection(value):
        return "–" if value is None else f"{value:.0f} B"

    for n in scaled:
        base = None
        for level, rss, per, step in rss_growth(rows, n):
            v = scaling_speeds(rows, n, level)
            base = base or med(v)
            lines.append(f"| {n} | {level} | {spread(v, '{:.2f}')} | {med(v) / base:.2f} | {rss or '–'} | {per_connection(per)} | {per_connection(step)} |")
    lines.append("")

    # The goal table: (row, value, goal, met), router ebpf's figures
    # (copy mode's beside them where it says something).
    goals = []

    def vs_haproxy(medians, row):
        _, top = best(medians, haproxies)
        shown = ", ".join(f"{h} {medians[ebpf] / medians[h]:.2f}×" for h in haproxies)
        value = medians[ebpf] / top
        goals.append((row, f"{value:.2f}× ({shown}; copy {medians[copy] / top:.2f}×)", "≥ 1.2×", value >= 1.2))

    vs_haproxy(http, "HTTP Host conn/s vs HAProxy (the better of its rows; mode tcp, which does not even read the Host)")
    vs_haproxy(tls, "TLS SNI conn/s vs HAProxy `req_ssl_sni` (the better of its rows)")
    for medians, row in ((bulk1, "bulk 1 stream vs best tuned peer"), (bulk64, "bulk 64 streams vs best tuned peer")):
        who, top = best(medians, tuned)
        value = medians[ebpf] / top
        goals.append((row, f"{value:.2f}× ({medians[ebpf]:.2f} vs {who} {top:.2f} Gbit/s; copy {medians[copy] / top:.2f}×)", "≥ 1.5×", value >= 1.5))
    of_direct = (bulk1[ebpf] / bulk1["direct"], bulk64[ebpf] / bulk64["direct"])
    goals.append(("bulk vs direct, 1 / 64 streams", f"{of_direct[0]:.2f} / {of_direct[1]:.2f}", "≥ 0.7 both", min(of_direct) >= 0.7))
    who, top = best(small, tuned)
    value = small[ebpf] / top
    goals.append((f"small request/response, {REDIS_CONNECTIONS} concurrent connections, vs best tuned peer",
                  f"{value:.2f}× ({small[ebpf]:.0f} vs {who} {top:.0f} req/s; copy {small[copy] / top:.2f}×)", "≥ 1.3×", value >= 1.3))
    worst = []
    for key, label in (("p50_us", "p50"), ("p99_us", "p99")):
        typical, bad = added(ebpf, key)
        worst.append(bad)
        goals.append((f"64 B ping-pong added latency over direct, {label} (median over the repetitions; worst one)",
                      f"{typical:+.1f} µs; worst {bad:+.1f} µs", "≤ +10 µs in every repetition", bad <= 10))
    below = []
    for key in ("p50_us", "p99_us"):
        latency = {n: med(values("latency", n, key)) for n in names}
        below.append((latency[ebpf], *best(latency, tuned, higher_better=False)))
    goals.append(("64 B ping-pong p50 and p99 below every tuned peer's",
                  " ; ".join(f"{label} {mine:.1f} vs {who} {theirs:.1f} µs" for label, (mine, who, theirs) in zip(("p50", "p99"), below)),
                  "below", all(mine < theirs for mine, _, theirs in below)))
    for w, label in (("bulk1", "1 stream"), ("bulk64", "64 streams")):
        who, top = best_machine[w]
        value = machine[w][ebpf] / top
        goals.append((f"machine CPU per GB forwarded vs best tuned peer, {label}",
                      f"{value:.2f}× ({machine[w][ebpf]:.3f} vs {who} {top:.3f} s/GB; copy {machine[w][copy] / top:.2f}×)", "≤ 0.5×", value <= 0.5))
    spliced, spliced_step, _ = scaling_figures(rows, ebpf)
    goals.append((f"RSS per spliced connection (at {levels[-1] if levels else '?'}; from N = 1, and from the level below)",
                  f"{spliced:.0f} B, {spliced_step:.0f} B", "≤ 2 KiB", max(spliced, spliced_step) <= 2048))
    copied, copied_step, _ = scaling_figures(rows, copy)
    haproxy_conn, haproxy_step, _ = scaling_figures(rows, "haproxy" + TUNED)
    goals.append(("RSS per copied connection vs tuned HAProxy's (same levels)",
                  f"{copied:.0f} B, {copied_step:.0f} B vs {haproxy_conn:.0f} B, {haproxy_step:.0f} B", "≤ tuned HAProxy's",
                  copied <= haproxy_conn and copied_step <= haproxy_step))
    lines.extend(["## Goals (issue 22; router ebpf, ratios from this run)", "",
                  "Against the best tuned peer of each row (the conn/s rows: the better HAProxy row). Copy mode's ratio is shown beside, not judged.", "",
                  "| row | value | goal | met |", "|---|---:|---|:---:|"])
    lines += [f"| {row} | {value} | {goal} | {'yes' if met else 'no'} |" for row, value, goal, met in goals]
    lines.append("")

    lines.extend(["## Earlier goals", "", "| goal | measured | met |", "|---|---:|:---:|"])
    spliced_cpu = cpu_per_gb("bulk1", ebpf, "proxy_cpu_s")
    lines.append(f"| userspace CPU per GB spliced ≈ 0 (≤ {NEAR_ZERO_CPU_S_PER_GB} s/GB, 1 stream) | {spliced_cpu:.3f} s/GB | {'yes' if spliced_cpu <= NEAR_ZERO_CPU_S_PER_GB else 'no'} |")
    _, _, flat = scaling_figures(rows, ebpf)
    if flat == flat:
        lines.append(f"| throughput flat ±10% from 1 to {levels[-1]} connections | {flat:+.1%} worst | {'yes' if abs(flat) <= 0.10 else 'no'} |")
    lines.append("")
    Path(out).write_text("\n".join(lines) + "\n")
    (Path(out).with_suffix(".json")).write_text(json.dumps(
        {"command": command, "elapsed_s": bench.elapsed, "reps": bench.reps, "redis_requests": bench.redis_requests, "rows": rows}, indent=1) + "\n")
    plots(rows, names, scaled, Path(out).parent)
    print("\n".join(lines))


def contenders_section():
    """The report's section on the peers: each one's whole configuration,
    tuned and defaults, and what each tuned setting does."""
    lines = [
        "## Contenders", "",
        "The router runs with its defaults (`--mode ebpf` or `--mode copy`, one executor pinned per core, buffers up to 256 KiB). "
        "Each peer runs twice: **tuned**, as its users tune it for these workloads (the goal rows and the \"vs best tuned peer\" columns compare with the best of these), "
        "and **(defaults)**, as the runs before issue 22 ran it: default buffers (HAProxy 16 KiB, nginx 16k, socat 8 KiB), no splicing, "
        "with the thread or worker count and the connection limits these workloads need. "
        "`PORT` and `BACKEND` stand for the ports of each workload (`WORKDIR` for the run's folder).", "",
    ]
    for kind in (Haproxy, Nginx, Socat):
        tuned, defaults = kind(True), kind(False)
        lines += [f"### {tuned.base}", "", f"{tuned.name}:", "", "```", tuned.configuration("PORT", SHOWN_ROUTES).rstrip(), "```", ""]
        for variant, routes, idle in (("the TLS SNI workload", {**SHOWN_ROUTES, "kind": "sni"}, None),
                                      ("the scaling run (the held idle connections' listener)", {**SHOWN_ROUTES, "idle": "IDLE_BACKEND"}, "IDLE_PORT")):
            try:
                text = tuned.configuration("PORT", routes, idle)
            except ValueError:
                continue
            base = tuned.configuration("PORT", SHOWN_ROUTES).splitlines()
            extra = [line for line in text.splitlines() if line not in base]
            if not extra:
                continue
            lines += [f"For {variant}, these lines replace or join the ones above:", "", "```", *extra, "```", ""]
        lines += ["| tuned setting | what it does |", "|---|---|"]
        lines += [f"| `{setting}` | {what} |" for setting, what in tuned.settings]
        lines += [f"| not set: `{setting}` | {why} |" for setting, why in tuned.not_set]
        lines += ["", f"{defaults.name}:", "", "```", defaults.configuration("PORT", SHOWN_ROUTES).rstrip(), "```", ""]
    return lines


def compare_report(bench, out, command):
    """--compare: each workload's medians, this build against the other."""
    rows = bench.results
    lines = [
        "# A/B: this build against another, side by side", "",
        f"`{command}`: {bench.reps} interleaved repetitions, {bench.elapsed / 60:.1f} min; "
        f"`{BEFORE.strip()}` is `{bench.args.compare}`. Medians (min–max).", "",
        "| workload | mode | this build | before | this / before |", "|---|---|---:|---:|---:|",
    ]
    figures = [("bulk1", "gbit_per_s", "Gbit/s"), ("bulk64", "gbit_per_s", "Gbit/s"),
               ("latency", "p50_us", "µs p50"), ("latency", "p99_us", "µs p99"),
               ("conn_http", "conn_per_s", "conn/s"), ("conn_tls", "conn_per_s", "conn/s"),
               ("small_rr", "req_per_s", "req/s"), ("small_rr", "get_p99_ms", "ms GET p99")]
    for workload, key, unit in figures:
        for mode in ("ebpf", "copy"):
            cells = []
            for name in (f"router {mode}", f"router {mode}{BEFORE}"):
                v = [r[key] for r in rows if r["workload"] == workload and r["contender"] == name and key in r]
                cells.append((med(v), min(v, default=float("nan")), max(v, default=float("nan"))))
            (a, a0, a1), (b, b0, b1) = cells
            lines.append(f"| {workload} ({unit}) | {mode} | {a:.2f} ({a0:.2f}–{a1:.2f}) | {b:.2f} ({b0:.2f}–{b1:.2f}) | {a / b:.3f} |")
    for mode in ("ebpf", "copy"):
        per = [scaling_figures(rows, name)[0] for name in (f"router {mode}", f"router {mode}{BEFORE}")]
        lines.append(f"| RSS per held connection (B, top level, from N = 1) | {mode} | {per[0]:.0f} | {per[1]:.0f} | {per[0] / per[1]:.3f} |")
    lines.append("")
    Path(out).write_text("\n".join(lines) + "\n")
    Path(out).with_suffix(".json").write_text(
        json.dumps({"command": command, "elapsed_s": bench.elapsed, "reps": bench.reps, "rows": rows}, indent=1) + "\n")
    print("\n".join(lines))


def scaling_speeds(rows, name, level):
    """Gbit/s of contender `name`'s scaling runs with `level` connections."""
    return [r["gbit_per_s"] for r in rows if r["workload"] == "scaling" and r["contender"] == name and r["level"] == level]


def rss_growth(rows, name):
    """Per scaling level of contender `name`, in order: (level, RSS KiB at
    its first visit, bytes per held connection since N = 1, since the level
    below). RSS is each level's first visit: memory freed when connections
    close stays with the process. The per-connection figures are None where
    there is nothing to compare (the first level, or no RSS: direct)."""
    scaling = [r for r in rows if r["workload"] == "scaling" and r["contender"] == name]
    growth, below = [], None
    for level in sorted({r["level"] for r in scaling}):
        first = next(r for r in scaling if r["level"] == level)
        rss = first["rss_kib"]
        per = (rss - first["base_rss_kib"]) * 1024 / (level - 1) if below and rss else None
        step = (rss - below[1]) * 1024 / (level - below[0]) if below and rss else None
        growth.append((level, rss, per, step))
        below = (level, rss)
    return growth


def scaling_figures(rows, name):
    """(RSS bytes per held connection at the top level, from N = 1 and from
    the level below it; worst relative deviation of the median throughput
    from the 1-connection level)."""
    growth = rss_growth(rows, name)
    if len(growth) < 2:
        return float("nan"), float("nan"), float("nan")
    _, _, per_conn, marginal = growth[-1]
    speed = {
        level: med(scaling_speeds(rows, name, level))
        for level, _, _, _ in growth
    }
    first = speed[growth[0][0]]
    spread = max((s / first - 1 for s in speed.values()), key=abs)
    return per_conn, marginal, spread


def color(name):
    """Bars: direct grey, the router red, tuned peers blue, default ones pale."""
    if name == "direct":
        return "#888"
    if name.startswith("router"):
        return "#c33"
    return "#48c" if name.endswith(TUNED) else "#9bd"


def plots(rows, names, scaled, where):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plots", file=sys.stderr)
        return
    fig, axes = plt.subplots(1, 5, figsize=(24, 5))
    for ax, (workload, key, title) in zip(axes, [
        ("bulk1", "gbit_per_s", "1 stream, Gbit/s"), ("bulk64", "gbit_per_s", "64 streams, Gbit/s"),
        ("conn_http", "conn_per_s", "HTTP conn/s"), ("conn_tls", "conn_per_s", "TLS SNI conn/s"),
        ("small_rr", "req_per_s", f"redis-benchmark -c {REDIS_CONNECTIONS}, req/s"),
    ]):
        data = [[r[key] for r in rows if r["workload"] == workload and r["contender"] == n and key in r] for n in names]
        medians = [med(d) for d in data]
        ax.bar(range(len(names)), medians, color=[color(n) for n in names])
        for i, d in enumerate(data):
            if d:
                ax.plot([i, i], [min(d), max(d)], color="black")
        ax.set_xticks(range(len(names)), names, rotation=40, ha="right")
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(where / "throughput.svg")
    fig, ax = plt.subplots(figsize=(10, 5))
    for i, (key, label) in enumerate([("p50_us", "p50"), ("p99_us", "p99"), ("p999_us", "p99.9")]):
        ax.bar([x + i * 0.27 for x in range(len(names))], [med([r[key] for r in rows if r["workload"] == "latency" and r["contender"] == n and key in r]) for n in names], 0.27, label=label)
    ax.set_xticks([x + 0.27 for x in range(len(names))], names, rotation=40, ha="right")
    ax.set_ylabel("round trip, µs")
    ax.set_title("64 B ping-pong latency (sockperf)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(where / "latency.svg")
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for n in scaled:
        levels = sorted({r["level"] for r in rows if r["workload"] == "scaling" and r["contender"] == n})
        ax.plot(levels, [med(scaling_speeds(rows, n, lv)) for lv in levels], marker="o", label=n)
    ax.set_xscale("log")
    ax.set_xlabel("concurrent connections (1 active)")
    ax.set_ylabel("Gbit/s")
    ax.set_title("Throughput while holding N connections")
    ax.legend()
    fig.tight_layout()
    fig.savefig(where / "scaling.svg")


def prior_results(log, workloads):
    """The runs of `workloads` as an earlier run printed them."""
    import ast

    results = []
    for line in open(log):
        m = re.match(r"  (\w+)\s+rep (\d+)/\d+ (.+?)\s+(\{.*\})$", line)
        if m and m.group(1) in workloads:
            results.append({"workload": m.group(1), "contender": m.group(3).strip(), "rep": int(m.group(2)) - 1, **ast.literal_eval(m.group(4))})
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 repetition of short runs (≤ 2 min): checks the harness")
    parser.add_argument("--reps", type=int, help="repetitions per point (default 5, --quick 1)")
    parser.add_argument("--out", help="report path (default docs/bench/RESULTS.md; --quick: target/bench-quick/RESULTS.md)")
    parser.add_argument("--command", default="scripts/bench.sh", help=argparse.SUPPRESS)
    parser.add_argument("--skip", help="comma-separated workloads not to measure (bulk1,bulk64,latency,conn_http,conn_tls,small_rr,scaling)")
    parser.add_argument("--prior-log", help="take the skipped workloads' runs from this earlier run's output")
    parser.add_argument("--compare", metavar="ROUTER", help="A/B: run only the router, in both modes, beside this other router binary; write a comparison (default target/bench-compare/COMPARE.md)")
    parser.add_argument("--from-json", help="measure nothing: rewrite the report (and plots) from an earlier run's RESULTS.json")
    args = parser.parse_args()
    default = "target/bench-compare/COMPARE.md" if args.compare else "target/bench-quick/RESULTS.md" if args.quick else "docs/bench/RESULTS.md"
    out = Path(args.out or (ROOT / default))
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.from_json:
        earlier = json.loads(Path(args.from_json).read_text())
        args.reps = earlier["reps"]
        bench = Bench(args)
        bench.results, bench.elapsed = earlier["rows"], earlier["elapsed_s"]
        bench.redis_requests = earlier.get("redis_requests", bench.redis_requests)
        shutil.rmtree(bench.workdir, ignore_errors=True)
        report(bench, out, earlier["command"])
        return
    bench = Bench(args)
    try:
        bench.run()
    finally:
        bench.procs.stop_all()
    (compare_report if args.compare else report)(bench, out, args.command)
    failed = [r for r in bench.results if "failed" in r]
    if failed:
        print(f"\nbench: {len(failed)} runs failed (logs kept in {bench.workdir}):", file=sys.stderr)
        for r in failed:
            print(f"  {r['workload']} {r['contender']} rep {r['rep'] + 1}: {r['failed']}", file=sys.stderr)
        sys.exit(1)
    shutil.rmtree(bench.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
