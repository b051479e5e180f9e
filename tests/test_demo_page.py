"""The demo page, `python -m nxtp_minimal demo`, started as a user starts it on a free loopback port: its
`/predict` API against `predict --json` and `model.predict`, bad input, and the page in headless Chromium.

`NXTP_DEMO_SCREENSHOT=lessons/images/demo_page.png python -m pytest tests/test_demo_page.py -k chromium`
also saves the screenshot the README shows.
"""

import base64
import html
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import time
import urllib.request
import zlib

import pytest
from conftest import FIXTURES, REPO

import nxtp_minimal
from nxtp_minimal import inference, load_demo
from nxtp_minimal.sampling import branch_labels
from nxtp_minimal.tools.demo import step_view

pytest.importorskip("gradio", reason="the demo extra is not installed (pip install -e .[demo])")
client_lib = pytest.importorskip("gradio_client", reason="pip install -r requirements-dev.txt")

SCENES = sorted((REPO / "lessons" / "images").glob("scene_*.png"))
K = 5
LOOPBACK = "127.0.0.1,localhost"  # a proxy set for CI's package downloads must not carry loopback requests
CHROMIUM_FLAGS = [  # headless, as root, and nothing fetched but the page
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1100,1000",
]


@pytest.fixture(scope="module")
def demo():
    return load_demo()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The URL of `python -m nxtp_minimal demo` serving the demo model; stopped after this module."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tmp = tmp_path_factory.mktemp("demo_page")
    log = open(tmp / "server.log", "w+")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("NO_PROXY", LOOPBACK)
        env.setenv("no_proxy", LOOPBACK)
        env.setenv("GRADIO_TEMP_DIR", str(tmp / "uploads"))
        proc = subprocess.Popen([sys.executable, "-m", "nxtp_minimal", "demo", "--port", str(port)], cwd=REPO,
                                stdout=log, stderr=subprocess.STDOUT)
        url, deadline = f"http://127.0.0.1:{port}/", time.monotonic() + 180
        try:
            while True:
                try:
                    urllib.request.urlopen(url, timeout=5)
                    break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        log.seek(0)
                        pytest.fail(f"the demo did not start at {url}:\n{log.read()}")
                    time.sleep(0.5)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()


@pytest.fixture(scope="module")
def client(server):
    import huggingface_hub.constants

    with pytest.MonkeyPatch.context() as offline:  # else its user-agent header asks huggingface.co for a list
        offline.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        return client_lib.Client(server, verbose=False, analytics_enabled=False)  # and no telemetry either


def ask(client, path, k):
    return client.predict(client_lib.handle_file(str(path)), k, api_name="/predict")


def test_api_gives_the_predict_json_list(client, demo):
    # one image per call, as the page computes it: a batch of images may round the last bits differently
    command = ["predict", *map(str, SCENES), "--top-k", str(K), "--json", "--batch-size", "1"]
    out = subprocess.run([sys.executable, "-m", "nxtp_minimal", *command], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    cli = json.loads(out.stdout)
    assert len(SCENES) == len(cli) == 4
    for scene, from_cli in zip(SCENES, cli):
        answer = ask(client, scene, K)
        assert answer == from_cli["labels"], scene.name  # same keys, same floats, no rounding
        expected = demo.predict(scene, k=K)[0]
        assert [a["label"] for a in answer] == [label for label, _ in expected], scene.name
        assert [a["prob"] for a in answer] == pytest.approx([p for _, p in expected], abs=1e-6), scene.name


def png_bomb(path, side=20000):
    """A valid 1-bit PNG of side x side black pixels: about 50 kB on disk, side**2 pixels once decoded."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    z = zlib.compressobj(9)
    row = bytes(1 + side // 8)  # filter byte, then 8 pixels a byte
    idat = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def test_bad_input_gets_a_message_and_the_server_goes_on(client, demo, tmp_path):
    notes = tmp_path / "notes.png"
    notes.write_text("hello")
    bomb = tmp_path / "bomb.png"
    png_bomb(bomb)
    assert bomb.stat().st_size < 100_000
    for path, k, message in [
        (notes, K, "cannot read notes.png as an image"),
        (bomb, K, "bomb.png is 20000 x 20000 = 400000000 pixels, more than the limit of"),
        (SCENES[0], 0, "top-k must be a whole number between 1 and 50, got 0"),
        (SCENES[0], 51, "top-k must be a whole number between 1 and 50, got 51"),
    ]:
        with pytest.raises(client_lib.exceptions.AppError, match=message):
            ask(client, path, k)
        answer = ask(client, SCENES[1], 3)  # the next request is answered
        assert [a["label"] for a in answer] == [label for label, _ in demo.predict(SCENES[1], k=3)[0]]


def test_step_view_shows_each_branch_as_the_sampler_grew_it(llama_tokenizer):
    """Each row holds its branch's tokens up to the delimiter that stopped it (at the second token or later,
    sampling.one_shot), marked, then nothing; label and score are the ranking's (sampling.branch_labels)."""
    model = nxtp_minimal.load(FIXTURES / "tiny_nxtp.safetensors", tokenizer=llama_tokenizer.path)
    tokens, probs, _ = inference.sample(model, inference.pixels(model, FIXTURES / "tiny_nxtp_image0.png"), 50)
    tok, (tokens, probs) = model.tokenizer, (tokens[0], probs[0])
    rows = re.findall(r"<tr><td>\d+</td>(.*?)</tr>", step_view(tok, tokens, probs))
    assert len(rows) == 50
    branches = branch_labels(tokens, probs, tok.delimiter_id)
    for row, ids, (label_ids, score) in zip(rows, tokens.tolist(), branches):
        cells = re.findall(r"<td([^>]*)>(.*?)</td>", row)
        stop = next(t for t in range(1, len(ids)) if ids[t] == tok.delimiter_id)  # every branch ended here
        shown = [re.sub(r"&#10003; |<small>.*", "", text) for _, text in cells[: len(ids)]]
        assert shown == [html.escape(tok.decode([i])) for i in ids[: stop + 1]] + [""] * (len(ids) - stop - 1)
        assert [attrs for attrs, _ in cells[: len(ids)]].index(' class="end"') == stop
        label, p = cells[len(ids)][1], cells[len(ids) + 1][1]
        assert label.startswith(f"<b>{tok.decode(label_ids).replace(',', '')}</b>") and p == f"{score:.4f}"
    assert any(ids[0] == tok.delimiter_id for ids in tokens.tolist())  # a branch the ranking cuts short is here


@pytest.fixture(scope="module")
def chromium():
    """Paths of Debian's Chromium and its driver, or a skip saying what is missing (before the server starts)."""
    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if browser is None or driver is None:
        pytest.skip("no Chromium here: apt-get install chromium chromium-driver (.ci/run does)")
    return browser, driver


def open_page(chromium, profile):
    """A headless Chromium with a fresh profile, driven by Selenium."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="pip install -r requirements-dev.txt")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium[0]
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(chromium[1]), options=options)


def save_whole_page(page, path):
    """A PNG of the whole page, below the window's bottom too (Chrome DevTools Protocol)."""
    time.sleep(1)  # the overlays' images finish drawing
    size = page.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    clip = {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
    shot = page.execute_cdp_cmd("Page.captureScreenshot", {"captureBeyondViewport": True, "clip": clip})  # PNG
    with open(path, "wb") as f:
        f.write(base64.b64decode(shot["data"]))


def test_page_in_chromium(chromium, server, demo, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    page = open_page(chromium, tmp_path / "profile")
    try:
        page.get(server)
        wait = WebDriverWait(page, 60)
        upload = wait.until(lambda p: p.find_element(By.CSS_SELECTOR, "#image input[type=file]"))
        k = int(page.find_element(By.CSS_SELECTOR, "#top_k input[type=number]").get_attribute("value"))
        scene = SCENES[2]
        expected = [label for label, _ in demo.predict(scene, k=k)[0]]
        upload.send_keys(str(scene))
        top = wait.until(lambda p: p.find_element(By.CSS_SELECTOR, "#labels [data-testid=label-output-value]"))
        wait.until(lambda p: top.text == expected[0])
        assert [e.text for e in page.find_elements(By.CSS_SELECTOR, "#labels dt")] == expected
        rows = page.find_elements(By.CSS_SELECTOR, "#steps tr")[1:]
        assert len(rows) == k and expected[0] in rows[0].text  # the step view's first branch wrote the top label
        wait.until(lambda p: len(p.find_elements(By.CSS_SELECTOR, "#overlays img")) == k)
        captions = [e.text.split()[:-1] for e in page.find_elements(By.CSS_SELECTOR, "#overlays .caption-label")]
        assert [" ".join(c) for c in captions] == expected
        assert re.match(r"\d+\.\d{3} s for this image on cpu", page.find_element(By.ID, "status").text)  # timed
        fetched = page.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        assert [u for u in fetched if not u.startswith((server, "data:", "blob:"))] == []  # nothing from the internet
        if os.environ.get("NXTP_DEMO_SCREENSHOT"):
            save_whole_page(page, os.environ["NXTP_DEMO_SCREENSHOT"])
    finally:
        page.quit()
