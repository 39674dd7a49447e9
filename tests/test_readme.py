"""README.md stays true to the code: every flag a `python X.py ...` command in it uses is one X.py --help lists."""
import contextlib
import importlib
import io
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMMAND = re.compile(r"python (\w+)\.py((?: [^\s`#]+)*)")


def readme_commands(text: str) -> list[tuple[str, str, list[str]]]:
    """(script, subcommand or '', flags) of every `python X.py ...` in the text; for bench.py the flags after a
    bare `--` are train.py's, listed as their own command."""
    out = []
    for script, args in COMMAND.findall(text):
        words = args.split()
        ours, theirs = (words[:words.index("--")], words[words.index("--") + 1:]) if "--" in words else (words, [])
        sub = ours[0] if ours and not ours[0].startswith("-") and script in ("bench", "dataset", "novelty") \
            and ours[0].isalpha() and ours[0] not in ("DATA",) else ""
        out.append((script, sub, [w.split("=")[0] for w in ours if w.startswith("--")]))
        if theirs:
            out.append(("train", "", [w.split("=")[0] for w in theirs if w.startswith("--")]))
    return out


def help_text(script: str, sub: str) -> str:
    module = importlib.import_module(script)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        module.main([sub, "--help"] if sub else ["--help"])
    return out.getvalue()


def test_readme_commands_are_found():
    found = readme_commands("run `python train.py --data X --epochs 3` then\n    python bench.py scale --images 9 -- "
                            "--width 8\n    python inference.py --image a.jpg  # --not-a-flag")
    assert found == [("train", "", ["--data", "--epochs"]), ("bench", "scale", ["--images"]),
                     ("train", "", ["--width"]), ("inference", "", ["--image"])]


def test_every_flag_in_the_readme_is_one_the_script_lists():
    commands = readme_commands((ROOT / "README.md").read_text())
    assert len(commands) > 30
    helps: dict[tuple[str, str], str] = {}
    unknown = []
    for script, sub, flags in commands:
        if not (ROOT / f"{script}.py").is_file():
            unknown.append(f"python {script}.py: no such script")
            continue
        text = helps.setdefault((script, sub), help_text(script, sub))
        unknown += [f"python {script}.py {sub} {flag}".replace("  ", " ") for flag in flags
                    if not re.search(rf"{re.escape(flag)}(?![\w-])", text)]
    assert unknown == []
