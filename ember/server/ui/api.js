// What the page asks of the server: ember's OpenAI endpoints and its conversation store (/v1/conversations).
// Same origin, so no CORS; the API key (when the server has one) lives in this browser's localStorage.

const KEY = 'ember.apiKey';

export class APIError extends Error {
  constructor(status, message, code = null) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

export const apiKey = () => localStorage.getItem(KEY) || '';
export const setApiKey = (key) => (key ? localStorage.setItem(KEY, key) : localStorage.removeItem(KEY));

/** fetch with the key and JSON body; an answer that is not 2xx becomes an APIError with the server's message. */
export async function request(path, { method = 'GET', body, signal } = {}) {
  const headers = {};
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  if (apiKey()) headers.Authorization = `Bearer ${apiKey()}`;
  let res;
  try {
    res = await fetch(path, { method, headers, signal, body: body === undefined ? undefined : JSON.stringify(body) });
  } catch (e) {
    if (e.name === 'AbortError') throw e;
    throw new APIError(0, 'The server cannot be reached: is `ember serve` still running?', 'unreachable');
  }
  if (!res.ok) {
    let message = `${res.status} ${res.statusText}`;
    let code = null;
    try {
      const err = (await res.json()).error;
      message = err?.message || message;
      code = err?.code || null;
    } catch { /* not JSON: keep the status line */ }
    throw new APIError(res.status, message, code);
  }
  return res;
}

const json = async (path, opts) => (await request(path, opts)).json();

/** The JSON events of a server-sent-events response, until `data: [DONE]`. */
export async function* events(res) {
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buf = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf('\n\n')) >= 0) {
      const block = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      for (const line of block.split('\n')) {
        if (!line.startsWith('data:')) continue;
        const data = line.slice(5).trim();
        if (data === '[DONE]') return;
        yield JSON.parse(data);
      }
    }
  }
}

export const models = () => json('/v1/models');
export const cancel = (id) => request(`/v1/requests/${encodeURIComponent(id)}/cancel`, { method: 'POST' });

export const store = {
  list: (q) => json(`/v1/conversations?limit=200${q ? `&q=${encodeURIComponent(q)}` : ''}`),
  get: (id) => json(`/v1/conversations/${id}`),
  create: (body) => json('/v1/conversations', { method: 'POST', body }),
  append: (id, body) => json(`/v1/conversations/${id}/messages`, { method: 'POST', body }),
  update: (id, body) => json(`/v1/conversations/${id}`, { method: 'PATCH', body }),
  remove: (id) => json(`/v1/conversations/${id}`, { method: 'DELETE' }),
};
