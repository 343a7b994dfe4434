"""`nuclide completion bash`: a bash completion script written from the CLI's own parser, so it never falls behind.

It completes commands and their aliases, each command's flags, the values of flags with
choices (``-o json``), function names where a command takes one (asked from the stack with
``nuclide list -q``, by the same program the user typed), and paths for ``deploy``.
"""

from __future__ import annotations

import argparse
import shlex

# commands whose positional argument is a function's name
NAME_COMMANDS = ("get", "describe", "delete", "rm", "remove", "invoke", "logs", "scale")


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:  # argparse keeps its actions there; it has no public accessor
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _flags(parser: argparse.ArgumentParser) -> tuple[list[str], dict[str, list[str]], list[str]]:
    """(every flag, flag -> its choices, flags that take a value)."""
    flags: list[str] = []
    choices: dict[str, list[str]] = {}
    valued: list[str] = []
    for action in parser._actions:
        if not action.option_strings:
            continue
        flags += action.option_strings
        if action.nargs != 0:
            valued += action.option_strings
            if action.choices:
                for opt in action.option_strings:
                    choices[opt] = [str(c) for c in action.choices]
    return flags, choices, valued


def bash_script(parser: argparse.ArgumentParser) -> str:
    commands = _subcommands(parser)
    top_flags, _, top_valued = _flags(parser)
    cases = []
    for name, sub in commands.items():
        flags, choices, valued = _flags(sub)
        prev_cases = "".join(f"            {shlex.quote(opt)}) COMPREPLY=($(compgen -W {shlex.quote(' '.join(vals))}"
                             f" -- \"$cur\")); return;;\n" for opt, vals in choices.items())
        free = [opt for opt in valued if opt not in choices]
        if free:
            prev_cases += f"            {'|'.join(shlex.quote(o) for o in free)}) return;;\n"
        if name == "deploy":
            words = '$(compgen -f -- "$cur")'
        elif name in NAME_COMMANDS:
            words = '$(compgen -W "$("${COMP_WORDS[0]}" list -q 2>/dev/null)" -- "$cur")'
        elif name == "completion":
            words = '$(compgen -W "bash" -- "$cur")'
        elif name == "calls":
            words = '$(compgen -W "get result redrive purge" -- "$cur")'
        else:
            words = ""
        cases.append(
            f"        {shlex.quote(name)})\n"
            f"            case \"$prev\" in\n{prev_cases}            esac\n"
            f"            if [[ \"$cur\" == -* ]]; then COMPREPLY=($(compgen -W {shlex.quote(' '.join(flags))}"
            f" -- \"$cur\")); return; fi\n"
            f"            COMPREPLY=({words});;\n")
    skip = "|".join(shlex.quote(o) for o in top_valued) or "--"
    return f"""# bash completion for nuclide: source <(nuclide completion bash)
_nuclide() {{
    local cur="${{COMP_WORDS[COMP_CWORD]}}" prev="${{COMP_WORDS[COMP_CWORD-1]}}" cmd="" i
    for ((i = 1; i < COMP_CWORD; i++)); do
        case "${{COMP_WORDS[i]}}" in
            {skip}) ((i++));;
            -*) ;;
            *) cmd="${{COMP_WORDS[i]}}"; break;;
        esac
    done
    COMPREPLY=()
    if [[ -z "$cmd" ]]; then
        case "$prev" in {skip}) return;; esac
        if [[ "$cur" == -* ]]; then COMPREPLY=($(compgen -W {shlex.quote(' '.join(top_flags))} -- "$cur")); return; fi
        COMPREPLY=($(compgen -W {shlex.quote(' '.join(commands))} -- "$cur"))
        return
    fi
    case "$cmd" in
{''.join(cases)}    esac
}}
complete -F _nuclide nuclide
"""
