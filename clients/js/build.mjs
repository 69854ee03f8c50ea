// Build the package's copy of the client from the one the broker serves (run by `npm pack`: prepack).
//
// broker/static/tokenfan.js is the source of truth. The package's dist/tokenfan.js is that file
// with one change: it imports msgpack as '@msgpack/msgpack' (a dependency) instead of the copy
// vendored beside it for browsers. The type declarations are copied as they are.
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs'

const source = new URL('../../broker/static/', import.meta.url)
const dist = new URL('./dist/', import.meta.url)
const SERVED = "from './vendor/msgpack/index.mjs'"
const PACKAGED = "from '@msgpack/msgpack'"

const code = readFileSync(new URL('tokenfan.js', source), 'utf8')
const found = code.split(SERVED).length - 1
if (found !== 1) {
  throw new Error(`broker/static/tokenfan.js should import msgpack once as ${SERVED}; found it ${found} times`)
}
mkdirSync(dist, { recursive: true })
writeFileSync(new URL('tokenfan.js', dist), code.replace(SERVED, PACKAGED))
writeFileSync(new URL('tokenfan.d.ts', dist), readFileSync(new URL('tokenfan.d.ts', source)))
