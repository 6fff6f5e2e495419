"""Tests for the model-side tools: tools/official.py (official checkpoints) and tools/export.py.

The official key layout is checked against a key list of the official code's state dict; the
converter round trip against our own model written out in that layout by hand. The export test
builds a tiny model and checks that the torch.export program and the ONNX file (onnxruntime) give
the eager logits within 1e-5.
"""

import dataclasses
from pathlib import Path

import pytest
import torch
from test_03_transformer import ours_to_torch  # the tests' own copy of the packing rule

from tools import export as export_tool
from tools import official as official_tool

# The official implementation's state-dict layout (SlongLiu/query2labels) for a ResNet-18, d 512,
# feed-forward 1024, 1 encoder + 2 decoder layers, 80 classes: names, shapes, dtypes, kinds.
OFFICIAL_KEYS_FILE = Path(__file__).parent / "data" / "official_q2l_r18_keys.txt"


# * official checkpoints ---------------------------------------------------------------------------

def official_r18_config(stage03):
    return dataclasses.replace(stage03.PRESETS["official_r101"], num_classes=80, backbone="resnet18",
                               pretrained=False, d_model=512, dim_feedforward=1024)


def to_official_layout(state):
    """Our state dict written out in the official layout, by hand from its naming rules."""
    official = {}
    for key, value in state.items():
        if key.startswith("backbone.body."):
            official["backbone.0.body." + key[len("backbone.body."):]] = value
        else:
            official[key] = value
    official = ours_to_torch(official)
    official["backbone.1.pe"] = torch.zeros(1, 512, 7, 7)  # a fixed-size buffer we recompute
    return official


@pytest.fixture(scope="module")
def r18_pair(stage03):
    torch.manual_seed(0)
    source = stage03.Query2Label(official_r18_config(stage03)).eval()
    with torch.no_grad():  # make every tensor distinct from a fresh model's
        for p in source.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    official = to_official_layout(source.state_dict())
    return source, official


def test_official_layout_matches_the_key_list(r18_pair):
    _, official = r18_pair
    shapes = {k: tuple(v.shape) for k, v in official.items()}
    listed = {}
    for line in OFFICIAL_KEYS_FILE.read_text().splitlines():
        if line and not line.startswith("#"):
            name, shape = line.split("\t")[:2]
            listed[name] = tuple(int(s) for s in shape.split("x"))
    assert len(listed) == 142 and sum(k.startswith("backbone.0.body.") for k in listed) == 100
    assert shapes == listed


def test_converter_round_trip_gives_identical_outputs(stage03, r18_pair, tmp_path):
    source, official = r18_pair
    path = tmp_path / "official.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in official.items()}, "epoch": 3}, path)
    torch.manual_seed(1)
    target = stage03.Query2Label(official_r18_config(stage03)).eval()
    report = official_tool.load_official_checkpoint(target, path)
    assert report["missing"] == [] and report["unexpected"] == [] and report["unplaced"] == []
    assert report["dropped"] == ["module.backbone.1.pe"]
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(target(images), source(images))
    converted, _ = official_tool.convert_official_state_dict({"model": official})
    assert set(converted) == set(source.state_dict())


def test_converter_reports_missing_and_unplaced_keys(stage03, r18_pair, tmp_path):
    _, official = r18_pair
    broken = dict(official)
    del broken["fc.b"]
    broken["class_head.weight"] = torch.zeros(3)
    path = tmp_path / "broken.pth"
    torch.save(broken, path)
    model = stage03.Query2Label(official_r18_config(stage03))
    with pytest.raises(ValueError, match=r"(?s)class_head\.weight.*fc\.b|fc\.b.*class_head\.weight"):
        official_tool.load_official_checkpoint(model, path)  # both keys named: what to fix
    report = official_tool.load_official_checkpoint(model, path, strict=False)
    assert report["missing"] == ["fc.b"] and report["unplaced"] == ["class_head.weight"]
    assert torch.equal(model.fc.W, official["fc.W"])  # the rest was loaded


def test_converter_refuses_wrong_shapes_and_loads_nothing(stage03, r18_pair, tmp_path):
    _, official = r18_pair
    wrong = dict(official, **{"query_embed.weight": torch.zeros(81, 512)})
    path = tmp_path / "wrong.pth"
    torch.save(wrong, path)
    model = stage03.Query2Label(official_r18_config(stage03))
    before = model.fc.W.clone()
    with pytest.raises(ValueError, match=r"query_embed\.weight.*81, 512"):
        official_tool.load_official_checkpoint(model, path)
    assert torch.equal(model.fc.W, before)


@pytest.mark.hardening
def test_converter_errors_name_the_file_and_the_mistake(stage03, tmp_path):
    model = stage03.Query2Label(official_r18_config(stage03))
    with pytest.raises(ValueError, match="nope.pth"):  # stage 2's FileProblem, a ValueError
        official_tool.load_official_checkpoint(model, tmp_path / "nope.pth")
    with pytest.raises(ValueError, match="own checkpoints"):
        official_tool.convert_official_state_dict({"format": "q2l-checkpoint-v2", "model": model.state_dict()})



# * export -----------------------------------------------------------------------------------------

def tiny_demo_model(stage03, **changes):
    torch.manual_seed(0)
    config = dataclasses.replace(stage03.PRESETS["demo"], num_classes=5, d_model=32, num_heads=2,
                                 dim_feedforward=64, **changes)
    return stage03.Query2Label(config).eval()


@pytest.mark.parametrize("output_stride", [None, 8])
def test_export_program_and_onnx_give_the_eager_logits(stage03, tmp_path, output_stride):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model = tiny_demo_model(stage03, output_stride=output_stride)
    differences = export_tool.export_all(model, 64, tmp_path, check_batch=3)
    assert set(differences) == {str(tmp_path / "model.pt2"), str(tmp_path / "model.onnx")}
    assert all(d is not None and d <= 1e-5 for d in differences.values()), differences
    images = torch.randn(1, 3, 64, 64)  # another batch size than the one exported with
    with torch.no_grad():
        eager = model(images)
        program = torch.export.load(tmp_path / "model.pt2").module()
        torch.testing.assert_close(program(images), eager, atol=1e-5, rtol=0)
    torch.testing.assert_close(export_tool.onnx_logits(tmp_path / "model.onnx", images), eager, atol=1e-5, rtol=0)


def test_export_command_line_reads_a_training_checkpoint(stage03, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    import importlib
    import json

    evaluation = importlib.import_module("06_eval")
    model = tiny_demo_model(stage03)
    checkpoint = {"format": evaluation.CHECKPOINT_FORMAT, "model_config": dataclasses.asdict(model.config),
                  "class_names": list("abcde"), "model": model.state_dict(), "ema": None,
                  "data": {"img_size": 64}}
    torch.save(checkpoint, tmp_path / "best.pt")
    differences = export_tool.main(["--checkpoint", str(tmp_path / "best.pt"), "--out", str(tmp_path / "out")])
    assert all(d <= 1e-5 for d in differences.values()), differences
    meta = json.loads((tmp_path / "out" / "model.json").read_text())
    assert meta["img_size"] == 64 and meta["class_names"] == list("abcde")


@pytest.mark.hardening
def test_export_command_line_bad_checkpoint_is_one_line(tmp_path, capsys):
    (tmp_path / "x.pt").write_bytes(b"junk")
    with pytest.raises(SystemExit) as info:
        export_tool.main(["--checkpoint", str(tmp_path / "x.pt"), "--out", str(tmp_path / "out")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "x.pt" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_official_command_line_evaluates_a_converted_file(stage03, tiny_coco, tmp_path):
    """End to end: a tiny model in the official layout (test_resnet, d = C = 96, no input projection)
    is converted, loaded and scored by stage 6's evaluate on the tiny validation set."""
    config = dataclasses.replace(stage03.PRESETS["official_r101"], num_classes=3, backbone="test_resnet",
                                 pretrained=False, d_model=96, dim_feedforward=64)
    torch.manual_seed(0)
    source = stage03.Query2Label(config).eval()
    official = to_official_layout(source.state_dict())
    path = tmp_path / "checkpoint.pkl"
    torch.save({"state_dict": {"module." + k: v for k, v in official.items()}}, path)
    metrics, record, scores, _ = official_tool.main([
        "--checkpoint", str(path), "--val-images", str(tiny_coco["val_images"]), "--val-ann",
        str(tiny_coco["val_ann"]), "--backbone", "test_resnet", "--num-classes", "3", "--d-model", "96",
        "--dim-feedforward", "64", "--img-size", "64", "--workers", "0", "--device", "cpu"])
    assert scores.shape == (15, 3) and record["images"] == 15
    with torch.no_grad():  # the scores are the source model's own
        dataset = official_tool.data.CocoMultiLabel(tiny_coco["val_images"], tiny_coco["val_ann"],
                                                    official_tool.data.build_transforms(64, train=False))
        images = torch.stack([dataset[i][0] for i in range(len(dataset))])
        expected = torch.sigmoid(source(images)).numpy()
    assert abs(scores - expected).max() < 1e-5
