"""The control pipe's commands: the one table the pipe, the command line and the loop read."""
from __future__ import annotations

import enum
from dataclasses import dataclass


class GpuArg(str, enum.Enum):
    NONE = "none"            # the command is about the host
    OPTIONAL = "optional"    # one GPU, or every GPU without one
    REQUIRED = "required"


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    gpu: GpuArg
    while_leaving: bool      # accepted while bcorch drains or stops


COMMANDS: dict[str, Command] = {c.name: c for c in (
    Command("status", "Show the host and each GPU slot (state, job, restarts, GPU health).",
            GpuArg.NONE, True),
    Command("drain", "Finish the current batch and take no more (one GPU, or all).",
            GpuArg.OPTIONAL, True),
    Command("resume", "Back to work after a drain; also clears FAILED.", GpuArg.OPTIONAL, False),
    Command("restart", "Gracefully restart one engine (drain, then start again).",
            GpuArg.REQUIRED, False),
    Command("stop", "The whole host drains and bcorch exits.", GpuArg.NONE, True),
)}


def usage_line(command: Command) -> str:
    gpu = {GpuArg.NONE: "", GpuArg.OPTIONAL: " [--gpu N]", GpuArg.REQUIRED: " --gpu N"}
    return f"bcorch {command.name}{gpu[command.gpu]}"
