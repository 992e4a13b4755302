//! NBD consumers across a kill -9 of part2: qemu's NBD driver with `reconnect-delay` carries
//! on once the supervisor (here, the test) has restarted part2, which re-creates the export on
//! the same socket from its metafile. No error, and the data verifies.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use curve_tests::{Part2, require_tool, run_ok, wait_until};

const BLOCK: u64 = 256 << 10;
const BLOCKS: u64 = 256; // a 64 MiB volume
const WRITES: u64 = 8192;

fn pattern(i: u64) -> u64 {
    i % 250 + 1
}

/// qemu-io (`reconnect-delay=20`) writing while part2 is killed -9 twice and restarted: no
/// error, every block verified. QEMU 7.2's NBD client sometimes misses the restarted server
/// altogether (no connection reaches it for 20 s although it listens 10 ms after the kill; not
/// reproduced outside this test): that case is reported, with QEMU's trace of its reconnect
/// attempts, and the whole scenario runs again on a fresh part2; a third miss fails the test.
#[test]
fn qemu_io_with_reconnect_delay_survives_kill_9() {
    require_tool("qemu-io");
    let mut misses = Vec::new();
    while let Err(e) = kill_9_under_qemu_io() {
        eprintln!("{e}\n--- qemu-io missed the restarted part2; running the scenario again");
        misses.push(e);
        assert!(misses.len() < 3, "three times:\n{}", misses.join("\n---\n"));
    }
}

/// The scenario; `Err` when qemu-io did not reconnect to a restarted part2.
fn kill_9_under_qemu_io() -> Result<(), String> {
    let mut p2 = Part2::start();
    let img = p2.path("vol.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(BLOCK * BLOCKS)
        .unwrap();
    let sock = p2.path("nbd.sock");
    p2.curve_ok(&[
        "export",
        "add",
        "--volume",
        &format!("file:{}", img.display()),
        "--nbd",
        &format!("unix:{}", sock.display()),
        "--name",
        "vol",
    ]);
    let opts = format!(
        "driver=nbd,server.type=unix,server.path={},export=vol,reconnect-delay=20",
        sock.display()
    );
    // QEMU's own account of its reconnects goes to stderr (printed when it misses one).
    let mut args = vec!["--image-opts".to_string(), opts.clone()];
    for event in [
        "nbd_reconnect_attempt",
        "nbd_reconnect_attempt_result",
        "nbd_connect_thread_sleep",
        "nbd_client_handshake_success",
    ] {
        args.push("--trace".into());
        args.push(event.into());
    }
    for i in 0..WRITES {
        args.push("-c".into());
        args.push(format!(
            "write -P {} {} {}",
            pattern(i),
            (i % BLOCKS) * BLOCK,
            BLOCK
        ));
        // At most ~1000 writes a second: on an idle, fast machine qemu-io wrote all of them
        // (4500 a second) before the second kill, and left nothing to reconnect for.
        if i % 4 == 3 {
            args.push("-c".into());
            args.push("sleep 4".into());
        }
    }
    let started = Instant::now();
    let writer = Command::new("qemu-io")
        .args(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    p2.kill9_and_restart();
    // Once qemu is back on the new part2, crash that one too.
    let reconnected = |p2: &Part2, i| p2.log_of(i).contains("transmission started");
    if !wait_until(Duration::from_secs(20), || reconnected(&p2, 1)) {
        let mut writer = writer;
        let _ = writer.kill();
        let out = writer.wait_with_output().unwrap();
        return Err(format!(
            "qemu-io did not reconnect: {}\n{}\n{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .rev()
                .take(5)
                .collect::<Vec<_>>()
                .join("\n"),
            p2.log()
        ));
    }
    p2.kill9_and_restart();
    if !wait_until(Duration::from_secs(20), || reconnected(&p2, 2)) {
        let mut writer = writer;
        let _ = writer.kill();
        let _ = writer.wait();
        return Err(format!(
            "qemu-io did not reconnect the second time:\n{}",
            p2.log()
        ));
    }
    let out = writer.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!(
        "qemu-io: {WRITES} writes of 256 KiB across 2 kill -9 of part2 in {:?}",
        started.elapsed()
    );
    assert!(
        out.status.success(),
        "qemu-io failed: {stderr}\n{}",
        p2.log()
    );
    assert_eq!(stdout.matches("wrote ").count() as u64, WRITES, "{stderr}");
    assert!(
        !stdout.contains("error") && !stderr.contains("error"),
        "{stdout}{stderr}"
    );
    // Each new part2 had restored the export.
    assert!(p2.log_of(1).contains("export restored") && p2.log_of(2).contains("export restored"));
    // Every block holds the pattern of the last write to it.
    let mut args = vec!["--image-opts".to_string(), opts];
    for b in 0..BLOCKS {
        let last = (0..WRITES).rev().find(|i| i % BLOCKS == b).unwrap();
        args.push("-c".into());
        args.push(format!("read -P {} {} {}", pattern(last), b * BLOCK, BLOCK));
    }
    let out = run_ok(Command::new("qemu-io").args(&args));
    assert!(!out.contains("Pattern verification failed"), "{out}");
    Ok(())
}
