//! The exported surface of libnbd 1.22.2: one row per function, the single
//! source of truth for the version script, the header's `LIBNBD_HAVE_*`
//! macros and the state check every export makes.
//!
//! Permitted states are those of libnbd's manual pages ("HANDLE STATE").

/// A set of public handle states.
pub type States = u8;
pub const CREATED: States = 1;
pub const CONNECTING: States = 2;
pub const NEGOTIATING: States = 4;
/// Ready or processing.
pub const CONNECTED: States = 8;
pub const CLOSED: States = 16;
pub const DEAD: States = 32;
pub const ANY: States = 63;

/// One exported function.
#[derive(Debug, Clone, Copy)]
pub struct Export {
    pub name: &'static str,
    /// The version node it belongs to (`LIBNBD_1.0` ...).
    pub node: &'static str,
    pub states: States,
    /// Whether the call can return an error at all.
    pub may_fail: bool,
}

const fn row(name: &'static str, node: &'static str, states: States, may_fail: bool) -> Export {
    Export { name, node, states, may_fail }
}

/// libnbd's version nodes in chain order: each inherits from the one before.
pub const NODES: [&str; 9] = [
    "LIBNBD_1.0",
    "LIBNBD_1.2",
    "LIBNBD_1.4",
    "LIBNBD_1.6",
    "LIBNBD_1.8",
    "LIBNBD_1.12",
    "LIBNBD_1.16",
    "LIBNBD_1.18",
    "LIBNBD_1.22",
];

/// This library's own version nodes, for its extension functions
/// (`nbd_rs_*`): outside libnbd's chain, so libnbd's nodes stay exactly
/// libnbd's and a name libnbd adds later can never clash with ours.
pub const EXTENSION_NODES: [&str; 1] = ["NBD_RS_0.1"];

#[rustfmt::skip]
pub const EXPORTS: &[Export] = &[
    row("nbd_add_meta_context", "LIBNBD_1.0", CREATED | NEGOTIATING, true),
    row("nbd_aio_block_status", "LIBNBD_1.0", CONNECTED, true),
    row("nbd_aio_block_status_64", "LIBNBD_1.18", CONNECTED, true),
    row("nbd_aio_block_status_filter", "LIBNBD_1.18", CONNECTED, true),
    row("nbd_aio_cache", "LIBNBD_1.0", CONNECTED, true),
    row("nbd_aio_command_completed", "LIBNBD_1.0", ANY, true),
    row("nbd_aio_connect", "LIBNBD_1.0", CREATED, true),
    row("nbd_aio_connect_command", "LIBNBD_1.0", CREATED, true),
    row("nbd_aio_connect_socket", "LIBNBD_1.2", CREATED, true),
    row("nbd_aio_connect_systemd_socket_activation", "LIBNBD_1.2", CREATED, true),
    row("nbd_aio_connect_tcp", "LIBNBD_1.0", CREATED, true),
    row("nbd_aio_connect_unix", "LIBNBD_1.0", CREATED, true),
    row("nbd_aio_connect_uri", "LIBNBD_1.0", CREATED, true),
    row("nbd_aio_connect_vsock", "LIBNBD_1.2", CREATED, true),
    row("nbd_aio_disconnect", "LIBNBD_1.0", CONNECTED, true),
    row("nbd_aio_flush", "LIBNBD_1.0", CONNECTED, true),
    row("nbd_aio_get_direction", "LIBNBD_1.0", ANY, false),
    row("nbd_aio_get_fd", "LIBNBD_1.0", ANY, true),
    row("nbd_aio_in_flight", "LIBNBD_1.0", CONNECTED | CLOSED | DEAD, true),
    row("nbd_aio_is_closed", "LIBNBD_1.0", ANY, false),
    row("nbd_aio_is_connecting", "LIBNBD_1.0", ANY, false),
    row("nbd_aio_is_created", "LIBNBD_1.0", ANY, false),
    row("nbd_aio_is_dead", "LIBNBD_1.0", ANY, false),
    row("nbd_aio_is_negotiating", "LIBNBD_1.4", ANY, false),
    row("nbd_aio_is_processing", "LIBNBD_1.0", ANY, false),
    row("nbd_aio_is_ready", "LIBNBD_1.0", ANY, false),
    row("nbd_aio_notify_read", "LIBNBD_1.0", ANY, true),
    row("nbd_aio_notify_write", "LIBNBD_1.0", ANY, true),
    row("nbd_aio_opt_abort", "LIBNBD_1.4", NEGOTIATING, true),
    row("nbd_aio_opt_extended_headers", "LIBNBD_1.18", NEGOTIATING, true),
    row("nbd_aio_opt_go", "LIBNBD_1.4", NEGOTIATING, true),
    row("nbd_aio_opt_info", "LIBNBD_1.4", NEGOTIATING, true),
    row("nbd_aio_opt_list", "LIBNBD_1.4", NEGOTIATING, true),
    row("nbd_aio_opt_list_meta_context", "LIBNBD_1.6", NEGOTIATING, true),
    row("nbd_aio_opt_list_meta_context_queries", "LIBNBD_1.16", NEGOTIATING, true),
    row("nbd_aio_opt_set_meta_context", "LIBNBD_1.16", NEGOTIATING, true),
    row("nbd_aio_opt_set_meta_context_queries", "LIBNBD_1.16", NEGOTIATING, true),
    row("nbd_aio_opt_starttls", "LIBNBD_1.16", NEGOTIATING, true),
    row("nbd_aio_opt_structured_reply", "LIBNBD_1.16", NEGOTIATING, true),
    row("nbd_aio_peek_command_completed", "LIBNBD_1.0", ANY, true),
    row("nbd_aio_pread", "LIBNBD_1.0", CONNECTED, true),
    row("nbd_aio_pread_structured", "LIBNBD_1.0", CONNECTED, true),
    row("nbd_aio_pwrite", "LIBNBD_1.0", CONNECTED, true),
    row("nbd_aio_trim", "LIBNBD_1.0", CONNECTED, true),
    row("nbd_aio_zero", "LIBNBD_1.0", CONNECTED, true),
    row("nbd_block_status", "LIBNBD_1.0", CONNECTED, true),
    row("nbd_block_status_64", "LIBNBD_1.18", CONNECTED, true),
    row("nbd_block_status_filter", "LIBNBD_1.18", CONNECTED, true),
    row("nbd_cache", "LIBNBD_1.0", CONNECTED, true),
    row("nbd_can_block_status_payload", "LIBNBD_1.18", NEGOTIATING | CONNECTED | CLOSED, true),
    row("nbd_can_cache", "LIBNBD_1.0", NEGOTIATING | CONNECTED | CLOSED, true),
    row("nbd_can_df", "LIBNBD_1.0", NEGOTIATING | CONNECTED | CLOSED, true),
    row("nbd_can_fast_zero", "LIBNBD_1.2", NEGOTIATING | CONNECTED | CLOSED, true),
    row("nbd_can_flush", "LIBNBD_1.0", NEGOTIATING | CONNECTED | CLOSED, true),
    row("nbd_can_fua", "LIBNBD_1.0", NEGOTIATING | CONNECTED | CLOSED, true),
    row("nbd_can_meta_context", "LIBNBD_1.0", NEGOTIATING | CONNECTED | CLOSED, true),
    row("nbd_can_multi_conn", "LIBNBD_1.0", NEGOTIATING | CONNECTED | CLOSED, true),
    row("nbd_can_trim", "LIBNBD_1.0", NEGOTIATING | CONNECTED | CLOSED, true),
    row("nbd_can_zero", "LIBNBD_1.0", NEGOTIATING | CONNECTED | CLOSED, true),
    row("nbd_clear_debug_callback", "LIBNBD_1.0", ANY, true),
    row("nbd_clear_meta_contexts", "LIBNBD_1.6", CREATED | NEGOTIATING, true),
    row("nbd_close", "LIBNBD_1.0", ANY, false),
    row("nbd_connect_command", "LIBNBD_1.0", CREATED, true),
    row("nbd_connect_socket", "LIBNBD_1.2", CREATED, true),
    row("nbd_connect_systemd_socket_activation", "LIBNBD_1.2", CREATED, true),
    row("nbd_connect_tcp", "LIBNBD_1.0", CREATED, true),
    row("nbd_connect_unix", "LIBNBD_1.0", CREATED, true),
    row("nbd_connect_uri", "LIBNBD_1.0", CREATED, true),
    row("nbd_connect_vsock", "LIBNBD_1.2", CREATED, true),
    row("nbd_connection_state", "LIBNBD_1.0", ANY, true),
    row("nbd_create", "LIBNBD_1.0", ANY, true),
    row("nbd_flush", "LIBNBD_1.0", CONNECTED, true),
    row("nbd_get_block_size", "LIBNBD_1.4", NEGOTIATING | CONNECTED | CLOSED, true),
    row("nbd_get_canonical_export_name", "LIBNBD_1.4", NEGOTIATING | CONNECTED | CLOSED, true),
    row("nbd_get_debug", "LIBNBD_1.0", ANY, false),
    row("nbd_get_errno", "LIBNBD_1.0", ANY, false),
    row("nbd_get_error", "LIBNBD_1.0", ANY, false),
    row("nbd_get_export_description", "LIBNBD_1.4", NEGOTIATING | CONNECTED | CLOSED, true),
    row("nbd_get_export_name", "LIBNBD_1.0", ANY, true),
    row("nbd_get_extended_headers_negotiated", "LIBNBD_1.18", NEGOTIATING | CONNECTED | CLOSED, true),
    row("nbd_get_full_info", "LIBNBD_1.4", ANY, true),
    row("nbd_get_handle_name", "LIBNBD_1.0", ANY, true),
    row("nbd_get_handshake_flags", "LIBNBD_1.2", ANY, false),
    row("nbd_get_meta_context", "LIBNBD_1.6", ANY, true),
    row("nbd_get_nr_meta_contexts", "LIBNBD_1.6", ANY, true),
    row("nbd_get_opt_mode", "LIBNBD_1.4", ANY, false),
    row("nbd_get_package_name", "LIBNBD_1.0", ANY, false),
    row("nbd_get_pread_initialize", "LIBNBD_1.12", ANY, false),
    row("nbd_get_private_data", "LIBNBD_1.8", ANY, false),
    row("nbd_get_protocol", "LIBNBD_1.2", NEGOTIATING | CONNECTED | CLOSED, true),
    row("nbd_get_request_block_size", "LIBNBD_1.12", ANY, true),
    row("nbd_get_request_extended_headers", "LIBNBD_1.18", ANY, false),
    row("nbd_get_request_meta_context", "LIBNBD_1.16", ANY, true),
    row("nbd_get_request_structured_replies", "LIBNBD_1.2", ANY, false),
    row("nbd_get_size", "LIBNBD_1.0", NEGOTIATING | CONNECTED | CLOSED, true),
    row("nbd_get_socket_activation_name", "LIBNBD_1.16", ANY, true),
    row("nbd_get_strict_mode", "LIBNBD_1.6", ANY, false),
    row("nbd_get_structured_replies_negotiated", "LIBNBD_1.2", NEGOTIATING | CONNECTED | CLOSED, true),
    row("nbd_get_subprocess_pid", "LIBNBD_1.22", ANY, true),
    row("nbd_get_tls", "LIBNBD_1.0", ANY, false),
    row("nbd_get_tls_hostname", "LIBNBD_1.22", ANY, true),
    row("nbd_get_tls_negotiated", "LIBNBD_1.2", NEGOTIATING | CONNECTED | CLOSED, true),
    row("nbd_get_tls_username", "LIBNBD_1.0", ANY, true),
    row("nbd_get_tls_verify_peer", "LIBNBD_1.0", ANY, false),
    row("nbd_get_uri", "LIBNBD_1.8", CONNECTING | NEGOTIATING | CONNECTED | CLOSED | DEAD, true),
    row("nbd_get_version", "LIBNBD_1.0", ANY, false),
    row("nbd_is_read_only", "LIBNBD_1.0", NEGOTIATING | CONNECTED | CLOSED, true),
    row("nbd_is_rotational", "LIBNBD_1.0", NEGOTIATING | CONNECTED | CLOSED, true),
    row("nbd_is_uri", "LIBNBD_1.22", ANY, true),
    row("nbd_kill_subprocess", "LIBNBD_1.0", ANY, true),
    row("nbd_opt_abort", "LIBNBD_1.4", NEGOTIATING, true),
    row("nbd_opt_extended_headers", "LIBNBD_1.18", NEGOTIATING, true),
    row("nbd_opt_go", "LIBNBD_1.4", NEGOTIATING, true),
    row("nbd_opt_info", "LIBNBD_1.4", NEGOTIATING, true),
    row("nbd_opt_list", "LIBNBD_1.4", NEGOTIATING, true),
    row("nbd_opt_list_meta_context", "LIBNBD_1.6", NEGOTIATING, true),
    row("nbd_opt_list_meta_context_queries", "LIBNBD_1.16", NEGOTIATING, true),
    row("nbd_opt_set_meta_context", "LIBNBD_1.16", NEGOTIATING, true),
    row("nbd_opt_set_meta_context_queries", "LIBNBD_1.16", NEGOTIATING, true),
    row("nbd_opt_starttls", "LIBNBD_1.16", NEGOTIATING, true),
    row("nbd_opt_structured_reply", "LIBNBD_1.16", NEGOTIATING, true),
    row("nbd_poll", "LIBNBD_1.0", ANY, true),
    row("nbd_poll2", "LIBNBD_1.16", ANY, true),
    row("nbd_pread", "LIBNBD_1.0", CONNECTED, true),
    row("nbd_pread_structured", "LIBNBD_1.0", CONNECTED, true),
    row("nbd_pwrite", "LIBNBD_1.0", CONNECTED, true),
    row("nbd_set_debug", "LIBNBD_1.0", ANY, true),
    row("nbd_set_debug_callback", "LIBNBD_1.0", ANY, true),
    row("nbd_set_export_name", "LIBNBD_1.0", CREATED | NEGOTIATING, true),
    row("nbd_set_full_info", "LIBNBD_1.4", CREATED | NEGOTIATING, true),
    row("nbd_set_handle_name", "LIBNBD_1.0", ANY, true),
    row("nbd_set_handshake_flags", "LIBNBD_1.2", CREATED, true),
    row("nbd_set_opt_mode", "LIBNBD_1.4", CREATED, true),
    row("nbd_set_pread_initialize", "LIBNBD_1.12", ANY, true),
    row("nbd_set_private_data", "LIBNBD_1.8", ANY, false),
    row("nbd_set_request_block_size", "LIBNBD_1.12", CREATED | NEGOTIATING, true),
    row("nbd_set_request_extended_headers", "LIBNBD_1.18", CREATED, true),
    row("nbd_set_request_meta_context", "LIBNBD_1.16", CREATED | NEGOTIATING, true),
    row("nbd_set_request_structured_replies", "LIBNBD_1.2", CREATED, true),
    row("nbd_set_socket_activation_name", "LIBNBD_1.16", CREATED, true),
    row("nbd_set_strict_mode", "LIBNBD_1.6", ANY, true),
    row("nbd_set_tls", "LIBNBD_1.0", CREATED, true),
    row("nbd_set_tls_certificates", "LIBNBD_1.0", CREATED, true),
    row("nbd_set_tls_hostname", "LIBNBD_1.22", CREATED, true),
    row("nbd_set_tls_psk_file", "LIBNBD_1.0", CREATED, true),
    row("nbd_set_tls_username", "LIBNBD_1.0", CREATED, true),
    row("nbd_set_tls_verify_peer", "LIBNBD_1.0", CREATED, true),
    row("nbd_set_uri_allow_local_file", "LIBNBD_1.2", CREATED, true),
    row("nbd_set_uri_allow_tls", "LIBNBD_1.2", CREATED, true),
    row("nbd_set_uri_allow_transports", "LIBNBD_1.2", CREATED, true),
    row("nbd_shutdown", "LIBNBD_1.0", NEGOTIATING | CONNECTED, true),
    row("nbd_stats_bytes_received", "LIBNBD_1.16", ANY, false),
    row("nbd_stats_bytes_sent", "LIBNBD_1.16", ANY, false),
    row("nbd_stats_chunks_received", "LIBNBD_1.16", ANY, false),
    row("nbd_stats_chunks_sent", "LIBNBD_1.16", ANY, false),
    row("nbd_supports_tls", "LIBNBD_1.0", ANY, false),
    row("nbd_supports_uri", "LIBNBD_1.0", ANY, false),
    row("nbd_supports_vsock", "LIBNBD_1.16", ANY, false),
    row("nbd_trim", "LIBNBD_1.0", CONNECTED, true),
    row("nbd_zero", "LIBNBD_1.0", CONNECTED, true),
    // This library's extensions, in EXTENSION_NODES.
    row("nbd_rs_concurrent_writer_error", "NBD_RS_0.1", ANY, true),
    row("nbd_rs_get_multi_conn", "NBD_RS_0.1", ANY, true),
    row("nbd_rs_get_open_timeout", "NBD_RS_0.1", ANY, true),
    row("nbd_rs_get_reconnect_count", "NBD_RS_0.1", ANY, true),
    row("nbd_rs_get_reconnect_delay", "NBD_RS_0.1", ANY, true),
    row("nbd_rs_get_version", "NBD_RS_0.1", ANY, false),
    row("nbd_rs_set_concurrent_writer", "NBD_RS_0.1", CREATED | CONNECTING | NEGOTIATING | CONNECTED, true),
    row("nbd_rs_set_multi_conn", "NBD_RS_0.1", CREATED, true),
    row("nbd_rs_set_open_timeout", "NBD_RS_0.1", CREATED, true),
    row("nbd_rs_set_reconnect_delay", "NBD_RS_0.1", CREATED, true),
];

/// The row for `name`, at compile time; a name missing from the table
/// fails the build.
pub const fn export(name: &str) -> Export {
    let mut i = 0;
    while i < EXPORTS.len() {
        if eq(EXPORTS[i].name, name) {
            return EXPORTS[i];
        }
        i += 1;
    }
    panic!("not in the export table")
}

const fn eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}
