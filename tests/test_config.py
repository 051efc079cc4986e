"""config.py: the choices of the options are written once, match what the library implements, and
TrainConfig refuses what the command line refuses, with the same message."""

import click
import pytest

from charrnn import config
from charrnn.cli import cli
from charrnn.config import DEFAULTS, TrainConfig
from charrnn.errors import UsageError
from tests.common import run


def test_each_choice_list_is_what_its_module_implements():
    """config names the choices so that Click can declare them without importing numpy; each list
    must stay the one the implementing module accepts (a new cell, optimizer or schedule fails here
    until config names it too)."""
    from charrnn import data, finetune, model, optim, precision

    assert config.CELLS == model.CELLS
    assert model.NONLINEARITIES is config.NONLINEARITIES
    assert config.OPTIMIZERS == tuple(optim.OPTIMIZERS)
    assert optim.AVERAGES is config.AVERAGES
    assert ("auto", *optim.KINDS) == config.SCHEDULES
    assert set(config.DECAY_SCHEDULES) <= set(optim.KINDS)
    assert data.DOC_MODES is config.DOC_MODES
    assert finetune.UNKNOWN_MODES == config.UNKNOWN_MODES
    assert precision.CHOICES is config.PRECISIONS


def _choices(command: str) -> dict:
    return {p.name: tuple(p.type.choices) for p in cli.commands[command].params if isinstance(p.type, click.Choice)}


def test_the_command_line_declares_config_choices():
    train = _choices("train")
    for name, allowed in config.CHOICES.items():
        assert train[name] == allowed, name
    assert train["unknown"] == config.UNKNOWN_MODES
    assert _choices("sample")["unknown"] == config.PRIME_UNKNOWN_MODES
    assert _choices("eval")["docs"] == (*config.DOC_MODES, "none")
    assert _choices("viz")["docs"] == (*config.DOC_MODES, "none")
    assert _choices("viz")["activation"] == config.ACTIVATIONS


def test_every_option_resume_takes_is_an_option_of_train():
    names = {p.name for p in cli.commands["train"].params}
    assert set(config.RESUME_OPTIONS) <= names


@pytest.mark.parametrize("field,value", [
    ("cell", "lstm2"), ("nonlinearity", "sigmoid"), ("dropout_mode", "x"), ("average", "swa"), ("optimizer", "adamw"),
    ("schedule", "linear"), ("clip_mode", "l2"), ("docs", "none"), ("precision", "fp16"), ("cell", ""),
])
def test_train_config_refuses_choices_the_command_line_refuses(field, value):
    with pytest.raises(UsageError, match=f"^{field} must be one of"):
        TrainConfig(**{field: value})


def test_open_choices_may_be_left_open():
    assert TrainConfig(cell=None, docs=None).cell is None
    for name, allowed in config.CHOICES.items():
        for value in allowed:
            TrainConfig(**{name: value, "decay_steps": 10})


@pytest.mark.parametrize("schedule", config.DECAY_SCHEDULES)
def test_a_schedule_with_a_length_needs_decay_steps_in_the_library_as_on_the_command_line(schedule, tmp_path):
    """Library callers got a bare ValueError from optim.Schedule once the run had read its corpus;
    TrainConfig now refuses it with the command line's own message (exit status 2 there)."""
    with pytest.raises(UsageError) as e:
        TrainConfig(schedule=schedule)
    assert str(e.value) == (f"--schedule {schedule} needs --decay-steps (the schedule must not depend on the "
                            "budget, so runs resume exactly)")
    assert TrainConfig(schedule=schedule, decay_steps=5).decay_steps == 5
    res = run(["train", str(tmp_path / "absent.txt"), "--schedule", schedule])
    assert res.exit_code == 2 and res.stderr == f"charrnn: error: {e.value}\n"


def test_the_decay_steps_rule_comes_before_the_starting_point_rules():
    """The command line checked --decay-steps before TrainConfig's other rules; so does TrainConfig."""
    with pytest.raises(UsageError, match="needs --decay-steps"):
        TrainConfig(schedule="wsd", init_from="a", vocab="b")


def test_spelled():
    assert config.spelled(["a"]) == "a"
    assert config.spelled(("a", "b", "c")) == "a, b or c"
    assert config.spelled(("a", "b"), "and") == "a and b"


def test_defaults_pass_their_own_checks():
    assert TrainConfig.from_dict(DEFAULTS.to_dict()) == DEFAULTS
