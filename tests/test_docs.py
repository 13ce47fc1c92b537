"""Issue 14.6: the documentation site (`make docs`), checked in a real headless browser.

The test builds the site as `make docs` does (docs/build.py), with two differences that keep it within
CI's time: the analysis notebooks 21-24 run on the smoke pipeline's runs (runs/smoke: CI has no demo
runs; the test makes them when absent), and of the other notebooks only the index is executed (every
notebook is executed the same way, execnb with nbdev_test's flags, by `nbdev_test` in the same suite;
the pages of the others show their code, with a note that this build did not execute them). Then
Debian's Chromium, driven over the DevTools protocol on a pipe, loads every page from a local HTTP
server and checks: each page loads (status 200, no failed resource, no script error), every link
inside the site resolves (page and anchor), every image is displayed, the figures of both papers
appear on the pages of 21-24 as PNG files, the tables of 21-23 are rendered, the index links every
notebook and API page, and a screenshot of the Figure 1 section of 21 is a non-blank PNG (kept in
_proc/docs-test/ to look at).
"""
import base64
import functools
import http.server
import io
import json
import os
import re
import select
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from commands import smoke_runs_lock

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("PICOMAML_CHROMIUM", "/usr/bin/chromium")
WORK = ROOT / "_proc" / "docs-test"
SMOKE = ROOT / "runs" / "smoke"
# every figure of both papers, by the notebook that draws it (paper 2 Fig. 8 is hand-written)
FIGURES = {"21_paper1_pretraining": [f"p1_fig{i}_" for i in (1, 3, 4, 5, 6)],
           "22_paper1_ner": ["p1_fig2_"],
           "23_paper2_ner": [f"p2_fig{i}_" for i in (1, 2, 3, 4, 5, 6, 7, 9)],
           "24_paper2_indicators": [f"p2_fig{i}_" for i in range(10, 16)]}
TABLES = {"21_paper1_pretraining": "Table 2", "22_paper1_ner": "Table 3", "23_paper2_ner": "Table 2"}

pytestmark = pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK),
                                reason=f"needs headless Chromium at {CHROMIUM} "
                                       "(Debian: apt-get install chromium; CI's .ci/run installs it)")


def shared_data() -> str | None:
    beside = ROOT.parent / "shared" / "data"
    return os.environ.get("PICOMAML_DATA") or (str(beside) if beside.is_dir() else None)


def run(cmd, timeout):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **({"PICOMAML_DATA": shared_data()} if shared_data() else {})}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def site() -> Path:
    with smoke_runs_lock(): return build_site()


def build_site() -> Path:
    if not ((SMOKE / "demo-maml" / "metrics.jsonl").is_file() and (SMOKE / "demo-vanilla" / "metrics.jsonl").is_file()
            and list((SMOKE / "ner").glob("*-results.jsonl"))):
        if shared_data() is None:
            pytest.skip("needs the smoke runs, made from ../shared/data or PICOMAML_DATA")
        run([sys.executable, "-m", "picomaml.pipeline", "smoke", "--stages", "data", "pretrain", "ner"], timeout=900)
    out = WORK / "site"
    log = run([sys.executable, "docs/build.py", "--profile", "smoke", "--execute", "index",
               "--out", str(out), "--work", str(WORK / "work")], timeout=1200)
    assert "rendered" in log, log
    return out


# ---- a minimal DevTools-protocol client over --remote-debugging-pipe (fds 3 and 4) ----------------

class Chromium:
    def __init__(self, width=1280, height=1000):
        self.profile = tempfile.mkdtemp(prefix="picomaml-chromium-")
        to_chrome_r, self.to_chrome = os.pipe()
        self.from_chrome, from_chrome_w = os.pipe()

        def child_fds():  # the browser reads commands on fd 3 and answers on fd 4
            a, b = os.dup(to_chrome_r), os.dup(from_chrome_w)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
             "--remote-debugging-pipe", f"--user-data-dir={self.profile}", f"--window-size={width},{height}",
             "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=child_fds, close_fds=False)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self.next_id, self.buffer, self.events = 0, b"", []
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page.enable", "Runtime.enable"):
            self.call(domain, session=True)
        self.call("Emulation.setDeviceMetricsOverride", session=True, width=width, height=height,
                  deviceScaleFactor=1, mobile=False)

    def _read(self, deadline):
        while b"\0" not in self.buffer:
            left = deadline - time.monotonic()
            assert left > 0, "Chromium did not answer in time"
            if select.select([self.from_chrome], [], [], left)[0]:
                chunk = os.read(self.from_chrome, 1 << 20)
                assert chunk, "Chromium closed its DevTools pipe"
                self.buffer += chunk
        message, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(message)

    def call(self, method, session=False, timeout=60, **params):
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        os.write(self.to_chrome, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self.next_id:
                assert "error" not in reply, f"{method}: {reply['error']}"
                return reply["result"]
            self.events.append(reply)

    def wait_event(self, name, timeout=60):
        deadline = time.monotonic() + timeout
        while True:
            for i, event in enumerate(self.events):
                if event.get("method") == name:
                    return self.events.pop(i)
            self.events.append(self._read(deadline))

    def load(self, url):
        self.events.clear()
        self.call("Page.navigate", session=True, url=url)
        self.wait_event("Page.loadEventFired")
        errors = [e["params"]["exceptionDetails"] for e in self.events if e.get("method") == "Runtime.exceptionThrown"]
        return errors

    def evaluate(self, expression):
        result = self.call("Runtime.evaluate", session=True, expression=expression, returnByValue=True,
                           awaitPromise=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"]["value"]

    def screenshot(self) -> bytes:
        return base64.b64decode(self.call("Page.captureScreenshot", session=True, format="png")["data"])

    def close(self):
        try:
            self.call("Browser.close", timeout=10)
        except (AssertionError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self.to_chrome)
        os.close(self.from_chrome)
        shutil.rmtree(self.profile, ignore_errors=True)


PAGE_FACTS = """(async () => {
  const images = [...document.images];
  for (const img of images) {
    img.loading = "eager";
    if (!img.complete) await new Promise(done => { img.onload = img.onerror = done; setTimeout(done, 10000); });
  }
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) await MathJax.startup.promise;
  const nav = performance.getEntriesByType("navigation")[0];
  return {
    status: nav ? nav.responseStatus : null,
    title: document.title,
    text: document.body.innerText,
    images: images.map(i => ({alt: i.alt, src: i.currentSrc || i.src, shown: i.complete && i.naturalWidth > 0})),
    links: [...document.querySelectorAll("a[href]")].map(a => a.href),
    tables: document.querySelectorAll("article table").length,
    math: document.querySelectorAll("span.math, div.math").length,
    rawMath: [...document.querySelectorAll("span.math, div.math")].filter(e => !e.querySelector("mjx-container"))
      .map(e => e.textContent.slice(0, 40)),
    failed: performance.getEntriesByType("resource").filter(r => r.responseStatus >= 400).map(r => r.name),
  };
})()"""


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def serve(directory: Path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(QuietHandler, directory=str(directory)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/"


def site_file(site: Path, base: str, url: str) -> Path | None:
    "The file a same-site URL names (None for another site)."
    if not url.startswith(base):
        return None
    path = unquote(urlsplit(url).path)
    path = path + "index.html" if path.endswith("/") else path
    return site / path.lstrip("/")


def test_make_docs_site_in_headless_chromium(site):
    pages = sorted(p.relative_to(site).as_posix() for p in site.rglob("*.html"))
    notebooks = sorted(p.stem for p in (ROOT / "nbs").glob("*.ipynb"))
    modules = sorted(p.stem for p in (ROOT / "picomaml").glob("*.py") if not p.stem.startswith("_"))
    assert {f"{nb}.html" for nb in notebooks} | {f"api/{m}.html" for m in modules} <= set(pages)
    ids = {}  # page -> the ids its HTML defines (anchors)

    def anchors(path: Path) -> set:
        if path not in ids:
            ids[path] = set(re.findall(r'\bid="([^"]+)"', path.read_text(encoding="utf-8")))
        return ids[path]

    server, base = serve(site)
    browser = Chromium()
    problems, facts, started = [], {}, time.perf_counter()
    try:
        for page in pages:
            errors = browser.load(base + page)
            f = facts[page] = browser.evaluate(PAGE_FACTS)
            if f["status"] != 200:
                problems.append(f"{page}: HTTP status {f['status']}")
            problems += [f"{page}: script error {e.get('exception', {}).get('description', e.get('text'))}"
                         for e in errors]
            problems += [f"{page}: could not load {name}" for name in f["failed"]]
            problems += [f"{page}: image not displayed: {img['src']}" for img in f["images"] if not img["shown"]]
            problems += [f"{page}: math not rendered (MathJax did not load?): {m}" for m in f["rawMath"][:3]]
            for link in f["links"]:
                target = site_file(site, base, link)
                if target is None:
                    continue
                if not target.is_file():
                    problems.append(f"{page}: broken link {link}")
                elif ((fragment := urlsplit(link).fragment) and target.suffix == ".html"
                      and unquote(fragment) not in anchors(target)):
                    problems.append(f"{page}: link to a missing anchor {link}")
            if page.endswith(".html") and not page.startswith(("_modules/", "genindex", "search", "py-modindex")):
                if len(f["text"]) < 200:
                    problems.append(f"{page}: almost empty ({len(f['text'])} characters)")
        # the screenshot: 21's Figure 1 section
        browser.load(base + "21_paper1_pretraining.html")
        browser.evaluate("document.querySelector('img[alt^=\"p1_fig1_\"]').scrollIntoView({block: 'center'})")
        time.sleep(0.5)
        shot = browser.screenshot()
    finally:
        browser.close()
        server.shutdown()
    seconds = time.perf_counter() - started
    assert not problems, f"{len(problems)} problems in {len(pages)} pages:\n" + "\n".join(problems[:40])

    # the index: nbs/index's prose, and the navigation reaches every notebook and every API page
    index = facts["index.html"]
    assert "picomaml" in index["title"] and "Two commands" in index["text"] and "make docs" in index["text"]
    linked = {site_file(site, base, link) for link in index["links"]} - {None}
    assert ({site / f"{nb}.html" for nb in notebooks if nb != "index"}
            | {site / "api" / f"{m}.html" for m in modules} <= linked)
    # the API pages come from the docstrings
    assert "load_config" in facts["api/config.html"]["text"] and "run_name" in facts["api/names.html"]["text"]
    # the analysis notebooks: every figure displayed, as a PNG file of the site; their tables rendered
    for nb, prefixes in FIGURES.items():
        f = facts[f"{nb}.html"]
        assert "Executed by `make docs`" in f["text"] or "Executed by make docs" in f["text"], \
            f"{nb}: no note on which runs"
        for prefix in prefixes:
            shown = [img for img in f["images"] if img["alt"].startswith(prefix)]
            assert shown, f"{nb}: no figure {prefix}* on the page"
            png = site_file(site, base, shown[0]["src"])
            data = png.read_bytes()
            assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, f"{png} is not a plausible PNG"
    for nb, caption in TABLES.items():
        f = facts[f"{nb}.html"]
        assert f["tables"] >= 1 and caption in f["text"], f"{nb}: no rendered table ({caption})"
    # the math of the method's notebooks is typeset by the site's own MathJax (no CDN: the page was read offline)
    assert facts["05_maml.html"]["math"] > 0 and not facts["05_maml.html"]["rawMath"]
    # the analysis pages' parameters name the run outputs relative to the notebooks, not the build machine's paths
    assert all(str(ROOT) not in facts[f"{nb}.html"]["text"] for nb in FIGURES), \
        "an absolute path of the build machine on a page"
    # a page that was not executed says so
    assert "did not execute this notebook" in facts["01_model.html"]["text"]

    # the screenshot is a real picture: a PNG of the viewport, not blank
    from PIL import Image
    WORK.mkdir(parents=True, exist_ok=True)
    (WORK / "screenshot-21.png").write_bytes(shot)
    image = Image.open(io.BytesIO(shot)).convert("RGB")
    assert image.size == (1280, 1000) and len(shot) > 20_000
    colours = image.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 100, "the screenshot is (nearly) blank"
    print(f"{len(pages)} pages checked in Chromium in {seconds:.0f} s; screenshot {WORK / 'screenshot-21.png'}")
