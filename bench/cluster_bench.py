#!/usr/bin/env python3
"""The cost of the cluster: fio through our NBD export of a cluster volume (playground: MDS +
3 raft chunkservers + nebd-server) next to a RAM volume exported by the same nebd-server, in
one run; and the QD1 4K write latency split by layer, from the chunkservers' metrics:

  end to end (fio)  = frontend (NBD + part2, as measured on the RAM volume)
                    + client (split, MetaCache, gRPC to the leader and back)
                    + chunkserver write (raft: leader log fsync, replication, follower fsync,
                      commit, apply to the chunk file); of which: raft log fsync

  bench/cluster_bench.py [--runtime 10] [--port 6800] [--write-md docs/benchmarks.md]
"""
import argparse, json, os, re, shutil, signal, subprocess, sys, tempfile, time, urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fio(uri, rw, bs, qd, runtime, size="1G"):
    out = subprocess.run(
        ["fio", "--name=b", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", f"--bs={bs}",
         f"--iodepth={qd}", f"--size={size}", "--time_based", f"--runtime={runtime}",
         "--ramp_time=1", "--output-format=json"],
        check=True, capture_output=True, text=True).stdout
    j = json.loads(out[out.index("{"):])["jobs"][0]
    side = j["write"] if "write" in rw else j["read"]
    return side["iops"], side["clat_ns"]["mean"] / 1000.0, side["clat_ns"]["percentile"].get("99.000000", 0) / 1000.0


def metrics(port):
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for line in text.splitlines():
        m = re.match(r'(curve_chunkserver_latency_seconds_(sum|count))\{op="write"\} (\S+)', line)
        if m:
            out["w_" + m.group(2)] = float(m.group(3))
        m = re.match(r'(curve_raft_log_fsync_seconds_(sum|count))(?:\{\})? (\S+)', line)
        if m:
            out["f_" + m.group(2)] = float(m.group(3))
    return out


def delta_avg(before, after, key):
    s = sum(a.get(key + "_sum", 0) - b.get(key + "_sum", 0) for b, a in zip(before, after))
    n = sum(a.get(key + "_count", 0) - b.get(key + "_count", 0) for b, a in zip(before, after))
    return (s / n * 1e6) if n else 0.0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runtime", type=int, default=10)
    ap.add_argument("--port", type=int, default=6800)
    ap.add_argument("--write-md")
    a = ap.parse_args()
    subprocess.run(["cargo", "build", "--release", "--bins", "-q"], cwd=ROOT, check=True)
    bindir = os.path.join(ROOT, "target/release")
    d = tempfile.mkdtemp(prefix="curve-cluster-bench.")
    pg = subprocess.Popen([os.path.join(bindir, "curve"), "playground", "up", "--dir", d,
                           "--size", "10G", "--port", str(a.port)],
                          stdout=subprocess.PIPE, stderr=open(os.path.join(d, "up.err"), "w"), text=True)
    try:
        uri = None
        deadline = time.time() + 300
        while time.time() < deadline:
            line = pg.stdout.readline()
            if line.startswith("nbd+unix://"):
                uri = line.strip()
                break
        if not uri:
            sys.exit("the playground did not start; see " + os.path.join(d, "up.err"))
        ram_sock = os.path.join(d, "nebd", "ram.sock")
        ram = subprocess.run([os.path.join(bindir, "curve"), "--run-dir", os.path.join(d, "nebd"),
                              "export", "add", "--volume", "mem:10G", "--nbd", "unix:" + ram_sock,
                              "--name", "ram"], check=True, capture_output=True, text=True).stdout.strip()
        # Fill the range the reads use, on both.
        for u in (uri, ram):
            subprocess.run(["fio", "--name=fill", "--ioengine=nbd", f"--uri={u}", "--rw=write",
                            "--bs=1M", "--iodepth=8", "--size=1G"], check=True, capture_output=True)
        mports = [a.port + 11, a.port + 12, a.port + 13]
        rows = []
        layers = None
        for rw, bs, qd in [("randwrite", "4k", 1), ("randwrite", "4k", 32), ("randread", "4k", 1),
                           ("randread", "4k", 32), ("write", "1M", 8), ("read", "1M", 8)]:
            before = [metrics(p) for p in mports]
            c = fio(uri, rw, bs, qd, a.runtime)
            after = [metrics(p) for p in mports]
            r = fio(ram, rw, bs, qd, a.runtime)
            rows.append((f"{bs} {rw} QD{qd}", c, r))
            if (rw, qd) == ("randwrite", 1):
                layers = (c[1], r[1], delta_avg(before, after, "w"), delta_avg(before, after, "f"))
        lines = ["| job | cluster IOPS | RAM IOPS | cluster/RAM | cluster mean µs | RAM mean µs | cluster p99 µs |",
                 "|---|---:|---:|---:|---:|---:|---:|"]
        for name, c, r in rows:
            lines.append(f"| {name} | {c[0]:.0f} | {r[0]:.0f} | {c[0] / r[0]:.3f} | {c[1]:.0f} | {r[1]:.0f} | {c[2]:.0f} |")
        e2e, front, cs, fs = layers
        lines += ["", "QD1 4K write latency by layer (means, µs):", "",
                  "| layer | µs | share |", "|---|---:|---:|",
                  f"| frontend: NBD + part2 (the RAM volume end to end) | {front:.0f} | {front / e2e:.0%} |",
                  f"| client: split, MetaCache, gRPC to the leader and back | {e2e - front - cs:.0f} | {(e2e - front - cs) / e2e:.0%} |",
                  f"| chunkserver write besides one fsync: replicate to a follower (its fsync included), commit, apply | {cs - fs:.0f} | {(cs - fs) / e2e:.0%} |",
                  f"| raft log fsync on the leader (mean per fsync) | {fs:.0f} | {fs / e2e:.0%} |",
                  f"| end to end (fio, cluster volume) | {e2e:.0f} | 100% |"]
        table = "\n".join(lines)
        print(table)
        if a.write_md:
            with open(a.write_md, "a") as f:
                f.write("\n## Cluster volume vs RAM volume through the same NBD export (`bench/cluster_bench.py`)\n\n")
                f.write(f"fio --ioengine=nbd, {a.runtime} s per job after 1 s ramp, 1 GiB range, playground "
                        "(MDS + 3 chunkservers + nebd-server on this 2-core machine, release build).\n\n")
                f.write(table + "\n")
    finally:
        pg.send_signal(signal.SIGTERM)
        try:
            pg.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pg.kill()
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
