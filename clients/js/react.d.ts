// Type declarations for tokenfan/react (react.js).
import type { ReactElement, ReactNode } from 'react'
import type { ChannelEvent, Offset, Realtime, Since, Subscribed } from './dist/tokenfan.js'

export interface RealtimeProviderProps {
  /** The app's connection: create one Realtime, and close it when the app is done with it. */
  client: Realtime
  children?: ReactNode
}

/** Makes `client` the connection of the hooks below it. */
export declare function RealtimeProvider (props: RealtimeProviderProps): ReactElement

/** The Realtime of the nearest RealtimeProvider (throws without one). */
export declare function useRealtime (): Realtime

/** Event name ('*': every event) → handler of its publications. */
export type ChannelHandlers = Record<string, ((event: ChannelEvent) => void) | undefined>

export interface ChannelOptions {
  /** Where to start: `{ o: 0 }` for the stream so far, then live; default: live only. */
  since?: Since | null
  /** Each time the broker confirms the subscription (again after each reconnect). */
  onSubscribed?: (status: Subscribed) => void
  /** A `slow_policy = "drop"` channel skipped publications for this reader. */
  onGap?: (gap: { from: Offset, to: Offset }) => void
}

export interface ChannelState {
  /** The broker has confirmed the subscription. */
  ready: boolean
  /** Why the broker refused the subscription, if it did. */
  error: Error | null
  /** Publish an event on the channel (the channel must allow clients to). */
  publish (event: string, data?: unknown): Promise<{ offset: Offset, epoch: string }>
}

/** Subscribe to channel `name` while the component is mounted; the latest `handlers` are called. */
export declare function useChannel (name: string, handlers: ChannelHandlers, options?: ChannelOptions): ChannelState

export interface AiChat {
  /** The latest answer's text so far. */
  text: string
  /** Tokens are still coming (between `ai:start` or the first token and `ai:done` / `ai:error`). */
  streaming: boolean
  /** The `ai:error` message, or why the subscription was refused. */
  error: string | null
  ready: boolean
  /** Ask the broker to stop the answer (publishes `ai:cancel`). */
  cancel (): Promise<{ offset: Offset, epoch: string }>
}

/** The answer streaming on an AI chat channel, e.g. `ai-chat/${sessionId}`, read from the start. */
export declare function useAiChat (name: string): AiChat
