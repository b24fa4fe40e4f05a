"""`python -m orchestrator dashboard RUN_DIR`: optuna-dashboard over a search's Optuna journal."""

from __future__ import annotations

import argparse
import ipaddress
import socket
import sys
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from orchestrator.errors import UserError

INSTALL_HINT = "the dashboard needs optuna-dashboard: pip install 'compression-orchestrator[dashboard]'"


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is a number from 1 to 65535, got {text!r}")
    return port


def add_dashboard_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "run_dir", metavar="RUN_DIR", help="a search's run directory (the one holding optuna-journal.log)"
    )
    parser.add_argument("--port", type=_port, default=8080, help="port to listen on")
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on; anything but a loopback address lets other machines reach the dashboard, "
        "which has no login and can edit the study",
    )


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """No line per request."""


class _Server6(WSGIServer):
    address_family = socket.AF_INET6


def serve(app: Any, host: str, port: int) -> None:
    """Serve the WSGI `app` on host:port until interrupted; a port that cannot be bound is one line."""
    server_class = _Server6 if ":" in host else WSGIServer
    try:
        server = make_server(host, port, app, server_class=server_class, handler_class=_QuietHandler)
    except OSError as exc:
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    shown = f"[{host}]" if ":" in host else host
    print(f"optuna-dashboard on http://{shown}:{port}/ (Ctrl-C stops it)", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()


def run_dashboard(args: argparse.Namespace) -> int:
    """Open the run's journal and serve optuna-dashboard on it."""
    from orchestrator.search.prepare import journal_path

    journal = Path(journal_path(args.run_dir))
    if not journal.is_file():
        raise UserError(f"no Optuna journal at {journal}: is {args.run_dir} a search's run directory?")
    try:
        import optuna_dashboard
    except ImportError:
        raise UserError(INSTALL_HINT) from None
    if not is_loopback(args.host):
        print(
            f"warning: listening on {args.host}, not a loopback address: anyone who can reach port {args.port} "
            "can read and edit this study (the dashboard has no login)",
            file=sys.stderr,
        )
    serve(optuna_dashboard.wsgi(open_journal(journal)), args.host, args.port)
    return 0


def open_journal(journal: Path) -> Any:
    """The journal as an Optuna storage; one that Optuna cannot replay, or that holds no study although it is not
    empty (Optuna skips a broken last line), is one UserError line."""
    from orchestrator.search.sampler import journal_storage

    hint = "is it a search's run directory, and was the journal written by this tool?"
    try:
        storage = journal_storage(journal)
        studies = storage.get_all_studies()
    except Exception as exc:  # noqa: BLE001 - whatever the bytes make Optuna's replay raise
        raise UserError(
            f"{journal} is not a readable Optuna journal ({type(exc).__name__}: {str(exc)[:200]}); {hint}"
        ) from None
    if not studies and journal.stat().st_size:
        raise UserError(f"{journal} holds no Optuna study; {hint}")
    return storage
