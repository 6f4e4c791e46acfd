//! What the caller chooses before (and, in opt mode, during) negotiation.

use crate::error::LocalError;
use crate::flags::{HandshakeFlags, StrictMode, TlsMode};
use crate::wire::MAX_STRING;

/// Client settings, with libnbd's defaults: fixed newstyle and no zeroes
/// if the server offers them, no TLS, structured replies and extended
/// headers requested, block sizes requested, all strict checks on, the
/// default export (`""`) and no meta contexts.
///
/// Passed to [`Connection::new`](crate::Connection::new); change it later
/// through [`Connection::config_mut`](crate::Connection::config_mut),
/// which allows it before connecting and in opt mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    export_name: String,
    meta_contexts: Vec<String>,
    /// Handshake flags the client is willing to use.
    pub handshake_flags: HandshakeFlags,
    /// Whether to send `NBD_OPT_STARTTLS` first, and what to do when the
    /// server refuses.
    pub tls: TlsMode,
    /// Send `NBD_OPT_STRUCTURED_REPLY` (chunked replies: holes in READ
    /// replies, block status, the DF flag).
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
    /// Which local checks commands go through before they are sent.
    pub strict: StrictMode,
    /// Keep the commands in flight when the transport fails in
    /// transmission, to send them again once the connection is
    /// restarted (see [`Connection::restart`](crate::Connection::restart)),
    /// rather than fail them. Off by default.
    pub keep_commands_on_loss: bool,
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
            keep_commands_on_loss: false,
        }
    }
}

impl Config {
    /// The export to ask the server for; `""` is the server's default.
    pub fn export_name(&self) -> &str {
        &self.export_name
    }

    /// Names the export to ask for. Fails with
    /// [`LocalError::NameTooLong`] beyond
    /// [`MAX_STRING`](crate::wire::MAX_STRING) bytes. On a live connection
    /// use [`Connection::set_export_name`](crate::Connection::set_export_name),
    /// which also forgets what the server said about the previous export.
    pub fn set_export_name(&mut self, name: &str) -> Result<(), LocalError> {
        check_string("export name", name)?;
        self.export_name = name.to_owned();
        Ok(())
    }

    /// The meta contexts to select with `NBD_OPT_SET_META_CONTEXT` (and
    /// to query by default with `NBD_OPT_LIST_META_CONTEXT`).
    pub fn meta_contexts(&self) -> &[String] {
        &self.meta_contexts
    }

    /// Adds a meta context to request, such as `base:allocation` (a
    /// name ending in `:` is a query for every context in that
    /// namespace). Fails with [`LocalError::NameTooLong`] beyond
    /// [`MAX_STRING`](crate::wire::MAX_STRING) bytes.
    pub fn add_meta_context(&mut self, name: &str) -> Result<(), LocalError> {
        check_string("meta context name", name)?;
        self.meta_contexts.push(name.to_owned());
        Ok(())
    }

    /// Forgets every meta context added.
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
