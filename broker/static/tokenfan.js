// tokenfan.js: the browser and Node client of the tokenfan protocol. One ES module, no build step.
// The broker serves it at /tokenfan.js; npm's `tokenfan` package (clients/js/) is built from this
// file, importing '@msgpack/msgpack' instead of ./vendor/msgpack (Node < 22: pass { WebSocket } from 'ws').
//
//   import { Realtime } from '/tokenfan.js'
//   const realtime = new Realtime({ url: 'ws://127.0.0.1:8765/ws' })
//   const channel = realtime.channel(`ai-chat/${sessionId}`)
//   channel.on('ai:token', ({ data }) => append(data.token))
//          .on('ai:done', () => setStreaming(false))
//          .subscribe()
//   await channel.ready()            // the broker confirmed: safe to POST /ai/chat now
//   channel.publish('ai:cancel', {})
//
// On a broker that authenticates ([auth] with a JWT key), pass getToken: an async function returning
// a user token minted by the app's server (docs/security.md), or null for none:
//
//   const realtime = new Realtime({ url, getToken: () => fetch('/my/token').then((r) => r.text()) })
//
// It is called before every connection (the first and each reconnect); the token goes to the broker
// in `hello` before anything else. Before the token expires (80% of its remaining lifetime, at most
// a minute ahead) getToken is called again and the fresh token sent in a new `hello`, so the
// connection lives on. A token the broker refuses (bye 4009 UNAUTHORIZED) stops the client:
// state 'closed', realtime.error, onError handlers and channels' 'error' handlers say why. An
// expired one (bye 4104 TOKEN_EXPIRED) makes it reconnect with a fresh token and recover.
//
// Frames are msgpack maps (docs/protocol.md), several per WebSocket message. The client
// reconnects with jittered exponential backoff and subscribes again with `since` (the last
// offset and epoch it saw), so handlers see every publication exactly once; when the broker
// cannot replay what was missed, 'subscribed' handlers get { recovered: false }.

import { Encoder, decodeMulti } from './vendor/msgpack/index.mjs'

const encoder = new Encoder({ useBigInt64: true })
const decodeOptions = { useBigInt64: true }

/** Offsets and ids beyond 2^53 stay BigInt; smaller ones are plain numbers. */
function normalize (value) {
  if (typeof value === 'bigint') {
    return value <= BigInt(Number.MAX_SAFE_INTEGER) && value >= -BigInt(Number.MAX_SAFE_INTEGER) ? Number(value) : value
  }
  if (Array.isArray(value)) return value.map(normalize)
  if (value instanceof Uint8Array) return value
  if (value !== null && typeof value === 'object') {
    const out = {}
    for (const [key, child] of Object.entries(value)) out[key] = normalize(child)
    return out
  }
  return value
}

/** Integers beyond 32 bits as BigInt: with useBigInt64 the encoder writes numbers there as floats. */
function wide (value) {
  if (typeof value === 'number') {
    return Number.isSafeInteger(value) && (value >= 2 ** 32 || value < -(2 ** 31)) ? BigInt(value) : value
  }
  if (Array.isArray(value)) return value.map(wide)
  if (value instanceof Uint8Array) return value
  if (value !== null && typeof value === 'object') {
    const out = {}
    for (const [key, child] of Object.entries(value)) out[key] = wide(child)
    return out
  }
  return value
}

/** Encode one frame (a plain object with `t`) to msgpack bytes, every integer in its smallest form. */
export function encodeFrame (frame) {
  return encoder.encode(wide(frame))
}

/** Decode one WebSocket message payload into its frames. */
export function decodeMessage (bytes) {
  return Array.from(decodeMulti(bytes, decodeOptions), normalize)
}

function later (a, b) { return BigInt(a) > BigInt(b) }

export class Channel {
  constructor (realtime, name) {
    this.realtime = realtime
    this.name = name
    this.offset = null // last offset seen
    this.epoch = null
    this.recovered = false
    this.subscribed = false // the app wants it
    this._handlers = new Map()
    this._since = null
    this._ready = null
    this._resolveReady = null
    this._rejectReady = null
    this._live = false // the current `sub` is confirmed: events of this channel are ours
  }

  /** Call handler({ event, data, channel, offset }) for each `event` ('*': every event). Also
   *  'subscribed' ({ recovered, offset, epoch, resubscribed }) and 'gap' ({ from, to }). Chainable. */
  on (event, handler) {
    if (!this._handlers.has(event)) this._handlers.set(event, [])
    this._handlers.get(event).push(handler)
    return this
  }

  off (event, handler) {
    const list = this._handlers.get(event) || []
    const index = list.indexOf(handler)
    if (index >= 0) list.splice(index, 1)
    return this
  }

  /** Subscribe (once connected). `since`: { o, ep } to recover after a position, { o: 0 } for the stream so far. */
  subscribe ({ since = null } = {}) {
    this.subscribed = true
    this._since = since
    this._ready = new Promise((resolve, reject) => { this._resolveReady = resolve; this._rejectReady = reject })
    this._ready.catch(() => {}) // rejected when the client stops for good; only ready()'s callers need to hear
    if (this.realtime.error) this._failed(this.realtime.error)
    else this.realtime._subscribe(this, false)
    return this
  }

  /** Resolves with { recovered, offset, epoch } once the broker has confirmed the subscription. */
  ready () {
    return this._ready || Promise.reject(new Error(`subscribe to ${this.name} first`))
  }

  publish (event, data = {}) {
    return this.realtime._request({ t: 'pub', ch: this.name, ev: event, d: data })
      .then((ok) => ({ offset: ok.o, epoch: ok.ep }))
  }

  async unsubscribe () {
    this.subscribed = false
    this._live = false
    this.realtime.channels.delete(this.name)
    if (this.realtime.state === 'open') await this.realtime._request({ t: 'unsub', ch: this.name })
  }

  _emit (event, payload, everyEvent = true) {
    for (const key of everyEvent ? [event, '*'] : [event]) {
      for (const handler of this._handlers.get(key) || []) {
        try { handler(payload) } catch (error) { console.error('tokenfan handler failed', error) }
      }
    }
  }

  _confirmed (ok, resubscribed) {
    this._live = true
    this.offset = ok.o
    this.epoch = ok.ep
    this.recovered = Boolean(ok.recovered)
    const status = { recovered: this.recovered, offset: ok.o, epoch: ok.ep, resubscribed }
    if (this._resolveReady) { this._resolveReady(status); this._resolveReady = this._rejectReady = null }
    for (const handler of this._handlers.get('subscribed') || []) handler(status)
  }

  /** The client stopped for good (e.g. the broker refused the token): tell ready() and 'error' handlers. */
  _failed (error) {
    this._live = false
    if (this._rejectReady) { this._rejectReady(error); this._resolveReady = this._rejectReady = null }
    this._emit('error', { error }, false)
  }

  _deliver (frame) {
    // Before our `sub` is confirmed, events of this name are the tail of an earlier subscription
    // (one unsubscribed just before, e.g. a React effect run twice): our own replay follows the `ok`.
    if (!this._live) return
    if (this.offset !== null && !later(frame.o, this.offset)) return // seen already
    this.offset = frame.o
    this._emit(frame.ev, { event: frame.ev, data: frame.d, channel: this.name, offset: frame.o, firstOffset: frame.o0 ?? frame.o })
  }
}

/** What the client calls itself in `hello`. */
const CLIENT_NAME = 'tokenfan.js/0.1.0'
/** Refresh the token when this share of its remaining lifetime has passed… */
const REFRESH_AT = 0.8
/** …but no earlier than this many ms before it expires. */
const REFRESH_MARGIN_MS = 60_000
/** The shortest wait before a refresh (a token that looks expired on this clock is not asked for in a loop). */
const MIN_REFRESH_MS = 1000
/** Timers fire early beyond 2^31 − 1 ms; longer waits are taken in steps. */
const MAX_TIMER_MS = 2 ** 31 - 1

/** An Error with the `code` of the protocol (docs/protocol.md §4) and whether the client reconnects. */
function failure (message, code, reconnect) {
  const error = new Error(message)
  error.code = code
  error.reconnect = reconnect
  return error
}

export class Realtime {
  /**
   * `new Realtime({ url, getToken, backoff, WebSocket })`, or `new Realtime(url, { getToken, … })`.
   * @param {string | { url: string, getToken?: () => Promise<string | null> | string | null,
   *   backoff?: [number, number], WebSocket?: typeof WebSocket }} urlOrOptions
   */
  constructor (urlOrOptions, options = {}) {
    const settings = typeof urlOrOptions === 'string' ? { ...options, url: urlOrOptions } : { ...urlOrOptions }
    const { url, backoff = [100, 5000], WebSocket: Socket = globalThis.WebSocket, getToken = null } = settings
    if (typeof url !== 'string' || !url) throw new Error("Realtime needs a url, e.g. new Realtime({ url: 'ws://127.0.0.1:8765/ws' })")
    if (!Socket) throw new Error('no WebSocket implementation: pass { WebSocket } (Node < 22)')
    if (getToken !== null && typeof getToken !== 'function') throw new TypeError('getToken must be a function returning a token (or a promise of one)')
    this.url = url
    this.backoff = backoff
    this.getToken = getToken
    this.state = 'connecting'
    this.channels = new Map()
    this.user = null // the token's `sub`, once the broker accepted it
    this.exp = null // when the connection's token expires (Unix seconds), on a broker that authenticates
    this.error = null // why the client stopped for good (an Error with `code`), once it has
    this._Socket = Socket
    this._ids = 0
    this._pending = new Map()
    this._stateHandlers = []
    this._errorHandlers = []
    this._attempt = 0
    this._closedByApp = false
    this._mayReconnect = true
    this._bye = null
    this._round = 0 // each connection attempt's number: late answers of an earlier one are ignored
    this._refreshTimer = null
    this._refreshAt = 0
    this._connect()
  }

  /** The channel called `name` (the same object each time). */
  channel (name) {
    if (!this.channels.has(name)) this.channels.set(name, new Channel(this, name))
    return this.channels.get(name)
  }

  /** Call fn(state, why) on 'connecting' | 'open' | 'reconnecting' | 'closed'; `why` (an Error with
   *  `code`, or null) says how the last connection ended. */
  onState (fn) { this._stateHandlers.push(fn); return this }

  /** Call fn(error) when something goes wrong that the app may want to show: the broker refused the
   *  token (error.code 4009; the client stops), or getToken failed (it retries). */
  onError (fn) { this._errorHandlers.push(fn); return this }

  close () {
    this._closedByApp = true
    this._round++
    if (this._timer) clearTimeout(this._timer)
    this._clearRefresh()
    for (const { reject } of this._pending.values()) reject(new Error('connection lost before the reply: closed'))
    this._pending.clear()
    if (this.socket) this.socket.close(1000)
    this._setState('closed')
  }

  _setState (state, why = null) {
    if (this.state === state) return
    this.state = state
    for (const fn of this._stateHandlers) fn(state, why)
  }

  _report (error) {
    for (const fn of this._errorHandlers) {
      try { fn(error) } catch (failed) { console.error('tokenfan error handler failed', failed) }
    }
  }

  /** Connect: ask getToken first (if given), then open the WebSocket. */
  _connect () {
    const round = ++this._round
    if (!this.getToken) { this._open(null, round); return }
    const failed = (error) => {
      if (round !== this._round) return
      const why = failure(`getToken failed: ${error?.message ?? error}`, undefined, true)
      why.cause = error
      this._report(why)
      this._retry(why)
    }
    let token
    try { token = Promise.resolve(this.getToken()) } catch (error) { token = Promise.reject(error) }
    token.then((value) => {
      if (round !== this._round) return
      if (value !== null && value !== undefined && typeof value !== 'string') {
        failed(new TypeError(`getToken must return a string or null, not ${typeof value}`))
        return
      }
      this._open(value ?? null, round)
    }, failed)
  }

  _open (token, round) {
    const socket = new this._Socket(this.url)
    socket.binaryType = 'arraybuffer'
    this.socket = socket
    this._mayReconnect = true
    this._bye = null
    socket.onopen = () => {
      if (round !== this._round) return
      if (token === null) { this._opened(); return }
      // Authenticate first: the broker accepts nothing else until it has the token.
      this._call({ t: 'hello', token, client: CLIENT_NAME }, (ok) => {
        this._authenticated(ok)
        this._opened()
      }).catch((error) => {
        if (round !== this._round || error.code === undefined) return // the bye that follows says why
        // The broker could not read the hello (e.g. a token longer than it takes): it will not
        // accept the next attempt either.
        this._mayReconnect = false
        this._bye = { code: error.code, msg: `the broker refused the token: ${error.message}`, reconnect: false }
        socket.close(1000)
      })
    }
    socket.onmessage = (message) => {
      if (round !== this._round) return
      for (const frame of decodeMessage(new Uint8Array(message.data))) this._dispatch(frame)
    }
    socket.onclose = (event) => {
      if (round !== this._round) return
      this._clearRefresh()
      for (const { reject } of this._pending.values()) reject(new Error('connection lost before the reply'))
      this._pending.clear()
      if (this._closedByApp) return
      const code = this._bye?.code ?? event?.code ?? 1006
      const message = this._bye?.msg || event?.reason || 'connection lost'
      // Without a bye, a close code below 4100 answered something this client sent: trying again changes nothing.
      const reconnect = this._mayReconnect && (this._bye ? Boolean(this._bye.reconnect) : !(code >= 4000 && code < 4100))
      const why = failure(`${message} (code ${code})`, code, reconnect)
      if (!reconnect) { this._stop(why); return }
      this._retry(why)
    }
  }

  /** The connection is usable (authenticated where the broker wants it): subscribe again. */
  _opened () {
    // Back off afresh, unless the broker took a token already past its exp (it ends the connection
    // with TOKEN_EXPIRED at once: reconnecting at full speed would only repeat that).
    if (this.exp === null || Number(this.exp) * 1000 > Date.now()) this._attempt = 0
    this._setState('open')
    for (const channel of this.channels.values()) {
      if (channel.subscribed) this._subscribe(channel, channel.epoch !== null)
    }
  }

  /** Wait (jittered exponential backoff), then connect again. */
  _retry (why) {
    this._setState('reconnecting', why)
    const [low, high] = this.backoff
    const delay = Math.min(high, low * 2 ** this._attempt++) * (0.5 + Math.random() / 2)
    this._timer = setTimeout(() => this._connect(), delay)
  }

  /** Stop for good (the broker refused us): say why to the app, the channels and their ready() promises. */
  _stop (why) {
    this.error = why
    this._setState('closed', why)
    this._report(why)
    for (const channel of this.channels.values()) {
      if (channel.subscribed) channel._failed(why)
    }
  }

  /** The broker accepted a token (`ok` of hello): note who and until when, and plan the refresh. */
  _authenticated (ok) {
    this.user = ok.user ?? null
    this.exp = ok.exp ?? null
    this._clearRefresh()
    if (!this.getToken || this.exp === null) return
    // Refresh once REFRESH_AT of the remaining lifetime has passed, at the latest a minute before exp.
    const remaining = Number(this.exp) * 1000 - Date.now()
    this._planRefresh(Date.now() + Math.max(MIN_REFRESH_MS, remaining - Math.min(remaining * (1 - REFRESH_AT), REFRESH_MARGIN_MS)))
  }

  _planRefresh (at) {
    this._clearRefresh()
    this._refreshAt = at
    const round = this._round
    const wake = () => {
      if (round !== this._round) return
      const left = this._refreshAt - Date.now()
      if (left > 0) { this._refreshTimer = setTimeout(wake, Math.min(left, MAX_TIMER_MS)); return }
      this._refreshTimer = null
      this._refresh(round)
    }
    this._refreshTimer = setTimeout(wake, Math.min(Math.max(0, at - Date.now()), MAX_TIMER_MS))
  }

  _clearRefresh () {
    if (this._refreshTimer !== null) clearTimeout(this._refreshTimer)
    this._refreshTimer = null
  }

  /** Ask getToken for a fresh token and send it in a hello: the connection lives on past the old exp. */
  async _refresh (round) {
    let token
    try {
      token = await this.getToken()
      if (round !== this._round || this.state !== 'open') return
      if (token === null || token === undefined) return // none to give: the broker ends the connection at exp
      if (typeof token !== 'string') throw new TypeError(`getToken must return a string or null, not ${typeof token}`)
      const ok = await this._request({ t: 'hello', token, client: CLIENT_NAME })
      if (round === this._round) this._authenticated(ok)
    } catch (error) {
      if (round !== this._round || /connection lost/.test(error.message)) return
      const why = failure(`refreshing the token failed: ${error.message}`, error.code, true)
      why.cause = error
      this._report(why)
      // Try again while the token lasts; past exp the broker says TOKEN_EXPIRED and we reconnect.
      const left = Number(this.exp ?? 0) * 1000 - Date.now()
      if (left > 0) this._planRefresh(Date.now() + Math.max(MIN_REFRESH_MS, left / 4))
    }
  }

  _subscribe (channel, resubscribed) {
    if (this.state !== 'open') return // onopen subscribes it
    const since = resubscribed ? { o: channel.offset, ep: channel.epoch } : channel._since
    const frame = { t: 'sub', ch: channel.name }
    if (since) frame.since = since
    channel._live = false
    this._request(frame, (ok) => channel._confirmed(ok, resubscribed)).catch((error) => {
      if (/connection lost/.test(error.message)) return // subscribed again on the next connection
      if (channel._rejectReady) { channel._rejectReady(error); channel._resolveReady = channel._rejectReady = null }
      channel._emit('error', { error }, false)
    })
  }

  /** Send a command; resolve with its ok (onOk runs before any later frame is handled). */
  _request (frame, onOk = null) {
    if (this.state !== 'open') return Promise.reject(new Error('connection lost before the reply: not connected'))
    return this._call(frame, onOk)
  }

  /** Send a command on the current socket, open or still authenticating. */
  _call (frame, onOk = null) {
    return new Promise((resolve, reject) => {
      const id = ++this._ids
      this._pending.set(id, { resolve, reject, onOk })
      this.socket.send(encodeFrame({ ...frame, id }))
    })
  }

  _dispatch (frame) {
    if (frame.t === 'ev') {
      const channel = this.channels.get(frame.ch)
      if (channel) channel._deliver(frame)
    } else if (frame.t === 'ok' || frame.t === 'err') {
      const pending = this._pending.get(frame.id)
      if (!pending) return
      this._pending.delete(frame.id)
      if (frame.t === 'ok') {
        if (pending.onOk) pending.onOk(frame)
        pending.resolve(frame)
      } else {
        const error = new Error(`${frame.msg} (code ${frame.code})`)
        error.code = frame.code
        pending.reject(error)
      }
    } else if (frame.t === 'gap') {
      const channel = this.channels.get(frame.ch)
      if (channel?._live) { channel.offset = frame.o; channel._emit('gap', { from: frame.o0, to: frame.o }, false) }
    } else if (frame.t === 'bye') {
      this._bye = frame
      if (!frame.reconnect) this._mayReconnect = false
    }
  }
}
