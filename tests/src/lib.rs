//! Harness for the integration tests: run the real binaries (`nebd-server`, `curve`) as
//! separate processes in temporary directories, drive them with real consumers (nbdinfo,
//! qemu-io, nbdcopy, fio) or with the raw NBD client in [`nbd`], and always stop what was
//! started, by PID, even when a test fails.
//!
//! The binaries are taken from the directory of the test executable's parent
//! (`target/debug`), or from `CURVE_BIN_DIR`. `tests/run.sh` builds them first.

pub mod cluster;
pub mod guest;
pub mod nbd;
pub mod netbed;
pub mod wire;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Path of one of our binaries.
pub fn bin(name: &str) -> PathBuf {
    let dir = match std::env::var_os("CURVE_BIN_DIR") {
        Some(d) => PathBuf::from(d),
        None => {
            let exe = std::env::current_exe().expect("test executable path");
            // target/<profile>/deps/<test> -> target/<profile>
            exe.parent()
                .and_then(Path::parent)
                .expect("target dir")
                .to_owned()
        }
    };
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace --bins` first (tests/run.sh does)",
        path.display()
    );
    path
}

/// Fails the test with a clear message when a consumer tool is missing.
pub fn require_tool(tool: &str) -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(tool))
            .find(|p| p.exists())
    });
    found.unwrap_or_else(|| {
        panic!("{tool} is not installed: tests/run.sh installs the packages the suite needs")
    })
}

/// Polls `cond` every 10 ms until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    cond()
}

/// A child process that is killed (by its PID) when dropped.
#[derive(Debug)]
pub struct Daemon {
    child: Option<Child>,
}

impl Daemon {
    /// Starts `cmd` with stderr captured into `log`.
    pub fn spawn(mut cmd: Command, log: &Path) -> Self {
        let log = std::fs::File::create(log).expect("log file");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        Daemon { child: Some(child) }
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Sends `signal` to the process.
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on the pid of a child we started and have not reaped.
        unsafe { libc::kill(self.pid() as i32, signal) };
    }

    /// Whether it is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Waits up to `timeout` for it to exit; returns its exit code (None if killed by a
    /// signal or still running).
    pub fn wait(&mut self, timeout: Duration) -> Option<i32> {
        let child = self.child.as_mut()?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return status.code();
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A nebd-server in its own temporary run directory.
#[derive(Debug)]
pub struct Part2 {
    /// The process (killed on drop).
    pub daemon: Daemon,
    /// Temporary directory holding the run dir, logs and test files.
    pub dir: tempfile::TempDir,
    args: Vec<String>,
    incarnation: u32,
    host: cluster::OnHost,
    /// The nebd-server that took over in a live upgrade (not our child: killed by pid).
    upgraded: Option<u32>,
}

impl Drop for Part2 {
    fn drop(&mut self) {
        if let Some(pid) = self.upgraded.take() {
            // SAFETY: kill(2) of the nebd-server our `curve upgrade` started (its pid file).
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    }
}

impl Part2 {
    /// Starts nebd-server and waits for its control socket.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Starts nebd-server with extra arguments.
    pub fn start_with(args: &[&str]) -> Self {
        Self::start_on(args, None)
    }

    /// As [`Part2::start_with`], in a host of a [`netbed::NetBed`] (its run directory, and so
    /// its Unix sockets, are on the file system the test shares).
    pub fn start_on(args: &[&str], host: cluster::OnHost) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("curve-test-")
            .tempdir()
            .expect("temp dir");
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let daemon = spawn_part2(dir.path(), &args, 0, &host);
        Part2 {
            daemon,
            dir,
            args,
            incarnation: 0,
            host,
            upgraded: None,
        }
    }

    /// Plays the supervisor after a crash: kill -9, then start a new nebd-server on the same
    /// run dir at once. Returns how long the new one took to answer on its control socket.
    pub fn kill9_and_restart(&mut self) -> Duration {
        if let Some(pid) = self.upgraded.take() {
            // SAFETY: kill(2) of the nebd-server our `curve upgrade` started (its pid file).
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            wait_until(Duration::from_secs(10), || !pid_alive(pid));
        } else {
            self.daemon.signal(libc::SIGKILL);
            self.daemon.wait(Duration::from_secs(10));
        }
        let t = Instant::now();
        self.incarnation += 1;
        self.daemon = spawn_part2(self.dir.path(), &self.args, self.incarnation, &self.host);
        t.elapsed()
    }

    /// `curve upgrade ARGS --format json` (live upgrade): the report. The old process is
    /// waited for (it exits 0); the new one is tracked by its pid (the pid file) and killed
    /// on drop. Panics when the upgrade fails.
    pub fn upgrade(&mut self, args: &[&str]) -> serde_json::Value {
        let mut full = vec!["upgrade", "--format", "json"];
        full.extend_from_slice(args);
        let out = self.curve_ok(&full);
        let report: serde_json::Value = serde_json::from_str(&out).expect("upgrade report");
        let old = report["old_pid"].as_u64().expect("old pid") as u32;
        let new = report["new_pid"].as_u64().expect("new pid") as u32;
        // Recorded first: the new process is killed on drop even if a check below fails.
        let first = self.upgraded.replace(new).is_none();
        if first {
            assert_eq!(
                old,
                self.daemon.pid(),
                "the first upgrade replaces our child"
            );
            assert_eq!(
                self.daemon.wait(Duration::from_secs(10)),
                Some(0),
                "the old nebd-server exits 0 after handing over"
            );
        } else {
            assert!(
                wait_until(Duration::from_secs(10), || !pid_alive(old)),
                "the old nebd-server exits after handing over"
            );
        }
        let pid_file = self.run_dir().join("nebd-server.pid");
        assert!(
            wait_until(Duration::from_secs(10), || {
                std::fs::read_to_string(&pid_file).is_ok_and(|p| p.trim() == new.to_string())
            }),
            "the pid file names the new nebd-server {new}"
        );
        report
    }

    /// The pid of the nebd-server serving now.
    pub fn pid(&self) -> u32 {
        self.upgraded.unwrap_or_else(|| self.daemon.pid())
    }

    /// Sends `signal` to the nebd-server serving now.
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) of the nebd-server this harness started (directly or by upgrade).
        unsafe { libc::kill(self.pid() as i32, signal) };
    }

    /// The log of one incarnation (0: the first start, 1: after the first restart, ...).
    pub fn log_of(&self, incarnation: u32) -> String {
        std::fs::read_to_string(self.dir.path().join(log_name(incarnation))).unwrap_or_default()
    }

    /// The part1 socket.
    pub fn part1_socket(&self) -> PathBuf {
        self.run_dir().join("nebd.sock")
    }

    /// The run directory.
    pub fn run_dir(&self) -> PathBuf {
        self.dir.path().join("run")
    }

    /// A path inside the test's temporary directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Runs `curve --run-dir <run dir> ARGS`.
    pub fn curve(&self, args: &[&str]) -> Output {
        Command::new(bin("curve"))
            .arg("--run-dir")
            .arg(self.run_dir())
            .args(args)
            .output()
            .expect("run curve")
    }

    /// Runs `curve ARGS` and returns stdout; panics with stderr and the server log on failure.
    pub fn curve_ok(&self, args: &[&str]) -> String {
        let out = self.curve(args);
        assert!(
            out.status.success(),
            "curve {args:?} failed: {}\nserver log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            read_log(self.dir.path())
        );
        String::from_utf8(out.stdout).expect("utf-8")
    }

    /// Adds an NBD export on a Unix socket in the run dir and returns its URI.
    pub fn export_mem(&self, name: &str, size: &str) -> String {
        let sock = self.run_dir().join(format!("{name}.sock"));
        self.curve_ok(&[
            "export",
            "add",
            "--volume",
            &format!("mem:{size}"),
            "--nbd",
            &format!("unix:{}", sock.display()),
            "--name",
            name,
        ])
        .trim()
        .to_owned()
    }

    /// Exports `volume` (a spec: `curve:/PATH`, `mem:SIZE`, ...) over NBD on the Unix socket
    /// `NAME.sock` in the run dir; returns its URI and the socket.
    pub fn export_nbd(&self, name: &str, volume: &str) -> (String, PathBuf) {
        let sock = self.socket(name);
        let uri = self.curve_ok(&[
            "export",
            "add",
            "--volume",
            volume,
            "--nbd",
            &format!("unix:{}", sock.display()),
            "--name",
            name,
        ]);
        (uri.trim().to_owned(), sock)
    }

    /// Socket path of an export created by [`Part2::export_mem`].
    pub fn socket(&self, name: &str) -> PathBuf {
        self.run_dir().join(format!("{name}.sock"))
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        read_log(self.dir.path())
    }
}

fn log_name(incarnation: u32) -> String {
    if incarnation == 0 {
        "nebd-server.log".into()
    } else {
        format!("nebd-server.{incarnation}.log")
    }
}

fn spawn_part2(dir: &Path, args: &[String], incarnation: u32, host: &cluster::OnHost) -> Daemon {
    let mut cmd = match host {
        None => Command::new(bin("nebd-server")),
        Some((bed, i)) => bed.command(*i, &bin("nebd-server")),
    };
    cmd.arg("--run-dir").arg(dir.join("run")).args(args).env(
        "RUST_LOG",
        std::env::var("CURVE_PART2_LOG").unwrap_or_else(|_| "info,curve_nbd=debug".into()),
    );
    let mut daemon = Daemon::spawn(cmd, &dir.join(log_name(incarnation)));
    let sock = dir.join("run/control.sock");
    let up = wait_until(Duration::from_secs(20), || {
        std::os::unix::net::UnixStream::connect(&sock).is_ok() || !daemon.running()
    });
    assert!(
        up && daemon.running(),
        "nebd-server did not start:\n{}",
        read_log(dir)
    );
    daemon
}

/// Whether `pid` runs (a zombie does not).
pub fn pid_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        !s.rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
    })
}

/// Every log of every incarnation, in order.
fn read_log(dir: &Path) -> String {
    (0..)
        .map(|i| dir.join(log_name(i)))
        .take_while(|p| p.exists())
        .map(|p| std::fs::read_to_string(p).unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n--- restart ---\n")
}

/// Runs a consumer command; panics with its output when it fails.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `GET http://addr/metrics` (a daemon's `--metrics-listen`): the body; panics unless 200.
pub fn scrape(addr: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)
        .unwrap_or_else(|e| panic!("metrics endpoint {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(10))).ok();
    write!(s, "GET /metrics HTTP/1.1\r\nHost: {addr}\r\n\r\n").expect("request");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("metrics answer");
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    assert!(head.starts_with("HTTP/1.1 200"), "{addr}: {head}");
    body.to_owned()
}

/// The value of `name{labels}` in a scrape (see `curve_metrics::value`).
pub fn metric(text: &str, name: &str, labels: &str) -> Option<f64> {
    curve_metrics::value(text, name, labels)
}
