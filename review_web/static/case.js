// Case page viewer: the source's full-resolution modality values (pixels.raw, little-endian uint16, described by
// pixels.json) windowed here on a canvas, so any window shows what the bits hold; zoom and pan down to native
// pixels; the explanation overlay with an opacity; click to mark the nodule; keyboard shortcuts.
// Mouse: drag = window/level, right-drag or shift-drag = pan, wheel = zoom, click = mark.
// Keys: N nodule present, C clear (no nodule) record the verdict; R reset window, F fit, 1 native pixels (1:1),
// + / - zoom, O overlay on/off, I invert.
(function () {
  "use strict";
  const stage = document.getElementById("stage");
  const canvas = document.getElementById("view");
  const ctx = canvas.getContext("2d");
  const overlayImage = document.getElementById("overlay-image");
  const status = document.getElementById("viewer-status");
  const centreInput = document.getElementById("wl-centre"), widthInput = document.getElementById("wl-width");
  const overlayOn = document.getElementById("overlay-on"), opacityInput = document.getElementById("overlay-opacity");
  const invertInput = document.getElementById("invert");
  const form = document.getElementById("verdict");
  const base = stage.dataset.base;
  const view = {centre: 0, width: 1, invert: false, scale: 1, tx: 0, ty: 0, mark: null};
  let meta = null, raw = null, lut = null, image = null, imageData = null, defaultWindow = null, maxRaw = 0;

  function setStatus(text) { status.textContent = text; }

  async function load() {
    setStatus("Loading the full-resolution image…");
    const metaResponse = await fetch(base + "/pixels.json", {credentials: "same-origin"});
    if (!metaResponse.ok) throw new Error("pixels.json: HTTP " + metaResponse.status);
    meta = await metaResponse.json();
    const pixelResponse = await fetch(base + "/pixels.raw", {credentials: "same-origin"});
    if (!pixelResponse.ok) throw new Error("pixels.raw: HTTP " + pixelResponse.status);
    const buffer = await pixelResponse.arrayBuffer();
    if (buffer.byteLength !== meta.rows * meta.cols * 2) throw new Error("pixels.raw has the wrong length");
    raw = new Uint16Array(buffer);  // little-endian, as every browser platform is
    for (let i = 0; i < raw.length; i++) if (raw[i] > maxRaw) maxRaw = raw[i];
    lut = new Uint32Array(maxRaw + 1);
    image = document.createElement("canvas");
    image.width = meta.cols; image.height = meta.rows;
    imageData = image.getContext("2d").createImageData(meta.cols, meta.rows);
    defaultWindow = meta.dicom_window || meta.presets.auto;
    document.querySelector("[data-preset=dicom]").disabled = !meta.dicom_window;
    view.invert = meta.invert;
    invertInput.checked = meta.invert;
    resize();
    fit();
    setWindow(defaultWindow[0], defaultWindow[1]);
    stage.dataset.ready = "1";
  }

  // DICOM LINEAR window (PS3.3 C.11.2.1.2.1) over modality values, then the display polarity.
  function window8bit() {
    const c = view.centre - 0.5, w = Math.max(view.width - 1, 1e-6);
    const data32 = new Uint32Array(imageData.data.buffer);
    for (let k = 0; k <= maxRaw; k++) {
      let y = ((k * meta.slope + meta.offset - c) / w + 0.5);
      y = y <= 0 ? 0 : y >= 1 ? 1 : y;
      if (view.invert) y = 1 - y;
      const g = Math.round(y * 255);
      lut[k] = 0xff000000 | (g << 16) | (g << 8) | g;
    }
    for (let i = 0; i < raw.length; i++) data32[i] = lut[raw[i]];
    image.getContext("2d").putImageData(imageData, 0, 0);
  }

  function setWindow(centre, width) {
    view.centre = Number(centre);
    view.width = Math.max(Number(width), 1);
    centreInput.value = Math.round(view.centre * 100) / 100;
    widthInput.value = Math.round(view.width * 100) / 100;
    window8bit();
    draw();
  }

  function resize() {
    const ratio = window.devicePixelRatio || 1;
    canvas.width = Math.floor(stage.clientWidth * ratio);
    canvas.height = Math.floor(stage.clientHeight * ratio);
    canvas.style.width = canvas.width / ratio + "px";  // whole device pixels: 1:1 is exact, never resampled
    canvas.style.height = canvas.height / ratio + "px";
  }

  function draw() {
    if (!image) return;
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.fillStyle = "#000";
    ctx.fillRect(0, 0, canvas.width, canvas.height);
    ctx.setTransform(view.scale, 0, 0, view.scale, view.tx, view.ty);
    ctx.imageSmoothingEnabled = view.scale < 1;  // magnified: every source pixel a sharp square
    ctx.drawImage(image, 0, 0);
    if (overlayOn.checked && overlayImage.complete && overlayImage.naturalWidth) {
      ctx.imageSmoothingEnabled = true;
      ctx.globalAlpha = opacityInput.value / 100;
      ctx.drawImage(overlayImage, 0, 0, meta.cols, meta.rows);
      ctx.globalAlpha = 1;
    }
    if (view.mark) {
      ctx.beginPath();
      ctx.arc(view.mark.col + 0.5, view.mark.row + 0.5, 12 / view.scale, 0, 2 * Math.PI);
      ctx.lineWidth = 2 / view.scale;
      ctx.strokeStyle = "#facc15";
      ctx.stroke();
    }
    const zoom = Math.round(view.scale / meta.reduction * 100);  // of the source's resolution
    setStatus(meta.source_cols + " × " + meta.source_rows + ", " + meta.bits_stored + "-bit" +
              (meta.reduction > 1 ? " (shown reduced 1:" + meta.reduction + ", over the size limit)" : "") +
              " · W " + Math.round(view.width) + " L " + Math.round(view.centre) + " · zoom " + zoom + " %");
  }

  // Zoom to `scale` keeping the image point under canvas point (x, y) where it is.
  function zoomAt(scale, x, y) {
    const col = (x - view.tx) / view.scale, row = (y - view.ty) / view.scale;
    view.scale = Math.min(Math.max(scale, 0.02), 32);
    view.tx = Math.round(x - col * view.scale);  // whole pixels: at 1:1 each source pixel is one screen pixel
    view.ty = Math.round(y - row * view.scale);
    draw();
  }
  function zoomCentre(scale) { zoomAt(scale, canvas.width / 2, canvas.height / 2); }
  function fit() {
    view.scale = Math.min(canvas.width / meta.cols, canvas.height / meta.rows);
    view.tx = (canvas.width - meta.cols * view.scale) / 2;
    view.ty = (canvas.height - meta.rows * view.scale) / 2;
    draw();
  }
  function native() { zoomCentre(1); }  // one image pixel per screen pixel

  function canvasPoint(event) {
    const box = canvas.getBoundingClientRect(), ratio = canvas.width / box.width;
    return {x: (event.clientX - box.left) * ratio, y: (event.clientY - box.top) * ratio};
  }

  function mark(point) {
    const col = Math.floor((point.x - view.tx) / view.scale), row = Math.floor((point.y - view.ty) / view.scale);
    if (row < 0 || col < 0 || row >= meta.rows || col >= meta.cols) return;
    view.mark = {row: row, col: col};
    const sourceRow = row * meta.reduction, sourceCol = col * meta.reduction;
    document.getElementById("row").value = sourceRow;
    document.getElementById("col").value = sourceCol;
    document.getElementById("location").textContent = "Location: row " + sourceRow + ", column " + sourceCol + ".";
    draw();
  }

  // While dragging, one window per animation frame: the pointer moves faster than a large image re-windows.
  let pendingWindow = null;
  function flushWindow() {
    if (pendingWindow) { const next = pendingWindow; pendingWindow = null; setWindow(next[0], next[1]); }
  }
  function scheduleWindow(centre, width) {
    if (!pendingWindow) requestAnimationFrame(flushWindow);
    pendingWindow = [centre, width];
  }

  let drag = null;
  canvas.addEventListener("contextmenu", function (event) { event.preventDefault(); });
  canvas.addEventListener("pointerdown", function (event) {
    if (!image) return;
    canvas.setPointerCapture(event.pointerId);
    const point = canvasPoint(event);
    drag = {start: point, last: point, moved: false, pan: event.button !== 0 || event.shiftKey,
            centre: view.centre, width: view.width};
  });
  canvas.addEventListener("pointermove", function (event) {
    if (!drag) return;
    const point = canvasPoint(event);
    const dx = point.x - drag.start.x, dy = point.y - drag.start.y;
    if (Math.abs(dx) + Math.abs(dy) > 4) drag.moved = true;
    if (!drag.moved) return;
    if (drag.pan) {
      view.tx += point.x - drag.last.x;
      view.ty += point.y - drag.last.y;
      draw();
    } else {  // right: wider, down: brighter (lower level), about one value range per canvas width
      const step = (maxRaw * meta.slope) / canvas.width;
      scheduleWindow(drag.centre - dy * step * (view.invert ? -1 : 1), drag.width + dx * step);
    }
    drag.last = point;
  });
  canvas.addEventListener("pointerup", function (event) {
    flushWindow();
    if (drag && !drag.moved && !drag.pan) mark(canvasPoint(event));
    drag = null;
  });
  canvas.addEventListener("wheel", function (event) {
    if (!image) return;
    event.preventDefault();
    const point = canvasPoint(event);
    zoomAt(view.scale * Math.pow(1.15, -Math.sign(event.deltaY)), point.x, point.y);
  }, {passive: false});

  document.querySelectorAll("[data-preset]").forEach(function (button) {
    button.addEventListener("click", function () {
      const name = button.dataset.preset;
      const preset = name === "dicom" ? meta.dicom_window : name === "default" ? defaultWindow : meta.presets[name];
      if (preset) setWindow(preset[0], preset[1]);
    });
  });
  centreInput.addEventListener("change", function () { setWindow(centreInput.value, view.width); });
  widthInput.addEventListener("change", function () { setWindow(view.centre, widthInput.value); });
  invertInput.addEventListener("change", function () { view.invert = invertInput.checked; setWindow(view.centre, view.width); });
  overlayOn.addEventListener("change", draw);
  opacityInput.addEventListener("input", draw);
  overlayImage.addEventListener("load", draw);
  overlayImage.addEventListener("error", function () { overlayOn.checked = false; overlayOn.disabled = true; opacityInput.disabled = true; });
  document.getElementById("fit").addEventListener("click", fit);
  document.getElementById("native").addEventListener("click", native);
  document.getElementById("zoom-in").addEventListener("click", function () { zoomCentre(view.scale * 1.5); });
  document.getElementById("zoom-out").addEventListener("click", function () { zoomCentre(view.scale / 1.5); });
  window.addEventListener("resize", function () { if (image) { resize(); draw(); } });

  function record(value) {
    if (!form) return;
    form.querySelector("input[name=nodule][value=" + value + "]").checked = true;
    form.requestSubmit();
  }
  const keys = {
    n: function () { record("present"); }, c: function () { record("absent"); },
    r: function () { setWindow(defaultWindow[0], defaultWindow[1]); }, f: fit, "1": native,
    "+": function () { zoomCentre(view.scale * 1.5); }, "=": function () { zoomCentre(view.scale * 1.5); },
    "-": function () { zoomCentre(view.scale / 1.5); },
    o: function () { if (!overlayOn.disabled) { overlayOn.checked = !overlayOn.checked; draw(); } },
    i: function () { invertInput.checked = !invertInput.checked; invertInput.dispatchEvent(new Event("change")); },
  };
  document.addEventListener("keydown", function (event) {
    const target = event.target;
    const typing = target.tagName === "TEXTAREA" || target.tagName === "SELECT" ||
                   (target.tagName === "INPUT" && !["checkbox", "radio", "range", "button"].includes(target.type));
    if (typing || event.ctrlKey || event.metaKey || event.altKey || !image) return;
    const action = keys[event.key.toLowerCase()];
    if (action) { event.preventDefault(); action(); }
  });

  load().catch(function (error) { setStatus("The image could not be shown: " + error.message); });
})();
