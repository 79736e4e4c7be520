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
                 reason: Optional[str] = None, index: Optional[int] = None) -> None:
        self.message = message
        self.file = file
        self.line = line
        self.field = field
        self.index = index
        """Position of the record inside a JSON array (0-based), when it came from one: a one-line
        array puts every element on line 1, so the line alone does not say which one it is."""
        if reason is not None:
            self.reason = reason
        super().__init__(self._describe())

    def _describe(self) -> str:
        """file:line [item i] field 'x': message [reason]; parts that are unknown are left out."""
        where = self.file
        if self.line is not None:
            where = f"{where or '<input>'}:{self.line}"
        if self.index is not None:
            where += f" [item {self.index}]"
        if self.field:
            where += f" field {self.field!r}"
        where = where.strip()
        return f"{where}: {self.message} [{self.reason}]" if where else f"{self.message} [{self.reason}]"

    def located(self, file: str, line: Optional[int], index: Optional[int] = None) -> "DataError":
        """A copy of this error with the record's location filled in (parsers do not know it)."""
        return type(self)(self.message, file=file, line=line, field=self.field, reason=self.reason,
                          index=self.index if index is None else index)

    def __reduce__(self):
        return (_rebuild, (type(self), self.message, self.file, self.line, self.field, self.reason, self.index))


def _rebuild(cls, message, file, line, field, reason, index=None):
    return cls(message, file=file, line=line, field=field, reason=reason, index=index)


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


class SampleExcluded(DataError):
    """Not an error: the record is left out by a declared rule (e.g. a KTO record labelled false under
    format 'chosen'). Counted like a skip in both on_error modes; strict mode does not stop for it."""

    reason = "excluded"


class TemplateError(DataError):
    """The chat template cannot render a conversation, or its loss mask cannot be derived exactly."""

    reason = "template_error"


class SourceRejected(DataError):
    """A source as a whole cannot train: no record in a file, no sample kept, or more records
    skipped than data.max_skip_fraction allows (a broken file must not pass as a few bad records)."""

    reason = "source_rejected"


class WorkerDied(DataError):
    """A prepare worker process ended without a result (killed, e.g. by the out-of-memory killer,
    or crashed); the chunk it held is named, since its records may be what it died on."""

    reason = "worker_died"


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
    index: Optional[int] = None
    """Position inside a JSON array, when the record came from one."""

    @classmethod
    def from_error(cls, err: DataError) -> "SkipExample":
        return cls(err.reason, err.file, err.line, err.field, err.message, err.index)

    def location(self) -> str:
        """file:line [item i], as DataError writes it."""
        where = f"{self.file or '<input>'}:{self.line}" if self.line is not None else (self.file or "<input>")
        return where + (f" [item {self.index}]" if self.index is not None else "")
