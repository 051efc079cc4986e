"""Write docs/cli.md, the command-line reference, from the commands' own --help.

    python docs/make_cli_reference.py           # rewrite docs/cli.md
    python docs/make_cli_reference.py --check   # exit 1 if docs/cli.md is out of date

Every command and subcommand of `charrnn` is included, in the order `charrnn --help` lists them,
rendered as on an 80-column terminal, whatever this one is. tests/test_cli_reference.py fails when the file
differs from what this script writes, so a new option means running this script once.
"""

from __future__ import annotations

import os
import sys

import click

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "cli.md")
WIDTH = 78  # what --help prints on an 80-column terminal
COMMAND = "python docs/make_cli_reference.py"


def _sections(cmd: click.Command, ctx: click.Context):
    yield ctx.command_path, cmd.get_help(ctx)
    if isinstance(cmd, click.Group):
        for name in cmd.list_commands(ctx):
            sub = cmd.get_command(ctx, name)
            if sub is None or sub.hidden:
                continue
            yield from _sections(sub, click.Context(sub, info_name=name, parent=ctx, **sub.context_settings))


def render() -> str:
    sys.path.insert(0, os.path.dirname(HERE))  # this checkout's charrnn, when run from a clone
    from charrnn.cli import cli

    # the settings `charrnn` itself uses (-h, defaults shown), at a fixed width
    settings = {**cli.context_settings, "terminal_width": WIDTH, "max_content_width": WIDTH}
    root = click.Context(cli, info_name="charrnn", **settings)
    sections = list(_sections(cli, root))
    lines = ["# Command-line reference", "",
             f"Generated from the commands' own `--help` by `{COMMAND}`: do not edit it by hand. Every",
             "command also answers `-h`/`--help`, and `charrnn --version` prints the version.", ""]
    lines += [f"- [`{path}`](#{path.replace(' ', '-')})" for path, _ in sections]
    for path, text in sections:
        lines += ["", f"## {path}", "", "```text", text.rstrip(), "```"]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if argv[1:] == ["--check"]:
        with open(OUT, encoding="utf-8") as f:
            if f.read() != text:
                print(f"docs/cli.md is out of date: run `{COMMAND}`", file=sys.stderr)
                return 1
        return 0
    with open(OUT, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"wrote {os.path.relpath(OUT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
