"""The lesson and the machinery, as the README's "Reading the code" promises: train_gpt2.py short
enough to read in one sitting, each machinery import saying what it defines, no import cycles."""

import ast
import glob
import os
import re
import tokenize

from helpers import ROOT

LESSON = os.path.join(ROOT, "train_gpt2.py")
MODULES = sorted(glob.glob(os.path.join(ROOT, "llmc", "*.py")))


def source(path):
    with open(path) as f:
        return f.read()


def test_the_lesson_is_short_and_its_loop_fits_a_screen():
    text = source(LESSON)
    assert len(text.splitlines()) <= 800
    main = next(node for node in ast.parse(text).body if isinstance(node, ast.FunctionDef) and node.name == "main")
    loop = next(node for node in ast.walk(main) if isinstance(node, ast.For))
    assert loop.end_lineno - loop.lineno + 1 <= 45


def defines_comment(lines, lineno):
    # the "# defines: ..." comment lines right above line `lineno` (1-based), joined
    comment, i = [], lineno - 2
    while i >= 0 and lines[i].lstrip().startswith("#"):
        comment.insert(0, lines[i].strip().lstrip("#").strip())
        i -= 1
    text = " ".join(comment)
    return text[text.index("defines:") + len("defines:"):] if "defines:" in text else None


def test_every_machinery_import_of_the_lesson_says_what_it_defines():
    text = source(LESSON)
    lines = text.splitlines()
    imports = [node for node in ast.parse(text).body
               if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "llmc"]
    assert imports
    for node in imports:
        defines = defines_comment(lines, node.lineno)
        assert defines is not None, f"line {node.lineno}: no '# defines:' comment above the import"
        said = set(re.findall(r"[A-Za-z_][A-Za-z_0-9]*", defines.split("(")[0]))
        assert said == {alias.name for alias in node.names}, f"line {node.lineno}: {said}"


def project_imports(path):
    # the llmc modules a file imports, anywhere in it (lazy imports inside functions too)
    found = set()
    for node in ast.walk(ast.parse(source(path))):
        if isinstance(node, ast.ImportFrom) and node.module == "llmc":
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("llmc."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {alias.name.split(".")[1] for alias in node.names if alias.name.startswith("llmc.")}
    return found


def test_no_import_cycles_among_the_modules():
    graph = {os.path.basename(path)[:-3]: project_imports(path) for path in MODULES}
    assert "train_gpt2" not in str(graph)  # the machinery never imports the lesson
    for path in MODULES:
        assert "import train_gpt2" not in source(path), path

    def reachable(start):
        seen, todo = set(), [start]
        while todo:
            for nxt in graph.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    for module in graph:
        assert module not in reachable(module), f"{module} imports itself through {graph[module]}"


def test_comments_fit_in_100_columns():
    for path in [LESSON, *MODULES]:
        with open(path) as f:
            for token in tokenize.generate_tokens(f.readline):
                if token.type == tokenize.COMMENT:
                    assert token.end[1] <= 100, f"{path}:{token.start[0]}: a comment to column {token.end[1]}"
