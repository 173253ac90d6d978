// Topology: an SVG drawn here. The registry on top; one column per configured network with the
// interface this host has in it; in each, its nodes (configured nodes and hosts with instances),
// and on each node its service instances, coloured by state. Redrawn (once per frame at most) on change.

import { el, svg } from "../dom.js";

const COLUMN = 230;
const GAP = 24;
const NODE_HEADER = 26;
const SERVICE_ROW = 22;
const TOP = 110;

function ipToNumber(ip) {
  const parts = ip.split(".");
  if (parts.length !== 4) return null;
  return parts.reduce((acc, part) => acc * 256 + Number(part), 0);
}

/** True when an IPv4 address is inside an IPv4 subnet (IPv6 is matched by the network name only). */
function inSubnet(ip, subnet) {
  const [base, bits] = subnet.split("/");
  const address = ipToNumber(ip);
  const start = ipToNumber(base);
  if (address === null || start === null) return false;
  const size = 2 ** (32 - Number(bits));
  return address >= start && address < start + size;
}

function networkOf(entry, networks) {
  if (entry.network_info.network) return entry.network_info.network;
  const found = networks.find((network) => inSubnet(entry.network_info.ip, network.subnet));
  return found ? found.name : null;
}

export class TopologyView {
  constructor(element, app) {
    this.element = element;
    this.app = app;
    this.legend = el("p", { className: "legend" },
      ["running", "starting", "stopped", "failed"].map((state) => el("span", { className: `state state-${state}` }, state)));
    this.canvas = el("div", { className: "topology-wrap", id: "topology" });
    element.append(this.legend, this.canvas);
    this.dirty = true;
  }

  show() {
    if (this.dirty) this.render();
  }

  reload() {
    this.dirty = true;
    if (!this.element.hidden) this.render();
  }

  update({ changed, topologyChanged }) {
    if (changed.size === 0 && !topologyChanged) return;
    this.dirty = true;
    if (!this.element.hidden) this.render();
  }

  /** Columns: [{network, detected, nodes: [{name, address, services: [entry]}]}]. */
  model() {
    const { networks, services, topology } = this.app.state;
    const detected = new Map(((topology && topology.networks) || []).filter((d) => d.network).map((d) => [d.network, d]));
    const columns = new Map();
    for (const network of networks) {
      const nodes = new Map(network.nodes.map((node) => [node.name, { name: node.name, address: node.host, services: [] }]));
      columns.set(network.name, { network, detected: detected.get(network.name), nodes });
    }
    const unassigned = { network: { name: "other", type: "no configured network", subnet: "" }, nodes: new Map() };
    for (const entry of services.values()) {
      const name = networkOf(entry, networks);
      const column = columns.get(name) || unassigned;
      const nodes = column.nodes;
      // A configured node owns the instances on its address or named after it.
      let node = [...nodes.values()].find((n) => n.address === entry.network_info.ip || n.name === entry.host_id);
      if (!node) {
        node = nodes.get(entry.host_id) || { name: entry.host_id, address: entry.network_info.ip, services: [] };
        nodes.set(entry.host_id, node);
      }
      node.services.push(entry);
    }
    const all = [...columns.values()];
    if (unassigned.nodes.size) all.push(unassigned);
    return all;
  }

  render() {
    this.dirty = false;
    const columns = this.model();
    const width = Math.max(COLUMN + 2 * GAP, columns.length * (COLUMN + GAP) + GAP);
    let height = TOP + 80;
    const parts = [];
    const centre = width / 2;
    parts.push(svg("rect", { x: centre - 90, y: 16, width: 180, height: 44, rx: 8, class: "registry" }));
    parts.push(svg("text", { x: centre, y: 43, "text-anchor": "middle", class: "registry-label" }, "svcreg registry"));
    columns.forEach((column, index) => {
      const x = GAP + index * (COLUMN + GAP);
      const type = column.network.type;
      let y = TOP;
      const group = [];
      group.push(svg("text", { x: x + 10, y: y + 20, class: "network-name" }, column.network.name));
      const interfaceLabel = column.detected ? `${column.detected.interface} ${column.detected.address}` : "";
      group.push(svg("text", { x: x + 10, y: y + 38, class: "network-meta" }, `${type} ${column.network.subnet}`));
      if (interfaceLabel) group.push(svg("text", { x: x + 10, y: y + 54, class: "network-meta" }, interfaceLabel));
      y += 66;
      for (const node of column.nodes.values()) {
        const boxHeight = NODE_HEADER + Math.max(1, node.services.length) * SERVICE_ROW + 6;
        group.push(svg("g", { class: "node", "data-node": node.name },
          svg("rect", { x: x + 10, y, width: COLUMN - 20, height: boxHeight, rx: 6, class: "node-box" }),
          svg("text", { x: x + 20, y: y + 18, class: "node-name" }, `${node.name}${node.address ? `  ${node.address}` : ""}`)));
        let serviceY = y + NODE_HEADER;
        if (node.services.length === 0) {
          group.push(svg("text", { x: x + 20, y: serviceY + 14, class: "network-meta" }, "no services"));
        }
        for (const entry of node.services.sort((a, b) => (a.service_name < b.service_name ? -1 : 1))) {
          group.push(svg("g", { class: "service", "data-service": `${entry.service_name}@${entry.host_id}` },
            svg("circle", { cx: x + 26, cy: serviceY + 10, r: 6, class: `dot state-${entry.state}` }),
            svg("title", {}, `${entry.service_name} on ${entry.host_id}: ${entry.state}`),
            svg("text", { x: x + 38, y: serviceY + 14, class: "service-name" }, entry.service_name)));
          serviceY += SERVICE_ROW;
        }
        y += boxHeight + 10;
      }
      const columnHeight = Math.max(y - TOP + 6, 80);
      parts.push(svg("g", { class: `network network-${type.replace(/[^a-z]/g, "")}`, "data-network": column.network.name },
        svg("line", { x1: centre, y1: 60, x2: x + COLUMN / 2, y2: TOP, class: "link" }),
        svg("rect", { x, y: TOP, width: COLUMN, height: columnHeight, rx: 10, class: "network-box" }),
        group));
      height = Math.max(height, TOP + columnHeight + GAP);
    });
    const picture = svg("svg", { viewBox: `0 0 ${width} ${height}`, width, height, role: "img", id: "topology-svg",
      "aria-label": `Topology: ${columns.length} networks` }, parts);
    const notes = columns.length === 0 ? el("p", { className: "muted" }, "No networks are configured (services.yaml).") : null;
    this.canvas.replaceChildren(picture, notes || "");
  }
}
