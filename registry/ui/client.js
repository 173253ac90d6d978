// The registry's WebSocket protocol for the browser: mirrors registry/protocol.py (ClientCodec).
// Frames: request {id, type: "request", action, params} -> response {id, result} | error {id, error};
// event {subscription, event, revision, timestamp, data}; job {job, event, data}. docs/protocol.md.

/** An error frame from the server (code as in registry/exceptions.py). */
export class RegistryError extends Error {
  constructor(code, message, details = {}, cls = null) {
    super(message);
    this.name = cls || "RegistryError";
    this.code = code;
    this.details = details || {};
  }
}

/** The connection closed before the request was answered. */
export class ConnectionLost extends Error {
  constructor(reason) {
    super(reason || "the connection closed");
    this.name = "ConnectionLost";
  }
}

/**
 * One WebSocket to the registry. Requests are numbered and matched by id (they may be pipelined);
 * events, job frames and subscription errors (id null) go to the callbacks.
 */
export class RegistryClient {
  constructor({ onEvent = () => {}, onJob = () => {}, onNotice = () => {}, onClose = () => {} } = {}) {
    this.onEvent = onEvent;
    this.onJob = onJob;
    this.onNotice = onNotice;
    this.onClose = onClose;
    this.socket = null;
    this.nextId = 1;
    this.pending = new Map();
  }

  /** Open wss:// on the page's own origin; resolves once open. */
  connect(url = `wss://${location.host}/`) {
    return new Promise((resolve, reject) => {
      const socket = new WebSocket(url);
      this.socket = socket;
      let opened = false;
      socket.addEventListener("open", () => {
        opened = true;
        resolve(this);
      });
      socket.addEventListener("message", (message) => this.receive(message.data));
      socket.addEventListener("close", (close) => {
        const reason = close.reason || `closed (${close.code})`;
        for (const { reject: fail } of this.pending.values()) fail(new ConnectionLost(reason));
        this.pending.clear();
        if (opened) this.onClose(close);
        else reject(new ConnectionLost(reason));
      });
    });
  }

  close() {
    if (this.socket) this.socket.close(1000, "signed out");
  }

  /** Send one request; resolves with its result, rejects with a RegistryError. */
  request(action, params = {}) {
    if (!this.socket || this.socket.readyState !== WebSocket.OPEN) {
      return Promise.reject(new ConnectionLost("not connected"));
    }
    const id = String(this.nextId++);
    const clean = {};
    for (const [key, value] of Object.entries(params)) if (value !== null && value !== undefined) clean[key] = value;
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      this.socket.send(JSON.stringify({ id, type: "request", action, params: clean }));
    });
  }

  receive(text) {
    let frame;
    try {
      frame = JSON.parse(text);
    } catch {
      this.onNotice("the server sent a frame that is not JSON");
      return;
    }
    switch (frame.type) {
      case "response":
      case "error": {
        const waiter = frame.id === null || frame.id === undefined ? null : this.pending.get(String(frame.id));
        if (frame.type === "error") {
          const e = frame.error || {};
          const error = new RegistryError(e.code || "internal", e.message || "no message", e.details, e.class);
          if (waiter) waiter.reject(error);
          else this.onNotice(error);
        } else if (waiter) {
          waiter.resolve(frame.result);
        }
        if (waiter) this.pending.delete(String(frame.id));
        break;
      }
      case "event":
        this.onEvent({
          subscription: String(frame.subscription),
          type: String(frame.event),
          revision: Number(frame.revision),
          timestamp: Number(frame.timestamp || 0),
          data: frame.data || {},
        });
        break;
      case "job":
        this.onJob({ job: String(frame.job), event: String(frame.event), data: frame.data || {} });
        break;
      default:
        this.onNotice(`the server sent a frame of unknown type ${frame.type}`);
    }
  }
}
