//! `curve-guest-io`: the I/O tool the QEMU guest tests run inside the guest (see
//! `tests/src/guest.rs`). Std and libc only, so that it runs from the test initramfs with just
//! the libraries `ldd` names.
//!
//! ```text
//! curve-guest-io write  DEV --offset O --size S --bs B --seed N   O_DIRECT pattern write
//! curve-guest-io verify DEV --offset O --size S --bs B --seed N   O_DIRECT read-back check
//! curve-guest-io writers DEV --jobs J --size S --bs B --time T [--max-passes P]
//!     J threads, each rewriting its own S-byte region with O_DIRECT in passes (a new pattern per
//!     pass) until T seconds have passed, then verifying the last pass of every region
//! ```
//!
//! Every command prints `CURVE-RESULT key=value ...` lines on stdout (the serial console) with
//! error and mismatch counts and throughput, and exits non-zero on any error or mismatch.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

const ALIGN: usize = 4096;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let code = match run(&args) {
        Ok(true) => 0,
        Ok(false) => 1,
        Err(e) => {
            eprintln!("curve-guest-io: {e}");
            2
        }
    };
    std::process::exit(code);
}

fn run(args: &[String]) -> Result<bool, String> {
    let (cmd, rest) = args.split_first().ok_or(USAGE)?;
    let (dev, rest) = rest.split_first().ok_or(USAGE)?;
    let o = Opts::parse(rest)?;
    match cmd.as_str() {
        "write" => {
            let f = open(dev)?;
            let t = Instant::now();
            let (errors, _) = write_region(&f, o.offset, o.size, o.bs, o.seed);
            report("write", o.size, o.bs, t.elapsed(), errors, 0);
            Ok(errors == 0)
        }
        "verify" => {
            let f = open(dev)?;
            let t = Instant::now();
            let (errors, bad) = verify_region(&f, o.offset, o.size, o.bs, o.seed);
            report("verify", o.size, o.bs, t.elapsed(), errors, bad);
            Ok(errors == 0 && bad == 0)
        }
        "writers" => writers(dev, &o),
        _ => Err(USAGE.into()),
    }
}

const USAGE: &str = "usage: curve-guest-io write|verify|writers DEV [--offset O] [--size S] \
                     [--bs B] [--seed N] [--jobs J] [--time SECONDS] [--max-passes P]";

struct Opts {
    offset: u64,
    size: u64,
    bs: usize,
    seed: u64,
    jobs: u64,
    time: Duration,
    max_passes: u64,
}

impl Opts {
    fn parse(args: &[String]) -> Result<Opts, String> {
        let mut o = Opts {
            offset: 0,
            size: 16 << 20,
            bs: 65536,
            seed: 1,
            jobs: 4,
            time: Duration::from_secs(5),
            max_passes: 1000,
        };
        let mut it = args.iter();
        while let Some(flag) = it.next() {
            let v = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
            let n = parse_size(v).ok_or_else(|| format!("{flag}: bad number {v:?}"))?;
            match flag.as_str() {
                "--offset" => o.offset = n,
                "--size" => o.size = n,
                "--bs" => o.bs = n as usize,
                "--seed" => o.seed = n,
                "--jobs" => o.jobs = n,
                "--time" => o.time = Duration::from_secs(n),
                "--max-passes" => o.max_passes = n,
                _ => return Err(format!("unknown option {flag}")),
            }
        }
        if o.bs == 0
            || !o.bs.is_multiple_of(ALIGN)
            || !o.size.is_multiple_of(o.bs as u64)
            || !o.offset.is_multiple_of(ALIGN as u64)
        {
            return Err("--bs must be a multiple of 4096 dividing --size; --offset aligned".into());
        }
        if o.jobs == 0 || o.max_passes == 0 {
            return Err("--jobs and --max-passes must be positive".into());
        }
        Ok(o)
    }
}

fn parse_size(s: &str) -> Option<u64> {
    let (num, mult) = match s.as_bytes().last()? {
        b'K' | b'k' => (&s[..s.len() - 1], 1 << 10),
        b'M' | b'm' => (&s[..s.len() - 1], 1 << 20),
        b'G' | b'g' => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>().ok()?.checked_mul(mult)
}

fn open(dev: &str) -> Result<File, String> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(dev)
        .map_err(|e| format!("open {dev}: {e}"))
}

/// A heap buffer aligned for O_DIRECT.
struct Aligned {
    ptr: *mut u8,
    len: usize,
}

impl Aligned {
    fn new(len: usize) -> Aligned {
        let layout = std::alloc::Layout::from_size_align(len, ALIGN).expect("layout");
        // SAFETY: len is a positive multiple of ALIGN (checked by Opts::parse).
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null(), "out of memory");
        Aligned { ptr, len }
    }

    fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: ptr owns len initialised bytes for the buffer's lifetime.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        let layout = std::alloc::Layout::from_size_align(self.len, ALIGN).expect("layout");
        // SAFETY: allocated in Aligned::new with this layout.
        unsafe { std::alloc::dealloc(self.ptr, layout) };
    }
}

/// Fills `buf` (holding the device bytes at `offset`) with the pattern of `seed`: every 8-byte
/// word is a hash of the seed and its device offset, so misplaced or stale blocks are caught.
fn pattern(buf: &mut [u8], offset: u64, seed: u64) {
    for (i, w) in buf.chunks_exact_mut(8).enumerate() {
        let mut x = (offset + i as u64 * 8) ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        x ^= x >> 33;
        x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
        x ^= x >> 33;
        w.copy_from_slice(&x.to_le_bytes());
    }
}

/// Writes the region; returns the errors and the longest single write.
fn write_region(f: &File, offset: u64, size: u64, bs: usize, seed: u64) -> (u64, Duration) {
    let mut buf = Aligned::new(bs);
    let mut errors = 0;
    let mut longest = Duration::ZERO;
    for off in (offset..offset + size).step_by(bs) {
        pattern(buf.as_mut(), off, seed);
        let t = Instant::now();
        if let Err(e) = f.write_all_at(buf.as_mut(), off) {
            println!("CURVE-IO-ERROR write offset={off} {e}");
            errors += 1;
        }
        longest = longest.max(t.elapsed());
    }
    (errors, longest)
}

fn verify_region(f: &File, offset: u64, size: u64, bs: usize, seed: u64) -> (u64, u64) {
    let mut buf = Aligned::new(bs);
    let mut want = vec![0u8; bs];
    let (mut errors, mut bad) = (0, 0);
    for off in (offset..offset + size).step_by(bs) {
        if let Err(e) = f.read_exact_at(buf.as_mut(), off) {
            println!("CURVE-IO-ERROR read offset={off} {e}");
            errors += 1;
            continue;
        }
        pattern(&mut want, off, seed);
        if buf.as_mut() != &want[..] {
            if bad < 8 {
                println!("CURVE-MISMATCH offset={off} seed={seed}");
            }
            bad += 1;
        }
    }
    (errors, bad)
}

fn report(what: &str, bytes: u64, bs: usize, took: Duration, errors: u64, bad: u64) {
    let secs = took.as_secs_f64().max(1e-6);
    println!(
        "CURVE-RESULT op={what} bytes={bytes} bs={bs} secs={secs:.2} mib_s={:.1} iops={:.0} \
         errors={errors} mismatches={bad}",
        bytes as f64 / secs / (1 << 20) as f64,
        bytes as f64 / bs as f64 / secs
    );
}

/// `jobs` writers on disjoint regions, each rewriting its region pass after pass until the
/// time is up; then every region is read back against its last pass.
fn writers(dev: &str, o: &Opts) -> Result<bool, String> {
    let files: Vec<File> = (0..o.jobs).map(|_| open(dev)).collect::<Result<_, _>>()?;
    let started = AtomicBool::new(false);
    let written = AtomicU64::new(0);
    let longest_us = AtomicU64::new(0);
    let t = Instant::now();
    let results: Vec<(u64, u64)> = std::thread::scope(|s| {
        let handles: Vec<_> = files
            .iter()
            .enumerate()
            .map(|(j, f)| {
                let (started, written, longest_us) = (&started, &written, &longest_us);
                s.spawn(move || {
                    let base = o.offset + j as u64 * o.size;
                    let mut errors = 0;
                    let mut pass = 0;
                    while pass < o.max_passes && (pass == 0 || t.elapsed() < o.time) {
                        if !started.swap(true, Ordering::SeqCst) {
                            println!("CURVE-WRITERS-STARTED jobs={}", o.jobs);
                        }
                        let (e, longest) = write_region(f, base, o.size, o.bs, seed_of(j, pass));
                        errors += e;
                        longest_us.fetch_max(longest.as_micros() as u64, Ordering::Relaxed);
                        written.fetch_add(o.size, Ordering::Relaxed);
                        pass += 1;
                    }
                    (errors, pass)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("writer"))
            .collect()
    });
    let took = t.elapsed();
    let write_errors: u64 = results.iter().map(|r| r.0).sum();
    report(
        "writers",
        written.load(Ordering::Relaxed),
        o.bs,
        took,
        write_errors,
        0,
    );
    println!(
        "CURVE-RESULT op=writers-latency max_us={}",
        longest_us.load(Ordering::Relaxed)
    );
    let (mut errors, mut bad) = (0, 0);
    for (j, (f, (_, passes))) in files.iter().zip(&results).enumerate() {
        let base = o.offset + j as u64 * o.size;
        let (e, b) = verify_region(f, base, o.size, o.bs, seed_of(j, passes - 1));
        errors += e;
        bad += b;
    }
    let passes: Vec<String> = results.iter().map(|r| r.1.to_string()).collect();
    println!(
        "CURVE-RESULT op=writers-verify passes={} errors={errors} mismatches={bad}",
        passes.join(",")
    );
    Ok(write_errors == 0 && errors == 0 && bad == 0)
}

fn seed_of(job: usize, pass: u64) -> u64 {
    (job as u64 + 1) * 1_000_003 + pass
}
