//! Bad input on the NBD socket: every case gets the error the NBD spec prescribes or a
//! clean disconnect, and the server keeps serving other clients.

use std::io::Write;
use std::path::Path;

use curve_nbd::proto::{cflag, cmd, errno, opt, rep};
use curve_tests::Part2;
use curve_tests::nbd::Client;
use rand::{Rng, SeedableRng};

const SIZE: u64 = 8 << 20;

/// A fresh client can still write and read back through `sock`.
fn assert_serves(sock: &Path, name: &str) {
    let (mut c, size, _) = Client::open(sock, name, false).expect("server still accepts clients");
    assert_eq!(size, SIZE);
    let data = vec![0x77u8; 4096];
    c.request(cmd::WRITE, 0, 1, 8192, 4096, &data).unwrap();
    assert_eq!(c.reply(0).unwrap().error, 0);
    c.request(cmd::READ, 0, 2, 8192, 4096, &[]).unwrap();
    let r = c.reply(4096).unwrap();
    assert_eq!((r.cookie, r.error), (2, 0));
    assert_eq!(r.data, data);
}

fn setup() -> (Part2, std::path::PathBuf) {
    let p2 = Part2::start();
    p2.export_mem("vol", "8M");
    let sock = p2.socket("vol");
    (p2, sock)
}

#[test]
fn garbage_during_negotiation_closes_only_that_client() {
    let (_p2, sock) = setup();
    // Garbage instead of client flags (unknown flag bits).
    let mut c = Client::connect(&sock).unwrap();
    c.sock.write_all(&[0xff; 64]).unwrap();
    assert!(c.closed_by_server());
    // Wrong option magic.
    let mut c = Client::connect(&sock).unwrap();
    c.sock.write_all(b"NOTNBDOPT...............").unwrap();
    assert!(c.closed_by_server());
    // An option claiming a 1 GiB payload.
    let mut c = Client::connect(&sock).unwrap();
    let mut b = curve_nbd::proto::IHAVEOPT.to_be_bytes().to_vec();
    b.extend_from_slice(&opt::GO.to_be_bytes());
    b.extend_from_slice(&(1u32 << 30).to_be_bytes());
    c.sock.write_all(&b).unwrap();
    assert!(c.closed_by_server());
    // A client that sends half a header and hangs up.
    let mut c = Client::connect(&sock).unwrap();
    c.sock.write_all(&[0x49, 0x48]).unwrap();
    drop(c);
    assert_serves(&sock, "vol");
}

#[test]
fn option_errors_keep_the_negotiation_going() {
    let (_p2, sock) = setup();
    let mut c = Client::connect(&sock).unwrap();
    // Truncated NBD_OPT_GO payload.
    c.send_option(opt::GO, &[0, 0, 0, 9, b'v']).unwrap();
    assert_eq!(c.read_option_replies().unwrap()[0].kind, rep::ERR_INVALID);
    // Unknown option.
    c.send_option(777, b"whatever").unwrap();
    assert_eq!(c.read_option_replies().unwrap()[0].kind, rep::ERR_UNSUP);
    // TLS is not offered.
    c.send_option(opt::STARTTLS, &[]).unwrap();
    assert_eq!(c.read_option_replies().unwrap()[0].kind, rep::ERR_UNSUP);
    // Meta contexts before structured replies.
    c.send_option(opt::SET_META_CONTEXT, &[0, 0, 0, 0, 0, 0, 0, 0])
        .unwrap();
    assert_eq!(c.read_option_replies().unwrap()[0].kind, rep::ERR_INVALID);
    // Unknown export name.
    assert_eq!(c.go("nope").unwrap(), Err(rep::ERR_UNKNOWN));
    // ... and then the right one works on the same connection.
    let (size, _) = c.go("vol").unwrap().unwrap();
    assert_eq!(size, SIZE);
    c.request(cmd::READ, 0, 9, 0, 512, &[]).unwrap();
    assert_eq!(c.reply(512).unwrap().error, 0);
}

#[test]
fn unknown_export_name_via_export_name_disconnects() {
    let (_p2, sock) = setup();
    let mut c = Client::connect(&sock).unwrap();
    c.send_option(opt::EXPORT_NAME, b"missing").unwrap();
    assert!(c.closed_by_server());
    assert_serves(&sock, "vol");
}

#[test]
fn request_errors_follow_the_spec() {
    let (_p2, sock) = setup();
    for structured in [false, true] {
        let (mut c, _, _) = Client::open(&sock, "vol", structured).unwrap();
        let cases: [(u16, u16, u64, u32, u32); 8] = [
            (cmd::READ, 0, SIZE - 512, 1024, errno::EINVAL), // read past the end
            (cmd::READ, 0, u64::MAX - 10, 512, errno::EINVAL), // offset overflow
            (cmd::READ, 0, 0, 64 << 20, errno::EINVAL),      // larger than max block
            (cmd::READ, 0, 0, 0, errno::EINVAL),             // zero length
            (cmd::TRIM, 0, SIZE, 4096, errno::EINVAL),       // trim past the end
            (cmd::WRITE_ZEROES, 0, SIZE, 4096, errno::ENOSPC), // zeroes past the end
            (cmd::BLOCK_STATUS, 0, 0, 4096, errno::EINVAL),  // not negotiated
            (42, 0, 0, 4096, errno::EINVAL),                 // unknown command
        ];
        for (i, (kind, flags, offset, len, want)) in cases.into_iter().enumerate() {
            c.request(kind, flags, 100 + i as u64, offset, len, &[])
                .unwrap();
            let r = c.reply(0).unwrap();
            assert_eq!(
                (r.cookie, r.error),
                (100 + i as u64, want),
                "case {i} structured={structured}"
            );
        }
        // Unknown flag on a read.
        c.request(cmd::READ, cflag::NO_HOLE, 200, 0, 512, &[])
            .unwrap();
        assert_eq!(c.reply(0).unwrap().error, errno::EINVAL);
        // A write past the end: its payload is consumed, ENOSPC comes back, framing holds.
        c.request(cmd::WRITE, 0, 201, SIZE - 100, 200, &[1u8; 200])
            .unwrap();
        assert_eq!(c.reply(0).unwrap().error, errno::ENOSPC);
        // The connection still works.
        c.request(cmd::WRITE, cflag::FUA, 202, 0, 4, b"abcd")
            .unwrap();
        assert_eq!(c.reply(0).unwrap().error, 0);
        c.request(cmd::READ, 0, 203, 0, 4, &[]).unwrap();
        assert_eq!(c.reply(4).unwrap().data, b"abcd");
        c.request(cmd::FLUSH, 0, 204, 0, 0, &[]).unwrap();
        assert_eq!(c.reply(0).unwrap().error, 0);
        c.request(cmd::DISC, 0, 205, 0, 0, &[]).unwrap();
        assert!(c.closed_by_server());
    }
}

#[test]
fn read_only_export_answers_eperm() {
    let p2 = Part2::start();
    let sock = p2.path("ro.sock");
    p2.curve_ok(&[
        "export",
        "add",
        "--volume",
        "mem:8M",
        "--nbd",
        &format!("unix:{}", sock.display()),
        "--name",
        "ro",
        "--read-only",
    ]);
    let (mut c, _, flags) = Client::open(&sock, "ro", false).unwrap();
    assert_ne!(flags & curve_nbd::proto::tflag::READ_ONLY, 0);
    c.request(cmd::WRITE, 0, 1, 0, 512, &[9u8; 512]).unwrap();
    assert_eq!(c.reply(0).unwrap().error, errno::EPERM);
    c.request(cmd::TRIM, 0, 2, 0, 512, &[]).unwrap();
    assert_eq!(c.reply(0).unwrap().error, errno::EPERM);
    c.request(cmd::WRITE_ZEROES, 0, 3, 0, 512, &[]).unwrap();
    assert_eq!(c.reply(0).unwrap().error, errno::EPERM);
    c.request(cmd::READ, 0, 4, 0, 512, &[]).unwrap();
    let r = c.reply(512).unwrap();
    assert_eq!(r.error, 0);
    assert!(
        r.data.iter().all(|&b| b == 0),
        "the refused write must not have landed"
    );
}

#[test]
fn framing_violations_disconnect() {
    let (_p2, sock) = setup();
    // A write announcing a 64 MiB payload: more than the maximum block size.
    let (mut c, _, _) = Client::open(&sock, "vol", false).unwrap();
    c.request(cmd::WRITE, 0, 1, 0, 64 << 20, &[]).unwrap();
    assert!(c.closed_by_server());
    // A request with a bad magic.
    let (mut c, _, _) = Client::open(&sock, "vol", true).unwrap();
    c.sock.write_all(&[0xde; 28]).unwrap();
    assert!(c.closed_by_server());
    assert_serves(&sock, "vol");
}

#[test]
fn random_bytes_never_stop_the_server() {
    let (p2, sock) = setup();
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
    for round in 0..64 {
        let len = rng.random_range(1..2048);
        let junk: Vec<u8> = (0..len).map(|_| rng.random()).collect();
        if round % 2 == 0 {
            // Junk during negotiation.
            let mut c = Client::connect(&sock).unwrap();
            let _ = c.sock.write_all(&junk);
        } else {
            // Junk in transmission, after a valid request header prefix sometimes.
            let (mut c, _, _) = Client::open(&sock, "vol", round % 4 == 1).unwrap();
            let mut b = Vec::new();
            if round % 3 == 0 {
                b.extend_from_slice(&curve_nbd::proto::REQUEST_MAGIC.to_be_bytes());
            }
            b.extend_from_slice(&junk);
            let _ = c.sock.write_all(&b);
        }
    }
    assert_serves(&sock, "vol");
    assert!(!p2.log().contains("panicked"), "{}", p2.log());
}

/// An export takes 64 connections: the next is refused with NBD_REP_ERR_POLICY and a message
/// saying why (nbdinfo fails), so one client opening connections cannot run the server's file
/// descriptors down; the others keep serving, and one closed makes room again.
#[test]
fn connections_past_an_exports_limit_are_refused_clearly() {
    let (p2, sock) = setup();
    let uri = format!("nbd+unix:///vol?socket={}", sock.display());
    let mut held: Vec<Client> = (0..64)
        .map(|_| {
            Client::open(&sock, "vol", false)
                .expect("under the limit")
                .0
        })
        .collect();
    // Counted once in transmission: give the last ones a moment to start.
    let mut said = String::new();
    let refused = curve_tests::wait_until(std::time::Duration::from_secs(10), || {
        let mut c = Client::connect(&sock).unwrap();
        let mut d = 3u32.to_be_bytes().to_vec();
        d.extend_from_slice(b"vol");
        d.extend_from_slice(&0u16.to_be_bytes());
        c.send_option(opt::GO, &d).unwrap();
        let r = c.read_option_replies().unwrap();
        said = String::from_utf8_lossy(&r[0].data).into_owned();
        r[0].kind == rep::ERR_POLICY
    });
    assert!(refused, "the 65th connection is refused: {said}");
    assert!(said.contains("64 connections, its limit"), "{said}");
    let out = std::process::Command::new("nbdinfo")
        .arg(&uri)
        .output()
        .unwrap();
    assert!(!out.status.success(), "nbdinfo is refused too");
    // The connections held still serve.
    let c = &mut held[63];
    c.request(cmd::READ, 0, 9, 0, 4096, &[]).unwrap();
    assert_eq!(c.reply(4096).unwrap().error, 0);
    drop(held);
    assert!(
        curve_tests::wait_until(std::time::Duration::from_secs(10), || {
            std::process::Command::new("nbdinfo")
                .arg(&uri)
                .output()
                .unwrap()
                .status
                .success()
        }),
        "room again once they close"
    );
    assert_serves(&sock, "vol");
    drop(p2);
}

/// Clients holding every file descriptor nebd-server may open (a limit of 64, and 200
/// connections to an export that never negotiate): the control socket still answers — a
/// descriptor kept in reserve is given to it — and the export serves again once they go.
#[test]
fn the_control_socket_answers_when_clients_hold_every_descriptor() {
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let mut cmd = std::process::Command::new(curve_tests::bin("nebd-server"));
    cmd.arg("--run-dir").arg(&run);
    // SAFETY: setrlimit in the child before exec; async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: 64,
                rlim_max: 64,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let log = dir.path().join("nebd-server.log");
    let _daemon = curve_tests::Daemon::spawn(cmd, &log);
    let curve = |args: &[&str]| {
        // `timeout`: a control socket that never answers fails the test instead of hanging it.
        std::process::Command::new("timeout")
            .arg("20")
            .arg(curve_tests::bin("curve"))
            .arg("--run-dir")
            .arg(&run)
            .args(args)
            .output()
            .unwrap()
    };
    assert!(
        curve_tests::wait_until(std::time::Duration::from_secs(20), || {
            curve(&["export", "list"]).status.success()
        }),
        "nebd-server answers"
    );
    let sock = run.join("e.sock");
    let out = curve(&[
        "export",
        "add",
        "--volume",
        "mem:8M",
        "--nbd",
        &format!("unix:{}", sock.display()),
        "--name",
        "e",
    ]);
    assert!(out.status.success(), "{out:?}");
    let held: Vec<std::os::unix::net::UnixStream> = (0..200)
        .filter_map(|_| std::os::unix::net::UnixStream::connect(&sock).ok())
        .collect();
    let ran_out = curve_tests::wait_until(std::time::Duration::from_secs(20), || {
        std::fs::read_to_string(&log).is_ok_and(|l| l.contains("Too many open files"))
    });
    assert!(
        ran_out,
        "{} connections exhaust nebd-server's 64 descriptors",
        held.len()
    );
    let out = curve(&["export", "list"]);
    assert!(
        out.status.success(),
        "the control socket answers with every descriptor taken: {out:?}\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains('e'));
    // And again: the spare descriptor is taken back after each such connection.
    let out = curve(&["export", "list"]);
    assert!(out.status.success(), "{out:?}");
    drop(held);
    assert!(
        curve_tests::wait_until(std::time::Duration::from_secs(20), || {
            std::panic::catch_unwind(|| assert_serves(&sock, "e")).is_ok()
        }),
        "the export serves again once the clients went"
    );
}
