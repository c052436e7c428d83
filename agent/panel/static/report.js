"use strict";
// The lesson report, after the lesson: the server renders it (SVG charts, the attendance
// table) and this page inserts it, adds a menu to each attendance row so the teacher can
// correct a student's status, and lists the room's other reports. Nothing is fetched
// from anywhere but this agent. The URL fragment (never sent to a server) may name the
// lesson (#lesson=ID) and, from another computer, the panel's token (#token=...).

const $ = (id) => document.getElementById(id);
const t = I18N.t;
const fragment = new URLSearchParams(location.hash.slice(1));
const token = fragment.get("token");
let lesson = fragment.get("lesson");

const STATUSES = {
  present: "report.status.present",
  late: "report.status.late",
  left_early: "report.status.left_early",
  absent: "report.status.absent",
};

async function api(path, options) {
  const response = await fetch(path, Object.assign({ headers: authHeaders(token) }, options || {}));
  let body = null;
  try {
    body = await response.json();
  } catch (error) {
    body = { ok: false, error: "HTTP " + response.status };
  }
  if (!response.ok || !body.ok) {
    const error = new Error(body.error || "HTTP " + response.status);
    error.status = response.status;
    throw error;
  }
  return body;
}

function say(text, isError) {
  const message = $("report-message");
  message.textContent = text || "";
  message.classList.toggle("error", Boolean(isError));
}

function failure(error) {
  // The agent's own words are English; say the usual cases in the page's language.
  if (error.status === 401) return t("report.page.need_token");
  if (error.status === 404) return t("report.page.not_found", { error: error.message });
  return t("report.page.failed", { error: error.message });
}

function reportPath(suffix) {
  const query = "?language=" + encodeURIComponent(I18N.lang);
  return "/api/reports/" + encodeURIComponent(lesson) + (suffix || "") + query;
}

function show(view) {
  const page = new DOMParser().parseFromString(view.html, "text/html");
  const container = $("report");
  container.replaceChildren(...[...page.body.childNodes].map((node) => document.importNode(node, true)));
  document.title = page.title;
  addCorrections(view);
  document.body.dataset.lesson = view.lesson;
  document.body.dataset.ready = "1";
}

function addCorrections(view) {
  const table = $("report").querySelector("table");
  if (!table) return;
  const heading = document.createElement("th");
  heading.className = "correct";
  heading.textContent = t("report.page.correct");
  table.querySelector("thead tr").appendChild(heading);
  for (const row of table.querySelectorAll("tbody tr[data-student]")) {
    const student = row.dataset.student;
    const now = view.statuses[student];
    const select = document.createElement("select");
    select.setAttribute("aria-label", t("report.page.correct_for", { student: student }));
    if (!view.correctable.includes(now)) {
      // Measured "left early": shown, but a teacher sets present, late or absent.
      const measured = new Option(t(STATUSES[now]), now);
      measured.disabled = true;
      select.add(measured);
    }
    for (const status of view.correctable) select.add(new Option(t(STATUSES[status]), status));
    select.value = now;
    select.addEventListener("change", () => correct(student, select));
    const cell = row.insertCell();
    cell.className = "correct";
    cell.appendChild(select);
  }
}

async function correct(student, select) {
  select.disabled = true;
  select.classList.add("saving");
  say(t("report.page.saving"));
  try {
    const view = await api(reportPath("/corrections"), {
      method: "POST",
      body: JSON.stringify({ student: student, status: select.value }),
    });
    show(view);
    say(t("report.page.saved"));
    await listReports(); // the picker's attendance counts, as corrected
  } catch (error) {
    say(failure(error), true);
    await load();
  }
}

// The picker: the room's reports, newest first; false when they cannot be listed.
async function listReports() {
  let rows = [];
  try {
    rows = (await api("/api/reports")).reports;
  } catch (error) {
    say(failure(error), true);
    return false;
  }
  const pick = $("report-pick");
  pick.replaceChildren(...rows.map((row) => new Option(reportLine(row), row.lesson)));
  pick.hidden = rows.length === 0;
  if (!lesson && rows.length) lesson = rows[0].lesson;
  if (lesson) pick.value = lesson;
  return true;
}

async function load() {
  if (!(await listReports())) return;
  if (!lesson) {
    say(t("report.page.none"));
    document.body.dataset.ready = "1";
    return;
  }
  try {
    show(await api(reportPath()));
  } catch (error) {
    say(failure(error), true);
  }
}

$("report-pick").addEventListener("change", () => {
  lesson = $("report-pick").value;
  history.replaceState(null, "", reportLink(lesson, token));
  say("");
  load();
});
$("print").addEventListener("click", () => window.print());
$("back").hidden = Boolean(token); // from another computer the panel is not this page's

load();
