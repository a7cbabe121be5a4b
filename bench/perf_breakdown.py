#!/usr/bin/env python3
"""Where each system's CPU goes, by category, from one `perf record -a` of a bench run.

    perf record -a -g -F 499 -o /tmp/all.data -- \
        ./target/release/xtask bench stock --scenario jumbo --systems starling,aria2 --pieces 1 --runs 1
    python3 bench/perf_breakdown.py /tmp/all.data starling=16.7 aria2=11.1

The numbers after the file are each system's CPU-s from that run's output; the samples of a
system's processes (matched by command name) are split into categories by symbol and scaled
to them. Without them the table is in percent of the system's samples. Kernel work done in a
process's context (softirqs, page faults) counts for that process, as in the bench's figures.
"""

import collections
import re
import subprocess
import sys

# Command-name prefixes of each system's processes and threads.
SYSTEMS = {
    "starling": ("starling", "iou-wrk"),
    "aria2": ("aria2c",),
    "libtorrent": ("python3",),
    "rqbit": ("rqbit",),
    "http": ("curl", "nginx"),
}

# First match wins.
CATEGORIES = [
    ("page-cache write copy", r"copy_folio_from_iter|copy_page_from_iter"),
    ("hashing (SHA-256, SHA-1)", r"sha256|sha1|sha_ni"),
    ("encryption (AES-GCM, header protection)", r"aes|gcm|ghash|chacha|poly1305|HeaderProtection"),
    ("QUIC (quinn)", r"quinn"),
    ("async runtime (tokio)", r"tokio"),
    ("allocator", r"malloc|_int_free|^free$|cfree|unlink_chunk|realloc|malloc_consolidate"),
    ("copies to user space", r"_copy_to_iter|copy_user|copy_page_to_iter"),
    ("copies from user space (sends)", r"_copy_from_iter"),
    ("memcpy / memmove in user space", r"memmove|memcpy|memset"),
    ("network stack and shapers (softirq, UDP/TCP, IP, bridge, tbf)",
     r"handle_softirqs|net_rx|napi|tbf|qdisc|veth|br_|ip_|udp|tcp|skb|netif|dev_|nf_|fib|inet|sock"),
    ("context switches", r"finish_task_switch|schedule|__switch_to|pick_next|try_to_wake"),
    ("interrupts re-enabled (time of pending IRQs)", r"_raw_spin_unlock_irq"),
    ("file system and page cache, other", r"ext4|filemap|folio|page_cache|jbd2|blk|bio|lru"),
    ("syscall entry, epoll, io_uring", r"syscall|entry_|fdget|fput|epoll|io_uring|io_"),
    ("eBPF programs", r"bpf"),
]


def system_of(comm):
    for name, prefixes in SYSTEMS.items():
        if comm.startswith(prefixes):
            return name
    return None


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    data = sys.argv[1]
    totals = {}
    for arg in sys.argv[2:]:
        name, _, secs = arg.partition("=")
        try:
            totals[name] = float(secs)
        except ValueError:
            totals[name] = None
        if name not in SYSTEMS or totals[name] is None:
            sys.exit(f"{arg!r}: expected SYSTEM=CPU_SECONDS with SYSTEM one of {', '.join(SYSTEMS)}")
    try:
        report = subprocess.run(
            ["perf", "report", "-i", data, "--sort", "comm,sym", "--no-children", "--stdio",
             "-g", "none", "--percent-limit", "0"],
            capture_output=True, text=True,
        )
    except FileNotFoundError:
        sys.exit("perf is not installed: apt-get install linux-perf")
    if report.returncode != 0:
        sys.exit(f"perf report -i {data} failed: {report.stderr.strip()}")
    out = report.stdout
    per = collections.defaultdict(collections.Counter)
    for line in out.splitlines():
        m = re.match(r"\s*([\d.]+)%\s+(\S+)\s+\[.\]\s+(.*)", line)
        if not m:
            continue
        pct, comm, sym = float(m.group(1)), m.group(2), m.group(3).strip()
        system = system_of(comm)
        if system is None:
            continue
        cat = next((c for c, rx in CATEGORIES if re.search(rx, sym, re.I)), "other")
        per[system][cat] += pct
    samples = {s: sum(c.values()) for s, c in per.items()}
    # The systems named on the command line, else every one with samples.
    systems = list(totals) or [s for s in SYSTEMS if samples.get(s, 0) > 0]
    missing = [s for s in systems if samples.get(s, 0) <= 0]
    if missing or not systems:
        sys.exit(f"{data}: no samples of {', '.join(missing) or 'any known system'}")
    unit = "CPU-s" if totals else "% of samples"
    width = max(len(c) for c, _ in CATEGORIES)
    print(f"{'category':<{width}}  " + "  ".join(f"{s:>10}" for s in systems) + f"   ({unit})")
    for cat in [c for c, _ in CATEGORIES] + ["other"]:
        cells = []
        for s in systems:
            share = per[s][cat] / samples[s]
            cells.append(share * totals[s] if unit == "CPU-s" else 100 * share)
        print(f"{cat:<{width}}  " + "  ".join(f"{v:>10.2f}" for v in cells))
    if unit == "CPU-s":
        print(f"{'total':<{width}}  " + "  ".join(f"{totals[s]:>10.2f}" for s in systems))


if __name__ == "__main__":
    main()
