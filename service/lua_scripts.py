"""Lua scripts (``service/lua/<name>.lua``) and the layout of their KEYS and ARGV, named once.

Each of a script's two arrays is a head of named slots followed by any number of groups of named slots
(one group per user, per event, ...). The Python caller builds the array from its ``Layout`` by name
(``Layout.build``); the script reads it by the same names, through a prelude generated from the layout
and inserted after the script's first line (its ``#!lua`` shebang, which must stay first). For KEYS the
prelude defines

- ``KEY.<slot>``: the position of a head slot, read as ``KEYS[KEY.seq]``;
- for a group named ``user``: ``USER.<slot>`` (a slot within a group), ``USERS`` (the number of groups)
  and ``user_key(j, USER.<slot>)`` (that slot's key in group ``j``, 1-based);

and for ARGV the same with ``ARG`` and ``<group>_arg``. The slot tables raise on an unknown name, so a
misspelt slot fails the call instead of reading nil.

A script may also use libraries (``service/lua/lib_<name>.lua``: local functions shared by several
scripts), inserted after the prelude.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib.resources import files

ScriptArg = str | bytes | int | float
_LUA_NAME = re.compile(r"[a-z_][a-z0-9_]*")
_LUA_KEYWORDS = frozenset(
    {"and", "break", "do", "else", "elseif", "end", "false", "for", "function", "if", "in", "local", "nil"}
    | {"not", "or", "repeat", "return", "then", "true", "until", "while"}
)
_STRICT = (
    "local function strict(what, slots)\n"
    "  local function missing(_, name) error(what .. ' has no slot ' .. tostring(name)) end\n"
    "  return setmetatable(slots, {__index = missing})\n"
    "end\n"
)


@dataclass(frozen=True)
class Layout:
    """One array of a script: the ``head`` slots, then ``len(groups)`` repetitions of the ``group`` slots."""

    head: tuple[str, ...]
    group_name: str = ""
    group: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        names = [*self.head, *self.group, *([self.group_name] if self.group_name else [])]
        bad = [n for n in names if not _LUA_NAME.fullmatch(n) or n in _LUA_KEYWORDS]
        if bad or len(set(self.head)) != len(self.head) or len(set(self.group)) != len(self.group):
            raise ValueError(f"slot names must be distinct lower-case identifiers, got {names}")
        if bool(self.group_name) != bool(self.group):
            raise ValueError("a group needs both a name and slots")

    def build(
        self, head: Mapping[str, ScriptArg], groups: Iterable[Mapping[str, ScriptArg]] = ()
    ) -> list[ScriptArg]:
        """The array: ``head`` then each group, every mapping holding exactly the layout's slot names."""
        if head.keys() != set(self.head):
            raise ValueError(f"head slots {sorted(head)} are not the layout's {sorted(self.head)}")
        out = [head[name] for name in self.head]
        group_slots = set(self.group)
        for group in groups:
            if group.keys() != group_slots:
                raise ValueError(f"{self.group_name} slots {sorted(group)} are not the layout's {self.group}")
            out += [group[name] for name in self.group]
        return out

    def lua(self, array: str, head_table: str, accessor: str) -> str:
        """The prelude lines that name this layout's slots of ``array`` (``KEYS`` or ``ARGV``)."""
        slots = ", ".join(f"{name} = {i}" for i, name in enumerate(self.head, 1))
        lines = [f"local {head_table} = strict('{array}', {{{slots}}})"]
        if self.group:
            table, size, width = self.group_name.upper(), len(self.head), len(self.group)
            slots = ", ".join(f"{name} = {i}" for i, name in enumerate(self.group, 1))
            lines += [
                f"local {table} = strict('{array} {self.group_name} group', {{{slots}}})",
                f"local {table}S = (#{array} - {size}) / {width}",
                f"local function {self.group_name}_{accessor}(g, slot) "
                f"return {array}[{size} + {width} * (g - 1) + slot] end",
            ]
        return "\n".join(lines) + "\n"


class LuaScript:
    """A script's ``text`` with the prelude of its ``keys`` and ``args`` layouts and the ``libraries``' text
    inserted after the shebang (see the module docstring). ``RedisConnection`` registers it once per
    connection."""

    def __init__(
        self, name: str, text: str, *, keys: Layout, args: Layout, libraries: tuple[str, ...] = ()
    ) -> None:
        shebang, newline, body = text.partition("\n")
        if not shebang.startswith("#!lua") or not newline:
            raise ValueError(f"script {name}: the first line must be the #!lua shebang")
        self.name, self.keys, self.args = name, keys, args
        prelude = _STRICT + keys.lua("KEYS", "KEY", "key") + args.lua("ARGV", "ARG", "arg")
        prelude += "".join(_read(f"lib_{library}") for library in libraries)
        self.source = f"{shebang}\n{prelude}{body}"
        self.sha = hashlib.sha1(self.source.encode()).hexdigest()

    @classmethod
    def packaged(cls, name: str, *, keys: Layout, args: Layout, libraries: tuple[str, ...] = ()) -> LuaScript:
        """The script in ``service/lua/<name>.lua`` (package data, read at import)."""
        return cls(name, _read(name), keys=keys, args=args, libraries=libraries)


def _read(name: str) -> str:
    return files("service").joinpath("lua", f"{name}.lua").read_text(encoding="utf-8")
