"""The error hierarchy: every class FaaSTube raises lives in faastube/errors.py, travels the
socket under its own name and comes back as the same class with the same message."""

import importlib
import inspect
import pkgutil

import pytest

from faastube import errors


def error_classes():
    return [cls for _name, cls in inspect.getmembers(errors, inspect.isclass)
            if issubclass(cls, errors.FaasTubeError) and cls.__module__ == errors.__name__]


def test_every_error_class_is_in_the_wire_table():
    assert set(error_classes()) == set(errors.WIRE_NAMES.values())
    assert all(errors.WIRE_NAMES[cls.__name__] is cls for cls in error_classes())


@pytest.mark.parametrize("cls", error_classes(), ids=lambda cls: cls.__name__)
def test_every_error_class_round_trips_the_wire(cls):
    sent = cls(f"what went wrong with {cls.__name__}")
    wire = errors.to_wire(sent)
    assert wire == {"error": cls.__name__, "message": str(sent)}
    back = errors.from_wire(wire["error"], wire["message"])
    assert type(back) is cls and str(back) == str(sent)


def test_an_error_of_a_class_not_in_the_table_travels_as_its_nearest_documented_class():
    class Private(errors.ObjectLostError):
        pass
    assert errors.to_wire(Private("gone"))["error"] == "ObjectLostError"
    assert type(errors.from_wire("NoSuchError", "x")) is errors.FaasTubeError


def test_no_other_module_defines_an_error_class():
    """(Exceptions that never leave their module, such as the shim's ActionExited or the
    table's WouldWait, are control flow, not errors FaaSTube raises.)"""
    strays = []
    for package in ("faastube", "controller", "shim"):
        root = importlib.import_module(package)
        for info in pkgutil.walk_packages(root.__path__, f"{package}."):
            if info.name == errors.__name__:
                continue
            module = importlib.import_module(info.name)
            strays += [f"{info.name}.{name}" for name, cls in inspect.getmembers(module, inspect.isclass)
                       if issubclass(cls, errors.FaasTubeError) and cls.__module__ == info.name]
    assert strays == []
