// The page of `retro serve`: it reads only the server's JSON API, and writes every piece of corpus text or
// user input into the page as text (textContent), never as markup: a corpus is untrusted input.
"use strict";

const $ = (id) => document.getElementById(id);
let info = null;

// An element with attributes and children; strings become text nodes.
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key === "dataset") Object.assign(node.dataset, value);
    else node.setAttribute(key, value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(typeof child === "string" || typeof child === "number" ? document.createTextNode(String(child)) : child);
  }
  return node;
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

// POST or GET the JSON API; a refusal becomes the server's one-line error.
async function api(path, body) {
  let response;
  try {
    response = await fetch(path, body === undefined ? {} : {
      method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body),
    });
  } catch (err) {
    throw new Error("the server cannot be reached (" + err.message + ")");
  }
  let data;
  try {
    data = await response.json();
  } catch (err) {
    throw new Error(`the server answered ${response.status} without JSON`);
  }
  if (!response.ok) throw new Error(data.error || `the server answered ${response.status}`);
  return data;
}

function docLink(doc, chunk, label) {
  const link = el("a", {href: `#doc=${doc}&chunk=${chunk}`, class: "doc-link"}, label);
  return link;
}

// One neighbour: its chunk [N] and continuation [F] side by side, with distance and document.
function neighbourCard(nb, rank, id) {
  return el("div", {class: "neighbour", id: id || ""},
    el("div", {class: "nb-head"},
      el("span", {class: "rank"}, `#${rank + 1}`),
      el("span", {class: "dist"}, `d = ${nb.distance.toFixed(3)}`),
      docLink(nb.doc, nb.id, `doc ${nb.doc}`),
      el("span", {class: "source"}, `${nb.source} · chunk ${nb.id}`)),
    el("div", {class: "pair"},
      el("div", {}, el("div", {class: "label"}, "[N] neighbour"), el("pre", {class: "nb-text"}, nb.text)),
      el("div", {}, el("div", {class: "label"}, "[F] continuation"),
        nb.continuation === null
          ? el("pre", {class: "nb-cont muted"}, "(end of document)")
          : el("pre", {class: "nb-cont"}, nb.continuation))));
}

// -- header ------------------------------------------------------------------------------------------
function fact(name, value) {
  return [el("dt", {}, name), el("dd", {}, value)];
}

// The header's facts; shown again whenever an answer comes from a newer DB version (`retro add` meanwhile).
function showFacts() {
  $("db-name").textContent = info.db;
  const facts = $("db-facts");
  facts.replaceChildren(
    ...fact("version", `v${info.version}`),
    ...fact("chunks", info.chunks.toLocaleString("en")),
    ...fact("documents", info.documents.toLocaleString("en")),
    ...fact("chunk size", `${info.chunk_size} tokens`),
    ...fact("tokenizer", `${info.tokenizer_sha256.slice(0, 12)} (${info.vocab_size.toLocaleString("en")} tokens)`),
    ...fact("embedder", info.embedder),
    ...fact("model", info.model ? `${info.model.name} (${info.model.num_neighbors} neighbours)` : "none"));
}

async function followVersion(version) {
  if (!info || version === info.version) return;
  try {
    info = await api("/info");
    showFacts();
  } catch (err) { /* the answer itself was fine: keep the old header */ }
}

async function loadInfo() {
  info = await api("/info");
  showFacts();
  $("search-k").max = info.max_k;
  $("gen-k").max = info.max_k;
  $("leakage-k").max = info.max_k;
  const d = info.defaults;
  $("max-new-tokens").value = d.max_new_tokens;
  $("max-new-tokens").max = info.max_new_tokens;
  $("temperature").value = d.temperature;
  $("top-k").value = d.top_k;
  $("seed").value = d.seed;
  $("gen-k").value = info.model ? info.model.num_neighbors : 2;
  $("leakage-k").value = Math.min(d.leakage_k, info.max_k);
  $("alpha").value = d.alpha;
  $("examples").value = d.examples;
  if (!info.model) {
    $("no-model").textContent = `No generation on this server: ${info.model_note}.`;
    $("no-model").hidden = false;
    $("generate-button").disabled = true;
  }
  const select = $("test-set");
  for (const name of info.test_sets) select.append(el("option", {value: name}, name));
}

// -- views -------------------------------------------------------------------------------------------
function route() {
  const hash = location.hash.slice(1) || "search";
  const params = new URLSearchParams(hash.includes("=") ? hash : "");
  const view = params.has("doc") ? "doc" : hash;
  for (const section of document.querySelectorAll(".view")) section.hidden = section.id !== `view-${view}`;
  if (!document.querySelector(".view:not([hidden])")) $("view-search").hidden = false;
  for (const link of document.querySelectorAll("nav a")) link.classList.toggle("active", link.dataset.view === view);
  if (view === "doc") showDocument(params.get("doc"), params.get("chunk"));
}

// -- search ------------------------------------------------------------------------------------------
function parseDocs(text) {
  const parts = text.split(/[\s,]+/).filter(Boolean);
  for (const part of parts) if (!/^\d+$/.test(part)) throw new Error(`exclude documents: '${part}' is not a document number`);
  return parts.map(Number);
}

async function search(event) {
  event.preventDefault();
  showError("");
  const results = $("search-results");
  try {
    const body = {texts: [$("query").value], k: Number($("search-k").value)};
    const docs = parseDocs($("exclude-docs").value);
    if (docs.length) body.exclude_docs = docs;
    if ($("exclude-same-doc").checked) body.exclude_same_doc = true;
    results.replaceChildren(el("p", {class: "muted"}, "searching…"));
    const data = await api("/neighbors", body);
    results.replaceChildren(...data.results[0].chunks.map((chunk) =>
      el("div", {class: "panel result"},
        el("h3", {}, `Query chunk ${chunk.chunk}`),
        el("pre", {class: "query-chunk"}, chunk.text),
        ...chunk.neighbors.map((nb, rank) => neighbourCard(nb, rank)))));
    results.prepend(el("p", {class: "muted"}, `answered from DB version ${data.version}`));
    followVersion(data.version);
  } catch (err) {
    results.replaceChildren();
    showError(err.message);
  }
}

// -- documents ---------------------------------------------------------------------------------------
async function showDocument(doc, chunk) {
  showError("");
  $("doc-title").textContent = `Document ${doc}`;
  $("doc-source").textContent = "";
  const holder = $("doc-chunks");
  holder.replaceChildren(el("p", {class: "muted"}, "loading…"));
  try {
    const data = await api(`/documents/${encodeURIComponent(doc)}`);
    $("doc-source").textContent = `${data.source} · ${data.chunks.length} chunks`;
    holder.replaceChildren(...data.chunks.map((c) =>
      el("span", {class: String(c.id) === chunk ? "chunk chosen" : "chunk", id: `chunk-${c.id}`,
                  title: `chunk ${c.id}`}, c.text)));
    const chosen = $(`chunk-${chunk}`);
    if (chosen) chosen.scrollIntoView({block: "center"});
  } catch (err) {
    holder.replaceChildren();
    showError(err.message);
  }
}

// -- generation --------------------------------------------------------------------------------------
let generation = null;  // the AbortController of the running generation

function numberOrNull(id) {
  const value = $(id).value.trim();
  return value === "" ? null : Number(value);
}

function trailItem(event) {
  return el("li", {class: "panel trail-item", id: `trail-c${event.chunk}`},
    el("h3", {}, `chunk ${event.chunk} complete — retrieved`),
    el("pre", {class: "query-chunk"}, event.chunk_text),
    ...event.neighbors.map((nb, rank) => neighbourCard(nb, rank, `trail-c${event.chunk}-r${rank}`)));
}

function jumpTo(id) {
  const target = $(id);
  if (!target) return;
  target.scrollIntoView({block: "center"});
  target.classList.remove("flash");
  void target.offsetWidth;  // restart the animation
  target.classList.add("flash");
}

// The finished continuation with each copied span marked and linked to the neighbour it copies.
// The server's character offsets count code points (as Python does), not UTF-16 units: slice code points.
class Chars {
  constructor(text) { this.points = Array.from(text); this.length = this.points.length; }
  slice(start, end) { return this.points.slice(start, end).join(""); }
}

function showCopies(done) {
  const out = $("gen-text");
  const text = new Chars(done.text);
  const parts = [];
  const marks = new Map();  // neighbour card -> the ranges copied from it
  let at = 0;
  for (const [number, span] of done.copies.entries()) {
    const start = Math.max(at, Math.min(span.start_char, text.length));
    const end = Math.max(start, Math.min(span.end_char, text.length));
    parts.push(text.slice(at, start));
    const target = `trail-c${span.chunk}-r${span.rank}`;
    const mark = el("a", {href: `#generate`, class: "copy", dataset: {target},
                          title: `${span.end - span.start} tokens copied from chunk ${span.neighbor_id} (${span.source}), retrieved for chunk ${span.chunk}`},
      el("mark", {}, text.slice(start, end)));
    mark.addEventListener("click", (e) => { e.preventDefault(); jumpTo(target); });
    parts.push(mark);
    const card = $(target);
    if (card) {
      card.classList.add("copied-from");
      card.querySelector(".nb-head").append(el("span", {class: "copied-badge"}, `copied ${span.end - span.start} tokens (span ${number + 1})`));
      if (!marks.has(card)) marks.set(card, []);
      marks.get(card).push(span.in_neighbor);
    }
    at = end;
  }
  parts.push(text.slice(at));
  out.replaceChildren(...parts);
  for (const [card, ranges] of marks) markInside(card, ranges);
}

// Highlight the copied tokens where they sit in the neighbour's [N] and [F]: character ranges from the server,
// several where one neighbour gave several spans.
function markInside(card, rangesList) {
  for (const [field, selector] of [["text", ".nb-text"], ["continuation", ".nb-cont"]]) {
    const pre = card.querySelector(selector);
    const ranges = rangesList.map((r) => r[field]).filter(Boolean).sort((a, b) => a[0] - b[0]);
    if (!pre || !ranges.length) continue;
    const text = new Chars(pre.textContent);
    const parts = [];
    let at = 0;
    for (const [start, end] of ranges) {
      const a = Math.max(at, start);
      if (end <= a) continue;
      parts.push(text.slice(at, a), el("mark", {}, text.slice(a, end)));
      at = end;
    }
    parts.push(text.slice(at));
    pre.replaceChildren(...parts);
  }
}

// Every event's name in arrival order, for scripts that watch the page (the browser tests do).
window.retroEvents = [];

function handleEvent(name, data, state) {
  window.retroEvents.push(name);
  if (name === "start") {
    state.start = data;
    $("generate-status").textContent = `generating with ${data.model}, ${data.k} neighbours a chunk, from DB version ${data.version}…`;
  } else if (name === "text") {
    $("gen-text").append(data.text);
  } else if (name === "retrieval") {
    $("trail").append(trailItem(data));
  } else if (name === "done") {
    state.done = true;
    followVersion(data.version);
    showCopies(data);
    const copied = data.copies.reduce((sum, s) => sum + s.end - s.start, 0);
    $("generate-status").textContent = `${data.tokens} tokens in ${data.seconds.toFixed(2)} s · `
      + `${data.copies.length} copied span${data.copies.length === 1 ? "" : "s"} (${copied} tokens) · DB version ${data.version}`;
  } else if (name === "error") {
    state.done = true;
    showError(data.error);
    $("generate-status").textContent = "stopped by an error";
  }
}

// Server-sent events from a POST: read the stream and split it into events.
async function readEvents(response, state) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, {stream: true});
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let name = "message", data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event: ")) name = line.slice(7);
        else if (line.startsWith("data: ")) data += line.slice(6);
      }
      handleEvent(name, JSON.parse(data), state);
    }
  }
}

async function startGeneration(event) {
  event.preventDefault();
  showError("");
  const body = {
    prompt: $("prompt").value,
    max_new_tokens: Number($("max-new-tokens").value),
    temperature: Number($("temperature").value),
    top_k: numberOrNull("top-k"),
    top_p: numberOrNull("top-p"),
    seed: Number($("seed").value),
    k: Number($("gen-k").value),
    retrieval: $("use-retrieval").checked,
  };
  $("gen-prompt").textContent = body.prompt;
  $("gen-text").replaceChildren();
  $("trail").replaceChildren();
  window.retroEvents = [];
  $("generate-status").textContent = "waiting for the model…";
  $("generate-button").disabled = true;
  $("stop-button").disabled = false;
  generation = new AbortController();
  const state = {done: false};
  try {
    const response = await fetch("/generate", {
      method: "POST", signal: generation.signal,
      headers: {"Content-Type": "application/json", "Accept": "text/event-stream"}, body: JSON.stringify(body),
    });
    if (!response.ok) {
      let message = `the server answered ${response.status}`;
      try { message = (await response.json()).error || message; } catch (err) { /* not JSON */ }
      throw new Error(message);
    }
    await readEvents(response, state);
    if (!state.done) throw new Error("the generation stream ended early");
  } catch (err) {
    if (err.name === "AbortError") $("generate-status").textContent = "stopped";
    else { showError(err.message); $("generate-status").textContent = ""; }
  } finally {
    generation = null;
    $("generate-button").disabled = !info || !info.model;
    $("stop-button").disabled = true;
  }
}

// -- leakage -----------------------------------------------------------------------------------------
async function runLeakage(event) {
  event.preventDefault();
  showError("");
  const frame = $("leakage-report");
  const body = {k: Number($("leakage-k").value), alpha: Number($("alpha").value), examples: Number($("examples").value)};
  try {
    const named = $("test-set").value;
    const file = $("test-file").files[0];
    if (named) body.test_set = named;
    else if (file) body.upload = {name: file.name, content: await file.text()};
    else throw new Error("choose a test set, or a .jsonl or .txt file to upload");
    $("leakage-status").textContent = "computing the report (the test set is chunked, embedded and searched)…";
    $("leakage-button").disabled = true;
    const data = await api("/leakage", body);
    const r = data.report;
    $("leakage-status").replaceChildren(
      `${r.leaking_chunks} of ${r.num_test_chunks} test chunks leak (r(C) > α = ${r.alpha}), `
      + `${r.near_duplicates.length} near-duplicate document pairs · `,
      el("a", {href: data.html, target: "_blank", rel: "noopener"}, "open the report alone"));
    frame.src = data.html;
    frame.hidden = false;
  } catch (err) {
    $("leakage-status").textContent = "";
    frame.hidden = true;
    showError(err.message);
  } finally {
    $("leakage-button").disabled = false;
  }
}

// -- start -------------------------------------------------------------------------------------------
document.addEventListener("DOMContentLoaded", async () => {
  $("search-form").addEventListener("submit", search);
  $("generate-form").addEventListener("submit", startGeneration);
  $("stop-button").addEventListener("click", () => generation && generation.abort());
  $("leakage-form").addEventListener("submit", runLeakage);
  window.addEventListener("hashchange", route);
  try {
    await loadInfo();
  } catch (err) {
    showError(err.message);
  }
  route();
  document.body.dataset.ready = "true";  // for scripts (and the browser tests) that wait for the page
});
