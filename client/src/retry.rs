//! The retry policy of one chunk request, as the seed's client gives it: what to do after each
//! attempt, as a value — pure (no I/O, no clock), so every rule is unit-tested; the volume's
//! send loop carries the actions out.
//!
//! ```text
//!  attempt outcome                      action
//!  SUCCESS (or CHUNK_NOTEXIST, a read)  done
//!  REDIRECTED to a new leader           resend there at once (after a short pause past 3 tries:
//!                                       peers naming each other in an election must not spin)
//!  REDIRECTED, no leader named          wait ~50 ms, ask the peers who leads
//!  OVERLOAD                             back off exponentially with jitter (1 ms .. 100 ms)
//!  COPYSET_NOTEXIST                     wait 50 ms, ask the MDS where the copyset is, then
//!                                       the peers who leads
//!  EPOCH_TOO_OLD                        resend if our own reopen raised the epoch since the
//!                                       request was built; otherwise fenced: fail
//!  NOSPACE, INVALID_REQUEST             fail
//!  DISK_FAIL, CRC_FAIL, BACKWARD        retry, fail after 20 attempts
//!  anything else                        back off (10 ms .. 500 ms), warn every 50 attempts;
//!                                       from the 3rd, ask the peers who leads (a peer that
//!                                       keeps failing is not asked forever)
//!  transport error                      ask the peers who leads, back off (1 ms .. 200 ms)
//!  timeout                              ask who leads; from the 3rd, double the timeout
//!                                       (1 s .. 16 s)
//!  no address known                     wait 100 ms, ask the MDS
//! ```

use std::time::Duration;

use curve_proto::chunk::ChunkStatus;

/// Failed attempts on one peer after which the others are asked who leads.
pub const KEEPS_FAILING: u32 = 3;
/// Attempts after which persistent disk-side failures are reported.
pub const MAX_DISK_FAILURES: u32 = 20;
/// Attempts with fresh credentials before a refusal of them is reported.
pub const MAX_AUTH_RETRIES: u32 = 4;

/// How one attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The chunkserver answered with a status (and, for REDIRECTED, maybe the leader).
    Answered {
        /// Its status.
        status: ChunkStatus,
        /// The leader it names, if any.
        redirect: Option<String>,
    },
    /// The RPC failed (connection refused, reset, ...).
    Transport,
    /// No answer within the attempt's timeout.
    TimedOut,
    /// No address of the copyset is known.
    NoAddress,
}

/// What went wrong, when the request fails for good.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// A newer writer holds the volume.
    Fenced,
    /// The chunkservers are out of space.
    NoSpace,
    /// The request itself is wrong.
    Invalid,
    /// The chunkserver refused the credentials (no valid ticket or grant: a cluster with
    /// auth on and a client without a key, or keys that do not match).
    Unauthorized,
    /// A persistent chunkserver failure (status code).
    Status(i32),
}

/// Where the next attempt goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// The same leader, as it is.
    Resend,
    /// This leader (named by a redirect).
    Leader(String),
    /// Whoever the peers say leads.
    FindLeader,
    /// The MDS's route of the copyset.
    RefreshRoute,
    /// The MDS's route, then who leads.
    RefreshRouteAndFindLeader,
    /// A fresh ticket and a fresh grant of the chunk from the MDS, then the same leader.
    RenewCredentials,
}

/// What to do after an attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// The request is done (with its answer).
    Done,
    /// A read of a chunk never written: zeros.
    Missing,
    /// Give up.
    Fail(Failure),
    /// Wait `wait` (jitter already applied), then go to `next`.
    Retry {
        /// Pause before the next attempt.
        wait: Duration,
        /// Where the next attempt goes.
        next: Next,
    },
}

/// The state of one request's retries.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    attempts: u32,
    timeouts: u32,
    timeout: Duration,
    backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 0,
            timeouts: 0,
            timeout: Duration::from_secs(1),
            backoff: Duration::from_millis(1),
        }
    }
}

impl RetryPolicy {
    /// Timeout of the next attempt.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Attempts so far.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// Whether the failures so far deserve a warning (every 50th attempt).
    pub fn worth_a_warning(&self) -> bool {
        self.attempts.is_multiple_of(50)
    }

    /// Decides after an attempt. `write`: the request writes. `sent_epoch`/`epoch_now`: the
    /// epoch the attempt carried and the volume's epoch now. `jitter` maps a pause to the
    /// one to take (a random factor in production, identity in tests).
    pub fn next(
        &mut self,
        outcome: &Outcome,
        write: bool,
        sent_epoch: u64,
        epoch_now: u64,
        jitter: impl Fn(Duration) -> Duration,
    ) -> Action {
        self.attempts += 1;
        let ms = Duration::from_millis;
        match outcome {
            Outcome::NoAddress => Action::Retry {
                wait: ms(100),
                next: Next::RefreshRoute,
            },
            Outcome::Transport => {
                let wait = jitter(self.backoff);
                self.backoff = (self.backoff * 2).min(ms(200));
                Action::Retry {
                    wait,
                    next: Next::FindLeader,
                }
            }
            Outcome::TimedOut => {
                // The first timeouts are a stopped or cut-off leader more often than a slow
                // one: ask who leads now, at the same timeout; only then wait longer.
                self.timeouts += 1;
                if self.timeouts > 2 {
                    self.timeout = (self.timeout * 2).min(Duration::from_secs(16));
                }
                Action::Retry {
                    wait: Duration::ZERO,
                    next: Next::FindLeader,
                }
            }
            Outcome::Answered { status, redirect } => self.answered(
                *status,
                redirect.as_deref(),
                write,
                sent_epoch,
                epoch_now,
                jitter,
            ),
        }
    }

    fn answered(
        &mut self,
        status: ChunkStatus,
        redirect: Option<&str>,
        write: bool,
        sent_epoch: u64,
        epoch_now: u64,
        jitter: impl Fn(Duration) -> Duration,
    ) -> Action {
        let ms = Duration::from_millis;
        match status {
            ChunkStatus::Success => Action::Done,
            ChunkStatus::ChunkNotexist if !write => Action::Missing,
            ChunkStatus::Redirected => {
                // Peers naming each other during an election: do not spin.
                let pause = if self.attempts > 3 {
                    jitter(ms(10))
                } else {
                    Duration::ZERO
                };
                match redirect.filter(|l| !l.is_empty()) {
                    Some(l) => Action::Retry {
                        wait: pause,
                        next: Next::Leader(l.to_owned()),
                    },
                    // No leader yet (an election): wait a little, ask around.
                    None => Action::Retry {
                        wait: pause + jitter(ms(50)),
                        next: Next::FindLeader,
                    },
                }
            }
            ChunkStatus::Overload => {
                let wait = jitter(self.backoff);
                self.backoff = (self.backoff * 2).min(ms(100));
                Action::Retry {
                    wait,
                    next: Next::Resend,
                }
            }
            // The copyset moved (recovery, balance): ask the MDS where it is now.
            ChunkStatus::CopysetNotexist => Action::Retry {
                wait: ms(50),
                next: Next::RefreshRouteAndFindLeader,
            },
            // Our own reopen raised the epoch after this request was built: send it again.
            ChunkStatus::EpochTooOld if epoch_now > sent_epoch => Action::Retry {
                wait: Duration::ZERO,
                next: Next::Resend,
            },
            ChunkStatus::EpochTooOld => Action::Fail(Failure::Fenced),
            // Refused credentials: the cluster key may have rotated under a cached grant or
            // ticket. Fresh ones from the MDS, a few times; then it is for real.
            ChunkStatus::AuthFailed if self.attempts <= MAX_AUTH_RETRIES => {
                let wait = jitter(self.backoff.max(ms(100)));
                self.backoff = (self.backoff * 2).min(ms(500));
                Action::Retry {
                    wait,
                    next: Next::RenewCredentials,
                }
            }
            ChunkStatus::AuthFailed => Action::Fail(Failure::Unauthorized),
            // The ticket ran out (a long pause, an MDS away): renew it, then send again.
            ChunkStatus::TicketExpired => {
                let wait = if self.attempts > 1 {
                    jitter(self.backoff.max(ms(50)))
                } else {
                    Duration::ZERO
                };
                self.backoff = (self.backoff * 2).min(ms(500));
                Action::Retry {
                    wait,
                    next: Next::RenewCredentials,
                }
            }
            ChunkStatus::Nospace => Action::Fail(Failure::NoSpace),
            ChunkStatus::InvalidRequest => Action::Fail(Failure::Invalid),
            ChunkStatus::DiskFail | ChunkStatus::CrcFail | ChunkStatus::Backward
                if self.attempts >= MAX_DISK_FAILURES =>
            {
                Action::Fail(Failure::Status(status as i32))
            }
            // A peer that keeps failing (a raft stopped on a full or failing disk may still
            // think it leads) is not asked forever: after a few tries, the others are asked
            // who leads (then the MDS).
            _ => {
                let wait = jitter(self.backoff.max(ms(10)));
                self.backoff = (self.backoff * 2).min(ms(500));
                Action::Retry {
                    wait,
                    next: if self.attempts >= KEEPS_FAILING {
                        Next::FindLeader
                    } else {
                        Next::Resend
                    },
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn same(d: Duration) -> Duration {
        d
    }

    fn answered(status: ChunkStatus) -> Outcome {
        Outcome::Answered {
            status,
            redirect: None,
        }
    }

    fn wait_of(a: Action) -> Duration {
        match a {
            Action::Retry { wait, .. } => wait,
            other => panic!("not a retry: {other:?}"),
        }
    }

    /// A peer answering FAILURE_UNKNOWN again and again (its raft stopped on a full disk,
    /// still believing it leads) is resent to twice, then the others are asked who leads.
    #[test]
    fn a_peer_that_keeps_failing_is_not_asked_forever() {
        let mut p = RetryPolicy::default();
        let next = |p: &mut RetryPolicy| match p.next(
            &answered(ChunkStatus::FailureUnknown),
            true,
            1,
            1,
            same,
        ) {
            Action::Retry { next, .. } => next,
            other => panic!("not a retry: {other:?}"),
        };
        assert_eq!(next(&mut p), Next::Resend);
        assert_eq!(next(&mut p), Next::Resend);
        for _ in 0..10 {
            assert_eq!(next(&mut p), Next::FindLeader);
        }
    }

    #[test]
    fn success_and_missing_chunks() {
        let mut p = RetryPolicy::default();
        assert_eq!(
            p.next(&answered(ChunkStatus::Success), true, 1, 1, same),
            Action::Done
        );
        let mut p = RetryPolicy::default();
        assert_eq!(
            p.next(&answered(ChunkStatus::ChunkNotexist), false, 1, 1, same),
            Action::Missing,
            "a read of a chunk never written is zeros"
        );
        // A write of a missing chunk is not "missing": it is retried.
        assert!(matches!(
            p.next(&answered(ChunkStatus::ChunkNotexist), true, 1, 1, same),
            Action::Retry { .. }
        ));
    }

    #[test]
    fn overload_backs_off_exponentially_up_to_100_ms() {
        let mut p = RetryPolicy::default();
        let waits: Vec<u128> = (0..10)
            .map(|_| {
                wait_of(p.next(&answered(ChunkStatus::Overload), true, 1, 1, same)).as_millis()
            })
            .collect();
        assert_eq!(waits, vec![1, 2, 4, 8, 16, 32, 64, 100, 100, 100]);
        assert_eq!(p.attempts(), 10);
    }

    #[test]
    fn timeouts_double_from_the_third_up_to_16_s_and_ask_who_leads() {
        let mut p = RetryPolicy::default();
        assert_eq!(p.timeout(), Duration::from_secs(1));
        for want in [1, 1, 2, 4, 8, 16, 16] {
            assert_eq!(
                p.next(&Outcome::TimedOut, true, 1, 1, same),
                Action::Retry {
                    wait: Duration::ZERO,
                    next: Next::FindLeader
                }
            );
            assert_eq!(p.timeout(), Duration::from_secs(want));
        }
    }

    #[test]
    fn redirects_follow_the_named_leader_and_pause_only_when_spinning() {
        let mut p = RetryPolicy::default();
        let to = |l: &str| Outcome::Answered {
            status: ChunkStatus::Redirected,
            redirect: Some(l.into()),
        };
        for _ in 0..3 {
            assert_eq!(
                p.next(&to("b:1"), true, 1, 1, same),
                Action::Retry {
                    wait: Duration::ZERO,
                    next: Next::Leader("b:1".into())
                }
            );
        }
        assert_eq!(
            wait_of(p.next(&to("a:1"), true, 1, 1, same)),
            Duration::from_millis(10),
            "the fourth redirect in a row pauses"
        );
        let mut p = RetryPolicy::default();
        assert_eq!(
            p.next(
                &Outcome::Answered {
                    status: ChunkStatus::Redirected,
                    redirect: Some(String::new())
                },
                true,
                1,
                1,
                same
            ),
            Action::Retry {
                wait: Duration::from_millis(50),
                next: Next::FindLeader
            },
            "no leader named: an election; ask around"
        );
    }

    #[test]
    fn epochs_resend_after_our_reopen_and_fail_when_fenced() {
        let mut p = RetryPolicy::default();
        assert_eq!(
            p.next(&answered(ChunkStatus::EpochTooOld), true, 3, 4, same),
            Action::Retry {
                wait: Duration::ZERO,
                next: Next::Resend
            }
        );
        assert_eq!(
            p.next(&answered(ChunkStatus::EpochTooOld), true, 4, 4, same),
            Action::Fail(Failure::Fenced)
        );
    }

    #[test]
    fn hard_failures_fail_and_disk_failures_after_20_attempts() {
        let mut p = RetryPolicy::default();
        assert_eq!(
            p.next(&answered(ChunkStatus::Nospace), true, 1, 1, same),
            Action::Fail(Failure::NoSpace)
        );
        assert_eq!(
            p.next(&answered(ChunkStatus::InvalidRequest), false, 1, 1, same),
            Action::Fail(Failure::Invalid)
        );
        let mut p = RetryPolicy::default();
        for _ in 1..MAX_DISK_FAILURES {
            assert!(matches!(
                p.next(&answered(ChunkStatus::DiskFail), true, 1, 1, same),
                Action::Retry {
                    next: Next::Resend | Next::FindLeader,
                    ..
                }
            ));
        }
        assert_eq!(
            p.next(&answered(ChunkStatus::DiskFail), true, 1, 1, same),
            Action::Fail(Failure::Status(ChunkStatus::DiskFail as i32))
        );
    }

    #[test]
    fn moved_copysets_transport_errors_and_unknown_routes() {
        let mut p = RetryPolicy::default();
        assert_eq!(
            p.next(&answered(ChunkStatus::CopysetNotexist), true, 1, 1, same),
            Action::Retry {
                wait: Duration::from_millis(50),
                next: Next::RefreshRouteAndFindLeader
            }
        );
        let waits: Vec<u128> = (0..9)
            .map(|_| wait_of(p.next(&Outcome::Transport, true, 1, 1, same)).as_millis())
            .collect();
        assert_eq!(waits, vec![1, 2, 4, 8, 16, 32, 64, 128, 200]);
        assert_eq!(
            p.next(&Outcome::NoAddress, false, 1, 1, same),
            Action::Retry {
                wait: Duration::from_millis(100),
                next: Next::RefreshRoute
            }
        );
        // Anything else: at least 10 ms, up to 500 ms.
        let mut p = RetryPolicy::default();
        let waits: Vec<u128> = (0..8)
            .map(|_| {
                wait_of(p.next(&answered(ChunkStatus::FailureUnknown), true, 1, 1, same))
                    .as_millis()
            })
            .collect();
        assert_eq!(waits, vec![10, 10, 10, 10, 16, 32, 64, 128]);
        // jitter is applied to every pause it is given.
        let mut p = RetryPolicy::default();
        assert_eq!(
            wait_of(p.next(&answered(ChunkStatus::Overload), true, 1, 1, |d| d / 2)),
            Duration::from_micros(500)
        );
    }

    #[test]
    fn an_expired_ticket_is_renewed_and_a_refused_one_fails() {
        let mut p = RetryPolicy::default();
        assert_eq!(
            p.next(&answered(ChunkStatus::TicketExpired), true, 1, 1, same),
            Action::Retry {
                wait: Duration::ZERO,
                next: Next::RenewCredentials
            }
        );
        assert!(matches!(
            p.next(&answered(ChunkStatus::TicketExpired), true, 1, 1, same),
            Action::Retry { next: Next::RenewCredentials, wait } if !wait.is_zero()
        ));
        let mut p = RetryPolicy::default();
        for _ in 0..MAX_AUTH_RETRIES {
            assert!(matches!(
                p.next(&answered(ChunkStatus::AuthFailed), false, 1, 1, same),
                Action::Retry {
                    next: Next::RenewCredentials,
                    ..
                }
            ));
        }
        assert_eq!(
            p.next(&answered(ChunkStatus::AuthFailed), false, 1, 1, same),
            Action::Fail(Failure::Unauthorized)
        );
    }
}
