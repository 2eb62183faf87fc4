// The chat page's logic, served at /static/chat.js: what a turn sends, how its streamed answer is read, which
// turns stay in the conversation, and what the page says (in Spanish) when something fails. The plain functions
// need no DOM, so Node tests them (tests/js/); `startPage` wires them to chat.html in a browser.
"use strict";

// A turn is {user, assistant}: one exchange. The context is full when the server answers 400 with this code; the
// page then drops the oldest turns (the system message always stays) and asks again, as scripts/chat.py does. The
// server's own check is the one that counts (same tokenizer, same template, same default for an omitted
// max_tokens), so the page does not try to predict it.
const CONTEXT_FULL = "context_length_exceeded";

const STREAM_CUT = "La respuesta se cortó antes de terminar (se perdió la conexión con el servidor).";

class ChatError extends Error {}

function buildMessages(system, turns, text) {
  const messages = system ? [{role: "system", content: system}] : [];
  for (const turn of turns) {
    messages.push({role: "user", content: turn.user}, {role: "assistant", content: turn.assistant});
  }
  messages.push({role: "user", content: text});
  return messages;
}

// A number typed in a settings field: {value} (undefined when empty: the server's default) or {error} in Spanish.
// A decimal comma is accepted, as Spanish writes it.
function parseNumber(raw, {label, min, max, integer}) {
  const text = String(raw ?? "").trim().replace(",", ".");
  if (text === "") return {value: undefined};
  const pattern = integer ? /^\d+$/ : /^\d*\.?\d+$/;
  const value = Number(text);
  const kind = integer ? "un número entero" : "un número";
  if (!pattern.test(text) || value < min || (max !== undefined && value > max)) {
    const range = max === undefined ? `mayor o igual que ${min}` : `entre ${min} y ${max}`;
    return {error: `«${label}» debe ser ${kind} ${range}, o quedar vacío para usar el valor del servidor.`};
  }
  return {value};
}

// The settings of the page's fields as request parameters; {error} names the first field that is wrong.
// An answer cannot take the whole context, so max_tokens stays below the model's context when that is known.
function parseSettings(fields, maxModelLen) {
  const maxTokens = parseNumber(fields.maxTokens, {
    label: "Máx. de tokens",
    min: 1,
    max: maxModelLen ? maxModelLen - 1 : undefined,
    integer: true,
  });
  if (maxTokens.error) return maxTokens;
  const temperature = parseNumber(fields.temperature, {label: "Temperatura", min: 0, max: 2, integer: false});
  if (temperature.error) return temperature;
  return {settings: {max_tokens: maxTokens.value, temperature: temperature.value}};
}

// The body of POST /v1/chat/completions; a setting left empty is omitted (never sent as 0 or null).
function requestBody(model, messages, settings = {}) {
  const body = {model, messages, stream: true};
  for (const [key, value] of Object.entries(settings)) if (value !== undefined) body[key] = value;
  return body;
}

// What the page says for a failed request: `status` 0 is a network failure; `error` is the server's
// {message, code, param}, whose English message is kept for the bubble's tooltip only.
function errorText(status, error = {}, retryAfter = null) {
  const code = error?.code;
  if (code === CONTEXT_FULL) {
    return "El mensaje no cabe en el contexto del modelo, ni siquiera sin los mensajes anteriores. " +
      "Acórtalo o reduce «Máx. de tokens».";
  }
  if (code === "timeout" || status === 504) return "El modelo tardó demasiado en responder. Inténtalo de nuevo.";
  if (status === 0) return "No se pudo conectar con el servidor. Comprueba que sigue en marcha y tu conexión.";
  if (status === 401) return "Falta la clave de API o no es válida: escríbela en «Ajustes» → «Clave de API».";
  if (status === 429 && code === "rate_limit_exceeded") {
    const wait = retryAfter ? `${retryAfter} s` : "unos segundos";
    return `Has alcanzado el límite de peticiones. Espera ${wait} y vuelve a intentarlo.`;
  }
  if (status === 429) return "El servidor está ocupado con otras peticiones. Vuelve a intentarlo en unos segundos.";
  if (status === 413) return "El mensaje es demasiado grande para el servidor. Acórtalo.";
  if (status === 404) return "El servidor ya no sirve este modelo o esta dirección. Recarga la página.";
  if (status === 422) return "El servidor no acepta alguno de los ajustes (temperatura, máx. de tokens…).";
  if (status === 400 && error?.param === "messages") {
    return "El modelo no acepta esta conversación; prueba a vaciar «Mensaje de sistema».";
  }
  if (status === 400) return "El servidor rechazó la petición.";
  if (status === 503) return "El modelo no está disponible ahora mismo. Inténtalo de nuevo en un momento.";
  if (status >= 500) return `Error interno del servidor (${status}). Inténtalo de nuevo.`;
  return `El servidor respondió con un error inesperado (${status}).`;
}

async function errorOf(response) {
  try {
    return (await response.json()).error ?? {};
  } catch {
    return {}; // Not JSON (a proxy's page, say): the status alone decides the message.
  }
}

// Reads an event stream of chat chunks, calling onDelta(text) for each piece; returns the whole answer. A stream
// that ends without [DONE] was cut; an error chunk (the status line was already sent) fails the turn. A server with
// a retrieval index sends the passages it grounded the answer in ("sources") twice: in the first chunk, with `cited`
// null, and in the chunk that ends the answer, with `cited` known; onSources(sources) gets each.
async function readAnswer(response, onDelta = () => {}, onSources = () => {}) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let answer = "";
  for (;;) {
    const {value, done} = await reader.read();
    buffer += decoder.decode(value, {stream: !done});
    const events = buffer.split(/\r?\n\r?\n/);
    buffer = done ? "" : events.pop();
    for (const event of events) {
      const data = event.replace(/^data: ?/, "").trim();
      if (data === "[DONE]") return answer;
      if (!data) continue;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new ChatError(errorText(500, chunk.error), {cause: chunk.error.message});
      if (chunk.sources) onSources(chunk.sources);
      const delta = chunk.choices?.[0]?.delta?.content;
      if (delta) {
        answer += delta;
        onDelta(delta);
      }
    }
    if (done) throw new ChatError(STREAM_CUT);
  }
}

// One turn: sends the conversation, dropping the oldest turns while the server says the context is full.
// Resolves to {kept, answer, sources} (sources: the last list the server sent, or null) and, when the turn did not
// complete, `error` (Spanish text, and `detail`: the server's own message) or `stopped` (the user pressed stop:
// `answer` holds what had arrived). Never rejects.
async function completeTurn({fetch, baseUrl = "", headers = {}, model, system, turns, text, settings, signal,
                             onDelta = () => {}, onSources = () => {}}) {
  let kept = turns;
  let answer = "";
  let sources = null;
  const ended = (how = {}) => ({kept, answer, sources, ...how});
  try {
    for (;;) {
      const response = await fetch(baseUrl + "/v1/chat/completions", {
        method: "POST",
        headers: {"Content-Type": "application/json", ...headers},
        body: JSON.stringify(requestBody(model, buildMessages(system, kept, text), settings)),
        signal,
      });
      if (response.ok) {
        const read = (delta) => {
          answer += delta;
          onDelta(delta);
        };
        const found = (list) => {
          sources = list;
          onSources(list);
        };
        answer = await readAnswer(response, read, found);
        return ended();
      }
      const error = await errorOf(response);
      if (response.status === 400 && error.code === CONTEXT_FULL && kept.length) {
        kept = kept.slice(1);
        continue;
      }
      const retryAfter = response.headers.get("retry-after");
      return ended({error: errorText(response.status, error, retryAfter), detail: error.message});
    }
  } catch (e) {
    if (e.name === "AbortError") return ended({stopped: true});
    if (e instanceof ChatError) return ended({error: e.message, detail: e.cause});
    if (e instanceof SyntaxError) return ended({error: STREAM_CUT, detail: e.message});
    return ended({error: errorText(0), detail: e.message}); // fetch's TypeError: the network.
  }
}

// The conversation after a turn: a completed turn (or one stopped after some text) joins the turns that fitted;
// a failed one leaves the conversation as it was, so that it is never sent again. Sources are only shown: the
// answer's text is all the conversation keeps (the server retrieves afresh for each question).
function nextTurns(turns, result, text) {
  if (result.error || (result.stopped && !result.answer)) return turns;
  return [...result.kept, {user: text, assistant: result.answer}];
}

// The start of a passage for a source's one-line summary: whitespace collapsed, cut at a word before `limit`.
function excerpt(text, limit = 140) {
  const flat = String(text ?? "").replace(/\s+/g, " ").trim();
  if (flat.length <= limit) return flat;
  const cut = flat.slice(0, limit);
  const space = cut.lastIndexOf(" ");
  return (space > limit / 2 ? cut.slice(0, space) : cut) + "…";
}

// The sources of an answer as a "Fuentes" block of <details>, one per passage: "[n] file · passage id", "citada"
// when the answer cites it, an excerpt, and the whole text when opened (those whose number is in `opened` start
// open, so that the update with `cited` keeps what the user opened). Null for an answer without sources. Passages
// are the user's documents: every piece goes in as textContent, never as HTML.
function sourcesView(doc, sources, opened = new Set()) {
  if (!sources?.length) return null;
  const element = (tag, className, text) => {
    const node = doc.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  };
  const list = element("ol");
  for (const source of sources) {
    const details = element("details");
    details.dataset.number = String(source.number);
    details.open = opened.has(source.number);
    const summary = element("summary");
    summary.append(element("span", "source-name", `[${source.number}] ${source.source} · ${source.passage_id}`));
    if (source.cited) summary.append(element("span", "source-cited", "citada"));
    summary.append(element("span", "source-excerpt", excerpt(source.text)));
    details.append(summary, element("p", "source-text", source.text));
    const item = element("li", source.cited ? "source cited" : "source");
    item.append(details);
    list.append(item);
  }
  const box = element("div", "sources");
  box.append(element("p", "sources-title", "Fuentes"), list);
  return box;
}

// The header's note on the server's retrieval index from GET /health ("" without one).
function indexText(health) {
  const passages = health?.index?.passages;
  if (passages === undefined || passages === null) return "";
  return `Con índice: ${passages.toLocaleString("es-ES")} ${passages === 1 ? "pasaje" : "pasajes"}`;
}

function startPage() {
  const $ = (id) => document.getElementById(id);
  const page = {model: null, maxModelLen: null, turns: [], controller: null};
  $("api_key").value = localStorage.getItem("api_key") || "";

  const headers = () => ($("api_key").value ? {Authorization: "Bearer " + $("api_key").value} : {});
  const scroll = () => ($("log").scrollTop = $("log").scrollHeight);
  function bubble(kind, text, detail) {
    const div = document.createElement("div");
    div.className = "msg " + kind;
    div.textContent = text;
    if (detail) div.title = "Detalle del servidor: " + detail;
    $("log").appendChild(div);
    scroll();
    return div;
  }

  // The answer's sources go in a block after its bubble (whose text the deltas rewrite), made when the first list
  // comes and rebuilt when the last brings `cited`; it joins the turn's nodes, so it greys out with them.
  function sourcesShower(answer, turn) {
    let holder = null;
    return (sources) => {
      const opened = new Set([...(holder?.querySelectorAll("details[open]") ?? [])].map((d) => +d.dataset.number));
      const view = sourcesView(document, sources, opened);
      if (!view) return;
      if (!holder) {
        holder = document.createElement("div");
        answer.after(holder);
        turn.nodes.push(holder);
      }
      holder.replaceChildren(view);
      scroll();
    };
  }

  async function loadIndex() {
    try {
      const response = await fetch("/health");
      $("index").textContent = indexText(await response.json()); // 503 (model down) still describes the index.
    } catch {
      $("index").textContent = ""; // The note is only informative: the chat works without it.
    }
  }

  async function loadModel() {
    try {
      const response = await fetch("/v1/models", {headers: headers()});
      if (!response.ok) {
        const error = await errorOf(response);
        bubble("error", errorText(response.status, error), error.message);
        return;
      }
      const card = (await response.json()).data[0];
      [page.model, page.maxModelLen] = [card.id, card.max_model_len ?? null];
      $("model").textContent = page.model;
    } catch (e) {
      bubble("error", errorText(0), e.message);
    }
  }

  async function send(text) {
    if (!page.model) await loadModel();
    if (!page.model) return;
    const parsed = parseSettings({maxTokens: $("max_tokens").value, temperature: $("temperature").value},
      page.maxModelLen);
    $("settings_error").textContent = parsed.error || "";
    if (parsed.error) {
      $("settings").open = true;
      return;
    }
    $("input").value = "";
    const turn = {user: text, nodes: [bubble("user", text)]};
    const answer = bubble("assistant pending", "…");
    turn.nodes.push(answer);
    page.controller = new AbortController();
    $("send").disabled = true;
    $("stop").disabled = false;
    const onDelta = (delta) => {
      if (answer.classList.contains("pending")) [answer.className, answer.textContent] = ["msg assistant", ""];
      answer.textContent += delta;
      scroll();
    };
    const before = page.turns;
    const result = await completeTurn({fetch, headers: headers(), model: page.model, system: $("system").value.trim(),
      turns: before, text, settings: parsed.settings, signal: page.controller.signal, onDelta,
      onSources: sourcesShower(answer, turn)});
    page.controller = null;
    $("send").disabled = false;
    $("stop").disabled = true;
    if (page.turns === before) settle(result, text, turn, answer); // Else "Nueva conversación" came meanwhile.
  }

  // Shows how a turn ended and updates the conversation (nextTurns) that the next turn sends.
  function settle(result, text, turn, answer) {
    answer.classList.remove("pending");
    const turns = nextTurns(page.turns, result, text);
    if (turns === page.turns) { // The turn failed: greyed out, it is not sent again.
      turn.nodes.forEach((node) => node.classList.add("failed"));
      if (!result.answer) answer.textContent = result.stopped ? "(detenido)" : "(sin respuesta)";
      if (result.error) bubble("error", result.error, result.detail);
      return;
    }
    if (!result.answer) [answer.className, answer.textContent] = ["msg assistant note", "(respuesta vacía)"];
    for (const old of page.turns.slice(0, page.turns.length - result.kept.length)) {
      for (const node of old.nodes) {
        node.classList.add("forgotten");
        node.title = "Ya no cabe en el contexto del modelo: no se le envía.";
      }
    }
    page.turns = turns;
    page.turns[page.turns.length - 1].nodes = turn.nodes;
  }

  $("api_key").addEventListener("change", () => {
    localStorage.setItem("api_key", $("api_key").value);
    if (!page.model) loadModel();
  });
  $("form").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("input").value.trim();
    if (text && !page.controller) send(text);
  });
  $("input").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      $("form").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => page.controller?.abort());
  $("reset").addEventListener("click", () => {
    page.controller?.abort();
    page.turns = [];
    $("log").replaceChildren();
  });
  loadModel();
  loadIndex();
}

if (typeof module !== "undefined") {
  module.exports = {buildMessages, parseNumber, parseSettings, requestBody, errorText, readAnswer, completeTurn,
    nextTurns, excerpt, sourcesView, indexText, STREAM_CUT};
} else {
  startPage();
}
