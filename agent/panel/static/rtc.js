"use strict";
// One way to watch a picture of this agent: offer, POST /api/view, answer.
// The agent never trickles, so the offer waits (briefly) for its candidates.

function authHeaders(token) {
  const headers = { "Content-Type": "application/json" };
  if (token) headers.Authorization = "Bearer " + token;
  return headers;
}

function gathered(pc, limitMs) {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => { pc.removeEventListener("icegatheringstatechange", check); resolve(); };
    const check = () => { if (pc.iceGatheringState === "complete") done(); };
    pc.addEventListener("icegatheringstatechange", check);
    setTimeout(done, limitMs);
  });
}

async function watchPicture(source, video, options) {
  const opts = options || {};
  const pc = new RTCPeerConnection({ iceServers: [] });
  pc.addTransceiver("video", { direction: "recvonly" });
  if (opts.audio) pc.addTransceiver("audio", { direction: "recvonly" });
  const stream = new MediaStream();
  pc.addEventListener("track", (event) => {
    stream.addTrack(event.track);
    video.srcObject = stream;
  });
  await pc.setLocalDescription(await pc.createOffer());
  await gathered(pc, 1500);
  const response = await fetch("/api/view", {
    method: "POST",
    headers: authHeaders(opts.token),
    body: JSON.stringify({ source: source, sdp: pc.localDescription.sdp }),
  });
  const answer = await response.json();
  if (!response.ok || !answer.ok) {
    pc.close();
    throw new Error(answer.error || ("HTTP " + response.status));
  }
  await pc.setRemoteDescription({ type: "answer", sdp: answer.sdp });
  return pc;
}

// A picture that reconnects by itself when its connection fails (agent restarted).
function keepWatching(source, video, options, onState) {
  let pc = null;
  let stopped = false;
  let timer = null;
  const report = (state, detail) => { if (onState) onState(state, detail); };
  async function connect() {
    if (stopped) return;
    try {
      pc = await watchPicture(source, video, options);
      pc.addEventListener("connectionstatechange", () => {
        report(pc.connectionState);
        if (["failed", "closed"].includes(pc.connectionState)) retry();
      });
    } catch (error) {
      report("error", error.message);
      retry();
    }
  }
  function retry() {
    if (stopped || timer) return;
    if (pc) { pc.close(); pc = null; }
    timer = setTimeout(() => { timer = null; connect(); }, 2000);
  }
  connect();
  return { stop() { stopped = true; if (timer) clearTimeout(timer); if (pc) pc.close(); } };
}
