"""`bmt-fast` with only bmt_fast's own dependencies (torch, numpy): the kernels' users install no trainer. Its
help and `bench` work there, and a trainer command says which package is missing and how to install the
trainer's, instead of a traceback."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest
from helpers import import_blocker, subprocess_env

from bmt_fast import cli

# A child interpreter where the trainer's packages are not installed: importing one fails as it would there.
WITHOUT_TRAINER = import_blocker(f'name.split(".")[0] in {sorted(cli.TRAINER_PACKAGES)!r}') + """
from bmt_fast import cli
sys.exit(cli.main(sys.argv[1:]))
"""


def run_without_trainer(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WITHOUT_TRAINER, *args], env=subprocess_env(), capture_output=True,
                          text=True, timeout=600)  # fmt: skip


def test_help_lists_every_command_without_the_trainer():
    run = run_without_trainer("--help")
    assert run.returncode == 0, run.stderr
    for name in ("source", "target", "transfer", "eval", "plot", "bench", "demo", "info"):
        assert name in run.stdout


@pytest.mark.parametrize("args", [("source", "--config", "run.yaml"), ("plot", "a-run"), ("demo", "--quick")])
def test_a_trainer_command_without_the_trainer_names_what_to_install(args):
    run = run_without_trainer(*args)
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr, run.stderr
    assert f"bmt-fast {args[0]}: error: No module named" in run.stderr
    assert "bmt_fast[train]" in run.stderr and "requirements/train.txt" in run.stderr


def test_other_missing_modules_still_raise(monkeypatch):
    """Only the trainer's packages get the one-line message: any other missing module is a bug to see whole."""

    def broken(args: argparse.Namespace) -> int:
        raise ModuleNotFoundError("No module named 'not_a_dependency'", name="not_a_dependency")

    monkeypatch.setitem(cli.COMMANDS, "broken", cli.Command("broken", "raises", lambda parser: None, broken))
    with pytest.raises(ModuleNotFoundError, match="not_a_dependency"):
        cli.main(["broken"])


def test_info_reports_the_build_as_text_and_as_json():
    """`bmt-fast info` (as `python -m bmt_fast.info`, which had ignored its arguments, --help included):
    the same facts as text and, with --json, as one JSON object; without the trainer's packages too."""
    import json

    run = run_without_trainer("info")
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("bmt_fast ") and "available backends:" in run.stdout
    run = run_without_trainer("info", "--json")
    assert run.returncode == 0, run.stderr
    facts = json.loads(run.stdout)
    assert "cpu" in facts["available_backends"] and facts["torch"] == __import__("torch").__version__
    module = subprocess.run([sys.executable, "-m", "bmt_fast.info", "--bad"], env=subprocess_env(),
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert module.returncode == 2 and "unrecognized arguments: --bad" in module.stderr
    optimised = subprocess.run([sys.executable, "-OO", "-m", "bmt_fast.info", "--json"], env=subprocess_env(),
                               capture_output=True, text=True, timeout=600)  # fmt: skip
    assert optimised.returncode == 0 and json.loads(optimised.stdout)["bmt_fast"], optimised.stderr[-2000:]
