"""The report of a real MNIST run, written by ``cnnkit report`` and opened in headless Chromium.

The seed's conv net (20C5-MP2-50C5-MP2-FC256) trains for one epoch on the bundled MNIST sample.
The page is loaded once, with a probe script added: it collects script errors, failed resources
and console errors, then checks that every <img> decoded and drew more than a blank background;
its findings are read back with --dump-dom, and a full-page screenshot is kept under
$CNNKIT_TEST_ARTIFACTS (or the test's tmp_path). Chromium comes from Debian's ``chromium``
package (the README's test command and .ci/run install it); without it the test fails, naming the
package, rather than passing unchecked.
"""

import html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import cnnkit
from cnnkit.cli import main

SEED_NET = "20C5-MP2-50C5-MP2-FC256"
PARTS = ["summary", "metrics", "confusion-matrix", "training", "mistakes", "kernels", "feature-maps", "grad-cam",
         "layers", "configuration"]

# Added to a copy of the page: the first script records every error, the last one checks the images on load.
PROBE_HEAD = """<script>window.__problems = [];
window.addEventListener('error', function (e) {
  var t = e.target;
  window.__problems.push(t && t.tagName ? 'failed to load ' + t.tagName + ' ' + String(t.src || t.href).slice(0, 60)
                                        : 'error: ' + e.message);
}, true);
window.addEventListener('unhandledrejection', function (e) { window.__problems.push('rejection: ' + e.reason); });
['error', 'warn'].forEach(function (level) {
  var original = console[level];
  console[level] = function () {
    window.__problems.push('console.' + level + ': ' + Array.from(arguments).join(' '));
    original.apply(console, arguments);
  };
});
</script>"""
PROBE_TAIL = """<script>window.addEventListener('load', function () {
  var images = Array.from(document.images).map(function (img) {
    var seen = {alt: img.alt, width: img.naturalWidth, height: img.naturalHeight,
                shown: img.getBoundingClientRect().width, ink: 0};
    if (img.naturalWidth > 0) {
      var canvas = document.createElement('canvas');
      canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
      var context = canvas.getContext('2d');
      context.drawImage(img, 0, 0);
      var d = context.getImageData(0, 0, canvas.width, canvas.height).data, differ = 0;
      for (var i = 0; i < d.length; i += 4) {  // pixels unlike the top-left (background) colour
        if (Math.abs(d[i] - d[0]) + Math.abs(d[i + 1] - d[1]) + Math.abs(d[i + 2] - d[2]) > 30) differ++;
      }
      seen.ink = differ / (d.length / 4);
    }
    return seen;
  });
  var out = document.createElement('pre');
  out.id = 'cnnkit-probe';
  out.hidden = true;
  out.textContent = JSON.stringify({images: images, problems: window.__problems,
                                    height: Math.ceil(document.body.getBoundingClientRect().bottom) + 24});
  document.body.appendChild(out);
});</script>"""


@pytest.fixture(scope="module")
def chromium():
    """The browser's path (asked for before the report, so that a missing browser costs no training)."""
    found = next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome")
                  if shutil.which(name)), None)
    if found is None:
        pytest.fail("Chromium is not installed: the README's test command and .ci/run install Debian's "
                    "chromium package (apt-get install chromium)")
    return found


def _run_chromium(binary, *arguments):
    command = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
               "--enable-logging=stderr", "--v=0", *arguments]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """report.html of the seed's net after one epoch on the MNIST sample, written by `cnnkit report`."""
    run_dir = tmp_path_factory.mktemp("mnist") / "run"
    run = cnnkit.recipes.train(SEED_NET, "mnist-sample", epochs=1, run_dir=run_dir, verbose=0)
    assert main(["report", str(run_dir)]) == 0
    return run, run_dir / "report.html"


def test_the_report_shows_every_part(report):
    run, path = report
    page = path.read_text(encoding="utf-8")
    assert re.findall(r'<h2 id="([^"]+)">', page) == PARTS
    assert "Could not draw" not in page and "No test images" not in page
    assert f"{run.metrics['test_accuracy']:.2%}" in page
    assert page.count('<img src="data:image/png;base64,') == page.count("<img ") == 6
    for alt in ("confusion matrix", "training curves", "most confidently wrong test images", "first-layer kernels",
                "feature maps", "Grad-CAM overlays"):
        assert f'alt="{alt}"' in page
    assert "Only 1 epoch" in page  # the diagnosis
    assert "conv1" in page and "20C5p0" in page and "233,196" in page  # the planner's table
    for name, row in run.metrics["per_class"].items():
        assert f"<td class=l>{name}</td><td>{row['precision']:.4f}</td>" in page


def test_the_report_renders_in_chromium(chromium, report, tmp_path):
    _, path = report
    page = path.read_text(encoding="utf-8")
    probe = path.with_name("probe.html")
    probe.write_text(page.replace("<head>", "<head>" + PROBE_HEAD, 1).replace("</body>", PROBE_TAIL + "</body>", 1),
                     encoding="utf-8")
    artifacts = Path(os.environ.get("CNNKIT_TEST_ARTIFACTS") or tmp_path)
    artifacts.mkdir(parents=True, exist_ok=True)
    screenshot = artifacts / "mnist_report.png"
    window = (1200, 8000)  # taller than the page: the screenshot is cropped to the page's height below
    loaded = _run_chromium(chromium, f"--window-size={window[0]},{window[1]}", "--virtual-time-budget=10000",
                           "--dump-dom", f"--screenshot={screenshot}", probe.as_uri())
    found = re.search(r'<pre id="cnnkit-probe"[^>]*>(.*?)</pre>', loaded.stdout, re.S)
    assert found, f"the probe did not run; chromium said: {loaded.stderr[-2000:]}"
    result = json.loads(html.unescape(found.group(1)))
    console = [line for line in loaded.stderr.splitlines() if ":CONSOLE" in line]
    assert result["problems"] == [] and console == []
    assert len(result["images"]) == 6
    for image in result["images"]:
        assert image["width"] > 100 and image["height"] > 100 and image["shown"] > 100, image
        assert image["ink"] > 0.02, image  # more than a blank background with a title

    assert screenshot.is_file(), loaded.stderr[-2000:]
    assert result["height"] <= window[1], "the page is taller than the screenshot window"
    with Image.open(screenshot) as image:
        image.load()
    image.crop((0, 0, window[0], result["height"])).save(screenshot)
    pixels = np.asarray(image.convert("L"), dtype=np.float64)[:result["height"]]
    assert pixels.std() > 20 and (pixels < 128).mean() > 0.02  # text, tables and figures, not a blank page
