// The messages of the open conversation: showing them, sending, streaming a reply, stopping it,
// regenerating it, editing a question; every change is written to the store as it happens.
import { APIError, cancel, events, request, store } from './api.js';
import { copyText, renderMarkdown } from './markdown.js';
import { $, composing, make, sampling, setStatus, state, systemPrompt, systemStored } from './state.js';

const hooks = { saved: () => {}, running: () => {} };  // set by app.js: refresh the list, flip the buttons

export function onSaved(fn) { hooks.saved = fn; }
export function onRunning(fn) { hooks.running = fn; }

// ---- showing ----------------------------------------------------------------------------------------
export function renderMessages() {
  const box = $('messages');
  box.replaceChildren();
  if (!state.messages.length) {
    box.append(make('p', { className: 'empty muted',
      text: 'Ask anything. Enter sends, Shift+Enter adds a line, Esc stops a reply.' }));
  }
  state.messages.forEach((m, i) => box.append(messageView(m, i)));
  $('title').textContent = state.conv?.title || 'New chat';
  scrollDown(true);
}

function messageView(m, i) {
  const who = { user: 'You', assistant: 'ember', tool: 'Tool' }[m.role] ?? m.role;
  const body = make('div', { className: m.role === 'assistant' ? 'body md' : 'body plain' });
  paintBody(body, m);
  const el = make('article', { className: `msg ${m.role}`, label: `${who}, message ${i + 1}` },
    make('div', { className: 'role', text: who }), body, make('div', { className: 'meta', text: metaText(m) }),
    actions(m, i));
  el.dataset.index = i;
  return el;
}

function paintBody(body, m) {
  if (m.role === 'assistant') renderMarkdown(body, m.content);
  else body.textContent = m.content;  // what the user typed is shown as typed
}

function metaText(m) {
  const parts = [];
  if (m.truncated) parts.push('stopped');
  if (m.meta) parts.push(...m.meta);
  else if (m.usage?.completion_tokens != null) parts.push(`${m.usage.completion_tokens} tokens · prompt ${m.usage.prompt_tokens}`);
  return parts.join(' · ');
}

function actions(m, i) {
  const bar = make('div', { className: 'actions' });
  const add = (text, label, fn) => {
    const b = make('button', { type: 'button', text, label, onClick: () => fn(b) });
    bar.append(b);
  };
  const last = i === state.messages.length - 1;
  if (m.role === 'user') add('Edit', `Edit message ${i + 1} and send it again`, () => startEdit(i));
  if (m.role === 'user' && last) add('Retry', 'Ask for a reply again', () => retry());
  if (m.role === 'assistant') add('Copy', `Copy message ${i + 1}`, (b) => copyText(m.content, b));
  if (m.role === 'assistant' && last) add('Regenerate', 'Regenerate the last reply', () => regenerate());
  return bar;
}

function scrollDown(force = false) {
  const box = $('messages');
  const near = box.scrollHeight - box.scrollTop - box.clientHeight < 120;
  if (force || near) box.scrollTop = box.scrollHeight;
}

// ---- writing to the store ---------------------------------------------------------------------------
const stored = ({ role, content, truncated }) => ({ role, content, ...(truncated ? { truncated } : {}) });

const withSystem = (messages) => {
  const system = systemPrompt();
  return [...(system ? [{ role: 'system', content: system }] : []), ...messages];
};

/** Save `messages` (the last ones shown) in the open conversation. keep: the view index they start at when
 * they replace what the store has from there (a regenerated reply, an edited question). The first save
 * creates the conversation with everything shown. A store failure is a notice: the chat goes on. */
async function save(messages, { keep, usage } = {}) {
  const epoch = state.epoch;
  keep ??= state.pendingKeep;
  try {
    let conv;
    if (!state.conv) {
      conv = await store.create({ model: state.model ?? '', settings: sampling(), messages: withSystem(state.messages.map(stored)) });
      if (epoch !== state.epoch) return;
    } else {
      const body = { messages: messages.map(stored) };
      if (usage) body.usage = { prompt_tokens: usage.prompt_tokens, completion_tokens: usage.completion_tokens };
      if (keep !== undefined) body.keep = keep + (systemStored() ? 1 : 0);
      try {
        conv = await store.append(state.conv.id, body);
      } catch (e) {
        if (e.status !== 404 || epoch !== state.epoch) throw e;
        state.conv = null;  // deleted meanwhile (another tab?): keep the chat as a new conversation
        setStatus('This conversation was deleted elsewhere: it is saved again as a new one.', 'info');
        return save(messages);
      }
      if (epoch !== state.epoch) return;
    }
    state.conv = conv;
    state.pendingKeep = undefined;
    hooks.saved();
  } catch (e) {
    if (epoch === state.epoch) setStatus(`Not saved to the conversation store: ${e.message}`, 'error');
  }
}

// ---- asking -----------------------------------------------------------------------------------------
/** One turn at a time: from the first save to the last, the conversation may not change under it. */
async function turn(fn) {
  if (state.running) return false;
  if (!state.model) {
    setStatus('Not connected to the server: reload the page.', 'error');
    return false;
  }
  state.running = { ctrl: new AbortController(), id: null, stopping: false };
  hooks.running(true);
  try {
    await fn();
  } finally {
    state.running = null;
    hooks.running(false);
  }
  return true;
}

export function send(text) {
  return turn(async () => {
    setStatus('');
    const user = { role: 'user', content: text };
    state.messages.push(user);
    renderMessages();
    await save([user]);
    await generate();
  });
}

function retry() {
  return turn(() => generate(state.pendingKeep));
}

function regenerate() {
  return turn(async () => {
    const at = state.messages.length - 1;
    state.messages.splice(at);
    await generate(at);
  });
}

function startEdit(i) {
  if (state.running) return;
  const el = $('messages').querySelector(`article[data-index="${i}"]`);
  const cancelEdit = () => {
    renderMessages();
    $('messages').querySelector(`article[data-index="${i}"] .actions button`)?.focus();
  };
  const area = make('textarea', { value: state.messages[i].content, label: `Edit message ${i + 1}` });
  const box = make('form', { className: 'edit' }, area,
    make('button', { type: 'submit', className: 'primary', text: 'Save & send' }),
    make('button', { type: 'button', text: 'Cancel', onClick: cancelEdit }));
  box.addEventListener('submit', (ev) => {
    ev.preventDefault();
    if (!area.value.trim()) return;
    turn(async () => {
      const user = { role: 'user', content: area.value };
      state.messages.splice(i, state.messages.length, user);  // later turns answered the old question: gone
      renderMessages();
      await save([user], { keep: i });
      await generate();
    });
  });
  area.addEventListener('keydown', (ev) => {
    if (ev.key === 'Enter' && !ev.shiftKey && !composing(ev)) { ev.preventDefault(); box.requestSubmit(); }
    if (ev.key === 'Escape' && !composing(ev)) { ev.stopPropagation(); cancelEdit(); }
  });
  el.querySelector('.body').replaceWith(box);
  el.querySelector('.actions').hidden = true;
  area.focus();
}

/** Stream a reply to the messages shown; keep: it replaces the stored messages from this index on. */
async function generate(keep) {
  setStatus('');
  const history = withSystem(state.messages.map(({ role, content, tool_calls }) => ({ role, content, ...(tool_calls ? { tool_calls } : {}) })));
  const reply = { role: 'assistant', content: '' };
  state.messages.push(reply);
  renderMessages();
  const view = $('messages').lastElementChild;
  view.classList.add('streaming');
  view.setAttribute('aria-busy', 'true');
  const body = view.querySelector('.body');
  const run = state.running;
  const t0 = performance.now();
  let first = null, end = null, finish = null, usage = null, failure = null, queued = false;
  const paint = () => { queued = false; renderMarkdown(body, reply.content); scrollDown(); };
  try {
    const res = await request('/v1/chat/completions', {
      method: 'POST', signal: run.ctrl.signal,
      body: { model: state.model, messages: history, stream: true, stream_options: { include_usage: true }, ...sampling() },
    });
    for await (const ev of events(res)) {
      if (ev.error) throw new APIError(503, ev.error.message, ev.error.code);
      run.id ??= ev.id;  // what Stop cancels on the server
      if (ev.usage) usage = ev.usage;
      for (const choice of ev.choices ?? []) {
        if (choice.delta?.content) {
          first ??= performance.now();
          reply.content += choice.delta.content;
          if (!queued) { queued = true; requestAnimationFrame(paint); }
        }
        finish = choice.finish_reason ?? finish;
      }
    }
    end = performance.now();
  } catch (e) {
    if (e.name === 'AbortError') finish = 'abort';
    else failure = e;
  }
  if (!reply.content && (failure || finish === 'abort')) {
    state.messages.pop();  // nothing came: no reply to keep; Retry asks again (and replaces what the store has)
    state.pendingKeep = keep ?? state.pendingKeep;
    renderMessages();
    if (failure) setStatus(explain(failure), 'error');
    return;
  }
  if (finish === 'abort' || failure) reply.truncated = true;
  reply.usage = usage ?? undefined;
  reply.meta = measure(usage, t0, first, end, finish);
  renderMessages();
  announce(reply);
  if (failure) setStatus(explain(failure), 'error');
  await save([reply], { keep, usage });
}

/** Screen readers hear each finished reply once (the message list itself is not a live region). */
function announce(reply) {
  $('announce').textContent = '';
  $('announce').textContent = `ember${reply.truncated ? ' (stopped)' : ''}: ${reply.content}`;
}

function measure(usage, t0, first, end, finish) {
  const meta = [];
  if (finish === 'length') meta.push('cut at the token limit');
  if (!usage) return meta;
  const n = usage.completion_tokens;
  meta.push(`${n} tokens`);
  if (first !== null && end !== null && n > 1 && end > first) meta.push(`${((n - 1) / ((end - first) / 1000)).toFixed(1)} tok/s`);
  const cached = usage.prompt_tokens_details?.cached_tokens;
  meta.push(`prompt ${usage.prompt_tokens}${cached ? ` (${cached} cached)` : ''}`);
  if (first !== null) meta.push(`first token ${Math.round(first - t0)} ms`);
  return meta;
}

function explain(e) {
  if (e.status === 401) return 'This server needs an API key: enter it under Settings.';
  if (e.code === 'context_length_exceeded') return `${e.message} Start a new chat, or edit an earlier message to drop the turns after it.`;
  return e.message;
}

// ---- stopping ---------------------------------------------------------------------------------------
/** Stop the reply: the server cancels it (its partial text and usage still arrive); dropping the
 * connection is the fallback, which the server also takes as a cancel. */
export function stop() {
  const run = state.running;
  if (!run || run.stopping) return;
  run.stopping = true;
  if (run.id) stopOnServer(run);
  else run.ctrl.abort();  // not asked yet, or no answer yet: a fetch that never starts, or a dropped one
}

function stopOnServer(run) {
  cancel(run.id).catch((e) => { if (e.status !== 404) run.ctrl.abort(); });  // 404: it had just ended
  setTimeout(() => { if (state.running === run) run.ctrl.abort(); }, 5000);
}
