//! Writes the files that come from the export table: the linker version
//! script (`version-script`: libnbd's chained nodes, then ours unchained) and the header's `LIBNBD_HAVE_*` lines
//! (`have-macros`), one per function and one per callback struct; and
//! the pkg-config template with the versions filled in (`pkg-config`).

use nbd::identity;
use nbd::table::{EXPORTS, EXTENSION_NODES, NODES};

fn version_script() -> String {
    let mut out = String::new();
    for (i, node) in NODES.iter().enumerate() {
        out.push_str(&format!("{node} {{\n  global:\n"));
        for e in EXPORTS.iter().filter(|e| e.node == *node) {
            out.push_str(&format!("    {};\n", e.name));
        }
        if i == 0 {
            out.push_str("  local: *;\n");
        }
        match i {
            0 => out.push_str("};\n"),
            _ => out.push_str(&format!("}} {};\n", NODES[i - 1])),
        }
    }
    for node in EXTENSION_NODES {
        out.push_str(&format!("{node} {{\n  global:\n"));
        for e in EXPORTS.iter().filter(|e| e.node == node) {
            out.push_str(&format!("    {};\n", e.name));
        }
        out.push_str("};\n");
    }
    out
}

fn have_macros() -> String {
    EXPORTS.iter().map(|e| format!("#define LIBNBD_HAVE_{} 1\n", e.name.to_uppercase())).collect()
}

/// `LIBNBD_HAVE_NBD_*_CALLBACK` for every callback struct cbindgen
/// emitted (`} nbd_..._callback;` closes each typedef).
fn callback_macros(header: &str) -> String {
    header
        .lines()
        .filter_map(|l| l.strip_prefix("} ")?.strip_suffix(';'))
        .filter(|name| name.starts_with("nbd_") && name.ends_with("_callback"))
        .map(|name| format!("#define LIBNBD_HAVE_{} 1\n", name.to_uppercase()))
        .collect()
}

/// cbindgen's header on stdin, finished: the table's `LIBNBD_HAVE_*`
/// macros, one for each callback struct, and libnbd's helper macros go
/// before the include guard's end.
fn finish_header() -> String {
    let mut text = String::new();
    std::io::Read::read_to_string(&mut std::io::stdin(), &mut text).expect("read stdin");
    let extra = format!(
        "\n#define NBD_NULL_COMPLETION ((nbd_completion_callback) {{ .callback = NULL }})\n\
         #define LIBNBD_NAMESPACE_BASE \"base:\"\n\
         #define LIBNBD_CONTEXT_BASE_ALLOCATION \"base:allocation\"\n\
         #define LIBNBD_NAMESPACE_QEMU \"qemu:\"\n\
         #define LIBNBD_CONTEXT_QEMU_DIRTY_BITMAP \"qemu:dirty-bitmap:\"\n\
         #define LIBNBD_CONTEXT_QEMU_ALLOCATION_DEPTH \"qemu:allocation-depth\"\n\n{}\n{}\n",
        callback_macros(&text),
        have_macros()
    );
    let end = text.rfind("#endif").expect("include guard");
    text.insert_str(end, &extra);
    text
}

/// `nbd-capi/libnbd.pc.in` on stdin, with the two versions filled in; the
/// paths stay placeholders for `make install` (scripts/install.sh).
fn pkg_config() -> String {
    let mut text = String::new();
    std::io::Read::read_to_string(&mut std::io::stdin(), &mut text).expect("read stdin");
    text.replace("@NBD_RS_VERSION@", &identity::VERSION.to_string_lossy())
        .replace("@LIBNBD_VERSION@", &identity::LIBNBD_VERSION.to_string_lossy())
}

fn main() {
    match std::env::args().nth(1).as_deref() {
        Some("version-script") => print!("{}", version_script()),
        Some("have-macros") => print!("{}", have_macros()),
        Some("finish-header") => print!("{}", finish_header()),
        Some("pkg-config") => print!("{}", pkg_config()),
        _ => {
            eprintln!("usage: nbd-capi-gen version-script|have-macros|finish-header|pkg-config");
            std::process::exit(2);
        }
    }
}
