// The protocol's test vectors (protocol/vectors.json) against the browser client's codec.
import { test } from 'node:test'
import assert from 'node:assert/strict'
import { readFileSync } from 'node:fs'
import { encodeFrame, decodeMessage } from '../../broker/static/tokenfan.js'

const vectors = JSON.parse(readFileSync(new URL('../../protocol/vectors.json', import.meta.url)))

function fromJson (value) {
  if (Array.isArray(value)) return value.map(fromJson)
  if (value !== null && typeof value === 'object') {
    const keys = Object.keys(value)
    if (keys.length === 1 && keys[0] === '$bin') return Uint8Array.from(Buffer.from(value.$bin, 'hex'))
    if (keys.length === 1 && keys[0] === '$bigint') return BigInt(value.$bigint)
    return Object.fromEntries(keys.map((key) => [key, fromJson(value[key])]))
  }
  return value
}

const hex = (bytes) => Buffer.from(bytes).toString('hex')

for (const vector of vectors) {
  test(`decodes: ${vector.name}`, () => {
    assert.deepEqual(decodeMessage(Uint8Array.from(Buffer.from(vector.hex, 'hex'))), fromJson(vector.frames))
  })
  test(`encodes: ${vector.name}`, () => {
    assert.equal(vector.frames.map((frame) => hex(encodeFrame(fromJson(frame)))).join(''), vector.hex)
  })
}

test('there are vectors', () => assert.ok(vectors.length >= 30))
