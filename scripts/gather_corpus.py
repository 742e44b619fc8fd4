#!/usr/bin/env python3
"""Build a permissively licensed English technical corpus from Debian doc packages.

The corpus is made of three documentation sets that Debian ships as plain
files, so nothing is downloaded:

* ``python3.11-doc``     reST sources (``_sources/**/*.rst.txt``), used as is.  PSF-2.0
* ``postgresql-doc-15``  DocBook HTML, converted to plain text.          PostgreSQL
* ``python-django-doc``  Sphinx HTML, converted to plain text.            BSD-3-Clause

Install them with::

    apt-get install python3.11-doc postgresql-doc-15 python-django-doc

Three modes, all deterministic (running twice gives byte-identical files):

1. Full corpus (git-ignored)::

       python3 scripts/gather_corpus.py --out examples/data
       python3 scripts/gather_corpus.py --out examples/data --sources python,django

   writes ``train.jsonl``, ``heldout.jsonl``, ``heldout_ids.txt``, ``LICENSES/``
   and ``SOURCES.md`` into ``--out``.  A document is held out iff
   ``int(sha256(id).hexdigest(), 16) % 100 < 5``, so the split depends only on
   the document id and never changes when other documents are added or removed.

2. Committed subset (small enough to live in git)::

       python3 scripts/gather_corpus.py --out examples/data --subset examples/subset

   reads the full corpus already written to ``--out`` (run mode 1 first) and
   writes ``train.jsonl`` (the whole Python tutorial plus a slice of the Python
   library reference, ~900 KB, train split only), ``heldout.jsonl`` (10-20
   held-out Python pages of 2-20 KB, ~100 KB), ``LICENSES/`` and ``SOURCES.md``
   into the ``--subset`` directory.

3. Retrieval-only extension corpus (git-ignored), from further packages::

       python3 scripts/gather_corpus.py --out examples/data --extension

   writes ``extension.jsonl`` and ``SOURCES-extension.md`` from the packages in
   ``EXTENSION_INSTALL_HINT`` (pandas, SciPy, SQLAlchemy, Node.js, scikit-learn, ...).

Each JSONL line is ``{"id", "text", "source", "license"}``; ``id`` is the file
path relative to the package's documentation root, prefixed with the package
name, e.g. ``python3.11-doc/tutorial/classes.rst.txt``.

Standard library only.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

INSTALL_HINT = "apt-get install python3.11-doc postgresql-doc-15 python-django-doc"
MIN_CHARS = 200
HELDOUT_PERCENT = 5


@dataclass(frozen=True)
class Source:
    """One Debian documentation package and how to turn it into documents."""

    name: str  # value of the "source" field
    package: str  # Debian package name, also the id prefix
    root: Path  # documentation root; ids are relative to it
    pattern: str  # glob (relative to root) selecting the documents
    kind: str  # "rst" (use text as is) or "html" (convert)
    license: str  # SPDX-style id written into each record
    license_files: tuple[Path, ...]  # copied (concatenated) into LICENSES/
    license_name: str  # file name under LICENSES/


SOURCES = {
    "python": Source(
        name="python",
        package="python3.11-doc",
        root=Path("/usr/share/doc/python3.11/html/_sources"),
        pattern="**/*.rst.txt",
        kind="rst",
        license="PSF-2.0",
        # The documentation's own licence page: PSF License Agreement (with the
        # PSF copyright notice it requires to be kept) and the Zero-Clause BSD
        # licence that covers code examples in the docs.
        license_files=(Path("/usr/share/doc/python3.11/html/_sources/license.rst.txt"),),
        license_name="PSF-2.0.txt",
    ),
    "postgresql": Source(
        name="postgresql",
        package="postgresql-doc-15",
        root=Path("/usr/share/doc/postgresql-doc-15/html"),
        pattern="*.html",
        kind="html",
        license="PostgreSQL",
        license_files=(Path("/usr/share/doc/postgresql-doc-15/copyright"),),
        license_name="PostgreSQL.txt",
    ),
    "django": Source(
        name="django",
        package="python-django-doc",
        root=Path("/usr/share/doc/python-django-doc/html"),
        pattern="**/*.html",
        kind="html",
        license="BSD-3-Clause",
        license_files=(Path("/usr/share/doc/python-django-doc/copyright"),),
        license_name="BSD-3-Clause-Django.txt",
    ),
}


def _sphinx(name: str, package: str, license: str, license_name: str, root: str | None = None) -> Source:
    """A Sphinx HTML documentation package under /usr/share/doc/PACKAGE/html."""
    base = Path(root or f"/usr/share/doc/{package}/html")
    return Source(name=name, package=package, root=base, pattern="**/*.html", kind="html", license=license,
                  license_files=(Path(f"/usr/share/doc/{package}/copyright"),), license_name=license_name)


# Mode 3, --extension: a retrieval-only corpus several times the size of the training corpus, from other
# documentation packages under permissive licences (pandas, SciPy, SQLAlchemy, Node.js, Flask, Werkzeug,
# Jinja, Requests, scikit-learn, SymPy, Astropy, statsmodels, Sphinx, Rust). It extends a DB for the DB-size
# trend; no model trains on it.
EXTENSION_SOURCES = {
    "pandas": _sphinx("pandas", "python-pandas-doc", "BSD-3-Clause", "BSD-3-Clause-pandas.txt"),
    "scipy": _sphinx("scipy", "python-scipy-doc", "BSD-3-Clause", "BSD-3-Clause-SciPy.txt"),
    "sqlalchemy": _sphinx("sqlalchemy", "python-sqlalchemy-doc", "MIT", "MIT-SQLAlchemy.txt"),
    "nodejs": Source(name="nodejs", package="nodejs-doc", root=Path("/usr/share/doc/nodejs/api"),
                     pattern="*.html", kind="html", license="MIT",
                     license_files=(Path("/usr/share/doc/nodejs-doc/copyright"),), license_name="MIT-Node.js.txt"),
    "flask": _sphinx("flask", "python-flask-doc", "BSD-3-Clause", "BSD-3-Clause-Flask.txt"),
    "werkzeug": _sphinx("werkzeug", "python-werkzeug-doc", "BSD-3-Clause", "BSD-3-Clause-Werkzeug.txt"),
    "jinja2": _sphinx("jinja2", "python-jinja2-doc", "BSD-3-Clause", "BSD-3-Clause-Jinja.txt"),
    "requests": _sphinx("requests", "python-requests-doc", "Apache-2.0", "Apache-2.0-Requests.txt"),
    "sklearn": _sphinx("sklearn", "python-sklearn-doc", "BSD-3-Clause", "BSD-3-Clause-scikit-learn.txt"),
    "sympy": _sphinx("sympy", "python-sympy-doc", "BSD-3-Clause", "BSD-3-Clause-SymPy.txt"),
    "astropy": _sphinx("astropy", "python-astropy-doc", "BSD-3-Clause", "BSD-3-Clause-Astropy.txt"),
    "statsmodels": _sphinx("statsmodels", "python-statsmodels-doc", "BSD-3-Clause", "BSD-3-Clause-statsmodels.txt"),
    "sphinx": _sphinx("sphinx", "sphinx-doc", "BSD-2-Clause", "BSD-2-Clause-Sphinx.txt"),
    # the Rust books (mdBook) and the standard library's API pages (rustdoc)
    **{f"rust-{part}": Source(name=f"rust-{part}", package="rust-doc", root=Path("/usr/share/doc/rust-doc/html"),
                              pattern=f"{part}/**/*.html", kind="html", license="MIT OR Apache-2.0",
                              license_files=(Path("/usr/share/doc/rust-doc/copyright"),),
                              license_name="MIT-OR-Apache-2.0-Rust.txt")
       for part in ("book", "reference", "rust-by-example", "nomicon", "edition-guide", "embedded-book",
                    "rustc", "rustdoc", "std")},
}
EXTENSION_INSTALL_HINT = "apt-get install " + " ".join(dict.fromkeys(s.package for s in EXTENSION_SOURCES.values()))

# Generated pages that are lists of links, not prose.
SKIP_PAGES = {"genindex.html", "py-modindex.html", "search.html", "bookindex.html",
              "print.html", "toc.html", "404.html"}  # mdBook: the whole book on one page, its TOC
# Sphinx build output that is not documentation text.
SKIP_DIRS = {"_static", "_sources", "_modules", "_images"}


# --------------------------------------------------------------------------
# HTML -> text
# --------------------------------------------------------------------------

# Elements whose whole subtree is dropped: code, styling and navigation.
DROP_TAGS = {"script", "style", "nav", "header", "footer", "aside", "form",
             "noscript", "button", "select", "textarea", "head", "title"}
# Elements dropped by class: Sphinx/DocBook navigation, permalinks, TOCs,
# "[source]" links.  Tables of contents are link lists, not text.
DROP_CLASSES = {"navheader", "navfooter", "sphinxsidebar", "sphinxsidebarwrapper",
                "related", "footer", "headerlink", "toc", "toctree-wrapper",
                "viewcode-link", "viewcode-back", "searchbox", "breadcrumbs"}
DROP_IDS = {"sidebar", "searchbox", "hd", "ft", "global-nav"}
DROP_ROLES = {"navigation", "search", "banner", "contentinfo"}

# Elements that start a new paragraph (blank line before and after).
PARAGRAPH_TAGS = {"p", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "blockquote",
                  "table", "ul", "ol", "dl", "section", "article", "figure",
                  "hr", "caption"}
# Elements that start a new line but not a new paragraph.
LINE_TAGS = {"div", "li", "dt", "dd", "tr", "br", "figcaption"}
# Elements that never have an end tag in HTML.
VOID_TAGS = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link",
             "meta", "param", "source", "track", "wbr"}

# Where the page content lives, best candidate first.  Sphinx themes mark it
# with role="main" or class "body"; the Django theme wraps it in div#yui-main
# (its class "document" also contains the header, so it comes last);
# DocBook pages from PostgreSQL put everything in body#docContent and the
# navigation bars are removed by DROP_CLASSES; Node.js pages use div#apicontent,
# rustdoc section#main-content and mdBook div#content.
CONTAINERS = [("role", "main"), ("id", "yui-main"), ("class", "body"),
              ("id", "docContent"), ("id", "apicontent"), ("id", "main-content"),
              ("id", "content"), ("class", "document")]


def _matches(attrs: dict[str, str], key: str, value: str) -> bool:
    """Tell whether an element has attribute key=value (class is a word list)."""
    if key == "class":
        return value in attrs.get("class", "").split()
    return attrs.get(key) == value


def _is_dropped(tag: str, attrs: dict[str, str]) -> bool:
    """Tell whether an element is navigation/script junk whose subtree is skipped."""
    if tag in DROP_TAGS:
        return True
    if DROP_CLASSES & set(attrs.get("class", "").split()):
        return True
    return attrs.get("id") in DROP_IDS or attrs.get("role") in DROP_ROLES


class _ContainerFinder(HTMLParser):
    """First pass: find which CONTAINERS candidate the page has.

    A separate pass keeps the extractor simple: it only has to know which
    single element to read, instead of buffering text for every candidate.
    """

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.found: set[int] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attr_map = {k: v or "" for k, v in attrs}
        for index, (key, value) in enumerate(CONTAINERS):
            if _matches(attr_map, key, value):
                self.found.add(index)


class _TextExtractor(HTMLParser):
    """Second pass: collect readable text from inside the chosen container.

    Keeps a stack of open elements so that the container and dropped subtrees
    are left at the right end tag even when the HTML omits some end tags.
    Inline whitespace is collapsed as a browser would; <pre> text is kept
    verbatim.  Line breaks are requested lazily and only written when the
    next text arrives, so empty elements never produce blank-line runs.
    """

    def __init__(self, container: tuple[str, str] | None) -> None:
        super().__init__(convert_charrefs=True)
        self.container = container
        self.stack: list[str] = []
        self.inside_depth: int | None = None if container else 0  # None: not yet inside
        self.done = False
        self.drop_depth: int | None = None
        self.pre_depth: int | None = None
        self.pre_buffer: list[str] = []
        self.parts: list[str] = []
        self.pending_newlines = 0
        self.pending_prefix = ""
        self.at_line_start = True
        self.cells_in_row = 0

    # -- output helpers ----------------------------------------------------

    def _request_break(self, newlines: int) -> None:
        """Ask for a line (1) or paragraph (2) break before the next text."""
        self.pending_newlines = max(self.pending_newlines, newlines)

    def _write(self, text: str) -> None:
        """Append text, first flushing any pending breaks and list bullet."""
        if self.parts and self.pending_newlines:
            self.parts.append("\n" * self.pending_newlines)
            self.at_line_start = True
        self.pending_newlines = 0
        if self.pending_prefix:
            self.parts.append(self.pending_prefix)
            self.pending_prefix = ""
        self.parts.append(text)
        self.at_line_start = text.endswith("\n")

    def _active(self) -> bool:
        """True when text at this point belongs in the output."""
        return self.inside_depth is not None and not self.done and self.drop_depth is None

    # -- parser callbacks --------------------------------------------------

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attr_map = {k: v or "" for k, v in attrs}
        if tag not in VOID_TAGS:
            self.stack.append(tag)
        depth = len(self.stack)

        if self.inside_depth is None and not self.done:
            if self.container and _matches(attr_map, *self.container):
                self.inside_depth = depth
            return
        if not self._active():
            return
        if _is_dropped(tag, attr_map):
            if tag not in VOID_TAGS:
                self.drop_depth = depth
            return

        if tag == "pre":
            self._request_break(2)
            self.pre_depth = depth
            self.pre_buffer = []
        elif tag in PARAGRAPH_TAGS:
            self._request_break(2)
        elif tag in LINE_TAGS:
            self._request_break(1)
        if tag == "li":
            self.pending_prefix = "- "
        elif tag == "tr":
            self.cells_in_row = 0
        elif tag in ("td", "th"):
            if self.cells_in_row and self.pre_depth is None:
                self._write(" | ")
            self.cells_in_row += 1

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        # XHTML "<br />": treat as a start tag; VOID_TAGS keeps the stack right.
        self.handle_starttag(tag, attrs)
        if tag not in VOID_TAGS:
            self.handle_endtag(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag not in self.stack:
            return  # stray end tag
        # Pop up to and including the most recent open element with this name.
        while self.stack:
            depth = len(self.stack)
            popped = self.stack.pop()
            self._close(popped, depth)
            if popped == tag:
                break

    def _close(self, tag: str, depth: int) -> None:
        """Handle leaving one element that was open at the given depth."""
        if self.drop_depth is not None:
            if depth == self.drop_depth:
                self.drop_depth = None
            return
        if self.inside_depth is not None and depth == self.inside_depth and self.container:
            self.done = True  # only the first matching container is read
            return
        if not self._active():
            return
        if self.pre_depth is not None and depth == self.pre_depth:
            self.pre_depth = None
            text = "".join(self.pre_buffer)
            text = text[1:] if text.startswith("\n") else text  # HTML ignores it
            text = text.rstrip("\n")
            if text.strip():
                self._write(text)
            self._request_break(2)
        elif tag in PARAGRAPH_TAGS:
            self._request_break(2)
        elif tag in LINE_TAGS:
            self._request_break(1)

    def handle_data(self, data: str) -> None:
        if not self._active():
            return
        if self.pre_depth is not None:
            self.pre_buffer.append(data)
            return
        text = re.sub(r"\s+", " ", data)
        if self.at_line_start or self.pending_newlines:
            text = text.lstrip()
        if not text:
            return
        if self.parts and self.parts[-1].endswith(" ") and text.startswith(" "):
            text = text[1:]
        self._write(text)

    def text(self) -> str:
        """Return the collected text with tidy whitespace."""
        raw = "".join(self.parts)
        lines = [line.rstrip() for line in raw.split("\n")]
        joined = "\n".join(lines)
        joined = re.sub(r"\n{3,}", "\n\n", joined)
        return joined.strip() + "\n"


def html_to_text(html: str) -> str:
    """Convert one documentation page to plain text, keeping only its main content."""
    finder = _ContainerFinder()
    finder.feed(html)
    finder.close()
    # No known container: read the whole page; junk is still dropped by class.
    container = CONTAINERS[min(finder.found)] if finder.found else None
    extractor = _TextExtractor(container)
    extractor.feed(html)
    extractor.close()
    return extractor.text()


# --------------------------------------------------------------------------
# Corpus building
# --------------------------------------------------------------------------

def check_installed(sources: list[Source], hint: str = INSTALL_HINT) -> None:
    """Exit with one clear line if a documentation package is missing."""
    for source in sources:
        if not source.root.is_dir():
            sys.exit(f"error: {source.root} not found; install it with: {hint}")


def list_files(source: Source) -> list[Path]:
    """List the document files of a package, skipping generated/index pages."""
    files = []
    for path in source.root.glob(source.pattern):
        relative = path.relative_to(source.root)
        if not path.is_file() or SKIP_DIRS & set(relative.parts[:-1]):
            continue
        if source.kind == "html" and relative.name in SKIP_PAGES:
            continue
        files.append(path)
    return files


def read_documents(source: Source) -> list[dict[str, str]]:
    """Read one package into records; documents under MIN_CHARS are skipped."""
    records = []
    for path in list_files(source):
        raw = path.read_text(encoding="utf-8", errors="replace")
        text = raw if source.kind == "rst" else html_to_text(raw)
        if len(text.strip()) < MIN_CHARS:
            continue
        doc_id = f"{source.package}/{path.relative_to(source.root).as_posix()}"
        records.append({"id": doc_id, "text": text, "source": source.name,
                        "license": source.license})
    return records


def is_heldout(doc_id: str) -> bool:
    """The fixed split rule: depends only on the id, so it is stable forever."""
    digest = hashlib.sha256(doc_id.encode("utf-8")).hexdigest()
    return int(digest, 16) % 100 < HELDOUT_PERCENT


def write_jsonl(path: Path, records: list[dict[str, str]]) -> None:
    """Write one JSON object per line, in a fixed key order, UTF-8, LF endings."""
    with path.open("w", encoding="utf-8", newline="\n") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def read_jsonl(path: Path) -> list[dict[str, str]]:
    """Read a JSONL file written by write_jsonl."""
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def text_bytes(records: list[dict[str, str]]) -> int:
    """Size of the documents' text in UTF-8 bytes (what the corpus 'weighs')."""
    return sum(len(r["text"].encode("utf-8")) for r in records)


def package_version(package: str) -> str:
    """Installed Debian version of a package, or 'unknown' if dpkg can't tell."""
    try:
        result = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package],
                                capture_output=True, text=True, check=True)
        return result.stdout.strip() or "unknown"
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def copy_licenses(sources: list[Source], out_dir: Path) -> None:
    """Copy each package's licence/copyright text into out_dir/LICENSES/."""
    license_dir = out_dir / "LICENSES"
    license_dir.mkdir(parents=True, exist_ok=True)
    for source in sources:
        text = "".join(p.read_text(encoding="utf-8") for p in source.license_files)
        (license_dir / source.license_name).write_text(text, encoding="utf-8")


def sources_table(sources: list[Source], splits: dict[str, list[dict[str, str]]]) -> str:
    """Markdown table: package, version, licence, and docs/bytes per split."""
    names = list(splits)
    header = "| source | package | version | licence | licence file | " + " | ".join(
        f"{n} docs | {n} bytes" for n in names) + " |"
    rule = "|" + "---|" * (5 + 2 * len(names))
    rows = [header, rule]
    for source in sources:
        cells = [source.name, source.package, package_version(source.package),
                 source.license, f"LICENSES/{source.license_name}"]
        for name in names:
            records = [r for r in splits[name] if r["source"] == source.name]
            cells += [str(len(records)), str(text_bytes(records))]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def print_summary(splits: dict[str, list[dict[str, str]]]) -> None:
    """One line per split: documents and MB of text."""
    for name, records in splits.items():
        print(f"{name}: {len(records)} documents, {text_bytes(records) / 1e6:.2f} MB")


def build_full(sources: list[Source], out_dir: Path) -> None:
    """Mode 1: gather all documents, split them and write the full corpus."""
    check_installed(sources)
    records = []
    for source in sources:
        records.extend(read_documents(source))
    records.sort(key=lambda r: r["id"])
    splits = {"train": [r for r in records if not is_heldout(r["id"])],
              "heldout": [r for r in records if is_heldout(r["id"])]}

    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(out_dir / "train.jsonl", splits["train"])
    write_jsonl(out_dir / "heldout.jsonl", splits["heldout"])
    (out_dir / "heldout_ids.txt").write_text(
        "".join(r["id"] + "\n" for r in splits["heldout"]), encoding="utf-8")
    copy_licenses(sources, out_dir)
    sources_md = (
        "# Corpus sources\n\n"
        "Built by `scripts/gather_corpus.py` from Debian documentation packages "
        "(`apt-get install " + " ".join(s.package for s in sources) + "`).\n\n"
        "Python docs are the reST sources as shipped; PostgreSQL and Django pages are "
        "HTML converted to plain text (main content only). Documents with fewer than "
        f"{MIN_CHARS} characters are skipped.\n\n"
        f"Split: a document is held out iff `int(sha256(id).hexdigest(), 16) % 100 < "
        f"{HELDOUT_PERCENT}`; the held-out ids are listed in `heldout_ids.txt`.\n\n"
        + sources_table(sources, splits))
    (out_dir / "SOURCES.md").write_text(sources_md, encoding="utf-8")
    print_summary(splits)


def build_extension(out_dir: Path) -> None:
    """Mode 3: the retrieval-only extension corpus, extension.jsonl (no held-out split: the held-out pages
    of the main corpus stay out of every DB, and eval excludes their near-duplicates from retrieval)."""
    sources = list(EXTENSION_SOURCES.values())
    check_installed(sources, EXTENSION_INSTALL_HINT)
    records = []
    for source in sources:
        records.extend(read_documents(source))
    records.sort(key=lambda r: r["id"])
    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(out_dir / "extension.jsonl", records)
    copy_licenses(sources, out_dir)
    (out_dir / "SOURCES-extension.md").write_text(
        "# Extension corpus sources\n\n"
        "Built by `scripts/gather_corpus.py --extension` from Debian documentation packages "
        f"(`{EXTENSION_INSTALL_HINT}`), HTML pages converted to plain text (main content only; "
        f"documents under {MIN_CHARS} characters skipped). Retrieval only: added to a DB to measure how "
        "the gain from retrieval grows with the DB; no model trains on it.\n\n"
        + sources_table(sources, {"extension": records}), encoding="utf-8")
    print_summary({"extension": records})


# --------------------------------------------------------------------------
# Committed subset
# --------------------------------------------------------------------------

SUBSET_TRAIN_BUDGET = 900_000  # bytes of text in subset/train.jsonl
SUBSET_HELDOUT_BUDGET = 100_000  # bytes of text in subset/heldout.jsonl
SUBSET_HELDOUT_MAX_DOCS = 20
SUBSET_HELDOUT_MIN_DOCS = 10
MODERATE_SIZE = (2_000, 20_000)  # preferred held-out page size in bytes
DJANGO_RELEASES = re.compile(r"python-django-doc/releases/1\.[34]\.\d+\.html$")


def _size(record: dict[str, str]) -> int:
    """UTF-8 size of one record's text."""
    return len(record["text"].encode("utf-8"))


def fill_budget(candidates: list[dict[str, str]], chosen: list[dict[str, str]],
                budget: int, max_docs: int | None = None) -> None:
    """Append candidates in order, skipping any that would exceed the budget.

    First-fit in id order is deterministic and fills the budget closely,
    without letting one huge page crowd out everything after it.
    """
    total = sum(_size(r) for r in chosen)
    for record in candidates:
        if max_docs is not None and len(chosen) >= max_docs:
            break
        if total + _size(record) <= budget:
            chosen.append(record)
            total += _size(record)


def build_subset(full_dir: Path, subset_dir: Path) -> None:
    """Mode 2: cut the small committed subset out of an existing full corpus."""
    train_path, heldout_path = full_dir / "train.jsonl", full_dir / "heldout.jsonl"
    if not train_path.exists() or not heldout_path.exists():
        sys.exit(f"error: {train_path} not found; build the full corpus first: "
                 f"python3 scripts/gather_corpus.py --out {full_dir}")
    train = read_jsonl(train_path)  # already sorted by id
    heldout = read_jsonl(heldout_path)

    # Train: the whole tutorial, then library pages in id order up to the budget.
    subset_train = [r for r in train if r["id"].startswith("python3.11-doc/tutorial/")]
    library = [r for r in train if r["id"].startswith("python3.11-doc/library/")]
    fill_budget(library, subset_train, SUBSET_TRAIN_BUDGET)
    subset_train.sort(key=lambda r: r["id"])
    # Then the Django 1.3.x/1.4.x release notes, appended (the Python pages keep their line numbers): the
    # two series announced the same security fixes in the same words, so a held-out 1.3.x page has text
    # in the DB to retrieve and copy, as the demo's generation step shows.
    subset_train += [r for r in train if DJANGO_RELEASES.match(r["id"])]

    # Held out: moderate-size Python pages first, other sources only if too few.
    low, high = MODERATE_SIZE
    moderate = [r for r in heldout if low <= _size(r) <= high]
    subset_heldout: list[dict[str, str]] = []
    fill_budget([r for r in moderate if r["source"] == "python"], subset_heldout,
                SUBSET_HELDOUT_BUDGET, SUBSET_HELDOUT_MAX_DOCS)
    if len(subset_heldout) < SUBSET_HELDOUT_MIN_DOCS:
        fill_budget([r for r in moderate if r["source"] != "python"], subset_heldout,
                    SUBSET_HELDOUT_BUDGET, SUBSET_HELDOUT_MIN_DOCS)
    subset_heldout.sort(key=lambda r: r["id"])
    subset_heldout += [r for r in heldout if DJANGO_RELEASES.match(r["id"])]

    subset_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(subset_dir / "train.jsonl", subset_train)
    write_jsonl(subset_dir / "heldout.jsonl", subset_heldout)
    if (subset_dir / "LICENSES").exists():
        shutil.rmtree(subset_dir / "LICENSES")
    shutil.copytree(full_dir / "LICENSES", subset_dir / "LICENSES")

    splits = {"train": subset_train, "heldout": subset_heldout}
    used = [s for s in SOURCES.values()
            if any(r["source"] == s.name for r in subset_train + subset_heldout)]
    sources_md = (
        "# Subset sources\n\n"
        "A small, committed slice of the corpus built by `scripts/gather_corpus.py`:\n\n"
        "    python3 scripts/gather_corpus.py --out examples/data\n"
        "    python3 scripts/gather_corpus.py --out examples/data --subset examples/subset\n\n"
        "- `train.jsonl`: the whole Python tutorial (`python3.11-doc/tutorial/*`) plus "
        "Python library reference pages (`python3.11-doc/library/*`) taken in id order, "
        f"skipping any that would take the text past {SUBSET_TRAIN_BUDGET} bytes; "
        "then the Django 1.3.x and 1.4.x release notes (the two series announced the same security "
        "fixes in the same words); train split only.\n"
        f"- `heldout.jsonl`: up to {SUBSET_HELDOUT_MAX_DOCS} held-out Python pages of "
        f"{low}-{high} bytes, in id order, up to {SUBSET_HELDOUT_BUDGET} bytes of text; then the "
        "held-out Django 1.3.x and 1.4.x release notes.\n\n"
        "The split is the full corpus's: held out iff "
        f"`int(sha256(id).hexdigest(), 16) % 100 < {HELDOUT_PERCENT}`.\n\n"
        + sources_table(used, splits))
    (subset_dir / "SOURCES.md").write_text(sources_md, encoding="utf-8")
    print_summary(splits)


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse --out, --sources and --subset."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("examples/data"),
                        help="full corpus directory (default: examples/data)")
    parser.add_argument("--sources", default=",".join(SOURCES),
                        help="comma-separated subset of: " + ",".join(SOURCES))
    parser.add_argument("--subset", type=Path, metavar="DIR2",
                        help="instead of gathering, write the small subset to DIR2 "
                             "from the full corpus in --out")
    parser.add_argument("--extension", action="store_true",
                        help="instead, write the retrieval-only extension corpus to --out/extension.jsonl")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.sources.split(",") if n.strip()]
    unknown = [n for n in names if n not in SOURCES]
    if unknown or not names:
        parser.error(f"--sources: unknown source(s) {unknown}; choose from "
                     + ",".join(SOURCES))
    args.source_list = [SOURCES[n] for n in SOURCES if n in names]
    return args


def main(argv: list[str] | None = None) -> None:
    """Entry point."""
    args = parse_args(argv)
    if args.extension:
        build_extension(args.out)
    elif args.subset:
        build_subset(args.out, args.subset)
    else:
        build_full(args.source_list, args.out)


if __name__ == "__main__":
    main()
