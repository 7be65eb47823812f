"""One typed configuration (faastube/config.py): every variable the code reads is a field, its
default is written once, and the commands' flags are made from the fields."""

import dataclasses
import re
from pathlib import Path

import pytest

from faastube.cli import build_parser, settings_from
from faastube.config import Config, ShimConfig
from faastube.errors import InvalidArgumentError

ROOT = Path(__file__).resolve().parent.parent
SOURCES = [p for package in ("faastube", "controller", "shim") for p in (ROOT / package).rglob("*.py")]
VARIABLES = {f.metadata["env"] for cls in (Config, ShimConfig) for f in dataclasses.fields(cls)}
# Reading the environment by a variable's name: os.environ.get("X"), os.environ["X"], getenv("X").
READ = re.compile(r"""(?:os\.environ\.get\(|os\.environ\[|getenv\()\s*["']([A-Za-z_][A-Za-z0-9_]*)["']""")


def test_every_faastube_variable_the_code_names_is_a_setting():
    named = {name for path in SOURCES for name in re.findall(r"\bFAASTUBE_[A-Z_]+\b", path.read_text())}
    assert named and named <= VARIABLES, f"not settings: {sorted(named - VARIABLES)}"


def test_only_the_config_module_reads_settings_from_the_environment():
    reads = {(path.relative_to(ROOT).as_posix(), name) for path in SOURCES if path.name != "config.py"
             for name in READ.findall(path.read_text())}
    # The launcher sets and restores each activation's __OW_* values (the platform's
    # per-call contract), and reads back the one it set; that is no setting.
    assert {read for read in reads if not (read[0] == "shim/launcher.py" and read[1].startswith("__OW_"))} == set()


@pytest.mark.parametrize("cls", [Config, ShimConfig], ids=lambda c: c.__name__)
def test_each_setting_names_its_variable_once_and_reads_its_own_text(cls):
    fields = dataclasses.fields(cls)
    assert len({f.metadata["env"] for f in fields}) == len(fields)
    assert all(callable(f.metadata["parse"]) for f in fields)


def test_the_environment_overrides_defaults_and_flags_override_the_environment():
    env = {"FAASTUBE_SLAB_SIZE": "8MiB", "FAASTUBE_GPUS": "none", "FAASTUBE_SOCKET_MODE": "640"}
    assert Config.from_env({}).slab_size == 64 << 20
    from_env = Config.from_env(env)
    assert (from_env.slab_size, from_env.gpus, from_env.socket_mode) == (8 << 20, "none", 0o640)
    args = build_parser().parse_args(["controller", "--slab-size", "16MiB", "--idle-release", "2"])
    import os
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        config = settings_from(args, Config)
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    assert (config.slab_size, config.idle_release_s, config.gpus) == (16 << 20, 2.0, "none")


def test_every_controller_flag_is_a_setting_with_its_variable_in_the_help():
    controller = build_parser()._subparsers._group_actions[0].choices["controller"]
    flags = {a.option_strings[0]: a for a in controller._actions if a.option_strings and a.dest != "help"}
    expected = {f.metadata["flag"]: f for f in Config.flags()}
    assert set(flags) == set(expected)
    for flag, field in expected.items():
        assert flags[flag].dest == field.name and field.metadata["env"] in flags[flag].help


def test_a_bad_variable_is_refused_with_its_name_and_the_fix():
    with pytest.raises(InvalidArgumentError, match=r"FAASTUBE_SOCKET_MODE='rw' is not valid: write an octal"):
        Config.from_env({"FAASTUBE_SOCKET_MODE": "rw"})
    with pytest.raises(InvalidArgumentError, match=r"FAASTUBE_CONCURRENCY='0' is not valid: write a whole number"):
        ShimConfig.from_env({"FAASTUBE_CONCURRENCY": "0"})


def test_the_shim_runs_one_activation_at_a_time_unless_concurrency_is_allowed():
    assert ShimConfig.from_env({}).activations_at_once == 1
    assert ShimConfig.from_env({"__OW_ALLOW_CONCURRENT": "true"}).activations_at_once == 8
    assert ShimConfig.from_env({"K_SERVICE": "f", "FAASTUBE_CONCURRENCY": "3"}).activations_at_once == 3
    assert ShimConfig.from_env({"FAASTUBE_PLATFORM": "Knative"}).knative


def test_one_setting_can_be_read_alone_without_the_others_failing():
    env = {"FAASTUBE_LOG_MARKER": "m", "FAASTUBE_CONCURRENCY": "nonsense"}
    assert ShimConfig.read("log_marker", env) == "m"
    assert ShimConfig.read("port", env) == 8080 and ShimConfig.given("port", env) is None
