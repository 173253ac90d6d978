// DOM helpers. Registry data reaches the page only as text nodes and attribute values set here:
// nothing is ever parsed as HTML (no innerHTML anywhere in the UI).

/**
 * Create an element: el("td", {className: "x", dataset: {key: "a"}}, "text", child, ...).
 * Props go through properties (className, title, type, value...) or setAttribute for "attrs".
 */
export function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (value === undefined || value === null) continue;
    if (key === "dataset") Object.assign(node.dataset, value);
    else if (key === "attrs") for (const [name, v] of Object.entries(value)) node.setAttribute(name, String(v));
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node[key] = value;
  }
  append(node, children);
  return node;
}

function append(node, children) {
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    if (Array.isArray(child)) append(node, child);
    else node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

const SVG = "http://www.w3.org/2000/svg";

/** Create an SVG element with attributes; text children become text nodes. */
export function svg(tag, attrs = {}, ...children) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value !== undefined && value !== null) node.setAttribute(name, String(value));
  }
  append(node, children);
  return node;
}

/** Ask before a write: a modal <dialog>; resolves true on "Confirm". */
export function confirmAction(message, confirmLabel = "Confirm") {
  const dialog = document.getElementById("confirm");
  document.getElementById("confirm-message").textContent = message;
  const ok = document.getElementById("confirm-ok");
  ok.textContent = confirmLabel;
  return new Promise((resolve) => {
    dialog.returnValue = "";
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
    dialog.showModal();
    ok.focus();
  });
}

/** "12 s ago", "3 min ago"... from epoch seconds. */
export function ago(epochSeconds, now = Date.now() / 1000) {
  if (!epochSeconds) return "—";
  const seconds = Math.max(0, Math.round(now - epochSeconds));
  if (seconds < 90) return `${seconds} s ago`;
  if (seconds < 5400) return `${Math.round(seconds / 60)} min ago`;
  if (seconds < 172800) return `${Math.round(seconds / 3600)} h ago`;
  return `${Math.round(seconds / 86400)} d ago`;
}

// One formatter for the page: toLocaleTimeString() builds one per call, which costs seconds over 5000 rows.
const TIME = new Intl.DateTimeFormat(undefined, { hour: "2-digit", minute: "2-digit", second: "2-digit" });

export function clockTime(epochSeconds) {
  return epochSeconds ? TIME.format(new Date(epochSeconds * 1000)) : "—";
}

/** Fill a <select> with "any" plus the given values, keeping the current choice if it still exists. */
export function setOptions(select, values, anyLabel) {
  const current = select.value;
  select.replaceChildren(el("option", { value: "" }, anyLabel), ...values.map((v) => el("option", { value: v }, v)));
  select.value = values.includes(current) ? current : "";
}
