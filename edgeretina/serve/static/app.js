// The grading service's page: plain JS, no build step, nothing loaded from anywhere but this service.
// Server data (file names come from clients) only ever reaches the page as textContent, never as HTML.
"use strict";

// edgeretina/grades.py: the ICDR scale the probabilities are listed in
const GRADE_NAMES = ["No apparent retinopathy", "Mild non-proliferative DR", "Moderate non-proliferative DR",
  "Severe non-proliferative DR", "Proliferative DR"];
const DECISIONS = {
  referable: "Referable — refer to an ophthalmologist",
  negative: "Negative — no referable diabetic retinopathy found",
  ungradable: "Ungradable — retake the photo",
};
const KEY_STORE = "edgeretina-api-key";
const $ = (id) => document.getElementById(id);

function authHeaders() {
  const key = sessionStorage.getItem(KEY_STORE);
  return key ? { "X-API-Key": key } : {};
}

// fetch() with the API key; a 401 shows the key form
async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: { ...authHeaders(), ...(options.headers || {}) } });
  if (response.status === 401) $("key-form").hidden = false;
  return response;
}

// "415 — not a photo this service grades (...)": the status and the service's `detail`
async function failure(response) {
  let detail = response.statusText;
  try {
    const body = await response.json();
    detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail ?? body);
  } catch (_) { /* not JSON: the status text will do */ }
  return `${response.status} — ${detail}`;
}

function element(tag, text, className) {
  const node = document.createElement(tag);
  node.textContent = text === null || text === undefined ? "—" : String(text);
  if (className) node.className = className;
  return node;
}

// rows of [label, value...]: the label as a <th>, the values as <td>
function fillTable(table, rows) {
  table.replaceChildren(...rows.map(([label, ...values]) => {
    const tr = document.createElement("tr");
    tr.append(element("th", label), ...values.map((v) => element("td", v)));
    return tr;
  }));
}

function percent(p) { return p === null || p === undefined ? null : `${(100 * p).toFixed(1)} %`; }

// a picture with its caption, or neither (no such picture, or one this browser cannot show: TIFF, DICOM)
function setImage(img, url) {
  if (img.src.startsWith("blob:")) URL.revokeObjectURL(img.src);
  img.removeAttribute("src");
  img.closest("figure").hidden = !url;
  if (url) img.src = url;
}

// <img src> cannot send the API key: fetch the picture with it and show the bytes as a blob: URL
async function showPicture(img, link) {
  setImage(img, null);
  if (!link) return;
  const response = await api(link);
  if (response.ok) setImage(img, URL.createObjectURL(await response.blob()));
}

function showResult(record, photo) {
  $("result").hidden = false;
  $("result-id").textContent = `${record.file_name} · ${record.id}`;
  const decision = $("decision");
  decision.className = `decision ${record.screening || "error"}`;
  decision.textContent = DECISIONS[record.screening] || `Not graded: ${record.error || "unknown error"}`;
  const lesions = (record.lesions || []).filter((l) => l.present).map((l) => `${l.name} (${l.count})`);
  fillTable($("summary"), [
    ["Grade", record.grade == null ? null : `${record.grade} — ${record.grade_name}`],
    ["P(referable)", percent(record.referable_probability)],
    ["Nearest cases vote", record.knn_grade],
    ...(record.lesions ? [["Lesions", lesions.join(", ") || "none found"]] : []),
    ["Graded", record.created.replace("T", " ").replace(/\.\d+Z$/, " UTC")],
  ]);
  fillTable($("probabilities"), (record.probabilities || []).map((p, g) => [`${g} ${GRADE_NAMES[g]}`, percent(p)]));
  const quality = record.quality || {};
  const reasons = (quality.reasons || []).map((code) => code.replaceAll("_", " "));
  const limit = quality.limited_by ? `, limited by ${quality.limited_by}` : "";
  const gradable = `gradable: score ${quality.score ?? "—"}${limit}`;
  $("quality").replaceChildren(...(reasons.length ? reasons : [gradable])
    .map((text) => element("li", text, reasons.length ? "error" : "")));
  fillTable($("neighbors"), [["Case", "Grade", "Similarity"],
    ...(record.neighbors || []).map((n) => [n.case_id, n.grade, n.similarity?.toFixed(3)])]);
  setImage($("photo-img"), photo ? URL.createObjectURL(photo) : null);
  return Promise.all([showPicture($("card-img"), record.links.card),
    showPicture($("overlay-img"), record.links.overlay)]);
}

function setStatus(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

async function grade(file) {
  setStatus(`Grading ${file.name}…`);
  const form = new FormData();
  form.append("file", file, file.name);
  try {
    const response = await api("v1/grade", { method: "POST", body: form });
    if (!response.ok) { setStatus(`${file.name}: ${await failure(response)}`, true); return; }
    const record = await response.json();
    const frames = record.frames ? ` (${record.frames.length} frames: the first is shown, all are in the history)` : "";
    setStatus(`${file.name}: graded${frames}`);
    await Promise.all([showResult(record, file), loadHistory()]);
  } catch (error) {
    setStatus(`${file.name}: the service did not answer (${error.message})`, true);
  } finally {
    $("file").value = "";    // choosing the same file again grades it again
  }
}

function historyQuery() {
  const params = new URLSearchParams({ limit: $("f-limit").value || "50" });
  if ($("f-screening").value) params.set("screening", $("f-screening").value);
  if ($("f-since").value) params.set("since", $("f-since").value);   // no zone: the service reads it as UTC
  return params;
}

function historyRow(result) {
  const tr = document.createElement("tr");
  tr.dataset.id = result.id;
  tr.append(element("td", result.created.replace("T", " ").replace(/\.\d+Z$/, "")), element("td", result.file_name),
    element("td", result.screening || "error", result.screening || "error"), element("td", result.grade),
    element("td", percent(result.referable_probability)), element("td", result.origin));
  tr.addEventListener("click", () => showResult(result, null));
  return tr;
}

async function loadHistory() {
  const body = $("history-table").tBodies[0];
  const response = await api(`v1/results?${historyQuery()}`);
  if (!response.ok) {
    body.replaceChildren(messageRow(`history unavailable: ${await failure(response)}`, "error"));
    return;
  }
  const { results } = await response.json();
  body.replaceChildren(...(results.length ? results.map(historyRow) : [messageRow("no results for these filters")]));
}

function messageRow(text, className) {
  const tr = document.createElement("tr");
  const cell = tr.appendChild(element("td", text, className));
  cell.colSpan = 6;
  return tr;
}

async function checkReady() {
  const state = $("service-state");
  try {
    const response = await fetch("readyz");
    const body = await response.json();
    state.textContent = body.ready ? `ready · ${body.backend} ${body.precision}` : `not ready: ${body.reason}`;
    state.className = `state ${body.ready ? "ready" : "down"}`;
    if (body.state === "loading") setTimeout(checkReady, 5000);
  } catch (_) {
    state.textContent = "service unreachable";
    state.className = "state down";
  }
}

function wire() {
  const drop = $("drop");
  $("file").addEventListener("change", (event) => { if (event.target.files.length) grade(event.target.files[0]); });
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    if (event.dataTransfer.files.length) grade(event.dataTransfer.files[0]);
  });
  for (const img of $("result").querySelectorAll("img")) {
    img.addEventListener("error", () => { img.closest("figure").hidden = true; });
  }
  $("filters").addEventListener("submit", (event) => { event.preventDefault(); loadHistory(); });
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(KEY_STORE, $("api-key").value.trim());
    $("key-form").hidden = true;
    loadHistory();
  });
  checkReady();
  loadHistory();
}

document.addEventListener("DOMContentLoaded", wire);
