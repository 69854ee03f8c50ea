// Type declarations for tokenfan.js (the browser and Node client). See docs/protocol.md for the frames.

export type State = 'connecting' | 'open' | 'reconnecting' | 'closed'
/** Offsets beyond 2^53 arrive as bigint. */
export type Offset = number | bigint

export interface ChannelEvent<D = any> {
  event: string
  data: D
  channel: string
  offset: Offset
  /** Equal to offset unless the broker merged several publications (a slow reader's tokens). */
  firstOffset: Offset
}

export interface Subscribed {
  recovered: boolean
  offset: Offset
  epoch: string
  resubscribed: boolean
}

export interface Since { o: Offset; ep?: string }

export declare class Channel {
  readonly name: string
  offset: Offset | null
  epoch: string | null
  recovered: boolean
  on (event: 'subscribed', handler: (status: Subscribed) => void): this
  on (event: 'gap', handler: (gap: { from: Offset, to: Offset }) => void): this
  on (event: 'error', handler: (failure: { error: Error }) => void): this
  on<D = any> (event: string, handler: (event: ChannelEvent<D>) => void): this
  off (event: string, handler: (...args: any[]) => void): this
  subscribe (options?: { since?: Since | null }): this
  ready (): Promise<Subscribed>
  publish (event: string, data?: unknown): Promise<{ offset: Offset, epoch: string }>
  unsubscribe (): Promise<void>
}

/** What the client needs of a WebSocket: the browser's, Node ≥ 22's, or the `ws` package's. */
export interface WebSocketLike {
  binaryType: string
  onopen: any
  onmessage: any
  onclose: any
  send (data: any): void
  close (code?: number): void
}

/** An Error from the client: `code` is the protocol's (docs/protocol.md §4) when the broker gave one. */
export interface RealtimeError extends Error {
  /** e.g. 4009 UNAUTHORIZED (the broker refused the token), 4104 TOKEN_EXPIRED, 1006 connection lost. */
  code?: number
  /** Whether the client goes on trying (false: it has stopped). */
  reconnect?: boolean
  /** What getToken threw, when it did. */
  cause?: unknown
}

export interface RealtimeOptions {
  /** The broker's WebSocket endpoint, e.g. 'wss://broker.example/ws'. */
  url: string
  /**
   * Where the user token comes from, on a broker that authenticates ([auth] with a JWT key): called
   * before every connection and again before the token expires (80% of its remaining lifetime, at
   * most a minute ahead); the token is sent in `hello` before anything else. Resolve with null to
   * connect without one (an open broker). A rejection is reported to onError and retried with backoff.
   */
  getToken?: () => Promise<string | null> | string | null
  /** First and longest wait between reconnection attempts, in ms (default [100, 5000]). */
  backoff?: [number, number]
  /** A WebSocket class for runtimes without a global one (Node < 22: `import WebSocket from 'ws'`). */
  WebSocket?: new (url: string) => WebSocketLike
}

export declare class Realtime {
  constructor (options: RealtimeOptions)
  constructor (url: string, options?: Omit<RealtimeOptions, 'url'>)
  readonly url: string
  state: State
  readonly channels: Map<string, Channel>
  /** The token's `sub`, once the broker accepted a token (null on an open broker). */
  user: string | null
  /** When the connection's token expires, Unix seconds (null on an open broker). */
  exp: number | null
  /** Why the client stopped for good (e.g. code 4009: the broker refused the token); null until then. */
  error: RealtimeError | null
  channel (name: string): Channel
  /** `why`: how the last connection ended ('reconnecting', 'closed'), or null. */
  onState (fn: (state: State, why: RealtimeError | null) => void): this
  /** The broker refused the token (the client stops: state 'closed'), or getToken failed (it retries). */
  onError (fn: (error: RealtimeError) => void): this
  close (): void
}

export declare function encodeFrame (frame: Record<string, unknown>): Uint8Array
export declare function decodeMessage (bytes: Uint8Array): Array<Record<string, any>>
