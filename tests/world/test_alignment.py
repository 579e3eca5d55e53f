"""run_trainer starts an independent trainer: launcher variables of this process (left by an
in-process run or a launcher) do not reach it, so parallel runs never share a MASTER_PORT."""

from __future__ import annotations

import subprocess

from snpo.world import alignment


def test_run_trainer_drops_launcher_variables(tmp_path, monkeypatch):
    seen = {}

    def fake_run(cmd, env=None, **kw):
        seen.update(env)
        return subprocess.CompletedProcess(cmd, 0)

    for name in alignment.LAUNCHER_VARIABLES:
        monkeypatch.setenv(name, "29500" if "PORT" in name else "0")
    monkeypatch.setattr(alignment.subprocess, "run", fake_run)
    alignment.run_trainer(tmp_path / "c.yaml", threads=1)
    assert seen["OMP_NUM_THREADS"] == "1"
    assert not set(alignment.LAUNCHER_VARIABLES) & set(seen)
