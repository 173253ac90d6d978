// Events: the live stream, newest first, with type filters. The app resumes the subscription
// from the last revision it applied, so after a reconnect the list continues without gaps or repeats.

import { clockTime, el } from "../dom.js";

const TYPES = [
  "ServiceRegistered",
  "ServiceUpdated",
  "ServiceStateChanged",
  "EndpointChanged",
  "ServiceRemoved",
  "IpAllocated",
  "IpReleased",
  "NetworkTopologyChanged",
];
const KEEP = 1000; // events kept in the page; older ones fall off the end

function describe(event) {
  const service = event.data.service;
  const allocation = event.data.allocation;
  if (allocation) return `${allocation.ip}/${allocation.prefixlen} in ${allocation.network} for ${allocation.owner} (${event.data.reason || ""})`;
  if (event.type === "NetworkTopologyChanged" && event.data.networks) return "the networks file was reloaded";
  if (!service) return event.type === "NetworkTopologyChanged" ? "the host's network topology changed" : "";
  const who = `${service.service_name}@${service.host_id}`;
  if (event.type === "ServiceStateChanged" && event.data.previous) return `${who}: ${event.data.previous.state} → ${service.state}`;
  if (event.type === "ServiceRemoved") return `${who} (${event.data.reason || "removed"})`;
  if (event.data.changes && event.data.changes.length) return `${who}: ${event.data.changes.join(", ")}`;
  return who;
}

export class EventsView {
  constructor(element, app) {
    this.element = element;
    this.app = app;
    this.events = []; // newest first
    this.hiddenTypes = new Set();
    this.list = el("ol", { className: "events", id: "event-list", reversed: true });
    const toggles = TYPES.map((type) =>
      el("label", { className: "toggle" },
        el("input", { type: "checkbox", checked: true, dataset: { type }, onchange: (change) => {
          if (change.target.checked) this.hiddenTypes.delete(type);
          else this.hiddenTypes.add(type);
          this.render();
        } }),
        type));
    this.summary = el("p", { className: "muted", id: "event-summary" });
    element.append(el("fieldset", { className: "toolbar" }, el("legend", {}, "Event types"), toggles), this.summary, this.list);
    this.dirty = true;
  }

  show() {
    if (this.dirty) this.render();
  }

  reload() {
    this.dirty = true;
    if (!this.element.hidden) this.render();
  }

  update({ events }) {
    const newest = [...events].reverse();
    this.events = newest.concat(this.events).slice(0, KEEP);
    if (this.element.hidden) {
      this.dirty = true;
      return;
    }
    // Prepend only what is new and shown; trim the tail. One DOM change per frame.
    const fragment = document.createDocumentFragment();
    for (const event of newest) if (!this.hiddenTypes.has(event.type)) fragment.append(this.item(event));
    this.list.prepend(fragment);
    while (this.list.childElementCount > KEEP) this.list.lastElementChild.remove();
    this.list.querySelector(".empty")?.remove();
    this.updateSummary();
  }

  item(event) {
    return el("li", { className: `event type-${event.type}`, dataset: { revision: event.revision, type: event.type } },
      el("span", { className: "revision mono" }, `#${event.revision}`),
      el("time", { className: "muted" }, clockTime(event.timestamp)),
      el("span", { className: "event-type" }, event.type),
      el("span", { className: "event-what" }, describe(event)));
  }

  updateSummary() {
    const revision = this.app.state.lastRevision;
    this.summary.textContent = `${this.events.length} events since this page opened; at revision ${revision ?? "—"}.`;
  }

  render() {
    this.dirty = false;
    const shown = this.events.filter((event) => !this.hiddenTypes.has(event.type)).map((event) => this.item(event));
    if (shown.length === 0) shown.push(el("li", { className: "empty muted" }, "Waiting for events…"));
    this.list.replaceChildren(...shown);
    this.updateSummary();
  }
}
