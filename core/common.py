"""Small pieces every script shares: the user-error type, split names, image extensions, device choice, atomic
writes, where a benchmark's figures come from (command, commit, date, machine) and their Markdown tables. The
bottom of the import graph: it imports no other module of this project.

Usage (from other scripts):
    raise UserError("no dataset at ...")      # a @reports_user_errors main() prints it as one line, exit code 2
    device = pick_device("auto")              # cuda, then mps, then cpu
    save_atomic(obj, "models/last.pth")       # the old file or the new one, never half of one
    text = markdown_table(["clients", "requests/s"], rows) + "\n" + markdown_source(provenance("train.py", argv))
"""
from __future__ import annotations

import contextlib
import datetime
import functools
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

SPLITS = ("train", "val", "test")
# Folder names (and table values) read as each split, compared lower-case with '-' and ' ' as '_' (loading/layout.py).
SPLIT_ALIASES = {
    "train": ("train", "training", "training_set", "train_set", "trn"),
    "val": ("val", "valid", "validation", "val_set", "dev"),
    "test": ("test", "testing", "test_set", "eval"),
}
# The file extensions read as images (in any case), and the PIL format each should hold (check_data.py names
# mismatches). .jfif is what browsers often save a JPEG as; .jpe is an old JPEG extension.
FORMATS_BY_SUFFIX = {".jpg": "JPEG", ".jpeg": "JPEG", ".jpe": "JPEG", ".jfif": "JPEG", ".png": "PNG", ".bmp": "BMP",
                     ".webp": "WEBP", ".gif": "GIF", ".tif": "TIFF", ".tiff": "TIFF", ".ppm": "PPM", ".pgm": "PPM"}
IMAGE_EXTENSIONS = set(FORMATS_BY_SUFFIX)


def is_hidden(name: str) -> bool:
    """.DS_Store, .ipynb_checkpoints, __MACOSX: never images, classes or splits."""
    return name.startswith(".") or name.startswith("__")


class UserError(Exception):
    """A mistake the user can fix (bad path, no checkpoint yet...): printed as one line, no traceback."""


PROJECT_DIR = Path(__file__).resolve().parents[1]  # where the scripts are


def split_at_dashes(argv: list[str]) -> tuple[list[str], list[str]]:
    """A command line's own flags and those after a bare `--`, which it passes on (to train.py, serve.py)."""
    argv = list(argv)
    return (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])


def program(name: str) -> list[str]:
    """The command line that runs a program of this project: a top-level script by its path (train.py), a module
    of a package with -m (benchmarks.baseline; program_env puts the project on its import path)."""
    if name.endswith(".py"):
        return [sys.executable, str(PROJECT_DIR / name)]
    return [sys.executable, "-m", name]


def program_env() -> dict[str, str]:
    """The environment for `program`: ours, with the project first on PYTHONPATH, wherever the caller's cwd is."""
    paths = [str(PROJECT_DIR)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


def run_script(script: str, args: list[str], stdout=None) -> subprocess.CompletedProcess:
    """`python SCRIPT ARGS` (a program of this project, see `program`) in a process of its own, as a user runs
    it: how one program uses another, never by importing it. Its stdout goes to `stdout` (default: ours;
    subprocess.PIPE to read it); a failure is a UserError."""
    proc = subprocess.run([*program(script), *args], stdout=stdout, text=True, env=program_env())
    if proc.returncode != 0:
        raise UserError(f"{script} failed (exit {proc.returncode}; its output is above)")
    return proc


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), so that figures from different machines are not compared."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_isa(flags: str | None = None) -> str:
    """The vector instructions that set a CPU's speed here (bf16 training, INT8 kernels), from /proc/cpuinfo's
    flags (or `flags`): 'AVX512 VNNI BF16', 'AVX512 VNNI', 'AVX512', 'AVX2 only' or 'unknown'."""
    if flags is None:
        with contextlib.suppress(OSError):
            flags = next((line.split(":", 1)[1] for line in Path("/proc/cpuinfo").read_text().splitlines()
                          if line.startswith("flags")), None)
    if not flags:
        return "unknown"
    have = set(flags.split())
    if "avx512f" not in have:
        return "AVX2 only" if "avx2" in have else "no AVX2"
    return " ".join(["AVX512"] + [name for flag, name in (("avx512_vnni", "VNNI"), ("avx512_bf16", "BF16"))
                                  if flag in have])


def machine() -> dict:
    """What a benchmark ran on: CPU model and its vector instructions, cores, torch's threads, memory, GPU, Python
    and torch versions."""
    return {"cpu": cpu_model(), "cpu_isa": cpu_isa(), "cpu_cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "python": platform.python_version(), "torch": torch.__version__}


def git_commit() -> str:
    """This checkout's commit (short hash), with '+changes' when tracked files other than Markdown documents
    differ from it (the code measured is not the commit's); 'unknown' outside a git checkout."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=PROJECT_DIR, capture_output=True, text=True, check=True).stdout
    try:
        changed = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)*.md")
        return git("rev-parse", "--short", "HEAD").strip() + ("+changes" if changed else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def provenance(script: str, argv: list[str]) -> dict:
    """Where a figure comes from: the command that printed it (`script` as `program` takes it: train.py, or
    benchmarks.bench for python -m), the commit, the date (UTC) and the machine."""
    run = [script] if script.endswith(".py") else ["-m", script]
    return {"command": shlex.join(["python", *run, *argv]), "commit": git_commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"), "machine": machine()}


def markdown_source(prov: dict) -> str:
    """One line for under a Markdown table: the command, commit, date and machine (provenance()'s keys)."""
    m = prov["machine"]
    isa = f" ({m['cpu_isa']})" if m.get("cpu_isa") else ""
    return (f"`{prov['command']}` at commit {prov['commit']}, {prov['date']}; {m['cpu']}{isa}, {m['cpu_cores']} cores "
            f"({m['torch_threads']} torch threads), {m['memory_gb']} GB, GPU: {m['cuda'] or 'none'}; "
            f"torch {m['torch']}")


def figures_report(script: str, argv: list[str], tables: str, figures: dict) -> str:
    """What a benchmark prints: its Markdown tables, the line with the command, commit, date and machine under
    them, then the same figures as one JSON object."""
    prov = provenance(script, argv)
    return tables + "\n\n" + markdown_source(prov) + "\n\n" + json.dumps({**prov, **figures}, indent=2)


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A Markdown table; the first column left-aligned, the others right-aligned."""
    lines = ["| " + " | ".join(map(str, header)) + " |", "|---|" + "---:|" * (len(header) - 1)]
    return "\n".join(lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows])


def reports_user_errors(main):
    """For a script's main(argv=None): a UserError raised anywhere in it is written as 'error: <message>' to
    stderr, with no traceback, and main returns 2: the scripts' one error handler, the one place this library
    writes to a stream."""
    @functools.wraps(main)
    def run(argv: list[str] | None = None) -> int:
        try:
            return main(argv)
        except UserError as e:
            sys.stderr.write(f"error: {e}\n")
            return 2
    return run


def pick_device(name: str) -> torch.device:
    """`auto` picks cuda, then mps, then cpu; a named device is checked where that is cheap."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for, but this PyTorch sees no CUDA GPU; use --device cpu")
    return torch.device(name)


TEMP_PREFIX, TEMP_SUFFIX = ".", ".tmp"  # save_atomic writes .NAME.<random>.tmp beside NAME


def save_atomic(obj: dict, path: str | Path) -> None:
    """torch.save to a temp file in the same folder, fsync, then rename: a crash leaves the old or the new file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{TEMP_PREFIX}{path.name}.", suffix=TEMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    # fsync the folder so the rename itself survives a power cut.
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def remove_stale_temp_files(folder: str | Path, name_pattern: str = "*") -> None:
    """Delete save_atomic's temp files left in `folder` by a process killed while saving."""
    for stale in Path(folder).glob(f"{TEMP_PREFIX}{name_pattern}.*{TEMP_SUFFIX}"):
        stale.unlink(missing_ok=True)


# ---------------------------------------------------------------- precision

def cpu_has_bf16() -> bool:
    """True on CPUs with native bf16 math (AVX512-BF16 or AMX), where bf16 autocast trains faster; elsewhere
    PyTorch emulates bf16 and it is slower than fp32. These checks are private to torch.cpu, hence the getattr."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if check is not None)


def pick_amp_dtype(device: torch.device, enabled: bool) -> torch.dtype | None:
    """The autocast dtype for --amp on this device, or None for plain fp32."""
    if not enabled:
        return None
    if device.type == "cuda":
        # Only where the GPU computes bf16 natively (Ampere and later): T4/V100-class cards emulate it, slowly.
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    if device.type == "cpu" and cpu_has_bf16():
        return torch.bfloat16
    return None


def needs_grad_scaler(amp_dtype: torch.dtype | None) -> bool:
    """fp16 gradients underflow without loss scaling; bf16 has fp32's range and fp32 needs none."""
    return amp_dtype == torch.float16


def precision_name(amp_dtype: torch.dtype | None) -> str:
    """What the start-up line says about the arithmetic: 'fp32', 'bf16 autocast' or 'fp16 autocast + GradScaler'."""
    if amp_dtype is None:
        return "fp32"
    name = {torch.bfloat16: "bf16", torch.float16: "fp16"}[amp_dtype] + " autocast"
    return name + (" + GradScaler" if needs_grad_scaler(amp_dtype) else "")
