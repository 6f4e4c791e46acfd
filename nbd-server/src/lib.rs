//! nbd-rs's NBD server: nbd-proto's sans-IO server role ([`nbd_proto::server`])
//! driven by one mio event loop ([`serve`]), with blocking backend work
//! ([`backend`]) on worker threads ([`workers`]). The binary,
//! `nbd-rs-server`, is `src/main.rs`.

#![forbid(unsafe_code)]

pub mod backend;
pub mod log;
pub mod serve;
pub mod stream;
pub mod workers;

/// A size as the command line gives it: bytes, or with a suffix K, M, G,
/// T (powers of 1024).
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (digits, shift) = match s.char_indices().last()? {
        (i, 'k' | 'K') => (&s[..i], 10),
        (i, 'm' | 'M') => (&s[..i], 20),
        (i, 'g' | 'G') => (&s[..i], 30),
        (i, 't' | 'T') => (&s[..i], 40),
        _ => (s, 0),
    };
    digits.parse::<u64>().ok()?.checked_mul(1u64 << shift)
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_take_binary_suffixes() {
        assert_eq!(parse_size("512"), Some(512));
        assert_eq!(parse_size("64M"), Some(64 << 20));
        assert_eq!(parse_size("1g"), Some(1 << 30));
        assert_eq!(parse_size("16777216T"), None);
        assert_eq!(parse_size("x"), None);
        assert_eq!(parse_size(""), None);
    }
}
