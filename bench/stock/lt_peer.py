#!/usr/bin/python3
"""One libtorrent-rasterbar peer for `cargo xtask bench stock`: a seeder or a leecher.

It joins the torrent through its tracker only (DHT, LSD, UPnP, NAT-PMP and the default
plugins, PEX among them, are off), over TCP or uTP alone. When the download is complete and
checked it writes the wall-clock time (seconds since the epoch) to --done, then keeps seeding
until it is killed.
"""

import argparse
import os
import signal
import sys
import time

import libtorrent as lt


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--torrent", required=True)
    ap.add_argument("--save", required=True, help="directory holding (or receiving) the file")
    ap.add_argument("--listen", required=True, help="address to listen on")
    ap.add_argument("--transport", choices=["tcp", "utp"], required=True)
    ap.add_argument("--seed", action="store_true", help="the file is complete already")
    ap.add_argument("--done", help="file to write the completion time to")
    a = ap.parse_args()

    tcp = a.transport == "tcp"
    settings = {
        "listen_interfaces": f"{a.listen}:6881",
        "enable_dht": False,
        "enable_lsd": False,
        "enable_upnp": False,
        "enable_natpmp": False,
        "enable_outgoing_tcp": tcp,
        "enable_incoming_tcp": tcp,
        "enable_outgoing_utp": not tcp,
        "enable_incoming_utp": not tcp,
        "alert_mask": 0,
    }
    # flags=0: no default plugins (ut_pex, ut_metadata, smart_ban).
    ses = lt.session(settings, 0)
    params = lt.add_torrent_params()
    params.ti = lt.torrent_info(a.torrent)
    params.save_path = a.save
    if a.seed:
        params.flags |= lt.torrent_flags.seed_mode
    h = ses.add_torrent(params)

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    done = False
    while True:
        st = h.status()
        if not done and st.is_seeding:
            done = True
            if a.done:
                with open(a.done + ".tmp", "w") as f:
                    f.write(f"{time.time():.6f}\n")
                # Atomic: the bench never reads a half-written time.
                os.rename(a.done + ".tmp", a.done)
        if st.errc.value() != 0:
            print(f"lt_peer: {st.errc.message()}", file=sys.stderr)
            sys.exit(1)
        time.sleep(0.02)


if __name__ == "__main__":
    main()
