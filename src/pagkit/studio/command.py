"""``pagkit studio``: its arguments (``add_parser``) and the launcher (``run``) with the host and auth rules.

The page binds to 127.0.0.1. Another ``--host`` makes it reachable from other machines: the launcher then warns
and refuses to start without ``--auth user:pass``. Model folders open only under ``--models-root`` (default: the
shipped models alone); preset files and eval/tune OUT folders only under ``--files-root`` (default: the current
folder).
"""
from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from pathlib import Path

from ..cli.common import _positive_int

LOCAL_HOSTS = ("localhost",)


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``studio`` on the CLI's subparsers (``sub.add_parser``); its ``func`` is ``run``."""
    p = subparsers.add_parser("studio", help="a local web page: guidance side by side, scale strips, sites, results",
                              description="Start pagkit studio on http://127.0.0.1:PORT (needs pip install "
                                          "'pagkit[studio]'). Offline, no telemetry.")
    p.add_argument("--model", default="fmnist", help="the model selected at start (a shipped name, or a folder "
                                                     "under --models-root; default fmnist)")
    p.add_argument("--models-root", default=None, metavar="DIR",
                   help="diffusers model folders the page may open, under DIR (default: the shipped models only)")
    p.add_argument("--files-root", default=".", metavar="DIR",
                   help="preset files and eval/tune OUT folders the page may open, under DIR (default: the "
                        "current folder)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1; any other needs --auth)")
    p.add_argument("--port", type=_port, default=7860, help="port (default 7860)")
    p.add_argument("--auth", default=None, metavar="USER:PASS", help="a login for the page (required off localhost)")
    p.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads")
    p.set_defaults(func=run)
    return p


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number 1..65535, got {value}")
    return value


def is_local(host: str) -> bool:
    if host.strip().lower() in LOCAL_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host.strip()).is_loopback
    except ValueError:
        return False  # a name other than localhost may resolve anywhere


def check_access(host: str, auth: str | None) -> tuple[str, str] | None:
    """The login tuple for Gradio; a ValueError for a non-local host without ``--auth`` or a bad ``--auth``."""
    login = None
    if auth is not None:
        user, sep, password = auth.partition(":")
        if not sep or not user or not password:
            raise ValueError(f"--auth looks like user:pass, got {auth!r}")
        login = (user, password)
    if not is_local(host):
        print(f"pagkit studio: warning: --host {host} makes the page reachable from other machines; anyone who "
              "can reach it can run the model on this machine", file=sys.stderr)
        if login is None:
            raise ValueError(f"--host {host} is not local: give --auth user:pass, or bind 127.0.0.1 (the default)")
    return login


def launch(args, block: bool = True):
    """Build and serve the page; ``block=False`` returns ``(page, url)`` with the server running (tests)."""
    login = check_access(args.host, args.auth)
    if args.models_root is not None and not Path(args.models_root).is_dir():
        raise ValueError(f"--models-root {args.models_root}: not a folder")
    if args.files_root is not None and not Path(args.files_root).is_dir():
        raise ValueError(f"--files-root {args.files_root}: not a folder")
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # no telemetry, before Gradio is imported
    from . import core
    core.check_model(args.model, args.models_root)  # a bad --model fails here, in one line
    try:
        from . import app
    except ImportError as err:
        raise ValueError(f"pagkit studio needs Gradio ({err}): pip install 'pagkit[studio]'") from None
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    page = app.build(models_root=args.models_root, files_root=args.files_root, model=args.model)
    page.queue(default_concurrency_limit=1)  # one generation at a time per event: the CPU is the limit
    _, url, _ = page.launch(server_name=args.host, server_port=args.port, auth=login, share=False,
                            inbrowser=False, prevent_thread_lock=not block, quiet=not block, show_error=False,
                            ssr_mode=False, mcp_server=False, enable_monitoring=False, pwa=False,
                            footer_links=[], css=app.CSS)
    return page, url


def run(args) -> None:
    """``pagkit studio``: serve until interrupted. Refusals are ValueErrors (the CLI prints one line, exit 2)."""
    launch(args, block=True)


def main(argv: list[str] | None = None) -> int:
    """A stand-alone entry (``python -m pagkit.studio.command``) until the CLI registers ``studio``."""
    parser = argparse.ArgumentParser(prog="pagkit")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["studio", *(sys.argv[1:] if argv is None else argv)])
    try:
        args.func(args)
    except ValueError as err:
        print(f"pagkit studio: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
