"""Turn a stage into an exercise: its lesson functions emptied, everything else kept.

    python tools/exercise.py 04                  # writes my_04_loss.py in the current folder
    python tools/exercise.py 03 --out ex/mine.py # or where you say; --force to overwrite

The bodies of the stage's lesson functions and methods (LESSONS below, the one place they are
declared) become `raise NotImplementedError("write this: <first line of the docstring>")`; their
signatures and docstrings (equations, shapes, why) stay, and so does everything that is not the
lesson: imports, constants, helpers, plumbing, the self-check. Then test your file with the command
it prints: tests of functions you have not written yet skip ("not written yet: <name>"), written
ones pass or say what is wrong, and pytest ends with one progress line per stage.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the stages live one folder up

import argparse
import ast

ROOT = Path(__file__).resolve().parents[1]
STAGES = {"01": "01_data", "02": "02_backbone", "03": "03_transformer", "04": "04_loss",
          "05": "05_train", "06": "06_eval"}
# The lessons of each stage, in reading order: "function" or "Class.method".
LESSONS = {
    "01": ["build_label_matrix", "CocoMultiLabel.__getitem__", "CutMix.__call__"],
    "02": ["FrozenBatchNorm2d.forward", "Backbone.forward", "PositionEmbeddingSine.encode"],
    "03": ["MultiHeadAttention.forward", "TransformerEncoderLayer.forward_post", "TransformerEncoderLayer.forward_pre",
           "TransformerDecoderLayer.forward_post", "TransformerDecoderLayer.forward_pre", "GroupWiseLinear.forward",
           "Query2Label.forward_head"],
    "04": ["asymmetric_loss", "bce", "AsymmetricLoss.forward"],
    "05": ["train_one_epoch"],
    "06": ["average_precision", "threshold_metrics"],
}
PREFIX = "write this: "  # tests/conftest.py skips a test that reaches one of these raises


def lesson_nodes(tree, names, missing_ok=False):
    """{qualified name: FunctionDef} for `names` in a parsed module (top level and one class deep)."""
    found = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            found[node.name] = node
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    found[f"{node.name}.{item.name}"] = item
    missing = [name for name in names if name not in found]
    if missing and not missing_ok:
        raise KeyError(f"lesson(s) {', '.join(missing)} not found")
    return {name: found[name] for name in names if name in found}


def docstring_line(node, name):
    """First line of the function's docstring, or its qualified name."""
    doc = ast.get_docstring(node)
    return doc.strip().splitlines()[0].strip() if doc else name


def body_span(node):
    """(first, last) source lines (1-based) of the body after the docstring; None if there is none."""
    body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
            and isinstance(body[0].value.value, str):
        body = body[1:]
    if not body:
        return None
    return (body[0].lineno, body[-1].end_lineno)


def string_literal(text):
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def make_exercise(source, names):
    """The source with the bodies of `names` replaced by `raise NotImplementedError("write this: ...")`."""
    lines = source.splitlines(keepends=True)
    nodes = lesson_nodes(ast.parse(source), names)
    edits = []
    for name, node in nodes.items():
        span = body_span(node)
        if span is None:
            continue
        first, last = span
        if node.body[0].lineno == node.lineno:  # `def f(): return 1`: body on the def line
            raise ValueError(f"lesson {name}: its body shares the line of its def; put it on its own line")
        indent = lines[first - 1][: len(lines[first - 1]) - len(lines[first - 1].lstrip())]
        message = string_literal(PREFIX + docstring_line(node, name))
        edits.append((first, last, f"{indent}raise NotImplementedError({message})\n"))
    for first, last, text in sorted(edits, reverse=True):  # bottom-up, so line numbers stay valid
        lines[first - 1:last] = [text]
    result = "".join(lines)
    ast.parse(result)  # the exercise must still be Python
    return result


def exercise_for(stage, root=ROOT):
    """(exercise source, default file name) for stage "01".."06"."""
    name = STAGES[stage]
    source = (Path(root) / f"{name}.py").read_text(encoding="utf-8")
    return make_exercise(source, LESSONS[stage]), f"my_{name}.py"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("stage", help="stage number, 01 to 06 (or 1 to 6)")
    parser.add_argument("--out", type=Path, default=None,
                        help="file to write (default: my_<stage file name> in the current folder)")
    parser.add_argument("--force", action="store_true", help="overwrite the file if it exists (default: refuse)")
    args = parser.parse_args(argv)
    stage = args.stage.zfill(2)
    if stage not in STAGES:
        parser.exit(2, f"{parser.prog}: error: stage must be one of 01..06, got {args.stage!r}\n")
    text, default_name = exercise_for(stage)
    out = args.out or Path(default_name)
    if out.exists() and not args.force:
        parser.exit(2, f"{parser.prog}: error: {out} exists; pass --force to overwrite it, or --out another file\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    test_file = ROOT / "tests" / f"test_{STAGES[stage]}.py"
    try:
        test_file = test_file.relative_to(Path.cwd())
    except ValueError:
        pass
    print(f"wrote {out}: {STAGES[stage]}.py with {len(LESSONS[stage])} lessons to write: "
          f"{', '.join(LESSONS[stage])}")
    print("test it (untouched, every test skips: 'not written yet'):")
    print(f"  Q2L_STAGE_{stage}={out} python -m pytest {test_file}")


if __name__ == "__main__":
    main()
