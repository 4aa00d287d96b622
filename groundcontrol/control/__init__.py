"""The control shell (``ssh ctl@groundcontrol``): fleet administration over SSH."""

from groundcontrol.control import (
    audit_commands,  # noqa: F401  (registers its command)
    request_commands,  # noqa: F401  (registers its command)
    session_commands,  # noqa: F401  (registers its commands)
)
from groundcontrol.control.channel import ControlChannel
from groundcontrol.control.commands import COMMANDS, CommandResult, ControlContext, runCommand

__all__ = ["COMMANDS", "CommandResult", "ControlChannel", "ControlContext", "runCommand"]
