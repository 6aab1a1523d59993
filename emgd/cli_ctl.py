"""``emgd ctl COMMAND``: talk to a running daemon over its control socket."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from emgd.errors import EmgdError

DEFAULT_CTL = "tcp://127.0.0.1:7401"

EPILOG = """\
commands:
  status                 the daemon's device, link, rates, losses and latency
  marker TEXT            publish a marker (marker/<device>) and write it to the recording
  reset                  reset decoder and detector state at the next sample
  record start [FILE]    start recording to FILE (default: emgd-DATE-TIME.h5 in the
                         daemon's working directory); see docs/recording.md
  record stop            stop recording (every sample received so far is in the file)
  reload                 load the models again (e.g. after 'emgd models import') and swap
                         them in at the next sample; on failure the old models keep running

examples:
  emgd ctl status
  emgd ctl marker "start of block 2"
  emgd ctl --ctl tcp://127.0.0.1:7411 status --json
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ctl", help="send a command to a running daemon",
                       description="Send one command to a running emgd over its control "
                                   "socket and print the reply.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ctl", default=None,
                   help=f"control endpoint (default: $EMGD_CTL or {DEFAULT_CTL})")
    p.add_argument("--json", action="store_true", help="print the raw reply as JSON")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for a reply")
    p.add_argument("command", help="status, marker, reset, record, reload")
    p.add_argument("args", nargs="*", help="the command's arguments")
    p.set_defaults(func=cmd_ctl)


def build_request(command: str, args: list[str]) -> tuple[str, dict[str, Any]]:
    from emgd.errors import ConfigError

    if command == "marker":
        if not args:
            raise ConfigError("usage: emgd ctl marker TEXT")
        return "marker", {"text": " ".join(args)}
    if command == "record":
        if args[:1] == ["start"] and len(args) <= 2:
            return "record", {"action": "start", "path": args[1] if len(args) == 2 else ""}
        if args == ["stop"]:
            return "record", {"action": "stop"}
        raise ConfigError("usage: emgd ctl record start [FILE] | emgd ctl record stop")
    if command in ("status", "reset", "reload"):
        if args:
            raise ConfigError(f"'emgd ctl {command}' takes no arguments")
        return command, {}
    # unknown commands go to the daemon, which lists the commands it knows
    return command, {}


def cmd_ctl(args: argparse.Namespace) -> int:
    from emgd.control import request

    endpoint = args.ctl or os.environ.get("EMGD_CTL") or DEFAULT_CTL
    cmd, req_args = build_request(args.command, args.args)
    try:
        reply = request(endpoint, cmd, req_args, timeout=args.timeout)
    except TimeoutError as exc:
        raise EmgdError(str(exc)) from exc
    if args.json:
        print(json.dumps(reply, default=str, ensure_ascii=False))
    elif reply.get("ok"):
        print(_format(cmd, reply.get("result")))
    if not reply.get("ok"):
        print(f"emgd ctl: the daemon refused: {reply.get('error')}", file=sys.stderr)
        return 1
    return 0


def _format(cmd: str, result: Any) -> str:
    if cmd == "status" and isinstance(result, dict):
        st = result.get("status") or {}
        dev = result.get("device") or {}
        lat = st.get("latency") or {}
        lines = [
            f"device    {dev.get('device_id')} ({dev.get('transport')}, {dev.get('url')})"
            + ("  SIMULATED" if dev.get("simulated") else ""),
            f"link      {st.get('link')}   state {st.get('state')}",
            f"rate      {st.get('rate_hz', 0):.1f} samples/s   samples {st.get('samples')}",
            f"losses    lost={st.get('lost_samples')} crc={st.get('crc_errors')} "
            f"gaps={st.get('gaps')} overrun={st.get('overrun_samples')}",
            f"latency   p50={lat.get('p50_us')} µs  p99={lat.get('p99_us')} µs   "
            f"cpu {st.get('cpu', 0):.1f}%",
            f"endpoints pub={result.get('pub')} ctl={result.get('ctl')}",
        ]
        return "\n".join(lines)
    return json.dumps(result, default=str, ensure_ascii=False)
