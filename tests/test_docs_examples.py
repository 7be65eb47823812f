"""Every Python example in README.md and docs/ runs verbatim against a real controller, and
prints what its comments say. An example that cannot run here says so, with the reason, in an
HTML comment right above it: `<!-- not run: why -->`."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FENCE = re.compile(r"(?:<!-- not run: (?P<why>[^>]*?) -->\n)?```python\n(?P<code>.*?)```", re.DOTALL)
EXPECTED = re.compile(r"^print\(.*\)\s+# (?P<out>.+)$")


def examples():
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = path.read_text()
        for match in FENCE.finditer(text):
            line = text.count("\n", 0, match.start("code"))
            yield pytest.param(match["code"], match["why"], id=f"{path.name}:{line}")


ALL = list(examples())


def test_the_docs_have_python_examples_and_every_one_not_run_says_why():
    assert len(ALL) >= 3
    for param in ALL:
        code, why = param.values
        assert why is None or why.strip(), f"{param.id}: a 'not run' comment needs its reason"


@pytest.mark.parametrize("code, why", ALL)
def test_the_example_runs_verbatim_and_prints_what_it_says(code, why, controller, tmp_path):
    if why is not None:
        pytest.skip(f"the docs say it is not run here: {why}")
    script = tmp_path / "example.py"
    script.write_text(code)
    env = {**controller.env, "FAASTUBE_NAMESPACE": "test"}
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                            env=env, cwd=tmp_path, timeout=60)
    assert result.returncode == 0, result.stderr
    expected = [m["out"].strip() for m in map(EXPECTED.match, code.splitlines()) if m]
    assert result.stdout.splitlines() == expected
