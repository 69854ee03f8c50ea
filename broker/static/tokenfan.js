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
    this._ready = new Promise((resolve) => { this._resolveReady = resolve })
    this.realtime._subscribe(this, false)
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
    if (this._resolveReady) { this._resolveReady(status); this._resolveReady = null }
    for (const handler of this._handlers.get('subscribed') || []) handler(status)
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

export class Realtime {
  /** @param {{ url: string, backoff?: [number, number], WebSocket?: typeof WebSocket }} options */
  constructor ({ url, backoff = [100, 5000], WebSocket: Socket = globalThis.WebSocket }) {
    if (!Socket) throw new Error('no WebSocket implementation: pass { WebSocket } (Node < 22)')
    this.url = url
    this.backoff = backoff
    this.state = 'connecting'
    this.channels = new Map()
    this._Socket = Socket
    this._ids = 0
    this._pending = new Map()
    this._stateHandlers = []
    this._attempt = 0
    this._closedByApp = false
    this._mayReconnect = true
    this._connect()
  }

  /** The channel called `name` (the same object each time). */
  channel (name) {
    if (!this.channels.has(name)) this.channels.set(name, new Channel(this, name))
    return this.channels.get(name)
  }

  /** Call fn(state) on 'connecting' | 'open' | 'reconnecting' | 'closed'. */
  onState (fn) { this._stateHandlers.push(fn); return this }

  close () {
    this._closedByApp = true
    if (this._timer) clearTimeout(this._timer)
    if (this.socket) this.socket.close(1000)
    this._setState('closed')
  }

  _setState (state) {
    if (this.state === state) return
    this.state = state
    for (const fn of this._stateHandlers) fn(state)
  }

  _connect () {
    const socket = new this._Socket(this.url)
    socket.binaryType = 'arraybuffer'
    this.socket = socket
    this._mayReconnect = true
    socket.onopen = () => {
      this._attempt = 0
      this._setState('open')
      for (const channel of this.channels.values()) {
        if (channel.subscribed) this._subscribe(channel, channel.epoch !== null)
      }
    }
    socket.onmessage = (message) => {
      for (const frame of decodeMessage(new Uint8Array(message.data))) this._dispatch(frame)
    }
    socket.onclose = () => {
      for (const { reject } of this._pending.values()) reject(new Error('connection lost before the reply'))
      this._pending.clear()
      if (this._closedByApp) return
      if (!this._mayReconnect) { this._setState('closed'); return }
      this._setState('reconnecting')
      const [low, high] = this.backoff
      const delay = Math.min(high, low * 2 ** this._attempt++) * (0.5 + Math.random() / 2)
      this._timer = setTimeout(() => this._connect(), delay)
    }
  }

  _subscribe (channel, resubscribed) {
    if (this.state !== 'open') return // onopen subscribes it
    const since = resubscribed ? { o: channel.offset, ep: channel.epoch } : channel._since
    const frame = { t: 'sub', ch: channel.name }
    if (since) frame.since = since
    channel._live = false
    this._request(frame, (ok) => channel._confirmed(ok, resubscribed)).catch((error) => {
      if (!/connection lost/.test(error.message)) channel._emit('error', { error }, false)
    })
  }

  /** Send a command; resolve with its ok (onOk runs before any later frame is handled). */
  _request (frame, onOk = null) {
    return new Promise((resolve, reject) => {
      if (this.state !== 'open') { reject(new Error('connection lost before the reply: not connected')); return }
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
      this._mayReconnect = Boolean(frame.reconnect)
    }
  }
}
