/* Servers the C tests start themselves, and their teardown: a private
 * temporary directory, children and daemons (by pidfile), all removed at
 * exit, on a signal and on the alarm. A test calls servers_init first,
 * with its name and the binaries it needs (a missing one is a failure).
 */
#ifndef NBD_TESTS_SERVERS_H
#define NBD_TESTS_SERVERS_H

#include <fcntl.h>
#include <ftw.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/stat.h>
#include <sys/wait.h>

#include "check.h"

static const char *test_name = "test";
static char dir[64];
static int have_dir;
static pid_t children[32];
static int nchildren;
static char daemon_pidfiles[4][300];
static int ndaemons;
static pid_t main_pid;

static void
stop_pid (pid_t pid, int is_child)
{
  if (pid <= 0) return;
  kill (pid, SIGTERM);
  for (int i = 0; i < 200; i++) {
    if (is_child ? waitpid (pid, NULL, WNOHANG) != 0 : kill (pid, 0) == -1)
      return;
    usleep (10000);
  }
  kill (pid, SIGKILL);
  if (is_child) waitpid (pid, NULL, 0);
}

static pid_t
read_pidfile (const char *path)
{
  FILE *fp = fopen (path, "r");
  long pid = 0;
  if (fp == NULL) return 0;
  if (fscanf (fp, "%ld", &pid) != 1 || pid <= 1) pid = 0;
  fclose (fp);
  return pid;
}

static int
rm_entry (const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
  (void) st; (void) flag; (void) ftw;
  remove (path);
  return 0;
}

static void
cleanup (void)
{
  if (getpid () != main_pid) return;          /* never in a forked child */
  for (int i = 0; i < ndaemons; i++) {
    pid_t pid = 0;
    /* A daemon that forked may not have written its pidfile yet. */
    for (int j = 0; j < 100 && (pid = read_pidfile (daemon_pidfiles[i])) == 0; j++)
      usleep (10000);
    stop_pid (pid, 0);
  }
  ndaemons = 0;
  for (int i = 0; i < nchildren; i++)
    stop_pid (children[i], 1);
  nchildren = 0;
  if (have_dir) {
    nftw (dir, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
    have_dir = 0;
  }
}

/* On a signal (the alarm, most likely) only async-signal-safe calls: kill
 * what was started, remove the directory by running rm, and exit. */
static void
on_signal (int sig)
{
  static const char msg[] = ": FAIL: timed out or killed, cleaning up\n";
  (void) sig;
  if (write (2, test_name, strlen (test_name)) < 0 || write (2, msg, sizeof msg - 1) < 0) {}
  for (int i = 0; i < nchildren; i++)
    kill (children[i], SIGKILL);
  for (int i = 0; i < ndaemons; i++) {
    char buf[32] = { 0 };
    int fd = open (daemon_pidfiles[i], O_RDONLY);
    if (fd >= 0 && read (fd, buf, sizeof buf - 1) > 0) {
      pid_t pid = 0;
      for (char *c = buf; *c >= '0' && *c <= '9'; c++) pid = pid * 10 + (*c - '0');
      if (pid > 1) kill (pid, SIGKILL);
    }
    if (fd >= 0) close (fd);
  }
  if (have_dir) {
    pid_t rm = fork ();
    if (rm == 0) {
      execlp ("rm", "rm", "-rf", dir, (char *) NULL);
      _exit (127);
    }
    if (rm > 0) waitpid (rm, NULL, 0);
  }
  _exit (3);
}

static void __attribute__ ((noreturn, format (printf, 1, 2)))
fatal (const char *fmt, ...)
{
  va_list ap;
  fprintf (stderr, "%s: FAIL: ", test_name);
  va_start (ap, fmt);
  vfprintf (stderr, fmt, ap);
  va_end (ap);
  fprintf (stderr, "\n");
  printf ("%s: %d checks, %d failures (aborted)\n", test_name, checks, failures + 1);
  exit (2);                     /* atexit runs cleanup */
}

static void
need_binary (const char *name)
{
  char *path = getenv ("PATH"), *copy, *p, *save = NULL, full[512];
  copy = strdup (path ? path : "/usr/bin:/bin");
  for (p = strtok_r (copy, ":", &save); p; p = strtok_r (NULL, ":", &save)) {
    snprintf (full, sizeof full, "%s/%s", p, name);
    if (access (full, X_OK) == 0) { free (copy); return; }
  }
  free (copy);
  fatal ("%s is not installed (make deps installs it)", name);
}

/* fork/exec; stdin and stdout from the fds when >= 0, else /dev/null. */
static pid_t
spawn (char **argv, int in_fd, int out_fd)
{
  pid_t pid = fork ();
  if (pid == -1) fatal ("fork: %m");
  if (pid == 0) {
    signal (SIGTERM, SIG_DFL);
    signal (SIGINT, SIG_DFL);
    signal (SIGALRM, SIG_DFL);
    signal (SIGPIPE, SIG_DFL);
    alarm (0);
    prctl (PR_SET_PDEATHSIG, SIGKILL);
    int null = open ("/dev/null", O_RDWR);
    dup2 (in_fd >= 0 ? in_fd : null, 0);
    dup2 (out_fd >= 0 ? out_fd : null, 1);
    execvp (argv[0], argv);
    fprintf (stderr, "%s: FAIL: cannot run %s: %m\n", test_name, argv[0]);
    _exit (127);
  }
  if (nchildren < 32) children[nchildren++] = pid;
  return pid;
}

static void
forget_child (pid_t pid)
{
  for (int i = 0; i < nchildren; i++)
    if (children[i] == pid) children[i] = children[--nchildren];
}

/* Runs ARGV to completion; anything but exit status 0 is fatal. */
static void __attribute__ ((unused))
run (char **argv)
{
  int status;
  pid_t pid = spawn (argv, -1, -1);
  if (waitpid (pid, &status, 0) != pid || !WIFEXITED (status) || WEXITSTATUS (status) != 0)
    fatal ("%s %s failed", argv[0], argv[1]);
  forget_child (pid);
}

static bool
file_nonempty (const char *path)
{
  struct stat st;
  return stat (path, &st) == 0 && st.st_size > 0;
}

static bool
is_socket (const char *path)
{
  struct stat st;
  return stat (path, &st) == 0 && S_ISSOCK (st.st_mode);
}

static bool
unix_accepts (const char *path)
{
  struct sockaddr_un sun = { .sun_family = AF_UNIX };
  int fd = socket (AF_UNIX, SOCK_STREAM, 0);
  bool ok;
  snprintf (sun.sun_path, sizeof sun.sun_path, "%s", path);
  ok = connect (fd, (struct sockaddr *) &sun, sizeof sun) == 0;
  close (fd);
  return ok;
}

static bool
tcp_accepts (int port)
{
  struct sockaddr_in sin = { .sin_family = AF_INET, .sin_port = htons (port),
                             .sin_addr.s_addr = htonl (INADDR_LOOPBACK) };
  int fd = socket (AF_INET, SOCK_STREAM, 0);
  bool ok = connect (fd, (struct sockaddr *) &sin, sizeof sin) == 0;
  close (fd);
  return ok;
}

/* Wait for the pidfile, the Unix socket and (port > 0) a listening TCP
 * port. nbd-server (a daemon) may create its socket file before it
 * listens, so for daemons the socket is also probed with a connection.
 * A server that exits (except a daemonizing parent with status 0) is
 * fatal. */
static void
wait_ready (const char *what, pid_t pid, const char *pidfile, const char *sock,
            int port, bool daemonizes)
{
  int status;
  for (int i = 0; i < 1000; i++) {
    if (pid > 0 && waitpid (pid, &status, WNOHANG) == pid) {
      forget_child (pid);
      if (!daemonizes || !WIFEXITED (status) || WEXITSTATUS (status) != 0)
        fatal ("%s exited before it was ready (status 0x%x)", what, status);
      pid = 0;
    }
    if ((pidfile == NULL || file_nonempty (pidfile)) &&
        (sock == NULL || (is_socket (sock) && (!daemonizes || unix_accepts (sock)))) &&
        (port == 0 || tcp_accepts (port)))
      return;
    usleep (10000);
  }
  fatal ("%s did not become ready in 10 s", what);
}

/* A loopback port nobody listens on right now. */
static int __attribute__ ((unused))
free_port (int family)
{
  struct sockaddr_storage ss = { 0 };
  socklen_t len;
  int fd = socket (family, SOCK_STREAM, 0), port;
  if (family == AF_INET) {
    struct sockaddr_in *sin = (struct sockaddr_in *) &ss;
    sin->sin_family = AF_INET;
    sin->sin_addr.s_addr = htonl (INADDR_LOOPBACK);
    len = sizeof *sin;
  } else {
    struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *) &ss;
    sin6->sin6_family = AF_INET6;
    sin6->sin6_addr = in6addr_loopback;
    len = sizeof *sin6;
  }
  if (fd == -1 || bind (fd, (struct sockaddr *) &ss, len) == -1 ||
      getsockname (fd, (struct sockaddr *) &ss, &len) == -1)
    fatal ("free_port: %m");
  port = ntohs (family == AF_INET ? ((struct sockaddr_in *) &ss)->sin_port
                : ((struct sockaddr_in6 *) &ss)->sin6_port);
  close (fd);
  return port;
}

/* A file in the private directory (allocated). */
static char *
path_in_dir (const char *name)
{
  char *p;
  if (asprintf (&p, "%s/%s", dir, name) == -1) fatal ("asprintf");
  return p;
}

/* nbdkit -f listening on SOCK (a path) or on PORT (every address), with
 * ARGS (NULL-terminated) after the common options; ready when it returns. */
static pid_t
start_nbdkit_listening (const char *sock, int port, char **args)
{
  char *pidfile, *argv[32], portstr[16];
  int n = 0;
  if ((sock ? asprintf (&pidfile, "%s.pid", sock)
       : asprintf (&pidfile, "%s/nbdkit-%d.pid", dir, port)) == -1)
    fatal ("asprintf");
  argv[n++] = "nbdkit"; argv[n++] = "-f"; argv[n++] = "--exit-with-parent";
  argv[n++] = "-P"; argv[n++] = pidfile;
  if (sock) {
    argv[n++] = "-U"; argv[n++] = (char *) sock;
  } else {
    snprintf (portstr, sizeof portstr, "%d", port);
    argv[n++] = "-p"; argv[n++] = portstr;
  }
  while (*args && n < 31) argv[n++] = *args++;
  argv[n] = NULL;
  pid_t pid = spawn (argv, -1, -1);
  wait_ready ("nbdkit", pid, pidfile, sock, sock ? 0 : port, false);
  free (pidfile);
  return pid;
}

/* nbdkit -f on a Unix socket NAME in the private directory, with ARGS
 * (NULL-terminated) after the common options; ready when it returns. */
static pid_t __attribute__ ((unused))
start_nbdkit_unix (const char *name, char **args)
{
  char *sock = path_in_dir (name);
  pid_t pid = start_nbdkit_listening (sock, 0, args);
  free (sock);
  return pid;
}

/* nbdkit -f on TCP PORT of every local address (IPv4 and IPv6). */
static pid_t __attribute__ ((unused))
start_nbdkit_port (int port, char **args)
{
  return start_nbdkit_listening (NULL, port, args);
}

/* tests/tls-certs.sh from the repository (the current directory, as
 * tests/c-compare.sh runs us; TLS_CERTS_SH; or next to our binary in
 * target/c-tests) run into the private directory's "certs"; returns that
 * directory (allocated). */
static __attribute__ ((unused)) char *
make_tls_certs (void)
{
  char exe[4096], *script = NULL, *candidates[3], *beside = NULL;
  ssize_t n = readlink ("/proc/self/exe", exe, sizeof exe - 1);
  int nc = 0, status;
  candidates[nc++] = getenv ("TLS_CERTS_SH");
  candidates[nc++] = "tests/tls-certs.sh";
  if (n > 0) {
    exe[n] = 0;
    char *slash = strrchr (exe, '/');
    if (slash) *slash = 0;
    if (asprintf (&beside, "%s/../../tests/tls-certs.sh", exe) == -1) fatal ("asprintf");
    candidates[nc++] = beside;
  }
  for (int i = 0; i < nc && !script; i++)
    if (candidates[i] && access (candidates[i], X_OK) == 0) script = candidates[i];
  if (!script) fatal ("tests/tls-certs.sh not found (run from the repository root or set TLS_CERTS_SH)");
  char *certs = path_in_dir ("certs");
  char *argv[] = { script, certs, NULL };
  pid_t pid = spawn (argv, -1, -1);
  if (waitpid (pid, &status, 0) != pid || !WIFEXITED (status) || WEXITSTATUS (status) != 0)
    fatal ("%s failed (status 0x%x)", script, status);
  forget_child (pid);
  free (beside);
  return certs;
}

/* nbdkit's eval plugin as a server that gives its first connection a
 * size of 1 MiB and every later one 2 MiB, counting in the file COUNT:
 * ARGS (5 entries, NULL-terminated) for start_nbdkit_*; free ARGS[1] and
 * ARGS[2] afterwards. It allows multi-conn and reads zeroes. */
static void __attribute__ ((unused))
size_changing_server (const char *count, char *args[5])
{
  args[0] = "eval";
  if (asprintf (&args[1],
                "get_size=n=$(cat %s 2>/dev/null || echo 0); echo $((n+1)) > %s; "
                "if [ $n = 0 ]; then echo 1048576; else echo 2097152; fi", count, count) == -1 ||
      asprintf (&args[2], "pread=dd if=/dev/zero count=$3 iflag=count_bytes status=none") == -1)
    fatal ("asprintf");
  args[3] = "can_multi_conn=exit 0";
  args[4] = NULL;
}

/* Open file descriptors below 1024. */
static int __attribute__ ((unused))
open_fds (void)
{
  int n = 0;
  for (int fd = 0; fd < 1024; fd++)
    n += fcntl (fd, F_GETFD) != -1;
  return n;
}

/* The private directory, cleanup at exit and on signals, and a time
 * limit of `seconds` (a positive TEST_TIME_LIMIT overrides it, for slow
 * runs such as valgrind's); every binary in the NULL-terminated `needs` must be
 * installed. */
static void
servers_init (const char *name, const char **needs, unsigned seconds)
{
  struct sigaction sa = { .sa_handler = on_signal };

  test_name = name;
  main_pid = getpid ();
  sigfillset (&sa.sa_mask);     /* one cleanup at a time */
  for (; *needs; needs++) need_binary (*needs);
  snprintf (dir, sizeof dir, "/tmp/%s.XXXXXX", name);
  if (mkdtemp (dir) == NULL) fatal ("mkdtemp: %m");
  have_dir = 1;
  atexit (cleanup);
  sigaction (SIGALRM, &sa, NULL);
  sigaction (SIGINT, &sa, NULL);
  sigaction (SIGTERM, &sa, NULL);
  const char *limit = getenv ("TEST_TIME_LIMIT");
  if (limit && atoi (limit) > 0) seconds = (unsigned) atoi (limit);
  alarm (seconds);
}

#endif
