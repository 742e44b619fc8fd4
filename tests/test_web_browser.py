"""The page of `retro serve` in a real browser: Debian's chromium, headless, driven by selenium, against a real
server on 127.0.0.1 over a DB embedded with the packaged MiniLM and generating with the bundled retro-6m.

Search finds a planted passage, a generation streams and shows its neighbour trail with a highlighted copy,
corpus text holding <script> and <img onerror> renders as text, a bad request shows one readable error, and
the leakage report renders in the page. The same tests take the screenshots in docs/images when
RETRO_SCREENSHOTS names a directory (`make screenshots`).

Without chromium and chromedriver the module is skipped, and the run's summary says how to install them.
`.ci/run` installs them and sets RETRO_BROWSER_TESTS=required, which turns that skip into a failure."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from helpers import call, serving, small_corpus, tree_snapshot

BROWSER_HELP = "apt-get install chromium chromium-driver (Debian), then make test"
CHROMIUM = next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome")
                 if shutil.which(name)), None)
CHROMEDRIVER = shutil.which("chromedriver")
try:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError:
    webdriver = None

_missing = [what for what, found in (("chromium", CHROMIUM), ("chromedriver", CHROMEDRIVER),
                                     ("selenium", webdriver)) if not found]
if _missing:
    if os.environ.get("RETRO_BROWSER_TESTS") == "required":
        pytest.fail(f"browser tests are required here but {', '.join(_missing)} is missing", pytrace=False)
    pytest.skip(f"browser tests need {', '.join(_missing)}: {BROWSER_HELP}", allow_module_level=True)

pytestmark = pytest.mark.slow  # the packaged MiniLM embeds the DB
PASSAGE = ("The lighthouse keeper of Port Averill logged seventeen schooners sheltering from the equinox gale, "
           "and rationed lamp oil by the quarter pint until the supply cutter returned in late October.")
HOSTILE = "<script>window.pwned = 1</script> and <img src=x onerror=\"window.pwned = 2\"> in a document"
WAIT = 120


@pytest.fixture(scope="module")
def page_db(tmp_path_factory) -> Path:
    """The small corpus plus a planted passage and a document of markup, embedded with MiniLM, cut with
    the 8k BPE that the bundled retro-6m reads."""
    from retrocli.build_db import build_db
    from retrocli.options import ChunkOptions
    from retrocli.tokenizer import BPE_8K_NAME

    root = tmp_path_factory.mktemp("page")
    corpus = small_corpus(root)
    with corpus.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps({"id": "harbour-log", "text": PASSAGE}) + "\n")
        handle.write(json.dumps({"id": "markup", "text": f"Notes on HTML. {HOSTILE}. " * 3}) + "\n")
    build_db([corpus], root / "db", chunk_options=ChunkOptions(tokenizer=BPE_8K_NAME))
    heldout = root / "heldout.jsonl"
    lines = corpus.read_text(encoding="utf-8").splitlines()
    unrelated = "Quantum chromodynamics describes quarks and gluons; the strong force confines colour charge."
    heldout.write_text(lines[2] + "\n" + json.dumps({"text": unrelated * 4}) + "\n", encoding="utf-8")
    return root / "db"


@pytest.fixture(scope="module")
def site(page_db, tmp_path_factory):
    before = tree_snapshot(page_db)
    heldout = page_db.parent / "heldout.jsonl"
    with serving(page_db, tmp_path_factory.mktemp("site") / "stderr.log", "--test-set", f"heldout={heldout}",
                 cwd=page_db.parent) as (url, _):
        yield url
    assert tree_snapshot(page_db) == before


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,1100", "--force-device-scale-factor=1"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    os.environ.setdefault("SE_OFFLINE", "true")  # never let selenium look for a driver online
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    where = os.environ.get("RETRO_SCREENSHOTS")
    path = Path(where) if where else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


def open_view(driver, url: str, view: str) -> None:
    driver.get(f"{url}/#{view}")
    WebDriverWait(driver, WAIT).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready"))


def no_script_ran(driver) -> None:
    assert driver.execute_script("return window.pwned === undefined")
    problems = [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"
                and "the server responded with a status of 4" not in e["message"]]  # refusals tests asked for
    assert not problems, problems  # CSP violations and script errors land here


def search(driver, text: str, exclude: str = "") -> None:
    query = driver.find_element(By.ID, "query")
    query.clear()
    query.send_keys(text)
    docs = driver.find_element(By.ID, "exclude-docs")
    docs.clear()
    docs.send_keys(exclude)
    driver.find_element(By.CSS_SELECTOR, "#search-form button[type=submit]").click()


def test_search_finds_the_planted_passage_and_links_its_document(site, browser, shots):
    open_view(browser, site, "search")
    header = browser.find_element(By.ID, "db-facts").text
    assert "chunks" in header and "retro-6m" in header and "minilm" in header.lower()
    search(browser, "lighthouse keeper rationing lamp oil during the gale")
    WebDriverWait(browser, WAIT).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#search-results .neighbour"))
    first = browser.find_elements(By.CSS_SELECTOR, "#search-results .neighbour")[0]
    assert "Port Averill" in first.find_element(By.CSS_SELECTOR, ".nb-text").text
    assert "harbour-log" in first.find_element(By.CSS_SELECTOR, ".source").text
    browser.save_screenshot(str(shots / "page-search.png"))
    first.find_element(By.CSS_SELECTOR, "a.doc-link").click()
    chosen = WebDriverWait(browser, WAIT).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#doc-chunks .chosen"))
    assert "seventeen schooners" in chosen[0].text
    no_script_ran(browser)


def test_corpus_markup_renders_as_text(site, browser):
    open_view(browser, site, "search")
    search(browser, "Notes on HTML: script tags and img onerror handlers")
    WebDriverWait(browser, WAIT).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#search-results .neighbour"))
    texts = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#search-results .nb-text")]
    assert any("<script>window.pwned = 1</script>" in t and "onerror=" in t for t in texts)
    assert not browser.find_elements(By.CSS_SELECTOR, "#search-results img, #search-results script")
    link = next(card.find_element(By.CSS_SELECTOR, "a.doc-link")
                for card in browser.find_elements(By.CSS_SELECTOR, "#search-results .neighbour")
                if "<script>" in card.text)
    link.click()
    WebDriverWait(browser, WAIT).until(lambda d: "<img src=x" in d.find_element(By.ID, "doc-chunks").text)
    assert not browser.find_elements(By.CSS_SELECTOR, "#doc-chunks img, #doc-chunks script")
    no_script_ran(browser)


def test_a_generation_streams_with_its_trail_and_a_highlighted_copy(site, page_db, browser, shots):
    from retrocli.db import open_db

    db = open_db(page_db)
    ids = [int(t) for c in db.doc_chunks(1) for t in db.chunk_tokens(c)]
    prompt = db.tokenizer.decode(ids[:100])  # retro-6m continues it by copying the retrieved continuation
    open_view(browser, site, "generate")
    box = browser.find_element(By.ID, "prompt")
    browser.execute_script("arguments[0].value = arguments[1]", box, prompt)
    for field, value in (("max-new-tokens", "90"), ("temperature", "0")):
        element = browser.find_element(By.ID, field)
        element.clear()
        element.send_keys(value)
    browser.find_element(By.ID, "generate-button").click()
    WebDriverWait(browser, WAIT).until(
        lambda d: "copied span" in d.find_element(By.ID, "generate-status").text or d.find_element(By.ID, "error")
        .is_displayed())
    assert not browser.find_element(By.ID, "error").is_displayed(), browser.find_element(By.ID, "error").text
    events = browser.execute_script("return window.retroEvents")
    assert events[0] == "start" and events[-1] == "done" and events.count("text") > 10
    assert "text" in events[events.index("retrieval") + 1 : -1]  # the trail grew while the text was written
    trail = browser.find_elements(By.CSS_SELECTOR, "#trail .trail-item")
    assert len(trail) == events.count("retrieval") >= 2
    copies = browser.find_elements(By.CSS_SELECTOR, "#gen-text a.copy mark")
    assert copies and all(len(c.text) > 3 for c in copies)
    target = browser.find_element(By.ID, browser.find_elements(By.CSS_SELECTOR, "#gen-text a.copy")[-1]
                                  .get_attribute("data-target"))
    assert "copied-from" in target.get_attribute("class") and target.find_elements(By.CSS_SELECTOR, "pre mark")
    out = browser.find_element(By.ID, "gen-text").text
    status, answer = call(site, "/generate", {"prompt": prompt, "max_new_tokens": 90, "temperature": 0})
    assert out == answer["text"]  # what streamed into the page is the whole continuation
    browser.set_window_size(1280, 1900)  # the text and the first neighbours of its trail in one picture
    browser.execute_script("window.scrollTo(0, 0)")
    browser.save_screenshot(str(shots / "page-generate.png"))
    browser.set_window_size(1280, 1100)
    copies[-1].click()
    WebDriverWait(browser, 10).until(lambda d: "flash" in target.get_attribute("class"))
    no_script_ran(browser)


def test_a_bad_request_shows_one_readable_error(site, browser):
    open_view(browser, site, "search")
    search(browser, "anything at all", exclude="999999")
    error = WebDriverWait(browser, WAIT).until(
        lambda d: d.find_element(By.ID, "error") if d.find_element(By.ID, "error").is_displayed() else None)
    assert "'exclude_docs': 999999 is out of range" in error.text and "\n" not in error.text
    assert not browser.find_elements(By.CSS_SELECTOR, "#search-results .neighbour")


def test_the_leakage_report_renders_in_the_page(site, page_db, browser, shots):
    open_view(browser, site, "leakage")
    browser.find_element(By.CSS_SELECTOR, "#test-set option[value=heldout]").click()
    browser.find_element(By.ID, "leakage-button").click()
    frame = WebDriverWait(browser, WAIT).until(
        lambda d: d.find_element(By.ID, "leakage-report") if d.find_element(By.ID, "leakage-report")
        .is_displayed() else None)
    assert "test chunks leak" in browser.find_element(By.ID, "leakage-status").text
    browser.switch_to.frame(frame)
    WebDriverWait(browser, WAIT).until(lambda d: d.find_elements(By.TAG_NAME, "h1"))
    assert browser.find_element(By.TAG_NAME, "h1").text == "Test-set leakage report"
    assert browser.find_elements(By.CSS_SELECTOR, "mark")  # the leaking chunk's shared run, highlighted
    browser.switch_to.default_content()
    browser.save_screenshot(str(shots / "page-leakage.png"))
    # an uploaded file instead of a named test set: its markup is shown as text in the report
    named_report = frame.get_attribute("src")
    upload = page_db.parent / "upload.txt"
    upload.write_text(f"{PASSAGE} {HOSTILE}", encoding="utf-8")
    browser.find_element(By.CSS_SELECTOR, "#test-set option[value='']").click()
    browser.find_element(By.ID, "test-file").send_keys(str(upload))
    browser.find_element(By.ID, "leakage-button").click()
    WebDriverWait(browser, WAIT).until(lambda d: frame.get_attribute("src") != named_report
                                       or d.find_element(By.ID, "error").is_displayed())
    assert not browser.find_element(By.ID, "error").is_displayed(), browser.find_element(By.ID, "error").text
    browser.switch_to.frame(frame)
    WebDriverWait(browser, WAIT).until(lambda d: "Port Averill" in d.find_element(By.TAG_NAME, "body").text)
    assert "<img src=x" in browser.find_element(By.TAG_NAME, "body").text
    assert not browser.find_elements(By.CSS_SELECTOR, "img, script")
    browser.switch_to.default_content()
    no_script_ran(browser)


def test_the_header_follows_a_new_db_version(page_db, browser, tmp_path):
    from retrocli.remove import remove_documents

    copy = tmp_path / "db"
    shutil.copytree(page_db, copy)
    with serving(copy, tmp_path / "stderr.log", "--no-model") as (url, _):
        open_view(browser, url, "search")

        def fact(name: str) -> str:
            facts = browser.find_element(By.ID, "db-facts")
            names = [e.text for e in facts.find_elements(By.TAG_NAME, "dt")]
            return facts.find_elements(By.TAG_NAME, "dd")[names.index(name)].text

        assert fact("version") == "v1" and fact("model") == "none"  # no model: the page says so
        documents = fact("documents")
        remove_documents(copy, docs=[0])
        search(browser, "lighthouse keeper")
        WebDriverWait(browser, WAIT).until(lambda d: fact("version") == "v2")
        assert "answered from DB version 2" in browser.find_element(By.ID, "search-results").text
        assert fact("documents") == documents  # a removal keeps the numbering; the version tells it apart
