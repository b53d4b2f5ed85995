"""The wire protocol shared by the manager and the engines.

This package is the one definition both sides import (DESIGN.md §3): job states,
the batch message, id validation and the process exit codes. It depends on the
standard library only, so the manager can import it without pulling in engine code.
"""
from __future__ import annotations

import enum
import re
import secrets
from dataclasses import dataclass, field
from typing import Any, Mapping

DEFAULT_PORT = 40765
MAX_BATCH_SIZE = 10_000

EXIT_OK = 0
EXIT_PROTOCOL = 75      # manager unreachable or lease lost (EX_TEMPFAIL)
EXIT_CONFIG = 78        # configuration error, do not restart (EX_CONFIG)

_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")

# A job id is the lease's capability (DESIGN.md §3): whoever knows it can keep the lease
# alive or complete the job. It carries JOB_ID_RANDOM_BITS random bits; status, metrics
# and logs show only its first JOB_ID_SHOWN characters, which leave at least 64 of them
# unknown (the sequence number and at most 16 random bits are shown).
JOB_ID_RANDOM_BITS = 80
JOB_ID_SHOWN = 12

# Optional request field (turn 2): the engine's runner is `simulate`. A manager that was
# not started for simulation (manager.allow_simulated) refuses such an engine with
# CONFIG_REFUSED, which the engine treats as a configuration error (exit 78).
SIMULATED_FIELD = "simulated"
CONFIG_REFUSED = 403


# Optional /completed fields (turn 3): the engine's pace, for batches sized by work
# (manager.batching). `rate` is work units (bytes of the batch's files) per second of
# basecalling; `startup_s` is the batch's time that was not basecalling (asking, lease,
# process start, model loading). An engine that sends neither is sized by file count.
RATE_FIELD = "rate"
STARTUP_FIELD = "startup_s"
MAX_PACE_VALUE = 1e15


def parse_pace_value(value: object, what: str) -> float:
    """A non-negative finite number (JSON number, or a decimal string in a query)."""
    if isinstance(value, bool):
        raise ProtocolError(f"{what} must be a non-negative number, got {value!r}")
    try:
        number = float(value) if isinstance(value, (int, float, str)) else None
    except ValueError:
        number = None
    if number is None or not 0 <= number <= MAX_PACE_VALUE:
        raise ProtocolError(f"{what} must be a non-negative number, got {str(value)[:40]!r}")
    return number


# Optional /completed fields (issue 16): the reads a DONE batch wrote, as the engine's output
# check counted them (records in the job's pass/ and fail/ folders: what the manager merges).
# Sent together; an engine that sends neither (the original) leaves its batch's reads
# unknown, which the manager shows as unknown, never as 0.
READS_PASS_FIELD = "reads_pass"
READS_FAIL_FIELD = "reads_fail"
READ_FIELDS = (READS_PASS_FIELD, READS_FAIL_FIELD)
MAX_READ_COUNT = 10**12


def parse_read_count(value: object, what: str) -> int:
    """A read count: a non-negative JSON integer, or decimal digits in a query."""
    if isinstance(value, int) and not isinstance(value, bool):
        number: int | None = value
    elif isinstance(value, str) and re.fullmatch(r"[0-9]{1,13}", value.strip()):
        number = int(value.strip())
    else:
        number = None
    if number is None or not 0 <= number <= MAX_READ_COUNT:
        raise ProtocolError(f"{what} must be a non-negative integer (reads), "
                            f"got {str(value)[:40]!r}")
    return number


def new_job_id(seq: int) -> str:
    """j<sequence>-<80 random bits in hex>: ordered for people, unguessable for others."""
    return f"j{seq:06d}-{secrets.token_hex(JOB_ID_RANDOM_BITS // 8)}"


def short_job_id(job_id: str) -> str:
    """What status, metrics and logs show of a job id (never the whole capability)."""
    return job_id[:JOB_ID_SHOWN]


def parse_flag(value: object, what: str) -> bool:
    """A boolean field: JSON true/false, or in a query string 1/0, true/false, yes/no."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes"):
        return True
    if text in ("0", "false", "no", ""):
        return False
    raise ProtocolError(f"{what} must be true or false, got {str(value)[:40]!r}")


class ProtocolError(ValueError):
    """A message that does not follow the protocol; str() is a one-line reason."""


class JobState(str, enum.Enum):
    STARTED = "STARTED"
    PROCESSING = "PROCESSING"
    DONE = "DONE"
    FAILED = "FAILED"
    STOPPED = "STOPPED"

    @property
    def final(self) -> bool:
        return self in FINAL_STATES


FINAL_STATES = frozenset({JobState.DONE, JobState.FAILED, JobState.STOPPED})


def is_valid_id(value: object) -> bool:
    """Engine and job ids end up in directory names: short, no separators."""
    return (isinstance(value, str) and _ID_RE.fullmatch(value) is not None
            and value not in (".", ".."))


def validate_id(value: object, what: str) -> str:
    if not is_valid_id(value):
        raise ProtocolError(f"{what} must match [A-Za-z0-9._-]{{1,64}}, got {str(value)[:80]!r}")
    return value  # type: ignore[return-value]


def validate_dir_name(value: object, what: str) -> str:
    """A name sent by the manager that the engine joins to a path: one component, never '..'."""
    if (not isinstance(value, str) or not value or len(value) > 255
            or any(c in value for c in "/\\\0") or ".." in value or value == "."):
        raise ProtocolError(f"{what} must be a plain directory name without '/' or '..', "
                            f"got {str(value)[:80]!r}")
    return value


def validate_file_name(value: object, what: str) -> str:
    """A batch entry: the name of one symlink in the job's input dir (flat, no traversal)."""
    return validate_dir_name(value, what)


def parse_job_state(value: object, allowed: frozenset[JobState] | None = None) -> JobState:
    try:
        state = JobState(value)
    except ValueError:
        raise ProtocolError(f"job_state must be one of {', '.join(s.value for s in JobState)}, "
                            f"got {str(value)[:40]!r}") from None
    if allowed is not None and state not in allowed:
        raise ProtocolError(f"job_state must be one of {', '.join(sorted(s.value for s in allowed))}, "
                            f"got {state.value}")
    return state


@dataclass(frozen=True)
class Batch:
    """The answer to /assignwork. An empty batch has batch_size 0 and no job id."""

    jobid: str
    job_input_dir: str
    job_output_dir: str
    bc_engine_id: str
    batch: tuple[str, ...]
    report_back_interval: float
    input_closed: bool | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    # Extension: the manager's INPUT_DIR / OUTPUT_DIR (absolute, as the manager host sees
    # them), so an engine on a host with the same mounts needs no directories configured.
    input_root: str = ""
    output_root: str = ""
    # Facility mode (issue 13): the run the batch belongs to and its settings. The
    # directories are relative to the shared input and output roots; the engine resolves
    # input_dir / run_input_dir / job_input_dir. Sent only by a facility: a single-run
    # manager's answer has none of them.
    run_id: str = ""
    run_input_dir: str = ""
    run_output_dir: str = ""
    model: str = ""
    kit: str = ""
    emit: str = ""

    @property
    def batch_size(self) -> int:
        return len(self.batch)

    @property
    def empty(self) -> bool:
        return not self.batch

    def to_dict(self) -> dict[str, Any]:
        answer: dict[str, Any] = {
            "jobid": self.jobid,
            "job_input_dir": self.job_input_dir,
            "job_output_dir": self.job_output_dir,
            "bc_engine_id": self.bc_engine_id,
            "batch_size": self.batch_size,
            "batch": list(self.batch),
            "report_back_interval": self.report_back_interval,
        }
        if self.input_closed is not None:
            answer["input_closed"] = self.input_closed
        for key in ("input_root", "output_root") + RUN_FIELDS:
            if getattr(self, key):
                answer[key] = getattr(self, key)
        return answer

    @classmethod
    def empty_answer(cls, engine_id: str, report_back_interval: float,
                     input_closed: bool) -> "Batch":
        return cls("", "", "", engine_id, (), report_back_interval, input_closed)

    @classmethod
    def from_answer(cls, answer: object) -> "Batch":
        """Parse and validate an /assignwork answer (ours or the original manager's)."""
        if not isinstance(answer, Mapping):
            raise ProtocolError(f"/assignwork answer must be a JSON object, got {type(answer).__name__}")
        try:
            size = answer["batch_size"]
        except KeyError:
            raise ProtocolError("/assignwork answer has no batch_size") from None
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ProtocolError(f"/assignwork batch_size must be a non-negative integer, got {size!r}")
        interval = answer.get("report_back_interval", 0) if size == 0 else _require(answer, "report_back_interval")
        if not isinstance(interval, (int, float)) or isinstance(interval, bool) or interval < 0:
            raise ProtocolError(f"/assignwork report_back_interval must be a number of seconds, got {interval!r}")
        closed = answer.get("input_closed")
        if closed is not None and not isinstance(closed, bool):
            raise ProtocolError(f"/assignwork input_closed must be a boolean, got {closed!r}")
        engine_id = answer.get("bc_engine_id", "")
        if size == 0:
            return cls.empty_answer(str(engine_id), float(interval), closed)
        batch = _require(answer, "batch")
        if not isinstance(batch, list) or len(batch) != size:
            raise ProtocolError(f"/assignwork batch must be a list of {size} file names")
        files = tuple(validate_file_name(f, "batch entry") for f in batch)
        return cls(
            jobid=validate_id(_require(answer, "jobid"), "jobid"),
            job_input_dir=validate_dir_name(_require(answer, "job_input_dir"), "job_input_dir"),
            job_output_dir=validate_dir_name(_require(answer, "job_output_dir"), "job_output_dir"),
            bc_engine_id=str(engine_id),
            batch=files,
            report_back_interval=float(interval),
            input_closed=closed,
            input_root=_root(answer, "input_root"),
            output_root=_root(answer, "output_root"),
            **run_fields(answer),
        )


RUN_FIELDS = ("run_id", "run_input_dir", "run_output_dir", "model", "kit", "emit")
EMIT_FORMATS = ("fastq", "bam")
MODEL_RE = re.compile(r"[A-Za-z0-9._@,/-]{1,200}")
KIT_RE = re.compile(r"[A-Za-z0-9._-]{1,100}")
MAX_REL_PATH = 4096


def validate_rel_path(value: object, what: str) -> str:
    """A directory relative to a shared root: no leading '/', no '..' or '.', no empty part."""
    if (not isinstance(value, str) or not value or len(value) > MAX_REL_PATH
            or value.startswith("/") or "\0" in value or "\\" in value
            or any(part in ("", ".", "..") for part in value.split("/"))):
        raise ProtocolError(f"{what} must be a relative path without '..', '.' or empty parts, "
                            f"got {str(value)[:80]!r}")
    return value


def validate_model(value: object, what: str = "model") -> str:
    """A dorado model complex or name, e.g. "sup,5mCG_5hmCG" or "hac@v5.0.0"."""
    if (not isinstance(value, str) or not MODEL_RE.fullmatch(value) or ".." in value
            or value.startswith("-")):
        raise ProtocolError(f"{what} must match [A-Za-z0-9._@,/-]{{1,200}}, not start with '-' "
                            f"and hold no '..', got {str(value)[:80]!r}")
    return value


def validate_kit(value: object, what: str = "kit") -> str:
    """A sequencing kit name for --kit-name, e.g. "SQK-NBD114-24"."""
    if not isinstance(value, str) or not KIT_RE.fullmatch(value) or value.startswith("-"):
        raise ProtocolError(f"{what} must match [A-Za-z0-9._-]{{1,100}} and not start with '-', "
                            f"got {str(value)[:80]!r}")
    return value


def validate_emit(value: object, what: str = "emit") -> str:
    if value not in EMIT_FORMATS:
        raise ProtocolError(f"{what} must be one of {', '.join(EMIT_FORMATS)}, "
                            f"got {str(value)[:40]!r}")
    return value  # type: ignore[return-value]


_RUN_FIELD_CHECKS = {"run_id": validate_id, "run_input_dir": validate_rel_path,
                     "run_output_dir": validate_rel_path, "model": validate_model,
                     "kit": validate_kit, "emit": validate_emit}


def run_fields(answer: Mapping[str, Any]) -> dict[str, str]:
    """The facility fields of an /assignwork answer, validated ("" for those not sent)."""
    fields: dict[str, str] = {}
    for key, check in _RUN_FIELD_CHECKS.items():
        value = answer.get(key, "")
        fields[key] = "" if value == "" else check(value, f"/assignwork {key}")
    return fields


def _root(answer: Mapping[str, Any], key: str) -> str:
    value = answer.get(key, "")
    if not isinstance(value, str) or (value and (not value.startswith("/") or "\0" in value
                                                 or len(value) > 4096)):
        raise ProtocolError(f"/assignwork {key} must be an absolute path, got {str(value)[:80]!r}")
    return value


def _require(answer: Mapping[str, Any], key: str) -> Any:
    try:
        return answer[key]
    except KeyError:
        raise ProtocolError(f"/assignwork answer has no {key}") from None
