#!/usr/bin/python3
"""`make bench`: the same programs on libnbd and on ours, side by side.

Three libraries: Debian's libnbd 1.14.2 (installed), libnbd 1.22.2 built
from Debian's source by `make reference`, and ours. Each workload runs the
same binary once per library per round, in an order that rotates each
round, for ROUNDS rounds. It prints the medians and the ratios ours/libnbd
of: throughput, the client's CPU time per request (user + sys, from wait4),
and its peak RSS. A separate shorter run of each under `strace -c -f`
counts the client's syscalls per request. The servers listen on Unix
sockets and are started here. Last, the memory a connected handle costs:
bench/handle-mem.py opens 200 handles in python3-libnbd, the same rounds
rotated, and reports the resident memory per handle, after connecting and
after one 4 KiB pread each.

Usage: bench/bench.py [--rounds N] [--seconds S] [--quick] [--markdown FILE]
"""

import argparse
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OURS = os.path.join(ROOT, "target", "lib")
REFERENCE = os.path.join(ROOT, "target", "libnbd-1.22.2", "lib", ".libs")
# Library name -> LD_LIBRARY_PATH (None: the system's, Debian's 1.14.2).
LIBRARIES = {"1.14.2": None, "1.22.2": REFERENCE, "ours": OURS}
AIO = os.path.join(ROOT, "target", "bench", "aio-bench")
SERVER = os.path.join(ROOT, "target", "release", "nbd-rs-server")
THREADS = os.path.join(ROOT, "target", "bench", "threads-bench")
HANDLE_MEM = os.path.join(ROOT, "bench", "handle-mem.py")
# examples-c/concurrent-writer.c, whose bench mode runs random writes with
# the writer thread or without it ("plain"), on ours alone.
WRITER = os.path.join(ROOT, "target", "bench", "concurrent-writer")
# (name, request size, in flight, target ratio writer/plain).
WRITER_ROWS = [
    ("concurrent writer: 1 MiB writes, 8 in flight", 1 << 20, 8, 1.1),
    ("concurrent writer: 4k random writes, 64 in flight", 4096, 64, 0.95),
]
# Handles opened at once by the memory measurement.
MEM_HANDLES = 200


def wait_for_socket(path, proc):
    for _ in range(200):
        if proc.poll() is not None:
            sys.exit(f"bench: server for {path} exited")
        try:
            s = socket.socket(socket.AF_UNIX)
            s.connect(path)
            s.close()
            return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"bench: no server on {path}")


def run(cmd, library, env_extra=None, strace_out=None):
    """Runs cmd on `library` (a key of LIBRARIES); returns (stdout, seconds, cpu, maxrss_kib)."""
    env = dict(os.environ)
    env.pop("LD_LIBRARY_PATH", None)
    if LIBRARIES[library]:
        env["LD_LIBRARY_PATH"] = LIBRARIES[library]
    env.update(env_extra or {})
    if strace_out:
        cmd = ["strace", "-f", "-c", "-o", strace_out] + cmd
    start = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out = proc.stdout.read()
    err = proc.stderr.read()
    _, status, ru = os.wait4(proc.pid, 0)
    took = time.monotonic() - start
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"bench: {' '.join(cmd)} failed on {library}:\n{err.decode(errors='replace')[-2000:]}")
    return out.decode(), took, ru.ru_utime + ru.ru_stime, ru.ru_maxrss


def syscalls(path):
    with open(path) as f:
        for line in f:
            fields = line.split()
            if fields and fields[-1] == "total":
                return int(fields[3]) if len(fields) >= 5 else int(fields[2])
    sys.exit(f"bench: no total in {path}")


class Fio:
    """fio's nbd engine; one thread, so wait4 sees all of its CPU."""

    def __init__(self, name, rw, bs, depth, sock, query=""):
        self.name, self.rw, self.bs, self.depth, self.sock, self.query = name, rw, bs, depth, sock, query
        self.unit = "IOPS"

    def cmd(self, seconds):
        return ["fio", "--name=" + self.name, "--ioengine=nbd", f"--uri=nbd+unix:///?socket={self.sock}{self.query}",
                f"--rw={self.rw}", f"--bs={self.bs}", f"--iodepth={self.depth}", "--size=256m",
                "--time_based", f"--runtime={seconds}", "--thread", "--output-format=json",
                "--randrepeat=0", "--norandommap"]

    def parse(self, out, took):
        job = json.loads(out[out.index("{"):])["jobs"][0]
        ios = job["read"]["total_ios"] + job["write"]["total_ios"]
        iops = job["read"]["iops"] + job["write"]["iops"]
        return iops, ios


class Copy:
    """nbdcopy of the whole disk to null:, one request size."""

    def __init__(self, name, uri, size, request):
        self.name, self.uri, self.size, self.request = name, uri, size, request
        self.unit = "MiB/s"

    def cmd(self, seconds):
        return ["nbdcopy", f"--request-size={self.request}", self.uri, "null:"]

    def parse(self, out, took):
        return self.size / took / (1 << 20), self.size // self.request


class CountingProgram:
    """One of bench/'s C programs: it prints "requests N seconds S"."""

    unit = "IOPS"

    def parse(self, out, took):
        m = re.search(r"requests (\d+) seconds ([\d.]+)", out)
        n, s = int(m.group(1)), float(m.group(2))
        return n / s, n


class Aio(CountingProgram):
    """bench/aio-bench.c: its own poll loop."""

    def __init__(self, name, uri, depth, size):
        self.name, self.uri, self.depth, self.size = name, uri, depth, size

    def cmd(self, seconds):
        return [AIO, self.uri, str(self.depth), str(self.size), str(seconds)]


class Threads(CountingProgram):
    """bench/threads-bench.c: threads making synchronous reads on one handle."""

    def __init__(self, name, uri, threads, size):
        self.name, self.uri, self.threads, self.size = name, uri, threads, size

    def cmd(self, seconds):
        return [THREADS, self.uri, str(self.threads), str(self.size), str(seconds)]


# (one connection, multi-conn=4, target ratio) by workload name.
MULTI_CONN_PAIRS = [
    ("4k randread, 64 in flight, 1 ms server (fio)",
     "4k randread, 64 in flight, 1 ms server, multi-conn=4 (fio)", 3.5),
    ("4k reads, 8 threads on one handle, 1 ms server",
     "4k reads, 8 threads on one handle, 1 ms server, multi-conn=4", 3),
    ("4k randread, 64 in flight (fio)", "4k randread, 64 in flight, multi-conn=4 (fio)", 0.95),
]


def handle_memory(uri, rounds):
    """KiB of RSS per connected handle on each library, through
    python3-libnbd (bench/handle-mem.py): medians over `rounds` rotated
    rounds of (after connect, after one 4 KiB pread)."""
    libs = list(LIBRARIES)
    res = {lib: [] for lib in libs}
    for r in range(rounds):
        for lib in libs[r % len(libs):] + libs[:r % len(libs)]:
            out, _, _, _ = run(["/usr/bin/python3", HANDLE_MEM, uri, str(MEM_HANDLES)], lib)
            m = re.search(r"connected ([\d.]+) pread ([\d.]+)", out)
            res[lib].append((float(m.group(1)), float(m.group(2))))
    return {lib: [statistics.median(x[i] for x in res[lib]) for i in range(2)] for lib in libs}


def cpu_seconds(pid):
    """User + system CPU seconds process `pid` has used so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def writer_rows(uri, server_pid, wanted, rounds, seconds):
    """The concurrent writer against the library's own sends, on ours:
    each row's two modes alternated (ABBA) for `rounds` rounds. Returns
    by row name: medians of (IOPS, client CPU µs/req, server CPU µs/req)
    per mode, the median of the per-round ratios writer/plain, and the
    target."""
    rows = {}
    for name, size, depth, target in wanted:
        res = {"plain": [], "writer": []}
        for r in range(rounds):
            for mode in (["plain", "writer"] if r % 2 == 0 else ["writer", "plain"]):
                before = cpu_seconds(server_pid)
                out, took, cpu, _ = run([WRITER, uri, str(size), str(depth), str(seconds), mode], "ours")
                server = cpu_seconds(server_pid) - before
                rate, reqs = CountingProgram.parse(None, out, took)
                res[mode].append((rate, cpu / reqs * 1e6, server / reqs * 1e6))
        med = {m: [statistics.median(x[i] for x in res[m]) for i in range(3)] for m in res}
        ratio = statistics.median(w[0] / p[0] for w, p in zip(res["writer"], res["plain"]))
        rows[name] = (med, ratio, target)
        print(f"{name}: IOPS plain {med['plain'][0]:.0f}, writer {med['writer'][0]:.0f}; "
              f"median ratio {ratio:.2f}x (target ≥{target}x)", flush=True)
    return rows


# The server rows: fio's nbd engine on Debian's libnbd against each server,
# (workload name, rw, bs, depth), and the pairs compared with their
# targets: (ours, theirs, measure, target), measure "iops" (ours/theirs at
# least the target) or "cpu" (ours/theirs at most the target).
SERVER_WORKLOADS = [
    ("4k randread, 64 in flight", "randread", "4k", 64),
    ("4k randwrite, 64 in flight", "randwrite", "4k", 64),
    ("1M read, 8 in flight", "read", "1m", 8),
]
SERVER_TARGETS = [
    ("memory", "nbdkit memory", "4k randread, 64 in flight", "iops", 1.3),
    ("memory", "nbdkit memory", "4k randread, 64 in flight", "cpu", 0.6),
    ("file", "qemu-nbd file", None, "iops", 1.2),
]


def server_rows(servers, rounds, seconds):
    """fio against every server in `servers` ({name: (socket, pid)}),
    rotated each round. Returns {(workload, server): (IOPS, server CPU
    µs/req)} medians."""
    names = list(servers)
    res = {}
    for wname, rw, bs, depth in SERVER_WORKLOADS:
        for r in range(rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                sock, pid = servers[name]
                before = cpu_seconds(pid)
                w = Fio(wname, rw, bs, depth, sock)
                out, took, _, _ = run(w.cmd(seconds), "1.14.2")
                iops, reqs = w.parse(out, took)
                res.setdefault((wname, name), []).append((iops, (cpu_seconds(pid) - before) / reqs * 1e6))
        print(f"server {wname}: " + ", ".join(
            f"{n} {statistics.median(x[0] for x in res[(wname, n)]):.0f} IOPS" for n in names), flush=True)
    return {k: [statistics.median(x[i] for x in v) for i in range(2)] for k, v in res.items()}


def machine():
    model = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30)
    debian = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "libnbd0"], capture_output=True, text=True).stdout
    return (f"{model}, {os.cpu_count()} CPUs, {mem:.0f} GiB, Linux {platform.release()}; "
            f"Debian's libnbd {debian} and libnbd 1.22.2 built by `make reference`; {time.strftime('%Y-%m-%d')}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=4)
    ap.add_argument("--quick", action="store_true", help="smaller copy, for a smoke run")
    ap.add_argument("--markdown", help="also write the table here")
    ap.add_argument("--only", help="run only workloads whose name contains this")
    args = ap.parse_args()
    for prog in ["fio", "nbdcopy", "nbdkit", "qemu-nbd", "strace"]:
        if shutil.which(prog) is None:
            sys.exit(f"bench: {prog} is not installed (make deps)")
    for f in [os.path.join(OURS, "libnbd.so.0"), os.path.join(REFERENCE, "libnbd.so.0"), AIO, THREADS, WRITER, SERVER]:
        if not os.path.exists(f):
            sys.exit(f"bench: {f} is missing (make bench builds it)")

    tmp = tempfile.mkdtemp(prefix="nbd-bench.")
    servers = []
    try:
        def serve(name, argv):
            sock = os.path.join(tmp, name + ".sock")
            p = subprocess.Popen([a.replace("SOCK", sock) for a in argv],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            servers.append(p)
            wait_for_socket(sock, p)
            return sock

        mem = serve("memory", ["nbdkit", "-f", "-U", "SOCK", "memory", "256M"])
        wmem = serve("wmemory", ["nbdkit", "-f", "-U", "SOCK", "memory", "256M"])
        copy_size = (256 << 20) if args.quick else (4 << 30)
        pattern = serve("pattern", ["nbdkit", "-f", "-U", "SOCK", "pattern", str(copy_size)])
        image = os.path.join(tmp, "disk.img")
        with open(image, "wb") as f:
            f.truncate(256 << 20)
        # A server that serves each connection's requests one at a time,
        # 1 ms each: what more connections per handle pay off against.
        slow = serve("slow", ["nbdkit", "-f", "-U", "SOCK", "--threads=1", "--filter=delay", "memory", "64M",
                              "rdelay=1ms", "wdelay=1ms"])
        qemu = serve("qemu", ["qemu-nbd", "-k", "SOCK", "-f", "raw", "-t", "-e", "0", image])
        # Reads must find data: fill both read servers once.
        for s in [mem, qemu]:
            subprocess.run(["fio", "--name=fill", "--ioengine=nbd", f"--uri=nbd+unix:///?socket={s}",
                            "--rw=write", "--bs=1m", "--iodepth=8", "--size=256m", "--thread",
                            "--output=/dev/null"], check=True)

        workloads = [
            Fio("4k randread, 64 in flight (fio)", "randread", "4k", 64, mem),
            Fio("4k randwrite, 64 in flight (fio)", "randwrite", "4k", 64, wmem),
            Fio("1M seq read, 8 in flight (fio)", "read", "1m", 8, mem),
            Fio("4k randread, 1 in flight (fio)", "randread", "4k", 1, mem),
            Copy(f"nbdcopy {copy_size >> 20} MiB pattern to null:", f"nbd+unix:///?socket={pattern}",
                 copy_size, 256 << 10),
            Aio("4k reads, 64 in flight, own poll loop (nbdkit)", f"nbd+unix:///?socket={mem}", 64, 4096),
            Aio("4k reads, 64 in flight, own poll loop (qemu-nbd)", f"nbd+unix:///?socket={qemu}", 64, 4096),
            Threads("4k reads, 8 threads on one handle, 1 ms server", f"nbd+unix:///?socket={slow}", 8, 4096),
            # Multi-conn: the same URIs with multi-conn=4, which libnbd
            # ignores (one connection there); MULTI_CONN_PAIRS compares.
            Threads("4k reads, 8 threads on one handle, 1 ms server, multi-conn=4",
                    f"nbd+unix:///?socket={slow}&multi-conn=4", 8, 4096),
            Fio("4k randread, 64 in flight, 1 ms server (fio)", "randread", "4k", 64, slow),
            Fio("4k randread, 64 in flight, 1 ms server, multi-conn=4 (fio)", "randread", "4k", 64, slow,
                "&multi-conn=4"),
            Fio("4k randread, 64 in flight, multi-conn=4 (fio)", "randread", "4k", 64, mem, "&multi-conn=4"),
        ]
        server = None
        # `--only nbd-rs-server` runs these rows alone.
        if not args.only or args.only in "nbd-rs-server":
            image_size = 256 << 20
            sockets = {}
            for name, argv in [
                ("ours memory", [SERVER, "-U", "SOCK", "memory:256M"]),
                ("nbdkit memory", ["nbdkit", "-f", "-U", "SOCK", "memory", "256M"]),
                ("ours file", [SERVER, "-U", "SOCK", "file:IMAGE"]),
                ("nbdkit file", ["nbdkit", "-f", "-U", "SOCK", "file", "IMAGE"]),
                ("qemu-nbd file", ["qemu-nbd", "-k", "SOCK", "-f", "raw", "-t", "-e", "0", "--cache=writeback",
                                   "--aio=threads", "IMAGE"]),
            ]:
                img = os.path.join(tmp, name.replace(" ", "-") + ".img")
                with open(img, "wb") as f:
                    f.truncate(image_size)
                sock = serve(name.replace(" ", "-"), [a.replace("IMAGE", img) for a in argv])
                sockets[name] = (sock, servers[-1].pid)
                subprocess.run(["fio", "--name=fill", "--ioengine=nbd", f"--uri=nbd+unix:///?socket={sock}",
                                "--rw=write", "--bs=1m", "--iodepth=8", "--size=256m", "--thread",
                                "--output=/dev/null"], check=True)
            server = server_rows(sockets, args.rounds, args.seconds)
        writers = None
        wanted = [row for row in WRITER_ROWS if not args.only or args.only in row[0]]
        if wanted:
            wsock = serve("writer", ["nbdkit", "-f", "-U", "SOCK", "memory", "256M"])
            writers = writer_rows(f"nbd+unix:///?socket={wsock}", servers[-1].pid, wanted, args.rounds, args.seconds)
        mem_name = f"KiB of RSS per connected handle ({MEM_HANDLES} handles, python3-libnbd)"
        if args.only:
            workloads = [w for w in workloads if args.only in w.name]
        rows = []
        libs = list(LIBRARIES)
        for w in workloads:
            res = {lib: [] for lib in libs}
            for r in range(args.rounds):
                for lib in libs[r % len(libs):] + libs[:r % len(libs)]:
                    out, took, cpu, rss = run(w.cmd(args.seconds), lib)
                    rate, reqs = w.parse(out, took)
                    res[lib].append((rate, cpu / reqs * 1e6, rss))
            sc = {}
            for lib in libs:
                trace = os.path.join(tmp, f"strace.{lib}")
                out, took, cpu, rss = run(w.cmd(max(1.0, args.seconds / 2)), lib, strace_out=trace)
                _, reqs = w.parse(out, took)
                sc[lib] = syscalls(trace) / reqs
            med = {lib: [statistics.median(x[i] for x in res[lib]) for i in range(3)] for lib in res}
            rows.append((w.name, w.unit, med, sc))
            o = med["ours"]
            print(f"{w.name}: {w.unit} " + ", ".join(f"{lib} {med[lib][0]:.0f}" for lib in libs) + "; "
                  + ", ".join(f"ours/{lib} {o[0] / med[lib][0]:.2f}x" for lib in libs[:-1]), flush=True)
        memory = None
        if not args.only or args.only in mem_name:
            memory = handle_memory(f"nbd+unix:///?socket={mem}", args.rounds)
            print(f"{mem_name}, after connect / after a 4 KiB pread: "
                  + ", ".join(f"{lib} {memory[lib][0]:.1f} / {memory[lib][1]:.1f}" for lib in libs), flush=True)
    finally:
        for p in servers:
            p.terminate()
        for p in servers:
            p.wait()
        shutil.rmtree(tmp, ignore_errors=True)

    refs = [lib for lib in LIBRARIES if lib != "ours"]

    def across(values, fmt):
        """`a → b → ours (ours/a / ours/b)` for one measure of every library."""
        chain = " → ".join(fmt(values[lib]) for lib in LIBRARIES)
        ratios = " / ".join(f"{values['ours'] / values[lib]:.2f}x" for lib in refs)
        return f"{chain} ({ratios})"

    lines = [f"Machine: {machine()}. Medians of {args.rounds} rotated rounds of {args.seconds:g} s."]
    if rows:
        lines += ["", "| workload | " + " | ".join(f"libnbd {lib}" for lib in refs) + " | ours | "
                  + " | ".join(f"ours/{lib}" for lib in refs)
                  + " | CPU µs/req " + " → ".join(LIBRARIES) + " | syscalls/req " + " → ".join(LIBRARIES)
                  + " | peak RSS MiB " + " → ".join(LIBRARIES) + " |",
                  "|---|" + "---|" * (2 * len(refs) + 4)]
    for name, unit, med, sc in rows:
        rate = {lib: med[lib][0] for lib in LIBRARIES}
        cpu = {lib: med[lib][1] for lib in LIBRARIES}
        rss = {lib: med[lib][2] / 1024 for lib in LIBRARIES}
        lines.append(f"| {name} | " + " | ".join(f"{rate[lib]:,.0f} {unit}" for lib in refs)
                     + f" | {rate['ours']:,.0f} {unit} | "
                     + " | ".join(f"**{rate['ours'] / rate[lib]:.2f}x**" for lib in refs)
                     + f" | {across(cpu, lambda v: f'{v:.1f}')} | {across(sc, lambda v: f'{v:.2f}')}"
                     + f" | {across(rss, lambda v: f'{v:.1f}')} |")
    if memory:
        lines += ["", f"| {mem_name} | " + " | ".join(f"libnbd {lib}" for lib in refs) + " | ours | "
                  + " | ".join(f"ours/{lib}" for lib in refs) + " |",
                  "|---|" + "---|" * (2 * len(refs) + 1)]
        for i, when in enumerate(["connected", "connected, after one 4 KiB pread"]):
            kib = {lib: memory[lib][i] for lib in LIBRARIES}
            lines.append(f"| {when} | " + " | ".join(f"{kib[lib]:.1f}" for lib in refs) + f" | {kib['ours']:.1f} | "
                         + " | ".join(f"**{kib['ours'] / kib[lib]:.2f}x**" for lib in refs) + " |")
    # Multi-conn against one connection, on ours, in the same run.
    by_name = {name: med["ours"][0] for name, _, med, _ in rows}
    pairs = [(a, b, t) for a, b, t in MULTI_CONN_PAIRS if a in by_name and b in by_name]
    if pairs:
        lines += ["", "| ours: multi-conn=4 against one connection | one | multi-conn=4 | ratio | target |",
                  "|---|---|---|---|---|"]
        for one, four, target in pairs:
            lines.append(f"| {four} | {by_name[one]:,.0f} | {by_name[four]:,.0f} | "
                         f"**{by_name[four] / by_name[one]:.2f}x** | ≥{target}x |")
    if server:
        names = ["ours memory", "nbdkit memory", "ours file", "nbdkit file", "qemu-nbd file"]
        lines += ["", "| server (fio on Debian's libnbd, 256 MiB written first) | "
                  + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for wname, _, _, _ in SERVER_WORKLOADS:
            lines.append(f"| {wname}: IOPS (server CPU µs/req) | "
                         + " | ".join(f"{server[(wname, n)][0]:,.0f} ({server[(wname, n)][1]:.1f})" for n in names)
                         + " |")
        lines += ["", "| ours against | workload | measure | ratio | target |", "|---|---|---|---|---|"]
        for ours, theirs, wl, measure, target in SERVER_TARGETS:
            for wname, _, _, _ in SERVER_WORKLOADS:
                if wl is not None and wname != wl:
                    continue
                i = 0 if measure == "iops" else 1
                ratio = server[(wname, "ours " + ours)][i] / server[(wname, theirs)][i]
                want = f"≥{target}x" if measure == "iops" else f"≤{target}x"
                lines.append(f"| {theirs} | {wname} | {'IOPS' if i == 0 else 'server CPU/req'} | "
                             f"**{ratio:.2f}x** | {want} |")
    if writers:
        lines += ["", "| ours: concurrent writer against the library's own sends (nbdkit memory) "
                  "| plain IOPS | writer IOPS | ratio (median of rounds) | target "
                  "| client CPU µs/req plain → writer | nbdkit CPU µs/req plain → writer |",
                  "|---|---|---|---|---|---|---|"]
        for name, (med, ratio, target) in writers.items():
            p, w = med["plain"], med["writer"]
            lines.append(f"| {name.split(': ', 1)[1]} | {p[0]:,.0f} | {w[0]:,.0f} | **{ratio:.2f}x** | ≥{target}x "
                         f"| {p[1]:.1f} → {w[1]:.1f} | {p[2]:.1f} → {w[2]:.1f} |")
    table = "\n".join(lines)
    print()
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
