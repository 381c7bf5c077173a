"""radio-monitor: look at a run from a login node.

    radio-monitor status RUN_DIR [--watch [SECONDS]] [--json]   state, progress, ETA, checkpoints, alerts, ranks
    radio-monitor ui RUN_DIR [--port 5000]                      the MLflow UI on the run's sqlite store

Exit codes: 0 success, 2 bad arguments or not a run directory.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from .rundir import MLFLOW_DB, mlflow_default_uri
from .status import RunDirError, collect_status, render_status


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="radio-monitor", description="Watch a radio_scale run from its run directory.")
    sub = p.add_subparsers(dest="command", required=True)
    st = sub.add_parser("status", help="state, progress, ETA, last checkpoint, stragglers, alerts, per-rank heartbeats")
    st.add_argument("run_dir", type=Path)
    st.add_argument("--watch", nargs="?", type=float, const=10.0, default=None, metavar="SECONDS",
                    help="refresh every SECONDS (default 10) until Ctrl-C")
    st.add_argument("--json", action="store_true", help="print JSON (one object per refresh) instead of a table")
    st.add_argument("--stale-after", type=float, default=None, metavar="SECONDS",
                    help="heartbeat age that makes a run stale (default: the phase's watchdog timeout + 60 s)")
    ui = sub.add_parser("ui", help="serve the MLflow UI on the run's tracking store (127.0.0.1)")
    ui.add_argument("run_dir", type=Path)
    ui.add_argument("--port", type=int, default=5000)
    return p


def ui_command(run_dir: Path, port: int) -> list[str]:
    """The `mlflow ui` command line serving the run's sqlite store on 127.0.0.1:port."""
    mlflow = shutil.which("mlflow") or shutil.which("mlflow", path=str(Path(sys.executable).parent))
    head = [mlflow] if mlflow else [sys.executable, "-m", "mlflow"]
    # One worker: a single operator's browser; mlflow's default of 4 costs memory and start-up time on a login node.
    return head + ["ui", "--backend-store-uri", mlflow_default_uri(run_dir), "--host", "127.0.0.1", "--port", str(port),
                   "--workers", "1"]


def _status(args: argparse.Namespace) -> int:
    from rich.console import Console

    out = Console(width=None if sys.stdout.isatty() else 160, soft_wrap=False)

    def snapshot():
        return collect_status(args.run_dir, stale_after=args.stale_after)

    st = snapshot()  # a bad directory fails here, before any screen handling
    if args.watch is None:
        if args.json:
            print(json.dumps(st.to_dict(), default=str))
        else:
            out.print(render_status(st))
        return 0
    if args.watch <= 0:
        raise RunDirError(f"--watch {args.watch}: the refresh interval must be > 0 s")
    try:
        if args.json:
            while True:
                print(json.dumps(st.to_dict(), default=str), flush=True)
                time.sleep(args.watch)
                st = snapshot()
        from rich.live import Live

        with Live(render_status(st), console=out, auto_refresh=False, screen=False) as live:
            while True:
                time.sleep(args.watch)
                live.update(render_status(snapshot()), refresh=True)
    except KeyboardInterrupt:
        return 0


def _ui(args: argparse.Namespace) -> int:
    db = args.run_dir / MLFLOW_DB
    if not db.is_file():
        raise RunDirError(f"no MLflow store at {db} (a run with tracking.uri set logs to that server instead)")
    cmd = ui_command(args.run_dir, args.port)
    print(f"serving {db} at http://127.0.0.1:{args.port} (from another machine: ssh -L {args.port}:127.0.0.1:"
          f"{args.port} <this host>)\n$ {' '.join(cmd)}", file=sys.stderr, flush=True)
    os.execv(cmd[0], cmd)
    return 0  # not reached


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of radio-monitor; returns the exit code."""
    args = _parser().parse_args(argv)
    try:
        return _status(args) if args.command == "status" else _ui(args)
    except RunDirError as e:
        print(f"radio-monitor: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
