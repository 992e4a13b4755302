#!/usr/bin/env python3
"""vhost-user-blk before/after a change, against qemu-storage-daemon, in one run: the same
`curve bench --driver vhost-user` jobs (4K randread/randwrite at QD1 and QD32) against
  before: a nebd-server binary given with --before (e.g. built from the previous commit),
  after:  this tree's release nebd-server,
  qsd:    qemu-storage-daemon's vhost-user-blk export of a /dev/shm file,
each export of a `mem:` volume (ours) with one queue, the target order rotated each repeat.
Prints medians and the after/before and after/qsd ratios.

  cp target/release/nebd-server /tmp/nebd-server.before   # at the old commit
  bench/vhost_ab.py --before /tmp/nebd-server.before [--time 5] [--repeat 5]
"""
import argparse, json, os, shutil, statistics, subprocess, tempfile

from compare import wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOBS = [("4K randread QD1", "randread", 1), ("4K randwrite QD1", "randwrite", 1),
        ("4K randread QD32", "randread", 32), ("4K randwrite QD32", "randwrite", 32)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--before", required=True)
    ap.add_argument("--time", type=float, default=5)
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args()
    subprocess.run(["cargo", "build", "--release", "--bins", "-q"], cwd=ROOT, check=True)
    curve = os.path.join(ROOT, "target/release/curve")
    d = tempfile.mkdtemp(prefix="curve-vhost-ab.")
    shm = tempfile.mkdtemp(prefix="curve-vhost-ab.", dir="/dev/shm")
    procs, targets = [], []
    try:
        for name, binary in [("before", a.before), ("after", os.path.join(ROOT, "target/release/nebd-server"))]:
            run = os.path.join(d, name)
            procs.append(subprocess.Popen([binary, "--run-dir", run],
                                          stderr=open(os.path.join(d, name + ".log"), "w")))
            wait_for(os.path.join(run, "control.sock"), procs[-1], name)
            sock = os.path.join(d, name + ".sock")
            subprocess.run([curve, "--run-dir", run, "export", "add", "--volume", "mem:1G",
                            "--vhost-user-blk", sock, "--name", "vu"], check=True, capture_output=True)
            targets.append((name, sock))
        img = os.path.join(shm, "img")
        with open(img, "wb") as f:
            f.truncate(1 << 30)
        qvu = os.path.join(d, "qsd.sock")
        procs.append(subprocess.Popen(
            ["qemu-storage-daemon", "--blockdev", f"driver=file,filename={img},node-name=f",
             "--export", f"type=vhost-user-blk,id=u,node-name=f,addr.type=unix,addr.path={qvu},writable=on"],
            stderr=open(os.path.join(d, "qsd.log"), "w")))
        wait_for(qvu, procs[-1], "qemu-storage-daemon")
        targets.append(("qsd", qvu))
        results = {}
        for job, w, qd in JOBS:
            for rep in range(a.repeat):
                order = targets[rep % len(targets):] + targets[:rep % len(targets)]
                for tname, sock in order:
                    out = subprocess.run([curve, "bench", "--driver", "vhost-user", "--target", sock, "-w", w,
                                          "-q", str(qd), "-o", "4096", "-t", str(a.time), "--size", "1G",
                                          "--format", "json"], check=True, capture_output=True, text=True).stdout
                    j = json.loads(out)
                    results.setdefault((job, tname), []).append((j["iops"], j["lat_mean_us"]))
        print(f"medians of {a.repeat} runs x {a.time:g} s, target order rotated; IOPS (mean latency)")
        print("| job | before | after | qemu-storage-daemon | after / before | after / qsd | before / qsd |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for job, *_ in JOBS:
            med = {t: (statistics.median(r[0] for r in results[(job, t)]),
                       statistics.median(r[1] for r in results[(job, t)])) for t, _ in targets}
            cells = " | ".join(f"{med[t][0]:,.0f} ({med[t][1]:.0f} µs)" for t in ("before", "after", "qsd"))
            print(f"| {job} | {cells} | {med['after'][0] / med['before'][0]:.2f} | "
                  f"{med['after'][0] / med['qsd'][0]:.2f} | {med['before'][0] / med['qsd'][0]:.2f} |")
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
