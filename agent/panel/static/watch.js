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

keepWatching("lesson", video, { audio: true, token: token }, (s) => { state.textContent = s; });

document.getElementById("unmute").addEventListener("click", () => {
  video.muted = !video.muted;
  document.getElementById("unmute").textContent = video.muted ? "Sound on" : "Sound off";
});
