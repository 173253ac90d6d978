// Deploys: the job list, one job's live progress per host (watch_job), and for admins a form to
// start a deployment (a package from the registry's deploy.packages_dir, a node, env).

import { clockTime, confirmAction, el, setOptions } from "../dom.js";

function packageLabel(job) {
  const p = job.package || {};
  return typeof p === "string" ? p : `${p.name || "?"} ${p.version || ""}`.trim();
}

function targetsLabel(job) {
  return (job.targets || []).map((t) => t.name || t.host || "?").join(", ");
}

/** A host's result: "deployed 1.2.0 (was 1.1.0)", "failed: …, rolled back to 1.1.0". */
function describeOutcome(outcome) {
  let text = outcome.status;
  if (outcome.version) text += ` ${outcome.version}`;
  if (outcome.previous_version) text += ` (was ${outcome.previous_version})`;
  if (outcome.message) text += `: ${outcome.message}`;
  if (outcome.rolled_back_to) text += `, rolled back to ${outcome.rolled_back_to}`;
  return text;
}

export class DeploysView {
  constructor(element, app) {
    this.element = element;
    this.app = app;
    this.watched = null; // the job shown in detail
    this.progress = []; // its progress events
    this.jobsBody = el("tbody", { id: "job-rows" });
    this.detail = el("section", { className: "card", id: "job-detail", hidden: true });
    this.form = this.buildForm();
    element.append(
      this.form,
      el("div", { className: "table-wrap" }, el("table", { className: "grid" },
        el("thead", {}, el("tr", {}, ["Job", "Package", "Targets", "Status", "Started"].map((h) => el("th", { scope: "col" }, h)))),
        this.jobsBody)),
      this.detail,
    );
  }

  buildForm() {
    this.packageInput = el("input", { id: "deploy-package", required: true, placeholder: "app-1.2.0.tar.gz" });
    this.nodeSelect = el("select", { id: "deploy-node", required: true });
    this.envInput = el("textarea", { id: "deploy-env", rows: 3, placeholder: "NAME=value, one per line" });
    const form = el("form", { className: "card deploy-form", id: "deploy-form", hidden: true, onsubmit: (submit) => {
      submit.preventDefault();
      this.startDeploy();
    } },
    el("h3", {}, "Start a deployment"),
    el("label", { htmlFor: "deploy-package" }, "Package (in deploy.packages_dir)"), this.packageInput,
    el("label", { htmlFor: "deploy-node" }, "Target node"), this.nodeSelect,
    el("label", { htmlFor: "deploy-env" }, "Environment"), this.envInput,
    el("button", { type: "submit", className: "write" }, "Deploy…"));
    return form;
  }

  show() {
    this.reload();
  }

  async reload() {
    this.form.hidden = !this.app.can("admin");
    const nodes = this.app.state.networks.flatMap((network) => network.nodes.map((node) => node.name));
    setOptions(this.nodeSelect, [...new Set(nodes)].sort(), "Choose a node");
    if (this.element.hidden) return;
    try {
      this.app.state.jobs = await this.app.request("list_jobs");
    } catch (error) {
      this.app.notify(`list_jobs failed: ${error.message}`, { error: true });
    }
    this.renderJobs();
  }

  update() {}

  async startDeploy() {
    const env = {};
    for (const line of this.envInput.value.split("\n")) {
      const [name, ...rest] = line.split("=");
      if (name.trim()) env[name.trim()] = rest.join("=");
    }
    const params = { package: this.packageInput.value.trim(), node: this.nodeSelect.value, env };
    if (!(await confirmAction(`Deploy ${params.package} to ${params.node}?`, "Deploy"))) return;
    try {
      const job = await this.app.request("deploy_package", params);
      this.showJob(job, []);
      // Progress can be published before the server starts forwarding it to us: watch_job answers
      // with everything so far, and every later frame comes after that answer.
      await this.watch(job.job);
      this.reload();
    } catch (error) {
      this.app.notify(`deploy_package failed: ${error.message}`, { error: true });
    }
  }

  async watch(jobId) {
    try {
      this.watched = { job: jobId, status: "…" }; // frames for it that arrive meanwhile are in the answer
      const job = await this.app.request("watch_job", { job: jobId });
      this.showJob(job, job.events || []);
    } catch (error) {
      this.app.notify(`watch_job failed: ${error.message}`, { error: true });
    }
  }

  showJob(job, events) {
    this.watched = job;
    this.progress = [...events];
    this.renderDetail();
  }

  onJob(frame) {
    if (frame.event === "finished") this.reload();
    if (!this.watched || frame.job !== this.watched.job) return;
    if (frame.event === "progress") this.progress.push(frame.data);
    else this.watched = { ...this.watched, ...frame.data };
    this.renderDetail();
  }

  renderJobs() {
    const rows = this.app.state.jobs.map((job) =>
      el("tr", { dataset: { job: job.job } },
        el("td", {}, el("button", { type: "button", className: "link", onclick: () => this.watch(job.job) }, job.job)),
        el("td", {}, packageLabel(job)),
        el("td", {}, targetsLabel(job)),
        el("td", {}, el("span", { className: `status status-${job.status}` }, job.status)),
        el("td", {}, clockTime(job.created))));
    if (rows.length === 0) rows.push(el("tr", {}, el("td", { colSpan: 5, className: "empty" }, "No deployments yet.")));
    this.jobsBody.replaceChildren(...rows);
  }

  renderDetail() {
    const job = this.watched;
    const byHost = new Map();
    for (const event of this.progress) {
      const host = event.host || "(all)";
      if (!byHost.has(host)) byHost.set(host, []);
      byHost.get(host).push(event);
    }
    const outcomes = (job.result && job.result.hosts) || {};
    for (const host of Object.keys(outcomes)) if (!byHost.has(host)) byHost.set(host, []);
    const hosts = [...byHost.entries()].map(([host, events]) =>
      el("div", { className: "host-progress", dataset: { host } },
        el("h4", {}, host, outcomes[host] ? el("span", { className: `status status-${outcomes[host].ok ? "successful" : "failed"}` },
          ` ${describeOutcome(outcomes[host])}`) : null),
        el("ol", { className: "progress" }, events.map((event) =>
          el("li", { className: `progress-${event.kind || "info"}` },
            el("span", { className: "muted" }, clockTime(event.timestamp)), " ",
            event.task || "", event.message ? ` — ${event.message}` : "", event.kind ? ` (${event.kind})` : "")))));
    this.detail.replaceChildren(
      el("h3", {}, `Job ${job.job} `, el("span", { className: `status status-${job.status}` }, job.status)),
      el("p", { className: "muted" }, `${packageLabel(job)} → ${targetsLabel(job)}`),
      ...(hosts.length ? hosts : [el("p", { className: "muted" }, "No progress yet.")]),
    );
    this.detail.hidden = false;
  }
}
