"""The `retro` command: a thin typer layer over the Python API, split by verb group. Each command's
signature is its interface; `retro --help` lists them in the order of the pipeline.

Command bodies import the API inside the function on purpose: those modules pull in torch, zarr and
hnswlib, and `retro --help` (or a typo) should not wait for them. Nothing else imports lazily.
"""

from __future__ import annotations

import typer

from retrocli import __version__
from retrocli.cli import db, leakage, model, retrieval
from retrocli.cli.common import RetroCommand, RetroGroup

app = typer.Typer(
    name="retro",
    cls=RetroGroup,
    help="Build and query RETRO chunk databases.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)



def _print_version(value: bool) -> None:
    if value:
        print(f"retro {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", help="Print the version and exit", is_eager=True,
                                 callback=_print_version, metavar=""),
) -> None:
    """Build and query RETRO chunk databases."""


for name, command in (
    ("chunk", db.chunk),
    ("info", db.info),
    ("verify", db.verify),
    ("train-tokenizer", db.train_tokenizer_cmd),
    ("embed", db.embed),
    ("index", db.index),
    ("build-db", db.build_db_cmd),
    ("add", db.add),
    ("remove", db.remove),
    ("compact", db.compact),
    ("neighbors", retrieval.neighbors),
    ("serve", retrieval.serve),
    ("leakage-report", leakage.leakage_report_cmd),
    ("dedupe", leakage.dedupe),
    ("train", model.train_cmd),
    ("retrofit", model.retrofit_cmd),
    ("knn-datastore", model.knn_datastore),
    ("eval", model.eval_cmd),
    ("generate", model.generate),
):
    app.command(name, cls=RetroCommand)(command)


def main() -> None:
    app()
