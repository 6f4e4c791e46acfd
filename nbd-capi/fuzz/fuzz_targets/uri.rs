//! Arbitrary bytes as an NBD URI: parsing never panics, and what `format`
//! (`nbd_get_uri`) writes for an accepted URI parses back to the same
//! connection, export, user, TLS files, TLS host name and verification.
#![no_main]

use nbd::uri::{format, parse, Transport};

/// Hosts `format` writes back as they are: IPv6 literals, in brackets,
/// which `nbd_get_uri` only ever reports as the address they are. Any
/// other host is escaped and must read back the same.
fn literal_with_odd_bytes(t: &Transport) -> bool {
    let Transport::Tcp { host, .. } = t else { return false };
    host.contains(':') && !host.bytes().all(|b| b.is_ascii_hexdigit() || b":.%".contains(&b))
}

fn check(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(u) = parse(text) else { return };
    assert!(!text.bytes().any(|b| b <= b' ' || b == 0x7f), "accepted {text:?}");
    assert!(!matches!(&u.transport, Transport::Tcp { host, .. } if host.is_empty()), "empty host from {text:?}");
    if literal_with_odd_bytes(&u.transport) {
        return;
    }
    let verify_off = (u.tls_verify_peer == Some(false)).then(|| "false".to_string());
    let files: Vec<(&str, &str)> = [
        ("tls-certificates", &u.tls_certificates),
        ("tls-psk-file", &u.tls_psk_file),
        ("tls-hostname", &u.tls_hostname),
        ("tls-verify-peer", &verify_off),
    ]
    .into_iter()
    .filter_map(|(k, v)| Some((k, v.as_deref()?)))
    .collect();
    let written = format(u.tls, &u.transport, &u.export, u.username.as_deref(), &files);
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
            u.tls_hostname.clone(),
            u.tls_verify_peer == Some(false),
        )
    };
    assert_eq!(key(&v), key(&u), "{text:?} written as {written:?}");
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| check(data));
