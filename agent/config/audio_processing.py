"""The microphone's processing stage: echo cancellation, noise suppression, gain control.

Every stage is on by default in a room that plays the lesson on loudspeakers and has
an open microphone (``mode: auto``): it must not send the other rooms their own voices
back. A room without loudspeakers sends its microphone as captured unless ``mode`` is
``on``. A room with a hardware-AEC speakerphone turns the software canceller off in
its hardware profile, since two cancellers in series fight each other.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from agent.config.base import StrictModel


class AudioProcessingConfig(StrictModel):
    """``capture.audio.processing``: WebRTC's audio processing module on the microphone."""

    mode: Literal["auto", "on", "off"] = Field(
        default="auto",
        description=(
            "'auto': process while the room's loudspeakers play the lesson (a room that "
            "plays and captures at once); 'on': always; 'off': send the microphone untouched"
        ),
    )
    echo_cancellation: bool = Field(
        default=True,
        description=(
            "Remove what the loudspeakers play from the microphone (WebRTC AEC3); turn off "
            "for a speakerphone with its own echo canceller"
        ),
    )
    linear_canceller: bool = Field(
        default=True,
        description=(
            "A linear echo canceller ahead of AEC3 (mono microphones), used once it has "
            "converged (about 3 s of far-end speech): a pupil who talks over a loud "
            "loudspeaker keeps 2-3 dB more of their voice; turn off to save about 2 % of a core"
        ),
    )
    noise_suppression: bool = Field(
        default=True, description="Suppress steady background noise (fans, projector, traffic)"
    )
    noise_suppression_level: int = Field(
        default=1,
        ge=0,
        le=3,
        description="Noise suppression strength: 0 = 6 dB, 1 = 12 dB, 2 = 18 dB, 3 = 21 dB",
    )
    high_pass_filter: bool = Field(
        default=True, description="Cut rumble below about 80 Hz (desk knocks, air conditioning)"
    )
    auto_gain_control: bool = Field(
        default=True,
        description="Bring quiet and distant talkers to a steady level (WebRTC AGC2)",
    )
    max_gain_db: float = Field(
        default=30.0,
        ge=0,
        le=50,
        description="Most the gain control may amplify, in dB (lower it in a noisy room)",
    )
    max_echo_delay_ms: int = Field(
        default=300,
        ge=50,
        le=500,
        description=(
            "Largest loudspeaker-to-microphone delay left to the canceller, in ms; a "
            "larger measured one realigns the reference (AEC3 searches about 0-500 ms)"
        ),
    )
