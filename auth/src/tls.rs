//! Optional TLS (rustls through tonic) for every gRPC connection of a process: the daemons'
//! servers and every client channel (MDS, chunkservers, raft peers). One setting per process,
//! from `--tls-dir DIR` at start:
//!
//! ```text
//!  DIR/ca.pem                 the cluster's CA: servers are verified against it
//!  DIR/cert.pem, DIR/key.pem  this daemon's certificate (for the name `curve-cluster`) and key
//! ```
//!
//! Clients need only `ca.pem`. Certificates name the cluster (`curve-cluster`), not a host, so
//! addresses may change; whoever holds a certificate of the CA may serve. Without `--tls-dir`
//! connections are plaintext (one host, or a trusted network): the signatures, tickets and
//! MACs still hold, but a ticket seen on the wire may be replayed until it expires.

use std::path::Path;
use std::sync::OnceLock;
use std::time::Duration;

use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};

use crate::KeyError;

/// The name every certificate of a cluster carries and every client checks.
pub const SERVER_NAME: &str = "curve-cluster";

#[derive(Debug, Clone)]
struct Tls {
    ca: Vec<u8>,
    identity: Option<(Vec<u8>, Vec<u8>)>,
}

static TLS: OnceLock<Option<Tls>> = OnceLock::new();

fn read(path: &Path) -> Result<Vec<u8>, KeyError> {
    std::fs::read(path).map_err(|source| KeyError::Io {
        path: path.to_owned(),
        source,
    })
}

/// Sets this process's TLS from `dir` (none: plaintext). Call once, before any connection;
/// `server`: the daemon's certificate and key are required.
pub fn init(dir: Option<&Path>, server: bool) -> Result<(), KeyError> {
    let tls = match dir {
        None => None,
        Some(d) => {
            let ca = read(&d.join("ca.pem"))?;
            let (cert, key) = (d.join("cert.pem"), d.join("key.pem"));
            let identity = if server || cert.exists() {
                Some((read(&cert)?, read(&key)?))
            } else {
                None
            };
            Some(Tls { ca, identity })
        }
    };
    let _ = TLS.set(tls);
    Ok(())
}

fn get() -> Option<&'static Tls> {
    TLS.get().and_then(Option::as_ref)
}

/// Whether this process speaks TLS.
pub fn enabled() -> bool {
    get().is_some()
}

/// An endpoint for `addr` (host:port): `https` with the cluster's CA when TLS is on.
pub fn endpoint(addr: &str) -> Result<Endpoint, tonic::transport::Error> {
    match get() {
        None => Endpoint::from_shared(format!("http://{addr}")),
        Some(t) => Endpoint::from_shared(format!("https://{addr}"))?.tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(&t.ca))
                .domain_name(SERVER_NAME),
        ),
    }
}

/// A connected channel to `addr` (within `timeout`).
pub async fn connect(
    addr: &str,
    timeout: Duration,
) -> Result<tonic::transport::Channel, Box<dyn std::error::Error + Send + Sync>> {
    let ep = endpoint(addr)?.connect_timeout(timeout);
    tokio::time::timeout(timeout, ep.connect())
        .await
        .map_err(|_| "connect timed out")?
        .map_err(Into::into)
}

/// A server builder, with this daemon's certificate when TLS is on.
pub fn server() -> Result<tonic::transport::Server, tonic::transport::Error> {
    let b = tonic::transport::Server::builder();
    match get().and_then(|t| t.identity.as_ref()) {
        None => Ok(b),
        Some((cert, key)) => {
            b.tls_config(ServerTlsConfig::new().identity(Identity::from_pem(cert, key)))
        }
    }
}

/// Writes a new CA and a certificate for the cluster into `dir` (ca.pem, cert.pem, key.pem;
/// 0600 files; the CA's key is not kept: another certificate needs a new CA).
pub fn generate(dir: &Path) -> Result<(), String> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let e = |e: rcgen::Error| e.to_string();
    let ca_key = KeyPair::generate().map_err(e)?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(e)?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "Curve-rs cluster CA");
    let ca = ca_params.self_signed(&ca_key).map_err(e)?;
    let key = KeyPair::generate().map_err(e)?;
    let mut params = CertificateParams::new(vec![SERVER_NAME.to_string()]).map_err(e)?;
    params
        .distinguished_name
        .push(DnType::CommonName, SERVER_NAME);
    let cert = params.signed_by(&key, &ca, &ca_key).map_err(e)?;
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for (name, text) in [
        ("ca.pem", ca.pem()),
        ("cert.pem", cert.pem()),
        ("key.pem", key.serialize_pem()),
    ] {
        let p = dir.join(name);
        crate::write_secret_file(&p, &text).map_err(|e| format!("{}: {e}", p.display()))?;
    }
    Ok(())
}
