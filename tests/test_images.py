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

import faastube

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
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapped = setuptools.get("package-dir", {})
    copied = {source for sources in re.findall(r"^COPY\s+(.+)\s+\S+$", dockerfile.read_text(), re.MULTILINE)
              for source in sources.split()}
    for package in setuptools["packages"]:
        top, _, rest = package.partition(".")
        folder = Path(mapped.get(top, top), *rest.split(".") if rest else ())
        assert any(folder == Path(c) or Path(c) in folder.parents for c in copied), \
            f"{dockerfile.name} does not copy {folder} (package {package})"
    assert "image-constraints.txt" in copied and "-c image-constraints.txt" in dockerfile.read_text()


def test_image_pins_are_the_projects_dependencies_inside_their_ranges():
    """image-constraints.txt pins every dependency the images install, once, inside the range
    pyproject.toml gives it: one source of truth for what an image runs."""
    import tomllib

    from packaging.requirements import Requirement
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["cuda"]
                + project["optional-dependencies"]["controller-gpu"]]
    ranges = {}
    for requirement in declared:
        ranges.setdefault(requirement.name.lower(), []).append(requirement.specifier)
        if "hiredis" in requirement.extras:
            ranges.setdefault("hiredis", [])
    pins = {}
    for line in (ROOT / "image-constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"{line!r}: pin an exact version"
            assert name.lower() not in pins, f"{name} pinned twice"
            pins[name.lower()] = version
    assert set(pins) == set(ranges), (set(ranges) - set(pins), set(pins) - set(ranges))
    for name, version in pins.items():
        for specifier in ranges[name]:
            assert specifier.contains(version), f"{name}=={version} is outside pyproject's {specifier}"


def test_the_controller_image_runs_as_the_user_and_group_the_kits_expect():
    text = (ROOT / "Dockerfile").read_text()
    assert "USER 10001:10002" in text and "--gid 10002 faastube-clients" in text
    assert '".[controller-gpu]"' in text          # NVML (topology) and the VMM bindings


BUILD = ROOT / "scripts" / "build-images"


def fake_docker(tmp_path, engine=True):
    """A stand-in for the Docker CLI (no engine here): `docker info` answers as an engine
    that is up or down, every other call is logged one per line."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    docker = bin_dir / "docker"
    docker.write_text(f"""#!/bin/sh
[ "$1" = info ] && exit {0 if engine else 1}
echo "$@" >> {tmp_path / "docker.log"}
""")
    docker.chmod(0o755)
    return {"PATH": f"{bin_dir}:/usr/bin:/bin"}


def test_build_images_builds_the_three_images_in_order_with_the_version_tag(tmp_path):
    result = subprocess.run([str(BUILD), "--prefix", "ghcr.io/me"], env=fake_docker(tmp_path),
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    calls = (tmp_path / "docker.log").read_text().splitlines()
    version = faastube.__version__
    builds = [c.split() for c in calls if c.startswith("build ")]
    assert [b[4] for b in builds] == [f"ghcr.io/me/faastube-{n}:{version}" for n in ("controller", "runtime", "examples")]
    for build in builds:
        assert build[1] == "-f" and Path(build[2]).is_file() and build[3] == "-t" and build[5] == str(ROOT)
    # The examples image starts FROM the runtime image under its default name.
    assert f"FROM faastube/faastube-runtime:{version}" in (ROOT / "knative" / "Dockerfile.examples").read_text()
    assert calls.index(f"tag ghcr.io/me/faastube-runtime:{version} faastube/faastube-runtime:{version}") < \
        calls.index(" ".join(builds[2]))
    assert not any(c.startswith("push") for c in calls)


@pytest.mark.parametrize("engine, args, message", [
    (None, [], "no docker command here"),
    (False, [], "docker cannot reach a Docker engine"),
    (True, ["--prefix"], "--prefix needs a value"),
    (True, ["--bogus"], "usage: scripts/build-images"),
])
def test_build_images_says_what_is_missing(tmp_path, engine, args, message):
    env = {"PATH": "/usr/bin:/bin"} if engine is None else fake_docker(tmp_path, engine)
    result = subprocess.run([str(BUILD), *args], env=env, capture_output=True, text=True)
    assert result.returncode in (1, 2) and message in result.stderr
    assert not (tmp_path / "docker.log").exists()
