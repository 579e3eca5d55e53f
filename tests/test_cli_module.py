"""``python -m snpo`` behaves as the ``snpo`` console script."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_python_dash_m_snpo_is_the_console_script():
    r = subprocess.run(
        [sys.executable, "-m", "snpo", "--help"], cwd=REPO, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    assert "snpo train" in r.stdout and "snpo cache" in r.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "snpo", "no-such-tool"], cwd=REPO, capture_output=True, text=True
    )
    assert bad.returncode != 0 and "no-such-tool" in (bad.stdout + bad.stderr)
