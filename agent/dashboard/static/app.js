// Classroom fleet dashboard: one WebSocket, incremental DOM updates (no framework, no build).
//
// The server sends a "snapshot" first, then "update" messages holding only the rooms that
// changed (at most a few per second). Each room is one table row; an update rewrites only
// the cells whose text or class changed, so a fleet of 500 rooms stays cheap. Filters live
// in the URL hash (#school=...&status=...&q=...), so a view can be bookmarked or shared.
"use strict";

(() => {
  const t = I18N.t;
  const tn = I18N.tn;
  // Catalogue keys (agent/locales/*.json), written out so the catalogue check sees them.
  const RULES = {
    camera_lost: "dash.rule.camera_lost",
    camera_frozen: "dash.rule.camera_frozen",
    camera_black: "dash.rule.camera_black",
    mic_silent: "dash.rule.mic_silent",
    disk_full: "dash.rule.disk_full",
    temperature_high: "dash.rule.temperature_high",
    broker_unreachable: "dash.rule.broker_unreachable",
    clock_unsynced: "dash.rule.clock_unsynced",
  };
  const STATUS_TEXT = {
    online: "dash.status.online",
    offline: "dash.status.offline",
    shutdown: "dash.status.shutdown",
    stale: "dash.status.stale",
    unknown: "dash.status.unknown",
  };
  const DEVICE_TEXT = { // agent.capture.DeviceState, for the camera and the microphone
    ok: "dash.device.ok",
    starting: "dash.device.starting",
    degraded: "dash.device.degraded",
    lost: "dash.device.lost",
    stopped: "dash.device.stopped",
  };
  const deviceText = (state) => (DEVICE_TEXT[state] ? t(DEVICE_TEXT[state]) : state);
  const QUALITY_TEXT = {
    good: "dash.quality.good",
    fair: "dash.quality.fair",
    poor: "dash.quality.poor",
    unknown: "dash.quality.unknown",
  };
  const FILTERS = ["all", "online", "offline", "stale", "alerts", "lesson"];
  const MODE_TEXT = { // the S-T lesson modes, worded as in the lesson report
    practice: "report.mode.practice",
    lecture: "report.mode.lecture",
    dialogue: "report.mode.dialogue",
    mixed: "report.mode.mixed",
  };

  const $ = (id) => document.getElementById(id);
  const rows = new Map(); // room id -> {tr, cells, room, sig}
  const sites = new Map(); // site -> {section, tbody, ids: [], nameEl, countsEl}
  const lessons = new Map(); // group -> lesson view
  let sensing = []; // the lessons' sensing figures (counts and rates), newest first
  let offsetMs = 0; // server clock minus ours
  let startedAt = 0;
  let filter = { school: "", status: "all", q: "" };
  let socket = null;
  let retry = 0;
  let lastMessage = 0;

  // -- small helpers ------------------------------------------------------------------

  const serverNow = () => (Date.now() + offsetMs) / 1000;

  function el(tag, cls, text) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function setText(node, text) {
    if (node.textContent !== text) node.textContent = text;
  }

  function setClass(node, cls) {
    if (node.className !== cls) node.className = cls;
  }

  function setTitle(node, title) {
    if (node.title !== title) node.title = title;
  }

  const duration = I18N.duration;

  // Formatting with toLocale*String builds a formatter per call: far too slow for
  // 500 rows, so build them once, in the page's language.
  const TIME = I18N.dateTime({ hour: "2-digit", minute: "2-digit" });
  const DAY_TIME = I18N.dateTime({ month: "short", day: "numeric", hour: "2-digit", minute: "2-digit" });
  const SECONDS = I18N.dateTime({ hour: "2-digit", minute: "2-digit", second: "2-digit" });

  function clockTime(epoch) {
    const d = new Date(epoch * 1000);
    if (Date.now() - d.getTime() < 12 * 3600 * 1000 && d.getDate() === new Date().getDate()) {
      return TIME.format(d);
    }
    return DAY_TIME.format(d);
  }

  function fixed(value, digits) {
    return typeof value === "number" ? I18N.number(value, digits) : null;
  }

  function statusOf(room) {
    if (room.status === "online") return room.stale ? "stale" : "online";
    if (room.status === "offline") return room.reason === "shutdown" ? "shutdown" : "offline";
    return "unknown";
  }

  function inLesson(room) {
    return room.lesson !== null && room.lesson !== undefined;
  }

  function echoText(echo) {
    // The echo canceller, for a technician when a room says it hears itself.
    if (!echo) return "";
    if (!echo.active || !echo.aec) return t("dash.mic.echo_off");
    const parts = [t(echo.cancelling ? "dash.mic.echo_cancelling" : "dash.mic.echo_idle")];
    if (typeof echo.echo_path_ms === "number") parts.push(t("dash.mic.echo_path", { ms: fixed(echo.echo_path_ms, 0) }));
    if (typeof echo.erle_db === "number") parts.push(t("dash.mic.erle", { db: fixed(echo.erle_db, 0) }));
    return parts.join(", ");
  }

  function profileProblem(room) {
    return Boolean(room.config && room.config.problem);
  }

  const LAYER_CAUSE_TEXT = {
    start: "dash.lessons.cause.start", loss: "dash.lessons.cause.loss",
    bandwidth: "dash.lessons.cause.bandwidth", delay: "dash.lessons.cause.delay",
    probe: "dash.lessons.cause.probe", pinned: "dash.lessons.cause.pinned",
  };
  const PROFILE_STATE_TEXT = {
    applied: "dash.profile.state.applied", cleared: "dash.profile.state.cleared",
    pending: "dash.profile.state.pending", waiting: "dash.profile.state.waiting",
    rejected: "dash.profile.state.rejected", "rolled-back": "dash.profile.state.rolled_back",
    expired: "dash.profile.state.expired", dropped: "dash.profile.state.dropped",
  };
  const PROFILE_LAYER_TEXT = {
    fleet: "dash.profile.layer.fleet", school: "dash.profile.layer.school",
    group: "dash.profile.layer.group", room: "dash.profile.layer.room",
  };
  const PROFILE_CHIP = {
    applied: "chip-ok", cleared: "chip-ok", pending: "chip-warning", waiting: "chip-warning",
    rejected: "chip-critical", "rolled-back": "chip-critical", expired: "chip-critical", dropped: "chip-critical",
  };

  function renderProfile(cell, config) {
    const key = config ? JSON.stringify(config) : "";
    if (cell.dataset.v === key) return;
    cell.dataset.v = key;
    if (!config || !config.layers.length) {
      cell.replaceChildren(el("span", "none", "–"));
      cell.title = "";
      return;
    }
    const chips = el("div", "chips");
    for (const layer of config.layers) {
      const kind = layer.layer.split(":")[0];
      const version = layer.version !== null ? ` v${layer.version}` : "";
      const state = PROFILE_STATE_TEXT[layer.state] ? t(PROFILE_STATE_TEXT[layer.state]) : layer.state;
      const chip = el("span", `chip ${PROFILE_CHIP[layer.state] || ""}`);
      chip.dataset.state = layer.state;
      chip.dataset.layer = layer.layer;
      chip.append(el("b", "", PROFILE_LAYER_TEXT[kind] ? t(PROFILE_LAYER_TEXT[kind]) : kind), ` ${state}${version}`);
      const applied = layer.applied_version !== null
        ? t("dash.profile.in_effect", { version: layer.applied_version }) : t("dash.profile.none_in_effect");
      chip.title = `${layer.layer}: ${state}${version}. ${applied}${layer.reason ? `. ${layer.reason}` : ""}`;
      chips.append(chip);
    }
    cell.replaceChildren(chips);
  }

  // -- filters ------------------------------------------------------------------------

  function matches(room) {
    if (filter.school && room.site !== filter.school) return false;
    const st = statusOf(room);
    switch (filter.status) {
      case "online": if (st !== "online") return false; break;
      case "offline": if (st !== "offline" && st !== "shutdown") return false; break;
      case "stale": if (st !== "stale") return false; break;
      case "alerts": if (!room.alerts.length) return false; break;
      case "lesson": if (!inLesson(room)) return false; break;
      case "profiles": if (!profileProblem(room)) return false; break;
      default: break;
    }
    if (filter.q) {
      const hay = `${room.id} ${room.name || ""}`.toLowerCase();
      if (!hay.includes(filter.q)) return false;
    }
    return true;
  }

  function readHash() {
    const params = new URLSearchParams(location.hash.replace(/^#/, ""));
    const status = params.get("status") || "all";
    filter = {
      school: params.get("school") || "",
      status: FILTERS.includes(status) ? status : "all",
      q: (params.get("q") || "").trim().toLowerCase(),
    };
    ensureSchoolOption(filter.school);
    $("f-school").value = filter.school;
    $("f-search").value = params.get("q") || "";
    for (const button of document.querySelectorAll(".seg button")) {
      button.setAttribute("aria-pressed", String(button.dataset.status === filter.status));
    }
  }

  function writeHash() {
    const params = new URLSearchParams();
    if (filter.school) params.set("school", filter.school);
    if (filter.status !== "all") params.set("status", filter.status);
    if (filter.q) params.set("q", filter.q);
    const hash = params.toString();
    history.replaceState(null, "", hash ? `#${hash}` : location.pathname + location.search);
  }

  function applyFilter() {
    for (const entry of rows.values()) entry.tr.hidden = !matches(entry.room);
    refreshSites(sites.keys());
    refreshFilterCounts();
    renderLessons();
    renderSensing();
  }

  // -- schools ------------------------------------------------------------------------

  function ensureSchoolOption(site) {
    if (!site) return;
    const select = $("f-school");
    for (const option of select.options) if (option.value === site) return;
    const option = el("option", "", site);
    option.value = site;
    let before = null;
    for (const other of select.options) {
      if (other.value && other.value > site) { before = other; break; }
    }
    select.insertBefore(option, before);
  }

  function siteFor(site) {
    let entry = sites.get(site);
    if (entry) return entry;
    const fragment = $("school-tpl").content.cloneNode(true);
    const section = fragment.querySelector("section");
    section.dataset.site = site;
    entry = {
      section,
      tbody: section.querySelector("tbody"),
      ids: [],
      nameEl: section.querySelector(".school-name"),
      countsEl: section.querySelector(".school-counts"),
    };
    entry.nameEl.textContent = site;
    const keys = [...sites.keys(), site].sort();
    const next = keys[keys.indexOf(site) + 1];
    $("schools").insertBefore(section, next ? sites.get(next).section : null);
    sites.set(site, entry);
    ensureSchoolOption(site);
    return entry;
  }

  function refreshSites(names) {
    let visibleRooms = 0;
    for (const name of names) {
      const site = sites.get(name);
      if (!site) continue;
      let total = 0, visible = 0, online = 0, stale = 0, offline = 0, alerts = 0;
      for (const id of site.ids) {
        const entry = rows.get(id);
        total += 1;
        if (!entry.tr.hidden) visible += 1;
        const st = statusOf(entry.room);
        if (st === "online") online += 1;
        if (st === "stale") stale += 1;
        if (st === "offline" || st === "shutdown") offline += 1;
        alerts += entry.room.alerts.length;
      }
      site.section.hidden = visible === 0;
      const counts = site.countsEl;
      counts.replaceChildren();
      counts.append(`${tn("dash.school.rooms", total)} · ${t("dash.school.online", { n: I18N.number(online) })}`);
      if (stale) counts.append(" · ", el("span", "warn", t("dash.school.stale", { n: I18N.number(stale) })));
      if (offline) counts.append(" · ", el("span", "bad", t("dash.school.offline", { n: I18N.number(offline) })));
      if (alerts) counts.append(" · ", el("span", "bad", tn("dash.school.alerts", alerts)));
    }
    for (const entry of rows.values()) if (!entry.tr.hidden) visibleRooms += 1;
    $("rooms-empty").hidden = visibleRooms > 0 || rows.size === 0;
    setText($("shown"), rows.size
      ? t("dash.rooms.shown", { shown: I18N.number(visibleRooms), total: I18N.number(rows.size) }) : "");
  }

  function refreshFilterCounts() {
    const counts = { all: 0, online: 0, offline: 0, stale: 0, alerts: 0, lesson: 0, profiles: 0 };
    for (const { room } of rows.values()) {
      if (filter.school && room.site !== filter.school) continue;
      counts.all += 1;
      const st = statusOf(room);
      if (st === "online") counts.online += 1;
      if (st === "offline" || st === "shutdown") counts.offline += 1;
      if (st === "stale") counts.stale += 1;
      if (room.alerts.length) counts.alerts += 1;
      if (inLesson(room)) counts.lesson += 1;
      if (profileProblem(room)) counts.profiles += 1;
    }
    for (const span of document.querySelectorAll(".seg .n")) {
      setText(span, I18N.number(counts[span.dataset.n]));
    }
  }

  // -- rooms --------------------------------------------------------------------------

  function makeRow(room) {
    const tr = el("tr");
    tr.dataset.id = room.id;
    const cells = {};
    const td = (name, cls) => {
      const cell = el("td", cls);
      tr.append(cell);
      cells[name] = cell;
      return cell;
    };
    const status = td("status", "status-cell");
    cells.pill = el("span", "st");
    cells.pill.append(el("span", "dot"), (cells.statusText = el("span", "st-text")));
    cells.since = el("span", "since");
    status.append(cells.pill, cells.since);
    const roomCell = td("room", "room-cell");
    cells.name = el("div", "rname");
    cells.rid = el("div", "rid", room.id);
    roomCell.append(cells.name, cells.rid);
    td("camera", "fig");
    td("mic", "fig");
    td("cpu", "fig num");
    td("temp", "fig num");
    td("disk", "fig num");
    td("rtt", "fig num");
    td("clock", "fig");
    td("alerts", "alerts-cell");
    td("lesson", "lesson-cell");
    td("profile", "profile-cell");
    return { tr, cells, room: null, alertSig: null };
  }

  function insertRow(entry, room) {
    const site = siteFor(room.site);
    const ids = site.ids;
    let lo = 0, hi = ids.length;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (ids[mid] < room.id) lo = mid + 1; else hi = mid;
    }
    ids.splice(lo, 0, room.id);
    const next = ids[lo + 1];
    site.tbody.insertBefore(entry.tr, next ? rows.get(next).tr : null);
  }

  function figure(cell, text, unit, cls, title) {
    // One value with a muted unit; null shows a dash.
    if (text === null || text === undefined) {
      if (cell.dataset.v !== "-") {
        cell.dataset.v = "-";
        cell.replaceChildren(el("span", "none", "–"));
        cell.title = "";
      }
      return;
    }
    if (cell.dataset.v !== "1") {
      // Built once; later updates rewrite the two spans' text and class in place.
      cell.dataset.v = "1";
      cell.replaceChildren(el("span"), el("span", "unit"));
    }
    const [value, unitEl] = cell.children;
    setText(value, text);
    setClass(value, cls || "");
    setText(unitEl, unit || "");
    setTitle(cell, title || "");
  }

  function level(value, warn, bad) {
    if (typeof value !== "number") return "";
    if (value >= bad) return "v-bad";
    if (value >= warn) return "v-warn";
    return "";
  }

  function renderSince(entry) {
    const room = entry.room;
    const st = statusOf(room);
    let text = "";
    let title = "";
    if (st === "stale" && room.health) {
      text = t("dash.since.no_health_for", { age: duration(serverNow() - room.health.received) });
      title = t("dash.since.last_health", { time: clockTime(room.health.received) });
    } else if (st === "stale") {
      text = t("dash.since.no_health_yet");
    } else if (room.since) {
      const age = duration(serverNow() - room.since);
      const time = clockTime(room.since);
      text = t(room.since_exact ? "dash.since.for" : "dash.since.for_at_least", { age });
      title = t(room.since_exact ? "dash.since.since" : "dash.since.since_before", { time });
      if (room.reason && st !== "online") title = t("dash.since.with_reason", { text: title, reason: room.reason });
    }
    setText(entry.cells.since, text);
    setTitle(entry.cells.since, title);
  }

  function updateRow(entry, room) {
    entry.room = room;
    const c = entry.cells;
    const st = statusOf(room);
    entry.tr.dataset.status = st;
    setClass(entry.tr, st === "offline" || st === "shutdown" ? "is-offline" : st === "stale" ? "is-stale" : "");
    setClass(c.pill, `st st-${st}`);
    setText(c.statusText, t(STATUS_TEXT[st]));
    setTitle(c.pill, st === "offline"
      ? t("dash.status.offline_reason", { reason: room.reason || t("dash.status.connection_lost") }) : "");
    renderSince(entry);
    setText(c.name, room.name || room.room);
    setTitle(c.name, room.name ? `${room.name} (${room.id})` : room.id);

    const h = room.health;
    if (!h) {
      for (const name of ["camera", "mic", "cpu", "temp", "disk", "rtt", "clock"]) figure(c[name], null);
    } else {
      const cam = h.camera || "?";
      const camCls = cam === "ok" ? "v-ok" : cam === "degraded" || cam === "starting" ? "v-warn" : "v-bad";
      const camText = deviceText(cam);
      figure(c.camera, camText, h.fps !== null ? t("dash.camera.fps", { fps: fixed(h.fps, 1) }) : "", camCls,
        h.camera_reason
          ? t("dash.camera.title_reason", { state: camText, reason: h.camera_reason })
          : t("dash.camera.title", { state: camText }));
      const micCls = h.mic && h.mic !== "ok" ? "v-bad" : h.clipping ? "v-warn" : "";
      const micText = h.mic && h.mic !== "ok" ? deviceText(h.mic) : fixed(h.mic_dbfs, 0);
      figure(c.mic, micText, h.mic && h.mic !== "ok" ? "" : "dBFS", micCls,
        [h.clipping ? t("dash.mic.clipping") : t("dash.mic.title", { state: h.mic ? deviceText(h.mic) : "?" }),
          echoText(h.echo)].filter(Boolean).join(" · "));
      figure(c.cpu, fixed(h.cpu_percent, 0), "%", level(h.cpu_percent, 85, 95),
        typeof h.memory_percent === "number" ? t("dash.cpu.memory", { percent: fixed(h.memory_percent, 0) }) : "");
      figure(c.temp, fixed(h.temperature_c, 0), "°C", level(h.temperature_c, 75, 85));
      figure(c.disk, fixed(h.disk_percent, 0), "%", level(h.disk_percent, 85, 90),
        typeof h.disk_free_mb === "number" ? t("dash.disk.free", { gb: fixed(h.disk_free_mb / 1024, 1) }) : "");
      figure(c.rtt, fixed(h.broker_rtt_ms, 0), "ms", level(h.broker_rtt_ms, 200, 1000),
        h.queued ? tn("dash.rtt.queued", h.queued) : "");
      const offset = h.clock_offset_s;
      let clockText = t("dash.clock.synced"), clockCls = "v-ok", clockTitle = t("dash.clock.synced_title");
      if (h.clock_synced === false) {
        clockText = t("dash.clock.unsynced"); clockCls = "v-warn"; clockTitle = t("dash.clock.unsynced_title");
      } else if (h.clock_synced === null) {
        clockText = t("dash.clock.unknown"); clockCls = ""; clockTitle = t("dash.clock.unknown_title");
      }
      if (typeof offset === "number" && Math.abs(offset) >= 5 && st !== "stale") {
        clockText = `${offset > 0 ? "−" : "+"}${duration(Math.abs(offset))}`;
        clockCls = "v-warn";
        clockTitle = t("dash.clock.offset_title", { offset: duration(Math.abs(offset)) });
      }
      figure(c.clock, clockText, "", clockCls, clockTitle);
    }

    const sig = room.alerts.map((a) => `${a.id}:${a.severity}`).join(",");
    if (sig !== entry.alertSig) {
      entry.alertSig = sig;
      if (!room.alerts.length) {
        c.alerts.replaceChildren(el("span", "none", "–"));
      } else {
        const chips = el("div", "chips");
        for (const alert of room.alerts) {
          const chip = el("span", `chip chip-${alert.severity}`);
          chip.dataset.rule = alert.rule;
          chip.append(
            el("b", "", t(alert.severity === "critical" ? "dash.alert.critical" : "dash.alert.warning")),
            RULES[alert.rule] ? t(RULES[alert.rule]) : alert.rule.replace(/_/g, " "),
          );
          const severity = t(alert.severity === "critical" ? "dash.alert.critical_word" : "dash.alert.warning_word");
          let title = t("dash.alert.title", { severity, message: alert.message || alert.rule });
          if (alert.since) title = t("dash.alert.title_since", { text: title, time: clockTime(alert.since) });
          if (alert.delayed) title = t("dash.alert.title_late", { text: title });
          chip.title = title;
          chips.append(chip);
        }
        c.alerts.replaceChildren(chips);
      }
    }

    const lesson = room.lesson;
    const lessonKey = lesson ? `${lesson.group}|${lesson.role}|${lesson.joined}|${lesson.subject}` : "";
    if (c.lesson.dataset.v !== lessonKey) {
      c.lesson.dataset.v = lessonKey;
      if (!lesson) {
        c.lesson.replaceChildren(el("span", "none", "–"));
        c.lesson.title = "";
      } else {
        const subject = lesson.subject || lesson.group || t("dash.lesson.default_subject");
        const role = t(lesson.role === "main" ? "dash.lesson.main" : lesson.joined ? "dash.lesson.joined" : "dash.lesson.not_joined");
        c.lesson.replaceChildren(el("span", `badge${lesson.joined ? "" : " not-joined"}`, `${role} · ${subject}`));
        c.lesson.title = `${lesson.group || ""} ${lesson.lesson_id || ""}`.trim();
      }
    }
    renderProfile(c.profile, room.config);
    entry.tr.hidden = !matches(room);
  }

  function applyRooms(list) {
    const touched = new Set();
    for (const room of list) {
      let entry = rows.get(room.id);
      if (!entry) {
        entry = makeRow(room);
        rows.set(room.id, entry);
        updateRow(entry, room);
        insertRow(entry, room);
      } else {
        updateRow(entry, room);
      }
      touched.add(room.site);
    }
    $("rooms-wait").hidden = rows.size > 0;
    refreshSites(touched);
    refreshFilterCounts();
  }

  function removeMissing(ids) {
    for (const [id, entry] of rows) {
      if (ids.has(id)) continue;
      entry.tr.remove();
      rows.delete(id);
      const site = sites.get(entry.room.site);
      site.ids.splice(site.ids.indexOf(id), 1);
    }
  }

  // -- header and lessons -------------------------------------------------------------

  function applyCounts(counts) {
    const n = I18N.number;
    setText($("k-rooms"), n(counts.rooms));
    setText($("k-schools"), tn("dash.kpi.schools", sites.size));
    setText($("k-online"), n(counts.online));
    setText($("k-online-note"), counts.rooms
      ? t("dash.kpi.connected", { percent: n(Math.round((100 * (counts.online + counts.stale)) / counts.rooms)) }) : "");
    setText($("k-offline"), n(counts.offline));
    $("k-offline").parentElement.classList.toggle("zero", counts.offline === 0);
    setText($("k-offline-note"), counts.unknown
      ? t("dash.kpi.without_state", { n: n(counts.unknown) }) : t("dash.kpi.offline_note"));
    setText($("k-stale"), n(counts.stale));
    $("k-stale").parentElement.classList.toggle("zero", counts.stale === 0);
    setText($("k-alerts"), n(counts.alerts));
    $("k-alerts").parentElement.classList.toggle("zero", counts.alerts === 0);
    setText($("k-alerts-note"), t("dash.kpi.alerts_note", { critical: n(counts.critical), warning: n(counts.warning) }));
    setText($("k-lessons"), n(counts.lessons_live));
    setText($("k-lessons-note"), tn("dash.kpi.rooms_taking_part", counts.rooms_in_lesson));
  }

  function roomLabel(id) {
    const entry = rows.get(id);
    return entry && entry.room.name ? entry.room.name : id;
  }

  function renderLessons() {
    const body = $("lessons-body");
    const fragment = document.createDocumentFragment();
    // Problems first (main room offline, poor stream, rooms missing), then by group;
    // with a school selected, only the lessons that school takes part in.
    const inSchool = (lesson) => !filter.school ||
      [lesson.main, ...lesson.expected].some((d) => d.split(".")[0] === filter.school);
    const trouble = (lesson) => (lesson.main_online ? 0 : 8) +
      ({ poor: 4, fair: 2 }[lesson.quality] || 0) + (lesson.joined.length < lesson.expected.length ? 1 : 0);
    const shown = [...lessons.values()].filter(inSchool);
    const ordered = shown.sort((a, b) => trouble(b) - trouble(a) ||
      a.group.localeCompare(b.group, undefined, { numeric: true }));
    const issues = ordered.filter((lesson) => trouble(lesson) >= 2).length;
    const note = $("lessons-note");
    note.replaceChildren(filter.school
      ? t("dash.lessons.live_with", { n: I18N.number(shown.length), school: filter.school })
      : t("dash.lessons.live", { n: I18N.number(shown.length) }));
    if (issues) note.append(" · ", el("span", "bad", t("dash.lessons.problems", { n: I18N.number(issues) })));
    for (const lesson of ordered) {
      const tr = el("tr");
      tr.dataset.group = lesson.group;
      const subject = el("td");
      subject.append(el("div", "subject", lesson.subject || "—"));
      tr.append(el("td", "group", lesson.group), subject);
      const main = el("td");
      main.append(el("span", "", lesson.main_name || lesson.main));
      if (lesson.main_name) main.append(el("span", "lesson-site", lesson.main.split(".")[0]));
      main.title = lesson.main;
      if (!lesson.main_online) main.append(" ", el("span", "missing", t("dash.lessons.main_offline")));
      tr.append(main);
      const expected = lesson.expected.length;
      const joined = lesson.joined.length;
      const joinedCell = el("td");
      const bar = el("span", "joined-bar");
      const meter = el("span", `meter${joined < expected ? " partial" : ""}`);
      const fill = el("i");
      fill.style.width = `${expected ? Math.round((100 * joined) / expected) : 0}%`;
      meter.append(fill);
      bar.append(meter, `${I18N.number(joined)} / ${I18N.number(expected)}`);
      joinedCell.append(bar);
      const missing = lesson.expected.filter((d) => !lesson.joined.includes(d));
      if (missing.length) {
        joinedCell.title = t("dash.lessons.not_joined", { rooms: missing.map(roomLabel).join(t("common.list_separator")) });
        joinedCell.append(" ", el("span", "missing", t("dash.lessons.missing", { n: I18N.number(missing.length) })));
      }
      tr.append(joinedCell);
      const quality = el("td");
      const label = QUALITY_TEXT[lesson.quality] ? t(QUALITY_TEXT[lesson.quality]) : lesson.quality;
      quality.append(el("span", `q q-${lesson.quality}`, label));
      const detail = qualityDetail(lesson);
      if (detail) quality.append(el("span", "q-detail", detail));
      for (const room of lesson.layers || []) {
        if (room.layer === "high") continue;  // the full picture: nothing to say
        const key = room.audio_only ? "dash.lessons.layer_audio_only"
          : room.layer === "floor" ? "dash.lessons.layer_floor" : "dash.lessons.layer_low";
        const line = el("span", `q-layer${room.audio_only ? " bad" : ""}`,
          t(key, { room: roomLabel(room.device) }));
        line.dataset.device = room.device;
        line.dataset.layer = room.layer;
        const cause = LAYER_CAUSE_TEXT[room.cause];
        line.title = cause ? t(cause) : room.reason || "";
        quality.append(line);
      }
      tr.append(quality);
      const started = el("td", "started num");
      started.dataset.started = lesson.started_at || "";
      tr.append(started);
      fragment.append(tr);
    }
    body.replaceChildren(fragment);
    $("lessons-empty").hidden = ordered.length > 0;
    $("lessons-empty").textContent = filter.school && lessons.size
      ? t("dash.lessons.none_with", { school: filter.school }) : t("dash.lessons.none");
    tickLessons();
  }

  function qualityDetail(lesson) {
    // The worst peer's figures, worded in the page's language (the server's
    // quality_detail is English).
    const f = lesson.quality_figures;
    if (!f) return lesson.quality_detail || "";
    const parts = [];
    if (typeof f.loss_percent === "number") parts.push(t("dash.quality.loss", { percent: fixed(f.loss_percent, 1) }));
    if (typeof f.rtt_ms === "number") parts.push(t("dash.quality.rtt", { ms: fixed(f.rtt_ms, 0) }));
    if (typeof f.fps === "number") parts.push(t("dash.quality.fps", { fps: fixed(f.fps, 0) }));
    return parts.length ? parts.join(" · ") : t("dash.quality.no_figures");
  }

  function tickLessons() {
    for (const cell of document.querySelectorAll("#lessons-body .started")) {
      const started = Number(cell.dataset.started);
      setText(cell, started ? duration(serverNow() - started) : "–");
      if (started) setTitle(cell, t("dash.lessons.started", { time: clockTime(started) }));
    }
  }

  // The lessons' sensing aggregates: per lesson a total row, then one row per room.
  // Counts and rates only; the rooms publish nothing else.
  const SENSING_FIELDS = ["head_count", "head_up_rate", "hand_raises", "rt", "ch", "mode",
    "present", "late", "absent"];

  function sensingText(name, value) {
    if (value === null || value === undefined) return "–";
    if (name === "head_up_rate") return `${fixed(100 * value, 0)}%`;
    if (name === "rt" || name === "ch") return fixed(value, 2);
    if (name === "mode") return MODE_TEXT[value] ? t(MODE_TEXT[value]) : value;
    return I18N.number(value);
  }

  function sensingRow(lesson, figures, total) {
    const tr = el("tr", total ? "sensing-total" : "sensing-room");
    tr.dataset.lesson = lesson.lesson_id;
    const first = el("td");
    const second = el("td");
    if (total) {
      first.append(el("div", "subject", lesson.subject || lesson.group || lesson.lesson_id),
        el("span", `badge${lesson.live ? "" : " ended"}`, t(lesson.live ? "dash.sensing.live" : "dash.sensing.ended")));
      first.title = [lesson.group, lesson.lesson_id].filter(Boolean).join(" · ");
      second.textContent = tn("dash.school.rooms", lesson.rooms.length);
    } else {
      tr.dataset.device = figures.device;
      second.textContent = roomLabel(figures.device);
      second.title = figures.device;
      tr.title = t(figures.final ? "dash.sensing.final_title" : "dash.sensing.live_title");
    }
    tr.append(first, second);
    for (const name of SENSING_FIELDS) {
      const cell = el("td", name === "mode" ? "" : "num", sensingText(name, figures[name]));
      cell.dataset.f = name;
      tr.append(cell);
    }
    if (figures.corrections > 0) {
      // The teacher corrected attendance on the panel: these counts are the corrected ones.
      const mark = el("span", "corrected", "✎");
      mark.title = t("dash.sensing.corrected", { n: I18N.number(figures.corrections) });
      tr.lastChild.append(" ", mark);
    }
    return tr;
  }

  function renderSensing() {
    const inSchool = (lesson) => !filter.school ||
      lesson.rooms.some((room) => room.device.split(".")[0] === filter.school);
    const fragment = document.createDocumentFragment();
    const shown = sensing.filter(inSchool);
    for (const lesson of shown) {
      fragment.append(sensingRow(lesson, lesson.totals, true));
      for (const room of lesson.rooms) fragment.append(sensingRow(lesson, room, false));
    }
    $("sensing-body").replaceChildren(fragment);
    $("sensing-empty").hidden = shown.length > 0;
  }

  function applyBroker(broker) {
    const banner = $("banner");
    setText($("broker-url"), t("dash.broker.url", { url: broker.url }));
    if (broker.connected) {
      banner.hidden = true;
    } else if (!broker.ever_connected) {
      banner.hidden = false;
      setText(banner, t("dash.broker.connecting", { url: broker.url }));
    } else {
      banner.hidden = false;
      setText(banner, t("dash.broker.lost", { url: broker.url, time: clockTime(broker.since) }));
    }
  }

  function setConn(kind, text) {
    setClass($("conn"), `conn conn-${kind}`);
    setText($("conn-text"), text);
  }

  // -- messages -------------------------------------------------------------------------

  function onMessage(event) {
    let message;
    try {
      message = JSON.parse(event.data);
    } catch {
      return;
    }
    if (typeof message.generated_at === "number") {
      offsetMs = message.generated_at * 1000 - Date.now();
      lastMessage = Date.now();
    }
    if (message.type === "snapshot") {
      startedAt = message.started_at || 0;
      removeMissing(new Set(message.rooms.map((r) => r.id)));
      applyRooms(message.rooms);
      lessons.clear();
      for (const lesson of message.lessons) lessons.set(lesson.group, lesson);
      renderLessons();
      sensing = message.sensing || [];
      renderSensing();
      applyBroker(message.broker);
      applyCounts(message.counts);
    } else if (message.type === "update") {
      if (message.rooms.length) applyRooms(message.rooms);
      if (message.lessons) {
        for (const lesson of message.lessons) lessons.set(lesson.group, lesson);
        for (const group of message.lessons_removed || []) lessons.delete(group);
        renderLessons();
      }
      if (message.sensing) {
        sensing = message.sensing;
        renderSensing();
      }
      if (message.broker) applyBroker(message.broker);
      applyCounts(message.counts);
    }
    tickUpdated();
  }

  function tickUpdated() {
    if (!lastMessage) return;
    setText($("updated"), t("dash.updated", { time: SECONDS.format(new Date(lastMessage)) }));
  }

  function connect() {
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    socket = new WebSocket(`${scheme}://${location.host}/api/ws`);
    socket.addEventListener("open", () => {
      retry = 0;
      setConn("live", t("dash.conn.live"));
    });
    socket.addEventListener("message", onMessage);
    socket.addEventListener("close", () => {
      socket = null;
      const delay = Math.min(10000, 500 * 2 ** retry) * (0.5 + Math.random() / 2);
      retry += 1;
      setConn("down", t("dash.conn.reconnecting"));
      setTimeout(connect, delay);
    });
  }

  // -- start --------------------------------------------------------------------------

  function start() {
    readHash();
    $("f-school").addEventListener("change", (e) => {
      filter.school = e.target.value;
      writeHash();
      applyFilter();
    });
    for (const button of document.querySelectorAll(".seg button")) {
      button.addEventListener("click", () => {
        filter.status = button.dataset.status;
        for (const other of document.querySelectorAll(".seg button")) {
          other.setAttribute("aria-pressed", String(other === button));
        }
        writeHash();
        applyFilter();
      });
    }
    let searchTimer = 0;
    $("f-search").addEventListener("input", (e) => {
      clearTimeout(searchTimer);
      searchTimer = setTimeout(() => {
        filter.q = e.target.value.trim().toLowerCase();
        writeHash();
        applyFilter();
      }, 150);
    });
    $("lessons-toggle").addEventListener("click", (e) => {
      const open = e.target.getAttribute("aria-expanded") !== "true";
      e.target.setAttribute("aria-expanded", String(open));
      e.target.textContent = t(open ? "dash.lessons.hide" : "dash.lessons.show");
      $("lessons-wrap").hidden = !open;
      $("sensing-part").hidden = !open;
    });
    window.addEventListener("hashchange", () => {
      readHash();
      applyFilter();
    });
    setInterval(() => {
      // Relative times ("for 12 min") of the rows in view, and the lessons' durations.
      for (const entry of rows.values()) if (!entry.tr.hidden) renderSince(entry);
      tickLessons();
    }, 5000);
    connect();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
