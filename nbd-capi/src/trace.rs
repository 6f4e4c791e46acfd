//! How values read in debug messages: the arguments of `enter:` lines,
//! the results of `leave:` lines, in libnbd 1.22's notation. One rule per
//! kind of value; the boundary (`export!`) applies them to every export,
//! and only when debugging is on.

use crate::callbacks::{nbd_completion_callback, Closure};
use std::ffi::{c_char, c_void, CStr};
use std::fmt::Write;

/// Longest string or buffer shown whole; the rest is counted.
const SHOWN: usize = 512;

/// An export's argument as its `enter:` line shows it.
pub trait DebugArg {
    fn write_arg(&self, out: &mut String);
}

/// Flags: `0x` and hex.
#[derive(Clone, Copy)]
pub struct Hex(pub u32);

/// A buffer the call fills: never shown (`<buf>`).
#[derive(Clone, Copy)]
pub struct ReadBuf;

/// A buffer the call sends: its first sector as a hex dump, quoted.
#[derive(Clone, Copy)]
pub struct WriteBuf(pub *const c_void, pub usize);

/// A socket address: never shown (`<sockaddr>`).
#[derive(Clone, Copy)]
pub struct SockAddr;

macro_rules! arg_as_number {
    ($($t:ty),*) => {$(
        impl DebugArg for $t {
            fn write_arg(&self, out: &mut String) {
                let _ = write!(out, "{self}");
            }
        }
    )*};
}
arg_as_number!(i32, u32, i64, u64, usize);

impl DebugArg for bool {
    fn write_arg(&self, out: &mut String) {
        out.push_str(if *self { "true" } else { "false" });
    }
}

impl DebugArg for Hex {
    fn write_arg(&self, out: &mut String) {
        let _ = write!(out, "{:#x}", self.0);
    }
}

impl DebugArg for ReadBuf {
    fn write_arg(&self, out: &mut String) {
        out.push_str("<buf>");
    }
}

impl DebugArg for SockAddr {
    fn write_arg(&self, out: &mut String) {
        out.push_str("<sockaddr>");
    }
}

impl DebugArg for WriteBuf {
    fn write_arg(&self, out: &mut String) {
        out.push_str("\"\n");
        if !self.0.is_null() && self.1 > 0 {
            // SAFETY: the caller lends `self.1` readable bytes at `self.0`
            // for the call (the write's contract); only a sector is read.
            let bytes = unsafe { std::slice::from_raw_parts(self.0.cast::<u8>(), self.1.min(SHOWN)) };
            hexdump(bytes, out);
            if self.1 > SHOWN {
                let _ = writeln!(out, "[... {} more bytes truncated ...]", self.1 - SHOWN);
            }
        }
        out.push('"');
    }
}

/// A string argument: quoted, unprintable bytes escaped, or `NULL`.
impl DebugArg for *const c_char {
    fn write_arg(&self, out: &mut String) {
        if self.is_null() {
            out.push_str("NULL");
            return;
        }
        // SAFETY: a non-NULL string argument is NUL-terminated (C contract).
        printable(unsafe { CStr::from_ptr(*self) }.to_bytes(), out);
    }
}

/// A NULL-terminated list of strings: `["a", "b"]`, or `NULL`.
impl DebugArg for *mut *mut c_char {
    fn write_arg(&self, out: &mut String) {
        if self.is_null() {
            out.push_str("NULL");
            return;
        }
        out.push('[');
        for n in 0.. {
            // SAFETY: the list is NULL-terminated (C contract), so every
            // index up to the terminator is readable.
            let s = unsafe { *self.add(n) };
            if s.is_null() {
                break;
            }
            if n > 0 {
                out.push_str(", ");
            }
            s.cast_const().write_arg(out);
        }
        out.push(']');
    }
}

/// A callback the function requires: `<fun>`.
#[derive(Clone, Copy)]
pub struct Fun;

impl DebugArg for Fun {
    fn write_arg(&self, out: &mut String) {
        out.push_str("<fun>");
    }
}

/// The optional completion callback reads as libnbd 1.22 prints it,
/// which is inverted: `<fun>` when absent, `NULL` when given.
impl DebugArg for nbd_completion_callback {
    fn write_arg(&self, out: &mut String) {
        out.push_str(if self.is_null() { "<fun>" } else { "NULL" });
    }
}

/// The `enter:` line for `args` (names as libnbd's header gives them).
pub fn enter_line(args: &[(&str, &dyn DebugArg)]) -> String {
    let mut out = String::from("enter:");
    for (name, value) in args {
        let _ = write!(out, " {name}=");
        value.write_arg(&mut out);
    }
    out
}

/// How a return value reads in `leave: ret=...`.
pub trait DebugValue {
    fn debug_text(&self) -> String;
}

macro_rules! value_as_number {
    ($($t:ty),*) => {$(
        impl DebugValue for $t {
            fn debug_text(&self) -> String {
                self.to_string()
            }
        }
    )*};
}
value_as_number!(i32, u32, i64, u64, isize, usize);

/// A static string (version, state, protocol): as it is.
impl DebugValue for *const c_char {
    fn debug_text(&self) -> String {
        if self.is_null() {
            return String::new();
        }
        // SAFETY: a non-NULL string an export is about to return, which
        // it built NUL-terminated.
        unsafe { CStr::from_ptr(*self) }.to_string_lossy().into_owned()
    }
}

/// A string the caller must free: quoted, as string arguments are.
impl DebugValue for *mut c_char {
    fn debug_text(&self) -> String {
        let mut out = String::new();
        self.cast_const().write_arg(&mut out);
        out
    }
}

/// The C library's `isprint` in the C locale.
fn is_print(b: u8) -> bool {
    (0x20..0x7f).contains(&b)
}

/// `s` quoted, as libnbd shows strings: printable bytes as they are, the
/// rest as `\xNN` (bytes above 0x7f as the sign-extended `char` C prints),
/// at most [`SHOWN`] bytes.
pub fn printable(s: &[u8], out: &mut String) {
    out.push('"');
    for &b in &s[..s.len().min(SHOWN)] {
        if is_print(b) {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "\\x{:02x}", i32::from(b as i8) as u32);
        }
    }
    if s.len() > SHOWN {
        let _ = write!(out, "[... {} more bytes truncated ...]", s.len() - SHOWN);
    }
    out.push('"');
}

/// 16 bytes a line: offset, hex, and the printable ones between bars.
fn hexdump(bytes: &[u8], out: &mut String) {
    for (n, line) in bytes.chunks(16).enumerate() {
        let _ = write!(out, "{:04x}: ", n * 16);
        for b in line {
            let _ = write!(out, "{b:02x} ");
        }
        out.push_str(&"   ".repeat(16 - line.len()));
        out.push('|');
        out.extend(line.iter().map(|&b| if is_print(b) { char::from(b) } else { '.' }));
        out.push_str(&" ".repeat(16 - line.len()));
        out.push_str("|\n");
    }
}

/// The lines libnbd prints when its handshake learns what `note` says;
/// `sr` and `eh`: whether structured replies and extended headers are
/// on by then.
pub fn note_lines(note: &nbd_proto::Note, sr: bool, eh: bool) -> Vec<String> {
    use nbd_proto::wire::rep;
    use nbd_proto::{Note, OptionOutcome, TransmissionFlags as TF};
    let outcome = |what: &str, o: OptionOutcome| match o {
        OptionOutcome::Negotiated => format!("negotiated {what} on this connection"),
        OptionOutcome::AlreadyNegotiated => format!("{what} already negotiated"),
        OptionOutcome::Unsupported => format!("{what} are not supported by this server"),
    };
    match note {
        Note::StructuredReplies(o) => vec![outcome("structured replies", *o)],
        Note::ExtendedHeaders(o) => vec![outcome("extended headers", *o)],
        Note::Export { size, flags } => {
            let mut lines = vec![format!("exportsize: {size} eflags: {flags:#x}")];
            let f = TF::from_bits_retain(*flags);
            if f.contains(TF::SEND_DF) && !sr {
                lines.push("server lacks structured replies, ignoring claim of df".into());
            }
            if f.contains(TF::BLOCK_STAT_PAYLOAD) && !eh {
                lines.push("server lacks extended headers, ignoring claim of block status payload".into());
            }
            if f.contains(TF::SEND_FAST_ZERO) && !f.contains(TF::SEND_WRITE_ZEROES) {
                lines.push("server lacks write zeroes, ignoring claim of fast zero".into());
            }
            lines
        }
        Note::BlockSize { block, accepted } => {
            let mut lines = vec![format!(
                "server block size constraints: min: {} preferred: {} max: {}",
                block.minimum, block.preferred, block.maximum
            )];
            if !accepted {
                lines.push("ignoring improper server size constraints".into());
            }
            lines
        }
        Note::MetaContext { name, id } => vec![format!("negotiated {name} with context ID {id}")],
        Note::TlsRefused { reply, continuing } => {
            let why = match *reply {
                rep::ERR_POLICY => "policy",
                rep::ERR_INVALID => "invalid request",
                _ => "not supported",
            };
            let mut lines = vec![format!("server refused TLS ({why})")];
            if *continuing {
                lines.push("continuing with unencrypted connection".into());
            }
            lines
        }
        Note::OldstyleFlags(g) => vec![format!("gflags: {g:#x}")],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arg(a: &dyn DebugArg) -> String {
        let mut s = String::new();
        a.write_arg(&mut s);
        s
    }

    #[test]
    fn strings_are_quoted_and_escaped() {
        assert_eq!(arg(&c"nbd://x".as_ptr()), "\"nbd://x\"");
        assert_eq!(arg(&c"a\tb\x7f\xc3".as_ptr()), "\"a\\x09b\\x7f\\xffffffc3\"");
        assert_eq!(arg(&std::ptr::null::<c_char>()), "NULL");
        let long = std::ffi::CString::new("x".repeat(515)).unwrap();
        let shown = arg(&long.as_ptr());
        assert!(shown.ends_with("x[... 3 more bytes truncated ...]\""), "{shown}");
    }

    #[test]
    fn lists_flags_and_markers() {
        let (mut a, mut b) = (*b"nbdkit\0", *b"-U\0");
        let mut list = [a.as_mut_ptr().cast::<c_char>(), b.as_mut_ptr().cast(), std::ptr::null_mut()];
        assert_eq!(arg(&list.as_mut_ptr()), "[\"nbdkit\", \"-U\"]");
        assert_eq!(arg(&std::ptr::null_mut::<*mut c_char>()), "NULL");
        assert_eq!(arg(&Hex(0)), "0x0");
        assert_eq!(arg(&Hex(0x1f)), "0x1f");
        assert_eq!(arg(&true), "true");
        assert_eq!(arg(&ReadBuf), "<buf>");
        assert_eq!(
            enter_line(&[("count", &4096usize), ("offset", &0u64), ("flags", &Hex(4))]),
            "enter: count=4096 offset=0 flags=0x4"
        );
        assert_eq!(enter_line(&[]), "enter:");
    }

    #[test]
    fn write_buffers_are_hex_dumped() {
        let data = b"hello, world!\n\x00\x01\xff";
        let shown = arg(&WriteBuf(data.as_ptr().cast(), data.len()));
        assert_eq!(
            shown,
            "\"\n0000: 68 65 6c 6c 6f 2c 20 77 6f 72 6c 64 21 0a 00 01 |hello, world!...|\n\
             0010: ff                                              |.               |\n\""
        );
        let big = vec![0u8; 600];
        let shown = arg(&WriteBuf(big.as_ptr().cast(), big.len()));
        assert!(shown.ends_with("|\n[... 88 more bytes truncated ...]\n\""), "{shown}");
        // The opening quote, 32 lines of dump, the count, the closing quote.
        assert_eq!(shown.lines().count(), 1 + 32 + 1 + 1);
    }

    #[test]
    fn handshake_notes_read_as_libnbd_words() {
        use nbd_proto::{BlockSize, Note, OptionOutcome};
        let lines = |n: Note| note_lines(&n, true, false);
        assert_eq!(
            lines(Note::ExtendedHeaders(OptionOutcome::Unsupported)),
            ["extended headers are not supported by this server"]
        );
        assert_eq!(
            lines(Note::StructuredReplies(OptionOutcome::Negotiated)),
            ["negotiated structured replies on this connection"]
        );
        assert_eq!(lines(Note::Export { size: 1048576, flags: 0xded }), ["exportsize: 1048576 eflags: 0xded"]);
        assert_eq!(
            lines(Note::Export { size: 0, flags: 0x1000 | 0x800 | 1 }),
            [
                "exportsize: 0 eflags: 0x1801",
                "server lacks extended headers, ignoring claim of block status payload",
                "server lacks write zeroes, ignoring claim of fast zero"
            ]
        );
        let block = BlockSize { minimum: 1, preferred: 4096, maximum: 4294967295 };
        assert_eq!(
            lines(Note::BlockSize { block, accepted: true }),
            ["server block size constraints: min: 1 preferred: 4096 max: 4294967295"]
        );
        assert_eq!(
            lines(Note::MetaContext { name: "base:allocation".into(), id: 0 }),
            ["negotiated base:allocation with context ID 0"]
        );
        assert_eq!(
            lines(Note::TlsRefused { reply: nbd_proto::wire::rep::ERR_POLICY, continuing: true }),
            ["server refused TLS (policy)", "continuing with unencrypted connection"]
        );
    }

    #[test]
    fn returned_strings_are_quoted_static_ones_not() {
        let mut owned = *b"nbd1\0";
        assert_eq!(owned.as_mut_ptr().cast::<c_char>().debug_text(), "\"nbd1\"");
        assert_eq!(c"1.22.2".as_ptr().debug_text(), "1.22.2");
    }
}
