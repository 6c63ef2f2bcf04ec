"""`python -m abba_cli ...` (also what `accelerate launch -m abba_cli ...` runs)."""

from abba_cli.cli import app

app(prog_name="abba")
