"use strict";
// Remote inspection of a room's lesson picture and sound. The token comes from the URL
// fragment (#token=...), which the browser never sends to any server.

const token = new URLSearchParams(location.hash.slice(1)).get("token");
const video = document.getElementById("watch-video");
const state = document.getElementById("watch-state");

fetch("/api/status", { headers: authHeaders(token) })
  .then((r) => r.json())
  .then((s) => { if (s.name) document.getElementById("room-name").textContent = s.name; })
  .catch(() => {});

// RTCPeerConnection.connectionState, in words.
const STATES = {
  new: "watch.state.new",
  connecting: "watch.state.connecting",
  connected: "watch.state.connected",
  disconnected: "watch.state.disconnected",
  failed: "watch.state.failed",
  closed: "watch.state.closed",
};

keepWatching("lesson", video, { audio: true, token: token }, (s, detail) => {
  state.dataset.state = s;
  if (s === "error") state.textContent = I18N.t("watch.error", { error: detail });
  else state.textContent = STATES[s] ? I18N.t(STATES[s]) : s;
});

document.getElementById("unmute").addEventListener("click", () => {
  video.muted = !video.muted;
  document.getElementById("unmute").textContent = I18N.t(video.muted ? "watch.sound_on" : "watch.sound_off");
});
