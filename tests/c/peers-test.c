/* The C API against real peers: qemu-nbd (raw and qcow2 with allocation
 * depth and a dirty bitmap), nbd-server (no structured replies, ABORT
 * without a reply) and nbdkit over every transport (TCP v4/v6, service
 * names, URIs, socketpairs, AIO connects), error paths and callback rules
 * that tests/c/capi-test.c does not cover.  Every expected value is what
 * Debian's libnbd 1.14.2 does; tests/c-compare.sh runs this on both
 * libraries.  The servers are started here, in a private temporary
 * directory that is removed at the end, even on failure.  A missing server
 * binary is a failure, never a skip.
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <stdarg.h>
#include <string.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <inttypes.h>
#include <netdb.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <time.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <libnbd.h>

#include "servers.h"

static char live_port[16];      /* an nbdkit memory 1M on 127.0.0.1 */




static bool
port_is_free (int port)
{
  struct sockaddr_in sin = { .sin_family = AF_INET, .sin_port = htons (port),
                             .sin_addr.s_addr = htonl (INADDR_LOOPBACK) };
  int fd = socket (AF_INET, SOCK_STREAM, 0), one = 1;
  bool ok;
  setsockopt (fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  ok = bind (fd, (struct sockaddr *) &sin, sizeof sin) == 0;
  close (fd);
  return ok;
}

/* A TCP service name from /etc/services whose port is free: "nbd" if it can. */
static char *
free_service (int *port)
{
  struct servent *se = getservbyname ("nbd", "tcp");
  if (se && port_is_free (ntohs (se->s_port))) {
    *port = ntohs (se->s_port);
    return strdup (se->s_name);
  }
  setservent (1);
  while ((se = getservent ()) != NULL) {
    if (strcmp (se->s_proto, "tcp") == 0 && ntohs (se->s_port) >= 1024 &&
        port_is_free (ntohs (se->s_port))) {
      char *name = strdup (se->s_name);
      *port = ntohs (se->s_port);
      endservent ();
      return name;
    }
  }
  endservent ();
  fatal ("no TCP service name in /etc/services with a free port");
}

static pid_t
start_nbdkit_tcp (const char *addr, int port, const char *tag)
{
  char portstr[16], *pidfile = path_in_dir (tag);
  snprintf (portstr, sizeof portstr, "%d", port);
  char *argv[] = { "nbdkit", "-f", "--exit-with-parent", "-p", portstr, "-i", (char *) addr,
                   "-P", pidfile, "memory", "1M", NULL };
  pid_t pid = spawn (argv, -1, -1);
  wait_ready ("nbdkit (tcp)", pid, pidfile, NULL, 0, false);
  free (pidfile);
  return pid;
}

/* ---------------------------------------------------------------------- */
/* Callback recorders. */

struct counts { int calls, frees, ret, err_seen, set_error; };
static int count_completion (void *p, int *error) {
  struct counts *c = p;
  c->calls++;
  c->err_seen = *error;
  if (c->set_error) *error = c->set_error;
  return c->ret;
}
static void count_free (void *p) { ((struct counts *) p)->frees++; }

#define MAX_EXT 1024
struct extent { char ctx[64]; uint64_t off, len; uint32_t flags; };
struct extents {
  int n, calls, frees, nr_entries_odd, set_error, ret;
  int per_ctx_calls[4]; const char *ctx_names[4];
  struct extent e[MAX_EXT];
};
static int
collect_extent (void *p, const char *ctx, uint64_t off, uint32_t *e, size_t n, int *error)
{
  struct extents *x = p;
  x->calls++;
  if (n % 2) x->nr_entries_odd++;
  for (int i = 0; i < 4; i++)
    if (x->ctx_names[i] && strcmp (x->ctx_names[i], ctx) == 0) x->per_ctx_calls[i]++;
  for (size_t i = 0; i + 1 < n; i += 2) {
    if (x->n < MAX_EXT) {
      struct extent *t = &x->e[x->n++];
      snprintf (t->ctx, sizeof t->ctx, "%s", ctx);
      t->off = off; t->len = e[i]; t->flags = e[i + 1];
    }
    off += e[i];
  }
  if (x->set_error) *error = x->set_error;
  return x->ret;
}
static void extents_free (void *p) { ((struct extents *) p)->frees++; }

/* Flags of the extent covering off in ctx, -1 if none does. */
static long
flags_at (struct extents *x, const char *ctx, uint64_t off)
{
  for (int i = 0; i < x->n; i++)
    if (strcmp (x->e[i].ctx, ctx) == 0 && x->e[i].off <= off && off < x->e[i].off + x->e[i].len)
      return x->e[i].flags;
  return -1;
}

/* Extents of ctx are non-empty and contiguous from start; returns the end. */
static uint64_t
contiguous_end (struct extents *x, const char *ctx, uint64_t start)
{
  uint64_t at = start;
  for (int i = 0; i < x->n; i++) {
    if (strcmp (x->e[i].ctx, ctx) != 0) continue;
    if (x->e[i].off != at || x->e[i].len == 0) return 0;
    at += x->e[i].len;
  }
  return at;
}

#define MAX_CHUNK 256
struct chunks {
  int n, frees, set_error, ret, error_in;
  char *base;
  struct { const char *buf; size_t len; uint64_t off; unsigned status; } c[MAX_CHUNK];
};
static int
collect_chunk (void *p, const void *buf, size_t len, uint64_t off, unsigned status, int *error)
{
  struct chunks *x = p;
  if (*error) x->error_in = *error;
  if (x->n < MAX_CHUNK) {
    x->c[x->n].buf = buf; x->c[x->n].len = len; x->c[x->n].off = off;
    x->c[x->n].status = status; x->n++;
  }
  if (x->set_error) *error = x->set_error;
  return x->ret;
}
static void chunks_free (void *p) { ((struct chunks *) p)->frees++; }

struct names { int n, frees; char name[8][128], desc[8][128]; };
static int
collect_name (void *p, const char *name, const char *desc)
{
  struct names *x = p;
  if (x->n < 8) {
    snprintf (x->name[x->n], 128, "%s", name);
    snprintf (x->desc[x->n], 128, "%s", desc ? desc : "(null)");
    x->n++;
  }
  return 0;
}
static int
collect_context (void *p, const char *name)
{
  return collect_name (p, name, "");
}
static void names_free (void *p) { ((struct names *) p)->frees++; }
static bool
has_name (struct names *x, const char *name)
{
  for (int i = 0; i < x->n && i < 8; i++)
    if (strcmp (x->name[i], name) == 0) return true;
  return false;
}

static bool
all_bytes (const char *buf, size_t len, char v)
{
  for (size_t i = 0; i < len; i++)
    if (buf[i] != v) return false;
  return true;
}

/* libnbd's connection_state text for the stable states. */
static bool
state_is (struct nbd_handle *h, const char *want)
{
  const char *s = nbd_connection_state (h);
  return s && strcmp (s, want) == 0;
}
#define STATE_CREATED "START: Handle after being initially created"
#define STATE_READY "READY: Connection is ready to process NBD commands"
#define STATE_NEGOTIATING "NEGOTIATING: Connection is ready to negotiate an NBD option"
#define STATE_CLOSED "CLOSED: Connection is closed"
#define STATE_DEAD "DEAD: Connection is in an unrecoverable error state, can only be closed"


/* ---------------------------------------------------------------------- */
/* 1. qemu-nbd */

static void
test_qemu_raw (void)
{
  char *img = path_in_dir ("raw.img"), *sock = path_in_dir ("qemu-raw.sock");
  char *pidfile = path_in_dir ("qemu-raw.pid");
  char *argv[] = { "qemu-nbd", "-k", sock, "-f", "raw", "-t", "-x", "NAME", "-D", "DESC",
                   "--pid-file", pidfile, img, NULL };
  static char wbuf[65536], rbuf[262144];
  struct nbd_handle *h;
  int fd;

  /* 1000000 bytes: qemu-nbd rounds the export up to a multiple of 512. */
  fd = open (img, O_CREAT | O_RDWR | O_TRUNC, 0644);
  if (fd == -1 || ftruncate (fd, 1000000) == -1) fatal ("%s: %m", img);
  close (fd);
  wait_ready ("qemu-nbd", spawn (argv, -1, -1), pidfile, sock, 0, false);

  h = nbd_create ();
  CHECK (nbd_set_export_name (h, "NAME") == 0 && nbd_set_full_info (h, true) == 0 &&
         nbd_add_meta_context (h, LIBNBD_CONTEXT_BASE_ALLOCATION) == 0, "qemu raw: setup");
  CHECK (nbd_connect_unix (h, sock) == 0, "qemu raw: connect_unix");
  CHECK (nbd_aio_is_ready (h) == 1, "qemu raw: ready");
  CHECK (strcmp (nbd_get_protocol (h), "newstyle-fixed") == 0, "qemu raw: protocol");
  CHECK (nbd_get_structured_replies_negotiated (h) == 1, "qemu raw: structured replies");
  CHECK (nbd_get_size (h) == 1000448, "qemu raw: size rounded to 512: %" PRId64, nbd_get_size (h));
  CHECK (str_is (nbd_get_export_description (h), "DESC"), "qemu raw: description");
  CHECK (str_is (nbd_get_canonical_export_name (h), "NAME"), "qemu raw: canonical name");
  CHECK (str_is (nbd_get_export_name (h), "NAME"), "qemu raw: export name");
  CHECK (nbd_can_meta_context (h, LIBNBD_CONTEXT_BASE_ALLOCATION) == 1, "qemu raw: base:allocation");
  CHECK (nbd_can_meta_context (h, "qemu:allocation-depth") == 0, "qemu raw: no allocation-depth without -A");
  CHECK (nbd_can_multi_conn (h) == 0, "qemu raw: no multi-conn without -e");
  CHECK (nbd_can_df (h) == 1 && nbd_can_trim (h) == 1 && nbd_can_fua (h) == 1 &&
         nbd_can_cache (h) == 1 && nbd_can_fast_zero (h) == 1 && nbd_is_read_only (h) == 0,
         "qemu raw: flags");
  CHECK (nbd_get_block_size (h, LIBNBD_SIZE_MINIMUM) == 1 &&
         nbd_get_block_size (h, LIBNBD_SIZE_PREFERRED) == 4096 &&
         nbd_get_block_size (h, LIBNBD_SIZE_MAXIMUM) == 33554432, "qemu raw: block sizes");

  /* The rounded tail reads as zeroes; one byte past the export is refused. */
  memset (rbuf, 1, 512);
  CHECK (nbd_pread (h, rbuf, 448, 1000000, 0) == 0 && all_bytes (rbuf, 448, 0), "qemu raw: tail reads");
  CHECK_ERR (nbd_pread (h, rbuf, 512, 1000000, 0), "nbd_pread", EINVAL);
  CHECK (nbd_aio_is_ready (h) == 1, "qemu raw: still ready after a local refusal");

  memset (wbuf, 0x5a, sizeof wbuf);
  CHECK (nbd_pwrite (h, wbuf, sizeof wbuf, 65536, 0) == 0, "qemu raw: pwrite");
  CHECK (nbd_flush (h, 0) == 0, "qemu raw: flush");

  /* pread_structured: DATA for what was written, HOLE chunks for the rest. */
  {
    struct chunks ch = { 0 };
    memset (rbuf, 1, sizeof rbuf);
    CHECK (nbd_pread_structured (h, rbuf, sizeof rbuf, 0, (nbd_chunk_callback) {
             .callback = collect_chunk, .user_data = &ch, .free = chunks_free }, 0) == 0,
           "qemu raw: pread_structured");
    uint64_t covered = 0;
    int holes = 0, data_at_64k = 0, bad_ptr = 0, bad_hole = 0;
    for (int i = 0; i < ch.n; i++) {
      covered += ch.c[i].len;
      if (ch.c[i].buf != rbuf + ch.c[i].off) bad_ptr++;
      if (ch.c[i].status == LIBNBD_READ_HOLE) {
        holes++;
        if (!all_bytes (ch.c[i].buf, ch.c[i].len, 0)) bad_hole++;
      }
      if (ch.c[i].status == LIBNBD_READ_DATA && ch.c[i].off <= 65536 &&
          65536 + 65536 <= ch.c[i].off + ch.c[i].len)
        data_at_64k++;
    }
    CHECK (ch.frees == 1, "qemu raw: chunk free once");
    CHECK (covered == sizeof rbuf, "qemu raw: chunks cover the request: %" PRIu64, covered);
    CHECK (holes >= 1 && bad_hole == 0, "qemu raw: %d HOLE chunks, %d not zero", holes, bad_hole);
    CHECK (data_at_64k == 1, "qemu raw: one DATA chunk covers the written block");
    CHECK (bad_ptr == 0, "qemu raw: chunk buffers point into the caller's buffer");
    CHECK (memcmp (rbuf + 65536, wbuf, 65536) == 0 && all_bytes (rbuf + 131072, 131072, 0),
           "qemu raw: buffer contents");
    for (int i = 0; i < ch.n; i++)
      if (ch.c[i].status == LIBNBD_READ_HOLE && ch.c[i].off >= 131072) { holes = -1; break; }
    CHECK (holes == -1, "qemu raw: the never-written area is a HOLE chunk");
  }

  /* block_status, base:allocation: data where written, holes after. */
  {
    struct extents *x = calloc (1, sizeof *x);
    int64_t size = nbd_get_size (h);
    CHECK (nbd_block_status (h, size, 0, (nbd_extent_callback) {
             .callback = collect_extent, .user_data = x, .free = extents_free }, 0) == 0,
           "qemu raw: block_status");
    CHECK (x->frees == 1 && x->nr_entries_odd == 0, "qemu raw: extent callback freed once");
    uint64_t end = contiguous_end (x, LIBNBD_CONTEXT_BASE_ALLOCATION, 0);
    CHECK (end > 131072 && end <= (uint64_t) size, "qemu raw: extents contiguous to %" PRIu64, end);
    CHECK (flags_at (x, LIBNBD_CONTEXT_BASE_ALLOCATION, 65536) == 0 &&
           flags_at (x, LIBNBD_CONTEXT_BASE_ALLOCATION, 131071) == 0, "qemu raw: written block is data");
    CHECK (flags_at (x, LIBNBD_CONTEXT_BASE_ALLOCATION, 524288) ==
           (LIBNBD_STATE_HOLE | LIBNBD_STATE_ZERO), "qemu raw: unwritten area is a hole: %ld",
           flags_at (x, LIBNBD_CONTEXT_BASE_ALLOCATION, 524288));
    memset (x, 0, sizeof *x);
    CHECK (nbd_block_status (h, size, 0, (nbd_extent_callback) {
             .callback = collect_extent, .user_data = x }, LIBNBD_CMD_FLAG_REQ_ONE) == 0 &&
           x->calls == 1 && x->n == 1 && x->e[0].len > 0 && x->e[0].len <= (uint64_t) size,
           "qemu raw: REQ_ONE gives one extent (%d)", x->n);
    free (x);
  }
  CHECK (nbd_shutdown (h, 0) == 0, "qemu raw: shutdown");
  nbd_close (h);

  /* A name the server does not have. */
  h = nbd_create ();
  nbd_set_export_name (h, "nosuch");
  CHECK_ERR (nbd_connect_unix (h, sock), "nbd_connect_unix", ENOENT);
  CHECK (nbd_get_error () && strstr (nbd_get_error (), "nosuch") != NULL,
         "the message names the export: %s", nbd_get_error ());
  CHECK (nbd_aio_is_dead (h) == 1, "qemu raw: dead after a refused export");
  CHECK (state_is (h, STATE_DEAD), "state text: %s", nbd_connection_state (h));
  nbd_close (h);

  /* Opt mode: list, info (bad name then good), list_meta_context, go. */
  h = nbd_create ();
  CHECK (nbd_set_opt_mode (h, true) == 0 && nbd_connect_unix (h, sock) == 0, "qemu opt: connect");
  CHECK (nbd_aio_is_negotiating (h) == 1, "qemu opt: negotiating");
  {
    struct names l = { 0 };
    CHECK (nbd_opt_list (h, (nbd_list_callback) { .callback = collect_name, .user_data = &l,
                                                  .free = names_free }) == 1, "qemu opt: one export");
    CHECK (l.n == 1 && l.frees == 1 && strcmp (l.name[0], "NAME") == 0 &&
           strcmp (l.desc[0], "DESC") == 0, "qemu opt: list gives %d: %s / %s",
           l.n, l.name[0], l.desc[0]);
  }
  CHECK (nbd_set_export_name (h, "nosuch") == 0, "set bad name");
  CHECK_ERR (nbd_opt_info (h), "nbd_opt_info", ENOENT);
  CHECK (nbd_aio_is_negotiating (h) == 1, "qemu opt: still negotiating after a refused INFO");
  CHECK (nbd_set_export_name (h, "NAME") == 0 && nbd_set_full_info (h, true) == 0 &&
         nbd_opt_info (h) == 0, "qemu opt: opt_info");
  CHECK (nbd_get_size (h) == 1000448, "qemu opt: size after INFO");
  CHECK (str_is (nbd_get_export_description (h), "DESC"), "qemu opt: description after INFO");
  {
    struct names m = { 0 };
    CHECK (nbd_opt_list_meta_context (h, (nbd_context_callback) {
             .callback = collect_context, .user_data = &m, .free = names_free }) == 1,
           "qemu opt: one context without -A");
    CHECK (m.n == 1 && m.frees == 1 && has_name (&m, LIBNBD_CONTEXT_BASE_ALLOCATION),
           "qemu opt: base:allocation listed");
    memset (&m, 0, sizeof m);
    nbd_add_meta_context (h, "qemu:");
    CHECK (nbd_opt_list_meta_context (h, (nbd_context_callback) {
             .callback = collect_context, .user_data = &m }) == 0 && m.n == 0,
           "qemu opt: no qemu: contexts without -A/-B (%d)", m.n);
    nbd_clear_meta_contexts (h);
    nbd_add_meta_context (h, LIBNBD_CONTEXT_BASE_ALLOCATION);
  }
  CHECK (nbd_opt_go (h) == 0 && nbd_aio_is_ready (h) == 1, "qemu opt: go");
  CHECK (nbd_can_meta_context (h, LIBNBD_CONTEXT_BASE_ALLOCATION) == 1, "qemu opt: context after go");
  CHECK (nbd_pread (h, rbuf, 512, 65536, 0) == 0 && rbuf[0] == 0x5a, "qemu opt: read after go");
  nbd_close (h);
  free (img); free (sock); free (pidfile);
}

static void
test_qemu_qcow2 (void)
{
  char *img = path_in_dir ("bitmap.qcow2"), *sock = path_in_dir ("qemu-qcow2.sock");
  char *pidfile = path_in_dir ("qemu-qcow2.pid");
  char *create[] = { "qemu-img", "create", "-q", "-f", "qcow2", img, "4M", NULL };
  char *bitmap[] = { "qemu-img", "bitmap", "--add", img, "bm0", NULL };
  char *argv[] = { "qemu-nbd", "-k", sock, "-f", "qcow2", "-t", "-A", "-B", "bm0",
                   "--pid-file", pidfile, img, NULL };
  const char *ctxs[3] = { LIBNBD_CONTEXT_BASE_ALLOCATION, "qemu:allocation-depth",
                          "qemu:dirty-bitmap:bm0" };
  static char wbuf[65536], rbuf[2097152];
  struct nbd_handle *h;

  run (create);
  run (bitmap);
  wait_ready ("qemu-nbd (qcow2)", spawn (argv, -1, -1), pidfile, sock, 0, false);

  /* What the server offers, in opt mode. */
  h = nbd_create ();
  CHECK (nbd_set_opt_mode (h, true) == 0 && nbd_connect_unix (h, sock) == 0, "qcow2: opt connect");
  {
    struct names m = { 0 };
    CHECK (nbd_opt_list_meta_context (h, (nbd_context_callback) {
             .callback = collect_context, .user_data = &m, .free = names_free }) == 3,
           "qcow2: three contexts");
    CHECK (m.n == 3 && has_name (&m, ctxs[0]) && has_name (&m, ctxs[1]) && has_name (&m, ctxs[2]),
           "qcow2: all three listed (%d)", m.n);
    memset (&m, 0, sizeof m);
    nbd_add_meta_context (h, "qemu:");
    CHECK (nbd_opt_list_meta_context (h, (nbd_context_callback) {
             .callback = collect_context, .user_data = &m }) == 2 && m.n == 2 &&
           has_name (&m, ctxs[1]) && has_name (&m, ctxs[2]), "qcow2: qemu: query lists two (%d)", m.n);
    nbd_clear_meta_contexts (h);
  }
  for (int i = 0; i < 3; i++) nbd_add_meta_context (h, ctxs[i]);
  nbd_add_meta_context (h, "qemu:dirty-bitmap:nosuch");
  CHECK (nbd_opt_go (h) == 0, "qcow2: go");
  for (int i = 0; i < 3; i++)
    CHECK (nbd_can_meta_context (h, ctxs[i]) == 1, "qcow2: can_meta_context %s", ctxs[i]);
  CHECK (nbd_can_meta_context (h, "qemu:dirty-bitmap:nosuch") == 0, "qcow2: unknown bitmap");
  CHECK (nbd_get_size (h) == 4194304, "qcow2: size");

  memset (wbuf, 0x33, sizeof wbuf);
  CHECK (nbd_pwrite (h, wbuf, sizeof wbuf, 1048576, 0) == 0, "qcow2: pwrite");

  {
    struct extents *x = calloc (1, sizeof *x);
    for (int i = 0; i < 3; i++) x->ctx_names[i] = ctxs[i];
    CHECK (nbd_block_status (h, 4194304, 0, (nbd_extent_callback) {
             .callback = collect_extent, .user_data = x, .free = extents_free }, 0) == 0,
           "qcow2: block_status");
    CHECK (x->frees == 1, "qcow2: extent free once");
    for (int i = 0; i < 3; i++) {
      CHECK (x->per_ctx_calls[i] == 1, "qcow2: %s called %d times", ctxs[i], x->per_ctx_calls[i]);
      CHECK (contiguous_end (x, ctxs[i], 0) > 1048576 + 65536, "qcow2: %s contiguous", ctxs[i]);
    }
    CHECK (flags_at (x, ctxs[0], 0) == (LIBNBD_STATE_HOLE | LIBNBD_STATE_ZERO) &&
           flags_at (x, ctxs[0], 1048576) == 0 &&
           flags_at (x, ctxs[0], 1048576 + 65536) == (LIBNBD_STATE_HOLE | LIBNBD_STATE_ZERO),
           "qcow2: base:allocation %ld %ld", flags_at (x, ctxs[0], 0), flags_at (x, ctxs[0], 1048576));
    CHECK (flags_at (x, ctxs[1], 0) == 0 && flags_at (x, ctxs[1], 1048576) == 1,
           "qcow2: allocation depth %ld %ld", flags_at (x, ctxs[1], 0), flags_at (x, ctxs[1], 1048576));
    CHECK (flags_at (x, ctxs[2], 0) == 0 && flags_at (x, ctxs[2], 1048576) == 1 &&
           flags_at (x, ctxs[2], 2097152) == 0,
           "qcow2: dirty bitmap %ld %ld", flags_at (x, ctxs[2], 0), flags_at (x, ctxs[2], 1048576));

    /* REQ_ONE: one extent per context, starting at the offset. */
    memset (x, 0, sizeof *x);
    for (int i = 0; i < 3; i++) x->ctx_names[i] = ctxs[i];
    CHECK (nbd_block_status (h, 65536, 1048576, (nbd_extent_callback) {
             .callback = collect_extent, .user_data = x }, LIBNBD_CMD_FLAG_REQ_ONE) == 0,
           "qcow2: block_status REQ_ONE");
    CHECK (x->calls == 3 && x->n == 3, "qcow2: REQ_ONE %d calls %d extents", x->calls, x->n);
    for (int i = 0; i < x->n; i++)
      CHECK (x->e[i].off == 1048576 && x->e[i].len >= 1 && x->e[i].len <= 65536,
             "qcow2: REQ_ONE extent %s %" PRIu64 "+%" PRIu64, x->e[i].ctx, x->e[i].off, x->e[i].len);
    free (x);
  }

  /* Reading across allocated and unallocated clusters. */
  {
    struct chunks *ch = calloc (1, sizeof *ch);
    uint64_t covered = 0;
    int holes = 0, data = 0;
    memset (rbuf, 1, sizeof rbuf);
    CHECK (nbd_pread_structured (h, rbuf, sizeof rbuf, 0, (nbd_chunk_callback) {
             .callback = collect_chunk, .user_data = ch }, 0) == 0, "qcow2: pread_structured");
    for (int i = 0; i < ch->n; i++) {
      covered += ch->c[i].len;
      if (ch->c[i].status == LIBNBD_READ_HOLE && ch->c[i].off == 0) holes++;
      if (ch->c[i].status == LIBNBD_READ_DATA && ch->c[i].off <= 1048576 &&
          ch->c[i].off + ch->c[i].len >= 1048576 + 65536) data++;
    }
    CHECK (covered == sizeof rbuf && holes == 1 && data == 1,
           "qcow2: chunks: %d, covered %" PRIu64 ", hole at 0: %d, data: %d", ch->n, covered, holes, data);
    CHECK (all_bytes (rbuf, 1048576, 0) && memcmp (rbuf + 1048576, wbuf, 65536) == 0 &&
           all_bytes (rbuf + 1048576 + 65536, 1048576 - 65536, 0), "qcow2: contents");
    free (ch);
  }
  nbd_close (h);
  free (img); free (sock); free (pidfile);
}

/* ---------------------------------------------------------------------- */
/* 2. nbd-server */

static void
test_nbd_server (void)
{
  char *conf = path_in_dir ("nbd-server.conf"), *sock = path_in_dir ("nbd-server.sock");
  char *img = path_in_dir ("nbd-server.img"), *pidfile = path_in_dir ("nbd-server.pid");
  char *argv[] = { "nbd-server", "-C", conf, "-p", pidfile, NULL };
  static char wbuf[65536], rbuf[65536];
  struct nbd_handle *h;
  FILE *fp;
  int fd;

  fd = open (img, O_CREAT | O_RDWR | O_TRUNC, 0644);
  if (fd == -1 || ftruncate (fd, 1048576) == -1) fatal ("%s: %m", img);
  close (fd);
  fp = fopen (conf, "w");
  if (fp == NULL) fatal ("%s: %m", conf);
  fprintf (fp, "[generic]\nunixsock = %s\nallowlist = true\n"
           "[exp]\nexportname = %s\nflush = true\nfua = true\ntrim = true\n"
           "[ro]\nexportname = %s\nreadonly = true\n", sock, img, img);
  fclose (fp);
  snprintf (daemon_pidfiles[ndaemons++], sizeof daemon_pidfiles[0], "%s", pidfile);
  wait_ready ("nbd-server", spawn (argv, -1, -1), pidfile, sock, 0, true);

  h = nbd_create ();
  nbd_set_export_name (h, "exp");
  nbd_add_meta_context (h, LIBNBD_CONTEXT_BASE_ALLOCATION);
  CHECK (nbd_connect_unix (h, sock) == 0, "nbd-server: connect_unix");
  CHECK (strcmp (nbd_get_protocol (h), "newstyle-fixed") == 0, "nbd-server: protocol");
  CHECK (nbd_get_structured_replies_negotiated (h) == 0, "nbd-server: no structured replies");
  CHECK (nbd_get_size (h) == 1048576, "nbd-server: size");
  CHECK (nbd_is_read_only (h) == 0 && nbd_can_flush (h) == 1 && nbd_can_fua (h) == 1 &&
         nbd_can_trim (h) == 1 && nbd_can_multi_conn (h) == 1 && nbd_can_df (h) == 0 &&
         nbd_can_cache (h) == 0 && nbd_can_fast_zero (h) == 0 && nbd_is_rotational (h) == 0,
         "nbd-server: flags");
  CHECK (nbd_can_meta_context (h, LIBNBD_CONTEXT_BASE_ALLOCATION) == 0, "nbd-server: no contexts");

  memset (wbuf, 0x42, sizeof wbuf);
  CHECK (nbd_pwrite (h, wbuf, sizeof wbuf, 8192, LIBNBD_CMD_FLAG_FUA) == 0, "nbd-server: pwrite FUA");
  CHECK (nbd_pread (h, rbuf, sizeof rbuf, 8192, 0) == 0 && memcmp (rbuf, wbuf, sizeof wbuf) == 0,
         "nbd-server: pread back");
  CHECK (nbd_flush (h, 0) == 0, "nbd-server: flush");
  CHECK (nbd_trim (h, 4096, 69632, 0) == 0, "nbd-server: trim");
  CHECK (nbd_zero (h, 4096, 8192, 0) == 0, "nbd-server: zero");
  CHECK (nbd_pread (h, rbuf, 8192, 8192, 0) == 0 && all_bytes (rbuf, 4096, 0) &&
         all_bytes (rbuf + 4096, 4096, 0x42), "nbd-server: zeroed range");
  /* Without structured replies the whole read arrives as one DATA chunk. */
  {
    struct chunks ch = { 0 };
    CHECK (nbd_pread_structured (h, rbuf, 16384, 8192, (nbd_chunk_callback) {
             .callback = collect_chunk, .user_data = &ch, .free = chunks_free }, 0) == 0,
           "nbd-server: pread_structured");
    CHECK (ch.n == 1 && ch.c[0].status == LIBNBD_READ_DATA && ch.c[0].len == 16384 &&
           ch.c[0].off == 8192 && ch.c[0].buf == rbuf && ch.frees == 1,
           "nbd-server: one synthesized DATA chunk (%d)", ch.n);
  }
  CHECK_ERR (nbd_pread_structured (h, rbuf, 512, 0, (nbd_chunk_callback) {
               .callback = collect_chunk, .user_data = &(struct chunks) { 0 } },
               LIBNBD_CMD_FLAG_DF), "nbd_pread_structured", EINVAL);
  {
    struct extents *x = calloc (1, sizeof *x);
    CHECK_ERR (nbd_block_status (h, 65536, 0, (nbd_extent_callback) {
                 .callback = collect_extent, .user_data = x, .free = extents_free }, 0),
               "nbd_block_status", ENOTSUP);
    CHECK (x->calls == 0 && x->frees == 1, "nbd-server: refused block_status frees once");
    free (x);
  }
  CHECK_ERR (nbd_cache (h, 4096, 0, 0), "nbd_cache", EINVAL);
  CHECK (nbd_shutdown (h, 0) == 0 && nbd_aio_is_closed (h) == 1, "nbd-server: shutdown");
  nbd_close (h);

  /* The read-only export. */
  h = nbd_create ();
  nbd_set_export_name (h, "ro");
  CHECK (nbd_connect_unix (h, sock) == 0 && nbd_is_read_only (h) == 1, "nbd-server: ro export");
  CHECK_ERR (nbd_pwrite (h, wbuf, 512, 0, 0), "nbd_pwrite", EPERM);
  /* Read-only exports do not offer trim: refused locally. */
  CHECK_ERR (nbd_trim (h, 512, 0, 0), "nbd_trim", EINVAL);
  /* It does offer WRITE_ZEROES: refused as a write. */
  CHECK (nbd_can_zero (h) == 1 && nbd_can_trim (h) == 0, "nbd-server: ro export flags");
  CHECK_ERR (nbd_zero (h, 512, 0, 0), "nbd_zero", EPERM);
  CHECK (nbd_pread (h, rbuf, 512, 16384, 0) == 0 && rbuf[0] == 0x42 && rbuf[511] == 0x42,
         "nbd-server: ro read");
  nbd_close (h);

  /* An unknown export. */
  h = nbd_create ();
  nbd_set_export_name (h, "nosuch");
  CHECK_ERR (nbd_connect_unix (h, sock), "nbd_connect_unix", ENOENT);
  nbd_close (h);

  /* Opt mode: LIST, INFO (size 0 from this server), GO. */
  h = nbd_create ();
  CHECK (nbd_set_opt_mode (h, true) == 0 && nbd_connect_unix (h, sock) == 0 &&
         nbd_aio_is_negotiating (h) == 1, "nbd-server opt: connect");
  {
    struct names l = { 0 };
    CHECK (nbd_opt_list (h, (nbd_list_callback) { .callback = collect_name, .user_data = &l,
                                                  .free = names_free }) == 2, "nbd-server opt: two exports");
    CHECK (l.n == 2 && l.frees == 1 && has_name (&l, "exp") && has_name (&l, "ro"),
           "nbd-server opt: exp and ro listed");
  }
  {
    struct names m = { 0 };
    CHECK_ERR (nbd_opt_list_meta_context (h, (nbd_context_callback) {
                 .callback = collect_context, .user_data = &m, .free = names_free }),
               "nbd_opt_list_meta_context", ENOTSUP);
    CHECK (m.n == 0 && m.frees == 1, "nbd-server opt: list_meta_context frees once");
  }
  CHECK (nbd_set_export_name (h, "exp") == 0 && nbd_opt_info (h) == 0, "nbd-server opt: info");
  CHECK (nbd_get_size (h) == 0, "nbd-server opt: INFO reports size %" PRId64, nbd_get_size (h));
  CHECK (nbd_is_read_only (h) == 0, "nbd-server opt: flags from INFO");
  CHECK (nbd_opt_go (h) == 0 && nbd_aio_is_ready (h) == 1, "nbd-server opt: go");
  CHECK (nbd_get_size (h) == 1048576, "nbd-server opt: size after GO");
  nbd_close (h);

  /* ABORT: nbd-server closes without replying. */
  h = nbd_create ();
  CHECK (nbd_set_opt_mode (h, true) == 0 && nbd_connect_unix (h, sock) == 0, "nbd-server abort: connect");
  CHECK (nbd_opt_abort (h) == 0, "nbd-server: opt_abort");
  CHECK (nbd_aio_is_closed (h) == 1, "nbd-server: closed after abort: %s", nbd_connection_state (h));
  CHECK_ERR (nbd_opt_go (h), "nbd_opt_go", EINVAL);
  CHECK_ERR (nbd_pread (h, rbuf, 512, 0, 0), "nbd_pread", EINVAL);
  nbd_close (h);

  free (conf); free (sock); free (img); free (pidfile);
}

/* ---------------------------------------------------------------------- */
/* 3. Transports against nbdkit */

/* What connect(2) to vsock cid 2 port 10809 gives here, blocking or not. */
#ifndef AF_VSOCK
#define AF_VSOCK 40
#endif
struct vsock_addr { sa_family_t family; unsigned short reserved; unsigned port, cid;
                    unsigned char zero[4]; };
static int
vsock_errno (int nonblocking)
{
  struct vsock_addr va = { .family = AF_VSOCK, .port = 10809, .cid = 2 };
  int fd = socket (AF_VSOCK, SOCK_STREAM | (nonblocking ? SOCK_NONBLOCK : 0), 0), e = 0;
  if (fd == -1) return errno;
  if (connect (fd, (struct sockaddr *) &va, sizeof va) == -1) e = errno;
  close (fd);
  return e;
}

static int64_t
connect_size (const char *uri)
{
  struct nbd_handle *h = nbd_create ();
  int64_t r = nbd_connect_uri (h, uri) == 0 ? nbd_get_size (h) : -1;
  nbd_close (h);
  return r;
}

/* Poll until the handle leaves the connecting state; returns the set of
 * directions seen while connecting (bit 1<<dir). */
static unsigned
drive_connect (struct nbd_handle *h, int *connecting_seen)
{
  unsigned dirs = 0;
  for (int i = 0; i < 1000 && nbd_aio_is_connecting (h); i++) {
    (*connecting_seen)++;
    dirs |= 1u << nbd_aio_get_direction (h);
    if (nbd_poll (h, 1000) == -1) break;
  }
  return dirs;
}


/* connect_tcp, then get_uri gives the expected URI and that URI connects. */
static void
tcp_and_back (const char *host, const char *port, const char *uri_format, int port_number)
{
  struct nbd_handle *h = nbd_create ();
  char uri[256];
  char *u;

  CHECK (nbd_connect_tcp (h, host, port) == 0 && nbd_get_size (h) == 1048576, "connect_tcp %s", host);
  u = nbd_get_uri (h);
  snprintf (uri, sizeof uri, uri_format, port_number);
  CHECK (u && strcmp (u, uri) == 0, "get_uri %s: %s", host, u ? u : "(null)");
  CHECK (u && connect_size (u) == 1048576, "get_uri %s round trip", host);
  free (u);
  nbd_close (h);
}

static void
test_transports (void)
{
  int port4 = free_port (AF_INET), port6 = free_port (AF_INET6), svc_port, sv[2];
  char *svc = free_service (&svc_port), p4[16], p6[16], sp[16], uri[512];
  struct nbd_handle *h, *h2;
  char *u;
  char buf[64];

  snprintf (p4, sizeof p4, "%d", port4);
  snprintf (live_port, sizeof live_port, "%d", port4);
  snprintf (p6, sizeof p6, "%d", port6);
  snprintf (sp, sizeof sp, "%d", svc_port);
  start_nbdkit_tcp ("127.0.0.1", port4, "tcp4.pid");
  start_nbdkit_tcp ("::1", port6, "tcp6.pid");
  start_nbdkit_tcp ("127.0.0.1", svc_port, "svc.pid");
  {
    char *args[] = { "info", "mode=exportname", NULL };
    start_nbdkit_unix ("info.sock", args);
  }
  {
    char *args[] = { "memory", "1M", NULL };
    start_nbdkit_unix ("memory.sock", args);
  }
  char *info_sock = path_in_dir ("info.sock"), *mem_sock = path_in_dir ("memory.sock");

  /* TCP by address and port string, v4 and v6, and by service name. */
  tcp_and_back ("127.0.0.1", p4, "nbd://127.0.0.1:%d/", port4);
  tcp_and_back ("::1", p6, "nbd://[::1]:%d/", port6);

  h = nbd_create ();
  CHECK (nbd_connect_tcp (h, "localhost", svc) == 0 && nbd_get_size (h) == 1048576,
         "connect_tcp with service name %s (port %d)", svc, svc_port);
  nbd_close (h);

  /* URIs: v4 with an export name, v6, Unix with a socket parameter. */
  snprintf (uri, sizeof uri, "nbd://127.0.0.1:%d/export", port4);
  h = nbd_create ();
  CHECK (nbd_connect_uri (h, uri) == 0 && nbd_get_size (h) == 1048576, "connect_uri %s", uri);
  CHECK (str_is (nbd_get_export_name (h), "export"), "export name from the URI");
  CHECK (str_is (nbd_get_uri (h), uri), "get_uri gives the URI back");
  nbd_close (h);
  snprintf (uri, sizeof uri, "nbd://[::1]:%d/", port6);
  CHECK (connect_size (uri) == 1048576, "connect_uri %s", uri);
  snprintf (uri, sizeof uri, "nbd+unix:///export?socket=%s", mem_sock);
  CHECK (connect_size (uri) == 1048576, "connect_uri %s", uri);

  /* A percent-encoded export name reaches the server decoded (the info
   * plugin serves the name as the disk), and get_uri encodes it again. */
  snprintf (uri, sizeof uri, "nbd+unix:///a%%20b%%2Fc%%25?socket=%s", info_sock);
  h = nbd_create ();
  CHECK (nbd_connect_uri (h, uri) == 0, "connect_uri percent-encoded");
  CHECK (str_is (nbd_get_export_name (h), "a b/c%"), "decoded export name");
  CHECK (nbd_get_size (h) == 6, "size of the info disk %" PRId64, nbd_get_size (h));
  memset (buf, 0, sizeof buf);
  CHECK (nbd_pread (h, buf, 6, 0, 0) == 0 && memcmp (buf, "a b/c%", 6) == 0,
         "server saw the decoded name: %.6s", buf);
  u = nbd_get_uri (h);
  h2 = nbd_create ();
  memset (buf, 0, sizeof buf);
  CHECK (u && nbd_connect_uri (h2, u) == 0 && nbd_pread (h2, buf, 6, 0, 0) == 0 &&
         memcmp (buf, "a b/c%", 6) == 0, "percent-encoded get_uri round trip: %s", u ? u : "");
  free (u);
  nbd_close (h2);
  nbd_close (h);

  /* What the URI rules forbid. */
  h = nbd_create ();
  CHECK (nbd_set_uri_allow_transports (h, LIBNBD_ALLOW_TRANSPORT_TCP | LIBNBD_ALLOW_TRANSPORT_VSOCK) == 0,
         "forbid unix");
  snprintf (uri, sizeof uri, "nbd+unix:///?socket=%s", mem_sock);
  CHECK_ERR (nbd_connect_uri (h, uri), "nbd_connect_uri", EPERM);
  CHECK (nbd_aio_is_created (h) == 1, "a forbidden URI leaves the handle created");
  CHECK (nbd_set_uri_allow_transports (h, LIBNBD_ALLOW_TRANSPORT_UNIX) == 0, "forbid tcp");
  snprintf (uri, sizeof uri, "nbd://127.0.0.1:%d/", port4);
  CHECK_ERR (nbd_connect_uri (h, uri), "nbd_connect_uri", EPERM);
  CHECK_ERR (nbd_set_uri_allow_transports (h, 0x100), "nbd_set_uri_allow_transports", EINVAL);
  nbd_close (h);
  h = nbd_create ();
  CHECK (nbd_set_uri_allow_tls (h, LIBNBD_TLS_DISABLE) == 0, "allow_tls disable");
  snprintf (uri, sizeof uri, "nbds://127.0.0.1:%d/", port4);
  CHECK_ERR (nbd_connect_uri (h, uri), "nbd_connect_uri", EPERM);
  CHECK (nbd_aio_is_created (h) == 1, "a forbidden TLS URI leaves the handle created");
  CHECK_ERR (nbd_set_uri_allow_tls (h, 3), "nbd_set_uri_allow_tls", EINVAL);
  nbd_close (h);

  /* vsock: nothing listens on the host (cid 2).  The errno depends on the
   * machine (ECONNRESET with /dev/vsock and no host listener, ENODEV or
   * EAFNOSUPPORT without vsock); the library must report what a plain
   * connect(2) reports, and libnbd reports a non-blocking connect that is
   * still in progress from nbd_poll, not from nbd_aio_connect_vsock. */
  {
    int want = vsock_errno (0), want_nb = vsock_errno (1), r;
    h = nbd_create ();
    CHECK_ERR (nbd_connect_vsock (h, 2, 10809), "nbd_connect_vsock", want);
    CHECK (nbd_aio_is_dead (h) == 1, "vsock: dead");
    nbd_close (h);
    h = nbd_create ();
    CHECK_ERR (nbd_connect_uri (h, "nbd+vsock://2:10809/"), "nbd_connect_uri", want);
    nbd_close (h);
    h = nbd_create ();
    r = nbd_aio_connect_vsock (h, 2, 10809);
    if (want_nb == EINPROGRESS) {
      CHECK (r == 0 && nbd_aio_is_connecting (h) == 1,
             "aio_connect_vsock: in progress (r %d, errno %d)", r, nbd_get_errno ());
      CHECK (nbd_aio_get_direction (h) == LIBNBD_AIO_DIRECTION_WRITE, "aio vsock: direction WRITE");
      CHECK_ERR (nbd_poll (h, 5000), "nbd_poll", want);
    }
    else
      CHECK_ERR (r, "nbd_aio_connect_vsock", want_nb);
    CHECK (nbd_aio_is_dead (h) == 1, "aio vsock: dead: %s", nbd_connection_state (h));
    nbd_close (h);
  }
  h = nbd_create ();
  CHECK (nbd_set_uri_allow_transports (h, LIBNBD_ALLOW_TRANSPORT_TCP) == 0, "tcp only");
  CHECK_ERR (nbd_connect_uri (h, "nbd+vsock://2:10809/"), "nbd_connect_uri", EPERM);
  nbd_close (h);

  /* connect_socket with one end of a socketpair, nbdkit -s on the other. */
  if (socketpair (AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == -1) fatal ("socketpair: %m");
  {
    char *argv[] = { "nbdkit", "-s", "--exit-with-parent", "memory", "2M", NULL };
    pid_t pid = spawn (argv, sv[1], sv[1]);
    close (sv[1]);
    h = nbd_create ();
    CHECK (nbd_connect_socket (h, sv[0]) == 0 && nbd_get_size (h) == 2097152, "connect_socket socketpair");
    CHECK (nbd_pwrite (h, "hello", 5, 0, 0) == 0 && nbd_pread (h, buf, 5, 0, 0) == 0 &&
           memcmp (buf, "hello", 5) == 0, "socketpair I/O");
    CHECK (nbd_shutdown (h, 0) == 0, "socketpair shutdown");
    nbd_close (h);              /* closes sv[0]; nbdkit -s exits */
    for (int i = 0; i < 200 && waitpid (pid, NULL, WNOHANG) == 0; i++) usleep (10000);
  }

  /* AIO connects driven by nbd_poll: predicates and directions. */
  {
    int seen = 0;
    unsigned dirs;
    h = nbd_create ();
    CHECK (nbd_aio_get_direction (h) == 0, "direction 0 when created");
    CHECK (state_is (h, STATE_CREATED), "state text: %s", nbd_connection_state (h));
    CHECK (nbd_aio_connect_unix (h, mem_sock) == 0, "aio_connect_unix");
    CHECK (nbd_aio_is_connecting (h) == 1 && nbd_aio_is_ready (h) == 0 &&
           nbd_aio_is_created (h) == 0, "connecting after aio_connect_unix");
    CHECK (nbd_aio_get_direction (h) == LIBNBD_AIO_DIRECTION_WRITE,
           "waits for the connect to finish: direction %d", nbd_aio_get_direction (h));
    dirs = drive_connect (h, &seen);
    CHECK (nbd_aio_is_ready (h) == 1 && seen >= 1, "ready after aio_connect_unix");
    CHECK ((dirs & 1) == 0 && dirs != 0, "directions while connecting: 0x%x", dirs);
    CHECK (nbd_aio_get_direction (h) == LIBNBD_AIO_DIRECTION_READ, "ready: direction READ");
    CHECK (state_is (h, STATE_READY), "state text: %s", nbd_connection_state (h));
    CHECK (nbd_aio_is_processing (h) == 0, "not processing when idle");
    {
      int64_t c = nbd_aio_pread (h, buf, 512, 0, NBD_NULL_COMPLETION, 0);
      /* The request is sent at once; waiting for its reply is READY, not PROCESSING. */
      CHECK (c > 0 && nbd_aio_in_flight (h) == 1 && nbd_aio_is_processing (h) == 0 &&
             nbd_aio_is_ready (h) == 1, "ready, not processing, with a command in flight");
      CHECK (nbd_aio_get_direction (h) == LIBNBD_AIO_DIRECTION_READ, "in flight: direction READ");
      while (nbd_aio_command_completed (h, c) == 0) nbd_poll (h, 1000);
      CHECK (nbd_aio_is_ready (h) == 1, "ready again");
    }
    CHECK (nbd_aio_disconnect (h, 0) == 0, "aio_disconnect");
    for (int i = 0; i < 100 && !nbd_aio_is_closed (h) && !nbd_aio_is_dead (h); i++)
      if (nbd_poll (h, 1000) == -1) break;
    CHECK (nbd_aio_is_closed (h) == 1, "closed after aio_disconnect: %s", nbd_connection_state (h));
    CHECK (nbd_aio_get_direction (h) == 0, "closed: direction %d", nbd_aio_get_direction (h));
    CHECK (state_is (h, STATE_CLOSED), "state text: %s", nbd_connection_state (h));
    nbd_close (h);

    /* TCP: libnbd's connect to loopback completes inside aio_connect_tcp,
     * which then runs the handshake as far as it can without blocking: the
     * handle is connecting (waiting for the server) or, rarely, ready. */
    seen = 0;
    h = nbd_create ();
    CHECK (nbd_aio_connect_tcp (h, "127.0.0.1", p4) == 0, "aio_connect_tcp");
    CHECK (nbd_aio_is_connecting (h) == 1 || nbd_aio_is_ready (h) == 1,
           "connecting after aio_connect_tcp: %s", nbd_connection_state (h));
    CHECK (nbd_aio_get_direction (h) != 0, "aio tcp: direction %d", nbd_aio_get_direction (h));
    dirs = drive_connect (h, &seen);
    CHECK (nbd_aio_is_ready (h) == 1 && (dirs & 1) == 0, "ready after aio_connect_tcp (dirs 0x%x)", dirs);
    CHECK (nbd_get_size (h) == 1048576, "aio tcp size");
    nbd_close (h);

    seen = 0;
    h = nbd_create ();
    snprintf (uri, sizeof uri, "nbd://[::1]:%d/", port6);
    CHECK (nbd_aio_connect_uri (h, uri) == 0, "aio_connect_uri");
    CHECK (nbd_aio_is_connecting (h) == 1 || nbd_aio_is_ready (h) == 1,
           "connecting after aio_connect_uri: %s", nbd_connection_state (h));
    dirs = drive_connect (h, &seen);
    CHECK (nbd_aio_is_ready (h) == 1 && (dirs & 1) == 0, "ready after aio_connect_uri (dirs 0x%x)", dirs);
    CHECK (nbd_get_size (h) == 1048576, "aio uri size");
    nbd_close (h);

    /* Opt mode over AIO: connecting, then negotiating, then aio_opt_go. */
    {
      struct counts go = { 0 };
      seen = 0;
      h = nbd_create ();
      nbd_set_opt_mode (h, true);
      snprintf (uri, sizeof uri, "nbd+unix:///?socket=%s", mem_sock);
      CHECK (nbd_aio_connect_uri (h, uri) == 0, "aio_connect_uri opt mode");
      drive_connect (h, &seen);
      CHECK (nbd_aio_is_negotiating (h) == 1 && nbd_aio_is_ready (h) == 0, "negotiating");
      CHECK (nbd_aio_get_direction (h) == 0, "negotiating: direction %d", nbd_aio_get_direction (h));
      CHECK (state_is (h, STATE_NEGOTIATING), "state text: %s", nbd_connection_state (h));
      CHECK (nbd_aio_opt_go (h, (nbd_completion_callback) {
               .callback = count_completion, .user_data = &go, .free = count_free }) == 0, "aio_opt_go");
      CHECK (nbd_aio_is_negotiating (h) == 0, "no longer negotiating once GO is sent");
      for (int i = 0; i < 100 && !nbd_aio_is_ready (h); i++)
        if (nbd_poll (h, 1000) == -1) break;
      CHECK (nbd_aio_is_ready (h) == 1 && go.calls == 1 && go.frees == 1 && go.err_seen == 0,
             "aio_opt_go completes once (%d calls %d frees)", go.calls, go.frees);
      nbd_close (h);
    }

    /* nbd_aio_connect with a raw sockaddr_in6. */
    {
      struct sockaddr_in6 sin6 = { .sin6_family = AF_INET6, .sin6_port = htons (port6),
                                   .sin6_addr = IN6ADDR_LOOPBACK_INIT };
      seen = 0;
      h = nbd_create ();
      CHECK (nbd_aio_connect (h, (struct sockaddr *) &sin6, sizeof sin6) == 0, "aio_connect in6");
      CHECK (nbd_aio_is_connecting (h) == 1, "connecting after aio_connect in6");
      CHECK (nbd_aio_get_direction (h) == LIBNBD_AIO_DIRECTION_WRITE, "aio in6: direction WRITE");
      dirs = drive_connect (h, &seen);
      CHECK (nbd_aio_is_ready (h) == 1 && nbd_get_size (h) == 1048576, "ready after aio_connect in6");
      nbd_close (h);
    }
  }
  free (svc); free (info_sock); free (mem_sock);
}

/* ---------------------------------------------------------------------- */
/* 4. Error paths */

static void *
blocking_pread (void *arg)
{
  struct nbd_handle *h = arg;
  static char buf[512];
  static int r[2];
  r[0] = nbd_pread (h, buf, sizeof buf, 0, 0);
  r[1] = nbd_get_errno ();
  return r;
}

static void
test_error_paths (void)
{
  struct nbd_handle *h;
  char buf[4096], *file = path_in_dir ("not-a-socket"), *stale = path_in_dir ("stale.sock");
  char *strict = path_in_dir ("strict.sock"), *err = path_in_dir ("error.sock");
  char *slow = path_in_dir ("slow.sock"), port[16];
  int fd;

  /* Unix paths that are not (live) sockets. */
  fd = open (file, O_CREAT | O_WRONLY, 0644);
  close (fd);
  h = nbd_create ();
  CHECK_ERR (nbd_connect_unix (h, file), "nbd_connect_unix", ECONNREFUSED);
  CHECK (nbd_aio_is_dead (h) == 1, "dead after refused");
  nbd_close (h);
  {
    struct sockaddr_un sun = { .sun_family = AF_UNIX };
    fd = socket (AF_UNIX, SOCK_STREAM, 0);
    snprintf (sun.sun_path, sizeof sun.sun_path, "%s", stale);
    if (bind (fd, (struct sockaddr *) &sun, sizeof sun) == -1) fatal ("bind: %m");
    close (fd);                 /* the socket file stays, nobody listens */
  }
  h = nbd_create ();
  CHECK_ERR (nbd_connect_unix (h, stale), "nbd_connect_unix", ECONNREFUSED);
  nbd_close (h);
  h = nbd_create ();
  CHECK (nbd_aio_connect_unix (h, "/nonexistent/socket") == -1, "aio_connect_unix nonexistent");
  CHECK (nbd_get_errno () == ENOENT, "aio_connect_unix: errno %d", nbd_get_errno ());
  nbd_close (h);
  {
    char longpath[200];
    memset (longpath, 'x', sizeof longpath - 1);
    longpath[0] = '/';
    longpath[sizeof longpath - 1] = 0;
    h = nbd_create ();
    CHECK_ERR (nbd_connect_unix (h, longpath), "nbd_connect_unix", ENAMETOOLONG);
    CHECK (nbd_aio_is_created (h) == 1, "a too-long path leaves the handle created");
    nbd_close (h);
  }

  /* TCP to a closed port, sync and async. */
  snprintf (port, sizeof port, "%d", free_port (AF_INET));
  h = nbd_create ();
  CHECK_ERR (nbd_connect_tcp (h, "127.0.0.1", port), "nbd_connect_tcp", ECONNREFUSED);
  /* libnbd: a TCP connect that fails leaves the handle created, so it can retry. */
  CHECK (nbd_aio_is_created (h) == 1 && nbd_aio_is_dead (h) == 0,
         "created after ECONNREFUSED: %s", nbd_connection_state (h));
  CHECK (nbd_connect_tcp (h, "127.0.0.1", live_port) == 0 && nbd_get_size (h) == 1048576,
         "retry on the same handle succeeds");
  nbd_close (h);
  h = nbd_create ();
  {
    int r = nbd_aio_connect_tcp (h, "127.0.0.1", port);
    for (int i = 0; r == 0 && i < 100 && nbd_aio_is_connecting (h); i++)
      if (nbd_poll (h, 1000) == -1) { r = -1; break; }
    CHECK (r == -1 && nbd_get_errno () == ECONNREFUSED && nbd_aio_is_created (h) == 1,
           "aio_connect_tcp refused: r %d errno %d state %s", r, nbd_get_errno (),
           nbd_connection_state (h));
  }
  nbd_close (h);
  /* getaddrinfo failures: libnbd reports errno 0 and stays created. */
  h = nbd_create ();
  CHECK_ERR (nbd_connect_tcp (h, "no-such-host.invalid", "10809"), "nbd_connect_tcp", 0);
  CHECK (nbd_aio_is_created (h) == 1, "created after a failed lookup: %s", nbd_connection_state (h));
  nbd_close (h);
  h = nbd_create ();
  CHECK_ERR (nbd_connect_tcp (h, "127.0.0.1", "no-such-service"), "nbd_connect_tcp", 0);
  nbd_close (h);

  /* An export name nbdkit refuses. */
  {
    char *args[] = { "--filter=exportname", "memory", "1M", "exportname-strict=true",
                     "exportname=foo", NULL };
    start_nbdkit_unix ("strict.sock", args);
  }
  h = nbd_create ();
  nbd_set_export_name (h, "bar");
  CHECK_ERR (nbd_connect_unix (h, strict), "nbd_connect_unix", ENOENT);
  CHECK (nbd_get_error () && strstr (nbd_get_error (), "bar") != NULL,
         "the message names the export: %s", nbd_get_error ());
  nbd_close (h);
  h = nbd_create ();
  nbd_set_export_name (h, "foo");
  CHECK (nbd_connect_unix (h, strict) == 0, "the allowed name");
  nbd_close (h);

  /* Server errors through the error filter. */
  {
    char *args[] = { "--filter=error", "memory", "1M", "error-pread=EIO", "error-pread-rate=100%",
                     "error-pwrite=ENOSPC", "error-pwrite-rate=100%", "error-trim=EPERM",
                     "error-trim-rate=100%", NULL };
    start_nbdkit_unix ("error.sock", args);
  }
  h = nbd_create ();
  CHECK (nbd_connect_unix (h, err) == 0, "connect to the error server");
  CHECK_ERR (nbd_pread (h, buf, 512, 0, 0), "nbd_pread", EIO);
  CHECK_ERR (nbd_pwrite (h, buf, 512, 0, 0), "nbd_pwrite", ENOSPC);
  CHECK_ERR (nbd_trim (h, 512, 0, 0), "nbd_trim", EPERM);
  CHECK (nbd_flush (h, 0) == 0, "other commands still work");
  {
    struct chunks ch = { 0 };
    CHECK_ERR (nbd_pread_structured (h, buf, 512, 0, (nbd_chunk_callback) {
                 .callback = collect_chunk, .user_data = &ch, .free = chunks_free }, 0),
               "nbd_pread_structured", EIO);
    /* nbdkit sends NBD_REPLY_TYPE_ERROR (no offset): libnbd does not call
     * the chunk callback for it, only for ERROR_OFFSET. */
    CHECK (ch.n == 0 && ch.frees == 1, "no chunk callback for an offset-less error: n %d", ch.n);
  }
  {
    struct counts done = { 0 };
    int64_t c = nbd_aio_pread (h, buf, 512, 0, (nbd_completion_callback) {
                  .callback = count_completion, .user_data = &done, .free = count_free }, 0);
    while (nbd_aio_in_flight (h) > 0) nbd_poll (h, 1000);
    CHECK (done.calls == 1 && done.err_seen == EIO, "completion saw EIO: %d", done.err_seen);
    CHECK_ERR (nbd_aio_command_completed (h, c), "nbd_aio_command_completed", EIO);
    CHECK (done.frees == 1, "freed when retired");
    CHECK (nbd_aio_command_completed (h, c) == 0, "a retired failed cookie is gone");
  }
  CHECK (nbd_aio_is_ready (h) == 1, "server errors leave the handle ready");
  nbd_close (h);

  /* The server dies under a blocking command and queued ones. */
  {
    char *args[] = { "--filter=delay", "memory", "1M", "rdelay=10", NULL };
    pid_t pid = start_nbdkit_unix ("slow.sock", args);
    pthread_t t;
    int *res, failed = 0;
    int64_t c[4];
    static char bufs[4][512];
    h = nbd_create ();
    CHECK (nbd_connect_unix (h, slow) == 0, "connect to the slow server");
    for (int i = 0; i < 4; i++)
      c[i] = nbd_aio_pread (h, bufs[i], 512, i * 512, NBD_NULL_COMPLETION, 0);
    pthread_create (&t, NULL, blocking_pread, h);
    usleep (200000);
    kill (pid, SIGKILL);
    pthread_join (t, (void **) &res);
    CHECK (res[0] == -1, "the blocking pread fails");
    CHECK (res[1] == ENOTCONN, "blocking pread errno %d", res[1]);
    while (nbd_aio_in_flight (h) > 0 && !nbd_aio_is_dead (h) && !nbd_aio_is_closed (h))
      if (nbd_poll (h, 1000) == -1) break;
    for (int i = 0; i < 4; i++)
      failed += nbd_aio_command_completed (h, c[i]) == -1;
    CHECK (failed == 4, "all queued commands failed: %d", failed);
    /* The server hung up between replies: closed, not dead (libnbd). */
    CHECK (nbd_aio_is_closed (h) == 1, "closed: %s",
           nbd_connection_state (h));
    CHECK (nbd_aio_in_flight (h) == 0, "nothing in flight");
    CHECK_ERR (nbd_pread (h, buf, 512, 0, 0), "nbd_pread", EINVAL);
    CHECK_ERR (nbd_flush (h, 0), "nbd_flush", EINVAL);
    CHECK (nbd_aio_pread (h, buf, 512, 0, NBD_NULL_COMPLETION, 0) == -1, "aio_pread after death");
    nbd_close (h);
  }
  free (file); free (stale); free (strict); free (err); free (slow);
}

/* ---------------------------------------------------------------------- */
/* 5. Callback rules */

static void
test_callback_rules (void)
{
  char *args[] = { "memory", "1M", NULL };
  char *sock;
  struct nbd_handle *h;
  static char buf[65536];
  int64_t c;

  start_nbdkit_unix ("cb.sock", args);
  sock = path_in_dir ("cb.sock");

  /* Refused calls: free exactly once, the callback never runs. */
  h = nbd_create ();
  {
    struct counts a = { 0 };
    struct extents *x = calloc (1, sizeof *x);
    CHECK_ERR (nbd_aio_pread (h, buf, 512, 0, (nbd_completion_callback) {
                 .callback = count_completion, .user_data = &a, .free = count_free }, 0),
               "nbd_aio_pread", ENOTCONN);
    CHECK (a.calls == 0 && a.frees == 1, "not connected: free once (%d)", a.frees);
    CHECK_ERR (nbd_aio_block_status (h, 512, 0, (nbd_extent_callback) {
                 .callback = collect_extent, .user_data = x, .free = extents_free },
                 (nbd_completion_callback) { .callback = count_completion, .user_data = &a,
                                             .free = count_free }, 0),
               "nbd_aio_block_status", ENOTCONN);
    CHECK (x->calls == 0 && x->frees == 1 && a.frees == 2, "not connected: both freed once");
    free (x);
  }
  CHECK (nbd_add_meta_context (h, LIBNBD_CONTEXT_BASE_ALLOCATION) == 0 &&
         nbd_connect_unix (h, sock) == 0, "callbacks: connect");
  {
    struct counts a = { 0 }, b = { 0 }, d = { 0 }, e = { 0 };
    struct chunks ch = { 0 };
    struct extents *x = calloc (1, sizeof *x);
    CHECK_ERR (nbd_aio_pread (h, buf, 512, 0, (nbd_completion_callback) {
                 .callback = count_completion, .user_data = &a, .free = count_free }, 0x10000),
               "nbd_aio_pread", EINVAL);
    CHECK (a.calls == 0 && a.frees == 1, "aio_pread bad flags: free once");
    CHECK_ERR (nbd_aio_pwrite (h, buf, 512, 0, (nbd_completion_callback) {
                 .callback = count_completion, .user_data = &b, .free = count_free },
                 LIBNBD_CMD_FLAG_REQ_ONE), "nbd_aio_pwrite", EINVAL);
    CHECK (b.calls == 0 && b.frees == 1, "aio_pwrite bad flags: free once");
    CHECK_ERR (nbd_aio_block_status (h, 512, 0, (nbd_extent_callback) {
                 .callback = collect_extent, .user_data = x, .free = extents_free },
                 (nbd_completion_callback) { .callback = count_completion, .user_data = &d,
                                             .free = count_free }, LIBNBD_CMD_FLAG_FUA),
               "nbd_aio_block_status", EINVAL);
    CHECK (x->calls == 0 && x->frees == 1 && d.calls == 0 && d.frees == 1,
           "aio_block_status bad flags: both freed once");
    CHECK_ERR (nbd_aio_pread_structured (h, buf, 512, 1048576, (nbd_chunk_callback) {
                 .callback = collect_chunk, .user_data = &ch, .free = chunks_free },
                 (nbd_completion_callback) { .callback = count_completion, .user_data = &e,
                                             .free = count_free }, 0),
               "nbd_aio_pread_structured", EINVAL);
    CHECK (ch.n == 0 && ch.frees == 1 && e.calls == 0 && e.frees == 1,
           "aio_pread_structured out of range: both freed once");
    free (x);
  }

  /* Successful AIO commands: completion and free exactly once each. */
  {
    struct counts a = { 0 }, b = { 0 };
    struct extents *x = calloc (1, sizeof *x);
    int64_t c1 = nbd_aio_pwrite (h, buf, 4096, 0, (nbd_completion_callback) {
                   .callback = count_completion, .user_data = &a, .free = count_free }, 0);
    int64_t c2 = nbd_aio_block_status (h, 1048576, 0, (nbd_extent_callback) {
                   .callback = collect_extent, .user_data = x, .free = extents_free },
                   (nbd_completion_callback) { .callback = count_completion, .user_data = &b,
                                               .free = count_free }, 0);
    CHECK (c1 > 0 && c2 > c1, "aio cookies increase");
    while (nbd_aio_in_flight (h) > 0) nbd_poll (h, 1000);
    /* libnbd frees a command's callbacks when it is retired, not when it completes. */
    CHECK (a.calls == 1 && a.frees == 0 && b.calls == 1 && b.frees == 0 && x->calls == 1 &&
           x->frees == 0, "before retiring: pwrite %d/%d, block_status %d/%d extent %d/%d",
           a.calls, a.frees, b.calls, b.frees, x->calls, x->frees);
    CHECK (nbd_aio_command_completed (h, c1) == 1 && nbd_aio_command_completed (h, c2) == 1,
           "retired by hand");
    CHECK (a.frees == 1 && b.frees == 1 && x->frees == 1, "freed once when retired: %d %d %d",
           a.frees, b.frees, x->frees);
    CHECK (nbd_aio_command_completed (h, c1) == 0, "a retired cookie is gone");
    free (x);
  }

  /* A chunk callback's error fails the command with that errno. */
  {
    struct chunks ch = { .set_error = EXDEV, .ret = -1 };
    CHECK_ERR (nbd_pread_structured (h, buf, 4096, 0, (nbd_chunk_callback) {
                 .callback = collect_chunk, .user_data = &ch, .free = chunks_free }, 0),
               "nbd_pread_structured", EXDEV);
    CHECK (ch.n == 1 && ch.frees == 1, "chunk callback ran once, freed once");
    struct chunks ch2 = { .ret = -1 };
    CHECK_ERR (nbd_pread_structured (h, buf, 4096, 0, (nbd_chunk_callback) {
                 .callback = collect_chunk, .user_data = &ch2 }, 0),
               "nbd_pread_structured", EPROTO);
    CHECK (nbd_aio_is_ready (h) == 1, "a callback error leaves the handle ready");
  }
  /* Likewise an extent callback. */
  {
    struct extents *x = calloc (1, sizeof *x);
    x->set_error = EDOM; x->ret = -1;
    CHECK_ERR (nbd_block_status (h, 65536, 0, (nbd_extent_callback) {
                 .callback = collect_extent, .user_data = x, .free = extents_free }, 0),
               "nbd_block_status", EDOM);
    CHECK (x->calls == 1 && x->frees == 1, "extent callback ran once, freed once");
    free (x);
  }
  /* A completion callback's error after a successful command. */
  {
    struct counts a = { .set_error = EXDEV, .ret = -1 };
    c = nbd_aio_pread (h, buf, 512, 0, (nbd_completion_callback) {
          .callback = count_completion, .user_data = &a, .free = count_free }, 0);
    while (nbd_aio_in_flight (h) > 0) nbd_poll (h, 1000);
    CHECK (a.calls == 1 && a.frees == 0 && a.err_seen == 0, "completion ran once");
    CHECK_ERR (nbd_aio_command_completed (h, c), "nbd_aio_command_completed", EXDEV);
    CHECK (a.frees == 1, "freed once when retired");
  }
  {
    struct chunks ch = { .set_error = EXDEV, .ret = -1 };
    struct counts a = { 0 };
    c = nbd_aio_pread_structured (h, buf, 4096, 0, (nbd_chunk_callback) {
          .callback = collect_chunk, .user_data = &ch, .free = chunks_free },
          (nbd_completion_callback) { .callback = count_completion, .user_data = &a,
                                      .free = count_free }, 0);
    while (nbd_aio_in_flight (h) > 0) nbd_poll (h, 1000);
    CHECK (a.calls == 1 && a.err_seen == EXDEV && ch.n == 1,
           "completion saw the chunk error %d", a.err_seen);
    CHECK_ERR (nbd_aio_command_completed (h, c), "nbd_aio_command_completed", EXDEV);
    CHECK (a.frees == 1 && ch.frees == 1, "both freed once when retired");
  }

  /* Auto-retire: completion returns 1; the cookie is then unknown. */
  {
    struct counts a = { .ret = 1 };
    c = nbd_aio_pwrite (h, buf, 512, 0, (nbd_completion_callback) {
          .callback = count_completion, .user_data = &a, .free = count_free }, 0);
    while (nbd_aio_in_flight (h) > 0) nbd_poll (h, 1000);
    CHECK (a.calls == 1 && a.frees == 1, "auto-retired pwrite callbacks");
    CHECK (nbd_aio_command_completed (h, c) == 0, "auto-retired cookie: %d",
           nbd_aio_command_completed (h, c));
    CHECK_ERR (nbd_aio_peek_command_completed (h), "nbd_aio_peek_command_completed", EINVAL);
    CHECK (nbd_aio_command_completed (h, 999999) == 0, "unknown cookie gives 0");
  }
  /* Auto-retire of a failing command: no error left to collect. */
  {
    struct counts a = { .ret = 1 };
    CHECK (nbd_set_strict_mode (h, 0) == 0, "strict off");
    c = nbd_aio_pread (h, buf, 512, 1048576, (nbd_completion_callback) {
          .callback = count_completion, .user_data = &a, .free = count_free }, 0);
    CHECK (c > 0, "out-of-range pread sent to the server");
    while (nbd_aio_in_flight (h) > 0) nbd_poll (h, 1000);
    CHECK (a.calls == 1 && a.frees == 1 && a.err_seen == EINVAL, "failed auto-retired: error %d",
           a.err_seen);
    CHECK (nbd_aio_command_completed (h, c) == 0, "failed auto-retired cookie gone");
  }
  nbd_close (h);
  free (sock);
}

/* ---------------------------------------------------------------------- */

int
main (void)
{
  const char *needs[] = { "nbdkit", "qemu-nbd", "qemu-img", "nbd-server", NULL };

  servers_init ("peers-test", needs, 50);

  test_qemu_raw ();
  test_qemu_qcow2 ();
  test_nbd_server ();
  test_transports ();
  test_error_paths ();
  test_callback_rules ();

  cleanup ();
  printf ("peers-test: %d checks, %d failures\n", checks, failures);
  return failures != 0;
}
