// The page of `llmk serve` at GET /: a chat with streamed replies for decoders, and for encoders,
// classifiers and NER models a form per route they serve. No framework and no outside URL: it calls this
// server's /v1 routes with the key from #key (kept in sessionStorage) as a Bearer token.
"use strict";

const config = JSON.parse(document.getElementById("llmk-config").textContent);
const KEY_STORAGE = "llmk-api-key";
const keyInput = document.getElementById("key");

// ------------------------------------------------------------------------------------ calling the API

class ApiFailure extends Error {}

function headers() {
  const sent = { "Content-Type": "application/json" };
  const key = keyInput.value.trim();
  if (config.key_required && key) sent.Authorization = `Bearer ${key}`;
  return sent;
}

// The OpenAI-shape error of an answer as one line: "401: missing or invalid API key; ...".
async function failure(response) {
  let message = response.statusText || "request failed";
  try {
    message = (await response.json()).error.message || message;
  } catch (_) {
    // not JSON (a proxy's page): keep the status text
  }
  const wait = response.headers.get("Retry-After");
  if (response.status === 429 && wait) message += ` (Retry-After: ${wait} s)`;
  return new ApiFailure(`${response.status}: ${message}`);
}

async function post(route, body, signal) {
  let response;
  try {
    response = await fetch(route, { method: "POST", headers: headers(), body: JSON.stringify(body), signal });
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiFailure(`cannot reach the server: ${error.message}`);
  }
  if (!response.ok) throw await failure(response);
  return response;
}

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;  // textContent: model output is never parsed as HTML
  return node;
}

function showError(container, error) {
  container.replaceChildren(element("div", "error", error.message));
  container.lastChild.setAttribute("role", "alert");
}

// The model's id in the header once the key (if one is needed) is known.
async function showModel() {
  const model = document.getElementById("model");
  if (config.key_required && !keyInput.value.trim()) {
    model.textContent = "(enter the API key)";
    return;
  }
  try {
    const response = await fetch("/v1/models", { headers: headers() });
    if (!response.ok) throw await failure(response);
    const card = (await response.json()).data[0];
    model.textContent = `${card.id} (${card.task})`;
  } catch (error) {
    model.textContent = `(${error.message})`;
  }
}

// ------------------------------------------------------------------------------------------------ chat

function setupChat() {
  const form = document.getElementById("chat-form");
  const prompt = document.getElementById("prompt");
  const messages = document.getElementById("messages");
  const send = document.getElementById("send");
  const stop = document.getElementById("stop");
  const maxTokens = document.getElementById("max-tokens");
  maxTokens.max = config.max_tokens;
  maxTokens.value = Math.min(256, config.max_tokens);
  let history = [];  // the conversation sent with each request: {role, content}
  let controller = null;  // the AbortController of the reply being streamed
  let conversation = 0;  // "New conversation" counts up; a reply of an earlier one is dropped

  function bubble(role, text) {
    const node = element("div", `message ${role}`);
    node.append(element("div", role === "user" ? "text" : "reply", text));
    messages.append(node);
    node.scrollIntoView({ block: "end" });
    return node;
  }

  function busy(streaming) {
    send.disabled = streaming;
    stop.disabled = !streaming;
  }

  async function ask(text) {
    const turn = { role: "user", content: text };
    const current = conversation;
    history.push(turn);
    bubble("user", text);
    const answer = bubble("assistant", "");
    const reply = answer.querySelector(".reply");
    const body = {
      messages: history,
      stream: true,
      stream_options: { include_usage: true },
      temperature: Number(document.getElementById("temperature").value),
      max_tokens: Number(maxTokens.value),
    };
    controller = new AbortController();
    busy(true);
    const clock = { start: performance.now(), first: null, last: null, chunks: 0 };
    let usage = null;
    let finish = null;
    try {
      const response = await post("/v1/chat/completions", body, controller.signal);
      for await (const event of serverSentEvents(response)) {
        if (event.error) throw new ApiFailure(`${event.error.code}: ${event.error.message}`);
        if (event.usage) usage = event.usage;
        for (const choice of event.choices || []) {
          const piece = (choice.delta && choice.delta.content) || "";
          if (piece) {
            clock.last = performance.now();
            clock.first = clock.first ?? clock.last;
            clock.chunks += 1;
            const following = messages.scrollHeight - messages.scrollTop - messages.clientHeight < 40;
            reply.textContent += piece;
            if (following) messages.scrollTop = messages.scrollHeight;  // unless the reader scrolled up
          }
          finish = choice.finish_reason || finish;
        }
      }
    } catch (error) {
      if (error.name === "AbortError") {
        finish = "stopped";
      } else {
        if (!reply.textContent) answer.remove();
        history = history.filter((message) => message !== turn);  // the next request leaves it out
        prompt.value = prompt.value || text;
        const shown = element("div", "message error", error.message);
        shown.setAttribute("role", "alert");
        messages.append(shown);
        return;
      }
    } finally {
      controller = null;
      busy(false);
    }
    if (current !== conversation) return;
    history.push({ role: "assistant", content: reply.textContent });
    answer.append(element("div", "stats", stats(clock, usage, finish)));
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const text = prompt.value.trim();
    if (!text || controller) return;
    prompt.value = "";
    ask(text);
  });
  prompt.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      form.requestSubmit();
    }
  });
  stop.addEventListener("click", () => controller && controller.abort());
  document.getElementById("new-chat").addEventListener("click", () => {
    if (controller) controller.abort();
    conversation += 1;
    history = [];
    messages.replaceChildren();
  });
}

// Parsed `data:` events of a text/event-stream answer, until `data: [DONE]`.
async function* serverSentEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  while (true) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    const lines = buffer.split("\n");
    buffer = lines.pop();  // an incomplete line waits for the next read
    for (const line of lines) {
      if (!line.startsWith("data:")) continue;
      const data = line.slice(5).trim();
      if (data === "[DONE]") return;
      yield JSON.parse(data);
    }
  }
}

// "time to first token 0.21 s · 35.2 tokens/s · 64 tokens · length": tokens/s counts the tokens after the
// first over the time between the first and the last (the decoding speed, without the prompt's time).
function stats(clock, usage, finish) {
  const parts = [];
  if (clock.first !== null) parts.push(`time to first token ${((clock.first - clock.start) / 1000).toFixed(2)} s`);
  const tokens = usage ? usage.completion_tokens : clock.chunks;
  if (tokens > 1 && clock.last > clock.first) {
    parts.push(`${((tokens - 1) / ((clock.last - clock.first) / 1000)).toFixed(1)} tokens/s`);
  }
  parts.push(`${tokens} tokens`);
  if (finish) parts.push(finish);
  return parts.join(" · ");
}

// -------------------------------------------------------------------------------- encoder routes

function setupForm(name, run) {
  const form = document.getElementById(`${name}-form`);
  const result = document.getElementById(`${name}-result`);
  const button = document.getElementById(name);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    button.disabled = true;
    result.replaceChildren(element("p", "pending", "…"));
    try {
      result.replaceChildren(...(await run()));
    } catch (error) {
      showError(result, error);
    } finally {
      button.disabled = false;
    }
  });
}

async function compare() {
  const input = [document.getElementById("text-a").value, document.getElementById("text-b").value];
  const [a, b] = (await (await post("/v1/embeddings", { input })).json()).data.map((item) => item.embedding);
  let dot = 0, normA = 0, normB = 0;
  for (let i = 0; i < a.length; i++) {
    dot += a[i] * b[i];
    normA += a[i] * a[i];
    normB += b[i] * b[i];
  }
  const cosine = dot / Math.sqrt(normA * normB);
  return [element("p", "similarity", `cosine similarity ${cosine.toFixed(4)} (${a.length} dimensions)`)];
}

async function classify() {
  const input = document.getElementById("classify-text").value;
  const result = (await (await post("/v1/classify", { input })).json()).data[0];
  const table = element("table", "scores");
  for (const { label, score } of result.scores) {
    const row = table.insertRow();
    row.insertCell().textContent = label;
    row.insertCell().textContent = score.toFixed(4);
  }
  return [element("p", "label", result.label), table];
}

async function tag() {
  const input = document.getElementById("ner-text").value;
  const entities = (await (await post("/v1/ner", { input })).json()).data[0].entities;
  const marked = element("p", "entities");
  let at = 0;
  for (const entity of entities) {
    marked.append(input.slice(at, entity.start));
    const mark = element("mark", "entity", entity.text);
    mark.append(element("span", "entity-type", entity.type));
    mark.title = `${entity.type} ${entity.score.toFixed(3)}`;
    marked.append(mark);
    at = entity.end;
  }
  marked.append(input.slice(at));
  return [marked, element("p", "count", `${entities.length} entities`)];
}

// ------------------------------------------------------------------------------------------- start

keyInput.value = sessionStorage.getItem(KEY_STORAGE) || "";
keyInput.addEventListener("change", () => {
  sessionStorage.setItem(KEY_STORAGE, keyInput.value.trim());
  showModel();
});
if (document.getElementById("chat-panel")) setupChat();
if (document.getElementById("embed-panel")) setupForm("embed", compare);
if (document.getElementById("classify-panel")) setupForm("classify", classify);
if (document.getElementById("ner-panel")) setupForm("ner", tag);
showModel();
