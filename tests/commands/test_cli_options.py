"""The command line with a user's own model: the current folder importable, --size, stated or
absent normalisation, --query, progress lines, notes on random weights, the output format."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
from PIL import Image

from libragrad_fx.commands import demo
from libragrad_fx.commands.cli import main
from libragrad_fx.commands.explain import preprocessing
from libragrad_fx.loading.models import load

MODULE = '''
import torch
from torch import nn


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm, self.fc = nn.LayerNorm(8), nn.Linear(8, 8)

    def forward(self, x):
        return x + self.fc(torch.nn.functional.gelu(self.norm(x)))


class Tiny(nn.Module):
    """Patch tokens of a 16x16 image (the only size it takes), two blocks, a head."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 8, 4, 4)
        self.blocks = nn.Sequential(Block(), Block())
        self.head = nn.Linear(8 * 16, 5)

    def forward(self, x):
        x = self.blocks(self.patch(x).flatten(2).transpose(1, 2))
        return self.head(x.reshape(x.shape[0], 8 * 16))


def tiny():
    torch.manual_seed(0)
    return Tiny()
'''


@pytest.fixture
def folder(tmp_path, monkeypatch):
    """A folder holding the user's model file and a 20x20 colour image, made the cwd."""
    (tmp_path / "mymodels.py").write_text(MODULE)
    rgb = (np.random.default_rng(0).random((20, 20, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "photo.png")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_a_model_in_the_current_folder_is_explained_at_the_size_given(folder, capsys):
    out = folder / "maps.jpg"
    argv = ["explain", "--model", "mymodels:tiny", "--image", "photo.png", "--size", "16",
            "--method", "input_x_gradient", "--compare", "-o", str(out)]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "resized photo.png from 20x20 to 16x16" in err
    assert "mymodels:tiny states no input normalisation" in err
    assert "has random weights" in err
    assert "[1/2] photo.png input_x_gradient vanilla" in err  # stderr is not a terminal here
    assert "[2/2] photo.png input_x_gradient Libra" in err
    assert out.read_bytes().startswith(b"\xff\xd8")  # JPEG, as the name says


def test_a_wrong_size_is_one_line_that_names_size(folder, capsys):
    argv = ["explain", "--model", "mymodels:tiny", "--image", "photo.png",
            "--method", "input_x_gradient", "-o", str(folder / "maps.png")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "states no input size" in err
    error = [line for line in err.splitlines() if "error:" in line]
    assert len(error) == 1 and "pass --size H W" in error[0] and "(1, 3, 20, 20)" in error[0]


def test_the_model_file_is_not_left_importable(folder):
    import sys

    load("mymodels:tiny")
    assert str(folder) not in sys.path


def test_a_class_that_needs_arguments_is_one_line(capsys):
    assert main(["report", "torch.nn:Linear"]) == 2
    err = capsys.readouterr().err
    assert "calling Linear() failed (TypeError" in err and "Traceback" not in err


def test_report_of_a_model_without_a_size_takes_size(folder, capsys):
    assert main(["report", "mymodels:tiny", "--size", "16", "--frontend", "export"]) == 0
    assert "certified complete" in capsys.readouterr().out


@pytest.mark.parametrize("argv, says", [
    (["--size", "0"], "--size takes H W or one N"),
    (["--size", "1", "2", "3"], "--size takes H W or one N"),
    (["--query", "mean"], "--query serves the attention methods"),
    (["--std", "1", "1", "1"], "--std needs --mean"),
])
def test_bad_options_are_one_line(tmp_path, capsys, argv, says):
    base = ["explain", "--model", "digits:vit", "--image", str(demo.IMAGE), "-o",
            str(tmp_path / "m.png")]
    assert main(base + argv) == 2
    assert says in capsys.readouterr().err


def test_query_mean_reaches_the_attention_methods(tmp_path, capsys):
    argv = ["explain", "--model", "digits:vit", "--image", str(demo.IMAGE), "--method",
            "attcat", "fullgrad+", "--query", "mean", "-o", str(tmp_path / "m.png")]
    assert main(argv) == 0
    with_cls = ["explain", "--model", "digits:vit", "--image", str(demo.IMAGE), "--method",
                "attcat", "-o", str(tmp_path / "c.png")]
    out_mean = capsys.readouterr().out
    assert main(with_cls) == 0
    row = [line for line in out_mean.splitlines() if "attcat" in line]
    assert row and row[0] not in capsys.readouterr().out  # a different map, a different sum


def test_mean_and_std_replace_an_absent_normalisation(folder):
    loaded = load("mymodels:tiny")
    assert loaded.random_weights and not loaded.preprocessing.stated
    args = argparse.Namespace(size=[16], mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])
    prep = preprocessing(loaded, args)
    assert prep.stated and prep.size == (16, 16) and prep.std == (0.25, 0.25, 0.25)
    assert not load("digits:vit").random_weights


def test_a_timm_model_states_its_own_normalisation():
    assert load("timm:resnet10t").preprocessing.stated
    assert load("timm:resnet10t").random_weights
    assert isinstance(load("timm:resnet10t").model, torch.nn.Module)
