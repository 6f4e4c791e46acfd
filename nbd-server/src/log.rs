//! What the server says on stderr: errors always, connections and
//! requests that failed with `--verbose`.

#[derive(Debug, Clone, Copy, Default)]
pub struct Log {
    pub verbose: bool,
}

impl Log {
    pub fn error(&self, msg: String) {
        eprintln!("nbd-rs-server: {msg}");
    }

    /// `msg` is only made when it is printed.
    pub fn info(&self, msg: impl FnOnce() -> String) {
        if self.verbose {
            eprintln!("nbd-rs-server: {}", msg());
        }
    }
}
