"""A page as a person sees it: headless Chromium (Debian's `chromium`, installed by
`bash .ci/setup`) loads an HTML file from disk, a probe script reports what the browser
made of it (each image decoded or not, where each figure, table and section landed), a
screenshot of the whole page is taken, and the pixels inside each box are checked.

`look_at(page, workdir)` returns a `PageView`; `problems(view)` lists what a reader would
miss: an image that did not decode, a figure or table box with nothing drawn in it.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import image

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
WIDTH = 1280  # a laptop's browser window, CSS pixels (device scale factor 1)
#: Chromium run as root in a container: no sandbox, no GPU, nothing fetched in the background.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--force-device-scale-factor=1", "--virtual-time-budget=15000"]

#: Appended to a copy of the page: once it has loaded, what the browser decoded and laid out
#: goes into a hidden element, which --dump-dom prints. Clicking a sortable table's header
#: shows whether sorting works.
PROBE = """
<script>
window.addEventListener("load", function () {
  function box(element) {
    var r = element.getBoundingClientRect();
    return {x: r.left + window.scrollX, y: r.top + window.scrollY, width: r.width, height: r.height};
  }
  var sorted = [];
  document.querySelectorAll("table.sortable").forEach(function (table) {
    var column = -1, values = [];
    for (var c = 0; c < table.tHead.rows[0].cells.length && column < 0; c++) {
      var cells = Array.from(table.tBodies[0].rows).map(function (row) { return row.cells[c].textContent; });
      if (cells.length > 1 && cells.every(function (t) { return !isNaN(parseFloat(t)); })) column = c;
    }
    if (column >= 0) {
      table.tHead.rows[0].cells[column].click();
      values = Array.from(table.tBodies[0].rows).map(function (row) { return parseFloat(row.cells[column].textContent); });
      table.tHead.rows[0].cells[column].click();  /* and back the other way */
      sorted.push({table: table.dataset.table, column: column, ascending: values,
                   descending: Array.from(table.tBodies[0].rows).map(function (row) {
                     return parseFloat(row.cells[column].textContent); })});
    }
  });
  var probe = {
    height: document.documentElement.scrollHeight,
    images: Array.from(document.images).map(function (img) {
      return {alt: img.alt, complete: img.complete, naturalWidth: img.naturalWidth,
              naturalHeight: img.naturalHeight, box: box(img)};
    }),
    tables: Array.from(document.querySelectorAll("table")).map(function (t) {
      return {name: t.dataset.table || "", rows: t.tBodies[0] ? t.tBodies[0].rows.length : 0, box: box(t)};
    }),
    sections: Object.fromEntries(Array.from(document.querySelectorAll("section[id]")).map(function (s) {
      return [s.id, box(s)]; })),
    sorted: sorted
  };
  var out = document.createElement("pre");
  out.id = "memray-probe";
  out.hidden = true;
  out.textContent = JSON.stringify(probe);
  document.body.appendChild(out);
});
</script>
"""


@dataclass
class PageView:
    """What the browser made of a page: the probe's record and the screenshot's pixels
    (rows x columns x RGB, 0..1), both in CSS pixels of a WIDTH-wide window."""

    probe: dict[str, Any]
    pixels: np.ndarray
    screenshot: Path


def _chromium(args: list[str], profile: Path, timeout: float = 120) -> str:
    if CHROMIUM is None:
        raise AssertionError("no chromium: `bash .ci/setup` installs Debian's package (or deselect -m browser)")
    done = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True, text=True,
                          timeout=timeout)
    if done.returncode != 0:
        raise AssertionError(f"chromium failed ({done.returncode}): {done.stderr[-2000:]}")
    return done.stdout


def look_at(page: Path, workdir: Path) -> PageView:
    """Load `page` in headless Chromium: the probe's record, then a screenshot of the whole
    page (a window as tall as the page), each in a fresh browser profile."""
    workdir.mkdir(parents=True, exist_ok=True)
    probed = workdir / f"probe-{page.name}"
    text = page.read_text()
    probed.write_text(text.replace("</body>", PROBE + "</body>") if "</body>" in text else text + PROBE)
    dom = _chromium([f"--window-size={WIDTH},900", "--dump-dom", probed.resolve().as_uri()], workdir / "profile-probe")
    found = re.search(r'<pre id="memray-probe" hidden="">(.*?)</pre>', dom, re.S)
    if found is None:
        raise AssertionError("the page's load event never came (the probe wrote nothing)")
    probe = json.loads(found.group(1).replace("&lt;", "<").replace("&gt;", ">").replace("&quot;", '"')
                       .replace("&amp;", "&"))
    shot = workdir / f"{page.stem}.png"
    height = int(probe["height"])
    _chromium([f"--window-size={WIDTH},{height}", f"--screenshot={shot}", page.resolve().as_uri()],
              workdir / "profile-shot")
    return PageView(probe, image.imread(shot)[..., :3], shot)


def drawn_share(pixels: np.ndarray, box: dict[str, float]) -> float:
    """The share of a box's pixels that are not the page's white background."""
    top, left = max(0, int(box["y"])), max(0, int(box["x"]))
    crop = pixels[top:int(box["y"] + box["height"]), left:int(box["x"] + box["width"])]
    if crop.size == 0:
        return 0.0
    return float((crop.min(axis=-1) < 0.9).mean())


def problems(view: PageView, min_drawn: float = 0.01) -> list[str]:
    """What a reader of the page would miss: images the browser could not decode or did not
    show, figure and table boxes with (next to) nothing drawn in them, a screenshot shorter
    than the page."""
    found = []
    if view.pixels.shape[0] < view.probe["height"] - 1 or view.pixels.shape[1] < WIDTH - 1:
        found.append(f"screenshot {view.pixels.shape[1]}x{view.pixels.shape[0]} is smaller than the page "
                     f"({WIDTH}x{view.probe['height']})")
    for img in view.probe["images"]:
        if not img["complete"] or img["naturalWidth"] == 0:
            found.append(f"image {img['alt']!r} not decoded (naturalWidth {img['naturalWidth']})")
        elif img["box"]["width"] < 100 or img["box"]["height"] < 100:
            found.append(f"image {img['alt']!r} shown at {img['box']['width']:.0f}x{img['box']['height']:.0f}")
        elif drawn_share(view.pixels, img["box"]) < min_drawn:
            found.append(f"image {img['alt']!r}: nothing drawn in its box of the screenshot")
    for table in view.probe["tables"]:
        if table["rows"] and drawn_share(view.pixels, table["box"]) < min_drawn:
            found.append(f"table {table['name']!r}: nothing drawn in its box of the screenshot")
    return found
