//! TLS for the page streams: the push page server (`crust page-server`
//! and `dump --page-server`, src/page_xfer.rs) and lazy migration's pull
//! stream (`dump --lazy-pages` and `lazy-pages --page-server`,
//! src/lazy.rs). A page stream is all of a process's secrets, so both
//! ends authenticate: TLS 1.3 (rustls, ring provider), each side
//! presenting --tls-cert and checking the other's against the CA of
//! --tls-cacert. The side that listens is the TLS server; the side that
//! connects checks that the server's certificate names the --address it
//! connected to (unless --tls-no-cn-verify).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Args;

/// `--tls` and its files, the same on both sides.
#[derive(Args, Debug, Clone, Default)]
pub struct TlsArgs {
    /// Encrypt and authenticate the page stream with TLS: each side
    /// presents --tls-cert and checks the other's against --tls-cacert.
    #[arg(long)]
    pub tls: bool,
    /// The CA certificate (PEM) the other side's certificate must be
    /// signed by.
    #[arg(long, value_name = "FILE")]
    pub tls_cacert: Option<PathBuf>,
    /// This side's certificate (PEM, chain allowed).
    #[arg(long, value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// This side's private key (PEM).
    #[arg(long, value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// Do not check that the server's certificate (the page server's, or
    /// the dump's for lazy-pages) names --address (its signature by the
    /// CA is still checked).
    #[arg(long)]
    pub tls_no_cn_verify: bool,
}

/// A connection's byte stream: plain TCP, or TLS over it.
pub trait Stream: Read + Write + Send {}
impl<T: Read + Write + Send> Stream for T {}

/// The three files of `--tls`, read and checked.
struct TlsFiles {
    roots: rustls::RootCertStore,
    certs: Vec<rustls::pki_types::CertificateDer<'static>>,
    key: rustls::pki_types::PrivateKeyDer<'static>,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl TlsFiles {
    fn load(a: &TlsArgs) -> Result<Option<TlsFiles>> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        if !a.tls {
            if a.tls_cacert.is_some()
                || a.tls_cert.is_some()
                || a.tls_key.is_some()
                || a.tls_no_cn_verify
            {
                crate::refuse!(
                    "--tls-cacert, --tls-cert, --tls-key and --tls-no-cn-verify are for --tls; add --tls, or drop them"
                );
            }
            return Ok(None);
        }
        let (Some(ca), Some(cert), Some(key)) = (&a.tls_cacert, &a.tls_cert, &a.tls_key) else {
            crate::refuse!(
                "--tls needs --tls-cacert, --tls-cert and --tls-key (PEM files): both sides authenticate each other"
            );
        };
        let read_certs = |p: &Path| -> Result<Vec<CertificateDer<'static>>> {
            let certs = CertificateDer::pem_file_iter(p)
                .and_then(|i| i.collect::<Result<Vec<_>, _>>())
                .map_err(|e| anyhow::anyhow!("reading certificates from {}: {e}", p.display()))?;
            if certs.is_empty() {
                crate::refuse!("{} holds no PEM certificate", p.display());
            }
            Ok(certs)
        };
        let mut roots = rustls::RootCertStore::empty();
        for c in read_certs(ca)? {
            roots
                .add(c)
                .with_context(|| format!("--tls-cacert {}: not a usable CA", ca.display()))?;
        }
        let certs = read_certs(cert)?;
        let key = PrivateKeyDer::from_pem_file(key)
            .map_err(|e| anyhow::anyhow!("reading the private key {}: {e}", key.display()))?;
        Ok(Some(TlsFiles { roots, certs, key }))
    }

    fn client(self, no_name_check: bool) -> Result<rustls::ClientConfig> {
        let p = provider();
        let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(self.roots),
            p.clone(),
        )
        .build()
        .context("--tls-cacert: building the certificate verifier")?;
        let builder = rustls::ClientConfig::builder_with_provider(p)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .context("setting up TLS")?;
        let builder = if no_name_check {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyName(webpki)))
        } else {
            builder.with_webpki_verifier(webpki)
        };
        builder
            .with_client_auth_cert(self.certs, self.key)
            .context("--tls-cert and --tls-key do not make a usable pair")
    }

    fn server(self) -> Result<rustls::ServerConfig> {
        let p = provider();
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(self.roots),
            p.clone(),
        )
        .build()
        .context("--tls-cacert: building the certificate verifier")?;
        rustls::ServerConfig::builder_with_provider(p)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .context("setting up TLS")?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.certs, self.key)
            .context("--tls-cert and --tls-key do not make a usable pair")
    }
}

/// `--tls-no-cn-verify`: the server's certificate must be signed by the
/// CA, whatever host it names.
#[derive(Debug)]
struct AnyName(Arc<rustls::client::WebPkiServerVerifier>);

impl rustls::client::danger::ServerCertVerifier for AnyName {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        intermediates: &[rustls::pki_types::CertificateDer<'_>],
        server_name: &rustls::pki_types::ServerName<'_>,
        ocsp: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        use rustls::CertificateError::{NotValidForName, NotValidForNameContext};
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(
                NotValidForName | NotValidForNameContext { .. },
            )) => Ok(rustls::client::danger::ServerCertVerified::assertion()),
            r => r,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// The listening side's TLS configuration, with --tls. `client` names
/// the side that connects, for the message when it is given that side's
/// option.
pub fn server_config(a: &TlsArgs, client: &str) -> Result<Option<Arc<rustls::ServerConfig>>> {
    if a.tls_no_cn_verify {
        // The other side connects from any address: this side checks no
        // name in its certificate, only the CA's signature.
        crate::refuse!(
            "--tls-no-cn-verify is {client}'s option (this side checks no name in {client}'s certificate, only the CA's signature); drop it here"
        );
    }
    TlsFiles::load(a)?
        .map(|f| f.server().map(Arc::new))
        .transpose()
}

/// The connecting side's TLS configuration, with --tls.
pub fn client_config(a: &TlsArgs) -> Result<Option<Arc<rustls::ClientConfig>>> {
    TlsFiles::load(a)?
        .map(|f| f.client(a.tls_no_cn_verify).map(Arc::new))
        .transpose()
}

/// Refuses --tls's files and --tls-no-cn-verify without --tls.
pub fn check_unused(a: &TlsArgs) -> Result<()> {
    TlsFiles::load(a).map(|_| ())
}

/// Runs the handshake to its end, so that a certificate either side
/// refuses fails here, in one line, before any frame is exchanged.
fn handshake<C, S>(mut conn: C, mut sock: TcpStream) -> std::io::Result<Box<dyn Stream>>
where
    C: std::ops::DerefMut<Target = rustls::ConnectionCommon<S>> + Send + 'static,
    S: rustls::SideData + 'static,
{
    while conn.is_handshaking() {
        conn.complete_io(&mut sock)?;
    }
    Ok(Box::new(rustls::StreamOwned::new(conn, sock)))
}

/// The stream of an accepted connection (`peer` names it in errors): TLS
/// with `config`, plain without.
pub fn accept(
    sock: TcpStream,
    config: Option<&Arc<rustls::ServerConfig>>,
    peer: &str,
) -> Result<Box<dyn Stream>> {
    let Some(config) = config else {
        return Ok(Box::new(sock));
    };
    let conn = rustls::ServerConnection::new(config.clone()).context("starting TLS")?;
    handshake(conn, sock).map_err(|e| conn_error(peer, e))
}

/// The stream of a connection made to `address` (`peer` names it in
/// errors): TLS with `config`, the server's certificate naming
/// `address`; plain without.
pub fn connect(
    sock: TcpStream,
    config: Option<&Arc<rustls::ClientConfig>>,
    address: &str,
    peer: &str,
) -> Result<Box<dyn Stream>> {
    let Some(config) = config else {
        return Ok(Box::new(sock));
    };
    let name = rustls::pki_types::ServerName::try_from(address.to_string())
        .with_context(|| format!("--address {address} is no host name for TLS"))?;
    let conn = rustls::ClientConnection::new(config.clone(), name).context("starting TLS")?;
    handshake(conn, sock).map_err(|e| conn_error(peer, e))
}

/// An I/O error on the connection with `peer`, in one line that says
/// what to look at.
pub fn conn_error(peer: &str, e: std::io::Error) -> anyhow::Error {
    use std::io::ErrorKind::*;
    match e.kind() {
        WouldBlock | TimedOut => anyhow::anyhow!("{peer} did not answer in time ({e})"),
        InvalidData => anyhow::anyhow!(
            "TLS with {peer}: {e}; each side's --tls-cert must be signed by the other's --tls-cacert"
        ),
        _ => anyhow::anyhow!("the connection with {peer} broke: {e}"),
    }
}
