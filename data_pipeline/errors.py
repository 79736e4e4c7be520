"""Error types of the data pipeline.

Every error about a record names where it came from (file, line, field) so that a user can open
the file at that line. Under on_error=skip the same objects are counted per `reason` and the first
few are shown in the prepare report; under on_error=strict the first one is raised.

The classes pickle by their constructor arguments because they cross process boundaries
(prepare's worker pool re-raises them in the parent).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


class DataError(ValueError):
    """A record or an input file is unusable. `reason` is a short stable code used for counting."""

    reason = "data_error"

    def __init__(self, message: str, *, file: str = "", line: Optional[int] = None, field: str = "",
                 reason: Optional[str] = None) -> None:
        self.message = message
        self.file = file
        self.line = line
        self.field = field
        if reason is not None:
            self.reason = reason
        super().__init__(self._describe())

    def _describe(self) -> str:
        where = self.file or "<input>"
        if self.line is not None:
            where += f":{self.line}"
        if self.field:
            where += f" field {self.field!r}"
        return f"{where}: {self.message} [{self.reason}]"

    def located(self, file: str, line: Optional[int]) -> "DataError":
        """A copy of this error with the record's location filled in (parsers do not know it)."""
        return type(self)(self.message, file=file, line=line, field=self.field, reason=self.reason)

    def __reduce__(self):
        return (_rebuild, (type(self), self.message, self.file, self.line, self.field, self.reason))


def _rebuild(cls, message, file, line, field, reason):
    return cls(message, file=file, line=line, field=field, reason=reason)


class MalformedInputError(DataError):
    """The bytes cannot be decoded: invalid JSON, invalid UTF-8, unreadable Parquet."""

    reason = "malformed_json"


class FieldError(DataError):
    """A required field is missing or has the wrong type."""

    reason = "missing_field"


class ConversationError(DataError):
    """The conversation is structurally wrong: unknown role, bad turn order, empty response."""

    reason = "bad_conversation"


class SampleRejected(DataError):
    """The record parsed, but the tokenized sample cannot be trained on (too long, nothing trained)."""

    reason = "rejected"


class TemplateError(DataError):
    """The chat template cannot render a conversation, or its loss mask cannot be derived exactly."""

    reason = "template_error"


class PreparedDataError(DataError):
    """Prepared shards are missing, incomplete or were made with another tokenizer/settings."""

    reason = "prepared_data"


@dataclass
class SkipExample:
    """One skipped record as shown in the manifest and the report."""

    reason: str
    file: str
    line: Optional[int]
    field: str
    message: str

    @classmethod
    def from_error(cls, err: DataError) -> "SkipExample":
        return cls(err.reason, err.file, err.line, err.field, err.message)
