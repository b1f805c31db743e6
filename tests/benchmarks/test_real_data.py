"""benchmarks.faithfulness --data on a folder the test writes: tables, protocols, masks and
splits, a list file, a checkpoint, resuming, and the errors a wrong layout gets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import faithfulness, folder
from libragrad_fx.digits import models
from tests.benchmarks.digits_folder import write_folder

pytestmark = pytest.mark.bench  # see [tool.pytest.ini_options] markers

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, Path, Path]:
    return write_folder(tmp_path_factory.mktemp("digits-folder"), 40)


def _run(*args: str) -> None:
    faithfulness.main(["--prompt", "a handwritten {}", *args])


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for path in sorted(out.glob("rows-*.jsonl"))
            for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def forty(dataset, tmp_path_factory) -> Path:
    images, masks, classes = dataset
    out = tmp_path_factory.mktemp("forty")
    _run("--data", str(images), "--classes", str(classes),
         "--masks", str(masks), "--model", "digits:vit",
         "--protocol", "libragrad", "--images", "40", "--methods", "input_x_gradient",
         "fullgrad+", "rollout", "--ablation", "--out-dir", str(out))
    return out


def test_forty_images_write_the_tables(forty):
    text = (forty / "results.md").read_text()
    for heading in ("Table 6 style", "Table 4 style", "Table 5 style", "AP against the masks"):
        assert heading in text
    results = json.loads((forty / "results.json").read_text())
    assert results["meta"]["images"] == 40 and results["meta"]["protocol"] == "libragrad"
    table = results["results"]["digits:vit"]
    assert table["fullgrad+"]["libra"]["completeness"] < 1e-4
    assert table["fullgrad+"]["vanilla"]["completeness"] > 1e-2
    assert table["fullgrad+"]["no-norm"]["completeness"] > 1e-2  # a rule off breaks it
    assert 0 <= table["fullgrad+"]["libra"]["ap"] <= 1
    # the trained ViT: Libra's map removes the evidence faster than vanilla's
    assert table["fullgrad+"]["libra"]["mif_accuracy"] < table["fullgrad+"]["vanilla"][
        "mif_accuracy"]
    rows = _rows(forty / "digits_vit")
    jobs = 2 + 2 + 1 + 5  # two methods in two forms, rollout, five ablations
    assert len(rows) == 40 * jobs
    assert len({r["image"] for r in rows}) == 40


def test_resume_measures_only_what_is_missing(dataset, tmp_path):
    images, masks, classes = dataset
    args = ["--data", str(images), "--classes", str(classes),
            "--model", "digits:mixer", "--images", "6",
            "--methods", "input_x_gradient", "--out-dir", str(tmp_path), "--batch", "3"]
    _run(*args)
    rows_file = tmp_path / "digits_mixer" / "rows-0.jsonl"
    full = rows_file.read_text().splitlines()
    assert len(full) == 12
    kept = full[:7]  # a run stopped part-way through the second batch
    marked = [json.dumps({**json.loads(line), "seconds": -1.0}) for line in kept]
    rows_file.write_text("\n".join(marked) + "\n")
    _run(*args, "--resume")
    after = _rows(tmp_path / "digits_mixer")
    assert len(after) == 12  # each (image, method, form) once
    assert len({(r["image"], r["method"], r["form"]) for r in after}) == 12
    assert sum(r["seconds"] == -1.0 for r in after) == 7  # the kept rows were not rewritten
    _run(*args)  # without --resume the rows start again
    assert len(_rows(tmp_path / "digits_mixer")) == 12


def test_reslrp_protocol_on_the_multi_object_split(dataset, tmp_path):
    images, masks, classes = dataset
    _run("--data", str(images), "--classes", str(classes),
         "--masks", str(masks), "--split", "multi", "--model",
         "digits:vit", "--protocol", "reslrp", "--images", "5", "--methods",
         "input_x_gradient", "--out-dir", str(tmp_path))
    rows = _rows(tmp_path / "digits_vit")
    assert {Path(r["image"]).name.startswith("two") for r in rows} == {True}
    # logit areas over 100 steps: not bounded by 1 as probability areas are
    assert max(abs(r["mif"]) for r in rows) > 1.0
    meta = json.loads((tmp_path / "results.json").read_text())["meta"]
    assert meta["protocol"] == "reslrp" and meta["split"] == "multi"


def test_list_file_and_checkpoint(dataset, tmp_path):
    images, _, classes = dataset
    paths = sorted(p for p in images.rglob("*.png"))[:4]
    words = classes.read_text().split()
    listing = tmp_path / "val.txt"
    listing.write_text("".join(f"{p.relative_to(images)} {words.index(p.parent.name)}\n"
                               for p in paths))
    checkpoint = tmp_path / "vit.pt"
    torch.save(models.load("vit").state_dict(), checkpoint)
    _run("--data", str(images), "--classes", str(classes),
         "--list", str(listing), "--model", "digits:vit",
         "--checkpoint", str(checkpoint), "--images", "4", "--methods", "fullgrad+",
         "--out-dir", str(tmp_path / "out"))
    rows = _rows(tmp_path / "out" / "digits_vit")
    assert len(rows) == 8
    assert all(r["label"] == words.index(Path(r["image"]).parent.name) for r in rows)
    # the checkpoint holds the trained weights: most predictions match the folder's labels
    assert sum(r["label"] == r["predicted"] for r in rows) >= 6


def test_layout_errors_say_what_to_do(dataset, tmp_path):
    images, masks, classes = dataset
    (tmp_path / "flat").mkdir()
    with pytest.raises(folder.DataError, match="class subfolders"):
        folder.entries(tmp_path / "flat")
    with pytest.raises(folder.DataError, match="needs --masks"):
        folder.entries(images, split="single")
    with pytest.raises(folder.DataError, match="no mask for"):
        folder.entries(images, masks=tmp_path)
    bad = tmp_path / "bad.txt"
    bad.write_text("zero/single000.png\n")
    with pytest.raises(folder.DataError, match="expected 'relative/path label'"):
        folder.entries(images, list_file=bad)


def test_masks_are_read_with_their_object_count(dataset):
    images, masks, classes = dataset
    single = folder.entries(images, masks=masks, split="single")
    multi = folder.entries(images, masks=masks, split="multi")
    assert len(single) == 20 and len(multi) == 20
    batch = next(folder.batches(single[:2], models_prep(), "digits:vit", 2))
    assert batch.masks.shape == (2, 48, 48) and batch.masks.any()


def models_prep():
    from libragrad_fx.loading.models import load

    return load("digits:vit").preprocessing


def test_two_processes_give_the_rows_of_one(dataset, tmp_path):
    images, _, classes = dataset
    common = ["--data", str(images), "--classes", str(classes), "--model", "digits:vit",
              "--images", "6", "--methods", "input_x_gradient"]
    _run(*common, "--out-dir", str(tmp_path / "one"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", "29534", "-m", "benchmarks.faithfulness", *common,
               "--out-dir", str(tmp_path / "two")]
    subprocess.run(command, cwd=ROOT, env=env, check=True, capture_output=True, timeout=600)
    assert len(list((tmp_path / "two" / "digits_vit").glob("rows-*.jsonl"))) == 2

    def by_key(out: Path) -> dict:
        return {(r["image"], r["form"]): r for r in _rows(out / "digits_vit")}

    one, two = by_key(tmp_path / "one"), by_key(tmp_path / "two")
    assert one.keys() == two.keys() and len(one) == 12
    for key, row in one.items():
        assert row["srg"] == pytest.approx(two[key]["srg"], abs=1e-6)
        assert row["completeness"] == pytest.approx(two[key]["completeness"], rel=1e-4)
