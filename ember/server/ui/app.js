// ember's chat page: wiring. The page talks to the same server that serves it, through its OpenAI
// endpoints (/v1/models, /v1/chat/completions, /v1/requests/{id}/cancel) and the store (/v1/conversations).
import { apiKey, models, setApiKey, store } from './api.js';
import { onRunning, onSaved, renderMessages, send, stop } from './chat.js';
import { onDeleted, onOpen, refreshList, searchSoon } from './sidebar.js';
import { $, busy, composing, fillSettings, focusQuietly, sampling, setStatus, state, systemPrompt, systemStored } from './state.js';

const LAST = 'ember.lastSettings';  // what a new chat starts with

async function start() {
  try {
    state.model = (await models()).data[0]?.id ?? null;
  } catch (e) {
    if (e.status === 401) {
      openSettings(true);
      $('api-key').focus();
      setStatus('This server needs an API key: enter it under Settings.', 'error');
    } else {
      setStatus(e.message, 'error');
    }
    return;
  }
  $('model').textContent = state.model ?? '';
  setStatus('');
  await refreshList();
  await followAddress();
}

/** The address names the open conversation (#c=ID): a link to it, or one typed in, opens it. */
async function followAddress() {
  const id = Number(/^#c=(\d+)$/.exec(location.hash)?.[1]);
  if (id && id !== state.conv?.id) await openConversation(id);
  else if (!id && !(state.messages.length && !state.conv)) newChat();  // never wipe a chat not saved yet
}

function newChat() {
  if (busy()) return;
  state.epoch++;
  state.conv = null;
  state.pendingKeep = undefined;
  state.messages = [];
  const last = JSON.parse(localStorage.getItem(LAST) || '{}');
  fillSettings(last, last.system);
  history.replaceState(null, '', location.pathname);
  renderMessages();
  refreshList();
  closeSidebar();
  focusQuietly($('prompt'));
}

async function openConversation(id) {
  if (busy()) return;
  const epoch = ++state.epoch;  // a slower answer for a conversation clicked earlier is dropped
  let conv;
  try {
    conv = await store.get(id);
  } catch (e) {
    if (epoch !== state.epoch) return;
    newChat();
    setStatus(e.status === 404 ? 'That conversation is gone (deleted?).' : e.message, 'error');
    return;
  }
  if (epoch !== state.epoch || state.running) return;
  state.conv = conv;
  state.pendingKeep = undefined;
  state.messages = conv.messages.slice(systemStored() ? 1 : 0);
  fillSettings(conv.settings, systemStored() ? conv.messages[0].content : '');
  history.replaceState(null, '', `#c=${id}`);
  setStatus('');
  renderMessages();
  refreshList();
  closeSidebar();
  focusQuietly($('prompt'));
}

/** A settings field changed: remember it for new chats, and in the open conversation's store entry. */
async function settingsChanged() {
  const settings = sampling();
  localStorage.setItem(LAST, JSON.stringify({ ...settings, system: systemPrompt() }));
  if (!state.conv) return;
  const { id } = state.conv;
  try {
    const conv = await store.update(id, { settings, system: systemPrompt() });
    if (state.conv?.id !== id) return;  // another conversation opened meanwhile
    state.conv = conv;
  } catch (e) {
    if (state.conv?.id === id) setStatus(`Settings not saved: ${e.message}`, 'error');
  }
}

function openSettings(open = $('settings').hidden) {
  $('settings').hidden = !open;
  $('open-settings').setAttribute('aria-expanded', String(open));
}

function closeSidebar({ refocus = false } = {}) {
  if (!document.body.classList.contains('sidebar-open')) return;
  document.body.classList.remove('sidebar-open');
  $('open-sidebar').setAttribute('aria-expanded', 'false');
  if (refocus) $('open-sidebar').focus();
}

function fitPrompt() {
  const p = $('prompt');
  p.style.height = 'auto';
  p.style.height = `${Math.min(p.scrollHeight + 2, 240)}px`;  // + the borders
  p.style.overflowY = p.scrollHeight > 240 ? 'auto' : 'hidden';
}

function wire() {
  onSaved(() => {
    history.replaceState(null, '', `#c=${state.conv.id}`);
    $('title').textContent = state.conv.title || 'New chat';
    refreshList();
  });
  onRunning((on) => {
    const hadFocus = document.activeElement === $(on ? 'send' : 'stop');
    $('send').hidden = on;
    $('stop').hidden = !on;
    document.body.classList.toggle('running', on);
    $('messages').setAttribute('aria-busy', String(on));
    if (hadFocus) $(on ? 'stop' : 'prompt').focus();  // the focused button is going away
    else if (!on) focusQuietly($('prompt'));
  });
  onOpen(openConversation);
  onDeleted(newChat);
  $('composer').addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const text = $('prompt').value;
    if (!text.trim() || state.running) return;
    $('prompt').value = '';
    fitPrompt();
    if (!(await send(text))) $('prompt').value ||= text;  // not sent: the text stays
  });
  $('prompt').addEventListener('keydown', (ev) => {
    if (ev.key === 'Enter' && !ev.shiftKey && !composing(ev)) {
      ev.preventDefault();
      $('composer').requestSubmit();
    }
  });
  $('prompt').addEventListener('input', fitPrompt);
  window.addEventListener('resize', fitPrompt);
  document.addEventListener('keydown', (ev) => {
    if (ev.key !== 'Escape' || composing(ev)) return;
    if (state.running) {
      ev.preventDefault();
      stop();
    } else if (document.body.classList.contains('sidebar-open')) {
      closeSidebar({ refocus: true });
    }
  });
  $('stop').addEventListener('click', stop);
  $('new-chat').addEventListener('click', newChat);
  $('search').addEventListener('input', searchSoon);
  $('open-settings').addEventListener('click', () => openSettings());
  $('settings').addEventListener('submit', (ev) => ev.preventDefault());  // Enter in a field: nothing to post
  for (const id of ['system', 'temperature', 'top_p', 'max_tokens']) $(id).addEventListener('change', settingsChanged);
  $('api-key').value = apiKey();
  $('api-key').addEventListener('change', () => {
    setApiKey($('api-key').value.trim());
    start();
  });
  $('open-sidebar').addEventListener('click', () => {
    document.body.classList.add('sidebar-open');
    $('open-sidebar').setAttribute('aria-expanded', 'true');
    $('search').focus();
  });
  $('close-sidebar').addEventListener('click', () => closeSidebar({ refocus: true }));
  window.addEventListener('hashchange', () => { if (state.model) followAddress(); });
}

wire();
fitPrompt();
start();
