//! What the caller chooses before (and, in opt mode, during) negotiation.

use crate::error::LocalError;
use crate::flags::{HandshakeFlags, StrictMode, TlsMode};
use crate::wire::MAX_STRING;

/// Client settings, with libnbd's defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    export_name: String,
    meta_contexts: Vec<String>,
    /// Handshake flags the client is willing to use.
    pub handshake_flags: HandshakeFlags,
    pub tls: TlsMode,
    pub request_structured_replies: bool,
    /// Extended headers also imply structured replies.
    pub request_extended_headers: bool,
    /// Send `NBD_OPT_SET_META_CONTEXT` with the configured contexts before
    /// `NBD_OPT_GO` and `NBD_OPT_INFO` (libnbd's `request_meta_context`).
    pub request_meta_context: bool,
    /// Ask for `NBD_INFO_BLOCK_SIZE`.
    pub request_block_size: bool,
    /// Ask for `NBD_INFO_NAME` and `NBD_INFO_DESCRIPTION`.
    pub full_info: bool,
    /// Stop after the automatic options and wait for `opt_*` commands.
    pub opt_mode: bool,
    pub strict: StrictMode,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            export_name: String::new(),
            meta_contexts: Vec::new(),
            handshake_flags: HandshakeFlags::all(),
            tls: TlsMode::Disable,
            request_structured_replies: true,
            request_extended_headers: true,
            request_meta_context: true,
            request_block_size: true,
            full_info: false,
            opt_mode: false,
            strict: StrictMode::default(),
        }
    }
}

impl Config {
    pub fn export_name(&self) -> &str {
        &self.export_name
    }

    pub fn set_export_name(&mut self, name: &str) -> Result<(), LocalError> {
        check_string("export name", name)?;
        self.export_name = name.to_owned();
        Ok(())
    }

    pub fn meta_contexts(&self) -> &[String] {
        &self.meta_contexts
    }

    pub fn add_meta_context(&mut self, name: &str) -> Result<(), LocalError> {
        check_string("meta context name", name)?;
        self.meta_contexts.push(name.to_owned());
        Ok(())
    }

    pub fn clear_meta_contexts(&mut self) {
        self.meta_contexts.clear();
    }
}

/// Whether `name`, as the server selected it, answers one of `queries`:
/// an exact name, or a query ending in ':' that is a prefix of it.
pub(crate) fn query_matches(queries: &[String], name: &str) -> bool {
    queries.iter().any(|q| q == name || (q.ends_with(':') && name.starts_with(q.as_str())))
}

/// Meta context queries for one option, each checked as a name is.
pub(crate) fn check_queries(queries: &[String]) -> Result<(), LocalError> {
    queries.iter().try_for_each(|q| check_string("meta context query", q))
}

fn check_string(what: &'static str, s: &str) -> Result<(), LocalError> {
    if s.len() > MAX_STRING {
        return Err(LocalError::NameTooLong(what));
    }
    Ok(())
}
