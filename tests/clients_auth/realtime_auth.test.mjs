// tokenfan.js (broker/static/tokenfan.js) with getToken, in Node, against a real broker with [auth].
// Run by test_js_client.py, which starts the broker and passes (environment):
//   TOKENFAN_WS_URL, TOKENFAN_HTTP_URL   the broker (jwt_secret TOKENFAN_SECRET, api key TOKENFAN_API_KEY)
//   TOKENFAN_OPEN_WS_URL                 a broker without [auth]
//   TOKENFAN_WS_MODULE                   the `ws` package (Node < 22 has no global WebSocket)
// Tokens are minted here as an app's Node server would: HS256 over the claims (docs/security.md).
import { test } from 'node:test'
import assert from 'node:assert/strict'
import { createHmac } from 'node:crypto'
import { pathToFileURL } from 'node:url'
import { Realtime } from '../../broker/static/tokenfan.js'

const { TOKENFAN_WS_URL: url, TOKENFAN_HTTP_URL: http, TOKENFAN_SECRET: secret, TOKENFAN_API_KEY: apiKey } = process.env
const WebSocket = globalThis.WebSocket ?? (await import(pathToFileURL(process.env.TOKENFAN_WS_MODULE).href)).default

const part = (value) => Buffer.from(JSON.stringify(value)).toString('base64url')

/** A user token: HS256, `sub`, `exp` ttl seconds from now, `channels`. */
function mint ({ sub = 'alice', ttl = 3, channels = ['ai-chat/*'], key = secret } = {}) {
  const now = Math.floor(Date.now() / 1000)
  const unsigned = `${part({ alg: 'HS256', typ: 'JWT' })}.${part({ sub, iat: now, exp: now + ttl, channels })}`
  return `${unsigned}.${createHmac('sha256', key).update(unsigned).digest('base64url')}`
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms))

/** Emit `tick {n}` on `channel` every `interval` ms through the HTTP API (as the app), until stopped. */
function emitter (channel, interval) {
  let running = true
  const done = (async () => {
    for (let n = 1; running; n++) {
      const reply = await fetch(`${http}/api/emit`, {
        method: 'POST',
        headers: { 'Content-Type': 'application/json', Authorization: `Bearer ${apiKey}` },
        body: JSON.stringify({ channel, event: 'tick', data: { n } }),
      })
      assert.equal(reply.status, 200, await reply.text())
      await sleep(interval)
    }
  })()
  return async () => { running = false; await done }
}

/** Wait until `check()` is true (polling), failing after `ms`. */
async function until (check, ms, what) {
  const end = Date.now() + ms
  while (!check()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`)
    await sleep(20)
  }
}

const contiguous = (seen) => seen.every((n, i) => n === i + 1)

test('getToken authenticates, and a fresh token before exp keeps the connection', async (t) => {
  let calls = 0
  const states = []
  const realtime = new Realtime(url, { WebSocket, getToken: async () => { calls++; return mint({ ttl: 3 }) } })
  t.after(() => realtime.close()) // also when an assertion fails: nothing may keep Node running
  realtime.onState((state) => states.push(state))
  const seen = []
  const channel = realtime.channel('ai-chat/node-refresh').on('tick', ({ data }) => seen.push(data.n)).subscribe()
  await channel.ready()
  assert.equal(realtime.user, 'alice')
  // A channel outside the token's grants is refused alone (4004); the connection goes on.
  const refused = []
  const other = realtime.channel('news').on('error', ({ error }) => refused.push(error.code)).subscribe()
  await assert.rejects(other.ready(), (error) => error.code === 4004)
  assert.deepEqual(refused, [4004])
  assert.equal(realtime.state, 'open')
  const firstExp = realtime.exp
  assert.ok(firstExp - Date.now() / 1000 > 1 && firstExp - Date.now() / 1000 <= 3, `exp ${firstExp}`)
  const stop = emitter('ai-chat/node-refresh', 100)
  t.after(() => stop().catch(() => {}))
  await until(() => Date.now() / 1000 > firstExp + 1.5, 8000, 'the first exp to pass')
  const before = seen.length
  await until(() => seen.length > before + 3, 3000, 'events after the first exp')
  await stop()
  assert.ok(realtime.exp > firstExp, 'a fresh token extended the connection')
  assert.ok(calls >= 2, `getToken called ${calls} times`)
  assert.deepEqual(states, ['open']) // never reconnected
  assert.ok(contiguous(seen), `events missed or repeated: ${seen}`)
  realtime.close()
})

test('a token the broker refuses stops the client with 4009: no reconnect', async (t) => {
  let calls = 0
  const errors = []
  const channelErrors = []
  const realtime = new Realtime({
    url, WebSocket, getToken: async () => { calls++; return mint({ key: 'not-the-brokers-secret-at-all-0000' }) },
  })
  t.after(() => realtime.close())
  realtime.onError((error) => errors.push(error))
  const channel = realtime.channel('ai-chat/node-refused').on('error', ({ error }) => channelErrors.push(error)).subscribe()
  await assert.rejects(channel.ready(), (error) => error.code === 4009)
  assert.equal(realtime.state, 'closed')
  assert.equal(realtime.error.code, 4009)
  assert.equal(realtime.error.reconnect, false)
  assert.match(realtime.error.message, /bad signature/)
  assert.deepEqual(errors, [realtime.error])
  assert.deepEqual(channelErrors, [realtime.error])
  await sleep(1000)
  assert.equal(calls, 1) // asked once: no reconnect loop
  assert.equal(realtime.state, 'closed')
})

test('an expired token (4104) reconnects with a fresh one and recovers every event', async (t) => {
  let calls = 0
  const whys = []
  const errors = []
  const realtime = new Realtime({
    url,
    WebSocket,
    getToken: async () => {
      if (++calls === 2) throw new Error("the app's token endpoint is down") // the refresh fails
      return mint({ ttl: 2 })
    },
  })
  t.after(() => realtime.close())
  realtime.onState((state, why) => { if (state === 'reconnecting') whys.push(why) })
  realtime.onError((error) => errors.push(error))
  const seen = []
  const statuses = []
  const channel = realtime.channel('ai-chat/node-expiry')
    .on('tick', ({ data }) => seen.push(data.n))
    .on('subscribed', (status) => statuses.push(status))
    .subscribe()
  await channel.ready()
  const stop = emitter('ai-chat/node-expiry', 50)
  t.after(() => stop().catch(() => {}))
  await until(() => statuses.length === 2, 8000, 'the resubscription after TOKEN_EXPIRED')
  const before = seen.length
  await until(() => seen.length > before + 5, 3000, 'events after the reconnect')
  await stop()
  assert.deepEqual(whys.map((why) => why.code), [4104])
  assert.equal(whys[0].reconnect, true)
  assert.match(errors[0].message, /getToken|token endpoint/) // the failed refresh was reported
  assert.equal(statuses[1].resubscribed, true)
  assert.equal(statuses[1].recovered, true)
  assert.equal(calls, 3) // the first, the failed refresh, the reconnect's
  assert.equal(realtime.state, 'open')
  assert.ok(contiguous(seen), `events missed or repeated: ${seen}`)
  realtime.close()
})

test('without getToken, or when it gives null, the client works on an open broker as before', async (t) => {
  for (const options of [{}, { getToken: async () => null }]) {
    const realtime = new Realtime({ url: process.env.TOKENFAN_OPEN_WS_URL, WebSocket, ...options })
    t.after(() => realtime.close())
    const status = await realtime.channel('anything').subscribe().ready()
    assert.equal(status.resubscribed, false)
    assert.equal(realtime.exp, null)
    assert.equal(realtime.user, null)
    realtime.close()
  }
})
