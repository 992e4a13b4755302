//! NEBD part1 (libnebd) against a real nebd-server: the API, bad input on the part1 socket,
//! heartbeat timeout and reopen, and kill -9 of part2 under a verifying write/read loop.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use curve_tests::{Part2, wait_until};
use nebd::{Nebd, NebdError, Options};
use nebd_proto::{self as proto, Op, RequestHeader};

fn image(p2: &Part2, name: &str, size: u64) -> String {
    let path = p2.path(name);
    std::fs::File::create(&path).unwrap().set_len(size).unwrap();
    format!("file:{}", path.display())
}

fn files(p2: &Part2) -> Vec<nebd_server::files::FileStatus> {
    let mut c = nebd_server::control::ControlClient::connect(&p2.run_dir()).unwrap();
    c.call(&nebd_server::control::Request::ListFiles)
        .unwrap()
        .files
}

#[test]
fn api_roundtrip() {
    let p2 = Part2::start();
    let name = image(&p2, "a.img", 4 << 20);
    let nebd = Nebd::new(Options::new(p2.part1_socket()));
    let info = nebd.open(&name).unwrap();
    assert_eq!((info.size, info.block_size), (4 << 20, 512));
    assert_eq!(
        nebd.open(&name).unwrap().fd,
        info.fd,
        "reopening the same volume"
    );
    let fd = info.fd;
    let data: Vec<u8> = (0..65536u32).map(|i| (i * 7) as u8).collect();
    nebd.pwrite(fd, &data, 4096, true).unwrap();
    let mut back = vec![0u8; data.len()];
    nebd.pread(fd, &mut back, 4096).unwrap();
    assert_eq!(back, data);
    // Async calls complete on the library's thread.
    let (tx, rx) = std::sync::mpsc::channel();
    for i in 0..32u64 {
        let tx = tx.clone();
        nebd.aio_write(fd, i * 4096, &[i as u8; 4096], false, move |r| {
            tx.send(r.map(|_| i)).unwrap()
        });
    }
    for _ in 0..32 {
        rx.recv_timeout(Duration::from_secs(10)).unwrap().unwrap();
    }
    let (tx, rx) = std::sync::mpsc::channel();
    nebd.aio_read(fd, 31 * 4096, 4096, move |r| tx.send(r).unwrap());
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(10)).unwrap().unwrap(),
        vec![31u8; 4096]
    );
    nebd.discard(fd, 0, 4096).unwrap();
    nebd.flush(fd).unwrap();
    let mut z = vec![1u8; 4096];
    nebd.pread(fd, &mut z, 0).unwrap();
    assert!(z.iter().all(|&b| b == 0));
    assert_eq!(nebd.resize(fd, 8 << 20).unwrap().size, 8 << 20);
    assert_eq!(nebd.info(fd).unwrap().size, 8 << 20);
    // Errors from part2 come back at once.
    let e = nebd.pread(fd, &mut [0u8; 512], 8 << 20).unwrap_err();
    assert_eq!(e.errno(), libc::EINVAL);
    assert!(
        matches!(nebd.pread(999, &mut [0u8; 1], 0), Err(NebdError::Status { errno, .. }) if errno == libc::EBADF)
    );
    assert_eq!(nebd.open("bogus:thing").unwrap_err().errno(), libc::EINVAL);
    // A request part2 could never take is refused here, not sent (and replayed) forever.
    let huge = vec![0u8; (proto::MAX_PAYLOAD + 1) as usize];
    assert_eq!(
        nebd.pwrite(fd, &huge, 0, false).unwrap_err().errno(),
        libc::EINVAL
    );
    nebd.pread(fd, &mut back, 4096).unwrap();
    nebd.close(fd).unwrap();
    assert_eq!(nebd.close(fd).unwrap_err().errno(), libc::EBADF);
    assert!(files(&p2).is_empty());
}

fn raw_request(op: u8, fd: u32, id: u64, offset: u64, length: u64, payload: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    proto::encode_request(
        &mut b,
        &RequestHeader {
            op,
            flags: 0,
            fd,
            payload: payload.len() as u32,
            id,
            offset,
            length,
        },
    );
    b.extend_from_slice(payload);
    b
}

fn raw_response(s: &mut UnixStream) -> (i32, u64, Vec<u8>) {
    let mut h = [0u8; proto::RESPONSE_LEN];
    s.read_exact(&mut h).unwrap();
    let h = proto::parse_response(&h).unwrap().unwrap();
    let mut p = vec![0u8; h.payload as usize];
    s.read_exact(&mut p).unwrap();
    (h.status, h.id, p)
}

fn closed(s: &mut UnixStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut b = [0u8; 1];
    match s.read(&mut b) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    }
}

#[test]
fn bad_input_on_the_part1_socket() {
    let p2 = Part2::start();
    let name = image(&p2, "b.img", 1 << 20);
    let good = Nebd::new(Options::new(p2.part1_socket()));
    let fd = good.open(&name).unwrap().fd;
    // Garbage frame: the connection is closed.
    let mut s = UnixStream::connect(p2.part1_socket()).unwrap();
    s.write_all(&[0xab; 100]).unwrap();
    assert!(closed(&mut s));
    // A payload over the limit: closed.
    let mut s = UnixStream::connect(p2.part1_socket()).unwrap();
    let mut b = raw_request(Op::Write as u8, fd, 1, 0, 0, &[]);
    b[12..16].copy_from_slice(&(proto::MAX_PAYLOAD + 1).to_le_bytes());
    s.write_all(&b).unwrap();
    assert!(closed(&mut s));
    // Well-framed but wrong requests get error frames and the connection goes on.
    let mut s = UnixStream::connect(p2.part1_socket()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let cases: [(Vec<u8>, i32); 6] = [
        (
            raw_request(Op::Read as u8, 4242, 1, 0, 512, &[]),
            -libc::EBADF,
        ),
        (
            raw_request(Op::Read as u8, fd, 2, (1 << 20) - 100, 512, &[]),
            -libc::EINVAL,
        ),
        (
            raw_request(Op::Write as u8, fd, 3, 1 << 20, 0, &[7u8; 64]),
            -libc::EINVAL,
        ),
        (raw_request(200, fd, 4, 0, 0, b"xyz"), -libc::EINVAL),
        (
            raw_request(Op::Heartbeat as u8, 0, 5, 0, 0, &[1, 2, 3]),
            -libc::EINVAL,
        ),
        (
            raw_request(Op::Read as u8, fd, 6, 0, u64::MAX, &[]),
            -libc::EINVAL,
        ),
    ];
    for (frame, want) in cases {
        s.write_all(&frame).unwrap();
        let (status, id, _) = raw_response(&mut s);
        assert_eq!(status, want, "request {id}");
    }
    s.write_all(&raw_request(Op::Read as u8, fd, 7, 0, 16, &[]))
        .unwrap();
    let (status, id, data) = raw_response(&mut s);
    assert_eq!((status, id, data.len()), (0, 7, 16));
    // The well-behaved client never noticed.
    good.pwrite(fd, b"still here", 0, false).unwrap();
    let mut back = [0u8; 10];
    good.pread(fd, &mut back, 0).unwrap();
    assert_eq!(&back, b"still here");
}

#[test]
fn heartbeat_timeout_closes_and_the_next_request_reopens() {
    let p2 = Part2::start_with(&["--heartbeat-timeout-ms", "300"]);
    let name = image(&p2, "h.img", 1 << 20);
    // This client never beats within the timeout.
    let silent = Nebd::new(Options {
        heartbeat_interval: Duration::from_secs(3600),
        ..Options::new(p2.part1_socket())
    });
    let fd = silent.open(&name).unwrap().fd;
    silent.pwrite(fd, b"kept", 0, false).unwrap();
    assert!(
        wait_until(Duration::from_secs(5), || !files(&p2)[0].open),
        "the file was not closed by the heartbeat timeout:\n{}",
        p2.log()
    );
    assert_eq!(files(&p2)[0].fd, fd, "the record stays");
    let mut back = [0u8; 4];
    silent.pread(fd, &mut back, 0).unwrap();
    assert_eq!(&back, b"kept");
    assert!(files(&p2)[0].open);
    assert!(p2.log().contains("heartbeat timeout") && p2.log().contains("reopened on request"));
    // A client that beats keeps its file open.
    let beating = Nebd::new(Options {
        heartbeat_interval: Duration::from_millis(50),
        ..Options::new(p2.part1_socket())
    });
    let name2 = image(&p2, "h2.img", 1 << 20);
    let fd2 = beating.open(&name2).unwrap().fd;
    std::thread::sleep(Duration::from_millis(900));
    assert!(
        files(&p2).iter().find(|f| f.fd == fd2).unwrap().open,
        "{}",
        p2.log()
    );
}

/// Writes a block, reads it back, verifies, over and over; returns (ios, errors, longest I/O).
fn verify_loop(nebd: &Nebd, fd: u32, stop: &AtomicBool) -> (u64, u64, Duration) {
    let mut ios = 0u64;
    let mut errors = 0u64;
    let mut longest = Duration::ZERO;
    let mut buf = vec![0u8; 4096];
    let mut i = 0u64;
    while !stop.load(Ordering::Acquire) {
        let block = i % 256;
        let pattern: Vec<u8> = (0..4096u64).map(|b| (b ^ i) as u8).collect();
        let t = Instant::now();
        if nebd.pwrite(fd, &pattern, block * 4096, false).is_err() {
            errors += 1;
        }
        longest = longest.max(t.elapsed());
        let t = Instant::now();
        if nebd.pread(fd, &mut buf, block * 4096).is_err() || buf != pattern {
            errors += 1;
        }
        longest = longest.max(t.elapsed());
        ios += 2;
        i += 1;
    }
    (ios, errors, longest)
}

#[test]
fn kill_9_of_part2_is_a_pause_not_an_error() {
    let mut p2 = Part2::start();
    let name = image(&p2, "k.img", 1 << 20);
    let nebd = Nebd::new(Options::new(p2.part1_socket()));
    let fd = nebd.open(&name).unwrap().fd;
    let stop = Arc::new(AtomicBool::new(false));
    let worker = {
        let (nebd, stop) = (nebd.clone(), stop.clone());
        std::thread::spawn(move || verify_loop(&nebd, fd, &stop))
    };
    let mut restarts = Vec::new();
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(400));
        restarts.push(p2.kill9_and_restart());
    }
    std::thread::sleep(Duration::from_millis(400));
    stop.store(true, Ordering::Release);
    let (ios, errors, longest) = worker.join().unwrap();
    println!(
        "part1 verify loop across 3 kill -9 of part2: {ios} I/Os, {errors} errors, \
         longest I/O (the pause) {longest:?}, part2 restarts took {restarts:?}, \
         reconnects {}",
        nebd.reconnects()
    );
    assert_eq!(errors, 0, "{}", p2.log());
    assert!(nebd.reconnects() >= 3);
    assert!(ios > 100);
    assert!(longest < Duration::from_secs(5), "pause {longest:?}");
    // The data is what the loop last wrote: read everything back through a fresh client.
    let fresh = Nebd::new(Options::new(p2.part1_socket()));
    assert_eq!(fresh.open(&name).unwrap().fd, fd, "same fd after restarts");
}

#[test]
fn the_c_example_survives_kill_9_of_part2() {
    curve_tests::require_tool("cc");
    let mut p2 = Part2::start();
    let name = image(&p2, "c.img", 1 << 20);
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap();
    let lib_dir = curve_tests::bin("libnebd.so").parent().unwrap().to_owned();
    let exe = p2.path("nebd_verify");
    curve_tests::run_ok(
        std::process::Command::new("cc")
            .arg("-O2")
            .arg("-o")
            .arg(&exe)
            .arg(root.join("nebd/part1/examples/nebd_verify.c"))
            .arg("-I")
            .arg(root.join("nebd/part1/include"))
            .arg("-L")
            .arg(&lib_dir)
            .args(["-lnebd", "-lpthread"]),
    );
    let child = std::process::Command::new(&exe)
        .arg(p2.part1_socket())
        .arg(&name)
        .arg("2.5")
        .env("LD_LIBRARY_PATH", &lib_dir)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    for _ in 0..2 {
        std::thread::sleep(Duration::from_millis(700));
        p2.kill9_and_restart();
    }
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("C example across 2 kill -9 of part2: {stdout}");
    assert!(
        out.status.success(),
        "{stdout}{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        p2.log()
    );
    assert!(stdout.contains("errors=0"), "{stdout}");
}
