// Speed and ETA for one upload, each an exponential moving average with a ~2 s half-life.
//
// Why smoothed: progress arrives in bursts (the browser hands the body to the socket as the server
// reads it), so the rate between two events jumps around; an unsmoothed ETA is the anchors'
// most-reported complaint. A half-life in time (not in samples) keeps the smoothing the same whether
// events come 100 times a second or once.

export const HALF_LIFE_MS = 2000;
// Shorter intervals carry more timer noise than signal: wait until at least this much time has passed.
const MIN_SAMPLE_MS = 200;

export class Meter {
  constructor(halfLifeMs = HALF_LIFE_MS) {
    this.halfLifeMs = halfLifeMs;
    this.reset();
  }

  /** Forget the past (a new request: its first progress event is not a measure of the rate). */
  reset() {
    this.lastBytes = null;
    this.lastTime = null;
    this.speed = null; // bytes per second
    this.eta = null; // seconds
  }

  /** Record that `bytes` of `total` are done at `now` (ms); returns {speed, eta} (null until known). */
  update(bytes, total, now = performance.now()) {
    if (this.lastTime === null) {
      this.lastBytes = bytes;
      this.lastTime = now;
      return this.reading();
    }
    const elapsed = now - this.lastTime;
    if (elapsed < MIN_SAMPLE_MS) return this.reading();
    const rate = (Math.max(0, bytes - this.lastBytes) * 1000) / elapsed;
    const weight = 1 - 0.5 ** (elapsed / this.halfLifeMs);
    this.speed = this.speed === null ? rate : this.speed + weight * (rate - this.speed);
    if (this.speed > 0) {
      const remaining = (total - bytes) / this.speed;
      this.eta = this.eta === null ? remaining : this.eta + weight * (remaining - this.eta);
    }
    this.lastBytes = bytes;
    this.lastTime = now;
    return this.reading();
  }

  reading() {
    return { speed: this.speed, eta: this.eta };
  }
}

const UNITS = ["bytes", "KiB", "MiB", "GiB", "TiB"];

export function formatBytes(bytes) {
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < UNITS.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return unit === 0 ? `${value} bytes` : `${value.toFixed(value < 10 ? 1 : 0)} ${UNITS[unit]}`;
}

export function formatDuration(seconds) {
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
}

/** Whole percent, never 100 before the last byte. */
export function percent(done, total) {
  if (total <= 0) return 0;
  return done >= total ? 100 : Math.min(99, Math.floor((done * 100) / total));
}
