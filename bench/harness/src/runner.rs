//! Runs jobs against a driver: each job a thread with its own queue, keeping `queue_depth`
//! operations in flight until the time or the I/O count is reached, then draining; a progress
//! line every second; the jobs' records merged into one summary.

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::engine::Driver;
use crate::stats::{Recorder, Summary, summarise};
use crate::workload::{Generator, Op, Workload, pattern};

/// What to run.
#[derive(Debug, Clone)]
pub struct Spec {
    /// Workload.
    pub workload: Workload,
    /// Operations in flight per job.
    pub queue_depth: usize,
    /// Bytes per operation.
    pub block_size: u32,
    /// Run this long...
    pub time: Option<Duration>,
    /// ...or this many I/Os per job.
    pub io_count: Option<u64>,
    /// Jobs (threads, each with its own connection).
    pub jobs: usize,
    /// Reads in percent for `rw`.
    pub rw_mix: u32,
    /// Zipf skew of random offsets.
    pub zipf: Option<f64>,
    /// Bytes of the target used (split between the jobs); the whole target when None.
    pub size: Option<u64>,
    /// Print a progress line on stderr every second.
    pub progress: bool,
}

enum Phase {
    Plain,
    VerifyWrite(u64),
    VerifyRead(u64),
}

struct Slot {
    op: Op,
    started: Instant,
    phase: Phase,
}

fn job(
    driver: &dyn Driver,
    spec: &Spec,
    index: usize,
    done: &AtomicU64,
    stop: &AtomicBool,
) -> Result<Recorder, String> {
    let mut engine = driver.open()?;
    let bs = spec.block_size;
    let total = spec.size.unwrap_or(engine.size()).min(engine.size());
    let region = (total / spec.jobs as u64) / u64::from(bs) * u64::from(bs);
    if region < u64::from(bs) {
        return Err(format!(
            "the target ({total} bytes) is too small for {} jobs of {bs} B blocks",
            spec.jobs
        ));
    }
    let mut generator = Generator::new(
        spec.workload,
        bs,
        region * index as u64,
        region,
        spec.rw_mix,
        spec.zipf,
        0x5eed ^ index as u64,
    );
    let blocks = region / u64::from(bs);
    let qd = spec.queue_depth.max(1);
    let mut slots: Vec<Option<Slot>> = (0..qd).map(|_| None).collect();
    let mut free: Vec<usize> = (0..qd).rev().collect();
    let mut buf = vec![0u8; bs as usize];
    let mut rec = Recorder::default();
    let mut issued = 0u64;
    let mut inflight = 0usize;
    let start = Instant::now();
    let deadline = spec.time.map(|t| start + t);
    let more = |issued: u64| {
        !stop.load(Ordering::Relaxed)
            && !INTERRUPTED.load(Ordering::Relaxed)
            && spec.io_count.is_none_or(|n| issued < n)
            && deadline.is_none_or(|d| Instant::now() < d)
    };
    loop {
        while inflight < qd && more(issued) {
            let tag = free.pop().expect("a free slot below the queue depth");
            let op = generator.next_op();
            let phase = if spec.workload == Workload::Verify {
                if let Op::Write { offset, .. } = op {
                    let generation = issued / blocks;
                    pattern(&mut buf, offset, generation);
                    Phase::VerifyWrite(generation)
                } else {
                    Phase::Plain
                }
            } else {
                Phase::Plain
            };
            // The clock starts before the submission: a driver that sends a large payload
            // synchronously spends part of the I/O's time in submit.
            let started = Instant::now();
            engine.submit(tag, op, &buf)?;
            slots[tag] = Some(Slot { op, started, phase });
            issued += 1;
            inflight += 1;
        }
        if inflight == 0 {
            break;
        }
        for c in engine.reap()? {
            let slot = slots[c.tag].take().ok_or("completion of an idle slot")?;
            let ns = slot.started.elapsed().as_nanos() as u64;
            rec.record(ns, slot.op.bytes(), c.result.is_ok());
            done.fetch_add(1, Ordering::Relaxed);
            match (slot.phase, &c.result, slot.op) {
                (Phase::VerifyWrite(generation), Ok(_), Op::Write { offset, len }) => {
                    // Read it back at once, in the same slot.
                    let op = Op::Read { offset, len };
                    let started = Instant::now();
                    engine.submit(c.tag, op, &[])?;
                    slots[c.tag] = Some(Slot {
                        op,
                        started,
                        phase: Phase::VerifyRead(generation),
                    });
                    continue;
                }
                (Phase::VerifyRead(generation), Ok(Some(data)), Op::Read { offset, .. }) => {
                    pattern(&mut buf, offset, generation);
                    if data[..] != buf[..] {
                        rec.mismatches += 1;
                    }
                }
                _ => {}
            }
            free.push(c.tag);
            inflight -= 1;
        }
    }
    Ok(rec)
}

/// Set by [`interrupt`]: every running job stops issuing and drains.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Ends the runs in progress early, as if their time were up: their jobs drain what is in
/// flight, the driver closes (a volume's session at the MDS), and the summary covers what ran.
/// Only stores to an atomic: safe in a signal handler (Ctrl-C).
pub fn interrupt() {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

/// Runs `spec` on `driver`; `head` names the run in the summary (driver, target).
pub fn run(driver: Arc<dyn Driver>, spec: &Spec, head: (&str, &str)) -> Result<Summary, String> {
    if spec.time.is_none() && spec.io_count.is_none() {
        return Err("give a time or an I/O count".into());
    }
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let handles: Vec<_> = (0..spec.jobs.max(1))
        .map(|i| {
            let (driver, spec, done, stop) =
                (driver.clone(), spec.clone(), done.clone(), stop.clone());
            std::thread::spawn(move || {
                let r = job(&*driver, &spec, i, &done, &stop);
                if r.is_err() {
                    stop.store(true, Ordering::Relaxed);
                }
                r
            })
        })
        .collect();
    if spec.progress {
        let mut last = 0;
        let mut tick = start;
        while handles.iter().any(|h| !h.is_finished()) {
            std::thread::sleep(Duration::from_millis(100));
            if tick.elapsed() >= Duration::from_secs(1) {
                let now = done.load(Ordering::Relaxed);
                let rate = (now - last) as f64 / tick.elapsed().as_secs_f64();
                eprint!(
                    "\r[{:>4.0} s] {:>10.0} IOPS  {:>10} I/Os",
                    start.elapsed().as_secs_f64(),
                    rate,
                    now
                );
                let _ = std::io::stderr().flush();
                last = now;
                tick = Instant::now();
            }
        }
        eprintln!();
    }
    let mut all = Recorder::default();
    let mut first_err = None;
    for h in handles {
        match h.join().map_err(|_| "a job panicked".to_string())? {
            Ok(r) => all.merge(r),
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    if let Some(e) = first_err {
        driver.close();
        return Err(e);
    }
    let secs = start.elapsed().as_secs_f64();
    let name = spec.workload.name().to_string();
    let mut summary = summarise(
        all,
        secs,
        (
            head.0.to_string(),
            head.1.to_string(),
            name,
            spec.queue_depth,
            spec.block_size,
            spec.jobs,
        ),
    );
    summary.reconnects = driver.reconnects();
    driver.close();
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{Completion, Engine};

    /// A RAM target that completes requests in reverse order of submission (and can corrupt).
    struct Ram {
        data: Arc<std::sync::Mutex<Vec<u8>>>,
        pending: Vec<Completion>,
        corrupt: bool,
    }

    impl Engine for Ram {
        fn size(&self) -> u64 {
            self.data.lock().unwrap().len() as u64
        }
        fn submit(&mut self, tag: usize, op: Op, data: &[u8]) -> Result<(), String> {
            let mut d = self.data.lock().unwrap();
            let result = match op {
                Op::Read { offset, len } => {
                    let mut v = d[offset as usize..(offset + u64::from(len)) as usize].to_vec();
                    if self.corrupt {
                        v[0] ^= 1;
                    }
                    Some(v)
                }
                Op::Write { offset, len } => {
                    d[offset as usize..(offset + u64::from(len)) as usize].copy_from_slice(data);
                    None
                }
                _ => None,
            };
            self.pending.push(Completion {
                tag,
                result: Ok(result),
            });
            Ok(())
        }
        fn reap(&mut self) -> Result<Vec<Completion>, String> {
            let mut out: Vec<Completion> = self.pending.drain(..).collect();
            out.reverse();
            Ok(out)
        }
    }

    struct RamDriver(Arc<std::sync::Mutex<Vec<u8>>>, bool);

    impl Driver for RamDriver {
        fn open(&self) -> Result<Box<dyn Engine>, String> {
            Ok(Box::new(Ram {
                data: self.0.clone(),
                pending: Vec::new(),
                corrupt: self.1,
            }))
        }
    }

    fn spec(w: Workload) -> Spec {
        Spec {
            workload: w,
            queue_depth: 8,
            block_size: 4096,
            time: None,
            io_count: Some(500),
            jobs: 2,
            rw_mix: 50,
            zipf: None,
            size: None,
            progress: false,
        }
    }

    #[test]
    fn verify_passes_and_catches_corruption() {
        let mem = Arc::new(std::sync::Mutex::new(vec![0u8; 1 << 20]));
        let s = run(
            Arc::new(RamDriver(mem.clone(), false)),
            &spec(Workload::Verify),
            ("ram", "t"),
        )
        .unwrap();
        assert_eq!(s.ios, 2 * 500 * 2, "each write is read back");
        assert_eq!((s.errors, s.mismatches), (0, 0));
        let s = run(
            Arc::new(RamDriver(mem, true)),
            &spec(Workload::Verify),
            ("ram", "t"),
        )
        .unwrap();
        assert_eq!(s.mismatches, 1000);
    }

    #[test]
    fn counts_and_bytes() {
        let mem = Arc::new(std::sync::Mutex::new(vec![0u8; 1 << 20]));
        let s = run(
            Arc::new(RamDriver(mem, false)),
            &spec(Workload::RandRead),
            ("ram", "t"),
        )
        .unwrap();
        assert_eq!(s.ios, 1000);
        assert!(s.bandwidth_bytes > 0.0 && s.lat_p99_us >= s.lat_p50_us);
        let mut sp = spec(Workload::Read);
        sp.io_count = None;
        assert!(
            run(
                Arc::new(RamDriver(Arc::default(), false)),
                &sp,
                ("ram", "t")
            )
            .is_err()
        );
    }
}
