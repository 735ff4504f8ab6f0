"""One exception type per user-facing failure kind.

The CLI turns every `L4QError` into one line on stderr and a non-zero exit; anything else is a bug
and keeps its traceback.
"""


class L4QError(Exception):
    """Base class: a failure the user can act on, with a message that says what and where."""

    resumable = False  # a rerun with --resume can continue after it (the partial output is kept)


class SourceNotFoundError(L4QError):
    """A local path, preset or hub repo that cannot be found or is not downloaded."""


class NotLlama4Error(L4QError):
    """The config describes some other architecture."""


class CorruptCheckpointError(L4QError):
    """A safetensors file or index that is truncated, malformed or inconsistent."""


class ShapeMismatchError(L4QError):
    """A tensor whose shape disagrees with what the config implies."""


class NonFiniteWeightError(L4QError):
    """A source weight holds NaN or Inf."""


class OutputExistsError(L4QError):
    """The output (or an interrupted run of it) is already there."""


class OutputWriteError(L4QError):
    """The file system refused a write (disk full, read-only, not a directory)."""

    resumable = True


class UnsafeOutputError(L4QError):
    """--out names something l4q must not replace: not an l4q output, the source, or a home or working directory."""


class OutputBusyError(L4QError):
    """Another l4q process is writing the same output."""


class ResumeMismatchError(L4QError):
    """--resume on a partial output made from another source or other options."""


class UsageError(L4QError):
    """Options that contradict each other or the model."""


class ReportFormatError(L4QError):
    """A report dict or report.json that does not follow the documented schema."""


class HubError(L4QError):
    """The Hugging Face Hub refused or could not serve a download: access, token, repo, revision, network,
    or a download that does not match its published sha256."""

    resumable = True


class DiskSpaceError(L4QError):
    """Not enough free disk for what a run must hold at once (found before it starts, or while downloading)."""

    resumable = True
