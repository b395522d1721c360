// stitch dashboard. Plain JavaScript, no build step, no third-party code.
// Every page is drawn from the public API (/v1); see docs/dashboard.md.
'use strict';

(() => {
  const TOKEN_KEY = 'stitch.api-token';
  const STATUSES = ['accepted', 'running', 'unknown', 'succeeded', 'failed', 'cancelled'];
  const TERMINAL = new Set(['succeeded', 'failed', 'cancelled']);
  const TOPICS = [
    ['trigger', 'Creating builds at their CI provider.'],
    ['signal', 'Polling builds for their status, cancelling them.'],
  ];
  const main = document.getElementById('main');
  const connection = document.getElementById('connection');
  const announcer = document.getElementById('announce');

  // Aborted when the page is hidden (left, or kept in the back/forward
  // cache). A browser opens at most six HTTP/1.1 connections to one server,
  // and the open streams of pages it keeps would hold them: the next page's
  // loads then waited for them (30-50 s in Chromium). A page shown again
  // from that cache reloads, its streams being gone.
  const pageStreams = new AbortController();
  window.addEventListener('pagehide', () => pageStreams.abort());
  window.addEventListener('pageshow', (e) => { if (e.persisted) window.location.reload(); });

  // ---- DOM helpers: text always goes in as text, never as markup ----

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === 'class') node.className = v;
      else if (k === 'text') node.textContent = v;
      else if (k.startsWith('on')) node.addEventListener(k.slice(2), v);
      else node.setAttribute(k, v === true ? '' : String(v));
    }
    for (const c of children.flat(Infinity)) {
      if (c === null || c === undefined || c === false) continue;
      node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return node;
  }

  const SVG_NS = 'http://www.w3.org/2000/svg';
  function svg(tag, attrs, ...children) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === 'text') node.textContent = v;
      else node.setAttribute(k, String(v));
    }
    for (const c of children.flat(Infinity)) if (c) node.append(c);
    return node;
  }

  function announce(message) {
    announcer.textContent = '';
    // A fresh text node is announced even when the message repeats.
    window.setTimeout(() => { announcer.textContent = message; }, 50);
  }

  function statusBadge(status) {
    return el('span', { class: `status status-${status}`, 'data-status': status, text: status });
  }

  function time(iso) {
    if (!iso) return '—';
    const d = new Date(iso);
    return el('time', { datetime: iso, title: iso, text: d.toLocaleString() });
  }

  function duration(ms) {
    if (ms === null || ms === undefined) return '—';
    const s = Math.round(ms / 1000);
    if (s < 60) return `${s} s`;
    const m = Math.floor(s / 60);
    if (m < 60) return `${m} min ${s % 60} s`;
    return `${Math.floor(m / 60)} h ${m % 60} min`;
  }

  function buildDuration(b) {
    const end = b.finished_at ? Date.parse(b.finished_at) : Date.now();
    return duration(end - Date.parse(b.created_at));
  }

  function uriNode(uri) {
    return /^https?:\/\//i.test(uri) ? el('a', { href: uri, rel: 'noreferrer' }, uri) : el('code', {}, uri);
  }

  function table(caption, headers, rows) {
    return el('div', { class: 'table-wrap' },
      el('table', {},
        caption ? el('caption', { class: 'visually-hidden', text: caption }) : null,
        el('thead', {}, el('tr', {}, headers.map((h) => {
          const [label, cls] = Array.isArray(h) ? h : [h, null];
          return el('th', { scope: 'col', class: cls }, label);
        }))),
        rows instanceof HTMLElement && rows.tagName === 'TBODY' ? rows : el('tbody', {}, rows)));
  }

  // ---- The API, with the session's token ----

  class Unauthorized extends Error {}
  class ApiFailure extends Error {
    constructor(status, code, message) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }

  function authHeaders(extra) {
    const headers = new Headers(extra || {});
    const token = sessionStorage.getItem(TOKEN_KEY);
    if (token) headers.set('Authorization', `Bearer ${token}`);
    return headers;
  }

  async function failure(resp) {
    if (resp.status === 401) return new Unauthorized();
    let code = 'http_' + resp.status;
    let message = `the server answered ${resp.status}`;
    try {
      const body = await resp.json();
      code = body.error.code;
      message = body.error.message;
    } catch (_) { /* not the API's error shape */ }
    return new ApiFailure(resp.status, code, message);
  }

  async function api(path, options) {
    const opts = options || {};
    const resp = await fetch(path, {
      method: opts.method || 'GET',
      headers: authHeaders({ Accept: 'application/json' }),
      cache: 'no-store',
    });
    if (!resp.ok) throw await failure(resp);
    return resp.status === 204 ? null : resp.json();
  }

  // Reads an SSE response through fetch(), so the token goes in the
  // Authorization header (EventSource cannot send one, and a token in the
  // URL would end up in logs and history). Calls onFrame({event, id, data})
  // per frame; resolves when the stream ends, and rejects when the page is
  // hidden (see pageStreams).
  async function readSse(path, onFrame) {
    const resp = await fetch(path, {
      headers: authHeaders({ Accept: 'text/event-stream' }),
      cache: 'no-store',
      signal: pageStreams.signal,
    });
    if (!resp.ok) throw await failure(resp);
    const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = '';
    let frame = { event: 'message', id: null, data: [] };
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value;
      let nl;
      while ((nl = buffer.indexOf('\n')) >= 0) {
        let line = buffer.slice(0, nl);
        buffer = buffer.slice(nl + 1);
        if (line.endsWith('\r')) line = line.slice(0, -1);
        if (line === '') {
          if (frame.data.length) onFrame({ event: frame.event, id: frame.id, data: frame.data.join('\n') });
          frame = { event: 'message', id: null, data: [] };
          continue;
        }
        if (line.startsWith(':')) continue;
        const colon = line.indexOf(':');
        const field = colon < 0 ? line : line.slice(0, colon);
        let val = colon < 0 ? '' : line.slice(colon + 1);
        if (val.startsWith(' ')) val = val.slice(1);
        if (field === 'data') frame.data.push(val);
        else if (field === 'event') frame.event = val;
        else if (field === 'id') frame.id = val;
      }
    }
  }

  function setConnection(text) {
    connection.textContent = text;
  }

  // Follows /v1/events from `after` with the given filter query, resuming
  // from the last seq after a dropped connection. onEvent gets each event.
  function followEvents(query, after, onEvent) {
    let last = after;
    let delay = 500;
    const run = async () => {
      for (;;) {
        try {
          setConnection('Live');
          const q = new URLSearchParams(query);
          q.set('after', String(last));
          await readSse(`/v1/events?${q}`, (f) => {
            const ev = JSON.parse(f.data);
            last = ev.seq;
            delay = 500;
            onEvent(ev);
          });
        } catch (e) {
          if (pageStreams.signal.aborted) return;
          if (e instanceof Unauthorized) { showLogin(true); return; }
          if (e instanceof ApiFailure && e.code === 'events_pruned') {
            // Retention passed our position: start over from the page's data.
            window.location.reload();
            return;
          }
        }
        setConnection('Reconnecting…');
        // Backoff before reconnecting, so a server that is down is not hammered.
        await new Promise((resolve) => window.setTimeout(resolve, delay));
        delay = Math.min(delay * 2, 10000);
      }
    };
    run();
  }

  // Coalesces bursts of calls into one call at most every `ms`.
  function throttled(fn, ms) {
    let timer = null;
    let again = false;
    const fire = async () => {
      again = false;
      try { await fn(); } finally {
        timer = again ? window.setTimeout(fire, ms) : null;
      }
    };
    return () => {
      if (timer) { again = true; return; }
      timer = window.setTimeout(fire, 0);
    };
  }

  // ---- Token login ----

  function showLogin(refused) {
    document.title = 'Sign in · stitch';
    const input = el('input', { id: 'token', name: 'token', type: 'password', autocomplete: 'current-password', required: true });
    const problem = refused && sessionStorage.getItem(TOKEN_KEY)
      ? el('p', { class: 'error', id: 'login-error', role: 'alert', text: 'The server refused that token. Check it and try again.' })
      : null;
    sessionStorage.removeItem(TOKEN_KEY);
    const form = el('form', { class: 'login', 'aria-describedby': 'login-help' },
      el('p', { id: 'login-help' }, 'This stitch server needs an API token (one of those ',
        el('code', {}, 'api.tokens_env'), ' names). It is kept for this browser tab only and sent as a bearer header.'),
      problem,
      el('label', { for: 'token' }, 'API token', input),
      el('div', {}, el('button', { type: 'submit' }, 'Sign in')));
    form.addEventListener('submit', (e) => {
      e.preventDefault();
      const token = input.value.trim();
      if (!token) return;
      sessionStorage.setItem(TOKEN_KEY, token);
      window.location.reload();
    });
    main.replaceChildren(el('h1', {}, 'Sign in'), form);
    setConnection('');
    input.focus();
  }

  function showError(e) {
    if (e instanceof Unauthorized) { showLogin(true); return; }
    main.replaceChildren(el('h1', {}, 'Something went wrong'),
      el('p', { class: 'error', role: 'alert' }, e instanceof ApiFailure ? `${e.message} (${e.code})` : String(e)));
  }

  // ---- Overview ----

  function chart(hours) {
    const W = 720, H = 220, left = 40, right = 56, top = 12, bottom = 28;
    const plotW = W - left - right, plotH = H - top - bottom;
    const totals = hours.map((h) => h.succeeded + h.failed + h.cancelled);
    const maxCount = Math.max(1, ...totals);
    const medians = hours.map((h) => h.median_duration_ms).filter((m) => m !== null);
    const maxMedian = Math.max(1, ...medians);
    const slot = plotW / hours.length;
    const barW = Math.max(2, slot * 0.7);
    const total = totals.reduce((a, b) => a + b, 0);
    const summary = `${total} builds finished in the last 24 hours: ` +
      `${hours.reduce((a, h) => a + h.succeeded, 0)} succeeded, ` +
      `${hours.reduce((a, h) => a + h.failed, 0)} failed, ` +
      `${hours.reduce((a, h) => a + h.cancelled, 0)} cancelled.`;
    const parts = [
      svg('title', { id: 'chart-title', text: 'Builds finished per hour, by outcome, and median run time' }),
      svg('desc', { id: 'chart-desc', text: summary }),
      svg('line', { class: 'axis', x1: left, y1: top + plotH, x2: left + plotW, y2: top + plotH }),
      svg('text', { x: left - 6, y: top + 10, 'text-anchor': 'end', text: String(maxCount) }),
      svg('text', { x: left - 6, y: top + plotH, 'text-anchor': 'end', text: '0' }),
      svg('text', { x: left + plotW + 6, y: top + 10, text: duration(maxMedian) }),
    ];
    hours.forEach((h, i) => {
      let y = top + plotH;
      const x = left + i * slot + (slot - barW) / 2;
      for (const outcome of ['succeeded', 'failed', 'cancelled']) {
        const n = h[outcome];
        if (!n) continue;
        const bh = (n / maxCount) * plotH;
        y -= bh;
        parts.push(svg('rect', { class: `bar-${outcome}`, x: x.toFixed(1), y: y.toFixed(1), width: barW.toFixed(1), height: bh.toFixed(1) }));
      }
      if (i % 6 === 0 || i === hours.length - 1) {
        const label = new Date(h.start).toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });
        parts.push(svg('text', { x: (left + i * slot + slot / 2).toFixed(1), y: H - 8, 'text-anchor': 'middle', text: label }));
      }
    });
    const points = [];
    hours.forEach((h, i) => {
      if (h.median_duration_ms === null) return;
      const x = left + i * slot + slot / 2;
      const y = top + plotH - (h.median_duration_ms / maxMedian) * plotH;
      points.push(`${x.toFixed(1)},${y.toFixed(1)}`);
      parts.push(svg('circle', { class: 'median-dot', cx: x.toFixed(1), cy: y.toFixed(1), r: 2.5 }));
    });
    if (points.length > 1) parts.push(svg('polyline', { class: 'median', points: points.join(' ') }));
    return svg('svg', {
      class: 'chart', viewBox: `0 0 ${W} ${H}`, role: 'img',
      'aria-labelledby': 'chart-title chart-desc', preserveAspectRatio: 'xMidYMid meet',
    }, parts);
  }

  // The oldest waiting build's age ticks every second between refetches.
  // It is counted from the server's answer (`at`), not the browser's clock
  // alone, so a browser whose clock is off still shows the right age.
  let serverSkewMs = 0;
  function age(since) {
    return duration(Math.max(0, Date.now() + serverSkewMs - Date.parse(since)));
  }
  function tickAges() {
    for (const node of document.querySelectorAll('[data-age-since]')) {
      const text = age(node.dataset.ageSince);
      if (node.textContent !== text) node.textContent = text;
    }
  }

  function oldestWaiting(q) {
    if (!q.oldest_waiting_at) return '—';
    return el('span', { title: q.oldest_waiting_at, 'data-age-since': q.oldest_waiting_at }, age(q.oldest_waiting_at));
  }

  function renderOverview(data, holder) {
    serverSkewMs = Date.parse(data.at) - Date.now();
    holder.dataset.at = data.at;
    const rows = data.queues.map((q) => el('tr', { 'data-queue': q.name },
      el('th', { scope: 'row' }, el('a', { href: `/builds?queue=${encodeURIComponent(q.name)}` }, q.name)),
      el('td', {}, q.runner),
      el('td', { class: 'num' }, q.concurrency === null ? '—' : q.concurrency),
      el('td', { class: 'num', 'data-count': 'accepted' }, q.counts.accepted),
      el('td', { class: 'num', 'data-count': 'running' }, q.counts.running),
      el('td', { class: 'num hide-narrow', 'data-count': 'unknown' }, q.counts.unknown),
      el('td', { class: 'num', 'data-count': 'succeeded' }, q.counts.succeeded),
      el('td', { class: 'num', 'data-count': 'failed' }, q.counts.failed),
      el('td', { class: 'num hide-narrow', 'data-count': 'cancelled' }, q.counts.cancelled),
      el('td', {}, oldestWaiting(q))));
    const hourRows = data.last_24h.map((h) => el('tr', {},
      el('th', { scope: 'row' }, time(h.start)),
      el('td', { class: 'num' }, h.succeeded),
      el('td', { class: 'num' }, h.failed),
      el('td', { class: 'num' }, h.cancelled),
      el('td', { class: 'num' }, duration(h.median_duration_ms))));
    holder.replaceChildren(
      el('section', { 'aria-labelledby': 'queues-h' },
        el('h2', { id: 'queues-h' }, 'Queues'),
        el('p', { class: 'muted' }, 'Waiting, running and unknown are builds now; succeeded, failed and cancelled are builds finished in the last 24 hours.'),
        table('Queues', ['Queue', 'Runner', ['Concurrency', 'num'], ['Waiting', 'num'], ['Running', 'num'],
          ['Unknown', 'num hide-narrow'], ['Succeeded', 'num'], ['Failed', 'num'], ['Cancelled', 'num hide-narrow'], 'Oldest waiting'], rows)),
      el('section', { 'aria-labelledby': 'history-h' },
        el('h2', { id: 'history-h' }, 'Last 24 hours'),
        el('ul', { class: 'legend' },
          el('li', {}, el('span', { class: 'swatch succeeded', 'aria-hidden': 'true' }), 'succeeded'),
          el('li', {}, el('span', { class: 'swatch failed', 'aria-hidden': 'true' }), 'failed'),
          el('li', {}, el('span', { class: 'swatch cancelled', 'aria-hidden': 'true' }), 'cancelled'),
          el('li', {}, el('span', { class: 'swatch median', 'aria-hidden': 'true' }), 'median run time (right scale)')),
        chart(data.last_24h),
        el('details', {}, el('summary', {}, 'The chart as a table'),
          table('Builds finished per hour', ['Hour', ['Succeeded', 'num'], ['Failed', 'num'], ['Cancelled', 'num'], ['Median run time', 'num']], hourRows))));
  }

  async function overviewPage() {
    document.title = 'Overview · stitch';
    const holder = el('div', {}, el('p', { class: 'muted' }, 'Loading…'));
    main.replaceChildren(el('h1', {}, 'Overview'), holder);
    const data = await api('/v1/queues');
    renderOverview(data, holder);
    window.setInterval(tickAges, 1000);
    const refresh = throttled(async () => {
      try { renderOverview(await api('/v1/queues'), holder); } catch (e) { showError(e); }
    }, 1000);
    followEvents({}, data.event_seq, refresh);
  }

  // ---- Builds ----

  function buildRow(b) {
    return el('tr', { 'data-build': b.id },
      el('td', {}, el('a', { href: `/builds/${b.id}`, class: 'mono' }, b.id)),
      el('td', {}, b.queue),
      el('td', { class: 'status-cell' }, statusBadge(b.status)),
      el('td', { class: 'uri' }, b.head.join(' ')),
      el('td', { class: 'hide-narrow' }, time(b.created_at)),
      el('td', { class: 'num hide-narrow' }, buildDuration(b)));
  }

  async function buildsPage() {
    document.title = 'Builds · stitch';
    const params = new URLSearchParams(window.location.search);
    const queue = params.get('queue') || '';
    const status = params.get('status') || '';
    const cursor = params.get('cursor') || '';
    const queues = await api('/v1/queues');
    const query = new URLSearchParams();
    if (queue) query.set('queue', queue);
    if (status) query.set('status', status);
    query.set('limit', '50');
    if (cursor) query.set('cursor', cursor);
    const page = await api(`/v1/builds?${query}`);

    const queueSelect = el('select', { id: 'filter-queue', name: 'queue' },
      el('option', { value: '' }, 'All queues'),
      queues.queues.map((q) => el('option', { value: q.name, selected: q.name === queue }, q.name)));
    const statusSelect = el('select', { id: 'filter-status', name: 'status' },
      el('option', { value: '' }, 'Any status'),
      STATUSES.map((s) => el('option', { value: s, selected: s === status }, s)));
    const form = el('form', { class: 'filters', method: 'get', action: '/builds', role: 'search', 'aria-label': 'Filter builds' },
      el('label', { for: 'filter-queue' }, 'Queue', queueSelect),
      el('label', { for: 'filter-status' }, 'Status', statusSelect),
      el('button', { type: 'submit' }, 'Apply'));
    const tbody = el('tbody', {}, page.builds.map(buildRow));
    const empty = el('p', { class: 'muted', id: 'no-builds', hidden: page.builds.length > 0 }, 'No builds match.');
    // The API pages forward only. The cursors of the pages before this one
    // ride along in the URL (`back`, oldest first), so Previous is a plain
    // link and a shared URL can still go back.
    const back = cursor ? params.getAll('back').filter((c) => c) : [];
    const pager = el('nav', { class: 'pager', 'aria-label': 'Pages' });
    const base = new URLSearchParams();
    if (queue) base.set('queue', queue);
    if (status) base.set('status', status);
    const pageUrl = (at, stack) => {
      const q = new URLSearchParams(base);
      if (at) {
        q.set('cursor', at);
        for (const c of stack) q.append('back', c);
      }
      return `/builds?${q}`;
    };
    if (cursor) {
      pager.append(el('a', { href: pageUrl('', []), id: 'first-page' }, 'First page'));
      pager.append(el('a', { href: pageUrl(back[back.length - 1], back.slice(0, -1)), rel: 'prev', id: 'prev-page' }, 'Previous page'));
    }
    if (page.next_cursor) {
      pager.append(el('a', { href: pageUrl(page.next_cursor, cursor ? [...back, cursor] : []), rel: 'next', id: 'next-page' }, 'Next page'));
    }
    main.replaceChildren(el('h1', {}, 'Builds'), form,
      el('div', { class: 'table-wrap' }, el('table', { id: 'builds' },
        el('caption', { class: 'visually-hidden' }, 'Builds, newest first'),
        el('thead', {}, el('tr', {},
          el('th', { scope: 'col' }, 'Build'), el('th', { scope: 'col' }, 'Queue'),
          el('th', { scope: 'col' }, 'Status'), el('th', { scope: 'col' }, 'Head'),
          el('th', { scope: 'col', class: 'hide-narrow' }, 'Created'),
          el('th', { scope: 'col', class: 'num hide-narrow' }, 'Duration'))),
        tbody)),
      empty, pager);

    // Live: statuses change in place; on the first page, new builds that
    // match the filter appear on top.
    const pending = new Set();
    followEvents(queue ? { queue } : {}, queues.event_seq, async (ev) => {
      const row = tbody.querySelector(`tr[data-build="${CSS.escape(ev.build_id)}"]`);
      if (row) {
        row.querySelector('.status-cell').replaceChildren(statusBadge(ev.status));
        return;
      }
      if (cursor || (status && ev.status !== status) || pending.has(ev.build_id)) return;
      pending.add(ev.build_id);
      try {
        const b = await api(`/v1/builds/${encodeURIComponent(ev.build_id)}`);
        if (!tbody.querySelector(`tr[data-build="${CSS.escape(b.id)}"]`)) {
          tbody.prepend(buildRow(b));
          empty.hidden = true;
          announce(`New build ${b.id} on ${b.queue}: ${b.status}`);
        }
      } catch (e) {
        if (e instanceof Unauthorized) showLogin(true);
      } finally {
        pending.delete(ev.build_id);
      }
    });
  }

  // ---- One build ----

  // ANSI SGR colours and styles to spans; every other escape sequence is dropped.
  const ANSI = /\x1b\[([0-9;?]*)([A-Za-z])/g;
  function ansiSpans(text) {
    const out = [];
    const state = { fg: null, bg: null, bold: false, dim: false, italic: false, underline: false };
    let at = 0;
    const push = (s) => {
      if (!s) return;
      const classes = [];
      if (state.bold) classes.push('ansi-bold');
      if (state.dim) classes.push('ansi-dim');
      if (state.italic) classes.push('ansi-italic');
      if (state.underline) classes.push('ansi-underline');
      if (!classes.length && state.fg === null && state.bg === null) { out.push(document.createTextNode(s)); return; }
      const span = el('span', { class: classes.join(' ') || null }, s);
      if (state.fg !== null) span.style.color = state.fg;
      if (state.bg !== null) span.style.backgroundColor = state.bg;
      out.push(span);
    };
    const palette = (n) => (n < 16 ? `var(--ansi-${n})` : cube(n));
    for (const m of text.matchAll(ANSI)) {
      push(text.slice(at, m.index));
      at = m.index + m[0].length;
      if (m[2] !== 'm') continue;
      const codes = m[1] === '' ? [0] : m[1].split(';').map((c) => parseInt(c, 10) || 0);
      for (let i = 0; i < codes.length; i++) {
        const c = codes[i];
        if (c === 0) Object.assign(state, { fg: null, bg: null, bold: false, dim: false, italic: false, underline: false });
        else if (c === 1) state.bold = true;
        else if (c === 2) state.dim = true;
        else if (c === 3) state.italic = true;
        else if (c === 4) state.underline = true;
        else if (c === 22) { state.bold = false; state.dim = false; }
        else if (c === 23) state.italic = false;
        else if (c === 24) state.underline = false;
        else if (c >= 30 && c <= 37) state.fg = palette(c - 30);
        else if (c >= 90 && c <= 97) state.fg = palette(c - 90 + 8);
        else if (c === 39) state.fg = null;
        else if (c >= 40 && c <= 47) state.bg = palette(c - 40);
        else if (c >= 100 && c <= 107) state.bg = palette(c - 100 + 8);
        else if (c === 49) state.bg = null;
        else if ((c === 38 || c === 48) && codes[i + 1] === 5) {
          const colour = palette(codes[i + 2] || 0);
          if (c === 38) state.fg = colour; else state.bg = colour;
          i += 2;
        } else if ((c === 38 || c === 48) && codes[i + 1] === 2) {
          const colour = `rgb(${codes[i + 2] || 0}, ${codes[i + 3] || 0}, ${codes[i + 4] || 0})`;
          if (c === 38) state.fg = colour; else state.bg = colour;
          i += 4;
        }
      }
    }
    push(text.slice(at));
    return out;
  }

  function cube(n) {
    if (n >= 232) { const v = 8 + (n - 232) * 10; return `rgb(${v}, ${v}, ${v})`; }
    const i = n - 16;
    const level = (x) => (x === 0 ? 0 : 55 + x * 40);
    return `rgb(${level(Math.floor(i / 36))}, ${level(Math.floor(i / 6) % 6)}, ${level(i % 6)})`;
  }

  function logView(buildId, logStatus) {
    const box = el('div', { class: 'log', id: 'log', role: 'log', 'aria-live': 'off', tabindex: '0', 'aria-label': 'Build log' });
    const follow = el('input', { type: 'checkbox', id: 'follow', checked: true });
    const foldAll = el('button', { type: 'button', id: 'fold-all' }, 'Fold all steps');
    const unfoldAll = el('button', { type: 'button', id: 'unfold-all' }, 'Unfold all steps');
    const steps = new Map();
    let loose = null;
    let count = 0;
    let started = false;
    let finished = false;
    let autoScrolling = false;

    const stick = () => {
      if (!follow.checked) return;
      autoScrolling = true;
      box.scrollTop = box.scrollHeight;
    };
    box.addEventListener('scroll', () => {
      if (autoScrolling) { autoScrolling = false; return; }
      // Scrolling up stops following; back at the end follows again.
      follow.checked = box.scrollTop + box.clientHeight >= box.scrollHeight - 4;
    });
    follow.addEventListener('change', stick);
    foldAll.addEventListener('click', () => { for (const s of steps.values()) s.details.open = false; });
    unfoldAll.addEventListener('click', () => { for (const s of steps.values()) s.details.open = true; });

    const stepFor = (line) => {
      if (line.step_id === undefined || line.step_id === null) {
        if (!loose) { loose = el('div', { class: 'lines' }); box.append(loose); }
        return loose;
      }
      let step = steps.get(line.step_id);
      if (!step) {
        const state = el('span', { class: 'muted' });
        const summary = el('summary', {}, `Step ${line.step_id}`, state);
        const lines = el('div', { class: 'lines' });
        const details = el('details', { open: true, 'data-step': line.step_id }, summary, lines);
        step = { details, summary, lines, state };
        steps.set(line.step_id, step);
        box.append(details);
      }
      return step.lines;
    };

    const append = (line) => {
      count++;
      if (line.kind === 'control') {
        stepFor(line);
        const step = steps.get(line.step_id);
        if (step && line.step_status === 'start') {
          step.summary.replaceChildren(...[line.content || `Step ${line.step_id}`,
            line.step_command ? el('span', { class: 'cmd' }, line.step_command) : null, step.state].filter(Boolean));
        } else if (step && line.step_status === 'end') {
          step.state.textContent = ' — done';
        }
      } else {
        const target = stepFor(line);
        target.append(el('div', { class: `line ${line.stream === 'stderr' ? 'stderr' : ''}` }, ansiSpans(line.content || '')));
      }
      stick();
    };

    // Opens the log stream; resumes after the frames already shown. Resolves
    // when the log ended, false when the build has no log (yet).
    const open = async () => {
      if (started || finished) return;
      started = true;
      try {
        await readSse(`/v1/builds/${encodeURIComponent(buildId)}/logs?after=${count}`, (f) => {
          if (f.event === 'log') append(JSON.parse(f.data));
          else if (f.event === 'end') { finished = true; logStatus.textContent = `Log complete (${count} lines).`; }
          else if (f.event === 'error') logStatus.textContent = 'Reading the log failed; reload to try again.';
        });
        if (!finished) logStatus.textContent = 'The log stream ended early; reload to resume.';
      } catch (e) {
        if (pageStreams.signal.aborted) return;
        if (e instanceof Unauthorized) { showLogin(true); return; }
        if (e instanceof ApiFailure && e.code === 'logs_not_found') logStatus.textContent = 'No log yet: it appears once the build starts on its runner.';
        else logStatus.textContent = `The log cannot be read: ${e.message}`;
      } finally {
        started = false;
      }
    };
    const toolbar = el('div', { class: 'toolbar' },
      el('label', { for: 'follow' }, follow, ' Follow the end'), foldAll, unfoldAll);
    return { toolbar, box, open, done: () => finished };
  }

  function facts(b) {
    const m = b.metadata || {};
    const list = (uris) => (uris.length ? el('ul', {}, uris.map((u) => el('li', {}, uriNode(u)))) : el('span', { class: 'muted' }, 'none'));
    const rows = [
      ['Queue', el('a', { href: `/builds?queue=${encodeURIComponent(b.queue)}` }, b.queue)],
      ['Status', el('span', { id: 'build-status' }, statusBadge(b.status), b.cancel_requested && !TERMINAL.has(b.status) ? ' (cancel requested)' : '')],
      ['Created', time(b.created_at)],
      ['Finished', time(b.finished_at)],
      ['Duration', buildDuration(b)],
      ['Base', list(b.base)],
      ['Head', list(b.head)],
      ['CI build', b.url ? el('a', { href: b.url, rel: 'noreferrer', id: 'provider-link' }, b.runner_ref ? `${b.runner_ref.id} at the provider` : b.url)
        : (b.runner_ref ? b.runner_ref.id : el('span', { class: 'muted' }, 'not created yet'))],
    ];
    if (m.error) rows.push(['Failure reason', el('span', { id: 'failure-reason', class: 'error' }, m.error)]);
    const dl = el('dl', { class: 'facts' }, rows.map(([k, v]) => [el('dt', {}, k), el('dd', {}, v)]));
    const keys = Object.keys(m).sort();
    const meta = keys.length
      ? table('Metadata', ['Key', 'Value'], keys.map((k) => el('tr', {}, el('th', { scope: 'row', class: 'mono' }, k), el('td', { class: 'uri' }, m[k]))))
      : el('p', { class: 'muted' }, 'No metadata.');
    const promise = m.promised_exit_status
      ? el('p', { class: 'promise', id: 'promised-failure', role: 'note' },
        el('strong', {}, `Promised failure: exit status ${m.promised_exit_status}`),
        m.promised_exit_status_reason ? ` — ${m.promised_exit_status_reason}` : '',
        m.promised_exit_status_at ? [' (', time(m.promised_exit_status_at), ')'] : '')
      : null;
    return { dl, meta, promise };
  }

  async function buildPage(id) {
    document.title = `Build ${id} · stitch`;
    let build = await api(`/v1/builds/${encodeURIComponent(id)}`);
    const summary = el('div', {});
    const metaHolder = el('div', {});
    const cancel = el('button', { type: 'button', id: 'cancel', class: 'danger' }, 'Cancel build');
    const cancelNote = el('span', { role: 'status', class: 'muted', id: 'cancel-note' });
    const timeline = el('ol', { class: 'timeline', id: 'timeline', 'aria-label': 'Events of this build' });
    const logStatus = el('p', { class: 'muted', role: 'status', id: 'log-status' });
    const log = logView(build.id, logStatus);

    const render = () => {
      const f = facts(build);
      summary.replaceChildren(...[f.promise, f.dl].filter(Boolean));
      metaHolder.replaceChildren(f.meta);
      const over = TERMINAL.has(build.status);
      cancel.disabled = over || build.cancel_requested;
      cancel.textContent = build.cancel_requested && !over ? 'Cancel requested' : 'Cancel build';
      document.title = `Build ${build.id} (${build.status}) · stitch`;
    };
    cancel.addEventListener('click', async () => {
      cancel.disabled = true;
      try {
        build = await api(`/v1/builds/${encodeURIComponent(build.id)}/cancel`, { method: 'POST' });
        cancelNote.textContent = 'Cancellation requested; the status turns cancelled when the CI confirms.';
        render();
      } catch (e) {
        if (e instanceof Unauthorized) { showLogin(true); return; }
        cancelNote.textContent = `Cancel failed: ${e.message}`;
        cancel.disabled = false;
      }
    });

    main.replaceChildren(
      el('h1', {}, 'Build ', el('span', { class: 'mono' }, build.id)),
      el('div', { class: 'toolbar' }, cancel, cancelNote),
      summary,
      el('section', { 'aria-labelledby': 'log-h' }, el('h2', { id: 'log-h' }, 'Log'), log.toolbar, logStatus, log.box),
      el('section', { 'aria-labelledby': 'timeline-h' }, el('h2', { id: 'timeline-h' }, 'Timeline'), timeline),
      el('section', { 'aria-labelledby': 'meta-h' }, el('h2', { id: 'meta-h' }, 'Metadata'), el('p', { class: 'muted' }, 'The caller\'s keys and the runner\'s.'), metaHolder));
    render();
    log.open();

    const reload = throttled(async () => {
      try {
        build = await api(`/v1/builds/${encodeURIComponent(build.id)}`);
        render();
        log.open();
      } catch (e) {
        if (e instanceof Unauthorized) showLogin(true);
      }
    }, 500);
    followEvents({ build: build.id }, 0, (ev) => {
      timeline.append(el('li', { 'data-seq': ev.seq }, time(ev.at), ' ',
        ev.kind === 'failing' ? el('strong', {}, 'failure promised') : statusBadge(ev.status)));
      if (ev.status !== build.status) announce(`Build is ${ev.status}`);
      reload();
    });
  }

  // ---- Dead letters ----

  function deadLetterRow(topic, d, onReplay) {
    const button = el('button', { type: 'button', 'data-replay': d.id, 'aria-label': `Replay dead letter ${d.id}${d.build_id ? ` of build ${d.build_id}` : ''}` }, 'Replay');
    button.addEventListener('click', () => onReplay(d, button));
    return el('tr', { 'data-dead-letter': d.id },
      el('td', { class: 'num' }, d.id),
      el('td', {}, d.build_id ? el('a', { href: `/builds/${d.build_id}`, class: 'mono' }, d.build_id) : el('code', {}, d.message_id)),
      el('td', { class: 'hide-narrow' }, d.group),
      el('td', { class: 'num' }, d.attempts),
      el('td', { class: 'uri' }, d.failure),
      el('td', { class: 'hide-narrow' }, time(d.failed_at)),
      el('td', {}, button));
  }

  async function topicSection(topic, help) {
    const tbody = el('tbody', {});
    const note = el('p', { class: 'muted', role: 'status' });
    const more = el('button', { type: 'button', hidden: true }, 'Load more');
    let after = 0;
    const onReplay = async (d, button) => {
      button.disabled = true;
      try {
        await api(`/v1/dead-letters/${topic}/${d.id}/replay`, { method: 'POST' });
        const row = tbody.querySelector(`tr[data-dead-letter="${d.id}"]`);
        const next = row && (row.nextElementSibling || row.previousElementSibling);
        if (row) row.remove();
        note.textContent = `Dead letter ${d.id} replayed: its message is back on the ${topic} stage.`;
        const focusTarget = next && next.querySelector('button');
        if (focusTarget) focusTarget.focus();
      } catch (e) {
        if (e instanceof Unauthorized) { showLogin(true); return; }
        note.textContent = `Replay of ${d.id} failed: ${e.message}`;
        button.disabled = false;
      }
    };
    const load = async () => {
      const page = await api(`/v1/dead-letters?topic=${topic}&after=${after}&limit=100`);
      tbody.append(...page.dead_letters.map((d) => deadLetterRow(topic, d, onReplay)));
      after = page.next_after || after;
      more.hidden = page.next_after === null;
      if (!tbody.children.length) note.textContent = 'None.';
    };
    more.addEventListener('click', () => load().catch(showError));
    await load();
    return el('section', { 'aria-labelledby': `topic-${topic}`, 'data-topic': topic },
      el('h2', { id: `topic-${topic}` }, 'Topic ', el('code', {}, topic)),
      el('p', { class: 'muted' }, help),
      table(`Dead letters of ${topic}`, [['Id', 'num'], 'Build', ['Group', 'hide-narrow'], ['Attempts', 'num'], 'Failure', ['Failed', 'hide-narrow'], 'Action'], tbody),
      note, more);
  }

  async function deadLettersPage() {
    document.title = 'Dead letters · stitch';
    const sections = [];
    for (const [topic, help] of TOPICS) {
      const section = await topicSection(topic, help);
      sections.push(section);
    }
    main.replaceChildren(el('h1', {}, 'Dead letters'),
      el('p', {}, 'Messages a stage gave up on. Replay puts one back on its stage, with the same build; if the stage gives up again it comes back here.'),
      ...sections);
  }

  // ---- Routing ----

  function markNav(page) {
    for (const a of document.querySelectorAll('.top nav a')) {
      if (a.dataset.page === page) a.setAttribute('aria-current', 'page');
      else a.removeAttribute('aria-current');
    }
  }

  async function start() {
    const forget = document.getElementById('forget-token');
    if (sessionStorage.getItem(TOKEN_KEY)) forget.hidden = false;
    forget.addEventListener('click', () => { sessionStorage.removeItem(TOKEN_KEY); window.location.reload(); });
    const path = window.location.pathname;
    try {
      if (path === '/') { markNav('overview'); await overviewPage(); }
      else if (path === '/builds') { markNav('builds'); await buildsPage(); }
      else if (path.startsWith('/builds/')) { markNav('builds'); await buildPage(decodeURIComponent(path.slice('/builds/'.length))); }
      else if (path === '/dead-letters') { markNav('dead-letters'); await deadLettersPage(); }
      else main.replaceChildren(el('h1', {}, 'Not found'));
      document.body.dataset.ready = 'true';
    } catch (e) {
      showError(e);
      document.body.dataset.ready = 'true';
    }
  }

  start();
})();
