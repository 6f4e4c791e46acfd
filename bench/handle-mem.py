#!/usr/bin/python3
"""Memory per connected handle, through python3-libnbd.

Usage: bench/handle-mem.py URI [HANDLES]

Opens HANDLES (200) handles on URI, one after the other, and prints the
process's resident memory growth per handle, in KiB, at two points:
once every handle is connected, and once each has also done one 4 KiB
pread (and is idle again). One handle is opened, used and closed first,
so that what the library or Python set up once is not counted. The
library is whichever libnbd.so.0 the dynamic linker finds
(LD_LIBRARY_PATH).
"""

import sys

import nbd


def rss_kib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise SystemExit("handle-mem: no VmRSS")


def main():
    uri = sys.argv[1]
    count = int(sys.argv[2]) if len(sys.argv) > 2 else 200
    warm = nbd.NBD()
    warm.connect_uri(uri)
    warm.pread(4096, 0)
    warm.shutdown()
    del warm
    handles = []
    base = rss_kib()
    for _ in range(count):
        h = nbd.NBD()
        h.connect_uri(uri)
        handles.append(h)
    connected = rss_kib()
    for i, h in enumerate(handles):
        h.pread(4096, (i * 4096) % (1 << 20))
    used = rss_kib()
    print(f"connected {(connected - base) / count:.2f} pread {(used - base) / count:.2f}")
    for h in handles:
        h.shutdown()


if __name__ == "__main__":
    main()
