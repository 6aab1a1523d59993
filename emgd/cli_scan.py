"""``emgd scan``: list the bands in range over Bluetooth LE.

Output (stdout): one line per band, strongest first — name, address, RSSI, serial number
and the device URL that opens it — or, with ``--json``, one JSON array of objects
``{"name", "address", "rssi", "serial", "url"}``. The serial number is the one the band
advertises; emgd identifies a connected band by the serial number it reads from the
band's Device Information service.

Exit status: 0 when at least one band was found, 1 when none was (``--json`` still prints
``[]``) or Bluetooth is unavailable, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import json
import sys

from emgd.errors import ConfigError

EPILOG = """\
Bluetooth must be usable by your user: bluetoothd running, the adapter powered
('bluetoothctl power on'), not blocked ('rfkill unblock bluetooth'), and on Debian/Ubuntu
your user in the 'bluetooth' group.

examples:
  emgd scan                          scan 5 s on the default adapter
  emgd scan --timeout 10 --json      machine-readable
  emgd scan --adapter hci1           scan with another adapter
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "scan", help="list bands in range over Bluetooth LE",
        description="Scan for emgd bands over Bluetooth LE and list name, address, RSSI "
                    "and serial number.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--timeout", "-t", type=float, default=5.0, metavar="S",
                   help="seconds to scan (default 5)")
    p.add_argument("--json", action="store_true", help="print one JSON array")
    p.add_argument("--adapter", metavar="hciN", default=None,
                   help="Bluetooth adapter to scan with (default: the system's)")
    p.set_defaults(func=cmd_scan)


def cmd_scan(args: argparse.Namespace) -> int:
    from emgd.drivers.ble import find_bands

    if not args.timeout > 0:
        raise ConfigError(f"--timeout must be a positive number of seconds, got {args.timeout}")
    bands = find_bands(args.timeout, args.adapter)
    if args.json:
        print(json.dumps([{"name": b.name, "address": b.address, "rssi": b.rssi,
                           "serial": b.serial, "url": b.url} for b in bands]), flush=True)
    elif bands:
        print(f"{'NAME':<24} {'ADDRESS':<17} {'RSSI':>5}  {'SERIAL':<12} URL")
        for b in bands:
            rssi = "-" if b.rssi is None else str(b.rssi)
            print(f"{b.name:<24} {b.address:<17} {rssi:>5}  {b.serial or '-':<12} {b.url}")
    if not bands:
        where = f" on {args.adapter}" if args.adapter else ""
        print(f"emgd scan: no band found within {args.timeout:g} s{where}. Is the band on "
              "and charged? No band at hand: 'python -m emgd.drivers.blesim --start-bus' "
              "runs a simulated one.", file=sys.stderr)
        return 1
    return 0
