"""Route ALSA and JACK chatter into debug logs.

PortAudio's device scan makes libasound and libjack print dozens of lines to stderr on
every initialisation when a card or server is missing; a microphone retried every few
seconds would bury the journal. Both libraries let a program install its own message
handler, which is what this does (once per process).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading

log = logging.getLogger(__name__)

_ALSA_HANDLER = ctypes.CFUNCTYPE(
    None, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p
)
_JACK_HANDLER = ctypes.CFUNCTYPE(None, ctypes.c_char_p)

_lock = threading.Lock()
_done = threading.Event()
_installed: list[object] = []  # the C callbacks must outlive every call into the libraries


def _text(value: bytes | None) -> str:
    return value.decode(errors="replace") if value else ""


def _alsa_message(
    file: bytes | None, line: int, function: bytes | None, err: int, fmt: bytes | None
) -> None:
    # The message is a printf format whose arguments ctypes cannot see; the format and
    # the error number are enough to recognise it.
    log.debug("alsa %s:%d %s: %s (err %d)", _text(file), line, _text(function), _text(fmt), err)


def _jack_message(message: bytes | None) -> None:
    log.debug("jack: %s", _text(message))


def _load(name: str, fallback: str) -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library(name) or fallback)
    except OSError:
        return None


def quiet_audio_libraries() -> None:
    with _lock:
        if _done.is_set():
            return
        _done.set()
        asound = _load("asound", "libasound.so.2")
        if asound is not None:
            handler = _ALSA_HANDLER(_alsa_message)
            asound.snd_lib_error_set_handler(handler)
            _installed.append(handler)
        jack = _load("jack", "libjack.so.0")
        if jack is not None:
            callback = _JACK_HANDLER(_jack_message)
            jack.jack_set_error_function(callback)
            jack.jack_set_info_function(callback)
            _installed.append(callback)
