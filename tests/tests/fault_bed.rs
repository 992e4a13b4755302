//! `deploy/topology-3hosts.toml` made real: three hosts (network namespaces on a bridge), each
//! running an etcd member, an MDS and a chunkserver, and part2 on a fourth host exporting a
//! volume over NBD to fio, which writes and verifies while faults hit the hosts one after the
//! other: kill -9 and SIGSTOP of the leader of the written copyset, a partition of its host
//! (with that host's MDS and etcd member), packet loss, a slow link and a 100 ms delay each way
//! there, a partition of the leading MDS's host, and a partition of part2's own host. fio sees
//! pauses only: no error, every block verifies, and the longest write of each fault (QD1: its
//! stall) is printed — the figures in docs/benchmarks.md. And the bed's delay line on its own:
//! every frame held, bulk data whole.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use curve_tests::cluster::{Extras, MiniCluster};
use curve_tests::netbed::NetBed;
use curve_tests::{Part2, require_tool, run_ok};

/// What is done to a host (or a daemon in it) while fio runs.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Fault {
    /// kill -9 of the leader's chunkserver, restarted after.
    Kill,
    /// SIGSTOP of the leader's chunkserver, SIGCONT after.
    Stop,
    /// The leader's host (chunkserver, MDS, etcd member) off the network.
    Partition,
    /// The leader's host drops 10% of its packets each way.
    Loss,
    /// The leader's host behind a 1 Mbit/s link with a 500 ms queue.
    SlowLink,
    /// Every frame to and from the leader's host held 100 ms.
    Delay,
    /// part2's host off the network: nothing can be served, fio waits.
    PartitionPart2,
    /// The leading MDS's host (MDS, etcd member, chunkserver) off the network.
    PartitionMdsLeader,
}

/// fio's JSON report of one job: (writes, longest write, errors).
fn fio_report(json: &str) -> (u64, Duration, u64) {
    // fio may print notes before the JSON.
    let v: serde_json::Value =
        serde_json::from_str(&json[json.find('{').expect("fio's JSON")..]).expect("fio's JSON");
    let job = &v["jobs"][0];
    (
        job["write"]["total_ios"].as_u64().unwrap(),
        Duration::from_nanos(job["write"]["lat_ns"]["max"].as_u64().unwrap()),
        job["error"].as_u64().unwrap(),
    )
}

#[test]
fn three_hosts_and_part2_on_a_fourth_ride_out_every_fault_under_fio_verify() {
    require_tool("fio");
    require_tool("nft");
    let tmp = tempfile::tempdir().unwrap();
    let bed = Arc::new(NetBed::new(4));
    let extras = Extras {
        bed: Some(bed.clone()),
        ..Default::default()
    };
    let mut cluster = MiniCluster::start_with(tmp.path(), 3, true, &extras);
    let mds = cluster.mds_addrs().join(",");
    let key = cluster.key();
    let part2 = Part2::start_on(&["--mds", &mds, "--key-file", &key], Some((bed.clone(), 3)));
    cluster.create_volume("/v", 1 << 30);
    let (uri, _) = part2.export_nbd("v", "curve:/v");

    let faults = [
        Fault::Kill,
        Fault::Stop,
        Fault::Partition,
        Fault::Loss,
        Fault::SlowLink,
        Fault::Delay,
        Fault::PartitionMdsLeader,
        Fault::PartitionPart2,
    ];
    // CURVE_FAULTS=Kill,Delay runs only those (when looking into one).
    let only = std::env::var("CURVE_FAULTS").ok();
    let mut figures = Vec::new();
    for (n, fault) in faults.iter().enumerate() {
        if only
            .as_ref()
            .is_some_and(|o| !o.split(',').any(|f| f == format!("{fault:?}")))
        {
            continue;
        }
        // Each fault gets a chunk of its own (one copyset), written QD1 for 14 s and then
        // verified; the fault lasts 5 s from the 4th second.
        let offset = n as u64 * (16 << 20);
        let fio = {
            let uri = uri.clone();
            std::thread::spawn(move || {
                run_ok(Command::new("fio").args([
                    "--name=fault",
                    "--ioengine=nbd",
                    &format!("--uri={uri}"),
                    "--rw=randwrite",
                    "--bs=4k",
                    "--iodepth=1",
                    &format!("--offset={offset}"),
                    "--size=16M",
                    "--time_based",
                    "--runtime=14",
                    "--verify=crc32c",
                    "--verify_state_save=0",
                    "--do_verify=1",
                    "--verify_fatal=1",
                    "--output-format=json",
                ]))
            })
        };
        std::thread::sleep(Duration::from_secs(4));
        let i = match fault {
            Fault::PartitionMdsLeader => cluster.mds_leader(),
            Fault::PartitionPart2 => 3,
            _ => cluster.leader_of("/v", offset),
        };
        let pid = cluster.chunkservers[i.min(2)]
            .daemon
            .as_ref()
            .unwrap()
            .pid() as i32;
        let t0 = Instant::now();
        let logs = std::env::var_os("CURVE_FAULTS_LOGS").is_some();
        if logs {
            println!("{} {fault:?} of host {i}", utc_now());
        }
        match fault {
            Fault::Kill => cluster.chunkservers[i].kill9(),
            // SAFETY: signals a chunkserver this test started.
            Fault::Stop => unsafe {
                libc::kill(pid, libc::SIGSTOP);
            },
            Fault::Partition | Fault::PartitionMdsLeader | Fault::PartitionPart2 => {
                bed.partition(i)
            }
            Fault::Loss => bed.loss(i, 10),
            Fault::SlowLink => bed.slow(i, "1mbit", "500ms"),
            Fault::Delay => bed.delay(i, Duration::from_millis(100)),
        }
        std::thread::sleep(Duration::from_secs(5).saturating_sub(t0.elapsed()));
        match fault {
            Fault::Kill => cluster.chunkservers[i].restart(),
            // SAFETY: as above.
            Fault::Stop => unsafe {
                libc::kill(pid, libc::SIGCONT);
            },
            Fault::Partition | Fault::PartitionMdsLeader | Fault::PartitionPart2 => bed.heal(i),
            Fault::Loss | Fault::SlowLink | Fault::Delay => bed.clear(i),
        }
        if logs {
            println!("{} {fault:?} undone", utc_now());
        }
        // The supervisor's part: an MDS that lost its leadership lease while cut off exits
        // (by design: it stops answering as a leader); it is started again.
        for m in &mut cluster.mds {
            if m.daemon.as_mut().is_some_and(|d| !d.running()) {
                println!("{fault:?}: the MDS at {} exited; restarted", m.addr);
                if logs {
                    let log = m.log();
                    let tail: Vec<&str> = log
                        .lines()
                        .filter(|l| !l.contains(" INFO ") && !l.starts_with(' '))
                        .rev()
                        .take(8)
                        .collect();
                    println!(
                        "== its log, last lines but INFO\n{}",
                        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                    );
                }
                m.restart();
            }
        }
        if *fault == Fault::Delay {
            // Its round trips (200 ms) outlast openraft's AppendEntries timeout (the heartbeat
            // interval): nothing it sends is acknowledged in time, and it gives way.
            let log = cluster.chunkservers[i].log();
            assert!(
                log.contains("no quorum acknowledged this leader"),
                "the leader behind the delay line stepped down: {log}"
            );
        }
        let out = fio.join().expect("fio ran: no error, every block verified");
        let (writes, longest, errors) = fio_report(&out);
        assert_eq!(errors, 0, "{fault:?}: {out}");
        println!(
            "3 hosts + part2 on a 4th, fio QD1 4K randwrite + verify: {fault:?} of host {}: \
             {writes} writes in 14 s, longest write {:.0} ms",
            i,
            longest.as_secs_f64() * 1e3
        );
        figures.push((*fault, longest));
        if logs {
            println!("== part2's log\n{}", part2.log());
        }
        cluster.wait_healthy(Duration::from_secs(120));
    }
    // Sanity only (the figures are what counts): each fault is a pause, not an outage.
    for (fault, d) in &figures {
        assert!(*d < Duration::from_secs(15), "{fault:?}: {d:?}");
    }
    drop(part2);
    drop(cluster);
    drop(bed);
}

/// The time of day (UTC) as the daemons' logs write it.
fn utc_now() -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    let s = t.as_secs() % 86400;
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        s / 3600,
        s / 60 % 60,
        s % 60,
        t.subsec_millis()
    )
}

/// A listener in host `ns` of the bed (the thread enters the namespace to bind it).
fn listen_in(ns: &str, ip: &str) -> TcpListener {
    let (ns, ip) = (ns.to_string(), ip.to_string());
    std::thread::spawn(move || {
        let f = std::fs::File::open(format!("/var/run/netns/{ns}")).expect("the bed's netns");
        // SAFETY: moves only this thread into the namespace.
        let r = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
        TcpListener::bind((ip.as_str(), 0)).expect("bind in the host")
    })
    .join()
    .unwrap()
}

/// The longest of 10 round trips of one byte on `s`.
fn round_trips(s: &mut TcpStream) -> Duration {
    let mut worst = Duration::ZERO;
    for _ in 0..10 {
        let t = Instant::now();
        s.write_all(b"x").unwrap();
        let mut b = [0u8];
        s.read_exact(&mut b).unwrap();
        worst = worst.max(t.elapsed());
    }
    worst
}

#[test]
fn the_delay_line_holds_every_frame_and_carries_bulk_data_whole() {
    let bed = NetBed::new(1);
    let listener = listen_in(&bed.hosts[0].ns, &bed.hosts[0].ip);
    let addr = listener.local_addr().unwrap();
    // The host echoes: bytes back one for one, or a bulk payload's checksum.
    let server = std::thread::spawn(move || {
        for _ in 0..2 {
            let (mut c, _) = listener.accept().unwrap();
            let mut b = [0u8; 1 << 16];
            let mut sum = 0u64;
            loop {
                let n = c.read(&mut b).unwrap();
                if n == 0 {
                    break;
                }
                if n == 1 && b[0] == b'x' {
                    c.write_all(b"x").unwrap();
                    continue;
                }
                sum = b[..n]
                    .iter()
                    .fold(sum, |s, &x| s.wrapping_mul(31).wrapping_add(x as u64));
            }
            let _ = c.write_all(&sum.to_le_bytes());
        }
    });
    let timeout = Some(Duration::from_secs(30));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).unwrap();
    s.set_read_timeout(timeout).unwrap();
    s.set_nodelay(true).unwrap();
    let direct = round_trips(&mut s);
    bed.delay(0, Duration::from_millis(100));
    let delayed = round_trips(&mut s);
    // Each frame held 100 ms each way: no round trip under 200 ms.
    println!("longest round trip: direct {direct:?}, through a 100 ms delay line {delayed:?}");
    assert!(delayed >= Duration::from_millis(200), "{delayed:?}");
    drop(s);
    // 16 MiB over the delayed link (segmentation offload passes the line): every byte arrives.
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).unwrap();
    s.set_read_timeout(timeout).unwrap();
    let data: Vec<u8> = (0..16u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let want = data
        .iter()
        .fold(0u64, |s, &x| s.wrapping_mul(31).wrapping_add(x as u64));
    s.write_all(&data).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut got = [0u8; 8];
    s.read_exact(&mut got).unwrap();
    assert_eq!(
        u64::from_le_bytes(got),
        want,
        "16 MiB through the delay line"
    );
    server.join().unwrap();
    bed.clear(0);
    // The host's link is back on the bridge.
    let listener = listen_in(&bed.hosts[0].ns, &bed.hosts[0].ip);
    let addr = listener.local_addr().unwrap();
    let t = std::thread::spawn(move || listener.accept().map(|_| ()));
    TcpStream::connect_timeout(&addr, Duration::from_secs(10)).expect("connected after clear");
    t.join().unwrap().unwrap();
}
