"""Container images: lint the Dockerfiles and check that what they copy and run exists.

Docker has no engine on CI machines, so images are built elsewhere; here we lint them
(hadolint) and run their entrypoints outside a container (the controller fixture runs
`faastube controller`, the image's entrypoint, in every controller test).
"""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILES = [ROOT / "Dockerfile", ROOT / "runtime-image" / "Dockerfile", ROOT / "knative" / "Dockerfile.examples"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_dockerfile_passes_hadolint(dockerfile):
    hadolint = shutil.which("hadolint")
    assert hadolint, "hadolint is a test dependency: pip install -e '.[test]'"
    result = subprocess.run([hadolint, "--no-color", str(dockerfile)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_dockerfile_copies_files_that_exist_and_runs_our_cli(dockerfile):
    text = dockerfile.read_text()
    for sources in re.findall(r"^COPY\s+(?!--from=)(.+)\s+\S+$", text, re.MULTILINE):   # not from a stage
        for source in sources.split():       # images are built from the repository root
            assert (ROOT / source).exists(), f"{dockerfile.name} copies missing {source}"
    if "ENTRYPOINT" not in text:
        return                          # builds on an image that has one (Dockerfile.examples)
    entrypoint = re.search(r'^ENTRYPOINT \["faastube", "(\w+)"\]', text, re.MULTILINE)
    assert entrypoint, "the image's entrypoint must be a faastube subcommand"
    from faastube.cli import build_parser
    assert entrypoint.group(1) in build_parser()._subparsers._group_actions[0].choices


@pytest.mark.parametrize("dockerfile", DOCKERFILES[:2], ids=lambda p: str(p.relative_to(ROOT)))
def test_images_that_install_the_project_copy_every_package_it_declares(dockerfile):
    # `pip install .` fails when a package pyproject.toml lists is missing from the context.
    import tomllib
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    copied = {Path(source).name for sources in re.findall(r"^COPY\s+(.+)\s+\S+$", dockerfile.read_text(), re.MULTILINE)
              for source in sources.split()}
    assert set(packages) <= copied, f"{dockerfile.name} does not copy {set(packages) - copied}"
