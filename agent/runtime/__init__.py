"""The daemon: composes the services from the config and keeps them running.

``daemon`` is the process lifecycle (embedded broker, READY/WATCHDOG/RELOADING, SIGHUP,
SIGTERM); ``supervisor`` owns every service as a named task and restarts what fails;
``sdnotify`` speaks systemd's notify protocol; ``profiles`` applies what IT pushes.
"""

from agent.runtime.cli import add_profile_parser
from agent.runtime.daemon import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK, Agent, Daemon, run_daemon
from agent.runtime.profiles import load_with_profiles, open_book

__all__ = [
    "EXIT_CONFIG",
    "EXIT_FAILURE",
    "EXIT_OK",
    "Agent",
    "Daemon",
    "add_profile_parser",
    "load_with_profiles",
    "open_book",
    "run_daemon",
]
