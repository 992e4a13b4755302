//! Live upgrade of a part2 inside a Linux guest (QEMU, TCG) serving kernel devices: a kernel
//! NBD device (`--nbd-device`) and a ublk device, each under O_DIRECT writers, while
//! `curve upgrade` runs twice (the second time to a copy of the binary). The vhost-user-blk
//! case (QEMU on the host) is in `guest_vhost_user.rs`.

use std::time::Duration;

use curve_tests::guest::{Guest, GuestRun, GuestSpec, guest_dir};

/// `key=value` fields of the result line of `op`.
fn fields(run: &GuestRun, op: &str) -> std::collections::BTreeMap<String, String> {
    let line = run
        .result_line(op)
        .unwrap_or_else(|| panic!("no {op} result:\n{}", run.console));
    line.split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

#[test]
fn guest_nbd_and_ublk_devices_across_two_live_upgrades() {
    let dir = guest_dir();
    let guest = Guest::boot(
        dir.path(),
        &GuestSpec::new("upgrade_devices")
            .param("jobs", 2)
            .param("mib", 4)
            .param("secs", 12)
            .part2(),
    );
    let run = guest
        .finish(Duration::from_secs(300))
        .unwrap_or_else(|e| panic!("{e}"));
    run.assert_ok();
    let r = run.results();
    assert_eq!(
        r["devices_before"], "/dev/nbd0,/dev/ublkb0",
        "{}",
        run.console
    );
    assert_eq!(
        r["devices_after"], "/dev/nbd0,/dev/ublkb0",
        "the same devices after the upgrades"
    );
    assert_ne!(
        r["pid_before"], r["pid_after"],
        "another process serves now"
    );
    assert_eq!(
        r["nbd_taken_over"], "2",
        "the NBD device's sockets were handed over twice"
    );
    assert_eq!(
        r["ublk_recovered"], "2",
        "the ublk device was recovered after each upgrade"
    );
    for dev in ["k", "u"] {
        let w = fields(&run, &format!("{dev}-writers"));
        assert_eq!(w["errors"], "0", "{}", run.console);
        let v = fields(&run, &format!("{dev}-writers-verify"));
        assert_eq!((v["errors"].as_str(), v["mismatches"].as_str()), ("0", "0"));
        assert!(
            v["passes"]
                .split(',')
                .all(|n| n.parse::<u32>().is_ok_and(|n| n >= 2)),
            "{dev}: every writer wrote across the upgrades: {:?}",
            v["passes"]
        );
        assert_eq!(
            run.md5(&format!("{dev}-writers")),
            run.md5(&format!("{dev}-file")),
            "{dev}: the device reads what the volume holds"
        );
    }
    assert_eq!(r["dmesg"], "clean", "{}", run.console);
    let kernel = run.lines("CURVE-KERNEL").join("\n");
    assert!(
        !kernel.contains("Receive control failed") && !kernel.contains("reconnected socket"),
        "the kernel's NBD sockets never broke:\n{kernel}"
    );
    let upgrades = run.lines("CURVE-UPGRADE");
    assert_eq!(upgrades.len(), 2, "{}", run.console);
    let mut pauses = Vec::new();
    for u in &upgrades {
        let json = u.trim_start_matches("CURVE-UPGRADE").trim();
        let v: serde_json::Value =
            serde_json::from_str(json).unwrap_or_else(|e| panic!("{json}: {e}"));
        assert_eq!(v["exports"], 2, "{v}");
        assert_eq!(v["connections"], 2, "the NBD device's two sockets: {v}");
        pauses.push(v["pause_us"].as_f64().unwrap() / 1000.0);
    }
    println!(
        "kernel NBD + ublk across two live upgrades (TCG): part2 paused {:.1} ms, {:.1} ms; \
         longest guest write: nbd {:.1} ms, ublk {:.1} ms\n{}\n{}",
        pauses[0],
        pauses[1],
        fields(&run, "k-writers-latency")["max_us"]
            .parse::<f64>()
            .unwrap()
            / 1000.0,
        fields(&run, "u-writers-latency")["max_us"]
            .parse::<f64>()
            .unwrap()
            / 1000.0,
        run.lines("CURVE-PART2").join("\n"),
        kernel
    );
}
