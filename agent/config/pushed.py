"""Profiles pushed by IT: the site file's trust settings (``profiles:``).

The signature, scope and version checks live in ``agent.sync.envelope``; a payload that
has passed them becomes a config layer in ``sources.py`` (`profile_layer`).
"""

from __future__ import annotations

import base64
import binascii
from typing import Self

from pydantic import Field, field_validator, model_validator

from agent.config.base import StrictModel

# What no pushed profile may set: who the device is, whom it trusts, where its state is.
FORBIDDEN_PROFILE_KEYS: tuple[str, ...] = ("identity", "profiles", "supervisor.state_dir")


def _check_key_text(text: str) -> str:
    body = text.strip().removeprefix("ed25519:")
    try:
        raw = base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(
            f"{text!r} is not a public key; paste the line of a .pub file from "
            "'classroom-agent profile keygen' (ed25519:BASE64)"
        ) from None
    if len(raw) != 32:
        raise ValueError(f"{text!r}: an Ed25519 public key is 32 bytes, got {len(raw)}")
    return "ed25519:" + body


class ProfilesConfig(StrictModel):
    """Which IT keys this device trusts for pushed profiles (never settable by a profile)."""

    trusted_keys: list[str] = Field(
        default_factory=list,
        description="IT public keys (ed25519:BASE64, the line of a .pub file) whose signed "
        "profiles this device applies; at least 2 so one can be retired; empty: pushed "
        "profiles are not accepted",
    )
    keys_threshold: int = Field(
        default=2,
        ge=2,
        le=16,
        description="How many of the pinned keys must sign a 'keys' document that replaces them",
    )
    max_clock_skew_s: float = Field(
        default=300,
        ge=0,
        le=86400,
        description="A profile issued further than this in the device's future is refused",
    )
    history_size: int = Field(
        default=200, ge=10, le=10000, description="Entries kept in the profile audit log"
    )

    @field_validator("trusted_keys")
    @classmethod
    def _keys(cls, value: list[str]) -> list[str]:
        keys = [_check_key_text(text) for text in value]
        if len(set(keys)) != len(keys):
            raise ValueError("lists the same key twice")
        if len(keys) == 1:
            raise ValueError(
                "pin at least 2 keys (one can then be retired by a keys document), or none"
            )
        return keys

    @model_validator(mode="after")
    def _threshold(self) -> Self:
        if self.trusted_keys and self.keys_threshold > len(self.trusted_keys):
            raise ValueError(
                f"keys_threshold {self.keys_threshold} is more than the "
                f"{len(self.trusted_keys)} pinned keys"
            )
        return self
