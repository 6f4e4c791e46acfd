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
    /// The name the server's certificate must carry (libnbd 1.22).
    pub tls_hostname: Option<String>,
    pub tls_verify_peer: Option<bool>,
    /// `multi-conn=N`: the number of connections (nbd-rs's own; libnbd
    /// ignores it).
    pub multi_conn: Option<u32>,
    /// `reconnect-delay=S` and `open-timeout=S`, in seconds (nbd-rs's
    /// own, as qemu names them; libnbd ignores them).
    pub reconnect_delay: Option<u32>,
    pub open_timeout: Option<u32>,
}

/// The most connections a handle makes (`nbd_rs_set_multi_conn`).
pub(crate) const MAX_MULTI_CONN: u32 = 16;

/// A query parameter's whole number of seconds.
fn seconds(name: &str, v: &str) -> CResult<u32> {
    v.parse()
        .map_err(|_| invalid(format!("could not parse {name} parameter \"{v}\", expecting a whole number of seconds")))
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

/// A refusal that says what is wrong and where, after the URI itself.
fn refuse(uri: &str, detail: impl std::fmt::Display) -> CError {
    invalid(format!("unable to parse URI \"{uri}\": {detail}"))
}

/// `part` (a slice of `uri`) carries no space or control character; the
/// refusal names the part and the byte's offset in the URI.
fn check_bytes(uri: &str, part: &str, name: &str) -> CResult<()> {
    let Some(i) = part.bytes().position(|b| b <= b' ' || b == 0x7f) else { return Ok(()) };
    let b = part.as_bytes()[i];
    let at = (part.as_ptr() as usize).saturating_sub(uri.as_ptr() as usize) + i;
    let what = if b == b' ' { "a space".to_owned() } else { format!("the control character 0x{b:02x}") };
    Err(refuse(uri, format!("the {name} contains {what} at offset {at}, which must be written %{b:02X}")))
}

/// Percent-decodes `s`, a part of `uri` called `name`; a bad escape is
/// refused with the escape quoted.
fn decode_part(uri: &str, s: &str, name: &str) -> CResult<String> {
    decode(s).ok_or_else(|| {
        let b = s.as_bytes();
        let hex = |j: usize| b.get(j).is_some_and(u8::is_ascii_hexdigit);
        let i = (0..b.len()).find(|&i| b[i] == b'%' && !(hex(i + 1) && hex(i + 2))).unwrap_or(0);
        let escape: String = s[i..].chars().take(3).collect();
        refuse(
            uri,
            format!("bad percent-encoding \"{escape}\" in the {name} ('%' must be followed by two hexadecimal digits)"),
        )
    })
}

/// The scheme (RFC 3986: a letter, then letters, digits, '+', '-', '.')
/// and what follows its ':'.
fn split_scheme(uri: &str) -> Option<(&str, &str)> {
    let (scheme, rest) = uri.split_once(':')?;
    let mut b = scheme.bytes();
    let first = b.next()?;
    (first.is_ascii_alphabetic() && b.all(|c| c.is_ascii_alphanumeric() || b"+-.".contains(&c)))
        .then_some((scheme, rest))
}

fn no_scheme(uri: &str) -> CError {
    let hint = if uri.starts_with('/') {
        ": to open a local socket use \"nbd+unix://?socket=PATH\""
    } else if uri.len() >= 9 && uri.as_bytes()[..9].eq_ignore_ascii_case(b"localhost") {
        ": to open a local port use \"nbd://localhost\" or \"nbd://localhost:PORT\""
    } else {
        ""
    };
    invalid(format!(
        "NBD URI does not have a scheme: valid NBD URIs should start with a scheme like nbd://, nbds:// or nbd+unix://{hint}"
    ))
}

/// libnbd's booleans (nbdkit's): 1/true/t/yes/y/on and 0/false/f/no/n/off,
/// in any case.
fn parse_bool(v: &str) -> Option<bool> {
    let v = v.to_ascii_lowercase();
    match v.as_str() {
        "1" | "true" | "t" | "yes" | "y" | "on" => Some(true),
        "0" | "false" | "f" | "no" | "n" | "off" => Some(false),
        _ => None,
    }
}

pub fn parse(uri: &str) -> CResult<Uri> {
    let Some((scheme, after)) = split_scheme(uri) else { return Err(no_scheme(uri)) };
    let (tls, kind) = match scheme.to_ascii_lowercase().as_str() {
        "nbd" => (false, "tcp"),
        "nbds" => (true, "tcp"),
        "nbd+unix" => (false, "unix"),
        "nbds+unix" => (true, "unix"),
        "nbd+vsock" => (false, "vsock"),
        "nbds+vsock" => (true, "vsock"),
        "nbd+ssh" | "nbds+ssh" => {
            return Err(CError::new(libc::ENOTSUP, format!("NBD URI scheme {scheme} (NBD over ssh) is not supported")))
        }
        _ => {
            return Err(invalid(format!(
                "unknown NBD URI scheme: {scheme} (NBD URIs start with nbd://, nbds://, nbd+unix://, nbds+unix://, nbd+vsock:// or nbds+vsock://)"
            )))
        }
    };
    let Some(rest) = after.strip_prefix("//") else {
        return Err(invalid(format!("URI must begin with '{scheme}://'")));
    };
    let (rest, fragment) = rest.split_once('#').unwrap_or((rest, ""));
    let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    check_bytes(uri, authority, "server (host, port, user)")?;
    check_bytes(uri, path, "export name (the path)")?;
    check_bytes(uri, query, "query")?;
    check_bytes(uri, fragment, "fragment")?;
    // The export name is the path without its first '/'.
    let export = decode_part(uri, path.strip_prefix('/').unwrap_or(path), "export name (the path)")?;
    let (userinfo, hostport) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(decode_part(uri, u, "user name")?), h),
        None => (None, authority),
    };
    let (host, port) = match split_host_port(hostport).map_err(|detail| refuse(uri, detail))? {
        // An IPv6 literal stays as it is written.
        (host, port, true) => (host, port),
        (host, port, false) => (decode_part(uri, &host, "host")?, port),
    };

    let mut socket = None;
    let mut u = Uri {
        tls,
        transport: Transport::Unix { socket: String::new() },
        export,
        username: userinfo,
        tls_certificates: None,
        tls_psk_file: None,
        tls_hostname: None,
        tls_verify_peer: None,
        multi_conn: None,
        reconnect_delay: None,
        open_timeout: None,
    };
    for pair in query.split(['&', ';']).filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let k = decode_part(uri, k, &format!("name of the query parameter \"{pair}\""))?;
        let v = decode_part(uri, v, &format!("value of the query parameter \"{k}\""))?;
        // Parameter names are case-insensitive, as in libnbd.
        match k.to_ascii_lowercase().as_str() {
            "socket" => socket = Some(v),
            "tls-certificates" => u.tls_certificates = Some(v),
            "tls-psk-file" => u.tls_psk_file = Some(v),
            "tls-hostname" => u.tls_hostname = Some(v),
            "tls-username" => u.username = Some(v),
            "tls-verify-peer" => {
                u.tls_verify_peer = Some(parse_bool(&v).ok_or_else(|| {
                    invalid(format!(
                        "could not parse tls-verify-peer parameter \"{v}\", expecting tls-verify-peer=true|false"
                    ))
                })?)
            }
            "multi-conn" => {
                u.multi_conn = Some(v.parse().ok().filter(|n| (1..=MAX_MULTI_CONN).contains(n)).ok_or_else(|| {
                    invalid(format!(
                        "could not parse multi-conn parameter \"{v}\", expecting a number of connections from 1 to {MAX_MULTI_CONN}"
                    ))
                })?)
            }
            "reconnect-delay" => u.reconnect_delay = Some(seconds("reconnect-delay", &v)?),
            "open-timeout" => u.open_timeout = Some(seconds("open-timeout", &v)?),
            // Unknown parameters are ignored, as the URI spec permits.
            _ => {}
        }
    }
    let plain = if tls { "nbds" } else { "nbd" };
    u.transport = match kind {
        "tcp" => {
            if socket.is_some() {
                return Err(invalid(format!(
                    "socket parameter is incompatible with \"{scheme}:\" (did you mean to use \"{plain}+unix:///?socket=...\"?)"
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
            let number = |what: &str, v: &str| {
                v.parse::<u32>().map_err(|_| {
                    invalid(format!(
                        "cannot parse vsock {what} from NBD URI: \"{v}\" is not a number from 0 to 4294967295"
                    ))
                })
            };
            let cid = number("CID", &host)?;
            let port = match port {
                Some(p) => number("port", &p)?,
                None => 10809,
            };
            Transport::Vsock { cid, port }
        }
    };
    Ok(u)
}

/// `host`, `host:port`, `[v6]`, `[v6]:port`: the host still escaped, the
/// port, and whether the host was in brackets. A missing port is none; an
/// empty one or one that is not a number is refused, in words.
fn split_host_port(s: &str) -> Result<(String, Option<String>, bool), String> {
    let port = |p: &str| {
        if p.is_empty() {
            Err(format!("the port is empty in \"{s}\" (leave out the ':' for the default port)"))
        } else if p.bytes().all(|b| b.is_ascii_digit()) {
            Ok(Some(p.to_owned()))
        } else {
            Err(format!("the port \"{p}\" is not a number"))
        }
    };
    if let Some(rest) = s.strip_prefix('[') {
        let (h, after) = rest.split_once(']').ok_or_else(|| format!("the host \"{s}\" has no closing ']'"))?;
        let port = match after.strip_prefix(':') {
            _ if after.is_empty() => None,
            Some(p) => port(p)?,
            None => return Err(format!("unexpected \"{after}\" after the IPv6 address in the host \"{s}\"")),
        };
        return Ok((h.to_owned(), port, true));
    }
    match s.rsplit_once(':') {
        Some((h, p)) => Ok((h.to_owned(), port(p)?, false)),
        None => Ok((s.to_owned(), None, false)),
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
        let u =
            parse("nbds+unix:///?socket=/s&tls-psk-file=/k&tls-verify-peer=false&tls-certificates=/c&tls-hostname=h")
                .unwrap();
        assert_eq!(u.tls_psk_file.as_deref(), Some("/k"));
        assert_eq!(u.tls_hostname.as_deref(), Some("h"));
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

    /// The refusal of `bad`: its errno and message.
    fn refusal(bad: &str) -> (i32, String) {
        let e = parse(bad).unwrap_err();
        (e.errno, e.msg)
    }

    /// Every word must be in the message refusing `bad`, with EINVAL.
    fn says(bad: &str, words: &[&str]) {
        let (errno, msg) = refusal(bad);
        assert_eq!(errno, libc::EINVAL, "{bad}: {msg}");
        for w in words {
            assert!(msg.contains(w), "{bad}: {msg:?} does not say {w:?}");
        }
    }

    #[test]
    fn a_missing_or_wrong_scheme_is_named() {
        says("localhost", &["does not have a scheme", "nbd://localhost:PORT"]);
        says("/tmp/sock", &["does not have a scheme", "nbd+unix://?socket=PATH"]);
        says("nbd//h", &["does not have a scheme"]);
        says("http://h/", &["unknown NBD URI scheme: http", "nbd+unix://"]);
        says("localhost:10809", &["unknown NBD URI scheme: localhost"]);
        says("nbd:h", &["URI must begin with 'nbd://'"]);
        says("nbds+unix:/x", &["URI must begin with 'nbds+unix://'"]);
        let (errno, msg) = refusal("nbd+ssh://h/");
        assert_eq!(errno, libc::ENOTSUP, "{msg}");
        assert!(msg.contains("nbd+ssh"), "{msg}");
        // As libnbd 1.22, the scheme and the parameter names in any case.
        assert_eq!(parse("NBDS+Unix:///?socket=/s").unwrap().transport, Transport::Unix { socket: "/s".into() });
        let u = parse("NBD+UNIX:///?SOCKET=/s&TLS-Verify-Peer=false").unwrap();
        assert_eq!((u.transport, u.tls_verify_peer), (Transport::Unix { socket: "/s".into() }, Some(false)));
    }

    #[test]
    fn a_space_or_control_byte_is_placed() {
        says("nbd://h/a b", &["export name", "a space at offset 9", "%20"]);
        says("nbd://h\x01/", &[]);
        says("nbd://h\x7f/", &["server", "0x7f at offset 7", "%7F"]);
        says("nbd://h/?socket=\t", &["query", "0x09 at offset 16", "%09"]);
        says("nbd://h/#a b", &["fragment", "offset 10"]);
    }

    #[test]
    fn a_bad_escape_is_quoted_with_its_part() {
        says("nbd://h/%zz", &["\"%zz\"", "export name"]);
        says("nbd://h/%4", &["\"%4\"", "export name"]);
        says("nbd://%zz:10/", &["\"%zz\"", "host"]);
        says("nbd://u%g1@h/", &["\"%g1\"", "user name"]);
        says("nbd://h/?%zz=1", &["\"%zz\"", "name of the query parameter \"%zz=1\""]);
        says("nbd+unix:///?socket=/a%zz", &["\"%zz\"", "value of the query parameter \"socket\""]);
    }

    #[test]
    fn a_bad_host_or_port_is_named() {
        says("nbd://h:port/", &["the port \"port\" is not a number"]);
        says("nbd://h:-1/", &["the port \"-1\" is not a number"]);
        says("nbd://h:/", &["the port is empty"]);
        says("nbd://[::1/", &["\"[::1\" has no closing ']'"]);
        says("nbd://[::1]x/", &["unexpected \"x\" after the IPv6 address", "\"[::1]x\""]);
        says("nbd://[::1]:/", &["the port is empty"]);
        says("nbd+vsock://notanumber/", &["vsock CID", "\"notanumber\""]);
        says("nbd+vsock://99999999999/", &["vsock CID", "4294967295"]);
        says("nbd+vsock://2:notaport/", &["the port \"notaport\" is not a number"]);
        says("nbd+vsock://2:99999999999/", &["vsock port", "\"99999999999\""]);
    }

    #[test]
    fn a_bad_query_parameter_is_named() {
        says("nbd://h/?socket=/x", &["socket parameter is incompatible with \"nbd:\"", "nbd+unix:///?socket="]);
        says("nbds://h/?socket=/x", &["nbds+unix:///?socket="]);
        says("nbd+unix:///", &["socket parameter", "nbd+unix:///?socket=..."]);
        says("nbd://h/?tls-verify-peer=maybe", &["tls-verify-peer parameter \"maybe\"", "tls-verify-peer=true|false"]);
        // libnbd's booleans, in any case.
        for (v, want) in [("T", false), ("Y", false), ("on", false), ("F", true), ("n", true), ("OFF", true)] {
            let u = parse(&std::format!("nbd://h/?tls-verify-peer={v}")).unwrap();
            assert_eq!(u.tls_verify_peer, Some(!want), "{v}");
        }
    }

    #[test]
    fn multi_conn_takes_a_count_from_1_to_16() {
        assert_eq!(parse("nbd+unix:///?socket=/s&multi-conn=4").unwrap().multi_conn, Some(4));
        assert_eq!(parse("nbd://h/?Multi-Conn=16").unwrap().multi_conn, Some(16));
        assert_eq!(parse("nbd://h/").unwrap().multi_conn, None);
        for bad in ["0", "17", "x", "", "-1"] {
            says(&std::format!("nbd://h/?multi-conn={bad}"), &["multi-conn parameter", "from 1 to 16"]);
        }
    }

    #[test]
    fn reconnect_delay_and_open_timeout_take_whole_seconds() {
        let u = parse("nbd+unix:///?socket=/s&reconnect-delay=30&Open-Timeout=5").unwrap();
        assert_eq!((u.reconnect_delay, u.open_timeout), (Some(30), Some(5)));
        assert_eq!(parse("nbd://h/").unwrap().reconnect_delay, None);
        for bad in ["x", "", "-1", "1.5", "4294967296"] {
            says(&std::format!("nbd://h/?reconnect-delay={bad}"), &["reconnect-delay parameter", "whole number"]);
            says(&std::format!("nbd://h/?open-timeout={bad}"), &["open-timeout parameter", "whole number"]);
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
