#!/usr/bin/env python3
"""Does `curve bench --driver nbd` measure what fio's nbd engine measures? Identical jobs from
both tools against the same export of our nebd-server, in one run, alternating which tool goes
first, medians of REPEAT runs, and the ratio curve-bench / fio per job.

Two kinds of export:
  file:?direct  a file on the local disk read and written with O_DIRECT: the disk is the limit,
                so the figures measure the export, and the tools must agree (within 20%);
  mem:          memory: the export costs a few µs, so on a small machine the client's own CPU
                is the limit, and the figures measure the client (libnbd + fio spend more CPU
                per I/O than our driver): shown for reference, not expected to agree.

  bench/fio_agreement.py [--time 4] [--repeat 3] [--dir DIR] [--write-md docs/benchmarks.md]
Needs: fio (with its nbd engine); builds the release binaries itself.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from nbd_peers import ROOT, wait_for  # noqa: E402

JOBS = [("4K randread QD1", "randread", 4096, 1), ("4K randread QD32", "randread", 4096, 32),
        ("4K randwrite QD1", "randwrite", 4096, 1), ("4K randwrite QD32", "randwrite", 4096, 32),
        ("1M read QD4", "read", 1 << 20, 4), ("1M write QD4", "write", 1 << 20, 4)]
SIZE = 1 << 30


def curve_bench(uri, rw, bs, qd, secs):
    out = subprocess.run([os.path.join(ROOT, "target/release/curve"), "bench", "--driver", "nbd",
                          "--target", uri, "-w", rw, "-q", str(qd), "-o", str(bs), "-t", str(secs),
                          "--size", str(SIZE), "--format", "json"],
                         check=True, capture_output=True, text=True).stdout
    j = json.loads(out)
    return j["iops"], j["lat_mean_us"]


def fio(uri, rw, bs, qd, secs):
    out = subprocess.run(["fio", "--name=job", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}",
                          f"--bs={bs}", f"--iodepth={qd}", f"--size={SIZE}", "--time_based",
                          f"--runtime={secs}", "--output-format=json"],
                         check=True, capture_output=True, text=True).stdout
    side = json.loads(out[out.index("{"):])["jobs"][0]["read" if "read" in rw else "write"]
    return side["iops"], side["lat_ns"]["mean"] / 1000


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--time", type=float, default=4)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", help="where the O_DIRECT file goes (a real disk, not tmpfs)",
                    default=os.path.join(ROOT, "target"))
    ap.add_argument("--write-md")
    a = ap.parse_args()
    if not shutil.which("fio"):
        sys.exit("fio is not installed")
    subprocess.run(["cargo", "build", "--release", "--bins", "-q"], cwd=ROOT, check=True)
    d = tempfile.mkdtemp(prefix="curve-agree.")
    fdir = tempfile.mkdtemp(prefix="curve-agree.", dir=a.dir)
    proc = None
    try:
        run = os.path.join(d, "run")
        proc = subprocess.Popen([os.path.join(ROOT, "target/release/nebd-server"), "--run-dir", run],
                                stderr=open(os.path.join(d, "nebd.log"), "w"))
        wait_for(os.path.join(run, "control.sock"), proc)
        img = os.path.join(fdir, "vol.img")
        with open(img, "wb") as f:  # written once so that reads hit allocated blocks
            chunk = os.urandom(1 << 20)
            for _ in range(SIZE >> 20):
                f.write(chunk)
            os.fsync(f.fileno())
        exports = []
        for name, spec in [("file:?direct (disk-bound)", f"file:{img}?direct"), ("mem: (client-bound)", f"mem:{SIZE}")]:
            sock = os.path.join(d, f"e{len(exports)}.sock")
            uri = subprocess.run([os.path.join(ROOT, "target/release/curve"), "--run-dir", run, "export", "add",
                                  "--volume", spec, "--nbd", f"unix:{sock}", "--name", f"e{len(exports)}"],
                                 check=True, capture_output=True, text=True).stdout.strip()
            exports.append((name, uri))
        rows = []
        for ename, uri in exports:
            for jname, rw, bs, qd in JOBS:
                got = {"curve": [], "fio": []}
                for rep in range(a.repeat):
                    tools = [("curve", curve_bench), ("fio", fio)]
                    for tname, f in (tools if rep % 2 == 0 else tools[::-1]):
                        got[tname].append(f(uri, rw, bs, qd, a.time))
                med = {t: (statistics.median(x[0] for x in v), statistics.median(x[1] for x in v))
                       for t, v in got.items()}
                ratio = med["curve"][0] / med["fio"][0]
                row = (f"| {ename} | {jname} | {med['curve'][0]:,.0f} ({med['curve'][1]:.0f} µs) | "
                       f"{med['fio'][0]:,.0f} ({med['fio'][1]:.0f} µs) | {ratio:.2f} | "
                       f"{'yes' if abs(ratio - 1) <= 0.2 else 'no'} |")
                print(row, flush=True)
                rows.append(row)
        table = "\n".join(["| export | job | curve bench --driver nbd | fio --ioengine=nbd | ratio | within 20% |",
                           "|---|---|---:|---:|---:|:---:|"] + rows)
        print(table)
        if a.write_md:
            with open(a.write_md, "a") as f:
                f.write("\n## `curve bench --driver nbd` against fio's nbd engine (`bench/fio_agreement.py`)\n\n"
                        f"`bench/fio_agreement.py --time {a.time:g} --repeat {a.repeat}`: IOPS (mean latency), "
                        f"medians of {a.repeat} runs per tool, the tool going first alternating; same export, "
                        "same run, no pinning.\n\n" + table + "\n")
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=10)
        shutil.rmtree(d, ignore_errors=True)
        shutil.rmtree(fdir, ignore_errors=True)


if __name__ == "__main__":
    main()
