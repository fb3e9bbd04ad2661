#!/usr/bin/env python3
"""Man pages and bash completion generated from the programs' own parsers and configs.

Generated at package build time so that a page cannot drift from the option it documents:
an option added to an argparse parser, or a key added to a packaged TOML file, is in the
next package's page without anyone editing roff.

    scripts/manpages.py OUTDIR     # writes OUTDIR/ptmig.1 ... and OUTDIR/ptmig.bash

Runs from a checkout (the repository and protos/ on sys.path); needs no third-party
module beyond what importing the parsers needs (argparse only: the CLIs import their
heavy dependencies lazily).
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class ProgramPage:
    """A program's page, rendered from the parser `factory` ("module:function") returns."""

    name: str
    section: int
    factory: str
    files: tuple[tuple[str, str], ...] = ()
    see_also: tuple[str, ...] = ()


@dataclass(frozen=True)
class ConfigPage:
    """A config file's page, rendered from the commented file the package installs."""

    name: str
    section: int
    source: Path
    installed_as: str
    summary: str
    see_also: tuple[str, ...] = ()


PROGRAMS = (
    ProgramPage(
        "ptmig",
        1,
        "host.cli:build_parser",
        files=(("/var/lib/ptmig/journal.sqlite", "the workflow journal"),),
        see_also=("ptmigd(8)", "ptmig-agent(8)", "virsh(1)"),
    ),
    ProgramPage(
        "ptmigd",
        8,
        "host.daemon.main:build_parser",
        files=(
            ("/etc/ptmig/ptmigd.toml", "the daemon's configuration, see ptmigd.toml(5)"),
            ("/run/ptmig/ptmigd.sock", "the Coordinator gRPC API (root only)"),
            ("/var/lib/ptmig/journal.sqlite", "the workflow journal"),
        ),
        see_also=("ptmig(1)", "ptmigd.toml(5)"),
    ),
    ProgramPage(
        "ptmig-agent",
        8,
        "guest_agent.__main__:build_parser",
        files=(("/etc/ptmig/agent.toml", "the agent's configuration, see agent.toml(5)"),),
        see_also=("agent.toml(5)", "ptmig(1)"),
    ),
)

CONFIGS = (
    ConfigPage(
        "agent.toml",
        5,
        REPO / "packaging" / "agent.toml",
        "/etc/ptmig/agent.toml",
        "configuration of ptmig-agent, the in-guest agent of ptmig",
        see_also=("ptmig-agent(8)",),
    ),
    ConfigPage(
        "ptmigd.toml",
        5,
        REPO / "packaging" / "host" / "ptmigd.toml",
        "/etc/ptmig/ptmigd.toml",
        "configuration of ptmigd, the ptmig coordinator daemon",
        see_also=("ptmigd(8)",),
    ),
)


# -- roff ---------------------------------------------------------------------------


def roff(text: str) -> str:
    """`text` safe as roff body text: backslashes doubled, no line starts a request."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join(
        "\\&" + line if line.startswith((".", "'")) else line for line in text.splitlines()
    )


def _header(name: str, section: int, version: str, summary: str) -> list[str]:
    return [
        f'.TH "{name.upper()}" "{section}" "" "ptmig {version}" "ptmig"',
        ".SH NAME",
        f"{roff(name)} \\- {roff(summary)}",
    ]


def _see_also(names: tuple[str, ...]) -> list[str]:
    if not names:
        return []
    refs = [re.fullmatch(r"(.+)\((\d)\)", n) for n in names]
    return [".SH SEE ALSO", ",\n".join(f".BR {roff(m[1])} ({m[2]})" for m in refs if m)]


# -- program pages ------------------------------------------------------------------


def load_parser(factory: str) -> argparse.ArgumentParser:
    module, _, function = factory.partition(":")
    build: Callable[[], argparse.ArgumentParser] = getattr(
        importlib.import_module(module), function
    )
    return build()


def _subparsers(
    parser: argparse.ArgumentParser,
) -> Iterator[tuple[str, str, argparse.ArgumentParser]]:
    """(name, help, parser) of each sub-command, in the parser's order."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            for name, sub in action.choices.items():
                yield name, helps.get(name, ""), sub


def _option_lines(parser: argparse.ArgumentParser) -> list[str]:
    lines: list[str] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            continue
        if action.option_strings:
            metavar = (
                ""
                if action.nargs == 0
                else " "
                + (
                    action.metavar
                    or (
                        ("{" + ",".join(map(str, action.choices)) + "}")
                        if action.choices
                        else action.dest.upper()
                    )
                )
            )
            label = ", ".join(f"\\fB{roff(o)}\\fR" for o in action.option_strings)
            label += f"\\fI{roff(metavar)}\\fR" if metavar.strip() else ""
        else:
            label = f"\\fI{roff(str(action.metavar or action.dest))}\\fR"
        text = (
            (action.help or "") % {"default": action.default, "prog": parser.prog}
            if action.help
            else ""
        )
        lines += [".TP", label, roff(text) if text else ""]
    return [line for line in lines if line != ""]


def _usage(parser: argparse.ArgumentParser) -> str:
    return " ".join(parser.format_usage().removeprefix("usage:").split())


def render_program(page: ProgramPage, version: str) -> str:
    parser = load_parser(page.factory)
    description = (parser.description or page.name).replace("``", "")
    summary = description.splitlines()[0].split(": ", 1)[-1].rstrip(".")
    out = _header(page.name, page.section, version, summary)
    out += [".SH SYNOPSIS", roff(_usage(parser))]
    out += [".SH DESCRIPTION", roff(description)]
    out += [".SH OPTIONS", *_option_lines(parser)]
    commands = list(_subparsers(parser))
    if commands:
        out.append(".SH COMMANDS")
        for name, help_text, sub in commands:
            out += [f".SS {roff(name)}", roff(help_text), ".PP", roff(_usage(sub))]
            out += _option_lines(sub)
    if parser.epilog:
        title = "EXIT STATUS" if "Exit codes" in parser.epilog else "NOTES"
        body = parser.epilog.split(":", 1)[1] if title == "EXIT STATUS" else parser.epilog
        out += [f".SH {title}", ".nf", roff(body.strip("\n")), ".fi"]
    if page.files:
        out.append(".SH FILES")
        for path, what in page.files:
            out += [".TP", f"\\fI{roff(path)}\\fR", roff(what)]
    out += _see_also(page.see_also)
    return "\n".join(out) + "\n"


# -- config pages -------------------------------------------------------------------


def config_keys(path: Path) -> list[str]:
    """Every key the file sets or shows commented out, dotted by its table."""
    keys: list[str] = []
    table = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        body = line.lstrip("#").strip().split("  #", 1)[0].rstrip()
        header = re.fullmatch(r"\[\[?([\w.]+)\]\]?", body)
        if header:
            table = header[1] + "."
            continue
        setting = re.match(r"([A-Za-z_]\w*)\s*=", body)
        if setting and _is_toml(body) and table + setting[1] not in keys:
            keys.append(table + setting[1])
    return keys


def _is_toml(text: str) -> bool:
    try:
        tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return False
    return True


def render_config(page: ConfigPage, version: str) -> str:
    """The commented file as a page: comment paragraphs as text, each setting as a term."""
    out = _header(page.name, page.section, version, page.summary)
    out += [".SH SYNOPSIS", f"\\fI{roff(page.installed_as)}\\fR", ".SH DESCRIPTION"]
    lines = page.source.read_text().splitlines()
    # The file's first comment line names it; the rest is prose, settings and examples.
    setting: list[str] = []  # a setting whose value spans lines, until it parses
    for line in lines[1:]:
        stripped = line.strip()
        if setting or re.match(r"[\w.]+ = \[$", stripped):
            setting.append(line)
            if _is_toml("\n".join(setting)):
                out += [".TP", ".nf", "\\fB" + roff("\n".join(setting)) + "\\fR", ".fi"]
                setting = []
        elif not stripped:
            out.append(".PP")
        elif re.fullmatch(r"\[\[?[\w.]+\]\]?", stripped):
            out += [f".SS {roff(stripped)}"]
        elif stripped.startswith("#"):
            comment = stripped[1:].removeprefix(" ")
            out.append(
                ".nf\n" + roff(comment) + "\n.fi"
                if comment.startswith(("[", "  ")) or re.match(r"[\w.]+ = ", comment)
                else roff(comment)
            )
        else:
            out += [".TP", f"\\fB{roff(stripped)}\\fR"]
    out += [
        ".SH KEYS",
        roff("Every key, dotted by its table: " + ", ".join(config_keys(page.source)) + "."),
    ]
    out += _see_also(page.see_also)
    return "\n".join(out) + "\n"


# -- bash completion ----------------------------------------------------------------


def _options(parser: argparse.ArgumentParser) -> list[str]:
    return [o for a in parser._actions for o in a.option_strings]


def _takes_domain(parser: argparse.ArgumentParser) -> bool:
    return any(not a.option_strings and a.dest == "domain" for a in parser._actions)


def render_completion(factory: str, prog: str) -> str:
    """Verbs, options and their choices from the parser; domain names from libvirt (virsh)."""
    parser = load_parser(factory)
    commands = list(_subparsers(parser))
    parsers = [parser] + [sub for _, _, sub in commands]
    actions = [a for p in parsers for a in p._actions if a.option_strings]
    valued = sorted({o for a in actions if a.nargs != 0 for o in a.option_strings})
    choices = {
        o: " ".join(map(str, a.choices)) for a in actions if a.choices for o in a.option_strings
    }
    choice_cases = "\n".join(
        f'    {o}) COMPREPLY=($(compgen -W "{c}" -- "$cur")); return ;;'
        for o, c in sorted(choices.items())
    )
    per_command = "\n".join(
        f'    {name}) opts="{" ".join(_options(sub))}"; domain={int(_takes_domain(sub))} ;;'
        for name, _, sub in commands
    )
    function = "_" + prog.replace("-", "_")
    return f"""# bash completion for {prog}; generated from its parser by scripts/manpages.py
{function}() {{
  local cur=${{COMP_WORDS[COMP_CWORD]}} prev=${{COMP_WORDS[COMP_CWORD-1]}}
  local verbs="{" ".join(name for name, _, _ in commands)}"
  local global_opts="{" ".join(_options(parser))}"
  local valued=" {" ".join(valued)} "
  local uri="" verb="" i opts domain=0 positionals=0
  for ((i = 1; i < COMP_CWORD; i++)); do
    case ${{COMP_WORDS[i]}} in
      -c|--connect) uri=${{COMP_WORDS[i+1]}}; ((i++)) ;;
      -*) [[ $valued == *" ${{COMP_WORDS[i]}} "* ]] && ((i++)) ;;
      *) if [ -z "$verb" ]; then verb=${{COMP_WORDS[i]}}; else ((positionals++)); fi ;;
    esac
  done
  case $prev in
{choice_cases}
  esac
  [[ $valued == *" $prev "* ]] && return
  if [ -z "$verb" ]; then
    if [[ $cur == -* ]]; then COMPREPLY=($(compgen -W "$global_opts" -- "$cur"))
    else COMPREPLY=($(compgen -W "$verbs" -- "$cur")); fi
    return
  fi
  case $verb in
{per_command}
    *) return ;;
  esac
  if [[ $cur == -* ]]; then
    COMPREPLY=($(compgen -W "$opts" -- "$cur"))
  elif [ "$domain" = 1 ] && [ "$positionals" = 0 ]; then
    local names
    names=$(virsh ${{uri:+-c "$uri"}} list --all --name 2>/dev/null)
    COMPREPLY=($(compgen -W "$names" -- "$cur"))
  fi
}}
complete -F {function} {prog}
"""


# -- entry --------------------------------------------------------------------------


def project_version() -> str:
    with open(REPO / "pyproject.toml", "rb") as fh:
        version: str = tomllib.load(fh)["project"]["version"]
    return version


def write_all(outdir: Path) -> list[Path]:
    outdir.mkdir(parents=True, exist_ok=True)
    version = project_version()
    written = []
    for program in PROGRAMS:
        path = outdir / f"{program.name}.{program.section}"
        path.write_text(render_program(program, version))
        written.append(path)
    for config in CONFIGS:
        path = outdir / f"{config.name}.{config.section}"
        path.write_text(render_config(config, version))
        written.append(path)
    completion = outdir / "ptmig.bash"
    completion.write_text(render_completion(PROGRAMS[0].factory, "ptmig"))
    written.append(completion)
    return written


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: scripts/manpages.py OUTDIR", file=sys.stderr)
        return 2
    sys.path[:0] = [str(REPO), str(REPO / "protos")]
    for path in write_all(Path(argv[0])):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
