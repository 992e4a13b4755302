#!/usr/bin/env python3
"""Side-by-side NBD benchmark: our nebd-server `mem:` export against nbdkit's memory plugin
and qemu-storage-daemon's null-co export (read-zeroes=off), driven by identical fio
`--ioengine=nbd` jobs over Unix sockets.

Every job runs against every server, REPEAT times, with the server order rotated on each
repetition; the table shows medians and our/peer ratios (IOPS: ours / best peer, higher is
better; latency: ours / best peer, lower is better).

CPU placement swings results on small machines, so it is explicit (--pin):
  split   fio on CPU 0, the server on the other CPUs   (client and server do not compete)
  shared  fio and the server on CPU 0                  (server CPU cost per I/O shows)
  none    wherever the scheduler puts them

Usage: bench/nbd_peers.py [--runtime 10] [--repeat 3] [--pin split,shared] [--write-md docs/benchmarks.md]
Needs: fio, nbdkit, qemu-storage-daemon, and `cargo build --release` (run by this script).
"""

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = "1G"
SIZE_BYTES = 1 << 30

JOBS = [
    # name, rw, bs, iodepth
    ("4K randread QD1", "randread", "4k", 1),
    ("4K randread QD32", "randread", "4k", 32),
    ("4K randwrite QD1", "randwrite", "4k", 1),
    ("4K randwrite QD32", "randwrite", "4k", 32),
    ("1M read QD8", "read", "1m", 8),
    ("1M write QD8", "write", "1m", 8),
]


def ncpus():
    return os.cpu_count() or 1


def cpu_sets(pin):
    """(client cpus, server cpus) as taskset lists, or None for no pinning."""
    n = ncpus()
    if pin == "none" or n < 2 and pin == "split":
        return None, None
    if pin == "shared":
        return "0", "0"
    return "0", ",".join(str(c) for c in range(1, n))


def taskset(cpus, argv):
    return (["taskset", "-c", cpus] if cpus else []) + argv


def wait_for(path, proc=None, timeout=20):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.exists(path):
            return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited early while waiting for {path}")
        time.sleep(0.05)
    raise RuntimeError(f"timed out waiting for {path}")


class Server:
    """A running NBD server we started; stopped by PID."""

    def __init__(self, name, uri, procs, pidfiles=()):
        self.name, self.uri, self.procs, self.pidfiles = name, uri, procs, pidfiles

    def stop(self):
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
        for pf in self.pidfiles:
            try:
                pid = int(open(pf).read().strip())
                os.kill(pid, signal.SIGTERM)
            except (OSError, ValueError):
                pass


def start_ours(tmp, cpus):
    run_dir = os.path.join(tmp, "curve")
    os.makedirs(run_dir, exist_ok=True)
    binary = os.path.join(ROOT, "target/release/nebd-server")
    env = dict(os.environ, RUST_LOG="warn")
    proc = subprocess.Popen(taskset(cpus, [binary, "--run-dir", run_dir]), env=env)
    wait_for(os.path.join(run_dir, "control.sock"), proc)
    sock = os.path.join(run_dir, "nbd.sock")
    subprocess.run(
        [os.path.join(ROOT, "target/release/curve"), "--run-dir", run_dir, "export", "add",
         "--volume", f"mem:{SIZE}", "--nbd", f"unix:{sock}", "--name", "bench"],
        check=True, stdout=subprocess.DEVNULL)
    return Server("curve-rs", f"nbd+unix:///bench?socket={sock}", [proc])


def start_nbdkit(tmp, cpus):
    sock, pidfile = os.path.join(tmp, "nbdkit.sock"), os.path.join(tmp, "nbdkit.pid")
    subprocess.run(taskset(cpus, ["nbdkit", "-U", sock, "-P", pidfile, "memory", SIZE]), check=True)
    wait_for(sock)
    return Server("nbdkit", f"nbd+unix:///?socket={sock}", [], [pidfile])


def start_qsd(tmp, cpus):
    sock, pidfile = os.path.join(tmp, "qsd.sock"), os.path.join(tmp, "qsd.pid")
    argv = ["qemu-storage-daemon",
            "--blockdev", f"driver=null-co,node-name=null0,size={SIZE_BYTES},read-zeroes=off",
            "--nbd-server", f"addr.type=unix,addr.path={sock}",
            "--export", "type=nbd,id=e0,node-name=null0,name=bench,writable=on",
            "--pidfile", pidfile]
    proc = subprocess.Popen(taskset(cpus, argv), stdout=subprocess.DEVNULL)
    wait_for(sock, proc)
    return Server("qemu-storage-daemon", f"nbd+unix:///bench?socket={sock}", [proc])


def fio(uri, rw, bs, qd, runtime, cpus):
    argv = ["fio", "--name=job", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", f"--bs={bs}",
            f"--iodepth={qd}", f"--size={SIZE}", "--time_based", f"--runtime={runtime}",
            "--ramp_time=1", "--numjobs=1", "--output-format=json"]
    out = subprocess.run(taskset(cpus, argv), check=True, capture_output=True, text=True).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]
    side = job["read"] if "read" in rw else job["write"]
    return {"iops": side["iops"], "bw": side["bw_bytes"], "lat_us": side["lat_ns"]["mean"] / 1000}


def run(args):
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "nebd-server", "-p", "curve-cli"],
                   cwd=ROOT, check=True)
    for tool in ("fio", "nbdkit", "qemu-storage-daemon"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is not installed")
    starters = [start_ours, start_nbdkit, start_qsd]
    results = {}  # (pin, job, server) -> [samples]
    for pin in args.pin.split(","):
        client_cpus, server_cpus = cpu_sets(pin)
        for rep in range(args.repeat):
            order = starters[rep % 3:] + starters[:rep % 3]
            for start in order:
                with tempfile.TemporaryDirectory(prefix="curve-bench-") as tmp:
                    server = start(tmp, server_cpus)
                    try:
                        for (label, rw, bs, qd) in JOBS:
                            r = fio(server.uri, rw, bs, qd, args.runtime, client_cpus)
                            results.setdefault((pin, label, server.name), []).append(r)
                            print(f"[{pin} rep {rep + 1}] {server.name:20} {label:18} "
                                  f"{r['iops']:>10.0f} IOPS {r['bw'] / 1e6:>8.0f} MB/s "
                                  f"{r['lat_us']:>8.1f} us", flush=True)
                    finally:
                        server.stop()
    return results


def table(results, pins, repeat, runtime):
    names = ["curve-rs", "nbdkit", "qemu-storage-daemon"]
    lines = []
    for pin in pins:
        lines.append(f"\n### pin={pin} (median of {repeat} x {runtime} s)\n")
        lines.append("| job | curve-rs | nbdkit | qemu-storage-daemon | IOPS ours/best peer | latency ours/best peer |")
        lines.append("|---|---|---|---|---|---|")
        for (label, rw, bs, qd) in JOBS:
            med = {}
            for n in names:
                s = results.get((pin, label, n), [])
                if s:
                    med[n] = {k: statistics.median(x[k] for x in s) for k in s[0]}
            if len(med) < 3:
                continue

            def cell(m):
                if bs == "1m":
                    return f"{m['bw'] / 1e9:.2f} GB/s / {m['lat_us']:.0f} us"
                return f"{m['iops'] / 1000:.1f}k / {m['lat_us']:.1f} us"

            best_iops = max(med[n]["iops"] for n in names[1:])
            best_lat = min(med[n]["lat_us"] for n in names[1:])
            lines.append(f"| {label} | " + " | ".join(cell(med[n]) for n in names) +
                         f" | {med['curve-rs']['iops'] / best_iops:.2f} | "
                         f"{med['curve-rs']['lat_us'] / best_lat:.2f} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runtime", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--pin", default="split,shared")
    ap.add_argument("--write-md", metavar="FILE", help="replace the NBD section of this markdown file")
    args = ap.parse_args()
    results = run(args)
    pins = args.pin.split(",")
    t = table(results, pins, args.repeat, args.runtime)
    print(t)
    if args.write_md:
        begin, end = "<!-- nbd-peers:begin -->", "<!-- nbd-peers:end -->"
        cmd = "bench/nbd_peers.py " + " ".join(sys.argv[1:])
        block = (f"{begin}\nGenerated by `{cmd}` on {time.strftime('%Y-%m-%d')}, "
                 f"{ncpus()} CPUs.\n{t}\n{end}")
        text = open(args.write_md).read() if os.path.exists(args.write_md) else ""
        if begin in text and end in text:
            text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
        else:
            text += "\n" + block + "\n"
        open(args.write_md, "w").write(text)


if __name__ == "__main__":
    main()
