// The JavaScript benchmark sink, the counterpart of the Rust `bench` guest
// with `{"role": "sink"}`: answers `read` requests 200 and counts
// everything else.

import { hyperty, reply } from "../sdk/hyperty.js";

let received = 0;

export const handler = hyperty({
  handle(msg) {
    received += 1;
    if (msg.type === "read") reply(msg, 200);
  },
});
