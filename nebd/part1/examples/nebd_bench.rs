//! part1 -> part2 -> volume benchmark: 4K QD1 latency and 4K QD32 IOPS through libnebd,
//! next to the Unix-socket round-trip floor measured in the same run (two threads
//! ping-ponging request- and answer-sized messages over a socket pair, which is the least
//! any part1 -> part2 round trip can cost on this machine).
//!
//!   cargo run --release -p libnebd --example nebd_bench -- <run-dir>/nebd.sock mem:1G [seconds]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nebd::{Nebd, Options};

const BS: usize = 4096;

fn floor(secs: f64, req: usize, resp: usize) -> f64 {
    let (mut a, mut b) = UnixStream::pair().expect("socketpair");
    let echo = std::thread::spawn(move || {
        let mut buf = vec![0u8; req];
        let out = vec![0u8; resp];
        while b.read_exact(&mut buf).is_ok() {
            if b.write_all(&out).is_err() {
                break;
            }
        }
    });
    let (out, mut back) = (vec![1u8; req], vec![0u8; resp]);
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let (mut n, start) = (0u64, Instant::now());
    while Instant::now() < deadline {
        a.write_all(&out).unwrap();
        a.read_exact(&mut back).unwrap();
        n += 1;
    }
    let us = start.elapsed().as_secs_f64() * 1e6 / n as f64;
    drop(a);
    let _ = echo.join();
    us
}

fn qd1(nebd: &Nebd, fd: u32, size: u64, secs: f64, write: bool) -> f64 {
    let mut buf = vec![7u8; BS];
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let (mut n, start) = (0u64, Instant::now());
    let mut off = 0u64;
    while Instant::now() < deadline {
        off = (off + 7919 * BS as u64) % (size - BS as u64) / BS as u64 * BS as u64;
        if write {
            nebd.pwrite(fd, &buf, off, false).unwrap();
        } else {
            nebd.pread(fd, &mut buf, off).unwrap();
        }
        n += 1;
    }
    start.elapsed().as_secs_f64() * 1e6 / n as f64
}

fn qd32(nebd: &Nebd, fd: u32, size: u64, secs: f64, write: bool) -> f64 {
    let done = Arc::new(AtomicU64::new(0));
    let inflight = Arc::new((parking_lot::Mutex::new(0u32), parking_lot::Condvar::new()));
    let data = vec![9u8; BS];
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let start = Instant::now();
    let mut off = 0u64;
    while Instant::now() < deadline {
        {
            let mut g = inflight.0.lock();
            while *g >= 32 {
                inflight.1.wait(&mut g);
            }
            *g += 1;
        }
        off = (off + 7919 * BS as u64) % (size - BS as u64) / BS as u64 * BS as u64;
        let (done, inflight) = (done.clone(), inflight.clone());
        let complete = move || {
            done.fetch_add(1, Ordering::Relaxed);
            *inflight.0.lock() -= 1;
            inflight.1.notify_one();
        };
        if write {
            nebd.aio_write(fd, off, &data, false, move |r| {
                r.unwrap();
                complete()
            });
        } else {
            nebd.aio_read(fd, off, BS, move |r| {
                r.unwrap();
                complete()
            });
        }
    }
    let mut g = inflight.0.lock();
    while *g > 0 {
        inflight.1.wait(&mut g);
    }
    done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!("usage: nebd_bench SOCKET VOLUME [SECONDS]");
        std::process::exit(2);
    }
    let secs: f64 = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(5.0);
    let nebd = Nebd::new(Options::new(&args[1]));
    let info = nebd.open(&args[2]).expect("open");
    let (fd, size) = (info.fd, info.size);
    let f_read = floor(secs, 40, 24 + BS);
    let f_write = floor(secs, 40 + BS, 24);
    let r1 = qd1(&nebd, fd, size, secs, false);
    let w1 = qd1(&nebd, fd, size, secs, true);
    let r32 = qd32(&nebd, fd, size, secs, false);
    let w32 = qd32(&nebd, fd, size, secs, true);
    println!(
        "| workload | libnebd -> nebd-server -> {} | UDS round-trip floor | ratio |",
        args[2]
    );
    println!("|---|---|---|---|");
    println!(
        "| 4K read QD1 mean latency | {r1:.1} us | {f_read:.1} us | {:.2}x |",
        r1 / f_read
    );
    println!(
        "| 4K write QD1 mean latency | {w1:.1} us | {f_write:.1} us | {:.2}x |",
        w1 / f_write
    );
    println!(
        "| 4K read QD32 | {:.1}k IOPS | {:.1}k round trips/s at QD1 | |",
        r32 / 1e3,
        1e3 / f_read
    );
    println!(
        "| 4K write QD32 | {:.1}k IOPS | {:.1}k round trips/s at QD1 | |",
        w32 / 1e3,
        1e3 / f_write
    );
    nebd.close(fd).expect("close");
}
