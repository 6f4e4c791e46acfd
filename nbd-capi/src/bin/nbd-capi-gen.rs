//! Writes the files that come from the export table: the linker version
//! script (`version-script`) and the header's `LIBNBD_HAVE_*` lines
//! (`have-macros`).

use nbd::table::{EXPORTS, NODES};

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
    out
}

fn have_macros() -> String {
    EXPORTS.iter().map(|e| format!("#define LIBNBD_HAVE_{} 1\n", e.name.to_uppercase())).collect()
}

fn main() {
    match std::env::args().nth(1).as_deref() {
        Some("version-script") => print!("{}", version_script()),
        Some("have-macros") => print!("{}", have_macros()),
        _ => {
            eprintln!("usage: nbd-capi-gen version-script|have-macros");
            std::process::exit(2);
        }
    }
}
