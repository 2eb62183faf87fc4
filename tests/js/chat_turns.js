// Talks to a running server the way the chat page does, for tests/test_chat_page.py:
//     [API_KEY=KEY] node tests/js/chat_turns.js BASE_URL MAX_TOKENS MESSAGE...
// sends each message as one turn with the page's own functions and prints, as JSON, one line per turn:
// the statuses the server answered, the turns kept, the answer and any error, and the last request's messages.
"use strict";
const path = require("node:path");

const chat = require(path.join(__dirname, "..", "..", "llm", "serve", "static", "chat.js"));

async function main([baseUrl, maxTokens, ...texts]) {
  const headers = process.env.API_KEY ? {Authorization: "Bearer " + process.env.API_KEY} : {};
  const card = (await (await fetch(baseUrl + "/v1/models", {headers})).json()).data[0];
  const parsed = chat.parseSettings({maxTokens, temperature: "0"}, card.max_model_len);
  if (parsed.error) throw new Error(parsed.error);
  let turns = [];
  for (const text of texts) {
    const statuses = [];
    let messages = null;
    const recording = async (url, init) => {
      messages = JSON.parse(init.body).messages;
      const response = await fetch(url, init);
      statuses.push(response.status);
      return response;
    };
    const result = await chat.completeTurn({fetch: recording, baseUrl, headers, model: card.id, system: "Eres un asistente.",
      turns, text, settings: parsed.settings});
    turns = chat.nextTurns(turns, result, text);
    const {answer, error = null} = result;
    console.log(JSON.stringify({statuses, kept: result.kept.length, answer, error, messages}));
  }
}

main(process.argv.slice(2)).catch((error) => {
  console.error(error);
  process.exit(1);
});
