// Audio worklets: "capture" posts the microphone as 16-bit PCM blocks of `blockFrames` samples;
// "player" plays queued reply samples and drops them all on a "clear" message (barge-in).
class Capture extends AudioWorkletProcessor {
  constructor(options) {
    super();
    this.block = new Int16Array(options.processorOptions.blockFrames);
    this.fill = 0;
  }
  process(inputs) {
    const channel = inputs[0] && inputs[0][0];
    if (channel) {
      for (let i = 0; i < channel.length; i++) {
        const s = Math.max(-1, Math.min(1, channel[i]));
        this.block[this.fill++] = s < 0 ? s * 32768 : s * 32767;
        if (this.fill === this.block.length) {
          this.port.postMessage(this.block.slice(0));
          this.fill = 0;
        }
      }
    }
    return true;
  }
}

class Player extends AudioWorkletProcessor {
  constructor() {
    super();
    this.queue = [];
    this.offset = 0;
    this.port.onmessage = (e) => {
      if (e.data.type === "clear") { this.queue = []; this.offset = 0; }
      else this.queue.push(e.data.samples);
    };
  }
  process(inputs, outputs) {
    const out = outputs[0][0];
    let i = 0;
    while (i < out.length && this.queue.length) {
      const head = this.queue[0];
      const n = Math.min(out.length - i, head.length - this.offset);
      out.set(head.subarray(this.offset, this.offset + n), i);
      i += n;
      this.offset += n;
      if (this.offset === head.length) { this.queue.shift(); this.offset = 0; }
    }
    out.fill(0, i);
    return true;
  }
}

registerProcessor("capture", Capture);
registerProcessor("player", Player);
