"""Tests for the data tools: tools/make_synthetic.py (the built-in set) and tools/bench_data.py.

The generator is a tool, not a lesson, so these tests import it directly (pytest's pythonpath
makes `tools` importable); the stage under test (`stage01`) only reads what it wrote.
"""

import json
import subprocess
import sys
from pathlib import Path

import conftest
import numpy as np
import pytest
from PIL import Image

from tools import bench_data, make_synthetic

TINY_RECIPE = dict(image_size=32, train_images=6, val_images=3)


def contents(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}


def test_built_in_dataset_is_deterministic_and_follows_its_recipe(stage01, tmp_path):
    recipe = make_synthetic.SyntheticRecipe(**TINY_RECIPE)
    assert make_synthetic.ensure_synthetic(tmp_path / "a", seed=1, recipe=recipe)[0] == "generated"
    make_synthetic.ensure_synthetic(tmp_path / "b", seed=1, recipe=recipe, workers=1)
    make_synthetic.ensure_synthetic(tmp_path / "c", seed=2, recipe=recipe)
    assert contents(tmp_path / "a") == contents(tmp_path / "b")  # same bytes whatever the worker count
    assert len(contents(tmp_path / "a")) == 6 + 3 + 3  # images, two JSON files, recipe.json
    assert contents(tmp_path / "a") != contents(tmp_path / "c")
    val = stage01.CocoMultiLabel(tmp_path / "a" / "val", tmp_path / "a" / "annotations" / "instances_val.json")
    assert val.labels.shape == (3, len(make_synthetic.SHAPES)) and val.class_names == list(make_synthetic.SHAPES)

    stamp = tmp_path / "a" / "recipe.json"
    before = stamp.stat().st_mtime_ns
    assert make_synthetic.ensure_synthetic(tmp_path / "a", seed=1, recipe=recipe)[0] == "found"
    assert stamp.stat().st_mtime_ns == before  # not redrawn
    changed = make_synthetic.SyntheticRecipe(**{**TINY_RECIPE, "clutter": 0})
    assert make_synthetic.ensure_synthetic(tmp_path / "a", seed=1, recipe=changed)[0] == "regenerated"
    assert json.loads(stamp.read_text())["recipe"]["clutter"] == 0
    assert not list(tmp_path.glob("*.tmp-*")), "the temporary folder is renamed or removed"


def test_built_in_dataset_is_a_real_multi_label_problem():
    recipe = make_synthetic.SyntheticRecipe()
    seen, sizes, cardinality = set(), [], []
    for i in range(60):
        image, scene, objects = make_synthetic.render_synthetic_image(recipe, np.random.default_rng([0, 0, i]))
        assert image.size == (recipe.image_size, recipe.image_size) and scene in make_synthetic.SCENES
        names = {name for name, _, _ in objects}
        seen |= names
        cardinality.append(len(names))
        for _, (x, y, w, h), area in objects:
            assert 0 <= x and 0 <= y and x + w <= recipe.image_size and y + h <= recipe.image_size
            assert 0 < area <= w * h
            sizes.append(max(w, h) / recipe.image_size)
    assert len(make_synthetic.SHAPES) >= 10 and len(seen) >= 10
    assert np.mean(cardinality) > 1.5  # several labels per image on average
    assert min(sizes) < 0.25 and max(sizes) > 0.5  # small and large objects


def run_tool(*args):
    return subprocess.run([sys.executable, "tools/make_synthetic.py", *map(str, args)], cwd=conftest.ROOT,
                          capture_output=True, text=True, timeout=120)


def test_command_line_draws_then_finds_the_set(tmp_path):
    flags = ["--root", tmp_path / "syn", "--seed", 3, "--image-size", 32, "--train-images", 4, "--val-images", 2]
    first, second = run_tool(*flags), run_tool(*flags)
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert "generated" in first.stdout and "found" in second.stdout
    recipe = json.loads((tmp_path / "syn" / "recipe.json").read_text())
    assert recipe["seed"] == 3 and recipe["recipe"]["train_images"] == 4
    assert recipe["hash"] == make_synthetic.recipe_hash(make_synthetic.SyntheticRecipe(**{**TINY_RECIPE, "train_images": 4, "val_images": 2}), 3)


def test_command_line_refuses_a_foreign_folder_and_a_bad_recipe(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "precious.txt").write_text("keep me")
    refused = run_tool("--root", tmp_path / "mine", "--train-images", 2, "--val-images", 1)
    assert refused.returncode == 2 and (tmp_path / "mine" / "precious.txt").read_text() == "keep me"
    assert run_tool("--root", tmp_path / "x", "--min-objects", 5, "--max-objects", 2).returncode == 2
    assert run_tool("--root", tmp_path / "x", "--train-image", 2).returncode == 2  # no abbreviations
    assert not (tmp_path / "x").exists()


@pytest.mark.hardening
def test_command_line_messages(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "precious.txt").write_text("keep me")
    refused = run_tool("--root", tmp_path / "mine")
    assert "refusing to overwrite it" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1


def test_write_jpegs_makes_coco_sized_images(tmp_path, stage01):
    bench_data.write_jpegs(tmp_path / "jpegs", 3)
    files = sorted((tmp_path / "jpegs").glob("*.jpg"))
    assert len(files) == 3 and all(Image.open(f).size == (640, 480) for f in files)
    assert 40_000 < np.mean([f.stat().st_size for f in files]) < 400_000  # about COCO's size
    ds = stage01.CocoMultiLabel(tmp_path / "jpegs", tmp_path / "jpegs" / "instances.json")
    assert len(ds) == 3 and ds.labels.shape == (3, 1)
