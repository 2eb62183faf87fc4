// The sources of retrieval-grounded answers on the chat page (llm/serve/static/chat.js) under Node's test runner;
// tests/test_chat_page.py runs it. The server side (what the chunks carry) is tested in tests/test_serve_rag.py.
"use strict";
const assert = require("node:assert/strict");
const path = require("node:path");
const {test} = require("node:test");

const chat = require(path.join(__dirname, "..", "..", "llm", "serve", "static", "chat.js"));

const PASSAGES = [
  {
    passage_id: "doc3#0",
    document_id: "doc3",
    source: "corpus.jsonl:4",
    text: "La catedral de Burgos guarda el sepulcro del Cid.",
  },
  {passage_id: "doc7#2", document_id: "doc7", source: "notas.txt", text: "Burgos está a orillas del Arlanzón."},
].map((passage, i) => ({number: i + 1, start: 0, end: passage.text.length, score: 0.9 - i / 10, ...passage}));

const sources = (cited) => PASSAGES.map((source, i) => ({...source, cited: cited ? cited[i] : null}));

// A grounded stream as the server sends it: the sources (cited null) in the first chunk, again with `cited` in the
// chunk that ends the answer; `withSources` false makes an ordinary answer's stream.
function groundedStream(pieces, cited, withSources = true) {
  const chunks = pieces.map((content) => ({choices: [{index: 0, delta: {content}, finish_reason: null}]}));
  chunks.push({choices: [{index: 0, delta: {}, finish_reason: "stop"}]});
  if (withSources) {
    chunks[0].sources = sources(null);
    chunks.at(-1).sources = sources(cited);
  }
  return chunks.map((chunk) => `data: ${JSON.stringify(chunk)}\n\n`).join("") + "data: [DONE]\n\n";
}

function server(cited = [true, false], withSources = true) {
  const bodies = [];
  const fetch = async (url, init) => {
    bodies.push(init.body);
    return new Response(groundedStream(["Guarda el sepulcro ", "del Cid [1]."], cited, withSources));
  };
  return {fetch, bodies};
}

const turn = (fetch, turns = [], onSources = () => {}) =>
  chat.completeTurn({fetch, model: "m", system: "", turns, text: "¿Qué guarda la catedral?", settings: {},
    onSources});

// Just enough of a DOM for sourcesView: elements with children, classes, dataset and textContent. Setting HTML
// throws, so a passage inserted as markup fails the test.
class FakeElement {
  constructor(tag) {
    [this.tagName, this.children, this.text, this.className, this.dataset, this.open] = [tag, [], "", "", {}, false];
  }
  append(...nodes) {
    this.children.push(...nodes);
  }
  get textContent() {
    return this.text + this.children.map((child) => child.textContent).join("");
  }
  set textContent(value) {
    [this.children, this.text] = [[], String(value)];
  }
  set innerHTML(html) {
    throw new Error(`innerHTML set to ${html}`);
  }
  insertAdjacentHTML() {
    throw new Error("insertAdjacentHTML called");
  }
  all(className) {
    const own = this.className.split(" ").includes(className) ? [this] : [];
    return [...own, ...this.children.flatMap((child) => child.all(className))];
  }
}
const doc = {createElement: (tag) => new FakeElement(tag)};

test("the sources come with the first chunk and get `cited` from the one that ends the answer", async () => {
  const seen = [];
  const result = await turn(server().fetch, [], (list) => seen.push(list));
  assert.equal(result.answer, "Guarda el sepulcro del Cid [1].");
  assert.equal(seen.length, 2);
  assert.ok(seen[0].every((source) => source.cited === null));
  assert.deepEqual(seen[1].map((source) => source.cited), [true, false]);
  assert.deepEqual(result.sources, seen[1]);

  const first = chat.sourcesView(doc, seen[0]);
  assert.match(first.textContent, /^Fuentes/);
  assert.equal(first.all("source").length, 2);
  assert.equal(first.all("source-cited").length, 0); // Not known while the answer streams.
  const last = chat.sourcesView(doc, seen[1]);
  const [one, two] = last.all("source");
  assert.equal(one.className, "source cited");
  assert.equal(two.className, "source");
  assert.deepEqual(last.all("source-cited").map((mark) => mark.textContent), ["citada"]);
  assert.equal(one.all("source-name")[0].textContent, "[1] corpus.jsonl:4 · doc3#0");
  assert.equal(two.all("source-text")[0].textContent, PASSAGES[1].text);
});

test("an answer without sources shows none", async () => {
  const seen = [];
  const result = await turn(server(null, false).fetch, [], (list) => seen.push(list));
  assert.equal(result.answer, "Guarda el sepulcro del Cid [1].");
  assert.equal(result.sources, null);
  assert.deepEqual(seen, []);
  assert.equal(chat.sourcesView(doc, result.sources), null);
  assert.equal(chat.sourcesView(doc, []), null);
});

test("the next request sends the answer's text only, never its sources", async () => {
  const first = server();
  const result = await turn(first.fetch);
  assert.ok(result.sources.length);
  const turns = chat.nextTurns([], result, "¿Qué guarda la catedral?");
  const second = server();
  await turn(second.fetch, turns);
  const body = second.bodies[0];
  assert.deepEqual(JSON.parse(body).messages, [
    {role: "user", content: "¿Qué guarda la catedral?"},
    {role: "assistant", content: "Guarda el sepulcro del Cid [1]."},
    {role: "user", content: "¿Qué guarda la catedral?"},
  ]);
  assert.doesNotMatch(body, /sources|passage_id|Arlanzón/);
});

test("a passage's text goes in as text, whatever markup it holds", () => {
  const markup = '<img src=x onerror="alert(1)"> y <b>negrita</b>';
  const source = {...PASSAGES[0], source: "<i>doc</i>.html", passage_id: "<p>", text: markup, cited: true};
  const view = chat.sourcesView(doc, [source]);
  const text = view.all("source-text")[0];
  assert.equal(text.textContent, markup);
  assert.deepEqual(text.children, []);
  assert.equal(view.all("source-name")[0].textContent, "[1] <i>doc</i>.html · <p>");
  assert.equal(view.all("source-excerpt")[0].textContent, markup);
});

test("the update with `cited` keeps open the sources the user opened", () => {
  const view = chat.sourcesView(doc, sources([false, true]), new Set([2]));
  const details = view.all("source").map((item) => item.children[0]);
  const states = details.map((d) => [d.tagName, d.dataset.number, d.open]);
  assert.deepEqual(states, [["details", "1", false], ["details", "2", true]]);
});

test("an excerpt is the passage's start, cut at a word", () => {
  assert.equal(chat.excerpt("  Corto\n  y   claro. "), "Corto y claro.");
  const long = "palabra ".repeat(40);
  const cut = chat.excerpt(long, 30);
  assert.equal(cut, "palabra palabra palabra…");
  assert.ok(cut.length <= 31);
});

test("the header says when the server has an index", () => {
  assert.equal(chat.indexText({status: "ok", index: {passages: 12345, mode: "hybrid"}}), "Con índice: 12.345 pasajes");
  assert.equal(chat.indexText({index: {passages: 1}}), "Con índice: 1 pasaje");
  assert.equal(chat.indexText({status: "ok", index: null}), "");
  assert.equal(chat.indexText({}), "");
});
