//! Real NBD consumers against nebd-server exports: nbdinfo, qemu-io, nbdcopy, fio.

use std::process::Command;

use curve_tests::{Part2, require_tool, run_ok};

#[test]
fn nbdinfo_reports_the_export() {
    require_tool("nbdinfo");
    let p2 = Part2::start();
    let uri = p2.export_mem("vol0", "64M");
    assert_eq!(
        uri,
        format!("nbd+unix:///vol0?socket={}", p2.socket("vol0").display())
    );
    let out = run_ok(Command::new("nbdinfo").arg("--json").arg(&uri));
    let j: serde_json::Value = serde_json::from_str(&out).expect("nbdinfo json");
    let e = &j["exports"][0];
    assert_eq!(e["export-size"], 64 << 20);
    assert_eq!(e["block_size_minimum"], 1);
    assert_eq!(e["block_size_preferred"], 4096);
    assert_eq!(e["block_size_maximum"], 32 << 20);
    for cap in [
        "can_trim",
        "can_flush",
        "can_multi_conn",
        "can_zero",
        "can_fua",
        "can_fast_zero",
        "can_df",
    ] {
        assert_eq!(e[cap], true, "{cap}");
    }
    assert_eq!(e["is_read_only"], false);
    assert_eq!(j["structured"], true);
    assert_eq!(e["contexts"][0], "base:allocation");
    // The export list and the map go through NBD_OPT_LIST and NBD_CMD_BLOCK_STATUS.
    let list = run_ok(
        Command::new("nbdinfo")
            .arg("--list")
            .arg("--json")
            .arg(&uri),
    );
    assert!(list.contains("\"vol0\""), "{list}");
    let map = run_ok(Command::new("nbdinfo").arg("--map").arg(&uri));
    assert!(map.contains("67108864") && map.contains("data"), "{map}");
}

#[test]
fn qemu_io_patterns_across_the_export() {
    require_tool("qemu-io");
    let p2 = Part2::start();
    p2.export_mem("vol0", "64M");
    let opts = format!(
        "driver=nbd,server.type=unix,server.path={},export=vol0",
        p2.socket("vol0").display()
    );
    // Patterns at the start, across a 1 MiB stripe boundary, and at the very end.
    let cmds = [
        "write -P 0xa1 0 64k",
        "write -P 0xb2 1020k 8k",
        "write -P 0xc3 67104768 4k",
        "write -P 0xd4 -f 3M 4k", // FUA
        "write -z 8M 512k",       // WRITE_ZEROES (NO_HOLE)
        "write -z -u 8704k 512k", // WRITE_ZEROES, may punch
        "discard 4M 64k",         // TRIM
        "flush",
    ];
    let mut args = vec!["--image-opts".to_string(), opts.clone()];
    for c in cmds {
        args.push("-c".into());
        args.push(c.into());
    }
    run_ok(Command::new("qemu-io").args(&args));
    // A second, separate process reads everything back.
    let checks = [
        "read -P 0xa1 0 64k",
        "read -P 0xb2 1020k 8k",
        "read -P 0xc3 67104768 4k",
        "read -P 0xd4 3M 4k",
        "read -P 0 8M 1M",
        "read -P 0 4M 64k",
        "read -P 0 64k 956k",
    ];
    let mut args = vec!["--image-opts".to_string(), opts];
    for c in checks {
        args.push("-c".into());
        args.push(c.into());
    }
    let out = run_ok(Command::new("qemu-io").args(&args));
    assert!(!out.contains("Pattern verification failed"), "{out}");
    assert_eq!(out.matches("read ").count(), checks.len(), "{out}");
}

#[test]
fn nbdcopy_in_and_out_is_byte_identical() {
    require_tool("nbdcopy");
    let p2 = Part2::start();
    let uri = p2.export_mem("vol0", "16M");
    let src = p2.path("src.img");
    let data: Vec<u8> = (0..16u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&src, &data).unwrap();
    run_ok(Command::new("nbdcopy").arg(&src).arg(&uri));
    let dst = p2.path("dst.img");
    run_ok(Command::new("nbdcopy").arg(&uri).arg(&dst));
    let back = std::fs::read(&dst).unwrap();
    assert!(back == data, "copy-out differs from what was copied in");
    // Multi-connection copy (CAN_MULTI_CONN) gives the same bytes.
    let dst4 = p2.path("dst4.img");
    run_ok(
        Command::new("nbdcopy")
            .args(["--connections=4", "--requests=16"])
            .arg(&uri)
            .arg(&dst4),
    );
    assert!(std::fs::read(&dst4).unwrap() == data);
}

fn fio_verify(uri: &str, extra: &[&str]) -> String {
    run_ok(
        Command::new("fio")
            .args([
                "--name=verify",
                "--ioengine=nbd",
                &format!("--uri={uri}"),
                "--rw=randwrite",
                "--bs=4k",
                "--size=32M",
                "--iodepth=16",
                "--verify=crc32c",
                "--do_verify=1",
                "--verify_fatal=1",
                "--verify_state_save=0",
                "--output-format=json",
            ])
            .args(extra),
    )
}

#[test]
fn fio_verifies_crc32c_over_unix_and_tcp() {
    require_tool("fio");
    let p2 = Part2::start();
    let uri = p2.export_mem("vol0", "64M");
    let out = fio_verify(&uri, &[]);
    assert!(out.contains("\"error\" : 0"), "{out}");
    // TCP on loopback, port chosen free by binding first.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let uri = p2
        .curve_ok(&[
            "export",
            "add",
            "--volume",
            "mem:64M",
            "--nbd",
            &format!("tcp:127.0.0.1:{port}"),
            "--name",
            "tcpvol",
        ])
        .trim()
        .to_owned();
    assert_eq!(uri, format!("nbd://127.0.0.1:{port}/tcpvol"));
    let out = fio_verify(&uri, &["--bs=64k", "--iodepth=4"]);
    assert!(out.contains("\"error\" : 0"), "{out}");
}

#[test]
fn many_clients_at_once() {
    require_tool("fio");
    require_tool("qemu-io");
    let p2 = Part2::start();
    let uri = p2.export_mem("vol0", "64M");
    // Four fio processes write and verify disjoint quarters concurrently.
    let children: Vec<_> = (0..4)
        .map(|i| {
            Command::new("fio")
                .args([
                    "--name=part",
                    "--ioengine=nbd",
                    &format!("--uri={uri}"),
                    "--rw=randwrite",
                    "--bs=4k",
                    &format!("--offset={}M", i * 16),
                    "--size=16M",
                    "--iodepth=8",
                    "--verify=crc32c",
                    "--do_verify=1",
                    "--verify_fatal=1",
                    "--verify_state_save=0",
                ])
                .output()
                .unwrap()
        })
        .collect();
    for out in children {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    let listing = p2.curve_ok(&["export", "list", "--format", "json"]);
    let j: serde_json::Value = serde_json::from_str(&listing).unwrap();
    assert_eq!(j[0]["name"], "vol0");
    assert_eq!(j[0]["connections"], 0);
}

#[test]
fn read_only_export_refuses_writes() {
    require_tool("qemu-io");
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
    let opts = format!(
        "driver=nbd,server.type=unix,server.path={},export=ro",
        sock.display()
    );
    let out = Command::new("qemu-io")
        .args(["-r", "--image-opts", &opts, "-c", "read -P 0 0 4k"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new("qemu-io")
        .args(["--image-opts", &opts, "-c", "write -P 1 0 4k"])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // qemu sees NBD_FLAG_READ_ONLY and refuses to open the export writable.
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("Permission denied") || text.contains("read-only"),
        "{text}"
    );
    let list = p2.curve_ok(&["export", "list"]);
    assert!(list.lines().nth(1).unwrap().contains(" ro "), "{list}");
}

#[test]
fn file_volume_roundtrip_and_block_status() {
    require_tool("qemu-io");
    require_tool("nbdinfo");
    let p2 = Part2::start();
    let img = p2.path("vol.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(32 << 20)
        .unwrap();
    let sock = p2.path("file.sock");
    let uri = p2
        .curve_ok(&[
            "export",
            "add",
            "--volume",
            &format!("file:{}", img.display()),
            "--nbd",
            &format!("unix:{}", sock.display()),
            "--name",
            "filevol",
        ])
        .trim()
        .to_owned();
    let opts = format!(
        "driver=nbd,server.type=unix,server.path={},export=filevol",
        sock.display()
    );
    run_ok(Command::new("qemu-io").args([
        "--image-opts",
        &opts,
        "-c",
        "write -P 0x5a 1M 1M",
        "-c",
        "flush",
    ]));
    // The data is in the file itself.
    let bytes = std::fs::read(&img).unwrap();
    assert!(bytes[1 << 20..2 << 20].iter().all(|&b| b == 0x5a));
    assert!(bytes[..1 << 20].iter().all(|&b| b == 0));
    // Holes are reported as holes, data as data.
    let map = run_ok(Command::new("nbdinfo").arg("--map").arg(&uri));
    assert!(map.contains("hole,zero") && map.contains("data"), "{map}");
}
