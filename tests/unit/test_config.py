"""The shipped configs are valid: the embedded default, the micro test config, and every paper config layered on
the default the way `snakemake --configfile config/paper/X.yaml` layers it (a recursive dict update)."""
import copy
from pathlib import Path

import jsonschema
import pytest
import yaml
from snakemake.utils import update_config

REPO = Path(__file__).resolve().parents[2]
SCHEMA = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())
DEFAULT = yaml.safe_load((REPO / "config" / "config.yaml").read_text())


def layered(base: dict, update: dict) -> dict:
    """The default with a config file layered on it, by Snakemake's own recursive merge (--configfile)."""
    merged = copy.deepcopy(base)
    update_config(merged, update)
    return merged


@pytest.mark.parametrize("path", [REPO / "config" / "config.yaml", REPO / ".test" / "config" / "config.yaml"],
                         ids=lambda p: p.relative_to(REPO).as_posix())
def test_standalone_config_is_valid(path):
    jsonschema.validate(yaml.safe_load(path.read_text()), SCHEMA)


@pytest.mark.parametrize("path", sorted((REPO / "config" / "paper").glob("*.yaml")), ids=lambda p: p.name)
def test_paper_config_is_valid_on_the_default(path):
    paper = yaml.safe_load(path.read_text())
    config = layered(DEFAULT, paper)
    jsonschema.validate(config, SCHEMA)
    # the settings the paper configs exist for are really set, not inherited from the tiny default
    assert config["model"]["path"] and config["model"]["dtype"] == "bfloat16"
    assert config["sft"]["lr"] == 1e-6 and config["sft"]["schedule"] == "log_warmup_constant"
    assert config["spectral"]["top_r"] == 768


def test_schema_rejects_an_unknown_key():
    bad = layered(DEFAULT, {"spectral": {"top_rank": 5}})
    with pytest.raises(jsonschema.ValidationError, match="top_rank"):
        jsonschema.validate(bad, SCHEMA)
