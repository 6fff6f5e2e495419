"""tools/exercise.py: a stage's lessons emptied into an exercise, and learner mode on it.

For every stage: straight from the generator, the stage's tests skip ("not written yet") and pytest
exits 0; with the reference bodies put back (by AST, from the stage's own file) everything passes in
learner mode. Stages 03 and 04 run in the normal suite; the others, whose tests take longer, are slow.
"""

import ast
import os
import re
import subprocess
import sys

import conftest
import pytest
from tools import exercise

ROOT = conftest.ROOT


def put_back(exercise_source, reference_source, names):
    """The exercise with each lesson's `raise NotImplementedError(...)` replaced by the reference body."""
    lines = exercise_source.splitlines(keepends=True)
    reference_lines = reference_source.splitlines(keepends=True)
    ours = exercise.lesson_nodes(ast.parse(exercise_source), names)
    theirs = exercise.lesson_nodes(ast.parse(reference_source), names)
    edits = []
    for name in names:
        span, reference_span = exercise.body_span(ours[name]), exercise.body_span(theirs[name])
        if span is not None:
            edits.append((span, reference_lines[reference_span[0] - 1:reference_span[1]]))
    for (first, last), body in sorted(edits, key=lambda edit: edit[0], reverse=True):
        lines[first - 1:last] = body
    return "".join(lines)


def run_stage_tests(files):
    """The stages' test files in learner mode on {stage: path} (a subprocess: learner files load at configure)."""
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rs",
               *[f"tests/test_{exercise.STAGES[stage]}.py" for stage in files]]
    env = {key: value for key, value in os.environ.items() if not key.startswith("Q2L_STAGE_")}
    env.update({f"Q2L_STAGE_{stage}": str(path) for stage, path in files.items()})
    # Tests that run the stage file as a script: from tmp_path it must still find the other stages, as
    # a learner's file in the repository root does.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    return result.returncode, result.stdout + result.stderr


def test_every_declared_lesson_exists_and_every_exercise_is_python():
    for stage, name in exercise.STAGES.items():
        source = (ROOT / f"{name}.py").read_text(encoding="utf-8")
        text = exercise.make_exercise(source, exercise.LESSONS[stage])  # raises if a lesson is missing
        tree = ast.parse(text)
        for lesson, node in exercise.lesson_nodes(tree, exercise.LESSONS[stage]).items():
            body = node.body[1:] if ast.get_docstring(node) else node.body
            assert len(body) == 1 and isinstance(body[0], ast.Raise), (stage, lesson)
            assert ast.get_docstring(node) == ast.get_docstring(
                exercise.lesson_nodes(ast.parse(source), [lesson])[lesson]), (stage, lesson)
        # everything that is not a lesson is kept as is, and the bodies go back exactly
        assert put_back(text, source, exercise.LESSONS[stage]) == source, stage


def test_the_exercise_keeps_plumbing_and_says_what_to_write():
    source = (ROOT / "04_loss.py").read_text(encoding="utf-8")
    text, name = exercise.exercise_for("04")
    assert name == "my_04_loss.py"
    assert 'raise NotImplementedError("write this: ASL of logits (B, K) against targets (B, K)' in text
    assert "def _check_options(" in text and "def _focusing_weight(" in text  # helpers that are not the lesson
    assert "def plot_shapes(" in text and source.split("def plot_shapes(")[1] in text  # plumbing, as is
    assert "L- = p_m^g- . log(1 - p_m)" in text  # the module docstring with its equations
    assert "log_p = -F.softplus(-x)" not in text  # the lesson's own code is gone


def test_command_line_writes_refuses_to_overwrite_and_prints_the_test_command(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    exercise.main(["4"])
    out = capsys.readouterr().out
    assert (tmp_path / "my_04_loss.py").is_file()
    assert "Q2L_STAGE_04=my_04_loss.py python -m pytest" in out and "test_04_loss.py" in out
    with pytest.raises(SystemExit) as stop:
        exercise.main(["04"])
    assert stop.value.code == 2 and "--force" in capsys.readouterr().err
    exercise.main(["04", "--force", "--out", str(tmp_path / "sub" / "mine.py")])
    assert (tmp_path / "sub" / "mine.py").is_file()
    with pytest.raises(SystemExit) as stop:
        exercise.main(["07"])
    assert stop.value.code == 2


@pytest.mark.parametrize("stages", [pytest.param(("03", "04"), id="03+04"),  # one run each way for both
                                    *[pytest.param((s,), id=s, marks=pytest.mark.slow) for s in ("01", "02", "05", "06")]])
def test_exercise_skips_then_reference_bodies_pass(stages, tmp_path):
    # The learner's files sit beside links to the other stages and tools/, as in the repository root
    # (stage 1 finds tools/make_synthetic.py next to its own file; stage 6's tests run it as a script).
    for path in [*ROOT.glob("0?_*.py"), ROOT / "tools"]:
        (tmp_path / path.name).symlink_to(path)
    exercises, restored = {}, {}
    for stage in stages:
        name = exercise.STAGES[stage]
        text, file_name = exercise.exercise_for(stage)
        exercises[stage] = tmp_path / file_name
        exercises[stage].write_text(text, encoding="utf-8")
        restored[stage] = tmp_path / f"back_{name}.py"  # the reference bodies put back by AST
        restored[stage].write_text(put_back(text, (ROOT / f"{name}.py").read_text(encoding="utf-8"),
                                            exercise.LESSONS[stage]), encoding="utf-8")
    code, out = run_stage_tests(exercises)
    assert code == 0, out
    assert " failed" not in out and " error" not in out, out
    for stage, path in exercises.items():
        assert f"{path.name}:" in out and "not written yet: " in out, out  # the folded skip lines
        if f"stage {stage} (" in out:  # stages with lesson checks: none passes before anything is written
            assert f"stage {stage} ({path.name}): 0 of " in out, out
    code, out = run_stage_tests(restored)
    assert code == 0, out
    assert "not written yet" not in out and " failed" not in out and " error" not in out, out
    for stage, path in restored.items():
        if f"stage {stage} (" in out:
            assert re.search(rf"stage {stage} \({path.name}\): (\d+) of \1 lesson checks pass\n", out), out
