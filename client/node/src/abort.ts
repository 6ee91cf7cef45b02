/**
 * One "abort" listener per signal, however many calls of this package wait on it: Node warns
 * (MaxListenersExceededWarning) past ten listeners on one signal, and an agent's steps or a caller's batch of calls
 * share one signal easily.
 */

interface Waiting {
  /** What to run when the signal aborts: one entry per call that waits. */
  callbacks: Set<() => void>;
  /** The one listener on the signal, which runs them. */
  listener: () => void;
}

const waitingOn = new WeakMap<AbortSignal, Waiting>();

/**
 * Runs `callback` (a function of the caller's own: a Set holds it once) when `signal` aborts; returns what stops
 * that, to call once the work is done, so that nothing stays on the signal. A signal aborted already never calls it:
 * check `signal.aborted` first.
 */
export function onAbort(signal: AbortSignal | undefined, callback: () => void): () => void {
  if (signal === undefined) {
    return () => {};
  }
  const waiting = waitingOn.get(signal) ?? listen(signal);
  waiting.callbacks.add(callback);
  return () => {
    waiting.callbacks.delete(callback);
    if (waiting.callbacks.size === 0 && waitingOn.get(signal) === waiting) {
      waitingOn.delete(signal);
      signal.removeEventListener("abort", waiting.listener);
    }
  };
}

/**
 * `signal` if it is an AbortSignal (or undefined), else a TypeError naming the option: from plain JavaScript, the
 * AbortController itself is easily passed for its signal, and onAbort threw only once the call had started. Read by
 * what this package uses of it, not by its class, so that one of another realm or a polyfill's serves too.
 */
export function checkedSignal(signal: unknown): AbortSignal | undefined {
  if (signal === undefined) {
    return undefined;
  }
  const like = signal as Partial<AbortSignal> | null;
  if (typeof like?.aborted === "boolean" && typeof like.addEventListener === "function") {
    return signal as AbortSignal;
  }
  const given =
    signal instanceof AbortController ? "an AbortController" : signal === null ? "null" : `a ${typeof signal}`;
  throw new TypeError(`signal is ${given}, not an AbortSignal: give an AbortController's .signal`);
}

/** Puts the one listener on the signal. */
function listen(signal: AbortSignal): Waiting {
  const callbacks = new Set<() => void>();
  const listener = () => {
    waitingOn.delete(signal);
    // A copy: a callback may stop waiting, deleting itself, as it runs.
    [...callbacks].forEach((run) => run());
  };
  const waiting = { callbacks, listener };
  waitingOn.set(signal, waiting);
  signal.addEventListener("abort", listener, { once: true });
  return waiting;
}
