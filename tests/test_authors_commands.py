"""The authors' README commands work as printed: joined on one line, or pasted line by line."""
from __future__ import annotations

import shlex

import pytest

from options import parse_options

# The authors' README (github.com/peixinlei/M2HSE) prints both commands in this form: one flag a line, no
# backslashes, trailing spaces and the misspelt --lr_updata / --batchsize included.
AUTHORS_TEMPLATE = """python train_{kind}.py 
        --data_path ./data/{grain}-grained-data
        --data_name corel5k_precomp 
        --vocab_path ./vocab 
        --logger_name ./checkpoint/M2HSE/{run}/Corel5K 
        --model_name ./checkpoint/M2HSE/{run}/Corel5K 
        --num_epochs 100 
        --lr_updata 50 
        --batchsize 100  
        --gamma_1 1 
        --gamma_2 .5 
        --{w}_1 {v} 
        --{w}_2 {v}"""
AUTHORS_COMMANDS = {
    "global": AUTHORS_TEMPLATE.format(kind="global", grain="coarse", run="Global", w="alpha", v=".8"),
    "local": AUTHORS_TEMPLATE.format(kind="local", grain="fine", run="Local", w="beta", v=".4"),
}
EXPECTED = {"data_name": "corel5k_precomp", "vocab_path": "./vocab", "num_epochs": 100, "lr_update": 50,
            "batch_size": 100, "gamma_1": 1.0, "gamma_2": 0.5}
PER_KIND = {"global": {"data_path": "./data/coarse-grained-data", "alpha_1": 0.8, "alpha_2": 0.8,
                       "model_name": "./checkpoint/M2HSE/Global/Corel5K"},
            "local": {"data_path": "./data/fine-grained-data", "beta_1": 0.4, "beta_2": 0.4,
                      "model_name": "./checkpoint/M2HSE/Local/Corel5K"}}


@pytest.mark.parametrize("kind", ["global", "local"])
def test_command_on_one_line_sets_every_value(kind):
    argv = shlex.split(AUTHORS_COMMANDS[kind])
    assert argv[1] == f"train_{kind}.py"
    opt = parse_options(kind, argv[2:])
    assert {k: opt[k] for k in {**EXPECTED, **PER_KIND[kind]}} == {**EXPECTED, **PER_KIND[kind]}
    assert opt["logger_name"] == opt["model_name"]


@pytest.mark.parametrize("kind", ["global", "local"])
def test_command_pasted_line_by_line_trains_the_same_model(kind):
    # Without backslashes a shell runs the first line alone: the defaults must be the README's values.
    first_line = shlex.split(AUTHORS_COMMANDS[kind].splitlines()[0])
    assert parse_options(kind, first_line[2:]) == parse_options(kind, shlex.split(AUTHORS_COMMANDS[kind])[2:])
