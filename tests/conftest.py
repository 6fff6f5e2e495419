"""Shared test machinery: learner mode, and the `slow` / `gpu` markers.

Learner mode
------------
Every stage's tests get the stage under test from a fixture (`stage01` ... `stage06`)
instead of importing it directly. By default the fixture returns this project's script.
Point an environment variable at your own file and the same reference tests run against it:

    Q2L_STAGE_03=my_transformer.py python -m pytest tests/test_03_transformer.py

Your file is loaded once, before any test is collected, and registered under the stage's
own module name (`03_transformer`), so later stages that import it (`04`, `05`, `06`) run
on top of your code too. A name your file does not define yet makes the tests that need it
*skip* with a message naming it, so you can build a stage one class at a time; in the
reference run (no variable set) a missing name is a failure, as it should be.

`python tools/exercise.py 04` writes such a file to start from: the stage with the bodies of its
lessons (tools/exercise.py LESSONS) replaced by `raise NotImplementedError("write this: ...")`.
In learner mode:
- a test that reaches one of those raises in your file is *skipped*: "not written yet: <name>";
- a lesson whose signature differs from ours is reported once, with the signature the tests
  call, and its tests skip with that one message;
- tests run from the simplest piece to the whole (`@pytest.mark.lesson(order, "piece")`), and
  pytest ends with one progress line per stage ("stage 04: 7 of 12 lesson checks pass; next: ...");
- correctness checks (`lesson`, at the tolerance a correct float32 version meets) are told apart
  from stability and strictness checks (`@pytest.mark.stability("what to change")`: extreme
  logits, fp16, 1e-12 parity), which are listed under their own heading with what to change;
- tests marked `hardening` (our error wording) are deselected; tracebacks are short.
`assert_close_teaching` is the assertion lesson checks use: on failure it shows the small input,
the expected and obtained values and a one-line hint.
"""

import ast
import importlib
import importlib.util
import inspect
import math
import os
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = {
    1: "01_data",
    2: "02_backbone",
    3: "03_transformer",
    4: "04_loss",
    5: "05_train",
    6: "06_eval",
}


def learner_path(number):
    """The learner's file for stage `number`, from Q2L_STAGE_0N, or None."""
    value = os.environ.get(f"Q2L_STAGE_{number:02d}", "").strip()
    return Path(value).expanduser().resolve() if value else None


@pytest.fixture
def restore_stage_modules():
    """For tests that load a learner's file as a stage: afterwards, sys.modules holds our stages again."""
    saved = {name: sys.modules.get(name) for name in STAGES.values()}
    yield
    for name, module in saved.items():
        if module is None:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = module


def load_learner_file(number, path):
    """Import a learner's file as stage `number`'s module (e.g. `03_transformer`)."""
    name = STAGES[number]
    if not path.is_file():
        raise pytest.UsageError(
            f"Q2L_STAGE_{number:02d}={path} does not exist or is not a file; "
            f"point it at your own version of {name}.py"
        )
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # later stages that import `name` get the learner's code
    try:
        spec.loader.exec_module(module)
    except Exception as error:
        del sys.modules[name]
        raise pytest.UsageError(f"importing {path} as stage {name} failed: {error!r}") from error
    return module


class Stage:
    """A stage module seen through the tests: a missing name skips in learner mode.

    Every attribute operation goes to the module: get, set, delete, and `__dict__` itself (the
    proxy has no instance dictionary of its own, thanks to __slots__). So monkeypatch.setattr(stage05,
    "name", value) patches the module the code runs in and its undo() restores the module's own
    value, on pytest 8 and on pytest >= 9.2 (which reads the old value from the target's __dict__).
    """

    __slots__ = ("_module", "_learner_file")

    def __init__(self, module, learner_file=None):
        object.__setattr__(self, "_module", module)
        object.__setattr__(self, "_learner_file", learner_file)

    def __getattr__(self, attribute):  # only called for names the proxy itself lacks
        try:
            return getattr(self._module, attribute)
        except AttributeError:
            if self._learner_file is None or attribute.startswith("__"):
                raise
            pytest.skip(f"{self._learner_file.name} does not define `{attribute}` yet")

    def __setattr__(self, attribute, value):
        setattr(self._module, attribute, value)

    def __delattr__(self, attribute):
        delattr(self._module, attribute)

    def __repr__(self):
        source = self._learner_file or getattr(self._module, "__file__", "?")
        return f"<stage {self._module.__name__} from {source}>"


def pytest_addoption(parser):
    parser.addoption(
        "--runslow", action="store_true", help="also run tests marked slow (or Q2L_RUN_SLOW=1)"
    )


def pytest_configure(config):
    config.addinivalue_line("markers", "lesson(order, piece): a correctness check of one piece of a stage's "
                            "lesson; learner mode runs them in this order and reports progress")
    config.addinivalue_line("markers", "stability(change): a stability or strictness check (extreme inputs, "
                            "fp16, 1e-12 parity); learner mode lists its failures apart, with what to change")
    # Load learner files before collection, so a test module's own imports see them too.
    config._q2l_learner = {}
    config._q2l_signatures = {}  # stage number -> [one message per lesson with another signature]
    config._q2l_results = {}  # nodeid -> (outcome, reason)
    for number in STAGES:
        path = learner_path(number)
        if path is not None:
            module = load_learner_file(number, path)
            config._q2l_learner[number] = path
            config._q2l_signatures[number] = check_lesson_signatures(number, module, path)
    if config._q2l_learner and config.getoption("tbstyle", "auto") == "auto":
        config.option.tbstyle = "short"  # a learner reads the message, not our test's source


def _versions():
    """The versions a failure report needs: python and the libraries the stages are built on."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    found = [f"python {platform.python_version()}"]
    for package in ("torch", "torchvision", "timm", "numpy", "pytest"):
        try:
            found.append(f"{package} {version(package)}")
        except PackageNotFoundError:
            found.append(f"{package} not installed")
    return "q2l: versions: " + ", ".join(found)


def pytest_report_header(config):
    learner = getattr(config, "_q2l_learner", {})
    if not learner:
        return [_versions(), "q2l: reference stages (set Q2L_STAGE_0N=path.py to test your own file)"]
    lines = [_versions()] + [f"q2l: learner mode: stage {STAGES[n]} <- {p}" for n, p in sorted(learner.items())]
    for number, problems in sorted(config._q2l_signatures.items()):
        lines += [f"q2l: stage {number:02d}: {problem}" for problem in problems]
    return lines


def pytest_collection_modifyitems(config, items):
    run_slow = config.getoption("--runslow") or os.environ.get("Q2L_RUN_SLOW") == "1"
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    skip_slow = pytest.mark.skip(reason="slow: run with --runslow or Q2L_RUN_SLOW=1")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; none is visible here")
    learner = getattr(config, "_q2l_learner", {})
    # In learner mode, tests that pin our error wording say nothing about a learner's lesson: deselected.
    hardening = [item for item in items if learner and "hardening" in item.keywords]
    if hardening:
        config.hook.pytest_deselected(items=hardening)
        items[:] = [item for item in items if item not in hardening]
    if learner:  # from the simplest piece to the whole: lessons in order, then the rest, stability last
        files = {}
        for item in items:
            files.setdefault(item.path, len(files))
        items.sort(key=lambda item: (files[item.path], *_lesson_rank(item)))
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)


# ------------------------------------------------------------------ learner mode: lessons, skips, progress

NOT_WRITTEN = "write this: "  # the prefix tools/exercise.py puts in the raises it writes


class LessonSignatureError(Exception):
    """Raised by a lesson whose signature differs from the one the tests call (learner mode only)."""

    def __init__(self, message, where):
        super().__init__(message)
        self.where = where  # (learner file, line of its def): all its tests fold into one skip line


def _lessons(number):
    from tools.exercise import LESSONS  # the one place the lessons are declared

    return LESSONS[f"{number:02d}"]


def _reference_parameters(node):
    """[(name, kind, has_default)] of a parsed function, as inspect.Parameter kinds."""
    P = inspect.Parameter
    a = node.args
    positional = a.posonlyargs + a.args
    first_default = len(positional) - len(a.defaults)
    found = [(arg.arg, P.POSITIONAL_ONLY if i < len(a.posonlyargs) else P.POSITIONAL_OR_KEYWORD, i >= first_default)
             for i, arg in enumerate(positional)]
    if a.vararg:
        found.append((a.vararg.arg, P.VAR_POSITIONAL, False))
    found += [(arg.arg, P.KEYWORD_ONLY, default is not None) for arg, default in zip(a.kwonlyargs, a.kw_defaults)]
    if a.kwarg:
        found.append((a.kwarg.arg, P.VAR_KEYWORD, False))
    return found


def _compatible(expected, parameters):
    """Does a learner's parameter list accept every call the tests make with the `expected` one?"""
    P = inspect.Parameter
    mine = [(p.name, p.kind, p.default is not P.empty) for p in parameters]
    for i, (name, kind, has_default) in enumerate(expected):
        if i >= len(mine) or mine[i][:2] != (name, kind) or (has_default and not mine[i][2]):
            return False
    return all(has_default or kind in (P.VAR_POSITIONAL, P.VAR_KEYWORD) for _, kind, has_default in mine[len(expected):])


def check_lesson_signatures(number, module, path):
    """One message per lesson of `module` whose signature differs from ours; its tests then skip with it.

    The lesson is replaced in the learner's module by a function that raises LessonSignatureError,
    so its tests report this one message instead of one TypeError each."""
    from tools.exercise import lesson_nodes

    reference = ast.parse((ROOT / f"{STAGES[number]}.py").read_text(encoding="utf-8"))
    problems = []
    for name, node in lesson_nodes(reference, _lessons(number), missing_ok=True).items():
        owner_name, _, attribute = name.rpartition(".")
        owner = getattr(module, owner_name, None) if owner_name else module
        function = inspect.getattr_static(owner, attribute, None) if owner is not None else None
        function = getattr(function, "__func__", function)  # staticmethod / classmethod
        if not callable(function):
            continue  # not written yet: the Stage proxy skips its tests
        try:
            parameters = inspect.signature(function).parameters.values()
        except (TypeError, ValueError):
            continue
        if _compatible(_reference_parameters(node), parameters):
            continue
        expected = f"{name}({ast.unparse(node.args)})"
        problems.append(f"{name} in {path.name} has the signature ({', '.join(str(p) for p in parameters)}); "
                        f"the tests call {expected}")
        code = getattr(function, "__code__", None)
        where = (str(path), code.co_firstlineno) if code is not None else None

        def stand_in(*args, _message=f"signature differs from the lesson's {expected}", _where=where, **kwargs):
            raise LessonSignatureError(_message, _where)

        setattr(owner, attribute, stand_in)
    return problems


def _not_written(error, learner_files):
    """'not written yet: <name>' if `error` (or its cause) is a "write this" raise in a learner's file."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, LessonSignatureError):
            return str(error), error.where
        if isinstance(error, NotImplementedError) and str(error).startswith(NOT_WRITTEN):
            tb = error.__traceback__
            while tb is not None and tb.tb_next is not None:
                tb = tb.tb_next
            if tb is not None and Path(tb.tb_frame.f_code.co_filename).resolve() in learner_files:
                code = tb.tb_frame.f_code
                return f"not written yet: {code.co_qualname}", (code.co_filename, tb.tb_lineno)
        error = error.__cause__ or error.__context__
    return None


def _lesson_rank(item):
    """Sort key inside a test file: (0, order) for lessons, (1, 0) for the rest, (2, 0) for stability."""
    marker = item.get_closest_marker("lesson")
    if marker is not None:
        return (0, marker.args[0])
    return (2, 0) if item.get_closest_marker("stability") else (1, 0)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    learner = getattr(item.config, "_q2l_learner", {})
    if learner and report.failed and call.excinfo is not None:
        found = _not_written(call.excinfo.value, {path for path in learner.values()})
        if found is not None:
            reason, where = found
            path, line = where or (str(item.path), item.location[1] + 1)
            report.outcome = "skipped"
            report.longrepr = (path, line, f"Skipped: {reason}")  # one folded line per lesson in -ra
    if learner:  # for the progress lines: a test's outcome is its worst phase's
        results = item.config._q2l_results
        rank = {"passed": 0, "skipped": 1, "failed": 2}
        if report.when == "call" or not report.passed:
            previous = results.get(item.nodeid, ("passed", ""))
            if rank[report.outcome] >= rank[previous[0]]:
                reason = report.longrepr[2] if report.skipped and isinstance(report.longrepr, tuple) else ""
                results[item.nodeid] = (report.outcome, reason.removeprefix("Skipped: "))
    return report


def _stage_of(nodeid):
    match = re.search(r"test_0(\d)_\w+\.py::", nodeid)
    return int(match.group(1)) if match else None


@pytest.hookimpl(wrapper=True, tryfirst=True)  # outermost: printed last, after pytest's short summary
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Learner mode: one progress line per stage, then the stability checks with what to change."""
    result = yield
    if getattr(config, "_q2l_learner", {}) and not config.option.collectonly:
        _progress(terminalreporter, config)
    return result


def _progress(terminalreporter, config):
    learner = config._q2l_learner
    items = {item.nodeid: item for item in getattr(config, "_q2l_items", [])}
    lines = []
    write = lines.append
    for number, path in sorted(learner.items()):
        for problem in config._q2l_signatures.get(number, []):
            write(f"stage {number:02d}: fix this first: {problem}")
        ran = [(nodeid, config._q2l_results.get(nodeid, ("not run", ""))) for nodeid in items
               if _stage_of(nodeid) == number]  # every selected test; "not run" after -x or ^C
        lessons = [(n, r) for n, r in ran if items[n].get_closest_marker("lesson")]
        stability = [(n, r) for n, r in ran if items[n].get_closest_marker("stability")]
        if not lessons:
            continue
        passed = sum(result[0] == "passed" for _, result in lessons)
        line = f"stage {number:02d} ({path.name}): {passed} of {len(lessons)} lesson checks pass"
        pending = [(n, r) for n, r in lessons if r[0] != "passed"]
        if pending:
            nodeid, (outcome, reason) = pending[0]
            piece = items[nodeid].get_closest_marker("lesson").args[1]
            state = reason if outcome == "skipped" else "fails" if outcome == "failed" else "not run"
            line += f"; next: {piece} ({nodeid.split('::', 1)[1]}: {state})"
        write(line)
        if stability:
            failing = [(n, r) for n, r in stability if r[0] == "failed"]
            passed = sum(result[0] == "passed" for _, result in stability)
            advice = " (correct code can still fail these; what to change:)" if not pending else \
                " (fix the lesson checks first, they may be the cause; then:)"
            others = ", ".join(f"{count} {outcome}" for outcome in ("skipped", "not run")
                               if (count := sum(result[0] == outcome for _, result in stability)))
            write(f"stage {number:02d} stability and strictness: {passed} of {len(stability)} pass"
                  + (f", {others}" if others else "") + (advice if failing else ""))
            shown = {}
            for nodeid, _ in failing:
                function = items[nodeid].originalname
                shown.setdefault(function, [0, items[nodeid].get_closest_marker("stability").args[0]])[0] += 1
            for function, (count, change) in shown.items():
                write(f"  {function} ({count} failing): {change}")
    if lines:
        terminalreporter.section("learner mode: progress")
        for line in lines:
            terminalreporter.write_line(line)


@pytest.hookimpl(trylast=True)
def pytest_collection_finish(session):
    session.config._q2l_items = list(session.items)


def _numbers(value, limit=10):
    """'[0.1, -2, 3.5e-07]' for a few numbers; a summary for many."""
    if isinstance(value, (int, float, bool)) or value is None:
        return f"{value:.4g}" if isinstance(value, float) else repr(value)
    if not hasattr(value, "detach"):
        return repr(value)
    flat = [v + 0.0 for v in value.detach().cpu().double().flatten().tolist()]  # + 0.0: no "-0"
    if len(flat) == 1:
        return f"{flat[0]:.4g}"
    if len(set(flat)) == 1:
        return f"{flat[0]:.4g} everywhere, shape {tuple(value.shape)}"
    text = ", ".join(f"{v:.4g}" for v in flat[:limit])
    return f"[{text}, ...], shape {tuple(value.shape)}" if len(flat) > limit else f"[{text}]"


def assert_close_teaching(obtained, expected, *, what, inputs=None, hint, rtol, atol):
    """Assert obtained ~ expected (|o - e| <= atol + rtol |e|, NaN never close); on failure say what and why.

    what: the piece being checked; inputs: {name: small tensor or number} the call used (tensors of
    the result's size are shown entry by entry at the worst mismatches); hint: the usual cause."""
    __tracebackhide__ = True
    import torch

    o = torch.as_tensor(obtained.detach() if hasattr(obtained, "detach") else obtained).cpu().double()
    e = torch.as_tensor(expected.detach() if hasattr(expected, "detach") else expected).cpu().double()
    lines = [f"{what}: wrong result"]
    for name, value in (inputs or {}).items():
        lines.append(f"  {name:9s} {_numbers(value)}")
    if o.shape != e.shape:
        lines += [f"  expected shape {tuple(e.shape)}, obtained shape {tuple(o.shape)}", f"  hint: {hint}"]
        raise AssertionError("\n".join(lines))
    close = ((o - e).abs() <= atol + rtol * e.abs()) | ((o == e) & torch.isinf(e))
    if bool(close.all()):
        return
    lines += [f"  expected  {_numbers(e)}", f"  obtained  {_numbers(o)}"]
    if e.numel() > 1:
        badness = torch.where(close, -1.0, ((o - e).abs() / (atol + rtol * e.abs())).nan_to_num(math.inf))
        worst = badness.flatten().argsort(descending=True)[: min(3, int((~close).sum()))].tolist()
        lines.append(f"  wrong at {int((~close).sum())} of {e.numel()} entries; the worst:")
        for index in worst:
            where = ", ".join(f"{name} {_numbers(value.detach().flatten()[index])}"
                              for name, value in (inputs or {}).items()
                              if hasattr(value, "detach") and value.numel() == e.numel())
            lines.append(f"    {where + ': ' if where else ''}expected {e.flatten()[index].item() + 0.0:.6g}, "
                         f"obtained {o.flatten()[index].item() + 0.0:.6g}")
    lines += [f"  (tolerance: |obtained - expected| <= {atol:g} + {rtol:g} |expected|)", f"  hint: {hint}"]
    raise AssertionError("\n".join(lines))


def load_stage(number):
    """Stage `number` as the tests see it: the learner's file if given, else ours."""
    learner_file = learner_path(number)
    return Stage(importlib.import_module(STAGES[number]), learner_file)


@pytest.fixture(scope="session")
def stage01():
    return load_stage(1)


@pytest.fixture(scope="session")
def stage02():
    return load_stage(2)


@pytest.fixture(scope="session")
def stage03():
    return load_stage(3)


@pytest.fixture(scope="session")
def stage04():
    return load_stage(4)


@pytest.fixture(scope="session")
def stage05():
    return load_stage(5)


@pytest.fixture(scope="session")
def stage06():
    return load_stage(6)


def write_tiny_coco(root, n_images, seed, size=48, names=("square", "disc", "bar")):
    """A small COCO-format dataset (JPEGs + instances JSON) of coloured shapes on noise.

    Category ids are deliberately non-contiguous (10, 20, 30, ...), and about one image in eight
    has no annotations, as in real data. Returns (image_dir, ann_file)."""
    import json

    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    root = Path(root)
    image_dir = root / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(n_images):
        pixels = rng.integers(0, 80, (size, size, 3), dtype=np.uint8)
        image = Image.fromarray(pixels)
        draw = ImageDraw.Draw(image)
        present = rng.random(len(names)) < 0.45
        for k in np.flatnonzero(present):
            x, y = rng.integers(2, size // 2, 2)
            s = int(rng.integers(size // 5, size // 2))
            colour = tuple(int(c) for c in rng.integers(120, 256, 3))
            box = [int(x), int(y), int(x) + s, int(y) + s]
            if names[k] == "disc":
                draw.ellipse(box, fill=colour)
            elif names[k] == "bar":
                draw.rectangle([box[0], box[1], box[2], box[1] + max(2, s // 4)], fill=colour)
            else:
                draw.rectangle(box, fill=colour)
            annotations.append({"id": len(annotations) + 1, "image_id": 100 + i,
                                "category_id": int(10 * (k + 1)), "bbox": [box[0], box[1], s, s],
                                "area": float(s * s), "iscrowd": 0})
        name = f"{i:05d}.jpg"
        image.save(image_dir / name, quality=90)
        images.append({"id": 100 + i, "file_name": name, "width": size, "height": size})
    categories = [{"id": 10 * (k + 1), "name": n, "supercategory": "shape"} for k, n in enumerate(names)]
    ann_file = root / "instances.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return image_dir, ann_file


@pytest.fixture(scope="session")
def tiny_coco(tmp_path_factory):
    """A train and a val split of `write_tiny_coco` (32 and 15 images), shared by the tests of a session."""
    root = tmp_path_factory.mktemp("tiny_coco")
    train_images, train_ann = write_tiny_coco(root / "train", 32, seed=1)
    val_images, val_ann = write_tiny_coco(root / "val", 15, seed=2)
    return {"train_images": train_images, "train_ann": train_ann, "val_images": val_images, "val_ann": val_ann}


def tiny_train_args(tiny_coco, out_dir, name, *extra, epochs=2):
    """05_train.py flags for a model and recipe small enough for a few seconds per epoch on a CPU:
    4 steps of 8 images per epoch, 64 px, a 0.4M-parameter backbone, d 32. On the CPU on every
    machine (the same results everywhere); the CUDA tests add "--device cuda", which wins."""
    return [
        "--train-images", str(tiny_coco["train_images"]), "--train-ann", str(tiny_coco["train_ann"]),
        "--val-images", str(tiny_coco["val_images"]), "--val-ann", str(tiny_coco["val_ann"]),
        "--preset", "demo", "--backbone", "test_resnet", "--no-pretrained", "--d-model", "32",
        "--num-heads", "2", "--dim-feedforward", "64", "--img-size", "64", "--batch-size", "8", "--epochs", str(epochs),
        "--workers", "0", "--amp", "off", "--deterministic", "--lr", "1e-3", "--device", "cpu",
        "--out-dir", str(out_dir), "--name", name, *extra,
    ]
