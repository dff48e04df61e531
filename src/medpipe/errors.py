"""Every error a user can act on, and what it means at each boundary, in one place.

Each class has a short machine ``code`` (JSON error bodies, batch error rows) and a row in
:data:`TABLE`: the command-line exit code and the HTTP status it maps to. The CLI prints the message
(no traceback) and exits with :func:`exit_code`; the server answers :func:`http_status` with a JSON
body. An error the table does not know (a bug) is an internal error: exit 1, HTTP 500.

    error                     code               exit  HTTP  meaning
    MedpipeError              error                 2   400  a user mistake; the message names the file/field
    ConfigError               bad_config            2   400  a configuration key or value; names the key
    IngestError               ingest_failed         2   400  a dataset cannot be read as asked; names the file
    PackageError              bad_package           2   500  a model package is missing, altered or invalid
    ExportError               export_failed         2   500  an export cannot be written or does not match
    BatchError                batch_failed          2   400  a batch job's input/output/server is unusable
    ShardError                bad_shards            2   400  a shard folder is unusable
    StorageError              storage_failed        2   400  an s3:// URL cannot be read or written (names URL, reason)
    CheckpointError           bad_checkpoint        2   400  a checkpoint cannot be resumed from
    QuantizeError             quantize_failed       2   400  an INT8 model cannot be built or does not verify
      GateError               accuracy_gate_failed  2   400  the INT8 model failed its accuracy gate
    DecisionRuleError         bad_decision_rule     2   400  an unknown decision rule, or a package's is malformed
    TuneError                 tune_failed           2   400  a tuning study cannot run as asked
    NonFiniteLoss             non_finite_loss       2   500  training diverged (names the step and batch)
    PredictionError           prediction_failed     2   500  the model failed on valid input
    MetadataError             invalid_metadata      2   400  a metadata value outside the model's vocabulary/range
      MetadataNotTakenError   metadata_not_taken    2   400  metadata sent to a model that takes the image only
    TrainingInterrupted       interrupted         143   503  SIGTERM/SIGINT: checkpoint saved, resume later
    ImageError                invalid_image         2   400  bytes that are not an image medpipe will use
      EmptyImageError         empty_image           2   400
      CorruptImageError       corrupt_image         2   400
      DegenerateImageError    degenerate_image      2   400
      UnreadableFileError     unreadable_file       2   400  the file cannot be read (permissions, I/O)
      DecodeBudgetError   decode_budget_exceeded 2   422  well-formed, but decoding would cost over its budget
      UnsupportedFormatError  unsupported_format    2   415
      ImageTooLargeError      image_too_large       2   413
    HttpError                 (per refusal)         2   its own status (a refusal made at the HTTP layer)
"""

from __future__ import annotations


class MedpipeError(Exception):
    """Base class for errors whose message is meant for the user."""

    code = "error"
    prefix = "error: "  # how the CLI introduces the message

    @property
    def message(self) -> str:
        return str(self)


class ConfigError(MedpipeError):
    """A configuration value or key is wrong; the message names it."""

    code = "bad_config"


class IngestError(MedpipeError):
    """A dataset cannot be ingested as asked (layout, manifest, archive); the message names the file."""

    code = "ingest_failed"


class PackageError(MedpipeError):
    """A model package is missing, altered or does not validate; the message names the file and key."""

    code = "bad_package"


class ExportError(MedpipeError):
    code = "export_failed"


class BatchError(MedpipeError):
    code = "batch_failed"


class ShardError(MedpipeError):
    code = "bad_shards"


class StorageError(MedpipeError):
    """An ``s3://`` URL cannot be read or written; the message names the URL and the reason. ``transient``: the
    endpoint could not be reached (a rerun may succeed), as opposed to a missing bucket, key or permission.
    ``kind``: what callers choose their own codes by, never the message: ``missing`` (no such bucket or key),
    ``denied``, ``too_large`` (over a byte limit), or None (anything else)."""

    code = "storage_failed"

    def __init__(self, message: str, transient: bool = False, kind: str | None = None):
        super().__init__(message)
        self.transient, self.kind = transient, kind


class CheckpointError(MedpipeError):
    code = "bad_checkpoint"


class QuantizeError(MedpipeError):
    """An INT8 model cannot be built, or a package's INT8 model/record does not verify."""

    code = "quantize_failed"


class GateError(QuantizeError):
    """The INT8 model failed the accuracy gate; nothing was written."""

    code = "accuracy_gate_failed"


class DecisionRuleError(MedpipeError):
    """An unknown decision rule was asked for, or a package's rule is malformed."""

    code = "bad_decision_rule"


class TuneError(MedpipeError):
    code = "tune_failed"


class NonFiniteLoss(MedpipeError):
    code = "non_finite_loss"


class PredictionError(MedpipeError):
    code = "prediction_failed"


class MetadataError(MedpipeError):
    """A patient metadata value (age, sex, site) the model cannot take; the message names the field."""

    code = "invalid_metadata"


class MetadataNotTakenError(MetadataError):
    """Metadata sent to a model trained on the image only (a client may resend the image alone)."""

    code = "metadata_not_taken"


class TrainingInterrupted(MedpipeError):
    """Training stopped on a signal after saving a checkpoint; the message says how to continue."""

    code = "interrupted"
    prefix = ""


class ImageError(MedpipeError, ValueError):
    """The bytes are not an image medpipe will use (``reason`` says why, ``name`` is the file if known)."""

    code = "invalid_image"

    def __init__(self, reason: str, name: str | None = None):
        self.reason = reason
        self.name = name
        super().__init__(f"{name}: {reason}" if name else reason)


class EmptyImageError(ImageError):
    code = "empty_image"


class UnsupportedFormatError(ImageError):
    code = "unsupported_format"


class CorruptImageError(ImageError):
    code = "corrupt_image"


class ImageTooLargeError(ImageError):
    code = "image_too_large"


class DegenerateImageError(ImageError):
    code = "degenerate_image"


class DecodeBudgetError(ImageError):
    """The image is well-formed but decoding it would cost more than its budget (scans, time)."""

    code = "decode_budget_exceeded"


class UnreadableFileError(ImageError):
    code = "unreadable_file"


class HttpError(MedpipeError):
    """A refusal made at the HTTP layer: its status, a short machine code and a message naming the field."""

    def __init__(self, status: int, code: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.headers = status, code, headers or {}


# class -> (exit code, HTTP status). The nearest class in an error's MRO decides.
TABLE: dict[type, tuple[int, int]] = {
    MedpipeError: (2, 400),
    ConfigError: (2, 400),
    IngestError: (2, 400),
    PackageError: (2, 500),
    ExportError: (2, 500),
    BatchError: (2, 400),
    ShardError: (2, 400),
    StorageError: (2, 400),
    CheckpointError: (2, 400),
    QuantizeError: (2, 400),
    GateError: (2, 400),
    DecisionRuleError: (2, 400),
    TuneError: (2, 400),
    NonFiniteLoss: (2, 500),
    PredictionError: (2, 500),
    MetadataError: (2, 400),
    MetadataNotTakenError: (2, 400),
    TrainingInterrupted: (143, 503),
    ImageError: (2, 400),
    EmptyImageError: (2, 400),
    CorruptImageError: (2, 400),
    DegenerateImageError: (2, 400),
    UnreadableFileError: (2, 400),
    DecodeBudgetError: (2, 422),
    UnsupportedFormatError: (2, 415),
    ImageTooLargeError: (2, 413),
    HttpError: (2, 400),
}
INTERNAL = (1, 500)


def _row(exc: BaseException) -> tuple[int, int]:
    for cls in type(exc).__mro__:
        if cls in TABLE:
            return TABLE[cls]
    return INTERNAL


def exit_code(exc: BaseException) -> int:
    """The command-line exit code for ``exc`` (1 for anything that is not a known user error)."""
    return _row(exc)[0]


def http_status(exc: BaseException) -> int:
    """The HTTP status for ``exc``: an :class:`HttpError`'s own status, else its row (500 if unknown)."""
    if isinstance(exc, HttpError):
        return exc.status
    return _row(exc)[1]
