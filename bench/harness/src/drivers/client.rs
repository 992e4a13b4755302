//! The client driver: the client library directly against a cluster volume (no part2), its
//! requests run on the client runtime and their completions handed over through a channel.

use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};

use curve_client::{CurveDevice, Volume, VolumeOptions};

use crate::engine::{Completion, Driver, Engine};
use crate::workload::Op;

/// Opens a cluster volume.
#[derive(Debug, Clone)]
pub struct ClientDriver {
    /// Volume path.
    pub path: String,
    /// MDS addresses.
    pub mds: Vec<String>,
    /// Owner.
    pub owner: String,
    /// The user's key (clusters with authentication on).
    pub key: Option<Arc<curve_auth::UserKey>>,
    /// The volume, opened once and shared by the jobs (one session).
    device: Arc<Mutex<Option<Arc<CurveDevice>>>>,
}

impl ClientDriver {
    /// From `curve:/PATH[?mds=A,B&owner=O]` (or a bare `/PATH`), with default MDS and owner.
    pub fn parse(target: &str, mds: &[String], owner: &str) -> Result<Self, String> {
        let rest = target.strip_prefix("curve:").unwrap_or(target);
        let (path, q) = rest.split_once('?').unwrap_or((rest, ""));
        if !path.starts_with('/') {
            return Err(format!("{target}: expected curve:/PATH"));
        }
        let mut d = ClientDriver {
            path: path.into(),
            mds: mds.to_vec(),
            owner: owner.into(),
            key: None,
            device: Arc::default(),
        };
        for kv in q.split('&').filter(|s| !s.is_empty()) {
            match kv.split_once('=') {
                Some(("mds", v)) => d.mds = v.split(',').map(String::from).collect(),
                Some(("owner", v)) => d.owner = v.into(),
                _ => return Err(format!("{target}: unknown option {kv:?}")),
            }
        }
        Ok(d)
    }
}

struct ClientEngine {
    // Keeps the session; the last one dropped closes the volume.
    _device: Arc<CurveDevice>,
    volume: Volume,
    tx: Sender<Completion>,
    rx: Receiver<Completion>,
}

impl Driver for ClientDriver {
    /// Closes the volume's session at the MDS (else the next open of the volume, by another
    /// run, waits out the lease: OCCUPIED).
    fn close(&self) {
        let Some(device) = self.device.lock().ok().and_then(|mut d| d.take()) else {
            return;
        };
        let v = device.volume().clone();
        let (tx, rx) = channel();
        curve_client::device::runtime().spawn(async move {
            let _ = tx.send(v.close().await);
        });
        match rx.recv_timeout(std::time::Duration::from_secs(10)) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("closing {}: {e}", self.path),
            Err(_) => eprintln!("closing {}: no answer from the MDS in 10 s", self.path),
        }
    }

    fn open(&self) -> Result<Box<dyn Engine>, String> {
        let device = {
            let mut d = self.device.lock().map_err(|e| e.to_string())?;
            match d.as_ref() {
                Some(dev) => dev.clone(),
                None => {
                    let mut opts = VolumeOptions::new(self.mds.clone(), &self.owner);
                    opts.client_id = format!("curve-bench-{}", std::process::id());
                    opts.key = self.key.clone();
                    let dev = Arc::new(
                        CurveDevice::open(&self.path, opts, false).map_err(|e| e.to_string())?,
                    );
                    *d = Some(dev.clone());
                    dev
                }
            }
        };
        let volume = device.volume().clone();
        let (tx, rx) = channel();
        Ok(Box::new(ClientEngine {
            _device: device,
            volume,
            tx,
            rx,
        }))
    }
}

impl Engine for ClientEngine {
    fn size(&self) -> u64 {
        self.volume.size()
    }

    fn submit(&mut self, tag: usize, op: Op, data: &[u8]) -> Result<(), String> {
        let v = self.volume.clone();
        let tx = self.tx.clone();
        let data = data.to_vec();
        curve_client::device::runtime().spawn(async move {
            let result = match op {
                Op::Read { offset, len } => {
                    let mut b = vec![0u8; len as usize];
                    v.read(offset, &mut b).await.map(|_| Some(b))
                }
                Op::Write { offset, .. } => v.write(offset, &data).await.map(|_| None),
                Op::WriteZeroes { offset, len } => {
                    v.write_zeroes(offset, u64::from(len)).await.map(|_| None)
                }
                Op::Trim { offset, len } => v.discard(offset, u64::from(len)).await.map(|_| None),
                // Acknowledged writes are durable.
                Op::Flush => Ok(None),
            };
            let _ = tx.send(Completion {
                tag,
                result: result.map_err(|e| e.to_string()),
            });
        });
        Ok(())
    }

    fn reap(&mut self) -> Result<Vec<Completion>, String> {
        let first = self.rx.recv().map_err(|e| e.to_string())?;
        let mut out = vec![first];
        out.extend(self.rx.try_iter());
        Ok(out)
    }
}
