//! NBD URIs (the NBD URI specification, as libnbd reads and writes them):
//! `nbd://`, `nbds://`, `nbd+unix://`, `nbds+unix://`, `nbd+vsock://`,
//! `nbds+vsock://`, with an export name in the path and `socket=`,
//! `tls-*=` query parameters.

use crate::error::{CError, CResult};

pub const DEFAULT_PORT: &str = "10809";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    Tcp { host: String, port: String },
    Unix { socket: String },
    Vsock { cid: u32, port: u32 },
}

impl Transport {
    /// libnbd's `LIBNBD_ALLOW_TRANSPORT_*` bit.
    pub fn allow_bit(&self) -> u32 {
        match self {
            Transport::Tcp { .. } => 1,
            Transport::Unix { .. } => 2,
            Transport::Vsock { .. } => 4,
        }
    }
}

/// What a URI asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uri {
    pub tls: bool,
    pub transport: Transport,
    pub export: String,
    pub username: Option<String>,
    pub tls_certificates: Option<String>,
    pub tls_psk_file: Option<String>,
    pub tls_verify_peer: Option<bool>,
}

fn invalid(msg: impl Into<String>) -> CError {
    CError::new(libc::EINVAL, msg)
}

fn unhex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Percent-decoding; `None` on a malformed escape.
pub fn decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hi = unhex(*b.get(i + 1)?)?;
            let lo = unhex(*b.get(i + 2)?)?;
            out.push(hi << 4 | lo);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Some(String::from_utf8_lossy(&out).into_owned())
}

/// Percent-encodes everything but unreserved characters and those a URI
/// path or query may carry as they are.
pub fn encode(s: &str, keep: &[u8]) -> String {
    let mut out = String::with_capacity(s.len());
    for &b in s.as_bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) || keep.contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

const PATH_KEEP: &[u8] = b"/!$&'()*+,;=:@";
/// A registered name: sub-delimiters stay, '/', ':', '@' and '%' do not.
const HOST_KEEP: &[u8] = b"!$&'()*+,;=";
/// Query values: as a path, but '&' and ';' separate parameters.
const QUERY_KEEP: &[u8] = b"/!$'()*+,=:@";

pub fn parse(uri: &str) -> CResult<Uri> {
    let unparsable = || invalid(format!("unable to parse URI: {uri}"));
    if uri.bytes().any(|b| b <= b' ' || b == 0x7f) {
        return Err(unparsable());
    }
    let (scheme, rest) = uri.split_once("://").ok_or_else(unparsable)?;
    let (tls, kind) = match scheme {
        "nbd" => (false, "tcp"),
        "nbds" => (true, "tcp"),
        "nbd+unix" => (false, "unix"),
        "nbds+unix" => (true, "unix"),
        "nbd+vsock" => (false, "vsock"),
        "nbds+vsock" => (true, "vsock"),
        other => return Err(invalid(format!("unknown NBD URI scheme: {other}"))),
    };
    let (rest, _fragment) = rest.split_once('#').unwrap_or((rest, ""));
    let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    // The export name is the path without its first '/'.
    let export = decode(path.strip_prefix('/').unwrap_or(path)).ok_or_else(unparsable)?;
    let (userinfo, hostport) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(decode(u).ok_or_else(unparsable)?), h),
        None => (None, authority),
    };
    let (host, port) = split_host_port(hostport).ok_or_else(unparsable)?;

    let mut socket = None;
    let mut u = Uri {
        tls,
        transport: Transport::Unix { socket: String::new() },
        export,
        username: userinfo,
        tls_certificates: None,
        tls_psk_file: None,
        tls_verify_peer: None,
    };
    for pair in query.split(['&', ';']).filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = decode(v).ok_or_else(unparsable)?;
        match decode(k).ok_or_else(unparsable)?.as_str() {
            "socket" => socket = Some(v),
            "tls-certificates" => u.tls_certificates = Some(v),
            "tls-psk-file" => u.tls_psk_file = Some(v),
            "tls-username" => u.username = Some(v),
            "tls-verify-peer" => {
                u.tls_verify_peer = Some(match v.as_str() {
                    "1" | "true" | "on" | "yes" => true,
                    "0" | "false" | "off" | "no" => false,
                    _ => return Err(invalid(format!("tls-verify-peer: cannot parse boolean: {v}"))),
                })
            }
            // Unknown parameters are ignored, as the URI spec permits.
            _ => {}
        }
    }
    u.transport = match kind {
        "tcp" => {
            if socket.is_some() {
                return Err(invalid(format!(
                    "socket parameter is incompatible with \"{scheme}:\" (did you mean to use \"{scheme}+unix:///?socket=...\"?)"
                )));
            }
            let host = if host.is_empty() { "localhost".to_owned() } else { host };
            Transport::Tcp { host, port: port.unwrap_or_else(|| DEFAULT_PORT.to_owned()) }
        }
        "unix" => Transport::Unix {
            socket: socket.ok_or_else(|| {
                invalid(format!(
                    "cannot parse socket parameter from NBD URI (did you mean to use \"{scheme}:///?socket=...\"?)"
                ))
            })?,
        },
        _ => {
            let cid = host.parse().map_err(|_| invalid(format!("cannot parse vsock CID: {host}")))?;
            let port = match port {
                Some(p) => p.parse().map_err(|_| invalid(format!("cannot parse vsock port: {p}")))?,
                None => 10809,
            };
            Transport::Vsock { cid, port }
        }
    };
    Ok(u)
}

/// `host`, `host:port`, `[v6]`, `[v6]:port`; an empty port is none, a
/// port that is not a number is an error.
fn split_host_port(s: &str) -> Option<(String, Option<String>)> {
    let port = |p: &str| p.bytes().all(|b| b.is_ascii_digit()).then(|| (!p.is_empty()).then(|| p.to_owned()));
    if let Some(rest) = s.strip_prefix('[') {
        let (h, after) = rest.split_once(']')?;
        let port = if after.is_empty() { None } else { port(after.strip_prefix(':')?)? };
        return Some((h.to_owned(), port));
    }
    match s.rsplit_once(':') {
        Some((h, p)) => Some((decode(h)?, port(p)?)),
        None => Some((decode(s)?, None)),
    }
}

/// The URI that reconnects to what the handle is connected to, as
/// `nbd_get_uri` writes it: the TLS user name, if one was set, and the
/// TLS files as query parameters after the socket.
pub fn format(
    tls: bool,
    transport: &Transport,
    export: &str,
    user: Option<&str>,
    tls_files: &[(&str, &str)],
) -> String {
    let s = if tls { "nbds" } else { "nbd" };
    let export = encode(export, PATH_KEEP);
    let user = user.map(|u| format!("{}@", encode(u, b""))).unwrap_or_default();
    let mut query: Vec<String> = match transport {
        Transport::Unix { socket } => vec![format!("socket={}", encode(socket, QUERY_KEEP))],
        _ => Vec::new(),
    };
    query.extend(tls_files.iter().map(|(k, v)| format!("{k}={}", encode(v, QUERY_KEEP))));
    let query = if query.is_empty() { String::new() } else { format!("?{}", query.join("&")) };
    match transport {
        Transport::Tcp { host, port } => {
            let host = if host.contains(':') { format!("[{host}]") } else { encode(host, HOST_KEEP) };
            format!("{s}://{user}{host}:{port}/{export}{query}")
        }
        Transport::Unix { .. } => format!("{s}+unix://{user}/{export}{query}"),
        Transport::Vsock { cid, port } => format!("{s}+vsock://{user}{cid}:{port}/{export}{query}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(host: &str, port: &str) -> Transport {
        Transport::Tcp { host: host.into(), port: port.into() }
    }

    #[test]
    fn parses_every_scheme() {
        let u = parse("nbd://example.com:10999/my%20disk").unwrap();
        assert_eq!((u.tls, u.transport, u.export.as_str()), (false, tcp("example.com", "10999"), "my disk"));
        let u = parse("nbds://alice@[::1]/").unwrap();
        assert_eq!((u.tls, u.transport, u.username.as_deref()), (true, tcp("::1", "10809"), Some("alice")));
        let u = parse("nbd+unix:///e?socket=/tmp/a%20b").unwrap();
        assert_eq!(u.transport, Transport::Unix { socket: "/tmp/a b".into() });
        assert_eq!(u.export, "e");
        let u = parse("nbd+vsock://2:1234").unwrap();
        assert_eq!(u.transport, Transport::Vsock { cid: 2, port: 1234 });
        let u = parse("nbd://h//x").unwrap();
        assert_eq!(u.export, "/x");
        let u = parse("nbds+unix:///?socket=/s&tls-psk-file=/k&tls-verify-peer=false&tls-certificates=/c").unwrap();
        assert_eq!(u.tls_psk_file.as_deref(), Some("/k"));
        assert_eq!(u.tls_certificates.as_deref(), Some("/c"));
        assert_eq!(u.tls_verify_peer, Some(false));
    }

    #[test]
    fn refuses_what_libnbd_refuses() {
        for (bad, errno) in [
            ("http://h/", libc::EINVAL),
            ("nbd://h/a b", libc::EINVAL),
            ("nbd://h/?socket=/x", libc::EINVAL),
            ("nbd+unix:///", libc::EINVAL),
            ("nbd://h/%zz", libc::EINVAL),
            ("nbd+vsock://notanumber/", libc::EINVAL),
            ("nbd:h", libc::EINVAL),
            // Found by fuzzing: a service name after a bracketed host, which
            // get_uri wrote back unbracketed and unparsable.
            ("nbds://[f21]:1099nb9/", libc::EINVAL),
            // Found by fuzzing: a bad escape in the host was dropped, which
            // connected to localhost.
            ("nbd://%zz:10/", libc::EINVAL),
        ] {
            assert_eq!(parse(bad).unwrap_err().errno, errno, "{bad}");
        }
    }

    #[test]
    fn formats_as_libnbd_does() {
        assert_eq!(format(false, &tcp("localhost", "10999"), "", None, &[]), "nbd://localhost:10999/");
        assert_eq!(format(false, &tcp("::1", "10999"), "my disk", None, &[]), "nbd://[::1]:10999/my%20disk");
        assert_eq!(format(false, &tcp("h", "1"), "/my disk", None, &[]), "nbd://h:1//my%20disk");
        let unix = Transport::Unix { socket: "/tmp/nbdkitgM7KkE/socket".into() };
        assert_eq!(format(false, &unix, "", None, &[]), "nbd+unix:///?socket=/tmp/nbdkitgM7KkE/socket");
        // What format writes, parse reads back.
        let u = parse(&format(true, &unix, "x y", None, &[])).unwrap();
        assert_eq!((u.tls, u.transport.clone(), u.export.as_str()), (true, unix.clone(), "x y"));
        // TLS: the user set, then the files after the socket.
        let text = format(true, &unix, "", Some("alice"), &[("tls-psk-file", "/k/keys.psk")]);
        assert_eq!(text, "nbds+unix://alice@/?socket=/tmp/nbdkitgM7KkE/socket&tls-psk-file=/k/keys.psk");
        let u = parse(&text).unwrap();
        assert_eq!((u.username.as_deref(), u.tls_psk_file.as_deref()), (Some("alice"), Some("/k/keys.psk")));
        // Found by fuzzing: '&' and ';' in a value would end it.
        let odd = Transport::Unix { socket: "/a&b;c".into() };
        let text = format(false, &odd, "", None, &[("tls-psk-file", "/k;x&y")]);
        assert_eq!(text, "nbd+unix:///?socket=/a%26b%3Bc&tls-psk-file=/k%3Bx%26y");
        let u = parse(&text).unwrap();
        assert_eq!((u.transport, u.tls_psk_file.as_deref()), (odd, Some("/k;x&y")));
        // Found by fuzzing: a host decoded from escapes is escaped again.
        let text = format(false, &tcp("a/b@c%", "1"), "", None, &[]);
        assert_eq!(text, "nbd://a%2Fb%40c%25:1/");
        assert_eq!(parse(&text).unwrap().transport, tcp("a/b@c%", "1"));
        assert_eq!(
            format(true, &tcp("h", "1"), "e", None, &[("tls-certificates", "/pki")]),
            "nbds://h:1/e?tls-certificates=/pki"
        );
    }
}
