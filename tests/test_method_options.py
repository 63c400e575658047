"""The method contract's options: every method's `--option` values are typed, checked and
listed, flags that belong to one method are gone from train-student, and docs/methods.md's
options tables are the ones the configs generate."""

from __future__ import annotations

import math

import pytest
from typer.testing import CliRunner

from xkd.cli import app
from xkd.errors import BadInput
from xkd.student.methods import available, get_method, method_config
from xkd.student.methods.base import option_specs
from xkd.student.methods.catalog import markdown

from conftest import ROOT

METHODS = available()


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def bad_values(spec) -> list[str]:
    """Values that must be refused for this option, from its declared type and range."""
    base = spec.type_name.split(" ")[0]
    out = {"bool": ["maybe", "2"], "int": ["abc", "1.5"], "float": ["abc", "nan", "inf", "-inf"], "str": []}[base]
    if spec.choices:
        out.append("not-a-choice")
    if spec.low is not None:
        out.append(str(spec.low - 1) if base == "int" else str(spec.low - 0.5))
        if spec.low_open:
            out.append(str(spec.low))
    if spec.high is not None:
        out.append(str(spec.high + 1) if base == "int" else str(spec.high + 0.5))
        if spec.high_open:
            out.append(str(spec.high))
    return out


@pytest.mark.parametrize("name", METHODS)
def test_every_option_has_help_a_default_of_its_type_and_the_defaults_parse(name):
    specs = option_specs(get_method(name).Config)
    assert specs, name
    for spec in specs:
        assert spec.help and not spec.help.endswith("."), (name, spec.name)
        if spec.default is not None:
            base = spec.type_name.split(" ")[0]
            assert type(spec.default).__name__ == base, (name, spec.name, spec.default)
    defaults = method_config(name, {})
    # Each default, given back as the text a user would type, parses to itself; an option read
    # only under another option's value (used_when) is given with that value, or it is refused.
    from xkd.student.methods.base import show

    for s in specs:
        read = not s.used_when or any(getattr(defaults, other) in allowed for other, allowed in s.used_when)
        context = {} if read else {s.used_when[0][0]: show(s.used_when[0][1][0])}
        assert getattr(method_config(name, {**context, s.name: show(s.default)}), s.name) == s.default, (name, s.name)


@pytest.mark.parametrize("name", METHODS)
def test_unknown_names_wrong_types_and_out_of_range_values_are_refused_listing_the_options(name):
    specs = option_specs(get_method(name).Config)
    listed = [s.name for s in specs]
    with pytest.raises(BadInput) as e:
        method_config(name, {"typo": "1"})
    assert "typo" in str(e.value) and all(n in str(e.value) for n in listed)
    refused = 0
    for spec in specs:
        for value in bad_values(spec):
            with pytest.raises(BadInput) as e:
                method_config(name, {spec.name: value})
            message = str(e.value)
            assert f"{spec.name}={value}" in message and all(n in message for n in listed), message
            assert "\n" not in message.strip()
            refused += 1
    assert refused >= len([s for s in specs if s.type_name.split(" ")[0] != "str"])


def test_values_parse_to_their_types():
    c = method_config("mergedistill", {"lambda_start": "0.3", "lambda_schedule": "constant"})
    assert c.lambda_start == 0.3 and isinstance(c.lambda_start, float) and c.lambda_schedule == "constant"
    c = method_config("mmkd", {"tlm": "off", "xwcl_layer": "none", "max_length": "64"})
    assert c.tlm is False and c.xwcl_layer is None and c.max_length == 64
    c = method_config("tinybert", {"stage": "2", "gold_weight": "0"})
    assert c.stage == 2 and c.gold_weight == 0.0
    assert math.isclose(method_config("multikd", {"temperature": "8"}).temperature, 8.0)
    with pytest.raises(BadInput, match="temperature=1"):  # a rule across fields, in the same paragraph style
        method_config("mergedistill", {"kd_target": "tail", "temperature": "2"})


@pytest.mark.parametrize("args, names", [
    (("--method", "mergedistill", "--option", "lamda_start=0.3"), ("lamda_start", "lambda_start")),
    (("--method", "mlm", "--option", "sorce=text"), ("sorce", "source")),
    (("--method", "mergedistill", "--option", "typo=1"), ("typo", "kd_target")),
    (("--method", "mlm", "--option", "mask_prob=abc"), ("mask_prob=abc", "float")),
    (("--method", "multikd", "--option", "temperature=0"), ("temperature=0", "(0, inf)")),
    (("--method", "xd", "--option", "keep_source=perhaps"), ("keep_source=perhaps", "true or false")),
    (("--method", "mergedistill", "--option", "lambda_start=0.5", "--option", "lambda_start=0.6"), ("twice",)),
])
def test_train_student_refuses_bad_options_before_reading_anything(tmp_path, args, names):
    """Checked before any cache or vocab is opened: these paths do not even exist."""
    r = invoke("train-student", *args, "--caches", tmp_path / "no-cache", "--vocab", tmp_path / "no-vocab",
               "--out", tmp_path / "out", "--steps", 1)
    assert r.exit_code == 2, r.output
    assert all(n in r.output for n in names), r.output
    assert "Traceback" not in r.output and not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag", ["--temperature", "--kd-target", "--lambda-start", "--lambda-end", "--lambda-schedule"])
def test_method_flags_are_no_longer_train_student_options(tmp_path, flag):
    """They belong to a method's config (--option NAME=VALUE); train-student no longer
    passes them to every method for most of them to drop silently."""
    r = invoke("train-student", "--method", "mlm", flag, "2", "--caches", tmp_path, "--vocab", tmp_path, "--out",
               tmp_path / "o")
    assert r.exit_code == 2 and "No such option" in r.output


def test_xkd_methods_lists_each_methods_options_and_the_docs_hold_the_generated_tables():
    r = invoke("methods")
    assert r.exit_code == 0
    for name in METHODS:
        assert f"{name}: " in r.output
        for spec in option_specs(get_method(name).Config):
            assert f"    {spec.name} = " in r.output, (name, spec.name)
    docs = (ROOT / "docs" / "methods.md").read_text()
    assert markdown() in docs, "docs/methods.md is stale: regenerate its options section with `xkd methods --markdown`"
    r = invoke("methods", "nope")
    assert r.exit_code == 2 and "mergedistill" in r.output
