"""Every configuration file refuses a key given twice (the plain YAML loader kept the last one silently)."""
from __future__ import annotations

import pytest
import yaml

from traces.yaml_unique import safe_load_unique


def test_a_duplicate_key_is_a_yaml_error_naming_the_key_and_both_lines():
    with pytest.raises(yaml.YAMLError, match=r"found key 'cache_slots' a second time \(first at line 2\)"):
        safe_load_unique("policy: lru\ncache_slots: [4, 5]\ncache_slots: [6]\n")
    with pytest.raises(yaml.YAMLError, match="'precision' a second time"):
        safe_load_unique("slices:\n  a:\n    precision: bf16\n    precision: mxfp4\n")
    assert safe_load_unique("a: 1\nb: {a: 2}\nc: [{a: 3}, {a: 4}]\n") == {"a": 1, "b": {"a": 2}, "c": [{"a": 3}, {"a": 4}]}
    assert safe_load_unique("1: x\n'1': y\n") == {1: "x", "1": "y"}      # different keys, as YAML types them


def test_every_reader_reports_it_as_invalid_yaml(tmp_path):
    from experiments.config import ConfigError
    from experiments.overrides import load_scenario as load_sweep_config
    from hardware.profile import HardwareProfileError, load_hardware
    from traces import load_shape
    from validation.scenario import ScenarioError, load_scenario
    path = tmp_path / "twice.yaml"
    path.write_text("name: twice\nname: again\n")
    for load, error in ((load_sweep_config, ConfigError), (load_hardware, HardwareProfileError),
                        (load_shape, ValueError), (load_scenario, ScenarioError)):
        with pytest.raises(error, match="(?s)not valid YAML.*'name' a second time"):
            load(path)
