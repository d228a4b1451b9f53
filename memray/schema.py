"""The base of every config section and the user-facing configuration error.

Kept apart from `memray.config` so that the extension points (method units, attacks) can
declare their own config sections without importing the whole trial schema, which is
built from their registries.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class ConfigError(ValueError):
    """A user-facing configuration error: `<source>: <field>: <message>`."""

    def __init__(self, source: str, field: str, message: str):
        self.source, self.field, self.message = source, field, message
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{field + ': ' if field else ''}{message}")


class Schema(BaseModel):
    """Base of every config section: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
