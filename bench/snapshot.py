"""Snapshot streaming: 1,000,000 records of about 200 bytes to one client.

Reports the transfer rate, the server's resident memory growth during the sync, and
the rate of a plain loopback socket moving the same bytes in the same run.

    python bench/snapshot.py [--records 1000000] [--value-size 200]
"""

from __future__ import annotations

import argparse
import gc
import socket
import subprocess
import sys
import time

from common import RssSampler, StatecastProcess, free_port, machine, print_result, rss_bytes
from load import publish_all, publish_lines

END = b'"type":"snapshot_end"'


def receive(sock: socket.socket, until_end: bool, total: int = 0) -> tuple[int, float]:
    """Read as fast as possible; returns (bytes, seconds from the first byte asked)."""
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    got = 0
    t0 = time.perf_counter()
    while True:
        n = sock.recv_into(view)
        if n == 0:
            break
        got += n
        if until_end and END in view[max(0, n - 200) : n].tobytes():
            break
        if not until_end and got >= total:
            break
    return got, time.perf_counter() - t0


SENDER = r"""
import socket, sys
port, total = int(sys.argv[1]), int(sys.argv[2])
chunk = (b'{"type":"record","seq":1,"collection":"orders","key":"O-1","value":{}}\n' * 4000)
s = socket.create_connection(("127.0.0.1", port))
sent = 0
while sent < total:
    n = min(len(chunk), total - sent)
    s.sendall(chunk[:n])
    sent += n
s.close()
"""


def plain_loopback(total: int) -> float:
    port = free_port()
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", port))
    lsock.listen(1)
    sender = subprocess.Popen([sys.executable, "-c", SENDER, str(port), str(total)])
    conn, _ = lsock.accept()
    got, elapsed = receive(conn, until_end=False, total=total)
    conn.close()
    lsock.close()
    sender.wait()
    return got / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--value-size", type=int, default=200)
    args = ap.parse_args()
    print(f"machine: {machine()}")
    srv = StatecastProcess("--retain", "1000")
    try:
        t_load = publish_all(srv.port, publish_lines(args.records, 1000, args.value_size))
        gc.collect()
        time.sleep(1.0)
        before = rss_bytes(srv.pid)
        s = socket.create_connection(("127.0.0.1", srv.port))
        s.recv(4096)  # hello
        with RssSampler(srv.pid) as rss:
            s.sendall(b"sync\n")
            got, elapsed = receive(s, until_end=True)
        s.close()
    finally:
        srv.stop()
    plain = plain_loopback(got)
    rate = got / elapsed
    print_result(
        "snapshot sync over TCP",
        {
            "records": args.records,
            "load seconds (publish over TCP)": t_load,
            "snapshot bytes": got,
            "bytes per record line": got / args.records,
            "seconds": elapsed,
            "MB/s": rate / 1e6,
            "records/s": args.records / elapsed,
            "server RSS before sync, MB": before / 1e6,
            "server RSS growth during sync, MB": (rss.peak - before) / 1e6,
            "plain loopback socket, MB/s": plain / 1e6,
            "ratio to plain loopback": rate / plain,
        },
    )


if __name__ == "__main__":
    main()
