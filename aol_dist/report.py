"""What a user reads in the terminal: consoles and tables shared by training, eval and the CLI."""

from __future__ import annotations

from typing import Any


def make_console():
    """A rich console; 120 columns when writing to a file or pipe (rich would assume 80 and wrap tables)."""
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=120)


def attention_table(record: dict[str, Any]):
    """Mean attention weight per label set over training: which labeler the model trusts."""
    from rich.table import Table

    table = Table(title="learned attention: mean weight per label set over training")
    table.add_column("label set")
    table.add_column("mean weight", justify="right")
    for name, w in sorted(record["mean"].items(), key=lambda kv: -kv[1]):
        table.add_row(name, f"{w:.3f}")
    return table
