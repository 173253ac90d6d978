// Services: a live table of every instance, with search, filters, sorting and (by role) writes.

import { ago, clockTime, confirmAction, el, setOptions } from "../dom.js";

const STATES = ["starting", "running", "stopped", "failed"];
const COLUMNS = [
  ["service_name", "Service"],
  ["host_id", "Host"],
  ["location", "Location"],
  ["state", "State"],
  ["ip", "Address"],
  [null, "Endpoints"],
  ["version", "Version"],
  ["updated_at", "Updated / TTL"],
];
// Rows in the DOM at first; more on scroll or "Show more". Layout, not JavaScript, is what costs with
// thousands of rows (seconds for 5000 on a small machine; ~1 ms a row), so the table never holds more than asked for.
const PAGE = 100;
const MAX_FLASHING = 25;
const HTTP_NAMES = /^(http|https|web|api|ui|metrics|admin)(-|_|$)/;

function sortValue(entry, key) {
  if (key === "ip") return entry.network_info.ip;
  if (key === "updated_at") return entry.updated_at || 0;
  return entry[key] || "";
}

function endpointCell(cell, entry) {
  const ip = entry.network_info.ip;
  const host = ip.includes(":") ? `[${ip}]` : ip;
  for (const endpoint of entry.endpoints) {
    const label = `${endpoint.name}:${endpoint.port}`;
    if (!HTTP_NAMES.test(endpoint.name) || endpoint.protocol !== "tcp") {
      cell.append(el("span", { className: "endpoint" }, label));
      continue;
    }
    // The address and port are validated by the registry (an IP, an integer), so the URL is well-formed.
    const scheme = endpoint.name.startsWith("https") || endpoint.port === 443 ? "https" : "http";
    const href = `${scheme}://${host}:${endpoint.port}/`;
    cell.append(el("a", { className: "endpoint", href, target: "_blank", rel: "noopener noreferrer" }, label));
  }
}

export class ServicesView {
  constructor(element, app) {
    this.element = element;
    this.app = app;
    this.rows = new Map(); // key -> {entry, row}
    this.flashing = new Set(); // keys changed since the last render
    this.sortKey = "service_name";
    this.descending = false;
    this.dirty = true;
    this.limit = PAGE;
    this.search = el("input", { type: "search", placeholder: "Search name, host, address, tag, metadata", id: "service-search",
      attrs: { "aria-label": "Search services" }, oninput: () => this.refilter() });
    this.filters = {};
    const filterBar = [];
    for (const [key, label] of [["location", "Any location"], ["state", "Any state"], ["network", "Any network"], ["tag", "Any tag"]]) {
      const select = el("select", { id: `filter-${key}`, attrs: { "aria-label": `Filter by ${key}` }, onchange: () => this.refilter() });
      setOptions(select, [], label);
      this.filters[key] = { select, label };
      filterBar.push(select);
    }
    this.count = el("span", { className: "count", id: "service-count" });
    this.head = el("thead");
    this.body = el("tbody", { id: "service-rows", onclick: (click) => this.onClick(click) });
    this.template = null;
    this.table = el("table", { className: "grid services", id: "services-table" }, this.head, this.body);
    this.more = el("button", { type: "button", id: "service-more", hidden: true, onclick: () => this.showMore() });
    element.append(
      el("div", { className: "toolbar" }, this.search, filterBar, this.count),
      el("div", { className: "table-wrap" }, this.table),
      this.more,
    );
    // Scrolling near the end of the table shows the next page, as the button does.
    new IntersectionObserver((seen) => {
      if (seen.some((entry) => entry.isIntersecting) && !this.more.hidden) this.showMore();
    }, { rootMargin: "400px" }).observe(this.more);
  }

  show() {
    if (this.dirty) this.render();
  }

  reload() {
    this.rows.clear();
    this.template = null; // the role may have changed
    this.dirty = true;
    if (!this.element.hidden) this.render();
  }

  update({ changed }) {
    if (changed.size === 0) return;
    // Rows are rebuilt when next drawn, and only if on screen; they flash then. A burst does not
    // flash: hundreds of animated rows cost every frame a repaint and tell the eye nothing.
    const flash = changed.size <= MAX_FLASHING;
    for (const key of changed) {
      this.rows.delete(key);
      if (flash) this.flashing.add(key);
    }
    this.dirty = true;
    if (!this.element.hidden) this.render();
  }

  buildHead() {
    const writable = this.app.can("write");
    const cells = COLUMNS.map(([key, label]) => {
      if (key === null) return el("th", { scope: "col" }, label);
      const arrow = this.sortKey === key ? (this.descending ? " ▼" : " ▲") : "";
      const sorted = this.sortKey === key ? (this.descending ? "descending" : "ascending") : "none";
      return el("th", { scope: "col", attrs: { "aria-sort": sorted } },
        el("button", { type: "button", className: "sort", onclick: () => this.sortBy(key) }, label + arrow));
    });
    if (writable) cells.push(el("th", { scope: "col" }, "Actions"));
    this.head.replaceChildren(el("tr", {}, cells));
  }

  sortBy(key) {
    this.descending = this.sortKey === key ? !this.descending : false;
    this.sortKey = key;
    this.refilter();
  }

  refilter() {
    this.limit = PAGE;
    this.render();
  }

  showMore() {
    this.limit += PAGE;
    this.render();
  }

  /** One empty row to clone: cloning is much cheaper than building 5000 rows element by element. */
  rowTemplate() {
    const cells = COLUMNS.map(() => el("td"));
    cells[4].className = "mono";
    if (this.app.can("write")) {
      cells.push(el("td", { className: "actions" },
        el("select", { className: "set-state" }, STATES.map((s) => el("option", { value: s }, s))),
        el("button", { type: "button", className: "write", dataset: { action: "set_state" } }, "Set"),
        el("button", { type: "button", className: "write danger", dataset: { action: "remove_service" } }, "Remove")));
    }
    return el("tr", {}, cells);
  }

  buildRow(entry, flash = false) {
    const row = this.template.cloneNode(true);
    const cells = row.children;
    const key = this.app.serviceKey(entry);
    row.dataset.key = key;
    row.dataset.state = entry.state;
    cells[0].append(entry.service_name);
    if (entry.tags.length) cells[0].append(el("span", { className: "tags" }, entry.tags.map((t) => el("span", { className: "tag" }, t))));
    cells[1].textContent = entry.host_id;
    cells[2].textContent = entry.location;
    cells[3].append(el("span", { className: `state state-${entry.state}` }, entry.state));
    cells[4].textContent = entry.network_info.ip;
    if (entry.network_info.network) cells[4].append(el("span", { className: "muted" }, ` ${entry.network_info.network}`));
    endpointCell(cells[5], entry);
    cells[6].textContent = entry.version || "—";
    const ttl = entry.ttl_seconds ? `TTL ${Math.round(entry.ttl_seconds)} s` : "no TTL";
    cells[7].append(ago(entry.updated_at), el("span", { className: "muted" }, ` · ${ttl}`));
    cells[7].title = `updated ${clockTime(entry.updated_at)}`;
    if (cells.length > COLUMNS.length) {
      const select = cells[COLUMNS.length].firstChild;
      select.value = entry.state;
      select.setAttribute("aria-label", `New state for ${entry.service_name} on ${entry.host_id}`);
    }
    const metadata = Object.entries(entry.metadata || {});
    if (metadata.length) row.title = metadata.map(([k, v]) => `${k}=${v}`).join("\n");
    if (flash) {
      row.classList.add("flash");
      row.addEventListener("animationend", () => row.classList.remove("flash"), { once: true });
    }
    return row;
  }

  /** The write buttons of every row, by delegation (one listener, not two per row). */
  async onClick(click) {
    const button = click.target.closest("button[data-action]");
    const row = button && button.closest("tr[data-key]");
    const entry = row && this.app.state.services.get(row.dataset.key);
    if (!entry) return;
    const label = `${entry.service_name} on ${entry.host_id}`;
    const target = { service_name: entry.service_name, host_id: entry.host_id };
    if (button.dataset.action === "remove_service") {
      if (await confirmAction(`Remove ${label} from the registry?`, "Remove")) this.write("remove_service", target);
      return;
    }
    const state = row.querySelector("select.set-state").value;
    if (state === entry.state) return;
    if (await confirmAction(`Set ${label} to ${state}?`, "Set state")) this.write("set_state", { ...target, state });
  }

  async write(action, params) {
    try {
      await this.app.request(action, params);
    } catch (error) {
      this.app.notify(`${action} failed: ${error.message}`, { error: true });
    }
  }

  matches(entry, needle, wanted) {
    if (wanted.location && entry.location !== wanted.location) return false;
    if (wanted.state && entry.state !== wanted.state) return false;
    if (wanted.network && entry.network_info.network !== wanted.network) return false;
    if (wanted.tag && !entry.tags.includes(wanted.tag)) return false;
    if (!needle) return true;
    const haystack = [entry.service_name, entry.host_id, entry.network_info.ip, entry.version || "", ...entry.tags,
      ...Object.entries(entry.metadata || {}).map(([k, v]) => `${k}=${v}`)].join(" ").toLowerCase();
    return haystack.includes(needle);
  }

  refreshFilters(services) {
    const values = { location: new Set(), state: new Set(STATES), network: new Set(), tag: new Set() };
    for (const entry of services) {
      values.location.add(entry.location);
      if (entry.network_info.network) values.network.add(entry.network_info.network);
      for (const tag of entry.tags) values.tag.add(tag);
    }
    for (const [key, { select, label }] of Object.entries(this.filters)) setOptions(select, [...values[key]].sort(), label);
  }

  render() {
    this.dirty = false;
    const services = [...this.app.state.services.values()];
    this.refreshFilters(services);
    this.buildHead();
    if (this.template === null) this.template = this.rowTemplate();
    const needle = this.search.value.trim().toLowerCase();
    const wanted = Object.fromEntries(Object.entries(this.filters).map(([k, f]) => [k, f.select.value]));
    const shown = services.filter((entry) => this.matches(entry, needle, wanted));
    const key = this.sortKey;
    const direction = this.descending ? -1 : 1;
    shown.sort((a, b) => {
      const x = sortValue(a, key);
      const y = sortValue(b, key);
      if (x < y) return -direction;
      if (x > y) return direction;
      return a.host_id < b.host_id ? -1 : a.host_id > b.host_id ? 1 : 0;
    });
    const rows = shown.slice(0, this.limit).map((entry) => {
      const k = this.app.serviceKey(entry);
      let cached = this.rows.get(k);
      if (!cached || cached.entry !== entry) {
        cached = { entry, row: this.buildRow(entry, this.flashing.has(k)) };
        this.rows.set(k, cached);
      }
      return cached.row;
    });
    this.flashing.clear();
    for (const k of this.rows.keys()) if (!this.app.state.services.has(k)) this.rows.delete(k);
    if (rows.length === 0) {
      const span = COLUMNS.length + (this.app.can("write") ? 1 : 0);
      rows.push(el("tr", {}, el("td", { colSpan: span, className: "empty" },
        services.length ? "No service matches the filters." : "No service is registered.")));
    }
    this.body.replaceChildren(...rows);
    this.count.textContent = `${shown.length} of ${services.length} instances`;
    const rest = shown.length - rows.length;
    this.more.hidden = rest <= 0;
    this.more.textContent = `Show ${Math.min(rest, PAGE)} more (${rest} not shown)`;
  }
}
