//! The nebd driver: through part1 (libnebd) to part2, with its asynchronous calls; the
//! completions come back on libnebd's reader thread and are handed over through a channel.

use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender, channel};

use nebd::{Nebd, Options};

use crate::engine::{Completion, Driver, Engine};
use crate::workload::Op;

/// Opens `volume` through the part1 socket `socket`.
#[derive(Debug, Clone)]
pub struct NebdDriver {
    /// part2's part1 socket (`RUN_DIR/nebd.sock`).
    pub socket: String,
    /// The volume, as part2 names it (`curve:/vol0`, `mem:1G`, ...).
    pub volume: String,
}

struct NebdEngine {
    nebd: Arc<Nebd>,
    fd: u32,
    size: u64,
    tx: Sender<Completion>,
    rx: Receiver<Completion>,
}

impl Driver for NebdDriver {
    fn open(&self) -> Result<Box<dyn Engine>, String> {
        let nebd = Arc::new(Nebd::new(Options::new(&self.socket)));
        let info = nebd
            .open(&self.volume)
            .map_err(|e| format!("{}: {e}", self.volume))?;
        let (tx, rx) = channel();
        Ok(Box::new(NebdEngine {
            nebd,
            fd: info.fd,
            size: info.size,
            tx,
            rx,
        }))
    }
}

impl Drop for NebdEngine {
    fn drop(&mut self) {
        let _ = self.nebd.close(self.fd);
    }
}

impl Engine for NebdEngine {
    fn size(&self) -> u64 {
        self.size
    }

    fn submit(&mut self, tag: usize, op: Op, data: &[u8]) -> Result<(), String> {
        let tx = self.tx.clone();
        let done = move |r: Result<Option<Vec<u8>>, String>| {
            let _ = tx.send(Completion { tag, result: r });
        };
        match op {
            Op::Read { offset, len } => {
                self.nebd.aio_read(self.fd, offset, len as usize, move |r| {
                    done(r.map(Some).map_err(|e| e.to_string()))
                })
            }
            Op::Write { offset, .. } => {
                self.nebd.aio_write(self.fd, offset, data, false, move |r| {
                    done(r.map(|_| None).map_err(|e| e.to_string()))
                })
            }
            Op::Flush => self.nebd.aio_flush(self.fd, move |r| {
                done(r.map(|_| None).map_err(|e| e.to_string()))
            }),
            Op::Trim { offset, len } => {
                self.nebd
                    .aio_discard(self.fd, offset, u64::from(len), move |r| {
                        done(r.map(|_| None).map_err(|e| e.to_string()))
                    })
            }
            Op::WriteZeroes { .. } => return Err("nebd has no write-zeroes".into()),
        }
        Ok(())
    }

    fn reap(&mut self) -> Result<Vec<Completion>, String> {
        let first = self.rx.recv().map_err(|e| e.to_string())?;
        let mut out = vec![first];
        out.extend(self.rx.try_iter());
        Ok(out)
    }
}
