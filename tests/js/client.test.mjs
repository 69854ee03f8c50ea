// The browser client's subscription bookkeeping (broker/static/tokenfan.js), over a scripted socket.
import { test } from 'node:test'
import assert from 'node:assert/strict'
import { Realtime, encodeFrame, decodeMessage } from '../../broker/static/tokenfan.js'

class ScriptedSocket {
  static last = null
  constructor (url) { this.url = url; this.sent = []; ScriptedSocket.last = this }
  send (bytes) { this.sent.push(...decodeMessage(bytes)) }
  close () { this.onclose?.({}) }
  open () { this.onopen?.({}) }
  receive (...frames) {
    const parts = frames.map(encodeFrame)
    const bytes = new Uint8Array(parts.reduce((n, part) => n + part.length, 0))
    let at = 0
    for (const part of parts) { bytes.set(part, at); at += part.length }
    this.onmessage({ data: bytes.buffer })
  }
}

const ev = (o, token) => ({ t: 'ev', ch: 'ai-chat/1', ev: 'ai:token', d: { token }, o })

test('a channel subscribed again ignores what was in flight for the earlier subscription', async () => {
  const realtime = new Realtime({ url: 'ws://broker/ws', WebSocket: ScriptedSocket })
  const socket = ScriptedSocket.last
  socket.open()
  const first = realtime.channel('ai-chat/1').subscribe({ since: { o: 0 } })
  const left = first.unsubscribe()
  const second = realtime.channel('ai-chat/1')
  assert.notEqual(second, first)
  const seen = []
  second.on('ai:token', ({ data, offset }) => seen.push(`${data.token}@${offset}`)).subscribe({ since: { o: 0 } })
  assert.deepEqual(socket.sent.map(({ t, id }) => `${t}#${id}`), ['sub#1', 'unsub#2', 'sub#3'])

  // The broker answers in order: the first subscription's replay arrives before the second's ok.
  socket.receive({ t: 'ok', id: 1, ch: 'ai-chat/1', o: 0, ep: 'e', recovered: true }, ev(1, 'a'), ev(2, 'b'))
  socket.receive({ t: 'ok', id: 2 })
  await left
  assert.deepEqual(seen, [])
  socket.receive({ t: 'ok', id: 3, ch: 'ai-chat/1', o: 0, ep: 'e', recovered: true }, ev(1, 'a'), ev(2, 'b'))
  socket.receive(ev(3, 'c'))
  assert.deepEqual(seen, ['a@1', 'b@2', 'c@3'])
  assert.deepEqual(await second.ready(), { recovered: true, offset: 0, epoch: 'e', resubscribed: false })
  realtime.close()
})

test('a reconnect drops nothing and repeats nothing; recovered: false says so', () => {
  const realtime = new Realtime({ url: 'ws://broker/ws', WebSocket: ScriptedSocket, backoff: [0, 0] })
  let socket = ScriptedSocket.last
  socket.open()
  const seen = []
  const statuses = []
  realtime.channel('ai-chat/1')
    .on('ai:token', ({ data }) => seen.push(data.token))
    .on('subscribed', ({ recovered, resubscribed }) => statuses.push({ recovered, resubscribed }))
    .subscribe()
  socket.receive({ t: 'ok', id: 1, ch: 'ai-chat/1', o: 4, ep: 'e', recovered: false }, ev(5, 'a'))
  socket.close()
  assert.equal(realtime.state, 'reconnecting')
  return new Promise((resolve) => setTimeout(resolve, 5)).then(() => {
    socket = ScriptedSocket.last
    socket.open()
    assert.deepEqual(socket.sent, [{ t: 'sub', ch: 'ai-chat/1', since: { o: 5, ep: 'e' }, id: 2 }])
    socket.receive({ t: 'ok', id: 2, ch: 'ai-chat/1', o: 5, ep: 'e', recovered: true }, ev(5, 'a'), ev(6, 'b'))
    assert.deepEqual(seen, ['a', 'b'])
    assert.deepEqual(statuses, [{ recovered: false, resubscribed: false }, { recovered: true, resubscribed: true }])
    realtime.close()
  })
})
