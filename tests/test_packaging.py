"""The wheel carries conf/ and experiments/, and the console scripts are installed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile

import pytest
from omegaconf import OmegaConf

from conftest import REPO, require_shakespeare


@pytest.mark.slow
def test_experiments_work_from_an_installed_wheel(tmp_path):
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"), str(REPO)],
        capture_output=True, text=True, timeout=300,
    )
    assert built.returncode == 0, built.stderr
    wheel = next((tmp_path / "dist").glob("nanogpt-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "nanogpt/conf/train.yaml" in names and "nanogpt/conf/model/gpt2.yaml" in names
    assert "nanogpt/experiments/gpt2_124m.yaml" in names
    assert "hydra_plugins/nanogpt_launchers/launchers.py" in names and "nanogpt/conf/launcher/slurm.yaml" in names
    for wing in ("data", "parallel", "runs", "sweeps"):  # every subpackage of the layout (docs/architecture.md)
        assert f"nanogpt/{wing}/__init__.py" in names, wing

    # install the wheel alone into a folder and run it from elsewhere: no checkout on the path
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target)}
    result = subprocess.run(
        [sys.executable, "-c", "import nanogpt, sys; print(nanogpt.__file__); sys.argv[0] = 'nanogpt-train';"
         "from nanogpt.train import main; main()", "experiment=gpt2_124m", "--cfg", "job"],
        cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    first, rest = result.stdout.split("\n", 1)
    assert first.startswith(str(target))
    assert OmegaConf.create(rest).model.vocab_size == 50304

    # Hydra finds the sweep launchers of the installed wheel (it loads plugins from hydra_plugins only)
    plugins = subprocess.run(
        [sys.executable, "-c", "import sys; sys.argv[0] = 'nanogpt-train'; from nanogpt.train import main; main()",
         "--info", "plugins"], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120,
    )
    assert plugins.returncode == 0, plugins.stderr
    assert "\t\tSubmititLocalLauncher" in plugins.stdout  # only ours has this name
    assert "nanogpt_launchers" in plugins.stdout  # in the plugins' import times

    # the user's site file in the working dir is read from the wheel too (docs/sweeps.md)
    (elsewhere / "conf" / "site").mkdir(parents=True)
    (elsewhere / "conf" / "site" / "local.yaml").write_text("# @package hydra.launcher\npartition: ours\n")
    site = subprocess.run(
        [sys.executable, "-c", "import sys; sys.argv[0] = 'nanogpt-train'; from nanogpt.train import main; main()",
         "launcher=slurm", "--cfg", "hydra", "-p", "hydra.launcher.partition"],
        cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120,
    )
    assert site.returncode == 0 and site.stdout.strip() == "ours", site.stderr

    # and it trains: 20 steps of the default recipe, every module coming from the installed wheel
    shakespeare = require_shakespeare()
    trained = subprocess.run(
        [sys.executable, "-c", "import sys; sys.argv[0] = 'nanogpt-train'; from nanogpt.train import main; main()",
         f"data.source={shakespeare}", "data.dir=data", "max_iters=20", "eval_interval=10", "eval_iters=2",
         "log_interval=10", "hardware.peak_flops=1e11", "hydra.run.dir=run"],
        cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600,
    )
    assert trained.returncode == 0, trained.stderr
    assert (elsewhere / "run" / "DONE").is_file() and (elsewhere / "run" / "checkpoints" / "last.pt").is_file()
    steps = [json.loads(line)["step"] for line in (elsewhere / "run" / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 20
    loaded = subprocess.run([sys.executable, "-c", "import nanogpt.runs.checkpoint as c; print(c.__file__)"],
                            cwd=elsewhere, env=env, capture_output=True, text=True, timeout=60)
    assert loaded.stdout.startswith(str(target)), loaded.stdout + loaded.stderr


def test_console_scripts_are_installed():
    bindir = os.path.dirname(sys.executable)
    for script in ("nanogpt-train", "nanogpt-prepare", "nanogpt-sample", "nanogpt-eval", "nanogpt-bench", "nanogpt-report", "nanogpt-compare",
                   "nanogpt-gpu-check", "nanogpt-dashboard"):
        path = shutil.which(script, path=bindir)
        assert path, f"{script} is not installed: pip install -e ."
    result = subprocess.run([shutil.which("nanogpt-train", path=bindir), "--cfg", "job"],
                            capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode == 0 and "n_layer: 4" in result.stdout, result.stderr
