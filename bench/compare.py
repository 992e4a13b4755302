#!/usr/bin/env python3
"""Ours against the peers through identical drivers, in one run: `curve bench` jobs against
  NBD:        our nebd-server `mem:` export, nbdkit's memory plugin, qemu-storage-daemon's NBD
              export of a /dev/shm file                                   (driver nbd)
  vhost-user: our nebd-server vhost-user-blk export of a `mem:` volume, and
              qemu-storage-daemon's vhost-user-blk export of the file  (driver vhost-user)
Every job runs against every target REPEAT times, the order of targets rotated each time; the
table holds medians and our/best-peer ratios per protocol.

  bench/compare.py [--time 5] [--repeat 3] [--write-md docs/benchmarks.md]
Needs: nbdkit, qemu-storage-daemon; builds the release binaries itself.
"""
import argparse, json, os, shutil, statistics, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOBS = [("4K randread QD1", "randread", 4096, 1), ("4K randread QD32", "randread", 4096, 32),
        ("4K randwrite QD1", "randwrite", 4096, 1), ("4K randwrite QD32", "randwrite", 4096, 32),
        ("1M read QD8", "read", 1 << 20, 8), ("1M write QD8", "write", 1 << 20, 8)]


def wait_for(path, proc, what):
    for _ in range(200):
        if os.path.exists(path):
            return
        if proc.poll() is not None:
            sys.exit(f"{what} exited")
        time.sleep(0.05)
    sys.exit(f"{what} did not create {path}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--time", type=float, default=5)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--write-md")
    a = ap.parse_args()
    subprocess.run(["cargo", "build", "--release", "--bins", "-q"], cwd=ROOT, check=True)
    curve = os.path.join(ROOT, "target/release/curve")
    d = tempfile.mkdtemp(prefix="curve-compare.")
    shm = tempfile.mkdtemp(prefix="curve-compare.", dir="/dev/shm")
    procs = []
    try:
        run = os.path.join(d, "run")
        procs.append(subprocess.Popen([os.path.join(ROOT, "target/release/nebd-server"), "--run-dir", run],
                                      stderr=open(os.path.join(d, "nebd.log"), "w")))
        wait_for(os.path.join(run, "control.sock"), procs[-1], "nebd-server")
        ours = subprocess.run([curve, "--run-dir", run, "export", "add", "--volume", "mem:1G", "--nbd",
                               "unix:" + os.path.join(d, "ours.sock"), "--name", "v"],
                              check=True, capture_output=True, text=True).stdout.strip()
        ours_vu = os.path.join(d, "ours-vu.sock")
        subprocess.run([curve, "--run-dir", run, "export", "add", "--volume", "mem:1G", "--vhost-user-blk",
                        ours_vu, "--name", "vu"], check=True, capture_output=True)
        kit = os.path.join(d, "nbdkit.sock")
        procs.append(subprocess.Popen(["nbdkit", "-f", "-U", kit, "--exportname", "v", "memory", "1G"],
                                      stderr=subprocess.DEVNULL))
        wait_for(kit, procs[-1], "nbdkit")
        img = os.path.join(shm, "img")
        with open(img, "wb") as f:
            f.truncate(1 << 30)
        qnbd, qvu = os.path.join(d, "qsd-nbd.sock"), os.path.join(d, "qsd-vu.sock")
        procs.append(subprocess.Popen(
            ["qemu-storage-daemon", "--blockdev", f"driver=file,filename={img},node-name=f",
             "--nbd-server", f"addr.type=unix,addr.path={qnbd}",
             "--export", "type=nbd,id=n,node-name=f,name=v,writable=on",
             "--export", f"type=vhost-user-blk,id=u,node-name=f,addr.type=unix,addr.path={qvu},writable=on"],
            stderr=open(os.path.join(d, "qsd.log"), "w")))
        wait_for(qvu, procs[-1], "qemu-storage-daemon")
        targets = [("ours (nebd-server NBD)", "nbd", ours, True),
                   ("nbdkit memory (NBD)", "nbd", f"nbd+unix:///v?socket={kit}", False),
                   ("qemu-storage-daemon (NBD)", "nbd", f"nbd+unix:///v?socket={qnbd}", False),
                   ("ours (nebd-server vhost-user-blk)", "vhost-user", ours_vu, True),
                   ("qemu-storage-daemon (vhost-user-blk)", "vhost-user", qvu, False)]
        results = {}
        for name, w, bs, qd in JOBS:
            for rep in range(a.repeat):
                order = targets[rep % len(targets):] + targets[:rep % len(targets)]
                for tname, driver, target, _ in order:
                    out = subprocess.run([curve, "bench", "--driver", driver, "--target", target, "-w", w,
                                          "-q", str(qd), "-o", str(bs), "-t", str(a.time), "--size", "1G",
                                          "--format", "json"], check=True, capture_output=True, text=True).stdout
                    j = json.loads(out)
                    results.setdefault((name, tname), []).append((j["iops"], j["lat_mean_us"]))
        lines = ["| job | " + " | ".join(t[0] for t in targets) + " | NBD: ours / best peer | vhost-user: ours / qsd |",
                 "|---|" + "---:|" * len(targets) + "---:|---:|"]
        for name, *_ in JOBS:
            cells, med = [], {}
            for tname, driver, _, _ in targets:
                iops = statistics.median(r[0] for r in results[(name, tname)])
                lat = statistics.median(r[1] for r in results[(name, tname)])
                med[tname] = iops
                cells.append(f"{iops:,.0f} ({lat:.0f} µs)")
            best = max(med[t[0]] for t in targets if t[1] == "nbd" and not t[3])
            vu = med["ours (nebd-server vhost-user-blk)"] / med["qemu-storage-daemon (vhost-user-blk)"]
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {med[targets[0][0]] / best:.2f} | {vu:.2f} |")
        table = "\n".join(lines)
        print(table)
        if a.write_md:
            with open(a.write_md, "a") as f:
                f.write("\n## Ours vs peers through identical `curve bench` drivers (`bench/compare.py`)\n\n")
                f.write(f"`bench/compare.py --time {a.time:g} --repeat {a.repeat}`: IOPS (mean latency), medians of "
                        f"{a.repeat} runs with the target order rotated; no CPU pinning (2 cores shared by the "
                        "driver and the server).\n\n" + table + "\n")
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(d, ignore_errors=True)
        shutil.rmtree(shm, ignore_errors=True)


if __name__ == "__main__":
    main()
