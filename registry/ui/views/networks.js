// Networks / IP allocation: per network, used and free with a bar, and the allocations with their
// owners. An allocation whose owner is no registered service (name, name@host or host) is flagged.

import { confirmAction, el } from "../dom.js";

/** Addresses the allocator can hand out: the subnet minus network, broadcast and gateway (IPv4). */
function capacity(subnet) {
  const [base, bits] = subnet.split("/");
  const hostBits = (base.includes(":") ? 128 : 32) - Number(bits);
  if (hostBits <= 1) return 2 ** hostBits;
  return 2 ** hostBits - (base.includes(":") ? 1 : 3);
}

export class NetworksView {
  constructor(element, app) {
    this.element = element;
    this.app = app;
    this.allocations = [];
    this.refreshButton = el("button", { type: "button", onclick: () => this.reload() }, "Refresh");
    this.content = el("div", { id: "networks" });
    element.append(el("div", { className: "toolbar" }, this.refreshButton), this.content);
  }

  show() {
    this.reload();
  }

  async reload() {
    if (this.element.hidden) return;
    try {
      this.allocations = await this.app.request("list_allocations");
    } catch (error) {
      // A registry without a networks file has no allocations to list.
      this.allocations = [];
      if (error.code !== "bad_request") this.app.notify(`list_allocations failed: ${error.message}`, { error: true });
    }
    this.render();
  }

  update({ changed }) {
    if (changed.size && !this.element.hidden) this.render();
  }

  owners() {
    const names = new Set();
    for (const entry of this.app.state.services.values()) {
      names.add(entry.service_name);
      names.add(entry.host_id);
      names.add(`${entry.service_name}@${entry.host_id}`);
    }
    return names;
  }

  render() {
    const known = this.owners();
    const writable = this.app.can("write");
    const sections = this.app.state.networks.map((network) => {
      const mine = this.allocations.filter((allocation) => allocation.network === network.name);
      const total = capacity(network.subnet);
      const used = mine.length;
      const share = total > 0 ? Math.min(1, used / total) : 0;
      const fill = el("span", { className: "bar-fill" });
      fill.style.width = `${(share * 100).toFixed(2)}%`; // CSSOM, not a style attribute: allowed by the CSP
      const rows = mine.map((allocation) => {
        const orphan = !known.has(allocation.owner);
        const cells = [
          el("td", {}, allocation.owner, orphan ? el("span", { className: "flag", title: "no registered service or host has this name" }, " orphaned") : null),
          el("td", { className: "mono" }, `${allocation.ip}/${allocation.prefixlen}`),
        ];
        if (writable) {
          cells.push(el("td", { className: "actions" }, el("button", { type: "button", className: "write danger", onclick: async () => {
            if (!(await confirmAction(`Release ${allocation.ip} (owner ${allocation.owner}) in ${network.name}?`, "Release"))) return;
            try {
              await this.app.request("release_ip", { owner: allocation.owner, network: network.name });
            } catch (error) {
              this.app.notify(`release_ip failed: ${error.message}`, { error: true });
            }
            this.reload();
          } }, "Release")));
        }
        return el("tr", { className: orphan ? "orphan" : "" }, cells);
      });
      const head = el("tr", {}, el("th", { scope: "col" }, "Owner"), el("th", { scope: "col" }, "Address"),
        writable ? el("th", { scope: "col" }, "Actions") : null);
      return el("section", { className: "card network-card", dataset: { network: network.name } },
        el("h3", {}, network.name, el("span", { className: "muted" }, ` ${network.type} · ${network.subnet}`)),
        el("p", { className: "usage" }, `${used} used · ${Math.max(0, total - used).toLocaleString()} free`),
        el("div", { className: "bar", attrs: { role: "meter", "aria-valuemin": 0, "aria-valuemax": total, "aria-valuenow": used,
          "aria-label": `${network.name} utilisation` } }, fill),
        rows.length ? el("table", { className: "grid" }, el("thead", {}, head), el("tbody", {}, rows))
          : el("p", { className: "muted" }, "No allocations."));
    });
    if (sections.length === 0) sections.push(el("p", { className: "muted" }, "No networks are configured (services.yaml)."));
    this.content.replaceChildren(...sections);
  }
}
