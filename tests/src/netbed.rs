//! A multi-host fault bed on one machine: each "host" is a network namespace with its own
//! address on a private /24, all joined by a bridge that the test process (in the root
//! namespace) is on too. Daemons run in a host with `ip netns exec`; a host is partitioned by
//! taking its link down (both directions, as a pulled cable), and healed by bringing it up.
//! A host can also lose packets (nftables drops a share of what it sends and receives, at
//! random) or sit behind a slow link (a token bucket on both ends of its link: bandwidth, and
//! the queueing delay of a congested link), or behind a delay line (every frame held a fixed
//! time each way: this kernel has no netem, so the frames go through this process,
//! [`crate::wire`]).
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
    /// Delay lines in place, by host.
    wires: parking_lot::Mutex<std::collections::HashMap<usize, crate::wire::Wire>>,
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
            wires: Default::default(),
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

    /// Host `i` drops `percent` of the packets it sends and of those it receives, at random
    /// (nftables, Debian's `nftables`), until [`NetBed::clear`].
    pub fn loss(&self, i: usize, percent: u32) {
        let ns = &self.hosts[i].ns;
        let nft = |rule: &str| {
            let out = Command::new("ip")
                .args(["netns", "exec", ns, "nft", rule])
                .output()
                .expect("nft (Debian's nftables)");
            assert!(
                out.status.success(),
                "nft {rule}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        nft("add table inet curvebed");
        for (chain, hook) in [("in", "input"), ("out", "output")] {
            nft(&format!(
                "add chain inet curvebed {chain} {{ type filter hook {hook} priority 0; }}"
            ));
            nft(&format!(
                "add rule inet curvebed {chain} numgen random mod 100 < {percent} drop"
            ));
        }
    }

    /// Host `i`'s link carries `rate` (tc's syntax: `8mbit`) each way, with a queue of up to
    /// `latency` (`200ms`) behind it, until [`NetBed::clear`].
    pub fn slow(&self, i: usize, rate: &str, latency: &str) {
        let tbf = [
            "root", "tbf", "rate", rate, "burst", "32kb", "latency", latency,
        ];
        let mut root = vec!["qdisc", "replace", "dev", &self.hosts[i].link];
        root.extend(tbf);
        tc(None, &root);
        let inner = self.inner_link(i);
        let mut host = vec!["qdisc", "replace", "dev", &inner];
        host.extend(tbf);
        tc(Some(&self.hosts[i].ns), &host);
    }

    /// Every frame host `i` sends or receives is held `delay` on its way (a delay line in this
    /// process takes the place of its link's bridge port), until [`NetBed::clear`].
    pub fn delay(&self, i: usize, delay: std::time::Duration) {
        let mut wires = self.wires.lock();
        assert!(!wires.contains_key(&i), "host {i} has a delay line already");
        let link = &self.hosts[i].link;
        let tap = link.replacen('r', "d", 1);
        ip(&["link", "set", link, "nomaster"]);
        wires.insert(i, crate::wire::Wire::start(link, &tap, delay));
        ip(&["link", "set", &tap, "master", &self.bridge]);
        ip(&["link", "set", &tap, "up"]);
    }

    /// Undoes [`NetBed::loss`], [`NetBed::slow`] and [`NetBed::delay`] on host `i`.
    pub fn clear(&self, i: usize) {
        if let Some(wire) = self.wires.lock().remove(&i) {
            drop(wire); // its TAP device goes with it
            ip(&["link", "set", &self.hosts[i].link, "master", &self.bridge]);
        }
        let ns = &self.hosts[i].ns;
        let _ = Command::new("ip")
            .args(["netns", "exec", ns, "nft", "delete table inet curvebed"])
            .output();
        let _ = Command::new("tc")
            .args(["qdisc", "del", "dev", &self.hosts[i].link, "root"])
            .output();
        let _ = Command::new("ip")
            .args(["netns", "exec", ns, "tc", "qdisc", "del", "dev"])
            .arg(self.inner_link(i))
            .arg("root")
            .output();
    }

    /// The host's end of its link.
    fn inner_link(&self, i: usize) -> String {
        // The root end is `<tag>r<h>`, the host's `<tag>n<h>`.
        let l = &self.hosts[i].link;
        let at = l.rfind('r').expect("link name");
        format!("{}n{}", &l[..at], &l[at + 1..])
    }
}

fn tc(ns: Option<&str>, args: &[&str]) {
    let mut c = match ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, "tc"]);
            c
        }
        None => Command::new("tc"),
    };
    let out = c.args(args).output().expect("tc (iproute2)");
    assert!(
        out.status.success(),
        "tc {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Drop for NetBed {
    fn drop(&mut self) {
        self.wires.lock().clear();
        for h in &self.hosts {
            let _ = Command::new("ip").args(["netns", "del", &h.ns]).status();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .status();
    }
}
