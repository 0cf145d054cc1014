"""Writing one benchmark's section of benchmarks/RESULTS.md, keeping every other section."""

from __future__ import annotations

from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")


def write_section(text: str, path: Path = RESULTS) -> None:
    """Replace the section whose heading matches ``text``'s first line (up to `` (``) and keep the rest.

    A benchmark's heading may carry its settings in parentheses (``## Training-step overhead
    (resnet18, ...)``); a rerun with other settings still replaces its own earlier section.
    """
    key = text.splitlines()[0].split(" (")[0]
    existing = path.read_text() if path.exists() else "# Benchmarks\n"
    intro, *sections = existing.split("\n## ")
    kept = [intro] + [s for s in sections if not ("## " + s).startswith(key)]
    path.write_text("\n## ".join(kept).rstrip() + "\n\n" + text.rstrip() + "\n")
