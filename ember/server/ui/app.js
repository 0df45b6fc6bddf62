// ember's chat page: wiring. The page talks to the same server that serves it, through its OpenAI
// endpoints (/v1/models, /v1/chat/completions, /v1/requests/{id}/cancel) and the store (/v1/conversations).
import { apiKey, models, setApiKey, store } from './api.js';
import { onRunning, onSaved, renderMessages, send, stop } from './chat.js';
import { onDeleted, onOpen, refreshList, searchSoon } from './sidebar.js';
import { $, fillSettings, sampling, setStatus, state, systemPrompt } from './state.js';

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
  if (!id) newChat();
  else if (id !== state.conv?.id) await openConversation(id);
}

function newChat() {
  if (busy()) return;
  state.conv = null;
  state.messages = [];
  state.sysStored = false;
  const last = JSON.parse(localStorage.getItem(LAST) || '{}');
  fillSettings(last, last.system);
  history.replaceState(null, '', location.pathname);
  renderMessages();
  refreshList();
  closeSidebar();
  $('prompt').focus();
}

async function openConversation(id) {
  if (busy()) return;
  let conv;
  try {
    conv = await store.get(id);
  } catch (e) {
    setStatus(e.status === 404 ? 'That conversation is gone (deleted?).' : e.message, 'error');
    newChat();
    return;
  }
  state.conv = conv;
  state.sysStored = conv.messages[0]?.role === 'system';
  state.messages = conv.messages.slice(state.sysStored ? 1 : 0);
  fillSettings(conv.settings, state.sysStored ? conv.messages[0].content : '');
  history.replaceState(null, '', `#c=${id}`);
  setStatus('');
  renderMessages();
  refreshList();
  closeSidebar();
  $('prompt').focus();
}

function busy() {
  if (!state.running) return false;
  setStatus('A reply is still coming: stop it first (Esc).', 'info');
  return true;
}

/** A settings field changed: remember it for new chats, and in the open conversation's store entry. */
async function settingsChanged() {
  const settings = sampling();
  localStorage.setItem(LAST, JSON.stringify({ ...settings, system: systemPrompt() }));
  if (!state.conv) return;
  try {
    state.conv = await store.update(state.conv.id, { settings, system: systemPrompt() });
    state.sysStored = state.conv.messages[0]?.role === 'system';
  } catch (e) {
    setStatus(`Settings not saved: ${e.message}`, 'error');
  }
}

function openSettings(open = $('settings').hidden) {
  $('settings').hidden = !open;
  $('open-settings').setAttribute('aria-expanded', String(open));
}

function closeSidebar() {
  document.body.classList.remove('sidebar-open');
  $('open-sidebar').setAttribute('aria-expanded', 'false');
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
    $('send').hidden = on;
    $('stop').hidden = !on;
    document.body.classList.toggle('running', on);
    if (!on) $('prompt').focus();
  });
  onOpen(openConversation);
  onDeleted(newChat);
  $('composer').addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const text = $('prompt').value;
    if (!text.trim() || state.running) return;
    $('prompt').value = '';
    fitPrompt();
    await send(text);
  });
  $('prompt').addEventListener('keydown', (ev) => {
    if (ev.key === 'Enter' && !ev.shiftKey && !ev.isComposing) {
      ev.preventDefault();
      $('composer').requestSubmit();
    }
  });
  $('prompt').addEventListener('input', fitPrompt);
  window.addEventListener('resize', fitPrompt);
  document.addEventListener('keydown', (ev) => {
    if (ev.key === 'Escape' && state.running) {
      ev.preventDefault();
      stop();
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
  $('close-sidebar').addEventListener('click', closeSidebar);
  window.addEventListener('hashchange', () => { if (state.model) followAddress(); });
}

wire();
fitPrompt();
start();
