// The chat page's logic (llm/serve/static/chat.js) under Node's test runner; tests/test_chat_page.py runs it.
"use strict";
const assert = require("node:assert/strict");
const path = require("node:path");
const {test} = require("node:test");

const chat = require(path.join(__dirname, "..", "..", "llm", "serve", "static", "chat.js"));

const SYSTEM = "Eres un asistente.";
const TURNS = [
  {user: "uno", assistant: "respuesta uno"},
  {user: "dos", assistant: "respuesta dos"},
  {user: "tres", assistant: "respuesta tres"},
];

const stream = (...pieces) =>
  pieces.map((p) => `data: ${JSON.stringify({choices: [{index: 0, delta: {content: p}}]})}\n\n`).join("") +
  "data: [DONE]\n\n";
const json = (status, body, headers = {}) =>
  new Response(JSON.stringify(body), {status, headers: {"Content-Type": "application/json", ...headers}});
const contextFull = () =>
  json(400, {error: {message: "This model's maximum context length is 256 tokens.", code: "context_length_exceeded"}});

// A fake server that refuses conversations of more than `maxMessages` messages as too long for the context,
// recording every request body it gets.
function fakeServer(maxMessages) {
  const bodies = [];
  const fetch = async (url, init) => {
    assert.equal(url, "/v1/chat/completions");
    const body = JSON.parse(init.body);
    bodies.push(body);
    return body.messages.length > maxMessages ? contextFull() : new Response(stream("Ho", "la"));
  };
  return {fetch, bodies};
}

const turn = (fetch, turns = TURNS, settings = {max_tokens: 128}) =>
  chat.completeTurn({fetch, model: "m", system: SYSTEM, turns, text: "cuatro", settings});

test("a conversation that fits is sent whole, once, and the answer joins it", async () => {
  const server = fakeServer(100);
  const result = await turn(server.fetch);
  assert.equal(server.bodies.length, 1);
  assert.deepEqual(server.bodies[0].messages, chat.buildMessages(SYSTEM, TURNS, "cuatro"));
  assert.equal(server.bodies[0].messages.length, 8);
  assert.equal(result.kept, TURNS);
  assert.equal(result.answer, "Hola");
  assert.deepEqual(chat.nextTurns(TURNS, result, "cuatro"), [...TURNS, {user: "cuatro", assistant: "Hola"}]);
});

test("when the context is full the oldest turns are dropped and the system message stays", async () => {
  const server = fakeServer(4); // system + one turn + the new message
  const result = await turn(server.fetch);
  assert.deepEqual(server.bodies.map((b) => b.messages.length), [8, 6, 4]);
  const last = server.bodies.at(-1).messages;
  assert.deepEqual(last[0], {role: "system", content: SYSTEM});
  assert.deepEqual(last.slice(1).map((m) => m.content), ["tres", "respuesta tres", "cuatro"]);
  assert.deepEqual(result.kept, TURNS.slice(2));
  assert.deepEqual(chat.nextTurns(TURNS, result, "cuatro").map((t) => t.user), ["tres", "cuatro"]);
});

test("a message too long even alone fails in Spanish and leaves the conversation as it was", async () => {
  const server = fakeServer(1);
  const result = await turn(server.fetch);
  assert.equal(server.bodies.length, TURNS.length + 1);
  assert.match(result.error, /no cabe en el contexto/);
  assert.match(result.detail, /maximum context length/);
  assert.equal(chat.nextTurns(TURNS, result, "cuatro"), TURNS);
});

test("a failed turn is not kept, whatever failed", async () => {
  const failures = {
    "server error": async () => json(500, {error: {message: "Internal error: boom", type: "server_error"}}),
    network: async () => {
      throw new TypeError("fetch failed");
    },
    "stream cut": async () => new Response(stream("Ho").replace("data: [DONE]\n\n", "")),
    "error in the stream": async () =>
      new Response(`${stream("Ho").split("data: [DONE]")[0]}data: {"error": {"message": "late", "code": "timeout"}}\n\n`),
  };
  for (const [name, fetch] of Object.entries(failures)) {
    const result = await turn(fetch);
    assert.ok(result.error, name);
    assert.equal(chat.nextTurns(TURNS, result, "cuatro"), TURNS, name);
  }
  assert.equal((await turn(failures["stream cut"])).error, chat.STREAM_CUT);
  assert.match((await turn(failures["error in the stream"])).error, /tardó demasiado/);
});

test("a stopped turn is kept only if some answer had arrived", async () => {
  const abort = async () => {
    throw new DOMException("The operation was aborted.", "AbortError");
  };
  const stopped = await turn(abort);
  assert.ok(stopped.stopped && !stopped.error);
  assert.equal(chat.nextTurns(TURNS, stopped, "cuatro"), TURNS);
  const partial = {kept: TURNS, answer: "Ho", stopped: true};
  assert.deepEqual(chat.nextTurns(TURNS, partial, "cuatro").at(-1), {user: "cuatro", assistant: "Ho"});
});

test("an empty Máx. de tokens omits max_tokens; bad numbers are refused in Spanish", async () => {
  const empty = chat.parseSettings({maxTokens: "  ", temperature: "0,7"}, 256);
  assert.deepEqual(empty.settings, {max_tokens: undefined, temperature: 0.7});
  const server = fakeServer(100);
  await turn(server.fetch, TURNS, empty.settings);
  assert.ok(!("max_tokens" in server.bodies[0]));
  assert.equal(server.bodies[0].temperature, 0.7);
  assert.equal(JSON.stringify(chat.requestBody("m", [], {max_tokens: undefined})).includes("max_tokens"), false);
  assert.equal(chat.parseSettings({maxTokens: "64", temperature: ""}, 256).settings.max_tokens, 64);
  for (const bad of ["0", "-3", "abc", "1.5", "1e3", "256"]) {
    assert.match(chat.parseSettings({maxTokens: bad, temperature: ""}, 256).error, /«Máx\. de tokens» debe ser/, bad);
  }
  for (const bad of ["3", "-0.1", "x"]) {
    assert.match(chat.parseSettings({maxTokens: "", temperature: bad}, 256).error, /«Temperatura» debe ser/, bad);
  }
});

test("each failure has its own Spanish message, never the server's English one", async () => {
  const cases = [
    [400, {code: "context_length_exceeded"}, /no cabe en el contexto/],
    [400, {code: "invalid_json"}, /rechazó la petición/],
    [400, {param: "messages"}, /no acepta esta conversación/],
    [401, {code: "invalid_api_key"}, /clave de API/],
    [404, {code: "model_not_found"}, /Recarga la página/],
    [413, {code: "request_too_large"}, /demasiado grande/],
    [422, {param: "temperature"}, /ajustes/],
    [429, {code: "server_busy"}, /ocupado/],
    [429, {code: "rate_limit_exceeded"}, /límite de peticiones\. Espera 7 s/],
    [500, {type: "server_error"}, /Error interno del servidor \(500\)/],
    [503, {}, /no está disponible/],
    [504, {code: "timeout"}, /tardó demasiado/],
    [0, {}, /No se pudo conectar/],
  ];
  const seen = new Set();
  for (const [status, error, expected] of cases) {
    const fetch = async () =>
      status === 0
        ? Promise.reject(new TypeError("fetch failed"))
        : json(status, {error: {message: "Some English message.", ...error}}, {"Retry-After": "7"});
    const result = await turn(fetch, []);
    assert.match(result.error, expected, `HTTP ${status}`);
    assert.doesNotMatch(result.error, /English/);
    seen.add(result.error);
  }
  assert.equal(seen.size, cases.length);
  const proxyPage = async () => new Response("<html>Bad Gateway</html>", {status: 502});
  assert.match((await turn(proxyPage, [])).error, /\(502\)/);
});
