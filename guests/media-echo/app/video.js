// The `just video` demo page: logs in through the app gateway as the
// development user named in the URL fragment
// (`#domain=video.example&user=alice@video.example`), finds the domain's
// `echo` hyperty (guests/media-echo), calls it over WebRTC (signalling: the
// offer in an `execute` request, the answer in its response) with the
// camera and microphone, and shows the video the hyperty sends back. Every
// second it shows what `getStats()` says of the inbound video and tells the
// hyperty (`{"op": "stats", "frames-decoded", "state"}`).

import { connect } from "/.hyperty/client.js";

const $ = (id) => /** @type {HTMLElement} */ (document.getElementById(id));
const status = (text) => ($("status").textContent = text);

async function main() {
  const params = new URLSearchParams(location.hash.slice(1));
  const domain = params.get("domain") || "video.example";
  const user = params.get("user") || `alice@${domain}`;
  status(`logging in as ${user}…`);
  const client = await connect(undefined, { domain, user });
  const [echo] = await client.discover({ domain, name: "echo" });
  if (!echo) throw new Error(`no echo hyperty in ${domain}`);

  const stream = await navigator.mediaDevices.getUserMedia({ audio: true, video: { width: 320, height: 240 } });
  /** @type {HTMLVideoElement} */ ($("local")).srcObject = stream;
  const pc = new RTCPeerConnection();
  for (const track of stream.getTracks()) pc.addTrack(track, stream);
  pc.ontrack = (e) => {
    /** @type {HTMLVideoElement} */ ($("remote")).srcObject = e.streams[0] ?? new MediaStream([e.track]);
  };
  await pc.setLocalDescription(await pc.createOffer());
  // Candidates ride in the SDP: wait until they are gathered.
  await new Promise((done) => {
    if (pc.iceGatheringState === "complete") return done(undefined);
    pc.onicegatheringstatechange = () => pc.iceGatheringState === "complete" && done(undefined);
  });
  status(`calling ${echo.address}…`);
  const answer = await client.request({ type: "execute", to: echo.address, body: { value: { op: "call", sdp: pc.localDescription?.sdp } } });
  await pc.setRemoteDescription({ type: "answer", sdp: answer.body?.value?.sdp });
  pc.onconnectionstatechange = () => status(`call ${pc.connectionState}`);

  setInterval(async () => {
    let frames = 0;
    (await pc.getStats()).forEach((r) => {
      if (r.type === "inbound-rtp" && r.kind === "video") frames = r.framesDecoded ?? 0;
    });
    $("stats").textContent = `remote video: ${frames} frames decoded`;
    client.send({ type: "execute", to: echo.address, body: { value: { op: "stats", "frames-decoded": frames, state: pc.connectionState } } });
  }, 1000);
}

main().catch((e) => status(`failed: ${e?.description ?? e}`));
