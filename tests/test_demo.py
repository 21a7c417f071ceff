"""The web demo: its requests against the library, its command line, and the page itself driven in
headless Chromium (Debian's ``chromium`` + ``chromium-driver``, which .ci/run installs).

One tiny pipeline serves every test: the in-process engine offers it as a one-step model and as a
2-step CFG model (one Pipeline, so both share compiled programs), and the browser test starts
``instaflow-demo`` on the same folder in a subprocess.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from PIL import Image

import instaflow_jax
from instaflow_jax.cli import demo as demo_cli
from instaflow_jax.demo import DemoEngine, DemoInputError, DemoModel, build_demo, load_engine
from instaflow_jax.demo.app import _model_updates, frame_strip
from instaflow_jax.demo.engine import parse_size
from instaflow_jax.image_io import to_uint8

SIZE = 64  # the tiny UNet's native size: sample_size 8 × the VAE's 8
CHROME_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,1000",
)


@pytest.fixture(scope="module")
def pipe(tiny_pipeline_dir):
    return instaflow_jax.load_pipeline(tiny_pipeline_dir)


@pytest.fixture(scope="module")
def engine(pipe, tmp_path_factory) -> DemoEngine:
    models = [DemoModel("instaflow", pipe, (1,)), DemoModel("2-rf", pipe, (2,), 1.5)]
    return DemoEngine(models, max_images=2, out_dir=str(tmp_path_factory.mktemp("demo_out")))


def reference(pipe, prompt: str, seed: int, **kwargs) -> np.ndarray:
    """What the library itself gives for one prompt: float32 [H, W, 3]."""
    return pipe.generate([prompt], seed=seed, height=SIZE, width=SIZE, **kwargs)[0]


# --- the engine ---------------------------------------------------------------------------------


def test_start_up_compiles_every_request_the_page_offers(engine):
    plan = {(j.model, j.batch, j.height, j.width, j.steps, j.guidance > 1) for j in engine.compile_plan()}
    expected = {("instaflow", b, SIZE, SIZE, 1, False) for b in (1, 2)}
    expected |= {("2-rf", b, SIZE, SIZE, 2, cfg) for b in (1, 2) for cfg in (False, True)}
    assert plan == expected and len(engine.compile_plan()) == len(expected)
    assert engine.sizes == [(SIZE, SIZE)]  # the model's native size by default


@pytest.mark.parametrize(
    "request_kwargs, message",
    [
        ({"prompt": "   "}, "prompt is empty"),
        ({"seed": -1}, "seed must be a whole number"),
        ({"seed": 1.5}, "seed must be a whole number"),
        ({"seed": None}, "seed must be a whole number"),
        ({"seed": 2**31}, "seed must be a whole number from 0 to 2147483647"),
        ({"num_images": 3}, "Number of images must be 1 to 2"),
        ({"steps": 4}, r"4 steps were not compiled for instaflow; choose one of \[1\]"),
        ({"size": "128x128"}, r"Size 128x128 was not compiled; choose one of \['64x64'\]"),
        ({"size": "65x64"}, "multiples of 8"),
        ({"name": "sdxl"}, "Model 'sdxl' is not loaded"),
        ({"steps": "many"}, "Steps and images are whole numbers"),
    ],
)
def test_bad_requests_become_messages(engine, request_kwargs, message):
    kwargs = {"name": "instaflow", "prompt": "a cat", **request_kwargs}
    with pytest.raises(DemoInputError, match=message):
        engine.generate(**kwargs)


def test_generate_equals_the_library_and_says_when_it_compiled(engine, pipe):
    images, first_text = engine.generate("instaflow", "a red circle", seed=5, num_images=2)
    expected = pipe.generate(["a red circle"] * 2, seed=5, height=SIZE, width=SIZE)
    np.testing.assert_array_equal(images, expected)
    assert np.abs(images[0] - images[1]).max() > 0.05  # sample i has the noise of (seed, i)
    assert re.search(r"included [\d.]+ s of compilation", first_text)  # nothing was warmed up here
    again, text = engine.generate("instaflow", "a red circle", seed=5, num_images=2, guidance=7.0)
    np.testing.assert_array_equal(again, expected)  # a model without guidance ignores it
    assert re.match(r"\*\*[\d.]+ ms per image\*\* · 2 images at 64×64, 1 step, ", text)
    assert text.endswith("no compilation (compiled at start-up)")


def test_side_by_side_runs_both_models_on_the_same_noise(engine, pipe):
    (left, left_text), (right, right_text) = engine.compare(
        "a cat", 3, steps=2, guidance=1.5, negative_prompt="dog"
    )
    np.testing.assert_array_equal(left, reference(pipe, "a cat", 3))
    cfg = dict(num_steps=2, guidance_scale=1.5, negative_prompt="dog")
    np.testing.assert_array_equal(right, reference(pipe, "a cat", 3, **cfg))
    assert "1 step," in left_text and "2 steps," in right_text
    with pytest.raises(DemoInputError, match="needs two models"):
        DemoEngine([engine.models["instaflow"]]).compare("a cat")


def test_interpolation_walks_from_seed_a_to_seed_b(engine, pipe):
    walk, gif, text = engine.interpolate("instaflow", "a cat", seed_a=3, seed_b=7, frames=3)
    assert walk.shape == (3, SIZE, SIZE, 3)  # in chunks of 2 then 1, both compiled batch sizes
    np.testing.assert_allclose(walk[0], reference(pipe, "a cat", 3), atol=1e-5)
    np.testing.assert_allclose(walk[-1], reference(pipe, "a cat", 7), atol=1e-5)
    assert min(np.abs(walk[1] - walk[0]).max(), np.abs(walk[1] - walk[2]).max()) > 0.02
    with Image.open(gif) as animation:
        assert animation.n_frames == 3 and animation.size == (SIZE, SIZE)
    assert frame_strip(walk).shape == (SIZE, 3 * (SIZE + 2) - 2, 3)
    assert "3 images at 64×64" in text
    with pytest.raises(DemoInputError, match="at least 2 frames"):
        engine.interpolate("instaflow", "a cat", frames=1)


def test_page_shows_steps_and_guidance_only_for_models_that_use_them(pipe):
    engine = DemoEngine([DemoModel("instaflow", pipe, (1,)), DemoModel("2-rf", pipe, (1, 2, 4), 1.5)])
    demo = build_demo(engine)
    shown = {c["props"].get("elem_id"): c["props"].get("visible", True) for c in demo.config["components"]}
    assert not shown["gen-steps"] and not shown["gen-guidance"] and not shown["gen-negative"]
    assert shown["gen-model"] and shown["cmp-steps"] and shown["cmp-guidance"] and shown["cmp-negative"]
    steps, guidance, negative = _model_updates(engine, "2-rf")
    assert steps["visible"] and steps["choices"] == [1, 2, 4] and guidance["value"] == 1.5
    assert guidance["visible"] and negative["visible"]
    assert not any(_model_updates(engine, "instaflow")[i]["visible"] for i in range(3))
    tabs = {c["props"].get("label") for c in demo.config["components"] if c["type"] == "tabitem"}
    assert tabs == {"Generate", "Side by side", "Interpolate"}
    assert parse_size("512×384") == (512, 384) and parse_size("256") == (256, 256)


def test_a_model_that_does_not_load_is_a_message_not_an_exception(tmp_path):
    engine = load_engine(str(tmp_path / "missing"))
    assert not engine.models and len(engine.errors) == 1
    assert engine.errors[0].startswith("--model 'missing' did not load: ")
    texts = [str(c["props"].get("value")) for c in build_demo(engine).config["components"]]
    assert any("did not load" in t for t in texts)


# --- the command line ---------------------------------------------------------------------------


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        demo_cli.main(["--help"])
    assert exit_info.value.code == 0
    usage = capsys.readouterr().out
    flags = ["--model", "--model2", "--steps", "--guidance", "--model2-steps", "--model2-guidance", "--sizes"]
    flags += ["--max-images", "--dtype", "--live-delay", "--host", "--port", "--share"]
    for flag in flags:
        assert re.search(rf"^\s+{re.escape(flag)}\b", usage, flags=re.M), flag
    for action in demo_cli.build_parser()._actions:
        assert action.help and len(action.help) > 10, action.option_strings


def test_serves_on_127_0_0_1_and_shares_only_when_asked():
    parser = demo_cli.build_parser()
    options = demo_cli.launch_options(parser.parse_args(["--model", "m"]), "/tmp/x")
    assert options["server_name"] == "127.0.0.1" and options["server_port"] == 7860
    assert options["share"] is False  # explicit: Gradio would share by itself inside Colab
    shared = demo_cli.launch_options(
        parser.parse_args(["--model", "m", "--share", "--host", "0.0.0.0"]), "/x"
    )
    assert shared["share"] is True and shared["server_name"] == "0.0.0.0"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--max-images", "0"], "--max-images must be ≥ 1"),
        (["--port", "70000"], "--port must be 1 to 65535"),
        (["--sizes", "100x100"], "--sizes: size '100x100' is impossible"),
        (["--model2-steps", "0", "2"], "--model2-steps must be positive"),
        (["--live-delay", "-1"], "--live-delay must be ≥ 0"),
        (["--dtype", "bf17"], "unknown dtype name 'bf17'"),
    ],
)
def test_bad_flags_are_one_error_line(extra, message, capsys):
    assert demo_cli.main(["--model", "tiny-random", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


# --- the page in a real browser -----------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``instaflow-demo`` in a subprocess on a free port of 127.0.0.1, its output in a log file."""

    def __init__(self, args: list[str], log_path: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log_path = log_path
        self.log = open(log_path, "w")  # noqa: SIM115 (closed in stop)
        env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
        command = [sys.executable, "-m", "instaflow_jax.cli.demo", *args, "--port", str(self.port)]
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def wait(self, timeout_s: float = 300) -> Server:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"instaflow-demo exited with {self.process.returncode}:\n{self.output()}")
            try:
                with urllib.request.urlopen(self.url, timeout=5) as response:
                    if response.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        pytest.fail(f"instaflow-demo did not answer on {self.url} in {timeout_s} s:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        with open(self.log_path) as f:
            return f.read()

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


def chromium_paths() -> tuple[str | None, str | None]:
    """(browser, chromedriver) executables, None where missing."""
    browser = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    driver = shutil.which("chromedriver") or next(
        (p for p in ("/usr/lib/chromium/chromedriver", "/usr/bin/chromedriver") if os.path.exists(p)), None
    )
    return browser, driver


def find_chromium() -> tuple[str, str]:
    browser, driver = chromium_paths()
    if not browser or not driver:
        pytest.skip(
            f"no Chromium and chromedriver here (found browser={browser}, driver={driver}): install "
            "Debian's chromium and chromium-driver (apt-get install chromium chromium-driver; .ci/run does)"
        )
    return browser, driver


@pytest.fixture(scope="module")
def servers(tiny_pipeline_dir, tmp_path_factory):
    """The demo on the tiny pipeline, and one on a folder that does not exist (started together)."""
    find_chromium()
    logs = tmp_path_factory.mktemp("demo_logs")
    args = ["--model", tiny_pipeline_dir, "--max-images", "1", "--live-delay", "0.3"]
    good = Server(args, str(logs / "demo.log"))
    bad = Server(["--model", str(logs / "no-such-model")], str(logs / "bad.log"))
    yield good, bad
    good.stop()
    bad.stop()


@pytest.fixture(scope="module", autouse=True)
def start_the_servers_early(request):
    """When a browser test is selected and can run, start its servers with the module, so their
    start-up (imports, loading, compiling) overlaps the tests above on the other core."""
    selected = any(i.module is request.module and "servers" in i.fixturenames for i in request.session.items)
    if selected and all(chromium_paths()):
        request.getfixturevalue("servers")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = find_chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in CHROME_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    yield driver
    driver.quit()


def wait_for(driver, condition, what: str, timeout_s: float = 60):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout_s, poll_frequency=0.1).until(condition)
    except TimeoutException:
        pytest.fail(f"timed out after {timeout_s} s waiting for {what}")


def fetch_image(src: str) -> np.ndarray:
    """The picture behind an <img> src served by the demo: uint8 [H, W, 3]."""
    with urllib.request.urlopen(src, timeout=10) as response:
        return np.asarray(Image.open(io.BytesIO(response.read())).convert("RGB"))


def gallery_image(driver, previous_src: str | None = None, expected: np.ndarray | None = None):
    """Wait for the gallery to show an image, a new one if ``previous_src``, one equal to
    ``expected`` (float [H, W, 3], within one level of 255) if given: (src, uint8 pixels)."""
    from selenium.webdriver.common.by import By

    def new_image(d):
        srcs = [img.get_attribute("src") for img in d.find_elements(By.CSS_SELECTOR, "#gallery img")]
        src = next((s for s in srcs if s and s != previous_src), None)
        if src is None:
            return False
        if expected is not None and np.abs(fetch_image(src).astype(int) - to_uint8(expected)).max() > 1:
            return False
        return src

    what = "an image in the gallery" + (" equal to the library's" if expected is not None else "")
    src = wait_for(driver, new_image, what)
    return src, fetch_image(src)


def set_text(element, text: str) -> None:
    from selenium.webdriver.common.keys import Keys

    element.send_keys(Keys.CONTROL, "a")
    element.send_keys(Keys.BACKSPACE)
    if text:
        element.send_keys(text)


def test_the_page_in_a_real_browser(browser, servers, pipe, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    server = servers[0].wait()
    assert "compiling 1 program(s)" in server.output()  # one size, one image count, one step count
    browser.get(server.url)
    prompt = wait_for(browser, lambda d: d.find_element(By.CSS_SELECTOR, "#prompt input"), "the prompt box")
    status = lambda: browser.find_element(By.ID, "status").text

    # Type a prompt, press Enter: the image is the library's own for (prompt, seed 0).
    prompt.send_keys("a red circle", Keys.ENTER)
    src, first = gallery_image(browser)
    np.testing.assert_allclose(first, to_uint8(reference(pipe, "a red circle", 0)), atol=1)
    timing = wait_for(browser, lambda d: status() or False, "the timing text")
    assert re.match(r"[\d.]+ ms per image · 1 image at 64×64, 1 step, ", timing), timing
    assert "no compilation (compiled at start-up)" in timing

    # Another seed, the Generate button: another image.
    set_text(browser.find_element(By.CSS_SELECTOR, "#seed input"), "7")
    browser.find_element(By.ID, "generate").click()
    src, second = gallery_image(browser, previous_src=src)
    assert np.abs(second.astype(int) - first).max() > 20
    np.testing.assert_allclose(second, to_uint8(reference(pipe, "a red circle", 7)), atol=1)
    screenshot = str(tmp_path / "instaflow-demo.png")
    assert browser.save_screenshot(screenshot)
    print(f"screenshot of the page: {screenshot}")

    # "randomise seed": a new seed in the box, and its image.
    seed_box = browser.find_element(By.CSS_SELECTOR, "#seed input")
    browser.find_element(By.ID, "randomise").click()
    new_seed = lambda d: seed_box.get_attribute("value") not in ("7", "") and seed_box.get_attribute("value")
    seed = int(wait_for(browser, new_seed, "a random seed"))
    src, _ = gallery_image(browser, previous_src=src, expected=reference(pipe, "a red circle", seed))

    # An empty prompt: a message in the page, no image, no traceback.
    set_text(prompt, "")
    browser.find_element(By.ID, "generate").click()
    message = wait_for(
        browser, lambda d: "prompt is empty" in status() and status(), "the empty-prompt message"
    )
    assert message.startswith("⚠️ Error: The prompt is empty")
    assert not browser.find_elements(By.CSS_SELECTOR, "#gallery img")
    assert "Traceback" not in browser.page_source
    browser.save_screenshot(str(tmp_path / "instaflow-demo-empty-prompt.png"))

    # Live mode: typing alone regenerates, once the prompt has settled.
    browser.find_element(By.CSS_SELECTOR, "#live input").click()
    prompt.send_keys("a blue square")
    gallery_image(browser, expected=reference(pipe, "a blue square", seed))  # no click

    # Nothing but the demo's own server was asked for anything.
    resources = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert resources and all(r.startswith(server.url) for r in resources), resources


def test_a_model_folder_that_does_not_load_shows_a_message_in_the_page(browser, servers):
    from selenium.webdriver.common.by import By

    server = servers[1].wait()
    browser.get(server.url)
    banner = wait_for(browser, lambda d: d.find_element(By.ID, "load-error").text, "the load error")
    assert "--model 'no-such-model' did not load" in banner and "Traceback" not in browser.page_source
    assert "error: --model 'no-such-model' did not load" in server.output()
