"""The base of every config section, apart from the sections themselves so that a section
kept in its own module (``pushed.py``, ``sensing.py``...) and ``models.py`` (which
assembles them into `AgentConfig`) can both import it without a cycle."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """Base for every config section: unknown keys are errors, objects are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)
