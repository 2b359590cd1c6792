#!/usr/bin/env python3
"""Request/response latency and idle-connection load for tests/bench/relay.sh.

  rtt.py latency HOST PORT N       N round trips of 64 bytes on one connection;
                                   prints p50 and p99 in microseconds
  rtt.py hold HOST PORT N SECONDS  opens N connections, checks each with one echo,
                                   holds them SECONDS, prints how many opened
                                   (from 127.0.0.10-127.0.0.59 in turn: a publish
                                   takes at most 64 from one address)
"""
import socket
import sys
import time


def latency(host, port, n):
    s = socket.create_connection((host, port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    msg = b"x" * 64
    samples = []
    for i in range(n + 100):
        t0 = time.perf_counter_ns()
        s.sendall(msg)
        got = 0
        while got < len(msg):
            d = s.recv(4096)
            if not d:
                raise SystemExit("connection closed")
            got += len(d)
        if i >= 100:  # warm-up
            samples.append((time.perf_counter_ns() - t0) / 1000)
    samples.sort()
    p50 = samples[len(samples) // 2]
    p99 = samples[int(len(samples) * 0.99)]
    print(f"{p50:.0f} {p99:.0f}")


def hold(host, port, n, seconds):
    conns = []
    for i in range(n):
        s = socket.create_connection((host, port), source_address=("127.0.0.%d" % (10 + i % 50), 0))
        s.sendall(b"ping")
        if s.recv(4) != b"ping":
            raise SystemExit("bad echo")
        conns.append(s)
    print(len(conns), flush=True)
    time.sleep(seconds)


if __name__ == "__main__":
    cmd, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if cmd == "latency":
        latency(host, port, int(sys.argv[4]))
    else:
        hold(host, port, int(sys.argv[4]), float(sys.argv[5]))
