"""The ``emgd`` command line. Only this module configures logging.

``emgd`` with no subcommand (or ``emgd run``) starts the daemon. Exit codes: 0 on a clean
stop, 1 on a runtime failure (device lost at start, endpoint in use, ...), 2 on a usage
or configuration error.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from typing import Any

from emgd import __version__
from emgd.errors import ConfigError, EmgdError

SUBCOMMANDS = ("run", "listen", "sim", "scan", "ctl", "models")

#: Modules that add a subcommand: each has ``register(subparsers)``, which adds a parser
#: whose ``func`` default runs the command. A module that is missing is skipped.
EXTENSIONS = ("emgd.cli_sim", "emgd.cli_scan", "emgd.cli_ctl", "emgd.cli_models")

EPILOG_RUN = """\
device URLs (an unknown option prints that scheme's full list):
  auto[?timeout=S]           look for a band (udev link, USB IDs, virtual bands, BLE);
                             none found → the simulated band, said in every event
  sim[?seed=N&counter=1&paced=0&drop=P&corrupt=P&drift_ppm=X]
                             the simulated band (no hardware needed)
  serial:PATH[?baud=N&reconnect=1]
                             a band on a serial port, e.g. serial:/dev/emg-band
  ble[:NAME-OR-ADDRESS-OR-SERIAL][?adapter=hci0&timeout=S]
                             a band over Bluetooth LE ('emgd scan' lists them)
  replay:FILE[?speed=1&start=T&end=T&loop=1]
                             replay a recording (speed=0: as fast as possible)

settings precedence: defaults < --config FILE < EMGD_* environment < flags
(every key: docs/configuration.md, or systemd/emgd.toml)

examples:
  emgd --device sim                  run on the simulated band
  emgd listen status                 (another terminal) watch the status topic
  emgd ctl status                    (another terminal) ask the running daemon
  emgd --device sim --models DIR --outputs --record session.h5
"""


def _run_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="start the daemon (the default command)",
                       description="Start the emgd daemon: read a band, publish events "
                                   "over ZeroMQ.",
                       epilog=EPILOG_RUN, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", "-d", help="device URL (default: auto)")
    p.add_argument("--pub", help="event PUB endpoint (default: tcp://127.0.0.1:7400)")
    p.add_argument("--ctl", help="control REP endpoint (default: tcp://127.0.0.1:7401)")
    p.add_argument("--raw", action="store_true", default=None,
                   help="also publish raw EMG blocks on raw/<device>")
    p.add_argument("--models", metavar="DIR",
                   help="folder of model cards, one per task ('none': no decoders)")
    p.add_argument("--outputs", action="store_true", default=None,
                   help="also publish each decoder's per-frame output on outputs/<device>")
    p.add_argument("--decoder-backend", choices=("native-int16", "native-float32", "onnx"),
                   help="what runs the decoders: emgd's Numba kernels with int16 (default) "
                        "or float32 LSTM weights, or ONNX Runtime")
    p.add_argument("--record", metavar="FILE",
                   help="record EMG, markers and events to an HDF5 file (docs/recording.md)")
    p.add_argument("--config", "-c", metavar="FILE",
                   help="TOML config file (default: $EMGD_CONFIG if set)")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"),
                   help="log normally at this level instead of showing the status line")
    p.set_defaults(func=cmd_run)


def _listen_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("listen", help="print events live",
                       description="Subscribe to the daemon's events and print them.",
                       epilog="examples:\n  emgd listen                 every topic\n"
                              "  emgd listen gesture status  topic prefixes\n"
                              "  emgd listen raw --json --count 5",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("topics", nargs="*", metavar="TOPIC",
                   help="topic prefixes to subscribe to (default: all)")
    p.add_argument("--pub", default=None, help="event endpoint (default: tcp://127.0.0.1:7400)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--count", "-n", type=int, help="exit after N events")
    p.add_argument("--timeout", "-t", type=float, help="exit after S seconds")
    p.set_defaults(func=cmd_listen)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="emgd",
        description="emgd turns a 16-channel 2 kHz surface-EMG wristband into computer "
                    "input: gesture, handwriting and wrist events over ZeroMQ.",
        epilog="Run 'emgd COMMAND --help' for a command's options. "
               "'emgd' alone is 'emgd run'.")
    parser.add_argument("--version", action="version", version=f"emgd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _run_parser(sub)
    _listen_parser(sub)
    for name in EXTENSIONS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        module.register(sub)
    return parser


# --------------------------------------------------------------------------- commands


def cmd_run(args: argparse.Namespace) -> int:
    from emgd.config import load_settings
    from emgd.daemon import Daemon

    overrides: dict[str, Any] = {}
    for key in ("device", "pub", "ctl", "raw", "log_level", "record", "models", "outputs",
                "decoder_backend"):
        value = getattr(args, key, None)
        if value is not None:
            overrides[key] = value
    config = args.config or os.environ.get("EMGD_CONFIG")
    settings = load_settings(config, overrides=overrides)
    interactive = sys.stderr.isatty() and args.log_level is None and not _under_systemd()
    _configure_logging(settings.log_level if not interactive else "warning")
    return Daemon(settings).run(status_line=interactive)


def cmd_listen(args: argparse.Namespace) -> int:
    from emgd.client import DEFAULT_PUB, Subscriber

    _configure_logging("warning")
    endpoint = args.pub or os.environ.get("EMGD_PUB") or DEFAULT_PUB
    if args.count is not None and args.count < 1:
        raise ConfigError("--count must be at least 1")
    got = 0
    with Subscriber(endpoint, args.topics) as sub:
        try:
            for event in sub.events(timeout=args.timeout, count=args.count):
                got += 1
                if args.json:
                    print(json.dumps(event.to_json_dict(), ensure_ascii=False), flush=True)
                else:
                    print(format_event(event), flush=True)
        except KeyboardInterrupt:
            pass
    if args.count is not None and got < args.count:
        print(f"emgd listen: only {got} of {args.count} events before the timeout "
              f"(is the daemon running on {endpoint}?)", file=sys.stderr)
        return 1
    return 0


def format_event(event: Any) -> str:
    """One human-readable line for an event."""
    head = f"{event.topic:<24} #{event.seq:<6} sample={event.sample:<9}"
    fields = event.fields
    if event.kind == "raw":
        arr = event.array()
        body = f"n={arr.shape[0]} rms={float((arr ** 2).mean() ** 0.5):.2f}µV"
    elif event.kind == "status":
        lat = fields.get("latency") or {}
        p99 = lat.get("p99_us")
        body = (f"{fields.get('state')} link={fields.get('link')} "
                f"rate={fields.get('rate_hz', 0):.1f}/s lost={fields.get('lost_samples')} "
                f"crc={fields.get('crc_errors')} gaps={fields.get('gaps')} "
                f"p99={'-' if p99 is None else f'{p99:.0f}µs'}")
    else:
        body = " ".join(f"{k}={v}" for k, v in fields.items()
                        if not isinstance(v, (bytes, bytearray)))
    sim = " [sim]" if event.simulated else ""
    return f"{head} {body}{sim}"


# --------------------------------------------------------------------------- plumbing


def _under_systemd() -> bool:
    return bool(os.environ.get("INVOCATION_ID") or os.environ.get("NOTIFY_SOCKET"))


def _configure_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0] not in SUBCOMMANDS and argv[0] not in ("-h", "--help", "--version")):
        argv.insert(0, "run")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"emgd: error: {exc}", file=sys.stderr)
        return 2
    except EmgdError as exc:
        print(f"emgd: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
