"""Write one benchmark's section of docs/RESULTS.md, between its own markers, atomically.

Example:
    write_section("throughput", "Throughput of recipes.train", table_text)
"""

import os
import platform
from pathlib import Path

import keras
import tensorflow as tf

from cnnkit.runs import atomic_write_text

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "RESULTS.md"


def machine() -> str:
    """CPU, cores and library versions, for the line under each table."""
    with open("/proc/cpuinfo") as cpuinfo:
        cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")),
                   platform.processor())
    return f"{cpu}, {os.cpu_count()} cores; Python {platform.python_version()}, TF {tf.__version__}, Keras {keras.__version__}"


def write_section(name: str, title: str, body: str) -> Path:
    """Replace (or append) the section ``name`` of docs/RESULTS.md with ``body``."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{body.strip()}\n{end}"
    text = RESULTS.read_text() if RESULTS.exists() else "# Results\n"
    if start in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + f"\n\n## {title}\n\n{block}\n"
    atomic_write_text(RESULTS, text)
    return RESULTS
