//! A multi-host fault bed on one machine: each "host" is a network namespace with its own
//! address on a private /24, all joined by a bridge that the test process (in the root
//! namespace) is on too. Daemons run in a host with `ip netns exec`; a host is partitioned by
//! taking its link down (both directions, as a pulled cable), and healed by bringing it up.
//! Traffic stays in namespaces this bed created (the rules of these machines), and everything
//! is deleted when the bed is dropped, even after a failed test.

use std::process::Command;

/// One host of the bed.
#[derive(Debug, Clone)]
pub struct Host {
    /// Its network namespace.
    pub ns: String,
    /// Its address.
    pub ip: String,
    /// The root-namespace end of its link (down: partitioned).
    link: String,
}

/// Hosts in network namespaces on a private bridge.
#[derive(Debug)]
pub struct NetBed {
    /// The hosts.
    pub hosts: Vec<Host>,
    bridge: String,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("ip (iproute2)");
    assert!(
        out.status.success(),
        "ip {}: {} (the netns bed needs root, as CI runs)",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl NetBed {
    /// `n` hosts on a fresh /24 (chosen from this process's id, so that tests running at once
    /// do not collide).
    pub fn new(n: usize) -> Self {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let k = std::process::id() % 1000 * 10
            + NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 10;
        let tag = format!("cv{k}");
        let subnet = format!("10.{}.{}", 100 + k / 256 % 100, k % 256);
        let bridge = format!("{tag}br");
        let mut bed = NetBed {
            hosts: Vec::new(),
            bridge: bridge.clone(),
        };
        ip(&["link", "add", &bridge, "type", "bridge"]);
        ip(&["addr", "add", &format!("{subnet}.254/24"), "dev", &bridge]);
        ip(&["link", "set", &bridge, "up"]);
        for h in 1..=n {
            let ns = format!("{tag}h{h}");
            let (root_end, ns_end) = (format!("{tag}r{h}"), format!("{tag}n{h}"));
            let addr = format!("{subnet}.{h}");
            ip(&["netns", "add", &ns]);
            bed.hosts.push(Host {
                ns: ns.clone(),
                ip: addr.clone(),
                link: root_end.clone(),
            });
            ip(&[
                "link", "add", &root_end, "type", "veth", "peer", "name", &ns_end,
            ]);
            ip(&["link", "set", &ns_end, "netns", &ns]);
            ip(&["link", "set", &root_end, "master", &bridge]);
            ip(&["link", "set", &root_end, "up"]);
            for args in [
                vec!["link", "set", "lo", "up"],
                vec!["addr", "add", &format!("{addr}/24"), "dev", &ns_end],
                vec!["link", "set", &ns_end, "up"],
            ] {
                let mut a = vec!["netns", "exec", &ns, "ip"];
                a.extend(args);
                ip(&a);
            }
        }
        bed
    }

    /// `program` to run in host `i` (0-based).
    pub fn command(&self, i: usize, program: &std::path::Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.hosts[i].ns]).arg(program);
        c
    }

    /// Cuts host `i` off from every other (and from the test).
    pub fn partition(&self, i: usize) {
        ip(&["link", "set", &self.hosts[i].link, "down"]);
    }

    /// Connects host `i` again.
    pub fn heal(&self, i: usize) {
        ip(&["link", "set", &self.hosts[i].link, "up"]);
    }
}

impl Drop for NetBed {
    fn drop(&mut self) {
        for h in &self.hosts {
            let _ = Command::new("ip").args(["netns", "del", &h.ns]).status();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .status();
    }
}
