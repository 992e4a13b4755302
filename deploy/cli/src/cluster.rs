//! `curve cluster status` and `curve volume ...`: the cluster through its MDS.

use std::time::Duration;

use curve_client::{MdsClient, MdsError};
use curve_proto::mds::{FileInfo, FileStatus, FileType, OnlineState, Qos, SnapshotInfo};
use serde_json::{Value, json};

/// The cluster in numbers: MDS leader, chunkservers, copysets healthy or degraded.
pub async fn summary(c: &MdsClient) -> Result<Value, MdsError> {
    let t = c.topology().await?;
    let online = t
        .chunkservers
        .iter()
        .filter(|c| c.state == OnlineState::Online as i32)
        .count();
    let online_ids: Vec<u32> = t
        .chunkservers
        .iter()
        .filter(|c| c.state == OnlineState::Online as i32)
        .map(|c| c.id)
        .collect();
    let healthy = t
        .copysets
        .iter()
        .filter(|cs| {
            cs.leader.is_some()
                && cs.peers.len() >= 3
                && cs
                    .peers
                    .iter()
                    .all(|p| online_ids.contains(&p.chunkserver_id))
        })
        .count();
    Ok(json!({
        "mds_leader": c.current().await,
        "chunkservers": t.chunkservers.iter().map(|c| json!({
            "id": c.id,
            "address": c.address,
            "zone": c.zone,
            "server": c.server,
            "state": OnlineState::try_from(c.state).map(|s| s.as_str_name().to_lowercase()).unwrap_or_default(),
            "copysets": c.copysets,
            "leaders": c.leaders,
            "disk_capacity": c.disk_capacity,
            "disk_used": c.disk_used,
            "disk_full": c.disk_full,
        })).collect::<Vec<_>>(),
        "disks_full": t.chunkservers.iter().filter(|c| c.disk_full).map(|c| c.id).collect::<Vec<_>>(),
        "chunkservers_online": online,
        "copysets": t.copysets.len(),
        "copysets_healthy": healthy,
        "copysets_degraded": t.copysets.len() - healthy,
        "operators": t.operators,
    }))
}

/// Prints a summary for people.
pub fn print_summary(s: &Value) {
    println!("mds leader: {}", s["mds_leader"].as_str().unwrap_or("?"));
    let css = s["chunkservers"].as_array().cloned().unwrap_or_default();
    println!(
        "chunkservers: {} online of {}",
        s["chunkservers_online"],
        css.len()
    );
    for c in css {
        let gib = |v: &Value| v.as_u64().unwrap_or(0) as f64 / f64::from(1 << 30);
        println!(
            "  {:>3}  {:<21} {:<8} {:<8} {:<8} copysets {:>3}  leaders {:>3}  disk {:.1}/{:.1} GiB{}",
            c["id"],
            c["address"].as_str().unwrap_or(""),
            c["zone"].as_str().unwrap_or(""),
            c["server"].as_str().unwrap_or(""),
            c["state"].as_str().unwrap_or(""),
            c["copysets"],
            c["leaders"],
            gib(&c["disk_used"]),
            gib(&c["disk_capacity"]),
            if c["disk_full"].as_bool() == Some(true) {
                "  DISK FULL (below its reserve: no writes, no leaderships)"
            } else {
                ""
            }
        );
    }
    println!(
        "copysets: {} healthy, {} degraded, {} changes in flight",
        s["copysets_healthy"], s["copysets_degraded"], s["operators"]
    );
}

fn file_json(f: &FileInfo) -> Value {
    let q = f.qos.unwrap_or_default();
    json!({
        "id": f.id,
        "path": f.path,
        "name": f.name,
        "type": if f.r#type == FileType::Directory as i32 { "directory" } else { "volume" },
        "size": f.length,
        "block_size": f.block_size,
        "chunk_size": f.chunk_size,
        "segment_size": f.segment_size,
        "stripe_unit": f.stripe_unit,
        "stripe_count": f.stripe_count,
        "owner": f.owner,
        "ctime_ms": f.ctime_ms,
        "deleted": f.status == FileStatus::Deleted as i32,
        "epoch": f.epoch,
        "qos": {
            "iops_total": q.iops_total, "iops_read": q.iops_read, "iops_write": q.iops_write,
            "bps_total": q.bps_total, "bps_read": q.bps_read, "bps_write": q.bps_write,
            "burst_ms": q.burst_ms,
        },
        "snapshots": f.snapshots.iter().map(snapshot_json).collect::<Vec<_>>(),
        "clone_source": f.clone_source.as_ref().map(|c| c.path.clone()),
    })
}

fn snapshot_json(s: &SnapshotInfo) -> Value {
    json!({
        "name": s.name,
        "seq": s.seq,
        "ctime_ms": s.ctime_ms,
        "ready": s.ready,
        "clones": s.clones,
    })
}

fn print_snapshot(path: &str, s: &SnapshotInfo) {
    let state = if s.ready { "" } else { "  (being taken)" };
    let clones = if s.clones.is_empty() {
        String::new()
    } else {
        format!("  clones: {}", s.clones.join(", "))
    };
    println!("snap {path}@{:<24} seq {:<6}{state}{clones}", s.name, s.seq);
}

/// `volume info` of a volume: its record, and the space it and each snapshot hold.
fn print_info(f: &FileInfo, space: &curve_proto::mds::SpaceResponse, json_out: bool) {
    let held = |s: &SnapshotInfo| {
        space
            .snapshots
            .iter()
            .find(|x| x.seq == s.seq)
            .map_or(0, |x| x.bytes)
    };
    if json_out {
        let mut v = file_json(f);
        v["bytes_used"] = json!(space.volume_bytes);
        for (j, s) in v["snapshots"]
            .as_array_mut()
            .expect("an array")
            .iter_mut()
            .zip(&f.snapshots)
        {
            j["bytes"] = json!(held(s));
        }
        println!("{}", serde_json::to_string_pretty(&vec![v]).expect("json"));
        return;
    }
    println!(
        "vol  {:<40} {:>12}  bs {:<4}  owner {:<8} epoch {}  uses {} MiB",
        f.path,
        f.length,
        f.block_size,
        f.owner,
        f.epoch,
        space.volume_bytes >> 20
    );
    if f.stripe_count > 1 {
        println!(
            "      striped: units of {} KiB round {} chunks",
            f.stripe_unit >> 10,
            f.stripe_count
        );
    }
    if let Some(c) = &f.clone_source {
        println!("      clone of {}", c.path);
    }
    for s in &f.snapshots {
        print!("      ");
        print_snapshot(&f.path, s);
        println!("        holds {} MiB", held(s) >> 20);
    }
}

/// What `curve snapshot` does.
#[derive(Debug)]
pub enum SnapshotOp {
    /// Take snapshot NAME of PATH.
    Create(String, String),
    /// List the snapshots of PATH.
    List(String),
    /// Delete PATH@NAME.
    Delete(String),
}

/// Runs a `curve snapshot` command; prints JSON or text.
pub async fn snapshot(
    c: &MdsClient,
    owner: &str,
    op: SnapshotOp,
    json_out: bool,
) -> Result<(), MdsError> {
    let (path, snaps) = match op {
        SnapshotOp::Create(path, name) => {
            let s = c.create_snapshot(&path, &name, owner).await?;
            (path, vec![s])
        }
        SnapshotOp::List(path) => {
            let s = c.list_snapshots(&path).await?;
            (path, s)
        }
        SnapshotOp::Delete(path) => {
            c.delete_snapshot(&path, owner).await?;
            if json_out {
                println!("{}", json!({ "deleted": path }));
            } else {
                println!("deleted {path}");
            }
            return Ok(());
        }
    };
    if json_out {
        let v: Vec<Value> = snaps.iter().map(snapshot_json).collect();
        println!("{}", serde_json::to_string_pretty(&v).expect("json"));
    } else {
        for s in &snaps {
            print_snapshot(&path, s);
        }
    }
    Ok(())
}

/// A volume command.
#[derive(Debug)]
pub enum VolumeOp {
    /// Create a volume.
    Create {
        /// Path.
        path: String,
        /// Bytes.
        size: u64,
        /// 512 or 4096.
        block_size: u32,
        /// Striping: (stripe unit, stripe count); (0, 0): none.
        stripe: (u64, u32),
    },
    /// Create a directory.
    Mkdir(String),
    /// List a directory.
    List(String),
    /// Stat.
    Info(String),
    /// Grow.
    Extend(String, u64),
    /// Rename.
    Rename(String, String),
    /// Delete (to the recycle bin, or purge).
    Delete(String, bool),
    /// Recover from the recycle bin.
    Recover(String),
    /// Set QoS.
    Qos(String, Qos),
    /// Clone a snapshot (PATH@NAME) into a new volume.
    Clone(String, String),
}

/// Runs a volume command; prints JSON or text.
pub async fn volume(
    c: &MdsClient,
    owner: &str,
    op: VolumeOp,
    json_out: bool,
) -> Result<(), MdsError> {
    let files: Vec<FileInfo> = match op {
        VolumeOp::Create {
            path,
            size,
            block_size,
            stripe,
        } => vec![
            c.create_striped(&path, size, block_size, stripe, owner)
                .await?,
        ],
        VolumeOp::Mkdir(path) => vec![c.create(&path, FileType::Directory, 0, 0, owner).await?],
        VolumeOp::List(path) => c.list(&path).await?,
        VolumeOp::Info(path) => {
            let f = c.stat(&path).await?;
            if f.r#type == FileType::Volume as i32 && !path.contains('@') {
                let space = c.space(&path).await?;
                print_info(&f, &space, json_out);
                return Ok(());
            }
            vec![f]
        }
        VolumeOp::Extend(path, size) => vec![c.extend(&path, size, owner).await?],
        VolumeOp::Rename(from, to) => vec![c.rename(&from, &to, owner).await?],
        VolumeOp::Delete(path, force) => vec![c.delete(&path, owner, force).await?],
        VolumeOp::Recover(path) => vec![c.recover(&path, owner).await?],
        VolumeOp::Qos(path, qos) => vec![c.set_qos(&path, owner, qos).await?],
        VolumeOp::Clone(source, path) => vec![c.clone_volume(&source, &path, owner).await?],
    };
    if json_out {
        let v: Vec<Value> = files.iter().map(file_json).collect();
        println!("{}", serde_json::to_string_pretty(&v).expect("json"));
    } else {
        for f in &files {
            let kind = if f.r#type == FileType::Directory as i32 {
                "dir"
            } else {
                "vol"
            };
            let deleted = if f.status == FileStatus::Deleted as i32 {
                " (deleted)"
            } else {
                ""
            };
            println!(
                "{kind}  {:<40} {:>12}  bs {:<4}  owner {:<8} epoch {}{deleted}",
                f.path, f.length, f.block_size, f.owner, f.epoch
            );
            if let Some(c) = &f.clone_source {
                println!("      clone of {}", c.path);
            }
            for s in &f.snapshots {
                print!("      ");
                print_snapshot(&f.path, s);
            }
        }
    }
    Ok(())
}

/// A client of `mds` signing with `key`, that gives up after `secs` (the CLI should not
/// hang).
pub fn client(
    mds: &[String],
    secs: u64,
    key: Option<std::sync::Arc<curve_auth::UserKey>>,
) -> MdsClient {
    let mut c = MdsClient::with_key(mds.to_vec(), key);
    c.deadline = Duration::from_secs(secs);
    c
}

/// What `curve user` does.
#[derive(Debug)]
pub enum UserOp {
    /// Create a user, writing its key file here.
    Create(String, std::path::PathBuf),
    /// List (JSON or not).
    List(bool),
    /// Delete.
    Delete(String),
}

/// Runs a `curve user` command.
pub async fn user(c: &MdsClient, op: UserOp) -> Result<(), String> {
    match op {
        UserOp::Create(name, out) => {
            if !curve_auth::valid_user_name(&name) {
                return Err(format!("bad user name {name:?} (1-64 of A-Z a-z 0-9 _ -)"));
            }
            if out.exists() {
                return Err(format!("{} exists: not replaced", out.display()));
            }
            let key = curve_auth::UserKey::generate(&name);
            c.create_user(&name, key.public())
                .await
                .map_err(|e| e.to_string())?;
            key.save_new(&out).map_err(|e| {
                format!(
                    "{}: {e} (the user was created: delete it and retry)",
                    out.display()
                )
            })?;
            println!("user {name} created; key in {} (mode 0600)", out.display());
        }
        UserOp::List(json) => {
            let users = c.list_users().await.map_err(|e| e.to_string())?;
            if json {
                let v: Vec<Value> = users
                    .iter()
                    .map(|u| json!({"name": u.name, "admin": u.admin, "public_key": u.public_key_hex}))
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v).expect("json"));
            } else {
                for u in users {
                    let admin = if u.admin { "  admin" } else { "" };
                    println!("{:<24} {}{admin}", u.name, u.public_key_hex);
                }
            }
        }
        UserOp::Delete(name) => {
            c.delete_user(&name).await.map_err(|e| e.to_string())?;
            println!("user {name} deleted");
        }
    }
    Ok(())
}
