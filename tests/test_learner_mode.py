"""The learner-mode mechanism itself (tests/conftest.py).

A learner's file must be loaded under the stage's module name, missing names must skip in
learner mode but fail in the reference run, and a bad path must stop pytest with a message
that names the variable. End-to-end runs of a stage's real tests against a learner file live
beside those tests (see test_01_data.py).
"""

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import conftest
import pytest


def test_learner_file_is_loaded_under_the_stage_name(tmp_path, restore_stage_modules):
    mine = tmp_path / "my_loss.py"
    mine.write_text("ANSWER = 42\n")
    module = conftest.load_learner_file(4, mine)
    assert sys.modules["04_loss"] is module
    assert conftest.Stage(module, mine).ANSWER == 42


def test_missing_name_skips_for_a_learner_and_fails_for_the_reference(tmp_path, restore_stage_modules):
    mine = tmp_path / "my_loss.py"
    mine.write_text("ANSWER = 42\n")
    module = conftest.load_learner_file(4, mine)
    with pytest.raises(pytest.skip.Exception, match="my_loss.py does not define `AsymmetricLoss`"):
        conftest.Stage(module, mine).AsymmetricLoss
    with pytest.raises(AttributeError):
        conftest.Stage(module, None).AsymmetricLoss


def test_bad_learner_path_names_the_variable(tmp_path):
    with pytest.raises(pytest.UsageError, match="Q2L_STAGE_04=.*does not exist"):
        conftest.load_learner_file(4, tmp_path / "nope.py")


def test_learner_file_that_fails_to_import_is_reported(tmp_path, restore_stage_modules):
    mine = tmp_path / "broken.py"
    mine.write_text("raise RuntimeError('half-written')\n")
    with pytest.raises(pytest.UsageError, match="broken.py as stage 04_loss failed"):
        conftest.load_learner_file(4, mine)
    assert "04_loss" not in sys.modules or sys.modules["04_loss"].__file__ != str(mine)


def test_environment_variable_selects_the_file(tmp_path, monkeypatch):
    mine = tmp_path / "my_eval.py"
    monkeypatch.setenv("Q2L_STAGE_06", str(mine))
    assert conftest.learner_path(6) == mine.resolve()
    monkeypatch.delenv("Q2L_STAGE_06")
    assert conftest.learner_path(6) is None


def test_monkeypatch_through_the_stage_proxy_patches_and_restores_the_module(tmp_path, restore_stage_modules):
    """The proxy forwards set, delete and __dict__, so monkeypatch's undo restores the module's value
    (pytest >= 9.2 reads the old value from the target's __dict__ and deletes it on undo if absent)."""
    mine = tmp_path / "my_loss.py"
    mine.write_text("def build(): return 'original'\n")
    module = conftest.load_learner_file(4, mine)
    stage = conftest.Stage(module, mine)
    patch = pytest.MonkeyPatch()
    patch.setattr(stage, "build", lambda: "patched")
    assert module.build() == "patched"
    patch.undo()
    assert module.build() == "original"
    # A name the module lacks: through a reference-mode proxy (in learner mode, reading a missing name
    # skips the test, and monkeypatch reads the old value first).
    patch.setattr(conftest.Stage(module, None), "extra", 1, raising=False)
    assert module.extra == 1
    patch.undo()
    assert not hasattr(module, "extra")


# ------------------------------------------------------------------ lessons that teach (issue 15)

LEARNERS = Path(__file__).resolve().parent / "learners"


def run_pytest(*args, env=None):
    """pytest in a subprocess (learner files are loaded at configure time), from the repository root."""
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", *args]
    environment = {key: value for key, value in os.environ.items() if not key.startswith("Q2L_STAGE_")}
    environment.update(env or {})
    result = subprocess.run(command, cwd=conftest.ROOT, env=environment, capture_output=True, text=True, timeout=300)
    return result.returncode, result.stdout + result.stderr


def markers_of(module, marker):
    """{test function name: marker args} for the tests of `module` that carry `marker`."""
    found = {}
    for name, function in vars(module).items():
        for mark in getattr(function, "pytestmark", []):
            if name.startswith("test_") and mark.name == marker:
                found[name] = mark.args
    return found


def test_not_written_yet_is_recognised_only_in_the_learners_file(tmp_path, restore_stage_modules):
    mine = tmp_path / "my_loss.py"
    mine.write_text('def asymmetric_loss(logits, targets):\n    """ASL."""\n'
                    '    raise NotImplementedError("write this: ASL.")\n')
    module = conftest.load_learner_file(4, mine)
    with pytest.raises(NotImplementedError) as info:
        module.asymmetric_loss(None, None)
    assert conftest._not_written(info.value, {mine.resolve()}) == ("not written yet: asymmetric_loss", (str(mine), 3))
    assert conftest._not_written(info.value, {tmp_path / "other.py"}) is None
    other = NotImplementedError("write this: ASL.")  # raised here, not in the learner's file
    assert conftest._not_written(other, {mine.resolve()}) is None


def test_a_lesson_with_another_signature_gives_one_message(tmp_path, restore_stage_modules):
    mine = tmp_path / "my_loss.py"
    mine.write_text("import torch\n\ndef asymmetric_loss(logits, targets, gamma_neg, gamma_pos, clip):\n"
                    "    return torch.zeros(())\n\ndef bce(logits, targets, reduction='mean', check_targets=True,"
                    " extra=1):\n    return torch.zeros(())\n")
    module = conftest.load_learner_file(4, mine)
    problems = conftest.check_lesson_signatures(4, module, mine)
    assert len(problems) == 1 and problems[0].startswith("asymmetric_loss in my_loss.py has the signature (logits, "
                                                          "targets, gamma_neg, gamma_pos, clip)")
    assert "the tests call asymmetric_loss(logits, targets, gamma_neg=4.0" in problems[0]
    with pytest.raises(conftest.LessonSignatureError) as info:  # its tests report that one message
        module.asymmetric_loss(1, 2, gamma_neg=3.0, detach_focal_weight=False)
    assert conftest._not_written(info.value, {mine.resolve()}) == (
        "signature differs from the lesson's asymmetric_loss(logits, targets, gamma_neg=4.0, gamma_pos=0.0, "
        "clip=0.05, eps=1e-08, detach_focal_weight=True, reduction='sum', check_targets=True)", (str(mine), 3))
    assert module.bce(1, 2).item() == 0.0  # an extra argument with a default is compatible


def test_signature_problem_is_reported_once_and_its_tests_skip(tmp_path):
    mine = tmp_path / "my_loss.py"
    mine.write_text((LEARNERS / "naive_04_loss.py").read_text().replace(
        "detach_focal_weight=True, reduction=\"sum\", check_targets=True):\n    \"\"\"-(t",
        "reduction=\"sum\"):\n    \"\"\"-(t").replace("detach_focal_weight:", "False:"))
    code, out = run_pytest("tests/test_04_loss.py", "-k", "term", env={"Q2L_STAGE_04": str(mine)})
    assert code == 0, out
    assert out.count("stage 04: fix this first: asymmetric_loss in my_loss.py has the signature") == 1, out
    folded = re.findall(r"SKIPPED \[(\d+)\] .*my_loss.py:\d+: signature differs from the lesson's asymmetric_loss\(", out)
    assert len(folded) == 1 and int(folded[0]) > 1, out  # every test of it, folded into one line
    assert "TypeError" not in out


def test_naive_learner_passes_every_lesson_and_fails_only_stability_checks():
    import test_04_loss

    lessons, stability = markers_of(test_04_loss, "lesson"), markers_of(test_04_loss, "stability")
    code, out = run_pytest("tests/test_04_loss.py", "-vv", env={"Q2L_STAGE_04": str(LEARNERS / "naive_04_loss.py")})
    assert code == 1, out
    summary = re.search(r"stage 04 \(naive_04_loss.py\): (\d+) of (\d+) lesson checks pass\n", out)
    assert summary and summary.group(1) == summary.group(2), out
    failed = set(re.findall(r"^FAILED tests/test_04_loss.py::(\w+)", out, re.MULTILINE))
    assert failed and failed <= set(stability), failed - set(stability)
    for name in failed:  # each with what to change, under the stability heading
        assert f"  {name} (" in out and stability[name][0] in out, name
    # lessons ran from the simplest piece to the whole, stability checks after them
    ran = re.findall(r"^tests/test_04_loss.py::(\w+)", out, re.MULTILINE)
    assert ran, "no per-test lines parsed: the order check would prove nothing"
    orders = [lessons[name][0] if name in lessons else (1e9 if name in stability else 1e6) for name in ran]
    assert orders == sorted(orders), ran


def test_the_plus_clip_slip_is_named_with_its_inputs():
    code, out = run_pytest("tests/test_04_loss.py", "-m", "lesson",
                           env={"Q2L_STAGE_04": str(LEARNERS / "plus_clip_04_loss.py")})
    assert code == 1, out
    first = out[out.index("FAILURES"):].split("\n_")[1]  # the first failure's report
    assert "negative term with the shift m = 0.05" in first, first
    for part in ("logits    [-4.595", "p         [0.01, 0.04", "expected  [0, 0, 0.01005",
                 "obtained  [0.06188", "hint: the negative term: p_m = max(p - m, 0)"):
        assert part in first, (part, first)
    assert "next: negative term with the shift p_m = max(p - m, 0)" in out, out


# ------------------------------------------------------------------ stage 3: a learner's attention

SQRT_D = LEARNERS / "sqrt_d_03_transformer.py"


def test_the_sqrt_d_slip_is_named_with_its_inputs():
    code, out = run_pytest("tests/test_03_transformer.py", "-x", env={"Q2L_STAGE_03": str(SQRT_D)})
    assert code == 1, out
    first = out[out.index("FAILURES"):].split("\n_")[1]  # the first failure's report
    assert "test_attention_scores" in first and "MultiHeadAttention scores Q K^T / sqrt(dh)" in first, first
    for part in ("query     [", "shape (2, 3, 8)", "key       [", "sizes     {'d': 8, 'h': 2, 'dh': 4}",
                 "wrong at 48 of 48 entries", "hint: your scores are 0.707 = 1/sqrt(h) of the right ones: you divided "
                 "by sqrt(d) = 2.83; divide by sqrt(dh) = 2, the HEAD width"):
        assert part in first, (part, first)
    numbers = {name: [float(v) for v in re.search(rf"{name}  \[([^\]]*?), \.\.\.\]", first).group(1).split(", ")]
               for name in ("expected", "obtained")}
    for want, got in zip(numbers["expected"], numbers["obtained"], strict=True):  # the shown values: off by 1/sqrt(2)
        assert got == pytest.approx(want / math.sqrt(2), rel=2e-3, abs=1e-4), numbers
    assert re.search(r"stage 03 \(sqrt_d_03_transformer.py\): 1 of \d+ lesson checks pass; next: scores: "
                     r"Q K\^T / sqrt\(dh\), head by head \(test_attention_scores: fails\)", out), out


def test_a_correct_attention_passes_its_lessons_and_the_rest_skips(tmp_path):
    import test_03_transformer

    mine = tmp_path / "my_attention.py"
    source = SQRT_D.read_text()
    assert source.count("/ math.sqrt(d)  # the slip") == 1
    mine.write_text(source.replace("/ math.sqrt(d)  # the slip", "/ math.sqrt(dh)  # fixed"))
    code, out = run_pytest("tests/test_03_transformer.py", "-vv", env={"Q2L_STAGE_03": str(mine)})  # -q -vv: a line per test
    assert code == 0 and " failed" not in out, out
    lessons, stability = markers_of(test_03_transformer, "lesson"), markers_of(test_03_transformer, "stability")
    rows = re.findall(r"^tests/test_03_transformer.py::(\w+)(?:\[[^\]]*\])? (PASSED|SKIPPED|FAILED)", out, re.MULTILINE)
    assert len(rows) == int(re.search(r"(\d+) selected", out).group(1)), out  # every test, on a line of its own
    attention = [outcome for name, outcome in rows if name in lessons and lessons[name][0] <= 8]  # lessons 1-8
    assert attention and set(attention) == {"PASSED"}, rows
    summary = re.search(r"stage 03 \(my_attention.py\): (\d+) of \d+ lesson checks pass; next: encoder layer, "
                        r"post-norm: LayerNorm after the residual sum \(test_encoder_layer_post_norm: my_attention.py "
                        r"does not define `TransformerEncoderLayer` yet\)", out)
    assert summary and int(summary.group(1)) == len(attention), out  # every attention lesson, nothing more
    # the attention's stability checks pass too; the rest (layers not written, CUDA) skip
    strict = re.search(r"stage 03 stability and strictness: (\d+) of (\d+) pass, (\d+) skipped\n", out)
    assert strict and int(strict.group(1)) + int(strict.group(3)) == int(strict.group(2)), out
    orders = [lessons[name][0] if name in lessons else (1e9 if name in stability else 1e6) for name, _ in rows]
    assert orders == sorted(orders), rows  # from the simplest piece to the whole, stability checks last
