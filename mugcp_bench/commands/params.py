"""Click parameter types shared by every command, so an option means the same everywhere: id lists (`--seeds 1-3`,
`--shots 1,2,4`) and name lists (`--methods`, `--datasets`; checked against their registry where the command runs
them). A bad value is one line naming the option, exit 2."""

from __future__ import annotations

import click

from mugcp_bench.errors import UserError
from mugcp_bench.runs.options import parse_ints, parse_names


class IdList(click.ParamType):
    """'1,2,3' or '1-3' (or a mix: '1-3,7') -> a comma-separated string of the same ids, validated; the value stays a
    string so it passes through to `run_sweep` and is shown as typed in --help."""

    name = "ids"

    def __init__(self, positive: bool = False) -> None:
        self.positive = positive

    def convert(self, value, param, ctx):
        if value is None or isinstance(value, tuple):
            return value
        what = param.name if param is not None else "values"
        try:
            ids = parse_ints(str(value), param.name if param is not None else "ids")
        except UserError as e:
            self.fail(str(e).replace(f"--{param.name if param else 'ids'} ", ""), param, ctx)
        if ids is None:  # '': left to the command, which says what it needs
            return value
        if any(i < (1 if self.positive else 0) for i in ids):
            self.fail(f"{what} must be {'positive' if self.positive else '>= 0'}, got {value}", param, ctx)
        return ",".join(str(i) for i in ids)


class NameList(click.ParamType):
    """'a,b' -> 'a,b' (blanks dropped). With `registry`, every name (or alias, or a wildcard matching one) must be
    registered: an unknown one is refused with a did-you-mean before anything starts."""

    name = "names"

    def __init__(self, registry=None, extra: tuple[str, ...] = ()) -> None:
        self.registry = registry
        self.extra = extra  # other accepted words (e.g. "all")

    def convert(self, value, param, ctx):
        if value is None:
            return None
        names = parse_names(str(value))
        if self.registry is not None:
            for n in names:
                if n.lower() in self.extra or "*" in n or "?" in n:
                    continue
                self.registry.check_name(n)  # UserError with a did-you-mean (no plugin imported): one line, exit 2
        return ",".join(names)


def ids(positive: bool = False) -> IdList:
    return IdList(positive)


__all__ = ["IdList", "NameList", "ids"]
