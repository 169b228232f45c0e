// Front-end of s2l_core.widgets.ScribbleWidget (an anywidget ES module).
//
// Four canvases of the image's size are stacked and scaled by CSS: image, prediction,
// uncertainty and scribbles. Strokes are rasterised here with the brush model of
// s2l_core.widgets.rasterize_stroke, with the same floating-point operations: pixel
// (r, c) is painted when its centre (c + 0.5, r + 0.5) lies within brush_size / 2 of a
// segment of the stroke. Pointer events and getCoalescedEvents() give every sampled
// position. Once per stroke (and per undo, redo or clear) the changed rectangle of the
// mask goes to the kernel as bytes; the kernel answers with the whole mask in `_labels`
// and an acknowledgement in `_ack`. A new `_generation` means the kernel replaced the
// image or the scribbles: the view reloads everything and forgets its undo history.

const FOREGROUND = 1;
const BACKGROUND = 0;
const UNLABELLED = 250;
const TOOL_VALUE = { foreground: FOREGROUND, background: BACKGROUND, erase: UNLABELLED };
const ZOOM_STEP = 1.25;
const MAX_ZOOM = 32;
const MAX_HISTORY = 200;
const MAX_DEBUG_POINTS = 5000;

function bytesOf(value) {
  if (!value) return new Uint8Array(0);
  if (value instanceof Uint8Array) return value;
  if (ArrayBuffer.isView(value)) {
    return new Uint8Array(value.buffer, value.byteOffset, value.byteLength);
  }
  if (value instanceof ArrayBuffer) return new Uint8Array(value);
  return new Uint8Array(0);
}

function hexRgb(hex, fallback) {
  const match = /^#?([0-9a-f]{6})$/i.exec(String(hex || ""));
  if (!match) return fallback;
  const v = parseInt(match[1], 16);
  return [(v >> 16) & 255, (v >> 8) & 255, v & 255];
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "text") node.textContent = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
}

function extract(labels, width, x, y, w, h) {
  const out = new Uint8Array(w * h);
  for (let r = 0; r < h; r++) {
    const start = (y + r) * width + x;
    out.set(labels.subarray(start, start + w), r * w);
  }
  return out;
}

function insert(labels, width, patch, x, y, w, h) {
  for (let r = 0; r < h; r++) {
    labels.set(patch.subarray(r * w, (r + 1) * w), (y + r) * width + x);
  }
}

class ScribbleView {
  constructor(model, host) {
    this.model = model;
    this.host = host;
    this.viewId = Math.random().toString(36).slice(2, 10);
    this.seq = 0;
    this.lastSent = 0;
    this.lastAcked = 0;
    this.generation = null;
    this.width = 0;
    this.height = 0;
    this.labels = new Uint8Array(0);
    this.history = [];
    this.future = [];
    this.stroke = null;
    this.panning = null;
    this.zoom = 1;
    this.fitZoom = 1;
    this.panX = 0;
    this.panY = 0;
    this.viewportWidth = 0;
    this.viewportHeight = 0;
    this.ready = false;
    this.tokens = { image: 0, prediction: 0, uncertainty: 0 };
    this.overlayLoaded = { prediction: false, uncertainty: false };
    this.listeners = [];
    this.build();
    const sync = () => this.syncRemote();
    this.listen("change:_generation", sync);
    this.listen("change:_labels", sync);
    this.listen("change:_ack", sync);
    this.listen("change:_prediction_png", () => this.loadOverlay("prediction"));
    this.listen("change:_uncertainty_png", () => this.loadOverlay("uncertainty"));
    this.listen("change:tool", () => this.showTool());
    this.listen("change:brush_size", () => this.showBrush());
    for (const name of [
      "show_prediction",
      "prediction_opacity",
      "show_uncertainty",
      "uncertainty_opacity",
    ]) {
      this.listen(`change:${name}`, () => this.showOverlays());
    }
    this.listen("change:status", () => this.showStatus());
    this.listen("change:_status_error", () => this.showStatus());
    this.listen("change:display_size", () => this.fit());
    this.listen("change:_style", () => this.redrawAll());
    this.reload();
    this.showTool();
    this.showBrush();
    this.showOverlays();
    this.showStatus();
  }

  listen(event, callback) {
    this.model.on(event, callback);
    this.listeners.push([event, callback]);
  }

  destroy() {
    for (const [event, callback] of this.listeners) this.model.off(event, callback);
    this.listeners = [];
  }

  // ------------------------------------------------------------------------ building

  build() {
    // Keys typed into the widget must not trigger notebook shortcuts.
    this.root = el("div", {
      class: "s2l-widget",
      "data-ready": "false",
      "data-lm-suppress-shortcuts": "true",
    });

    const tools = el("div", { class: "s2l-group", role: "group", "aria-label": "tool" });
    this.toolButtons = {};
    for (const [tool, label, title] of [
      ["foreground", "Foreground", "Paint foreground (nuclei)"],
      ["background", "Background", "Paint background"],
      ["erase", "Eraser", "Erase scribbles"],
      ["pan", "Pan", "Drag to move the image (also Shift+drag or the middle button)"],
    ]) {
      const button = el("button", { class: "s2l-btn", type: "button", "data-tool": tool, title });
      if (tool === "foreground" || tool === "background") {
        const swatch = el("span", { class: "s2l-swatch", "data-swatch": tool });
        button.append(swatch);
      }
      button.append(label);
      button.addEventListener("click", () => this.setTool(tool));
      this.toolButtons[tool] = button;
      tools.append(button);
    }

    this.brushRange = el("input", {
      class: "s2l-brush-range",
      type: "range",
      min: "1",
      max: "64",
      step: "1",
      title: "Brush size (diameter in image pixels)",
    });
    this.brushNumber = el("input", {
      class: "s2l-brush-number",
      type: "number",
      min: "1",
      max: "512",
      step: "1",
      title: "Brush size (diameter in image pixels)",
    });
    this.brushRange.addEventListener("input", () => this.setBrush(this.brushRange.value));
    for (const event of ["input", "change"]) {
      this.brushNumber.addEventListener(event, () => {
        if (this.brushNumber.validity.valid && this.brushNumber.value !== "") {
          this.setBrush(this.brushNumber.value);
        }
      });
    }
    this.brushNumber.addEventListener("blur", () => this.showBrush());
    const brush = el(
      "label",
      { class: "s2l-group" },
      "Brush ",
      this.brushRange,
      this.brushNumber,
      " px",
    );

    this.actionButtons = {};
    const action = (name, label, title, callback) => {
      const button = el("button", { class: "s2l-btn", type: "button", "data-action": name, title });
      button.textContent = label;
      button.addEventListener("click", callback);
      this.actionButtons[name] = button;
      return button;
    };
    const edits = el(
      "div",
      { class: "s2l-group" },
      action("undo", "Undo", "Undo the last edit", () => this.undo()),
      action("redo", "Redo", "Redo", () => this.redo()),
      action("clear", "Clear", "Remove every scribble (undoable)", () => this.clear()),
    );
    const zoom = el(
      "div",
      { class: "s2l-group" },
      action("zoom-out", "\u2212", "Zoom out (or the mouse wheel)", () => this.zoomBy(1 / ZOOM_STEP)),
      action("zoom-in", "+", "Zoom in (or the mouse wheel)", () => this.zoomBy(ZOOM_STEP)),
      action("fit", "Fit", "Show the whole image", () => this.fit()),
    );
    const toolbar = el("div", { class: "s2l-toolbar" }, tools, brush, edits, zoom);

    this.overlayControls = {};
    const overlayRow = el("div", { class: "s2l-toolbar s2l-overlays" });
    for (const [name, label] of [
      ["prediction", "Prediction"],
      ["uncertainty", "Uncertainty"],
    ]) {
      const toggle = el("input", { type: "checkbox", "data-overlay": name });
      const opacity = el("input", {
        type: "range",
        min: "0",
        max: "1",
        step: "0.05",
        "data-overlay-opacity": name,
        title: `Opacity of the ${name} overlay`,
      });
      toggle.addEventListener("change", () => {
        this.model.set(`show_${name}`, toggle.checked);
        this.model.save_changes();
      });
      opacity.addEventListener("input", () => {
        this.model.set(`${name}_opacity`, Number(opacity.value));
        this.model.save_changes();
      });
      const swatch = el("span", { class: "s2l-swatch", "data-swatch": name });
      const group = el("label", { class: "s2l-group" }, toggle, swatch, label, " ", opacity);
      this.overlayControls[name] = { toggle, opacity, group };
      overlayRow.append(group);
    }

    this.canvases = {};
    this.stage = el("div", { class: "s2l-stage" });
    for (const name of ["image", "prediction", "uncertainty", "scribbles"]) {
      const canvas = el("canvas", { class: `s2l-${name}` });
      this.canvases[name] = canvas;
      this.stage.append(canvas);
    }
    this.cursor = el("div", { class: "s2l-cursor" });
    this.viewport = el("div", { class: "s2l-viewport" }, this.stage, this.cursor);
    const frame = el("div", { class: "s2l-frame" }, this.viewport);

    this.countsText = el("span", { class: "s2l-counts" });
    this.zoomText = el("span", { class: "s2l-zoom" });
    this.statusText = el("span", { class: "s2l-status" });
    const footer = el("div", { class: "s2l-footer" }, this.countsText, this.zoomText, this.statusText);

    this.root.append(toolbar, overlayRow, frame, footer);
    this.host.append(this.root);

    const vp = this.viewport;
    vp.addEventListener("pointerdown", (e) => this.onPointerDown(e));
    vp.addEventListener("pointermove", (e) => this.onPointerMove(e));
    vp.addEventListener("pointerup", (e) => this.onPointerEnd(e));
    vp.addEventListener("pointercancel", (e) => this.onPointerEnd(e));
    vp.addEventListener("lostpointercapture", (e) => this.onPointerEnd(e));
    vp.addEventListener("pointerleave", () => {
      this.cursor.style.display = "none";
    });
    vp.addEventListener("wheel", (e) => this.onWheel(e), { passive: false });
    vp.addEventListener("contextmenu", (e) => e.preventDefault());
    // No autoscroll on a middle-button drag: that button pans.
    vp.addEventListener("mousedown", (e) => {
      if (e.button === 1) e.preventDefault();
    });
  }

  style() {
    return this.model.get("_style") || {};
  }

  colour(name) {
    const defaults = {
      foreground: [255, 127, 14],
      background: [31, 119, 180],
      prediction: [44, 160, 44],
      uncertainty: [224, 64, 251],
    };
    return hexRgb(this.style()[name], defaults[name]);
  }

  // ---------------------------------------------------------------- state from kernel

  remoteLabels() {
    const bytes = bytesOf(this.model.get("_labels"));
    if (bytes.length === this.width * this.height) return bytes.slice();
    return new Uint8Array(this.width * this.height).fill(UNLABELLED);
  }

  reload() {
    const model = this.model;
    this.generation = model.get("_generation");
    const width = model.get("_width") || 0;
    const height = model.get("_height") || 0;
    const resized = width !== this.width || height !== this.height;
    this.width = width;
    this.height = height;
    this.labels = this.remoteLabels();
    this.history = [];
    this.future = [];
    this.stroke = null;
    this.lastAcked = this.lastSent;
    if (resized) {
      for (const canvas of Object.values(this.canvases)) {
        canvas.width = width;
        canvas.height = height;
      }
      this.fit();
    }
    this.root.dataset.generation = String(this.generation);
    this.redrawAll();
    this.loadImage();
    this.loadOverlay("prediction");
    this.loadOverlay("uncertainty");
    this.updateCounts();
    this.updateButtons();
  }

  syncRemote() {
    const model = this.model;
    if (
      model.get("_generation") !== this.generation ||
      model.get("_width") !== this.width ||
      model.get("_height") !== this.height
    ) {
      this.reload();
      return;
    }
    const ack = String(model.get("_ack") || "");
    const colon = ack.lastIndexOf(":");
    if (colon > 0 && ack.slice(0, colon) === this.viewId) {
      this.lastAcked = Math.max(this.lastAcked, Number(ack.slice(colon + 1)) || 0);
    }
    // While a stroke is drawn or an edit of ours is on its way, the kernel's mask is
    // older than ours; the acknowledgement of our last edit brings us back here.
    if (this.stroke || this.lastAcked < this.lastSent) return;
    const remote = bytesOf(model.get("_labels"));
    if (remote.length !== this.labels.length) return;
    const box = this.diffBox(remote, this.labels);
    if (!box) return;
    insert(this.labels, this.width, extract(remote, this.width, box.x, box.y, box.w, box.h),
      box.x, box.y, box.w, box.h);
    this.drawScribbles(box.x, box.y, box.w, box.h);
    this.updateCounts();
  }

  diffBox(a, b) {
    const width = this.width;
    let x0 = Infinity;
    let y0 = Infinity;
    let x1 = -1;
    let y1 = -1;
    for (let i = 0; i < a.length; i++) {
      if (a[i] !== b[i]) {
        const y = (i / width) | 0;
        const x = i - y * width;
        if (x < x0) x0 = x;
        if (x > x1) x1 = x;
        if (y < y0) y0 = y;
        if (y > y1) y1 = y;
      }
    }
    if (x1 < 0) return null;
    return { x: x0, y: y0, w: x1 - x0 + 1, h: y1 - y0 + 1 };
  }

  async loadImage() {
    const token = ++this.tokens.image;
    this.setReady(false);
    const canvas = this.canvases.image;
    const ctx = canvas.getContext("2d");
    const bytes = bytesOf(this.model.get("_image_png"));
    if (!bytes.length) return;
    try {
      const bitmap = await createImageBitmap(new Blob([bytes], { type: "image/png" }));
      if (token !== this.tokens.image) {
        bitmap.close();
        return;
      }
      ctx.clearRect(0, 0, canvas.width, canvas.height);
      ctx.drawImage(bitmap, 0, 0);
      bitmap.close();
      this.setReady(true);
    } catch (err) {
      this.statusText.textContent = `cannot show the image: ${err}`;
      this.statusText.classList.add("s2l-error");
    }
  }

  setReady(ready) {
    this.ready = ready;
    this.root.dataset.ready = ready ? "true" : "false";
  }

  async loadOverlay(name) {
    const token = ++this.tokens[name];
    const canvas = this.canvases[name];
    const ctx = canvas.getContext("2d");
    const bytes = bytesOf(this.model.get(`_${name}_png`));
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    this.overlayLoaded[name] = false;
    this.showOverlays();
    if (!bytes.length) return;
    try {
      const bitmap = await createImageBitmap(new Blob([bytes], { type: "image/png" }), {
        premultiplyAlpha: "none",
      });
      if (token !== this.tokens[name]) {
        bitmap.close();
        return;
      }
      ctx.clearRect(0, 0, canvas.width, canvas.height);
      ctx.drawImage(bitmap, 0, 0);
      bitmap.close();
      this.overlayLoaded[name] = true;
      this.showOverlays();
    } catch (err) {
      this.statusText.textContent = `cannot show the ${name}: ${err}`;
    }
  }

  // ---------------------------------------------------------------------- drawing

  redrawAll() {
    const swatches = this.root.querySelectorAll("[data-swatch]");
    for (const swatch of swatches) {
      const [r, g, b] = this.colour(swatch.dataset.swatch);
      swatch.style.background = `rgb(${r}, ${g}, ${b})`;
    }
    const opacity = Number(this.style().scribble_opacity);
    this.canvases.scribbles.style.opacity = String(Number.isFinite(opacity) ? opacity : 0.85);
    const chunk = Math.max(1, Math.floor(4194304 / Math.max(1, this.width)));
    for (let y = 0; y < this.height; y += chunk) {
      this.drawScribbles(0, y, this.width, Math.min(chunk, this.height - y));
    }
  }

  drawScribbles(x, y, w, h) {
    if (w <= 0 || h <= 0) return;
    const ctx = this.canvases.scribbles.getContext("2d");
    const image = ctx.createImageData(w, h);
    const data = image.data;
    const fg = this.colour("foreground");
    const bg = this.colour("background");
    const labels = this.labels;
    const width = this.width;
    for (let r = 0; r < h; r++) {
      let src = (y + r) * width + x;
      let dst = r * w * 4;
      for (let c = 0; c < w; c++, src++, dst += 4) {
        const value = labels[src];
        const colour = value === FOREGROUND ? fg : value === BACKGROUND ? bg : null;
        if (colour) {
          data[dst] = colour[0];
          data[dst + 1] = colour[1];
          data[dst + 2] = colour[2];
          data[dst + 3] = 255;
        }
      }
    }
    ctx.putImageData(image, x, y);
  }

  // The brush: identical arithmetic to s2l_core.widgets.rasterize_stroke.
  paintSegment(a, b) {
    const s = this.stroke;
    const radius = s.radius;
    const r2 = radius * radius;
    const width = this.width;
    const x0 = a[0];
    const y0 = a[1];
    const x1 = b[0];
    const y1 = b[1];
    const c0 = Math.max(0, Math.floor(Math.min(x0, x1) - radius - 0.5));
    const c1 = Math.min(width - 1, Math.ceil(Math.max(x0, x1) + radius - 0.5));
    const r0 = Math.max(0, Math.floor(Math.min(y0, y1) - radius - 0.5));
    const r1 = Math.min(this.height - 1, Math.ceil(Math.max(y0, y1) + radius - 0.5));
    if (c0 > c1 || r0 > r1) return;
    const dx = x1 - x0;
    const dy = y1 - y0;
    const length2 = dx * dx + dy * dy;
    const labels = this.labels;
    const value = s.value;
    for (let r = r0; r <= r1; r++) {
      const cy = r + 0.5;
      for (let c = c0; c <= c1; c++) {
        const cx = c + 0.5;
        let t = 0;
        if (length2 !== 0) {
          t = ((cx - x0) * dx + (cy - y0) * dy) / length2;
          if (t < 0) t = 0;
          else if (t > 1) t = 1;
        }
        const ex = cx - (x0 + t * dx);
        const ey = cy - (y0 + t * dy);
        if (ex * ex + ey * ey <= r2) labels[r * width + c] = value;
      }
    }
    const box = s.dirty;
    box.x0 = Math.min(box.x0, c0);
    box.y0 = Math.min(box.y0, r0);
    box.x1 = Math.max(box.x1, c1);
    box.y1 = Math.max(box.y1, r1);
  }

  flushStroke() {
    const s = this.stroke;
    const box = s.dirty;
    if (box.x1 < 0) return;
    this.drawScribbles(box.x0, box.y0, box.x1 - box.x0 + 1, box.y1 - box.y0 + 1);
    s.box.x0 = Math.min(s.box.x0, box.x0);
    s.box.y0 = Math.min(s.box.y0, box.y0);
    s.box.x1 = Math.max(s.box.x1, box.x1);
    s.box.y1 = Math.max(s.box.y1, box.y1);
    s.dirty = { x0: Infinity, y0: Infinity, x1: -1, y1: -1 };
  }

  toImage(event, rect) {
    return [
      ((event.clientX - rect.left) * this.width) / rect.width,
      ((event.clientY - rect.top) * this.height) / rect.height,
    ];
  }

  addPoint(point) {
    const s = this.stroke;
    this.paintSegment(s.last, point);
    s.last = point;
    if (s.points.length < MAX_DEBUG_POINTS) s.points.push(point);
  }

  startStroke(event) {
    const rect = this.canvases.scribbles.getBoundingClientRect();
    const point = this.toImage(event, rect);
    this.stroke = {
      id: event.pointerId,
      value: TOOL_VALUE[this.model.get("tool")],
      radius: this.brushSize() / 2,
      last: point,
      points: [point],
      before: this.labels.slice(),
      dirty: { x0: Infinity, y0: Infinity, x1: -1, y1: -1 },
      box: { x0: Infinity, y0: Infinity, x1: -1, y1: -1 },
    };
    this.paintSegment(point, point);
    this.flushStroke();
  }

  endStroke() {
    const s = this.stroke;
    this.stroke = null;
    this.root.dataset.lastStroke = JSON.stringify({
      value: s.value,
      radius: s.radius,
      points: s.points,
    });
    if (s.box.x1 < 0) {
      this.syncRemote();
      return;
    }
    const x = s.box.x0;
    const y = s.box.y0;
    const w = s.box.x1 - x + 1;
    const h = s.box.y1 - y + 1;
    const before = extract(s.before, this.width, x, y, w, h);
    const after = extract(this.labels, this.width, x, y, w, h);
    if (!this.record(x, y, w, h, before, after)) this.syncRemote();
  }

  // Push an edit on the undo stack (shrunk to the pixels that changed) and send it.
  record(x, y, w, h, before, after) {
    let x0 = Infinity;
    let y0 = Infinity;
    let x1 = -1;
    let y1 = -1;
    for (let r = 0; r < h; r++) {
      for (let c = 0; c < w; c++) {
        if (before[r * w + c] !== after[r * w + c]) {
          if (c < x0) x0 = c;
          if (c > x1) x1 = c;
          if (r < y0) y0 = r;
          if (r > y1) y1 = r;
        }
      }
    }
    if (x1 < 0) return false;
    const nw = x1 - x0 + 1;
    const nh = y1 - y0 + 1;
    const entry = {
      x: x + x0,
      y: y + y0,
      w: nw,
      h: nh,
      before: extract(before, w, x0, y0, nw, nh),
      after: extract(after, w, x0, y0, nw, nh),
    };
    this.history.push(entry);
    if (this.history.length > MAX_HISTORY) this.history.shift();
    this.future = [];
    this.send(entry.x, entry.y, entry.w, entry.h);
    return true;
  }

  send(x, y, w, h) {
    const patch = extract(this.labels, this.width, x, y, w, h);
    this.seq += 1;
    this.lastSent = this.seq;
    const content = {
      kind: "edit",
      view: this.viewId,
      seq: this.seq,
      generation: this.generation,
      x,
      y,
      width: w,
      height: h,
    };
    try {
      this.model.send(content, undefined, [patch.buffer]);
    } catch (err) {
      // No kernel (a static page): the drawing stays in the page.
      this.lastAcked = this.lastSent;
    }
    this.updateCounts();
    this.updateButtons();
  }

  apply(entry, patch) {
    insert(this.labels, this.width, patch, entry.x, entry.y, entry.w, entry.h);
    this.drawScribbles(entry.x, entry.y, entry.w, entry.h);
    this.send(entry.x, entry.y, entry.w, entry.h);
  }

  undo() {
    if (this.stroke || !this.history.length) return;
    const entry = this.history.pop();
    this.future.push(entry);
    this.apply(entry, entry.before);
  }

  redo() {
    if (this.stroke || !this.future.length) return;
    const entry = this.future.pop();
    this.history.push(entry);
    this.apply(entry, entry.after);
  }

  clear() {
    if (this.stroke) return;
    const before = this.labels.slice();
    const after = new Uint8Array(this.labels.length).fill(UNLABELLED);
    this.labels.set(after);
    this.redrawAll();
    if (!this.record(0, 0, this.width, this.height, before, after)) this.updateButtons();
  }

  // ---------------------------------------------------------------------- pointer

  onPointerDown(event) {
    if (this.stroke || this.panning) return;
    const tool = this.model.get("tool");
    const pan = tool === "pan" || event.button === 1 || (event.button === 0 && event.shiftKey);
    if (pan) {
      event.preventDefault();
      this.capture(event);
      this.panning = {
        id: event.pointerId,
        x: event.clientX,
        y: event.clientY,
        panX: this.panX,
        panY: this.panY,
      };
      this.viewport.classList.add("s2l-panning");
      return;
    }
    if (event.button !== 0 || !this.ready || !(tool in TOOL_VALUE)) return;
    event.preventDefault();
    this.capture(event);
    this.startStroke(event);
  }

  capture(event) {
    try {
      this.viewport.setPointerCapture(event.pointerId);
    } catch (err) {
      // Synthetic events cannot be captured; drawing still works inside the viewport.
    }
  }

  onPointerMove(event) {
    this.moveCursor(event);
    if (this.panning && event.pointerId === this.panning.id) {
      this.panX = this.panning.panX + event.clientX - this.panning.x;
      this.panY = this.panning.panY + event.clientY - this.panning.y;
      this.layout();
      return;
    }
    if (!this.stroke || event.pointerId !== this.stroke.id) return;
    const rect = this.canvases.scribbles.getBoundingClientRect();
    const coalesced = event.getCoalescedEvents ? event.getCoalescedEvents() : [];
    for (const sample of coalesced.length ? coalesced : [event]) {
      this.addPoint(this.toImage(sample, rect));
    }
    this.flushStroke();
  }

  onPointerEnd(event) {
    if (this.panning && event.pointerId === this.panning.id) {
      this.panning = null;
      this.viewport.classList.remove("s2l-panning");
      return;
    }
    if (!this.stroke || event.pointerId !== this.stroke.id) return;
    if (event.type === "pointerup") {
      const rect = this.canvases.scribbles.getBoundingClientRect();
      this.addPoint(this.toImage(event, rect));
      this.flushStroke();
    }
    this.endStroke();
  }

  moveCursor(event) {
    const tool = this.model.get("tool");
    if (!(tool in TOOL_VALUE) || this.panning) {
      this.cursor.style.display = "none";
      return;
    }
    const vp = this.viewport.getBoundingClientRect();
    const size = this.brushSize() * this.zoom;
    this.cursor.style.display = "block";
    this.cursor.style.width = `${size}px`;
    this.cursor.style.height = `${size}px`;
    this.cursor.style.left = `${event.clientX - vp.left - size / 2}px`;
    this.cursor.style.top = `${event.clientY - vp.top - size / 2}px`;
  }

  onWheel(event) {
    event.preventDefault();
    const scale = event.deltaMode === 1 ? 33 : event.deltaMode === 2 ? 400 : 1;
    const factor = Math.exp(-event.deltaY * scale * 0.002);
    const vp = this.viewport.getBoundingClientRect();
    this.zoomAt(this.zoom * factor, event.clientX - vp.left, event.clientY - vp.top);
  }

  // ------------------------------------------------------------------- zoom and pan

  fit() {
    if (!this.width || !this.height) return;
    const size = Math.max(64, Number(this.model.get("display_size")) || 600);
    let zoom = Math.min(size / this.width, size / this.height);
    if (zoom >= 1) zoom = Math.min(MAX_ZOOM, Math.floor(zoom));
    this.fitZoom = zoom;
    this.zoom = zoom;
    this.viewportWidth = Math.max(1, Math.round(this.width * zoom));
    this.viewportHeight = Math.max(1, Math.round(this.height * zoom));
    this.viewport.style.width = `${this.viewportWidth}px`;
    this.viewport.style.height = `${this.viewportHeight}px`;
    this.panX = 0;
    this.panY = 0;
    this.layout();
  }

  zoomBy(factor) {
    this.zoomAt(this.zoom * factor, this.viewportWidth / 2, this.viewportHeight / 2);
  }

  zoomAt(zoom, cx, cy) {
    const clamped = Math.min(MAX_ZOOM, Math.max(this.fitZoom / 4, zoom));
    const ix = (cx - this.panX) / this.zoom;
    const iy = (cy - this.panY) / this.zoom;
    this.zoom = clamped;
    this.panX = cx - ix * clamped;
    this.panY = cy - iy * clamped;
    this.layout();
  }

  layout() {
    const w = this.width * this.zoom;
    const h = this.height * this.zoom;
    const clamp = (pan, size, view) =>
      size <= view ? (view - size) / 2 : Math.min(0, Math.max(view - size, pan));
    this.panX = clamp(this.panX, w, this.viewportWidth);
    this.panY = clamp(this.panY, h, this.viewportHeight);
    const rendering = this.zoom >= 1 ? "pixelated" : "auto";
    for (const canvas of Object.values(this.canvases)) {
      canvas.style.width = `${w}px`;
      canvas.style.height = `${h}px`;
      canvas.style.imageRendering = rendering;
    }
    this.stage.style.transform = `translate(${this.panX}px, ${this.panY}px)`;
    this.zoomText.textContent = `zoom ${Math.round(this.zoom * 100)} %`;
  }

  // ---------------------------------------------------------------------- controls

  brushSize() {
    const size = Number(this.model.get("brush_size"));
    return Number.isFinite(size) && size >= 1 ? size : 1;
  }

  setTool(tool) {
    this.model.set("tool", tool);
    this.model.save_changes();
    this.showTool();
  }

  setBrush(value) {
    const size = Math.round(Number(value));
    if (!Number.isFinite(size) || size < 1 || size > 512) {
      this.showBrush();
      return;
    }
    this.model.set("brush_size", size);
    this.model.save_changes();
    this.showBrush(true);
  }

  showTool() {
    const tool = this.model.get("tool");
    for (const [name, button] of Object.entries(this.toolButtons)) {
      button.classList.toggle("s2l-active", name === tool);
      button.setAttribute("aria-pressed", name === tool ? "true" : "false");
    }
    this.viewport.classList.toggle("s2l-pan", tool === "pan");
    this.root.dataset.tool = tool;
  }

  showBrush(typing = false) {
    const size = String(this.brushSize());
    this.brushRange.value = size;
    if (!typing || document.activeElement !== this.brushNumber) this.brushNumber.value = size;
    this.root.dataset.brush = size;
  }

  showOverlays() {
    for (const name of ["prediction", "uncertainty"]) {
      const { toggle, opacity, group } = this.overlayControls[name];
      const shown = Boolean(this.model.get(`show_${name}`));
      const value = Number(this.model.get(`${name}_opacity`));
      const present = bytesOf(this.model.get(`_${name}_png`)).length > 0;
      toggle.checked = shown;
      toggle.disabled = !present;
      opacity.disabled = !present;
      opacity.value = String(value);
      group.classList.toggle("s2l-disabled", !present);
      const canvas = this.canvases[name];
      canvas.style.opacity = String(value);
      canvas.style.visibility = shown && present ? "visible" : "hidden";
    }
  }

  showStatus() {
    this.statusText.textContent = this.model.get("status") || "";
    this.statusText.classList.toggle("s2l-error", Boolean(this.model.get("_status_error")));
  }

  updateCounts() {
    let fg = 0;
    let bg = 0;
    const labels = this.labels;
    for (let i = 0; i < labels.length; i++) {
      if (labels[i] === FOREGROUND) fg++;
      else if (labels[i] === BACKGROUND) bg++;
    }
    this.countsText.textContent = `foreground ${fg} px \u00b7 background ${bg} px`;
    this.countsText.dataset.foreground = String(fg);
    this.countsText.dataset.background = String(bg);
    this.updateButtons();
  }

  updateButtons() {
    this.actionButtons.undo.disabled = this.history.length === 0;
    this.actionButtons.redo.disabled = this.future.length === 0;
  }
}

function render({ model, el: host }) {
  const view = new ScribbleView(model, host);
  return () => view.destroy();
}

export default { render };
