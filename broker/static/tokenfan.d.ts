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

export interface RealtimeOptions {
  /** The broker's WebSocket endpoint, e.g. 'wss://broker.example/ws'. */
  url: string
  /** First and longest wait between reconnection attempts, in ms (default [100, 5000]). */
  backoff?: [number, number]
  /** A WebSocket class for runtimes without a global one (Node < 22: `import WebSocket from 'ws'`). */
  WebSocket?: new (url: string) => WebSocketLike
}

export declare class Realtime {
  constructor (options: RealtimeOptions)
  readonly url: string
  state: State
  readonly channels: Map<string, Channel>
  channel (name: string): Channel
  onState (fn: (state: State) => void): this
  close (): void
}

export declare function encodeFrame (frame: Record<string, unknown>): Uint8Array
export declare function decodeMessage (bytes: Uint8Array): Array<Record<string, any>>
