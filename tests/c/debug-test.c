/* Debug output (LIBNBD_DEBUG, nbd_set_debug, a debug callback): every call
 * traced with its arguments on entry and its result on return, as libnbd
 * 1.22 words them; the handshake's facts; poll start/end.
 *
 * A debug callback collects every message. Each traced call must give one
 * "enter:" line first and one "leave:" line last, in its own name; the
 * enter line must be exactly the one libnbd 1.22.2 prints (1.14 prints
 * the same for these calls). Then the handshake lines, and the line count of the sequence
 * nbdinfo --size runs, against the reference's.
 *
 * Which library is loaded shows only where ours adds something: the first
 * LIBNBD_DEBUG line names nbd-rs and its version, and nbd_rs_get_version
 * exists (at its own version node), while nbd_get_version and
 * nbd_get_package_name stay libnbd's on every library.
 *
 * NBD_TEST_LIBRARY (debian, reference, ours) says which library this is;
 * DEBUG_TEST_VERBOSE=1 prints every message collected.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <inttypes.h>
#include <unistd.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <libnbd.h>

#include "servers.h"

static bool debian, reference, ours, verbose;

/* Every message the debug callback saw. */
#define MAX_LINES 8192
static struct { char *context, *msg; } lines[MAX_LINES];
static size_t nlines;

static int
collect (void *user_data, const char *context, const char *msg)
{
  (void) user_data;
  if (verbose) fprintf (stderr, "debug: %s: %s\n", context, msg);
  if (nlines < MAX_LINES) {
    lines[nlines].context = strdup (context ? context : "");
    lines[nlines].msg = strdup (msg);
    nlines++;
  }
  return 0;
}

static void
forget_lines (void)
{
  for (size_t i = 0; i < nlines; i++) {
    free (lines[i].context);
    free (lines[i].msg);
  }
  nlines = 0;
}

static size_t calls_traced;

/* The lines from FROM on came from one call of FN: the first must be
 * "enter:" + ARGS (unless ARGS is NULL), the last "leave:", both in FN's
 * name. (1.14 words these calls' lines as 1.22 does.) */
static void
check_call (const char *fn, size_t from, const char *args)
{
  char want[2048];
  calls_traced++;
  CHECK (nlines > from + 1, "%s: %zu debug lines, want enter and leave", fn, nlines - from);
  if (nlines <= from + 1) return;
  snprintf (want, sizeof want, "enter:%s", args ? args : "");
  CHECK (strcmp (lines[from].context, fn) == 0 && strncmp (lines[from].msg, "enter:", 6) == 0,
         "%s: first line is %s: %s", fn, lines[from].context, lines[from].msg);
  if (args)
    CHECK (strcmp (lines[from].msg, want) == 0, "%s: enter line\n  got:  %s\n  want: %s", fn,
           lines[from].msg, want);
  CHECK (strcmp (lines[nlines - 1].context, fn) == 0 && strncmp (lines[nlines - 1].msg, "leave:", 6) == 0,
         "%s: last line is %s: %s", fn, lines[nlines - 1].context, lines[nlines - 1].msg);
}

/* The leave line of the call just checked. */
static void
check_leave (const char *fn, const char *want)
{
  CHECK (nlines > 0 && strcmp (lines[nlines - 1].msg, want) == 0, "%s: leave line\n  got:  %s\n  want: %s",
         fn, nlines ? lines[nlines - 1].msg : "(none)", want);
}

/* Runs CALL, which calls FN, and checks its trace (see check_call). */
#define TRACED(fn, args, call) do {                     \
    size_t from_ = nlines;                              \
    call;                                               \
    check_call (fn, from_, args);                       \
  } while (0)

/* Whether some line of FN (any, if NULL) starts with PREFIX. */
static bool
has_line (const char *fn, const char *prefix)
{
  for (size_t i = 0; i < nlines; i++)
    if ((!fn || strcmp (lines[i].context, fn) == 0) && strncmp (lines[i].msg, prefix, strlen (prefix)) == 0)
      return true;
  return false;
}

static int
list_export (void *user_data, const char *name, const char *description)
{
  (void) user_data; (void) name; (void) description;
  return 0;
}

static int
list_context (void *user_data, const char *name)
{
  (void) user_data; (void) name;
  return 0;
}

static int
extent (void *user_data, const char *metacontext, uint64_t offset, uint32_t *entries, size_t n, int *error)
{
  (void) user_data; (void) metacontext; (void) offset; (void) entries; (void) n; (void) error;
  return 0;
}

static int
completed (void *user_data, int *error)
{
  (void) error;
  (*(int *) user_data)++;
  return 0;
}

static struct nbd_handle *
traced_handle (void)
{
  struct nbd_handle *h = nbd_create ();
  if (h == NULL) fatal ("nbd_create: %s", nbd_get_error ());
  CHECK (nbd_set_debug_callback (h, (nbd_debug_callback) { .callback = collect }) == 0, "set_debug_callback");
  /* Debugging was off on entry, on on return: a leave line alone. */
  size_t from = nlines;
  CHECK (nbd_set_debug (h, true) == 0, "set_debug");
  CHECK (nlines == from + 1 && strcmp (lines[from].msg, "leave: ret=0") == 0, "set_debug: %zu lines",
         nlines - from);
  return h;
}

/* Settings, opt mode, commands with and without callbacks, shutdown. */
static void
test_calls (const char *sock)
{
  struct nbd_handle *h = traced_handle ();
  char *uri, want[1024], *s = NULL;
  int r = 0, done = 0;
  int64_t cookie = 0;
  if (asprintf (&uri, "nbd+unix:///?socket=%s", sock) == -1) fatal ("asprintf");

  TRACED ("nbd_set_handle_name", " handle_name=\"dbg\\x09test\"",
          CHECK (nbd_set_handle_name (h, "dbg\ttest") == 0, "set_handle_name"));
  TRACED ("nbd_get_handle_name", "", s = nbd_get_handle_name (h));
  check_leave ("nbd_get_handle_name", "leave: ret=\"dbg\\x09test\"");
  free (s);
  TRACED ("nbd_set_export_name", " export_name=\"\"",
          CHECK (nbd_set_export_name (h, "") == 0, "set_export_name"));
  TRACED ("nbd_set_full_info", " request=true", CHECK (nbd_set_full_info (h, true) == 0, "set_full_info"));
  TRACED ("nbd_get_full_info", "", CHECK (nbd_get_full_info (h) == 1, "get_full_info"));
  check_leave ("nbd_get_full_info", "leave: ret=1");
  TRACED ("nbd_set_handshake_flags", " flags=0x3",
          CHECK (nbd_set_handshake_flags (h, 3) == 0, "set_handshake_flags"));
  TRACED ("nbd_get_handshake_flags", "", CHECK (nbd_get_handshake_flags (h) == 3, "get_handshake_flags"));
  check_leave ("nbd_get_handshake_flags", "leave: ret=3");
  TRACED ("nbd_set_strict_mode", " flags=0x1f",
          CHECK (nbd_set_strict_mode (h, 0x1f) == 0, "set_strict_mode"));
  TRACED ("nbd_add_meta_context", " name=\"base:allocation\"",
          CHECK (nbd_add_meta_context (h, LIBNBD_CONTEXT_BASE_ALLOCATION) == 0, "add_meta_context"));
  TRACED ("nbd_get_meta_context", " i=0", s = nbd_get_meta_context (h, 0));
  check_leave ("nbd_get_meta_context", "leave: ret=\"base:allocation\"");
  free (s);
  TRACED ("nbd_set_opt_mode", " enable=true", CHECK (nbd_set_opt_mode (h, true) == 0, "set_opt_mode"));

  snprintf (want, sizeof want, " uri=\"%s\"", uri);
  TRACED ("nbd_connect_uri", want, CHECK (nbd_connect_uri (h, uri) == 0, "connect_uri"));
  CHECK (has_line ("nbd_connect_uri", "poll start: events="), "connect_uri: no poll start line");
  CHECK (has_line ("nbd_connect_uri", "poll end: r=1 revents="), "connect_uri: no poll end line");
  CHECK (has_line ("nbd_connect_uri", "negotiated structured replies on this connection"),
         "connect_uri: no structured replies line");
  if (!debian)
    CHECK (has_line ("nbd_connect_uri", "extended headers are not supported by this server"),
           "connect_uri: no extended headers line");

  TRACED ("nbd_opt_list", " list=<fun>",
          CHECK (nbd_opt_list (h, (nbd_list_callback) { .callback = list_export }) == 1, "opt_list"));
  TRACED ("nbd_opt_list_meta_context", " context=<fun>",
          CHECK (nbd_opt_list_meta_context (h, (nbd_context_callback) { .callback = list_context }) == 1,
                 "opt_list_meta_context"));
  CHECK (has_line ("nbd_opt_list_meta_context", "negotiated base:allocation with context ID "),
         "opt_list_meta_context: no context line");
  TRACED ("nbd_opt_info", "", CHECK (nbd_opt_info (h) == 0, "opt_info"));
  CHECK (has_line ("nbd_opt_info", "exportsize: 1048576 eflags: 0x"), "opt_info: no exportsize line");
  TRACED ("nbd_opt_go", "", CHECK (nbd_opt_go (h) == 0, "opt_go"));
  CHECK (has_line ("nbd_opt_go", "negotiated base:allocation with context ID "), "opt_go: no context line");
  CHECK (has_line ("nbd_opt_go", "exportsize: 1048576 eflags: 0x"), "opt_go: no exportsize line");

  TRACED ("nbd_get_size", "", CHECK (nbd_get_size (h) == 1048576, "get_size"));
  check_leave ("nbd_get_size", "leave: ret=1048576");
  TRACED ("nbd_can_meta_context", " metacontext=\"base:allocation\"",
          CHECK (nbd_can_meta_context (h, LIBNBD_CONTEXT_BASE_ALLOCATION) == 1, "can_meta_context"));
  TRACED ("nbd_get_protocol", "", nbd_get_protocol (h));
  check_leave ("nbd_get_protocol", "leave: ret=newstyle-fixed");
  TRACED ("nbd_opt_abort", "", nbd_opt_abort (h));
  check_leave ("nbd_opt_abort",
               "leave: error=\"nbd_opt_abort: invalid state: READY: the handle must be negotiating: "
               "Invalid argument\"");

  /* Buffers: a write's is dumped (its first sector), a read's not. */
  char data[600];
  for (size_t i = 0; i < sizeof data; i++) data[i] = "hello, world!\n\001\377"[i % 16];
  TRACED ("nbd_pwrite",
          " buf=\"\n0000: 68 65 6c 6c 6f 2c 20 77 6f 72 6c 64 21 0a 01 ff |hello, world!...|\n"
          "0010: 68 65 6c                                        |hel             |\n\" "
          "count=19 offset=0 flags=0x0", CHECK (nbd_pwrite (h, data, 19, 0, 0) == 0, "pwrite"));
  TRACED ("nbd_pread", " buf=<buf> count=19 offset=0 flags=0x0",
          CHECK (nbd_pread (h, data, 19, 0, 0) == 0, "pread"));
  TRACED ("nbd_pwrite", NULL, CHECK (nbd_pwrite (h, data, sizeof data, 512, LIBNBD_CMD_FLAG_FUA) == 0,
                                             "pwrite 600"));
  {
    /* The long write: 32 lines of dump, then the count of the rest. */
    bool found = false;
    for (size_t i = 0; i < nlines; i++)
      if (strcmp (lines[i].context, "nbd_pwrite") == 0 &&
          strstr (lines[i].msg, "|\n[... 88 more bytes truncated ...]\n\" count=600 offset=512 flags=0x1"))
        found = true;
    CHECK (found, "pwrite of 600 bytes: no truncated dump");
  }

  /* Completion callbacks: libnbd 1.22 prints them inverted ("<fun>" for
   * none, "NULL" for one given). */
  TRACED ("nbd_aio_pwrite",
          " buf=\"\n0000: 68 65 6c 6c                                     |hell            |\n\" "
          "count=4 offset=4096 completion=<fun> flags=0x1",
          CHECK ((cookie = nbd_aio_pwrite (h, data, 4, 4096, NBD_NULL_COMPLETION, LIBNBD_CMD_FLAG_FUA)) > 0,
                 "aio_pwrite"));
  snprintf (want, sizeof want, "leave: ret=%" PRIi64, cookie);
  check_leave ("nbd_aio_pwrite", want);
  while (nbd_aio_in_flight (h) > 0 && r != -1)
    TRACED ("nbd_poll", " timeout=-1", r = nbd_poll (h, -1));
  snprintf (want, sizeof want, " cookie=%" PRIi64, cookie);
  TRACED ("nbd_aio_command_completed", want,
          CHECK (nbd_aio_command_completed (h, cookie) == 1, "aio_command_completed"));
  TRACED ("nbd_aio_pread", " buf=<buf> count=512 offset=0 completion=NULL flags=0x0",
          CHECK ((cookie = nbd_aio_pread (h, data, 512, 0,
                                          (nbd_completion_callback) { .callback = completed, .user_data = &done },
                                          0)) > 0,
                 "aio_pread"));
  TRACED ("nbd_aio_flush", " completion=<fun> flags=0x0",
          CHECK (nbd_aio_flush (h, NBD_NULL_COMPLETION, 0) > 0, "aio_flush"));
  while (nbd_aio_in_flight (h) > 0 && r != -1)
    TRACED ("nbd_poll", " timeout=-1", r = nbd_poll (h, -1));
  CHECK (done == 1, "aio_pread's completion ran %d times", done);
  TRACED ("nbd_block_status", " count=65536 offset=0 extent=<fun> flags=0x0",
          CHECK (nbd_block_status (h, 65536, 0, (nbd_extent_callback) { .callback = extent }, 0) == 0,
                 "block_status"));
  TRACED ("nbd_zero", " count=4096 offset=8192 flags=0x3",
          CHECK (nbd_zero (h, 4096, 8192, LIBNBD_CMD_FLAG_FUA | LIBNBD_CMD_FLAG_NO_HOLE) == 0, "zero"));
  TRACED ("nbd_shutdown", " flags=0x0", CHECK (nbd_shutdown (h, 0) == 0, "shutdown"));
  TRACED ("nbd_aio_is_closed", "", CHECK (nbd_aio_is_closed (h) == 1, "aio_is_closed"));
  nbd_close (h);
  free (uri);
}

/* A string list, a private_data value, and a server with block sizes. */
static void
test_command (void)
{
  struct nbd_handle *h = traced_handle ();
  char *argv[] = { "nbdkit", "-s", "--exit-with-parent", "--filter=blocksize-policy", "memory", "64K",
                   "blocksize-minimum=512", "blocksize-preferred=4096", "blocksize-maximum=65536", NULL };
  TRACED ("nbd_set_private_data", " private_data=42", nbd_set_private_data (h, 42));
  check_leave ("nbd_set_private_data", "leave: ret=0");
  TRACED ("nbd_connect_command",
          " argv=[\"nbdkit\", \"-s\", \"--exit-with-parent\", \"--filter=blocksize-policy\", \"memory\", "
          "\"64K\", \"blocksize-minimum=512\", \"blocksize-preferred=4096\", \"blocksize-maximum=65536\"]", CHECK (nbd_connect_command (h, argv) == 0, "connect_command"));
  CHECK (has_line ("nbd_connect_command", "server block size constraints: min: 512 preferred: 4096 max: 65536"),
         "connect_command: no block size line");
  TRACED ("nbd_get_size", "", CHECK (nbd_get_size (h) == 65536, "get_size"));
  nbd_close (h);
}

/* TLS: the session's line once the TLS handshake is done. */
static void
test_tls (const char *tls_sock, const char *certs)
{
  struct nbd_handle *h = traced_handle ();
  char *client, want[1024];
  if (asprintf (&client, "%s/client", certs) == -1) fatal ("asprintf");
  TRACED ("nbd_set_tls", " tls=2", CHECK (nbd_set_tls (h, LIBNBD_TLS_REQUIRE) == 0, "set_tls"));
  snprintf (want, sizeof want, " dir=\"%s\"", client);
  TRACED ("nbd_set_tls_certificates", want,
          CHECK (nbd_set_tls_certificates (h, client) == 0, "set_tls_certificates"));
  TRACED ("nbd_set_tls_verify_peer", " verify=false",
          CHECK (nbd_set_tls_verify_peer (h, false) == 0, "set_tls_verify_peer"));
  snprintf (want, sizeof want, " unixsocket=\"%s\"", tls_sock);
  TRACED ("nbd_connect_unix", want, CHECK (nbd_connect_unix (h, tls_sock) == 0, "connect_unix with TLS"));
  CHECK (has_line ("nbd_connect_unix", "connection is using TLS: "), "connect_unix: no TLS line");
  TRACED ("nbd_get_tls_negotiated", "", CHECK (nbd_get_tls_negotiated (h) == 1, "get_tls_negotiated"));
  nbd_close (h);
  free (client);
}

/* The calls nbdinfo --size makes, and how many lines they give: at least
 * as many as libnbd 1.22.2 gives, less the poll lines (their number
 * follows how the handshake's bytes happen to arrive) and, on ours, the
 * transition lines libnbd's release builds do not print. */
#define REFERENCE_LINES 18      /* the reference's, without poll lines */
static void
test_nbdinfo_size (const char *sock)
{
  char *uri;
  size_t polls = 0, transitions = 0;
  if (asprintf (&uri, "nbd+unix:///?socket=%s", sock) == -1) fatal ("asprintf");
  forget_lines ();
  struct nbd_handle *h = traced_handle ();
  forget_lines ();              /* from nbd_create on, as LIBNBD_DEBUG shows */
  nbd_set_uri_allow_local_file (h, true);
  nbd_set_opt_mode (h, true);
  CHECK (nbd_connect_uri (h, uri) == 0, "connect_uri");
  if (nbd_aio_is_negotiating (h))
    CHECK (nbd_opt_info (h) == 0, "opt_info");
  CHECK (nbd_get_size (h) == 1048576, "get_size");
  if (debian)                   /* 1.14 shuts down only a connected handle */
    CHECK (nbd_opt_abort (h) == 0, "opt_abort");
  else
    CHECK (nbd_shutdown (h, 0) == 0, "shutdown");
  nbd_close (h);
  for (size_t i = 0; i < nlines; i++) {
    polls += strncmp (lines[i].msg, "poll ", 5) == 0;
    transitions += strncmp (lines[i].msg, "transition: ", 12) == 0 || strncmp (lines[i].msg, "event ", 6) == 0;
  }
  /* + 2: nbd_create's "opening handle" and nbd_close's "closing handle",
   * which go to stderr, before the callback is set and after it is gone. */
  printf ("nbdinfo --size sequence: %zu lines (+2 to stderr): %zu poll, %zu transition or event\n", nlines,
          polls, transitions);
  if (reference)
    CHECK (nlines - polls == REFERENCE_LINES, "reference: %zu lines without polls, want %d", nlines - polls,
           REFERENCE_LINES);
  if (ours)
    CHECK (nlines - polls - transitions >= REFERENCE_LINES, "ours: %zu lines without polls and transitions, "
           "the reference has %d", nlines - polls - transitions, REFERENCE_LINES);
  free (uri);
}

/* The first line LIBNBD_DEBUG=1 writes (to stderr, at nbd_create), into
 * FIRST. */
static void
first_debug_line (char *first, size_t size)
{
  char path[] = "/tmp/debug-test-stderr-XXXXXX";
  int fd = mkstemp (path);
  if (fd == -1) fatal ("mkstemp");
  fflush (stderr);
  int saved = dup (2);
  if (saved == -1 || dup2 (fd, 2) == -1) fatal ("dup2");
  setenv ("LIBNBD_DEBUG", "1", 1);
  struct nbd_handle *h = nbd_create ();
  unsetenv ("LIBNBD_DEBUG");
  nbd_close (h);
  fflush (stderr);
  if (dup2 (saved, 2) == -1) fatal ("dup2");
  close (saved);
  FILE *fp = fdopen (fd, "r");
  if (fp == NULL) fatal ("fdopen");
  rewind (fp);
  if (fgets (first, size, fp) == NULL) first[0] = '\0';
  first[strcspn (first, "\n")] = '\0';
  fclose (fp);
  unlink (path);
}

static void
test_identity (void)
{
  char first[512];
  first_debug_line (first, sizeof first);
  CHECK (strncmp (first, "libnbd: debug: nbd", 18) == 0 && strstr (first, ": nbd_create: opening handle"),
         "first debug line: %s", first);
  const char *(*our_version) (void) = (const char *(*) (void)) dlsym (RTLD_DEFAULT, "nbd_rs_get_version");
  if (ours) {
    CHECK (our_version != NULL, "nbd_rs_get_version is exported");
    CHECK (dlvsym (RTLD_DEFAULT, "nbd_rs_get_version", "NBD_RS_0.1") == (void *) our_version,
           "nbd_rs_get_version is at NBD_RS_0.1");
    if (our_version) {
      const char *v = our_version ();
      char want[256];
      snprintf (want, sizeof want, "nbd_create: opening handle (nbd-rs %s, libnbd 1.22.2 ABI)", v ? v : "?");
      CHECK (v && *v >= '0' && *v <= '9', "nbd_rs_get_version: %s", v ? v : "NULL");
      CHECK (strstr (first, want) != NULL, "first debug line names nbd-rs: %s", first);
    }
  }
  else {
    CHECK (our_version == NULL, "libnbd has no nbd_rs_get_version");
    CHECK (strstr (first, "nbd-rs") == NULL, "libnbd's first debug line: %s", first);
  }
  /* Programs parse these, so they stay libnbd's. */
  struct nbd_handle *h = nbd_create ();
  if (h == NULL) fatal ("nbd_create");
  const char *package = nbd_get_package_name (h), *version = nbd_get_version (h);
  CHECK (package && strcmp (package, "libnbd") == 0, "get_package_name: %s", package ? package : "NULL");
  CHECK (version && strcmp (version, debian ? "1.14.2" : "1.22.2") == 0, "get_version: %s",
         version ? version : "NULL");
  nbd_close (h);
}

int
main (void)
{
  const char *needs[] = { "nbdkit", "openssl", NULL };
  const char *lib = getenv ("NBD_TEST_LIBRARY");
  debian = lib && strcmp (lib, "debian") == 0;
  reference = lib && strcmp (lib, "reference") == 0;
  ours = lib && strcmp (lib, "ours") == 0;
  verbose = getenv ("DEBUG_TEST_VERBOSE") != NULL;
  unsetenv ("LIBNBD_DEBUG");

  servers_init ("debug-test", needs, 120);
  char *sock = path_in_dir ("nbd.sock"), *tls_sock = path_in_dir ("tls.sock"), *server;
  char *memory[] = { "memory", "1M", NULL };
  start_nbdkit_unix ("nbd.sock", memory);
  char *certs = make_tls_certs ();
  if (asprintf (&server, "--tls-certificates=%s/server", certs) == -1) fatal ("asprintf");
  char *tls_args[] = { "--tls=require", server, "memory", "1M", NULL };
  start_nbdkit_listening (tls_sock, 0, tls_args);

  test_identity ();
  test_calls (sock);
  test_command ();
  test_tls (tls_sock, certs);
  printf ("debug-test: %zu calls traced\n", calls_traced);
  test_nbdinfo_size (sock);

  forget_lines ();
  free (sock);
  free (tls_sock);
  free (server);
  free (certs);
  printf ("debug-test: %d checks, %d failures\n", checks, failures);
  return failures != 0;
}
