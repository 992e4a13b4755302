//! Fixed-newstyle option negotiation as a pure state machine.
//!
//! The server reads one option at a time and hands it to [`Negotiation::handle`], which
//! appends the reply bytes to a buffer and says what happens next ([`Outcome`]). No I/O
//! happens here, so every answer the protocol prescribes is unit-tested and fuzzed.

use crate::proto::{self, NbdOption, info, opt, rep};

/// What negotiation needs to know about an export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportSummary {
    /// Canonical name.
    pub name: String,
    /// Free-form description (may be empty).
    pub description: String,
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags, without NBD_FLAG_SEND_DF (added when structured replies are on).
    pub flags: u16,
    /// Minimum block size.
    pub min_block: u32,
    /// Preferred block size.
    pub preferred_block: u32,
    /// Maximum block size.
    pub max_block: u32,
    /// Why no new connection may start transmission now (the export or the server is at its
    /// connection limit): NBD_OPT_GO is answered NBD_REP_ERR_POLICY with this message.
    pub refused: Option<String>,
}

/// The set of exports a listener offers.
pub trait Exports {
    /// The handle the server keeps for an export chosen by the client.
    type Export;
    /// Looks an export up by the name a client sent.
    fn find(&self, name: &str) -> Option<(Self::Export, ExportSummary)>;
    /// Names and descriptions, for NBD_OPT_LIST.
    fn list(&self) -> Vec<(String, String)>;
}

/// Context id of `base:allocation` on every connection.
pub const BASE_ALLOCATION_ID: u32 = 1;

/// What the client ends negotiation with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmission<E> {
    /// The export to serve.
    pub export: E,
    /// Its summary.
    pub summary: ExportSummary,
    /// Structured replies were negotiated.
    pub structured: bool,
    /// `base:allocation` was selected (its context id is [`BASE_ALLOCATION_ID`]).
    pub base_allocation: bool,
}

/// What the server does after answering an option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome<E> {
    /// Read the next option.
    Continue,
    /// Write the reply and enter transmission.
    Transmit(Transmission<E>),
    /// Write the reply (if any) and close the connection.
    Close,
}

/// Negotiation state of one connection.
#[derive(Debug, Default, Clone)]
pub struct Negotiation {
    no_zeroes: bool,
    structured: bool,
    /// Export the selected meta contexts were set for, and whether base:allocation is among them.
    meta: Option<(String, bool)>,
}

impl Negotiation {
    /// Starts negotiation with the flags the client answered the greeting with.
    pub fn new(client_flags: u32) -> Self {
        Negotiation {
            no_zeroes: client_flags & proto::CLIENT_NO_ZEROES != 0,
            ..Default::default()
        }
    }

    /// Answers one option: appends the reply to `out` and says what comes next.
    pub fn handle<X: Exports>(
        &mut self,
        option: u32,
        data: &[u8],
        exports: &X,
        out: &mut Vec<u8>,
    ) -> Outcome<X::Export> {
        let parsed = match proto::parse_option(option, data) {
            Ok(p) => p,
            // No way to answer NBD_OPT_EXPORT_NAME with an error: the spec says close.
            Err(_) if option == opt::EXPORT_NAME => return Outcome::Close,
            Err(e) => {
                error(out, option, rep::ERR_INVALID, &e.to_string());
                return Outcome::Continue;
            }
        };
        match parsed {
            NbdOption::ExportName(name) => match exports.find(&name) {
                // The old style has no error reply: the connection is closed.
                Some((_, summary)) if summary.refused.is_some() => Outcome::Close,
                Some((export, summary)) => {
                    let flags = self.flags(&summary);
                    out.extend_from_slice(&summary.size.to_be_bytes());
                    out.extend_from_slice(&flags.to_be_bytes());
                    if !self.no_zeroes {
                        out.extend_from_slice(&[0u8; 124]);
                    }
                    Outcome::Transmit(self.transmission(export, summary))
                }
                None => Outcome::Close,
            },
            NbdOption::Abort => {
                proto::encode_option_reply(out, option, rep::ACK, &[]);
                Outcome::Close
            }
            NbdOption::List => {
                for (name, description) in exports.list() {
                    let mut d = (name.len() as u32).to_be_bytes().to_vec();
                    d.extend_from_slice(name.as_bytes());
                    d.extend_from_slice(description.as_bytes());
                    proto::encode_option_reply(out, option, rep::SERVER, &d);
                }
                proto::encode_option_reply(out, option, rep::ACK, &[]);
                Outcome::Continue
            }
            NbdOption::StartTls => {
                error(out, option, rep::ERR_UNSUP, "TLS is not supported");
                Outcome::Continue
            }
            NbdOption::StructuredReply => {
                self.structured = true;
                proto::encode_option_reply(out, option, rep::ACK, &[]);
                Outcome::Continue
            }
            NbdOption::Info { go, name, requests } => {
                let Some((export, summary)) = exports.find(&name) else {
                    error(
                        out,
                        option,
                        rep::ERR_UNKNOWN,
                        &format!("no export named {name:?}"),
                    );
                    return Outcome::Continue;
                };
                if go && let Some(why) = &summary.refused {
                    error(out, option, rep::ERR_POLICY, why);
                    return Outcome::Continue;
                }
                // A client that does not ask for block sizes assumes a minimum of 1.
                if go && summary.min_block > 1 && !requests.contains(&info::BLOCK_SIZE) {
                    error(
                        out,
                        option,
                        rep::ERR_BLOCK_SIZE_REQD,
                        "this export needs aligned requests: ask for NBD_INFO_BLOCK_SIZE",
                    );
                    return Outcome::Continue;
                }
                let mut d = info::EXPORT.to_be_bytes().to_vec();
                d.extend_from_slice(&summary.size.to_be_bytes());
                d.extend_from_slice(&self.flags(&summary).to_be_bytes());
                proto::encode_option_reply(out, option, rep::INFO, &d);
                if requests.contains(&info::NAME) {
                    let mut d = info::NAME.to_be_bytes().to_vec();
                    d.extend_from_slice(summary.name.as_bytes());
                    proto::encode_option_reply(out, option, rep::INFO, &d);
                }
                if requests.contains(&info::DESCRIPTION) && !summary.description.is_empty() {
                    let mut d = info::DESCRIPTION.to_be_bytes().to_vec();
                    d.extend_from_slice(summary.description.as_bytes());
                    proto::encode_option_reply(out, option, rep::INFO, &d);
                }
                let mut d = info::BLOCK_SIZE.to_be_bytes().to_vec();
                d.extend_from_slice(&summary.min_block.to_be_bytes());
                d.extend_from_slice(&summary.preferred_block.to_be_bytes());
                d.extend_from_slice(&summary.max_block.to_be_bytes());
                proto::encode_option_reply(out, option, rep::INFO, &d);
                proto::encode_option_reply(out, option, rep::ACK, &[]);
                if go {
                    Outcome::Transmit(self.transmission(export, summary))
                } else {
                    Outcome::Continue
                }
            }
            NbdOption::MetaContext {
                set,
                export,
                queries,
            } => {
                if !self.structured {
                    error(
                        out,
                        option,
                        rep::ERR_INVALID,
                        "negotiate structured replies first",
                    );
                    return Outcome::Continue;
                }
                let Some((_, summary)) = exports.find(&export) else {
                    error(
                        out,
                        option,
                        rep::ERR_UNKNOWN,
                        &format!("no export named {export:?}"),
                    );
                    return Outcome::Continue;
                };
                let matches = |q: &String| {
                    q == proto::BASE_ALLOCATION || (!set && (q == "base:" || q == "base:*"))
                };
                let selected = if set {
                    queries.iter().any(matches)
                } else {
                    queries.is_empty() || queries.iter().any(matches)
                };
                if selected {
                    let id = if set { BASE_ALLOCATION_ID } else { 0 };
                    let mut d = id.to_be_bytes().to_vec();
                    d.extend_from_slice(proto::BASE_ALLOCATION.as_bytes());
                    proto::encode_option_reply(out, option, rep::META_CONTEXT, &d);
                }
                if set {
                    self.meta = Some((summary.name, selected));
                }
                proto::encode_option_reply(out, option, rep::ACK, &[]);
                Outcome::Continue
            }
            NbdOption::Unknown(code) => {
                error(out, code, rep::ERR_UNSUP, "option not supported");
                Outcome::Continue
            }
        }
    }

    fn flags(&self, summary: &ExportSummary) -> u16 {
        if self.structured {
            summary.flags | proto::tflag::SEND_DF
        } else {
            summary.flags
        }
    }

    fn transmission<E>(&self, export: E, summary: ExportSummary) -> Transmission<E> {
        let base_allocation =
            matches!(&self.meta, Some((name, true)) if *name == summary.name) && self.structured;
        Transmission {
            export,
            summary,
            structured: self.structured,
            base_allocation,
        }
    }
}

fn error(out: &mut Vec<u8>, option: u32, kind: u32, message: &str) {
    proto::encode_option_reply(out, option, kind, message.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    struct One;
    impl Exports for One {
        type Export = u8;
        fn find(&self, name: &str) -> Option<(u8, ExportSummary)> {
            (name == "vol" || name.is_empty()).then(|| {
                (
                    7,
                    ExportSummary {
                        name: "vol".into(),
                        description: "a volume".into(),
                        size: 1 << 20,
                        flags: proto::tflag::HAS_FLAGS,
                        min_block: 1,
                        preferred_block: 4096,
                        max_block: 1 << 25,
                        refused: None,
                    },
                )
            })
        }
        fn list(&self) -> Vec<(String, String)> {
            vec![("vol".into(), "a volume".into())]
        }
    }

    /// Splits option replies into (option, type, data).
    fn replies(mut b: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
        let mut v = Vec::new();
        while !b.is_empty() {
            assert_eq!(
                u64::from_be_bytes(b[..8].try_into().unwrap()),
                proto::OPTION_REPLY_MAGIC
            );
            let o = u32::from_be_bytes(b[8..12].try_into().unwrap());
            let t = u32::from_be_bytes(b[12..16].try_into().unwrap());
            let l = u32::from_be_bytes(b[16..20].try_into().unwrap()) as usize;
            v.push((o, t, b[20..20 + l].to_vec()));
            b = &b[20 + l..];
        }
        v
    }

    fn go(name: &str) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&1u16.to_be_bytes());
        d.extend_from_slice(&info::NAME.to_be_bytes());
        d
    }

    fn meta(name: &str, q: &str) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&1u32.to_be_bytes());
        d.extend_from_slice(&(q.len() as u32).to_be_bytes());
        d.extend_from_slice(q.as_bytes());
        d
    }

    #[test]
    fn go_with_structured_and_meta() {
        let mut n = Negotiation::new(proto::CLIENT_FIXED_NEWSTYLE | proto::CLIENT_NO_ZEROES);
        let mut out = Vec::new();
        // Meta contexts before structured replies: invalid.
        let o = n.handle(
            opt::SET_META_CONTEXT,
            &meta("vol", proto::BASE_ALLOCATION),
            &One,
            &mut out,
        );
        assert_eq!(o, Outcome::Continue);
        assert_eq!(replies(&out)[0].1, rep::ERR_INVALID);
        out.clear();
        assert_eq!(
            n.handle(opt::STRUCTURED_REPLY, &[], &One, &mut out),
            Outcome::Continue
        );
        n.handle(
            opt::SET_META_CONTEXT,
            &meta("vol", proto::BASE_ALLOCATION),
            &One,
            &mut out,
        );
        let r = replies(&out);
        assert_eq!(r[1].1, rep::META_CONTEXT);
        assert_eq!(&r[1].2[..4], &BASE_ALLOCATION_ID.to_be_bytes());
        assert_eq!(r[2].1, rep::ACK);
        out.clear();
        let Outcome::Transmit(t) = n.handle(opt::GO, &go("vol"), &One, &mut out) else {
            panic!("GO must start transmission")
        };
        assert_eq!(t.export, 7);
        assert!(t.structured && t.base_allocation);
        let r = replies(&out);
        let types: Vec<u16> = r[..r.len() - 1]
            .iter()
            .map(|x| u16::from_be_bytes([x.2[0], x.2[1]]))
            .collect();
        assert_eq!(types, vec![info::EXPORT, info::NAME, info::BLOCK_SIZE]);
        let flags = u16::from_be_bytes(r[0].2[10..12].try_into().unwrap());
        assert_ne!(flags & proto::tflag::SEND_DF, 0);
        assert_eq!(r.last().unwrap().1, rep::ACK);
    }

    /// An export at its connection limit.
    struct Full;
    impl Exports for Full {
        type Export = u8;
        fn find(&self, name: &str) -> Option<(u8, ExportSummary)> {
            One.find(name).map(|(e, s)| {
                (
                    e,
                    ExportSummary {
                        refused: Some("export \"vol\" has 64 connections, its limit".into()),
                        ..s
                    },
                )
            })
        }
        fn list(&self) -> Vec<(String, String)> {
            One.list()
        }
    }

    /// A connection past the limit is refused with NBD_REP_ERR_POLICY and the reason (GO), or
    /// closed (the old-style EXPORT_NAME has no error reply); INFO still answers.
    #[test]
    fn an_export_at_its_connection_limit_refuses_go_with_the_reason() {
        let mut n = Negotiation::new(proto::CLIENT_FIXED_NEWSTYLE);
        let mut out = Vec::new();
        assert_eq!(
            n.handle(opt::GO, &go("vol"), &Full, &mut out),
            Outcome::Continue
        );
        let r = replies(&out);
        assert_eq!(r[0].1, rep::ERR_POLICY);
        assert!(String::from_utf8_lossy(&r[0].2).contains("its limit"));
        out.clear();
        assert_eq!(
            n.handle(opt::INFO, &go("vol"), &Full, &mut out),
            Outcome::Continue
        );
        assert_eq!(replies(&out).last().unwrap().1, rep::ACK);
        out.clear();
        assert_eq!(
            n.handle(opt::EXPORT_NAME, b"vol", &Full, &mut out),
            Outcome::Close
        );
    }

    #[test]
    fn unknown_names_and_options() {
        let mut n = Negotiation::new(0);
        let mut out = Vec::new();
        assert_eq!(
            n.handle(opt::GO, &go("nope"), &One, &mut out),
            Outcome::Continue
        );
        assert_eq!(replies(&out)[0].1, rep::ERR_UNKNOWN);
        out.clear();
        assert_eq!(
            n.handle(opt::GO, &[1, 2], &One, &mut out),
            Outcome::Continue
        );
        assert_eq!(replies(&out)[0].1, rep::ERR_INVALID);
        out.clear();
        assert_eq!(n.handle(4242, &[], &One, &mut out), Outcome::Continue);
        assert_eq!(replies(&out)[0].1, rep::ERR_UNSUP);
        out.clear();
        assert_eq!(
            n.handle(opt::STARTTLS, &[], &One, &mut out),
            Outcome::Continue
        );
        assert_eq!(replies(&out)[0].1, rep::ERR_UNSUP);
        out.clear();
        assert_eq!(n.handle(opt::LIST, &[1], &One, &mut out), Outcome::Continue);
        assert_eq!(replies(&out)[0].1, rep::ERR_INVALID);
        out.clear();
        assert_eq!(
            n.handle(opt::EXPORT_NAME, b"nope", &One, &mut out),
            Outcome::Close
        );
        assert_eq!(n.handle(opt::ABORT, &[], &One, &mut out), Outcome::Close);
        assert_eq!(replies(&out)[0].1, rep::ACK);
    }

    /// An export whose requests must be 4 KiB aligned.
    struct Aligned;
    impl Exports for Aligned {
        type Export = u8;
        fn find(&self, name: &str) -> Option<(u8, ExportSummary)> {
            One.find(name).map(|(e, s)| {
                (
                    e,
                    ExportSummary {
                        min_block: 4096,
                        ..s
                    },
                )
            })
        }
        fn list(&self) -> Vec<(String, String)> {
            One.list()
        }
    }

    #[test]
    fn block_size_constraints_must_be_asked_for() {
        let mut n = Negotiation::new(0);
        let mut out = Vec::new();
        let mut d = 3u32.to_be_bytes().to_vec();
        d.extend_from_slice(b"vol");
        d.extend_from_slice(&0u16.to_be_bytes());
        assert_eq!(n.handle(opt::GO, &d, &Aligned, &mut out), Outcome::Continue);
        assert_eq!(replies(&out)[0].1, rep::ERR_BLOCK_SIZE_REQD);
        out.clear();
        let d = go("vol"); // asks for NAME only
        assert_eq!(n.handle(opt::GO, &d, &Aligned, &mut out), Outcome::Continue);
        let mut d = 3u32.to_be_bytes().to_vec();
        d.extend_from_slice(b"vol");
        d.extend_from_slice(&1u16.to_be_bytes());
        d.extend_from_slice(&info::BLOCK_SIZE.to_be_bytes());
        out.clear();
        assert!(matches!(
            n.handle(opt::GO, &d, &Aligned, &mut out),
            Outcome::Transmit(_)
        ));
    }

    #[test]
    fn list_and_export_name() {
        let mut n = Negotiation::new(0);
        let mut out = Vec::new();
        n.handle(opt::LIST, &[], &One, &mut out);
        let r = replies(&out);
        assert_eq!(r[0].1, rep::SERVER);
        assert_eq!(&r[0].2[4..7], b"vol");
        assert_eq!(r[1].1, rep::ACK);
        out.clear();
        let Outcome::Transmit(t) = n.handle(opt::EXPORT_NAME, b"vol", &One, &mut out) else {
            panic!()
        };
        assert!(!t.structured && !t.base_allocation);
        // size + flags + 124 zeroes (the client did not ask for NO_ZEROES)
        assert_eq!(out.len(), 8 + 2 + 124);
    }
}
