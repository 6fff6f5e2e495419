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
"""

import importlib
import importlib.util
import os
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
    # Load learner files before collection, so a test module's own imports see them too.
    config._q2l_learner = {}
    for number in STAGES:
        path = learner_path(number)
        if path is not None:
            load_learner_file(number, path)
            config._q2l_learner[number] = path


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
    return [_versions()] + [f"q2l: learner mode: stage {STAGES[n]} <- {p}" for n, p in sorted(learner.items())]


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
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)


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
        "--heads", "2", "--ff", "64", "--img-size", "64", "--batch-size", "8", "--epochs", str(epochs),
        "--workers", "0", "--amp", "off", "--deterministic", "--lr", "1e-3", "--device", "cpu",
        "--out-dir", str(out_dir), "--name", name, *extra,
    ]
