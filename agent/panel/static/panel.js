"use strict";
// The teacher's panel: one button, live tiles, hands; or, in a receiving room, the
// lesson full screen. State comes from GET /api/status once a second.

const $ = (id) => document.getElementById(id);
const t = I18N.t;
const tiles = new Map(); // room id -> {element, viewer}
let status = null;
let selfViewer = null;
let lessonViewer = null;
let busy = false;

async function post(path, body) {
  const response = await fetch(path, {
    method: "POST", headers: authHeaders(null), body: JSON.stringify(body),
  });
  const result = await response.json();
  if (!result.ok) throw new Error(result.error || ("HTTP " + response.status));
  return result;
}

function say(text, isError) {
  const message = $("message");
  message.textContent = text || "";
  message.classList.toggle("error", Boolean(isError));
}

function chosenGroup() {
  if (!status || !status.hosting.length) return null;
  const value = $("group").value;
  return status.hosting.find((h) => h.group === value) || status.hosting[0];
}

function since(seconds) {
  return I18N.duration(Date.now() / 1000 - seconds);
}

// The states the agent reports, in words (the badge's class keeps the state itself).
const ROOM_STATES = {
  joining: "panel.room_state.joining",
  live: "panel.room_state.live",
  reconnecting: "panel.room_state.reconnecting",
  gone: "panel.room_state.gone",
};
const JOIN_STATES = {
  waiting: "kiosk.state.waiting",
  joining: "kiosk.state.joining",
  live: "kiosk.state.live",
  reconnecting: "kiosk.state.reconnecting",
};
// The joiner's reasons the kiosk has words for; others show the plain slate.
const REASONS = {
  "main room offline": "kiosk.main_offline",
  "no connection to the broker": "kiosk.no_broker",
};

// Why a room is off the high layer (PeerSession's layer_cause), in the page's language.
const LAYER_CAUSES = {
  loss: "panel.layer_cause.loss",
  bandwidth: "panel.layer_cause.bandwidth",
  delay: "panel.layer_cause.delay",
  pinned: "panel.layer_cause.pinned",
};

function layerText(f) {
  // The layer the main room sends this room, and why: "low layer (packet loss)".
  const what =
    f.layer === "paused"
      ? t("panel.figures.audio_only")
      : f.layer === "floor"
        ? t("panel.figures.floor_layer")
        : t("panel.figures.low_layer");
  const cause = LAYER_CAUSES[f.layer_cause];
  return cause ? t("panel.figures.because", { what: what, cause: t(cause) }) : what;
}

function stateText(keys, state) {
  return keys[state] ? t(keys[state]) : state;
}

function figures(f) {
  // The room's link as its peer connection reports it (health topic, same figures).
  if (!f || f.state !== "connected") return "";
  const parts = [];
  if (f.fps != null) parts.push(t("panel.figures.fps", { fps: I18N.number(f.fps) }));
  if (f.rtt_ms != null) parts.push(t("panel.figures.rtt", { ms: I18N.number(f.rtt_ms) }));
  if (f.loss_percent != null) parts.push(t("panel.figures.loss", { percent: I18N.number(f.loss_percent, 1) }));
  if (f.layer && f.layer !== "high") parts.push(layerText(f));
  return parts.join(" · ");
}

function tileFor(room) {
  let tile = tiles.get(room);
  if (tile) return tile;
  const element = document.createElement("figure");
  element.className = "tile";
  element.dataset.room = room;
  element.innerHTML =
    '<video autoplay muted playsinline></video><div class="tile-slate"></div>' +
    '<button class="hand" type="button" hidden></button>' +
    '<figcaption><span class="name"></span><span class="figures"></span>' +
    '<span class="badge"></span></figcaption>';
  element.querySelector(".name").textContent = room;
  // Words, not an emoji: a stock kiosk has no colour-emoji font (it would show a box).
  element.querySelector(".hand").textContent = t("panel.hand_raised");
  element.querySelector(".hand").title = t("panel.lower_hand");
  element.querySelector(".hand").addEventListener("click", () => {
    post("/api/hand/lower", { room: room }).catch((e) => say(e.message, true));
  });
  $("tiles").appendChild(element);
  const video = element.querySelector("video");
  tile = { element: element, viewer: keepWatching("room:" + room, video, {}) };
  tiles.set(room, tile);
  return tile;
}

function dropTiles(keep) {
  for (const [room, tile] of tiles) {
    if (!keep.has(room)) {
      tile.viewer.stop();
      tile.element.remove();
      tiles.delete(room);
    }
  }
}

function renderHosting(host) {
  $("hosting").hidden = false;
  const live = host && host.lesson;
  const button = $("lesson-button");
  button.textContent = t(live ? "panel.end_lesson" : "panel.start_lesson");
  button.classList.toggle("start", !live);
  button.classList.toggle("end", Boolean(live));
  button.disabled = busy;
  $("subject").disabled = Boolean(live);
  $("lesson-info").textContent = live
    ? t("panel.live_info", { subject: host.lesson.subject || host.group, since: since(host.lesson.started_at) })
    : t("panel.no_lesson");
  const rooms = live ? host.rooms : {};
  dropTiles(new Set(Object.keys(rooms)));
  for (const [room, info] of Object.entries(rooms)) {
    const tile = tileFor(room);
    tile.element.dataset.state = info.state;
    const badge = tile.element.querySelector(".badge");
    badge.textContent = stateText(ROOM_STATES, info.state);
    badge.className = "badge " + info.state;
    tile.element.querySelector(".hand").hidden = !info.hand_up;
    // Until the room's picture is live, the page says why in the page's language (the
    // placeholder picture the agent sends is drawn in ASCII only).
    // A room whose line cannot carry video hears the lesson: its tile says so.
    const audioOnly = info.state === "live" && info.figures && info.figures.layer === "paused";
    const tileSlate = tile.element.querySelector(".tile-slate");
    tileSlate.textContent = audioOnly ? t("panel.tile_audio_only") : stateText(ROOM_STATES, info.state);
    tileSlate.hidden = info.state === "live" && !audioOnly;
    tile.element.dataset.audioOnly = audioOnly ? "1" : "";
    tile.element.querySelector(".figures").textContent = figures(info.figures);
    tile.element.querySelector(".name").textContent = info.name || room;
  }
  if (!selfViewer) selfViewer = keepWatching("lesson", $("self-video"), {});
}

function renderJoining(join) {
  $("joining").hidden = false;
  const badge = $("join-state");
  badge.textContent = stateText(JOIN_STATES, join.state);
  badge.className = "badge " + join.state;
  const slate = $("slate");
  const texts = {
    waiting: t(REASONS[join.reason] || "kiosk.waiting"),
    joining: t("kiosk.joining"),
    reconnecting: t("kiosk.reconnecting"),
  };
  // Live, but the main room stopped our picture (our line cannot carry it): the sound
  // goes on, and the screen says why instead of showing a frozen frame.
  const audioOnly = join.state === "live" && Boolean(join.peer && join.peer.audio_only);
  slate.textContent = audioOnly ? t("kiosk.audio_only") : texts[join.state] || "";
  slate.dataset.state = audioOnly ? "audio-only" : join.state;
  slate.hidden = join.state === "live" && !audioOnly;
  $("hand-button").textContent = t(join.hand_up ? "kiosk.lower_hand" : "kiosk.raise_hand");
  $("hand-button").disabled = !join.lesson;
  if (!status.hosting.length) {
    const lesson = join.lesson;
    $("lesson-info").textContent = !lesson
      ? t("panel.no_lesson")
      : lesson.subject
        ? t("kiosk.lesson_from_subject", { main: lesson.main, subject: lesson.subject })
        : t("kiosk.lesson_from", { main: lesson.main });
  }
  if (!lessonViewer) lessonViewer = keepWatching("lesson", $("lesson-video"), {});
}

function renderControls(controls) {
  const camera = $("mute-camera");
  camera.setAttribute("aria-pressed", String(controls.camera_muted));
  camera.textContent = t(controls.camera_muted ? "panel.camera_off" : "panel.camera_on");
  const microphone = $("mute-microphone");
  microphone.setAttribute("aria-pressed", String(controls.microphone_muted));
  microphone.textContent = t(controls.microphone_muted ? "panel.microphone_off" : "panel.microphone_on");
}

// The lesson reports, once the lesson is over: the latest as a big link, a few more in a
// list. Asked for every 15 s, every 2 s for a while after a lesson ends (the report is
// sealed a moment after the end).
const REPORTS_SHOWN = 5;
let reportsDue = 0;
let reportsFastUntil = 0;
let wasLive = false;

async function refreshReports(live) {
  if (live) {
    $("reports").hidden = true;
    wasLive = true;
    return;
  }
  const now = Date.now();
  if (wasLive) {
    wasLive = false;
    reportsFastUntil = now + 30000;
    reportsDue = 0;
  }
  if (now < reportsDue) return;
  reportsDue = now + (now < reportsFastUntil ? 2000 : 15000);
  try {
    const response = await fetch("/api/reports");
    const result = await response.json();
    renderReports(result.ok ? result.reports : []);
  } catch (error) {
    renderReports([]);
  }
}

function renderReports(rows) {
  $("reports").hidden = rows.length === 0;
  if (!rows.length) return;
  const latest = $("latest-report");
  latest.href = reportLink(rows[0].lesson);
  latest.textContent = t("panel.report_latest", { lesson: reportLine(rows[0]) });
  const items = rows.slice(0, REPORTS_SHOWN).map((row) => {
    const item = document.createElement("li");
    const link = document.createElement("a");
    link.href = reportLink(row.lesson);
    link.textContent = reportLine(row);
    item.appendChild(link);
    return item;
  });
  $("report-list").replaceChildren(...items);
}

function render() {
  if (!status) return;
  $("room-name").textContent = status.name;
  document.title = t("panel.page_title", { room: status.name });
  const select = $("group");
  if (select.options.length !== status.hosting.length) {
    select.innerHTML = "";
    for (const host of status.hosting) select.add(new Option(host.group, host.group));
  }
  select.hidden = status.hosting.length < 2;
  if (status.hosting.length) renderHosting(chosenGroup());
  if (status.joining) renderJoining(status.joining);
  renderControls(status.controls);
  const live = status.hosting.some((host) => host.lesson) || Boolean(status.joining && status.joining.lesson);
  refreshReports(live);
  document.body.dataset.ready = "1";
}

async function refresh() {
  try {
    const response = await fetch("/api/status");
    status = await response.json();
    render();
  } catch (error) {
    $("lesson-info").textContent = t("panel.agent_down");
  }
}

$("lesson-button").addEventListener("click", () => pressButton());

// A USB presenter clicker is a keyboard: its "next" key (PageDown, or F5 "start the
// show") starts the lesson; its "blank screen" key (B or .) pressed twice within 3 s
// ends it, so one stray press never cuts every room off.
let endArmedUntil = 0;
document.addEventListener("keydown", (event) => {
  const host = chosenGroup();
  if (!host || event.target instanceof HTMLInputElement) return;
  if (["PageDown", "F5"].includes(event.key)) {
    event.preventDefault();
    if (!host.lesson) pressButton();
  } else if (["b", "B", "."].includes(event.key)) {
    event.preventDefault();
    if (!host.lesson) return;
    if (Date.now() < endArmedUntil) {
      endArmedUntil = 0;
      pressButton();
    } else {
      endArmedUntil = Date.now() + 3000;
      say(t("panel.press_again"));
    }
  }
});

async function pressButton() {
  const host = chosenGroup();
  if (!host || busy) return;
  busy = true;
  $("lesson-button").disabled = true;
  try {
    if (host.lesson) {
      await post("/api/lesson/end", { group: host.group });
      say(t("panel.lesson_ended"));
    } else {
      const result = await post("/api/lesson/start", { group: host.group, subject: $("subject").value });
      say(t("panel.lesson_started", { id: result.lesson_id }));
    }
  } catch (error) {
    say(error.message, true);
  } finally {
    busy = false;
    await refresh();
  }
}

$("hand-button").addEventListener("click", () => {
  const up = !(status && status.joining && status.joining.hand_up);
  post("/api/hand", { up: up }).then(refresh).catch((e) => say(e.message, true));
});

for (const [id, field] of [["mute-camera", "camera_muted"], ["mute-microphone", "microphone_muted"]]) {
  $(id).addEventListener("click", () => {
    const body = {};
    body[field] = !(status && status.controls[field]);
    post("/api/controls", body).then(refresh).catch((e) => say(e.message, true));
  });
}

refresh();
setInterval(refresh, 1000);
