// Case page: window/level on the radiograph, Grad-CAM overlay toggle, click to mark the location.
(function () {
  const base = document.getElementById("base");
  const overlay = document.getElementById("overlay");
  const stage = document.getElementById("stage");
  const marker = document.getElementById("marker");
  const windowInput = document.getElementById("window");
  const levelInput = document.getElementById("level");
  const heatmap = document.getElementById("heatmap");
  const rows = Number(stage.dataset.rows), cols = Number(stage.dataset.cols);

  function applyWindowLevel() {
    base.style.filter = "brightness(" + levelInput.value / 100 + ") contrast(" + windowInput.value / 100 + ")";
  }
  windowInput.addEventListener("input", applyWindowLevel);
  levelInput.addEventListener("input", applyWindowLevel);
  document.getElementById("reset").addEventListener("click", function () {
    windowInput.value = 100; levelInput.value = 100; applyWindowLevel();
  });
  heatmap.addEventListener("change", function () { overlay.hidden = !heatmap.checked; });
  overlay.addEventListener("error", function () { heatmap.checked = false; heatmap.disabled = true; overlay.hidden = true; });

  stage.addEventListener("click", function (event) {
    if (!rows || !cols) return;
    const box = base.getBoundingClientRect();
    const x = event.clientX - box.left, y = event.clientY - box.top;
    const row = Math.round(y / box.height * rows), col = Math.round(x / box.width * cols);
    if (row < 0 || col < 0 || row >= rows || col >= cols) return;
    document.getElementById("row").value = row;
    document.getElementById("col").value = col;
    marker.style.left = x + "px";
    marker.style.top = y + "px";
    marker.hidden = false;
    document.getElementById("location").textContent = "Location: row " + row + ", column " + col + ".";
  });
})();
