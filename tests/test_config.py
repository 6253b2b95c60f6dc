"""config.py: config files and overrides, the notes on settings that quietly train a baseline, and the command lines
the configs and docs show."""

import re
from pathlib import Path

import pytest

import config
from cli import UserError

ROOT = Path(__file__).resolve().parents[1]


def test_a_config_file_with_a_syntax_error_names_the_file_and_the_line(tmp_path):
    path = tmp_path / "broken.py"
    path.write_text('out_dir = "out/x"\nlr = (3e-3\ns = 4\n')
    with pytest.raises(UserError, match=rf"config file {re.escape(str(path))}, line 2: ") as refused:
        config.load([str(path)])
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize("override, message", [
    ("--batch_size=True", "batch_size=True is a bool, but batch_size takes an int"),
    ("--compile=1", "compile=1 is an int, but compile takes a bool"),
    ("--lr=[1]", "lr=[1] is a list, but lr takes a float"),
])
def test_a_value_of_the_wrong_type_names_both_types_with_their_article(override, message):
    with pytest.raises(UserError, match=re.escape(message)):
        config.load([override])


def notes(**settings):
    return config.notes(config.load([f"--{k}={v}" for k, v in settings.items()]))


def test_notes_name_each_tst_setting_that_trains_a_plain_baseline():
    assert notes(s=4, r=0.0) == ["s=4 with r=0.0: no step reads bags; this run is a plain baseline"]
    assert notes(s=1, r=0.3) == ["s=1 with r=0.3: a bag of one token is that token; this run is a plain baseline"]
    assert notes(s=4, r=0.01, max_steps=50, warmup_steps=5) == [
        "s=4 with r=0.01 of max_steps=50: floor(r * max_steps) = 0, so no step reads bags; this run is a plain "
        "baseline"]
    # a real TST run, a real baseline and a schedule (whose stages tst.check gives a step each) have nothing to say
    assert notes(s=4, r=0.02, max_steps=50, warmup_steps=5) == notes(s=1, r=0.0) == []
    assert notes(s_schedule="[(0.2,8),(0.3,4)]") == []
    assert config.notes(config.load([str(ROOT / "config" / "tiny_tst.py")])) == []


def command_lines(text):
    """Each `torchrun ...` command of a text, from torchrun to the end of its line (lines joined at a trailing \\)."""
    return re.findall(r"torchrun --[^\n`]*", re.sub(r"\\\n\s*(#\s*)?", " ", text))


def test_every_torchrun_line_puts_a_double_dash_after_train_py():
    # torchrun's parser would take --s=... and --r=... for abbreviations of its own options
    files = sorted((ROOT / "config").glob("*.py")) + [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
    lines = [(f.name, line) for f in files for line in command_lines(f.read_text())]
    assert len({name for name, _ in lines}) >= 4  # the three GPU configs that show one, and the README
    wrong = [(name, line) for name, line in lines if "train.py" in line and "train.py --" not in line]
    assert not wrong, wrong
    assert command_lines("torchrun --nproc_per_node=8 train.py config/x.py") == [
        "torchrun --nproc_per_node=8 train.py config/x.py"]  # the check itself finds the mistake
