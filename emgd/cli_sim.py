"""``emgd sim --pty``: the simulated band on a pseudo-terminal (a virtual serial band).

Output contract (stdout; logs go to stderr):

- line 1: the path to open (the ``--link`` if given, else the pty, e.g. ``/dev/pts/3``);
- line 2: ``emgd --device serial:PATH``, the command that reads it;
- at exit (Ctrl-C, SIGTERM): one JSON line, :meth:`emgd.drivers.ptyband.PtyBand.summary`
  (``{"event": "stopped", "injected": {...}, "bytes_unread": ..., ...}``).

Exit status: 0 after a signal, 2 on a usage error, 1 when the pty cannot be made.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading

from emgd.errors import ConfigError

log = logging.getLogger(__name__)

EPILOG = """\
The band starts streaming when a reader opens the port, and keeps running when the
reader goes away (its bytes are then dropped, as on an unplugged link).
It announces itself for `emgd --device auto` (see emgd/drivers/discovery.py) while it runs.

examples:
  emgd sim --pty --link /tmp/emg-band          then: emgd --device serial:/tmp/emg-band
  emgd sim --pty --counter --drop 0.01 --corrupt 0.01 --seed 7
  emgd sim --pty --pause 0.5 --pause-every 5 --drift-ppm 50
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sim", help="run the simulated band on a pseudo-terminal (virtual serial band)",
        description="Run the simulated band on a pseudo-terminal and print its path, so "
                    "that `emgd --device serial:PATH` reads it exactly as it reads hardware.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pty", action="store_true", help="serve the band on a pseudo-terminal")
    p.add_argument("--link", metavar="PATH", help="also make PATH a symlink to the pty")
    p.add_argument("--seed", type=int, default=0, help="seed of signal and faults (default 0)")
    p.add_argument("--counter", action="store_true",
                   help="channel 15 carries the sample index (for loss checks)")
    p.add_argument("--format", choices=("int16", "int24"), default="int24",
                   help="sample format on the wire (default int24)")
    p.add_argument("--frame", type=int, default=10, help="samples per EMG frame (default 10)")
    p.add_argument("--serial", metavar="SN", default="SIM-0000",
                   help="serial number the band reports (default SIM-0000)")
    p.add_argument("--bursts", type=float, default=1.0,
                   help="mean muscle bursts per second; 0 = noise floor only")
    p.add_argument("--drop", type=float, default=0.0, metavar="P",
                   help="probability that a frame is dropped")
    p.add_argument("--corrupt", type=float, default=0.0, metavar="P",
                   help="probability that a frame gets one byte flipped")
    p.add_argument("--pause", type=float, default=0.0, metavar="S",
                   help="seconds the link stalls (bytes held, then burst)")
    p.add_argument("--pause-every", type=float, default=0.0, metavar="S",
                   help="seconds between link stalls; 0 = never")
    p.add_argument("--drift-ppm", type=float, default=0.0, metavar="PPM",
                   help="band clock error in ppm (+ = band runs fast)")
    p.add_argument("--no-announce", action="store_true",
                   help="do not announce the band to `emgd --device auto`")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"),
                   default="info", help="log level on stderr (default info)")
    p.set_defaults(func=cmd_sim)


def sim_config(args: argparse.Namespace):  # -> SimConfig
    """The band's configuration, validated by the ``sim`` URL schema (one set of rules)."""
    from emgd.drivers.sim import SimConfig
    from emgd.drivers.urls import SCHEMES, DeviceUrl

    options = {o.name: o.default for o in SCHEMES["sim"].options}
    given = {"seed": args.seed, "counter": args.counter, "format": args.format,
             "frame": args.frame, "serial": args.serial, "bursts": args.bursts,
             "drop": args.drop, "corrupt": args.corrupt, "pause": args.pause,
             "pause_every": args.pause_every, "drift_ppm": args.drift_ppm}
    for name, value in given.items():
        try:
            SCHEMES["sim"].option(name).parse(str(value))  # type: ignore[union-attr]
        except ValueError as exc:
            flag = "--" + name.replace("_", "-")
            raise ConfigError(f"emgd sim: bad value {value!r} for {flag}: {exc}") from None
        options[name] = value
    options["paced"] = True
    return SimConfig.from_options(DeviceUrl("sim", None, options).options)


def cmd_sim(args: argparse.Namespace) -> int:
    from emgd.cli import _configure_logging
    from emgd.drivers.ptyband import PtyBand

    if not args.pty:
        raise ConfigError("emgd sim needs --pty (the virtual serial band); for the simulated "
                          "band inside the daemon, run: emgd --device sim")
    _configure_logging(args.log_level)
    config = sim_config(args)
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    band = PtyBand(config, args.link, announce=not args.no_announce)
    try:
        path = band.open()
        _say(path, f"emgd --device serial:{path}")
        log.info("virtual band %s on %s%s; waiting for a reader (Ctrl-C stops)",
                 config.serial, band.path, f" (link {args.link})" if args.link else "")
        band.run(stop)
    finally:
        band.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    _say(json.dumps(band.summary()))
    return 0


def _say(*lines: str) -> None:
    """Print to stdout; a reader that went away (``| head -1``) is not an error."""
    try:
        for line in lines:
            print(line, flush=True)
    except BrokenPipeError:  # send the rest (and Python's flush at exit) to /dev/null
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


__all__ = ["cmd_sim", "register", "sim_config"]
