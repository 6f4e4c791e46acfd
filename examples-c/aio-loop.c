/* Drives libnbd from its own poll(2) loop with 64 commands in flight:
 * writes a pattern over the first 4 MiB, then reads it back and checks it.
 *
 * Usage: aio-loop SOCKET
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <stdint.h>
#include <poll.h>
#include <libnbd.h>

#define BLOCK 4096
#define BLOCKS 1024
#define IN_FLIGHT 64

static char buf[BLOCKS][BLOCK];

static void
die (const char *what)
{
  fprintf (stderr, "%s: %s\n", what, nbd_get_error ());
  exit (EXIT_FAILURE);
}

/* Runs one round of the event loop. */
static void
wait_once (struct nbd_handle *nbd)
{
  struct pollfd fds = { .fd = nbd_aio_get_fd (nbd), .events = 0 };
  unsigned dir = nbd_aio_get_direction (nbd);

  if (dir & LIBNBD_AIO_DIRECTION_READ) fds.events |= POLLIN;
  if (dir & LIBNBD_AIO_DIRECTION_WRITE) fds.events |= POLLOUT;
  if (poll (&fds, 1, -1) == -1) { perror ("poll"); exit (EXIT_FAILURE); }
  if ((fds.revents & (POLLIN | POLLHUP)) && nbd_aio_notify_read (nbd) == -1)
    die ("nbd_aio_notify_read");
  if ((fds.revents & POLLOUT) && nbd_aio_notify_write (nbd) == -1)
    die ("nbd_aio_notify_write");
}

/* Issues all blocks, at most IN_FLIGHT at a time. */
static void
run (struct nbd_handle *nbd, int writing)
{
  int64_t cookies[BLOCKS];
  size_t next = 0, done = 0, i;
  int peak = 0;

  while (done < BLOCKS) {
    while (next < BLOCKS && nbd_aio_in_flight (nbd) < IN_FLIGHT) {
      if (writing)
        cookies[next] = nbd_aio_pwrite (nbd, buf[next], BLOCK, next * BLOCK,
                                        NBD_NULL_COMPLETION, 0);
      else
        cookies[next] = nbd_aio_pread (nbd, buf[next], BLOCK, next * BLOCK,
                                       NBD_NULL_COMPLETION, 0);
      if (cookies[next] == -1) die ("submit");
      next++;
    }
    if (nbd_aio_in_flight (nbd) > peak) peak = nbd_aio_in_flight (nbd);
    wait_once (nbd);
    for (i = done; i < next; i++) {
      int r = nbd_aio_command_completed (nbd, cookies[i]);
      if (r == -1) die ("command");
      if (r == 0) break;
      done++;
    }
  }
  printf ("%s: %d blocks, peak in flight %d\n",
          writing ? "write" : "read", BLOCKS, peak);
}

int
main (int argc, char *argv[])
{
  struct nbd_handle *nbd;
  size_t i, j;

  if (argc != 2) { fprintf (stderr, "usage: %s SOCKET\n", argv[0]); return 1; }
  nbd = nbd_create ();
  if (nbd == NULL) die ("nbd_create");
  if (nbd_aio_connect_unix (nbd, argv[1]) == -1) die ("nbd_aio_connect_unix");
  while (nbd_aio_is_connecting (nbd))
    wait_once (nbd);
  if (!nbd_aio_is_ready (nbd)) die ("handshake");

  for (i = 0; i < BLOCKS; i++)
    for (j = 0; j < BLOCK; j++)
      buf[i][j] = (char) (i * 31 + j);
  run (nbd, 1);
  memset (buf, 0, sizeof buf);
  run (nbd, 0);
  for (i = 0; i < BLOCKS; i++)
    for (j = 0; j < BLOCK; j++)
      if (buf[i][j] != (char) (i * 31 + j)) {
        fprintf (stderr, "block %zu differs at %zu\n", i, j);
        return EXIT_FAILURE;
      }
  printf ("verified %d bytes\n", BLOCKS * BLOCK);
  if (nbd_shutdown (nbd, 0) == -1) die ("nbd_shutdown");
  nbd_close (nbd);
  return EXIT_SUCCESS;
}
