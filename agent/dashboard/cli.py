"""``classroom-agent dashboard``: the command's options and its process-level runner."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from typing import TYPE_CHECKING, Any, get_args

from agent.broker import BrokerError, MosquittoBroker
from agent.config import (
    BrokerConfig,
    ConfigError,
    UiLanguage,
    add_broker_client_options,
    broker_client_fields,
)
from agent.dashboard.config import DEFAULT_BROKER_URL, DashboardConfig, dashboard_config
from agent.logs import setup_logging
from agent.sync import LinkConfigError
from agent.testkit import SimFleet, fleet_layout

if TYPE_CHECKING:
    from agent.dashboard.server import DashboardServer

logger = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILURE, EXIT_CONFIG = 0, 1, 2
MAX_SIMULATED = 2000


def add_dashboard_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``dashboard`` to the CLI's subparsers; ``args.func(args)`` runs it."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "dashboard", help="the maintenance dashboard: the fleet's state in a web page"
    )
    add_broker_client_options(
        parser,
        default_url=DEFAULT_BROKER_URL,
        user_help="broker user, a reader of the fleet ACL (dashboard)",
    )
    parser.add_argument("--bind", default="127.0.0.1", help="page address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8480, help="page port (default 8480)")
    parser.add_argument(
        "--allow-host", action="append", default=[], help="extra Host name to answer (repeat)"
    )
    parser.add_argument(
        "--language",
        choices=get_args(UiLanguage),
        default="auto",
        help="language of the page: zh-CN, en, or auto (the browser's; default)",
    )
    parser.add_argument(
        "--simulate",
        type=int,
        default=0,
        metavar="N",
        help="demo: start an embedded broker and N simulated rooms (ignores --broker)",
    )
    parser.add_argument("--log-level", default="info", help="debug, info, warning, error")
    parser.set_defaults(func=cmd_dashboard)
    return parser


def config_from_args(args: argparse.Namespace) -> DashboardConfig:
    """`DashboardConfig` from the parsed options (`ConfigError` names the bad field)."""
    return dashboard_config(
        broker=broker_client_fields(args),
        bind=args.bind,
        port=args.port,
        allowed_hosts=args.allow_host,
        language=args.language,
    )


def cmd_dashboard(args: argparse.Namespace) -> int:
    setup_logging(args.log_level)
    if not 0 <= args.simulate <= MAX_SIMULATED:
        raise ConfigError.single("--simulate", f"must be between 0 and {MAX_SIMULATED}")
    return run_dashboard(config_from_args(args), simulate_rooms=args.simulate)


def run_dashboard(config: DashboardConfig, *, simulate_rooms: int = 0) -> int:
    """Serve the dashboard until SIGINT/SIGTERM; the exit code (0, 1, or 2 for config)."""
    return asyncio.run(_main(config, simulate_rooms))


async def _main(config: DashboardConfig, simulate_rooms: int) -> int:
    # aiohttp is imported here, not at the top: every other command starts faster.
    from agent.dashboard.server import DashboardError

    task = asyncio.create_task(_serve(config, simulate_rooms), name="dashboard-main")
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, task.cancel)
    try:
        await task
    except asyncio.CancelledError:
        return EXIT_OK
    except Exception as exc:
        leaves = _leaves(exc)
        fatal = [e for e in leaves if isinstance(e, LinkConfigError | DashboardError | BrokerError)]
        if not fatal:
            raise
        for error in fatal:
            sys.stderr.write(
                f"{error}\n" if isinstance(error, DashboardError) else f"dashboard: {error}\n"
            )
        return EXIT_FAILURE if any(isinstance(e, BrokerError) for e in fatal) else EXIT_CONFIG
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
    return EXIT_OK


def _leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside (nested) task-group exception groups."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


async def _serve(config: DashboardConfig, simulate_rooms: int) -> None:
    from agent.dashboard.server import DashboardServer

    if simulate_rooms <= 0:
        server = DashboardServer(config)
        await _announce_and_run(server)
        return
    async with MosquittoBroker() as broker:
        # The demo broker is anonymous and loopback-only: no credentials on either side.
        local = BrokerConfig(url=broker.url, topic_prefix=config.broker.topic_prefix)
        server = DashboardServer(config.model_copy(update={"broker": local}))
        rooms, groups = fleet_layout(simulate_rooms)
        fleet = SimFleet(
            local,
            rooms,
            groups,
            interval_s=config.health_interval_s,
            connections=max(1, simulate_rooms // 100),
            alert_rate=0.01,
            offline=0.04,
            silent=0.02,
        )
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(fleet.run(), name="dashboard-simulated-fleet")
            await _announce_and_run(server)


async def _announce_and_run(server: DashboardServer) -> None:
    async with asyncio.TaskGroup() as tasks:
        serving = tasks.create_task(server.run(), name="dashboard-server")
        ready = tasks.create_task(server.wait_ready(), name="dashboard-ready")
        await asyncio.wait({serving, ready}, return_when=asyncio.FIRST_COMPLETED)
        if ready.done() and not serving.done():
            sys.stderr.write(
                f"maintenance dashboard: {server.url} (broker {server.link.url}); Ctrl-C stops\n"
            )
        ready.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await ready
