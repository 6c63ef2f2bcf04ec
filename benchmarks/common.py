"""Shared helpers for the performance benchmarks: timing, peak memory, model loading, result files.

Timing on a shared, noisy machine: every script times its variants interleaved in one process
(A B C A B C ...) and reports the median and the spread (min..max) of each, so background load hits all
variants alike and ratios stay meaningful even when absolute times drift.

Peak memory:
- CUDA: torch.cuda.max_memory_allocated after torch.cuda.reset_peak_memory_stats (live tensors only).
- CPU: the kernel's high-water mark of resident memory (VmHWM in /proc/self/status), reset by writing "5" to
  /proc/self/clear_refs just before the measured steps. Each variant runs in a fresh subprocess so nothing else
  is resident, and with MALLOC_MMAP_THRESHOLD_ fixed so that glibc serves every large tensor with mmap and
  returns it on free: RSS then follows the live tensors instead of what the heap happens to keep cached. We
  report the high-water mark above the resident size at reset (model, optimizer state and Python already
  resident), i.e. what the step itself adds at its peak, plus the absolute VmHWM.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
RESULTS_MD = Path(__file__).resolve().parent / "RESULTS.md"
PERF_TITLE = "## Performance"
PERF_BEGIN = "<!-- performance:begin -->"
PERF_END = "<!-- performance:end -->"

# Env for measuring subprocesses: fixed mmap threshold, so freed tensors leave RSS (see module docstring).
MEASURE_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ---------------------------------------------------------------------------------------------------------
# Device and memory
# ---------------------------------------------------------------------------------------------------------
def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak(device: torch.device | str) -> int:
    """Start a peak-memory window; returns the baseline in bytes (allocated on CUDA, RSS on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    return _status_kib("VmRSS") * 1024


def read_peak(device: torch.device | str) -> int:
    """Peak bytes since reset_peak (max allocated on CUDA, VmHWM on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return _status_kib("VmHWM") * 1024


def mib(n: float) -> float:
    return n / 2**20


# ---------------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------------
def time_once(fn: Callable[[], Any], device: torch.device | str) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def round_robin(
    fns: dict[str, Callable[[], Any]], repeats: int, progress: Callable[[int, dict], None] | None = None
) -> dict[str, list[Any]]:
    """What each fn returns, called round-robin (A B C, B C A, C A B, ...) `repeats` times.

    The order rotates every round so no variant always runs right after the same neighbour. `progress(i, out)`
    is called after round i.
    """
    names = list(fns)
    out: dict[str, list[Any]] = {name: [] for name in names}
    for i in range(repeats):
        k = i % len(names)
        for name in names[k:] + names[:k]:
            out[name].append(fns[name]())
        if progress is not None:
            progress(i, out)
    return out


def interleaved(
    fns: dict[str, Callable[[], Any]],
    repeats: int,
    device: torch.device | str,
    warmup: int = 1,
    progress: bool = False,
) -> dict[str, list[float]]:
    """Seconds per call of each fn, measured round-robin (see `round_robin`) after `warmup` rounds."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()

    def show(i: int, out: dict) -> None:
        done = ", ".join(f"{name} {out[name][-1]:.3f}s" for name in out)
        print(f"  round {i + 1}/{repeats}: {done}", file=sys.stderr, flush=True)

    timed = {name: (lambda fn=fn: time_once(fn, device)) for name, fn in fns.items()}
    return round_robin(timed, repeats, show if progress else None)


def summary(times: Sequence[float]) -> dict[str, float]:
    return {
        "median": statistics.median(times),
        "min": min(times),
        "max": max(times),
        "n": len(times),
    }


def ratio_spread(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, float]:
    """Median of per-round ratios a_i / b_i and their min, max: rounds share the load, so this is robust."""
    r = [x / y for x, y in zip(a, b, strict=True)]
    return statistics.median(r), min(r), max(r)


# ---------------------------------------------------------------------------------------------------------
# Environment, models, files
# ---------------------------------------------------------------------------------------------------------
def machine_info(device: str = "cpu") -> dict[str, Any]:
    import importlib.metadata as md

    cpu = platform.processor() or ""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                cpu = line.split(":", 1)[1].strip()
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    for pkg in ("transformers", "peft"):
        try:
            info[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            info[pkg] = None
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def smollm2_dir() -> Path:
    """The bundled SmolLM2-135M-Instruct as a Hugging Face folder (converted once and cached by abba_cli)."""
    from abba_cli.models.bundled import bundled_smollm2_dir

    return bundled_smollm2_dir()


def load_smollm2(dtype: torch.dtype = torch.float32, device: str = "cpu"):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir(), dtype=dtype)
    return model.to(device)


def load_smollm2_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir())


def run_json_subprocess(module: str, args: list[str], timeout: float | None = None) -> dict[str, Any]:
    """Run `python -m module args` from the checkout's root in a fresh interpreter (with MEASURE_ENV) and
    parse the JSON on its last line."""
    env = {**os.environ, **MEASURE_ENV}
    cmd = [sys.executable, "-m", module, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[1:])} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def arg_parser(doc: str | None) -> argparse.ArgumentParser:
    """Every script's parser: its module docstring (what it measures, how to run it) is its --help."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def finish(result: Any, out: Path | None, markdown: str | None = None) -> Any:
    """A script's last step: the JSON result to `out` (atomically, when --out was given) and its table on
    stdout. Returns `result`, so a script's main() can hand it to a caller."""
    if out is not None:
        write_json(out, result)
    if markdown:
        print(markdown)
    return result


def replace_marked_block(
    path: Path, begin: str, end: str, text: str, section: str, section_marks: tuple[str, str] | None = None
) -> None:
    """The one RESULTS.md writer: replace the text between `begin` and `end`; else add the marked block to the end
    of `section` (inside its `section_marks` when it has them; right under its title when not); else add the
    section at the end of the file. Nothing else in the file changes, and the file is replaced atomically."""
    block = f"{begin}\n{text.strip()}\n{end}"
    doc = path.read_text() if path.exists() else "# Results\n"
    if begin in doc and end in doc:
        head, rest = doc.split(begin, 1)
        _, tail = rest.split(end, 1)
        doc = head + block + tail
    elif section_marks is not None and section_marks[1] in doc:
        head, tail = doc.split(section_marks[1], 1)
        doc = head.rstrip() + "\n\n" + block + "\n" + section_marks[1] + tail
    elif section_marks is None and section in doc:
        head, tail = doc.split(section, 1)
        doc = f"{head}{section}\n\n{block}\n{tail}"
    else:
        body = block if section_marks is None else f"{section_marks[0]}\n{block}\n{section_marks[1]}"
        doc = doc.rstrip() + f"\n\n{section}\n\n{body}\n"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(doc)
    os.replace(tmp, path)


def update_results_block(key: str, text: str) -> None:
    """Replace (or append) the block `<!-- perf:KEY:begin -->...end` inside the "## Performance" section.

    Only this section is touched; other sections of RESULTS.md (the studies, for one) stay as they are.
    """
    begin, end = f"<!-- perf:{key}:begin -->", f"<!-- perf:{key}:end -->"
    replace_marked_block(RESULTS_MD, begin, end, text, PERF_TITLE, (PERF_BEGIN, PERF_END))
