"""The `retro` command: a thin typer layer over the Python API, split by verb group. Each command's
signature is its interface; `retro --help` lists them in the order of the pipeline.

Command bodies import the API inside the function on purpose: those modules pull in torch, zarr and
hnswlib, and `retro --help` (or a typo) should not wait for them. Nothing else imports lazily.
"""

from __future__ import annotations

import typer

from retrocli.cli import db, leakage, model, retrieval

app = typer.Typer(
    name="retro",
    help="Build and query RETRO chunk databases.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

for name, command in (
    ("chunk", db.chunk),
    ("info", db.info),
    ("train-tokenizer", db.train_tokenizer_cmd),
    ("embed", db.embed),
    ("index", db.index),
    ("build-db", db.build_db_cmd),
    ("neighbors", retrieval.neighbors),
    ("leakage-report", leakage.leakage_report_cmd),
    ("dedupe", leakage.dedupe),
    ("train", model.train_cmd),
    ("eval", model.eval_cmd),
    ("generate", model.generate),
):
    app.command(name)(command)


def main() -> None:
    app()
