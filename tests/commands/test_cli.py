"""The command line: the demo, explain on the shipped image, and bad input as one-line errors.

Everything runs on the shipped digits models (48×48 canvases), so the file takes seconds.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from libragrad_fx.commands import demo
from libragrad_fx.commands.cli import main
from libragrad_fx.commands.maps import Query, run_maps
from libragrad_fx.digits import build, make_digits
from libragrad_fx.digits.models import save, weights_path
from libragrad_fx.loading.inputs import open_image, prepare
from libragrad_fx.loading.models import load
from libragrad_fx.pictures import figure_size

IMAGE = str(demo.IMAGE)
HAS_CLIP = weights_path("clip").is_file()
needs_clip = pytest.mark.skipif(not HAS_CLIP, reason="the CLIP weights are not shipped yet")


@pytest.fixture(scope="module")
def shipped() -> demo.DemoImage:
    return demo.shipped_image()


def png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


# --- the demo --------------------------------------------------------------------------------


def test_demo_prints_report_and_completeness_and_writes_the_png(tmp_path, capsys, shipped):
    out = tmp_path / "demo.png"
    assert main(["demo", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "certified complete: every gradient path has degree 1" in text
    assert "totals: attention 4 | gate 4 | elementwise 0 | norm 9" in text
    gaps = re.findall(r"^ +(.+): vanilla (\S+) +Libra (\S+)$", text, flags=re.M)
    names = [name for name, _, _ in gaps]
    assert names[:2] == [f"target {label}" for label in shipped.labels]
    assert len(gaps) == (4 if HAS_CLIP else 2)
    for name, vanilla, libra in gaps:
        assert float(libra) < 1e-4, name
        assert float(vanilla) > 1e-2, name
    assert "class discrimination" in text and f"wrote {out}" in text
    rows = 4 if HAS_CLIP else 2
    assert png_size(out) == figure_size(rows, 1 + 2 * len(demo.METHODS))


def test_shipped_image_is_the_canvas_its_json_names(shipped):
    """The PNG holds make_digits' canvas (to 8 bits) and the masks are exactly its masks."""
    source = json.loads(demo.INFO.read_text())["source"]
    canvases = make_digits(source["split"], source["n"], two=source["two"], seed=source["seed"])
    i = source["index"]
    pixels = np.asarray(open_image(demo.IMAGE))
    assert pixels.shape == (48, 48)
    expected = np.round(canvases.images[i, 0].numpy() * 255).astype(np.uint8)
    assert np.array_equal(pixels, expected)
    assert tuple(canvases.labels[i].tolist()) == shipped.labels
    assert torch.equal(canvases.masks[i], shipped.masks)


# --- explain ---------------------------------------------------------------------------------


def test_explain_writes_one_row_per_target_and_a_column_per_map(tmp_path, capsys, shipped):
    out = tmp_path / "maps.png"
    first, second = shipped.labels
    argv = ["explain", "--model", "digits:vit", "--image", IMAGE, "--target", str(first),
            "--target", str(second), "--method", "fullgrad+", "gradcam", "--compare",
            "-o", str(out)]
    assert main(argv) == 0
    captured = capsys.readouterr()
    # stderr is not a terminal here: one progress line per map, and nothing else
    lines = captured.err.splitlines()
    assert lines and all(re.match(r"libragrad-fx: \[\d+/\d+\] demo\.png ", ln) for ln in lines)
    assert png_size(out) == figure_size(2, 1 + 2 * 2)
    # f(x) and Σ map agree for Libra FullGrad+, and not for the vanilla form
    rows = re.findall(r"^demo\.png +target (\d) +(\S+) +(\w+) +(\S+) +(\S+)$", captured.out,
                      flags=re.M)
    assert len(rows) == 2 * 2 * 2
    for _, method, form, score, total in rows:
        if method == "fullgrad+":
            close = abs(float(score) - float(total)) <= 1e-3 * abs(float(score))
            assert close == (form == "Libra"), (method, form, score, total)


def test_explain_defaults_to_the_predicted_class_and_several_images(tmp_path, capsys):
    out = tmp_path / "two.png"
    assert main(["explain", "--model", "digits:vit", "--image", IMAGE, IMAGE, "-o",
                 str(out)]) == 0
    assert capsys.readouterr().out.count("(predicted)") == 2
    assert png_size(out) == figure_size(2, 2)


def libra_maps(shipped: demo.DemoImage, method: str, libra: bool = True) -> torch.Tensor:
    """(2, 48, 48): the map of each digit of the shipped image as explain draws it."""
    loaded = load("digits:vit")
    picture = prepare(open_image(shipped.path), "demo.png", loaded.preprocessing, loaded.name)
    query = Query(picture, list(shipped.labels), ["a", "b"])
    (explanation,) = run_maps(loaded.model, [query], [method], [libra]).values()
    return explanation.heatmap(48)


@pytest.mark.parametrize("method", ["fullgrad+", "input_x_gradient", "attcat"])
def test_libra_maps_sit_on_the_digits(shipped, method):
    """Most positive Libra attribution lies on the two digits, which cover a small area, and
    most of it on the digit asked for."""
    positive = libra_maps(shipped, method).clamp(min=0)
    digits = shipped.masks.any(0)
    area = digits.float().mean().item()
    assert area < 0.2
    on_digits = (positive * digits).sum((1, 2)) / positive.sum((1, 2))
    assert (on_digits > 2.5 * area).all(), (on_digits, area)
    on_target = (positive * shipped.masks).sum((1, 2))
    on_other = (positive * shipped.masks.flip(0)).sum((1, 2))
    assert (on_target > 2 * on_other).all(), (on_target, on_other)


def test_libra_fullgrad_discriminates_where_vanilla_does_not(shipped):
    """The point of the demo image: vanilla FullGrad+ puts its evidence on the wrong digit."""
    def share(maps: torch.Tensor) -> torch.Tensor:
        positive = maps.clamp(min=0)
        on_target = (positive * shipped.masks).sum((1, 2))
        return on_target / (on_target + (positive * shipped.masks.flip(0)).sum((1, 2)))

    libra, vanilla = share(libra_maps(shipped, "fullgrad+")), share(
        libra_maps(shipped, "fullgrad+", libra=False))
    assert (libra > 0.8).all() and (vanilla < 0.5).all(), (libra, vanilla)


@needs_clip
def test_explain_clip_with_prompts(tmp_path, capsys):
    out = tmp_path / "clip.png"
    argv = ["explain", "--model", "digits:clip", "--image", IMAGE, "--text",
            "a handwritten three", "--text", "a handwritten nine", "--method", "fullgrad+",
            "-o", str(out)]
    assert main(argv) == 0
    assert "“a handwritten three”" in capsys.readouterr().out
    assert png_size(out) == figure_size(2, 2)


def test_checkpoint_that_matches_is_loaded(tmp_path, capsys):
    path = tmp_path / "vit.pth"
    model = build("vit")
    torch.save({"state_dict": model.state_dict()}, path)
    loaded = load("digits:vit", checkpoint=path).model
    for (name, a), b in zip(loaded.state_dict().items(), model.state_dict().values(),
                            strict=True):
        assert torch.equal(a, b), name
    assert main(["report", "digits:vit", "--checkpoint", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["complete"] is True


def test_checkpoint_in_the_digits_compact_format_is_loaded(tmp_path):
    """CLIP's token embedding stored as the rows that moved (as benchmarks.train_digits
    saves it) is rebuilt on the seeded initialisation."""
    model = build("clip")
    with torch.no_grad():
        model.token_embedding.weight[[3, 7]] += 1.0
    path = save(model, "clip", tmp_path / "clip.safetensors")
    loaded = load("digits:clip", checkpoint=path).model
    expected = model.token_embedding.weight.half().float()
    assert torch.equal(loaded.token_embedding.weight[[3, 7]], expected[[3, 7]])


# --- bad input: one line on stderr, exit code 2, no traceback --------------------------------


def one_line_error(capsys, argv: list[str], named: str) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(captured.err.splitlines()) == 1, captured.err
    assert err.startswith("libragrad-fx: error:") and "Traceback" not in err
    assert named in err, err
    return err


def explain_argv(*extra: str, image: str = IMAGE, model: str = "digits:vit") -> list[str]:
    return ["explain", "--model", model, "--image", image, *extra]


@pytest.mark.parametrize(("argv", "named"), [
    (explain_argv(model="vit_no_such_model_xyz"), "vit_no_such_model_xyz"),
    (explain_argv(model="digits:nosuch"), "nosuch"),
    (explain_argv(model="open_clip:NoSuchNet"), "NoSuchNet"),
    (explain_argv(image="/no/such/image.png"), "No such file"),
    (explain_argv("--target", "10"), "0 to 9"),
    (explain_argv("--text", "a handwritten one"), "CLIP"),
    (explain_argv("--method", "nope"), "nope"),
    (explain_argv("-o", "/no/such/folder/x.png"), "/no/such/folder"),
    (explain_argv("--pretrained", "some_tag"), "shipped"),
])
def test_bad_input_is_a_one_line_error(capsys, argv, named):
    one_line_error(capsys, argv, named)


def test_unreadable_image(tmp_path, capsys):
    path = tmp_path / "notes.png"
    path.write_text("not a picture\n")
    one_line_error(capsys, explain_argv(image=str(path)), "cannot read image")


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_checkpoint_of_another_model(tmp_path, capsys, suffix):
    path = tmp_path / f"eva{suffix}"
    state = build("eva").state_dict()
    if suffix == ".pt":
        torch.save(state, path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    err = one_line_error(capsys, explain_argv("--checkpoint", str(path)), "does not match")
    assert "missing" in err and "unexpected" in err and "another shape" in err
    assert "in the file" in err and "and " in err  # first few named, the rest counted


def test_checkpoint_that_is_not_a_state_dict(tmp_path, capsys):
    path = tmp_path / "weights.pt"
    path.write_bytes(b"\x00garbage")
    one_line_error(capsys, explain_argv("--checkpoint", str(path)), "not a state_dict")


def test_pretrained_offline_says_how_to_pass_a_checkpoint(tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants
    from huggingface_hub.utils import reset_sessions

    import libragrad_fx.loading.hub

    monkeypatch.setattr(libragrad_fx.loading.hub, "hub_reachable", lambda: False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # restored afterwards
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))  # nothing cached
    try:
        err = one_line_error(capsys, ["report", "vit_tiny_patch16_224", "--pretrained"],
                             "--checkpoint FILE")
    finally:
        reset_sessions()
    assert "unreachable" in err


def test_image_of_another_size_is_resized_with_a_note(tmp_path, capsys):
    path = tmp_path / "big.png"
    Image.open(IMAGE).resize((64, 80)).save(path)
    out = tmp_path / "big_maps.png"
    assert main(explain_argv("-o", str(out), image=str(path))) == 0
    err = [ln for ln in capsys.readouterr().err.splitlines() if "] big.png " not in ln]
    assert len(err) == 1, err  # the note, besides the progress lines
    assert "resized big.png from 64x80 to 48x48" in err[0]
    assert png_size(out) == figure_size(1, 2)


@needs_clip
def test_clip_without_prompts(capsys):
    one_line_error(capsys, explain_argv(model="digits:clip"), "--text")


def test_the_installed_command_fails_in_one_line(tmp_path):
    """Through a real process: the exit code and stderr a shell sees."""
    path = tmp_path / "broken.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "libragrad_fx.commands.cli", *explain_argv(
        image=str(path))], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert len(proc.stderr.splitlines()) == 1, proc.stderr
    assert "cannot read image" in proc.stderr and "Traceback" not in proc.stderr
