"""The learner-mode mechanism itself (tests/conftest.py).

A learner's file must be loaded under the stage's module name, missing names must skip in
learner mode but fail in the reference run, and a bad path must stop pytest with a message
that names the variable. End-to-end runs of a stage's real tests against a learner file live
beside those tests (see test_01_data.py).
"""

import sys

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
    patch.setattr(stage, "extra", 1, raising=False)
    assert module.extra == 1
    patch.undo()
    assert not hasattr(module, "extra")
