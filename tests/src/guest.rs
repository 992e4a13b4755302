//! The QEMU guest harness: real kernel block clients (virtio-blk over vhost-user, ublk, nbd)
//! in a Linux guest under TCG, the host kernel having neither KVM nor those drivers.
//!
//! A ublk disk is served from inside the guest (the host kernel has no `ublk_drv`): the
//! initramfs then carries `nebd-server` and `curve`, and the scenario starts part2 and adds the
//! export (`part2_start`, `ublk_add` in `tests/guest/scenarios/lib.sh`).
//!
//! ```text
//!  test ──builds──▶ initramfs (newc cpio, uncompressed)
//!                     /init                 tests/guest/init
//!                     /scenarios/*.sh       tests/guest/scenarios
//!                     /bin/busybox + links  busybox-static
//!                     /bin/curve-guest-io   tests/src/bin/curve-guest-io.rs + its ldd libraries
//!                     /modules/NN-*.ko      virtio_blk, nbd, ublk_drv, e1000, ext4 (+ deps)
//!       ──boots──▶  qemu-system-x86_64 -accel tcg -kernel /boot/vmlinuz-6.12…
//!                     -append 'console=ttyS0 curve.scenario=NAME curve.KEY=VALUE …'
//!                     -chardev socket,path=SOCK,reconnect=1 -device vhost-user-blk-pci …
//!       ◀──reads── serial console file: CURVE-BEGIN … CURVE-RESULT k=v … CURVE-END rc=N
//! ```
//!
//! The guest RAM is a shared memfd (vhost-user maps it). The chardev reconnects every second, so
//! a part2 killed and restarted under the guest looks like a pause to it. QEMU is stopped by its
//! PID when the [`Guest`] is dropped, whatever happened.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::{Daemon, bin, require_tool, run_ok, wait_until};

/// A block device the guest gets.
#[derive(Debug, Clone)]
pub enum Disk {
    /// `-device vhost-user-blk-pci` on a vhost-user socket, with `queues` virtqueues.
    VhostUserBlk {
        /// The back-end's socket.
        socket: PathBuf,
        /// `num-queues`.
        queues: u16,
    },
    /// A ublk device `/dev/ublkbN` that a part2 inside the guest serves: the scenario gets
    /// `curve.ublk_volume`, `curve.ublk_queues` and `curve.ublk_depth`.
    Ublk {
        /// Volume specification, as the guest's part2 opens it (`mem:256M`, `delay:...`).
        volume: String,
        /// `--queues`.
        queues: u16,
        /// `--queue-depth`.
        queue_depth: u16,
    },
}

/// What to boot.
#[derive(Debug, Clone)]
pub struct GuestSpec {
    /// `tests/guest/scenarios/<scenario>.sh`.
    pub scenario: String,
    /// `curve.KEY=VALUE` parameters for the scenario.
    pub params: Vec<(String, String)>,
    /// The disks, in order (/dev/vda, /dev/vdb, ...).
    pub disks: Vec<Disk>,
    /// Guest vCPUs.
    pub cpus: u32,
    /// Guest RAM in MiB.
    pub memory_mib: u32,
    /// Host programs copied into the guest's /bin with the libraries `ldd` names (stripped).
    pub tools: Vec<PathBuf>,
    /// Host files copied to the same path in the guest, with the libraries `ldd` names (a
    /// plugin a tool loads, e.g. nbdkit's).
    pub files: Vec<PathBuf>,
    /// TCP forwards `(guest port, host port)`: the guest reaches 127.0.0.1:HOST of the host at
    /// `10.0.2.100:GUEST` and nothing else (QEMU user-mode network, `restrict=on`).
    pub forwards: Vec<(u16, u16)>,
}

/// The address at which a guest reaches its [`GuestSpec::forward`]s.
pub const GUEST_FORWARD_ADDR: &str = "10.0.2.100";

impl GuestSpec {
    /// A 2-vCPU, 512 MiB guest running `scenario`.
    pub fn new(scenario: &str) -> Self {
        GuestSpec {
            scenario: scenario.into(),
            params: Vec::new(),
            disks: Vec::new(),
            cpus: 2,
            memory_mib: 512,
            tools: Vec::new(),
            files: Vec::new(),
            forwards: Vec::new(),
        }
    }

    /// Adds a ublk disk served by a part2 inside the guest (ships `nebd-server` and `curve`).
    pub fn ublk(mut self, volume: &str, queues: u16, queue_depth: u16) -> Self {
        self.disks.push(Disk::Ublk {
            volume: volume.into(),
            queues,
            queue_depth,
        });
        self.part2()
    }

    /// Ships `nebd-server` and `curve` for a part2 inside the guest (ublk and kernel NBD
    /// devices), with RAM for its RAM volumes.
    pub fn part2(mut self) -> Self {
        self.memory_mib = self.memory_mib.max(1024);
        self.tool(&bin("nebd-server")).tool(&bin("curve"))
    }

    /// Lets the guest reach `127.0.0.1:host_port` of the host at
    /// `10.0.2.100:guest_port` (an e1000 NIC on QEMU's user-mode network with `restrict=on`
    /// and one `guestfwd` per forward: nothing else of the host or beyond is reachable).
    /// QEMU connects to the host port when it starts: listen on it before booting.
    pub fn forward(mut self, guest_port: u16, host_port: u16) -> Self {
        self.forwards.push((guest_port, host_port));
        self
    }

    /// Copies a host program (and its libraries) into the guest's /bin.
    pub fn tool(mut self, path: &Path) -> Self {
        if !self.tools.iter().any(|t| t == path) {
            self.tools.push(path.into());
        }
        self
    }

    /// Copies a host file (and the libraries it links) to the same path in the guest.
    pub fn file(mut self, path: &Path) -> Self {
        self.files.push(path.into());
        self
    }

    /// Adds a `curve.KEY=VALUE` parameter.
    pub fn param(mut self, key: &str, value: impl ToString) -> Self {
        self.params.push((key.into(), value.to_string()));
        self
    }

    /// Adds a vhost-user-blk disk.
    pub fn vhost_user_blk(mut self, socket: &Path, queues: u16) -> Self {
        self.disks.push(Disk::VhostUserBlk {
            socket: socket.into(),
            queues,
        });
        self
    }
}

/// A running guest.
#[derive(Debug)]
pub struct Guest {
    qemu: Daemon,
    console: PathBuf,
    qemu_log: PathBuf,
    started: Instant,
}

/// The console of a guest that has powered off.
#[derive(Debug)]
pub struct GuestRun {
    /// The whole serial console.
    pub console: String,
    /// The scenario's exit status (`CURVE-END rc=N`); None if it never got there.
    pub rc: Option<i32>,
    /// How long the guest ran, boot included.
    pub took: Duration,
}

impl Guest {
    /// Builds the initramfs into `dir` and boots the guest; the console goes to
    /// `dir/console.log`.
    pub fn boot(dir: &Path, spec: &GuestSpec) -> Guest {
        let qemu = require_tool("qemu-system-x86_64");
        let (kernel, kver) = guest_kernel();
        let initramfs = dir.join("initramfs.cpio");
        build_initramfs(&initramfs, &kver, &spec.tools, &spec.files);
        let console = dir.join("console.log");
        let qemu_log = dir.join("qemu.log");
        let mut append = format!(
            "console=ttyS0 quiet panic=-1 curve.scenario={}",
            spec.scenario
        );
        for (k, v) in &spec.params {
            append.push_str(&format!(" curve.{k}={v}"));
        }
        let mem = format!("{}M", spec.memory_mib);
        let mut cmd = Command::new(&qemu);
        cmd.args(["-M", "q35", "-accel", "tcg", "-cpu", "max", "-smp"])
            .arg(spec.cpus.to_string())
            .args(["-m", &mem, "-display", "none", "-monitor", "none"])
            .args(["-no-reboot", "-serial"])
            .arg(format!("file:{}", console.display()))
            .arg("-kernel")
            .arg(&kernel)
            .arg("-initrd")
            .arg(&initramfs)
            .arg("-object")
            .arg(format!("memory-backend-memfd,id=mem,size={mem},share=on"))
            .args(["-numa", "node,memdev=mem"]);
        if spec.forwards.is_empty() {
            cmd.args(["-nic", "none"]);
        } else {
            let mut netdev = "user,id=n0,restrict=on".to_owned();
            for (guest, host) in &spec.forwards {
                netdev.push_str(&format!(
                    ",guestfwd=tcp:{GUEST_FORWARD_ADDR}:{guest}-tcp:127.0.0.1:{host}"
                ));
            }
            cmd.arg("-netdev")
                .arg(netdev)
                .args(["-device", "e1000,netdev=n0"]);
        }
        for (i, disk) in spec.disks.iter().enumerate() {
            match disk {
                Disk::VhostUserBlk { socket, queues } => {
                    cmd.arg("-chardev")
                        .arg(format!(
                            "socket,id=vu{i},path={},reconnect=1",
                            socket.display()
                        ))
                        .arg("-device")
                        .arg(format!(
                            "vhost-user-blk-pci,chardev=vu{i},num-queues={queues}"
                        ));
                }
                Disk::Ublk {
                    volume,
                    queues,
                    queue_depth,
                } => {
                    append.push_str(&format!(
                        " curve.ublk_volume={volume} curve.ublk_queues={queues} curve.ublk_depth={queue_depth}"
                    ));
                }
            }
        }
        cmd.args(["-append", &append]);
        // Multi-threaded TCG now and then crashes the guest kernel while it patches its own
        // text at boot ("Oops: int3" in a timer or RCU path, before /init): nothing of ours has
        // run then, so such a boot is retried (twice at most) rather than failing the test.
        let mut attempt = 0;
        loop {
            let mut guest = Guest {
                qemu: Daemon::spawn(clone_command(&cmd), &qemu_log),
                console: console.clone(),
                qemu_log: qemu_log.clone(),
                started: Instant::now(),
            };
            let crashed_at_boot = |c: &str| {
                !c.contains("CURVE-BEGIN") && (c.contains("Oops:") || c.contains("Kernel panic"))
            };
            wait_until(Duration::from_secs(120), || {
                let c = guest.console();
                c.contains("CURVE-BEGIN") || crashed_at_boot(&c) || !guest.qemu.running()
            });
            let c = guest.console();
            if attempt == 2 || !crashed_at_boot(&c) {
                return guest;
            }
            attempt += 1;
            eprintln!("the guest kernel crashed before /init (TCG); booting again:\n{c}");
            let _ = std::fs::rename(&console, dir.join(format!("console.crash{attempt}.log")));
            drop(guest);
        }
    }

    /// The console so far.
    pub fn console(&self) -> String {
        std::fs::read_to_string(&self.console).unwrap_or_default()
    }

    /// Waits until the console shows `marker`; false on timeout or if QEMU exited.
    pub fn wait_for(&mut self, marker: &str, timeout: Duration) -> bool {
        wait_until(timeout, || {
            self.console().contains(marker) || !self.qemu.running()
        }) && self.console().contains(marker)
    }

    /// Waits up to `timeout` for the guest to power off and returns its console; the error
    /// carries the console and QEMU's log when it does not (QEMU is then stopped).
    pub fn finish(mut self, timeout: Duration) -> Result<GuestRun, String> {
        let exited = self.qemu.wait(timeout);
        let console = self.console();
        if exited.is_none() {
            return Err(format!(
                "the guest did not power off within {timeout:?}\nconsole:\n{console}\nqemu:\n{}",
                std::fs::read_to_string(&self.qemu_log).unwrap_or_default()
            ));
        }
        let rc = console
            .lines()
            .find_map(|l| l.trim().strip_prefix("CURVE-END rc="))
            .and_then(|v| v.trim().parse().ok());
        Ok(GuestRun {
            console,
            rc,
            took: self.started.elapsed(),
        })
    }
}

impl GuestRun {
    /// Panics with the console unless the scenario exited 0.
    pub fn assert_ok(&self) {
        assert_eq!(
            self.rc,
            Some(0),
            "the guest scenario failed:\n{}",
            self.console
        );
    }

    /// Every `key=value` of the `CURVE-RESULT` lines, later lines overriding earlier ones.
    pub fn results(&self) -> BTreeMap<String, String> {
        let mut map = BTreeMap::new();
        for line in self.lines("CURVE-RESULT") {
            for kv in line.split_whitespace() {
                if let Some((k, v)) = kv.split_once('=') {
                    map.insert(k.to_owned(), v.to_owned());
                }
            }
        }
        map
    }

    /// The `CURVE-RESULT` lines whose `op=` is `op`.
    pub fn result_line(&self, op: &str) -> Option<String> {
        let want = format!("op={op} ");
        self.lines("CURVE-RESULT")
            .into_iter()
            .find(|l| l.starts_with(&want))
    }

    /// The md5 the guest printed as `CURVE-MD5 NAME HASH`.
    pub fn md5(&self, name: &str) -> String {
        self.lines("CURVE-MD5")
            .into_iter()
            .find_map(|l| {
                let (n, h) = l.split_once(' ')?;
                (n == name).then(|| h.trim().to_owned())
            })
            .unwrap_or_else(|| panic!("no md5 {name} on the console:\n{}", self.console))
    }

    /// The rest of every console line starting with `prefix `.
    pub fn lines(&self, prefix: &str) -> Vec<String> {
        self.console
            .lines()
            .filter_map(|l| l.trim().strip_prefix(prefix))
            .map(|l| l.trim().to_owned())
            .collect()
    }
}

impl GuestRun {
    /// What a `*_writers` scenario (parallel O_DIRECT writers on `device` while part2 is killed
    /// -9 and restarted, then a SIGTERM restart) must show: the same device both times, 0 I/O
    /// errors, every region verified, the device holding the volume's bytes, dmesg clean, and
    /// every writer still writing when part2 died.
    pub fn assert_writers_survived_restarts(&self, device: &str) {
        let r = self.results();
        assert_eq!(r["killed"], "yes");
        assert_eq!(r["path_before"], device);
        assert_eq!(r["path_after"], device, "the same device after the restart");
        assert_eq!(r["errors"], "0", "{}", self.console);
        assert_eq!(r["mismatches"], "0");
        assert_eq!(r["dmesg"], "clean", "{}", self.console);
        assert_eq!(
            self.md5("writers"),
            self.md5("file"),
            "the device reads what the volume holds"
        );
        assert_eq!(
            r["path_after_term"], device,
            "a planned restart keeps the device"
        );
        assert_eq!(self.md5("after-term"), self.md5("writers"), "and its bytes");
        assert!(
            r["passes"]
                .split(',')
                .all(|n| n.parse::<u32>().is_ok_and(|n| n >= 2)),
            "every writer was still writing when part2 died: {:?}",
            r["passes"]
        );
    }
}

/// A benchmark figure: (IOPS, mean completion latency in µs).
pub type BenchFigure = (f64, f64);

impl GuestRun {
    /// The `CURVE-BENCH dev=D rw=RW qd=N iops=X lat_us=Y` lines, each printed, reduced to the
    /// median round (by IOPS) of each `(rw, qd, dev)`.
    pub fn bench_medians(&self) -> BTreeMap<(String, String, String), BenchFigure> {
        let mut runs: BTreeMap<(String, String, String), Vec<BenchFigure>> = BTreeMap::new();
        for line in self.lines("CURVE-BENCH") {
            println!("{line}");
            let kv: BTreeMap<&str, &str> = line
                .split_whitespace()
                .filter_map(|w| w.split_once('='))
                .collect();
            let key = (
                kv["rw"].to_owned(),
                kv["qd"].to_owned(),
                kv["dev"].to_owned(),
            );
            let iops: f64 = kv["iops"].parse().expect("iops");
            let lat: f64 = kv["lat_us"].parse().expect("lat_us");
            runs.entry(key).or_default().push((iops, lat));
        }
        runs.into_iter()
            .map(|(k, mut v)| {
                v.sort_by(|a, b| a.0.total_cmp(&b.0));
                (k, v[v.len() / 2])
            })
            .collect()
    }
}

/// A temporary directory for one guest's initramfs and console.
pub fn guest_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("curve-guest-")
        .tempdir()
        .expect("temp dir")
}

/// A copy of `cmd` (program and arguments), to start it again.
fn clone_command(cmd: &Command) -> Command {
    let mut c = Command::new(cmd.get_program());
    c.args(cmd.get_args());
    c
}

/// md5 (hex) of `len` bytes of `file` from `offset`, by the host's md5sum.
pub fn md5_of(file: &Path, offset: u64, len: u64) -> String {
    let data = std::fs::read(file).expect("read image");
    let end = usize::try_from(offset + len).expect("size");
    let slice = &data[usize::try_from(offset).expect("offset")..end];
    let mut child = Command::new(require_tool("md5sum"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("md5sum");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(slice)
        .expect("md5sum input");
    let out = child.wait_with_output().expect("md5sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned()
}

/// The guest kernel: `CURVE_GUEST_KERNEL` or the newest `/boot/vmlinuz-6.12*` (Debian's
/// linux-image-6.12-amd64, which has ublk_drv), and its release.
fn guest_kernel() -> (PathBuf, String) {
    let kernel = match std::env::var_os("CURVE_GUEST_KERNEL") {
        Some(k) => PathBuf::from(k),
        None => {
            let mut found: Vec<PathBuf> = std::fs::read_dir("/boot")
                .map(|d| d.flatten().map(|e| e.path()).collect())
                .unwrap_or_default();
            found.retain(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-6.12"))
            });
            found.sort();
            found.pop().unwrap_or_else(|| {
                panic!(
                    "no /boot/vmlinuz-6.12*: tests/run.sh installs linux-image-6.12-amd64 \
                     (the guest kernel)"
                )
            })
        }
    };
    let kver = kernel
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .trim_start_matches("vmlinuz-")
        .to_owned();
    (kernel, kver)
}

/// Writes the test initramfs to `out`.
fn build_initramfs(out: &Path, kver: &str, tools: &[PathBuf], files: &[PathBuf]) {
    let guest_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("guest");
    let mut cpio = Cpio::default();
    for d in [
        "bin",
        "sbin",
        "dev",
        "proc",
        "sys",
        "tmp",
        "modules",
        "scenarios",
        "lib",
        "lib64",
        "usr",
    ] {
        cpio.dir(d);
    }
    cpio.char_dev("dev/console", 5, 1);
    cpio.char_dev("dev/null", 1, 3);
    cpio.file("init", &read(&guest_dir.join("init")), 0o755);
    for e in std::fs::read_dir(guest_dir.join("scenarios")).expect("tests/guest/scenarios") {
        let p = e.expect("entry").path();
        let name = p.file_name().expect("name").to_string_lossy().into_owned();
        cpio.file(&format!("scenarios/{name}"), &read(&p), 0o644);
    }
    // busybox-static and its applets.
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.exists())
        .unwrap_or_else(|| {
            panic!("busybox is not installed: tests/run.sh installs busybox-static")
        });
    cpio.file("bin/busybox", &read(busybox), 0o755);
    let list = run_ok(Command::new(busybox).arg("--list"));
    // A host program replaces the applet of its name (mke2fs, e2fsck): the kernel's unpacker
    // would write a file over a symlink's target, busybox itself.
    let shadowed: Vec<String> = tools
        .iter()
        .filter_map(|t| Some(t.file_name()?.to_string_lossy().into_owned()))
        .collect();
    for applet in list.lines().map(str::trim) {
        if applet.is_empty()
            || applet == "busybox"
            || applet.contains('/')
            || shadowed.iter().any(|t| t == applet)
        {
            continue;
        }
        cpio.symlink(&format!("bin/{applet}"), "busybox");
    }
    // Our guest tool and the scenario's host programs, with the shared libraries they link.
    let mut libs = std::collections::BTreeSet::new();
    for tool in std::iter::once(bin("curve-guest-io")).chain(tools.iter().cloned()) {
        let name = tool.file_name().expect("tool name").to_string_lossy();
        cpio.file(&format!("bin/{name}"), &stripped(&tool), 0o755);
        libs.extend(linked_libraries(&tool));
    }
    for file in files {
        libs.extend(linked_libraries(file));
        libs.insert(file.clone());
    }
    for lib in libs {
        let rel = lib.strip_prefix("/").expect("absolute");
        let mut parent = PathBuf::new();
        for c in rel.parent().into_iter().flat_map(|p| p.components()) {
            parent.push(c);
            cpio.dir(&parent.to_string_lossy());
        }
        cpio.file(&rel.to_string_lossy(), &read(&lib), 0o755);
    }
    // The guest kernel's modules /init loads, in this order (busybox insmod does not resolve
    // dependencies): block drivers, the NIC of `GuestSpec::forward`, ext4 and what it needs.
    let moddir = PathBuf::from(format!("/lib/modules/{kver}/kernel"));
    let modules = [
        "drivers/block/virtio_blk",
        "drivers/block/nbd",
        "drivers/block/ublk_drv",
        "drivers/net/ethernet/intel/e1000/e1000",
        "lib/crc16",
        "fs/mbcache",
        "fs/jbd2/jbd2",
        "crypto/crc32c_generic",
        "fs/ext4/ext4",
    ];
    for (i, m) in modules.iter().enumerate() {
        let xz = moddir.join(format!("{m}.ko.xz"));
        if !xz.exists() {
            continue; // built in, or not in this kernel
        }
        let ko = Command::new(require_tool("xz"))
            .arg("-dc")
            .arg(&xz)
            .output()
            .expect("xz");
        assert!(ko.status.success(), "xz -dc {}", xz.display());
        let name = Path::new(m)
            .file_name()
            .expect("module name")
            .to_string_lossy();
        cpio.file(&format!("modules/{i:02}-{name}.ko"), &ko.stdout, 0o644);
    }
    let f = std::fs::File::create(out).expect("initramfs");
    let mut w = std::io::BufWriter::new(f);
    w.write_all(&cpio.finish()).expect("write initramfs");
    w.flush().expect("flush initramfs");
    std::fs::set_permissions(out, std::fs::Permissions::from_mode(0o644)).expect("chmod");
}

/// The shared libraries `ldd` says `program` loads.
fn linked_libraries(program: &Path) -> Vec<PathBuf> {
    let ldd = run_ok(Command::new(require_tool("ldd")).arg(program));
    ldd.lines()
        .filter_map(|l| {
            l.split_whitespace()
                .find(|w| w.starts_with('/'))
                .map(PathBuf::from)
        })
        .collect()
}

/// A program without its debug information (debug builds of ours are ~100 MB; the guest keeps
/// its initramfs in RAM).
fn stripped(p: &Path) -> Vec<u8> {
    let out = std::env::temp_dir().join(format!(
        "curve-guest-{}-{}",
        std::process::id(),
        p.file_name().expect("name").to_string_lossy()
    ));
    let ok = Command::new("objcopy")
        .arg("--strip-debug")
        .arg(p)
        .arg(&out)
        .status()
        .is_ok_and(|s| s.success());
    let data = if ok { read(&out) } else { read(p) };
    let _ = std::fs::remove_file(&out);
    data
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

/// A "newc" cpio archive (what the kernel unpacks as an initramfs), built in memory.
#[derive(Default)]
struct Cpio {
    out: Vec<u8>,
    ino: u32,
    dirs: std::collections::BTreeSet<String>,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        self.ino += 1;
        let header = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.ino,
            mode,
            0,
            0,
            1,
            0,
            data.len(),
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() + 1,
            0
        );
        self.out.extend_from_slice(header.as_bytes());
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }

    fn dir(&mut self, name: &str) {
        if self.dirs.insert(name.to_owned()) {
            self.entry(name, 0o040755, (0, 0), &[]);
        }
    }

    fn file(&mut self, name: &str, data: &[u8], perm: u32) {
        self.entry(name, 0o100000 | perm, (0, 0), data);
    }

    fn symlink(&mut self, name: &str, target: &str) {
        self.entry(name, 0o120777, (0, 0), target.as_bytes());
    }

    fn char_dev(&mut self, name: &str, major: u32, minor: u32) {
        self.entry(name, 0o020600, (major, minor), &[]);
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        self.out
    }
}
