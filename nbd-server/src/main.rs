//! `nbd-rs-server`: serves exports from memory, files or nothing over
//! Unix sockets and TCP until SIGTERM or SIGINT.

use nbd_proto::server::TlsPolicy;
use nbd_server::backend::{Backend, File, Memory, Null};
use nbd_server::log::Log;
use nbd_server::parse_size;
use nbd_server::serve::{ExportSpec, Limits, Listener, Server};
use nbd_tls::{ServerCredentials, ServerTls};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

const HELP: &str = "\
Usage: nbd-rs-server [OPTIONS] [NAME=]KIND:ARG...

Serves NBD exports until SIGTERM or SIGINT, which finish the requests in
flight first. The first export is the default one (what a client that asks
for the empty name gets).

Exports:
  memory:SIZE           a sparse RAM disk of SIZE bytes (suffixes K, M, G, T)
  file:PATH             a file or block device: FLUSH and FUA are fdatasync,
                        trims and zeroes punch holes, block status from
                        SEEK_DATA and SEEK_HOLE
  null:SIZE             reads zeroes, discards writes
  NAME=KIND:ARG         the same, under the export name NAME (default \"\")
  --ro [NAME=]KIND:ARG  an export that refuses writes

Listening (at least one):
  -U, --unix PATH       a Unix socket (created; removed at exit)
  -p, --port PORT       TCP, on every address (or --bind's)
      --bind ADDR       the address for --port
  -s, --stdin           serve one connection on stdin, a socket (as libnbd's
                        nbd_connect_command gives one), and exit when it ends
  Started by systemd socket activation (LISTEN_PID and LISTEN_FDS, as
  libnbd's nbd_connect_systemd_socket_activation sets them), it serves the
  sockets it is given.

TLS (OpenSSL; libnbd's nbds:// URIs):
      --tls-certificates DIR  X.509: DIR holds server-cert.pem, server-key.pem
                              (and ca-cert.pem for --tls-verify-peer)
      --tls-psk FILE          PSK: a psktool file of user:hexkey lines
      --tls-verify-peer       clients must present a certificate signed by
                              DIR/ca-cert.pem
      --tls on|require|off    with credentials, TLS is offered (on, the
                              default) or required; off offers none

Limits:
      --max-connections N  connections served at once (default 1024)
      --max-in-flight N    requests one connection may have in flight (64)
      --max-bytes SIZE     buffers and unsent replies per connection (64M);
                           beyond either limit the server stops reading
      --threads N          worker threads for the backends (4)
      --shutdown-timeout SECS  after SIGTERM or SIGINT, how long requests
                           in flight may take to finish (10); a second
                           signal ends them at once

  -v, --verbose         log connections and failed requests
  -h, --help            this text
  -V, --version         the version
";

struct Args {
    exports: Vec<ExportSpec>,
    tls: Option<(ServerCredentials, TlsPolicy)>,
    stdin: bool,
    unix: Vec<PathBuf>,
    port: Option<u16>,
    bind: Option<String>,
    limits: Limits,
    log: Log,
}

fn backend(spec: &str, read_only: bool) -> Result<(String, Arc<dyn Backend>), String> {
    let (name, rest) = match spec.split_once('=') {
        Some((n, r)) if !n.contains(':') => (n.to_owned(), r),
        _ => (String::new(), spec),
    };
    let (kind, arg) =
        rest.split_once(':').ok_or_else(|| format!("{spec}: want KIND:ARG (memory:SIZE, file:PATH, null:SIZE)"))?;
    let size = || parse_size(arg).ok_or_else(|| format!("{spec}: {arg} is not a size"));
    let b: Arc<dyn Backend> = match kind {
        "memory" => Arc::new(Memory::new(size()?)),
        "null" => Arc::new(Null::new(size()?)),
        "file" => Arc::new(File::open(arg.as_ref(), !read_only).map_err(|e| format!("{arg}: {e}"))?),
        _ => return Err(format!("{spec}: unknown kind {kind} (memory, file or null)")),
    };
    Ok((name, b))
}

fn parse(mut argv: impl Iterator<Item = String>) -> Result<Option<Args>, String> {
    let mut a = Args {
        exports: Vec::new(),
        tls: None,
        stdin: false,
        unix: Vec::new(),
        port: None,
        bind: None,
        limits: Limits::default(),
        log: Log::default(),
    };
    let (mut certs, mut policy, mut verify_peer) = (None, None, false);
    let number = |opt: &str, v: Option<String>| -> Result<usize, String> {
        let v = v.ok_or_else(|| format!("{opt} needs a value"))?;
        v.parse().map_err(|_| format!("{opt}: {v} is not a number"))
    };
    while let Some(arg) = argv.next() {
        match arg.as_str() {
            "-h" | "--help" => {
                print!("{HELP}");
                return Ok(None);
            }
            "-V" | "--version" => {
                println!("nbd-rs-server {}", env!("CARGO_PKG_VERSION"));
                return Ok(None);
            }
            "-v" | "--verbose" => a.log.verbose = true,
            "-s" | "--stdin" => a.stdin = true,
            "-U" | "--unix" => a.unix.push(argv.next().ok_or("-U needs a path")?.into()),
            "-p" | "--port" => {
                let p = number("--port", argv.next())?;
                a.port = Some(u16::try_from(p).map_err(|_| format!("--port: {p} is not a port"))?);
            }
            "--bind" => a.bind = Some(argv.next().ok_or("--bind needs an address")?),
            "--max-connections" => a.limits.max_connections = number(&arg, argv.next())?,
            "--max-in-flight" => a.limits.max_in_flight = number(&arg, argv.next())?.max(1),
            "--threads" => a.limits.threads = number(&arg, argv.next())?.max(1),
            "--shutdown-timeout" => a.limits.shutdown_timeout = Duration::from_secs(number(&arg, argv.next())? as u64),
            "--max-bytes" => {
                let v = argv.next().ok_or("--max-bytes needs a size")?;
                a.limits.max_bytes = parse_size(&v).ok_or_else(|| format!("--max-bytes: {v} is not a size"))? as usize;
            }
            "--tls-certificates" => {
                let dir = argv.next().ok_or("--tls-certificates needs a directory")?.into();
                certs = Some(ServerCredentials::X509 { dir, verify_peer: false });
            }
            "--tls-psk" => {
                let file = argv.next().ok_or("--tls-psk needs a file")?.into();
                certs = Some(ServerCredentials::Psk { file });
            }
            "--tls-verify-peer" => verify_peer = true,
            "--tls" => {
                policy = match argv.next().as_deref() {
                    Some("on") => Some(TlsPolicy::Allow),
                    Some("require") => Some(TlsPolicy::Require),
                    Some("off") => Some(TlsPolicy::Off),
                    _ => return Err("--tls takes on, require or off".into()),
                }
            }
            "--ro" => {
                let spec = argv.next().ok_or("--ro needs an export")?;
                let (name, backend) = backend(&spec, true)?;
                a.exports.push(ExportSpec { name, backend, read_only: true });
            }
            s if s.starts_with('-') => return Err(format!("unknown option {s} (see --help)")),
            spec => {
                let (name, backend) = backend(spec, false)?;
                a.exports.push(ExportSpec { name, backend, read_only: false });
            }
        }
    }
    if a.exports.is_empty() {
        return Err("no export given (see --help)".into());
    }
    if let Some(ServerCredentials::X509 { verify_peer: v, .. }) = &mut certs {
        *v = verify_peer;
    }
    a.tls = match (certs, policy) {
        (_, Some(TlsPolicy::Off)) => None,
        (Some(c), p) => Some((c, p.unwrap_or(TlsPolicy::Allow))),
        (None, Some(_)) => return Err("--tls needs --tls-certificates or --tls-psk".into()),
        (None, None) => None,
    };
    let activated = std::env::var_os("LISTEN_FDS").is_some();
    if a.unix.is_empty() && a.port.is_none() && !a.stdin && !activated {
        return Err("nowhere to listen: give -U PATH, -p PORT or -s".into());
    }
    if a.stdin && (!a.unix.is_empty() || a.port.is_some()) {
        return Err("-s serves stdin alone: no -U or -p with it".into());
    }
    let mut seen = std::collections::HashSet::new();
    if let Some(e) = a.exports.iter().find(|e| !seen.insert(e.name.clone())) {
        return Err(format!("export \"{}\" is given twice", e.name));
    }
    Ok(Some(a))
}

/// The listening sockets systemd-style socket activation passed, if any.
fn activated() -> Result<Vec<Listener>, String> {
    let mut fds = listenfd::ListenFd::from_env();
    let mut out = Vec::new();
    for i in 0..fds.len() {
        let l = match fds.take_unix_listener(i) {
            Ok(Some(l)) => {
                l.set_nonblocking(true).map_err(|e| e.to_string())?;
                Listener::Unix(mio::net::UnixListener::from_std(l))
            }
            _ => match fds.take_tcp_listener(i) {
                Ok(Some(l)) => {
                    l.set_nonblocking(true).map_err(|e| e.to_string())?;
                    Listener::Tcp(mio::net::TcpListener::from_std(l))
                }
                _ => return Err(format!("socket activation: descriptor {} is not a listening socket", 3 + i)),
            },
        };
        out.push(l);
    }
    Ok(out)
}

/// A Unix socket this server created: its path and the file it made
/// there, so that exiting removes that file and not one another server
/// has since bound at the same path.
struct CreatedSocket {
    path: PathBuf,
    id: (u64, u64),
}

impl CreatedSocket {
    fn new(path: &Path) -> std::io::Result<Self> {
        let m = std::fs::symlink_metadata(path)?;
        Ok(CreatedSocket { path: path.to_owned(), id: (m.dev(), m.ino()) })
    }

    fn remove(&self) {
        let ours = std::fs::symlink_metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.id);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn listen(a: &Args, created: &mut Vec<CreatedSocket>) -> Result<Vec<Listener>, String> {
    let mut out = activated()?;
    for path in &a.unix {
        let l = mio::net::UnixListener::bind(path).map_err(|e| format!("{}: {e}", path.display()))?;
        created.push(CreatedSocket::new(path).map_err(|e| format!("{}: {e}", path.display()))?);
        out.push(Listener::Unix(l));
    }
    if let Some(port) = a.port {
        let addr = match &a.bind {
            Some(b) if b.contains(':') => format!("[{b}]:{port}"),
            Some(b) => format!("{b}:{port}"),
            None => format!("[::]:{port}"),
        };
        let parsed: std::net::SocketAddr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
        let l = match mio::net::TcpListener::bind(parsed) {
            // No IPv6 here: every IPv4 address then.
            Err(_) if a.bind.is_none() => mio::net::TcpListener::bind(([0, 0, 0, 0], port).into()),
            r => r,
        }
        .map_err(|e| format!("{addr}: {e}"))?;
        out.push(Listener::Tcp(l));
    }
    Ok(out)
}

fn main() -> ExitCode {
    let args = match parse(std::env::args().skip(1)) {
        Ok(Some(a)) => a,
        Ok(None) => return ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nbd-rs-server: {e}");
            return ExitCode::from(2);
        }
    };
    // Credentials first: a server that cannot start leaves no socket.
    let tls = match args.tls.as_ref().map(|(creds, policy)| ServerTls::new(creds).map(|ctx| (ctx, *policy))).transpose()
    {
        Ok(t) => t,
        Err(e) => {
            eprintln!("nbd-rs-server: TLS: {}", e.msg);
            return ExitCode::FAILURE;
        }
    };
    let mut created = Vec::new();
    let listeners = match listen(&args, &mut created) {
        Ok(l) if l.is_empty() && !args.stdin => {
            // LISTEN_FDS for another process (LISTEN_PID), and nothing else.
            eprintln!("nbd-rs-server: nowhere to listen: the socket activation variables are not for this process");
            return ExitCode::FAILURE;
        }
        Ok(l) => l,
        Err(e) => {
            created.iter().for_each(CreatedSocket::remove);
            eprintln!("nbd-rs-server: {e}");
            return ExitCode::FAILURE;
        }
    };
    let stdin = args.stdin;
    let result = Server::new(args.exports, listeners, args.limits, tls, args.log).and_then(|mut s| {
        if stdin {
            s.serve_stdin()?;
        }
        s.run()
    });
    created.iter().for_each(CreatedSocket::remove);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nbd-rs-server: {e}");
            ExitCode::FAILURE
        }
    }
}
