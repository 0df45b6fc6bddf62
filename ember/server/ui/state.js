// The page's one state, and the small helpers every part uses.

export const state = {
  model: null,        // the served model's id (GET /v1/models)
  conv: null,         // the open conversation as the store returned it, or null: a new chat, not saved yet
  messages: [],       // what the page shows: {role, content, truncated?, usage?, meta?}; no system message
  running: null,      // a turn in progress (saving, then streaming): {ctrl: AbortController, id, stopping}
  pendingKeep: undefined,  // the store still holds messages the view dropped from this index on
  epoch: 0,           // bumped when another conversation opens: answers for an older one are dropped
};

export const $ = (id) => document.getElementById(id);

/** An element: make('button', { type: 'button', className: 'primary', text: 'Send', label: 'aria label',
 * onClick }, ...children); other props are set as properties (value, title, ...). */
export function make(tag, { text, label, onClick, ...props } = {}, ...children) {
  const node = Object.assign(document.createElement(tag), props);
  if (text !== undefined) node.textContent = text;
  if (label) node.setAttribute('aria-label', label);
  if (onClick) node.addEventListener('click', onClick);
  node.append(...children);
  return node;
}

/** The store's copy of the open conversation starts with a system message: the store counts it in its
 * message indices, the page's view does not show it as a message. */
export const systemStored = () => state.conv?.messages?.[0]?.role === 'system';

/** Enter that ends an IME composition (Safari reports it as keyCode 229) must not send. */
export const composing = (ev) => ev.isComposing || ev.keyCode === 229;

/** A line under the messages: an error (with what to do) or a notice; '' hides it. */
export function setStatus(text, kind = 'info') {
  const el = $('status');
  el.textContent = text;
  el.dataset.kind = kind;
  el.hidden = !text;
}

/** The sampling settings in the form, only those set (unset: the model's own defaults). */
export function sampling() {
  const out = {};
  for (const [key, parse] of [['temperature', parseFloat], ['top_p', parseFloat], ['max_tokens', (v) => parseInt(v, 10)]]) {
    const raw = $(key).value.trim();
    if (raw !== '') out[key] = parse(raw);
  }
  return out;
}

export const systemPrompt = () => $('system').value.trim();

export function fillSettings(settings, system) {
  for (const key of ['temperature', 'top_p', 'max_tokens']) $(key).value = settings?.[key] ?? '';
  $('system').value = system ?? '';
}

export function when(seconds) {
  const d = new Date(seconds * 1000);
  const today = new Date().toDateString() === d.toDateString();
  return today ? d.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' }) : d.toLocaleDateString();
}

/** True (and says why) while a turn runs: the open conversation must not change under it. */
export function busy() {
  if (!state.running) return false;
  setStatus('A reply is still coming: stop it first (Esc).', 'info');
  return true;
}

/** Focus without popping a phone's on-screen keyboard over what the user is reading. */
export function focusQuietly(el) {
  if (matchMedia('(hover: hover)').matches) el.focus();
}
