//! Every parser of what an attacker sends: a user's credential header, a cluster credential
//! header, a ticket, a grant; and the key files an operator edits. None may panic, and none
//! may accept what the keys did not make.
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;

static RING: LazyLock<curve_auth::Keyring> = LazyLock::new(curve_auth::Keyring::generate);

fuzz_target!(|data: &[u8]| {
    let ring = &*RING;
    let now = curve_auth::now_ms();
    if let Ok(t) = curve_auth::Ticket::open(data, ring, now) {
        panic!("a forged ticket opened: {t:?}");
    }
    assert!(curve_auth::check_grant(data, ring, 1, 1).is_err());
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok(c) = curve_auth::Credential::parse(s) {
            assert!(c.verify(&[7; 32], "StatFile", b"", now).is_err());
        }
        assert!(curve_auth::verify_peer(ring, Some(s), "Heartbeat", b"", now).is_err());
        let _ = curve_auth::Keyring::parse(s);
        let _ = curve_auth::UserKey::parse(s);
    }
});
