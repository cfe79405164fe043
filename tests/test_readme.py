"""The README's Quick start runs as written (and does what its comments say)."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from helpers import requires_cpu_extension

import bmt_fast

README = Path(__file__).resolve().parent.parent / "README.md"


def quick_start() -> str:
    section = README.read_text().split("## Quick start", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "no python block under '## Quick start'"
    return match.group(1)


@requires_cpu_extension
def test_quick_start_runs():
    torch.manual_seed(0)
    names: dict = {}
    exec(compile(quick_start(), "README.md: Quick start", "exec"), names)  # noqa: S102 - the README's own code
    assert names["phi"].shape == names["x"].shape == (1000, 64)
    # SVGD on a standard normal: the particles spread to about unit variance around the origin
    particles = names["particles"].detach()
    assert particles.mean(0).abs().max() < 0.2 and 0.6 < float(particles.var(0).mean()) < 1.4
    assert names["phis"].shape == names["chains"].shape
    for chain, phi in zip(names["chains"], names["phis"]):
        torch.testing.assert_close(phi, bmt_fast.svgd_step(chain, -chain), rtol=0, atol=0)


def test_every_file_the_readme_names_under_configs_scripts_and_requirements_exists():
    """Paths the README gives in commands (`--config configs/...`, `bash scripts/...`, `-r requirements/...`)
    exist in the checkout (its first transfer command once named a configs/run.yaml that was never there)."""
    root = README.parent
    named = set(re.findall(r"(?<![\w/.-])((?:configs|scripts|requirements)/[\w./-]*\w)", README.read_text()))
    assert len(named) > 10, named
    missing = sorted(path for path in named if not (root / path).exists())
    assert not missing, missing
