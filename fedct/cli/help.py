"""Option panels that keep every option name whole at 80 columns.

Typer lays an option out in six columns (name, short name, --no- name, its short form,
metavar, help); with names like `--secure-aggregation --no-secure-aggregation` and a
metavar `[embedded|flower]` the help column is squeezed to a word and the names are cut.
Here one column holds the names, the --no- form and the metavar stacked, so only the help
text wraps. Usage, the command's text and each option's help come from Typer as before.
"""

from __future__ import annotations

from collections import defaultdict

import click
import typer
from rich.panel import Panel
from rich.table import Table
from rich.text import Text
from typer import rich_utils


def names_width(console_width: int) -> int:
    """`--no-secure-aggregation` and a short metavar at 80 columns; more room when wider."""
    return 26 if console_width < 100 else 34


def option_names(param: click.Parameter, ctx: click.Context, width: int) -> Text:
    """The names, the --no- form and the metavar of one option, a line each where needed."""
    if isinstance(param, click.Argument):
        names = Text(param.human_readable_name.lower(), style=rich_utils.STYLE_OPTION)
    else:
        long = [opt for opt in param.opts if opt.startswith("--")]
        short = [opt for opt in param.opts if not opt.startswith("--")]
        names = Text(", ".join(long + short), style=rich_utils.STYLE_OPTION)
        if param.secondary_opts:
            names.append("\n" + ", ".join(param.secondary_opts),
                         style=rich_utils.STYLE_NEGATIVE_OPTION)
    metavar = param.make_metavar(ctx=ctx)
    if isinstance(param, click.Argument) and metavar == param.name.upper():
        metavar = param.type.name.upper()
    if isinstance(param.type, click.types._NumberRangeBase):
        described = param.type._describe_range()
        metavar += f" [{described}]" if described else ""
    if metavar != "BOOLEAN" and not getattr(param, "is_flag", False):
        if len(metavar) > width:  # choices wrap between themselves, not inside a word
            metavar = metavar.replace("|", " | ")
        last_line = names.plain.split("\n")[-1]
        joint = " " if len(last_line) + 1 + len(metavar) <= width else "\n"
        names.append(joint + metavar, style=rich_utils.STYLE_METAVAR)
    return names


def print_panel(title: str, params: list, ctx: click.Context, console, markup_mode: str,
                marks: bool) -> None:
    """One panel; `marks` keeps a column for the required mark (when any option has one)."""
    table = Table(show_header=False, box=None, expand=True, pad_edge=False, padding=(0, 1))
    if marks:
        table.add_column(width=1, no_wrap=True)
    width = names_width(console.width)
    table.add_column(max_width=width, overflow="fold")
    table.add_column(ratio=1)
    for param in params:
        mark = [Text(rich_utils.REQUIRED_SHORT_STRING, style=rich_utils.STYLE_REQUIRED_SHORT)
                if param.required else ""] if marks else []
        table.add_row(*mark, option_names(param, ctx, width), rich_utils._get_parameter_help(
            param=param, ctx=ctx, markup_mode=markup_mode))
    console.print(Panel(table, border_style=rich_utils.STYLE_OPTIONS_PANEL_BORDER, title=title,
                        title_align=rich_utils.ALIGN_OPTIONS_PANEL))


class FedctCommand(typer.core.TyperCommand):
    """A command whose help prints arguments and options in fedct's panels."""

    def format_help(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        console = rich_utils._get_rich_console()
        console.print(rich_utils.Padding(rich_utils.highlighter(self.get_usage(ctx)), 1),
                      style=rich_utils.STYLE_USAGE_COMMAND)
        if self.help:
            console.print(rich_utils.Padding(rich_utils.Align(rich_utils._get_help_text(
                obj=self, markup_mode=self.rich_markup_mode), pad=False),
                (0, 1, 1, 1)))
        panels: dict[str, list] = defaultdict(list)
        for param in self.get_params(ctx):
            if getattr(param, "hidden", False):
                continue
            default = rich_utils.ARGUMENTS_PANEL_TITLE if isinstance(param, click.Argument) \
                else rich_utils.OPTIONS_PANEL_TITLE
            panels[getattr(param, "rich_help_panel", None) or default].append(param)
        marks = any(param.required for group in panels.values() for param in group)
        for title, params in sorted(panels.items(), key=lambda item: (
                item[0] != rich_utils.ARGUMENTS_PANEL_TITLE,
                item[0] != rich_utils.OPTIONS_PANEL_TITLE)):
            print_panel(title, params, ctx, console, self.rich_markup_mode, marks)
        if self.epilog:
            console.print(rich_utils.Padding(rich_utils.Align(rich_utils.highlighter(
                self.epilog), pad=False), 1))
