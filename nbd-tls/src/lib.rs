//! TLS below the NBD stream, sans-IO, for both of nbd-rs's roles: the
//! session consumes and produces ciphertext in memory, and
//! [`TlsTransport`] moves it to and from the transport below (the
//! socket), so the session never blocks and never sees a descriptor; to
//! an I/O loop TLS is one more [`Transport`]. The backend is OpenSSL.
//! X.509 uses a certificates directory laid out as libnbd and nbdkit read
//! it (ca-cert.pem; client-cert.pem and client-key.pem for a client,
//! server-cert.pem and server-key.pem for a server; ca-crl.pem), or the
//! system's trust; PSK uses a psktool file.

#![forbid(unsafe_code)]

use nbd_io::{Interest, Recv, Transport, TransportError};
use nbd_proto::errno::{EINVAL, EIO};
use openssl::ssl::{
    ErrorCode, Ssl, SslContext, SslContextBuilder, SslFiletype, SslMethod, SslStream, SslVerifyMode, SslVersion,
};
use openssl::x509::store::X509Lookup;
use openssl::x509::verify::X509VerifyFlags;
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};

/// A TLS failure: the errno it is reported with (0 for none, as libnbd
/// reports a failed handshake) and what failed, in words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsError {
    pub errno: i32,
    pub msg: String,
}

impl TlsError {
    pub fn new(errno: i32, msg: impl Into<String>) -> Self {
        TlsError { errno, msg: msg.into() }
    }
}

pub type TlsResult<T> = Result<T, TlsError>;

/// The C library's text for `errno` (std's io::Error carries it, with
/// " (os error N)" after it).
pub fn strerror(errno: i32) -> String {
    let text = std::io::Error::from_raw_os_error(errno).to_string();
    match text.strip_suffix(&format!(" (os error {errno})")) {
        Some(t) => t.to_owned(),
        None => text,
    }
}

fn io_text(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(errno) => strerror(errno),
        None => e.to_string(),
    }
}

/// What a TLS layer offers the I/O loop, in the core's own shape: bytes
/// from the socket are received into `recv_buffer` and reported with
/// `handle_received`; bytes for the socket come out of `pending_ciphertext`
/// and are reported sent with `consume_ciphertext`.
pub trait TlsLayer: Send {
    /// Room for ciphertext straight from the socket.
    fn recv_buffer(&mut self) -> &mut [u8];
    fn handle_received(&mut self, n: usize);
    fn pending_ciphertext(&self) -> &[u8];
    fn consume_ciphertext(&mut self, n: usize);
    /// Advances the handshake: `Ok(true)` once it is complete.
    fn handshake(&mut self) -> TlsResult<bool>;
    /// Decrypts into `buf`.
    fn read_plain(&mut self, buf: &mut [u8]) -> TlsResult<Plain>;
    /// Encrypts as much of `data` as the layer takes; returns how much.
    fn write_plain(&mut self, data: &[u8]) -> TlsResult<usize>;
    /// Whether decrypted bytes or undecrypted records wait inside the
    /// layer, so that reading needs no new bytes from the socket.
    fn has_buffered_input(&self) -> bool;
    /// Bytes received from the socket and not yet decrypted.
    fn buffered_ciphertext(&self) -> usize;
    /// Who is at the other end, for messages: "server" in a client's
    /// session, "client" in a server's.
    fn peer(&self) -> &'static str;
    /// The session's parameters in words, for the debug line once the
    /// handshake is done.
    fn describe(&self) -> String;
}

/// The result of a decrypting read.
pub enum Plain {
    Data(usize),
    /// More ciphertext is needed.
    NeedMore,
    /// The peer closed the TLS session.
    Closed,
}

/// The handle's TLS settings, as `nbd_set_tls_*` and URIs give them.
#[derive(Debug, Clone)]
pub struct TlsSettings {
    pub certificates: Option<PathBuf>,
    pub psk_file: Option<PathBuf>,
    pub username: Option<String>,
    pub verify_peer: bool,
}

impl Default for TlsSettings {
    fn default() -> Self {
        TlsSettings { certificates: None, psk_file: None, username: None, verify_peer: true }
    }
}

/// Where libnbd looks for certificates when none were set, in order.
fn default_certificate_dirs() -> Vec<PathBuf> {
    if rustix::process::geteuid().is_root() {
        vec!["/etc/pki/libnbd".into()]
    } else {
        let Some(home) = std::env::var_os("HOME").map(PathBuf::from) else { return Vec::new() };
        vec![home.join(".pki/libnbd"), home.join(".config/pki/libnbd")]
    }
}

/// The CA file the server's certificate is checked against, if one of
/// `dirs` has a readable `ca-cert.pem` (the first); otherwise what was
/// missing, in words, for the message a failed verification gives.
fn find_ca(dirs: &[PathBuf], given: bool) -> Result<PathBuf, String> {
    let mut missing = Vec::new();
    for d in dirs {
        let ca = d.join("ca-cert.pem");
        match std::fs::File::open(&ca) {
            Ok(_) => return Ok(ca),
            Err(e) => {
                let why = strerror(e.raw_os_error().unwrap_or(EIO));
                let gone = if d.is_dir() { "" } else { " (the directory does not exist)" };
                missing.push(format!("{}: {why}{gone}", ca.display()));
            }
        }
    }
    let whose = if given { "the tls-certificates directory" } else { "the default directories" };
    Err(match missing.is_empty() {
        true => "no CA certificate: no certificates directory was set and $HOME is not set".into(),
        false => format!("no CA certificate in {whose}: {}", missing.join(", ")),
    })
}

/// The key for `username` in a psktool file (`user:hexkey` per line).
fn psk_key(file: &Path, username: &str) -> TlsResult<Vec<u8>> {
    let text = read_psk_file(file)?;
    let line = text.lines().filter_map(|l| l.split_once(':')).find(|(user, _)| *user == username).ok_or_else(|| {
        TlsError::new(EINVAL, format!("{}: username {username} was not found in PSK file", file.display()))
    })?;
    unhex(line.1)
        .ok_or_else(|| TlsError::new(EINVAL, format!("{}: the key of '{username}' is not hexadecimal", file.display())))
}

/// Every user's key in a psktool file, for a server.
fn psk_keys(file: &Path) -> TlsResult<HashMap<String, Vec<u8>>> {
    let text = read_psk_file(file)?;
    let mut keys = HashMap::new();
    for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let bad = || TlsError::new(EINVAL, format!("{}:{}: not user:hexkey", file.display(), n + 1));
        let (user, hex) = line.split_once(':').ok_or_else(bad)?;
        keys.insert(user.to_owned(), unhex(hex).ok_or_else(bad)?);
    }
    Ok(keys)
}

fn read_psk_file(file: &Path) -> TlsResult<String> {
    std::fs::read_to_string(file)
        .map_err(|e| TlsError::new(e.raw_os_error().unwrap_or(EIO), format!("open: {}", file.display())))
}

/// A key in hexadecimal; `None` if it is not.
fn unhex(hex: &str) -> Option<Vec<u8>> {
    let hex = hex.trim();
    if hex.len() % 2 != 0 || hex.is_empty() {
        return None;
    }
    (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok()).collect()
}

/// A server's TLS credentials, as nbdkit takes them.
#[derive(Debug, Clone)]
pub enum ServerCredentials {
    /// A directory holding server-cert.pem and server-key.pem; with
    /// `verify_peer`, clients must present a certificate signed by its
    /// ca-cert.pem.
    X509 { dir: PathBuf, verify_peer: bool },
    /// A psktool file: each user in it connects with its key.
    Psk { file: PathBuf },
}

/// A server's TLS context, made once: each connection that asks for TLS
/// gets a session of it.
pub struct ServerTls {
    ctx: SslContext,
}

impl ServerTls {
    pub fn new(creds: &ServerCredentials) -> TlsResult<Self> {
        let tls_err = |what: &str, e: openssl::error::ErrorStack| TlsError::new(EIO, format!("{what}: {e}"));
        let mut ctx = SslContextBuilder::new(SslMethod::tls_server()).map_err(|e| tls_err("TLS context", e))?;
        ctx.set_min_proto_version(Some(SslVersion::TLS1_2)).map_err(|e| tls_err("TLS context", e))?;
        match creds {
            ServerCredentials::Psk { file } => {
                let keys = psk_keys(file)?;
                ctx.set_psk_server_callback(move |_ssl, identity, psk| {
                    let key = identity.and_then(|id| std::str::from_utf8(id).ok()).and_then(|id| keys.get(id));
                    match key {
                        Some(k) if k.len() <= psk.len() => {
                            psk[..k.len()].copy_from_slice(k);
                            Ok(k.len())
                        }
                        // An unknown user: the handshake fails.
                        _ => Ok(0),
                    }
                });
                ctx.set_cipher_list("PSK:ECDHE-PSK:DHE-PSK:@SECLEVEL=0").map_err(|e| tls_err("PSK ciphers", e))?;
                ctx.set_verify(SslVerifyMode::NONE);
            }
            ServerCredentials::X509 { dir, verify_peer } => {
                let (cert, key) = (dir.join("server-cert.pem"), dir.join("server-key.pem"));
                ctx.set_certificate_chain_file(&cert).map_err(|e| tls_err(&cert.display().to_string(), e))?;
                ctx.set_private_key_file(&key, SslFiletype::PEM).map_err(|e| tls_err(&key.display().to_string(), e))?;
                if *verify_peer {
                    let ca = dir.join("ca-cert.pem");
                    ctx.set_ca_file(&ca).map_err(|e| tls_err(&ca.display().to_string(), e))?;
                    load_crl(&mut ctx, dir)?;
                    ctx.set_verify(SslVerifyMode::PEER | SslVerifyMode::FAIL_IF_NO_PEER_CERT);
                } else {
                    ctx.set_verify(SslVerifyMode::NONE);
                }
            }
        }
        Ok(ServerTls { ctx: ctx.build() })
    }

    /// A session for one connection, waiting for the client's hello.
    pub fn session(&self) -> TlsResult<OpensslTls> {
        let tls_err = |e: openssl::error::ErrorStack| TlsError::new(EIO, format!("TLS session: {e}"));
        let mut ssl = Ssl::new(&self.ctx).map_err(tls_err)?;
        ssl.set_accept_state();
        let stream = SslStream::new(ssl, Pipe::default()).map_err(tls_err)?;
        Ok(OpensslTls { stream, checked_against: String::new(), peer: "client" })
    }
}

/// Ciphertext received per socket read, at most.
const RECV_CHUNK: usize = 64 * 1024;

/// The in-memory transport under the OpenSSL session. Received ciphertext
/// sits in `incoming[start..end]`; the buffer is reused, never shrunk.
#[derive(Default)]
struct Pipe {
    incoming: Vec<u8>,
    start: usize,
    end: usize,
    outgoing: Vec<u8>,
}

impl Pipe {
    fn recv_buffer(&mut self) -> &mut [u8] {
        if self.incoming.len() - self.end < RECV_CHUNK {
            self.incoming.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
            if self.incoming.len() - self.end < RECV_CHUNK {
                self.incoming.resize(self.end + RECV_CHUNK, 0);
            }
        }
        &mut self.incoming[self.end..]
    }
}

impl Read for Pipe {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let avail = &self.incoming[self.start..self.end];
        if avail.is_empty() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = avail.len().min(buf.len());
        buf[..n].copy_from_slice(&avail[..n]);
        self.start += n;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        Ok(n)
    }
}

impl Write for Pipe {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.outgoing.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Ciphertext waiting for the socket beyond which no more plaintext is
/// taken: the socket is the bottleneck, and memory stays bounded.
const MAX_PENDING_CIPHERTEXT: usize = 1 << 20;

/// The certificates directory's revocation list (ca-crl.pem), if it has
/// one: peers' certificates are then checked against it.
fn load_crl(ctx: &mut SslContextBuilder, dir: &Path) -> TlsResult<()> {
    let crl = dir.join("ca-crl.pem");
    if !crl.exists() {
        return Ok(());
    }
    let name = crl.display().to_string();
    if crl.to_str().is_none() {
        return Err(TlsError::new(EINVAL, format!("{name}: the path is not UTF-8")));
    }
    let store = ctx.cert_store_mut();
    store
        .add_lookup(X509Lookup::file())
        .and_then(|l| l.load_crl_file(&crl, SslFiletype::PEM))
        .and_then(|_| store.set_flags(X509VerifyFlags::CRL_CHECK))
        .map_err(|e| TlsError::new(EIO, format!("{name}: {e}")))
}

/// Received ciphertext a transport holds undecrypted before it stops
/// reading the socket: several maximal records.
const FILL_MAX: usize = 256 * 1024;

pub struct OpensslTls {
    stream: SslStream<Pipe>,
    /// What the server's certificate is checked against, and what was
    /// missing, for the message a failed verification gives.
    checked_against: String,
    /// "server" or "client": the other end.
    peer: &'static str,
}

impl OpensslTls {
    /// A client session for `hostname` (checked against the certificate
    /// when verifying, if known).
    pub fn client(settings: &TlsSettings, hostname: Option<&str>) -> TlsResult<Self> {
        let tls_err = |what: &str, e: openssl::error::ErrorStack| TlsError::new(EIO, format!("{what}: {e}"));
        let mut checked_against = String::new();
        let mut ctx = SslContextBuilder::new(SslMethod::tls_client()).map_err(|e| tls_err("TLS context", e))?;
        ctx.set_min_proto_version(Some(SslVersion::TLS1_2)).map_err(|e| tls_err("TLS context", e))?;
        if let Some(file) = &settings.psk_file {
            // The caller finds the local user's name when none was set.
            let user = settings.username.clone().ok_or_else(|| TlsError::new(EINVAL, "PSK: no username"))?;
            let key = psk_key(file, &user)?;
            ctx.set_psk_client_callback(move |_ssl, _hint, identity, psk| {
                let id = user.as_bytes();
                if id.len() >= identity.len() || key.len() > psk.len() {
                    return Ok(0);
                }
                identity[..id.len()].copy_from_slice(id);
                identity[id.len()] = 0;
                psk[..key.len()].copy_from_slice(&key);
                Ok(key.len())
            });
            // PSK needs no certificates; TLS 1.2 PSK suites for older servers.
            ctx.set_cipher_list("PSK:ECDHE-PSK:DHE-PSK:@SECLEVEL=0").map_err(|e| tls_err("PSK ciphers", e))?;
            ctx.set_verify(SslVerifyMode::NONE);
        } else {
            let dirs = match &settings.certificates {
                Some(d) => vec![d.clone()],
                None => default_certificate_dirs(),
            };
            let found = find_ca(&dirs, settings.certificates.is_some());
            // The directory the client files come from: the one given, or
            // the default one that has the CA.
            let dir = settings
                .certificates
                .clone()
                .or_else(|| found.as_ref().ok().and_then(|ca| ca.parent()).map(Into::into));
            let dir = dir.as_deref();
            match &found {
                Ok(ca) => {
                    ctx.set_ca_file(ca).map_err(|e| tls_err(&ca.display().to_string(), e))?;
                    checked_against = format!("the server's certificate was checked against {}", ca.display());
                }
                Err(missing) => {
                    ctx.set_default_verify_paths().map_err(|e| tls_err("system trust", e))?;
                    checked_against =
                        format!("{missing}, so the server's certificate was checked against the system's trusted CAs");
                }
            }
            if let Some(d) = dir {
                load_crl(&mut ctx, d)?;
            }
            if let Some(d) = dir {
                let (cert, key) = (d.join("client-cert.pem"), d.join("client-key.pem"));
                if cert.exists() && key.exists() {
                    ctx.set_certificate_chain_file(&cert).map_err(|e| tls_err(&cert.display().to_string(), e))?;
                    ctx.set_private_key_file(&key, SslFiletype::PEM)
                        .map_err(|e| tls_err(&key.display().to_string(), e))?;
                }
            }
            ctx.set_verify(if settings.verify_peer { SslVerifyMode::PEER } else { SslVerifyMode::NONE });
        }
        let ctx = ctx.build();
        let mut ssl = Ssl::new(&ctx).map_err(|e| tls_err("TLS session", e))?;
        if let (Some(host), true, None) = (hostname, settings.verify_peer, &settings.psk_file) {
            let param = ssl.param_mut();
            let checked = match host.parse::<std::net::IpAddr>() {
                Ok(ip) => param.set_ip(ip),
                Err(_) => param.set_host(host),
            };
            checked.map_err(|e| tls_err("TLS host name", e))?;
            if host.parse::<std::net::IpAddr>().is_err() {
                ssl.set_hostname(host).map_err(|e| tls_err("TLS server name", e))?;
            }
        }
        ssl.set_connect_state();
        let stream = SslStream::new(ssl, Pipe::default()).map_err(|e| tls_err("TLS session", e))?;
        Ok(OpensslTls { stream, checked_against, peer: "server" })
    }

    /// A failed TLS operation, in words: the certificate check that
    /// failed, or OpenSSL's reasons. libnbd reports a failed handshake
    /// with no errno; a session that breaks later is EIO.
    fn failure(&self, what: &str, errno: i32, e: openssl::ssl::Error) -> TlsError {
        let verify = self.stream.ssl().verify_result();
        let detail = if verify != openssl::x509::X509VerifyResult::OK && self.peer == "client" {
            format!("the client's certificate failed verification: {}", verify.error_string())
        } else if verify != openssl::x509::X509VerifyResult::OK {
            format!(
                "certificate verification failed: {}: {}; to connect without verifying the server, use \
                 tls-verify-peer=false in the URI or call nbd_set_tls_verify_peer(h, false)",
                verify.error_string(),
                self.checked_against
            )
        } else if let Some(stack) = e.ssl_error() {
            let reasons: Vec<&str> = stack.errors().iter().filter_map(|x| x.reason()).collect();
            if reasons.is_empty() {
                stack.to_string()
            } else {
                reasons.join("; ")
            }
        } else if let Some(io) = e.io_error() {
            io_text(io)
        } else {
            format!("the {} closed the connection", self.peer)
        };
        TlsError::new(errno, format!("{what}: {detail}"))
    }
}

impl TlsLayer for OpensslTls {
    fn recv_buffer(&mut self) -> &mut [u8] {
        self.stream.get_mut().recv_buffer()
    }

    fn handle_received(&mut self, n: usize) {
        let pipe = self.stream.get_mut();
        pipe.end = (pipe.end + n).min(pipe.incoming.len());
    }

    fn pending_ciphertext(&self) -> &[u8] {
        &self.stream.get_ref().outgoing
    }

    fn consume_ciphertext(&mut self, n: usize) {
        self.stream.get_mut().outgoing.drain(..n);
    }

    fn handshake(&mut self) -> TlsResult<bool> {
        match self.stream.do_handshake() {
            Ok(()) => Ok(true),
            Err(e) if matches!(e.code(), ErrorCode::WANT_READ | ErrorCode::WANT_WRITE) => Ok(false),
            Err(e) => Err(self.failure("TLS handshake", 0, e)),
        }
    }

    fn read_plain(&mut self, buf: &mut [u8]) -> TlsResult<Plain> {
        if buf.is_empty() {
            return Ok(Plain::Data(0));
        }
        match self.stream.ssl_read(buf) {
            Ok(n) => Ok(Plain::Data(n)),
            Err(e) if e.code() == ErrorCode::ZERO_RETURN => Ok(Plain::Closed),
            Err(e) if matches!(e.code(), ErrorCode::WANT_READ | ErrorCode::WANT_WRITE) => Ok(Plain::NeedMore),
            Err(e) => Err(self.failure("TLS receive", EIO, e)),
        }
    }

    fn write_plain(&mut self, data: &[u8]) -> TlsResult<usize> {
        if data.is_empty() || self.pending_ciphertext().len() >= MAX_PENDING_CIPHERTEXT {
            return Ok(0);
        }
        match self.stream.ssl_write(data) {
            Ok(n) => Ok(n),
            Err(e) if matches!(e.code(), ErrorCode::WANT_READ | ErrorCode::WANT_WRITE) => Ok(0),
            Err(e) => Err(self.failure("TLS send", EIO, e)),
        }
    }

    fn has_buffered_input(&self) -> bool {
        let pipe = self.stream.get_ref();
        self.stream.ssl().pending() > 0 || pipe.start < pipe.end
    }

    fn buffered_ciphertext(&self) -> usize {
        let pipe = self.stream.get_ref();
        pipe.end - pipe.start
    }

    fn peer(&self) -> &'static str {
        self.peer
    }

    /// libnbd's words with OpenSSL's names: the cipher suite and its key
    /// size, key exchange and MAC as OpenSSL describes the suite, the
    /// protocol version; no kernel TLS.
    fn describe(&self) -> String {
        let ssl = self.stream.ssl();
        let Some(c) = ssl.current_cipher() else { return format!("{} kTLS disabled", ssl.version_str()) };
        let about = c.description();
        let field =
            |key: &str| about.split_whitespace().find_map(|w| w.strip_prefix(key)).unwrap_or("unknown").to_owned();
        format!(
            "cipher {} ({} bits) key exchange {} mac {} protocol {} kTLS disabled",
            c.name(),
            c.bits().secret,
            field("Kx="),
            field("Mac="),
            ssl.version_str()
        )
    }
}

/// Plaintext taken per TLS write.
const TLS_CHUNK: usize = 64 * 1024;
/// A TLS record's largest plaintext: a piece this large fills records by itself.
const TLS_RECORD: usize = 16 * 1024;

/// TLS over a lower transport (the socket), as one more [`Transport`] for
/// the I/O loop: plaintext in and out, ciphertext flushed to and filled
/// from the lower transport. Failures below are reported with no errno,
/// as libnbd reports them under TLS.
pub struct TlsTransport<T> {
    lower: T,
    session: Box<dyn TlsLayer>,
    established: bool,
    /// The socket reached its end: what the session holds is all there is.
    peer_closed: bool,
    /// Small pieces of plaintext coalesced into one TLS record.
    coalesced: Vec<u8>,
}

impl<T: Transport> TlsTransport<T> {
    /// `session` has sent its first flight (into its own buffer).
    pub fn new(lower: T, session: Box<dyn TlsLayer>) -> Self {
        TlsTransport { lower, session, established: false, peer_closed: false, coalesced: Vec::new() }
    }

    pub fn lower(&self) -> &T {
        &self.lower
    }

    pub fn lower_mut(&mut self) -> &mut T {
        &mut self.lower
    }
}

fn below(e: TransportError, what: &str) -> TransportError {
    TransportError::new(0, format!("{what}: {}", strerror(e.errno)))
}

impl<T: Transport> Transport for TlsTransport<T> {
    fn fd(&self) -> RawFd {
        self.lower.fd()
    }

    fn send(&mut self, bufs: &[&[u8]]) -> Result<usize, TransportError> {
        let Some(first) = bufs.first() else { return Ok(0) };
        // A large piece (a WRITE payload) is encrypted from the caller's
        // buffer; small ones (headers) are coalesced into one record.
        let plain = if first.len() >= TLS_RECORD {
            &first[..first.len().min(TLS_CHUNK)]
        } else {
            self.coalesced.clear();
            for s in bufs {
                let room = TLS_CHUNK - self.coalesced.len();
                self.coalesced.extend_from_slice(&s[..s.len().min(room)]);
                if self.coalesced.len() == TLS_CHUNK {
                    break;
                }
            }
            &self.coalesced[..]
        };
        self.session.write_plain(plain).map_err(|e| TransportError::new(e.errno, e.msg))
    }

    fn recv(&mut self, buf: &mut [u8]) -> Result<Recv, TransportError> {
        match self.session.read_plain(buf) {
            Ok(Plain::Data(0) | Plain::NeedMore) => Ok(Recv::WouldBlock),
            Ok(Plain::Data(n)) => Ok(Recv::Data(n)),
            Ok(Plain::Closed) => Ok(Recv::Eof),
            Err(e) => Err(TransportError::new(e.errno, e.msg)),
        }
    }

    /// Decrypted data comes a record at a time: a short piece says nothing
    /// about what else the session holds.
    fn short_read_drains(&self) -> bool {
        false
    }

    fn flush(&mut self) -> Result<(), TransportError> {
        while !self.session.pending_ciphertext().is_empty() {
            match self.lower.send(&[self.session.pending_ciphertext()]) {
                Ok(0) => break,
                Ok(n) => self.session.consume_ciphertext(n),
                Err(e) => return Err(below(e, "TLS send")),
            }
        }
        Ok(())
    }

    /// Stops early once [`FILL_MAX`] bytes wait undecrypted: a peer
    /// whose input the stream above does not take (a server connection
    /// at its limits) cannot make the session buffer without bound.
    /// Once the socket has ended it says so at every call: the I/O loop
    /// acts on it once the stream above has taken what came before.
    fn fill(&mut self) -> Result<bool, TransportError> {
        while !self.peer_closed && self.session.buffered_ciphertext() < FILL_MAX {
            let buf = self.session.recv_buffer();
            let room = buf.len();
            match self.lower.recv(buf) {
                Ok(Recv::Eof) => self.peer_closed = true,
                Ok(Recv::Data(n)) => {
                    self.session.handle_received(n);
                    if n < room {
                        return Ok(false);
                    }
                }
                Ok(Recv::WouldBlock) => return Ok(false),
                Err(e) => return Err(below(e, "TLS receive")),
            }
        }
        Ok(self.peer_closed)
    }

    fn is_established(&self) -> bool {
        self.established
    }

    fn handshake(&mut self) -> Result<Option<String>, TransportError> {
        match self.session.handshake() {
            Ok(true) => {
                self.established = true;
                Ok(Some(self.session.describe()))
            }
            Ok(false) => Ok(None),
            Err(e) => Err(TransportError::new(e.errno, e.msg)),
        }
    }

    /// A server that rejects our credentials just hangs up.
    fn eof_error(&self) -> Option<TransportError> {
        (!self.established).then(|| {
            TransportError::new(0, format!("TLS handshake: the {} closed the connection", self.session.peer()))
        })
    }

    fn interest(&self) -> Interest {
        Interest { read: !self.established, write: !self.session.pending_ciphertext().is_empty() }
    }

    fn has_buffered_input(&self) -> bool {
        self.established && self.session.has_buffered_input()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A PSK file holding `text`, in a directory of its own (`name`).
    fn psk_file(name: &str, text: &str) -> (PathBuf, PathBuf) {
        let dir = std::env::temp_dir().join(format!("nbd-psk-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("keys.psk");
        std::fs::write(&file, text).unwrap();
        (dir, file)
    }

    #[test]
    fn psk_files_are_read_as_psktool_writes_them() {
        let (dir, file) = psk_file("read", "bob:00ff\nalice:0a1B2c\n");
        assert_eq!(psk_key(&file, "alice").unwrap(), [0x0a, 0x1b, 0x2c]);
        assert_eq!(psk_key(&file, "carol").unwrap_err().errno, EINVAL);
        std::fs::write(&file, "alice:0g\n").unwrap();
        assert_eq!(psk_key(&file, "alice").unwrap_err().errno, EINVAL);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A socket whose peer sends without pause: every receive fills the
    /// buffer, up to `left` bytes.
    struct Firehose {
        left: usize,
    }

    impl Transport for Firehose {
        fn fd(&self) -> RawFd {
            -1
        }
        fn send(&mut self, bufs: &[&[u8]]) -> Result<usize, TransportError> {
            Ok(bufs.iter().map(|b| b.len()).sum())
        }
        fn recv(&mut self, buf: &mut [u8]) -> Result<Recv, TransportError> {
            let n = buf.len().min(self.left);
            self.left -= n;
            buf[..n].fill(0x17);
            Ok(if n == 0 { Recv::WouldBlock } else { Recv::Data(n) })
        }
    }

    #[test]
    fn fill_stops_reading_once_enough_ciphertext_waits_undecrypted() {
        let (dir, file) = psk_file("fill", "alice:0a1b2c3d\n");
        let ctx = ServerTls::new(&ServerCredentials::Psk { file }).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let mut t = TlsTransport::new(Firehose { left: 64 << 20 }, Box::new(ctx.session().unwrap()));
        assert!(!t.fill().unwrap(), "no end of stream");
        let pulled = (64 << 20) - t.lower().left;
        assert!(pulled >= FILL_MAX, "{pulled}: it stopped before the limit");
        assert!(pulled < FILL_MAX + 2 * RECV_CHUNK, "{pulled}: it read past the limit");
        // Nothing was decrypted, so nothing more is taken.
        assert!(!t.fill().unwrap(), "no end of stream");
        assert_eq!((64 << 20) - t.lower().left, pulled);
        assert_eq!(t.eof_error().unwrap().context, "TLS handshake: the client closed the connection");
    }
}
