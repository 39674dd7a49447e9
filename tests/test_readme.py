"""README.md stays true to the code and short: every flag a `python X.py ...` command in it, in BENCHMARKS.md or in
docs/experiments/ uses is one X.py --help lists, every file its Outputs table names is written by `make demo`, every
local link leads to a file, and the guide and the results sheet fit their line budgets."""
import contextlib
import glob
import importlib
import io
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMMAND = re.compile(r"python (?:(\w+)\.py|-m (benchmarks\.\w+))((?: [^\s`#]+)*)")


def readme_commands(text: str) -> list[tuple[str, str, list[str]]]:
    """(script, subcommand or '', flags) of every `python X.py ...` and `python -m benchmarks.X ...` in the text
    (script: 'train', 'benchmarks.bench'); the flags after a bare `--` are train.py's (benchmarks.bench) or
    serve.py's (benchmarks.bench_serve), listed as their own command."""
    out = []
    for top, module, args in COMMAND.findall(text):
        script = top or module
        words = args.split()
        ours, theirs = (words[:words.index("--")], words[words.index("--") + 1:]) if "--" in words else (words, [])
        sub = ours[0] if ours and re.fullmatch(r"[a-z][a-z-]*", ours[0]) \
            and script in ("benchmarks.bench", "benchmarks.bench_labels", "benchmarks.bench_serve", "dataset") else ""
        out.append((script, sub, [w.split("=")[0] for w in ours if w.startswith("--")]))
        if theirs:
            out.append(("serve" if script == "benchmarks.bench_serve" else "train", "",
                        [w.split("=")[0] for w in theirs if w.startswith("--")]))
    return out


def help_text(script: str, sub: str) -> str:
    module = importlib.import_module(script)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        module.main([sub, "--help"] if sub else ["--help"])
    return out.getvalue()


def test_readme_commands_are_found():
    found = readme_commands("run `python train.py --data X --epochs 3` then\n    python -m benchmarks.bench scale "
                            "--images 9 -- --width 8\n    python inference.py --image a.jpg  # --not-a-flag\n"
                            "    python -m benchmarks.bench_serve screenshot --size 9,9 -- --threads 1\n"
                            "    python -m benchmarks.bench near-copies --copies 5")
    assert found == [("train", "", ["--data", "--epochs"]), ("benchmarks.bench", "scale", ["--images"]),
                     ("train", "", ["--width"]), ("inference", "", ["--image"]),
                     ("benchmarks.bench_serve", "screenshot", ["--size"]), ("serve", "", ["--threads"]),
                     ("benchmarks.bench", "near-copies", ["--copies"])]


DOCS = ["README.md", "BENCHMARKS.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs/experiments").glob("*.md"))]
LINK = re.compile(r"\]\(([^)#\s]+)\)")


@pytest.mark.parametrize("doc", DOCS)
def test_every_flag_in_the_docs_is_one_the_script_lists(doc):
    commands = readme_commands((ROOT / doc).read_text())
    assert len(commands) > (5 if doc in ("README.md", "BENCHMARKS.md") else 0)
    helps: dict[tuple[str, str], str] = {}
    unknown = []
    for script, sub, flags in commands:
        if not (ROOT / f"{script.replace('.', '/')}.py").is_file():
            unknown.append(f"python {script}.py: no such script")
            continue
        text = helps.setdefault((script, sub), help_text(script, sub))
        unknown += [f"python {script}.py {sub} {flag}".replace("  ", " ") for flag in flags
                    if not re.search(rf"{re.escape(flag)}(?![\w-])", text)]
    assert unknown == []


@pytest.mark.parametrize("doc, most", [("README.md", 250), ("BENCHMARKS.md", 400)])
def test_the_guide_and_the_results_sheet_fit_their_budget(doc, most):
    assert len((ROOT / doc).read_text().splitlines()) <= most


def test_local_links_lead_to_files_and_every_experiment_page_is_linked():
    assert LINK.findall("see [a](docs/x.md) and [b](https://e.org) and ![c](p.png)") == ["docs/x.md", "https://e.org",
                                                                                         "p.png"]
    broken, linked = [], set()
    for doc in DOCS:
        for target in LINK.findall((ROOT / doc).read_text()):
            if "://" in target:
                continue
            path = ((ROOT / doc).parent / target).resolve()
            linked.add(path)
            if not path.exists():
                broken.append(f"{doc}: {target}")
    assert broken == []
    pages = sorted((ROOT / "docs/experiments").glob("*.md"))
    assert len(pages) >= 5 and [p.name for p in pages if p.resolve() not in linked] == []


def outputs_table(text: str) -> list[str]:
    """The paths in the first column of README's Outputs table ("| file | what |")."""
    table = text.split("| file | what |", 1)[1].split("\n\n", 1)[0]
    return [re.findall(r"`([^`]+)`", row.split("|")[1])[0] for row in table.splitlines()[2:]]


def demo_commands(makefile: str) -> list[list[str]]:
    """The `make demo` recipe's command lines (continuations joined), $(PY) as this Python and the scripts by
    their path here, with $(DEMO) and $(UNKNOWN) as the Makefile sets them."""
    variables = dict(re.findall(r"^(\w+)\s*:=\s*(\S+)$", makefile, re.M))
    recipe = makefile.split("\ndemo: setup\n", 1)[1].split("\n\n", 1)[0].replace("\\\n", " ")
    commands = []
    for line in recipe.splitlines():
        line = line.replace("$(PY)", "PY")
        for name, value in variables.items():
            line = line.replace(f"$({name})", value)
        words = shlex.split(line)
        assert words[0] == "PY", line
        commands.append([sys.executable, str(ROOT / words[1]), *words[2:]])
    return commands


def test_outputs_table_and_demo_recipe_are_read():
    assert outputs_table("x\n\n| file | what |\n|---|---|\n| `models/a.pth` | b |\n| `cache/` | c `d` |\n\nend") == [
        "models/a.pth", "cache/"]
    commands = demo_commands("DEMO   := demo_data\n\ndemo: setup\n\t$(PY) dataset.py demo $(DEMO)\n"
                             "\t$(PY) train.py --data $(DEMO) \\\n\t\t--epochs 8\n\ntest:\n")
    assert commands == [[sys.executable, str(ROOT / "dataset.py"), "demo", "demo_data"],
                        [sys.executable, str(ROOT / "train.py"), "--data", "demo_data", "--epochs", "8"]]


@pytest.mark.slow
def test_make_demo_writes_every_file_the_readme_names(tmp_path):
    """Runs make demo's lines (2 epochs instead of 8) in an empty folder; each path of README's Outputs table,
    with demo's folders (models/demo, logs/demo, curves/demo) and <...> as any name, must then exist."""
    for command in demo_commands((ROOT / "Makefile").read_text()):
        if "--epochs" in command:
            command[command.index("--epochs") + 1] = "2"
        proc = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{command}: {proc.stdout[-2000:]} {proc.stderr[-2000:]}"
    named = outputs_table((ROOT / "README.md").read_text())
    assert len(named) >= 10 and "models/best_model.pth" in named
    missing = []
    for path in named:
        demo = re.sub(r"^(models|logs|curves)/", r"\1/demo/", path)
        if not glob.glob(str(tmp_path / re.sub(r"<[^>]+>", "*", demo))):
            missing.append(path)
    assert missing == []
