"""The command registry: every control command, its arguments and its help.

Commands are named `subsystem/verb`.  `list-commands` and `vswitchctl
help` are generated from here, so the help can never drift from the code.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Awaitable, Callable


class CommandError(ValueError):
    """A request refused with a one-line reason."""


@dataclasses.dataclass(frozen=True)
class Arg:
    name: str
    type: type
    required: bool = False
    help: str = ""


@dataclasses.dataclass(frozen=True)
class Command:
    name: str
    handler: Callable[..., Awaitable[Any]]
    args: tuple[Arg, ...]
    help: str
    changes: bool = False     # changes the switch: the server logs who asked for it
    wants_server: bool = False  # the handler also gets server=<the ControlServer>

    @property
    def usage(self) -> str:
        parts = [self.name] + [f"{a.name}=<{a.type.__name__}>" if a.required else f"[{a.name}=<{a.type.__name__}>]"
                               for a in self.args]
        return " ".join(parts)

    def check_args(self, args: dict) -> dict:
        if not isinstance(args, dict):
            raise CommandError(f"{self.name}: arguments must be a JSON object")
        known = {a.name: a for a in self.args}
        for key in args:
            if key not in known:
                raise CommandError(f"{self.name}: unknown argument '{key}' (usage: {self.usage})")
        out = {}
        for a in self.args:
            if a.name not in args or args[a.name] is None:
                if a.required:
                    raise CommandError(f"{self.name}: missing argument '{a.name}' (usage: {self.usage})")
                continue
            value = args[a.name]
            if a.type is int and (isinstance(value, bool) or not isinstance(value, int)):
                raise CommandError(f"{self.name}: argument '{a.name}' must be a whole number, not {value!r}")
            if a.type is str and not isinstance(value, str):
                raise CommandError(f"{self.name}: argument '{a.name}' must be a string, not {value!r}")
            if a.type is dict and not isinstance(value, dict):
                raise CommandError(f"{self.name}: argument '{a.name}' must be an object, not {value!r}")
            if a.type is bool and not isinstance(value, bool):
                raise CommandError(f"{self.name}: argument '{a.name}' must be true or false, not {value!r}")
            out[a.name] = value
        return out


class Registry:
    def __init__(self):
        self.commands: dict[str, Command] = {}

    def command(self, name: str, help: str, *args: Arg, changes: bool = False, wants_server: bool = False):
        """Decorator: registers an async handler(switch, **args)."""
        def register(handler):
            if name in self.commands:
                raise ValueError(f"command {name} registered twice")
            self.commands[name] = Command(name, handler, tuple(args), help, changes, wants_server)
            return handler
        return register

    def get(self, name) -> Command:
        if not isinstance(name, str) or name not in self.commands:
            raise CommandError(f"unknown command {name!r} (see list-commands)")
        return self.commands[name]

    def describe(self) -> list[dict]:
        return [{"command": c.name, "usage": c.usage, "help": c.help}
                for c in sorted(self.commands.values(), key=lambda c: c.name)]
