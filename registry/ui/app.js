// The page: sign-in, one WebSocket to the registry, the shared state, and the views.
// Incoming events are queued and applied once per animation frame, so a burst of events
// costs one render, not one per event.

import { ConnectionLost, RegistryClient } from "./client.js";
import { DeploysView } from "./views/deploys.js";
import { EventsView } from "./views/events.js";
import { NetworksView } from "./views/networks.js";
import { ServicesView } from "./views/services.js";
import { TopologyView } from "./views/topology.js";

const TOKEN_KEY = "svcreg.token";
const ROLES = ["read", "write", "admin"];
const MAX_BACKOFF_MS = 5000;

/** Everything the views read; only app.js writes it. */
export const state = {
  services: new Map(), // "name@host" -> entry (as on the wire)
  networks: [],
  topology: null,
  jobs: [],
  principal: null, // {name, role, method}
  lastRevision: null, // the newest event revision applied: where a resubscription resumes
};

export function serviceKey(entry) {
  return `${entry.service_name}@${entry.host_id}`;
}

let client = null;
let token = null;
let signedIn = false;
let reconnectDelay = 500;
let reconnectTimer = null;
let queued = []; // events waiting for the next frame
let frameRequested = false;
let buffering = null; // events that arrive while a resync lists the services

const app = {
  state,
  request: (action, params) => (client ? client.request(action, params) : Promise.reject(new ConnectionLost())),
  can: (role) => state.principal !== null && ROLES.indexOf(state.principal.role) >= ROLES.indexOf(role),
  notify,
  serviceKey,
};

const views = {
  services: new ServicesView(document.getElementById("view-services"), app),
  events: new EventsView(document.getElementById("view-events"), app),
  topology: new TopologyView(document.getElementById("view-topology"), app),
  networks: new NetworksView(document.getElementById("view-networks"), app),
  deploys: new DeploysView(document.getElementById("view-deploys"), app),
};
let current = null;

// --- notices and connection state ------------------------------------------------------------

let noticeTimer = null;
function notify(message, { error = false, sticky = false } = {}) {
  const notice = document.getElementById("notice");
  notice.textContent = message;
  notice.classList.toggle("error", error);
  notice.hidden = false;
  clearTimeout(noticeTimer);
  if (!sticky) noticeTimer = setTimeout(() => (notice.hidden = true), error ? 10000 : 5000);
}

function setConnection(label) {
  const badge = document.getElementById("connection");
  badge.textContent = label;
  badge.dataset.state = label;
}

// --- events, batched per frame ---------------------------------------------------------------

function onEvent(event) {
  if (buffering !== null) buffering.push(event);
  else {
    queued.push(event);
    if (!frameRequested) {
      frameRequested = true;
      requestAnimationFrame(flush);
    }
  }
}

function flush() {
  frameRequested = false;
  const events = queued;
  queued = [];
  const fresh = [];
  const changed = new Set();
  let topologyChanged = false;
  for (const event of events) {
    // A resumed subscription replays from lastRevision: anything at or below it was applied already.
    if (state.lastRevision !== null && event.revision <= state.lastRevision) continue;
    state.lastRevision = event.revision;
    fresh.push(event);
    if (event.type === "NetworkTopologyChanged") {
      state.topology = event.data.topology || null;
      topologyChanged = true;
    } else if (applyServiceEvent(event)) {
      changed.add(serviceKey(event.data.service));
    }
  }
  if (fresh.length === 0) return;
  for (const view of Object.values(views)) view.update({ events: fresh, changed, topologyChanged });
}

/** Apply one service event to state.services; true if it changed what we hold. */
function applyServiceEvent(event) {
  const entry = event.data && event.data.service;
  if (!entry) return false;
  const key = serviceKey(entry);
  const held = state.services.get(key);
  // The listing may already be newer than a replayed event (a resync lists, then applies the buffer).
  if (held && held.mod_revision >= event.revision) return false;
  if (event.type === "ServiceRemoved") {
    if (!held) return false;
    state.services.delete(key);
  } else {
    state.services.set(key, entry);
  }
  return true;
}

// --- connecting, signing in, resuming ---------------------------------------------------------

async function connect() {
  const fresh = new RegistryClient({
    onEvent,
    onJob: (job) => views.deploys.onJob(job),
    onNotice: onServerNotice,
    onClose: onConnectionLost,
  });
  await fresh.connect();
  client = fresh;
  return fresh;
}

function onServerNotice(notice) {
  if (notice && notice.code === "rate_limited" && notice.details && notice.details.subscription) {
    // Our subscription lagged and was dropped: subscribe again from the last revision we applied.
    notify("The event stream fell behind; resuming…");
    resync().catch((error) => notify(`Resuming failed: ${error.message}`, { error: true }));
  } else {
    notify(String(notice && notice.message ? notice.message : notice), { error: true });
  }
}

/** A certificate's role is not in any answer yet: probe with the one admin action, which fails harmlessly. */
async function certificateRole() {
  try {
    // No target and an empty package name: refused by validation before any job exists.
    await client.request("deploy_package", { package: "" });
  } catch (error) {
    if (error.code === "forbidden") return (error.details && error.details.role) || "read";
    if (error instanceof ConnectionLost) throw error;
  }
  return "admin";
}

async function authenticate() {
  if (token !== null) {
    const who = await client.request("authenticate", { token });
    return { name: who.name, role: who.role, method: "token" };
  }
  await client.request("list_networks"); // unauthorized unless the TLS client certificate signed us in
  return { name: "client certificate", role: await certificateRole(), method: "certificate" };
}

/** Subscribe (resuming after lastRevision), then reload the lists; events in between are buffered. */
async function resync() {
  buffering = [];
  try {
    let subscription;
    try {
      subscription = await client.request("subscribe", { since_revision: state.lastRevision });
    } catch (error) {
      if (error.code !== "compacted") throw error;
      notify(`Events after revision ${state.lastRevision} are no longer retained; some were missed.`, { error: true });
      subscription = await client.request("subscribe", {});
      state.lastRevision = subscription.revision;
    }
    if (state.lastRevision === null) state.lastRevision = subscription.revision;
    const [services, networks, topology, jobs] = await Promise.all([
      client.request("list_services"),
      client.request("list_networks"),
      client.request("get_topology"),
      client.request("list_jobs"),
    ]);
    state.services = new Map(services.map((entry) => [serviceKey(entry), entry]));
    state.networks = networks;
    state.topology = topology.topology;
    state.jobs = jobs;
  } finally {
    const pending = buffering || [];
    buffering = null;
    for (const event of pending) onEvent(event);
  }
  for (const view of Object.values(views)) view.reload();
}

async function signIn(withToken) {
  token = withToken;
  await connect();
  try {
    state.principal = await authenticate();
  } catch (error) {
    client.close();
    client = null;
    throw error;
  }
  if (token !== null) sessionStorage.setItem(TOKEN_KEY, token);
  signedIn = true;
  await resync();
  setConnection("live");
  showSignedIn();
}

function onConnectionLost(close) {
  client = null;
  if (!signedIn) return;
  setConnection("reconnecting");
  notify(`Connection lost (${close.reason || close.code}); reconnecting…`, { error: true, sticky: true });
  scheduleReconnect();
}

function scheduleReconnect() {
  clearTimeout(reconnectTimer);
  reconnectTimer = setTimeout(reconnect, reconnectDelay);
  reconnectDelay = Math.min(reconnectDelay * 2, MAX_BACKOFF_MS);
}

async function reconnect() {
  if (!signedIn) return;
  const resumeFrom = state.lastRevision;
  try {
    await connect();
    state.principal = await authenticate();
    await resync();
  } catch (error) {
    if (error.code === "unauthorized") {
      signOut(`The registry no longer accepts this sign-in: ${error.message}`);
      return;
    }
    if (client) client.close();
    scheduleReconnect();
    return;
  }
  reconnectDelay = 500;
  setConnection("live");
  notify(`Reconnected: resumed from revision ${resumeFrom}.`);
  document.getElementById("notice").dataset.kind = "reconnected";
}

function signOut(message = "") {
  signedIn = false;
  clearTimeout(reconnectTimer);
  sessionStorage.removeItem(TOKEN_KEY);
  token = null;
  if (client) client.close();
  client = null;
  state.principal = null;
  state.services = new Map();
  state.lastRevision = null;
  setConnection("offline");
  for (const view of Object.values(views)) view.element.hidden = true;
  document.getElementById("nav").hidden = true;
  document.getElementById("sign-out").hidden = true;
  document.getElementById("who").textContent = "";
  document.getElementById("signin").hidden = false;
  document.getElementById("signin-error").textContent = message;
  document.getElementById("token").value = "";
  document.getElementById("token").focus();
}

function showSignedIn() {
  document.getElementById("signin").hidden = true;
  document.getElementById("signin-error").textContent = "";
  document.getElementById("nav").hidden = false;
  document.getElementById("sign-out").hidden = false;
  const { name, role, method } = state.principal;
  document.getElementById("who").textContent = `${name} (${role}${method === "certificate" ? ", certificate" : ""})`;
  document.body.dataset.role = role;
  route();
  // Keyboard users continue from the navigation, not from the sign-in button that just disappeared.
  document.querySelector('#nav a[aria-current="page"]').focus();
}

// --- views ----------------------------------------------------------------------------------

function route() {
  if (!signedIn) return;
  const name = location.hash.slice(1) in views ? location.hash.slice(1) : "services";
  for (const [key, view] of Object.entries(views)) view.element.hidden = key !== name;
  for (const link of document.querySelectorAll("#nav a")) {
    if (link.dataset.view === name) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  current = views[name];
  current.show();
}

// --- start ------------------------------------------------------------------------------------

function wire() {
  document.getElementById("signin-form").addEventListener("submit", async (submit) => {
    submit.preventDefault();
    const input = document.getElementById("token");
    const error = document.getElementById("signin-error");
    error.textContent = "";
    try {
      await signIn(input.value.trim());
      input.value = "";
    } catch (failure) {
      error.textContent =
        failure.code === "unauthorized"
          ? "Wrong token: the registry did not accept it."
          : `Cannot sign in: ${failure.message}`;
    }
  });
  document.getElementById("sign-out").addEventListener("click", () => signOut());
  const dialog = document.getElementById("confirm");
  document.getElementById("confirm-ok").addEventListener("click", () => dialog.close("ok"));
  document.getElementById("confirm-cancel").addEventListener("click", () => dialog.close("cancel"));
  window.addEventListener("hashchange", route);
}

async function start() {
  wire();
  const saved = sessionStorage.getItem(TOKEN_KEY);
  try {
    // A saved token, else perhaps the browser's client certificate (mTLS) signs us in.
    await signIn(saved);
  } catch (error) {
    signOut(saved !== null && error.code === "unauthorized" ? "The saved token is no longer accepted." : "");
  }
}

start();
