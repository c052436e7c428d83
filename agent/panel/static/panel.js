"use strict";
// The teacher's panel: one button, live tiles, hands; or, in a receiving room, the
// lesson full screen. State comes from GET /api/status once a second.

const $ = (id) => document.getElementById(id);
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
  const s = Math.max(0, Math.round(Date.now() / 1000 - seconds));
  if (s < 60) return s + " s";
  return Math.floor(s / 60) + " min";
}

function figures(f) {
  // The room's link as its peer connection reports it (health topic, same figures).
  if (!f || f.state !== "connected") return "";
  const parts = [];
  if (f.fps != null) parts.push(Math.round(f.fps) + " fps");
  if (f.rtt_ms != null) parts.push(Math.round(f.rtt_ms) + " ms");
  if (f.loss_percent != null) parts.push(f.loss_percent.toFixed(1) + " % loss");
  if (f.layer && f.layer !== "high") parts.push(f.layer + " layer");
  return parts.join(" · ");
}

function tileFor(room) {
  let tile = tiles.get(room);
  if (tile) return tile;
  const element = document.createElement("figure");
  element.className = "tile";
  element.dataset.room = room;
  element.innerHTML =
    '<video autoplay muted playsinline></video>' +
    '<button class="hand" type="button" hidden title="Lower hand">&#9995;</button>' +
    '<figcaption><span class="name"></span><span class="figures"></span>' +
    '<span class="badge"></span></figcaption>';
  element.querySelector(".name").textContent = room;
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
  button.textContent = live ? "End lesson" : "Start lesson";
  button.classList.toggle("start", !live);
  button.classList.toggle("end", Boolean(live));
  button.disabled = busy;
  $("subject").disabled = Boolean(live);
  $("lesson-info").textContent = live
    ? "Live: " + (host.lesson.subject || host.group) + " · " + since(host.lesson.started_at)
    : "No lesson";
  const rooms = live ? host.rooms : {};
  dropTiles(new Set(Object.keys(rooms)));
  for (const [room, info] of Object.entries(rooms)) {
    const tile = tileFor(room);
    tile.element.dataset.state = info.state;
    const badge = tile.element.querySelector(".badge");
    badge.textContent = info.state;
    badge.className = "badge " + info.state;
    tile.element.querySelector(".hand").hidden = !info.hand_up;
    tile.element.querySelector(".figures").textContent = figures(info.figures);
    tile.element.querySelector(".name").textContent = info.name || room;
  }
  if (!selfViewer) selfViewer = keepWatching("lesson", $("self-video"), {});
}

function renderJoining(join) {
  $("joining").hidden = false;
  const badge = $("join-state");
  badge.textContent = join.state;
  badge.className = "badge " + join.state;
  const slate = $("slate");
  const texts = {
    waiting: join.reason || "Waiting for the lesson",
    joining: "Joining the lesson...",
    reconnecting: "Reconnecting...",
  };
  slate.textContent = texts[join.state] || "";
  slate.hidden = join.state === "live";
  $("hand-button").textContent = join.hand_up ? "Lower hand" : "Raise hand";
  $("hand-button").disabled = !join.lesson;
  if (!status.hosting.length) {
    $("lesson-info").textContent = join.lesson
      ? "Lesson from " + join.lesson.main + (join.lesson.subject ? ": " + join.lesson.subject : "")
      : "No lesson";
  }
  if (!lessonViewer) lessonViewer = keepWatching("lesson", $("lesson-video"), {});
}

function renderControls(controls) {
  const camera = $("mute-camera");
  camera.setAttribute("aria-pressed", String(controls.camera_muted));
  camera.textContent = controls.camera_muted ? "Camera off" : "Camera on";
  const microphone = $("mute-microphone");
  microphone.setAttribute("aria-pressed", String(controls.microphone_muted));
  microphone.textContent = controls.microphone_muted ? "Microphone off" : "Microphone on";
}

function render() {
  if (!status) return;
  $("room-name").textContent = status.name;
  document.title = status.name + " · panel";
  const select = $("group");
  if (select.options.length !== status.hosting.length) {
    select.innerHTML = "";
    for (const host of status.hosting) select.add(new Option(host.group, host.group));
  }
  select.hidden = status.hosting.length < 2;
  if (status.hosting.length) renderHosting(chosenGroup());
  if (status.joining) renderJoining(status.joining);
  renderControls(status.controls);
  document.body.dataset.ready = "1";
}

async function refresh() {
  try {
    const response = await fetch("/api/status");
    status = await response.json();
    render();
  } catch (error) {
    $("lesson-info").textContent = "Agent not answering";
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
      say("Press the same key again to end the lesson");
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
      say("Lesson ended");
    } else {
      const result = await post("/api/lesson/start", { group: host.group, subject: $("subject").value });
      say("Lesson " + result.lesson_id + " started: rooms join by themselves");
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
