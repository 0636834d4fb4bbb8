#!/usr/bin/env python3
"""Idle-load benchmark: hold N idle connections to Portcullis while one
normal client sends M messages; report that client's per-message latency
beside the same client with no idle load, and Portcullis's RSS per idle
session. Run by benches/idle.sh (which starts smtp-sink and Portcullis)."""
import smtplib, socket, statistics, sys, time

def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")

def latencies(port, m):
    s = smtplib.SMTP("127.0.0.1", port, timeout=30)
    s.ehlo("bench.test")
    out = []
    body = ("From: a@example.test\r\nTo: b@example.test\r\nSubject: idle bench\r\n\r\n" + ("x" * 76 + "\r\n") * 26)
    for i in range(m):
        t0 = time.perf_counter()
        s.sendmail("a@example.test", ["b@example.test"], body)
        out.append((time.perf_counter() - t0) * 1000)
    s.quit()
    return out

def summary(xs):
    xs = sorted(xs)
    return f"median {statistics.median(xs):.3f} ms, p90 {xs[int(len(xs)*0.9)]:.3f} ms, max {xs[-1]:.3f} ms"

def main():
    port, pid, n, m = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    latencies(port, 20)  # warm up
    base = latencies(port, m)
    time.sleep(0.5)
    rss0 = rss_kib(pid)
    socks = []
    deadline = time.time() + 120
    for i in range(n):
        if time.time() > deadline:
            raise SystemExit("opening idle connections took too long")
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        socks.append(s)
    # Every session has greeted (its buffers exist) before we measure.
    for s in socks:
        if not s.recv(512).startswith(b"220"):
            raise SystemExit("idle connection not greeted")
    time.sleep(1.0)
    rss1 = rss_kib(pid)
    loaded = latencies(port, m)
    for s in socks:
        s.close()
    time.sleep(1.0)
    after = latencies(port, m)  # unloaded again: order effects show up here
    print(f"no idle load (before): {summary(base)}")
    print(f"{n} idle conns       : {summary(loaded)}")
    print(f"no idle load (after) : {summary(after)}")
    unloaded = statistics.median(base + after)
    print(f"median ratio loaded/unloaded: {statistics.median(loaded)/unloaded:.2f}")
    print(f"RSS {rss0} KiB -> {rss1} KiB: {(rss1 - rss0) / n:.2f} KiB per idle session")

main()
