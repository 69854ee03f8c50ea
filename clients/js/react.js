// tokenfan/react: React hooks over a tokenfan Realtime (React >= 18).
//
//   const realtime = new Realtime({ url: 'wss://broker.example/ws' })   // one per app
//   root.render(<RealtimeProvider client={realtime}><App /></RealtimeProvider>)
//
//   const { text, streaming, ready, cancel } = useAiChat(`ai-chat/${sessionId}`)
//   const { ready, publish } = useChannel('scores', { goal: ({ data }) => add(data) })
//
// Hooks own the subscriptions of the channels they use: the first hook mounted on a channel
// subscribes, the last one unmounted unsubscribes. The app creates and closes the Realtime.
import { createContext, createElement, useCallback, useContext, useEffect, useLayoutEffect, useRef, useState } from 'react'

const RealtimeContext = createContext(null)

/** Makes `client` (a Realtime) the connection of the hooks below it. */
export function RealtimeProvider ({ client, children }) {
  return createElement(RealtimeContext.Provider, { value: client }, children)
}

/** The Realtime of the nearest RealtimeProvider. */
export function useRealtime () {
  const realtime = useContext(RealtimeContext)
  if (!realtime) throw new Error('tokenfan/react: put <RealtimeProvider client={realtime}> above this component')
  return realtime
}

// Layout effects do not run on a server; nothing here needs to run there.
const useBrowserLayoutEffect = typeof document === 'undefined' ? useEffect : useLayoutEffect

const users = new WeakMap() // Channel -> how many mounted hooks use it

function sinceKey (since) {
  return since ? `${since.o}@${since.ep ?? ''}` : ''
}

function useSubscription (name, handlers, options, round) {
  const realtime = useRealtime()
  const latest = useRef({ handlers, options })
  useBrowserLayoutEffect(() => { latest.current = { handlers, options } })
  const [ready, setReady] = useState(false)
  const [error, setError] = useState(null)
  const since = options.since ?? null
  const key = sinceKey(since)

  useEffect(() => {
    let mounted = true
    const channel = realtime.channel(name)
    const onEvent = (payload) => {
      const { handlers } = latest.current
      handlers[payload.event]?.(payload)
      handlers['*']?.(payload)
    }
    const onSubscribed = (status) => {
      setReady(true)
      setError(null)
      latest.current.options.onSubscribed?.(status)
    }
    const onGap = (gap) => latest.current.options.onGap?.(gap)
    const onError = ({ error }) => setError(error)
    channel.on('*', onEvent).on('subscribed', onSubscribed).on('gap', onGap).on('error', onError)
    users.set(channel, (users.get(channel) ?? 0) + 1)
    if (!channel.subscribed) channel.subscribe({ since })
    else channel.ready().then(() => { if (mounted) setReady(true) }, () => {})
    return () => {
      mounted = false
      channel.off('*', onEvent).off('subscribed', onSubscribed).off('gap', onGap).off('error', onError)
      const left = users.get(channel) - 1
      users.set(channel, left)
      if (left === 0) channel.unsubscribe().catch(() => {}) // the connection may be down: nothing to undo
      setReady(false)
      setError(null)
    }
    // `since` is read through its key: a new object for the same position changes nothing.
  }, [realtime, name, key, round])

  const publish = useCallback((event, data = {}) => realtime.channel(name).publish(event, data), [realtime, name])
  return { ready, error, publish }
}

/**
 * Subscribe to channel `name` while the component is mounted. `handlers` maps event names
 * ('*': every event) to functions of { event, data, channel, offset, firstOffset }; the latest
 * ones are called, so they may be inline closures. `options`: `since` (e.g. { o: 0 }, the stream
 * so far, then live), `onSubscribed(status)` on each confirmation, `onGap(gap)`.
 */
export function useChannel (name, handlers, options = {}) {
  return useSubscription(name, handlers, options, 0)
}

const idle = { text: '', streaming: false, error: null }

/**
 * The answer streaming on an AI chat channel (`ai-chat/<sessionId>`): its text so far, whether
 * tokens are still coming, the `ai:error` message if it failed (or why the subscription was
 * refused), whether the subscription is confirmed, and `cancel()` (publishes
 * `ai:cancel`). It reads the channel from the start (`since: { o: 0 }`), so the latest answer shows
 * in full; after a reconnect that could not recover what was missed, it reads it again.
 */
export function useAiChat (name) {
  const [chat, setChat] = useState(idle)
  const [round, setRound] = useState(0)
  const [shown, setShown] = useState(name)
  if (shown !== name) { setShown(name); setChat(idle) } // another chat: start from nothing

  const { ready, error, publish } = useSubscription(name, {
    'ai:start': () => setChat({ text: '', streaming: true, error: null }),
    'ai:token': ({ data }) => setChat((now) => ({ ...now, text: now.text + data.token, streaming: true })),
    'ai:done': () => setChat((now) => ({ ...now, streaming: false })),
    'ai:error': ({ data }) => setChat((now) => ({ ...now, streaming: false, error: String(data?.message ?? 'failed') })),
  }, {
    since: { o: 0 },
    onSubscribed: ({ recovered, resubscribed }) => {
      if (resubscribed && !recovered) { setChat(idle); setRound((n) => n + 1) }
    },
  }, round)
  const cancel = useCallback(() => publish('ai:cancel', {}), [publish])
  return { ...chat, error: chat.error ?? error?.message ?? null, ready, cancel }
}
