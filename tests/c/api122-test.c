/* The functions libnbd added after 1.14 (LIBNBD_1.16, 1.18 and 1.22),
 * against real servers: nbdkit (no extended headers), nbdkit with PSK
 * TLS, and qemu-nbd (extended headers, block status payloads, several
 * meta contexts). It cannot run on Debian's libnbd 1.14, which lacks
 * these symbols: tests/c-compare.sh runs it on libnbd 1.22.2 built here
 * ("reference") and on ours, and it must pass on both.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "servers.h"

/* NULL where the header says an argument must not be NULL: through a
 * volatile, so that the compiler does not refuse the call. */
static void *volatile null_ptr;

/* Context names a callback reported, and how often its free ran. */
struct names {
  int n, freed;
  char name[8][128];
};

static int
collect (void *p, const char *name)
{
  struct names *m = p;
  if (m->n < 8) snprintf (m->name[m->n], sizeof m->name[0], "%s", name);
  m->n++;
  return 0;
}

static void
names_free (void *p)
{
  ((struct names *) p)->freed++;
}

static bool
has_name (const struct names *m, const char *name)
{
  for (int i = 0; i < m->n && i < 8; i++)
    if (strcmp (m->name[i], name) == 0) return true;
  return false;
}

static nbd_context_callback
collector (struct names *m)
{
  memset (m, 0, sizeof *m);
  return (nbd_context_callback) { .callback = collect, .user_data = m, .free = names_free };
}

/* An asynchronous call's completion: how often it ran, with what errno. */
struct done {
  int called, err, freed;
};

static int
record_done (void *p, int *err)
{
  struct done *d = p;
  d->called++;
  d->err = *err;
  return 0;
}

static void
done_free (void *p)
{
  ((struct done *) p)->freed++;
}

static nbd_completion_callback
completion (struct done *d)
{
  memset (d, 0, sizeof *d);
  return (nbd_completion_callback) { .callback = record_done, .user_data = d, .free = done_free };
}

/* Polls until the completion ran (or the handle cannot make progress). */
static void
wait_done (struct nbd_handle *h, struct done *d)
{
  while (!d->called && nbd_poll (h, 5000) == 1)
    ;
}

/* What an extent64 callback saw: one record per call (per context). */
struct extents {
  int calls, freed;
  char ctx[4][128];
  size_t n[4];
  nbd_extent first[4];
  uint64_t total[4];
};

static int
collect_extents (void *p, const char *meta, uint64_t offset, nbd_extent *e, size_t n, int *err)
{
  struct extents *x = p;
  (void) offset; (void) err;
  if (x->calls < 4) {
    int i = x->calls;
    snprintf (x->ctx[i], sizeof x->ctx[0], "%s", meta);
    x->n[i] = n;
    x->first[i] = n ? e[0] : (nbd_extent) { 0, 0 };
    for (size_t j = 0; j < n; j++) x->total[i] += e[j].length;
  }
  x->calls++;
  return 0;
}

static void
extents_free (void *p)
{
  ((struct extents *) p)->freed++;
}

static nbd_extent64_callback
extent_collector (struct extents *x)
{
  memset (x, 0, sizeof *x);
  return (nbd_extent64_callback) { .callback = collect_extents, .user_data = x, .free = extents_free };
}

static int
extent_index (const struct extents *x, const char *ctx)
{
  for (int i = 0; i < x->calls && i < 4; i++)
    if (strcmp (x->ctx[i], ctx) == 0) return i;
  return -1;
}

/* ---------------------------------------------------------------------- */
/* 1. Without a server: settings, the stateless calls, state errors. */

static void
test_handle (void)
{
  struct nbd_handle *h = nbd_create ();
  char name33[34];

  CHECK (str_is (strdup (nbd_get_version (h)), "1.22.2"), "version is 1.22.2");
  CHECK (nbd_supports_vsock (h) == 1, "supports_vsock");
  CHECK (nbd_is_uri (h, "nbd://example.com/") == 1, "is_uri nbd://");
  CHECK (nbd_is_uri (h, "NBDS+UNIX:///?socket=/s") == 1, "is_uri is case-insensitive");
  CHECK (nbd_is_uri (h, "nbd+vsock://1") == 1, "is_uri nbd+vsock://");
  CHECK (nbd_is_uri (h, "nbds+ssh://host/") == 1, "is_uri nbds+ssh://");
  CHECK (nbd_is_uri (h, "nbd:/nohost") == 0, "is_uri nbd:/ is not");
  CHECK (nbd_is_uri (h, "/tmp/disk.img") == 0, "is_uri a file name is not");
  CHECK (nbd_is_uri (h, "") == 0, "is_uri empty is not");
  CHECK_ERR (nbd_is_uri (h, null_ptr), "nbd_is_uri", EFAULT);

  /* Counters start at zero and cannot fail. */
  CHECK (nbd_stats_bytes_sent (h) == 0 && nbd_stats_bytes_received (h) == 0 &&
         nbd_stats_chunks_sent (h) == 0 && nbd_stats_chunks_received (h) == 0, "stats start at 0");

  CHECK (nbd_get_strict_mode (h) == LIBNBD_STRICT_MASK, "strict default 0x7f");
  CHECK (LIBNBD_STRICT_MASK == 0x7f && LIBNBD_CMD_FLAG_MASK == 0x3f &&
         LIBNBD_ALLOW_TRANSPORT_MASK == 0x0f, "1.22 masks");
  CHECK (nbd_set_strict_mode (h, LIBNBD_STRICT_PAYLOAD | LIBNBD_STRICT_AUTO_FLAG) == 0 &&
         nbd_get_strict_mode (h) == (LIBNBD_STRICT_PAYLOAD | LIBNBD_STRICT_AUTO_FLAG), "strict new bits");
  CHECK_ERR (nbd_set_strict_mode (h, 0x80), "nbd_set_strict_mode", EINVAL);
  CHECK (nbd_set_strict_mode (h, LIBNBD_STRICT_MASK) == 0, "strict back");
  CHECK (nbd_set_uri_allow_transports (h, LIBNBD_ALLOW_TRANSPORT_SSH) == 0, "ssh transport bit accepted");
  CHECK_ERR (nbd_set_uri_allow_transports (h, 0x10), "nbd_set_uri_allow_transports", EINVAL);

  CHECK (str_is (nbd_get_tls_hostname (h), ""), "tls_hostname default empty");
  CHECK (nbd_set_tls_hostname (h, "server.example.com") == 0, "set_tls_hostname");
  CHECK (str_is (nbd_get_tls_hostname (h), "server.example.com"), "tls_hostname read back");
  CHECK_ERR (nbd_set_tls_hostname (h, null_ptr), "nbd_set_tls_hostname", EFAULT);

  CHECK (str_is (nbd_get_socket_activation_name (h), ""), "socket_activation_name default empty");
  CHECK (nbd_set_socket_activation_name (h, "disk0") == 0, "set_socket_activation_name");
  CHECK (str_is (nbd_get_socket_activation_name (h), "disk0"), "socket_activation_name read back");
  CHECK_ERR (nbd_set_socket_activation_name (h, "a-b"), "nbd_set_socket_activation_name", EINVAL);
  memset (name33, 'x', 33); name33[33] = 0;
  CHECK_ERR (nbd_set_socket_activation_name (h, name33), "nbd_set_socket_activation_name", ENAMETOOLONG);
  CHECK (str_is (nbd_get_socket_activation_name (h), "disk0"), "a refused name changes nothing");
  CHECK (nbd_set_socket_activation_name (h, "") == 0 &&
         str_is (nbd_get_socket_activation_name (h), ""), "empty name resets");

  CHECK (nbd_get_request_meta_context (h) == 1, "request_meta_context default");
  CHECK (nbd_set_request_meta_context (h, false) == 0 && nbd_get_request_meta_context (h) == 0,
         "request_meta_context off");
  CHECK (nbd_get_request_extended_headers (h) == 1, "request_extended_headers default");
  CHECK (nbd_set_request_extended_headers (h, false) == 0 && nbd_get_request_extended_headers (h) == 0,
         "request_extended_headers off");

  CHECK_ERR (nbd_get_subprocess_pid (h), "nbd_get_subprocess_pid", ESRCH);
  CHECK_ERR (nbd_get_extended_headers_negotiated (h), "nbd_get_extended_headers_negotiated", ENOTCONN);
  CHECK_ERR (nbd_can_block_status_payload (h), "nbd_can_block_status_payload", ENOTCONN);
  CHECK_ERR (nbd_opt_starttls (h), "nbd_opt_starttls", ENOTCONN);
  CHECK_ERR (nbd_opt_structured_reply (h), "nbd_opt_structured_reply", ENOTCONN);
  CHECK_ERR (nbd_opt_extended_headers (h), "nbd_opt_extended_headers", ENOTCONN);
  {
    struct names m;
    struct done d;
    CHECK_ERR (nbd_opt_set_meta_context (h, collector (&m)), "nbd_opt_set_meta_context", ENOTCONN);
    CHECK (m.freed == 1 && m.n == 0, "refused call frees its callback once");
    CHECK_ERR (nbd_aio_opt_starttls (h, completion (&d)), "nbd_aio_opt_starttls", ENOTCONN);
    CHECK (d.freed == 1 && d.called == 0, "refused aio call frees its completion once");
  }
  {
    struct extents x;
    CHECK_ERR (nbd_block_status_64 (h, 512, 0, extent_collector (&x), 0), "nbd_block_status_64", ENOTCONN);
    CHECK (x.freed == 1, "block_status_64 refused: callback freed");
  }
  CHECK_ERR (nbd_poll2 (h, -1, 0), "nbd_poll2", EINVAL);
  nbd_close (h);
}

/* ---------------------------------------------------------------------- */
/* 2. nbdkit, which has structured replies and base:allocation but no
 * extended headers: the opt_* calls one by one, block_status_64, poll2,
 * the counters. */

static void
test_nbdkit_opt (const char *sock)
{
  struct nbd_handle *h = nbd_create ();
  struct names m;
  struct done d;
  char *base_q[] = { "base:", NULL }, *none[] = { NULL };
  char *ctx_q[] = { LIBNBD_CONTEXT_BASE_ALLOCATION, NULL };

  CHECK (nbd_set_opt_mode (h, true) == 0, "opt mode");
  CHECK (nbd_set_request_structured_replies (h, false) == 0, "no structured replies at first");
  CHECK (nbd_connect_unix (h, sock) == 0, "nbdkit: connect");
  CHECK (nbd_aio_is_negotiating (h) == 1, "negotiating");
  CHECK (nbd_get_structured_replies_negotiated (h) == 0, "no structured replies yet");
  CHECK (nbd_get_extended_headers_negotiated (h) == 0, "no extended headers");
  CHECK (nbd_can_block_status_payload (h) == -1, "no export flags yet");
  CHECK (nbd_can_meta_context (h, LIBNBD_CONTEXT_BASE_ALLOCATION) == 0, "can_meta_context: nothing configured");
  CHECK (nbd_add_meta_context (h, LIBNBD_CONTEXT_BASE_ALLOCATION) == 0, "configure base:allocation");
  CHECK_ERR (nbd_can_meta_context (h, LIBNBD_CONTEXT_BASE_ALLOCATION), "nbd_can_meta_context", EINVAL);
  CHECK (nbd_clear_meta_contexts (h) == 0, "clear again");
  CHECK_ERR (nbd_set_request_extended_headers (h, true), "nbd_set_request_extended_headers", EINVAL);
  CHECK (nbd_set_request_meta_context (h, true) == 0, "set_request_meta_context while negotiating");
  CHECK_ERR (nbd_set_tls_hostname (h, "x"), "nbd_set_tls_hostname", EINVAL);
  CHECK_ERR (nbd_set_socket_activation_name (h, "x"), "nbd_set_socket_activation_name", EINVAL);

  /* 1.22 asks the server even without structured replies (1.14 refused
   * locally with ENOTSUP); nbdkit answers. */
  CHECK (nbd_opt_list_meta_context (h, collector (&m)) == 1 && has_name (&m, LIBNBD_CONTEXT_BASE_ALLOCATION),
         "list_meta_context without structured replies (%d)", m.n);

  /* nbdkit 1.32 does not know NBD_OPT_EXTENDED_HEADERS: false, not an error. */
  CHECK (nbd_opt_extended_headers (h) == 0, "opt_extended_headers refused");
  CHECK (nbd_aio_is_negotiating (h) == 1 && nbd_get_extended_headers_negotiated (h) == 0,
         "still negotiating, no extended headers");
  CHECK (nbd_opt_structured_reply (h) == 1, "opt_structured_reply");
  CHECK (nbd_get_structured_replies_negotiated (h) == 1, "structured replies now");
  CHECK (nbd_opt_structured_reply (h) != -1, "a second structured reply request is no error");
  CHECK (nbd_get_structured_replies_negotiated (h) == 1, "structured replies stay");
  /* No TLS configured in nbdkit: refused, plaintext goes on. */
  CHECK (nbd_opt_starttls (h) == 0, "opt_starttls refused");
  CHECK (nbd_aio_is_negotiating (h) == 1 && nbd_get_tls_negotiated (h) == 0, "still plaintext");

  /* Meta contexts: list with queries, then select. */
  CHECK (nbd_opt_list_meta_context_queries (h, base_q, collector (&m)) == 1 && m.n == 1 &&
         has_name (&m, LIBNBD_CONTEXT_BASE_ALLOCATION), "list base: (%d)", m.n);
  CHECK (m.freed == 1, "list callback freed once");
  CHECK (nbd_opt_list_meta_context_queries (h, none, collector (&m)) >= 1 &&
         has_name (&m, LIBNBD_CONTEXT_BASE_ALLOCATION), "no queries lists all (%d)", m.n);
  CHECK (nbd_get_nr_meta_contexts (h) == 0, "queries do not touch the configured list");
  CHECK (nbd_opt_set_meta_context_queries (h, (char *[]) { "qemu:nosuch", NULL }, collector (&m)) == 0 &&
         m.n == 0, "set unknown selects none");
  CHECK (nbd_opt_set_meta_context (h, collector (&m)) == 0 && m.n == 0, "set with none configured");
  CHECK (nbd_opt_set_meta_context_queries (h, ctx_q, collector (&m)) == 1 && m.n == 1 &&
         has_name (&m, LIBNBD_CONTEXT_BASE_ALLOCATION) && m.freed == 1, "set base:allocation");
  CHECK (nbd_can_meta_context (h, LIBNBD_CONTEXT_BASE_ALLOCATION) == 1, "can_meta_context before go");
  CHECK (nbd_add_meta_context (h, LIBNBD_CONTEXT_BASE_ALLOCATION) == 0, "configure a context");
  CHECK (nbd_can_meta_context (h, "qemu:nosuch") == 0, "can_meta_context: not selected");
  CHECK (nbd_clear_meta_contexts (h) == 0, "clear");
  CHECK_ERR (nbd_opt_set_meta_context_queries (h, null_ptr, collector (&m)), "nbd_opt_set_meta_context_queries",
             EFAULT);
  CHECK (m.freed == 1, "EFAULT: callback freed");
  CHECK_ERR (nbd_opt_list_meta_context_queries (h, ctx_q, (nbd_context_callback) { .callback = NULL }),
             "nbd_opt_list_meta_context_queries", EFAULT);

  /* The asynchronous forms. */
  CHECK (nbd_aio_opt_extended_headers (h, completion (&d)) == 0, "aio_opt_extended_headers");
  wait_done (h, &d);
  CHECK (d.called == 1 && d.err != 0 && d.freed == 1, "aio extended headers refused (err %d)", d.err);
  CHECK (nbd_aio_opt_structured_reply (h, completion (&d)) == 0, "aio_opt_structured_reply");
  wait_done (h, &d);
  CHECK (d.called == 1 && d.freed == 1, "aio structured reply completed");
  CHECK (nbd_aio_opt_starttls (h, completion (&d)) == 0, "aio_opt_starttls");
  wait_done (h, &d);
  CHECK (d.called == 1 && d.err != 0 && d.freed == 1, "aio starttls refused (err %d)", d.err);
  {
    struct names lm;
    CHECK (nbd_aio_opt_list_meta_context_queries (h, base_q, collector (&lm), completion (&d)) == 0,
           "aio_opt_list_meta_context_queries");
    wait_done (h, &d);
    CHECK (d.called == 1 && d.err == 0 && lm.n == 1 && lm.freed == 1, "aio list queries (%d)", lm.n);
    CHECK (nbd_aio_opt_set_meta_context (h, collector (&lm), completion (&d)) == 0, "aio_opt_set_meta_context");
    wait_done (h, &d);
    CHECK (d.called == 1 && d.err == 0 && lm.n == 0 && lm.freed == 1, "aio set, none configured");
    CHECK (nbd_aio_opt_set_meta_context_queries (h, ctx_q, collector (&lm), completion (&d)) == 0,
           "aio_opt_set_meta_context_queries");
    wait_done (h, &d);
    CHECK (d.called == 1 && d.err == 0 && lm.n == 1 && lm.freed == 1, "aio set queries (%d)", lm.n);
  }

  /* Without the automatic request, GO keeps what SET selected. */
  CHECK (nbd_set_request_meta_context (h, false) == 0, "request_meta_context off");
  CHECK (nbd_opt_go (h) == 0, "go");
  CHECK (nbd_can_meta_context (h, LIBNBD_CONTEXT_BASE_ALLOCATION) == 1, "selected context kept by go");
  CHECK (nbd_get_extended_headers_negotiated (h) == 0, "EH after go");
  CHECK (nbd_can_block_status_payload (h) == 0, "no block status payload without extended headers");
  {
    /* The largest payload: the advertised maximum within 1M..64M, 32M if none. */
    int64_t max = nbd_get_block_size (h, LIBNBD_SIZE_MAXIMUM), want = 32 << 20;
    if (max > 0) want = max < (1 << 20) ? (1 << 20) : max > (64 << 20) ? (64 << 20) : max;
    CHECK (nbd_get_block_size (h, LIBNBD_SIZE_PAYLOAD) == want, "SIZE_PAYLOAD: %" PRId64 " (max %" PRId64 ")",
           nbd_get_block_size (h, LIBNBD_SIZE_PAYLOAD), max);
  }

  /* Data in the first 64 KiB, the rest a hole. */
  {
    static char buf[65536];
    struct extents x;
    memset (buf, 0x5a, sizeof buf);
    CHECK (nbd_pwrite (h, buf, sizeof buf, 0, 0) == 0, "pwrite");
    CHECK (nbd_block_status_64 (h, 1 << 20, 0, extent_collector (&x), 0) == 0, "block_status_64");
    CHECK (x.calls == 1 && strcmp (x.ctx[0], LIBNBD_CONTEXT_BASE_ALLOCATION) == 0, "one context (%d)", x.calls);
    CHECK (x.n[0] >= 2 && x.first[0].length == 65536 && x.first[0].flags == 0, "data extent first");
    CHECK (x.total[0] == 1 << 20, "extents cover the request (%" PRIu64 ")", x.total[0]);
    CHECK (x.freed == 1, "extent64 freed once");
    CHECK (nbd_block_status_64 (h, 1 << 20, 0, extent_collector (&x), LIBNBD_CMD_FLAG_REQ_ONE) == 0 &&
           x.n[0] == 1, "REQ_ONE: one extent");
    CHECK_ERR (nbd_block_status_64 (h, 512, 0, extent_collector (&x), LIBNBD_CMD_FLAG_FUA),
               "nbd_block_status_64", EINVAL);
    CHECK_ERR (nbd_block_status_64 (h, 512, 0, (nbd_extent64_callback) { .callback = NULL }, 0),
               "nbd_block_status_64", EFAULT);
    /* A filter needs extended headers. */
    CHECK_ERR (nbd_block_status_filter (h, 512, 0, (char *[]) { LIBNBD_CONTEXT_BASE_ALLOCATION, NULL },
                                        extent_collector (&x), 0), "nbd_block_status_filter", ENOTSUP);
    CHECK (x.freed == 1 && x.calls == 0, "refused filter: callback freed, not called");
    CHECK (nbd_set_strict_mode (h, LIBNBD_STRICT_MASK & ~LIBNBD_STRICT_AUTO_FLAG) == 0, "no auto flag");
    CHECK_ERR (nbd_block_status_filter (h, 512, 0, (char *[]) { LIBNBD_CONTEXT_BASE_ALLOCATION, NULL },
                                        extent_collector (&x), LIBNBD_CMD_FLAG_PAYLOAD_LEN),
               "nbd_block_status_filter", EINVAL);
    CHECK (nbd_set_strict_mode (h, LIBNBD_STRICT_MASK) == 0, "strict back");
    CHECK_ERR (nbd_aio_block_status_filter (h, 512, 0, null_ptr, extent_collector (&x), NBD_NULL_COMPLETION, 0),
               "nbd_aio_block_status_filter", EFAULT);
  }

  /* poll2: the extra descriptor wakes it too. */
  {
    int p[2];
    struct extents x;
    int64_t c;
    CHECK (pipe (p) == 0, "pipe");
    CHECK (nbd_poll2 (h, p[0], 0) == 0, "poll2: nothing ready");
    CHECK (write (p[1], "x", 1) == 1, "pipe write");
    CHECK (nbd_poll2 (h, p[0], 1000) == 1, "poll2: woken by the extra fd");
    c = nbd_aio_block_status_64 (h, 1 << 20, 0, extent_collector (&x), completion (&d), 0);
    CHECK (c > 0, "aio_block_status_64");
    while (nbd_aio_command_completed (h, c) == 0)
      if (nbd_poll2 (h, -1, 5000) != 1) break;
    CHECK (d.called == 1 && d.err == 0 && x.calls == 1 && x.first[0].length == 65536,
           "aio_block_status_64 completed through poll2");
    CHECK (x.freed == 1 && d.freed == 1, "aio callbacks freed once");
    close (p[0]); close (p[1]);
  }

  /* Counters: one 512-byte read is one request and one reply chunk. */
  {
    char buf[512];
    uint64_t bs = nbd_stats_bytes_sent (h), br = nbd_stats_bytes_received (h);
    uint64_t cs = nbd_stats_chunks_sent (h), cr = nbd_stats_chunks_received (h);
    CHECK (bs > 0 && br > 0 && cs > 0 && cr > 0, "stats counted the session so far");
    CHECK (nbd_pread (h, buf, sizeof buf, 0, 0) == 0, "pread");
    CHECK (nbd_stats_chunks_sent (h) == cs + 1, "one chunk sent (%" PRIu64 ")", nbd_stats_chunks_sent (h) - cs);
    CHECK (nbd_stats_bytes_sent (h) == bs + 28, "a 28-byte request (%" PRIu64 ")", nbd_stats_bytes_sent (h) - bs);
    CHECK (nbd_stats_chunks_received (h) == cr + 1, "one reply chunk (%" PRIu64 ")",
           nbd_stats_chunks_received (h) - cr);
    CHECK (nbd_stats_bytes_received (h) == br + 20 + 8 + 512, "reply bytes (%" PRIu64 ")",
           nbd_stats_bytes_received (h) - br);
  }
  CHECK (nbd_shutdown (h, 0) == 0, "shutdown");
  CHECK (nbd_get_extended_headers_negotiated (h) == 0 && nbd_can_block_status_payload (h) == 0,
         "after shutdown: still answered");
  CHECK (nbd_stats_chunks_sent (h) > 0, "stats after shutdown");
  nbd_close (h);

  /* A fresh connection's counters: the greeting is the first chunk in. */
  h = nbd_create ();
  CHECK (nbd_set_opt_mode (h, true) == 0 && nbd_set_request_structured_replies (h, false) == 0 &&
         nbd_connect_unix (h, sock) == 0, "counters: connect");
  CHECK (nbd_stats_chunks_received (h) == 1, "greeting counted (%" PRIu64 ")", nbd_stats_chunks_received (h));
  CHECK (nbd_stats_chunks_sent (h) == 0, "no option sent yet (%" PRIu64 ")", nbd_stats_chunks_sent (h));
  CHECK (nbd_stats_bytes_received (h) == 18 && nbd_stats_bytes_sent (h) == 4,
         "greeting and flags (%" PRIu64 "/%" PRIu64 ")", nbd_stats_bytes_received (h), nbd_stats_bytes_sent (h));
  CHECK (nbd_opt_structured_reply (h) == 1, "counters: structured reply");
  CHECK (nbd_stats_chunks_sent (h) == 1 && nbd_stats_chunks_received (h) == 1,
         "an option is a chunk sent; its reply is not counted");
  /* 1.22 lets nbd_shutdown end negotiation (with NBD_OPT_ABORT). */
  CHECK_ERR (nbd_shutdown (h, 0x1), "nbd_shutdown", EINVAL);
  CHECK (nbd_shutdown (h, 0) == 0 && nbd_aio_is_closed (h) == 1, "shutdown while negotiating");
  CHECK (nbd_stats_chunks_sent (h) == 2, "the abort was sent");
  nbd_close (h);
}

/* ---------------------------------------------------------------------- */
/* 3. nbdkit with PSK TLS (--tls=on): opt_starttls by hand. */

static void
test_nbdkit_starttls (void)
{
  char *keys = path_in_dir ("keys.psk"), *sock = path_in_dir ("tls.sock");
  char *psk[] = { "psktool", "-u", "alice", "-p", keys, NULL };
  char *args[] = { "--tls=on", "--tls-psk", keys, "memory", "1M", NULL };
  struct nbd_handle *h;
  struct done d;
  char buf[512];

  run (psk);
  start_nbdkit_unix ("tls.sock", args);

  h = nbd_create ();
  CHECK (nbd_set_opt_mode (h, true) == 0 && nbd_set_tls_psk_file (h, keys) == 0 &&
         nbd_set_tls_username (h, "alice") == 0, "tls: settings");
  CHECK (nbd_connect_unix (h, sock) == 0, "tls: connect in plaintext");
  CHECK (nbd_get_tls_negotiated (h) == 0, "tls: not yet");
  CHECK (nbd_opt_starttls (h) == 1, "opt_starttls");
  CHECK (nbd_get_tls_negotiated (h) == 1, "tls negotiated");
  CHECK (nbd_aio_is_negotiating (h) == 1, "still negotiating after starttls");
  CHECK (nbd_get_structured_replies_negotiated (h) == 0, "structured replies forgotten inside TLS");
  CHECK (nbd_opt_starttls (h) == 0, "a second starttls is refused");
  CHECK (nbd_get_tls_negotiated (h) == 1, "TLS stays");
  CHECK (nbd_opt_structured_reply (h) == 1, "structured reply inside TLS");
  CHECK (nbd_opt_go (h) == 0, "tls: go");
  CHECK (nbd_pread (h, buf, sizeof buf, 0, 0) == 0, "tls: pread");
  CHECK (nbd_stats_bytes_received (h) > 512, "plaintext counted under TLS");
  nbd_close (h);

  /* The asynchronous form. */
  h = nbd_create ();
  CHECK (nbd_set_opt_mode (h, true) == 0 && nbd_set_tls_psk_file (h, keys) == 0 &&
         nbd_set_tls_username (h, "alice") == 0 && nbd_connect_unix (h, sock) == 0, "tls aio: connect");
  CHECK (nbd_aio_opt_starttls (h, completion (&d)) == 0, "aio_opt_starttls");
  wait_done (h, &d);
  CHECK (d.called == 1 && d.err == 0 && d.freed == 1, "aio starttls completed (err %d)", d.err);
  CHECK (nbd_get_tls_negotiated (h) == 1, "tls aio: negotiated");
  CHECK (nbd_opt_go (h) == 0 && nbd_pread (h, buf, sizeof buf, 0, 0) == 0, "tls aio: go and read");
  nbd_close (h);
  free (keys); free (sock);
}

/* LIBNBD_STRICT_PAYLOAD: writes no larger than LIBNBD_SIZE_PAYLOAD; off,
 * up to libnbd's own 64 MiB limit. */
static void
test_payload_limit (void)
{
  char *args[] = { "memory", "128M", NULL }, *sock = path_in_dir ("big.sock");
  struct nbd_handle *h = nbd_create ();
  int64_t max;
  char *buf;

  start_nbdkit_unix ("big.sock", args);
  CHECK (nbd_set_request_block_size (h, false) == 0 && nbd_connect_unix (h, sock) == 0, "payload: connect");
  max = nbd_get_block_size (h, LIBNBD_SIZE_PAYLOAD);
  CHECK (max == (nbd_get_block_size (h, LIBNBD_SIZE_MAXIMUM) ? 64 << 20 : 32 << 20), "payload: %" PRId64, max);
  buf = calloc (1, (64 << 20) + 4096);
  if (buf == NULL) fatal ("calloc");
  CHECK (nbd_pwrite (h, buf, max, 0, 0) == 0, "payload: a write of the maximum");
  CHECK_ERR (nbd_pwrite (h, buf, max + 4096, 0, 0), "nbd_pwrite", ERANGE);
  CHECK_ERR (nbd_aio_pwrite (h, buf, max + 4096, 0, NBD_NULL_COMPLETION, 0), "nbd_aio_pwrite", ERANGE);
  CHECK (nbd_set_strict_mode (h, LIBNBD_STRICT_MASK & ~LIBNBD_STRICT_PAYLOAD) == 0, "payload: strict off");
  if (max < 64 << 20)
    CHECK (nbd_pwrite (h, buf, max + 4096, 0, 0) == 0, "payload: larger with STRICT_PAYLOAD off");
  CHECK_ERR (nbd_pwrite (h, buf, (64 << 20) + 4096, 0, 0), "nbd_pwrite", ERANGE);
  nbd_close (h);
  free (buf); free (sock);
}

/* An X.509 server whose certificate names "otherhost", reached over TCP
 * as localhost: the name checked is set_tls_hostname's when set. */
static void
test_tls_hostname (void)
{
  char *certs = path_in_dir ("certs"), *server, *client;
  char *gen[] = { "tests/tls-certs.sh", certs, NULL };
  int port = free_port (AF_INET);
  char portstr[16], *pidfile = path_in_dir ("x509.pid");
  struct nbd_handle *h;

  if (access (gen[0], X_OK) != 0) fatal ("%s not found: run from the repository root", gen[0]);
  run (gen);
  if (asprintf (&server, "%s/server-other", certs) == -1 || asprintf (&client, "%s/client-ca", certs) == -1)
    fatal ("asprintf");
  snprintf (portstr, sizeof portstr, "%d", port);
  {
    char *argv[] = { "nbdkit", "-f", "--exit-with-parent", "-i", "127.0.0.1", "-p", portstr, "-P", pidfile,
                     "--tls=require", "--tls-certificates", server, "memory", "1M", NULL };
    wait_ready ("nbdkit (x509)", spawn (argv, -1, -1), pidfile, NULL, port, false);
  }
  for (int named = 0; named <= 1; named++) {
    h = nbd_create ();
    CHECK (nbd_set_tls (h, LIBNBD_TLS_REQUIRE) == 0 && nbd_set_tls_certificates (h, client) == 0,
           "x509: settings");
    if (named) CHECK (nbd_set_tls_hostname (h, "otherhost") == 0, "x509: set_tls_hostname");
    if (named) {
      CHECK (nbd_connect_tcp (h, "localhost", portstr) == 0, "x509: the certificate names the TLS host name");
      CHECK (nbd_get_tls_negotiated (h) == 1, "x509: TLS");
      CHECK (str_is (nbd_get_tls_hostname (h), "otherhost"), "x509: tls_hostname after connect");
    }
    else
      CHECK (nbd_connect_tcp (h, "localhost", portstr) == -1, "x509: localhost is not otherhost");
    nbd_close (h);
  }
  free (certs); free (server); free (client); free (pidfile);
}

/* ---------------------------------------------------------------------- */
/* 4. qemu-nbd: extended headers, several contexts, filtered status. */

static void
test_qemu (void)
{
  char *img = path_in_dir ("bitmap.qcow2"), *sock = path_in_dir ("qemu.sock");
  char *pidfile = path_in_dir ("qemu.pid");
  char *create[] = { "qemu-img", "create", "-q", "-f", "qcow2", img, "4M", NULL };
  char *bitmap[] = { "qemu-img", "bitmap", "--add", img, "bm0", NULL };
  char *argv[] = { "qemu-nbd", "-k", sock, "-f", "qcow2", "-t", "-A", "-B", "bm0",
                   "--pid-file", pidfile, img, NULL };
  const char *depth = LIBNBD_CONTEXT_QEMU_ALLOCATION_DEPTH, *base = LIBNBD_CONTEXT_BASE_ALLOCATION;
  const char *dirty = "qemu:dirty-bitmap:bm0";
  struct nbd_handle *h;
  struct extents x;
  struct done d;
  static char buf[65536];

  run (create);
  run (bitmap);
  wait_ready ("qemu-nbd", spawn (argv, -1, -1), pidfile, sock, 0, false);

  h = nbd_create ();
  nbd_add_meta_context (h, base);
  nbd_add_meta_context (h, depth);
  nbd_add_meta_context (h, dirty);
  CHECK (nbd_connect_unix (h, sock) == 0, "qemu: connect");
  CHECK (nbd_get_extended_headers_negotiated (h) == 1, "qemu: extended headers");
  CHECK (nbd_get_structured_replies_negotiated (h) == 1, "qemu: structured replies");
  CHECK (nbd_can_block_status_payload (h) == 1, "qemu: block status payload");
  memset (buf, 1, sizeof buf);
  CHECK (nbd_pwrite (h, buf, sizeof buf, 0, 0) == 0, "qemu: pwrite");

  CHECK (nbd_block_status_64 (h, 1 << 20, 0, extent_collector (&x), 0) == 0, "qemu: block_status_64");
  CHECK (x.calls == 3 && extent_index (&x, base) >= 0 && extent_index (&x, depth) >= 0 &&
         extent_index (&x, dirty) >= 0, "qemu: three contexts (%d)", x.calls);
  {
    int b = extent_index (&x, base), t = extent_index (&x, dirty);
    CHECK (b >= 0 && x.first[b].length == 65536 && x.first[b].flags == 0, "qemu: data extent");
    CHECK (t >= 0 && x.first[t].length >= 65536 && (x.first[t].flags & LIBNBD_STATE_DIRTY), "qemu: dirty extent");
  }

  CHECK (nbd_block_status_filter (h, 1 << 20, 0, (char *[]) { (char *) dirty, NULL },
                                  extent_collector (&x), 0) == 0, "qemu: block_status_filter");
  CHECK (x.calls == 1 && strcmp (x.ctx[0], dirty) == 0, "qemu: only the filtered context (%d)", x.calls);
  CHECK (nbd_block_status_filter (h, 1 << 20, 0, (char *[]) { (char *) base, (char *) depth, NULL },
                                  extent_collector (&x), LIBNBD_CMD_FLAG_REQ_ONE) == 0 &&
         x.calls == 2 && extent_index (&x, dirty) < 0 && x.n[0] == 1 && x.n[1] == 1, "qemu: two filtered, REQ_ONE");
  CHECK_ERR (nbd_block_status_filter (h, 512, 0, (char *[]) { "qemu:nosuch", NULL }, extent_collector (&x), 0),
             "nbd_block_status_filter", EINVAL);
  CHECK (x.calls == 0 && x.freed == 1, "unknown context: nothing sent, callback freed");
  {
    int64_t c = nbd_aio_block_status_filter (h, 1 << 20, 0, (char *[]) { (char *) base, NULL },
                                             extent_collector (&x), completion (&d), 0);
    CHECK (c > 0, "qemu: aio_block_status_filter");
    while (nbd_aio_command_completed (h, c) == 0)
      if (nbd_poll (h, 5000) != 1) break;
    CHECK (d.called == 1 && d.err == 0 && x.calls == 1 && strcmp (x.ctx[0], base) == 0 &&
           x.first[0].length == 65536, "qemu: aio filter completed");
  }
  /* The 32-bit callback still works under extended headers. */
  CHECK (nbd_shutdown (h, 0) == 0, "qemu: shutdown");
  nbd_close (h);

  /* Opt mode: extended headers on request. */
  h = nbd_create ();
  CHECK (nbd_set_opt_mode (h, true) == 0 && nbd_set_request_extended_headers (h, false) == 0, "qemu opt: settings");
  CHECK (nbd_connect_unix (h, sock) == 0, "qemu opt: connect");
  CHECK (nbd_get_extended_headers_negotiated (h) == 0 && nbd_get_structured_replies_negotiated (h) == 1,
         "qemu opt: structured replies only");
  CHECK (nbd_opt_extended_headers (h) == 1, "qemu: opt_extended_headers");
  CHECK (nbd_get_extended_headers_negotiated (h) == 1, "qemu: extended headers now");
  CHECK (nbd_opt_list_meta_context_queries (h, (char *[]) { "qemu:", NULL }, collector (&(struct names) { 0 })) == 2,
         "qemu: two qemu: contexts");
  {
    struct names m;
    /* A bare namespace lists, but qemu selects nothing with it. */
    CHECK (nbd_opt_set_meta_context_queries (h, (char *[]) { "qemu:", NULL }, collector (&m)) == 0 && m.n == 0,
           "qemu: set qemu: selects none (%d)", m.n);
    CHECK (nbd_opt_set_meta_context_queries (h, (char *[]) { (char *) depth, (char *) dirty, NULL },
                                             collector (&m)) == 2 &&
           has_name (&m, depth) && has_name (&m, dirty), "qemu: set selects two (%d)", m.n);
  }
  CHECK (nbd_set_request_meta_context (h, false) == 0 && nbd_opt_go (h) == 0, "qemu opt: go");
  CHECK (nbd_can_meta_context (h, dirty) == 1 && nbd_can_meta_context (h, base) == 0, "qemu opt: contexts kept");
  CHECK (nbd_block_status_64 (h, 1 << 20, 0, extent_collector (&x), 0) == 0 && x.calls == 2,
         "qemu opt: status for the two (%d)", x.calls);
  nbd_close (h);

  /* opt_extended_headers when the server already agreed: qemu refuses or
   * accepts, but extended headers stay. */
  h = nbd_create ();
  CHECK (nbd_set_opt_mode (h, true) == 0 && nbd_connect_unix (h, sock) == 0, "qemu opt2: connect");
  CHECK (nbd_get_extended_headers_negotiated (h) == 1, "qemu opt2: extended headers by default");
  CHECK (nbd_opt_extended_headers (h) != -1 && nbd_get_extended_headers_negotiated (h) == 1,
         "qemu opt2: a second request keeps them");
  CHECK (nbd_aio_opt_extended_headers (h, completion (&d)) == 0, "qemu: aio_opt_extended_headers");
  wait_done (h, &d);
  CHECK (d.called == 1 && d.freed == 1 && nbd_aio_is_negotiating (h) == 1, "qemu: aio EH completed");
  nbd_close (h);
  free (img); free (sock); free (pidfile);
}

/* ---------------------------------------------------------------------- */
/* 5. Subprocesses: their pid, and the socket activation name. */

static void
test_subprocess (void)
{
  char *names = path_in_dir ("fdnames"), *script;
  struct nbd_handle *h;
  char line[64] = "";
  FILE *fp;

  h = nbd_create ();
  CHECK (nbd_connect_command (h, (char *[]) { "nbdkit", "-s", "--exit-with-parent", "memory", "1M", NULL }) == 0,
         "connect_command");
  {
    int64_t pid = nbd_get_subprocess_pid (h);
    CHECK (pid > 0 && kill ((pid_t) pid, 0) == 0, "subprocess pid %" PRId64 " is alive", pid);
  }
  nbd_close (h);

  if (asprintf (&script, "echo \"$LISTEN_FDNAMES\" >> %s; exec nbdkit --exit-with-parent memory 1M", names) == -1)
    fatal ("asprintf");
  h = nbd_create ();
  CHECK (nbd_set_socket_activation_name (h, "disk0") == 0, "activation: name");
  CHECK (nbd_connect_systemd_socket_activation (h, (char *[]) { "sh", "-c", script, NULL }) == 0,
         "connect_systemd_socket_activation");
  CHECK (nbd_get_subprocess_pid (h) > 0, "activation: pid");
  CHECK (str_is (nbd_get_socket_activation_name (h), "disk0"), "activation: name read back");
  nbd_close (h);
  h = nbd_create ();
  CHECK (nbd_connect_systemd_socket_activation (h, (char *[]) { "sh", "-c", script, NULL }) == 0,
         "activation without a name");
  nbd_close (h);
  fp = fopen (names, "r");
  CHECK (fp && fgets (line, sizeof line, fp) && strcmp (line, "disk0\n") == 0, "server saw the name");
  CHECK (fp && fgets (line, sizeof line, fp) && strcmp (line, "unknown\n") == 0, "default name: %s", line);
  if (fp) fclose (fp);
  free (script); free (names);
}

int
main (void)
{
  const char *needs[] = { "nbdkit", "qemu-nbd", "qemu-img", "psktool", "openssl", NULL };
  char *args[] = { "memory", "1M", NULL };
  char *sock;

  servers_init ("api122-test", needs, 60);

  test_handle ();
  start_nbdkit_unix ("memory.sock", args);
  sock = path_in_dir ("memory.sock");
  test_nbdkit_opt (sock);
  free (sock);
  test_nbdkit_starttls ();
  test_tls_hostname ();
  test_payload_limit ();
  test_qemu ();
  test_subprocess ();

  cleanup ();
  printf ("api122-test: %d checks, %d failures\n", checks, failures);
  return failures != 0;
}
