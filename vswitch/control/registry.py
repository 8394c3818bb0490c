"""The command registry: every control command, its arguments and its help.

Commands are named `subsystem/verb`.  `list-commands` and `vswitchctl
help` are generated from here, so the help can never drift from the code.
A command's arguments and help may be functions, evaluated when used, for
commands whose arguments come from another registry (`port/add` from the
port types).  A streaming command (`events/subscribe`) gets a Stream and
turns its connection into a stream of lines.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Awaitable, Callable


class CommandError(ValueError):
    """A request refused with a one-line reason."""


@dataclasses.dataclass(frozen=True)
class Arg:
    name: str
    type: type                 # object: any JSON value, which the handler checks
    required: bool = False
    help: str = ""
    type_name: str = ""        # what the usage calls the type (default: the type's name)

    @property
    def shown_type(self) -> str:
        return self.type_name or self.type.__name__


class Stream:
    """What a streaming command's handler gets: `start` sends the reply that
    says the stream began, `send` one line after it."""

    async def start(self, result) -> None:
        raise NotImplementedError

    async def send(self, item) -> None:
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Command:
    name: str
    handler: Callable[..., Awaitable[Any]]
    declared_args: tuple[Arg, ...] | Callable[[], tuple[Arg, ...]]
    declared_help: str | Callable[[], str]
    changes: bool = False     # changes the switch: the server logs who asked for it
    wants_server: bool = False  # the handler also gets server=<the ControlServer>
    streams: bool = False     # the handler also gets stream=<a Stream> and owns the connection

    @property
    def args(self) -> tuple[Arg, ...]:
        return tuple(self.declared_args() if callable(self.declared_args) else self.declared_args)

    @property
    def help(self) -> str:
        return self.declared_help() if callable(self.declared_help) else self.declared_help

    @property
    def usage(self) -> str:
        parts = [self.name] + [f"{a.name}=<{a.shown_type}>" if a.required else f"[{a.name}=<{a.shown_type}>]"
                               for a in self.args]
        return " ".join(parts)

    def check_args(self, args: dict) -> dict:
        if not isinstance(args, dict):
            raise CommandError(f"{self.name}: arguments must be a JSON object")
        declared = self.args
        known = {a.name: a for a in declared}
        for key in args:
            if key not in known:
                raise CommandError(f"{self.name}: unknown argument '{key}' (usage: {self.usage})")
        out = {}
        for a in declared:
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
            if a.type is list and not isinstance(value, list):
                raise CommandError(f"{self.name}: argument '{a.name}' must be a list, not {value!r}")
            if a.type is bool and not isinstance(value, bool):
                raise CommandError(f"{self.name}: argument '{a.name}' must be true or false, not {value!r}")
            out[a.name] = value
        return out


class Registry:
    def __init__(self):
        self.commands: dict[str, Command] = {}

    def command(self, name: str, help: str | Callable[[], str], *args: Arg, changes: bool = False,
                wants_server: bool = False, streams: bool = False,
                args_from: Callable[[], tuple[Arg, ...]] | None = None):
        """Decorator: registers an async handler(switch, **args).  `args_from`
        instead of `args`: a function that gives them, called at each use."""
        def register(handler):
            if name in self.commands:
                raise ValueError(f"command {name} registered twice")
            self.commands[name] = Command(name, handler, args_from or tuple(args), help, changes, wants_server,
                                          streams)
            return handler
        return register

    def get(self, name) -> Command:
        if not isinstance(name, str) or name not in self.commands:
            raise CommandError(f"unknown command {name!r} (see list-commands)")
        return self.commands[name]

    def describe(self) -> list[dict]:
        return [{"command": c.name, "usage": c.usage, "help": c.help, **({"stream": True} if c.streams else {})}
                for c in sorted(self.commands.values(), key=lambda c: c.name)]
