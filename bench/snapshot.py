"""Snapshot streaming: 1,000,000 records of about 200 bytes to one client, beside a
plain loopback socket moving the same bytes, in the same run.

The server is filled over TCP, then each round runs, one after the other:

* statecast: a reader process connects, sends ``sync`` and reads until
  ``snapshot_end``;
* the peer: a plain blocking socket in its own process (``sendall``, no event loop, no
  Python per record) writes the same number of bytes, in chunks of the size the server
  writes (``STREAM_BURST``: one client syncing alone), to the same reader program,
  which sends one line to start it and reads until it has them all.

The reader is one small program for both (``recv_into`` a 1 MiB buffer), in its own
process, so that it competes with neither sender for the interpreter; it reports the
CPU it used, to show that it is not the bottleneck. The server's CPU and its resident
memory growth (sampled every 5 ms) are measured during the sync. Each round prints
both rates and their ratio; the summary gives the range over the rounds.

    python bench/snapshot.py [--records 1000000] [--value-size 200] [--rounds 3]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import subprocess
import sys
import time

from common import (
    RssSampler,
    StatecastProcess,
    cpu_seconds,
    free_port,
    machine,
    print_result,
    rss_bytes,
)
from load import publish_all, publish_lines
from statecast.transports import output

# The size of the server's writes to a client syncing alone (STREAM_STEP before the
# burst step existed, so that this benchmark can run against older commits too).
CHUNK = getattr(output, "STREAM_BURST", output.STREAM_STEP)

# The reader, for both senders: argv port, mode ("sync": read the hello, send
# ``sync``, read to snapshot_end; "plain": send a line, read ``total`` bytes). Prints
# "bytes seconds cpu_seconds": seconds from the request to the last byte.
READER = r"""
import resource, socket, sys, time
port, mode, total = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
END = b'"type":"snapshot_end"'
s = socket.create_connection(("127.0.0.1", port))
if mode == "sync":
    s.recv(4096)  # hello
buf = bytearray(1 << 20)
view = memoryview(buf)
got = 0
r0 = resource.getrusage(resource.RUSAGE_SELF)
t0 = time.perf_counter()
s.sendall(b"sync\n")
while True:
    n = s.recv_into(view)
    if n == 0:
        break
    got += n
    if mode == "sync" and END in view[max(0, n - 200) : n].tobytes():
        break
    if mode == "plain" and got >= total:
        break
elapsed = time.perf_counter() - t0
r1 = resource.getrusage(resource.RUSAGE_SELF)
cpu = r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime
print(got, elapsed, cpu)
"""

# The peer: argv port, total bytes, chunk size. Record-like lines, cut into chunks of
# the server's write size; waits for the reader's line, then sendall()s them.
SENDER = r"""
import socket, sys
port, total, step = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
line = b'{"type":"record","seq":1,"collection":"orders","key":"O-1","value":{}}\n'
chunk = (line * (step // len(line) + 1))[:step]
lsock = socket.socket()
lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
lsock.bind(("127.0.0.1", port))
lsock.listen(1)
print("ready", flush=True)
conn, _ = lsock.accept()
conn.recv(100)
sent = 0
while sent < total:
    n = min(step, total - sent)
    conn.sendall(chunk if n == step else chunk[:n])
    sent += n
conn.close()
"""


def read(port: int, mode: str, total: int = 0) -> tuple[int, float, float]:
    """Run the reader; (bytes, seconds, reader CPU seconds)."""
    out = subprocess.run(
        [sys.executable, "-c", READER, str(port), mode, str(total)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return int(out[0]), float(out[1]), float(out[2])


def plain_round(total: int) -> tuple[float, float, float]:
    """The peer moving ``total`` bytes: (bytes/s, reader CPU share, sender CPU share)."""
    port = free_port()
    sender = subprocess.Popen(
        [sys.executable, "-c", SENDER, str(port), str(total), str(CHUNK)],
        stdout=subprocess.PIPE,
    )
    assert sender.stdout is not None
    sender.stdout.readline()  # listening
    c0 = cpu_seconds(sender.pid)
    got, seconds, reader_cpu = read(port, "plain", total)
    sender_cpu = cpu_seconds(sender.pid) - c0
    sender.wait()
    assert got == total, (got, total)
    return got / seconds, reader_cpu / seconds, sender_cpu / seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--value-size", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3, help="syncs, each beside a plain run")
    args = ap.parse_args()
    print(f"machine: {machine()}")
    srv = StatecastProcess("--retain", "1000")
    ratios: list[float] = []
    rates: list[float] = []
    plains: list[float] = []
    growth = 0
    try:
        t_load = publish_all(srv.port, publish_lines(args.records, 1000, args.value_size))
        gc.collect()
        time.sleep(1.0)
        before = rss_bytes(srv.pid)
        for r in range(args.rounds):
            c0 = cpu_seconds(srv.pid)
            with RssSampler(srv.pid) as rss:
                got, seconds, reader_cpu = read(srv.port, "sync")
            server_cpu = cpu_seconds(srv.pid) - c0
            growth = max(growth, rss.peak - before)
            plain, plain_reader, plain_sender = plain_round(got)
            rate = got / seconds
            rates.append(rate)
            plains.append(plain)
            ratios.append(rate / plain)
            # CPU seconds too: on a loaded machine a process may wait for a core, and
            # the CPU it used tells what it would cost on an idle one.
            print(
                f"round {r + 1}: statecast {rate / 1e6:,.0f} MB/s (server CPU "
                f"{server_cpu:.2f} s = {server_cpu / seconds:.0%}, reader CPU "
                f"{reader_cpu / seconds:.0%}), plain socket {plain / 1e6:,.0f} MB/s "
                f"(sender CPU {plain_sender * got / plain:.2f} s = {plain_sender:.0%}, "
                f"reader CPU {plain_reader:.0%}): ratio {rate / plain:.2f}",
                flush=True,
            )
    finally:
        srv.stop()
    print_result(
        "snapshot sync over TCP",
        {
            "records": args.records,
            "load seconds (publish over TCP)": t_load,
            "snapshot bytes": got,
            "bytes per record line": got / args.records,
            "server write (and peer chunk), bytes": CHUNK,
            "rounds": args.rounds,
            "seconds (median)": got / statistics.median(rates),
            "MB/s (median)": statistics.median(rates) / 1e6,
            "records/s (median)": args.records * statistics.median(rates) / got,
            "server RSS before sync, MB": before / 1e6,
            "server RSS growth during sync, MB": growth / 1e6,
            "plain loopback socket, MB/s (median)": statistics.median(plains) / 1e6,
            "ratio to plain loopback (median)": statistics.median(ratios),
            "ratio, range over rounds": f"{min(ratios):.2f} to {max(ratios):.2f}",
        },
    )


if __name__ == "__main__":
    main()
