"""Commands over MQTT: requests on ``{base}/cmd/{name}``, results on ``.../cmd/{name}/result``.

Contract (docs/contracts.md)::

    request  {"id": "<= 64 chars", "args": {...}}
    result   {"v": 1, "id": same id, "command": name, "ok": bool,
              "result": {...} | null, "error": str | null, "at": float}

Who may send a command is the broker's business, not ours: the fleet ACL
(`agent.broker.acl`) lets only admins (IT) write ``cmd/+`` and lets a device read only
its own, so anything that reaches `CommandService` was sent by someone allowed to.
What we guard against is bad input: every malformed request gets an ``ok: false``
result naming the problem (``id`` is ``null`` when none could be recovered) and a log
line, and nothing a request carries can crash the service.

Each request runs in its own task so a slow ``selftest`` never delays a ``ping``; the
same command is never run twice at once (the second request is answered "busy"),
because restarting the capture hubs twice in parallel helps nobody. Retained requests
are refused: a retained command would run again at every reconnect.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any

from agent.contracts import MAX_REQUEST_ID_CHARS, CommandRequest, CommandResult
from agent.sync.link import MqttLink
from agent.sync.messages import LinkError, Message, PublishRejected

log = logging.getLogger(__name__)

MAX_ID_CHARS = MAX_REQUEST_ID_CHARS
DEFAULT_MAX_REQUEST_BYTES = 16 * 1024
DEFAULT_TIMEOUT_S = 120.0
RESULT_PUBLISH_TIMEOUT_S = 10.0

CommandArgs = dict[str, Any]
CommandHandler = Callable[[CommandArgs], Awaitable[Mapping[str, Any] | None]]
ArgType = type | tuple[type, ...]

_TYPE_NAMES: dict[type, str] = {
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "true or false",
    list: "a list",
    dict: "an object",
    type(None): "null",
}


class CommandError(Exception):
    """Raised by a handler for a failure the sender should read (becomes ``error``)."""


class CommandBusy(CommandError):
    """The same command is still running."""


class _WithId(CommandError):
    """A refusal raised after the request id was recovered."""

    def __init__(self, request_id: str, message: str) -> None:
        super().__init__(message)
        self.request_id = request_id


@dataclass(frozen=True)
class _Command:
    name: str
    handler: CommandHandler
    args: Mapping[str, ArgType] | None
    required: frozenset[str]
    timeout_s: float


def _type_name(expected: ArgType) -> str:
    kinds = expected if isinstance(expected, tuple) else (expected,)
    return " or ".join(_TYPE_NAMES.get(kind, kind.__name__) for kind in kinds)


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _matches(value: Any, expected: ArgType) -> bool:
    kinds = expected if isinstance(expected, tuple) else (expected,)
    for kind in kinds:
        if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
            return True  # JSON has one number type: 2 is a fine float
        if kind is int and isinstance(value, bool):
            continue  # bool is an int subclass in Python, not in JSON
        if isinstance(value, kind):
            return True
    return False


def check_args(
    command: str,
    args: Any,
    spec: Mapping[str, ArgType] | None,
    required: frozenset[str] = frozenset(),
) -> CommandArgs:
    """Validate ``args`` against ``spec`` ({name: type}); raise `CommandError` naming the fix.

    ``spec`` None accepts any object (the handler checks it); an empty spec accepts only
    ``{}``. Unknown names are errors, so a typo is never silently ignored.
    """
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise CommandError(f"'args' must be an object, got {_json_type(args)}")
    if spec is None:
        return dict(args)
    unknown = sorted(set(args) - set(spec))
    if unknown:
        allowed = ", ".join(sorted(spec)) or "none"
        raise CommandError(
            f"{command}: unknown argument(s) {', '.join(unknown)}; allowed: {allowed}"
        )
    missing = sorted(required - set(args))
    if missing:
        raise CommandError(f"{command}: missing argument(s) {', '.join(missing)}")
    for key, value in args.items():
        if not _matches(value, spec[key]):
            raise CommandError(
                f"{command}: argument '{key}' must be {_type_name(spec[key])}, "
                f"got {_json_type(value)}"
            )
    return dict(args)


class CommandService:
    """Runs commands addressed to this device; a supervisor service (``name``, ``run()``).

    ``register(name, handler)`` before ``run()``: ``handler(args)`` is awaited and
    returns the ``result`` object (or None); it raises `CommandError` for an error the
    sender should read. Any other exception is logged with its traceback and reported
    as an internal error. Cancelling ``run()`` cancels every running command.
    """

    name = "commands"

    def __init__(
        self,
        link: MqttLink,
        *,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        default_timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        self._link = link
        self._max_bytes = max_request_bytes
        self._default_timeout_s = default_timeout_s
        self._commands: dict[str, _Command] = {}
        self._running: set[str] = set()
        self.handled = 0
        self.rejected = 0

    @property
    def commands(self) -> list[str]:
        return sorted(self._commands)

    def register(
        self,
        name: str,
        handler: CommandHandler,
        *,
        args: Mapping[str, ArgType] | None = None,
        required: tuple[str, ...] = (),
        timeout_s: float | None = None,
    ) -> None:
        """Register ``handler`` for ``cmd/{name}``.

        ``args``: accepted argument names and their types (``{"duration_s": float}``);
        None lets the handler check them. ``required``: names that must be present.
        ``timeout_s``: the command fails with a timeout error after this long.
        """
        self._link.topics.cmd(name)  # raises ValueError for a name that is not a topic level
        if name in self._commands:
            raise ValueError(f"command {name!r} is already registered")
        if args is not None and not set(required) <= set(args):
            raise ValueError(f"required arguments {required} must be listed in args")
        self._commands[name] = _Command(
            name,
            handler,
            dict(args) if args is not None else None,
            frozenset(required),
            timeout_s if timeout_s is not None else self._default_timeout_s,
        )

    async def run(self) -> None:
        """Serve commands until cancelled (the subscription survives reconnects)."""
        topics = self._link.topics
        self._running.clear()  # a request cancelled before it started never cleared its name
        log.debug("serving commands %s on %s", ", ".join(self.commands), topics.cmd_filter)
        async with (
            self._link.subscribe(topics.cmd_filter, qos=1) as requests,
            asyncio.TaskGroup() as group,
        ):
            async for message in requests:
                reply = self._dispatch(message)
                if reply is not None:
                    group.create_task(reply, name=f"command:{message.topic.rsplit('/', 1)[-1]}")

    # -- one request ------------------------------------------------------------------

    def _dispatch(self, message: Message) -> Coroutine[Any, Any, None] | None:
        """Parse one request; return the coroutine that answers it (None: ignore it)."""
        name = message.topic.rsplit("/", 1)[-1]
        result_topic = f"{message.topic}/result"
        request_id: str | None = None
        try:
            request_id, args = self._parse(message)
            command = self._commands.get(name)
            if command is None:
                known = ", ".join(self.commands) or "none"
                raise CommandError(f"unknown command {name!r}; this device knows: {known}")
            args = check_args(name, args, command.args, command.required)
            if name in self._running:
                raise CommandBusy(f"{name} is already running; try again when it has finished")
        except CommandError as exc:
            if isinstance(exc, _WithId):
                request_id = exc.request_id
            self.rejected += 1
            log.warning(
                "refused command %s (id %s): %s",
                name,
                request_id,
                exc,
                extra={"fields": {"command": name, "id": request_id}},
            )
            return self._publish(result_topic, name, request_id, ok=False, error=str(exc))
        self._running.add(name)
        return self._execute(command, request_id, args, result_topic)

    def _parse(self, message: Message) -> tuple[str, Any]:
        if len(message.payload) > self._max_bytes:
            raise CommandError(
                f"request is {len(message.payload)} bytes; the limit is {self._max_bytes}"
            )
        try:
            request = json.loads(message.payload)
        except (UnicodeDecodeError, ValueError) as exc:
            raise CommandError(f"request is not JSON ({exc})") from None
        if not isinstance(request, dict):
            raise CommandError(f"request must be a JSON object, got {_json_type(request)}")
        request_id = request.get("id")
        if request_id is None:
            raise CommandError('request has no "id" (a string of at most 64 characters)')
        if not isinstance(request_id, str) or not request_id:
            raise CommandError(
                f'"id" must be a non-empty string of at most {MAX_ID_CHARS} characters, '
                f"got {_json_type(request_id)}"
            )
        if len(request_id) > MAX_ID_CHARS:
            raise CommandError(
                f'"id" is {len(request_id)} characters; at most {MAX_ID_CHARS} are allowed'
            )
        # From here on the id is known, so the sender can match the refusal.
        if message.retain:
            raise _WithId(
                request_id,
                "retained command refused: publish commands with retain=false, or the "
                "device would run it again at every reconnect",
            )
        unknown = sorted(set(request) - CommandRequest.FIELDS)
        if unknown:
            raise _WithId(request_id, f"unknown request field(s) {', '.join(unknown)}")
        parsed = CommandRequest(request_id, request.get("args"))
        return parsed.id, parsed.args

    async def _execute(
        self, command: _Command, request_id: str, args: CommandArgs, result_topic: str
    ) -> None:
        started = time.monotonic()
        ok, result, error = False, None, None
        try:
            async with asyncio.timeout(command.timeout_s):
                value = await command.handler(args)
        except TimeoutError:
            error = f"{command.name} timed out after {command.timeout_s:g} s"
            log.warning("command %s (id %s): %s", command.name, request_id, error)
        except CommandError as exc:
            error = str(exc)
            log.warning("command %s (id %s) failed: %s", command.name, request_id, error)
        except Exception as exc:
            error = f"{command.name} failed: internal error ({type(exc).__name__}: {exc})"
            log.exception("command %s (id %s) failed", command.name, request_id)
        else:
            result = dict(value) if value is not None else {}
            try:
                json.dumps(result, allow_nan=False)
            except (TypeError, ValueError) as exc:
                error = f"{command.name} returned a result that is not JSON ({exc})"
                log.error("command %s (id %s): %s", command.name, request_id, error)
                result = None
            else:
                ok = True
        finally:
            self._running.discard(command.name)
        self.handled += 1
        log.info(
            "command %s (id %s) %s in %.2f s",
            command.name,
            request_id,
            "ok" if ok else "failed",
            time.monotonic() - started,
            extra={"fields": {"command": command.name, "id": request_id, "ok": ok}},
        )
        await self._publish(
            result_topic, command.name, request_id, ok=ok, result=result, error=error
        )

    async def _publish(
        self,
        topic: str,
        name: str,
        request_id: str | None,
        *,
        ok: bool,
        result: Mapping[str, Any] | None = None,
        error: str | None = None,
    ) -> None:
        payload = CommandResult(request_id, name, ok, result, error).to_dict()
        try:
            async with asyncio.timeout(RESULT_PUBLISH_TIMEOUT_S):
                await self._link.publish(topic, payload, qos=1)
        except PublishRejected as exc:
            # The ACL must allow cmd/+/result for this device: a deployment error.
            log.error("result of %s (id %s) refused by the broker: %s", name, request_id, exc)
        except (LinkError, TimeoutError) as exc:
            log.warning("result of %s (id %s) not delivered: %s", name, request_id, exc)


# -- handlers the runtime registers -----------------------------------------------------


def ping_handler(link: MqttLink, *, version: str, started_monotonic: float) -> CommandHandler:
    """``ping``: proves the device reads its commands; answers version, uptime and seq."""

    async def ping(args: CommandArgs) -> dict[str, Any]:
        return {
            "version": version,
            "uptime_s": round(time.monotonic() - started_monotonic, 1),
            "seq": link.seq,
            "device": link.identity.device_id,
        }

    return ping


def callable_handler(action: Callable[[], Awaitable[Mapping[str, Any] | None]]) -> CommandHandler:
    """Wrap an argument-less coroutine function (e.g. the runtime's capture restart)."""

    async def handler(args: CommandArgs) -> Mapping[str, Any] | None:
        return await action()

    return handler
