//! What every Curve-rs daemon sets up about its process before anything else.

/// Files and directories the process creates are its owner's only (0600, 0700): volume data,
/// raft logs, metadata, identities (sockets meant for consumers are widened explicitly); and
/// its open-file limit is raised from the soft limit to the hard one, so that a daemon with
/// many connections, chunk files and log segments does not run out of descriptors at the
/// default 1024. Returns the limit now in force.
pub fn daemon_setup() -> u64 {
    // SAFETY: umask only changes this process's file creation mask.
    unsafe { libc::umask(0o077) };
    raise_nofile()
}

/// Raises RLIMIT_NOFILE's soft limit to its hard limit; the limit in force after.
pub fn raise_nofile() -> u64 {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a pointer to a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) != 0 {
            return 0;
        }
        if l.rlim_cur < l.rlim_max {
            let want = libc::rlimit {
                rlim_cur: l.rlim_max,
                rlim_max: l.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                return want.rlim_cur;
            }
        }
    }
    l.rlim_cur
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_soft_limit_reaches_the_hard_one() {
        let now = super::raise_nofile();
        let mut l = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit with a pointer to a local struct.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) }, 0);
        assert_eq!(now, l.rlim_cur);
        assert_eq!(l.rlim_cur, l.rlim_max);
    }
}
