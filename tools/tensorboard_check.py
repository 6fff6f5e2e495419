"""What a run's TensorBoard shows: the tags in its event files, and screenshots of the dashboards in a real browser.

    python tools/tensorboard_check.py --logdir runs/demo --out docs/figures
    python tools/tensorboard_check.py --logdir runs/demo --no-browser        # the tag listing only

1. Reads every event file under --logdir with TensorBoard's own EventAccumulator and prints, per run
   folder, what a user will find: scalars (points, last step and value), images, PR curves (steps), and
   the hparams entry (hyperparameters and metrics). No browser needed; the tests assert on this.
2. Starts `tensorboard --logdir LOGDIR --host 127.0.0.1 --port P` (this machine only, a free port),
   waits until it serves, and checks that its data API (/data/plugin/<plugin>/tags, the hparams
   experiment) serves every tag found in step 1.
3. Takes a headless Chromium screenshot of each dashboard (--dashboards; TensorBoard's URL fragments
   #timeseries, #scalars, #images, #pr_curves, #hparams) into OUT/05_tensorboard_<dashboard>.png, and
   writes the last image of each image tag as logged, full size (what "Show actual image size" shows),
   to OUT/05_tensorboard_image_<tag>.png. Time series shows --timeseries-tags, Scalars --scalars-tags,
   both unsmoothed (--smoothing; TensorBoard's own default of 0.6 hides per-epoch values).
4. Stops TensorBoard. Look at the PNGs: a screenshot can still show a half-drawn page.

Chromium runs headless and is driven over its DevTools protocol on a pipe (no port, no extra package):
each page is shot once no loading indicator shows and no resource has arrived for --settle seconds of
real time. (Chromium's one-shot `--screenshot --virtual-time-budget` left Time series cards blank in
about one run in four, we think because its lazily drawn cards were not laid out in virtual time.) Charts are drawn as
SVG in the page (TensorBoard's forceSVG=true), not in a web worker, so "settled" means "drawn".
Chromium comes from Debian's `chromium` package (--chromium to point elsewhere); TensorBoard runs as
`python -m tensorboard.main` from this interpreter.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the stages live one folder up

import argparse  # noqa: E402
import base64  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import queue  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import textwrap  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import urllib.parse  # noqa: E402
import urllib.request  # noqa: E402

DASHBOARDS = ("timeseries", "scalars", "images", "pr_curves", "hparams")
KINDS = ("scalars", "images", "pr_curves", "hparams")  # each is also the name of its TensorBoard plugin
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                  "--no-first-run", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--disable-extensions", "--hide-scrollbars", "--mute-audio")


# * 1. what the event files hold ------------------------------------------------------------------------
def run_folders(logdir):
    """Every folder under `logdir` (itself included) holding event files: TensorBoard's "runs"."""
    return sorted({path.parent for path in Path(logdir).rglob("*tfevents*") if path.is_file()})


def list_tags(logdir):
    """{run: {"scalars": {tag: (points, last step, last value)}, "images": {tag: steps},
    "pr_curves": {tag: steps}, "hparams": {"hparams": {name: value}, "metrics": [tag]} or {},
    "other": {tag: plugin}}}, run being the folder relative to `logdir` ("." for logdir itself)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    found = {}
    for folder in run_folders(logdir):
        events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
        events.Reload()
        tags = events.Tags()
        plugins = {}  # {plugin: {tag: its plugin data}}, from each tag's summary metadata
        for tag, metadata in events.summary_metadata.items():
            plugins.setdefault(metadata.plugin_data.plugin_name, {})[tag] = metadata.plugin_data.content
        run = {"scalars": {}, "images": {}, "pr_curves": {}, "hparams": {}, "other": {}}
        for tag in tags["scalars"]:
            points = events.Scalars(tag)
            run["scalars"][tag] = (len(points), points[-1].step, points[-1].value)
        for tag in tags["images"]:
            run["images"][tag] = sorted({image.step for image in events.Images(tag)})
        for tag in plugins.get("pr_curves", {}):
            run["pr_curves"][tag] = sorted({tensor.step for tensor in events.Tensors(tag)})
        for content in plugins.get("hparams", {}).values():
            data = plugin_data_pb2.HParamsPluginData.FromString(content)
            if data.HasField("session_start_info"):
                run["hparams"]["hparams"] = {name: _value(value) for name, value in
                                             sorted(data.session_start_info.hparams.items())}
            if data.HasField("experiment"):
                run["hparams"]["metrics"] = [info.name.tag for info in data.experiment.metric_infos]
        for plugin, contents in plugins.items():  # text, histograms, ...: listed, not checked
            run["other"].update({tag: plugin for tag in contents if plugin not in KINDS and plugin})
        found[str(folder.relative_to(logdir))] = run
    return found


def _value(value):
    """A google.protobuf Value (an hparam) as a plain Python number, string or bool."""
    return getattr(value, value.WhichOneof("kind")) if value.WhichOneof("kind") else None


def format_listing(found):
    """The listing printed by step 1, one line per tag."""
    lines = []
    for run, kinds in found.items():
        lines.append(f"run {run}:")
        for tag, (points, step, value) in sorted(kinds["scalars"].items()):
            lines.append(f"  scalar    {tag}: {points} points, last step {step}: {value:.6g}")
        for kind, name in (("images", "image"), ("pr_curves", "pr curve")):
            for tag, steps in sorted(kinds[kind].items()):
                lines.append(f"  {name:9s} {tag}: {len(steps)} steps ({_steps(steps)})")
        for tag, plugin in sorted(kinds["other"].items()):
            lines.append(f"  {plugin:9s} {tag}")
        if kinds["hparams"]:
            values = kinds["hparams"].get("hparams", {})
            lines.append(textwrap.fill(f"  hparams   {len(values)} values: " + ", ".join(f"{k}={v}" for k, v in
                                       values.items()), width=110, subsequent_indent=" " * 12, break_long_words=False))
            lines.append(f"  hparams   metrics: {', '.join(kinds['hparams'].get('metrics', [])) or 'none'}")
    return "\n".join(lines)


def _steps(steps):
    return ", ".join(map(str, steps)) if len(steps) <= 6 else f"{steps[0]}, {steps[1]}, ..., {steps[-1]}"


# * 2. TensorBoard --------------------------------------------------------------------------------------
def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_tensorboard(logdir, port, log_file):
    """`tensorboard --logdir` on 127.0.0.1:port, reading the files once (the Python loader: no extra process)."""
    command = [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", "127.0.0.1",
               "--port", str(port), "--load_fast", "false", "--reload_interval", "0"]
    return subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT)


def expected_tags(found):
    """{kind: {(run, tag)}} of the listing; hparams as ("hparam", name) and ("metric", tag)."""
    tags = {kind: {(run, tag) for run, kinds in found.items() for tag in kinds[kind]} for kind in KINDS[:3]}
    tags["hparams"] = {(what, name) for kinds in found.values()
                       for what, names in (("hparam", kinds["hparams"].get("hparams", {})),
                                           ("metric", kinds["hparams"].get("metrics", []))) for name in names}
    return tags


def served_tags(url, kinds):
    """The same sets as TensorBoard's data API serves them to the browser, for the plugins in `kinds`."""
    tags = {}
    for kind in set(kinds) - {"hparams"}:
        with urllib.request.urlopen(f"{url}/data/plugin/{kind}/tags", timeout=10) as answer:
            tags[kind] = {(run, tag) for run, run_tags in json.load(answer).items() for tag in run_tags}
    if "hparams" in kinds:
        request = urllib.request.Request(f"{url}/data/plugin/hparams/experiment", data=b'{"experimentName": ""}',
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as answer:
            experiment = json.load(answer)
        tags["hparams"] = {("hparam", info["name"]) for info in experiment.get("hparamInfos", [])} | \
                          {("metric", info["name"]["tag"]) for info in experiment.get("metricInfos", [])}
    return tags


def wait_until_served(process, url, expected, timeout):
    """Poll TensorBoard's data API until it serves every tag in `expected` ({kind: {(run, tag)}})."""
    deadline, missing = time.monotonic() + timeout, {"anything": ["(not serving yet)"]}
    kinds = [kind for kind in KINDS if expected[kind]]
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"tensorboard exited with code {process.returncode}")
        try:
            served = served_tags(url, kinds)
            missing = {kind: sorted(expected[kind] - served[kind]) for kind in kinds if expected[kind] - served[kind]}
            if not missing:
                return served
        except (OSError, ValueError, KeyError):  # not listening yet, or a plugin not loaded yet
            pass
        time.sleep(0.5)
    shown = "; ".join(f"{kind}: {', '.join(map(str, tags[:4]))}{' ...' if len(tags) > 4 else ''}"
                      for kind, tags in missing.items())
    raise RuntimeError(f"tensorboard at {url} did not serve within {timeout:.0f} s what the event files hold ({shown})")


def stop(process):
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# * 3. the browser --------------------------------------------------------------------------------------
def dashboard_url(url, dashboard, timeseries_tags="", scalars_tags="", smoothing=0.0):
    """The page of one dashboard; forceSVG=true draws charts in the page, where the screenshot waits for them."""
    quote = lambda text: urllib.parse.quote(text, safe="")  # noqa: E731
    if dashboard == "timeseries":  # the Angular dashboard reads its state from the query string
        return f"{url}/?forceSVG=true&smoothing={smoothing}&tagFilter={quote(timeseries_tags)}#timeseries"
    if dashboard == "scalars":  # the older dashboards read theirs from the fragment
        return f"{url}/?forceSVG=true#scalars&_smoothingWeight={smoothing}&tagFilter={quote(scalars_tags)}"
    return f"{url}/?forceSVG=true#{dashboard}"


BUSY = """(() => {  // loading indicators on screen, inside shadow roots too, and resources fetched so far
  let busy = 0;
  const walk = root => { for (const el of root.querySelectorAll("*")) {
    if (el.shadowRoot) walk(el.shadowRoot);
    if (/spinner|mat-progress-bar/i.test(el.tagName) && el.getClientRects().length) busy++;  // not a slider's bar
  } };
  walk(document);
  return [busy, performance.getEntriesByType("resource").length]; })()"""


class Browser:
    """Headless Chromium driven over the DevTools protocol on a pipe (the child's fds 3 and 4), one tab."""

    def __init__(self, chromium, size=(1700, 1000)):
        self.profile = tempfile.TemporaryDirectory(prefix="q2l_chromium_")  # a fresh profile: no saved settings
        to_child, self._out = os.pipe()
        self._in, from_child = os.pipe()

        def pipe_fds():  # the protocol's fixed descriptors
            os.dup2(to_child, 3)
            os.dup2(from_child, 4)

        self.process = subprocess.Popen([chromium, *CHROMIUM_FLAGS, "--remote-debugging-pipe",
                                         f"--user-data-dir={self.profile.name}", f"--window-size={size[0]},{size[1]}"],
                                        preexec_fn=pipe_fds, pass_fds=(3, 4), stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_child)
        os.close(from_child)
        self.messages, self.last_id = queue.Queue(), 0
        threading.Thread(target=self._read, daemon=True).start()
        try:
            target = self.call("Target.createTarget", url="about:blank")["targetId"]
            self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
            self.call("Emulation.setDeviceMetricsOverride", tab=True, width=size[0], height=size[1],
                      deviceScaleFactor=1, mobile=False)
        except RuntimeError:
            self.close()
            raise

    def _read(self):  # messages are JSON texts ended by a NUL byte; events are dropped when read
        buffer = b""
        with os.fdopen(self._in, "rb", buffering=0) as pipe:
            while chunk := pipe.read(1 << 16):
                *whole, buffer = (buffer + chunk).split(b"\0")
                for message in whole:
                    self.messages.put(json.loads(message))
        self.messages.put(None)

    def call(self, method, tab=False, timeout=60, **params):
        """One protocol command (to the tab if `tab`, else to the browser); returns its result."""
        self.last_id += 1
        message = {"id": self.last_id, "method": method, "params": params, **({"sessionId": self.session} if tab else {})}
        os.write(self._out, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        try:
            while (answer := self.messages.get(timeout=max(0.01, deadline - time.monotonic()))) is not None:
                if answer.get("id") == self.last_id:
                    if "error" in answer:
                        raise RuntimeError(f"chromium: {method}: {answer['error'].get('message')}")
                    return answer["result"]
        except queue.Empty:
            raise RuntimeError(f"chromium did not answer {method} within {timeout:.0f} s") from None
        raise RuntimeError(f"chromium closed the connection during {method}")

    def screenshot(self, url, path, settle=2.0, timeout=60):
        """Open `url`, wait until no loading indicator shows and no resource arrives for `settle` seconds (at most
        `timeout`), then write the visible page to `path`. Returns (seconds waited, settled?)."""
        self.call("Page.navigate", tab=True, url=url)
        started, quiet, last = time.monotonic(), 0.0, None
        while quiet < settle and time.monotonic() - started < timeout:
            time.sleep(0.25)
            busy, resources = self.call("Runtime.evaluate", tab=True, expression=BUSY, returnByValue=True)["result"]["value"]
            quiet = quiet + 0.25 if busy == 0 and resources == last else 0.0
            last = resources
        picture = self.call("Page.captureScreenshot", tab=True, format="png")["data"]
        Path(path).write_bytes(base64.b64decode(picture))
        return time.monotonic() - started, quiet >= settle

    def close(self):
        with contextlib.suppress(RuntimeError, OSError):
            self.call("Browser.close", timeout=10)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self._out)
        self.profile.cleanup()


def write_last_images(logdir, found, out_dir):
    """The last image of every image tag, as logged (PNG bytes), to OUT/05_tensorboard_image_<run>_<tag>.png."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    written = []
    for run, kinds in found.items():
        if not kinds["images"]:
            continue
        events = EventAccumulator(str(Path(logdir) / run), size_guidance={"images": 0})
        events.Reload()
        for tag in kinds["images"]:
            image = events.Images(tag)[-1]
            name = re.sub(r"[^A-Za-z0-9]+", "_", tag if run == "." else f"{run}_{tag}").strip("_")
            path = Path(out_dir) / f"05_tensorboard_image_{name}.png"
            path.write_bytes(image.encoded_image_string)
            written.append((path, tag, image.step))
    return written


def check_in_browser(logdir, found, out_dir, dashboards, chromium, size=(1700, 1000), timeout=120, settle=2.0,
                     page_timeout=60, timeseries_tags="", scalars_tags="", smoothing=0.0):
    """Steps 2-4: TensorBoard up and serving every tag, one screenshot per dashboard, TensorBoard down.
    Returns [(path, what)] of the files written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    url = f"http://127.0.0.1:{free_port()}"
    expected = expected_tags(found)
    written = []
    with tempfile.TemporaryFile(mode="w+") as log_file:
        process = start_tensorboard(logdir, url.rsplit(":", 1)[1], log_file)
        browser = None
        try:
            started = time.monotonic()
            wait_until_served(process, url, expected, timeout)
            print(f"tensorboard at {url} serves every tag of the event files ({time.monotonic() - started:.1f} s): "
                  + ", ".join(f"{len(expected[kind])} {kind}" for kind in KINDS if expected[kind]))
            browser = Browser(chromium, size)
            for dashboard in dashboards:
                page = dashboard_url(url, dashboard, timeseries_tags, scalars_tags, smoothing)
                path = out_dir / f"05_tensorboard_{dashboard}.png"
                waited, settled = browser.screenshot(page, path, settle, page_timeout)
                written.append((path, f"#{dashboard}"))
                print(f"wrote {path} ({page.removeprefix(url)}; " + (f"settled after {waited:.1f} s)" if settled else
                      f"STILL LOADING after {waited:.0f} s: look at it, or raise --page-timeout)")
                      + _nothing_to_show(dashboard, expected, timeseries_tags, scalars_tags))
        except RuntimeError as error:
            log_file.seek(0)
            tail = "\n".join(log_file.read().strip().splitlines()[-8:])
            raise RuntimeError(f"{error}\n--- tensorboard's last lines:\n{tail}") from None
        finally:
            if browser is not None:
                browser.close()
            stop(process)
    for path, tag, step in write_last_images(logdir, found, out_dir):
        written.append((path, tag))
        print(f"wrote {path} (image {tag} at step {step}, as logged)")
    return written


def _nothing_to_show(dashboard, expected, timeseries_tags, scalars_tags):
    """A warning when the event files hold nothing this dashboard draws (it then shows a "no data" notice)."""
    if dashboard in ("timeseries", "scalars"):
        pattern = timeseries_tags if dashboard == "timeseries" else scalars_tags
        kinds = ("scalars", "images", "pr_curves") if dashboard == "timeseries" else ("scalars",)
        if not any(re.search(pattern, tag) for kind in kinds for _, tag in expected[kind]):
            return f" <- no tag matches {pattern!r}"
    elif not expected[dashboard]:
        return f" <- the event files hold no {dashboard.replace('_', ' ')}: the page says so"
    return ""


# * command line ----------------------------------------------------------------------------------------
def build_parser():
    parser = argparse.ArgumentParser(prog="tools/tensorboard_check.py", allow_abbrev=False,
                                     description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("--logdir", required=True, help="a run folder (runs/demo) or a folder of runs (runs)")
    add("--out", default="docs/figures", help="folder for the PNGs 05_tensorboard_*.png (default: docs/figures)")
    add("--no-browser", action="store_true", help="print the tag listing only: no TensorBoard, no screenshots")
    add("--dashboards", nargs="+", choices=DASHBOARDS, default=list(DASHBOARDS),
        help=f"dashboards to screenshot (default: {' '.join(DASHBOARDS)})")
    add("--timeseries-tags", default="^val/", help="regular expression: the tags the Time series screenshot "
        "shows (default: ^val/, the validation curves and image panel)")
    add("--scalars-tags", default="^train/", help="regular expression: the tags the Scalars screenshot shows "
        "(default: ^train/, losses and learning rates)")
    add("--smoothing", type=float, default=0.0, help="curve smoothing in both, 0 to 0.999 (default: 0.0)")
    add("--chromium", default="/usr/bin/chromium", help="the browser (default: /usr/bin/chromium)")
    add("--settle", type=float, default=2.0, help="seconds a page must show no loading indicator and fetch "
        "nothing new before its screenshot (default: 2.0)")
    add("--page-timeout", type=float, default=60, help="seconds to wait for a page to settle; then it is shot "
        "anyway, with a warning (default: 60)")
    add("--window", type=int, nargs=2, default=[1700, 1000], metavar=("WIDTH", "HEIGHT"),
        help="browser window and screenshot size in pixels; 1700 wide fits three Time series cards in a row "
        "(default: 1700 1000)")
    add("--timeout", type=float, default=120, help="seconds to wait for TensorBoard to serve the data "
        "(default: 120)")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)

    def fail(message):
        parser.exit(2, f"{parser.prog}: error: {message}\n")

    logdir = Path(args.logdir)
    if not logdir.is_dir():
        fail(f"--logdir {logdir} is not a folder; pass a run folder such as runs/demo")
    if min(args.settle, args.page_timeout, args.timeout) <= 0 or min(args.window) < 200 or not 0 <= args.smoothing < 1:
        fail("--settle, --page-timeout and --timeout must be > 0, --window at least 200 200, --smoothing in [0, 1)")
    for flag in ("timeseries_tags", "scalars_tags"):
        try:
            re.compile(getattr(args, flag))
        except re.error as error:
            fail(f"--{flag.replace('_', '-')} {getattr(args, flag)!r} is not a regular expression ({error})")
    found = list_tags(logdir)
    if not found:
        fail(f"no TensorBoard event files (*tfevents*) under {logdir}; train first (python 05_train.py) "
             f"or pass the run's folder")
    print(format_listing(found))
    if args.no_browser:
        return found, []
    chromium = shutil.which(args.chromium)
    if chromium is None:
        fail(f"no browser at {args.chromium}; install Debian's chromium package, pass --chromium PATH, "
             f"or use --no-browser for the listing only")
    try:
        written = check_in_browser(logdir, found, args.out, args.dashboards, chromium, tuple(args.window),
                                   args.timeout, args.settle, args.page_timeout, args.timeseries_tags,
                                   args.scalars_tags, args.smoothing)
    except RuntimeError as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    return found, written


if __name__ == "__main__":
    main()
