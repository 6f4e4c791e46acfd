//! Arbitrary bytes as an NBD URI: parsing never panics, and what `format`
//! (`nbd_get_uri`) writes for an accepted URI parses back to the same
//! connection, export, user and TLS files.
#![no_main]

use nbd::uri::{format, parse, Transport};

/// Host names `format` writes as they are: `nbd_get_uri` reports a name
/// the handle resolved, never an escaped one.
fn plain_host(t: &Transport) -> bool {
    match t {
        Transport::Tcp { host, port } => {
            let plain = |s: &str| s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._~:".contains(&b));
            plain(host) && plain(port) && !port.contains(':')
        }
        _ => true,
    }
}

fn check(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(u) = parse(text) else { return };
    assert!(!text.bytes().any(|b| b <= b' ' || b == 0x7f), "accepted {text:?}");
    assert!(!matches!(&u.transport, Transport::Tcp { host, .. } if host.is_empty()), "empty host from {text:?}");
    let files: Vec<(&str, &str)> = [("tls-certificates", &u.tls_certificates), ("tls-psk-file", &u.tls_psk_file)]
        .into_iter()
        .filter_map(|(k, v)| Some((k, v.as_deref()?)))
        .collect();
    let written = format(u.tls, &u.transport, &u.export, u.username.as_deref(), &files);
    if !plain_host(&u.transport) {
        return;
    }
    assert!(!written.bytes().any(|b| b <= b' ' || b == 0x7f), "{text:?} written as {written:?}");
    let v = parse(&written).unwrap_or_else(|e| panic!("{text:?} written as {written:?}, which fails: {}", e.msg));
    let key = |u: &nbd::uri::Uri| {
        (
            u.tls,
            u.transport.clone(),
            u.export.clone(),
            u.username.clone(),
            u.tls_certificates.clone(),
            u.tls_psk_file.clone(),
        )
    };
    assert_eq!(key(&v), key(&u), "{text:?} written as {written:?}");
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| check(data));
